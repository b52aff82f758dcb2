//! The control socket of `carapace run`: protocol, server and blocking client. It knows nothing
//! of processes; the service answers requests through [`ControlHandler`].
//!
//! # The control protocol
//!
//! **Transport.** A Unix `SOCK_STREAM` socket, by default `<runtime dir>/control.sock`
//! (`/run/carapace/control.sock` as root; `$CARAPACE_CONTROL_SOCKET` overrides the client's
//! default). Newline-delimited JSON: the client writes a request as one line, the server answers
//! with one or more JSON lines. A connection may carry several requests, one after the other.
//!
//! - A request line is at most **64 KiB** ([`MAX_REQUEST_LINE`], without its `\n`). A longer
//!   line gets an error reply and the connection is closed (the framing is lost).
//! - A connection idle for **30 s** ([`IDLE_TIMEOUT`]) is closed, except while it follows the
//!   audit log.
//! - Empty lines are ignored. A last line without `\n` before end of file is still a request.
//!
//! **Who may connect.** The socket file is mode `0660`, owned by the supervisor's user and the
//! configured control group (`[control] group`), and lives in a directory that is not writable by
//! others. That is only the first gate: on every connection the server reads the peer's
//! credentials (`SO_PEERCRED`, and `SO_PEERGROUPS` for its supplementary groups). Allowed are
//! uid 0, the supervisor's own effective uid, and — when a control group is configured — a peer
//! whose gid or one of whose supplementary groups is that group. Anyone else gets
//! `{"ok":false,"error":"permission denied: uid U (gid G) is not root and not in the control
//! group"}`, the connection is closed, and the refusal is logged.
//!
//! **Requests**: `{"op":OP, ...fields}`. Unknown fields are an error.
//!
//! | op                  | fields                                         | result                     |
//! |---------------------|------------------------------------------------|----------------------------|
//! | `status`            |                                                | [`StatusReport`]           |
//! | `approvals_list`    |                                                | [`ApprovalsList`]          |
//! | `approvals_resolve` | `id` (u64), `resolution` (`allow-once` \| `allow-always` \| `deny`) | [`Resolved`] |
//! | `dlq_list`          |                                                | [`DlqList`]                |
//! | `dlq_release`       | `id` (string)                                  | [`DlqLetter`] (the message released) |
//! | `dlq_drop`          | `id` (string)                                  | `{"dropped":ID}`           |
//! | `held_list`         |                                                | [`HeldList`]               |
//! | `held_admit`        | `id` (string), `always` (bool, default false)  | [`Admitted`]               |
//! | `held_drop`         | `id` (string)                                  | `{"dropped":ID}`           |
//! | `audit_tail`        | `lines` (usize, default 10), `follow` (bool, default false) | a stream, see below |
//! | `reload`            |                                                | [`ReloadReport`]           |
//! | `metrics`           |                                                | [`MetricsText`] (`{"text": ...}`, Prometheus text format) |
//! | `jobs_list`         |                                                | `{"jobs":[{name, schedule, session, deliver_to, last_run, next}]}` |
//! | `jobs_run`          | `name` (string)                                | `{"job","run"}`: the run asked of the gateway |
//! | `jobs_history`      | `name` (string, optional), `limit` (usize, default 20) | `{"runs":[{job, run, trigger, session, started, ended, outcome, stopped, reply, delivered, error}]}`, oldest first |
//!
//! **Replies.** `{"ok":true,"result":VALUE}` or `{"ok":false,"error":"MESSAGE"}`. An error
//! reply to a bad request (not JSON, not an object, no `op`, unknown op, bad fields) leaves the
//! connection open; the handler's own errors (no such approval, reload rejected, ...) come back
//! the same way with its message.
//!
//! **`audit_tail`** is answered by the server itself from the audit log file: first the last
//! `lines` complete records (at most 10 000), each as `{"ok":true,"line":RECORD}` where RECORD is
//! the record's JSON object **byte for byte as stored** (field order included, so a client can
//! hash it against the chain); a line that is not a JSON object is sent as a JSON string. Without
//! `follow` that ends with `{"ok":true,"end":true}`. With `follow` no `end` comes: the server
//! polls the file every 200 ms and sends each newly completed record, reopens the file when it
//! was replaced (rotation) and starts from its beginning when it was truncated, until the client
//! closes the connection or the server stops. A log that does not exist yet has no records (and
//! is waited for when following).
//!
//! ```text
//! $ printf '{"op":"audit_tail","lines":1}\n' | socat - UNIX-CONNECT:/run/carapace/control.sock
//! {"ok":true,"line":{"seq":7,"ts":"2026-11-21T13:20:07.123456Z","prev":"…","who":{…},"op":"connect",…}}
//! {"ok":true,"end":true}
//! ```
//!
//! **Server lifecycle.** [`ControlServer::bind`] creates the parent directory when missing
//! (0755 as root, 0700 otherwise) and refuses a parent that is a symlink, is writable by others,
//! or is owned by someone other than root or us. An existing socket at the path is probed with a
//! non-blocking connect: if a server is there (it connects, or its backlog is full because it is
//! wedged), binding fails ("another supervisor is serving P"); if the connect is refused, the
//! stale socket is removed. Anything else at the path (a regular file, ...) is
//! left alone and binding fails. The socket is bound inside a private (0700) temporary
//! directory next to the final path, given mode 0660 and its group there, and only then linked
//! into place (`link(2)`, which never replaces an existing name), so it is never reachable with a
//! wider mode, and a supervisor that won a race to the path keeps it. The server removes the
//! socket when it stops (if it is still the one it bound).
//!
//! **Client** ([`call`], [`stream`]): blocking; 10 s ([`CLIENT_TIMEOUT`]) to write the request
//! and for each reply line (no limit while following). A missing socket or a refused connect is
//! [`ControlError::NotRunning`] ("no supervisor is running (no control socket at P); start one
//! with `carapace run`"); an error reply is [`ControlError::Daemon`] with its message.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use carapace_broker::approvals::{Grant, Pending};
use carapace_broker::audit::Who;

mod client;
mod follow;
mod protocol;
mod server;
#[cfg(test)]
pub(crate) mod tests;

pub use client::*;
use follow::*;
pub use protocol::*;
pub use server::*;

/// Longest request line the server accepts (without its `\n`).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// A connection with no request for this long is closed (not while following the audit log).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The client's timeout for connecting, writing and each reply line.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a following `audit_tail` looks at the audit log.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Most records `audit_tail` sends before following.
pub const MAX_TAIL_LINES: usize = 10_000;
/// `lines` of `audit_tail` when the request does not say.
pub const DEFAULT_TAIL_LINES: usize = 10;
/// Longest reply line the client accepts.
const MAX_REPLY_LINE: usize = 16 << 20;
/// Longest audit record the server sends (longer lines are cut and sent as a string).
const MAX_AUDIT_LINE: usize = 1 << 20;
/// Most bytes read backwards from the end of the audit log to find the last records.
const MAX_TAIL_BYTES: u64 = 64 << 20;
/// Most bytes read from the audit log per follow poll.
const MAX_POLL_BYTES: usize = 4 << 20;

/// Every op, in protocol order, with the fields it takes besides `op`: the one table that
/// request decoding checks names and fields against ([`Request`] is its typed form; a test
/// holds the two equal).
pub const OPS: &[(&str, &[&str])] = &[
    ("status", &[]),
    ("approvals_list", &[]),
    ("approvals_resolve", &["id", "resolution"]),
    ("dlq_list", &[]),
    ("dlq_release", &["id"]),
    ("dlq_drop", &["id"]),
    ("held_list", &[]),
    ("held_admit", &["id", "always"]),
    ("held_drop", &["id"]),
    ("audit_tail", &["lines", "follow"]),
    ("reload", &[]),
    ("metrics", &[]),
    ("jobs_list", &[]),
    ("jobs_run", &["name"]),
    ("jobs_history", &["name", "limit"]),
];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no supervisor is running (no control socket at {}); start one with `carapace run`",
        path.display()
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another supervisor is serving {}", path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: String },
    #[error("control socket {}: no answer within {secs} s", path.display())]
    Timeout { path: PathBuf, secs: u64 },
    /// The supervisor answered with an error: its message.
    #[error("{message}")]
    Daemon { message: String },
    #[error("control socket {}: bad reply: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
