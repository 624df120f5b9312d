//! `cargo xtask bench gguf`: open + validate 1 MiB, 64 MiB and 1 GiB f32
//! models (median of many opens, page cache warm), and publish a 256 MiB
//! model next to `dd if=/dev/zero bs=1M count=256 conv=fsync` in the same
//! run. Files live in a temp folder beside the output JSON (`target/bench`,
//! the same filesystem as the workspace) and are removed. Writes the JSON given as
//! the only argument.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use evod_gguf::{GgufFile, PublishOptions, TensorSpec, TensorType, Value, publish};

fn model(path: &Path, bytes: u64) -> u64 {
    let meta = vec![(
        "general.architecture".to_owned(),
        Value::String("bench".into()),
    )];
    let spec = TensorSpec {
        name: "blk.0.weight".into(),
        dims: vec![bytes / 4],
        ttype: TensorType::F32,
    };
    let chunk = vec![0x3fu8; 1 << 20];
    let report = publish(
        path,
        &meta,
        &[spec],
        |_, w| {
            let mut left = bytes as usize;
            while left > 0 {
                let n = left.min(chunk.len());
                w.write_all(&chunk[..n])?;
                left -= n;
            }
            Ok(())
        },
        &PublishOptions::default(),
    )
    .expect("publish");
    report.bytes
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: bench_gguf OUT.json");
    let parent = Path::new(&out)
        .parent()
        .filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).unwrap();
    let dir = tempfile::tempdir_in(parent).unwrap();

    let mut opens = Vec::new();
    for (label, bytes) in [("1MiB", 1u64 << 20), ("64MiB", 64 << 20), ("1GiB", 1 << 30)] {
        let path = dir.path().join(format!("open-{label}.gguf"));
        model(&path, bytes);
        let runs = 200;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let f = GgufFile::open(&path).unwrap();
            std::hint::black_box(f.tensors().len());
            drop(f);
            times.push(t.elapsed());
        }
        let m = median(times);
        println!(
            "open+validate {label}: median {:.1} µs over {runs}",
            m.as_secs_f64() * 1e6
        );
        opens.push(serde_json::json!({"size": label, "bytes": bytes, "runs": runs, "median_us": m.as_secs_f64() * 1e6}));
        std::fs::remove_file(&path).unwrap();
    }

    // Publish vs dd, interleaved, median of 5 each.
    let size: u64 = 256 << 20;
    let (mut ours, mut dds) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let dd_path = dir.path().join("dd.bin");
        let t = Instant::now();
        let st = Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=1M",
                "count=256",
                "conv=fsync",
                "status=none",
            ])
            .arg(format!("of={}", dd_path.display()))
            .status()
            .expect("dd");
        assert!(st.success());
        dds.push(t.elapsed());
        std::fs::remove_file(&dd_path).unwrap();

        let path = dir.path().join("publish.gguf");
        let t = Instant::now();
        let bytes = model(&path, size);
        ours.push(t.elapsed());
        assert!(bytes >= size);
        std::fs::remove_file(&path).unwrap();
    }
    let (mo, md) = (median(ours), median(dds));
    let mib = size as f64 / (1 << 20) as f64;
    let (to, td) = (mib / mo.as_secs_f64(), mib / md.as_secs_f64());
    println!(
        "publish 256 MiB: median {:.0} ms ({to:.0} MiB/s); dd conv=fsync: {:.0} ms ({td:.0} MiB/s); ratio {:.2}",
        mo.as_secs_f64() * 1e3,
        md.as_secs_f64() * 1e3,
        to / td
    );
    let json = serde_json::json!({
        "open_validate": opens,
        "publish_256MiB": {
            "runs": 5,
            "evod_median_ms": mo.as_secs_f64() * 1e3,
            "evod_mib_per_s": to,
            "dd_median_ms": md.as_secs_f64() * 1e3,
            "dd_mib_per_s": td,
            "ratio_vs_dd": to / td,
        },
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("wrote {out}");
}
