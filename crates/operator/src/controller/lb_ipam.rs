//! LB-IPAM controller: Services and LoadBalancerIPPools in,
//! `status.loadBalancer.ingress` and the pools' `Ready` conditions out.
//!
//! Nothing is handed out until both the Services and the pools have been
//! listed once: building the allocator from the flags alone would treat
//! addresses from pool objects as foreign and renumber their Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource as _};
use serde_json::json;
use tokio::sync::watch;

use super::{ControllerError, RETRY_EVERY, still_leader};
use crate::CONTROLLER_NAME;
use crate::cidr::Cidr;
use crate::crd::LoadBalancerIPPool;
use crate::lb_ipam::pools::{PoolView, condition_current, ready_condition, validate_pools};
use crate::lb_ipam::{LbAllocator, LbService, ServiceKey};

struct State {
    client: Client,
    recorder: Recorder,
    /// `--lb-pool`: always served, and they win overlaps.
    flag_pools: Vec<Cidr>,
    /// The blocks the allocator hands out; None until the pools are listed.
    usable: Option<Vec<Cidr>>,
    alloc: Option<LbAllocator>,
    /// The latest object of every Service, to retry failed writes.
    services: BTreeMap<ServiceKey, Service>,
    services_listed: bool,
    /// Every LoadBalancerIPPool, as watched (untyped: an object that does
    /// not match the types must not stop the watch).
    pools: BTreeMap<String, DynamicObject>,
    pools_listed: bool,
    pool_api: Api<DynamicObject>,
    /// A pool status write failed: try again on the next tick.
    pool_retry: bool,
    /// Errors already reported per Service (an Event per new error only).
    reported: BTreeMap<ServiceKey, BTreeSet<String>>,
    retry: BTreeSet<ServiceKey>,
    leader: watch::Receiver<bool>,
}

impl State {
    /// Validates the pool objects, writes the `Ready` conditions that
    /// changed, and moves the allocator to the resulting blocks.
    async fn sync_pools(&mut self) {
        if !self.pools_listed {
            return;
        }
        let views: Vec<PoolView> = self.pools.values().map(PoolView::from_object).collect();
        let set = validate_pools(&self.flag_pools, &views);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for view in &views {
            let Some(verdict) = set.verdicts.get(&view.name) else {
                continue;
            };
            let cond = ready_condition(verdict, view.generation, view.ready.as_ref(), now.clone());
            if condition_current(view.ready.as_ref(), &cond) {
                continue;
            }
            if verdict.ready() {
                tracing::info!(pool = %view.name, message = %verdict.message, "LoadBalancerIPPool accepted");
            } else {
                tracing::warn!(pool = %view.name, reason = %verdict.reason, message = %verdict.message, "LoadBalancerIPPool not served");
            }
            match self.write_pool_status(&view.name, &cond).await {
                Ok(obj) => {
                    self.pools.insert(view.name.clone(), obj);
                }
                Err(err) => {
                    tracing::warn!(pool = %view.name, error = %err, "writing the LoadBalancerIPPool status failed; retrying");
                    self.pool_retry = true;
                }
            }
        }
        self.set_usable(set.usable).await;
    }

    async fn write_pool_status(
        &self,
        name: &str,
        cond: &Condition,
    ) -> Result<DynamicObject, ControllerError> {
        still_leader(&self.leader)?;
        // Server-side apply: the conditions list is a map keyed by type,
        // so a condition another writer adds is kept.
        let patch = json!({
            "apiVersion": "meshless.dev/v1alpha1",
            "kind": "LoadBalancerIPPool",
            "status": {"conditions": [cond]},
        });
        self.pool_api
            .patch_status(
                name,
                &PatchParams::apply(CONTROLLER_NAME).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| ControllerError::Kube {
                what: format!("patching status of LoadBalancerIPPool {name}"),
                source,
            })
    }

    /// Moves the allocator to a new set of blocks. The first time (and
    /// whenever the Services are re-listed) it is built from the Service
    /// statuses; later changes keep every address still inside a block.
    async fn set_usable(&mut self, usable: Vec<Cidr>) {
        if self.usable.as_ref() == Some(&usable) {
            return;
        }
        tracing::info!(pools = ?usable.iter().map(ToString::to_string).collect::<Vec<_>>(), "LB pools changed");
        self.usable = Some(usable.clone());
        match &self.alloc {
            Some(old) => {
                let views: Vec<LbService> = self
                    .services
                    .values()
                    .map(LbService::from_service)
                    .collect();
                self.alloc = Some(old.repool(usable, &views));
                self.reconcile_all().await;
            }
            None => self.rebuild_from_statuses().await,
        }
    }

    /// Builds the allocator from the Service statuses, once both lists are in.
    async fn rebuild_from_statuses(&mut self) {
        let (Some(usable), true) = (self.usable.clone(), self.services_listed) else {
            return;
        };
        let views: Vec<LbService> = self
            .services
            .values()
            .map(LbService::from_service)
            .collect();
        let alloc = LbAllocator::rebuild(usable, &views);
        tracing::info!(
            services = views.len(),
            addresses = alloc.allocated(),
            "LB-IPAM rebuilt from Service statuses"
        );
        self.alloc = Some(alloc);
        self.reconcile_all().await;
    }

    async fn reconcile_all(&mut self) {
        let all: Vec<Service> = self.services.values().cloned().collect();
        for s in &all {
            self.reconcile(s).await;
        }
    }

    /// The pool watch failed. A 404 means the CRD is not installed, so no
    /// pool object can exist: serve the flags alone rather than nothing.
    /// Any other failure (403 above all) keeps LB-IPAM waiting: handing
    /// out addresses without knowing the pools could renumber Services.
    async fn pool_watch_failed(&mut self, err: &watcher::Error) {
        let status = match err {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
            watcher::Error::WatchError(s) => Some(s.code),
            _ => None,
        };
        match status {
            Some(404) => {
                if !self.pools_listed || !self.pools.is_empty() {
                    tracing::warn!(
                        "the LoadBalancerIPPool CRD is not installed: serving --lb-pool only; install charts/meshless/crds/ or run the operator with --install-crds"
                    );
                    self.pools.clear();
                    self.pools_listed = true;
                    self.sync_pools().await;
                }
            }
            Some(403) => tracing::error!(
                error = %err,
                "listing LoadBalancerIPPools is forbidden: grant list and watch on loadbalancerippools.meshless.dev (and patch on loadbalancerippools/status); LB-IPAM waits until it can see the pools"
            ),
            _ => {
                tracing::warn!(error = %err, "watching LoadBalancerIPPools failed; retrying with backoff")
            }
        }
    }

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
    flag_pools: Vec<Cidr>,
    leader: watch::Receiver<bool>,
) {
    let api: Api<Service> = Api::all(client.clone());
    let pool_api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::erase::<LoadBalancerIPPool>(&()),
    );
    let mut state = State {
        client,
        recorder,
        flag_pools,
        usable: None,
        alloc: None,
        services: BTreeMap::new(),
        services_listed: false,
        pools: BTreeMap::new(),
        pools_listed: false,
        pool_api: pool_api.clone(),
        pool_retry: false,
        reported: BTreeMap::new(),
        retry: BTreeSet::new(),
        leader,
    };
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let pool_stream = watcher(pool_api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(pool_stream);
    let mut listing: Vec<Service> = Vec::new();
    let mut pool_listing: Vec<DynamicObject> = Vec::new();
    let mut tick = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(s)) => listing.push(s),
                    Ok(watcher::Event::InitDone) => {
                        state.services = listing.drain(..).map(|s| (LbService::from_service(&s).key, s)).collect();
                        state.services_listed = true;
                        state.rebuild_from_statuses().await;
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
            event = pool_stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => pool_listing.clear(),
                    Ok(watcher::Event::InitApply(p)) => pool_listing.push(p),
                    Ok(watcher::Event::InitDone) => {
                        state.pools = pool_listing
                            .drain(..)
                            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
                            .collect();
                        state.pools_listed = true;
                        state.sync_pools().await;
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        state.pools.insert(p.metadata.name.clone().unwrap_or_default(), p);
                        state.sync_pools().await;
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        state.pools.remove(p.metadata.name.as_deref().unwrap_or_default());
                        state.sync_pools().await;
                    }
                    Err(err) => state.pool_watch_failed(&err).await,
                }
            }
            _ = tick.tick() => {
                if std::mem::take(&mut state.pool_retry) {
                    state.sync_pools().await;
                }
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
