//! The Discord adapter: the Gateway (v10, JSON over a WebSocket) in, the REST API out.
//!
//! Inbound ([`gateway`]): the Gateway over a broker `connect` (TLS inside the adapter for
//! `wss://`): Hello (op 10) gives the heartbeat interval; the adapter Identifies (op 2, intents
//! `GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT`) or, with a session it knows, Resumes
//! (op 6: token, session id, last sequence); heartbeats (op 1, carrying the last sequence) go out
//! on the interval (the first after a random fraction of it), and a heartbeat the Gateway did not
//! acknowledge (op 11) by the next one marks a zombie connection: it is dropped and resumed.
//! Reconnect (op 7) resumes at once; Invalid Session (op 9) resumes when `d` is true, else starts a
//! new session (Identify). Each `MESSAGE_CREATE` of a person (not a bot, not this bot, not a
//! webhook) in a guild channel or a direct message is delivered: sender = `author.id`, conversation
//! = reply_to = `channel_id`, id = `message:<message id>` (stable across resumes, so a replay is a
//! `duplicate`). The cursor (`<state_dir>/discord.cursor.json`: session id, resume URL, last
//! sequence, the bot's user id) is saved only after the broker took each event, so a restart
//! resumes the session and Discord replays what was not delivered. When Discord refuses the resume
//! (Invalid Session, `d: false`; close codes 4007, 4009) the session is gone and a new one starts:
//! what was posted between the drop and the new session's READY is not replayed by Discord and is
//! not delivered (the log says so).
//!
//! Outbound ([`rest`]): `POST /channels/{channel.id}/messages` with `Authorization: Bot <token>`,
//! split into pieces of at most 2000 characters; every piece carries a `nonce` derived from the
//! outbox id and the piece number with `enforce_nonce`, so a retried piece Discord already created
//! is answered with the existing message instead of a second one. The `X-RateLimit-*` headers of
//! each answer are kept per route (per channel); a route with no requests left waits for its
//! reset, a 429 waits its `retry_after` (the whole adapter when `global`), short waits inline and
//! long ones through the broker's retry. No mention in an answer pings anyone
//! (`allowed_mentions.parse = []`).
//!
//! The token is sent in the Identify and Resume payloads and the `Authorization` header. It lives
//! in a [`BotToken`] whose `Debug` shows nothing; error texts go through [`BotToken::scrub`].

pub mod gateway;
pub mod rest;

use std::sync::Arc;
use std::time::Duration;

use crate::adapter::{run_inbound, run_outbound, Ctx, RunError};
use crate::broker::{BrokerApi, Secret};
use crate::cursor::CursorStore;
use crate::net::{NetError, ServiceUrl};
use crate::settings::DiscordSettings;

/// Longest message Discord takes. Counted here in UTF-16 units, never fewer than Discord's count
/// of characters.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// Why the adapter cannot use what it was given.
#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("the bot token secret is not a Discord bot token (three dot-separated parts, as the Developer Portal's Bot page gives it)")]
    BadToken,
    #[error("api_base: {0}")]
    Api(#[source] NetError),
    #[error("gateway_url: {0}")]
    Gateway(#[source] NetError),
}

/// The bot token. Its `Debug` shows nothing of it.
pub struct BotToken(String);

impl BotToken {
    /// From the secret's bytes (surrounding whitespace and a leading `Bot ` ignored).
    pub fn new(secret: &[u8]) -> Result<BotToken, DiscordError> {
        let text = std::str::from_utf8(secret)
            .map_err(|_| DiscordError::BadToken)?
            .trim();
        let text = text.strip_prefix("Bot ").unwrap_or(text).trim();
        let parts: Vec<&str> = text.split('.').collect();
        let ok = (30..=200).contains(&text.len())
            && parts.len() == 3
            && parts.iter().all(|p| !p.is_empty())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(DiscordError::BadToken);
        }
        Ok(BotToken(text.to_string()))
    }

    /// `text` with the token replaced by `<token>`.
    pub fn scrub(&self, text: &str) -> String {
        text.replace(&self.0, "<token>")
    }

    /// The token itself, for a payload or header.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BotToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BotToken(..)")
    }
}

/// A Gateway URL: `wss://host[:port][/path]`, or `ws://` to a loopback host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    service: ServiceUrl,
}

impl GatewayUrl {
    /// Parse and check a Gateway URL (a query, as Discord's own URLs may carry, is dropped: the
    /// adapter sets `v=10&encoding=json` itself).
    pub fn parse(url: &str) -> Result<GatewayUrl, NetError> {
        let base = url.split(['?', '#']).next().unwrap_or("");
        let as_http = if let Some(rest) = base.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = base.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            return Err(NetError::BadUrl {
                url: crate::settings::shown(url),
                why: "not a wss:// (or ws:// to a loopback host) URL".into(),
            });
        };
        Ok(GatewayUrl {
            service: ServiceUrl::parse(&as_http)?,
        })
    }

    /// Where to connect (host, port, TLS or not).
    pub fn service(&self) -> &ServiceUrl {
        &self.service
    }

    /// The URL the WebSocket handshake asks for, with the version and encoding.
    pub fn request_url(&self) -> String {
        let scheme = if self.service.https() { "wss" } else { "ws" };
        format!(
            "{scheme}://{}{}/?v=10&encoding=json",
            self.service.host_header(),
            self.service.path()
        )
    }
}

/// Run the Discord adapter: read the token, then the Gateway and REST loops.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: DiscordSettings) -> Result<(), RunError> {
    let api =
        ServiceUrl::parse(&s.api_base).map_err(|e| ctx.fail("discord", DiscordError::Api(e)))?;
    let gateway = GatewayUrl::parse(&s.gateway_url)
        .map_err(|e| ctx.fail("discord", DiscordError::Gateway(e)))?;
    let secret: Secret = ctx.secret(&s.token_secret).await?;
    let token = Arc::new(BotToken::new(secret.expose()).map_err(|e| ctx.fail("discord", e))?);
    drop(secret);
    let mut source = gateway::Gateway::new(ctx.broker.clone(), gateway, token.clone());
    let sender = rest::Rest::new(ctx.broker.clone(), api, token);
    let store = CursorStore::new(&ctx.state_dir, "discord");
    tokio::join!(
        run_inbound(&ctx, &mut source, &store),
        run_outbound(&ctx, &sender)
    );
    Ok(())
}

/// A random duration in `[0, max)` (a heartbeat's first jitter, the wait after an Invalid
/// Session); `max / 2` when the system has no randomness to give.
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 4];
    let frac = match getrandom::fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    };
    max.mul_f64(frac)
}

/// The fuzz entry point for the Discord parsers (`fuzz/fuzz_targets/discord.rs`, corpus
/// replayed by `channels/tests/fuzz_corpus.rs`): a Gateway frame, a REST answer and its
/// rate-limit headers, a Gateway URL. Nothing may panic; what decodes holds its invariants.
pub fn fuzz_discord_input(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match gateway::parse_frame(&text) {
        Ok(gateway::Frame::Hello { heartbeat_interval }) => {
            assert!(heartbeat_interval >= gateway::MIN_HEARTBEAT);
            assert!(heartbeat_interval <= gateway::MAX_HEARTBEAT);
        }
        Ok(gateway::Frame::Dispatch { event, .. }) => match event {
            gateway::Event::Message(m) => {
                for id in [&m.id, &m.channel_id, &m.author_id] {
                    assert!(gateway::is_snowflake(id));
                }
                if let Ok(inbound) = gateway::inbound_of(&m, Some("1")) {
                    assert_eq!(inbound.id, format!("message:{}", m.id));
                    assert_eq!(inbound.conversation, inbound.reply_to);
                    assert!(!inbound.text.is_empty());
                }
            }
            gateway::Event::Ready(r) => {
                assert!(!r.session_id.is_empty() && gateway::is_snowflake(&r.user_id));
            }
            _ => {}
        },
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    for status in [200, 400, 429, 502] {
        let r = rest::classify(status, &hyper::HeaderMap::new(), data);
        if let Err(e) = r {
            assert!(!e.message.is_empty());
            assert_eq!(
                e.kind == crate::adapter::FailureKind::Throttled,
                status == 429
            );
        } else {
            assert_eq!(status, 200);
        }
    }
    let mut headers = hyper::HeaderMap::new();
    for line in text.lines().take(8) {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.trim().as_bytes()),
                hyper::header::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    let limit = rest::RateHeaders::of(&headers);
    if let Some(d) = limit.reset_after {
        assert!(d <= rest::MAX_RESET);
    }
    if let Ok(u) = GatewayUrl::parse(&text) {
        assert!(u.request_url().ends_with("/?v=10&encoding=json"));
    }
}

#[cfg(test)]
mod tests;
