//! The election's IO: reads and writes the Lease with kube-rs, drives the
//! pure [`Elector`], and publishes "may act as leader" on a watch channel.
//! Every request is bounded by the leader's deadline, so a hung API server
//! cannot keep a replica acting past the moment another may take over.

use std::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::election::{Elector, LeaseRecord, Step, Transition};

fn record(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.as_ref();
    LeaseRecord {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        lease_duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(std::time::Duration::from_secs),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Runs the election until `shutdown` turns true; then releases the lease
/// if held, so a successor need not wait for it to expire.
pub async fn run(
    api: Api<Lease>,
    name: String,
    mut elector: Elector,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let identity = elector.identity().to_owned();
    let timing = elector.timing();
    let lease_secs = i32::try_from(timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mut last_holder: Option<String> = None;
    let announce = |t: Option<Transition>, leader: &watch::Sender<bool>| match t {
        Some(Transition::Elected) => {
            tracing::info!(identity = %identity, lease = %name, "became leader: starting controllers");
            leader.send_replace(true);
        }
        Some(Transition::Lost(reason)) => {
            // The flag goes first: controllers stop before anything is logged.
            leader.send_replace(false);
            tracing::warn!(identity = %identity, lease = %name, %reason, "lost leadership: controllers stopped");
        }
        None => {}
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        announce(elector.tick(Instant::now()), &leader);
        // While leading, no request may outlive the deadline; otherwise a
        // lease duration is a generous bound.
        let bound = elector.leading_until().map_or(timing.lease_duration, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let read = tokio::time::timeout(bound, api.get_opt(&name)).await;
        match read {
            Err(_) => tracing::warn!(lease = %name, "reading the lease timed out"),
            Ok(Err(err)) => {
                tracing::warn!(lease = %name, error = %err, "reading the lease failed; is the namespace there and may we get leases?");
            }
            Ok(Ok(current)) => {
                let now = Instant::now();
                let (step, lost) = elector.decide(current.as_ref().map(record).as_ref(), now);
                announce(lost, &leader);
                let sent = Instant::now();
                let write = match step {
                    Step::Follow { holder } => {
                        if last_holder.as_deref() != Some(&holder) {
                            tracing::info!(identity = %identity, leader = %holder, "following the current leader");
                            last_holder = Some(holder);
                        }
                        None
                    }
                    Step::Create => {
                        let lease = Lease {
                            metadata: ObjectMeta {
                                name: Some(name.clone()),
                                ..ObjectMeta::default()
                            },
                            spec: Some(LeaseSpec {
                                holder_identity: Some(identity.clone()),
                                lease_duration_seconds: Some(lease_secs),
                                acquire_time: Some(now_micro()),
                                renew_time: Some(now_micro()),
                                lease_transitions: Some(0),
                                ..LeaseSpec::default()
                            }),
                        };
                        Some(
                            tokio::time::timeout(bound, api.create(&PostParams::default(), &lease))
                                .await,
                        )
                    }
                    Step::Write {
                        transitions,
                        acquire,
                    } => {
                        let mut lease = current.unwrap_or_default();
                        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                        spec.holder_identity = Some(identity.clone());
                        spec.lease_duration_seconds = Some(lease_secs);
                        spec.renew_time = Some(now_micro());
                        spec.lease_transitions = Some(transitions);
                        if acquire {
                            spec.acquire_time = Some(now_micro());
                        }
                        // `replace` sends the resourceVersion we read: if
                        // anyone wrote the Lease since, the API server
                        // answers 409 and nobody wins twice.
                        Some(
                            tokio::time::timeout(
                                bound,
                                api.replace(&name, &PostParams::default(), &lease),
                            )
                            .await,
                        )
                    }
                };
                match write {
                    None => {}
                    Some(Ok(Ok(written))) => {
                        last_holder = Some(identity.clone());
                        announce(
                            elector.written(sent, record(&written), Instant::now()),
                            &leader,
                        );
                    }
                    Some(Ok(Err(kube::Error::Api(status))))
                        if status.is_conflict() || status.is_already_exists() =>
                    {
                        tracing::debug!(lease = %name, "another replica wrote the lease first");
                        announce(elector.conflicted(), &leader);
                    }
                    Some(Ok(Err(err))) => {
                        tracing::warn!(lease = %name, error = %err, "writing the lease failed; retrying");
                    }
                    Some(Err(_)) => tracing::warn!(lease = %name, "writing the lease timed out"),
                }
            }
        }
        announce(elector.tick(Instant::now()), &leader);
        let pause = elector.next_round(Instant::now());
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
    if elector.is_leader(Instant::now()) {
        announce(elector.step_down("shutting down"), &leader);
        release(&api, &name, &identity).await;
    }
}

/// Gives the lease up (empty holder) so another replica takes over at once.
async fn release(api: &Api<Lease>, name: &str, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!(lease = %name, "released the lease"),
        Err(err) => {
            tracing::warn!(lease = %name, error = %err, "could not release the lease; the next leader waits for it to expire")
        }
    }
}
