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
