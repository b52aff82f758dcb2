//! The Slack adapter: Socket Mode in, the Web API's `chat.postMessage` out.
//!
//! Inbound: `apps.connections.open` with the app-level token (`xapp-…`, sent only in the
//! `Authorization` header) gives a single-use `wss://` URL; the adapter connects to it through
//! the broker (`connect`, then TLS here), reads `hello`, then `events_api` envelopes. Each
//! envelope is acknowledged with `{"envelope_id": "…"}` only after the broker answered
//! `deliver` (or refused the message for good): an envelope not acknowledged is sent again by
//! Slack (`retry_attempt`), on this connection or the next one, and the broker drops the repeat
//! by its id. That acknowledgement is the adapter's cursor: Socket Mode has no stream position
//! to resume from, so nothing is written to the state directory. A `disconnect` frame
//! announcing a refresh (`refresh_requested`, `warning`) makes it open a new connection at
//! once; any other reason (`link_disabled`: Socket Mode switched off, `too_many_websockets`)
//! and any drop, with backoff.
//!
//! What is delivered: `message` events of people — no `subtype` (or `thread_broadcast`,
//! `file_share`), no `bot_id` (this app's own messages and other bots' are skipped), with
//! `user`, `channel` and `ts`. Edits, deletions, joins and the other subtypes are skipped with
//! a log line, as are `app_mention` events (the same message also arrives as a `message`
//! event) and envelopes of other types (`slash_commands`, `interactive`), which are
//! acknowledged so Slack does not send them again.
//!
//! - sender = the Slack user id (`U…` or `W…`);
//! - id = `msg:<channel>:<ts>` (the same message through any subscription is one message);
//! - conversation = reply_to = `<channel>:<thread_ts>` for a message in a thread,
//!   `<channel>:<ts>` for a new message in a channel (the reply starts its thread), and
//!   `<channel>` for a direct message outside a thread (`channel_type` `im`: the whole DM is
//!   one conversation, answered unthreaded).
//!
//! Slack's `&amp;`, `&lt;` and `&gt;` are decoded in what is delivered and encoded in what is
//! sent.
//!
//! Outbound: `chat.postMessage` with the bot token (`xoxb-…`), `channel` and `thread_ts` from
//! the recipient (`<channel>[:<thread_ts>]`; a user id `U…` posts into the app's direct
//! messages with that user), split at 4000 characters on line or word boundaries. Slack offers
//! no idempotency key: a message whose first pieces went out and a later one failed resumes at
//! the failed piece. HTTP 429 and `ratelimited` wait the `Retry-After` Slack gives; 5xx,
//! network errors and Slack's transient errors (`internal_error`, `fatal_error`,
//! `service_unavailable`, `request_timeout`) are retried; other `ok: false` errors are not.

mod socket;
mod web;

use std::sync::Arc;
use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use serde_json::{json, Value};

use crate::adapter::{run_outbound, Ctx, FailureKind, Outlet, RunError, ServiceError};
use crate::broker::{BrokerApi, Inbound};
use crate::net::ServiceUrl;
use crate::settings::{shown, SlackSettings};

pub use socket::SocketUrl;

/// Longest piece of text sent in one `chat.postMessage` (Slack advises 4000 characters and
/// truncates beyond 40000).
pub const MAX_TEXT: usize = 4000;
/// Largest Web API answer read.
const MAX_REPLY: usize = 1 << 20;
/// Time for one Web API exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest id, channel or ts taken from Slack.
const MAX_ID: usize = 64;

/// Why the adapter cannot use what it was given.
#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("the secret {secret} is not a Slack {what} (expected {prefix}…)")]
    BadToken {
        secret: String,
        what: &'static str,
        prefix: &'static str,
    },
    #[error("api_base: {0}")]
    Url(#[from] crate::net::NetError),
}

/// A Slack token. Its `Debug` shows nothing of it; it only ever goes into an `Authorization`
/// header.
pub struct Token(String);

impl Token {
    /// The app-level token (`xapp-…`) from its secret's bytes.
    pub fn app(secret_name: &str, bytes: &[u8]) -> Result<Token, SlackError> {
        Token::new(secret_name, bytes, "xapp-", "app-level token")
    }

    /// The bot token (`xoxb-…`) from its secret's bytes.
    pub fn bot(secret_name: &str, bytes: &[u8]) -> Result<Token, SlackError> {
        Token::new(secret_name, bytes, "xoxb-", "bot token")
    }

    fn new(
        secret: &str,
        bytes: &[u8],
        prefix: &'static str,
        what: &'static str,
    ) -> Result<Token, SlackError> {
        let bad = || SlackError::BadToken {
            secret: secret.to_string(),
            what,
            prefix,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?.trim();
        let ok = text.starts_with(prefix)
            && (prefix.len() + 8..=512).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
        Ok(Token(text.to_string()))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

// ------------------------------------------------------------------------------------------
// Parsing what Slack sends

/// One Socket Mode frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The connection is ready.
    Hello,
    /// An envelope to acknowledge: its id, its `type`, and the message it carries (Err: why
    /// there is nothing to deliver).
    Envelope {
        envelope_id: String,
        kind: String,
        retry_attempt: u64,
        message: Result<Inbound, String>,
    },
    /// Slack is about to close the connection, and why.
    Disconnect { reason: String },
}

/// Decode a Socket Mode text frame. Err: the frame is not one Slack sends (said why).
pub fn parse_frame(text: &[u8]) -> Result<Frame, String> {
    let v: Value = serde_json::from_slice(text).map_err(|e| format!("not a JSON frame: {e}"))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a frame without a type")?;
    match kind {
        "hello" => Ok(Frame::Hello),
        "disconnect" => Ok(Frame::Disconnect {
            reason: v
                .get("reason")
                .and_then(Value::as_str)
                .map_or_else(|| "(none)".to_string(), shown),
        }),
        _ => {
            let envelope_id = v
                .get("envelope_id")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty() && e.len() <= 256 && !e.chars().any(char::is_control))
                .ok_or_else(|| format!("a {} frame without an envelope_id", shown(kind)))?;
            let message = if kind == "events_api" {
                match v.get("payload") {
                    Some(p) if p.is_object() => message_of(p),
                    _ => Err("an events_api envelope without a payload".to_string()),
                }
            } else {
                Err(format!("a {} envelope (not delivered)", shown(kind)))
            };
            Ok(Frame::Envelope {
                envelope_id: envelope_id.to_string(),
                kind: shown(kind),
                retry_attempt: v.get("retry_attempt").and_then(Value::as_u64).unwrap_or(0),
                message,
            })
        }
    }
}

/// The `{"envelope_id": …}` acknowledgement of an envelope.
pub fn ack_frame(envelope_id: &str) -> String {
    json!({ "envelope_id": envelope_id }).to_string()
}

/// Slack ids: `C…`, `D…`, `G…`, `U…`, `W…` and the like (capitals and digits).
fn is_slack_id(s: &str) -> bool {
    (2..=MAX_ID).contains(&s.len())
        && s.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// A user id (`U…`, or `W…` on Enterprise Grid): the sender identity an `operator` names.
pub fn is_user_id(s: &str) -> bool {
    is_slack_id(s) && (s.starts_with('U') || s.starts_with('W'))
}

/// A message timestamp (`1355517523.000005`).
fn is_ts(s: &str) -> bool {
    s.len() <= MAX_ID
        && s.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

/// Subtypes whose text a person wrote.
const USER_SUBTYPES: &[&str] = &["thread_broadcast", "file_share"];

/// The message an `events_api` payload carries (Err: why it is not delivered).
pub fn message_of(payload: &Value) -> Result<Inbound, String> {
    let event = payload
        .get("event")
        .filter(|e| e.is_object())
        .ok_or("an event callback without an event")?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "message" {
        return Err(format!("a {} event (not delivered)", shown(kind)));
    }
    if let Some(sub) = event.get("subtype").and_then(Value::as_str) {
        if !USER_SUBTYPES.contains(&sub) {
            return Err(format!(
                "a message of subtype {} (not user text)",
                shown(sub)
            ));
        }
    }
    if event.get("bot_id").is_some_and(|b| !b.is_null()) {
        return Err("a bot's message (this app's own, or another bot's)".into());
    }
    let field = |k: &str| event.get(k).and_then(Value::as_str);
    let user = field("user")
        .filter(|u| is_user_id(u))
        .ok_or("a message without a valid user")?;
    let channel = field("channel")
        .filter(|c| is_slack_id(c))
        .ok_or("a message without a valid channel")?;
    let ts = field("ts")
        .filter(|t| is_ts(t))
        .ok_or("a message without a valid ts")?;
    let thread_ts = match event.get("thread_ts") {
        None | Some(Value::Null) => None,
        Some(t) => Some(
            t.as_str()
                .filter(|t| is_ts(t))
                .ok_or("a message with an invalid thread_ts")?,
        ),
    };
    let mut text = decode_entities(field("text").unwrap_or(""));
    if let Some(files) = event.get("files").and_then(Value::as_array) {
        if !files.is_empty() {
            let note = format!("[slack: {} file(s); only text is delivered]", files.len());
            text = if text.is_empty() {
                note
            } else {
                format!("{note} {text}")
            };
        }
    }
    if text.trim().is_empty() {
        return Err("a message without text".into());
    }
    let conversation = match thread_ts {
        Some(t) => format!("{channel}:{t}"),
        None if field("channel_type") == Some("im") => channel.to_string(),
        None => format!("{channel}:{ts}"),
    };
    Ok(Inbound {
        id: format!("msg:{channel}:{ts}"),
        sender: user.to_string(),
        conversation: conversation.clone(),
        reply_to: conversation,
        text,
    })
}

/// A reply's target: the channel (or user id) and the thread, from `<channel>[:<thread_ts>]`.
pub fn parse_recipient(recipient: &str) -> Option<(&str, Option<&str>)> {
    match recipient.split_once(':') {
        Some((c, t)) if is_slack_id(c) && is_ts(t) => Some((c, Some(t))),
        Some(_) => None,
        None if is_slack_id(recipient) => Some((recipient, None)),
        None => None,
    }
}

/// Slack's three escapes, decoded (`&amp;` last, so `&amp;lt;` stays `&lt;`).
pub fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The three characters Slack's text must escape.
pub fn encode_entities(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Slack's errors that a later retry can cure.
const TRANSIENT: &[&str] = &[
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

/// Decode a Web API answer: the whole object when `ok` is true, else the failure, classified.
/// `status` and `retry_after` (the `Retry-After` header, seconds) are the HTTP answer's.
pub fn api_result(
    status: u16,
    retry_after: Option<u64>,
    body: &[u8],
) -> Result<Value, ServiceError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let ok = v
        .as_ref()
        .and_then(|v| v.get("ok"))
        .and_then(Value::as_bool);
    let throttled = |what: String| {
        let mut e = ServiceError::new(FailureKind::Throttled, what);
        e.retry_after = Some(Duration::from_secs(retry_after.unwrap_or(1).max(1)));
        e
    };
    match (ok, v) {
        (Some(true), Some(v)) if (200..300).contains(&status) => Ok(v),
        (Some(_), Some(v)) => {
            let error = v
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| "no error given".to_string(), shown);
            let what = format!("slack answered {status}: {error}");
            if status == 429 || error == "ratelimited" || error == "rate_limited" {
                Err(throttled(what))
            } else if status >= 500 || TRANSIENT.contains(&error.as_str()) {
                Err(ServiceError::new(FailureKind::Unreachable, what))
            } else {
                Err(ServiceError::new(FailureKind::Rejected, what))
            }
        }
        _ => {
            let what = format!("slack answered {status} with a body that is not a Web API answer");
            match status {
                429 => Err(throttled(what)),
                400..=499 => Err(ServiceError::new(FailureKind::Rejected, what)),
                _ => Err(ServiceError::new(FailureKind::Unreachable, what)),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The Web API

/// The Web API over broker connections.
#[derive(Debug)]
struct Api<B> {
    broker: Arc<B>,
    base: ServiceUrl,
}

impl<B: BrokerApi> Api<B> {
    /// Call `method` with a JSON body and `token`; the answer when `ok`.
    async fn call(&self, token: &Token, method: &str, body: &Value) -> Result<Value, ServiceError> {
        let path = format!("{}/{method}", self.base.path());
        let resp = web::post_json(
            &*self.broker,
            &self.base,
            path,
            token.bearer(),
            body.to_string().into_bytes(),
            CALL_TIMEOUT,
            MAX_REPLY,
        )
        .await
        .map_err(|e| ServiceError::new(FailureKind::Unreachable, format!("slack {method}: {e}")))?;
        api_result(resp.status, resp.retry_after, &resp.body).map_err(|mut e| {
            e.message = format!("{method}: {}", e.message);
            e
        })
    }
}

/// `chat.postMessage`.
#[derive(Debug)]
pub struct Sender<B> {
    api: Arc<Api<B>>,
    token: Token,
    /// Outbox id → pieces already sent (a retry resumes after them).
    progress: crate::adapter::Progress,
}

impl<B: BrokerApi> Sender<B> {}

impl<B: BrokerApi> Outlet for Sender<B> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let Some((channel, thread_ts)) = parse_recipient(&msg.recipient) else {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                format!(
                    "{:?} is not a Slack recipient (CHANNEL or CHANNEL:THREAD_TS)",
                    shown(&msg.recipient)
                ),
            ));
        };
        let pieces = crate::telegram::split_message(&msg.body, MAX_TEXT);
        if pieces.is_empty() {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the message is empty (Slack refuses empty text)",
            ));
        }
        let start = self.progress.of(&msg.id);
        let mut service_id = None;
        for (i, piece) in pieces.iter().enumerate().skip(start) {
            let mut body = json!({"channel": channel, "text": encode_entities(piece)});
            if let Some(t) = thread_ts {
                body["thread_ts"] = json!(t);
            }
            match self.api.call(&self.token, "chat.postMessage", &body).await {
                Ok(answer) => {
                    if service_id.is_none() {
                        service_id = answer.get("ts").and_then(Value::as_str).map(str::to_string);
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

/// Run the Slack adapter: read both tokens, then Socket Mode and the outbound loop.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: SlackSettings) -> Result<(), RunError> {
    let base = ServiceUrl::parse(&s.api_base).map_err(|e| ctx.fail("slack", SlackError::Url(e)))?;
    let app = ctx.secret(&s.app_token_secret).await?;
    let app = Token::app(&s.app_token_secret, app.expose()).map_err(|e| ctx.fail("slack", e))?;
    let bot = ctx.secret(&s.bot_token_secret).await?;
    let bot = Token::bot(&s.bot_token_secret, bot.expose()).map_err(|e| ctx.fail("slack", e))?;
    let api = Arc::new(Api {
        broker: ctx.broker.clone(),
        base,
    });
    let sender = Sender {
        api: api.clone(),
        token: bot,
        progress: crate::adapter::Progress::default(),
    };
    tokio::join!(
        socket::run_socket(&ctx, &api, &app),
        run_outbound(&ctx, &sender)
    );
    Ok(())
}

#[cfg(test)]
mod tests;
