//! The shared segment: creation (owner), attachment (child), the header
//! check, epoch, heartbeats, stats, and bounds-checked access to slots and
//! payload areas. Every raw pointer into the mapping is made here.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::addr_of;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::lane::check_stamp;
use crate::layout::{
    BeatCtl, CHANNELS, ChannelCtl, LAYOUT_VERSION, Layout, MAGIC, MsgHeader, SLOT_EMPTY,
    SegmentHeader, StatsCtl, WaitWord,
};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, Mapping};
use crate::{Channel, Client, ClientConfig, RingError, Role, Server, ServerConfig, wait};

/// Sizes of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutConfig {
    /// Message slots per queue (each direction of each channel).
    pub queue_depth: u32,
    /// Payload bytes per channel per direction; a multiple of 64. The
    /// largest single payload is this size.
    pub payload_bytes: usize,
}

impl Default for LayoutConfig {
    fn default() -> Self {
        LayoutConfig {
            queue_depth: 64,
            payload_bytes: 8 << 20,
        }
    }
}

/// A heartbeat as seen now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// Beats so far (for the worker: since the last epoch bump).
    pub count: u64,
    /// Time since the last beat (coarse clock, a few ms resolution).
    pub age: Duration,
}

/// A copy of the worker's statistics. Only numbers: nothing in it is used
/// as an index or a size, so a lying worker can only lie about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests served per opcode, for opcodes `0..STATS_OPCODES`.
    pub requests_per_opcode: Vec<u64>,
    /// Requests with larger opcodes.
    pub requests_other_opcodes: u64,
    /// Requests answered with a non-zero status.
    pub errors: u64,
    /// Service time of the last request.
    pub last_service: Duration,
    /// Largest service time seen.
    pub max_service: Duration,
    /// Generation of the model the worker has loaded.
    pub model_generation: u64,
    /// Time since the worker started, if it said it did and the clock
    /// value it wrote is not in the future.
    pub uptime: Option<Duration>,
    /// The opcode the worker said it was serving when the snapshot was
    /// taken (`None`: idle, or a value that is not an opcode).
    pub in_service: Option<u32>,
    /// Tokens a language-model worker decoded to score candidates, indexed
    /// by [`crate::TokenPurpose`] (0 for other workers).
    pub tokens: [u64; crate::TOKEN_PURPOSES],
}

/// Deliberate corruption of the segment, for fault injection (the worker's
/// "scribble" opcode) and for the tests that prove the other side survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scribble {
    /// Pseudo-random bytes (xorshift from `seed`) over the whole segment.
    RandomBytes {
        /// Seed of the byte stream.
        seed: u64,
    },
    /// Publish, in the next response slot, a position beyond head + queue
    /// depth (a message from the future).
    ResponseTailBeyondDepth(Channel),
    /// Publish a reply whose payload lies outside the payload area.
    ReplyPayloadOutOfBounds(Channel),
    /// Publish a reply whose payload length is `u64::MAX`.
    ReplyHugeLength(Channel),
    /// Publish a reply whose slot is stamped with the position one lap
    /// later.
    ReplySeqMismatch(Channel),
    /// Publish a reply to an id the current client never sent.
    ReplyUnknownId(Channel),
    /// Publish a request head beyond the request tail (by more than a queue
    /// depth).
    RequestHeadBeyondTail(Channel),
}

/// A mapping of one shared segment, as its owner or as an attached child.
#[derive(Debug)]
pub struct Segment {
    map: Mapping,
    fd: OwnedFd,
    layout: Layout,
    owner: bool,
    /// The owner's own copy of the epoch: the shared word may be scribbled.
    local_epoch: crate::sync::AtomicU64,
    /// Endpoints claimed in this process: clients per channel, then server.
    claimed: [AtomicBool; CHANNELS + 1],
}

impl Segment {
    /// Creates a segment (the owner's side): an anonymous memfd, sized,
    /// sealed against resizing, mode 0600, close-on-exec, and initialised
    /// with epoch 1. Nothing appears in `/dev/shm`.
    pub fn create(cfg: &LayoutConfig) -> Result<Segment, RingError> {
        let layout = Layout::new(cfg.queue_depth, cfg.payload_bytes)
            .map_err(|what| RingError::LayoutMismatch { what })?;
        let fd = sys::memfd_create(c"evod-ring")?;
        sys::ftruncate(fd.as_fd(), layout.total_size as u64)?;
        sys::add_seals(fd.as_fd(), sys::SIZE_SEALS)?;
        sys::fchmod_owner_only(fd.as_fd())?;
        let map = Mapping::new(fd.as_fd(), layout.total_size)?;
        let seg = Segment {
            map,
            fd,
            layout,
            owner: true,
            local_epoch: crate::sync::AtomicU64::new(1),
            claimed: Default::default(),
        };
        seg.write_header();
        // Relaxed: nobody else maps the segment yet; passing the descriptor
        // to a child (fork/exec) orders these stores before its reads.
        seg.epoch_word().store(1, Ordering::Relaxed);
        let now = sys::coarse_now_ns();
        for b in seg.beats() {
            b.at_ns.store(now, Ordering::Relaxed);
        }
        for ch in Channel::ALL {
            seg.clear_stamps(ch);
        }
        Ok(seg)
    }

    /// Writes magic, layout version and sizes (owner only).
    fn write_header(&self) {
        let h = self.map.base().cast::<SegmentHeader>();
        let layout = self.layout;
        // SAFETY: the mapping is at least `size_of::<SegmentHeader>()` bytes
        // (Layout::new adds it) and page-aligned. The writes are volatile
        // through raw field pointers (no reference to non-atomic shared
        // memory is made); they happen at creation, before any peer has the
        // descriptor, or in `bump_epoch`, when the worker (the only untrusted
        // writer) has exited.
        unsafe {
            std::ptr::addr_of_mut!((*h).magic).write_volatile(MAGIC);
            std::ptr::addr_of_mut!((*h).layout_version).write_volatile(LAYOUT_VERSION);
            std::ptr::addr_of_mut!((*h).header_size)
                .write_volatile(std::mem::size_of::<SegmentHeader>() as u32);
            std::ptr::addr_of_mut!((*h).queue_depth).write_volatile(layout.queue_depth);
            std::ptr::addr_of_mut!((*h).payload_bytes).write_volatile(layout.payload_bytes as u64);
            std::ptr::addr_of_mut!((*h).total_size).write_volatile(layout.total_size as u64);
        }
    }

    /// Maps a segment whose descriptor this process inherited, after checking
    /// it is a sealed memfd whose header has our magic, layout version and
    /// sizes consistent with the file size.
    pub fn attach(fd: OwnedFd) -> Result<Segment, RingError> {
        let seals = sys::get_seals(fd.as_fd()).map_err(|e| RingError::LayoutMismatch {
            what: format!("descriptor is not a sealed memfd ({e})"),
        })?;
        if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
            != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        {
            return Err(RingError::LayoutMismatch {
                what: format!("memfd is not sealed against resizing (seals {seals:#x})"),
            });
        }
        let size = sys::file_size(fd.as_fd())?;
        let hdr_size = std::mem::size_of::<SegmentHeader>();
        if size < hdr_size as u64 {
            return Err(RingError::LayoutMismatch {
                what: format!("segment of {size} bytes is smaller than the {hdr_size}-byte header"),
            });
        }
        let size_usize = usize::try_from(size).map_err(|_| RingError::LayoutMismatch {
            what: format!("segment of {size} bytes is too large"),
        })?;
        let map = Mapping::new(fd.as_fd(), size_usize)?;
        let h = map.base().cast::<SegmentHeader>();
        // SAFETY: the mapping covers the header (checked above) and is
        // page-aligned. The fields are plain integers (any bit pattern is
        // valid) copied out with volatile reads, since a peer may be writing
        // them; they are validated below and never re-read.
        let (magic, version, header_size, depth, payload, total) = unsafe {
            (
                addr_of!((*h).magic).read_volatile(),
                addr_of!((*h).layout_version).read_volatile(),
                addr_of!((*h).header_size).read_volatile(),
                addr_of!((*h).queue_depth).read_volatile(),
                addr_of!((*h).payload_bytes).read_volatile(),
                addr_of!((*h).total_size).read_volatile(),
            )
        };
        let mismatch = |what: String| Err(RingError::LayoutMismatch { what });
        if magic != MAGIC {
            return mismatch(format!(
                "bad magic {magic:02x?}, expected {MAGIC:02x?} (\"EVODRING\")"
            ));
        }
        if version != LAYOUT_VERSION {
            return mismatch(format!(
                "segment has layout version {version}, this build speaks version {LAYOUT_VERSION}"
            ));
        }
        if header_size as usize != hdr_size {
            return mismatch(format!(
                "segment header is {header_size} bytes, this build expects {hdr_size}"
            ));
        }
        let payload = usize::try_from(payload).unwrap_or(usize::MAX);
        let layout = match Layout::new(depth, payload) {
            Ok(l) => l,
            Err(e) => return mismatch(e),
        };
        if layout.total_size as u64 != total || total != size {
            return mismatch(format!(
                "sizes disagree: depth {depth} and payload {payload} need {} bytes, header says {total}, file is {size}",
                layout.total_size
            ));
        }
        let local_epoch = crate::sync::AtomicU64::new(0);
        let seg = Segment {
            map,
            fd,
            layout,
            owner: false,
            local_epoch,
            claimed: Default::default(),
        };
        // Relaxed: a local copy of this process only.
        seg.local_epoch.store(seg.epoch(), Ordering::Relaxed);
        Ok(seg)
    }

    /// Attaches to a segment inherited as descriptor number `fd` (given on
    /// the command line), taking ownership of that descriptor.
    ///
    /// Before it takes the descriptor over it checks that `fd` is open and
    /// is a segment of ours: a memfd (the only files with seals) sealed
    /// against resizing. Anything else (`--ring-fd 1`: stdout) is a
    /// [`RingError::LayoutMismatch`] naming the descriptor and what it is,
    /// and the descriptor is left open and untouched. A memfd that passes
    /// is owned from then on: if the header check of [`Segment::attach`]
    /// fails, it is closed.
    ///
    /// # Safety
    ///
    /// The caller promises that descriptor `fd` is not owned by anything
    /// else in this process (no `File`, `OwnedFd`, socket or library holds
    /// it): it was inherited for exactly this purpose and is taken over at
    /// most once. Otherwise two owners would close it (or a reused number)
    /// twice.
    pub unsafe fn attach_inherited(fd: RawFd) -> Result<Segment, RingError> {
        let not_ours = |what: String| RingError::LayoutMismatch {
            what: format!("descriptor {fd} is not an evod ring segment: {what}"),
        };
        if fd < 0 {
            return Err(not_ours("the number is negative".into()));
        }
        sys::fd_is_open(fd).map_err(|e| not_ours(format!("it is not open ({e})")))?;
        // SAFETY: borrowed only for the checks below, while the descriptor
        // is open (checked just above) and nothing in this call closes it;
        // the borrow ends before the ownership is taken.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let seals = sys::get_seals(borrowed)
            .map_err(|e| not_ours(format!("it is not a sealed memfd ({e})")))?;
        if seals & sys::SIZE_SEALS != sys::SIZE_SEALS {
            return Err(not_ours(format!(
                "it is a memfd without the size seals (seals {seals:#x})"
            )));
        }
        // SAFETY: the descriptor is open and a sealed memfd (checked just
        // above) and, per this function's contract, owned by nothing else in
        // the process.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Segment::attach(owned)
    }

    /// Arranges for the segment's descriptor to survive `exec` in the child
    /// spawned by `cmd` (clears close-on-exec in the child only) and returns
    /// the descriptor number to pass to the child, e.g. on its command line.
    pub fn pass_to(&self, cmd: &mut std::process::Command) -> RawFd {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.fd.as_raw_fd();
        // SAFETY: the hook runs between fork and exec and only makes one
        // async-signal-safe fcntl call on a descriptor the child inherited;
        // it allocates nothing, its error included (a raw errno).
        unsafe {
            cmd.pre_exec(move || sys::clear_cloexec(fd));
        }
        fd
    }

    /// The segment's descriptor (to hand to a child).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether this mapping created the segment.
    pub fn is_owner(&self) -> bool {
        self.owner
    }

    /// The sizes this mapping was created or validated with.
    pub fn config(&self) -> LayoutConfig {
        LayoutConfig {
            queue_depth: self.layout.queue_depth,
            payload_bytes: self.layout.payload_bytes,
        }
    }

    /// Size of the whole segment in bytes.
    pub fn size(&self) -> usize {
        self.layout.total_size
    }

    /// The worker epoch as the shared word says. Every process mapping the
    /// segment can write that word, the worker included: a worker can make
    /// it say anything. The server (the worker) serves the epoch it reads
    /// here; a trusted process reads [`Segment::trusted_epoch`] instead.
    #[inline]
    pub fn epoch(&self) -> u64 {
        // Acquire pairs with the Release of `bump_epoch`: whoever sees the
        // new epoch also sees the heartbeat and stats reset made before it.
        self.epoch_word().load(Ordering::Acquire)
    }

    /// The epoch as this process can trust it. For the owner (the
    /// supervisor), its own count, kept in private memory: a worker can
    /// overwrite the shared word, not this, so the owner's clients never
    /// follow a forged epoch. An attached process (the evolver) has no
    /// such copy and gets the shared word: a worker that forges it can make
    /// that process's client see a spurious epoch change (its own requests
    /// reported `PeerLost`, the channel resynced), which costs only that
    /// worker's own service; the owner's bump still moves the word to an
    /// epoch no client was synced to. [`Client`]s use this.
    #[inline]
    pub fn trusted_epoch(&self) -> u64 {
        if self.owner {
            // Acquire pairs with the Release store in `bump_epoch`, which
            // may have run on another thread of the owner.
            self.local_epoch.load(Ordering::Acquire)
        } else {
            self.epoch()
        }
    }

    /// Starts a new worker incarnation: resets the worker heartbeat (a grace
    /// period of one peer timeout starts now) and the stats, bumps the epoch
    /// and wakes every parked waiter. Each client then reports its in-flight
    /// requests as `PeerLost` and resets its channel to empty; the new worker
    /// serves a channel only once its client has done so. The owner also
    /// rewrites the header (magic, version, sizes) and takes the new epoch
    /// from its own copy, so a worker that scribbled over the segment cannot
    /// steer it. Call only after the previous worker has exited. Returns the
    /// new epoch.
    pub fn bump_epoch(&self) -> u64 {
        if self.owner {
            self.write_header();
        }
        let beat = &self.beats()[Role::Worker as usize];
        // Relaxed: published by the Release epoch store below.
        beat.count.store(0, Ordering::Relaxed);
        beat.at_ns.store(sys::coarse_now_ns(), Ordering::Relaxed);
        let s = self.stats_ctl();
        for c in s.per_opcode.iter().chain(&s.tokens) {
            c.store(0, Ordering::Relaxed);
        }
        for c in [
            &s.other_opcodes,
            &s.errors,
            &s.last_service_ns,
            &s.max_service_ns,
            &s.started_at_ns,
            &s.in_service,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        let new = if self.owner {
            // The owner counts from its own copy, never from the shared
            // word a worker may have scribbled: the new epoch always differs
            // from every epoch a client of ours was synced to.
            // Relaxed: `local_epoch` is this process's private counter.
            let new = self.local_epoch.load(Ordering::Relaxed).wrapping_add(1);
            // Release pairs with the Acquire in `trusted_epoch`.
            self.local_epoch.store(new, Ordering::Release);
            // Release pairs with the Acquire loads of the epoch by clients
            // and servers (`epoch()`), publishing the resets above.
            self.epoch_word().store(new, Ordering::Release);
            new
        } else {
            // AcqRel: as above; an attached process has no trusted copy.
            self.epoch_word()
                .fetch_add(1, Ordering::AcqRel)
                .wrapping_add(1)
        };
        wait::wake_all(self.inbox());
        for ch in Channel::ALL {
            let c = self.chan(ch);
            wait::wake_all(&c.resp_ready);
            wait::wake_all(&c.resp_space);
        }
        new
    }

    /// Records a heartbeat of `role` (a counter and the coarse time).
    pub fn beat(&self, role: Role) {
        let b = &self.beats()[role as usize];
        // Relaxed: a heartbeat is a standalone value; readers only compare
        // its time with theirs, nothing else is published through it.
        b.at_ns.store(sys::coarse_now_ns(), Ordering::Relaxed);
        b.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The last heartbeat of `role`, or `None` if it never beat. A timestamp
    /// in the future (a lying peer) reads as age zero.
    pub fn last_beat(&self, role: Role) -> Option<Beat> {
        let b = &self.beats()[role as usize];
        // Relaxed: see `beat`.
        let count = b.count.load(Ordering::Relaxed);
        if count == 0 {
            return None;
        }
        Some(Beat {
            count,
            age: self.beat_age(role),
        })
    }

    /// Time since `role` last beat, or since the segment was created / the
    /// epoch was bumped if it never did (that is the start-up grace period).
    pub fn beat_age(&self, role: Role) -> Duration {
        // Relaxed: see `beat`.
        let at = self.beats()[role as usize].at_ns.load(Ordering::Relaxed);
        Duration::from_nanos(sys::coarse_now_ns().saturating_sub(at))
    }

    /// Worker side: counts one served request.
    pub fn record_request(&self, opcode: u32, service_time: Duration, ok: bool) {
        let s = self.stats_ctl();
        let ns = u64::try_from(service_time.as_nanos()).unwrap_or(u64::MAX);
        // Relaxed everywhere: stats are independent counters, read as
        // a best-effort snapshot.
        match s.per_opcode.get(opcode as usize) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => s.other_opcodes.fetch_add(1, Ordering::Relaxed),
        };
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.last_service_ns.store(ns, Ordering::Relaxed);
        s.max_service_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Worker side: counts `n` tokens decoded to score candidates for
    /// `purpose` (a language-model worker's throughput; shown, never used
    /// for a decision).
    pub fn add_tokens(&self, purpose: crate::TokenPurpose, n: u64) {
        // Relaxed: an independent counter (see `record_request`).
        self.stats_ctl().tokens[purpose as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Worker side: records the generation of the model it loaded.
    pub fn set_model_generation(&self, generation: u64) {
        // Relaxed: standalone value.
        self.stats_ctl()
            .model_generation
            .store(generation, Ordering::Relaxed);
    }

    /// Worker side: records that the worker started now (for uptime).
    pub fn mark_started(&self) {
        // Relaxed: standalone value.
        self.stats_ctl()
            .started_at_ns
            .store(sys::coarse_now_ns().max(1), Ordering::Relaxed);
    }

    /// A copy of the worker's statistics.
    pub fn stats(&self) -> StatsSnapshot {
        let s = self.stats_ctl();
        // Relaxed everywhere: see `record_request`.
        let started = s.started_at_ns.load(Ordering::Relaxed);
        let now = sys::coarse_now_ns();
        StatsSnapshot {
            requests_per_opcode: s
                .per_opcode
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            requests_other_opcodes: s.other_opcodes.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            last_service: Duration::from_nanos(s.last_service_ns.load(Ordering::Relaxed)),
            max_service: Duration::from_nanos(s.max_service_ns.load(Ordering::Relaxed)),
            model_generation: s.model_generation.load(Ordering::Relaxed),
            uptime: (started != 0 && started <= now).then(|| Duration::from_nanos(now - started)),
            in_service: s
                .in_service
                .load(Ordering::Relaxed)
                .checked_sub(1)
                .and_then(|op| u32::try_from(op).ok()),
            tokens: std::array::from_fn(|i| s.tokens[i].load(Ordering::Relaxed)),
        }
    }

    /// Worker side: records the opcode being served (`None`: idle), so that
    /// the owner can tell what a worker was doing when it died.
    pub fn set_in_service(&self, opcode: Option<u32>) {
        // Relaxed: standalone value, read after the worker's death (its
        // last stores are visible once the process is gone) or as a hint.
        self.stats_ctl()
            .in_service
            .store(opcode.map_or(0, |op| u64::from(op) + 1), Ordering::Relaxed);
    }

    /// A client of `ch` (at most one per channel per process).
    pub fn client(&self, ch: Channel) -> Result<Client<'_>, RingError> {
        self.client_with(ch, ClientConfig::default())
    }

    /// A client of `ch` with explicit timeouts and wait policy.
    pub fn client_with(&self, ch: Channel, cfg: ClientConfig) -> Result<Client<'_>, RingError> {
        self.claim(ch as usize, || format!("{ch:?} channel client"))?;
        Ok(Client::new(self, ch, cfg))
    }

    /// The server of both channels (at most one per process).
    pub fn server(&self) -> Result<Server<'_>, RingError> {
        self.server_with(ServerConfig::default())
    }

    /// The server with explicit intervals and wait policy.
    pub fn server_with(&self, cfg: ServerConfig) -> Result<Server<'_>, RingError> {
        self.claim(CHANNELS, || "ring server".to_string())?;
        Ok(Server::new(self, cfg))
    }

    fn claim(&self, i: usize, what: impl FnOnce() -> String) -> Result<(), RingError> {
        // AcqRel: pairs with the Release in `release`, so a new endpoint sees
        // the local state its predecessor left.
        if self.claimed[i].swap(true, Ordering::AcqRel) {
            return Err(RingError::InUse { what: what() });
        }
        Ok(())
    }

    pub(crate) fn release_claim(&self, i: usize) {
        // Release: pairs with the AcqRel swap in `claim`.
        self.claimed[i].store(false, Ordering::Release);
    }

    // ---- typed views into the mapping (crate-internal) ----

    #[inline]
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    #[inline]
    fn header_ptr(&self) -> *const SegmentHeader {
        self.map.base().cast::<SegmentHeader>()
    }

    #[inline]
    pub(crate) fn epoch_word(&self) -> &crate::sync::AtomicU64 {
        // SAFETY: the header lies inside the mapping (checked at create/attach),
        // the mapping is page-aligned, and the field is an atomic (any bytes
        // are a valid value; concurrent access from other processes is what
        // atomics are for). The reference lives as long as `self`'s mapping.
        unsafe { &(*addr_of!((*self.header_ptr()).epoch)).v }
    }

    fn beats(&self) -> &[BeatCtl; 3] {
        // SAFETY: as in `epoch_word`: in bounds, aligned, atomics only.
        unsafe { &*addr_of!((*self.header_ptr()).beats) }
    }

    fn stats_ctl(&self) -> &StatsCtl {
        // SAFETY: as in `epoch_word`: in bounds, aligned, atomics only.
        unsafe { &*addr_of!((*self.header_ptr()).stats) }
    }

    #[inline]
    pub(crate) fn inbox(&self) -> &WaitWord {
        // SAFETY: as in `epoch_word`: in bounds, aligned, atomics only.
        unsafe { &*addr_of!((*self.header_ptr()).inbox) }
    }

    #[inline]
    pub(crate) fn chan(&self, ch: Channel) -> &ChannelCtl {
        // SAFETY: as in `epoch_word`: in bounds (`ch as usize < CHANNELS`),
        // aligned, atomics only.
        unsafe { &*addr_of!((*self.header_ptr()).channels[ch as usize]) }
    }

    /// The consumer's poll of lane `(ch, dir)` at position `pos`: whether
    /// the message of `pos` is published, `PeerCorrupt` if the slot's stamp
    /// is impossible. Reads one word of one cache line, the slot's, and
    /// nothing else. When it says yes, [`Segment::read_slot`] copies it.
    #[inline]
    pub(crate) fn slot_ready(&self, ch: Channel, dir: usize, pos: u64) -> Result<bool, RingError> {
        // Acquire pairs with the producer's Release store of the stamp in
        // `write_slot`: the header fields and the payload it wrote before
        // are visible once we see the stamp.
        let stamp = self.stamp(ch, dir, pos).load(Ordering::Acquire);
        if stamp == pos {
            return Ok(true);
        }
        // The usual "not yet" answers, decided here: this runs on every
        // poll while spinning.
        let depth = self.layout.queue_depth;
        if stamp == SLOT_EMPTY || pos.checked_sub(u64::from(depth)) == Some(stamp) {
            return Ok(false);
        }
        check_stamp(stamp, pos, depth, || {
            format!("{ch:?} {}", if dir == 0 { "request" } else { "response" })
        })
    }

    /// Copies the header of the message at `pos` of lane `(ch, dir)`, which
    /// [`Segment::slot_ready`] said is published. Its `seq` is `pos` (the
    /// stamp that was validated, whatever a liar wrote there since).
    #[inline]
    pub(crate) fn read_slot(&self, ch: Channel, dir: usize, pos: u64) -> MsgHeader {
        let p = self.slot_ptr(ch, dir, pos);
        // SAFETY: `slot_ptr` returns an in-bounds, 64-aligned slot. The copy
        // is volatile because a lying peer may write it concurrently (an
        // honest producer does not touch it until we release it);
        // MsgHeader is ZeroCopy (any bytes are a valid value) and every
        // field is validated by the caller on this copy.
        let mut h = unsafe { p.read_volatile() };
        h.seq = pos;
        h
    }

    /// The producer's write of `h` into slot `pos % depth` of lane
    /// `(ch, dir)`: every field, then `h.seq` as the stamp (`Release`), which
    /// publishes the message (and its payload, written before this call).
    #[inline]
    pub(crate) fn write_slot(&self, ch: Channel, dir: usize, pos: u64, h: MsgHeader) {
        let p = self.slot_ptr(ch, dir, pos);
        // SAFETY: in bounds and aligned (see `slot_ptr`); this process is the
        // lane's only producer (endpoint claims) and the slot is free (the
        // consumer released the message one lap earlier), so an honest peer
        // only polls its stamp, which is not written here. Volatile field
        // writes through raw pointers: no reference to the shared bytes.
        unsafe {
            std::ptr::addr_of_mut!((*p).opcode).write_volatile(h.opcode);
            std::ptr::addr_of_mut!((*p).flags).write_volatile(h.flags);
            std::ptr::addr_of_mut!((*p).request_id).write_volatile(h.request_id);
            std::ptr::addr_of_mut!((*p).epoch).write_volatile(h.epoch);
            std::ptr::addr_of_mut!((*p).payload_off).write_volatile(h.payload_off);
            std::ptr::addr_of_mut!((*p).payload_len).write_volatile(h.payload_len);
            std::ptr::addr_of_mut!((*p).status).write_volatile(h.status);
            std::ptr::addr_of_mut!((*p).reserved).write_volatile(h.reserved);
            std::ptr::addr_of_mut!((*p).reserved2).write_volatile(h.reserved2);
        }
        // Release pairs with the consumer's Acquire load in `slot_ready`: the
        // fields above and the payload are visible to whoever sees the stamp.
        // SAFETY: as in `stamp`, for the slot `p` computed above.
        unsafe { stamp_of(p) }.store(h.seq, Ordering::Release);
    }

    /// The stamp of the slot whose position (or a position in the current
    /// lap) the producer last published there (see [`Segment::slot_ready`]).
    pub(crate) fn slot_stamp(&self, ch: Channel, dir: usize, pos: u64) -> u64 {
        // Acquire: as in `slot_ready`.
        self.stamp(ch, dir, pos).load(Ordering::Acquire)
    }

    /// Marks every slot of both lanes of `ch` empty. Only while no producer
    /// writes them: at creation, and by a client resetting its channel for
    /// a new epoch (the old worker has exited, the new one waits for the
    /// `client_epoch` store that publishes this).
    pub(crate) fn clear_stamps(&self, ch: Channel) {
        for dir in 0..2 {
            for pos in 0..u64::from(self.layout.queue_depth) {
                // Relaxed: published by the caller's later Release store
                // (fork/exec at creation, `client_epoch` on a reset).
                self.stamp(ch, dir, pos)
                    .store(SLOT_EMPTY, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    fn stamp(&self, ch: Channel, dir: usize, pos: u64) -> &AtomicU64 {
        // SAFETY: `slot_ptr` is an in-bounds slot of the mapping, which
        // lives as long as `self` (the returned borrow).
        unsafe { stamp_of(self.slot_ptr(ch, dir, pos)) }
    }

    #[inline]
    fn slot_ptr(&self, ch: Channel, dir: usize, pos: u64) -> *mut MsgHeader {
        debug_assert!(dir < 2);
        let idx = self.layout.slot_index(pos);
        let off =
            self.layout.slots_off(ch as usize, dir & 1) + idx * std::mem::size_of::<MsgHeader>();
        debug_assert!(off + 64 <= self.map.len());
        // SAFETY: `idx < queue_depth`, so `off` plus one header lies inside
        // the lane's slot array, which lies inside the mapping (Layout).
        unsafe { self.map.base().add(off).cast::<MsgHeader>() }
    }

    /// Copies the payload bytes `[off, off + len)` of lane `(ch, dir)` into
    /// `out` (replacing its contents), or `PeerCorrupt` if they do not lie
    /// inside its payload area. The only way payload bytes leave the
    /// segment: no reference to them is ever made (see the crate docs).
    #[inline]
    pub(crate) fn copy_payload_out(
        &self,
        ch: Channel,
        dir: usize,
        off: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RingError> {
        let (start, len) = self.payload_range(ch, dir, off, len)?;
        out.clear();
        out.reserve(len);
        // SAFETY: `payload_range` checked that `[start, start + len)` lies
        // inside the lane's payload area, inside the mapping; `out` has room
        // for `len` bytes (reserved above) and is private memory, so the two
        // ranges do not overlap. The source is read through a raw pointer,
        // never a reference: a lying peer writing it concurrently can only
        // change which byte values land in `out` (u8 has no invalid values),
        // and the caller treats them as untrusted data. `set_len` is sound
        // because those `len` bytes were just initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.base().add(start), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(())
    }

    /// Copies `src` (private memory) into the payload bytes at `off` of lane
    /// `(ch, dir)`, or `PeerCorrupt` if they do not fit its payload area.
    /// For the lane's producer, into a range its allocator reserved as free.
    #[inline]
    pub(crate) fn copy_payload_in(
        &self,
        ch: Channel,
        dir: usize,
        off: u64,
        src: &[u8],
    ) -> Result<(), RingError> {
        let (start, len) = self.payload_range(ch, dir, off, src.len() as u64)?;
        // SAFETY: in bounds of the payload area (checked just above); `src`
        // is private memory, so it does not overlap the mapping. The
        // destination is written through a raw pointer and no reference to
        // mapping bytes exists in this process (crate rule), so nothing of
        // ours is aliased; a peer reading the range concurrently (only a
        // lying one: an honest consumer reads it after the stamp) sees bytes
        // it validates anyway.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.base().add(start), len);
        }
        Ok(())
    }

    #[inline]
    fn payload_range(
        &self,
        ch: Channel,
        dir: usize,
        off: u64,
        len: u64,
    ) -> Result<(usize, usize), RingError> {
        let cap = self.layout.payload_bytes as u64;
        match off.checked_add(len) {
            Some(end) if end <= cap => Ok((
                self.layout.payload_off(ch as usize, dir & 1) + off as usize,
                len as usize,
            )),
            _ => Err(payload_out_of_bounds(ch, dir, off, len, cap)),
        }
    }

    /// Whether the client of `ch` has announced that it is parked on the
    /// futex, waiting for a reply. For tests and diagnostics: a value read
    /// from shared memory, so only a hint.
    pub fn client_parked(&self, ch: Channel) -> bool {
        // Relaxed: an observation for tests; nothing is ordered after it.
        self.chan(ch).resp_ready.parked.load(Ordering::Relaxed) != 0
    }

    /// Whether the server has announced that it is parked on the futex,
    /// waiting for room in the response lane of `ch`. For tests and
    /// diagnostics, like [`Segment::client_parked`].
    pub fn server_parked_for_room(&self, ch: Channel) -> bool {
        // Relaxed: an observation for tests; nothing is ordered after it.
        self.chan(ch).resp_space.parked.load(Ordering::Relaxed) != 0
    }

    /// Corrupts the segment on purpose (see [`Scribble`]): a worker's
    /// fault-injection opcode, and the tests that prove the other side
    /// survives. Every peer of the segment sees it corrupt afterwards; only
    /// the owner's [`Segment::bump_epoch`] (after this worker has exited)
    /// restores it.
    ///
    /// # Safety
    ///
    /// No other thread of this process may access the segment (through a
    /// [`Client`], [`Server`], or any method of this `Segment`) during the
    /// call: [`Scribble::RandomBytes`] overwrites every byte of the mapping,
    /// the atomics included, with plain (volatile) stores, which would race
    /// with this process's own atomic accesses. (Afterwards, using this
    /// process's endpoints again is memory-safe, everything read from the
    /// segment being validated, but they will mostly meet errors.)
    pub unsafe fn scribble(&self, how: Scribble) {
        let depth = u64::from(self.layout.queue_depth);
        let fake_reply = |ch: Channel, edit: &dyn Fn(&mut MsgHeader, u64)| {
            let c = self.chan(ch);
            // We play a lying producer at the next response position (the
            // server publishes it in `tail`); `write_slot` publishes the
            // slot through its stamp as usual. Relaxed: a plain read.
            let pos = c.resp.tail.v.load(Ordering::Relaxed);
            let mut h = MsgHeader {
                epoch: self.epoch(),
                seq: pos,
                ..MsgHeader::default()
            };
            edit(&mut h, pos);
            self.write_slot(ch, 1, pos, h);
            // Release: as the producer's tail publication.
            c.resp.tail.v.store(pos + 1, Ordering::Release);
            wait::wake_all(&c.resp_ready);
        };
        let prefix = |ch: Channel| {
            // Relaxed: a plain read of the current client's id prefix.
            (self.chan(ch).id_base.v.load(Ordering::Relaxed) & 0xff_ffff).max(1) << 40
        };
        let cap = self.layout.payload_bytes as u64;
        match how {
            Scribble::RandomBytes { seed } => {
                let mut x = seed | 1;
                let base = self.map.base().cast::<u64>();
                for i in 0..self.map.len() / 8 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // SAFETY: `i * 8 + 8 <= len` and the base is page-aligned,
                    // so the u64 is in bounds and aligned. Every type in the
                    // segment is ZeroCopy (any bytes are valid); no reference
                    // to non-atomic segment bytes exists (crate rule), and no
                    // other thread of ours touches the atomics during the
                    // call (this function's contract); peers reading
                    // concurrently see bytes, which they validate.
                    unsafe { base.add(i).write_volatile(x) };
                }
                for ch in Channel::ALL {
                    wait::wake_all(&self.chan(ch).resp_ready);
                }
            }
            Scribble::ResponseTailBeyondDepth(ch) => fake_reply(ch, &|h, pos| {
                h.request_id = prefix(ch) | 1;
                h.seq = pos + depth + 1;
            }),
            Scribble::ReplyPayloadOutOfBounds(ch) => fake_reply(ch, &|h, _| {
                h.request_id = prefix(ch) | 1;
                h.payload_off = cap - 64;
                h.payload_len = 128;
            }),
            Scribble::ReplyHugeLength(ch) => fake_reply(ch, &|h, _| {
                h.request_id = prefix(ch) | 1;
                h.payload_len = u64::MAX;
            }),
            Scribble::ReplySeqMismatch(ch) => fake_reply(ch, &|h, pos| {
                h.request_id = prefix(ch) | 1;
                h.seq = pos.wrapping_add(depth);
            }),
            Scribble::ReplyUnknownId(ch) => fake_reply(ch, &|h, _| {
                h.request_id = prefix(ch) | 0xff_ffff_fff0;
            }),
            Scribble::RequestHeadBeyondTail(ch) => {
                let c = self.chan(ch);
                // More than a queue depth beyond the tail: the client reads
                // the head only when its copy says the lane is full, and by
                // then its tail may have grown by up to a depth; a head past
                // anything it can have sent is a lie whenever it reads it.
                // Release: as a consumer's head publication.
                let tail = c.req.tail.v.load(Ordering::Relaxed);
                c.req.head.v.store(tail + depth + 5, Ordering::Release);
            }
        }
    }
}

/// The error for a payload range outside its area (kept out of line: the
/// check is on every message, the error never on an honest one).
#[cold]
#[inline(never)]
fn payload_out_of_bounds(ch: Channel, dir: usize, off: u64, len: u64, cap: u64) -> RingError {
    RingError::PeerCorrupt {
        what: format!(
            "{ch:?} {} payload at offset {off} length {len} exceeds the {cap}-byte area",
            if dir == 0 { "request" } else { "response" }
        ),
    }
}

/// The stamp (`seq` field) of the slot at `p`, as an atomic.
///
/// # Safety
///
/// `p` is a slot inside a live mapping (from `Segment::slot_ptr`) that
/// outlives the returned reference.
#[inline]
unsafe fn stamp_of<'a>(p: *mut MsgHeader) -> &'a AtomicU64 {
    // SAFETY: `seq` lies at offset 48 of a 64-aligned header inside the
    // mapping (the caller's promise), so it is an 8-aligned u64; any bits are
    // a valid value, and concurrent access by other processes is what the
    // atomic is for.
    unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*p).seq)) }
}

/// The first `len` bytes of a private scratch buffer, grown (never shrunk)
/// as needed: a producer's `fill` writes there, then
/// [`Segment::copy_payload_in`] copies them into the segment. The bytes
/// hold whatever an earlier message left (private data of this process);
/// not zeroing them keeps the hot path free of a memset.
#[inline]
pub(crate) fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}
