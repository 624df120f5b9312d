//! The streaming writer and atomic publish.
//!
//! [`publish`] writes `.<name>.tmp.<pid>.<n>` beside the target: the header
//! and tensor infos, then each tensor's bytes straight from the caller's
//! callback (the model is never held in memory), zero padding to the
//! alignment after each; then fsync, rename over the target, fsync of the
//! folder. Until the rename the target is untouched, and on any error before
//! it the temporary file is removed. A writer killed mid-publish leaves its
//! temporary file behind; the next publish to the same target removes it
//! (one writer at a time per target is the contract).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{GgufError, IoStep};
use crate::read::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufFile, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::types::{TensorInfo, TensorType, Value};

/// Version written.
pub const WRITE_VERSION: u32 = 3;

/// A tensor to write: the writer lays out offsets and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Dimensions in ggml order (`dims[0]` fastest-varying).
    pub dims: Vec<u64>,
    /// Element type.
    pub ttype: TensorType,
}

impl From<&TensorInfo> for TensorSpec {
    fn from(t: &TensorInfo) -> TensorSpec {
        TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ttype: t.ttype,
        }
    }
}

/// A failure injected into [`publish`] at one step, with the OS error number
/// it fails with (for example `libc::ENOSPC` or `libc::EIO`).
///
/// Test-only seam: it lets tests (and the daemon's fault-injection tests)
/// see exactly what a real disk-full or I/O error at that step does, without
/// a full disk. Production code leaves [`PublishOptions::fault`] at `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFault {
    /// The first write to the temporary file fails.
    Write(i32),
    /// fsync of the temporary file fails.
    Fsync(i32),
    /// The rename over the target fails.
    Rename(i32),
    /// fsync of the folder after the rename fails.
    DirFsync(i32),
}

/// Options of [`publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    /// Data alignment, used when the metadata has no `general.alignment`
    /// (which then wins). A value other than 32 is recorded by adding
    /// `general.alignment` as the first key.
    pub alignment: u64,
    /// Injected failure (tests only).
    pub fault: Option<IoFault>,
}

impl Default for PublishOptions {
    fn default() -> PublishOptions {
        PublishOptions {
            alignment: DEFAULT_ALIGNMENT,
            fault: None,
        }
    }
}

/// What [`publish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReport {
    /// Size of the file in bytes.
    pub bytes: u64,
    /// xxh3-64 of the data section, equal to [`GgufFile::checksum`] of the
    /// published file.
    pub checksum: u64,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The prefix of temporary files for `target`'s file name.
pub fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.tmp.")
}

/// Writes a GGUF v3 file atomically at `target`: `metadata` in order, then
/// `tensors`, whose bytes `write_tensor(index, sink)` streams (exactly the
/// size implied by dims and type). See the module documentation.
pub fn publish(
    target: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut write_tensor: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    opts: &PublishOptions,
) -> Result<PublishReport, GgufError> {
    let invalid = |problem: String| GgufError::InvalidSpec {
        path: target.to_owned(),
        problem,
    };
    let file_name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid("the target has no utf-8 file name".into()))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };

    let layout = Layout::new(metadata, tensors, opts.alignment).map_err(invalid)?;

    let io_err = |step: IoStep| {
        move |source: io::Error| GgufError::Io {
            path: target.to_owned(),
            step,
            source,
        }
    };
    // A folder that is missing or is not a folder is named as such, not as
    // a failure to clean up in it.
    let folder = fs::read_dir(&dir).map_err(io_err(IoStep::Folder))?;
    remove_leftovers(folder, file_name).map_err(io_err(IoStep::Cleanup))?;

    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(
        "{}{}.{n}",
        temp_prefix(file_name),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(io_err(IoStep::Create))?;
    let guard = TempGuard(Some(temp.clone()));

    let mut sink = Sink {
        file,
        fail_write: match opts.fault {
            Some(IoFault::Write(e)) => Some(e),
            _ => None,
        },
        hasher: None,
        written: 0,
    };
    sink.write_all(&layout.header)
        .map_err(io_err(IoStep::Write))?;
    sink.hasher = Some(Xxh3::new());
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    for (i, spec) in tensors.iter().enumerate() {
        let size = layout.sizes[i];
        let mut limited = Limited {
            inner: &mut out,
            left: size,
            overflow: None,
        };
        let result = write_tensor(i, &mut limited);
        let written = size - limited.left;
        let overflow = limited.overflow;
        if overflow.is_some() || (result.is_ok() && written != size) {
            return Err(GgufError::TensorSize {
                path: target.to_owned(),
                tensor: spec.name.clone(),
                expected: size,
                written: written.saturating_add(overflow.unwrap_or(0)),
            });
        }
        result.map_err(io_err(IoStep::Write))?;
        let pad = layout.padding_after(i);
        write_zeros(&mut out, pad).map_err(io_err(IoStep::Write))?;
    }
    let sink = out
        .into_inner()
        .map_err(|e| io_err(IoStep::Write)(e.into_error()))?;
    let checksum = sink.hasher.as_ref().map_or(0, |h| h.digest());
    let bytes = sink.written;

    match opts.fault {
        Some(IoFault::Fsync(e)) => Err(io::Error::from_raw_os_error(e)),
        _ => sink.file.sync_all(),
    }
    .map_err(io_err(IoStep::Fsync))?;
    drop(sink);

    match opts.fault {
        Some(IoFault::Rename(e)) => Err(io::Error::from_raw_os_error(e)),
        _ => fs::rename(&temp, target),
    }
    .map_err(io_err(IoStep::Rename))?;
    guard.disarm();

    match opts.fault {
        Some(IoFault::DirFsync(e)) => Err(io::Error::from_raw_os_error(e)),
        _ => File::open(&dir).and_then(|d| d.sync_all()),
    }
    .map_err(io_err(IoStep::DirFsync))?;

    Ok(PublishReport { bytes, checksum })
}

/// Publishes a copy of `file` at `target`, keeping every key, value type,
/// key order, tensor order and tensor byte (tensor offsets are laid out
/// afresh in file order). With `edit`, metadata and tensors can be changed:
/// it receives the metadata to modify in place.
pub fn rewrite(
    file: &GgufFile,
    target: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
    opts: &PublishOptions,
) -> Result<PublishReport, GgufError> {
    let mut metadata = file.metadata().to_vec();
    edit(&mut metadata);
    let specs: Vec<TensorSpec> = file.tensors().iter().map(TensorSpec::from).collect();
    let opts = PublishOptions {
        alignment: file.alignment(),
        ..opts.clone()
    };
    publish(
        target,
        &metadata,
        &specs,
        |i, w| w.write_all(file.tensor_bytes(&file.tensors()[i])),
        &opts,
    )
}

/// Removes `.<file_name>.tmp.*` among the entries of `folder` (left by
/// killed writers).
fn remove_leftovers(folder: fs::ReadDir, file_name: &str) -> io::Result<()> {
    let prefix = temp_prefix(file_name);
    for entry in folder {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            match fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Removes the temporary file unless disarmed after the rename.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// The temporary file: counts bytes, hashes the data section, injects a
/// write fault.
struct Sink {
    file: File,
    fail_write: Option<i32>,
    hasher: Option<Xxh3>,
    written: u64,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.fail_write {
            return Err(io::Error::from_raw_os_error(e));
        }
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Accepts at most `left` bytes; more is an error (and remembered).
struct Limited<'a, W: Write> {
    inner: &'a mut W,
    left: u64,
    /// Length of a write that did not fit.
    overflow: Option<u64>,
}

impl<W: Write> Write for Limited<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.overflow = Some(buf.len() as u64);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tensor data longer than declared",
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_zeros(w: &mut impl Write, mut n: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// The validated header bytes (padded to the data section) and tensor sizes.
struct Layout {
    header: Vec<u8>,
    sizes: Vec<u64>,
    offsets: Vec<u64>,
    alignment: u64,
}

impl Layout {
    fn new(
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
        default_alignment: u64,
    ) -> Result<Layout, String> {
        let mut seen = std::collections::HashSet::new();
        let mut alignment = None;
        for (key, value) in metadata {
            if !seen.insert(key.as_str()) {
                return Err(format!("duplicate metadata key {key:?}"));
            }
            check_value(key, value, 0)?;
            if key == ALIGNMENT_KEY {
                match *value {
                    Value::U32(a) if a.is_power_of_two() => alignment = Some(u64::from(a)),
                    Value::U32(a) => {
                        return Err(format!("{ALIGNMENT_KEY} {a} is not a power of two"));
                    }
                    ref v => {
                        return Err(format!(
                            "{ALIGNMENT_KEY} has type {}, expected u32",
                            v.value_type()
                        ));
                    }
                }
            }
        }
        let mut extra_key = None;
        let alignment = match alignment {
            Some(a) => a,
            None => {
                let a = default_alignment;
                if !a.is_power_of_two() || a > u64::from(u32::MAX) {
                    return Err(format!("alignment {a} is not a power of two below 2^32"));
                }
                if a != DEFAULT_ALIGNMENT {
                    extra_key = Some((ALIGNMENT_KEY.to_owned(), Value::U32(a as u32)));
                }
                a
            }
        };

        let mut names = std::collections::HashSet::new();
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut next = 0u64;
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("duplicate tensor name {:?}", t.name));
            }
            if t.dims.len() > MAX_DIMS as usize {
                return Err(format!(
                    "tensor {:?} has {} dimensions (at most {MAX_DIMS})",
                    t.name,
                    t.dims.len()
                ));
            }
            let size = t.ttype.byte_size(&t.dims).ok_or_else(|| {
                format!(
                    "tensor {:?} dims {:?} are zero, overflow, or are not whole {} blocks",
                    t.name, t.dims, t.ttype
                )
            })?;
            offsets.push(next);
            sizes.push(size);
            next = next
                .checked_add(size)
                .map(|e| e.div_ceil(alignment) * alignment)
                .ok_or_else(|| "tensor data exceeds 2^64 bytes".to_owned())?;
        }

        let mut h = Vec::new();
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        let n_kv = metadata.len() + usize::from(extra_key.is_some());
        h.extend_from_slice(&(n_kv as u64).to_le_bytes());
        for (key, value) in extra_key.iter().chain(metadata) {
            put_str(&mut h, key);
            h.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut h, value);
        }
        for (t, &off) in tensors.iter().zip(&offsets) {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ttype.id().to_le_bytes());
            h.extend_from_slice(&off.to_le_bytes());
        }
        let padded = (h.len() as u64).div_ceil(alignment) * alignment;
        h.resize(padded as usize, 0);
        Ok(Layout {
            header: h,
            sizes,
            offsets,
            alignment,
        })
    }

    /// Zero bytes after tensor `i` so that the next starts aligned (and the
    /// file ends aligned, as llama.cpp and gguf-py write it).
    fn padding_after(&self, i: usize) -> u64 {
        let end = self.offsets[i] + self.sizes[i];
        end.div_ceil(self.alignment) * self.alignment - end
    }
}

fn check_value(key: &str, value: &Value, depth: usize) -> Result<(), String> {
    if let Value::Array(a) = value {
        if depth + 1 > MAX_ARRAY_DEPTH {
            return Err(format!(
                "metadata {key:?} nests arrays deeper than {MAX_ARRAY_DEPTH}"
            ));
        }
        for v in &a.values {
            if v.value_type() != a.elem_type {
                return Err(format!(
                    "metadata {key:?} is an array of {} holding a {}",
                    a.elem_type,
                    v.value_type()
                ));
            }
            check_value(key, v, depth + 1)?;
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::Array(a) => {
            h.extend_from_slice(&a.elem_type.id().to_le_bytes());
            h.extend_from_slice(&(a.values.len() as u64).to_le_bytes());
            for x in &a.values {
                put_value(h, x);
            }
        }
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}
