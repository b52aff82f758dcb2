//! A fake Discord for the Discord adapter's tests (Discord is hosted-only), wire-exact for what
//! the adapter uses:
//!
//! - **Gateway** (v10, JSON, on a loopback WebSocket, [`FakeDiscord::gateway_url`]): Hello (op
//!   10, the heartbeat interval given at start), Identify (op 2: a wrong token is closed with
//!   4004 "Authentication failed.", intents without `MESSAGE_CONTENT` with 4014) answered by a new
//!   session's READY (`session_id`, `resume_gateway_url` = this server, `user` = the bot) and a
//!   GUILD_CREATE; Resume (op 6) of the current session replays every dispatch after the given
//!   `seq` then RESUMED, else Invalid Session (op 9, `d: false`); heartbeats (op 1) answered by
//!   op 11 ACK unless [`FakeDiscord::set_acks`] turned ACKs off (a zombie, to the client); op 1
//!   from the server on [`FakeDiscord::request_heartbeat`]; op 7 on [`FakeDiscord::reconnect`].
//!   Every dispatch of a session has its sequence number and is kept for a resume, as Discord
//!   does; what is posted while no session exists, or into a session that is then invalidated,
//!   is never seen by the client (as on Discord).
//! - **REST** (loopback HTTP, [`FakeDiscord::api_base`] = `http://ADDR/api/v10`):
//!   `POST /channels/{id}/messages` with `Authorization: Bot TOKEN` (else 401), `content` of 1
//!   to 2000 characters (else 400 with Discord's error codes), `nonce` of at most 25 characters;
//!   with `enforce_nonce` a nonce seen before answers the message it created (no second one).
//!   Each answer has `X-RateLimit-Limit/Remaining/Reset/Reset-After/Bucket` for the route (per
//!   channel, [`FakeDiscord::set_route_limit`]); a request over the limit gets a real 429
//!   (`retry_after`, `global: false`, `X-RateLimit-Scope: user`) and is counted
//!   ([`FakeDiscord::over_limit`]). [`FakeDiscord::inject`] makes the next POST answer
//!   something else: a 429 (route or global), an error, a raw body, or creates the message and
//!   cuts the connection before answering ([`RestInjected::CreateThenDrop`]).
//! - `POST /users/@me/channels` (`recipient_id`) opens (or finds) the DM channel with a user; a
//!   `POST /channels/{id}/messages` to the id of a user who posted is 404 Unknown Channel
//!   (code 10003), as a user id is no channel on Discord.
//! - The bot's own messages come back on the Gateway as MESSAGE_CREATE (author = the bot), as
//!   on Discord.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use crate::fake_llm::{read_body, read_head, reason, serve_connections};

/// The bot's own user id.
pub const BOT_ID: &str = "1100000000000000001";
/// `GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT`.
const NEEDED_INTENTS: u64 = (1 << 9) | (1 << 12) | (1 << 15);

/// What the next `POST .../messages` answers instead of its normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum RestInjected {
    /// 429 with this `retry_after` (seconds); `global` for the global limit.
    TooMany { retry_after: f64, global: bool },
    /// This status with `{"message":...,"code":...}`.
    Error {
        status: u16,
        code: u64,
        message: String,
    },
    /// This status and body, as given.
    Raw { status: u16, body: String },
    /// Create the message, then cut the connection without answering.
    CreateThenDrop,
}

/// One REST request.
#[derive(Debug, Clone, PartialEq)]
pub struct RestCall {
    pub method: String,
    pub path: String,
    pub auth_ok: bool,
    pub body: Value,
    pub at: Instant,
}

#[derive(Debug)]
struct GwSession {
    id: String,
    seq: u64,
    /// Every dispatch of the session, by sequence number (for resumes).
    log: Vec<(u64, String)>,
    resumable: bool,
}

#[derive(Debug, Default)]
struct State {
    session: Option<GwSession>,
    next_session: u64,
    /// The connection that gets the session's dispatches.
    attached: Option<u64>,
    outgoing: HashMap<u64, VecDeque<Message>>,
    /// Connections to cut without a close frame.
    cut: HashSet<u64>,
    acks: bool,
    identifies: usize,
    resumes: Vec<(String, u64)>,
    invalid_sessions: usize,
    heartbeats: Vec<Value>,
    connections: usize,
    next_id: u64,
    calls: Vec<RestCall>,
    sent: Vec<Value>,
    nonces: HashMap<(String, String), Value>,
    injected: VecDeque<RestInjected>,
    route_limit: (u64, Duration),
    /// Users that posted (their ids are no channel: a POST there is Unknown Channel).
    users: HashSet<String>,
    /// User id → the DM channel opened with them.
    dms: HashMap<String, String>,
    windows: HashMap<String, (Instant, u64)>,
    over_limit: usize,
}

#[derive(Debug)]
struct Shared {
    token: String,
    gateway_addr: Mutex<Option<SocketAddr>>,
    heartbeat_ms: u64,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    serial: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resume_url(&self) -> String {
        let a = *self.gateway_addr.lock().unwrap_or_else(|p| p.into_inner());
        a.map(|a| format!("ws://{a}")).unwrap_or_default()
    }
}

/// The fake Discord (see the module documentation). Stops when dropped.
#[derive(Debug)]
pub struct FakeDiscord {
    gateway: SocketAddr,
    api: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn snowflake(n: u64) -> String {
    // Discord epoch based ids look like this; only their being decimal matters.
    (1_200_000_000_000_000_000u64 + n).to_string()
}

impl FakeDiscord {
    /// Listen on two loopback ports for bot `token`, the Gateway asking for heartbeats every
    /// `heartbeat_ms`. Panics if it cannot listen.
    pub fn start(token: &str, heartbeat_ms: u64) -> FakeDiscord {
        let bind = |what: &str| {
            let l = TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("fake Discord {what}: bind: {e}"));
            let a = l
                .local_addr()
                .unwrap_or_else(|e| panic!("fake Discord {what}: local_addr: {e}"));
            (l, a)
        };
        let (gl, gateway) = bind("gateway");
        let (al, api) = bind("api");
        let shared = Arc::new(Shared {
            token: token.to_string(),
            gateway_addr: Mutex::new(Some(gateway)),
            heartbeat_ms,
            state: Mutex::new(State {
                acks: true,
                next_id: 1,
                route_limit: (50, Duration::from_secs(1)),
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            serial: std::sync::atomic::AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let sh = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("fake-discord-gw".into())
                .spawn(move || gateway_accept(&gl, &sh))
                .unwrap_or_else(|e| panic!("fake Discord: spawn: {e}")),
        );
        let sh = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("fake-discord-api".into())
                .spawn(move || {
                    serve_connections(
                        &al,
                        &sh,
                        "fake-discord-rest",
                        |s| &s.stop,
                        |s| &s.conns,
                        serve_rest,
                    )
                })
                .unwrap_or_else(|e| panic!("fake Discord: spawn: {e}")),
        );
        FakeDiscord {
            gateway,
            api,
            shared,
            threads,
        }
    }

    /// `ws://127.0.0.1:PORT`: the adapter's `gateway_url`.
    pub fn gateway_url(&self) -> String {
        format!("ws://{}", self.gateway)
    }

    /// `http://127.0.0.1:PORT/api/v10`: the adapter's `api_base`.
    pub fn api_base(&self) -> String {
        format!("http://{}/api/v10", self.api)
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    fn dispatch(st: &mut State, t: &str, d: Value) -> Option<u64> {
        let s = st.session.as_mut()?;
        s.seq += 1;
        let frame = json!({"op": 0, "s": s.seq, "t": t, "d": d}).to_string();
        s.log.push((s.seq, frame.clone()));
        let seq = s.seq;
        if let Some(c) = st.attached {
            st.outgoing
                .entry(c)
                .or_default()
                .push_back(Message::text(frame));
        }
        Some(seq)
    }

    /// Post a message as user `author` in `channel` (a guild channel when `guild` is given, else
    /// a DM). Returns its id; None when no session exists (nobody would see it).
    pub fn post(
        &self,
        channel: &str,
        guild: Option<&str>,
        author: &str,
        content: &str,
    ) -> Option<String> {
        self.post_as(channel, guild, author, false, content)
    }

    /// [`FakeDiscord::post`] by a bot (`author.bot = true`).
    pub fn post_as(
        &self,
        channel: &str,
        guild: Option<&str>,
        author: &str,
        bot: bool,
        content: &str,
    ) -> Option<String> {
        let mut st = self.shared.state();
        st.users.insert(author.to_string());
        let id = snowflake(st.next_id);
        st.next_id += 1;
        let d = message_object(&id, channel, guild, author, bot, content, 0);
        let r = Self::dispatch(&mut st, "MESSAGE_CREATE", d).map(|_| id);
        self.shared.changed.notify_all();
        r
    }

    /// Send a raw text frame on the attached connection (malformed frames).
    pub fn send_raw(&self, text: &str) {
        let mut st = self.shared.state();
        if let Some(c) = st.attached {
            st.outgoing
                .entry(c)
                .or_default()
                .push_back(Message::text(text.to_string()));
        }
    }

    /// A dispatch with a sequence number but malformed data (kept for a resume like any other).
    pub fn dispatch_raw(&self, t: &str, d: Value) -> Option<u64> {
        let mut st = self.shared.state();
        Self::dispatch(&mut st, t, d)
    }

    /// Cut the attached connection (no close frame); the session stays resumable.
    pub fn drop_connection(&self) {
        let mut st = self.shared.state();
        if let Some(c) = st.attached.take() {
            st.cut.insert(c);
        }
    }

    /// op 7 Reconnect on the attached connection.
    pub fn reconnect(&self) {
        self.send_raw(&json!({"op": 7, "d": null}).to_string());
    }

    /// op 1 from the server: the client must heartbeat now.
    pub fn request_heartbeat(&self) {
        self.send_raw(&json!({"op": 1, "d": null}).to_string());
    }

    /// End the session for good: a resume is answered Invalid Session (`d: false`), and what
    /// it holds is never replayed.
    pub fn invalidate_session(&self) {
        let mut st = self.shared.state();
        if let Some(s) = st.session.as_mut() {
            s.resumable = false;
        }
    }

    /// Whether heartbeats are acknowledged.
    pub fn set_acks(&self, on: bool) {
        self.shared.state().acks = on;
    }

    /// The route limit: `limit` requests per `window` per channel.
    pub fn set_route_limit(&self, limit: u64, window: Duration) {
        self.shared.state().route_limit = (limit.max(1), window);
    }

    pub fn inject(&self, r: RestInjected) {
        self.shared.state().injected.push_back(r);
    }

    /// Identifies received (with the right token).
    pub fn identifies(&self) -> usize {
        self.shared.state().identifies
    }

    /// Resumes received: (session id, seq).
    pub fn resumes(&self) -> Vec<(String, u64)> {
        self.shared.state().resumes.clone()
    }

    /// Resumes refused with Invalid Session.
    pub fn invalid_sessions(&self) -> usize {
        self.shared.state().invalid_sessions
    }

    /// The `d` of every heartbeat received.
    pub fn heartbeats(&self) -> Vec<Value> {
        self.shared.state().heartbeats.clone()
    }

    /// WebSocket connections accepted.
    pub fn connections(&self) -> usize {
        self.shared.state().connections
    }

    /// Requests over the route limit (answered 429 by the limit itself, not injected).
    pub fn over_limit(&self) -> usize {
        self.shared.state().over_limit
    }

    /// Every REST request.
    pub fn calls(&self) -> Vec<RestCall> {
        self.shared.state().calls.clone()
    }

    /// Messages created through REST: `{"channel_id", "content", "nonce", "message_reference",
    /// "allowed_mentions", "id"}`.
    pub fn sent(&self) -> Vec<Value> {
        self.shared.state().sent.clone()
    }

    /// The DM channel opened with `user`, if any.
    pub fn dm_of(&self, user: &str) -> Option<String> {
        self.shared.state().dms.get(user).cloned()
    }

    /// The contents sent to `channel`.
    pub fn texts_to(&self, channel: &str) -> Vec<String> {
        self.sent()
            .iter()
            .filter(|m| m["channel_id"] == channel)
            .filter_map(|m| m["content"].as_str().map(str::to_string))
            .collect()
    }

    fn wait<T>(&self, limit: Duration, mut f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.state();
        loop {
            if let Some(v) = f(&st) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            st = self
                .shared
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wait until a connection is attached to a session (after READY or RESUMED); panics after
    /// `limit`.
    pub fn wait_attached(&self, limit: Duration) {
        self.wait(limit, |st| st.attached.map(|_| ()))
            .unwrap_or_else(|| panic!("fake Discord: no client attached within {limit:?}"));
    }

    /// Wait for `n` created messages; panics after `limit`.
    pub fn wait_sent(&self, n: usize, limit: Duration) -> Vec<Value> {
        self.wait(limit, |st| (st.sent.len() >= n).then(|| st.sent.clone()))
            .unwrap_or_else(|| {
                panic!(
                    "fake Discord: {n} messages not sent within {limit:?}: {:?}",
                    self.sent()
                )
            })
    }

    /// Wait until `f` holds of the fake's counters (identifies, resumes, heartbeats,
    /// connections); panics after `limit` saying `what`.
    pub fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&FakeDiscord) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "fake Discord: timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let _ = TcpStream::connect_timeout(&self.gateway, Duration::from_secs(1));
        let _ = TcpStream::connect_timeout(&self.api, Duration::from_secs(1));
        for (_, c) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn message_object(
    id: &str,
    channel: &str,
    guild: Option<&str>,
    author: &str,
    bot: bool,
    content: &str,
    kind: u64,
) -> Value {
    let mut d = json!({
        "id": id,
        "channel_id": channel,
        "author": {"id": author, "username": format!("user{author}"), "discriminator": "0",
                   "global_name": null, "avatar": null, "public_flags": 0},
        "content": content,
        "timestamp": "2026-12-07T11:00:00.000000+00:00",
        "edited_timestamp": null,
        "tts": false,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": false,
        "type": kind,
        "flags": 0,
        "components": [],
    });
    if bot {
        d["author"]["bot"] = json!(true);
    }
    if let Some(g) = guild {
        d["guild_id"] = json!(g);
        d["member"] = json!({"roles": [], "joined_at": "2026-01-01T00:00:00.000000+00:00",
                             "deaf": false, "mute": false, "flags": 0});
    }
    d
}

fn gateway_accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let serial = shared.serial.fetch_add(1, Ordering::SeqCst);
        if let Ok(c) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(u64::MAX - serial, c);
        }
        let sh = Arc::clone(shared);
        let _ = std::thread::Builder::new()
            .name("fake-discord-ws".into())
            .spawn(move || {
                let _ = serve_gateway(stream, serial, &sh);
                let mut st = sh.state();
                if st.attached == Some(serial) {
                    st.attached = None;
                }
                st.outgoing.remove(&serial);
                drop(st);
                sh.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(u64::MAX - serial));
                sh.changed.notify_all();
            });
    }
}

fn io_err(e: tungstenite::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn close(ws: &mut tungstenite::WebSocket<TcpStream>, code: u16, reason: &str) {
    let _ = ws.close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }));
    let _ = ws.flush();
}

/// One Gateway connection.
// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
fn serve_gateway(stream: TcpStream, serial: u64, shared: &Shared) -> std::io::Result<()> {
    let raw = stream.try_clone()?;
    let mut query = String::new();
    let mut ws = tungstenite::accept_hdr(
        stream,
        |req: &tungstenite::handshake::server::Request,
         resp: tungstenite::handshake::server::Response| {
            query = req.uri().query().unwrap_or("").to_string();
            Ok(resp)
        },
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    shared.state().connections += 1;
    shared.changed.notify_all();
    if !(query.contains("v=10") && query.contains("encoding=json")) {
        close(&mut ws, 4012, "Invalid API version");
        return Ok(());
    }
    raw.set_read_timeout(Some(Duration::from_millis(20)))?;
    ws.send(Message::text(
        json!({"op": 10, "s": null, "t": null, "d": {"heartbeat_interval": shared.heartbeat_ms}})
            .to_string(),
    ))
    .map_err(io_err)?;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            let _ = raw.shutdown(Shutdown::Both);
            return Ok(());
        }
        let out: Vec<Message> = {
            let mut st = shared.state();
            if st.cut.remove(&serial) {
                drop(st);
                let _ = raw.shutdown(Shutdown::Both);
                return Ok(());
            }
            st.outgoing
                .get_mut(&serial)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default()
        };
        for m in out {
            ws.send(m).map_err(io_err)?;
        }
        let text = match ws.read() {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Close(_)) => return Ok(()),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(io_err(e)),
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            close(&mut ws, 4002, "Error while decoding payload.");
            return Ok(());
        };
        let d = v.get("d").cloned().unwrap_or(Value::Null);
        match v.get("op").and_then(Value::as_u64) {
            Some(1) => {
                let mut st = shared.state();
                st.heartbeats.push(d);
                let ack = st.acks;
                drop(st);
                shared.changed.notify_all();
                if ack {
                    ws.send(Message::text(json!({"op": 11}).to_string()))
                        .map_err(io_err)?;
                }
            }
            Some(2) => {
                if d["token"] != shared.token.as_str() {
                    close(&mut ws, 4004, "Authentication failed.");
                    return Ok(());
                }
                let intents = d["intents"].as_u64().unwrap_or(0);
                if intents & NEEDED_INTENTS != NEEDED_INTENTS {
                    close(&mut ws, 4014, "Disallowed intent(s).");
                    return Ok(());
                }
                let mut st = shared.state();
                st.identifies += 1;
                st.next_session += 1;
                st.session = Some(GwSession {
                    id: format!("fake-session-{}", st.next_session),
                    seq: 0,
                    log: Vec::new(),
                    resumable: true,
                });
                st.attached = Some(serial);
                let sid = st
                    .session
                    .as_ref()
                    .map(|s| s.id.clone())
                    .unwrap_or_default();
                FakeDiscord::dispatch(
                    &mut st,
                    "READY",
                    json!({"v": 10, "user": {"id": BOT_ID, "username": "carapace-test", "discriminator": "0", "bot": true},
                           "guilds": [{"id": "1300000000000000001", "unavailable": true}],
                           "session_id": sid, "resume_gateway_url": shared.resume_url(),
                           "application": {"id": BOT_ID, "flags": 0}}),
                );
                FakeDiscord::dispatch(
                    &mut st,
                    "GUILD_CREATE",
                    json!({"id": "1300000000000000001", "name": "test guild", "channels": []}),
                );
                drop(st);
                shared.changed.notify_all();
            }
            Some(6) => {
                let sid = d["session_id"].as_str().unwrap_or("").to_string();
                let seq = d["seq"].as_u64().unwrap_or(0);
                let mut st = shared.state();
                st.resumes.push((sid.clone(), seq));
                let ok = d["token"] == shared.token.as_str()
                    && st
                        .session
                        .as_ref()
                        .is_some_and(|s| s.id == sid && s.resumable && seq <= s.seq);
                if !ok {
                    st.invalid_sessions += 1;
                    drop(st);
                    shared.changed.notify_all();
                    ws.send(Message::text(json!({"op": 9, "d": false}).to_string()))
                        .map_err(io_err)?;
                    continue;
                }
                let replay: Vec<Message> = st
                    .session
                    .as_ref()
                    .map(|s| {
                        s.log
                            .iter()
                            .filter(|(n, _)| *n > seq)
                            .map(|(_, f)| Message::text(f.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                st.attached = Some(serial);
                let q = st.outgoing.entry(serial).or_default();
                q.extend(replay);
                FakeDiscord::dispatch(&mut st, "RESUMED", json!({}));
                drop(st);
                shared.changed.notify_all();
            }
            _ => {
                close(&mut ws, 4001, "Unknown opcode.");
                return Ok(());
            }
        }
    }
}

fn answer(
    w: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: fake-discord\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body.as_bytes())?;
    w.flush()?;
    let _ = w.shutdown(Shutdown::Write);
    Ok(())
}

fn error_body(code: u64, message: &str) -> String {
    json!({"message": message, "code": code}).to_string()
}

/// One REST connection: one request (the adapter closes after each).
fn serve_rest(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let Some(head) = read_head(&mut r)? else {
        return Ok(());
    };
    let body = read_body(&mut r, &head)?;
    let auth_ok = head.headers.get("authorization").map(String::as_str)
        == Some(format!("Bot {}", shared.token).as_str());
    let params: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if head.target == "/api/v10/users/@me/channels" && head.method == "POST" && auth_ok {
        let mut st = shared.state();
        st.calls.push(RestCall {
            method: head.method.clone(),
            path: head.target.clone(),
            auth_ok,
            body: params.clone(),
            at: Instant::now(),
        });
        let Some(user) = params["recipient_id"].as_str().map(str::to_string) else {
            drop(st);
            return answer(&mut w, 400, &[], &error_body(50035, "Invalid Form Body"));
        };
        let id = match st.dms.get(&user) {
            Some(id) => id.clone(),
            None => {
                let id = snowflake(st.next_id);
                st.next_id += 1;
                st.dms.insert(user.clone(), id.clone());
                id
            }
        };
        drop(st);
        shared.changed.notify_all();
        let b = json!({"id": id, "type": 1, "last_message_id": null, "flags": 0,
                       "recipients": [{"id": user, "username": format!("user{user}"), "discriminator": "0"}]});
        return answer(&mut w, 200, &[], &b.to_string());
    }
    let channel = head
        .target
        .strip_prefix("/api/v10/channels/")
        .and_then(|p| p.strip_suffix("/messages"))
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string);
    let mut st = shared.state();
    st.calls.push(RestCall {
        method: head.method.clone(),
        path: head.target.clone(),
        auth_ok,
        body: params.clone(),
        at: Instant::now(),
    });
    shared.changed.notify_all();
    if !auth_ok {
        drop(st);
        return answer(&mut w, 401, &[], &error_body(0, "401: Unauthorized"));
    }
    let Some(channel) = channel.filter(|_| head.method == "POST") else {
        drop(st);
        return answer(&mut w, 404, &[], &error_body(0, "404: Not Found"));
    };
    if st.users.contains(&channel) {
        drop(st);
        return answer(&mut w, 404, &[], &error_body(10003, "Unknown Channel"));
    }
    // The route's window.
    let (limit, window) = st.route_limit;
    let now = Instant::now();
    let route = format!("POST /channels/{channel}/messages");
    let (start, used) = {
        let e = st.windows.entry(route).or_insert((now, 0));
        if now.duration_since(e.0) >= window {
            *e = (now, 0);
        }
        e.1 += 1;
        *e
    };
    let reset_after = window
        .saturating_sub(now.duration_since(start))
        .as_secs_f64();
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut rl = vec![
        ("X-RateLimit-Limit".to_string(), limit.to_string()),
        (
            "X-RateLimit-Remaining".to_string(),
            limit.saturating_sub(used).to_string(),
        ),
        (
            "X-RateLimit-Reset".to_string(),
            format!("{:.3}", epoch + reset_after),
        ),
        (
            "X-RateLimit-Reset-After".to_string(),
            format!("{reset_after:.3}"),
        ),
        (
            "X-RateLimit-Bucket".to_string(),
            "fakebucket0123".to_string(),
        ),
    ];
    let too_many = |retry_after: f64, global: bool, rl: &mut Vec<(String, String)>| {
        rl.push((
            "Retry-After".into(),
            format!("{}", retry_after.ceil() as u64),
        ));
        rl.push((
            "X-RateLimit-Scope".into(),
            if global { "global" } else { "user" }.into(),
        ));
        if global {
            rl.push(("X-RateLimit-Global".into(), "true".into()));
        }
        json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global})
            .to_string()
    };
    if used > limit {
        st.over_limit += 1;
        drop(st);
        let b = too_many(reset_after, false, &mut rl);
        return answer(&mut w, 429, &rl, &b);
    }
    let injected = st.injected.pop_front();
    let drop_after = match injected {
        Some(RestInjected::TooMany {
            retry_after,
            global,
        }) => {
            drop(st);
            let b = too_many(retry_after, global, &mut rl);
            return answer(&mut w, 429, &rl, &b);
        }
        Some(RestInjected::Error {
            status,
            code,
            message,
        }) => {
            drop(st);
            return answer(&mut w, status, &rl, &error_body(code, &message));
        }
        Some(RestInjected::Raw { status, body }) => {
            drop(st);
            return answer(&mut w, status, &rl, &body);
        }
        Some(RestInjected::CreateThenDrop) => true,
        None => false,
    };
    let content = params["content"].as_str().unwrap_or("");
    if content.is_empty() {
        drop(st);
        return answer(
            &mut w,
            400,
            &rl,
            &error_body(50006, "Cannot send an empty message"),
        );
    }
    let nonce = match &params["nonce"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    if content.chars().count() > 2000 || nonce.as_ref().is_some_and(|n| n.len() > 25) {
        drop(st);
        let b = json!({"message": "Invalid Form Body", "code": 50035,
                       "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                  "message": "Must be 2000 or fewer in length."}]}}});
        return answer(&mut w, 400, &rl, &b.to_string());
    }
    let key = nonce.clone().map(|n| (channel.clone(), n));
    let existing = key
        .as_ref()
        .filter(|_| params["enforce_nonce"] == true)
        .and_then(|k| st.nonces.get(k).cloned());
    let message = match existing {
        Some(m) => m,
        None => {
            let id = snowflake(st.next_id);
            st.next_id += 1;
            let reply = params.get("message_reference").cloned();
            let mut m = message_object(
                &id,
                &channel,
                None,
                BOT_ID,
                true,
                content,
                if reply.is_some() { 19 } else { 0 },
            );
            if let Some(n) = &nonce {
                m["nonce"] = json!(n);
            }
            if let Some(k) = key {
                st.nonces.insert(k, m.clone());
            }
            st.sent.push(json!({
                "id": id, "channel_id": channel, "content": content, "nonce": nonce,
                "message_reference": reply, "allowed_mentions": params.get("allowed_mentions"),
            }));
            // The bot's own message comes back on the Gateway, as on Discord.
            FakeDiscord::dispatch(&mut st, "MESSAGE_CREATE", m.clone());
            m
        }
    };
    drop(st);
    shared.changed.notify_all();
    if drop_after {
        let _ = w.shutdown(Shutdown::Both);
        return Ok(());
    }
    answer(&mut w, 200, &rl, &message.to_string())
}
