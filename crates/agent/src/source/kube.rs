//! Cluster objects from the Kubernetes API: one reflector per kind, each a
//! watch with backoff and re-list (410 Gone, API server restarts and
//! timeouts are absorbed by kube-runtime's watcher). Until every reflector
//! has completed its first list the source reports nothing, so an agent that
//! (re)starts while the API server is down keeps serving what is pinned
//! instead of reconciling against an empty cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};

use super::{ClusterObjects, Source};

/// Shared between the reflector tasks and the source.
#[derive(Debug, Default)]
struct Progress {
    /// Bumped on every watch event that changed a store.
    changes: AtomicU64,
    /// Reflectors that finished their first list.
    ready: AtomicU64,
    /// Whether the last watch attempt of any reflector failed (for status).
    failing: AtomicBool,
}

/// The Kubernetes API source.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    progress: Arc<Progress>,
    kinds: u64,
    seen: Option<u64>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, progress: Arc<Progress>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let ready_reader = reader.clone();
    let p = Arc::clone(&progress);
    tokio::spawn(async move {
        if ready_reader.wait_until_ready().await.is_ok() {
            p.ready.fetch_add(1, Ordering::SeqCst);
            tracing::info!(%kind, "initial list complete");
        }
    });
    let kind = K::kind(&()).into_owned();
    let stream = reflector::reflector(
        writer,
        watcher(api, config)
            .default_backoff()
            // managedFields are often the largest part of an object and no
            // compiler reads them: do not keep them in memory.
            .modify(|o| o.meta_mut().managed_fields = None),
    );
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    progress.failing.store(false, Ordering::SeqCst);
                    progress.changes.fetch_add(1, Ordering::SeqCst);
                }
                Err(err) => {
                    // The watcher backs off and retries by itself; the maps
                    // keep what they have meanwhile.
                    if !progress.failing.swap(true, Ordering::SeqCst) {
                        tracing::warn!(%kind, error = %err, "watch failed; retrying with backoff");
                    }
                }
            }
        }
    });
    reader
}

impl KubeSource {
    /// Starts one reflector per kind (needs a tokio runtime). Pods are
    /// watched only for `node`: an agent never holds the whole cluster's pods.
    pub fn start(client: Client, node: &str) -> Self {
        let progress = Arc::new(Progress::default());
        let all = watcher::Config::default;
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            all(),
            Arc::clone(&progress),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            all(),
            Arc::clone(&progress),
        );
        let pods = spawn_reflector(
            Api::<Pod>::all(client.clone()),
            all().fields(&format!("spec.nodeName={node}")),
            Arc::clone(&progress),
        );
        let nodes = spawn_reflector(
            Api::<Node>::all(client.clone()),
            all(),
            Arc::clone(&progress),
        );
        let namespaces =
            spawn_reflector(Api::<Namespace>::all(client), all(), Arc::clone(&progress));
        Self {
            services,
            slices,
            pods,
            nodes,
            namespaces,
            progress,
            kinds: 5,
            seen: None,
        }
    }
}

impl Source for KubeSource {
    fn poll(&mut self) -> Option<(ClusterObjects, Vec<String>)> {
        if self.progress.ready.load(Ordering::SeqCst) < self.kinds {
            return None;
        }
        let changes = self.progress.changes.load(Ordering::SeqCst);
        if self.seen == Some(changes) {
            return None;
        }
        self.seen = Some(changes);
        let objects = ClusterObjects {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            slices: self.slices.state().iter().map(|s| (**s).clone()).collect(),
            pods: self.pods.state().iter().map(|s| (**s).clone()).collect(),
            nodes: self.nodes.state().iter().map(|s| (**s).clone()).collect(),
            namespaces: self
                .namespaces
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
        };
        let errors = if self.progress.failing.load(Ordering::SeqCst) {
            vec!["the Kubernetes API watch is failing; serving the last known state".to_owned()]
        } else {
            Vec::new()
        };
        Some((objects, errors))
    }
}
