//! The worker side of the crash notice ([`evod_wire::notice`]): handlers
//! for the fatal signals that tell the supervisor a worker is dying before
//! the kernel has torn its memory down, then let it die of that signal.
//!
//! [`install`] puts one handler on SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT
//! and SIGTRAP ([`FATAL_SIGNALS`]), run on an alternate signal stack (the
//! thread's own, Rust's for threads std started, else one [`install`] maps
//! for the calling thread). It does only async-signal-safe work:
//!
//! 1. one `send(2)` of [`evod_wire::notice::crash`]`(signal)` on the
//!    notice link (a `write` that never blocks and raises no SIGPIPE:
//!    `MSG_DONTWAIT | MSG_NOSIGNAL`; nothing when the worker has none),
//!    then `setpriority(19)` for the crashing thread, so that the kernel's
//!    teardown of the process, which runs on it, yields the CPU to the
//!    supervisor the notice woke and to the replacement;
//! 2. then the process dies *of that signal*, so its exit status, the
//!    supervisor's crash accounting and the meaning of the fault opcodes
//!    are what they were:
//!    - a fault the kernel raised (`si_code > 0`: a bad access, a bad
//!      instruction, a division by zero) restores the action that was
//!      there before [`install`] and returns: the instruction faults again
//!      under it. For SIGSEGV and SIGBUS that is Rust's stack-overflow
//!      handler, which prints "thread … has overflowed its stack" and
//!      aborts (SIGABRT, after a second notice) for a hit on a guard page,
//!      and otherwise restores the default action and returns (death by
//!      SIGSEGV or SIGBUS);
//!    - a signal sent by a process (`kill -SEGV`, `raise`, `abort()`:
//!      `si_code <= 0`), SIGABRT and SIGTRAP restore the *default* action
//!      and raise the signal again; it is blocked while the handler runs,
//!      so it is delivered on return and kills. (Rust's handler, chained
//!      here, would return from a signal that is not a fault and the
//!      process would survive the first `kill -SEGV`.)
//!
//! A thread without an alternate stack that overflows its stack cannot run
//! the handler (the kernel kills the process with SIGSEGV): no notice, and
//! the supervisor learns of the death from SIGCHLD, as for SIGKILL.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals the handler reports.
pub const FATAL_SIGNALS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGTRAP,
];

/// The alternate stack mapped for a thread that had none.
const ALT_STACK_BYTES: usize = 64 << 10;

/// Where the handler writes; -1: nowhere.
static NOTICE_FD: AtomicI32 = AtomicI32::new(-1);
/// The action of each of [`FATAL_SIGNALS`] before [`install`], in order.
static PREVIOUS: OnceLock<[libc::sigaction; FATAL_SIGNALS.len()]> = OnceLock::new();

/// Installs the crash-notice handlers for the whole process, writing to
/// `fd` (`None`: no notice, but a signal sent from outside still kills at
/// once). A second call only changes the descriptor.
///
/// # Safety
///
/// `fd`, if given, must stay open for the life of the process and be the
/// worker's link (or nothing): it is written from a signal handler at any
/// moment, so a number closed and reused for another file would get the
/// byte. No other code may install handlers for [`FATAL_SIGNALS`]
/// afterwards and expect this one to be chained.
pub unsafe fn install(fd: Option<i32>) -> io::Result<()> {
    if let Some(fd) = fd {
        check_socket(fd)?;
    }
    // SeqCst: stored before the sigaction calls below, which a handler can
    // only run after.
    NOTICE_FD.store(fd.unwrap_or(-1), Ordering::SeqCst);
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    ensure_alt_stack()?;
    // SAFETY: `libc::sigaction` is plain data; all-zero is a valid value
    // (SIG_DFL, empty mask, no flags).
    let mut previous: [libc::sigaction; FATAL_SIGNALS.len()] = unsafe { std::mem::zeroed() };
    for (slot, &signal) in previous.iter_mut().zip(&FATAL_SIGNALS) {
        // SAFETY: a null new action only reads the current one into `slot`,
        // which we own.
        if unsafe { libc::sigaction(signal, std::ptr::null(), slot) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if PREVIOUS.set(previous).is_err() {
        // Another thread installed meanwhile.
        return Ok(());
    }
    // SAFETY: as above, all-zero is a valid `sigaction`.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_fatal;
    action.sa_sigaction = handler as libc::sighandler_t;
    // No SA_NODEFER: the signal stays blocked while the handler runs, so
    // the one it raises again is delivered when it returns.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: sigemptyset initialises the mask we own.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    for &signal in &FATAL_SIGNALS {
        // SAFETY: `on_fatal` has the SA_SIGINFO signature and does only
        // async-signal-safe work (atomic loads, write, sigaction, raise);
        // the previous actions it restores were saved above.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The handler (see the module documentation).
extern "C" fn on_fatal(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    let errno = unsafe { *libc::__errno_location() };
    let fd = NOTICE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = evod_wire::notice::crash(signal);
        // SAFETY: send(2) is async-signal-safe; it reads one byte from our
        // stack. Never blocks (a full link must not keep a dying worker
        // alive) and raises no SIGPIPE; a failure (the supervisor is gone)
        // changes nothing.
        unsafe {
            libc::send(
                fd,
                (&raw const byte).cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // The lowest priority for the rest of this thread's life: the
        // notice has just woken the supervisor, often on this CPU, and this
        // thread's next work is the kernel's teardown of the process
        // (milliseconds for a big model), which must not hold up the
        // supervisor and the replacement it is about to promote.
        // SAFETY: setpriority is a plain system call (no user-space state);
        // on Linux, PRIO_PROCESS with 0 names the calling thread.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    }
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo.
    let code = unsafe { (*info).si_code };
    let kernel_fault = code > 0 && signal != libc::SIGABRT && signal != libc::SIGTRAP;
    let previous = FATAL_SIGNALS
        .iter()
        .position(|&s| s == signal)
        .and_then(|k| PREVIOUS.get().map(|p| p[k]));
    if kernel_fault && let Some(previous) = previous {
        // SAFETY: sigaction is async-signal-safe; `previous` is the action
        // read by `install`, so it is valid to put back.
        unsafe { libc::sigaction(signal, &previous, std::ptr::null_mut()) };
        // SAFETY: as above, our thread's errno.
        unsafe { *libc::__errno_location() = errno };
        // Returning re-runs the faulting instruction under that action.
        return;
    }
    // SAFETY: all-zero is SIG_DFL with an empty mask; sigaction and raise
    // are async-signal-safe. The raised signal is blocked until this
    // handler returns, then kills the process by its default action.
    unsafe {
        let default: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, &default, std::ptr::null_mut());
        libc::raise(signal);
        *libc::__errno_location() = errno;
    }
}

/// Refuses a notice descriptor that is not an open socket (the link is
/// always one end of a socket pair).
fn check_socket(fd: i32) -> io::Result<()> {
    // SAFETY: `libc::stat` is plain data (all-zero is valid); fstat only
    // writes into it and reports a bad descriptor as EBADF.
    let (rc, mode) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st), st.st_mode)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("crash-notice descriptor {fd}: {e}"),
        ));
    }
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("crash-notice descriptor {fd} is not a socket"),
        ));
    }
    Ok(())
}

/// Gives the calling thread an alternate signal stack if it has none
/// (Rust's runtime gives one to its main thread and the threads std
/// starts; a Python interpreter's main thread has none). Leaked: it is
/// needed until the process ends.
fn ensure_alt_stack() -> io::Result<()> {
    // SAFETY: `stack_t` is plain data; all-zero is valid.
    let mut current: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new stack only reads the current one into `current`.
    if unsafe { libc::sigaltstack(std::ptr::null(), &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if current.ss_flags & libc::SS_DISABLE == 0 {
        return Ok(());
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096);
    // SAFETY: an anonymous private mapping with a null hint has no
    // preconditions; the result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page + ALT_STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // The lowest page is a guard: a handler that overflows the alternate
    // stack faults instead of writing below it.
    // SAFETY: the first page lies inside the mapping made above.
    if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let stack = libc::stack_t {
        // SAFETY: `page` bytes past the base is inside the mapping.
        ss_sp: unsafe { base.cast::<u8>().add(page) }.cast(),
        ss_flags: 0,
        ss_size: ALT_STACK_BYTES,
    };
    // SAFETY: the stack is a live mapping that is never unmapped.
    if unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the crash notice for `signal` on the link now, as the handler
/// would, without dying (fault injection: a hostile worker's notice; the
/// supervisor must kill and replace the worker).
pub fn send(signal: i32) -> io::Result<()> {
    let fd = NOTICE_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "this worker has no crash-notice link",
        ));
    }
    let byte = evod_wire::notice::crash(signal);
    // SAFETY: `fd` is the link `install`'s caller promised stays open; one
    // byte is read from our stack.
    match unsafe {
        libc::send(
            fd,
            (&raw const byte).cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    } {
        1 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
