//! The IRC adapter: one client connection (TLS, or plain to a loopback server), SASL PLAIN when
//! a password secret is named (no NickServ), the configured channels joined.
//!
//! | module | room |
//! |---|---|
//! | [`proto`] | the line parser (RFC 1459/2812 + IRCv3 tags), case mapping, splitting (pure; fuzzed) |
//!
//! Inbound: a `PRIVMSG` to the bot (a private message) or, in a joined channel, one addressed to
//! it (`bot: text`, or every message with `channel_messages = "all"`), delivered with sender =
//! the nick (lowercased, IRC case mapping) — or, with `identity = "account"`, the account name
//! the server tags the message with (`account-tag`; a sender without an account is
//! `unidentified:<nick>`, which no policy entry matches by accident); conversation = reply_to =
//! the channel, or the nick of a private message. The id is the server's `msgid` when it tags
//! messages (a bouncer's replay then is a `duplicate`), else one made from the server time, or
//! else from the connection's start and a counter (IRC never sends a message twice, so these are
//! unique). The cursor is the server time of the last message delivered: with `server-time`,
//! messages at or before it (a bouncer's playback) are skipped after a restart. What is said
//! while the adapter is not connected is lost: IRC keeps no history.
//!
//! Outbound: `PRIVMSG recipient :piece`, one piece per line of the answer, a long line cut so the
//! line the server relays (`:nick!user@host PRIVMSG target :piece` CR LF) fits 512 bytes. After
//! each piece a `PING` with a fresh token: its `PONG` confirms the server processed the piece,
//! an error numeric before it (401 no such nick, 404 cannot send to channel, ...) refuses the
//! message, `263` (try again) or a flood `ERROR` is a rate limit (IRC says no duration: the
//! adapter pauses [`THROTTLE_WAIT`]). A retry resumes at the first piece not confirmed. IRC has
//! no idempotency: a piece whose confirmation was lost with the connection is sent again. Lines
//! are paced (a burst of [`BURST`], then one per [`PACE`]).
//!
//! The connection is kept alive with `PING` when the server is quiet and answers the server's
//! `PING`; after any drop it is opened again with backoff (1 s doubling to 60 s).

pub mod proto;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use carapace_broker::protocol::OutboundMessage;
use carapace_broker::sync::lock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::adapter::{
    deliver, run_outbound, Backoff, Ctx, FailureKind, Outlet, RunError, ServiceError,
};
use crate::broker::{BrokerApi, Inbound, Secret};
use crate::cursor::CursorStore;
use crate::email::stream::BoxStream;
use crate::email::{BrokerDial, Dial};
use crate::settings::{IrcSettings, Security};
use proto::{irc_lowercase, is_channel, is_word, parse_line, split_text, Message};

/// Lines sent at once before pacing starts.
pub const BURST: u32 = 4;
/// Time between lines after the burst.
pub const PACE: Duration = Duration::from_millis(500);
/// A quiet server is sent a `PING` after this long.
const IDLE_PING: Duration = Duration::from_secs(90);
/// ... and the connection is dropped when nothing came back this long after it.
const PING_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for registration (CAP, SASL, NICK/USER up to the welcome).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a sent message's confirmation (the `PONG` after it).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a rate-limited send waits (IRC servers say no duration).
pub const THROTTLE_WAIT: Duration = Duration::from_secs(10);
/// The longest wait between reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Host length assumed for our own prefix until the server shows it (RFC 2812's 63).
const ASSUMED_HOST: usize = 63;
/// Messages received and not yet handed to the broker.
const QUEUE: usize = 256;
/// The cursor's name in the state directory.
pub const CURSOR_NAME: &str = "irc";

/// Why the adapter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum IrcError {
    #[error("server = {value:?}: expected HOST:PORT")]
    Address { value: String },
    #[error("the SASL password secret is not UTF-8 text, or is empty")]
    Password,
    #[error("security = \"starttls\": IRC has no STARTTLS here; use \"tls\" (or \"plain\" to a loopback server)")]
    Starttls,
}

/// Who a message is from, as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// The nick (only as trustworthy as the network's nick protection).
    Nick,
    /// The services account the server tags the message with (`account-tag`).
    Account,
}

/// Which messages in a joined channel are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelMessages {
    /// Only those addressed to the bot (`nick: text` or `nick, text`), the address removed.
    Mentions,
    /// Every message.
    All,
}

/// What a connection needs.
#[derive(Clone)]
pub struct IrcConfig {
    pub host: String,
    pub port: u16,
    /// TLS (else plain, loopback only: the settings check it).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub nick: String,
    pub user: String,
    pub realname: String,
    pub channels: Vec<String>,
    /// The SASL PLAIN account and password.
    pub sasl: Option<(String, Arc<Secret>)>,
    pub identity: Identity,
    pub channel_messages: ChannelMessages,
}

impl std::fmt::Debug for IrcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrcConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("nick", &self.nick)
            .field("channels", &self.channels)
            .field("sasl", &self.sasl.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// The SASL PLAIN response (`authzid NUL authcid NUL password`, base64), cut into the 400-byte
/// `AUTHENTICATE` chunks the IRCv3 SASL spec asks for (a `+` after a chunk of exactly 400).
pub fn sasl_plain_chunks(user: &str, password: &[u8]) -> Vec<String> {
    let mut raw = Vec::with_capacity(user.len() * 2 + password.len() + 2);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    raw.fill(0);
    let mut out: Vec<String> = b64
        .as_bytes()
        .chunks(400)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    if b64.len() % 400 == 0 {
        out.push("+".into());
    }
    out
}

/// The inbound message a `PRIVMSG` is, or why it is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Deliver(Inbound),
    Skip(&'static str),
}

/// Turn a parsed `PRIVMSG` into what is delivered. `own_nick`: the nick we have now; `seq`: a
/// fallback id when the server gives neither `msgid` nor `time`.
pub fn inbound_of(
    m: &Message,
    own_nick: &str,
    identity: Identity,
    channel_messages: ChannelMessages,
    fallback_id: impl FnOnce() -> String,
) -> Received {
    let Some(nick) = m.nick().filter(|n| is_word(n)) else {
        return Received::Skip("no sender nick");
    };
    if m.params.len() != 2 {
        return Received::Skip("not PRIVMSG target :text");
    }
    let (target, mut text) = (m.param(0), m.param(1).to_string());
    if irc_lowercase(nick) == irc_lowercase(own_nick) {
        return Received::Skip("our own message");
    }
    if let Some(ctcp) = text.strip_prefix('\u{1}') {
        let ctcp = ctcp.strip_suffix('\u{1}').unwrap_or(ctcp);
        match ctcp.strip_prefix("ACTION ") {
            Some(action) => text = format!("/me {action}"),
            None => return Received::Skip("a CTCP request"),
        }
    }
    let nick_l = irc_lowercase(nick);
    let (conversation, reply_to) = if is_channel(target) {
        if !is_word(target) {
            return Received::Skip("a malformed channel name");
        }
        if channel_messages == ChannelMessages::Mentions {
            let Some(rest) = addressed_to(&text, own_nick) else {
                return Received::Skip("a channel message not addressed to the bot");
            };
            text = rest;
        }
        let c = irc_lowercase(target);
        (c.clone(), c)
    } else {
        (nick_l.clone(), nick.to_string())
    };
    if text.trim().is_empty() {
        return Received::Skip("an empty message");
    }
    let sender = match identity {
        Identity::Nick => nick_l,
        Identity::Account => match m.tag("account").filter(|a| *a != "*" && is_word(a)) {
            Some(a) => irc_lowercase(a),
            None => format!("unidentified:{nick_l}"),
        },
    };
    let id = match (m.tag("msgid"), m.tag("time")) {
        (Some(id), _) if !id.is_empty() && id.len() <= 128 && is_word(id) => format!("msgid:{id}"),
        (_, Some(t)) if is_word(t) => {
            let mut h = Sha256::new();
            for part in [nick, target, &text] {
                h.update(part.as_bytes());
                h.update([0]);
            }
            format!("time:{t}:{}", hex::encode(&h.finalize()[..8]))
        }
        _ => fallback_id(),
    };
    Received::Deliver(Inbound {
        id,
        sender,
        conversation,
        reply_to,
        text,
    })
}

/// The text after `nick:` or `nick,` (case-insensitive), if the message starts so.
fn addressed_to(text: &str, nick: &str) -> Option<String> {
    let head = text.get(..nick.len())?;
    if irc_lowercase(head) != irc_lowercase(nick) {
        return None;
    }
    let rest = text[nick.len()..].strip_prefix([':', ','])?;
    Some(rest.trim_start().to_string())
}

/// How a server's reply bears on a message being confirmed.
fn send_failure(m: &Message) -> Option<ServiceError> {
    let what = |kind| {
        let mut e = ServiceError::new(
            kind,
            format!(
                "the IRC server answered {} {}: {}",
                m.command,
                crate::settings::shown(m.param(1)),
                crate::settings::shown(m.params.last().map_or("", String::as_str))
            ),
        );
        if kind == FailureKind::Throttled {
            e.retry_after = Some(THROTTLE_WAIT);
        }
        e
    };
    match m.command.as_str() {
        // no such nick/channel, cannot send to channel, too many targets, no recipient, no
        // text, was no such nick
        "401" | "403" | "404" | "407" | "411" | "412" | "406" => Some(what(FailureKind::Rejected)),
        // RPL_TRYAGAIN: the server asks to slow down
        "263" => Some(what(FailureKind::Throttled)),
        _ => None,
    }
}

/// A line reader with a cap, safe to cancel between reads (everything read stays in `buf`).
struct Lines {
    r: ReadHalf<BoxStream>,
    buf: Vec<u8>,
    /// Dropping the rest of a line that was too long.
    skipping: bool,
}

/// What [`Lines::next`] gives.
enum Line {
    Text(String),
    TooLong,
    Eof,
}

impl Lines {
    const CAP: usize = proto::MAX_TAGS + proto::MAX_LINE;

    async fn next(&mut self) -> std::io::Result<Line> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if std::mem::take(&mut self.skipping) {
                    return Ok(Line::TooLong);
                }
                // IRC has no one encoding: text that is not UTF-8 is shown with replacements.
                return Ok(Line::Text(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buf.len() > Self::CAP {
                self.buf.clear();
                self.skipping = true;
            }
            let mut chunk = [0u8; 4096];
            let n = self.r.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Line::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The sending half, paced.
struct Writer {
    w: WriteHalf<BoxStream>,
    tokens: u32,
    last: Instant,
}

impl Writer {
    async fn line(&mut self, line: &str) -> std::io::Result<()> {
        if line.contains(['\r', '\n', '\0']) || line.len() + 2 > proto::MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an IRC line that cannot be sent",
            ));
        }
        let earned = (self.last.elapsed().as_millis() / PACE.as_millis()) as u32;
        self.tokens = (self.tokens + earned).min(BURST);
        if self.tokens == 0 {
            tokio::time::sleep(PACE.saturating_sub(self.last.elapsed())).await;
            self.tokens = 1;
        }
        self.tokens -= 1;
        self.last = Instant::now();
        self.w.write_all(format!("{line}\r\n").as_bytes()).await?;
        self.w.flush().await
    }
}

/// One outbound message handed to the connection.
struct Outgoing {
    target: String,
    pieces: Vec<String>,
    /// Ok, or the pieces the server confirmed before the failure.
    done: oneshot::Sender<Result<(), (usize, ServiceError)>>,
}

/// What the connection and the outlet share.
#[derive(Default)]
struct Link {
    /// The current connection's queue, while one is registered.
    tx: Mutex<Option<mpsc::Sender<Outgoing>>>,
    /// Our nick now, and the length of `nick!user@host` as the server relays it.
    own: Mutex<(String, usize)>,
}

impl Link {
    fn prefix_len(&self, user: &str) -> usize {
        let own = lock(&self.own);
        if own.1 > 0 {
            own.1
        } else {
            // nick ! ~user @ host
            own.0.len() + 2 + user.len() + 1 + ASSUMED_HOST
        }
    }
}

/// The sending side for the shared outbound loop.
pub struct IrcOutlet {
    link: Arc<Link>,
    user: String,
    /// Outbox id → pieces the server confirmed (a retry resumes after them).
    progress: crate::adapter::Progress,
}

impl std::fmt::Debug for IrcOutlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrcOutlet")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Outlet for IrcOutlet {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let target = msg.recipient.as_str();
        if !is_word(target) {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                format!(
                    "{:?} is not an IRC nick or channel",
                    crate::settings::shown(target)
                ),
            ));
        }
        // `:prefix PRIVMSG target :piece\r\n` as the server relays it.
        let overhead =
            1 + self.link.prefix_len(&self.user) + 1 + "PRIVMSG ".len() + target.len() + 2 + 2;
        let pieces = split_text(&msg.body, proto::MAX_LINE.saturating_sub(overhead));
        if pieces.is_empty() {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                "the message is empty (IRC cannot send empty text)",
            ));
        }
        let tx = lock(&self.link.tx).clone();
        let Some(tx) = tx else {
            return Err(ServiceError::new(
                FailureKind::Unreachable,
                "not connected to the IRC server",
            ));
        };
        let start = self.progress.of(&msg.id);
        let total = pieces.len();
        let (done, rx) = oneshot::channel();
        let out = Outgoing {
            target: target.to_string(),
            pieces: pieces.into_iter().skip(start).collect(),
            done,
        };
        let lost = || {
            ServiceError::new(
                FailureKind::Unreachable,
                "the IRC connection closed before the server confirmed the message",
            )
        };
        tx.send(out).await.map_err(|_| lost())?;
        let result = rx.await.unwrap_or_else(|_| Err((0, lost())));
        match result {
            Ok(()) => {
                self.progress.forget(&msg.id);
                Ok(None)
            }
            Err((confirmed, mut e)) => {
                if e.retry() && start + confirmed > 0 {
                    self.progress.sent(&msg.id, start + confirmed);
                } else {
                    self.progress.forget(&msg.id);
                }
                if total > 1 {
                    e.message =
                        format!("piece {} of {total}: {}", start + confirmed + 1, e.message);
                }
                Err(e)
            }
        }
    }
}

/// The saved cursor: the server time of the last message delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcCursor {
    pub time: String,
}

/// A message for the delivery task: what to deliver and its server time.
type Queued = (Inbound, Option<String>);

/// The connection's state that outlives one registration step.
struct Session<'a> {
    cfg: &'a IrcConfig,
    link: &'a Link,
    writer: Writer,
    nick: String,
    nick_tries: u32,
    registered: bool,
    caps_wanted: Vec<&'static str>,
    caps_offered: Vec<String>,
    sasl_done: bool,
    started: u128,
    seq: u64,
}

/// Why a connection ended.
struct Ended {
    registered: bool,
    error: ServiceError,
}

fn unreachable(why: impl Into<String>) -> ServiceError {
    ServiceError::new(FailureKind::Unreachable, why)
}

impl Session<'_> {
    async fn send(&mut self, line: &str) -> Result<(), ServiceError> {
        self.writer
            .line(line)
            .await
            .map_err(|e| unreachable(format!("writing to the IRC server: {e}")))
    }

    /// Handle one line during or after registration. Err ends the connection.
    async fn handle(
        &mut self,
        m: &Message,
        queue: &mpsc::Sender<Queued>,
        since: &Option<String>,
    ) -> Result<(), ServiceError> {
        match m.command.as_str() {
            "PING" => {
                let token = m.params.last().map_or("", String::as_str).to_string();
                self.send(&format!("PONG :{token}")).await?;
            }
            "ERROR" => {
                let why = crate::settings::shown(m.param(0));
                let mut e = unreachable(format!("the IRC server closed the connection: {why}"));
                if why.to_ascii_lowercase().contains("flood") {
                    e.kind = FailureKind::Throttled;
                    e.retry_after = Some(THROTTLE_WAIT);
                }
                return Err(e);
            }
            "CAP" => self.cap(m).await?,
            "AUTHENTICATE" if m.param(0) == "+" => {
                let Some((user, password)) = self.cfg.sasl.clone() else {
                    return Ok(());
                };
                for chunk in sasl_plain_chunks(&user, password.expose()) {
                    self.send(&format!("AUTHENTICATE {chunk}")).await?;
                }
            }
            "903" => {
                self.sasl_done = true;
                self.send("CAP END").await?;
            }
            "902" | "904" | "905" | "906" | "908" => {
                return Err(ServiceError::new(
                    FailureKind::Rejected,
                    format!(
                        "SASL PLAIN failed: {} {}",
                        m.command,
                        crate::settings::shown(m.params.last().map_or("", String::as_str))
                    ),
                ))
            }
            // A server without capability negotiation, and SASL is required.
            "421" if m.param(1).eq_ignore_ascii_case("CAP") && self.cfg.sasl.is_some() => {
                return Err(no_sasl());
            }
            "433" | "432" | "436" | "437" if !self.registered => {
                self.nick_tries += 1;
                if self.nick_tries > 3 {
                    return Err(ServiceError::new(
                        FailureKind::Rejected,
                        format!("the nick {} and its alternatives are taken", self.cfg.nick),
                    ));
                }
                self.nick = format!("{}{}", self.cfg.nick, "_".repeat(self.nick_tries as usize));
                let line = format!("NICK {}", self.nick);
                self.send(&line).await?;
            }
            "465" | "464" => {
                return Err(ServiceError::new(
                    FailureKind::Rejected,
                    format!(
                        "the IRC server refused us: {}",
                        crate::settings::shown(m.params.last().map_or("", String::as_str))
                    ),
                ))
            }
            "001" => {
                if self.cfg.sasl.is_some() && !self.sasl_done {
                    return Err(no_sasl());
                }
                self.registered = true;
                self.nick = m.param(0).to_string();
                // "Welcome ... nick!user@host": the prefix the server relays our lines with.
                let full = m
                    .params
                    .last()
                    .and_then(|t| t.rsplit(' ').next())
                    .filter(|w| w.contains('!') && w.contains('@'))
                    .map_or(0, str::len);
                *lock(&self.link.own) = (self.nick.clone(), full);
                for c in self.cfg.channels.clone() {
                    self.send(&format!("JOIN {c}")).await?;
                }
            }
            "NICK"
                if m.nick()
                    .is_some_and(|n| irc_lowercase(n) == irc_lowercase(&self.nick)) =>
            {
                self.nick = m.param(0).to_string();
                *lock(&self.link.own) = (self.nick.clone(), 0);
            }
            "JOIN"
                if m.nick()
                    .is_some_and(|n| irc_lowercase(n) == irc_lowercase(&self.nick)) =>
            {
                if let Some(p) = &m.prefix {
                    let len = p.nick.len()
                        + p.user.as_ref().map_or(0, |u| u.len() + 1)
                        + p.host.as_ref().map_or(0, |h| h.len() + 1);
                    lock(&self.link.own).1 = len;
                }
                tracing::info!(channel = %crate::settings::shown(m.param(0)), "joined");
            }
            "471" | "473" | "474" | "475" | "403" | "405" => {
                tracing::warn!(channel = %crate::settings::shown(m.param(1)), reply = %m.command, "could not join");
            }
            "KICK" if irc_lowercase(m.param(1)) == irc_lowercase(&self.nick) => {
                tracing::warn!(channel = %crate::settings::shown(m.param(0)), "kicked from the channel");
            }
            "PRIVMSG" if self.registered => {
                let time = m.tag("time").map(str::to_string);
                if let (Some(t), Some(s)) = (&time, since) {
                    if t <= s {
                        tracing::info!(time = %t, "a message from before the saved cursor (a replay): skipped");
                        return Ok(());
                    }
                }
                self.seq += 1;
                let (started, seq) = (self.started, self.seq);
                match inbound_of(
                    m,
                    &self.nick,
                    self.cfg.identity,
                    self.cfg.channel_messages,
                    || format!("conn:{started}:{seq}"),
                ) {
                    Received::Deliver(msg) => {
                        if queue.send((msg, time)).await.is_err() {
                            return Err(unreachable("the delivery task stopped"));
                        }
                    }
                    Received::Skip(why) => tracing::debug!(why, "IRC message skipped"),
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Capability negotiation: ask for what we use among what is offered; SASL when set.
    async fn cap(&mut self, m: &Message) -> Result<(), ServiceError> {
        let sub = m.param(1).to_ascii_uppercase();
        let list = m.params.last().map_or("", String::as_str);
        match sub.as_str() {
            "LS" => {
                self.caps_offered.extend(
                    list.split(' ')
                        .filter(|c| !c.is_empty())
                        .map(|c| c.split('=').next().unwrap_or(c).to_ascii_lowercase()),
                );
                if m.param(2) == "*" {
                    return Ok(()); // more lines follow
                }
                let mut want: Vec<&'static str> = ["message-tags", "server-time", "account-tag"]
                    .into_iter()
                    .filter(|c| self.caps_offered.iter().any(|o| o == c))
                    .collect();
                if self.cfg.sasl.is_some() {
                    if !self.caps_offered.iter().any(|o| o == "sasl") {
                        return Err(no_sasl());
                    }
                    want.push("sasl");
                }
                self.caps_wanted = want;
                if self.caps_wanted.is_empty() {
                    self.send("CAP END").await?;
                } else {
                    let line = format!("CAP REQ :{}", self.caps_wanted.join(" "));
                    self.send(&line).await?;
                }
            }
            "ACK" => {
                if self.cfg.sasl.is_some() && list.split(' ').any(|c| c == "sasl") {
                    self.send("AUTHENTICATE PLAIN").await?;
                } else if !self.registered {
                    self.send("CAP END").await?;
                }
            }
            "NAK" => {
                if self.cfg.sasl.is_some() {
                    return Err(no_sasl());
                }
                if !self.registered {
                    self.send("CAP END").await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn no_sasl() -> ServiceError {
    ServiceError::new(
        FailureKind::Rejected,
        "the IRC server offers no SASL, and a password secret is set: not connecting without it",
    )
}

/// Open the connection: through the broker, TLS when configured.
async fn open<D: Dial>(dial: &D, cfg: &IrcConfig) -> Result<BoxStream, ServiceError> {
    let tcp = dial.dial(&cfg.host, cfg.port).await?;
    match &cfg.tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let s = crate::net::start_tls_with(tcp, &cfg.host, tls.clone())
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            Ok(Box::new(s))
        }
    }
}

/// One connection, from the first line to its end.
async fn connection<D: Dial, B: BrokerApi>(
    ctx: &Ctx<B>,
    dial: &D,
    cfg: &IrcConfig,
    link: &Link,
    queue: &mpsc::Sender<Queued>,
    since: &Mutex<Option<String>>,
    confirm_seq: &AtomicU64,
) -> Ended {
    let stream = match open(dial, cfg).await {
        Ok(s) => s,
        Err(error) => {
            return Ended {
                registered: false,
                error,
            }
        }
    };
    let (r, w) = tokio::io::split(stream);
    let mut lines = Lines {
        r,
        buf: Vec::new(),
        skipping: false,
    };
    let mut s = Session {
        cfg,
        link,
        writer: Writer {
            w,
            tokens: BURST,
            last: Instant::now(),
        },
        nick: cfg.nick.clone(),
        nick_tries: 0,
        registered: false,
        caps_wanted: Vec::new(),
        caps_offered: Vec::new(),
        sasl_done: false,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        seq: 0,
    };
    let error = run_connection(ctx, &mut s, &mut lines, queue, since, confirm_seq).await;
    *lock(&link.tx) = None;
    Ended {
        registered: s.registered,
        error,
    }
}

/// A message being sent: one piece at a time, each confirmed by the `PONG` to a `PING` after it.
struct Pending {
    out: Outgoing,
    /// The piece waiting for its confirmation.
    index: usize,
    token: String,
    failure: Option<ServiceError>,
    deadline: tokio::time::Instant,
}

impl Pending {
    fn fail(self, e: ServiceError) {
        let _ = self.out.done.send(Err((self.index, e)));
    }
}

/// Send piece `index` of `out` and the `PING` that confirms it.
async fn send_piece(
    s: &mut Session<'_>,
    out: Outgoing,
    index: usize,
    confirm_seq: &AtomicU64,
) -> Result<Pending, ServiceError> {
    let token = format!("carapace-{}", confirm_seq.fetch_add(1, Ordering::Relaxed));
    let line = format!("PRIVMSG {} :{}", out.target, out.pieces[index]);
    let mut r = s.send(&line).await;
    if r.is_ok() {
        r = s.send(&format!("PING :{token}")).await;
    }
    let p = Pending {
        out,
        index,
        token,
        failure: None,
        deadline: tokio::time::Instant::now() + CONFIRM_TIMEOUT,
    };
    match r {
        Ok(()) => Ok(p),
        Err(e) => {
            p.fail(e.clone());
            Err(e)
        }
    }
}

async fn run_connection<B: BrokerApi>(
    ctx: &Ctx<B>,
    s: &mut Session<'_>,
    lines: &mut Lines,
    queue: &mpsc::Sender<Queued>,
    since: &Mutex<Option<String>>,
    confirm_seq: &AtomicU64,
) -> ServiceError {
    let hello = async {
        s.send("CAP LS 302").await?;
        let line = format!("NICK {}", s.nick);
        s.send(&line).await?;
        let line = format!("USER {} 0 * :{}", s.cfg.user, s.cfg.realname);
        s.send(&line).await
    };
    if let Err(e) = hello.await {
        return e;
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(1);
    let mut out_tx = Some(out_tx);
    let mut pending: Option<Pending> = None;
    let register_by = tokio::time::Instant::now() + REGISTER_TIMEOUT;
    let mut last_rx = tokio::time::Instant::now();
    let mut keepalive_sent: Option<tokio::time::Instant> = None;
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let confirm_by = pending.as_ref().map_or(far, |p| p.deadline);
        let idle_at = match keepalive_sent {
            Some(t) => t + PING_TIMEOUT,
            None => last_rx + IDLE_PING,
        };
        let deadline = if s.registered { idle_at } else { register_by };
        tokio::select! {
            line = lines.next() => {
                let text = match line {
                    Err(e) => return unreachable(format!("reading from the IRC server: {e}")),
                    Ok(Line::Eof) => return unreachable("the IRC server closed the connection"),
                    Ok(Line::TooLong) => {
                        tracing::warn!("a line from the IRC server over the length limit: ignored");
                        continue;
                    }
                    Ok(Line::Text(t)) => t,
                };
                last_rx = tokio::time::Instant::now();
                keepalive_sent = None;
                if text.trim().is_empty() {
                    continue;
                }
                let m = match parse_line(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, line = %crate::settings::shown(&text), "a malformed line from the IRC server: ignored");
                        continue;
                    }
                };
                if let Some(p) = pending.as_mut() {
                    if m.command == "PONG" && m.params.last().is_some_and(|t| *t == p.token) {
                        if let Some(mut p) = pending.take() {
                            if let Some(f) = p.failure.take() {
                                p.fail(f);
                            } else if p.index + 1 == p.out.pieces.len() {
                                let _ = p.out.done.send(Ok(()));
                            } else {
                                match send_piece(s, p.out, p.index + 1, confirm_seq).await {
                                    Ok(next) => pending = Some(next),
                                    Err(e) => return e,
                                }
                            }
                        }
                        continue;
                    }
                    if let Some(f) = send_failure(&m) {
                        p.failure.get_or_insert(f);
                    }
                }
                let was = s.registered;
                let cursor = lock(since).clone();
                if let Err(e) = s.handle(&m, queue, &cursor).await {
                    if let Some(p) = pending.take() {
                        p.fail(e.clone());
                    }
                    return e;
                }
                if s.registered && !was {
                    *lock(&s.link.tx) = out_tx.take();
                    ctx.report(true, None).await;
                }
            }
            Some(out) = out_rx.recv(), if s.registered && pending.is_none() => {
                if out.pieces.is_empty() {
                    let _ = out.done.send(Ok(()));
                    continue;
                }
                match send_piece(s, out, 0, confirm_seq).await {
                    Ok(p) => pending = Some(p),
                    Err(e) => return e,
                }
            }
            () = tokio::time::sleep_until(confirm_by) => {
                if let Some(p) = pending.take() {
                    let e = unreachable("the IRC server did not confirm the message in time");
                    p.fail(e.clone());
                    return e;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                if !s.registered {
                    return unreachable("the IRC server did not finish registration in time");
                }
                if keepalive_sent.is_some() {
                    return unreachable("the IRC server stopped answering (ping timeout)");
                }
                if let Err(e) = s.send("PING :keepalive").await {
                    return e;
                }
                keepalive_sent = Some(tokio::time::Instant::now());
            }
        }
    }
}

/// Hand received messages to the broker in order; after each, save its server time.
async fn run_delivery<B: BrokerApi>(
    ctx: &Ctx<B>,
    mut rx: mpsc::Receiver<Queued>,
    store: &CursorStore,
    since: &Mutex<Option<String>>,
) {
    while let Some((msg, time)) = rx.recv().await {
        // Err: refused for good and logged; the cursor moves past it.
        let _ = deliver(ctx, &msg).await;
        if let Some(time) = time {
            let newer = lock(since).as_ref().is_none_or(|s| time > *s);
            if newer {
                if let Err(e) = store.store(&IrcCursor { time: time.clone() }) {
                    tracing::error!(channel = %ctx.channel, error = %e, "the cursor was not saved");
                }
                *lock(since) = Some(time);
            }
        }
    }
}

/// The connection loop: connect, run until the connection ends, wait, again.
async fn run_connections<D: Dial, B: BrokerApi>(
    ctx: &Ctx<B>,
    dial: &D,
    cfg: &IrcConfig,
    link: &Link,
    queue: mpsc::Sender<Queued>,
    since: &Mutex<Option<String>>,
) {
    let mut backoff = Backoff::new(MAX_BACKOFF);
    let confirm_seq = AtomicU64::new(1);
    loop {
        let began = Instant::now();
        let ended = connection(ctx, dial, cfg, link, &queue, since, &confirm_seq).await;
        if ended.registered && began.elapsed() > MAX_BACKOFF {
            backoff.reset();
        }
        let wait = ended
            .error
            .retry_after
            .unwrap_or_else(|| backoff.next_delay());
        tracing::warn!(channel = %ctx.channel, error = %ended.error, retry_in_ms = wait.as_millis() as u64, "the IRC connection ended");
        ctx.report(false, Some(ended.error.message.clone())).await;
        tokio::time::sleep(wait).await;
    }
}

/// Run the loops over `dial` (the broker in production, a plain dialer in tests).
pub async fn run_with<D: Dial, B: BrokerApi>(ctx: &Ctx<B>, dial: D, cfg: IrcConfig) {
    let store = CursorStore::new(&ctx.state_dir, CURSOR_NAME);
    let since: Mutex<Option<String>> =
        Mutex::new(store.load_or_warn::<IrcCursor>().map(|c| c.time));
    let link = Arc::new(Link::default());
    *lock(&link.own) = (cfg.nick.clone(), 0);
    let outlet = IrcOutlet {
        link: link.clone(),
        user: cfg.user.clone(),
        progress: crate::adapter::Progress::default(),
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::join!(
        run_connections(ctx, &dial, &cfg, &link, tx, &since),
        run_delivery(ctx, rx, &store, &since),
        run_outbound(ctx, &outlet),
    );
}

/// The configuration a connection uses, from the settings (and the password, when named).
pub fn config_of(s: &IrcSettings, password: Option<Secret>) -> Result<IrcConfig, IrcError> {
    let (host, port) =
        crate::email::host_port("server", &s.server).map_err(|_| IrcError::Address {
            value: s.server.clone(),
        })?;
    let tls = match s.security {
        Security::Tls => Some(crate::net::tls_config().map_err(|_| IrcError::Address {
            value: s.server.clone(),
        })?),
        Security::Plain => None,
        Security::Starttls => return Err(IrcError::Starttls),
    };
    let sasl = match password {
        None => None,
        Some(p) => {
            let trimmed = p.expose().strip_suffix(b"\n").unwrap_or(p.expose());
            let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
            if trimmed.is_empty() || std::str::from_utf8(trimmed).is_err() {
                return Err(IrcError::Password);
            }
            let user = s.sasl_username.clone().unwrap_or_else(|| s.nick.clone());
            Some((user, Arc::new(Secret::new(trimmed.to_vec()))))
        }
    };
    Ok(IrcConfig {
        host,
        port,
        tls,
        nick: s.nick.clone(),
        user: s.username.clone().unwrap_or_else(|| s.nick.clone()),
        realname: s.realname.clone(),
        channels: s.channels.clone(),
        sasl,
        identity: s.identity,
        channel_messages: s.channel_messages,
    })
}

/// Run the IRC adapter: read the password (when SASL is set), then the loops.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: IrcSettings) -> Result<(), RunError> {
    let password = match &s.password_secret {
        Some(name) => Some(ctx.secret(name).await?),
        None => None,
    };
    let cfg = config_of(&s, password).map_err(|e| ctx.fail("irc", e))?;
    run_with(&ctx, BrokerDial(ctx.broker.clone()), cfg).await;
    Ok(())
}

#[cfg(test)]
mod tests;
