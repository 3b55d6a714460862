//! Service model, Maglev tables, backend selection and affinity, compiled to datapath map entries.
//!
//! Nothing has landed here yet: the service load-balancing issue brings it.
#![forbid(unsafe_code)]
