//! Privileged tier: the real `meshless-cni` binary, run the way a runtime
//! runs it (CNI_* variables, config on stdin) inside a lab node's network
//! namespace, against real container namespaces. Only lab namespaces are
//! touched; everything is removed with the lab.
//! Run by `cargo xtask test` as root (`cargo test -- --ignored privileged_cni`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshless_lab::{Lab, LabProcess, LabSpec, bin_path, require_root, unique_name};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const PLUGIN: &str = env!("CARGO_BIN_EXE_meshless-cni");
const ROUTER_V4: &str = "198.18.17.1";
const ROUTER_V6: &str = "fd00:b:1::1";

/// A one-node lab and a scratch directory for the plugin's files (inside
/// the lab's state directory, so teardown removes it).
struct Bed {
    lab: Lab,
    dir: PathBuf,
    seq: AtomicU32,
}

/// One plugin run: exit status and stdout (the plugin writes nothing else).
#[derive(Debug)]
struct Outcome {
    ok: bool,
    out: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(self.out.trim())
            .unwrap_or_else(|e| panic!("plugin printed {:?}, not JSON: {e}", self.out))
    }

    fn expect_ok(&self, what: &str) -> &Self {
        assert!(self.ok, "{what} failed: {}", self.out);
        self
    }

    fn expect_code(&self, code: u64, what: &str) -> Value {
        assert!(
            !self.ok,
            "{what} should fail with code {code}, printed {}",
            self.out
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{what}: {v}");
        v
    }
}

/// One invocation's variables.
#[derive(Debug, Clone)]
struct Call<'a> {
    command: &'a str,
    container: &'a str,
    netns: Option<&'a Path>,
    ifname: &'a str,
    args: &'a str,
}

impl<'a> Call<'a> {
    fn new(command: &'a str, container: &'a str, netns: Option<&'a Path>) -> Self {
        Self {
            command,
            container,
            netns,
            ifname: "eth0",
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        }
    }
}

impl Bed {
    fn new() -> Self {
        let lab = Lab::create(LabSpec::new(unique_name("cni")).nodes(1)).expect("lab");
        let dir = lab.log_dir().parent().expect("lab state dir").join("cni");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self {
            lab,
            dir,
            seq: AtomicU32::new(0),
        }
    }

    fn netconf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "meshless",
            "type": "meshless-cni",
            "podCIDRs": ["198.18.17.0/24", "fd00:b:1::/64"],
            "stateDir": self.dir.join("state"),
            "agentEndpointsDir": self.dir.join("endpoints"),
        })
    }

    /// A container namespace `ml-<lab>-cni-<tag>` (the lab removes it).
    fn netns(&self, tag: &str) -> (String, PathBuf) {
        let name = format!("ml-{}-cni-{tag}", self.lab.name());
        run(Command::new("ip").args(["netns", "add", &name]));
        let path = Path::new("/run/netns").join(&name);
        (name, path)
    }

    /// Starts the plugin in node 1's namespace with `config` on its real
    /// stdin (through `sh`, since lab processes get /dev/null).
    fn spawn(&self, call: &Call<'_>, config: &[u8]) -> LabProcess {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let conf = self.dir.join(format!("conf-{n}.json"));
        std::fs::write(&conf, config).expect("write config");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exec \"$0\" < \"$1\""])
            .arg(PLUGIN)
            .arg(&conf)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container)
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_ARGS", call.args)
            .env("CNI_PATH", "/opt/cni/bin");
        if let Some(ns) = call.netns {
            cmd.env("CNI_NETNS", ns);
        }
        self.lab
            .spawn_on_host(self.lab.node(1), &format!("cni-{n}"), cmd)
            .expect("start meshless-cni")
    }

    fn finish(mut p: LabProcess) -> Outcome {
        let status = p.wait_timeout(T).expect("meshless-cni exits");
        Outcome {
            ok: status.success(),
            out: p.log(),
        }
    }

    fn cni_raw(&self, call: &Call<'_>, config: &[u8]) -> Outcome {
        Self::finish(self.spawn(call, config))
    }

    fn cni(&self, call: &Call<'_>, config: &Value) -> Outcome {
        self.cni_raw(call, &serde_json::to_vec(config).expect("config"))
    }

    fn add(&self, container: &str, netns: &Path) -> Value {
        self.cni(&Call::new("ADD", container, Some(netns)), &self.netconf())
            .expect_ok("ADD")
            .json()
    }

    fn del(&self, container: &str, netns: Option<&Path>) {
        let out = self.cni(&Call::new("DEL", container, netns), &self.netconf());
        out.expect_ok("DEL");
        assert_eq!(out.out.trim(), "", "DEL prints nothing on success");
    }

    fn allocations(&self) -> Vec<Value> {
        let path = self.dir.join("state").join("meshless.json");
        match std::fs::read(&path) {
            Ok(b) => {
                let v: Value = serde_json::from_slice(&b).expect("allocation file is JSON");
                v["allocations"].as_array().cloned().unwrap_or_default()
            }
            Err(_) => Vec::new(),
        }
    }

    fn endpoints(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("endpoints"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Host-side pod devices on the node.
    fn node_ml_links(&self) -> BTreeSet<String> {
        links(&self.lab.node(1).netns)
            .into_iter()
            .filter(|l| l.starts_with("ml"))
            .collect()
    }

    fn assert_clean(&self, ml_before: &BTreeSet<String>, what: &str) {
        // A removed netns takes its veth with it asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.node_ml_links() != *ml_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            self.node_ml_links(),
            *ml_before,
            "{what}: host veths left on the node"
        );
        assert_eq!(
            self.allocations(),
            Vec::<Value>::new(),
            "{what}: allocations left"
        );
        assert_eq!(
            self.endpoints(),
            Vec::<String>::new(),
            "{what}: endpoint records left"
        );
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Link names in a named (lab) netns.
fn links(ns: &str) -> Vec<String> {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "link", "show"]));
    let v: Value = serde_json::from_str(&out).expect("ip -j");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn ip_of(result: &Value, i: usize) -> IpAddr {
    let a = result["ips"][i]["address"].as_str().expect("address");
    a.split_once('/')
        .expect("address/len")
        .0
        .parse()
        .expect("ip")
}

/// UDP through the datapath: `count` datagrams from netns `from` to `to`
/// (a labtool udp-echo), after waiting for the echo to come up.
fn assert_udp(from: &str, to: SocketAddr, what: &str) {
    let send = |count: u32| -> Value {
        let out = run(Command::new("ip")
            .args(["netns", "exec", from])
            .arg(bin_path("meshless-labtool"))
            .args([
                "udp-send",
                "--to",
                &to.to_string(),
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "300",
            ]));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("udp-send printed {out:?}: {e}"))
    };
    let mut warm = Value::Null;
    for _ in 0..30 {
        warm = send(1);
        if warm["received"] == 1 {
            break;
        }
    }
    assert_eq!(warm["received"], 1, "{what}: {to} never answered");
    let r = send(10);
    assert_eq!(
        (r["sent"].as_u64(), r["received"].as_u64()),
        (Some(10), Some(10)),
        "{what} ({to}): {r}"
    );
}

fn labtool_echo() -> Command {
    let mut c = Command::new(bin_path("meshless-labtool"));
    c.args(["udp-echo", "--listen", "[::]:7000"]);
    c
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_add_connects_the_pod_and_del_removes_it() {
    require_root();
    let mut bed = Bed::new();
    let peer = bed.lab.add_pod(1, "peer").expect("lab pod");
    let _peer_echo = bed
        .lab
        .spawn_in_pod(&peer, "echo", labtool_echo())
        .expect("echo in pod");
    let _node_echo = bed
        .lab
        .spawn_on_host(bed.lab.node(1), "echo", labtool_echo())
        .expect("echo on node");
    let ml_before = bed.node_ml_links();
    let (ns, path) = bed.netns("a");

    let r = bed.add("ctr-a", &path);
    // The spec's result shape, with our wiring's values.
    assert_eq!(r["cniVersion"], "1.0.0", "{r}");
    let host = r["interfaces"][0]["name"]
        .as_str()
        .expect("host ifname")
        .to_owned();
    assert!(host.starts_with("ml") && host.len() == 10, "{r}");
    assert!(r["interfaces"][0].get("sandbox").is_none(), "{r}");
    assert_eq!(r["interfaces"][1]["name"], "eth0", "{r}");
    assert_eq!(
        r["interfaces"][1]["sandbox"],
        path.to_string_lossy().as_ref(),
        "{r}"
    );
    for i in 0..2 {
        let mac = r["interfaces"][i]["mac"].as_str().expect("mac");
        assert!(mac.len() == 17 && mac.matches(':').count() == 5, "{r}");
    }
    let (v4, v6) = (ip_of(&r, 0), ip_of(&r, 1));
    assert!(
        v4.to_string().starts_with("198.18.17.") && v4.to_string() != ROUTER_V4,
        "{r}"
    );
    assert!(
        v6.to_string().starts_with("fd00:b:1::") && v6.to_string() != ROUTER_V6,
        "{r}"
    );
    assert_eq!(
        r["ips"],
        json!([
            {"address": format!("{v4}/32"), "gateway": ROUTER_V4, "interface": 1},
            {"address": format!("{v6}/128"), "gateway": "fe80::1", "interface": 1},
        ])
    );
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": ROUTER_V4}, {"dst": "::/0", "gw": "fe80::1"}])
    );
    assert_eq!(r["dns"], json!({}));
    assert!(
        bed.node_ml_links().contains(&host),
        "host veth {host} exists on the node"
    );
    assert!(links(&ns).contains(&"eth0".to_owned()));

    let ep: Value = serde_json::from_slice(
        &std::fs::read(bed.dir.join("endpoints").join("ctr-a.json")).expect("endpoint record"),
    )
    .expect("endpoint JSON");
    assert_eq!(
        ep,
        json!({
            "containerId": "ctr-a", "namespace": "default", "pod": "web-0",
            "netns": path, "ifname": "eth0", "hostDevice": host,
            "addresses": [v4.to_string(), v6.to_string()],
        })
    );

    for (to, what) in [
        (
            SocketAddr::new(ROUTER_V4.parse().expect("ip"), 7000),
            "pod -> node router IPv4",
        ),
        (
            SocketAddr::new(ROUTER_V6.parse().expect("ip"), 7000),
            "pod -> node router IPv6",
        ),
        (
            SocketAddr::new(peer.ipv4.into(), 7000),
            "pod -> lab pod IPv4",
        ),
        (
            SocketAddr::new(peer.ipv6.into(), 7000),
            "pod -> lab pod IPv6",
        ),
    ] {
        assert_udp(&ns, to, what);
    }

    bed.del("ctr-a", Some(&path));
    assert!(
        !links(&ns).contains(&"eth0".to_owned()),
        "DEL removes the container side"
    );
    bed.assert_clean(&ml_before, "after DEL");
    bed.del("ctr-a", Some(&path));
    bed.del("never-added", None);
    bed.assert_clean(&ml_before, "after repeated DEL");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_concurrent_adds_get_different_addresses() {
    require_root();
    let bed = Bed::new();
    let ml_before = bed.node_ml_links();
    let namespaces: Vec<(String, PathBuf)> = (0..4).map(|i| bed.netns(&format!("c{i}"))).collect();
    let ids: Vec<String> = (0..4).map(|i| format!("ctr-{i}")).collect();
    // Started together: the allocation file's lock is what keeps them apart.
    let procs: Vec<LabProcess> = ids
        .iter()
        .zip(&namespaces)
        .enumerate()
        .map(|(i, (id, (_, path)))| {
            let mut conf = bed.netconf();
            if i == 3 {
                conf["cniVersion"] = "0.4.0".into();
            }
            bed.spawn(
                &Call::new("ADD", id, Some(path)),
                &serde_json::to_vec(&conf).expect("config"),
            )
        })
        .collect();
    let results: Vec<Value> = procs
        .into_iter()
        .map(|p| Bed::finish(p).expect_ok("concurrent ADD").json())
        .collect();
    let v4: BTreeSet<IpAddr> = results.iter().map(|r| ip_of(r, 0)).collect();
    let v6: BTreeSet<IpAddr> = results.iter().map(|r| ip_of(r, 1)).collect();
    let hosts: BTreeSet<&str> = results
        .iter()
        .map(|r| r["interfaces"][0]["name"].as_str().expect("host ifname"))
        .collect();
    assert_eq!((v4.len(), v6.len(), hosts.len()), (4, 4, 4), "{results:#?}");
    assert_eq!(results[3]["cniVersion"], "0.4.0");
    assert_eq!(
        (
            &results[3]["ips"][0]["version"],
            &results[3]["ips"][1]["version"]
        ),
        (&json!("4"), &json!("6")),
        "0.4.0 results carry ips[].version"
    );
    assert_eq!(bed.allocations().len(), 4);
    assert_eq!(bed.endpoints().len(), 4);
    for (id, (_, path)) in ids.iter().zip(&namespaces) {
        bed.del(id, Some(path));
    }
    bed.assert_clean(&ml_before, "after DEL of all");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_del_after_the_netns_is_gone() {
    require_root();
    let bed = Bed::new();
    let ml_before = bed.node_ml_links();
    let (ns, path) = bed.netns("gone");
    let r = bed.add("ctr-gone", &path);
    assert_eq!(bed.allocations().len(), 1, "{r}");
    run(Command::new("ip").args(["netns", "del", &ns]));
    // Runtimes pass the old path, or nothing; both must succeed.
    bed.del("ctr-gone", Some(&path));
    bed.del("ctr-gone", None);
    bed.assert_clean(&ml_before, "DEL after netns removal");

    // ADD and CHECK of a gone netns: code 3, nothing allocated.
    let out = bed.cni(&Call::new("ADD", "ctr-gone", Some(&path)), &bed.netconf());
    let e = out.expect_code(3, "ADD into a removed netns");
    assert!(
        e["msg"]
            .as_str()
            .is_some_and(|m| m.contains("does not exist")),
        "{e}"
    );
    bed.assert_clean(&ml_before, "ADD into a removed netns");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_check_finds_what_changed() {
    require_root();
    let bed = Bed::new();
    let ml_before = bed.node_ml_links();
    let (ns, path) = bed.netns("chk");
    let r = bed.add("ctr-chk", &path);
    let mut conf = bed.netconf();
    conf["prevResult"] = r.clone();
    let check = Call::new("CHECK", "ctr-chk", Some(&path));
    let out = bed.cni(&check, &conf);
    out.expect_ok("CHECK right after ADD");
    assert_eq!(out.out.trim(), "", "CHECK prints nothing on success");

    // CHECK of a container that was never added.
    let (_, other) = bed.netns("chk2");
    let e = bed
        .cni(
            &Call::new("CHECK", "ctr-unknown", Some(&other)),
            &bed.netconf(),
        )
        .expect_code(102, "CHECK of an unknown container");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("was ADD run")),
        "{e}"
    );

    // A second ADD for the same container is refused and changes nothing.
    let again = bed.cni(&Call::new("ADD", "ctr-chk", Some(&path)), &bed.netconf());
    let e = again.expect_code(100, "second ADD");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("run DEL")),
        "{e}"
    );
    bed.cni(&check, &conf)
        .expect_ok("CHECK after the refused ADD");

    // A prevResult that does not match the allocation.
    let mut wrong = conf.clone();
    wrong["prevResult"]["ips"][0]["address"] = "198.18.17.250/32".into();
    bed.cni(&check, &wrong)
        .expect_code(102, "CHECK with a foreign prevResult");

    let v4 = ip_of(&r, 0);
    run(Command::new("ip").args(["-n", &ns, "addr", "del", &format!("{v4}/32"), "dev", "eth0"]));
    let e = bed
        .cni(&check, &conf)
        .expect_code(102, "CHECK after the address was removed");
    let msg = e["msg"].as_str().expect("msg");
    assert!(
        msg.contains(&format!("address {v4}/32 is missing on eth0")),
        "{msg}"
    );
    assert!(msg.contains("delete and re-create the pod"), "{msg}");

    // CHECK notices a missing host veth too.
    let host = r["interfaces"][0]["name"].as_str().expect("host ifname");
    run(Command::new("ip").args(["-n", &bed.lab.node(1).netns, "link", "del", host]));
    let e = bed
        .cni(&check, &conf)
        .expect_code(102, "CHECK after the veth was removed");
    assert!(
        e["msg"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("host device {host} is missing"))),
        "{e}"
    );

    bed.del("ctr-chk", Some(&path));
    bed.assert_clean(&ml_before, "after DEL");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_bad_input_leaves_nothing_behind() {
    require_root();
    let bed = Bed::new();
    let ml_before = bed.node_ml_links();
    let (ns, path) = bed.netns("bad");
    let add = Call::new("ADD", "ctr-bad", Some(&path));
    let mut bad_version = bed.netconf();
    bad_version["cniVersion"] = "9.9.9".into();
    let mut no_cidrs = bed.netconf();
    no_cidrs.as_object_mut().expect("object").remove("podCIDRs");
    let cases: Vec<(&str, Outcome, u64, &str)> = vec![
        ("cniVersion 9.9.9", bed.cni(&add, &bad_version), 1, "9.9.9"),
        ("missing podCIDRs", bed.cni(&add, &no_cidrs), 7, "podCIDRs"),
        (
            "malformed JSON",
            bed.cni_raw(&add, b"{\"cniVersion\": \"1.0.0\", "),
            6,
            "not valid JSON",
        ),
        (
            "missing CNI_NETNS",
            bed.cni(
                &Call {
                    netns: None,
                    ..add.clone()
                },
                &bed.netconf(),
            ),
            4,
            "CNI_NETNS",
        ),
        (
            "unknown CNI_ARGS key",
            bed.cni(
                &Call {
                    args: "FOO=1",
                    ..add.clone()
                },
                &bed.netconf(),
            ),
            4,
            "CNI_ARGS",
        ),
        (
            "STATUS",
            bed.cni(
                &Call {
                    command: "STATUS",
                    ..add.clone()
                },
                &bed.netconf(),
            ),
            4,
            "CNI 1.1",
        ),
    ];
    for (what, out, code, needle) in &cases {
        let e = out.expect_code(*code, what);
        assert!(
            e["msg"].as_str().is_some_and(|m| m.contains(needle)),
            "{what}: msg should mention {needle:?}: {e}"
        );
        assert!(
            e["details"].is_string() && e["cniVersion"].is_string(),
            "{what}: {e}"
        );
        bed.assert_clean(&ml_before, what);
        assert_eq!(
            links(&ns),
            ["lo"],
            "{what}: the container netns was touched"
        );
    }
    let v = bed.cni(
        &Call::new("VERSION", "x", None),
        &json!({"cniVersion": "1.0.0"}),
    );
    assert_eq!(
        v.expect_ok("VERSION").json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    );
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_cni_failed_add_is_undone() {
    require_root();
    let bed = Bed::new();
    let ml_before = bed.node_ml_links();

    // CNI_IFNAME is taken in the container: the veth cannot be created.
    let (ns, path) = bed.netns("taken");
    run(Command::new("ip").args([
        "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]));
    let out = bed.cni(&Call::new("ADD", "ctr-taken", Some(&path)), &bed.netconf());
    let e = out.expect_code(103, "ADD with eth0 taken");
    let want = format!("File exists: eth0 already exists in {}", path.display());
    assert!(e["msg"].as_str().is_some_and(|m| m.contains(&want)), "{e}");
    bed.assert_clean(&ml_before, "ADD with eth0 taken");
    assert!(
        links(&ns).contains(&"eth0".to_owned()),
        "the container's own eth0 is left alone"
    );

    // Half-way: the veth exists and is configured on the host when the
    // container's default route clashes with one that is already there.
    let (ns, path) = bed.netns("route");
    for args in [
        vec!["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        vec!["link", "set", "d0", "up"],
        vec!["link", "set", "d1", "up"],
        vec!["addr", "add", "198.18.99.1/24", "dev", "d0"],
        vec!["route", "add", "default", "via", "198.18.99.2"],
    ] {
        run(Command::new("ip").args(["-n", &ns]).args(&args));
    }
    let out = bed.cni(&Call::new("ADD", "ctr-route", Some(&path)), &bed.netconf());
    let e = out.expect_code(103, "ADD with a clashing default route");
    let want =
        "line 8 `route add default via 198.18.17.1 dev eth0`: RTNETLINK answers: File exists";
    assert!(e["msg"].as_str().is_some_and(|m| m.contains(want)), "{e}");
    assert!(
        e["details"]
            .as_str()
            .is_some_and(|d| !d.contains("undoing")),
        "the undo itself succeeded: {e}"
    );
    bed.assert_clean(&ml_before, "ADD that failed half-way");
    assert!(
        !links(&ns).contains(&"eth0".to_owned()),
        "the container side went with the veth"
    );

    // Nothing stale is left to trip the retry.
    run(Command::new("ip").args(["-n", &ns, "route", "del", "default"]));
    let r = bed.add("ctr-route", &path);
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    bed.del("ctr-route", Some(&path));
    bed.assert_clean(&ml_before, "retried ADD then DEL");
}
