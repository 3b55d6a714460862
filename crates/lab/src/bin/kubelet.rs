//! meshless-lab-kubelet: a minimal kubelet for the lab. Test bed, not
//! product: it registers one lab node with a real kube-apiserver and runs the
//! pods the scheduler binds to it as lab pods (a network namespace wired by
//! the real `meshless-cni`, a cgroup under the node's, processes from a local
//! image map). See docs/book/src/reference/lab-kubelet.md.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

#[path = "../kubelet/context.rs"]
mod context;
#[path = "../kubelet/image.rs"]
mod image;
#[path = "../kubelet/node.rs"]
mod node;
#[path = "../kubelet/pods.rs"]
mod pods;
#[path = "../kubelet/probe.rs"]
mod probe;
#[path = "../kubelet/record.rs"]
mod record;
#[path = "../kubelet/runtime.rs"]
mod runtime;
#[path = "../kubelet/status.rs"]
mod status;
#[path = "../kubelet/worker.rs"]
mod worker;

#[derive(Parser, Debug)]
#[command(
    name = "meshless-lab-kubelet",
    about = "Minimal kubelet for Meshless lab nodes (test bed, not product)"
)]
struct Flags {
    /// Node name to register; the lab names node i `<lab>-n<i>`.
    #[arg(long)]
    node: String,
    /// Kubeconfig for the API server (the lab's admin kubeconfig).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The lab this node belongs to (names netns and cgroups).
    #[arg(long)]
    lab: String,
    /// Index of this node in the lab, from 1 (picks addresses and pod CIDRs).
    #[arg(long)]
    node_index: usize,
    /// The `meshless-cni` plugin binary.
    #[arg(long)]
    cni_bin: PathBuf,
    /// The `meshless-labtool` binary the image map runs.
    #[arg(long)]
    labtool: PathBuf,
    /// Pod records, CNI state, endpoint records and container logs.
    #[arg(long)]
    state_dir: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let flags = Flags::parse();
    meshless_lab::plan::validate_lab_name(&flags.lab)?;
    anyhow::ensure!(
        (1..=meshless_lab::plan::MAX_NODES).contains(&flags.node_index),
        "--node-index {} is out of range 1..={}",
        flags.node_index,
        meshless_lab::plan::MAX_NODES
    );
    let kc = kube::config::Kubeconfig::read_from(&flags.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", flags.kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("using kubeconfig {}", flags.kubeconfig.display()))?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let ctx = Arc::new(context::Ctx::new(
        client,
        flags.node,
        flags.lab,
        flags.node_index,
        flags.cni_bin,
        flags.labtool,
        flags.state_dir,
    )?);
    node::register(&ctx).await?;
    tokio::spawn(node::heartbeat(ctx.clone()));
    pods::run(ctx).await
}
