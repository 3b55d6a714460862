//! The Meshless node agent.
//!
//! One agent runs per node, in the node's network namespace. It loads the
//! embedded eBPF datapath, pins its maps under `<bpffs-root>/<node>/` (so a
//! restart adopts them), attaches the socket hooks to the node's cgroup and
//! the TC programs to every pod device, and detaches them on shutdown.
#![forbid(unsafe_code)]

mod config;
mod datapath;
pub mod health;
pub mod reconcile;
pub mod source;
mod status;

pub use config::Config;
pub use datapath::{Datapath, DatapathError};
pub use status::{LbStatus, Status};

use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

/// Runs the agent until SIGTERM or SIGINT. The datapath stays attached
/// afterwards unless `--detach-on-exit` is set.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let source: Option<Box<dyn source::Source>> = if let Some(d) = &config.manifests {
        Some(Box::new(source::ManifestDir::new(d)))
    } else if config.kubeconfig.is_some() || config.in_cluster {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
            }
            None => kube::Config::incluster().context("reading the in-cluster service account")?,
        };
        let client =
            kube::Client::try_from(kube_config).context("building the Kubernetes client")?;
        Some(Box::new(source::KubeSource::start(client)))
    } else {
        None
    };
    run_with_source(config, source).await
}

/// Load balancing: the compiler input, the maps, and what was reconciled.
struct Lb {
    source: Box<dyn source::Source>,
    maps: meshless_maps::LbMaps,
    state: reconcile::LbState,
    status: LbStatus,
    node: meshless_lb::NodeContext,
    options: meshless_lb::CompileOptions,
}

impl Lb {
    fn tick(&mut self) {
        if let Some((objects, mut errors)) = self.source.poll() {
            let compiled = meshless_lb::compile(
                &self.node,
                &objects.services,
                &objects.slices,
                &self.options,
            );
            errors.extend(compiled.errors.iter().map(ToString::to_string));
            let report = self.state.apply(&mut self.maps, &compiled.services);
            errors.extend(report.errors.iter().cloned());
            self.status.generation += 1;
            self.status.errors = errors;
            self.status.last_services_written = report.services_written;
            self.status.last_services_removed = report.services_removed;
            self.status.map_full_total += report.map_full as u64;
            tracing::info!(
                frontends = self.state.frontends(),
                written = report.services_written,
                removed = report.services_removed,
                unchanged = report.services_unchanged,
                errors = self.status.errors.len(),
                "services reconciled"
            );
            for e in &self.status.errors {
                tracing::warn!(error = %e, "service input problem");
            }
        }
        self.state.flush_retired(&mut self.maps);
        let c = self.maps.capacity();
        self.status.capacity = status::LbCapacity {
            services: c.services,
            backend_slots: c.slots,
            maglev: c.maglev,
            backends: c.backends,
        };
        self.status.frontends = self.state.frontends();
        self.status.backends = self.state.backends();
    }
}

/// Like [`run`], with the source of cluster objects chosen by the caller
/// (tests pass [`source::InProcess`]).
pub async fn run_with_source(
    config: Config,
    source: Option<Box<dyn source::Source>>,
) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&config).context("loading the datapath")?;
    let mut lb = match source {
        Some(source) => {
            let maps = meshless_maps::LbMaps::open(&config.pin_dir())
                .context("opening the load-balancing maps")?;
            let state =
                reconcile::LbState::adopt(&maps).context("adopting pinned load-balancing state")?;
            tracing::info!(
                frontends = state.frontends(),
                backends = state.backends(),
                "adopted pinned services"
            );
            Some(Lb {
                source,
                maps,
                state,
                status: LbStatus::default(),
                node: meshless_lb::NodeContext {
                    node_name: config.node.clone(),
                    node_ips: config.node_ips.clone(),
                    zone: config.zone.clone(),
                },
                options: config.lb_options(),
            })
        }
        None => None,
    };
    // Services first, hooks second: the first connect() a new hook sees
    // already finds every service.
    if let Some(lb) = &mut lb {
        lb.tick();
    }
    datapath
        .attach_cgroup()
        .context("attaching the socket hooks")?;
    if let Some(dev) = &config.external_device {
        datapath
            .attach_external(dev)
            .context("attaching the north-south path")?;
    }
    let probes = health::new();
    if let Some(addr) = config.health_addr {
        let p = std::sync::Arc::clone(&probes);
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, p).await {
                tracing::error!(%addr, error = %e, "health endpoints failed");
            }
        });
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(config.rescan_interval_ms));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A device that fails to attach is reported and retried on the
                // next tick; it never stops the agent.
                datapath.sync_pod_devices();
                if let Some(lb) = &mut lb {
                    lb.tick();
                }
                let mut st = datapath.status();
                st.lb = lb.as_ref().map(|l| l.status.clone());
                if let Err(err) = status::write(&config, &st) {
                    tracing::warn!(error = %err, "writing the status file");
                }
                let ready = match &lb {
                    Some(l) if l.status.generation == 0 => Err("waiting for the first list of Services and EndpointSlices".to_owned()),
                    _ => Ok(()),
                };
                health::update(&probes, ready, serde_json::to_string(&st).unwrap_or_default());
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if config.detach_on_exit {
        tracing::info!(node = %config.node, "shutting down: detaching the datapath (--detach-on-exit)");
        let detached = datapath.detach_all();
        tracing::info!(node = %config.node, links = detached, "detached");
    } else {
        tracing::info!(
            node = %config.node,
            "shutting down; the datapath stays attached and pinned for the next agent"
        );
    }
    status::remove(&config);
    Ok(())
}
