//! The endpoint record meshless-agent reads: one file per container,
//! `<agentEndpointsDir>/<containerId>.json`, written by rename so the agent
//! never reads half of one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CniError;
use crate::ipam::store::write_replace;

/// A container on this node, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub container_id: String,
    /// Kubernetes namespace (`K8S_POD_NAMESPACE`), when the runtime passed it.
    pub namespace: Option<String>,
    /// Pod name (`K8S_POD_NAME`), when the runtime passed it.
    pub pod: Option<String>,
    pub netns: PathBuf,
    pub ifname: String,
    pub host_device: String,
    pub addresses: Vec<IpAddr>,
}

/// `<dir>/<container_id>.json` (container ids are validated to be safe
/// file names).
pub fn path(dir: &Path, container_id: &str) -> PathBuf {
    dir.join(format!("{container_id}.json"))
}

/// Writes the record atomically, creating the directory if needed.
pub fn write(dir: &Path, ep: &Endpoint) -> Result<PathBuf, CniError> {
    std::fs::create_dir_all(dir).map_err(CniError::io("creating endpoints directory", dir))?;
    let path = path(dir, &ep.container_id);
    let tmp = dir.join(format!(".{}.json.tmp", ep.container_id));
    let bytes = serde_json::to_vec_pretty(ep).map_err(|e| CniError::Decode {
        what: "encoding the endpoint record".into(),
        why: e.to_string(),
    })?;
    write_replace(&tmp, &path, &bytes)?;
    Ok(path)
}

/// Removes the record; a missing one is fine (DEL is idempotent).
pub fn remove(dir: &Path, container_id: &str) -> Result<(), CniError> {
    let path = path(dir, container_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::io("removing endpoint record", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove() {
        let dir = std::env::temp_dir().join(format!("meshless-cni-ep-{}", std::process::id()));
        let ep = Endpoint {
            container_id: "c1".into(),
            namespace: Some("default".into()),
            pod: Some("web-0".into()),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            host_device: "ml12345678".into(),
            addresses: vec!["198.18.17.2".parse().expect("ip")],
        };
        let p = write(&dir, &ep).expect("write");
        let text = std::fs::read_to_string(&p).expect("read");
        for key in [
            "containerId",
            "namespace",
            "pod",
            "netns",
            "ifname",
            "hostDevice",
            "addresses",
        ] {
            assert!(
                text.contains(&format!("\"{key}\"")),
                "{key} missing in {text}"
            );
        }
        let back: Endpoint = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, ep);
        remove(&dir, "c1").expect("remove");
        remove(&dir, "c1").expect("remove twice");
        assert!(!p.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
