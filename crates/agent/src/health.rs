//! Liveness and readiness over HTTP, for the DaemonSet's probes:
//!
//! | path | 200 when | otherwise |
//! |---|---|---|
//! | `/healthz` | the main loop ran within the last 5 s | 503 |
//! | `/readyz` | the datapath is attached and, with a source of services, the first reconcile is done | 503 with the reason |
//! | `/status` | always: the status JSON | |
//!
//! A deliberately small HTTP/1.1 responder: one request per connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the probes report, updated by the main loop.
#[derive(Debug)]
pub struct Health {
    last_tick: Instant,
    ready: Result<(), String>,
    status: String,
}

/// Shared between the main loop and the HTTP task.
pub type Shared = Arc<Mutex<Health>>;

/// How stale the main loop may be before /healthz fails.
const LIVENESS: Duration = Duration::from_secs(5);

pub fn new() -> Shared {
    Arc::new(Mutex::new(Health {
        last_tick: Instant::now(),
        ready: Err("starting".into()),
        status: "{}".into(),
    }))
}

/// Records one pass of the main loop.
pub fn update(h: &Shared, ready: Result<(), String>, status: String) {
    let mut g = h.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    g.last_tick = Instant::now();
    g.ready = ready;
    g.status = status;
}

/// The answer to one request line: (status code, content type, body).
fn answer(h: &Shared, path: &str) -> (u16, &'static str, String) {
    let g = h.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match path {
        "/healthz" if g.last_tick.elapsed() <= LIVENESS => (200, "text/plain", "ok\n".into()),
        "/healthz" => (
            503,
            "text/plain",
            format!("main loop stalled for {:?}\n", g.last_tick.elapsed()),
        ),
        "/readyz" => match &g.ready {
            Ok(()) => (200, "text/plain", "ok\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        "/status" => (200, "application/json", g.status.clone()),
        _ => (
            404,
            "text/plain",
            "try /healthz, /readyz or /status\n".into(),
        ),
    }
}

/// Serves the probes on `addr` until the runtime shuts down.
pub async fn serve(addr: SocketAddr, h: Shared) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health endpoints listening");
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let h = Arc::clone(&h);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (code, ctype, body) = answer(&h, path);
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ignored = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_by_state() {
        let h = new();
        assert_eq!(answer(&h, "/readyz").0, 503, "not ready while starting");
        assert!(answer(&h, "/readyz").2.contains("starting"));
        assert_eq!(answer(&h, "/healthz").0, 200);
        update(&h, Ok(()), "{\"node\":\"n1\"}".into());
        assert_eq!(answer(&h, "/readyz").0, 200);
        assert_eq!(answer(&h, "/status").2, "{\"node\":\"n1\"}");
        assert_eq!(answer(&h, "/nope").0, 404);
        h.lock().expect("lock").last_tick = Instant::now() - Duration::from_secs(6);
        assert_eq!(
            answer(&h, "/healthz").0,
            503,
            "a stalled loop fails liveness"
        );
    }
}
