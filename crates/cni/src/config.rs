//! The network configuration the runtime passes on stdin, with every field
//! and default declared once. Parsing is pure (bytes in, [`NetConf`] out) so
//! each error is unit-tested.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::CniError;
use crate::cidr::Cidr;
use crate::ipam::Pool;

/// Spec versions whose ADD/DEL/CHECK this plugin implements. 1.0.0 is the
/// current one; 0.4.0 because many runtimes (and kubelets' configs) still
/// send it, and its result differs only by `ips[].version`.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];

/// The version we answer in when the config's own is unknown or unusable.
pub const LATEST_VERSION: &str = "1.0.0";

/// Ethernet's MTU: right for direct routing; overlays need less (the lab's
/// VXLAN mode uses 1450).
pub const DEFAULT_MTU: u32 = 1500;

/// IPv6 needs links of at least 1280 bytes (RFC 8200).
pub const MIN_MTU_IPV6: u32 = 1280;

/// Smallest MTU IPv4 allows (RFC 791).
pub const MIN_MTU_IPV4: u32 = 68;

/// Allocation files survive a restart of the runtime and the plugin (not a
/// reboot's netns loss, which is fine: a reboot also removes every pod).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshless/cni";

/// Where meshless-agent watches for endpoints on this node.
pub const DEFAULT_AGENT_ENDPOINTS_DIR: &str = "/run/meshless/endpoints";

/// A spec version this plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniVersion {
    V0_4_0,
    V1_0_0,
}

impl CniVersion {
    /// The version if we implement it, by exact string (the spec versions
    /// are compared as strings by runtimes too).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "0.4.0" => Some(Self::V0_4_0),
            "1.0.0" => Some(Self::V1_0_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
        }
    }
}

/// A parsed network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// Network name; also names the allocation file.
    pub name: String,
    /// The plugin type (`meshless-cni`); the runtime picked us by it.
    pub plugin_type: String,
    /// One address pool per family, in the order `podCIDRs` lists them.
    pub pools: Vec<Pool>,
    pub mtu: u32,
    pub state_dir: PathBuf,
    pub agent_endpoints_dir: PathBuf,
    /// What the previous ADD returned (CHECK and DEL receive it).
    pub prev_result: Option<Value>,
}

/// The config's `cniVersion` when it is one we speak, else [`LATEST_VERSION`]:
/// the version errors are reported in, readable even from a broken config.
pub fn peek_version(bytes: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().and_then(CniVersion::parse))
        .map_or(LATEST_VERSION, CniVersion::as_str)
}

/// Network names per the spec: alphanumeric first, then alphanumerics,
/// `_`, `.` or `-` (this also keeps them safe as file names).
pub fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CniError::config(
            key,
            format!("must be a string, got {other}"),
        )),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, example: &str) -> Result<&'a str, CniError> {
    match opt_str(obj, key)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(CniError::config(
            key,
            format!("is missing; add it, for example \"{key}\": \"{example}\""),
        )),
    }
}

fn opt_str_list<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<Vec<&'a str>>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().ok_or_else(|| {
                    CniError::config(key, format!("must be a list of strings, found {i}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(CniError::config(
            key,
            format!("must be a list of strings, got {other}"),
        )),
    }
}

fn opt_abs_path(obj: &Map<String, Value>, key: &str, default: &str) -> Result<PathBuf, CniError> {
    let path = PathBuf::from(opt_str(obj, key)?.unwrap_or(default));
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(CniError::config(
            key,
            format!(
                "{} is not an absolute path (the runtime's working directory is not defined); use for example {default}",
                path.display()
            ),
        ))
    }
}

/// The pools from `podCIDRs` and `routerIPs`: one CIDR per family, each with
/// a router address (default: the CIDR's first host address).
fn pools(obj: &Map<String, Value>) -> Result<Vec<Pool>, CniError> {
    let cidrs = opt_str_list(obj, "podCIDRs")?.unwrap_or_default();
    if cidrs.is_empty() {
        return Err(CniError::config(
            "podCIDRs",
            "is missing or empty; list this node's pod CIDRs, for example \"podCIDRs\": [\"198.18.17.0/24\", \"fd00:b:1::/64\"]",
        ));
    }
    let mut parsed: Vec<Cidr> = Vec::new();
    for s in cidrs {
        let cidr: Cidr = s
            .parse()
            .map_err(|why: String| CniError::config("podCIDRs", why))?;
        if parsed.iter().any(|c| c.is_ipv4() == cidr.is_ipv4()) {
            return Err(CniError::config(
                "podCIDRs",
                format!(
                    "lists two {} CIDRs; meshless-cni gives each pod one address per family: list at most one IPv4 and one IPv6 CIDR",
                    if cidr.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        // Room for the network, router and broadcast addresses and a pod.
        let max_prefix = if cidr.is_ipv4() { 30 } else { 126 };
        if cidr.prefix() > max_prefix {
            return Err(CniError::config(
                "podCIDRs",
                format!("{cidr} is too small to allocate from; use /{max_prefix} or shorter"),
            ));
        }
        parsed.push(cidr);
    }
    let mut routers: Vec<IpAddr> = Vec::new();
    for s in opt_str_list(obj, "routerIPs")?.unwrap_or_default() {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| CniError::config("routerIPs", format!("{s:?} is not an IP address")))?;
        if routers.iter().any(|r| r.is_ipv4() == ip.is_ipv4()) {
            return Err(CniError::config(
                "routerIPs",
                "lists two addresses of one family; give at most one per family",
            ));
        }
        let Some(cidr) = parsed.iter().find(|c| c.is_ipv4() == ip.is_ipv4()) else {
            return Err(CniError::config(
                "routerIPs",
                format!("{ip} has no podCIDRs entry of its family; add one or remove the router"),
            ));
        };
        if ip == cidr.network() || Some(ip) == cidr.broadcast() {
            return Err(CniError::config(
                "routerIPs",
                format!(
                    "{ip} is the network or broadcast address of {cidr}; use a host address such as {}",
                    cidr.first_host()
                ),
            ));
        }
        routers.push(ip);
    }
    Ok(parsed
        .into_iter()
        .map(|cidr| {
            let router = routers
                .iter()
                .copied()
                .find(|r| r.is_ipv4() == cidr.is_ipv4())
                .unwrap_or_else(|| cidr.first_host());
            Pool::new(cidr, router)
        })
        .collect())
}

impl NetConf {
    /// Parses the network config. The version is checked first (the spec's
    /// order: an incompatible config cannot be interpreted further).
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| CniError::Decode {
            what: "the network config on stdin is not valid JSON".into(),
            why: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(CniError::Decode {
                what: "the network config on stdin".into(),
                why: format!("must be a JSON object, got {value}"),
            });
        };
        let version = req_str(&obj, "cniVersion", LATEST_VERSION)?;
        let cni_version =
            CniVersion::parse(version).ok_or_else(|| CniError::IncompatibleVersion {
                version: version.to_owned(),
            })?;
        let name = req_str(&obj, "name", "meshless")?;
        if !valid_name(name) {
            return Err(CniError::config(
                "name",
                format!(
                    "{name:?} is not a valid network name: start with a letter or digit, then use letters, digits, '_', '.' or '-'"
                ),
            ));
        }
        let plugin_type = req_str(&obj, "type", "meshless-cni")?;
        if let Some(ipam) = obj.get("ipam").filter(|v| !v.is_null()) {
            return Err(CniError::UnsupportedField {
                field: "ipam",
                value: ipam.to_string(),
                hint: "meshless-cni allocates addresses itself from podCIDRs; remove the ipam section",
            });
        }
        let pools = pools(&obj)?;
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => DEFAULT_MTU,
            Some(v) => v
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .ok_or_else(|| {
                    CniError::config("mtu", format!("must be a whole number, got {v}"))
                })?,
        };
        let min = if pools.iter().any(|p| !p.cidr.is_ipv4()) {
            MIN_MTU_IPV6
        } else {
            MIN_MTU_IPV4
        };
        if !(min..=65_535).contains(&mtu) {
            return Err(CniError::config(
                "mtu",
                format!("{mtu} is out of range: use {min} to 65535 (the default is {DEFAULT_MTU})"),
            ));
        }
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(CniError::config(
                    "prevResult",
                    format!("must be an object (a previous ADD result), got {other}"),
                ));
            }
        };
        Ok(Self {
            cni_version,
            name: name.to_owned(),
            plugin_type: plugin_type.to_owned(),
            pools,
            mtu,
            state_dir: opt_abs_path(&obj, "stateDir", DEFAULT_STATE_DIR)?,
            agent_endpoints_dir: opt_abs_path(
                &obj,
                "agentEndpointsDir",
                DEFAULT_AGENT_ENDPOINTS_DIR,
            )?,
            prev_result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;

    const MINIMAL: &str = r#"{"cniVersion":"1.0.0","name":"meshless","type":"meshless-cni",
        "podCIDRs":["198.18.17.0/24","fd00:b:1::/64"]}"#;

    fn with(field: &str, value: Value) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(MINIMAL).expect("minimal config");
        if value.is_null() {
            v.as_object_mut().expect("object").remove(field);
        } else {
            v[field] = value;
        }
        serde_json::to_vec(&v).expect("serialize")
    }

    fn err(bytes: &[u8]) -> CniError {
        NetConf::parse(bytes).expect_err("config should be refused")
    }

    #[test]
    fn defaults() {
        let c = NetConf::parse(MINIMAL.as_bytes()).expect("minimal config parses");
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "meshless");
        assert_eq!(c.plugin_type, "meshless-cni");
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/meshless/cni"));
        assert_eq!(
            c.agent_endpoints_dir,
            PathBuf::from("/run/meshless/endpoints")
        );
        let routers: Vec<String> = c.pools.iter().map(|p| p.router.to_string()).collect();
        assert_eq!(
            routers,
            ["198.18.17.1", "fd00:b:1::1"],
            "default router = first host address"
        );
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn explicit_fields() {
        let mut v: Value = serde_json::from_str(MINIMAL).expect("minimal");
        v["cniVersion"] = "0.4.0".into();
        v["routerIPs"] = serde_json::json!(["fd00:b:1::fe", "198.18.17.254"]);
        v["mtu"] = 1450.into();
        v["stateDir"] = "/tmp/s".into();
        v["agentEndpointsDir"] = "/tmp/e".into();
        v["prevResult"] = serde_json::json!({"ips": []});
        v["runtimeConfig"] = serde_json::json!({"whatever": 1});
        let c = NetConf::parse(&serde_json::to_vec(&v).expect("ser")).expect("parses");
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.pools[0].router.to_string(), "198.18.17.254");
        assert_eq!(c.pools[1].router.to_string(), "fd00:b:1::fe");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(c.agent_endpoints_dir, PathBuf::from("/tmp/e"));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn single_family_is_fine() {
        let c = NetConf::parse(&with("podCIDRs", serde_json::json!(["fd00:b:2::/64"])))
            .expect("IPv6 only");
        assert_eq!(c.pools.len(), 1);
        let c = NetConf::parse(&with("podCIDRs", serde_json::json!(["198.18.18.0/24"])))
            .expect("IPv4 only");
        assert!(c.pools[0].cidr.is_ipv4());
    }

    #[test]
    fn version_negotiation() {
        for good in ["0.4.0", "1.0.0"] {
            let c = NetConf::parse(&with("cniVersion", good.into())).expect(good);
            assert_eq!(c.cni_version.as_str(), good);
        }
        for bad in ["9.9.9", "0.3.1", "1.1.0", "1.0"] {
            let e = err(&with("cniVersion", bad.into()));
            assert_eq!(e.code(), code::INCOMPATIBLE_VERSION, "{bad}: {e}");
            assert!(e.to_string().contains("0.4.0, 1.0.0"), "{e}");
        }
        // The version is checked before anything else.
        let mut v: Value = serde_json::from_str(MINIMAL).expect("minimal");
        v["cniVersion"] = "9.9.9".into();
        v.as_object_mut().expect("obj").remove("podCIDRs");
        assert_eq!(
            err(&serde_json::to_vec(&v).expect("ser")).code(),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(peek_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(peek_version(br#"{"cniVersion":"9.9.9"}"#), "1.0.0");
        assert_eq!(peek_version(b"not json"), "1.0.0");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(Vec<u8>, u32, &str)> = vec![
            (
                b"{not json".to_vec(),
                code::DECODE_FAILURE,
                "not valid JSON",
            ),
            (b"[1,2]".to_vec(), code::DECODE_FAILURE, "JSON object"),
            (
                with("cniVersion", Value::Null),
                code::INVALID_CONFIG,
                "cniVersion",
            ),
            (
                with("cniVersion", 1.into()),
                code::INVALID_CONFIG,
                "cniVersion",
            ),
            (
                with("name", Value::Null),
                code::INVALID_CONFIG,
                "field name",
            ),
            (
                with("name", "a/b".into()),
                code::INVALID_CONFIG,
                "network name",
            ),
            (
                with("type", Value::Null),
                code::INVALID_CONFIG,
                "field type",
            ),
            (
                with("podCIDRs", Value::Null),
                code::INVALID_CONFIG,
                "podCIDRs",
            ),
            (
                with("podCIDRs", serde_json::json!([])),
                code::INVALID_CONFIG,
                "podCIDRs",
            ),
            (
                with("podCIDRs", "198.18.17.0/24".into()),
                code::INVALID_CONFIG,
                "list of strings",
            ),
            (
                with(
                    "podCIDRs",
                    serde_json::json!(["198.18.17.0/24", "198.18.18.0/24"]),
                ),
                code::INVALID_CONFIG,
                "two IPv4",
            ),
            (
                with("podCIDRs", serde_json::json!(["198.18.17.0/31"])),
                code::INVALID_CONFIG,
                "too small",
            ),
            (
                with("podCIDRs", serde_json::json!(["198.18.17.9/24"])),
                code::INVALID_CONFIG,
                "198.18.17.0/24",
            ),
            (
                with("routerIPs", serde_json::json!(["x"])),
                code::INVALID_CONFIG,
                "routerIPs",
            ),
            (
                with("routerIPs", serde_json::json!(["198.18.17.255"])),
                code::INVALID_CONFIG,
                "broadcast",
            ),
            (
                with(
                    "routerIPs",
                    serde_json::json!(["198.18.17.1", "198.18.17.2"]),
                ),
                code::INVALID_CONFIG,
                "one per family",
            ),
            (with("mtu", "1500".into()), code::INVALID_CONFIG, "mtu"),
            (
                with("mtu", 1000.into()),
                code::INVALID_CONFIG,
                "1280 to 65535",
            ),
            (
                with("stateDir", "relative".into()),
                code::INVALID_CONFIG,
                "stateDir",
            ),
            (
                with("agentEndpointsDir", "x/y".into()),
                code::INVALID_CONFIG,
                "agentEndpointsDir",
            ),
            (
                with("prevResult", "x".into()),
                code::INVALID_CONFIG,
                "prevResult",
            ),
            (
                with("ipam", serde_json::json!({"type": "host-local"})),
                code::UNSUPPORTED_FIELD,
                "ipam = {\"type\":\"host-local\"}",
            ),
        ];
        for (bytes, want, needle) in cases {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let e = NetConf::parse(&bytes)
                .map(|_| ())
                .expect_err(&format!("{text} should be refused with code {want}"));
            assert_eq!(e.code(), want, "{text}: {e}");
            assert!(
                e.to_string().contains(needle),
                "{text}: {e:?} should mention {needle:?}"
            );
        }
        // A router of a family without a CIDR.
        let mut v: Value = serde_json::from_str(MINIMAL).expect("minimal");
        v["podCIDRs"] = serde_json::json!(["198.18.17.0/24"]);
        v["routerIPs"] = serde_json::json!(["fd00:b:1::1"]);
        let e = err(&serde_json::to_vec(&v).expect("ser"));
        assert!(e.to_string().contains("no podCIDRs entry"), "{e}");
    }

    #[test]
    fn network_names() {
        for good in ["meshless", "k8s-pod-network", "a", "a.b_c-1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
