//! The load-balancing compiler: Kubernetes Services and EndpointSlices in,
//! the frontends and backend sets the eBPF datapath serves out.
//!
//! [`compile`] is a pure function (no IO, no clock, no randomness): for the
//! same objects and [`NodeContext`] it returns the same [`Compiled`] on every
//! run, which the agent diffs against the maps it programmed before. It
//! follows kube-proxy's semantics (cluster IPs, NodePorts, load-balancer and
//! external IPs, traffic policies, terminating endpoints, session affinity)
//! and adds per-backend weights and Maglev through `meshless.dev/*`
//! annotations. Bad input in one Service is reported in
//! [`Compiled::errors`] and never affects another Service.
#![forbid(unsafe_code)]

mod annotations;
mod compile;
mod error;
pub mod maglev;
mod model;
mod weights;

pub use annotations::{
    BACKEND_WEIGHTS, DEFAULT_AFFINITY_TIMEOUT_S, DEFAULT_WEIGHT, LB_ALGORITHM, MAGLEV_TABLE_SIZE,
    MAX_AFFINITY_TIMEOUT_S, MAX_MAGLEV_TABLE_SIZE, MAX_WEIGHT,
};
pub use compile::compile;
pub use error::CompileError;
pub use maglev::{is_prime, maglev_table};
pub use model::{
    Algorithm, CompileOptions, Compiled, DesiredService, FrontendKind, NodeContext, ServiceRef,
};
