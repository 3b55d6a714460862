//! meshless-operator: parse the flags, build the client, run.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use meshless_operator::config::{Command, Config};

async fn client(config: &Config) -> anyhow::Result<kube::Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig, no in-cluster service account and no $KUBECONFIG")?,
    };
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHLESS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    if config.command == Some(Command::PrintCrds) {
        // The CLI's output: the YAML itself, for `cargo xtask codegen`.
        let mut out = std::io::stdout().lock();
        out.write_all(meshless_operator::crd::render_crds().as_bytes())
            .and_then(|()| out.flush())
            .context("writing the CRDs to stdout")?;
        return Ok(());
    }
    config.validate()?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let identity = config.identity(
        std::env::var("POD_NAME").ok(),
        &hostname,
        std::process::id(),
    );
    let client = client(&config).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(err) => {
                    tracing::error!(error = %err, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    meshless_operator::run(config, client, identity, stop_rx).await?;
    Ok(())
}
