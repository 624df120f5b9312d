//! CartPole-v1 exactly as gymnasium 1.x runs it, and MLP policies on it.
//!
//! Physics (`gymnasium/envs/classic_control/cartpole.py`): gravity 9.8, cart
//! mass 1.0, pole mass 0.1, pole half-length 0.5, force ±10.0, tau 0.02 s,
//! explicit Euler; the state is `f64` `[x, x_dot, theta, theta_dot]`, the
//! observation is that state rounded to `f32`. An episode ends when
//! `|x| > 2.4` or `|theta| > 12°` (`12 * 2 * pi / 360`), or is truncated
//! after 500 steps (the `TimeLimit` of `gymnasium.make("CartPole-v1")`);
//! every step, including the terminating one, earns +1, so a return is the
//! number of steps taken (1 to 500).
//!
//! `reset(seed)` draws the state as gymnasium's `reset(seed=seed)` does:
//! `Generator(PCG64(SeedSequence(seed))).uniform(-0.05, 0.05, 4)`
//! ([`crate::numpy_rng`]). Episode `i` of an evaluation with seed `S` uses
//! seed `S + i` (wrapping at 2^64).
//!
//! Policies: the observation goes through the network ([`crate::mlp`]); with
//! two outputs the action is numpy's `argmax` (ties and a leading NaN pick
//! action 0, a NaN in output 1 alone picks 1), with one output the action
//! is 1 when the output is `> 0`.

use crate::RuntimeError;
use crate::arch::Architecture;
use crate::mlp::{BATCH_LANES, Lanes, Mlp, MlpLanes};
use crate::numpy_rng::Pcg64;

const GRAVITY: f64 = 9.8;
const MASS_CART: f64 = 1.0;
const MASS_POLE: f64 = 0.1;
const TOTAL_MASS: f64 = MASS_POLE + MASS_CART;
const LENGTH: f64 = 0.5;
const POLEMASS_LENGTH: f64 = MASS_POLE * LENGTH;
const FORCE_MAG: f64 = 10.0;
const TAU: f64 = 0.02;
/// `|x|` beyond which an episode terminates.
pub const X_THRESHOLD: f64 = 2.4;
/// `|theta|` (radians) beyond which an episode terminates: 12 degrees.
pub const THETA_THRESHOLD: f64 = 12.0 * 2.0 * std::f64::consts::PI / 360.0;
/// Steps after which an episode is truncated (CartPole-v1's time limit).
pub const MAX_STEPS: u32 = 500;
/// gymnasium's reward threshold for CartPole-v1: a policy solves the task
/// when its mean return over 100 episodes reaches it.
pub const SOLVED_MEAN_RETURN: f64 = 475.0;

/// One CartPole-v1 environment, including its time limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct CartPole {
    state: [f64; 4],
    steps: u32,
}

/// The `f32` observation of an `f64` state.
#[inline(always)]
fn observe(state: &[f64; 4]) -> [f32; 4] {
    [
        state[0] as f32,
        state[1] as f32,
        state[2] as f32,
        state[3] as f32,
    ]
}

impl CartPole {
    /// A fresh environment; call [`CartPole::reset`] before stepping.
    pub fn new() -> CartPole {
        CartPole::default()
    }

    /// gymnasium's `reset(seed=seed)`: draws the initial state and returns its
    /// observation.
    pub fn reset(&mut self, seed: u64) -> [f32; 4] {
        Pcg64::from_seed(seed).uniform(-0.05, 0.05, &mut self.state);
        self.steps = 0;
        observe(&self.state)
    }

    /// The full-precision state `[x, x_dot, theta, theta_dot]`.
    pub fn state(&self) -> [f64; 4] {
        self.state
    }

    /// Steps taken since the last reset.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// gymnasium's `step(action)`; `action` is 1 (push right) when `true`.
    /// Returns `(observation, reward, terminated, truncated)`; the reward is
    /// always 1.0 (callers stop at the end of an episode).
    #[inline(always)]
    pub fn step(&mut self, action: bool) -> ([f32; 4], f64, bool, bool) {
        let force = if action { FORCE_MAG } else { -FORCE_MAG };
        let theta = self.state[2];
        self.state = physics(self.state, force, theta.sin(), theta.cos());
        self.steps += 1;
        let terminated = out_of_bounds(self.state[0], self.state[2]);
        let truncated = self.steps >= MAX_STEPS;
        (observe(&self.state), 1.0, terminated, truncated)
    }
}

/// One Euler step of the physics from `[x, x_dot, theta, theta_dot]`
/// under `force`, given `sin(theta)` and `cos(theta)`.
#[inline(always)]
fn physics(state: [f64; 4], force: f64, sintheta: f64, costheta: f64) -> [f64; 4] {
    let [x, x_dot, theta, theta_dot] = state;
    // Same operations, in the same order, as gymnasium's float64 code.
    let temp = (force + POLEMASS_LENGTH * (theta_dot * theta_dot) * sintheta) / TOTAL_MASS;
    let thetaacc = (GRAVITY * sintheta - costheta * temp)
        / (LENGTH * (4.0 / 3.0 - MASS_POLE * (costheta * costheta) / TOTAL_MASS));
    let xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS;
    [
        x + TAU * x_dot,
        x_dot + TAU * xacc,
        theta + TAU * theta_dot,
        theta_dot + TAU * thetaacc,
    ]
}

/// gymnasium's termination test, kept literally (a NaN state does not end
/// the episode there either). Non-short-circuit `|` so that it vectorises;
/// the result is the same. Not `!range.contains(..)`: that would end an
/// episode on NaN, which gymnasium does not.
#[allow(clippy::manual_range_contains)]
#[inline(always)]
fn out_of_bounds(x: f64, theta: f64) -> bool {
    (x < -X_THRESHOLD) | (x > X_THRESHOLD) | (theta < -THETA_THRESHOLD) | (theta > THETA_THRESHOLD)
}

/// The action a network's outputs select (see the module documentation).
#[inline(always)]
pub fn action(outputs: &[f32]) -> bool {
    match *outputs {
        [only] => only > 0.0,
        [a, b, ..] => {
            // numpy argmax over two values: NaN counts as the maximum, and
            // the first maximum wins.
            if a.is_nan() {
                false
            } else {
                b.is_nan() || b > a
            }
        }
        [] => false,
    }
}

/// Runs one episode from `reset(seed)` with `policy`, calling `on_step` with
/// each observation the policy sees and the action it took; returns the
/// number of steps (the return).
#[inline]
pub fn run_episode_with(
    policy: &mut Mlp,
    seed: u64,
    mut on_step: impl FnMut(&[f32; 4], bool),
) -> u32 {
    let mut env = CartPole::new();
    let mut obs = env.reset(seed);
    loop {
        let act = action(policy.forward(&obs));
        on_step(&obs, act);
        let (next, _, terminated, truncated) = env.step(act);
        obs = next;
        if terminated || truncated {
            return env.steps();
        }
    }
}

/// Runs one episode from `reset(seed)`; returns the number of steps.
#[inline]
pub fn run_episode(policy: &mut Mlp, seed: u64) -> u32 {
    run_episode_with(policy, seed, |_, _| {})
}

/// The action of sample `lane` of lane-major outputs (see [`action`]).
#[inline(always)]
fn lane_action(outputs: &[Lanes], lane: usize) -> bool {
    match outputs {
        [only] => only[lane] > 0.0,
        [a, b, ..] => action(&[a[lane], b[lane]]),
        [] => false,
    }
}

/// Runs episodes `0..episodes`, episode `i` from `reset(seed + i)`,
/// [`BATCH_LANES`] at a time in lockstep through `policy` (every lane
/// should hold the same parameters, as [`MlpLanes::new`] leaves them; a lane
/// whose episode ends starts the next one); calls `on_return(i, steps)` as
/// each ends, in no particular order. Every episode's trajectory is exactly
/// what [`run_episode`] computes: the lanes never interact.
///
/// This is the fast path: independent episodes share vector instructions
/// and overlap each other's latency (the forward pass and the physics of
/// one step form one dependency chain). A `policy` without 4 inputs and 1
/// or 2 outputs is refused ([`check_arch`]).
pub fn run_episodes(
    policy: &mut MlpLanes,
    seed: u64,
    episodes: u32,
    mut on_return: impl FnMut(u32, u32),
) -> Result<(), RuntimeError> {
    check_arch(policy.arch())?;
    run_lockstep(
        policy,
        u64::from(episodes),
        |_, _, job| seed.wrapping_add(job),
        // `job < episodes`, so it fits in u32.
        |job, steps| on_return(job as u32, steps),
        &mut || {},
    );
    Ok(())
}

/// The mean return of each candidate parameter vector over `episodes`
/// episodes, episode `i` seeded `seed + i` (the same seeds for every
/// candidate): [`mean_return`] for many candidates at once, bit for bit,
/// with the lanes spread over candidates and episodes alike (a candidate's
/// parameters are loaded into a lane when it starts one of its episodes),
/// so even a few episodes per candidate keep every lane busy.
pub fn mean_returns(
    arch: &Architecture,
    candidates: &[&[f32]],
    seed: u64,
    episodes: u32,
) -> Result<Vec<f64>, RuntimeError> {
    mean_returns_with(arch, candidates, seed, episodes, &mut || {})
}

/// [`mean_returns`], calling `tick` regularly while it runs (about every
/// [`TICK_WORK`] multiply-adds of the network, and at least every 64
/// lockstep steps), e.g. to refresh a heartbeat from inside a long
/// evaluation. The results are the same bit for bit.
pub fn mean_returns_with(
    arch: &Architecture,
    candidates: &[&[f32]],
    seed: u64,
    episodes: u32,
    tick: &mut dyn FnMut(),
) -> Result<Vec<f64>, RuntimeError> {
    check_arch(arch)?;
    for c in candidates {
        arch.check_params(c)?;
    }
    let Some(first) = candidates.first() else {
        return Ok(Vec::new());
    };
    if episodes == 0 {
        return Ok(vec![0.0; candidates.len()]);
    }
    if arch.n_params() >= ONE_AT_A_TIME_PARAMS {
        return mean_returns_one_at_a_time(arch, candidates, seed, episodes, tick);
    }
    let mut lanes = MlpLanes::new(arch, first)?;
    let per = u64::from(episodes);
    let jobs = candidates.len() as u64 * per;
    let mut loaded = [0usize; BATCH_LANES];
    let mut totals = vec![0u64; candidates.len()];
    run_lockstep(
        &mut lanes,
        jobs,
        |net, lane, job| {
            // `job / per < candidates.len()`: a valid index.
            let c = (job / per) as usize;
            if loaded[lane] != c {
                net.load_lane(lane, candidates[c]);
                loaded[lane] = c;
            }
            seed.wrapping_add(job % per)
        },
        |job, steps| totals[(job / per) as usize] += u64::from(steps),
        tick,
    );
    Ok(totals
        .into_iter()
        .map(|t| t as f64 / f64::from(episodes))
        .collect())
}

/// From this many parameters on, [`mean_returns_with`] runs one candidate
/// at a time through [`Mlp`] (vectorised over a layer's outputs) instead of
/// [`BATCH_LANES`] candidates side by side: eight lanes of a network this
/// large no longer stay in the cache, one network does, and the forward
/// pass is bound by memory otherwise (at 10^6 parameters one network at a
/// time was about 4× faster per episode step, before [`Mlp`]'s panels made
/// it 2.4× faster again). The results are the same
/// bit for bit ([`MlpLanes`] lanes equal [`Mlp::forward`]).
pub const ONE_AT_A_TIME_PARAMS: usize = 1 << 18;

/// [`mean_returns_with`] for large networks: one [`Mlp`] reloaded per
/// candidate (no allocation), its episodes one after another.
fn mean_returns_one_at_a_time(
    arch: &Architecture,
    candidates: &[&[f32]],
    seed: u64,
    episodes: u32,
    tick: &mut dyn FnMut(),
) -> Result<Vec<f64>, RuntimeError> {
    // The network of this thread's last call, if of the same architecture:
    // reloaded rather than allocated again (at 10^7 parameters, 40 MB whose
    // allocation and first touch cost more than the reload). Taken out for
    // the call, so nothing stays borrowed while episodes run.
    let mut net = match LAST_NET.with(|n| n.take()) {
        Some(mut n) if n.arch() == arch => {
            n.reload(candidates[0])?;
            n
        }
        _ => Mlp::new(arch, candidates[0])?,
    };
    let stride = (TICK_WORK / arch.n_params().max(1)).clamp(1, 64) as u32;
    let mut out = Vec::with_capacity(candidates.len());
    for (c, params) in candidates.iter().enumerate() {
        if c > 0 {
            net.reload(params)?;
        }
        let mut total = 0u64;
        for e in 0..episodes {
            total += u64::from(run_episode_ticking(
                &mut net,
                seed.wrapping_add(u64::from(e)),
                stride,
                tick,
            ));
        }
        out.push(total as f64 / f64::from(episodes));
    }
    LAST_NET.with(|n| n.set(Some(net)));
    Ok(out)
}

thread_local! {
    /// The network [`mean_returns_one_at_a_time`] last used on this thread
    /// (one per thread: the worker's evaluation thread, or each thread of
    /// an in-process evaluator).
    static LAST_NET: std::cell::Cell<Option<Mlp>> = const { std::cell::Cell::new(None) };
}

/// [`run_episode`], calling `tick` every `stride` steps and at the end; on x86-64 with
/// AVX2 the forward pass is compiled for it (same results: Rust never
/// fuses or reorders floating-point operations, whatever the vector width).
fn run_episode_ticking(net: &mut Mlp, seed: u64, stride: u32, tick: &mut dyn FnMut()) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: compiled for AVX2, which the CPU was just checked to
        // support; otherwise the same code as the portable body.
        return unsafe { run_episode_ticking_avx2(net, seed, stride, tick) };
    }
    run_episode_ticking_body(net, seed, stride, tick)
}

/// [`run_episode_ticking_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_episode_ticking_avx2(net: &mut Mlp, seed: u64, stride: u32, tick: &mut dyn FnMut()) -> u32 {
    run_episode_ticking_body(net, seed, stride, tick)
}

#[inline(always)]
fn run_episode_ticking_body(net: &mut Mlp, seed: u64, stride: u32, tick: &mut dyn FnMut()) -> u32 {
    let mut env = CartPole::new();
    let mut obs = env.reset(seed);
    loop {
        let act = action(net.forward_inline(&obs));
        let (next, _, terminated, truncated) = env.step(act);
        obs = next;
        if terminated || truncated {
            tick();
            return env.steps();
        }
        if env.steps().is_multiple_of(stride) {
            tick();
        }
    }
}

/// Network multiply-adds between two calls of a `tick` callback (a few
/// milliseconds of work), so a 114-weight policy ticks every 64 lockstep
/// steps and a million-weight one every step.
pub const TICK_WORK: usize = 1 << 22;

/// Lockstep steps between two `tick` calls for `net`.
fn tick_stride(net: &MlpLanes) -> u32 {
    let per_step = net.arch().n_params().saturating_mul(BATCH_LANES).max(1);
    (TICK_WORK / per_step).clamp(1, 64) as u32
}

/// Runs jobs `0..jobs`, each one episode, [`BATCH_LANES`] at a time:
/// `start_job(net, lane, job)` prepares `lane` of `net` for `job` and
/// returns its episode seed; `on_return(job, steps)` reports its end;
/// `tick()` is called every [`tick_stride`] steps.
fn run_lockstep(
    net: &mut MlpLanes,
    jobs: u64,
    start_job: impl FnMut(&mut MlpLanes, usize, u64) -> u64,
    on_return: impl FnMut(u64, u32),
    tick: &mut dyn FnMut(),
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `run_lockstep_avx2` only differs from the portable body by
        // being compiled for AVX2, which the CPU was just checked to
        // support. Results are identical: Rust never fuses or reorders
        // floating-point operations, whatever the vector width.
        unsafe { run_lockstep_avx2(net, jobs, start_job, on_return, tick) };
        return;
    }
    run_lockstep_body(net, jobs, start_job, on_return, tick);
}

/// [`run_lockstep_body`] compiled for AVX2 (8 f32 lanes per instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_lockstep_avx2(
    net: &mut MlpLanes,
    jobs: u64,
    start_job: impl FnMut(&mut MlpLanes, usize, u64) -> u64,
    on_return: impl FnMut(u64, u32),
    tick: &mut dyn FnMut(),
) {
    run_lockstep_body(net, jobs, start_job, on_return, tick);
}

/// Per-lane bookkeeping of the lockstep runner. Structure of arrays:
/// `state[v][k]` is variable `v` of lane `k`, so the physics of all lanes
/// runs as vector instructions; `obs` is the lane-major network input.
struct LaneEnvs {
    state: [[f64; BATCH_LANES]; 4],
    obs: [Lanes; 4],
    steps: [u32; BATCH_LANES],
    /// The job each lane runs, `None` once no job is left for it.
    job: [Option<u64>; BATCH_LANES],
    next: u64,
}

impl LaneEnvs {
    /// Starts the next job in `lane` (true), or parks the lane from the
    /// upright state, where it keeps stepping harmlessly (false).
    #[inline(always)]
    fn start(
        &mut self,
        lane: usize,
        jobs: u64,
        net: &mut MlpLanes,
        start_job: &mut impl FnMut(&mut MlpLanes, usize, u64) -> u64,
    ) -> bool {
        let mut env = CartPole::new();
        let started = self.next < jobs;
        if started {
            env.reset(start_job(net, lane, self.next));
            self.job[lane] = Some(self.next);
            self.next += 1;
        } else {
            self.job[lane] = None;
        }
        for (v, value) in env.state().into_iter().enumerate() {
            self.state[v][lane] = value;
            self.obs[v][lane] = value as f32;
        }
        self.steps[lane] = 0;
        started
    }
}

#[inline(always)]
fn run_lockstep_body(
    net: &mut MlpLanes,
    jobs: u64,
    mut start_job: impl FnMut(&mut MlpLanes, usize, u64) -> u64,
    mut on_return: impl FnMut(u64, u32),
    tick: &mut dyn FnMut(),
) {
    const L: usize = BATCH_LANES;
    let stride = tick_stride(net);
    let mut until_tick = stride;
    let mut envs = LaneEnvs {
        state: [[0.0; L]; 4],
        obs: [[0.0; L]; 4],
        steps: [0; L],
        job: [None; L],
        next: 0,
    };
    let mut active = 0usize;
    for lane in 0..L {
        if envs.start(lane, jobs, net, &mut start_job) {
            active += 1;
        }
    }
    while active > 0 {
        until_tick -= 1;
        if until_tick == 0 {
            tick();
            until_tick = stride;
        }
        let outputs = net.forward_inline(&envs.obs);
        let mut force = [0.0f64; L];
        for (k, f) in force.iter_mut().enumerate() {
            *f = if lane_action(outputs, k) {
                FORCE_MAG
            } else {
                -FORCE_MAG
            };
        }
        let (mut sin, mut cos) = ([0.0f64; L], [0.0f64; L]);
        for k in 0..L {
            (sin[k], cos[k]) = envs.state[2][k].sin_cos();
        }
        let mut done = [false; L];
        let (state, obs, steps) = (&mut envs.state, &mut envs.obs, &mut envs.steps);
        for k in 0..L {
            let s = physics(
                [state[0][k], state[1][k], state[2][k], state[3][k]],
                force[k],
                sin[k],
                cos[k],
            );
            for v in 0..4 {
                state[v][k] = s[v];
                obs[v][k] = s[v] as f32;
            }
            steps[k] += 1;
            done[k] = out_of_bounds(s[0], s[2]) | (steps[k] >= MAX_STEPS);
        }
        for (lane, &done) in done.iter().enumerate() {
            match envs.job[lane] {
                Some(job) if done => {
                    on_return(job, envs.steps[lane]);
                    if !envs.start(lane, jobs, net, &mut start_job) {
                        active -= 1;
                    }
                }
                Some(_) => {}
                None => envs.steps[lane] = 0,
            }
        }
    }
}

/// Checks that `arch` fits CartPole: 4 inputs, 1 or 2 outputs.
pub fn check_arch(arch: &Architecture) -> Result<(), RuntimeError> {
    arch.validate_mlp()?;
    if arch.inputs() != 4 || !(1..=2).contains(&arch.outputs()) {
        return Err(RuntimeError::TaskMismatch {
            task: "cartpole".into(),
            expected: "4 inputs and 1 or 2 outputs".into(),
            layers: arch.layers_string(),
        });
    }
    Ok(())
}

/// The return of one episode started by `reset(seed)`.
pub fn episode_return(arch: &Architecture, params: &[f32], seed: u64) -> Result<f64, RuntimeError> {
    check_arch(arch)?;
    let mut policy = Mlp::new(arch, params)?;
    Ok(f64::from(run_episode(&mut policy, seed)))
}

/// The returns of `episodes` episodes, episode `i` seeded `seed + i`.
pub fn returns(
    arch: &Architecture,
    params: &[f32],
    seed: u64,
    episodes: u32,
) -> Result<Vec<f64>, RuntimeError> {
    check_arch(arch)?;
    let mut policy = MlpLanes::new(arch, params)?;
    let mut out = vec![0.0; episodes as usize];
    run_episodes(&mut policy, seed, episodes, |i, steps| {
        out[i as usize] = f64::from(steps);
    })?;
    Ok(out)
}

/// The mean return over `episodes` episodes (0 when `episodes` is 0),
/// episode `i` seeded `seed + i`.
pub fn mean_return(
    arch: &Architecture,
    params: &[f32],
    seed: u64,
    episodes: u32,
) -> Result<f64, RuntimeError> {
    Ok(mean_returns(arch, &[params], seed, episodes)?[0])
}

/// A hand-made 4-16-2 tanh policy that balances the pole for the full 500
/// steps from every initial state gymnasium draws: hidden unit 0 computes
/// `tanh(x + 2 x_dot + 30 theta + 5 theta_dot)`-style feedback, output 1
/// minus output 0 is that unit. Used by benchmarks and tests.
pub fn balancing_policy() -> (Architecture, Vec<f32>) {
    let arch = Architecture {
        layers: vec![4, 16, 2],
        activation: crate::arch::Activation::Tanh,
        family: crate::arch::Family::Mlp,
    };
    let mut params = vec![0.0f32; arch.n_params()];
    // blk.0.weight row 0 (hidden unit 0) over [x, x_dot, theta, theta_dot].
    params[..4].copy_from_slice(&BALANCE_GAINS);
    // blk.1.weight: [out][in] = 2 x 16, starting at 64 + 16.
    params[80] = -1.0; // output 0 <- -h0
    params[80 + 16] = 1.0; // output 1 <- +h0
    (arch, params)
}

/// State-feedback gains of [`balancing_policy`].
const BALANCE_GAINS: [f32; 4] = [0.1, 0.5, 10.0, 2.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_networks_one_at_a_time_equal_the_lanes_bit_for_bit() {
        let arch = Architecture::new(vec![4, 520, 500, 2], crate::Activation::Tanh).unwrap();
        assert!(arch.n_params() >= ONE_AT_A_TIME_PARAMS);
        let cands: Vec<Vec<f32>> = (1..3).map(|s| crate::init_params(&arch, s)).collect();
        let views: Vec<&[f32]> = cands.iter().map(Vec::as_slice).collect();
        let mut ticks = 0;
        let got = mean_returns_with(&arch, &views, 7, 2, &mut || ticks += 1).unwrap();
        for (c, g) in cands.iter().zip(&got) {
            let mut lanes = MlpLanes::new(&arch, c).unwrap();
            let mut total = 0u64;
            run_episodes(&mut lanes, 7, 2, |_, steps| total += u64::from(steps)).unwrap();
            assert_eq!(g.to_bits(), (total as f64 / 2.0).to_bits());
        }
        assert!(ticks > 0, "a long evaluation ticks");
        // The thread's network is reused by later calls: each candidate
        // alone, in the other order, scores the same.
        for (c, g) in views.iter().zip(&got).rev() {
            let again = mean_returns(&arch, &[c], 7, 2).unwrap();
            assert_eq!(again[0].to_bits(), g.to_bits());
        }
        // Another architecture on the same thread gets its own network.
        let other = Architecture::new(vec![4, 600, 440, 2], crate::Activation::Tanh).unwrap();
        let p = crate::init_params(&other, 3);
        let mut lanes = MlpLanes::new(&other, &p).unwrap();
        let mut total = 0u64;
        run_episodes(&mut lanes, 7, 2, |_, steps| total += u64::from(steps)).unwrap();
        let got = mean_returns(&other, &[&p], 7, 2).unwrap();
        assert_eq!(got[0].to_bits(), (total as f64 / 2.0).to_bits());
    }

    #[test]
    fn reset_matches_gymnasium_seed_0() {
        // gymnasium.make("CartPole-v1").reset(seed=0)[0]
        let obs = CartPole::new().reset(0);
        let want = [
            0.013_696_168_732_145_436_f64,
            -0.023_021_328_623_612_97,
            -0.045_902_647_606_380_534,
            -0.048_347_236_447_147_09,
        ];
        assert_eq!(obs, want.map(|v| v as f32));
    }

    #[test]
    fn actions_follow_numpy_argmax() {
        assert!(!action(&[1.0, 1.0]));
        assert!(action(&[0.0, 1.0]));
        assert!(!action(&[f32::NAN, 1.0]));
        assert!(action(&[1.0, f32::NAN]));
        assert!(action(&[0.5]));
        assert!(!action(&[0.0]));
    }

    #[test]
    fn an_untrained_policy_falls_and_balancing_policy_survives() {
        let (arch, params) = balancing_policy();
        let zero = vec![0.0; arch.n_params()];
        // All-zero outputs tie, so the cart is always pushed left: it falls fast.
        let r = returns(&arch, &zero, 0, 10).unwrap();
        assert!(r.iter().all(|&r| r > 1.0 && r < 50.0), "{r:?}");
        let mean = mean_return(&arch, &params, 0, 100).unwrap();
        assert_eq!(mean, 500.0);
    }

    #[test]
    fn ticks_come_during_long_evaluations_and_change_nothing() {
        let (arch, params) = balancing_policy();
        let candidates: Vec<&[f32]> = vec![&params; 3];
        let plain = mean_returns(&arch, &candidates, 11, 20).unwrap();
        let mut ticks = 0u64;
        let ticked = mean_returns_with(&arch, &candidates, 11, 20, &mut || ticks += 1).unwrap();
        assert_eq!(plain, ticked);
        // 60 balanced episodes of 500 steps, 8 at a time, a tick every 64
        // steps for this small network.
        let steps = (60u64).div_ceil(BATCH_LANES as u64) * 500;
        assert!(ticks >= steps / 64 - 1, "{ticks} ticks for ~{steps} steps");
        // A large network ticks every step.
        let big = Architecture {
            layers: vec![4, 1024, 1024, 2],
            activation: crate::arch::Activation::Tanh,
            family: crate::arch::Family::Mlp,
        };
        assert_eq!(
            tick_stride(&MlpLanes::new(&big, &vec![0.0; big.n_params()]).unwrap()),
            1
        );
    }

    /// A way to run `episodes` episodes from `seed` in lockstep.
    type Runner = fn(&mut MlpLanes, u64, u32, &mut dyn FnMut(u32, u32));

    #[test]
    fn lockstep_episodes_equal_one_at_a_time() {
        // Both the dispatching entry point and the portable body (the only
        // one that runs on a CPU without AVX2).
        let runners: [Runner; 2] = [
            |p, s, e, f| run_episodes(p, s, e, f).unwrap(),
            |p, s, e, f| {
                run_lockstep_body(
                    p,
                    u64::from(e),
                    |_, _, job| s.wrapping_add(job),
                    |job, steps| f(job as u32, steps),
                    &mut || {},
                )
            },
        ];
        for run in runners {
            lockstep_case(run);
        }
    }

    fn lockstep_case(run_episodes: Runner) {
        // Random networks: episodes of many different lengths, so lanes
        // finish and restart at different times; 1 and 2 outputs; episode
        // counts below, at and above the lane count.
        for (layers, salt) in [(vec![4, 16, 2], 3u64), (vec![4, 8, 1], 4)] {
            let arch = Architecture::new(layers, crate::arch::Activation::Tanh).unwrap();
            let mut params = crate::model::init_params(&arch, salt);
            if arch.outputs() == 2 {
                // A noisy balancing policy: some episodes last, some fall.
                for (p, b) in params.iter_mut().zip(balancing_policy().1) {
                    *p += b;
                }
            }
            let mut policy = Mlp::new(&arch, &params).unwrap();
            let mut lanes = MlpLanes::new(&arch, &params).unwrap();
            for episodes in [0u32, 1, 5, BATCH_LANES as u32, 37] {
                let seed = u64::MAX - 3;
                let want: Vec<u32> = (0..episodes)
                    .map(|i| run_episode(&mut policy, seed.wrapping_add(u64::from(i))))
                    .collect();
                let mut got = vec![0u32; episodes as usize];
                let mut calls = 0;
                run_episodes(&mut lanes, seed, episodes, &mut |i, steps| {
                    got[i as usize] = steps;
                    calls += 1;
                });
                assert_eq!(calls, episodes);
                assert_eq!(got, want, "{arch} x{episodes}");
                if episodes == 37 {
                    let distinct: std::collections::BTreeSet<_> = want.iter().collect();
                    assert!(distinct.len() > 3, "lengths vary: {want:?}");
                }
            }
        }
        let (arch, params) = balancing_policy();
        let mut lanes = MlpLanes::new(&arch, &params).unwrap();
        let mut got = Vec::new();
        run_episodes(&mut lanes, 7, 11, &mut |_, steps| got.push(steps));
        assert_eq!(got, vec![500; 11]);
    }

    #[test]
    fn mean_returns_equal_mean_return_per_candidate() {
        // 11 distinct candidates x 3 episodes: lanes switch candidates
        // mid-run and hold different candidates at once.
        let (arch, balance) = balancing_policy();
        let candidates: Vec<Vec<f32>> = (0..11u64)
            .map(|c| {
                let noise = crate::model::init_params(&arch, 100 + c);
                let scale = c as f32 * 0.6;
                noise
                    .iter()
                    .zip(&balance)
                    .map(|(n, b)| b + scale * n)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = candidates.iter().map(Vec::as_slice).collect();
        let seed = 40;
        let got = mean_returns(&arch, &refs, seed, 3).unwrap();
        let want: Vec<f64> = candidates
            .iter()
            .map(|p| {
                let mut policy = Mlp::new(&arch, p).unwrap();
                let total: u32 = (0..3).map(|i| run_episode(&mut policy, seed + i)).sum();
                f64::from(total) / 3.0
            })
            .collect();
        assert_eq!(got, want);
        let distinct: std::collections::BTreeSet<u64> = want.iter().map(|m| m.to_bits()).collect();
        assert!(distinct.len() > 3, "candidates differ: {want:?}");
        assert_eq!(mean_return(&arch, refs[5], seed, 3).unwrap(), want[5]);
        assert_eq!(
            mean_returns(&arch, &[], seed, 3).unwrap(),
            Vec::<f64>::new()
        );
        assert_eq!(
            mean_returns(&arch, &refs[..2], seed, 0).unwrap(),
            vec![0.0; 2]
        );
        assert!(matches!(
            mean_returns(&arch, &[refs[0], &balance[1..]], seed, 3),
            Err(RuntimeError::ParamCount { .. })
        ));
    }

    #[test]
    fn mismatched_networks_are_rejected() {
        let arch = Architecture::new(vec![3, 4, 2], crate::arch::Activation::Tanh).unwrap();
        let params = vec![0.0; arch.n_params()];
        let mut lanes = MlpLanes::new(&arch, &params).unwrap();
        assert!(matches!(
            run_episodes(&mut lanes, 0, 3, |_, _| panic!("ran an episode")),
            Err(RuntimeError::TaskMismatch { .. })
        ));
        assert!(matches!(
            mean_returns(&arch, &[&params], 0, 3),
            Err(RuntimeError::TaskMismatch { .. })
        ));
        assert!(matches!(
            mean_return(&arch, &params, 0, 1),
            Err(RuntimeError::TaskMismatch { .. })
        ));
        let (arch, params) = balancing_policy();
        assert!(matches!(
            episode_return(&arch, &params[1..], 0),
            Err(RuntimeError::ParamCount { .. })
        ));
    }
}
