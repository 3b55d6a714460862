//! meshctl: install, upgrade, status, observe, diagnose, connectivity test and migrate.
//!
//! Nothing has landed here yet: commands land with the features they drive.
#![forbid(unsafe_code)]
