//! `cargo xtask demo`: the main job on the local lab, end to end.
//!
//! Two nodes, a client pod and three backend pods; meshless-agent on both
//! nodes load balancing the Service in examples/services/web.yaml; traffic to
//! its ClusterIP (TCP and UDP, IPv4 and IPv6) from the client pod, and to its
//! NodePort and LoadBalancer address from the external host; then what the
//! datapath did, read back from the pinned maps, checked against what was sent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use meshless_common::{direction, stat};
use meshless_lab::{Host, Lab, LabSpec, Pod, Routing};
use meshless_maps::{LbMaps, PacketCounters, Stats};

use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How pod traffic crosses nodes: direct or vxlan.
    #[arg(long, default_value = "direct")]
    routing: Routing,
    /// Connections per traffic run (the UDP and IPv6 runs use a third).
    #[arg(long, default_value_t = 300)]
    connections: u32,
    /// Skip `cargo xtask setup` (already done).
    #[arg(long)]
    skip_setup: bool,
    /// Use the binaries already built (target/debug or $MESHLESS_BIN_DIR).
    #[arg(long)]
    skip_build: bool,
    /// Only the first part (standalone nodes); skip the Kubernetes part.
    #[arg(long)]
    skip_kubernetes: bool,
}

const T: Duration = Duration::from_secs(60);
const LAB: &str = "demo";

enum From<'a> {
    Pod(&'a Pod),
    Host(&'a Host),
}

struct Run {
    what: String,
    sent: u32,
    result: serde_json::Value,
}

impl Run {
    fn replies(&self) -> BTreeMap<String, u64> {
        self.result["replies"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn tally(
    lab: &Lab,
    labtool: &std::path::Path,
    from: &From<'_>,
    what: &str,
    args: &[&str],
    sent: u32,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new(labtool);
    cmd.arg("tally")
        .args(args)
        .args(["--count", &sent.to_string()]);
    let out = match from {
        From::Pod(p) => lab.run_in_pod(p, "tally", cmd, T)?,
        From::Host(h) => lab.spawn_on_host(h, "tally", cmd)?.wait_success(T)?,
    };
    let result =
        serde_json::from_str(out.trim()).with_context(|| format!("tally printed {out:?}"))?;
    Ok(Run {
        what: what.to_owned(),
        sent,
        result,
    })
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    if !args.skip_setup {
        crate::setup::run(&crate::setup::Args::default())?;
    }
    util::require_root("cargo xtask demo")?;
    let bins = util::build_bins(args.skip_build)?;
    clear_stale(LAB)?;

    println!(
        "\n== 1. a two-node lab ({} routing) in network namespaces",
        args.routing.as_str()
    );
    let mut lab = Lab::create(LabSpec::new(LAB).routing(args.routing))?;
    let client = lab.add_pod(1, "client")?;
    let web3 = lab.add_pod(1, "web-3")?;
    let web1 = lab.add_pod(2, "web-1")?;
    let web2 = lab.add_pod(2, "web-2")?;
    let example = util::root().join("examples/services/web.yaml");
    let manifest = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    for p in [&web1, &web2, &web3] {
        ensure!(
            manifest.contains(&p.ipv4.to_string()) && manifest.contains(&p.ipv6.to_string()),
            "{} does not list pod {} ({} / {}); the lab's address plan and the example are out of step",
            example.display(),
            p.name,
            p.ipv4,
            p.ipv6
        );
    }
    for p in lab.pods() {
        println!(
            "   pod {:<7} on {}  {:<13} {}",
            p.name,
            lab.node_name(p.node),
            p.ipv4,
            p.ipv6
        );
    }

    println!("\n== 2. meshless-agent on every node, load balancing examples/services/web.yaml");
    let manifests = lab
        .log_dir()
        .parent()
        .context("lab state dir")?
        .join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::copy(&example, manifests.join("web.yaml"))?;
    let dir = manifests.display().to_string();
    let agent = bins.join("meshless-agent");
    let _agents = [
        lab.start_agent_with(1, &agent, &["--manifests", &dir])?,
        lab.start_agent_with(2, &agent, &["--manifests", &dir])?,
    ];
    for node in [1, 2] {
        lab.wait_agent_ready(node, T)?;
        wait_frontends(&lab, node)?;
    }
    print_services(&lab)?;

    let labtool = bins.join("meshless-labtool");
    let mut servers = Vec::new();
    for p in [&web1, &web2, &web3] {
        let mut cmd = Command::new(&labtool);
        cmd.args(["serve-id", "--listen", "[::]:8080", "--id", &p.name]);
        servers.push(lab.spawn_in_pod(p, "serve-id", cmd)?);
    }
    // Wait for the servers (directly, not through the service).
    let deadline = Instant::now() + T;
    for p in [&web1, &web2, &web3] {
        let to = format!("{}:8080", p.ipv4);
        while tally(
            &lab,
            &labtool,
            &From::Pod(&client),
            "probe",
            &["--to", &to],
            1,
        )?
        .result["ok"]
            != 1
        {
            ensure!(
                Instant::now() < deadline,
                "backend {} never answered",
                p.name
            );
        }
    }

    println!("\n== 3. traffic to the service");
    let before = Snapshot::take(&lab)?;
    let n = args.connections;
    let third = (n / 3).max(1);
    let node1 = lab.node(1).ipv4;
    let nodeport = format!("{node1}:30080");
    let runs = vec![
        tally(
            &lab,
            &labtool,
            &From::Pod(&client),
            "client -> ClusterIP 198.19.0.10:80 (TCP)",
            &["--to", "198.19.0.10:80"],
            n,
        )?,
        tally(
            &lab,
            &labtool,
            &From::Pod(&client),
            "client -> ClusterIP [fd00:c::10]:80 (TCP, IPv6)",
            &["--to", "[fd00:c::10]:80"],
            third,
        )?,
        tally(
            &lab,
            &labtool,
            &From::Pod(&client),
            "client -> ClusterIP 198.19.0.10:53 (UDP sendto)",
            &["--to", "198.19.0.10:53", "--udp", "--unconnected"],
            third,
        )?,
        tally(
            &lab,
            &labtool,
            &From::Host(lab.external()),
            &format!("external -> NodePort {nodeport} (TCP)"),
            &["--to", &nodeport],
            n,
        )?,
        tally(
            &lab,
            &labtool,
            &From::Host(lab.external()),
            "external -> LoadBalancer 198.18.1.10:80 (TCP)",
            &["--to", "198.18.1.10:80"],
            n,
        )?,
    ];
    println!(
        "   {:<52} {:>6} {:>6}   {:>6} {:>6} {:>6}",
        "", "sent", "failed", "web-1", "web-2", "web-3"
    );
    for r in &runs {
        let rep = r.replies();
        let get = |k: &str| rep.get(k).copied().unwrap_or(0);
        println!(
            "   {:<52} {:>6} {:>6}   {:>6} {:>6} {:>6}",
            r.what,
            r.sent,
            r.result["failed"].as_u64().unwrap_or(u64::MAX),
            get("web-1"),
            get("web-2"),
            get("web-3")
        );
    }
    let after = Snapshot::take(&lab)?;

    println!("\n== 4. what the datapath did (pinned maps on n1)");
    let d = |s: u32| after.stats[s as usize] - before.stats[s as usize];
    for (name, s) in [
        (
            "connections/datagrams translated at the socket",
            stat::LB_TRANSLATED,
        ),
        (
            "replies shown with the service address",
            stat::LB_REV_TRANSLATED,
        ),
        ("north-south flows translated (NodePort, LB)", stat::NP_NEW),
        ("north-south packets of tracked flows", stat::NP_TRACKED),
        ("refused: no backend", stat::LB_NO_BACKEND),
    ] {
        println!("   {name:<50} {:>8}", d(s));
    }
    let udp_to_backends: u64 = [&web1, &web2, &web3]
        .iter()
        .map(|b| {
            after.udp(client.host_ifindex, client.ipv4.into(), b.ipv4.into())
                - before.udp(client.host_ifindex, client.ipv4.into(), b.ipv4.into())
        })
        .sum();
    println!(
        "   {:<50} {:>8}",
        "UDP packets client -> backends (TC on its device)", udp_to_backends
    );
    let st = meshless_maps::DatapathState::open(&lab.pin_dir(1))?.counts()?;
    println!(
        "   {:<50} {:>8}",
        "conntrack entries (north-south, both directions)",
        st.conntrack4 + st.conntrack6
    );
    println!(
        "   {:<50} {:>8}",
        "sockets shown with the service address (LRU)", st.rev_nat
    );

    println!("\n== 5. checks");
    let mut checks: Vec<(String, bool)> = Vec::new();
    for r in &runs {
        let failed = r.result["failed"].as_u64().unwrap_or(u64::MAX);
        let answered = r.replies().len();
        checks.push((
            format!("{}: 0 failed, all 3 backends answered", r.what),
            failed == 0 && answered == 3,
        ));
    }
    let socket = u64::from(n + 2 * third);
    checks.push((
        format!("socket translations = {socket} (one per connection or datagram)"),
        d(stat::LB_TRANSLATED) == socket,
    ));
    checks.push((
        format!("replies shown as the service = {third} (one per UDP answer)"),
        d(stat::LB_REV_TRANSLATED) == u64::from(third),
    ));
    checks.push((
        format!(
            "north-south flows = {} (one per external connection)",
            2 * n
        ),
        d(stat::NP_NEW) == u64::from(2 * n),
    ));
    checks.push((
        format!("UDP packets the client sent to backends = {third} (no packet went to the service address)"),
        udp_to_backends == u64::from(third),
    ));
    let wrong = runs[2].result["wrong_source"].as_u64().unwrap_or(u64::MAX);
    checks.push((
        "UDP answers came from the service address".to_owned(),
        wrong == 0,
    ));
    let flows = 2 * n as usize;
    checks.push((
        format!("conntrack holds both directions of the {flows} north-south flows"),
        st.conntrack4 >= 2 * flows && st.conntrack_replies >= flows,
    ));
    let mut bad = 0;
    for (what, ok) in &checks {
        bad += usize::from(!ok);
        println!("   {} {what}", if *ok { "ok  " } else { "FAIL" });
    }
    drop(servers);
    drop(lab);
    println!("\n== 6. lab {LAB} removed (namespaces, links, pins, cgroups, processes)");
    if !args.skip_kubernetes {
        bad += kubernetes(&bins)?;
    }
    if bad > 0 {
        bail!("{bad} check(s) failed");
    }
    println!("demo passed in {}", util::elapsed(start));
    Ok(())
}

/// Removes a lab of an earlier, interrupted demo; refuses one that is in use.
fn clear_stale(name: &str) -> anyhow::Result<()> {
    if let Some(old) = meshless_lab::list().into_iter().find(|l| l.name == name) {
        ensure!(
            old.is_stale(),
            "a lab named {name} is in use (owner pid {:?}); wait for it or run `cargo xtask lab down --name {name}`",
            old.owner_pid
        );
        println!("removing the stale lab {name} of an earlier, interrupted demo");
        meshless_lab::destroy(name)?;
    }
    Ok(())
}

const KLAB: &str = "demokube";

/// Part two: the same datapath driven by a real Kubernetes control plane.
/// Returns the number of failed checks.
fn kubernetes(bins: &std::path::Path) -> anyhow::Result<usize> {
    clear_stale(KLAB)?;
    println!(
        "\n== 7. the same on Kubernetes {}: control plane, kubelet + meshless-cni, agents, operator",
        meshless_lab::control_plane::K8S_VERSION
    );
    let mut lab = Lab::create(LabSpec::new(KLAB))?;
    let cp = lab.start_control_plane()?;
    let kubectl = |args: &[&str]| cp.kubectl(&lab, args);
    // kubelet + meshless-cni and meshless-agent on every node (the agent
    // with DaemonSet-style flags only), meshless-operator on n1.
    let procs = lab.start_cluster(&cp, bins)?;
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "node",
        "--all",
        "--timeout=60s",
    ])?;
    let deadline = Instant::now() + T;
    while kubectl(&["get", "serviceaccount", "default"]).is_err() {
        ensure!(
            Instant::now() < deadline,
            "the controller-manager never created default/default"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("   $ kubectl apply -f examples/kubernetes/web.yaml");
    let web = std::fs::read_to_string(util::root().join("examples/kubernetes/web.yaml"))?;
    cp.apply(&lab, &web)?;
    kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?;
    let lb_ip = loop {
        let ip = kubectl(&[
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])?;
        if !ip.trim().is_empty() {
            break ip.trim().to_owned();
        }
        ensure!(
            Instant::now() < deadline,
            "meshless-operator never gave web an address"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for line in kubectl(&["get", "pods,services", "-o", "wide"])?.lines() {
        println!("   {line}");
    }
    // Give the agents a moment to see the last endpoint of the rollout.
    std::thread::sleep(Duration::from_millis(500));
    print_agents(&lab)?;
    print_services(&lab)?;

    println!("\n== 8. traffic from outside the cluster to the LoadBalancer address {lb_ip}");
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    let tries = 30;
    for _ in 0..tries {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "3", &format!("http://{lb_ip}/")]);
        let body = lab
            .spawn_on_host(lab.external(), "curl", curl)?
            .wait_success(Duration::from_secs(10))?;
        let v: serde_json::Value =
            serde_json::from_str(body.trim()).with_context(|| format!("echo answered {body:?}"))?;
        *answered
            .entry(v["pod"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    for (pod, n) in &answered {
        println!("   {pod:<28} answered {n}");
    }
    println!("\n== 9. scale to 1 replica; the BPF service map follows the EndpointSlice");
    kubectl(&["scale", "deployment/web", "--replicas=1"])?;
    let vip: std::net::Ipv4Addr =
        kubectl(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])?
            .trim()
            .parse()?;
    let started = Instant::now();
    let backends = loop {
        let n = backends_of(&lab, vip)?;
        if n == 1 || started.elapsed() > Duration::from_secs(30) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "   {vip}:80 has {backends} backend(s) in the map on n1, {:.1}s after `kubectl scale`",
        started.elapsed().as_secs_f64()
    );

    println!("\n== 10. checks");
    let total: u32 = answered.values().sum();
    let checks = [
        (
            format!("web got {lb_ip} from the operator's pool 198.18.1.0/24"),
            lb_ip.starts_with("198.18.1."),
        ),
        (
            format!("{total}/{tries} requests answered through the LoadBalancer address"),
            total == tries,
        ),
        (
            format!("{} pods answered (spread by the datapath)", answered.len()),
            answered.len() >= 2,
        ),
        (
            "after scaling to 1, the map holds exactly 1 backend".to_owned(),
            backends == 1,
        ),
    ];
    let mut bad = 0;
    for (what, ok) in &checks {
        bad += usize::from(!ok);
        println!("   {} {what}", if *ok { "ok  " } else { "FAIL" });
    }
    drop(procs);
    drop(cp);
    drop(lab);
    println!("\n== 11. lab {KLAB} removed");
    Ok(bad)
}

/// What each agent learned from its Node object and meshless-cni.
fn print_agents(lab: &Lab) -> anyhow::Result<()> {
    println!("   agents (no per-node flags: node facts from each Node object):");
    for node in 1..=lab.nodes().len() {
        let path = lab.node_state_dir(node).join("status.json");
        let st: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let f = &st["node_facts"];
        let cidrs: Vec<String> = f["pod_cidrs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{}/{}", c[0].as_str().unwrap_or("?"), c[1]))
            .collect();
        println!(
            "   {:<12} ips {} ({}), pod CIDRs {} ({})",
            lab.node_name(node),
            f["ips"],
            f["ips_from"].as_str().unwrap_or("?"),
            cidrs.join(","),
            f["pod_cidrs_from"].as_str().unwrap_or("?")
        );
        for ep in st["endpoints"].as_array().into_iter().flatten() {
            println!(
                "     endpoint {}/{} {} on {} (in API: {}, {})",
                ep["namespace"].as_str().unwrap_or("?"),
                ep["pod"].as_str().unwrap_or("?"),
                ep["addresses"][0].as_str().unwrap_or("?"),
                ep["host_device"].as_str().unwrap_or("?"),
                ep["in_api"],
                ep["phase"].as_str().unwrap_or("-")
            );
        }
    }
    Ok(())
}

/// Distinct IPv4 backends of `vip:80/tcp` in n1's maps.
fn backends_of(lab: &Lab, vip: std::net::Ipv4Addr) -> anyhow::Result<usize> {
    let maps = LbMaps::open(&lab.pin_dir(1))?;
    let Some((_, v)) = maps.services()?.into_iter().find(|(k, _)| {
        k.family == meshless_common::family::IPV4 && k.addr[..4] == vip.octets() && k.port == 80
    }) else {
        return Ok(0);
    };
    let slots: std::collections::BTreeSet<u32> =
        maps.read_set(v.set_id, v.slots)?.into_iter().collect();
    Ok(slots.len())
}

fn wait_frontends(lab: &Lab, node: usize) -> anyhow::Result<()> {
    let path = lab.node_state_dir(node).join("status.json");
    let deadline = Instant::now() + T;
    loop {
        let v: serde_json::Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if v["lb"]["frontends"].as_u64().unwrap_or(0) > 0 {
            let errors = &v["lb"]["errors"];
            ensure!(
                errors.as_array().is_none_or(Vec::is_empty),
                "agent on {} reports: {errors}",
                lab.node_name(node)
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "agent on {} installed no services: {v}",
            lab.node_name(node)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn addr(a: &[u8; 16], family: u8) -> IpAddr {
    if family == meshless_common::family::IPV4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

fn print_services(lab: &Lab) -> anyhow::Result<()> {
    let maps = LbMaps::open(&lab.pin_dir(1))?;
    let backends: BTreeMap<u32, meshless_common::Backend> = maps.backends()?.into_iter().collect();
    let mut services = maps.services()?;
    services.sort_by_key(|(k, _)| *k);
    println!(
        "   service map on {} (ml_services -> ml_slots -> ml_backends):",
        lab.node_name(1)
    );
    for (k, v) in services {
        let proto = if k.protocol == meshless_common::lb::PROTO_UDP {
            "udp"
        } else {
            "tcp"
        };
        let fe = match addr(&k.addr, k.family) {
            IpAddr::V4(a) => format!("{a}:{}/{proto}", k.port),
            IpAddr::V6(a) => format!("[{a}]:{}/{proto}", k.port),
        };
        let slots = maps.read_set(v.set_id, v.slots)?;
        let list: Vec<String> = slots
            .iter()
            .filter_map(|id| backends.get(id))
            .map(|b| match addr(&b.addr, b.family) {
                IpAddr::V4(a) => format!("{a}:{}", b.port),
                IpAddr::V6(a) => format!("[{a}]:{}", b.port),
            })
            .collect();
        println!("   {fe:<28} -> {}", list.join(", "));
    }
    Ok(())
}

struct Snapshot {
    counters: Vec<meshless_maps::FlowCount>,
    stats: Vec<u64>,
}

impl Snapshot {
    fn take(lab: &Lab) -> anyhow::Result<Self> {
        let counters = PacketCounters::open(&lab.pin_dir(1))?.read()?;
        let s = Stats::open(&lab.pin_dir(1))?;
        let stats = (0..stat::MAX)
            .map(|i| s.get(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { counters, stats })
    }

    fn udp(&self, ifindex: u32, src: IpAddr, dst: IpAddr) -> u64 {
        self.counters
            .iter()
            .filter(|c| {
                c.ifindex == ifindex
                    && c.direction == direction::FROM_POD
                    && c.protocol == 17
                    && c.src == src
                    && c.dst == dst
            })
            .map(|c| c.packets)
            .sum()
    }
}
