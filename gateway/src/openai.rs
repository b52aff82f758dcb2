//! The OpenAI-compatible door: `POST /v1/chat/completions` and `GET /v1/models`, so that any
//! OpenAI SDK or chat front-end talks to the confined agent.
//!
//! - **Authentication** is the gateway's: `Authorization: Bearer <carapace token>` (the SDKs'
//!   "API key"), client or operator scope, the per-token rate of every call.
//! - **The model** is listed as `carapace` ([`MODEL_ID`]): what answers is the agent (the
//!   configured model behind the operator's system prompt, with its tools going through the
//!   broker), not the raw model. The `model` a request names is not used to choose.
//! - **The session** (the agent keeps the conversation, as for `agent.run`): the
//!   `X-Carapace-Session` header, else the request's `user` field, else `oai-<token id>` (one
//!   per token). Ownership is that of `agent.run`: another's session is answered 404.
//! - **Messages**: the last one must be the user's (its text is the new user message); the
//!   earlier ones are not used, because the session holds the history the agent saw, tool
//!   results included. Client `system` messages are not used either: the system prompt is the
//!   operator's. Client-side `tools` are ignored (the agent has its own).
//! - **Answers**: the run's final text, already redacted like every answer
//!   ([`crate::methods::agent`]); `finish_reason` `stop`, or `length` when the run stopped at
//!   its turn limit or token budget. A tool call that needs approval makes the request wait
//!   (bounded by the approval timeout); the final answer says what happened.
//! - **Streaming** (`stream: true`): server-sent events. A first `chat.completion.chunk` with
//!   the role is sent at once, `: keep-alive` comments every [`KEEP_ALIVE`] while the agent
//!   works, then the answer in content chunks, a last chunk with `finish_reason`, a usage chunk
//!   when `stream_options.include_usage` is set, and `data: [DONE]`. The answer is redacted as
//!   a whole before it is cut into chunks, so no secret can straddle two of them. A failure
//!   after the stream started is sent as `data: {"error": ...}`. A client that goes away does
//!   not stop the run: its answer is stored in the session.
//! - **Errors** have OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the HTTP
//!   status of the gateway's error table (401 bad token, 400 bad input, 404 unknown session,
//!   429 rate, 503 no model or broker).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::app::{App, Emitter};
use crate::auth::Caller;
use crate::methods::agent::{self, Model, RunEnd};
use crate::rpc::{Kind, RpcError};
use crate::sessions::{content_text, valid_name};

/// The one model this door lists.
pub const MODEL_ID: &str = "carapace";
/// The header that names the session.
pub const SESSION_HEADER: &str = "x-carapace-session";
/// A comment is sent this often on a stream while the agent works.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Bytes of answer per content chunk of a stream.
const CHUNK: usize = 256;

/// An error in OpenAI's shape, with the status of its kind.
pub fn error_response(e: &RpcError) -> Response {
    let status =
        StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(error_json(e))).into_response();
    if e.kind == Kind::Unauthorized {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// `{"error": {"message", "type", "code"}}`: `type` is OpenAI's word for the class of error,
/// `code` the gateway's kind.
pub fn error_json(e: &RpcError) -> Value {
    let ty = match e.kind {
        Kind::Unauthorized => "authentication_error",
        Kind::Forbidden | Kind::Denied => "permission_error",
        Kind::RateLimited => "rate_limit_error",
        Kind::NotFound | Kind::MethodNotFound => "not_found_error",
        Kind::ParseError | Kind::InvalidRequest | Kind::InvalidParams | Kind::TooLarge => {
            "invalid_request_error"
        }
        Kind::Internal | Kind::Unavailable | Kind::Busy | Kind::Pending => "server_error",
    };
    json!({"error": {"message": e.message, "type": ty, "code": e.kind.as_str(), "param": Value::Null}})
}

fn bad(message: impl Into<String>) -> RpcError {
    RpcError::new(Kind::InvalidRequest, message)
}

/// What a chat-completions request says that the gateway uses (other keys are ignored).
#[derive(Debug, Default, PartialEq)]
pub struct ChatRequest {
    /// The new user message.
    pub message: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The session named by the request (`user`); None: not named there.
    pub user: Option<String>,
}

/// Read a chat-completions body.
pub fn parse_request(body: &Value) -> Result<ChatRequest, RpcError> {
    let Some(o) = body.as_object() else {
        return Err(bad("the body must be a JSON object"));
    };
    let flag = |k: &str, v: Option<&Value>| -> Result<bool, RpcError> {
        match v {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(format!("`{k}` must be true or false"))),
        }
    };
    let stream = flag("stream", o.get("stream"))?;
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => flag("stream_options.include_usage", so.get("include_usage"))?,
        Some(_) => return Err(bad("`stream_options` must be an object")),
    };
    let user = match o.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_name(s) => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                "`user` names the session: 1 to 64 characters of A-Z a-z 0-9 _ -",
            ))
        }
    };
    let Some(messages) = o.get("messages").and_then(Value::as_array) else {
        return Err(bad("`messages` must be a list of messages"));
    };
    let Some(last) = messages.last() else {
        return Err(bad("`messages` is empty"));
    };
    if last["role"] != "user" {
        return Err(bad(
            "the last message must be the user's (the agent runs its own tools; the session keeps the history)",
        ));
    }
    let message = content_text(&last["content"])
        .filter(|t| !t.is_empty() && t.len() <= agent::MAX_MESSAGE)
        .ok_or_else(|| bad("the last message's content must be 1 byte to 64 KiB of text"))?;
    Ok(ChatRequest {
        message,
        stream,
        include_usage,
        user,
    })
}

/// The session of a request: the header, the `user` field, or the token's own.
pub fn session_of(
    headers: &HeaderMap,
    req: &ChatRequest,
    caller: &Caller,
) -> Result<String, RpcError> {
    if let Some(h) = headers.get(SESSION_HEADER) {
        return match h.to_str() {
            Ok(s) if valid_name(s) => Ok(s.to_string()),
            _ => Err(bad(
                "X-Carapace-Session: 1 to 64 characters of A-Z a-z 0-9 _ -",
            )),
        };
    }
    Ok(req
        .user
        .clone()
        .unwrap_or_else(|| format!("oai-{}", caller.token_id)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh completion id.
fn completion_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "chatcmpl-{nanos:x}{:04x}",
        N.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// The answer text and finish reason of a run.
pub(crate) fn answer_of(end: &RunEnd) -> (String, &'static str) {
    if end.stopped == "done" {
        (content_text(&end.last).unwrap_or_default(), "stop")
    } else {
        let said = content_text(&end.reply).unwrap_or_default();
        let note = format!(
            "[the agent stopped at its {} after {} model call(s)]",
            end.stopped.replace('_', " "),
            end.turns
        );
        let text = if said.is_empty() {
            note
        } else {
            format!("{said}\n\n{note}")
        };
        (text, "length")
    }
}

/// `text` cut into pieces of about `max` bytes on character boundaries.
pub fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

/// `GET /v1/models`.
pub async fn models(State(app): State<Arc<App>>, req: Request) -> Response {
    if let Err(e) = authenticate(&app, req).await {
        return error_response(&e);
    }
    let data: Vec<Value> = app.settings.agent.iter().map(|_| model_json()).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn model(State(app): State<Arc<App>>, Path(id): Path<String>, req: Request) -> Response {
    if let Err(e) = authenticate(&app, req).await {
        return error_response(&e);
    }
    if id == MODEL_ID && app.settings.agent.is_some() {
        axum::Json(model_json()).into_response()
    } else {
        error_response(&RpcError::new(
            Kind::NotFound,
            format!(
                "no model {:?}: the one model is {MODEL_ID}",
                crate::rpc::shown(&id)
            ),
        ))
    }
}

fn model_json() -> Value {
    json!({"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "carapace"})
}

async fn authenticate(app: &Arc<App>, req: Request) -> Result<(Caller, HeaderMap, Body), RpcError> {
    let (parts, body) = req.into_parts();
    let ip = parts
        .extensions
        .get::<crate::server::Peer>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.0.ip());
    let caller = crate::server::authenticate(app, &parts.headers, None, false, ip).await?;
    app.take_rate(&caller)?;
    Ok((caller, parts.headers, body))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<Arc<App>>, req: Request) -> Response {
    match start(&app, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn start(app: &Arc<App>, req: Request) -> Result<Response, RpcError> {
    let (caller, headers, body) = authenticate(app, req).await?;
    let body = crate::server::json_body(app, body).await?;
    let chat = parse_request(&body)?;
    let session = session_of(&headers, &chat, &caller)?;
    let model = crate::schedule::KEY
        .scope(caller.token_id.clone(), Model::load(app))
        .await?;
    // Everything that can refuse the request does so before an answer starts.
    let guard = app.sessions.lock(&session).await;
    agent::claim_for(app, &caller, &session).await?;
    let run = {
        let (app, session, message) = (app.clone(), session.clone(), chat.message.clone());
        let key = caller.token_id.clone();
        let owner = crate::owner::of_caller(&caller);
        async move {
            // The run is spawned (it outlives a client that goes away), so it carries its own
            // broker turn and owner: its tools work in the token's own workspace.
            let r = crate::schedule::KEY
                .scope(
                    key,
                    crate::owner::scope(owner, async {
                        agent::store(
                            &app,
                            &session,
                            json!({"role": "user", "content": message}),
                            None,
                        )
                        .await?;
                        let system = model.system_prompt(None);
                        agent::converse(&app, &model, &session, system, &Emitter::none(), None)
                            .await
                    }),
                )
                .await;
            drop(guard);
            r
        }
    };
    let id = completion_id();
    let created = unix_now();
    if !chat.stream {
        // The run goes on when the client goes away: its answer is stored in the session.
        let end = tokio::spawn(run)
            .await
            .map_err(|e| RpcError::internal(format!("the run failed: {e}")))??;
        let (text, finish) = answer_of(&end);
        let mut r = axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": MODEL_ID,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": Value::Null,
            }],
            "usage": end.usage,
        }))
        .into_response();
        set_session_header(&mut r, &session);
        return Ok(r);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let include_usage = chat.include_usage;
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": Value::Null}],
            })
        };
        let _ = tx
            .send(event(&chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await;
        let run = tokio::spawn(run);
        tokio::pin!(run);
        let mut tick = tokio::time::interval(KEEP_ALIVE);
        tick.tick().await;
        let ended = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = tick.tick() => {
                    // A client that went away does not stop the run; nobody reads the comments.
                    let _ = tx.send(Bytes::from_static(b": keep-alive\n\n")).await;
                }
            }
        };
        let end = match ended {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => {
                let _ = tx.send(event(&error_json(&e))).await;
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            }
            Err(e) => {
                let e = RpcError::internal(format!("the run failed: {e}"));
                let _ = tx.send(event(&error_json(&e))).await;
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            }
        };
        let (text, finish) = answer_of(&end);
        for p in pieces(&text, CHUNK) {
            if tx
                .send(event(&chunk(json!({"content": p}), Value::Null)))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(event(&chunk(json!({}), json!(finish)))).await;
        if include_usage {
            let _ = tx
                .send(event(&json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": MODEL_ID, "choices": [], "usage": end.usage,
                })))
                .await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    set_session_header(&mut r, &session);
    Ok(r)
}

fn set_session_header(r: &mut Response, session: &str) {
    if let Ok(v) = HeaderValue::from_str(session) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
}

/// One server-sent event carrying `v`.
fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

#[cfg(test)]
mod tests;
