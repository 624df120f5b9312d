//! Real-process tests of the ring: this binary re-executes itself as the
//! peer (env `EVOD_RING_PEER=<mode>`, segment descriptor number in
//! `EVOD_RING_FD`), so both ends are separate processes that can be
//! SIGKILLed. A tiny harness runs the tests in order (`harness = false`);
//! pass a substring to run only matching tests.

mod common;

use common::eventually;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use evod_ring::{
    Channel, Client, ClientConfig, LayoutConfig, RingError, Role, Scribble, Segment, ServerConfig,
    WaitPolicy,
};

const OP_ECHO: u32 = 1;
const OP_SLOW: u32 = 2;
const OP_SCRIBBLE: u32 = 3;
const OP_EXIT: u32 = 4;
/// Answered with status 7 and counted as an error.
const OP_FAIL: u32 = 5;
/// An opcode beyond the per-opcode counters (`STATS_OPCODES`).
const OP_OTHER: u32 = 100;
/// The service time the peer records for `OP_FAIL`.
const FAIL_SERVICE: Duration = Duration::from_millis(3);
/// The model generation the server peer announces.
const PEER_GENERATION: u64 = 42;

/// Deterministic bytes for request `i`.
fn fill_bytes(i: u64, buf: &mut [u8]) {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// FNV-1a over `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------- peers ----

/// Serves until told to exit: ECHO replies with the request's checksum
/// followed by the payload; FAIL and OTHER reply with no payload (status 7
/// and 0); SLOW records the request and then sleeps without replying or
/// beating; SCRIBBLE corrupts the segment as asked. ECHO, FAIL, OTHER and
/// SLOW are counted in the stats (FAIL as an error that took
/// [`FAIL_SERVICE`]); the model generation is [`PEER_GENERATION`].
fn peer_server(seg: &Segment) -> Result<(), RingError> {
    let cfg = ServerConfig {
        beat_interval: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let mut server = seg.server_with(cfg)?;
    seg.set_model_generation(PEER_GENERATION);
    loop {
        let Some((_, req)) = server.recv(Duration::from_secs(30))? else {
            continue;
        };
        let h = req.header;
        let begun = Instant::now();
        match h.opcode {
            OP_ECHO => {
                let len = req.payload.len();
                req.reply(0, 8 + len, |inp, out| {
                    out[..8].copy_from_slice(&checksum(inp).to_le_bytes());
                    out[8..].copy_from_slice(inp);
                })?;
                // As a language-model worker counts its tokens: the
                // payload's length for training, one for the gate below.
                seg.add_tokens(evod_ring::TokenPurpose::Train, len as u64);
                seg.record_request(h.opcode, begun.elapsed(), true);
            }
            OP_FAIL => {
                seg.add_tokens(evod_ring::TokenPurpose::Gate, 1);
                req.reply(7, 0, |_, _| {})?;
                seg.record_request(h.opcode, FAIL_SERVICE, false);
            }
            OP_OTHER => {
                req.reply(0, 0, |_, _| {})?;
                seg.record_request(h.opcode, begun.elapsed(), true);
            }
            OP_SLOW => {
                seg.set_in_service(Some(h.opcode));
                seg.record_request(h.opcode, Duration::ZERO, true);
                hang_until_killed();
            }
            OP_SCRIBBLE => {
                let how = match h.flags {
                    0 => Scribble::RandomBytes { seed: h.request_id },
                    1 => Scribble::ResponseTailBeyondDepth(Channel::Eval),
                    2 => Scribble::ReplyPayloadOutOfBounds(Channel::Eval),
                    3 => Scribble::ReplyHugeLength(Channel::Eval),
                    4 => Scribble::ReplySeqMismatch(Channel::Eval),
                    5 => Scribble::ReplyUnknownId(Channel::Eval),
                    _ => Scribble::RequestHeadBeyondTail(Channel::Eval),
                };
                drop(req);
                // SAFETY: this peer touches the segment from this thread
                // only.
                unsafe { seg.scribble(how) };
                if matches!(how, Scribble::RequestHeadBeyondTail(_)) {
                    // Stop serving, or the next released request would
                    // overwrite the lie with a correct head.
                    hang_until_killed();
                }
            }
            OP_EXIT => return Ok(()),
            _ => drop(req),
        }
    }
}

/// Creates a segment, spawns a server grandchild on it, prints "ready",
/// then waits to be killed.
fn peer_owner() -> Result<(), RingError> {
    let seg = Segment::create(&LayoutConfig {
        queue_depth: 8,
        payload_bytes: 4096,
    })?;
    let _child = spawn_peer(&seg, "server");
    println!("ready");
    hang_until_killed()
}

/// Sends `OP_SLOW` (the peer takes it and hangs) and waits until the peer
/// has picked it up; its request id.
fn send_slow(seg: &Segment, client: &mut Client<'_>) -> Result<u64, String> {
    let id = client
        .send(OP_SLOW, 0, 0, |_| {})
        .map_err(|e| e.to_string())?;
    if !eventually(Duration::from_secs(10), || {
        seg.stats().requests_per_opcode[OP_SLOW as usize] == 1
    }) {
        return Err("worker never picked up the slow request".into());
    }
    Ok(id)
}

/// Plays a hung peer: blocks forever, until the test kills this process.
fn hang_until_killed() -> ! {
    loop {
        std::thread::park();
    }
}

fn peer_main(mode: &str) -> ExitCode {
    let fd: i32 = std::env::var("EVOD_RING_FD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    if mode == "attach-stdout" {
        return peer_attach_stdout();
    }
    // SAFETY: EVOD_RING_FD is the segment descriptor the test passed
    // (`Segment::pass_to`); nothing else in this process owns it.
    let attached = || unsafe { Segment::attach_inherited(fd) };
    let res = match mode {
        "owner" => peer_owner(),
        _ => attached().and_then(|seg| match mode {
            "server" => peer_server(&seg),
            "attach" => Ok(()),
            other => panic!("unknown peer mode {other}"),
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer error: {e}");
            ExitCode::from(3)
        }
    }
}

/// Tries to attach descriptor 1 (stdout) as a segment, reports the error on
/// stderr, then writes a line to stdout: it must still arrive.
fn peer_attach_stdout() -> ExitCode {
    // SAFETY: deliberately wrong: stdout is owned by `std::io::stdout`. The
    // contract is broken only if the check lets it through, which is what
    // the test checks it does not (then the line below would not arrive).
    match unsafe { Segment::attach_inherited(1) } {
        Ok(_) => {
            eprintln!("peer error: stdout was attached as a segment");
            ExitCode::from(4)
        }
        Err(e) => {
            eprintln!("peer error: {e}");
            let mut out = std::io::stdout();
            if writeln!(out, "stdout still open")
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::from(5);
            }
            ExitCode::from(3)
        }
    }
}

/// A peer process, SIGKILLed and reaped on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        // Only on a test's error path (the tests stop their peers with
        // `kill` and check how they died); nothing left to report to.
        let _ = stop(&mut self.0);
    }
}

/// Spawns this binary as a peer on `seg`.
fn spawn_peer(seg: &Segment, mode: &str) -> Peer {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    let fd = seg.pass_to(&mut cmd);
    // SAFETY: the hook runs between fork and exec and makes one
    // async-signal-safe prctl call: the peer dies with this test process.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.env("EVOD_RING_PEER", mode)
        .env("EVOD_RING_FD", fd.to_string())
        .stderr(Stdio::piped());
    Peer(cmd.spawn().expect("spawning the peer"))
}

/// SIGKILLs a child (a no-op if it already ended) and reaps it; how it
/// ended.
fn stop(child: &mut Child) -> Result<ExitStatus, String> {
    // A child that already exited is a zombie until reaped: the signal is
    // then ignored and `wait` reports how it really ended.
    child.kill().map_err(|e| format!("kill: {e}"))?;
    child.wait().map_err(|e| format!("wait: {e}"))
}

/// SIGKILLs a child and reaps it, checking that it was the SIGKILL that
/// ended it (not a crash or an exit of its own before).
fn kill(child: &mut Child) -> Result<(), String> {
    let status = stop(child)?;
    if status.signal() != Some(libc::SIGKILL) {
        return Err(format!("peer ended by {status:?}, not by our SIGKILL"));
    }
    Ok(())
}

fn small() -> LayoutConfig {
    LayoutConfig {
        queue_depth: 16,
        payload_bytes: 128 << 10,
    }
}

fn client_cfg(peer_timeout: Duration) -> ClientConfig {
    ClientConfig {
        peer_timeout,
        wait: WaitPolicy {
            spin: Duration::from_micros(20),
            slice: Duration::from_millis(10),
        },
    }
}

/// One echo round trip of request `i` with `len` bytes, checking the reply.
fn echo(client: &mut evod_ring::Client<'_>, i: u64, len: usize) -> Result<(), String> {
    let reply = client
        .call(
            OP_ECHO,
            0,
            len,
            |b| fill_bytes(i, b),
            Instant::now() + Duration::from_secs(10),
        )
        .map_err(|e| format!("request {i}: {e}"))?;
    let mut want = vec![0u8; len];
    fill_bytes(i, &mut want);
    let p = reply.payload;
    if p.len() != len + 8 || p[..8] != checksum(&want).to_le_bytes() || p[8..] != want[..] {
        return Err(format!(
            "request {i}: reply payload of {} bytes does not match",
            p.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- tests ----

/// Request/response pairs between two processes with payload checksums:
/// 1M in release, 200k in debug (this crate is built at opt-level 0 there).
/// Pipelines up to 8 requests so the queues wrap, and mixes in 64 KiB
/// payloads so the payload areas wrap too.
fn million_round_trips() -> Result<(), String> {
    let n: u64 = if cfg!(debug_assertions) {
        200_000
    } else {
        1_000_000
    };
    let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
    let mut child = spawn_peer(&seg, "server");
    let mut client = seg
        .client_with(Channel::Eval, client_cfg(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let len_of = |i: u64| {
        if i.is_multiple_of(5000) {
            64 << 10
        } else {
            (i % 97) as usize
        }
    };
    let mut sent = 0u64;
    let mut got = 0u64;
    let mut pending = std::collections::VecDeque::new();
    while got < n {
        while sent < n && pending.len() < 8 {
            match client.send(OP_ECHO, 0, len_of(sent), |b| fill_bytes(sent, b)) {
                Ok(id) => {
                    pending.push_back((id, sent));
                    sent += 1;
                }
                Err(RingError::Full) => break,
                Err(e) => return Err(format!("send {sent}: {e}")),
            }
        }
        let reply = client
            .recv(Instant::now() + Duration::from_secs(10))
            .map_err(|e| format!("recv: {e}"))?;
        let (id, i) = pending.pop_front().ok_or("reply with nothing pending")?;
        if reply.request_id() != id {
            return Err(format!(
                "reply to {:#x} out of order, expected {id:#x}",
                reply.request_id()
            ));
        }
        let mut want = vec![0u8; len_of(i)];
        fill_bytes(i, &mut want);
        let p = reply.payload;
        if p.len() != want.len() + 8
            || p[..8] != checksum(&want).to_le_bytes()
            || p[8..] != want[..]
        {
            return Err(format!("request {i}: payload checksum mismatch"));
        }
        got += 1;
    }
    let stats = seg.stats();
    drop(client);
    kill(&mut child.0)?;
    if stats.uptime.is_none() {
        return Err("worker never marked itself started".into());
    }
    Ok(())
}

/// The worker is SIGKILLed with a request in flight: the client gets
/// `PeerLost` naming it once the heartbeat is stale; after an epoch bump a
/// new worker serves the same channel again.
fn sigkill_gives_peer_lost_then_respawn_works() -> Result<(), String> {
    let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
    let mut child = spawn_peer(&seg, "server");
    let timeout = Duration::from_millis(300);
    let mut client = seg
        .client_with(Channel::Eval, client_cfg(timeout))
        .map_err(|e| e.to_string())?;
    for i in 0..100 {
        echo(&mut client, i, 100)?;
    }
    let id = send_slow(&seg, &mut client)?;
    kill(&mut child.0)?;
    let t = Instant::now();
    match client.recv(Instant::now() + Duration::from_secs(10)) {
        Err(RingError::PeerLost { in_flight, .. }) if in_flight == vec![id] => {}
        other => return Err(format!("expected PeerLost with [{id:#x}], got {other:?}")),
    }
    let took = t.elapsed();
    if took > timeout + Duration::from_millis(500) {
        return Err(format!(
            "PeerLost took {took:?}, heartbeat timeout is {timeout:?}"
        ));
    }
    // Respawn: bump, new worker, same client keeps working.
    let epoch = seg.bump_epoch();
    let mut child = spawn_peer(&seg, "server");
    for i in 0..100 {
        echo(&mut client, i, 1000)?;
    }
    if client.epoch() != epoch {
        return Err(format!(
            "client stamps epoch {}, segment is at {epoch}",
            client.epoch()
        ));
    }
    kill(&mut child.0)?;
    Ok(())
}

/// An epoch bump (the supervisor replaced the worker) wakes a parked client
/// at once with `PeerLost`, long before the heartbeat timeout.
fn epoch_bump_wakes_parked_client() -> Result<(), String> {
    let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
    let mut child = spawn_peer(&seg, "server");
    let mut client = seg
        .client_with(Channel::Eval, client_cfg(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    echo(&mut client, 1, 10)?;
    let id = send_slow(&seg, &mut client)?;
    kill(&mut child.0)?;
    let (res, took, parked) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            let r = client
                .recv(Instant::now() + Duration::from_secs(30))
                .map(|r| r.request_id());
            (r, t.elapsed())
        });
        // Wait until the client has parked on the futex, then bump: the
        // bump must wake it, not its own polling.
        let parked = eventually(Duration::from_secs(10), || seg.client_parked(Channel::Eval));
        seg.bump_epoch();
        let (res, took) = waiter.join().expect("waiter thread");
        (res, took, parked)
    });
    if !parked {
        return Err("the client never parked on the futex".into());
    }
    match res {
        Err(RingError::PeerLost { in_flight, .. }) if in_flight == vec![id] => {}
        other => return Err(format!("expected PeerLost with [{id:#x}], got {other:?}")),
    }
    if took > Duration::from_secs(2) {
        return Err(format!("PeerLost after the bump took {took:?}"));
    }
    Ok(())
}

/// Targeted lies by the worker each give `PeerCorrupt`, and the owner can
/// recover with a bump and a new worker.
fn targeted_corruption_is_peer_corrupt() -> Result<(), String> {
    for flags in 1..=6u32 {
        let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
        let mut child = spawn_peer(&seg, "server");
        let mut client = seg
            .client_with(Channel::Eval, client_cfg(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        echo(&mut client, 7, 10)?;
        client
            .send(OP_SCRIBBLE, flags, 0, |_| {})
            .map_err(|e| e.to_string())?;
        let res = if flags == 6 {
            // The lie is in the request queue: noticed by a later send.
            let mut r = Ok(0);
            let ok = eventually(Duration::from_secs(5), || {
                r = client.send(OP_ECHO, 0, 0, |_| {});
                !matches!(r, Ok(_) | Err(RingError::Full))
            });
            if !ok {
                return Err(format!("flags {flags}: send never failed, last {r:?}"));
            }
            r.map(|_| ())
        } else {
            client
                .recv(Instant::now() + Duration::from_secs(5))
                .map(|_| ())
        };
        match res {
            Err(RingError::PeerCorrupt { what }) if !what.is_empty() => {}
            other => {
                return Err(format!(
                    "scribble flags {flags}: expected PeerCorrupt, got {other:?}"
                ));
            }
        }
        kill(&mut child.0)?;
        // Recovery: new epoch, new worker.
        seg.bump_epoch();
        let mut child = spawn_peer(&seg, "server");
        let mut ok = false;
        for attempt in 0..3 {
            match echo(&mut client, 100 + attempt, 50) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) if e.contains("peer lost") => continue,
                Err(e) => return Err(format!("flags {flags}: after recovery: {e}")),
            }
        }
        kill(&mut child.0)?;
        if !ok {
            return Err(format!("flags {flags}: no recovery after the epoch bump"));
        }
    }
    Ok(())
}

/// The worker overwrites the whole segment with random bytes: the client
/// gets `PeerCorrupt` or `PeerLost` (the epoch word is garbage too), never a
/// crash or a hang; a bump and a new worker recover.
fn random_bytes_over_segment() -> Result<(), String> {
    for seed in [1u64, 2, 3, 0xdead_beef] {
        let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
        let mut child = spawn_peer(&seg, "server");
        let mut client = seg
            .client_with(Channel::Eval, client_cfg(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        echo(&mut client, seed, 10)?;
        client
            .send(OP_SCRIBBLE, 0, 0, |_| {})
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        match client.recv(Instant::now() + Duration::from_secs(5)) {
            Err(RingError::PeerCorrupt { .. } | RingError::PeerLost { .. }) => {}
            other => {
                return Err(format!(
                    "seed {seed}: expected PeerCorrupt or PeerLost, got {other:?}"
                ));
            }
        }
        if t.elapsed() > Duration::from_secs(2) {
            return Err(format!("seed {seed}: took {:?}", t.elapsed()));
        }
        // The server itself must not have crashed on its own garbage either:
        // it either exited with an error (code 3) or is still running (and
        // dies of our SIGKILL); no other signal death.
        let status = stop(&mut child.0)?;
        if status.signal() != Some(libc::SIGKILL) && status.code() != Some(3) {
            return Err(format!(
                "seed {seed}: the scribbling server ended by {status:?}"
            ));
        }
        seg.bump_epoch();
        let mut child = spawn_peer(&seg, "server");
        let mut ok = false;
        for attempt in 0..3 {
            if echo(&mut client, 1000 + attempt, 10).is_ok() {
                ok = true;
                break;
            }
        }
        kill(&mut child.0)?;
        if !ok {
            return Err(format!("seed {seed}: no recovery after the epoch bump"));
        }
    }
    Ok(())
}

/// A peer of another layout version refuses with a clear error, in a real
/// child process and in-process; so does a file that is not a sealed memfd.
fn layout_mismatch_is_clear() -> Result<(), String> {
    let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
    // Play an older build: rewrite the layout version word (offset 8).
    let fd = seg.fd().try_clone_to_owned().map_err(|e| e.to_string())?;
    let file = std::fs::File::from(fd);
    std::os::unix::fs::FileExt::write_at(&file, &99u32.to_le_bytes(), 8)
        .map_err(|e| e.to_string())?;
    let out = {
        let mut child = spawn_peer(&seg, "attach");
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().expect("piped"), &mut stderr).ok();
        (child.0.wait().map_err(|e| e.to_string())?, stderr)
    };
    if out.0.code() != Some(3)
        || !out.1.contains(&format!(
            "layout version 99, this build speaks version {}",
            evod_ring::LAYOUT_VERSION
        ))
    {
        return Err(format!("child attach: {:?} {:?}", out.0, out.1));
    }
    let dup = seg.fd().try_clone_to_owned().map_err(|e| e.to_string())?;
    match Segment::attach(dup) {
        Err(RingError::LayoutMismatch { what }) if what.contains("layout version 99") => {}
        other => return Err(format!("in-process attach: {other:?}")),
    }
    let tmp = tempfile::tempfile().map_err(|e| e.to_string())?;
    match Segment::attach(tmp.into()) {
        Err(RingError::LayoutMismatch { what }) if what.contains("not a sealed memfd") => {}
        other => return Err(format!("attach of a plain file: {other:?}")),
    }
    // The owner's bump restores the header, so a new worker can attach.
    seg.bump_epoch();
    let mut child = spawn_peer(&seg, "attach");
    let status = child.0.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("attach after bump: {status:?}"));
    }
    Ok(())
}

/// After every process (the owner included) is SIGKILLed, nothing of ours
/// is left in /dev/shm; the segment was never there.
fn nothing_left_in_dev_shm() -> Result<(), String> {
    let list = || -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = list();
    let mut owner = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .env("EVOD_RING_PEER", "owner")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(owner.stdout.as_mut().ok_or("no stdout")?),
        &mut line,
    )
    .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!("owner said {line:?}"));
    }
    // The segment is a memfd: visible only as an fd of the owner.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", owner.id()))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if !fds.iter().any(|p| p.starts_with("/memfd:evod-ring")) {
        return Err(format!("owner has no evod-ring memfd: {fds:?}"));
    }
    // Kill the owner's whole family: the server grandchild first (found via
    // /proc children), then the owner.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", owner.id()))
        .unwrap_or_default();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| e.to_string())?;
    }
    kill(&mut owner)?;
    let after = list();
    let new: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
    if !new.is_empty() || after.iter().any(|n| n.contains("evod")) {
        return Err(format!("left in /dev/shm: {new:?} / {after:?}"));
    }
    Ok(())
}

/// Heartbeats and stats are visible across processes: the counts per
/// opcode, the other-opcode bucket, errors, service times, the model
/// generation, the uptime, the tokens counted by purpose, and what the
/// worker was serving when it died.
fn heartbeat_and_stats_cross_processes() -> Result<(), String> {
    let seg = Segment::create(&small()).map_err(|e| e.to_string())?;
    if seg.last_beat(Role::Worker).is_some() {
        return Err("worker beat before it existed".into());
    }
    let s = seg.stats();
    if s.requests_per_opcode.iter().any(|&c| c != 0)
        || s.errors != 0
        || s.uptime.is_some()
        || s.model_generation != 0
        || s.tokens != [0, 0]
    {
        return Err(format!("stats before any worker: {s:?}"));
    }
    let mut child = spawn_peer(&seg, "server");
    let mut client = seg
        .client_with(Channel::Eval, client_cfg(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let deadline = || Instant::now() + Duration::from_secs(10);
    for i in 0..5 {
        echo(&mut client, i, 32)?;
    }
    for _ in 0..2 {
        let r = client
            .call(OP_FAIL, 0, 0, |_| {}, deadline())
            .map_err(|e| format!("FAIL: {e}"))?;
        if r.status() != 7 {
            return Err(format!("FAIL answered with status {}", r.status()));
        }
    }
    client
        .call(OP_OTHER, 0, 0, |_| {}, deadline())
        .map_err(|e| format!("OTHER: {e}"))?;
    // The peer counts a request after replying: wait for the last count.
    if !eventually(Duration::from_secs(10), || {
        seg.stats().requests_other_opcodes == 1
    }) {
        return Err(format!("OTHER never counted: {:?}", seg.stats()));
    }
    let beating = eventually(Duration::from_secs(10), || {
        seg.last_beat(Role::Worker).is_some_and(|b| b.count >= 3)
    });
    if !beating {
        return Err(format!(
            "worker heartbeat: {:?}",
            seg.last_beat(Role::Worker)
        ));
    }
    let s = seg.stats();
    let count = |op: u32| count_of(&s, op);
    if s.requests_per_opcode.len() != evod_ring::STATS_OPCODES
        || count(OP_ECHO) != 5
        || count(OP_FAIL) != 2
        || count(OP_SLOW) != 0
        || s.requests_per_opcode.iter().sum::<u64>() != 7
        || s.requests_other_opcodes != 1
        || s.errors != 2
        || s.max_service < FAIL_SERVICE
        || s.last_service > s.max_service
        || s.model_generation != PEER_GENERATION
        || s.uptime.is_none_or(|u| u > Duration::from_secs(60))
        || s.in_service.is_some()
        || s.tokens != [5 * 32, 2]
    {
        return Err(format!("stats after 5 ECHO, 2 FAIL, 1 OTHER: {s:?}"));
    }
    // What a dead worker was doing stays readable after its death.
    send_slow(&seg, &mut client)?;
    drop(client);
    kill(&mut child.0)?;
    let s = seg.stats();
    if s.in_service != Some(OP_SLOW)
        || count_of(&s, OP_SLOW) != 1
        || s.last_service != Duration::ZERO
    {
        return Err(format!("stats after the worker died in SLOW: {s:?}"));
    }
    // A new incarnation starts from zero.
    seg.bump_epoch();
    let s = seg.stats();
    if s.requests_per_opcode.iter().any(|&c| c != 0)
        || s.errors != 0
        || s.in_service.is_some()
        || s.tokens != [0, 0]
    {
        return Err(format!("stats after the epoch bump: {s:?}"));
    }
    Ok(())
}

fn count_of(s: &evod_ring::StatsSnapshot, op: u32) -> u64 {
    s.requests_per_opcode[op as usize]
}

/// `attach_inherited(1)` (a `--ring-fd 1` typo) fails with an error naming
/// descriptor 1 and what is wrong with it, and leaves stdout open: a line
/// the peer writes afterwards reaches us.
fn attach_of_stdout_fails_and_keeps_it_open() -> Result<(), String> {
    let out = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .env("EVOD_RING_PEER", "attach-stdout")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.code() != Some(3)
        || !stderr.contains("descriptor 1 is not an evod ring segment")
        || !stderr.contains("not a sealed memfd")
        || stdout != "stdout still open\n"
    {
        return Err(format!(
            "peer {:?}, stderr {stderr:?}, stdout {stdout:?}",
            out.status
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var("EVOD_RING_PEER") {
        return peer_main(&mode);
    }
    type Test = (&'static str, fn() -> Result<(), String>);
    let tests: &[Test] = &[
        ("million_round_trips", million_round_trips),
        (
            "sigkill_gives_peer_lost_then_respawn_works",
            sigkill_gives_peer_lost_then_respawn_works,
        ),
        (
            "epoch_bump_wakes_parked_client",
            epoch_bump_wakes_parked_client,
        ),
        (
            "targeted_corruption_is_peer_corrupt",
            targeted_corruption_is_peer_corrupt,
        ),
        ("random_bytes_over_segment", random_bytes_over_segment),
        ("layout_mismatch_is_clear", layout_mismatch_is_clear),
        ("nothing_left_in_dev_shm", nothing_left_in_dev_shm),
        (
            "heartbeat_and_stats_cross_processes",
            heartbeat_and_stats_cross_processes,
        ),
        (
            "attach_of_stdout_fails_and_keeps_it_open",
            attach_of_stdout_fails_and_keeps_it_open,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    for (name, f) in tests {
        if !filter.is_empty() && !filter.iter().any(|p| name.contains(p.as_str())) {
            continue;
        }
        let t = Instant::now();
        match f() {
            Ok(()) => println!("test {name} ... ok ({:?})", t.elapsed()),
            Err(e) => {
                println!("test {name} ... FAILED ({:?}): {e}", t.elapsed());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
