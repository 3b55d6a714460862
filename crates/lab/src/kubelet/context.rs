//! What every part of the kubelet needs: the API client and this node's
//! names, addresses and directories, all derived from the lab plan.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use meshless_lab::plan;

/// Pod lifecycle tuning. The lab wants fast feedback, so these are shorter
/// than a production kubelet's.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a pod worker checks its processes and recomputes its status.
pub const POD_TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// First restart delay after a container exits; doubles per restart.
/// (kubelet: 10 s doubling to 5 min; the lab uses 1 s doubling to 30 s.)
pub const RESTART_BACKOFF_BASE: std::time::Duration = std::time::Duration::from_secs(1);
pub const RESTART_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Upper bound on terminationGracePeriodSeconds, so a test never waits
/// minutes for a process that ignores SIGTERM.
pub const MAX_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
/// Reported as status.nodeInfo.kubeletVersion.
pub const KUBELET_VERSION: &str = "v1.36.3-meshless-lab";

pub struct Ctx {
    pub client: kube::Client,
    pub node: String,
    pub lab: String,
    pub index: usize,
    pub cni_bin: PathBuf,
    pub labtool: PathBuf,
    pub state_dir: PathBuf,
    /// `<cgroup v2>/meshless-lab/<lab>/n<i>`: pod cgroups go below it.
    pub node_cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// MTU of pod devices: 1450 under the VXLAN overlay.
    pub mtu: u32,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("node", &self.node)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

fn cgroup_v2_root() -> anyhow::Result<PathBuf> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = Path::new(candidate);
        if p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists() {
            return Ok(p.to_path_buf());
        }
    }
    anyhow::bail!("cgroup v2 is not mounted (looked at /sys/fs/cgroup and /sys/fs/cgroup/unified)")
}

impl Ctx {
    pub fn new(
        client: kube::Client,
        node: String,
        lab: String,
        index: usize,
        cni_bin: PathBuf,
        labtool: PathBuf,
        state_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let node_cgroup = cgroup_v2_root()?
            .join(plan::CGROUP_DIR)
            .join(&lab)
            .join(format!("n{index}"));
        anyhow::ensure!(
            node_cgroup.is_dir(),
            "node cgroup {} does not exist: is lab {lab} up with at least {index} nodes?",
            node_cgroup.display()
        );
        let vxlan = meshless_lab::list()
            .iter()
            .any(|l| l.name == lab && l.routing == "vxlan");
        for d in ["pods", "cni", "endpoints", "logs"] {
            let p = state_dir.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", p.display()))?;
        }
        Ok(Self {
            client,
            node,
            ipv4: plan::node_ipv4(index),
            ipv6: plan::node_ipv6(index),
            lab,
            index,
            cni_bin,
            labtool,
            state_dir,
            node_cgroup,
            mtu: if vxlan { plan::VXLAN_MTU } else { 1500 },
        })
    }

    /// This node's pod CIDRs, IPv4 first (what kubelet's --pod-cidr holds).
    pub fn pod_cidrs(&self) -> Vec<String> {
        let (v4, l4) = plan::pod_cidr_v4(self.index);
        let (v6, l6) = plan::pod_cidr_v6(self.index);
        vec![format!("{v4}/{l4}"), format!("{v6}/{l6}")]
    }
}
