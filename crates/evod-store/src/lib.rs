//! The model store of a state folder `DIR`: the files both the supervisor
//! and the evolver read and write beside the live model.
//!
//! - the live file's identity: [`file_identity`] (device, inode: published
//!   files are replaced by rename, never rewritten), [`params_hash`] (the
//!   weights, whatever the metadata);
//! - the history `DIR/history/`: any `*.gguf` file there whose
//!   `evod.generation` key can be read counts, whatever its name
//!   ([`history`], [`previous_generation`]); the evolver links each published
//!   file in as `gen-NNNNNNNN.gguf` and keeps the newest K
//!   ([`keep_history`]);
//! - the quarantine `DIR/history/quarantine/` ([`read_quarantine`]);
//! - the rollback marker `DIR/state/rolled-back-to` ([`rollback_marker`]);
//! - [`restore`]: validates the chosen file, sets the bad generation aside in
//!   the quarantine (a hard link of the live file, and the history copies
//!   moved there), then publishes the chosen generation through the same
//!   atomic path as a new one (`evod_gguf::publish`: temporary file, fsync,
//!   rename, folder fsync), copying its metadata and tensor bytes as they
//!   are.
//!
//! Everything here reads model files with `pread` (`evod_gguf::GgufReader`,
//! `evod_runtime::read_params`), never through a memory map: the supervisor
//! (PID 1 in a container) calls it, and a mapped file truncated or rewritten
//! in place meanwhile would kill it with SIGBUS. A file that shrinks while
//! read is a typed error instead.
//!
//! Whether and when to roll back is the supervisor's decision; this crate
//! only does it.

#![deny(missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use evod_gguf::{GgufReader, PublishOptions, TensorSpec};

/// The live model's file name inside the state folder.
pub const MODEL_FILE: &str = "vectorland.gguf";

/// What went wrong in the store. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The generation asked for is not in the history.
    #[error("generation {to} is not in {} (it holds {known:?})", dir.display())]
    NotInHistory {
        /// The generation asked for.
        to: u64,
        /// The history folder.
        dir: PathBuf,
        /// The generations it holds.
        known: Vec<u64>,
    },
    /// A model file did not open or validate.
    #[error(transparent)]
    Gguf(#[from] evod_gguf::GgufError),
    /// A history file is not a model evod can run.
    #[error("generation {to} in the history is not a usable model")]
    Model {
        /// The generation.
        to: u64,
        /// Why (names the file).
        source: evod_runtime::RuntimeError,
    },
    /// Publishing the restored generation failed.
    #[error("cannot publish generation {to} at {}", model.display())]
    Publish {
        /// The generation.
        to: u64,
        /// The live model file.
        model: PathBuf,
        /// Why.
        source: evod_gguf::GgufError,
    },
    /// A file-system step failed.
    #[error("{what}")]
    Io {
        /// The step, naming its files.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// (device, inode) of the file at `path` (symlinks followed), if it exists.
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// (device, inode) of the directory entry at `path` itself (a symlink is
/// not followed), if it exists.
pub fn entry_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the entry at `path` if it is still the one with identity `id`
/// ([`entry_identity`]): a file replaced since is left alone. Returns
/// whether it removed it.
pub fn remove_if_same(path: &Path, id: (u64, u64)) -> bool {
    entry_identity(path) == Some(id) && std::fs::remove_file(path).is_ok()
}

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

/// The generation a model file's header names (a mapped `GgufFile` or a
/// `GgufReader` deref to one).
pub fn generation_of(header: &evod_gguf::GgufHeader) -> Option<u64> {
    header.get(GENERATION_KEY).and_then(|v| v.as_u64())
}

/// Every readable generation in the history: (generation, file), sorted.
/// Reads each file's header with `pread` (no mapping: the supervisor calls
/// this, and a mapped file truncated meanwhile would kill it with SIGBUS).
pub fn history(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(history_dir(dir)) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf") && p.is_file())
        .filter_map(|p| {
            let g = generation_of(&evod_gguf::GgufHeader::read(&p).ok()?)?;
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
pub fn restore(
    dir: &Path,
    model: &Path,
    to: u64,
    quarantine: Option<u64>,
) -> Result<u64, StoreError> {
    let history = history(dir);
    let Some((_, source)) = history.iter().find(|(g, _)| *g == to) else {
        return Err(StoreError::NotInHistory {
            to,
            dir: history_dir(dir),
            known: history.iter().map(|(g, _)| *g).collect(),
        });
    };
    // Validated as a model, read with pread (no mapping, see the module
    // documentation); then copied from a reader of the same kind below.
    evod_runtime::read_params(source).map_err(|source| StoreError::Model { to, source })?;
    let reader = GgufReader::open(source)?;
    // What is rolled back from, for the evolver (see `rollback_marker`).
    // Read, not mapped: the live file may be truncated in place meanwhile,
    // and this runs in the supervisor.
    let from = evod_runtime::read_params(model)
        .map(|(_, params)| params_hash(&params))
        .ok();
    if let Some(bad) = quarantine {
        let qdir = quarantine_dir(dir);
        std::fs::create_dir_all(&qdir).map_err(|source| StoreError::Io {
            what: format!("cannot create {}", qdir.display()),
            source,
        })?;
        let aside = qdir.join(format!("gen-{bad}.gguf"));
        let _ = std::fs::remove_file(&aside);
        if let Err(e) = std::fs::hard_link(model, &aside) {
            std::fs::copy(model, &aside).map_err(|source| StoreError::Io {
                what: format!(
                    "cannot set {} aside as {} ({e})",
                    model.display(),
                    aside.display()
                ),
                source,
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
    // The marker first: a stop or crash between the two must not leave the
    // restored file without it (the evolver would take the generation
    // rolled back from as a lost publish and publish it again, undoing
    // the rollback). A marker whose rewrite then fails is inert: the
    // evolver honours it only while the live file is generation `to`.
    mark_rollback(dir, to, from);
    copy_model(&reader, model).map_err(|source| StoreError::Publish {
        to,
        model: model.to_owned(),
        source,
    })?;
    Ok(to)
}

/// Publishes a copy of `reader`'s file at `target`, keeping every key, value
/// type, key order, tensor order, alignment and tensor byte: what
/// `evod_gguf::rewrite` writes, but each tensor read with `pread`. A source
/// that shrinks meanwhile fails with its own `ShortRead` (naming the source),
/// and the target is left as it was.
fn copy_model(reader: &GgufReader, target: &Path) -> Result<(), evod_gguf::GgufError> {
    let specs: Vec<TensorSpec> = reader.tensors().iter().map(TensorSpec::from).collect();
    let opts = PublishOptions {
        alignment: reader.alignment(),
        ..PublishOptions::default()
    };
    // The callback can only return an io::Error: keep the typed read error
    // aside and return it instead of publish's.
    let mut read_error = None;
    let result = evod_gguf::publish(
        target,
        reader.metadata(),
        &specs,
        |i, w| match reader.read_tensor(&reader.tensors()[i]) {
            Ok(bytes) => w.write_all(&bytes),
            Err(e) => {
                let message = e.to_string();
                read_error = Some(e);
                Err(std::io::Error::other(message))
            }
        },
        &opts,
    );
    match (result, read_error) {
        (_, Some(e)) => Err(e),
        (result, None) => result.map(|_| ()),
    }
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
/// (the evolver's `lost_publish`); any other missing publish still is one.
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

/// The name of generation `generation`'s link in `DIR/history`.
pub fn history_name(generation: u64) -> String {
    format!("gen-{generation:08}.gguf")
}

/// The generation in a [`history_name`] (`gen-N.gguf`, any number of
/// digits), if `name` is one.
fn history_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("gen-")?.strip_suffix(".gguf")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Links the live file `model` (of generation `generation`) into
/// `DIR/history` and keeps the newest `keep` (at least one) of the
/// `gen-N.gguf` links there, ordered by N.
pub fn keep_history(
    dir: &Path,
    model: &Path,
    generation: u64,
    keep: usize,
) -> Result<(), StoreError> {
    let history = history_dir(dir);
    let link = history.join(history_name(generation));
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(model, &link).map_err(|source| StoreError::Io {
        what: format!("linking {} into {}", model.display(), history.display()),
        source,
    })?;
    // Oldest first by the number in the name, not the name: `gen-{:08}`
    // grows a ninth digit past 99,999,999, and "gen-100000000" sorts before
    // "gen-99999999" as text.
    let mut generations: Vec<(u64, PathBuf)> = std::fs::read_dir(&history)
        .map_err(|source| StoreError::Io {
            what: format!("reading {}", history.display()),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = history_number(p.file_name()?.to_str()?)?;
            Some((n, p))
        })
        .collect();
    generations.sort();
    let excess = generations.len().saturating_sub(keep.max(1));
    for (_, old) in &generations[..excess] {
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

/// The quarantined generations in `DIR/history/quarantine` that can be read
/// as models: (generation, [`params_hash`]). One that cannot is logged and
/// skipped.
pub fn read_quarantine(dir: &Path) -> Vec<(u64, u64)> {
    let qdir = quarantine_dir(dir);
    let Ok(entries) = std::fs::read_dir(&qdir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "gguf") {
            continue;
        }
        match evod_runtime::read_params(&path)
            .map(|(spec, params)| (spec.generation, params_hash(&params)))
        {
            Ok(entry) => out.push(entry),
            Err(e) => tracing::warn!("cannot read quarantined {}: {e}", path.display()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use evod_runtime::{ModelSpec, Task, init_params, write_model};

    /// Writes a CartPole model of `generation` (weights from `seed`) at `path`.
    fn model(path: &Path, generation: u64, seed: u64) -> Vec<f32> {
        let task = Task::CartPole { episodes: 1 };
        let arch = task.default_arch(evod_runtime::Activation::Tanh);
        let params = init_params(&arch, seed);
        let mut spec = ModelSpec::new(arch, task.name(), seed);
        spec.generation = generation;
        write_model(path, &spec, &params, None).unwrap();
        params
    }

    #[test]
    fn history_keeps_the_newest_k_and_restore_quarantines_the_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let live = dir.join(MODEL_FILE);
        std::fs::create_dir_all(history_dir(dir)).unwrap();
        for g in 1..=4 {
            model(&live, g, g);
            keep_history(dir, &live, g, 3).unwrap();
        }
        let kept: Vec<u64> = history(dir).iter().map(|(g, _)| *g).collect();
        assert_eq!(kept, [2, 3, 4]);
        assert_eq!(previous_generation(dir, 4, None), Some(3));
        assert_eq!(previous_generation(dir, 4, Some(2)), Some(2));

        let bad = params_hash(&model(&live, 4, 4));
        let three = std::fs::read(history_dir(dir).join(history_name(3))).unwrap();
        assert_eq!(restore(dir, &live, 3, Some(4)).unwrap(), 3);
        assert!(
            std::fs::read(&live).unwrap() == three,
            "the restored file is byte-identical to the history's"
        );
        let quarantined = read_quarantine(dir);
        // The live file set aside, and the history's copy moved beside it.
        assert_eq!(quarantined, [(4, bad), (4, bad)]);
        let kept: Vec<u64> = history(dir).iter().map(|(g, _)| *g).collect();
        assert_eq!(kept, [2, 3], "the bad generation left the history");
        assert_eq!(
            read_rollback_marker(dir),
            Some(RollbackMark {
                to: 3,
                from: Some(bad)
            })
        );
        let err = restore(dir, &live, 9, None).unwrap_err().to_string();
        assert!(
            err.contains("generation 9 is not in") && err.contains("[2, 3]"),
            "{err}"
        );
    }

    #[test]
    fn an_entry_replaced_since_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        std::fs::write(&path, "a").unwrap();
        let old = entry_identity(&path).unwrap();
        std::fs::write(dir.path().join("new"), "b").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert!(!remove_if_same(&path, old));
        assert!(path.exists());
        let now = file_identity(&path).unwrap();
        assert!(remove_if_same(&path, now));
        assert!(!path.exists());
    }

    #[test]
    fn a_history_file_truncated_in_place_is_an_error_not_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let live = dir.join(MODEL_FILE);
        std::fs::create_dir_all(history_dir(dir)).unwrap();
        for g in 1..=2 {
            model(&live, g, g);
            keep_history(dir, &live, g, 3).unwrap();
        }
        let live_bytes = std::fs::read(&live).unwrap();

        // Truncated while the restore runs: after its header was read, before
        // its tensors are. Through a mapping, the copy would die of SIGBUS.
        let source = history_dir(dir).join(history_name(1));
        let reader = GgufReader::open(&source).unwrap();
        let len = std::fs::metadata(&source).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&source)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = copy_model(&reader, &live).unwrap_err();
        assert!(
            matches!(&err, evod_gguf::GgufError::ShortRead { path, .. } if *path == source),
            "{err}"
        );
        assert!(
            std::fs::read(&live).unwrap() == live_bytes,
            "live untouched"
        );

        // A GGUF file that names a generation but is no model: refused
        // before anything is quarantined or published.
        let odd = history_dir(dir).join("odd.gguf");
        evod_gguf::publish(
            &odd,
            &[(GENERATION_KEY.to_owned(), evod_gguf::Value::U64(7))],
            &[],
            |_, _| Ok(()),
            &PublishOptions::default(),
        )
        .unwrap();
        let err = restore(dir, &live, 7, Some(2)).unwrap_err();
        assert!(matches!(err, StoreError::Model { to: 7, .. }), "{err}");
        assert!(read_quarantine(dir).is_empty());
        assert!(
            std::fs::read(&live).unwrap() == live_bytes,
            "live untouched"
        );

        // Truncated before: its header no longer fits the file, so it does
        // not count as history, and restoring it is refused.
        let err = restore(dir, &live, 1, None).unwrap_err();
        assert!(
            matches!(err, StoreError::NotInHistory { to: 1, .. }),
            "{err}"
        );
        assert!(
            std::fs::read(&live).unwrap() == live_bytes,
            "live untouched"
        );
        assert_eq!(read_rollback_marker(dir), None);
    }

    #[test]
    fn pruning_orders_history_links_by_number_past_eight_digits() {
        assert_eq!(history_number("gen-00000007.gguf"), Some(7));
        assert_eq!(history_number("gen-100000000.gguf"), Some(100_000_000));
        assert_eq!(history_number("gen-.gguf"), None);
        assert_eq!(history_number("gen-+1.gguf"), None);
        assert_eq!(history_number("gen-1.gguf.tmp"), None);

        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let live = dir.join(MODEL_FILE);
        std::fs::create_dir_all(history_dir(dir)).unwrap();
        let gens = [99_999_998, 99_999_999, 100_000_000, 100_000_001];
        for g in gens {
            model(&live, g, 1);
            keep_history(dir, &live, g, 2).unwrap();
        }
        let kept: Vec<u64> = history(dir).iter().map(|(g, _)| *g).collect();
        assert_eq!(kept, [100_000_000, 100_000_001]);
    }
}
