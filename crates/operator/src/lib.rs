//! Cluster-wide operator: the meshless.dev CRDs, IPAM for LoadBalancer
//! Services and Nodes, behind a Lease-based leader election so that any
//! number of replicas is safe.
//!
//! | module | what | IO |
//! |---|---|---|
//! | [`cidr`] | prefix arithmetic for both families | none |
//! | [`crd`] | the CRD types, their rendering, installing them at start | kube ([`crd::install`] only) |
//! | [`lb_ipam`] | LoadBalancer address allocation from Services; pool validation | none |
//! | [`node_ipam`] | pod CIDR allocation from Nodes | none |
//! | [`election`] | the leader-election state machine | none |
//! | [`config`] | flags and their checks | none |
//! | [`lease`] | reads/writes the Lease, drives the election | kube |
//! | [`controller`] | the watch loops the leader runs | kube |
#![forbid(unsafe_code)]

pub mod cidr;
pub mod config;
pub mod controller;
pub mod crd;
pub mod election;
pub mod lb_ipam;
pub mod lease;
pub mod node_ipam;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::{Config, ConfigError, Controller};
use crate::election::Elector;

/// Name the operator reports Events under.
pub const CONTROLLER_NAME: &str = "meshless-operator";

/// Why the operator stopped before it could run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Crd(#[from] crd::CrdError),
}

/// Installs the CRDs (unless `--install-crds=false`), then runs the
/// election and, while leading, the configured controllers, until
/// `shutdown` turns true.
pub async fn run(
    config: Config,
    client: Client,
    identity: String,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    config.validate()?;
    // Before the election: a follower's CRDs must be current too, so that
    // an upgraded follower never serves an old schema after taking over,
    // and the leader's controllers can watch LoadBalancerIPPools at once.
    if config.install_crds {
        crd::install(&client, &crd::crds()).await?;
    } else {
        tracing::info!(
            "--install-crds=false: expecting the meshless.dev CRDs to be installed already"
        );
    }
    let node_ipam = node_ipam::NodeIpam::new(
        &config.cluster_cidrs,
        config.node_cidr_mask_size_ipv4,
        config.node_cidr_mask_size_ipv6,
    )
    .map_err(ConfigError::from)?;
    let mut controllers: Vec<(&'static str, controller::Start)> = Vec::new();
    if config.runs(Controller::LbIpam) {
        if config.lb_pools.is_empty() {
            tracing::info!(
                "no --lb-pool: LB-IPAM hands out addresses from LoadBalancerIPPool objects only"
            );
        }
        let (c, pools) = (client.clone(), config.lb_pools.clone());
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: Some(identity.clone()),
            },
        );
        controllers.push((
            "lb-ipam",
            Box::new(move |leader| {
                Box::pin(controller::lb_ipam::run(
                    c.clone(),
                    recorder.clone(),
                    pools.clone(),
                    leader,
                ))
            }),
        ));
    }
    if config.runs(Controller::NodeIpam) {
        let c = client.clone();
        controllers.push((
            "node-ipam",
            Box::new(move |leader| {
                Box::pin(controller::node_ipam::run(
                    c.clone(),
                    node_ipam.clone(),
                    leader,
                ))
            }),
        ));
    }
    tracing::info!(
        identity = %identity,
        lease = %format!("{}/{}", config.namespace, config.lease_name),
        lb_pools = ?config.lb_pools.iter().map(ToString::to_string).collect::<Vec<_>>(),
        cluster_cidrs = ?config.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "starting; waiting to be elected"
    );
    let (leader_tx, leader_rx) = watch::channel(false);
    let supervisor = tokio::spawn(controller::supervise(leader_rx, controllers));
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    lease::run(
        leases,
        config.lease_name.clone(),
        Elector::new(identity, config.timing()),
        leader_tx,
        shutdown,
    )
    .await;
    // The sender is gone: the supervisor aborts the controllers and ends.
    let _ended = supervisor.await;
    Ok(())
}
