//! The evolution options: given to `evod run` (flags, `EVOD_*`, the TOML
//! `[evolve]` table), handed to the supervisor as the evolver's command-line
//! arguments ([`EvolveArgs::to_cli_args`]), and parsed again by the
//! `evod evolver` role, which flattens this same struct.

use std::ffi::OsString;
use std::time::Duration;

use evod_supervisor::units::parse_duration;
use serde::{Deserialize, Deserializer};

/// Default of `--patience`: generations without a better published model
/// before a service-mode run rests.
pub const DEFAULT_PATIENCE: u64 = 1000;
/// Default of `--pulse-interval`: at most one pulse line per this long.
pub const DEFAULT_PULSE_INTERVAL: Duration = Duration::from_secs(10);
/// Default of `--progress-keep`: generations kept at full resolution in
/// `state/progress.csv` (older ones are thinned to at most as many rows).
pub const DEFAULT_PROGRESS_KEEP: u64 = 10_000;

/// A duration in the TOML file: a string such as `"10s"`.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

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

/// What ES sends to the publish gate of a held-out task (the perplexity
/// task, whose gate runs beside every generation's training batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GateCandidate {
    /// The previous generation's best-scoring candidate (the default).
    Best,
    /// The mean the generation's candidates are drawn around.
    Mean,
}

impl GateCandidate {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            GateCandidate::Mean => "mean",
            GateCandidate::Best => "best",
        }
    }

    /// The library's value.
    pub fn to_library(self) -> evod_evolve::GateCandidate {
        match self {
            GateCandidate::Mean => evod_evolve::GateCandidate::Mean,
            GateCandidate::Best => evod_evolve::GateCandidate::Best,
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
    /// Fitness that counts as solved [default: 475 for CartPole; none for
    /// the other tasks; an external task's is this flag's] (negative values
    /// are accepted: `--solve-threshold -100`).
    #[arg(long, env = "EVOD_SOLVE_THRESHOLD", allow_negative_numbers = true)]
    pub solve_threshold: Option<f64>,
    /// Episodes per candidate evaluation [default: 1].
    #[arg(long, env = "EVOD_EPISODES")]
    pub episodes: Option<u32>,
    /// Log a status line every N cycles [default: 60], but at most one per
    /// --pulse-interval.
    #[arg(long, env = "EVOD_PULSE_EVERY", value_name = "N")]
    pub pulse_every: Option<u64>,
    /// Least time between two pulse lines [default: 10s].
    #[arg(long, env = "EVOD_PULSE_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "de_duration")]
    pub pulse_interval: Option<Duration>,
    /// Rest after N generations without a better published model, or at
    /// once at the task's known maximum; 0: never rest. Only without
    /// --generations and --until-solved [default: 1000].
    #[arg(long, env = "EVOD_PATIENCE", value_name = "N")]
    pub patience: Option<u64>,
    /// Generations kept at full resolution in state/progress.csv; older
    /// ones are thinned to at most N rows [default: 10000].
    #[arg(long, env = "EVOD_PROGRESS_KEEP", value_name = "N")]
    pub progress_keep: Option<u64>,
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
    /// every evaluation failed) before the evolver gives up with exit 8
    /// [default: 10].
    #[arg(long, env = "EVOD_MAX_USELESS_GENERATIONS", value_name = "N")]
    pub max_useless_generations: Option<u32>,
    /// Noise σ of the candidates, in units of each tensor's scale: ES's
    /// perturbation σ, GA's initial mutation σ [default: 0.6 for ES, 0.8
    /// for GA; the perplexity task's own: docs/llm.md].
    #[arg(long, env = "EVOD_SIGMA", value_name = "X", value_parser = positive_f64)]
    pub sigma: Option<f64>,
    /// ES's Adam step size, in units of each tensor's scale (GA has none)
    /// [default: 0.3; the perplexity task's own: docs/llm.md].
    #[arg(long, env = "EVOD_LEARNING_RATE", value_name = "X", value_parser = positive_f64)]
    pub learning_rate: Option<f64>,
    /// Largest relative change of any tensor in one generation that
    /// validation lets through (a positive number) [default: 4].
    #[arg(long, env = "EVOD_MAX_RELATIVE_CHANGE", value_name = "X", value_parser = positive_f64)]
    pub max_relative_change: Option<f64>,
    /// What ES gates on a held-out task (perplexity): the previous
    /// generation's best candidate, or the mean its candidates are drawn
    /// around [default: best; docs/llm.md]. Other tasks gate their best.
    #[arg(long, env = "EVOD_GATE_CANDIDATE", value_enum)]
    pub gate_candidate: Option<GateCandidate>,
    /// How a perplexity model's directions evolve from now on: per-layer
    /// or tied (`evod init --directions`). A file that says otherwise is
    /// rewritten before the workers start, as a new generation with the
    /// same vector [default: as the file says; docs/llm.md, "Tied
    /// directions"].
    #[arg(long, env = "EVOD_DIRECTIONS", value_enum)]
    pub directions: Option<crate::llm::Directions>,
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
    /// Least time between pulse lines, default 10 s.
    pub fn pulse_interval(&self) -> Duration {
        self.pulse_interval.unwrap_or(DEFAULT_PULSE_INTERVAL)
    }
    /// Patience in generations, 0 for a bounded run (which never rests).
    pub fn patience(&self) -> u64 {
        if self.generations.is_some() || self.until_solved {
            return 0;
        }
        self.patience.unwrap_or(DEFAULT_PATIENCE)
    }
    /// Full-resolution rows of the progress log, default 10000 (at least 1).
    pub fn progress_keep(&self) -> u64 {
        self.progress_keep.unwrap_or(DEFAULT_PROGRESS_KEEP).max(1)
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
    /// What ES gates on a held-out task, default the best candidate.
    pub fn gate_candidate(&self) -> GateCandidate {
        self.gate_candidate.unwrap_or(GateCandidate::Best)
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
            pulse_interval: self.pulse_interval.or(other.pulse_interval),
            patience: self.patience.or(other.patience),
            progress_keep: self.progress_keep.or(other.progress_keep),
            history: self.history.or(other.history),
            checkpoint_every: self.checkpoint_every.or(other.checkpoint_every),
            eval_timeout_per_candidate: self
                .eval_timeout_per_candidate
                .or(other.eval_timeout_per_candidate),
            max_useless_generations: self
                .max_useless_generations
                .or(other.max_useless_generations),
            sigma: self.sigma.or(other.sigma),
            learning_rate: self.learning_rate.or(other.learning_rate),
            max_relative_change: self.max_relative_change.or(other.max_relative_change),
            gate_candidate: self.gate_candidate.or(other.gate_candidate),
            directions: self.directions.or(other.directions),
        }
    }

    /// The flags that reproduce the set fields (for the evolver's command line).
    pub fn to_cli_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            // `--flag=value`: one argument, so a negative value (a
            // solve threshold of -100) is not taken for a flag.
            if let Some(v) = value {
                out.push(format!("{flag}={v}").into());
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
        push(
            "--pulse-interval",
            self.pulse_interval.map(|d| format!("{}us", d.as_micros())),
        );
        push("--patience", self.patience.map(|v| v.to_string()));
        push("--progress-keep", self.progress_keep.map(|v| v.to_string()));
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
        push("--sigma", self.sigma.map(|v| v.to_string()));
        push("--learning-rate", self.learning_rate.map(|v| v.to_string()));
        push(
            "--max-relative-change",
            self.max_relative_change.map(|v| v.to_string()),
        );
        push(
            "--gate-candidate",
            self.gate_candidate.map(|g| g.as_str().to_owned()),
        );
        push(
            "--directions",
            self.directions.map(|d| d.as_str().to_owned()),
        );
        if self.until_solved {
            out.push("--until-solved".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        evolve: EvolveArgs,
    }

    #[test]
    fn service_options_pass_through_and_default() {
        let file: EvolveArgs = toml::from_str(
            "pulse_interval = \"2.5s\"\npatience = 7\nprogress_keep = 50\nsigma = 2.5\nlearning_rate = 0.15\ngate_candidate = \"mean\"\ndirections = \"tied\"\n",
        )
        .unwrap();
        assert_eq!(file.pulse_interval(), Duration::from_millis(2500));
        let args = file.to_cli_args();
        let again = Cli::try_parse_from(std::iter::once("x".into()).chain(args))
            .unwrap()
            .evolve;
        assert_eq!(again, file);
        assert_eq!(again.patience(), 7);
        assert_eq!(again.progress_keep(), 50);
        assert_eq!((again.sigma, again.learning_rate), (Some(2.5), Some(0.15)));
        assert_eq!(again.gate_candidate(), GateCandidate::Mean);
        assert_eq!(again.directions, Some(crate::llm::Directions::Tied));
        assert_eq!(EvolveArgs::default().gate_candidate(), GateCandidate::Best);
        assert!(Cli::try_parse_from(["x", "--gate-candidate", "median"]).is_err());
        assert!(Cli::try_parse_from(["x", "--sigma", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--learning-rate", "nan"]).is_err());
        let none = EvolveArgs::default();
        assert_eq!(none.patience(), DEFAULT_PATIENCE);
        assert_eq!(none.pulse_interval(), DEFAULT_PULSE_INTERVAL);
        // A bounded run never rests.
        let bounded = EvolveArgs {
            generations: Some(10),
            ..file
        };
        assert_eq!(bounded.patience(), 0);
        assert!(toml::from_str::<EvolveArgs>("pulse_interval = \"soon\"").is_err());
    }

    #[test]
    fn a_negative_solve_threshold_parses_and_passes_through() {
        let given = Cli::try_parse_from(["x", "--solve-threshold", "-100", "--until-solved"])
            .unwrap()
            .evolve;
        assert_eq!(given.solve_threshold, Some(-100.0));
        let again = Cli::try_parse_from(std::iter::once("x".into()).chain(given.to_cli_args()))
            .unwrap()
            .evolve;
        assert_eq!(again, given);
    }
}
