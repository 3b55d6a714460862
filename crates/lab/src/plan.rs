//! Names and addresses of everything a lab creates. Pure functions: the same
//! lab name always maps to the same objects, which is what lets a crashed
//! lab be found and removed.
//!
//! | what                    | IPv4                       | IPv6                |
//! |-------------------------|----------------------------|---------------------|
//! | fabric (node i)         | 198.18.0.(10+i)/24         | fd00:a::(10+i)/64   |
//! | external host           | 198.18.0.250/24            | fd00:a::250/64      |
//! | LoadBalancer pool       | 198.18.1.0/24              | fd00:d::/112        |
//! | VXLAN tunnel endpoints  | 198.18.2.i/32              | fd00:e::i/128       |
//! | pod CIDR of node i      | 198.18.(16+i).0/24         | fd00:b:i::/64       |
//! | node router (on lo)     | 198.18.(16+i).1            | fd00:b:i::1         |
//! | pod j of node i         | 198.18.(16+i).(10+j)       | fd00:b:i::(10+j)    |
//! | services (ClusterIP)    | 198.19.0.0/16              | fd00:c::/108        |
//!
//! Node and pod counts are bounded so every address stays inside
//! 198.18.0.0/15 and fd00::/8.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::LabError;

/// Longest lab name (keeps netns, node and cgroup names short).
pub const MAX_LAB_NAME: usize = 12;
/// Most nodes in one lab.
pub const MAX_NODES: usize = 16;
/// Most pods on one node.
pub const MAX_PODS_PER_NODE: usize = 200;
/// VXLAN network identifier of the overlay.
pub const VXLAN_ID: u32 = 42;
/// VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// MTU of pod devices in VXLAN mode (1500 minus 50 bytes of encapsulation).
pub const VXLAN_MTU: u32 = 1450;
/// Prefix of every network namespace a lab creates.
pub const NETNS_PREFIX: &str = "ml-";
/// cgroup v2 directory (below the v2 mount) that holds every lab's cgroups.
pub const CGROUP_DIR: &str = "meshless-lab";
/// Where lab state (lab.json, logs, agent state) lives.
pub const RUN_DIR: &str = "/run/meshless-lab";
/// Prefix of host-side pod devices; meshless-agent attaches to these.
pub const POD_DEVICE_PREFIX: &str = "ml";

/// Lab names are lowercase letters and digits only: no '-', so that
/// `ml-<lab>-...` and `<lab>-n<i>` can never match another lab's objects.
pub fn validate_lab_name(name: &str) -> Result<(), LabError> {
    let why = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_LAB_NAME {
        Some("must be at most 12 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Some("use only lowercase letters and digits")
    } else {
        None
    };
    match why {
        Some(why) => Err(LabError::InvalidName {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Pod names: DNS-label-like, at most 30 characters.
pub fn validate_pod_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidPodName {
            name: name.to_owned(),
        })
    }
}

/// Kubernetes-style node name: `<lab>-n<i>` (i from 1).
pub fn node_name(lab: &str, index: usize) -> String {
    format!("{lab}-n{index}")
}

/// True when `name` is one of `lab`'s node names.
pub fn is_node_of(lab: &str, name: &str) -> bool {
    name.strip_prefix(lab)
        .and_then(|rest| rest.strip_prefix("-n"))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

pub fn fabric_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-fabric")
}
pub fn external_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-ext")
}
pub fn node_netns(lab: &str, index: usize) -> String {
    format!("{NETNS_PREFIX}{lab}-n{index}")
}
pub fn pod_netns(lab: &str, node: usize, pod: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-n{node}-{pod}")
}
/// True when `netns` belongs to `lab`.
pub fn is_netns_of(lab: &str, netns: &str) -> bool {
    netns
        .strip_prefix(NETNS_PREFIX)
        .and_then(|rest| rest.strip_prefix(lab))
        .is_some_and(|rest| rest.starts_with('-'))
}

/// Host-side device of a pod, unique within its node: `ml` + 8 hex digits of
/// a hash of the pod name (interface names are limited to 15 bytes).
pub fn pod_device(pod: &str) -> String {
    format!("{POD_DEVICE_PREFIX}{:08x}", fnv(pod))
}

/// FNV-1a: stable across releases, unlike std's DefaultHasher.
fn fnv(s: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Longest netns name the lab kubelet creates.
const MAX_KUBELET_NETNS: usize = 100;

/// The network namespace the lab kubelet gives a Kubernetes pod:
/// `ml-<lab>-n<i>-<pod>` in `default`, `ml-<lab>-n<i>-<ns>-<pod>` otherwise;
/// longer names are cut and end in a hash. The `ml-<lab>-` prefix is what
/// lets the lab's teardown find them.
pub fn kubelet_pod_netns(lab: &str, index: usize, namespace: &str, pod: &str) -> String {
    let base = node_netns(lab, index);
    let full = if namespace == "default" {
        format!("{base}-{pod}")
    } else {
        format!("{base}-{namespace}-{pod}")
    };
    if full.len() <= MAX_KUBELET_NETNS {
        return full;
    }
    let hash = format!("-{:08x}", fnv(&format!("{namespace}/{pod}")));
    let mut cut = full;
    cut.truncate(MAX_KUBELET_NETNS - hash.len());
    cut + &hash
}

fn node_octet(index: usize) -> u8 {
    u8::try_from(index).expect("node index bounded by MAX_NODES")
}

pub fn node_ipv4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + node_octet(index))
}
pub fn node_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0xa,
        0,
        0,
        0,
        0,
        0,
        0x10 + u16::from(node_octet(index)),
    )
}
pub const EXTERNAL_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
pub const EXTERNAL_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 0x250);
pub const FABRIC_PREFIX_V4: u8 = 24;
/// LoadBalancer address pool (the external host routes it via node n1).
pub const LB_POOL_V4: &str = "198.18.1.0/24";
pub const LB_POOL_V6: &str = "fd00:d::/112";
pub const FABRIC_PREFIX_V6: u8 = 64;

pub fn vtep_ipv4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, node_octet(index))
}
pub fn vtep_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xe, 0, 0, 0, 0, 0, u16::from(node_octet(index)))
}
/// Locally administered, deterministic MAC of node i's VXLAN device.
pub fn vtep_mac(index: usize) -> String {
    format!("02:6d:6c:00:00:{:02x}", node_octet(index))
}

/// Pod CIDR of node i as (network, prefix length).
pub fn pod_cidr_v4(index: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(198, 18, 16 + node_octet(index), 0), 24)
}
pub fn pod_cidr_v6(index: usize) -> (Ipv6Addr, u8) {
    (
        Ipv6Addr::new(0xfd00, 0xb, u16::from(node_octet(index)), 0, 0, 0, 0, 0),
        64,
    )
}
/// The node's address on its pod network, the pods' gateway.
pub fn router_ipv4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16 + node_octet(index), 1)
}
pub fn router_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xb, u16::from(node_octet(index)), 0, 0, 0, 0, 1)
}
/// Link-local gateway the pods use for IPv6 (set on every host-side device).
pub const POD_GATEWAY_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Address of the `slot`-th pod (from 0) on node i.
pub fn pod_ipv4(index: usize, slot: usize) -> Ipv4Addr {
    let slot = u8::try_from(slot).expect("slot bounded by MAX_PODS_PER_NODE");
    Ipv4Addr::new(198, 18, 16 + node_octet(index), 10 + slot)
}
pub fn pod_ipv6(index: usize, slot: usize) -> Ipv6Addr {
    let slot = u16::try_from(slot).expect("slot bounded by MAX_PODS_PER_NODE");
    Ipv6Addr::new(
        0xfd00,
        0xb,
        u16::from(node_octet(index)),
        0,
        0,
        0,
        0,
        0x10 + slot,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("demo").is_ok());
        assert!(validate_lab_name("t12345").is_ok());
        for bad in ["", "a-b", "Demo", "abcdefghijklm", "a_b"] {
            assert!(
                validate_lab_name(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn pod_names() {
        assert!(validate_pod_name("client").is_ok());
        assert!(validate_pod_name("web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", &"x".repeat(31)] {
            assert!(
                validate_pod_name(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn names_never_match_other_labs() {
        assert!(is_netns_of("a", "ml-a-n1"));
        assert!(is_netns_of("a", "ml-a-fabric"));
        assert!(!is_netns_of("a", "ml-ab-n1"));
        assert!(!is_netns_of("a", "other"));
        assert!(is_node_of("a", "a-n12"));
        assert!(!is_node_of("a", "ab-n1"));
        assert!(!is_node_of("a", "a-n"));
        assert!(!is_node_of("a", "a-n1x"));
    }

    #[test]
    fn pod_devices_fit_ifnamsiz_and_differ() {
        let a = pod_device("client");
        let b = pod_device("server");
        assert!(a.len() <= 15 && a.starts_with(POD_DEVICE_PREFIX), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, pod_device("client"), "stable");
    }

    #[test]
    fn addresses_stay_in_the_lab_ranges() {
        let v4_lab = |a: Ipv4Addr| a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18;
        let v6_lab = |a: Ipv6Addr| a.octets()[0] == 0xfd;
        for node in 1..=MAX_NODES {
            assert!(
                v4_lab(node_ipv4(node)) && v4_lab(vtep_ipv4(node)) && v4_lab(router_ipv4(node))
            );
            assert!(
                v6_lab(node_ipv6(node)) && v6_lab(vtep_ipv6(node)) && v6_lab(router_ipv6(node))
            );
            for slot in [0, MAX_PODS_PER_NODE - 1] {
                assert!(v4_lab(pod_ipv4(node, slot)), "{}", pod_ipv4(node, slot));
                assert!(v6_lab(pod_ipv6(node, slot)));
            }
        }
        assert_eq!(pod_ipv4(2, 0), Ipv4Addr::new(198, 18, 18, 10));
        assert_eq!(pod_ipv6(1, 1).to_string(), "fd00:b:1::11");
        assert!(v4_lab(EXTERNAL_IPV4) && v6_lab(EXTERNAL_IPV6));
    }
}
