//! The operator's configuration: every flag, its environment variable and
//! its default, declared once. Parsing is testable without the environment
//! (`Config::try_parse_from`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::cidr::Cidr;
use crate::election::Timing;

/// Why the configuration cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}")]
    Timing(String),
    #[error("--lb-pool {a} and {b} overlap; give each address to one pool")]
    OverlappingPools { a: Cidr, b: Cidr },
    #[error(transparent)]
    NodeIpam(#[from] crate::node_ipam::NodeIpamError),
}

/// A controller this operator can run while it leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Controller {
    /// LoadBalancer addresses for Services (from --lb-pool and LoadBalancerIPPools).
    LbIpam,
    /// Pod CIDRs for Nodes without one (from --cluster-cidr).
    NodeIpam,
}

/// Parses `15s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 15s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Commands besides running the operator (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Print the operator's CRDs as multi-document YAML and exit (no
    /// cluster needed). `cargo xtask codegen` writes them into
    /// charts/meshless/crds/.
    PrintCrds,
}

/// meshless-operator: cluster-wide IPAM behind a leader election.
#[derive(Clone, Debug, Parser)]
#[command(name = "meshless-operator", version)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Install or upgrade the meshless.dev CRDs at start (server-side
    /// apply, then wait until Established), before the election. Turn off
    /// when the CRDs are managed elsewhere (e.g. Helm's crds/) and the
    /// operator has no RBAC for customresourcedefinitions.
    #[arg(
        long,
        env = "MESHLESS_INSTALL_CRDS",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub install_crds: bool,
    /// Talk to the API server with this kubeconfig. Without it: the
    /// in-cluster service account, then $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "MESHLESS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace of the leader-election Lease (the operator's own namespace;
    /// it must exist).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshless-system")]
    pub namespace: String,

    /// Name of the leader-election Lease: replicas that share it elect one
    /// leader among themselves.
    #[arg(long, env = "MESHLESS_LEASE_NAME", default_value = "meshless-operator")]
    pub lease_name: String,

    /// This replica's identity in the Lease. Must differ between replicas.
    /// Default: $POD_NAME, else `<hostname>_<pid>`.
    #[arg(long, env = "MESHLESS_ID")]
    pub id: Option<String>,

    /// How long a lease lasts without renewal: the longest a cluster goes
    /// without a leader after one dies (whole seconds).
    #[arg(long, env = "MESHLESS_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How often the leader renews the lease.
    #[arg(long, env = "MESHLESS_RENEW_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub renew_period: Duration,

    /// How often a follower checks the lease; also the margin before expiry
    /// at which a leader that could not renew stops acting.
    #[arg(long, env = "MESHLESS_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,

    /// LoadBalancer address pools (repeat or comma-separate), at most
    /// one address per family per Service; served next to every Ready
    /// LoadBalancerIPPool object, and they win any overlap with one.
    #[arg(long = "lb-pool", env = "MESHLESS_LB_POOLS", value_delimiter = ',')]
    pub lb_pools: Vec<Cidr>,

    /// Cluster pod CIDRs, at most one per family, carved into one pod CIDR
    /// per family for each Node without one.
    #[arg(
        long = "cluster-cidr",
        env = "MESHLESS_CLUSTER_CIDRS",
        value_delimiter = ',',
        default_value = "198.18.16.0/20,fd00:b::/48"
    )]
    pub cluster_cidrs: Vec<Cidr>,

    /// Size of each Node's IPv4 pod CIDR.
    #[arg(long, env = "MESHLESS_NODE_CIDR_MASK_SIZE_IPV4", default_value_t = 24)]
    pub node_cidr_mask_size_ipv4: u8,

    /// Size of each Node's IPv6 pod CIDR.
    #[arg(long, env = "MESHLESS_NODE_CIDR_MASK_SIZE_IPV6", default_value_t = 64)]
    pub node_cidr_mask_size_ipv6: u8,

    /// Controllers the leader runs (comma-separated).
    #[arg(
        long,
        env = "MESHLESS_CONTROLLERS",
        value_delimiter = ',',
        default_value = "lb-ipam,node-ipam"
    )]
    pub controllers: Vec<Controller>,
}

impl Config {
    pub fn timing(&self) -> Timing {
        Timing {
            lease_duration: self.lease_duration,
            renew_period: self.renew_period,
            retry_period: self.retry_period,
        }
    }

    /// Checks what clap cannot: timings that let a leader renew, usable
    /// and disjoint pools, cluster CIDRs that fit the node CIDR sizes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.timing().validate().map_err(ConfigError::Timing)?;
        for (i, a) in self.lb_pools.iter().enumerate() {
            for b in &self.lb_pools[i + 1..] {
                if a.covers(b) || b.covers(a) {
                    return Err(ConfigError::OverlappingPools { a: *a, b: *b });
                }
            }
        }
        crate::node_ipam::NodeIpam::new(
            &self.cluster_cidrs,
            self.node_cidr_mask_size_ipv4,
            self.node_cidr_mask_size_ipv6,
        )?;
        Ok(())
    }

    /// The identity to write into the Lease.
    pub fn identity(&self, pod_name: Option<String>, hostname: &str, pid: u32) -> String {
        self.id
            .clone()
            .or(pod_name.filter(|p| !p.is_empty()))
            .unwrap_or_else(|| format!("{hostname}_{pid}"))
    }

    pub fn runs(&self, c: Controller) -> bool {
        self.controllers.contains(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("meshless-operator").chain(args.iter().copied()))
            .expect("parses")
    }

    #[test]
    fn defaults() {
        let c = parse(&[]);
        assert_eq!(c.namespace, "meshless-system");
        assert_eq!(c.lease_name, "meshless-operator");
        assert_eq!(
            c.timing(),
            Timing {
                lease_duration: Duration::from_secs(15),
                renew_period: Duration::from_secs(2),
                retry_period: Duration::from_secs(2),
            }
        );
        assert!(c.lb_pools.is_empty());
        assert!(c.install_crds);
        assert_eq!(c.command, None);
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert!(c.runs(Controller::LbIpam) && c.runs(Controller::NodeIpam));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.identity(None, "host", 7), "host_7");
        assert_eq!(c.identity(Some("pod-x".into()), "host", 7), "pod-x");
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--lb-pool",
            "198.18.1.0/24,fd00:d::/112",
            "--lease-duration",
            "6",
            "--renew-period",
            "500ms",
            "--retry-period",
            "1s",
            "--id",
            "a",
            "--controllers",
            "lb-ipam",
        ]);
        assert_eq!(c.lb_pools.len(), 2);
        assert_eq!(c.lease_duration, Duration::from_secs(6));
        assert_eq!(c.renew_period, Duration::from_millis(500));
        assert_eq!(c.identity(Some("pod".into()), "h", 1), "a");
        assert!(!c.runs(Controller::NodeIpam));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn install_crds_and_print_crds() {
        assert!(!parse(&["--install-crds=false"]).install_crds);
        assert!(!parse(&["--install-crds", "false"]).install_crds);
        assert!(parse(&["--install-crds"]).install_crds);
        assert!(Config::try_parse_from(["x", "--install-crds=maybe"]).is_err());
        let c = parse(&["--lb-pool", "198.18.1.0/24", "print-crds"]);
        assert_eq!(c.command, Some(Command::PrintCrds));
        assert_eq!(c.lb_pools.len(), 1);
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let err = Config::try_parse_from(["x", "--lb-pool", "198.18.1.1/24"]).unwrap_err();
        assert!(
            err.to_string().contains("did you mean 198.18.1.0/24"),
            "{err}"
        );
        let err = Config::try_parse_from(["x", "--lease-duration", "soon"]).unwrap_err();
        assert!(err.to_string().contains("write e.g. 15s"), "{err}");
        let c = parse(&["--lb-pool", "198.18.1.0/24,198.18.1.128/25"]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OverlappingPools { .. })
        ));
        let c = parse(&["--renew-period", "15s"]);
        assert!(matches!(c.validate(), Err(ConfigError::Timing(_))));
        let c = parse(&["--node-cidr-mask-size-ipv4", "8"]);
        assert!(matches!(c.validate(), Err(ConfigError::NodeIpam(_))));
    }
}
