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
    let totals = std::cell::RefCell::new(Counts::default());
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
            totals
                .borrow_mut()
                .add(cargo_test(Command::new("cargo").args(["test", "--quiet"]))?);
            Ok(())
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
            let counts = cargo_test(
                Command::new("cargo")
                    .args(["test", "--quiet", "--", "--ignored", &format!("{tier}_")])
                    // libtest filters match substrings: keep `privileged_lab_*`
                    // out of the lab tier.
                    .args(if tier == "lab" {
                        &["--skip", "privileged_"][..]
                    } else {
                        &[][..]
                    })
                    .env("MESHLESS_BIN_DIR", util::bin_dir()),
            )?;
            if counts.passed == 0 {
                bail!("the {tier} tier ran no test: a filter or a rename is wrong");
            }
            totals.borrow_mut().add(counts);
            Ok(())
        })?;
    }
    println!("\n=== summary ({} total)", util::elapsed(start));
    for (name, t) in summary.borrow().iter() {
        println!("  {name:<30} {t}");
    }
    let t = totals.borrow();
    println!(
        "  ({} ignored in the unit run are the privileged and lab tiers)",
        t.ignored
    );
    // The plain closing line CI reads.
    println!("tests: {} passed, {} failed", t.passed, t.failed);
    Ok(())
}

/// Totals over cargo test's "test result:" lines.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, o: Self) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }

    /// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
    fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let num = |word: &str| -> u64 {
            rest.split(';')
                .find_map(|part| {
                    part.trim()
                        .trim_start_matches(|c: char| !c.is_ascii_digit())
                        .strip_suffix(word)
                })
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        Some(Self {
            passed: num("passed"),
            failed: num("failed"),
            ignored: num("ignored"),
        })
    }
}

/// Runs a `cargo test` command, passing its output through, and returns the
/// totals of its test binaries. A failing run is an error.
fn cargo_test(cmd: &mut Command) -> anyhow::Result<Counts> {
    use std::io::BufRead as _;
    let shown = util::show(cmd);
    println!("$ {shown}");
    let mut child = cmd
        .current_dir(util::root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting `{shown}`: {e}"))?;
    let mut counts = Counts::default();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(c) = Counts::parse(&line) {
                counts.add(c);
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "`{shown}` failed ({status}): {} passed, {} failed",
            counts.passed,
            counts.failed
        );
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn parses_cargo_test_result_lines() {
        let c = Counts::parse("test result: ok. 12 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s")
            .expect("a result line");
        assert_eq!((c.passed, c.failed, c.ignored), (12, 1, 3));
        assert!(Counts::parse("running 3 tests").is_none());
    }
}
