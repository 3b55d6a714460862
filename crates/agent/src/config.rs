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

    /// Where meshless-cni registers this node's endpoints (its
    /// `agentEndpointsDir`; one JSON record per container). The agent
    /// attaches to every host device a record names and joins the records
    /// with the node's Pods.
    #[arg(
        long,
        env = "MESHLESS_ENDPOINTS_DIR",
        default_value = "/run/meshless/endpoints"
    )]
    pub endpoints_dir: PathBuf,

    /// How often to look for new or removed pod devices, in milliseconds.
    /// Short enough that a new pod is covered before its first connection
    /// would matter in tests; cheap (one netlink dump) at any interval.
    #[arg(long, env = "MESHLESS_RESCAN_INTERVAL_MS", default_value_t = 200)]
    pub rescan_interval_ms: u64,

    /// Where to write status.json (attached devices, load time). Read by the
    /// lab and by tests to know when the datapath covers a pod.
    #[arg(long, env = "MESHLESS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Size of the service frontend map. Map sizes are fixed when a node's
    /// maps are first created; changing one later needs the node's pins
    /// removed (a datapath restart).
    #[arg(long, env = "MESHLESS_MAX_SERVICES", default_value_t = meshless_common::capacity::SERVICES)]
    pub max_services: u32,

    /// Size of the backend map (distinct address:port pairs).
    #[arg(long, env = "MESHLESS_MAX_BACKENDS", default_value_t = meshless_common::capacity::BACKENDS)]
    pub max_backends: u32,

    /// Size of the backend-slot map (all sets; weights take one slot each).
    #[arg(long, env = "MESHLESS_MAX_BACKEND_SLOTS", default_value_t = meshless_common::capacity::BACKEND_SLOTS)]
    pub max_backend_slots: u32,

    /// Size of the Maglev map (table size M per Maglev service).
    #[arg(long, env = "MESHLESS_MAX_MAGLEV_ENTRIES", default_value_t = meshless_common::capacity::MAGLEV)]
    pub max_maglev_entries: u32,

    /// Size of the north-south conntrack map (two entries per flow; LRU).
    #[arg(long, env = "MESHLESS_MAX_CONNTRACK", default_value_t = meshless_common::capacity::CT4)]
    pub max_conntrack: u32,

    /// On SIGTERM/SIGINT, detach every program (remove the link pins) instead
    /// of leaving the datapath to the next agent. For uninstalling a node;
    /// never for upgrades, where it would drop service translation until the
    /// new agent is up.
    #[arg(long, env = "MESHLESS_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,

    /// Serve /healthz, /readyz and /status on this address (in the node's
    /// network namespace), for the DaemonSet's probes.
    #[arg(long, env = "MESHLESS_HEALTH_ADDR")]
    pub health_addr: Option<std::net::SocketAddr>,

    /// Watch the Kubernetes API with this kubeconfig (use --in-cluster
    /// inside a pod): Services, EndpointSlices, Nodes, Namespaces and this
    /// node's Pods.
    #[arg(long, env = "MESHLESS_KUBECONFIG", conflicts_with_all = ["manifests", "in_cluster"])]
    pub kubeconfig: Option<PathBuf>,

    /// Use the service account of the pod the agent runs in.
    #[arg(long, env = "MESHLESS_IN_CLUSTER", conflicts_with = "manifests")]
    pub in_cluster: bool,

    /// Read Services, EndpointSlices, Pods, Nodes and Namespaces from the
    /// Kubernetes manifests (*.yaml, *.yml, *.json; multi-document) in this
    /// directory, and follow changes to it (standalone nodes, benchmarks).
    /// Without it, --kubeconfig or --in-cluster, no service is load balanced.
    #[arg(long, env = "MESHLESS_MANIFESTS")]
    pub manifests: Option<PathBuf>,

    /// This node's addresses, for NodePort frontends and as the SNAT source
    /// (repeat or comma-separate). Default: the InternalIPs (else
    /// ExternalIPs) of this node's Node object.
    #[arg(long = "node-ip", env = "MESHLESS_NODE_IPS", value_delimiter = ',')]
    pub node_ips: Vec<std::net::IpAddr>,

    /// The node's external device: NodePort, LoadBalancer and externalIPs
    /// traffic is translated on its ingress (TC). Without it only pods'
    /// own connections are load balanced (socket hooks).
    #[arg(long, env = "MESHLESS_EXTERNAL_DEVICE")]
    pub external_device: Option<String>,

    /// This node's pod CIDRs (repeat or comma-separate): north-south traffic
    /// to a backend outside them is SNATed to the node address. Default:
    /// spec.podCIDRs of this node's Node object.
    #[arg(long = "pod-cidr", env = "MESHLESS_POD_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub pod_cidrs: Vec<(std::net::IpAddr, u8)>,

    /// How north-south traffic reaches a backend on another node: snat (the
    /// backend answers through this node) or dsr (direct server return: the
    /// service address travels in an IPv4 option and the backend's node
    /// answers the client itself; every node must run the agent).
    #[arg(long, env = "MESHLESS_LB_MODE", default_value = "snat", value_parser = ["snat", "dsr"])]
    pub lb_mode: String,

    /// This node's zone, for PreferClose. Default: the
    /// topology.kubernetes.io/zone label of this node's Node object.
    #[arg(long, env = "MESHLESS_ZONE")]
    pub zone: Option<String>,

    /// Backend selection for services without a meshless.dev/lb-algorithm
    /// annotation: random (like kube-proxy) or maglev (consistent hashing).
    #[arg(long, env = "MESHLESS_LB_ALGORITHM", default_value = "random", value_parser = ["random", "maglev"])]
    pub lb_algorithm: String,

    /// Maglev table size M for services that do not set
    /// meshless.dev/maglev-table-size; must be prime, and > 100 x backends
    /// keeps each backend's share within about 1%.
    #[arg(long, env = "MESHLESS_MAGLEV_TABLE_SIZE", default_value_t = meshless_common::lb::MAGLEV_DEFAULT_SIZE)]
    pub maglev_table_size: u32,
}

/// `198.18.17.0/24` or `fd00:b:1::/64`.
fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| {
        format!("{s:?} is not a CIDR (expected ADDRESS/PREFIX, e.g. 198.18.17.0/24)")
    })?;
    let addr: std::net::IpAddr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let len: u8 = len
        .parse()
        .map_err(|e| format!("{s:?}: prefix length: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{s:?}: prefix length {len} is longer than {max}"));
    }
    Ok((addr, len))
}

impl Config {
    /// Checks what clap cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if !meshless_lb::is_prime(self.maglev_table_size) {
            return Err(format!(
                "--maglev-table-size {} is not prime; use a prime such as 16381 (the default) or 65521",
                self.maglev_table_size
            ));
        }
        for (flag, v) in [
            ("--max-services", self.max_services),
            ("--max-backends", self.max_backends),
            ("--max-backend-slots", self.max_backend_slots),
            ("--max-maglev-entries", self.max_maglev_entries),
            ("--max-conntrack", self.max_conntrack),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        let node_object = self.kubeconfig.is_some() || self.in_cluster || self.manifests.is_some();
        if self.external_device.is_some()
            && !node_object
            && !self.node_ips.iter().any(std::net::IpAddr::is_ipv4)
        {
            return Err("--external-device needs an IPv4 node address, the SNAT source for north-south traffic: pass --node-ip, or a source (--kubeconfig, --in-cluster, --manifests) with this node's Node object".into());
        }
        Ok(())
    }

    /// Compile options derived from the flags.
    pub fn lb_options(&self) -> meshless_lb::CompileOptions {
        meshless_lb::CompileOptions {
            default_algorithm: if self.lb_algorithm == "maglev" {
                meshless_lb::Algorithm::Maglev
            } else {
                meshless_lb::Algorithm::Random
            },
            default_maglev_size: self.maglev_table_size,
        }
    }

    /// `<bpffs-root>/<node>`.
    pub fn pin_dir(&self) -> PathBuf {
        meshless_maps::node_pin_dir(&self.bpffs_root, &self.node)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Config;

    /// The required flags (`--node n --cgroup /x`) plus `extra`.
    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut args = vec!["meshless-agent", "--node", "n", "--cgroup", "/x"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    }

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
    fn maglev_size_must_be_prime() {
        let c = parse(&["--maglev-table-size", "16000"]).expect("parses");
        let err = c.validate().expect_err("16000 is not prime");
        assert!(err.contains("not prime") && err.contains("16381"), "{err}");
        let c = parse(&["--node-ip", "198.18.0.11,fd00:a::11"]).expect("parses");
        assert!(c.validate().is_ok());
        assert_eq!(c.node_ips.len(), 2);
    }

    #[test]
    fn pod_cidrs_parse_and_bad_ones_say_why() {
        let c = parse(&["--pod-cidr", "198.18.17.0/24,fd00:b:1::/64"]).expect("parses");
        assert_eq!(c.pod_cidrs.len(), 2);
        let err = parse(&["--pod-cidr", "198.18.17.0/33"]).expect_err("/33");
        assert!(err.to_string().contains("longer than 32"), "{err}");
        let c = parse(&["--external-device", "eth0"]).expect("parses");
        assert!(
            c.validate()
                .expect_err("needs a node IP")
                .contains("--node-ip")
        );
        let c = parse(&["--external-device", "eth0", "--in-cluster"]).expect("parses");
        assert!(
            c.validate().is_ok(),
            "the Node object will give the address"
        );
    }

    #[test]
    fn node_is_required() {
        let err = Config::try_parse_from(["meshless-agent", "--cgroup", "/x"])
            .expect_err("missing --node");
        assert!(err.to_string().contains("--node"), "{err}");
    }
}
