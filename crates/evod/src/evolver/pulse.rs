//! What the evolver tells people while it runs: the pulse log line
//! ([`Pulse`]) and the live line on a terminal ([`LiveLine`]).
//!
//! The pulse comes every `--pulse-every` cycles but at most once per
//! `--pulse-interval` (default 10 s), so a fast task logs six lines a minute
//! rather than several a second. It carries the rejections since the
//! previous pulse, by kind (a single rejection is a `debug` event, not a
//! warning). In the human log format its numbers are rounded to four
//! significant digits; the JSON format keeps full precision.

use std::time::{Duration, Instant};

use evod_evolve::{EvolveStats, GenerationReport};

use super::RingEvaluator;

/// `x` rounded to four significant digits, printed by `{:?}` as the short
/// decimal a person reads (`1.7301689999999998` → `1.73`).
pub fn round4(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let digits = 3 - x.abs().log10().floor() as i32;
    if digits >= 0 {
        let f = 10f64.powi(digits.min(22));
        (x * f).round() / f
    } else {
        let f = 10f64.powi((-digits).min(22));
        (x / f).round() * f
    }
}

/// Rejections since the previous pulse, by kind, in words ("none",
/// "norm 10, change 2").
fn rejections(now: &EvolveStats, then: &EvolveStats) -> (u64, String) {
    let kinds = [
        (
            "non-finite",
            now.rejected_non_finite - then.rejected_non_finite,
        ),
        ("shape", now.rejected_shape - then.rejected_shape),
        ("norm", now.rejected_norm - then.rejected_norm),
        ("change", now.rejected_change - then.rejected_change),
        (
            "regression",
            now.rejected_regression - then.rejected_regression,
        ),
    ];
    let words: Vec<String> = kinds
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let total = now.rejected - then.rejected;
    (
        total,
        if words.is_empty() {
            "none".into()
        } else {
            words.join(", ")
        },
    )
}

/// When to log the pulse line, and what changed since the last one.
pub struct Pulse {
    every: u64,
    interval: Duration,
    last: Option<Instant>,
    /// The counters at the previous pulse.
    then: EvolveStats,
    /// Round numbers for people (the human log format).
    round: bool,
}

impl Pulse {
    /// A pulse every `every` cycles, at most one per `interval`.
    pub fn new(every: u64, interval: Duration, stats: &EvolveStats) -> Pulse {
        Pulse {
            every: every.max(1),
            interval,
            last: None,
            then: stats.clone(),
            round: std::env::var("EVOD_LOG_FORMAT").as_deref() != Ok("json"),
        }
    }

    /// Whether cycle `generation` (1-based count of completed generations)
    /// logs a pulse.
    pub fn due(&self, generation: u64) -> bool {
        generation.is_multiple_of(self.every)
            && self.last.is_none_or(|t| t.elapsed() >= self.interval)
    }

    /// Logs the pulse line.
    pub fn log(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        stats: &EvolveStats,
        report: &GenerationReport,
        model_generation: u64,
        rate: f64,
    ) {
        let r = |x: f64| if self.round { round4(x) } else { x };
        let alive = ring.ping_all();
        let polled = ring.stats_summary();
        let (rejected, rejected_by) = rejections(stats, &self.then);
        tracing::info!(
            generation = report.generation,
            best = r(report.best_fitness),
            mean = r(report.mean_fitness),
            evals_per_s = rate as u64,
            workers_alive = alive,
            workers = ring.segments.len(),
            restarts = ring.restarts,
            rejected,
            rejected_by = %rejected_by,
            rejected_total = stats.rejected,
            quarantined = stats.quarantined,
            publishes = stats.publishes,
            model_generation,
            worker_requests = polled.requests,
            worker_errors = polled.errors,
            worker_slowest_ms = r(polled.slowest.as_secs_f64() * 1e3),
            worker_generations = %polled.generations,
            youngest_worker_s = polled.youngest.map(|d| r(d.as_secs_f64())),
            "pulse"
        );
        self.then = stats.clone();
        self.last = Some(Instant::now());
    }
}

/// The live progress line on a terminal, redrawn at most 10 times a second
/// through [`evod_supervisor::status_line`] (which keeps log lines above it).
#[derive(Default)]
pub struct LiveLine {
    drawn: Option<Instant>,
}

impl LiveLine {
    /// Least time between two redraws.
    const EVERY: Duration = Duration::from_millis(100);

    /// Redraws the line if it is due.
    pub fn show(&mut self, text: impl FnOnce() -> String) {
        if self.drawn.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        self.drawn = Some(Instant::now());
        evod_supervisor::status_line(&text());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_rounded_for_people() {
        assert_eq!(format!("{:?}", round4(1.7301689999999998)), "1.73");
        assert_eq!(format!("{:?}", round4(500.0)), "500.0");
        assert_eq!(format!("{:?}", round4(123.456)), "123.5");
        assert_eq!(format!("{:?}", round4(-0.0012345678)), "-0.001235");
        assert_eq!(format!("{:?}", round4(123_456.0)), "123500.0");
        assert!(round4(f64::NAN).is_nan());
    }

    #[test]
    fn pulses_are_spaced_by_cycles_and_by_time() {
        let stats = EvolveStats::default();
        let mut p = Pulse::new(60, Duration::from_secs(3600), &stats);
        assert!(!p.due(59));
        assert!(p.due(60));
        p.last = Some(Instant::now());
        assert!(!p.due(120), "a second pulse within the interval");
        let mut fast = Pulse::new(1, Duration::ZERO, &stats);
        fast.last = Some(Instant::now());
        assert!(fast.due(7));
    }

    #[test]
    fn rejections_are_summarised_by_kind() {
        let then = EvolveStats::default();
        let now = EvolveStats {
            rejected: 12,
            rejected_norm: 10,
            rejected_change: 2,
            ..EvolveStats::default()
        };
        assert_eq!(rejections(&now, &then), (12, "norm 10, change 2".into()));
        assert_eq!(rejections(&now, &now), (0, "none".into()));
    }
}
