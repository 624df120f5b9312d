//! The read-based path ([`GgufReader`], [`GgufHeader::read`]) against the
//! map ([`GgufFile`]): the same header and checksum for a header far larger
//! than the first read, the same error at every truncation; a file that
//! shrinks between the header read and the checksum (or while hashing) is a
//! [`GgufError::ShortRead`] naming it, never a SIGBUS; and every opening
//! entry point refuses a FIFO, a folder and a device at once.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use evod_gguf::{
    Array, FileKind, GgufError, GgufFile, GgufHeader, GgufReader, PublishOptions, TensorSpec,
    TensorType, Value, ValueType, publish,
};

/// A model whose metadata (a 100 000-token array, about 1.5 MB) is far
/// larger than the reader's first 64 KiB read, with `data_bytes` of F32
/// data (bytes `i % 251`).
fn write_model(path: &Path, data_bytes: u64) {
    let tokens = (0..100_000)
        .map(|i| Value::String(format!("token-{i}")))
        .collect();
    let meta = vec![
        (
            "general.architecture".to_owned(),
            Value::String("evod-mlp".into()),
        ),
        (
            "tokenizer.tokens".to_owned(),
            Value::Array(Array {
                elem_type: ValueType::String,
                values: tokens,
            }),
        ),
    ];
    let specs = [
        TensorSpec {
            name: "a".into(),
            dims: vec![data_bytes / 8],
            ttype: TensorType::F32,
        },
        TensorSpec {
            name: "b".into(),
            dims: vec![data_bytes / 8],
            ttype: TensorType::F32,
        },
    ];
    let data: Vec<u8> = (0..data_bytes / 2).map(|i| (i % 251) as u8).collect();
    publish(
        path,
        &meta,
        &specs,
        |_, w| w.write_all(&data),
        &PublishOptions::default(),
    )
    .unwrap();
}

#[test]
fn reader_matches_the_map_for_a_large_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    // Data not a multiple of the 1 MiB streaming buffer.
    write_model(&path, 3 << 20 | 4096);
    let map = GgufFile::open(&path).unwrap();
    assert!(map.data_offset() > 1 << 20, "header must be large");
    let reader = GgufReader::open(&path).unwrap();
    assert_eq!(common::header_view(&map), common::header_view(&reader));
    assert_eq!(reader.checksum().unwrap(), map.checksum());
    let t = &reader.tensors()[1];
    assert_eq!(reader.read_tensor(t).unwrap(), map.tensor_bytes(t));
    let header = GgufHeader::read(&path).unwrap();
    assert_eq!(common::header_view(&header), common::header_view(&map));
}

#[test]
fn a_header_past_the_cap_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_model(&path, 1 << 20);
    let header = GgufFile::open(&path).unwrap().data_offset();
    assert!(header > 1 << 20 && header < 2 << 20, "{header}");
    // Read no further than the cap: refused, not grown to the file's size.
    let err = GgufReader::open_with_limit(&path, 1 << 20).unwrap_err();
    assert!(
        matches!(&err, GgufError::HeaderTooLarge { path: p, limit } if *p == path && *limit == 1 << 20),
        "{err:?}"
    );
    assert!(err.to_string().contains("m.gguf"), "{err}");
    // A cap that is not a power of two of the first read still holds it.
    GgufReader::open_with_limit(&path, header + 123).unwrap();
    assert!(evod_gguf::MAX_HEADER >= 64 * header);
    GgufReader::open(&path).unwrap();
}

#[test]
fn reader_and_map_give_the_same_error_at_every_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let full_path = dir.path().join("full.gguf");
    write_model(&full_path, 4096);
    let full = std::fs::read(&full_path).unwrap();
    let data_offset = GgufFile::open(&full_path).unwrap().data_offset() as usize;
    let path = dir.path().join("cut.gguf");
    // Cuts around the reader's read sizes (64 KiB doubling) and spread over
    // the header and the data.
    let mut cuts: Vec<usize> = (0..=6)
        .flat_map(|k| {
            let at = (64usize << 10) << k;
            [at - 1, at, at + 1]
        })
        .chain((0..64).map(|i| i * full.len() / 64))
        .chain([0, 1, 23, 24, data_offset - 1, data_offset, full.len() - 1])
        .filter(|&c| c < full.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        std::fs::write(&path, &full[..cut]).unwrap();
        let (map, read) = (GgufFile::open(&path), GgufReader::open(&path));
        match (&map, &read) {
            (
                Err(GgufError::Parse { kind, offset, .. }),
                Err(GgufError::Parse {
                    kind: k2,
                    offset: o2,
                    ..
                }),
            ) => assert_eq!((kind, offset), (k2, o2), "cut at {cut}"),
            _ => panic!("cut at {cut}: expected the same parse error: {map:?} vs {read:?}"),
        }
    }
}

#[test]
fn shrink_between_header_and_checksum_is_a_short_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_model(&path, 2 << 20);
    let reader = GgufReader::open(&path).unwrap();
    let len = reader.file_len();
    let cut = reader.data_offset() + 100;
    // Truncated in place by someone else, after the header was read.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    match reader.checksum() {
        Err(GgufError::ShortRead {
            path: p,
            offset,
            expected,
        }) => {
            assert_eq!((p.as_path(), offset, expected), (path.as_path(), cut, len));
        }
        other => panic!("expected ShortRead, got {other:?}"),
    }
    let err = reader.read_tensor(&reader.tensors()[1]).unwrap_err();
    assert!(matches!(err, GgufError::ShortRead { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("changed while being read"),
        "{msg}"
    );
}

/// A truncation racing the hash, in this process: a map would die of SIGBUS
/// (and take the test with it); the reader returns a checksum or a
/// ShortRead.
#[test]
fn hashing_while_truncated_in_place_never_signals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_model(&path, 8 << 20);
    let full = std::fs::read(&path).unwrap();
    let stop = AtomicBool::new(false);
    let (mut ok, mut short) = (0u32, 0u32);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Shrink into the data, grow back (zeros), and now and then
                // write the real bytes back: full-size nearly always.
                f.set_len(full.len() as u64 / 2).unwrap();
                f.set_len(full.len() as u64).unwrap();
                if i.is_multiple_of(16) {
                    f.write_all_at(&full, 0).unwrap();
                }
                i += 1;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let Ok(reader) = GgufReader::open(&path) else {
                continue; // opened while short: a parse error, fine
            };
            match reader.checksum() {
                // Possibly torn (read while rewritten), but no signal.
                Ok(_) => ok += 1,
                Err(GgufError::ShortRead { .. }) => short += 1,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    panic!("unexpected error {e}");
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!("{ok} checksums, {short} short reads");
    assert!(ok + short > 0, "no open succeeded within the deadline");
}

fn fifo(dir: &Path) -> PathBuf {
    let p = dir.join("pipe.gguf");
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
    p
}

type Opener = fn(&Path) -> Result<(), GgufError>;

#[test]
fn every_entry_point_refuses_non_regular_files_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (fifo(dir.path()), FileKind::Fifo, "is a FIFO"),
        (dir.path().to_owned(), FileKind::Directory, "is a directory"),
        (
            "/dev/null".into(),
            FileKind::CharDevice,
            "is a character device",
        ),
    ];
    let openers: [(&str, Opener); 5] = [
        ("GgufFile::open", |p| GgufFile::open(p).map(drop)),
        ("GgufFile::open_following", |p| {
            GgufFile::open_following(p).map(drop)
        }),
        ("GgufReader::open", |p| GgufReader::open(p).map(drop)),
        ("GgufReader::open_following", |p| {
            GgufReader::open_following(p).map(drop)
        }),
        ("GgufHeader::read", |p| GgufHeader::read(p).map(drop)),
    ];
    for (path, want, text) in cases {
        for (name, open) in openers {
            // A blocking open of a FIFO without a writer never returns: run
            // it on a thread and fail past a deadline instead of hanging.
            let (tx, rx) = std::sync::mpsc::channel();
            let p = path.clone();
            std::thread::spawn(move || tx.send(open(&p)).unwrap());
            let result = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{name}({}) blocked", path.display()));
            match result {
                Err(ref e @ GgufError::NotRegular { path: ref p, kind }) => {
                    assert_eq!((p, kind), (&path, want), "{name}");
                    assert!(
                        e.to_string()
                            .starts_with(&format!("{} {text}, not a regular file", path.display())),
                        "{name}: {e}"
                    );
                }
                other => panic!(
                    "{name}({}): expected NotRegular, got {other:?}",
                    path.display()
                ),
            }
        }
    }
}

#[test]
fn reader_refuses_a_final_symlink_unless_following() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_model(&path, 4096);
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(
        GgufReader::open(&link),
        Err(GgufError::Symlink { .. })
    ));
    assert!(matches!(
        GgufHeader::read(&link),
        Err(GgufError::Symlink { .. })
    ));
    let followed = GgufReader::open_following(&link).unwrap();
    assert_eq!(
        followed.checksum().unwrap(),
        GgufFile::open(&path).unwrap().checksum()
    );
}
