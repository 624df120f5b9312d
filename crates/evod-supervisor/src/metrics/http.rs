//! The metrics HTTP server: `GET /metrics`, `/healthz`, `/readyz` over
//! `std::net`, requests parsed by `httparse`.
//!
//! Bounded: one accepting thread, at most [`MAX_CONNECTIONS`] connection
//! threads at once (one more connection is answered `503` without reading
//! it and closed), each with a whole-request deadline of
//! [`REQUEST_DEADLINE`] from accept (reading at most [`MAX_REQUEST`] bytes
//! and writing the answer), one request per connection
//! (`Connection: close`). A client that trickles bytes holds one thread for
//! at most the deadline. No thread here ever waits on the event loop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::Shared;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a connection has, from accept, to send its request and take the
/// answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head read, in bytes.
pub const MAX_REQUEST: usize = 8192;

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be listened on (in use, not local, no permission).
    #[error("cannot listen on {addr} for metrics")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The accepting thread cannot be started.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// The running server; dropping it stops accepting (connections being
/// served finish within their deadline).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl MetricsServer {
    /// Listens on `addr` and serves `shared` from threads of its own.
    pub(crate) fn start(addr: SocketAddr, shared: Arc<Shared>) -> Result<Self, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(listener, shared, flag))
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer { addr: bound, stop })
    }

    /// The address it listens on (the port the OS picked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which sees the flag and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Decrements the live-connection count when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        // Relaxed: a plain count; nothing else is published through it.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else {
            // EMFILE and the like: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        // Relaxed: see `Slot`.
        if live.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::Relaxed);
            busy(stream);
            continue;
        }
        let slot = Slot(live.clone());
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve(stream, &shared);
            });
        if spawned.is_err() {
            // The closure (and its slot) was dropped: the count is right.
            tracing::debug!("metrics: cannot start a connection thread");
        }
    }
}

/// Answers `503` without reading (never blocks: non-blocking write of a
/// few bytes into an empty socket buffer) and closes.
fn busy(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(&response(
        503,
        "text/plain; charset=utf-8",
        b"too many metrics connections\n",
    ));
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let (method, path) = loop {
        let Some(t) = left() else { return };
        if stream.set_read_timeout(Some(t)).is_err() {
            return;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) => return,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    request.method.unwrap_or("").to_owned(),
                    request.path.unwrap_or("").to_owned(),
                );
            }
            Ok(httparse::Status::Partial) if len < buf.len() => {}
            Ok(httparse::Status::Partial) => {
                return answer(&mut stream, left, 431, b"request head too large\n");
            }
            Err(_) => return answer(&mut stream, left, 400, b"bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return answer(&mut stream, left, 405, b"only GET\n");
    }
    let (status, kind, body) = match path {
        "/metrics" => (
            200,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            shared.encode().into_bytes(),
        ),
        "/healthz" => (200, TEXT, b"ok\n".to_vec()),
        "/readyz" => match shared.readiness() {
            Ok(()) => (200, TEXT, b"ready: a verified model is served\n".to_vec()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n").into_bytes()),
        },
        _ => (
            404,
            TEXT,
            b"not found: try /metrics, /healthz or /readyz\n".to_vec(),
        ),
    };
    let mut out = response(status, kind, &body);
    if method == "HEAD" {
        out.truncate(out.len() - body.len());
    }
    write_all(&mut stream, left, &out);
}

const TEXT: &str = "text/plain; charset=utf-8";

fn answer(stream: &mut TcpStream, left: impl Fn() -> Option<Duration>, status: u16, body: &[u8]) {
    write_all(stream, left, &response(status, TEXT, body));
}

fn write_all(stream: &mut TcpStream, left: impl Fn() -> Option<Duration>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let Some(t) = left() else { return };
        if stream.set_write_timeout(Some(t)).is_err() {
            return;
        }
        match stream.write(bytes) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn response(status: u16, kind: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::super::Metrics;
    use super::*;

    fn try_get(addr: SocketAddr, request: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        try_get(addr, request).unwrap()
    }

    #[test]
    fn routes_probes_and_refuses_the_rest() {
        let mut m = Metrics::new(None);
        let server = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = server.addr();
        let ok = get(a, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let not = get(a, "GET /readyz HTTP/1.1\r\n\r\n");
        assert!(not.starts_with("HTTP/1.1 503 "), "{not}");
        assert!(not.contains("not ready: starting"), "{not}");
        m.set_readiness(Ok(()));
        let ready = get(a, "GET /readyz HTTP/1.1\r\n\r\n");
        assert!(ready.starts_with("HTTP/1.1 200 "), "{ready}");
        let metrics = get(a, "GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert!(metrics.contains("version=0.0.4"), "{metrics}");
        assert!(metrics.contains("evod_ready 1"), "{metrics}");
        assert!(get(a, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(get(a, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(get(a, "\x01\x02 junk\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_REQUEST)
        );
        assert!(get(a, &huge).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn a_busy_server_answers_503_at_once_and_tricklers_are_cut_at_the_deadline() {
        let m = Metrics::new(None);
        let server = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = server.addr();
        // Fill every connection slot with a client that sends nothing.
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s
            })
            .collect();
        // The accepting thread counts them as it accepts; wait until a new
        // connection is refused (deadline-bounded).
        let started = Instant::now();
        // Refused: the 503, or a reset when the server closed the socket
        // with the request unread.
        loop {
            match try_get(a, "GET /healthz HTTP/1.1\r\n\r\n") {
                Ok(reply) if reply.starts_with("HTTP/1.1 503 ") => {
                    assert!(reply.contains("too many"), "{reply}");
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                reply => assert!(
                    started.elapsed() < REQUEST_DEADLINE,
                    "never refused: {reply:?}"
                ),
            }
        }
        // Each held connection is closed by the server at its deadline.
        for mut s in held {
            let mut rest = Vec::new();
            // EOF (the server closed it), not the 10 s client timeout.
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        }
        assert!(get(a, "GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
    }
}
