//! The signed-webhook adapter.
//!
//! Inbound: HTTP on the listening socket the supervisor hands over (`$CARAPACE_LISTEN_FD`,
//! fd 4). `POST <path>` with the header `X-Carapace-Signature: sha256=<hex of
//! HMAC-SHA256(key, body)>` (compared in constant time) and the JSON body
//! `{"id": "...", "sender": "...", "conversation": "...", "text": "..."}` (`conversation`
//! optional: the sender; reply_to = the conversation) is delivered to the broker, and answered:
//!
//! | status | when |
//! |---|---|
//! | 202 | the broker took it: `{"status": "queued" \| "held" \| "duplicate"}` |
//! | 400 | the body is not such JSON (or the broker finds a field invalid) |
//! | 401 | the signature is missing or wrong |
//! | 404 / 405 | another path / another method |
//! | 408 | the body did not arrive within 30 s |
//! | 413 | the body is over 1 MiB (or over the channel's size limit) |
//! | 503 | the broker is busy or unavailable: send it again later (`Retry-After`) |
//!
//! The sender retries with the same `id` until it gets a 202; the broker drops repeats.
//!
//! Outbound (when `url` is set): `POST url` with `{"id", "recipient", "text", "in_reply_to"}`
//! signed the same way, through a broker connection (https with rustls, or http to a loopback
//! host). 2xx: sent; 429, 5xx and network errors: retried; other answers: not.

use std::sync::Arc;
use std::time::Duration;

use carapace_broker::protocol::{DeliverStatus, ErrorCode, OutboundMessage};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::adapter::{run_outbound, Ctx, FailureKind, Outlet, RunError, ServiceError};
use crate::broker::{BrokerApi, Inbound, Secret};
use crate::http::{exchange, Request};
use crate::net::ServiceUrl;
use crate::settings::WebhookSettings;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-carapace-signature";
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Longest id, sender or conversation, in bytes (the broker's limit).
const MAX_FIELD: usize = 256;
/// Time a client has to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time for an outbound POST.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from the outbound URL.
const MAX_ANSWER: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// Why the adapter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the HMAC key secret is empty")]
    EmptyKey,
    #[error("url: {0}")]
    Url(#[from] crate::net::NetError),
    #[error(transparent)]
    Listener(#[from] carapace_gateway::StartError),
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

/// Why a request body is not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not the expected JSON: {0}")]
    Json(String),
    #[error("{field}: {why}")]
    Field {
        field: &'static str,
        why: &'static str,
    },
}

/// `sha256=<hex of HMAC-SHA256(key, body)>`. None only if the MAC refused the key, which
/// HMAC (any key length) never does.
pub fn sign(key: &[u8], body: &[u8]) -> Option<String> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(body);
    Some(format!(
        "sha256={}",
        carapace_broker::audit::hex(&mac.finalize().into_bytes())
    ))
}

/// Whether `header` (the signature header's value) signs `body` with `key`. The MACs are
/// compared in constant time.
pub fn verify(key: &[u8], body: &[u8], header: Option<&[u8]>) -> bool {
    let Some(sig) = header
        .and_then(|h| h.strip_prefix(b"sha256="))
        .and_then(unhex)
    else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| char::from(c).to_digit(16);
            Some(u8::try_from(d(p[0])? * 16 + d(p[1])?).unwrap_or(0))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    id: String,
    sender: String,
    #[serde(default)]
    conversation: Option<String>,
    text: String,
}

fn field(name: &'static str, v: &str) -> Result<(), BodyError> {
    let why = if v.is_empty() {
        "must not be empty"
    } else if v.len() > MAX_FIELD {
        "over 256 bytes"
    } else if v.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(BodyError::Field { field: name, why })
}

/// Decode a request body into a message (the pure parser the fuzz target calls).
pub fn parse_body(body: &[u8]) -> Result<Inbound, BodyError> {
    let w: Wire = serde_json::from_slice(body).map_err(|e| {
        BodyError::Json(
            // serde_json's message quotes no input beyond a field name.
            e.to_string(),
        )
    })?;
    field("id", &w.id)?;
    field("sender", &w.sender)?;
    let conversation = w.conversation.unwrap_or_else(|| w.sender.clone());
    field("conversation", &conversation)?;
    Ok(Inbound {
        id: w.id,
        sender: w.sender,
        reply_to: conversation.clone(),
        conversation,
        text: w.text,
    })
}

type Resp = hyper::Response<Full<Bytes>>;

fn answer(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Resp {
    answer(status, json!({"error": message.to_string()}))
}

/// Answer one request.
async fn handle<B: BrokerApi>(
    ctx: &Ctx<B>,
    key: &Secret,
    path: &str,
    req: hyper::Request<Incoming>,
) -> Resp {
    if req.uri().path() != path {
        return error(StatusCode::NOT_FOUND, "no such path");
    }
    if req.method() != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return r;
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 1 MiB");
    }
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body did not arrive in time",
                )
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 1 MiB")
            }
            Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            Ok(Ok(b)) => b.to_bytes(),
        };
    let sig = parts.headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    if !verify(key.expose(), &body, sig) {
        tracing::warn!(channel = %ctx.channel, "a request with a missing or wrong signature");
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Carapace-Signature",
        );
    }
    let msg = match parse_body(&body) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match ctx.broker.deliver(&msg).await {
        Ok(r) => {
            tracing::info!(channel = %ctx.channel, id = %msg.id, sender = %msg.sender, status = ?r.status, "delivered");
            let status = match r.status {
                DeliverStatus::Queued => "queued",
                DeliverStatus::Held => "held",
                DeliverStatus::Duplicate => "duplicate",
                DeliverStatus::Answered => "answered",
            };
            answer(StatusCode::ACCEPTED, json!({"status": status}))
        }
        Err(e) => {
            tracing::warn!(channel = %ctx.channel, id = %msg.id, error = %e, "deliver failed");
            match e.code() {
                Some(ErrorCode::TooLarge) => error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "over the channel's size limit",
                ),
                Some(ErrorCode::BadRequest) => error(StatusCode::BAD_REQUEST, e),
                _ => {
                    let mut r = error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the message was not taken; send it again later",
                    );
                    r.headers_mut().insert(
                        hyper::header::RETRY_AFTER,
                        hyper::header::HeaderValue::from_static("5"),
                    );
                    r
                }
            }
        }
    }
}

/// Serve `listener` with `key` until the process ends.
pub async fn serve<B: BrokerApi>(
    ctx: Arc<Ctx<B>>,
    key: Arc<Secret>,
    path: String,
    listener: std::net::TcpListener,
) -> Result<(), WebhookError> {
    listener
        .set_nonblocking(true)
        .map_err(WebhookError::Serve)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(WebhookError::Serve)?;
    let path = Arc::new(path);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "too many connections: closed at once");
            continue;
        };
        let (ctx, key, path) = (ctx.clone(), key.clone(), path.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (ctx, key, path) = (ctx.clone(), key.clone(), path.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&ctx, &key, &path, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// Outbound POSTs to the configured URL.
#[derive(Debug)]
pub struct Poster<B> {
    broker: Arc<B>,
    url: Option<ServiceUrl>,
    key: Arc<Secret>,
}

impl<B: BrokerApi> Poster<B> {
    pub fn new(broker: Arc<B>, url: Option<ServiceUrl>, key: Arc<Secret>) -> Poster<B> {
        Poster { broker, url, key }
    }
}

impl<B: BrokerApi> Outlet for Poster<B> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let Some(url) = &self.url else {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "this webhook channel has no url to send to",
            ));
        };
        let body = json!({
            "id": msg.id,
            "recipient": msg.recipient,
            "text": msg.body,
            "in_reply_to": msg.in_reply_to,
        })
        .to_string()
        .into_bytes();
        let mut req = Request::post_json(
            if url.path().is_empty() {
                "/".to_string()
            } else {
                url.path().to_string()
            },
            Vec::new(),
        );
        let Some(sig) = sign(self.key.expose(), &body) else {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the HMAC key is unusable",
            ));
        };
        req.headers.push((SIGNATURE_HEADER, sig));
        req.body = body;
        let resp = exchange(&*self.broker, url, req, SEND_TIMEOUT, MAX_ANSWER)
            .await
            .map_err(|e| {
                ServiceError::new(FailureKind::Unreachable, format!("webhook POST: {e}"))
            })?;
        let kind = match resp.status {
            200..=299 => return Ok(None),
            429 => FailureKind::Throttled,
            500..=599 => FailureKind::Unreachable,
            _ => FailureKind::Rejected,
        };
        let text = String::from_utf8_lossy(&resp.body);
        Err(ServiceError::new(
            kind,
            format!(
                "webhook POST answered {}: {}",
                resp.status,
                crate::settings::shown(text.trim())
            ),
        ))
    }
}

/// Run the webhook adapter: the key, the server on the inherited listener, the outbound loop.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: WebhookSettings) -> Result<(), RunError> {
    let url = match &s.url {
        Some(u) => {
            Some(ServiceUrl::parse(u).map_err(|e| ctx.fail("webhook", WebhookError::Url(e)))?)
        }
        None => None,
    };
    let listener = carapace_gateway::listener_from_env()
        .map_err(|e| ctx.fail("webhook", WebhookError::Listener(e)))?;
    let key = Arc::new(ctx.secret(&s.hmac_secret).await?);
    if key.expose().is_empty() {
        return Err(ctx.fail("webhook", WebhookError::EmptyKey));
    }
    let poster = Poster::new(ctx.broker.clone(), url, key.clone());
    ctx.report(true, None).await;
    let server = serve(ctx.clone(), key, s.path, listener);
    tokio::select! {
        r = server => r.map_err(|e| ctx.fail("webhook", e)),
        () = run_outbound(&ctx, &poster) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
