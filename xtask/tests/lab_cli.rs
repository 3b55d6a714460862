//! Lab tier: the user-facing commands, run as a user runs them.

use std::process::Command;

fn xtask(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn netns_of(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("ml-{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "lab: needs root; run by `cargo xtask test`"]
fn lab_up_status_down_as_a_user_runs_them() {
    meshless_lab::require_root();
    let name = meshless_lab::unique_name("cli");
    let (ok, out) = xtask(&[
        "lab",
        "up",
        "--name",
        &name,
        "--nodes",
        "3",
        "--routing",
        "vxlan",
        "--skip-build",
    ]);
    assert!(ok, "lab up failed:\n{out}");
    assert!(
        out.contains(&format!("cargo xtask lab down --name {name}")),
        "tells how to remove it:\n{out}"
    );
    // 3 nodes x 2 pods + 3 nodes + fabric + external.
    assert_eq!(
        netns_of(&name).len(),
        11,
        "namespaces: {:?}",
        netns_of(&name)
    );

    let (ok, out) = xtask(&["lab", "up", "--name", &name, "--skip-build"]);
    assert!(!ok, "a second lab with the same name must fail");
    assert!(out.contains("already exists"), "{out}");
    assert_eq!(
        netns_of(&name).len(),
        11,
        "the failed `up` created or removed nothing"
    );

    let (ok, out) = xtask(&["lab", "status", "--name", &name, "-o", "json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status -o json is JSON");
    assert_eq!(v[0]["nodes"], 3, "{v}");
    assert_eq!(v[0]["pods"], 6, "{v}");
    assert_eq!(v[0]["stale"], false, "a kept lab is not stale: {v}");
    for agent in v[0]["agents"].as_array().expect("agents") {
        assert_eq!(
            agent["agent_devices_attached"], 2,
            "every agent attached its node's two pods: {v}"
        );
    }

    let (ok, out) = xtask(&["lab", "down", "--name", &name]);
    assert!(ok, "lab down failed:\n{out}");
    assert!(netns_of(&name).is_empty(), "left: {:?}", netns_of(&name));
    assert!(
        !std::path::Path::new("/sys/fs/bpf/meshless")
            .join(format!("{name}-n1"))
            .exists()
    );
    let (ok, out) = xtask(&["lab", "status", "--name", &name]);
    assert!(!ok && out.contains("no lab named"), "{out}");
}

#[test]
#[ignore = "lab: needs root; run by `cargo xtask test`"]
fn lab_demo_passes_its_own_checks() {
    meshless_lab::require_root();
    let (ok, out) = xtask(&[
        "demo",
        "--skip-setup",
        "--skip-build",
        "--connections",
        // 50 per UDP/IPv6 run: all three backends answer except with
        // probability ~1e-8 (the demo checks that every backend served).
        "150",
    ]);
    assert!(ok, "demo failed:\n{out}");
    assert!(out.contains("demo passed"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

/// Removes a lab when dropped, so a failing assertion leaves nothing.
struct LabGuard(String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = xtask(&["lab", "down", "--name", &self.0]);
    }
}

/// docs/book/src/tasks/lab.md, "A Meshless cluster on your machine", step
/// by step: `lab up --control-plane`, `kubectl apply` an example, reach its
/// LoadBalancer address from the external host, `lab down`.
#[test]
#[ignore = "lab: needs root; run by `cargo xtask test`"]
fn lab_up_control_plane_runs_a_meshless_cluster() {
    meshless_lab::require_root();
    let name = meshless_lab::unique_name("cpcli");
    let guard = LabGuard(name.clone());
    let (ok, out) = xtask(&[
        "lab",
        "up",
        "--name",
        &name,
        "--control-plane",
        "--pods-per-node",
        "0",
        "--skip-build",
    ]);
    assert!(ok, "lab up --control-plane failed:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("KUBECONFIG=/")),
        "prints KUBECONFIG:\n{out}"
    );
    let kubectl = |args: &[&str]| {
        let mut all = vec!["kubectl", "--name", &name, "--"];
        all.extend_from_slice(args);
        xtask(&all)
    };
    let (ok, out) = kubectl(&[
        "wait",
        "--for=condition=Ready",
        "node",
        "--all",
        "--timeout=60s",
    ]);
    assert!(ok, "both lab nodes register and become Ready:\n{out}");
    let web =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/web.yaml");
    let (ok, out) = kubectl(&["apply", "-f", &web.display().to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let lb_ip = loop {
        let (_, ip) = kubectl(&[
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        let ip = ip.trim().to_owned();
        if ip.starts_with("198.18.1.") {
            break ip;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "web never got an address from the lab pool: {ip:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // From the external host, as the page shows; the rollout may still be
    // settling into the agents' maps, so a few tries.
    let answered = (0..50).any(|_| {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("ml-{name}-ext")])
            .args(["curl", "-s", "--max-time", "2", &format!("http://{lb_ip}/")])
            .output()
            .expect("ip netns exec curl");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let pod = body["pod"].as_str().unwrap_or("");
        if pod.starts_with("web-") {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    });
    assert!(
        answered,
        "a web pod answers on {lb_ip} from the external host"
    );
    let status = format!("/run/meshless-lab/{name}/nodes/{name}-n1/status.json");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status).expect("the documented status path"))
            .expect("status JSON");
    assert_eq!(st["node_facts"]["ips_from"], "node-object", "{st}");
    drop(guard);
    assert!(netns_of(&name).is_empty(), "left: {:?}", netns_of(&name));
}
