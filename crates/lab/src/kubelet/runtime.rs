//! The "container runtime": a pod sandbox is a network namespace wired by
//! `meshless-cni` plus a cgroup below the node's; containers are processes
//! started inside both.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::context::Ctx;

pub use meshless_lab::plan::kubelet_pod_netns as netns_name;

pub fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Who a pod is, for CNI.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
}

/// Runs the CNI plugin exactly as a container runtime does: CNI_* in the
/// environment, the network configuration on stdin, the result on stdout.
fn cni(ctx: &Ctx, command: &str, pod: &PodRef) -> anyhow::Result<serde_json::Value> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "meshless",
        "type": "meshless-cni",
        "podCIDRs": ctx.pod_cidrs(),
        "mtu": ctx.mtu,
        "stateDir": ctx.state_dir.join("cni"),
        "agentEndpointsDir": ctx.state_dir.join("endpoints"),
    });
    let cni_path = ctx
        .cni_bin
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut child = Command::new(&ctx.cni_bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", netns_path(&pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={};IgnoreUnknown=1",
                pod.namespace, pod.name, pod.uid
            ),
        )
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the CNI plugin {}", ctx.cni_bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "CNI {command} for pod {}/{} failed ({}): {} {}",
        pod.namespace,
        pod.name,
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("CNI {command} printed {stdout:?}"))
}

/// Creates the netns and the cgroup and runs CNI ADD; returns the pod's
/// addresses (IPv4 first, as the CNI result lists them).
pub fn create_sandbox(ctx: &Ctx, pod: &PodRef, cgroup: &Path) -> anyhow::Result<Vec<String>> {
    if !netns_path(&pod.netns).exists() {
        run(Command::new("ip").args(["netns", "add", &pod.netns]))?;
    }
    std::fs::create_dir_all(cgroup)
        .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    // A half-finished earlier attempt may hold addresses: DEL is idempotent.
    cni(ctx, "DEL", pod)?;
    let result = cni(ctx, "ADD", pod)?;
    let mut ips: Vec<String> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next().map(str::to_owned))
        .collect();
    ips.sort_by_key(|ip| ip.contains(':'));
    anyhow::ensure!(!ips.is_empty(), "CNI ADD returned no addresses: {result}");
    Ok(ips)
}

/// Kills what is left in the cgroup, runs CNI DEL, removes netns and cgroup.
/// Safe to repeat.
pub fn destroy_sandbox(ctx: &Ctx, pod: &PodRef, cgroup: &Path) -> anyhow::Result<()> {
    kill_cgroup(cgroup, Duration::from_secs(10))?;
    cni(ctx, "DEL", pod)?;
    if netns_path(&pod.netns).exists() {
        run(Command::new("ip").args(["netns", "del", &pod.netns]))?;
    }
    if cgroup.exists() {
        std::fs::remove_dir(cgroup)
            .with_context(|| format!("removing cgroup {}", cgroup.display()))?;
    }
    Ok(())
}

fn kill_cgroup(cgroup: &Path, timeout: Duration) -> anyhow::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    std::fs::write(cgroup.join("cgroup.kill"), "1")
        .with_context(|| format!("killing cgroup {}", cgroup.display()))?;
    let deadline = Instant::now() + timeout;
    while std::fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "populated 1"))
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "processes in {} did not exit",
            cgroup.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A container's process: our child, or (after a kubelet restart) a pid
/// adopted from the pod record.
#[derive(Debug)]
pub enum Proc {
    Child(Child),
    Adopted { pid: u32, cgroup: PathBuf },
}

impl Proc {
    pub fn pid(&self) -> u32 {
        match self {
            Self::Child(c) => c.id(),
            Self::Adopted { pid, .. } => *pid,
        }
    }

    /// `None` while running; `Some(exit code)` once it has exited (-1 when
    /// the code is unknown: killed by a signal, or an adopted process).
    pub fn exited(&mut self) -> Option<i32> {
        match self {
            Self::Child(c) => match c.try_wait() {
                Ok(None) => None,
                Ok(Some(s)) => Some(s.code().unwrap_or(-1)),
                Err(_) => Some(-1),
            },
            Self::Adopted { pid, cgroup } => {
                let alive = std::fs::read_to_string(cgroup.join("cgroup.procs"))
                    .is_ok_and(|s| s.lines().any(|l| l.trim() == pid.to_string()));
                if alive { None } else { Some(-1) }
            }
        }
    }

    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.pid()) {
            let _ignored = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Starts `program` in the pod's netns and cgroup with `env` only, output
/// appended to `log`.
pub fn spawn(
    netns: &str,
    cgroup: &Path,
    log: &Path,
    program: &crate::image::Program,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let ns_path = netns_path(netns);
    let ns = File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&program.path);
    cmd.args(&program.args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    join_before_exec(&mut cmd, ns.as_raw_fd(), procs.as_raw_fd());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in {netns}", program.path.display()))?;
    drop((ns, procs));
    Ok(child)
}

use meshless_lab::join_before_exec;

#[cfg(test)]
mod tests {
    use super::netns_name;

    #[test]
    fn netns_names_carry_the_lab_prefix_and_stay_short() {
        assert_eq!(
            netns_name("lab1", 2, "default", "web-abc"),
            "ml-lab1-n2-web-abc"
        );
        assert_eq!(netns_name("lab1", 2, "prod", "web"), "ml-lab1-n2-prod-web");
        let long = netns_name("lab1", 2, &"x".repeat(63), &"y".repeat(63));
        assert!(
            long.len() <= 100 && long.starts_with("ml-lab1-n2-"),
            "{long}"
        );
        assert_ne!(
            long,
            netns_name("lab1", 2, &"x".repeat(63), &"z".repeat(63))
        );
    }
}
