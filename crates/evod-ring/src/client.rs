//! The client end of a channel: sends requests (payload copied into the
//! segment from private memory) and receives the server's replies (copied
//! out). Trusted side: it keeps its own indices
//! locally and checks everything the worker publishes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lane::Producer;
use crate::layout::MsgHeader;
use crate::segment::{Segment, scratch};
use crate::sync::Ordering;
use crate::wait::{self, Deadline, WaitPolicy};
use crate::{Channel, DEFAULT_PEER_TIMEOUT, RingError, Role};

const REQ: usize = 0;
const RESP: usize = 1;

/// Timeouts and waiting of a [`Client`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// A worker heartbeat older than this while waiting is `PeerLost`.
    pub peer_timeout: Duration,
    /// Spin, then park.
    pub wait: WaitPolicy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            wait: WaitPolicy::default(),
        }
    }
}

/// A reply: its header and payload copied out of the segment (bounds
/// checked), borrowed from the client until dropped (then its slot and
/// payload area are released to the server).
#[derive(Debug)]
pub struct Reply<'c> {
    /// The validated header (copied out of the segment).
    pub header: MsgHeader,
    /// The payload, copied out of the response payload area into the
    /// client's private buffer: the worker cannot change it any more.
    pub payload: &'c [u8],
    _release: Release<'c>,
}

#[derive(Debug)]
struct Release<'c> {
    seg: &'c Segment,
    ch: Channel,
    head: &'c mut u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        *self.head += 1;
        let c = self.seg.chan(self.ch);
        // Release pairs with the server's `resp.head.load(Acquire)` before it
        // reuses this slot and payload: our reads of them happen before.
        // No notification here (it would put a fence on the round trip):
        // a server parked for room is woken at our next fenced point (see
        // `wait`).
        c.resp.head.v.store(*self.head, Ordering::Release);
    }
}

impl Reply<'_> {
    /// The request this answers.
    pub fn request_id(&self) -> u64 {
        self.header.request_id
    }

    /// The server's status (0 = ok by convention).
    pub fn status(&self) -> i32 {
        self.header.status
    }

    /// Releases the reply now (same as dropping it).
    pub fn release(self) {}
}

/// The client end of one channel (at most one per channel per process).
#[derive(Debug)]
pub struct Client<'a> {
    seg: &'a Segment,
    ch: Channel,
    cfg: ClientConfig,
    /// The epoch this client last synced the channel for (0 = never).
    epoch: u64,
    req: Producer,
    resp_head: u64,
    in_flight: Vec<u64>,
    /// Ids given up on (peer lost); their late replies are dropped.
    abandoned: VecDeque<u64>,
    id_prefix: u64,
    next_id: u64,
    /// Private buffer `send`'s `fill` writes into before the copy into the
    /// segment.
    tx: Vec<u8>,
    /// Private buffer a reply's payload is copied into.
    rx: Vec<u8>,
}

impl Drop for Client<'_> {
    fn drop(&mut self) {
        // The deferred wake of a server parked for room (see `wait`).
        wait::notify(&self.seg.chan(self.ch).resp_space);
        self.seg.release_claim(self.ch as usize);
    }
}

impl<'a> Client<'a> {
    pub(crate) fn new(seg: &'a Segment, ch: Channel, cfg: ClientConfig) -> Client<'a> {
        let c = seg.chan(ch);
        let l = seg.layout();
        // Relaxed: only a client writes it; uniqueness of the prefix among
        // successive client incarnations is all that is needed.
        let id_prefix = c.id_base.v.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0xff_ffff;
        // Acquire pairs with the Release stores of a previous client of this
        // channel (same or earlier process) and with `bump_epoch`.
        let client_epoch = c.client_epoch.v.load(Ordering::Acquire);
        let tail = c.req.tail.v.load(Ordering::Acquire);
        let head = c.req.head.v.load(Ordering::Acquire);
        let resp_head = c.resp.head.v.load(Ordering::Acquire);
        // Positions only grow by one per message; a value this large was
        // written by a scribbler, and counting on from it would overflow.
        // Start again at zero (the resync below publishes it).
        const SANE_POSITION: u64 = 1 << 62;
        let scribbled = tail >= SANE_POSITION || resp_head >= SANE_POSITION;
        let (tail, head, resp_head) = if scribbled {
            (0, 0, 0)
        } else {
            (tail, head, resp_head)
        };
        // The owner's own count where this client lives in the owner (the
        // supervisor's Control client): see `Segment::trusted_epoch`.
        let epoch = seg.trusted_epoch();
        let depth = u64::from(l.queue_depth);
        let sane = head <= tail && tail - head <= depth;
        let take_over = client_epoch == epoch && sane && !scribbled;
        let mut tail = tail;
        if take_over {
            // A previous client may have died between stamping a slot and
            // publishing `tail`: the stamps say which messages went out
            // (positions are unique, so a stamp equal to the position is
            // that message and no other).
            while tail - head < depth && seg.slot_stamp(ch, REQ, tail) == tail {
                tail += 1;
            }
        }
        let mut client = Client {
            seg,
            ch,
            cfg,
            epoch: 0,
            req: Producer::new(tail, head.min(tail), l.queue_depth, l.payload_bytes),
            resp_head,
            in_flight: Vec::new(),
            abandoned: VecDeque::new(),
            id_prefix: id_prefix.max(1) << 40,
            next_id: 0,
            tx: Vec::new(),
            rx: Vec::new(),
        };
        if take_over {
            // Take over a channel a previous client incarnation synced for
            // this epoch: the worker keeps serving it; replies to the old
            // ids are dropped as foreign.
            client.epoch = epoch;
        } else {
            client.resync(epoch);
        }
        client
    }

    /// The channel.
    pub fn channel(&self) -> Channel {
        self.ch
    }

    /// Ids of the requests sent and not yet answered.
    pub fn in_flight(&self) -> Vec<u64> {
        self.in_flight.clone()
    }

    /// The epoch this client's requests are stamped with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The largest payload a request may carry.
    pub fn max_payload(&self) -> usize {
        self.seg.layout().payload_bytes
    }

    /// Resets the channel to empty for `epoch` and tells the server it may
    /// serve it. Safe only because the previous worker has exited (the
    /// `bump_epoch` contract) and the new one does not touch the channel
    /// until it sees `client_epoch == epoch`.
    fn resync(&mut self, epoch: u64) {
        let c = self.seg.chan(self.ch);
        // Continue at our own (trusted) positions, whatever the dead worker
        // or a scribbler left in the segment.
        let at = self.req.tail;
        self.req.reset(at);
        // Whatever the dead worker (or a scribbler) left in the slots of
        // either lane must not read as a published message.
        self.seg.clear_stamps(self.ch);
        // Relaxed: published by the Release store of `client_epoch` below,
        // which the server loads with Acquire before reading these.
        c.req.tail.v.store(at, Ordering::Relaxed);
        c.req.head.v.store(at, Ordering::Relaxed);
        c.resp.head.v.store(self.resp_head, Ordering::Relaxed);
        c.resp.tail.v.store(self.resp_head, Ordering::Relaxed);
        // Release pairs with the server's Acquire load in `Server::sync`.
        c.client_epoch.v.store(epoch, Ordering::Release);
        self.epoch = epoch;
        wait::wake_all(self.seg.inbox());
    }

    /// Notices an epoch change: resyncs, and reports what was in flight.
    #[inline]
    fn check_epoch(&mut self) -> Result<(), RingError> {
        let now = self.seg.trusted_epoch();
        if now == self.epoch {
            return Ok(());
        }
        self.epoch_changed(now)
    }

    #[cold]
    fn epoch_changed(&mut self, now: u64) -> Result<(), RingError> {
        let old = self.epoch;
        self.resync(now);
        if self.in_flight.is_empty() {
            return Ok(());
        }
        Err(self.lose(format!("worker epoch changed from {old} to {now}")))
    }

    fn lose(&mut self, reason: String) -> RingError {
        let ids = std::mem::take(&mut self.in_flight);
        for &id in &ids {
            if self.abandoned.len() >= 4096 {
                self.abandoned.pop_front();
            }
            self.abandoned.push_back(id);
        }
        RingError::PeerLost {
            in_flight: ids,
            reason,
        }
    }

    /// Sends a request: reserves `payload_len` bytes in the request payload
    /// area, lets `fill` write them (into a private buffer, then copied into
    /// the segment), then publishes the header. Never blocks: `Full` if the
    /// queue or payload area has no room (receive replies, then retry).
    /// Returns the request id.
    pub fn send(
        &mut self,
        opcode: u32,
        flags: u32,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<u64, RingError> {
        self.send_with(opcode, flags, payload_len, |seg, tx, ch, off| {
            let buf = scratch(tx, payload_len);
            fill(buf);
            seg.copy_payload_in(ch, REQ, off, buf)
        })
    }

    /// [`Client::send`] of a payload the caller already holds: one copy,
    /// straight into the segment (no private buffer in between).
    pub fn send_bytes(
        &mut self,
        opcode: u32,
        flags: u32,
        payload: &[u8],
    ) -> Result<u64, RingError> {
        self.send_with(opcode, flags, payload.len(), |seg, _, ch, off| {
            seg.copy_payload_in(ch, REQ, off, payload)
        })
    }

    /// `send` with `put` copying the payload into the reserved range at the
    /// given offset (this client is the lane's only producer).
    #[inline]
    fn send_with(
        &mut self,
        opcode: u32,
        flags: u32,
        payload_len: usize,
        put: impl FnOnce(&Segment, &mut Vec<u8>, Channel, u64) -> Result<(), RingError>,
    ) -> Result<u64, RingError> {
        self.check_epoch()?;
        let l = self.seg.layout();
        if payload_len > l.payload_bytes {
            return Err(RingError::PayloadTooLarge {
                len: payload_len,
                max: l.payload_bytes,
            });
        }
        let c = self.seg.chan(self.ch);
        let depth = l.queue_depth as usize;
        let mut start = if self.in_flight.len() < depth {
            self.req.reserve(payload_len)
        } else {
            None
        };
        if start.is_none() {
            // Our copy of the server's head says there is no room: only now
            // read the head line (once per lap of the queue when the server
            // keeps up, instead of once per message).
            // Acquire pairs with the server's `req.head.store(Release)` when
            // it released a request: its reads of that slot and payload
            // happen before we overwrite them.
            let head = c.req.head.v.load(Ordering::Acquire);
            let ch = self.ch;
            self.req
                .check_head(head, || format!("{ch:?} request queue"))?;
            if self.in_flight.len() >= depth {
                return Err(RingError::Full);
            }
            start = self.req.reserve(payload_len);
        }
        let Some(start) = start else {
            return Err(RingError::Full);
        };
        let pos = self.req.tail;
        let off = self.req.offset(start);
        put(self.seg, &mut self.tx, self.ch, off)?;
        let off = self.req.commit(start, payload_len);
        self.next_id += 1;
        let id = self.id_prefix | (self.next_id & ((1 << 40) - 1));
        let h = MsgHeader {
            opcode,
            flags,
            request_id: id,
            epoch: self.epoch,
            payload_off: off,
            payload_len: payload_len as u64,
            seq: pos,
            ..MsgHeader::default()
        };
        // Publishes slot and payload: the server polls the slot's stamp.
        self.seg.write_slot(self.ch, REQ, pos, h);
        // Release pairs with the Acquire load of a client taking the channel
        // over (`Client::new`). Nobody reads it on the hot path: the line
        // stays in this CPU's cache.
        c.req.tail.v.store(self.req.tail, Ordering::Release);
        wait::notify(self.seg.inbox());
        // The fence just executed also orders our earlier reply releases
        // (head stores) before this load: the deferred wake (see `wait`).
        wait::notify_fenced(&c.resp_space);
        self.in_flight.push(id);
        Ok(id)
    }

    /// Waits until `deadline` for the next reply to one of this client's
    /// requests. Replies of older epochs or earlier client incarnations are
    /// dropped. `PeerLost` if the epoch changes or the worker heartbeat goes
    /// stale meanwhile; `Timeout` at the deadline.
    pub fn recv(&mut self, deadline: Instant) -> Result<Reply<'_>, RingError> {
        self.check_epoch()?;
        if self.in_flight.is_empty() {
            return Err(RingError::NothingInFlight);
        }
        let seg = self.seg;
        let ch = self.ch;
        loop {
            self.wait_reply(deadline)?;
            // Copied once, validated on the copy.
            let h = seg.read_slot(ch, RESP, self.resp_head);
            // Bounds checked even for a reply dropped below: a lie is
            // reported, not skipped.
            seg.copy_payload_out(ch, RESP, h.payload_off, h.payload_len, &mut self.rx)?;
            if h.epoch == self.epoch {
                if let Some(i) = self.in_flight.iter().position(|&id| id == h.request_id) {
                    self.in_flight.swap_remove(i);
                    return Ok(Reply {
                        header: h,
                        payload: &self.rx,
                        _release: Release {
                            seg,
                            ch,
                            head: &mut self.resp_head,
                        },
                    });
                }
                let foreign = h.request_id & !((1 << 40) - 1) != self.id_prefix
                    || self.abandoned.contains(&h.request_id);
                if !foreign {
                    return Err(RingError::PeerCorrupt {
                        what: format!(
                            "{ch:?} reply to request id {:#x} that is not in flight",
                            h.request_id
                        ),
                    });
                }
            }
            // Stale or foreign: drop it and look further.
            self.resp_head += 1;
            let c = seg.chan(ch);
            // Release: as in `Release::drop` (and, as there, no wake here).
            c.resp.head.v.store(self.resp_head, Ordering::Release);
        }
    }

    /// Waits until the slot at `resp_head` holds a published reply (its
    /// stamp: one word of one cache line is all the spinning reads).
    /// `PeerLost` if the epoch changes or the worker heartbeat goes stale
    /// meanwhile, `Timeout` at the deadline.
    fn wait_reply(&mut self, deadline: Instant) -> Result<(), RingError> {
        let seg = self.seg;
        let ch = self.ch;
        let pos = self.resp_head;
        let epoch = self.epoch;
        let peer_timeout = self.cfg.peer_timeout;
        let got = wait::wait_for(
            &seg.chan(ch).resp_ready,
            &self.cfg.wait,
            Deadline::At(deadline),
            || Ok(seg.slot_ready(ch, RESP, pos)?.then_some(())),
            || {
                // Before every park: the deferred wake of a server parked
                // for room in the response lane (see `wait`).
                wait::notify(&seg.chan(ch).resp_space);
                if seg.trusted_epoch() != epoch {
                    return Err(RingError::Protocol {
                        what: "epoch changed".into(),
                    });
                }
                if seg.beat_age(Role::Worker) > peer_timeout {
                    return Err(RingError::Timeout);
                }
                Ok(())
            },
        );
        match got {
            Ok(Some(())) => Ok(()),
            Ok(None) => Err(RingError::Timeout),
            // The liveness closure's markers, turned into PeerLost here.
            Err(RingError::Protocol { .. }) => {
                self.check_epoch()?;
                Err(self.lose("worker epoch changed".into()))
            }
            Err(RingError::Timeout) => {
                let age = seg.beat_age(Role::Worker);
                Err(self.lose(format!(
                    "worker heartbeat is {} ms old (timeout {} ms)",
                    age.as_millis(),
                    peer_timeout.as_millis()
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// `send` then `recv` of the one reply, by `deadline`.
    pub fn call(
        &mut self,
        opcode: u32,
        flags: u32,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
        deadline: Instant,
    ) -> Result<Reply<'_>, RingError> {
        let id = self.send(opcode, flags, payload_len, fill)?;
        let reply = self.recv(deadline)?;
        if reply.header.request_id != id {
            let other = reply.header.request_id;
            return Err(RingError::Protocol {
                what: format!(
                    "call got the reply to {other:#x} while waiting for {id:#x}: other requests in flight"
                ),
            });
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayoutConfig;

    /// A scribbler that leaves huge queue positions behind must not make a
    /// later client overflow its counters (a panic in debug builds): the
    /// client starts again from zero and resyncs.
    #[test]
    fn huge_positions_left_by_a_scribbler_are_reset() {
        let seg = Segment::create(&LayoutConfig::default()).unwrap();
        let c = seg.chan(Channel::Eval);
        c.req.tail.v.store(u64::MAX, Ordering::Relaxed);
        c.req.head.v.store(u64::MAX, Ordering::Relaxed);
        c.resp.head.v.store(u64::MAX - 1, Ordering::Relaxed);
        let mut client = seg.client(Channel::Eval).unwrap();
        assert_eq!(c.req.tail.v.load(Ordering::Relaxed), 0);
        assert_eq!(c.resp.head.v.load(Ordering::Relaxed), 0);
        // Sending works and counts from zero.
        client.send(1, 0, 8, |b| b.fill(7)).unwrap();
        assert_eq!(c.req.tail.v.load(Ordering::Relaxed), 1);
    }

    /// A worker that forges the shared epoch word does not move the
    /// owner's client: it follows the owner's private count, and the
    /// owner's next bump (from that count) is seen as the change it is.
    #[test]
    fn a_forged_epoch_word_does_not_move_the_owners_client() {
        let seg = Segment::create(&LayoutConfig::default()).unwrap();
        let mut client = seg.client(Channel::Control).unwrap();
        assert_eq!(client.epoch(), 1);
        // Relaxed: a plain overwrite, as a scribbling worker would do.
        seg.epoch_word().store(99, Ordering::Relaxed);
        let id = client.send(1, 0, 0, |_| {}).unwrap();
        assert_eq!(client.epoch(), 1, "followed the forged word");
        assert_eq!(client.in_flight(), vec![id]);
        assert_eq!(seg.bump_epoch(), 2);
        match client.recv(Instant::now() + Duration::from_secs(5)) {
            Err(RingError::PeerLost { in_flight, .. }) => assert_eq!(in_flight, vec![id]),
            other => panic!("expected PeerLost, got {other:?}"),
        }
        assert_eq!(client.epoch(), 2);
    }
}
