//! Node registration and heartbeat: the Node object with this node's fabric
//! addresses and pod CIDRs, and a status update every [`HEARTBEAT`] so the
//! node lifecycle controller keeps it Ready.

use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::context::{Ctx, HEARTBEAT, KUBELET_VERSION};
use crate::status::now;

fn node_status(ctx: &Ctx) -> serde_json::Value {
    let t = now();
    let resources =
        json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"});
    json!({
        "addresses": [
            {"type": "InternalIP", "address": ctx.ipv4.to_string()},
            {"type": "InternalIP", "address": ctx.ipv6.to_string()},
            {"type": "Hostname", "address": ctx.node},
        ],
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "meshless-lab-kubelet is posting ready status",
            "lastHeartbeatTime": t,
            "lastTransitionTime": t,
        }],
        "nodeInfo": {
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH,
            "containerRuntimeVersion": "meshless-lab://0",
            "osImage": "meshless lab",
            "kernelVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    })
}

/// Creates the Node (or takes over an existing one with the same name, as
/// kubelet does after a restart) and posts its first status.
pub async fn register(ctx: &Ctx) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let cidrs = ctx.pod_cidrs();
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": ctx.node,
            "labels": {
                "kubernetes.io/hostname": ctx.node,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
                "meshless.dev/lab": ctx.lab,
            },
        },
        "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
    }))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %ctx.node, ?cidrs, "registered node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(node = %ctx.node, "node exists; taking it over");
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("registering node {} (is the API server up?)", ctx.node));
        }
    }
    post_status(ctx, &api).await
}

async fn post_status(ctx: &Ctx, api: &Api<Node>) -> anyhow::Result<()> {
    api.patch_status(
        &ctx.node,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": node_status(ctx)})),
    )
    .await
    .with_context(|| format!("updating status of node {}", ctx.node))?;
    Ok(())
}

/// Keeps the node's Ready condition fresh forever.
pub async fn heartbeat(ctx: Arc<Ctx>) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        if let Err(e) = post_status(&ctx, &api).await {
            tracing::warn!(node = %ctx.node, error = %format!("{e:#}"), "heartbeat failed");
        }
    }
}
