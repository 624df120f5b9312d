//! Rest when converged: [`Patience`] decides when a service-mode run has
//! nothing left to gain, and [`Alarm`] blocks the resting evolver until
//! something could change that.
//!
//! The evolver rests after `--patience N` generations without a better
//! published model, or at once when the live model reaches the task's known
//! maximum (CartPole's 500). Resting, it evaluates nothing: it writes the
//! marker `state/converged` ([`evod_wire::rest`], which `evod status`
//! shows) and blocks in one `read` on a self-pipe fed by the signal handlers,
//! with a 1 s timeout at which it looks at the task's CSV data file. It wakes
//! on SIGHUP (`evod wake` and the supervisor's own SIGHUP both send it), on a
//! changed data file, and stops on SIGTERM/SIGINT. A rollback restarts the
//! evolver on another live generation, which no longer matches the marker.
//! Bounded runs (`--generations`, `--until-solved`) never rest.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use evod_runtime::Task;
use evod_wire::rest::Converged;

/// How often a resting evolver looks at the task's data file.
pub const DATA_POLL: Duration = Duration::from_secs(1);

/// The best fitness `task` can reach, where it is known: CartPole's
/// episode cap (500 steps, one point each).
pub fn task_maximum(task: &Task) -> Option<f64> {
    match task {
        Task::CartPole { .. } => Some(f64::from(evod_runtime::cartpole::MAX_STEPS)),
        _ => None,
    }
}

/// Counts generations without a better published model.
#[derive(Debug)]
pub struct Patience {
    /// Generations to wait; 0: never rest.
    limit: u64,
    /// The task's maximum fitness, if known.
    maximum: Option<f64>,
    /// Generations since the last publish (or start, or wake).
    waited: u64,
    /// Woken by an operator: the maximum rule no longer applies, only the
    /// count (a model at the maximum then rests after `limit` generations).
    woken: bool,
}

impl Patience {
    /// `limit` generations (0: never), resting at once at `maximum`.
    pub fn new(limit: u64, maximum: Option<f64>) -> Patience {
        Patience {
            limit,
            maximum,
            waited: 0,
            woken: false,
        }
    }

    /// Counts one generation; `published` resets the count.
    pub fn generation(&mut self, published: bool) {
        self.waited = if published { 0 } else { self.waited + 1 };
    }

    /// Starts counting afresh after a wake; from now on only the count
    /// makes it rest.
    pub fn woken(&mut self) {
        self.waited = 0;
        self.woken = true;
    }

    /// Why to rest now, given the live model's fitness; `None`: evolve on.
    pub fn converged(&self, live_fitness: Option<f64>) -> Option<String> {
        if self.limit == 0 {
            return None;
        }
        if let (false, Some(max), Some(f)) = (self.woken, self.maximum, live_fitness)
            && f >= max
        {
            return Some(format!("the live model reached the task's maximum {max}"));
        }
        (self.waited >= self.limit).then(|| {
            format!(
                "no better model in {} generation{}",
                self.waited,
                if self.waited == 1 { "" } else { "s" }
            )
        })
    }
}

/// Why a rest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// SIGHUP (`evod wake`, or SIGHUP to the supervisor).
    Hangup,
    /// The task's data file changed (its size, mtime or inode).
    DataChanged(PathBuf),
    /// SIGTERM or SIGINT: stop.
    Stop,
}

/// The signals a resting evolver waits for: SIGTERM/SIGINT set `stop`,
/// SIGHUP sets `hangup`, and each writes a byte to a self-pipe that
/// [`Alarm::rest`] blocks on.
pub struct Alarm {
    stop: Arc<AtomicBool>,
    hangup: Arc<AtomicBool>,
    pipe: UnixStream,
}

impl Alarm {
    /// Installs the handlers. `stop` is the flag the ring evaluator also
    /// watches. From now on SIGHUP no longer ends the process.
    pub fn install(stop: Arc<AtomicBool>) -> Result<Alarm> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let hangup = Arc::new(AtomicBool::new(false));
        let (pipe, writer) = UnixStream::pair().context("creating the signal pipe")?;
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&stop))
                .context("installing the SIGTERM handler")?;
        }
        signal_hook::flag::register(SIGHUP, Arc::clone(&hangup))
            .context("installing the SIGHUP handler")?;
        for signal in [SIGTERM, SIGINT, SIGHUP] {
            let w = writer.try_clone().context("cloning the signal pipe")?;
            signal_hook::low_level::pipe::register(signal, w)
                .context("installing the signal pipe")?;
        }
        Ok(Alarm { stop, hangup, pipe })
    }

    /// Whether a SIGHUP came since the last call (and forgets it).
    pub fn take_hangup(&self) -> bool {
        self.hangup.swap(false, Ordering::Relaxed)
    }

    /// Forgets signal bytes and a SIGHUP that came before the rest began
    /// (a stop request is kept). Call before announcing the rest, so that
    /// any wake after the announcement is seen.
    pub fn arm(&mut self) {
        let _ = self.pipe.set_nonblocking(true);
        let mut buf = [0u8; 64];
        while matches!(self.pipe.read(&mut buf), Ok(n) if n > 0) {}
        let _ = self.pipe.set_nonblocking(false);
        self.hangup.store(false, Ordering::Relaxed);
    }

    /// Blocks until a signal or a change of `data` (checked every
    /// [`DATA_POLL`]); evaluates nothing meanwhile.
    pub fn rest(&mut self, data: Option<&Path>) -> Wake {
        let seen = data.and_then(identity);
        let _ = self.pipe.set_read_timeout(Some(DATA_POLL));
        let mut buf = [0u8; 64];
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Wake::Stop;
            }
            if self.take_hangup() {
                return Wake::Hangup;
            }
            if let Some(path) = data
                && data.and_then(identity) != seen
            {
                return Wake::DataChanged(path.to_owned());
            }
            // Returns at a signal byte, or after DATA_POLL (timeout).
            match self.pipe.read(&mut buf) {
                Ok(n) if n > 0 => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                // Cannot happen while the handlers hold the write ends;
                // keep the loop at one turn per DATA_POLL all the same.
                _ => std::thread::sleep(DATA_POLL),
            }
        }
    }
}

/// What identifies a version of a data file: (dev, ino, size, mtime in
/// seconds, its nanoseconds). A tuple, not `mtime × 10^9`: that overflows
/// `i64` for an mtime set past the year 2262.
fn identity(path: &Path) -> Option<(u64, u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The data file of a `csv:` task string (`csv:PATH:TARGET[:KIND]`).
pub fn data_file(task: &Task) -> Option<PathBuf> {
    match task {
        Task::Csv(t) => Some(t.path.clone()),
        _ => None,
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The marker a restarted evolver may resume resting from: it is for this
/// very state (same evolver generation and live model generation).
pub fn resumable(dir: &Path, generation: u64, model_generation: u64) -> Option<Converged> {
    evod_wire::rest::read(dir)
        .filter(|c| c.generation == generation && c.model_generation == model_generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_counts_generations_without_a_publish() {
        let mut p = Patience::new(3, None);
        for _ in 0..2 {
            p.generation(false);
        }
        assert_eq!(p.converged(Some(10.0)), None);
        p.generation(true);
        p.generation(false);
        p.generation(false);
        assert_eq!(p.converged(None), None);
        p.generation(false);
        assert!(p.converged(None).unwrap().contains("3 generations"));
        p.woken();
        assert_eq!(p.converged(None), None);
    }

    #[test]
    fn maximum_rests_at_once_and_zero_never_rests() {
        let p = Patience::new(1000, Some(500.0));
        assert_eq!(p.converged(Some(499.0)), None);
        assert!(p.converged(Some(500.0)).unwrap().contains("maximum 500"));
        // Woken at the maximum: evolves `limit` generations, then rests.
        let mut p = Patience::new(2, Some(500.0));
        p.woken();
        assert_eq!(p.converged(Some(500.0)), None);
        p.generation(false);
        p.generation(false);
        assert!(p.converged(Some(500.0)).unwrap().contains("2 generations"));
        let mut off = Patience::new(0, Some(500.0));
        off.generation(false);
        assert_eq!(off.converged(Some(500.0)), None);
    }

    #[test]
    fn a_data_file_dated_past_2262_is_identified_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        std::fs::write(&path, "x\n").unwrap();
        // Year 2381: seconds × 10^9 no longer fits an i64.
        let secs = 13_000_000_000u64;
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        let id = identity(&path).unwrap();
        assert_eq!(id.3, secs as i64, "the file system kept the date");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when + std::time::Duration::from_secs(1))
            .unwrap();
        assert_ne!(identity(&path), Some(id));
    }
}
