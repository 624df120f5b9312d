//! `cargo xtask bench evolve`: CartPole-v1 (4-16-2 tanh) solved through the
//! 100-episode gate over 5 seeds by evod's default GA, in-process, next to
//! pycma's CMA-ES and a numpy OpenAI-ES on gymnasium, measured in the same
//! run by the same gate (`bench_evolve_peers.py`, run with `EVOD_PYTHON`).
//! evod's solutions are also re-judged by gymnasium on 100 episodes.
//!
//! Usage: `bench_evolve OUT.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use evod_evolve::{EvolverConfig, solve_in_process};
use evod_runtime::{Activation, Architecture, Task};

const SEEDS: [u64; 5] = [0, 1, 2, 3, 4];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EVOD_PYTHON") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = root.join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python found: set EVOD_PYTHON or run `cargo xtask venv`"
    );
    p
}

fn field(runs: &serde_json::Value, key: &str) -> Vec<f64> {
    runs.as_array()
        .expect("peer runs")
        .iter()
        .filter(|r| r["solved"].as_bool() == Some(true))
        .map(|r| r[key].as_f64().expect("number"))
        .collect()
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: bench_evolve OUT.json");
    let arch = Architecture {
        layers: vec![4, 16, 2],
        activation: Activation::Tanh,
        family: evod_runtime::Family::Mlp,
    };
    let config = EvolverConfig::default();
    let (mut walls, mut episodes, mut params, mut generations) = (vec![], vec![], vec![], vec![]);
    for seed in SEEDS {
        let c = EvolverConfig {
            seed,
            ..config.clone()
        };
        let r = solve_in_process(
            c,
            &arch,
            Task::CartPole {
                episodes: config.episodes,
            },
            2000,
        )
        .expect("solve");
        assert!(r.solved, "seed {seed}: not solved in 2000 generations");
        println!(
            "evod  seed {seed}: solved in {:.4} s, {} episodes, {} generations, gate {:.1}",
            r.wall.as_secs_f64(),
            r.episodes,
            r.generations,
            r.fitness
        );
        walls.push(r.wall.as_secs_f64());
        episodes.push(r.episodes as f64);
        generations.push(r.generations as f64);
        params.push(r.params);
    }
    let dir = std::env::temp_dir().join(format!("evod-bench-evolve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let params_path = dir.join("evod_params.json");
    let peers_path = dir.join("peers.json");
    std::fs::write(&params_path, serde_json::to_vec(&params).expect("json")).expect("write params");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench_evolve_peers.py");
    let seeds: Vec<String> = SEEDS.iter().map(u64::to_string).collect();
    println!("running peers (pycma CMA-ES, numpy OpenAI-ES on gymnasium) ...");
    let status = Command::new(python())
        .arg(&script)
        .arg(seeds.join(","))
        .arg(&params_path)
        .arg(&peers_path)
        .status()
        .expect("run python");
    assert!(status.success(), "{} failed: {status}", script.display());
    let peers: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&peers_path).expect("read peers"))
            .expect("peers json");
    let _ = std::fs::remove_dir_all(&dir);

    let cma_wall = field(&peers["pycma"], "wall_s");
    let es_wall = field(&peers["numpy_es"], "wall_s");
    let gym_gate: Vec<f64> = peers["evod_gymnasium_gate"]
        .as_array()
        .expect("gate")
        .iter()
        .map(|v| v.as_f64().expect("f64"))
        .collect();
    let wall_med = median(walls.clone());
    let cma_med = median(cma_wall.clone());
    let es_med = median(es_wall.clone());
    let report = serde_json::json!({
        "machine": format!("{} cores", std::thread::available_parallelism().map_or(1, usize::from)),
        "network": "4-16-2 tanh",
        "gate": "mean return over 100 fresh seeded episodes >= 475",
        "evod_mode": "in-process (solve_in_process, all cores), default GA config",
        "seeds": SEEDS,
        "solve_wall_s": walls,
        "solve_wall_s_median": wall_med,
        "solve_episodes": episodes,
        "solve_episodes_median": median(episodes.clone()),
        "solve_generations_median": median(generations),
        "evod_solutions_gymnasium_gate": gym_gate,
        "pycma": peers["pycma"],
        "pycma_solved": cma_wall.len(),
        "pycma_solve_wall_s_median": cma_med,
        "pycma_solve_episodes_median": median(field(&peers["pycma"], "episodes")),
        "numpy_es": peers["numpy_es"],
        "numpy_es_solved": es_wall.len(),
        "numpy_es_solve_wall_s_median": es_med,
        "numpy_es_solve_episodes_median": median(field(&peers["numpy_es"], "episodes")),
        "speedup_vs_pycma": cma_med / wall_med,
        "speedup_vs_numpy_es": es_med / wall_med,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write report");
    println!(
        "evod median {wall_med:.4} s; pycma {cma_med:.3} s ({:.0}x); numpy ES {es_med:.3} s ({:.0}x); gymnasium re-judges evod's solutions at {gym_gate:?}",
        cma_med / wall_med,
        es_med / wall_med
    );
    println!("wrote {out}");
}
