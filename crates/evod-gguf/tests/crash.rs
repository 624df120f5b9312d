//! Publishing is atomic for readers across a SIGKILL of the writer: a child
//! process (this test binary re-run with `EVOD_GGUF_CRASH_TARGET` set)
//! publishes a 32 MiB model in a loop; the test kills it at 60 random
//! instants and each time asserts that the target is a complete, valid model
//! equal to the old or a newer generation, that at most the killed writer's
//! temporary file is left, and finally that the next publish leaves none.
//!
//! What this does NOT prove: durability. SIGKILL keeps the page cache, so
//! this passes without any fsync; it checks the write-to-temporary-then-
//! rename protocol and the cleanup. Durability across a power cut is
//! `power_cut.rs` (a real block device, fails without either fsync).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evod_gguf::{GgufFile, PublishOptions, TensorSpec, TensorType, Value, publish};

const ENV: &str = "EVOD_GGUF_CRASH_TARGET";
const KILLS: usize = 60;
const ELEMENTS: u64 = 8 << 20; // 32 MiB of f32
const GEN_KEY: &str = "test.generation";

fn fill(g: u64) -> u8 {
    (g % 4) as u8 + 1
}

/// Publishes generation `g`: its tensor bytes are all `fill(g)`.
fn publish_gen(target: &Path, g: u64) {
    let meta = vec![
        (
            "general.architecture".to_owned(),
            Value::String("crash".into()),
        ),
        (GEN_KEY.to_owned(), Value::U64(g)),
    ];
    let spec = TensorSpec {
        name: "blk.0.weight".into(),
        dims: vec![ELEMENTS],
        ttype: TensorType::F32,
    };
    let chunk = vec![fill(g); 1 << 20];
    publish(
        target,
        &meta,
        &[spec],
        |_, w| {
            for _ in 0..(ELEMENTS * 4) >> 20 {
                w.write_all(&chunk)?;
            }
            Ok(())
        },
        &PublishOptions::default(),
    )
    .unwrap();
}

fn child(target: &Path) -> ! {
    let mut g = GgufFile::open(target)
        .unwrap()
        .get(GEN_KEY)
        .and_then(Value::as_u64)
        .unwrap();
    println!("\nready");
    loop {
        g += 1;
        publish_gen(target, g);
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".model.gguf.tmp."))
        .collect()
}

/// xorshift64*: enough randomness for kill instants, seed printed on failure.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn publish_is_atomic_for_readers_across_writer_sigkill() {
    if let Some(target) = std::env::var_os(ENV) {
        child(Path::new(&target));
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("model.gguf");
    publish_gen(&target, 0);
    let data_len = (ELEMENTS * 4) as usize;
    let expected: Vec<u64> = (0..4)
        .map(|g| xxhash_rust::xxh3::xxh3_64(&vec![fill(g); data_len]))
        .collect();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let exe = std::env::current_exe().unwrap();
    let (mut last_gen, mut mid_publish) = (0u64, 0usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    for kill in 0..KILLS {
        assert!(
            Instant::now() < deadline,
            "watchdog: too slow (seed {seed})"
        );
        let mut proc = Command::new(&exe)
            .args([
                "--exact",
                "publish_is_atomic_for_readers_across_writer_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, &target)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Wait for the child to be running its loop (an event, not a sleep).
        // A reader thread forwards lines so the wait has a deadline.
        let stdout = proc.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("ready") && tx.send(()).is_err() {
                    break;
                }
            }
        });
        if let Err(e) = rx.recv_timeout(Duration::from_secs(30)) {
            let _ = proc.kill();
            panic!("child not ready ({e}): {:?}", proc.wait());
        }
        // The kill instant is random; this sleep chooses it, it waits for nothing.
        std::thread::sleep(Duration::from_micros(rng.next() % 150_000));
        proc.kill().unwrap(); // SIGKILL
        proc.wait().unwrap();

        let f = GgufFile::open(&target)
            .unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): target invalid: {e}"));
        let g = f.get(GEN_KEY).and_then(Value::as_u64).unwrap();
        assert!(
            g >= last_gen,
            "kill {kill}: generation went back from {last_gen} to {g}"
        );
        assert_eq!(f.tensors()[0].n_elements(), ELEMENTS);
        assert_eq!(
            f.checksum(),
            expected[(g % 4) as usize],
            "kill {kill}: torn data, gen {g}"
        );
        last_gen = g;
        let temps = temp_files(dir.path());
        assert!(
            temps.len() <= 1,
            "kill {kill}: leftovers not cleaned: {temps:?}"
        );
        mid_publish += temps.len();
    }
    assert!(last_gen > 0, "the child never published (seed {seed})");
    assert!(mid_publish > 0, "no kill landed mid-publish (seed {seed})");
    publish_gen(&target, last_gen + 1);
    assert!(temp_files(dir.path()).is_empty());
    eprintln!("{KILLS} kills, {mid_publish} mid-publish, last generation {last_gen}");
}
