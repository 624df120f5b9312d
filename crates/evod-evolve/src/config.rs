//! Configuration of the evolution loop: strategy choice, the two strategies'
//! knobs, validation bounds, the publish gate.
//!
//! σ, noise and validation bounds are in units of each tensor's scale
//! ([`TensorScale`], by default the Glorot standard deviation of its shape),
//! so the same defaults work from 10² to 10⁷ parameters. The defaults solve
//! CartPole-v1 with a 4-16-2 tanh network quickly and evolve a 1-512-256-1
//! sine regressor (see `docs/evolution.md`); every value is checked by
//! [`EvolverConfig::check`] before an [`crate::Evolver`] is built.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::EvolveError;
use crate::layout::TensorScale;

/// Which strategy the evolver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrategyKind {
    /// Genetic algorithm: Gaussian mutation with self-adapted per-tensor σ,
    /// crossover, elitism, truncation or tournament selection.
    Ga,
    /// OpenAI-ES: antithetic pairs, centered ranks, Adam, weight decay.
    Es,
}

impl FromStr for StrategyKind {
    type Err = EvolveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ga" => Ok(Self::Ga),
            "es" => Ok(Self::Es),
            _ => Err(EvolveError::Config(format!(
                "unknown strategy {s:?}, expected \"ga\" or \"es\""
            ))),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ga => "ga",
            Self::Es => "es",
        })
    }
}

/// How the genetic algorithm picks parents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Selection {
    /// Parents drawn uniformly from the best `fraction` of the population.
    Truncation {
        /// Share of the population eligible as parents, in (0, 1].
        fraction: f64,
    },
    /// Each parent is the fittest of `size` individuals drawn at random.
    Tournament {
        /// Tournament size, ≥ 1.
        size: usize,
    },
}

/// How the genetic algorithm combines two parents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Crossover {
    /// No crossover: children are mutated copies of one parent.
    None,
    /// Each value (and each tensor's σ) comes from either parent with p = ½.
    Uniform,
    /// `child = α·a + (1−α)·b` with one α ~ U(0, 1) per child.
    Arithmetic,
}

/// Genetic-algorithm knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaConfig {
    /// Initial mutation σ of every tensor, in units of the tensor's scale.
    pub sigma: f32,
    /// Lower clamp of a self-adapted σ.
    pub sigma_min: f32,
    /// Upper clamp of a self-adapted σ.
    pub sigma_max: f32,
    /// Log-normal self-adaptation rate τ of the per-tensor σ (0 = fixed σ).
    pub sigma_tau: f32,
    /// Individuals copied unchanged (and re-evaluated) into the next generation.
    pub elite: usize,
    /// Parent selection.
    pub selection: Selection,
    /// Crossover operator.
    pub crossover: Crossover,
    /// Probability that a child is made by crossover before mutation.
    pub crossover_rate: f64,
    /// How many times a rejected child is re-drawn before it is dropped.
    pub max_resample: u32,
}

impl Default for GaConfig {
    fn default() -> Self {
        Self {
            sigma: 0.8,
            sigma_min: 1e-4,
            sigma_max: 3.0,
            sigma_tau: 0.3,
            elite: 2,
            selection: Selection::Truncation { fraction: 0.25 },
            crossover: Crossover::Uniform,
            crossover_rate: 0.3,
            max_resample: 4,
        }
    }
}

/// OpenAI-ES knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsConfig {
    /// Noise σ of the perturbations, in units of each tensor's scale.
    pub sigma: f32,
    /// σ is multiplied by this after every update (1 = constant σ).
    pub sigma_decay: f32,
    /// Lower bound of the decayed σ.
    pub sigma_min: f32,
    /// Adam step size, in units of each tensor's scale.
    pub learning_rate: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub adam_eps: f64,
    /// L2 weight decay coefficient (pulls the mean towards zero).
    pub weight_decay: f64,
    /// Also evaluate the unperturbed mean each generation (one more
    /// candidate), so that the mean can become the best and be published.
    /// Ignored (not evaluated) when the evolver gates every generation: the
    /// gate then runs beside training (`Evolver::step`).
    pub eval_center: bool,
}

impl Default for EsConfig {
    fn default() -> Self {
        Self {
            sigma: 0.6,
            sigma_decay: 1.0,
            sigma_min: 0.03,
            learning_rate: 0.3,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.005,
            eval_center: true,
        }
    }
}

/// Bounds the validator (CTRM) enforces on every candidate and publish.
///
/// Each is per element and in units of the tensor's scale `s` (see
/// [`TensorScale`]), so it means the same for a tensor of 10 or 10⁷ values:
/// for a tensor of `n` values the norm bound is `max_rms · s · √n` and the
/// change floor `change_floor · s · √n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationConfig {
    /// Largest allowed RMS of any one tensor's values, in units of its
    /// scale: `‖t‖ ≤ max_rms · s · √n`.
    pub max_rms: f64,
    /// Largest allowed `‖child − parent‖ / max(‖parent‖, change_floor · s · √n)`
    /// of any one tensor within one generation.
    pub max_relative_change: f64,
    /// Floor of the denominator of the relative change, as an RMS in units
    /// of the tensor's scale, so that a tensor near zero (a bias) may still
    /// move.
    pub change_floor: f64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_rms: 100.0,
            max_relative_change: 4.0,
            change_floor: 1.0,
        }
    }
}

/// Everything that drives an [`crate::Evolver`]. Saved in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvolverConfig {
    /// GA or ES.
    pub strategy: StrategyKind,
    /// Candidates per generation (ES: number of perturbations, even).
    pub population: usize,
    /// The one seed all randomness derives from.
    pub seed: u64,
    /// Episodes per candidate per generation (training fitness).
    pub episodes: u32,
    /// A generation's best must beat the published fitness by more than
    /// this before it is gated for publishing.
    pub publish_margin: f64,
    /// Fitness at which the task counts as solved (CartPole-v1: 475). When
    /// set, only a candidate whose gate fitness reaches it is published.
    pub solve_threshold: Option<f64>,
    /// Episodes of the publish gate (fresh seeds).
    pub gate_episodes: u32,
    /// How each tensor's scale — the unit of σ, noise, Adam steps and
    /// validation bounds — is derived from its shape.
    pub scale: TensorScale,
    /// Validation bounds.
    pub validation: ValidationConfig,
    /// GA knobs (used when `strategy` is [`StrategyKind::Ga`]).
    pub ga: GaConfig,
    /// ES knobs (used when `strategy` is [`StrategyKind::Es`]).
    pub es: EsConfig,
}

impl Default for EvolverConfig {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Ga,
            population: 48,
            seed: 0,
            episodes: 1,
            publish_margin: 0.0,
            solve_threshold: None,
            gate_episodes: 100,
            scale: TensorScale::Glorot,
            validation: ValidationConfig::default(),
            ga: GaConfig::default(),
            es: EsConfig::default(),
        }
    }
}

fn positive_finite(name: &str, v: f64) -> Result<(), EvolveError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(EvolveError::Config(format!(
            "{name} must be finite and positive, got {v}"
        )))
    }
}

fn in_unit(name: &str, v: f64) -> Result<(), EvolveError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(EvolveError::Config(format!(
            "{name} must be in [0, 1], got {v}"
        )))
    }
}

impl EvolverConfig {
    /// Checks every value; the error names the offending field.
    pub fn check(&self) -> Result<(), EvolveError> {
        if self.population < 2 {
            return Err(EvolveError::Config(format!(
                "population must be at least 2, got {}",
                self.population
            )));
        }
        if self.strategy == StrategyKind::Es && !self.population.is_multiple_of(2) {
            return Err(EvolveError::Config(format!(
                "es population must be even (antithetic pairs), got {}",
                self.population
            )));
        }
        if self.episodes == 0 {
            return Err(EvolveError::Config("episodes must be at least 1".into()));
        }
        if self.gate_episodes == 0 {
            return Err(EvolveError::Config(
                "gate_episodes must be at least 1".into(),
            ));
        }
        if !(self.publish_margin.is_finite() && self.publish_margin >= 0.0) {
            return Err(EvolveError::Config(format!(
                "publish_margin must be finite and non-negative, got {}",
                self.publish_margin
            )));
        }
        if let Some(t) = self.solve_threshold
            && !t.is_finite()
        {
            return Err(EvolveError::Config(format!(
                "solve_threshold must be finite, got {t}"
            )));
        }
        let v = &self.validation;
        positive_finite("validation.max_rms", v.max_rms)?;
        positive_finite("validation.max_relative_change", v.max_relative_change)?;
        positive_finite("validation.change_floor", v.change_floor)?;
        let ga = &self.ga;
        positive_finite("ga.sigma", f64::from(ga.sigma))?;
        positive_finite("ga.sigma_min", f64::from(ga.sigma_min))?;
        positive_finite("ga.sigma_max", f64::from(ga.sigma_max))?;
        if ga.sigma_min > ga.sigma_max {
            return Err(EvolveError::Config(format!(
                "ga.sigma_min {} is larger than ga.sigma_max {}",
                ga.sigma_min, ga.sigma_max
            )));
        }
        if !(ga.sigma_tau.is_finite() && ga.sigma_tau >= 0.0) {
            return Err(EvolveError::Config(format!(
                "ga.sigma_tau must be finite and non-negative, got {}",
                ga.sigma_tau
            )));
        }
        if ga.elite >= self.population {
            return Err(EvolveError::Config(format!(
                "ga.elite ({}) must be smaller than the population ({})",
                ga.elite, self.population
            )));
        }
        match ga.selection {
            Selection::Truncation { fraction } => {
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(EvolveError::Config(format!(
                        "ga.selection truncation fraction must be in (0, 1], got {fraction}"
                    )));
                }
            }
            Selection::Tournament { size } => {
                if size == 0 {
                    return Err(EvolveError::Config(
                        "ga.selection tournament size must be at least 1".into(),
                    ));
                }
            }
        }
        in_unit("ga.crossover_rate", ga.crossover_rate)?;
        let es = &self.es;
        positive_finite("es.sigma", f64::from(es.sigma))?;
        positive_finite("es.sigma_min", f64::from(es.sigma_min))?;
        positive_finite("es.sigma_decay", f64::from(es.sigma_decay))?;
        positive_finite("es.learning_rate", es.learning_rate)?;
        in_unit("es.beta1", es.beta1)?;
        in_unit("es.beta2", es.beta2)?;
        if es.beta1 >= 1.0 || es.beta2 >= 1.0 {
            return Err(EvolveError::Config(
                "es.beta1 and es.beta2 must be below 1".into(),
            ));
        }
        positive_finite("es.adam_eps", es.adam_eps)?;
        if !(es.weight_decay.is_finite() && es.weight_decay >= 0.0) {
            return Err(EvolveError::Config(format!(
                "es.weight_decay must be finite and non-negative, got {}",
                es.weight_decay
            )));
        }
        Ok(())
    }
}
