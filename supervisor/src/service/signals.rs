//! Signals: handlers that only write the signal number into a pipe (a self-pipe, async-signal-
//! safe); the main thread reads it.

use super::*;

pub(super) static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = u8::try_from(sig).unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; `b` is a valid one-byte buffer. A full pipe
        // (EAGAIN, the fd is non-blocking) only loses a duplicate of a signal already queued.
        unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
    }
}

/// The signals the service acts on.
pub(super) const SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Install the handlers; returns the pipe's read end.
pub(super) fn catch_signals() -> io::Result<OwnedFd> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else. The write end
    // is kept open for the life of the process (the handler uses it), so it is leaked on
    // purpose into SIGNAL_PIPE.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction is valid; the handler only calls write(2) on an fd
        // (async-signal-safe). SA_RESTART: other threads' syscalls restart where they can.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Unblock it, should the caller have inherited a mask that blocks it.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
    Ok(read)
}

/// Wait up to `timeout` for a signal; the next one caught, if any.
pub(super) fn next_signal(pipe: &OwnedFd, timeout: Duration) -> Option<libc::c_int> {
    let mut pfd = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r <= 0 {
        return None;
    }
    let mut b = 0u8;
    // SAFETY: reading one byte into a valid buffer from our own non-blocking pipe.
    let n = unsafe { libc::read(pipe.as_raw_fd(), std::ptr::addr_of_mut!(b).cast(), 1) };
    (n == 1).then_some(libc::c_int::from(b))
}
