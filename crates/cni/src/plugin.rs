//! The commands. [`run`] reads the invocation (CNI_* variables, the config
//! on stdin), dispatches, and returns what to print; the binary only prints
//! it.

mod add;
mod check;
mod del;

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::statfs::{NSFS_MAGIC, statfs};
use serde_json::Value;

use crate::config::{self, LATEST_VERSION, NetConf};
use crate::env::{self, Command, Invocation, Lookup};
use crate::error::{CniError, Failure};
use crate::ipam::{Allocation, Pool};
use crate::iproute::{self, Netns};
use crate::result;

/// Runs one invocation. `Ok(None)` means success with nothing to print
/// (DEL, CHECK); `Err` is printed as the spec's error object.
pub fn run(lookup: Lookup<'_>, stdin: &mut dyn Read) -> Result<Option<Value>, Box<Failure>> {
    let fail_in = |version: &str, e: CniError| Box::new(Failure::new(version, e));
    let command = env::command(lookup).map_err(|e| fail_in(LATEST_VERSION, e))?;
    if command == Command::Version {
        // The spec passes {"cniVersion": ...} on stdin; the answer is the
        // same whatever it says, so it is not read.
        return Ok(Some(result::version()));
    }
    let mut bytes = Vec::new();
    stdin.read_to_end(&mut bytes).map_err(|e| {
        fail_in(
            LATEST_VERSION,
            CniError::io("reading the network config from", "stdin")(e),
        )
    })?;
    let version = config::peek_version(&bytes);
    let fail = |e: CniError| fail_in(version, e);
    let conf = NetConf::parse(&bytes).map_err(fail)?;
    let inv = Invocation::from_env(command, lookup).map_err(fail)?;
    match command {
        Command::Add => add::add(&conf, &inv)
            .map(Some)
            .map_err(|(error, cleanup_problems)| {
                Box::new(Failure {
                    cni_version: version.to_owned(),
                    error,
                    cleanup_problems,
                })
            }),
        Command::Del => del::del(&conf, &inv).map(|()| None).map_err(fail),
        Command::Check => check::check(&conf, &inv).map(|()| None).map_err(fail),
        Command::Version => Ok(Some(result::version())),
    }
}

/// CNI_NETNS, which ADD and CHECK require.
fn netns(inv: &Invocation) -> Result<&Path, CniError> {
    let path = inv.netns.as_deref().ok_or_else(|| {
        CniError::env(
            "CNI_NETNS",
            "is not set; pass the container's network namespace path",
        )
    })?;
    match statfs(path) {
        Ok(st) if st.filesystem_type() == NSFS_MAGIC => {
            if same_file(path, Path::new("/proc/self/ns/net")) {
                // Wiring "the container" would then rewire the node itself.
                return Err(CniError::env(
                    "CNI_NETNS",
                    format!(
                        "{} is the plugin's own network namespace (the node's); pass the container's",
                        path.display()
                    ),
                ));
            }
            Ok(path)
        }
        Ok(_) => Err(CniError::env(
            "CNI_NETNS",
            format!(
                "{} is not a network namespace (not on nsfs); pass /run/netns/NAME or /proc/PID/ns/net",
                path.display()
            ),
        )),
        Err(Errno::ENOENT) => Err(CniError::ContainerUnknown {
            what: format!(
                "network namespace {} (CNI_NETNS) does not exist: the container is gone",
                path.display()
            ),
        }),
        Err(e) => Err(CniError::io(
            "inspecting network namespace (CNI_NETNS)",
            path,
        )(std::io::Error::from(e))),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Each pool with the address allocated from it.
fn paired(conf: &NetConf, alloc: &Allocation) -> Vec<(Pool, IpAddr)> {
    conf.pools
        .iter()
        .copied()
        .zip(alloc.addresses.iter().copied())
        .collect()
}

/// Deletes a host device (and so its veth peer); a device that is already
/// gone is success.
fn delete_host_device(name: &str) -> Result<(), CniError> {
    match iproute::ip(Netns::Host, &["link", "del", "dev", name]) {
        Ok(_) => Ok(()),
        Err(e) => match iproute::link(Netns::Host, name) {
            Ok(None) => Ok(()),
            _ => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::error::code;

    struct Case {
        env: HashMap<String, String>,
        stdin: Vec<u8>,
    }

    impl Case {
        fn new(command: &str, dir: &Path) -> Self {
            let env = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/nonexistent/netns"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
            let conf = json!({
                "cniVersion": "1.0.0", "name": "meshless", "type": "meshless-cni",
                "podCIDRs": ["198.18.17.0/24", "fd00:b:1::/64"],
                "stateDir": dir.join("state"), "agentEndpointsDir": dir.join("endpoints"),
            });
            Self {
                env,
                stdin: serde_json::to_vec(&conf).expect("config"),
            }
        }

        fn set(mut self, k: &str, v: &str) -> Self {
            self.env.insert(k.to_owned(), v.to_owned());
            self
        }

        fn unset(mut self, k: &str) -> Self {
            self.env.remove(k);
            self
        }

        fn conf(mut self, edit: impl FnOnce(&mut Value)) -> Self {
            let mut v: Value = serde_json::from_slice(&self.stdin).expect("json");
            edit(&mut v);
            self.stdin = serde_json::to_vec(&v).expect("json");
            self
        }

        fn run(&self) -> Result<Option<Value>, Value> {
            let lookup = |k: &str| self.env.get(k).cloned();
            run(&lookup, &mut self.stdin.as_slice()).map_err(|f| f.to_json())
        }

        fn error(&self) -> Value {
            self.run().expect_err("should fail")
        }
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("meshless-cni-run-{tag}-{}", std::process::id()));
        let _ignored = std::fs::remove_dir_all(&d);
        d
    }

    fn assert_error(e: &Value, code: u32, version: &str, needle: &str) {
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(e["cniVersion"], version, "{e}");
        let msg = e["msg"].as_str().expect("msg is a string");
        assert!(
            msg.contains(needle),
            "msg {msg:?} should mention {needle:?}"
        );
        assert!(
            e["details"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("CNI error {code}"))),
            "{e}"
        );
        assert_eq!(
            e.as_object().map(|o| o.len()),
            Some(4),
            "exactly cniVersion, code, msg, details: {e}"
        );
    }

    #[test]
    fn version_ignores_stdin() {
        let dir = tempdir("version");
        let mut c = Case::new("VERSION", &dir);
        c.stdin = b"garbage".to_vec();
        assert_eq!(
            c.run().expect("VERSION"),
            Some(json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}))
        );
    }

    #[test]
    fn each_error_case_has_its_code_and_names_the_problem() {
        let dir = tempdir("errors");
        let c = || Case::new("ADD", &dir);
        assert_error(
            &c().unset("CNI_COMMAND").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI_COMMAND",
        );
        assert_error(
            &c().set("CNI_COMMAND", "STATUS").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI 1.1",
        );
        assert_error(
            &c().set("CNI_COMMAND", "GC").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI 1.1",
        );
        assert_error(
            &c().conf(|v| v["cniVersion"] = "9.9.9".into()).error(),
            code::INCOMPATIBLE_VERSION,
            "1.0.0",
            "9.9.9",
        );
        let mut bad = c();
        bad.stdin = b"{\"cniVersion\": \"0.4.0\",".to_vec();
        assert_error(
            &bad.error(),
            code::DECODE_FAILURE,
            "1.0.0",
            "not valid JSON",
        );
        assert_error(
            &c().conf(|v| {
                v["cniVersion"] = "0.4.0".into();
                v.as_object_mut().expect("obj").remove("podCIDRs");
            })
            .error(),
            code::INVALID_CONFIG,
            "0.4.0",
            "podCIDRs",
        );
        assert_error(
            &c().conf(|v| v["ipam"] = json!({"type": "host-local"}))
                .error(),
            code::UNSUPPORTED_FIELD,
            "1.0.0",
            "ipam",
        );
        assert_error(
            &c().unset("CNI_NETNS").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI_NETNS",
        );
        assert_error(
            &c().set("CNI_IFNAME", "").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI_IFNAME",
        );
        assert_error(
            &c().set("CNI_ARGS", "X=1").error(),
            code::INVALID_ENV,
            "1.0.0",
            "CNI_ARGS",
        );
        assert_error(
            &c().error(),
            code::CONTAINER_UNKNOWN,
            "1.0.0",
            "/nonexistent/netns (CNI_NETNS) does not exist",
        );
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("not-a-netns");
        std::fs::write(&file, b"").expect("file");
        assert_error(
            &c().set("CNI_NETNS", &file.to_string_lossy()).error(),
            code::INVALID_ENV,
            "1.0.0",
            "not a network namespace",
        );
        assert_error(
            &c().set("CNI_COMMAND", "CHECK").error(),
            code::CONTAINER_UNKNOWN,
            "1.0.0",
            "does not exist",
        );
        // None of the failures allocated anything.
        assert!(!dir.join("state").join("meshless.json").exists());
        assert!(!dir.join("endpoints").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn del_of_an_unknown_container_succeeds_without_netns() {
        let dir = tempdir("del");
        let c = Case::new("DEL", &dir).unset("CNI_NETNS");
        assert_eq!(c.run().expect("DEL"), None);
        assert_eq!(c.run().expect("DEL again"), None);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_plugins_own_netns_is_refused() {
        // /proc/self/ns/net is a real netns that needs no privileges to stat.
        let dir = tempdir("own");
        for cmd in ["ADD", "CHECK"] {
            let e = Case::new(cmd, &dir)
                .set("CNI_NETNS", "/proc/self/ns/net")
                .error();
            assert_error(
                &e,
                code::INVALID_ENV,
                "1.0.0",
                "the plugin's own network namespace",
            );
        }
        assert!(!dir.join("state").exists(), "refused before allocating");
    }
}
