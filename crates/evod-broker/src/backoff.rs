//! Exponential backoff for a broker that is unreachable: callers retry
//! [`BrokerError::Unavailable`] with growing pauses up to a deadline, and
//! report anything else at once.

use std::time::{Duration, Instant};

use crate::error::BrokerError;

/// Doubling delays from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays `initial`, `2·initial`, … capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The next delay; each call doubles the following one up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    /// 50 ms doubling to 2 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }
}

/// Calls `op` until it succeeds, fails with an error other than
/// [`BrokerError::Unavailable`], or `deadline` passes (then the last
/// `Unavailable` is returned). Sleeps between tries by `backoff`, never
/// past the deadline; `on_retry` sees each `Unavailable` and the delay
/// chosen (to log it: a broker that is gone is reported, not hidden).
pub fn retry_unavailable<T>(
    deadline: Instant,
    backoff: &mut Backoff,
    mut on_retry: impl FnMut(&BrokerError, Duration),
    mut op: impl FnMut() -> Result<T, BrokerError>,
) -> Result<T, BrokerError> {
    loop {
        match op() {
            Err(e @ BrokerError::Unavailable { .. }) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                let delay = backoff.next_delay().min(deadline - now);
                on_retry(&e, delay);
                std::thread::sleep(delay);
            }
            other => {
                backoff.reset();
                return other;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [10, 20, 35, 35]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn retries_only_unavailable() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        let mut calls = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = retry_unavailable(
            deadline,
            &mut b,
            |_, _| {},
            || {
                calls += 1;
                if calls < 3 {
                    Err(BrokerError::Unavailable {
                        op: "test",
                        reason: "down".into(),
                    })
                } else {
                    Ok(calls)
                }
            },
        );
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: Result<(), _> = retry_unavailable(
            deadline,
            &mut b,
            |_, _| {},
            || {
                calls += 1;
                Err(BrokerError::BaseMissing { hash: 1 })
            },
        );
        assert!(matches!(r, Err(BrokerError::BaseMissing { .. })));
        assert_eq!(calls, 1);
    }
}
