//! [`Task`]: what a parameter vector is scored on, and how.
//!
//! Fitness is always "higher is better":
//!
//! | task | inputs → outputs | fitness |
//! |---|---|---|
//! | `cartpole` | 4 → 2 (argmax) or 1 (`> 0`) | mean return over `episodes` episodes, episode `i` seeded `seed + i` (1 to 500) |
//! | `xor` | 2 → 1 | −MSE over the truth table (seed unused) |
//! | `sine` | 1 → 1 | −MSE over 64 points of one period (seed unused) |
//! | `csv:<path>:<target>` | features → 1 or classes | see [`crate::csv`] (seed unused; the split seed is fixed at load) |
//! | `external` | any → any | the user's program's (`evod run --worker-cmd`, `evod.serve`); evod's runtime refuses to score it ([`RuntimeError::ExternalTask`]) |
//! | `perplexity` | a llama.cpp control vector | −perplexity of the base model steered by the vector on the corpus (`docs/llm.md`); llama.cpp scores it in a worker built with the `llm` feature, evod's MLP runtime refuses ([`RuntimeError::PerplexityTask`]) |
//!
//! A non-finite fitness (a network producing NaN) is reported as
//! `f64::NEG_INFINITY` so that it always ranks last.
//!
//! Task strings (as stored in `evod.task`): `cartpole`, `xor`, `sine`,
//! `external`, and
//! `csv:<path>:<target>` or `csv:<path>:<target>:<kind>` with `<kind>` one of
//! `regression`, `classification`, `auto` (the default). The string is split
//! at its last colons, so the path may contain colons; a target named like a
//! kind needs the kind spelled out. The split seed of a task parsed from a
//! string is [`CSV_SPLIT_SEED`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::RuntimeError;
use crate::arch::{Activation, Architecture};
use crate::cartpole;
use crate::csv::{CsvKind, CsvTask};
use crate::supervised;

/// Episodes per CartPole fitness evaluation when the task is parsed from a
/// string.
pub const CARTPOLE_EPISODES: u32 = 5;
/// Split seed of CSV tasks parsed from a task string.
pub const CSV_SPLIT_SEED: u64 = 0;
/// Task string of [`Task::External`].
pub const EXTERNAL: &str = "external";
/// Task string of [`Task::Perplexity`].
pub const PERPLEXITY: &str = "perplexity";
/// Hidden width of the default network ([`Task::default_arch`]).
pub const DEFAULT_HIDDEN: usize = 16;

/// A fitness task.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// CartPole-v1, scored by the mean return over `episodes` episodes.
    CartPole {
        /// Episodes per evaluation.
        episodes: u32,
    },
    /// XOR regression.
    Xor,
    /// Sine regression.
    Sine,
    /// A user's CSV data set.
    Csv(Arc<CsvTask>),
    /// A fitness evod does not know: the user's own worker program computes
    /// it (`evod run --worker-cmd`). Any architecture fits; evod's runtime
    /// refuses to score it.
    External,
    /// Steering a llama.cpp base model with a control vector (the model
    /// file) towards a corpus: −perplexity, scored by llama.cpp in a worker
    /// built with the `llm` feature; the base model and corpus are named in
    /// the file's `evod.perplexity.*` keys. evod's MLP runtime refuses it.
    Perplexity,
}

impl Task {
    /// Inputs the network must take (0 for [`Task::External`]: any).
    pub fn input_size(&self) -> usize {
        match self {
            Task::External | Task::Perplexity => 0,
            Task::CartPole { .. } => 4,
            Task::Xor => 2,
            Task::Sine => 1,
            Task::Csv(t) => t.input_size(),
        }
    }

    /// Outputs of the default network (CartPole also accepts 1; 0 for
    /// [`Task::External`]: any).
    pub fn output_size(&self) -> usize {
        match self {
            Task::External | Task::Perplexity => 0,
            Task::CartPole { .. } => 2,
            Task::Xor | Task::Sine => 1,
            Task::Csv(t) => t.output_size(),
        }
    }

    /// `input_size, 16, output_size` with `activation`.
    pub fn default_arch(&self, activation: Activation) -> Architecture {
        Architecture {
            layers: vec![self.input_size(), DEFAULT_HIDDEN, self.output_size()],
            activation,
            family: crate::arch::Family::Mlp,
        }
    }

    /// The task string stored in `evod.task` (see the module documentation).
    pub fn name(&self) -> String {
        match self {
            Task::CartPole { .. } => "cartpole".into(),
            Task::Xor => "xor".into(),
            Task::Sine => "sine".into(),
            Task::External => EXTERNAL.into(),
            Task::Perplexity => PERPLEXITY.into(),
            Task::Csv(t) => format!("csv:{}:{}:{}", t.path.display(), t.target, t.kind.name()),
        }
    }

    /// Checks that `arch` is valid and fits this task's sizes.
    pub fn check_arch(&self, arch: &Architecture) -> Result<(), RuntimeError> {
        if *self == Task::Perplexity {
            arch.validate()?;
            if arch.is_mlp() {
                return Err(RuntimeError::TaskMismatch {
                    task: self.name(),
                    expected: "a llama.cpp control vector".into(),
                    layers: arch.layers_string(),
                });
            }
            return Ok(());
        }
        arch.validate_mlp()?;
        if *self == Task::External {
            return Ok(());
        }
        let outputs_ok = match self {
            Task::CartPole { .. } => (1..=2).contains(&arch.outputs()),
            _ => arch.outputs() == self.output_size(),
        };
        if arch.inputs() != self.input_size() || !outputs_ok {
            let outputs = match self {
                Task::CartPole { .. } => "1 or 2".to_owned(),
                _ => self.output_size().to_string(),
            };
            return Err(RuntimeError::TaskMismatch {
                task: self.name(),
                expected: format!("{} inputs and {outputs} outputs", self.input_size()),
                layers: arch.layers_string(),
            });
        }
        Ok(())
    }

    /// Scores `params` (see the table in the module documentation).
    pub fn evaluate(
        &self,
        arch: &Architecture,
        params: &[f32],
        seed: u64,
    ) -> Result<f64, RuntimeError> {
        self.check_arch(arch)?;
        let fitness = match self {
            Task::CartPole { episodes } => cartpole::mean_return(arch, params, seed, *episodes)?,
            Task::Xor => supervised::xor().neg_mse(arch, params)?,
            Task::Sine => supervised::sine().neg_mse(arch, params)?,
            Task::Csv(t) => t.fitness(arch, params)?,
            Task::External => return Err(RuntimeError::ExternalTask),
            Task::Perplexity => return Err(RuntimeError::PerplexityTask),
        };
        Ok(if fitness.is_nan() {
            f64::NEG_INFINITY
        } else {
            fitness
        })
    }

    /// Scores many candidates with the same `seed`: the same values as
    /// [`Task::evaluate`] on each, bit for bit. CartPole runs all of them
    /// together ([`cartpole::mean_returns`]: the episodes of every
    /// candidate share the vector lanes), so a batch is faster than one
    /// call per candidate when each gets only a few episodes.
    pub fn evaluate_many(
        &self,
        arch: &Architecture,
        candidates: &[&[f32]],
        seed: u64,
    ) -> Result<Vec<f64>, RuntimeError> {
        self.evaluate_many_with(arch, candidates, seed, &mut || {})
    }

    /// [`Task::evaluate_many`], calling `tick` regularly while it runs
    /// (CartPole: every few milliseconds of network work; the other tasks:
    /// between candidates), so a caller can show progress, e.g. keep a
    /// heartbeat fresh through a long evaluation. Same results.
    pub fn evaluate_many_with(
        &self,
        arch: &Architecture,
        candidates: &[&[f32]],
        seed: u64,
        tick: &mut dyn FnMut(),
    ) -> Result<Vec<f64>, RuntimeError> {
        self.check_arch(arch)?;
        let fitness = match self {
            Task::CartPole { episodes } => {
                cartpole::mean_returns_with(arch, candidates, seed, *episodes, tick)?
            }
            Task::External => return Err(RuntimeError::ExternalTask),
            Task::Perplexity => return Err(RuntimeError::PerplexityTask),
            _ => {
                return candidates
                    .iter()
                    .map(|c| {
                        tick();
                        self.check_arch(arch)?;
                        let f = match self {
                            Task::Xor => supervised::xor().neg_mse_with(arch, c, tick)?,
                            Task::Sine => supervised::sine().neg_mse_with(arch, c, tick)?,
                            Task::Csv(t) => t.fitness_with(arch, c, tick)?,
                            Task::CartPole { .. } | Task::External | Task::Perplexity => {
                                unreachable!("matched above")
                            }
                        };
                        Ok(if f.is_nan() { f64::NEG_INFINITY } else { f })
                    })
                    .collect();
            }
        };
        Ok(fitness
            .into_iter()
            .map(|f| if f.is_nan() { f64::NEG_INFINITY } else { f })
            .collect())
    }

    /// The fitness at which the task counts as solved: CartPole's 475 (over
    /// 100 episodes, gymnasium's threshold); none for the others.
    pub fn solve_threshold(&self) -> Option<f64> {
        match self {
            Task::CartPole { .. } => Some(cartpole::SOLVED_MEAN_RETURN),
            _ => None,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Task {
    type Err = RuntimeError;

    /// Parses a task string; a `csv:` task loads (and checks) its file.
    fn from_str(s: &str) -> Result<Task, RuntimeError> {
        match s {
            "cartpole" => Ok(Task::CartPole {
                episodes: CARTPOLE_EPISODES,
            }),
            "xor" => Ok(Task::Xor),
            "sine" => Ok(Task::Sine),
            EXTERNAL => Ok(Task::External),
            PERPLEXITY => Ok(Task::Perplexity),
            _ => {
                let Some(rest) = s.strip_prefix("csv:") else {
                    return Err(RuntimeError::UnknownTask(s.to_owned()));
                };
                let (rest, kind) = match rest.rsplit_once(':') {
                    Some((head, k)) => match CsvKind::parse(k) {
                        Some(kind) => (head, kind),
                        None => (rest, CsvKind::Auto),
                    },
                    None => (rest, CsvKind::Auto),
                };
                let Some((path, target)) = rest.rsplit_once(':') else {
                    return Err(RuntimeError::UnknownTask(s.to_owned()));
                };
                if path.is_empty() || target.is_empty() {
                    return Err(RuntimeError::UnknownTask(s.to_owned()));
                }
                let task = CsvTask::load(&PathBuf::from(path), target, kind, CSV_SPLIT_SEED)?;
                Ok(Task::Csv(Arc::new(task)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn supervised_tasks_tick_inside_a_large_evaluation_with_the_same_values() {
        let arch = Architecture::new(vec![1, 300, 300, 1], crate::Activation::Tanh).unwrap();
        let a = crate::init_params(&arch, 1);
        let b = crate::init_params(&arch, 2);
        let mut ticks = 0;
        let got = Task::Sine
            .evaluate_many_with(&arch, &[&a, &b], 0, &mut || ticks += 1)
            .unwrap();
        let want = [
            Task::Sine.evaluate(&arch, &a, 0).unwrap(),
            Task::Sine.evaluate(&arch, &b, 0).unwrap(),
        ];
        assert_eq!(got[0].to_bits(), want[0].to_bits());
        assert_eq!(got[1].to_bits(), want[1].to_bits());
        // 64 rows of a 91k-weight network: more than one chunk each.
        assert!(ticks > 4, "{ticks} ticks");
    }

    use super::*;

    #[test]
    fn parse_and_sizes() {
        let t: Task = "cartpole".parse().unwrap();
        assert_eq!((t.input_size(), t.output_size()), (4, 2));
        assert_eq!(t.solve_threshold(), Some(475.0));
        assert_eq!("xor".parse::<Task>().unwrap(), Task::Xor);
        assert_eq!("sine".parse::<Task>().unwrap().name(), "sine");
        for bad in ["", "pong", "csv:", "csv:only", "csv::y", "csv:x:"] {
            assert!(bad.parse::<Task>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn mismatched_arch_is_a_typed_error() {
        let arch = Architecture::new(vec![3, 16, 2], Activation::Tanh).unwrap();
        let params = vec![0.0; arch.n_params()];
        let err = Task::Xor.evaluate(&arch, &params, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task xor needs 2 inputs and 1 outputs, the network has layers 3,16,2"
        );
    }

    #[test]
    fn external_task_takes_any_arch_and_refuses_to_score() {
        let t: Task = "external".parse().unwrap();
        assert_eq!(t, Task::External);
        assert_eq!(t.name(), "external");
        let arch = Architecture::new(vec![6, 32, 3], Activation::Tanh).unwrap();
        t.check_arch(&arch).unwrap();
        let params = vec![0.0; arch.n_params()];
        let err = t.evaluate(&arch, &params, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "external task: run the workers with --worker-cmd"
        );
        assert!(matches!(
            t.evaluate_many(&arch, &[&params], 0),
            Err(RuntimeError::ExternalTask)
        ));
        assert_eq!(t.solve_threshold(), None);
    }

    #[test]
    fn nan_fitness_ranks_last() {
        let arch = Task::Sine.default_arch(Activation::Tanh);
        let params = vec![f32::NAN; arch.n_params()];
        assert_eq!(
            Task::Sine.evaluate(&arch, &params, 0).unwrap(),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn cartpole_fitness_is_mean_return() {
        let (arch, params) = cartpole::balancing_policy();
        let t = Task::CartPole { episodes: 3 };
        assert_eq!(t.evaluate(&arch, &params, 7).unwrap(), 500.0);
    }

    #[test]
    fn evaluate_many_equals_evaluate_on_each() {
        for (task, arch) in [
            (
                Task::CartPole { episodes: 2 },
                Task::CartPole { episodes: 2 }.default_arch(Activation::Tanh),
            ),
            (Task::Sine, Task::Sine.default_arch(Activation::Tanh)),
        ] {
            let candidates: Vec<Vec<f32>> = (0..10)
                .map(|i| crate::model::init_params(&arch, i))
                .collect();
            let refs: Vec<&[f32]> = candidates.iter().map(Vec::as_slice).collect();
            let many = task.evaluate_many(&arch, &refs, 3).unwrap();
            let one: Vec<f64> = refs
                .iter()
                .map(|c| task.evaluate(&arch, c, 3).unwrap())
                .collect();
            assert_eq!(many, one, "{task}");
            assert!(one.iter().any(|&f| f != one[0]), "{task}: {one:?}");
        }
        let wrong = Architecture::new(vec![3, 2], Activation::Tanh).unwrap();
        assert!(matches!(
            Task::CartPole { episodes: 1 }.evaluate_many(&wrong, &[], 0),
            Err(RuntimeError::TaskMismatch { .. })
        ));
    }
}
