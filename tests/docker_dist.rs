//! A distributed run as real hosts (issue 15): Redis, a coordinator and
//! three evaluators, each its own container (its own filesystem: the
//! evaluators' state folders are tmpfs mounts, the coordinator's a named
//! volume) on a private Docker network, and three failures:
//!
//! - an evaluator container `docker kill`ed while it holds tasks;
//! - an evaluator cut off with `docker network disconnect` while it holds
//!   tasks, then reconnected;
//! - the coordinator container `docker kill`ed mid-run and started again on
//!   its volume.
//!
//! Each run must count every candidate exactly once (read back from the
//! broker: the run's results stream has one entry per *recorded* result,
//! and the hosts' done counts add up to it), lose no generation (every
//! training round complete, the bounded run ends with exit 0), and publish
//! the same tensors, byte for byte, as a single-host `evod run` of the same
//! seed run here by the test.
//!
//! The images are `evod:test-<hash>` (built by `cargo xtask image --tag …`,
//! as tests/docker.rs and tests/docker_llm.rs do: one static build shared
//! by the three, a no-op for cargo and Docker's layer cache after the
//! first) and `evod-redis:test-<hash>` (`cargo xtask image --redis`,
//! Debian's redis-server FROM scratch), tagged per checkout
//! (`common::docker::test_tag`): another checkout's tests on the same
//! engine cannot re-tag them mid-run.
//! Without a Docker engine every test prints one
//! `SKIPPED: docker_dist: …` line and passes. Every container, volume and
//! network has a name unique to the test and the process and is removed by
//! a guard even when the test fails. Every wait is on `docker logs`,
//! `docker exec … evod status`, Redis or `docker wait`, against a deadline.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(240);
/// How often a condition read through `docker exec` is polled.
const POLL: Duration = Duration::from_millis(200);

static IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| common::docker::test_tag("evod"));
static REDIS_IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| common::docker::test_tag("evod-redis"));
/// The state folder in the evod image.
const STATE: &str = "/var/lib/evod";
/// The run id on the broker.
const RUN: &str = "dist";
/// Evaluator hosts.
const EVALUATORS: usize = 3;

/// The run every test makes, distributed and on one host: ES on the sine
/// regression task (its fitness improves nearly every generation, so the
/// published model keeps changing to the end: a lost or doubled
/// generation shows in the final tensors) with a network wide enough that
/// a task takes a while to evaluate (tasks are in flight when a host
/// fails), for a bounded number of generations.
const TASK: &str = "sine";
const LAYERS: &str = "1,512,512,1";
const MODEL_SEED: &str = "3";
const SEED: &str = "11";
const GENERATIONS: u64 = 20;
const POPULATION: u32 = 32;
const CHECKPOINT_EVERY: &str = "3";

/// The evolution flags of both runs.
fn evolve_args() -> Vec<String> {
    [
        "--strategy",
        "es",
        "--seed",
        SEED,
        "--generations",
        &GENERATIONS.to_string(),
        "--population",
        &POPULATION.to_string(),
        "--checkpoint-every",
        CHECKPOINT_EVERY,
        // A pulse line every generation: what the waits read.
        "--pulse-every",
        "1",
        "--pulse-interval",
        "1ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The distributed flags of every host: short leases, so a lost host's
/// tasks and a dead coordinator's lease are taken over within seconds.
const DIST_ARGS: &[&str] = &[
    "--run-id",
    RUN,
    // The coordinator starts once the three evaluators heartbeat.
    "--min-hosts",
    "3",
    "--task-lease",
    "1500ms",
    "--lease-ttl",
    "2s",
    "--candidates-per-task",
    "4",
    "--workers",
    "1",
];

use common::docker::{docker, root, text};

/// `docker ARGS`, which must succeed; its stdout.
fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed:\n{}", text(&o));
    common::text(&o.stdout)
}

/// `docker pause CONTAINER`. With cgroup v1 (this machine's engine), runc
/// freezes by writing the freezer cgroup and gives up with "unable to
/// freeze" when a task does not reach the frozen state in its time (one
/// busy in the kernel, on a loaded machine); the container runs on,
/// untouched. That is tried again, as an operator would, until the
/// deadline; any other failure fails the test.
fn pause(container: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let o = docker(&["pause", container]);
        if o.status.success() {
            return;
        }
        let why = text(&o);
        assert!(
            why.contains("unable to freeze") && Instant::now() < end,
            "docker pause {container} failed:\n{why}"
        );
        eprintln!("docker pause {container}: runc could not freeze it this time; again");
    }
}

/// Builds both images once per run; `false` (after one loud SKIPPED line)
/// without an engine.
fn images() -> bool {
    common::docker::images_or_skip(
        "docker_dist",
        &[
            &["image", "--tag", IMAGE.as_str()],
            &["image", "--redis", "--tag", REDIS_IMAGE.as_str()],
        ],
    )
}

/// The model file both runs start from, made by `evod init` (the same
/// bytes in and out of a container: init is deterministic).
fn init_args(output: &str) -> Vec<String> {
    [
        "init", "--task", TASK, "--layers", LAYERS, "--seed", MODEL_SEED, "-o", output,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The binary in the image (`cargo xtask image` leaves it in the target
/// folder), run here for the single-host reference: the same build as the
/// hosts', so the same bits.
fn image_binary() -> Command {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root().join(t) })
        .unwrap_or_else(|| root().join("target"));
    let mut cmd = Command::new(target.join("x86_64-unknown-linux-gnu/release/evod"));
    cmd.env_remove("EVOD_DIR")
        .env_remove("EVOD_CONTROL_SOCKET")
        .env_remove("EVOD_BROKER")
        .env("NO_COLOR", "1");
    cmd
}

/// The single-host run of the same model and seed (`evod run` here, no
/// broker, the image's binary), made once per test process: its live
/// model file's bytes.
fn single_host_model() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("vectorland.gguf");
        let o = image_binary()
            .args(init_args(model.to_str().unwrap()))
            .output()
            .unwrap();
        assert!(o.status.success(), "evod init: {}", text(&o));
        let mut run = image_binary()
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(evolve_args())
            .args(["--workers", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = run.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut { stderr }, &mut s).unwrap();
            s
        });
        let status = common::wait_exit(&mut run, DEADLINE).unwrap_or_else(|| {
            let _ = run.kill();
            panic!("the single-host run did not finish within {DEADLINE:?}")
        });
        let log = log.join().unwrap();
        assert!(status.success(), "single-host evod run: {status}\n{log}");
        std::fs::read(&model).unwrap()
    })
}

/// (name, bytes) of every tensor of a GGUF file, in order.
fn tensors(what: &str, file: &[u8]) -> Vec<(String, Vec<u8>)> {
    let header = evod_gguf::GgufHeader::parse(what, file)
        .unwrap_or_else(|e| panic!("{what}: not a GGUF file: {e}"));
    header
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), header.tensor_bytes_in(file, t).to_vec()))
        .collect()
}

/// A distributed run's containers, volumes and network, all removed on
/// drop (even after a failed assertion).
struct Cluster {
    /// `evod-dist-<test>-<pid>`: every name starts with it.
    prefix: String,
    network: String,
    password: String,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the failure needs explaining: every host's last lines.
            for c in &self.containers {
                let logs = text(&docker(&["logs", "--tail", "40", c]));
                let _ = writeln!(std::io::stderr(), "--- {c} ---\n{logs}");
            }
        }
        self.remove_all();
    }
}

impl Cluster {
    /// Starts Redis (password, AOF), the coordinator (on a volume holding
    /// the model `evod init` made) and the evaluators, on a private
    /// network of their own.
    fn start(test: &str) -> Cluster {
        let prefix = format!("evod-dist-{test}-{}", std::process::id());
        let mut c = Cluster {
            network: format!("{prefix}-net"),
            password: format!("pw-{}-{test}", std::process::id()),
            prefix,
            containers: Vec::new(),
            volumes: Vec::new(),
        };
        let mut containers = vec![c.redis(), c.coordinator()];
        containers.extend((1..=EVALUATORS).map(|i| c.evaluator(i)));
        c.containers = containers;
        c.volumes = vec![c.volume("coordinator"), c.volume("redis")];
        // Leftovers of an earlier crashed run of this process id.
        c.remove_all();
        docker_ok(&["network", "create", "--internal", &c.network]);
        let redis_volume = format!("{}:/data", c.volume("redis"));
        docker_ok(&[
            "run",
            "--detach",
            "--name",
            &c.redis(),
            "--network",
            &c.network,
            "--network-alias",
            "redis",
            "--read-only",
            "--volume",
            &redis_volume,
            REDIS_IMAGE.as_str(),
            "--dir",
            "/data",
            "--bind",
            "0.0.0.0",
            "--requirepass",
            &c.password,
            "--appendonly",
            "yes",
        ]);
        c.wait("Redis to answer", || {
            (c.redis_cli(&["PING"]).trim() == "PONG").then_some(())
        });

        // The coordinator's volume gets the model first (`evod init` in a
        // container of its own, as the image's user).
        let state = format!("{}:{STATE}", c.volume("coordinator"));
        let model = format!("{STATE}/vectorland.gguf");
        let mut init = vec!["run", "--rm", "--volume", &state, IMAGE.as_str()];
        let init_args = init_args(&model);
        init.extend(init_args.iter().map(String::as_str));
        docker_ok(&init);
        c.run_coordinator();
        for i in 1..=EVALUATORS {
            c.run_evaluator(i);
        }
        c
    }

    /// Removes every container, volume and the network (those that exist).
    fn remove_all(&self) {
        let mut rm = vec!["rm", "--force", "--volumes"];
        rm.extend(self.containers.iter().map(String::as_str));
        docker(&rm);
        for v in &self.volumes {
            docker(&["volume", "rm", "--force", v]);
        }
        docker(&["network", "rm", &self.network]);
    }

    fn redis(&self) -> String {
        format!("{}-redis", self.prefix)
    }
    fn coordinator(&self) -> String {
        format!("{}-coordinator", self.prefix)
    }
    fn evaluator(&self, i: usize) -> String {
        format!("{}-evaluator-{i}", self.prefix)
    }
    fn volume(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
    /// The broker URL as the hosts see it (in EVOD_BROKER, never argv).
    fn broker_env(&self) -> String {
        format!("EVOD_BROKER=redis://:{}@redis:6379/0", self.password)
    }

    fn run_coordinator(&self) {
        let state = format!("{}:{STATE}", self.volume("coordinator"));
        let env = self.broker_env();
        let name = self.coordinator();
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            &name,
            "--hostname",
            "coordinator",
            "--network",
            &self.network,
            "--read-only",
            "--volume",
            &state,
            "--env",
            &env,
            IMAGE.as_str(),
            "run",
            "--host-id",
            "coordinator",
            // Its own worker takes no task: every candidate is evaluated by
            // the evaluator hosts, so a test that freezes some of them
            // decides who can make the run go on.
            "--remote-only",
        ];
        args.extend_from_slice(DIST_ARGS);
        let evolve = evolve_args();
        args.extend(evolve.iter().map(String::as_str));
        docker_ok(&args);
    }

    fn run_evaluator(&self, i: usize) {
        let name = self.evaluator(i);
        let host = format!("evaluator-{i}");
        let env = self.broker_env();
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            &name,
            "--hostname",
            &host,
            "--network",
            &self.network,
            "--read-only",
            // Its own filesystem; nothing to keep.
            "--tmpfs",
            "/var/lib/evod:uid=65532,gid=65532,mode=0700",
            "--env",
            &env,
            IMAGE.as_str(),
            "join",
            "--host-id",
            &host,
        ];
        args.extend_from_slice(DIST_ARGS);
        docker_ok(&args);
    }

    /// `redis-cli ARGS` in the Redis container (raw replies, one a line).
    fn redis_cli(&self, args: &[&str]) -> String {
        let auth = format!("REDISCLI_AUTH={}", self.password);
        let redis = self.redis();
        let mut all = vec!["exec", "--env", &auth, &redis, "redis-cli", "--raw"];
        all.extend_from_slice(args);
        common::text(&docker(&all).stdout)
    }

    fn key(&self, name: &str) -> String {
        format!("evod:{{{RUN}}}:{name}")
    }

    fn logs(&self, container: &str) -> String {
        common::docker::logs(container)
    }

    /// JSON log lines of `container` whose message is `message`.
    fn log_events(&self, container: &str, message: &str) -> Vec<Value> {
        common::docker::log_events(container, message)
    }

    /// The coordinator's newest generation in its pulse lines.
    fn generation(&self) -> Option<u64> {
        self.log_events(&self.coordinator(), "pulse")
            .iter()
            .filter_map(|p| p["fields"]["generation"].as_u64())
            .max()
    }

    /// The coordinator's `evod status --json`, if it answers.
    fn status(&self) -> Option<Value> {
        let o = docker(&["exec", &self.coordinator(), "evod", "status", "--json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    }

    /// Tasks pending (delivered, not acknowledged) on host `host`.
    fn pending_of(&self, host: &str) -> u64 {
        let out = self.redis_cli(&["XPENDING", &self.key("tasks"), "evaluators"]);
        // total, first id, last id, then (consumer, count) pairs.
        let lines: Vec<&str> = out.lines().collect();
        lines
            .iter()
            .skip(3)
            .collect::<Vec<_>>()
            .chunks(2)
            .find(|p| p.len() == 2 && *p[0] == host)
            .and_then(|p| p[1].parse().ok())
            .unwrap_or(0)
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        common::docker::inspect(container, format)
    }

    /// Polls `cond` every [`POLL`] until it returns `Some`; past
    /// [`DEADLINE`] panics with `what` (the guard then prints the logs).
    fn wait<T>(&self, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = cond() {
                return v;
            }
            assert!(
                Instant::now() < end,
                "timed out after {DEADLINE:?} waiting for {what}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the coordinator is past generation `after` and
    /// `container` (evaluator `host`) holds a task, and freezes it there
    /// (`docker pause`): it cannot acknowledge what it holds. A host that
    /// finished its task between the two reads is thawed and waited on
    /// again.
    fn freeze_holding(&self, container: &str, host: &str, after: u64) {
        let end = Instant::now() + DEADLINE;
        loop {
            assert!(
                Instant::now() < end,
                "{host} never held a task when frozen within {DEADLINE:?}"
            );
            self.wait(
                &format!("{host} holding a task past generation {after}"),
                || {
                    (self.generation().is_some_and(|g| g >= after) && self.pending_of(host) > 0)
                        .then_some(())
                },
            );
            pause(container);
            if self.pending_of(host) > 0 {
                return;
            }
            docker_ok(&["unpause", container]);
        }
    }

    /// Waits (on `docker wait`) for the coordinator's bounded run to end;
    /// its exit code.
    fn wait_coordinator_exit(&self) -> i64 {
        let mut wait = Command::new("docker")
            .args(["wait", &self.coordinator()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if common::wait_exit(&mut wait, DEADLINE).is_none() {
            let _ = wait.kill();
            let _ = wait.wait();
            panic!("the coordinator did not finish within {DEADLINE:?}");
        }
        let mut out = String::new();
        std::io::Read::read_to_string(wait.stdout.as_mut().unwrap(), &mut out).unwrap();
        out.trim()
            .parse()
            .expect("docker wait prints the exit code")
    }

    /// The bytes of `path` in the coordinator's container (running or not)
    /// through `docker cp` (the image has no shell).
    fn read_coordinator_file(&self, path: &str) -> Vec<u8> {
        common::docker::read_file(&self.coordinator(), path)
    }

    /// Every result the broker recorded, in recording order, from the
    /// run's results stream (one entry per result that was new: a
    /// duplicate delivery's results are discarded before it), decoded and
    /// validated by `evod_broker`. Read with a Lua script that returns each
    /// payload in hex (redis-cli's raw output cannot carry binary).
    fn recorded_results(&self) -> Vec<evod_broker::TaskResult> {
        const HEX: &str = "local out = {}
            for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
              for i = 1, #e[2], 2 do
                if e[2][i] == 'r' then
                  out[#out + 1] = (e[2][i + 1]:gsub('.', function(c)
                    return string.format('%02x', string.byte(c)) end))
                end
              end
            end
            return out";
        let out = self.redis_cli(&["EVAL", HEX, "1", &self.key("results")]);
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|hex| {
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                evod_broker::TaskResult::decode(&bytes)
                    .unwrap_or_else(|e| panic!("a recorded result does not decode: {e}"))
            })
            .collect()
    }

    /// Results recorded per host, from the broker's `hosts:done` hash.
    fn done_per_host(&self) -> BTreeMap<String, u64> {
        let out = self.redis_cli(&["HGETALL", &self.key("hosts:done")]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| (p[0].to_owned(), p[1].parse().expect("a count")))
            .collect()
    }

    /// The checks every scenario ends with: the bounded run ends with exit
    /// 0; each (round, candidate) recorded exactly once and every training
    /// round complete; the hosts' counts add up; and the published tensors
    /// are the single-host run's. Returns the results per host.
    fn assert_exactly_once_and_same_tensors(&self) -> BTreeMap<String, u64> {
        let code = self.wait_coordinator_exit();
        assert_eq!(code, 0, "the coordinator's bounded run failed");
        let results = self.recorded_results();
        let mut seen: BTreeMap<(u64, u32), usize> = BTreeMap::new();
        let mut by_host: BTreeMap<String, u64> = BTreeMap::new();
        for r in &results {
            assert_eq!(r.run, RUN);
            *seen.entry((r.generation, r.candidate)).or_default() += 1;
            *by_host.entry(r.host.clone()).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "counted more than once: {twice:?}");
        // A round is one evaluation of the evolver, named by a hash of what
        // it evaluates: a generation's training batch (the population and
        // the ES mean) or its publish gate (one candidate). One training
        // round per generation — none lost, none doubled (a coordinator
        // that redoes a generation after a restart redoes the same round)
        // — and none partial.
        let mut sizes: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for &(round, candidate) in seen.keys() {
            sizes.entry(round).or_default().push(candidate);
        }
        let want = POPULATION as usize + 1;
        for (round, candidates) in &sizes {
            let n = candidates.len();
            assert!(
                n == want || n == 1,
                "round {round:016x} has {n} results: neither a training round ({want}) nor a gate (1)"
            );
            assert_eq!(
                *candidates,
                (0..n as u32).collect::<Vec<_>>(),
                "round {round:016x}: gaps"
            );
        }
        let training = sizes.values().filter(|c| c.len() == want).count();
        assert_eq!(
            training, GENERATIONS as usize,
            "training rounds recorded (one per generation)"
        );
        // The hosts' own counts (HINCRBY by new results only) agree.
        assert_eq!(
            self.done_per_host(),
            by_host,
            "hosts:done vs the results stream"
        );

        let model = self.read_coordinator_file(&format!("{STATE}/vectorland.gguf"));
        let (dist, single) = (
            tensors("distributed", &model),
            tensors("single", single_host_model()),
        );
        assert_eq!(
            dist.iter().map(|t| &t.0).collect::<Vec<_>>(),
            single.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
        for ((name, a), (_, b)) in dist.iter().zip(&single) {
            assert!(a == b, "tensor {name} differs from the single-host run's");
        }
        by_host
    }
}

#[test]
fn an_evaluator_killed_mid_generation_loses_nothing_and_counts_each_candidate_once() {
    if !images() {
        return;
    }
    let c = Cluster::start("kill");
    let victim = c.evaluator(1);
    c.freeze_holding(&victim, "evaluator-1", 2);
    docker_ok(&["kill", "--signal", "KILL", &victim]);
    assert_eq!(c.inspect(&victim, "{{.State.ExitCode}}"), "137");
    // Its leased tasks are pending on a dead consumer: the others must take
    // them over (after the task lease) for the run to go on.
    c.wait("evaluator-1's tasks taken over", || {
        (c.pending_of("evaluator-1") == 0).then_some(())
    });
    let by_host = c.assert_exactly_once_and_same_tensors();
    assert!(
        by_host.get("evaluator-1").copied().unwrap_or(0) > 0,
        "{by_host:?}"
    );
    for live in ["evaluator-2", "evaluator-3"] {
        assert!(
            by_host.get(live).copied().unwrap_or(0) > 0,
            "{live}: {by_host:?}"
        );
    }
    assert_eq!(c.inspect(&victim, "{{.State.Running}}"), "false");
}

#[test]
fn an_evaluator_cut_off_and_reconnected_loses_nothing_and_counts_each_candidate_once() {
    if !images() {
        return;
    }
    let c = Cluster::start("partition");
    let victim = c.evaluator(2);
    c.freeze_holding(&victim, "evaluator-2", 2);
    docker_ok(&["network", "disconnect", &c.network, &victim]);
    docker_ok(&["unpause", &victim]);
    let cut_at = c.generation().unwrap_or(0);
    // Cut off, its tasks are taken over and the run goes on without it.
    c.wait("evaluator-2's tasks taken over", || {
        (c.pending_of("evaluator-2") == 0).then_some(())
    });
    c.wait("the run to progress without evaluator-2", || {
        c.generation().filter(|&g| g >= cut_at + 2)
    });
    let done_before = c.done_per_host().get("evaluator-2").copied().unwrap_or(0);
    docker_ok(&[
        "network",
        "connect",
        "--alias",
        "evaluator-2",
        &c.network,
        &victim,
    ]);
    // Back, it must record new results again (a reconnect, not a restart:
    // the same container process). The other two are frozen meanwhile, so
    // the run cannot end without it (the coordinator takes no task): it
    // waits on evaluator-2 alone, and their leased tasks come to it after
    // the lease.
    let others = [c.evaluator(1), c.evaluator(3)];
    for other in &others {
        pause(other);
    }
    c.wait("evaluator-2 recording results again", || {
        (c.done_per_host().get("evaluator-2").copied().unwrap_or(0) > done_before).then_some(())
    });
    assert_eq!(c.inspect(&victim, "{{.RestartCount}}"), "0");
    assert_eq!(c.inspect(&victim, "{{.State.Running}}"), "true");
    // `evod status` on the coordinator lists it, seen again — unless it
    // finished the run alone first (a loaded machine): then the
    // coordinator's last words list its results, more than before the cut.
    c.wait(
        "evod status to list evaluator-2 as live, or the run's summary",
        || {
            if let Some(s) = c.status() {
                return s["hosts"]
                    .as_array()?
                    .iter()
                    .find(|h| {
                        h["host"] == "evaluator-2"
                            && h["last_seen_s"].as_f64().is_some_and(|t| t < 5.0)
                    })
                    .map(|_| ());
            }
            if c.inspect(&c.coordinator(), "{{.State.Running}}") == "true" {
                return None;
            }
            let results = c
                .logs(&c.coordinator())
                .split("evaluator-2 (")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()?;
            assert!(
                results > done_before,
                "the summary lists {results} results of evaluator-2, {done_before} before the cut"
            );
            Some(())
        },
    );
    for other in &others {
        docker_ok(&["unpause", other]);
    }
    c.assert_exactly_once_and_same_tensors();
}

#[test]
fn the_coordinator_killed_and_restarted_on_its_volume_resumes_and_counts_each_candidate_once() {
    if !images() {
        return;
    }
    let c = Cluster::start("coordinator");
    let coordinator = c.coordinator();
    // Past a checkpoint (every 3 generations) and mid-generation: some
    // evaluator holds a task.
    c.wait("the coordinator past generation 4 with tasks out", || {
        (c.generation().is_some_and(|g| g >= 4)
            && (1..=EVALUATORS).any(|i| c.pending_of(&format!("evaluator-{i}")) > 0))
        .then_some(())
    });
    docker_ok(&["kill", "--signal", "KILL", &coordinator]);
    assert_eq!(c.wait_coordinator_exit(), 137);
    docker_ok(&["start", &coordinator]);
    let resumed = c.wait("the coordinator to resume from its checkpoint", || {
        c.log_events(
            &coordinator,
            "resuming from /var/lib/evod/state/checkpoint.bin",
        )
        .first()
        .and_then(|e| e["fields"]["generation"].as_u64())
    });
    assert!(
        resumed >= 3,
        "resumed at generation {resumed}: not from a checkpoint"
    );
    c.assert_exactly_once_and_same_tensors();
}
