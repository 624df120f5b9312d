//! Process tests of `evod init` and `evod eval`: real binary, real files.

use std::path::Path;
use std::process::{Command, Output};

fn evod(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evod"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run evod")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn init_creates_the_output_folder_and_names_one_it_cannot_create() {
    let dir = tempfile::tempdir().unwrap();
    let o = evod(dir.path(), &["init", "-o", "runs/first/vectorland.gguf"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = dir.path().join("runs/first/vectorland.gguf");
    assert_eq!(
        evod_runtime::Model::open(&model).unwrap().spec.task,
        "cartpole"
    );

    // A plain file where the folder should be: refused, naming the folder.
    std::fs::write(dir.path().join("plain"), b"x").unwrap();
    let o = evod(dir.path(), &["init", "-o", "plain/sub/vectorland.gguf"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(6), "exit::IO; {err}");
    assert!(err.contains("cannot create the folder plain/sub"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("plain")).unwrap(), b"x");
}

#[test]
fn init_writes_a_model_that_eval_runs() {
    let dir = tempfile::tempdir().unwrap();
    let o = evod(dir.path(), &["init", "--seed", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = dir.path().join("vectorland.gguf");
    let m = evod_runtime::Model::open(&model).unwrap();
    assert_eq!(m.spec.arch.layers, vec![4, 16, 2]);
    assert_eq!(m.spec.task, "cartpole");
    assert_eq!(m.spec.seed, 7);
    assert_eq!(m.spec.generation, 0);
    assert_eq!(
        &*m.params().unwrap(),
        &evod_runtime::init_params(&m.spec.arch, 7)[..]
    );

    let o = evod(
        dir.path(),
        &[
            "eval",
            "vectorland.gguf",
            "--episodes",
            "5",
            "--seed",
            "3",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let returns: Vec<f64> = v["returns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    let want = evod_runtime::cartpole::returns(&m.spec.arch, &m.params().unwrap(), 3, 5).unwrap();
    assert_eq!(returns, want);
    let mean = want.iter().sum::<f64>() / 5.0;
    assert_eq!(v["mean"].as_f64(), Some(mean));

    let o = evod(dir.path(), &["eval", "vectorland.gguf", "--episodes", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().last().unwrap().starts_with("mean "), "{text}");
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        evod(dir.path(), &["init", "-o", "m.gguf", "--seed", "1"])
            .status
            .success()
    );
    let before = std::fs::read(dir.path().join("m.gguf")).unwrap();
    let o = evod(dir.path(), &["init", "-o", "m.gguf", "--seed", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert_eq!(std::fs::read(dir.path().join("m.gguf")).unwrap(), before);
    let o = evod(
        dir.path(),
        &["init", "-o", "m.gguf", "--seed", "2", "--force"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(dir.path().join("m.gguf")).unwrap(), before);
}

#[test]
fn init_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (&["init", "--layers", "3,16,2"][..], "needs 4 inputs"),
        (
            &["init", "--task", "xor", "--layers", "2,8,2"][..],
            "needs 2 inputs and 1 outputs",
        ),
        (
            &["init", "--layers", "4,x,2"][..],
            "not a non-negative integer",
        ),
        (&["init", "--layers", "4,0,2"][..], "layer 1 has width 0"),
        (&["init", "--activation", "gelu"][..], "unknown activation"),
        (&["init", "--task", "pong"][..], "unknown task"),
        (
            &["init", "--task", "csv"][..],
            "needs --data FILE and --target COLUMN",
        ),
        (&["init", "--data", "x.csv"][..], "only apply to --task csv"),
    ] {
        let o = evod(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}");
    }
    assert!(!dir.path().join("vectorland.gguf").exists());
}

#[test]
fn init_sizes_the_network_from_csv_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("a,b,c,label\n");
    for i in 0..30 {
        csv.push_str(&format!("{},{},{},{}\n", i, i * 2, 30 - i, i % 3));
    }
    std::fs::write(dir.path().join("d.csv"), csv).unwrap();
    let o = evod(
        dir.path(),
        &[
            "init", "--task", "csv", "--data", "d.csv", "--target", "label",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m = evod_runtime::Model::open(&dir.path().join("vectorland.gguf")).unwrap();
    // 3 feature columns, 3 classes (auto: small integer target).
    assert_eq!(m.spec.arch.layers, vec![3, 16, 3]);
    assert!(m.spec.task.starts_with("csv:/"), "{}", m.spec.task);
    assert!(
        m.spec.task.ends_with("d.csv:label:classification"),
        "{}",
        m.spec.task
    );
    let o = evod(dir.path(), &["eval", "vectorland.gguf", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let fitness = v["fitness"].as_f64().unwrap();
    assert!(fitness < 0.0 && fitness.is_finite(), "{v}");
    let acc = v["validation"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{v}");

    // A CSV error names the file and the line, exit 3.
    std::fs::write(dir.path().join("bad.csv"), "a,label\n1,0\n2\n").unwrap();
    let o = evod(
        dir.path(),
        &[
            "init", "--task", "csv", "--data", "bad.csv", "--target", "label", "-o", "b.gguf",
        ],
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("bad.csv: line 3: 1 cells, the header has 2"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn eval_reports_malformed_models_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.gguf"), b"not a gguf file at all").unwrap();
    let o = evod(dir.path(), &["eval", "junk.gguf"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("junk.gguf"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);

    let o = evod(dir.path(), &["eval", "missing.gguf"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing.gguf"), "{}", stderr(&o));

    // Valid GGUF, but not an evod model: a truncated weight tensor.
    assert!(evod(dir.path(), &["init", "-o", "m.gguf"]).status.success());
    let file = evod_gguf::GgufFile::open(&dir.path().join("m.gguf")).unwrap();
    let mut specs: Vec<evod_gguf::TensorSpec> = file.tensors().iter().map(Into::into).collect();
    specs[0].dims = vec![4, 15];
    evod_gguf::publish(
        &dir.path().join("shape.gguf"),
        file.metadata(),
        &specs,
        |i, w| {
            let bytes = file.tensor_bytes(&file.tensors()[i]);
            w.write_all(if i == 0 { &bytes[..4 * 60] } else { bytes })
        },
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let o = evod(dir.path(), &["eval", "shape.gguf"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("tensor blk.0.weight has dims [4, 15], layers 4,16,2 need [4, 16]"),
        "{}",
        stderr(&o)
    );

    // A task that does not fit the model.
    let o = evod(dir.path(), &["eval", "m.gguf", "--task", "xor"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("task xor needs 2 inputs"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn eval_scores_supervised_tasks() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        evod(dir.path(), &["init", "--task", "sine", "-o", "s.gguf"])
            .status
            .success()
    );
    let o = evod(dir.path(), &["eval", "s.gguf"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let fitness: f64 = text
        .strip_prefix("task sine fitness ")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {text:?}"));
    assert!(fitness < 0.0, "{fitness}");
}

/// A GGUF header that looks like a llama.cpp language model (width 8, 3
/// blocks) with one small tensor: enough for `init --task perplexity`
/// without llama.cpp, which reads only the shape.
#[cfg(not(feature = "llm"))]
fn fake_llama(path: &Path) {
    use evod_gguf::{PublishOptions, TensorSpec, TensorType, Value, publish};
    let meta = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.block_count", Value::U32(3)),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let t = [TensorSpec {
        name: "token_embd.weight".into(),
        dims: vec![8, 4],
        ttype: TensorType::F32,
    }];
    publish(
        path,
        &meta,
        &t,
        |_, w| w.write_all(&[0u8; 128]),
        &PublishOptions::default(),
    )
    .unwrap();
}

/// Without the `llm` feature, `init --task perplexity` still writes the
/// zero control vector (the shape comes from the base's header), and
/// `evod run` refuses it up front with exit 2, naming the feature.
#[cfg(not(feature = "llm"))]
#[test]
fn without_llama_cpp_init_writes_a_control_vector_and_run_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    fake_llama(&dir.path().join("base.gguf"));
    let text: String = (0..400)
        .map(|i| format!("line {i} of the text\n"))
        .collect();
    std::fs::write(dir.path().join("c.txt"), text).unwrap();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let o = evod(
        dir.path(),
        &[
            "init",
            "--task",
            "perplexity",
            "--base-model",
            "base.gguf",
            "--text",
            "c.txt",
            "--window",
            "32",
            "-o",
            "run/vectorland.gguf",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("built without the llm feature"),
        "{}",
        stdout(&o)
    );
    let m = evod_runtime::Model::open(&dir.path().join("run/vectorland.gguf")).unwrap();
    assert_eq!(m.spec.task, "perplexity");
    assert_eq!(m.spec.arch.control_vector_shape(), Some((8, 2)));
    assert!(m.params().unwrap().iter().all(|&v| v == 0.0));
    assert_eq!(
        m.file.get("general.architecture").and_then(|v| v.as_str()),
        Some("controlvector")
    );
    let o = evod(dir.path(), &["run", "--dir", "run", "--generations", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("this evod was built without the llm feature"),
        "{}",
        stderr(&o)
    );
    // A corpus too short for a window (bytes bound the tokens).
    std::fs::write(
        dir.path().join("short.txt"),
        "a few words only.\nand more.\n",
    )
    .unwrap();
    let o = evod(
        dir.path(),
        &[
            "init",
            "--task",
            "perplexity",
            "--base-model",
            "base.gguf",
            "--text",
            "short.txt",
            "-o",
            "s.gguf",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("short.txt") && stderr(&o).contains("too short"));
}
