//! evod against the Python originals: CartPole-v1 trajectories from
//! gymnasium and numpy's seeding, compared bit for bit.
//!
//! The interpreter is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (made by `cargo xtask venv`); without either the tests fail.

use std::path::PathBuf;
use std::process::Command;

use evod_runtime::cartpole::{self, CartPole, balancing_policy};
use evod_runtime::mlp::Mlp;
use evod_runtime::numpy_rng::{Pcg64, SeedSequence};
use evod_runtime::{Activation, Architecture, init_params};
use serde_json::{Value, json};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EVOD_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no python with gymnasium: set EVOD_PYTHON or run `cargo xtask venv` (looked for {})",
        venv.display()
    );
    venv
}

fn run_script(script: &str, args: &[String]) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference prints json")
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("u64"))
        .collect()
}

/// Runs `episodes` episodes in gymnasium and in evod; asserts equal returns,
/// actions, observations (f32 bits) and states (f64 bits). Returns the total
/// number of steps compared.
fn compare(arch: &Architecture, params: &[f32], seed: u64, episodes: u32) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    let spec = json!({
        "layers": arch.layers,
        "activation": arch.activation.name(),
        "params_bits": params.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        "seed": seed,
        "episodes": episodes,
    });
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let reference = run_script(
        "cartpole_reference.py",
        &[spec_path.to_string_lossy().into_owned()],
    );
    let ref_returns: Vec<f64> = reference["returns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert_eq!(ref_returns.len(), episodes as usize);
    assert_eq!(
        cartpole::returns(arch, params, seed, episodes).unwrap(),
        ref_returns,
        "returns differ for {arch}"
    );

    let mut policy = Mlp::new(arch, params).unwrap();
    let mut steps = 0;
    for (i, rec) in reference["episodes"].as_array().unwrap().iter().enumerate() {
        let ep_seed = seed + i as u64;
        let ref_obs = rec["obs"].as_array().unwrap();
        let ref_states = rec["states"].as_array().unwrap();
        let ref_actions = u64s(&rec["actions"]);
        let mut env = CartPole::new();
        let mut obs = env.reset(ep_seed);
        for (k, ((o, s), &a)) in ref_obs.iter().zip(ref_states).zip(&ref_actions).enumerate() {
            let want_obs: Vec<u64> = u64s(o);
            let got_obs: Vec<u64> = obs.iter().map(|v| u64::from(v.to_bits())).collect();
            assert_eq!(
                got_obs, want_obs,
                "episode {i} (seed {ep_seed}) step {k}: observation"
            );
            let act = cartpole::action(policy.forward(&obs));
            assert_eq!(u64::from(act), a, "episode {i} step {k}: action");
            let (next, reward, terminated, truncated) = env.step(act);
            assert_eq!(reward, 1.0);
            let got_state: Vec<u64> = env.state().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_state, u64s(s), "episode {i} step {k}: f64 state");
            let last = k + 1 == ref_actions.len();
            assert_eq!(
                terminated || truncated,
                last,
                "episode {i} step {k}: episode end"
            );
            obs = next;
            steps += 1;
        }
    }
    steps
}

#[test]
fn cartpole_matches_gymnasium_for_a_balancing_policy() {
    let (arch, params) = balancing_policy();
    // 20 full-length episodes (10 000 steps) keep the test quick; the
    // random policies below add 400 episodes that end by termination.
    let steps = compare(&arch, &params, 1000, 20);
    // Every episode runs to the time limit: the truncation path is covered.
    assert_eq!(steps, 20 * 500);
}

#[test]
fn cartpole_matches_gymnasium_for_random_policies() {
    // Seeded random networks fall early: the termination path, both
    // thresholds and every activation and output convention.
    let mut steps = 0;
    for (i, (layers, act)) in [
        (vec![4, 16, 2], Activation::Tanh),
        (vec![4, 8, 8, 1], Activation::Relu),
        (vec![4, 5, 2], Activation::Sigmoid),
        (vec![4, 2], Activation::Identity),
    ]
    .into_iter()
    .enumerate()
    {
        let arch = Architecture::new(layers, act).unwrap();
        let params = init_params(&arch, 17 + i as u64);
        steps += compare(&arch, &params, 5 * i as u64, 100);
    }
    assert!(steps > 4 * 100, "random policies ran {steps} steps");
}

#[test]
fn numpy_seeding_matches_numpy() {
    let seeds = [
        0u64,
        1,
        2,
        42,
        123_456_789,
        4_294_967_295,
        4_294_967_296,
        u64::MAX,
    ];
    let args: Vec<String> = seeds.iter().map(u64::to_string).collect();
    let reference = run_script("numpy_rng_reference.py", &args);
    for (entry, &seed) in reference.as_array().unwrap().iter().zip(&seeds) {
        assert_eq!(entry["seed"].as_u64(), Some(seed));
        let pool: Vec<u64> = SeedSequence::new(seed)
            .pool()
            .iter()
            .map(|&v| u64::from(v))
            .collect();
        assert_eq!(pool, u64s(&entry["pool"]), "pool of seed {seed}");
        let mut rng = Pcg64::from_seed(seed);
        let raw: Vec<u64> = (0..8).map(|_| rng.next_u64()).collect();
        assert_eq!(raw, u64s(&entry["raw"]), "raw outputs of seed {seed}");
        let mut u = [0.0; 4];
        Pcg64::from_seed(seed).uniform(-0.05, 0.05, &mut u);
        let bits: Vec<u64> = u.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, u64s(&entry["uniform_bits"]), "uniform of seed {seed}");
        let mut w = [0.0; 16];
        Pcg64::from_seed(seed).uniform(-3.5, 1e6, &mut w);
        let bits: Vec<u64> = w.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            bits,
            u64s(&entry["wide_bits"]),
            "wide uniform of seed {seed}"
        );
    }
}
