//! Process file descriptors: signalling a process through a pidfd cannot hit a recycled pid.
//! The service's children and the broker's tools are both tracked this way.

use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags, Signal};

/// A pidfd for `pid`: our own unreaped child (whose pid cannot have been recycled yet), or a
/// process we just found in a cgroup of ours. None when the pid is not valid or the process is
/// gone.
pub fn open(pid: libc::pid_t) -> Option<OwnedFd> {
    // Pid::from_raw takes no negative value (0 gives None).
    if pid < 0 {
        return None;
    }
    let pid = Pid::from_raw(pid)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

/// Send `sig` through a pidfd; false when the process is gone (or the signal is not valid).
pub fn signal(fd: &OwnedFd, sig: libc::c_int) -> bool {
    let Some(sig) = Signal::from_named_raw(sig) else {
        return false;
    };
    rustix::process::pidfd_send_signal(fd, sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_reach_the_process_and_not_after_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = open(child.id() as libc::pid_t).expect("pidfd of our child");
        assert!(signal(&fd, libc::SIGKILL));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: the pidfd now refers to a process that is gone.
        assert!(!signal(&fd, libc::SIGKILL));
        assert!(open(0).is_none() && open(-1).is_none());
    }
}
