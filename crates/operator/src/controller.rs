//! The controllers the leader runs. Each is a watch loop that rebuilds its
//! allocator from the full list the watcher delivers (on start and on every
//! re-list), so it never trusts memory from an earlier term of leadership.
//! They run only while the `leader` flag is true: the supervisor aborts
//! them the moment it turns false, and every write checks it first.

pub mod lb_ipam;
pub mod node_ipam;

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often a controller retries objects whose last write failed.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Why a controller write failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("leadership lost: not writing")]
    NotLeader,
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// True while this replica may write.
pub fn still_leader(leader: &watch::Receiver<bool>) -> Result<(), ControllerError> {
    if *leader.borrow() {
        Ok(())
    } else {
        Err(ControllerError::NotLeader)
    }
}

/// A controller to start on election.
pub type Start =
    Box<dyn Fn(watch::Receiver<bool>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Starts `controllers` whenever `leader` turns true and aborts them when it
/// turns false; returns when the sender is gone.
pub async fn supervise(mut leader: watch::Receiver<bool>, controllers: Vec<(&'static str, Start)>) {
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        let leading = *leader.borrow_and_update();
        if leading && running.is_empty() {
            for (name, start) in &controllers {
                tracing::info!(controller = name, "starting");
                running.spawn(start(leader.clone()));
            }
        } else if !leading && !running.is_empty() {
            running.abort_all();
            while running.join_next().await.is_some() {}
            tracing::info!("controllers stopped");
        }
        if leader.changed().await.is_err() {
            running.abort_all();
            while running.join_next().await.is_some() {}
            return;
        }
    }
}
