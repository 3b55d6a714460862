//! This node's facts: addresses, pod CIDRs and zone. A DaemonSet cannot
//! give each node its own flags, so in a cluster they come from the node's
//! own Node object (`status.addresses`, `spec.podCIDRs` — written by
//! meshless-operator's node IPAM — and the `topology.kubernetes.io/zone`
//! label). A flag, when given, wins over the Node object for that fact.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::Config;

/// Label that names a node's zone (for `trafficDistribution: PreferClose`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Where a fact came from, for status and `meshctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Flag,
    NodeObject,
    Unknown,
}

/// What the datapath and the compilers need to know about this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFacts {
    /// IPv4 first, then IPv6; at most one of each family is used as the
    /// SNAT source, every one is a NodePort frontend.
    pub ips: Vec<IpAddr>,
    pub ips_from: Origin,
    pub pod_cidrs: Vec<(IpAddr, u8)>,
    pub pod_cidrs_from: Origin,
    pub zone: Option<String>,
    pub zone_from: Origin,
    /// Problems with this node's Node object (a podCIDR that does not
    /// parse, ...). The fact stays as it was before.
    pub errors: Vec<String>,
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= if addr.is_ipv4() { 32 } else { 128 }).then_some((addr, len))
}

/// IPv4 before IPv6, order within a family kept, no duplicates.
fn v4_first<T: Clone + PartialEq>(items: Vec<T>, is_v4: impl Fn(&T) -> bool) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in items
        .iter()
        .filter(|x| is_v4(x))
        .chain(items.iter().filter(|x| !is_v4(x)))
    {
        if !out.contains(x) {
            out.push(x.clone());
        }
    }
    out
}

/// Resolves this node's facts from the flags and, where a flag is absent,
/// from the Node object named `config.node` among `nodes`.
pub fn resolve(config: &Config, nodes: &[Node]) -> NodeFacts {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(config.node.as_str()));
    let mut errors = Vec::new();
    let (ips, ips_from) = if !config.node_ips.is_empty() {
        (
            v4_first(config.node_ips.clone(), IpAddr::is_ipv4),
            Origin::Flag,
        )
    } else {
        // InternalIP is what kube-proxy and Cilium use for NodePorts;
        // ExternalIP only when a node has no internal address.
        let addrs = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref());
        let mut of_type = |t: &str| -> Vec<IpAddr> {
            addrs
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == t)
                .filter_map(|a| match a.address.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        errors.push(format!(
                            "Node {}: status.addresses {} {:?} is not an IP address; ignored",
                            config.node, a.type_, a.address
                        ));
                        None
                    }
                })
                .collect()
        };
        let mut ips = of_type("InternalIP");
        if ips.is_empty() {
            ips = of_type("ExternalIP");
        }
        let from = if ips.is_empty() {
            Origin::Unknown
        } else {
            Origin::NodeObject
        };
        (v4_first(ips, IpAddr::is_ipv4), from)
    };
    let (pod_cidrs, pod_cidrs_from) = if !config.pod_cidrs.is_empty() {
        (
            v4_first(config.pod_cidrs.clone(), |(a, _)| a.is_ipv4()),
            Origin::Flag,
        )
    } else {
        let spec = node.and_then(|n| n.spec.as_ref());
        let listed: Vec<String> = spec
            .and_then(|s| s.pod_cidrs.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        let mut cidrs = Vec::new();
        for (i, c) in listed.iter().enumerate() {
            match parse_cidr(c) {
                Some(p) => cidrs.push(p),
                None => errors.push(format!(
                    "Node {}: spec.podCIDRs[{i}] {c:?} is not a CIDR; ignored",
                    config.node
                )),
            }
        }
        let from = if cidrs.is_empty() {
            Origin::Unknown
        } else {
            Origin::NodeObject
        };
        (v4_first(cidrs, |(a, _)| a.is_ipv4()), from)
    };
    let (zone, zone_from) = match (&config.zone, node) {
        (Some(z), _) => (Some(z.clone()), Origin::Flag),
        (None, Some(n)) => match n.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)) {
            Some(z) => (Some(z.clone()), Origin::NodeObject),
            None => (None, Origin::Unknown),
        },
        (None, None) => (None, Origin::Unknown),
    };
    NodeFacts {
        ips,
        ips_from,
        pod_cidrs,
        pod_cidrs_from,
        zone,
        zone_from,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn config(extra: &[&str]) -> Config {
        let mut args = vec!["meshless-agent", "--node", "n1", "--cgroup", "/x"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).expect("parses")
    }

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).expect("node")
    }

    const N1: &str = "metadata:\n  name: n1\n  labels: {topology.kubernetes.io/zone: z1}\nspec:\n  podCIDRs: [fd00:b:1::/64, 198.18.17.0/24]\nstatus:\n  addresses:\n  - {type: Hostname, address: n1}\n  - {type: InternalIP, address: fd00::11}\n  - {type: InternalIP, address: 198.18.0.11}\n  - {type: ExternalIP, address: 198.18.200.1}\n";

    #[test]
    fn everything_from_the_node_object_without_flags() {
        let other = node(
            "metadata: {name: n2}\nstatus: {addresses: [{type: InternalIP, address: 198.18.0.12}]}\n",
        );
        let f = resolve(&config(&[]), &[other, node(N1)]);
        assert_eq!(
            f.ips,
            vec![
                "198.18.0.11".parse::<IpAddr>().expect("ip"),
                "fd00::11".parse().expect("ip")
            ],
            "InternalIPs, IPv4 first, not n2's"
        );
        assert_eq!(f.ips_from, Origin::NodeObject);
        assert_eq!(
            f.pod_cidrs,
            vec![
                ("198.18.17.0".parse().expect("ip"), 24),
                ("fd00:b:1::".parse().expect("ip"), 64)
            ]
        );
        assert_eq!(f.zone.as_deref(), Some("z1"));
        assert!(f.errors.is_empty(), "{:?}", f.errors);
    }

    #[test]
    fn flags_win_fact_by_fact() {
        let f = resolve(
            &config(&["--node-ip", "198.18.0.99", "--zone", "zf"]),
            &[node(N1)],
        );
        assert_eq!(f.ips, vec!["198.18.0.99".parse::<IpAddr>().expect("ip")]);
        assert_eq!((f.ips_from, f.zone_from), (Origin::Flag, Origin::Flag));
        assert_eq!(f.zone.as_deref(), Some("zf"));
        assert_eq!(f.pod_cidrs_from, Origin::NodeObject, "no --pod-cidr given");
    }

    #[test]
    fn no_node_object_means_unknown_and_bad_values_are_named() {
        let f = resolve(&config(&[]), &[]);
        assert!(f.ips.is_empty() && f.pod_cidrs.is_empty() && f.zone.is_none());
        assert_eq!(f.ips_from, Origin::Unknown);
        let bad = node(
            "metadata: {name: n1}\nspec: {podCIDRs: [198.18.17.0/24, nonsense]}\nstatus: {addresses: [{type: ExternalIP, address: 198.18.200.1}, {type: ExternalIP, address: x}]}\n",
        );
        let f = resolve(&config(&[]), &[bad]);
        assert_eq!(f.pod_cidrs.len(), 1);
        assert_eq!(
            f.ips,
            vec!["198.18.200.1".parse::<IpAddr>().expect("ip")],
            "ExternalIP when there is no InternalIP"
        );
        assert_eq!(f.errors.len(), 2, "{:?}", f.errors);
        assert!(
            f.errors
                .iter()
                .any(|e| e.contains("Node n1: spec.podCIDRs[1] \"nonsense\"")),
            "{:?}",
            f.errors
        );
    }
}
