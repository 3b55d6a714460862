//! Envoy v3 xDS server (ADS, SotW and Delta) with per-node snapshots and ACK/NACK tracking.
//!
//! Nothing has landed here yet: it arrives with the node proxy.
#![forbid(unsafe_code)]
