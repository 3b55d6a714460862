//! Node IPAM controller: Nodes without a pod CIDR in, `spec.podCIDR(s)` out.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::{ControllerError, RETRY_EVERY, still_leader};
use crate::cidr::Cidr;
use crate::node_ipam::{NodeIpam, NodeView};

struct State {
    api: Api<Node>,
    ipam: NodeIpam,
    ready: bool,
    nodes: BTreeMap<String, Node>,
    retry: BTreeSet<String>,
    leader: watch::Receiver<bool>,
}

impl State {
    async fn reconcile(&mut self, node: &Node) {
        if !self.ready {
            return;
        }
        let view = NodeView::from_node(node);
        self.ipam.observe(&view);
        let cidrs = match self.ipam.assign(&view) {
            Ok(None) => {
                self.retry.remove(&view.name);
                return;
            }
            Ok(Some(c)) => c,
            Err(err) => {
                tracing::warn!(node = %view.name, error = %err, "no pod CIDR for node");
                self.retry.insert(view.name.clone());
                return;
            }
        };
        match self.write(&view.name, &cidrs).await {
            Ok(()) => {
                tracing::info!(node = %view.name, cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "assigned pod CIDRs");
                self.retry.remove(&view.name);
            }
            Err(err) => {
                // Give them back: the node's real state arrives with its
                // next watch event (or the retry reads it again).
                self.ipam.release(&NodeView {
                    name: view.name.clone(),
                    pod_cidrs: cidrs,
                    has_pod_cidr: true,
                });
                tracing::warn!(node = %view.name, error = %err, "writing the node's pod CIDRs failed; retrying");
                self.retry.insert(view.name.clone());
            }
        }
    }

    async fn write(&self, name: &str, cidrs: &[Cidr]) -> Result<(), ControllerError> {
        still_leader(&self.leader)?;
        let all: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        let patch = json!({"spec": {"podCIDR": all.first(), "podCIDRs": all}});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|source| ControllerError::Kube {
                what: format!("patching spec.podCIDRs of node {name}"),
                source,
            })
    }
}

/// Runs until aborted.
pub async fn run(client: Client, ipam: NodeIpam, leader: watch::Receiver<bool>) {
    let api: Api<Node> = Api::all(client);
    let mut state = State {
        api: api.clone(),
        ipam,
        ready: false,
        nodes: BTreeMap::new(),
        retry: BTreeSet::new(),
        leader,
    };
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Vec<Node> = Vec::new();
    let mut tick = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(n)) => listing.push(n),
                    Ok(watcher::Event::InitDone) => {
                        let views: Vec<NodeView> = listing.iter().map(NodeView::from_node).collect();
                        state.ipam.rebuild(&views);
                        state.ready = true;
                        tracing::info!(nodes = views.len(), "node IPAM rebuilt from Nodes");
                        state.nodes = listing.drain(..).map(|n| (n.metadata.name.clone().unwrap_or_default(), n)).collect();
                        let all: Vec<Node> = state.nodes.values().cloned().collect();
                        for n in &all {
                            state.reconcile(n).await;
                        }
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        state.nodes.insert(n.metadata.name.clone().unwrap_or_default(), n.clone());
                        state.reconcile(&n).await;
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        let view = NodeView::from_node(&n);
                        state.nodes.remove(&view.name);
                        state.retry.remove(&view.name);
                        state.ipam.release(&view);
                    }
                    Err(err) => tracing::warn!(error = %err, "watching Nodes failed; retrying with backoff"),
                }
            }
            _ = tick.tick() => {
                let names: Vec<String> = state.retry.iter().cloned().collect();
                for n in names {
                    match state.api.get_opt(&n).await {
                        Ok(Some(node)) => state.reconcile(&node).await,
                        Ok(None) => { state.retry.remove(&n); }
                        Err(err) => tracing::debug!(node = %n, error = %err, "re-reading node failed"),
                    }
                }
            }
        }
    }
}
