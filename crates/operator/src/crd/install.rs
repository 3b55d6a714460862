//! Installs and upgrades the operator's CRDs at start: server-side apply of
//! each, then a bounded wait until the API server serves it. Every replica
//! does it before the election; it is idempotent, so replicas racing each
//! other converge on the same object.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

/// Field manager of the operator's CRD writes.
pub const FIELD_MANAGER: &str = "meshless-operator";
/// How long a CRD may take to become `Established` (normally well under a
/// second; the API server must first accept its names).
pub const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

const RBAC_HINT: &str = "the operator's ServiceAccount needs get, create and patch on customresourcedefinitions (apiextensions.k8s.io); grant them, or start the operator with --install-crds=false and install charts/meshless/crds/ yourself";

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot {verb} CustomResourceDefinition {crd}: forbidden ({message}); {RBAC_HINT}")]
    Forbidden {
        crd: String,
        verb: &'static str,
        message: String,
    },
    #[error("cannot {verb} CustomResourceDefinition {crd}: {source}")]
    Kube {
        crd: String,
        verb: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(
        "CustomResourceDefinition {crd} is not Established after {}s ({state}); see `kubectl get crd {crd} -o yaml` (NamesAccepted=False means another CRD already uses its names)",
        .waited.as_secs()
    )]
    NotEstablished {
        crd: String,
        waited: Duration,
        state: String,
    },
}

fn kube_error(crd: &str, verb: &'static str, source: kube::Error) -> CrdError {
    match source {
        kube::Error::Api(status) if status.code == 403 => CrdError::Forbidden {
            crd: crd.to_owned(),
            verb,
            message: status.message,
        },
        source => CrdError::Kube {
            crd: crd.to_owned(),
            verb,
            source,
        },
    }
}

/// Whether the API server's copy of a CRD serves other versions, schemas,
/// subresources or printer columns than `desired`. Server-side apply
/// cannot remove fields another field manager owns (e.g. a schema property
/// dropped since `helm install` or `kubectl apply` created the CRD), so
/// after applying the operator compares, and replaces `spec.versions` when
/// they still differ.
pub fn versions_differ(
    desired: &CustomResourceDefinition,
    live: &CustomResourceDefinition,
) -> bool {
    serde_json::to_value(&desired.spec.versions).ok()
        != serde_json::to_value(&live.spec.versions).ok()
}

/// The status of condition `type_` of a CRD, and its message.
fn condition(crd: &CustomResourceDefinition, type_: &str) -> Option<(String, String)> {
    crd.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()))
}

/// Applies every CRD in `crds` (server-side, forced: the operator owns
/// them) and waits until each is `Established`.
pub async fn install(client: &Client, crds: &[CustomResourceDefinition]) -> Result<(), CrdError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = api
            .patch(&name, &params, &Patch::Apply(crd))
            .await
            .map_err(|e| kube_error(&name, "apply (patch)", e))?;
        if versions_differ(crd, &applied) {
            tracing::info!(crd = %name, "fields from an older CRD survived the apply: replacing spec.versions");
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            let patch = json!({"spec": {"versions": crd.spec.versions}});
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| kube_error(&name, "patch", e))?;
        }
        wait_established(&api, &name, ESTABLISH_TIMEOUT).await?;
        tracing::info!(crd = %name, "CustomResourceDefinition installed and Established");
    }
    Ok(())
}

/// Polls the CRD (only `get` is needed, no list/watch) until `Established`.
async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    timeout: Duration,
) -> Result<(), CrdError> {
    let start = Instant::now();
    let mut state = "no conditions yet".to_owned();
    loop {
        let live = api
            .get(name)
            .await
            .map_err(|e| kube_error(name, "get", e))?;
        match condition(&live, "Established") {
            Some((status, _)) if status == "True" => return Ok(()),
            Some((status, message)) => {
                state = format!("Established={status}: {message}");
                if let Some((names, message)) =
                    condition(&live, "NamesAccepted").filter(|(status, _)| status == "False")
                {
                    state = format!("NamesAccepted={names}: {message}");
                }
            }
            None => {}
        }
        if start.elapsed() >= timeout {
            return Err(CrdError::NotEstablished {
                crd: name.to_owned(),
                waited: start.elapsed(),
                state,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;
    use crate::crd::LoadBalancerIPPool;

    #[test]
    fn forbidden_names_the_crd_and_the_missing_permission() {
        let status = kube::core::Status::failure("customresourcedefinitions.apiextensions.k8s.io \"loadbalancerippools.meshless.dev\" is forbidden", "Forbidden").with_code(403);
        let err = kube_error(
            "loadbalancerippools.meshless.dev",
            "apply (patch)",
            kube::Error::Api(Box::new(status)),
        );
        let text = err.to_string();
        assert!(text.starts_with("cannot apply (patch) CustomResourceDefinition loadbalancerippools.meshless.dev: forbidden"), "{text}");
        assert!(
            text.contains("needs get, create and patch on customresourcedefinitions"),
            "{text}"
        );
        assert!(text.contains("--install-crds=false"), "{text}");
    }

    #[test]
    fn an_extra_schema_property_is_a_difference() {
        let desired = LoadBalancerIPPool::crd();
        assert!(!versions_differ(&desired, &desired.clone()));
        let mut old: serde_json::Value = serde_json::to_value(&desired).expect("JSON");
        old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["legacy"] = json!({"type": "string"});
        let old: CustomResourceDefinition = serde_json::from_value(old).expect("CRD");
        assert!(versions_differ(&desired, &old));
    }
}
