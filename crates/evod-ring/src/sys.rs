//! Raw system calls the ring needs (memfd, seals, mmap, futex, clocks), each
//! wrapped once into an `io::Result`, in the style of mio's `syscall!`.
//!
//! Everything `unsafe` that talks to the kernel lives here; callers get safe
//! functions whose preconditions are checked or documented.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Runs a libc call and turns its `-1` return into the thread's `errno`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller of the macro states why the arguments are valid
        // for this call; the macro only adds the errno check.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// Adds the name of the failing system call to an I/O error.
pub(crate) fn ctx(call: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{call}: {e}"))
}

/// Creates an anonymous, sealable, close-on-exec memory file named `name`
/// (the name is only shown in `/proc/<pid>/fd`; nothing appears in `/dev/shm`).
pub(crate) fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // `name` is a valid NUL-terminated string that outlives the call.
    let fd = syscall!(memfd_create(
        name.as_ptr(),
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    ))
    .map_err(ctx("memfd_create"))?;
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the size of the file behind `fd`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ftruncate: size too large"))?;
    // `fd` is a live descriptor borrowed for the call.
    syscall!(ftruncate(fd.as_raw_fd(), len)).map_err(ctx("ftruncate"))?;
    Ok(())
}

/// Restricts the file's mode to owner read/write.
pub(crate) fn fchmod_owner_only(fd: BorrowedFd<'_>) -> io::Result<()> {
    syscall!(fchmod(fd.as_raw_fd(), 0o600)).map_err(ctx("fchmod"))?;
    Ok(())
}

/// The seals that make a segment's size immutable: a peer holding the
/// descriptor can then never shrink it under our mapping (which would turn
/// our reads into SIGBUS).
pub(crate) const SIZE_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Adds `seals` to a memfd.
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    syscall!(fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals)).map_err(ctx("fcntl(F_ADD_SEALS)"))?;
    Ok(())
}

/// Returns the seals of a memfd (fails with EINVAL for other files).
pub(crate) fn get_seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    syscall!(fcntl(fd.as_raw_fd(), libc::F_GET_SEALS)).map_err(ctx("fcntl(F_GET_SEALS)"))
}

/// Returns the size in bytes of the file behind `fd`.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // `st` is writable memory of the right type for fstat to fill.
    syscall!(fstat(fd.as_raw_fd(), st.as_mut_ptr())).map_err(ctx("fstat"))?;
    // SAFETY: fstat succeeded, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    u64::try_from(st.st_size).map_err(|_| io::Error::other("fstat: negative size"))
}

/// Checks that `fd` is an open descriptor of this process.
pub(crate) fn fd_is_open(fd: RawFd) -> io::Result<()> {
    syscall!(fcntl(fd, libc::F_GETFD)).map_err(ctx("fcntl(F_GETFD)"))?;
    Ok(())
}

/// Clears `FD_CLOEXEC` on `fd`. Async-signal-safe, so it may run in a
/// `pre_exec` hook: one fcntl, and the error is the raw errno (no context
/// string: nothing may allocate between fork and exec).
pub(crate) fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    syscall!(fcntl(fd, libc::F_SETFD, 0))?;
    Ok(())
}

/// A shared read/write mapping of a whole file; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through
// atomics or validated volatile copies (see `segment.rs`), so moving or
// sharing the handle between threads adds no data race of its own.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, readable and writable.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at an address the kernel picks aliases no
        // Rust object; `fd` is live for the call; the size was checked by the
        // caller against the (sealed) file size, so no access can SIGBUS.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ctx("mmap")(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap: returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The first byte of the mapping (page-aligned).
    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every
        // reference into the mapping borrows the `Segment` that owns `self`,
        // so none outlives this call.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// `futex(2)` on a word in shared memory: sleeps while `*word == expected`,
/// at most `timeout`. Uses the shared (not `FUTEX_PRIVATE_FLAG`) operation,
/// since the waker lives in another process. Returns `Ok(())` on wake-up,
/// timeout, spurious wake-up or value mismatch; the caller re-checks its
/// condition in every case.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-byte aligned u32 (an AtomicU32) for the whole
    // call; `ts_ptr` is null or points to `ts` on this stack frame. FUTEX_WAIT
    // only reads the word and the timeout.
    let res = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if res == -1 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => Ok(()),
            _ => Err(ctx("futex(FUTEX_WAIT)")(e)),
        }
    } else {
        Ok(())
    }
}

/// `futex(2)` wake of up to `n` waiters parked on `word` (shared operation).
/// Returns how many were woken.
pub fn futex_wake(word: &AtomicU32, n: i32) -> io::Result<usize> {
    // SAFETY: `word` is a live, aligned u32 for the call; FUTEX_WAKE does not
    // access memory through the pointer, it only uses its address as a key.
    let res = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if res == -1 {
        Err(ctx("futex(FUTEX_WAKE)")(io::Error::last_os_error()))
    } else {
        Ok(usize::try_from(res).unwrap_or(0))
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: a few ns to read, a few ms of
/// resolution, the same clock in every process of the machine. Used for
/// heartbeats and uptime, which live in the shared segment.
#[inline]
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill; the clock id
    // is a constant the kernel supports since 2.6.32.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
