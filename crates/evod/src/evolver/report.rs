//! The evolver's counters for the supervisor's `/metrics`
//! (`Request::Report` on the control socket).
//!
//! The loop hands each cycle's counters to a [`Reporter`] (a store into a
//! mutex: the loop never waits on the socket); the reporter's thread sends
//! the newest one at most once a second. A send that fails (the supervisor
//! busy, the socket gone) is dropped: the next one carries totals, not
//! increments, so nothing is lost but freshness, which
//! `evod_evolver_report_age_seconds` shows.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use evod_evolve::Evolver;
use evod_runtime::ModelSpec;
use evod_wire::EvolverReport;

/// Most reports per second.
const EVERY: Duration = Duration::from_secs(1);
/// Deadline of one send.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The newest report not sent yet, and its thread's wake-up.
type Latest = Arc<(Mutex<Option<EvolverReport>>, Condvar)>;

/// Sends reports from a thread of its own. Without a control socket it
/// drops them.
pub(super) struct Reporter {
    latest: Option<Latest>,
}

impl Reporter {
    /// Starts the thread that reports to `socket`.
    pub(super) fn start(socket: Option<PathBuf>) -> Reporter {
        let Some(socket) = socket else {
            return Reporter { latest: None };
        };
        let latest: Latest = Arc::default();
        let shared = latest.clone();
        let started = std::thread::Builder::new()
            .name("report".into())
            .spawn(move || send_loop(&socket, &shared));
        match started {
            Ok(_) => Reporter {
                latest: Some(latest),
            },
            Err(e) => {
                tracing::warn!("cannot start the report thread ({e}); no metrics from the evolver");
                Reporter { latest: None }
            }
        }
    }

    /// Replaces the report to send next with `report`.
    pub(super) fn update(&self, report: EvolverReport) {
        if let Some(latest) = &self.latest {
            *latest.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
            latest.1.notify_one();
        }
    }
}

fn send_loop(socket: &std::path::Path, latest: &Latest) {
    loop {
        let report = {
            let mut slot = latest.0.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(r) = slot.take() {
                    break r;
                }
                slot = latest.1.wait(slot).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let sent = Instant::now();
        let request = evod_wire::Request::Report { report };
        if let Err(e) = evod_wire::call(socket, &request, SEND_TIMEOUT) {
            tracing::debug!("report to the supervisor not delivered: {e}");
        }
        // At most one a second: reports made meanwhile replace each other.
        std::thread::sleep(EVERY.saturating_sub(sent.elapsed()));
    }
}

/// The counters of `evolver` with `spec` the published model.
pub(super) fn of(evolver: &Evolver, spec: &ModelSpec) -> EvolverReport {
    let stats = evolver.stats();
    let (_, best) = evolver.best();
    EvolverReport {
        generations: stats.generations,
        evaluations: stats.evaluations,
        episodes: stats.episodes,
        publishes: stats.publishes,
        rejections: [
            ("non_finite", stats.rejected_non_finite),
            ("shape", stats.rejected_shape),
            ("norm", stats.rejected_norm),
            ("change", stats.rejected_change),
            ("regression", stats.rejected_regression),
        ]
        .into_iter()
        .map(|(r, n)| (r.to_owned(), n))
        .collect(),
        quarantined: stats.quarantined,
        best_fitness: best.is_finite().then_some(best),
        published_fitness: spec.fitness,
        published_generation: spec.generation,
        hosts: Vec::new(),
    }
}
