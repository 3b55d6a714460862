//! Starting `meshless-lab-kubelet` on a lab node (test bed, not product).

use std::path::Path;
use std::process::Command;

use crate::{Lab, LabError, LabProcess};

impl Lab {
    /// Where node `index`'s lab kubelet keeps pod records, CNI state,
    /// endpoint records and container logs.
    pub fn kubelet_state_dir(&self, index: usize) -> std::path::PathBuf {
        self.node_state_dir(index).join("kubelet")
    }

    /// Starts the lab kubelet on node `index` (from 1), in the node's network
    /// namespace and system cgroup: it registers the Node `<lab>-n<index>`
    /// with the API server in `kubeconfig` and runs the pods bound to it,
    /// wiring them with the CNI plugin `cni_bin`.
    pub fn start_kubelet(
        &self,
        index: usize,
        kubelet_bin: &Path,
        cni_bin: &Path,
        kubeconfig: &Path,
    ) -> Result<LabProcess, LabError> {
        if index == 0 || index > self.nodes().len() {
            return Err(LabError::NoSuchNode {
                lab: self.name().to_owned(),
                index,
                nodes: self.nodes().len(),
            });
        }
        let labtool = kubelet_bin.with_file_name("meshless-labtool");
        let mut cmd = Command::new(kubelet_bin);
        cmd.arg("--node")
            .arg(self.node_name(index))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--lab")
            .arg(self.name())
            .arg("--node-index")
            .arg(index.to_string())
            .arg("--cni-bin")
            .arg(cni_bin)
            .arg("--labtool")
            .arg(labtool)
            .arg("--state-dir")
            .arg(self.kubelet_state_dir(index));
        self.spawn_on_host(self.node(index), "kubelet", cmd)
    }
}

/// The Meshless processes of a lab cluster, stopped when dropped.
#[derive(Debug)]
pub struct ClusterProcesses {
    pub kubelets: Vec<LabProcess>,
    pub agents: Vec<LabProcess>,
    pub operator: LabProcess,
}

impl ClusterProcesses {
    /// Leaves every process running after this value is dropped (`lab up`).
    pub fn detach(self) {
        for p in self.kubelets.into_iter().chain(self.agents) {
            let _pid = p.detach();
        }
        let _pid = self.operator.detach();
    }
}

impl Lab {
    /// Makes the lab a Meshless cluster on `cp`, the way a real one runs:
    /// the lab kubelet (with meshless-cni) and meshless-agent on every node —
    /// the agent with only DaemonSet-style flags, its node facts from the
    /// Node object — and one meshless-operator (on node 1) handing out
    /// LoadBalancer addresses from the lab's pool. `bins` holds the built
    /// binaries (target/debug).
    pub fn start_cluster(
        &self,
        cp: &crate::ControlPlane,
        bins: &Path,
    ) -> Result<ClusterProcesses, LabError> {
        if cp
            .kubectl(self, &["get", "namespace", "meshless-system"])
            .is_err()
        {
            cp.kubectl(self, &["create", "namespace", "meshless-system"])?;
        }
        let kubeconfig = cp.kubeconfig();
        let mut kubelets = Vec::new();
        let mut agents = Vec::new();
        for node in 1..=self.nodes().len() {
            kubelets.push(self.start_kubelet(
                node,
                &bins.join("meshless-lab-kubelet"),
                &bins.join("meshless-cni"),
                kubeconfig,
            )?);
            agents.push(self.start_cluster_agent(
                node,
                &bins.join("meshless-agent"),
                kubeconfig,
            )?);
        }
        let mut op = Command::new(bins.join("meshless-operator"));
        op.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--id", "lab-operator", "--lb-pool"])
            .arg(format!(
                "{},{}",
                crate::plan::LB_POOL_V4,
                crate::plan::LB_POOL_V6
            ));
        let operator = self.spawn_on_host(self.node(1), "operator", op)?;
        Ok(ClusterProcesses {
            kubelets,
            agents,
            operator,
        })
    }
}
