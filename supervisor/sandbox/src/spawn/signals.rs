//! The supervisor's termination signals while it waits: caught, turned into a kill of the sandbox
//! and a clean-up, instead of a death that leaves the sandbox half-cleaned.

use super::*;

/// Last termination signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) received by the supervisor while
/// it waited, when [`handle_termination_signals`] was called; 0 if none.
pub(super) static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// Signals that make the supervisor kill the sandbox and clean up instead of dying at once.
pub(super) const TERMINATION_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

extern "C" fn on_termination_signal(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// For the `carapace` binary: on SIGINT/SIGTERM/SIGHUP/SIGQUIT, kill the sandbox, reap it and
/// remove its cgroup instead of dying with it half-cleaned. The signals are blocked from now on
/// and only delivered inside [`Running::wait`]'s `ppoll` (no lost-wakeup race). The child
/// resets its signal mask and dispositions before exec.
pub fn handle_termination_signals() -> Result<(), SpawnError> {
    // SAFETY: installing a handler that only stores to an atomic (async-signal-safe), and
    // blocking signals for the calling thread; the sigset/sigaction structs are locals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in TERMINATION_SIGNALS {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_termination_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(SpawnError::Sys {
                    syscall: "sigaction",
                    source: io::Error::last_os_error(),
                });
            }
            libc::sigaddset(&mut set, sig);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(SpawnError::Sys {
                syscall: "pthread_sigmask",
                source: io::Error::from_raw_os_error(r),
            });
        }
    }
    Ok(())
}

/// The termination signal that interrupted the last wait, if any.
pub fn interrupted() -> Option<libc::c_int> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
