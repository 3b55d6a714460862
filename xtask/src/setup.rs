//! `cargo xtask setup`: everything a fresh Debian bookworm machine needs to
//! build Meshless and run every test tier. Each step checks first and only
//! installs what is missing, so a warm run takes a few seconds.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::util::{self, output, run as sh};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Only report what is missing; change nothing (needs no root).
    #[arg(long)]
    pub check: bool,
}

/// Debian packages, and why each is needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "lab namespaces, veths, VXLAN (ip, bridge)"),
    ("iptables", "kube-proxy-style peer rules in benchmarks"),
    ("nftables", "kube-proxy nftables-mode peer in benchmarks"),
    ("conntrack", "inspecting kernel conntrack in tests"),
    ("util-linux", "nsenter, mountpoint"),
    ("procps", "sysctl inside lab namespaces"),
    (
        "openssl",
        "certificates and tokens for the lab's Kubernetes control plane",
    ),
    (
        "curl",
        "HTTP requests in the Kubernetes lab tests and the demo",
    ),
    (
        "llvm-22-dev",
        "bpf-linker links against LLVM 22 (rustc's LLVM)",
    ),
    ("libpolly-22-dev", "bpf-linker's LLVM 22 link dependencies"),
    ("libzstd-dev", "bpf-linker's LLVM 22 link dependencies"),
    ("zlib1g-dev", "bpf-linker's LLVM 22 link dependencies"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const MDBOOK_VERSION: &str = "0.4.52";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The pinned nightly for the eBPF build (one file: bpf/TOOLCHAIN).
pub fn bpf_toolchain() -> anyhow::Result<String> {
    let path = util::root().join("bpf/TOOLCHAIN");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

struct Report {
    rows: Vec<(String, String)>,
    missing: Vec<String>,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl Into<String>) {
        self.rows
            .push((what.to_owned(), format!("ok      {}", detail.into())));
    }
    fn installed(&mut self, what: &str, detail: impl Into<String>) {
        self.rows
            .push((what.to_owned(), format!("INSTALLED {}", detail.into())));
    }
    fn missing(&mut self, what: &str, detail: impl Into<String>) {
        let d = detail.into();
        self.rows.push((what.to_owned(), format!("MISSING {d}")));
        self.missing.push(format!("{what} ({d})"));
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    if !args.check {
        util::require_root("cargo xtask setup")?;
    }
    let mut report = Report {
        rows: Vec::new(),
        missing: Vec::new(),
    };
    type Step = fn(&Args, &mut Report) -> anyhow::Result<()>;
    let steps: [Step; 7] = [
        debian,
        rust_components,
        nightly,
        bpf_linker,
        mdbook,
        bpffs,
        kubernetes,
    ];
    for step in steps {
        let (t, rows) = (Instant::now(), report.rows.len());
        step(args, &mut report)?;
        // How long each install took: what a fresh machine (and CI) pays.
        for (_, state) in report.rows.iter_mut().skip(rows) {
            if state.starts_with("INSTALLED") {
                state.push_str(&format!(" ({})", util::elapsed(t)));
            }
        }
    }
    println!("setup ({}):", util::elapsed(start));
    for (what, state) in &report.rows {
        println!("  {what:<18} {state}");
    }
    if args.check && !report.missing.is_empty() {
        bail!(
            "missing: {}; run `cargo xtask setup` as root",
            report.missing.join(", ")
        );
    }
    Ok(())
}

fn debian(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let names: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(n, _)| *n).collect();
    let query = output(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
            .args(&names),
    )
    .unwrap_or_default();
    let installed: Vec<&str> = query
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !installed.contains(n))
        .collect();
    if missing.is_empty() {
        report.ok("debian packages", format!("{} packages", names.len()));
        return Ok(());
    }
    if args.check {
        report.missing("debian packages", missing.join(" "));
        return Ok(());
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    report.installed("debian packages", missing.join(" "));
    Ok(())
}

fn rust_components(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let have = |c: &str| output(Command::new("cargo").args([c, "--version"])).is_some();
    let missing: Vec<&str> = [("clippy", "clippy"), ("fmt", "rustfmt")]
        .into_iter()
        .filter(|(sub, _)| !have(sub))
        .map(|(_, comp)| comp)
        .collect();
    if missing.is_empty() {
        report.ok("clippy, rustfmt", "stable toolchain");
    } else if args.check {
        report.missing("clippy, rustfmt", missing.join(" "));
    } else {
        sh(Command::new("rustup")
            .args(["component", "add"])
            .args(&missing))?;
        report.installed("clippy, rustfmt", missing.join(" "));
    }
    Ok(())
}

fn nightly(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let pin = bpf_toolchain()?;
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    let has_toolchain = toolchains.lines().any(|l| l.starts_with(&pin));
    let has_src = has_toolchain
        && output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &pin,
        ]))
        .is_some_and(|c| {
            c.lines().any(|l| l.starts_with("rust-src"))
                && c.lines().any(|l| l.starts_with("clippy"))
        });
    if has_src {
        report.ok("eBPF toolchain", format!("{pin} + rust-src, clippy"));
    } else if args.check {
        report.missing("eBPF toolchain", format!("{pin} + rust-src, clippy"));
    } else {
        sh(Command::new("rustup")
            .args([
                "toolchain",
                "install",
                &pin,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ])
            .env("RUSTUP_AUTO_INSTALL", "0"))?;
        report.installed("eBPF toolchain", format!("{pin} + rust-src, clippy"));
    }
    Ok(())
}

fn bpf_linker(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        report.ok("bpf-linker", BPF_LINKER_VERSION);
        return Ok(());
    }
    if args.check {
        report.missing("bpf-linker", BPF_LINKER_VERSION);
        return Ok(());
    }
    // Without LLVM 22's bin dir first on PATH the build fails with
    // "unable to find library -lLLVM".
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    report.installed("bpf-linker", BPF_LINKER_VERSION);
    Ok(())
}

fn mdbook(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let version = output(Command::new("mdbook").arg("--version")).unwrap_or_default();
    if version.contains(MDBOOK_VERSION) {
        report.ok("mdbook", MDBOOK_VERSION);
        return Ok(());
    }
    if args.check {
        report.missing("mdbook", MDBOOK_VERSION);
        return Ok(());
    }
    sh(Command::new("cargo").args(["install", "mdbook", "--locked", "--version", MDBOOK_VERSION]))?;
    report.installed("mdbook", MDBOOK_VERSION);
    Ok(())
}

fn bpffs(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let target = Path::new("/sys/fs/bpf");
    if meshless_maps::is_bpffs(target) {
        report.ok("bpffs", "/sys/fs/bpf");
    } else if args.check {
        report.missing("bpffs", "/sys/fs/bpf not mounted");
    } else {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        report.installed("bpffs", "mounted /sys/fs/bpf");
    }
    Ok(())
}

/// The Kubernetes control plane for the lab, built from the published Go
/// modules by tools/k8s/build.sh (cached: a warm check is five `--version`s).
fn kubernetes(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    use meshless_lab::control_plane::{K8S_VERSION, k8s_bin_dir};
    let bin = k8s_bin_dir();
    let version_ok = |b: &str, flag: &[&str], want: &str| {
        output(Command::new(bin.join(b)).args(flag)).is_some_and(|v| v.contains(want))
    };
    let checks: [(&str, &[&str], &str); 5] = [
        ("kube-apiserver", &["--version"], K8S_VERSION),
        ("kube-controller-manager", &["--version"], K8S_VERSION),
        ("kube-scheduler", &["--version"], K8S_VERSION),
        ("kubectl", &["version", "--client"], K8S_VERSION),
        ("etcd", &["--version"], "etcd Version"),
    ];
    let missing: Vec<&str> = checks
        .iter()
        .filter(|(b, flag, want)| !version_ok(b, flag, want))
        .map(|(b, _, _)| *b)
        .collect();
    let what = format!("kubernetes {K8S_VERSION}");
    if missing.is_empty() {
        report.ok(&what, format!("{}", bin.display()));
    } else if args.check {
        report.missing(&what, missing.join(" "));
    } else {
        if output(Command::new("go").arg("version")).is_none() {
            bail!("building the Kubernetes control plane needs Go (`go` on PATH)");
        }
        sh(Command::new("bash")
            .arg(util::root().join("tools/k8s/build.sh"))
            .args(&missing)
            .env("MESHLESS_K8S_BIN", &bin))?;
        report.installed(&what, missing.join(" "));
    }
    Ok(())
}
