//! A real Kubernetes control plane for the lab: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, built from the published Go
//! modules by `cargo xtask setup` (tools/k8s), running in a namespace of their
//! own on the lab fabric, with TLS, service-account keys and token auth.
//!
//! | what | where |
//! |---|---|
//! | namespace | `ml-<lab>-cp`, 198.18.0.5 / fd00:a::5 on the fabric |
//! | kube-apiserver | https://198.18.0.5:6443 (reachable from every node and the external host) |
//! | etcd | http://127.0.0.1:2379 inside `ml-<lab>-cp` only |
//! | files | `/run/meshless-lab/<lab>/cp/` (pki, tokens, kubeconfigs, etcd data, logs in `../logs`) |

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::run;
use crate::lab::{Host, Lab, wire_host};
use crate::{LabError, LabProcess, plan};

/// The Kubernetes release the lab runs (tools/k8s builds it).
pub const K8S_VERSION: &str = "v1.36.3";
/// The control plane's address on the fabric.
pub const CONTROL_PLANE_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
pub const CONTROL_PLANE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 5);
/// kube-apiserver's port.
pub const APISERVER_PORT: u16 = 6443;
/// Service ClusterIP ranges given to kube-apiserver (and so to Services).
pub const SERVICE_CIDRS: &str = "198.19.0.0/16,fd00:c::/108";

/// Where the control-plane binaries are: `$MESHLESS_K8S_BIN`, or the cache
/// `cargo xtask setup` builds into.
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MESHLESS_K8S_BIN") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/meshless")
        .join(format!("k8s-{K8S_VERSION}"))
        .join("bin")
}

/// A running control plane. Dropping it stops its processes (the lab's
/// teardown would kill them anyway).
#[derive(Debug)]
pub struct ControlPlane {
    host: Host,
    dir: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    etcd: Option<LabProcess>,
    apiserver: Option<LabProcess>,
    others: Vec<LabProcess>,
}

fn openssl(args: &[&str]) -> Result<(), LabError> {
    run(Command::new("openssl").args(args)).map(drop)
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(LabError::io("writing", path))
}

fn kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: {user}}}\ncurrent-context: lab\n",
        ca.display()
    )
}

fn token() -> Result<String, LabError> {
    Ok(run(Command::new("openssl").args(["rand", "-hex", "16"]))?
        .trim()
        .to_owned())
}

impl Lab {
    /// Starts etcd, kube-apiserver, kube-controller-manager and
    /// kube-scheduler and waits until the API server is ready.
    pub fn start_control_plane(&mut self) -> Result<ControlPlane, LabError> {
        let bin = k8s_bin_dir();
        for b in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ] {
            if !bin.join(b).exists() {
                return Err(LabError::Spec(format!(
                    "{} is missing: `cargo xtask setup` builds the Kubernetes {K8S_VERSION} control plane",
                    bin.join(b).display()
                )));
            }
        }
        let host = Host {
            name: "cp".into(),
            netns: format!("{}{}-cp", plan::NETNS_PREFIX, self.name()),
            ipv4: CONTROL_PLANE_IPV4,
            ipv6: CONTROL_PLANE_IPV6,
            system_cgroup: self.cgroup_root().join("system").join("cp"),
        };
        wire_host(&plan::fabric_netns(self.name()), &host)?;
        let dir = self
            .log_dir()
            .parent()
            .map(|p| p.join("cp"))
            .unwrap_or_default();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(LabError::io("creating", &pki))?;
        let p = |f: &str| pki.join(f).display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "7",
            "-subj",
            "/CN=meshless-lab-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=kube-apiserver",
            "-keyout",
            &p("apiserver.key"),
            "-out",
            &p("apiserver.csr"),
        ])?;
        write(
            &pki.join("apiserver.ext"),
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:{CONTROL_PLANE_IPV4},IP:{CONTROL_PLANE_IPV6},IP:198.19.0.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            ),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("apiserver.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "7",
            "-extfile",
            &p("apiserver.ext"),
            "-out",
            &p("apiserver.crt"),
        ])?;
        openssl(&["genrsa", "-out", &p("sa.key"), "2048"])?;
        openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
        let (admin, kcm, sched) = (token()?, token()?, token()?);
        // token,user,uid,"groups": system:masters is cluster-admin.
        write(
            &pki.join("tokens.csv"),
            &format!(
                "{admin},admin,admin,\"system:masters\"\n{kcm},system:kube-controller-manager,kcm,\"\"\n{sched},system:kube-scheduler,sched,\"\"\n"
            ),
        )?;
        let server = format!("https://{CONTROL_PLANE_IPV4}:{APISERVER_PORT}");
        let ca = pki.join("ca.crt");
        let kubeconfig_path = dir.join("admin.kubeconfig");
        write(&kubeconfig_path, &kubeconfig(&server, &ca, "admin", &admin))?;
        write(
            &dir.join("kcm.kubeconfig"),
            &kubeconfig(&server, &ca, "system:kube-controller-manager", &kcm),
        )?;
        write(
            &dir.join("sched.kubeconfig"),
            &kubeconfig(&server, &ca, "system:kube-scheduler", &sched),
        )?;

        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--name=lab")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=lab=http://127.0.0.1:2380",
                "--initial-cluster-state=new",
                // The lab is disposable and /run is tmpfs: an fsync per write
                // only slows every test down.
                "--unsafe-no-fsync",
            ]);
        let etcd = self.spawn_on_host(&host, "etcd", etcd)?;
        let mut cp = ControlPlane {
            host,
            dir,
            bin,
            kubeconfig: kubeconfig_path,
            etcd: Some(etcd),
            apiserver: None,
            others: Vec::new(),
        };
        cp.start_apiserver(self)?;
        let kcm_cfg = cp.dir.join("kcm.kubeconfig").display().to_string();
        let mut kcm = Command::new(cp.bin.join("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={kcm_cfg}"))
            .arg(format!("--authentication-kubeconfig={kcm_cfg}"))
            .arg(format!("--authorization-kubeconfig={kcm_cfg}"))
            .args([
                "--bind-address=127.0.0.1",
                "--secure-port=10257",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
            ])
            .arg(format!("--cert-dir={}", cp.dir.join("kcm-certs").display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                p("sa.key")
            ))
            .arg(format!("--root-ca-file={}", p("ca.crt")))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDRS}"));
        let kcm = self.spawn_on_host(&cp.host, "kube-controller-manager", kcm)?;
        cp.others.push(kcm);
        let sched_cfg = cp.dir.join("sched.kubeconfig").display().to_string();
        let mut sched = Command::new(cp.bin.join("kube-scheduler"));
        sched
            .arg(format!("--kubeconfig={sched_cfg}"))
            .arg(format!("--authentication-kubeconfig={sched_cfg}"))
            .arg(format!("--authorization-kubeconfig={sched_cfg}"))
            .args([
                "--bind-address=127.0.0.1",
                "--secure-port=10259",
                "--leader-elect=false",
            ])
            .arg(format!(
                "--cert-dir={}",
                cp.dir.join("sched-certs").display()
            ));
        let sched = self.spawn_on_host(&cp.host, "kube-scheduler", sched)?;
        cp.others.push(sched);
        Ok(cp)
    }
}

impl ControlPlane {
    /// The admin kubeconfig (server https://198.18.0.5:6443), usable from
    /// any lab namespace.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The namespace the control plane runs in.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The kubectl binary built with the control plane.
    pub fn kubectl_bin(&self) -> PathBuf {
        self.bin.join("kubectl")
    }

    /// Starts kube-apiserver (again, after [`ControlPlane::stop_apiserver`])
    /// and waits until it is ready.
    pub fn start_apiserver(&mut self, lab: &Lab) -> Result<(), LabError> {
        let pki = self.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let mut api = Command::new(self.bin.join("kube-apiserver"));
        api.args([
            "--etcd-servers=http://127.0.0.1:2379",
            "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",
        ])
        .arg(format!("--bind-address={CONTROL_PLANE_IPV4}"))
        .arg(format!("--advertise-address={CONTROL_PLANE_IPV4}"))
        .arg(format!("--secure-port={APISERVER_PORT}"))
        .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
        .arg(format!("--client-ca-file={}", p("ca.crt")))
        .arg(format!("--token-auth-file={}", p("tokens.csv")))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDRS}"))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", p("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            p("sa.key")
        ))
        .arg(format!(
            "--cert-dir={}",
            self.dir.join("apiserver-certs").display()
        ));
        self.apiserver = Some(lab.spawn_on_host(&self.host, "kube-apiserver", api)?);
        self.wait_ready(lab, Duration::from_secs(120))
    }

    /// Kills kube-apiserver (SIGKILL: an API server crash).
    pub fn stop_apiserver(&mut self) -> Result<(), LabError> {
        if let Some(mut api) = self.apiserver.take() {
            api.signal(nix::sys::signal::Signal::SIGKILL)?;
            api.wait_timeout(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Waits until `/readyz` answers ok.
    pub fn wait_ready(&self, lab: &Lab, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .kubectl(lab, &["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.trim() == "ok")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .apiserver
                    .as_ref()
                    .map(LabProcess::log)
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(LabError::Timeout {
                    what: format!("kube-apiserver to become ready; last log lines: {tail:?}"),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs kubectl (as admin) in the control plane's namespace.
    pub fn kubectl(&self, lab: &Lab, args: &[&str]) -> Result<String, LabError> {
        let mut cmd = Command::new(self.kubectl_bin());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--request-timeout=10s")
            .args(args);
        lab.spawn_on_host(&self.host, "kubectl", cmd)?
            .wait_success(Duration::from_secs(30))
    }

    /// `kubectl apply -f` of a YAML text.
    pub fn apply(&self, lab: &Lab, yaml: &str) -> Result<String, LabError> {
        let file = self.dir.join(format!("apply-{}.yaml", std::process::id()));
        write(&file, yaml)?;
        let out = self.kubectl(lab, &["apply", "-f", &file.display().to_string()]);
        let _ignored = std::fs::remove_file(&file);
        out
    }

    /// Leaves the processes running when this value is dropped (`lab up`).
    pub fn detach(mut self) {
        for p in self
            .others
            .drain(..)
            .chain(self.apiserver.take())
            .chain(self.etcd.take())
        {
            p.detach();
        }
    }
}
