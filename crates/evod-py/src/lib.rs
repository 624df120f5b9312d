//! The native half of the `evod` Python package, imported as `evod._evod`
//! (the Python half is `python/src/evod`; the user's guide `docs/python.md`).
//!
//! - [`bridge`]: `Bridge`, a client of a running daemon's control socket
//!   (`evod_wire::control`), reconnecting after a daemon restart.
//! - [`gguf`]: `GgufFile` (a validated, mapped GGUF file: metadata, tensors
//!   as numpy arrays, zero-copy for F32) and `publish` through evod's atomic
//!   writer.
//! - [`surgery`]: the per-tensor operations behind `evod.gguf.mutate` and
//!   `evod.gguf.crossover` (evod's counter-based noise, seeded per tensor).
//! - [`policy`]: `Policy`, evod's exact MLP forward pass.
//!
//! Every error raised is a subclass of `evod.Error`, made here with
//! `create_exception!` so that `evod.X.__module__` is `evod`. The GIL is
//! released around every call that blocks or runs long (socket I/O,
//! publishing, forward passes over a batch).
//!
//! - [`serve`]: `evod.serve`, a Python fitness function as a runtime
//!   worker (the loop is `evod-serve`'s).
#![deny(missing_docs)]

use pyo3::create_exception;
use pyo3::prelude::*;

pub mod bridge;
pub mod gguf;
pub mod policy;
pub mod serve;
pub mod surgery;

create_exception!(
    evod,
    Error,
    pyo3::exceptions::PyException,
    "Base class of every error the evod package raises."
);
create_exception!(
    evod,
    DaemonNotRunning,
    Error,
    "No evod daemon answers on the control socket."
);
create_exception!(
    evod,
    DaemonError,
    Error,
    "The daemon answered the request with an error (its message is the text)."
);
create_exception!(
    evod,
    BridgeError,
    Error,
    "The connection to the daemon broke, timed out, or carried a malformed answer."
);
create_exception!(
    evod,
    GgufError,
    Error,
    "A GGUF file could not be read or written (the Rust reader's or writer's message)."
);
create_exception!(
    evod,
    ModelError,
    Error,
    "A network or model that evod's runtime refuses (architecture, parameter count, model file)."
);
create_exception!(
    evod,
    ShapeError,
    Error,
    "An array of the wrong shape, or tensors that do not match."
);
create_exception!(
    evod,
    InputError,
    Error,
    "A bad input value: a dtype that is not accepted, a non-finite number, an unknown name."
);

/// An [`evod_gguf::GgufError`] as `evod.GgufError`.
pub(crate) fn gguf_err(e: evod_gguf::GgufError) -> PyErr {
    GgufError::new_err(e.to_string())
}

/// An [`evod_runtime::RuntimeError`] as `evod.GgufError` (for a file that
/// is not valid GGUF) or `evod.ModelError`.
pub(crate) fn runtime_err(e: evod_runtime::RuntimeError) -> PyErr {
    match e {
        evod_runtime::RuntimeError::Gguf(g) => gguf_err(g),
        other => ModelError::new_err(other.to_string()),
    }
}

/// The module `evod._evod`.
#[pymodule]
fn _evod(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("DaemonNotRunning", py.get_type::<DaemonNotRunning>())?;
    m.add("DaemonError", py.get_type::<DaemonError>())?;
    m.add("BridgeError", py.get_type::<BridgeError>())?;
    m.add("GgufError", py.get_type::<GgufError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add_class::<bridge::Bridge>()?;
    m.add_class::<gguf::GgufFile>()?;
    m.add_function(wrap_pyfunction!(gguf::publish, m)?)?;
    m.add_function(wrap_pyfunction!(surgery::add_noise, m)?)?;
    m.add_function(wrap_pyfunction!(surgery::cross, m)?)?;
    m.add_class::<policy::Policy>()?;
    m.add_function(wrap_pyfunction!(serve::serve, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
