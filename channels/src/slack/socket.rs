//! Socket Mode: the connection loop. Each round asks `apps.connections.open` for a fresh
//! single-use URL, connects to it through the broker (`connect`, TLS for `wss://`), runs the
//! WebSocket handshake over that stream (tokio-tungstenite, no network of its own), then reads
//! frames: `hello`, envelopes (delivered, then acknowledged), `disconnect`. A silent connection
//! is pinged; one that stays silent is dropped. Any end of a connection is followed by a new
//! one, at once after a `disconnect` Slack announced as a refresh (`refresh_requested`,
//! `warning`), else with backoff (or after what a `ratelimited` answer asked).

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::{ack_frame, parse_frame, Api, Frame, Token};
use crate::adapter::{deliver, Backoff, Ctx, FailureKind, ServiceError};
use crate::broker::BrokerApi;
use crate::net::{self, Conn, NetError};
use crate::settings::shown;

/// Longest wait between connection attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait a `Retry-After` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Time to connect, TLS and the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence after which the adapter pings; the same again without a frame drops the connection.
const IDLE: Duration = Duration::from_secs(30);
/// Largest frame taken.
const MAX_MESSAGE: usize = 4 << 20;

/// A Socket Mode URL: `wss://host[:port]/path?query`, or `ws://` to a loopback host. Its
/// `Debug` leaves the path and query out (the ticket).
#[derive(Clone, PartialEq, Eq)]
pub struct SocketUrl {
    tls: bool,
    host: String,
    port: u16,
    url: String,
}

impl std::fmt::Debug for SocketUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

impl SocketUrl {
    /// Parse and check the URL `apps.connections.open` gave. Err: why (without the ticket).
    pub fn parse(url: &str) -> Result<SocketUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err("the socket URL is not wss://".into());
        };
        if url.len() > 2048 || !url.bytes().all(|b| b.is_ascii_graphic()) || url.contains('#') {
            return Err("the socket URL has characters a URL cannot have".into());
        }
        let (authority, _) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err("the socket URL carries credentials".into());
        }
        let default = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !authority.ends_with(']') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or("the socket URL's port is not a port")?,
            ),
            _ => (authority, default),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() || host.len() > 253 {
            return Err("the socket URL has no host".into());
        }
        if !tls && !net::is_loopback(&host) {
            return Err(format!(
                "the socket URL is plain ws:// to {}, which is not loopback",
                shown(&host)
            ));
        }
        Ok(SocketUrl {
            tls,
            host,
            port,
            url: url.to_string(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tls(&self) -> bool {
        self.tls
    }
}

/// How a connection ended.
enum Ended {
    /// Slack announced it: connect again at once.
    Refresh(String),
    /// A failure: connect again after a wait.
    Failed(ServiceError),
}

fn unreachable(what: impl Into<String>) -> ServiceError {
    ServiceError::new(FailureKind::Unreachable, what)
}

/// The inbound loop: connections, one after another, until the process ends.
pub(super) async fn run_socket<B: BrokerApi>(ctx: &Ctx<B>, api: &Api<B>, app: &Token) {
    let mut backoff = Backoff::new(MAX_BACKOFF);
    loop {
        let wait = match connection(ctx, api, app, &mut backoff).await {
            Ended::Refresh(reason) => {
                tracing::info!(channel = %ctx.channel, reason = %reason, "slack asked for a new connection");
                Duration::ZERO
            }
            Ended::Failed(e) => {
                let wait = e
                    .retry_after
                    .map(|d| d.min(MAX_RETRY_AFTER))
                    .unwrap_or_else(|| backoff.next_delay());
                tracing::warn!(channel = %ctx.channel, error = %e, retry_in_ms = wait.as_millis() as u64, "slack socket mode: connection ended");
                if e.kind != FailureKind::Throttled {
                    ctx.report(false, Some(e.message.clone())).await;
                }
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Open one connection and serve it until it ends.
async fn connection<B: BrokerApi>(
    ctx: &Ctx<B>,
    api: &Api<B>,
    app: &Token,
    backoff: &mut Backoff,
) -> Ended {
    let answer = match api.call(app, "apps.connections.open", &json!({})).await {
        Ok(a) => a,
        Err(e) => return Ended::Failed(e),
    };
    let url = match answer
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| "apps.connections.open answered ok without a url".to_string())
        .and_then(SocketUrl::parse)
    {
        Ok(u) => u,
        Err(why) => return Ended::Failed(unreachable(format!("apps.connections.open: {why}"))),
    };
    let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, open(&*api.broker, &url)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(why)) => return Ended::Failed(unreachable(why)),
        Err(_) => {
            return Ended::Failed(unreachable(format!(
                "connecting to {}:{}: no WebSocket within {} s",
                url.host(),
                url.port(),
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    };
    tracing::info!(channel = %ctx.channel, host = %url.host(), "slack socket mode: connected");
    let mut pinged = false;
    loop {
        let frame = match tokio::time::timeout(IDLE, ws.next()).await {
            Err(_) if pinged => {
                return Ended::Failed(unreachable(format!(
                    "slack socket mode: nothing heard for {} s",
                    2 * IDLE.as_secs()
                )))
            }
            Err(_) => {
                pinged = true;
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return Ended::Failed(unreachable(format!("slack socket mode: ping: {e}")));
                }
                continue;
            }
            Ok(None) => {
                return Ended::Failed(unreachable("slack socket mode: the connection ended"))
            }
            Ok(Some(Err(e))) => {
                return Ended::Failed(unreachable(format!("slack socket mode: {e}")))
            }
            Ok(Some(Ok(f))) => f,
        };
        pinged = false;
        let text = match frame {
            Message::Text(t) => t,
            Message::Close(c) => {
                return Ended::Failed(unreachable(format!(
                    "slack socket mode: closed by slack ({})",
                    c.map_or_else(|| "no reason".to_string(), |c| shown(&c.reason))
                )))
            }
            Message::Binary(b) => {
                tracing::warn!(channel = %ctx.channel, bytes = b.len(), "slack socket mode: a binary frame (ignored)");
                continue;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        match parse_frame(text.as_bytes()) {
            Ok(Frame::Hello) => {
                backoff.reset();
                ctx.report(true, None).await;
            }
            Ok(Frame::Envelope {
                envelope_id,
                kind,
                retry_attempt,
                message,
            }) => {
                match message {
                    Ok(msg) => {
                        // Err: refused for good and logged; acknowledged all the same, so
                        // Slack stops sending it.
                        let _ = deliver(ctx, &msg).await;
                    }
                    Err(why) => {
                        tracing::info!(channel = %ctx.channel, envelope = %kind, retry_attempt, why = %why, "slack envelope skipped");
                    }
                }
                if let Err(e) = ws.send(Message::text(ack_frame(&envelope_id))).await {
                    // Not acknowledged: Slack sends it again, and the broker drops the repeat.
                    return Ended::Failed(unreachable(format!(
                        "slack socket mode: acknowledging: {e}"
                    )));
                }
            }
            Ok(Frame::Disconnect { reason }) => {
                if reason == "link_disabled" {
                    return Ended::Failed(ServiceError::new(
                        FailureKind::Rejected,
                        "slack socket mode: link_disabled (Socket Mode is switched off for the app)",
                    ));
                }
                let _ = ws.close(None).await;
                // A refresh Slack planned: at once. Anything else (`too_many_websockets`, a
                // reason this adapter does not know): after the backoff, so a server that keeps
                // saying it is not answered with a storm of connections.
                if reason == "refresh_requested" || reason == "warning" {
                    return Ended::Refresh(reason);
                }
                return Ended::Failed(unreachable(format!(
                    "slack socket mode: disconnect ({reason})"
                )));
            }
            Err(why) => {
                tracing::error!(channel = %ctx.channel, error = %why, "slack socket mode: a malformed frame (ignored)");
            }
        }
    }
}

/// The WebSocket over a broker connection. Err: why, without the ticket.
async fn open<B: BrokerApi>(
    broker: &B,
    url: &SocketUrl,
) -> Result<tokio_tungstenite::WebSocketStream<Conn>, String> {
    let tcp = net::connect_tcp(broker, url.host(), url.port())
        .await
        .map_err(|e| e.to_string())?;
    let conn = if url.tls() {
        Conn::Tls(Box::new(
            net::start_tls(tcp, url.host())
                .await
                .map_err(|e: NetError| e.to_string())?,
        ))
    } else {
        Conn::Plain(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (ws, _) = tokio_tungstenite::client_async_with_config(url.url.as_str(), conn, Some(config))
        .await
        .map_err(|e| {
            format!(
                "the WebSocket handshake with {}:{}: {}",
                url.host(),
                url.port(),
                shown(&e.to_string().replace(&url.url, "<socket url>"))
            )
        })?;
    Ok(ws)
}
