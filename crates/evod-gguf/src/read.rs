//! The validating reader: [`GgufHeader::parse`] checks every field before it
//! is used, [`GgufFile::open`] maps a file read-only and parses it.
//!
//! Memory bound: nothing is allocated from a length or count in the file
//! before that length times the smallest encoding of one item is checked
//! against the bytes left, so the parser allocates at most a small constant
//! multiple of the file's size (tested with a counting allocator).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;

use crate::convert;
use crate::error::{GgufError, ParseErrorKind};
use crate::open::open_regular;
use crate::stream::GgufReader;
use crate::types::{Array, TensorInfo, TensorType, TypeIdError, Value, ValueType};

/// The file magic.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The key holding the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest array nesting accepted (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: u32 = 4;

/// Smallest encoded metadata entry: key length, value type, one byte.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest encoded tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// A parsed, validated GGUF description without the bytes it came from.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    name: String,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: u64,
    file_len: u64,
}

impl GgufHeader {
    /// Parses and validates `bytes`, a whole GGUF file; `name` is used in
    /// error messages.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        match parse_prefix(name, bytes, bytes.len() as u64) {
            Ok(h) => Ok(h),
            Err(Stop::Bad(e)) => Err(e),
            // The prefix is the whole file: every `take` past it is caught
            // as Truncated first. Kept total rather than panicking.
            Err(Stop::NeedMore) => Err(GgufError::Parse {
                file: name.to_owned(),
                offset: bytes.len() as u64,
                kind: ParseErrorKind::Truncated {
                    what: "header",
                    needed: 1,
                    available: 0,
                },
            }),
        }
    }

    /// Reads, parses and validates the GGUF file at `path` with `pread`,
    /// without a memory map: the same checks as [`GgufFile::open`], bounded
    /// by the file's size at open. The file is opened like
    /// [`GgufFile::open`] (regular files only, final link refused).
    ///
    /// For a process that must survive the file being truncated or
    /// rewritten in place (see [`GgufReader`]); use [`GgufReader::open`] to
    /// also checksum the same open file.
    pub fn read(path: &Path) -> Result<GgufHeader, GgufError> {
        GgufReader::open(path).map(GgufReader::into_header)
    }

    /// The name given to [`GgufHeader::parse`] (the path for opened files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, else 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Absolute offset of the tensor data section (may equal or exceed the
    /// file length for a file without tensors).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the parsed file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The tensor data section's byte range in the file (empty when the
    /// file ends before it).
    pub fn data_range(&self) -> std::ops::Range<usize> {
        let start = self.data_offset.min(self.file_len) as usize;
        start..self.file_len as usize
    }

    /// The bytes of `t` within `file`, the same bytes that were parsed.
    /// `t` must come from this header (otherwise an empty slice is returned).
    pub fn tensor_bytes_in<'a>(&self, file: &'a [u8], t: &TensorInfo) -> &'a [u8] {
        let start = self.data_offset.saturating_add(t.offset);
        let end = start.saturating_add(t.size);
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| file.get(s..e))
            .unwrap_or(&[])
    }

    /// `t` converted to f32: borrowed for an aligned F32 tensor, else
    /// converted from F32 (unaligned) or any type with a codec
    /// ([`crate::quant::CODEC_TYPES`]).
    pub fn tensor_f32_in<'a>(
        &self,
        file: &'a [u8],
        t: &TensorInfo,
    ) -> Result<Cow<'a, [f32]>, GgufError> {
        convert::to_f32(self.tensor_bytes_in(file, t), t.ttype).ok_or_else(|| {
            GgufError::Unconvertible {
                file: self.name.clone(),
                tensor: t.name.clone(),
                ttype: t.ttype,
            }
        })
    }
}

/// A memory-mapped, validated GGUF file. Derefs to its [`GgufHeader`].
pub struct GgufFile {
    path: PathBuf,
    map: Option<Mmap>,
    header: GgufHeader,
    checksum: OnceLock<u64>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Deref for GgufFile {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

impl GgufFile {
    /// Maps `path` read-only and validates all of it. Touches only the
    /// header pages: opening is independent of the tensor data's size.
    ///
    /// **Only for processes whose crash is survivable (the workers).** The
    /// mapping relies on the file not being truncated or rewritten in place
    /// while it is open: evod never does that ([`crate::publish`] replaces
    /// files by rename, and a replaced file keeps its old inode mapped), but
    /// anyone else with write access can, and then touching a page past the
    /// new end kills the process with SIGBUS. A trusted process (the
    /// supervisor, `evod inspect`) reads with [`GgufReader`] /
    /// [`GgufHeader::read`] instead, which report that case as
    /// [`GgufError::ShortRead`].
    ///
    /// Only regular files are opened: the path is opened with `O_NONBLOCK`
    /// and `fstat`ed, and a FIFO, folder, device or socket is refused at
    /// once with [`GgufError::NotRegular`] (a FIFO without a writer does not
    /// block).
    ///
    /// Security: the final path component is opened with `O_NOFOLLOW` (and
    /// `O_CLOEXEC`), so a symbolic link swapped in at a model's path is
    /// refused with [`GgufError::Symlink`] instead of being read. Folders on
    /// the way may still be links. Use [`GgufFile::open_following`] for a
    /// file a user names only to read it.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        GgufFile::open_with(path, false)
    }

    /// [`GgufFile::open`] that follows a symbolic link in the final
    /// component: for read-only looks at a file a user names, never for the
    /// model path a daemon loads and publishes.
    pub fn open_following(path: &Path) -> Result<GgufFile, GgufError> {
        GgufFile::open_with(path, true)
    }

    fn open_with(path: &Path, follow: bool) -> Result<GgufFile, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_owned(),
            source,
        };
        let (file, len) = open_regular(path, follow)?;
        let name = path.display().to_string();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private to this process. It
            // stays valid as long as nobody truncates or rewrites the file in
            // place; evod's writer only ever renames a new file over the old
            // one (the old inode stays mapped), which is the documented
            // contract for model files.
            Some(unsafe { Mmap::map(&file) }.map_err(open_err)?)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let header = GgufHeader::parse(&name, bytes)?;
        Ok(GgufFile {
            path: path.to_owned(),
            map,
            header,
            checksum: OnceLock::new(),
        })
    }

    /// Same validation as [`GgufFile::open`] over bytes in memory.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        GgufHeader::parse(name, bytes)
    }

    /// The path given to [`GgufFile::open`] or [`GgufFile::open_following`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The tensor's raw bytes in the map. `t` must come from this file.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        self.header.tensor_bytes_in(self.bytes(), t)
    }

    /// The tensor as f32: zero-copy for F32 (the map is page-aligned and
    /// offsets are aligned), converted for every other type with a codec
    /// ([`crate::quant::CODEC_TYPES`]).
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Cow<'_, [f32]>, GgufError> {
        self.header.tensor_f32_in(self.bytes(), t)
    }

    /// xxh3-64 of the tensor data section (from [`GgufHeader::data_offset`]
    /// to the end of the file): the model's identity. Computed on first use.
    pub fn checksum(&self) -> u64 {
        self.checksum_with(|| {})
    }

    /// [`GgufFile::checksum`], calling `tick` after every
    /// [`CHECKSUM_CHUNK`] bytes hashed (a worker beats its heartbeat from
    /// it, so hashing a 1 GiB model is not taken for a hang). The same
    /// value as the one-shot hash (xxh3 streamed).
    pub fn checksum_with(&self, mut tick: impl FnMut()) -> u64 {
        *self.checksum.get_or_init(|| {
            let data = &self.bytes()[self.header.data_range()];
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            for chunk in data.chunks(CHECKSUM_CHUNK) {
                hasher.update(chunk);
                tick();
            }
            hasher.digest()
        })
    }
}

/// Bytes hashed between two ticks of [`GgufFile::checksum_with`].
pub const CHECKSUM_CHUNK: usize = 16 << 20;

/// Parses a prefix `bytes` of a file of `file_len` bytes. Every bound is
/// checked against `file_len`, so a parse over a prefix gives the same
/// result as over the whole file, or [`Stop::NeedMore`] when it has to see
/// past the prefix.
struct Parser<'a> {
    name: &'a str,
    bytes: &'a [u8],
    file_len: u64,
    pos: usize,
}

/// Why a parse stopped.
pub(crate) enum Stop {
    /// The file is malformed.
    Bad(GgufError),
    /// The header runs past the prefix read so far (never for a whole file).
    NeedMore,
}

type PResult<T> = Result<T, Stop>;

/// Parses `bytes`, a prefix of a file of `file_len` bytes.
pub(crate) fn parse_prefix(name: &str, bytes: &[u8], file_len: u64) -> PResult<GgufHeader> {
    Parser {
        name,
        bytes,
        file_len,
        pos: 0,
    }
    .parse()
}

impl<'a> Parser<'a> {
    fn err(&self, offset: usize, kind: ParseErrorKind) -> Stop {
        Stop::Bad(GgufError::Parse {
            file: self.name.to_owned(),
            offset: offset as u64,
            kind,
        })
    }

    fn remaining(&self) -> u64 {
        self.file_len - self.pos as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> PResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                ParseErrorKind::Truncated {
                    what,
                    needed: n,
                    available: self.remaining(),
                },
            ));
        }
        // n <= remaining <= file_len: the end fits in u64; in usize once it
        // is within the prefix.
        let end = self.pos as u64 + n;
        if end > self.bytes.len() as u64 {
            return Err(Stop::NeedMore);
        }
        let s = &self.bytes[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> PResult<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> PResult<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.err(
                at,
                ParseErrorKind::StringTooLong {
                    len,
                    remaining: self.remaining(),
                },
            ));
        }
        let body_at = self.pos;
        let raw = self.take(len, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.err(
                body_at + e.valid_up_to(),
                ParseErrorKind::InvalidUtf8 { what },
            )),
        }
    }

    /// Checks that `count` items of at least `min` bytes each fit in the
    /// rest of the file.
    fn check_count(&self, at: usize, what: &'static str, count: u64, min: u64) -> PResult<()> {
        let max = self.remaining() / min;
        if count > max {
            return Err(self.err(
                at,
                ParseErrorKind::HugeCount {
                    what,
                    count,
                    remaining: self.remaining(),
                    max,
                },
            ));
        }
        Ok(())
    }

    fn value_type(&mut self) -> PResult<ValueType> {
        let at = self.pos;
        let id = self.u32("value type")?;
        ValueType::from_id(id).ok_or_else(|| self.err(at, ParseErrorKind::UnknownValueType { id }))
    }

    fn value(&mut self, t: ValueType, depth: usize) -> PResult<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>("u8 value")?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("i8 value")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array("u32 value")?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array("u64 value")?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>("bool value")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    byte => return Err(self.err(at, ParseErrorKind::BadBool { byte })),
                }
            }
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(
                        at,
                        ParseErrorKind::NestingTooDeep {
                            max: MAX_ARRAY_DEPTH,
                        },
                    ));
                }
                let elem_type = self.value_type()?;
                let len_at = self.pos;
                let len = self.u64("array length")?;
                if len > self.remaining() / elem_type.min_encoded_size() {
                    return Err(self.err(
                        len_at,
                        ParseErrorKind::ArrayTooLong {
                            len,
                            elem_type,
                            remaining: self.remaining(),
                        },
                    ));
                }
                // Bounded: len * min_encoded_size <= bytes left.
                let mut values = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    values.push(self.value(elem_type, depth + 1)?);
                }
                Value::Array(Array { elem_type, values })
            }
        })
    }

    fn parse(mut self) -> PResult<GgufHeader> {
        let magic: [u8; 4] = self.array("magic")?;
        if magic != MAGIC {
            return Err(self.err(0, ParseErrorKind::BadMagic { found: magic }));
        }
        let version = self.u32("version")?;
        if version != 2 && version != 3 {
            return Err(self.err(4, ParseErrorKind::UnsupportedVersion { version }));
        }
        let tc_at = self.pos;
        let n_tensors = self.u64("tensor count")?;
        let kv_at = self.pos;
        let n_kv = self.u64("metadata key count")?;
        // Both tables follow: each needs its minimum size.
        let rest = self.remaining();
        let max_t = rest / MIN_TENSOR_INFO_SIZE;
        if n_tensors > max_t {
            return Err(self.err(
                tc_at,
                ParseErrorKind::HugeCount {
                    what: "tensor",
                    count: n_tensors,
                    remaining: rest,
                    max: max_t,
                },
            ));
        }
        self.check_count(kv_at, "metadata key", n_kv, MIN_KV_SIZE)?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..n_kv {
            let key_at = self.pos;
            let key = self.string("metadata key")?;
            let vt = self.value_type()?;
            let value_at = self.pos;
            let value = self.value(vt, 0)?;
            if key == ALIGNMENT_KEY {
                match value {
                    Value::U32(a) if a != 0 && a.is_power_of_two() => alignment = a.into(),
                    Value::U32(a) => {
                        return Err(
                            self.err(value_at, ParseErrorKind::AlignmentValue { value: a.into() })
                        );
                    }
                    ref other => {
                        return Err(self.err(
                            value_at,
                            ParseErrorKind::AlignmentType {
                                found: other.value_type(),
                            },
                        ));
                    }
                }
            }
            if key_index.insert(key.clone(), i as usize).is_some() {
                return Err(self.err(key_at, ParseErrorKind::DuplicateKey { key }));
            }
            metadata.push((key, value));
        }

        self.check_count(tc_at, "tensor", n_tensors, MIN_TENSOR_INFO_SIZE)?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        let mut info_pos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = self.pos;
            info_pos.push(at);
            let name = self.string("tensor name")?;
            let nd_at = self.pos;
            let n_dims = self.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(self.err(
                    nd_at,
                    ParseErrorKind::TooManyDims {
                        tensor: name,
                        n_dims,
                    },
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for axis in 0..n_dims as usize {
                let d_at = self.pos;
                let d = self.u64("tensor dimension")?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(self.err(
                        d_at,
                        ParseErrorKind::BadDim {
                            tensor: name,
                            axis,
                            value: d,
                        },
                    ));
                }
                dims.push(d);
            }
            let t_at = self.pos;
            let id = self.u32("tensor type")?;
            let ttype = match TensorType::from_id(id) {
                Ok(t) => t,
                Err(TypeIdError::Unknown) => {
                    return Err(
                        self.err(t_at, ParseErrorKind::UnknownTensorType { tensor: name, id })
                    );
                }
                Err(TypeIdError::Removed(old)) => {
                    return Err(self.err(
                        t_at,
                        ParseErrorKind::RemovedTensorType {
                            tensor: name,
                            id,
                            name: old,
                        },
                    ));
                }
            };
            let off_at = self.pos;
            let offset = self.u64("tensor offset")?;
            let n_ok = dims
                .iter()
                .try_fold(1u64, |n, &d| {
                    n.checked_mul(d).filter(|&n| n <= i64::MAX as u64)
                })
                .is_some();
            let dim0 = dims.first().copied().unwrap_or(1);
            if n_ok && dim0 % ttype.block_size() != 0 {
                return Err(self.err(
                    nd_at,
                    ParseErrorKind::PartialBlock {
                        tensor: name,
                        dim0,
                        ttype,
                        block: ttype.block_size(),
                    },
                ));
            }
            let Some(size) = ttype.byte_size(&dims).filter(|_| n_ok) else {
                return Err(self.err(nd_at, ParseErrorKind::SizeOverflow { tensor: name, dims }));
            };
            if offset % alignment != 0 {
                return Err(self.err(
                    off_at,
                    ParseErrorKind::Misaligned {
                        tensor: name,
                        offset,
                        alignment,
                    },
                ));
            }
            if tensor_index.insert(name.clone(), i as usize).is_some() {
                return Err(self.err(at, ParseErrorKind::DuplicateTensor { tensor: name }));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ttype,
                offset,
                size,
            });
        }

        let file_len = self.file_len;
        let end_of_infos = self.pos as u64;
        // end_of_infos <= file_len, alignment <= 2^31: no overflow.
        let data_offset = end_of_infos.div_ceil(alignment) * alignment;
        let data_len = file_len.saturating_sub(data_offset);

        for (t, &at) in tensors.iter().zip(&info_pos) {
            let end = t.offset.checked_add(t.size);
            if end.is_none_or(|e| e > data_len) {
                return Err(self.err(
                    at,
                    ParseErrorKind::OutOfFile {
                        tensor: t.name.clone(),
                        start: t.offset,
                        end: end.unwrap_or(u64::MAX),
                        data_len,
                    },
                ));
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].offset, i));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            // In bounds above, so offset + size does not overflow.
            if b.offset < a.offset + a.size {
                return Err(self.err(
                    info_pos[w[1]],
                    ParseErrorKind::Overlap {
                        tensor: b.name.clone(),
                        other: a.name.clone(),
                    },
                ));
            }
        }

        Ok(GgufHeader {
            name: self.name.to_owned(),
            version,
            alignment,
            metadata,
            key_index,
            tensors,
            tensor_index,
            data_offset,
            file_len,
        })
    }
}
