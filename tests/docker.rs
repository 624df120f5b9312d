//! Process tests of the container image: real `docker run`, `stop`, `kill`,
//! `start`, real signals. The image is built once per test run by
//! `cargo xtask image --tag evod:test-<hash>` (`common::docker::test_tag`:
//! one tag per checkout, so two checkouts' tests on one engine never
//! re-tag each other's image; a static build, llama.cpp included,
//! cached in `target/`, then `docker build` of `docker/Dockerfile`, a no-op
//! when nothing changed), so these tests work from `cargo test` alone. The
//! perplexity task in the image is `tests/docker_llm.rs`'s.
//!
//! The image is labelled with its checkout; test images of checkouts that
//! are gone (a removed CI clone) are removed before a run builds its own.
//!
//! Without a Docker engine (`docker info` fails) every test prints one loud
//! `SKIPPED: tests/docker.rs: …` line and passes. Each test has its own
//! container and volume, removed by a guard even when the test fails. Every
//! wait is on `docker inspect`, `docker logs` or `docker exec … evod status`
//! against a deadline, never a fixed sleep.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(90);

/// The tag these tests build and run (not `evod:local`, the user's).
static IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| common::docker::test_tag("evod"));

/// The state folder, the image's `VOLUME`.
const STATE: &str = "/var/lib/evod";

use common::docker::{docker, root, text};

/// Builds the image once per run; `false` (after one loud SKIPPED line)
/// without an engine.
fn image() -> bool {
    common::docker::images_or_skip("tests/docker.rs", &[&["image", "--tag", IMAGE.as_str()]])
}

/// One container and its named volume, removed on drop (even after a
/// failed assertion).
struct Container {
    name: String,
    volume: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        docker(&["rm", "--force", "--volumes", &self.name]);
        docker(&["volume", "rm", "--force", &self.volume]);
    }
}

impl Container {
    /// A guard for container `evod-test-<test>-<pid>` (not created yet:
    /// leftovers of an earlier crashed run with that name are removed).
    fn named(test: &str) -> Container {
        let name = format!("evod-test-{test}-{}", std::process::id());
        let c = Container {
            volume: format!("{name}-state"),
            name,
        };
        docker(&["rm", "--force", &c.name]);
        docker(&["volume", "rm", "--force", &c.volume]);
        c
    }

    /// `docker run` arguments up to the image: name, read-only root, the
    /// state volume, a short health interval.
    fn run_args<'a>(&'a self, volume: &'a str) -> Vec<&'a str> {
        vec![
            "run",
            "--name",
            &self.name,
            "--read-only",
            "--volume",
            volume,
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "--health-timeout",
            "5s",
        ]
    }

    fn volume_arg(&self) -> String {
        format!("{}:{STATE}", self.volume)
    }

    /// `docker run --detach IMAGE run ARGS` (`args`: flags of `evod run`).
    fn start_detached(test: &str, args: &[&str]) -> Container {
        let c = Container::named(test);
        let volume = c.volume_arg();
        let mut all = c.run_args(&volume);
        all.push("--detach");
        all.push(IMAGE.as_str());
        all.push("run");
        all.extend_from_slice(args);
        let o = docker(&all);
        assert!(o.status.success(), "docker run failed:\n{}", text(&o));
        c
    }

    fn inspect(&self, format: &str) -> String {
        common::docker::inspect(&self.name, format)
    }

    fn logs(&self) -> String {
        common::docker::logs(&self.name)
    }

    /// `evod ARGS` run inside the container.
    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str(), "evod"];
        all.extend_from_slice(args);
        docker(&all)
    }

    fn status(&self) -> Option<Value> {
        let o = self.exec(&["status", "--json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    fn wait<T>(&self, what: &str, cond: impl FnMut() -> Option<T>) -> T {
        common::poll_until(what, DEADLINE, cond, || {
            format!(
                "state: {}\nlogs:\n{}",
                self.inspect("{{json .State}}"),
                self.logs()
            )
        })
    }

    fn wait_health(&self, wanted: &str) {
        self.wait(&format!("docker health status {wanted:?}"), || {
            (self.inspect("{{.State.Health.Status}}") == wanted).then_some(())
        });
    }

    /// The worker row of a healthy status report.
    fn healthy_worker(&self) -> Option<Value> {
        let s = self.status().filter(|s| s["healthy"] == true)?;
        s["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker" && c["index"] == 0)
            .cloned()
    }

    /// JSON log lines whose message is `message`, in order.
    fn log_events(&self, message: &str) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .collect()
    }

    /// The bytes of the file `path` in the container (running or not),
    /// through `docker cp` (the image has no shell to `cat` with).
    fn read_file(&self, path: &str) -> Vec<u8> {
        common::docker::read_file(&self.name, path)
    }
}

/// The runtime stage of a Dockerfile: from the marker line to the end.
fn runtime_stage(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let at = text
        .find("# --- runtime stage")
        .unwrap_or_else(|| panic!("{}: no runtime stage marker", path.display()));
    text[at..].to_owned()
}

#[test]
fn the_registry_dockerfile_and_the_local_one_share_the_runtime_stage() {
    // No engine needed: the registry image cannot be built here (nothing
    // can be pulled), so sameness is checked where it is decided.
    let registry = runtime_stage(&root().join("Dockerfile"));
    let local = runtime_stage(&root().join("docker/Dockerfile"));
    assert_eq!(registry, local);
    for line in [
        "FROM scratch",
        "USER 65532:65532",
        "VOLUME [\"/var/lib/evod\"]",
        "CMD [\"/usr/local/bin/evod\", \"status\", \"--check\"]",
        "ENTRYPOINT [\"/usr/local/bin/evod\"]",
        "CMD [\"run\"]",
    ] {
        assert!(local.lines().any(|l| l.trim() == line), "no {line:?}");
    }
}

#[test]
fn the_image_runs_as_a_non_root_user_with_a_state_volume_and_a_healthcheck() {
    if !image() {
        return;
    }
    let o = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        IMAGE.as_str(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert!(config["Volumes"][STATE].is_object(), "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/evod"])
    );
    // The default command; `docker run IMAGE join URL` runs an evaluator.
    assert_eq!(config["Cmd"], serde_json::json!(["run"]));
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/evod", "status", "--check"])
    );
    assert_eq!(config["StopSignal"], "SIGTERM", "{config}");
}

/// The test image carries its checkout's label; a test image whose
/// checkout is gone is removed before the next run builds its own, one
/// whose checkout exists is kept.
#[test]
fn test_images_of_checkouts_that_are_gone_are_pruned() {
    use common::docker::{CHECKOUT_LABEL, checkout, prune_stale_test_images};
    if !image() {
        return;
    }
    let label = format!("{{{{index .Config.Labels \"{CHECKOUT_LABEL}\"}}}}");
    let o = docker(&["image", "inspect", "--format", &label, IMAGE.as_str()]);
    assert_eq!(text(&o).trim(), checkout(), "{}", text(&o));
    // Two tiny labelled images: one of a checkout that is gone, one of a
    // folder that holds a Cargo.toml (an existing checkout).
    let live = tempfile::tempdir().unwrap();
    std::fs::write(live.path().join("Cargo.toml"), "").unwrap();
    let gone = live.path().join("gone");
    let pid = std::process::id();
    let build = |tag: &str, owner: &Path| {
        let mut child = Command::new("docker")
            .args(["build", "--quiet", "--tag", tag, "--label"])
            .arg(format!("{CHECKOUT_LABEL}={}", owner.display()))
            .args(["--label", &format!("evod.test.tag={tag}"), "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"FROM scratch\nLABEL evod.test=prune\n")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "docker build {tag}: {}", text(&o));
    };
    let stale = format!("evod:test-stale-{pid}");
    let kept = format!("evod:test-kept-{pid}");
    build(&stale, &gone);
    build(&kept, live.path());
    let exists = |tag: &str| docker(&["image", "inspect", tag]).status.success();
    let removed = prune_stale_test_images();
    let (stale_left, kept_left, ours_left) = (exists(&stale), exists(&kept), exists(&IMAGE));
    docker(&["rmi", "--force", &stale]);
    docker(&["rmi", "--force", &kept]);
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!stale_left, "{stale} is still there");
    assert!(kept_left, "{kept}: its checkout exists");
    assert!(ours_left, "{}: this checkout's image", IMAGE.as_str());
}

#[test]
fn docker_run_runs_the_main_job_and_exits_0() {
    if !image() {
        return;
    }
    let c = Container::named("main-job");
    let volume = c.volume_arg();
    let mut args = c.run_args(&volume);
    args.extend_from_slice(&[
        IMAGE.as_str(),
        "run",
        "--until-solved",
        "--seed",
        "1",
        "--workers",
        "1",
    ]);
    let mut run = Command::new("docker")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = common::wait_exit(&mut run, DEADLINE);
    let status = status.unwrap_or_else(|| {
        let _ = run.kill();
        panic!("docker run did not exit\n{}", c.logs())
    });
    assert!(status.success(), "docker run: {status}\n{}", c.logs());
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0");
    assert!(c.logs().contains("evod: solved"), "{}", c.logs());
    // It ran as the image's user, with PID 1 being `evod run`.
    let start = c.log_events("evod supervisor starting");
    assert_eq!(start.len(), 1, "{}", c.logs());
    assert_eq!(start[0]["fields"]["pid"], 1, "{}", start[0]);
    assert_eq!(c.inspect("{{.Config.User}}"), "65532:65532");
    assert_eq!(c.inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");
}

#[test]
fn docker_stop_ends_a_service_run_with_exit_0_within_the_grace_period() {
    if !image() {
        return;
    }
    let c = Container::start_detached("stop", &["--workers", "1", "--seed", "1"]);
    c.wait_health("healthy");
    let started = Instant::now();
    // docker's own timeout (10 s) is above the image's grace period (8 s):
    // past it docker would SIGKILL and the exit code be 137.
    let o = docker(&["stop", "--time", "10", &c.name]);
    let took = started.elapsed();
    assert!(o.status.success(), "docker stop failed:\n{}", text(&o));
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "after {took:?}\n{}",
        c.logs()
    );
    assert!(
        took < Duration::from_secs(8),
        "docker stop took {took:?}, not within the 8 s grace period"
    );
    assert_eq!(
        c.log_events("all children stopped").len(),
        1,
        "{}",
        c.logs()
    );
    // Graceful for the evolver too: it saved its checkpoint.
    assert!(
        c.logs().contains("stopped by signal, checkpoint saved"),
        "{}",
        c.logs()
    );
}

#[test]
fn an_external_sigsegv_of_a_worker_in_the_container_is_survived() {
    if !image() {
        return;
    }
    let c = Container::start_detached("segv", &["--workers", "1", "--seed", "1"]);
    let before = c.wait("a healthy daemon", || c.healthy_worker());
    // The worker's pid as the host sees it: a child of the container's
    // PID 1 named evod-worker. Signalled from outside, as a chaos tool or
    // `docker kill -s SEGV` (which only reaches PID 1) would.
    let init: u32 = c.inspect("{{.State.Pid}}").parse().unwrap();
    let workers = common::children_named(init, "evod-worker");
    assert_eq!(workers.len(), 1, "workers of {init}: {workers:?}");
    kill(Pid::from_raw(workers[0] as i32), Signal::SIGSEGV).unwrap_or_else(|e| {
        panic!(
            "kill -SEGV of the worker (host pid {}, uid 65532): {e} (needs root, as in CI)",
            workers[0]
        )
    });
    // Replaced at its crash notice; its exit status is recorded when it
    // is reaped.
    let after = c.wait("the worker replaced, healthy again, its end reaped", || {
        c.healthy_worker().filter(|w| {
            w["restarts"] == 1
                && w["last_exit"]
                    .as_str()
                    .is_some_and(|l| !l.starts_with("crash notice"))
        })
    });
    assert_ne!(after["pid"], before["pid"], "{after}");
    assert!(
        after["last_exit"]
            .as_str()
            .unwrap()
            .starts_with("killed by signal 11 (SIGSEGV)"),
        "{after}"
    );
    let check = c.exec(&["status", "--check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert_eq!(c.inspect("{{.State.Running}}"), "true");
}

#[test]
fn the_healthcheck_turns_healthy_then_unhealthy_when_the_model_cannot_be_served() {
    if !image() {
        return;
    }
    let c = Container::start_detached("health", &["--workers", "1", "--no-evolver"]);
    c.wait_health("healthy");
    // Replace the live model in the volume with bytes that are not a model.
    let garbage = tempfile::tempdir().unwrap();
    let file = garbage.path().join("vectorland.gguf");
    std::fs::write(&file, b"not a GGUF file").unwrap();
    let target = format!("{}:{STATE}/vectorland.gguf", c.name);
    let o = docker(&["cp", file.to_str().unwrap(), &target]);
    assert!(o.status.success(), "docker cp failed:\n{}", text(&o));
    c.wait_health("unhealthy");
    let check = c.exec(&["status", "--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        common::text(&check.stdout).starts_with("unhealthy"),
        "{}",
        text(&check)
    );
}

/// Largest `generation` of the evolver's pulse lines so far.
fn last_pulse(c: &Container) -> Option<u64> {
    c.log_events("pulse")
        .iter()
        .filter_map(|p| p["fields"]["generation"].as_u64())
        .max()
}

#[test]
fn docker_kill_then_start_resumes_from_the_checkpoint() {
    if !image() {
        return;
    }
    // A checkpoint every 10 generations (the default, said explicitly).
    let c = Container::start_detached(
        "resume",
        &[
            "--workers",
            "1",
            "--seed",
            "1",
            "--checkpoint-every",
            "10",
            // Past CartPole's maximum it would rest: keep evolving.
            "--patience",
            "0",
        ],
    );
    c.wait("the evolver past generation 100", || {
        last_pulse(&c).filter(|&g| g >= 100)
    });
    let o = docker(&["kill", "--signal", "KILL", &c.name]);
    assert!(o.status.success(), "docker kill failed:\n{}", text(&o));
    c.wait("the container to stop", || {
        (c.inspect("{{.State.Running}}") == "false").then_some(())
    });
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "137");
    // Rows of state/progress.csv are generations `0..done`, each written
    // just before the checkpoint of a `done` that is a multiple of 10.
    let progress = String::from_utf8(c.read_file("/var/lib/evod/state/progress.csv")).unwrap();
    let done = progress
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
        .max()
        .expect("progress rows")
        + 1;
    assert!(
        c.log_events("resuming from /var/lib/evod/state/checkpoint.bin")
            .is_empty()
    );

    let o = docker(&["start", &c.name]);
    assert!(o.status.success(), "docker start failed:\n{}", text(&o));
    let resumed = c.wait("the evolver to resume from its checkpoint", || {
        c.log_events("resuming from /var/lib/evod/state/checkpoint.bin")
            .first()
            .and_then(|e| e["fields"]["generation"].as_u64())
    });
    // The checkpoint of the last multiple of 10 the killed run reached (or
    // the one before, if the kill came between a row and its checkpoint):
    // not a restart from generation 0.
    assert!(
        resumed >= 100 && (done.saturating_sub(10)..=done).contains(&resumed),
        "resumed at generation {resumed}, killed after {done} generations\n{}",
        c.logs()
    );
    c.wait("a healthy daemon after the restart", || c.healthy_worker());
    assert_eq!(c.log_events("evod supervisor starting").len(), 2);
}
