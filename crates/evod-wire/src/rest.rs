//! The evolver's rest marker, `DIR/state/converged`: the one file through
//! which a resting evolver tells the supervisor (and so `evod status`) that
//! the run has converged and since when.
//!
//! The evolver writes it (atomically: temp file + rename) when it starts to
//! rest and removes it when it wakes; the supervisor only reads it. It is
//! one short line of JSON ([`Converged`]), so a torn or foreign file is
//! simply "not converged" ([`read`] returns `None`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The marker's path inside a run folder `dir`.
pub fn marker(dir: &Path) -> PathBuf {
    dir.join("state").join("converged")
}

/// What the marker says: the evolver rests since `since_unix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Converged {
    /// When the evolver started resting (seconds since the Unix epoch).
    pub since_unix: u64,
    /// The evolver's generation (metabolism cycle) when it started resting.
    pub generation: u64,
    /// The live model's generation then.
    pub model_generation: u64,
    /// The live model's fitness then, if it records one.
    pub fitness: Option<f64>,
    /// Why it rests, in words (`"reached the task's maximum 500"`,
    /// `"no better model in 1000 generations"`).
    pub reason: String,
}

/// Reads the marker of `dir`; `None` if there is none or it does not parse.
///
/// Read without ever blocking (the supervisor reads it on its event loop
/// and at scrape time): opened non-blocking, only a regular file, at most
/// [`MARKER_MAX`] bytes; a FIFO or a huge file put there is "not
/// converged", never a stuck loop.
pub fn read(dir: &Path) -> Option<Converged> {
    read_path(&marker(dir))
}

/// [`read`] of the marker at `path`.
pub fn read_path(path: &Path) -> Option<Converged> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(MARKER_MAX).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// Largest marker read (a real one is a short JSON line).
pub const MARKER_MAX: u64 = 4096;

/// Writes the marker of `dir` atomically (temp file, then rename).
pub fn write(dir: &Path, converged: &Converged) -> std::io::Result<()> {
    let path = marker(dir);
    let tmp = path.with_extension("tmp");
    let mut text = serde_json::to_string(converged).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Removes the marker of `dir`; a missing one is not an error.
pub fn clear(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(marker(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_garbage_is_not_converged() {
        let dir = std::env::temp_dir().join(format!("evod-rest-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        assert_eq!(read(&dir), None);
        let c = Converged {
            since_unix: 1_700_000_000,
            generation: 42,
            model_generation: 7,
            fitness: Some(500.0),
            reason: "reached the task's maximum 500".into(),
        };
        write(&dir, &c).unwrap();
        assert_eq!(read(&dir), Some(c));
        std::fs::write(marker(&dir), "{\"since_unix\":").unwrap();
        assert_eq!(read(&dir), None);
        clear(&dir).unwrap();
        clear(&dir).unwrap();
        assert!(!marker(&dir).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
