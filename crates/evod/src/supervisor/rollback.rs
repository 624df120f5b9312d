//! The model file as the supervisor sees it: its identity (generation and
//! checksum), the history beside it, and rollback.
//!
//! The history is `DIR/history/`; any `*.gguf` file there whose
//! `evod.generation` key can be read counts, whatever its name (the evolver
//! names them). A rollback validates the chosen file, sets the bad
//! generation aside in `DIR/history/quarantine/` (a hard link of the live
//! file, and the history copies moved there), then publishes the chosen
//! generation through the same atomic path as a new one
//! (`evod_gguf::rewrite`: temporary file, fsync, rename, folder fsync).

use std::path::{Path, PathBuf};

use anyhow::Context;
use evod_gguf::{GgufFile, PublishOptions};

use crate::exit;

/// The metadata key holding a model's generation number.
pub const GENERATION_KEY: &str = "evod.generation";

/// `DIR/history`.
pub fn history_dir(dir: &Path) -> PathBuf {
    dir.join("history")
}

/// `DIR/history/quarantine`.
pub fn quarantine_dir(dir: &Path) -> PathBuf {
    history_dir(dir).join("quarantine")
}

fn generation_of(file: &GgufFile) -> Option<u64> {
    file.get(GENERATION_KEY).and_then(|v| v.as_u64())
}

/// Validates the model at start; a missing or malformed file is an error
/// with exit code 3. Returns its generation.
pub fn check_model(model: &Path) -> anyhow::Result<Option<u64>> {
    if !model.exists() {
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "no model at {}; create one with `evod init` or pass --dir",
                model.display()
            ),
        ));
    }
    let file = GgufFile::open(model)?;
    Ok(generation_of(&file))
}

/// Generation and checksum of a model file (validated).
pub fn identify(model: &Path) -> Result<(Option<u64>, u64), evod_gguf::GgufError> {
    let file = GgufFile::open(model)?;
    Ok((generation_of(&file), file.checksum()))
}

/// Every readable generation in the history: (generation, file), sorted.
pub fn history(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(history_dir(dir)) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf") && p.is_file())
        .filter_map(|p| {
            let g = generation_of(&GgufFile::open(&p).ok()?)?;
            Some((g, p))
        })
        .collect();
    out.sort();
    out
}

/// The generation to roll back to from `live`: `good` if the history holds
/// it, else the newest one older than `live`.
pub fn previous_generation(dir: &Path, live: u64, good: Option<u64>) -> Option<u64> {
    let history = history(dir);
    if let Some(g) = good
        && g != live
        && history.iter().any(|(h, _)| *h == g)
    {
        return Some(g);
    }
    history.iter().rev().map(|(g, _)| *g).find(|g| *g < live)
}

/// Publishes generation `to` from the history over `model`; with
/// `quarantine`, first sets that (bad) generation aside. Returns `to`.
pub fn restore(dir: &Path, model: &Path, to: u64, quarantine: Option<u64>) -> anyhow::Result<u64> {
    let history = history(dir);
    let Some((_, source)) = history.iter().find(|(g, _)| *g == to) else {
        let known: Vec<u64> = history.iter().map(|(g, _)| *g).collect();
        anyhow::bail!(
            "generation {to} is not in {} (it holds {known:?})",
            history_dir(dir).display()
        );
    };
    let file = GgufFile::open(source)?;
    // What is rolled back from, for the evolver (see `rollback_marker`).
    let from = evod_runtime::Model::open_for_serving(model)
        .and_then(|m| Ok(params_hash(&m.params()?)))
        .ok();
    if let Some(bad) = quarantine {
        let qdir = quarantine_dir(dir);
        std::fs::create_dir_all(&qdir)
            .with_context(|| format!("cannot create {}", qdir.display()))?;
        let aside = qdir.join(format!("gen-{bad}.gguf"));
        let _ = std::fs::remove_file(&aside);
        if let Err(e) = std::fs::hard_link(model, &aside) {
            std::fs::copy(model, &aside).with_context(|| {
                format!(
                    "cannot set {} aside as {} ({e})",
                    model.display(),
                    aside.display()
                )
            })?;
        }
        for (g, path) in &history {
            if *g == bad
                && let Some(name) = path.file_name()
            {
                let _ = std::fs::rename(path, qdir.join(name));
            }
        }
        tracing::warn!("generation {bad} quarantined in {}", aside.display());
    }
    evod_gguf::rewrite(&file, model, |_| {}, &PublishOptions::default())
        .with_context(|| format!("cannot publish generation {to} at {}", model.display()))?;
    mark_rollback(dir, to, from);
    Ok(to)
}

/// xxh3 of parameters as little-endian f32 bytes: identifies a model's
/// weights whatever its metadata.
pub fn params_hash(params: &[f32]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = Vec::with_capacity(4 * 4096);
    for chunk in params.chunks(4096) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
    h.digest()
}

/// The rollback marker, as the evolver reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackMark {
    /// The generation restored.
    pub to: u64,
    /// [`params_hash`] of the model rolled back from, if it could be read.
    pub from: Option<u64>,
}

/// Reads the rollback marker of `dir`, if any.
pub fn read_rollback_marker(dir: &Path) -> Option<RollbackMark> {
    let text = std::fs::read_to_string(rollback_marker(dir)).ok()?;
    let mut words = text.split_whitespace();
    let to = words.next()?.parse().ok()?;
    let from = words.next().and_then(|w| u64::from_str_radix(w, 16).ok());
    Some(RollbackMark { to, from })
}

/// `DIR/state/rolled-back-to`: the generation the live file was rolled back
/// to, and the parameters hash of the model rolled back from. The evolver
/// reads it at start: its checkpoint may still count that model as
/// published, and it must not come back as a "lost publish"
/// (`evolver::lost_publish`); any other missing publish still is one.
pub fn rollback_marker(dir: &Path) -> PathBuf {
    dir.join("state").join("rolled-back-to")
}

/// Writes the rollback marker (atomically: temporary file and rename). A
/// failure is logged: without the marker the evolver may republish the
/// generation rolled back from, which the next rollback handles.
fn mark_rollback(dir: &Path, to: u64, from: Option<u64>) {
    let path = rollback_marker(dir);
    let tmp = path.with_extension("tmp");
    let text = match from {
        Some(h) => format!("{to} {h:016x}\n"),
        None => format!("{to}\n"),
    };
    let result = std::fs::create_dir_all(dir.join("state"))
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        tracing::error!("cannot write {}: {e}", path.display());
    }
}
