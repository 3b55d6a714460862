//! Lab tier: the agent against a real Kubernetes control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler built from the
//! published Go modules) in the lab.

use std::process::Command;
use std::time::{Duration, Instant};

use meshless_lab::{Lab, LabSpec, bin_path, require_root, unique_name};

const T: Duration = Duration::from_secs(60);

fn labtool() -> Command {
    Command::new(bin_path("meshless-labtool"))
}

fn service_and_slice(endpoints: &[(&meshless_lab::Pod, &str)]) -> String {
    let mut eps = String::new();
    for (p, node) in endpoints {
        eps += &format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            p.ipv4, p.name
        );
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-manual\n  namespace: default\n  labels: {{kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: meshless-test}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: tcp, port: 8080, protocol: TCP}}]\n"
    )
}

fn status(lab: &Lab) -> serde_json::Value {
    std::fs::read(lab.node_state_dir(1).join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn replies(
    lab: &Lab,
    client: &meshless_lab::Pod,
    count: u32,
) -> std::collections::BTreeMap<String, u64> {
    let mut cmd = labtool();
    cmd.args([
        "tally",
        "--to",
        "198.19.0.10:80",
        "--count",
        &count.to_string(),
    ]);
    let out = lab.run_in_pod(client, "tally", cmd, T).expect("tally");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(v["failed"], 0, "{v}");
    v["replies"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The HTTP status code of node 1's agent probe `path`, asked on the
/// node's loopback as a DaemonSet's probe would.
fn probe(lab: &Lab, path: &str) -> String {
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:9876{path}"),
    ]);
    lab.spawn_on_host(lab.node(1), "curl", curl)
        .expect("curl")
        .wait_success(T)
        .expect("curl runs")
}

/// Polls until `f` holds, failing with `what` after T.
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_kube_agent_follows_the_api_and_survives_apiserver_and_agent_restarts() {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name("kube"))).expect("lab");
    let client = lab.add_pod(1, "client").expect("client");
    let b1 = lab.add_pod(2, "b1").expect("b1");
    let b2 = lab.add_pod(2, "b2").expect("b2");
    let mut servers = Vec::new();
    for p in [&b1, &b2] {
        let mut cmd = labtool();
        cmd.args(["serve-id", "--listen", "[::]:8080", "--id", &p.name]);
        servers.push(lab.spawn_in_pod(p, "serve-id", cmd).expect("serve-id"));
    }
    let mut cp = lab.start_control_plane().expect("control plane");
    let n2 = lab.node_name(2);
    cp.apply(&lab, &service_and_slice(&[(&b1, &n2)]))
        .expect("apply web");
    let kubeconfig = cp.kubeconfig().display().to_string();
    let agent = std::path::Path::new(env!("CARGO_BIN_EXE_meshless-agent"));
    let agent_bin = agent;
    let mut agent = lab
        .start_agent_with(1, agent_bin, &["--kubeconfig", &kubeconfig])
        .expect("agent");
    lab.wait_agent_ready(1, T).expect("agent ready");
    let start = Instant::now();
    // Two frontends: web and the API server's own `kubernetes` Service.
    while status(&lab)["lb"]["frontends"] != 2 {
        assert!(
            start.elapsed() < T,
            "the agent never installed web from the API; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        replies(&lab, &client, 50)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["b1"]
    );
    // The probes a DaemonSet would use, on the node's loopback.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(probe(&lab, path).trim(), "200", "{path}");
    }

    // An endpoint change reaches the datapath promptly.
    cp.apply(&lab, &service_and_slice(&[(&b1, &n2), (&b2, &n2)]))
        .expect("add b2");
    let took = eventually("b2 in the service map", Duration::from_secs(5), || {
        status(&lab)["lb"]["backends"] == 2
    });
    assert!(
        took < Duration::from_secs(1),
        "EndpointSlice change took {took:?} to reach the maps"
    );
    assert_eq!(replies(&lab, &client, 100).len(), 2);

    // A long-lived connection across an API server crash and restart.
    let mut hold = labtool();
    hold.args(["hold", "--to", "198.19.0.10:80", "--duration-ms", "6000"]);
    let mut hold = lab.spawn_in_pod(&client, "hold", hold).expect("hold");
    let generation = status(&lab)["lb"]["generation"].clone();
    let namespaces = status(&lab)["cluster"]["namespaces"]
        .as_u64()
        .expect("namespaces counted");
    cp.stop_apiserver().expect("kill kube-apiserver");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        replies(&lab, &client, 50).len(),
        2,
        "service still balanced without an API server"
    );
    assert_eq!(
        status(&lab)["lb"]["frontends"],
        2,
        "nothing removed while the API is gone"
    );
    cp.start_apiserver(&lab).expect("restart kube-apiserver");
    // The watches resume (or re-list); a new Namespace proves the agent
    // hears the API again, and nothing it re-read changes a service map.
    eventually("kubectl reaches the restarted API server", T, || {
        cp.kubectl(&lab, &["create", "namespace", "after-restart"])
            .is_ok()
    });
    eventually("the agent sees the API again", T, || {
        let s = status(&lab);
        s["cluster"]["namespaces"].as_u64() == Some(namespaces + 1)
            && s["lb"]["errors"].as_array().is_some_and(Vec::is_empty)
    });
    let lb = status(&lab)["lb"].clone();
    // Re-listed objects with the same resourceVersions are not even
    // recompiled; if the API server's own EndpointSlice got a new one, the
    // compile that follows must write nothing.
    assert!(
        lb["generation"] == generation || lb["last_services_written"] == 0,
        "no map churn after the API server came back (generation before: {generation}): {lb}"
    );
    assert_eq!(lb["frontends"], 2, "{lb}");
    let out = hold.wait_success(T).expect("hold exits 0");
    let h: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("JSON");
    assert_eq!(
        h["failed"], 0,
        "the established connection lived through the API server restart: {h}"
    );
    assert_eq!(replies(&lab, &client, 50).len(), 2);

    // An agent that (re)starts while the API server is down must not
    // reconcile against an empty cluster: it adopts what is pinned, keeps
    // balancing, reports not ready, and writes nothing once the API is back.
    let mut hold = labtool();
    hold.args(["hold", "--to", "198.19.0.10:80", "--duration-ms", "8000"]);
    let mut hold = lab.spawn_in_pod(&client, "hold", hold).expect("hold");
    cp.stop_apiserver().expect("kill kube-apiserver");
    agent
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL the agent");
    agent.wait_timeout(T).expect("agent gone");
    let _ = std::fs::remove_file(lab.node_state_dir(1).join("status.json"));
    let agent = lab
        .start_agent_with(1, agent_bin, &["--kubeconfig", &kubeconfig])
        .expect("agent again");
    eventually("the new agent writes its status", T, || {
        status(&lab)["lb"]["frontends"] == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&lab);
    assert_eq!(
        (s["lb"]["frontends"].clone(), s["source_updates"].clone()),
        (serde_json::json!(2), serde_json::json!(0)),
        "adopted the pinned services and read nothing yet: {s}"
    );
    assert_eq!(
        replies(&lab, &client, 50).len(),
        2,
        "balanced by the pinned datapath, no API server, a fresh agent"
    );
    let code = probe(&lab, "/readyz");
    assert_eq!(
        code.trim(),
        "503",
        "not ready before the first list (the datapath still serves)"
    );
    cp.start_apiserver(&lab).expect("restart kube-apiserver");
    eventually("the new agent listed everything", T, || {
        status(&lab)["source_updates"].as_u64().unwrap_or(0) >= 1
    });
    let lb = status(&lab)["lb"].clone();
    assert_eq!(
        (
            lb["generation"].clone(),
            lb["last_services_written"].clone()
        ),
        (serde_json::json!(1), serde_json::json!(0)),
        "the first compile after adoption wrote nothing: {lb}"
    );
    let code = probe(&lab, "/readyz");
    assert_eq!(code.trim(), "200", "ready once listed");
    let out = hold.wait_success(T).expect("hold exits 0");
    let h: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("JSON");
    assert_eq!(
        h["failed"], 0,
        "the connection lived through API server loss and an agent restart: {h}"
    );
    drop(agent);
}
