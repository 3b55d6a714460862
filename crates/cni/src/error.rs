//! What the plugin tells the runtime when something is wrong: one variant
//! per cause, each mapped to a CNI error code (SPEC.md "Error") and printed
//! as the spec's error object on stdout.

use std::path::PathBuf;

use crate::config::SUPPORTED_VERSIONS;

/// Codes 100 and up are ours (the spec reserves 0-99).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// ADD for a (container, ifname) that already has addresses.
    pub const ALREADY_ADDED: u32 = 100;
    /// No free address left in a pod CIDR.
    pub const POOL_EXHAUSTED: u32 = 101;
    /// CHECK found the container's network different from what ADD made.
    pub const CHECK_FAILED: u32 = 102;
    /// An iproute2 (or nsenter) command failed.
    pub const COMMAND_FAILED: u32 = 103;
    /// The host device name derived from the container id is taken.
    pub const HOST_DEVICE_TAKEN: u32 = 104;
}

fn supported() -> String {
    SUPPORTED_VERSIONS.join(", ")
}

/// Everything meshless-cni reports to the runtime.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(
        "cniVersion {version:?} is not supported: meshless-cni speaks {}; set \"cniVersion\": \"1.0.0\" in the network config",
        supported()
    )]
    IncompatibleVersion { version: String },
    #[error("unsupported field {field} = {value} in the network config: {hint}")]
    UnsupportedField {
        field: &'static str,
        value: String,
        hint: &'static str,
    },
    #[error("{what}")]
    ContainerUnknown { what: String },
    #[error("environment variable {var}: {why}")]
    InvalidEnv { var: &'static str, why: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {why}")]
    Decode { what: String, why: String },
    #[error("network config field {field}: {why}")]
    InvalidConfig { field: String, why: String },
    #[error("{what}; try again later")]
    TryAgain { what: String },
    #[error(
        "container {container_id} already has interface {ifname} on network {network}; run DEL for it before ADD"
    )]
    AlreadyAdded {
        container_id: String,
        ifname: String,
        network: String,
    },
    #[error(
        "no free address in {cidr} ({allocated} containers hold addresses on this node); delete unused pods or give the node a larger pod CIDR"
    )]
    PoolExhausted { cidr: String, allocated: usize },
    #[error(
        "container {container_id} interface {ifname} is not as ADD left it: {}; delete and re-create the pod",
        problems.join("; ")
    )]
    CheckFailed {
        container_id: String,
        ifname: String,
        problems: Vec<String>,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error(
        "host device {device} is already used by container {other_container} (interface {other_ifname}); meshless-cni gives each container one interface per node, named by a hash of the container id"
    )]
    HostDeviceTaken {
        device: String,
        other_container: String,
        other_ifname: String,
    },
}

impl CniError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            Self::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            Self::ContainerUnknown { .. } => code::CONTAINER_UNKNOWN,
            Self::InvalidEnv { .. } => code::INVALID_ENV,
            Self::Io { .. } => code::IO_FAILURE,
            Self::Decode { .. } => code::DECODE_FAILURE,
            Self::InvalidConfig { .. } => code::INVALID_CONFIG,
            Self::TryAgain { .. } => code::TRY_AGAIN_LATER,
            Self::AlreadyAdded { .. } => code::ALREADY_ADDED,
            Self::PoolExhausted { .. } => code::POOL_EXHAUSTED,
            Self::CheckFailed { .. } => code::CHECK_FAILED,
            Self::Command { .. } => code::COMMAND_FAILED,
            Self::HostDeviceTaken { .. } => code::HOST_DEVICE_TAKEN,
        }
    }

    /// The spec's name for the code (ours for 100+).
    pub fn category(&self) -> &'static str {
        match self.code() {
            code::INCOMPATIBLE_VERSION => "incompatible CNI version",
            code::UNSUPPORTED_FIELD => "unsupported field in network configuration",
            code::CONTAINER_UNKNOWN => "container unknown or does not exist",
            code::INVALID_ENV => "invalid necessary environment variables",
            code::IO_FAILURE => "I/O failure",
            code::DECODE_FAILURE => "failed to decode content",
            code::INVALID_CONFIG => "invalid network configuration",
            code::TRY_AGAIN_LATER => "try again later",
            code::ALREADY_ADDED => "container already added",
            code::POOL_EXHAUSTED => "address pool exhausted",
            code::CHECK_FAILED => "container network check failed",
            code::COMMAND_FAILED => "network command failed",
            code::HOST_DEVICE_TAKEN => "host device name in use",
            _ => "plugin error",
        }
    }

    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let (what, path) = (what.into(), path.into());
        move |source| Self::Io { what, path, source }
    }

    pub(crate) fn config(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            why: why.into(),
        }
    }

    pub(crate) fn env(var: &'static str, why: impl Into<String>) -> Self {
        Self::InvalidEnv {
            var,
            why: why.into(),
        }
    }
}

/// A failed invocation as printed: the error, the cniVersion to answer in,
/// and anything that undoing a failed ADD could not remove.
#[derive(Debug)]
pub struct Failure {
    pub cni_version: String,
    pub error: CniError,
    pub cleanup_problems: Vec<String>,
}

impl Failure {
    pub fn new(cni_version: impl Into<String>, error: CniError) -> Self {
        Self {
            cni_version: cni_version.into(),
            error,
            cleanup_problems: Vec::new(),
        }
    }

    /// The spec's error object: `msg` says what is wrong and what to do,
    /// `details` names the code's category (and failed cleanup, if any).
    pub fn to_json(&self) -> serde_json::Value {
        let mut details = format!("CNI error {}: {}", self.error.code(), self.error.category());
        if !self.cleanup_problems.is_empty() {
            details.push_str("; undoing the failed ADD also failed: ");
            details.push_str(&self.cleanup_problems.join("; "));
        }
        serde_json::json!({
            "cniVersion": self.cni_version,
            "code": self.error.code(),
            "msg": self.error.to_string(),
            "details": details,
        })
    }
}
