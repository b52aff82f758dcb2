//! The broker's wire protocol (spec: `docs/protocol.md`).
//!
//! One frame is one `SOCK_SEQPACKET` datagram holding one JSON object of at most [`MAX_FRAME`]
//! bytes, with at most [`MAX_FDS`] file descriptors attached as `SCM_RIGHTS`.
//!
//! - request: `{"v":1,"id":7,"op":"connect","host":"api.example.com","port":443}`
//! - reply: `{"v":1,"id":7,"ok":true,"op":"connect","peer":"93.184.216.34:443"}` (+ fds) or
//!   `{"v":1,"id":7,"ok":false,"error":{"code":"denied","message":"..."}}`
//! - event (after a reply, same id): `{"v":1,"id":9,"event":"exit","exit":0,...}`
//!
//! Requests are decoded strictly (unknown fields, wrong version, id 0 are errors); the pure
//! functions [`decode_request`] and [`decode_server_frame`] never panic on any input (fuzzed by
//! `fuzz/fuzz_targets/frame.rs`). Requests carry no identity: the broker knows the sender by the
//! socket the frame came on (a `session` reply hands out another socket with the same identity).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::approvals::Resolution;
use crate::audit::Who;
use crate::tokens::TokenInfo;

/// Protocol version carried in every frame as `"v"`.
pub const VERSION: u64 = 1;
/// Hard cap on one frame's JSON bytes (a longer datagram is truncated by the kernel and the
/// peer that sent it is dropped).
pub const MAX_FRAME: usize = 64 * 1024;
/// Most file descriptors one frame carries (exec's reply carries 2).
pub const MAX_FDS: usize = 4;
/// Room for this many fds is reserved when receiving, so that a peer sending a few too many
/// still gets them all closed by us rather than relying on `MSG_CTRUNC` behaviour.
const RECV_FD_ROOM: usize = 16;
/// Environment variable naming the child's broker socket fd.
pub const BROKER_FD_ENV: &str = "CARAPACE_BROKER_FD";
/// Documented fd of the child's broker socket.
pub const DEFAULT_BROKER_FD: RawFd = 3;
/// Longest error message put on the wire (longer ones are cut on a char boundary).
pub const MAX_MESSAGE: usize = 512;
/// Longest `by` of an `approve` request, in characters.
pub const MAX_APPROVE_BY: usize = 128;
/// Longest `sender` of a `deliver` request, in bytes.
pub const MAX_SENDER: usize = 256;
/// Longest an `inbound` request waits for a message (a longer `wait_ms` is cut to this).
pub const MAX_INBOUND_WAIT_MS: u64 = 30_000;
/// Longest message id (`deliver`'s `id`), conversation, reply address, `in_reply_to` and
/// idempotency `key`, in bytes.
pub const MAX_MESSAGE_ID: usize = 256;
/// How long an `outbox` message handed to an adapter stays leased to it: not acknowledged by
/// then, it is due again.
pub const OUTBOX_LEASE_MS: u64 = 60_000;

/// Access asked for by `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Open an existing file read-only.
    Read,
    /// Open an existing file write-only (no truncation, no creation).
    Write,
    /// Create a new file (fails if it exists), opened write-only.
    Create,
    /// Open a directory to read its entries (needs `read`); the path may be the rule's
    /// directory itself.
    List,
}

impl Access {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Create => "create",
            Access::List => "list",
        }
    }
}

/// A request from a child. Serialized with the tag `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// No-op round trip.
    Ping {},
    /// A TCP connection to `host:port` (a DNS name or an IP literal).
    Connect { host: String, port: u16 },
    /// A file outside the child's view, by absolute path; with `workspace`, `path` is
    /// relative to that granted workspace (`[workspaces.NAME]`).
    Open {
        path: String,
        access: Access,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace: Option<String>,
    },
    /// A credential by name, as a sealed memfd.
    Secret { name: String },
    /// An outbound message on a channel. `in_reply_to` names the inbound message id this
    /// answers (adapters thread by it); `key` is an idempotency key (1..=[`MAX_MESSAGE_ID`]
    /// bytes): a second send with the same key on the same channel is not sent again.
    Send {
        channel: String,
        recipient: String,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// Run a tool in a new confined child; `argv[0]` names the program. `workspace` names a
    /// workspace the operator granted (`[workspaces.NAME]`); otherwise `owner` (gateways only:
    /// who the tool runs for, e.g. `token:<id>`) selects that owner's own tools workspace, and
    /// without either the tool gets the shared one. `cwd` is relative to the workspace.
    Exec {
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace: Option<String>,
    },
    /// A new socket to the broker with the same identity (a private channel for one process
    /// of a sandbox whose processes share the inherited socket). Answered by the server itself,
    /// never by a [`crate::server::Handler`]; not audited (it is no action).
    Session {},
    /// Check a client token by the SHA-256 of its text (64 lowercase hex) against the token
    /// store (profiles with `auth = true`: gateways).
    Auth { token_sha256: String },
    /// The approvals waiting for an operator (profiles with `approve = true`).
    Approvals {},
    /// Answer pending approval `approval` (profiles with `approve = true`). `by` says who at
    /// the child answered (e.g. a token id): recorded as the child's claim, at most
    /// [`MAX_APPROVE_BY`] characters.
    Approve {
        approval: u64,
        resolution: Resolution,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// An inbound message a channel adapter received from its service, for the gateway
    /// (profiles whose `deliver` lists `channel`). `sender` is who wrote it on the service
    /// (1..=[`MAX_SENDER`] bytes, no control characters); `body` at most the channel's
    /// `max_bytes`. `id` is the service's id of the message, unique per channel (deliver is
    /// idempotent on (channel, id)); `conversation` defaults to the sender, `reply_to` to the
    /// conversation; each follows the rules of `sender`. On the wire `id` is `"message_id"`
    /// (the frame's own `"id"` is the request id).
    Deliver {
        channel: String,
        sender: String,
        body: String,
        #[serde(
            default,
            rename = "message_id",
            skip_serializing_if = "Option::is_none"
        )]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
    /// The delivered messages with `seq > after`, oldest first (profiles with `inbound =
    /// true`); reading acknowledges (removes) every message with `seq <= after`. When there is
    /// none, waits up to `wait_ms` (at most [`MAX_INBOUND_WAIT_MS`]) for one.
    Inbound { after: u64, wait_ms: u64 },
    /// The due outbound messages of adapter channel `channel` not leased already (profiles
    /// whose `deliver` lists the channel: its adapter). Each one handed out is leased for
    /// [`OUTBOX_LEASE_MS`]. With nothing due, waits up to `wait_ms` (at most
    /// [`MAX_INBOUND_WAIT_MS`]).
    Outbox { channel: String, wait_ms: u64 },
    /// The adapter's report on outbound message `id` of `channel` (on the wire
    /// `"outbox_id"`: the frame's own `"id"` is the request id).
    OutboxAck {
        channel: String,
        #[serde(rename = "outbox_id")]
        id: String,
        outcome: SendOutcome,
    },
    /// The adapter says whether it reaches its service (same permission as `outbox`).
    ChannelState {
        channel: String,
        connected: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The held inbound messages (profiles with `approve = true`).
    Held {},
    /// Queue held message `id` for the agent now; `always`: its sender is admitted for good
    /// on that channel (profiles with `approve = true`). On the wire `id` is `"held"`.
    Admit {
        #[serde(rename = "held")]
        id: String,
        always: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Drop held message `id` (profiles with `approve = true`). On the wire `id` is `"held"`.
    DropHeld {
        #[serde(rename = "held")]
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// The dead letters, oldest first (profiles with `approve = true`).
    DeadLetters {},
    /// Release dead letter `id`: delivered as it stands, the channel's redaction still applied
    /// (profiles with `approve = true`). On the wire `id` is `"letter"`.
    DlqRelease {
        #[serde(rename = "letter")]
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Drop dead letter `id` (profiles with `approve = true`). On the wire `id` is `"letter"`.
    DlqDrop {
        #[serde(rename = "letter")]
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Audit records, newest first, that match every filter given (profiles with
    /// `approve = true`). Read-only.
    AuditQuery {
        /// Only this op (`exec`, `connect`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_op: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decision: Option<crate::audit::AuditDecision>,
        /// Only records at or after this time (RFC 3339 UTC, compared as the log writes it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
        /// Only records with a sequence number below this one (paging back).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_seq: Option<u64>,
        /// At most this many (1..=[`MAX_AUDIT_QUERY`]).
        limit: u32,
    },
    /// Every channel of the policy in force, with its figures (profiles with
    /// `approve = true`).
    Channels {},
    /// The service's children (gateway, channel adapters) and their state (profiles with
    /// `approve = true`); empty when the broker runs without a service.
    Children {},
    /// Where `text` holds a known secret value (in any encoding the broker recognises) or a
    /// match of the profile's `redact` patterns (profiles with `auth = true`: gateways, for the
    /// answers they hand out). At most [`MAX_REDACT_TEXT`] bytes.
    Redact { text: String },
}

/// One child of the service as `children` shows it (what `carapace status` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSummary {
    pub name: String,
    /// `gateway` | `channel`.
    pub role: String,
    pub profile: String,
    /// `starting` | `running` | `backoff` | `failed` | `stopping` | `stopped`.
    pub state: String,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    /// How it last ended, e.g. `exit=1` or `signal=9 (oom)`.
    #[serde(default)]
    pub last_exit: Option<String>,
}

/// Most records one `audit_query` asks for (fewer come back when they do not fit in a frame).
pub const MAX_AUDIT_QUERY: u32 = 500;

/// One dead letter (`dead_letters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterInfo {
    /// What `dlq_release` / `dlq_drop` name it by.
    pub id: String,
    pub channel: String,
    pub recipient: String,
    /// The text that was refused; untrusted.
    pub body: String,
    /// Why it was refused.
    pub reason: String,
    /// Who sent it.
    pub who: crate::audit::Who,
    /// RFC 3339 UTC.
    pub ts: String,
}

/// Longest `text` of a `redact` request.
pub const MAX_REDACT_TEXT: usize = 16 * 1024;

/// An adapter's report on one outbound message (`outbox_ack`). Tag `"result"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum SendOutcome {
    /// The service took it; `service_id` is its id there, when it gives one.
    Sent {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_id: Option<String>,
    },
    /// The service did not take it. `retry`: worth trying again (network error, 429, 5xx).
    Failed { error: String, retry: bool },
}

/// Every op name, in wire spelling.
pub const OPS: &[&str] = &[
    "ping",
    "connect",
    "open",
    "secret",
    "send",
    "exec",
    "session",
    "auth",
    "approvals",
    "approve",
    "deliver",
    "inbound",
    "outbox",
    "outbox_ack",
    "channel_state",
    "held",
    "admit",
    "drop_held",
    "dead_letters",
    "dlq_release",
    "dlq_drop",
    "audit_query",
    "channels",
    "children",
    "redact",
];

impl Request {
    /// Wire name of the op.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping {} => "ping",
            Request::Connect { .. } => "connect",
            Request::Open { .. } => "open",
            Request::Secret { .. } => "secret",
            Request::Send { .. } => "send",
            Request::Exec { .. } => "exec",
            Request::Session {} => "session",
            Request::Auth { .. } => "auth",
            Request::Approvals {} => "approvals",
            Request::Approve { .. } => "approve",
            Request::Deliver { .. } => "deliver",
            Request::Inbound { .. } => "inbound",
            Request::Outbox { .. } => "outbox",
            Request::OutboxAck { .. } => "outbox_ack",
            Request::ChannelState { .. } => "channel_state",
            Request::Held {} => "held",
            Request::Admit { .. } => "admit",
            Request::DropHeld { .. } => "drop_held",
            Request::DeadLetters {} => "dead_letters",
            Request::DlqRelease { .. } => "dlq_release",
            Request::DlqDrop { .. } => "dlq_drop",
            Request::AuditQuery { .. } => "audit_query",
            Request::Channels {} => "channels",
            Request::Children {} => "children",
            Request::Redact { .. } => "redact",
        }
    }
}

/// What became of a `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Handed to the channel (possibly with redactions).
    Delivered,
    /// Blocked by a filter or the recipient allowlist; kept in the dead-letter queue.
    DeadLettered,
    /// Adapter channel: written to the channel's durable outbox (its adapter sends it).
    Queued,
    /// A send with this idempotency key was already taken on this channel; nothing was done.
    Duplicate,
}

/// What became of a `deliver`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverStatus {
    /// Queued for the gateway.
    #[default]
    Queued,
    /// From a sender the channel does not admit: held for the operator.
    Held,
    /// A message with this id was already taken on this channel; nothing was done.
    Duplicate,
    /// The channel's operator answered an approval or a held message with it: taken by the
    /// broker, never queued for the agent.
    Answered,
}

/// How the broker took an adapter's `outbox_ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Sent: the message left the outbox.
    Done,
    /// Failed, will be due again after `retry_in_ms`.
    Retrying,
    /// Failed for good (no retry, or attempts exhausted): in the dead-letter queue.
    DeadLettered,
}

/// One message of the `outbox` reply: what an adapter must send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// The outbox id (what `outbox_ack` names).
    pub id: String,
    pub recipient: String,
    pub body: String,
    /// The inbound message id this answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    /// 1 for the first try, one more for each retry.
    pub attempt: u32,
    /// Answer buttons the service may show with the message (the broker's announcements to
    /// the channel's operator); pressing one answers with its `data`, as if it was written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<Button>,
}

/// An answer button of an outbound message (e.g. a Telegram inline keyboard button).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Button {
    /// What the button shows.
    pub label: String,
    /// What pressing it answers (at most 64 bytes: Telegram's limit on `callback_data`).
    pub data: String,
}

/// One held inbound message (`held`): from a sender the channel does not admit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    /// What `admit` / `drop_held` name it by.
    pub id: String,
    pub channel: String,
    pub sender: String,
    pub conversation: String,
    /// The text, redacted of known secret values; untrusted.
    pub body: String,
    /// When the broker held it, RFC 3339 UTC.
    pub ts: String,
}

/// One entry of the `approvals` reply: an `ask` waiting for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    /// What `approve` names it by.
    pub id: u64,
    /// The identity that asked.
    pub who: Who,
    /// Canonical path of the program.
    pub program: String,
    /// Full canonical argv (`argv[0]` is the program).
    pub argv: Vec<String>,
    /// Profile the tool would run under.
    pub profile: String,
    /// When it was asked, RFC 3339 UTC.
    pub created: String,
    /// Time left before it times out (denied).
    pub expires_in_ms: u64,
    /// The `why` of the rule that asks, when the broker still knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// One message of the `inbound` reply: what a channel adapter delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// Its place in the broker's queue: 1 for the first message the broker ever queued, one
    /// more for each after it.
    pub seq: u64,
    /// The channel it came in on (a `[channels.NAME]` of the policy).
    pub channel: String,
    /// Who wrote it, as the adapter says (e.g. a chat user).
    pub sender: String,
    /// The text, untrusted.
    pub body: String,
    /// When the broker queued it, RFC 3339 UTC.
    pub ts: String,
    /// The adapter that delivered it: the identity bound to its socket.
    pub from: Who,
    /// The service's id of the message (`deliver`'s `id`), or `seq:<seq>` when none was given.
    #[serde(default)]
    pub id: String,
    /// The conversation it belongs to (default: the sender).
    #[serde(default)]
    pub conversation: String,
    /// Where a reply goes (default: the conversation).
    #[serde(default)]
    pub reply_to: String,
}

/// The op-specific part of a successful reply. Serialized with the tag `"op"` (echoing the
/// request's op). The fds attached to the frame are given by [`OkReply::fd_count`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OkReply {
    /// `ping`: no fds.
    Ping {},
    /// `connect`: 1 fd, the connected TCP socket. `peer` is the address actually connected.
    Connect { peer: String },
    /// `open`: 1 fd, the opened file.
    Open { access: Access },
    /// `secret`: 1 fd, a sealed memfd holding `len` bytes.
    Secret { len: u64 },
    /// `send`: no fds.
    Send {
        status: SendStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dlq_id: Option<String>,
        /// `queued`: the message's id in the channel's outbox.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outbox_id: Option<String>,
    },
    /// `exec`: 2 fds, the read ends of the tool's stdout and stderr pipes; an `exit` event with
    /// the same id follows when the tool ends.
    Exec {},
    /// `session`: 1 fd, a new `SOCK_SEQPACKET` socket served with the same identity.
    Session {},
    /// `auth`: no fds. The token the hash belongs to (never the hash).
    Auth { token: TokenInfo },
    /// `approvals`: no fds. Oldest first. `omitted` counts pending approvals left out so that
    /// the frame stays under [`MAX_FRAME`] (0, and absent, normally).
    Approvals {
        pending: Vec<PendingApproval>,
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted: u64,
    },
    /// `approve`: no fds. `decision` is how the approval ended (`allowed once`, `allowed
    /// always`, `denied`: [`crate::approvals::Decision::as_str`]).
    Approve { approval: u64, decision: String },
    /// `deliver`: no fds. `seq`: the message's sequence number in the inbound queue (0 unless
    /// queued); `held`: the held id when held.
    Deliver {
        seq: u64,
        #[serde(default)]
        status: DeliverStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<String>,
    },
    /// `inbound`: no fds. Messages with `seq > after`, oldest first, as many as fit in one
    /// frame; `next` is the seq of the last one (`after` when there is none): the `after` of
    /// the next read, which acknowledges them.
    Inbound {
        messages: Vec<InboundMessage>,
        next: u64,
    },
    /// `outbox`: no fds. The due messages, each now leased to the caller.
    Outbox { messages: Vec<OutboundMessage> },
    /// `outbox_ack`: no fds.
    OutboxAck {
        status: AckStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dlq_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
    },
    /// `channel_state`: no fds.
    ChannelState {},
    /// `held`: no fds. Oldest first; `omitted` counts those left out to fit one frame.
    Held {
        held: Vec<HeldMessage>,
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted: u64,
    },
    /// `admit`: no fds. The seq the message got in the inbound queue.
    Admit { seq: u64 },
    /// `drop_held`: no fds.
    DropHeld {},
    /// `dead_letters`: no fds. Oldest first; `omitted` counts those left out to fit one frame,
    /// `unreadable` the entries that could not be read (left in place, logged).
    DeadLetters {
        letters: Vec<DeadLetterInfo>,
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        unreadable: u64,
    },
    /// `dlq_release`: no fds.
    DlqRelease {},
    /// `dlq_drop`: no fds.
    DlqDrop {},
    /// `audit_query`: no fds. Newest first; `more`: older matching records exist beyond the
    /// limit or the frame (ask again with `before_seq` = the last seq).
    AuditQuery {
        records: Vec<crate::audit::StoredRecord>,
        #[serde(default)]
        more: bool,
    },
    /// `channels`: no fds.
    Channels {
        channels: Vec<crate::ops::ChannelStats>,
    },
    /// `children`: no fds.
    Children { children: Vec<ChildSummary> },
    /// `redact`: no fds. The byte ranges `[start, end)` of `text` to redact, in order and not
    /// overlapping (empty: nothing to hide).
    Redact { ranges: Vec<(usize, usize)> },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl OkReply {
    /// Number of fds attached to this reply's frame.
    pub fn fd_count(&self) -> usize {
        match self {
            OkReply::Ping {}
            | OkReply::Send { .. }
            | OkReply::Auth { .. }
            | OkReply::Approvals { .. }
            | OkReply::Approve { .. }
            | OkReply::Deliver { .. }
            | OkReply::Inbound { .. }
            | OkReply::Outbox { .. }
            | OkReply::OutboxAck { .. }
            | OkReply::ChannelState {}
            | OkReply::Held { .. }
            | OkReply::Admit { .. }
            | OkReply::DropHeld {}
            | OkReply::DeadLetters { .. }
            | OkReply::DlqRelease {}
            | OkReply::DlqDrop {}
            | OkReply::AuditQuery { .. }
            | OkReply::Channels { .. }
            | OkReply::Children { .. }
            | OkReply::Redact { .. } => 0,
            OkReply::Connect { .. }
            | OkReply::Open { .. }
            | OkReply::Secret { .. }
            | OkReply::Session {} => 1,
            OkReply::Exec {} => 2,
        }
    }

    /// Wire name of the op this answers.
    pub fn op(&self) -> &'static str {
        match self {
            OkReply::Ping {} => "ping",
            OkReply::Connect { .. } => "connect",
            OkReply::Open { .. } => "open",
            OkReply::Secret { .. } => "secret",
            OkReply::Send { .. } => "send",
            OkReply::Exec {} => "exec",
            OkReply::Session {} => "session",
            OkReply::Auth { .. } => "auth",
            OkReply::Approvals { .. } => "approvals",
            OkReply::Approve { .. } => "approve",
            OkReply::Deliver { .. } => "deliver",
            OkReply::Inbound { .. } => "inbound",
            OkReply::Outbox { .. } => "outbox",
            OkReply::OutboxAck { .. } => "outbox_ack",
            OkReply::ChannelState {} => "channel_state",
            OkReply::Held { .. } => "held",
            OkReply::Admit { .. } => "admit",
            OkReply::DropHeld {} => "drop_held",
            OkReply::DeadLetters { .. } => "dead_letters",
            OkReply::DlqRelease {} => "dlq_release",
            OkReply::DlqDrop {} => "dlq_drop",
            OkReply::AuditQuery { .. } => "audit_query",
            OkReply::Channels { .. } => "channels",
            OkReply::Children { .. } => "children",
            OkReply::Redact { .. } => "redact",
        }
    }
}

/// Error codes of failed replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a valid request (JSON, fields, types, fds attached).
    BadRequest,
    /// `"v"` names a protocol version this broker does not speak.
    UnsupportedVersion,
    /// Frame or a value in it is over a limit.
    TooLarge,
    /// `"op"` names no operation.
    UnknownOp,
    /// The policy refuses it (or an operator denied the approval).
    Denied,
    /// The thing asked for does not exist (file, secret, channel).
    NotFound,
    /// The target is unreachable or the service is not configured / not available now.
    Unavailable,
    /// The broker failed (its own fault, not the request's).
    Internal,
    /// Over the identity's request or channel rate.
    RateLimited,
    /// The request waits for an operator's approval that was not given in time.
    Pending,
    /// Too many requests in flight for this identity, too many sessions, or (`deliver`) the
    /// inbound queue is full: try again later.
    Busy,
    /// A code this client does not know (newer broker).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Denied => "denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Pending => "pending",
            ErrorCode::Busy => "busy",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `"error"` object of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(OkReply),
    Err(ErrorBody),
}

impl Reply {
    /// An error reply; the message is cut to [`MAX_MESSAGE`] bytes.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
        let mut message = message.into();
        truncate_message(&mut message);
        Reply::Err(ErrorBody { code, message })
    }

    /// Number of fds attached to this reply's frame.
    pub fn fd_count(&self) -> usize {
        match self {
            Reply::Ok(ok) => ok.fd_count(),
            Reply::Err(_) => 0,
        }
    }
}

/// Cut `s` to at most [`MAX_MESSAGE`] bytes on a char boundary.
pub fn truncate_message(s: &mut String) {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// How a tool run by `exec` ended (mirrors `carapace exec`'s report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSummary {
    /// Shell-style exit code: the program's code, 128+N for signal N, 124 timed out,
    /// 125 denied, 126 could not start.
    pub exit: i32,
    /// Exit status when it exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed.
    pub signal: Option<i32>,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_mem: u64,
    pub oom: bool,
    pub timeout: bool,
}

/// A frame sent after the reply to a request, carrying the same id. Tag `"event"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The tool started by `exec` ended.
    Exit(ExitSummary),
}

/// A decoded request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    /// Request id chosen by the client (non-zero).
    pub id: u64,
    pub request: Request,
}

/// A decoded frame from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Reply { id: u64, reply: Reply },
    Event { id: u64, event: Event },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is over the {MAX_FRAME}-byte cap")]
    TooLarge { len: usize },
    #[error("frame is not a JSON object with unique keys: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("missing or non-integer \"v\"")]
    BadVersionField,
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u64),
    #[error("missing, zero or non-u64 \"id\"")]
    BadId,
    #[error("missing or non-string \"op\"")]
    MissingOp { id: u64 },
    #[error("unknown op {op:?}")]
    UnknownOp { id: u64, op: String },
    #[error("invalid {op} request: {source}")]
    BadFields {
        id: u64,
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid reply frame: {0}")]
    BadReply(String),
}

impl DecodeError {
    /// The request id, when it could be read (error replies carry it; else id 0).
    pub fn id(&self) -> Option<u64> {
        match self {
            DecodeError::MissingOp { id }
            | DecodeError::UnknownOp { id, .. }
            | DecodeError::BadFields { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The error code an error reply to this frame carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownOp { .. } => ErrorCode::UnknownOp,
            _ => ErrorCode::BadRequest,
        }
    }

    /// The error reply to send for this frame: (id, reply); id 0 when unknown.
    pub fn to_reply(&self) -> (u64, Reply) {
        (
            self.id().unwrap_or(0),
            Reply::err(self.code(), self.to_string()),
        )
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoded frame is {len} bytes, over the {MAX_FRAME}-byte cap")]
    TooLarge { len: usize },
    #[error("request id 0 is reserved")]
    ZeroId,
    #[error("JSON serialization failed: {0}")]
    Json(#[source] serde_json::Error),
}

#[derive(Serialize)]
struct RequestOut<'a> {
    v: u64,
    id: u64,
    #[serde(flatten)]
    request: &'a Request,
}

#[derive(Serialize)]
struct OkOut<'a> {
    v: u64,
    id: u64,
    ok: bool,
    #[serde(flatten)]
    reply: &'a OkReply,
}

#[derive(Serialize)]
struct ErrOut<'a> {
    v: u64,
    id: u64,
    ok: bool,
    error: &'a ErrorBody,
}

#[derive(Serialize)]
struct EventOut<'a> {
    v: u64,
    id: u64,
    #[serde(flatten)]
    event: &'a Event,
}

fn capped(bytes: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
    if bytes.len() > MAX_FRAME {
        Err(EncodeError::TooLarge { len: bytes.len() })
    } else {
        Ok(bytes)
    }
}

/// Encode a request frame. `id` must be non-zero.
pub fn encode_request(id: u64, request: &Request) -> Result<Vec<u8>, EncodeError> {
    if id == 0 {
        return Err(EncodeError::ZeroId);
    }
    let out = RequestOut {
        v: VERSION,
        id,
        request,
    };
    capped(serde_json::to_vec(&out).map_err(EncodeError::Json)?)
}

/// Encode a reply frame (id 0 only for replies to frames whose id could not be read).
pub fn encode_reply(id: u64, reply: &Reply) -> Result<Vec<u8>, EncodeError> {
    let bytes = match reply {
        Reply::Ok(reply) => serde_json::to_vec(&OkOut {
            v: VERSION,
            id,
            ok: true,
            reply,
        }),
        Reply::Err(error) => serde_json::to_vec(&ErrOut {
            v: VERSION,
            id,
            ok: false,
            error,
        }),
    }
    .map_err(EncodeError::Json)?;
    capped(bytes)
}

/// Encode an event frame.
pub fn encode_event(id: u64, event: &Event) -> Result<Vec<u8>, EncodeError> {
    let out = EventOut {
        v: VERSION,
        id,
        event,
    };
    capped(serde_json::to_vec(&out).map_err(EncodeError::Json)?)
}

/// A JSON object whose keys are unique (serde_json's `Map` keeps the last of duplicates, which
/// would let `{"op":"ping","op":"exec"}` mean something else to another reader).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.contains_key(&key) {
                        let mut k = key;
                        truncate_to(&mut k, 64);
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key {k:?}"
                        )));
                    }
                    map.insert(key, value);
                }
                Ok(UniqueObject(map))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Parse the common envelope: object with unique keys, `v` == 1, and take `v` out of the map.
fn envelope(bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    if bytes.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let UniqueObject(mut map) = serde_json::from_slice(bytes).map_err(DecodeError::NotJson)?;
    let v = map
        .remove("v")
        .and_then(|v| v.as_u64())
        .ok_or(DecodeError::BadVersionField)?;
    if v != VERSION {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    Ok(map)
}

fn take_id(map: &mut Map<String, Value>) -> Option<u64> {
    map.remove("id").and_then(|v| v.as_u64())
}

/// Decode one request frame (strict: unknown fields, duplicate-free JSON object, `v` 1,
/// non-zero u64 id, known op). Never panics.
pub fn decode_request(bytes: &[u8]) -> Result<RequestFrame, DecodeError> {
    let mut map = envelope(bytes)?;
    let id = take_id(&mut map)
        .filter(|&id| id != 0)
        .ok_or(DecodeError::BadId)?;
    let op_name = match map.get("op") {
        Some(Value::String(s)) => s,
        _ => return Err(DecodeError::MissingOp { id }),
    };
    let Some(op) = OPS.iter().copied().find(|o| *o == op_name) else {
        let mut op = op_name.clone();
        truncate_to(&mut op, 64);
        return Err(DecodeError::UnknownOp { id, op });
    };
    let request = Request::deserialize(Value::Object(map))
        .map_err(|source| DecodeError::BadFields { id, op, source })?;
    Ok(RequestFrame { id, request })
}

fn truncate_to(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Decode one frame from the broker (a reply or an event). Lenient about unknown fields (a
/// newer broker may add some). Never panics.
pub fn decode_server_frame(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let mut map = envelope(bytes)?;
    let id = take_id(&mut map).ok_or(DecodeError::BadId)?;
    if map.contains_key("event") {
        let event = Event::deserialize(Value::Object(map))
            .map_err(|e| DecodeError::BadReply(format!("bad event: {e}")))?;
        return Ok(ServerFrame::Event { id, event });
    }
    let ok = match map.remove("ok") {
        Some(Value::Bool(b)) => b,
        _ => return Err(DecodeError::BadReply("missing \"ok\" or \"event\"".into())),
    };
    let reply = if ok {
        Reply::Ok(
            OkReply::deserialize(Value::Object(map))
                .map_err(|e| DecodeError::BadReply(format!("bad ok reply: {e}")))?,
        )
    } else {
        let error = map
            .remove("error")
            .ok_or_else(|| DecodeError::BadReply("error reply without \"error\"".into()))?;
        Reply::Err(
            ErrorBody::deserialize(error)
                .map_err(|e| DecodeError::BadReply(format!("bad error object: {e}")))?,
        )
    };
    Ok(ServerFrame::Reply { id, reply })
}

/// Fuzz entry point (`fuzz/fuzz_targets/frame.rs`, corpus replayed by `cargo test`): decode
/// `data` as a request and as a broker frame; whatever decodes must re-encode and decode back to
/// the same value, and error replies must fit the cap. Never panics except on a broken invariant.
pub fn fuzz_frame(data: &[u8]) {
    match decode_request(data) {
        Ok(frame) => {
            // Output is never longer than a valid input (compact, same escapes or fewer), but
            // do not rely on it: only a successful re-encoding must round-trip.
            if let Ok(bytes) = encode_request(frame.id, &frame.request) {
                match decode_request(&bytes) {
                    Ok(again) => assert_eq!(again, frame, "request round trip"),
                    Err(e) => panic!("re-encoded request does not decode: {e}"),
                }
            }
        }
        Err(e) => {
            let (id, reply) = e.to_reply();
            let bytes = match encode_reply(id, &reply) {
                Ok(b) => b,
                Err(err) => panic!("error reply does not encode: {err}"),
            };
            assert!(bytes.len() <= MAX_FRAME);
            match decode_server_frame(&bytes) {
                Ok(ServerFrame::Reply { id: rid, reply: r }) => {
                    assert_eq!((rid, r), (id, reply), "error reply round trip")
                }
                other => panic!("error reply decodes as {other:?}"),
            }
        }
    }
    if let Ok(frame) = decode_server_frame(data) {
        let bytes = match &frame {
            ServerFrame::Reply { id, reply } => encode_reply(*id, reply),
            ServerFrame::Event { id, event } => encode_event(*id, event),
        };
        if let Ok(bytes) = bytes {
            match decode_server_frame(&bytes) {
                Ok(again) => assert_eq!(again, frame, "server frame round trip"),
                Err(e) => panic!("re-encoded server frame does not decode: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SCM_RIGHTS over SOCK_SEQPACKET
// ---------------------------------------------------------------------------------------------

/// A received datagram.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the frame put in the buffer (0 with `eof`).
    pub len: usize,
    /// Fds that came with it, already `O_CLOEXEC`. At most [`MAX_FDS`]; any surplus was closed.
    pub fds: Vec<OwnedFd>,
    /// The datagram was longer than the buffer (`MSG_TRUNC`): the frame is unusable.
    pub truncated: bool,
    /// More fds were attached than fit (`MSG_CTRUNC`) or than [`MAX_FDS`]: all surplus closed.
    pub fds_truncated: bool,
    /// The peer closed its end (a zero-length read; an empty datagram reads the same and is
    /// treated the same).
    pub eof: bool,
}

/// Error of a socket operation.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{syscall} on broker socket fd {fd}: {source}")]
    Io {
        syscall: &'static str,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach {0} fds to one frame (max {MAX_FDS})")]
    TooManyFds(usize),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte cap")]
    TooLarge(usize),
}

impl SocketError {
    /// Whether this is `EAGAIN`/`EWOULDBLOCK` on a non-blocking socket.
    pub fn is_would_block(&self) -> bool {
        matches!(self, SocketError::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
    }

    /// The underlying io::Error kind (Other for limit errors).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            SocketError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        }
    }
}

// The descriptor plumbing below uses rustix rather than nix (which the rest of the workspace
// uses for signals, users and mounts): nix's `RecvMsg::cmsgs` refuses to walk a control buffer
// the kernel marked MSG_CTRUNC, so descriptors that did arrive could not be taken and would stay
// open in the broker, a leak a confined child could repeat at will; rustix hands every received
// descriptor out as an `OwnedFd` and closes the ones not taken when its buffer is dropped.

/// Send one frame with `fds` attached (`MSG_NOSIGNAL`: a closed peer gives `EPIPE`, not a
/// signal). On a non-blocking socket a full send buffer gives a would-block error (nothing sent).
pub fn send_frame(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), SocketError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    if fds.len() > MAX_FDS {
        return Err(SocketError::TooManyFds(fds.len()));
    }
    if bytes.len() > MAX_FRAME {
        return Err(SocketError::TooLarge(bytes.len()));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        // Cannot happen: the buffer has room for MAX_FDS, checked above.
        return Err(SocketError::TooManyFds(fds.len()));
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            // SEQPACKET sends the whole datagram or nothing.
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(SocketError::Io {
                    syscall: "sendmsg",
                    fd: sock.as_raw_fd(),
                    source: e.into(),
                })
            }
        }
    }
}

/// Receive one frame into `buf` (give it [`MAX_FRAME`] bytes), taking ownership of attached fds
/// (`MSG_CMSG_CLOEXEC`). Fds beyond [`MAX_FDS`] are closed and flagged. Pass `MSG_DONTWAIT` in
/// `flags` for a non-blocking read on a blocking socket.
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> Result<Received, SocketError> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(RECV_FD_ROOM))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::from_bits_retain(flags as u32);
    let got = loop {
        match rustix::net::recvmsg(sock, &mut [io::IoSliceMut::new(buf)], &mut control, flags) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(SocketError::Io {
                    syscall: "recvmsg",
                    fd: sock.as_raw_fd(),
                    source: e.into(),
                })
            }
        }
    };
    let mut fds = Vec::new();
    let mut fds_truncated = got.flags.contains(ReturnFlags::CTRUNC);
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            for fd in received {
                if fds.len() < MAX_FDS {
                    fds.push(fd);
                } else {
                    // Dropped here: closed.
                    fds_truncated = true;
                }
            }
        }
    }
    let n = got.bytes;
    let truncated = got.flags.contains(ReturnFlags::TRUNC);
    Ok(Received {
        len: n.min(buf.len()),
        eof: n == 0 && !truncated,
        fds,
        truncated,
        fds_truncated,
    })
}

/// A connected `SOCK_SEQPACKET` socketpair (both ends `O_CLOEXEC`).
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), SocketError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| SocketError::Io {
        syscall: "socketpair",
        fd: -1,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn req_roundtrip(r: Request) {
        let bytes = encode_request(42, &r).unwrap();
        let f = decode_request(&bytes).unwrap();
        assert_eq!(f.id, 42);
        assert_eq!(f.request, r);
    }

    #[test]
    fn requests_roundtrip() {
        req_roundtrip(Request::Ping {});
        req_roundtrip(Request::Connect {
            host: "api.example.com".into(),
            port: 443,
        });
        for access in [Access::Read, Access::Write, Access::Create] {
            req_roundtrip(Request::Open {
                path: "/srv/data/x".into(),
                access,
                workspace: None,
            });
        }
        req_roundtrip(Request::Secret { name: "k".into() });
        req_roundtrip(Request::Send {
            channel: "log".into(),
            recipient: "#ops".into(),
            body: "héllo \"x\"\n\u{0}".into(),
            in_reply_to: None,
            key: None,
        });
        req_roundtrip(Request::Send {
            channel: "telegram".into(),
            recipient: "123456789".into(),
            body: "hi".into(),
            in_reply_to: Some("update:7".into()),
            key: Some("k-1".into()),
        });
        req_roundtrip(Request::Exec {
            argv: vec!["git".into(), "status".into()],
            cwd: None,
            owner: None,
            workspace: None,
        });
        req_roundtrip(Request::Exec {
            argv: vec![],
            cwd: Some("/work".into()),
            owner: None,
            workspace: None,
        });
        req_roundtrip(Request::Session {});
        assert_eq!(
            encode_request(9, &Request::Session {}).unwrap(),
            br#"{"v":1,"id":9,"op":"session"}"#
        );
        req_roundtrip(Request::Auth {
            token_sha256: "ab".repeat(32),
        });
        req_roundtrip(Request::Approvals {});
        for resolution in [
            Resolution::AllowOnce,
            Resolution::AllowAlways,
            Resolution::Deny,
        ] {
            req_roundtrip(Request::Approve {
                approval: 7,
                resolution,
                by: Some("1f2e3d4c".into()),
            });
            assert_eq!(Resolution::parse(resolution.as_str()), Some(resolution));
        }
        req_roundtrip(Request::Approve {
            approval: u64::MAX,
            resolution: Resolution::Deny,
            by: None,
        });
        assert_eq!(Resolution::parse("allow"), None);
        req_roundtrip(Request::Deliver {
            channel: "inbox".into(),
            sender: "alice@example.com".into(),
            body: "héllo \"x\"\n".into(),
            id: None,
            conversation: None,
            reply_to: None,
        });
        req_roundtrip(Request::Deliver {
            channel: "telegram".into(),
            sender: "123456789".into(),
            body: "hi".into(),
            id: Some("update:7".into()),
            conversation: Some("-100987".into()),
            reply_to: Some("-100987".into()),
        });
        req_roundtrip(Request::Outbox {
            channel: "telegram".into(),
            wait_ms: 25_000,
        });
        for outcome in [
            SendOutcome::Sent { service_id: None },
            SendOutcome::Sent {
                service_id: Some("42".into()),
            },
            SendOutcome::Failed {
                error: "HTTP 502".into(),
                retry: true,
            },
        ] {
            req_roundtrip(Request::OutboxAck {
                channel: "telegram".into(),
                id: "0001-2-3".into(),
                outcome,
            });
        }
        req_roundtrip(Request::ChannelState {
            channel: "telegram".into(),
            connected: false,
            error: Some("HTTP 401".into()),
        });
        req_roundtrip(Request::ChannelState {
            channel: "telegram".into(),
            connected: true,
            error: None,
        });
        req_roundtrip(Request::Held {});
        req_roundtrip(Request::DeadLetters {});
        req_roundtrip(Request::DlqRelease {
            id: "d-1".into(),
            by: Some("token 1".into()),
        });
        req_roundtrip(Request::DlqDrop {
            id: "d-1".into(),
            by: None,
        });
        req_roundtrip(Request::AuditQuery {
            audit_op: Some("exec".into()),
            decision: Some(crate::audit::AuditDecision::Deny),
            since: Some("2026-01-01T00:00:00Z".into()),
            before_seq: Some(9),
            limit: 50,
        });
        req_roundtrip(Request::AuditQuery {
            audit_op: None,
            decision: None,
            since: None,
            before_seq: None,
            limit: 1,
        });
        req_roundtrip(Request::Channels {});
        req_roundtrip(Request::Children {});
        req_roundtrip(Request::Admit {
            id: "h1".into(),
            always: true,
            by: Some("tok".into()),
        });
        req_roundtrip(Request::DropHeld {
            id: "h1".into(),
            by: None,
        });
        req_roundtrip(Request::Redact {
            text: "an answer with sk-x".into(),
        });
        for (after, wait_ms) in [(0, 0), (7, 25_000), (u64::MAX, u64::MAX)] {
            req_roundtrip(Request::Inbound { after, wait_ms });
        }
    }

    /// The corpus seeds of `deliver` and `inbound` decode as they should.
    #[test]
    fn inbound_op_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        for name in [
            "694ce3f33485935fec9dc582fe5f24726a957159", // deliver
            "1272826cd6b9fa7eb7a78e57219feb9a13a52091", // inbound
        ] {
            assert!(decode_request(&read(name)).is_ok(), "{name}");
        }
        assert!(
            matches!(
                decode_request(&read("e5e608a537c250b4154e009dcc0306019ef6b91e")), // no wait_ms
                Err(DecodeError::BadFields { .. })
            ),
            "inbound without wait_ms"
        );
        for name in [
            "2302bb9bbf8e68459a765798ff8c0a3cba43e22c", // deliver reply
            "b347dd8434361a952910f11fc287394c80ca7071", // inbound reply
            "325c5fb7abb2afd07bf8375a4921f6df605aa6e8", // inbound reply, empty
        ] {
            assert!(
                matches!(
                    decode_server_frame(&read(name)),
                    Ok(ServerFrame::Reply {
                        reply: Reply::Ok(_),
                        ..
                    })
                ),
                "{name}"
            );
        }
    }

    /// The corpus seeds of the channel ops decode as they should.
    #[test]
    fn channel_op_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        for name in [
            "61ed70411036bcbbbaf86db0a7e399925a87777e", // deliver with every field
            "5b7b56c8e39fd096edb32dfeb1b24d2ac9277c7e", // send with in_reply_to and key
            "c9b2d2a81c7eddf961d011f9f38066baf957063c", // outbox
            "5a22a3efa1807e5e9a37e0dd9ef18cd7c3b2610e", // outbox_ack failed
            "23a661adbbaa00ba8f70cc1c4312b83bd439898d", // outbox_ack sent
            "1407d225af462d211164fe9ca893090f5c43d6e2", // channel_state
            "061e851e3b832d90175304ca98a1f0c6edfe8ad8", // held
            "232ad95095c8819a4f7fb858e8c5ff12eb88e0e0", // admit
            "c9a184d718b542bd8a8378e2979a9f5d1708e439", // drop_held
        ] {
            assert!(decode_request(&read(name)).is_ok(), "{name}");
        }
        for name in [
            "98b8c48594ebf97339a9534297e220a5052ad61f", // deliver reply, held
            "5409ac5670955fd8fbdc734fa43d6f4deffb5238", // outbox reply
            "9c994da5dd4cf74add44e8f75a109351d3a5f2e2", // outbox_ack reply, retrying
        ] {
            assert!(
                matches!(
                    decode_server_frame(&read(name)),
                    Ok(ServerFrame::Reply {
                        reply: Reply::Ok(_),
                        ..
                    })
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn inbound_ops_wire_shape() {
        let v = |r: &Request| -> Value {
            serde_json::from_slice(&encode_request(3, r).unwrap()).unwrap()
        };
        assert_eq!(
            v(&Request::Deliver {
                channel: "inbox".into(),
                sender: "alice@example.com".into(),
                body: "hello".into(),
                id: None,
                conversation: None,
                reply_to: None,
            }),
            serde_json::json!({"v":1,"id":3,"op":"deliver","channel":"inbox",
                               "sender":"alice@example.com","body":"hello"})
        );
        assert_eq!(
            encode_request(
                4,
                &Request::Inbound {
                    after: 12,
                    wait_ms: 25000
                }
            )
            .unwrap(),
            br#"{"v":1,"id":4,"op":"inbound","after":12,"wait_ms":25000}"#
        );
        let r = OkReply::Deliver {
            seq: 13,
            status: DeliverStatus::Queued,
            held: None,
        };
        assert_eq!(r.fd_count(), 0);
        assert_eq!(
            encode_reply(5, &Reply::Ok(r.clone())).unwrap(),
            br#"{"v":1,"id":5,"ok":true,"op":"deliver","seq":13,"status":"queued"}"#
        );
        server_roundtrip(5, Reply::Ok(r.clone()));
        // A reply of an older broker (no status) reads as queued.
        assert_eq!(
            decode_server_frame(br#"{"v":1,"id":5,"ok":true,"op":"deliver","seq":13}"#).unwrap(),
            ServerFrame::Reply {
                id: 5,
                reply: Reply::Ok(r)
            }
        );
        let m = InboundMessage {
            seq: 13,
            channel: "inbox".into(),
            sender: "alice@example.com".into(),
            body: "hello".into(),
            ts: "2026-01-02T03:04:05.000001Z".into(),
            from: Who {
                id: 4,
                role: "channel".into(),
                profile: "adapter".into(),
            },
            id: "m1".into(),
            conversation: "alice@example.com".into(),
            reply_to: "alice@example.com".into(),
        };
        let r = OkReply::Inbound {
            messages: vec![m],
            next: 13,
        };
        assert_eq!(r.fd_count(), 0);
        assert_eq!(r.op(), "inbound");
        let got: Value =
            serde_json::from_slice(&encode_reply(6, &Reply::Ok(r.clone())).unwrap()).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"v":1,"id":6,"ok":true,"op":"inbound","messages":[{"seq":13,
                "channel":"inbox","sender":"alice@example.com","body":"hello",
                "ts":"2026-01-02T03:04:05.000001Z",
                "from":{"id":4,"role":"channel","profile":"adapter"},"id":"m1",
                "conversation":"alice@example.com","reply_to":"alice@example.com"}],"next":13})
        );
        server_roundtrip(6, Reply::Ok(r));
        let empty = OkReply::Inbound {
            messages: vec![],
            next: 0,
        };
        assert_eq!(
            encode_reply(7, &Reply::Ok(empty)).unwrap(),
            br#"{"v":1,"id":7,"ok":true,"op":"inbound","messages":[],"next":0}"#
        );
    }

    #[test]
    fn channel_ops_wire_shape() {
        let v = |r: &Request| -> Value {
            serde_json::from_slice(&encode_request(3, r).unwrap()).unwrap()
        };
        assert_eq!(
            v(&Request::OutboxAck {
                channel: "telegram".into(),
                id: "o1".into(),
                outcome: SendOutcome::Failed {
                    error: "HTTP 502".into(),
                    retry: true
                },
            }),
            serde_json::json!({"v":1,"id":3,"op":"outbox_ack","channel":"telegram",
                               "outbox_id":"o1",
                               "outcome":{"result":"failed","error":"HTTP 502","retry":true}})
        );
        // The ids of a message travel under their own names: the frame's "id" is the request
        // id, and a second "id" key is refused.
        assert_eq!(
            v(&Request::Deliver {
                channel: "t".into(),
                sender: "s".into(),
                body: "b".into(),
                id: Some("update:7".into()),
                conversation: None,
                reply_to: None,
            })["message_id"],
            "update:7"
        );
        let admit = v(&Request::Admit {
            id: "h1".into(),
            always: false,
            by: None,
        });
        assert_eq!(
            admit,
            serde_json::json!({"v":1,"id":3,"op":"admit","held":"h1","always":false})
        );
        let f = decode_request(
            br#"{"v":1,"id":3,"op":"outbox_ack","channel":"t","id":"o1","outcome":{"result":"sent"}}"#,
        );
        assert!(f.is_err(), "a duplicate top-level id must not decode");
        let f = decode_request(
            br#"{"v":1,"id":3,"op":"outbox_ack","channel":"t","outbox_id":"o1","outcome":{"result":"sent"}}"#,
        )
        .unwrap();
        assert_eq!(
            f.request,
            Request::OutboxAck {
                channel: "t".into(),
                id: "o1".into(),
                outcome: SendOutcome::Sent { service_id: None }
            }
        );
        let replies = [
            OkReply::Deliver {
                seq: 0,
                status: DeliverStatus::Held,
                held: Some("h1".into()),
            },
            OkReply::Deliver {
                seq: 0,
                status: DeliverStatus::Duplicate,
                held: None,
            },
            OkReply::Send {
                status: SendStatus::Duplicate,
                dlq_id: None,
                outbox_id: None,
            },
            OkReply::Outbox {
                messages: vec![OutboundMessage {
                    id: "o1".into(),
                    recipient: "123".into(),
                    body: "hi".into(),
                    in_reply_to: Some("update:7".into()),
                    attempt: 2,
                    buttons: Vec::new(),
                }],
            },
            OkReply::OutboxAck {
                status: AckStatus::Retrying,
                dlq_id: None,
                retry_in_ms: Some(2000),
            },
            OkReply::OutboxAck {
                status: AckStatus::DeadLettered,
                dlq_id: Some("d1".into()),
                retry_in_ms: None,
            },
            OkReply::ChannelState {},
            OkReply::Held {
                held: vec![HeldMessage {
                    id: "h1".into(),
                    channel: "telegram".into(),
                    sender: "999".into(),
                    conversation: "999".into(),
                    body: "hello".into(),
                    ts: "2026-01-02T03:04:05.000001Z".into(),
                }],
                omitted: 2,
            },
            OkReply::Admit { seq: 4 },
            OkReply::DropHeld {},
            OkReply::Redact {
                ranges: vec![(3, 9), (12, 20)],
            },
        ];
        for r in replies {
            assert_eq!(r.fd_count(), 0);
            server_roundtrip(9, Reply::Ok(r));
        }
        assert_eq!(
            encode_reply(9, &Reply::Ok(OkReply::DropHeld {})).unwrap(),
            br#"{"v":1,"id":9,"ok":true,"op":"drop_held"}"#
        );
        assert_eq!(
            encode_reply(
                9,
                &Reply::Ok(OkReply::Redact {
                    ranges: vec![(1, 2)]
                })
            )
            .unwrap(),
            br#"{"v":1,"id":9,"ok":true,"op":"redact","ranges":[[1,2]]}"#
        );
        for op in [
            "outbox",
            "outbox_ack",
            "channel_state",
            "held",
            "admit",
            "drop_held",
        ] {
            assert!(OPS.contains(&op), "{op}");
        }
        for b in [
            &br#"{"v":1,"id":5,"op":"outbox","channel":"t"}"#[..],
            br#"{"v":1,"id":5,"op":"outbox","channel":"t","wait_ms":-1}"#,
            br#"{"v":1,"id":5,"op":"outbox","channel":"t","wait_ms":0,"lease_ms":1}"#,
            br#"{"v":1,"id":5,"op":"outbox_ack","channel":"t","outcome":{"result":"sent"}}"#,
            br#"{"v":1,"id":5,"op":"channel_state","channel":"t"}"#,
            br#"{"v":1,"id":5,"op":"channel_state","channel":"t","connected":"yes"}"#,
            br#"{"v":1,"id":5,"op":"held","channel":"t"}"#,
            br#"{"v":1,"id":5,"op":"admit","held":"h"}"#,
            br#"{"v":1,"id":5,"op":"admit","always":true}"#,
            br#"{"v":1,"id":5,"op":"drop_held"}"#,
            br#"{"v":1,"id":5,"op":"send","channel":"c","recipient":"r","body":"b","key":7}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","sender":"s","body":"b","message_id":7}"#,
            br#"{"v":1,"id":5,"op":"outbox_ack","channel":"t","outbox_id":"o","outcome":{"result":"lost"}}"#,
            br#"{"v":1,"id":5,"op":"outbox_ack","channel":"t","outbox_id":"o","outcome":{"result":"failed","error":"e"}}"#,
        ] {
            let e = bad(b);
            assert!(matches!(e, DecodeError::BadFields { id: 5, .. }), "{e:?}");
        }
    }

    /// The corpus seeds of the gateway ops (fuzz/corpus/frame, named by their SHA-1) decode as
    /// they should, so the fuzzer starts from valid frames of each.
    #[test]
    fn gateway_op_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        for name in [
            "3c209f643711400a1732f431b00b3b1db49933ee", // auth
            "7f52b20f5e3b397549aafac7ca86eb38b80c8c15", // auth, not hex (refused by the op)
            "5f86833cfa5eded6925365c5a4fa08e20e35a24b", // approvals
            "f1b0f5c682714990f4b0bae0b9c227c5b08b4074", // approve with by
            "4f616ea2851c4b9610578d29c3eea1a6e6c57a47", // approve, max id, no by
        ] {
            assert!(decode_request(&read(name)).is_ok(), "{name}");
        }
        for name in [
            "63b76f4ecdb571518c1b5e685f1a6f43e85169f6", // auth with an extra field
            "0139027f531124c1f76b70e294c744e289766b4d", // approve, unknown resolution
        ] {
            assert!(
                matches!(
                    decode_request(&read(name)),
                    Err(DecodeError::BadFields { .. })
                ),
                "{name}"
            );
        }
        for name in [
            "4b3663fade12761746a7651a579b8747626c7c8c", // auth reply
            "882fc6030bde4be0f704bc21af75e490dae791c0", // approvals reply
            "d2cc6a72787c57406ea600a6f1df4e82e55ecbce", // approvals reply, omitted
            "81461e621a750b3aed02317a41031b6266b717cb", // approve reply
        ] {
            assert!(
                matches!(
                    decode_server_frame(&read(name)),
                    Ok(ServerFrame::Reply {
                        reply: Reply::Ok(_),
                        ..
                    })
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn gateway_ops_wire_shape() {
        let v = |r: &Request| -> Value {
            serde_json::from_slice(&encode_request(3, r).unwrap()).unwrap()
        };
        assert_eq!(
            v(&Request::Auth {
                token_sha256: "0f".repeat(32)
            }),
            serde_json::json!({"v":1,"id":3,"op":"auth","token_sha256":"0f".repeat(32)})
        );
        assert_eq!(
            encode_request(3, &Request::Approvals {}).unwrap(),
            br#"{"v":1,"id":3,"op":"approvals"}"#
        );
        assert_eq!(
            v(&Request::Approve {
                approval: 12,
                resolution: Resolution::AllowAlways,
                by: Some("1f2e3d4c".into())
            }),
            serde_json::json!({"v":1,"id":3,"op":"approve","approval":12,
                               "resolution":"allow-always","by":"1f2e3d4c"})
        );
        assert_eq!(
            v(&Request::Approve {
                approval: 12,
                resolution: Resolution::AllowOnce,
                by: None
            }),
            serde_json::json!({"v":1,"id":3,"op":"approve","approval":12,
                               "resolution":"allow-once"})
        );
        // Decoding the documented examples.
        let f = decode_request(
            br#"{"v":1,"id":4,"op":"approve","approval":2,"resolution":"deny","by":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            f.request,
            Request::Approve {
                approval: 2,
                resolution: Resolution::Deny,
                by: Some("x".into())
            }
        );
        // Replies.
        let token = TokenInfo {
            id: "1f2e3d4c".into(),
            name: "laptop".into(),
            scope: crate::tokens::Scope::Operator,
            created: "2026-01-02T03:04:05Z".into(),
        };
        let bytes = encode_reply(5, &Reply::Ok(OkReply::Auth { token })).unwrap();
        let got: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"v":1,"id":5,"ok":true,"op":"auth","token":{"id":"1f2e3d4c",
                "name":"laptop","scope":"operator","created":"2026-01-02T03:04:05Z"}})
        );
        let bytes = encode_reply(
            6,
            &Reply::Ok(OkReply::Approvals {
                pending: vec![],
                omitted: 0,
            }),
        )
        .unwrap();
        assert_eq!(
            bytes,
            br#"{"v":1,"id":6,"ok":true,"op":"approvals","pending":[]}"#
        );
        let bytes = encode_reply(
            7,
            &Reply::Ok(OkReply::Approve {
                approval: 2,
                decision: "allowed once".into(),
            }),
        )
        .unwrap();
        assert_eq!(
            bytes,
            br#"{"v":1,"id":7,"ok":true,"op":"approve","approval":2,"decision":"allowed once"}"#
        );
    }

    #[test]
    fn request_wire_shape() {
        let bytes = encode_request(
            7,
            &Request::Connect {
                host: "h".into(),
                port: 1,
            },
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"id":7,"op":"connect","host":"h","port":1})
        );
        let bytes = encode_request(1, &Request::Ping {}).unwrap();
        assert_eq!(bytes, br#"{"v":1,"id":1,"op":"ping"}"#);
    }

    fn server_roundtrip(id: u64, r: Reply) {
        let bytes = encode_reply(id, &r).unwrap();
        assert_eq!(
            decode_server_frame(&bytes).unwrap(),
            ServerFrame::Reply { id, reply: r }
        );
    }

    #[test]
    fn replies_and_events_roundtrip() {
        server_roundtrip(1, Reply::Ok(OkReply::Ping {}));
        server_roundtrip(
            2,
            Reply::Ok(OkReply::Connect {
                peer: "127.0.0.1:80".into(),
            }),
        );
        server_roundtrip(
            3,
            Reply::Ok(OkReply::Open {
                access: Access::Create,
            }),
        );
        server_roundtrip(4, Reply::Ok(OkReply::Secret { len: 12 }));
        server_roundtrip(
            5,
            Reply::Ok(OkReply::Send {
                status: SendStatus::DeadLettered,
                dlq_id: Some("x".into()),
                outbox_id: None,
            }),
        );
        server_roundtrip(
            5,
            Reply::Ok(OkReply::Send {
                status: SendStatus::Delivered,
                dlq_id: None,
                outbox_id: None,
            }),
        );
        server_roundtrip(
            5,
            Reply::Ok(OkReply::Send {
                status: SendStatus::Queued,
                dlq_id: None,
                outbox_id: Some("0001-2-3".into()),
            }),
        );
        server_roundtrip(6, Reply::Ok(OkReply::Exec {}));
        server_roundtrip(7, Reply::Ok(OkReply::Session {}));
        assert_eq!(Reply::Ok(OkReply::Session {}).fd_count(), 1);
        let auth = OkReply::Auth {
            token: TokenInfo {
                id: "00ff00ff".into(),
                name: "ci \"bot\"".into(),
                scope: crate::tokens::Scope::Client,
                created: "2026-01-02T03:04:05Z".into(),
            },
        };
        assert_eq!(auth.fd_count(), 0);
        server_roundtrip(8, Reply::Ok(auth));
        let pending = PendingApproval {
            id: 3,
            who: Who {
                id: 1,
                role: "gateway".into(),
                profile: "gateway".into(),
            },
            program: "/usr/bin/uname".into(),
            argv: vec!["/usr/bin/uname".into(), "-a".into()],
            profile: "tool".into(),
            created: "2026-01-02T03:04:05.000001Z".into(),
            expires_in_ms: 119_000,
            why: Some("prints system information".into()),
        };
        for omitted in [0, 4] {
            let r = OkReply::Approvals {
                pending: vec![pending.clone()],
                omitted,
            };
            assert_eq!(r.fd_count(), 0);
            server_roundtrip(8, Reply::Ok(r));
        }
        let r = OkReply::Approve {
            approval: 3,
            decision: "denied".into(),
        };
        assert_eq!(r.fd_count(), 0);
        server_roundtrip(8, Reply::Ok(r));
        server_roundtrip(0, Reply::err(ErrorCode::BadRequest, "nope"));
        server_roundtrip(9, Reply::err(ErrorCode::RateLimited, "slow down"));
        let ev = Event::Exit(ExitSummary {
            exit: 137,
            code: None,
            signal: Some(9),
            wall_ms: 5,
            cpu_ms: 1,
            peak_mem: 4096,
            oom: true,
            timeout: false,
        });
        let bytes = encode_event(6, &ev).unwrap();
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""event":"exit""#));
        assert_eq!(
            decode_server_frame(&bytes).unwrap(),
            ServerFrame::Event { id: 6, event: ev }
        );
    }

    #[test]
    fn error_reply_wire_shape_and_unknown_code() {
        let bytes = encode_reply(3, &Reply::err(ErrorCode::Denied, "no")).unwrap();
        assert_eq!(
            bytes,
            br#"{"v":1,"id":3,"ok":false,"error":{"code":"denied","message":"no"}}"#
        );
        let f = decode_server_frame(
            br#"{"v":1,"id":3,"ok":false,"error":{"code":"brand_new","message":"m"}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ServerFrame::Reply {
                id: 3,
                reply: Reply::Err(ErrorBody {
                    code: ErrorCode::Unknown,
                    message: "m".into()
                })
            }
        );
        // Lenient: unknown fields in replies are ignored.
        let f = decode_server_frame(br#"{"v":1,"id":3,"ok":true,"op":"ping","extra":1}"#).unwrap();
        assert_eq!(
            f,
            ServerFrame::Reply {
                id: 3,
                reply: Reply::Ok(OkReply::Ping {})
            }
        );
    }

    #[test]
    fn error_messages_are_capped() {
        let r = Reply::err(ErrorCode::Internal, "é".repeat(1000));
        let Reply::Err(e) = r else { panic!() };
        assert!(e.message.len() <= MAX_MESSAGE);
        assert!(e.message.len() > MAX_MESSAGE - 2);
    }

    fn bad(bytes: &[u8]) -> DecodeError {
        match decode_request(bytes) {
            Ok(f) => panic!("accepted {:?}: {f:?}", String::from_utf8_lossy(bytes)),
            Err(e) => e,
        }
    }

    #[test]
    fn malformed_requests_are_classified() {
        // not JSON / not an object
        assert!(matches!(bad(b""), DecodeError::NotJson(_)));
        assert!(matches!(bad(b"{"), DecodeError::NotJson(_)));
        assert!(matches!(bad(b"\xff\xfe"), DecodeError::NotJson(_)));
        assert!(matches!(
            bad(br#"{"v":1,"id":1,"op":"ping"} x"#),
            DecodeError::NotJson(_)
        ));
        assert!(matches!(bad(b"[1,2]"), DecodeError::NotJson(_)));
        assert!(matches!(bad(b"null"), DecodeError::NotJson(_)));
        // duplicate keys, at the top level, are refused
        for b in [
            &br#"{"v":1,"id":1,"id":2,"op":"ping"}"#[..],
            br#"{"v":1,"id":1,"op":"ping","op":"ping"}"#,
            br#"{"v":1,"v":1,"id":1,"op":"ping"}"#,
        ] {
            assert!(
                matches!(bad(b), DecodeError::NotJson(_)),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // version
        assert!(matches!(
            bad(br#"{"id":1,"op":"ping"}"#),
            DecodeError::BadVersionField
        ));
        assert!(matches!(
            bad(br#"{"v":"1","id":1,"op":"ping"}"#),
            DecodeError::BadVersionField
        ));
        let e = bad(br#"{"v":2,"id":1,"op":"ping"}"#);
        assert!(matches!(e, DecodeError::UnsupportedVersion(2)));
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        // id
        for b in [
            &br#"{"v":1,"op":"ping"}"#[..],
            br#"{"v":1,"id":0,"op":"ping"}"#,
            br#"{"v":1,"id":-1,"op":"ping"}"#,
            br#"{"v":1,"id":1.5,"op":"ping"}"#,
            br#"{"v":1,"id":"1","op":"ping"}"#,
            br#"{"v":1,"id":18446744073709551616,"op":"ping"}"#,
        ] {
            let e = bad(b);
            assert!(matches!(e, DecodeError::BadId), "{e:?}");
            assert_eq!(e.to_reply().0, 0);
        }
        assert!(decode_request(br#"{"v":1,"id":18446744073709551615,"op":"ping"}"#).is_ok());
        // op
        assert!(matches!(
            bad(br#"{"v":1,"id":5}"#),
            DecodeError::MissingOp { id: 5 }
        ));
        assert!(matches!(
            bad(br#"{"v":1,"id":5,"op":3}"#),
            DecodeError::MissingOp { id: 5 }
        ));
        let e = bad(br#"{"v":1,"id":5,"op":"reboot"}"#);
        assert!(matches!(&e, DecodeError::UnknownOp { id: 5, op } if op == "reboot"));
        assert_eq!(e.code(), ErrorCode::UnknownOp);
        assert_eq!(e.to_reply().0, 5);
        let long = format!(r#"{{"v":1,"id":5,"op":"{}"}}"#, "x".repeat(10_000));
        assert!(
            matches!(bad(long.as_bytes()), DecodeError::UnknownOp { op, .. } if op.len() == 64)
        );
        // fields: unknown, missing, wrong type, out of range
        for b in [
            &br#"{"v":1,"id":5,"op":"ping","x":1}"#[..],
            br#"{"v":1,"id":5,"op":"connect","host":"h"}"#,
            br#"{"v":1,"id":5,"op":"connect","host":"h","port":65536}"#,
            br#"{"v":1,"id":5,"op":"connect","host":"h","port":-1}"#,
            br#"{"v":1,"id":5,"op":"connect","host":1,"port":1}"#,
            br#"{"v":1,"id":5,"op":"connect","host":"h","port":1,"identity":"gateway"}"#,
            br#"{"v":1,"id":5,"op":"open","path":"/x","access":"execute"}"#,
            br#"{"v":1,"id":5,"op":"open","path":"/x"}"#,
            br#"{"v":1,"id":5,"op":"secret"}"#,
            br#"{"v":1,"id":5,"op":"send","channel":"c","recipient":"r"}"#,
            br#"{"v":1,"id":5,"op":"exec","argv":"ls"}"#,
            br#"{"v":1,"id":5,"op":"exec","argv":["ls",1]}"#,
            br#"{"v":1,"id":5,"op":"exec","argv":["ls"],"env":{}}"#,
            br#"{"v":1,"id":5,"op":"session","identity":"gateway"}"#,
            br#"{"v":1,"id":5,"op":"session","profile":"other"}"#,
            br#"{"v":1,"id":5,"op":"auth"}"#,
            br#"{"v":1,"id":5,"op":"auth","token_sha256":1}"#,
            br#"{"v":1,"id":5,"op":"auth","token":"cpt_x"}"#,
            br#"{"v":1,"id":5,"op":"auth","token_sha256":"ab","scope":"operator"}"#,
            br#"{"v":1,"id":5,"op":"approvals","all":true}"#,
            br#"{"v":1,"id":5,"op":"approve","resolution":"deny"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":1}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":-1,"resolution":"deny"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":"1","resolution":"deny"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":1,"resolution":"allow"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":1,"resolution":"allow_once"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":1,"resolution":"deny","by":7}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":1,"resolution":"deny","who":"x"}"#,
            br#"{"v":1,"id":5,"op":"approve","approval":18446744073709551616,"resolution":"deny"}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","sender":"s"}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","body":"b"}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","sender":7,"body":"b"}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","sender":"s","body":"b","recipient":"r"}"#,
            br#"{"v":1,"id":5,"op":"deliver","channel":"c","sender":"s","body":"b","from":{"id":1}}"#,
            br#"{"v":1,"id":5,"op":"inbound"}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":0}"#,
            br#"{"v":1,"id":5,"op":"inbound","wait_ms":0}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":-1,"wait_ms":0}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":"0","wait_ms":0}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":0,"wait_ms":1.5}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":18446744073709551616,"wait_ms":0}"#,
            br#"{"v":1,"id":5,"op":"inbound","after":0,"wait_ms":0,"channel":"c"}"#,
        ] {
            let e = bad(b);
            assert!(matches!(e, DecodeError::BadFields { id: 5, .. }), "{e:?}");
            assert_eq!(e.code(), ErrorCode::BadRequest);
        }
        // too large
        let big = vec![b' '; MAX_FRAME + 1];
        assert!(matches!(bad(&big), DecodeError::TooLarge { .. }));
        // deep nesting is an error, not a stack overflow
        let deep = format!(
            r#"{{"v":1,"id":5,"op":"ping","x":{}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(matches!(bad(deep.as_bytes()), DecodeError::NotJson(_)));
    }

    #[test]
    fn encode_refuses_zero_id_and_oversize() {
        assert!(matches!(
            encode_request(0, &Request::Ping {}),
            Err(EncodeError::ZeroId)
        ));
        let r = Request::Send {
            channel: "c".into(),
            recipient: "r".into(),
            body: "x".repeat(MAX_FRAME),
            in_reply_to: None,
            key: None,
        };
        assert!(matches!(
            encode_request(1, &r),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_server_frames() {
        for b in [
            &b"{}"[..],
            br#"{"v":1}"#,
            br#"{"v":1,"id":1}"#,
            br#"{"v":1,"id":1,"ok":"yes"}"#,
            br#"{"v":1,"id":1,"ok":true}"#,
            br#"{"v":1,"id":1,"ok":true,"op":"nope"}"#,
            br#"{"v":1,"id":1,"ok":false}"#,
            br#"{"v":1,"id":1,"ok":false,"error":"x"}"#,
            br#"{"v":1,"id":1,"event":"boom"}"#,
            br#"{"v":1,"id":1,"event":"exit"}"#,
            br#"{"v":9,"id":1,"ok":true,"op":"ping"}"#,
        ] {
            assert!(
                decode_server_frame(b).is_err(),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn fds_pass_and_surplus_is_closed() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send_frame(a.as_fd(), b"hello", &[x.as_fd(), y.as_fd()]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let r = recv_frame(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 2);
        assert!(!r.truncated && !r.fds_truncated && !r.eof);
        // received fds are CLOEXEC
        for fd in &r.fds {
            // SAFETY: fd is a valid open fd we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0);
        }
        // more than MAX_FDS cannot be sent with send_frame
        let many: Vec<BorrowedFd<'_>> = (0..5).map(|_| x.as_fd()).collect();
        assert!(matches!(
            send_frame(a.as_fd(), b"x", &many),
            Err(SocketError::TooManyFds(5))
        ));
    }

    /// sendmsg with any number of fds (send_frame refuses more than MAX_FDS).
    fn send_raw_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        // SAFETY: the test keeps every fd in `fds` open for the duration of this call.
        let fds: Vec<BorrowedFd<'_>> = fds
            .iter()
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
            .collect();
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            sock,
            &[io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .expect("sendmsg");
    }

    /// No copy of the pipe's write end is open any more: the read end reads EOF (not EAGAIN).
    fn write_end_closed_everywhere(r: &OwnedFd) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: fcntl and a non-blocking read into a live 1-byte buffer, on an fd we own.
        unsafe {
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 0
        }
    }

    #[test]
    fn surplus_fds_are_closed() {
        for count in [5usize, 6, 20, 40] {
            let (a, b) = seqpacket_pair().unwrap();
            let (r, w) = nix::unistd::pipe().unwrap();
            send_raw_fds(a.as_fd(), b"x", &vec![w.as_raw_fd(); count]);
            drop(w);
            // Our write end is gone; copies are in flight in the socket.
            assert!(
                !write_end_closed_everywhere(&r),
                "{count}: copies should be in flight"
            );
            let mut buf = vec![0u8; MAX_FRAME];
            let got = recv_frame(b.as_fd(), &mut buf, 0).unwrap();
            assert_eq!(got.fds.len(), MAX_FDS, "{count}");
            assert!(got.fds_truncated, "{count}");
            drop(got);
            assert!(
                write_end_closed_everywhere(&r),
                "{count}: a surplus fd leaked"
            );
        }
    }

    #[test]
    fn recv_detects_truncation_and_eof() {
        let (a, b) = seqpacket_pair().unwrap();
        send_frame(a.as_fd(), &[b'x'; 100], &[]).unwrap();
        let mut small = [0u8; 10];
        let r = recv_frame(b.as_fd(), &mut small, 0).unwrap();
        assert!(r.truncated);
        assert!(!r.eof);
        let mut buf = vec![0u8; MAX_FRAME];
        assert!(recv_frame(b.as_fd(), &mut buf, libc::MSG_DONTWAIT)
            .unwrap_err()
            .is_would_block());
        drop(a);
        assert!(recv_frame(b.as_fd(), &mut buf, 0).unwrap().eof);
    }
}
