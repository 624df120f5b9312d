//! `cargo xtask bench evolve` (second part): CartPole-v1 solved end to end
//! through the daemon: `evod run --until-solved` in an empty folder
//! (supervisor, 2 workers, evolver; the 100-episode gate included), wall
//! time from spawn to exit, over 5 seeds. Adds its keys to the JSON file
//! given as the only argument (which `bench_evolve` wrote with the pycma
//! and numpy OpenAI-ES figures of the same run).
//!
//! Usage: `EVOD_BIN=target/release/evod bench_daemon_solve OUT.json`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: bench_daemon_solve OUT.json"),
    );
    let evod =
        PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: path of a release evod"));
    let mut walls = Vec::new();
    let mut per_seed = Vec::new();
    for seed in 0..5u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        let t = Instant::now();
        let o = Command::new(&evod)
            .args([
                "run",
                "--until-solved",
                "--workers",
                "2",
                "--seed",
                &seed.to_string(),
                "--dir",
            ])
            .arg(dir.path())
            .env("EVOD_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("running evod run");
        let wall = t.elapsed().as_secs_f64();
        assert!(
            o.status.success(),
            "seed {seed}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        println!("seed {seed}: {wall:.3} s  {summary}");
        walls.push(wall);
        per_seed.push(serde_json::json!({ "seed": seed, "wall_s": wall, "summary": summary }));
    }
    walls.sort_by(f64::total_cmp);
    let median = walls[walls.len() / 2];
    let mut json: serde_json::Value = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    json["daemon_solve_wall_s_median"] = median.into();
    json["daemon_solve_runs"] = per_seed.into();
    if let Some(cma) = json["pycma_solve_wall_s_median"].as_f64() {
        json["daemon_vs_pycma_ratio"] = (median / cma).into();
        println!(
            "daemon median {median:.3} s vs pycma {cma:.3} s: {:.4}×",
            median / cma
        );
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("writing the report");
}
