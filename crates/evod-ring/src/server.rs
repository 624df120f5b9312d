//! The server end (the worker): receives requests from both channels (each
//! payload copied out into a private buffer) and writes replies (copied in
//! from a private buffer). It trusts nothing either: a client's indices and
//! lengths are checked like the worker's are on the client side.

use std::time::Duration;

use crate::lane::{Producer, check_tail};
use crate::layout::{CHANNELS, MsgHeader};
use crate::segment::{Segment, scratch};
use crate::sync::Ordering;
use crate::wait::{self, Deadline, WaitPolicy};
use crate::{Channel, DEFAULT_BEAT_INTERVAL, RingError, Role, sys};

const REQ: usize = 0;
const RESP: usize = 1;

/// Intervals and waiting of a [`Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The server refreshes the worker heartbeat at least this often while
    /// in `recv` (a request that computes longer must beat on its own).
    pub beat_interval: Duration,
    /// How long `reply` waits for room in the response lane before `Full`.
    pub reply_wait: Duration,
    /// Spin, then park.
    pub wait: WaitPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            beat_interval: DEFAULT_BEAT_INTERVAL,
            reply_wait: Duration::from_secs(5),
            wait: WaitPolicy::default(),
        }
    }
}

#[derive(Debug)]
struct ChanState {
    /// The client has reset the channel for our epoch.
    synced: bool,
    req_head: u64,
    resp: Producer,
}

/// The server end of both channels (at most one per process).
#[derive(Debug)]
pub struct Server<'a> {
    seg: &'a Segment,
    cfg: ServerConfig,
    epoch: u64,
    chans: [ChanState; CHANNELS],
    next: usize,
    last_beat_ns: u64,
    /// `cfg.beat_interval` in ns.
    beat_every_ns: u64,
    /// `cfg.wait` with the slice capped at the beat interval.
    policy: WaitPolicy,
    /// Private buffer the current request's payload is copied into.
    rx: Vec<u8>,
    /// Private buffer a reply's `fill` writes into before the copy into
    /// the segment.
    tx: Vec<u8>,
}

/// A received request: its header and payload copied out of the segment
/// (bounds checked), borrowed from the server until dropped or replied to
/// (then its slot and payload area go back to the client).
#[derive(Debug)]
pub struct Request<'s> {
    /// The validated header (copied out of the segment).
    pub header: MsgHeader,
    /// The payload, copied out of the request payload area into the
    /// server's private buffer: the client cannot change it any more.
    pub payload: &'s [u8],
    ch: Channel,
    seg: &'s Segment,
    cfg: &'s ServerConfig,
    /// The server's private reply buffer.
    tx: &'s mut Vec<u8>,
    epoch: u64,
    st: &'s mut ChanState,
    /// Already released by `reply`.
    released: bool,
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.st.req_head += 1;
        // Release pairs with the client's `req.head.load(Acquire)` before it
        // reuses this slot and payload: our reads happen before.
        self.seg
            .chan(self.ch)
            .req
            .head
            .v
            .store(self.st.req_head, Ordering::Release);
    }
}

impl Request<'_> {
    /// The channel it came on.
    pub fn channel(&self) -> Channel {
        self.ch
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        self.seg.release_claim(CHANNELS);
    }
}

impl<'a> Server<'a> {
    pub(crate) fn new(seg: &'a Segment, cfg: ServerConfig) -> Server<'a> {
        let l = seg.layout();
        let chan = || ChanState {
            synced: false,
            req_head: 0,
            resp: Producer::new(0, 0, l.queue_depth, l.payload_bytes),
        };
        seg.mark_started();
        seg.beat(Role::Worker);
        let mut policy = cfg.wait;
        policy.slice = policy.slice.min(cfg.beat_interval);
        Server {
            seg,
            cfg,
            epoch: seg.epoch(),
            chans: [chan(), chan()],
            next: 0,
            last_beat_ns: sys::coarse_now_ns(),
            beat_every_ns: u64::try_from(cfg.beat_interval.as_nanos()).unwrap_or(u64::MAX),
            policy,
            rx: Vec::new(),
            tx: Vec::new(),
        }
    }

    /// The epoch this server serves (the segment's epoch at creation).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Waits up to `timeout` for a request on either channel. `Ok(None)` on
    /// timeout. `EpochChanged` if this worker has been superseded. Beats the
    /// worker heartbeat while waiting.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<(Channel, Request<'_>)>, RingError> {
        self.maybe_beat();
        let seg = self.seg;
        let epoch = self.epoch;
        let beat_every = self.beat_every_ns;
        loop {
            let got = {
                let chans = &mut self.chans;
                let next = &mut self.next;
                let last_beat = &mut self.last_beat_ns;
                wait::wait_for(
                    seg.inbox(),
                    &self.policy,
                    Deadline::After(timeout),
                    || {
                        let now = seg.epoch();
                        if now != epoch {
                            return Err(RingError::EpochChanged { mine: epoch, now });
                        }
                        for k in 0..CHANNELS {
                            let i = (*next + k) % CHANNELS;
                            if poll_channel(seg, Channel::ALL[i], epoch, &mut chans[i])? {
                                *next = (i + 1) % CHANNELS;
                                return Ok(Some(i));
                            }
                        }
                        Ok(None)
                    },
                    || {
                        let now = sys::coarse_now_ns();
                        if now.saturating_sub(*last_beat) >= beat_every {
                            seg.beat(Role::Worker);
                            *last_beat = now;
                        }
                        Ok(())
                    },
                )?
            };
            let Some(i) = got else { return Ok(None) };
            let ch = Channel::ALL[i];
            // Copied once, validated on the copy.
            let h = seg.read_slot(ch, REQ, self.chans[i].req_head);
            if h.epoch != epoch {
                // Sent for an earlier worker: nobody waits for it any more.
                let st = &mut self.chans[i];
                st.req_head += 1;
                // Release: as in `Request::drop`.
                seg.chan(ch)
                    .req
                    .head
                    .v
                    .store(st.req_head, Ordering::Release);
                continue;
            }
            seg.copy_payload_out(ch, REQ, h.payload_off, h.payload_len, &mut self.rx)?;
            return Ok(Some((
                ch,
                Request {
                    header: h,
                    payload: &self.rx,
                    ch,
                    seg,
                    cfg: &self.cfg,
                    tx: &mut self.tx,
                    epoch,
                    st: &mut self.chans[i],
                    released: false,
                },
            )));
        }
    }

    fn maybe_beat(&mut self) {
        let now = sys::coarse_now_ns();
        if now.saturating_sub(self.last_beat_ns) >= self.beat_every_ns {
            self.seg.beat(Role::Worker);
            self.last_beat_ns = now;
        }
    }

    /// Replies to `request_id` on `ch` (opcode field 0): reserves
    /// `payload_len` bytes in the response area, lets `fill` write them (into
    /// a private buffer, then copied in), then publishes the header. Waits up to
    /// `ServerConfig::reply_wait` for room (`Full` after).
    pub fn reply(
        &mut self,
        ch: Channel,
        request_id: u64,
        status: i32,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), RingError> {
        let head = Head {
            opcode: 0,
            request_id,
            status,
            release_request: false,
        };
        let seg = self.seg;
        reply_on(
            seg,
            &self.cfg,
            self.epoch,
            ch,
            &mut self.chans[ch as usize],
            &mut self.tx,
            head,
            payload_len,
            |tx, off| {
                let buf = scratch(tx, payload_len);
                fill(buf);
                seg.copy_payload_in(ch, RESP, off, buf)
            },
        )
    }
}

impl Request<'_> {
    /// Replies to this request (echoing its opcode and id) while its payload
    /// is still readable by `fill` (first argument). The request is
    /// released before the reply is published, so a client that sees the
    /// reply finds the request's slot and payload free again.
    pub fn reply(
        self,
        status: i32,
        payload_len: usize,
        fill: impl FnOnce(&[u8], &mut [u8]),
    ) -> Result<(), RingError> {
        let (seg, ch, payload) = (self.seg, self.ch, self.payload);
        self.reply_with(status, payload_len, |tx, off| {
            let buf = scratch(tx, payload_len);
            fill(payload, buf);
            seg.copy_payload_in(ch, RESP, off, buf)
        })
    }

    /// [`Request::reply`] with a payload the caller already holds (this
    /// request's own `payload`, for an echo): one copy, straight into the
    /// segment (no private buffer in between).
    pub fn reply_bytes(self, status: i32, payload: &[u8]) -> Result<(), RingError> {
        let (seg, ch) = (self.seg, self.ch);
        self.reply_with(status, payload.len(), |_, off| {
            seg.copy_payload_in(ch, RESP, off, payload)
        })
    }

    fn reply_with(
        mut self,
        status: i32,
        payload_len: usize,
        put: impl FnOnce(&mut Vec<u8>, u64) -> Result<(), RingError>,
    ) -> Result<(), RingError> {
        let head = Head {
            opcode: self.header.opcode,
            request_id: self.header.request_id,
            status,
            release_request: true,
        };
        let res = reply_on(
            self.seg,
            self.cfg,
            self.epoch,
            self.ch,
            self.st,
            self.tx,
            head,
            payload_len,
            put,
        );
        // On success `reply_on` released it; otherwise dropping `self` does.
        self.released = res.is_ok();
        res
    }
}

/// The fields of a reply header chosen by the caller.
struct Head {
    opcode: u32,
    request_id: u64,
    status: i32,
    /// Release the request being answered (after `fill`, before publishing).
    release_request: bool,
}

/// Whether the next request of one channel is published: syncs the
/// channel first if needed, then polls the stamp of its next slot.
#[inline]
fn poll_channel(
    seg: &Segment,
    ch: Channel,
    epoch: u64,
    st: &mut ChanState,
) -> Result<bool, RingError> {
    if !st.synced && !sync(seg, ch, epoch, st)? {
        return Ok(false);
    }
    seg.slot_ready(ch, REQ, st.req_head)
}

#[allow(clippy::too_many_arguments)]
fn reply_on(
    seg: &Segment,
    cfg: &ServerConfig,
    epoch: u64,
    ch: Channel,
    st: &mut ChanState,
    tx: &mut Vec<u8>,
    head: Head,
    payload_len: usize,
    put: impl FnOnce(&mut Vec<u8>, u64) -> Result<(), RingError>,
) -> Result<(), RingError> {
    if !st.synced {
        return Err(RingError::Protocol {
            what: format!("reply on the {ch:?} channel before any request on it"),
        });
    }
    let l = *seg.layout();
    if payload_len > l.payload_bytes {
        return Err(RingError::PayloadTooLarge {
            len: payload_len,
            max: l.payload_bytes,
        });
    }
    let c = seg.chan(ch);
    let what = || format!("{ch:?} response queue");
    let resp = &mut st.resp;
    // Room by our copy of the client's head first: the head line is read
    // only when that copy says the lane is full (once per lap when the
    // client keeps up).
    let start = match resp.reserve(payload_len) {
        Some(start) => start,
        None => wait::wait_for(
            &c.resp_space,
            &cfg.wait,
            Deadline::After(cfg.reply_wait),
            || {
                // Acquire pairs with the client's `resp.head.store(Release)`
                // when it released a reply: its reads happen before our
                // overwrite.
                let h = c.resp.head.v.load(Ordering::Acquire);
                resp.check_head(h, what)?;
                Ok(resp.reserve(payload_len))
            },
            || {
                let now = seg.epoch();
                if now != epoch {
                    return Err(RingError::EpochChanged { mine: epoch, now });
                }
                Ok(())
            },
        )?
        .ok_or(RingError::Full)?,
    };
    let off = st.resp.offset(start);
    // `put` copies from private memory into the range just reserved as
    // free (this server is the lane's only producer).
    put(tx, off)?;
    if head.release_request {
        st.req_head += 1;
        // Release pairs with the client's `req.head.load(Acquire)`: our
        // reads of the request (in `fill`) happen before it reuses them.
        c.req.head.v.store(st.req_head, Ordering::Release);
    }
    let pos = st.resp.tail;
    let off = st.resp.commit(start, payload_len);
    let h = MsgHeader {
        opcode: head.opcode,
        request_id: head.request_id,
        epoch,
        payload_off: off,
        payload_len: payload_len as u64,
        status: head.status,
        seq: pos,
        ..MsgHeader::default()
    };
    // Publishes slot and payload: the client polls the slot's stamp.
    seg.write_slot(ch, RESP, pos, h);
    // Release: for diagnostics and the fault injector (`Segment::scribble`);
    // the client never reads it, so the line stays in this CPU's cache.
    c.resp.tail.v.store(st.resp.tail, Ordering::Release);
    wait::notify(&c.resp_ready);
    Ok(())
}

/// Makes the channel servable once the client has reset it for `epoch`.
#[inline]
fn sync(seg: &Segment, ch: Channel, epoch: u64, st: &mut ChanState) -> Result<bool, RingError> {
    let c = seg.chan(ch);
    // Acquire pairs with the client's Release store in `Client::resync`,
    // making its index resets visible.
    if c.client_epoch.v.load(Ordering::Acquire) != epoch {
        return Ok(false);
    }
    synced(seg, ch, st)
}

/// The client has reset the channel for our epoch: check its reset and take
/// our positions from it.
#[cold]
fn synced(seg: &Segment, ch: Channel, st: &mut ChanState) -> Result<bool, RingError> {
    let c = seg.chan(ch);
    let l = seg.layout();
    // Relaxed: ordered by the Acquire above (the client wrote them before).
    let head = c.req.head.v.load(Ordering::Relaxed);
    let tail = c.req.tail.v.load(Ordering::Relaxed);
    check_tail(head, tail, l.queue_depth, || {
        format!("{ch:?} request queue after reset")
    })?;
    let resp_head = c.resp.head.v.load(Ordering::Relaxed);
    let resp_tail = c.resp.tail.v.load(Ordering::Relaxed);
    if resp_head != resp_tail {
        return Err(RingError::PeerCorrupt {
            what: format!("{ch:?} response queue not empty after reset ({resp_head}..{resp_tail})"),
        });
    }
    st.req_head = head;
    st.resp = Producer::new(resp_tail, resp_head, l.queue_depth, l.payload_bytes);
    st.resp.reset(resp_tail);
    st.synced = true;
    Ok(true)
}
