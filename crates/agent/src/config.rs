use std::path::PathBuf;

/// Agent configuration. Every key can also come from the environment
/// (`MESHLESS_<KEY>`), which is how the DaemonSet will set it.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "meshless-agent",
    version,
    about = "Meshless node agent: owns this node's eBPF datapath"
)]
pub struct Config {
    /// This node's name; maps are pinned under <bpffs-root>/<node>/.
    #[arg(long, env = "MESHLESS_NODE")]
    pub node: String,

    /// cgroup v2 directory whose processes (the node's pods) get the socket
    /// hooks. Must be a cgroup of the node, never the machine's root cgroup.
    #[arg(long, env = "MESHLESS_CGROUP")]
    pub cgroup: PathBuf,

    /// Root of the node pin directories on a mounted bpffs.
    #[arg(long, env = "MESHLESS_BPFFS_ROOT", default_value = meshless_maps::BPFFS_ROOT)]
    pub bpffs_root: PathBuf,

    /// Host-side pod devices are the links whose names start with this
    /// (the CNI plugin names them so).
    #[arg(long, env = "MESHLESS_POD_DEVICE_PREFIX", default_value = "ml")]
    pub pod_device_prefix: String,

    /// How often to look for new or removed pod devices, in milliseconds.
    /// Short enough that a new pod is covered before its first connection
    /// would matter in tests; cheap (one netlink dump) at any interval.
    #[arg(long, env = "MESHLESS_RESCAN_INTERVAL_MS", default_value_t = 200)]
    pub rescan_interval_ms: u64,

    /// Where to write status.json (attached devices, load time). Read by the
    /// lab and by tests to know when the datapath covers a pod.
    #[arg(long, env = "MESHLESS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl Config {
    /// `<bpffs-root>/<node>`.
    pub fn pin_dir(&self) -> PathBuf {
        meshless_maps::node_pin_dir(&self.bpffs_root, &self.node)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Config;

    #[test]
    fn defaults_and_pin_dir() {
        let c = Config::try_parse_from([
            "meshless-agent",
            "--node",
            "n1",
            "--cgroup",
            "/sys/fs/cgroup/unified/x",
        ])
        .expect("minimal flags parse");
        assert_eq!(c.pin_dir(), std::path::Path::new("/sys/fs/bpf/meshless/n1"));
        assert_eq!(c.pod_device_prefix, "ml");
        assert_eq!(c.rescan_interval_ms, 200);
    }

    #[test]
    fn node_is_required() {
        let err = Config::try_parse_from(["meshless-agent", "--cgroup", "/x"])
            .expect_err("missing --node");
        assert!(err.to_string().contains("--node"), "{err}");
    }
}
