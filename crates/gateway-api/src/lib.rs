//! Gateway API, GAMMA, Ingress and annotated Services compiled to a route model and xDS resources.
//!
//! Nothing has landed here yet: it arrives with L7 routing.
#![forbid(unsafe_code)]
