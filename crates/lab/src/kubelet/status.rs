//! Small helpers for the status objects the kubelet posts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Now as a Kubernetes timestamp (RFC 3339, whole seconds).
pub fn now() -> serde_json::Value {
    let t = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(Time(t)).unwrap_or_default()
}

/// A pod condition with a stable lastTransitionTime: it only moves when the
/// status flips.
#[derive(Debug, Clone)]
pub struct Condition {
    pub kind: &'static str,
    status: bool,
    since: serde_json::Value,
}

impl Condition {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            status: false,
            since: now(),
        }
    }

    pub fn set(&mut self, status: bool) {
        if status != self.status {
            self.status = status;
            self.since = now();
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.kind,
            "status": if self.status { "True" } else { "False" },
            "lastTransitionTime": self.since,
        })
    }
}
