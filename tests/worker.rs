//! The worker role as a real process over the real ring: every opcode,
//! `LOAD` of missing and malformed files, fault opcodes refused without
//! `--allow-fault-injection` and a real SIGSEGV with it, and the crash
//! notice a worker writes on its link before it dies of a fatal signal.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evod_ring::{Channel, Client, LayoutConfig, Segment};
use evod_runtime::{Architecture, ModelSpec, Task, init_params, write_model};

use evod_wire::op::{
    EVAL, FAULT_ABORT, FAULT_EXIT, FAULT_NOTICE, FAULT_SEGV, LOAD, NEURAL_EXEC, PING, SHUTDOWN,
    STATS,
};
use evod_wire::status::{BAD_REQUEST, EVAL_FAILED, FAULT_REFUSED, LOAD_FAILED, OK, UNKNOWN_OPCODE};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn cartpole_model(
    dir: &Path,
    name: &str,
    seed: u64,
    generation: u64,
) -> (std::path::PathBuf, Vec<f32>) {
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let params = init_params(&arch, seed);
    let mut spec = ModelSpec::new(arch, "cartpole".into(), seed);
    spec.generation = generation;
    let path = dir.join(name);
    write_model(&path, &spec, &params, None).unwrap();
    (path, params)
}

fn spawn_worker(seg: &Segment, model: &Path, faults: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evod"));
    let fd = seg.pass_to(&mut cmd);
    cmd.args(["worker", "--ring-fd", &fd.to_string(), "--model"])
        .arg(model);
    if faults {
        cmd.arg("--allow-fault-injection");
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .expect("spawning evod worker")
}

/// Sends one request and returns (status, payload).
fn call(client: &mut Client<'_>, opcode: u32, body: &[u8]) -> (i32, Vec<u8>) {
    let reply = client
        .call(
            opcode,
            0,
            body.len(),
            |out| out.copy_from_slice(body),
            deadline(),
        )
        .unwrap_or_else(|e| panic!("opcode {opcode}: {e}"));
    (reply.status(), reply.payload.to_vec())
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    common::wait_exit(child, Duration::from_secs(20))
        .expect("worker did not exit before the deadline")
}

fn eval_body(candidates: &[&[f32]], seed: u64, episodes: u32) -> Vec<u8> {
    let n = candidates[0].len();
    let mut body = vec![0u8; 32 + 4 * n * candidates.len()];
    body[0..4].copy_from_slice(&(candidates.len() as u32).to_le_bytes());
    body[4..8].copy_from_slice(&(n as u32).to_le_bytes());
    body[8..16].copy_from_slice(&seed.to_le_bytes());
    body[16..20].copy_from_slice(&episodes.to_le_bytes());
    let mut at = 32;
    for c in candidates {
        for v in *c {
            body[at..at + 4].copy_from_slice(&v.to_le_bytes());
            at += 4;
        }
    }
    body
}

fn load_body(path: &str, generation: u64, checksum: u64) -> Vec<u8> {
    // bincode 2 standard config: varint string length, then varints.
    #[derive(serde::Serialize)]
    struct LoadRequest<'a> {
        path: &'a str,
        generation: u64,
        checksum: u64,
    }
    bincode::serde::encode_to_vec(
        LoadRequest {
            path,
            generation,
            checksum,
        },
        bincode::config::standard(),
    )
    .unwrap()
}

#[test]
fn every_opcode_over_the_real_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (model, params) = cartpole_model(dir.path(), "m.gguf", 7, 3);
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let mut child = spawn_worker(&seg, &model, false);
    let mut client = seg.client(Channel::Eval).unwrap();

    assert_eq!(call(&mut client, PING, &[]), (OK, vec![]));

    let (st, body) = call(&mut client, STATS, &[]);
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&body));
    assert!(!body.is_empty());

    // NEURAL_EXEC: two rows of 4 inputs → two rows of 2 outputs, equal to
    // the in-process forward pass.
    let inputs = [0.01f32, -0.02, 0.03, 0.04, 0.5, 0.1, -0.2, 0.3];
    let mut body = vec![0u8; 16 + 32];
    body[0..4].copy_from_slice(&2u32.to_le_bytes());
    body[4..8].copy_from_slice(&4u32.to_le_bytes());
    for (i, v) in inputs.iter().enumerate() {
        body[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let (st, out) = call(&mut client, NEURAL_EXEC, &body);
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&out));
    let got: Vec<f32> = out
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let mut want = vec![0f32; 4];
    evod_runtime::forward_batch(
        &arch,
        &params,
        &inputs,
        2,
        &mut want,
        &mut evod_runtime::Scratch::new(),
    )
    .unwrap();
    assert_eq!(got, want);

    // A malformed NEURAL_EXEC is an error reply, not a crash.
    let (st, msg) = call(&mut client, NEURAL_EXEC, &[1, 2, 3]);
    assert_eq!(st, BAD_REQUEST, "{}", String::from_utf8_lossy(&msg));

    // EVAL: fitness equals the in-process task's, per candidate.
    let other = init_params(&arch, 8);
    let (st, out) = call(&mut client, EVAL, &eval_body(&[&params, &other], 11, 3));
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&out));
    let got: Vec<f64> = out
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let task = Task::CartPole { episodes: 3 };
    let want = vec![
        task.evaluate(&arch, &params, 11).unwrap(),
        task.evaluate(&arch, &other, 11).unwrap(),
    ];
    assert_eq!(got, want);

    // EVAL with the wrong parameter count is refused.
    let (st, msg) = call(&mut client, EVAL, &eval_body(&[&params[..10]], 1, 1));
    assert_eq!(st, EVAL_FAILED);
    assert!(String::from_utf8_lossy(&msg).contains("parameters"));

    // LOAD of a missing file: error reply, the old model keeps serving.
    let (st, msg) = call(
        &mut client,
        LOAD,
        &load_body("/nonexistent/evod.gguf", 0, 0),
    );
    assert_eq!(st, LOAD_FAILED);
    assert!(
        String::from_utf8_lossy(&msg).contains("/nonexistent/evod.gguf"),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    // LOAD of a malformed file: same.
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let (st, msg) = call(&mut client, LOAD, &load_body(bad.to_str().unwrap(), 0, 0));
    assert_eq!(st, LOAD_FAILED);
    assert!(String::from_utf8_lossy(&msg).contains("bad.gguf"));
    let (st, _) = call(&mut client, EVAL, &eval_body(&[&params], 11, 3));
    assert_eq!(st, OK, "old model no longer served after a failed LOAD");

    // LOAD of a good new generation switches the model.
    let (next, _) = cartpole_model(dir.path(), "next.gguf", 9, 4);
    let (st, msg) = call(&mut client, LOAD, &load_body(next.to_str().unwrap(), 4, 0));
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&msg));
    assert_eq!(seg.stats().model_generation, 4);
    // A LOAD whose expected checksum differs is refused.
    let (st, _) = call(
        &mut client,
        LOAD,
        &load_body(next.to_str().unwrap(), 4, 0x1234),
    );
    assert_eq!(st, LOAD_FAILED);

    // Unknown opcodes and fault opcodes without the flag are refused.
    assert_eq!(call(&mut client, 77, &[]).0, UNKNOWN_OPCODE);
    // Every fault opcode, on both channels, with and without a payload.
    let mut control = seg.client(Channel::Control).unwrap();
    let faults: Vec<u32> = (0..1024).filter(|&o| evod_wire::op::is_fault(o)).collect();
    assert_eq!(faults.len(), 8, "{faults:?}");
    for &opcode in &faults {
        assert_ne!(evod_wire::op::name(opcode), "UNKNOWN", "{opcode}");
        for channel in [&mut client, &mut control] {
            for body in [&[][..], &3u32.to_le_bytes(), &1u32.to_le_bytes()] {
                let (st, msg) = call(channel, opcode, body);
                let name = evod_wire::op::name(opcode);
                assert_eq!(st, FAULT_REFUSED, "{name} {body:?}");
                assert!(
                    String::from_utf8_lossy(&msg).contains("--allow-fault-injection"),
                    "{name}: {}",
                    String::from_utf8_lossy(&msg)
                );
                assert_eq!(call(channel, PING, &[]).0, OK, "worker died after {name}");
            }
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "the worker exited");

    // The control channel is served too.
    assert_eq!(call(&mut control, PING, &[]), (OK, vec![]));

    let stats = seg.stats();
    assert!(
        stats.requests_per_opcode.iter().sum::<u64>() >= 10,
        "{stats:?}"
    );

    assert_eq!(call(&mut client, SHUTDOWN, &[]).0, OK);
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// `--ring-fd 1` (stdout, not a segment) is refused before the worker takes
/// the descriptor over: a clear error naming it, exit 1, and nothing of the
/// segment check ever touched stdout (the in-process half, stdout still
/// writable afterwards, is `evod-ring`'s
/// `attach_of_stdout_fails_and_keeps_it_open`).
#[test]
fn ring_fd_that_is_not_a_segment_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_evod"))
        .args(["worker", "--ring-fd", "1", "--model", "/nonexistent.gguf"])
        .stdin(Stdio::null())
        .output()
        .expect("running evod worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    assert!(
        stderr.contains("descriptor 1 is not an evod ring segment")
            && stderr.contains("not a sealed memfd"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn fault_opcodes_kill_the_worker_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = cartpole_model(dir.path(), "m.gguf", 1, 0);

    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let mut child = spawn_worker(&seg, &model, true);
    let mut client = seg.client(Channel::Eval).unwrap();
    assert_eq!(call(&mut client, PING, &[]).0, OK);
    client.send(FAULT_SEGV, 0, 0, |_| {}).unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}");

    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let mut child = spawn_worker(&seg, &model, true);
    let mut client = seg.client(Channel::Eval).unwrap();
    client
        .send(FAULT_EXIT, 0, 4, |out| {
            out.copy_from_slice(&42u32.to_le_bytes())
        })
        .unwrap();
    assert_eq!(wait_exit(&mut child).code(), Some(42));
}

#[test]
fn a_long_evaluation_keeps_the_heartbeat_moving() {
    // A 4-256-256-2 network (67k weights): the runtime ticks every few
    // lockstep steps and the worker beats on each tick, so a batch that
    // takes longer than a heartbeat timeout does not look like a hang.
    // (Before, the heartbeat moved only between groups of 16 candidates:
    // once for this whole batch.)
    let dir = tempfile::tempdir().unwrap();
    let arch = Architecture::new(vec![4, 256, 256, 2], "tanh".parse().unwrap()).unwrap();
    let params = vec![0.0f32; arch.n_params()];
    let spec = ModelSpec::new(arch.clone(), "cartpole".into(), 1);
    let model = dir.path().join("big.gguf");
    write_model(&model, &spec, &params, None).unwrap();
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    /// Kills the worker however the test ends (it holds the test's stdout).
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _worker = Reap(spawn_worker(&seg, &model, false));
    let mut client = seg.client(Channel::Eval).unwrap();
    assert_eq!(call(&mut client, PING, &[]).0, OK);
    let beats = |seg: &Segment| {
        seg.last_beat(evod_ring::Role::Worker)
            .map_or(0, |b| b.count)
    };
    let before = beats(&seg);
    // 8 candidates × 12 episodes = 96 episodes, 12 rounds of 8 lanes; all
    // zero weights push one way, so each episode lasts about 10 steps:
    // ~120 lockstep steps, a tick every 7.
    let candidates: Vec<&[f32]> = vec![&params; 8];
    let (st, out) = call(&mut client, EVAL, &eval_body(&candidates, 3, 12));
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&out));
    let during = beats(&seg) - before;
    assert!(
        during >= 10,
        "only {during} heartbeats while evaluating ~120 lockstep steps"
    );
}

/// `EVAL_RECIPES` body: header, base path, recipes.
fn recipes_body(
    base: u64,
    params: usize,
    path: &Path,
    recipes: &[evod_evolve::Recipe],
    seed: u64,
) -> Vec<u8> {
    let path = path.to_str().unwrap().as_bytes();
    let header = evod_wire::RecipesHeader {
        candidates: recipes.len() as u32,
        params: params as u32,
        seed,
        episodes: 2,
        path_len: path.len() as u32,
        base,
        flags: 0,
    };
    let bytes: Vec<u8> = recipes.iter().flat_map(|r| r.to_bytes()).collect();
    let mut body = vec![0u8; header.request_len()];
    header.encode(path, &bytes, &mut body);
    body
}

#[test]
fn eval_recipes_regenerates_candidates_and_refuses_the_wrong_base() {
    use evod_evolve::{Base, ParamLayout, Recipe, Sign, TensorScale};
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = cartpole_model(dir.path(), "m.gguf", 1, 0);
    // The base file: another parameter vector of the same network.
    let (base_path, base_params) = cartpole_model(dir.path(), "base.gguf", 2, 0);
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let layout = ParamLayout::from_architecture(&arch).unwrap();
    let base = Base::new(&base_params, &layout).unwrap();
    let recipes: Vec<Recipe> = (0..5)
        .flat_map(|s| {
            [Sign::Plus, Sign::Minus]
                .map(|sign| Recipe::new(base.checksum(), s, 0.5, sign, TensorScale::Glorot))
        })
        .collect();
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let mut child = spawn_worker(&seg, &model, false);
    let mut c = seg.client(Channel::Eval).unwrap();
    let n = base_params.len();
    let (st, got) = call(
        &mut c,
        evod_wire::op::EVAL_RECIPES,
        &recipes_body(base.checksum(), n, &base_path, &recipes, 9),
    );
    assert_eq!(st, OK, "{}", String::from_utf8_lossy(&got));
    // Exactly what the materialised vectors score through EVAL.
    let vectors: Vec<Vec<f32>> = recipes
        .iter()
        .map(|r| r.materialize(&base).unwrap())
        .collect();
    let views: Vec<&[f32]> = vectors.iter().map(Vec::as_slice).collect();
    let (st, want) = call(&mut c, EVAL, &eval_body(&views, 9, 2));
    assert_eq!(st, OK);
    assert_eq!(got, want);
    // A checksum the file does not have: refused, nothing evaluated.
    let (st, msg) = call(
        &mut c,
        evod_wire::op::EVAL_RECIPES,
        &recipes_body(base.checksum() ^ 1, n, &base_path, &recipes, 9),
    );
    assert_eq!(st, evod_wire::status::WRONG_BASE);
    assert!(
        String::from_utf8_lossy(&msg).contains("wrong base"),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    // A missing base file: refused by name.
    let missing = dir.path().join("nope.gguf");
    let (st, msg) = call(
        &mut c,
        evod_wire::op::EVAL_RECIPES,
        &recipes_body(base.checksum(), n, &missing, &recipes, 9),
    );
    assert_eq!(st, evod_wire::status::WRONG_BASE);
    assert!(String::from_utf8_lossy(&msg).contains("nope.gguf"));
    // Garbage after the header: a bad request, not a crash.
    let mut bad = recipes_body(base.checksum(), n, &base_path, &recipes, 9);
    bad.pop();
    let (st, _) = call(&mut c, evod_wire::op::EVAL_RECIPES, &bad);
    assert_eq!(st, BAD_REQUEST);
    drop(c);
    let mut ctl = seg.client(Channel::Control).unwrap();
    let _ = call(&mut ctl, SHUTDOWN, &[]);
    assert!(wait_exit(&mut child).success());
}

/// A worker with fault injection and a crash-notice link
/// (`--notice-fd`), and the test's end of that link.
fn spawn_noticing_worker(seg: &Segment, model: &Path) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evod"));
    let ring = seg.pass_to(&mut cmd);
    let fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec, one async-signal-safe fcntl on a
    // descriptor the child inherited; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args(["worker", "--ring-fd", &ring.to_string(), "--model"])
        .arg(model)
        .args(["--allow-fault-injection", "--notice-fd", &fd.to_string()])
        .stdin(Stdio::null());
    let child = cmd.spawn().expect("spawning evod worker");
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (child, ours)
}

/// Everything the worker wrote on its link until it closed (it ended).
fn link_bytes(mut link: UnixStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    link.read_to_end(&mut bytes)
        .expect("the link closes when the worker ends");
    bytes
}

#[test]
fn a_dying_worker_writes_one_crash_notice_then_dies_of_its_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = cartpole_model(dir.path(), "m.gguf", 1, 0);
    enum How {
        Kill(i32),
        Opcode(u32),
    }
    // Signals sent from outside (`kill`), a real invalid write (a fault
    // the kernel raises: the handler lets it fault again under Rust's
    // handler, which passes it on) and `abort()`.
    for (how, signal) in [
        (How::Kill(libc::SIGSEGV), libc::SIGSEGV),
        (How::Kill(libc::SIGBUS), libc::SIGBUS),
        (How::Kill(libc::SIGILL), libc::SIGILL),
        (How::Kill(libc::SIGFPE), libc::SIGFPE),
        (How::Kill(libc::SIGABRT), libc::SIGABRT),
        (How::Kill(libc::SIGTRAP), libc::SIGTRAP),
        (How::Opcode(FAULT_SEGV), libc::SIGSEGV),
        (How::Opcode(FAULT_ABORT), libc::SIGABRT),
    ] {
        let seg = Segment::create(&LayoutConfig::default()).unwrap();
        let (mut child, link) = spawn_noticing_worker(&seg, &model);
        let mut client = seg.client(Channel::Control).unwrap();
        // Answering means the handlers are in (installed before the ring
        // is served).
        assert_eq!(call(&mut client, PING, &[]).0, OK);
        match how {
            How::Kill(s) => {
                // SAFETY: kill(2) with the pid of our own live child.
                assert_eq!(unsafe { libc::kill(child.id() as i32, s) }, 0);
            }
            How::Opcode(op) => {
                client.send(op, 0, 0, |_| {}).unwrap();
            }
        }
        let bytes = link_bytes(link);
        let status = wait_exit(&mut child);
        assert_eq!(
            bytes,
            vec![evod_wire::notice::crash(signal)],
            "signal {signal}: the notice bytes"
        );
        assert_eq!(
            status.signal(),
            Some(signal),
            "the worker did not die of signal {signal}: {status:?}"
        );
    }
}

#[test]
fn a_notice_fault_writes_a_notice_and_the_worker_does_not_die() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = cartpole_model(dir.path(), "m.gguf", 1, 0);
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let (mut child, mut link) = spawn_noticing_worker(&seg, &model);
    let mut client = seg.client(Channel::Control).unwrap();
    assert_eq!(call(&mut client, FAULT_NOTICE, &[]).0, OK);
    let mut byte = [0u8; 1];
    link.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], evod_wire::notice::crash(libc::SIGSEGV));
    // A notice is only a claim: the worker is still there, even after its
    // epoch changed (it ignores it), until it is killed.
    seg.bump_epoch();
    assert!(child.try_wait().unwrap().is_none(), "the worker ended");
    child.kill().unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(link_bytes(link).is_empty(), "a second notice");
}
