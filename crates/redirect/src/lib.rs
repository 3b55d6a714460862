//! Decides which flows go to the node L7 proxy and how (TPROXY or socket redirect), as map entries.
//!
//! Nothing has landed here yet: it arrives with L7 traffic management.
#![forbid(unsafe_code)]
