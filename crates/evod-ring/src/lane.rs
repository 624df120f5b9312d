//! Pure bookkeeping of one lane (no shared memory here): the producer's
//! local indices and payload allocator, and the checks applied to the index
//! the peer publishes. Kept free of I/O so it can be tested exhaustively.
//!
//! Payload allocation: each message reserves `round_up(len, 64)` contiguous
//! bytes at a monotonic position `start`; its offset in the area is
//! `start % cap`. A message that would straddle the end of the area starts
//! at the next multiple of `cap` instead. Bytes are free again once the
//! consumer's head passes the message, so the used region is
//! `[start of the oldest unconsumed message, alloc)`, at most `cap` long.
//! When the queue is empty everything is free, so a payload of `cap` bytes
//! always fits an empty lane.

use crate::RingError;
use crate::layout::{PAYLOAD_ALIGN, SLOT_EMPTY};

/// Local state of a lane's producer. The producer's own indices are kept
/// here and only published to the segment, never read back from it.
#[derive(Debug, Clone)]
pub(crate) struct Producer {
    /// Next queue position to write.
    pub tail: u64,
    /// Last validated consumer head.
    pub head_seen: u64,
    /// Next free monotonic payload position.
    alloc: u64,
    /// Monotonic payload start of the message at each slot.
    starts: Vec<u64>,
    /// Messages before this position were sent by someone else (an earlier
    /// incarnation): their payload starts are unknown, so nothing is
    /// allocated until they are consumed.
    barrier: u64,
    depth: u64,
    cap: u64,
    /// `depth - 1` and `cap - 1` for powers of two, else `NO_MASK`.
    depth_mask: u64,
    cap_mask: u64,
}

impl Producer {
    /// A producer continuing at queue position `tail`, with messages before
    /// `tail` of unknown payload placement.
    pub(crate) fn new(tail: u64, head: u64, depth: u32, cap: usize) -> Producer {
        Producer {
            tail,
            head_seen: head,
            alloc: 0,
            starts: vec![0; depth as usize],
            barrier: tail,
            depth: u64::from(depth),
            cap: cap as u64,
            depth_mask: mask_of(u64::from(depth)),
            cap_mask: mask_of(cap as u64),
        }
    }

    /// Checks the consumer's published `head` against what is possible.
    #[inline]
    pub(crate) fn check_head(
        &mut self,
        head: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), RingError> {
        if head < self.head_seen || head > self.tail {
            return Err(RingError::PeerCorrupt {
                what: format!(
                    "{} head {head} outside {}..={} (last seen..tail)",
                    what(),
                    self.head_seen,
                    self.tail
                ),
            });
        }
        self.head_seen = head;
        Ok(())
    }

    /// Reserves room for a message of `len` bytes (`len <= cap`), given the
    /// already checked consumer head. `None`: no slot or payload room now.
    #[inline]
    pub(crate) fn reserve(&self, len: usize) -> Option<u64> {
        let head = self.head_seen;
        if self.tail - head >= self.depth {
            return None;
        }
        let reserve = round_up(len as u64, PAYLOAD_ALIGN as u64);
        debug_assert!(reserve <= self.cap);
        let mut start = self.alloc;
        let off = self.offset(start);
        if off + reserve > self.cap {
            // Would straddle the end: start at the next multiple of `cap`
            // (`off > 0` here, since `reserve <= cap`).
            start += self.cap - off;
        }
        if head < self.tail {
            if head < self.barrier {
                return None;
            }
            let oldest = self.starts[self.slot(head)];
            if start + reserve > oldest + self.cap {
                return None;
            }
        }
        Some(start)
    }

    /// Records that the message at `tail` was written at `start` with `len`
    /// bytes; returns its offset inside the payload area.
    #[inline]
    pub(crate) fn commit(&mut self, start: u64, len: usize) -> u64 {
        let i = self.slot(self.tail);
        self.starts[i] = start;
        self.alloc = start + round_up(len as u64, PAYLOAD_ALIGN as u64);
        self.tail += 1;
        self.offset(start)
    }

    /// Offset inside the payload area of the monotonic position `start`
    /// (`start % cap`, without a division when `cap` is a power of two).
    #[inline]
    pub(crate) fn offset(&self, start: u64) -> u64 {
        fast_mod(start, self.cap, self.cap_mask)
    }

    #[inline]
    fn slot(&self, pos: u64) -> usize {
        fast_mod(pos, self.depth, self.depth_mask) as usize
    }

    /// Restarts the lane empty at position `at` (after an epoch change).
    pub(crate) fn reset(&mut self, at: u64) {
        self.tail = at;
        self.head_seen = at;
        self.barrier = at;
    }
}

/// Reads the stamp of the slot where the consumer expects position `pos`:
/// `Ok(true)` if the message of `pos` is published there, `Ok(false)` if the
/// slot still holds the message one lap earlier (`pos - depth`) or nothing
/// since the last reset, `PeerCorrupt` for any other value (a position from
/// the future, or from a lap that cannot be there).
#[cold]
pub(crate) fn check_stamp(
    stamp: u64,
    pos: u64,
    depth: u32,
    what: impl FnOnce() -> String,
) -> Result<bool, RingError> {
    if stamp == pos {
        return Ok(true);
    }
    let lap_before = pos.checked_sub(u64::from(depth));
    if stamp == SLOT_EMPTY || lap_before == Some(stamp) {
        return Ok(false);
    }
    Err(RingError::PeerCorrupt {
        what: format!(
            "{} slot for position {pos} holds position {stamp} (expected {pos}, {} or empty)",
            what(),
            lap_before.map_or_else(|| "nothing earlier".to_string(), |p| p.to_string()),
        ),
    })
}

/// Checks a producer's published `tail` against the consumer's `head`.
pub(crate) fn check_tail(
    head: u64,
    tail: u64,
    depth: u32,
    what: impl FnOnce() -> String,
) -> Result<(), RingError> {
    if tail < head || tail - head > u64::from(depth) {
        return Err(RingError::PeerCorrupt {
            what: format!(
                "{} tail {tail} outside {head}..={} (head..head+depth)",
                what(),
                head + u64::from(depth)
            ),
        });
    }
    Ok(())
}

/// Marks a modulus that is not a power of two (no mask is all ones: that
/// would need a modulus of 2^64).
pub(crate) const NO_MASK: u64 = u64::MAX;

/// The mask that replaces `% m` for a power of two `m`, else `NO_MASK`.
pub(crate) fn mask_of(m: u64) -> u64 {
    if m.is_power_of_two() { m - 1 } else { NO_MASK }
}

/// `x % m` (`m > 0`, `mask == mask_of(m)`): an `and` instead of a
/// division for powers of two.
#[inline]
pub(crate) fn fast_mod(x: u64, m: u64, mask: u64) -> u64 {
    if mask != NO_MASK { x & mask } else { x % m }
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exhaustive small-state model check of the producer/consumer index and
    /// payload protocol: every interleaving of sends (of every size class)
    /// and consumptions up to a bounded number of steps, checking after each
    /// step that live payload ranges never overlap, stay inside the area and
    /// that an empty lane always accepts the largest payload.
    #[test]
    fn exhaustive_small_state() {
        const DEPTH: u32 = 3;
        const CAP: usize = 256;
        let sizes = [0usize, 1, 64, 100, 192, 256];
        #[derive(Clone)]
        struct St {
            p: Producer,
            live: std::collections::VecDeque<(u64, u64)>, // (offset, reserved len)
            head: u64,
        }
        fn step(st: &St, depth: u32, cap: usize, sizes: &[usize], left: u32, count: &mut u64) {
            *count += 1;
            // invariant: live ranges inside area, pairwise disjoint
            for (i, a) in st.live.iter().enumerate() {
                assert!(a.0 + a.1 <= cap as u64, "range {a:?} outside area");
                for b in st.live.iter().skip(i + 1) {
                    assert!(
                        a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0 || a.1 == 0 || b.1 == 0,
                        "{a:?} overlaps {b:?}"
                    );
                }
            }
            if st.live.is_empty() {
                assert!(
                    st.p.reserve(cap).is_some(),
                    "empty lane refused a full-size payload"
                );
            }
            if st.live.len() as u32 == depth {
                assert!(st.p.reserve(0).is_none(), "full queue accepted a message");
            }
            if left == 0 {
                return;
            }
            for &len in sizes {
                let mut s = st.clone();
                s.p.check_head(s.head, || "test".into()).unwrap();
                if let Some(start) = s.p.reserve(len) {
                    let off = s.p.commit(start, len);
                    s.live.push_back((off, round_up(len as u64, 64)));
                    step(&s, depth, cap, sizes, left - 1, count);
                }
            }
            if !st.live.is_empty() {
                let mut s = st.clone();
                s.live.pop_front();
                s.head += 1;
                s.p.check_head(s.head, || "test".into()).unwrap();
                step(&s, depth, cap, sizes, left - 1, count);
            }
        }
        let st = St {
            p: Producer::new(0, 0, DEPTH, CAP),
            live: Default::default(),
            head: 0,
        };
        let mut count = 0;
        step(&st, DEPTH, CAP, &sizes, 8, &mut count);
        assert!(count > 50_000, "explored only {count} states");
    }

    #[test]
    fn head_checks() {
        let mut p = Producer::new(10, 8, 4, 128);
        assert!(p.check_head(7, || "x".into()).is_err());
        assert!(p.check_head(11, || "x".into()).is_err());
        p.check_head(9, || "x".into()).unwrap();
        assert!(
            p.check_head(8, || "x".into()).is_err(),
            "head went backwards"
        );
        assert!(check_tail(5, 4, 4, || "x".into()).is_err());
        assert!(check_tail(5, 10, 4, || "x".into()).is_err());
        check_tail(5, 9, 4, || "x".into()).unwrap();
        check_tail(5, 5, 4, || "x".into()).unwrap();
    }

    #[test]
    fn stamp_checks() {
        let w = || "x".to_string();
        assert!(check_stamp(10, 10, 4, w).unwrap(), "own position is ready");
        assert!(
            !check_stamp(6, 10, 4, w).unwrap(),
            "one lap earlier: not yet"
        );
        assert!(
            !check_stamp(SLOT_EMPTY, 10, 4, w).unwrap(),
            "empty: not yet"
        );
        assert!(!check_stamp(SLOT_EMPTY, 0, 4, w).unwrap());
        for bad in [2, 5, 7, 11, 14, u64::MAX - 1] {
            assert!(
                matches!(
                    check_stamp(bad, 10, 4, w),
                    Err(RingError::PeerCorrupt { .. })
                ),
                "stamp {bad} for position 10 accepted"
            );
        }
        // Before the first lap there is no earlier position to accept.
        assert!(check_stamp(0, 2, 4, w).is_err());
        assert!(check_stamp(u64::MAX - 2, 2, 4, w).is_err());
    }

    #[test]
    fn barrier_blocks_until_inherited_messages_are_consumed() {
        let mut p = Producer::new(5, 3, 8, 128);
        assert_eq!(
            p.reserve(1),
            None,
            "payload placement of messages 3 and 4 unknown"
        );
        p.check_head(5, || "x".into()).unwrap();
        assert!(p.reserve(128).is_some());
    }
}
