//! The read-based reader: a GGUF file read with `pread`, never mapped.
//!
//! A shared mapping dies of SIGBUS when someone truncates the file in place
//! and a page past the new end is touched. [`GgufReader`] reads the header
//! into memory and streams the data section through a fixed buffer, so a
//! file that shrinks meanwhile is a [`GgufError::ShortRead`] naming it. This
//! is the API for a process that must never die of somebody else's write:
//! the supervisor (PID 1 in a container) and `evod inspect`. Workers keep
//! [`crate::GgufFile`]'s zero-copy map; their crash is survivable by design.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::GgufError;
use crate::open::open_regular;
use crate::read::{GgufHeader, Stop, parse_prefix};

/// First header read; doubled until the header fits (typical headers are a
/// few KiB, LLM tokenizers a few MiB).
const FIRST_READ: u64 = 64 << 10;
/// The largest header (metadata and tensor infos) [`GgufReader::open`]
/// reads: 256 MiB. llama.cpp's GGUF files have headers of a few MiB at most
/// (the tokenizer's vocabulary and merges arrays; evod's own models a few
/// KiB), so this leaves a margin of about a hundred times, while a hostile
/// file can no longer make the supervisor allocate up to its whole size
/// for a header that never ends. [`GgufReader::open_with_limit`] sets
/// another cap.
pub const MAX_HEADER: u64 = 256 << 20;
/// Buffer for streaming the data section.
const CHUNK: usize = 1 << 20;

/// An open GGUF file whose header was read with `pread` and validated
/// exactly like [`crate::GgufFile::open`]'s. Derefs to its [`GgufHeader`].
///
/// Holds the file open: [`GgufReader::checksum`] reads the same inode the
/// header came from, even if the path was renamed over meanwhile. The
/// header describes the file's length at open; a later truncation or
/// in-place rewrite that shortens the file is reported as
/// [`GgufError::ShortRead`], never as a signal.
#[derive(Debug)]
pub struct GgufReader {
    path: PathBuf,
    file: File,
    header: GgufHeader,
}

impl Deref for GgufReader {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

impl GgufReader {
    /// Opens `path` (a regular file, final link refused, like
    /// [`crate::GgufFile::open`]) and reads and validates its header,
    /// metadata and tensor infos. Reads only as far as the header goes.
    /// A header larger than [`MAX_HEADER`] is
    /// [`GgufError::HeaderTooLarge`].
    pub fn open(path: &Path) -> Result<GgufReader, GgufError> {
        GgufReader::open_with(path, false, MAX_HEADER)
    }

    /// [`GgufReader::open`] that follows a symbolic link in the final
    /// component: for a file a user names only to look at (`evod inspect`).
    pub fn open_following(path: &Path) -> Result<GgufReader, GgufError> {
        GgufReader::open_with(path, true, MAX_HEADER)
    }

    /// [`GgufReader::open`] with a header cap of `limit` bytes instead of
    /// [`MAX_HEADER`].
    pub fn open_with_limit(path: &Path, limit: u64) -> Result<GgufReader, GgufError> {
        GgufReader::open_with(path, false, limit)
    }

    fn open_with(path: &Path, follow: bool, limit: u64) -> Result<GgufReader, GgufError> {
        let (file, len) = open_regular(path, follow)?;
        let name = path.display().to_string();
        let mut buf = Vec::new();
        // Never more than the cap, nor than the file.
        let most = len.min(limit);
        let mut want = FIRST_READ.min(most);
        let header = loop {
            let have = buf.len() as u64;
            // want <= len, the file's size: a model that does not fit the
            // address space could not be mapped either.
            let want_usize = usize::try_from(want).map_err(|_| GgufError::Open {
                path: path.to_owned(),
                source: io::Error::from(io::ErrorKind::OutOfMemory),
            })?;
            buf.resize(want_usize, 0);
            read_exact_at(&file, path, &mut buf[have as usize..], have, len)?;
            match parse_prefix(&name, &buf, len) {
                Ok(h) => break h,
                Err(Stop::Bad(e)) => return Err(e),
                Err(Stop::NeedMore) if want < most => want = want.saturating_mul(2).min(most),
                Err(Stop::NeedMore) if most < len => {
                    return Err(GgufError::HeaderTooLarge {
                        path: path.to_owned(),
                        limit,
                    });
                }
                // A parse of the whole file never needs more: `take` checks
                // the file's length first. Kept total rather than looping.
                Err(Stop::NeedMore) => {
                    return Err(GgufError::ShortRead {
                        path: path.to_owned(),
                        offset: len,
                        expected: len,
                    });
                }
            }
        };
        Ok(GgufReader {
            path: path.to_owned(),
            file,
            header,
        })
    }

    /// The path given to [`GgufReader::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// Gives up the file and keeps the header.
    pub fn into_header(self) -> GgufHeader {
        self.header
    }

    /// xxh3-64 of the tensor data section, streamed with `pread` through a
    /// 1 MiB buffer: the same value as [`crate::GgufFile::checksum`] for the
    /// same bytes. [`GgufError::ShortRead`] if the file is shorter than it
    /// was at open (truncated or rewritten in place meanwhile).
    pub fn checksum(&self) -> Result<u64, GgufError> {
        let range = self.header.data_range();
        let (mut at, end) = (range.start as u64, range.end as u64);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; CHUNK.min((end - at) as usize)];
        while at < end {
            let n = buf.len().min((end - at) as usize);
            read_exact_at(&self.file, &self.path, &mut buf[..n], at, end)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hasher.digest())
    }

    /// A copy of the tensor's raw bytes, read with `pread`. `t` must come
    /// from this reader (otherwise the range read is meaningless).
    pub fn read_tensor(&self, t: &crate::TensorInfo) -> Result<Vec<u8>, GgufError> {
        let start = self.header.data_offset().saturating_add(t.offset);
        let len = usize::try_from(t.size).map_err(|_| GgufError::Open {
            path: self.path.clone(),
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        let mut out = vec![0u8; len];
        read_exact_at(
            &self.file,
            &self.path,
            &mut out,
            start,
            self.header.file_len(),
        )?;
        Ok(out)
    }
}

/// Fills `buf` from `offset`; end of file before it is full is
/// [`GgufError::ShortRead`] (`expected` is the length the file had at open).
fn read_exact_at(
    file: &File,
    path: &Path,
    mut buf: &mut [u8],
    mut offset: u64,
    expected: u64,
) -> Result<(), GgufError> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                return Err(GgufError::ShortRead {
                    path: path.to_owned(),
                    offset,
                    expected,
                });
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(GgufError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}
