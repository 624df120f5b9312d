//! The waiting protocol: spin a little, then park on a futex word in the
//! shared mapping, and wake only a side that announced it is parked.
//!
//! Waiter (one per [`WaitWord`]):
//! 1. poll the condition while spinning for [`WaitPolicy::spin`] (512 polls
//!    back to back, then a `spin_loop` hint between the next 256, then
//!    `sched_yield` between polls; the clock is read every 64 polls after
//!    the first 512 only);
//! 2. read `seq`, store `parked = 1`, full fence, poll again;
//! 3. if still nothing: `FUTEX_WAIT(seq, old seq, min(slice, deadline))`;
//!    on return clear `parked`, run the liveness check, go to 2.
//!
//! Notifier (after publishing with a `Release` store): full fence, load
//! `parked`; only if set, bump `seq` and `FUTEX_WAKE`.
//!
//! The two full fences make this Dekker-style handshake safe: either the
//! waiter's second poll sees the published index, or the notifier sees
//! `parked = 1` (both cannot miss each other). If the notifier bumps `seq`
//! between the waiter's read of `seq` and its `FUTEX_WAIT`, the kernel sees a
//! changed word and returns at once. A lost wake-up therefore never happens
//! between honest peers; a lying peer can at worst cost us one `slice`.
//!
//! One notification is deferred: a client releasing a reply only stores the
//! response head (no fence: it is on the round trip's critical path). The
//! worker waits for that head only when the response lane is full; spinning,
//! it sees the store at once; parked, it is woken by the client's next fenced
//! point: its next `send` (whose fence for the inbox serves), its next park
//! (the liveness check before every park), or the client's drop. A client
//! that releases and then goes quiet leaves a parked worker to notice at the
//! end of its `slice`.

use std::time::{Duration, Instant};

use crate::RingError;
use crate::layout::WaitWord;
use crate::sync::{Ordering, fence};
use crate::sys;

/// How a side waits for its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    /// How long to busy-poll before parking (0 = park at once). Spinning is
    /// what makes a hot round trip cost a few hundred ns instead of a futex
    /// wake-up's tens of µs. Measured from the 512th fruitless poll.
    pub spin: Duration,
    /// Longest single futex sleep; after each the peer's liveness is checked
    /// (heartbeat, epoch), so this bounds how late `PeerLost` can be noticed.
    pub slice: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy {
            spin: Duration::from_micros(5),
            slice: Duration::from_millis(50),
        }
    }
}

/// When a wait ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    /// At this instant.
    At(Instant),
    /// This long after waiting started. The clock is first read after
    /// [`PURE_POLLS`] fruitless polls (never when the peer answers within
    /// them), so the wait may last that many polls longer (~2 µs).
    After(Duration),
}

impl Deadline {
    fn resolve(self, now: Instant) -> Instant {
        match self {
            Deadline::At(t) => t,
            // A timeout too large to represent waits "forever" (a year).
            Deadline::After(d) => now
                .checked_add(d)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400)),
        }
    }
}

/// Polls back to back before anything else: no clock read (~40 ns on the
/// VMs we run on, as much as the cache-line transfer we wait for) and no
/// `spin_loop` hint (a `pause` costs another ~40 ns there). A hot peer
/// answers well within these (~1.5 µs).
const PURE_POLLS: u64 = 512;
/// After the pure polls, the clock is read every this many polls.
const CLOCK_EVERY: u64 = 64;
/// Until this many polls, a `spin_loop` hint between polls; after it,
/// `sched_yield` between polls.
const PAUSED_POLLS: u64 = PURE_POLLS + 256;

/// Polls `poll` until it yields a value, `deadline` passes (`Ok(None)`) or
/// `poll`/`alive` fails. `alive` is checked before each park and after each
/// wake-up, never on the spinning fast path. A poll that succeeds within the
/// first [`PURE_POLLS`] costs nothing else (no clock read, no `pause`).
/// The spinning part is inlined into the caller (it is the hot path of a
/// round trip); parking is not.
#[inline]
pub(crate) fn wait_for<T>(
    word: &WaitWord,
    policy: &WaitPolicy,
    deadline: Deadline,
    mut poll: impl FnMut() -> Result<Option<T>, RingError>,
    alive: impl FnMut() -> Result<(), RingError>,
) -> Result<Option<T>, RingError> {
    if let Some(v) = poll()? {
        return Ok(Some(v));
    }
    let mut resolved = None;
    if !policy.spin.is_zero() {
        let mut spin_end = None;
        let mut i: u64 = 0;
        loop {
            // Pure polling first; then a `pause` between polls; then yield
            // between polls, so a peer that shares our CPU gets to run
            // instead of waiting for preemption.
            if i >= PAUSED_POLLS {
                std::thread::yield_now();
            } else if i >= PURE_POLLS {
                std::hint::spin_loop();
            }
            if let Some(v) = poll()? {
                return Ok(Some(v));
            }
            i += 1;
            if i >= PURE_POLLS && i.is_multiple_of(CLOCK_EVERY) {
                let now = Instant::now();
                let end = *resolved.get_or_insert_with(|| deadline.resolve(now));
                if now >= end {
                    return Ok(None);
                }
                if now >= *spin_end.get_or_insert_with(|| now + policy.spin) {
                    break;
                }
            }
        }
    }
    let deadline = match resolved {
        Some(d) => d,
        None => deadline.resolve(Instant::now()),
    };
    park(word, policy, deadline, poll, alive)
}

/// The parking half of [`wait_for`] (steps 2 and 3 of the module comment).
#[inline(never)]
fn park<T>(
    word: &WaitWord,
    policy: &WaitPolicy,
    deadline: Instant,
    mut poll: impl FnMut() -> Result<Option<T>, RingError>,
    mut alive: impl FnMut() -> Result<(), RingError>,
) -> Result<Option<T>, RingError> {
    loop {
        alive()?;
        // Acquire pairs with the notifier's `seq.fetch_add(Release)` in
        // `notify`: a bump we read here is one made after its publication.
        let seen = word.seq.load(Ordering::Acquire);
        // Relaxed: ordered against the poll below by the SeqCst fence.
        word.parked.store(1, Ordering::Relaxed);
        // SYNC POINT: pairs with the fence in `notify` (Dekker): either our
        // poll below sees the peer's published index or the peer's load of
        // `parked` sees our 1.
        fence(Ordering::SeqCst);
        let got = poll();
        let now = Instant::now();
        let ready = !matches!(got, Ok(None));
        if ready || now >= deadline {
            // Relaxed: a stale 1 only costs the peer one needless wake.
            word.parked.store(0, Ordering::Relaxed);
            return got;
        }
        let sleep = policy.slice.min(deadline - now);
        let res = sys::futex_wait(&word.seq, seen, Some(sleep));
        // Relaxed: as above.
        word.parked.store(0, Ordering::Relaxed);
        res.map_err(RingError::Io)?;
        if let Some(v) = poll()? {
            return Ok(Some(v));
        }
    }
}

/// Wakes the side parked on `word`, if it said it is parked. Call after the
/// `Release` store that published what it waits for.
#[inline]
pub(crate) fn notify(word: &WaitWord) {
    // SYNC POINT: pairs with the fence in `wait_for` after `parked = 1`.
    fence(Ordering::SeqCst);
    // Relaxed: ordered by the fence above.
    if word.parked.load(Ordering::Relaxed) != 0 {
        wake_all(word);
    }
}

/// [`notify`] for a caller whose last full fence already follows the
/// `Release` store that published what the waiter waits for (e.g. right
/// after a `notify` of another word).
#[inline]
pub(crate) fn notify_fenced(word: &WaitWord) {
    // Relaxed: ordered by the caller's fence (SYNC POINT as in `notify`).
    if word.parked.load(Ordering::Relaxed) != 0 {
        wake_all(word);
    }
}

/// Bumps the futex word and wakes everyone parked on it, unconditionally.
pub(crate) fn wake_all(word: &WaitWord) {
    // Release pairs with the waiter's `seq.load(Acquire)`.
    word.seq.fetch_add(1, Ordering::Release);
    // A failing wake (EFAULT cannot happen on our own mapping) only delays
    // the waiter until its slice ends, which it tolerates by design.
    let _ = sys::futex_wake(&word.seq, i32::MAX);
}
