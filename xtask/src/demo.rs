//! `cargo xtask demo`: the main job on the local lab, end to end.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use meshless_common::{direction, stat};
use meshless_lab::{Lab, LabSpec, Pod, Routing};
use meshless_maps::{PacketCounters, Stats};

use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How pod traffic crosses nodes: direct or vxlan.
    #[arg(long, default_value = "direct")]
    routing: Routing,
    /// UDP datagrams to send per address family.
    #[arg(long, default_value_t = 1000)]
    datagrams: u32,
    /// TCP connections to open.
    #[arg(long, default_value_t = 100)]
    connections: u32,
    /// Skip `cargo xtask setup` (already done).
    #[arg(long)]
    skip_setup: bool,
    /// Use the binaries already built (target/debug or $MESHLESS_BIN_DIR).
    #[arg(long)]
    skip_build: bool,
}

const T: Duration = Duration::from_secs(30);

struct Ctx<'a> {
    lab: &'a Lab,
    labtool: std::path::PathBuf,
}

impl Ctx<'_> {
    fn client(&self, pod: &Pod, args: &[String]) -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new(&self.labtool);
        cmd.args(args);
        let out = self.lab.run_in_pod(pod, &args[0], cmd, T)?;
        serde_json::from_str(out.trim()).with_context(|| format!("labtool printed {out:?}"))
    }

    fn udp(&self, from: &Pod, to: SocketAddr, count: u32) -> anyhow::Result<u64> {
        let v = self.client(
            from,
            &[
                "udp-send".into(),
                "--to".into(),
                to.to_string(),
                "--count".into(),
                count.to_string(),
            ],
        )?;
        Ok(v["received"].as_u64().unwrap_or(0))
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    if !args.skip_setup {
        crate::setup::run(&crate::setup::Args::default())?;
    }
    util::require_root("cargo xtask demo")?;
    let bins = util::build_bins(args.skip_build)?;
    let name = meshless_lab::unique_name("demo");
    println!(
        "\n== 1. a two-node lab ({} routing): {name}",
        args.routing.as_str()
    );
    let mut lab = Lab::create(LabSpec::new(&name).routing(args.routing))?;
    let client = lab.add_pod(1, "client")?;
    let neighbour = lab.add_pod(1, "neighbour")?;
    let server = lab.add_pod(2, "server")?;
    for p in lab.pods() {
        println!(
            "   pod {:<10} on {}  {} / {}",
            p.name,
            lab.node_name(p.node),
            p.ipv4,
            p.ipv6
        );
    }

    println!("\n== 2. meshless-agent on every node loads and attaches the eBPF datapath");
    let _agents = [
        lab.start_agent(1, &bins.join("meshless-agent"))?,
        lab.start_agent(2, &bins.join("meshless-agent"))?,
    ];
    for node in [1, 2] {
        lab.wait_agent_ready(node, T)?;
        println!(
            "   {}: maps pinned in {}",
            lab.node_name(node),
            lab.pin_dir(node).display()
        );
    }

    println!("\n== 3. traffic between pods");
    let labtool = bins.join("meshless-labtool");
    let mut servers = Vec::new();
    for pod in [&server, &neighbour] {
        for (kind, port) in [("udp-echo", 7000), ("tcp-echo", 7100)] {
            let mut cmd = Command::new(&labtool);
            cmd.args([kind, "--listen", &format!("[::]:{port}")]);
            servers.push(lab.spawn_in_pod(pod, kind, cmd)?);
        }
    }
    let ctx = Ctx { lab: &lab, labtool };
    // Warm-up: wait for the servers, and take a baseline after it.
    let deadline = Instant::now() + T;
    while ctx.udp(&client, (server.ipv4, 7000).into(), 1)? != 1
        || ctx.udp(&client, (neighbour.ipv4, 7000).into(), 1)? != 1
    {
        ensure!(Instant::now() < deadline, "echo servers never answered");
    }
    let before = Snapshot::take(&lab)?;
    let n = args.datagrams;
    let cross4 = ctx.udp(&client, (server.ipv4, 7000).into(), n)?;
    let cross6 = ctx.udp(&client, (server.ipv6, 7000).into(), n)?;
    let local4 = ctx.udp(&client, (neighbour.ipv4, 7000).into(), n)?;
    let tcp = ctx.client(
        &client,
        &[
            "tcp-connect".into(),
            "--to".into(),
            format!("{}:7100", server.ipv4),
            "--count".into(),
            args.connections.to_string(),
        ],
    )?;
    println!("   client -> server  UDP/IPv4 {cross4}/{n} echoed (cross-node)");
    println!("   client -> server  UDP/IPv6 {cross6}/{n} echoed (cross-node)");
    println!("   client -> neighbour UDP/IPv4 {local4}/{n} echoed (same node)");
    println!(
        "   client -> server  TCP {}/{} connections, p50 {} us",
        tcp["ok"], args.connections, tcp["p50_us"]
    );
    let after = Snapshot::take(&lab)?;

    println!("\n== 4. what the datapath saw (pinned maps, read back from bpffs)");
    print_counters(&lab)?;
    let stats_delta = |node: usize, s: u32| {
        after.stats[node - 1][s as usize] - before.stats[node - 1][s as usize]
    };
    println!(
        "   {:<14} {:>10} {:>10} {:>10}",
        "node", "tc_packets", "connect4", "connect6"
    );
    for node in [1, 2] {
        println!(
            "   {:<14} {:>10} {:>10} {:>10}",
            lab.node_name(node),
            stats_delta(node, stat::TC_PACKETS),
            stats_delta(node, stat::CONNECT4),
            stats_delta(node, stat::CONNECT6)
        );
    }

    println!("\n== 5. check: the datapath counted exactly what was sent");
    let udp_pkts = |s: &Snapshot, node, ifindex, dir, src: IpAddr, dst: IpAddr| {
        s.packets(node, ifindex, dir, 17, src, dst)
    };
    let checks = [
        (
            "client sent to server (IPv4), seen on n1",
            n,
            udp_pkts(
                &after,
                1,
                client.host_ifindex,
                direction::FROM_POD,
                client.ipv4.into(),
                server.ipv4.into(),
            ) - udp_pkts(
                &before,
                1,
                client.host_ifindex,
                direction::FROM_POD,
                client.ipv4.into(),
                server.ipv4.into(),
            ),
        ),
        (
            "server received from client (IPv4), seen on n2",
            n,
            udp_pkts(
                &after,
                2,
                server.host_ifindex,
                direction::TO_POD,
                client.ipv4.into(),
                server.ipv4.into(),
            ) - udp_pkts(
                &before,
                2,
                server.host_ifindex,
                direction::TO_POD,
                client.ipv4.into(),
                server.ipv4.into(),
            ),
        ),
        (
            "server received from client (IPv6), seen on n2",
            n,
            udp_pkts(
                &after,
                2,
                server.host_ifindex,
                direction::TO_POD,
                client.ipv6.into(),
                server.ipv6.into(),
            ) - udp_pkts(
                &before,
                2,
                server.host_ifindex,
                direction::TO_POD,
                client.ipv6.into(),
                server.ipv6.into(),
            ),
        ),
        (
            "neighbour received from client, seen on n1",
            n,
            udp_pkts(
                &after,
                1,
                neighbour.host_ifindex,
                direction::TO_POD,
                client.ipv4.into(),
                neighbour.ipv4.into(),
            ) - udp_pkts(
                &before,
                1,
                neighbour.host_ifindex,
                direction::TO_POD,
                client.ipv4.into(),
                neighbour.ipv4.into(),
            ),
        ),
        // udp-send connect()s its socket too: two IPv4 clients, one IPv6.
        (
            "IPv4 connect() calls on n1 (TCP clients + 2 UDP clients)",
            args.connections + 2,
            stats_delta(1, stat::CONNECT4),
        ),
        (
            "IPv6 connect() calls on n1 (1 UDP client)",
            1,
            stats_delta(1, stat::CONNECT6),
        ),
        (
            "connect() calls on n2 (its pod only answers)",
            0,
            stats_delta(2, stat::CONNECT4) + stats_delta(2, stat::CONNECT6),
        ),
    ];
    let mut bad = 0;
    for (what, want, got) in checks {
        let ok = got == u64::from(want);
        bad += usize::from(!ok);
        println!(
            "   {} {what}: sent {want}, counted {got}",
            if ok { "ok  " } else { "FAIL" }
        );
    }
    drop(servers);
    drop(lab);
    println!("\n== 6. lab {name} removed (namespaces, links, pins, cgroups, processes)");
    if bad > 0 {
        bail!("{bad} check(s) failed: the datapath did not count what was sent");
    }
    println!("demo passed in {}", util::elapsed(start));
    Ok(())
}

struct Snapshot {
    counters: Vec<Vec<meshless_maps::FlowCount>>,
    stats: Vec<Vec<u64>>,
}

impl Snapshot {
    fn take(lab: &Lab) -> anyhow::Result<Self> {
        let mut counters = Vec::new();
        let mut stats = Vec::new();
        for node in 1..=lab.nodes().len() {
            counters.push(PacketCounters::open(&lab.pin_dir(node))?.read()?);
            let s = Stats::open(&lab.pin_dir(node))?;
            stats.push(
                (0..stat::MAX)
                    .map(|i| s.get(i))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok(Self { counters, stats })
    }

    fn packets(
        &self,
        node: usize,
        ifindex: u32,
        dir: u8,
        proto: u8,
        src: IpAddr,
        dst: IpAddr,
    ) -> u64 {
        self.counters[node - 1]
            .iter()
            .filter(|c| {
                c.ifindex == ifindex
                    && c.direction == dir
                    && c.protocol == proto
                    && c.src == src
                    && c.dst == dst
            })
            .map(|c| c.packets)
            .sum()
    }
}

fn print_counters(lab: &Lab) -> anyhow::Result<()> {
    println!(
        "   {:<14} {:<10} {:<8} {:<5} {:<34} {:>8} {:>10}",
        "node", "pod", "dir", "proto", "flow", "packets", "bytes"
    );
    for node in 1..=lab.nodes().len() {
        for c in PacketCounters::open(&lab.pin_dir(node))?.read()? {
            let pod = lab
                .pods()
                .iter()
                .find(|p| p.node == node && p.host_ifindex == c.ifindex)
                .map_or("?", |p| p.name.as_str());
            let dir = if c.direction == direction::FROM_POD {
                "from-pod"
            } else {
                "to-pod"
            };
            let proto = match c.protocol {
                6 => "tcp",
                17 => "udp",
                1 => "icmp",
                58 => "icmp6",
                _ => "other",
            };
            println!(
                "   {:<14} {:<10} {:<8} {:<5} {:<34} {:>8} {:>10}",
                lab.node_name(node),
                pod,
                dir,
                proto,
                format!("{} -> {}", c.src, c.dst),
                c.packets,
                c.bytes
            );
        }
    }
    Ok(())
}
