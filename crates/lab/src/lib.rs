//! The Meshless lab: a cluster-shaped test bed on one machine.
//!
//! A lab is N nodes and an "external" host, each a network namespace, wired to
//! a shared fabric (a bridge in a namespace of its own, so nothing touches the
//! machine's root namespace or its real interfaces). Pods are network
//! namespaces behind veth pairs in their node; each pod's processes live in a
//! cgroup v2 under the node's cgroup. Routing between nodes is either direct
//! (routes via the peer node) or a VXLAN overlay. Addresses come only from
//! 198.18.0.0/15 and fd00::/8 (see [`plan`]).
//!
//! Every object a lab creates carries its name, so [`destroy`] can remove a
//! lab completely even when the process that made it crashed.
//!
//! This crate is a test bed, not part of the product.

mod cgroup;
mod cmd;
pub mod control_plane;
mod error;
mod kubelet_host;
mod lab;
pub mod plan;
mod process;
mod state;

pub use control_plane::ControlPlane;
pub use error::LabError;
pub use kubelet_host::ClusterProcesses;
pub use lab::{Host, Lab, LabSpec, Pod, Routing, TeardownReport, destroy, list};
pub use process::{LabProcess, join_before_exec};
pub use state::LabInfo;

/// True when this process can create namespaces and load BPF (root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For privileged and lab tests: panics with a clear message when not root.
/// Tests in those tiers never skip silently; `cargo xtask test` decides which
/// tiers run and says so.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (real network namespaces, cgroups and BPF); \
         run it with `sudo -E cargo xtask test` or in CI"
    );
}

/// Path of a workspace binary (`meshless-agent`, `meshless-labtool`, ...) for
/// tests: `$MESHLESS_BIN_DIR/<name>` if set, else next to the test executable's
/// target directory (`target/<profile>/<name>`).
pub fn bin_path(name: &str) -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("MESHLESS_BIN_DIR") {
        return std::path::Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("test executable has a parent directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// A lab name unique to this process and call, for tests that run side by side.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let mut name: String = prefix
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect();
    name.push_str(&format!("{pid}{n}"));
    name.make_ascii_lowercase();
    name.truncate(plan::MAX_LAB_NAME);
    name
}
