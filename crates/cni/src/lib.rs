//! meshless-cni: the Meshless CNI plugin (CNI spec 1.0.0, also 0.4.0).
//!
//! ADD gives a container one address per family from the node's pod CIDRs
//! and wires it to the node with a veth pair, routed (no bridge), exactly
//! as the lab wires its pods; then it tells meshless-agent about the new
//! endpoint. DEL takes it all back and is idempotent; CHECK verifies it.
//! The plugin runs in the node's network namespace, as runtimes run it.
//!
//! | file on disk                               | written by        | what                                   |
//! |--------------------------------------------|-------------------|----------------------------------------|
//! | `<stateDir>/<network>.json`                | ADD, DEL          | allocations: container, ifname, device, addresses |
//! | `<stateDir>/<network>.lock`                | ADD, DEL          | `flock`ed while the allocations change |
//! | `<agentEndpointsDir>/<containerId>.json`   | ADD (DEL removes) | the endpoint record for meshless-agent |
//!
//! Library modules are pure where they can be ([`config`], [`mod@env`],
//! [`ipam`], [`wiring`], [`result`]); [`plugin`] does the IO.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod config;
pub mod endpoint;
pub mod env;
pub mod error;
pub mod ipam;
pub mod iproute;
pub mod plugin;
pub mod result;
pub mod wiring;

pub use error::{CniError, Failure};
pub use plugin::run;
