//! `cargo xtask bench recovery`: SIGSEGV in a worker → first `PING` answered
//! by its replacement, next to a bare fork+exec+wait of `/bin/true`.
//!
//! This drives real `evod worker` processes (the release binary from
//! `EVOD_BIN`) with the supervisor's own spawn, standby and reaping code
//! (`evod_supervisor::{spawn, standby, reap}`)
//! and the ring: send `FAULT_SEGV` → `waitpid` → `bump_epoch` → promote the
//! warm standby (the daemon's default) or spawn a worker cold
//! (`--no-standby`) → `PING` until the new worker answers. With a standby,
//! the next one is started and waited for after the clock stops, before the
//! next crash. It leaves out the supervisor's event-loop hop (signal thread
//! → channel), a few microseconds.
//!
//! Usage: `bench_recovery OUT.json` (writes recovery_median_us,
//! recovery_p99_us, spawn_floor_median_us, recovery_1gib_median_us, and the
//! same for cold starts).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use evod_ring::{Channel, LayoutConfig, RingError, Role, Segment};

use evod_supervisor::spawn::{ChildSpec, spawn_program};
use evod_supervisor::standby::Standby;
use evod_wire::op::{FAULT_SEGV, PING};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn spec(seg: &Segment, model: &Path) -> ChildSpec {
    let fd = seg.fd().as_raw_fd();
    ChildSpec {
        role: "worker",
        args: vec![
            "--ring-fd".into(),
            fd.to_string().into(),
            "--model".into(),
            model.into(),
            "--allow-fault-injection".into(),
        ],
        keep_fds: vec![fd],
        harden: true,
        memory_limit: None,
        block_sighup: false,
    }
}

/// PINGs until a worker of the current epoch answers.
fn ping_until_answered(seg: &Segment, deadline: Instant) {
    loop {
        // The replacement has attached and serves once it beats (the epoch
        // bump reset the count); PINGing earlier would only queue requests.
        while seg.last_beat(Role::Worker).is_none() {
            assert!(Instant::now() < deadline, "the worker never beat");
            std::thread::yield_now();
        }
        assert!(Instant::now() < deadline, "the worker never answered PING");
        let mut client = seg.client(Channel::Control).expect("control client");
        match client.call(PING, 0, 0, |_| {}, deadline) {
            Ok(reply) if reply.header.status == 0 => return,
            Ok(reply) => panic!("PING refused with status {}", reply.header.status),
            // Lost (an older incarnation), or no room yet while a worker
            // that is still mapping its model has not drained the queue.
            Err(RingError::PeerLost { .. }) | Err(RingError::Timeout) | Err(RingError::Full) => {
                std::thread::yield_now();
                continue;
            }
            Err(e) => panic!("PING failed: {e}"),
        }
    }
}

/// A ready standby for the worker of `seg`.
fn ready_standby(evod: &Path, seg: &Segment, model: &Path) -> Standby {
    let mut standby = Standby::spawn(Some(evod), &spec(seg, model)).expect("spawn standby");
    standby
        .wait_ready(Instant::now() + Duration::from_secs(60))
        .expect("standby ready");
    standby
}

/// `crashes` SIGSEGV → replacement-answers cycles, sorted, and for each the
/// part until the dead worker was reaped (sorted too); `warm`: the
/// replacement is a promoted standby, else a cold start.
fn recovery(evod: &Path, model: &Path, crashes: usize, warm: bool) -> (Vec<f64>, Vec<f64>) {
    let seg = Segment::create(&LayoutConfig::default()).expect("segment");
    let mut child = spawn_program(evod, &spec(&seg, model)).expect("spawn worker");
    ping_until_answered(&seg, Instant::now() + Duration::from_secs(60));
    let mut spare = warm.then(|| ready_standby(evod, &seg, model));
    let mut samples = Vec::with_capacity(crashes);
    let mut reaped = Vec::with_capacity(crashes);
    for _ in 0..crashes {
        let start = Instant::now();
        {
            let mut client = seg.client(Channel::Control).expect("control client");
            client
                .send(FAULT_SEGV, 0, 4, |b| b.fill(0))
                .expect("send fault");
        }
        let reason = child.wait().expect("worker reaped");
        reaped.push(us(start.elapsed()));
        assert_eq!(reason.to_string(), "killed by signal 11 (SIGSEGV)");
        seg.bump_epoch();
        child = match spare.take() {
            Some(standby) => standby.promote().expect("promote standby").0,
            None => spawn_program(evod, &spec(&seg, model)).expect("respawn worker"),
        };
        ping_until_answered(&seg, Instant::now() + Duration::from_secs(60));
        samples.push(us(start.elapsed()));
        if warm {
            spare = Some(ready_standby(evod, &seg, model));
        }
    }
    drop(spare);
    drop(child);
    samples.sort_by(f64::total_cmp);
    reaped.sort_by(f64::total_cmp);
    (samples, reaped)
}

fn spawn_floor(n: usize) -> Vec<f64> {
    let mut samples: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let status = Command::new("/bin/true").status().expect("/bin/true");
            assert!(status.success());
            us(start.elapsed())
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples
}

fn init(evod: &Path, dir: &Path, args: &[&str]) -> PathBuf {
    let status = Command::new(evod)
        .current_dir(dir)
        .arg("init")
        .args(args)
        .status()
        .expect("evod init");
    assert!(status.success(), "evod init {args:?} failed");
    dir.join("vectorland.gguf")
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: bench_recovery OUT.json");
    let evod =
        PathBuf::from(std::env::var("EVOD_BIN").expect("EVOD_BIN (set by cargo xtask bench)"));
    let small_dir = tempfile::tempdir().unwrap();
    let small = init(&evod, small_dir.path(), &[]);
    let big_dir = tempfile::tempdir().unwrap();
    // 1 → 16380 → 16380 → 1: 268.35 M f32 parameters, 1.0 GiB (the runtime caps a model at 2^28 parameters).
    let big = init(
        &evod,
        big_dir.path(),
        &["--task", "sine", "--layers", "1,16380,16380,1"],
    );
    let big_bytes = std::fs::metadata(&big).unwrap().len();

    let floor = spawn_floor(300);
    let (warm, warm_reaped) = recovery(&evod, &small, 250, true);
    let (cold, _) = recovery(&evod, &small, 250, false);
    let (big_warm, _) = recovery(&evod, &big, 20, true);
    let (big_cold, _) = recovery(&evod, &big, 20, false);
    let floor_median = percentile(&floor, 0.5);
    let median = percentile(&warm, 0.5);
    let cold_median = percentile(&cold, 0.5);
    let result = serde_json::json!({
        "recovery_median_us": median,
        "recovery_p99_us": percentile(&warm, 0.99),
        "recovery_crashes": warm.len(),
        "spawn_floor_median_us": floor_median,
        "spawn_floor_p99_us": percentile(&floor, 0.99),
        "recovery_over_floor": median / floor_median,
        "recovery_reaped_median_us": percentile(&warm_reaped, 0.5),
        "recovery_1gib_median_us": percentile(&big_warm, 0.5),
        "recovery_1gib_crashes": big_warm.len(),
        "recovery_cold_median_us": cold_median,
        "recovery_cold_p99_us": percentile(&cold, 0.99),
        "recovery_cold_over_floor": cold_median / floor_median,
        "recovery_1gib_cold_median_us": percentile(&big_cold, 0.5),
        "model_1gib_bytes": big_bytes,
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap() + "\n").unwrap();
}
