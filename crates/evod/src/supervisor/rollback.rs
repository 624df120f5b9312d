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
    mark_rollback(dir, to);
    Ok(to)
}

/// `DIR/state/rolled-back-to`: the generation the live file was rolled back
/// to. The evolver reads it at start: its checkpoint still counts the newer
/// generations as published, and they must not come back as "lost
/// publishes" (`evolver::lost_publish`).
pub fn rollback_marker(dir: &Path) -> PathBuf {
    dir.join("state").join("rolled-back-to")
}

/// Writes the rollback marker (atomically: temporary file and rename). A
/// failure is logged: without the marker the evolver may republish the
/// generation rolled back from, which the next rollback handles.
fn mark_rollback(dir: &Path, to: u64) {
    let path = rollback_marker(dir);
    let tmp = path.with_extension("tmp");
    let result = std::fs::create_dir_all(dir.join("state"))
        .and_then(|()| std::fs::write(&tmp, format!("{to}\n")))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        tracing::error!("cannot write {}: {e}", path.display());
    }
}
