//! Identities, NetworkPolicy and MeshPolicy semantics compiled to per-endpoint policy entries and L7 rules.
//!
//! Nothing has landed here yet: it arrives with the policy issue.
#![forbid(unsafe_code)]
