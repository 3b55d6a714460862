//! The Meshless node agent.
//!
//! One agent runs per node, in the node's network namespace. It loads the
//! embedded eBPF datapath, pins its maps under `<bpffs-root>/<node>/` (so a
//! restart adopts them), attaches the socket hooks to the node's cgroup and
//! the TC programs to every pod device, and keeps the datapath attached for
//! the next agent when it stops (`--detach-on-exit` removes it).
//!
//! | module | what | IO |
//! |---|---|---|
//! | [`source`] | cluster objects: Kubernetes API, manifests, in-process | kube, files |
//! | [`node`] | this node's addresses, pod CIDRs, zone (flags, else Node) | none |
//! | [`endpoints`] | CNI endpoint records joined with this node's Pods | files |
//! | [`reconcile`] | desired vs pinned service entries | maps |
//! | `datapath` | load, pin, attach, detach | bpf |
#![forbid(unsafe_code)]

mod config;
mod datapath;
pub mod endpoints;
pub mod health;
pub mod node;
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
        Some(Box::new(source::KubeSource::start(client, &config.node)))
    } else {
        None
    };
    run_with_source(config, source).await
}

/// Load balancing: the maps and what was reconciled into them.
struct Lb {
    maps: meshless_maps::LbMaps,
    state: reconcile::LbState,
    status: LbStatus,
    options: meshless_lb::CompileOptions,
    /// What the last compile read: a new compile only when this changes.
    compiled: Option<(u64, meshless_lb::NodeContext)>,
    /// Problems the last compile and apply found, each naming its object.
    input_errors: Vec<String>,
}

impl Lb {
    /// Compiles and applies when the Services, EndpointSlices or this
    /// node's facts changed since the last compile: a re-list after an API
    /// server restart, a pod starting or a node heartbeat costs nothing.
    fn reconcile(
        &mut self,
        objects: &source::ClusterObjects,
        source_errors: &[String],
        node: meshless_lb::NodeContext,
    ) {
        let input = (objects.lb_fingerprint(), node);
        if self.compiled.as_ref() != Some(&input) {
            let compiled =
                meshless_lb::compile(&input.1, &objects.services, &objects.slices, &self.options);
            let mut errors: Vec<String> = compiled.errors.iter().map(ToString::to_string).collect();
            let report = self.state.apply(&mut self.maps, &compiled.services);
            errors.extend(report.errors.iter().cloned());
            self.status.generation += 1;
            self.status.last_services_written = report.services_written;
            self.status.last_services_removed = report.services_removed;
            self.status.map_full_total += report.map_full as u64;
            tracing::info!(
                frontends = self.state.frontends(),
                written = report.services_written,
                removed = report.services_removed,
                unchanged = report.services_unchanged,
                errors = errors.len(),
                "services reconciled"
            );
            for e in &errors {
                tracing::warn!(error = %e, "service input problem");
            }
            self.input_errors = errors;
            self.compiled = Some(input);
        }
        self.status.errors = source_errors
            .iter()
            .chain(&self.input_errors)
            .cloned()
            .collect();
    }

    fn refresh_status(&mut self) {
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

/// Everything the agent drives, and what it last read.
struct Agent {
    config: Config,
    datapath: Datapath,
    source: Option<Box<dyn source::Source>>,
    lb: Option<Lb>,
    objects: source::ClusterObjects,
    source_errors: Vec<String>,
    /// The source delivered its first full set.
    listed: bool,
    /// How many changed sets the source delivered.
    source_updates: u64,
    facts: node::NodeFacts,
    records: endpoints::RecordDir,
    endpoints: Vec<endpoints::LocalEndpoint>,
    /// Host devices the CNI records name.
    registered: std::collections::BTreeSet<String>,
    /// Why the north-south path is not attached yet, once it was tried.
    external_error: Option<String>,
}

impl Agent {
    /// Reads the source; when it delivered a change, brings the node facts
    /// and load balancing up to date. Nothing is recompiled between changes.
    fn read_source(&mut self) -> bool {
        let Some((objects, errors)) = self.source.as_mut().and_then(|s| s.poll()) else {
            return false;
        };
        self.objects = objects;
        self.source_errors = errors;
        self.listed = true;
        self.source_updates += 1;
        let facts = node::resolve(&self.config, &self.objects.nodes);
        if facts != self.facts {
            tracing::info!(
                ips = ?facts.ips, ips_from = ?facts.ips_from,
                pod_cidrs = ?facts.pod_cidrs, pod_cidrs_from = ?facts.pod_cidrs_from,
                zone = ?facts.zone, "node facts"
            );
            for e in &facts.errors {
                tracing::warn!(error = %e, "node object problem");
            }
            self.facts = facts;
            if let Err(err) = self.datapath.write_node_config(&self.facts) {
                tracing::warn!(error = %err, "updating the north-south node facts");
            }
        }
        if let Some(lb) = &mut self.lb {
            let node = meshless_lb::NodeContext {
                node_name: self.config.node.clone(),
                node_ips: self.facts.ips.clone(),
                zone: self.facts.zone.clone(),
            };
            lb.reconcile(&self.objects, &self.source_errors, node);
        }
        true
    }

    /// One period of the main loop: the source, the north-south path, the
    /// CNI records and the pod devices.
    fn tick(&mut self) {
        let source_changed = self.read_source();
        if let Err(err) = self.attach_external_when_known() {
            let err = err.to_string();
            if self.external_error.as_ref() != Some(&err) {
                tracing::warn!(error = %err, "attaching the north-south path; will retry");
            }
            self.external_error = Some(err);
        }
        if let Some(lb) = &mut self.lb {
            lb.refresh_status();
        }
        if self.records.scan() || source_changed {
            let endpoints = endpoints::join(
                self.records.records(),
                &self.objects.pods,
                &self.config.node,
            );
            if endpoints != self.endpoints {
                tracing::debug!(endpoints = endpoints.len(), "endpoints changed");
                self.endpoints = endpoints;
            }
            self.registered = self
                .records
                .records()
                .iter()
                .map(|r| r.host_device.clone())
                .collect();
        }
        // A device that fails to attach is reported and retried on the
        // next tick; it never stops the agent.
        self.datapath.sync_pod_devices(&self.registered);
    }

    /// The north-south path needs an IPv4 node address (its SNAT source):
    /// from --node-ip at start, else from the Node object when it arrives.
    /// Nothing to do is `Ok`.
    fn attach_external_when_known(&mut self) -> Result<(), DatapathError> {
        let Some(dev) = self.config.external_device.clone() else {
            return Ok(());
        };
        if self.datapath.external_attached()
            || !self.facts.ips.iter().any(std::net::IpAddr::is_ipv4)
        {
            return Ok(());
        }
        self.datapath.attach_external(&dev, &self.facts)?;
        self.external_error = None;
        Ok(())
    }

    fn status(&self) -> Status {
        let mut st = self.datapath.status();
        st.lb = self.lb.as_ref().map(|l| l.status.clone());
        st.node_facts = Some(self.facts.clone());
        st.endpoints = self.endpoints.clone();
        st.cluster = self.source.as_ref().map(|_| status::ClusterCounts {
            services: self.objects.services.len(),
            endpoint_slices: self.objects.slices.len(),
            pods: self.objects.pods.len(),
            nodes: self.objects.nodes.len(),
            namespaces: self.objects.namespaces.len(),
        });
        st.source_updates = self.source_updates;
        st.errors = self
            .facts
            .errors
            .iter()
            .chain(self.records.errors())
            .cloned()
            .collect();
        st
    }

    fn readiness(&self) -> Result<(), String> {
        if self.source.is_some() && !self.listed {
            return Err("waiting for the first list of cluster objects".to_owned());
        }
        if self.config.external_device.is_some() && !self.datapath.external_attached() {
            return Err(match &self.external_error {
                Some(err) => format!("attaching the north-south path failed: {err}"),
                None => "waiting for an IPv4 node address (--node-ip or the Node object's status.addresses) to attach the north-south path".to_owned(),
            });
        }
        Ok(())
    }
}

/// Like [`run`], with the source of cluster objects chosen by the caller
/// (tests pass [`source::InProcess`]).
pub async fn run_with_source(
    config: Config,
    source: Option<Box<dyn source::Source>>,
) -> anyhow::Result<()> {
    let datapath = Datapath::load(&config).context("loading the datapath")?;
    let lb = match &source {
        Some(_) => {
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
                maps,
                state,
                status: LbStatus::default(),
                options: config.lb_options(),
                compiled: None,
                input_errors: Vec::new(),
            })
        }
        None => None,
    };
    let facts = node::resolve(&config, &[]);
    let mut agent = Agent {
        records: endpoints::RecordDir::new(&config.endpoints_dir),
        config,
        datapath,
        source,
        lb,
        objects: source::ClusterObjects::default(),
        source_errors: Vec::new(),
        listed: false,
        source_updates: 0,
        facts,
        endpoints: Vec::new(),
        registered: std::collections::BTreeSet::new(),
        external_error: None,
    };
    // Services first, hooks second: the first connect() a new hook sees
    // already finds every service.
    agent.read_source();
    agent
        .datapath
        .attach_cgroup()
        .context("attaching the socket hooks")?;
    // With an address known now (--node-ip) a wrong --external-device is a
    // startup error; otherwise the ticks attach it once the Node arrives.
    agent
        .attach_external_when_known()
        .context("attaching the north-south path")?;
    let probes = health::new();
    if let Some(addr) = agent.config.health_addr {
        let p = std::sync::Arc::clone(&probes);
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, p).await {
                tracing::error!(%addr, error = %e, "health endpoints failed");
            }
        });
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(agent.config.rescan_interval_ms));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                agent.tick();
                let st = agent.status();
                if let Err(err) = status::write(&agent.config, &st) {
                    tracing::warn!(error = %err, "writing the status file");
                }
                health::update(&probes, agent.readiness(), serde_json::to_string(&st).unwrap_or_default());
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let config = &agent.config;
    if config.detach_on_exit {
        tracing::info!(node = %config.node, "shutting down: detaching the datapath (--detach-on-exit)");
        let detached = agent.datapath.detach_all();
        tracing::info!(node = %config.node, links = detached, "detached");
    } else {
        tracing::info!(
            node = %config.node,
            "shutting down; the datapath stays attached and pinned for the next agent"
        );
    }
    status::remove(config);
    Ok(())
}
