//! Sending: `POST /channels/{channel.id}/messages`, split, idempotent per piece (`nonce` +
//! `enforce_nonce`), within Discord's rate limits (the `X-RateLimit-*` headers, 429
//! `retry_after`, per route and global). A recipient Discord does not know as a channel
//! (`Unknown Channel`, code 10003) is taken for a user id: the DM channel with that user is
//! opened (`POST /users/@me/channels`) and the message goes there; so the broker's
//! announcements to a channel's `operator` (a user id) reach the operator's DM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use carapace_broker::sync::lock;
use hyper::HeaderMap;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::gateway::is_snowflake;
use super::{BotToken, MAX_MESSAGE_CHARS};
use crate::adapter::{FailureKind, Outlet, ServiceError};
use crate::broker::BrokerApi;
use crate::http::{exchange, Request};
use crate::net::ServiceUrl;
use crate::telegram::split_message;

/// Longest wait a rate-limit header or answer is taken at (longer values are capped).
pub const MAX_RESET: Duration = Duration::from_secs(600);
/// Longest wait taken inside one send; longer ones go back to the broker as a retry.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(10);
/// 429s waited out inline for one piece before the broker retries the message.
const MAX_INLINE_429: usize = 3;
/// Time for one exchange.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_REPLY: usize = 1 << 20;
/// Longest `nonce` Discord takes.
const NONCE_LEN: usize = 25;
/// Most entries each of the bounded maps keeps (rate-limit routes, DM channels).
const REMEMBERED: usize = 1024;

/// The rate-limit headers of an answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateHeaders {
    pub remaining: Option<u64>,
    pub reset_after: Option<Duration>,
    pub bucket: Option<String>,
    /// `X-RateLimit-Global: true` (on a 429).
    pub global: bool,
    /// `Retry-After` (seconds).
    pub retry_after: Option<Duration>,
}

fn seconds(s: &str) -> Option<Duration> {
    let f: f64 = s.trim().parse().ok()?;
    (f.is_finite() && f >= 0.0).then(|| Duration::from_secs_f64(f.min(MAX_RESET.as_secs_f64())))
}

impl RateHeaders {
    pub fn of(h: &HeaderMap) -> RateHeaders {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        RateHeaders {
            remaining: get("x-ratelimit-remaining").and_then(|v| v.trim().parse().ok()),
            reset_after: get("x-ratelimit-reset-after").and_then(seconds),
            bucket: get("x-ratelimit-bucket").map(crate::settings::shown),
            global: get("x-ratelimit-global")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
            retry_after: get("retry-after").and_then(seconds),
        }
    }
}

/// Decode an answer to `POST /channels/{id}/messages`: the created message, or the failure,
/// classified (429 carries the wait Discord asked for).
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> Result<Value, ServiceError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        return match v {
            Some(m)
                if m.get("id")
                    .and_then(Value::as_str)
                    .is_some_and(is_snowflake) =>
            {
                Ok(m)
            }
            _ => Err(ServiceError::new(
                FailureKind::Unreachable,
                format!("discord answered {status} without a message object"),
            )),
        };
    }
    let message = v
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| "no message".to_string(), crate::settings::shown);
    let code = v
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64);
    let what = match code {
        Some(c) => format!("discord answered {status}: {message} (code {c})"),
        None => format!("discord answered {status}: {message}"),
    };
    if status == 429 {
        let rh = RateHeaders::of(headers);
        let body_wait = v
            .as_ref()
            .and_then(|v| v.get("retry_after"))
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| Duration::from_secs_f64(f.min(MAX_RESET.as_secs_f64())));
        let global = rh.global
            || v.as_ref()
                .and_then(|v| v.get("global"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let mut e = ServiceError::new(
            FailureKind::Throttled,
            format!("{what}{}", if global { " (global)" } else { "" }),
        );
        e.retry_after = Some(
            body_wait
                .or(rh.retry_after)
                .unwrap_or(Duration::from_secs(1)),
        );
        return Err(e);
    }
    let kind = match status {
        400..=499 => FailureKind::Rejected,
        _ => FailureKind::Unreachable,
    };
    Err(ServiceError::new(kind, what))
}

/// The `nonce` of piece `piece` of outbox message `id`: the same on every retry.
pub fn nonce(id: &str, piece: usize) -> String {
    let digest = Sha256::digest(format!("{id}\n{piece}").as_bytes());
    let mut hex = crate::settings::shown(&hex::encode(digest));
    hex.truncate(NONCE_LEN);
    hex
}

/// Until when requests must wait: everything (global), and per route.
#[derive(Debug, Default)]
struct Limits {
    global_until: Option<Instant>,
    routes: HashMap<String, Instant>,
}

impl Limits {
    fn wait(&self, route: &str, now: Instant) -> Duration {
        let g = self
            .global_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        let r = self
            .routes
            .get(route)
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        g.max(r)
    }

    fn learn(
        &mut self,
        route: &str,
        status: u16,
        rh: &RateHeaders,
        throttled: Option<&ServiceError>,
        now: Instant,
    ) {
        if self.routes.len() > REMEMBERED {
            self.routes.retain(|_, t| *t > now);
        }
        if let Some(e) = throttled {
            let until = now + e.retry_after.unwrap_or(Duration::from_secs(1));
            if e.message.ends_with("(global)") {
                self.global_until = Some(until);
            } else {
                self.routes.insert(route.to_string(), until);
            }
            return;
        }
        match (rh.remaining, rh.reset_after) {
            (Some(0), Some(after)) => {
                tracing::debug!(
                    route,
                    bucket = rh.bucket.as_deref().unwrap_or(""),
                    status,
                    "discord: route exhausted until its reset"
                );
                self.routes.insert(route.to_string(), now + after);
            }
            _ => {
                self.routes.remove(route);
            }
        }
    }
}

/// The REST sender.
#[derive(Debug)]
pub struct Rest<B> {
    broker: Arc<B>,
    base: ServiceUrl,
    token: Arc<BotToken>,
    limits: Mutex<Limits>,
    /// Outbox id → pieces already sent (a retry resumes after them).
    progress: crate::adapter::Progress,
    /// User id → the DM channel with them (a recipient that is a user, like the operator).
    dms: Mutex<HashMap<String, String>>,
}

impl<B: BrokerApi> Rest<B> {
    pub fn new(broker: Arc<B>, base: ServiceUrl, token: Arc<BotToken>) -> Rest<B> {
        Rest {
            broker,
            base,
            token,
            limits: Mutex::new(Limits::default()),
            progress: crate::adapter::Progress::default(),
            dms: Mutex::new(HashMap::new()),
        }
    }

    /// Post one piece to `channel`, waiting out rate limits up to [`MAX_INLINE_WAIT`].
    async fn post(&self, channel: &str, body: &Value) -> Result<Value, ServiceError> {
        self.call(&format!("/channels/{channel}/messages"), body)
            .await
    }

    /// The DM channel with user `user` (`POST /users/@me/channels`), remembered.
    async fn dm_channel(&self, user: &str) -> Result<String, ServiceError> {
        if let Some(c) = lock(&self.dms).get(user) {
            return Ok(c.clone());
        }
        let channel = self
            .call("/users/@me/channels", &json!({"recipient_id": user}))
            .await?;
        let id = channel
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut dms = lock(&self.dms);
        if dms.len() >= REMEMBERED {
            dms.clear();
        }
        dms.insert(user.to_string(), id.clone());
        Ok(id)
    }

    /// POST `body` to `route` (a path below the API base), within the rate limits.
    async fn call(&self, route_path: &str, body: &Value) -> Result<Value, ServiceError> {
        let route = format!("POST {route_path}");
        let path = format!("{}{route_path}", self.base.path());
        let mut throttled = 0;
        loop {
            let wait = lock(&self.limits).wait(&route, Instant::now());
            if wait > MAX_INLINE_WAIT {
                let mut e = ServiceError::new(
                    FailureKind::Throttled,
                    format!("discord: rate limited for {} ms more", wait.as_millis()),
                );
                e.retry_after = Some(wait);
                return Err(e);
            }
            if !wait.is_zero() {
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "discord: waiting for the rate limit"
                );
                tokio::time::sleep(wait).await;
            }
            let mut req = Request::post_json(path.clone(), body.to_string().into_bytes());
            req.headers
                .push(("authorization", format!("Bot {}", self.token.expose())));
            let resp = exchange(&*self.broker, &self.base, req, SEND_TIMEOUT, MAX_REPLY)
                .await
                .map_err(|e| {
                    ServiceError::new(
                        FailureKind::Unreachable,
                        self.token.scrub(&format!("discord {route}: {e}")),
                    )
                })?;
            let r = classify(resp.status, &resp.headers, &resp.body);
            let rh = RateHeaders::of(&resp.headers);
            let th = r
                .as_ref()
                .err()
                .filter(|e| e.kind == FailureKind::Throttled);
            lock(&self.limits).learn(&route, resp.status, &rh, th, Instant::now());
            match r {
                Err(e)
                    if e.kind == FailureKind::Throttled
                        && throttled < MAX_INLINE_429
                        && e.retry_after.is_some_and(|d| d <= MAX_INLINE_WAIT) =>
                {
                    tracing::info!(error = %e.message, "discord: rate limited: waiting and sending again");
                    throttled += 1;
                }
                r => return r,
            }
        }
    }
}

impl<B: BrokerApi> Outlet for Rest<B> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        if !is_snowflake(&msg.recipient) {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                format!(
                    "{:?} is not a Discord channel id",
                    crate::settings::shown(&msg.recipient)
                ),
            ));
        }
        let pieces = split_message(&msg.body, MAX_MESSAGE_CHARS);
        if pieces.is_empty() {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the message is empty (Discord refuses empty messages)",
            ));
        }
        let reply_to = msg
            .in_reply_to
            .as_deref()
            .and_then(|id| id.strip_prefix("message:"))
            .filter(|id| is_snowflake(id));
        let start = self.progress.of(&msg.id);
        let mut service_id = None;
        // A user id (the operator's announcements go to the operator) is sent to their DM.
        let mut channel = lock(&self.dms)
            .get(&msg.recipient)
            .cloned()
            .unwrap_or_else(|| msg.recipient.clone());
        for (i, piece) in pieces.iter().enumerate().skip(start) {
            let mut body = json!({
                "content": piece,
                "nonce": nonce(&msg.id, i),
                "enforce_nonce": true,
                "allowed_mentions": {"parse": []},
            });
            if let (0, Some(m)) = (i, reply_to) {
                body["message_reference"] = json!({"message_id": m, "fail_if_not_exists": false});
            }
            let mut r = self.post(&channel, &body).await;
            if r.as_ref()
                .is_err_and(|e| e.message.ends_with("(code 10003)"))
                && channel == msg.recipient
            {
                // Unknown Channel: the recipient may be a user; open (or find) the DM with them.
                if let Ok(dm) = self.dm_channel(&msg.recipient).await {
                    tracing::info!(dm = %dm, "discord: the recipient is a user: sending to the DM with them");
                    channel = dm;
                    r = self.post(&channel, &body).await;
                }
            }
            match r {
                Ok(created) => {
                    if service_id.is_none() {
                        service_id = created
                            .get("id")
                            .and_then(Value::as_str)
                            .map(str::to_string);
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
