//! `cargo xtask bench <name> [--quick]`: benchmarks. They print a table and
//! write `target/bench/<name>.json`; they never fail for being slow, only
//! when a measurement could not be made (see docs/book/src/tasks/).
//!
//! A new bench is a module below `bench/` with an `Args` and a `run`, and a
//! variant in [`Cmd`]; the helpers here (statistics, report, metadata) are
//! shared.

mod kubeproxy;
mod lb;
mod manifests;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Service load balancing: connection latency to the last of N services
    /// and single-service update time, Meshless vs kube-proxy's iptables
    /// and nftables layouts vs no proxy at all.
    Lb(lb::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Lb(a) => lb::run(&a),
    }
}

/// Median of `xs` (mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        f64::midpoint(v[mid - 1], v[mid])
    } else {
        v[mid]
    })
}

/// Nearest-rank percentile `p` (0-100] of `xs`.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

/// Where `<name>.json` goes: `target/bench/` under the workspace root.
pub fn report_path(name: &str) -> PathBuf {
    util::root()
        .join("target/bench")
        .join(format!("{name}.json"))
}

/// Writes the report (pretty JSON) and returns its path.
pub fn write_report(name: &str, report: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let path = report_path(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Facts about the machine every report carries: numbers from different
/// machines or kernels are not comparable.
pub fn machine() -> serde_json::Value {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "date": util::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        "cpus": std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1),
        "cpu_model": cpu_model,
        // Other work on the machine shows up in every path's tail latency.
        "loadavg_end": read("/proc/loadavg"),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }
}
