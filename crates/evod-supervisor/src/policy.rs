//! Restart policy: when to restart a child that ended, and when to give up.
//!
//! - A child that had run for at least [`RestartPolicy::min_uptime`] is
//!   restarted at once (it was healthy; this is an isolated crash).
//! - Quick successive crashes back off exponentially from
//!   [`RestartPolicy::backoff_initial`], doubling up to
//!   [`RestartPolicy::backoff_max`].
//! - Intensity/period as in Erlang/OTP: more than
//!   [`RestartPolicy::intensity`] restarts within [`RestartPolicy::period`]
//!   means the fault is not transient; the supervisor gives up (exit code
//!   `exit::GAVE_UP`), or, with [`OnGiveUp::Backoff`], keeps restarting at
//!   the maximum backoff.
//!
//! Also the overflow-safe time arithmetic every deadline uses ([`later`],
//! [`doubled`]): an operator may write `--grace-period 1000000000s`, and
//! `Instant + Duration` panics on overflow.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `at + d`, or the latest instant this platform can represent near it
/// when that overflows (a deadline that far away never comes).
pub fn later(at: Instant, d: Duration) -> Instant {
    if let Some(t) = at.checked_add(d) {
        return t;
    }
    // Halve until it fits: about 64 steps at most.
    let mut step = d;
    let mut t = at;
    while !step.is_zero() {
        match t.checked_add(step) {
            Some(next) => t = next,
            None => step /= 2,
        }
    }
    t
}

/// `d * 2`, at most `max`, without overflow.
pub fn doubled(d: Duration, max: Duration) -> Duration {
    d.saturating_mul(2).min(max)
}

/// What to do once the intensity is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnGiveUp {
    /// Stop everything and exit with code 5.
    Exit,
    /// Keep restarting, every `backoff_max`.
    Backoff,
}

/// The restart policy of one kind of child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Uptime after which a crash restarts at once and resets the backoff.
    pub min_uptime: Duration,
    /// First backoff delay after a quick crash.
    pub backoff_initial: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// Restarts allowed within `period`.
    pub intensity: u32,
    /// The sliding window for `intensity`.
    pub period: Duration,
    /// What happens past the intensity.
    pub on_give_up: OnGiveUp,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            min_uptime: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(2),
            intensity: 20,
            period: Duration::from_secs(60),
            on_give_up: OnGiveUp::Exit,
        }
    }
}

/// The policy's verdict on one ended child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay (zero: at once).
    RestartAfter(Duration),
    /// Intensity exceeded: `restarts` restarts within `period`.
    GiveUp {
        /// Restarts counted in the window, this one included.
        restarts: u32,
        /// The window.
        period: Duration,
    },
}

/// Per-child restart history.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    recent: VecDeque<Instant>,
    quick_crashes: u32,
}

impl RestartTracker {
    /// Decides what to do about a child that ran for `uptime` and ended at `now`.
    pub fn on_exit(&mut self, policy: &RestartPolicy, uptime: Duration, now: Instant) -> Decision {
        self.recent.push_back(now);
        while let Some(&first) = self.recent.front() {
            if now.duration_since(first) > policy.period {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        // Only "more than `intensity`" matters: the oldest beyond that are
        // dropped, so the history stays bounded however long the period
        // and however often the child ends (`OnGiveUp::Backoff` restarts
        // forever).
        let keep = usize::try_from(policy.intensity)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        while self.recent.len() > keep {
            self.recent.pop_front();
        }
        let delay = if uptime >= policy.min_uptime {
            self.quick_crashes = 0;
            Duration::ZERO
        } else {
            self.quick_crashes = self.quick_crashes.saturating_add(1);
            let doublings = (self.quick_crashes - 1).min(31);
            policy
                .backoff_initial
                .saturating_mul(1u32 << doublings)
                .min(policy.backoff_max)
        };
        let restarts = self.recent.len() as u32;
        if restarts > policy.intensity {
            match policy.on_give_up {
                OnGiveUp::Exit => {
                    return Decision::GiveUp {
                        restarts,
                        period: policy.period,
                    };
                }
                OnGiveUp::Backoff => return Decision::RestartAfter(policy.backoff_max),
            }
        }
        Decision::RestartAfter(delay)
    }

    /// Restarts remembered (at most the policy's intensity + 1).
    pub fn remembered(&self) -> usize {
        self.recent.len()
    }

    /// Consecutive crashes that came before `min_uptime`.
    pub fn quick_crashes(&self) -> u32 {
        self.quick_crashes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_millis(5);

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let now = Instant::now();
        let far = later(now, Duration::MAX);
        assert!(far > later(now, Duration::from_secs(1 << 40)));
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert_eq!(doubled(Duration::MAX, Duration::MAX), Duration::MAX);
        assert_eq!(
            doubled(Duration::from_secs(20), Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn the_history_stays_bounded_when_backing_off_forever() {
        let policy = RestartPolicy {
            intensity: 3,
            period: Duration::from_secs(24 * 3600),
            backoff_max: Duration::from_millis(10),
            on_give_up: OnGiveUp::Backoff,
            ..RestartPolicy::default()
        };
        let mut t = RestartTracker::default();
        let start = Instant::now();
        for k in 0..10_000u64 {
            let now = start + Duration::from_millis(10 * k);
            let decision = t.on_exit(&policy, QUICK, now);
            if k >= 3 {
                // Past the intensity: still restarting, at the cap.
                assert_eq!(decision, Decision::RestartAfter(policy.backoff_max));
            }
            assert!(t.remembered() <= 4, "{} remembered", t.remembered());
        }
        // An exit policy still gives up past the intensity.
        let exit = RestartPolicy {
            on_give_up: OnGiveUp::Exit,
            ..policy
        };
        assert!(matches!(
            t.on_exit(&exit, QUICK, start + Duration::from_secs(200)),
            Decision::GiveUp { restarts: 4, .. }
        ));
    }

    #[test]
    fn quick_crashes_back_off_exponentially_up_to_the_cap() {
        let policy = RestartPolicy {
            intensity: 1000,
            ..RestartPolicy::default()
        };
        let mut t = RestartTracker::default();
        let now = Instant::now();
        let delays: Vec<_> = (0..10)
            .map(|_| match t.on_exit(&policy, QUICK, now) {
                Decision::RestartAfter(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1280, 2000, 2000]);
        // A child that ran long enough restarts at once and resets the backoff.
        assert_eq!(
            t.on_exit(&policy, Duration::from_secs(1), now),
            Decision::RestartAfter(Duration::ZERO)
        );
        assert_eq!(t.quick_crashes(), 0);
        assert_eq!(
            t.on_exit(&policy, QUICK, now),
            Decision::RestartAfter(Duration::from_millis(10))
        );
    }

    #[test]
    fn default_absorbs_twenty_crashes_a_minute_then_gives_up() {
        let policy = RestartPolicy::default();
        let mut t = RestartTracker::default();
        let start = Instant::now();
        for i in 0..20 {
            let d = t.on_exit(
                &policy,
                Duration::from_secs(2),
                start + Duration::from_secs(i),
            );
            assert_eq!(d, Decision::RestartAfter(Duration::ZERO), "crash {i}");
        }
        assert_eq!(
            t.on_exit(
                &policy,
                Duration::from_secs(2),
                start + Duration::from_secs(20)
            ),
            Decision::GiveUp {
                restarts: 21,
                period: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn old_crashes_leave_the_window() {
        let policy = RestartPolicy {
            intensity: 2,
            period: Duration::from_secs(10),
            ..RestartPolicy::default()
        };
        let mut t = RestartTracker::default();
        let start = Instant::now();
        let long = Duration::from_secs(5);
        for i in 0..10 {
            // One crash every 6 s: never more than 2 within 10 s.
            let d = t.on_exit(&policy, long, start + Duration::from_secs(6 * i));
            assert_eq!(d, Decision::RestartAfter(Duration::ZERO));
        }
    }

    #[test]
    fn backoff_mode_keeps_restarting_at_the_cap() {
        let policy = RestartPolicy {
            intensity: 1,
            on_give_up: OnGiveUp::Backoff,
            ..RestartPolicy::default()
        };
        let mut t = RestartTracker::default();
        let now = Instant::now();
        t.on_exit(&policy, QUICK, now);
        for _ in 0..5 {
            assert_eq!(
                t.on_exit(&policy, QUICK, now),
                Decision::RestartAfter(Duration::from_secs(2))
            );
        }
    }
}
