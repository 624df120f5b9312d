//! Noise and recipe throughput on one core: `evod_evolve::noise::fill`,
//! `Recipe::apply` (what a worker does to regenerate an ES candidate) and
//! the ES gradient's `noise::accumulate`, on a 10⁷-value vector (a 1-3161-3161-1 MLP), next to
//! rand_chacha's `ChaCha8Rng` + `rand_distr::StandardNormal` (what the GA
//! drew per value before). Each figure is the median of several repeats.
//!
//! Usage: `cargo run --release -p evod-evolve --example bench_noise [OUT.json]`.

use std::time::Instant;

use evod_evolve::{Base, ParamLayout, Recipe, Sign, TensorScale, noise};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Parameters of a 1-3161-3161-1 MLP: about 10⁷.
const H: u64 = 3161;
const N: usize = (H * H + 4 * H + 1) as usize;
const REPEATS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median nanoseconds per value of `f` over `REPEATS` runs.
fn ns_per_value(mut f: impl FnMut(u64)) -> f64 {
    f(0);
    median(
        (1..=REPEATS as u64)
            .map(|r| {
                let start = Instant::now();
                f(r);
                start.elapsed().as_secs_f64() * 1e9 / N as f64
            })
            .collect(),
    )
}

fn main() {
    let out = std::env::args().nth(1);
    let mut buf = vec![0.0f32; N];
    let fill = ns_per_value(|seed| {
        noise::fill(seed, 0, &mut buf);
        std::hint::black_box(&buf);
    });

    let layout = ParamLayout::new(vec![
        ("blk.0.weight".into(), vec![1, H]),
        ("blk.0.bias".into(), vec![H]),
        ("blk.1.weight".into(), vec![H, H]),
        ("blk.1.bias".into(), vec![H]),
        ("blk.2.weight".into(), vec![H, 1]),
        ("blk.2.bias".into(), vec![1]),
    ])
    .expect("layout");
    assert_eq!(layout.n_params(), N);
    let params = vec![0.01f32; N];
    let base = Base::new(&params, &layout).expect("base");
    let start = Instant::now();
    let sum = evod_evolve::checksum(&params);
    let checksum_ms = start.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(sum);
    let apply = ns_per_value(|seed| {
        Recipe::new(base.checksum(), seed, 0.6, Sign::Minus, TensorScale::Glorot)
            .apply_to(&base, &mut buf)
            .expect("apply");
        std::hint::black_box(&buf);
    });
    let mut acc = vec![0.0f64; N];
    let accumulate = ns_per_value(|seed| {
        noise::accumulate(seed, 0, 0.25, &mut acc);
        std::hint::black_box(&acc);
    });
    let chacha = ns_per_value(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for x in buf.iter_mut() {
            *x = rng.sample(StandardNormal);
        }
        std::hint::black_box(&buf);
    });
    eprintln!(
        "noise::fill:          {fill:.2} ns/value ({:.1} ms per 10^7)",
        fill * N as f64 / 1e6
    );
    eprintln!(
        "Recipe::apply_to:     {apply:.2} ns/value ({:.1} ms per 10^7)",
        apply * N as f64 / 1e6
    );
    eprintln!("noise::accumulate:    {accumulate:.2} ns/value");
    eprintln!("checksum (xxh3):      {checksum_ms:.1} ms per 10^7 values");
    eprintln!("ChaCha8+StandardNormal: {chacha:.2} ns/value");
    if let Some(path) = out {
        let json = format!(
            "{{\n  \"noise_fill_ns_per_value\": {fill:.3},\n  \"recipe_apply_ns_per_value\": {apply:.3},\n  \"noise_accumulate_ns_per_value\": {accumulate:.3},\n  \"checksum_ms_per_1e7\": {checksum_ms:.2},\n  \"chacha8_normal_ns_per_value\": {chacha:.3}\n}}\n"
        );
        std::fs::write(&path, json).expect("write the report");
    }
}
