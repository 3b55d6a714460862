//! Which blocks LB-IPAM may hand out: the `--lb-pool` flags plus every
//! valid LoadBalancerIPPool object, and the `Ready` condition each pool
//! object gets. Pure: the controller feeds it the objects it watches.
//!
//! A pool is all or nothing: if one of its blocks does not parse or
//! overlaps a block that is already served, the pool serves no block, so a
//! half-applied pool never hands out addresses its author did not mean.
//! Overlaps are decided in a fixed order: flags first, then pools by
//! creation time, then name; the earlier one keeps its blocks.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::DynamicObject;

use crate::cidr::Cidr;
use crate::crd::LoadBalancerIPPoolSpec;
use crate::crd::lb_ip_pool::READY;

/// What validation needs of one LoadBalancerIPPool object.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    pub name: String,
    /// `metadata.creationTimestamp` as RFC 3339 text (sorts by time).
    pub created: String,
    /// `metadata.generation`, for `observedGeneration`.
    pub generation: Option<i64>,
    /// `spec.blocks[].cidr` in order, or why the object could not be read.
    pub blocks: Result<Vec<String>, String>,
    /// The `Ready` condition the object has now, if any.
    pub ready: Option<Condition>,
}

impl PoolView {
    /// Reads a watched object. Never fails: an object that does not match
    /// the types (e.g. written under an older CRD) becomes an `InvalidSpec`
    /// verdict instead of stopping the watch.
    pub fn from_object(obj: &DynamicObject) -> Self {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let created = obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        // The spec alone: a status someone else mangled must not make a
        // good pool unusable.
        let blocks = obj
            .data
            .get("spec")
            .ok_or_else(|| "spec is missing".to_owned())
            .and_then(|spec| {
                serde_json::from_value::<LoadBalancerIPPoolSpec>(spec.clone())
                    .map_err(|e| format!("spec: {e}"))
            })
            .map(|spec| spec.blocks.into_iter().map(|b| b.cidr).collect());
        // Leniently: an unreadable status is just rewritten.
        let ready = obj
            .data
            .get("status")
            .and_then(|s| s.get("conditions"))
            .and_then(|c| serde_json::from_value::<Vec<Condition>>(c.clone()).ok())
            .and_then(|c| c.into_iter().find(|c| c.type_ == READY));
        Self {
            name,
            created,
            generation: obj.metadata.generation,
            blocks,
            ready,
        }
    }
}

/// The `reason` of a pool's `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolReason {
    /// Every block is served.
    Accepted,
    /// The object could not be read, or lists no block.
    InvalidSpec,
    /// A block is not a valid prefix.
    InvalidCidr,
    /// A block overlaps a flag pool, another block of the pool, or an
    /// older pool.
    Overlap,
}

impl PoolReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::InvalidSpec => "InvalidSpec",
            Self::InvalidCidr => "InvalidCIDR",
            Self::Overlap => "Overlap",
        }
    }
}

impl fmt::Display for PoolReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome for one pool object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolVerdict {
    pub reason: PoolReason,
    /// For the condition: the blocks served, or the object and field to fix.
    pub message: String,
    /// The blocks served (empty unless accepted).
    pub blocks: Vec<Cidr>,
}

impl PoolVerdict {
    pub fn ready(&self) -> bool {
        self.reason == PoolReason::Accepted
    }
}

/// Every block LB-IPAM may hand out, and the verdict on each pool object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolSet {
    /// Flag pools first, then accepted pools oldest first: the order in
    /// which the allocator looks for a free address.
    pub usable: Vec<Cidr>,
    /// By pool name.
    pub verdicts: BTreeMap<String, PoolVerdict>,
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    a.covers(b) || b.covers(a)
}

fn rejected(name: &str, reason: PoolReason, problems: &[String], fix: &str) -> PoolVerdict {
    PoolVerdict {
        reason,
        message: format!("LoadBalancerIPPool {name}: {}; {fix}", problems.join("; ")),
        blocks: Vec::new(),
    }
}

/// Decides which pools are served. `flags` must not overlap each other
/// (the config check refuses that at start).
pub fn validate_pools(flags: &[Cidr], pools: &[PoolView]) -> PoolSet {
    let mut set = PoolSet {
        usable: flags.to_vec(),
        verdicts: BTreeMap::new(),
    };
    // Who serves each block so far, to name it in an overlap message.
    let mut served: Vec<(Cidr, String)> = flags
        .iter()
        .map(|c| (*c, format!("--lb-pool {c}")))
        .collect();
    let mut order: Vec<&PoolView> = pools.iter().collect();
    order.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    for pool in order {
        let name = &pool.name;
        let verdict = match &pool.blocks {
            Err(e) => rejected(
                name,
                PoolReason::InvalidSpec,
                &[format!("cannot read the object: {e}")],
                "fix it with `kubectl edit loadbalancerippool` (no block of this pool is used until then)",
            ),
            Ok(blocks) if blocks.is_empty() => rejected(
                name,
                PoolReason::InvalidSpec,
                &["spec.blocks is empty".to_owned()],
                "list at least one block, e.g. `blocks: [{cidr: 198.18.1.0/24}]`",
            ),
            Ok(blocks) => judge(name, blocks, &served),
        };
        if verdict.ready() {
            for (i, c) in verdict.blocks.iter().enumerate() {
                set.usable.push(*c);
                served.push((
                    *c,
                    format!("LoadBalancerIPPool {name} spec.blocks[{i}].cidr {c}"),
                ));
            }
        }
        set.verdicts.insert(name.clone(), verdict);
    }
    set
}

/// The verdict on one pool's blocks, given the blocks already served.
fn judge(name: &str, blocks: &[String], served: &[(Cidr, String)]) -> PoolVerdict {
    let mut parsed = Vec::new();
    let mut problems = Vec::new();
    for (i, text) in blocks.iter().enumerate() {
        match text.parse::<Cidr>() {
            Ok(c) => parsed.push((i, c)),
            Err(e) => problems.push(format!("spec.blocks[{i}].cidr: {e}")),
        }
    }
    if !problems.is_empty() {
        return rejected(
            name,
            PoolReason::InvalidCidr,
            &problems,
            "no block of this pool is used until every block is a valid prefix",
        );
    }
    for (n, (i, c)) in parsed.iter().enumerate() {
        for (j, earlier) in &parsed[..n] {
            if overlaps(c, earlier) {
                problems.push(format!(
                    "spec.blocks[{i}].cidr {c} overlaps spec.blocks[{j}].cidr {earlier} of the same pool"
                ));
            }
        }
        for (other, who) in served {
            if overlaps(c, other) {
                problems.push(format!(
                    "spec.blocks[{i}].cidr {c} overlaps {who}, which was there first and keeps it"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return rejected(
            name,
            PoolReason::Overlap,
            &problems,
            "remove the overlap (no block of this pool is used until then)",
        );
    }
    let blocks: Vec<Cidr> = parsed.into_iter().map(|(_, c)| c).collect();
    let shown: Vec<String> = blocks.iter().map(ToString::to_string).collect();
    PoolVerdict {
        reason: PoolReason::Accepted,
        message: format!("serving {}", shown.join(", ")),
        blocks,
    }
}

/// The `Ready` condition to write for a verdict. `lastTransitionTime`
/// moves only when the status flips, as Kubernetes conditions do.
pub fn ready_condition(
    verdict: &PoolVerdict,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Time,
) -> Condition {
    let status = if verdict.ready() { "True" } else { "False" };
    let last_transition_time = previous
        .filter(|p| p.status == status)
        .map_or(now, |p| p.last_transition_time.clone());
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: verdict.reason.as_str().to_owned(),
        message: verdict.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether `previous` already says what `desired` says (time aside).
pub fn condition_current(previous: Option<&Condition>, desired: &Condition) -> bool {
    previous.is_some_and(|p| {
        p.status == desired.status
            && p.reason == desired.reason
            && p.message == desired.message
            && p.observed_generation == desired.observed_generation
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|p| p.parse().expect(p)).collect()
    }

    fn pool(name: &str, created: &str, blocks: &[&str]) -> PoolView {
        PoolView {
            name: name.into(),
            created: format!("2026-01-01T00:00:{created}Z"),
            generation: Some(1),
            blocks: Ok(blocks.iter().map(|b| (*b).to_owned()).collect()),
            ready: None,
        }
    }

    #[test]
    fn flags_and_valid_pools_are_usable_in_order() {
        let set = validate_pools(
            &cidrs(&["198.18.1.0/24"]),
            &[
                pool("b", "02", &["198.18.3.0/24"]),
                pool("a", "01", &["198.18.2.0/24", "fd00:d::/112"]),
            ],
        );
        assert_eq!(
            set.usable,
            cidrs(&[
                "198.18.1.0/24",
                "198.18.2.0/24",
                "fd00:d::/112",
                "198.18.3.0/24"
            ])
        );
        assert!(set.verdicts.values().all(PoolVerdict::ready));
        assert_eq!(
            set.verdicts["a"].message,
            "serving 198.18.2.0/24, fd00:d::/112"
        );
    }

    #[test]
    fn a_bad_cidr_rejects_the_whole_pool_and_names_the_field() {
        let set = validate_pools(
            &[],
            &[
                pool("blue", "01", &["198.18.2.0/24", "198.18.1.1/24", "nope"]),
                pool("green", "02", &["198.18.3.0/24"]),
            ],
        );
        let blue = &set.verdicts["blue"];
        assert_eq!(blue.reason, PoolReason::InvalidCidr);
        assert_eq!(
            blue.message,
            "LoadBalancerIPPool blue: spec.blocks[1].cidr: \"198.18.1.1/24\" has host bits set: did you mean 198.18.1.0/24?; \
             spec.blocks[2].cidr: \"nope\" is not a prefix: write it as address/length, e.g. 198.18.1.0/24 or fd00:d::/112; \
             no block of this pool is used until every block is a valid prefix"
        );
        // Nothing of blue is used, not even its valid first block; green is unaffected.
        assert_eq!(set.usable, cidrs(&["198.18.3.0/24"]));
        assert!(set.verdicts["green"].ready());
    }

    #[test]
    fn overlaps_lose_to_flags_and_older_pools() {
        let set = validate_pools(
            &cidrs(&["198.18.1.0/24"]),
            &[
                pool("new", "09", &["198.18.2.128/25"]),
                pool("old", "01", &["198.18.2.0/24"]),
                pool("flagged", "03", &["fd00:d::/112", "198.18.1.128/25"]),
                pool("self", "04", &["198.18.4.0/24", "198.18.4.0/23"]),
                // Same time: the name decides.
                pool("tie-b", "05", &["198.18.5.0/24"]),
                pool("tie-a", "05", &["198.18.5.0/24"]),
            ],
        );
        assert!(set.verdicts["old"].ready());
        assert!(set.verdicts["tie-a"].ready());
        for name in ["new", "flagged", "self", "tie-b"] {
            assert_eq!(set.verdicts[name].reason, PoolReason::Overlap, "{name}");
        }
        assert_eq!(
            set.verdicts["new"].message,
            "LoadBalancerIPPool new: spec.blocks[0].cidr 198.18.2.128/25 overlaps LoadBalancerIPPool old spec.blocks[0].cidr 198.18.2.0/24, which was there first and keeps it; \
             remove the overlap (no block of this pool is used until then)"
        );
        assert!(
            set.verdicts["flagged"]
                .message
                .contains("spec.blocks[1].cidr 198.18.1.128/25 overlaps --lb-pool 198.18.1.0/24"),
            "{}",
            set.verdicts["flagged"].message
        );
        assert!(set.verdicts["self"].message.contains(
            "spec.blocks[1].cidr 198.18.4.0/23 overlaps spec.blocks[0].cidr 198.18.4.0/24 of the same pool"
        ));
        // The rejected pools' valid blocks (fd00:d::/112) are not used either.
        assert_eq!(
            set.usable,
            cidrs(&["198.18.1.0/24", "198.18.2.0/24", "198.18.5.0/24"])
        );
    }

    #[test]
    fn a_rejected_pool_does_not_block_a_newer_one() {
        // The older pool serves nothing, so the newer one's block is free.
        let set = validate_pools(
            &[],
            &[
                pool("old", "01", &["198.18.2.0/24", "bad"]),
                pool("new", "02", &["198.18.2.0/24"]),
            ],
        );
        assert!(!set.verdicts["old"].ready());
        assert!(set.verdicts["new"].ready());
        assert_eq!(set.usable, cidrs(&["198.18.2.0/24"]));
    }

    #[test]
    fn unreadable_or_empty_objects_are_invalid_spec() {
        let mut broken = pool("broken", "01", &[]);
        broken.blocks = Err("missing field `blocks`".into());
        let set = validate_pools(&[], &[broken, pool("empty", "02", &[])]);
        assert_eq!(set.verdicts["broken"].reason, PoolReason::InvalidSpec);
        assert!(
            set.verdicts["broken"]
                .message
                .contains("missing field `blocks`")
        );
        assert_eq!(set.verdicts["empty"].reason, PoolReason::InvalidSpec);
        assert!(
            set.verdicts["empty"]
                .message
                .contains("spec.blocks is empty")
        );
        assert!(set.usable.is_empty());
    }

    #[test]
    fn reads_objects_without_failing() {
        let ok: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "meshless.dev/v1alpha1", "kind": "LoadBalancerIPPool",
            "metadata": {"name": "p", "generation": 3, "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"blocks": [{"cidr": "198.18.1.0/24"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Accepted",
                "message": "serving 198.18.1.0/24", "observedGeneration": 3,
                "lastTransitionTime": "2026-01-02T03:04:06Z"}]}
        }))
        .expect("object");
        let v = PoolView::from_object(&ok);
        assert_eq!(v.blocks, Ok(vec!["198.18.1.0/24".to_owned()]));
        assert_eq!(v.created, "2026-01-02T03:04:05Z");
        assert_eq!(v.generation, Some(3));
        assert_eq!(
            v.ready.as_ref().map(|c| c.reason.as_str()),
            Some("Accepted")
        );
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "meshless.dev/v1alpha1", "kind": "LoadBalancerIPPool",
            "metadata": {"name": "q"},
            "spec": {"blocks": "198.18.1.0/24"},
            "status": "garbage"
        }))
        .expect("object");
        let v = PoolView::from_object(&bad);
        assert!(
            v.blocks
                .as_ref()
                .is_err_and(|e| e.starts_with("spec: invalid type")),
            "{:?}",
            v.blocks
        );
        assert_eq!(v.ready, None);
        // A mangled status does not make a good spec unreadable.
        let mut good_spec = bad.clone();
        good_spec.data["spec"] = serde_json::json!({"blocks": [{"cidr": "198.18.1.0/24"}]});
        assert!(PoolView::from_object(&good_spec).blocks.is_ok());
    }

    #[test]
    fn example_pool_is_ready() {
        let obj: DynamicObject =
            serde_yaml::from_str(include_str!("../../../../examples/lb-ipam/pool.yaml"))
                .expect("examples/lb-ipam/pool.yaml is a LoadBalancerIPPool");
        assert_eq!(
            obj.types.as_ref().map(|t| t.kind.as_str()),
            Some("LoadBalancerIPPool")
        );
        let set = validate_pools(&[], &[PoolView::from_object(&obj)]);
        assert_eq!(set.usable, cidrs(&["198.18.1.0/24", "fd00:d::/112"]));
        assert_eq!(set.verdicts["default"].reason, PoolReason::Accepted);
    }

    #[test]
    fn conditions_keep_their_transition_time_until_the_status_flips() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("time"));
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).expect("time"));
        let set = validate_pools(&[], &[pool("p", "01", &["198.18.1.0/24"])]);
        let ok = ready_condition(&set.verdicts["p"], Some(1), None, t0.clone());
        assert_eq!(
            (ok.status.as_str(), ok.reason.as_str()),
            ("True", "Accepted")
        );
        assert_eq!(ok.observed_generation, Some(1));
        assert!(condition_current(Some(&ok), &ok));
        // Same status, new generation: rewritten, time kept.
        let again = ready_condition(&set.verdicts["p"], Some(2), Some(&ok), t1.clone());
        assert!(!condition_current(Some(&ok), &again));
        assert_eq!(again.last_transition_time, t0);
        // Flipped: new time.
        let set = validate_pools(&[], &[pool("p", "01", &["x"])]);
        let bad = ready_condition(&set.verdicts["p"], Some(3), Some(&again), t1.clone());
        assert_eq!(
            (bad.status.as_str(), bad.reason.as_str()),
            ("False", "InvalidCIDR")
        );
        assert_eq!(bad.last_transition_time, t1);
        assert!(!condition_current(None, &bad));
    }
}
