//! Lab tier, the whole picture: a real control plane, the lab kubelet and
//! meshless-cni on every node, meshless-agent on every node watching the API,
//! meshless-operator allocating LoadBalancer addresses; the example app from
//! examples/kubernetes deployed with kubectl; traffic through its ClusterIP
//! and its LoadBalancer address; the BPF service map following the
//! Deployment as it scales.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use meshless_lab::{ControlPlane, Lab, LabSpec, Pod, bin_path, require_root, unique_name};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn example(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/kubernetes")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn get(lab: &Lab, cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    cp.kubectl(lab, &a)
        .ok()
        .and_then(|o| serde_json::from_str(&o).ok())
        .unwrap_or(Value::Null)
}

fn eventually<R>(what: &str, within: Duration, mut f: impl FnMut() -> Option<R>) -> (R, Duration) {
    let start = Instant::now();
    loop {
        if let Some(r) = f() {
            return (r, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Distinct backends of the ClusterIP frontend in node `node`'s BPF maps.
fn bpf_backends(lab: &Lab, node: usize, vip: Ipv4Addr, port: u16) -> Option<BTreeSet<[u8; 4]>> {
    let maps = meshless_maps::LbMaps::open(&lab.pin_dir(node)).ok()?;
    let backends: std::collections::BTreeMap<u32, meshless_common::Backend> =
        maps.backends().ok()?.into_iter().collect();
    let (_, v) = maps.services().ok()?.into_iter().find(|(k, _)| {
        k.family == meshless_common::family::IPV4 && k.addr[..4] == vip.octets() && k.port == port
    })?;
    let slots = maps.read_set(v.set_id, v.slots).ok()?;
    Some(
        slots
            .iter()
            .filter_map(|id| backends.get(id))
            .map(|b| [b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
            .collect(),
    )
}

/// IPv4 addresses of the ready endpoints of `service`.
fn ready_endpoints(lab: &Lab, cp: &ControlPlane, service: &str) -> BTreeSet<[u8; 4]> {
    let slices = get(
        lab,
        cp,
        &[
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
        ],
    );
    slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["addressType"] == "IPv4")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] != false)
        .filter_map(|e| {
            e["addresses"][0]
                .as_str()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
        })
        .map(|a| a.octets())
        .collect()
}

/// Scales `web` and measures how long the BPF map on n1 takes to match the
/// EndpointSlice's ready endpoints once they have changed.
fn scale_and_follow(lab: &Lab, cp: &ControlPlane, replicas: usize, vip: Ipv4Addr) -> Duration {
    cp.kubectl(
        lab,
        &["scale", "deployment/web", &format!("--replicas={replicas}")],
    )
    .expect("scale");
    let (want, _) = eventually(&format!("{replicas} ready endpoints"), T, || {
        let eps = ready_endpoints(lab, cp, "web");
        (eps.len() == replicas).then_some(eps)
    });
    let (_, lag) = eventually(
        &format!("BPF backends = the {replicas} ready endpoints"),
        Duration::from_secs(10),
        || (bpf_backends(lab, 1, vip, 80).as_ref() == Some(&want)).then_some(()),
    );
    lag
}

fn curl_in(lab: &Lab, pod: &Pod, url: &str) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "3", url]);
    lab.spawn_in_pod(pod, "curl", cmd)
        .map_err(|e| e.to_string())?
        .wait_success(Duration::from_secs(10))
        .map_err(|e| e.to_string())
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_cluster_deployment_behind_a_loadbalancer() {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name("clus"))).expect("lab");
    let cp = lab.start_control_plane().expect("control plane");
    // As a real cluster runs it: kubelet + meshless-cni and the agent (with
    // DaemonSet-style flags only: addresses and pod CIDRs come from each
    // node's Node object) on every node, the operator on node 1.
    let bins = bin_path("meshless-agent")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let procs = lab.start_cluster(&cp, &bins).expect("cluster");
    eventually("both nodes Ready and default/default exists", T, || {
        let nodes = get(&lab, &cp, &["nodes"]);
        let ready = nodes["items"].as_array().map_or(0, |n| {
            n.iter()
                .filter(|n| {
                    n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .count()
        });
        (ready == 2
            && get(&lab, &cp, &["serviceaccount", "default"])["metadata"]["name"] == "default")
            .then_some(())
    });

    // Each agent took its node's addresses and pod CIDRs from its Node.
    for node in 1..=2 {
        let name = lab.node_name(node);
        let obj = get(&lab, &cp, &["node", &name]);
        let (facts, _) = eventually(&format!("{name}'s agent has the node facts"), T, || {
            let f = agent_status(&lab, node)["node_facts"].clone();
            (f["ips_from"] == "node-object" && f["pod_cidrs_from"] == "node-object").then_some(f)
        });
        let cidrs: Vec<String> = facts["pod_cidrs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{}/{}", c[0].as_str().unwrap_or(""), c[1]))
            .collect();
        let mut want: Vec<String> = obj["spec"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        want.sort_by_key(|c| c.contains(':'));
        assert_eq!(cidrs, want, "{name}: pod CIDRs from spec.podCIDRs");
        assert_eq!(
            facts["ips"][0].as_str(),
            Some(lab.node(node).ipv4.to_string().as_str()),
            "{name}: the InternalIP (IPv4 first): {facts}"
        );
        assert_eq!(agent_status(&lab, node)["external_attached"], true);
    }

    cp.apply(&lab, &example("web.yaml"))
        .expect("apply web.yaml");
    cp.apply(&lab, &example("client.yaml"))
        .expect("apply client.yaml");
    let (svc, _) = eventually("web gets a LoadBalancer address", T, || {
        let s = get(&lab, &cp, &["service", "web"]);
        s["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .is_some()
            .then_some(s)
    });
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("clusterIP");
    let lb_ip = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .expect("LB IP")
        .to_owned();
    assert!(
        lb_ip.starts_with("198.18.1."),
        "from the operator's pool: {lb_ip}"
    );

    // The BPF service map follows the Deployment: 3 -> 1 -> 4.
    let (_, _) = eventually("3 ready endpoints in the BPF map", T, || {
        let eps = ready_endpoints(&lab, &cp, "web");
        (eps.len() == 3 && bpf_backends(&lab, 1, vip, 80).as_ref() == Some(&eps)).then_some(())
    });
    let mut lags = Vec::new();
    for replicas in [1, 4] {
        let lag = scale_and_follow(&lab, &cp, replicas, vip);
        eprintln!(
            "scaled to {replicas}: BPF backends matched the EndpointSlice {lag:?} after it changed"
        );
        assert!(
            lag < Duration::from_secs(1),
            "scale to {replicas}: the maps lagged the EndpointSlice by {lag:?}"
        );
        lags.push(lag);
    }

    // The client pod, as the kubelet made it: its netns and cgroup.
    let (client, _) = eventually("client pod running", T, || {
        let p = get(&lab, &cp, &["pod", "client"]);
        (p["status"]["phase"] == "Running").then_some(p)
    });
    let node_name = client["spec"]["nodeName"]
        .as_str()
        .expect("nodeName")
        .to_owned();
    let node: usize = node_name
        .rsplit("-n")
        .next()
        .and_then(|i| i.parse().ok())
        .expect("node index");
    let uid = client["metadata"]["uid"].as_str().expect("uid");
    let pod = Pod {
        name: "client".into(),
        node,
        netns: meshless_lab::plan::kubelet_pod_netns(lab.name(), node, "default", "client"),
        cgroup: lab.node_cgroup(node).join(uid),
        ipv4: client["status"]["podIP"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("podIP"),
        ipv6: std::net::Ipv6Addr::UNSPECIFIED,
        host_device: String::new(),
        host_ifindex: 0,
    };
    let pods: BTreeSet<String> = get(&lab, &cp, &["pods", "-l", "app=web"])["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let body = curl_in(&lab, &pod, &format!("http://{vip}/"))
            .expect("curl the ClusterIP from the client pod");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("echo answered {body:?}: {e}"));
        let name = v["pod"].as_str().unwrap_or("").to_owned();
        assert!(
            pods.contains(&name),
            "answered by {name:?}, not one of {pods:?}"
        );
        seen.insert(name);
    }
    assert!(
        seen.len() >= 2,
        "ClusterIP spread over the 4 pods: {seen:?}"
    );

    // From outside the cluster, through the LoadBalancer address (routed to n1).
    let mut seen_ext = BTreeSet::new();
    for _ in 0..40 {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "3", &format!("http://{lb_ip}/")]);
        let body = lab
            .spawn_on_host(lab.external(), "curl", cmd)
            .expect("curl on the external host")
            .wait_success(Duration::from_secs(10))
            .expect("the LoadBalancer address answers from outside");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("echo answered {body:?}: {e}"));
        seen_ext.insert(v["pod"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        seen_ext.iter().all(|n| pods.contains(n)) && seen_ext.len() >= 2,
        "LoadBalancer spread: {seen_ext:?}"
    );

    // Every web pod is an endpoint the agent of its node knows: the record
    // meshless-cni wrote, joined with the Pod from the API, its device
    // attached.
    let web = get(&lab, &cp, &["pods", "-l", "app=web"]);
    for p in web["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let ip = p["status"]["podIP"].as_str().unwrap_or("");
        let n: usize = p["spec"]["nodeName"]
            .as_str()
            .and_then(|n| n.rsplit("-n").next()?.parse().ok())
            .expect("nodeName");
        let st = agent_status(&lab, n);
        let ep = st["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["pod"] == name)
            .unwrap_or_else(|| panic!("{name} missing from node {n}'s endpoints: {st}"));
        assert_eq!(ep["namespace"], "default");
        assert_eq!(ep["in_api"], true, "{ep}");
        assert_eq!(ep["phase"], "Running", "{ep}");
        assert_eq!(ep["addresses"][0].as_str(), Some(ip), "{ep}");
        let dev = ep["host_device"].as_str().unwrap_or("");
        assert!(
            st["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| d["name"] == dev),
            "{name}'s device {dev} attached on node {n}: {st}"
        );
    }

    graceful_deletion_drains(&lab, &cp, &pod);
    drop(procs);
}

/// Status of node `node`'s agent.
fn agent_status(lab: &Lab, node: usize) -> Value {
    std::fs::read(lab.node_state_dir(node).join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Pods that keep serving through their grace period (SIGTERM ignored, as
/// an application draining its connections would).
const STICKY: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: sticky, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: sticky}}
  template:
    metadata: {labels: {app: sticky}}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
      - name: serve
        image: meshless.dev/labtool
        args: [serve-id, --listen, '[::]:9000', --ignore-sigterm]
        ports: [{containerPort: 9000}]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        readinessProbe: {tcpSocket: {port: 9000}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: sticky}
  ports: [{port: 9000, targetPort: 9000}]
";

/// A pod deleted with a grace period gets no new connections as soon as
/// it is terminating, while the connections it already has keep working.
fn graceful_deletion_drains(lab: &Lab, cp: &ControlPlane, client: &Pod) {
    cp.apply(lab, STICKY).expect("apply sticky");
    let vip: Ipv4Addr = eventually("sticky has a ClusterIP", T, || {
        get(lab, cp, &["service", "sticky"])["spec"]["clusterIP"]
            .as_str()
            .and_then(|a| a.parse().ok())
    })
    .0;
    let pods_by_ip = || -> std::collections::BTreeMap<[u8; 4], (String, Value)> {
        get(lab, cp, &["pods", "-l", "app=sticky"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let ip: Ipv4Addr = p["status"]["podIP"].as_str()?.parse().ok()?;
                Some((
                    ip.octets(),
                    (p["metadata"]["name"].as_str()?.to_owned(), p.clone()),
                ))
            })
            .collect()
    };
    eventually("2 sticky backends in the client node's maps", T, || {
        let eps = ready_endpoints(lab, cp, "sticky");
        (eps.len() == 2 && bpf_backends(lab, client.node, vip, 9000).as_ref() == Some(&eps))
            .then_some(())
    });
    // Four long-lived connections through the ClusterIP.
    let to = format!("{vip}:9000");
    let mut holds: Vec<_> = (0..4)
        .map(|i| {
            let mut cmd = Command::new(bin_path("meshless-labtool"));
            cmd.args(["hold", "--to", &to, "--duration-ms", "8000", "--announce"]);
            lab.spawn_in_pod(client, &format!("hold-{i}"), cmd)
                .expect("hold")
        })
        .collect();
    let (held, _) = eventually(
        "every held connection is up",
        Duration::from_secs(10),
        || {
            let ids: Vec<String> = holds
                .iter()
                .filter_map(|h| {
                    h.log()
                        .lines()
                        .find_map(|l| l.strip_prefix("connected ").map(str::to_owned))
                })
                .collect();
            (ids.len() == holds.len()).then_some(ids)
        },
    );
    let victim = held[0].clone();
    let before = pods_by_ip();
    let victim_ip = before
        .iter()
        .find(|(_, (n, _))| *n == victim)
        .map(|(ip, _)| *ip)
        .expect("victim IP");
    let deleted = Instant::now();
    cp.kubectl(lab, &["delete", "pod", &victim, "--wait=false"])
        .expect("delete the victim");
    let (_, lag) = eventually(
        "the terminating pod leaves the client node's service backends",
        Duration::from_secs(10),
        || {
            bpf_backends(lab, client.node, vip, 9000)
                .is_some_and(|b| !b.contains(&victim_ip) && !b.is_empty())
                .then_some(())
        },
    );
    let since_delete = deleted.elapsed();
    eprintln!(
        "deleted {victim}: out of the BPF backends {since_delete:?} after `kubectl delete` (polled {lag:?})"
    );
    // Still there, terminating: what keeps it from new connections is the
    // terminating state, not its absence.
    let (_, p) = pods_by_ip()
        .remove(&victim_ip)
        .expect("the victim is still running through its grace period");
    assert!(
        p["metadata"]["deletionTimestamp"].is_string(),
        "{victim} terminating: {p}"
    );
    let vnode: usize = p["spec"]["nodeName"]
        .as_str()
        .and_then(|n| n.rsplit("-n").next()?.parse().ok())
        .expect("nodeName");
    eventually("the agent shows the endpoint terminating", T, || {
        agent_status(lab, vnode)["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["pod"] == victim.as_str() && e["terminating"] == true)
            .then_some(())
    });
    let mut tally = Command::new(bin_path("meshless-labtool"));
    tally.args(["tally", "--to", &to, "--count", "100"]);
    let out = lab
        .run_in_pod(client, "tally", tally, T)
        .expect("tally new connections");
    let v: Value = serde_json::from_str(out.trim()).expect("tally JSON");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(
        v["replies"][&victim],
        Value::Null,
        "no new connection may reach the terminating {victim}: {v}"
    );
    assert_eq!(
        v["replies"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>()),
        100,
        "{v}"
    );
    for h in &mut holds {
        let out = h.wait_success(T).expect("hold exits 0");
        let r: Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("hold JSON");
        assert_eq!(
            r["failed"], 0,
            "an established connection died while its pod drained: {r}"
        );
    }
}
