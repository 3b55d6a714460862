//! Privileged tier: service load balancing through the real agent and the
//! real eBPF datapath in a lab. Services come from a manifest directory the
//! agent watches; clients are processes in pod cgroups (so the socket hooks
//! see them) or on the external host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use meshless_lab::{Lab, LabProcess, LabSpec, Pod, bin_path, require_root, unique_name};

const T: Duration = Duration::from_secs(30);

fn labtool() -> Command {
    Command::new(bin_path("meshless-labtool"))
}

struct Fixture {
    lab: Lab,
    dir: PathBuf,
    agent_args: Vec<String>,
    agent: Option<LabProcess>,
    client: Pod,
    backends: Vec<Pod>,
    _servers: Vec<LabProcess>,
}

/// A lab with a client pod on n1, `serve-id` backends where asked, and an
/// agent on n1 watching a manifest directory.
fn fixture(prefix: &str, backends: &[(usize, &str)]) -> Fixture {
    fixture_with(prefix, backends, &[])
}

fn fixture_with(prefix: &str, backends: &[(usize, &str)], agent_args: &[&str]) -> Fixture {
    require_root();
    let mut lab = Lab::create(LabSpec::new(unique_name(prefix))).expect("lab");
    let client = lab.add_pod(1, "client").expect("client pod");
    let mut pods = Vec::new();
    for (node, name) in backends {
        pods.push(lab.add_pod(*node, name).expect("backend pod"));
    }
    let mut servers = Vec::new();
    for p in &pods {
        let mut cmd = labtool();
        cmd.args(["serve-id", "--listen", "[::]:8080", "--id", &p.name]);
        servers.push(lab.spawn_in_pod(p, "serve-id", cmd).expect("serve-id"));
    }
    let dir = lab.log_dir().parent().expect("state dir").join("manifests");
    std::fs::create_dir_all(&dir).expect("manifest dir");
    let mut f = Fixture {
        lab,
        dir,
        agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        agent: None,
        client,
        backends: pods,
        _servers: servers,
    };
    f.start_agent();
    f
}

impl Fixture {
    fn start_agent(&mut self) {
        let mut args = vec!["--manifests".to_owned(), self.dir.display().to_string()];
        args.extend(self.agent_args.iter().cloned());
        let agent = self
            .lab
            .start_agent_with(
                1,
                std::path::Path::new(env!("CARGO_BIN_EXE_meshless-agent")),
                &args,
            )
            .expect("agent");
        self.agent = Some(agent);
        self.lab.wait_agent_ready(1, T).expect("agent ready");
    }

    fn status(&self) -> serde_json::Value {
        let p = self.lab.node_state_dir(1).join("status.json");
        std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Changed object sets the agent has read from its manifest directory.
    fn source_updates(&self) -> u64 {
        self.status()["source_updates"].as_u64().unwrap_or(0)
    }

    /// Writes a manifest file atomically and waits until the agent read it
    /// (and so reconciled whatever it changed).
    fn apply(&self, file: &str, yaml: &str) -> serde_json::Value {
        let before = self.source_updates();
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(file)).expect("rename manifest");
        let deadline = Instant::now() + T;
        loop {
            let s = self.status();
            if s["source_updates"].as_u64().unwrap_or(0) > before {
                return s["lb"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "agent never reconciled {file}: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|p| p.name == name)
            .expect("backend")
    }

    fn tally_from(&self, pod: &Pod, args: &[&str]) -> serde_json::Value {
        let mut cmd = labtool();
        cmd.arg("tally").args(args);
        let out = self
            .lab
            .run_in_pod(pod, "tally", cmd, T)
            .expect("tally runs");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("tally printed {out:?}: {e}"))
    }

    /// `tally` from the external host (outside the cluster).
    fn tally_external(&self, args: &[&str]) -> serde_json::Value {
        let mut cmd = labtool();
        cmd.arg("tally").args(args);
        let out = self
            .lab
            .spawn_on_host(self.lab.external(), "tally", cmd)
            .expect("tally on the external host")
            .wait_success(T)
            .expect("tally exits 0");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("tally printed {out:?}: {e}"))
    }

    fn tally(&self, args: &[&str]) -> serde_json::Value {
        self.tally_from(&self.client, args)
    }
}

/// `name: count` of the replies.
fn replies(v: &serde_json::Value) -> BTreeMap<String, u64> {
    v["replies"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint(p: &Pod, v6: bool, node: &str, cond: &str) -> String {
    let addr = if v6 {
        p.ipv6.to_string()
    } else {
        p.ipv4.to_string()
    };
    format!(
        "- addresses: [\"{addr}\"]\n  conditions: {cond}\n  nodeName: {node}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
        p.name
    )
}

fn slice(service: &str, name: &str, v6: bool, endpoints: &str) -> String {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let endpoints = if endpoints.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        format!("endpoints:\n{endpoints}")
    };
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\n{endpoints}ports:\n- {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 8080, protocol: UDP}}\n"
    )
}

fn ready() -> &'static str {
    "{ready: true, serving: true, terminating: false}"
}

/// A dual-stack ClusterIP service `web` (198.19.0.10, fd00:c::10) on TCP 80
/// and UDP 53, with `extra` spliced into its spec and `annotations`.
fn web(extra_spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {{{annotations}}}\nspec:\n  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"fd00:c::10\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 53, targetPort: 8080, protocol: UDP}}\n{extra_spec}"
    )
}

fn web_with(f: &Fixture, names: &[&str], extra_spec: &str, annotations: &str) -> String {
    let mut v4 = String::new();
    let mut v6 = String::new();
    for n in names {
        let p = f.pod(n);
        let node = f.lab.node_name(p.node);
        v4 += &endpoint(p, false, &node, ready());
        v6 += &endpoint(p, true, &node, ready());
    }
    web(extra_spec, annotations)
        + &slice("web", "web-v4", false, &v4)
        + &slice("web", "web-v6", true, &v6)
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_clusterip_tcp_udp_ipv4_ipv6_across_nodes() {
    let f = fixture("cip", &[(2, "b1"), (2, "b2"), (1, "b3")]);
    let lb = f.apply("web.yaml", &web_with(&f, &["b1", "b2", "b3"], "", ""));
    assert_eq!(lb["frontends"], 4, "2 families x 2 ports: {lb}");
    assert_eq!(lb["errors"], serde_json::json!([]), "{lb}");

    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "300"]);
    assert_eq!(v["failed"], 0, "TCP to the ClusterIP: {v}");
    let r = replies(&v);
    assert_eq!(
        r.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "backends on both nodes serve: {v}"
    );
    assert!(
        r.values().all(|n| *n >= 50),
        "random spread over 3 backends, 300 connections: {r:?}"
    );

    let v = f.tally(&["--to", "198.19.0.10:53", "--udp", "--count", "60"]);
    assert_eq!(
        (v["ok"].as_u64(), v["failed"].as_u64()),
        (Some(60), Some(0)),
        "UDP, connected socket: {v}"
    );
    let v = f.tally(&[
        "--to",
        "198.19.0.10:53",
        "--udp",
        "--unconnected",
        "--count",
        "60",
    ]);
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(
        v["wrong_source"], 0,
        "recvfrom() reports the service address, not the backend: {v}"
    );

    let v = f.tally(&["--to", "[fd00:c::10]:80", "--count", "100"]);
    assert_eq!(v["failed"], 0, "IPv6 ClusterIP: {v}");
    assert!(replies(&v).len() >= 2, "{v}");
    let v = f.tally(&[
        "--to",
        "[fd00:c::10]:53",
        "--udp",
        "--unconnected",
        "--count",
        "30",
    ]);
    assert_eq!(
        (v["failed"].as_u64(), v["wrong_source"].as_u64()),
        (Some(0), Some(0)),
        "IPv6 UDP: {v}"
    );
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_weighted_distribution_within_tolerance() {
    let f = fixture("wgt", &[(2, "b1"), (2, "b2"), (1, "b3")]);
    f.apply(
        "web.yaml",
        &web_with(
            &f,
            &["b1", "b2", "b3"],
            "",
            "meshless.dev/backend-weights: \"b1=3,b2=1,b3=0\"",
        ),
    );
    let n = 2000.0;
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "2000"]);
    assert_eq!(v["failed"], 0, "{v}");
    let r = replies(&v);
    let share = |k: &str| r.get(k).copied().unwrap_or(0) as f64 / n;
    // Binomial sd at p=0.75, n=2000 is ~0.0097; 0.04 is four of them.
    assert!((share("b1") - 0.75).abs() < 0.04, "b1 weight 3 of 4: {r:?}");
    assert!((share("b2") - 0.25).abs() < 0.04, "b2 weight 1 of 4: {r:?}");
    assert_eq!(share("b3"), 0.0, "weight 0 gets nothing: {r:?}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_maglev_removing_one_of_ten_backends_moves_about_a_tenth() {
    let names: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let spec: Vec<(usize, &str)> = names.iter().map(|n| (2, n.as_str())).collect();
    let f = fixture("mag", &spec);
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    f.apply(
        "web.yaml",
        &web_with(&f, &all, "", "meshless.dev/lb-algorithm: maglev"),
    );
    let flows = |f: &Fixture| -> Vec<String> {
        let v = f.tally(&[
            "--to",
            "198.19.0.10:53",
            "--udp",
            "--count",
            "1000",
            "--source-port-base",
            "21000",
        ]);
        assert_eq!(v["failed"], 0, "{v}");
        v["flows"]
            .as_array()
            .expect("flows")
            .iter()
            .map(|x| x[1].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let before = flows(&f);
    assert_eq!(
        before,
        flows(&f),
        "the same flows map to the same backends (consistent hashing)"
    );
    let remaining: Vec<&str> = all.iter().copied().filter(|n| *n != "m3").collect();
    f.apply(
        "web.yaml",
        &web_with(&f, &remaining, "", "meshless.dev/lb-algorithm: maglev"),
    );
    let after = flows(&f);
    let on_m3 = before.iter().filter(|b| *b == "m3").count();
    let moved_others = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != "m3" && b != a)
        .count();
    assert!(
        after.iter().all(|a| a != "m3"),
        "no flow stays on the removed backend"
    );
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    // m3 held ~1/10 of the flows (sd ~0.0095 over 1000); those must move. Maglev
    // moves only a little more: < 1% of table entries for N=10 (crates/lb), so
    // allow 2.5% of flows for sampling noise.
    eprintln!(
        "maglev: {on_m3}/1000 flows were on the removed backend, {moved_others}/1000 others moved"
    );
    assert!(
        (60..=150).contains(&on_m3),
        "m3's share before removal: {on_m3}/1000"
    );
    assert!(
        moved_others <= 25,
        "flows of untouched backends that moved: {moved_others}/1000"
    );
    assert_eq!(moved, on_m3 + moved_others);
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_terminating_backend_gets_no_new_connections_and_keeps_old_ones() {
    let f = fixture("term", &[(2, "b1"), (2, "b2")]);
    f.apply("web.yaml", &web_with(&f, &["b1", "b2"], "", ""));
    let mut cmd = labtool();
    cmd.args([
        "hold",
        "--to",
        "198.19.0.10:80",
        "--duration-ms",
        "3000",
        "--announce",
    ]);
    let mut held = f.lab.spawn_in_pod(&f.client, "hold", cmd).expect("hold");
    let deadline = Instant::now() + T;
    let id = loop {
        if let Some(line) = held.log().lines().find(|l| l.starts_with("connected ")) {
            break line["connected ".len()..].trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "hold never connected: {}",
            held.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let other = if id == "b1" { "b2" } else { "b1" };
    // The held backend starts terminating: not ready, still serving.
    let (t, o) = (f.pod(&id), f.pod(other));
    let mut v4 = endpoint(
        t,
        false,
        &f.lab.node_name(2),
        "{ready: false, serving: true, terminating: true}",
    );
    v4 += &endpoint(o, false, &f.lab.node_name(2), ready());
    f.apply(
        "web.yaml",
        &(web("", "") + &slice("web", "web-v4", false, &v4)),
    );
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "200"]);
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(
        replies(&v).keys().cloned().collect::<Vec<_>>(),
        [other],
        "new connections avoid the terminating backend: {v}"
    );
    let out = held.wait_success(T).expect("hold exits 0");
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("hold JSON");
    assert_eq!(
        last["failed"], 0,
        "the established connection lived on: {last}"
    );
    assert_eq!(last["ids"], serde_json::json!([id]), "{last}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_client_ip_affinity_sticks() {
    let f = fixture("aff", &[(2, "b1"), (2, "b2"), (1, "b3")]);
    f.apply(
        "web.yaml",
        &web_with(&f, &["b1", "b2", "b3"], "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n", ""),
    );
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "100"]);
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(
        replies(&v).len(),
        1,
        "every connection of one client went to one backend: {v}"
    );
    let v6 = f.tally(&["--to", "198.19.0.10:80", "--count", "50"]);
    assert_eq!(
        replies(&v6),
        replies(&v).keys().map(|k| (k.clone(), 50)).collect(),
        "and it sticks: {v6}"
    );
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_service_without_backends_refuses_promptly() {
    let f = fixture("nobe", &[]);
    let lb = f.apply(
        "web.yaml",
        &(web("", "") + &slice("web", "web-v4", false, "")),
    );
    assert_eq!(lb["backends"], 0, "{lb}");
    let v = f.tally(&[
        "--to",
        "198.19.0.10:80",
        "--count",
        "5",
        "--timeout-ms",
        "3000",
    ]);
    assert_eq!(v["failed"], 5, "{v}");
    assert!(
        v["errors"][0].as_str().unwrap_or("").contains("refused"),
        "like kube-proxy's REJECT: {v}"
    );
    assert!(
        v["elapsed_ms"].as_u64().unwrap_or(u64::MAX) < 1000,
        "promptly, not after a timeout: {v}"
    );
    let v = f.tally(&[
        "--to",
        "198.19.0.10:53",
        "--udp",
        "--count",
        "3",
        "--timeout-ms",
        "3000",
    ]);
    assert_eq!(v["failed"], 3, "{v}");
    assert!(v["elapsed_ms"].as_u64().unwrap_or(u64::MAX) < 1000, "{v}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_nodeport_and_loadbalancer_from_the_external_host() {
    let f = fixture("np", &[(2, "b1"), (1, "b3")]);
    let spec = "  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n";
    let mut yaml = web_with(&f, &["b1", "b3"], spec, "");
    // nodePorts, and the address LB-IPAM would have written to status.
    yaml = yaml.replace(
        "targetPort: 8080, protocol: TCP}",
        "targetPort: 8080, nodePort: 30080, protocol: TCP}",
    );
    yaml = yaml.replace(
        "targetPort: 8080, protocol: UDP}",
        "targetPort: 8080, nodePort: 30053, protocol: UDP}",
    );
    yaml = yaml.replacen(
        "---\n",
        "status:\n  loadBalancer: {ingress: [{ip: 198.18.1.10}]}\n---\n",
        1,
    );
    let lb = f.apply("web.yaml", &yaml);
    assert_eq!(lb["errors"], serde_json::json!([]), "{lb}");
    let node = f.lab.node(1).ipv4;
    for (to, what) in [
        (format!("{node}:30080"), "NodePort"),
        ("198.18.1.10:80".to_owned(), "LoadBalancer IP"),
    ] {
        let v = f.tally_external(&["--to", &to, "--count", "200"]);
        assert_eq!(v["failed"], 0, "{what} from outside the cluster: {v}");
        assert_eq!(
            replies(&v).keys().cloned().collect::<Vec<_>>(),
            ["b1", "b3"],
            "{what}: a remote backend (SNAT) and a local one both serve: {v}"
        );
    }
    let node6 = f.lab.node(1).ipv6;
    let v = f.tally_external(&["--to", &format!("[{node6}]:30080"), "--count", "100"]);
    assert_eq!(v["failed"], 0, "IPv6 NodePort: {v}");
    assert_eq!(
        replies(&v).len(),
        2,
        "IPv6: a remote (SNAT) and a local backend: {v}"
    );
    let v = f.tally_external(&[
        "--to",
        &format!("{node}:30053"),
        "--udp",
        "--unconnected",
        "--count",
        "50",
    ]);
    assert_eq!(
        (v["failed"].as_u64(), v["wrong_source"].as_u64()),
        (Some(0), Some(0)),
        "UDP NodePort: {v}"
    );
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_agent_sigkill_and_restart_under_load_fails_no_connection() {
    let mut f = fixture("kill", &[(2, "b1"), (2, "b2")]);
    f.apply("web.yaml", &web_with(&f, &["b1", "b2"], "", ""));
    let mut load = labtool();
    load.args([
        "tally",
        "--to",
        "198.19.0.10:80",
        "--count",
        "1500",
        "--interval-ms",
        "2",
    ]);
    let mut load = f.lab.spawn_in_pod(&f.client, "load", load).expect("load");
    let mut hold = labtool();
    hold.args(["hold", "--to", "198.19.0.10:80", "--duration-ms", "4000"]);
    let mut hold = f.lab.spawn_in_pod(&f.client, "hold", hold).expect("hold");
    std::thread::sleep(Duration::from_millis(700));
    let mut agent = f.agent.take().expect("agent");
    agent
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL the agent");
    // Generous: on a loaded 2-core machine the exit itself can take seconds.
    agent
        .wait_timeout(Duration::from_secs(30))
        .expect("agent died");
    // No agent at all for a while: the pinned datapath keeps balancing.
    std::thread::sleep(Duration::from_millis(800));
    f.start_agent();
    let out = load.wait_success(T).expect("load exits 0");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(
        v["failed"], 0,
        "no connection failed across SIGKILL and restart: {v}"
    );
    assert_eq!(v["ok"], 1500, "{v}");
    assert_eq!(replies(&v).len(), 2, "still balanced: {v}");
    let out = hold.wait_success(T).expect("hold exits 0");
    let h: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("JSON");
    assert_eq!(h["failed"], 0, "the established connection survived: {h}");
    let lb = f.status()["lb"].clone();
    assert_eq!(
        lb["last_services_written"], 0,
        "the restarted agent adopted the maps without rewriting: {lb}"
    );
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_bad_input_is_reported_and_nothing_is_lost() {
    let f = fixture("bad", &[(2, "b1")]);
    f.apply("web.yaml", &web_with(&f, &["b1"], "", ""));
    let lb = f.apply(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [broken\n",
    );
    let errors = lb["errors"].to_string();
    assert!(
        errors.contains("web.yaml"),
        "the error names the file: {lb}"
    );
    assert_eq!(
        lb["frontends"], 4,
        "the last good content of the file is kept: {lb}"
    );
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "20"]);
    assert_eq!(v["failed"], 0, "{v}");
    let sctp = web_with(&f, &["b1"], "", "").replace("protocol: UDP}", "protocol: SCTP}");
    let lb = f.apply("web.yaml", &sctp);
    let errors = lb["errors"].to_string();
    assert!(
        errors.contains("default/web") && errors.contains("spec.ports[1].protocol"),
        "names object and field: {lb}"
    );
    assert_eq!(
        lb["frontends"], 2,
        "the TCP port still compiles (both families): {lb}"
    );
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "20"]);
    assert_eq!(v["failed"], 0, "{v}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_full_map_is_a_clear_error_and_a_metric() {
    let f = fixture_with("full", &[(2, "b1")], &["--max-services", "3"]);
    let lb = f.apply("web.yaml", &web_with(&f, &["b1"], "", ""));
    assert_eq!(
        lb["capacity"]["services"], 3,
        "the map was sized by the flag: {lb}"
    );
    assert_eq!(lb["frontends"], 3, "what fits is installed: {lb}");
    assert!(
        lb["map_full_total"].as_u64().unwrap_or(0) >= 1,
        "counted: {lb}"
    );
    let errors = lb["errors"].to_string();
    assert!(
        errors.contains("ml_services is full") && errors.contains("default/web"),
        "says which map and which service: {lb}"
    );
    // The frontends that fit work.
    let v = f.tally(&["--to", "198.19.0.10:80", "--count", "10"]);
    assert_eq!(v["failed"], 0, "{v}");
}

#[test]
#[ignore = "privileged: needs root; run by `cargo xtask test`"]
fn privileged_lb_nodeport_with_direct_server_return() {
    // Backend only on n2; the client reaches n1's NodePort. With DSR, n2
    // answers the client directly, so n1 sees only requests.
    let mut f = fixture_with("dsr", &[(2, "b1")], &["--lb-mode", "dsr"]);
    let spec = "  type: NodePort\n";
    let yaml = web_with(&f, &["b1"], spec, "")
        .replace(
            "targetPort: 8080, protocol: TCP}",
            "targetPort: 8080, nodePort: 30080, protocol: TCP}",
        )
        .replace(
            "targetPort: 8080, protocol: UDP}",
            "targetPort: 8080, nodePort: 30053, protocol: UDP}",
        );
    f.apply("web.yaml", &yaml);
    // The backend's node runs an agent too (the receiving half of DSR).
    let dir = f.dir.display().to_string();
    let n2 = f
        .lab
        .start_agent_with(
            2,
            std::path::Path::new(env!("CARGO_BIN_EXE_meshless-agent")),
            &["--manifests", &dir, "--lb-mode", "dsr"],
        )
        .expect("agent n2");
    f.lab.wait_agent_ready(2, T).expect("n2 ready");
    f._servers.push(n2);
    let stats = |node: usize| meshless_maps::Stats::open(&f.lab.pin_dir(node)).expect("stats");
    let get = |node: usize, s: u32| stats(node).get(s).expect("stat");
    use meshless_common::stat;
    let (out0, in0, rev0) = (
        get(1, stat::NP_DSR_OUT),
        get(2, stat::NP_DSR_IN),
        get(2, stat::NP_TRACKED),
    );
    let node = f.lab.node(1).ipv4;
    let v = f.tally_external(&["--to", &format!("{node}:30080"), "--count", "100"]);
    assert_eq!(v["failed"], 0, "NodePort with DSR: {v}");
    assert_eq!(
        replies(&v).keys().cloned().collect::<Vec<_>>(),
        ["b1"],
        "{v}"
    );
    let (out1, in1, rev1) = (
        get(1, stat::NP_DSR_OUT),
        get(2, stat::NP_DSR_IN),
        get(2, stat::NP_TRACKED),
    );
    assert!(
        out1 - out0 >= 100 * 3,
        "n1 forwarded every request packet with the option: {}",
        out1 - out0
    );
    assert_eq!(in1 - in0, out1 - out0, "n2 received each of them");
    assert!(
        rev1 - rev0 >= 100 * 2,
        "n2 answered as the service (replies translated there): {}",
        rev1 - rev0
    );
    let v = f.tally_external(&[
        "--to",
        &format!("{node}:30053"),
        "--udp",
        "--unconnected",
        "--count",
        "20",
    ]);
    assert_eq!(
        (v["failed"].as_u64(), v["wrong_source"].as_u64()),
        (Some(0), Some(0)),
        "UDP with DSR: {v}"
    );
}
