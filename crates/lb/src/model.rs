//! What the compiler takes besides the cluster objects, and what it produces.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use meshless_common::{Backend, ServiceKey};

use crate::error::CompileError;

/// The node the agent runs on: which NodePort frontends exist here and which
/// endpoints count as local.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `metadata.name` of the Node, compared with `endpoints[].nodeName`.
    pub node_name: String,
    /// Addresses NodePort frontends listen on (one frontend per address of the
    /// Service port's family).
    pub node_ips: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone` of the Node, if known; used by
    /// `trafficDistribution: PreferClose`.
    pub zone: Option<String>,
}

/// Cluster-wide choices an operator makes once; annotations on a Service
/// override them for that Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// Algorithm for Services without `meshless.dev/lb-algorithm`.
    pub default_algorithm: Algorithm,
    /// Maglev table size M for Services without `meshless.dev/maglev-table-size`.
    /// Should be prime (see [`crate::maglev`]).
    pub default_maglev_size: u32,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            // Random matches what kube-proxy users get today.
            default_algorithm: Algorithm::Random,
            default_maglev_size: meshless_common::lb::MAGLEV_DEFAULT_SIZE,
        }
    }
}

/// How the datapath picks a backend for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// A random slot of the weighted slot list.
    #[default]
    Random,
    /// A hash of the connection into the Maglev table: every node picks the
    /// same backend for the same flow, and few flows move when backends change.
    Maglev,
}

/// One port of one Service: what a frontend belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name`; empty for the single unnamed port a Service may have.
    pub port_name: String,
}

impl fmt::Display for ServiceRef {
    /// `namespace/name:port`, or `namespace/name` for an unnamed port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// Which Service field a frontend comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// `spec.clusterIPs` (or `spec.clusterIP`) and `spec.ports[].port`.
    ClusterIp,
    /// A node address and `spec.ports[].nodePort`.
    NodePort,
    /// `status.loadBalancer.ingress[].ip` and `spec.ports[].port`.
    LoadBalancer,
    /// `spec.externalIPs` and `spec.ports[].port`.
    ExternalIp,
}

/// Everything the datapath needs for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub service: ServiceRef,
    pub kind: FrontendKind,
    /// Distinct backends, sorted; the same set on every node for the same input.
    pub backends: Vec<Backend>,
    /// Indexes into `backends`, each repeated by its weight; at most
    /// [`meshless_common::lb::MAX_SLOTS_PER_SET`] long. Empty means no usable
    /// backend: the datapath refuses the connection.
    pub slots: Vec<u32>,
    /// With Maglev, the lookup table: indexes into `backends`, `maglev_size`
    /// long (empty when there is no backend).
    pub maglev: Option<Vec<u32>>,
    /// `meshless_common::lb::FLAG_*`.
    pub flags: u32,
    /// Maglev table size M; 0 unless Maglev.
    pub maglev_size: u32,
    /// `sessionAffinity: ClientIP` timeout; 0 without affinity.
    pub affinity_timeout_s: u32,
}

/// The result of one compilation: what to program, and what was wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// One entry per frontend (address, port, protocol).
    pub services: BTreeMap<ServiceKey, DesiredService>,
    /// Problems found; each one affected only the object (or part) it names.
    pub errors: Vec<CompileError>,
}
