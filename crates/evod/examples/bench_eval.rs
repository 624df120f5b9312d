//! `cargo xtask bench runtime` (second part): `EVAL` throughput through the
//! shared-memory ring: real `evod worker` processes, 114-weight CartPole
//! policies (4-16-2 tanh), batches of 64, 5 episodes per candidate; next to
//! the same candidates scored in this process (the ring's overhead is the
//! difference). Adds its keys to the JSON file given as the only argument.
//!
//! Usage: `EVOD_BIN=target/release/evod bench_eval OUT.json`.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use evod_ring::{Channel, LayoutConfig, Segment};
use evod_runtime::{Architecture, ModelSpec, Task, init_params, write_model};

const BATCH: usize = 64;
const EPISODES: u32 = 5;
const ROUNDS: usize = 40;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: bench_eval OUT.json"));
    let evod =
        PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: path of a release evod"));
    let dir = tempfile::tempdir().expect("temp dir");
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let model = dir.path().join("vectorland.gguf");
    write_model(
        &model,
        &ModelSpec::new(arch.clone(), "cartpole".into(), 1),
        &init_params(&arch, 1),
        None,
    )
    .expect("writing the model");
    // Candidates: seeded initialisations (a realistic mix of short and long episodes).
    let candidates: Vec<Vec<f32>> = (0..BATCH as u64)
        .map(|s| init_params(&arch, 1000 + s))
        .collect();
    let mut body = vec![0u8; 32 + 4 * 114 * BATCH];
    body[0..4].copy_from_slice(&(BATCH as u32).to_le_bytes());
    body[4..8].copy_from_slice(&114u32.to_le_bytes());
    body[8..16].copy_from_slice(&7u64.to_le_bytes());
    body[16..20].copy_from_slice(&EPISODES.to_le_bytes());
    for (i, c) in candidates.iter().enumerate() {
        for (j, v) in c.iter().enumerate() {
            let at = 32 + 4 * (i * 114 + j);
            body[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    // In-process peer: the same candidates, same seeds, one core.
    let task = Task::CartPole { episodes: EPISODES };
    let mut inproc = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for c in &candidates {
            std::hint::black_box(task.evaluate(&arch, c, 7).unwrap());
        }
        inproc.push(BATCH as f64 / t.elapsed().as_secs_f64());
    }

    let mut results = serde_json::Map::new();
    for workers in [1usize, 2] {
        let segments: Vec<Segment> = (0..workers)
            .map(|_| Segment::create(&LayoutConfig::default()).unwrap())
            .collect();
        let mut children: Vec<Child> = segments
            .iter()
            .map(|seg| {
                let mut cmd = Command::new(&evod);
                let fd = seg.pass_to(&mut cmd);
                cmd.args(["worker", "--ring-fd", &fd.to_string(), "--model"])
                    .arg(&model);
                cmd.spawn().expect("spawning evod worker")
            })
            .collect();
        let mut clients: Vec<_> = segments
            .iter()
            .map(|s| s.client(Channel::Eval).unwrap())
            .collect();
        let mut rates = Vec::new();
        for round in 0..ROUNDS + 2 {
            let t = Instant::now();
            for c in clients.iter_mut() {
                c.send(5, 0, body.len(), |o| o.copy_from_slice(&body))
                    .unwrap();
            }
            for c in clients.iter_mut() {
                let r = c.recv(Instant::now() + Duration::from_secs(30)).unwrap();
                assert_eq!(r.status(), 0, "{}", String::from_utf8_lossy(r.payload));
            }
            if round >= 2 {
                rates.push((BATCH * workers) as f64 / t.elapsed().as_secs_f64());
            }
        }
        for c in clients.iter_mut() {
            let _ = c.call(6, 0, 0, |_| {}, Instant::now() + Duration::from_secs(5));
        }
        for ch in &mut children {
            let _ = ch.wait();
        }
        let key = if workers == 1 {
            "eval_candidates_per_s".to_owned()
        } else {
            format!("eval_candidates_per_s_{workers}_workers")
        };
        results.insert(key, median(&mut rates).into());
    }
    results.insert(
        "eval_inprocess_candidates_per_s".into(),
        median(&mut inproc).into(),
    );
    results.insert(
        "eval_setup".into(),
        format!("4-16-2 tanh, batches of {BATCH}, {EPISODES} episodes per candidate, median of {ROUNDS} batches").into(),
    );
    let mut json: serde_json::Value = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    for (k, v) in results {
        println!("{k}: {v}");
        json[k] = v;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("writing the report");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
