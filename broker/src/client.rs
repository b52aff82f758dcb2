//! Blocking client of the broker (std + libc only, no async runtime): what a confined child
//! (gateway, channel adapter, tool, `carapace-client`) uses to talk to its broker.
//!
//! ```no_run
//! use carapace_broker::client::Client;
//! let mut broker = Client::from_env()?;  // a session on CARAPACE_BROKER_FD (default 3)
//! let (sock, peer) = broker.connect("api.example.com", 443)?;
//! # Ok::<(), carapace_broker::client::ClientError>(())
//! ```
//!
//! **Sessions.** Every process of a sandbox inherits the same broker socket. Two clients using
//! it at once would mix their request ids and read each other's replies, so
//! [`Client::from_env`] does not talk on it: it asks for a `session` (a private socket with the
//! same identity) with a random request id, takes the first well-formed session reply with one
//! fd whatever its id (sessions are interchangeable: a reply meant for another process is as
//! good as its own, which that process then gets instead), and talks only on that. The
//! inherited socket stays open, for the other processes and for the programs this one execs.
//!
//! One request at a time per client: each call sends a frame and blocks until its reply (no
//! read timeout: an `inbound` long poll may take up to
//! [`crate::protocol::MAX_INBOUND_WAIT_MS`]).
//! Events (the `exit` of an exec'd tool) that arrive meanwhile are kept until
//! [`Client::wait_exit`] asks for them. A thread that needs its own channel opens another
//! session with [`Client::session`].

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::approvals::Resolution;
use crate::protocol::{
    decode_server_frame, encode_request, recv_frame, send_frame, Access, AckStatus, DeadLetterInfo,
    DecodeError, DeliverStatus, EncodeError, ErrorBody, ErrorCode, Event, ExitSummary, HeldMessage,
    InboundMessage, OkReply, OutboundMessage, PendingApproval, Reply, Request, SendOutcome,
    SendStatus, ServerFrame, SocketError, BROKER_FD_ENV, DEFAULT_BROKER_FD, MAX_FRAME,
};
use crate::tokens::TokenInfo;

/// The answer to [`Client::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterList {
    /// Oldest first.
    pub letters: Vec<DeadLetterInfo>,
    /// Left out to fit one reply.
    pub omitted: u64,
    /// Entries the broker could not read.
    pub unreadable: u64,
}

/// The fields of a `deliver` ([`Client::deliver_message`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliverArgs {
    pub channel: String,
    pub sender: String,
    pub body: String,
    /// The service's id of the message, unique per channel.
    pub id: Option<String>,
    /// Default: the sender.
    pub conversation: Option<String>,
    /// Where a reply goes; default: the conversation.
    pub reply_to: Option<String>,
}

/// The answer to a `deliver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverReply {
    /// The inbound seq when queued, else 0.
    pub seq: u64,
    pub status: DeliverStatus,
    /// The held id when held.
    pub held: Option<String>,
}

/// The answer to a `send` ([`Client::send_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReply {
    pub status: SendStatus,
    /// When dead-lettered.
    pub dlq_id: Option<String>,
    /// When queued in an adapter channel's outbox.
    pub outbox_id: Option<String>,
}

/// The answer to an `outbox_ack` ([`Client::outbox_ack`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckReply {
    pub status: AckStatus,
    /// When dead-lettered.
    pub dlq_id: Option<String>,
    /// When retrying: in how long it is due again.
    pub retry_in_ms: Option<u64>,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{BROKER_FD_ENV}={value:?} is not a file descriptor number")]
    BadEnv { value: String },
    #[error("fd {fd} is not a broker socket (SOCK_SEQPACKET): {reason}")]
    NotABrokerSocket { fd: RawFd, reason: String },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot encode the request: {0}")]
    Encode(#[from] EncodeError),
    #[error("the broker sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker sent a frame over the size cap")]
    Truncated,
    #[error("{}: {}", .0.code, .0.message)]
    Refused(ErrorBody),
    #[error("the broker's {op} reply carries {got} fds, expected {expected}")]
    FdCount {
        op: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("the broker answered {op} with a {got} reply")]
    WrongReply { op: &'static str, got: &'static str },
    #[error("no exec with request id {0} is awaiting its exit")]
    NoSuchExec(u64),
    #[error("the broker gave no session within {0:?}")]
    NoSession(Duration),
    #[error("{what} {value:?}: expected {expected}")]
    BadArgument {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl ClientError {
    /// The broker's error code when the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(body) => Some(body.code),
            _ => None,
        }
    }
}

/// What an `exec` asks for (see [`Request::Exec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    /// Working directory, relative to the tool's workspace.
    pub cwd: Option<String>,
    /// Who the tool runs for (gateways): selects that owner's own tools workspace.
    pub owner: Option<String>,
    /// A workspace the operator granted, by name.
    pub workspace: Option<String>,
}

/// A started `exec`: the read ends of the tool's stdout and stderr; pass `id` to
/// [`Client::wait_exit`] for its exit summary.
#[derive(Debug)]
pub struct ExecStarted {
    pub id: u64,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A connection to the broker.
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    next_id: u64,
    buf: Vec<u8>,
    /// Events received while waiting for a reply.
    events: VecDeque<(u64, Event)>,
    /// Exec request ids whose exit event has not been taken yet.
    execs: Vec<u64>,
}

/// The fd number named by `CARAPACE_BROKER_FD` (default 3).
pub fn broker_fd_from_env() -> Result<RawFd, ClientError> {
    match std::env::var_os(BROKER_FD_ENV) {
        None => Ok(DEFAULT_BROKER_FD),
        Some(v) => {
            let s = v.to_string_lossy();
            s.trim()
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or(ClientError::BadEnv {
                    value: s.into_owned(),
                })
        }
    }
}

fn check_seqpacket(fd: RawFd) -> Result<(), ClientError> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a live c_int; a bad fd only
    // makes it fail with EBADF/ENOTSOCK.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(ClientError::NotABrokerSocket {
            fd,
            reason: io::Error::last_os_error().to_string(),
        });
    }
    if ty != libc::SOCK_SEQPACKET {
        return Err(ClientError::NotABrokerSocket {
            fd,
            reason: format!("socket type {ty}"),
        });
    }
    Ok(())
}

/// How long one `session` request waits for a reply before it is sent again (a reply can be
/// lost to another process only when it is an error, e.g. `busy`).
const SESSION_ATTEMPT: Duration = Duration::from_secs(5);
/// How long [`Client::open_session`] keeps asking.
const SESSION_DEADLINE: Duration = Duration::from_secs(30);

/// A request id no other process of the sandbox is likely to pick: 64 bits from `getrandom`
/// (mixed with the pid and the time should it fail). Never 0.
fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    let filled = getrandom::fill(&mut bytes).is_ok();
    let mut id = u64::from_ne_bytes(bytes);
    if !filled {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        id ^= (u64::from(std::process::id()) << 32) ^ nanos.rotate_left(17);
    }
    id.max(1)
}

/// Wait until `fd` is readable or `until` passes: Some(true) readable, Some(false) timed out,
/// None when poll(2) is not available (then the caller reads blocking).
fn wait_readable(fd: BorrowedFd<'_>, until: Instant) -> Option<bool> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(false);
        }
        // ppoll(2) under rustix: the timeout is exact (no rounding to milliseconds); a
        // `left` beyond what a timespec holds is no deadline at all.
        let timeout = rustix::event::Timespec::try_from(left).ok();
        let mut pfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut pfd, timeout.as_ref()) {
            Ok(0) => {}
            Ok(_) => return Some(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
}

/// Read the shared socket until a session reply carrying one fd (any id), an error reply to
/// `id`, or `until`. Frames meant for others are dropped (their fds closed).
fn wait_session(
    shared: BorrowedFd<'_>,
    buf: &mut [u8],
    id: u64,
    until: Instant,
) -> Result<Option<OwnedFd>, ClientError> {
    loop {
        let flags = match wait_readable(shared, until) {
            Some(true) => libc::MSG_DONTWAIT,
            Some(false) => return Ok(None),
            None => 0,
        };
        let r = match recv_frame(shared, buf, flags) {
            // Another process read it first.
            Err(e) if e.is_would_block() => continue,
            Err(e) => return Err(e.into()),
            Ok(r) => r,
        };
        if r.eof {
            return Err(ClientError::Closed);
        }
        if r.truncated {
            continue;
        }
        let Ok(frame) = decode_server_frame(&buf[..r.len]) else {
            continue;
        };
        match frame {
            ServerFrame::Reply {
                reply: Reply::Ok(OkReply::Session {}),
                ..
            } if r.fds.len() == 1 => {
                return Ok(r.fds.into_iter().next());
            }
            ServerFrame::Reply {
                id: rid,
                reply: Reply::Err(body),
            } if rid == id => return Err(ClientError::Refused(body)),
            ServerFrame::Reply {
                id: rid,
                reply: Reply::Ok(OkReply::Session {}),
            } if rid == id => {
                return Err(ClientError::FdCount {
                    op: "session",
                    got: r.fds.len(),
                    expected: 1,
                })
            }
            // Someone else's reply or event.
            _ => {}
        }
    }
}

impl Client {
    /// A session (see the module docs) on the broker socket named by `CARAPACE_BROKER_FD`
    /// (default 3). The inherited socket is left open and is not owned by the client; the
    /// session's socket is close-on-exec. Every process may call this, as often as it likes.
    pub fn from_env() -> Result<Client, ClientError> {
        let fd = broker_fd_from_env()?;
        check_seqpacket(fd)?;
        // SAFETY: the fd is open (getsockopt just succeeded on it) and we never close it; it
        // is only borrowed for the session handshake below, during which nothing in this
        // process closes the inherited broker socket (the contract of CARAPACE_BROKER_FD).
        let shared = unsafe { BorrowedFd::borrow_raw(fd) };
        Client::open_session(shared)
    }

    /// Open a session on a socket other processes may be using too (`shared` is only
    /// borrowed): send `session` with a random id and take the first session reply with one
    /// fd, whatever its id. Asks again every 5 s (an error reply meant for us can be read by
    /// another process) and gives up after 30 s.
    pub fn open_session(shared: BorrowedFd<'_>) -> Result<Client, ClientError> {
        let mut buf = vec![0u8; MAX_FRAME];
        let deadline = Instant::now() + SESSION_DEADLINE;
        loop {
            let id = random_id();
            send_frame(shared, &encode_request(id, &Request::Session {})?, &[])?;
            let attempt = (Instant::now() + SESSION_ATTEMPT).min(deadline);
            if let Some(fd) = wait_session(shared, &mut buf, id, attempt)? {
                let mut client = Client::new(fd);
                client.buf = buf;
                return Ok(client);
            }
            if Instant::now() >= deadline {
                return Err(ClientError::NoSession(SESSION_DEADLINE));
            }
        }
    }

    /// A client over a `SOCK_SEQPACKET` socket that only it uses (a session, or a socket of
    /// its own); must be blocking. It owns and closes the fd.
    pub fn new(fd: OwnedFd) -> Client {
        Client {
            fd,
            next_id: 1,
            buf: vec![0; MAX_FRAME],
            events: VecDeque::new(),
            execs: Vec::new(),
        }
    }

    /// The socket.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    fn recv(&mut self) -> Result<(ServerFrame, Vec<OwnedFd>), ClientError> {
        let r = recv_frame(self.fd.as_fd(), &mut self.buf, 0)?;
        if r.eof {
            return Err(ClientError::Closed);
        }
        if r.truncated {
            return Err(ClientError::Truncated);
        }
        let frame = decode_server_frame(&self.buf[..r.len])?;
        Ok((frame, r.fds))
    }

    /// Send a request and wait for its reply. Returns the reply and the fds attached to it
    /// (checked against [`OkReply::fd_count`]). Error replies are returned as `Ok(Reply::Err)`.
    pub fn request(&mut self, req: &Request) -> Result<(u64, Reply, Vec<OwnedFd>), ClientError> {
        let id = self.alloc_id();
        let bytes = encode_request(id, req)?;
        send_frame(self.fd.as_fd(), &bytes, &[])?;
        loop {
            let (frame, fds) = self.recv()?;
            match frame {
                ServerFrame::Event { id: eid, event } => {
                    // Events carry no fds; any attached are closed here.
                    drop(fds);
                    self.events.push_back((eid, event));
                }
                // id 0: the broker could not read our frame's id; we have one request out.
                ServerFrame::Reply { id: rid, reply } if rid == id || rid == 0 => {
                    if fds.len() != reply.fd_count() {
                        return Err(ClientError::FdCount {
                            op: req.op(),
                            got: fds.len(),
                            expected: reply.fd_count(),
                        });
                    }
                    return Ok((id, reply, fds));
                }
                // A stale reply (to nothing we wait for): ignore, closing its fds.
                ServerFrame::Reply { .. } => drop(fds),
            }
        }
    }

    /// Like [`Client::request`], but a refusal is an error and the reply must answer `req`'s op.
    fn call(&mut self, req: &Request) -> Result<(u64, OkReply, Vec<OwnedFd>), ClientError> {
        let (id, reply, fds) = self.request(req)?;
        match reply {
            Reply::Err(body) => Err(ClientError::Refused(body)),
            Reply::Ok(ok) if ok.op() != req.op() => Err(ClientError::WrongReply {
                op: req.op(),
                got: ok.op(),
            }),
            Reply::Ok(ok) => Ok((id, ok, fds)),
        }
    }

    /// `ping`: a no-op round trip.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Ping {}).map(|_| ())
    }

    /// `session`: another client with the same identity, on a socket of its own (e.g. for
    /// another thread).
    pub fn session(&mut self) -> Result<Client, ClientError> {
        let (_, ok, fds) = self.call(&Request::Session {})?;
        match (ok, one_fd(fds)) {
            (OkReply::Session {}, Some(fd)) => Ok(Client::new(fd)),
            (ok, _) => Err(wrong("session", &ok)),
        }
    }

    /// `connect`: a connected TCP socket to `host:port` and the address actually connected.
    pub fn connect(&mut self, host: &str, port: u16) -> Result<(OwnedFd, String), ClientError> {
        let (_, ok, fds) = self.call(&Request::Connect {
            host: host.to_owned(),
            port,
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Connect { peer }, Some(fd)) => Ok((fd, peer)),
            (ok, _) => Err(wrong("connect", &ok)),
        }
    }

    /// `open`: a file by absolute path.
    pub fn open(&mut self, path: &str, access: Access) -> Result<File, ClientError> {
        self.open_in(None, path, access)
    }

    /// `open` in a granted workspace: `path` relative to workspace `workspace` (or, when None,
    /// an absolute path as in [`Client::open`]). The profile's `open` rules decide, on the
    /// workspace's directory joined with `path`.
    pub fn open_in(
        &mut self,
        workspace: Option<&str>,
        path: &str,
        access: Access,
    ) -> Result<File, ClientError> {
        let (_, ok, fds) = self.call(&Request::Open {
            path: path.to_owned(),
            access,
            workspace: workspace.map(str::to_owned),
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Open { .. }, Some(fd)) => Ok(File::from(fd)),
            (ok, _) => Err(wrong("open", &ok)),
        }
    }

    /// `secret`: a sealed memfd holding the credential, and its length.
    pub fn secret(&mut self, name: &str) -> Result<(OwnedFd, u64), ClientError> {
        let (_, ok, fds) = self.call(&Request::Secret {
            name: name.to_owned(),
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Secret { len }, Some(fd)) => Ok((fd, len)),
            (ok, _) => Err(wrong("secret", &ok)),
        }
    }

    /// `send`: an outbound message; returns what became of it (and the dead-letter id).
    pub fn send(
        &mut self,
        channel: &str,
        recipient: &str,
        body: &str,
    ) -> Result<(SendStatus, Option<String>), ClientError> {
        let r = self.send_with(channel, recipient, body, None, None)?;
        Ok((r.status, r.dlq_id))
    }

    /// `send` with the optional fields: `in_reply_to` (the inbound message id this answers)
    /// and `key` (an idempotency key: a second send with it on the channel is answered
    /// [`SendStatus::Duplicate`] and not sent again).
    pub fn send_with(
        &mut self,
        channel: &str,
        recipient: &str,
        body: &str,
        in_reply_to: Option<&str>,
        key: Option<&str>,
    ) -> Result<SendReply, ClientError> {
        let (_, ok, _) = self.call(&Request::Send {
            channel: channel.to_owned(),
            recipient: recipient.to_owned(),
            body: body.to_owned(),
            in_reply_to: in_reply_to.map(str::to_owned),
            key: key.map(str::to_owned),
        })?;
        match ok {
            OkReply::Send {
                status,
                dlq_id,
                outbox_id,
            } => Ok(SendReply {
                status,
                dlq_id,
                outbox_id,
            }),
            ok => Err(wrong("send", &ok)),
        }
    }

    /// `exec`: start a tool; read its output from the returned pipes, then [`Client::wait_exit`].
    pub fn exec(
        &mut self,
        argv: Vec<String>,
        cwd: Option<String>,
    ) -> Result<ExecStarted, ClientError> {
        self.exec_with(ExecOptions {
            argv,
            cwd,
            ..ExecOptions::default()
        })
    }

    /// `exec` with every option: the workspace (a granted one by name, or the owner's own)
    /// and the working directory within it.
    pub fn exec_with(&mut self, o: ExecOptions) -> Result<ExecStarted, ClientError> {
        let (id, ok, fds) = self.call(&Request::Exec {
            argv: o.argv,
            cwd: o.cwd,
            owner: o.owner,
            workspace: o.workspace,
        })?;
        let mut fds = fds.into_iter();
        match (ok, fds.next(), fds.next()) {
            (OkReply::Exec {}, Some(stdout), Some(stderr)) => {
                self.execs.push(id);
                Ok(ExecStarted { id, stdout, stderr })
            }
            (ok, _, _) => Err(wrong("exec", &ok)),
        }
    }

    /// `auth` (gateways): the client token whose SHA-256, 64 lowercase hex digits
    /// ([`crate::tokens::token_sha256_hex`] of the token's text), is `token_sha256`. An
    /// unknown, revoked or malformed one is refused (`denied`, "unknown or revoked token").
    pub fn auth(&mut self, token_sha256: &str) -> Result<TokenInfo, ClientError> {
        let (_, ok, _) = self.call(&Request::Auth {
            token_sha256: token_sha256.to_owned(),
        })?;
        match ok {
            OkReply::Auth { token } => Ok(token),
            ok => Err(wrong("auth", &ok)),
        }
    }

    /// `redact` (profiles with `auth = true`): the byte ranges of `text` (at most
    /// [`crate::protocol::MAX_REDACT_TEXT`] bytes) that hold a known secret value or a match of
    /// the profile's `redact` patterns.
    pub fn redact_ranges(&mut self, text: &str) -> Result<Vec<(usize, usize)>, ClientError> {
        let (_, ok, _) = self.call(&Request::Redact {
            text: text.to_owned(),
        })?;
        match ok {
            OkReply::Redact { ranges } => Ok(ranges),
            ok => Err(wrong("redact", &ok)),
        }
    }

    /// `approvals` (profiles with `approve = true`): the approvals waiting for an operator,
    /// oldest first.
    pub fn approvals(&mut self) -> Result<Vec<PendingApproval>, ClientError> {
        let (_, ok, _) = self.call(&Request::Approvals {})?;
        match ok {
            OkReply::Approvals { pending, .. } => Ok(pending),
            ok => Err(wrong("approvals", &ok)),
        }
    }

    /// `approve` (profiles with `approve = true`): answer pending approval `approval` with
    /// `resolution` (`allow-once`, `allow-always` or `deny`); `by` names who answered (e.g. a
    /// token id; at most 128 characters), recorded in the audit log as the caller's claim.
    /// Returns how the approval ended (`allowed once`, `allowed always`, `denied`).
    pub fn approve(
        &mut self,
        approval: u64,
        resolution: &str,
        by: Option<&str>,
    ) -> Result<String, ClientError> {
        let Some(resolution) = Resolution::parse(resolution) else {
            return Err(ClientError::BadArgument {
                what: "resolution",
                value: resolution.chars().take(64).collect(),
                expected: Resolution::EXPECTED,
            });
        };
        let (_, ok, _) = self.call(&Request::Approve {
            approval,
            resolution,
            by: by.map(str::to_owned),
        })?;
        match ok {
            OkReply::Approve { decision, .. } => Ok(decision),
            ok => Err(wrong("approve", &ok)),
        }
    }

    /// `deliver` (channel adapters: profiles whose `deliver` lists `channel`): hand a message
    /// received from `sender` on the channel's service to the broker, for the gateway. Returns
    /// its sequence number. A refusal with [`ErrorCode::Busy`] means the inbound queue is full:
    /// keep the message and try again later.
    pub fn deliver(&mut self, channel: &str, sender: &str, body: &str) -> Result<u64, ClientError> {
        let r = self.deliver_message(&DeliverArgs {
            channel: channel.to_owned(),
            sender: sender.to_owned(),
            body: body.to_owned(),
            ..DeliverArgs::default()
        })?;
        Ok(r.seq)
    }

    /// `deliver` with every field: the message's id on its service (deliver is idempotent on
    /// (channel, id)), its conversation and reply address. Returns whether it was queued (with
    /// its seq), held for the operator (with the held id) or a duplicate of one already taken.
    /// Only after this answered may an adapter advance its service cursor; a refusal with
    /// [`ErrorCode::Busy`] or [`ErrorCode::Unavailable`] means: keep it and try again later.
    pub fn deliver_message(&mut self, args: &DeliverArgs) -> Result<DeliverReply, ClientError> {
        let (_, ok, _) = self.call(&Request::Deliver {
            channel: args.channel.clone(),
            sender: args.sender.clone(),
            body: args.body.clone(),
            id: args.id.clone(),
            conversation: args.conversation.clone(),
            reply_to: args.reply_to.clone(),
        })?;
        match ok {
            OkReply::Deliver { seq, status, held } => Ok(DeliverReply { seq, status, held }),
            ok => Err(wrong("deliver", &ok)),
        }
    }

    /// `outbox` (the adapter of `channel`): the due outbound messages, each now leased to this
    /// adapter for [`crate::protocol::OUTBOX_LEASE_MS`]; with none, the broker waits up to
    /// `wait_ms` (at most 30 s) and this call blocks as long.
    pub fn outbox(
        &mut self,
        channel: &str,
        wait_ms: u64,
    ) -> Result<Vec<OutboundMessage>, ClientError> {
        let (_, ok, _) = self.call(&Request::Outbox {
            channel: channel.to_owned(),
            wait_ms,
        })?;
        match ok {
            OkReply::Outbox { messages } => Ok(messages),
            ok => Err(wrong("outbox", &ok)),
        }
    }

    /// `outbox_ack` (the adapter of `channel`): what became of outbound message `id`.
    pub fn outbox_ack(
        &mut self,
        channel: &str,
        id: &str,
        outcome: SendOutcome,
    ) -> Result<AckReply, ClientError> {
        let (_, ok, _) = self.call(&Request::OutboxAck {
            channel: channel.to_owned(),
            id: id.to_owned(),
            outcome,
        })?;
        match ok {
            OkReply::OutboxAck {
                status,
                dlq_id,
                retry_in_ms,
            } => Ok(AckReply {
                status,
                dlq_id,
                retry_in_ms,
            }),
            ok => Err(wrong("outbox_ack", &ok)),
        }
    }

    /// `channel_state` (the adapter of `channel`): whether it reaches its service now.
    pub fn channel_state(
        &mut self,
        channel: &str,
        connected: bool,
        error: Option<&str>,
    ) -> Result<(), ClientError> {
        let (_, ok, _) = self.call(&Request::ChannelState {
            channel: channel.to_owned(),
            connected,
            error: error.map(str::to_owned),
        })?;
        match ok {
            OkReply::ChannelState {} => Ok(()),
            ok => Err(wrong("channel_state", &ok)),
        }
    }

    /// `held` (profiles with `approve = true`): the held inbound messages, oldest first, and
    /// how many were left out to fit one reply.
    pub fn held(&mut self) -> Result<(Vec<HeldMessage>, u64), ClientError> {
        let (_, ok, _) = self.call(&Request::Held {})?;
        match ok {
            OkReply::Held { held, omitted } => Ok((held, omitted)),
            ok => Err(wrong("held", &ok)),
        }
    }

    /// `admit` (profiles with `approve = true`): queue held message `id` for the agent;
    /// `always` admits its sender on that channel for good. Returns its inbound seq.
    pub fn admit(&mut self, id: &str, always: bool, by: Option<&str>) -> Result<u64, ClientError> {
        let (_, ok, _) = self.call(&Request::Admit {
            id: id.to_owned(),
            always,
            by: by.map(str::to_owned),
        })?;
        match ok {
            OkReply::Admit { seq } => Ok(seq),
            ok => Err(wrong("admit", &ok)),
        }
    }

    /// `drop_held` (profiles with `approve = true`): drop held message `id`.
    pub fn drop_held(&mut self, id: &str, by: Option<&str>) -> Result<(), ClientError> {
        let (_, ok, _) = self.call(&Request::DropHeld {
            id: id.to_owned(),
            by: by.map(str::to_owned),
        })?;
        match ok {
            OkReply::DropHeld {} => Ok(()),
            ok => Err(wrong("drop_held", &ok)),
        }
    }

    /// `dead_letters` (profiles with `approve = true`): the dead letters, oldest first; how
    /// many were left out of the reply; how many entries could not be read.
    pub fn dead_letters(&mut self) -> Result<DeadLetterList, ClientError> {
        let (_, ok, _) = self.call(&Request::DeadLetters {})?;
        match ok {
            OkReply::DeadLetters {
                letters,
                omitted,
                unreadable,
            } => Ok(DeadLetterList {
                letters,
                omitted,
                unreadable,
            }),
            ok => Err(wrong("dead_letters", &ok)),
        }
    }

    /// `dlq_release` (profiles with `approve = true`): deliver dead letter `id` as it stands.
    pub fn dlq_release(&mut self, id: &str, by: Option<&str>) -> Result<(), ClientError> {
        let (_, ok, _) = self.call(&Request::DlqRelease {
            id: id.to_owned(),
            by: by.map(str::to_owned),
        })?;
        match ok {
            OkReply::DlqRelease {} => Ok(()),
            ok => Err(wrong("dlq_release", &ok)),
        }
    }

    /// `dlq_drop` (profiles with `approve = true`): drop dead letter `id`.
    pub fn dlq_drop(&mut self, id: &str, by: Option<&str>) -> Result<(), ClientError> {
        let (_, ok, _) = self.call(&Request::DlqDrop {
            id: id.to_owned(),
            by: by.map(str::to_owned),
        })?;
        match ok {
            OkReply::DlqDrop {} => Ok(()),
            ok => Err(wrong("dlq_drop", &ok)),
        }
    }

    /// `audit_query` (profiles with `approve = true`): the audit records matching `filter`,
    /// newest first, at most `limit`; and whether older ones match too.
    pub fn audit_query(
        &mut self,
        filter: &crate::audit::query::Filter,
        limit: u32,
    ) -> Result<(Vec<crate::audit::StoredRecord>, bool), ClientError> {
        let (_, ok, _) = self.call(&Request::AuditQuery {
            audit_op: filter.op.clone(),
            decision: filter.decision,
            since: filter.since.clone(),
            before_seq: filter.before_seq,
            limit,
        })?;
        match ok {
            OkReply::AuditQuery { records, more } => Ok((records, more)),
            ok => Err(wrong("audit_query", &ok)),
        }
    }

    /// `children` (profiles with `approve = true`): the service's children and their state.
    pub fn children(&mut self) -> Result<Vec<crate::protocol::ChildSummary>, ClientError> {
        let (_, ok, _) = self.call(&Request::Children {})?;
        match ok {
            OkReply::Children { children } => Ok(children),
            ok => Err(wrong("children", &ok)),
        }
    }

    /// `channels` (profiles with `approve = true`): every channel of the policy with its
    /// figures.
    pub fn channels(&mut self) -> Result<Vec<crate::ops::ChannelStats>, ClientError> {
        let (_, ok, _) = self.call(&Request::Channels {})?;
        match ok {
            OkReply::Channels { channels } => Ok(channels),
            ok => Err(wrong("channels", &ok)),
        }
    }

    /// `inbound` (profiles with `inbound = true`: the gateway): the delivered messages with a
    /// seq above `after`, oldest first, and the cursor to pass as `after` next time (the last
    /// seq returned, or `after`). Passing `after` acknowledges every message up to it (they
    /// leave the broker's queue). When there is none yet, the broker waits up to `wait_ms`
    /// (at most 30 s) for one, and this call blocks as long.
    pub fn inbound(
        &mut self,
        after: u64,
        wait_ms: u64,
    ) -> Result<(Vec<InboundMessage>, u64), ClientError> {
        let (_, ok, _) = self.call(&Request::Inbound { after, wait_ms })?;
        match ok {
            OkReply::Inbound { messages, next } => Ok((messages, next)),
            ok => Err(wrong("inbound", &ok)),
        }
    }

    /// Block until the `exit` event of the exec started with request `id`.
    pub fn wait_exit(&mut self, id: u64) -> Result<ExitSummary, ClientError> {
        let Some(pos) = self.execs.iter().position(|x| *x == id) else {
            return Err(ClientError::NoSuchExec(id));
        };
        loop {
            if let Some(i) = self.events.iter().position(|(eid, _)| *eid == id) {
                self.execs.swap_remove(pos);
                let Some((_, Event::Exit(summary))) = self.events.remove(i) else {
                    continue;
                };
                return Ok(summary);
            }
            let (frame, fds) = self.recv()?;
            drop(fds);
            match frame {
                ServerFrame::Event { id: eid, event } => self.events.push_back((eid, event)),
                ServerFrame::Reply { .. } => {} // stale; nothing waits for it
            }
        }
    }
}

fn one_fd(fds: Vec<OwnedFd>) -> Option<OwnedFd> {
    let mut it = fds.into_iter();
    match (it.next(), it.next()) {
        (Some(fd), None) => Some(fd),
        _ => None,
    }
}

fn wrong(op: &'static str, ok: &OkReply) -> ClientError {
    ClientError::WrongReply { op, got: ok.op() }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_request, encode_event, encode_reply, seqpacket_pair};
    use std::io::Read;
    use std::sync::Arc;

    /// A scripted broker on a thread: answers each request with `answer`.
    fn fake_broker(
        fd: OwnedFd,
        answer: impl Fn(u64, Request) -> Vec<(Vec<u8>, Vec<OwnedFd>)> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = vec![0; MAX_FRAME];
            loop {
                let r = recv_frame(fd.as_fd(), &mut buf, 0).unwrap();
                if r.eof {
                    return;
                }
                let f = decode_request(&buf[..r.len]).unwrap();
                for (bytes, fds) in answer(f.id, f.request) {
                    let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    send_frame(fd.as_fd(), &bytes, &b).unwrap();
                }
            }
        })
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    #[test]
    fn typed_calls_and_refusals() {
        let (a, b) = seqpacket_pair().unwrap();
        let t = fake_broker(b, |id, req| match req {
            Request::Ping {} => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
            Request::Secret { name } if name == "k" => {
                let (r, w) = pipe();
                std::io::Write::write_all(&mut File::from(w), b"s3cret").unwrap();
                vec![(
                    encode_reply(id, &Reply::Ok(OkReply::Secret { len: 6 })).unwrap(),
                    vec![r],
                )]
            }
            // wrong fd count
            Request::Secret { .. } => {
                vec![(
                    encode_reply(id, &Reply::Ok(OkReply::Secret { len: 6 })).unwrap(),
                    vec![],
                )]
            }
            Request::Connect { .. } => vec![(
                encode_reply(id, &Reply::err(ErrorCode::Denied, "not in allowlist")).unwrap(),
                vec![],
            )],
            // wrong op in reply
            _ => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
        });
        let mut c = Client::new(a);
        c.ping().unwrap();
        let (fd, len) = c.secret("k").unwrap();
        assert_eq!(len, 6);
        let mut s = String::new();
        File::from(fd).read_to_string(&mut s).unwrap();
        assert_eq!(s, "s3cret");
        assert!(matches!(
            c.secret("other"),
            Err(ClientError::FdCount {
                got: 0,
                expected: 1,
                ..
            })
        ));
        let e = c.connect("x", 1).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Denied));
        assert!(e.to_string().contains("not in allowlist"));
        assert!(matches!(
            c.open("/x", Access::Read),
            Err(ClientError::WrongReply {
                op: "open",
                got: "ping"
            })
        ));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn gateway_calls() {
        use crate::audit::Who;
        use crate::tokens::Scope;
        let token = TokenInfo {
            id: "1f2e3d4c".into(),
            name: "laptop".into(),
            scope: Scope::Operator,
            created: "2026-01-02T03:04:05Z".into(),
        };
        let pending = PendingApproval {
            id: 4,
            who: Who {
                id: 9,
                role: "tool".into(),
                profile: "tool".into(),
            },
            program: "/usr/bin/uname".into(),
            argv: vec!["/usr/bin/uname".into()],
            profile: "tool".into(),
            created: "2026-01-02T03:04:05.000000Z".into(),
            expires_in_ms: 5000,
            why: Some("prints system information".into()),
        };
        let (a, b) = seqpacket_pair().unwrap();
        let (t2, p2) = (token.clone(), pending.clone());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let t = fake_broker(b, move |id, req| {
            seen2.lock().unwrap().push(req.clone());
            let reply = match req {
                Request::Auth { token_sha256 } if token_sha256 == "aa" => {
                    Reply::Ok(OkReply::Auth { token: t2.clone() })
                }
                Request::Auth { .. } => Reply::err(ErrorCode::Denied, "unknown or revoked token"),
                Request::Approvals {} => Reply::Ok(OkReply::Approvals {
                    pending: vec![p2.clone()],
                    omitted: 1,
                }),
                Request::Approve { approval: 4, .. } => Reply::Ok(OkReply::Approve {
                    approval: 4,
                    decision: "allowed once".into(),
                }),
                Request::Approve { .. } => Reply::err(ErrorCode::NotFound, "no such approval"),
                // wrong op in reply
                _ => Reply::Ok(OkReply::Ping {}),
            };
            vec![(encode_reply(id, &reply).unwrap(), vec![])]
        });
        let mut c = Client::new(a);
        assert_eq!(c.auth("aa").unwrap(), token);
        let e = c.auth("bb").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Denied));
        assert_eq!(c.approvals().unwrap(), vec![pending]);
        assert_eq!(
            c.approve(4, "allow-once", Some("1f2e3d4c")).unwrap(),
            "allowed once"
        );
        let e = c.approve(5, "deny", None).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound));
        // A resolution the protocol does not have is refused before anything is sent.
        let before = seen.lock().unwrap().len();
        assert!(matches!(
            c.approve(4, "allow", None),
            Err(ClientError::BadArgument {
                what: "resolution",
                ..
            })
        ));
        assert_eq!(seen.lock().unwrap().len(), before);
        assert_eq!(
            seen.lock().unwrap()[3],
            Request::Approve {
                approval: 4,
                resolution: Resolution::AllowOnce,
                by: Some("1f2e3d4c".into())
            }
        );
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn inbound_calls() {
        use crate::audit::Who;
        let msg = InboundMessage {
            seq: 3,
            channel: "inbox".into(),
            sender: "alice@example.com".into(),
            body: "hello".into(),
            ts: "2026-01-02T03:04:05.000000Z".into(),
            from: Who {
                id: 4,
                role: "channel".into(),
                profile: "adapter".into(),
            },
            id: "seq:3".into(),
            conversation: "alice@example.com".into(),
            reply_to: "alice@example.com".into(),
        };
        let (a, b) = seqpacket_pair().unwrap();
        let m2 = msg.clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let t = fake_broker(b, move |id, req| {
            seen2.lock().unwrap().push(req.clone());
            let reply = match req {
                Request::Deliver { channel, .. } if channel == "inbox" => {
                    Reply::Ok(OkReply::Deliver {
                        seq: 3,
                        status: DeliverStatus::Queued,
                        held: None,
                    })
                }
                Request::Deliver { .. } => Reply::err(ErrorCode::Busy, "the queue is full"),
                Request::Inbound { after: 0, .. } => Reply::Ok(OkReply::Inbound {
                    messages: vec![m2.clone()],
                    next: 3,
                }),
                Request::Inbound { after, .. } if after < 10 => Reply::Ok(OkReply::Inbound {
                    messages: vec![],
                    next: after,
                }),
                // wrong op in reply
                _ => Reply::Ok(OkReply::Deliver {
                    seq: 1,
                    status: DeliverStatus::Queued,
                    held: None,
                }),
            };
            vec![(encode_reply(id, &reply).unwrap(), vec![])]
        });
        let mut c = Client::new(a);
        assert_eq!(c.deliver("inbox", "alice@example.com", "hello").unwrap(), 3);
        let e = c.deliver("full", "bob", "x").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Busy));
        assert_eq!(c.inbound(0, 100).unwrap(), (vec![msg], 3));
        assert_eq!(c.inbound(3, 0).unwrap(), (vec![], 3));
        assert!(matches!(
            c.inbound(10, 0),
            Err(ClientError::WrongReply {
                op: "inbound",
                got: "deliver"
            })
        ));
        assert_eq!(
            seen.lock().unwrap()[..3],
            [
                Request::Deliver {
                    channel: "inbox".into(),
                    sender: "alice@example.com".into(),
                    body: "hello".into(),
                    id: None,
                    conversation: None,
                    reply_to: None,
                },
                Request::Deliver {
                    channel: "full".into(),
                    sender: "bob".into(),
                    body: "x".into(),
                    id: None,
                    conversation: None,
                    reply_to: None,
                },
                Request::Inbound {
                    after: 0,
                    wait_ms: 100
                },
            ]
        );
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn exec_events_are_kept_until_asked() {
        let (a, b) = seqpacket_pair().unwrap();
        let summary = ExitSummary {
            exit: 3,
            code: Some(3),
            signal: None,
            wall_ms: 1,
            cpu_ms: 0,
            peak_mem: 0,
            oom: false,
            timeout: false,
        };
        let s2 = summary.clone();
        let t = fake_broker(b, move |id, req| match req {
            Request::Exec { .. } => {
                let (r1, _w1) = pipe();
                let (r2, _w2) = pipe();
                vec![
                    (
                        encode_reply(id, &Reply::Ok(OkReply::Exec {})).unwrap(),
                        vec![r1, r2],
                    ),
                    (encode_event(id, &Event::Exit(s2.clone())).unwrap(), vec![]),
                ]
            }
            _ => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
        });
        let mut c = Client::new(a);
        let started = c.exec(vec!["true".into()], None).unwrap();
        // The exit event arrives before the ping reply; ping must not lose it.
        c.ping().unwrap();
        assert_eq!(c.wait_exit(started.id).unwrap(), summary);
        assert!(matches!(
            c.wait_exit(started.id),
            Err(ClientError::NoSuchExec(_))
        ));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn closed_broker_is_an_error() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(b);
        let mut c = Client::new(a);
        assert!(matches!(
            c.ping(),
            Err(ClientError::Closed) | Err(ClientError::Socket(_))
        ));
    }

    fn ping_broker() -> (OwnedFd, std::thread::JoinHandle<()>) {
        let (a, b) = seqpacket_pair().unwrap();
        let t = fake_broker(b, |id, _| {
            vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )]
        });
        (a, t)
    }

    #[test]
    fn a_session_reply_with_a_foreign_id_is_accepted() {
        let (shared, b) = seqpacket_pair().unwrap();
        let (session_end, session_broker) = ping_broker();
        let session_end = std::sync::Mutex::new(Some(session_end));
        let t = fake_broker(b, move |id, req| {
            assert_eq!(req, Request::Session {});
            let foreign = id.wrapping_add(1).max(1);
            let (stray, _) = seqpacket_pair().unwrap();
            vec![
                // Other processes' replies: an error, a ping reply, an event, a session reply
                // without its fd. All skipped.
                (
                    encode_reply(foreign, &Reply::err(ErrorCode::Busy, "not yours")).unwrap(),
                    vec![],
                ),
                (
                    encode_reply(1, &Reply::Ok(OkReply::Ping {})).unwrap(),
                    vec![stray],
                ),
                (
                    encode_reply(foreign, &Reply::Ok(OkReply::Session {})).unwrap(),
                    vec![],
                ),
                // A session reply meant for another process, with its fd: as good as ours.
                (
                    encode_reply(foreign, &Reply::Ok(OkReply::Session {})).unwrap(),
                    vec![session_end.lock().unwrap().take().unwrap()],
                ),
            ]
        });
        let mut c = Client::open_session(shared.as_fd()).unwrap();
        // The client talks on the session, not on the shared socket.
        assert_ne!(c.as_raw_fd(), shared.as_raw_fd());
        c.ping().unwrap();
        c.ping().unwrap();
        // The session's fd is close-on-exec; the shared one is untouched (still ours, open).
        let cflags = rustix::io::fcntl_getfd(c.as_fd()).unwrap();
        assert!(cflags.contains(rustix::io::FdFlags::CLOEXEC));
        assert!(rustix::io::fcntl_getfd(&shared).is_ok());
        drop(c);
        session_broker.join().unwrap();
        drop(shared);
        t.join().unwrap();
    }

    #[test]
    fn an_error_reply_to_our_session_request_is_a_refusal() {
        let (shared, b) = seqpacket_pair().unwrap();
        let t = fake_broker(b, |id, _| {
            vec![(
                encode_reply(id, &Reply::err(ErrorCode::Busy, "32 sessions")).unwrap(),
                vec![],
            )]
        });
        let e = Client::open_session(shared.as_fd()).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
        // Our own session reply without its fd is an error, not a wait.
        drop(shared);
        t.join().unwrap();
        let (shared, b) = seqpacket_pair().unwrap();
        let t = fake_broker(b, |id, _| {
            vec![(
                encode_reply(id, &Reply::Ok(OkReply::Session {})).unwrap(),
                vec![],
            )]
        });
        assert!(matches!(
            Client::open_session(shared.as_fd()),
            Err(ClientError::FdCount { op: "session", .. })
        ));
        drop(shared);
        t.join().unwrap();
    }

    #[test]
    fn session_ids_are_random() {
        let ids: std::collections::HashSet<u64> = (0..64).map(|_| random_id()).collect();
        assert_eq!(ids.len(), 64);
        assert!(!ids.contains(&0));
    }

    /// Many processes' worth of clients on one shared socket served by the real server: each
    /// opens a session and talks on it; none sees another's replies.
    #[test]
    fn concurrent_clients_on_one_shared_socket() {
        use crate::protocol::Request;
        use crate::server::{Handler, Identity, PeerLimits, Response, Role, Server};
        struct Slow;
        impl Handler for Slow {
            fn handle(
                &self,
                who: &Identity,
                req: Request,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>>
            {
                let who = who.to_string();
                Box::pin(async move {
                    match req {
                        // Answered later, so that requests overlap.
                        Request::Send { body, .. } => {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                            Response::ok(OkReply::Send {
                                status: SendStatus::Delivered,
                                dlq_id: Some(format!("{who}:{body}")),
                                outbox_id: None,
                            })
                        }
                        _ => Response::ok(OkReply::Ping {}),
                    }
                })
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (shared, b) = seqpacket_pair().unwrap();
        {
            let _g = rt.enter();
            Server::new(Arc::new(Slow), PeerLimits::default()).serve_peer(
                b,
                Identity {
                    id: 5,
                    role: Role::Gateway,
                    profile: "gw".into(),
                },
            );
        }
        let shared = Arc::new(shared);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut c = Client::open_session(shared.as_fd()).unwrap();
                    for i in 0..50 {
                        let body = format!("{t}-{i}");
                        let (_, dlq) = c.send("c", "r", &body).unwrap();
                        assert_eq!(dlq.unwrap(), format!("gateway#5(gw):{body}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn env_fd_parsing() {
        // Only the parsing (no env mutation in a multi-threaded test run): check_seqpacket.
        let (a, _b) = seqpacket_pair().unwrap();
        assert!(check_seqpacket(a.as_raw_fd()).is_ok());
        let (r, _w) = pipe();
        assert!(matches!(
            check_seqpacket(r.as_raw_fd()),
            Err(ClientError::NotABrokerSocket { .. })
        ));
        assert!(check_seqpacket(-1).is_err());
    }
}
