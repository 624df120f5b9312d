//! `evod.serve`: a Python fitness function as an evod runtime worker.
//!
//! The loop is `evod_serve::serve` (the worker side of the ring); this
//! module is its [`Handler`]: `EVAL` (and `EVAL_RECIPES`, whose candidates
//! the loop regenerates first) calls the user's function once per
//! candidate (`fitness(params, seed)`, or `fitness(params, seed, episodes)`)
//! or once per request with `batch=True` (`fitness(2-D params, seed)` →
//! one value per row). The loop waits with the GIL released and takes it
//! for the calls.
//!
//! The heartbeat beats between candidates (and before and after a batch
//! call), never from a timer: a function that hangs stops the beat and the
//! supervisor's watchdog kills the process within `--heartbeat-timeout`.
//! An exception answers the request with `EVAL_FAILED` carrying the
//! formatted traceback; the process serves on.

use evod_serve::{EvalRequest, Handler, ServedModel};
use numpy::{AllowTypeChange, PyArray1, PyArrayLike1, PyArrayMethods};
use pyo3::prelude::*;

use crate::Error;

/// The user's function and how to call it.
struct PyHandler {
    fitness: Py<PyAny>,
    batch: bool,
    episodes: bool,
}

/// The exception as Python prints it (type, message and traceback).
fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        let lines = tb.call_method1(
            "format_exception",
            (err.get_type(py), err.value(py), err.traceback(py)),
        )?;
        "".into_pyobject(py)?
            .call_method1("join", (lines,))?
            .extract::<String>()
    });
    formatted.unwrap_or_else(|_| err.to_string())
}

impl PyHandler {
    fn call<'py>(
        &self,
        py: Python<'py>,
        params: Bound<'py, PyAny>,
        request: &EvalRequest<'_>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let f = self.fitness.bind(py);
        if self.episodes {
            f.call1((params, request.seed, request.episodes))
        } else {
            f.call1((params, request.seed))
        }
    }

    fn eval_in(&self, py: Python<'_>, request: &EvalRequest<'_>) -> PyResult<Vec<f64>> {
        if self.batch {
            let params = PyArray1::from_slice(py, request.params)
                .reshape([request.candidates, request.n_params])?;
            request.beat();
            let out = self.call(py, params.into_any(), request)?;
            request.beat();
            let values: PyArrayLike1<'_, f64, AllowTypeChange> = out.extract().map_err(|_| {
                Error::new_err(format!(
                    "a batch fitness must return a 1-D array of {} numbers",
                    request.candidates
                ))
            })?;
            return Ok(values.as_array().to_vec());
        }
        let mut values = Vec::with_capacity(request.candidates);
        for i in 0..request.candidates {
            let params = PyArray1::from_slice(py, request.candidate(i));
            let out = self.call(py, params.into_any(), request)?;
            let value: f64 = out.extract().map_err(|_| {
                Error::new_err(format!(
                    "the fitness must return a number, it returned {}",
                    out.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                ))
            })?;
            values.push(value);
            request.beat();
        }
        Ok(values)
    }
}

impl Handler for PyHandler {
    fn eval(
        &mut self,
        _model: &ServedModel,
        request: &EvalRequest<'_>,
    ) -> Result<Vec<f64>, String> {
        Python::attach(|py| {
            self.eval_in(py, request).map_err(|e| {
                let text = format_exception(py, &e);
                // The worker's stderr is the daemon's: the user sees it there
                // too, next to the evolver's log line.
                eprintln!("evod.serve: the fitness raised:\n{text}");
                text
            })
        })
    }
}

/// Serves the ring as an evod worker with `fitness` until the supervisor
/// says `SHUTDOWN` or replaces this worker (see `evod.serve`).
#[pyfunction]
#[pyo3(signature = (fitness, batch, episodes, argv))]
pub fn serve(
    py: Python<'_>,
    fitness: Py<PyAny>,
    batch: bool,
    episodes: bool,
    argv: Vec<String>,
) -> PyResult<()> {
    let args = evod_serve::worker_args(&argv).map_err(|e| Error::new_err(e.to_string()))?;
    // SAFETY: the descriptor is the one the supervisor passed for the ring
    // (`--ring-fd`/`EVOD_RING_FD`); nothing in this process opened it and
    // `attach` takes it over at most once per process.
    let seg =
        unsafe { evod_serve::attach(args.ring_fd) }.map_err(|e| Error::new_err(e.to_string()))?;
    // SAFETY: the notice descriptor (`EVOD_NOTICE_FD`) is the link the
    // supervisor passed for crash notices; nothing in this process opened
    // it or closes it.
    unsafe { evod_serve::notice::install(args.notice_fd) }
        .map_err(|e| Error::new_err(format!("installing the crash-notice handlers: {e}")))?;
    let mut handler = PyHandler {
        fitness,
        batch,
        episodes,
    };
    let model = args.model.clone();
    py.detach(|| evod_serve::serve(&seg, model.as_deref(), &mut handler))
        .map(|_| ())
        .map_err(|e| Error::new_err(e.to_string()))
}
