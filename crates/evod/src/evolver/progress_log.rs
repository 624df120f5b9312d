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
    file: std::fs::File,
    /// Rows in the file.
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
    pub fn open(path: &Path, resume_at: u64, keep: u64) -> Result<ProgressLog> {
        let keep = usize::try_from(keep).unwrap_or(usize::MAX).max(1);
        let mut text = String::new();
        if let Ok(old) = std::fs::read_to_string(path) {
            for line in old.lines().skip(1) {
                let ok = line.split(',').count() == 6
                    && line
                        .split(',')
                        .next()
                        .and_then(|g| g.parse::<u64>().ok())
                        .is_some_and(|g| g < resume_at);
                if ok {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        // Rows that do not parse are dropped rather than kept unbounded.
        let rows = parse_progress(path, &format!("{PROGRESS_HEADER}\n{text}")).unwrap_or_default();
        let rows = thin(&rows, keep);
        Ok(ProgressLog {
            path: path.to_owned(),
            file: rewrite(path, &rows)?,
            rows: rows.len(),
            keep,
        })
    }

    /// Appends `row`: one write (a killed evolver leaves at most a torn last
    /// line, which the next start drops); thins the file when it is full.
    pub fn append(&mut self, row: &Row) -> Result<()> {
        self.file
            .write_all(format!("{}\n", row.to_csv()).as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.rows += 1;
        if self.rows >= 3 * self.keep {
            let text = std::fs::read_to_string(&self.path)
                .with_context(|| format!("reading {}", self.path.display()))?;
            let rows = parse_progress(&self.path, &text)?;
            let thinned = thin(&rows, self.keep);
            self.file = rewrite(&self.path, &thinned)?;
            self.rows = thinned.len();
        }
        Ok(())
    }
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
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_bounded_and_resumes_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.csv");
        let mut log = ProgressLog::open(&path, 0, 50).unwrap();
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
        let log = ProgressLog::open(&path, 9_990, 50).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let rows = parse_progress(&path, &text).unwrap();
        assert_eq!(rows.last().unwrap().generation, 9_989);
        assert_eq!(rows.len(), log.rows);
    }
}
