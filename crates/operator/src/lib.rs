//! Cluster-wide operator: CRDs, identity allocation, IPAM and LB-IPAM, Gateway status, the mesh CA.
//!
//! Nothing has landed here yet: the Kubernetes issue brings it.
#![forbid(unsafe_code)]
