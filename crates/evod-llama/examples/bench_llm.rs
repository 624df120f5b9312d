//! Bare llama.cpp throughput of the evod-llama runtime: tokens per second
//! decoding (and scoring) `--windows` windows of `--window` tokens of a
//! text, for each `--threads` value, alone and with `--competitors` busy
//! processes sharing the cores (what another worker does to this one).
//! Prints one JSON line per configuration (the median of `--repeats` runs
//! and each run) and writes OUT.json: `tokens_per_s_bare` (the default
//! options: 1 thread, no neighbour), `tokens_per_s_t{T}_c{C}` for each
//! configuration, `wait` (`ggml-threadpool` or `openmp`), `load_s`,
//! `ppl_bare`. `cargo xtask bench llm` runs it on SmolLM2-135M Q4_1.
//!
//! `cargo run --release -p evod-llama --features llm --example bench_llm --
//!  OUT.json MODEL.gguf TEXT.txt [--threads 1,2] [--window 512] [--windows 2]
//!  [--repeats 3] [--competitors 0,1]`
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
    let mut i = 3;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--threads" => threads = list(v),
            "--window" => window = v.parse().unwrap(),
            "--windows" => windows = v.parse().unwrap(),
            "--repeats" => repeats = v.parse().unwrap(),
            "--competitors" => competitors = list(v),
            other => panic!("unknown flag {other}"),
        }
        i += 2;
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
            n_batch: window as u32,
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
    let json = format!("{{{}}}", summary.join(","));
    println!("{json}");
    std::fs::write(&out, json + "\n").expect("write OUT.json");
}
