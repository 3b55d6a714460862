//! Privileged tier: real network namespaces, veths, VXLAN and cgroups.
//! Run by `cargo xtask test` as root (`cargo test -- --ignored privileged_`).

use std::process::{Command, Stdio};
use std::time::Duration;

use meshless_lab::{Lab, LabError, LabSpec, Pod, Routing, bin_path, require_root, unique_name};

const T: Duration = Duration::from_secs(20);

fn labtool() -> Command {
    Command::new(bin_path("meshless-labtool"))
}

/// Running (not a zombie waiting for init to reap it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
        .collect();
    v.sort();
    v
}

/// Every trace a lab can leave: netns, cgroup, bpffs pins, state dir.
fn assert_nothing_left(name: &str, links_before: &[String]) {
    let netns = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("ml-{name}-")))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "netns left behind: {netns:?}");
    for cg in [
        "/sys/fs/cgroup/unified/meshless-lab",
        "/sys/fs/cgroup/meshless-lab",
    ] {
        let p = std::path::Path::new(cg).join(name);
        assert!(!p.exists(), "cgroup left behind: {}", p.display());
    }
    let pins = std::path::Path::new("/sys/fs/bpf/meshless").join(format!("{name}-n1"));
    assert!(!pins.exists(), "bpffs pins left behind: {}", pins.display());
    let state = std::path::Path::new("/run/meshless-lab").join(name);
    assert!(!state.exists(), "state left behind: {}", state.display());
    assert_eq!(
        root_links(),
        links_before,
        "links in the root namespace changed"
    );
}

fn udp_roundtrip(lab: &Lab, from: &Pod, to: std::net::SocketAddr, count: u32) -> serde_json::Value {
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
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("udp-send printed {out:?}: {e}"))
}

fn connectivity(routing: Routing) {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name("conn")).routing(routing)).expect("lab");
    let a = lab.add_pod(1, "a").expect("pod a");
    let b = lab.add_pod(2, "b").expect("pod b");
    let c = lab.add_pod(1, "c").expect("pod c");
    let mut echo = labtool();
    echo.args(["udp-echo", "--listen", "[::]:7000"]);
    let _b_echo = lab.spawn_in_pod(&b, "echo", echo).expect("echo on b");
    let mut echo = labtool();
    echo.args(["udp-echo", "--listen", "[::]:7000"]);
    let _c_echo = lab.spawn_in_pod(&c, "echo", echo).expect("echo on c");
    // The server may take a moment to bind: the first exchange retries.
    let mut warm = serde_json::Value::Null;
    for _ in 0..50 {
        warm = udp_roundtrip(&lab, &a, (b.ipv4, 7000).into(), 1);
        if warm["received"] == 1 {
            break;
        }
    }
    assert_eq!(warm["received"], 1, "a -> b never answered ({routing:?})");
    for (to, what) in [
        (
            std::net::SocketAddr::from((b.ipv4, 7000)),
            "cross-node IPv4",
        ),
        ((b.ipv6, 7000).into(), "cross-node IPv6"),
        ((c.ipv4, 7000).into(), "same-node IPv4"),
        ((c.ipv6, 7000).into(), "same-node IPv6"),
    ] {
        let r = udp_roundtrip(&lab, &a, to, 20);
        assert_eq!(
            (r["sent"].as_u64(), r["received"].as_u64()),
            (Some(20), Some(20)),
            "{what} via {routing:?}: {r}"
        );
    }
    // The external host reaches node addresses on the fabric, not pods.
    let mut echo = labtool();
    echo.args(["udp-echo", "--listen", "[::]:7001"]);
    let _node_echo = lab
        .spawn_on_host(lab.node(2), "echo", echo)
        .expect("echo on n2");
    let mut send = labtool();
    send.args([
        "udp-send",
        "--to",
        &format!("{}:7001", lab.node(2).ipv4),
        "--count",
        "5",
    ]);
    let mut ok = false;
    for _ in 0..50 {
        let out = lab
            .spawn_on_host(lab.external(), "send", {
                let mut s = labtool();
                s.args(send.get_args().collect::<Vec<_>>());
                s
            })
            .expect("send from ext")
            .wait_success(T)
            .expect("send from ext exits 0");
        if out.contains("\"received\":5") {
            ok = true;
            break;
        }
    }
    assert!(ok, "external host could not reach node n2");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_pods_reach_each_other_direct_routing() {
    connectivity(Routing::Direct);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_pods_reach_each_other_vxlan_overlay() {
    connectivity(Routing::Vxlan);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_name_taken_is_an_error_and_creates_nothing() {
    require_root();
    let name = unique_name("dup");
    let lab = Lab::create(LabSpec::new(&name)).expect("first lab");
    let netns_before = std::fs::read_dir("/run/netns").expect("netns").count();
    let err = Lab::create(LabSpec::new(&name).nodes(3)).expect_err("second lab with the same name");
    assert!(matches!(err, LabError::NameTaken { .. }), "{err}");
    assert!(
        err.to_string().contains("lab down"),
        "error says how to fix it: {err}"
    );
    assert_eq!(
        std::fs::read_dir("/run/netns").expect("netns").count(),
        netns_before,
        "nothing created"
    );
    assert!(
        lab.nodes().len() == 2
            && std::path::Path::new("/run/netns")
                .join(&lab.node(1).netns)
                .exists()
    );
    let bad = Lab::create(LabSpec::new("Bad-Name")).expect_err("invalid name");
    assert!(matches!(bad, LabError::InvalidName { .. }), "{bad}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_drop_removes_everything() {
    require_root();
    let before = root_links();
    let name = unique_name("drop");
    {
        let mut lab = Lab::create(LabSpec::new(&name).routing(Routing::Vxlan)).expect("lab");
        let p = lab.add_pod(2, "p").expect("pod");
        let mut echo = labtool();
        echo.args(["udp-echo", "--listen", "[::]:7000"]);
        let server = lab.spawn_in_pod(&p, "echo", echo).expect("server");
        // Detached: only the lab's cgroup kill can stop it.
        server.detach();
        assert!(lab.process_count() >= 1);
        std::fs::create_dir_all(lab.pin_dir(1)).expect("a pin dir as an agent would make");
    }
    assert_nothing_left(&name, &before);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_panic_mid_test_removes_everything() {
    require_root();
    let before = root_links();
    let name = unique_name("panic");
    let n = name.clone();
    let result = std::thread::spawn(move || {
        let mut lab = Lab::create(LabSpec::new(&n)).expect("lab");
        let p = lab.add_pod(1, "p").expect("pod");
        let mut echo = labtool();
        echo.args(["udp-echo", "--listen", "[::]:7000"]);
        lab.spawn_in_pod(&p, "echo", echo).expect("server").detach();
        panic!("deliberate panic with a lab up");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    assert_nothing_left(&name, &before);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lab_of_a_killed_owner_is_removed_by_destroy() {
    require_root();
    let before = root_links();
    let name = unique_name("crash");
    let mut holder = labtool()
        .args(["hold-lab", "--name", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("hold-lab");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read ready line");
    assert!(line.starts_with("ready "), "hold-lab said {line:?}");
    let server_pid: u32 = line["ready ".len()..].trim().parse().expect("pid");
    holder.kill().expect("SIGKILL the owner");
    holder.wait().expect("reap");
    let listed = meshless_lab::list();
    let info = listed
        .iter()
        .find(|l| l.name == name)
        .expect("crashed lab is listed");
    assert!(
        info.is_stale(),
        "owner is dead, so the lab is stale: {info:?}"
    );
    assert!(
        alive(server_pid),
        "the pod's process outlived its owner (as after a real crash)"
    );
    let report = meshless_lab::destroy(&name).expect("destroy a crashed lab");
    assert!(
        report.removed.iter().any(|r| r.starts_with("netns")),
        "{report:?}"
    );
    assert!(!alive(server_pid), "pod process was killed");
    assert_nothing_left(&name, &before);
}
