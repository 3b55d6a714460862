//! Processes started inside a lab host or pod: in its network namespace and
//! its cgroup, with output in the lab's log directory.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::LabError;

/// A running process in the lab. Dropping it stops it (SIGTERM, then SIGKILL
/// after two seconds) unless [`LabProcess::detach`] was called.
#[derive(Debug)]
pub struct LabProcess {
    child: Option<Child>,
    pid: u32,
    label: String,
    log: PathBuf,
}

/// Writes `n` in decimal into `buf` without allocating (usable after fork).
fn fmt_u32(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

pub(crate) fn spawn(
    label: &str,
    netns: &str,
    cgroup: &Path,
    log: PathBuf,
    mut cmd: Command,
) -> Result<LabProcess, LabError> {
    let ns_path = PathBuf::from("/run/netns").join(netns);
    let ns = File::open(&ns_path).map_err(LabError::io("opening netns", &ns_path))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(LabError::io("opening", &procs_path))?;
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(LabError::io("creating", parent))?;
    }
    let out = File::create(&log).map_err(LabError::io("creating log", &log))?;
    let err = out
        .try_clone()
        .map_err(LabError::io("creating log", &log))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_raw_fd();
    join_before_exec(&mut cmd, ns_fd, procs_fd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().map_err(|e| LabError::Command {
        command: program,
        stderr: format!("could not start in {netns}: {e}"),
    })?;
    drop((ns, procs));
    Ok(LabProcess {
        pid: child.id(),
        child: Some(child),
        label: label.to_owned(),
        log,
    })
}

/// Makes the child join the cgroup (`procs_fd` = an open `cgroup.procs`) and
/// the network namespace (`ns_fd` = an open `/run/netns/<name>`) between fork
/// and exec. Both descriptors must stay open until the child is spawned.
/// Shared by the lab's own processes and the lab kubelet's containers.
#[allow(
    unsafe_code,
    reason = "pre_exec is unsafe: the closure runs between fork and exec"
)]
pub fn join_before_exec(
    cmd: &mut Command,
    ns_fd: std::os::fd::RawFd,
    procs_fd: std::os::fd::RawFd,
) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (getpid, write, setns) on descriptors that the
    // caller keeps open until the child has been spawned; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 10];
            let pid = u32::try_from(libc::getpid()).unwrap_or(0);
            let digits = fmt_u32(pid, &mut buf);
            if libc::write(procs_fd, digits.as_ptr().cast(), digits.len()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl LabProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) -> Result<(), LabError> {
        let pid = i32::try_from(self.pid).map_err(|_| LabError::Spec("pid out of range".into()))?;
        kill(Pid::from_raw(pid), signal).map_err(|e| LabError::Command {
            command: format!("kill -{signal} {} ({})", self.pid, self.label),
            stderr: e.to_string(),
        })
    }

    /// Waits for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, LabError> {
        let deadline = Instant::now() + timeout;
        let Some(child) = &mut self.child else {
            return Err(LabError::Spec(format!("{} is detached", self.label)));
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("{} (pid {}) to exit", self.label, self.pid),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, LabError> {
        if !self.is_running() {
            return self.wait_timeout(Duration::ZERO);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_timeout(grace) {
            Ok(status) => Ok(status),
            Err(_) => {
                self.signal(Signal::SIGKILL)?;
                self.wait_timeout(Duration::from_secs(5))
            }
        }
    }

    /// Waits for exit and returns the log, failing if it exited non-zero.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<String, LabError> {
        let status = self.wait_timeout(timeout)?;
        let log = self.log();
        if status.success() {
            Ok(log)
        } else {
            Err(LabError::Command {
                command: self.label.clone(),
                stderr: format!("exited with {status}; output:\n{log}"),
            })
        }
    }

    /// Leaves the process running after this handle is dropped (it still
    /// dies with the lab: `destroy` kills the lab's cgroup).
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.pid
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ignored = self.stop(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_pids() {
        let mut buf = [0u8; 10];
        assert_eq!(super::fmt_u32(0, &mut buf), b"0");
        assert_eq!(super::fmt_u32(4_294_967_295, &mut buf), b"4294967295");
        assert_eq!(super::fmt_u32(31337, &mut buf), b"31337");
    }
}
