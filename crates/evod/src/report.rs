//! `evod report`: fitness over generations as an SVG picture and a CSV table,
//! drawn from the run's progress log (`<dir>/state/progress.csv`, one row per
//! generation, appended by the evolver).

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
    /// Whether this generation was published.
    pub published: bool,
    /// Seconds since the run started.
    pub wall_s: f64,
}

impl Row {
    /// The row as a CSV line (no newline).
    pub fn to_csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3}",
            self.generation,
            self.best,
            self.mean,
            self.evaluations,
            u8::from(self.published),
            self.wall_s
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
            published: cells[4] == "1",
            wall_s: cells[5].parse().map_err(|_| bad("wall_s"))?,
        });
    }
    Ok(rows)
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
    for r in rows.iter().filter(|r| r.published && finite(r.best)) {
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
        rows.len(),
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
        "{} generations, best fitness {} at generation {}, {} published; picture in {}",
        rows.len(),
        rows.iter()
            .map(|r| r.best)
            .fold(f64::NEG_INFINITY, f64::max),
        last.generation,
        rows.iter().filter(|r| r.published).count(),
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
                published: false,
                wall_s: 0.1,
            },
            Row {
                generation: 2,
                best: 500.0,
                mean: 200.0,
                evaluations: 128,
                published: true,
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
