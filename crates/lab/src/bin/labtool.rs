//! meshless-labtool: traffic servers and clients for lab pods. Clients print
//! one JSON line with what they observed, so tests can compare it with what
//! the datapath counted.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, reason = "a CLI: its JSON result goes to stdout")]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "meshless-labtool",
    about = "Traffic servers and clients for Meshless lab pods"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echo every UDP datagram back to its sender, forever.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Echo TCP bytes back on every accepted connection, forever.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send COUNT datagrams one at a time, each waiting for its echo.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Payload bytes per datagram.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// How long to wait for each echo before counting it lost.
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
    /// Open COUNT TCP connections one after another: connect, send 1 byte,
    /// read the echo, close. Prints latency percentiles (connect to echo
    /// received) and connections per second over the measured ones.
    TcpConnect {
        #[arg(long)]
        to: SocketAddr,
        /// Connections to measure.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Per-connection bound on connect and on reading the echo.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Connections made first and not measured (warms ARP, conntrack,
        /// caches); their failures are reported as `warmup_failed`.
        #[arg(long, default_value_t = 0)]
        warmup: u32,
        /// Hard bound on the whole run, warm-up included: stops early
        /// (`stopped_early`, `ran` < `count`) rather than run longer.
        #[arg(long, default_value_t = 60_000)]
        max_duration_ms: u64,
    },
    /// Test helper: build a lab with a pod running a process, print "ready",
    /// then wait to be killed (the crash-cleanup test SIGKILLs it).
    #[command(hide = true)]
    HoldLab {
        #[arg(long)]
        name: String,
    },
    /// Answer with an identity: on TCP every byte received is answered with
    /// "<ID>\n"; on UDP every datagram with "<ID>". Serves both on LISTEN.
    ServeId {
        #[arg(long)]
        listen: SocketAddr,
        /// Default: $POD_NAME (a pod's name through the downward API).
        #[arg(long, env = "POD_NAME")]
        id: String,
        /// Keep serving after SIGTERM, like an application that drains its
        /// connections until the grace period ends (then SIGKILL stops it).
        #[arg(long)]
        ignore_sigterm: bool,
    },
    /// Minimal HTTP/1.1 server (the lab kubelet's `meshless.dev/echo`
    /// image): every request gets 200 and a JSON body naming the pod
    /// ($POD_NAME, else $HOSTNAME), its namespace ($POD_NAMESPACE), the
    /// address that answered and the request headers. One request per
    /// connection (`Connection: close`).
    HttpEcho {
        #[arg(long, default_value = "[::]:8080")]
        listen: SocketAddr,
    },
    /// Make COUNT connections (or UDP exchanges) to a `serve-id` server and
    /// count which identity answered each; prints JSON.
    Tally {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// UDP only: use sendto()/recvfrom() on an unconnected socket and
        /// check that every answer comes from TO (the service address).
        #[arg(long)]
        unconnected: bool,
        /// UDP only: bind flow i to source port BASE+i (deterministic flows,
        /// for consistent hashing); the per-flow answers are printed.
        #[arg(long)]
        source_port_base: Option<u16>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Pause between connections, to spread COUNT over time.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Keep one TCP connection to a `serve-id` server for DURATION, sending a
    /// byte every INTERVAL and reading the answer; prints JSON.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Start by printing "connected <ID>" once the connection is up.
        #[arg(long)]
        announce: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::UdpEcho { listen } => udp_echo(listen),
        Cmd::TcpEcho { listen } => tcp_echo(listen),
        Cmd::UdpSend {
            to,
            count,
            size,
            timeout_ms,
        } => udp_send(to, count, size, Duration::from_millis(timeout_ms)),
        Cmd::TcpConnect {
            to,
            count,
            timeout_ms,
            warmup,
            max_duration_ms,
        } => tcp_connect(
            to,
            count,
            warmup,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(max_duration_ms),
        ),
        Cmd::HoldLab { name } => hold_lab(&name),
        Cmd::ServeId {
            listen,
            id,
            ignore_sigterm,
        } => {
            if ignore_sigterm {
                // Blocked before any thread starts, so every thread inherits
                // the mask: SIGTERM stays pending, SIGKILL still ends us.
                nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGTERM)
                    .thread_block()
                    .context("blocking SIGTERM")?;
            }
            serve_id(listen, &id)
        }
        Cmd::HttpEcho { listen } => http_echo(listen),
        Cmd::Tally {
            to,
            count,
            udp,
            unconnected,
            source_port_base,
            timeout_ms,
            interval_ms,
        } => tally(&TallyArgs {
            to,
            count,
            udp,
            unconnected,
            source_port_base,
            timeout: Duration::from_millis(timeout_ms),
            interval: Duration::from_millis(interval_ms),
        }),
        Cmd::Hold {
            to,
            duration_ms,
            interval_ms,
            announce,
        } => hold(
            to,
            Duration::from_millis(duration_ms),
            Duration::from_millis(interval_ms),
            announce,
        ),
    }
}

fn hold_lab(name: &str) -> anyhow::Result<()> {
    let mut lab = meshless_lab::Lab::create(meshless_lab::LabSpec::new(name))?;
    let pod = lab.add_pod(1, "held")?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["udp-echo", "--listen", "[::]:7000"]);
    let server = lab.spawn_in_pod(&pod, "echo", cmd)?;
    println!("ready {}", server.pid());
    std::io::stdout().flush()?;
    // Keep the lab (and the server) alive until we are killed.
    let _keep = (lab, server);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn udp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        sock.send_to(&buf[..n], from)?;
    }
}

fn tcp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn udp_send(to: SocketAddr, count: u32, size: usize, timeout: Duration) -> anyhow::Result<()> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .context("bind address")?;
    let sock = UdpSocket::bind(bind)?;
    sock.connect(to)
        .with_context(|| format!("connecting to {to}"))?;
    sock.set_read_timeout(Some(timeout))?;
    let mut payload = vec![0u8; size.max(4)];
    let mut buf = vec![0u8; 65_536];
    let (mut sent, mut received) = (0u32, 0u32);
    for i in 0..count {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        sock.send(&payload)?;
        sent += 1;
        // Wait for this datagram's echo; a late echo of an earlier one is skipped.
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 4 && buf[..4] == i.to_be_bytes() => {
                    received += 1;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "received": received })
    );
    Ok(())
}

/// One connection: connect, send a byte, read it back, close. Both waits
/// are bounded by `timeout`.
fn tcp_once(to: &SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

fn tcp_connect(
    to: SocketAddr,
    count: u32,
    warmup: u32,
    timeout: Duration,
    max_duration: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + max_duration;
    // Never wait past the deadline, even inside one connection.
    let bounded = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| timeout.min(left))
    };
    let mut warmup_failed = 0u32;
    let mut stopped_early = false;
    for _ in 0..warmup {
        let Some(t) = bounded() else {
            stopped_early = true;
            break;
        };
        if tcp_once(&to, t).is_err() {
            warmup_failed += 1;
        }
    }
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut errors: Vec<String> = Vec::new();
    let mut latencies_us: Vec<u64> = Vec::with_capacity(count as usize);
    let measured = Instant::now();
    for _ in 0..count {
        let Some(t) = bounded() else {
            stopped_early = true;
            break;
        };
        let start = Instant::now();
        match tcp_once(&to, t) {
            Ok(()) => {
                ok += 1;
                latencies_us.push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    let elapsed = measured.elapsed();
    latencies_us.sort_unstable();
    // The median as before (upper median for even counts).
    let p50 = latencies_us.get(latencies_us.len() / 2).copied();
    let p99 = percentile(&latencies_us, 99.0);
    let secs = elapsed.as_secs_f64();
    let conn_per_s = (secs > 0.0).then(|| f64::from(ok) / secs);
    println!(
        "{}",
        serde_json::json!({
            "ok": ok,
            "failed": failed,
            "errors": errors,
            "p50_us": p50,
            "p99_us": p99,
            "conn_per_s": conn_per_s,
            "requested": count,
            "ran": ok + failed,
            "stopped_early": stopped_early,
            "warmup": warmup,
            "warmup_failed": warmup_failed,
            "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    );
    Ok(())
}

fn serve_id(listen: SocketAddr, id: &str) -> anyhow::Result<()> {
    let udp = UdpSocket::bind(listen).with_context(|| format!("binding udp {listen}"))?;
    let uid = id.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ignored = udp.send_to(uid.as_bytes(), from);
        }
    });
    let listener = TcpListener::bind(listen).with_context(|| format!("binding tcp {listen}"))?;
    let line = format!("{id}\n");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let line = line.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            while let Ok(1) = stream.read(&mut buf) {
                if stream.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn http_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let pod = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
    let listener = TcpListener::bind(listen).with_context(|| format!("binding tcp {listen}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (pod, namespace) = (pod.clone(), namespace.clone());
        std::thread::spawn(move || {
            let _ignored = http_echo_one(stream, &pod, &namespace);
        });
    }
    Ok(())
}

fn http_echo_one(mut stream: TcpStream, pod: &str, namespace: &str) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let headers: serde_json::Map<String, serde_json::Value> = text
        .split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().into()))
        .collect();
    let ip = stream.local_addr()?.ip().to_canonical().to_string();
    let body = serde_json::json!({
        "pod": pod,
        "namespace": namespace,
        "ip": ip,
        "headers": headers,
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())?;
    Ok(())
}

struct TallyArgs {
    to: SocketAddr,
    count: u32,
    udp: bool,
    unconnected: bool,
    source_port_base: Option<u16>,
    timeout: Duration,
    interval: Duration,
}

fn tcp_ask(to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"x")?;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b)?;
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn udp_ask(a: &TallyArgs, i: u32) -> std::io::Result<(String, bool)> {
    let port = a
        .source_port_base
        .map_or(0, |b| b.wrapping_add(u16::try_from(i).unwrap_or(u16::MAX)));
    let bind: SocketAddr = if a.to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(a.timeout))?;
    let mut buf = [0u8; 512];
    if a.unconnected {
        sock.send_to(b"x", a.to)?;
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            from == a.to,
        ))
    } else {
        sock.connect(a.to)?;
        sock.send(b"x")?;
        let n = sock.recv(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), true))
    }
}

fn tally(a: &TallyArgs) -> anyhow::Result<()> {
    let mut replies: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    let mut flows: Vec<(u32, String)> = Vec::new();
    let (mut ok, mut failed, mut wrong_source) = (0u32, 0u32, 0u32);
    let mut errors: Vec<String> = Vec::new();
    let start = Instant::now();
    for i in 0..a.count {
        let r = if a.udp {
            udp_ask(a, i)
        } else {
            tcp_ask(a.to, a.timeout).map(|id| (id, true))
        };
        match r {
            Ok((id, right_source)) => {
                ok += 1;
                wrong_source += u32::from(!right_source);
                if a.source_port_base.is_some() {
                    flows.push((i, id.clone()));
                }
                *replies.entry(id).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
        if !a.interval.is_zero() {
            std::thread::sleep(a.interval);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "ok": ok, "failed": failed, "errors": errors, "replies": replies,
            "wrong_source": wrong_source, "flows": flows,
            "elapsed_ms": u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    );
    Ok(())
}

fn hold(
    to: SocketAddr,
    duration: Duration,
    interval: Duration,
    announce: bool,
) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut ids: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut error = None;
    let end = Instant::now() + duration;
    let mut first = true;
    while Instant::now() < end {
        let r = (|| -> std::io::Result<String> {
            s.write_all(b"x")?;
            let mut out = Vec::new();
            let mut b = [0u8; 1];
            loop {
                s.read_exact(&mut b)?;
                if b[0] == b'\n' {
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                out.push(b[0]);
            }
        })();
        match r {
            Ok(id) => {
                ok += 1;
                if first && announce {
                    println!("connected {id}");
                    std::io::stdout().flush()?;
                }
                first = false;
                ids.insert(id);
            }
            Err(e) => {
                failed += 1;
                error = Some(e.to_string());
                break;
            }
        }
        std::thread::sleep(interval);
    }
    println!(
        "{}",
        serde_json::json!({ "ok": ok, "failed": failed, "ids": ids, "error": error })
    );
    Ok(())
}
