//! signal-cli's JSON-RPC wire format (man page signal-cli-jsonrpc(5)): one JSON object per
//! line in both directions. What comes from the daemon is one of
//!
//! - a response to one of our requests: `{"jsonrpc":"2.0","result":...,"id":N}` or
//!   `{"jsonrpc":"2.0","error":{"code":C,"message":"...","data":...},"id":N}`;
//! - a `receive` notification: `{"jsonrpc":"2.0","method":"receive","params":{"envelope":
//!   {...},"account":"+..."}}` (or, after `subscribeReceive`, the envelope wrapped in
//!   `params.result`).
//!
//! Everything here is pure (the fuzz target calls it).

use std::time::Duration;

use serde_json::{json, Value};

use crate::adapter::{FailureKind, ServiceError};
use crate::broker::Inbound;

/// Longest line read from the daemon (a notification with a long message is a few tens of KiB).
pub const MAX_LINE: usize = 1 << 20;
/// Longest text of one `send` (Signal shows longer texts as an attachment): pieces are split
/// at this many UTF-16 units.
pub const MAX_MESSAGE_UTF16: usize = 2000;
/// Longest identity or group id accepted from the daemon.
const MAX_ID: usize = 256;

/// signal-cli's error codes besides JSON-RPC's own (SignalJsonRpcCommandHandler).
pub const USER_ERROR: i64 = -1;
pub const IO_ERROR: i64 = -3;
pub const UNTRUSTED_KEY_ERROR: i64 = -4;
pub const RATE_LIMIT_ERROR: i64 = -5;

/// One line from the daemon, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The answer to request `id`.
    Response {
        id: u64,
        outcome: Result<Value, RpcError>,
    },
    /// A `receive` notification.
    Received(Received),
    /// Another notification or an answer to no request of ours (logged, skipped).
    Other(String),
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Value,
}

/// What a `receive` notification holds for the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Message(Inbound),
    /// Nothing to deliver (a receipt, typing, a sync of our own message, ...), and why.
    Skip(String),
}

/// Why a line is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a malformed line from signal-cli: {0}")]
pub struct Malformed(pub String);

fn malformed(why: impl Into<String>) -> Malformed {
    Malformed(why.into())
}

/// A request line (with its newline).
pub fn request(id: u64, method: &str, params: Option<Value>) -> Vec<u8> {
    let mut v = json!({"jsonrpc": "2.0", "method": method, "id": id});
    if let Some(p) = params {
        v["params"] = p;
    }
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The `send` params for `recipient` (a number or uuid, or `group:<id>`).
pub fn send_params(recipient: &str, text: &str) -> Value {
    match recipient.strip_prefix("group:") {
        Some(g) => json!({"groupId": g, "message": text}),
        None => json!({"recipient": [recipient], "message": text}),
    }
}

/// Whether `s` can be a recipient: `+` and digits, a UUID, `u:username`, or `group:` and a
/// base64 group id.
pub fn valid_recipient(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_ID || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return false;
    }
    if let Some(g) = s.strip_prefix("group:") {
        return !g.is_empty()
            && g.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
            });
    }
    true
}

/// Decode one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<Frame, Malformed> {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Err(malformed(format!("not JSON ({e})"))),
    };
    let obj = v
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(malformed("no \"jsonrpc\":\"2.0\""));
    }
    if let Some(method) = obj.get("method") {
        let method = method
            .as_str()
            .ok_or_else(|| malformed("\"method\" is not a string"))?;
        if method != "receive" {
            return Ok(Frame::Other(format!(
                "a {:?} notification",
                crate::settings::shown(method)
            )));
        }
        let params = obj
            .get("params")
            .filter(|p| p.is_object())
            .ok_or_else(|| malformed("a receive notification without params"))?;
        // After `subscribeReceive` the envelope comes wrapped in `result`.
        let holder = params
            .get("result")
            .filter(|r| r.is_object())
            .unwrap_or(params);
        let envelope = holder
            .get("envelope")
            .filter(|e| e.is_object())
            .ok_or_else(|| malformed("a receive notification without an envelope"))?;
        return Ok(Frame::Received(envelope_of(envelope)?));
    }
    let id = match obj.get("id") {
        Some(Value::Number(n)) => n.as_u64(),
        // signal-cli answers `"id":null` to a request it could not read.
        Some(Value::Null) | None => None,
        Some(_) => None,
    };
    let outcome = if let Some(r) = obj.get("result") {
        Ok(r.clone())
    } else if let Some(e) = obj.get("error") {
        let code = e
            .get("code")
            .and_then(Value::as_i64)
            .ok_or_else(|| malformed("an error without a numeric code"))?;
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        Err(RpcError {
            code,
            message: crate::settings::shown(message),
            data: e.get("data").cloned().unwrap_or(Value::Null),
        })
    } else {
        return Err(malformed("neither method, result nor error"));
    };
    match id {
        Some(id) => Ok(Frame::Response { id, outcome }),
        None => Ok(Frame::Other(match outcome {
            Err(e) => format!("an error for no request: {} ({})", e.message, e.code),
            Ok(_) => "an answer to no request".into(),
        })),
    }
}

/// A string field that is an identity we can use (non-empty, bounded, printable).
fn id_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str).filter(|s| {
        !s.is_empty()
            && s.len() <= MAX_ID
            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
    })
}

/// The envelope of a `receive` notification.
pub fn envelope_of(env: &Value) -> Result<Received, Malformed> {
    let timestamp = env
        .get("timestamp")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("an envelope without a timestamp"))?;
    let number = id_field(env, "sourceNumber");
    let uuid = id_field(env, "sourceUuid");
    let Some(data) = env.get("dataMessage").filter(|d| d.is_object()) else {
        let what = [
            "syncMessage",
            "receiptMessage",
            "typingMessage",
            "callMessage",
            "storyMessage",
            "editMessage",
        ]
        .into_iter()
        .find(|k| env.get(*k).is_some())
        .unwrap_or("an envelope without a data message");
        return Ok(Received::Skip(what.to_string()));
    };
    // The number when Signal shares it, else the account's uuid (ACI).
    let Some(sender) = number.or(uuid) else {
        return Ok(Received::Skip(
            "a message without sourceNumber or sourceUuid".into(),
        ));
    };
    // The stable id: who sent it and its timestamp (what Signal itself identifies it by).
    let id = format!("signal:{}:{timestamp}", uuid.or(number).unwrap_or(sender));
    let group = data
        .get("groupInfo")
        .and_then(|g| g.get("groupId"))
        .and_then(Value::as_str);
    let conversation = match group {
        Some(g) if valid_recipient(&format!("group:{g}")) => format!("group:{g}"),
        Some(_) => return Err(malformed("a group id that is not base64")),
        None => sender.to_string(),
    };
    let text = match data.get("message").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => {
            let attachments = data
                .get("attachments")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if attachments {
                "[signal: attachment; only text is delivered]".to_string()
            } else if data.get("sticker").is_some() {
                "[signal: sticker; only text is delivered]".to_string()
            } else {
                return Ok(Received::Skip(
                    "a data message without text (a reaction, a group update, ...)".into(),
                ));
            }
        }
    };
    Ok(Received::Message(Inbound {
        id,
        sender: sender.to_string(),
        conversation: conversation.clone(),
        reply_to: conversation,
        text,
    }))
}

/// A failed request, classified.
pub fn rpc_failure(method: &str, e: &RpcError) -> ServiceError {
    let kind = match e.code {
        RATE_LIMIT_ERROR => FailureKind::Throttled,
        IO_ERROR => FailureKind::Unreachable,
        USER_ERROR | UNTRUSTED_KEY_ERROR | -32700 | -32600 | -32601 | -32602 => {
            FailureKind::Rejected
        }
        _ => FailureKind::Unreachable,
    };
    let mut err = ServiceError::new(
        kind,
        format!("signal-cli {method}: {} (error {})", e.message, e.code),
    );
    if kind == FailureKind::Throttled {
        err.retry_after = e.data.get("response").and_then(retry_after_of);
    }
    err
}

/// The longest `retryAfterSeconds` of a send result's `results`.
fn retry_after_of(result: &Value) -> Option<Duration> {
    result
        .get("results")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(|r| r.get("retryAfterSeconds").and_then(Value::as_u64))
        .max()
        .map(Duration::from_secs)
}

/// The outcome of a `send` result: the message's timestamp when it went out, else the
/// failure. A group send that reached some members counts as sent (sending again would
/// double it for them); the others are named in the log by the caller.
pub fn send_outcome(result: &Value) -> Result<(u64, Vec<String>), ServiceError> {
    let timestamp = result
        .get("timestamp")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            ServiceError::new(
                FailureKind::Unreachable,
                "signal-cli send: an answer without a timestamp",
            )
        })?;
    let results = result
        .get("results")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut failed = Vec::new();
    let mut worst: Option<FailureKind> = None;
    let mut any_success = results.is_empty();
    for r in &results {
        let ty = r.get("type").and_then(Value::as_str).unwrap_or("?");
        if ty == "SUCCESS" {
            any_success = true;
            continue;
        }
        let who = r
            .get("recipientAddress")
            .and_then(|a| id_field(a, "number").or_else(|| id_field(a, "uuid")))
            .unwrap_or("?");
        failed.push(format!("{who}: {}", crate::settings::shown(ty)));
        let kind = match ty {
            "RATE_LIMIT_FAILURE" => FailureKind::Throttled,
            "NETWORK_FAILURE" => FailureKind::Unreachable,
            _ => FailureKind::Rejected,
        };
        // Throttled beats Unreachable beats Rejected: the most hopeful wins.
        worst = Some(match (worst, kind) {
            (Some(FailureKind::Throttled), _) | (_, FailureKind::Throttled) => {
                FailureKind::Throttled
            }
            (Some(FailureKind::Unreachable), _) | (_, FailureKind::Unreachable) => {
                FailureKind::Unreachable
            }
            _ => FailureKind::Rejected,
        });
    }
    match worst {
        Some(kind) if !any_success => {
            let mut e = ServiceError::new(
                kind,
                format!("signal-cli send failed: {}", failed.join(", ")),
            );
            if kind == FailureKind::Throttled {
                e.retry_after = retry_after_of(result);
            }
            Err(e)
        }
        _ => Ok((timestamp, failed)),
    }
}

/// What can be read from a torn line: a daemon killed in the middle of a line leaves that part
/// in the socket, and its successor's first line is glued to it. The first suffix that starts
/// with `{"` and is a whole frame (at most 64 places are tried).
pub fn salvage(line: &[u8]) -> Option<Frame> {
    line.windows(2)
        .enumerate()
        .skip(1)
        .filter(|(_, w)| *w == b"{\"")
        .take(64)
        .find_map(|(i, _)| parse_line(&line[i..]).ok())
}
