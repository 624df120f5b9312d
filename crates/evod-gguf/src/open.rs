//! Opening a model file: regular files only, decided on the open file
//! descriptor (`fstat`), never on a path looked up twice.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{FileKind, GgufError};

/// Opens `path` read-only with `O_NONBLOCK | O_CLOEXEC` (and `O_NOFOLLOW`
/// unless `follow`), then refuses anything `fstat` says is not a regular
/// file. `O_NONBLOCK` makes opening a FIFO without a writer return at once
/// instead of blocking; it changes nothing for reads of a regular file.
/// Returns the file and its length at open.
pub(crate) fn open_regular(path: &Path, follow: bool) -> Result<(File, u64), GgufError> {
    let open_err = |source| GgufError::Open {
        path: path.to_owned(),
        source,
    };
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | nofollow)
        .open(path)
    {
        Ok(file) => file,
        // ELOOP from O_NOFOLLOW: the final component is a link. (ELOOP can
        // also mean a loop among the folders; then it stays Open.)
        Err(e)
            if !follow
                && e.raw_os_error() == Some(libc::ELOOP)
                && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            return Err(GgufError::Symlink {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    if let Some(kind) = FileKind::from_mode(meta.mode()) {
        return Err(GgufError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    Ok((file, meta.len()))
}
