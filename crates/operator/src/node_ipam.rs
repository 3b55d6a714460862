//! Node IPAM: one pod CIDR per family for every Node that has none, carved
//! from the cluster CIDRs. Pure: the controller rebuilds it from the Nodes
//! it lists and patches what it answers into `spec.podCIDR(s)`.
//!
//! A Node that already has a pod CIDR keeps it (Kubernetes makes the field
//! immutable once set; we never try), and its subnets count as used.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Node;

use crate::cidr::{Cidr, Family};

/// Why a Node did not get a pod CIDR.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NodeIpamError {
    #[error(
        "node CIDR size /{mask} does not fit cluster CIDR {cluster}: it must be between /{} and /{}",
        cluster.prefix_len(), cluster.family().bits()
    )]
    MaskSize { cluster: Cidr, mask: u8 },
    #[error("two cluster CIDRs of one family ({0} and {1}); give at most one IPv4 and one IPv6")]
    DuplicateFamily(Cidr, Cidr),
    #[error(
        "node {node}: cluster CIDR {cluster} has no free /{mask} left; widen --cluster-cidr or delete unused Nodes"
    )]
    Exhausted {
        node: String,
        cluster: Cidr,
        mask: u8,
    },
}

/// Subnets of one cluster CIDR.
#[derive(Clone, Debug)]
pub struct SubnetAllocator {
    cluster: Cidr,
    mask: u8,
    used: BTreeSet<u128>,
}

impl SubnetAllocator {
    pub fn new(cluster: Cidr, mask: u8) -> Result<Self, NodeIpamError> {
        if mask < cluster.prefix_len() || mask > cluster.family().bits() {
            return Err(NodeIpamError::MaskSize { cluster, mask });
        }
        Ok(Self {
            cluster,
            mask,
            used: BTreeSet::new(),
        })
    }

    pub fn family(&self) -> Family {
        self.cluster.family()
    }

    /// Marks every subnet that `cidr` overlaps as used (a node may carry a
    /// CIDR of another size, set by hand or by an earlier configuration).
    pub fn mark_used(&mut self, cidr: &Cidr) {
        if cidr.family() != self.family() {
            return;
        }
        if cidr.prefix_len() >= self.mask {
            if let Some(i) = self.cluster.subnet_index(self.mask, cidr.network()) {
                self.used.insert(i);
            }
            return;
        }
        // Larger than one subnet: every subnet inside it that is in range.
        let (first, last) = cidr.range();
        let (cfirst, clast) = self.cluster.range();
        let (lo, hi) = (first.max(cfirst), last.min(clast));
        if lo > hi {
            return;
        }
        let shift = u32::from(self.family().bits() - self.mask);
        let (a, b) = ((lo - cfirst) >> shift, (hi - cfirst) >> shift);
        // Bounded: a node CIDR this large inside a cluster CIDR is a
        // misconfiguration; cap the work instead of looping for ever.
        for i in a..=b.min(a + (1 << 20)) {
            self.used.insert(i);
        }
    }

    pub fn release(&mut self, cidr: &Cidr) {
        if cidr.prefix_len() == self.mask
            && let Some(i) = self.cluster.subnet_index(self.mask, cidr.network())
        {
            self.used.remove(&i);
        }
    }

    /// The lowest free subnet, marked used.
    pub fn allocate(&mut self) -> Option<Cidr> {
        let mut candidate = 0u128;
        for &i in &self.used {
            if i != candidate {
                break;
            }
            candidate += 1;
        }
        let subnet = self.cluster.subnet(self.mask, candidate)?;
        self.used.insert(candidate);
        Some(subnet)
    }
}

/// What node IPAM needs to know about one Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// `spec.podCIDRs` (or `spec.podCIDR` alone); unparsable entries are kept
    /// out, but the node still counts as having a CIDR.
    pub pod_cidrs: Vec<Cidr>,
    pub has_pod_cidr: bool,
}

impl NodeView {
    pub fn from_node(node: &Node) -> Self {
        let spec = node.spec.as_ref();
        let mut raw: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if raw.is_empty()
            && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
        {
            raw.push(c);
        }
        raw.retain(|c| !c.is_empty());
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            has_pod_cidr: !raw.is_empty(),
            pod_cidrs: raw
                .iter()
                .filter_map(|c| c.parse().ok().or_else(|| parse_truncating(c)))
                .collect(),
        }
    }
}

fn parse_truncating(s: &str) -> Option<Cidr> {
    let (a, l) = s.split_once('/')?;
    Some(Cidr::new_truncating(a.parse().ok()?, l.parse().ok()?))
}

/// Pod CIDR allocation for every configured family.
#[derive(Clone, Debug)]
pub struct NodeIpam {
    families: Vec<SubnetAllocator>,
}

impl NodeIpam {
    /// `clusters` with the node CIDR size of each family.
    pub fn new(clusters: &[Cidr], mask_v4: u8, mask_v6: u8) -> Result<Self, NodeIpamError> {
        let mut families: Vec<SubnetAllocator> = Vec::new();
        for c in clusters {
            if let Some(other) = families.iter().find(|a| a.family() == c.family()) {
                return Err(NodeIpamError::DuplicateFamily(other.cluster, *c));
            }
            let mask = match c.family() {
                Family::V4 => mask_v4,
                Family::V6 => mask_v6,
            };
            families.push(SubnetAllocator::new(*c, mask)?);
        }
        Ok(Self { families })
    }

    /// Marks every existing Node's CIDRs as used.
    pub fn rebuild(&mut self, nodes: &[NodeView]) {
        for a in &mut self.families {
            a.used.clear();
        }
        for n in nodes {
            self.observe(n);
        }
    }

    /// Marks one Node's CIDRs as used.
    pub fn observe(&mut self, node: &NodeView) {
        for c in &node.pod_cidrs {
            for a in &mut self.families {
                a.mark_used(c);
            }
        }
    }

    /// Frees a deleted Node's CIDRs.
    pub fn release(&mut self, node: &NodeView) {
        for c in &node.pod_cidrs {
            for a in &mut self.families {
                if a.family() == c.family() {
                    a.release(c);
                }
            }
        }
    }

    /// The CIDRs (one per family, in configuration order) for a Node with
    /// none; `Ok(None)` for a Node that has one already. All or nothing: on
    /// exhaustion of any family nothing stays allocated.
    pub fn assign(&mut self, node: &NodeView) -> Result<Option<Vec<Cidr>>, NodeIpamError> {
        if node.has_pod_cidr {
            return Ok(None);
        }
        let mut got = Vec::new();
        for i in 0..self.families.len() {
            if let Some(c) = self.families[i].allocate() {
                got.push(c);
            } else {
                let a = &self.families[i];
                let err = NodeIpamError::Exhausted {
                    node: node.name.clone(),
                    cluster: a.cluster,
                    mask: a.mask,
                };
                for (c, a) in got.iter().zip(&mut self.families) {
                    a.release(c);
                }
                return Err(err);
            }
        }
        Ok(Some(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect(s)
    }

    fn node(name: &str, cidrs: &[&str]) -> NodeView {
        NodeView {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|s| c(s)).collect(),
            has_pod_cidr: !cidrs.is_empty(),
        }
    }

    fn ipam() -> NodeIpam {
        NodeIpam::new(&[c("198.18.16.0/20"), c("fd00:b::/48")], 24, 64).unwrap()
    }

    #[test]
    fn dual_stack_next_free_and_existing_kept() {
        let mut n = ipam();
        n.rebuild(&[node("old", &["198.18.16.0/24", "fd00:b::/64"])]);
        assert_eq!(
            n.assign(&node("old", &["198.18.16.0/24", "fd00:b::/64"])),
            Ok(None)
        );
        assert_eq!(
            n.assign(&node("a", &[])),
            Ok(Some(vec![c("198.18.17.0/24"), c("fd00:b:0:1::/64")]))
        );
        assert_eq!(
            n.assign(&node("b", &[])),
            Ok(Some(vec![c("198.18.18.0/24"), c("fd00:b:0:2::/64")]))
        );
        // A deleted node's CIDRs are reused, lowest first.
        n.release(&node("a", &["198.18.17.0/24", "fd00:b:0:1::/64"]));
        assert_eq!(
            n.assign(&node("c", &[])),
            Ok(Some(vec![c("198.18.17.0/24"), c("fd00:b:0:1::/64")]))
        );
    }

    #[test]
    fn exhaustion_is_all_or_nothing() {
        let mut n = NodeIpam::new(&[c("fd00:b::/48"), c("198.18.16.0/23")], 24, 64).unwrap();
        assert!(n.assign(&node("a", &[])).unwrap().is_some());
        assert!(n.assign(&node("b", &[])).unwrap().is_some());
        let err = n.assign(&node("c", &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node c: cluster CIDR 198.18.16.0/23 has no free /24 left; widen --cluster-cidr or delete unused Nodes"
        );
        // The IPv6 subnet taken for c before the failure was given back.
        n.release(&node("a", &["198.18.16.0/24", "fd00:b::/64"]));
        assert_eq!(
            n.assign(&node("d", &[])),
            Ok(Some(vec![c("fd00:b::/64"), c("198.18.16.0/24")]))
        );
    }

    #[test]
    fn rebuild_counts_odd_sizes_and_foreign_ranges() {
        let mut n = ipam();
        n.rebuild(&[
            // A /23 covers two /24s; a /26 sits in one.
            node("big", &["198.18.16.0/23"]),
            node("small", &["198.18.18.64/26"]),
            // Outside the cluster CIDR: ignored.
            node("foreign", &["10.0.0.0/24"]),
        ]);
        assert_eq!(
            n.assign(&node("x", &[])).unwrap().unwrap()[0],
            c("198.18.19.0/24")
        );
    }

    #[test]
    fn config_errors() {
        assert!(matches!(
            NodeIpam::new(&[c("198.18.16.0/20")], 16, 64),
            Err(NodeIpamError::MaskSize { .. })
        ));
        assert!(matches!(
            NodeIpam::new(&[c("198.18.16.0/20"), c("10.0.0.0/8")], 24, 64),
            Err(NodeIpamError::DuplicateFamily(..))
        ));
    }

    #[test]
    fn reads_the_node_object() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "198.18.17.0/24"}
        }))
        .unwrap();
        assert_eq!(NodeView::from_node(&n), node("n1", &["198.18.17.0/24"]));
        let n: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap();
        assert!(!NodeView::from_node(&n).has_pod_cidr);
    }
}
