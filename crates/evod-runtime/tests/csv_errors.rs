//! CSV data sets: every refusal is a typed error naming the file and line.

use std::path::Path;

use evod_runtime::csv::{CsvError, CsvKind, CsvTask};
use evod_runtime::{Activation, Architecture, RuntimeError, Task};

fn parse(text: &str, target: &str) -> Result<CsvTask, CsvError> {
    CsvTask::parse(
        Path::new("data.csv"),
        text.as_bytes(),
        target,
        CsvKind::Auto,
        0,
    )
}

#[test]
fn empty_file() {
    for text in ["", "\n\n  \n"] {
        let e = parse(text, "y").unwrap_err();
        assert!(matches!(e, CsvError::Empty { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "data.csv: file is empty (expected a header line)"
        );
    }
}

#[test]
fn missing_target_column() {
    let e = parse("a,b\n1,2\n3,4\n", "y").unwrap_err();
    assert_eq!(
        e.to_string(),
        "data.csv: no column named \"y\" (columns: a,b)"
    );
}

#[test]
fn ragged_rows_name_the_line() {
    let e = parse("a,y\n1,2\n\n3,4,5\n", "y").unwrap_err();
    assert!(
        matches!(
            e,
            CsvError::Ragged {
                line: 4,
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.to_string(), "data.csv: line 4: 3 cells, the header has 2");
}

#[test]
fn non_numeric_cells_name_line_and_column() {
    let e = parse("a,y\n1,2\n3,four\n", "y").unwrap_err();
    assert_eq!(
        e.to_string(),
        "data.csv: line 3: column \"y\": \"four\" is not a finite number"
    );
    let e = parse("a,y\r\n1,2\r\nNaN,1\r\n", "y").unwrap_err();
    assert!(matches!(e, CsvError::NotNumeric { line: 3, .. }), "{e}");
    let e = parse("a,y\n1,2\n,1\n", "y").unwrap_err();
    assert!(matches!(e, CsvError::NotNumeric { line: 3, .. }), "{e}");
}

#[test]
fn header_problems() {
    let e = parse("a,a,y\n1,2,3\n", "y").unwrap_err();
    assert_eq!(
        e.to_string(),
        "data.csv: line 1: column name \"a\" appears twice (cells 1 and 2)"
    );
    let e = parse("a,,y\n1,2,3\n", "y").unwrap_err();
    assert!(e.to_string().contains("header cell 2 is empty"), "{e}");
    let e = parse("y\n1\n2\n", "y").unwrap_err();
    assert!(matches!(e, CsvError::NoFeatures { .. }), "{e}");
}

#[test]
fn too_few_rows_and_classes() {
    let e = parse("a,y\n1,2\n", "y").unwrap_err();
    assert_eq!(
        e.to_string(),
        "data.csv: 1 data row(s), at least 2 are needed"
    );
    let e = CsvTask::parse(
        Path::new("d.csv"),
        b"a,y\n1,1\n2,1\n",
        "y",
        CsvKind::Classification,
        0,
    )
    .unwrap_err();
    assert!(matches!(e, CsvError::Classes { classes: 1, .. }), "{e}");
}

#[test]
fn invalid_utf8_names_the_line() {
    let e = CsvTask::parse(
        Path::new("d.csv"),
        b"a,y\n1,2\n\xff,1\n",
        "y",
        CsvKind::Auto,
        0,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "d.csv: line 3: not valid utf-8");
}

#[test]
fn missing_file_is_an_io_error() {
    let e = CsvTask::load(Path::new("/nonexistent/evod.csv"), "y", CsvKind::Auto, 0).unwrap_err();
    assert!(matches!(e, CsvError::Io { .. }));
    assert!(
        e.to_string()
            .starts_with("cannot read /nonexistent/evod.csv"),
        "{e}"
    );
}

fn table(rows: usize) -> String {
    let mut s = String::from("x1, \"x2\" ,target\n");
    for i in 0..rows {
        s.push_str(&format!(
            "{},{},{}\n",
            i,
            (i * 7) % 11,
            (i as f64) * 0.5 + 1.25
        ));
    }
    s
}

#[test]
fn regression_split_is_seeded_and_standardised() {
    let a = CsvTask::parse(
        Path::new("t.csv"),
        table(50).as_bytes(),
        "target",
        CsvKind::Auto,
        1,
    )
    .unwrap();
    let b = CsvTask::parse(
        Path::new("t.csv"),
        table(50).as_bytes(),
        "target",
        CsvKind::Auto,
        1,
    )
    .unwrap();
    let c = CsvTask::parse(
        Path::new("t.csv"),
        table(50).as_bytes(),
        "target",
        CsvKind::Auto,
        2,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_ne!(a.validation, c.validation);
    assert_eq!(a.kind, CsvKind::Regression);
    assert_eq!(a.features, vec!["x1", "x2"]);
    assert_eq!((a.train.len(), a.validation.len()), (40, 10));
    // Training inputs and target are centred.
    let mean: f32 = a.train.inputs.iter().step_by(2).sum::<f32>() / 40.0;
    assert!(mean.abs() < 1e-5, "{mean}");
    let tmean: f32 = a.train.targets.iter().sum::<f32>() / 40.0;
    assert!(tmean.abs() < 1e-5, "{tmean}");
    // A zero network predicts the mean: fitness is -(variance = 1).
    let arch = Architecture::new(vec![2, 4, 1], Activation::Tanh).unwrap();
    let f = a.fitness(&arch, &vec![0.0; arch.n_params()]).unwrap();
    assert!((f + 1.0).abs() < 1e-5, "{f}");
}

#[test]
fn classification_auto_and_task_string() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iris:like.csv");
    let mut s = String::from("a,b,class\n");
    for i in 0..20 {
        s.push_str(&format!("{},{},{}\n", i, 20 - i, [10, 20, 30][i % 3]));
    }
    std::fs::write(&path, s).unwrap();
    let task: Task = format!("csv:{}:class", path.display()).parse().unwrap();
    let Task::Csv(csv) = &task else {
        panic!("not a csv task")
    };
    assert_eq!(csv.kind, CsvKind::Classification);
    assert_eq!(csv.classes, vec![10.0, 20.0, 30.0]);
    assert_eq!((task.input_size(), task.output_size()), (2, 3));
    assert!(task.name().ends_with("iris:like.csv:class:classification"));
    // The stored name parses back to the same task.
    assert_eq!(task.name().parse::<Task>().unwrap(), task);
    let arch = task.default_arch(Activation::Tanh);
    let f = task
        .evaluate(&arch, &vec![0.0; arch.n_params()], 0)
        .unwrap();
    assert!((f + 3f64.ln()).abs() < 1e-9, "uniform softmax: {f}");
    // Forced regression of the same column.
    let task: Task = format!("csv:{}:class:regression", path.display())
        .parse()
        .unwrap();
    assert_eq!(task.output_size(), 1);
    // Errors surface through the task string as RuntimeError::Csv.
    let e = format!("csv:{}:nope", path.display())
        .parse::<Task>()
        .unwrap_err();
    assert!(
        matches!(e, RuntimeError::Csv(CsvError::MissingTarget { .. })),
        "{e}"
    );
}
