//! `evod inspect` as a process: text and `--json` output for a file written
//! in the test, and a malformed file giving exit code 3 with a one-line
//! error naming the file; a symlinked path followed by `inspect`, refused by
//! `eval`; a FIFO, a folder and a device refused at once with exit code 3;
//! and a file truncated and rewritten in place under `inspect` giving exit
//! code 0 or 3, never a signal (`inspect` reads with `pread`, not a map).

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evod_gguf::{Array, PublishOptions, TensorSpec, TensorType, Value, ValueType, publish};

fn evod(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evod"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("running evod")
}

fn write_model(path: &Path) -> u64 {
    let tokens: Vec<Value> = (0..1000)
        .map(|i| Value::String(format!("tok{i}")))
        .collect();
    let meta = vec![
        (
            "general.architecture".to_owned(),
            Value::String("evod-mlp".into()),
        ),
        ("evod.seed".to_owned(), Value::U64(u64::MAX - 1)),
        ("evod.fitness".to_owned(), Value::F32(f32::NAN)),
        (
            "tokenizer.tokens".to_owned(),
            Value::Array(Array {
                elem_type: ValueType::String,
                values: tokens,
            }),
        ),
    ];
    let specs = vec![
        TensorSpec {
            name: "blk.0.weight".into(),
            dims: vec![4, 16],
            ttype: TensorType::F32,
        },
        TensorSpec {
            name: "blk.0.bias".into(),
            dims: vec![16],
            ttype: TensorType::F16,
        },
    ];
    publish(
        path,
        &meta,
        &specs,
        |i, w| {
            let s = &specs[i];
            w.write_all(&vec![0; s.ttype.byte_size(&s.dims).unwrap() as usize])
        },
        &PublishOptions::default(),
    )
    .unwrap()
    .checksum
}

#[test]
fn text_and_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let checksum = write_model(&path);

    let out = evod(&[path.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("version: 3"), "{text}");
    assert!(text.contains(&format!("{checksum:016x}")), "{text}");
    assert!(
        text.contains("general.architecture: string = \"evod-mlp\""),
        "{text}"
    );
    assert!(
        text.contains("tokenizer.tokens: array[string; 1000] = [\"tok0\", \"tok1\""),
        "{text}"
    );
    assert!(
        text.contains("… 992 more]"),
        "long arrays are shortened: {text}"
    );
    assert!(!text.contains("tok999"), "{text}");
    assert!(
        text.contains("blk.0.bias") && text.contains("F16") && text.contains("[16]"),
        "{text}"
    );
    let keys: Vec<usize> = [
        "general.architecture",
        "evod.seed",
        "evod.fitness",
        "tokenizer.tokens",
    ]
    .iter()
    .map(|k| text.find(&format!("  {k}:")).unwrap())
    .collect();
    assert!(keys.is_sorted(), "metadata keeps file order");

    let out = evod(&[path.as_os_str(), "--json".as_ref()]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["version"], 3);
    assert_eq!(j["checksum"], format!("{checksum:016x}"));
    assert_eq!(j["tensor_count"], 2);
    assert_eq!(
        j["metadata"][1]["value"].as_u64(),
        Some(u64::MAX - 1),
        "u64 exact"
    );
    assert_eq!(j["metadata"][2]["value"], "nan");
    let toks = &j["metadata"][3]["value"];
    assert_eq!(toks["elem_type"], "string");
    assert_eq!(
        toks["values"].as_array().unwrap().len(),
        1000,
        "json is complete"
    );
    assert_eq!(toks["values"][999], "tok999");
    let t = &j["tensors"][1];
    assert_eq!(t["name"], "blk.0.bias");
    assert_eq!(t["type"], "F16");
    assert_eq!(t["dims"], serde_json::json!([16]));
    assert_eq!(t["size"], 32);
    assert_eq!(t["offset"], 256);
    assert_eq!(
        t["absolute_offset"].as_u64().unwrap(),
        j["data_offset"].as_u64().unwrap() + 256
    );
}

#[test]
fn malformed_file_exits_3_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    write_model(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor count becomes absurd.
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    for json in [false, true] {
        let mut args = vec![path.as_os_str()];
        if json {
            args.push("--json".as_ref());
        }
        let out = evod(&args);
        assert_eq!(out.status.code(), Some(3));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("bad.gguf") && err.contains("byte 8") && err.contains("tensor count"),
            "{err}"
        );
    }
    let out = evod(&[dir.path().join("missing.gguf").as_os_str()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("missing.gguf")
    );
}

#[test]
fn inspect_follows_a_symlink_but_eval_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let checksum = write_model(&path);
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&path, &link).unwrap();

    // `evod inspect` only reads a file the user names: it follows the link.
    let out = evod(&[link.as_os_str(), "--json".as_ref()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["checksum"], format!("{checksum:016x}"));

    // Loading a model does not follow a link (O_NOFOLLOW): exit 3 and a
    // message naming the path.
    let out = Command::new(env!("CARGO_BIN_EXE_evod"))
        .arg("eval")
        .arg(&link)
        .output()
        .expect("running evod");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "{} is a symbolic link; evod does not follow links for model files",
            link.display()
        )),
        "{err}"
    );
}

#[test]
fn fifo_folder_and_device_exit_3_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.gguf");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    let cases = [
        (fifo.clone(), "is a FIFO"),
        (dir.path().to_owned(), "is a directory"),
        ("/dev/null".into(), "is a character device"),
    ];
    for (path, what) in cases {
        // A FIFO without a writer would block a plain open(2) forever: wait
        // for the exit with a deadline, never unbounded.
        let mut child = common::evod()
            .arg("inspect")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = common::wait_exit(&mut child, Duration::from_secs(10)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("evod inspect {} hung", path.display());
        };
        let out = child.wait_with_output().unwrap();
        let err = common::text(&out.stderr);
        assert_eq!(status.code(), Some(3), "{}: {err}", path.display());
        assert!(out.stdout.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{} {what}, not a regular file", path.display())),
            "{err}"
        );
    }
}

/// Elements of the model rewritten in place: 16 MiB of f32, so a run spends
/// long enough in the data section for a truncation to land mid-read.
const BIG_ELEMENTS: u64 = 4 << 20;

#[test]
fn rewrite_in_place_never_kills_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let spec = TensorSpec {
        name: "blk.0.weight".into(),
        dims: vec![BIG_ELEMENTS],
        ttype: TensorType::F32,
    };
    publish(
        &path,
        &[(
            "general.architecture".to_owned(),
            Value::String("evod-mlp".into()),
        )],
        &[spec],
        |_, w| w.write_all(&vec![7; (BIG_ELEMENTS * 4) as usize]),
        &PublishOptions::default(),
    )
    .unwrap();
    let full = std::fs::read(&path).unwrap();

    // Someone else's writer: truncates the file in place and writes it back,
    // in the same inode, as fast as it can.
    let stop = AtomicBool::new(false);
    let rewrites = AtomicU64::new(0);
    let (mut ok, mut bad) = (0u32, 0u32);
    std::thread::scope(|s| {
        // Stops the writer however the loop below ends (a failed assert too).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Shrink below the data section, grow back (zeros), and now
                // and then write the real bytes back: the file is full-size
                // nearly always, so runs get past the header into the data.
                f.set_len(4096).unwrap();
                f.set_len(full.len() as u64).unwrap();
                if i.is_multiple_of(16) {
                    f.write_all_at(&full, 0).unwrap();
                }
                i += 1;
                rewrites.store(i, Ordering::Relaxed);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut runs = 0;
        while Instant::now() < deadline || runs < 20 {
            runs += 1;
            let out = evod(&[path.as_os_str()]);
            match (out.status.code(), out.status.signal()) {
                (Some(0), _) => ok += 1,
                (Some(3), _) => {
                    let err = common::text(&out.stderr);
                    assert!(err.contains("m.gguf"), "run {runs}: {err}");
                    bad += 1;
                }
                (code, signal) => {
                    panic!(
                        "run {runs}: evod inspect ended with code {code:?}, signal {signal:?}: {}",
                        common::text(&out.stderr)
                    );
                }
            }
        }
    });
    let rewrites = rewrites.load(Ordering::Relaxed);
    eprintln!("{ok} clean reads, {bad} clean errors, {rewrites} in-place rewrites");
    assert!(rewrites > 0, "the writer never rewrote the file");
}
