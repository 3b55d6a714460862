use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// An error that carries the process exit code to use.
#[derive(Debug)]
pub struct ExitCode(pub u8);

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}
impl std::error::Error for ExitCode {}

/// Exit code for "must be root".
pub const EXIT_NOT_ROOT: u8 = 77;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs a command in the workspace root, echoing it; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = show(cmd);
    println!("$ {shown}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its trimmed stdout, or None if it failed to run.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn is_root() -> bool {
    meshless_lab::is_root()
}

/// Fails with a clear message and exit code 77 when not root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if is_root() {
        return Ok(());
    }
    Err(anyhow::Error::new(ExitCode(EXIT_NOT_ROOT)).context(format!(
        "{what} needs root (it installs packages, creates network namespaces and loads BPF); \
         run it as root, e.g. `sudo -E env PATH=$PATH cargo xtask ...`. Nothing was changed."
    )))
}

/// The directory `cargo build` puts binaries in for the dev profile.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("MESHLESS_BIN_DIR").map_or_else(|| root().join("target/debug"), PathBuf::from)
}

/// Builds the binaries the lab runs (agent, labtool) unless told not to.
pub fn build_bins(skip: bool) -> anyhow::Result<PathBuf> {
    if !skip {
        run(Command::new("cargo").args(["build", "--quiet", "--bins"]))?;
    }
    let dir = bin_dir();
    for bin in [
        "meshless-agent",
        "meshless-labtool",
        "meshless-cni",
        "meshless-operator",
        "meshless-lab-kubelet",
    ] {
        if !dir.join(bin).exists() {
            bail!(
                "{} is missing; run `cargo build --bins`",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

pub fn elapsed(start: std::time::Instant) -> String {
    format!("{:.1}s", start.elapsed().as_secs_f64())
}
