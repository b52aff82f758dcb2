//! A started program: waiting for it (bounded by its wall time, killing the tree on timeout or on a
//! termination signal), reaping it, its exit report.

use super::*;

/// A started program.
#[derive(Debug)]
pub struct Running {
    pub(super) pid: libc::pid_t,
    pub(super) pidfd: OwnedFd,
    /// Read end of the init's status pipe: the program's raw wait status.
    pub(super) status: OwnedFd,
    pub(super) started: Instant,
    pub(super) reaped: bool,
    /// A brokered network's listeners inside the sandbox, until the caller takes them.
    pub(super) forward: Vec<crate::egress::Listener>,
}

/// Kill and reap `pid`, our child whose pidfd is `pidfd`, that never got a [`Running`] here
/// (a failed start through the spawner).
pub(crate) fn kill_and_reap_child(pid: libc::pid_t, pidfd: &OwnedFd) {
    // SAFETY: signalling our own child through its pidfd (no pid reuse race).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out pointer; EINTR retried.
    while unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// What a [`Running`] holds, for the spawner to send (see [`Running::into_parts`]).
pub(crate) struct RunningParts {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: OwnedFd,
    pub(crate) status: OwnedFd,
    pub(crate) started: Instant,
    pub(crate) forward: Vec<crate::egress::Listener>,
}

impl Running {
    /// A program started by the spawner as our child (see [`crate::spawner`]).
    pub(crate) fn from_parts(
        pid: libc::pid_t,
        pidfd: OwnedFd,
        status: OwnedFd,
        started: Instant,
        forward: Vec<crate::egress::Listener>,
    ) -> Running {
        Running {
            pid,
            pidfd,
            status,
            started,
            reaped: false,
            forward,
        }
    }

    /// Give up this program without killing it: the spawner hands it to the supervisor,
    /// its parent, which waits for it.
    pub(crate) fn into_parts(self) -> RunningParts {
        let mut me = std::mem::ManuallyDrop::new(self);
        let forward = std::mem::take(&mut me.forward);
        // SAFETY: `me` is never dropped (ManuallyDrop) nor used after these reads, so each
        // descriptor is moved out exactly once.
        let (pidfd, status) = unsafe { (std::ptr::read(&me.pidfd), std::ptr::read(&me.status)) };
        RunningParts {
            pid: me.pid,
            pidfd,
            status,
            started: me.started,
            forward,
        }
    }

    /// Host pid of the sandbox's init (pid 1 of its namespace; the program is its child).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// A brokered network's listeners (empty otherwise); whoever takes them forwards what
    /// arrives there. Left untaken, they close with the run and every connection is refused.
    pub fn take_forward(&mut self) -> Vec<crate::egress::Listener> {
        std::mem::take(&mut self.forward)
    }

    pub(super) fn kill(&self) {
        // SAFETY: signalling our own child through its pidfd (no pid reuse race).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
    }

    pub(super) fn kill_and_reap(mut self) {
        self.kill();
        let _ = self.reap();
    }

    pub(super) fn reap(&mut self) -> Result<(i32, libc::rusage), SpawnError> {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waiting for our own child with valid out pointers.
            let r = unsafe { libc::wait4(self.pid, &mut status, libc::__WALL, &mut ru) };
            if r == self.pid {
                self.reaped = true;
                return Ok((status, ru));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(SpawnError::Sys {
                    syscall: "wait4",
                    source: e,
                });
            }
        }
    }

    /// Wait for the program, killing the whole tree when `wall_time` runs out.
    pub fn wait(
        mut self,
        wall_time: Option<Duration>,
        cgroup: Option<&Cgroup>,
    ) -> Result<ExitReport, SpawnError> {
        let deadline = wall_time.map(|w| self.started + w);
        let mut timed_out = false;
        let mut killed = false;
        // Wait with the termination signals unblocked (see handle_termination_signals).
        // SAFETY: reading the current mask into a local sigset.
        let wait_mask = unsafe {
            let mut m: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut m);
            for sig in TERMINATION_SIGNALS {
                libc::sigdelset(&mut m, sig);
            }
            m
        };
        loop {
            let timeout_ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so we never wake early and spin.
                    let ms = left.as_micros().div_ceil(1000);
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ts = libc::timespec {
                tv_sec: libc::time_t::from(timeout_ms / 1000),
                tv_nsec: libc::c_long::from(timeout_ms % 1000) * 1_000_000,
            };
            let ts_ptr = if timeout_ms < 0 {
                std::ptr::null()
            } else {
                &ts as *const libc::timespec
            };
            // SAFETY: one valid pollfd, a valid timespec or NULL, a valid sigset.
            let r = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, &wait_mask) };
            if r > 0 {
                break;
            }
            if r == 0 {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    timed_out = true;
                    self.kill();
                    if let Some(cg) = cgroup {
                        // The pid namespace dies with its pid 1; the cgroup kill is the
                        // belt to those braces. Failure here must not hide the timeout.
                        if let Err(e) = cg.kill_all() {
                            tracing::warn!("cgroup kill after timeout: {e}");
                        }
                    }
                    break;
                }
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(SpawnError::Sys {
                    syscall: "ppoll(pidfd)",
                    source: e,
                });
            }
            if interrupted().is_some() && !killed {
                killed = true;
                self.kill();
                if let Some(cg) = cgroup {
                    if let Err(e) = cg.kill_all() {
                        tracing::warn!("cgroup kill after interrupt: {e}");
                    }
                }
            }
        }
        let (init_status, ru) = self.reap()?;
        // The program's own status, as the sandbox's init saw it; else the init's (killed by
        // us on timeout, or died before the program was started).
        let mut b = [0u8; 4];
        let status = match fds::read_full(&self.status, &mut b, "init status pipe") {
            Ok(4) => i32::from_ne_bytes(b),
            _ => init_status,
        };
        let wall = self.started.elapsed();
        let stats = cgroup.map(|c| c.stats()).unwrap_or_default();
        let tv = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        let cpu = stats
            .cpu_usage_ns
            .map(Duration::from_nanos)
            .unwrap_or_else(|| tv(ru.ru_utime) + tv(ru.ru_stime));
        let peak_mem = stats.peak_memory_bytes.unwrap_or_else(|| {
            u64::try_from(ru.ru_maxrss)
                .unwrap_or(0)
                .saturating_mul(1024)
        });
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        Ok(ExitReport {
            code,
            signal,
            wall,
            cpu,
            peak_mem,
            oom_killed: stats.oom_killed,
            timed_out,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.reap();
        }
    }
}
