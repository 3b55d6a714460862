//! Node-local address allocation: one address per family per container,
//! from the node's pod CIDRs. This module is the pure part (what is free,
//! who holds what); [`store`] keeps it in a locked file.

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::CniError;
use crate::cidr::{Cidr, to_u128};

/// How many addresses of a pool [`Pool::is_reserved`] refuses at most
/// (network, router, broadcast); bounds the search in [`Pool::next_free`].
const RESERVED_PER_POOL: u128 = 3;

/// One family's addresses on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub cidr: Cidr,
    /// The node's address for this family (on its `lo`), the pods' next hop.
    pub router: IpAddr,
}

impl Pool {
    pub fn new(cidr: Cidr, router: IpAddr) -> Self {
        Self { cidr, router }
    }

    /// Never given to a pod: the network address (also IPv6's subnet-router
    /// anycast), the router and the IPv4 broadcast address.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        ip == self.cidr.network() || ip == self.router || Some(ip) == self.cidr.broadcast()
    }

    /// The first address after `after` (round robin, wrapping to the start)
    /// that is neither reserved nor in `used`; `None` when the pool is full.
    /// Round robin keeps a just-released address out of use for as long as
    /// possible, so stale neighbour and conntrack entries of the old pod do
    /// not hit the new one.
    pub fn next_free(&self, used: &BTreeSet<IpAddr>, after: Option<IpAddr>) -> Option<IpAddr> {
        let (first, last) = (self.cidr.first(), self.cidr.last());
        let start = match after.filter(|a| self.cidr.contains(*a)).map(to_u128) {
            Some(a) if a < last => a + 1,
            _ => first,
        };
        // Among `used + reserved + 1` consecutive candidates one is free
        // unless the pool is smaller than that, when every address is tried:
        // the walk is bounded even for a /64.
        let candidates = (used.len() as u128)
            .saturating_add(RESERVED_PER_POOL + 1)
            .min((last - first).saturating_add(1));
        let mut value = start;
        for _ in 0..candidates {
            let ip = self.cidr.at(value);
            if !self.is_reserved(ip) && !used.contains(&ip) {
                return Some(ip);
            }
            value = if value == last { first } else { value + 1 };
        }
        None
    }
}

/// What one container holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub container_id: String,
    pub ifname: String,
    /// The host end of the container's veth (recorded before it is created,
    /// so DEL finds it even after a crash half-way through ADD).
    pub host_device: String,
    /// One per pool, in the pools' order.
    pub addresses: Vec<IpAddr>,
}

/// A network's allocation state on this node (the allocation file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocations {
    /// Format version of the file.
    #[serde(default = "format_version")]
    pub version: u32,
    /// Last address handed out per CIDR, where the round robin resumes.
    #[serde(default)]
    pub last: BTreeMap<String, IpAddr>,
    #[serde(default)]
    pub allocations: Vec<Allocation>,
}

fn format_version() -> u32 {
    1
}

impl Allocations {
    pub fn new() -> Self {
        Self {
            version: format_version(),
            ..Self::default()
        }
    }

    pub fn find(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// Every address held by any container.
    pub fn used(&self) -> BTreeSet<IpAddr> {
        self.allocations
            .iter()
            .flat_map(|a| a.addresses.iter().copied())
            .collect()
    }

    /// Reserves one address from each pool for (container, ifname).
    pub fn allocate(
        &mut self,
        network: &str,
        pools: &[Pool],
        container_id: &str,
        ifname: &str,
        host_device: &str,
    ) -> Result<Allocation, CniError> {
        if self.find(container_id, ifname).is_some() {
            return Err(CniError::AlreadyAdded {
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                network: network.to_owned(),
            });
        }
        if let Some(other) = self
            .allocations
            .iter()
            .find(|a| a.host_device == host_device)
        {
            return Err(CniError::HostDeviceTaken {
                device: host_device.to_owned(),
                other_container: other.container_id.clone(),
                other_ifname: other.ifname.clone(),
            });
        }
        let used = self.used();
        let mut addresses = Vec::with_capacity(pools.len());
        for pool in pools {
            let key = pool.cidr.to_string();
            let ip = pool
                .next_free(&used, self.last.get(&key).copied())
                .ok_or_else(|| CniError::PoolExhausted {
                    cidr: key.clone(),
                    allocated: self.allocations.len(),
                })?;
            addresses.push(ip);
        }
        for (pool, ip) in pools.iter().zip(&addresses) {
            self.last.insert(pool.cidr.to_string(), *ip);
        }
        let a = Allocation {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            host_device: host_device.to_owned(),
            addresses,
        };
        self.allocations.push(a.clone());
        Ok(a)
    }

    /// Frees what (container, ifname) holds; releasing twice is fine.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        let i = self
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.ifname == ifname)?;
        Some(self.allocations.remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn pool(cidr: &str) -> Pool {
        let cidr: Cidr = cidr.parse().expect("test cidr");
        Pool::new(cidr, cidr.first_host())
    }

    fn dual() -> Vec<Pool> {
        vec![pool("198.18.17.0/24"), pool("fd00:b:1::/64")]
    }

    #[test]
    fn first_allocation_skips_network_and_router() {
        let mut a = Allocations::new();
        let got = a
            .allocate("n", &dual(), "c1", "eth0", "mlaaaa")
            .expect("free");
        assert_eq!(got.addresses, vec![ip("198.18.17.2"), ip("fd00:b:1::2")]);
        assert_eq!(a.find("c1", "eth0"), Some(&got));
    }

    #[test]
    fn a_router_elsewhere_in_the_cidr_is_skipped() {
        let cidr: Cidr = "198.18.17.0/30".parse().expect("cidr");
        let p = Pool::new(cidr, ip("198.18.17.2"));
        let used = BTreeSet::new();
        assert_eq!(p.next_free(&used, None), Some(ip("198.18.17.1")));
        assert_eq!(
            p.next_free(&used, Some(ip("198.18.17.1"))),
            Some(ip("198.18.17.1")),
            "wraps past router and broadcast"
        );
    }

    #[test]
    fn addresses_are_unique_and_round_robin() {
        let mut a = Allocations::new();
        let mut seen = BTreeSet::new();
        for i in 0..50 {
            let got = a
                .allocate("n", &dual(), &format!("c{i}"), "eth0", &format!("ml{i}"))
                .expect("free");
            for addr in got.addresses {
                assert!(seen.insert(addr), "{addr} handed out twice");
            }
        }
        a.release("c0", "eth0").expect("held");
        let next = a
            .allocate("n", &dual(), "new", "eth0", "mlnew")
            .expect("free");
        assert_eq!(
            next.addresses[0],
            ip("198.18.17.52"),
            "a released address is not reused at once"
        );
    }

    #[test]
    fn exhaustion_is_an_error_and_release_makes_room() {
        // /29: .0 network, .1 router, .7 broadcast: 5 pods fit.
        let pools = vec![pool("198.18.17.0/29")];
        let mut a = Allocations::new();
        for i in 0..5 {
            a.allocate("n", &pools, &format!("c{i}"), "eth0", &format!("ml{i}"))
                .expect("room");
        }
        let e = a
            .allocate("n", &pools, "c5", "eth0", "ml5")
            .expect_err("full");
        assert_eq!(e.code(), code::POOL_EXHAUSTED);
        assert!(e.to_string().contains("198.18.17.0/29"), "{e}");
        assert!(
            a.find("c5", "eth0").is_none(),
            "a failed allocation holds nothing"
        );
        let freed = a.release("c2", "eth0").expect("held").addresses;
        assert_eq!(a.release("c2", "eth0"), None, "releasing twice is fine");
        let got = a
            .allocate("n", &pools, "c5", "eth0", "ml5")
            .expect("room again");
        assert_eq!(got.addresses, freed);
    }

    #[test]
    fn exhaustion_of_one_family_allocates_nothing() {
        let pools = vec![pool("fd00:b:1::/64"), pool("198.18.17.0/30")];
        let mut a = Allocations::new();
        a.allocate("n", &pools, "c0", "eth0", "ml0").expect("room");
        let before = a.clone();
        let e = a
            .allocate("n", &pools, "c1", "eth0", "ml1")
            .expect_err("v4 full");
        assert_eq!(e.code(), code::POOL_EXHAUSTED);
        assert_eq!(a, before);
    }

    #[test]
    fn same_container_twice_and_device_collisions() {
        let mut a = Allocations::new();
        a.allocate("n", &dual(), "c1", "eth0", "mlaaaa")
            .expect("free");
        let e = a
            .allocate("n", &dual(), "c1", "eth0", "mlaaaa")
            .expect_err("again");
        assert_eq!(e.code(), code::ALREADY_ADDED);
        assert!(e.to_string().contains("run DEL"), "{e}");
        let e = a
            .allocate("n", &dual(), "c2", "eth0", "mlaaaa")
            .expect_err("collision");
        assert_eq!(e.code(), code::HOST_DEVICE_TAKEN);
        assert!(e.to_string().contains("c1"), "{e}");
    }

    #[test]
    fn the_walk_is_bounded_in_huge_pools() {
        let p = pool("fd00::/8");
        let used: BTreeSet<IpAddr> = (2..1000u128)
            .map(|i| p.cidr.at(p.cidr.first() + i))
            .collect();
        assert_eq!(
            p.next_free(&used, None),
            Some(p.cidr.at(p.cidr.first() + 1000))
        );
        let all = pool("::/0");
        let last = all.cidr.at(u128::MAX);
        assert_eq!(
            all.next_free(&BTreeSet::new(), Some(last)),
            Some(ip("::2")),
            "wraps at the top"
        );
    }

    #[test]
    fn file_format_round_trips() {
        let mut a = Allocations::new();
        a.allocate("n", &dual(), "c1", "eth0", "mlaaaa")
            .expect("free");
        let text = serde_json::to_string(&a).expect("serialize");
        assert!(
            text.contains("\"containerId\":\"c1\"") && text.contains("\"hostDevice\""),
            "{text}"
        );
        let back: Allocations = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, a);
        let empty: Allocations = serde_json::from_str("{}").expect("empty object");
        assert_eq!(empty.version, 1);
    }
}
