//! `cargo xtask bench lb [--quick]`: what a connection to a Service costs
//! with N services installed, and what changing one service costs, for
//!
//! | path       | client node | how the ClusterIP is resolved                          |
//! |------------|-------------|--------------------------------------------------------|
//! | `direct`   | n1          | not at all: the client dials a backend pod IP (floor)  |
//! | `iptables` | n2          | kube-proxy iptables-mode rules (legacy backend) in n2  |
//! | `nftables` | n3          | kube-proxy nftables-mode rules in n3                   |
//! | `meshless` | n4          | meshless-agent on n4 (`--manifests DIR`), eBPF sockets |
//!
//! One lab, five nodes, direct routing; the backends (two pods running
//! `meshless-labtool tcp-echo`) are on n5, and every path installs the same N
//! services, all pointing at them. The client always dials the service a
//! linear list reaches last (`svc-<N-1>`). Rounds visit the paths in turn
//! (A B C D A B C D ...) so machine drift hits every path alike; the report
//! is the median over rounds of each round's p50 and p99.
//!
//! Every rule, link and process lives in the lab's network namespaces
//! (iptables and nft run only through `ip netns exec <lab netns>`); the lab
//! is removed when the bench ends, also on error or panic (`Lab`'s Drop).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use meshless_lab::{Lab, LabProcess, LabSpec, Pod, Routing};

use super::{kubeproxy, manifests, median, percentile};
use crate::util;

/// A way of reaching a service.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathKind {
    /// No service at all: the client dials a backend pod directly (the floor).
    Direct,
    /// meshless-agent with the eBPF socket load balancer.
    Meshless,
    /// kube-proxy's iptables-mode chains (iptables-legacy).
    Iptables,
    /// kube-proxy's nftables-mode table.
    Nftables,
}

impl PathKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Meshless => "meshless",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// The node whose pod is this path's client (and whose netns holds its rules).
    fn node(self) -> usize {
        match self {
            Self::Direct => 1,
            Self::Iptables => 2,
            Self::Nftables => 3,
            Self::Meshless => 4,
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// 100 and 10,000 services and fewer repetitions: under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Paths to measure, in the order every round visits them.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,meshless,iptables,nftables"
    )]
    paths: Vec<PathKind>,
    /// Service counts, ascending [default: 100,1000,10000,50000; --quick: 100,10000].
    #[arg(long, value_delimiter = ',')]
    services: Vec<usize>,
    /// Interleaved rounds per service count [default: 5].
    #[arg(long)]
    rounds: Option<usize>,
    /// Measured connections per path and round [default: 2000; --quick: 1000].
    #[arg(long)]
    connections: Option<u32>,
    /// Use the binaries already built ($MESHLESS_BIN_DIR, else
    /// $CARGO_TARGET_DIR/debug, else target/debug).
    #[arg(long)]
    skip_build: bool,
}

/// Service count at which single-service updates are timed.
const UPDATE_SCALE: usize = 10_000;
/// Backend pods on n5.
const BACKENDS: usize = 2;
/// Node that runs the backends.
const BACKEND_NODE: usize = 5;
/// Pod CIDRs of nodes 1-15 (198.18.17.0/24 ...): kube-proxy's
/// `--cluster-cidr`, so pod-to-service traffic is not masqueraded.
const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 16, 0), 20);
/// The lab's ClusterIP range (`meshless_lab::plan`).
const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Hard bound on one batch of connections (labtool stops early after it).
const MAX_BATCH: Duration = Duration::from_secs(20);
/// Connections that check a path works before it is measured.
const PROBE_CONNECTIONS: u32 = 20;
/// Largest first service count (its load cannot be projected).
const MAX_FIRST_SCALE: usize = 10_000;
/// Largest growth from one service count to the next.
const MAX_STEP: usize = 100;
/// Longest a kube-proxy ruleset load may be expected to take. Loads are
/// one kernel transaction that cannot be interrupted, so a count whose
/// load, projected from the earlier ones ([`project_load`]), would exceed
/// this is skipped (kube-proxy's nftables layout loads in O(N^2) on
/// current kernels: every service's `numgen` vmap is an anonymous set, and
/// the kernel scans all of the table's sets to name each new one).
const LOAD_BUDGET: Duration = Duration::from_secs(300);

/// What to run: the defaults of `--quick` and the full run, with overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    quick: bool,
    paths: Vec<PathKind>,
    scales: Vec<usize>,
    rounds: usize,
    connections: u32,
    warmup: u32,
    iptables_update_reps: usize,
    nft_update_reps: usize,
    /// Also time iptables-nft (the nft backend) at [`UPDATE_SCALE`], once;
    /// slow (tens of seconds), so only in the full run.
    nft_backend_check: bool,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let mut paths = Vec::new();
        for p in &args.paths {
            if !paths.contains(p) {
                paths.push(*p);
            }
        }
        ensure!(!paths.is_empty(), "--paths: name at least one path");
        let scales = if args.services.is_empty() {
            if args.quick {
                vec![100, 10_000]
            } else {
                vec![100, 1000, 10_000, 50_000]
            }
        } else {
            args.services.clone()
        };
        ensure!(
            scales.windows(2).all(|w| w[0] < w[1]),
            "--services must be ascending and distinct (rules grow from one count to the next): {scales:?}"
        );
        ensure!(
            scales
                .iter()
                .all(|&n| (1..=manifests::MAX_SERVICES).contains(&n)),
            "--services: each count must be 1..={}",
            manifests::MAX_SERVICES
        );
        // A ruleset load is one kernel transaction nothing can interrupt;
        // each is projected from the ones before (see project_load). These
        // two bounds keep an unprojected or badly projected load short.
        ensure!(
            scales[0] <= MAX_FIRST_SCALE,
            "--services: the first count must be at most {MAX_FIRST_SCALE} (later ones are projected from it)"
        );
        ensure!(
            scales.windows(2).all(|w| w[1] <= w[0] * MAX_STEP),
            "--services: each count may be at most {MAX_STEP}x the previous one"
        );
        let rounds = args.rounds.unwrap_or(5);
        ensure!((1..=20).contains(&rounds), "--rounds must be 1..=20");
        let connections = args
            .connections
            .unwrap_or(if args.quick { 1000 } else { 2000 });
        ensure!(
            (10..=20_000).contains(&connections),
            "--connections must be 10..=20000"
        );
        Ok(Self {
            quick: args.quick,
            paths,
            scales,
            rounds,
            connections,
            warmup: (connections / 10).max(10),
            iptables_update_reps: if args.quick { 3 } else { 5 },
            nft_update_reps: if args.quick { 5 } else { 10 },
            nft_backend_check: !args.quick && args.paths.contains(&PathKind::Iptables),
        })
    }

    fn has(&self, p: PathKind) -> bool {
        self.paths.contains(&p)
    }
}

/// One batch of connections as labtool reported it.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    conn_per_s: f64,
    ok: u64,
    stopped_early: bool,
}

/// The reduced result of one path at one service count.
#[derive(Debug, Clone, PartialEq)]
struct PathResult {
    path: PathKind,
    services: usize,
    p50_us: f64,
    p99_us: f64,
    conn_per_s: f64,
}

impl PathResult {
    /// Median over rounds of each round's p50, p99 and rate.
    fn from_rounds(path: PathKind, services: usize, rounds: &[Sample]) -> Option<Self> {
        let col = |f: fn(&Sample) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
        Some(Self {
            path,
            services,
            p50_us: median(&col(|s| s.p50_us))?,
            p99_us: median(&col(|s| s.p99_us))?,
            conn_per_s: median(&col(|s| s.conn_per_s))?,
        })
    }
}

/// Single-service change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Remove => "remove",
        }
    }
}

/// How long one kind of single-service change took, over repetitions.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateResult {
    pub path: PathKind,
    pub services: usize,
    pub op: Op,
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

impl UpdateResult {
    fn from_samples(path: PathKind, services: usize, op: Op, us: &[f64]) -> Option<Self> {
        Some(Self {
            path,
            services,
            op,
            p50_us: median(us)?,
            p99_us: percentile(us, 99.0)?,
            samples: us.len(),
        })
    }
}

/// Meshless single-service add/remove at `services` installed services,
/// written straight into the pinned LB maps of node `node`
/// (`lab.pin_dir(node)`) through `meshless_maps::LbMaps`, the same calls the
/// agent's reconciler makes: add = write the backend set + point the frontend
/// at it (the backends already exist, as for any service of an existing
/// deployment); remove = delete the frontend + its set. Each sample is one
/// whole add or remove, timed in-process (no exec overhead, unlike the
/// iptables/nft figures, which include ~3 ms of `ip netns exec`).
fn meshless_update_timings(
    lab: &Lab,
    node: usize,
    backends: &[Ipv4Addr],
    services: usize,
    reps: usize,
) -> anyhow::Result<Vec<UpdateResult>> {
    use meshless_common::{ServiceKey, ServiceValue, family, lb};
    let mut maps =
        meshless_maps::LbMaps::open(&lab.pin_dir(node)).context("opening the pinned LB maps")?;
    let installed = maps.services()?.len();
    ensure!(
        installed >= services,
        "only {installed} frontends installed on n{node}, expected {services}"
    );
    let by_addr: BTreeMap<[u8; 4], u32> = maps
        .backends()?
        .into_iter()
        .filter(|(_, b)| b.family == family::IPV4)
        .map(|(id, b)| ([b.addr[0], b.addr[1], b.addr[2], b.addr[3]], id))
        .collect();
    let ids: Vec<u32> = backends
        .iter()
        .map(|a| {
            by_addr
                .get(&a.octets())
                .copied()
                .with_context(|| format!("backend {a} is not in ml_backends"))
        })
        .collect::<anyhow::Result<_>>()?;
    // Cheap operations: take enough samples for a p99.
    let reps = reps.clamp(200, 250);
    let mut add = Vec::with_capacity(reps);
    let mut remove = Vec::with_capacity(reps);
    for i in 0..reps {
        let n = u8::try_from(i).unwrap_or(u8::MAX);
        let mut addr = [0u8; 16];
        // 198.19.250.x: outside the range the bench's services use.
        addr[..4].copy_from_slice(&[198, 19, 250, n]);
        let key = ServiceKey {
            addr,
            port: 80,
            protocol: lb::PROTO_TCP,
            family: family::IPV4,
        };
        let set_id = 0xF000_0000 + u32::from(n);
        let value = ServiceValue {
            set_id,
            slots: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            flags: 0,
            maglev_size: 0,
            affinity_timeout_s: 0,
            service_id: 0xF000_0000 + u32::from(n),
        };
        let t = Instant::now();
        maps.write_set(set_id, &ids)?;
        maps.put_service(&key, &value)?;
        add.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        maps.remove_service(&key)?;
        maps.delete_set(set_id, value.slots);
        remove.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok([(Op::Add, add), (Op::Remove, remove)]
        .into_iter()
        .filter_map(|(op, us)| UpdateResult::from_samples(PathKind::Meshless, services, op, &us))
        .collect())
}

/// Projects how long loading `n` services takes from earlier loads
/// `(count, seconds)`: `t = a*n + b*n^2` through the last two (the
/// quadratic term is what kube-proxy's nftables layout shows), linear from
/// a single one. [`Plan::new`] bounds how far one step may jump, so a
/// linear guess from one small load cannot hide a very long load.
fn project_load(seen: &[(usize, f64)], n: usize) -> Option<f64> {
    let x = n as f64;
    match seen {
        [] => None,
        [(n0, t0)] => Some(t0 / *n0 as f64 * x),
        [.., (n1, t1), (n2, t2)] => {
            let (x1, x2) = (*n1 as f64, *n2 as f64);
            let b = ((t2 / x2 - t1 / x1) / (x2 - x1)).max(0.0);
            let a = (t1 / x1 - b * x1).max(0.0);
            Some(a * x + b * x * x)
        }
    }
}

/// `text` without terminal colour sequences (`ESC [ ... m`), for logs
/// quoted in errors.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `ip netns exec <ns> <program>`: the only way this bench runs iptables and nft.
fn in_netns(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd`, failing with its stderr; returns how long it took.
fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let shown = util::show(cmd);
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    let took = start.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.lines().take(10).collect::<Vec<_>>().join("\n");
        bail!("`{shown}` failed ({}): {err}", out.status);
    }
    Ok(took)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Where the workspace binaries are.
fn bin_dir() -> PathBuf {
    if std::env::var_os("MESHLESS_BIN_DIR").is_none()
        && let Some(target) = std::env::var_os("CARGO_TARGET_DIR")
    {
        return Path::new(&target).join("debug");
    }
    util::bin_dir()
}

/// Builds what the chosen paths run (labtool always, the agent for
/// `meshless`) and returns the binary directory.
fn build(plan: &Plan, skip: bool) -> anyhow::Result<PathBuf> {
    let mut bins = vec!["meshless-labtool"];
    if plan.has(PathKind::Meshless) {
        bins.push("meshless-agent");
    }
    if !skip {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "meshless-lab",
            "--bin",
            "meshless-labtool",
        ]);
        if plan.has(PathKind::Meshless) {
            cmd.args(["-p", "meshless-agent", "--bin", "meshless-agent"]);
        }
        util::run(&mut cmd)?;
    }
    let dir = bin_dir();
    for bin in bins {
        ensure!(
            dir.join(bin).exists(),
            "{} is missing; build it (`cargo build --bins`) or point MESHLESS_BIN_DIR at it",
            dir.join(bin).display()
        );
    }
    Ok(dir)
}

/// The peers' tools, checked before a lab is built.
fn check_tools(plan: &Plan) -> anyhow::Result<()> {
    let mut need = Vec::new();
    if plan.has(PathKind::Iptables) {
        need.push("iptables-legacy-restore");
        if plan.nft_backend_check {
            need.push("iptables-nft-restore");
        }
    }
    if plan.has(PathKind::Nftables) {
        need.push("nft");
    }
    for tool in need {
        ensure!(
            util::output(Command::new(tool).arg("--version")).is_some(),
            "`{tool}` is not installed; `cargo xtask setup` installs iptables and nftables"
        );
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let loadavg_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let plan = Plan::new(args)?;
    util::require_root("cargo xtask bench lb")?;
    check_tools(&plan)?;
    let bins = build(&plan, args.skip_build)?;
    let mut bench = Bench::new(&plan, &bins)?;
    let outcome = bench.measure();
    let mut report = bench.report(start);
    report["loadavg_start"] = serde_json::json!(loadavg_start.trim());
    let lab_name = bench.lab.name().to_owned();
    drop(bench);
    println!("\n== lab {lab_name} removed");
    outcome?;
    let path = super::write_report("lb", &report)?;
    println!("wrote {} ({} total)", path.display(), util::elapsed(start));
    Ok(())
}

/// Everything one bench run holds. Processes are declared before the lab
/// so they are stopped before it is torn down.
struct Bench<'a> {
    plan: &'a Plan,
    agent_bin: PathBuf,
    labtool: PathBuf,
    agent: Option<LabProcess>,
    servers: Vec<LabProcess>,
    clients: BTreeMap<PathKind, Pod>,
    backends: Vec<Ipv4Addr>,
    cluster: kubeproxy::Cluster,
    /// Paths that stopped working, with why; they are not measured again.
    failed: BTreeMap<PathKind, String>,
    /// Paths left out from some service count on (not broken: too slow to
    /// load within [`LOAD_BUDGET`]), with the count and why.
    skipped: BTreeMap<PathKind, (usize, String)>,
    /// Each path's (service count, load time) so far, for projections.
    loaded: BTreeMap<PathKind, Vec<(usize, f64)>>,
    rounds: BTreeMap<(usize, PathKind), Vec<Sample>>,
    loads: Vec<serde_json::Value>,
    updates: Vec<UpdateResult>,
    update_detail: serde_json::Map<String, serde_json::Value>,
    notes: Vec<String>,
    phases: Vec<(String, Duration)>,
    nft_backend: Option<serde_json::Value>,
    lab: Lab,
}

impl<'a> Bench<'a> {
    fn new(plan: &'a Plan, bins: &Path) -> anyhow::Result<Self> {
        let t = Instant::now();
        let name = meshless_lab::unique_name("lb");
        println!("== lab {name}: 5 nodes, direct routing");
        let mut lab = Lab::create(LabSpec::new(&name).nodes(5).routing(Routing::Direct))?;
        let mut clients = BTreeMap::new();
        for p in [
            PathKind::Direct,
            PathKind::Iptables,
            PathKind::Nftables,
            PathKind::Meshless,
        ] {
            let pod = lab.add_pod(p.node(), &format!("client-{p}"))?;
            // A full run opens tens of thousands of connections per client
            // within TIME_WAIT's 60 s: give the client every port.
            timed(in_netns(&pod.netns, "sysctl").args([
                "-q",
                "-w",
                "net.ipv4.ip_local_port_range=1024 65535",
            ]))?;
            println!(
                "   {:<9} client {} on {} ({})",
                p.as_str(),
                pod.name,
                lab.node_name(p.node()),
                pod.ipv4
            );
            clients.insert(p, pod);
        }
        let mut backends = Vec::new();
        for i in 1..=BACKENDS {
            let pod = lab.add_pod(BACKEND_NODE, &format!("backend-{i}"))?;
            println!(
                "   backend {} on {} ({}:{})",
                pod.name,
                lab.node_name(BACKEND_NODE),
                pod.ipv4,
                manifests::TARGET_PORT
            );
            backends.push(pod.ipv4);
        }
        let mut bench = Self {
            plan,
            agent_bin: bins.join("meshless-agent"),
            labtool: bins.join("meshless-labtool"),
            agent: None,
            servers: Vec::new(),
            clients,
            backends,
            cluster: kubeproxy::Cluster {
                cluster_cidr: CLUSTER_CIDR,
                service_cidr: SERVICE_CIDR,
            },
            failed: BTreeMap::new(),
            skipped: BTreeMap::new(),
            loaded: BTreeMap::new(),
            rounds: BTreeMap::new(),
            loads: Vec::new(),
            updates: Vec::new(),
            update_detail: serde_json::Map::new(),
            notes: Vec::new(),
            phases: Vec::new(),
            nft_backend: None,
            lab,
        };
        bench.phase("lab", t);
        Ok(bench)
    }

    fn phase(&mut self, name: impl Into<String>, since: Instant) {
        let name = name.into();
        let took = since.elapsed();
        println!("   [{name}: {:.1}s]", took.as_secs_f64());
        self.phases.push((name, took));
    }

    /// Paths still being measured, in round order.
    fn active(&self) -> Vec<PathKind> {
        self.plan
            .paths
            .iter()
            .copied()
            .filter(|p| !self.failed.contains_key(p) && !self.skipped.contains_key(p))
            .collect()
    }

    fn fail(&mut self, path: PathKind, err: &anyhow::Error) {
        let msg = format!("{err:#}");
        println!("   {path}: FAILED, not measured further: {msg}");
        self.failed.insert(path, msg);
        // A failed agent may still be busy: it must not take CPU from the
        // paths still being measured.
        if path == PathKind::Meshless
            && let Some(mut agent) = self.agent.take()
        {
            let _stopped = agent.stop(Duration::from_secs(2));
        }
    }

    fn node_netns(&self, path: PathKind) -> String {
        self.lab.node(path.node()).netns.clone()
    }

    /// A scratch file in the lab's state directory (removed with the lab).
    fn scratch(&self, path: PathKind, name: &str) -> PathBuf {
        self.lab.node_state_dir(path.node()).join(name)
    }

    fn write_scratch(&self, path: PathKind, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let file = self.scratch(path, name);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        Ok(file)
    }

    fn measure(&mut self) -> anyhow::Result<()> {
        self.start_backends()?;
        if self.plan.has(PathKind::Iptables) {
            let t = Instant::now();
            if let Err(e) = self.iptables_jumps() {
                self.fail(PathKind::Iptables, &e);
            }
            self.phase("iptables: kube-proxy jump rules", t);
        }
        let scales = self.plan.scales.clone();
        for n in scales {
            println!("\n== {n} services");
            self.install_all(n);
            self.probe_all(n);
            self.rounds_at(n)?;
            if n == UPDATE_SCALE {
                self.updates_at(n);
            }
        }
        if !self.plan.scales.contains(&UPDATE_SCALE) {
            self.notes.push(format!(
                "single-service updates are timed at {UPDATE_SCALE} services, which was not among --services"
            ));
        }
        if self.plan.nft_backend_check && !self.failed.contains_key(&PathKind::Iptables) {
            let t = Instant::now();
            match self.nft_backend_check() {
                Ok(v) => self.nft_backend = Some(v),
                Err(e) => self
                    .notes
                    .push(format!("iptables-nft backend not timed: {e:#}")),
            }
            self.phase("iptables-nft backend (metadata)", t);
        }
        Ok(())
    }

    fn start_backends(&mut self) -> anyhow::Result<()> {
        let t = Instant::now();
        let pods: Vec<Pod> = self
            .lab
            .pods()
            .iter()
            .filter(|p| p.node == BACKEND_NODE)
            .cloned()
            .collect();
        for pod in &pods {
            let mut cmd = Command::new(&self.labtool);
            cmd.args([
                "tcp-echo",
                "--listen",
                &format!("[::]:{}", manifests::TARGET_PORT),
            ]);
            self.servers
                .push(self.lab.spawn_in_pod(pod, "tcp-echo", cmd)?);
        }
        // Wait until both answer, from the direct client.
        let deadline = Instant::now() + Duration::from_secs(20);
        for ip in self.backends.clone() {
            let to = SocketAddr::V4(SocketAddrV4::new(ip, manifests::TARGET_PORT));
            loop {
                match self.batch(PathKind::Direct, to, 1, 0) {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("echo server {to} never answered")));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.phase("backends up", t);
        Ok(())
    }

    /// One labtool run from `path`'s client pod. Any failed connection
    /// (measured or warm-up) is an error: a path that drops connections is
    /// not measured, it is broken.
    fn batch(
        &self,
        path: PathKind,
        to: SocketAddr,
        count: u32,
        warmup: u32,
    ) -> anyhow::Result<Sample> {
        let pod = &self.clients[&path];
        let mut cmd = Command::new(&self.labtool);
        cmd.args([
            "tcp-connect",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--timeout-ms",
            "1000",
            "--max-duration-ms",
            &MAX_BATCH.as_millis().to_string(),
        ]);
        let out =
            self.lab
                .run_in_pod(pod, "tcp-connect", cmd, MAX_BATCH + Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("labtool tcp-connect printed {out:?}"))?;
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        let (ok, failed, warmup_failed) = (num("ok"), num("failed"), num("warmup_failed"));
        if failed > 0 || warmup_failed > 0 || ok == 0 {
            bail!(
                "{path}: {failed} of {} measured and {warmup_failed} of {warmup} warm-up connections to {to} failed from {} ({}); first errors: {}",
                num("ran"),
                pod.name,
                self.lab.node_name(path.node()),
                v["errors"]
            );
        }
        let f = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| anyhow!("labtool output has no {k}: {v}"))
        };
        Ok(Sample {
            p50_us: f("p50_us")?,
            p99_us: f("p99_us")?,
            conn_per_s: f("conn_per_s")?,
            ok,
            stopped_early: v["stopped_early"].as_bool().unwrap_or(false),
        })
    }

    /// What `path`'s client dials with `n` services installed.
    fn target(&self, path: PathKind, n: usize) -> SocketAddr {
        match path {
            PathKind::Direct => {
                SocketAddr::V4(SocketAddrV4::new(self.backends[0], manifests::TARGET_PORT))
            }
            _ => SocketAddr::V4(SocketAddrV4::new(
                manifests::cluster_ip(n - 1),
                manifests::SERVICE_PORT,
            )),
        }
    }

    // -- installing N services on every path ------------------------------

    fn install_all(&mut self, n: usize) {
        for path in self.active() {
            if path == PathKind::Direct {
                continue;
            }
            let projected = self
                .loaded
                .get(&path)
                .and_then(|seen| project_load(seen, n));
            if path != PathKind::Meshless
                && let Some(projected) = projected
                && projected > LOAD_BUDGET.as_secs_f64()
            {
                let why = format!(
                    "loading {n} services would take ~{projected:.0}s (projected from the loads so far: {}), over the {}s budget",
                    self.loaded[&path]
                        .iter()
                        .map(|(n, t)| format!("{t:.1}s at {n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    LOAD_BUDGET.as_secs()
                );
                println!("   {path}: SKIPPED from {n} services on: {why}");
                self.skipped.insert(path, (n, why));
                continue;
            }
            let t = Instant::now();
            let result = match path {
                PathKind::Iptables => self.install_iptables(n),
                PathKind::Nftables => self.install_nftables(n),
                PathKind::Meshless => self.install_meshless(n),
                PathKind::Direct => Ok(Duration::ZERO),
            };
            match result {
                Ok(took) => {
                    self.loaded
                        .entry(path)
                        .or_default()
                        .push((n, took.as_secs_f64()));
                    println!(
                        "   {path}: {n} services installed in {:.2}s",
                        took.as_secs_f64()
                    );
                    self.loads.push(serde_json::json!({
                        "path": path.as_str(), "services": n, "seconds": took.as_secs_f64(),
                    }));
                }
                Err(e) => self.fail(path, &e),
            }
            self.phase(format!("install {n} services: {path}"), t);
        }
    }

    fn iptables_jumps(&self) -> anyhow::Result<()> {
        let file = self.write_scratch(
            PathKind::Iptables,
            "iptables-jumps.rules",
            &kubeproxy::iptables::jump_rules(),
        )?;
        timed(
            in_netns(
                &self.node_netns(PathKind::Iptables),
                "iptables-legacy-restore",
            )
            .args(["-w", "5", "--noflush"])
            .arg(&file),
        )?;
        Ok(())
    }

    /// Restores a full kube-proxy sync with services `0..n`; returns the
    /// restore time alone.
    fn iptables_restore(&self, n: usize, file_name: &str) -> anyhow::Result<Duration> {
        let file = self.iptables_payload(n, file_name)?;
        self.iptables_restore_file(&file)
    }

    fn iptables_payload(&self, n: usize, file_name: &str) -> anyhow::Result<PathBuf> {
        let services = manifests::service_ports(n, &self.backends);
        let text = kubeproxy::iptables::sync(&self.cluster, &services);
        self.write_scratch(PathKind::Iptables, file_name, &text)
    }

    fn iptables_restore_file(&self, file: &Path) -> anyhow::Result<Duration> {
        // kube-proxy runs `iptables-restore -w 5 -W 100000 --noflush`
        // (utiliptables.RestoreAll with NoFlushTables, NoRestoreCounters).
        timed(
            in_netns(
                &self.node_netns(PathKind::Iptables),
                "iptables-legacy-restore",
            )
            .args(["-w", "5", "--noflush"])
            .arg(file),
        )
    }

    fn install_iptables(&self, n: usize) -> anyhow::Result<Duration> {
        self.iptables_restore(n, "iptables-sync.rules")
    }

    fn nft_file(&self, file: &Path) -> anyhow::Result<Duration> {
        timed(
            in_netns(&self.node_netns(PathKind::Nftables), "nft")
                .arg("-f")
                .arg(file),
        )
    }

    fn install_nftables(&self, n: usize) -> anyhow::Result<Duration> {
        let services = manifests::service_ports(n, &self.backends);
        let text = kubeproxy::nftables::full_sync(&self.cluster, &services);
        let file = self.write_scratch(PathKind::Nftables, "nft-full-sync.nft", &text)?;
        self.nft_file(&file)
    }

    fn manifests_dir(&self) -> PathBuf {
        self.scratch(PathKind::Meshless, "manifests")
    }

    /// Writes the manifests for `n` services (starting the agent the first
    /// time) and waits until the agent reports all `n` frontends installed.
    fn install_meshless(&mut self, n: usize) -> anyhow::Result<Duration> {
        let node = PathKind::Meshless.node();
        let dir = self.manifests_dir();
        let t = Instant::now();
        // Generous (the agent may be a debug build) but bounded.
        let timeout = Duration::from_secs(60) + Duration::from_millis(4 * n as u64);
        manifests::write(&dir, n, &self.backends, &self.lab.node_name(BACKEND_NODE))?;
        if self.agent.is_none() {
            self.agent = Some(self.start_agent(&dir)?);
            // Wait for the pod device to be attached, in short steps so an
            // agent that exits (say, one without --manifests) fails at once.
            let deadline = Instant::now() + timeout;
            loop {
                let step = self.lab.wait_agent_ready(node, Duration::from_millis(200));
                match step {
                    Ok(()) => break,
                    Err(e) => {
                        let running = self.agent.as_mut().is_some_and(LabProcess::is_running);
                        if !running || Instant::now() > deadline {
                            return Err(self.agent_error(anyhow::Error::new(e)));
                        }
                    }
                }
            }
        }
        self.wait_frontends(n, timeout.saturating_sub(t.elapsed()))?;
        Ok(t.elapsed())
    }

    /// meshless-agent on the meshless node with the flags
    /// `Lab::start_agent` passes, plus `--manifests DIR`.
    fn start_agent(&self, manifests_dir: &Path) -> anyhow::Result<LabProcess> {
        let node = PathKind::Meshless.node();
        let pin_root = self
            .lab
            .pin_dir(node)
            .parent()
            .map(Path::to_path_buf)
            .context("pin dir has a parent")?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("--node")
            .arg(self.lab.node_name(node))
            .arg("--cgroup")
            .arg(self.lab.node_cgroup(node))
            .arg("--bpffs-root")
            .arg(pin_root)
            .arg("--pod-device-prefix")
            .arg(meshless_lab::plan::POD_DEVICE_PREFIX)
            .arg("--state-dir")
            .arg(self.lab.node_state_dir(node))
            .arg("--manifests")
            .arg(manifests_dir);
        Ok(self.lab.spawn_on_host(self.lab.node(node), "agent", cmd)?)
    }

    /// Adds what the agent's log says (and whether it still runs) to `err`.
    fn agent_error(&mut self, err: anyhow::Error) -> anyhow::Error {
        let Some(agent) = self.agent.as_mut() else {
            return err;
        };
        let running = agent.is_running();
        let log = strip_ansi(&agent.log());
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        err.context(format!(
            "meshless-agent {} (log {}): {}",
            if running { "is running" } else { "has exited" },
            agent.log_path().display(),
            tail.join(" | ")
        ))
    }

    /// Polls `status.json` until `lb.frontends == want`.
    fn wait_frontends(&mut self, want: usize, timeout: Duration) -> anyhow::Result<()> {
        let path = self
            .lab
            .node_state_dir(PathKind::Meshless.node())
            .join("status.json");
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        loop {
            if let Some(lb) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("lb").cloned())
            {
                if lb["frontends"].as_u64() == Some(want as u64) {
                    return Ok(());
                }
                last = lb;
            }
            let running = self.agent.as_mut().is_some_and(LabProcess::is_running);
            if !running || Instant::now() > deadline {
                let why = if running {
                    format!("timed out after {}s", timeout.as_secs())
                } else {
                    "the agent exited".to_owned()
                };
                let hint = if last.is_null() {
                    " It never reported an `lb` status: does it support --manifests?"
                } else {
                    ""
                };
                let err = anyhow!(
                    "meshless-agent did not report lb.frontends = {want} in {} ({why}); last lb status: {last}.{hint}",
                    path.display()
                );
                return Err(self.agent_error(err));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A few connections per path: the rules must actually send them to a
    /// backend before anything is measured.
    fn probe_all(&mut self, n: usize) {
        for path in self.active() {
            let to = self.target(path, n);
            if let Err(e) = self.batch(path, to, PROBE_CONNECTIONS, 0) {
                self.fail(path, &e.context(format!("probe of {to} with {n} services")));
            }
        }
    }

    fn rounds_at(&mut self, n: usize) -> anyhow::Result<()> {
        let t = Instant::now();
        for round in 1..=self.plan.rounds {
            let mut line = format!("   round {round}/{}:", self.plan.rounds);
            for path in self.active() {
                let to = self.target(path, n);
                match self.batch(path, to, self.plan.connections, self.plan.warmup) {
                    Ok(s) => {
                        line.push_str(&format!("  {path} {:.0}/{:.0}us", s.p50_us, s.p99_us));
                        if s.stopped_early {
                            line.push_str(&format!(" (stopped early: {} ok)", s.ok));
                        }
                        self.rounds.entry((n, path)).or_default().push(s);
                    }
                    Err(e) => {
                        line.push_str(&format!("  {path} FAILED"));
                        self.fail(path, &e);
                    }
                }
            }
            println!("{line}  (p50/p99)");
        }
        self.phase(format!("measure {n} services"), t);
        if self.active().is_empty() {
            bail!("every path failed; see above");
        }
        Ok(())
    }

    // -- single-service updates ------------------------------------------

    fn updates_at(&mut self, n: usize) {
        let t = Instant::now();
        println!("   single-service updates at {n} services:");
        let overhead = self.exec_overhead();
        match overhead {
            Ok(us) => {
                self.update_detail.insert(
                    "ip_netns_exec_overhead_p50_us".into(),
                    serde_json::json!(us),
                );
            }
            Err(e) => self.notes.push(format!("ip netns exec overhead: {e:#}")),
        }
        for path in self.active() {
            let result = match path {
                PathKind::Direct => continue,
                PathKind::Iptables => self.iptables_updates(n),
                PathKind::Nftables => self.nft_updates(n),
                PathKind::Meshless => meshless_update_timings(
                    &self.lab,
                    path.node(),
                    &self.backends,
                    n,
                    self.plan.nft_update_reps,
                ),
            };
            match result {
                Ok(rs) => {
                    for r in &rs {
                        println!(
                            "     {:<9} {:<6} p50 {:>12.0}us  p99 {:>12.0}us  ({} reps)",
                            r.path.as_str(),
                            r.op.as_str(),
                            r.p50_us,
                            r.p99_us,
                            r.samples
                        );
                    }
                    self.updates.extend(rs);
                }
                Err(e) if path == PathKind::Meshless => {
                    println!("     meshless update: not measured ({e:#})");
                    self.notes
                        .push(format!("meshless update: not measured ({e:#})"));
                }
                Err(e) => {
                    println!("     {path} update: FAILED ({e:#})");
                    self.notes.push(format!("{path} update failed: {e:#}"));
                }
            }
        }
        self.phase(format!("updates at {n} services"), t);
    }

    /// What `ip netns exec` itself adds to every timed command (the
    /// update timings include it; kube-proxy runs in the node's netns and
    /// does not pay it).
    fn exec_overhead(&self) -> anyhow::Result<f64> {
        let ns = self.node_netns(PathKind::Nftables);
        let mut samples = Vec::new();
        for _ in 0..10 {
            samples.push(us(timed(&mut in_netns(&ns, "true"))?));
        }
        median(&samples).context("no samples")
    }

    /// Checks that a single-service change took effect: after an add the
    /// new ClusterIP answers, after a remove it does not.
    fn check_vip(&self, path: PathKind, n: usize, reachable: bool) -> anyhow::Result<()> {
        let to = SocketAddr::V4(SocketAddrV4::new(
            manifests::cluster_ip(n),
            manifests::SERVICE_PORT,
        ));
        match (self.batch(path, to, 3, 0), reachable) {
            (Ok(_), true) | (Err(_), false) => Ok(()),
            (Err(e), true) => Err(e.context(format!("{to} does not answer after the add"))),
            (Ok(_), false) => bail!("{to} still answers after the remove"),
        }
    }

    /// iptables mode: every change is a full sync, one `iptables-restore`
    /// of the whole ruleset (n+1 services to add one, n to remove it).
    fn iptables_updates(&mut self, n: usize) -> anyhow::Result<Vec<UpdateResult>> {
        let with = self.iptables_payload(n + 1, "iptables-sync-add.rules")?;
        let without = self.iptables_payload(n, "iptables-sync-remove.rules")?;
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for rep in 0..self.plan.iptables_update_reps {
            add.push(us(self.iptables_restore_file(&with)?));
            if rep == 0 {
                self.check_vip(PathKind::Iptables, n, true)?;
            }
            remove.push(us(self.iptables_restore_file(&without)?));
            if rep == 0 {
                self.check_vip(PathKind::Iptables, n, false)?;
            }
        }
        let p = PathKind::Iptables;
        Ok([(Op::Add, add), (Op::Remove, remove)]
            .into_iter()
            .filter_map(|(op, s)| UpdateResult::from_samples(p, n, op, &s))
            .collect())
    }

    /// nftables mode: every change is one partial-sync transaction
    /// (`nft -f`) touching only the changed service.
    fn nft_updates(&mut self, n: usize) -> anyhow::Result<Vec<UpdateResult>> {
        let p = PathKind::Nftables;
        let svc = manifests::service_port(n, &self.backends);
        let add_file = self.write_scratch(
            p,
            "nft-add.nft",
            &kubeproxy::nftables::add_service(&self.cluster, &svc),
        )?;
        let remove_file = self.write_scratch(
            p,
            "nft-remove.nft",
            &kubeproxy::nftables::remove_service(&svc),
        )?;
        let stale_file = self.write_scratch(
            p,
            "nft-stale.nft",
            &kubeproxy::nftables::delete_stale_chains(&svc),
        )?;
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for rep in 0..self.plan.nft_update_reps {
            add.push(us(self.nft_file(&add_file)?));
            if rep == 0 {
                self.check_vip(p, n, true)?;
            }
            remove.push(us(self.nft_file(&remove_file)?));
            if rep == 0 {
                self.check_vip(p, n, false)?;
            }
            // kube-proxy deletes stale chains in a later sync; untimed here.
            self.nft_file(&stale_file)?;
        }
        // kube-proxy v1.36 also runs ListAll() on every sync, incremental
        // ones included, to find stale chains and sets:
        // `nft --json --terse list table ip kube-proxy` (kubernetes#139513;
        // kubernetes#139878 proposes skipping it on incremental syncs).
        // Timed apart and reported in update_detail, not in the figures.
        let ns = self.node_netns(p);
        let mut lists = Vec::new();
        // Seconds each at 10,000 services: once in --quick.
        for _ in 0..if self.plan.quick { 1 } else { 3 } {
            lists.push(us(timed(in_netns(&ns, "nft").args([
                "--json",
                "--terse",
                "list",
                "table",
                "ip",
                "kube-proxy",
            ]))?));
        }
        self.update_detail.insert(
            "nftables_sync_listall_p50_us".into(),
            serde_json::json!(median(&lists)),
        );
        self.update_detail.insert(
            "nftables_sync_listall".into(),
            serde_json::json!(
                "nft --json --terse list table ip kube-proxy: kube-proxy v1.36 runs it before every sync's transaction (kubernetes#139513)"
            ),
        );
        Ok([(Op::Add, add), (Op::Remove, remove)]
            .into_iter()
            .filter_map(|(op, s)| UpdateResult::from_samples(p, n, op, &s))
            .collect())
    }

    /// For the metadata: the same full restores with iptables' nft backend
    /// (`iptables-nft-restore`, Debian's default `iptables-restore`), once,
    /// in the direct node's netns after every measurement is done.
    fn nft_backend_check(&self) -> anyhow::Result<serde_json::Value> {
        let n = UPDATE_SCALE;
        let ns = self.node_netns(PathKind::Direct);
        let jumps = self.write_scratch(
            PathKind::Direct,
            "iptables-nft-jumps.rules",
            &kubeproxy::iptables::jump_rules(),
        )?;
        let restore = |file: &Path| {
            timed(
                in_netns(&ns, "iptables-nft-restore")
                    .args(["-w", "5", "--noflush"])
                    .arg(file),
            )
        };
        restore(&jumps)?;
        let services = manifests::service_ports(n + 1, &self.backends);
        let initial = self.write_scratch(
            PathKind::Direct,
            "iptables-nft-sync.rules",
            &kubeproxy::iptables::sync(&self.cluster, &services[..n]),
        )?;
        let add = self.write_scratch(
            PathKind::Direct,
            "iptables-nft-sync-add.rules",
            &kubeproxy::iptables::sync(&self.cluster, &services),
        )?;
        let load = restore(&initial)?;
        let resync = restore(&add)?;
        println!(
            "   iptables-nft backend at {n} services: initial restore {:.1}s, full sync adding one service {:.1}s",
            load.as_secs_f64(),
            resync.as_secs_f64()
        );
        Ok(serde_json::json!({
            "services": n,
            "initial_restore_us": us(load),
            "add_one_service_full_restore_us": us(resync),
        }))
    }

    // -- output -----------------------------------------------------------

    fn results(&self) -> Vec<PathResult> {
        let mut out = Vec::new();
        for &n in &self.plan.scales {
            for &p in &self.plan.paths {
                if let Some(r) = self
                    .rounds
                    .get(&(n, p))
                    .and_then(|rs| PathResult::from_rounds(p, n, rs))
                {
                    out.push(r);
                }
            }
        }
        out
    }

    fn print_tables(&self, results: &[PathResult]) {
        println!(
            "\n== connect + 1-byte echo + close to the last of N services (median over {} rounds of {} connections)",
            self.plan.rounds, self.plan.connections
        );
        println!(
            "   {:>8}  {:<9} {:>9} {:>9} {:>9}  {:>12}",
            "services", "path", "p50_us", "p99_us", "conn/s", "p50 / direct"
        );
        for r in results {
            let direct = results
                .iter()
                .find(|d| d.services == r.services && d.path == PathKind::Direct);
            let ratio = direct.map_or_else(
                || "-".to_owned(),
                |d| format!("{:.2}x", r.p50_us / d.p50_us),
            );
            println!(
                "   {:>8}  {:<9} {:>9.1} {:>9.1} {:>9.0}  {:>12}",
                r.services,
                r.path.as_str(),
                r.p50_us,
                r.p99_us,
                r.conn_per_s,
                ratio
            );
        }
        if !self.updates.is_empty() {
            println!("\n== one service added / removed with {UPDATE_SCALE} installed");
            println!(
                "   {:<9} {:<6} {:>12} {:>12} {:>5}",
                "path", "op", "p50_us", "p99_us", "reps"
            );
            for u in &self.updates {
                println!(
                    "   {:<9} {:<6} {:>12.0} {:>12.0} {:>5}",
                    u.path.as_str(),
                    u.op.as_str(),
                    u.p50_us,
                    u.p99_us,
                    u.samples
                );
            }
        }
        for (path, why) in &self.failed {
            println!("   {path}: FAILED: {why}");
        }
        for (path, (n, why)) in &self.skipped {
            println!("   {path}: not measured from {n} services on: {why}");
        }
        for note in &self.notes {
            println!("   note: {note}");
        }
    }

    fn report(&self, start: Instant) -> serde_json::Value {
        let results = self.results();
        self.print_tables(&results);
        println!("\n== phases");
        for (name, took) in &self.phases {
            println!("   {:>7.1}s  {name}", took.as_secs_f64());
        }
        let mut report = super::machine();
        let tool_version = |tool: &str| util::output(Command::new(tool).arg("--version"));
        let extra = serde_json::json!({
            "bench": "lb",
            "results": results.iter().map(|r| serde_json::json!({
                "path": r.path.as_str(), "services": r.services,
                "p50_us": r.p50_us, "p99_us": r.p99_us, "conn_per_s": r.conn_per_s,
            })).collect::<Vec<_>>(),
            "update": self.updates.iter().map(|u| serde_json::json!({
                "path": u.path.as_str(), "services": u.services, "op": u.op.as_str(),
                "p50_us": u.p50_us, "p99_us": u.p99_us,
            })).collect::<Vec<_>>(),
            "quick": self.plan.quick,
            "paths": self.plan.paths.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "scales": self.plan.scales,
            "rounds": self.plan.rounds,
            "connections_per_round": self.plan.connections,
            "warmup_per_round": self.plan.warmup,
            "update_reps": {"iptables": self.plan.iptables_update_reps, "nftables": self.plan.nft_update_reps},
            "target": "svc-<N-1> (the last rule of a linear KUBE-SERVICES list); direct: backend-1's pod IP",
            "measure": "labtool tcp-connect: connect, send 1 byte, read the echo, close; one connection at a time; \
                        per round p50/p99 over the round's connections, reported: median over rounds; \
                        conn_per_s: measured connections / wall clock of the round",
            "topology": {
                "nodes": 5, "routing": "direct",
                "clients": {"direct": "n1", "iptables": "n2", "nftables": "n3", "meshless": "n4"},
                "backends": self.backends.iter().map(|b| format!("{b}:{}", manifests::TARGET_PORT)).collect::<Vec<_>>(),
                "backend_node": "n5",
            },
            "iptables_backend": format!("legacy (iptables-legacy-restore; {})",
                tool_version("iptables-legacy").unwrap_or_default()),
            "nft_version": tool_version("nft"),
            "kube_proxy_layout_sources": {
                "iptables": "kubernetes pkg/proxy/iptables/proxier.go (+ proxier_test.go expectations)",
                "nftables": "kubernetes pkg/proxy/nftables/proxier.go @ b0f823e6ccd8a10b3893fc75011b9981af39285c",
            },
            "update_ops": {
                "iptables": "one full sync: iptables-legacy-restore --noflush of the whole ruleset (n+1 services to add, n to remove)",
                "nftables": "one partial-sync transaction via nft -f (add: the service's chains, rules and map elements; remove: delete its elements, flush its chains)",
                "timing": "wall clock of `ip netns exec <node netns> <tool> FILE`, so each figure includes the tool's exec and ip-netns-exec (see update_detail)",
            },
            "update_detail": self.update_detail,
            "load": self.loads,
            "failed": self.failed.iter().map(|(p, e)| serde_json::json!({"path": p.as_str(), "error": e})).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(p, (n, why))| serde_json::json!({"path": p.as_str(), "from_services": n, "reason": why})).collect::<Vec<_>>(),
            "notes": self.notes,
            "iptables_nft_backend": self.nft_backend,
            "phases": self.phases.iter().map(|(n, d)| serde_json::json!({"phase": n, "seconds": d.as_secs_f64()})).collect::<Vec<_>>(),
            "total_seconds": start.elapsed().as_secs_f64(),
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (report.as_object_mut(), extra) {
            obj.extend(more);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn plan(argv: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("lb").chain(argv.iter().copied()))?;
        Plan::new(&cli.args)
    }

    #[test]
    fn quick_and_full_defaults() {
        let q = plan(&["--quick"]).expect("quick");
        assert_eq!(q.scales, vec![100, 10_000]);
        assert_eq!(
            q.paths,
            vec![
                PathKind::Direct,
                PathKind::Meshless,
                PathKind::Iptables,
                PathKind::Nftables
            ]
        );
        assert!(!q.nft_backend_check);
        let f = plan(&[]).expect("full");
        assert_eq!(f.scales, vec![100, 1000, 10_000, 50_000]);
        assert!(f.nft_backend_check);
        assert!(f.scales.contains(&UPDATE_SCALE) && q.scales.contains(&UPDATE_SCALE));
    }

    #[test]
    fn paths_subset_keeps_order_and_drops_duplicates() {
        let p = plan(&["--paths", "nftables,direct,nftables"]).expect("paths");
        assert_eq!(p.paths, vec![PathKind::Nftables, PathKind::Direct]);
        assert!(
            !p.nft_backend_check,
            "no iptables path, no iptables-nft check"
        );
        assert!(plan(&["--paths", "ipvs"]).is_err());
    }

    #[test]
    fn bad_scales_are_rejected() {
        assert!(plan(&["--services", "1000,100"]).is_err());
        assert!(plan(&["--services", "0"]).is_err());
        assert!(plan(&["--services", "70000"]).is_err());
        assert!(
            plan(&["--services", "20000"]).is_err(),
            "first count too big"
        );
        assert!(plan(&["--services", "10,5000"]).is_err(), "step too big");
        assert_eq!(
            plan(&["--services", "5,50"]).expect("ok").scales,
            vec![5, 50]
        );
    }

    #[test]
    fn agent_logs_lose_their_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=1"),
            "2026  INFO x=1"
        );
    }

    #[test]
    fn load_projection_sees_quadratic_growth() {
        assert_eq!(project_load(&[], 10), None);
        // One load: linear.
        let one = project_load(&[(100, 0.1)], 10_000).expect("projection");
        assert!((one - 10.0).abs() < 1e-9, "{one}");
        // nftables-like: 0.6 s at 1000, 58 s at 10000 -> ~1450 s at 50000.
        let nft =
            project_load(&[(100, 0.1), (1000, 0.6), (10_000, 58.0)], 50_000).expect("projection");
        assert!((1300.0..1600.0).contains(&nft), "{nft}");
        // iptables-like, near linear: stays near linear.
        let ipt = project_load(&[(1000, 0.1), (10_000, 1.0)], 50_000).expect("projection");
        assert!((4.9..5.1).contains(&ipt), "{ipt}");
    }

    #[test]
    fn results_are_medians_over_rounds() {
        let s = |p50, p99, cps| Sample {
            p50_us: p50,
            p99_us: p99,
            conn_per_s: cps,
            ok: 100,
            stopped_early: false,
        };
        let r = PathResult::from_rounds(
            PathKind::Iptables,
            100,
            &[
                s(10.0, 50.0, 1000.0),
                s(30.0, 90.0, 3000.0),
                s(20.0, 70.0, 2000.0),
            ],
        )
        .expect("rounds");
        assert_eq!((r.p50_us, r.p99_us, r.conn_per_s), (20.0, 70.0, 2000.0));
        assert!(PathResult::from_rounds(PathKind::Direct, 1, &[]).is_none());
        let u = UpdateResult::from_samples(PathKind::Nftables, 10, Op::Add, &[3.0, 1.0, 2.0])
            .expect("samples");
        assert_eq!((u.p50_us, u.p99_us, u.samples), (2.0, 3.0, 3));
    }
}
