//! Flow records from the datapath ring buffer: enrichment, filters, the Observer gRPC API and metrics.
//!
//! Nothing has landed here yet: it arrives with observability.
#![forbid(unsafe_code)]
