//! Readiness probes (httpGet and tcpSocket), run from the node's network
//! namespace against the pod IP, as kubelet does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe as ProbeSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, Clone)]
enum Action {
    Http {
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    /// exec probes and the like: always fail, with this reason.
    Unsupported(String),
}

/// A readiness probe and its progress. Defaults are Kubernetes': period
/// 10 s, timeout 1 s, no initial delay, failure threshold 3, success 1.
#[derive(Debug)]
pub struct Readiness {
    action: Action,
    period: Duration,
    timeout: Duration,
    failure_threshold: u32,
    success_threshold: u32,
    next: Instant,
    ready: bool,
    failures: u32,
    successes: u32,
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

impl Readiness {
    /// The container's readiness probe, starting now; `None` when it has none.
    pub fn new(c: &Container) -> Option<Self> {
        let spec: &ProbeSpec = c.readiness_probe.as_ref()?;
        let action = if let Some(h) = &spec.http_get {
            match port(c, &h.port) {
                Some(port) => Action::Http {
                    port,
                    path: h.path.clone().unwrap_or_else(|| "/".into()),
                },
                None => Action::Unsupported(format!("httpGet port {:?} not found", h.port)),
            }
        } else if let Some(t) = &spec.tcp_socket {
            match port(c, &t.port) {
                Some(port) => Action::Tcp { port },
                None => Action::Unsupported(format!("tcpSocket port {:?} not found", t.port)),
            }
        } else {
            Action::Unsupported("only httpGet and tcpSocket probes are supported".into())
        };
        let threshold =
            |v: Option<i32>, d: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(d).max(1);
        Some(Self {
            action,
            period: secs(spec.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(spec.timeout_seconds, 1).max(Duration::from_secs(1)),
            failure_threshold: threshold(spec.failure_threshold, 3),
            success_threshold: threshold(spec.success_threshold, 1),
            next: Instant::now() + secs(spec.initial_delay_seconds, 0),
            ready: false,
            failures: 0,
            successes: 0,
        })
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Probes if one is due and returns whether the container is ready.
    pub async fn check(&mut self, pod_ip: &str) -> bool {
        if Instant::now() < self.next {
            return self.ready;
        }
        self.next = Instant::now() + self.period;
        let ok = match pod_ip.parse::<IpAddr>() {
            Ok(ip) => self.probe(ip).await,
            Err(_) => Err("pod has no IP".into()),
        };
        match ok {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                if self.successes >= self.success_threshold {
                    self.ready = true;
                }
            }
            Err(why) => {
                tracing::debug!(%pod_ip, %why, "readiness probe failed");
                self.successes = 0;
                self.failures += 1;
                if self.failures >= self.failure_threshold {
                    self.ready = false;
                }
            }
        }
        self.ready
    }

    async fn probe(&self, ip: IpAddr) -> Result<(), String> {
        match &self.action {
            Action::Unsupported(why) => Err(why.clone()),
            Action::Tcp { port } => {
                tokio::time::timeout(self.timeout, TcpStream::connect(SocketAddr::new(ip, *port)))
                    .await
                    .map_err(|_| "timeout".to_owned())?
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Action::Http { port, path } => {
                tokio::time::timeout(self.timeout, http_get(SocketAddr::new(ip, *port), path))
                    .await
                    .map_err(|_| "timeout".to_owned())?
            }
        }
    }
}

/// One HTTP/1.1 GET; 200-399 is success, as for kubelet.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/meshless-lab\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let got = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}
