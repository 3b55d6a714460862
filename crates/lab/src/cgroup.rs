//! cgroup v2 directories of a lab: create, kill everything inside, remove.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{LabError, plan};

/// The cgroup v2 mount: pure v2 at /sys/fs/cgroup, or the hybrid layout's
/// /sys/fs/cgroup/unified.
pub(crate) fn v2_root() -> Result<PathBuf, LabError> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = Path::new(candidate);
        if p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists() {
            return Ok(p.to_path_buf());
        }
    }
    Err(LabError::NoCgroup2)
}

/// `<v2>/meshless-lab/<lab>`.
pub(crate) fn lab_dir(lab: &str) -> Result<PathBuf, LabError> {
    Ok(v2_root()?.join(plan::CGROUP_DIR).join(lab))
}

pub(crate) fn create(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(LabError::io("creating cgroup", path))
}

/// Kills every process in the subtree (cgroup.kill, Linux 5.14+) and waits
/// until the kernel reports it empty.
pub(crate) fn kill_all(path: &Path, timeout: Duration) -> Result<(), LabError> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    std::fs::write(&kill, "1").map_err(LabError::io("writing", &kill))?;
    let events = path.join("cgroup.events");
    let deadline = Instant::now() + timeout;
    loop {
        let populated = std::fs::read_to_string(&events)
            .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false);
        if !populated {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout {
                what: format!("processes in {} to exit", path.display()),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a cgroup directory and everything below it, deepest first.
pub(crate) fn remove_tree(path: &Path) -> Result<(), LabError> {
    if !path.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(LabError::io("reading cgroup", path))?;
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(path).map_err(LabError::io("removing cgroup", path))
}

/// PIDs directly in one cgroup.
pub(crate) fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
