//! The byte layout of a segment: `#[repr(C)]` control blocks, the message
//! header, and the offsets of every queue and payload area.
//!
//! ```text
//! offset 0      SegmentHeader   magic, layout version, sizes (written once by the owner)
//!               epoch           worker incarnation (owner writes)
//!               beats[3]        heartbeat counter + coarse timestamp per role
//!               stats           worker statistics
//!               inbox           WaitWord the worker parks on (both request queues ring it)
//!               channels[2]     ChannelCtl: client epoch, id base, req/resp LaneCtl,
//!                               resp_ready WaitWord (client parks), resp_space WaitWord (worker parks)
//! header_size   for ch in [Eval, Control], for lane in [request, response]:
//!                   slots[queue_depth] : MsgHeader (64 bytes each, one cache line)
//!                   payload[payload_bytes] (64-byte aligned)
//! total_size
//! ```
//!
//! The hot path touches one cache line per message: the slot. Its `seq`
//! field is the publication stamp (Vyukov/FastForward style): the producer
//! writes the other fields, then stores the message's queue position into
//! `seq` with `Release`; the consumer polls that one word of that one line.
//! The `tail`/`head` index lines are off the hot path: each is written only
//! by its owner, `head` is read by the producer only when its cached view of
//! it says the lane is full, and `tail` only by a client taking a channel
//! over from a previous incarnation.

use crate::sync::{AtomicU32, AtomicU64};

/// Marker for types that may live in the shared segment.
///
/// # Safety
///
/// An implementor is `#[repr(C)]`, holds no pointers or references, has no
/// padding whose content matters, and every bit pattern of its size is a valid
/// value (a peer may write anything there). Interior mutability is only
/// through atomics.
pub unsafe trait ZeroCopy: Sized + 'static {}

/// `b"EVODRING"` at offset 0 of every segment.
pub const MAGIC: [u8; 8] = *b"EVODRING";
/// Bumped whenever anything in this file changes shape or meaning.
/// Version 2: the slot's `seq` is the publication stamp (version 1 published
/// through the `tail` index). Version 4: the stats block counts the tokens
/// a language-model worker decoded, by purpose (`StatsCtl::tokens`).
pub const LAYOUT_VERSION: u32 = 4;
/// Allocation granule of payloads: tensors start 64-byte aligned.
pub const PAYLOAD_ALIGN: usize = 64;
/// Largest accepted queue depth.
pub const MAX_QUEUE_DEPTH: u32 = 1 << 16;
/// Largest accepted payload area per lane (1 GiB).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;

/// The stamp of a slot that holds no message since the lane was reset
/// (never a queue position: positions stay far below it).
pub(crate) const SLOT_EMPTY: u64 = u64::MAX;

/// Number of roles with a heartbeat.
pub(crate) const ROLES: usize = 3;
/// Number of channels per segment.
pub(crate) const CHANNELS: usize = 2;
/// Opcodes `0..STATS_OPCODES` are counted one by one; others in one bucket.
pub const STATS_OPCODES: usize = 32;
/// Purposes the stats block counts tokens for: 0 training, 1 the publish
/// gate ([`crate::TokenPurpose`]).
pub const TOKEN_PURPOSES: usize = 2;

/// The fixed header of every request and response. Lives in a queue slot;
/// its payload lives in the lane's payload area at `payload_off`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgHeader {
    /// Operation code (requests) or the request's opcode echoed (responses).
    pub opcode: u32,
    /// Free for the protocol above the ring.
    pub flags: u32,
    /// Chosen by the client, echoed by the server.
    pub request_id: u64,
    /// Worker epoch the message belongs to.
    pub epoch: u64,
    /// Byte offset of the payload inside the lane's payload area.
    pub payload_off: u64,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Status of a response (0 = ok by convention); 0 in requests.
    pub status: i32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Queue position of this message. In the segment this is the slot's
    /// publication stamp: the producer stores it last, with `Release`, after
    /// every other field and the payload; the consumer polls it. A slot
    /// holding neither the expected position, nor the position one lap
    /// earlier, nor "empty" (`u64::MAX`, after a reset) is corrupt.
    pub seq: u64,
    /// Reserved, zero.
    pub reserved2: [u64; 1],
}
const _: () = assert!(std::mem::size_of::<MsgHeader>() == 64);
const _: () = assert!(std::mem::align_of::<SegmentHeader>() == BLOCK_ALIGN);
// SAFETY: repr(C), only integers, no implicit padding (64 = sum of fields),
// every bit pattern is a valid value.
unsafe impl ZeroCopy for MsgHeader {}

/// Alignment of every control block: two cache lines. The adjacent-line
/// prefetcher moves 64-byte lines in 128-byte aligned pairs, so a line one
/// process writes must not share a pair with a line the other writes (on
/// x86 stores become visible in order: a store to a line the peer holds
/// delays every later store, the slot's stamp included, by a coherence round
/// trip).
pub(crate) const BLOCK_ALIGN: usize = 128;

/// A futex word plus the "I am parked" flag of the one side that waits on it.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct WaitWord {
    /// Futex word: bumped by the waker before `FUTEX_WAKE`.
    pub seq: AtomicU32,
    /// Non-zero while the waiting side is (about to be) parked.
    pub parked: AtomicU32,
}
// SAFETY: repr(C), atomics of integers only; any bit pattern is valid.
unsafe impl ZeroCopy for WaitWord {}

/// A cache line holding one monotonic index.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct PaddedU64 {
    /// The value.
    pub v: AtomicU64,
}
// SAFETY: repr(C), one atomic integer; any bit pattern is valid.
unsafe impl ZeroCopy for PaddedU64 {}

/// Indices of one single-producer/single-consumer queue. Both count messages
/// since the lane was created (monotonic, never wrap in practice); the slot of
/// position `p` is `p % queue_depth`. Neither is read on the hot path (the
/// consumer polls the slot's stamp instead of `tail`).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct LaneCtl {
    /// Next position the producer will write; written by the producer only,
    /// after the stamp. Read by a client taking over a channel (request
    /// lane) and for diagnostics.
    pub tail: PaddedU64,
    /// Next position the consumer will read; written by the consumer only
    /// when it releases a message. Read by the producer only when its
    /// cached copy says the lane has no room.
    pub head: PaddedU64,
}
// SAFETY: repr(C) of ZeroCopy fields.
unsafe impl ZeroCopy for LaneCtl {}

/// Control block of one channel.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct ChannelCtl {
    /// The epoch for which the client last reset this channel; the server
    /// only touches the channel once it equals the server's epoch.
    pub client_epoch: PaddedU64,
    /// Source of request-id prefixes: each client incarnation takes one.
    pub id_base: PaddedU64,
    /// Requests, client → server.
    pub req: LaneCtl,
    /// Responses, server → client.
    pub resp: LaneCtl,
    /// The client parks here waiting for a response.
    pub resp_ready: WaitWord,
    /// The server parks here waiting for room to reply.
    pub resp_space: WaitWord,
}
// SAFETY: repr(C) of ZeroCopy fields.
unsafe impl ZeroCopy for ChannelCtl {}

/// One heartbeat: how many beats, and the coarse monotonic time of the last.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct BeatCtl {
    /// Number of beats since the segment was created (or the epoch bumped,
    /// for the worker).
    pub count: AtomicU64,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last beat.
    pub at_ns: AtomicU64,
}
// SAFETY: repr(C), atomics of integers only.
unsafe impl ZeroCopy for BeatCtl {}

/// The worker's statistics, written by the worker, copied by the others.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct StatsCtl {
    /// Requests served per opcode `0..STATS_OPCODES`.
    pub per_opcode: [AtomicU64; STATS_OPCODES],
    /// Requests with other opcodes.
    pub other_opcodes: AtomicU64,
    /// Requests answered with a non-zero status.
    pub errors: AtomicU64,
    /// Service time of the last request, ns.
    pub last_service_ns: AtomicU64,
    /// Largest service time seen, ns.
    pub max_service_ns: AtomicU64,
    /// Generation of the model the worker has loaded.
    pub model_generation: AtomicU64,
    /// Coarse monotonic ns at which the worker started (0 = not started).
    pub started_at_ns: AtomicU64,
    /// The opcode the worker is serving right now, plus one (0 = idle).
    pub in_service: AtomicU64,
    /// Tokens a language-model worker decoded to score candidates, by
    /// purpose (index [`crate::TokenPurpose`]); other workers leave them 0.
    pub tokens: [AtomicU64; TOKEN_PURPOSES],
}
// SAFETY: repr(C), atomics of integers only.
unsafe impl ZeroCopy for StatsCtl {}

/// The header at offset 0.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct SegmentHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// `size_of::<SegmentHeader>()` as the creator saw it.
    pub header_size: u32,
    /// Slots per queue.
    pub queue_depth: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Bytes of payload area per lane.
    pub payload_bytes: u64,
    /// Size of the whole segment.
    pub total_size: u64,
    /// Current worker epoch (starts at 1).
    pub epoch: PaddedU64,
    /// Heartbeats, indexed by `Role as usize`.
    pub beats: [BeatCtl; ROLES],
    /// Worker statistics.
    pub stats: StatsCtl,
    /// The worker parks here waiting for a request on any channel.
    pub inbox: WaitWord,
    /// Indexed by `Channel as usize`.
    pub channels: [ChannelCtl; CHANNELS],
}
// SAFETY: repr(C) of ZeroCopy fields and integers; the explicit `reserved`
// field leaves no padding before the aligned blocks that matters (any bytes
// are valid).
unsafe impl ZeroCopy for SegmentHeader {}

/// Where everything is, computed from the two sizes alone (so owner and
/// peer agree without trusting anything else in the segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub queue_depth: u32,
    pub payload_bytes: usize,
    pub total_size: usize,
    /// `(slots offset, payload offset)` of each lane, by `[channel][dir]`,
    /// computed once (the hot path only indexes).
    lanes: [[(usize, usize); 2]; CHANNELS],
    /// `crate::lane::mask_of(queue_depth)`.
    slot_mask: u64,
}

/// Size of one lane's slots, rounded to [`BLOCK_ALIGN`] (so the producer's
/// slots and the next lane never share a prefetch pair).
fn slots_bytes(depth: u32) -> usize {
    (depth as usize * std::mem::size_of::<MsgHeader>()).next_multiple_of(BLOCK_ALIGN)
}

impl Layout {
    /// Checks the sizes and computes the layout.
    pub(crate) fn new(queue_depth: u32, payload_bytes: usize) -> Result<Layout, String> {
        if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
            return Err(format!(
                "queue depth {queue_depth} is outside 1..={MAX_QUEUE_DEPTH}"
            ));
        }
        if payload_bytes == 0
            || payload_bytes > MAX_PAYLOAD_BYTES
            || !payload_bytes.is_multiple_of(PAYLOAD_ALIGN)
        {
            return Err(format!(
                "payload area of {payload_bytes} bytes is not a multiple of {PAYLOAD_ALIGN} in 1..={MAX_PAYLOAD_BYTES}"
            ));
        }
        let slots = slots_bytes(queue_depth);
        // The payload area, too, ends on a prefetch-pair boundary.
        let lane = slots + payload_bytes.next_multiple_of(BLOCK_ALIGN);
        let hdr = std::mem::size_of::<SegmentHeader>();
        let total_size = hdr + lane * CHANNELS * 2;
        // Lane `(channel, dir)` (`dir` 0 = requests, 1 = responses) is the
        // `channel * 2 + dir`-th: its slots, then its payload area.
        let at = |channel: usize, dir: usize| {
            let off = hdr + lane * (channel * 2 + dir);
            (off, off + slots)
        };
        Ok(Layout {
            queue_depth,
            payload_bytes,
            total_size,
            lanes: [[at(0, 0), at(0, 1)], [at(1, 0), at(1, 1)]],
            slot_mask: crate::lane::mask_of(u64::from(queue_depth)),
        })
    }

    /// Index of the slot of queue position `pos` (`pos % queue_depth`,
    /// without a division when the depth is a power of two).
    #[inline]
    pub(crate) fn slot_index(&self, pos: u64) -> usize {
        crate::lane::fast_mod(pos, u64::from(self.queue_depth), self.slot_mask) as usize
    }

    /// Offset of the first slot of lane `(channel, dir)`, `dir` 0 =
    /// requests, 1 = responses.
    #[inline]
    pub(crate) fn slots_off(&self, channel: usize, dir: usize) -> usize {
        self.lanes[channel][dir & 1].0
    }

    /// Offset of the payload area of lane `(channel, dir)`.
    #[inline]
    pub(crate) fn payload_off(&self, channel: usize, dir: usize) -> usize {
        self.lanes[channel][dir & 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_tile_the_segment_without_overlap() {
        let l = Layout::new(4, 128).unwrap();
        let hdr = std::mem::size_of::<SegmentHeader>();
        assert_eq!(hdr % BLOCK_ALIGN, 0);
        assert_eq!(l.slots_off(0, 0), hdr);
        assert_eq!(l.payload_off(0, 0), hdr + 4 * 64);
        assert_eq!(l.slots_off(0, 1), hdr + 4 * 64 + 128);
        assert_eq!(l.payload_off(1, 1) + 128, l.total_size);
        assert_eq!(l.payload_off(1, 0) % 64, 0);
        // Odd sizes: every lane still starts on a prefetch-pair boundary.
        let l = Layout::new(3, 64).unwrap();
        for ch in 0..CHANNELS {
            for dir in 0..2 {
                assert_eq!(l.slots_off(ch, dir) % BLOCK_ALIGN, 0, "lane {ch}/{dir}");
                assert!(l.payload_off(ch, dir) >= l.slots_off(ch, dir) + 3 * 64);
            }
        }
        assert_eq!(l.total_size, hdr + 4 * (256 + 128));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Layout::new(0, 64).is_err());
        assert!(Layout::new(MAX_QUEUE_DEPTH + 1, 64).is_err());
        assert!(Layout::new(4, 0).is_err());
        assert!(Layout::new(4, 65).is_err());
        assert!(Layout::new(4, MAX_PAYLOAD_BYTES + 64).is_err());
    }
}
