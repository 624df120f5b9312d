//! The perplexity task end to end on real llama.cpp (`--features llm`):
//! `evod init --task perplexity` on a tiny llama GGUF made here with
//! gguf-py (`tests/common/tiny_llama.rs`, the runtime's own fixture), a
//! bounded `evod run` (supervisor,
//! llama.cpp workers, evolver) that lowers the training perplexity and
//! publishes a control vector that gguf-py reads and llama.cpp loads (its
//! held-out perplexity is the published fitness, bit for bit); the
//! refusals (a base llama.cpp cannot load, a bad corpus, a vector of the
//! wrong width, a corpus changed under the run); a worker SIGSEGVed while
//! it decodes is replaced by its warm standby, which loaded the base model
//! before its promotion and never again, and the run completes.
//! A real perplexity worker's `EVAL` with a candidate whose perplexity is
//! NaN answers it −∞ and scores the rest of the batch unchanged.
//! `--gate-candidate mean` reaches the evolver: every publish is the mean
//! of its generation.
//!
//! Distributed (issue 15) with a real `redis-server`: a bounded run whose
//! coordinator (`--remote-only`) evaluates nothing itself, one `evod join`
//! host with its own copies of the base and corpus (`--base-model`,
//! `--text`) doing every training and gate task, publishes exactly the
//! single-host run's vector and fitness; a host whose base model or corpus
//! is not the run's is refused at start, by name, with both checksums.
//!
//! The Python is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (`tests/common/tiny_llama.rs`).

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;
#[path = "common/tiny_llama.rs"]
mod tiny_llama;

use common::{Daemon, children_with_role, evod, text};
use tiny_llama::{corpus, python};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use evod_gguf::{GgufFile, Value};

/// Generous: a guard against a hang, not a timing test.
const DEADLINE: Duration = Duration::from_secs(300);
/// Tokens per window in these tests.
const WINDOW: u32 = 16;

/// `evod init --task perplexity` with these files; its output.
fn init(base: &Path, text_file: &Path, out: &Path, extra: &[&str]) -> Output {
    evod()
        .args(["init", "--task", "perplexity", "--base-model"])
        .arg(base)
        .arg("--text")
        .arg(text_file)
        .args(["--window", &WINDOW.to_string(), "--heldout", "0.25"])
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn init_ok(base: &Path, text_file: &Path, out: &Path) {
    let o = init(base, text_file, out, &[]);
    assert!(
        o.status.success(),
        "init: {}\n{}",
        text(&o.stderr),
        text(&o.stdout)
    );
}

/// A state folder holding `vectorland.gguf` initialised on a tiny llama and
/// a corpus of `bytes` bytes; returns (folder, base path, corpus path).
fn setup(bytes: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, base, corpus_file, _) = setup_with(bytes, &[]);
    (dir, base, corpus_file)
}

/// [`setup`] with more `evod init` arguments; also returns init's stdout.
fn setup_with(bytes: usize, extra: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    tiny_llama::write(&base, &[]);
    let corpus_file = dir.path().join("corpus.txt");
    std::fs::write(&corpus_file, corpus(bytes)).unwrap();
    let o = init(
        &base,
        &corpus_file,
        &dir.path().join("vectorland.gguf"),
        extra,
    );
    assert!(
        o.status.success(),
        "init: {}\n{}",
        text(&o.stderr),
        text(&o.stdout)
    );
    (dir, base, corpus_file, text(&o.stdout))
}

fn run_args(generations: u32) -> Vec<String> {
    [
        "--workers",
        "1",
        "--generations",
        &generations.to_string(),
        "--population",
        "8",
        "--seed",
        "3",
        "--log-format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What the Python `SCRIPT` prints (trimmed) with `r`, gguf-py's
/// `GGUFReader` of `path`, in scope; it must succeed.
fn gguf_py(script: &str, path: &Path) -> String {
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(format!(
            "import sys, gguf\nr = gguf.GGUFReader(sys.argv[1])\n{script}"
        ))
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "gguf-py: {}", text(&o.stderr));
    text(&o.stdout).trim().to_owned()
}

/// `evod run ARGS` on `dir` to its own end, which must be a success.
fn run_to_end(dir: tempfile::TempDir, args: &[String]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::spawn(dir, &args, DEADLINE);
    let status = d.wait_exit();
    assert!(status.success(), "evod run: {status}\n{}", d.log());
    d
}

fn u64_key(f: &GgufFile, key: &str) -> u64 {
    f.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{key}"))
}

fn str_key(f: &GgufFile, key: &str) -> String {
    f.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{key}"))
        .to_owned()
}

/// The control vector's values (direction.1 … in order).
fn vector(f: &GgufFile) -> Vec<f32> {
    let n = u64_key(f, "controlvector.layer_count");
    (1..=n)
        .flat_map(|k| {
            let t = f.tensor(&format!("direction.{k}")).unwrap();
            f.tensor_f32(t).unwrap().into_owned()
        })
        .collect()
}

/// The base model as the worker loads it.
fn load_base(path: &Path) -> evod_llama::BaseModel {
    evod_llama::BaseModel::load(
        path,
        &evod_llama::LlamaOptions {
            threads: 1,
            n_ctx: WINDOW,
            n_batch: WINDOW,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The full windows of `s`'s tokens, end to end.
fn windows(base: &evod_llama::BaseModel, s: &str) -> Vec<i32> {
    let t = base.tokenize(s).unwrap();
    let n = t.len() / WINDOW as usize * WINDOW as usize;
    t[..n].to_vec()
}

fn perplexity(base: &mut evod_llama::BaseModel, cvec: &[f32], tokens: &[i32]) -> f64 {
    base.set_control_vector(Some(cvec)).unwrap();
    base.nll(tokens, WINDOW as usize, &mut || {})
        .unwrap()
        .perplexity()
}

#[test]
fn a_bounded_run_lowers_training_perplexity_and_publishes_a_vector_llama_cpp_loads() {
    let (dir, base_path, corpus_file) = setup(3000);
    let d = run_to_end(dir, &run_args(12));
    let model = d.dir().join("vectorland.gguf");
    let f = GgufFile::open(&model).unwrap();
    let generation = u64_key(&f, "evod.generation");
    assert!(generation >= 1, "nothing published\n{}", d.log());
    assert_eq!(str_key(&f, "general.architecture"), "controlvector");
    assert_eq!(str_key(&f, "controlvector.model_hint"), "llama");
    assert_eq!(str_key(&f, "evod.task"), "perplexity");
    // The split and the files are carried over from `init`.
    assert_eq!(
        PathBuf::from(str_key(&f, "evod.perplexity.corpus")),
        corpus_file.canonicalize().unwrap()
    );
    // Only direction tensors, all F32, as llama.cpp's loader requires.
    assert!(f.tensors().iter().all(|t| t.name.starts_with("direction.")
        && t.ttype == evod_gguf::TensorType::F32
        && t.dims == [32]));
    assert_eq!(f.tensors().len(), 2);
    let published = vector(&f);
    assert!(published.iter().any(|&v| v != 0.0));
    let fitness = f.get("evod.fitness").and_then(Value::as_f64).unwrap();

    // gguf-py reads it.
    let said = gguf_py(
        "a = bytes(r.fields['general.architecture'].parts[-1]).decode()\n\
         print(a, ' '.join(f'{t.name}:{t.tensor_type.name}:{t.n_elements}' for t in r.tensors))",
        &model,
    );
    assert_eq!(said, "controlvector direction.1:F32:32 direction.2:F32:32");

    // llama.cpp with the vector set: lower training perplexity than the
    // base alone, and the held-out perplexity the gate published.
    let corpus_text = std::fs::read_to_string(&corpus_file).unwrap();
    let cut = u64_key(&f, "evod.perplexity.heldout_start_byte") as usize;
    let mut base = load_base(&base_path);
    let train = windows(&base, &corpus_text[..cut]);
    // The gate scores the full held-out windows; this corpus ends in a
    // partial one of at least 2 tokens (1 scored), so the equality below
    // tells that gate from one scoring every token.
    let all = base.tokenize(&corpus_text[cut..]).unwrap().len();
    assert!(
        all % WINDOW as usize >= 2,
        "{all} held-out tokens: no partial window"
    );
    let heldout = windows(&base, &corpus_text[cut..]);
    let zero = vec![0f32; published.len()];
    let train_base = perplexity(&mut base, &zero, &train);
    let train_after = perplexity(&mut base, &published, &train);
    let heldout_base = perplexity(&mut base, &zero, &heldout);
    let heldout_after = perplexity(&mut base, &published, &heldout);
    assert!(
        train_after < train_base,
        "training perplexity {train_base} -> {train_after}\n{}",
        d.log()
    );
    assert!(
        heldout_after < heldout_base,
        "held-out perplexity {heldout_base} -> {heldout_after}"
    );
    assert_eq!(
        -heldout_after, fitness,
        "the published fitness is the held-out perplexity llama.cpp gives the file's vector"
    );
    // `evod inspect` shows it.
    let o = evod().arg("inspect").arg(&model).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("controlvector.layer_count"));
}

/// `evod init --directions tied`: the file records the tie, every
/// candidate and so the published vector have equal directions (one
/// steering direction at every layer), it lowers the training perplexity,
/// and llama.cpp and gguf-py load it as the ordinary control vector it is.
#[test]
fn a_tied_vector_evolves_one_direction_for_every_layer() {
    let (dir, base_path, corpus_file, said) = setup_with(3000, &["--directions", "tied"]);
    assert!(said.contains("2 directions of 32, tied"), "{said}");
    let d = run_to_end(dir, &run_args(12));
    let model = d.dir().join("vectorland.gguf");
    let f = GgufFile::open(&model).unwrap();
    assert!(
        u64_key(&f, "evod.generation") >= 1,
        "nothing published\n{}",
        d.log()
    );
    assert_eq!(f.get("evod.controlvector.tied"), Some(&Value::Bool(true)));
    let published = vector(&f);
    let (d1, d2) = published.split_at(32);
    assert!(d1.iter().any(|&v| v != 0.0), "{published:?}");
    assert_eq!(
        d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "the directions differ"
    );
    let fitness = f.get("evod.fitness").and_then(Value::as_f64).unwrap();

    let said = gguf_py(
        "t = bool(r.fields['evod.controlvector.tied'].parts[-1][0])\n\
         print(t, ' '.join(f'{t.name}:{t.n_elements}' for t in r.tensors))",
        &model,
    );
    assert_eq!(said, "True direction.1:32 direction.2:32");

    let corpus_text = std::fs::read_to_string(&corpus_file).unwrap();
    let cut = u64_key(&f, "evod.perplexity.heldout_start_byte") as usize;
    let mut base = load_base(&base_path);
    let train = windows(&base, &corpus_text[..cut]);
    let heldout = windows(&base, &corpus_text[cut..]);
    let zero = vec![0f32; published.len()];
    let train_base = perplexity(&mut base, &zero, &train);
    let train_after = perplexity(&mut base, &published, &train);
    assert!(
        train_after < train_base,
        "training perplexity {train_base} -> {train_after}\n{}",
        d.log()
    );
    assert_eq!(-perplexity(&mut base, &published, &heldout), fitness);

    // --directions is the perplexity task's.
    let o = evod()
        .args(["init", "--task", "xor", "--directions", "tied", "-o"])
        .arg(d.dir().join("xor.gguf"))
        .output()
        .unwrap();
    refused(&o, 2, &["--directions only applies to --task perplexity"]);
}

/// The warm start docs/llm.md recommends: a tied vector evolved for a few
/// generations, then `evod run --directions per-layer`, which rewrites the
/// file untied (the same vector and fitness, the next generation, kept in
/// the history) before the workers start; the evolver starts afresh from
/// it and numbers on, so none of its publishes is taken for a replay.
#[test]
fn run_directions_per_layer_unties_a_tied_vector_and_the_run_goes_on_from_it() {
    let (dir, _, _, _) = setup_with(3000, &["--directions", "tied"]);
    let mut d = run_to_end(dir, &run_args(4));
    let tied = GgufFile::open(&d.dir().join("vectorland.gguf")).unwrap();
    assert_eq!(
        tied.get("evod.controlvector.tied"),
        Some(&Value::Bool(true))
    );
    let n = u64_key(&tied, "evod.generation");
    assert!(n >= 1, "the tied run published nothing\n{}", d.log());
    let tied_vector = vector(&tied);
    let tied_fitness = tied.get("evod.fitness").and_then(Value::as_f64).unwrap();
    drop(tied);

    let mut args = run_args(n as u32 + 16);
    args.extend(["--directions".to_owned(), "per-layer".to_owned()]);
    let d = run_to_end(d.take_dir(), &args);
    let log = d.log();
    // The untied file, as generation n + 1, in the history.
    let untied = GgufFile::open(
        &d.dir()
            .join(format!("history/{}", evod_store::history_name(n + 1))),
    )
    .unwrap_or_else(|e| panic!("history of generation {}: {e}\n{log}", n + 1));
    assert_eq!(untied.get("evod.controlvector.tied"), None);
    assert_eq!(str_key(&untied, "evod.strategy"), "untie");
    assert_eq!(vector(&untied), tied_vector);
    assert_eq!(
        untied.get("evod.fitness").and_then(Value::as_f64),
        Some(tied_fitness)
    );
    // The live file: per-layer, its directions free to differ, and every
    // publish of the second run numbered after the untie.
    let live = GgufFile::open(&d.dir().join("vectorland.gguf")).unwrap();
    assert_eq!(live.get("evod.controlvector.tied"), None);
    assert!(
        !log.contains("already published"),
        "a publish was taken for a replay\n{log}"
    );
    let published: Vec<u64> = log_events(&d, "candidate passed the gate")
        .iter()
        .map(|e| e["fields"]["generation"].as_u64().unwrap())
        .collect();
    assert!(published.iter().all(|&g| g > n), "{published:?} after {n}");
    let g = u64_key(&live, "evod.generation");
    if g > n + 1 {
        let v = vector(&live);
        assert_ne!(
            v[..32],
            v[32..],
            "a per-layer publish kept the directions tied"
        );
        assert!(live.get("evod.fitness").and_then(Value::as_f64).unwrap() >= tied_fitness);
    }
    // --directions is for a control vector.
    let xor = d.dir().join("xor");
    std::fs::create_dir_all(&xor).unwrap();
    let o = evod()
        .args(["init", "--task", "xor", "-o"])
        .arg(xor.join("vectorland.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = evod()
        .args(["run", "--directions", "tied", "--generations", "1", "--dir"])
        .arg(&xor)
        .output()
        .unwrap();
    refused(
        &o,
        2,
        &["--directions applies to a perplexity model's control vector"],
    );
}

/// The exit code and stderr of a refused command, checked.
fn refused(o: &Output, code: i32, needles: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stderr: {err}\nstdout: {}",
        text(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

#[test]
fn init_refuses_a_base_llama_cpp_cannot_load_and_a_bad_corpus_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("base.gguf");
    tiny_llama::write(&good, &[]);
    let text_file = dir.path().join("corpus.txt");
    std::fs::write(&text_file, corpus(2000)).unwrap();
    let out = dir.path().join("v.gguf");

    // A valid GGUF whose model llama.cpp refuses (it says 4 blocks, holds
    // the tensors of 3): the reason is llama.cpp's, routed from its log.
    let broken = dir.path().join("broken.gguf");
    let f = GgufFile::open(&good).unwrap();
    evod_gguf::rewrite(
        &f,
        &broken,
        |m| {
            for (k, v) in m.iter_mut() {
                if k == "llama.block_count" {
                    *v = Value::U32(4);
                }
            }
        },
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let o = init(&broken, &text_file, &out, &[]);
    refused(&o, 3, &["broken.gguf", "llama.cpp could not load"]);
    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model at all, just bytes").unwrap();
    refused(&init(&junk, &text_file, &out, &[]), 3, &["junk.gguf"]);

    let bad_text = |name: &str, bytes: &[u8], needle: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        refused(&init(&good, &p, &out, &[]), 3, &[name, needle]);
    };
    bad_text("empty.txt", b"", "empty");
    bad_text(
        "latin1.txt",
        b"caf\xe9 au lait and more text here",
        "not UTF-8",
    );
    bad_text(
        "short.txt",
        b"the cat sat on the mat.\nthe dog ran.\n",
        "too short",
    );
    assert!(!out.exists(), "a refused init wrote {}", out.display());

    let o = evod()
        .args(["init", "--task", "perplexity", "--text"])
        .arg(&text_file)
        .output()
        .unwrap();
    refused(&o, 2, &["--base-model"]);
    init_ok(&good, &text_file, &out);
}

#[test]
fn run_refuses_a_vector_that_does_not_fit_the_base_and_a_corpus_changed_since_init() {
    // A vector made for a 16-wide base, pointed at a 32-wide one.
    let (dir, base32, corpus_file) = setup(2000);
    let base16 = dir.path().join("base16.gguf");
    tiny_llama::write(&base16, &["--n-embd", "16"]);
    let narrow = dir.path().join("narrow.gguf");
    init_ok(&base16, &corpus_file, &narrow);
    let model = dir.path().join("vectorland.gguf");
    let wide = GgufFile::open(&model).unwrap();
    let base32_key = str_key(&wide, "evod.perplexity.base_model");
    let base32_sum = u64_key(&wide, "evod.perplexity.base_checksum");
    drop(wide);
    let narrow_file = GgufFile::open(&narrow).unwrap();
    evod_gguf::rewrite(
        &narrow_file,
        &model,
        |m| {
            for (k, v) in m.iter_mut() {
                match k.as_str() {
                    "evod.perplexity.base_model" => *v = Value::String(base32_key.clone()),
                    "evod.perplexity.base_checksum" => *v = Value::U64(base32_sum),
                    _ => {}
                }
            }
        },
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let o = evod()
        .args(["run", "--dir"])
        .arg(dir.path())
        .args(["--generations", "1"])
        .output()
        .unwrap();
    refused(
        &o,
        3,
        &[
            "vectorland.gguf",
            "does not fit the base model",
            "base.gguf",
        ],
    );
    let _ = base32;

    // A corpus edited after init.
    let (dir, _, corpus_file) = setup(2000);
    std::fs::write(&corpus_file, corpus(2001)).unwrap();
    let o = evod()
        .args(["run", "--dir"])
        .arg(dir.path())
        .args(["--generations", "1"])
        .output()
        .unwrap();
    refused(&o, 3, &["corpus.txt", "changed since evod init"]);
}

/// The supervisor's and workers' JSON log lines whose message is
/// `message`.
fn log_events(d: &Daemon, message: &str) -> Vec<serde_json::Value> {
    d.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// `--gate-candidate mean` reaches the evolver through the supervisor:
/// every publish is a generation's mean, gated beside that generation's
/// own training batch, so its training fitness is that generation's mean
/// training fitness in `state/progress.csv` (with the default, `best`, it
/// is the previous generation's best).
#[test]
fn gate_candidate_mean_publishes_the_mean_its_generation_was_drawn_around() {
    let (dir, _, _) = setup(3000);
    let mut args = run_args(8);
    args.extend(["--gate-candidate".to_owned(), "mean".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::spawn(dir, &args, DEADLINE);
    let status = d.wait_exit();
    assert!(status.success(), "evod run: {status}\n{}", d.log());
    let progress = std::fs::read_to_string(d.dir().join("state/progress.csv")).unwrap();
    // generation -> (best, mean) training fitness.
    let rows: std::collections::HashMap<u64, (f64, f64)> = progress
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].parse().unwrap(),
                (c[1].parse().unwrap(), c[2].parse().unwrap()),
            )
        })
        .collect();
    let passed = log_events(&d, "candidate passed the gate");
    assert!(!passed.is_empty(), "nothing published\n{}", d.log());
    for e in &passed {
        let g = e["fields"]["generation"].as_u64().unwrap();
        let fitness = e["fields"]["fitness"].as_f64().unwrap();
        assert!(g >= 1, "the start vector is the published one: {e}");
        // serde_json parses floats to within an ULP or so (no
        // `float_roundtrip`), hence a relative 1e-13.
        let same = |a: f64, b: f64| (a - b).abs() <= 1e-13 * b.abs();
        assert!(
            same(fitness, rows[&g].1),
            "generation {g}'s mean fitness: {e}\n{progress}"
        );
        assert!(
            !same(fitness, rows[&(g - 1)].0),
            "not the previous best: {e}"
        );
    }
    let f = GgufFile::open(&d.dir().join("vectorland.gguf")).unwrap();
    let last = passed.last().unwrap();
    let live = f.get("evod.fitness").and_then(Value::as_f64).unwrap();
    let gate = last["fields"]["gate"].as_f64().unwrap();
    assert!(
        (live - gate).abs() <= 1e-13 * gate.abs(),
        "the live file is the last gated mean: {live} against {gate}"
    );
}

#[test]
fn a_worker_killed_by_sigsegv_while_it_decodes_is_replaced_by_its_preloaded_standby() {
    // A long corpus: each EVAL_RECIPES keeps the worker in llama_decode for
    // a while.
    let (dir, _, _) = setup(40_000);
    let args = run_args(3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::spawn(dir, &args, DEADLINE);
    // The warm standby says ready once it has loaded the base model, its
    // context and the corpus.
    let standby = d.wait_for("worker 0's standby ready", |d| {
        let w = d.worker()?;
        (w["standby_ready"] == true)
            .then(|| w["standby_pid"].as_u64())
            .flatten()
    });
    let pid = d.wait_for("a worker evaluating", |d| {
        let w = d.worker()?;
        let busy = w["stats"]["in_service"] == "EVAL_RECIPES";
        busy.then(|| w["pid"].as_u64()).flatten()
    });
    assert!(children_with_role(d.pid(), "worker").contains(&(pid as u32)));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSEGV,
    )
    .unwrap();
    let promoted = d.wait_for("the worker respawned after its SIGSEGV", |d| {
        let w = d.worker()?;
        let segv = w["last_exit"].as_str()?.contains("SIGSEGV");
        let new = w["pid"].as_u64()?;
        (segv && w["restarts"].as_u64()? >= 1 && new != pid).then_some(new)
    });
    assert_eq!(promoted, standby, "the standby was promoted\n{}", d.log());
    let status = d.wait_exit();
    assert!(status.success(), "evod run: {status}\n{}", d.log());
    let f = GgufFile::open(&d.dir().join("vectorland.gguf")).unwrap();
    assert_eq!(str_key(&f, "general.architecture"), "controlvector");
    // Every worker process loaded the base model once: the first worker
    // cold, the promoted one while it stood by (and never again, though it
    // served the rest of the run and every published generation's LOAD).
    let ready = log_events(&d, "perplexity worker ready");
    let of = |p: u64| -> Vec<&serde_json::Value> {
        ready.iter().filter(|e| e["fields"]["pid"] == p).collect()
    };
    let first = of(pid);
    assert_eq!(first.len(), 1, "{ready:#?}");
    assert_eq!(first[0]["fields"]["standby"], false, "{ready:#?}");
    let second = of(promoted);
    assert_eq!(second.len(), 1, "{ready:#?}");
    assert_eq!(second[0]["fields"]["standby"], true, "{ready:#?}");
    assert!(
        !log_events(&d, "evod supervisor starting").is_empty()
            && !d.log().contains("cannot preload"),
        "{}",
        d.log()
    );
}

#[test]
fn a_candidate_whose_perplexity_is_nan_scores_minus_infinity_and_the_batch_goes_on() {
    use evod_ring::{Channel, LayoutConfig, Segment};
    let (dir, _, _) = setup(2000);
    let model = dir.path().join("vectorland.gguf");
    let n = vector(&GgufFile::open(&model).unwrap()).len();
    // A perplexity worker on the real ring, as the supervisor spawns it.
    let seg = Segment::create(&LayoutConfig::default()).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_evod"));
    let fd = seg.pass_to(&mut cmd);
    let mut child = cmd
        .args(["worker", "--ring-fd", &fd.to_string(), "--model"])
        .arg(&model)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut client = seg.client(Channel::Eval).unwrap();
    // The zero vector (the base model), one so large the logits overflow
    // (a NaN perplexity: llama.cpp decodes it, the scoring finds the
    // logits not finite), the zero vector again, one holding a NaN (refused
    // before llama.cpp sees it), and a small one.
    let zero = vec![0f32; n];
    let huge = vec![3.0e38f32; n];
    let mut nan = vec![0.01f32; n];
    nan[5] = f32::NAN;
    let small: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
    let candidates: [&[f32]; 5] = [&zero, &huge, &zero, &nan, &small];
    let mut body = vec![0u8; 32 + 4 * n * candidates.len()];
    body[0..4].copy_from_slice(&(candidates.len() as u32).to_le_bytes());
    body[4..8].copy_from_slice(&(n as u32).to_le_bytes());
    body[8..16].copy_from_slice(&7u64.to_le_bytes());
    for (k, v) in candidates.iter().flat_map(|c| c.iter()).enumerate() {
        body[32 + 4 * k..36 + 4 * k].copy_from_slice(&v.to_le_bytes());
    }
    let reply = client
        .call(
            evod_wire::op::EVAL,
            0,
            body.len(),
            |out| out.copy_from_slice(&body),
            std::time::Instant::now() + DEADLINE,
        )
        .unwrap();
    let payload = String::from_utf8_lossy(reply.payload).into_owned();
    assert_eq!(reply.status(), evod_wire::status::OK, "{payload}");
    let fitness: Vec<f64> = reply
        .payload
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    drop(reply);
    assert_eq!(fitness.len(), 5, "{fitness:?}");
    // NaN ranks last: the worker sends it as −∞, below every perplexity
    // (the evolver then quarantines it: evod-evolve's `evaluate`, and its
    // GA ranks it after every scored candidate).
    assert_eq!(fitness[1], f64::NEG_INFINITY, "{fitness:?}");
    assert_eq!(fitness[3], f64::NEG_INFINITY, "{fitness:?}");
    for i in [0, 2, 4] {
        assert!(fitness[i].is_finite() && fitness[i] < -1.0, "{fitness:?}");
    }
    // The bad candidates left nothing behind: the base model scores the
    // same, bit for bit, after one of them.
    assert_eq!(fitness[0].to_bits(), fitness[2].to_bits(), "{fitness:?}");
    assert_ne!(fitness[4], fitness[0], "{fitness:?}");
    let bye = client
        .call(
            evod_wire::op::SHUTDOWN,
            0,
            0,
            |_| {},
            std::time::Instant::now() + DEADLINE,
        )
        .unwrap();
    assert_eq!(bye.status(), evod_wire::status::OK);
    drop(bye);
    let status = common::wait_exit(&mut child, DEADLINE).expect("the worker exits after SHUTDOWN");
    assert!(status.success(), "{status}");
}

/// Tensor checksum, `evod.generation` and `evod.fitness` (bits) of a
/// published vector.
fn identity(path: &Path) -> (u64, u64, u64) {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fitness = f.get("evod.fitness").and_then(Value::as_f64).unwrap();
    (
        f.checksum(),
        u64_key(&f, "evod.generation"),
        fitness.to_bits(),
    )
}

/// The broker options of the distributed tests' coordinator (besides
/// `--broker`).
const COORDINATE: &[&str] = &[
    "--run-id",
    "ppl",
    "--host-id",
    "coord",
    "--task-lease",
    "5s",
    "--lease-ttl",
    "2s",
    "--candidates-per-task",
    "4",
    "--remote-only",
    "--min-hosts",
    "1",
];

/// `evod run --broker URL` on `dir` with `evolve`; stdout and stderr in
/// `dir/out.log` and `dir/run.log`.
fn spawn_coordinator(dir: &Path, url: &str, evolve: &[String]) -> std::process::Child {
    let out = std::fs::File::create(dir.join("out.log")).unwrap();
    let err = std::fs::File::create(dir.join("run.log")).unwrap();
    evod()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(evolve)
        .args(COORDINATE)
        .args(["--broker", url])
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawning evod run --broker")
}

/// `evod join URL` on `dir` as `host` with `extra` arguments; its stderr
/// in `dir/join.log`.
fn spawn_host(
    dir: &Path,
    url: &str,
    host: &str,
    extra: &[&std::ffi::OsStr],
) -> std::process::Child {
    let err = std::fs::File::create(dir.join("join.log")).unwrap();
    evod()
        .args(["join", url, "--dir"])
        .arg(dir)
        .args(["--run-id", "ppl", "--host-id", host, "--task-lease", "5s"])
        .args(["--workers", "1", "--no-standby", "--log-format", "json"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawning evod join")
}

/// A child SIGTERMed (SIGKILLed if it lingers) and reaped on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if common::wait_exit(&mut self.0, Duration::from_secs(20)).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[test]
fn a_distributed_run_publishes_the_vector_and_gate_fitness_of_the_single_host_run() {
    let (dir, base_path, corpus_file) = setup(3000);
    let generations = 4;
    // The coordinator's state folder starts from the same vector; the
    // host has its own copies of the base and corpus, elsewhere.
    let coord = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("vectorland.gguf"),
        coord.path().join("vectorland.gguf"),
    )
    .unwrap();
    let host = tempfile::tempdir().unwrap();
    let host_base = host.path().join("my-base.gguf");
    let host_text = host.path().join("my-corpus.txt");
    std::fs::copy(&base_path, &host_base).unwrap();
    std::fs::copy(&corpus_file, &host_text).unwrap();

    // The single-host run with this seed: the reference.
    let args = run_args(generations);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::spawn(dir, &argv, DEADLINE);
    let status = d.wait_exit();
    assert!(status.success(), "evod run: {status}\n{}", d.log());
    let want = identity(&d.dir().join("vectorland.gguf"));
    assert!(
        want.1 >= 1,
        "the reference run published nothing\n{}",
        d.log()
    );

    let (_r, server) = redis_server::start();
    let url = server.url();
    let mut child = spawn_coordinator(coord.path(), &url, &args);
    let h = Reaped(spawn_host(
        host.path(),
        &url,
        "host-a",
        &[
            "--base-model".as_ref(),
            host_base.as_os_str(),
            "--text".as_ref(),
            host_text.as_os_str(),
        ],
    ));
    let status = common::wait_exit(&mut child, DEADLINE);
    let logs = || {
        format!(
            "coordinator:\n{}\nhost:\n{}",
            read(coord.path(), "run.log"),
            read(host.path(), "join.log")
        )
    };
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the coordinator did not finish\n{}", logs());
    };
    assert!(status.success(), "coordinator: {status}\n{}", logs());
    assert_eq!(
        identity(&coord.path().join("vectorland.gguf")),
        want,
        "the distributed run published another vector or gate fitness\n{}",
        logs()
    );
    // Every evaluation ran on the host (the coordinator is --remote-only),
    // on this host's files, and its workers scored gate tasks.
    let host_log = read(host.path(), "join.log");
    assert!(
        host_log.contains("this host's base model and corpus are run ppl's"),
        "{host_log}"
    );
    assert!(host_log.contains("my-base.gguf"), "{host_log}");
    let out = read(coord.path(), "out.log");
    assert!(out.contains("0 results by its own workers"), "{out}");
    assert!(out.contains("host-a ("), "{out}");
    drop(h);
}

#[test]
fn a_host_whose_base_model_or_corpus_is_not_the_runs_is_refused_by_name() {
    let (dir, base_path, corpus_file) = setup(2000);
    let f = GgufFile::open(&dir.path().join("vectorland.gguf")).unwrap();
    let base_sum = format!("{:016x}", u64_key(&f, "evod.perplexity.base_checksum"));
    let corpus_sum = format!("{:016x}", u64_key(&f, "evod.perplexity.corpus_checksum"));
    drop(f);
    let (_r, server) = redis_server::start();
    let url = server.url();
    // A coordinator publishes the run's model, then waits for a host.
    let coord = Reaped(spawn_coordinator(dir.path(), &url, &run_args(50)));
    let _ = &coord;

    let host = tempfile::tempdir().unwrap();
    let join = |extra: &[&std::ffi::OsStr]| -> Output {
        let mut c = spawn_host(host.path(), &url, "host-bad", extra);
        let status = common::wait_exit(&mut c, DEADLINE).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("evod join did not stop\n{}", read(host.path(), "join.log"))
        });
        let log = read(host.path(), "join.log");
        // Refused before its supervisor started (the line it logs first),
        // so no worker or feeder ever ran and no task was taken.
        assert!(!log.contains("joining run"), "{log}");
        Output {
            status,
            stdout: Vec::new(),
            stderr: log.into_bytes(),
        }
    };
    // Another base model (a narrower tiny llama).
    let other = host.path().join("other-base.gguf");
    tiny_llama::write(&other, &["--n-embd", "16"]);
    let other_sum = format!(
        "{:016x}",
        evod_runtime::perplexity::file_checksum(&other).unwrap()
    );
    let o = join(&["--base-model".as_ref(), other.as_os_str()]);
    refused(
        &o,
        3,
        &[
            "other-base.gguf",
            &other_sum,
            &base_sum,
            "--base-model",
            "before taking any task",
        ],
    );
    // A base model that is not on this host.
    let missing = host.path().join("nowhere.gguf");
    let o = join(&["--base-model".as_ref(), missing.as_os_str()]);
    refused(&o, 3, &["nowhere.gguf", "cannot read", &base_sum]);
    // The right base, another corpus.
    let edited = host.path().join("edited.txt");
    std::fs::write(&edited, corpus(2001)).unwrap();
    let edited_sum = format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(&std::fs::read(&edited).unwrap())
    );
    let o = join(&[
        "--base-model".as_ref(),
        base_path.as_os_str(),
        "--text".as_ref(),
        edited.as_os_str(),
    ]);
    refused(&o, 3, &["edited.txt", &edited_sum, &corpus_sum, "--text"]);
    // The same through the environment and the config file.
    let toml = host.path().join("host.toml");
    std::fs::write(&toml, format!("text = {:?}\n", edited.to_str().unwrap())).unwrap();
    let o = join(&["--config".as_ref(), toml.as_os_str()]);
    refused(&o, 3, &["edited.txt", &corpus_sum]);
    // `evod run` refuses the host-only keys in its config file.
    let o = evod()
        .args(["run", "--generations", "1", "--dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&toml)
        .output()
        .unwrap();
    refused(&o, 2, &["host.toml", "evod join"]);
    let _ = corpus_file;
}
