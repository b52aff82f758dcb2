//! The systemd service protocol without libsystemd: readiness notifications over
//! `NOTIFY_SOCKET` (sd_notify(3)) and socket activation (`LISTEN_FDS`, sd_listen_fds(3)).
//!
//! Both read their environment variables once and remove them from the process environment,
//! so that no child ever inherits them (a child that could write to `NOTIFY_SOCKET` could tell
//! systemd we are ready, reloading or stopping; with `NotifyAccess=main` systemd ignores it
//! anyway, but it has no business knowing the socket). Call [`Notifier::from_env`] and
//! [`listen_fds`] early in `main`, before other threads read the environment.
//!
//! The messages themselves (`READY=1`, `RELOADING=1`, `MONOTONIC_USEC=`, `STOPPING=1`,
//! `WATCHDOG=1`, `STATUS=`) and the monotonic clock come from the `sd-notify` crate
//! ([`NotifyState`]). The rest is written here because the crate's functions do not fit:
//! - `sd_notify::notify` reads `NOTIFY_SOCKET` from the environment at every call, so it sends
//!   nothing once the variable is removed (and its `*_and_unset_env` variants unset it only at
//!   their call, process-wide, when threads and children already exist); it also connects to
//!   the value as a path, so an abstract socket (`@name`, which sd_notify(3) allows) is never
//!   reached. The socket is read once here and kept in the [`Notifier`].
//! - `sd_notify::watchdog_enabled` reads the environment only, ignores a malformed
//!   `WATCHDOG_USEC` or `WATCHDOG_PID` (a malformed pid even enables the watchdog for us) and
//!   accepts `WATCHDOG_USEC=0`; sd_watchdog_enabled(3) fails on all three, as
//!   [`Notifier::from_vars`] does.
//! - `sd_notify::listen_fds_with_names` reads the environment only and hands out raw fds; here
//!   the values are parsed as given (tested without touching the environment), the count is
//!   bounded, and the fds become `OwnedFd`s exactly once ([`listen_fds`]).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// `NOTIFY_SOCKET`: where systemd listens for our notifications.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// `WATCHDOG_USEC`: the unit's `WatchdogSec=` in microseconds.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// `WATCHDOG_PID`: the process the watchdog setting is meant for.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";
/// `LISTEN_PID`: the process the passed sockets are meant for.
pub const LISTEN_PID_ENV: &str = "LISTEN_PID";
/// `LISTEN_FDS`: how many sockets systemd passed, from fd 3 on.
pub const LISTEN_FDS_ENV: &str = "LISTEN_FDS";
/// `LISTEN_FDNAMES`: their `FileDescriptorName=`s, colon-separated.
pub const LISTEN_FDNAMES_ENV: &str = "LISTEN_FDNAMES";
/// The first fd passed by socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// More passed sockets than this is taken for a corrupt environment.
pub const MAX_LISTEN_FDS: usize = 256;

/// Errors of the notification and socket-activation protocol.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "{NOTIFY_SOCKET_ENV}={value:?} is neither an absolute path nor an abstract socket (@name)"
    )]
    BadSocket { value: String },
    #[error("{var}={value:?} is not {expected}")]
    BadVar {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("socket(AF_UNIX, SOCK_DGRAM) for {NOTIFY_SOCKET_ENV} failed")]
    Socket(#[source] io::Error),
    #[error("sendto({target}) of {msg:?} failed")]
    Send {
        target: String,
        msg: String,
        #[source]
        source: io::Error,
    },
    #[error("sendto({target}) sent {sent} of {len} bytes")]
    ShortSend {
        target: String,
        sent: usize,
        len: usize,
    },
    #[error("{LISTEN_FDNAMES_ENV} names {names} sockets but {LISTEN_FDS_ENV} is {fds}")]
    NameCount { names: usize, fds: usize },
    #[error("fcntl(fd {fd}, {op}) on a socket passed by systemd failed")]
    Fcntl {
        fd: RawFd,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the sockets passed by systemd were already taken by an earlier call")]
    AlreadyTaken,
}

/// Where notifications go.
#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// For messages: the path, or `@name`.
    shown: String,
}

/// A handle on systemd's notification socket; every method is a no-op (returning `Ok`) when
/// the service was not started with `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog_usec: Option<u64>,
}

/// Current CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it (0 if the clock
/// cannot be read, which Linux does not allow to happen).
fn monotonic_usec() -> u64 {
    match NotifyState::monotonic_usec_now() {
        Ok(NotifyState::MonotonicUsec(us)) => u64::try_from(us).unwrap_or(0),
        _ => 0,
    }
}

/// The message of `states`: one `KEY=value` assignment per line.
fn message(states: &[NotifyState<'_>]) -> String {
    states
        .iter()
        .map(NotifyState::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line of a STATUS= value: systemd reads one assignment per line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

fn our_pid() -> u32 {
    std::process::id()
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog_usec: None,
        }
    }

    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and remove them from the
    /// environment (whatever their values). Without `NOTIFY_SOCKET`, a disabled notifier.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let socket = std::env::var_os(NOTIFY_SOCKET_ENV);
        let usec = std::env::var_os(WATCHDOG_USEC_ENV);
        let pid = std::env::var_os(WATCHDOG_PID_ENV);
        for v in [NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV] {
            std::env::remove_var(v);
        }
        Notifier::from_vars(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            our_pid(),
        )
    }

    /// [`Notifier::from_env`] with the values given (`pid` is ours).
    pub fn from_vars(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let watchdog_usec = parse_watchdog(watchdog_usec, watchdog_pid, pid)?;
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let bytes = socket.as_bytes();
        let shown = socket.to_string_lossy().into_owned();
        let addr = if let Some(name) = bytes.strip_prefix(b"@") {
            SocketAddr::from_abstract_name(name).map_err(|_| NotifyError::BadSocket {
                value: shown.clone(),
            })?
        } else if bytes.starts_with(b"/") && !bytes.contains(&0) {
            SocketAddr::from_pathname(PathBuf::from(socket)).map_err(|_| {
                NotifyError::BadSocket {
                    value: shown.clone(),
                }
            })?
        } else {
            return Err(NotifyError::BadSocket { value: shown });
        };
        // UnixDatagram sockets from std are created with SOCK_CLOEXEC.
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some(Target {
                socket: sock,
                addr,
                shown,
            }),
            watchdog_usec,
        })
    }

    /// Whether notifications are sent at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `msg` (newline-separated `KEY=value` assignments) as one datagram.
    pub fn notify(&self, msg: &str) -> Result<(), NotifyError> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        let sent = t
            .socket
            .send_to_addr(msg.as_bytes(), &t.addr)
            .map_err(|source| NotifyError::Send {
                target: t.shown.clone(),
                msg: msg.to_string(),
                source,
            })?;
        if sent != msg.len() {
            return Err(NotifyError::ShortSend {
                target: t.shown.clone(),
                sent,
                len: msg.len(),
            });
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        let status = one_line(status);
        self.notify(&message(&[
            NotifyState::Ready,
            NotifyState::Status(&status),
        ]))
    }

    /// `RELOADING=1` with the current `MONOTONIC_USEC` (required by `Type=notify-reload`, and
    /// harmless with `Type=notify`); send [`Notifier::ready`] when the reload is done.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        let now = i128::from(monotonic_usec());
        self.notify(&message(&[
            NotifyState::Reloading,
            NotifyState::MonotonicUsec(now),
        ]))
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notify(&message(&[NotifyState::Stopping]))
    }

    /// `WATCHDOG=1` (send it every [`Notifier::watchdog_interval`]).
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify(&message(&[NotifyState::Watchdog]))
    }

    /// `STATUS=<one line>`, shown by `systemctl status`.
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        let status = one_line(status);
        self.notify(&message(&[NotifyState::Status(&status)]))
    }

    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec=`, as sd_watchdog_enabled(3)
    /// advises; None when the watchdog is off, not meant for us, or nothing is sent at all.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        self.watchdog_usec
            .map(|us| Duration::from_micros((us / 2).max(1)))
    }
}

fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our: u32,
) -> Result<Option<u64>, NotifyError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(p) = pid {
        let s = p.to_string_lossy();
        let n: u32 = s.trim().parse().map_err(|_| NotifyError::BadVar {
            var: WATCHDOG_PID_ENV,
            value: s.to_string(),
            expected: "a process id",
        })?;
        if n != our {
            return Ok(None);
        }
    }
    let s = usec.to_string_lossy();
    match s.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(NotifyError::BadVar {
            var: WATCHDOG_USEC_ENV,
            value: s.to_string(),
            expected: "a positive number of microseconds",
        }),
    }
}

/// Whether the passed sockets were taken (they can be owned once only).
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// What the socket-activation variables say: how many fds, and their names.
fn parse_listen_env(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    names: Option<&OsStr>,
    our: u32,
) -> Result<Vec<Option<String>>, NotifyError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    let pid_s = pid.to_string_lossy();
    let pid: u32 = pid_s.trim().parse().map_err(|_| NotifyError::BadVar {
        var: LISTEN_PID_ENV,
        value: pid_s.to_string(),
        expected: "a process id",
    })?;
    if pid != our {
        return Ok(Vec::new());
    }
    let fds_s = fds.to_string_lossy();
    let n: usize = match fds_s.trim().parse() {
        Ok(n) if n <= MAX_LISTEN_FDS => n,
        _ => {
            return Err(NotifyError::BadVar {
                var: LISTEN_FDS_ENV,
                value: fds_s.to_string(),
                expected: "a number of file descriptors (at most 256)",
            })
        }
    };
    let names: Vec<Option<String>> = match names {
        None => vec![None; n],
        Some(s) => {
            let s = s.to_string_lossy();
            let v: Vec<Option<String>> = if s.is_empty() && n == 0 {
                Vec::new()
            } else {
                s.split(':')
                    .map(|x| (!x.is_empty()).then(|| x.to_string()))
                    .collect()
            };
            if v.len() != n {
                return Err(NotifyError::NameCount {
                    names: v.len(),
                    fds: n,
                });
            }
            v
        }
    };
    Ok(names)
}

/// Take ownership of `names.len()` fds starting at `start`, marking each close-on-exec.
fn take_fds(
    start: RawFd,
    names: Vec<Option<String>>,
) -> Result<Vec<(OwnedFd, Option<String>)>, NotifyError> {
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let fd = start + i as RawFd;
        // SAFETY: fcntl(F_GETFD) only queries the fd table; an fd that is not open fails
        // with EBADF, which is reported.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(NotifyError::Fcntl {
                fd,
                op: "F_GETFD",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: as above; setting FD_CLOEXEC on an open fd has no other effect.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(NotifyError::Fcntl {
                fd,
                op: "F_SETFD",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the fd is open (F_GETFD succeeded); by the socket-activation protocol it was
        // passed to this process for it to own, and nothing else in the process owns it: the
        // caller makes sure this runs once (LISTEN_FDS_TAKEN, and the variables are removed).
        out.push((unsafe { OwnedFd::from_raw_fd(fd) }, name));
    }
    Ok(out)
}

/// The sockets systemd passed by socket activation (`LISTEN_PID` == our pid, `LISTEN_FDS`
/// sockets from fd 3 on, named by `LISTEN_FDNAMES`), owned and close-on-exec. Empty when none
/// were passed or they were meant for another process. Removes the three variables from the
/// environment; a second call fails with [`NotifyError::AlreadyTaken`] if the first took any.
pub fn listen_fds() -> Result<Vec<(OwnedFd, Option<String>)>, NotifyError> {
    let pid = std::env::var_os(LISTEN_PID_ENV);
    let fds = std::env::var_os(LISTEN_FDS_ENV);
    let names = std::env::var_os(LISTEN_FDNAMES_ENV);
    for v in [LISTEN_PID_ENV, LISTEN_FDS_ENV, LISTEN_FDNAMES_ENV] {
        std::env::remove_var(v);
    }
    let names = parse_listen_env(pid.as_deref(), fds.as_deref(), names.as_deref(), our_pid())?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(NotifyError::AlreadyTaken);
    }
    take_fds(LISTEN_FDS_START, names)
}

#[cfg(test)]
mod tests;
