//! The Gateway: the frame parser ([`parse_frame`], pure, fuzzed), the message filter
//! ([`inbound_of`]) and the connection as a [`Source`] ([`Gateway`]).
//!
//! One task per connection reads the WebSocket, answers heartbeat requests, sends the heartbeats
//! and watches their acknowledgements, and queues each dispatch with the cursor that follows it;
//! [`Gateway::poll`] hands the queue to the inbound loop. A connection that ends is resumed from
//! the last sequence the inbound loop *delivered* (not the last one received), so what was queued
//! and not yet delivered is replayed by Discord rather than lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::{jitter, BotToken, GatewayUrl};
use crate::adapter::{FailureKind, Polled, ServiceError, Source};
use crate::broker::{BrokerApi, Inbound};

/// `GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT`.
pub const INTENTS: u64 = (1 << 9) | (1 << 12) | (1 << 15);
/// Shortest heartbeat interval taken from a Hello.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Longest heartbeat interval taken from a Hello.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(600);
/// Time to connect, finish the WebSocket handshake and read the Hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest Gateway message read (a READY of a bot in many guilds is large).
const MAX_FRAME: usize = 16 << 20;
/// Dispatches received and not yet taken by the inbound loop before the connection is dropped
/// (to be resumed where the inbound loop is).
const MAX_QUEUED: usize = 10_000;
/// Dispatches handed to the inbound loop at once.
const BATCH: usize = 100;
/// Longest wait after an Invalid Session before the next Identify or Resume (Discord asks for a
/// random one to five seconds).
const INVALID_SESSION_WAIT: Duration = Duration::from_secs(4);

/// A Gateway frame that is not what Discord sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("discord gateway: malformed frame: {0}")]
pub struct FrameError(String);

fn bad(why: impl Into<String>) -> FrameError {
    FrameError(why.into())
}

/// One Gateway frame, as the adapter uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// op 10.
    Hello { heartbeat_interval: Duration },
    /// op 11.
    HeartbeatAck,
    /// op 1 from the Gateway: send a heartbeat now.
    HeartbeatRequest,
    /// op 7.
    Reconnect,
    /// op 9; `d` says whether the session may be resumed.
    InvalidSession { resumable: bool },
    /// op 0 with its sequence number.
    Dispatch { seq: u64, event: Event },
    /// Any other opcode (ignored).
    Other(u64),
}

/// A dispatch's event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ready(Ready),
    Resumed,
    Message(MessageCreate),
    /// An event the adapter does not use (its name), or a `MESSAGE_CREATE` / `READY` whose
    /// data is not what Discord sends (why): its sequence still counts.
    Other(String),
    Malformed(String),
}

/// What READY gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub session_id: String,
    pub resume_gateway_url: String,
    /// The bot's own user id (its own messages are not delivered).
    pub user_id: String,
}

/// What a `MESSAGE_CREATE` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageCreate {
    pub id: String,
    pub channel_id: String,
    /// None: a direct message.
    pub guild_id: Option<String>,
    pub author_id: String,
    pub author_bot: bool,
    /// Posted by a webhook.
    pub webhook: bool,
    /// The message type (0 default, 19 reply; others are system messages).
    pub kind: u64,
    pub content: String,
    pub attachments: usize,
}

/// A snowflake: a decimal 64-bit id.
pub fn is_snowflake(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u64>().is_ok()
}

fn snowflake(v: &Value, what: &str) -> Result<String, String> {
    match v.as_str() {
        Some(s) if is_snowflake(s) => Ok(s.to_string()),
        _ => Err(format!("{what} is not a snowflake")),
    }
}

/// Decode one Gateway text frame.
pub fn parse_frame(text: &str) -> Result<Frame, FrameError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let op = v
        .get("op")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no numeric op"))?;
    let d = v.get("d").unwrap_or(&Value::Null);
    Ok(match op {
        10 => {
            let ms = d
                .get("heartbeat_interval")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("a Hello without heartbeat_interval"))?;
            let heartbeat_interval = Duration::from_millis(ms);
            if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&heartbeat_interval) {
                return Err(bad(format!("a Hello with heartbeat_interval {ms} ms")));
            }
            Frame::Hello { heartbeat_interval }
        }
        11 => Frame::HeartbeatAck,
        1 => Frame::HeartbeatRequest,
        7 => Frame::Reconnect,
        9 => Frame::InvalidSession {
            resumable: d.as_bool().unwrap_or(false),
        },
        0 => {
            let seq = v
                .get("s")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("a dispatch without a sequence number"))?;
            let name = v
                .get("t")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a dispatch without an event name"))?;
            let event = match name {
                "READY" => ready_of(d).map_or_else(Event::Malformed, Event::Ready),
                "RESUMED" => Event::Resumed,
                "MESSAGE_CREATE" => message_of(d).map_or_else(Event::Malformed, Event::Message),
                other => Event::Other(crate::settings::shown(other)),
            };
            Frame::Dispatch { seq, event }
        }
        other => Frame::Other(other),
    })
}

fn ready_of(d: &Value) -> Result<Ready, String> {
    let session_id = d
        .get("session_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
        .ok_or("READY without a session_id")?;
    let resume_gateway_url = d
        .get("resume_gateway_url")
        .and_then(Value::as_str)
        .ok_or("READY without a resume_gateway_url")?;
    let user_id = snowflake(
        d.get("user")
            .and_then(|u| u.get("id"))
            .unwrap_or(&Value::Null),
        "READY user.id",
    )?;
    Ok(Ready {
        session_id: session_id.to_string(),
        resume_gateway_url: resume_gateway_url.to_string(),
        user_id,
    })
}

fn message_of(d: &Value) -> Result<MessageCreate, String> {
    let field = |k: &str| d.get(k).unwrap_or(&Value::Null);
    let author = field("author");
    let guild_id = match field("guild_id") {
        Value::Null => None,
        g => Some(snowflake(g, "MESSAGE_CREATE guild_id")?),
    };
    Ok(MessageCreate {
        id: snowflake(field("id"), "MESSAGE_CREATE id")?,
        channel_id: snowflake(field("channel_id"), "MESSAGE_CREATE channel_id")?,
        guild_id,
        author_id: snowflake(
            author.get("id").unwrap_or(&Value::Null),
            "MESSAGE_CREATE author.id",
        )?,
        author_bot: author.get("bot").and_then(Value::as_bool).unwrap_or(false),
        webhook: !field("webhook_id").is_null(),
        kind: field("type").as_u64().unwrap_or(0),
        content: field("content").as_str().unwrap_or("").to_string(),
        attachments: field("attachments").as_array().map_or(0, Vec::len),
    })
}

/// What of `m` is delivered, or why nothing is. `own_id`: the bot's user id.
pub fn inbound_of(m: &MessageCreate, own_id: Option<&str>) -> Result<Inbound, String> {
    if m.webhook {
        return Err("posted by a webhook".into());
    }
    if m.author_bot || own_id == Some(m.author_id.as_str()) {
        return Err("written by a bot".into());
    }
    if !matches!(m.kind, 0 | 19) {
        return Err(format!("a system message (type {})", m.kind));
    }
    let text = match (m.content.trim().is_empty(), m.attachments) {
        (false, 0) => m.content.clone(),
        (false, n) => format!(
            "[discord: {n} attachment(s); only text is delivered] {}",
            m.content
        ),
        (true, 0) => return Err("no text (was the MESSAGE_CONTENT intent granted?)".into()),
        (true, n) => format!("[discord: {n} attachment(s); only text is delivered]"),
    };
    Ok(Inbound {
        id: format!("message:{}", m.id),
        sender: m.author_id.clone(),
        conversation: m.channel_id.clone(),
        reply_to: m.channel_id.clone(),
        text,
    })
}

/// The cursor: the session to resume and how far the inbound loop got in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub session_id: String,
    pub resume_gateway_url: String,
    /// The sequence number of the last dispatch delivered.
    pub seq: u64,
    /// The bot's own user id.
    pub user_id: String,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Dropped (closed, broken, zombie): resume after a backoff.
    Dropped(String),
    /// op 7: resume at once.
    Reconnect,
    /// op 9.
    Invalid { resumable: bool },
    /// The session cannot be resumed (close 4007, 4009): identify anew.
    Fresh(String),
    /// The Gateway refuses this bot (close 4004, 4010-4014): no use trying soon.
    Fatal(String),
}

/// What a connection task hands over.
#[derive(Debug)]
enum Item {
    Event(Polled<Session>),
    End(End),
}

/// A running connection task.
#[derive(Debug)]
struct Live {
    rx: mpsc::UnboundedReceiver<Item>,
    queued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Gateway as the inbound loop's [`Source`].
#[derive(Debug)]
pub struct Gateway<B> {
    broker: Arc<B>,
    url: GatewayUrl,
    token: Arc<BotToken>,
    /// The session the next connection resumes (None: Identify).
    resume: Option<Session>,
    /// Whether the saved cursor was taken (at the first poll).
    loaded: bool,
    live: Option<Live>,
    /// How the last connection ended, handled at the next poll.
    ended: Option<End>,
}

fn unreachable(message: impl Into<String>) -> ServiceError {
    ServiceError::new(FailureKind::Unreachable, message)
}

impl<B: BrokerApi> Gateway<B> {
    pub fn new(broker: Arc<B>, url: GatewayUrl, token: Arc<BotToken>) -> Gateway<B> {
        Gateway {
            broker,
            url,
            token,
            resume: None,
            loaded: false,
            live: None,
            ended: None,
        }
    }

    /// Act on how the last connection ended; Err: the inbound loop waits before the next try.
    async fn after(&mut self, end: End) -> Result<(), ServiceError> {
        match end {
            End::Dropped(why) => Err(unreachable(format!("discord gateway: {why}"))),
            End::Reconnect => {
                tracing::info!("discord gateway: asked to reconnect: resuming");
                // A moment's pause, so that a server asking again and again is no busy loop.
                tokio::time::sleep(jitter(Duration::from_secs(1))).await;
                Ok(())
            }
            End::Invalid { resumable: true } => {
                tracing::info!("discord gateway: invalid session (resumable): resuming");
                tokio::time::sleep(Duration::from_secs(1) + jitter(INVALID_SESSION_WAIT)).await;
                Ok(())
            }
            End::Invalid { resumable: false } => {
                self.lose_session("Discord refused to resume the session (Invalid Session)");
                tokio::time::sleep(Duration::from_secs(1) + jitter(INVALID_SESSION_WAIT)).await;
                Ok(())
            }
            End::Fresh(why) => {
                self.lose_session(&why);
                tokio::time::sleep(Duration::from_secs(1) + jitter(INVALID_SESSION_WAIT)).await;
                Ok(())
            }
            End::Fatal(why) => Err(ServiceError::new(
                FailureKind::Rejected,
                format!("discord gateway: {why}"),
            )),
        }
    }

    fn lose_session(&mut self, why: &str) {
        match self.resume.take() {
            Some(s) => tracing::warn!(
                session_seq = s.seq,
                why,
                "discord gateway: the session is gone; a new one starts: messages posted between the drop and the new session are not replayed and not delivered"
            ),
            None => tracing::info!(why, "discord gateway: starting a new session"),
        }
    }

    /// Connect, read the Hello, Identify or Resume, and start the connection's task.
    async fn connect(&mut self) -> Result<Live, ServiceError> {
        let resume_url = self
            .resume
            .as_ref()
            .and_then(|s| GatewayUrl::parse(&s.resume_gateway_url).ok());
        let (mut ws, interval) = match resume_url {
            Some(u) if u != self.url => match self.open(&u).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e.message, "discord gateway: the session's resume URL failed: resuming through gateway_url");
                    self.open(&self.url.clone()).await?
                }
            },
            _ => self.open(&self.url.clone()).await?,
        };
        let hello = match &self.resume {
            Some(s) => {
                tracing::info!(seq = s.seq, "discord gateway: resuming the session");
                json!({"op": 6, "d": {"token": self.token.expose(), "session_id": s.session_id, "seq": s.seq}})
            }
            None => {
                tracing::info!("discord gateway: identifying (a new session)");
                json!({"op": 2, "d": {
                    "token": self.token.expose(),
                    "intents": INTENTS,
                    "properties": {"os": "linux", "browser": "carapace", "device": "carapace"},
                }})
            }
        };
        ws.send(WsMessage::text(hello.to_string()))
            .await
            .map_err(|e| {
                unreachable(
                    self.token
                        .scrub(&format!("discord gateway: sending Identify/Resume: {e}")),
                )
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(drive(ws, interval, self.resume.clone(), tx, queued.clone()));
        Ok(Live { rx, queued, task })
    }

    /// The WebSocket to `url` and the Hello's heartbeat interval.
    async fn open(
        &self,
        url: &GatewayUrl,
    ) -> Result<(WebSocketStream<crate::net::Conn>, Duration), ServiceError> {
        let token = &self.token;
        let fut = async {
            let conn = crate::net::open(&*self.broker, url.service())
                .await
                .map_err(|e| unreachable(format!("discord gateway: {e}")))?;
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_FRAME))
                .max_frame_size(Some(MAX_FRAME));
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url.request_url(), conn, Some(config))
                    .await
                    .map_err(|e| {
                        unreachable(format!("discord gateway: WebSocket handshake: {e}"))
                    })?;
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => match parse_frame(&t) {
                        Ok(Frame::Hello { heartbeat_interval }) => {
                            return Ok((ws, heartbeat_interval))
                        }
                        Ok(other) => {
                            return Err(unreachable(format!(
                                "discord gateway: expected Hello, got {other:?}"
                            )))
                        }
                        Err(e) => return Err(unreachable(e.to_string())),
                    },
                    Some(Ok(WsMessage::Close(c))) => {
                        return Err(unreachable(format!(
                            "discord gateway: closed before Hello: {c:?}"
                        )))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(unreachable(format!("discord gateway: {e}"))),
                    None => return Err(unreachable("discord gateway: closed before Hello")),
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| Err(unreachable("discord gateway: no Hello within 30 s")))
            .map_err(|mut e| {
                e.message = token.scrub(&e.message);
                e
            })
    }
}

impl<B: BrokerApi> Source for Gateway<B> {
    type Cursor = Session;

    async fn poll(
        &mut self,
        cursor: Option<&Session>,
    ) -> Result<Vec<Polled<Session>>, ServiceError> {
        if !self.loaded {
            self.resume = cursor.cloned();
            self.loaded = true;
        }
        loop {
            if let Some(end) = self.ended.take() {
                self.live = None;
                self.after(end).await?;
            }
            let mut live = match self.live.take() {
                Some(l) => l,
                None => self.connect().await?,
            };
            let mut batch: Vec<Polled<Session>> = Vec::new();
            let mut taken = 0;
            let mut next = live.rx.recv().await;
            loop {
                match next {
                    Some(Item::Event(p)) => {
                        taken += 1;
                        // Runs of events without a message need only their last cursor.
                        if p.message.is_none() && batch.last().is_some_and(|l| l.message.is_none())
                        {
                            batch.pop();
                        }
                        batch.push(p);
                    }
                    Some(Item::End(e)) => {
                        self.ended = Some(e);
                        break;
                    }
                    None => {
                        self.ended = Some(End::Dropped("the connection's task ended".into()));
                        break;
                    }
                }
                if batch.len() >= BATCH {
                    break;
                }
                next = match live.rx.try_recv() {
                    Ok(i) => Some(i),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
            }
            live.queued.fetch_sub(taken, Ordering::SeqCst);
            if self.ended.is_none() {
                self.live = Some(live);
            }
            if let Some(last) = batch.last() {
                self.resume = Some(last.cursor.clone());
                return Ok(batch);
            }
        }
    }
}

/// The close codes after which the Gateway will not take this bot as it is.
fn close_end(code: u16, reason: &str) -> End {
    let why = format!(
        "closed by Discord: {code} {}",
        crate::settings::shown(reason)
    );
    match code {
        4004 => End::Fatal(format!("{why} (the bot token was refused)")),
        4013 | 4014 => End::Fatal(format!(
            "{why} (enable the Message Content intent on the Developer Portal's Bot page)"
        )),
        4010..=4012 => End::Fatal(why),
        4007 | 4009 => End::Fresh(why),
        _ => End::Dropped(why),
    }
}

/// One connection: read frames, heartbeat, queue dispatches, until it ends (said last on `tx`).
async fn drive<S>(
    mut ws: WebSocketStream<S>,
    interval: Duration,
    mut session: Option<Session>,
    tx: mpsc::UnboundedSender<Item>,
    queued: Arc<AtomicUsize>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut last_seq: Option<u64> = session.as_ref().map(|s| s.seq);
    let mut next_beat = tokio::time::Instant::now() + jitter(interval);
    let mut awaiting_ack = false;
    let end = loop {
        let beat_now = tokio::select! {
            () = tokio::time::sleep_until(next_beat) => {
                if awaiting_ack {
                    break End::Dropped("no heartbeat ACK within an interval (a zombie connection)".into());
                }
                next_beat += interval;
                true
            }
            msg = ws.next() => match msg {
                None => break End::Dropped("the connection closed".into()),
                Some(Err(e)) => break End::Dropped(format!("the connection broke: {e}")),
                Some(Ok(WsMessage::Close(c))) => {
                    break match c {
                        Some(f) => close_end(u16::from(f.code), &f.reason),
                        None => End::Dropped("closed by Discord without a code".into()),
                    }
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    tracing::warn!("discord gateway: a binary frame (compression was not asked for): skipped");
                    false
                }
                Some(Ok(WsMessage::Text(t))) => match parse_frame(&t) {
                    Err(e) => {
                        tracing::warn!(error = %e, "discord gateway: frame skipped");
                        false
                    }
                    Ok(Frame::HeartbeatAck) => {
                        awaiting_ack = false;
                        false
                    }
                    Ok(Frame::HeartbeatRequest) => true,
                    Ok(Frame::Reconnect) => break End::Reconnect,
                    Ok(Frame::InvalidSession { resumable }) => break End::Invalid { resumable },
                    Ok(Frame::Hello { .. }) | Ok(Frame::Other(_)) => false,
                    Ok(Frame::Dispatch { seq, event }) => {
                        last_seq = Some(seq);
                        let message = match event {
                            Event::Ready(r) => {
                                tracing::info!(user_id = %r.user_id, "discord gateway: ready (a new session)");
                                session = Some(Session {
                                    session_id: r.session_id,
                                    resume_gateway_url: r.resume_gateway_url,
                                    seq,
                                    user_id: r.user_id,
                                });
                                None
                            }
                            Event::Resumed => {
                                tracing::info!(seq, "discord gateway: resumed");
                                None
                            }
                            Event::Message(m) => {
                                match inbound_of(&m, session.as_ref().map(|s| s.user_id.as_str())) {
                                    Ok(i) => Some(i),
                                    Err(why) => {
                                        tracing::info!(id = %m.id, why, "discord message skipped");
                                        None
                                    }
                                }
                            }
                            Event::Malformed(why) => {
                                tracing::warn!(seq, why, "discord gateway: malformed event skipped");
                                None
                            }
                            Event::Other(_) => None,
                        };
                        let Some(s) = session.as_mut() else {
                            tracing::warn!(seq, "discord gateway: a dispatch before READY: skipped");
                            continue;
                        };
                        s.seq = seq;
                        let cursor = s.clone();
                        if queued.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUED {
                            break End::Dropped("the broker is not keeping up: reconnecting later to resume".into());
                        }
                        if tx.send(Item::Event(Polled { message, cursor })).is_err() {
                            return;
                        }
                        false
                    }
                },
                Some(Ok(_)) => false,
            }
        };
        if beat_now {
            let beat = json!({"op": 1, "d": last_seq});
            if let Err(e) = ws.send(WsMessage::text(beat.to_string())).await {
                break End::Dropped(format!("sending a heartbeat: {e}"));
            }
            awaiting_ack = true;
        }
    };
    if let End::Fatal(why) | End::Fresh(why) = &end {
        tracing::warn!(why, "discord gateway: connection ended");
    }
    // A close with a code other than 1000/1001 keeps the session resumable; best effort.
    if matches!(
        end,
        End::Reconnect | End::Invalid { resumable: true } | End::Dropped(_)
    ) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::from(4000),
            reason: "reconnecting".into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
    }
    let _ = tx.send(Item::End(end));
}
