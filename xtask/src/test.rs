//! `cargo xtask test`: every check, in tiers (see docs/book/src/contributing/testing.md).
//!
//! | tier        | needs        | what                                           |
//! |-------------|--------------|------------------------------------------------|
//! | lint        | nothing      | cargo fmt --check, clippy -D warnings (host and BPF) |
//! | docs        | mdbook       | mdbook build + mdbook test of docs/book        |
//! | unit        | nothing      | cargo test: pure logic, no kernel, no root     |
//! | privileged  | root         | tests named `privileged_*`: real BPF, netns    |
//! | lab         | root         | tests named `lab_*`: end to end, as a user runs it |
//!
//! With CI=true a tier that cannot run (not root) is a failure, never a skip.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;

use crate::util::{self, run as sh};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Skip `cargo xtask setup` (already done).
    #[arg(long)]
    skip_setup: bool,
    /// Run only these tiers (default: all).
    #[arg(long, value_delimiter = ',', value_parser = ["lint", "docs", "unit", "privileged", "lab"])]
    tier: Vec<String>,
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let want = |t: &str| args.tier.is_empty() || args.tier.iter().any(|x| x == t);
    let summary: std::cell::RefCell<Vec<(String, String)>> = std::cell::RefCell::new(Vec::new());
    if !args.skip_setup {
        if util::is_root() {
            crate::setup::run(&crate::setup::Args::default())?;
        } else {
            // Non-root developers can still lint and run unit tests.
            crate::setup::run(&crate::setup::Args { check: true })?;
        }
    }
    let pin = crate::setup::bpf_toolchain()?;
    let step = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let t = Instant::now();
        println!("\n=== {name}");
        f()?;
        summary
            .borrow_mut()
            .push((name.to_owned(), util::elapsed(t)));
        Ok(())
    };
    if want("lint") {
        step("lint: rustfmt", &mut || {
            sh(Command::new("cargo").args(["fmt", "--all", "--check"]))
        })?;
        step("lint: clippy (host crates)", &mut || {
            sh(Command::new("cargo").args([
                "clippy",
                "--quiet",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        step("lint: clippy (BPF programs)", &mut || {
            sh(Command::new("cargo")
                .arg(format!("+{pin}"))
                .args([
                    "clippy",
                    "--quiet",
                    "-p",
                    "meshless-datapath",
                    "--bins",
                    "--release",
                ])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"]))
        })?;
    }
    if want("docs") {
        step("docs: mdbook build", &mut || {
            sh(Command::new("mdbook").args(["build", "docs/book"]))
        })?;
        step("docs: mdbook test", &mut || {
            sh(Command::new("mdbook").args(["test", "docs/book"]))
        })?;
    }
    if want("unit") {
        step("unit", &mut || {
            sh(Command::new("cargo").args(["test", "--quiet"]))
        })?;
    }
    for tier in ["privileged", "lab"] {
        if !want(tier) {
            continue;
        }
        if !util::is_root() {
            if in_ci() {
                bail!("the {tier} tier needs root and CI=true forbids skipping it");
            }
            println!(
                "\n=== {tier}: SKIPPED (not root; run `sudo -E cargo xtask test` to include it)"
            );
            summary
                .borrow_mut()
                .push((tier.to_owned(), "SKIPPED".to_owned()));
            continue;
        }
        step(tier, &mut || {
            // Leftovers of a crashed earlier run must not collide or pile up.
            for lab in meshless_lab::list()
                .into_iter()
                .filter(meshless_lab::LabInfo::is_stale)
            {
                println!("removing stale lab {}", lab.name);
                meshless_lab::destroy(&lab.name)?;
            }
            sh(Command::new("cargo").args(["build", "--quiet", "--bins"]))?;
            sh(Command::new("cargo")
                .args(["test", "--quiet", "--", "--ignored", &format!("{tier}_")])
                .env("MESHLESS_BIN_DIR", util::bin_dir()))
        })?;
    }
    println!("\n=== summary ({} total)", util::elapsed(start));
    for (name, t) in summary.borrow().iter() {
        println!("  {name:<30} {t}");
    }
    Ok(())
}
