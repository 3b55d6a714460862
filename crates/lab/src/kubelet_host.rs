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
