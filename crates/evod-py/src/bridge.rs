//! `evod.Bridge`: a long-lived client of a running daemon's control socket.
//!
//! The protocol is `evod_wire::control` (one JSON request line, one response
//! line, one connection per request), so the Bridge holds no connection
//! between calls and a daemon restarted under it is simply found again at
//! the same socket. A call whose connection cannot be made (the daemon is
//! restarting) is retried every [`RETRY_EVERY`] until `reconnect_timeout`;
//! a connection that breaks after the request was sent is retried only for
//! requests that may safely run twice (`status`, `exec`), never for `stop`
//! or `rollback`. A `stop` whose answer is lost (the daemon can exit before
//! writing it) succeeds once the daemon is gone or says it is stopping.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use evod_wire::control::{self, ClientError, Request, default_socket};
use numpy::{AllowTypeChange, PyArrayLikeDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{BridgeError, DaemonError, DaemonNotRunning, InputError, ShapeError};

/// Pause between two attempts to reach a daemon that is restarting.
const RETRY_EVERY: Duration = Duration::from_millis(50);
/// Time allowed for a rollback (it stops the evolver and rewrites the model).
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one daemon's control socket.
#[pyclass(module = "evod", frozen)]
pub struct Bridge {
    socket: PathBuf,
    timeout: Duration,
    reconnect: Duration,
}

/// `seconds` as a [`Duration`], refusing negative and non-finite values.
fn duration(what: &str, seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        InputError::new_err(format!(
            "{what} must be a finite number of seconds ≥ 0, got {seconds}"
        ))
    })
}

fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::NoDaemon { .. } => DaemonNotRunning::new_err(e.to_string()),
        ClientError::Daemon(message) => DaemonError::new_err(message),
        // A socket of another user, a daemon that did not answer in time,
        // a broken connection, a bad answer: the Bridge's own failures.
        ClientError::PermissionDenied { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io { .. }
        | ClientError::Protocol { .. } => BridgeError::new_err(e.to_string()),
    }
}

impl Bridge {
    /// Sends `request`, retrying as the module documentation says; the GIL
    /// is released meanwhile.
    fn call(
        &self,
        py: Python<'_>,
        request: &Request,
        timeout: Duration,
        idempotent: bool,
    ) -> PyResult<serde_json::Value> {
        self.call_within(py, request, timeout, idempotent, self.reconnect)
    }

    /// [`Bridge::call`] retrying for at most `grace`.
    fn call_within(
        &self,
        py: Python<'_>,
        request: &Request,
        timeout: Duration,
        idempotent: bool,
        grace: Duration,
    ) -> PyResult<serde_json::Value> {
        py.detach(|| self.raw_call(request, timeout, idempotent, grace))
            .map_err(to_py)
    }

    /// The retry loop, with the GIL already released.
    fn raw_call(
        &self,
        request: &Request,
        timeout: Duration,
        idempotent: bool,
        grace: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let deadline = Instant::now() + grace;
        loop {
            match control::call(&self.socket, request, timeout) {
                Err(ClientError::NoDaemon { .. }) if Instant::now() < deadline => {}
                Err(ClientError::Io { .. } | ClientError::Protocol { .. })
                    if idempotent && Instant::now() < deadline => {}
                other => return other,
            }
            std::thread::sleep(RETRY_EVERY);
        }
    }

    /// `stop`, and whether it took when the connection broke before the
    /// answer: the daemon may exit before its answer is written, so a
    /// broken connection is a success once the daemon is gone or says it is
    /// stopping (asked until `timeout`); stop is never sent twice.
    fn raw_stop(&self) -> Result<(), ClientError> {
        let broken = match self.raw_call(&Request::Stop, self.timeout, false, self.reconnect) {
            Ok(_) => return Ok(()),
            Err(e @ (ClientError::Io { .. } | ClientError::Protocol { .. })) => e,
            Err(e) => return Err(e),
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            match control::call(&self.socket, &Request::Status, self.timeout) {
                Err(ClientError::NoDaemon { .. }) => return Ok(()),
                Ok(status) if status["stopping"] == true => return Ok(()),
                Ok(_) => return Err(broken),
                Err(_) if Instant::now() < deadline => std::thread::sleep(RETRY_EVERY),
                Err(_) => return Err(broken),
            }
        }
    }

    fn exec_row(&self, py: Python<'_>, row: &[f32]) -> PyResult<Vec<f32>> {
        if let Some((i, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(InputError::new_err(format!("input {i} is {v}, not finite")));
        }
        let value = self.call(
            py,
            &Request::Exec {
                inputs: row.to_vec(),
            },
            self.timeout,
            true,
        )?;
        serde_json::from_value::<Vec<f32>>(value["outputs"].clone()).map_err(|e| {
            BridgeError::new_err(format!(
                "control socket {}: bad exec result: {e}",
                self.socket.display()
            ))
        })
    }
}

#[pymethods]
impl Bridge {
    /// Connects to the daemon whose state folder is `dir` (its socket is
    /// `dir/.evod/control.sock`; `socket=` names another). Raises
    /// `DaemonNotRunning` at once when nothing answers there.
    #[new]
    #[pyo3(signature = (dir = None, *, socket = None, timeout = 10.0, reconnect_timeout = 10.0))]
    fn new(
        py: Python<'_>,
        dir: Option<PathBuf>,
        socket: Option<PathBuf>,
        timeout: f64,
        reconnect_timeout: f64,
    ) -> PyResult<Bridge> {
        let socket =
            socket.unwrap_or_else(|| default_socket(&dir.unwrap_or_else(|| PathBuf::from("."))));
        let bridge = Bridge {
            socket,
            timeout: duration("timeout", timeout)?,
            reconnect: duration("reconnect_timeout", reconnect_timeout)?,
        };
        // Connect now, without the reconnect grace: a Bridge to no daemon
        // is a mistake to report at once.
        bridge.call_within(py, &Request::Status, bridge.timeout, true, Duration::ZERO)?;
        Ok(bridge)
    }

    /// The control socket's path.
    #[getter]
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The daemon's state as a dict: the same facts as `evod status --json`.
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = self.call(py, &Request::Status, self.timeout, true)?;
        json_to_py(py, &value)
    }

    /// Runs the live model through a worker (`NEURAL_EXEC`): a 1-D input
    /// gives a 1-D float32 output, a 2-D input (one row per sample) a 2-D
    /// output.
    fn execute<'py>(
        &self,
        py: Python<'py>,
        inputs: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shape = inputs.shape().to_vec();
        // C order, whatever the strides.
        let data: Vec<f32> = inputs.as_array().iter().copied().collect();
        match shape.as_slice() {
            [n] if *n > 0 => {
                let out = self.exec_row(py, &data)?;
                Ok(numpy::PyArray1::from_vec(py, out).into_any())
            }
            [rows, cols] if *rows > 0 && *cols > 0 => {
                let mut all = Vec::new();
                let mut width = None;
                for row in data.chunks_exact(*cols) {
                    let out = self.exec_row(py, row)?;
                    if *width.get_or_insert(out.len()) != out.len() {
                        return Err(BridgeError::new_err(
                            "the live model changed its output size between two rows",
                        ));
                    }
                    all.extend(out);
                }
                let flat = numpy::PyArray1::from_vec(py, all);
                Ok(flat.reshape([*rows, width.unwrap_or(0)])?.into_any())
            }
            _ => Err(ShapeError::new_err(format!(
                "execute takes a non-empty 1-D input or a 2-D batch (one row per sample), got shape {shape:?}"
            ))),
        }
    }

    /// Restores an earlier generation (by default the one before the live
    /// one) and returns its number.
    #[pyo3(signature = (to = None))]
    fn rollback(&self, py: Python<'_>, to: Option<u64>) -> PyResult<u64> {
        let value = self.call(py, &Request::Rollback { to }, ROLLBACK_TIMEOUT, false)?;
        value["generation"].as_u64().ok_or_else(|| {
            BridgeError::new_err(format!(
                "control socket {}: bad rollback result: {value}",
                self.socket.display()
            ))
        })
    }

    /// Asks the daemon to stop gracefully (returns once it has accepted).
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.raw_stop()).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "evod.Bridge(socket={:?})",
            self.socket.display().to_string()
        )
    }
}

/// A JSON value as the Python object `json.loads` makes of it.
pub(crate) fn json_to_py<'py>(
    py: Python<'py>,
    value: &serde_json::Value,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?
        .call_method1("loads", (value.to_string(),))
}
