//! What the kubelet knows about each pod it runs, on disk, so a restarted
//! kubelet adopts running pods instead of recreating them:
//! `<state-dir>/pods/<uid>.json`, written (by rename) after every change to
//! the sandbox or a container process.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::context::Ctx;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    /// The running process, if any.
    pub pid: Option<u32>,
    pub restart_count: i32,
    /// RFC 3339 start time of the running process.
    pub started_at: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// Pod addresses from CNI ADD, IPv4 first.
    pub ips: Vec<String>,
    pub containers: BTreeMap<String, ContainerRecord>,
}

fn path(ctx: &Ctx, uid: &str) -> PathBuf {
    ctx.state_dir.join("pods").join(format!("{uid}.json"))
}

pub fn load(ctx: &Ctx, uid: &str) -> Option<PodRecord> {
    let bytes = std::fs::read(path(ctx, uid)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn save(ctx: &Ctx, rec: &PodRecord) -> anyhow::Result<()> {
    let p = path(ctx, &rec.uid);
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

pub fn remove(ctx: &Ctx, uid: &str) {
    let _ignored = std::fs::remove_file(path(ctx, uid));
}

/// Every pod record on disk.
pub fn all(ctx: &Ctx) -> Vec<PodRecord> {
    std::fs::read_dir(ctx.state_dir.join("pods"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}
