//! The progress log `state/progress.csv` as the evolver keeps it
//! ([`ProgressLog`]): one appended row per generation, bounded by thinning
//! ([`crate::report::thin`]) when it reaches 3 × `--progress-keep`
//! rows, so a run of months keeps a file of a few megabytes that
//! `evod report` still draws whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::report::{PROGRESS_HEADER, Row, parse_progress, thin};

/// The open progress log.
pub struct ProgressLog {
    path: PathBuf,
    /// `None` while the file cannot even be opened (the next append tries
    /// again).
    file: Option<std::fs::File>,
    /// Rows in the file (an estimate when a rewrite failed: the next
    /// thinning counts them exactly).
    rows: usize,
    /// Rows kept at full resolution.
    keep: usize,
}

impl ProgressLog {
    /// Opens the log at `path` for appending, after rewriting it to hold
    /// only well-formed rows of generations before `resume_at` (a resumed
    /// run replays the generations after its checkpoint and writes them
    /// again, and a killed evolver may have left a torn last line), thinned
    /// to `keep`.
    ///
    /// Never fails: a failing disk (full, read-only) is logged and the log
    /// opened for appending as it is, or not at all until the next append.
    /// The log matters less than the evolver: a fatal error here would
    /// make every start fail and the supervisor give up on the daemon.
    pub fn open(path: &Path, resume_at: u64, keep: u64) -> ProgressLog {
        let keep = usize::try_from(keep).unwrap_or(usize::MAX).max(1);
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let rows = thin(&well_formed(path, &old, resume_at), keep);
        let (file, count) = match rewrite(path, &rows) {
            Ok(file) => (Some(file), rows.len()),
            Err(e) => {
                tracing::error!(
                    "rewriting the progress log failed, appending to it as it is: {e:#}"
                );
                (append_to(path, &old), old.lines().count().saturating_sub(1))
            }
        };
        ProgressLog {
            path: path.to_owned(),
            file,
            rows: count,
            keep,
        }
    }

    /// Appends `row`: one write (a killed evolver leaves at most a torn last
    /// line, which the next start drops); thins the file when it is full.
    pub fn append(&mut self, row: &Row) -> Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                open_append(&self.path)
                    .with_context(|| format!("opening {}", self.path.display()))?,
            ),
        };
        file.write_all(format!("{}\n", row.to_csv()).as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.rows = self.rows.saturating_add(1);
        if self.rows >= self.keep.saturating_mul(3) {
            let text = std::fs::read_to_string(&self.path)
                .with_context(|| format!("reading {}", self.path.display()))?;
            let rows = well_formed(&self.path, &text, u64::MAX);
            self.rows = rows.len();
            let thinned = thin(&rows, self.keep);
            self.file = Some(rewrite(&self.path, &thinned)?);
            self.rows = thinned.len();
        }
        Ok(())
    }
}

/// The well-formed rows of `text` (a progress log, header first) of
/// generations before `before`; any other line is dropped rather than kept
/// unbounded.
fn well_formed(path: &Path, text: &str, before: u64) -> Vec<Row> {
    let mut kept = String::new();
    for line in text.lines().skip(1) {
        let ok = line.split(',').count() == 6
            && line
                .split(',')
                .next()
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| g < before);
        if ok {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    parse_progress(path, &format!("{PROGRESS_HEADER}\n{kept}")).unwrap_or_default()
}

/// Opens the log `path` (holding `text`) for appending, after ending a
/// torn last line so the next row starts a line of its own; `None`, logged,
/// if it cannot be opened.
fn append_to(path: &Path, text: &str) -> Option<std::fs::File> {
    let opened = open_append(path).and_then(|mut f| {
        if !text.is_empty() && !text.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        Ok(f)
    });
    match opened {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!("cannot open {} for appending: {e}", path.display());
            None
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
}

/// Replaces the file at `path` with `rows` (temp file + rename) and opens
/// it for appending.
fn rewrite(path: &Path, rows: &[Row]) -> Result<std::fs::File> {
    let mut text = format!("{PROGRESS_HEADER}\n");
    for r in rows {
        text.push_str(&r.to_csv());
        text.push('\n');
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    open_append(path).with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_bounded_and_resumes_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.csv");
        let mut log = ProgressLog::open(&path, 0, 50);
        let row = |g: u64| Row {
            generation: g,
            best: g as f64,
            mean: 1.0,
            evaluations: g * 4,
            publishes: u64::from(g == 3),
            wall_s: 0.0,
        };
        for g in 0..10_000 {
            log.append(&row(g)).unwrap();
            assert!(log.rows <= 150);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let rows = parse_progress(&path, &text).unwrap();
        assert_eq!(rows.len(), log.rows);
        assert_eq!(rows[0].publishes, 1, "{:?}", rows[0]);
        assert_eq!(rows.last().unwrap().generation, 9_999);
        // A resume at 9_990 drops the rows it will write again.
        drop(log);
        let log = ProgressLog::open(&path, 9_990, 50);
        let text = std::fs::read_to_string(&path).unwrap();
        let rows = parse_progress(&path, &text).unwrap();
        assert_eq!(rows.last().unwrap().generation, 9_989);
        assert_eq!(rows.len(), log.rows);
    }

    #[test]
    fn a_log_that_cannot_be_rewritten_is_appended_to_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.csv");
        let row = |g: u64| Row {
            generation: g,
            best: 1.0,
            mean: 1.0,
            evaluations: g,
            publishes: 0,
            wall_s: 0.0,
        };
        let mut text = format!("{PROGRESS_HEADER}\n");
        for g in 0..5 {
            text.push_str(&format!("{}\n", row(g).to_csv()));
        }
        text.push_str("5,1.0,1"); // torn by a killed evolver
        std::fs::write(&path, &text).unwrap();
        // The rewrite's temporary file cannot be written (as on a full
        // disk): the open is logged, not an error.
        std::fs::create_dir(path.with_extension("csv.tmp")).unwrap();
        let mut log = ProgressLog::open(&path, 3, 50);
        assert!(
            std::fs::read_to_string(&path).unwrap().starts_with(&text),
            "left as it was"
        );
        log.append(&row(3)).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.ends_with("\n5,1.0,1\n3,1,1,3,0,0.000\n"), "{after}");
        // Once the disk works again, thinning drops the torn row and the
        // rows out of order (the replayed generations appended after it).
        std::fs::remove_dir(path.with_extension("csv.tmp")).unwrap();
        log.rows = 149;
        log.append(&row(4)).unwrap();
        let rows = parse_progress(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let gens: Vec<u64> = rows.iter().map(|r| r.generation).collect();
        assert_eq!(gens, [0, 1, 2, 3, 4]);
    }
}
