//! Privileged tier: the real agent loads the real datapath into the kernel
//! on lab nodes; assertions read the maps it pinned.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use meshless_common::{direction, stat};
use meshless_lab::{Lab, LabSpec, Pod, Routing, bin_path, require_root, unique_name};
use meshless_maps::{PacketCounters, Stats};

const T: Duration = Duration::from_secs(20);
const UDP: u8 = 17;

fn agent() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_meshless-agent"))
}

fn labtool() -> Command {
    Command::new(bin_path("meshless-labtool"))
}

fn udp(lab: &Lab, from: &Pod, to: SocketAddr, count: u32) -> (u64, u64) {
    let mut cmd = labtool();
    cmd.args([
        "udp-send",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let out = lab
        .run_in_pod(from, "udp-send", cmd, T)
        .expect("udp-send runs");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("udp-send prints JSON");
    (
        v["sent"].as_u64().unwrap_or(0),
        v["received"].as_u64().unwrap_or(0),
    )
}

/// Packets counted on `ifindex` in `dir` for src -> dst over UDP.
fn counted(lab: &Lab, node: usize, ifindex: u32, dir: u8, src: IpAddr, dst: IpAddr) -> u64 {
    let counters = PacketCounters::open(&lab.pin_dir(node)).expect("pinned ml_pkt_count");
    counters
        .read()
        .expect("read counters")
        .iter()
        .filter(|c| {
            c.ifindex == ifindex
                && c.direction == dir
                && c.protocol == UDP
                && c.src == src
                && c.dst == dst
        })
        .map(|c| c.packets)
        .sum()
}

/// The four counters one a -> b exchange touches, on both nodes.
fn snapshot(lab: &Lab, a: &Pod, b: &Pod, v6: bool) -> [u64; 4] {
    let (sa, sb): (IpAddr, IpAddr) = if v6 {
        (a.ipv6.into(), b.ipv6.into())
    } else {
        (a.ipv4.into(), b.ipv4.into())
    };
    [
        counted(lab, a.node, a.host_ifindex, direction::FROM_POD, sa, sb),
        counted(lab, b.node, b.host_ifindex, direction::TO_POD, sa, sb),
        counted(lab, b.node, b.host_ifindex, direction::FROM_POD, sb, sa),
        counted(lab, a.node, a.host_ifindex, direction::TO_POD, sb, sa),
    ]
}

fn cross_node_counts(routing: Routing) {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name("count")).routing(routing)).expect("lab");
    let a = lab.add_pod(1, "a").expect("pod a");
    let b = lab.add_pod(2, "b").expect("pod b");
    let _agents = [
        lab.start_agent(1, &agent()).expect("agent n1"),
        lab.start_agent(2, &agent()).expect("agent n2"),
    ];
    lab.wait_agent_ready(1, T).expect("agent n1 ready");
    lab.wait_agent_ready(2, T).expect("agent n2 ready");
    let mut echo = labtool();
    echo.args(["udp-echo", "--listen", "[::]:7000"]);
    let _server = lab.spawn_in_pod(&b, "echo", echo).expect("echo on b");

    for v6 in [false, true] {
        let to: SocketAddr = if v6 {
            (b.ipv6, 7000).into()
        } else {
            (b.ipv4, 7000).into()
        };
        // Warm up (server bind, neighbour resolution) outside the measurement.
        let mut warmed = false;
        for _ in 0..50 {
            if udp(&lab, &a, to, 1).1 == 1 {
                warmed = true;
                break;
            }
        }
        assert!(warmed, "{to} never answered");
        let before = snapshot(&lab, &a, &b, v6);
        let (sent, received) = udp(&lab, &a, to, 500);
        let after = snapshot(&lab, &a, &b, v6);
        assert_eq!(sent, 500);
        assert_eq!(received, 500, "every echo came back ({routing:?}, v6={v6})");
        let delta: Vec<u64> = after.iter().zip(before).map(|(x, y)| x - y).collect();
        assert_eq!(
            delta,
            vec![500, 500, 500, 500],
            "[a sent @n1, b got @n2, b sent @n2, a got @n1] over {routing:?}, v6={v6}"
        );
    }
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_datapath_counts_cross_node_pod_traffic_direct() {
    cross_node_counts(Routing::Direct);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_datapath_counts_cross_node_pod_traffic_vxlan() {
    cross_node_counts(Routing::Vxlan);
}

fn tcp_connects(lab: &Lab, from: &Pod, to: SocketAddr, count: u32) -> u64 {
    let mut cmd = labtool();
    cmd.args([
        "tcp-connect",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let out = lab
        .run_in_pod(from, "tcp-connect", cmd, T)
        .expect("tcp-connect runs");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(v["failed"], 0, "{v}");
    v["ok"].as_u64().unwrap_or(0)
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_datapath_connect_hooks_detach_on_shutdown_and_adopt_pins() {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name("hook"))).expect("lab");
    let a = lab.add_pod(1, "a").expect("pod a");
    let b = lab.add_pod(2, "b").expect("pod b");
    let mut agent1 = lab
        .start_agent_with(1, &agent(), &["--detach-on-exit"])
        .expect("agent n1");
    let _agent2 = lab.start_agent(2, &agent()).expect("agent n2");
    lab.wait_agent_ready(1, T).expect("n1 ready");
    lab.wait_agent_ready(2, T).expect("n2 ready");
    let mut echo = labtool();
    echo.args(["tcp-echo", "--listen", "[::]:7100"]);
    let _server = lab
        .spawn_in_pod(&b, "tcp-echo", echo)
        .expect("tcp echo on b");
    let stat = |node: usize, index: u32| {
        Stats::open(&lab.pin_dir(node))
            .expect("ml_stats")
            .get(index)
            .expect("read")
    };
    // Wait for the server; these connects count too, so measure after.
    for _ in 0..100 {
        let mut cmd = labtool();
        cmd.args([
            "tcp-connect",
            "--to",
            &format!("{}:7100", b.ipv4),
            "--count",
            "1",
        ]);
        let out = lab.run_in_pod(&a, "probe", cmd, T).expect("probe");
        if out.contains("\"ok\":1") {
            break;
        }
    }
    let (c4, c6, remote4) = (
        stat(1, stat::CONNECT4),
        stat(1, stat::CONNECT6),
        stat(2, stat::CONNECT4),
    );
    assert_eq!(tcp_connects(&lab, &a, (b.ipv4, 7100).into(), 25), 25);
    assert_eq!(tcp_connects(&lab, &a, (b.ipv6, 7100).into(), 7), 7);
    assert_eq!(
        stat(1, stat::CONNECT4) - c4,
        25,
        "one connect4 per IPv4 connection from n1's pod"
    );
    assert_eq!(
        stat(1, stat::CONNECT6) - c6,
        7,
        "one connect6 per IPv6 connection"
    );
    assert_eq!(
        stat(2, stat::CONNECT4),
        remote4,
        "n2's pods made no connections"
    );

    // Shutdown with --detach-on-exit detaches everything but keeps the pinned maps.
    let status = agent1.stop(Duration::from_secs(10)).expect("agent stops");
    assert!(
        status.success(),
        "agent exit: {status}; log:\n{}",
        agent1.log()
    );
    assert!(agent1.log().contains("detached"), "log:\n{}", agent1.log());
    let frozen = stat(1, stat::CONNECT4);
    let frozen_pkts = stat(1, stat::TC_PACKETS);
    assert_eq!(
        tcp_connects(&lab, &a, (b.ipv4, 7100).into(), 10),
        10,
        "traffic flows without an agent"
    );
    assert_eq!(stat(1, stat::CONNECT4), frozen, "connect hook detached");
    assert_eq!(
        stat(1, stat::TC_PACKETS),
        frozen_pkts,
        "TC programs detached"
    );

    // A new agent adopts the pinned maps: counts continue, not restart.
    let _agent1b = lab.start_agent(1, &agent()).expect("agent n1 again");
    lab.wait_agent_ready(1, T).expect("n1 ready again");
    assert_eq!(
        stat(1, stat::CONNECT4),
        frozen,
        "adopted map keeps its values"
    );
    assert_eq!(tcp_connects(&lab, &a, (b.ipv4, 7100).into(), 5), 5);
    assert_eq!(stat(1, stat::CONNECT4), frozen + 5, "hooks attached again");
}

fn status(lab: &Lab) -> serde_json::Value {
    std::fs::read(lab.node_state_dir(1).join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn wait_status(lab: &Lab, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let start = std::time::Instant::now();
    loop {
        let s = status(lab);
        if f(&s) {
            return;
        }
        assert!(start.elapsed() < T, "timed out: {what}; status: {s}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The CNI registers endpoints by writing records; the agent attaches to
/// every device a record names, even one its name prefix would not match,
/// and a malformed record is reported without stopping anything.
#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_datapath_attaches_devices_named_by_cni_records() {
    require_root();
    let lab = Lab::create(LabSpec::new(unique_name("eprec")).nodes(1)).expect("lab");
    let netns = lab.node(1).netns.clone();
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(["-n", &netns])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip -n {netns} {args:?}");
    };
    // Not named like the lab's pod devices (prefix "ml"): only the record
    // tells the agent it is a pod's.
    ip(&[
        "link", "add", "xpod0", "type", "veth", "peer", "name", "xpod0p",
    ]);
    ip(&["link", "set", "xpod0", "up"]);
    ip(&["link", "set", "xpod0p", "up"]);
    let dir = lab.kubelet_state_dir(1).join("endpoints");
    std::fs::create_dir_all(&dir).expect("endpoints dir");
    let record = serde_json::json!({
        "containerId": "c1", "namespace": "default", "pod": "x", "netns": "/run/netns/none",
        "ifname": "eth0", "hostDevice": "xpod0", "addresses": ["198.18.17.99"]
    });
    std::fs::write(dir.join("c1.json"), record.to_string()).expect("record");
    std::fs::write(dir.join("c2.json"), b"{\"containerId\": ").expect("bad record");
    let _agent = lab.start_agent(1, &agent()).expect("agent");
    wait_status(&lab, "xpod0 attached from its record", |s| {
        s["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["name"] == "xpod0"))
    });
    let s = status(&lab);
    assert_eq!(s["endpoints"][0]["pod"], "x", "{s}");
    assert_eq!(
        s["endpoints"][0]["in_api"], false,
        "no source knows pod x: {s}"
    );
    assert!(
        s["errors"].to_string().contains("c2.json"),
        "the malformed record is named: {s}"
    );
    // The record goes (CNI DEL) and then the device: the agent forgets it.
    std::fs::remove_file(dir.join("c1.json")).expect("rm record");
    ip(&["link", "del", "xpod0"]);
    wait_status(&lab, "xpod0 forgotten", |s| {
        s["devices"]
            .as_array()
            .is_some_and(|d| !d.iter().any(|d| d["name"] == "xpod0"))
            && s["endpoints"].as_array().is_some_and(Vec::is_empty)
    });
}
