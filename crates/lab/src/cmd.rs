//! Running the real tools (iproute2, bridge, sysctl) with errors that show
//! the command line and what it printed.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::LabError;

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, returning stdout; a non-zero exit is an error with stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: describe(cmd),
            stderr: format!("could not start: {e} (is iproute2 installed? `cargo xtask setup`)"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: describe(cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip [-n NETNS] ARGS...`
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, LabError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run(cmd.args(args))
}

/// `ip -n NETNS -batch -` with one command per line: one process for many
/// changes. The error names the failing line.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<(), LabError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command {
            command: format!("ip -n {netns} -batch -"),
            stderr: e.to_string(),
        })?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| LabError::Command {
                command: format!("ip -n {netns} -batch -"),
                stderr: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| LabError::Command {
        command: format!("ip -n {netns} -batch -"),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!(
                "ip -n {netns} -batch - <<{}",
                script.trim_end().replace('\n', "; ")
            ),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Sets sysctls inside a network namespace (`/proc/sys/net` is per netns).
pub(crate) fn sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<(), LabError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-q", "-w"]);
    for (k, v) in settings {
        cmd.arg(format!("{k}={v}"));
    }
    run(&mut cmd).map(drop)
}

/// `bridge -n NETNS ARGS...` (VXLAN forwarding entries).
pub(crate) fn bridge(netns: &str, args: &[&str]) -> Result<(), LabError> {
    run(Command::new("bridge").args(["-n", netns]).args(args)).map(drop)
}

/// The ifindex of `device` in `netns`.
pub(crate) fn ifindex(netns: &str, device: &str) -> Result<u32, LabError> {
    let out = ip(Some(netns), &["-j", "link", "show", "dev", device])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| LabError::Command {
        command: format!("ip -n {netns} -j link show dev {device}"),
        stderr: format!("unparseable output: {e}"),
    })?;
    v.get(0)
        .and_then(|l| l.get("ifindex"))
        .and_then(serde_json::Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| LabError::Command {
            command: format!("ip -n {netns} -j link show dev {device}"),
            stderr: "no ifindex in output".into(),
        })
}

/// Names under /run/netns (what `ip netns list` shows).
pub(crate) fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
