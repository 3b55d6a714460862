//! Lab tier: meshless-operator against a real Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) in the
//! lab, its replicas running on lab nodes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
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
    let mut args = vec!["--lb-pool", POOLS];
    args.extend_from_slice(extra);
    operator_with(lab, cp, node, id, &args)
}

/// An operator with exactly these flags (no `--lb-pool` unless given).
fn operator_with(lab: &Lab, cp: &ControlPlane, node: usize, id: &str, args: &[&str]) -> LabProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshless-operator"));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--id", id])
        .args(args)
        .env("MESHLESS_LOG", "info,meshless_operator=debug");
    lab.spawn_on_host(lab.node(node), &format!("operator-{id}"), cmd)
        .expect("spawn operator")
}

/// The note of the first Event about Service `name` in `default` whose
/// note satisfies `wanted`.
fn event_note(
    lab: &Lab,
    cp: &ControlPlane,
    name: &str,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    let out = cp
        .kubectl(
            lab,
            &["get", "events.events.k8s.io", "-n", "default", "-o", "json"],
        )
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["items"].as_array()?.iter().find_map(|e| {
        let note = e["note"].as_str().unwrap_or("");
        (e["regarding"]["name"] == name && wanted(note)).then(|| note.to_owned())
    })
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
    // Flags only, and no CRD: LB-IPAM must serve --lb-pool without the
    // LoadBalancerIPPool CRD (the list answers 404, so no pool can exist).
    let op = operator(&lab, &cp, 1, "a", &["--install-crds=false"]);
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
        event_note(&lab, &cp, "greedy", |_| true)
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
    assert!(
        live_crd(&lab, &cp).is_none(),
        "--install-crds=false installed {POOL_CRD}"
    );
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

const POOL_CRD: &str = "loadbalancerippools.meshless.dev";

fn example(path: &str) -> String {
    format!("{}/../../examples/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// The CRD as the API server has it, if it exists.
fn live_crd(lab: &Lab, cp: &ControlPlane) -> Option<serde_json::Value> {
    let out = cp
        .kubectl(lab, &["get", "crd", POOL_CRD, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

fn established(crd: &serde_json::Value) -> bool {
    crd["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Established" && c["status"] == "True")
}

/// A pool's Ready condition: (status, reason, message, observedGeneration).
fn pool_ready(lab: &Lab, cp: &ControlPlane, name: &str) -> Option<(String, String, String, i64)> {
    let out = cp
        .kubectl(lab, &["get", "loadbalancerippool", name, "-o", "json"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let c = v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((
        text("status"),
        text("reason"),
        text("message"),
        c["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

/// Waits until pool `name` has Ready=`status` with `reason`; returns the message.
fn wait_pool(lab: &Lab, cp: &ControlPlane, name: &str, status: &str, reason: &str) -> String {
    let mut last = None;
    let got = eventually(
        &format!("LoadBalancerIPPool {name} Ready={status} reason {reason}"),
        T,
        || {
            let r = pool_ready(lab, cp, name);
            last = r.clone();
            r.filter(|(s, why, _, _)| s == status && why == reason)
        },
    );
    eprintln!("pool {name}: {:?} (last seen before: {last:?})", got.0);
    got.0.2
}

fn pool(name: &str, blocks: &[&str]) -> String {
    let blocks: String = blocks
        .iter()
        .map(|b| format!("  - cidr: \"{b}\"\n"))
        .collect();
    format!(
        "apiVersion: meshless.dev/v1alpha1\nkind: LoadBalancerIPPool\nmetadata:\n  name: {name}\nspec:\n  blocks:\n{blocks}"
    )
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let c: meshless_operator::cidr::Cidr = cidr.parse().expect(cidr);
    c.contains(ip)
}

/// The rendered CRD as an older installer might have left it: printer
/// columns, short name and status subresource missing, a property the
/// current types no longer have, and a label saying so.
fn old_crd() -> String {
    let crd = meshless_operator::crd::crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(POOL_CRD))
        .expect("the pool CRD");
    let mut v = serde_json::to_value(&crd).expect("JSON");
    v["metadata"]["labels"]["meshless.dev/test"] = "old-crd".into();
    v["spec"]["names"]
        .as_object_mut()
        .expect("names")
        .remove("shortNames");
    let version = &mut v["spec"]["versions"][0];
    let version = version.as_object_mut().expect("version");
    version.remove("additionalPrinterColumns");
    version.remove("subresources");
    version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["legacyRange"] =
        serde_json::json!({"type": "string", "description": "removed since"});
    serde_json::to_string(&v).expect("JSON")
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_operator_installs_crds_and_serves_lb_pools_from_them() {
    let (lab, cp) = setup("opd");
    assert!(
        live_crd(&lab, &cp).is_none(),
        "{POOL_CRD} exists before the operator ran"
    );

    // (a) No --lb-pool: the operator creates the CRD and waits until it is served.
    let op = operator_with(&lab, &cp, 1, "a", &[]);
    let (_, took) = eventually("the operator installs an Established CRD", T, || {
        live_crd(&lab, &cp).filter(established)
    });
    eprintln!("{POOL_CRD} Established {took:?} after the operator started");
    eventually("operator a elected", T, || {
        (holder(&lab, &cp)? == "a").then_some(())
    });

    // (b) A LoadBalancer Service before any pool gets no address, and an Event says why.
    cp.apply(&lab, &service("web", None, None)).expect("web");
    let (note, _) = eventually("a NoPool Event for web", T, || {
        event_note(&lab, &cp, "web", |n| n.contains("no IPv4 LB pool"))
    });
    assert!(note.contains("add a LoadBalancerIPPool"), "{note}");
    assert!(
        ips_of(&lab, &cp, "web").is_empty(),
        "web got an address without a pool"
    );

    // The example pool: web gets one address per family from it, at once.
    let applied = Instant::now();
    cp.kubectl(&lab, &["apply", "-f", &example("lb-ipam/pool.yaml")])
        .expect("kubectl apply -f examples/lb-ipam/pool.yaml");
    let (web, _) = wait_dual(&lab, &cp, "web", T);
    eprintln!(
        "web got {web:?} {:?} after the pool was applied",
        applied.elapsed()
    );
    assert!(
        in_cidr(web[0], "198.18.1.0/24") && in_cidr(web[1], "fd00:d::/112"),
        "web {web:?} is not from examples/lb-ipam/pool.yaml"
    );
    let message = wait_pool(&lab, &cp, "default", "True", "Accepted");
    assert_eq!(message, "serving 198.18.1.0/24, fd00:d::/112");
    assert_eq!(
        pool_ready(&lab, &cp, "default").map(|r| r.3),
        Some(1),
        "observedGeneration"
    );

    // (c) An invalid pool and an overlapping one: Ready=False naming the
    // field; they hand out nothing and the valid pool keeps working.
    cp.apply(&lab, &pool("blue", &["198.18.6.0/24", "198.18.1.1/24"]))
        .expect("blue");
    cp.apply(&lab, &pool("green", &["198.18.1.128/25"]))
        .expect("green");
    let blue = wait_pool(&lab, &cp, "blue", "False", "InvalidCIDR");
    assert!(
        blue.starts_with(
            "LoadBalancerIPPool blue: spec.blocks[1].cidr: \"198.18.1.1/24\" has host bits set: did you mean 198.18.1.0/24?"
        ),
        "{blue}"
    );
    let green = wait_pool(&lab, &cp, "green", "False", "Overlap");
    assert!(
        green.starts_with(
            "LoadBalancerIPPool green: spec.blocks[0].cidr 198.18.1.128/25 overlaps LoadBalancerIPPool default spec.blocks[0].cidr 198.18.1.0/24"
        ),
        "{green}"
    );
    let table = cp
        .kubectl(&lab, &["get", "lbippool", "-o", "wide"])
        .expect("kubectl get lbippool");
    eprintln!("{table}");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "REASON", "MESSAGE", "AGE"],
        "{table}"
    );
    assert!(
        table.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["green", "False", "Overlap"])),
        "{table}"
    );
    cp.apply(&lab, &service("web2", None, None)).expect("web2");
    let (web2, _) = wait_dual(&lab, &cp, "web2", T);
    assert!(
        in_cidr(web2[0], "198.18.1.0/24") && in_cidr(web2[1], "fd00:d::/112"),
        "web2 {web2:?} is not from the valid pool"
    );
    assert_eq!(ips_of(&lab, &cp, "web"), web, "web kept its addresses");
    assert_eq!(
        pool_ready(&lab, &cp, "default").map(|r| r.0),
        Some("True".into())
    );
    assert_all_distinct(&ingress(&lab, &cp));

    // Deleting the pool in use: green no longer overlaps anything and is
    // served; Services move into it (IPv4 only: green has no IPv6 block).
    cp.kubectl(&lab, &["delete", "loadbalancerippool", "default"])
        .expect("delete pool default");
    wait_pool(&lab, &cp, "green", "True", "Accepted");
    for name in ["web", "web2"] {
        let (ips, _) = eventually(&format!("{name} moves into green, IPv4 only"), T, || {
            let ips = ips_of(&lab, &cp, name);
            (ips.len() == 1 && in_cidr(ips[0], "198.18.1.128/25")).then_some(ips)
        });
        eprintln!("{name} now has {ips:?}");
    }
    assert_all_distinct(&ingress(&lab, &cp));
    let web_v4 = ips_of(&lab, &cp, "web")[0];
    drop(op);

    // (d) Upgrade: an older CRD is in place when the operator starts.
    cp.kubectl(&lab, &["delete", "crd", POOL_CRD])
        .expect("delete the CRD");
    let dir = std::env::temp_dir().join(format!("{}-old-crd.json", std::process::id()));
    std::fs::write(&dir, old_crd()).expect("write the old CRD");
    cp.kubectl(&lab, &["create", "-f", &dir.display().to_string()])
        .expect("create the old CRD");
    let _ignored = std::fs::remove_file(&dir);
    eventually("the old CRD is Established", T, || {
        live_crd(&lab, &cp).filter(established)
    });
    cp.kubectl(&lab, &["apply", "-f", &example("lb-ipam/pool.yaml")])
        .expect("the pool under the old CRD");
    let op = operator_with(&lab, &cp, 2, "b", &[]);
    let desired = meshless_operator::crd::crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(POOL_CRD))
        .expect("the pool CRD");
    let want = serde_json::to_value(&desired).expect("JSON");
    let start = Instant::now();
    let live = loop {
        let live = live_crd(&lab, &cp).unwrap_or_default();
        // Typed: JSON numbers from the server (0) and from the types (0.0) differ.
        let versions = serde_json::from_value::<CustomResourceDefinition>(live.clone())
            .ok()
            .map(|c| c.spec.versions);
        if established(&live) && versions.as_ref() == Some(&desired.spec.versions) {
            break live;
        }
        assert!(
            start.elapsed() < T,
            "the operator did not upgrade the CRD to the current schema in {T:?}:\nwant {}\nlive {}\noperator log:\n{}",
            want["spec"]["versions"],
            live["spec"]["versions"],
            op.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = start.elapsed();
    eprintln!("CRD upgraded {took:?} after the operator started");
    let mut names = live["spec"]["names"].clone();
    // Defaulted by the API server, not part of what the operator applies.
    names.as_object_mut().map(|n| n.remove("listKind"));
    assert_eq!(names, want["spec"]["names"], "names (shortNames)");
    assert_eq!(live["spec"]["scope"], want["spec"]["scope"]);
    assert_eq!(
        live["metadata"]["labels"]["app.kubernetes.io/part-of"], "meshless",
        "{}",
        live["metadata"]
    );
    // The pool under the upgraded CRD is served; web keeps its IPv4 address
    // (inside the pool again) and gets an IPv6 one back.
    wait_pool(&lab, &cp, "default", "True", "Accepted");
    let (web, _) = wait_dual(&lab, &cp, "web", T);
    assert_eq!(
        web[0], web_v4,
        "web kept its IPv4 address across the restart"
    );
    assert!(in_cidr(web[1], "fd00:d::/112"), "{web:?}");
    assert_all_distinct(&ingress(&lab, &cp));
    let log = op.log();
    assert!(!log.contains("panicked"), "{log}");
    drop(op);
}
