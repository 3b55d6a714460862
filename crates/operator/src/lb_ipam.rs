//! LB-IPAM: which LoadBalancer addresses each Service of type LoadBalancer
//! gets, from the configured pools. Pure: the controller feeds it typed
//! Services and writes what it answers into `status.loadBalancer.ingress`.
//!
//! There is no allocation store besides the Services themselves: a new
//! leader (or a restarted operator) rebuilds the allocator from the
//! addresses already in Service statuses before it hands out any new one,
//! so no address is ever given to two Services.

pub mod pools;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use crate::cidr::{Cidr, Family, from_u128, to_u128};

/// Annotation a Service uses to ask for specific addresses (comma-separated,
/// at most one per family). Takes precedence over `spec.loadBalancerIP`.
pub const REQUEST_ANNOTATION: &str = "meshless.dev/lb-ip";
/// `spec.loadBalancerClass` values this operator serves (besides unset):
/// a Service that names another class belongs to another implementation.
pub const LOAD_BALANCER_CLASS: &str = "meshless.dev/lb";

/// namespace/name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a Service did not get (all) the addresses it wants.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LbIpamError {
    #[error(
        "service {service}: {field} = {value:?} is not an IP address list; write e.g. \"198.18.1.10\" or \"198.18.1.10,fd00:d::10\""
    )]
    BadRequest {
        service: ServiceKey,
        field: &'static str,
        value: String,
    },
    #[error(
        "service {service}: {field} asks for {ip}, which no LB pool can hand out (pools: {pools}; IPv4 network and broadcast addresses are never used); pick an address inside one, or add a LoadBalancerIPPool that contains it"
    )]
    RequestedOutsidePools {
        service: ServiceKey,
        field: &'static str,
        ip: IpAddr,
        pools: String,
    },
    #[error(
        "service {service}: {field} asks for {ip}, which is already the address of service {owner}; pick another, or remove it from {owner} first"
    )]
    RequestedInUse {
        service: ServiceKey,
        field: &'static str,
        ip: IpAddr,
        owner: ServiceKey,
    },
    #[error(
        "service {service}: {field} asks for {ip}, but spec.ipFamilies does not include {family}"
    )]
    RequestedFamilyNotInService {
        service: ServiceKey,
        field: &'static str,
        ip: IpAddr,
        family: Family,
    },
    #[error(
        "service {service}: no {family} LB pool is configured; add a LoadBalancerIPPool with an {family} block (or an --lb-pool), or make the Service single-stack"
    )]
    NoPool { service: ServiceKey, family: Family },
    #[error(
        "service {service}: every {family} LB pool is exhausted ({pools}); add a LoadBalancerIPPool or delete unused LoadBalancer Services"
    )]
    Exhausted {
        service: ServiceKey,
        family: Family,
        pools: String,
    },
}

/// What LB-IPAM needs to know about one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbService {
    pub key: ServiceKey,
    /// Type LoadBalancer and a class this operator serves.
    pub wants_lb: bool,
    /// `spec.loadBalancerClass` names another implementation: its status is
    /// not ours to touch.
    pub foreign_class: bool,
    /// `spec.ipFamilies` in order (IPv4 if unset).
    pub families: Vec<Family>,
    /// Requested addresses and the field they came from, if any.
    pub requested: Option<(&'static str, String)>,
    /// Addresses in `status.loadBalancer.ingress[].ip`.
    pub ingress: Vec<IpAddr>,
    /// `metadata.creationTimestamp` as text (RFC 3339 sorts by time), to
    /// decide deterministically who keeps a contested address on rebuild.
    pub created: String,
}

impl LbService {
    /// The view of a typed Service.
    pub fn from_service(svc: &Service) -> Self {
        let key = ServiceKey {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        let spec = svc.spec.as_ref();
        let foreign_class = spec
            .and_then(|s| s.load_balancer_class.as_deref())
            .is_some_and(|c| c != LOAD_BALANCER_CLASS);
        let wants_lb =
            !foreign_class && spec.is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"));
        let mut families: Vec<Family> = spec
            .and_then(|s| s.ip_families.as_ref())
            .map(|f| f.iter().filter_map(|f| Family::from_k8s(f)).collect())
            .unwrap_or_default();
        if families.is_empty() {
            families.push(Family::V4);
        }
        let annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REQUEST_ANNOTATION))
            .filter(|v| !v.trim().is_empty())
            .map(|v| ("annotation meshless.dev/lb-ip", v.clone()));
        let requested = annotation.or_else(|| {
            spec.and_then(|s| s.load_balancer_ip.as_ref())
                .filter(|v| !v.trim().is_empty())
                .map(|v| ("spec.loadBalancerIP", v.clone()))
        });
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|i| {
                i.iter()
                    .filter_map(|i| i.ip.as_deref()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let created = svc
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        Self {
            key,
            wants_lb,
            foreign_class,
            families,
            requested,
            ingress,
            created,
        }
    }
}

/// The outcome for one Service: the addresses it should have (in
/// `spec.ipFamilies` order) and what stopped the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub ips: Vec<IpAddr>,
    pub errors: Vec<LbIpamError>,
}

/// Address ownership across all pools.
#[derive(Clone, Debug)]
pub struct LbAllocator {
    pools: Vec<Cidr>,
    owners: BTreeMap<IpAddr, ServiceKey>,
    held: BTreeMap<ServiceKey, Vec<IpAddr>>,
}

/// First and last address of a pool that may be handed out: IPv4 pools
/// larger than /31 lose their network and broadcast addresses.
fn usable(pool: &Cidr) -> (u128, u128) {
    let (first, last) = pool.range();
    if pool.family() == Family::V4 && pool.prefix_len() < 31 {
        (first + 1, last - 1)
    } else {
        (first, last)
    }
}

impl LbAllocator {
    /// An allocator with nothing allocated.
    pub fn new(pools: Vec<Cidr>) -> Self {
        Self {
            pools,
            owners: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// The allocator as the cluster already has it: every address in a
    /// LoadBalancer Service's status that lies in a pool stays with that
    /// Service. If two Services claim one address, the older keeps it.
    pub fn rebuild(pools: Vec<Cidr>, services: &[LbService]) -> Self {
        let mut a = Self::new(pools);
        let mut order: Vec<&LbService> = services.iter().filter(|s| s.wants_lb).collect();
        order.sort_by(|x, y| (&x.created, &x.key).cmp(&(&y.created, &y.key)));
        for svc in order {
            for &ip in &svc.ingress {
                let family = Family::of(ip);
                let has_family = a
                    .held
                    .get(&svc.key)
                    .is_some_and(|h| h.iter().any(|&h| Family::of(h) == family));
                if svc.families.contains(&family)
                    && a.in_pool(ip)
                    && !a.owners.contains_key(&ip)
                    && !has_family
                {
                    a.claim(&svc.key, ip);
                }
            }
        }
        a
    }

    /// The allocator for a new set of pools (a LoadBalancerIPPool came,
    /// went or changed): every address this one handed out that the new
    /// pools still contain stays with its Service; addresses outside them
    /// are dropped, exactly as [`LbAllocator::rebuild`] ignores addresses
    /// outside every pool, so the next [`LbAllocator::ensure`] of such a
    /// Service gives it a new address from the remaining pools, or none
    /// with a `NoPool`/`Exhausted` error. Ownership comes from this
    /// allocator rather than from `services`' statuses, which may lag
    /// behind status writes the watch has not delivered yet.
    pub fn repool(&self, pools: Vec<Cidr>, services: &[LbService]) -> Self {
        let views: Vec<LbService> = services
            .iter()
            .map(|s| LbService {
                ingress: self.held(&s.key).to_vec(),
                ..s.clone()
            })
            .collect();
        Self::rebuild(pools, &views)
    }

    fn pools_text(&self, family: Family) -> String {
        let p: Vec<String> = self
            .pools
            .iter()
            .filter(|p| p.family() == family)
            .map(ToString::to_string)
            .collect();
        if p.is_empty() {
            "none".to_owned()
        } else {
            p.join(", ")
        }
    }

    /// Whether `ip` may be handed out at all.
    pub fn in_pool(&self, ip: IpAddr) -> bool {
        let n = to_u128(ip);
        self.pools.iter().any(|p| {
            let (first, last) = usable(p);
            p.contains(ip) && (first..=last).contains(&n)
        })
    }

    /// Who owns `ip`.
    pub fn owner(&self, ip: IpAddr) -> Option<&ServiceKey> {
        self.owners.get(&ip)
    }

    /// The addresses a Service holds.
    pub fn held(&self, key: &ServiceKey) -> &[IpAddr] {
        self.held.get(key).map_or(&[], Vec::as_slice)
    }

    /// Number of addresses handed out.
    pub fn allocated(&self) -> usize {
        self.owners.len()
    }

    fn claim(&mut self, key: &ServiceKey, ip: IpAddr) {
        self.owners.insert(ip, key.clone());
        self.held.entry(key.clone()).or_default().push(ip);
    }

    fn release_ip(&mut self, key: &ServiceKey, ip: IpAddr) {
        if self.owners.get(&ip) == Some(key) {
            self.owners.remove(&ip);
        }
        if let Some(h) = self.held.get_mut(key) {
            h.retain(|&x| x != ip);
            if h.is_empty() {
                self.held.remove(key);
            }
        }
    }

    /// Frees everything a Service holds (deleted, or no longer a
    /// LoadBalancer); returns what was freed.
    pub fn release(&mut self, key: &ServiceKey) -> Vec<IpAddr> {
        let ips = self.held.remove(key).unwrap_or_default();
        for ip in &ips {
            self.owners.remove(ip);
        }
        ips
    }

    /// The lowest free address of `family` in the first pool that has one.
    fn next_free(&self, family: Family) -> Option<IpAddr> {
        for pool in self.pools.iter().filter(|p| p.family() == family) {
            let (first, last) = usable(pool);
            let mut candidate = first;
            // Owned addresses in order: the first gap is the answer, in
            // O(allocated) rather than O(pool size) (IPv6 pools are huge).
            for ip in self
                .owners
                .range(from_u128(family, first)..=from_u128(family, last))
                .map(|(ip, _)| to_u128(*ip))
            {
                if ip != candidate {
                    break;
                }
                candidate += 1;
            }
            if candidate <= last {
                return Some(from_u128(family, candidate));
            }
        }
        None
    }

    /// Brings a Service's allocation to what it asks for and returns the
    /// addresses it should show in its status.
    pub fn ensure(&mut self, svc: &LbService) -> Assignment {
        if !svc.wants_lb {
            self.release(&svc.key);
            return Assignment::default();
        }
        let mut out = Assignment::default();
        let mut requested: Vec<IpAddr> = Vec::new();
        let mut field = "";
        if let Some((f, value)) = &svc.requested {
            field = f;
            let parsed: Result<Vec<IpAddr>, _> =
                value.split(',').map(|v| v.trim().parse()).collect();
            match parsed {
                Ok(ips) => requested = ips,
                Err(_) => {
                    // Nothing is allocated while the request is unreadable:
                    // handing out some other address would hide the typo.
                    self.release(&svc.key);
                    out.errors.push(LbIpamError::BadRequest {
                        service: svc.key.clone(),
                        field: f,
                        value: value.clone(),
                    });
                    return out;
                }
            }
        }
        for &ip in &requested {
            let family = Family::of(ip);
            if !svc.families.contains(&family) {
                out.errors.push(LbIpamError::RequestedFamilyNotInService {
                    service: svc.key.clone(),
                    field,
                    ip,
                    family,
                });
            }
        }
        // Families the Service no longer has give their address back.
        for ip in self.held(&svc.key).to_vec() {
            if !svc.families.contains(&Family::of(ip)) {
                self.release_ip(&svc.key, ip);
            }
        }
        for &family in &svc.families {
            let current = self
                .held(&svc.key)
                .iter()
                .copied()
                .find(|&ip| Family::of(ip) == family);
            let want = requested
                .iter()
                .copied()
                .find(|&ip| Family::of(ip) == family);
            match (want, current) {
                (Some(w), Some(c)) if w == c => out.ips.push(c),
                (Some(w), current) => {
                    if let Some(c) = current {
                        self.release_ip(&svc.key, c);
                    }
                    if !self.in_pool(w) {
                        out.errors.push(LbIpamError::RequestedOutsidePools {
                            service: svc.key.clone(),
                            field,
                            ip: w,
                            pools: self.pools_text(family),
                        });
                    } else if let Some(owner) = self.owners.get(&w) {
                        out.errors.push(LbIpamError::RequestedInUse {
                            service: svc.key.clone(),
                            field,
                            ip: w,
                            owner: owner.clone(),
                        });
                    } else {
                        self.claim(&svc.key, w);
                        out.ips.push(w);
                    }
                }
                (None, Some(c)) => out.ips.push(c),
                (None, None) => {
                    if !self.pools.iter().any(|p| p.family() == family) {
                        out.errors.push(LbIpamError::NoPool {
                            service: svc.key.clone(),
                            family,
                        });
                    } else if let Some(ip) = self.next_free(family) {
                        self.claim(&svc.key, ip);
                        out.ips.push(ip);
                    } else {
                        out.errors.push(LbIpamError::Exhausted {
                            service: svc.key.clone(),
                            family,
                            pools: self.pools_text(family),
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|p| p.parse().expect(p)).collect()
    }

    fn svc(name: &str, families: &[Family]) -> LbService {
        LbService {
            key: ServiceKey {
                namespace: "default".into(),
                name: name.into(),
            },
            wants_lb: true,
            foreign_class: false,
            families: families.to_vec(),
            requested: None,
            ingress: Vec::new(),
            created: format!("2026-01-01T00:00:{name}Z"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect(s)
    }

    #[test]
    fn skips_ipv4_network_and_broadcast_and_exhausts_with_a_clear_error() {
        // A /30 has exactly two usable addresses.
        let mut a = LbAllocator::new(pools(&["198.18.1.0/30"]));
        assert_eq!(a.ensure(&svc("a", &[Family::V4])).ips, [ip("198.18.1.1")]);
        assert_eq!(a.ensure(&svc("b", &[Family::V4])).ips, [ip("198.18.1.2")]);
        let c = a.ensure(&svc("c", &[Family::V4]));
        assert!(c.ips.is_empty());
        assert_eq!(
            c.errors[0].to_string(),
            "service default/c: every IPv4 LB pool is exhausted (198.18.1.0/30); add a LoadBalancerIPPool or delete unused LoadBalancer Services"
        );
        // Ensuring again is stable: same address, nothing new taken.
        assert_eq!(a.ensure(&svc("a", &[Family::V4])).ips, [ip("198.18.1.1")]);
        assert_eq!(a.allocated(), 2);
        // Release makes room again, at the lowest free address.
        assert_eq!(a.release(&svc("a", &[]).key), [ip("198.18.1.1")]);
        assert_eq!(a.ensure(&svc("c", &[Family::V4])).ips, [ip("198.18.1.1")]);
    }

    #[test]
    fn dual_stack_gets_one_address_per_family_in_spec_order() {
        let mut a = LbAllocator::new(pools(&["198.18.1.0/24", "fd00:d::/112"]));
        let s = a.ensure(&svc("a", &[Family::V6, Family::V4]));
        assert_eq!(s.ips, [ip("fd00:d::"), ip("198.18.1.1")]);
        assert!(s.errors.is_empty());
        // Going single-stack gives the other family's address back.
        assert_eq!(a.ensure(&svc("a", &[Family::V4])).ips, [ip("198.18.1.1")]);
        assert_eq!(a.owner(ip("fd00:d::")), None);
        // A family without a pool is an error, the other still works.
        let mut v4only = LbAllocator::new(pools(&["198.18.1.0/24"]));
        let s = v4only.ensure(&svc("b", &[Family::V4, Family::V6]));
        assert_eq!(s.ips, [ip("198.18.1.1")]);
        assert!(matches!(
            s.errors[..],
            [LbIpamError::NoPool {
                family: Family::V6,
                ..
            }]
        ));
    }

    #[test]
    fn honours_a_requested_address_when_free_and_in_a_pool() {
        let mut a = LbAllocator::new(pools(&["198.18.1.0/24", "fd00:d::/112"]));
        let mut r = svc("r", &[Family::V4, Family::V6]);
        r.requested = Some(("annotation meshless.dev/lb-ip", "198.18.1.77".into()));
        let got = a.ensure(&r);
        // The IPv6 side, not requested, comes from the pool.
        assert_eq!(got.ips, [ip("198.18.1.77"), ip("fd00:d::")]);
        // Taken: the second asker gets an error naming both services and no address.
        let mut s = svc("s", &[Family::V4]);
        s.requested = Some(("spec.loadBalancerIP", "198.18.1.77".into()));
        let got = a.ensure(&s);
        assert!(got.ips.is_empty());
        assert_eq!(
            got.errors[0].to_string(),
            "service default/s: spec.loadBalancerIP asks for 198.18.1.77, which is already the address of service default/r; pick another, or remove it from default/r first"
        );
        // Outside every pool, and the network address: refused.
        for bad in ["10.0.0.1", "198.18.1.0", "198.18.1.255"] {
            s.requested = Some(("spec.loadBalancerIP", bad.into()));
            let got = a.ensure(&s);
            assert!(got.ips.is_empty(), "{bad}");
            assert!(
                matches!(got.errors[..], [LbIpamError::RequestedOutsidePools { .. }]),
                "{bad}: {:?}",
                got.errors
            );
        }
        // Garbage: refused with the field named.
        s.requested = Some(("spec.loadBalancerIP", "nope".into()));
        assert!(
            a.ensure(&s).errors[0]
                .to_string()
                .contains("spec.loadBalancerIP = \"nope\"")
        );
        // Changing the request moves the service to the new address.
        r.requested = Some(("annotation meshless.dev/lb-ip", "198.18.1.78".into()));
        assert_eq!(a.ensure(&r).ips[0], ip("198.18.1.78"));
        assert_eq!(a.owner(ip("198.18.1.77")), None);
        // Allocation never lands on a requested address that is taken.
        assert_eq!(a.ensure(&svc("t", &[Family::V4])).ips, [ip("198.18.1.1")]);
    }

    #[test]
    fn rebuild_from_statuses_never_hands_out_an_address_twice() {
        let p = pools(&["198.18.1.0/24", "fd00:d::/112"]);
        let mut a = svc("1", &[Family::V4, Family::V6]);
        a.ingress = vec![ip("198.18.1.1"), ip("fd00:d::")];
        let mut b = svc("2", &[Family::V4]);
        b.ingress = vec![ip("198.18.1.2")];
        // A newer service that claims a's address (e.g. copied status): loses it.
        let mut dup = svc("3", &[Family::V4]);
        dup.ingress = vec![ip("198.18.1.1")];
        // Not a LoadBalancer any more: its old address is free.
        let mut gone = svc("4", &[Family::V4]);
        gone.wants_lb = false;
        gone.ingress = vec![ip("198.18.1.3")];
        // Outside the pools (another implementation's address): ignored.
        let mut foreign = svc("5", &[Family::V4]);
        foreign.ingress = vec![ip("203.0.113.9")];
        let all = [dup.clone(), gone, a.clone(), b.clone(), foreign.clone()];
        let mut alloc = LbAllocator::rebuild(p, &all);
        assert_eq!(alloc.allocated(), 3);
        assert_eq!(alloc.ensure(&a).ips, a.ingress);
        assert_eq!(alloc.ensure(&b).ips, b.ingress);
        assert_eq!(alloc.ensure(&dup).ips, [ip("198.18.1.3")]);
        assert_eq!(alloc.ensure(&foreign).ips, [ip("198.18.1.4")]);
        let new = alloc.ensure(&svc("6", &[Family::V4, Family::V6]));
        assert_eq!(new.ips, [ip("198.18.1.5"), ip("fd00:d::1")]);
    }

    #[test]
    fn repool_keeps_addresses_still_in_a_pool_and_moves_the_rest() {
        let mut a = LbAllocator::new(pools(&["198.18.1.0/24", "198.18.2.0/24", "fd00:d::/112"]));
        let mut x = svc("x", &[Family::V4, Family::V6]);
        let mut y = svc("y", &[Family::V4]);
        // Fill the first pool's first addresses, then put y in the second.
        x.ingress = a.ensure(&x).ips;
        y.requested = Some(("spec.loadBalancerIP", "198.18.2.7".into()));
        y.ingress = a.ensure(&y).ips;
        assert_eq!(y.ingress, [ip("198.18.2.7")]);
        y.requested = None;
        // A status not yet seen through the watch: repool trusts the allocator.
        let mut stale_x = x.clone();
        stale_x.ingress.clear();
        // The second pool goes away; a new one comes.
        let mut b = a.repool(
            pools(&["198.18.1.0/24", "fd00:d::/112", "198.18.3.0/30"]),
            &[stale_x, y.clone()],
        );
        assert_eq!(b.ensure(&x).ips, x.ingress, "x keeps both addresses");
        assert_eq!(b.owner(ip("198.18.2.7")), None);
        assert_eq!(
            b.ensure(&y).ips,
            [ip("198.18.1.2")],
            "y moves to the first pool with room"
        );
        // No pool of the family left: no address, and the error says what to add.
        let mut c = b.repool(pools(&["fd00:d::/112"]), &[x.clone(), y.clone()]);
        let got = c.ensure(&y);
        assert!(got.ips.is_empty());
        assert_eq!(
            got.errors[0].to_string(),
            "service default/y: no IPv4 LB pool is configured; add a LoadBalancerIPPool with an IPv4 block (or an --lb-pool), or make the Service single-stack"
        );
        assert_eq!(c.ensure(&x).ips, [ip("fd00:d::")]);
    }

    #[test]
    fn reads_the_service_object() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                          "annotations": {"meshless.dev/lb-ip": "198.18.1.9"}},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4", "IPv6"],
                     "loadBalancerIP": "198.18.1.8"},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.18.1.9"}, {"hostname": "x"}]}}
        }))
        .unwrap();
        let v = LbService::from_service(&svc);
        assert!(v.wants_lb);
        assert_eq!(v.key.to_string(), "shop/web");
        assert_eq!(v.families, [Family::V4, Family::V6]);
        assert_eq!(
            v.requested,
            Some(("annotation meshless.dev/lb-ip", "198.18.1.9".into()))
        );
        assert_eq!(v.ingress, [ip("198.18.1.9")]);
        let other: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "d"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/other"}
        }))
        .unwrap();
        assert!(!LbService::from_service(&other).wants_lb);
    }
}
