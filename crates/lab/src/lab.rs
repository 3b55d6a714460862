//! Building, using and tearing down a lab.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{bridge, ifindex, ip, ip_batch, list_netns, sysctls};
use crate::state::{self, LabInfo, PodInfo};
use crate::{LabError, LabProcess, cgroup, plan};

/// How pod traffic crosses between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Each node routes other nodes' pod CIDRs via their fabric address.
    #[default]
    Direct,
    /// Pod traffic is encapsulated in VXLAN between the nodes' fabric addresses.
    Vxlan,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Vxlan => "vxlan",
        }
    }
}

impl std::str::FromStr for Routing {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(Self::Direct),
            "vxlan" => Ok(Self::Vxlan),
            other => Err(LabError::Spec(format!(
                "routing {other:?}: use direct or vxlan"
            ))),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    pub routing: Routing,
}

impl LabSpec {
    /// Two nodes, direct routing.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            nodes: 2,
            routing: Routing::Direct,
        }
    }
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }
}

/// A node or the external host: a network namespace on the fabric.
#[derive(Debug, Clone)]
pub struct Host {
    /// `n1`, `n2`, ... or `ext`.
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// cgroup for the host's own processes (agents, external clients).
    pub system_cgroup: PathBuf,
}

/// A pod: a network namespace behind a veth pair in its node.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Node index, from 1.
    pub node: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Host-side device name in the node's namespace.
    pub host_device: String,
    /// Its ifindex in the node's namespace.
    pub host_ifindex: u32,
}

/// What [`destroy`] removed.
#[derive(Debug, Default, Clone)]
pub struct TeardownReport {
    pub removed: Vec<String>,
}

/// A running lab. Dropping it tears it down (also while panicking), unless
/// [`Lab::keep`] handed it over to `cargo xtask lab down`.
#[derive(Debug)]
pub struct Lab {
    info: LabInfo,
    routing: Routing,
    cgroup_root: PathBuf,
    nodes: Vec<Host>,
    external: Host,
    pods: Vec<Pod>,
    keep: bool,
}

/// What exists under a lab's name right now (empty when nothing does).
fn leftovers(lab: &str) -> Vec<String> {
    let mut found = Vec::new();
    for ns in list_netns() {
        if plan::is_netns_of(lab, &ns) {
            found.push(format!("netns {ns}"));
        }
    }
    if state::dir(lab).exists() {
        found.push(format!("state {}", state::dir(lab).display()));
    }
    if let Ok(cg) = cgroup::lab_dir(lab)
        && cg.exists()
    {
        found.push(format!("cgroup {}", cg.display()));
    }
    if let Ok(rd) = std::fs::read_dir(crate::lab::BPFFS_ROOT) {
        for e in rd.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if plan::is_node_of(lab, &n) {
                found.push(format!("bpffs {}", e.path().display()));
            }
        }
    }
    found
}

/// Where the lab's agents serve /healthz, /readyz and /status (inside each
/// node's network namespace).
pub const AGENT_HEALTH_ADDR: &str = "127.0.0.1:9876";

/// Where meshless-agent pins node maps (`/sys/fs/bpf/meshless`).
pub(crate) const BPFFS_ROOT: &str = "/sys/fs/bpf/meshless";

impl Lab {
    /// Builds the fabric, the nodes and the external host. A name that is in
    /// use (even by leftovers of a crashed run) is an error and nothing is
    /// created; a failure half-way removes what was built.
    pub fn create(spec: LabSpec) -> Result<Self, LabError> {
        plan::validate_lab_name(&spec.name)?;
        if spec.nodes == 0 || spec.nodes > plan::MAX_NODES {
            return Err(LabError::Spec(format!(
                "nodes = {}: a lab has 1 to {} nodes",
                spec.nodes,
                plan::MAX_NODES
            )));
        }
        let found = leftovers(&spec.name);
        if !found.is_empty() {
            return Err(LabError::NameTaken {
                name: spec.name,
                found: found.join(", "),
            });
        }
        let cgroup_root = cgroup::lab_dir(&spec.name)?;
        let info = LabInfo {
            name: spec.name.clone(),
            nodes: spec.nodes,
            routing: spec.routing.as_str().to_owned(),
            pods: Vec::new(),
            owner_pid: Some(std::process::id()),
        };
        // Recorded first: from here on `destroy` can find everything.
        state::write(&info)?;
        let host = |name: String, netns: String, ipv4, ipv6| Host {
            system_cgroup: cgroup_root.join("system").join(&name),
            name,
            netns,
            ipv4,
            ipv6,
        };
        let nodes = (1..=spec.nodes)
            .map(|i| {
                host(
                    format!("n{i}"),
                    plan::node_netns(&spec.name, i),
                    plan::node_ipv4(i),
                    plan::node_ipv6(i),
                )
            })
            .collect();
        let external = host(
            "ext".into(),
            plan::external_netns(&spec.name),
            plan::EXTERNAL_IPV4,
            plan::EXTERNAL_IPV6,
        );
        let mut lab = Self {
            info,
            routing: spec.routing,
            cgroup_root,
            nodes,
            external,
            pods: Vec::new(),
            keep: false,
        };
        // On error, Drop removes whatever was built.
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<(), LabError> {
        let name = self.info.name.clone();
        cgroup::create(&self.cgroup_root)?;
        for host in self.nodes.iter().chain(std::iter::once(&self.external)) {
            cgroup::create(&host.system_cgroup)?;
        }
        for i in 1..=self.nodes.len() {
            cgroup::create(&self.node_cgroup(i))?;
        }
        let fabric = plan::fabric_netns(&name);
        ip(None, &["netns", "add", &fabric])?;
        ip_batch(
            &fabric,
            &[
                "link set lo up".into(),
                "link add br0 type bridge stp_state 0".into(),
                "link set br0 up".into(),
            ],
        )?;
        let hosts: Vec<Host> = self
            .nodes
            .iter()
            .chain(std::iter::once(&self.external))
            .cloned()
            .collect();
        for host in &hosts {
            wire_host(&fabric, host)?;
        }
        // The external host reaches LoadBalancer addresses through node n1,
        // as if n1 announced the pool (LB-IPAM and announcements come later).
        ip_batch(
            &self.external.netns,
            &[
                format!(
                    "route add {} via {} dev eth0",
                    plan::LB_POOL_V4,
                    plan::node_ipv4(1)
                ),
                format!(
                    "route add {} via {} dev eth0",
                    plan::LB_POOL_V6,
                    plan::node_ipv6(1)
                ),
            ],
        )?;
        let n = self.nodes.len();
        for i in 1..=n {
            let ns = plan::node_netns(&name, i);
            let mut lines = vec![
                format!("addr add {}/32 dev lo", plan::router_ipv4(i)),
                format!("addr add {}/128 dev lo nodad", plan::router_ipv6(i)),
            ];
            match self.routing {
                Routing::Direct => {
                    for j in (1..=n).filter(|&j| j != i) {
                        let (v4, l4) = plan::pod_cidr_v4(j);
                        let (v6, l6) = plan::pod_cidr_v6(j);
                        lines.push(format!(
                            "route add {v4}/{l4} via {} dev eth0",
                            plan::node_ipv4(j)
                        ));
                        lines.push(format!(
                            "route add {v6}/{l6} via {} dev eth0",
                            plan::node_ipv6(j)
                        ));
                    }
                }
                Routing::Vxlan => {
                    lines.push(format!(
                        "link add vxlan0 type vxlan id {} local {} dev eth0 dstport {} nolearning",
                        plan::VXLAN_ID,
                        plan::node_ipv4(i),
                        plan::VXLAN_PORT
                    ));
                    lines.push(format!(
                        "link set vxlan0 address {} mtu {}",
                        plan::vtep_mac(i),
                        plan::VXLAN_MTU
                    ));
                    lines.push(format!("addr add {}/32 dev vxlan0", plan::vtep_ipv4(i)));
                    lines.push(format!(
                        "addr add {}/128 dev vxlan0 nodad",
                        plan::vtep_ipv6(i)
                    ));
                    lines.push("link set vxlan0 up".into());
                    for j in (1..=n).filter(|&j| j != i) {
                        let (v4, l4) = plan::pod_cidr_v4(j);
                        let (v6, l6) = plan::pod_cidr_v6(j);
                        let mac = plan::vtep_mac(j);
                        lines.push(format!(
                            "neigh add {} lladdr {mac} dev vxlan0 nud permanent",
                            plan::vtep_ipv4(j)
                        ));
                        lines.push(format!(
                            "neigh add {} lladdr {mac} dev vxlan0 nud permanent",
                            plan::vtep_ipv6(j)
                        ));
                        lines.push(format!(
                            "route add {v4}/{l4} via {} dev vxlan0 onlink",
                            plan::vtep_ipv4(j)
                        ));
                        lines.push(format!(
                            "route add {v6}/{l6} via {} dev vxlan0 onlink",
                            plan::vtep_ipv6(j)
                        ));
                    }
                }
            }
            ip_batch(&ns, &lines)?;
            if self.routing == Routing::Vxlan {
                for j in (1..=n).filter(|&j| j != i) {
                    let dst = plan::node_ipv4(j).to_string();
                    bridge(
                        &ns,
                        &[
                            "fdb",
                            "append",
                            &plan::vtep_mac(j),
                            "dev",
                            "vxlan0",
                            "dst",
                            &dst,
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn routing(&self) -> Routing {
        self.routing
    }

    /// Node `index` (from 1).
    pub fn node(&self, index: usize) -> &Host {
        &self.nodes[index - 1]
    }

    pub fn nodes(&self) -> &[Host] {
        &self.nodes
    }

    pub fn external(&self) -> &Host {
        &self.external
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Kubernetes-style name of node `index`: `<lab>-n<index>`.
    pub fn node_name(&self, index: usize) -> String {
        plan::node_name(&self.info.name, index)
    }

    /// The node's cgroup; pods' cgroups are below it.
    pub fn node_cgroup(&self, index: usize) -> PathBuf {
        self.cgroup_root.join(format!("n{index}"))
    }

    /// The whole lab's cgroup.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Where node `index`'s agent pins its maps.
    pub fn pin_dir(&self, index: usize) -> PathBuf {
        Path::new(BPFFS_ROOT).join(self.node_name(index))
    }

    /// Where node `index`'s agent writes status.json.
    pub fn node_state_dir(&self, index: usize) -> PathBuf {
        state::dir(&self.info.name)
            .join("nodes")
            .join(self.node_name(index))
    }

    /// Where process logs go.
    pub fn log_dir(&self) -> PathBuf {
        state::dir(&self.info.name).join("logs")
    }

    /// Adds a pod to node `node` (from 1).
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod, LabError> {
        plan::validate_pod_name(name)?;
        if node == 0 || node > self.nodes.len() {
            return Err(LabError::NoSuchNode {
                lab: self.info.name.clone(),
                index: node,
                nodes: self.nodes.len(),
            });
        }
        if self.pod(name).is_some() {
            return Err(LabError::PodExists {
                lab: self.info.name.clone(),
                pod: name.to_owned(),
            });
        }
        let slot = self.pods.iter().filter(|p| p.node == node).count();
        if slot >= plan::MAX_PODS_PER_NODE {
            return Err(LabError::Spec(format!(
                "node n{node} already has {} pods",
                plan::MAX_PODS_PER_NODE
            )));
        }
        self.info.pods.push(PodInfo {
            name: name.to_owned(),
            node,
            slot,
        });
        state::write(&self.info)?;

        let node_ns = plan::node_netns(&self.info.name, node);
        let pod_ns = plan::pod_netns(&self.info.name, node, name);
        let device = plan::pod_device(name);
        let ipv4 = plan::pod_ipv4(node, slot);
        let ipv6 = plan::pod_ipv6(node, slot);
        let mtu = match self.routing {
            Routing::Direct => 1500,
            Routing::Vxlan => plan::VXLAN_MTU,
        };
        let cg = self.node_cgroup(node).join(name);
        cgroup::create(&cg)?;
        ip(None, &["netns", "add", &pod_ns])?;
        sysctls(
            &pod_ns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        ip(
            Some(&node_ns),
            &[
                "link", "add", &device, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
            ],
        )?;
        ip_batch(
            &node_ns,
            &[
                format!("link set dev {device} mtu {mtu} addrgenmode none"),
                format!("link set dev {device} up"),
                format!("addr add {}/64 dev {device} nodad", plan::POD_GATEWAY_LL),
            ],
        )?;
        let router = plan::router_ipv4(node);
        ip_batch(
            &pod_ns,
            &[
                "link set lo up".into(),
                format!("link set dev eth0 mtu {mtu} addrgenmode none"),
                format!("addr add {ipv4}/32 dev eth0"),
                format!("addr add {ipv6}/128 dev eth0 nodad"),
                "addr add fe80::2/64 dev eth0 nodad".into(),
                "link set dev eth0 up".into(),
                format!("route add {router} dev eth0 scope link"),
                format!("route add default via {router} dev eth0"),
                format!("route add default via {} dev eth0", plan::POD_GATEWAY_LL),
            ],
        )?;
        ip_batch(
            &node_ns,
            &[
                format!("route add {ipv4}/32 dev {device} scope link"),
                format!("route add {ipv6}/128 dev {device}"),
            ],
        )?;
        let host_ifindex = ifindex(&node_ns, &device)?;
        let pod = Pod {
            name: name.to_owned(),
            node,
            netns: pod_ns,
            cgroup: cg,
            ipv4,
            ipv6,
            host_device: device,
            host_ifindex,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts `cmd` inside a pod: its network namespace and its cgroup.
    pub fn spawn_in_pod(
        &self,
        pod: &Pod,
        label: &str,
        cmd: Command,
    ) -> Result<LabProcess, LabError> {
        let log = self.log_dir().join(format!("{}-{label}.log", pod.name));
        crate::process::spawn(label, &pod.netns, &pod.cgroup, log, cmd)
    }

    /// Starts `cmd` on a node or the external host, in that host's system cgroup.
    pub fn spawn_on_host(
        &self,
        host: &Host,
        label: &str,
        cmd: Command,
    ) -> Result<LabProcess, LabError> {
        let log = self.log_dir().join(format!("{}-{label}.log", host.name));
        crate::process::spawn(label, &host.netns, &host.system_cgroup, log, cmd)
    }

    /// Runs a command in a pod to completion and returns its output.
    pub fn run_in_pod(
        &self,
        pod: &Pod,
        label: &str,
        cmd: Command,
        timeout: Duration,
    ) -> Result<String, LabError> {
        self.spawn_in_pod(pod, label, cmd)?.wait_success(timeout)
    }

    /// Starts meshless-agent on node `index` the way the DaemonSet will:
    /// in the node's namespace, hooks on the node's cgroup, maps pinned under
    /// /sys/fs/bpf/meshless/<node>.
    pub fn start_agent(&self, index: usize, agent: &Path) -> Result<LabProcess, LabError> {
        self.start_agent_with::<&str>(index, agent, &[])
    }

    /// [`Lab::start_agent`] with extra flags (`--manifests DIR`, `--detach-on-exit`, ...).
    /// The node's addresses and pod CIDRs are passed as flags, as on a
    /// standalone node.
    pub fn start_agent_with<S: AsRef<std::ffi::OsStr>>(
        &self,
        index: usize,
        agent: &Path,
        extra: &[S],
    ) -> Result<LabProcess, LabError> {
        let mut cmd = self.agent_command(index, agent);
        cmd.args(extra);
        let (v4, l4) = plan::pod_cidr_v4(index);
        let (v6, l6) = plan::pod_cidr_v6(index);
        cmd.arg("--pod-cidr")
            .arg(format!("{v4}/{l4},{v6}/{l6}"))
            .arg("--node-ip")
            .arg(self.node(index).ipv4.to_string())
            .arg("--node-ip")
            .arg(self.node(index).ipv6.to_string());
        self.spawn_on_host(self.node(index), "agent", cmd)
    }

    /// Starts meshless-agent on node `index` with only the flags a DaemonSet
    /// gives every node alike: the node's addresses, pod CIDRs and zone come
    /// from its Node object through `kubeconfig`.
    pub fn start_cluster_agent(
        &self,
        index: usize,
        agent: &Path,
        kubeconfig: &Path,
    ) -> Result<LabProcess, LabError> {
        let mut cmd = self.agent_command(index, agent);
        cmd.arg("--kubeconfig").arg(kubeconfig);
        self.spawn_on_host(self.node(index), "agent", cmd)
    }

    /// The flags every lab agent gets: its node, cgroup, pins, state, the
    /// endpoints directory the lab kubelet's meshless-cni writes, and probes.
    fn agent_command(&self, index: usize, agent: &Path) -> Command {
        let mut cmd = Command::new(agent);
        cmd.arg("--external-device")
            .arg("eth0")
            .arg("--node")
            .arg(self.node_name(index))
            .arg("--cgroup")
            .arg(self.node_cgroup(index))
            .arg("--bpffs-root")
            .arg(BPFFS_ROOT)
            .arg("--pod-device-prefix")
            .arg(plan::POD_DEVICE_PREFIX)
            .arg("--state-dir")
            .arg(self.node_state_dir(index))
            .arg("--endpoints-dir")
            .arg(self.kubelet_state_dir(index).join("endpoints"))
            // Each node has its own loopback, so the same port everywhere.
            .arg("--health-addr")
            .arg(AGENT_HEALTH_ADDR);
        cmd
    }

    /// Waits until node `index`'s agent reports every pod of that node attached.
    pub fn wait_agent_ready(&self, index: usize, timeout: Duration) -> Result<(), LabError> {
        let want: Vec<&str> = self
            .pods
            .iter()
            .filter(|p| p.node == index)
            .map(|p| p.host_device.as_str())
            .collect();
        let path = self.node_state_dir(index).join("status.json");
        let deadline = Instant::now() + timeout;
        loop {
            let attached: Vec<String> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    v.get("devices")?.as_array().map(|d| {
                        d.iter()
                            .filter_map(|x| x.get("name")?.as_str().map(str::to_owned))
                            .collect()
                    })
                })
                .unwrap_or_default();
            if path.exists() && want.iter().all(|w| attached.iter().any(|a| a == w)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!(
                        "the agent on {} to attach {want:?} (status {}: {attached:?})",
                        self.node_name(index),
                        path.display()
                    ),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Keeps the lab after this value is dropped (for `cargo xtask lab up`);
    /// `destroy` removes it later.
    pub fn keep(mut self) -> LabInfo {
        self.keep = true;
        self.info.owner_pid = None;
        let _ignored = state::write(&self.info);
        self.info.clone()
    }
}

/// Creates a host's namespace and plugs it into the fabric bridge.
pub(crate) fn wire_host(fabric: &str, host: &Host) -> Result<(), LabError> {
    let dev_settings = [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    cgroup::create(&host.system_cgroup)?;
    ip(None, &["netns", "add", &host.netns])?;
    sysctls(&host.netns, &dev_settings)?;
    let port = format!("f-{}", host.name);
    ip(
        Some(fabric),
        &[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.netns,
        ],
    )?;
    ip_batch(fabric, &[format!("link set {port} master br0 up")])?;
    ip_batch(
        &host.netns,
        &[
            "link set lo up".into(),
            format!("addr add {}/{} dev eth0", host.ipv4, plan::FABRIC_PREFIX_V4),
            format!(
                "addr add {}/{} dev eth0 nodad",
                host.ipv6,
                plan::FABRIC_PREFIX_V6
            ),
            "link set eth0 up".into(),
        ],
    )
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(err) = destroy(&self.info.name) {
            // Drop cannot return an error; a test still sees the leftovers
            // through its own assertions and `lab down` can finish the job.
            eprintln!("meshless-lab: {err}");
        }
    }
}

/// Removes everything that carries lab `name`'s name: its processes (killed
/// through the lab cgroup), network namespaces (and so every link in them),
/// bpffs pins of its nodes, cgroups and state. Works on a lab whose creator
/// crashed. Removing a lab that does not exist is not an error.
pub fn destroy(name: &str) -> Result<TeardownReport, LabError> {
    plan::validate_lab_name(name)?;
    let mut report = TeardownReport::default();
    let mut problems = Vec::new();
    let cg = cgroup::lab_dir(name)?;
    if cg.exists() {
        if let Err(e) = cgroup::kill_all(&cg, Duration::from_secs(10)) {
            problems.push(e.to_string());
        } else {
            report
                .removed
                .push(format!("processes in {}", cg.display()));
        }
    }
    // Pods first, then nodes, then the fabric, so veth peers go with them.
    let mut namespaces: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| plan::is_netns_of(name, n))
        .collect();
    namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in namespaces {
        match ip(None, &["netns", "del", &ns]) {
            Ok(_) => report.removed.push(format!("netns {ns}")),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Ok(rd) = std::fs::read_dir(BPFFS_ROOT) {
        for e in rd.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if plan::is_node_of(name, &n) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => report.removed.push(format!("bpffs {}", e.path().display())),
                    Err(err) => problems.push(format!("removing {}: {err}", e.path().display())),
                }
            }
        }
    }
    if cg.exists() {
        match cgroup::remove_tree(&cg) {
            Ok(()) => report.removed.push(format!("cgroup {}", cg.display())),
            Err(e) => problems.push(e.to_string()),
        }
    }
    let dir = state::dir(name);
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => report.removed.push(format!("state {}", dir.display())),
            Err(e) => problems.push(format!("removing {}: {e}", dir.display())),
        }
    }
    let left = leftovers(name);
    if problems.is_empty() && left.is_empty() {
        Ok(report)
    } else {
        problems.extend(left);
        Err(LabError::Teardown {
            lab: name.to_owned(),
            leftovers: problems,
        })
    }
}

/// Every lab on this machine: those with state, and names that only
/// leftovers (netns, cgroups) still carry.
pub fn list() -> Vec<LabInfo> {
    let mut names: Vec<String> = std::fs::read_dir(plan::RUN_DIR)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    for ns in list_netns() {
        if let Some(rest) = ns.strip_prefix(plan::NETNS_PREFIX)
            && let Some((lab, _)) = rest.split_once('-')
        {
            names.push(lab.to_owned());
        }
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| plan::validate_lab_name(n).is_ok())
        .map(|n| {
            state::read(&n).unwrap_or(LabInfo {
                name: n,
                nodes: 0,
                routing: "unknown".into(),
                pods: Vec::new(),
                // No state file: nobody owns it any more.
                owner_pid: Some(0),
            })
        })
        .collect()
}

impl Lab {
    /// PIDs running anywhere in the lab (for status output).
    pub fn process_count(&self) -> usize {
        fn walk(p: &Path, acc: &mut usize) {
            *acc += cgroup::pids(p).len();
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.filter_map(Result::ok) {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), acc);
                    }
                }
            }
        }
        let mut n = 0;
        walk(&self.cgroup_root, &mut n);
        n
    }
}
