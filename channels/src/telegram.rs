//! The Telegram Bot API adapter.
//!
//! Inbound: long-polls `getUpdates` (`allowed_updates: ["message", "callback_query"]`), delivers
//! private and group messages — sender = `from.id`, conversation = reply_to = `chat.id`
//! (decimal), id = `update:<update_id>` — and only after the broker answered saves the offset
//! (`update_id + 1`) in `<state_dir>/telegram.cursor.json`. A press of an inline keyboard button
//! (`callback_query`) is delivered as its `data`, with sender = the presser's `from.id` (the
//! only identity that counts: the broker compares it with the channel's operator) and
//! conversation = the chat of the message the button was on; the press is acknowledged with
//! `answerCallbackQuery` so the client stops waiting. A text message is delivered as its text; a photo,
//! document, voice note and the like as a short note (`[telegram: photo; only text is
//! delivered]` and its caption); service messages (members joining, pins, ...) and updates
//! without a sender are skipped with a log line.
//!
//! Outbound: `sendMessage` (chat_id = the recipient, numeric when it is a number), split into
//! pieces of at most 4096 UTF-16 units at line or word boundaries where possible; the first
//! piece answers the Telegram message `in_reply_to` names when this process received it, and
//! the last carries the message's answer buttons as an inline keyboard (`reply_markup`). A
//! message whose first pieces went out and a later one failed resumes at the failed piece.
//! `ok: false` with `error_code` 429 (and `parameters.retry_after`), 5xx and network errors are
//! retried; other 4xx are not.
//!
//! The bot token is part of every request path (`/bot<TOKEN>/METHOD`). It lives in a
//! [`BotToken`] whose `Debug` shows nothing, and every message that leaves this module goes
//! through [`BotToken::scrub`] first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::protocol::{DeliverStatus, OutboundMessage};
use carapace_broker::sync::lock;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapter::{
    run_inbound, run_outbound, Ctx, FailureKind, Outlet, Polled, RunError, ServiceError, Source,
};
use crate::broker::{BrokerApi, Inbound, Secret};
use crate::cursor::CursorStore;
use crate::http::{exchange, Request};
use crate::net::ServiceUrl;
use crate::settings::TelegramSettings;

/// Longest message Telegram takes, in UTF-16 code units.
pub const MAX_MESSAGE_UTF16: usize = 4096;
/// Largest API answer read.
const MAX_REPLY: usize = 4 << 20;
/// Time for a `sendMessage` exchange.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Time beyond the long poll's own for a `getUpdates` exchange.
const POLL_GRACE: Duration = Duration::from_secs(15);
/// Updates asked for at once.
const POLL_LIMIT: u32 = 100;
/// Received messages remembered for threading replies.
const REMEMBERED: usize = 1024;

/// Why the adapter cannot use what it was given.
#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    #[error(
        "the bot token secret is not a bot token (expected DIGITS:LETTERS, as BotFather gives it)"
    )]
    BadToken,
    #[error("api_base: {0}")]
    Url(#[from] crate::net::NetError),
}

/// The bot token. Its `Debug` shows nothing of it; it only ever goes into a request path.
pub struct BotToken(String);

impl BotToken {
    /// From the secret's bytes (surrounding whitespace ignored).
    pub fn new(secret: &[u8]) -> Result<BotToken, TelegramError> {
        let text = std::str::from_utf8(secret)
            .map_err(|_| TelegramError::BadToken)?
            .trim();
        let (id, key) = text.split_once(':').ok_or(TelegramError::BadToken)?;
        let ok = !id.is_empty()
            && id.len() <= 20
            && id.bytes().all(|b| b.is_ascii_digit())
            && (8..=128).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(TelegramError::BadToken);
        }
        Ok(BotToken(text.to_string()))
    }

    /// `text` with the token (and its secret half) replaced by `<token>`.
    pub fn scrub(&self, text: &str) -> String {
        let key = self.0.split_once(':').map_or(self.0.as_str(), |(_, k)| k);
        text.replace(&self.0, "<token>").replace(key, "<token>")
    }

    fn path(&self, base: &ServiceUrl, method: &str) -> String {
        format!("{}/bot{}/{method}", base.path(), self.0)
    }
}

impl std::fmt::Debug for BotToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BotToken(..)")
    }
}

/// One update of a `getUpdates` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub update_id: i64,
    pub item: Item,
}

/// What an update holds for the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message to deliver, with its Telegram chat and message ids.
    Message {
        inbound: Inbound,
        chat_id: i64,
        message_id: i64,
    },
    /// A press of an inline keyboard button: its `data` to deliver as the presser's answer,
    /// the id `answerCallbackQuery` acknowledges, and the (chat id, message id) of the message
    /// whose keyboard was pressed (none for an inline-mode message).
    Callback {
        inbound: Inbound,
        callback_id: String,
        pressed: Option<(i64, i64)>,
    },
    /// Nothing to deliver, and why.
    Skip(String),
}

/// Kinds of non-text content that are delivered as a note.
const CONTENT: &[&str] = &[
    "photo",
    "video",
    "animation",
    "document",
    "audio",
    "voice",
    "video_note",
    "sticker",
    "contact",
    "location",
    "venue",
    "poll",
    "dice",
    "story",
];

/// Decode a Bot API answer: its `result` when `ok` is true, else the failure, classified.
/// `status` is the HTTP status it came with.
pub fn api_result(status: u16, body: &[u8]) -> Result<Value, ServiceError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let ok = v
        .as_ref()
        .and_then(|v| v.get("ok"))
        .and_then(Value::as_bool);
    match (ok, &v) {
        (Some(true), Some(v)) if (200..300).contains(&status) => {
            v.get("result").cloned().ok_or_else(|| {
                ServiceError::new(
                    FailureKind::Unreachable,
                    "telegram answered ok without a result",
                )
            })
        }
        (Some(_), Some(v)) => {
            let code = v
                .get("error_code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(status);
            let description = v
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("no description");
            let retry_after = v
                .get("parameters")
                .and_then(|p| p.get("retry_after"))
                .and_then(Value::as_u64)
                .map(Duration::from_secs);
            let mut e = ServiceError::new(
                classify(code),
                format!(
                    "telegram answered {code}: {}",
                    crate::settings::shown(description)
                ),
            );
            if code == 429 {
                e.retry_after = retry_after;
            }
            Err(e)
        }
        _ => {
            let kind = if (200..300).contains(&status) {
                // A 2xx that is not a Bot API answer: a broken proxy or server; try again.
                FailureKind::Unreachable
            } else {
                classify(status)
            };
            Err(ServiceError::new(
                kind,
                format!("telegram answered {status} with a body that is not a Bot API answer"),
            ))
        }
    }
}

fn classify(code: u16) -> FailureKind {
    match code {
        429 => FailureKind::Throttled,
        400..=499 => FailureKind::Rejected,
        _ => FailureKind::Unreachable,
    }
}

/// Decode a `getUpdates` answer into updates (the pure parser the fuzz target calls).
pub fn parse_updates(status: u16, body: &[u8]) -> Result<Vec<Update>, ServiceError> {
    updates_of(&api_result(status, body)?)
}

/// The updates of a `getUpdates` result.
fn updates_of(result: &Value) -> Result<Vec<Update>, ServiceError> {
    let malformed = |why: &str| {
        ServiceError::new(
            FailureKind::Unreachable,
            format!("telegram getUpdates: malformed answer: {why}"),
        )
    };
    let items = result
        .as_array()
        .ok_or_else(|| malformed("result is not a list"))?;
    items
        .iter()
        .map(|u| {
            let update_id = u
                .get("update_id")
                .and_then(Value::as_i64)
                .filter(|id| *id >= 0)
                .ok_or_else(|| malformed("an update without a valid update_id"))?;
            Ok(Update {
                update_id,
                item: item_of(update_id, u),
            })
        })
        .collect()
}

/// Longest `callback_data` Telegram carries (bytes).
pub const MAX_CALLBACK_DATA: usize = 64;

fn callback_of(update_id: i64, q: &Value) -> Item {
    let id = q
        .get("id")
        .and_then(Value::as_str)
        .filter(|i| !i.is_empty());
    let from_id = q
        .get("from")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_i64);
    let (Some(id), Some(from_id)) = (id, from_id) else {
        return Item::Skip("a button press without id or from.id".into());
    };
    let Some(data) = q
        .get("data")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty() && d.len() <= MAX_CALLBACK_DATA)
    else {
        return Item::Skip("a button press without data (or a game button)".into());
    };
    // The chat the pressed message is in; an inline-mode message has none: the presser's own.
    let message = q.get("message");
    let chat_id = message
        .and_then(|m| m.get("chat"))
        .and_then(|c| c.get("id"))
        .and_then(Value::as_i64)
        .unwrap_or(from_id);
    let pressed = message.and_then(|m| {
        let chat = m.get("chat")?.get("id")?.as_i64()?;
        Some((chat, m.get("message_id")?.as_i64()?))
    });
    Item::Callback {
        inbound: Inbound {
            id: format!("update:{update_id}"),
            sender: from_id.to_string(),
            conversation: chat_id.to_string(),
            reply_to: chat_id.to_string(),
            text: data.to_string(),
        },
        callback_id: id.to_string(),
        pressed,
    }
}

fn item_of(update_id: i64, u: &Value) -> Item {
    if let Some(q) = u.get("callback_query").filter(|q| q.is_object()) {
        return callback_of(update_id, q);
    }
    let Some(m) = u.get("message").filter(|m| m.is_object()) else {
        return Item::Skip("not a new message".into());
    };
    let chat_id = m
        .get("chat")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_i64);
    let from_id = m
        .get("from")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_i64);
    let message_id = m.get("message_id").and_then(Value::as_i64);
    let (Some(chat_id), Some(from_id), Some(message_id)) = (chat_id, from_id, message_id) else {
        return Item::Skip("a message without chat.id, from.id or message_id".into());
    };
    let text = if let Some(t) = m.get("text").and_then(Value::as_str) {
        t.to_string()
    } else if let Some(kind) = CONTENT.iter().find(|k| m.get(**k).is_some()) {
        match m.get("caption").and_then(Value::as_str) {
            Some(c) => format!("[telegram: {kind}; only text is delivered] {c}"),
            None => format!("[telegram: {kind}; only text is delivered]"),
        }
    } else {
        return Item::Skip("a service message (no text or content)".into());
    };
    Item::Message {
        inbound: Inbound {
            id: format!("update:{update_id}"),
            sender: from_id.to_string(),
            conversation: chat_id.to_string(),
            reply_to: chat_id.to_string(),
            text,
        },
        chat_id,
        message_id,
    }
}

/// Split `text` into pieces of at most `max` UTF-16 units (at least 2), at the last line break
/// in the second half of the window, else the last whitespace there, else anywhere (never
/// inside a character). Whitespace at the cuts is dropped; empty pieces are not returned.
pub fn split_message(text: &str, max: usize) -> Vec<String> {
    let max = max.max(2);
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let mut units = 0;
        let mut limit = rest.len();
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > max {
                limit = i;
                break;
            }
            units += c.len_utf16();
        }
        if limit == rest.len() {
            let piece = rest.trim();
            if !piece.is_empty() {
                out.push(piece.to_string());
            }
            return out;
        }
        let window = &rest[..limit];
        let half = limit / 2;
        let cut = window
            .rfind('\n')
            .filter(|i| *i >= half)
            .or_else(|| {
                window
                    .char_indices()
                    .rev()
                    .find(|(i, c)| *i >= half && c.is_whitespace())
                    .map(|(i, _)| i)
            })
            .filter(|i| *i > 0)
            .unwrap_or(limit);
        let piece = rest[..cut].trim();
        if !piece.is_empty() {
            out.push(piece.to_string());
        }
        rest = &rest[cut..];
    }
}

/// The Bot API over broker connections.
#[derive(Debug)]
struct Api<B> {
    broker: Arc<B>,
    base: ServiceUrl,
    token: BotToken,
}

impl<B: BrokerApi> Api<B> {
    /// Call `method` with a JSON body; its `result`. Errors are scrubbed of the token.
    async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ServiceError> {
        let req = Request::post_json(
            self.token.path(&self.base, method),
            body.to_string().into_bytes(),
        );
        let resp = exchange(&*self.broker, &self.base, req, timeout, MAX_REPLY)
            .await
            .map_err(|e| {
                ServiceError::new(
                    FailureKind::Unreachable,
                    self.token.scrub(&format!("telegram {method}: {e}")),
                )
            })?;
        api_result(resp.status, &resp.body).map_err(|mut e| {
            e.message = self.token.scrub(&format!("{method}: {}", e.message));
            e
        })
    }
}

/// Received messages by their deliver id, for threading replies.
#[derive(Debug, Default)]
struct Received {
    order: VecDeque<String>,
    by_id: HashMap<String, (i64, i64)>,
}

impl Received {
    fn remember(&mut self, id: &str, chat_id: i64, message_id: i64) {
        if self
            .by_id
            .insert(id.to_string(), (chat_id, message_id))
            .is_none()
        {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// The offset saved after each delivered update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offset {
    /// The `offset` of the next `getUpdates`: the last update's id + 1.
    pub offset: i64,
    /// When that update arrived (seconds since the epoch).
    #[serde(default)]
    pub at: u64,
}

/// An offset this old is not sent. After a week without updates Telegram picks the next
/// update id at random, possibly below the offset, and an offset above an update's id
/// confirms (drops) it. Without an offset Telegram answers what is unconfirmed; the broker
/// drops what it already has.
const STALE_OFFSET: Duration = Duration::from_secs(6 * 24 * 3600);

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `getUpdates` long poll.
#[derive(Debug)]
pub struct Poller<B> {
    api: Arc<Api<B>>,
    timeout: Duration,
    received: Arc<Mutex<Received>>,
    /// Where each button press of the batch being delivered was made (update id -> chat id,
    /// message id), until the broker has said how it took it.
    pressed: HashMap<String, (i64, i64)>,
}

impl<B: BrokerApi> Source for Poller<B> {
    type Cursor = Offset;

    async fn poll(&mut self, cursor: Option<&Offset>) -> Result<Vec<Polled<Offset>>, ServiceError> {
        let mut body = json!({
            "timeout": self.timeout.as_secs(),
            "allowed_updates": ["message", "callback_query"],
            "limit": POLL_LIMIT,
        });
        let now = now_secs();
        let fresh = cursor.filter(|c| now.saturating_sub(c.at) < STALE_OFFSET.as_secs());
        match (cursor, fresh) {
            (_, Some(c)) => body["offset"] = json!(c.offset),
            (Some(c), None) => tracing::info!(
                offset = c.offset,
                "no update for 6 days: asking without the offset (Telegram may have restarted its update ids)"
            ),
            (None, None) => {}
        }
        let result = self
            .api
            .call("getUpdates", &body, self.timeout + POLL_GRACE)
            .await?;
        let updates = updates_of(&result)?;
        let mut next = fresh.map_or(0, |c| c.offset);
        let mut out = Vec::with_capacity(updates.len());
        for u in updates {
            next = next.max(u.update_id.saturating_add(1));
            let message = match u.item {
                Item::Message {
                    inbound,
                    chat_id,
                    message_id,
                } => {
                    lock(&self.received).remember(&inbound.id, chat_id, message_id);
                    Some(inbound)
                }
                Item::Callback {
                    inbound,
                    callback_id,
                    pressed,
                } => {
                    if let Some(at) = pressed {
                        self.pressed.insert(inbound.id.clone(), at);
                    }
                    // Acknowledged at once, whatever the broker makes of it: the client stops
                    // showing the press as pending. Best effort: a press answered late or twice
                    // (after a restart) is refused by Telegram, and nothing depends on it.
                    let body = json!({"callback_query_id": callback_id});
                    if let Err(e) = self
                        .api
                        .call("answerCallbackQuery", &body, SEND_TIMEOUT)
                        .await
                    {
                        tracing::info!(update_id = u.update_id, error = %e.message, "telegram: button press not acknowledged");
                    }
                    Some(inbound)
                }
                Item::Skip(why) => {
                    tracing::info!(update_id = u.update_id, why = %why, "telegram update skipped");
                    None
                }
            };
            out.push(Polled {
                message,
                cursor: Offset {
                    offset: next,
                    at: now,
                },
            });
        }
        Ok(out)
    }

    /// A press the broker took as the operator's answer: its buttons are removed from the
    /// announcement (`editMessageReplyMarkup` with an empty keyboard), so that nobody presses
    /// an answered one again. A press taken otherwise (someone else's, which the broker holds
    /// or queues as an ordinary message) leaves the buttons for the operator. Best effort.
    async fn delivered(&mut self, msg: &Inbound, status: DeliverStatus) {
        let Some((chat_id, message_id)) = self.pressed.remove(&msg.id) else {
            return;
        };
        if status != DeliverStatus::Answered {
            return;
        }
        let body = json!({
            "chat_id": chat_id,
            "message_id": message_id,
            "reply_markup": {"inline_keyboard": []},
        });
        if let Err(e) = self
            .api
            .call("editMessageReplyMarkup", &body, SEND_TIMEOUT)
            .await
        {
            tracing::info!(chat_id, message_id, error = %e.message, "telegram: the answered announcement's buttons were not removed");
        }
    }
}

/// `sendMessage`.
#[derive(Debug)]
pub struct Sender<B> {
    api: Arc<Api<B>>,
    received: Arc<Mutex<Received>>,
    /// Outbox id → pieces already sent (a retry resumes after them).
    progress: crate::adapter::Progress,
}

impl<B: BrokerApi> Sender<B> {}

impl<B: BrokerApi> Outlet for Sender<B> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let pieces = split_message(&msg.body, MAX_MESSAGE_UTF16);
        if pieces.is_empty() {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the message is empty (Telegram refuses empty text)",
            ));
        }
        let chat_id = match msg.recipient.parse::<i64>() {
            Ok(n) => json!(n),
            Err(_) => json!(msg.recipient),
        };
        let reply_to = msg.in_reply_to.as_deref().and_then(|id| {
            let r = lock(&self.received);
            r.by_id
                .get(id)
                .filter(|(chat, _)| chat.to_string() == msg.recipient)
                .map(|(_, m)| *m)
        });
        let start = self.progress.of(&msg.id);
        let mut service_id = None;
        let keyboard = inline_keyboard(msg);
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate().skip(start) {
            let mut body = json!({"chat_id": chat_id, "text": piece});
            if let (0, Some(m)) = (i, reply_to) {
                body["reply_parameters"] =
                    json!({"message_id": m, "allow_sending_without_reply": true});
            }
            if let (true, Some(k)) = (i == last, &keyboard) {
                body["reply_markup"] = k.clone();
            }
            match self.api.call("sendMessage", &body, SEND_TIMEOUT).await {
                Ok(result) => {
                    if service_id.is_none() {
                        service_id = result
                            .get("message_id")
                            .and_then(Value::as_i64)
                            .map(|m| m.to_string());
                    }
                    self.progress.sent(&msg.id, i + 1);
                }
                Err(mut e) => {
                    if !e.retry() {
                        self.progress.forget(&msg.id);
                    }
                    if pieces.len() > 1 {
                        e.message = format!("piece {} of {}: {}", i + 1, pieces.len(), e.message);
                    }
                    return Err(e);
                }
            }
        }
        self.progress.forget(&msg.id);
        Ok(service_id)
    }
}

/// The message's answer buttons as an inline keyboard (one row), or None without buttons.
/// Buttons whose data Telegram cannot carry are left out (logged).
fn inline_keyboard(msg: &OutboundMessage) -> Option<Value> {
    let row: Vec<Value> = msg
        .buttons
        .iter()
        .filter(|b| {
            let ok = !b.data.is_empty() && b.data.len() <= MAX_CALLBACK_DATA && !b.label.is_empty();
            if !ok {
                tracing::warn!(id = %msg.id, "a button Telegram cannot carry was left out");
            }
            ok
        })
        .map(|b| json!({"text": b.label, "callback_data": b.data}))
        .collect();
    (!row.is_empty()).then(|| json!({"inline_keyboard": [row]}))
}

/// The adapter's two halves over one API client.
pub fn adapter<B: BrokerApi>(
    broker: Arc<B>,
    base: ServiceUrl,
    token: BotToken,
    poll_timeout: Duration,
) -> (Poller<B>, Sender<B>) {
    let api = Arc::new(Api {
        broker,
        base,
        token,
    });
    let received = Arc::new(Mutex::new(Received::default()));
    (
        Poller {
            pressed: HashMap::new(),
            api: api.clone(),
            timeout: poll_timeout,
            received: received.clone(),
        },
        Sender {
            api,
            received,
            progress: crate::adapter::Progress::default(),
        },
    )
}

/// Run the Telegram adapter: read the token, then the inbound and outbound loops.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: TelegramSettings) -> Result<(), RunError> {
    let base =
        ServiceUrl::parse(&s.api_base).map_err(|e| ctx.fail("telegram", TelegramError::Url(e)))?;
    let secret: Secret = ctx.secret(&s.token_secret).await?;
    let token = BotToken::new(secret.expose()).map_err(|e| ctx.fail("telegram", e))?;
    drop(secret);
    let (mut poller, sender) = adapter(
        ctx.broker.clone(),
        base,
        token,
        Duration::from_millis(s.poll_timeout_ms),
    );
    let store = CursorStore::new(&ctx.state_dir, "telegram");
    tokio::join!(
        run_inbound(&ctx, &mut poller, &store),
        run_outbound(&ctx, &sender)
    );
    Ok(())
}

#[cfg(test)]
mod tests;
