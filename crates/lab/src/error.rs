use std::path::PathBuf;

/// Everything that can go wrong building or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error(
        "invalid pod name {name:?}: use 1-30 lowercase letters, digits and '-', starting and ending alphanumeric"
    )]
    InvalidPodName { name: String },
    #[error(
        "a lab named {name:?} already exists ({found}); pick another name or run `cargo xtask lab down --name {name}`"
    )]
    NameTaken { name: String, found: String },
    #[error("invalid lab spec: {0}")]
    Spec(String),
    #[error("no node {index} in lab {lab} (it has {nodes})")]
    NoSuchNode {
        lab: String,
        index: usize,
        nodes: usize,
    },
    #[error("pod {pod:?} already exists in lab {lab}")]
    PodExists { lab: String, pod: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup v2 is not mounted (looked at /sys/fs/cgroup and /sys/fs/cgroup/unified)")]
    NoCgroup2,
    #[error("tearing down lab {lab} left things behind: {leftovers:?}")]
    Teardown { lab: String, leftovers: Vec<String> },
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

impl LabError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
