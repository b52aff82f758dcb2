//! File descriptors: the sync pipes between parent and child, the CLOEXEC exec-error pipe, and
//! closing everything but stdio before exec.
//!
//! The exec-error pipe pattern: the parent makes a pipe with `O_CLOEXEC`; the child keeps the
//! write end open to the end. If `execve` succeeds, the kernel closes it and the parent's read
//! returns EOF (0 bytes). If any step of the child fails, it writes a fixed-size
//! [`ChildFailure`] record (stage, index, errno) and exits, so the parent can say exactly which
//! step failed and why. stdio (0, 1, 2) is inherited as is: the program's stdin/stdout/stderr
//! are the supervisor's.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("{syscall} ({what}): {source}")]
    Sys {
        syscall: &'static str,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A pipe, both ends `O_CLOEXEC`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    pub fn new(what: &'static str) -> Result<Pipe, FdError> {
        let mut p = [0 as libc::c_int; 2];
        // SAFETY: `p` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(FdError::Sys {
                syscall: "pipe2",
                what,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: pipe2 succeeded: both fds are open and owned only by us.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        Ok(Pipe { read, write })
    }
}

/// What the child reports through the exec-error pipe when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildFailure {
    /// Which step (see `spawn::Stage`).
    pub stage: u32,
    /// Index within the step (mount op, rlimit, landlock rule), else 0.
    pub index: u32,
    /// errno of the failing syscall (0 when the failure is not a syscall error).
    pub errno: i32,
}

/// Size of an encoded [`ChildFailure`].
pub const FAILURE_LEN: usize = 12;

impl ChildFailure {
    pub const fn encode(&self) -> [u8; FAILURE_LEN] {
        let s = self.stage.to_ne_bytes();
        let i = self.index.to_ne_bytes();
        let e = self.errno.to_ne_bytes();
        [
            s[0], s[1], s[2], s[3], i[0], i[1], i[2], i[3], e[0], e[1], e[2], e[3],
        ]
    }

    pub fn decode(b: &[u8]) -> Option<ChildFailure> {
        if b.len() != FAILURE_LEN {
            return None;
        }
        let word = |k: usize| [b[k], b[k + 1], b[k + 2], b[k + 3]];
        Some(ChildFailure {
            stage: u32::from_ne_bytes(word(0)),
            index: u32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
        })
    }
}

/// Read until `buf` is full or EOF; returns how many bytes were read. Retries on EINTR.
pub fn read_full(fd: &OwnedFd, buf: &mut [u8], what: &'static str) -> Result<usize, FdError> {
    read_full_by(fd, buf, None, what)
}

/// Like [`read_full`], but gives up with `ErrorKind::TimedOut` at `deadline`.
pub fn read_full_until(
    fd: &OwnedFd,
    buf: &mut [u8],
    deadline: std::time::Instant,
    what: &'static str,
) -> Result<usize, FdError> {
    read_full_by(fd, buf, Some(deadline), what)
}

/// [`read_full`], waiting for each read with `poll` until `deadline` when there is one.
fn read_full_by(
    fd: &OwnedFd,
    buf: &mut [u8],
    deadline: Option<std::time::Instant>,
    what: &'static str,
) -> Result<usize, FdError> {
    let sys = |syscall, source| FdError::Sys {
        syscall,
        what,
        source,
    };
    let mut got = 0;
    while got < buf.len() {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(sys("poll", e));
            }
            if r == 0 {
                return Err(sys("poll", io::Error::from(io::ErrorKind::TimedOut)));
            }
        }
        let rest = &mut buf[got..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes; the fd is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys("read", e));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

/// Write one byte (a sync token). Retries on EINTR.
pub fn write_byte(fd: &OwnedFd, b: u8, what: &'static str) -> Result<(), FdError> {
    loop {
        // SAFETY: writing one byte from a local; the fd is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&b as *const u8).cast(), 1) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(FdError::Sys {
            syscall: "write",
            what,
            source: e,
        });
    }
}

/// `struct open_how` for openat2(2).
#[repr(C)]
#[derive(Debug, Default)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_SYMLINKS: u64 = 0x04;

/// Open `path` (relative to the current directory if relative) refusing symlinks in EVERY
/// component (`openat2` with RESOLVE_NO_SYMLINKS; ELOOP when one is met). Used for paths the
/// sandbox may have been able to plant links in (the workspace, a report file inside it).
pub fn open_no_symlinks(
    path: &std::path::Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: valid C string and open_how of the size passed; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 succeeded; the fd is ours alone (fds fit in c_int).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The path an fd refers to, as the kernel names it (`/proc/self/fd/N`).
pub fn fd_path(fd: &OwnedFd) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

// ---- child side: raw, async-signal-safe, no allocation ----

/// Child: read exactly one byte, retrying on EINTR. Returns the errno on failure, or 0 with
/// `Err` when the other side closed (EOF).
pub fn child_read_byte(fd: RawFd) -> Result<u8, i32> {
    let mut b = 0u8;
    loop {
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            return Ok(b);
        }
        if n == 0 {
            return Err(0);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Child: write one byte, retrying on EINTR.
pub fn child_write_byte(fd: RawFd, b: u8) -> Result<(), i32> {
    loop {
        // SAFETY: writing one byte from a local.
        let n = unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        if n == 1 {
            return Ok(());
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Child: report a failure on the exec-error pipe (best effort: if the parent is gone there is
/// no one to tell).
pub fn child_report(fd: RawFd, f: ChildFailure) {
    let b = f.encode();
    // SAFETY: writing a 12-byte local buffer; 12 < PIPE_BUF, so the write is atomic.
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}

/// The fd a confined child holds its broker socket at (documented in docs/protocol.md; the
/// child's environment names it as `CARAPACE_BROKER_FD`).
pub const BROKER_FD: RawFd = 3;
/// The environment variable naming [`BROKER_FD`] in the child.
pub const BROKER_FD_ENV: &str = "CARAPACE_BROKER_FD";
/// The fd a confined child (the gateway) holds the listening socket the supervisor bound for
/// it at; the child's environment names it as `CARAPACE_LISTEN_FD`.
pub const LISTEN_FD: RawFd = 4;
/// The environment variable naming [`LISTEN_FD`] in the child.
pub const LISTEN_FD_ENV: &str = "CARAPACE_LISTEN_FD";
/// Number of fixed child fds [`child_place_fds`] places (0..=[`LISTEN_FD`]).
pub const PLACED_FDS: usize = 5;

/// Child: close every fd above 2 except those in `keep` (at most 2 of them: the exec-error
/// pipe and the init's status pipe, both CLOEXEC).
pub fn child_close_all_but_stdio(keep: [RawFd; 2]) -> Result<(), i32> {
    child_close_all_from(3, keep)
}

/// Child: close every fd from `first` on except those in `keep` (at most 2 of them).
pub fn child_close_all_from(first: RawFd, keep: [RawFd; 2]) -> Result<(), i32> {
    let first = libc::c_uint::try_from(first).map_err(|_| libc::EBADF)?;
    let (a, b) = (keep[0].min(keep[1]), keep[0].max(keep[1]));
    let mut lo: libc::c_uint = first;
    for k in [a, b] {
        if k < 0 || (k as libc::c_uint) < first {
            continue;
        }
        let k = k as libc::c_uint;
        if k > lo {
            close_range(lo, k - 1)?;
        }
        lo = lo.max(k + 1);
    }
    close_range(lo, libc::c_uint::MAX)
}

/// Child: place `srcs[i]` at fd `i` (0 stdin, 1 stdout, 2 stderr, 3 [`BROKER_FD`], 4
/// [`LISTEN_FD`]; -1 leaves that fd as it is), with close-on-exec cleared, and move `keep` (fds
/// the child still needs, CLOEXEC) out of the way of those targets. Returns the new numbers of
/// `keep`.
///
/// Every source and kept fd is first duplicated to a number >= [`PLACED_FDS`]
/// (`F_DUPFD_CLOEXEC`), so no `dup2` can overwrite a descriptor that is still to be placed or
/// kept, whatever numbers they had. The stale originals are closed by the close-all that
/// follows (the caller also closes the fixed numbers it did not place, see
/// [`child_close_unplaced`]).
pub fn child_place_fds(srcs: [RawFd; PLACED_FDS], keep: [RawFd; 2]) -> Result<[RawFd; 2], i32> {
    let high = |fd: RawFd| -> Result<RawFd, i32> {
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor in our own fd table.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, PLACED_FDS as libc::c_int) };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n)
        }
    };
    let mut moved = [-1 as RawFd; PLACED_FDS];
    for (i, &src) in srcs.iter().enumerate() {
        if src >= 0 && src != i as RawFd {
            moved[i] = high(src)?;
        }
    }
    let kept = [high(keep[0])?, high(keep[1])?];
    for (target, &src) in moved.iter().enumerate() {
        if src >= 0 {
            // SAFETY: dup2 only rearranges our own fd table; the copy at `target` does not
            // have FD_CLOEXEC (dup2 never sets it).
            if unsafe { libc::dup2(src, target as RawFd) } < 0 {
                return Err(errno());
            }
        } else if srcs[target] == target as RawFd {
            // Already in place (possibly CLOEXEC): clear the flag.
            let t = target as RawFd;
            // SAFETY: F_GETFD on our own fd.
            let fl = unsafe { libc::fcntl(t, libc::F_GETFD) };
            if fl < 0 {
                return Err(errno());
            }
            // SAFETY: F_SETFD on our own fd.
            if unsafe { libc::fcntl(t, libc::F_SETFD, fl & !libc::FD_CLOEXEC) } < 0 {
                return Err(errno());
            }
        }
    }
    Ok(kept)
}

/// Child: close the fixed numbers above stdio ([`BROKER_FD`], [`LISTEN_FD`]) that `srcs` does
/// not place (a stale original may sit there), then everything from [`PLACED_FDS`] on except
/// `keep`. So a listener without a broker leaves fd 3 closed.
pub fn child_close_unplaced(srcs: [RawFd; PLACED_FDS], keep: [RawFd; 2]) -> Result<(), i32> {
    for (n, &src) in srcs.iter().enumerate().skip(3) {
        let n = n as libc::c_uint;
        if src < 0 && !keep.contains(&(n as RawFd)) {
            close_range(n, n)?;
        }
    }
    child_close_all_from(PLACED_FDS as RawFd, keep)
}

fn close_range(lo: libc::c_uint, hi: libc::c_uint) -> Result<(), i32> {
    // SAFETY: close_range only closes descriptors; the child owns its fd table (no
    // CLONE_FILES) and nothing in the range is used afterwards.
    let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0 as libc::c_uint) };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

/// The calling thread's errno (async-signal-safe: a TLS read).
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub mod passing;

#[cfg(test)]
mod tests;
