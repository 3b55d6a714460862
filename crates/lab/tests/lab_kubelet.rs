//! Lab tier: `meshless-lab-kubelet` on every node of a lab, against a real
//! control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler), wiring pods with the real `meshless-cni`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshless_lab::{ControlPlane, Lab, LabProcess, LabSpec, bin_path, require_root, unique_name};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

struct Cluster {
    lab: Lab,
    cp: ControlPlane,
    kubelets: Vec<LabProcess>,
}

fn kubelet_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshless-lab-kubelet"))
}

fn start_kubelet(lab: &Lab, cp: &ControlPlane, i: usize) -> LabProcess {
    lab.start_kubelet(i, kubelet_bin(), &bin_path("meshless-cni"), cp.kubeconfig())
        .expect("start kubelet")
}

fn cluster(prefix: &str) -> Cluster {
    let mut lab = Lab::create(LabSpec::new(unique_name(prefix))).expect("lab");
    let cp = lab.start_control_plane().expect("control plane");
    let kubelets = (1..=2).map(|i| start_kubelet(&lab, &cp, i)).collect();
    let c = Cluster { lab, cp, kubelets };
    c.eventually("both nodes Ready", T, || {
        let nodes = c.get_json(&["get", "nodes"]);
        let ready = nodes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| condition(n, "Ready"))
            .count();
        ready == 2
    });
    // Pods are refused until the service-account controller has made
    // default/default.
    c.eventually("service account default/default", T, || {
        c.get_json(&["get", "serviceaccount", "default"])["metadata"]["name"] == "default"
    });
    c
}

fn condition(obj: &Value, kind: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> String {
        self.cp.kubectl(&self.lab, args).expect("kubectl")
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        match self.cp.kubectl(&self.lab, &a) {
            Ok(out) => serde_json::from_str(&out).unwrap_or_default(),
            Err(_) => Value::Null,
        }
    }

    fn pods(&self, selector: &str) -> Vec<Value> {
        self.get_json(&["get", "pods", "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.kubelets
            .iter()
            .map(|k| format!("--- {}\n{}", k.log_path().display(), tail(&k.log(), 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls until `f` holds; fails with `what` and the kubelet logs.
    fn eventually(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < within,
                "timed out after {within:?}: {what}\nkubelet logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        start.elapsed()
    }

    /// Ready endpoint addresses of the EndpointSlices of `service`.
    fn slice_endpoints(&self, service: &str) -> Vec<(String, bool)> {
        let selector = format!("kubernetes.io/service-name={service}");
        let slices = self.get_json(&["get", "endpointslices", "-l", &selector]);
        let mut out = Vec::new();
        for s in slices["items"].as_array().into_iter().flatten() {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                let ready = e["conditions"]["ready"].as_bool().unwrap_or(false);
                for a in e["addresses"].as_array().into_iter().flatten() {
                    out.push((a.as_str().unwrap_or_default().to_owned(), ready));
                }
            }
        }
        out.sort();
        out
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn running_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && condition(p, "Ready")
        && p["metadata"]["deletionTimestamp"].is_null()
}

fn node_index(p: &Value) -> usize {
    p["spec"]["nodeName"]
        .as_str()
        .and_then(|n| n.rsplit_once("-n"))
        .and_then(|(_, i)| i.parse().ok())
        .unwrap_or(0)
}

fn pod_netns(lab: &Lab, p: &Value) -> String {
    format!(
        "ml-{}-n{}-{}",
        lab.name(),
        node_index(p),
        p["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// HTTP GET from inside `netns` with curl; returns the body.
fn http_get(netns: &str, ip: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", "3"])
        .arg(format!("http://{ip}:8080/"))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

const ECHO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: meshless.dev/echo:1
        ports: [{name: http, containerPort: 8080}]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

fn in_cidr(ip: &str, node: usize) -> bool {
    let (net, _) = meshless_lab::plan::pod_cidr_v4(node);
    let o = net.octets();
    ip.starts_with(&format!("{}.{}.{}.", o[0], o[1], o[2]))
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_kubelet_runs_a_deployment_publishes_endpoints_and_scales_down_cleanly() {
    require_root();
    let c = cluster("kblt");
    c.cp.apply(&c.lab, ECHO).expect("apply echo");

    // (a) 3 Running+Ready pods, spread over both nodes, each with an
    // address from its node's pod CIDR, each answering with its own name.
    let took = c.eventually("3 echo pods Running and Ready", T, || {
        let pods = c.pods("app=echo");
        pods.len() == 3 && pods.iter().all(running_ready)
    });
    eprintln!("3 pods Running+Ready {took:?} after apply");
    let pods = c.pods("app=echo");
    let mut nodes: Vec<usize> = pods.iter().map(node_index).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(
        nodes,
        [1, 2],
        "the scheduler spreads the pods over both nodes"
    );
    for p in &pods {
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        assert!(
            in_cidr(ip, node_index(p)),
            "pod IP {ip} not in the pod CIDR of its node: {p}"
        );
        assert_eq!(
            p["status"]["podIPs"].as_array().map(Vec::len),
            Some(2),
            "dual-stack podIPs"
        );
        assert!(
            netns_exists(&pod_netns(&c.lab, p)),
            "netns {}",
            pod_netns(&c.lab, p)
        );
    }
    for (i, target) in pods.iter().enumerate() {
        let client = &pods[(i + 1) % pods.len()];
        let ip = target["status"]["podIP"].as_str().unwrap_or_default();
        let body = http_get(&pod_netns(&c.lab, client), ip).expect("HTTP GET to a pod");
        let v: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["pod"], target["metadata"]["name"], "{body}");
        assert_eq!(v["namespace"], "default", "{body}");
        assert_eq!(v["ip"], ip, "{body}");
    }

    // (b) the EndpointSlice controller publishes the 3 ready endpoints.
    let mut want: Vec<(String, bool)> = pods
        .iter()
        .map(|p| {
            (
                p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
                true,
            )
        })
        .collect();
    want.sort();
    c.eventually("3 ready endpoints in the EndpointSlice", T, || {
        c.slice_endpoints("echo") == want
    });

    // (c) scaling to 1 stops 2 pods completely: gone from the API, netns
    // removed, CNI DEL run (endpoint record and allocation released), and
    // gone from the EndpointSlice.
    let start = Instant::now();
    c.kubectl(&["scale", "deployment/echo", "--replicas=1"]);
    c.eventually("1 echo pod left", T, || c.pods("app=echo").len() == 1);
    let api_gone = start.elapsed();
    let left = c.pods("app=echo");
    let kept = left[0]["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let removed: Vec<&Value> = pods
        .iter()
        .filter(|p| p["metadata"]["uid"] != kept.as_str())
        .collect();
    assert_eq!(removed.len(), 2);
    for p in &removed {
        let ns = pod_netns(&c.lab, p);
        assert!(
            !netns_exists(&ns),
            "netns {ns} of a removed pod still exists"
        );
        let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
        let dir = c.lab.kubelet_state_dir(node_index(p));
        let record = dir.join("endpoints").join(format!("{uid}.json"));
        assert!(
            !record.exists(),
            "CNI DEL did not remove {}",
            record.display()
        );
        let alloc = std::fs::read_to_string(dir.join("cni/meshless.json")).unwrap_or_default();
        assert!(
            !alloc.contains(uid),
            "CNI DEL did not release the addresses of {uid}: {alloc}"
        );
    }
    let kept_ip = left[0]["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    c.eventually("1 endpoint in the EndpointSlice", T, || {
        c.slice_endpoints("echo") == [(kept_ip.clone(), true)]
    });
    let all_gone = start.elapsed();
    eprintln!(
        "scale 3->1: pods gone from the API after {api_gone:?}, endpoints after {all_gone:?}"
    );
    assert!(
        all_gone < Duration::from_secs(15),
        "scale-down took {all_gone:?} (bound 15 s)"
    );
}

const PROBLEMS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: unready, namespace: default, labels: {app: probe}}
spec:
  containers:
  - name: echo
    image: meshless.dev/echo
    ports: [{containerPort: 8080}]
    readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1, failureThreshold: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: ready, namespace: default, labels: {app: probe}}
spec:
  containers:
  - name: echo
    image: meshless.dev/echo
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: probe, namespace: default}
spec:
  selector: {app: probe}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: noimage, namespace: default, labels: {app: noimage}}
spec:
  containers:
  - {name: main, image: "registry.example/nope:1"}
---
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default, labels: {app: crasher}}
spec:
  containers:
  - name: main
    image: meshless.dev/labtool
    args: [tcp-connect, --to, "127.0.0.1:1", --count, "1", --timeout-ms, "100"]
"#;

fn pod(c: &Cluster, name: &str) -> Value {
    c.get_json(&["get", "pod", name])
}

#[test]
#[ignore = "lab: needs root and the control plane `cargo xtask setup` builds"]
fn lab_kubelet_probes_image_errors_restarts_and_adoption() {
    require_root();
    let mut c = cluster("kblp");
    c.cp.apply(&c.lab, PROBLEMS).expect("apply");

    // (d) failing readiness probe: Running, not Ready, not a ready endpoint.
    c.eventually("pod ready is Ready", T, || running_ready(&pod(&c, "ready")));
    std::thread::sleep(Duration::from_secs(3));
    let unready = pod(&c, "unready");
    assert_eq!(unready["status"]["phase"], "Running", "{unready}");
    assert!(
        !condition(&unready, "Ready"),
        "probe fails, yet Ready: {unready}"
    );
    assert_eq!(unready["status"]["containerStatuses"][0]["ready"], false);
    let (ip_ready, ip_unready) = (
        pod(&c, "ready")["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        unready["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    let mut want = vec![(ip_ready.clone(), true), (ip_unready, false)];
    want.sort();
    c.eventually(
        "slice lists ready=true for ready and ready=false for unready",
        T,
        || c.slice_endpoints("probe") == want,
    );

    // (e) unknown image: Pending with ErrImagePull.
    c.eventually("noimage reports ErrImagePull", T, || {
        let p = pod(&c, "noimage");
        p["status"]["phase"] == "Pending"
            && p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
    });

    // A container that exits is restarted (restartPolicy Always).
    c.eventually("crasher restarted at least twice", T, || {
        pod(&c, "crasher")["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0)
            >= 2
    });

    // Kubelet restart: running pods are adopted, not recreated.
    let before = pod(&c, "ready");
    let node = node_index(&before);
    let cid = before["status"]["containerStatuses"][0]["containerID"].clone();
    c.kubelets[node - 1]
        .stop(Duration::from_secs(5))
        .expect("stop kubelet");
    c.kubelets[node - 1] = start_kubelet(&c.lab, &c.cp, node);
    std::thread::sleep(Duration::from_secs(3));
    let after = pod(&c, "ready");
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(
        after["status"]["podIP"], before["status"]["podIP"],
        "same sandbox"
    );
    assert_eq!(
        after["status"]["containerStatuses"][0]["containerID"], cid,
        "same process after the kubelet restart: {after}"
    );
    assert_eq!(after["status"]["containerStatuses"][0]["restartCount"], 0);
    assert!(running_ready(&after), "{after}");
    assert_eq!(
        http_get(&pod_netns(&c.lab, &pod(&c, "unready")), &ip_ready)
            .map(|b| b.contains("\"pod\":\"ready\"")),
        Ok(true)
    );
    // Deleting a pod still works with the new kubelet.
    c.kubectl(&["delete", "pod", "ready", "--wait=false"]);
    let ns = pod_netns(&c.lab, &before);
    let took = c.eventually("pod ready deleted and its netns gone", T, || {
        pod(&c, "ready").is_null() && !netns_exists(&ns)
    });
    eprintln!("adopted pod deleted {took:?} after kubectl delete");
}
