//! status.json: what the agent has attached, for the lab, tests and meshctl.

use std::path::PathBuf;

use crate::Config;

/// A pod device with both TC programs attached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachedDevice {
    pub name: String,
    pub ifindex: u32,
}

/// The agent's view of its datapath.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub node: String,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub socket_hooks: Vec<String>,
    pub devices: Vec<AttachedDevice>,
    pub loaded_at_unix: u64,
    /// Service load balancing; absent without a source of services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbStatus>,
    /// This node's addresses, pod CIDRs and zone, and where each came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_facts: Option<crate::node::NodeFacts>,
    /// The north-south path (TC on --external-device) is attached.
    #[serde(default)]
    pub external_attached: bool,
    /// This node's endpoints: CNI records joined with the node's Pods.
    #[serde(default)]
    pub endpoints: Vec<crate::endpoints::LocalEndpoint>,
    /// How many objects of each kind the source holds; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterCounts>,
    /// Changed object sets the source delivered since the agent started
    /// (a watch that resumes after an API server restart adds one).
    #[serde(default)]
    pub source_updates: u64,
    /// Problems with this node's Node object or the CNI endpoint records.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Objects per kind in the agent's view of the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterCounts {
    pub services: usize,
    pub endpoint_slices: usize,
    /// Pods bound to this node.
    pub pods: usize,
    pub nodes: usize,
    pub namespaces: usize,
}

/// Sizes of the load-balancing maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LbCapacity {
    pub services: u32,
    pub backend_slots: u32,
    pub maglev: u32,
    pub backends: u32,
}

/// Load-balancing state as last reconciled.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LbStatus {
    /// Service frontends in the maps.
    pub frontends: usize,
    /// Distinct backends in the maps.
    pub backends: usize,
    /// Increments on every compile: when the Services, EndpointSlices or
    /// this node's facts changed (not on a re-list that changed nothing).
    pub generation: u64,
    /// Problems with the input or the maps, each naming the object.
    pub errors: Vec<String>,
    /// Service updates refused because a map was full, since the agent
    /// started (raise the matching --max-* flag).
    pub map_full_total: u64,
    /// The load-balancing maps' sizes (max_entries).
    pub capacity: LbCapacity,
    /// What the last reconcile wrote.
    pub last_services_written: usize,
    pub last_services_removed: usize,
}

impl Status {
    /// Path of status.json inside a state directory.
    pub fn path(state_dir: &std::path::Path) -> PathBuf {
        state_dir.join("status.json")
    }
}

pub(crate) fn write(config: &Config, status: &Status) -> std::io::Result<()> {
    let Some(dir) = &config.state_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
    std::fs::rename(&tmp, Status::path(dir))
}

pub(crate) fn remove(config: &Config) {
    if let Some(dir) = &config.state_dir {
        let _ignored = std::fs::remove_file(Status::path(dir));
    }
}
