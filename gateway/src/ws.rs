//! One WebSocket connection: JSON-RPC requests in, responses and events out.
//!
//! Each request runs in a task of its own (at most `max_in_flight` at once; more are answered
//! `busy`), so a long `agent.run` or an `ask` waiting for an operator does not hold up the
//! connection's other calls. Everything sent goes through one bounded queue to a writer task;
//! a client that stops reading fills it, and a write that stalls for [`WRITE_STALL`] ends the
//! connection. A connection with no traffic (not even a pong to our pings) for the idle
//! timeout is closed. Operator connections also get the `approval.*` events.
//!
//! The token is checked again while the connection is open: before every call and every
//! [`RECHECK_EVERY`] (so an idle connection that only receives events is cut too), through the
//! gateway's token-check cache ([`crate::auth::AuthCache`]: the broker is asked at most once a
//! second per token). When the broker no longer knows the token, the call gets `unauthorized`
//! and the connection is closed with code 1008 ("token revoked"), within about a second of
//! the revocation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::app::{approval_json, App, Emitter};
use crate::auth::Caller;
use crate::methods::dispatch;
use crate::rpc::{self, Kind, RpcError};
use crate::server::check_token;

/// Frames queued for the writer.
const OUT_QUEUE: usize = 1024;
/// A write that cannot complete for this long ends the connection.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// We ping this often (a client's pong counts as traffic).
const PING_EVERY: Duration = Duration::from_secs(30);
/// An open connection's token is looked at this often (a cache lookup; the broker is asked
/// when the last check is [`crate::auth::AUTH_REUSE`] old): a revocation is felt within
/// `AUTH_REUSE` + this.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// Close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Ask the writer to send what is queued, then a close frame.
type CloseRequest = Option<(u16, &'static str)>;

/// Serve one upgraded connection until it ends.
/// `token_hash`: the SHA-256 of the caller's token, checked again while the connection lives.
pub async fn session(
    socket: WebSocket,
    app: Arc<App>,
    caller: Caller,
    token_hash: String,
    peer: SocketAddr,
) {
    tracing::debug!(%peer, token = %caller.token_id, "websocket open");
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Value>(OUT_QUEUE);
    let (close_tx, mut close_rx) = watch::channel::<CloseRequest>(None);

    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        // Whether the connection may still be written to (a stalled or failed write ends it).
        let mut writable = true;
        loop {
            let msg = tokio::select! {
                biased;
                out = rx.recv() => match out {
                    Some(v) => Message::Text(v.to_string().into()),
                    None => break,
                },
                _ = close_rx.changed() => break,
                _ = ping.tick() => Message::Ping(Vec::new().into()),
            };
            match tokio::time::timeout(WRITE_STALL, sink.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    writable = false;
                    break;
                }
                Err(_) => {
                    tracing::info!("websocket client stopped reading: closed");
                    writable = false;
                    break;
                }
            }
        }
        if writable {
            // Frames queued before the close was asked for go first, then the close frame
            // (with the reader's code when it asked for one).
            while let Ok(v) = rx.try_recv() {
                let msg = Message::Text(v.to_string().into());
                if !matches!(
                    tokio::time::timeout(WRITE_STALL, sink.send(msg)).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
            }
            let req = *close_rx.borrow();
            let frame = req.map(|(code, reason)| CloseFrame {
                code,
                reason: reason.into(),
            });
            let _ = tokio::time::timeout(WRITE_STALL, sink.send(Message::Close(frame))).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    });

    // What channels deliver: to every connection when a client is the one that answers them
    // (no agent of the gateway's own does); when the gateway's agent answers channels, each
    // message belongs to its conversation, which no client token owns: operators only.
    let inbound = (caller.is_operator() || !app.agent_answers_channels()).then(|| {
        let mut sub = app.inbound.subscribe();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(ev) => {
                        if tx2.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "a slow connection missed messages.inbound events"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    });

    // Operator connections: the pending approvals now, then what changes.
    let feed = if caller.is_operator() {
        let mut sub = app.approvals.subscribe();
        let app2 = app.clone();
        let tx2 = tx.clone();
        Some(tokio::spawn(async move {
            if let Ok(pending) = app2.broker.approvals().await {
                for p in &pending {
                    let ev = rpc::event("approval.requested", approval_json(p));
                    if tx2.send(ev).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                match sub.recv().await {
                    Ok(ev) => {
                        if tx2.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }))
    } else {
        None
    };

    // The token, looked at again on a timer; `revoked` is told when the broker refuses it.
    let revoked = Arc::new(Notify::new());
    let recheck = {
        let (app, hash, revoked) = (app.clone(), token_hash.clone(), revoked.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RECHECK_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(e) = check_token(&app, &hash).await {
                    if e.kind == Kind::Unauthorized {
                        revoked.notify_one();
                        return;
                    }
                }
            }
        })
    };

    let idle = app.settings.clients.idle_timeout();
    let max_in_flight = app.settings.clients.max_in_flight;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut calls: JoinSet<()> = JoinSet::new();
    loop {
        // Reap finished calls.
        while calls.try_join_next().is_some() {}
        let next = tokio::select! {
            n = tokio::time::timeout(idle, stream.next()) => n,
            () = tx.closed() => break,
            () = revoked.notified() => {
                tracing::info!(%peer, token = %caller.token_id, "the token of an open websocket was revoked: closed");
                let _ = close_tx.send(Some((CLOSE_POLICY, "token revoked")));
                break;
            }
        };
        let msg = match next {
            Err(_) => {
                let _ = close_tx.send(Some((CLOSE_GOING_AWAY, "idle")));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let text = e.to_string();
                let too_big = text.contains("too long")
                    || text.contains("too big")
                    || text.contains("Space limit");
                if too_big {
                    let err = RpcError::new(
                        Kind::TooLarge,
                        format!(
                            "message over {} bytes",
                            app.settings.clients.max_message_bytes
                        ),
                    );
                    let _ = tx.send(rpc::response(&Value::Null, Err(err))).await;
                    let _ = close_tx.send(Some((CLOSE_TOO_BIG, "message too big")));
                } else {
                    tracing::debug!(%peer, error = %text, "websocket read failed");
                }
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                let err = RpcError::new(
                    Kind::InvalidRequest,
                    "binary messages are not accepted: send JSON text",
                );
                let _ = tx.send(rpc::response(&Value::Null, Err(err))).await;
                let _ = close_tx.send(Some((CLOSE_UNSUPPORTED, "text only")));
                break;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => break,
        };
        let call = match rpc::decode(text.as_str()) {
            Ok(c) => c,
            Err((id, e)) => {
                if tx.send(rpc::response(&id, Err(e))).await.is_err() {
                    break;
                }
                continue;
            }
        };
        if in_flight.load(Ordering::SeqCst) >= max_in_flight {
            let err = RpcError::new(
                Kind::Busy,
                format!("{max_in_flight} calls are already running on this connection"),
            );
            if tx.send(rpc::response(&call.id, Err(err))).await.is_err() {
                break;
            }
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let (app, caller, tx, in_flight) =
            (app.clone(), caller.clone(), tx.clone(), in_flight.clone());
        let (hash, revoked) = (token_hash.clone(), revoked.clone());
        calls.spawn(async move {
            let id = call.id.clone();
            if let Err(e) = check_token(&app, &hash).await {
                let e = if e.kind == Kind::Unauthorized {
                    revoked.notify_one();
                    RpcError::new(
                        Kind::Unauthorized,
                        "this connection's token was revoked: the connection is closed",
                    )
                } else {
                    e
                };
                let _ = tx.send(rpc::response(&id, Err(e))).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            // Events and the response share the queue: a call's events come before its response.
            let emitter = Emitter::new(id.clone(), Some(tx.clone()));
            let result = dispatch(&app, &caller, call, &emitter).await;
            drop(emitter);
            let _ = tx.send(rpc::response(&id, result)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // The client is gone (or was closed): its calls end with it.
    calls.abort_all();
    recheck.abort();
    if let Some(f) = feed {
        f.abort();
    }
    if let Some(inbound) = inbound {
        inbound.abort();
    }
    drop(tx);
    // The writer sends what is queued (and a requested close frame), then ends.
    drop(close_tx);
    let _ = writer.await;
    tracing::debug!(%peer, "websocket closed");
}
