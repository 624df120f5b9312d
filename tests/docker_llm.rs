//! The perplexity task in the container image (issue 14): the image's
//! `evod` has llama.cpp in it, so `evod init --task perplexity` and a
//! bounded `evod run` work in a container with a read-only root, the base
//! model and corpus on a read-only volume and the state on another; a
//! worker `kill -SEGV`ed (from the host, by its host pid) while it scores
//! candidates in llama.cpp is respawned and the daemon, PID 1, goes on to a
//! clean exit having published a control vector better than the start.
//!
//! The base model is the tiny llama GGUF the other llama.cpp tests use
//! (`tests/common/tiny_llama.rs`, written by gguf-py on the host). The
//! image is tests/docker.rs's (`common::docker::test_tag("evod")`, built by
//! `cargo xtask image --tag evod:test-<hash>`: one cargo build shared by the
//! three Docker test files, the second `docker build` a no-op for the
//! layer cache).
//! Without a Docker engine the test prints one loud
//! `SKIPPED: tests/docker_llm.rs: …` line and passes. Its containers and
//! volumes have names unique to the process and are removed by a guard
//! even when the test fails. Every wait is on `docker exec … evod status`,
//! `docker logs` or `docker wait` against a deadline.

mod common;
#[path = "common/tiny_llama.rs"]
mod tiny_llama;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use evod_gguf::{GgufFile, Value};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value as Json;

use common::docker::{docker, text};

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(300);

/// This checkout's image (a Docker engine shared with other checkouts
/// holds theirs under other tags).
static IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| common::docker::test_tag("evod"));
/// The state folder, the image's `VOLUME`.
const STATE: &str = "/var/lib/evod";
/// Where the base model and the corpus are mounted (read-only).
const MODELS: &str = "/models";
/// Tokens per window.
const WINDOW: &str = "16";

/// Builds the image once per run; `false` (after one loud SKIPPED line)
/// without an engine.
fn image() -> bool {
    common::docker::images_or_skip(
        "tests/docker_llm.rs",
        &[&["image", "--tag", IMAGE.as_str()]],
    )
}

/// `docker ARGS`, which must succeed; its stdout.
fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed:\n{}", text(&o));
    common::text(&o.stdout)
}

/// The test's containers and volumes, removed on drop (even after a failed
/// assertion); leftovers of an earlier crashed run are removed first.
struct Names {
    /// The daemon's container.
    daemon: String,
    /// A container only created (never started) to copy files into the
    /// models volume: the image has no shell.
    loader: String,
    /// The volume of the base model and corpus.
    models: String,
    /// The state volume.
    state: String,
}

impl Names {
    fn new() -> Names {
        let base = format!("evod-test-llm-{}", std::process::id());
        let n = Names {
            daemon: base.clone(),
            loader: format!("{base}-loader"),
            models: format!("{base}-models"),
            state: format!("{base}-state"),
        };
        n.remove();
        n
    }

    fn remove(&self) {
        docker(&["rm", "--force", "--volumes", &self.daemon, &self.loader]);
        docker(&["volume", "rm", "--force", &self.models, &self.state]);
    }

    /// `docker run` arguments up to the image: read-only root, the models
    /// volume read-only, the state volume.
    fn mounts(&self) -> Vec<String> {
        vec![
            "--read-only".into(),
            "--volume".into(),
            format!("{}:{MODELS}:ro", self.models),
            "--volume".into(),
            format!("{}:{STATE}", self.state),
        ]
    }

    fn inspect(&self, format: &str) -> String {
        common::docker::inspect(&self.daemon, format)
    }

    fn logs(&self) -> String {
        common::docker::logs(&self.daemon)
    }

    /// JSON log lines whose message is `message`, in order.
    fn log_events(&self, message: &str) -> Vec<Json> {
        common::docker::log_events(&self.daemon, message)
    }

    /// Worker 0's row of `evod status --json`, run in the container.
    fn worker(&self) -> Option<Json> {
        let o = docker(&["exec", &self.daemon, "evod", "status", "--json"]);
        if !o.status.success() {
            return None;
        }
        let s: Json = serde_json::from_slice(&o.stdout).ok()?;
        s["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker" && c["index"] == 0)
            .cloned()
    }

    /// `cond` polled until it holds (another container's status has no
    /// event to block on), past [`DEADLINE`] a panic with the container's
    /// state and log.
    fn wait<T>(&self, what: &str, cond: impl FnMut() -> Option<T>) -> T {
        common::poll_until(what, DEADLINE, cond, || {
            format!(
                "state: {}\nlogs:\n{}",
                self.inspect("{{json .State}}"),
                self.logs()
            )
        })
    }

    /// The bytes of the file `path` in the daemon's container (running or
    /// not), through `docker cp` (a tar stream of one regular file).
    fn read_file(&self, path: &str) -> Vec<u8> {
        common::docker::read_file(&self.daemon, path)
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The pid namespace's pid of host process `pid` (the last `NSpid` field).
fn pid_in_container(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// `docker run IMAGE ARGS` with the test's mounts, to completion.
fn run_to_end(n: &Names, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec!["run".into(), "--rm".into()];
    all.extend(n.mounts());
    all.push(IMAGE.as_str().into());
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    docker(&all)
}

#[test]
fn the_perplexity_task_runs_in_the_image_and_a_worker_segv_in_llama_cpp_is_survived() {
    if !image() {
        return;
    }
    let n = Names::new();

    // The base model and a corpus long enough that every evaluation keeps
    // the worker in llama.cpp for a while, written on the host…
    let host = tempfile::tempdir().unwrap();
    let base = host.path().join("base.gguf");
    tiny_llama::write(&base, &[]);
    let corpus = host.path().join("corpus.txt");
    std::fs::write(&corpus, tiny_llama::corpus(12_000)).unwrap();
    // …and copied into the models volume through a container that is only
    // created (the image has no shell to copy with).
    docker_ok(&["volume", "create", &n.models]);
    docker_ok(&[
        "create",
        "--name",
        &n.loader,
        "--volume",
        &format!("{}:{MODELS}", n.models),
        IMAGE.as_str(),
    ]);
    for file in [&base, &corpus] {
        let name = file.file_name().unwrap().to_str().unwrap();
        docker_ok(&[
            "cp",
            file.to_str().unwrap(),
            &format!("{}:{MODELS}/{name}", n.loader),
        ]);
    }
    docker_ok(&["rm", &n.loader]);

    // `evod init --task perplexity` in the image: llama.cpp counts the
    // windows (a build without it would say it could not).
    let o = run_to_end(
        &n,
        &[
            "init",
            "--task",
            "perplexity",
            "--base-model",
            &format!("{MODELS}/base.gguf"),
            "--text",
            &format!("{MODELS}/corpus.txt"),
            "--window",
            WINDOW,
            "--heldout",
            "0.25",
            "-o",
            &format!("{STATE}/vectorland.gguf"),
        ],
    );
    assert!(o.status.success(), "evod init in the image:\n{}", text(&o));
    let said = common::text(&o.stdout);
    assert!(
        said.contains(&format!("held-out windows of {WINDOW} tokens"))
            && !said.contains("without the llm feature"),
        "{said}"
    );

    // A bounded run, detached: the container ends when the run does.
    let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into()];
    args.push(n.daemon.clone());
    args.extend(n.mounts());
    args.push(IMAGE.as_str().into());
    args.extend(
        [
            "run",
            "--workers",
            "1",
            "--generations",
            "6",
            "--population",
            "8",
            "--seed",
            "3",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&args);

    // The worker scoring candidates in llama.cpp (an `EVAL_RECIPES` in
    // service), found from the host: the container's PID 1's child named
    // evod-worker (the standby is evod-standby until promoted).
    let init: u32 = n.inspect("{{.State.Pid}}").parse().unwrap();
    let (host_pid, before) = n.wait("the worker scoring candidates", || {
        let w = n.worker()?;
        if w["stats"]["in_service"] != "EVAL_RECIPES" {
            return None;
        }
        let workers = common::children_named(init, "evod-worker");
        let [host_pid] = workers[..] else {
            return None;
        };
        // The very process the status row names.
        (pid_in_container(host_pid)? == w["pid"].as_u64()?).then_some((host_pid, w))
    });
    kill(Pid::from_raw(host_pid as i32), Signal::SIGSEGV).unwrap_or_else(|e| {
        panic!(
            "kill -SEGV of the worker (host pid {host_pid}, uid 65532): {e} (needs root, as in CI)"
        )
    });
    let after = n.wait("the worker respawned after its SIGSEGV", || {
        let w = n.worker()?;
        (w["restarts"].as_u64()? >= 1 && w["pid"] != before["pid"]).then_some(w)
    });
    assert!(
        after["last_exit"]
            .as_str()
            .unwrap()
            .starts_with("killed by signal 11 (SIGSEGV)"),
        "{after}"
    );

    // The daemon (PID 1) carries on to the end of the bounded run.
    let mut wait = Command::new("docker")
        .args(["wait", &n.daemon])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = common::wait_exit(&mut wait, DEADLINE).unwrap_or_else(|| {
        let _ = wait.kill();
        panic!("the run did not end\n{}", n.logs())
    });
    assert!(status.success(), "docker wait: {status}");
    assert_eq!(n.inspect("{{.State.ExitCode}}"), "0", "{}", n.logs());
    assert_eq!(n.inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");
    assert_eq!(n.inspect("{{.Config.User}}"), "65532:65532");
    let start = n.log_events("evod supervisor starting");
    assert_eq!(start.len(), 1, "{}", n.logs());
    assert_eq!(start[0]["fields"]["pid"], 1, "{}", start[0]);

    // A control vector was published, its held-out fitness above the
    // start vector's (the base model's own, which the log reports).
    let start_fitness = n
        .log_events("held-out fitness of the start control vector: the first publish must beat it")
        .first()
        .and_then(|e| e["fields"]["fitness"].as_f64())
        .unwrap_or_else(|| panic!("no start fitness logged\n{}", n.logs()));
    let published = host.path().join("published.gguf");
    std::fs::write(&published, n.read_file(&format!("{STATE}/vectorland.gguf"))).unwrap();
    let f = GgufFile::open(&published).unwrap();
    assert_eq!(
        f.get("general.architecture").and_then(Value::as_str),
        Some("controlvector")
    );
    let generation = f.get("evod.generation").and_then(Value::as_u64).unwrap();
    let fitness = f.get("evod.fitness").and_then(Value::as_f64).unwrap();
    assert!(
        generation >= 1 && fitness > start_fitness,
        "published generation {generation}, fitness {fitness} (start {start_fitness})\n{}",
        n.logs()
    );
    // The worker's base model is the one in the volume, read-only.
    assert_eq!(
        f.get("evod.perplexity.base_model").and_then(Value::as_str),
        Some(Path::new(MODELS).join("base.gguf").to_str().unwrap())
    );
}
