//! The per-node L7 proxy (hyper, tokio, rustls), configured only over xDS.
//!
//! Nothing has landed here yet: it arrives with L7 traffic management.
#![forbid(unsafe_code)]
