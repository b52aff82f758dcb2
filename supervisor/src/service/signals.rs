//! Signals: handlers that only write the signal number into a pipe (a self-pipe, async-signal-
//! safe); the main thread reads it.

use std::sync::OnceLock;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::*;

/// The pipe's write end, kept open for the life of the process (the handler uses it).
static SIGNAL_PIPE: OnceLock<OwnedFd> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe: OnceLock::get is an atomic load, rustix::io::write the bare write(2)
    // syscall; nothing here allocates or locks. A full pipe (EAGAIN, the fd is non-blocking)
    // only loses a duplicate of a signal already queued.
    if let Some(fd) = SIGNAL_PIPE.get() {
        let b = u8::try_from(sig).unwrap_or(0);
        let _ = rustix::io::write(fd, &[b]);
    }
}

/// The signals the service acts on.
pub(super) const SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Install the handlers (once per process); returns the pipe's read end.
pub(super) fn catch_signals() -> io::Result<OwnedFd> {
    use rustix::pipe::{pipe_with, PipeFlags};
    let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    SIGNAL_PIPE.set(write).map_err(|_| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the signal handlers are already installed",
        )
    })?;
    // SA_RESTART: other threads' syscalls restart where they can.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in SIGNALS {
        let sig = Signal::try_from(sig).map_err(io::Error::from)?;
        // SAFETY: the handler only calls async-signal-safe code (see `on_signal`), and no
        // other handler for these signals is replaced that Rust code relies on.
        unsafe { sigaction(sig, &action) }.map_err(io::Error::from)?;
        // Unblock it, should the caller have inherited a mask that blocks it.
        let mut set = SigSet::empty();
        set.add(sig);
        set.thread_unblock().map_err(io::Error::from)?;
    }
    Ok(read)
}

/// Wait up to `timeout` for a signal; the next one caught, if any.
pub(super) fn next_signal(pipe: &OwnedFd, timeout: Duration) -> Option<libc::c_int> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec::try_from(timeout).ok();
    let mut pfd = [PollFd::new(pipe, PollFlags::IN)];
    if !matches!(poll(&mut pfd, timeout.as_ref()), Ok(n) if n > 0) {
        return None;
    }
    let mut b = [0u8; 1];
    match rustix::io::read(pipe, &mut b) {
        Ok(1) => Some(libc::c_int::from(b[0])),
        _ => None,
    }
}
