//! `cargo xtask`: the two README commands (`demo`, `test`) and what they
//! stand on (`setup`, `lab`).
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    reason = "xtask is a CLI; stdout is its interface"
)]

mod bench;
mod codegen;
mod demo;
mod lab;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Meshless developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install everything the build and tests need (idempotent; fast when warm).
    Setup(setup::Args),
    /// Bring up, inspect or remove a lab (nodes and pods in network namespaces).
    Lab(lab::Args),
    /// Service load balancing end to end on the lab: standalone nodes first,
    /// then on a real Kubernetes control plane; what the datapath did, checked
    /// against what was sent. Leaves nothing behind.
    Demo(demo::Args),
    /// Every check: fmt, clippy, docs, unit, privileged and lab tiers.
    Test(test::Args),
    /// Benchmarks: print a table, write target/bench/<name>.json.
    Bench(bench::Args),
    /// Run the lab control plane's kubectl against a lab (`-- ARGS`).
    Kubectl(lab::KubectlArgs),
    /// Write generated files (the CRDs in charts/meshless/crds/); `--check`
    /// fails naming each stale one.
    Codegen(codegen::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup(a) => setup::run(&a),
        Cmd::Lab(a) => lab::run(a),
        Cmd::Demo(a) => demo::run(&a),
        Cmd::Test(a) => test::run(&a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Kubectl(a) => lab::kubectl(&a),
        Cmd::Codegen(a) => codegen::run(&a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<util::ExitCode>() {
                Some(code) => std::process::ExitCode::from(code.0),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
