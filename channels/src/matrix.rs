//! The Matrix adapter: the client-server API of a homeserver, as a bot user.
//!
//! Inbound: long-polls `GET /_matrix/client/v3/sync` with the stored `since` token (and an
//! inline filter: `m.room.message` and `m.room.encrypted` timeline events, nothing else), and
//! delivers the text of every `m.room.message` in a joined room — id = the event id,
//! sender = the full MXID (`@alice:example.org`), conversation = reply_to = the room id
//! (`!abc:example.org`, or `!abc` in room version 12 and later). The cursor (`<state_dir>/matrix.cursor.json`) is the sync's
//! `next_batch`, saved only after every event of the batch was delivered; until then the
//! previous token is kept, so a crash mid-batch syncs the batch again and the broker answers
//! `duplicate` for what it already has. With no saved token (the very first start) the first
//! sync only takes the position: room history from before the bot first synced is not
//! delivered.
//!
//! `m.text` and `m.emote` are delivered as their body; `m.image`, `m.file` and the like as a
//! short note (`[matrix: m.image; only text is delivered] body`); `m.notice` (what bots send),
//! edits (`m.replace`), the bot's own events and end-to-end encrypted events
//! (`m.room.encrypted`: this adapter holds no keys and does not read encrypted rooms) are
//! skipped with a log line.
//!
//! Invites: an invite is accepted (`POST /rooms/{id}/join`) only when the inviter's MXID
//! matches one of the settings' `invites_from` globs; any other invite is left pending and
//! logged.
//!
//! Outbound: `PUT /rooms/{room}/send/m.room.message/{txnId}` with an `m.text` body, split into
//! pieces of at most [`MAX_MESSAGE_UTF16`] UTF-16 units. The transaction id is derived from
//! the outbox message id and the piece's index, so a retry — after a lost answer, a 429 or a
//! crash — reuses it and the homeserver does not post the piece twice. The first piece answers
//! the event `in_reply_to` names when this process received it in that room.
//!
//! A recipient that is a user id rather than a room (the broker's announcements to a channel's
//! `operator`) is written to in a direct room the bot creates for that user (`createRoom` with
//! `is_direct`, the user invited) and remembers in `<state_dir>/matrix.direct.json`, so the
//! operator's announcements never go to a shared room.
//!
//! Errors: `429 M_LIMIT_EXCEEDED` waits `retry_after_ms`; 5xx, network errors and malformed
//! answers are retried with backoff; other 4xx are not. The access token only ever goes into
//! the `Authorization` header; it is never logged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use carapace_broker::sync::lock;
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::adapter::{
    run_inbound, run_outbound, Backoff, Ctx, FailureKind, Outlet, Polled, RunError, ServiceError,
    Source,
};
use crate::broker::{BrokerApi, Inbound, Secret};
use crate::cursor::CursorStore;
use crate::http::{exchange, Request};
use crate::net::ServiceUrl;
use crate::settings::MatrixSettings;
use crate::telegram::split_message;

/// Longest piece sent as one event, in UTF-16 units: even all escaped in JSON it stays under
/// the 64 KiB event limit.
pub const MAX_MESSAGE_UTF16: usize = 8000;
/// Largest API answer read.
const MAX_REPLY: usize = 8 << 20;
/// Time for a send, join or whoami exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time beyond the long poll's own for a sync exchange.
const POLL_GRACE: Duration = Duration::from_secs(15);
/// Timeline events asked for per room and sync.
const TIMELINE_LIMIT: u32 = 100;
/// Received events remembered for threading replies.
const REMEMBERED: usize = 1024;
/// Longest MXID, room id or event id taken (the spec's limit is 255 bytes).
const MAX_ID: usize = 255;
/// Longest wait before the start is tried again.
const MAX_START_BACKOFF: Duration = Duration::from_secs(300);

/// Why the adapter cannot use what it was given.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error(
        "the access token secret is not an access token (expected one line of printable ASCII)"
    )]
    BadToken,
    #[error("homeserver: {0}")]
    Url(#[from] crate::net::NetError),
    #[error("invites_from: {pattern:?}: {source}")]
    Glob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
}

/// The access token. Its `Debug` shows nothing of it; it only goes into a header.
pub struct AccessToken(String);

impl AccessToken {
    /// From the secret's bytes (surrounding whitespace ignored).
    pub fn new(secret: &[u8]) -> Result<AccessToken, MatrixError> {
        let text = std::str::from_utf8(secret)
            .map_err(|_| MatrixError::BadToken)?
            .trim();
        if text.is_empty() || text.len() > 1024 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(MatrixError::BadToken);
        }
        Ok(AccessToken(text.to_string()))
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(..)")
    }
}

/// The `since` token saved after each fully delivered sync batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub since: String,
}

/// A room the bot was invited to, and by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub room_id: String,
    pub inviter: String,
}

/// One timeline event of a sync answer, as the adapter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message to deliver.
    Message(Inbound),
    /// Nothing to deliver, and why.
    Skip(String),
}

/// A decoded sync answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub next_batch: String,
    /// Timeline events of joined rooms, in order (rooms in the answer's order).
    pub items: Vec<Item>,
    pub invites: Vec<Invite>,
}

/// Whether `s` is an identifier of the given sigil (`@` user, `!` room, `$` event): the sigil,
/// then at most [`MAX_ID`] bytes of printable ASCII or other non-control characters, no spaces.
fn is_id(s: &str, sigil: char) -> bool {
    s.len() > 1
        && s.len() <= MAX_ID
        && s.starts_with(sigil)
        && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Whether `s` is a user id (`@localpart:server`).
pub fn is_user_id(s: &str) -> bool {
    is_id(s, '@') && s.contains(':')
}

fn classify(status: u16) -> FailureKind {
    match status {
        429 => FailureKind::Throttled,
        400..=499 => FailureKind::Rejected,
        _ => FailureKind::Unreachable,
    }
}

/// Decode a client-server API answer: the JSON object of a 2xx, else the failure classified
/// (`errcode`, `error` and `retry_after_ms` from a standard error body).
pub fn api_result(status: u16, body: &[u8]) -> Result<Map<String, Value>, ServiceError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let obj = match v {
        Some(Value::Object(o)) => Some(o),
        _ => None,
    };
    if (200..300).contains(&status) {
        return obj.ok_or_else(|| {
            ServiceError::new(
                FailureKind::Unreachable,
                format!("matrix answered {status} with a body that is not a JSON object"),
            )
        });
    }
    let Some(o) = obj else {
        return Err(ServiceError::new(
            classify(status),
            format!("matrix answered {status} with a body that is not a Matrix error"),
        ));
    };
    let errcode = o
        .get("errcode")
        .and_then(Value::as_str)
        .unwrap_or("no errcode");
    let error = o.get("error").and_then(Value::as_str).unwrap_or("");
    let kind = if errcode == "M_LIMIT_EXCEEDED" {
        FailureKind::Throttled
    } else {
        classify(status)
    };
    let mut e = ServiceError::new(
        kind,
        format!(
            "matrix answered {status} {}: {}",
            crate::settings::shown(errcode),
            crate::settings::shown(error)
        ),
    );
    if kind == FailureKind::Throttled {
        e.retry_after = o
            .get("retry_after_ms")
            .and_then(Value::as_u64)
            .map(Duration::from_millis);
    }
    Err(e)
}

/// Decode a `/sync` answer for the bot `me` (the pure parser the fuzz target calls).
pub fn parse_sync(status: u16, body: &[u8], me: &str) -> Result<Batch, ServiceError> {
    let o = api_result(status, body)?;
    let malformed = |why: &str| {
        ServiceError::new(
            FailureKind::Unreachable,
            format!("matrix sync: malformed answer: {why}"),
        )
    };
    let next_batch = o
        .get("next_batch")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 4096 && !t.chars().any(char::is_control))
        .ok_or_else(|| malformed("no next_batch token"))?
        .to_string();
    let rooms = match o.get("rooms") {
        None | Some(Value::Null) => {
            return Ok(Batch {
                next_batch,
                items: vec![],
                invites: vec![],
            })
        }
        Some(Value::Object(r)) => r,
        Some(_) => return Err(malformed("rooms is not an object")),
    };
    let section = |name: &str| match rooms.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(malformed(&format!("rooms.{name} is not an object"))),
    };
    let mut items = Vec::new();
    if let Some(join) = section("join")? {
        for (room_id, room) in join {
            if !is_id(room_id, '!') {
                items.push(Item::Skip(format!(
                    "a room id that is not one: {:?}",
                    crate::settings::shown(room_id)
                )));
                continue;
            }
            let timeline = room.get("timeline");
            if timeline
                .and_then(|t| t.get("limited"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                tracing::info!(room = %room_id, "matrix: a gap in the room's timeline (newly joined, or more events than one sync carries): events before it are not delivered");
            }
            let events = match timeline.and_then(|t| t.get("events")) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(a)) => a,
                Some(_) => return Err(malformed("a timeline's events is not a list")),
            };
            items.extend(events.iter().map(|e| item_of(room_id, e, me)));
        }
    }
    let mut invites = Vec::new();
    if let Some(invite) = section("invite")? {
        for (room_id, room) in invite {
            if !is_id(room_id, '!') {
                continue;
            }
            let inviter = room
                .get("invite_state")
                .and_then(|s| s.get("events"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|e| {
                    e.get("type").and_then(Value::as_str) == Some("m.room.member")
                        && e.get("state_key").and_then(Value::as_str) == Some(me)
                        && e.get("content")
                            .and_then(|c| c.get("membership"))
                            .and_then(Value::as_str)
                            == Some("invite")
                })
                .and_then(|e| e.get("sender"))
                .and_then(Value::as_str)
                .filter(|s| is_user_id(s));
            if let Some(inviter) = inviter {
                invites.push(Invite {
                    room_id: room_id.clone(),
                    inviter: inviter.to_string(),
                });
            }
        }
    }
    Ok(Batch {
        next_batch,
        items,
        invites,
    })
}

/// One timeline event of room `room_id`.
fn item_of(room_id: &str, e: &Value, me: &str) -> Item {
    let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
    let event_id = e
        .get("event_id")
        .and_then(Value::as_str)
        .filter(|i| is_id(i, '$'));
    let sender = e
        .get("sender")
        .and_then(Value::as_str)
        .filter(|s| is_user_id(s));
    let (Some(event_id), Some(sender)) = (event_id, sender) else {
        return Item::Skip("an event without a valid event_id or sender".into());
    };
    if sender == me {
        return Item::Skip("the bot's own event".into());
    }
    match kind {
        "m.room.message" => {}
        "m.room.encrypted" => {
            return Item::Skip("an end-to-end encrypted event: encrypted rooms are not read".into())
        }
        _ => return Item::Skip(format!("not a message ({})", crate::settings::shown(kind))),
    }
    let Some(content) = e.get("content").filter(|c| c.is_object()) else {
        return Item::Skip("a message without content".into());
    };
    if content
        .get("m.relates_to")
        .and_then(|r| r.get("rel_type"))
        .and_then(Value::as_str)
        == Some("m.replace")
    {
        return Item::Skip("an edit of an earlier message".into());
    }
    let msgtype = content.get("msgtype").and_then(Value::as_str);
    let body = content.get("body").and_then(Value::as_str);
    let (Some(msgtype), Some(body)) = (msgtype, body) else {
        return Item::Skip("a message without msgtype or body (redacted?)".into());
    };
    let text = match msgtype {
        "m.text" => body.to_string(),
        "m.emote" => format!("* {sender} {body}"),
        "m.notice" => return Item::Skip("a notice (what bots send)".into()),
        other => format!(
            "[matrix: {}; only text is delivered] {body}",
            crate::settings::shown(other)
        ),
    };
    Item::Message(Inbound {
        id: event_id.to_string(),
        sender: sender.to_string(),
        conversation: room_id.to_string(),
        reply_to: room_id.to_string(),
        text,
    })
}

/// The transaction id of piece `index` of outbox message `outbox_id`: the same for every
/// attempt, so the homeserver posts it once.
pub fn txn_id(outbox_id: &str, index: usize) -> String {
    let digest = Sha256::digest(outbox_id.as_bytes());
    format!("carapace-{}-{index}", hex::encode(&digest[..16]))
}

/// `s` percent-encoded for a URL path segment or query value (all but the unreserved bytes).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sync filter: message events of joined rooms and invites, nothing else.
fn sync_filter() -> String {
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "timeline": {"limit": TIMELINE_LIMIT, "types": ["m.room.message", "m.room.encrypted"]},
            "state": {"lazy_load_members": true, "types": ["m.room.member"]},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
    })
    .to_string()
}

/// The client-server API over broker connections.
#[derive(Debug)]
struct Api<B> {
    broker: Arc<B>,
    base: ServiceUrl,
    token: AccessToken,
}

impl<B: BrokerApi> Api<B> {
    /// One call: `path` below `/_matrix/client/v3`, an optional JSON body.
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        what: &str,
    ) -> Result<(u16, hyper::body::Bytes), ServiceError> {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token.0))];
        let body = match body {
            Some(b) => {
                headers.push(("content-type", "application/json".into()));
                b.to_string().into_bytes()
            }
            None => Vec::new(),
        };
        let req = Request {
            method,
            path: format!("{}/_matrix/client/v3{path}", self.base.path()),
            headers,
            body,
        };
        let resp = exchange(&*self.broker, &self.base, req, timeout, MAX_REPLY)
            .await
            .map_err(|e| {
                ServiceError::new(FailureKind::Unreachable, format!("matrix {what}: {e}"))
            })?;
        Ok((resp.status, resp.body))
    }

    async fn call_json(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Map<String, Value>, ServiceError> {
        let (status, bytes) = self.call(method, path, body, CALL_TIMEOUT, what).await?;
        api_result(status, &bytes).map_err(|mut e| {
            e.message = format!("{what}: {}", e.message);
            e
        })
    }

    /// The bot's own user id (`GET /account/whoami`).
    async fn whoami(&self) -> Result<String, ServiceError> {
        let o = self
            .call_json(hyper::Method::GET, "/account/whoami", None, "whoami")
            .await?;
        o.get("user_id")
            .and_then(Value::as_str)
            .filter(|u| is_user_id(u))
            .map(str::to_string)
            .ok_or_else(|| {
                ServiceError::new(
                    FailureKind::Unreachable,
                    "whoami: the answer has no valid user_id",
                )
            })
    }
}

/// Received events by id (and their room), for threading replies.
#[derive(Debug, Default)]
struct Received {
    order: VecDeque<String>,
    room_of: HashMap<String, String>,
}

impl Received {
    fn remember(&mut self, event_id: &str, room_id: &str) {
        if self
            .room_of
            .insert(event_id.to_string(), room_id.to_string())
            .is_none()
        {
            self.order.push_back(event_id.to_string());
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.room_of.remove(&old);
            }
        }
    }
}

/// The direct rooms the bot made for users, by user id, kept in a file of the state
/// directory (written atomically).
#[derive(Debug)]
pub struct DirectRooms {
    path: std::path::PathBuf,
    rooms: Mutex<HashMap<String, String>>,
}

/// Largest direct-rooms file read.
const MAX_DIRECT_FILE: u64 = 1 << 20;

impl DirectRooms {
    /// The rooms saved in `<state_dir>/matrix.direct.json` (none when it is missing or
    /// unusable: logged).
    pub fn load(state_dir: &std::path::Path) -> DirectRooms {
        let path = state_dir.join("matrix.direct.json");
        let rooms = match carapace_broker::durable::read_capped(&path, MAX_DIRECT_FILE) {
            Ok(bytes) => serde_json::from_slice::<HashMap<String, String>>(&bytes)
                .unwrap_or_else(|e| {
                    tracing::error!(path = %path.display(), error = %e, "matrix: the direct rooms file is unusable: new direct rooms will be made");
                    HashMap::new()
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "matrix: the direct rooms file cannot be read: new direct rooms will be made");
                HashMap::new()
            }
        };
        DirectRooms {
            path,
            rooms: Mutex::new(rooms),
        }
    }

    pub fn get(&self, user: &str) -> Option<String> {
        lock(&self.rooms).get(user).cloned()
    }

    /// Remember `room` for `user`, and save (a failure is logged: the room is kept in memory).
    pub fn set(&self, user: &str, room: &str) {
        let bytes = {
            let mut m = lock(&self.rooms);
            m.insert(user.to_string(), room.to_string());
            serde_json::to_vec(&*m)
        };
        let saved = bytes.map_err(|e| e.to_string()).and_then(|b| {
            carapace_broker::durable::write_atomic(&self.path, &b).map_err(|e| e.to_string())
        });
        if let Err(e) = saved {
            tracing::error!(path = %self.path.display(), error = %e, "matrix: the direct room was not saved");
        }
    }
}

/// The inviters whose invites are accepted.
#[derive(Debug, Clone)]
pub struct InvitePolicy {
    globs: Vec<GlobMatcher>,
}

impl InvitePolicy {
    pub fn new(patterns: &[String]) -> Result<InvitePolicy, MatrixError> {
        let globs = patterns
            .iter()
            .map(|p| {
                Glob::new(p)
                    .map(|g| g.compile_matcher())
                    .map_err(|source| MatrixError::Glob {
                        pattern: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(InvitePolicy { globs })
    }

    pub fn accepts(&self, inviter: &str) -> bool {
        self.globs.iter().any(|g| g.is_match(inviter))
    }
}

/// The `/sync` long poll.
#[derive(Debug)]
pub struct Poller<B> {
    api: Arc<Api<B>>,
    me: String,
    timeout: Duration,
    invites: InvitePolicy,
    received: Arc<Mutex<Received>>,
}

impl<B: BrokerApi> Poller<B> {
    /// Join the rooms of accepted invites. Err: a join that may work when tried again (the
    /// batch is then synced again, invites included).
    async fn answer_invites(&self, invites: &[Invite]) -> Result<(), ServiceError> {
        for inv in invites {
            if !self.invites.accepts(&inv.inviter) {
                tracing::info!(room = %inv.room_id, inviter = %inv.inviter, "matrix: invite left pending (the inviter is not in invites_from)");
                continue;
            }
            let path = format!("/rooms/{}/join", encode(&inv.room_id));
            match self
                .api
                .call_json(hyper::Method::POST, &path, Some(&json!({})), "join")
                .await
            {
                Ok(_) => {
                    tracing::info!(room = %inv.room_id, inviter = %inv.inviter, "matrix: invite accepted")
                }
                Err(e) if e.kind == FailureKind::Rejected => {
                    tracing::warn!(room = %inv.room_id, error = %e.message, "matrix: the join was refused")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<B: BrokerApi> Source for Poller<B> {
    type Cursor = Since;

    async fn poll(&mut self, cursor: Option<&Since>) -> Result<Vec<Polled<Since>>, ServiceError> {
        let mut path = format!("/sync?filter={}", encode(&sync_filter()));
        match cursor {
            Some(c) => {
                path.push_str(&format!(
                    "&since={}&timeout={}",
                    encode(&c.since),
                    self.timeout.as_millis()
                ));
            }
            // The first sync only takes the position (and sees pending invites).
            None => path.push_str("&timeout=0"),
        }
        let (status, body) = self
            .api
            .call(
                hyper::Method::GET,
                &path,
                None,
                self.timeout + POLL_GRACE,
                "sync",
            )
            .await?;
        let batch = parse_sync(status, &body, &self.me).map_err(|mut e| {
            e.message = format!("sync: {}", e.message);
            e
        })?;
        self.answer_invites(&batch.invites).await?;
        let next = Since {
            since: batch.next_batch,
        };
        let Some(current) = cursor else {
            let skipped = batch
                .items
                .iter()
                .filter(|i| matches!(i, Item::Message(_)))
                .count();
            if skipped > 0 {
                tracing::info!(
                    skipped,
                    "matrix: first sync: earlier room history is not delivered"
                );
            }
            return Ok(vec![Polled {
                message: None,
                cursor: next,
            }]);
        };
        let mut out = Vec::with_capacity(batch.items.len() + 1);
        for item in batch.items {
            match item {
                Item::Message(m) => {
                    lock(&self.received).remember(&m.id, &m.conversation);
                    out.push(Polled {
                        message: Some(m),
                        cursor: current.clone(),
                    });
                }
                Item::Skip(why) => tracing::info!(why = %why, "matrix event skipped"),
            }
        }
        // The new token only once everything before it was delivered.
        match out.last_mut() {
            Some(last) => last.cursor = next,
            None => out.push(Polled {
                message: None,
                cursor: next,
            }),
        }
        Ok(out)
    }
}

/// Room message sends.
#[derive(Debug)]
pub struct Sender<B> {
    api: Arc<Api<B>>,
    received: Arc<Mutex<Received>>,
    direct: DirectRooms,
}

impl<B: BrokerApi> Sender<B> {
    /// The room to write to for `recipient`: a room id as it is; a user id's direct room (made
    /// and remembered the first time).
    async fn room_of(&self, recipient: &str) -> Result<String, ServiceError> {
        if is_id(recipient, '!') {
            return Ok(recipient.to_string());
        }
        if !is_user_id(recipient) {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                format!(
                    "the recipient {:?} is neither a Matrix room id (!room) nor a user id (@user:server)",
                    crate::settings::shown(recipient)
                ),
            ));
        }
        if let Some(room) = self.direct.get(recipient) {
            return Ok(room);
        }
        let body =
            json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [recipient]});
        let o = self
            .api
            .call_json(
                hyper::Method::POST,
                "/createRoom",
                Some(&body),
                "createRoom",
            )
            .await?;
        let room = o
            .get("room_id")
            .and_then(Value::as_str)
            .filter(|r| is_id(r, '!'))
            .ok_or_else(|| {
                ServiceError::new(
                    FailureKind::Unreachable,
                    "createRoom: the answer has no valid room_id",
                )
            })?
            .to_string();
        tracing::info!(user = %recipient, room = %room, "matrix: a direct room was made");
        self.direct.set(recipient, &room);
        Ok(room)
    }
}

impl<B: BrokerApi> Outlet for Sender<B> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let room = self.room_of(&msg.recipient).await?;
        let pieces = split_message(&msg.body, MAX_MESSAGE_UTF16);
        if pieces.is_empty() {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the message is empty",
            ));
        }
        let reply_to = msg
            .in_reply_to
            .as_deref()
            .filter(|id| lock(&self.received).room_of.get(*id) == Some(&room));
        let mut service_id = None;
        for (i, piece) in pieces.iter().enumerate() {
            let mut body = json!({"msgtype": "m.text", "body": piece});
            if let (0, Some(id)) = (i, reply_to) {
                body["m.relates_to"] = json!({"m.in_reply_to": {"event_id": id}});
            }
            let path = format!(
                "/rooms/{}/send/m.room.message/{}",
                encode(&room),
                txn_id(&msg.id, i)
            );
            match self
                .api
                .call_json(hyper::Method::PUT, &path, Some(&body), "send")
                .await
            {
                Ok(o) => {
                    if service_id.is_none() {
                        service_id = o
                            .get("event_id")
                            .and_then(Value::as_str)
                            .map(str::to_string);
                    }
                }
                Err(mut e) => {
                    if pieces.len() > 1 {
                        e.message = format!("piece {} of {}: {}", i + 1, pieces.len(), e.message);
                    }
                    return Err(e);
                }
            }
        }
        Ok(service_id)
    }
}

/// Run the Matrix adapter: read the token, learn the bot's user id, then the loops.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: MatrixSettings) -> Result<(), RunError> {
    let base =
        ServiceUrl::parse(&s.homeserver).map_err(|e| ctx.fail("matrix", MatrixError::Url(e)))?;
    let invites = InvitePolicy::new(&s.invites_from).map_err(|e| ctx.fail("matrix", e))?;
    let secret: Secret = ctx.secret(&s.token_secret).await?;
    let token = AccessToken::new(secret.expose()).map_err(|e| ctx.fail("matrix", e))?;
    drop(secret);
    let api = Arc::new(Api {
        broker: ctx.broker.clone(),
        base,
        token,
    });
    let mut backoff = Backoff::new(MAX_START_BACKOFF);
    let me = loop {
        match api.whoami().await {
            Ok(me) => break me,
            Err(e) => {
                let wait = e.retry_after.unwrap_or_else(|| backoff.next_delay());
                tracing::warn!(channel = %ctx.channel, error = %e, retry_in_ms = wait.as_millis() as u64, "matrix: cannot learn the bot's user id");
                ctx.report(false, Some(e.message.clone())).await;
                tokio::time::sleep(wait).await;
            }
        }
    };
    tracing::info!(channel = %ctx.channel, user = %me, "matrix: signed in");
    let received = Arc::new(Mutex::new(Received::default()));
    let mut poller = Poller {
        api: api.clone(),
        me,
        timeout: Duration::from_millis(s.poll_timeout_ms),
        invites,
        received: received.clone(),
    };
    let sender = Sender {
        api,
        received,
        direct: DirectRooms::load(&ctx.state_dir),
    };
    let store = CursorStore::new(&ctx.state_dir, "matrix");
    tokio::join!(
        run_inbound(&ctx, &mut poller, &store),
        run_outbound(&ctx, &sender)
    );
    Ok(())
}

#[cfg(test)]
mod tests;
