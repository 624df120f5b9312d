//! The `perplexity` task: evolving a llama.cpp control vector
//! (`docs/llm.md`, "Evolving a control vector").
//!
//! - `evod init --task perplexity --base-model BASE.gguf --text CORPUS.txt`
//!   ([`init`]) writes a zero control vector shaped for the base model
//!   (`direction.1` … `direction.(n_layer−1)`, `n_embd` each) with the
//!   task's metadata ([`evod_runtime::perplexity::PerplexitySpec`]).
//! - `evod run` checks the model's base and corpus before anything starts
//!   ([`check_run`]): a build without the `llm` feature exits 2, a base or
//!   corpus that changed since `init` exits 3, naming the file.
//! - `evod worker` on a perplexity model serves the ring with
//!   [`PerplexityHandler`] on `evod-serve`'s loop (feature `llm`): one base
//!   model and one context per process, the corpus tokenized once; per
//!   candidate: set the vector, clear the memory, decode the windows,
//!   score −perplexity. A warm standby loads all of that before it says
//!   ready, so a promoted standby serves without loading anything. The
//!   worker logs in the daemon's format (`EVOD_LOG_FORMAT`), llama.cpp's
//!   warnings and errors included. Training requests score a seed-chosen subset of the
//!   training windows (all when `evod.perplexity.train_windows` is 0); the
//!   publish gate ([`evod_serve::Purpose::Gate`]) scores every held-out
//!   window, which training never sees.
//! - `evod join` on a perplexity run ([`check_host`]): the base model and
//!   corpus are this host's own copies ([`HostFiles`]: `--base-model`,
//!   `--text`, else the paths the vector records), verified against the
//!   checksums the vector records before the host takes any task, and
//!   handed to the workers in [`HOST_BASE_MODEL_ENV`] / [`HOST_TEXT_ENV`]
//!   ([`relocate`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use evod_gguf::GgufReader;
use evod_runtime::perplexity::{self, PerplexitySpec};
use evod_runtime::{Architecture, ModelSpec, Task};

use crate::exit;

/// Where `evod join` tells its workers this host's copy of the base model
/// (internal: set by `evod join` only, removed by `evod run`).
pub const HOST_BASE_MODEL_ENV: &str = "EVOD_HOST_BASE_MODEL";
/// Where `evod join` tells its workers this host's copy of the corpus.
pub const HOST_TEXT_ENV: &str = "EVOD_HOST_TEXT";

/// An evaluator host's own copies of a perplexity run's base model and
/// corpus (`evod join --base-model PATH --text PATH`, or `base_model` and
/// `text` in the TOML file). Each defaults to the path the run's vector
/// records; either way the file must have the checksum the vector records.
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct HostFiles {
    /// A perplexity run: this host's copy of the base model (the llama.cpp
    /// GGUF), checked against the checksum the run's vector records
    /// [default: the path the vector records].
    #[arg(long, env = "EVOD_BASE_MODEL", value_name = "PATH")]
    pub base_model: Option<PathBuf>,
    /// A perplexity run: this host's copy of the corpus, checked against
    /// the checksum the run's vector records [default: the path the vector
    /// records].
    #[arg(long, env = "EVOD_TEXT", value_name = "PATH")]
    pub text: Option<PathBuf>,
}

impl HostFiles {
    /// `self` over `other` (flags and variables over the TOML file), each
    /// path made absolute (the workers run in another folder).
    pub fn or(self, other: HostFiles) -> anyhow::Result<HostFiles> {
        let abs = |p: Option<PathBuf>, flag: &str| {
            p.map(|p| {
                std::path::absolute(&p).map_err(|e| {
                    exit::with_code(
                        exit::USAGE,
                        anyhow::anyhow!("bad --{flag} {}: {e}", p.display()),
                    )
                })
            })
            .transpose()
        };
        Ok(HostFiles {
            base_model: abs(self.base_model.or(other.base_model), "base-model")?,
            text: abs(self.text.or(other.text), "text")?,
        })
    }

    /// Puts these paths in this process's environment for the workers it
    /// starts ([`HOST_BASE_MODEL_ENV`], [`HOST_TEXT_ENV`]; a path not given
    /// is removed).
    ///
    /// # Safety
    /// Call before any other thread exists (the start of `evod join`).
    pub unsafe fn export(&self) {
        for (key, value) in [
            (HOST_BASE_MODEL_ENV, &self.base_model),
            (HOST_TEXT_ENV, &self.text),
        ] {
            // SAFETY: the caller promises no other thread exists, so none
            // reads or writes the environment meanwhile.
            unsafe {
                match value {
                    Some(p) => std::env::set_var(key, p),
                    None => std::env::remove_var(key),
                }
            }
        }
    }
}

/// Removes [`HOST_BASE_MODEL_ENV`] and [`HOST_TEXT_ENV`] from this
/// process's environment: the workers of `evod run` use the files the
/// model records (which `check_run` verified), never a stray variable.
/// Call first thing in `evod run`, before any thread exists.
pub fn scrub_host_files_env() {
    for key in [HOST_BASE_MODEL_ENV, HOST_TEXT_ENV] {
        if std::env::var_os(key).is_some() {
            // SAFETY: called at the start of `evod run`, before logging is
            // set up or any thread or child is started.
            unsafe { std::env::remove_var(key) };
        }
    }
}

/// Points `task` at this host's copies of its files: `files`' paths where
/// given. The checksums stay those the vector records.
pub fn relocate(task: &mut PerplexitySpec, files: &HostFiles) {
    if let Some(p) = &files.base_model {
        task.base_model = p.clone();
    }
    if let Some(p) = &files.text {
        task.corpus = p.clone();
    }
}

/// The [`HostFiles`] `evod join` exported for its workers (none in any
/// other daemon).
#[cfg(feature = "llm")]
fn host_files_from_env() -> HostFiles {
    HostFiles {
        base_model: std::env::var_os(HOST_BASE_MODEL_ENV).map(PathBuf::from),
        text: std::env::var_os(HOST_TEXT_ENV).map(PathBuf::from),
    }
}

/// `evod join` with the run's model at `model`, before the host takes any
/// task: a perplexity run needs a build with llama.cpp (exit 2 otherwise)
/// and this host's base model and corpus (`files`, else the paths the
/// vector records), each with the checksum the vector records — a file
/// missing or another is refused (exit 3) naming it and both checksums;
/// the vector must fit the base. `run` names the run in the messages.
pub fn check_host(model: &Path, files: &HostFiles, run: &str) -> anyhow::Result<()> {
    if !is_perplexity_model(model) {
        if files.base_model.is_some() || files.text.is_some() {
            tracing::warn!(
                "--base-model and --text are for a perplexity run; run {run}'s task is another: ignored"
            );
        }
        return Ok(());
    }
    if !evod_llama::BUILT {
        return Err(exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "run {run}'s task is perplexity (a llama.cpp control vector), but this evod was built without the llm feature: this host cannot evaluate it; rebuild with `cargo build --release -p evod --features llm`"
            ),
        ));
    }
    let bad = |e: evod_runtime::RuntimeError| exit::with_code(exit::BAD_INPUT, e);
    let reader = GgufReader::open(model).map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    let spec = ModelSpec::from_header(reader.header(), model).map_err(bad)?;
    let recorded = PerplexitySpec::from_header(reader.header(), model).map_err(bad)?;
    let mut task = recorded.clone();
    relocate(&mut task, files);
    let refuse = |what: &str,
                  flag: &str,
                  path: &Path,
                  recorded_path: &Path,
                  want: u64,
                  problem: String| {
        exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "{what} {}: {problem}; run {run}'s vector records the {what} {} with checksum {want:016x}: give this host's copy with --{flag} PATH (`{}` in the config file). Refused before taking any task",
                path.display(),
                recorded_path.display(),
                flag.replace('-', "_")
            ),
        )
    };
    let base_sum = perplexity::file_checksum(&task.base_model).map_err(|e| {
        let problem = match &e {
            evod_runtime::RuntimeError::PerplexityInput { problem, .. } => problem.clone(),
            e => e.to_string(),
        };
        refuse(
            "base model",
            "base-model",
            &task.base_model,
            &recorded.base_model,
            recorded.base_checksum,
            problem,
        )
    })?;
    if base_sum != recorded.base_checksum {
        return Err(refuse(
            "base model",
            "base-model",
            &task.base_model,
            &recorded.base_model,
            recorded.base_checksum,
            format!("checksum {base_sum:016x}, not the run's base model"),
        ));
    }
    let corpus = std::fs::read(&task.corpus).map_err(|e| {
        refuse(
            "corpus",
            "text",
            &task.corpus,
            &recorded.corpus,
            recorded.corpus_checksum,
            format!("cannot read: {e}"),
        )
    })?;
    let corpus_sum = xxhash_rust::xxh3::xxh3_64(&corpus);
    if corpus_sum != recorded.corpus_checksum || corpus.len() as u64 != recorded.corpus_bytes {
        return Err(refuse(
            "corpus",
            "text",
            &task.corpus,
            &recorded.corpus,
            recorded.corpus_checksum,
            format!(
                "checksum {corpus_sum:016x} ({} bytes; the run's is {} bytes), not the run's corpus",
                corpus.len(),
                recorded.corpus_bytes
            ),
        ));
    }
    drop(corpus);
    task.read_corpus().map_err(bad)?;
    let shape = base_shape(&task.base_model)?;
    check_fits(model, &spec.arch, &shape, &task.base_model)?;
    tracing::info!(
        base = %task.base_model.display(),
        corpus = %task.corpus.display(),
        "this host's base model and corpus are run {run}'s (checksums {:016x}, {:016x})",
        recorded.base_checksum,
        recorded.corpus_checksum
    );
    Ok(())
}

/// Default share of the corpus held out for the publish gate.
pub const DEFAULT_HELDOUT: f64 = 0.2;
/// Default window in tokens.
pub const DEFAULT_WINDOW: u32 = 512;
/// Default training windows per evaluation (0 = all).
pub const DEFAULT_TRAIN_WINDOWS: u32 = 0;
/// The task's default candidates per generation (`--population`).
pub const DEFAULT_POPULATION: usize = 8;
/// The task's default ES σ (`--sigma`), in units of a direction's scale.
pub const DEFAULT_SIGMA: f32 = 0.6;
/// The task's default Adam step (`--learning-rate`), in the same units.
pub const DEFAULT_LEARNING_RATE: f64 = 0.05;
/// σ of a tied control vector (`evod init --directions tied`): the same
/// noise at every layer adds up along the residual stream, so a smaller σ
/// moves the model as much (docs/llm.md, "Tied directions").
pub const DEFAULT_SIGMA_TIED: f32 = 0.2;
/// The Adam step of a tied control vector, in the same units.
pub const DEFAULT_LEARNING_RATE_TIED: f64 = 0.02;

/// How a control vector's directions evolve (`evod init --directions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Directions {
    /// Each layer's direction on its own: `n_embd × (n_layer − 1)`
    /// dimensions.
    #[default]
    PerLayer,
    /// One direction for every layer (`evod.controlvector.tied`): every
    /// mutation adds the same noise to each, so the search has `n_embd`
    /// dimensions.
    Tied,
}

impl Directions {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Directions::PerLayer => "per-layer",
            Directions::Tied => "tied",
        }
    }
}

/// `evod run --directions`: rewrites the perplexity model at `model` with
/// its directions `want` (per-layer or tied) when the file says otherwise,
/// before anything loads it. The vector, its fitness and every key stay;
/// it is published atomically as the next generation (strategy `tie` or
/// `untie`) and kept in the history like any generation. Its ES state
/// does not carry over: the evolver starts afresh from the vector (the
/// checkpoint's options differ) and numbers on from the file. Returns
/// whether the file was rewritten.
pub fn apply_directions(
    dir: &Path,
    model: &Path,
    want: Directions,
    history: usize,
) -> anyhow::Result<bool> {
    let opened =
        evod_runtime::Model::open(model).with_context(|| format!("reading {}", model.display()))?;
    let spec = &opened.spec;
    if spec.arch.control_vector_shape().is_none() {
        return Err(exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "--directions applies to a perplexity model's control vector; {} is {}",
                model.display(),
                spec.arch
            ),
        ));
    }
    let tied = want == Directions::Tied;
    if spec.arch.tied_directions() == tied {
        return Ok(false);
    }
    let mut next = spec.clone();
    next.arch = spec.arch.clone().with_tied_directions(tied);
    next.generation = spec.generation + 1;
    next.parent_checksum = Some(opened.file.checksum());
    next.strategy = if tied { "tie" } else { "untie" }.into();
    next.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let params = opened.params()?.into_owned();
    let written = evod_runtime::write_model(model, &next, &params, Some(&opened.file))
        .with_context(|| {
            format!(
                "rewriting {} with {} directions",
                model.display(),
                want.as_str()
            )
        })?;
    drop(opened);
    evod_store::keep_history(dir, model, next.generation, history)?;
    tracing::info!(
        generation = next.generation,
        checksum = format!("{:016x}", written.checksum),
        "{}: directions are {} from generation {} on (the same vector)",
        model.display(),
        want.as_str(),
        next.generation
    );
    Ok(true)
}

/// What `init` needs beyond the common options.
#[derive(Debug, Clone)]
pub struct InitArgs {
    /// The llama.cpp base model.
    pub base_model: PathBuf,
    /// The corpus (UTF-8 text).
    pub text: PathBuf,
    /// Held-out share, in (0, 1).
    pub heldout: f64,
    /// Tokens per window.
    pub window: u32,
    /// Training windows per evaluation (0 = all).
    pub train_windows: u32,
    /// Per-layer or tied directions.
    pub directions: Directions,
    /// Seed recorded in the file.
    pub seed: u64,
    /// Output file.
    pub output: PathBuf,
    /// Overwrite it.
    pub force: bool,
}

/// The shape of a llama.cpp base model, read from its GGUF header with
/// `pread` (no llama.cpp needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShape {
    /// `general.architecture`.
    pub architecture: String,
    /// `{arch}.embedding_length`.
    pub n_embd: usize,
    /// `{arch}.block_count`.
    pub n_layer: usize,
}

/// Reads `path`'s architecture, width and depth; a file that is not a
/// GGUF language model is refused naming it and the missing key.
pub fn base_shape(path: &Path) -> anyhow::Result<BaseShape> {
    let bad = |e: anyhow::Error| exit::with_code(exit::BAD_INPUT, e);
    let reader = GgufReader::open_following(path)
        .with_context(|| format!("base model {}", path.display()))
        .map_err(bad)?;
    let key_str = |key: &str| {
        reader
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                bad(anyhow::anyhow!(
                    "base model {}: no string key {key} (not a llama.cpp language model)",
                    path.display()
                ))
            })
    };
    let architecture = key_str("general.architecture")?;
    if architecture == evod_runtime::arch::CONTROL_VECTOR_NAME
        || architecture == evod_runtime::model::ARCHITECTURE_NAME
    {
        return Err(bad(anyhow::anyhow!(
            "base model {}: general.architecture is {architecture:?}, not a language model",
            path.display()
        )));
    }
    let key_int = |key: String| {
        reader
            .get(&key)
            .and_then(|v| v.as_u64())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                bad(anyhow::anyhow!(
                    "base model {}: no positive integer key {key}",
                    path.display()
                ))
            })
    };
    let n_embd = key_int(format!("{architecture}.embedding_length"))?;
    let n_layer = key_int(format!("{architecture}.block_count"))?;
    if n_layer < 2 {
        return Err(bad(anyhow::anyhow!(
            "base model {}: {n_layer} layer(s); a control vector steers layers 1 to n_layer-1, so it needs at least 2",
            path.display()
        )));
    }
    Ok(BaseShape {
        architecture,
        n_embd,
        n_layer,
    })
}

/// Refuses a control vector whose shape does not fit `base` (naming both).
pub fn check_fits(
    model: &Path,
    arch: &Architecture,
    base: &BaseShape,
    base_path: &Path,
) -> anyhow::Result<()> {
    let Some((n_embd, directions)) = arch.control_vector_shape() else {
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!("{}: not a control vector", model.display()),
        ));
    };
    if n_embd != base.n_embd || directions != base.n_layer - 1 {
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "{}: control vector of {directions} directions of {n_embd} values does not fit the base model {} ({} layers of width {}: it needs {} directions of {})",
                model.display(),
                base_path.display(),
                base.n_layer,
                base.n_embd,
                base.n_layer - 1,
                base.n_embd
            ),
        ));
    }
    Ok(())
}

/// `evod init --task perplexity`.
pub fn init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let usage = |m: String| exit::with_code(exit::USAGE, anyhow::anyhow!(m));
    let bad = |e: evod_runtime::RuntimeError| exit::with_code(exit::BAD_INPUT, e);
    if !(args.heldout > 0.0 && args.heldout < 1.0) {
        return Err(usage(format!(
            "--heldout {} is outside (0, 1): it is the share of the corpus kept for the publish gate",
            args.heldout
        )));
    }
    if !(perplexity::MIN_WINDOW..=perplexity::MAX_WINDOW).contains(&args.window) {
        return Err(usage(format!(
            "--window {} is outside {}..={} tokens",
            args.window,
            perplexity::MIN_WINDOW,
            perplexity::MAX_WINDOW
        )));
    }
    // Absolute paths: the model is evaluated from the daemon's folder.
    let base_model = std::fs::canonicalize(&args.base_model)
        .with_context(|| format!("base model {}", args.base_model.display()))
        .map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    let corpus = std::fs::canonicalize(&args.text)
        .with_context(|| format!("corpus {}", args.text.display()))
        .map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    let shape = base_shape(&base_model)?;
    let bytes = std::fs::read(&corpus)
        .with_context(|| format!("corpus {}", corpus.display()))
        .map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    let corpus_checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
    let corpus_bytes = bytes.len() as u64;
    let text = perplexity::check_text(&corpus, bytes).map_err(bad)?;
    let too_short = |detail: String| {
        exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "{}: the corpus is too short for one training and one held-out window of {} tokens ({detail}); give a longer text, a smaller --window or another --heldout",
                corpus.display(),
                args.window
            ),
        )
    };
    let cut = perplexity::split_point(&text, args.heldout)
        .ok_or_else(|| too_short(format!("{} bytes cannot be split", text.len())))?;
    let (train, heldout) = text.split_at(cut);
    // A token covers at least one byte: a part shorter than a window in
    // bytes cannot hold one in tokens. The exact count needs the tokenizer.
    if train.len() < args.window as usize || heldout.len() < args.window as usize {
        return Err(too_short(format!(
            "{} training and {} held-out bytes",
            train.len(),
            heldout.len()
        )));
    }
    let windows = count_windows(&base_model, &shape, train, heldout, args.window)?;
    if let Some((t, h)) = windows
        && (t == 0 || h == 0)
    {
        return Err(too_short(format!("{t} training and {h} held-out windows")));
    }
    let base_checksum = perplexity::file_checksum(&base_model).map_err(bad)?;
    let arch = Architecture::control_vector(shape.n_embd, shape.n_layer - 1, &shape.architecture)
        .map_err(bad)?
        .with_tied_directions(args.directions == Directions::Tied);
    let spec = ModelSpec::new(arch, Task::Perplexity.name(), args.seed);
    let task = PerplexitySpec {
        base_model: base_model.clone(),
        base_checksum,
        corpus: corpus.clone(),
        corpus_checksum,
        corpus_bytes,
        heldout_start: cut as u64,
        window: args.window,
        train_windows: args.train_windows,
    };
    if args.output.exists() && !args.force {
        return Err(exit::with_code(
            exit::FAILURE,
            anyhow::anyhow!(
                "{} already exists (use --force to overwrite)",
                args.output.display()
            ),
        ));
    }
    let params = vec![0f32; spec.arch.n_params()];
    crate::init::create_parent(&args.output)?;
    let report = write_perplexity_model(&args.output, &spec, &task, &params)?;
    let windows = match windows {
        Some((t, h)) => format!(
            "{t} training and {h} held-out windows of {} tokens",
            args.window
        ),
        None => format!(
            "windows of {} tokens (counted by the worker: this evod was built without the llm feature)",
            args.window
        ),
    };
    println!(
        "wrote {} (perplexity, {}, {} parameters, {} bytes, checksum {:016x}); corpus {}: {} training and {} held-out bytes, {windows}",
        args.output.display(),
        spec.arch,
        params.len(),
        report.bytes,
        report.checksum,
        corpus.display(),
        train.len(),
        heldout.len(),
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a perplexity model: the control vector and both key sets.
fn write_perplexity_model(
    output: &Path,
    spec: &ModelSpec,
    task: &PerplexitySpec,
    params: &[f32],
) -> anyhow::Result<evod_gguf::PublishReport> {
    let mut metadata = spec.metadata();
    metadata.extend(task.metadata());
    let tensors: Vec<evod_gguf::TensorSpec> = spec
        .arch
        .tensor_specs()
        .into_iter()
        .map(|(name, dims)| evod_gguf::TensorSpec {
            name,
            dims,
            ttype: evod_gguf::TensorType::F32,
        })
        .collect();
    let ranges = spec.arch.tensor_ranges();
    let report = evod_gguf::publish(
        output,
        &metadata,
        &tensors,
        |i, w| {
            let (at, len) = ranges[i];
            let mut buf = Vec::with_capacity(len * 4);
            for v in &params[at..at + len] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf)
        },
        &evod_gguf::PublishOptions::default(),
    )
    .map_err(|e| exit::with_code(exit::IO, e))
    .with_context(|| format!("cannot write {}", output.display()))?;
    Ok(report)
}

/// Training and held-out windows of the corpus (with llama.cpp's
/// tokenizer; `None` without the `llm` feature). A base llama.cpp cannot
/// load is refused here, naming it and llama.cpp's reason.
#[cfg(feature = "llm")]
fn count_windows(
    base_model: &Path,
    shape: &BaseShape,
    train: &str,
    heldout: &str,
    window: u32,
) -> anyhow::Result<Option<(usize, usize)>> {
    let base = load_base(base_model, window)?;
    if base.n_embd() != shape.n_embd || base.n_layer() != shape.n_layer {
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "base model {}: llama.cpp reads {} layers of width {}, its header says {} of {}",
                base_model.display(),
                base.n_layer(),
                base.n_embd(),
                shape.n_layer,
                shape.n_embd
            ),
        ));
    }
    let tokens = |t: &str| {
        base.tokenize(t)
            .with_context(|| format!("tokenizing the corpus with {}", base_model.display()))
            .map_err(|e| exit::with_code(exit::BAD_INPUT, e))
    };
    Ok(Some((
        perplexity::windows(tokens(train)?.len(), window),
        perplexity::windows(tokens(heldout)?.len(), window),
    )))
}

#[cfg(not(feature = "llm"))]
fn count_windows(
    _: &Path,
    _: &BaseShape,
    _: &str,
    _: &str,
    _: u32,
) -> anyhow::Result<Option<(usize, usize)>> {
    Ok(None)
}

/// Loads `path` in llama.cpp with a context of one `window`.
#[cfg(feature = "llm")]
fn load_base(path: &Path, window: u32) -> anyhow::Result<evod_llama::BaseModel> {
    evod_llama::route_logs_to_tracing();
    let opts = llama_options(window);
    evod_llama::BaseModel::load(path, &opts).map_err(|e| exit::with_code(exit::BAD_INPUT, e))
}

/// How stale a perplexity worker's heartbeat may get before the evolver
/// calls it lost and re-sends its request (the ring's default is 2 s; this
/// is the supervisor's default watchdog, which ends a worker past it).
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The llama.cpp options of a worker scoring windows of `window` tokens:
/// one thread per worker (evod runs one worker per core; ggml's threads
/// spin at barriers and stall when cores are shared: `docs/llm.md`;
/// `EVOD_LLAMA_THREADS` overrides it), a context of one window, decoded
/// a whole window per `llama_decode`: the worker's heartbeat is beaten from
/// inside the decode (evod-llama's `nll` runs its `beat` from llama.cpp's
/// abort callback, between graph nodes), so a long decode on a busy core
/// does not make the supervisor call the worker lost.
#[cfg(feature = "llm")]
pub fn llama_options(window: u32) -> evod_llama::LlamaOptions {
    let threads = std::env::var("EVOD_LLAMA_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    evod_llama::LlamaOptions {
        threads,
        n_ctx: window,
        n_batch: window,
        ..evod_llama::LlamaOptions::default()
    }
}

/// Whether the model at `path` is of the perplexity task (read with the
/// trusted reader; an unreadable file says no: its own error comes later).
pub fn is_perplexity_model(path: &Path) -> bool {
    evod_gguf::GgufHeader::read(path).is_ok_and(|h| {
        h.get(evod_runtime::model::keys::TASK)
            .and_then(|v| v.as_str())
            == Some(evod_runtime::task::PERPLEXITY)
    })
}

/// `evod run` on a perplexity model, before anything starts: a build
/// without llama.cpp exits 2; the base model or corpus missing or changed
/// since `init`, or a vector that does not fit the base, exits 3 naming the
/// file.
pub fn check_run(model: &Path, worker_cmd: bool) -> anyhow::Result<()> {
    if worker_cmd || !is_perplexity_model(model) {
        return Ok(());
    }
    if !evod_llama::BUILT {
        return Err(exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "{}: the model's task is perplexity (a llama.cpp control vector), but this evod was built without the llm feature: rebuild with `cargo build --release -p evod --features llm`",
                model.display()
            ),
        ));
    }
    let bad = |e: evod_runtime::RuntimeError| exit::with_code(exit::BAD_INPUT, e);
    let reader = GgufReader::open(model).map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    let spec = ModelSpec::from_header(reader.header(), model).map_err(bad)?;
    let task = PerplexitySpec::from_header(reader.header(), model).map_err(bad)?;
    task.check_base().map_err(bad)?;
    task.read_corpus().map_err(bad)?;
    let shape = base_shape(&task.base_model)?;
    check_fits(model, &spec.arch, &shape, &task.base_model)
}

#[cfg(feature = "llm")]
pub use handler::serve_worker;

#[cfg(feature = "llm")]
mod handler {
    use super::*;
    use evod_serve::{EvalRequest, Handler, Purpose, ServedModel};

    /// What a worker keeps across candidates: the base model and its one
    /// context, the corpus's windows.
    struct State {
        /// Identity of what was loaded: (base checksum, corpus checksum,
        /// heldout start, window).
        key: (u64, u64, u64, u32),
        base: evod_llama::BaseModel,
        window: usize,
        train_windows: u32,
        /// Training windows, each `window` tokens.
        train: Vec<Vec<i32>>,
        /// Held-out windows, each `window` tokens, end to end.
        heldout: Vec<i32>,
        /// Reused buffer of the windows one training request scores.
        picked: Vec<i32>,
    }

    /// `evod-serve`'s [`Handler`] for the perplexity task.
    #[derive(Default)]
    pub struct PerplexityHandler {
        state: Option<State>,
        /// Loading as a standby, before promotion ([`Self::preload`]).
        standing_by: bool,
    }

    impl PerplexityHandler {
        /// A standby's preload: the base model, its context and the
        /// corpus's windows for the model at `path`, before the standby
        /// says ready, so that a promoted standby serves at once (the
        /// `load` of the model at promotion finds them in place: the same
        /// base, corpus, split and window). A failure is logged and
        /// nothing kept: the load is tried again at promotion, where its
        /// error is reported as a cold start's is.
        pub fn preload(&mut self, path: &Path) {
            let model = match evod_runtime::Model::open_for_serving(path) {
                Ok(model) => model,
                Err(e) => {
                    tracing::warn!("standby: cannot preload {}: {e}", path.display());
                    return;
                }
            };
            let served = ServedModel {
                path: path.to_owned(),
                model,
                checksum: 0,
            };
            self.standing_by = true;
            let loaded = self.load(&served);
            self.standing_by = false;
            if let Err(e) = loaded {
                tracing::warn!("standby: cannot preload {}: {e}", path.display());
            }
        }
    }

    fn windows_of(tokens: &[i32], window: usize) -> Vec<Vec<i32>> {
        tokens.chunks_exact(window).map(<[i32]>::to_vec).collect()
    }

    impl Handler for PerplexityHandler {
        fn load(&mut self, model: &ServedModel) -> Result<(), String> {
            let mut task = PerplexitySpec::from_header(&model.model.file, &model.path)
                .map_err(|e| e.to_string())?;
            // An evaluator host's own copies (`evod join --base-model
            // --text`), checked against the recorded checksums below.
            relocate(&mut task, &host_files_from_env());
            let key = (
                task.base_checksum,
                task.corpus_checksum,
                task.heldout_start,
                task.window,
            );
            if self.state.as_ref().is_none_or(|s| s.key != key) {
                self.state = None;
                task.check_base().map_err(|e| e.to_string())?;
                let corpus = task.read_corpus().map_err(|e| e.to_string())?;
                let base =
                    load_base(&task.base_model, task.window).map_err(|e| format!("{e:#}"))?;
                let window = task.window as usize;
                let tok = |t: &str| {
                    base.tokenize(t)
                        .map_err(|e| format!("tokenizing {}: {e}", task.corpus.display()))
                };
                let train = windows_of(&tok(&corpus.train)?, window);
                // Full windows only, as in training. Scoring the last
                // partial one too (tried: the bench's held-out figure is
                // every token) made the gate's request longer than the
                // other worker's share of a generation, 10.5 windows of
                // work in 5.5 of wall (docs/llm.md).
                let heldout: Vec<i32> = windows_of(&tok(&corpus.heldout)?, window).concat();
                if train.is_empty() || heldout.is_empty() {
                    return Err(format!(
                        "{}: too short for one training and one held-out window of {window} tokens ({} and {})",
                        task.corpus.display(),
                        train.len(),
                        heldout.len() / window
                    ));
                }
                // Once per process and base: a promoted standby, which
                // loaded before its promotion, does not say it again.
                tracing::info!(
                    pid = std::process::id(),
                    standby = self.standing_by,
                    base = %task.base_model.display(),
                    train_windows = train.len(),
                    heldout_windows = heldout.len() / window,
                    window,
                    "perplexity worker ready"
                );
                self.state = Some(State {
                    key,
                    base,
                    window,
                    train_windows: task.train_windows,
                    train,
                    heldout,
                    picked: Vec::new(),
                });
            }
            // Not part of the key (no reload needed): refreshed on every load.
            let state = self.state.as_mut().expect("set above");
            state.train_windows = task.train_windows;
            let state = &*state;
            let want = state.base.cvec_len();
            if model.arch().n_params() != want
                || model.arch().control_vector_shape().map(|(w, _)| w) != Some(state.base.n_embd())
            {
                return Err(format!(
                    "{}: control vector of {} values ({}) does not fit the base model {} (n_embd {} x {} layers after the first = {want})",
                    model.path.display(),
                    model.arch().n_params(),
                    model.arch(),
                    task.base_model.display(),
                    state.base.n_embd(),
                    state.base.n_layer() - 1
                ));
            }
            Ok(())
        }

        fn eval(
            &mut self,
            _model: &ServedModel,
            request: &EvalRequest<'_>,
        ) -> Result<Vec<f64>, String> {
            let state = self
                .state
                .as_mut()
                .ok_or_else(|| "the perplexity worker has no base model loaded".to_owned())?;
            let tokens: &[i32] = match request.purpose {
                Purpose::Gate => &state.heldout,
                Purpose::Train => {
                    let pick = perplexity::train_subset(
                        state.train.len(),
                        state.train_windows,
                        request.seed,
                    );
                    state.picked.clear();
                    for i in pick {
                        state.picked.extend_from_slice(&state.train[i]);
                    }
                    &state.picked
                }
            };
            let mut out = Vec::with_capacity(request.candidates);
            for i in 0..request.candidates {
                // A candidate whose values or logits are not finite is a bad
                // candidate, not a failed evaluation: its fitness is NaN,
                // which ranks last (evod-serve sends it as -inf), and the
                // batch goes on (an
                // error here would fail the whole EVAL, and the retried
                // generation would hit the same candidate again).
                match state.base.set_control_vector(Some(request.candidate(i))) {
                    Ok(()) => {}
                    Err(evod_llama::LlamaError::CvecNotFinite { index, value }) => {
                        tracing::warn!(candidate = i, index, value, "candidate not finite");
                        out.push(f64::NAN);
                        continue;
                    }
                    Err(e) => return Err(e.to_string()),
                }
                match state.base.nll(tokens, state.window, &mut || request.beat()) {
                    Ok(nll) => {
                        // Every token of the windows went through
                        // `llama_decode` (the first of each is decoded, not
                        // scored): the daemon's throughput, as the bench
                        // compares it with bare llama.cpp.
                        request.count_tokens(tokens.len() as u64);
                        out.push(-nll.perplexity());
                    }
                    Err(e @ evod_llama::LlamaError::NonFiniteLogits { .. }) => {
                        tracing::warn!(candidate = i, "{e}");
                        out.push(f64::NAN);
                    }
                    Err(e) => return Err(e.to_string()),
                }
                request.beat();
            }
            Ok(out)
        }

        fn exec(
            &mut self,
            model: &ServedModel,
            _inputs: &[f32],
            _batch: usize,
        ) -> Result<Vec<f32>, String> {
            Err(format!(
                "{} is a control vector: it has no forward pass of its own (NEURAL_EXEC is for evod's MLPs)",
                model.path.display()
            ))
        }
    }

    /// `evod worker` on a perplexity model: `evod-serve`'s loop with
    /// [`PerplexityHandler`]. A standby first loads the base model, its
    /// context and the corpus ([`PerplexityHandler::preload`]), then says
    /// ready and waits for its promotion: the model load is off the
    /// recovery path.
    pub fn serve_worker(args: &crate::worker::Args) -> anyhow::Result<ExitCode> {
        // The daemon's log, in its format: llama.cpp's warnings and errors
        // (routed into `tracing`) and the handler's own lines reach it.
        evod_supervisor::init_logging(match std::env::var("EVOD_LOG_FORMAT").as_deref() {
            Ok("json") => evod_supervisor::LogFormat::Json,
            _ => evod_supervisor::LogFormat::Human,
        });
        evod_llama::route_logs_to_tracing();
        let mut handler = PerplexityHandler::default();
        if let Some(fd) = args.standby_fd {
            evod_supervisor::set_process_name(c"evod-standby");
            if let Some(path) = args.model.as_deref() {
                handler.preload(path);
            }
            if crate::worker::stand_by(fd, args.model.as_deref())?.is_none() {
                return Ok(ExitCode::SUCCESS);
            }
        }
        evod_supervisor::set_process_name(c"evod-worker");
        // SAFETY: `--ring-fd` names the descriptor the supervisor passed
        // for the segment; nothing else in this process owns it, and it is
        // taken over once, here.
        let seg = unsafe { evod_serve::attach(args.ring_fd) }?;
        evod_serve::serve(&seg, args.model.as_deref(), &mut handler)?;
        Ok(ExitCode::SUCCESS)
    }
}
