//! Distributed evaluation end to end (issue 15): a real `redis-server`
//! (started per test on a free loopback port, AOF fsynced at every write),
//! a coordinator (`evod run --broker`) and evaluator hosts (`evod join`),
//! all real processes on this machine. Each host has its own state folder
//! and host id, as separate machines would.
//!
//! Every run is the same small ES run — or, where the test's name starts
//! with `ga_`, the same small GA run — on the default CartPole model; the
//! single-host run with that seed (computed once) is the reference: every
//! distributed run — evaluators joining, one SIGKILLed mid-run, the
//! coordinator SIGKILLed and restarted, Redis SIGKILLed and restarted on
//! its AOF — must publish exactly its tensors, and count each (round,
//! candidate) once: the results the hosts recorded add up to the
//! evaluations the evolver counted. Waits are on conditions with
//! deadlines, never fixed sleeps.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{Daemon, children_with_role, evod, poll_until, text};
use evod_broker::{Coordinator as _, Task, Work};
use evod_evolve::{GaRecipe, Mutation, Recipe, Sign, TensorScale};
use evod_gguf::GgufFile;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis_server::{RedisServer, free_port};

/// A guard against a hang, not a timing test.
const DEADLINE: Duration = Duration::from_secs(120);
const RUN: &str = "t";

/// The evolution of every run here (single-host and distributed alike).
const EVOLVE: &[&str] = &[
    "--strategy",
    "es",
    "--population",
    "32",
    "--episodes",
    "2",
    "--generations",
    "12",
    "--seed",
    "5",
    // Publish before CartPole is solved, so the runs publish something.
    "--solve-threshold",
    "25",
    "--checkpoint-every",
    "1",
    "--workers",
    "1",
    "--no-standby",
];

/// The GA run (single-host and distributed alike): the default strategy,
/// with crossover, elites and σ self-adaptation.
const GA_EVOLVE: &[&str] = &[
    "--strategy",
    "ga",
    "--population",
    "16",
    "--episodes",
    "2",
    "--generations",
    "10",
    "--seed",
    "5",
    "--solve-threshold",
    "25",
    "--checkpoint-every",
    "1",
    "--workers",
    "1",
    "--no-standby",
];

/// The coordinator's broker options (besides `--broker`).
const COORDINATE: &[&str] = &[
    "--run-id",
    RUN,
    "--host-id",
    "coord",
    "--task-lease",
    "1s",
    "--lease-ttl",
    "1s",
    "--candidates-per-task",
    "4",
];

/// Tensor data checksum and `evod.generation` of a model file.
fn identity(path: &Path) -> (u64, u64) {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let generation = f.get("evod.generation").and_then(|v| v.as_u64()).unwrap();
    (f.checksum(), generation)
}

/// The single-host ES run's published model (computed once per test
/// binary).
fn reference() -> (u64, u64) {
    static REF: OnceLock<(u64, u64)> = OnceLock::new();
    *REF.get_or_init(|| single_host(EVOLVE))
}

/// The single-host GA run's published model (computed once per test
/// binary).
fn ga_reference() -> (u64, u64) {
    static REF: OnceLock<(u64, u64)> = OnceLock::new();
    *REF.get_or_init(|| single_host(GA_EVOLVE))
}

/// The published model of a single-host `evod run` with `evolve`.
fn single_host(evolve: &[&str]) -> (u64, u64) {
    let mut d = Daemon::spawn(tempfile::tempdir().unwrap(), evolve, DEADLINE);
    let status = d.wait_exit();
    assert!(status.success(), "reference run failed:\n{}", d.log());
    let id = identity(&d.dir().join("vectorland.gguf"));
    assert!(
        id.1 > 0,
        "the reference run published nothing:\n{}",
        d.log()
    );
    id
}

/// `evod run --broker URL` (a coordinator) on `dir` as host `id`,
/// unbounded (for the lease test).
fn unbounded_coordinator(dir: tempfile::TempDir, url: &str, id: &str) -> Daemon {
    // Every flag but `--generations` and `--host-id` (with their values).
    let mut args: Vec<&str> = Vec::new();
    let mut skip = false;
    for &a in EVOLVE.iter().chain(COORDINATE) {
        if std::mem::take(&mut skip) {
            continue;
        }
        if a == "--generations" || a == "--host-id" {
            skip = true;
            continue;
        }
        args.push(a);
    }
    args.extend_from_slice(&["--host-id", id, "--broker", url]);
    Daemon::spawn(dir, &args, DEADLINE)
}

/// An `evod join` host: its own state folder, log in `join.log`; killed
/// (with its children, by their parent-death signal) on drop.
struct Host {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Host {
    /// `evod join URL`.
    fn join(url: &str, id: &str) -> Host {
        Self::spawn(url, id, false, &[])
    }

    /// `EVOD_BROKER=URL evod join`.
    fn join_env(url: &str, id: &str) -> Host {
        Self::spawn(url, id, true, &[])
    }

    fn spawn(url: &str, id: &str, env: bool, extra: &[&str]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("join.log")).unwrap();
        let mut cmd = evod();
        cmd.arg("join");
        if env {
            cmd.env("EVOD_BROKER", url);
        } else {
            cmd.arg(url);
        }
        let child = cmd
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--run-id",
                RUN,
                "--host-id",
                id,
                "--task-lease",
                "1s",
                "--workers",
                "1",
                "--no-standby",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning evod join");
        Host {
            child: Some(child),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("join.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("a raw connection")
}

/// Results recorded per host id (the broker's count: each new
/// (round, candidate) once).
fn recorded(url: &str) -> Vec<(String, u64)> {
    redis::cmd("HGETALL")
        .arg(format!("evod:{{{RUN}}}:hosts:done"))
        .query(&mut raw(url))
        .unwrap_or_default()
}

/// Every task ever added to the run's stream, decoded.
fn enqueued(url: &str) -> Vec<Task> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(format!("evod:{{{RUN}}}:tasks"))
        .arg("-")
        .arg("+")
        .query(&mut raw(url))
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let (_, bytes) = fields.into_iter().find(|(k, _)| k == "t").unwrap();
            Task::decode(&bytes).unwrap()
        })
        .collect()
}

/// The evaluations the coordinator's evolver counted, from its last words
/// (`evod: reached N generations: …, E evaluations, …`).
fn evaluations(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("generations, ") && l.contains(" evaluations"))
        .unwrap_or_else(|| panic!("no summary line in:\n{log}"));
    let before = line.split(" evaluations").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The results the hosts recorded add up to the evolver's evaluations:
/// each (round, candidate) counted once.
fn assert_counted_once(url: &str, evaluations: u64) {
    let per_host = recorded(url);
    let total: u64 = per_host.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, evaluations,
        "results recorded by the hosts {per_host:?} do not add up to the evolver's evaluations"
    );
}

/// Everything Redis carried so far (commands and replies of every role:
/// tasks, results, heartbeats, waits, the model, the bases), in bytes.
fn network_bytes(url: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut raw(url))
        .unwrap();
    ["total_net_input_bytes", "total_net_output_bytes"]
        .iter()
        .map(|k| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// No task of the stream was enqueued twice (same round, same first
/// candidate).
fn assert_enqueued_once(url: &str) -> usize {
    let tasks = enqueued(url);
    let mut seen = HashSet::new();
    for t in &tasks {
        assert!(
            seen.insert((t.generation, t.first)),
            "round {} candidate {} enqueued twice",
            t.generation,
            t.first
        );
    }
    tasks.len()
}

fn redis() -> (tempfile::TempDir, RedisServer) {
    redis_server::start()
}

/// The coordinator's stdout goes nowhere in `Daemon`; its summary line is
/// on stdout, so these runs write it to `out.log` through a shell-free
/// redirect: run the coordinator with `evod()` here instead.
fn spawn_coordinator(dir: &Path, url: &str, extra: &[&str]) -> Child {
    spawn_coordinator_with(dir, url, EVOLVE, extra)
}

/// [`spawn_coordinator`] with the evolution options `evolve`.
fn spawn_coordinator_with(dir: &Path, url: &str, evolve: &[&str], extra: &[&str]) -> Child {
    let out = std::fs::File::create(dir.join("out.log")).unwrap();
    let err = std::fs::File::create(dir.join("run.log")).unwrap();
    let mut args: Vec<&str> = evolve.to_vec();
    args.extend_from_slice(COORDINATE);
    args.extend_from_slice(&["--broker", url]);
    args.extend_from_slice(extra);
    evod()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawning evod run --broker")
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Waits for the coordinator to finish successfully; its stdout.
fn finish(child: &mut Child, dir: &Path, hosts: &[&Host]) -> String {
    let status = common::wait_exit(child, DEADLINE);
    let logs = || {
        let mut s = format!("coordinator:\n{}", read(dir, "run.log"));
        for h in hosts {
            s.push_str(&format!("\nhost:\n{}", h.log()));
        }
        s
    };
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the coordinator did not finish\n{}", logs());
    };
    assert!(
        status.success(),
        "coordinator failed ({status})\n{}",
        logs()
    );
    read(dir, "out.log")
}

fn progress_rows(dir: &Path) -> usize {
    read(dir, "state/progress.csv")
        .lines()
        .count()
        .saturating_sub(1)
}

#[test]
fn two_hosts_evaluate_and_the_run_publishes_what_one_host_does() {
    let want = reference();
    let (_r, server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let b = Host::join_env(&url, "host-b");
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_coordinator(dir.path(), &url, &["--min-hosts", "2"]);
    // `evod status --json` on the coordinator lists the hosts with the
    // results each recorded.
    let hosts = poll_until(
        "evod status to list host-a and host-b with results",
        DEADLINE,
        || {
            let o = evod()
                .args(["status", "--json", "--dir"])
                .arg(dir.path())
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            let hosts = v["hosts"].as_array()?.clone();
            let done = |id: &str| {
                hosts
                    .iter()
                    .any(|h| h["host"] == id && h["tasks_done"].as_u64() > Some(0))
            };
            (done("host-a") && done("host-b")).then_some(hosts)
        },
        || format!("{}\n{}\n{}", read(dir.path(), "run.log"), a.log(), b.log()),
    );
    assert!(
        hosts
            .iter()
            .all(|h| h["workers"].as_u64() >= Some(1) && h["last_seen_s"].is_number()),
        "{hosts:?}"
    );
    // The URL (a password in real life) reaches the feeder, never a
    // worker, nor any command line.
    let has_broker = |pid: u32| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        environ
            .split(|&b| b == 0)
            .any(|kv| kv.starts_with(b"EVOD_BROKER="))
    };
    let cmdline =
        |pid: u32| text(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default());
    let feeder = children_with_role(b.pid(), "feeder");
    assert_eq!(feeder.len(), 1, "{}", b.log());
    assert!(has_broker(feeder[0]));
    assert!(!cmdline(feeder[0]).contains("redis://"));
    let workers = children_with_role(b.pid(), "worker");
    assert!(!workers.is_empty(), "{}", b.log());
    for w in workers {
        assert!(!has_broker(w), "worker {w} has EVOD_BROKER");
    }
    let out = finish(&mut child, dir.path(), &[&a, &b]);
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    let n_tasks = assert_enqueued_once(&url);
    assert!(n_tasks > 0);
    let candidates: usize = enqueued(&url).iter().map(|t| t.work.len()).sum();
    eprintln!(
        "ES: Redis network bytes in + out: {} ({:.0} per candidate, {candidates} candidates in {n_tasks} tasks)",
        network_bytes(&url),
        network_bytes(&url) as f64 / candidates as f64
    );
    assert!(out.contains("host-a") && out.contains("host-b"), "{out}");
    // A finished coordinator stops its lease keeper, then releases the
    // lease: never a keeper renewing a released lease ("took the run over").
    let log = read(dir.path(), "run.log");
    assert!(log.contains("coordinator lease released"), "{log}");
    assert!(!log.contains("took the run over"), "{log}");
    let lease: Option<String> = redis::cmd("GET")
        .arg(format!("evod:{{{RUN}}}:coordinator"))
        .query(&mut raw(&url))
        .unwrap();
    assert_eq!(lease, None);
}

#[test]
fn ga_on_two_hosts_publishes_what_one_host_does() {
    let want = ga_reference();
    let (_r, server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let b = Host::join(&url, "host-b");
    let dir = tempfile::tempdir().unwrap();
    // Every candidate is rebuilt and evaluated on a host from its recipe
    // and its parents fetched by checksum.
    let mut child = spawn_coordinator_with(
        dir.path(),
        &url,
        GA_EVOLVE,
        &["--remote-only", "--min-hosts", "2"],
    );
    let out = finish(&mut child, dir.path(), &[&a, &b]);
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert!(assert_enqueued_once(&url) > 0);
    // GA tasks (kind 2) only: children by their parents' checksums, a
    // crossover and a mutation seed, never weights; elite copies among
    // them, crossovers too.
    let tasks = enqueued(&url);
    let recipes: Vec<GaRecipe> = tasks
        .iter()
        .flat_map(|t| match &t.work {
            Work::Ga(r) => r.clone(),
            other => panic!("a GA run enqueued {other:?}"),
        })
        .collect();
    assert!(
        recipes
            .iter()
            .any(|r| r.cross.is_none() && r.mutation.is_none())
    );
    assert!(recipes.iter().any(|r| r.cross.is_some()));
    let bytes: usize = tasks.iter().map(|t| t.encode().unwrap().len()).sum();
    let per_candidate = bytes as f64 / recipes.len() as f64;
    let net = network_bytes(&url);
    eprintln!(
        "{per_candidate:.1} task bytes per GA candidate ({} candidates in {} tasks); Redis network bytes in + out: {net} ({:.0} per candidate)",
        recipes.len(),
        tasks.len(),
        net as f64 / recipes.len() as f64
    );
    assert!(
        per_candidate < 100.0,
        "{per_candidate} task bytes per GA candidate (a 114-parameter child is 456)"
    );
    let per_host = recorded(&url);
    for host in ["host-a", "host-b"] {
        assert!(
            per_host.iter().any(|(h, n)| h == host && *n > 0),
            "{host} evaluated nothing: {per_host:?}"
        );
    }
    assert!(
        !read(dir.path(), "run.log").contains("quarantined"),
        "{}",
        read(dir.path(), "run.log")
    );
}

#[test]
fn a_killed_evaluator_costs_a_retry_not_a_count() {
    killed_evaluator(EVOLVE, reference());
}

#[test]
fn ga_a_killed_evaluator_costs_a_retry_not_a_count() {
    killed_evaluator(GA_EVOLVE, ga_reference());
}

/// A run with `evolve` on two hosts, one SIGKILLed while it holds a
/// task, publishes `want` and counts each candidate once.
fn killed_evaluator(evolve: &[&str], want: (u64, u64)) {
    let (_r, server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let mut b = Host::join(&url, "host-b");
    let dir = tempfile::tempdir().unwrap();
    // Only the two hosts evaluate: host-a alone must take over what
    // host-b held.
    let mut child = spawn_coordinator_with(dir.path(), &url, evolve, &["--remote-only"]);
    // host-b dies (SIGKILL of its supervisor: its feeder and workers go
    // with it by their parent-death signal) while it holds a task: its
    // feeder is frozen (SIGSTOP) at a moment it holds one, so it can
    // neither finish nor hand it back before the SIGKILL.
    let feeder = poll_until(
        "host-b's feeder",
        DEADLINE,
        || children_with_role(b.pid(), "feeder").first().copied(),
        || b.log(),
    );
    let freeze = Pid::from_raw(feeder as i32);
    poll_until(
        "host-b's feeder frozen while it holds a task",
        DEADLINE,
        || {
            let done = recorded(&url).iter().any(|(h, n)| h == "host-b" && *n > 0);
            if !done || pending(&url, "host-b") == 0 {
                return None;
            }
            kill(freeze, Signal::SIGSTOP).unwrap();
            if pending(&url, "host-b") > 0 {
                return Some(());
            }
            // Acknowledged in between: try again.
            kill(freeze, Signal::SIGCONT).unwrap();
            None
        },
        || format!("{}\n{}", read(dir.path(), "run.log"), b.log()),
    );
    let held = pending(&url, "host-b");
    b.kill();
    assert!(held > 0, "host-b was frozen holding a task");
    let out = finish(&mut child, dir.path(), &[&a]);
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert_enqueued_once(&url);
    // What host-b held when it died was taken over by a live host; the
    // coordinator's own workers took nothing (`--remote-only`).
    assert_eq!(pending(&url, "host-b"), 0);
    assert!(
        recorded(&url).iter().all(|(h, n)| h != "coord" || *n == 0),
        "{:?}",
        recorded(&url)
    );
    let logs = format!("{}\n{}", read(dir.path(), "run.log"), a.log());
    assert!(
        logs.contains("took over tasks whose consumer went silent"),
        "host-b held {held} tasks when killed; nobody took them over:\n{logs}"
    );
}

#[test]
fn a_failing_host_hands_its_tasks_to_a_good_one_and_nothing_is_quarantined() {
    failing_host(EVOLVE, reference());
}

#[test]
fn ga_a_failing_host_hands_its_tasks_to_a_good_one_and_nothing_is_quarantined() {
    failing_host(GA_EVOLVE, ga_reference());
}

/// A run with `evolve` on a host whose workers crash on every candidate
/// and a good one: the bad host's failures cost retries on the good one,
/// never a candidate, and the run publishes `want`.
fn failing_host(evolve: &[&str], want: (u64, u64)) {
    let (_r, server) = redis();
    let url = server.url();
    // host-bad's workers crash (a real SIGSEGV) on every candidate.
    let bad = Host::spawn(
        &url,
        "host-bad",
        false,
        &["--allow-fault-injection", "--poison-one-in", "1"],
    );
    let good = Host::join(&url, "host-good");
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_coordinator_with(
        dir.path(),
        &url,
        evolve,
        &["--remote-only", "--min-hosts", "2"],
    );
    let out = finish(&mut child, dir.path(), &[&bad, &good]);
    let run_log = read(dir.path(), "run.log");
    // host-bad's failures cost retries on host-good, not candidates:
    // nothing dead-lettered or quarantined, and the run publishes what one
    // host does.
    assert!(!run_log.contains("quarantined"), "{run_log}");
    let dead: u64 = redis::cmd("XLEN")
        .arg(format!("evod:{{{RUN}}}:dead"))
        .query(&mut raw(&url))
        .unwrap();
    assert_eq!(dead, 0, "nothing dead-lettered");
    // host-bad did take tasks and fail them: released for another host.
    assert!(
        bad.log().contains("task released for another host"),
        "host-bad never failed a task:\n{}",
        bad.log()
    );
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert!(
        recorded(&url)
            .iter()
            .all(|(h, n)| h != "host-bad" || *n == 0),
        "{:?}",
        recorded(&url)
    );
}

/// Tasks delivered to `host` and not acknowledged yet.
fn pending(url: &str, host: &str) -> u64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(format!("evod:{{{RUN}}}:tasks"))
        .arg("evaluators")
        .query(&mut raw(url))
        .unwrap();
    let redis::Value::Array(parts) = summary else {
        return 0;
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return 0;
    };
    consumers
        .iter()
        .filter_map(|c| match c {
            redis::Value::Array(pair) if pair.len() == 2 => {
                let name: String = redis::from_redis_value(pair[0].clone()).ok()?;
                let n: u64 = redis::from_redis_value(pair[1].clone()).ok()?;
                (name == host).then_some(n)
            }
            _ => None,
        })
        .sum()
}

#[test]
fn a_restarted_coordinator_resumes_and_enqueues_nothing_twice() {
    restarted_coordinator(EVOLVE, reference());
}

#[test]
fn ga_a_restarted_coordinator_resumes_and_enqueues_nothing_twice() {
    restarted_coordinator(GA_EVOLVE, ga_reference());
}

/// A coordinator of a run with `evolve`, SIGKILLed after three
/// generations and started again on its folder, publishes `want`,
/// counts each candidate once and enqueues no round twice (a resumed GA
/// generation names the same parents and children as before the kill).
fn restarted_coordinator(evolve: &[&str], want: (u64, u64)) {
    let (_r, server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_coordinator_with(dir.path(), &url, evolve, &[]);
    poll_until(
        "three generations",
        DEADLINE,
        || (progress_rows(dir.path()) >= 3).then_some(()),
        || read(dir.path(), "run.log"),
    );
    // SIGKILL: the supervisor, and with it the evolver (parent-death
    // signal) holding the lease.
    kill(Pid::from_raw(first.id() as i32), Signal::SIGKILL).unwrap();
    first.wait().unwrap();
    let before = read(dir.path(), "run.log");
    let mut second = spawn_coordinator_with(dir.path(), &url, evolve, &[]);
    let out = finish(&mut second, dir.path(), &[&a]);
    let log = read(dir.path(), "run.log");
    assert!(log.contains("resuming from"), "{before}\n---\n{log}");
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert_enqueued_once(&url);
}

/// One atomic look at the run's keys: their names (the prefix cut off),
/// the members of the rounds and bases indexes, and the memory (`MEMORY
/// USAGE`) of every key but the two history streams (`tasks`, the
/// `results` log: bounded by `MAXLEN ~`).
struct KeySnapshot {
    keys: Vec<String>,
    rounds: Vec<String>,
    bases: Vec<String>,
    memory: u64,
}

fn key_snapshot(url: &str) -> KeySnapshot {
    const LOOK: &str = "local keys = redis.call('KEYS', ARGV[1] .. '*')
        local mem = 0
        for _, k in ipairs(keys) do
          if k ~= ARGV[1] .. 'tasks' and k ~= ARGV[1] .. 'results' then
            mem = mem + (redis.call('MEMORY', 'USAGE', k) or 0)
          end
        end
        return {keys, redis.call('ZRANGE', ARGV[1] .. 'rounds', 0, -1),
          redis.call('ZRANGE', ARGV[1] .. 'bases', 0, -1), mem}";
    let prefix = format!("evod:{{{RUN}}}:");
    let (keys, rounds, bases, memory): (Vec<String>, Vec<String>, Vec<String>, u64) =
        redis::cmd("EVAL")
            .arg(LOOK)
            .arg(0)
            .arg(&prefix)
            .query(&mut raw(url))
            .unwrap();
    let mut keys: Vec<String> = keys
        .into_iter()
        .map(|k| k[prefix.len()..].to_owned())
        .collect();
    keys.sort();
    KeySnapshot {
        keys,
        rounds,
        bases,
        memory,
    }
}

/// Every round and base key of a snapshot is in the run's indexes (so
/// cleanup finds it), and there are at most `rounds` live rounds.
fn assert_indexed(s: &KeySnapshot, rounds: usize) {
    for k in &s.keys {
        if let Some(r) = k
            .strip_prefix("enqueued:")
            .or_else(|| k.strip_prefix("results:"))
        {
            assert!(
                s.rounds.contains(&r.to_owned()),
                "{k} is not indexed: {:?}",
                s.rounds
            );
        }
        if let Some(b) = k.strip_prefix("base:") {
            let b = b.split(':').next().unwrap();
            assert!(
                s.bases.contains(&b.to_owned()),
                "{k} is not indexed: {:?}",
                s.bases
            );
        }
    }
    let marks = s.keys.iter().filter(|k| k.starts_with("enqueued:")).count();
    assert_eq!(marks, s.rounds.len(), "{:?}", s.keys);
    assert!(marks <= rounds, "{marks} live rounds: {:?}", s.keys);
}

#[test]
fn a_run_keeps_a_bounded_set_of_keys_and_a_restart_after_cleanup_resumes() {
    let want = reference();
    let (_r, server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint every third generation: rounds since the last one stay
    // live (a restart redoes them), older ones are retired.
    let mut args: Vec<&str> = Vec::new();
    let mut skip = false;
    for &x in EVOLVE {
        if std::mem::take(&mut skip) {
            continue;
        }
        if x == "--checkpoint-every" {
            skip = true;
            continue;
        }
        args.push(x);
    }
    args.extend_from_slice(&["--checkpoint-every", "3"]);
    args.extend_from_slice(COORDINATE);
    args.extend_from_slice(&["--broker", &url]);
    let spawn = |dir: &Path| {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("out.log"))
            .unwrap();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("run.log"))
            .unwrap();
        evod()
            .arg("run")
            .arg("--dir")
            .arg(dir)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap()
    };
    let mut first = spawn(dir.path());
    // Up to the checkpoint's step and the two after it live: training and
    // gate rounds of three steps.
    const LIVE: usize = 6;
    let mid = poll_until(
        "five generations",
        DEADLINE,
        || {
            let s = key_snapshot(&url);
            assert_indexed(&s, LIVE);
            (progress_rows(dir.path()) >= 5).then_some(s)
        },
        || read(dir.path(), "run.log"),
    );
    // Retired rounds are gone: five generations enqueued at least five
    // rounds, and fewer are left.
    assert!(mid.rounds.len() < 5, "{:?}", mid.keys);
    // Killed after cleanups, with rounds past its last checkpoint live.
    kill(Pid::from_raw(first.id() as i32), Signal::SIGKILL).unwrap();
    first.wait().unwrap();
    // Every round still indexed is of a step the checkpoint does not
    // cover: the restart redoes it from what the broker kept.
    let at_kill = key_snapshot(&url);
    let mut second = spawn(dir.path());
    let out = finish(&mut second, dir.path(), &[&a]);
    let log = read(dir.path(), "run.log");
    assert!(log.contains("resuming from"), "{log}");
    if !at_kill.rounds.is_empty() {
        assert!(
            log.contains("was enqueued before (resumed)"),
            "live rounds {:?} at the kill, none redone from the broker:\n{log}",
            at_kill.rounds
        );
    }
    // Nothing a resume needs was deleted: the single-host tensors, each
    // (round, candidate) counted once.
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    // At the end (the last checkpoint covers every round): only the keys
    // that live as long as the run, smaller than mid-run.
    let end = key_snapshot(&url);
    assert_indexed(&end, 0);
    let run_long = [
        "dead",
        "hosts:done",
        "hosts:seen",
        "hosts:workers",
        "model",
        "results",
        "setting:eval-timeout-per-candidate-ms",
        "setting:fingerprint",
        "tasks",
        "wake",
    ];
    for k in &end.keys {
        assert!(
            run_long.contains(&k.as_str()),
            "{k} left at the end: {:?}",
            end.keys
        );
    }
    assert!(
        end.memory <= mid.memory,
        "the run's keys grew from {} to {} bytes: {:?}",
        mid.memory,
        end.memory,
        end.keys
    );
}

#[test]
fn a_second_coordinator_waits_on_the_lease_of_the_first() {
    let (_r, server) = redis();
    let url = server.url();
    let _a = Host::join(&url, "host-a");
    // The first coordinator runs unbounded (the wait is what is tested).
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = unbounded_coordinator(first_dir, &url, "coord");
    first.wait_for("the first coordinator to evolve", |d| {
        (progress_rows(d.dir()) >= 1).then_some(())
    });
    let mut second = unbounded_coordinator(tempfile::tempdir().unwrap(), &url, "coord-2");
    second.wait_for("the second coordinator to wait on the lease", |d| {
        d.log()
            .contains("waiting for the coordinator lease of run t: held by coord/")
            .then_some(())
    });
    // While the first lives, the second publishes nothing and evolves
    // nothing: the first keeps going.
    let rows = progress_rows(first.dir());
    first.wait_for("the first to go on", |d| {
        (progress_rows(d.dir()) >= rows + 2).then_some(())
    });
    assert_eq!(progress_rows(second.dir()), 0, "{}", second.log());
    assert!(
        !second.log().contains("coordinating run"),
        "{}",
        second.log()
    );
    // The first dies: the second takes over once the lease lapses.
    first.signal(Signal::SIGKILL);
    first.wait_exit();
    second.wait_for("the second to take over", |d| {
        (progress_rows(d.dir()) >= 1 && d.log().contains("coordinating run t")).then_some(())
    });
}

#[test]
fn a_coordinator_that_lost_its_lease_publishes_nothing_more() {
    let (_r, server) = redis();
    let url = server.url();
    let _a = Host::join(&url, "host-a");
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = unbounded_coordinator(first_dir, &url, "coord");
    first.wait_for("the first coordinator to evolve", |d| {
        (progress_rows(d.dir()) >= 1).then_some(())
    });
    // The first's evolver is cut off (frozen) longer than its lease: a
    // second coordinator takes the run over meanwhile.
    let evolver = first.wait_for("the first's evolver", |d| {
        children_with_role(d.pid(), "evolver").first().copied()
    });
    kill(Pid::from_raw(evolver as i32), Signal::SIGSTOP).unwrap();
    let frozen_at = identity(&first.dir().join("vectorland.gguf"));
    let mut second = unbounded_coordinator(tempfile::tempdir().unwrap(), &url, "coord-2");
    second.wait_for("the second to take over", |d| {
        d.log().contains("coordinating run t").then_some(())
    });
    // Thawed, the first finds its lease gone and stops before any publish.
    kill(Pid::from_raw(evolver as i32), Signal::SIGCONT).unwrap();
    first.wait_for("the first to find its lease taken", |d| {
        d.log().contains("took the run over").then_some(())
    });
    poll_until(
        "the first's old evolver to be gone",
        DEADLINE,
        || (!children_with_role(first.pid(), "evolver").contains(&evolver)).then_some(()),
        || first.log(),
    );
    assert_eq!(
        identity(&first.dir().join("vectorland.gguf")),
        frozen_at,
        "the first published after losing its lease:\n{}",
        first.log()
    );
    second.wait_for("the second to evolve", |d| {
        (progress_rows(d.dir()) >= 1).then_some(())
    });
}

#[test]
fn redis_killed_and_restarted_on_its_aof_mid_run() {
    redis_restarted(EVOLVE, reference());
}

#[test]
fn ga_redis_killed_and_restarted_on_its_aof_mid_run() {
    redis_restarted(GA_EVOLVE, ga_reference());
}

/// A run with `evolve` whose Redis is SIGKILLed mid-run, away longer than
/// two coordinator leases, and restarted on its AOF: nothing lost, each
/// candidate counted once, the lapsed lease taken again, `want` published.
fn redis_restarted(evolve: &[&str], want: (u64, u64)) {
    let (_r, mut server) = redis();
    let url = server.url();
    let a = Host::join(&url, "host-a");
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_coordinator_with(dir.path(), &url, evolve, &[]);
    poll_until(
        "two generations",
        DEADLINE,
        || (progress_rows(dir.path()) >= 2).then_some(()),
        || read(dir.path(), "run.log"),
    );
    server.kill();
    let down = std::time::Instant::now();
    // Down longer than the coordinator lease (1 s): its key has expired
    // when Redis comes back, and nobody else took it.
    poll_until(
        "the coordinator to report the broker gone, for over two lease ttls",
        DEADLINE,
        || {
            let log = read(dir.path(), "run.log");
            (log.contains("broker redis://127.0.0.1")
                && log.contains("renewing the coordinator lease")
                && down.elapsed() > Duration::from_secs(2))
            .then_some(())
        },
        || read(dir.path(), "run.log"),
    );
    server.restart();
    let out = finish(&mut child, dir.path(), &[&a]);
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    let log = read(dir.path(), "run.log");
    assert!(log.contains("reachable again"), "{log}");
    // The lapsed lease was taken again: an outage is not a takeover (the
    // evolver was not restarted).
    assert!(log.contains("taken again"), "{log}");
    assert!(!log.contains("took the run over"), "{log}");
}

#[test]
fn a_bad_broker_is_refused_at_start_naming_the_flag() {
    let refused = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let o = evod()
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let err = refused(&["--strategy", "es", "--broker", "not a url"]);
    assert!(err.contains("--broker"), "{err}");
    let err = refused(&[
        "--strategy",
        "es",
        "--broker",
        "redis://127.0.0.1:1/",
        "--run-id",
        "no spaces",
    ]);
    assert!(err.contains("--run-id"), "{err}");
    // A server that refuses our password.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = RedisServer::start_with(dir.path(), port, &["--requirepass", "right"]);
    let bad = format!("redis://:wrong@127.0.0.1:{}/", server.port);
    let err = refused(&["--strategy", "es", "--broker", &bad]);
    assert!(err.contains("--broker"), "{err}");
    assert!(!err.contains("wrong@"), "the password is shown: {err}");
}

/// A coordinator made of the broker library, holding the lease, that has
/// published the run's model (`evod init --seed 1`: CartPole 4-16-2, 114
/// parameters in 4 tensors).
fn fake_coordinator(url: &str) -> (evod_broker::RedisBroker, evod_broker::Lease) {
    let model = tempfile::tempdir().unwrap();
    let path = model.path().join("m.gguf");
    let o = evod()
        .args(["init", "--seed", "1", "-o"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut coord =
        evod_broker::RedisBroker::new(evod_broker::RedisConfig::new(url, RUN, "fake")).unwrap();
    let lease = coord
        .acquire_lease("fake", Duration::from_secs(60), Duration::ZERO)
        .unwrap();
    coord
        .publish_model(&lease, &std::fs::read(&path).unwrap())
        .unwrap();
    (coord, lease)
}

#[test]
fn a_base_that_does_not_fit_is_refused_loudly_never_evaluated() {
    let (_r, server) = redis();
    let url = server.url();
    // A coordinator made of the broker library: the run's model (CartPole
    // 4-16-2: 114 parameters), then a task against a base of 3.
    let (mut coord, lease) = fake_coordinator(&url);
    let base = coord.publish_base(7, &[0.5, -1.0, 2.0]).unwrap();
    let task = Task {
        run: RUN.into(),
        generation: 7,
        seed: 3,
        episodes: 1,
        first: 0,
        gate: false,
        work: Work::Recipes {
            base,
            recipes: vec![Recipe::new(base, 1, 0.1, Sign::Plus, TensorScale::Glorot)],
        },
    };
    coord
        .enqueue(&lease, evod_broker::Round { id: 7, step: 7 }, &[task])
        .unwrap();
    let host = Host::join(&url, "host-a");
    let dead = poll_until(
        "the task to be dead-lettered",
        DEADLINE,
        || {
            let d = coord.dead_letters().unwrap();
            (!d.is_empty()).then_some(d)
        },
        || host.log(),
    );
    assert_eq!(dead.len(), 1);
    let why = dead[0].why.clone().unwrap_or_default();
    assert!(
        why.contains("host-a") && why.contains("does not fit"),
        "{why}"
    );
    assert_eq!(dead[0].last_consumer, "host-a");
    // Logged loudly, and no result: nothing was evaluated.
    poll_until(
        "the refusal in the host's log",
        DEADLINE,
        || {
            host.log()
                .contains("does not fit this run's network")
                .then_some(())
        },
        || host.log(),
    );
    assert!(coord.results(7).unwrap().is_empty());
    assert!(
        recorded(&url).iter().all(|(_, n)| *n == 0),
        "{:?}",
        recorded(&url)
    );
}

#[test]
fn a_broker_that_is_not_there_yet_is_reported_and_waited_for() {
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    // Both roles start before Redis: each says so, naming the URL, and
    // retries; neither crashes.
    let a = Host::join(&url, "host-a");
    let coord_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_coordinator(coord_dir.path(), &url, &["--min-hosts", "1"]);
    poll_until(
        "both roles to report the broker missing",
        DEADLINE,
        || {
            let c = read(coord_dir.path(), "run.log");
            let h = a.log();
            let said = |log: &str| {
                log.lines().any(|l| {
                    l.contains(&url) && l.contains("Connection refused") && l.contains("retrying")
                })
            };
            (said(&c) && said(&h)).then_some(())
        },
        || format!("{}\n{}", read(coord_dir.path(), "run.log"), a.log()),
    );
    let _server = RedisServer::start(dir.path(), port);
    let out = finish(&mut child, coord_dir.path(), &[&a]);
    assert_eq!(identity(&coord_dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert!(
        recorded(&url).iter().any(|(h, n)| h == "host-a" && *n > 0),
        "{:?}",
        recorded(&url)
    );
}

#[test]
fn a_host_waiting_for_the_model_stops_on_sigterm() {
    // PID 1 in a container has no default action for SIGTERM: `evod join`
    // handles it itself while it waits for the run's model, so `docker
    // stop` ends it at once, cleanly (exit 0, said), not by a kill.
    let (_r, server) = redis();
    let url = server.url();
    let mut host = Host::join(&url, "host-a");
    poll_until(
        "the host to wait for the run's model",
        DEADLINE,
        || {
            host.log()
                .contains("waiting for the coordinator of run t to publish its model")
                .then_some(())
        },
        || host.log(),
    );
    let mut child = host.child.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = common::wait_exit(&mut child, DEADLINE);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{status:?}\n{}",
        host.log()
    );
    assert!(
        host.log()
            .contains("stopped while waiting for the run's model"),
        "{}",
        host.log()
    );
}

#[test]
fn a_host_with_a_stale_model_fetches_the_run_model_again() {
    let want = reference();
    let (_r, server) = redis();
    let url = server.url();
    // An earlier coordinator of run t published another network (4-8-2):
    // host-a joins with that model.
    let old = tempfile::tempdir().unwrap();
    let path = old.path().join("m.gguf");
    let o = evod()
        .args(["init", "--layers", "4,8,2", "--seed", "1", "-o"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut fake =
        evod_broker::RedisBroker::new(evod_broker::RedisConfig::new(&url, RUN, "old")).unwrap();
    let lease = fake
        .acquire_lease("old", Duration::from_secs(60), Duration::ZERO)
        .unwrap();
    fake.publish_model(&lease, &std::fs::read(&path).unwrap())
        .unwrap();
    let a = Host::join(&url, "host-a");
    poll_until(
        "host-a to run the old model",
        DEADLINE,
        || a.log().contains("evaluating tasks of run t").then_some(()),
        || a.log(),
    );
    fake.release_lease(&lease).unwrap();
    // The run's coordinator now has the default network (4-16-2): host-a
    // finds its model stale by the run's fingerprint, never evaluates with
    // it, fetches the run's model and evaluates the whole run.
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_coordinator(dir.path(), &url, &["--remote-only", "--min-hosts", "1"]);
    let out = finish(&mut child, dir.path(), &[&a]);
    assert!(a.log().contains("the host's model is stale"), "{}", a.log());
    assert_eq!(identity(&dir.path().join("vectorland.gguf")), want);
    assert_counted_once(&url, evaluations(&out));
    assert!(
        !read(dir.path(), "run.log").contains("quarantined"),
        "{}",
        read(dir.path(), "run.log")
    );
}

#[test]
fn forged_ga_tasks_are_refused_by_name_never_evaluated() {
    let (_r, server) = redis();
    let url = server.url();
    // A coordinator made of the broker library: the run's model (CartPole
    // 4-16-2: 114 parameters in 4 tensors) and one real parent.
    let (mut coord, lease) = fake_coordinator(&url);
    let parent = coord.publish_base(7, &[0.1; 114]).unwrap();
    let mutated = |sigma: f32, tensors: usize| GaRecipe {
        parent,
        cross: None,
        mutation: Some(Mutation {
            seed: 1,
            // Unit scale: σ is the step itself (3e38 overflows a value
            // whose noise exceeds 1.2 in size: about a quarter of them).
            scale: TensorScale::Unit,
            sigma_bits: vec![sigma.to_bits(); tensors],
        }),
    };
    let ga = |first: u32, recipe: GaRecipe| Task {
        run: RUN.into(),
        generation: 7,
        seed: 3,
        episodes: 1,
        first,
        gate: false,
        work: Work::Ga(vec![recipe]),
    };
    let tasks = [
        // A parent nobody published.
        ga(0, GaRecipe::copy_of(0xdead)),
        // σ for 3 tensors: another network.
        ga(1, mutated(0.5, 3)),
        // A σ that makes the child overflow to infinity.
        ga(2, mutated(3.0e38, 4)),
    ];
    coord
        .enqueue(&lease, evod_broker::Round { id: 7, step: 7 }, &tasks)
        .unwrap();
    // And bytes no build writes: σ NaN (form, parent, scale, seed, count,
    // then the σ), added to the stream as they are.
    let mut nan = ga(3, mutated(0.5, 4)).encode().unwrap();
    let at = nan.len() - 16;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
    let _: String = redis::cmd("XADD")
        .arg(format!("evod:{{{RUN}}}:tasks"))
        .arg("*")
        .arg("t")
        .arg(nan)
        .query(&mut raw(&url))
        .unwrap();
    let host = Host::join(&url, "host-a");
    let dead = poll_until(
        "the four tasks to be dead-lettered",
        DEADLINE,
        || {
            let d = coord.dead_letters().unwrap();
            (d.len() >= 4).then_some(d)
        },
        || host.log(),
    );
    assert_eq!(dead.len(), 4, "{dead:?}");
    let why = |first: u32| {
        dead.iter()
            .find(|l| l.task.as_ref().is_ok_and(|t| t.first == first))
            .and_then(|l| l.why.clone())
            .unwrap_or_else(|| panic!("no dead letter for candidate {first}: {dead:?}"))
    };
    let w = why(0);
    assert!(
        w.contains("host-a") && w.contains("000000000000dead") && w.contains("not on the broker"),
        "{w}"
    );
    let w = why(1);
    assert!(
        w.contains("σ for 3 tensors, the network has 4") && w.contains("does not fit"),
        "{w}"
    );
    let w = why(2);
    assert!(w.contains("candidate 2") && w.contains("non-finite"), "{w}");
    let malformed = dead
        .iter()
        .find(|l| l.task.is_err())
        .unwrap_or_else(|| panic!("the NaN task was not refused as malformed: {dead:?}"));
    let w = malformed.why.clone().unwrap_or_default();
    assert!(w.contains("σ NaN of tensor 0"), "{w}");
    // Nothing was evaluated: no result, no count.
    assert!(coord.results(7).unwrap().is_empty());
    assert!(
        recorded(&url).iter().all(|(_, n)| *n == 0),
        "{:?}",
        recorded(&url)
    );
    assert!(host.log().contains("dead-lettered"), "{}", host.log());
}

/// A build without llama.cpp (the default features) refuses a perplexity
/// run at `evod join`, before taking any task, saying why. (The `llm`
/// build runs such runs: `tests/llm.rs`.)
#[cfg(not(feature = "llm"))]
#[test]
fn a_host_built_without_llama_cpp_refuses_a_perplexity_run_clearly() {
    let (_r, server) = redis();
    let url = server.url();
    let model = tempfile::tempdir().unwrap();
    // The header of a 3-layer llama base (all `evod init` reads without
    // llama.cpp) and a corpus: a perplexity vector for it.
    let base = model.path().join("base.gguf");
    let metadata = vec![
        (
            "general.architecture".to_owned(),
            evod_gguf::Value::String("llama".into()),
        ),
        (
            "llama.embedding_length".to_owned(),
            evod_gguf::Value::U32(8),
        ),
        ("llama.block_count".to_owned(), evod_gguf::Value::U32(3)),
    ];
    let tensors = [evod_gguf::TensorSpec {
        name: "token_embd.weight".into(),
        dims: vec![8, 4],
        ttype: evod_gguf::TensorType::F32,
    }];
    evod_gguf::publish(
        &base,
        &metadata,
        &tensors,
        |_, w| w.write_all(&[0u8; 4 * 32]),
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let corpus = model.path().join("corpus.txt");
    std::fs::write(&corpus, "the cat sat on the mat.\n".repeat(40)).unwrap();
    let path = model.path().join("v.gguf");
    let o = evod()
        .args([
            "init",
            "--task",
            "perplexity",
            "--window",
            "16",
            "--base-model",
        ])
        .arg(&base)
        .arg("--text")
        .arg(&corpus)
        .arg("-o")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    // A coordinator made of the broker library publishes it.
    let mut coord =
        evod_broker::RedisBroker::new(evod_broker::RedisConfig::new(&url, RUN, "fake")).unwrap();
    let lease = coord
        .acquire_lease("fake", Duration::from_secs(60), Duration::ZERO)
        .unwrap();
    coord
        .publish_model(&lease, &std::fs::read(&path).unwrap())
        .unwrap();
    let mut h = Host::join(&url, "host-a");
    let mut child = h.child.take().unwrap();
    let status = common::wait_exit(&mut child, DEADLINE).expect("evod join did not stop");
    let log = h.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("task is perplexity") && log.contains("built without the llm feature"),
        "{log}"
    );
    assert!(!log.contains("joining run"), "{log}");
}
