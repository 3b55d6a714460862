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
    /// Open COUNT TCP connections: connect, send 1 byte, read the echo, close.
    TcpConnect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Test helper: build a lab with a pod running a process, print "ready",
    /// then wait to be killed (the crash-cleanup test SIGKILLs it).
    #[command(hide = true)]
    HoldLab {
        #[arg(long)]
        name: String,
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
        } => tcp_connect(to, count, Duration::from_millis(timeout_ms)),
        Cmd::HoldLab { name } => hold_lab(&name),
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

fn tcp_connect(to: SocketAddr, count: u32, timeout: Duration) -> anyhow::Result<()> {
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut errors: Vec<String> = Vec::new();
    let mut latencies_us: Vec<u64> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = Instant::now();
        let result = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        })();
        match result {
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
    latencies_us.sort_unstable();
    let p50 = latencies_us.get(latencies_us.len() / 2).copied();
    println!(
        "{}",
        serde_json::json!({ "ok": ok, "failed": failed, "errors": errors, "p50_us": p50 })
    );
    Ok(())
}
