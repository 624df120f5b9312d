//! The evolution options: given to `evod run` (flags, `EVOD_*`, the TOML
//! `[evolve]` table), handed to the supervisor as the evolver's command-line
//! arguments ([`EvolveArgs::to_cli_args`]), and parsed again by the
//! `evod evolver` role, which flattens this same struct.

use std::ffi::OsString;

use serde::Deserialize;

/// Evolution strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Genetic algorithm: Gaussian mutation, crossover, elitist selection.
    Ga,
    /// OpenAI-ES: antithetic pairs, centered ranks, Adam.
    Es,
}

impl Strategy {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Ga => "ga",
            Strategy::Es => "es",
        }
    }
}

/// Evolution options: given to `evod run`, passed through unchanged to the
/// `evod evolver` role (which flattens this same struct). Every field is
/// optional so that flags, `EVOD_*` variables and the TOML `[evolve]` table
/// can be layered; the accessors apply the defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct EvolveArgs {
    /// Evolution strategy [default: ga].
    #[arg(long, env = "EVOD_STRATEGY", value_enum)]
    pub strategy: Option<Strategy>,
    /// Candidates per generation [default: 48].
    #[arg(long, env = "EVOD_POPULATION")]
    pub population: Option<u32>,
    /// Seed of all randomness; a run repeats exactly [default: 0].
    #[arg(long, env = "EVOD_SEED")]
    pub seed: Option<u64>,
    /// Stop evolving after N generations [default: never].
    #[arg(long, env = "EVOD_GENERATIONS", value_name = "N")]
    pub generations: Option<u64>,
    /// Stop evolving once the task is solved (publish gate passed).
    #[arg(long, env = "EVOD_UNTIL_SOLVED")]
    #[serde(default)]
    pub until_solved: bool,
    /// Mean return that counts as solved [default: 475].
    #[arg(long, env = "EVOD_SOLVE_THRESHOLD")]
    pub solve_threshold: Option<f64>,
    /// Episodes per candidate evaluation [default: 1].
    #[arg(long, env = "EVOD_EPISODES")]
    pub episodes: Option<u32>,
    /// Log a status line every N cycles [default: 60].
    #[arg(long, env = "EVOD_PULSE_EVERY", value_name = "N")]
    pub pulse_every: Option<u64>,
    /// Generations kept in DIR/history for rollback [default: 10].
    #[arg(long, env = "EVOD_HISTORY", value_name = "K")]
    pub history: Option<u32>,
    /// Checkpoint the strategy state every N generations [default: 10].
    #[arg(long, env = "EVOD_CHECKPOINT_EVERY", value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Seconds an EVAL may take per candidate it carries, on top of a
    /// fixed 10 s; a worker that beats but does not answer within it is
    /// recycled and its batch re-sent [default: 10].
    #[arg(long, env = "EVOD_EVAL_TIMEOUT_PER_CANDIDATE", value_name = "SECONDS")]
    pub eval_timeout_per_candidate: Option<f64>,
    /// Consecutive generations without progress (every candidate rejected,
    /// every evaluation failed) before the evolver gives up with exit 7
    /// [default: 10].
    #[arg(long, env = "EVOD_MAX_USELESS_GENERATIONS", value_name = "N")]
    pub max_useless_generations: Option<u32>,
    /// Largest relative change of any tensor in one generation that
    /// validation lets through (a positive number) [default: 4].
    #[arg(long, env = "EVOD_MAX_RELATIVE_CHANGE", value_name = "X", value_parser = positive_f64)]
    pub max_relative_change: Option<f64>,
}

/// A finite number > 0.
fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number greater than 0")),
        Err(e) => Err(e.to_string()),
    }
}

impl EvolveArgs {
    /// Seed, default 0.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
    /// Solve threshold, default 475 (gymnasium's CartPole-v1 threshold).
    pub fn solve_threshold(&self) -> f64 {
        self.solve_threshold.unwrap_or(475.0)
    }
    /// Pulse interval in cycles, default 60.
    pub fn pulse_every(&self) -> u64 {
        self.pulse_every.unwrap_or(60)
    }
    /// History length, default 10.
    pub fn history(&self) -> u32 {
        self.history.unwrap_or(10)
    }
    /// Checkpoint interval in generations, default 10.
    pub fn checkpoint_every(&self) -> u64 {
        self.checkpoint_every.unwrap_or(10)
    }

    /// Per-candidate EVAL timeout, default 10 s (non-finite or negative
    /// values count as the default).
    pub fn eval_timeout_per_candidate(&self) -> std::time::Duration {
        self.eval_timeout_per_candidate
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .unwrap_or(std::time::Duration::from_secs(10))
    }
    /// Useless generations tolerated, default
    /// [`evod_evolve::DEFAULT_MAX_USELESS_GENERATIONS`].
    pub fn max_useless_generations(&self) -> u32 {
        self.max_useless_generations
            .unwrap_or(evod_evolve::DEFAULT_MAX_USELESS_GENERATIONS)
    }

    /// Fills every unset field of `self` from `other`.
    pub fn or(self, other: EvolveArgs) -> EvolveArgs {
        EvolveArgs {
            strategy: self.strategy.or(other.strategy),
            population: self.population.or(other.population),
            seed: self.seed.or(other.seed),
            generations: self.generations.or(other.generations),
            until_solved: self.until_solved || other.until_solved,
            solve_threshold: self.solve_threshold.or(other.solve_threshold),
            episodes: self.episodes.or(other.episodes),
            pulse_every: self.pulse_every.or(other.pulse_every),
            history: self.history.or(other.history),
            checkpoint_every: self.checkpoint_every.or(other.checkpoint_every),
            eval_timeout_per_candidate: self
                .eval_timeout_per_candidate
                .or(other.eval_timeout_per_candidate),
            max_useless_generations: self
                .max_useless_generations
                .or(other.max_useless_generations),
            max_relative_change: self.max_relative_change.or(other.max_relative_change),
        }
    }

    /// The flags that reproduce the set fields (for the evolver's command line).
    pub fn to_cli_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push(flag.into());
                out.push(v.into());
            }
        };
        push("--strategy", self.strategy.map(|s| s.as_str().to_owned()));
        push("--population", self.population.map(|v| v.to_string()));
        push("--seed", self.seed.map(|v| v.to_string()));
        push("--generations", self.generations.map(|v| v.to_string()));
        push(
            "--solve-threshold",
            self.solve_threshold.map(|v| v.to_string()),
        );
        push("--episodes", self.episodes.map(|v| v.to_string()));
        push("--pulse-every", self.pulse_every.map(|v| v.to_string()));
        push("--history", self.history.map(|v| v.to_string()));
        push(
            "--checkpoint-every",
            self.checkpoint_every.map(|v| v.to_string()),
        );
        push(
            "--eval-timeout-per-candidate",
            self.eval_timeout_per_candidate.map(|v| v.to_string()),
        );
        push(
            "--max-useless-generations",
            self.max_useless_generations.map(|v| v.to_string()),
        );
        push(
            "--max-relative-change",
            self.max_relative_change.map(|v| v.to_string()),
        );
        if self.until_solved {
            out.push("--until-solved".into());
        }
        out
    }
}
