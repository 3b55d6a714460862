//! What successful commands print: the ADD result (SPEC.md "Success") and
//! the VERSION answer; and reading a previous result back for CHECK.

use std::net::IpAddr;
use std::path::Path;

use serde_json::{Value, json};

use crate::CniError;
use crate::config::{CniVersion, LATEST_VERSION, SUPPORTED_VERSIONS};
use crate::ipam::Pool;
use crate::wiring::Wiring;

/// An interface of the result.
#[derive(Debug, Clone)]
pub struct Interface<'a> {
    pub name: &'a str,
    pub mac: &'a str,
    /// The container's netns path; `None` for the host side.
    pub sandbox: Option<&'a Path>,
}

/// The VERSION answer.
pub fn version() -> Value {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The ADD result in `version`'s format: interface 0 is the host veth,
/// interface 1 the container's; every address is a host route (`/32`,
/// `/128`) on interface 1, with the router (IPv4) or fe80::1 (IPv6) as
/// gateway and a default route through it. 0.4.0 differs only by the
/// `version` key of each IP.
pub fn add(
    version: CniVersion,
    host: &Interface<'_>,
    container: &Interface<'_>,
    addresses: &[(Pool, IpAddr)],
) -> Value {
    let iface = |i: &Interface<'_>| {
        let mut v = json!({ "name": i.name, "mac": i.mac });
        if let Some(s) = i.sandbox {
            v["sandbox"] = s.to_string_lossy().into();
        }
        v
    };
    let ips: Vec<Value> = addresses
        .iter()
        .map(|(pool, ip)| {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            let mut v = json!({
                "address": format!("{ip}/{len}"),
                "gateway": Wiring::gateway(pool).to_string(),
                "interface": 1,
            });
            if version == CniVersion::V0_4_0 {
                v["version"] = if ip.is_ipv4() { "4" } else { "6" }.into();
            }
            v
        })
        .collect();
    let routes: Vec<Value> = addresses
        .iter()
        .map(|(pool, ip)| {
            let dst = if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            json!({ "dst": dst, "gw": Wiring::gateway(pool).to_string() })
        })
        .collect();
    json!({
        "cniVersion": version.as_str(),
        "interfaces": [iface(host), iface(container)],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// The addresses of a previous result (`prevResult.ips[].address`).
pub fn prev_addresses(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |why: String| CniError::config("prevResult", why);
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| bad(format!("ips must be a list, got {ips}")))?;
    ips.iter()
        .map(|i| {
            let a = i
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("an ips entry has no address: {i}")))?;
            let ip = a.split_once('/').map_or(a, |(ip, _)| ip);
            ip.parse()
                .map_err(|_| bad(format!("{a:?} is not an address/prefix")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Cidr;

    fn addrs() -> Vec<(Pool, IpAddr)> {
        ["198.18.17.0/24 198.18.17.2", "fd00:b:1::/64 fd00:b:1::2"]
            .iter()
            .map(|s| {
                let (c, a) = s.split_once(' ').expect("pair");
                let c: Cidr = c.parse().expect("cidr");
                (Pool::new(c, c.first_host()), a.parse().expect("ip"))
            })
            .collect()
    }

    fn ifaces() -> (Interface<'static>, Interface<'static>) {
        (
            Interface {
                name: "ml12345678",
                mac: "02:00:00:00:00:01",
                sandbox: None,
            },
            Interface {
                name: "eth0",
                mac: "02:00:00:00:00:02",
                sandbox: Some(Path::new("/run/netns/x")),
            },
        )
    }

    #[test]
    fn version_answer() {
        assert_eq!(
            version(),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
        );
    }

    #[test]
    fn add_result_has_the_spec_shape() {
        let (h, c) = ifaces();
        let r = add(CniVersion::V1_0_0, &h, &c, &addrs());
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "ml12345678", "mac": "02:00:00:00:00:01"},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/x"},
                ],
                "ips": [
                    {"address": "198.18.17.2/32", "gateway": "198.18.17.1", "interface": 1},
                    {"address": "fd00:b:1::2/128", "gateway": "fe80::1", "interface": 1},
                ],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "198.18.17.1"},
                    {"dst": "::/0", "gw": "fe80::1"},
                ],
                "dns": {},
            })
        );
        let old = add(CniVersion::V0_4_0, &h, &c, &addrs());
        assert_eq!(old["cniVersion"], "0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
    }

    #[test]
    fn previous_results_are_read_back() {
        let (h, c) = ifaces();
        let r = add(CniVersion::V1_0_0, &h, &c, &addrs());
        let got = prev_addresses(&r).expect("own result");
        assert_eq!(got, addrs().iter().map(|(_, a)| *a).collect::<Vec<_>>());
        assert!(prev_addresses(&json!({})).expect("no ips").is_empty());
        assert!(prev_addresses(&json!({"ips": [{"address": "x/1"}]})).is_err());
        assert!(prev_addresses(&json!({"ips": "x"})).is_err());
    }
}
