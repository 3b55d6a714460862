//! lab.json: what a lab is made of, written before anything is created so a
//! crash at any point leaves enough behind to clean up.

use std::path::PathBuf;

use crate::{LabError, plan};

/// A pod as recorded in lab.json.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub node: usize,
    pub slot: usize,
}

/// A lab as recorded in lab.json.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabInfo {
    pub name: String,
    pub nodes: usize,
    pub routing: String,
    pub pods: Vec<PodInfo>,
    /// The process whose exit ends the lab; `None` for a lab kept by
    /// `cargo xtask lab up`, which lives until `lab down`.
    pub owner_pid: Option<u32>,
}

impl LabInfo {
    /// True when the lab's owner has exited without tearing it down.
    pub fn is_stale(&self) -> bool {
        self.owner_pid
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    }
}

pub(crate) fn dir(lab: &str) -> PathBuf {
    PathBuf::from(plan::RUN_DIR).join(lab)
}

pub(crate) fn write(info: &LabInfo) -> Result<(), LabError> {
    let d = dir(&info.name);
    std::fs::create_dir_all(&d).map_err(LabError::io("creating", &d))?;
    let tmp = d.join("lab.json.tmp");
    let json = serde_json::to_vec_pretty(info).map_err(|e| LabError::Spec(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(LabError::io("writing", &tmp))?;
    std::fs::rename(&tmp, d.join("lab.json")).map_err(LabError::io("writing", d.join("lab.json")))
}

pub(crate) fn read(lab: &str) -> Option<LabInfo> {
    let bytes = std::fs::read(dir(lab).join("lab.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}
