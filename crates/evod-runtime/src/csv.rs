//! A user's numeric CSV data set as a fitness task.
//!
//! Format: the first non-blank line is a header of column names; every
//! other non-blank line is a row of numbers, one per column, separated by
//! commas (surrounding spaces and one pair of double quotes around a cell are
//! ignored; quoted commas are not supported). Numbers are parsed as `f64`
//! and must be finite. Line numbers in errors are 1-based physical lines.
//!
//! The target column is chosen by name; every other column is an input,
//! in file order. Rows are shuffled with `ChaCha8Rng::seed_from_u64(seed)`
//! (Fisher–Yates, index `next_u64() % (i + 1)`), and the first
//! `max(1, round(rows / 5))` shuffled rows form the validation split, the
//! rest the training split. Inputs are standardised with the training
//! split's mean and standard deviation (a constant column is only centred).
//!
//! - **Regression**: one output; the target is standardised with the training
//!   mean and standard deviation; fitness is the negative mean squared error
//!   on the training split, the validation score the same on the validation
//!   split.
//! - **Classification**: one output per class; the classes are the target's
//!   distinct values in ascending order; fitness is the negative mean
//!   cross-entropy of the softmax of the outputs on the training split, the
//!   validation score the accuracy (argmax) on the validation split.
//!
//! [`CsvKind::Auto`] picks classification when every target value is an
//! integer and there are 2 to [`MAX_AUTO_CLASSES`] distinct values, else
//! regression.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::RuntimeError;
use crate::arch::Architecture;
use crate::supervised::Dataset;

/// Most distinct integer targets that [`CsvKind::Auto`] treats as classes.
pub const MAX_AUTO_CLASSES: usize = 32;
/// Most classes an explicit classification task accepts.
pub const MAX_CLASSES: usize = 4096;
/// Largest accepted CSV file (1 GiB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Regression or classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsvKind {
    /// Decide from the target column (see the module documentation).
    Auto,
    /// Predict the target's value.
    Regression,
    /// Predict the target's class.
    Classification,
}

impl CsvKind {
    /// `auto`, `regression` or `classification`.
    pub fn name(self) -> &'static str {
        match self {
            CsvKind::Auto => "auto",
            CsvKind::Regression => "regression",
            CsvKind::Classification => "classification",
        }
    }

    /// Parses [`CsvKind::name`].
    pub fn parse(s: &str) -> Option<CsvKind> {
        [CsvKind::Auto, CsvKind::Regression, CsvKind::Classification]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// Why a CSV data set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{path}: file is {bytes} bytes, more than the limit of {MAX_FILE_BYTES}", path = path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// A line is not UTF-8.
    #[error("{path}: line {line}: not valid utf-8", path = path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// No header line at all.
    #[error("{path}: file is empty (expected a header line)", path = path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A header cell is empty or repeated.
    #[error("{path}: line {line}: {problem}", path = path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// 1-based line of the header.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The target column is not in the header.
    #[error("{path}: no column named {target:?} (columns: {columns})", path = path.display())]
    MissingTarget {
        /// The file.
        path: PathBuf,
        /// The requested target.
        target: String,
        /// The header's names, comma-separated.
        columns: String,
    },
    /// The target is the only column.
    #[error("{path}: the target {target:?} is the only column, there are no inputs", path = path.display())]
    NoFeatures {
        /// The file.
        path: PathBuf,
        /// The target.
        target: String,
    },
    /// A row with a different number of cells than the header.
    #[error("{path}: line {line}: {found} cells, the header has {expected}", path = path.display())]
    Ragged {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Header width.
        expected: usize,
        /// Cells on this line.
        found: usize,
    },
    /// A cell that is not a finite number.
    #[error("{path}: line {line}: column {column:?}: {value:?} is not a finite number", path = path.display())]
    NotNumeric {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The column's name.
        column: String,
        /// The cell.
        value: String,
    },
    /// Fewer than two data rows (one for training, one for validation).
    #[error("{path}: {rows} data row(s), at least 2 are needed", path = path.display())]
    TooFewRows {
        /// The file.
        path: PathBuf,
        /// Rows found.
        rows: usize,
    },
    /// A classification target with fewer than 2 or too many classes.
    #[error("{path}: target {target:?} has {classes} distinct values, classification needs 2 to {MAX_CLASSES}", path = path.display())]
    Classes {
        /// The file.
        path: PathBuf,
        /// The target.
        target: String,
        /// Distinct values found.
        classes: usize,
    },
}

/// A loaded CSV task: the two splits and what is needed to describe them.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvTask {
    /// The data file.
    pub path: PathBuf,
    /// The target column's name.
    pub target: String,
    /// Regression or classification (never [`CsvKind::Auto`] once loaded).
    pub kind: CsvKind,
    /// The input columns' names, in file order.
    pub features: Vec<String>,
    /// Classification: the distinct target values, ascending (class `i` is
    /// `classes[i]`). Empty for regression.
    pub classes: Vec<f64>,
    /// The split seed.
    pub seed: u64,
    /// Training split (standardised).
    pub train: Dataset,
    /// Validation split (standardised with the training statistics).
    pub validation: Dataset,
}

fn split_cells(line: &str) -> Vec<&str> {
    line.split(',')
        .map(|c| {
            let c = c.trim();
            c.strip_prefix('"')
                .and_then(|c| c.strip_suffix('"'))
                .unwrap_or(c)
                .trim()
        })
        .collect()
}

impl CsvTask {
    /// Reads and splits `path` (see the module documentation).
    pub fn load(path: &Path, target: &str, kind: CsvKind, seed: u64) -> Result<CsvTask, CsvError> {
        let io = |source| CsvError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(CsvError::TooLarge {
                path: path.to_owned(),
                bytes: meta.len(),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        CsvTask::parse(path, &bytes, target, kind, seed)
    }

    /// Parses CSV `bytes` as if read from `path` (used in errors).
    pub fn parse(
        path: &Path,
        bytes: &[u8],
        target: &str,
        kind: CsvKind,
        seed: u64,
    ) -> Result<CsvTask, CsvError> {
        let p = || path.to_owned();
        let mut lines = bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
            .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace));
        let text = |line: usize, l: &'_ [u8]| -> Result<String, CsvError> {
            String::from_utf8(l.to_vec()).map_err(|_| CsvError::NotUtf8 { path: p(), line })
        };

        let Some((header_line, header)) = lines.next() else {
            return Err(CsvError::Empty { path: p() });
        };
        let header = text(header_line, header)?;
        let names: Vec<String> = split_cells(&header)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut seen = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let problem = if name.is_empty() {
                Some(format!("header cell {} is empty", i + 1))
            } else {
                seen.insert(name.as_str(), i).map(|first| {
                    format!(
                        "column name {name:?} appears twice (cells {} and {})",
                        first + 1,
                        i + 1
                    )
                })
            };
            if let Some(problem) = problem {
                return Err(CsvError::BadHeader {
                    path: p(),
                    line: header_line,
                    problem,
                });
            }
        }
        let Some(target_index) = names.iter().position(|n| n == target) else {
            return Err(CsvError::MissingTarget {
                path: p(),
                target: target.to_owned(),
                columns: names.join(","),
            });
        };
        if names.len() == 1 {
            return Err(CsvError::NoFeatures {
                path: p(),
                target: target.to_owned(),
            });
        }

        let width = names.len();
        let mut rows: Vec<f64> = Vec::new();
        for (line, raw) in lines {
            let l = text(line, raw)?;
            let cells = split_cells(&l);
            if cells.len() != width {
                return Err(CsvError::Ragged {
                    path: p(),
                    line,
                    expected: width,
                    found: cells.len(),
                });
            }
            for (cell, name) in cells.iter().zip(&names) {
                match cell.parse::<f64>() {
                    Ok(v) if v.is_finite() => rows.push(v),
                    _ => {
                        return Err(CsvError::NotNumeric {
                            path: p(),
                            line,
                            column: name.clone(),
                            value: (*cell).to_owned(),
                        });
                    }
                }
            }
        }
        let n_rows = rows.len() / width;
        if n_rows < 2 {
            return Err(CsvError::TooFewRows {
                path: p(),
                rows: n_rows,
            });
        }

        let targets: Vec<f64> = rows.chunks_exact(width).map(|r| r[target_index]).collect();
        let mut distinct: Vec<f64> = targets.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        let all_integers = targets.iter().all(|t| t.fract() == 0.0);
        let kind = match kind {
            CsvKind::Auto if all_integers && (2..=MAX_AUTO_CLASSES).contains(&distinct.len()) => {
                CsvKind::Classification
            }
            CsvKind::Auto => CsvKind::Regression,
            k => k,
        };
        if kind == CsvKind::Classification && !(2..=MAX_CLASSES).contains(&distinct.len()) {
            return Err(CsvError::Classes {
                path: p(),
                target: target.to_owned(),
                classes: distinct.len(),
            });
        }

        // Seeded split.
        let mut order: Vec<usize> = (0..n_rows).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..n_rows).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let n_valid = ((n_rows as f64 / 5.0).round() as usize).clamp(1, n_rows - 1);
        let (valid_rows, train_rows) = order.split_at(n_valid);

        let features: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != target_index)
            .map(|(_, n)| n.clone())
            .collect();
        let n_in = features.len();
        let feature_of = |r: usize, f: usize| {
            let col = if f < target_index { f } else { f + 1 };
            rows[r * width + col]
        };
        let stats = |values: &mut dyn Iterator<Item = f64>| {
            let v: Vec<f64> = values.collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
            let std = var.sqrt();
            (mean, if std > 0.0 { std } else { 1.0 })
        };
        let feature_stats: Vec<(f64, f64)> = (0..n_in)
            .map(|f| stats(&mut train_rows.iter().map(|&r| feature_of(r, f))))
            .collect();
        let target_stats = match kind {
            CsvKind::Regression => stats(&mut train_rows.iter().map(|&r| targets[r])),
            _ => (0.0, 1.0),
        };
        let build = |which: &[usize]| {
            let mut inputs = Vec::with_capacity(which.len() * n_in);
            let mut outs = Vec::with_capacity(which.len());
            for &r in which {
                for (f, &(mean, std)) in feature_stats.iter().enumerate() {
                    inputs.push(((feature_of(r, f) - mean) / std) as f32);
                }
                outs.push(match kind {
                    CsvKind::Classification => distinct.partition_point(|&c| c < targets[r]) as f32,
                    _ => ((targets[r] - target_stats.0) / target_stats.1) as f32,
                });
            }
            Dataset {
                n_in,
                n_target: 1,
                inputs,
                targets: outs,
            }
        };
        let (train, validation) = (build(train_rows), build(valid_rows));
        Ok(CsvTask {
            path: path.to_owned(),
            target: target.to_owned(),
            kind,
            features,
            classes: if kind == CsvKind::Classification {
                distinct
            } else {
                Vec::new()
            },
            seed,
            train,
            validation,
        })
    }

    /// Number of inputs (columns other than the target).
    pub fn input_size(&self) -> usize {
        self.features.len()
    }

    /// 1 for regression, the number of classes for classification.
    pub fn output_size(&self) -> usize {
        match self.kind {
            CsvKind::Classification => self.classes.len(),
            _ => 1,
        }
    }

    /// Fitness on the training split (higher is better).
    pub fn fitness(&self, arch: &Architecture, params: &[f32]) -> Result<f64, RuntimeError> {
        self.fitness_with(arch, params, &mut || {})
    }

    /// [`CsvTask::fitness`], calling `tick` every few milliseconds of
    /// network work; the same value.
    pub fn fitness_with(
        &self,
        arch: &Architecture,
        params: &[f32],
        tick: &mut dyn FnMut(),
    ) -> Result<f64, RuntimeError> {
        match self.kind {
            CsvKind::Classification => self.train.neg_cross_entropy_with(arch, params, tick),
            _ => self.train.neg_mse_with(arch, params, tick),
        }
    }

    /// Score on the validation split: accuracy for classification, negative
    /// MSE (standardised target) for regression.
    pub fn validation_score(
        &self,
        arch: &Architecture,
        params: &[f32],
    ) -> Result<f64, RuntimeError> {
        match self.kind {
            CsvKind::Classification => self.validation.accuracy(arch, params),
            _ => self.validation.neg_mse(arch, params),
        }
    }
}
