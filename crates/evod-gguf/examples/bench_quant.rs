//! Speed of the `quant` codecs: dequantize and quantize, per type, on 16 Mi
//! normal values (64 MiB of f32), single thread, median of 5 runs. Figures
//! are MB/s of f32 (4 bytes per value, 10^6 bytes per MB) and the seconds a
//! 100M-parameter model would take. Writes the JSON given as the only
//! argument, if any.
//!
//! `cargo run --release -p evod-gguf --example bench_quant [OUT.json]`

use std::time::{Duration, Instant};

use evod_gguf::quant::{CODEC_TYPES, dequantize, quantize};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let out = std::env::args().nth(1);
    let n = 16 << 20;
    // Deterministic normal-ish values (sum of uniforms), no dependency.
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let x: Vec<f32> = (0..n)
        .map(|_| (unit() + unit() + unit() - 1.5) * 0.05)
        .collect();
    let mb = (n * 4) as f64 / 1e6;
    let mut rows = Vec::new();
    println!(
        "{:6} {:>12} {:>12} {:>14} {:>14}",
        "type", "deq MB/s", "quant MB/s", "deq 100M (s)", "quant 100M (s)"
    );
    for &t in CODEC_TYPES {
        let runs = 5;
        let mut q = Vec::new();
        let mut tq = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            q = quantize(t, &x).unwrap();
            tq.push(start.elapsed());
        }
        let mut td = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            let y = dequantize(t, &q).unwrap();
            td.push(start.elapsed());
            std::hint::black_box(&y);
        }
        let (dq, dd) = (median(tq).as_secs_f64(), median(td).as_secs_f64());
        let (sq, sd) = (mb / dq, mb / dd);
        let per_100m = |secs: f64| secs * 1e8 / n as f64;
        println!(
            "{:6} {sd:>12.0} {sq:>12.0} {:>14.3} {:>14.3}",
            t.name(),
            per_100m(dd),
            per_100m(dq)
        );
        rows.push(format!(
            "{{\"type\": \"{}\", \"values\": {n}, \"runs\": {runs}, \"dequantize_mb_per_s\": {sd:.1}, \"quantize_mb_per_s\": {sq:.1}, \"dequantize_100m_s\": {:.4}, \"quantize_100m_s\": {:.4}}}",
            t.name(),
            per_100m(dd),
            per_100m(dq)
        ));
    }
    if let Some(out) = out {
        std::fs::write(&out, format!("[\n  {}\n]\n", rows.join(",\n  "))).unwrap();
        println!("wrote {out}");
    }
}
