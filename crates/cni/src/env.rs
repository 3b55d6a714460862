//! The CNI_* environment variables of one invocation. Read through a lookup
//! function so the rules are unit-tested without touching the process
//! environment.

use std::path::PathBuf;

use crate::CniError;

/// What the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
        }
    }
}

/// A lookup of environment variables (`std::env::var` in the binary).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// An empty variable counts as unset: runtimes pass `CNI_NETNS=` for DEL of
/// a container whose namespace is gone.
fn get(lookup: Lookup<'_>, var: &str) -> Option<String> {
    lookup(var).filter(|v| !v.is_empty())
}

/// `CNI_COMMAND`.
pub fn command(lookup: Lookup<'_>) -> Result<Command, CniError> {
    let Some(cmd) = get(lookup, "CNI_COMMAND") else {
        return Err(CniError::env(
            "CNI_COMMAND",
            "is not set: meshless-cni is a CNI plugin that the container runtime runs with CNI_COMMAND=ADD, DEL, CHECK or VERSION",
        ));
    };
    match cmd.as_str() {
        "ADD" => Ok(Command::Add),
        "DEL" => Ok(Command::Del),
        "CHECK" => Ok(Command::Check),
        "VERSION" => Ok(Command::Version),
        "STATUS" | "GC" => Err(CniError::env(
            "CNI_COMMAND",
            format!(
                "{cmd} is a CNI 1.1 command and meshless-cni implements CNI 1.0.0 (VERSION lists 0.4.0 and 1.0.0); use \"cniVersion\": \"1.0.0\" so the runtime does not send it"
            ),
        )),
        other => Err(CniError::env(
            "CNI_COMMAND",
            format!("{other:?} is not a CNI command; use ADD, DEL, CHECK or VERSION"),
        )),
    }
}

/// The Kubernetes identity of the pod, from `CNI_ARGS` (CONVENTIONS.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// Go's `strconv.ParseBool` truths, which is what runtimes send.
fn truthy(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

impl CniArgs {
    /// `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is true,
    /// as in the reference plugins (a key we do not know may be one the
    /// caller relies on).
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut args = Self::default();
        let mut unknown = Vec::new();
        let mut ignore_unknown = false;
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::env(
                    "CNI_ARGS",
                    format!(
                        "{pair:?} is not KEY=VALUE (CNI_ARGS is KEY=VALUE pairs separated by ';')"
                    ),
                ));
            };
            let slot = match k {
                "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
                "K8S_POD_NAME" => &mut args.pod_name,
                "K8S_POD_UID" => &mut args.pod_uid,
                "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
                "IgnoreUnknown" => {
                    ignore_unknown = truthy(v);
                    continue;
                }
                other => {
                    unknown.push(other.to_owned());
                    continue;
                }
            };
            *slot = (!v.is_empty()).then(|| v.to_owned());
        }
        if !unknown.is_empty() && !ignore_unknown {
            return Err(CniError::env(
                "CNI_ARGS",
                format!(
                    "unknown keys {unknown:?}; meshless-cni reads K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID and K8S_POD_INFRA_CONTAINER_ID; add IgnoreUnknown=1 to pass others"
                ),
            ));
        }
        Ok(args)
    }
}

/// The variables of an ADD, DEL or CHECK, validated.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Required for ADD and CHECK; DEL works without it.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
}

/// Container ids per the spec: alphanumeric first, then alphanumerics, `_`,
/// `.` or `-`. They name files, so this is also what keeps paths safe.
pub fn valid_container_id(s: &str) -> bool {
    crate::config::valid_name(s)
}

/// Interface names per the spec (and the kernel's IFNAMSIZ).
pub fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("is empty".into())
    } else if s.len() > 15 {
        Err(format!("{s:?} is longer than 15 bytes"))
    } else if s == "." || s == ".." {
        Err(format!("{s:?} is not an interface name"))
    } else if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Err(format!("{s:?} contains '/', ':' or whitespace"))
    } else {
        Ok(())
    }
}

impl Invocation {
    pub fn from_env(command: Command, lookup: Lookup<'_>) -> Result<Self, CniError> {
        let container_id = get(lookup, "CNI_CONTAINERID").ok_or_else(|| {
            CniError::env(
                "CNI_CONTAINERID",
                format!("is not set; {} needs the container id", command.as_str()),
            )
        })?;
        if !valid_container_id(&container_id) {
            return Err(CniError::env(
                "CNI_CONTAINERID",
                format!(
                    "{container_id:?} is not a valid container id: start with a letter or digit, then use letters, digits, '_', '.' or '-'"
                ),
            ));
        }
        let ifname = get(lookup, "CNI_IFNAME").ok_or_else(|| {
            CniError::env(
                "CNI_IFNAME",
                format!(
                    "is not set; {} needs the interface name in the container (for example eth0)",
                    command.as_str()
                ),
            )
        })?;
        check_ifname(&ifname).map_err(|why| CniError::env("CNI_IFNAME", why))?;
        let netns = get(lookup, "CNI_NETNS").map(PathBuf::from);
        match &netns {
            None if command != Command::Del => {
                return Err(CniError::env(
                    "CNI_NETNS",
                    format!(
                        "is not set; {} needs the path of the container's network namespace (for example /run/netns/NAME or /proc/PID/ns/net)",
                        command.as_str()
                    ),
                ));
            }
            Some(p) if !p.is_absolute() => {
                return Err(CniError::env(
                    "CNI_NETNS",
                    format!(
                        "{} is not an absolute path to a network namespace",
                        p.display()
                    ),
                ));
            }
            _ => {}
        }
        let args = CniArgs::parse(&get(lookup, "CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::error::code;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn without(
        pairs: &[(&'static str, &'static str)],
        var: &str,
    ) -> Vec<(&'static str, &'static str)> {
        pairs.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn replaced(
        pairs: &[(&'static str, &'static str)],
        var: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut v = without(pairs, var);
        v.push((var, value));
        v
    }

    #[test]
    fn commands() {
        for (s, c) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("VERSION", Command::Version),
        ] {
            assert_eq!(command(&env(&[("CNI_COMMAND", s)])).expect(s), c);
        }
        for (bad, needle) in [
            ("", "is not set"),
            ("add", "not a CNI command"),
            ("STATUS", "CNI 1.1"),
            ("GC", "CNI 1.1"),
        ] {
            let e = command(&env(&[("CNI_COMMAND", bad)])).expect_err(bad);
            assert_eq!(e.code(), code::INVALID_ENV);
            let msg = e.to_string();
            assert!(
                msg.contains("CNI_COMMAND") && msg.contains(needle),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let inv = Invocation::from_env(Command::Add, &env(ADD)).expect("valid ADD");
        assert_eq!(inv.container_id, "abc123");
        assert_eq!(inv.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(inv.ifname, "eth0");
        assert_eq!(inv.args, CniArgs::default());
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            for pairs in [without(ADD, var), replaced(ADD, var, "")] {
                let e = Invocation::from_env(Command::Add, &env(&pairs)).expect_err(var);
                assert_eq!(e.code(), code::INVALID_ENV, "{var}: {e}");
                assert!(e.to_string().contains(var), "{e} should name {var}");
            }
        }
        for (var, bad) in [
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_NETNS", "relative/ns"),
            ("CNI_IFNAME", "a-very-long-ifname"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_IFNAME", ".."),
            ("CNI_ARGS", "novalue"),
        ] {
            let e =
                Invocation::from_env(Command::Add, &env(&replaced(ADD, var, bad))).expect_err(bad);
            assert_eq!(e.code(), code::INVALID_ENV, "{var}={bad}: {e}");
            assert!(e.to_string().contains(var), "{e} should name {var}");
        }
    }

    #[test]
    fn del_works_without_netns() {
        let pairs = replaced(&without(ADD, "CNI_NETNS"), "CNI_COMMAND", "DEL");
        let inv = Invocation::from_env(Command::Del, &env(&pairs)).expect("DEL without netns");
        assert_eq!(inv.netns, None);
        let pairs = replaced(&pairs, "CNI_NETNS", "");
        assert_eq!(
            Invocation::from_env(Command::Del, &env(&pairs))
                .expect("empty netns")
                .netns,
            None
        );
        let e = Invocation::from_env(Command::Check, &env(&pairs)).expect_err("CHECK needs netns");
        assert!(e.to_string().contains("CNI_NETNS"));
    }

    #[test]
    fn cni_args() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;FOO=bar",
        )
        .expect("with IgnoreUnknown");
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(CniArgs::parse("").expect("empty"), CniArgs::default());
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME=a;")
                .expect("trailing ;")
                .pod_name
                .as_deref(),
            Some("a")
        );
        // Values may contain '='.
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME=a=b")
                .expect("=")
                .pod_name
                .as_deref(),
            Some("a=b")
        );
        let e = CniArgs::parse("K8S_POD_NAME=a;FOO=bar").expect_err("unknown key");
        assert_eq!(e.code(), code::INVALID_ENV);
        assert!(
            e.to_string().contains("FOO") && e.to_string().contains("IgnoreUnknown=1"),
            "{e}"
        );
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=0").is_err());
    }

    #[test]
    fn ifnames() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("123456789012345").is_ok());
        assert!(check_ifname("1234567890123456").is_err());
    }
}
