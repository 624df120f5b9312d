//! `cargo xtask fault --storm N [--seed S]`: a fault storm against a real
//! daemon.
//!
//! Builds release `evod`, starts `evod run --allow-fault-injection` in a
//! fresh folder evolving a sine model large enough ([`LAYERS`], 134 KiB)
//! that a publish takes measurable time, and injects N faults drawn
//! from a seeded generator: worker SIGSEGV (fault opcode: a real invalid
//! write), SIGKILL, SIGABRT (real signals), hang, scribble, lie (a worker
//! that corrupts its ring and keeps running: the evolver has it recycled),
//! lie-control (the same on the control channel: the supervisor kills it),
//! exit(n) (fault opcodes through `evod fault`), evolver SIGKILL, and I/O errors on
//! publish (the evolver's fault plan `DIR/.evod/io-fault`). After each
//! fault it waits for the recovery that fault calls for and checks that
//! the model file is a valid evod model; after the run it counts zombies
//! among the daemon's children, segments left in `/dev/shm` and temporary
//! files, prints a table and fails if any invariant broke.
//!
//! The storm raises `--restart-intensity` and lowers `--backoff-max` (faults
//! come far faster than the production policy allows restarts) and raises
//! `--fallback-after` so that the crash-loop rollback, which has its own
//! test, does not mix into what the storm counts.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long any one recovery may take before the storm calls it failed.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long an I/O fault plan stays armed waiting for a publish to hit.
const IO_WINDOW: Duration = Duration::from_secs(5);

/// The evolved network: 33k parameters (a 134 KiB file, so a publish takes
/// measurable time), with layers narrow enough that the GA's mutations pass
/// the change bounds and the model keeps improving.
const LAYERS: &str = "1,128,128,128,1";

/// The storm's options.
struct Options {
    faults: u32,
    seed: u64,
    /// Use the dev-profile binary (already built by `cargo test` in CI)
    /// instead of building release.
    debug: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        faults: 0,
        seed: 1,
        debug: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--storm" => {
                opts.faults = value("--storm")?
                    .parse()
                    .context("--storm takes a number of faults")?
            }
            "--seed" => opts.seed = value("--seed")?.parse().context("--seed takes a number")?,
            "--debug" => opts.debug = true,
            other => {
                bail!(
                    "unknown option {other:?}: usage: cargo xtask fault --storm N [--seed S] [--debug]"
                )
            }
        }
    }
    if opts.faults == 0 {
        bail!("usage: cargo xtask fault --storm N [--seed S] [--debug] (N ≥ 1)");
    }
    Ok(opts)
}

/// xorshift64*: enough for choosing faults, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerSegv,
    WorkerKill,
    WorkerAbort,
    WorkerHang,
    WorkerScribble,
    WorkerLie,
    WorkerLieControl,
    WorkerExit,
    EvolverKill,
    Io,
}

impl Fault {
    /// Relative frequencies in the storm.
    const MIX: [(Fault, u64); 10] = [
        (Fault::WorkerSegv, 3),
        (Fault::WorkerKill, 2),
        (Fault::WorkerAbort, 2),
        (Fault::WorkerHang, 1),
        (Fault::WorkerScribble, 2),
        (Fault::WorkerLie, 1),
        (Fault::WorkerLieControl, 1),
        (Fault::WorkerExit, 2),
        (Fault::EvolverKill, 3),
        (Fault::Io, 2),
    ];

    fn pick(rng: &mut Rng) -> Fault {
        let total: u64 = Fault::MIX.iter().map(|m| m.1).sum();
        let mut r = rng.below(total);
        for (f, w) in Fault::MIX {
            if r < w {
                return f;
            }
            r -= w;
        }
        Fault::WorkerSegv
    }

    fn name(self) -> &'static str {
        match self {
            Fault::WorkerSegv => "worker SIGSEGV (invalid write)",
            Fault::WorkerKill => "worker SIGKILL",
            Fault::WorkerAbort => "worker SIGABRT",
            Fault::WorkerHang => "worker hang (watchdog)",
            Fault::WorkerScribble => "worker scribble + exit",
            Fault::WorkerLie => "worker lies, keeps running (recycled)",
            Fault::WorkerLieControl => "worker lies to the supervisor (killed)",
            Fault::WorkerExit => "worker exit(n)",
            Fault::EvolverKill => "evolver SIGKILL",
            Fault::Io => "publish I/O error",
        }
    }
}

#[derive(Default)]
struct Tally {
    injected: u32,
    recovered: u32,
}

/// The daemon's log file, read incrementally.
struct LogTail {
    file: std::fs::File,
    at: u64,
    partial: String,
    publish_failures: u64,
    published: u64,
}

impl LogTail {
    fn poll(&mut self) -> Result<()> {
        self.file.seek(SeekFrom::Start(self.at))?;
        let mut buf = String::new();
        let n = self.file.read_to_string(&mut buf)?;
        self.at += n as u64;
        self.partial.push_str(&buf);
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(());
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            if line.contains("failed (retrying next cycle)") {
                self.publish_failures += 1;
            }
            if line.contains("\"message\":\"published ") {
                self.published += 1;
            }
        }
        Ok(())
    }
}

struct Storm {
    evod: PathBuf,
    dir: PathBuf,
    daemon: Child,
    log: LogTail,
    invalid: u32,
    /// I/O fault plans during which no publish was attempted.
    io_unexercised: u32,
    /// The armed I/O fault plan: since when, and the failures logged then.
    io_armed: Option<(Instant, u64)>,
}

impl Storm {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.evod);
        c.env_remove("EVOD_DIR").env_remove("EVOD_CONTROL_SOCKET");
        c
    }

    fn status(&self) -> Option<serde_json::Value> {
        let o = self
            .cmd()
            .args(["status", "--json", "--dir"])
            .arg(&self.dir)
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// (pid, restarts, uptime) of worker `i` while it runs.
    fn worker(&self, i: u64) -> Option<(i32, u64, f64)> {
        let s = self.status()?;
        let w = s["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker" && c["index"] == i)?;
        if w["state"] != "running" {
            return None;
        }
        Some((
            w["pid"].as_i64()? as i32,
            w["restarts"].as_u64()?,
            w["uptime_s"].as_f64()?,
        ))
    }

    fn evolver_pid(&self) -> Option<i32> {
        children(self.daemon.id() as i32)
            .into_iter()
            .find(|c| c.role == "evolver" && c.state != 'Z')
            .map(|c| c.pid)
    }

    fn check_model(&mut self) {
        let path = self.dir.join("vectorland.gguf");
        if let Err(e) = evod_runtime::Model::open(&path) {
            eprintln!("storm: INVALID MODEL: {e}");
            self.invalid += 1;
        }
    }

    fn daemon_alive(&mut self) -> Result<()> {
        if let Some(status) = self.daemon.try_wait()? {
            bail!("the daemon exited during the storm: {status}");
        }
        Ok(())
    }

    /// Polls `cond` up to `within`; whether it held.
    fn wait(&mut self, within: Duration, mut cond: impl FnMut(&mut Storm) -> bool) -> Result<bool> {
        let end = Instant::now() + within;
        loop {
            self.log.poll()?;
            if cond(self) {
                return Ok(true);
            }
            self.daemon_alive()?;
            if Instant::now() > end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn model_generation(&self) -> u64 {
        evod_runtime::Model::open(&self.dir.join("vectorland.gguf"))
            .map_or(0, |m| m.spec.generation)
    }

    /// Injects one fault and waits for its recovery; whether it recovered.
    /// Resolves an armed I/O fault plan once a publish failed under it (or,
    /// with `force` or past IO_WINDOW, without one): removes the plan and
    /// waits for the failed publish to be retried successfully. Returns
    /// whether it recovered, or None while it stays armed.
    fn settle_io(&mut self, force: bool) -> Result<Option<bool>> {
        let Some((armed, failures)) = self.io_armed else {
            return Ok(None);
        };
        self.log.poll()?;
        let failed = self.log.publish_failures > failures;
        if !failed && !force && armed.elapsed() < IO_WINDOW {
            return Ok(None);
        }
        self.io_armed = None;
        std::fs::remove_file(self.dir.join(".evod/io-fault"))?;
        self.check_model();
        if !failed {
            self.io_unexercised += 1;
            return Ok(Some(true));
        }
        // The failed publish is retried every cycle: recovered once it
        // goes through.
        let published = self.log.published;
        Ok(Some(self.wait(RECOVERY, |s| s.log.published > published)?))
    }

    /// Injects one fault and waits for its recovery: whether it recovered,
    /// or None for an I/O fault plan left armed.
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<Option<bool>> {
        match fault {
            Fault::EvolverKill => {
                let mut pid = None;
                if !self.wait(RECOVERY, |s| {
                    pid = s.evolver_pid();
                    pid.is_some()
                })? {
                    bail!("no evolver is running");
                }
                let pid = pid.unwrap_or(0);
                std::thread::sleep(Duration::from_micros(rng.below(300_000)));
                signal(pid, libc::SIGKILL);
                Ok(Some(self.wait(RECOVERY, |s| {
                    s.evolver_pid().is_some_and(|p| p != pid)
                })?))
            }
            Fault::Io => {
                let (step, errno) = (
                    ["write", "fsync", "rename", "dirfsync"][rng.below(4) as usize],
                    ["ENOSPC", "EIO"][rng.below(2) as usize],
                );
                // Armed while the storm goes on, until a publish fails
                // under it (see `settle_io`): publishes come only with a
                // better generation, so waiting for one here would stall.
                let plan = self.dir.join(".evod/io-fault");
                std::fs::write(&plan, format!("{step} {errno}\n"))
                    .with_context(|| format!("writing {}", plan.display()))?;
                self.io_armed = Some((Instant::now(), self.log.publish_failures));
                Ok(None)
            }
            worker => {
                let w = rng.below(2);
                // The worker can go between the status that shows it up
                // and `evod fault`: garbage an earlier scribble or lie left
                // in its segment can get it recycled a moment later (seen:
                // "Eval reply to request id … that is not in flight", then
                // "worker 0 is not running"). Nothing was injected then, so
                // wait for the worker again and retry, a few times.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match self.inject_worker(worker, w, rng)? {
                        Injected::Done(recovered) => return Ok(Some(recovered)),
                        Injected::NotRunning(why) if tries < 5 => {
                            eprintln!(
                                "storm: worker {w} went before the fault reached it ({why}): again"
                            );
                        }
                        Injected::NotRunning(why) => {
                            eprintln!("storm: evod fault: {why}");
                            return Ok(Some(false));
                        }
                    }
                }
            }
        }
    }

    /// Injects worker fault `worker` into worker `w` once it is up and
    /// serving, and waits for its recovery.
    fn inject_worker(&mut self, worker: Fault, w: u64, rng: &mut Rng) -> Result<Injected> {
        let mut before = None;
        // Paced: the worker is up and serving (a crash within 1 s
        // of start is a quick crash, which backs off).
        if !self.wait(RECOVERY, |s| {
            before = s.worker(w).filter(|x| x.2 > 0.05);
            before.is_some()
        })? {
            bail!("worker {w} is not running");
        }
        let (pid, restarts, _) = before.unwrap_or_default();
        let kind = match worker {
            Fault::WorkerSegv => Some("segv".to_owned()),
            Fault::WorkerHang => Some("hang".to_owned()),
            Fault::WorkerScribble => Some("scribble".to_owned()),
            Fault::WorkerLie => Some("lie".to_owned()),
            Fault::WorkerLieControl => Some("lie-control".to_owned()),
            Fault::WorkerExit => Some(format!("exit:{}", 1 + rng.below(120))),
            Fault::WorkerKill => {
                signal(pid, libc::SIGKILL);
                None
            }
            _ => {
                signal(pid, libc::SIGABRT);
                None
            }
        };
        if let Some(kind) = kind {
            let o = self
                .cmd()
                .args(["fault", "--dir"])
                .arg(&self.dir)
                .args(["--worker", &w.to_string(), "--kind", &kind])
                .output()?;
            if !o.status.success() {
                let why = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                if why.contains("is not running") {
                    return Ok(Injected::NotRunning(why));
                }
                eprintln!("storm: evod fault {kind}: {why}");
                return Ok(Injected::Done(false));
            }
        }
        Ok(Injected::Done(self.wait(RECOVERY, |s| {
            s.worker(w).is_some_and(|x| x.1 > restarts)
        })?))
    }
}

/// What one try of a worker fault did.
enum Injected {
    /// Injected; whether the worker recovered.
    Done(bool),
    /// `evod fault` found the worker gone (its answer): nothing injected.
    NotRunning(String),
}

fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is
        // a child of the daemon we started, read from /proc or its status.
        unsafe { libc::kill(pid, sig) };
    }
}

struct Proc {
    pid: i32,
    state: char,
    role: String,
}

/// Children of `parent` (from /proc): pid, state letter and role argument.
fn children(parent: i32) -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = after.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: i32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid != parent {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let role = cmdline
            .split(|&b| b == 0)
            .nth(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default();
        out.push(Proc { pid, state, role });
    }
    out
}

/// Rows of `state/progress.csv` (one per generation).
fn progress_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("state/progress.csv"))
        .map_or(0, |t| t.lines().count().saturating_sub(1))
}

/// Names in /dev/shm that look like ours.
fn shm_entries() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("evod"))
                .collect()
        })
        .unwrap_or_default()
}

/// Temporary files anywhere under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains(".tmp.") {
                out.push(p);
            }
        }
    }
    out
}

/// The `evod` binary, built first (release, or dev with `debug`).
fn build_evod(debug: bool) -> Result<PathBuf> {
    let root = crate::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build.current_dir(&root).args(["build", "-p", "evod"]);
    if !debug {
        build.arg("--release");
    }
    crate::run(&mut build)?;
    let target = crate::target_dir();
    Ok(target.join(if debug { "debug/evod" } else { "release/evod" }))
}

/// Runs the storm (see the module documentation).
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let evod = build_evod(opts.debug)?;
    let shm_before = shm_entries();
    let dir = std::env::temp_dir().join(format!("evod-storm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = storm(&evod, &dir, &opts, &shm_before);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("storm: run folder kept for inspection: {}", dir.display());
    }
    result
}

fn storm(evod: &Path, dir: &Path, opts: &Options, shm_before: &[String]) -> Result<()> {
    crate::run(
        Command::new(evod)
            .current_dir(dir)
            .args(["init", "--task", "sine", "--layers", LAYERS, "--seed"])
            .arg(opts.seed.to_string()),
    )?;
    let log_path = dir.join("storm.log");
    let log_file = std::fs::File::create(&log_path)?;
    let daemon = Command::new(evod)
        .args(["run", "--dir"])
        .arg(dir)
        .args([
            "--workers",
            "2",
            "--allow-fault-injection",
            "--log-format",
            "json",
            "--heartbeat-timeout",
            "1s",
            "--restart-intensity",
            "1000000",
            "--backoff-max",
            "50ms",
            "--fallback-after",
            "1000000",
            "--population",
            "8",
            "--checkpoint-every",
            "1",
            "--pulse-every",
            "50",
            "--seed",
        ])
        .arg(opts.seed.to_string())
        .env_remove("EVOD_DIR")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting evod run")?;
    let mut s = Storm {
        evod: evod.to_owned(),
        dir: dir.to_owned(),
        daemon,
        log: LogTail {
            file: std::fs::File::open(&log_path)?,
            at: 0,
            partial: String::new(),
            publish_failures: 0,
            published: 0,
        },
        invalid: 0,
        io_unexercised: 0,
        io_armed: None,
    };
    let started = Instant::now();
    let result = (|| -> Result<BTreeMap<Fault, Tally>> {
        // The daemon answers and the first generation is out.
        if !s.wait(RECOVERY, |s| {
            s.status().is_some() && s.evolver_pid().is_some()
        })? {
            bail!("the daemon did not come up");
        }
        let mut rng = Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut tally: BTreeMap<Fault, Tally> = BTreeMap::new();
        let settle = |s: &mut Storm, tally: &mut BTreeMap<Fault, Tally>, force| {
            let settled = s.settle_io(force)?;
            if let Some(recovered) = settled {
                let t = tally.entry(Fault::Io).or_default();
                t.recovered += u32::from(recovered);
                if !recovered {
                    eprintln!("storm: a publish failed by an I/O error was not retried");
                }
            }
            anyhow::Ok(())
        };
        for i in 0..opts.faults {
            settle(&mut s, &mut tally, false)?;
            let mut fault = Fault::pick(&mut rng);
            // One I/O plan at a time. (An evolver killed while one is armed
            // is fine: the next one redoes the publish its checkpoint counts.)
            if s.io_armed.is_some() && fault == Fault::Io {
                fault = Fault::WorkerSegv;
            }
            let recovered = s.inject(fault, &mut rng)?;
            s.check_model();
            let t = tally.entry(fault).or_default();
            t.injected += 1;
            match recovered {
                Some(true) => t.recovered += 1,
                Some(false) => {
                    eprintln!("storm: fault {i} ({}) did not recover", fault.name())
                }
                None => {}
            }
            if (i + 1) % 50 == 0 {
                eprintln!(
                    "storm: {}/{} faults, {:.0}s",
                    i + 1,
                    opts.faults,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        settle(&mut s, &mut tally, true)?;
        // Evolution goes on after the storm (and a new evolver has removed
        // what a killed one left).
        let rows = progress_rows(&s.dir);
        if !s.wait(RECOVERY, |s| progress_rows(&s.dir) > rows + 1)? {
            bail!("the evolver did not evolve on after the storm");
        }
        Ok(tally)
    })();
    // Zombies: children of the daemon in state Z that stay so (a child
    // that just died is reaped on SIGCHLD within milliseconds).
    let mut zombies = 0;
    let zombie_deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let z = children(s.daemon.id() as i32)
            .iter()
            .filter(|c| c.state == 'Z')
            .count();
        if z == 0 || Instant::now() > zombie_deadline {
            zombies = zombies.max(z);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let final_generation = s.model_generation();
    let final_fitness = evod_runtime::Model::open(&dir.join("vectorland.gguf"))
        .ok()
        .and_then(|m| m.spec.fitness);
    // Stop gracefully.
    let _ = s.cmd().args(["stop", "--dir"]).arg(dir).output();
    let end = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(st) = s.daemon.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            let _ = s.daemon.kill();
            break s.daemon.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    s.log.poll()?;
    let tally = result?;
    s.check_model();
    let leaked: Vec<String> = shm_entries()
        .into_iter()
        .filter(|n| !shm_before.contains(n))
        .collect();
    let temps = temp_files(dir);
    let injected: u32 = tally.values().map(|t| t.injected).sum();
    let recovered: u32 = tally.values().map(|t| t.recovered).sum();
    let secs = started.elapsed().as_secs_f64();

    println!();
    println!(
        "fault storm: {} faults, seed {}, {:.0}s, {} evod, 2 workers, sine {LAYERS} ({} KiB model)",
        opts.faults,
        opts.seed,
        secs,
        if opts.debug { "debug" } else { "release" },
        std::fs::metadata(dir.join("vectorland.gguf")).map_or(0, |m| m.len() / 1024)
    );
    println!();
    println!("| fault | injected | recovered |");
    println!("|---|---:|---:|");
    for (fault, t) in &tally {
        println!("| {} | {} | {} |", fault.name(), t.injected, t.recovered);
    }
    println!("| **total** | **{injected}** | **{recovered}** |");
    println!();
    println!("| invariant | value |");
    println!("|---|---:|");
    println!("| generations published (log) | {} |", s.log.published);
    println!("| final model generation | {final_generation} |");
    println!(
        "| publishes failed by an injected I/O error (each retried) | {} |",
        s.log.publish_failures
    );
    println!(
        "| I/O fault windows without a publish attempt | {} |",
        s.io_unexercised
    );
    println!("| times the model file was invalid | {} |", s.invalid);
    println!("| zombies | {zombies} |");
    println!("| leaked segments (/dev/shm) | {} |", leaked.len());
    println!("| temporary files left | {} |", temps.len());
    println!(
        "| final fitness (neg. MSE) | {} |",
        final_fitness.map_or("none".into(), |f| format!("{f:.5}"))
    );
    println!(
        "| daemon exit | {} |",
        exit.code().map_or("signal".into(), |c| c.to_string())
    );

    let mut broken = Vec::new();
    if s.invalid > 0 {
        broken.push(format!("the model file was invalid {} times", s.invalid));
    }
    if recovered < injected {
        broken.push(format!("{} faults did not recover", injected - recovered));
    }
    if zombies > 0 {
        broken.push(format!("{zombies} zombies"));
    }
    if !leaked.is_empty() {
        broken.push(format!("leaked segments: {leaked:?}"));
    }
    if !temps.is_empty() {
        broken.push(format!("temporary files left: {temps:?}"));
    }
    if !exit.success() {
        broken.push(format!("the daemon exited with {exit}"));
    }
    if s.log.published == 0 {
        broken.push("nothing was published".into());
    }
    if !broken.is_empty() {
        bail!("fault storm: invariants broken: {}", broken.join("; "));
    }
    println!();
    println!("fault storm: every invariant held");
    Ok(())
}
