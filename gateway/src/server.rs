//! The gateway's HTTP and WebSocket server, on the listening socket the supervisor handed over.
//!
//! hyper's HTTP/1.1 server is driven directly (not `axum::serve`) for what a server facing
//! untrusted clients needs: a timeout on the request head (slowloris), a cap on its size, a cap
//! on connections at once, and the peer address of each request (for the failed-authentication
//! limit). Routes are an axum `Router`; WebSocket sessions live in [`crate::ws`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::app::{App, Emitter};
use crate::auth::{self, Caller};
use crate::methods::dispatch;
use crate::rpc::{self, Call, Kind, RpcError};

/// Time a client has to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers.
const MAX_HEAD: usize = 16 * 1024;

/// The peer of a connection, put into each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Serve `listener` until `shutdown` completes.
pub async fn serve(
    listener: std::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let router = router(app.clone());
    let slots = Arc::new(Semaphore::new(app.settings.clients.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "too many connections: closed at once");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(addr));
                    let mut r = router.clone();
                    async move { tower::Service::call(&mut r, req).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ws", get(websocket))
        .route("/rpc", post(rpc_over_http))
        .route("/v1/status", get(rest_status))
        .route("/v1/tools/exec", post(rest_exec))
        .route("/v1/messages/send", post(rest_send))
        .route("/v1/approvals", get(rest_approvals))
        .route("/v1/approvals/{id}", post(rest_resolve))
        .route("/v1/held", get(rest_held))
        .route("/v1/held/{id}", delete(rest_drop_held))
        .route("/v1/held/{id}/admit", post(rest_admit))
        .route("/v1/sessions", get(rest_sessions))
        .route("/v1/sessions/{name}", get(rest_history).delete(rest_reset))
        .route("/v1/archive", get(rest_archived))
        .route("/v1/archive/{id}", get(rest_archive))
        .route("/v1/archive/{id}/restore", post(rest_restore))
        .route("/v1/agent/run", post(rest_agent))
        .merge(crate::console::routes())
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/models/{id}", get(crate::openai::model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// An error as a REST answer: `{"error":{...}}` with the status of its kind.
pub fn error_response(e: &RpcError) -> Response {
    let status =
        StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(json!({"error": e.to_json()}))).into_response();
    if e.kind == Kind::Unauthorized {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn health() -> Response {
    axum::Json(json!({"ok": true})).into_response()
}

async fn not_found() -> Response {
    error_response(&RpcError::new(Kind::NotFound, "no such endpoint"))
}

async fn method_not_allowed() -> Response {
    let mut r = error_response(&RpcError::new(
        Kind::InvalidRequest,
        "method not allowed on this endpoint",
    ));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

fn peer_ip(peer: Option<&Peer>) -> IpAddr {
    peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip())
}

/// Who is calling, from the bearer token (or, for WebSocket upgrades, a
/// `carapace.bearer.TOKEN` subprotocol or `?access_token=`).
pub async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
    allow_query: bool,
    ip: IpAddr,
) -> Result<Caller, RpcError> {
    authenticate_hashed(app, headers, query, allow_query, ip)
        .await
        .map(|(c, _)| c)
}

/// [`authenticate`], with the token's hash (what a WebSocket re-checks). `allow_query`: a
/// WebSocket upgrade, which may also carry the token in its subprotocols or its query.
async fn authenticate_hashed(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
    allow_query: bool,
    ip: IpAddr,
) -> Result<(Caller, String), RpcError> {
    app.auth_failures.check(ip)?;
    let token = auth::bearer(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )
    .or_else(|| {
        if allow_query {
            auth::protocol_token(
                headers
                    .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )
            .or_else(|| auth::query_token(query))
        } else {
            None
        }
    });
    let Some(token) = token else {
        return Err(RpcError::new(
            Kind::Unauthorized,
            "a bearer token is required (Authorization: Bearer TOKEN); create one with `carapace token create`",
        ));
    };
    let hash = auth::token_hash(&token);
    match check_token(app, &hash).await {
        Ok(c) => Ok((c, hash)),
        Err(e) if e.kind == Kind::Unauthorized => {
            app.auth_failures.record_failure(ip);
            tracing::info!(peer = %ip, "refused an unknown or revoked token");
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Who holds the token of SHA-256 `hash`: a check at most [`auth::AUTH_REUSE`] old, or the
/// broker's answer now (one question per token at a time; concurrent callers share it).
/// `unauthorized` when the broker does not know the token (any more).
pub async fn check_token(app: &App, hash: &str) -> Result<Caller, RpcError> {
    if let Some(c) = app.auth_cache.get(hash, std::time::Instant::now()) {
        return Ok(c);
    }
    let flight = app.auth_cache.flight(hash);
    let r = {
        let _one = flight.lock().await;
        match app.auth_cache.get(hash, std::time::Instant::now()) {
            Some(c) => Ok(c),
            None => ask_broker(app, hash).await,
        }
    };
    app.auth_cache.land(hash, flight);
    r
}

async fn ask_broker(app: &App, hash: &str) -> Result<Caller, RpcError> {
    // Whose turn at the broker: the token's (its id is not known yet).
    let key = format!("auth:{}", hash.get(..16).unwrap_or(hash));
    match crate::schedule::KEY
        .scope(key, app.broker.auth(hash.to_string()))
        .await
    {
        Ok((info, asked)) => {
            let c = Caller::from(info);
            app.auth_cache.put(hash, c.clone(), asked);
            Ok(c)
        }
        Err(e) if e.kind == Kind::Denied => {
            app.auth_cache.forget(hash);
            Err(RpcError::new(
                Kind::Unauthorized,
                "unknown or revoked token",
            ))
        }
        Err(e) if e.kind == Kind::Busy => Err(e),
        Err(e) => Err(RpcError::new(
            Kind::Unavailable,
            format!("tokens cannot be checked now: {}", e.message),
        )),
    }
}

/// Authenticate a plain HTTP request; its body on success.
async fn caller_of(app: &App, req: Request) -> Result<(Caller, Body), Response> {
    let (parts, body) = req.into_parts();
    let ip = peer_ip(parts.extensions.get::<Peer>());
    let caller = authenticate(app, &parts.headers, None, false, ip)
        .await
        .map_err(|e| error_response(&e))?;
    Ok((caller, body))
}

/// The body of a request as JSON (`{}` when empty), within the size cap.
pub(crate) async fn json_body(app: &App, body: Body) -> Result<Value, RpcError> {
    let limit = app.settings.clients.max_message_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        RpcError::new(
            Kind::TooLarge,
            format!("the body is over {limit} bytes (or could not be read)"),
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| RpcError::new(Kind::ParseError, format!("the body is not JSON: {e}")))
}

/// `POST /rpc`: one JSON-RPC request; its JSON-RPC response (200 also for method errors).
async fn rpc_over_http(State(app): State<Arc<App>>, req: Request) -> Response {
    let (caller, body) = match caller_of(&app, req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let v = match json_body(&app, body).await {
        Ok(v) => v,
        Err(e) if e.kind == Kind::TooLarge => return error_response(&e),
        Err(e) => return axum::Json(rpc::response(&Value::Null, Err(e))).into_response(),
    };
    let call = match rpc::decode_value(v) {
        Ok(c) => c,
        Err((id, e)) => return axum::Json(rpc::response(&id, Err(e))).into_response(),
    };
    let id = call.id.clone();
    let result = dispatch(&app, &caller, call, &Emitter::none()).await;
    axum::Json(rpc::response(&id, result)).into_response()
}

/// Where a REST route's params come from.
#[derive(Debug)]
enum Params {
    /// Fixed by the route (path parts, or none).
    Fixed(Value),
    /// The JSON body.
    Body,
    /// The JSON body, with one key set from the path.
    BodyWith(&'static str, Value),
}

/// A REST route: authenticate, run `method` with its params, answer its result or its error.
async fn rest(app: Arc<App>, req: Request, method: &str, params: Params) -> Response {
    let (caller, body) = match caller_of(&app, req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let params = match params {
        Params::Fixed(p) => p,
        Params::Body | Params::BodyWith(..) => {
            let mut p = match json_body(&app, body).await {
                Ok(p) => p,
                Err(e) => return error_response(&e),
            };
            if let (Params::BodyWith(key, v), Some(o)) = (params, p.as_object_mut()) {
                o.insert(key.to_string(), v);
            }
            p
        }
    };
    let call = Call {
        id: Value::Null,
        method: method.to_string(),
        params,
    };
    match dispatch(&app, &caller, call, &Emitter::none()).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn rest_status(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "gateway.status", Params::Fixed(json!({}))).await
}
async fn rest_exec(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "tools.exec", Params::Body).await
}
async fn rest_send(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "messages.send", Params::Body).await
}
async fn rest_approvals(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "approvals.list", Params::Fixed(json!({}))).await
}
/// `POST /v1/approvals/{id}` with `{"resolution": ..}`.
async fn rest_resolve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error_response(&RpcError::invalid_params("the approval id is a number"));
    };
    rest(
        app,
        req,
        "approvals.resolve",
        Params::BodyWith("id", id.into()),
    )
    .await
}
async fn rest_held(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "held.list", Params::Fixed(json!({}))).await
}
/// `POST /v1/held/{id}/admit` with `{"always": bool}` (or no body).
async fn rest_admit(State(app): State<Arc<App>>, Path(id): Path<String>, req: Request) -> Response {
    rest(app, req, "held.admit", Params::BodyWith("id", id.into())).await
}
async fn rest_drop_held(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    rest(app, req, "held.drop", Params::Fixed(json!({"id": id}))).await
}
async fn rest_sessions(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "sessions.list", Params::Fixed(json!({}))).await
}
async fn rest_history(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let params = Params::Fixed(json!({"session": name}));
    rest(app, req, "sessions.history", params).await
}
async fn rest_reset(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let params = Params::Fixed(json!({"session": name}));
    rest(app, req, "sessions.reset", params).await
}
async fn rest_archived(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "sessions.archived", Params::Fixed(json!({}))).await
}
async fn rest_archive(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let params = Params::Fixed(json!({"archive": id}));
    rest(app, req, "sessions.archived", params).await
}
async fn rest_restore(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let params = Params::Fixed(json!({"archive": id}));
    rest(app, req, "sessions.restore", params).await
}
async fn rest_agent(State(app): State<Arc<App>>, req: Request) -> Response {
    rest(app, req, "agent.run", Params::Body).await
}

/// `GET /ws`: authenticate the upgrade, then hand the socket to a session.
async fn websocket(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (caller, hash) =
        match authenticate_hashed(&app, &headers, query.as_deref(), true, peer.0.ip()).await {
            Ok(c) => c,
            Err(e) => return error_response(&e),
        };
    let max = app.settings.clients.max_message_bytes;
    // A browser that offered subprotocols fails the connection unless one is selected.
    ws.protocols([auth::WS_PROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::ws::session(socket, app, caller, hash, peer.0))
}
