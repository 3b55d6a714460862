use std::path::{Path, PathBuf};

/// Where every node's maps are pinned; one directory per node below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/meshless";

/// `/sys/fs/bpf/meshless/<node>` (or `<root>/<node>` for a custom root).
pub fn node_pin_dir(root: &Path, node: &str) -> PathBuf {
    root.join(node)
}

/// True when `path` (or the mount it lives on) is a BPF filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // The longest mount point that is a prefix of `path` decides.
    let mut best: Option<(usize, bool)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount_point) = fields.get(4) else {
            continue;
        };
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let Some(fstype) = fields.get(sep + 1) else {
            continue;
        };
        if path.starts_with(mount_point) && best.is_none_or(|(len, _)| mount_point.len() >= len) {
            best = Some((mount_point.len(), *fstype == "bpf"));
        }
    }
    best.is_some_and(|(_, bpf)| bpf)
}
