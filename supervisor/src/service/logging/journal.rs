//! journald's native protocol (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>): each event is
//! one datagram of fields sent to `/run/systemd/journal/socket`, so every tracing field is a
//! journal field (`journalctl -u carapace CHILD=gateway DECISION=deny`).
//!
//! Written here rather than taken from `tracing-journald`: that layer drops an event when the
//! send fails (`let _ = send_payload(..)`), where this one writes it to stderr as a `<N>` line
//! instead (no line is lost if journald goes away); it records error fields as their Debug
//! form, where the other formats carry the error and its causes; it does not keep a field such as
//! `target` from writing a second `TARGET=` or `PRIORITY=` next to the ones it sets; and its
//! encoder is private, so the record bytes could not be tested here.
//!
//! Whether stderr is the journal is decided as systemd.exec(5) documents `JOURNAL_STREAM`:
//! `DEV:INODE` of the stream, compared with `fstat` of fd 2. A process that inherited the
//! variable but writes to a pipe or a file is not connected.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::Level;

use super::{syslog_priority, Fields};

/// `JOURNAL_STREAM`: `DEV:INODE` of the stream systemd connected to the journal.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";
/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// `SYSLOG_IDENTIFIER=` of every record (`journalctl -t carapace`).
pub const SYSLOG_IDENTIFIER: &str = "carapace";
/// journald ignores field names longer than this.
const MAX_NAME: usize = 64;

/// Errors of the native journal socket.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("socket(AF_UNIX, SOCK_DGRAM, O_NONBLOCK) for the journal failed")]
    Socket(#[source] io::Error),
    #[error("sendto({path}) failed")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} of a large journal record (memfd) failed")]
    Memfd {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `DEV:INODE` as `JOURNAL_STREAM` carries it (both decimal).
fn parse_stream(value: &OsStr) -> Option<(u64, u64)> {
    let s = value.to_str()?;
    let (dev, ino) = s.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Whether `fd` is the stream `journal_stream` (the value of `JOURNAL_STREAM`) names.
pub fn stream_matches(journal_stream: Option<&OsStr>, fd: BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(parse_stream) else {
        return false;
    };
    match nix::sys::stat::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    let var = std::env::var_os(JOURNAL_STREAM_ENV);
    stream_matches(var.as_deref(), io::stderr().as_fd())
}

/// The journal field name of a tracing field: upper case, `[A-Z0-9_]` (anything else becomes
/// `_`), no leading `_` (those are journald's trusted fields) or digit, at most 64 bytes. Names
/// of the fields this writer sets itself, and the protocol's own (`MESSAGE_ID`, `SYSLOG_*`,
/// `CODE_*`, ...), get a `FIELD_` prefix so an event cannot override them.
pub fn field_name(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let n_trim = n.trim_start_matches('_');
    if n_trim.len() != n.len() {
        n = n_trim.to_string();
    }
    let reserved = matches!(
        n.as_str(),
        "" | "MESSAGE"
            | "MESSAGE_ID"
            | "PRIORITY"
            | "TARGET"
            | "ERRNO"
            | "TID"
            | "DOCUMENTATION"
            | "INVOCATION_ID"
            | "USER_INVOCATION_ID"
            | "UNIT"
            | "USER_UNIT"
    ) || n.starts_with("SYSLOG_")
        || n.starts_with("CODE_")
        || n.starts_with("OBJECT_")
        || n.starts_with("COREDUMP_")
        || n.starts_with(|c: char| c.is_ascii_digit());
    if reserved {
        n = if n.is_empty() {
            "FIELD".to_string()
        } else {
            format!("FIELD_{n}")
        };
    }
    n.truncate(MAX_NAME);
    n
}

/// Append one field: `NAME=value\n`, or, when the value holds a newline, the binary-safe
/// `NAME\n<64-bit little-endian length>value\n`.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// Where an event comes from, as the record carries it.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub level: Level,
    pub target: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<u32>,
}

impl<'a> Origin<'a> {
    pub fn of(meta: &'a tracing::Metadata<'a>) -> Origin<'a> {
        Origin {
            level: *meta.level(),
            target: meta.target(),
            file: meta.file(),
            line: meta.line(),
        }
    }
}

/// The record of one event: `MESSAGE` (the spans' names first, as in the text format),
/// `PRIORITY`, `SYSLOG_IDENTIFIER`, `CODE_FILE`, `CODE_LINE`, `TARGET`, then each field under
/// its [`field_name`].
pub(super) fn encode(origin: Origin<'_>, spans: &[String], f: &Fields) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let mut message = String::new();
    for s in spans {
        message.push_str(s);
        message.push_str(": ");
    }
    message.push_str(f.message.as_deref().unwrap_or(""));
    put_field(&mut buf, "MESSAGE", message.as_bytes());
    put_field(
        &mut buf,
        "PRIORITY",
        syslog_priority(&origin.level).to_string().as_bytes(),
    );
    put_field(&mut buf, "SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.as_bytes());
    if let Some(file) = origin.file {
        put_field(&mut buf, "CODE_FILE", file.as_bytes());
    }
    if let Some(line) = origin.line {
        put_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
    }
    put_field(&mut buf, "TARGET", origin.target.as_bytes());
    for (k, v) in &f.rest {
        let name = field_name(k);
        match v {
            serde_json::Value::String(s) => put_field(&mut buf, &name, s.as_bytes()),
            other => put_field(&mut buf, &name, other.to_string().as_bytes()),
        }
    }
    buf
}

/// A datagram socket aimed at journald's native socket.
#[derive(Debug)]
pub struct JournalSocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalSocket {
    /// A socket for `path`, checked by sending an empty datagram (journald drops it): fails
    /// when nothing listens there. The socket does not block: a journald that does not keep up
    /// makes a send fail at once (the caller writes that record to stderr) instead of stalling
    /// the thread that logs.
    pub fn open(path: &Path) -> Result<JournalSocket, JournalError> {
        // UnixDatagram sockets from std are created with SOCK_CLOEXEC.
        let socket = UnixDatagram::unbound().map_err(JournalError::Socket)?;
        let s = JournalSocket {
            socket,
            path: path.to_path_buf(),
        };
        s.socket
            .send_to(&[], &s.path)
            .map_err(|source| JournalError::Send {
                path: s.path.clone(),
                source,
            })?;
        s.socket
            .set_nonblocking(true)
            .map_err(JournalError::Socket)?;
        Ok(s)
    }

    /// Send one record; one too large for a datagram goes in a sealed memfd, as the protocol
    /// says.
    pub fn send(&self, record: &[u8]) -> Result<(), JournalError> {
        match self.socket.send_to(record, &self.path) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::ENOBUFS)) => {
                self.send_memfd(record)
            }
            Err(source) => Err(JournalError::Send {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The record written to a memfd, sealed, and its descriptor sent (SCM_RIGHTS) in an
    /// otherwise empty datagram.
    pub fn send_memfd(&self, record: &[u8]) -> Result<(), JournalError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};
        use std::mem::MaybeUninit;
        let memfd = |op| {
            move |e: rustix::io::Errno| JournalError::Memfd {
                op,
                source: io::Error::from(e),
            }
        };
        let fd = rustix::fs::memfd_create(
            c"carapace-journal",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(memfd("memfd_create"))?;
        let mut file = File::from(fd);
        file.write_all(record)
            .map_err(|source| JournalError::Memfd {
                op: "write",
                source,
            })?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .map_err(memfd("fcntl(F_ADD_SEALS)"))?;
        let addr = SocketAddrUnix::new(&self.path).map_err(memfd("the socket address"))?;
        let fds = [file.as_fd()];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            // Cannot happen: the buffer was sized for one descriptor.
            return Err(memfd("SCM_RIGHTS")(rustix::io::Errno::NOBUFS));
        }
        rustix::net::sendmsg_addr(&self.socket, &addr, &[], &mut control, SendFlags::empty())
            .map_err(|e| JournalError::Send {
                path: self.path.clone(),
                source: io::Error::from(e),
            })?;
        Ok(())
    }
}
