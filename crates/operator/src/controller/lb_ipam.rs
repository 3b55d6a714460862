//! LB-IPAM controller: Services in, `status.loadBalancer.ingress` out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource as _};
use serde_json::json;
use tokio::sync::watch;

use super::{ControllerError, RETRY_EVERY, still_leader};
use crate::cidr::Cidr;
use crate::lb_ipam::{LbAllocator, LbService, ServiceKey};

struct State {
    client: Client,
    recorder: Recorder,
    pools: Vec<Cidr>,
    alloc: Option<LbAllocator>,
    /// The latest object of every Service, to retry failed writes.
    services: BTreeMap<ServiceKey, Service>,
    /// Errors already reported per Service (an Event per new error only).
    reported: BTreeMap<ServiceKey, BTreeSet<String>>,
    retry: BTreeSet<ServiceKey>,
    leader: watch::Receiver<bool>,
}

impl State {
    async fn reconcile(&mut self, svc: &Service) {
        let Some(alloc) = self.alloc.as_mut() else {
            return;
        };
        let view = LbService::from_service(svc);
        let before: Vec<IpAddr> = alloc.held(&view.key).to_vec();
        let assignment = alloc.ensure(&view);
        let wanted = if view.wants_lb {
            Some(assignment.ips.clone())
        } else if !view.foreign_class && view.ingress.iter().any(|ip| alloc.in_pool(*ip)) {
            // No longer a LoadBalancer: take our addresses out of its status.
            Some(Vec::new())
        } else {
            None
        };
        if before != assignment.ips {
            if !before.is_empty() {
                let released: Vec<IpAddr> = before
                    .iter()
                    .copied()
                    .filter(|ip| !assignment.ips.contains(ip))
                    .collect();
                if !released.is_empty() {
                    tracing::info!(service = %view.key, ?released, "released LoadBalancer addresses");
                }
            }
            if !assignment.ips.is_empty() {
                tracing::info!(service = %view.key, ips = ?assignment.ips, "allocated LoadBalancer addresses");
            }
        }
        let messages: BTreeSet<String> =
            assignment.errors.iter().map(ToString::to_string).collect();
        let old = self.reported.get(&view.key).cloned().unwrap_or_default();
        for e in messages.difference(&old) {
            tracing::warn!(service = %view.key, error = %e, "LoadBalancer address not allocated");
            let ev = KubeEvent {
                type_: EventType::Warning,
                reason: "AllocationFailed".into(),
                note: Some(e.clone()),
                action: "AllocateLoadBalancerIP".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&ev, &svc.object_ref(&())).await {
                tracing::debug!(error = %err, "could not record an Event");
            }
        }
        if messages.is_empty() {
            self.reported.remove(&view.key);
        } else {
            self.reported.insert(view.key.clone(), messages);
        }
        let Some(wanted) = wanted else {
            return;
        };
        if wanted == view.ingress {
            self.retry.remove(&view.key);
            return;
        }
        match self.write_status(&view.key, &wanted).await {
            Ok(()) => {
                self.retry.remove(&view.key);
            }
            Err(err) => {
                tracing::warn!(service = %view.key, error = %err, "writing the Service status failed; retrying");
                self.retry.insert(view.key.clone());
            }
        }
    }

    async fn write_status(&self, key: &ServiceKey, ips: &[IpAddr]) -> Result<(), ControllerError> {
        still_leader(&self.leader)?;
        let api: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        let ingress = if ips.is_empty() {
            serde_json::Value::Null
        } else {
            json!(
                ips.iter()
                    .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
                    .collect::<Vec<_>>()
            )
        };
        let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
        api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|source| ControllerError::Kube {
                what: format!("patching status of service {key}"),
                source,
            })
    }
}

/// Runs until aborted.
pub async fn run(
    client: Client,
    recorder: Recorder,
    pools: Vec<Cidr>,
    leader: watch::Receiver<bool>,
) {
    let api: Api<Service> = Api::all(client.clone());
    let mut state = State {
        client,
        recorder,
        pools,
        alloc: None,
        services: BTreeMap::new(),
        reported: BTreeMap::new(),
        retry: BTreeSet::new(),
        leader,
    };
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Vec<Service> = Vec::new();
    let mut tick = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(s)) => listing.push(s),
                    Ok(watcher::Event::InitDone) => {
                        let views: Vec<LbService> = listing.iter().map(LbService::from_service).collect();
                        let alloc = LbAllocator::rebuild(state.pools.clone(), &views);
                        tracing::info!(services = views.len(), addresses = alloc.allocated(), "LB-IPAM rebuilt from Service statuses");
                        state.alloc = Some(alloc);
                        state.services = listing.drain(..).map(|s| (LbService::from_service(&s).key, s)).collect();
                        let all: Vec<Service> = state.services.values().cloned().collect();
                        for s in &all {
                            state.reconcile(s).await;
                        }
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        state.services.insert(LbService::from_service(&s).key, s.clone());
                        state.reconcile(&s).await;
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        let key = LbService::from_service(&s).key;
                        state.services.remove(&key);
                        state.retry.remove(&key);
                        state.reported.remove(&key);
                        if let Some(alloc) = state.alloc.as_mut() {
                            let freed = alloc.release(&key);
                            if !freed.is_empty() {
                                tracing::info!(service = %key, released = ?freed, "service deleted: released LoadBalancer addresses");
                            }
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "watching Services failed; retrying with backoff"),
                }
            }
            _ = tick.tick() => {
                let keys: Vec<ServiceKey> = state.retry.iter().cloned().collect();
                for k in keys {
                    if let Some(s) = state.services.get(&k).cloned() {
                        state.reconcile(&s).await;
                    } else {
                        state.retry.remove(&k);
                    }
                }
            }
        }
    }
}
