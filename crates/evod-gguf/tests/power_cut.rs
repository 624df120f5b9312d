//! Publishing is durable across a power cut, checked on a real block device.
//!
//! SIGKILL (see `crash.rs`) keeps the page cache, so it cannot tell whether
//! [`publish`] makes its result durable. Here the model lives on an ext4
//! file system on a loop device; a "power cut" is a byte copy of the loop
//! device's backing image taken right after `publish` returns, while the
//! file system is still mounted: the copy holds exactly what was written to
//! the device, and nothing of what is still only in the page cache. The
//! copy is then mounted (ext4 replays its journal, as after a reboot) and
//! the model read from it must be the generation just published, whole.
//!
//! The file system is mounted with `commit=600` (the journal is not
//! committed on a timer during the test) and `noauto_da_alloc` (ext4 does
//! not flush a file renamed over another on its own): only the writer's own
//! fsync of the temporary file and of the folder make the new generation
//! durable. Without the file fsync the copy holds an empty or zero-filled
//! model; without the folder fsync, the old generation (both seen by
//! removing each call from `write.rs`: the test fails).
//!
//! Needs root, `losetup`, `mkfs.ext4` and `mount` (all present on the
//! development machine). Where they are not, the test fails saying so,
//! unless `EVOD_SKIP_POWER_CUT=1` is set, which makes it pass after saying
//! it checked nothing. A `sync` by another process during the test can only
//! make a broken writer pass, never a correct one fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use evod_gguf::{GgufFile, PublishOptions, TensorSpec, TensorType, Value, publish};

const GEN_KEY: &str = "test.generation";
const ELEMENTS: u64 = 1 << 20; // 4 MiB of f32

fn fill(g: u64) -> u8 {
    (g % 250) as u8 + 1
}

fn publish_gen(target: &Path, g: u64) {
    let meta = vec![
        (
            "general.architecture".to_owned(),
            Value::String("cut".into()),
        ),
        (GEN_KEY.to_owned(), Value::U64(g)),
    ];
    let spec = TensorSpec {
        name: "blk.0.weight".into(),
        dims: vec![ELEMENTS],
        ttype: TensorType::F32,
    };
    publish(
        target,
        &meta,
        &[spec],
        |_, w| w.write_all(&vec![fill(g); (ELEMENTS * 4) as usize]),
        &PublishOptions::default(),
    )
    .unwrap();
}

/// Runs a command; its stderr on failure.
fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An image attached to a loop device and mounted; detached on drop (also
/// when the test panics).
struct Mounted {
    dev: String,
    dir: PathBuf,
}

impl Mounted {
    fn new(image: &Path, dir: &Path, options: &str) -> Result<Mounted, String> {
        let dev = run(
            "losetup",
            &["-f".as_ref(), "--show".as_ref(), image.as_ref()],
        )?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let m = Mounted {
            dev,
            dir: dir.to_owned(),
        };
        run(
            "mount",
            &[
                "-o".as_ref(),
                options.as_ref(),
                m.dev.as_ref(),
                dir.as_ref(),
            ],
        )
        .inspect_err(|_| {
            let _ = run("losetup", &["-d".as_ref(), m.dev.as_ref()]);
        })?;
        Ok(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("umount", &[self.dir.as_ref()]);
        let _ = run("losetup", &["-d".as_ref(), self.dev.as_ref()]);
    }
}

/// Sets up the file system; the reason when this machine cannot.
fn make_fs(image: &Path) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
    f.set_len(64 << 20).map_err(|e| e.to_string())?;
    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_ref()])?;
    Ok(())
}

#[test]
fn publish_is_durable_across_a_power_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    let skip = std::env::var_os("EVOD_SKIP_POWER_CUT").is_some_and(|v| v == "1");
    if let Err(why) = make_fs(&image) {
        assert!(
            skip,
            "power-cut test needs root, losetup, mkfs.ext4 and mount: {why} \
             (set EVOD_SKIP_POWER_CUT=1 to skip it knowingly)"
        );
        eprintln!("SKIPPED: power-cut check not run ({why}); nothing was checked");
        return;
    }
    let live = Mounted::new(
        &image,
        &tmp.path().join("live"),
        "commit=600,noauto_da_alloc",
    )
    .unwrap_or_else(|e| panic!("cannot mount the test file system: {e}"));
    let target = live.dir.join("model.gguf");
    publish_gen(&target, 0);
    // Generation 0 on the device however the writer behaves.
    nix::unistd::syncfs(std::fs::File::open(&live.dir).unwrap()).unwrap();

    let snapshot = tmp.path().join("cut.img");
    for g in 1..=3u64 {
        publish_gen(&target, g);
        // The power cut: what the device holds now, page cache excluded.
        std::fs::copy(&image, &snapshot).unwrap();
        let after = Mounted::new(&snapshot, &tmp.path().join("after"), "rw")
            .unwrap_or_else(|e| panic!("cannot mount the cut image: {e}"));
        let f = GgufFile::open(&after.dir.join("model.gguf"))
            .unwrap_or_else(|e| panic!("generation {g}: model invalid after the cut: {e}"));
        assert_eq!(
            f.get(GEN_KEY).and_then(Value::as_u64),
            Some(g),
            "the generation published before the cut is not the one on disk"
        );
        let data = f.tensor_bytes(&f.tensors()[0]);
        assert_eq!(data.len() as u64, ELEMENTS * 4);
        assert!(
            data.iter().all(|&b| b == fill(g)),
            "generation {g}: tensor data not durable"
        );
    }
}
