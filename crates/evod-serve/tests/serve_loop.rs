//! The serve loop against a real segment: the loop on one thread (the
//! worker's side), clients on this one (the evolver's and the
//! supervisor's), a real model file. Every opcode's answer, a handler's
//! error as `EVAL_FAILED`, fault opcodes refused, `SHUTDOWN` ending the
//! loop, and a new epoch ending it too; `EVAL_RECIPES` scored exactly as
//! an `EVAL` of the regenerated vectors, a wrong or missing base refused
//! with `WRONG_BASE`, malformed bodies with `BAD_REQUEST`.

use std::time::{Duration, Instant};

use evod_evolve::{Base, ParamLayout, Recipe, Sign, TensorScale};
use evod_ring::{Channel, LayoutConfig, Segment};
use evod_runtime::{Activation, Architecture, ModelSpec, init_params, write_model};
use evod_serve::{EvalRequest, Exit, Handler, ServedModel};
use evod_wire::protocol::{
    self, EvalHeader, ExecHeader, LoadRequest, RECIPE_BYTES, RecipesHeader, WorkerInfo, op, status,
};

/// Fitness: the sum of the parameters; a candidate starting with a
/// negative value is refused with a message.
struct Sum {
    loads: u32,
}

impl Handler for Sum {
    fn load(&mut self, _model: &ServedModel) -> Result<(), String> {
        self.loads += 1;
        Ok(())
    }

    fn eval(&mut self, model: &ServedModel, request: &EvalRequest<'_>) -> Result<Vec<f64>, String> {
        assert_eq!(request.n_params, model.arch().n_params());
        (0..request.candidates)
            .map(|i| {
                let c = request.candidate(i);
                request.beat();
                if c[0] < 0.0 {
                    Err(format!(
                        "candidate {i} starts negative (seed {})",
                        request.seed
                    ))
                } else {
                    Ok(c.iter().map(|&v| f64::from(v)).sum())
                }
            })
            .collect()
    }
}

/// Ends the serve loop (a new epoch) if the test thread panics, so a
/// failed assertion fails the test instead of leaving the loop waiting for
/// a `SHUTDOWN` forever.
struct EndOnPanic<'a>(&'a Segment);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.bump_epoch();
        }
    }
}

/// `f()`'s first `Some`, polled until a 10 s deadline.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn eval_body(candidates: &[Vec<f32>], seed: u64) -> impl FnOnce(&mut [u8]) + '_ {
    move |out: &mut [u8]| {
        let h = EvalHeader {
            candidates: candidates.len() as u32,
            params: candidates[0].len() as u32,
            seed,
            episodes: 0,
            flags: 0,
            reserved: 0,
        };
        h.encode(out);
        let flat: Vec<f32> = candidates.concat();
        protocol::write_f32s(&flat, &mut out[EvalHeader::SIZE..]);
    }
}

fn eval_len(candidates: &[Vec<f32>]) -> usize {
    EvalHeader::SIZE + 4 * candidates.len() * candidates[0].len()
}

#[test]
fn the_loop_answers_every_opcode_and_ends_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Architecture::new(vec![2, 3, 1], Activation::Tanh).unwrap();
    let n = arch.n_params();
    let path = dir.path().join("m.gguf");
    let params = init_params(&arch, 3);
    write_model(
        &path,
        &ModelSpec::new(arch.clone(), "external".into(), 3),
        &params,
        None,
    )
    .unwrap();

    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let deadline = || Instant::now() + Duration::from_secs(10);
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut h = Sum { loads: 0 };
            let exit = evod_serve::serve(&seg, None, &mut h);
            (exit.map_err(|e| e.to_string()), h.loads)
        });
        let _end = EndOnPanic(&seg);
        let mut control = seg.client(Channel::Control).unwrap();
        let mut eval = seg.client(Channel::Eval).unwrap();

        let (st, _) = protocol::exchange(&mut control, op::PING, 0, |_| {}, deadline()).unwrap();
        assert_eq!(st, status::OK);
        // No model yet.
        let one = vec![vec![1.0f32; n]];
        let (st, msg) = protocol::exchange(
            &mut eval,
            op::EVAL,
            eval_len(&one),
            eval_body(&one, 0),
            deadline(),
        )
        .unwrap();
        assert_eq!((st, &msg[..]), (status::NO_MODEL, &b"no model loaded"[..]));

        // LOAD with the wrong generation is refused; the right one served.
        for (generation, want) in [(5, status::LOAD_FAILED), (0, status::OK)] {
            let body = protocol::to_bincode(&LoadRequest {
                path: path.display().to_string(),
                generation,
                checksum: evod_gguf::GgufFile::open(&path).unwrap().checksum(),
            });
            let (st, reply) = protocol::exchange(
                &mut control,
                op::LOAD,
                body.len(),
                |b| b.copy_from_slice(&body),
                deadline(),
            )
            .unwrap();
            assert_eq!(st, want, "{}", String::from_utf8_lossy(&reply));
            if st == status::OK {
                let info: WorkerInfo = protocol::from_bincode(&reply).unwrap();
                assert_eq!((info.n_params, info.task.as_str()), (n as u64, "external"));
                assert_eq!(info.pid, std::process::id());
            } else {
                assert!(String::from_utf8_lossy(&reply).contains("generation 0, expected 5"));
            }
        }
        assert_eq!(seg.stats().model_generation, 0);

        // EVAL: one fitness per candidate, in order.
        let two = vec![vec![1.0f32; n], vec![0.5f32; n]];
        let (st, reply) = protocol::exchange(
            &mut eval,
            op::EVAL,
            eval_len(&two),
            eval_body(&two, 9),
            deadline(),
        )
        .unwrap();
        assert_eq!(st, status::OK);
        assert_eq!(
            protocol::read_f64s(&reply, 2).unwrap(),
            [n as f64, n as f64 / 2.0]
        );
        // The handler's error is the reply's message.
        let bad = vec![vec![-1.0f32; n]];
        let (st, msg) = protocol::exchange(
            &mut eval,
            op::EVAL,
            eval_len(&bad),
            eval_body(&bad, 4),
            deadline(),
        )
        .unwrap();
        assert_eq!(st, status::EVAL_FAILED);
        assert_eq!(
            String::from_utf8_lossy(&msg),
            "candidate 0 starts negative (seed 4)"
        );
        // Wrong parameter count.
        let short = vec![vec![1.0f32; n - 1]];
        let (st, msg) = protocol::exchange(
            &mut eval,
            op::EVAL,
            eval_len(&short),
            eval_body(&short, 0),
            deadline(),
        )
        .unwrap();
        assert_eq!(st, status::EVAL_FAILED);
        assert!(String::from_utf8_lossy(&msg).contains("the model has"));

        // NEURAL_EXEC: evod's forward pass by default.
        let inputs = [0.25f32, -0.5];
        let (st, out) = protocol::exchange(
            &mut control,
            op::NEURAL_EXEC,
            ExecHeader::SIZE + 8,
            |b| {
                ExecHeader {
                    batch: 1,
                    inputs: 2,
                }
                .encode(&inputs, b)
            },
            deadline(),
        )
        .unwrap();
        assert_eq!(st, status::OK);
        let mut want = [0f32; 1];
        evod_runtime::forward_batch(
            &arch,
            &params,
            &inputs,
            1,
            &mut want,
            &mut Default::default(),
        )
        .unwrap();
        assert_eq!(protocol::read_f32s(&out), want);

        // Fault opcodes are refused; the worker serves on.
        let (st, msg) =
            protocol::exchange(&mut control, op::FAULT_SEGV, 0, |_| {}, deadline()).unwrap();
        assert_eq!(st, status::FAULT_REFUSED);
        assert!(String::from_utf8_lossy(&msg).contains("refused"));
        // The loop counts a request after its reply is out: wait for it.
        let stats = wait_for(|| Some(seg.stats()).filter(|s| s.errors >= 5));
        assert_eq!(stats.errors, 5, "{stats:?}");

        let (st, _) =
            protocol::exchange(&mut control, op::SHUTDOWN, 0, |_| {}, deadline()).unwrap();
        assert_eq!(st, status::OK);
        let (exit, loads) = worker.join().unwrap();
        assert_eq!(exit, Ok(Exit::Shutdown));
        assert_eq!(loads, 1);
    });
}

#[test]
fn a_new_epoch_ends_the_loop() {
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            evod_serve::serve(&seg, None, &mut Sum { loads: 0 }).map_err(|e| e.to_string())
        });
        let _end = EndOnPanic(&seg);
        // Once the worker serves (it answers a PING), the owner replaces it.
        let mut control = seg.client(Channel::Control).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (st, _) = protocol::exchange(&mut control, op::PING, 0, |_| {}, deadline).unwrap();
        assert_eq!(st, status::OK);
        seg.bump_epoch();
        assert_eq!(worker.join().unwrap(), Ok(Exit::Superseded));
    });
}

/// An `EVAL_RECIPES` body: `recipes` against the base at `path` whose
/// checksum is `base`.
fn recipes_body(
    path: &std::path::Path,
    base: u64,
    n: usize,
    recipes: &[Recipe],
    seed: u64,
) -> Vec<u8> {
    let path = path.display().to_string();
    let h = RecipesHeader {
        candidates: recipes.len() as u32,
        params: n as u32,
        seed,
        episodes: 0,
        path_len: path.len() as u32,
        base,
        flags: 0,
    };
    let bytes: Vec<u8> = recipes.iter().flat_map(|r| r.to_bytes()).collect();
    let mut out = vec![0u8; h.request_len()];
    h.encode(path.as_bytes(), &bytes, &mut out);
    out
}

fn send(client: &mut evod_ring::Client<'_>, opcode: u32, body: &[u8]) -> (i32, Vec<u8>) {
    protocol::exchange(
        client,
        opcode,
        body.len(),
        |b| b.copy_from_slice(body),
        Instant::now() + Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn eval_recipes_scores_the_regenerated_candidates_as_eval_scores_the_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Architecture::new(vec![3, 4, 2], Activation::Tanh).unwrap();
    let n = arch.n_params();
    let path = dir.path().join("m.gguf");
    let spec = ModelSpec::new(arch.clone(), "external".into(), 0);
    write_model(&path, &spec, &init_params(&arch, 3), None).unwrap();
    // The base the evolver would write: another vector of the same network.
    let mean: Vec<f32> = (0..n).map(|i| 0.25 + i as f32 * 1e-3).collect();
    let base_path = dir.path().join("base.gguf");
    write_model(&base_path, &spec, &mean, None).unwrap();
    let layout = ParamLayout::from_architecture(&arch).unwrap();
    let base = Base::new(&mean, &layout).unwrap();
    let recipes: Vec<Recipe> = (0..5u64)
        .flat_map(|k| {
            [Sign::Plus, Sign::Minus]
                .map(|s| Recipe::new(base.checksum(), 40 + k, 0.05, s, TensorScale::Glorot))
        })
        .chain([Recipe::center(base.checksum(), TensorScale::Glorot)])
        .collect();
    let vectors: Vec<Vec<f32>> = recipes
        .iter()
        .map(|r| r.materialize(&base).unwrap())
        .collect();

    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut h = Sum { loads: 0 };
            evod_serve::serve(&seg, Some(&path), &mut h).map_err(|e| e.to_string())
        });
        let _end = EndOnPanic(&seg);
        let mut control = seg.client(Channel::Control).unwrap();
        let mut eval = seg.client(Channel::Eval).unwrap();

        let mut by_vectors = vec![0u8; eval_len(&vectors)];
        eval_body(&vectors, 6)(&mut by_vectors);
        let (st, want) = send(&mut eval, op::EVAL, &by_vectors);
        assert_eq!(st, status::OK, "{}", String::from_utf8_lossy(&want));
        let body = recipes_body(&base_path, base.checksum(), n, &recipes, 6);
        let (st, got) = send(&mut eval, op::EVAL_RECIPES, &body);
        assert_eq!(st, status::OK, "{}", String::from_utf8_lossy(&got));
        // Bit for bit the same fitness, and not a trivial one: the
        // candidates differ.
        assert_eq!(got, want);
        let fitness = protocol::read_f64s(&got, recipes.len()).unwrap();
        assert_ne!(fitness[0], fitness[1]);
        assert_eq!(fitness[10], mean.iter().map(|&v| f64::from(v)).sum::<f64>());
        // Again: the base is held, the answer the same.
        assert_eq!(send(&mut eval, op::EVAL_RECIPES, &body), (status::OK, got));

        // A checksum the file does not have: WRONG_BASE, nothing evaluated.
        let other = recipes_body(&base_path, base.checksum() ^ 1, n, &recipes, 6);
        let (st, msg) = send(&mut eval, op::EVAL_RECIPES, &other);
        assert_eq!(st, status::WRONG_BASE);
        assert!(
            String::from_utf8_lossy(&msg).contains("wrong base"),
            "{}",
            String::from_utf8_lossy(&msg)
        );
        // A missing base file: WRONG_BASE naming it.
        let gone = dir.path().join("gone.gguf");
        let (st, msg) = send(
            &mut eval,
            op::EVAL_RECIPES,
            &recipes_body(&gone, base.checksum(), n, &recipes, 6),
        );
        assert_eq!(st, status::WRONG_BASE);
        assert!(String::from_utf8_lossy(&msg).contains("gone.gguf"));
        // A recipe for another base than the request names: WRONG_BASE.
        let mut stray = recipes.clone();
        stray[3].base ^= 1;
        let (st, msg) = send(
            &mut eval,
            op::EVAL_RECIPES,
            &recipes_body(&base_path, base.checksum(), n, &stray, 6),
        );
        assert_eq!(st, status::WRONG_BASE);
        assert!(String::from_utf8_lossy(&msg).starts_with("recipe 3: "));
        // Another parameter count: EVAL_FAILED.
        let (st, _) = send(
            &mut eval,
            op::EVAL_RECIPES,
            &recipes_body(&base_path, base.checksum(), n + 1, &recipes, 6),
        );
        assert_eq!(st, status::EVAL_FAILED);

        // Malformed bodies are refused as BAD_REQUEST from the header, before
        // anything is sized from the counts they claim.
        let good = recipes_body(&base_path, base.checksum(), n, &recipes, 6);
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut long_path = good.clone();
        long_path[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut bad_sign = good.clone();
        let at = good.len() - RECIPE_BYTES + 20;
        bad_sign[at] = 9;
        for (what, body) in [
            ("candidates", &huge[..]),
            ("path_len", &long_path[..]),
            ("truncated", &good[..good.len() - 1]),
            ("header only", &good[..RecipesHeader::SIZE - 1]),
            ("sign", &bad_sign[..]),
        ] {
            let (st, msg) = send(&mut eval, op::EVAL_RECIPES, body);
            assert_eq!(
                st,
                status::BAD_REQUEST,
                "{what}: {}",
                String::from_utf8_lossy(&msg)
            );
        }
        // The worker served on, and still holds nothing wrong: the good
        // request still gives the right answer.
        assert_eq!(send(&mut eval, op::EVAL_RECIPES, &good), (status::OK, want));

        let (st, _) = send(&mut control, op::SHUTDOWN, &[]);
        assert_eq!(st, status::OK);
        assert_eq!(worker.join().unwrap(), Ok(Exit::Shutdown));
    });
}

#[test]
fn eval_recipes_without_a_model_is_no_model() {
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            evod_serve::serve(&seg, None, &mut Sum { loads: 0 }).map_err(|e| e.to_string())
        });
        let _end = EndOnPanic(&seg);
        let mut eval = seg.client(Channel::Eval).unwrap();
        let r = [Recipe::center(1, TensorScale::Unit)];
        let (st, _) = send(
            &mut eval,
            op::EVAL_RECIPES,
            &recipes_body(std::path::Path::new("/b.gguf"), 1, 4, &r, 0),
        );
        assert_eq!(st, status::NO_MODEL);
        seg.bump_epoch();
        assert_eq!(worker.join().unwrap(), Ok(Exit::Superseded));
    });
}
