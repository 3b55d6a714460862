//! The Meshless node agent.
//!
//! One agent runs per node, in the node's network namespace. It loads the
//! embedded eBPF datapath, pins its maps under `<bpffs-root>/<node>/` (so a
//! restart adopts them), attaches the socket hooks to the node's cgroup and
//! the TC programs to every pod device, and detaches them on shutdown.
#![forbid(unsafe_code)]

mod config;
mod datapath;
mod status;

pub use config::Config;
pub use datapath::{Datapath, DatapathError};
pub use status::Status;

use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

/// Runs the agent until SIGTERM or SIGINT, then detaches everything it attached.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&config).context("loading the datapath")?;
    datapath
        .attach_cgroup()
        .context("attaching the socket hooks")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(config.rescan_interval_ms));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A device that fails to attach is reported and retried on the
                // next tick; it never stops the agent.
                datapath.sync_pod_devices();
                if let Err(err) = status::write(&config, &datapath.status()) {
                    tracing::warn!(error = %err, "writing the status file");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(node = %config.node, "shutting down: detaching the datapath");
    let detached = datapath.detach_all();
    status::remove(&config);
    tracing::info!(node = %config.node, programs = detached, "detached");
    Ok(())
}
