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
];

// ---------------------------------------------------------------------------------------------
// Protocol types
// ---------------------------------------------------------------------------------------------

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    ApprovalsList,
    /// `resolution`: `allow-once` | `allow-always` | `deny` ([`Resolution::parse`](carapace_broker::approvals::Resolution::parse)).
    ApprovalsResolve {
        id: u64,
        resolution: String,
    },
    DlqList,
    DlqRelease {
        id: String,
    },
    DlqDrop {
        id: String,
    },
    HeldList,
    /// `always`: the sender reaches the agent from now on, not only this message.
    HeldAdmit {
        id: String,
        #[serde(default)]
        always: bool,
    },
    HeldDrop {
        id: String,
    },
    /// Served by the server itself from [`ControlHandler::audit_log`].
    AuditTail {
        #[serde(default = "default_tail_lines")]
        lines: usize,
        #[serde(default)]
        follow: bool,
    },
    Reload,
}

fn default_tail_lines() -> usize {
    DEFAULT_TAIL_LINES
}

impl Request {
    /// The request's `op`.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ApprovalsList => "approvals_list",
            Request::ApprovalsResolve { .. } => "approvals_resolve",
            Request::DlqList => "dlq_list",
            Request::DlqRelease { .. } => "dlq_release",
            Request::DlqDrop { .. } => "dlq_drop",
            Request::HeldList => "held_list",
            Request::HeldAdmit { .. } => "held_admit",
            Request::HeldDrop { .. } => "held_drop",
            Request::AuditTail { .. } => "audit_tail",
            Request::Reload => "reload",
        }
    }
}

/// One reply line. Exactly one of `result`, `error`, `line`, `end` is present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<bool>,
}

impl Reply {
    pub fn result(v: Value) -> Reply {
        Reply {
            ok: true,
            result: Some(v),
            error: None,
            line: None,
            end: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(msg.into()),
            line: None,
            end: None,
        }
    }
    pub fn line(v: Value) -> Reply {
        Reply {
            ok: true,
            result: None,
            error: None,
            line: Some(v),
            end: None,
        }
    }
    pub fn end() -> Reply {
        Reply {
            ok: true,
            result: None,
            error: None,
            line: None,
            end: Some(true),
        }
    }

    /// The reply as one line, `\n` included.
    fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Serializing a `Value` cannot fail; keep a reply anyway.
            format!(r#"{{"ok":false,"error":"cannot encode the reply: {e}"}}"#).into_bytes()
        });
        v.push(b'\n');
        v
    }
}

/// Result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub version: String,
    /// RFC 3339 UTC.
    pub started: String,
    pub uptime_secs: u64,
    /// `root` | `rootless`.
    pub mode: String,
    /// What is used: `hybrid v1+v2`, `v2 delegated`, `none (rlimits only)`, ...
    pub cgroups: String,
    /// The configuration's source (a path, or `embedded default`).
    pub config: String,
    pub policy: PolicyStatus,
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    pub children: Vec<ChildStatus>,
    pub pending_approvals: usize,
    pub dead_letters: usize,
    pub audit: AuditStatus,
    /// Each channel of the policy that an adapter serves or the broker queues for.
    #[serde(default)]
    pub channels: Vec<ChannelReport>,
}

/// A channel as the broker sees it: its adapter's last word, the traffic, what waits.
pub use carapace_broker::ops::ChannelStats as ChannelReport;

/// A held inbound message: from a sender the channel does not admit (yet). The body is
/// redacted of known secret values; untrusted text.
pub use carapace_broker::protocol::HeldMessage as HeldInfo;

/// Result of `held_list`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldList {
    pub held: Vec<HeldInfo>,
}

/// Result of `held_admit`: the message's place in the inbound queue, and whether its sender is
/// admitted for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admitted {
    pub id: String,
    pub seq: u64,
    pub always: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub files: Vec<String>,
    /// SHA-256 of the policy in force.
    pub sha256: String,
    /// RFC 3339 UTC: when it was loaded.
    pub loaded: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub path: String,
    /// Seq of the last record.
    pub seq: u64,
    /// Hash of the last record's line.
    pub head: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub name: String,
    /// `gateway` | `channel`.
    pub role: String,
    pub profile: String,
    /// `starting` | `running` | `backoff` | `failed` | `stopping` | `stopped`.
    pub state: String,
    pub pid: Option<i32>,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    /// How it last ended, e.g. `exit=1` or `signal=9 (oom)`.
    pub last_exit: Option<String>,
    pub memory_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub tasks: Option<u64>,
}

/// A pending approval as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    pub id: u64,
    /// `role#id(profile)` of the asking child ([`who_string`]).
    pub who: String,
    pub program: String,
    pub sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub why: String,
    /// RFC 3339 UTC.
    pub created: String,
    pub expires_in_secs: u64,
}

impl PendingApproval {
    /// From the broker's pending approval; `why` is the rule's reason (not kept by the broker).
    pub fn from_pending(p: &Pending, why: impl Into<String>, now: Instant) -> PendingApproval {
        PendingApproval {
            id: p.id,
            who: who_string(&p.identity),
            program: p.program.display().to_string(),
            sha256: p.program_sha256.clone(),
            argv: p.argv.clone(),
            profile: p.profile.clone(),
            why: why.into(),
            created: p.created.clone(),
            expires_in_secs: p.expires.saturating_duration_since(now).as_secs(),
        }
    }
}

/// A persisted allow-always grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub program: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub sha256: String,
    /// RFC 3339 UTC.
    pub granted_at: String,
}

impl From<&Grant> for GrantInfo {
    fn from(g: &Grant) -> GrantInfo {
        GrantInfo {
            program: g.program.display().to_string(),
            argv: g.argv.clone(),
            profile: g.profile.clone(),
            sha256: g.sha256.clone(),
            granted_at: g.granted_at.clone(),
        }
    }
}

/// Result of `approvals_list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalsList {
    pub pending: Vec<PendingApproval>,
    pub always: Vec<GrantInfo>,
}

/// Result of `approvals_resolve`: `decision` is the broker's
/// [`Decision::as_str`](carapace_broker::approvals::Decision::as_str) (`allowed once`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub id: u64,
    pub decision: String,
}

/// A dead letter: the broker's [`Entry`](carapace_broker::dlq::Entry) with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqLetter {
    pub id: String,
    #[serde(flatten)]
    pub entry: carapace_broker::dlq::Entry,
}

/// A file of the queue that could not be read as an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqUnreadable {
    pub file: String,
    pub error: String,
}

/// Result of `dlq_list`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqList {
    pub letters: Vec<DlqLetter>,
    pub unreadable: Vec<DlqUnreadable>,
}

impl From<carapace_broker::dlq::Listing> for DlqList {
    fn from(l: carapace_broker::dlq::Listing) -> DlqList {
        DlqList {
            letters: l
                .letters
                .into_iter()
                .map(|d| DlqLetter {
                    id: d.id,
                    entry: d.entry,
                })
                .collect(),
            unreadable: l
                .unreadable
                .into_iter()
                .map(|u| DlqUnreadable {
                    file: u.file.display().to_string(),
                    error: u.error,
                })
                .collect(),
        }
    }
}

/// Result of `reload`. A rejected reload (invalid configuration or policy) is an error reply
/// whose message says why; the old configuration and policy stay in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub applied: bool,
    /// SHA-256 of the policy in force after the reload.
    pub policy_sha256: String,
    /// What changed, in words.
    pub message: String,
}

/// `role#id(profile)`.
pub fn who_string(w: &Who) -> String {
    format!("{}#{}({})", w.role, w.id, w.profile)
}

/// What the service provides to the control server.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answer one request (never [`Request::AuditTail`], which the server serves). Called on a
    /// blocking thread (`spawn_blocking`): it may block. `Err` is sent as the error reply.
    fn handle(&self, req: Request) -> Result<Value, String>;
    /// The audit log file `audit_tail` reads.
    fn audit_log(&self) -> PathBuf;
}

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

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

struct ClientConn {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Option<Duration>,
}

impl ClientConn {
    fn connect(socket: &Path) -> Result<ClientConn, ControlError> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    path: socket.to_path_buf(),
                    source: e,
                }
            }
            _ => io_err("connect", socket)(e),
        })?;
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .map_err(io_err("set timeout", socket))?;
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .map_err(io_err("set timeout", socket))?;
        Ok(ClientConn {
            path: socket.to_path_buf(),
            reader: BufReader::new(stream),
            timeout: Some(CLIENT_TIMEOUT),
        })
    }

    fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<(), ControlError> {
        self.timeout = t;
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(io_err("set timeout", &self.path))
    }

    fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        match self.reader.get_mut().write_all(&line) {
            Ok(()) => Ok(()),
            // The server may have refused us and closed before reading: its reply is still
            // there to read.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) if is_timeout(&e) => Err(ControlError::Timeout {
                path: self.path.clone(),
                secs: CLIENT_TIMEOUT.as_secs(),
            }),
            Err(e) => Err(io_err("write", &self.path)(e)),
        }
    }

    /// The next reply, or `None` at end of file.
    fn read_reply(&mut self) -> Result<Option<Reply>, ControlError> {
        Ok(self.read_reply_raw()?.map(|(r, _)| r))
    }

    /// The next reply and its line (without `\n`), or `None` at end of file.
    fn read_reply_raw(&mut self) -> Result<Option<(Reply, Vec<u8>)>, ControlError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| {
                if is_timeout(&e) {
                    ControlError::Timeout {
                        path: self.path.clone(),
                        secs: self.timeout.unwrap_or_default().as_secs(),
                    }
                } else {
                    io_err("read", &self.path)(e)
                }
            })?;
        if n == 0 {
            return Ok(None);
        }
        if buf.pop() != Some(b'\n') {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                reason: if buf.len() >= MAX_REPLY_LINE {
                    format!("a reply line is longer than {MAX_REPLY_LINE} bytes")
                } else {
                    "the connection ended in the middle of a reply".to_string()
                },
            });
        }
        serde_json::from_slice(&buf)
            .map(|r| Some((r, buf)))
            .map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                reason: format!("not a reply: {e}"),
            })
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Send `req` to the supervisor at `socket` and return its result (blocking, 10 s timeouts).
/// Not for [`Request::AuditTail`] (use [`stream`]).
pub fn call(socket: &Path, req: &Request) -> Result<Value, ControlError> {
    let mut c = ClientConn::connect(socket)?;
    c.send(req)?;
    let reply = c.read_reply()?.ok_or_else(|| ControlError::Protocol {
        path: socket.to_path_buf(),
        reason: "the supervisor closed the connection without answering".to_string(),
    })?;
    reply_result(socket, reply)
}

fn reply_result(socket: &Path, reply: Reply) -> Result<Value, ControlError> {
    if !reply.ok {
        return Err(ControlError::Daemon {
            message: reply
                .error
                .unwrap_or_else(|| "the supervisor failed (no message)".to_string()),
        });
    }
    if reply.line.is_some() || reply.end.is_some() {
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            reason: "a stream reply to a single request".to_string(),
        });
    }
    Ok(reply.result.unwrap_or(Value::Null))
}

/// Send `req` and pass every streamed value (`line`, or a single `result`) to `on` until the
/// stream ends (`end`), `on` returns `false`, or — when following — the connection closes
/// (an error: the supervisor went away). With `follow`, replies may take any time; otherwise
/// each must come within 10 s.
pub fn stream(
    socket: &Path,
    req: &Request,
    mut on: impl FnMut(Value) -> bool,
) -> Result<(), ControlError> {
    stream_raw(socket, req, |v, _| on(v))
}

/// The record's text exactly as stored, from a `line` reply carrying it byte for byte.
fn raw_record(line: &[u8]) -> Option<&str> {
    let inner = line
        .strip_prefix(AUDIT_LINE_PREFIX.as_bytes())?
        .strip_suffix(b"}")?;
    let text = std::str::from_utf8(inner).ok()?;
    text.trim_start().starts_with('{').then_some(text)
}

/// [`stream`], also passing each record's text exactly as the audit log holds it (field order
/// and all) when the server sent it so; `carapace audit tail --json` prints that.
pub fn stream_raw(
    socket: &Path,
    req: &Request,
    mut on: impl FnMut(Value, Option<&str>) -> bool,
) -> Result<(), ControlError> {
    let follow = matches!(req, Request::AuditTail { follow: true, .. });
    let mut c = ClientConn::connect(socket)?;
    c.send(req)?;
    if follow {
        c.set_read_timeout(None)?;
    }
    loop {
        let Some((reply, line)) = c.read_reply_raw()? else {
            return Err(ControlError::Protocol {
                path: socket.to_path_buf(),
                reason: "the supervisor closed the connection".to_string(),
            });
        };
        if !reply.ok {
            return Err(ControlError::Daemon {
                message: reply
                    .error
                    .unwrap_or_else(|| "the supervisor failed (no message)".to_string()),
            });
        }
        if reply.end == Some(true) {
            return Ok(());
        }
        if let Some(v) = reply.line {
            if !on(v, raw_record(&line)) {
                return Ok(());
            }
            continue;
        }
        if let Some(v) = reply.result {
            on(v, None);
            return Ok(());
        }
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            reason: "a reply with neither result, line nor end".to_string(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Removes the socket file when dropped, if the path still names the socket we bound.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "control socket: cannot remove: {e}");
                }
            }
        }
    }
}

/// Stops a served [`ControlServer`] (see [`ControlServer::shutdown_handle`]).
#[derive(Debug, Clone)]
pub struct ControlShutdown(Arc<tokio::sync::watch::Sender<bool>>);

impl ControlShutdown {
    /// Stop accepting, close every connection (followers included) and remove the socket; the
    /// task returned by [`ControlServer::serve`] then ends.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    file: SocketFile,
    group: Option<u32>,
    idle_timeout: Duration,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

enum Probe {
    /// A server is listening (it accepted, or its backlog is full).
    Live,
    /// Nobody listens: connect(2) was refused.
    Stale,
}

/// Connect to the socket at `path` without blocking: a server that is wedged (stopped, its
/// backlog full) still counts as live, and the probe never hangs.
fn probe(path: &Path) -> io::Result<Probe> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2); nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len` (the path
    // and its terminating NUL, checked above to fit) does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(Probe::Live);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(Probe::Live),
        Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
        _ => Err(e),
    }
}

/// Check that `dir` is a real directory, not writable by others, owned by root or us.
fn check_parent(dir: &Path, sock: &Path) -> Result<(), ControlError> {
    let m = fs::symlink_metadata(dir).map_err(io_err("lstat parent", sock))?;
    let unsafe_ = |reason: String| ControlError::Unsafe {
        path: sock.to_path_buf(),
        reason,
    };
    if m.file_type().is_symlink() {
        return Err(unsafe_(format!(
            "its directory {} is a symlink; refusing it",
            dir.display()
        )));
    }
    if !m.is_dir() {
        return Err(unsafe_(format!("{} is not a directory", dir.display())));
    }
    if m.mode() & 0o002 != 0 {
        return Err(unsafe_(format!(
            "its directory {} is writable by others (mode {:o}); use a private runtime directory",
            dir.display(),
            m.mode() & 0o7777
        )));
    }
    if m.uid() != 0 && m.uid() != euid() {
        return Err(unsafe_(format!(
            "its directory {} is owned by uid {}, not by root or us",
            dir.display(),
            m.uid()
        )));
    }
    Ok(())
}

impl ControlServer {
    /// Bind the control socket at `path` (see the module docs: parent checks, stale socket
    /// replaced, a live one not stolen, mode 0660 and `group` from the first moment). Needs no
    /// tokio runtime.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<ControlServer, ControlError> {
        let unsafe_ = |reason: &str| ControlError::Unsafe {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !path.is_absolute() {
            return Err(unsafe_("not an absolute path"));
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(unsafe_("no directory or file name"));
        };
        if !dir.exists() {
            let mode = if euid() == 0 { 0o755 } else { 0o700 };
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io_err("create directory", path))?;
        }
        check_parent(dir, path)?;

        // Something already there?
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match probe(path) {
                Ok(Probe::Live) => {
                    return Err(ControlError::InUse {
                        path: path.to_path_buf(),
                    })
                }
                Ok(Probe::Stale) => {
                    tracing::info!(path = %path.display(), "control socket: removing a stale socket");
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove stale socket", path)(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("probe existing socket", path)(e)),
            },
            Ok(_) => {
                return Err(unsafe_(
                    "exists and is not a socket; refusing to replace it",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lstat", path)(e)),
        }

        // Bind in a private directory, set mode and group, then link into place.
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_dir = dir.join(format!(".ctl{}-{n}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp_dir)
            .map_err(io_err("create temporary directory", &tmp_dir))?;
        let tmp_sock = tmp_dir.join(name);
        let bound = (|| {
            let listener = UnixListener::bind(&tmp_sock).map_err(io_err("bind", &tmp_sock))?;
            fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o660))
                .map_err(io_err("chmod 0660", &tmp_sock))?;
            if let Some(gid) = group {
                std::os::unix::fs::chown(&tmp_sock, None, Some(gid))
                    .map_err(io_err("chown to the control group", &tmp_sock))?;
            }
            let m = fs::symlink_metadata(&tmp_sock).map_err(io_err("lstat", &tmp_sock))?;
            // link(2), unlike rename(2), never replaces: a supervisor that bound the path
            // since we probed it keeps it.
            fs::hard_link(&tmp_sock, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    ControlError::InUse {
                        path: path.to_path_buf(),
                    }
                } else {
                    io_err("link into place", path)(e)
                }
            })?;
            Ok::<_, ControlError>((listener, m.dev(), m.ino()))
        })();
        let _ = fs::remove_file(&tmp_sock);
        let _ = fs::remove_dir(&tmp_dir);
        let (listener, dev, ino) = bound?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("set non-blocking", path))?;
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(ControlServer {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                dev,
                ino,
            },
            group,
            idle_timeout: IDLE_TIMEOUT,
            stop: Arc::new(stop),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Close idle connections after `t` instead of [`IDLE_TIMEOUT`] (tests).
    pub fn with_idle_timeout(mut self, t: Duration) -> ControlServer {
        self.idle_timeout = t;
        self
    }

    /// A handle that stops the server once it serves.
    pub fn shutdown_handle(&self) -> ControlShutdown {
        ControlShutdown(self.stop.clone())
    }

    /// Serve connections on the current tokio runtime until [`ControlShutdown::shutdown`] or
    /// until the returned task is aborted; either way every connection is closed and the socket
    /// file removed. Must be called within a runtime.
    pub fn serve(self, handler: Arc<dyn ControlHandler>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(handler))
    }

    async fn run(self, handler: Arc<dyn ControlHandler>) {
        let ControlServer {
            listener,
            file,
            group,
            idle_timeout,
            stop,
        } = self;
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %file.path.display(), "control socket: cannot serve: {e}");
                return;
            }
        };
        let ctx = Arc::new(ConnCtx {
            handler,
            group,
            euid: euid(),
            idle_timeout,
            stop: stop.subscribe(),
        });
        let mut stop_rx = stop.subscribe();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = stopped(&mut stop_rx) => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        conns.spawn(connection(stream, ctx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(path = %file.path.display(), "control socket: accept: {e}");
                        // EMFILE and friends: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
        drop(listener);
        drop(file);
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

struct ConnCtx {
    handler: Arc<dyn ControlHandler>,
    group: Option<u32>,
    euid: u32,
    idle_timeout: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The peer's supplementary groups (`SO_PEERGROUPS`).
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let cap = groups.len() * std::mem::size_of::<libc::gid_t>();
        let mut len = cap as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `cap` bytes and `len` says so; the kernel writes at
        // most `len` bytes and updates `len`. `fd` is a valid socket for the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: the buffer is too small and `len` says how big it must be.
        if e.raw_os_error() == Some(libc::ERANGE) && (len as usize) > cap && groups.len() < 65_536 {
            groups.resize(
                (len as usize).div_ceil(std::mem::size_of::<libc::gid_t>()),
                0,
            );
            continue;
        }
        return Err(e);
    }
}

/// Whether a peer may use the socket; `groups` is asked for only when it matters.
fn peer_allowed(
    uid: u32,
    gid: u32,
    our_euid: u32,
    group: Option<u32>,
    groups: impl FnOnce() -> io::Result<Vec<u32>>,
) -> bool {
    if uid == 0 || uid == our_euid {
        return true;
    }
    let Some(g) = group else {
        return false;
    };
    if gid == g {
        return true;
    }
    match groups() {
        Ok(gs) => gs.contains(&g),
        Err(e) => {
            tracing::warn!("control socket: SO_PEERGROUPS: {e}");
            false
        }
    }
}

enum LineRead {
    Line(Vec<u8>),
    TooLong,
    Eof,
}

async fn read_line_limited<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> io::Result<LineRead> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(LineRead::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Ok(LineRead::TooLong);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(LineRead::Line(buf))
}

/// The fields an op takes besides `op` ([`OPS`]), or `None` for an unknown op.
fn op_fields(op: &str) -> Option<&'static [&'static str]> {
    OPS.iter().find(|(name, _)| *name == op).map(|(_, f)| *f)
}

/// Decode a request line; `Err` is the message of the error reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| format!("bad request: not JSON: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("bad request: expected a JSON object with an \"op\"".to_string());
    };
    let Some(op) = obj.get("op") else {
        return Err("bad request: no \"op\"".to_string());
    };
    let Some(op) = op.as_str().map(str::to_string) else {
        return Err("bad request: \"op\" is not a string".to_string());
    };
    let Some(fields) = op_fields(&op) else {
        let shown: String = op.chars().take(64).collect();
        let known: Vec<&str> = OPS.iter().map(|(name, _)| *name).collect();
        return Err(format!(
            "unknown op {shown:?} (known: {})",
            known.join(", ")
        ));
    };
    // serde's deny_unknown_fields does not cover the unit variants of a tagged enum.
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "op" && !fields.contains(&k.as_str()))
    {
        let shown: String = k.chars().take(64).collect();
        return Err(format!("bad request: {op}: unknown field {shown:?}"));
    }
    serde_json::from_value(v).map_err(|e| format!("bad request: {op}: {e}"))
}

type Writer = tokio::net::unix::OwnedWriteHalf;

async fn send(wr: &mut Writer, reply: &Reply, timeout: Duration) -> io::Result<()> {
    send_bytes(wr, &reply.to_line(), timeout).await
}

async fn send_bytes(wr: &mut Writer, line: &[u8], timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, wr.write_all(line)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read",
        )),
    }
}

async fn connection(stream: tokio::net::UnixStream, ctx: Arc<ConnCtx>) {
    let (uid, gid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.gid(), c.pid()),
        Err(e) => {
            tracing::warn!("control socket: SO_PEERCRED: {e}");
            return;
        }
    };
    let allowed = peer_allowed(uid, gid, ctx.euid, ctx.group, || {
        peer_groups(stream.as_fd())
    });
    let (rd, mut wr) = stream.into_split();
    if !allowed {
        tracing::warn!(
            uid,
            gid,
            pid = pid.unwrap_or(0),
            "control socket: refused a connection (not root, not us, not in the control group)"
        );
        let msg = format!(
            "permission denied: uid {uid} (gid {gid}) is not root and not in the control group"
        );
        let _ = send(&mut wr, &Reply::error(msg), ctx.idle_timeout).await;
        let _ = wr.shutdown().await;
        return;
    }
    let mut rd = tokio::io::BufReader::new(rd);
    loop {
        let read = tokio::time::timeout(
            ctx.idle_timeout,
            read_line_limited(&mut rd, MAX_REQUEST_LINE),
        )
        .await;
        let line = match read {
            Err(_) => {
                tracing::debug!(uid, "control socket: idle connection closed");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(uid, "control socket: read: {e}");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                let msg = format!(
                    "bad request: line longer than {MAX_REQUEST_LINE} bytes; closing the connection"
                );
                let _ = send(&mut wr, &Reply::error(msg), ctx.idle_timeout).await;
                let _ = wr.shutdown().await;
                return;
            }
            Ok(Ok(LineRead::Line(l))) => l,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req = match parse_request(&line) {
            Ok(r) => r,
            Err(msg) => {
                tracing::debug!(uid, "control socket: {msg}");
                if send(&mut wr, &Reply::error(msg), ctx.idle_timeout)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        tracing::debug!(uid, op = req.op(), "control request");
        if let Request::AuditTail { lines, follow } = req {
            let path = ctx.handler.audit_log();
            let r = audit_tail(&mut rd, &mut wr, &ctx, path, lines, follow).await;
            if follow || r.is_err() {
                return;
            }
            continue;
        }
        let h = ctx.handler.clone();
        let reply = match tokio::task::spawn_blocking(move || h.handle(req)).await {
            Ok(Ok(v)) => Reply::result(v),
            Ok(Err(msg)) => Reply::error(msg),
            Err(e) => {
                tracing::error!("control socket: the handler failed: {e}");
                Reply::error("internal error: the request handler failed")
            }
        };
        if send(&mut wr, &reply, ctx.idle_timeout).await.is_err() {
            return;
        }
    }
}

/// The reply line for one audit record: `{"ok":true,"line":<the record's bytes as stored>}` when
/// they are a JSON object (so the record arrives byte for byte, field order included, and can be
/// hashed against the chain); otherwise the text as a JSON string.
fn audit_reply(raw: &[u8]) -> Vec<u8> {
    let is_object = raw.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_ok();
    if is_object {
        let mut line = Vec::with_capacity(raw.len() + 24);
        line.extend_from_slice(AUDIT_LINE_PREFIX.as_bytes());
        line.extend_from_slice(raw);
        line.extend_from_slice(b"}\n");
        return line;
    }
    Reply::line(Value::String(String::from_utf8_lossy(raw).into_owned())).to_line()
}

/// How a reply carrying an audit record begins.
const AUDIT_LINE_PREFIX: &str = r#"{"ok":true,"line":"#;

async fn audit_tail(
    rd: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: &mut Writer,
    ctx: &ConnCtx,
    path: PathBuf,
    lines: usize,
    follow: bool,
) -> io::Result<()> {
    let n = lines.min(MAX_TAIL_LINES);
    let opened = tokio::task::spawn_blocking(move || Follower::open(path, n))
        .await
        .map_err(io::Error::other)?;
    let (first, mut follower) = match opened {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("audit log: {e}");
            send(wr, &Reply::error(msg), ctx.idle_timeout).await?;
            return Ok(());
        }
    };
    for raw in &first {
        send_bytes(wr, &audit_reply(raw), ctx.idle_timeout).await?;
    }
    if !follow {
        return send(wr, &Reply::end(), ctx.idle_timeout).await;
    }
    let mut stop = ctx.stop.clone();
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            r = rd.read(&mut scratch) => match r {
                // The client went away (or sent something: ignored).
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(FOLLOW_POLL) => {
                let (f, new) = tokio::task::spawn_blocking(move || {
                    let new = follower.poll();
                    (follower, new)
                })
                .await
                .map_err(io::Error::other)?;
                follower = f;
                match new {
                    Ok(new) => {
                        for raw in &new {
                            send_bytes(wr, &audit_reply(raw), ctx.idle_timeout).await?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("control socket: following the audit log: {e}");
                    }
                }
            }
        }
    }
}

/// Reads the audit log's last records, then what is appended (see the module docs).
#[derive(Debug)]
struct Follower {
    path: PathBuf,
    file: Option<File>,
    dev: u64,
    ino: u64,
    /// Bytes of `file` consumed (complete lines and `partial`).
    pos: u64,
    /// An incomplete last line seen so far.
    partial: Vec<u8>,
}

impl Follower {
    /// The last `n` complete lines of `path` (none if it does not exist), and a follower
    /// positioned after them.
    fn open(path: PathBuf, n: usize) -> io::Result<(Vec<Vec<u8>>, Follower)> {
        let mut f = Follower {
            path,
            file: None,
            dev: 0,
            ino: 0,
            pos: 0,
            partial: Vec::new(),
        };
        let mut file = match File::open(&f.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), f)),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        let (lines, complete_end) = last_lines(&mut file, m.len(), n)?;
        f.dev = m.dev();
        f.ino = m.ino();
        f.pos = complete_end;
        f.file = Some(file);
        Ok((lines, f))
    }

    /// Complete lines appended since the last call.
    fn poll(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let on_disk = match fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let replaced = match (&self.file, &on_disk) {
            (None, Some(_)) => true,
            (Some(_), Some(m)) => m.dev() != self.dev || m.ino() != self.ino,
            _ => false,
        };
        if replaced {
            // Finish the old file, then start the new one from its beginning.
            if self.file.is_some() {
                self.read_new(&mut out)?;
            }
            match File::open(&self.path) {
                Ok(file) => {
                    let m = file.metadata()?;
                    self.dev = m.dev();
                    self.ino = m.ino();
                    self.file = Some(file);
                    self.pos = 0;
                    self.partial.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            }
        }
        if let Some(file) = &self.file {
            if file.metadata()?.len() < self.pos {
                // Truncated: start again from the beginning.
                self.pos = 0;
                self.partial.clear();
            }
            self.read_new(&mut out)?;
        }
        Ok(out)
    }

    fn read_new(&mut self, out: &mut Vec<Vec<u8>>) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        let got = file.take(MAX_POLL_BYTES as u64).read_to_end(&mut buf)?;
        self.pos += got as u64;
        let mut rest: &[u8] = &buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..i]);
            line.truncate(MAX_AUDIT_LINE);
            out.push(line);
            rest = &rest[i + 1..];
        }
        if self.partial.len() < MAX_AUDIT_LINE {
            let room = MAX_AUDIT_LINE - self.partial.len();
            self.partial
                .extend_from_slice(&rest[..rest.len().min(room)]);
        }
        Ok(())
    }
}

/// The last `n` complete lines of `file` (of length `len`), without their `\n`, and the offset
/// just after the last complete line.
fn last_lines(file: &mut File, len: u64, n: usize) -> io::Result<(Vec<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut start = len;
    // Newlines needed: one ending each of the n lines, plus the one before the first of them.
    let want = n + 1;
    while start > 0 && len - start < MAX_TAIL_BYTES {
        let take = CHUNK.min(start);
        start -= take;
        let mut chunk = vec![0u8; take as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if tail.iter().filter(|&&b| b == b'\n').count() >= want {
            break;
        }
    }
    let Some(last_nl) = tail.iter().rposition(|&b| b == b'\n') else {
        // No complete line in what was read.
        return Ok((Vec::new(), start));
    };
    let complete_end = start + last_nl as u64 + 1;
    let body = &tail[..last_nl];
    let mut lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    // The first piece is a whole line only when we read from the start of the file.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    let out = lines[skip..]
        .iter()
        .map(|l| l[..l.len().min(MAX_AUDIT_LINE)].to_vec())
        .collect();
    Ok((out, complete_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_broker::approvals::Resolution;
    use std::sync::Mutex;

    /// Env var telling [`peer_helper`] to act as an unprivileged client of this socket.
    const PEER_ENV: &str = "CARAPACE_CONTROL_TEST_PEER";
    const PEER_UID: u32 = 2_000_000;
    const PEER_GID: u32 = 2_000_000;
    const CONTROL_GID: u32 = 2_000_042;

    /// True if we may run privileged tests; panics when not root unless CARAPACE_ALLOW_SKIP=1.
    fn privileged() -> bool {
        if crate::paths::is_root() {
            return true;
        }
        if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("skipping privileged control socket test: not root (CARAPACE_ALLOW_SKIP=1)");
            return false;
        }
        panic!("this test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip it");
    }

    #[derive(Default)]
    struct Fake {
        seen: Mutex<Vec<Request>>,
        audit: PathBuf,
    }

    impl ControlHandler for Fake {
        fn handle(&self, req: Request) -> Result<Value, String> {
            self.seen
                .lock()
                .map_err(|e| e.to_string())?
                .push(req.clone());
            match req {
                Request::Status => Ok(serde_json::to_value(sample_status()).unwrap_or_default()),
                Request::ApprovalsList => Ok(serde_json::json!({"pending": [], "always": []})),
                Request::ApprovalsResolve { id: 404, .. } => {
                    Err("no pending approval 404".to_string())
                }
                Request::ApprovalsResolve { id, resolution } => {
                    Ok(serde_json::json!({"id": id, "decision": resolution}))
                }
                Request::DlqList => Ok(serde_json::json!({"letters": [], "unreadable": []})),
                Request::DlqRelease { id } => Ok(serde_json::json!({"released": id})),
                Request::DlqDrop { id } => Ok(serde_json::json!({ "dropped": id })),
                Request::HeldList => Ok(serde_json::json!({"held": []})),
                Request::HeldAdmit { id, always } => {
                    Ok(serde_json::json!({"id": id, "seq": 1, "always": always}))
                }
                Request::HeldDrop { id } => Ok(serde_json::json!({ "dropped": id })),
                Request::Reload => Err("policy.toml:3:1: unknown key \"x\"".to_string()),
                Request::AuditTail { .. } => Err("audit_tail reached the handler".to_string()),
            }
        }
        fn audit_log(&self) -> PathBuf {
            self.audit.clone()
        }
    }

    pub(crate) fn sample_status() -> StatusReport {
        StatusReport {
            pid: 4242,
            version: "0.1.0".to_string(),
            started: "2026-11-21T14:00:00.000000Z".to_string(),
            uptime_secs: 3723,
            mode: "root".to_string(),
            cgroups: "hybrid v1+v2".to_string(),
            config: "embedded default".to_string(),
            policy: PolicyStatus {
                files: vec!["/etc/carapace/policy.toml".to_string()],
                sha256: "ab".repeat(32),
                loaded: "2026-11-21T14:00:00.000000Z".to_string(),
            },
            reloads: 2,
            last_reload_error: None,
            children: vec![ChildStatus {
                name: "gateway".to_string(),
                role: "gateway".to_string(),
                profile: "gateway".to_string(),
                state: "running".to_string(),
                pid: Some(777),
                uptime_secs: Some(65),
                restarts: 1,
                last_exit: Some("signal=9".to_string()),
                memory_bytes: Some(12 << 20),
                cpu_ms: Some(1500),
                tasks: Some(3),
            }],
            pending_approvals: 1,
            dead_letters: 0,
            channels: Vec::new(),
            audit: AuditStatus {
                path: "/var/lib/carapace/audit.log".to_string(),
                seq: 17,
                head: "cd".repeat(32),
            },
        }
    }

    struct Served {
        rt: tokio::runtime::Runtime,
        task: Option<tokio::task::JoinHandle<()>>,
        stop: ControlShutdown,
        path: PathBuf,
        fake: Arc<Fake>,
        _dir: tempfile::TempDir,
    }

    impl Served {
        fn stop(&mut self) {
            self.stop.shutdown();
            if let Some(t) = self.task.take() {
                self.rt
                    .block_on(async { tokio::time::timeout(Duration::from_secs(5), t).await })
                    .expect("server did not stop")
                    .expect("server task failed");
            }
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.stop.shutdown();
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn serve_with(group: Option<u32>, idle: Duration) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let fake = Arc::new(Fake {
            seen: Mutex::new(Vec::new()),
            audit: dir.path().join("audit.log"),
        });
        let server = ControlServer::bind(&path, group)
            .expect("bind")
            .with_idle_timeout(idle);
        let stop = server.shutdown_handle();
        let rt = runtime();
        let task = {
            let _g = rt.enter();
            server.serve(fake.clone())
        };
        Served {
            rt,
            task: Some(task),
            stop,
            path,
            fake,
            _dir: dir,
        }
    }

    fn serve() -> Served {
        serve_with(None, IDLE_TIMEOUT)
    }

    /// Raw connection: write bytes, read reply lines.
    struct Raw {
        r: BufReader<UnixStream>,
    }

    impl Raw {
        fn new(path: &Path) -> Raw {
            let s = UnixStream::connect(path).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            Raw {
                r: BufReader::new(s),
            }
        }
        fn send(&mut self, bytes: &[u8]) {
            self.r.get_mut().write_all(bytes).expect("write");
        }
        /// The next reply, or None at EOF.
        fn reply(&mut self) -> Option<Reply> {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("read");
            (n > 0).then(|| serde_json::from_str(&line).expect("reply is JSON"))
        }
        fn error(&mut self) -> String {
            let r = self.reply().expect("a reply");
            assert!(!r.ok, "{r:?}");
            r.error.expect("error message")
        }
    }

    #[test]
    fn request_wire_format() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (Request::ApprovalsList, r#"{"op":"approvals_list"}"#),
            (
                Request::ApprovalsResolve {
                    id: 3,
                    resolution: "allow-once".to_string(),
                },
                r#"{"op":"approvals_resolve","id":3,"resolution":"allow-once"}"#,
            ),
            (Request::DlqList, r#"{"op":"dlq_list"}"#),
            (
                Request::DlqRelease { id: "a-1".into() },
                r#"{"op":"dlq_release","id":"a-1"}"#,
            ),
            (
                Request::DlqDrop { id: "a-1".into() },
                r#"{"op":"dlq_drop","id":"a-1"}"#,
            ),
            (Request::HeldList, r#"{"op":"held_list"}"#),
            (
                Request::HeldAdmit {
                    id: "h-1".into(),
                    always: true,
                },
                r#"{"op":"held_admit","id":"h-1","always":true}"#,
            ),
            (
                Request::HeldDrop { id: "h-1".into() },
                r#"{"op":"held_drop","id":"h-1"}"#,
            ),
            (
                Request::AuditTail {
                    lines: 5,
                    follow: true,
                },
                r#"{"op":"audit_tail","lines":5,"follow":true}"#,
            ),
            (Request::Reload, r#"{"op":"reload"}"#),
        ];
        assert_eq!(cases.len(), OPS.len(), "one case per op of the table");
        for ((req, text), (name, fields)) in cases.iter().zip(OPS) {
            assert_eq!(serde_json::to_string(req).unwrap(), *text);
            assert_eq!(parse_request(text.as_bytes()).unwrap(), *req);
            // The table and the typed requests agree: the same name, in the same order, and
            // every field the request serializes is one the table lists.
            assert_eq!(req.op(), *name);
            let v = serde_json::to_value(req).unwrap();
            for k in v.as_object().unwrap().keys().filter(|k| *k != "op") {
                assert!(fields.contains(&k.as_str()), "{name}: {k}");
            }
        }
        assert_eq!(
            parse_request(br#"{"op":"audit_tail"}"#).unwrap(),
            Request::AuditTail {
                lines: DEFAULT_TAIL_LINES,
                follow: false
            }
        );
        assert!(parse_request(br#"{"op":"status","x":1}"#).is_err());
        assert!(parse_request(br#"{"op":"dlq_drop"}"#)
            .unwrap_err()
            .contains("id"));
        assert!(parse_request(br#"{"op":"nope"}"#)
            .unwrap_err()
            .starts_with("unknown op \"nope\""));
        assert!(parse_request(b"{").unwrap_err().contains("not JSON"));
        assert!(parse_request(b"[]").unwrap_err().contains("object"));
        assert!(parse_request(br#"{"op":1}"#)
            .unwrap_err()
            .contains("string"));
        assert!(parse_request(br#"{}"#).unwrap_err().contains("no \"op\""));
        for (op, fields) in OPS {
            assert_eq!(op_fields(op), Some(*fields), "{op}");
        }
        assert!(parse_request(br#"{"op":"reload","lines":1}"#)
            .unwrap_err()
            .contains("unknown field \"lines\""));
        for r in Resolution::ALL {
            assert_eq!(Resolution::parse(r.as_str()), Some(r));
        }
        assert!(Resolution::parse("allow").is_none());
    }

    #[test]
    fn every_request_kind_round_trips() {
        let mut s = serve();
        let reqs = vec![
            Request::Status,
            Request::ApprovalsList,
            Request::ApprovalsResolve {
                id: 7,
                resolution: "deny".to_string(),
            },
            Request::DlqList,
            Request::DlqRelease { id: "x-1".into() },
            Request::DlqDrop { id: "x-2".into() },
            Request::HeldList,
            Request::HeldAdmit {
                id: "h-1".into(),
                always: false,
            },
            Request::HeldDrop { id: "h-2".into() },
        ];
        let status = call(&s.path, &Request::Status).unwrap();
        let status: StatusReport = serde_json::from_value(status).unwrap();
        assert_eq!(status, sample_status());
        for r in &reqs[1..] {
            call(&s.path, r).unwrap();
        }
        assert_eq!(
            call(&s.path, &Request::DlqDrop { id: "x-2".into() }).unwrap(),
            serde_json::json!({"dropped": "x-2"})
        );
        // The handler's errors come back as Daemon errors with its message.
        match call(&s.path, &Request::Reload) {
            Err(ControlError::Daemon { message }) => assert!(message.contains("unknown key")),
            other => panic!("{other:?}"),
        }
        match call(
            &s.path,
            &Request::ApprovalsResolve {
                id: 404,
                resolution: "deny".into(),
            },
        ) {
            Err(ControlError::Daemon { message }) => assert_eq!(message, "no pending approval 404"),
            other => panic!("{other:?}"),
        }
        let seen = s.fake.seen.lock().unwrap().clone();
        let mut want = reqs.clone();
        want.push(Request::DlqDrop { id: "x-2".into() });
        want.push(Request::Reload);
        want.push(Request::ApprovalsResolve {
            id: 404,
            resolution: "deny".into(),
        });
        assert_eq!(seen, want);
        // Several requests on one connection.
        let mut raw = Raw::new(&s.path);
        raw.send(b"{\"op\":\"dlq_list\"}\n\n{\"op\":\"approvals_list\"}\n");
        assert!(raw.reply().unwrap().ok);
        assert!(raw.reply().unwrap().ok);
        s.stop();
    }

    #[test]
    fn bad_requests_get_errors_and_the_connection_stays() {
        let mut s = serve();
        let mut raw = Raw::new(&s.path);
        raw.send(b"this is not json\n");
        assert!(raw.error().contains("not JSON"));
        raw.send(b"{\"op\":\"frobnicate\"}\n");
        let e = raw.error();
        assert!(e.starts_with("unknown op \"frobnicate\""), "{e}");
        assert!(e.contains("status"), "{e}");
        raw.send(b"{\"op\":\"status\",\"verbose\":true}\n");
        assert!(raw.error().contains("verbose"));
        raw.send(b"[1,2]\n");
        assert!(raw.error().contains("object"));
        raw.send(b"{\"op\":\"approvals_resolve\",\"id\":\"x\",\"resolution\":\"deny\"}\n");
        assert!(raw.error().starts_with("bad request: approvals_resolve"));
        // Still usable; none of the bad ones reached the handler.
        raw.send(b"{\"op\":\"status\"}\r\n");
        let r = raw.reply().unwrap();
        assert!(r.ok && r.result.is_some(), "{r:?}");
        assert_eq!(*s.fake.seen.lock().unwrap(), vec![Request::Status]);
        // A last request without a newline before EOF is still answered.
        let mut raw = Raw::new(&s.path);
        raw.send(b"{\"op\":\"dlq_list\"}");
        raw.r.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
        assert!(raw.reply().unwrap().ok);
        assert!(raw.reply().is_none());
        s.stop();
    }

    #[test]
    fn oversize_line_is_refused_and_closed() {
        let mut s = serve();
        // Exactly the limit is fine.
        let mut line = br#"{"op":"status"}"#.to_vec();
        line.resize(MAX_REQUEST_LINE, b' ');
        line.push(b'\n');
        let mut raw = Raw::new(&s.path);
        raw.send(&line);
        assert!(raw.reply().unwrap().ok);
        // One byte more is not, and the connection ends.
        let mut line = br#"{"op":"status"}"#.to_vec();
        line.resize(MAX_REQUEST_LINE + 1, b' ');
        line.extend_from_slice(b"\n{\"op\":\"status\"}\n");
        let mut raw = Raw::new(&s.path);
        raw.send(&line);
        let e = raw.error();
        assert!(e.contains("longer than 65536 bytes"), "{e}");
        assert!(raw.reply().is_none(), "connection must be closed");
        assert_eq!(s.fake.seen.lock().unwrap().len(), 1);
        s.stop();
    }

    #[test]
    fn idle_connections_are_closed() {
        let mut s = serve_with(None, Duration::from_millis(300));
        let mut raw = Raw::new(&s.path);
        let t = Instant::now();
        assert!(raw.reply().is_none());
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
        s.stop();
    }

    #[test]
    fn no_daemon_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let e = call(&path, &Request::Status).unwrap_err();
        assert!(matches!(e, ControlError::NotRunning { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("no supervisor is running"), "{msg}");
        assert!(msg.contains("carapace run"), "{msg}");
        // A socket nobody listens on: the same.
        drop(UnixListener::bind(&path).unwrap());
        assert!(matches!(
            call(&path, &Request::Status),
            Err(ControlError::NotRunning { .. })
        ));
        assert!(matches!(
            stream(
                &path,
                &Request::AuditTail {
                    lines: 1,
                    follow: false
                },
                |_| true
            ),
            Err(ControlError::NotRunning { .. })
        ));
    }

    #[test]
    fn stale_socket_is_replaced_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // Stale: bound, then its listener gone.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ControlServer::bind(&path, None).expect("stale socket replaced");
        let stop = server.shutdown_handle();
        let rt = runtime();
        let fake = Arc::new(Fake::default());
        let task = {
            let _g = rt.enter();
            server.serve(fake)
        };
        call(&path, &Request::Status).expect("served");
        // Live: a second server refuses to take it, and the first still answers.
        let e = ControlServer::bind(&path, None).unwrap_err();
        assert!(matches!(e, ControlError::InUse { .. }), "{e:?}");
        assert!(e.to_string().contains("another supervisor is serving"));
        call(&path, &Request::Status).expect("still served");
        // Shutdown removes the socket.
        stop.shutdown();
        rt.block_on(task).unwrap();
        assert!(!path.exists());
        // Dropping an unserved server removes its socket too, but not one that replaced it.
        let server = ControlServer::bind(&path, None).unwrap();
        drop(server);
        assert!(!path.exists());
        let server = ControlServer::bind(&path, None).unwrap();
        fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(server);
        assert!(path.exists(), "someone else's socket was removed");
        drop(other);
    }

    #[test]
    fn concurrent_binds_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        for _ in 0..5 {
            let barrier = Arc::new(std::sync::Barrier::new(6));
            let results: Vec<_> = (0..6)
                .map(|_| {
                    let (p, b) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        ControlServer::bind(&p, None)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
            assert_eq!(won.len(), 1, "{results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert!(matches!(e, ControlError::InUse { .. }), "{e:?}");
                }
            }
            drop(results);
            assert!(!path.exists());
        }
    }

    #[test]
    fn a_wedged_server_is_live_and_the_probe_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A server that never accepts, with a backlog of one...
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on our own listening socket; it only changes the backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
        // ...filled up (each probe's connection stays queued).
        for _ in 0..4 {
            assert!(matches!(probe(&path), Ok(Probe::Live)));
        }
        // The backlog is full: a blocking connect now waits.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let blocked = std::thread::spawn(move || {
            let r = UnixStream::connect(&p);
            let _ = tx.send(r.is_ok());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the backlog is not full: the test proves nothing"
        );
        // Binding over it neither hangs nor steals it.
        let (tx2, rx2) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx2.send(ControlServer::bind(&p, None).map(|_| ()));
        });
        let r = rx2
            .recv_timeout(Duration::from_secs(5))
            .expect("bind hung on a wedged server");
        assert!(matches!(r, Err(ControlError::InUse { .. })), "{r:?}");
        assert!(path.exists());
        // Closing the listener releases the blocked connect.
        drop(listener);
        let _ = rx.recv_timeout(Duration::from_secs(5));
        blocked.join().unwrap();
    }

    #[test]
    fn bind_refuses_unsafe_places() {
        let dir = tempfile::tempdir().unwrap();
        // Not a socket at the path.
        let file = dir.path().join("control.sock");
        fs::write(&file, "x").unwrap();
        let e = ControlServer::bind(&file, None).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(file.exists());
        // Parent is a symlink.
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ControlServer::bind(&link.join("control.sock"), None).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        // Parent writable by others.
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = ControlServer::bind(&open.join("control.sock"), None).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
        // Relative path.
        assert!(ControlServer::bind(Path::new("control.sock"), None).is_err());
        // A missing parent is created, private to us (0755 as root, else 0700).
        let run = dir.path().join("run/carapace");
        let s = ControlServer::bind(&run.join("control.sock"), None).unwrap();
        let mode = fs::metadata(&run).unwrap().mode() & 0o777;
        assert_eq!(mode, if euid() == 0 { 0o755 } else { 0o700 });
        drop(s);
    }

    #[test]
    fn socket_mode_0660_and_group() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let s = ControlServer::bind(&path, Some(CONTROL_GID)).unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o660);
        assert_eq!(m.gid(), CONTROL_GID);
        assert_eq!(m.uid(), euid());
        // Nothing else left behind (the private temporary directory is gone).
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("control.sock")]);
        drop(s);
        // Without a group: ours.
        let s = ControlServer::bind(&path, None).unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o660);
        assert_eq!(m.gid(), unsafe_free_egid());
        drop(s);
    }

    fn unsafe_free_egid() -> u32 {
        // SAFETY: getegid has no preconditions.
        unsafe { libc::getegid() }
    }

    #[test]
    fn peer_allowed_rules() {
        let no_groups = || -> io::Result<Vec<u32>> { panic!("groups asked for needlessly") };
        assert!(peer_allowed(0, 0, 1000, None, no_groups));
        assert!(peer_allowed(1000, 1000, 1000, None, no_groups));
        assert!(!peer_allowed(1001, 1001, 1000, None, no_groups));
        assert!(peer_allowed(1001, 50, 1000, Some(50), no_groups));
        assert!(peer_allowed(1001, 1001, 1000, Some(50), || Ok(vec![7, 50])));
        assert!(!peer_allowed(1001, 1001, 1000, Some(50), || Ok(vec![
            7, 51
        ])));
        assert!(!peer_allowed(1001, 1001, 1000, Some(50), || Err(
            io::Error::other("x")
        )));
    }

    /// Not a test of its own: the unprivileged client the peer tests start (as another uid, via
    /// setpriv). Does nothing unless `CARAPACE_CONTROL_TEST_PEER` names a socket.
    #[test]
    fn peer_helper() {
        let Some(path) = std::env::var_os(PEER_ENV) else {
            return;
        };
        match call(Path::new(&path), &Request::Status) {
            Ok(_) => println!("PEER-RESULT ok"),
            Err(e) => println!("PEER-RESULT err {e}"),
        }
    }

    /// Run [`peer_helper`] as `PEER_UID` with `gid` and supplementary `groups`.
    fn run_peer(path: &Path, gid: u32, groups: &[u32]) -> String {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new("setpriv");
        cmd.arg(format!("--reuid={PEER_UID}"))
            .arg(format!("--regid={gid}"));
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            let g: Vec<String> = groups.iter().map(u32::to_string).collect();
            cmd.arg(format!("--groups={}", g.join(",")));
        }
        let out = cmd
            .arg("--")
            .arg(exe)
            .args([
                "--exact",
                "control::tests::peer_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PEER_ENV, path)
            .output()
            .expect("run setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.split_once("PEER-RESULT ").map(|(_, r)| r.to_string()))
            .unwrap_or_else(|| {
                panic!(
                    "peer helper printed no result: {}\nstdout: {stdout}\nstderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    #[test]
    fn unauthorized_peer_is_refused() {
        if !privileged() {
            return;
        }
        let mut s = serve_with(Some(CONTROL_GID), IDLE_TIMEOUT);
        let dir = s.path.parent().unwrap().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        // With the socket's mode as bound, the file system already keeps the stranger out.
        let r = run_peer(&s.path, PEER_GID, &[]);
        assert!(r.contains("Permission denied"), "{r}");
        // Were the mode too wide (an operator's chmod), SO_PEERCRED still refuses it.
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o666)).unwrap();
        let r = run_peer(&s.path, PEER_GID, &[]);
        assert_eq!(
            r,
            format!(
                "err permission denied: uid {PEER_UID} (gid {PEER_GID}) is not root and not in \
                 the control group"
            )
        );
        // A member of the control group is allowed: by supplementary group, or primary gid.
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(run_peer(&s.path, PEER_GID, &[CONTROL_GID]), "ok");
        assert_eq!(run_peer(&s.path, CONTROL_GID, &[]), "ok");
        // The refused peer never reached the handler.
        assert_eq!(s.fake.seen.lock().unwrap().len(), 2);
        s.stop();
    }

    fn record(seq: u64) -> String {
        format!(r#"{{"seq":{seq},"op":"connect","decision":"allow"}}"#)
    }

    fn tail(path: &Path, lines: usize) -> Vec<Value> {
        let mut got = Vec::new();
        stream(
            path,
            &Request::AuditTail {
                lines,
                follow: false,
            },
            |v| {
                got.push(v);
                true
            },
        )
        .unwrap();
        got
    }

    fn seqs(vals: &[Value]) -> Vec<u64> {
        vals.iter()
            .map(|v| v["seq"].as_u64().unwrap_or(0))
            .collect()
    }

    #[test]
    fn audit_tail_without_follow() {
        let mut s = serve();
        let log = s.fake.audit.clone();
        // No log yet: no records, and the stream ends.
        assert!(tail(&s.path, 10).is_empty());
        let mut text: String = (1..=5).map(|i| record(i) + "\n").collect();
        text.push_str("not json\n");
        text.push_str(r#"{"seq":7,"partial"#); // being written: not sent
        fs::write(&log, &text).unwrap();
        let got = tail(&s.path, 3);
        assert_eq!(seqs(&got[..2]), vec![4, 5]);
        assert_eq!(got[2], Value::String("not json".to_string()));
        assert_eq!(seqs(&tail(&s.path, 100)[..5]), vec![1, 2, 3, 4, 5]);
        assert!(tail(&s.path, 0).is_empty());
        // Records arrive byte for byte (field order as stored), with the raw text.
        let mut raws = Vec::new();
        stream_raw(
            &s.path,
            &Request::AuditTail {
                lines: 2,
                follow: false,
            },
            |_, raw| {
                raws.push(raw.map(str::to_string));
                true
            },
        )
        .unwrap();
        assert_eq!(raws, vec![Some(record(5)), None]);
        let mut raw = Raw::new(&s.path);
        raw.send(b"{\"op\":\"audit_tail\",\"lines\":2}\n");
        let mut line = String::new();
        raw.r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{{\"ok\":true,\"line\":{}}}\n", record(5)));
        // A line crafted to look like more of the reply is not an object: sent as a string.
        let evil = r#"{"seq":9}},"end":true,"x":{"a":1"#;
        fs::write(&log, format!("{evil}\n")).unwrap();
        assert_eq!(tail(&s.path, 1), vec![Value::String(evil.to_string())]);
        // The handler never sees audit_tail.
        assert!(s.fake.seen.lock().unwrap().is_empty());
        // And the connection serves further requests after `end`.
        let mut raw = Raw::new(&s.path);
        raw.send(b"{\"op\":\"audit_tail\",\"lines\":1}\n{\"op\":\"status\"}\n");
        assert_eq!(
            raw.reply().unwrap().line.unwrap(),
            Value::String(evil.to_string())
        );
        assert_eq!(raw.reply().unwrap().end, Some(true));
        assert!(raw.reply().unwrap().result.is_some());
        s.stop();
    }

    #[test]
    fn last_lines_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        // Lines of 1000 bytes: 300 KB, several 64 KiB chunks.
        let line = |i: usize| format!("{i:05}{}", "x".repeat(994));
        let text: String = (0..300).map(|i| line(i) + "\n").collect();
        fs::write(&p, &text).unwrap();
        let mut f = File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        for n in [0, 1, 65, 66, 200, 300, 1000] {
            let (got, end) = last_lines(&mut f, len, n).unwrap();
            assert_eq!(end, len);
            let want: Vec<Vec<u8>> = (300usize.saturating_sub(n)..300)
                .map(|i| line(i).into_bytes())
                .collect();
            assert_eq!(got, want, "n={n}");
        }
        // A torn last line is not returned and the end is before it.
        fs::write(&p, format!("{}\nabc", line(0))).unwrap();
        let mut f = File::open(&p).unwrap();
        let (got, end) = last_lines(&mut f, 1003, 5).unwrap();
        assert_eq!(got, vec![line(0).into_bytes()]);
        assert_eq!(end, 1000);
        // No newline at all.
        let (got, end) = last_lines(&mut f, 3, 5).unwrap();
        assert!(got.is_empty());
        assert_eq!(end, 0);
    }

    #[test]
    fn audit_tail_follow() {
        let mut s = serve();
        let log = s.fake.audit.clone();
        fs::write(&log, format!("{}\n{}\n", record(1), record(2))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = s.path.clone();
        let follower = std::thread::spawn(move || {
            let mut n = 0;
            stream(
                &path,
                &Request::AuditTail {
                    lines: 1,
                    follow: true,
                },
                |v| {
                    n += 1;
                    let _ = tx.send(v);
                    n < 6
                },
            )
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a followed record")
        };
        assert_eq!(next()["seq"], 2);
        // Appended records arrive; a line written in two pieces arrives once, whole.
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{}", record(3)).unwrap();
        assert_eq!(next()["seq"], 3);
        let r4 = record(4);
        f.write_all(&r4.as_bytes()[..5]).unwrap();
        std::thread::sleep(FOLLOW_POLL * 2);
        writeln!(f, "{}", &r4[5..]).unwrap();
        assert_eq!(next()["seq"], 4);
        // Rotation: the old file moved away (a last record in it still comes), a new one made.
        writeln!(f, "{}", record(5)).unwrap();
        fs::rename(&log, log.with_extension("1")).unwrap();
        fs::write(&log, format!("{}\n", record(100))).unwrap();
        let a = next();
        let b = next();
        assert_eq!(seqs(&[a, b]), vec![5, 100]);
        // Truncation: from the start again.
        fs::write(&log, "").unwrap();
        std::thread::sleep(FOLLOW_POLL * 2);
        fs::write(&log, format!("{}\n", record(200))).unwrap();
        assert_eq!(next()["seq"], 200);
        // The callback said stop after six records: the client closes and returns Ok.
        follower.join().unwrap().unwrap();
        assert!(rx.try_recv().is_err());
        s.stop();
    }

    #[test]
    fn shutdown_ends_followers_and_removes_the_socket() {
        let mut s = serve();
        let path = s.path.clone();
        let follower = std::thread::spawn(move || {
            stream(
                &path,
                &Request::AuditTail {
                    lines: 0,
                    follow: true,
                },
                |_| true,
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        s.stop();
        let r = follower.join().unwrap();
        assert!(matches!(r, Err(ControlError::Protocol { .. })), "{r:?}");
        assert!(!s.path.exists());
        assert!(matches!(
            call(&s.path, &Request::Status),
            Err(ControlError::NotRunning { .. })
        ));
    }

    #[test]
    fn aborting_the_task_removes_the_socket() {
        let mut s = serve();
        call(&s.path, &Request::Status).unwrap();
        let task = s.task.take().unwrap();
        task.abort();
        let _ = s.rt.block_on(task);
        assert!(!s.path.exists());
    }
}
