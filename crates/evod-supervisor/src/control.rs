//! The control socket's server, in the supervisor (the JSON lines and the
//! client are `evod_wire::control`).
//!
//! Transport: an `interprocess` local socket (a Unix socket file), mode 0600.
//! The server checks each peer's uid (`SO_PEERCRED`) against its own and
//! refuses a mismatch.
//!
//! The socket path rule (never remove or chmod what evod did not create):
//! - the socket is created only where nothing exists, or replaces a stale
//!   socket of ours (a socket file of our uid that nobody listens on);
//!   anything else there (a regular file, a folder, a symlink, a live
//!   socket, another user's socket) is refused at start
//!   ([`ControlError::PathTaken`], [`ControlError::AlreadyRunning`]);
//! - missing parent folders are created 0700 and remembered; an existing
//!   folder is used as it is (never chmodded) unless others could replace
//!   the socket in it (group/other-writable without the sticky bit);
//! - at stop (and by the janitor, if the supervisor dies) only the socket
//!   and the folders this server created are removed, each only if it is
//!   still the same file (device and inode) and, for a folder, empty.
//!
//! Concurrency: a thread per connection, at most [`MAX_CONNECTIONS`] at
//! once (past it a client gets an immediate error answer); a thread that
//! has served one waits for the next ([`IDLE_THREAD`], the last one for
//! good), so a connection usually starts no thread. Threads keep the
//! code a plain sequence of blocking steps, and their number is bounded, so
//! a flood of idle clients costs at most that many small stacks; a poll
//! loop would also have to multiplex the supervisor's asynchronous replies.
//! Each connection has a whole-request deadline, counted from accept: the
//! request line must arrive within [`READ_DEADLINE`] and the answer must be
//! written within [`Request::deadline`], so a client that trickles bytes
//! only holds its own connection.
//!
//! Protocol: one JSON request line, one JSON response line, then the server
//! closes the connection. Requests are at most `MAX_REQUEST` bytes.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use evod_wire::control::{MAX_REQUEST, READ_DEADLINE, Request, Response, check_exec_inputs};
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, Stream};
use interprocess::os::unix::local_socket::ListenerOptionsExt;

/// Most control connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection thread waits for another connection before it
/// ends (the last idle one stays).
const IDLE_THREAD: Duration = Duration::from_secs(60);

/// How long dropping the server waits for answers still being written
/// (the answer to `stop` is sent just before the daemon exits).
const DRAIN: Duration = Duration::from_secs(2);

/// First pause after a failed accept (e.g. `EMFILE`: the error repeats
/// until a descriptor is freed); doubles per failure in a row up to
/// [`ACCEPT_BACKOFF_MAX`], so the accepting thread never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The accepting thread's pause after failed accepts, and its logging
/// (once per burst of failures).
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
    pause: Duration,
}

impl AcceptBackoff {
    /// A failed accept: how long to pause, and whether it is the first of
    /// a burst (the one to log).
    fn on_error(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.pause = if self.pause.is_zero() {
            ACCEPT_BACKOFF
        } else {
            crate::policy::doubled(self.pause, ACCEPT_BACKOFF_MAX)
        };
        (self.pause, self.failures == 1)
    }

    /// A connection accepted: the number of failures of the burst it ends,
    /// if any.
    fn on_accept(&mut self) -> Option<u64> {
        let failed = std::mem::take(&mut self.failures);
        self.pause = Duration::ZERO;
        (failed > 0).then_some(failed)
    }
}

/// Requests handed to the supervisor whose answer is not written yet.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn begin(self: &Arc<Self>) -> PendingGuard {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        PendingGuard(Arc::clone(self))
    }

    /// Waits up to `within` for every answer to be written.
    fn drain(&self, within: Duration) {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.done.wait_timeout_while(count, within, |n| *n > 0);
    }
}

/// One pending answer, until dropped.
struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count -= 1;
        self.0.done.notify_all();
    }
}

/// A request delivered to the supervisor's event loop, with its reply slot.
/// The loop may answer later (after a worker answered); the connection
/// waits up to the request's deadline, then tells the client it timed out
/// (a late reply is dropped).
#[derive(Debug)]
pub struct Incoming {
    /// The request.
    pub request: Request,
    /// Where the event loop sends the response.
    pub reply: mpsc::Sender<Response>,
}

/// Errors of the runtime folder and control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The runtime folder is unsafe or unusable.
    #[error("runtime folder {path}: {problem}")]
    RuntimeDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Something that is not a stale socket of ours is at the socket path.
    #[error(
        "control socket {path}: {what} is already there; evod only replaces a stale socket of its own (choose another --control-socket)"
    )]
    PathTaken {
        /// The socket path.
        path: PathBuf,
        /// What is there, in words ("a regular file").
        what: String,
    },
    /// Another daemon answers on the socket.
    #[error("another evod daemon is already running on {0}")]
    AlreadyRunning(PathBuf),
    /// Binding or another socket operation failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ControlError {
    /// Whether the error is the user's choice of path (exit 2 in `evod`),
    /// rather than the system failing.
    pub fn is_bad_path(&self) -> bool {
        matches!(
            self,
            ControlError::PathTaken { .. }
                | ControlError::AlreadyRunning(_)
                | ControlError::RuntimeDir { .. }
        )
    }
}

/// A file or folder and its (device, inode), to remove it only if it is
/// still the same one.
pub type Identity = (PathBuf, (u64, u64));

/// What a [`ControlServer`] created and will remove: the socket, then the
/// folders, deepest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The socket.
    pub socket: Identity,
    /// The folders created for it, deepest first.
    pub dirs: Vec<Identity>,
}

impl Created {
    /// Removes the socket and then the folders, each only if it is still
    /// the same file and (folders) empty.
    pub fn remove(&self) {
        let (path, id) = &self.socket;
        evod_store::remove_if_same(path, *id);
        remove_dirs(&self.dirs);
    }
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// Removes each folder that is still the same and empty, in order.
fn remove_dirs(dirs: &[Identity]) {
    for (dir, id) in dirs {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() && identity(&meta) == *id => {
                // Fails (harmlessly) unless empty.
                let _ = std::fs::remove_dir(dir);
            }
            _ => {}
        }
    }
}

/// What is at the socket path, in words.
fn describe(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a named pipe"
    } else {
        "a device file"
    }
}

/// What [`check_socket_path`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPath {
    /// Nothing is there.
    Free,
    /// A socket of ours nobody listens on, with its (device, inode): it may
    /// be replaced.
    Stale((u64, u64)),
}

/// Checks the socket path without changing anything: free, or a stale
/// socket of ours; anything else is an error naming what is there.
pub fn check_socket_path(path: &Path) -> Result<SocketPath, ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SocketPath::Free),
        Err(source) => {
            return Err(ControlError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let taken = |what: String| ControlError::PathTaken {
        path: path.to_owned(),
        what,
    };
    if !meta.file_type().is_socket() {
        return Err(taken(describe(&meta).into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(taken(format!(
            "a socket of uid {} (we are uid {uid})",
            meta.uid()
        )));
    }
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    match Stream::connect(name) {
        Ok(_) => Err(ControlError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Ok(SocketPath::Stale(identity(&meta)))
        }
        Err(e) => Err(taken(format!("a socket we cannot connect to ({e})"))),
    }
}

/// Makes `dir` (the socket's folder) usable: creates it and any missing
/// parent 0700, and returns the folders it created, deepest first. An
/// existing folder is not changed; it is refused if it is not a real
/// folder, or if others could replace the socket in it.
pub fn prepare_runtime_dir(dir: &Path) -> Result<Vec<Identity>, ControlError> {
    let bad = |path: &Path, problem: String| ControlError::RuntimeDir {
        path: path.to_owned(),
        problem,
    };
    // The missing folders, outermost last.
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::symlink_metadata(at) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(at.to_owned());
                match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(parent) => at = parent,
                    None => break,
                }
            }
            Err(e) => return Err(bad(at, e.to_string())),
        }
    }
    let mut created = Vec::new();
    for path in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {
                let meta = std::fs::symlink_metadata(path).map_err(|e| bad(path, e.to_string()));
                match meta {
                    Ok(meta) => created.push((path.clone(), identity(&meta))),
                    Err(e) => {
                        created.reverse();
                        remove_dirs(&created);
                        return Err(e);
                    }
                }
            }
            // Someone else made it meanwhile: not ours.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                created.reverse();
                remove_dirs(&created);
                return Err(bad(path, format!("cannot create: {e}")));
            }
        }
    }
    created.reverse();
    let fail = |e: ControlError| {
        remove_dirs(&created);
        Err(e)
    };
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) => return fail(bad(dir, e.to_string())),
    };
    if !meta.is_dir() {
        return fail(bad(
            dir,
            format!("not a folder ({} is in the way)", describe(&meta)),
        ));
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return fail(bad(
            dir,
            format!(
                "writable by others without the sticky bit (mode {:o}): another user could replace the socket",
                mode & 0o7777
            ),
        ));
    }
    Ok(created)
}

/// The listening side, owned by the supervisor.
pub struct ControlServer {
    path: PathBuf,
    created: Created,
    pending: Arc<Pending>,
    /// The connection threads (counted by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pool: Arc<Pool>,
}

impl ControlServer {
    /// Binds `path` and serves it: an accepting thread, and a thread per
    /// connection (reused: see [`Pool`]) that forwards its request to
    /// `events` (wrapped by `wrap`) and writes back the reply.
    pub fn start<E: Send + 'static>(
        path: &Path,
        events: mpsc::Sender<E>,
        wrap: fn(Incoming) -> E,
    ) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        let found = check_socket_path(path)?;
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dirs = prepare_runtime_dir(parent)?;
        let undo = |e: ControlError| {
            remove_dirs(&dirs);
            e
        };
        if let SocketPath::Stale(id) = found {
            // A socket left by a SIGKILLed daemon, still the one checked.
            evod_store::remove_if_same(path, id);
        }
        let name = path
            .to_fs_name::<GenericFilePath>()
            .map_err(io)
            .map_err(undo)?;
        let mut listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            .create_sync()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    ControlError::PathTaken {
                        path: path.to_owned(),
                        what: "something created meanwhile".into(),
                    }
                } else {
                    io(e)
                }
            })
            .map_err(undo)?;
        listener.do_not_reclaim_name_on_drop();
        let meta = std::fs::symlink_metadata(path).map_err(io).map_err(undo)?;
        let created = Created {
            socket: (path.to_owned(), identity(&meta)),
            dirs,
        };
        let my_uid = nix::unistd::geteuid().as_raw();
        let open = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(Pending::default());
        let counted = Arc::clone(&pending);
        let (tx, rx) = mpsc::channel();
        let pool = Arc::new(Pool {
            tx,
            rx: Mutex::new(rx),
            idle: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        });
        let threads = Arc::clone(&pool);
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let shared = Shared {
                    my_uid,
                    open,
                    pending: counted,
                    events,
                    wrap,
                    pool: threads,
                };
                let mut backoff = AcceptBackoff::default();
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Some(failed) = backoff.on_accept() {
                                tracing::info!(
                                    "control socket: accepting again after {failed} failed accepts"
                                );
                            }
                            accept(stream, &shared);
                        }
                        Err(e) => {
                            let (pause, first) = backoff.on_error();
                            if first {
                                tracing::warn!(
                                    "control socket: accept failed: {e} (retrying with a backoff; said once per burst)"
                                );
                            }
                            std::thread::sleep(pause);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            created.remove();
            return Err(io(e));
        }
        Ok(ControlServer {
            path: path.to_owned(),
            created,
            pending,
            pool,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this server created (the socket and folders), for the janitor.
    pub fn created(&self) -> &Created {
        &self.created
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.created.remove();
        // Let the answers already given (e.g. to `stop`) reach their
        // clients before the process exits.
        self.pending.drain(DRAIN);
    }
}

/// What every connection thread shares.
struct Shared<E> {
    my_uid: u32,
    open: Arc<AtomicUsize>,
    pending: Arc<Pending>,
    events: mpsc::Sender<E>,
    wrap: fn(Incoming) -> E,
    pool: Arc<Pool>,
}

impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Shared {
            my_uid: self.my_uid,
            open: Arc::clone(&self.open),
            pending: Arc::clone(&self.pending),
            events: self.events.clone(),
            wrap: self.wrap,
            pool: Arc::clone(&self.pool),
        }
    }
}

/// The peer's effective uid (`SO_PEERCRED`). Read directly rather than
/// through `interprocess`' `peer_creds`, which fails for a peer in another
/// PID namespace (the kernel reports its pid as 0), e.g. `evod status` run
/// from the host against a daemon that is PID 1 in a container.
fn peer_uid(stream: &Stream) -> std::io::Result<u32> {
    use std::os::fd::AsFd;
    #[allow(unreachable_patterns)]
    let fd = match stream {
        Stream::UdSocket(s) => s.as_fd(),
        _ => return Err(std::io::Error::other("not a Unix socket")),
    };
    let creds = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(creds.uid())
}

/// Writes one response line, within `deadline`.
fn answer(stream: &Stream, response: &Response, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_send_timeout(Some(left.max(Duration::from_millis(1))));
    let mut text = serde_json::to_string(response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = (&*stream).write_all(text.as_bytes());
}

/// Hands a new connection to a connection thread, unless too many are
/// open: an idle one if there is one, else a new one.
fn accept<E: Send + 'static>(stream: Stream, shared: &Shared<E>) {
    let accepted = Instant::now();
    if shared.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.open.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("control socket: {MAX_CONNECTIONS} connections open; refused one");
        let busy = Response::error(format!(
            "the daemon is busy: {MAX_CONNECTIONS} control connections are open"
        ));
        answer(&stream, &busy, accepted + Duration::from_millis(100));
        return;
    }
    let conn = Conn {
        stream,
        accepted,
        _open: OpenGuard(Arc::clone(&shared.open)),
    };
    let pool = &shared.pool;
    // Claim an idle thread: it takes the connection off the channel.
    if pool
        .idle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        // The receiver lives in `pool` as long as the sender does.
        let _ = pool.tx.send(conn);
        return;
    }
    let shared = shared.clone();
    pool.started.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            serve(&conn.stream, conn.accepted, &shared);
            connection_thread(&shared, conn);
        });
    if let Err(e) = spawned {
        tracing::warn!("control socket: cannot start a connection thread: {e}");
    }
}

/// A connection thread after serving `done`: it waits for the next
/// connection; idle for [`IDLE_THREAD`], it ends, unless it is the last
/// idle one.
fn connection_thread<E>(shared: &Shared<E>, done: Conn) {
    let pool = &shared.pool;
    // Counted idle before its connection is closed, so that a client that
    // connects again at once finds it.
    pool.idle.fetch_add(1, Ordering::SeqCst);
    drop(done);
    let mut idle_since = Instant::now();
    loop {
        // Threads queue on the lock; each one's wait counts from when it
        // became idle, so a burst's threads end about [`IDLE_THREAD`]
        // after it.
        let next = {
            let rx = pool.rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv_timeout(IDLE_THREAD.saturating_sub(idle_since.elapsed()))
        };
        match next {
            Ok(conn) => {
                serve(&conn.stream, conn.accepted, shared);
                pool.idle.fetch_add(1, Ordering::SeqCst);
                drop(conn);
                idle_since = Instant::now();
            }
            // Leaves only if that leaves an idle thread unclaimed: a count
            // of 1 or less means every waiting thread (this one included)
            // may have a connection on its way, or it is the last one.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if pool
                    .idle
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n > 1).then(|| n - 1)
                    })
                    .is_ok()
                {
                    return;
                }
                idle_since = Instant::now();
            }
            // Cannot happen (the sender lives in the same `Pool`).
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// An accepted connection on its way to a connection thread.
struct Conn {
    stream: Stream,
    accepted: Instant,
    _open: OpenGuard,
}

/// The connection threads: a thread that has served a connection waits
/// for the next one instead of ending, so a connection is served without a
/// thread start (about 0.1 ms here, and several under load: a quarter to
/// half of a `status` call) unless more are open at once than threads wait.
struct Pool {
    tx: mpsc::Sender<Conn>,
    rx: Mutex<mpsc::Receiver<Conn>>,
    /// Threads waiting for a connection, less the connections handed to
    /// them and not taken yet: never more than the waiting threads, so a
    /// connection sent is always taken.
    idle: AtomicUsize,
    /// Connection threads started so far.
    started: AtomicUsize,
}

/// Counts an open connection until dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request line by `deadline`: `Ok(None)` if the client closed
/// the connection without sending anything.
fn read_request(stream: &Stream, deadline: Instant) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete request line within {}s",
                READ_DEADLINE.as_secs_f64()
            ));
        }
        let _ = stream.set_recv_timeout(Some(left));
        match (&*stream).read(&mut chunk) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err("request line not terminated by a newline".into()),
            Ok(n) => {
                line.extend_from_slice(&chunk[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    return String::from_utf8(line)
                        .map(Some)
                        .map_err(|_| "request line is not UTF-8".into());
                }
                if line.len() as u64 > MAX_REQUEST {
                    return Err(format!("request longer than {MAX_REQUEST} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("reading the request failed: {e}")),
        }
    }
}

/// Checks what the control thread can check itself, before the loop sees
/// the request.
fn check_request(request: &Request) -> Result<(), String> {
    if let Request::Exec { inputs } = request {
        check_exec_inputs(inputs).map_err(|e| format!("bad exec inputs: {e}"))?;
    }
    Ok(())
}

fn serve<E>(stream: &Stream, accepted: Instant, shared: &Shared<E>) {
    let my_uid = shared.my_uid;
    let read_by = accepted + READ_DEADLINE;
    match peer_uid(stream) {
        Ok(uid) if uid == my_uid => {}
        Ok(other) => {
            tracing::warn!(
                "control socket: refused a client with uid {other:?} (ours is {my_uid})"
            );
            let denied = Response::error(format!(
                "permission denied: the daemon runs as uid {my_uid}, you are uid {other}"
            ));
            answer(stream, &denied, read_by);
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    }
    let line = match read_request(stream, read_by) {
        Ok(Some(line)) => line,
        Ok(None) => return,
        Err(problem) => {
            tracing::debug!("control socket: {problem}");
            answer(stream, &Response::error(problem), read_by);
            return;
        }
    };
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(request) => request,
        Err(e) => {
            answer(
                stream,
                &Response::error(format!("bad request: {e}")),
                read_by,
            );
            return;
        }
    };
    let deadline = accepted + request.deadline();
    if let Err(problem) = check_request(&request) {
        answer(stream, &Response::error(problem), deadline);
        return;
    }
    let (tx, rx) = mpsc::channel();
    let _pending = shared.pending.begin();
    let incoming = (shared.wrap)(Incoming { request, reply: tx });
    let response = if shared.events.send(incoming).is_err() {
        Response::error("the daemon is shutting down")
    } else {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(response) => response,
            Err(mpsc::RecvTimeoutError::Timeout) => Response::error(format!(
                "the daemon did not answer within {}s",
                (deadline - accepted).as_secs_f64()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Response::error("the daemon dropped the request")
            }
        }
    };
    answer(stream, &response, deadline + Duration::from_secs(1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use evod_wire::control::{ClientError, call};
    use std::os::unix::fs::PermissionsExt;

    /// A server on `path` whose "event loop" answers every request with
    /// `ok(op name)`, on a thread.
    fn echo_server(path: &Path) -> ControlServer {
        let (tx, rx) = mpsc::channel::<Incoming>();
        std::thread::spawn(move || {
            for incoming in rx {
                let name = serde_json::to_value(&incoming.request).unwrap()["op"].clone();
                let _ = incoming.reply.send(Response::ok(name));
            }
        });
        ControlServer::start(path, tx, |i| i).unwrap()
    }

    /// Waits up to 10 s for `cond` (another thread's doing).
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn connection_threads_are_reused_and_concurrent_clients_get_their_own() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evod.sock");
        let server = echo_server(&path);
        let pool = Arc::clone(&server.pool);
        let idle = || pool.idle.load(Ordering::SeqCst);
        let started = || pool.started.load(Ordering::SeqCst);
        // One client after another: one thread serves them all.
        for _ in 0..5 {
            let v = call(&path, &Request::Status, Duration::from_secs(10)).unwrap();
            assert_eq!(v, serde_json::json!("status"));
            eventually("the thread to wait for the next connection", || idle() == 1);
        }
        assert_eq!(started(), 1);
        // Three clients at once (connected, request not sent yet): the idle
        // thread takes one, two more start.
        let clients: Vec<_> = (0..3)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        eventually("a thread per client", || started() == 3 && idle() == 0);
        let line = serde_json::to_string(&Request::Status).unwrap() + "\n";
        for mut c in &clients {
            c.write_all(line.as_bytes()).unwrap();
        }
        for c in &clients {
            let mut answer = String::new();
            std::io::BufReader::new(c).read_line(&mut answer).unwrap();
            assert!(answer.contains("status"), "{answer}");
        }
        eventually("all three waiting again", || idle() == 3);
        assert_eq!(started(), 3);
        // And the next client is served by one of them.
        call(&path, &Request::Status, Duration::from_secs(10)).unwrap();
        assert_eq!(started(), 3);
    }

    #[test]
    fn failed_accepts_back_off_and_are_logged_once_per_burst() {
        let mut b = AcceptBackoff::default();
        let burst: Vec<_> = (0..8).map(|_| b.on_error()).collect();
        assert_eq!(burst[0], (ACCEPT_BACKOFF, true));
        assert!(burst[1..].iter().all(|&(_, first)| !first));
        assert!(burst.windows(2).all(|w| w[1].0 >= w[0].0));
        assert_eq!(burst[7].0, ACCEPT_BACKOFF_MAX);
        assert_eq!(b.on_accept(), Some(8));
        assert_eq!(b.on_accept(), None);
        // A new burst starts over, and is logged again.
        assert_eq!(b.on_error(), (ACCEPT_BACKOFF, true));
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("v");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let file = shared.join("important.txt");
        std::fs::write(&file, "data\n").unwrap();
        let (tx, _rx) = mpsc::channel::<Incoming>();
        let err = ControlServer::start(&file, tx, |i| i).err().unwrap();
        assert!(matches!(err, ControlError::PathTaken { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("important.txt") && text.contains("a regular file"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data\n");
        let mode = std::fs::metadata(&shared).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
    }

    #[test]
    fn a_folder_at_the_socket_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_socket_path(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a folder"), "{err}");
    }

    #[test]
    fn only_created_folders_are_removed_and_an_existing_one_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("v");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // In an existing folder: used as it is, kept at stop.
        let path = shared.join("evod.sock");
        let server = echo_server(&path);
        assert!(server.created().dirs.is_empty());
        assert_eq!(std::fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
        drop(server);
        assert!(!path.exists() && shared.is_dir());
        // Two missing levels: both created 0700, both removed.
        let path = shared.join("a").join("b").join("evod.sock");
        let server = echo_server(&path);
        let created: Vec<_> = server.created().dirs.iter().map(|d| d.0.clone()).collect();
        assert_eq!(created, vec![shared.join("a/b"), shared.join("a")]);
        assert_eq!(
            std::fs::metadata(shared.join("a")).unwrap().mode() & 0o777,
            0o700
        );
        drop(server);
        assert!(!shared.join("a").exists() && shared.is_dir());
        // A group-writable folder without the sticky bit is refused.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (tx, _rx) = mpsc::channel::<Incoming>();
        let err = ControlServer::start(&shared.join("evod.sock"), tx, |i| i)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sticky"), "{err}");
    }

    #[test]
    fn a_stale_socket_of_ours_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(matches!(check_socket_path(&path), Ok(SocketPath::Stale(_))));
        let _server = echo_server(&path);
        assert_eq!(
            call(&path, &Request::Status, Duration::from_secs(5)).unwrap(),
            serde_json::json!("status")
        );
    }

    #[test]
    fn a_slow_client_holds_only_its_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let _server = echo_server(&path);
        // A client that trickles one byte every 200 ms and never ends its line.
        let slow_path = path.clone();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let slow = std::thread::spawn(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&slow_path).unwrap();
            for b in br#"{"op":"status"}"#.iter().cycle() {
                if s.write_all(&[*b]).is_err()
                    || done_rx.recv_timeout(Duration::from_millis(200)).is_ok()
                {
                    break;
                }
            }
        });
        for request in [
            Request::Status,
            Request::Exec {
                inputs: vec![0.5; 4],
            },
            Request::Stop,
        ] {
            let started = Instant::now();
            call(&path, &request, Duration::from_secs(5)).unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
        done_tx.send(()).unwrap();
        slow.join().unwrap();
    }

    #[test]
    fn exec_inputs_are_checked_by_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let _server = echo_server(&path);
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"op\":\"exec\",\"inputs\":[1e39]}\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let reply: Response = serde_json::from_str(&reply).unwrap();
        let error = reply.error.unwrap();
        assert!(!reply.ok && error.contains("not a finite f32"), "{error}");
        let err = call(
            &path,
            &Request::Exec { inputs: vec![] },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no input values"), "{err}");
    }

    #[test]
    fn server_answers_checks_permissions_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("rt");
        let path = runtime.join("control.sock");
        let (tx, rx) = mpsc::channel::<Incoming>();
        let server = ControlServer::start(&path, tx, |i| i).unwrap();
        let answer = std::thread::spawn(move || {
            let incoming = rx.recv().unwrap();
            assert_eq!(incoming.request, Request::Stop);
            incoming.reply.send(Response::ok("stopping")).unwrap();
            let incoming = rx.recv().unwrap();
            incoming
                .reply
                .send(Response::error("no such generation"))
                .unwrap();
        });
        assert_eq!(
            call(&path, &Request::Stop, Duration::from_secs(5)).unwrap(),
            serde_json::json!("stopping")
        );
        let err = call(
            &path,
            &Request::Rollback { to: Some(9) },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Daemon(ref m) if m == "no such generation"));
        answer.join().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&runtime), 0o700);
        assert_eq!(mode(&path), 0o600);
        // A second server on the same socket sees the first one.
        let (tx2, _rx2) = mpsc::channel::<Incoming>();
        assert!(matches!(
            ControlServer::start(&path, tx2, |i| i),
            Err(ControlError::AlreadyRunning(_))
        ));
        assert!(path.exists(), "the live daemon's socket was removed");
        drop(server);
        assert!(!runtime.exists(), "runtime folder left behind");
        let err = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ClientError::NoDaemon { .. }), "{err}");
        assert!(err.to_string().contains("no evod daemon is running"));
    }

    #[test]
    fn a_runtime_dir_that_is_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("rt");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let err = prepare_runtime_dir(&link).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
    }
}
