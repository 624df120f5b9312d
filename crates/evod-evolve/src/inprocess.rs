//! Evaluation on threads of this process, over an `evod_runtime::Task`, and
//! [`solve_in_process`], the loop run to a solve without any daemon.
//!
//! Work is split into units — one per candidate, or, when there are fewer
//! candidates than threads (the 100-episode gate), CartPole episode ranges
//! of one candidate — and summed back in a fixed order, so results do not
//! depend on the number of threads. Candidates given as recipes are
//! regenerated on the thread that evaluates them, into one buffer per
//! thread, so a batch costs O(threads × n) memory, not O(population × n).

use std::time::{Duration, Instant};

use crate::config::EvolverConfig;
use crate::error::{EvalError, EvolveError};
use crate::evaluator::Evaluator;
use crate::evolver::Evolver;
use crate::recipe::{Base, Recipe};
use crate::rt::{self, Architecture, Task};

/// An [`Evaluator`] that runs the task on `threads` threads of this process.
#[derive(Debug, Clone)]
pub struct InProcessEvaluator {
    task: Task,
    arch: Architecture,
    threads: usize,
}

impl InProcessEvaluator {
    /// An evaluator of `task` for networks of `arch` on `threads` threads
    /// (0 = the number of available cores). Fails if `arch` does not fit
    /// the task.
    pub fn new(task: Task, arch: Architecture, threads: usize) -> Result<Self, EvolveError> {
        task.check_arch(&arch)
            .map_err(|e| EvolveError::Config(format!("task {task}: {e}")))?;
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        Ok(Self {
            task,
            arch,
            threads,
        })
    }

    /// Threads used per batch.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sum of fitness over the unit: (candidate, first episode, episodes).
    fn run_unit(
        &self,
        params: &[f32],
        seed: u64,
        first: u32,
        episodes: u32,
    ) -> Result<f64, EvalError> {
        let fail = |e: rt::RuntimeError| EvalError::Failed(e.to_string());
        match self.task {
            Task::CartPole { .. } => {
                let r = rt::cartpole::returns(
                    &self.arch,
                    params,
                    seed.wrapping_add(u64::from(first)),
                    episodes,
                )
                .map_err(fail)?;
                Ok(r.iter().sum())
            }
            _ => self.task.evaluate(&self.arch, params, seed).map_err(fail),
        }
    }
}

/// The candidates of one batch.
#[derive(Clone, Copy)]
enum Source<'a> {
    Vectors(&'a [&'a [f32]]),
    Recipes(&'a Base<'a>, &'a [Recipe]),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Vectors(v) => v.len(),
            Self::Recipes(_, r) => r.len(),
        }
    }
}

impl Evaluator for InProcessEvaluator {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.run_batch(Source::Vectors(candidates), seed, episodes)
    }

    fn evaluate_recipes(
        &mut self,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.run_batch(Source::Recipes(base, recipes), seed, episodes)
    }
}

impl InProcessEvaluator {
    fn run_batch(
        &self,
        candidates: Source<'_>,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let cartpole = matches!(self.task, Task::CartPole { .. });
        let episodes = if cartpole { episodes.max(1) } else { 1 };
        // Units: (candidate, first episode, episodes).
        let split = if cartpole && candidates.len() < self.threads {
            (self.threads as u32).min(episodes)
        } else {
            1
        };
        let mut units = Vec::with_capacity(candidates.len() * split as usize);
        for c in 0..candidates.len() {
            for k in 0..split {
                let a = episodes * k / split;
                let b = episodes * (k + 1) / split;
                units.push((c, a, b - a));
            }
        }
        let threads = self.threads.min(units.len()).max(1);
        let mut sums = vec![0.0f64; units.len()];
        let this = self;
        let results: Vec<Result<(), EvalError>> = std::thread::scope(|s| {
            let chunk = units.len().div_ceil(threads);
            let handles: Vec<_> = units
                .chunks(chunk)
                .zip(sums.chunks_mut(chunk))
                .map(|(us, out)| {
                    s.spawn(move || {
                        let mut buf = Vec::new();
                        // The candidate held in `buf`, so a candidate split
                        // into episode ranges is regenerated once.
                        let mut held = None;
                        for (&(c, first, n), o) in us.iter().zip(out) {
                            let params: &[f32] = match candidates {
                                Source::Vectors(v) => v[c],
                                Source::Recipes(base, r) => {
                                    if held != Some(c) {
                                        buf.resize(base.params().len(), 0.0);
                                        r[c].apply_to(base, &mut buf)
                                            .map_err(|e| EvalError::Failed(e.to_string()))?;
                                        held = Some(c);
                                    }
                                    &buf
                                }
                            };
                            *o = this.run_unit(params, seed, first, n)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EvalError::Failed("evaluation thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        let mut out = vec![0.0f64; candidates.len()];
        for (&(c, _, _), s) in units.iter().zip(&sums) {
            out[c] += s;
        }
        Ok(out
            .into_iter()
            .map(|total| {
                let f = if cartpole {
                    total / f64::from(episodes)
                } else {
                    total
                };
                // The runtime reports a NaN-producing network as −∞.
                f.is_finite().then_some(f)
            })
            .collect())
    }
}

/// What [`solve_in_process`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveReport {
    /// Generations run.
    pub generations: u64,
    /// Episodes run (training and gate).
    pub episodes: u64,
    /// Wall time.
    pub wall: Duration,
    /// Whether a candidate passed the solve gate.
    pub solved: bool,
    /// The solving candidate (or, unsolved, the last generation's best).
    pub params: Vec<f32>,
    /// Its gate fitness (or, unsolved, its training fitness).
    pub fitness: f64,
}

/// Runs the loop in this process from `evod_runtime::init_params(arch,
/// config.seed)` until the gate
/// reaches the solve threshold (`config.solve_threshold`, else the task's)
/// or `max_generations` generations have run. Threads: all cores.
pub fn solve_in_process(
    mut config: EvolverConfig,
    arch: &Architecture,
    task: Task,
    max_generations: u64,
) -> Result<SolveReport, EvolveError> {
    let start = Instant::now();
    if config.solve_threshold.is_none() {
        config.solve_threshold = task.solve_threshold();
    }
    if config.solve_threshold.is_none() {
        return Err(EvolveError::Config(format!(
            "task {task} has no solve threshold and none was configured"
        )));
    }
    let mut ev = InProcessEvaluator::new(task, arch.clone(), 0)?;
    let initial = rt::init_params(arch, config.seed);
    let mut evolver = Evolver::new(config, arch, initial, None)?;
    for _ in 0..max_generations {
        let r = evolver.step(&mut ev)?;
        if r.solved
            && let Some(p) = r.publish
        {
            return Ok(SolveReport {
                generations: evolver.generation(),
                episodes: evolver.stats().episodes,
                wall: start.elapsed(),
                solved: true,
                params: p.params,
                fitness: p.gate_fitness.unwrap_or(p.fitness),
            });
        }
    }
    let (params, fitness) = evolver.best();
    Ok(SolveReport {
        generations: evolver.generation(),
        episodes: evolver.stats().episodes,
        wall: start.elapsed(),
        solved: false,
        params: params.to_vec(),
        fitness,
    })
}
