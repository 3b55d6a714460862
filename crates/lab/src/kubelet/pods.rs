//! The pod watch: every Pod bound to this node (field selector
//! `spec.nodeName`) gets one worker task, fed the latest object.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::Ctx;
use crate::{record, worker};

#[derive(Debug, Default)]
struct Pods {
    workers: HashMap<String, (watch::Sender<Option<Pod>>, JoinHandle<()>)>,
    /// Pods whose worker has finished (stopped and deleted): later events
    /// for them must not start them again.
    done: HashSet<String>,
}

impl Pods {
    fn apply(&mut self, ctx: &Arc<Ctx>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        self.workers.retain(|uid, (_, task)| {
            if task.is_finished() {
                self.done.insert(uid.clone());
                false
            } else {
                true
            }
        });
        if let Some((tx, _)) = self.workers.get(&uid) {
            tx.send_replace(Some(pod));
            return;
        }
        if self.done.contains(&uid) {
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let terminal = matches!(phase, Some("Succeeded" | "Failed"));
        if terminal && pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let (tx, rx) = watch::channel(Some(pod));
        let task = tokio::spawn(worker::run(ctx.clone(), rx));
        self.workers.insert(uid, (tx, task));
    }

    fn gone(&mut self, uid: &str) {
        if let Some((tx, _)) = self.workers.get(uid) {
            tx.send_replace(None);
        }
    }
}

/// Watches this node's pods forever.
pub async fn run(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut pods = Pods::default();
    let mut listed: HashSet<String> = HashSet::new();
    let mut first_list = true;
    while let Some(ev) = events.next().await {
        match ev {
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    listed.insert(uid.clone());
                }
                pods.apply(&ctx, pod);
            }
            Ok(Event::InitDone) => {
                let stale: Vec<String> = pods
                    .workers
                    .keys()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    pods.gone(&uid);
                }
                if first_list {
                    // Records of pods the API no longer has (deleted while
                    // this kubelet was down): remove what they left.
                    for rec in record::all(&ctx) {
                        if !listed.contains(&rec.uid) {
                            tokio::spawn(worker::clean_orphan(ctx.clone(), rec));
                        }
                    }
                    first_list = false;
                }
                tracing::info!(node = %ctx.node, pods = listed.len(), "pod list synced");
            }
            Ok(Event::Apply(pod)) => pods.apply(&ctx, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    pods.gone(uid);
                }
            }
        }
    }
    anyhow::bail!("the pod watch ended")
}
