//! `LoadBalancerIPPool`: address blocks LB-IPAM hands out to Services of
//! `type: LoadBalancer`, next to the operator's `--lb-pool` flags.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `type` of the one condition the operator writes.
pub const READY: &str = "Ready";

/// The addresses the pool hands out. Cluster-scoped: a Service in any
/// namespace may get an address from any Ready pool.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "meshless.dev",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "lbippool",
    category = "meshless",
    label("app.kubernetes.io/part-of", "meshless"),
    status = "LoadBalancerIPPoolStatus",
    doc = "Address blocks meshless-operator's LB-IPAM hands out to Services of type LoadBalancer. A pool whose blocks do not parse or overlap another pool's (the older pool wins) or an --lb-pool flag gets Ready=False and hands out nothing."
)]
#[expect(
    clippy::duplicated_attributes,
    reason = "each printcolumn repeats `type_ = \"string\"`: distinct columns, not duplicates"
)]
#[kube(printcolumn(
    name = "Ready",
    type_ = "string",
    json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
    description = "Whether LB-IPAM hands out addresses from this pool"
))]
#[kube(printcolumn(
    name = "Reason",
    type_ = "string",
    json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
    description = "Accepted, InvalidSpec, InvalidCIDR or Overlap"
))]
#[kube(printcolumn(
    name = "Message",
    type_ = "string",
    json_path = r#".status.conditions[?(@.type=="Ready")].message"#,
    description = "The blocks served, or what to fix",
    priority = 1
))]
#[kube(printcolumn(
    name = "Age",
    type_ = "date",
    json_path = ".metadata.creationTimestamp"
))]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolSpec {
    /// The address blocks of this pool, IPv4 and/or IPv6. A Service gets
    /// at most one address per family. IPv4 blocks larger than /31 never
    /// hand out their network and broadcast addresses.
    #[schemars(length(min = 1))]
    pub blocks: Vec<IpBlock>,
}

/// One block of addresses.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// A prefix with its host bits zero, e.g. 198.18.1.0/24 or fd00:d::/112.
    // Parsed by the operator, not by the API server, so that a typo gets a
    // condition that says what was probably meant instead of a bare
    // rejection by a pattern.
    pub cidr: String,
}

/// What the operator observed about the pool.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolStatus {
    /// `Ready`: True while LB-IPAM hands out addresses from every block of
    /// this pool; False with the reason and the field to fix otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The schema of `metav1.Condition` lists as Kubernetes' own types
/// publish it: a map keyed by `type`, so writers of different conditions
/// merge instead of replacing each other's.
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
            "properties": {
                "lastTransitionTime": {
                    "type": "string",
                    "format": "date-time",
                    "description": "When the condition last changed from one status to another."
                },
                "message": {
                    "type": "string",
                    "maxLength": 32768,
                    "description": "Human-readable details; for False, the object and field to fix."
                },
                "observedGeneration": {
                    "type": "integer",
                    "format": "int64",
                    "minimum": 0,
                    "description": "The metadata.generation the condition was computed from."
                },
                "reason": {
                    "type": "string",
                    "maxLength": 1024,
                    "minLength": 1,
                    "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                    "description": "A CamelCase reason for the status."
                },
                "status": {
                    "type": "string",
                    "enum": ["True", "False", "Unknown"]
                },
                "type": {
                    "type": "string",
                    "maxLength": 316,
                    "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
                }
            }
        }
    })
}
