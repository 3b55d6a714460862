//! The programs live in the `meshless-datapath` binary target (src/main.rs),
//! which only builds for the BPF target. This library exists so that
//! crates/agent can name the package as a build dependency and be rebuilt when
//! it or `meshless-common` changes.
#![no_std]
