//! Lab tier: meshless-operator against a real Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) in the
//! lab, its replicas running on lab nodes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use meshless_lab::{ControlPlane, Lab, LabProcess, LabSpec, require_root, unique_name};

const T: Duration = Duration::from_secs(60);
const POOLS: &str = "198.18.1.0/24,fd00:d::/112";

fn setup(prefix: &str) -> (Lab, ControlPlane) {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name(prefix))).expect("lab");
    let cp = lab.start_control_plane().expect("control plane");
    cp.kubectl(&lab, &["create", "namespace", "meshless-system"])
        .expect("create namespace");
    (lab, cp)
}

fn operator(lab: &Lab, cp: &ControlPlane, node: usize, id: &str, extra: &[&str]) -> LabProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshless-operator"));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--id", id, "--lb-pool", POOLS])
        .args(extra)
        .env("MESHLESS_LOG", "info,meshless_operator=debug");
    lab.spawn_on_host(lab.node(node), &format!("operator-{id}"), cmd)
        .expect("spawn operator")
}

fn sigkill(p: &mut LabProcess) {
    let ok = Command::new("kill")
        .args(["-KILL", &p.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -KILL {}", p.pid());
    p.wait_timeout(Duration::from_secs(10))
        .expect("operator exits");
}

fn eventually<R>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<R>) -> (R, Duration) {
    let start = Instant::now();
    loop {
        if let Some(r) = f() {
            return (r, start.elapsed());
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn holder(lab: &Lab, cp: &ControlPlane) -> Option<String> {
    cp.kubectl(
        lab,
        &[
            "-n",
            "meshless-system",
            "get",
            "lease",
            "meshless-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .ok()
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
}

fn service(name: &str, annotation: Option<&str>, lb_ip: Option<&str>) -> String {
    let ann = annotation.map_or(String::new(), |a| {
        format!("  annotations: {{meshless.dev/lb-ip: \"{a}\"}}\n")
    });
    let ip = lb_ip.map_or(String::new(), |a| format!("  loadBalancerIP: \"{a}\"\n"));
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}spec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n{ip}"
    )
}

/// Every Service's ingress IPs.
fn ingress(lab: &Lab, cp: &ControlPlane) -> BTreeMap<String, Vec<IpAddr>> {
    let out = cp
        .kubectl(lab, &["get", "services", "-A", "-o", "json"])
        .expect("list services");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let mut m = BTreeMap::new();
    for s in v["items"].as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}",
            s["metadata"]["namespace"].as_str().unwrap_or(""),
            s["metadata"]["name"].as_str().unwrap_or("")
        );
        let ips: Vec<IpAddr> = s["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str()?.parse().ok())
            .collect();
        m.insert(name, ips);
    }
    m
}

fn ips_of(lab: &Lab, cp: &ControlPlane, name: &str) -> Vec<IpAddr> {
    ingress(lab, cp)
        .remove(&format!("default/{name}"))
        .unwrap_or_default()
}

/// Waits until the Service shows a v4 and a v6 address; returns them and the wait.
fn wait_dual(
    lab: &Lab,
    cp: &ControlPlane,
    name: &str,
    timeout: Duration,
) -> (Vec<IpAddr>, Duration) {
    eventually(
        &format!("service {name} gets two LB addresses"),
        timeout,
        || {
            let ips = ips_of(lab, cp, name);
            (ips.len() == 2).then_some(ips)
        },
    )
}

fn in_pools(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[..3] == [198, 18, 1] && o[3] != 0 && o[3] != 255
        }
        IpAddr::V6(a) => a.segments()[..7] == [0xfd00, 0xd, 0, 0, 0, 0, 0],
    }
}

fn assert_all_distinct(all: &BTreeMap<String, Vec<IpAddr>>) {
    let mut owner: BTreeMap<IpAddr, &String> = BTreeMap::new();
    for (svc, ips) in all {
        for ip in ips {
            if let Some(other) = owner.insert(*ip, svc) {
                panic!("{ip} is the address of both {other} and {svc}: {all:?}");
            }
        }
    }
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_operator_allocates_loadbalancer_addresses() {
    let (lab, cp) = setup("opa");
    let op = operator(&lab, &cp, 1, "a", &[]);
    eventually("operator a elected", T, || {
        (holder(&lab, &cp)? == "a").then_some(())
    });

    cp.apply(&lab, &service("web1", None, None)).expect("web1");
    let (ips1, took) = wait_dual(&lab, &cp, "web1", T);
    assert!(
        ips1.iter().all(|ip| in_pools(*ip)),
        "{ips1:?} outside the pools"
    );
    assert!(
        ips1[0].is_ipv4() && ips1[1].is_ipv6(),
        "spec.ipFamilies order: {ips1:?}"
    );
    eprintln!("web1 got {ips1:?} {took:?} after creation");
    assert!(
        took < Duration::from_secs(3),
        "web1 took {took:?} to get an address"
    );

    cp.apply(&lab, &service("web2", None, None)).expect("web2");
    let (ips2, took2) = wait_dual(&lab, &cp, "web2", T);
    eprintln!("web2 got {ips2:?} {took2:?} after creation");
    assert!(
        ips2.iter().all(|ip| !ips1.contains(ip)),
        "web1 {ips1:?} and web2 {ips2:?} share"
    );

    // A requested address (annotation) is honoured.
    cp.apply(&lab, &service("asked", Some("198.18.1.200"), None))
        .expect("asked");
    let (asked, _) = wait_dual(&lab, &cp, "asked", T);
    assert_eq!(
        asked[0],
        "198.18.1.200".parse::<IpAddr>().unwrap(),
        "{asked:?}"
    );
    // spec.loadBalancerIP too.
    cp.apply(&lab, &service("legacy", None, Some("198.18.1.201")))
        .expect("legacy");
    let (legacy, _) = wait_dual(&lab, &cp, "legacy", T);
    assert_eq!(
        legacy[0],
        "198.18.1.201".parse::<IpAddr>().unwrap(),
        "{legacy:?}"
    );

    // A taken address is refused: no IPv4 address, and an Event that names the field.
    cp.apply(&lab, &service("greedy", Some("198.18.1.200"), None))
        .expect("greedy");
    let (note, _) = eventually("an Event for greedy", T, || {
        let out = cp
            .kubectl(
                &lab,
                &["get", "events.events.k8s.io", "-n", "default", "-o", "json"],
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["items"].as_array()?.iter().find_map(|e| {
            (e["regarding"]["name"] == "greedy")
                .then(|| e["note"].as_str().unwrap_or("").to_owned())
        })
    });
    assert!(
        note.contains("annotation meshless.dev/lb-ip asks for 198.18.1.200, which is already the address of service default/asked"),
        "{note}"
    );
    let greedy = ips_of(&lab, &cp, "greedy");
    assert!(
        greedy.iter().all(IpAddr::is_ipv6),
        "greedy got an IPv4 address: {greedy:?}"
    );

    // Type change releases: web1's IPv4 address goes back to the pool and is
    // the next one handed out (lowest free).
    cp.kubectl(
        &lab,
        &[
            "patch",
            "service",
            "web1",
            "-p",
            r#"{"spec":{"type":"ClusterIP"}}"#,
        ],
    )
    .expect("web1 -> ClusterIP");
    eventually("web1's status is cleared", T, || {
        ips_of(&lab, &cp, "web1").is_empty().then_some(())
    });
    // Deletion releases too.
    cp.kubectl(&lab, &["delete", "service", "web2"])
        .expect("delete web2");
    cp.apply(&lab, &service("web3", None, None)).expect("web3");
    let (ips3, _) = wait_dual(&lab, &cp, "web3", T);
    assert_eq!(ips3, ips1, "web3 reuses web1's released addresses");
    cp.apply(&lab, &service("web4", None, None)).expect("web4");
    let (ips4, _) = wait_dual(&lab, &cp, "web4", T);
    assert_eq!(ips4, ips2, "web4 reuses deleted web2's addresses");
    assert_all_distinct(&ingress(&lab, &cp));
    drop(op);
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_operator_two_replicas_hand_over_without_double_allocation() {
    let (lab, cp) = setup("opb");
    // Short timings so several handovers fit in a test; the bound below
    // scales with them.
    let lease = Duration::from_secs(6);
    let flags = [
        "--lease-duration",
        "6s",
        "--renew-period",
        "1s",
        "--retry-period",
        "1s",
    ];
    let mut ops: BTreeMap<&str, (usize, LabProcess)> = BTreeMap::new();
    ops.insert("a", (1, operator(&lab, &cp, 1, "a", &flags)));
    ops.insert("b", (2, operator(&lab, &cp, 2, "b", &flags)));
    let (mut leader, _) = eventually("a leader", T, || holder(&lab, &cp));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        holder(&lab, &cp).as_deref(),
        Some(leader.as_str()),
        "leadership flapped"
    );
    let follower_log = ops
        .iter()
        .find(|(id, _)| **id != leader)
        .map(|(_, (_, p))| p.log())
        .unwrap_or_default();
    assert!(
        !follower_log.contains("became leader"),
        "both replicas led:\n{follower_log}"
    );
    let mut n = 0;
    let mut create = |lab: &Lab| {
        n += 1;
        let name = format!("s{n}");
        cp.apply(lab, &service(&name, None, None)).expect("service");
        name
    };
    for _ in 0..3 {
        create(&lab);
    }
    let mut takeovers = Vec::new();
    for round in 0..3 {
        let (node, mut p) = ops.remove(leader.as_str()).expect("leader process");
        let killed = Instant::now();
        sigkill(&mut p);
        // Services created while nobody leads.
        let during = [create(&lab), create(&lab)];
        let (new, _) = eventually("the other replica takes over", T, || {
            holder(&lab, &cp).filter(|h| *h != leader)
        });
        let took = killed.elapsed();
        eprintln!("round {round}: {leader} killed, {new} leads after {took:?}");
        assert!(
            took < lease + Duration::from_secs(3),
            "takeover took {took:?}, lease is {lease:?}"
        );
        takeovers.push(took);
        // A Service created after the handover gets addresses promptly.
        let after = create(&lab);
        let (_, t) = wait_dual(&lab, &cp, &after, T);
        assert!(
            t < Duration::from_secs(3),
            "{after} waited {t:?} for an address after the handover"
        );
        for s in &during {
            wait_dual(&lab, &cp, s, T);
        }
        assert_all_distinct(&ingress(&lab, &cp));
        // The killed replica comes back (same identity) and follows.
        let id = if leader == "a" { "a" } else { "b" };
        ops.insert(id, (node, operator(&lab, &cp, node, id, &flags)));
        create(&lab);
        leader = new;
    }
    std::thread::sleep(Duration::from_secs(3));
    let all = ingress(&lab, &cp);
    let lbs: Vec<_> = all
        .iter()
        .filter(|(k, _)| k.starts_with("default/s"))
        .collect();
    assert_eq!(lbs.len(), n, "{all:?}");
    for (k, ips) in &lbs {
        assert_eq!(ips.len(), 2, "{k} has {ips:?}");
    }
    assert_all_distinct(&all);
    eprintln!("takeovers: {takeovers:?}; {n} services, all addresses distinct");
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_operator_assigns_pod_cidrs_to_nodes() {
    let (lab, cp) = setup("opc");
    let node = |name: &str, cidrs: &[&str]| {
        let spec = if cidrs.is_empty() {
            String::new()
        } else {
            format!(
                "spec:\n  podCIDR: {}\n  podCIDRs: [{}]\n",
                cidrs[0],
                cidrs.join(", ")
            )
        };
        format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{spec}")
    };
    // An existing node that already has the first subnets.
    cp.apply(&lab, &node("old", &["198.18.16.0/24", "fd00:b::/64"]))
        .expect("old");
    cp.apply(&lab, &node("new1", &[])).expect("new1");
    let op = operator(&lab, &cp, 1, "a", &["--controllers", "node-ipam"]);
    cp.apply(&lab, &node("new2", &[])).expect("new2");
    let cidrs = |name: &str| -> Vec<String> {
        cp.kubectl(
            &lab,
            &["get", "node", name, "-o", "jsonpath={.spec.podCIDRs}"],
        )
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
    };
    let (c1, took) = eventually("new1 gets pod CIDRs", T, || {
        Some(cidrs("new1")).filter(|c| c.len() == 2)
    });
    let (c2, _) = eventually("new2 gets pod CIDRs", T, || {
        Some(cidrs("new2")).filter(|c| c.len() == 2)
    });
    eprintln!("new1 {c1:?} ({took:?} after new2 was applied), new2 {c2:?}");
    assert_eq!(
        cidrs("old"),
        ["198.18.16.0/24", "fd00:b::/64"],
        "old keeps its CIDRs"
    );
    let mut all = vec![c1.clone(), c2.clone()];
    all.sort();
    assert_eq!(
        all,
        [
            vec!["198.18.17.0/24".to_owned(), "fd00:b:0:1::/64".to_owned()],
            vec!["198.18.18.0/24".to_owned(), "fd00:b:0:2::/64".to_owned()],
        ],
        "distinct, next free, the existing node's skipped"
    );
    let pod_cidr = cp
        .kubectl(
            &lab,
            &["get", "node", "new1", "-o", "jsonpath={.spec.podCIDR}"],
        )
        .expect("podCIDR");
    assert_eq!(pod_cidr.trim(), c1[0]);
    drop(op);
    // A restarted operator rebuilds from the Nodes: nothing reassigned.
    let op = operator(&lab, &cp, 2, "b", &["--controllers", "node-ipam"]);
    cp.apply(&lab, &node("new3", &[])).expect("new3");
    let (c3, _) = eventually("new3 gets pod CIDRs", Duration::from_secs(40), || {
        Some(cidrs("new3")).filter(|c| c.len() == 2)
    });
    assert_eq!(c3, ["198.18.19.0/24", "fd00:b:0:3::/64"]);
    assert_eq!(cidrs("new1"), c1);
    drop(op);
}
