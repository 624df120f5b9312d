//! `cargo xtask bench ring`: round trips over the ring against a Unix socket
//! and a pipe measured by the same harness in the same run, plus the CPU an
//! idle (parked) client/worker pair burns. Writes the JSON file named by the
//! first argument. The peer is this binary re-executed (`EVOD_RING_BENCH`).
//!
//! The floor every ring figure is read against is measured in the same run,
//! with the same pinning and timing, in blocks alternating with the ring's
//! PING: two processes bouncing one `AtomicU64` on one shared cache line
//! (`cacheline_rtt_*`); a round trip cannot cost less than that line going
//! there and back. Beside it, `two_slot_rtt_*`: the ring's shape with no
//! code around it (a 64-byte request slot one way, a 64-byte response slot
//! the other, each published by a stamp), the floor of any design with a
//! request queue and a response queue.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use evod_ring::{Channel, ClientConfig, LayoutConfig, Segment, ServerConfig, WaitPolicy};

const OP_ECHO: u32 = 1;
const OP_IGNORE: u32 = 2;

fn policy(spin: bool) -> WaitPolicy {
    WaitPolicy {
        spin: if spin {
            Duration::from_micros(200)
        } else {
            Duration::ZERO
        },
        slice: Duration::from_millis(50),
    }
}

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; we pass its size and a valid pointer.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn env_usize(k: &str) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn peer() {
    pin(env_usize("BENCH_CPU"));
    let mode = std::env::var("EVOD_RING_BENCH").unwrap_or_default();
    let fd = env_usize("BENCH_FD") as RawFd;
    match mode.as_str() {
        "server" | "server-park" => {
            // SAFETY: BENCH_FD is the segment descriptor the parent passed;
            // nothing else in this process owns it.
            let seg = unsafe { Segment::attach_inherited(fd) }.expect("attach");
            let cfg = ServerConfig {
                wait: policy(mode == "server"),
                ..ServerConfig::default()
            };
            let mut server = seg.server_with(cfg).expect("server");
            loop {
                let Some((_, req)) = server.recv(Duration::from_secs(60)).expect("recv") else {
                    continue;
                };
                if req.header.opcode == OP_IGNORE {
                    continue;
                }
                // Echo with one copy into the segment (`reply_bytes`).
                let p = req.payload;
                req.reply_bytes(0, p).expect("reply");
            }
        }
        "idle-client" => {
            // SAFETY: BENCH_FD is the segment descriptor the parent passed;
            // nothing else in this process owns it.
            let seg = unsafe { Segment::attach_inherited(fd) }.expect("attach");
            let cfg = ClientConfig {
                peer_timeout: Duration::from_secs(3600),
                wait: policy(true),
            };
            let mut client = seg.client_with(Channel::Eval, cfg).expect("client");
            client.send(OP_IGNORE, 0, 0, |_| {}).expect("send");
            let _ = client.recv(Instant::now() + Duration::from_secs(3600));
        }
        // The floor: answer every odd value on the shared line with the next.
        "cacheline" => {
            let line = Line::attach(fd);
            let w = line.word(0);
            loop {
                // Acquire/Release as a ring would use; nothing else is read.
                // No `spin_loop` hint: the ring's first polls have none.
                let v = w.load(Ordering::Acquire);
                if v % 2 == 1 {
                    w.store(v + 1, Ordering::Release);
                }
            }
        }
        // The two-slot exchange: copy each request slot into a response slot.
        "two-slot" => {
            let line = Line::attach(fd);
            let mut pos = 0u64;
            loop {
                pos += 1;
                while line.word(REQ_SLOT + 7).load(Ordering::Acquire) != pos {}
                for k in 0..7 {
                    let v = line.word(REQ_SLOT + k).load(Ordering::Relaxed);
                    line.word(RESP_SLOT + k).store(v, Ordering::Relaxed);
                }
                line.word(RESP_SLOT + 7).store(pos, Ordering::Release);
            }
        }
        // Byte echo over an inherited stream descriptor (socket or pipe pair).
        "echo-fd" => {
            // SAFETY: descriptors inherited for this purpose, owned by nothing else.
            let mut rx = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut tx = unsafe { std::fs::File::from_raw_fd(env_usize("BENCH_FD2") as RawFd) };
            let mut b = [0u8; 1];
            while rx.read_exact(&mut b).is_ok() {
                if tx.write_all(&b).is_err() {
                    break;
                }
            }
        }
        other => panic!("unknown bench peer {other}"),
    }
}

fn spawn(mode: &str, cpu: usize, fds: &[RawFd]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.env("EVOD_RING_BENCH", mode)
        .env("BENCH_CPU", cpu.to_string());
    if let Some(fd) = fds.first() {
        cmd.env("BENCH_FD", fd.to_string());
    }
    if let Some(fd) = fds.get(1) {
        cmd.env("BENCH_FD2", fd.to_string());
    }
    let fds = fds.to_vec();
    // SAFETY: between fork and exec we only call async-signal-safe fcntl and prctl.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn peer")
}

fn median_p99(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// Round trips of `len`-byte payloads over the ring, client on `ccpu`,
/// worker on `scpu`.
fn ring_rtt(spin: bool, len: usize, n: usize, ccpu: usize, scpu: usize) -> (u64, u64) {
    median_p99(ring_samples(spin, len, n, (ccpu, scpu), false))
}

/// The samples behind `ring_rtt`.
///
/// The deadline each call needs is computed once per block (a clock read
/// costs ~40 ns on this VM, as much as a cache-line transfer, and the
/// floor's loop does not have one either) unless `deadline_per_call`.
fn ring_samples(
    spin: bool,
    len: usize,
    n: usize,
    (ccpu, scpu): (usize, usize),
    deadline_per_call: bool,
) -> Vec<u64> {
    pin(ccpu);
    let seg = Segment::create(&LayoutConfig {
        queue_depth: 64,
        payload_bytes: 8 << 20,
    })
    .expect("segment");
    let mut cmd_fd = Command::new("true");
    let fd = seg.pass_to(&mut cmd_fd);
    let mut child = spawn(if spin { "server" } else { "server-park" }, scpu, &[fd]);
    let cfg = ClientConfig {
        peer_timeout: Duration::from_secs(10),
        wait: policy(spin),
    };
    let mut client = seg.client_with(Channel::Eval, cfg).expect("client");
    let mut times = Vec::with_capacity(n);
    let warm = (n / 10).max(10);
    let block_deadline = Instant::now() + Duration::from_secs(600);
    for i in 0..n + warm {
        let t = Instant::now();
        let deadline = if deadline_per_call {
            Instant::now() + Duration::from_secs(10)
        } else {
            block_deadline
        };
        let r = client
            .call(OP_ECHO, 0, len, |b| b.fill(i as u8), deadline)
            .expect("call");
        assert_eq!(r.payload.len(), len);
        drop(r);
        if i >= warm {
            times.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(client);
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// One page of a memfd mapped shared, holding the bounced word at offset 0.
struct Line {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Line {
    fn new() -> Line {
        // SAFETY: a constant NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"evod-bench-line".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: memfd_create returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a live descriptor and a small length.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        Line::map(fd)
    }

    fn attach(fd: RawFd) -> Line {
        // SAFETY: inherited for this purpose, owned by nothing else.
        Line::map(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn map(fd: OwnedFd) -> Line {
        // SAFETY: a fresh shared mapping of a 4096-byte file at an address
        // the kernel picks; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap");
        Line {
            fd,
            ptr: ptr.cast(),
        }
    }

    /// The `i`-th u64 of the page (`i < 512`).
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < 4096 / 8);
        // SAFETY: 8-aligned (page-aligned base), inside the 4096-byte
        // mapping, which lives (never unmapped) as long as `self`; any bits
        // are a valid u64.
        unsafe { &*self.ptr.cast::<AtomicU64>().add(i) }
    }
}

/// Word index of the two-slot exchange's request slot (a cache line of its
/// own: 7 words of header, then the stamp), and of its response slot, 1 KiB
/// further (no adjacent-line prefetch between them).
const REQ_SLOT: usize = 64;
const RESP_SLOT: usize = 192;

/// The floors and the spinning PING, measured in alternating blocks (a
/// fresh peer per block) so that all see the same vCPU placement: the host
/// moves this VM's vCPUs between physical cores, and the floor moves with it
/// (see docs/benchmarks.md).
struct Hot {
    /// (median, p99) of: one cache line, two slots, PING, PING with a
    /// deadline per call.
    line: (u64, u64),
    two_slot: (u64, u64),
    ping: (u64, u64),
    ping_deadline: (u64, u64),
    /// Per block: (floor median, PING median).
    blocks: Vec<(u64, u64)>,
}

fn hot_round_trips(blocks: usize, per_block: usize, scpu: usize) -> Hot {
    let mut all = [(); 4].map(|_| Vec::with_capacity(blocks * per_block));
    let mut pairs = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let line = cacheline_samples(per_block, 0, scpu);
        let ping = ring_samples(true, 0, per_block, (0, scpu), false);
        pairs.push((median_p99(line.clone()).0, median_p99(ping.clone()).0));
        all[0].extend(line);
        all[1].extend(two_slot_samples(per_block, 0, scpu));
        all[2].extend(ping);
        all[3].extend(ring_samples(true, 0, per_block, (0, scpu), true));
    }
    let [line, two_slot, ping, ping_deadline] = all.map(median_p99);
    Hot {
        line,
        two_slot,
        ping,
        ping_deadline,
        blocks: pairs,
    }
}

/// Round trips of the two-slot exchange (see the module comment).
fn two_slot_samples(n: usize, ccpu: usize, scpu: usize) -> Vec<u64> {
    pin(ccpu);
    let line = Line::new();
    let mut child = spawn("two-slot", scpu, &[line.fd.as_raw_fd()]);
    let mut times = Vec::with_capacity(n);
    let warm = (n / 10).max(10);
    for i in 0..(n + warm) as u64 {
        let t = Instant::now();
        for k in 0..7 {
            line.word(REQ_SLOT + k)
                .store(i.wrapping_mul(k as u64), Ordering::Relaxed);
        }
        line.word(REQ_SLOT + 7).store(i + 1, Ordering::Release);
        while line.word(RESP_SLOT + 7).load(Ordering::Acquire) != i + 1 {}
        let mut sum = 0u64;
        for k in 0..7 {
            sum = sum.wrapping_add(line.word(RESP_SLOT + k).load(Ordering::Relaxed));
        }
        std::hint::black_box(sum);
        if i >= warm as u64 {
            times.push(t.elapsed().as_nanos() as u64);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// Round trips of one cache line between two processes: we write an odd
/// value, the peer answers with the next even one.
fn cacheline_samples(n: usize, ccpu: usize, scpu: usize) -> Vec<u64> {
    pin(ccpu);
    let line = Line::new();
    let mut child = spawn("cacheline", scpu, &[line.fd.as_raw_fd()]);
    let w = line.word(0);
    let mut times = Vec::with_capacity(n);
    let warm = (n / 10).max(10);
    let mut v = 0u64;
    for i in 0..n + warm {
        let t = Instant::now();
        w.store(v + 1, Ordering::Release);
        while w.load(Ordering::Acquire) != v + 2 {}
        v += 2;
        if i >= warm {
            times.push(t.elapsed().as_nanos() as u64);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// One-byte round trips over a stream pair (`uds` or `pipe`).
fn stream_rtt(uds: bool, n: usize, ccpu: usize, scpu: usize) -> (u64, u64) {
    pin(ccpu);
    let (mut tx, mut rx, peer_rx, peer_tx): (std::fs::File, std::fs::File, OwnedFd, OwnedFd) =
        if uds {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let a2 = a.try_clone().expect("dup");
            let b2 = b.try_clone().expect("dup");
            (
                OwnedFd::from(a).into(),
                OwnedFd::from(a2).into(),
                b.into(),
                b2.into(),
            )
        } else {
            let (r1, w1) = nix::unistd::pipe().expect("pipe");
            let (r2, w2) = nix::unistd::pipe().expect("pipe");
            (w1.into(), r2.into(), r1, w2)
        };
    let mut child = spawn("echo-fd", scpu, &[peer_rx.as_raw_fd(), peer_tx.as_raw_fd()]);
    drop((peer_rx, peer_tx));
    let mut b = [0u8; 1];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        tx.write_all(&[i as u8]).expect("write");
        rx.read_exact(&mut b).expect("read");
        if i >= n / 10 {
            times.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(tx);
    let _ = child.kill();
    let _ = child.wait();
    median_p99(times)
}

/// utime + stime ticks of `pid` from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &s[s.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line are 12 and 13 after "pid (comm) ".
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

/// CPU % of one core burnt by a parked worker plus a parked client waiting
/// on it, over `secs` seconds.
fn idle_cpu(secs: u64) -> f64 {
    let seg = Segment::create(&LayoutConfig::default()).expect("segment");
    let mut cmd_fd = Command::new("true");
    let fd = seg.pass_to(&mut cmd_fd);
    let mut server = spawn("server", 0, &[fd]);
    let mut client = spawn("idle-client", 1, &[fd]);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(server.id()) + cpu_ticks(client.id());
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let t1 = cpu_ticks(server.id()) + cpu_ticks(client.id());
    let elapsed = start.elapsed().as_secs_f64();
    for c in [&mut server, &mut client] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (t1 - t0) as f64 / hz / elapsed * 100.0
}

fn main() {
    if std::env::var_os("EVOD_RING_BENCH").is_some() {
        return peer();
    }
    let out = std::env::args().nth(1).expect("usage: bench_ring OUT.json");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let other = if cpus > 1 { 1 } else { 0 };
    let hot = hot_round_trips(10, 20_000, other);
    let (line_med, line_p99) = hot.line;
    let (spin_med, spin_p99) = hot.ping;
    let (dl_med, dl_p99) = hot.ping_deadline;
    let mut block_ratios: Vec<f64> = hot
        .blocks
        .iter()
        .map(|&(l, p)| p as f64 / l.max(1) as f64)
        .collect();
    block_ratios.sort_by(f64::total_cmp);
    let block_ratio = block_ratios[block_ratios.len() / 2];
    if std::env::var_os("BENCH_RING_QUICK").is_some() {
        // Iterating on the hot path: only the floors and the spinning PING.
        println!(
            "cacheline {line_med}/{line_p99} ns, two-slot {}/{} ns, ping {spin_med}/{spin_p99} ns, \
             ping with a deadline per call {dl_med}/{dl_p99} ns, blocks {:?}",
            hot.two_slot.0, hot.two_slot.1, hot.blocks
        );
        return;
    }
    let (spin_same_med, spin_same_p99) = ring_rtt(true, 0, 20_000, 0, 0);
    let (park_med, park_p99) = ring_rtt(false, 0, 5_000, 0, other);
    let (k64, _) = ring_rtt(true, 64 << 10, 5_000, 0, other);
    let (m4, _) = ring_rtt(true, 4 << 20, 200, 0, other);
    let (uds_med, uds_p99) = stream_rtt(true, 20_000, 0, other);
    let (uds_same, _) = stream_rtt(true, 20_000, 0, 0);
    let (pipe_med, pipe_p99) = stream_rtt(false, 20_000, 0, other);
    let (pipe_same, _) = stream_rtt(false, 20_000, 0, 0);
    let idle = idle_cpu(10);
    let json = serde_json::json!({
        "cacheline_rtt_median_ns": line_med,
        "cacheline_rtt_p99_ns": line_p99,
        "two_slot_rtt_median_ns": hot.two_slot.0,
        "two_slot_rtt_p99_ns": hot.two_slot.1,
        "ping_over_cacheline_ratio": spin_med as f64 / line_med.max(1) as f64,
        "ping_over_cacheline_block_median_ratio": block_ratio,
        "blocks_cacheline_vs_ping_median_ns": hot.blocks,
        "ping_rtt_spin_median_ns": spin_med,
        "ping_rtt_spin_p99_ns": spin_p99,
        "ping_rtt_spin_deadline_per_call_median_ns": dl_med,
        "ping_rtt_spin_deadline_per_call_p99_ns": dl_p99,
        "ping_rtt_spin_same_cpu_median_ns": spin_same_med,
        "ping_rtt_spin_same_cpu_p99_ns": spin_same_p99,
        "ping_rtt_park_median_ns": park_med,
        "ping_rtt_park_p99_ns": park_p99,
        "payload_64k_rtt_median_ns": k64,
        "payload_4m_rtt_median_ns": m4,
        "uds_rtt_median_ns": uds_med,
        "uds_rtt_p99_ns": uds_p99,
        "uds_rtt_same_cpu_median_ns": uds_same,
        "pipe_rtt_median_ns": pipe_med,
        "pipe_rtt_p99_ns": pipe_p99,
        "pipe_rtt_same_cpu_median_ns": pipe_same,
        "uds_over_ring_spin_ratio": uds_med as f64 / spin_med.max(1) as f64,
        "idle_cpu_percent": idle,
        "cpus": cpus,
        "pinning": "client on cpu 0, worker on cpu 1 (\"same_cpu\": both on cpu 0)",
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).expect("json")).expect("write output");
    println!("{}", serde_json::to_string_pretty(&json).expect("json"));
}
