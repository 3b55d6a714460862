//! `cargo xtask lab up|down|status`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use meshless_lab::{Lab, LabSpec, Routing};

use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Create a lab and leave it running (agents included) until `lab down`.
    Up {
        /// Lab name: up to 12 lowercase letters and digits.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Number of nodes (1-16).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// How pod traffic crosses nodes: direct or vxlan.
        #[arg(long, default_value = "direct")]
        routing: Routing,
        /// Pods to create on every node (named p1, p2, ... per node: n1-p1, ...).
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Do not start meshless-agent on the nodes.
        #[arg(long)]
        no_agents: bool,
        /// Use the binaries already in target/debug (or $MESHLESS_BIN_DIR).
        #[arg(long)]
        skip_build: bool,
        /// Also start a Kubernetes control plane (etcd, kube-apiserver,
        /// controller-manager, scheduler) and make the lab a Meshless
        /// cluster on it: the lab kubelet with meshless-cni and
        /// meshless-agent on every node, meshless-operator on n1 (LoadBalancer
        /// pool 198.18.1.0/24, fd00:d::/112). Then `cargo xtask kubectl --
        /// apply -f examples/kubernetes/web.yaml` runs pods.
        #[arg(long)]
        control_plane: bool,
    },
    /// Remove a lab and everything it created (processes, netns, links,
    /// bpffs pins, cgroups), also when its creator crashed.
    Down {
        /// The lab to remove.
        #[arg(long, required_unless_present_any = ["all", "stale"])]
        name: Option<String>,
        /// Remove every lab on this machine.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Remove labs whose owning process has exited (crashed test runs).
        #[arg(long, conflicts_with_all = ["name", "all"])]
        stale: bool,
    },
    /// List labs with their nodes, pods, processes and agent state.
    Status {
        /// Only this lab.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(short, long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Up {
            name,
            nodes,
            routing,
            pods_per_node,
            no_agents,
            skip_build,
            control_plane,
        } => up(&Up {
            name: &name,
            nodes,
            routing,
            pods_per_node,
            no_agents,
            skip_build,
            control_plane,
        }),
        Cmd::Down { name, all, stale } => down(name.as_deref(), all, stale),
        Cmd::Status { name, output } => status(name.as_deref(), &output),
    }
}

struct Up<'a> {
    name: &'a str,
    nodes: usize,
    routing: Routing,
    pods_per_node: usize,
    no_agents: bool,
    skip_build: bool,
    control_plane: bool,
}

fn up(u: &Up<'_>) -> anyhow::Result<()> {
    util::require_root("cargo xtask lab up")?;
    let start = Instant::now();
    let bins = util::build_bins(u.skip_build)?;
    let mut lab = Lab::create(LabSpec::new(u.name).nodes(u.nodes).routing(u.routing))?;
    for node in 1..=u.nodes {
        for p in 1..=u.pods_per_node {
            lab.add_pod(node, &format!("n{node}-p{p}"))?;
        }
    }
    let cp = if u.control_plane {
        Some(lab.start_control_plane()?)
    } else {
        None
    };
    if !u.no_agents {
        match &cp {
            // A Meshless cluster: kubelets, DaemonSet-style agents, operator.
            Some(cp) => lab.start_cluster(cp, &bins)?.detach(),
            None => {
                for node in 1..=u.nodes {
                    lab.start_agent_with::<&str>(node, &bins.join("meshless-agent"), &[])?
                        .detach();
                }
            }
        }
        for node in 1..=u.nodes {
            lab.wait_agent_ready(node, Duration::from_secs(30))?;
        }
    }
    print_lab(&lab);
    if let Some(cp) = cp {
        println!("KUBECONFIG={}", cp.kubeconfig().display());
        println!(
            "kubectl: {} (run it in a lab namespace: `cargo xtask kubectl --name {} -- get nodes`)",
            cp.kubectl_bin().display(),
            u.name
        );
        cp.detach();
    }
    println!(
        "lab {} is up ({}). Remove it with: cargo xtask lab down --name {}",
        u.name,
        util::elapsed(start),
        u.name
    );
    lab.keep();
    Ok(())
}

fn print_lab(lab: &Lab) {
    println!("lab {} ({} routing)", lab.name(), lab.routing().as_str());
    println!(
        "  {:<14} {:<22} {:<18} {:<20}",
        "HOST", "NETNS", "IPV4", "IPV6"
    );
    for (i, n) in lab.nodes().iter().enumerate() {
        println!(
            "  {:<14} {:<22} {:<18} {:<20}",
            lab.node_name(i + 1),
            n.netns,
            n.ipv4,
            n.ipv6
        );
    }
    let e = lab.external();
    println!(
        "  {:<14} {:<22} {:<18} {:<20}",
        "external", e.netns, e.ipv4, e.ipv6
    );
    if !lab.pods().is_empty() {
        println!(
            "  {:<14} {:<22} {:<18} {:<20} NODE/DEVICE",
            "POD", "NETNS", "IPV4", "IPV6"
        );
        for p in lab.pods() {
            println!(
                "  {:<14} {:<22} {:<18} {:<20} n{}/{}",
                p.name, p.netns, p.ipv4, p.ipv6, p.node, p.host_device
            );
        }
    }
    if let Some(p) = lab.pods().first() {
        println!(
            "  run a command in a pod: ip netns exec {} ping -c1 {}",
            p.netns,
            lab.node(1).ipv4
        );
    }
}

fn down(name: Option<&str>, all: bool, stale: bool) -> anyhow::Result<()> {
    util::require_root("cargo xtask lab down")?;
    let targets: Vec<String> = match name {
        Some(n) => vec![n.to_owned()],
        None => meshless_lab::list()
            .into_iter()
            .filter(|l| all || (stale && l.is_stale()))
            .map(|l| l.name)
            .collect(),
    };
    if targets.is_empty() {
        println!("no labs to remove");
    }
    let mut failed = Vec::new();
    for t in targets {
        match meshless_lab::destroy(&t) {
            Ok(report) if report.removed.is_empty() => println!("lab {t}: nothing to remove"),
            Ok(report) => println!("lab {t}: removed {}", report.removed.join(", ")),
            Err(e) => {
                eprintln!("lab {t}: {e}");
                failed.push(t);
            }
        }
    }
    if !failed.is_empty() {
        bail!("could not remove lab(s) {}; see above", failed.join(", "));
    }
    Ok(())
}

fn status(name: Option<&str>, output: &str) -> anyhow::Result<()> {
    let labs: Vec<_> = meshless_lab::list()
        .into_iter()
        .filter(|l| name.is_none_or(|n| n == l.name))
        .collect();
    if let Some(n) = name
        && labs.is_empty()
    {
        bail!("no lab named {n}; `cargo xtask lab status` lists them");
    }
    let rows: Vec<serde_json::Value> = labs
        .iter()
        .map(|l| {
            let agents: Vec<serde_json::Value> = (1..=l.nodes)
                .map(|i| {
                    let node = meshless_lab::plan::node_name(&l.name, i);
                    let path = std::path::Path::new(meshless_lab::plan::RUN_DIR)
                        .join(&l.name)
                        .join("nodes")
                        .join(&node)
                        .join("status.json");
                    let devices = std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| v.get("devices").and_then(|d| d.as_array()).map(Vec::len));
                    serde_json::json!({"node": node, "agent_devices_attached": devices})
                })
                .collect();
            serde_json::json!({
                "name": l.name, "nodes": l.nodes, "routing": l.routing, "pods": l.pods.len(),
                "owner_pid": l.owner_pid, "stale": l.is_stale(), "agents": agents,
            })
        })
        .collect();
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows).context("json")?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no labs");
        return Ok(());
    }
    println!(
        "{:<14} {:>5} {:<8} {:>5} {:<10} AGENTS (devices attached)",
        "NAME", "NODES", "ROUTING", "PODS", "OWNER"
    );
    for (l, r) in labs.iter().zip(&rows) {
        let owner = match (l.owner_pid, l.is_stale()) {
            (None, _) => "kept".to_owned(),
            (Some(_), true) => "STALE".to_owned(),
            (Some(p), false) => format!("pid {p}"),
        };
        let agents: Vec<String> = r["agents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| match x["agent_devices_attached"].as_u64() {
                        Some(d) => format!("{}:{d}", x["node"].as_str().unwrap_or("?")),
                        None => format!("{}:down", x["node"].as_str().unwrap_or("?")),
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<14} {:>5} {:<8} {:>5} {:<10} {}",
            l.name,
            l.nodes,
            l.routing,
            l.pods.len(),
            owner,
            agents.join(" ")
        );
    }
    if labs.iter().any(meshless_lab::LabInfo::is_stale) {
        println!("stale labs belong to crashed runs: cargo xtask lab down --stale");
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct KubectlArgs {
    /// The lab (default: the only lab with a control plane).
    #[arg(long)]
    name: Option<String>,
    /// Arguments for kubectl.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs kubectl inside the lab's control-plane namespace (the only place,
/// with the nodes, from which the API server is reachable).
pub fn kubectl(a: &KubectlArgs) -> anyhow::Result<()> {
    let has_cp = |lab: &str| {
        std::path::Path::new(meshless_lab::plan::RUN_DIR)
            .join(lab)
            .join("cp/admin.kubeconfig")
            .exists()
    };
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            let with: Vec<String> = meshless_lab::list()
                .into_iter()
                .map(|l| l.name)
                .filter(|n| has_cp(n))
                .collect();
            match with.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "no lab has a control plane; start one with `cargo xtask lab up --control-plane`"
                ),
                many => bail!(
                    "several labs have a control plane ({}); pick one with --name",
                    many.join(", ")
                ),
            }
        }
    };
    if !has_cp(&name) {
        bail!(
            "lab {name} has no control plane (`cargo xtask lab up --name {name} --control-plane`)"
        );
    }
    let kubeconfig = std::path::Path::new(meshless_lab::plan::RUN_DIR)
        .join(&name)
        .join("cp/admin.kubeconfig");
    let status = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}{name}-cp", meshless_lab::plan::NETNS_PREFIX),
        ])
        .arg(meshless_lab::control_plane::k8s_bin_dir().join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(&a.args)
        .status()
        .context("running kubectl")?;
    if !status.success() {
        return Err(anyhow::Error::new(util::ExitCode(
            u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
        ))
        .context("kubectl failed"));
    }
    Ok(())
}
