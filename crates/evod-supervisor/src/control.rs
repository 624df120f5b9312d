//! The control socket's server, in the supervisor (the JSON lines and the
//! client are `evod_wire::control`).
//!
//! Transport: an `interprocess` local socket (a Unix socket file), mode 0600,
//! in a runtime folder that must belong to us with no group or other access
//! (created 0700). The server checks each peer's uid (`SO_PEERCRED`) against
//! its own and closes the connection on a mismatch.
//!
//! Protocol: one JSON request line, one JSON response line, then the server
//! closes the connection. Requests are at most `MAX_REQUEST` bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use evod_wire::control::{ClientError, MAX_REQUEST, Request, Response, call};
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, Stream};
use interprocess::os::unix::local_socket::ListenerOptionsExt;

/// How long the server waits for a client to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request delivered to the supervisor's event loop, with its reply slot.
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

/// Creates (0700) or checks the folder that holds the socket: it must be a
/// real folder owned by us with no group or other permissions.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), ControlError> {
    let bad = |problem: String| ControlError::RuntimeDir {
        path: dir.to_owned(),
        problem,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(bad(format!("cannot create: {e}"))),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a folder (a symlink or file is in the way)".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(bad(format!(
            "owned by uid {}, not by us (uid {uid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| bad(format!("cannot set mode 0700: {e}")))?;
    }
    Ok(())
}

/// The listening side, owned by the supervisor.
pub struct ControlServer {
    path: PathBuf,
    inode: (u64, u64),
}

impl ControlServer {
    /// Binds `path` and serves it on a thread that forwards each request to
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
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        prepare_runtime_dir(parent)?;
        if std::fs::symlink_metadata(path).is_ok() {
            // A socket left by a SIGKILLed daemon, or a live daemon?
            // Anything but "nobody listens" means a live daemon owns it.
            if !matches!(
                call(path, &Request::Status, Duration::from_secs(2)),
                Err(ClientError::NoDaemon { .. })
            ) {
                return Err(ControlError::AlreadyRunning(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let name = path.to_fs_name::<GenericFilePath>().map_err(io)?;
        let mut listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            .create_sync()
            .map_err(io)?;
        listener.do_not_reclaim_name_on_drop();
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let my_uid = nix::unistd::geteuid().as_raw();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => serve(stream, my_uid, &events, wrap),
                        Err(e) => tracing::warn!("control socket: accept failed: {e}"),
                    }
                }
            })
            .map_err(io)?;
        Ok(ControlServer {
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the socket file, for the janitor.
    pub fn inode(&self) -> (u64, u64) {
        self.inode
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        remove_socket(&self.path, self.inode);
    }
}

/// Removes the socket at `path` if it is still ours (same device and inode),
/// then its folder if that is now empty.
pub fn remove_socket(path: &Path, inode: (u64, u64)) {
    if evod_store::remove_if_same(path, inode)
        && let Some(parent) = path.parent()
    {
        // Fails (harmlessly) unless empty.
        let _ = std::fs::remove_dir(parent);
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

fn serve<E>(stream: Stream, my_uid: u32, events: &mpsc::Sender<E>, wrap: fn(Incoming) -> E) {
    match peer_uid(&stream) {
        Ok(uid) if uid == my_uid => {}
        Ok(other) => {
            tracing::warn!(
                "control socket: refused a client with uid {other:?} (ours is {my_uid})"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    }
    let _ = stream.set_recv_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_send_timeout(Some(REQUEST_TIMEOUT));
    let mut reader = BufReader::new(&stream).take(MAX_REQUEST);
    let mut line = String::new();
    let response = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') => Response::error(format!(
            "request longer than {MAX_REQUEST} bytes or unterminated"
        )),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = mpsc::channel();
                if events.send(wrap(Incoming { request, reply: tx })).is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    rx.recv()
                        .unwrap_or_else(|_| Response::error("the daemon dropped the request"))
                }
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        },
        Err(e) => {
            tracing::debug!("control socket: reading a request failed: {e}");
            return;
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

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
