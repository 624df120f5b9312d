//! `evod report`: fitness over generations as an SVG picture and a CSV table,
//! drawn from the run's progress log (`<dir>/state/progress.csv`, one row per
//! generation, appended by the evolver).
//!
//! The log is bounded ([`thin`]): the newest generations stay one row each,
//! older ones are merged into rows that each stand for an aligned block of
//! generations (best = the block's best, mean = the block's mean, publishes
//! counted), so the picture still covers the whole run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::exit;

/// Arguments of `evod report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's folder (holds `state/progress.csv`).
    #[arg(long, default_value = ".", env = "EVOD_DIR")]
    pub dir: PathBuf,
    /// Where to write the SVG picture.
    #[arg(short = 'o', long, default_value = "evod-report.svg")]
    pub output: PathBuf,
    /// Also write the table as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// The progress log's file name under `<dir>/state/`.
pub const PROGRESS_FILE: &str = "progress.csv";
/// The progress log's header line.
pub const PROGRESS_HEADER: &str = "generation,best,mean,evaluations,published,wall_s";

/// One generation of the progress log.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Generation number.
    pub generation: u64,
    /// Best fitness of the generation.
    pub best: f64,
    /// Mean fitness of the generation.
    pub mean: f64,
    /// Evaluations so far.
    pub evaluations: u64,
    /// Models published in the generations this row stands for (0 or 1
    /// for a single generation; more for a thinned row).
    pub publishes: u64,
    /// Seconds since the run started.
    pub wall_s: f64,
}

impl Row {
    /// The row as a CSV line (no newline).
    pub fn to_csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3}",
            self.generation, self.best, self.mean, self.evaluations, self.publishes, self.wall_s
        )
    }
}

/// Parses a progress log; errors name the file and line.
pub fn parse_progress(path: &Path, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if i == 0 {
            if line.trim() != PROGRESS_HEADER {
                bail!(
                    "{}: line 1: expected header {PROGRESS_HEADER:?}, found {line:?}",
                    path.display()
                );
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 6 {
            // A torn last line from a killed evolver is skipped, not fatal.
            if lineno == text.lines().count() {
                break;
            }
            bail!(
                "{}: line {lineno}: expected 6 cells, found {}",
                path.display(),
                cells.len()
            );
        }
        let bad = |what: &str| anyhow::anyhow!("{}: line {lineno}: bad {what}", path.display());
        rows.push(Row {
            generation: cells[0].parse().map_err(|_| bad("generation"))?,
            best: cells[1].parse().map_err(|_| bad("best"))?,
            mean: cells[2].parse().map_err(|_| bad("mean"))?,
            evaluations: cells[3].parse().map_err(|_| bad("evaluations"))?,
            publishes: cells[4].parse().map_err(|_| bad("published"))?,
            wall_s: cells[5].parse().map_err(|_| bad("wall_s"))?,
        });
    }
    Ok(rows)
}

/// Bounds a progress log: keeps the newest `keep` rows as they are and
/// merges the older ones into at most `keep` rows, each standing for an
/// aligned block of 2^k generations (the smallest k that fits). A merged
/// row carries its block's first generation, best fitness (max), mean
/// fitness (weighted by the generations each row stands for), evaluations
/// and wall time at the block's end, and its publishes summed. Thinning a
/// thinned log again merges whole blocks only, so repeated thinning keeps
/// these meanings.
///
/// Rows must come in increasing generations; a row whose generation is not
/// above the one before it (a hand-edited or otherwise crafted file) is
/// dropped with a warning. When the blocks would outgrow `u64` (generations
/// near 2^64), the old rows are merged into one.
pub fn thin(rows: &[Row], keep: usize) -> Vec<Row> {
    let keep = keep.max(1);
    let rows = increasing(rows);
    if rows.len() <= keep.saturating_mul(2) {
        return rows;
    }
    let (old, recent) = rows.split_at(rows.len() - keep);
    let end = recent[0].generation;
    let mut stride = Some(1u64);
    let merged = loop {
        let merged = merge_blocks(old, stride, end);
        if merged.len() <= keep || stride.is_none() {
            break merged;
        }
        stride = stride.and_then(|s| s.checked_mul(2));
    };
    merged.into_iter().chain(recent.iter().cloned()).collect()
}

/// `rows` without those whose generation is not above the previous kept
/// row's (logged).
fn increasing(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::with_capacity(rows.len());
    let mut dropped = 0usize;
    for r in rows {
        if out
            .last()
            .is_some_and(|last| r.generation <= last.generation)
        {
            dropped += 1;
        } else {
            out.push(r.clone());
        }
    }
    if dropped > 0 {
        tracing::warn!(
            "progress log: {dropped} rows out of generation order dropped (not above the row before)"
        );
    }
    out
}

/// Merges consecutive rows whose first generations fall in the same block
/// of `stride` generations (`None`: one block for all); `end` is the
/// generation after the last row's.
fn merge_blocks(rows: &[Row], stride: Option<u64>, end: u64) -> Vec<Row> {
    let block = |g: u64| stride.map_or(0, |s| g / s);
    let mut out: Vec<Row> = Vec::new();
    // (sum of mean × span, sum of span) of the last output row.
    let mut weights = (0.0, 0.0);
    for (i, r) in rows.iter().enumerate() {
        let next = rows.get(i + 1).map_or(end, |n| n.generation);
        let span = next.saturating_sub(r.generation).max(1) as f64;
        let same = out
            .last()
            .is_some_and(|last| block(last.generation) == block(r.generation));
        if !same {
            out.push(r.clone());
            weights = if r.mean.is_finite() {
                (r.mean * span, span)
            } else {
                (0.0, 0.0)
            };
            continue;
        }
        let last = out.last_mut().expect("checked above");
        // A NaN best (nothing evaluated) gives way to any finite one.
        if r.best.is_finite() && (last.best.is_nan() || r.best > last.best) {
            last.best = r.best;
        }
        if r.mean.is_finite() {
            weights.0 += r.mean * span;
            weights.1 += span;
            last.mean = weights.0 / weights.1;
        }
        last.evaluations = r.evaluations;
        last.wall_s = r.wall_s;
        last.publishes += r.publishes;
    }
    out
}

/// Draws best and mean fitness over generations, publishes marked.
pub fn svg(rows: &[Row], title: &str) -> String {
    const W: f64 = 800.0;
    const H: f64 = 420.0;
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let finite = |v: f64| v.is_finite();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for r in rows {
        for v in [r.best, r.mean] {
            if finite(v) {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let g0 = rows.first().map_or(0, |r| r.generation) as f64;
    let g1 = (rows.last().map_or(1, |r| r.generation) as f64).max(g0 + 1.0);
    let x = |g: u64| L + (g as f64 - g0) / (g1 - g0) * (W - L - R);
    let y = |v: f64| T + (hi - v) / (hi - lo) * (H - T - B);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="24" font-size="15">{}</text>"#,
        xml_escape(title)
    );
    // Axes and ticks.
    let _ = writeln!(
        s,
        r#"<path d="M{L},{T} V{} H{}" stroke="black" fill="none"/>"#,
        H - B,
        W - R
    );
    for k in 0..=4 {
        let v = lo + (hi - lo) * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.1}</text><path d="M{L},{y:.1} H{}" stroke="#ddd"/>"##,
            L - 6.0,
            y(v) + 4.0,
            W - R,
            y = y(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="{}">generation {g0}</text><text x="{}" y="{}" text-anchor="end">{g1}</text>"#,
        H - B + 18.0,
        W - R,
        H - B + 18.0
    );
    for (series, color, pick) in [
        ("best", "#1f77b4", (|r: &Row| r.best) as fn(&Row) -> f64),
        ("mean", "#ff7f0e", |r: &Row| r.mean),
    ] {
        let points: Vec<String> = rows
            .iter()
            .filter(|r| finite(pick(r)))
            .map(|r| format!("{:.1},{:.1}", x(r.generation), y(pick(r))))
            .collect();
        if !points.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"><title>{series}</title></polyline>"#,
                points.join(" ")
            );
        }
    }
    for r in rows.iter().filter(|r| r.publishes > 0 && finite(r.best)) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#2ca02c"><title>published generation {} (fitness {})</title></circle>"##,
            x(r.generation),
            y(r.best),
            r.generation,
            r.best
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#1f77b4">— best</text><text x="{}" y="{}" fill="#ff7f0e">— mean</text><text x="{}" y="{}" fill="#2ca02c">● published</text>"##,
        L + 10.0,
        H - 12.0,
        L + 80.0,
        H - 12.0,
        L + 150.0,
        H - 12.0
    );
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Runs `evod report`.
pub fn run(args: Args) -> Result<ExitCode> {
    let path = args.dir.join("state").join(PROGRESS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (has `evod run` been run in {}?)",
            path.display(),
            args.dir.display()
        )
    })?;
    let rows = parse_progress(&path, &text).map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
    if rows.is_empty() {
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!("{}: no generations recorded yet", path.display()),
        ));
    }
    let title = format!(
        "evod: fitness over {} generations ({})",
        rows.last().map_or(0, |r| r.generation + 1),
        args.dir.display()
    );
    std::fs::write(&args.output, svg(&rows, &title))
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(csv) = &args.csv {
        let mut out = String::from(PROGRESS_HEADER);
        out.push('\n');
        for r in &rows {
            out.push_str(&r.to_csv());
            out.push('\n');
        }
        std::fs::write(csv, out).with_context(|| format!("writing {}", csv.display()))?;
    }
    let last = rows.last().expect("rows is not empty");
    println!(
        "{} generations ({} rows), best fitness {} at generation {}, {} published; picture in {}",
        last.generation + 1,
        rows.len(),
        rows.iter()
            .map(|r| r.best)
            .fold(f64::NEG_INFINITY, f64::max),
        last.generation,
        rows.iter().map(|r| r.publishes).sum::<u64>(),
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_torn_last_line_is_skipped() {
        let rows = vec![
            Row {
                generation: 1,
                best: 20.0,
                mean: 10.5,
                evaluations: 64,
                publishes: 0,
                wall_s: 0.1,
            },
            Row {
                generation: 2,
                best: 500.0,
                mean: 200.0,
                evaluations: 128,
                publishes: 1,
                wall_s: 0.2,
            },
        ];
        let mut text = format!("{PROGRESS_HEADER}\n");
        for r in &rows {
            text.push_str(&r.to_csv());
            text.push('\n');
        }
        let p = Path::new("progress.csv");
        assert_eq!(parse_progress(p, &text).unwrap(), rows);
        let torn = format!("{text}3,12");
        assert_eq!(parse_progress(p, &torn).unwrap(), rows);
        let svg = svg(&rows, "t");
        assert!(
            svg.starts_with("<svg")
                && svg.contains("<polyline")
                && svg.contains("published generation 2")
        );
    }

    fn rows(n: u64) -> Vec<Row> {
        (0..n)
            .map(|g| Row {
                generation: g,
                best: g as f64,
                mean: 1.0 + (g % 2) as f64,
                evaluations: 10 * (g + 1),
                publishes: u64::from(g % 100 == 7),
                wall_s: g as f64 * 0.01,
            })
            .collect()
    }

    #[test]
    fn thinning_is_bounded_and_keeps_the_whole_run() {
        let all = rows(100_000);
        let keep = 1000;
        let thinned = thin(&all, keep);
        assert!(thinned.len() <= 2 * keep, "{} rows", thinned.len());
        // The newest rows are untouched; the oldest block still starts the run.
        assert_eq!(thinned[thinned.len() - keep..], all[all.len() - keep..]);
        assert_eq!(thinned[0].generation, 0);
        // Nothing is lost from the summaries: publishes, the best, the mean.
        let publishes = |r: &[Row]| r.iter().map(|r| r.publishes).sum::<u64>();
        assert_eq!(publishes(&thinned), publishes(&all));
        let first = &thinned[0];
        assert_eq!(first.best, (thinned[1].generation - 1) as f64);
        assert!((first.mean - 1.5).abs() < 0.01, "{first:?}");
        // Generations stay in order; thinning again while appending stays bounded.
        assert!(
            thinned
                .windows(2)
                .all(|w| w[0].generation < w[1].generation)
        );
        let mut log = thinned;
        for g in 100_000..150_000 {
            log.push(Row {
                generation: g,
                ..all[0].clone()
            });
            if log.len() > 3 * keep {
                log = thin(&log, keep);
            }
        }
        assert!(log.len() <= 3 * keep);
        assert_eq!(log.last().unwrap().generation, 149_999);
        assert_eq!(log[0].generation, 0);
    }

    #[test]
    fn thinning_crafted_logs_does_not_panic() {
        // Generations near 2^64: blocks stop doubling and merge into one.
        let far: Vec<Row> = (0..10)
            .map(|i| Row {
                generation: if i == 0 { 0 } else { u64::MAX - 10 + i },
                ..rows(1)[0].clone()
            })
            .collect();
        let thinned = thin(&far, 1);
        assert_eq!(thinned.len(), 2, "{thinned:?}");
        assert_eq!(thinned[0].generation, 0);
        assert_eq!(thinned[1].generation, u64::MAX - 1);
        // Out of order: dropped, never looped on.
        let mut shuffled = rows(100);
        shuffled.reverse();
        let thinned = thin(&shuffled, 10);
        assert_eq!(thinned.len(), 1, "only the first row is in order");
        assert_eq!(thinned[0].generation, 99);
        let mut dup = rows(100);
        dup.extend(rows(100));
        let thinned = thin(&dup, 10);
        assert!(thinned.len() <= 20, "{} rows", thinned.len());
        assert_eq!(thinned.last().unwrap().generation, 99);
    }

    #[test]
    fn a_short_log_is_not_thinned() {
        let all = rows(20);
        assert_eq!(thin(&all, 10), all);
    }

    #[test]
    fn bad_progress_names_file_and_line() {
        let p = Path::new("x/progress.csv");
        let err = parse_progress(p, "nope\n").unwrap_err().to_string();
        assert!(err.contains("x/progress.csv: line 1"), "{err}");
        let text = format!("{PROGRESS_HEADER}\n1,a,2,3,0,1\n2,1,1,1,0,1\n");
        let err = parse_progress(p, &text).unwrap_err().to_string();
        assert!(err.contains("line 2: bad best"), "{err}");
    }
}
