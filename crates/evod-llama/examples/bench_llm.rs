//! Bare llama.cpp throughput of the evod-llama runtime: tokens per second
//! decoding (and scoring) `--windows` windows of `--window` tokens of a
//! text, for each `--threads` value, alone and with `--competitors` busy
//! processes sharing the cores (what another worker does to this one).
//! Prints one JSON line per configuration (the median of `--repeats` runs
//! and each run) and writes OUT.json: `tokens_per_s_bare` (the default
//! options: 1 thread, no neighbour), `tokens_per_s_t{T}_c{C}` for each
//! configuration, `wait` (`ggml-threadpool` or `openmp`), `load_s`,
//! `ppl_bare`. With `--reload N` it also times the naive way to score a
//! candidate without evod, N times: write a full copy of the GGUF whose
//! one F32 tensor (`blk.1.attn_norm.weight`) carries the candidate
//! (evod-gguf), load it with llama.cpp, score one window; the median is
//! `reload_per_candidate_s` (and `reload_write_s`, its write part).
//! With `--cvec FILE [--heldout-from BYTE]` (default: FILE's
//! `evod.perplexity.heldout_start_byte`) it only scores TEXT[BYTE..] in
//! windows, without and with the control vector FILE (an evod perplexity
//! model), and prints `heldout_ppl_base` / `heldout_ppl_after`.
//! With `--procs N[,M…] --seconds S` it measures instead bare llama.cpp
//! the way evod's workers use the cores: N processes of one thread each,
//! started together, each decoding the text's `--window`-token windows
//! round robin for S seconds; `tokens_per_s_w{W}_p{N}` is the sum of their
//! tokens/s (every token decoded counts, as evod's `evod_worker_tokens`).
//! `--swap 1` makes each of them set a new control vector before every
//! window, as a worker does per candidate (`tokens_per_s_w{W}_p{N}_swap`):
//! what llama.cpp's `llama_set_adapter_cvec` costs (it makes the next
//! decode rebuild the context's scheduler).
//! `cargo xtask bench llm` runs it on SmolLM2-135M Q4_1.
//!
//! `cargo run --release -p evod-llama --features llm --example bench_llm --
//!  OUT.json MODEL.gguf TEXT.txt [--threads 1,2] [--window 512] [--windows 2]
//!  [--repeats 3] [--competitors 0,1] [--reload 0] [--n-batch WINDOW]
//!  [--procs 1,2 --seconds 20 [--swap 1]] [--cvec FILE [--heldout-from BYTE]]`
//! (`--n-batch` sets the tokens per `llama_decode` of the throughput runs).
//! (`--features llm-openmp` for ggml's OpenMP build).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use evod_llama::{BaseModel, LlamaOptions};

fn list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| x.trim().parse().expect("a list of integers"))
        .collect()
}

fn spinner() -> Child {
    Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert!(
        args.len() >= 3,
        "usage: bench_llm OUT.json MODEL.gguf TEXT.txt [--threads 1,2] [--window 512] [--windows 2] [--repeats 3] [--competitors 0,1]"
    );
    let out = PathBuf::from(&args[0]);
    let model = PathBuf::from(&args[1]);
    let text = std::fs::read_to_string(&args[2]).expect("read the text");
    let mut threads = vec![1, 2];
    let mut window = 512;
    let mut windows = 2;
    let mut repeats = 3;
    let mut competitors = vec![0, 1];
    let mut reload = 0usize;
    let mut n_batch = None;
    let mut heldout_from = None;
    let mut cvec = None;
    let mut procs: Vec<usize> = Vec::new();
    let mut seconds = 20.0f64;
    let mut child = false;
    // `--swap 1`: the bare children set a new control vector before every
    // window, as a worker does for every candidate.
    let mut swap = false;
    let mut window_given = false;
    let mut i = 3;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--threads" => threads = list(v),
            "--window" => {
                window = v.parse().unwrap();
                window_given = true;
            }
            "--procs" => procs = list(v),
            "--seconds" => seconds = v.parse().unwrap(),
            "--child" => child = v == "1",
            "--swap" => swap = v == "1",
            "--windows" => windows = v.parse().unwrap(),
            "--repeats" => repeats = v.parse().unwrap(),
            "--competitors" => competitors = list(v),
            "--reload" => reload = v.parse().unwrap(),
            "--n-batch" => n_batch = Some(v.parse::<u32>().unwrap()),
            "--heldout-from" => heldout_from = Some(v.parse::<usize>().unwrap()),
            "--cvec" => cvec = Some(PathBuf::from(v)),
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    if child {
        bare_child(&model, &text, window, seconds, swap);
        return;
    }
    if !procs.is_empty() {
        let mut summary = Vec::new();
        for &n in &procs {
            let (total, each) = bare_procs(&args[1..3], n, window, seconds, swap);
            println!(
                "{{\"procs\":{n},\"window\":{window},\"seconds\":{seconds},\"swap\":{swap},\"tokens_per_s\":{total:.2},\"each\":{each:?}}}"
            );
            let suffix = if swap { "_swap" } else { "" };
            summary.push(format!(
                "\"tokens_per_s_w{window}_p{n}{suffix}\":{total:.2}"
            ));
        }
        let json = format!("{{{}}}", summary.join(","));
        println!("{json}");
        std::fs::write(&out, json + "\n").expect("write OUT.json");
        return;
    }
    if let Some(cvec) = cvec {
        // The held-out start and the window: given, or the model's own keys.
        let f = evod_gguf::GgufFile::open(&cvec).expect("open the control vector");
        let key = |k: &str| f.get(k).and_then(|v| v.as_u64());
        let from = heldout_from.unwrap_or_else(|| {
            key("evod.perplexity.heldout_start_byte")
                .expect("the model has no evod.perplexity.heldout_start_byte: pass --heldout-from")
                as usize
        });
        if !window_given && let Some(w) = key("evod.perplexity.window") {
            window = w as usize;
        }
        let opts = LlamaOptions {
            threads: threads[0],
            n_ctx: window as u32,
            n_batch: window as u32,
            ..LlamaOptions::default()
        };
        let mut m = BaseModel::load(&model, &opts).expect("load");
        let tokens = m
            .tokenize(text.get(from..).expect("--heldout-from is inside TEXT"))
            .expect("tokenize");
        let v = evod_llama::read_control_vector(&cvec).expect("read the control vector");
        let mut directions = v.directions;
        directions.resize(m.cvec_len(), 0.0);
        let start = Instant::now();
        let base = m.nll(&tokens, window, &mut || {}).unwrap().perplexity();
        let base_s = start.elapsed().as_secs_f64();
        m.set_control_vector(Some(&directions)).unwrap();
        let start = Instant::now();
        let after = m.nll(&tokens, window, &mut || {}).unwrap().perplexity();
        let after_s = start.elapsed().as_secs_f64();
        let json = format!(
            "{{\"heldout_ppl_base\":{base},\"heldout_ppl_after\":{after},\"heldout_window\":{window},\"heldout_tokens\":{},\"heldout_s_base\":{base_s:.4},\"heldout_s_after\":{after_s:.4}}}",
            tokens.len()
        );
        println!("{json}");
        std::fs::write(&out, json + "\n").expect("write OUT.json");
        return;
    }
    let wait = if cfg!(feature = "llm-openmp") {
        "openmp"
    } else {
        "ggml-threadpool"
    };
    let mut summary = vec![format!("\"wait\":\"{wait}\"")];
    for &t in &threads {
        let opts = LlamaOptions {
            threads: t,
            n_ctx: window as u32,
            n_batch: n_batch.unwrap_or(window as u32),
            ..LlamaOptions::default()
        };
        let start = Instant::now();
        let mut m = BaseModel::load(&model, &opts).expect("load");
        let load_s = start.elapsed().as_secs_f64();
        let tokens = m.tokenize(&text).expect("tokenize");
        let n = (window * windows).min(tokens.len());
        let tokens = &tokens[..n];
        // Warm-up (page in the mapped weights, build the graph).
        let _warm = m.nll(&tokens[..window.min(n)], window, &mut || {}).unwrap();
        if t == 1 {
            summary.push(format!("\"load_s\":{load_s:.4}"));
        }
        for &c in &competitors {
            let mut spin: Vec<Child> = (0..c).map(|_| spinner()).collect();
            let mut rates = Vec::new();
            let mut ppl = 0.0;
            for _ in 0..repeats {
                let start = Instant::now();
                let nll = m.nll(tokens, window, &mut || {}).unwrap();
                let s = start.elapsed().as_secs_f64();
                ppl = nll.perplexity();
                rates.push(n as f64 / s);
            }
            for s in &mut spin {
                let _ = s.kill();
                let _ = s.wait();
            }
            let med = median(rates.clone());
            println!(
                "{{\"wait\":\"{wait}\",\"threads\":{t},\"competitors\":{c},\"tokens\":{n},\"load_s\":{load_s:.3},\"tokens_per_s\":{med:.2},\"runs\":{rates:?},\"ppl\":{ppl}}}"
            );
            summary.push(format!("\"tokens_per_s_t{t}_c{c}\":{med:.2}"));
            if t == 1 && c == 0 {
                summary.push(format!("\"tokens_per_s_bare\":{med:.2}"));
                summary.push(format!("\"ppl_bare\":{ppl}"));
            }
        }
    }
    if reload > 0 {
        let r = reload_way(&model, &text, window, threads[0], reload);
        println!(
            "{{\"reload\":{reload},\"threads\":{},\"window\":{window},\"reload_per_candidate_s\":{:.4},\"reload_write_s\":{:.4},\"reload_load_s\":{:.4},\"reload_score_s\":{:.4}}}",
            threads[0], r.total, r.write, r.load, r.score
        );
        summary.push(format!("\"reload_per_candidate_s\":{:.4}", r.total));
        summary.push(format!("\"reload_write_s\":{:.4}", r.write));
        summary.push(format!("\"reload_load_s\":{:.4}", r.load));
        summary.push(format!("\"reload_score_s\":{:.4}", r.score));
    }
    let json = format!("{{{}}}", summary.join(","));
    println!("{json}");
    std::fs::write(&out, json + "\n").expect("write OUT.json");
}

/// The naive way, `n` candidates: per candidate a full GGUF copy of `model`
/// whose `blk.1.attn_norm.weight` is perturbed, loaded by llama.cpp, one
/// window scored. Returns the medians of each part.
fn reload_way(
    model: &std::path::Path,
    text: &str,
    window: usize,
    threads: usize,
    n: usize,
) -> Reload {
    use std::io::Write;
    const TENSOR: &str = "blk.1.attn_norm.weight";
    let base = evod_gguf::GgufFile::open(model).expect("open the base GGUF");
    let target = base
        .tensor(TENSOR)
        .unwrap_or_else(|| panic!("{} has no {TENSOR}", model.display()))
        .clone();
    assert_eq!(
        target.ttype,
        evod_gguf::TensorType::F32,
        "{TENSOR} is not F32"
    );
    let values: Vec<f32> = base
        .tensor_bytes(&target)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let specs: Vec<evod_gguf::TensorSpec> = base
        .tensors()
        .iter()
        .map(evod_gguf::TensorSpec::from)
        .collect();
    let opts = evod_gguf::PublishOptions {
        alignment: base.alignment(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("candidate.gguf");
    let llama = LlamaOptions {
        threads,
        n_ctx: window as u32,
        n_batch: window as u32,
        ..LlamaOptions::default()
    };
    let (mut totals, mut writes, mut loads, mut scores) = (vec![], vec![], vec![], vec![]);
    for c in 0..n {
        let start = Instant::now();
        // The candidate: the base tensor times (1 + small deterministic noise).
        let bytes: Vec<u8> = values
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                let wiggle = (((i * 7919 + c * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.02;
                (v * (1.0 + wiggle)).to_le_bytes()
            })
            .collect();
        evod_gguf::publish(
            &path,
            base.metadata(),
            &specs,
            |i, w: &mut dyn Write| {
                if base.tensors()[i].name == TENSOR {
                    w.write_all(&bytes)
                } else {
                    w.write_all(base.tensor_bytes(&base.tensors()[i]))
                }
            },
            &opts,
        )
        .expect("write the candidate GGUF");
        let written = start.elapsed().as_secs_f64();
        let mut m = BaseModel::load(&path, &llama).expect("load the candidate GGUF");
        let tokens = m.tokenize(text).expect("tokenize");
        let loaded = start.elapsed().as_secs_f64();
        let nll = m
            .nll(&tokens[..window.min(tokens.len())], window, &mut || {})
            .expect("score");
        assert!(nll.perplexity().is_finite());
        drop(m);
        let total = start.elapsed().as_secs_f64();
        writes.push(written);
        loads.push(loaded - written);
        scores.push(total - loaded);
        totals.push(total);
    }
    Reload {
        total: median(totals),
        write: median(writes),
        load: median(loads),
        score: median(scores),
    }
}

/// The reload way's medians, seconds per candidate: all of it, writing the
/// copy, loading it (and tokenizing the text), scoring one window.
struct Reload {
    total: f64,
    write: f64,
    load: f64,
    score: f64,
}

/// `--procs N`: N copies of this program (`--child 1`), one llama.cpp
/// thread each, loaded and warmed up, then started together (a line on
/// each one's stdin) for `seconds`. Returns the sum of their tokens/s and
/// each one's.
fn bare_procs(
    model_and_text: &[String],
    n: usize,
    window: usize,
    seconds: f64,
    swap: bool,
) -> (f64, Vec<f64>) {
    use std::io::{BufRead, BufReader, Write};
    let exe = std::env::current_exe().expect("current_exe");
    let mut children: Vec<(Child, BufReader<std::process::ChildStdout>)> = (0..n)
        .map(|_| {
            let mut c = Command::new(&exe)
                .arg("-")
                .args(model_and_text)
                .args(["--window", &window.to_string()])
                .args(["--seconds", &seconds.to_string()])
                .args(["--child", "1"])
                .args(["--swap", if swap { "1" } else { "0" }])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a bare child");
            let out = BufReader::new(c.stdout.take().expect("piped stdout"));
            (c, out)
        })
        .collect();
    let mut line = String::new();
    for (_, out) in &mut children {
        line.clear();
        out.read_line(&mut line).expect("read ready");
        assert_eq!(line.trim(), "ready", "a bare child did not get ready");
    }
    for (c, _) in &mut children {
        writeln!(c.stdin.as_mut().expect("piped stdin"), "go").expect("start a bare child");
    }
    let mut each = Vec::new();
    for (mut c, mut out) in children {
        line.clear();
        out.read_line(&mut line).expect("read the result");
        let rate: f64 = line.trim().parse().expect("a bare child's tokens/s");
        assert!(c.wait().expect("wait").success(), "a bare child failed");
        each.push(rate);
    }
    (each.iter().sum(), each)
}

/// One `--procs` child: loads the model (1 thread, a context of one
/// window), warms up on one window, says `ready`, waits for a line on
/// stdin, then decodes and scores the text's full windows round robin
/// (memory cleared per window, as a worker does) until `seconds` have
/// passed; prints its tokens/s. With `swap`, a new control vector before
/// every window (small values, different each time), as a worker sets
/// each candidate's (`llama_set_adapter_cvec`, which makes llama.cpp
/// rebuild its scheduler at the next decode).
fn bare_child(model: &std::path::Path, text: &str, window: usize, seconds: f64, swap: bool) {
    use std::io::BufRead;
    let opts = LlamaOptions {
        threads: 1,
        n_ctx: window as u32,
        n_batch: window as u32,
        ..LlamaOptions::default()
    };
    let mut m = BaseModel::load(model, &opts).expect("load");
    let tokens = m.tokenize(text).expect("tokenize");
    let windows: Vec<&[i32]> = tokens.chunks_exact(window).collect();
    assert!(
        !windows.is_empty(),
        "the text has no window of {window} tokens"
    );
    let mut vector = vec![0f32; m.cvec_len()];
    let mut set_vector = |m: &mut BaseModel, i: usize| {
        for (k, x) in vector.iter_mut().enumerate() {
            // A small value that differs per window and per entry.
            *x = 0.01 * (((k * 7919 + i * 104_729) % 201) as f32 / 100.0 - 1.0);
        }
        m.set_control_vector(Some(&vector)).expect("set the vector");
    };
    if swap {
        set_vector(&mut m, 0);
    }
    m.nll(windows[0], window, &mut || {}).expect("warm up");
    println!("ready");
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .expect("wait for go");
    let start = Instant::now();
    let mut decoded = 0usize;
    let mut i = 0;
    while start.elapsed().as_secs_f64() < seconds {
        let w = windows[i % windows.len()];
        if swap {
            set_vector(&mut m, i + 1);
        }
        let nll = m.nll(w, window, &mut || {}).expect("score");
        assert!(nll.perplexity().is_finite());
        decoded += w.len();
        i += 1;
    }
    println!("{}", decoded as f64 / start.elapsed().as_secs_f64());
}
