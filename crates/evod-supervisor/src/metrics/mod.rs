//! Prometheus metrics and the Kubernetes probes (`--metrics-addr`).
//!
//! [`Metrics`] is what the event loop writes: counters, gauges and a
//! histogram of the `prometheus-client` crate (atomics; a label set's
//! first use, a histogram observation and a scrape take that crate's short
//! in-memory locks, never held across I/O), the readiness verdict, and the
//! evolver's last [`EvolverReport`] with the time it came. The HTTP server
//! (`http.rs`, [`MetricsServer`]) runs on its own threads and only reads
//! them: it formats the text in memory, then writes it to the socket with
//! no lock held, so a slow or hostile client can never hold up the loop.
//!
//! Where each value comes from:
//! - restarts, rollbacks, workers running and ready, readiness, the live
//!   and good generation, the latency of the supervisor's own calls on
//!   each worker's control channel (`PING`, `LOAD`, `NEURAL_EXEC`): the
//!   supervisor's own facts;
//! - ring round trips and worker-reported errors: the workers' stats blocks
//!   (worker-written: shown, never used for a decision), summed over every
//!   incarnation of a slot;
//! - generations, evaluations, publishes, rejections by reason, best and
//!   published fitness: the evolver's last report (`Request::Report`),
//!   kept when the evolver dies, with `evod_evolver_report_age_seconds`;
//! - converged: the evolver's rest marker `state/converged`
//!   (`evod_wire::rest`), read at scrape time on the HTTP thread while the
//!   evolver runs (a resting evolver sends no reports).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use evod_wire::control::EvolverReport;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

mod http;

pub use http::{MAX_CONNECTIONS, MetricsError, MetricsServer, REQUEST_DEADLINE};

/// Labels of `evod_restarts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    role: String,
    cause: String,
}

/// An opcode label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    opcode: String,
}

/// A purpose label (`evod_worker_tokens_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurposeLabels {
    purpose: String,
}

/// Labels of `evod_worker_requests_not_sent_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotSentLabels {
    opcode: String,
    reason: String,
}

/// Buckets of `evod_worker_request_duration_seconds`: 50 µs (a PING) to
/// 13 s (a `LOAD` of a large model), ×4 each.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 4.0, 10))
}

/// Buckets of `evod_worker_recovery_seconds`: 100 µs to 3.3 s, ×2 each
/// (a warm recovery is well under a millisecond, a cold one a few).
fn recovery_histogram() -> Histogram {
    Histogram::new(exponential_buckets(100e-6, 2.0, 16))
}

/// The probes' verdict: `Ok` when a verified model is served, else why not.
pub type Readiness = Result<(), String>;

/// What the HTTP threads read.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: Registry,
    ready: Mutex<Readiness>,
}

impl Shared {
    /// `/metrics`: the registry in the Prometheus text format (0.0.4).
    pub(crate) fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// `/readyz`.
    pub(crate) fn readiness(&self) -> Readiness {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The evolver's last report and when it came, and its rest marker (a
/// collector: read at each scrape).
#[derive(Debug, Default)]
struct EvolverMetrics {
    last: Mutex<Option<(EvolverReport, Instant)>>,
    /// `state/converged`, when there is an evolver.
    marker: Option<PathBuf>,
    /// Whether the evolver runs (a stale marker may stay behind a killed one).
    running: AtomicBool,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

impl Collector for EvolverMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        if let Some(path) = &self.marker {
            // Relaxed: a flag read on its own.
            let rest = self
                .running
                .load(Ordering::Relaxed)
                .then(|| evod_wire::rest::read_path(path))
                .flatten();
            gauge(
                &mut e,
                "evod_converged",
                "1 while the evolver rests, converged (state/converged present).",
                None,
                if rest.is_some() { 1.0 } else { 0.0 },
            )?;
            if let Some(r) = rest {
                gauge(
                    &mut e,
                    "evod_converged_since_timestamp",
                    "When the resting evolver converged (Unix time).",
                    Some(&Unit::Seconds),
                    r.since_unix as f64,
                )?;
            }
        }
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some((r, at)) = last else {
            return Ok(());
        };
        gauge(
            &mut e,
            "evod_evolver_report_age",
            "Time since the evolver's last report (the evolver metrics are as of then).",
            Some(&Unit::Seconds),
            at.elapsed().as_secs_f64(),
        )?;
        counter(
            &mut e,
            "evod_generations",
            "Generations the evolver completed.",
            r.generations,
        )?;
        counter(
            &mut e,
            "evod_evaluations",
            "Candidate evaluations (training and gate).",
            r.evaluations,
        )?;
        counter(
            &mut e,
            "evod_episodes",
            "Episodes run by the evaluations.",
            r.episodes,
        )?;
        counter(&mut e, "evod_publishes", "Models published.", r.publishes)?;
        counter(
            &mut e,
            "evod_quarantined",
            "Candidates the workers could not evaluate (quarantined).",
            r.quarantined,
        )?;
        let mut family = e.encode_descriptor(
            "evod_rejections",
            "Candidates refused by validation, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &r.rejections {
            let labels = [("reason", reason.as_str())];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        if let Some(f) = r.best_fitness.filter(|f| f.is_finite()) {
            gauge(
                &mut e,
                "evod_best_fitness",
                "Best fitness the evolver has seen.",
                None,
                f,
            )?;
        }
        if let Some(f) = r.published_fitness.filter(|f| f.is_finite()) {
            gauge(
                &mut e,
                "evod_published_fitness",
                "Fitness recorded in the published model.",
                None,
                f,
            )?;
        }
        gauge(
            &mut e,
            "evod_published_generation",
            "Generation of the model the evolver last published.",
            None,
            r.published_generation as f64,
        )?;
        if !r.hosts.is_empty() {
            let mut family = e.encode_descriptor(
                "evod_host_results",
                "Candidate results each evaluator host of the run recorded (distributed runs).",
                None,
                MetricType::Counter,
            )?;
            for h in &r.hosts {
                let labels = [("host", h.host.as_str())];
                ConstCounter::new(h.tasks_done).encode(family.encode_family(&labels)?)?;
            }
            let mut family = e.encode_descriptor(
                "evod_host_last_seen",
                "Time since each evaluator host's last heartbeat, as of the evolver's report.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for h in &r.hosts {
                let labels = [("host", h.host.as_str())];
                ConstGauge::new(h.last_seen_s).encode(family.encode_family(&labels)?)?;
            }
            let mut family = e.encode_descriptor(
                "evod_host_workers",
                "Workers of each evaluator host (distributed runs).",
                None,
                MetricType::Gauge,
            )?;
            for h in &r.hosts {
                let labels = [("host", h.host.as_str())];
                ConstGauge::new(f64::from(h.workers)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The metrics the event loop writes (cheap: atomics and short in-memory
/// locks).
#[derive(Debug)]
pub struct Metrics {
    shared: Arc<Shared>,
    evolver: Arc<EvolverMetrics>,
    restarts: Family<RestartLabels, Counter>,
    rollbacks: Counter,
    rollbacks_seen: u64,
    workers_running: Gauge,
    workers_ready: Gauge,
    ready: Gauge,
    last_ready: Readiness,
    live_generation: Gauge,
    good_generation: Gauge,
    request_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    request_failures: Family<OpLabels, Counter>,
    round_trips: Family<OpLabels, Counter>,
    not_sent: Family<NotSentLabels, Counter>,
    worker_errors: Counter,
    worker_tokens: Family<PurposeLabels, Counter>,
    recovery_seconds: Histogram,
    /// Per worker slot: the epoch and the stats-block counts (per opcode,
    /// other opcodes, errors) last added.
    seen: Vec<Seen>,
}

#[derive(Debug, Default, Clone)]
struct Seen {
    epoch: u64,
    requests: Vec<u64>,
    other: u64,
    errors: u64,
    tokens: [u64; evod_ring::TOKEN_PURPOSES],
}

impl Metrics {
    /// Every metric registered, all at zero; not ready. `rest_marker`:
    /// the evolver's `state/converged` (`None`: no evolver).
    pub fn new(rest_marker: Option<PathBuf>) -> Metrics {
        let mut registry = Registry::default();
        let restarts = Family::<RestartLabels, Counter>::default();
        registry.register(
            "evod_restarts",
            "Children that ended without being asked to, by role (worker, evolver, standby) and cause (signal name, exit:N, heartbeat, unresponsive, recycled, corrupt)",
            restarts.clone(),
        );
        let rollbacks = Counter::default();
        registry.register(
            "evod_rollbacks",
            "Rollbacks of the live model (crash-loop fallback or `evod rollback`)",
            rollbacks.clone(),
        );
        let workers_running = Gauge::default();
        registry.register(
            "evod_workers_running",
            "Worker processes running",
            workers_running.clone(),
        );
        let workers_ready = Gauge::default();
        registry.register(
            "evod_workers_ready",
            "Running workers verified on the live model (loaded it and answered the canary)",
            workers_ready.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "evod_ready",
            "1 when a verified model is served (what /readyz says)",
            ready.clone(),
        );
        let live_generation = Gauge::default();
        registry.register(
            "evod_live_generation",
            "Generation of the live model file as the supervisor identified it (0: none)",
            live_generation.clone(),
        );
        let good_generation = Gauge::default();
        registry.register(
            "evod_good_generation",
            "Newest generation a worker loaded and answered the canary on (0: none)",
            good_generation.clone(),
        );
        let request_seconds =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register_with_unit(
            "evod_worker_request_duration",
            "Round trips of the supervisor's own answered requests on the workers' control channels, by opcode",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let request_failures = Family::<OpLabels, Counter>::default();
        registry.register(
            "evod_worker_request_failures",
            "The supervisor's requests on the workers' control channels that failed or timed out, by opcode",
            request_failures.clone(),
        );
        let not_sent = Family::<NotSentLabels, Counter>::default();
        registry.register(
            "evod_worker_requests_not_sent",
            "The supervisor's requests dropped before they reached a worker, by opcode and reason (expired: the client's deadline passed while it waited behind earlier calls; stale: the worker it was meant for was replaced)",
            not_sent.clone(),
        );
        let round_trips = Family::<OpLabels, Counter>::default();
        registry.register(
            "evod_ring_round_trips",
            "Requests the workers served on their rings (both channels), by opcode, as their stats blocks count them",
            round_trips.clone(),
        );
        let worker_errors = Counter::default();
        registry.register(
            "evod_worker_errors",
            "Requests the workers answered with an error status, as their stats blocks count them",
            worker_errors.clone(),
        );
        let worker_tokens = Family::<PurposeLabels, Counter>::default();
        registry.register(
            "evod_worker_tokens",
            "Tokens the workers decoded to score candidates (language-model tasks: perplexity), by purpose (train, gate), as their stats blocks count them",
            worker_tokens.clone(),
        );
        let recovery_seconds = recovery_histogram();
        registry.register_with_unit(
            "evod_worker_recovery",
            "Worker deaths until the replacement served again: from the supervisor reaping the dead worker to its replacement answering its first request while serving the live model",
            Unit::Seconds,
            recovery_seconds.clone(),
        );
        let evolver = Arc::new(EvolverMetrics {
            marker: rest_marker,
            ..EvolverMetrics::default()
        });
        registry.register_collector(Box::new(evolver.clone()));
        let last_ready: Readiness = Err("starting".into());
        Metrics {
            shared: Arc::new(Shared {
                registry,
                ready: Mutex::new(last_ready.clone()),
            }),
            evolver,
            restarts,
            rollbacks,
            rollbacks_seen: 0,
            workers_running,
            workers_ready,
            ready,
            last_ready,
            live_generation,
            good_generation,
            request_seconds,
            request_failures,
            round_trips,
            not_sent,
            worker_errors,
            worker_tokens,
            recovery_seconds,
            seen: Vec::new(),
        }
    }

    /// Serves these metrics on `addr` (see [`MetricsServer`]).
    pub fn serve(&self, addr: std::net::SocketAddr) -> Result<MetricsServer, MetricsError> {
        MetricsServer::start(addr, self.shared.clone())
    }

    /// The text a scrape of `/metrics` returns now.
    pub fn encode(&self) -> String {
        self.shared.encode()
    }

    /// A child of `role` ended unasked, of `cause` (see [`cause`]).
    pub fn restarted(&self, role: &str, cause: String) {
        self.restarts
            .get_or_create(&RestartLabels {
                role: role.to_owned(),
                cause,
            })
            .inc();
    }

    /// The supervisor's rollback count is now `total`.
    pub fn set_rollbacks(&mut self, total: u64) {
        if total > self.rollbacks_seen {
            self.rollbacks.inc_by(total - self.rollbacks_seen);
            self.rollbacks_seen = total;
        }
    }

    /// Workers running and verified.
    pub fn set_workers(&self, running: usize, ready: usize) {
        self.workers_running.set(running as i64);
        self.workers_ready.set(ready as i64);
    }

    /// The live and the good generation (`None`: none).
    pub fn set_generations(&self, live: Option<u64>, good: Option<u64>) {
        let g = |v: Option<u64>| v.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX));
        self.live_generation.set(g(live));
        self.good_generation.set(g(good));
    }

    /// The probes' verdict (published to the HTTP threads when it changes).
    pub fn set_readiness(&mut self, now: Readiness) {
        self.ready.set(i64::from(now.is_ok()));
        if now != self.last_ready {
            self.last_ready = now.clone();
            *self
                .shared
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = now;
        }
    }

    /// One of the supervisor's own requests on a worker's control channel:
    /// its round trip if answered, `None` if it failed.
    pub fn request(&self, opcode: &str, took: Option<std::time::Duration>) {
        let labels = OpLabels {
            opcode: opcode.to_owned(),
        };
        match took {
            Some(d) => self
                .request_seconds
                .get_or_create(&labels)
                .observe(d.as_secs_f64()),
            None => {
                self.request_failures.get_or_create(&labels).inc();
            }
        }
    }

    /// One of the supervisor's requests was dropped unsent, for `reason`
    /// (`expired`, `stale`).
    pub fn not_sent(&self, opcode: &str, reason: &str) {
        self.not_sent
            .get_or_create(&NotSentLabels {
                opcode: opcode.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A worker slot recovered from a death in `took` (reaped → the
    /// replacement's first answer on the live model).
    pub fn recovered(&self, took: std::time::Duration) {
        self.recovery_seconds.observe(took.as_secs_f64());
    }

    /// Adds what worker slot `slot`'s stats block (under `epoch`) counts
    /// beyond what was added before. A new epoch starts from zero (the
    /// block is reset when a slot's epoch is bumped), so call this before
    /// the bump to count a dead worker's last requests.
    pub fn worker_stats(
        &mut self,
        slot: usize,
        epoch: u64,
        stats: &evod_ring::StatsSnapshot,
        name: impl Fn(usize) -> &'static str,
    ) {
        if self.seen.len() <= slot {
            self.seen.resize(slot + 1, Seen::default());
        }
        let mut seen = std::mem::take(&mut self.seen[slot]);
        if seen.epoch != epoch {
            seen = Seen {
                epoch,
                ..Seen::default()
            };
        }
        seen.requests.resize(stats.requests_per_opcode.len(), 0);
        for (o, (&now, was)) in stats
            .requests_per_opcode
            .iter()
            .zip(seen.requests.iter_mut())
            .enumerate()
        {
            self.worker_served(name(o), now.saturating_sub(*was));
            *was = now;
        }
        self.worker_served(
            "other",
            stats.requests_other_opcodes.saturating_sub(seen.other),
        );
        seen.other = stats.requests_other_opcodes;
        self.worker_errors(stats.errors.saturating_sub(seen.errors));
        seen.errors = stats.errors;
        for (p, (&now, was)) in evod_ring::TokenPurpose::ALL
            .iter()
            .zip(stats.tokens.iter().zip(seen.tokens.iter_mut()))
        {
            let n = now.saturating_sub(*was);
            if n > 0 {
                self.worker_tokens
                    .get_or_create(&PurposeLabels {
                        purpose: p.name().to_owned(),
                    })
                    .inc_by(n);
            }
            *was = now;
        }
        self.seen[slot] = seen;
    }

    /// `n` more requests of `opcode` served by the workers.
    pub fn worker_served(&self, opcode: &str, n: u64) {
        if n > 0 {
            self.round_trips
                .get_or_create(&OpLabels {
                    opcode: opcode.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// Error replies a worker's stats block counts since the last call.
    pub fn worker_errors(&self, n: u64) {
        if n > 0 {
            self.worker_errors.inc_by(n);
        }
    }

    /// Whether the evolver runs (its rest marker counts only then).
    pub fn set_evolver_running(&self, running: bool) {
        // Relaxed: a flag read on its own.
        self.evolver.running.store(running, Ordering::Relaxed);
    }

    /// The evolver's latest report.
    pub fn evolver_report(&self, report: EvolverReport) {
        *self
            .evolver
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((report, Instant::now()));
    }

    /// The evaluator hosts of the evolver's last report (a coordinator's;
    /// empty without a broker).
    pub fn evolver_hosts(&self) -> Vec<evod_wire::HostStatus> {
        self.evolver
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(r, _)| r.hosts.clone())
            .unwrap_or_default()
    }
}

/// The `cause` label of a child's end: what the supervisor killed it for
/// (the start of its kill-cause words: `heartbeat`, `unresponsive`,
/// `recycled`, `corrupt`, `notice`: a crash notice without a death by its
/// own signal), else the signal's name or `exit:N`.
pub fn cause(reason: &crate::reap::ExitReason, kill_cause: Option<&str>) -> String {
    if let Some(words) = kill_cause {
        for (prefix, label) in [
            ("heartbeat", "heartbeat"),
            ("unresponsive", "unresponsive"),
            ("recycled", "recycled"),
            ("its control channel is corrupt", "corrupt"),
            ("crash notice", "notice"),
        ] {
            if words.starts_with(prefix) {
                return label.into();
            }
        }
        return "killed".into();
    }
    match *reason {
        crate::reap::ExitReason::Exited { code } => format!("exit:{code}"),
        crate::reap::ExitReason::Signaled { signal, .. } => {
            crate::reap::signal_name(signal).to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reap::ExitReason;

    #[test]
    fn causes_are_few_words() {
        let segv = ExitReason::Signaled {
            signal: 11,
            core_dumped: false,
        };
        assert_eq!(cause(&segv, None), "SIGSEGV");
        assert_eq!(cause(&ExitReason::Exited { code: 3 }, None), "exit:3");
        let killed = ExitReason::Signaled {
            signal: 9,
            core_dumped: false,
        };
        assert_eq!(
            cause(&killed, Some("heartbeat stalled for 5.1s")),
            "heartbeat"
        );
        assert_eq!(cause(&killed, Some("recycled: bad reply")), "recycled");
        assert_eq!(
            cause(&killed, Some("its control channel is corrupt: x")),
            "corrupt"
        );
        assert_eq!(cause(&killed, Some("something new")), "killed");
    }

    /// Tokens counted by a worker's stats block add up per purpose across
    /// snapshots and incarnations of a slot (a new epoch starts from 0).
    #[test]
    fn worker_tokens_sum_over_snapshots_and_epochs() {
        let mut m = Metrics::new(None);
        let snap = |train, gate| evod_ring::StatsSnapshot {
            tokens: [train, gate],
            ..Default::default()
        };
        let name = |_| "EVAL";
        m.worker_stats(0, 1, &snap(512, 0), name);
        m.worker_stats(0, 1, &snap(1024, 1024), name);
        m.worker_stats(1, 1, &snap(512, 0), name);
        // Slot 0 respawned: its block starts again from zero.
        m.worker_stats(0, 2, &snap(256, 0), name);
        let text = m.encode();
        assert!(
            text.contains("evod_worker_tokens_total{purpose=\"train\"} 1792"),
            "{text}"
        );
        assert!(
            text.contains("evod_worker_tokens_total{purpose=\"gate\"} 1024"),
            "{text}"
        );
    }

    #[test]
    fn the_text_names_every_metric_with_help_and_units() {
        let dir = tempfile::tempdir().unwrap();
        let marker = evod_wire::rest::marker(dir.path());
        let mut m = Metrics::new(Some(marker.clone()));
        m.restarted("worker", "SIGSEGV".into());
        m.set_rollbacks(2);
        m.set_rollbacks(2);
        m.request("PING", Some(std::time::Duration::from_micros(120)));
        m.request("LOAD", None);
        m.worker_served("EVAL", 7);
        m.recovered(std::time::Duration::from_micros(450));
        m.set_readiness(Ok(()));
        let text = m.encode();
        assert!(
            text.contains("evod_worker_recovery_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("evod_worker_recovery_seconds_bucket{le=\"0.0004\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("evod_worker_recovery_seconds_bucket{le=\"0.0008\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("evod_restarts_total{role=\"worker\",cause=\"SIGSEGV\"} 1"),
            "{text}"
        );
        assert!(text.contains("evod_rollbacks_total 2"), "{text}");
        assert!(text.contains("# HELP evod_ready "), "{text}");
        assert!(text.contains("evod_ready 1"), "{text}");
        assert!(
            text.contains("evod_worker_request_duration_seconds_count{opcode=\"PING\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("evod_worker_request_failures_total{opcode=\"LOAD\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("evod_ring_round_trips_total{opcode=\"EVAL\"} 7"),
            "{text}"
        );
        // No evolver report yet: none of its metrics.
        assert!(!text.contains("evod_generations"), "{text}");
        m.evolver_report(EvolverReport {
            generations: 5,
            rejections: vec![("norm".into(), 3)],
            best_fitness: Some(42.5),
            hosts: vec![evod_wire::HostStatus {
                host: "h1".into(),
                workers: 2,
                tasks_done: 64,
                last_seen_s: 0.5,
            }],
            ..EvolverReport::default()
        });
        assert_eq!(m.evolver_hosts()[0].host, "h1");
        let text = m.encode();
        assert!(
            text.contains("evod_host_results_total{host=\"h1\"} 64"),
            "{text}"
        );
        assert!(text.contains("evod_host_workers{host=\"h1\"} 2"), "{text}");
        assert!(text.contains("evod_generations_total 5"), "{text}");
        assert!(
            text.contains("evod_rejections_total{reason=\"norm\"} 3"),
            "{text}"
        );
        assert!(text.contains("evod_best_fitness 42.5"), "{text}");
        assert!(text.contains("evod_converged 0"), "{text}");
        // A marker counts only while the evolver runs; a FIFO is no marker.
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        let converged = evod_wire::rest::Converged {
            since_unix: 1_700_000_000,
            generation: 9,
            model_generation: 9,
            fitness: Some(500.0),
            reason: "test".into(),
        };
        evod_wire::rest::write(dir.path(), &converged).unwrap();
        assert!(m.encode().contains("evod_converged 0"));
        m.set_evolver_running(true);
        let text = m.encode();
        assert!(text.contains("evod_converged 1"), "{text}");
        assert!(
            text.contains("evod_converged_since_timestamp_seconds 1700000000"),
            "{text}"
        );
        std::fs::remove_file(&marker).unwrap();
        nix::unistd::mkfifo(&marker, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(m.encode().contains("evod_converged 0"));
        assert!(text.contains("evod_evolver_report_age_seconds "), "{text}");
        assert!(!text.contains("evod_published_fitness"), "{text}");
    }
}
