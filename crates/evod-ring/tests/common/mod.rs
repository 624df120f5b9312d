//! Helpers shared by this crate's integration tests.

use std::time::{Duration, Instant};

/// Polls `cond` (every millisecond) until it holds or `within` elapsed;
/// whether it held. For shared-memory state, which has no event to block
/// on from outside the ring.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}
