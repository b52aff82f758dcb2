//! A fake Slack for the Slack adapter's tests (Slack is hosted-only), wire-exact for what the
//! adapter uses:
//!
//! - the Web API under `/api/`: `apps.connections.open` (app-level token `xapp-…` in
//!   `Authorization: Bearer`, else `{"ok":false,"error":"invalid_auth"}`; a token of another
//!   kind: `not_allowed_token_type`) answering `{"ok":true,"url":"ws://127.0.0.1:P/link/?ticket=…&app_id=…"}`
//!   with a single-use ticket; `chat.postMessage` (bot token `xoxb-…`; JSON or form body;
//!   `channel_not_found`, `no_text`, `msg_too_long` over 40000 characters, `invalid_thread_ts`
//!   for a `thread_ts` that is not a timestamp) answering `{"ok":true,"channel":…,"ts":…,"message":{…}}`;
//!   an unknown method `unknown_method` (404). Rate limits: HTTP 429 with `Retry-After` and
//!   `{"ok":false,"error":"ratelimited"}`.
//! - Socket Mode on its own port: the WebSocket handshake at `/link/?ticket=…` (a ticket not
//!   issued, or used before, is refused with 401), then `hello`, then `events_api` envelopes
//!   (`envelope_id`, `payload` = the event callback, `accepts_response_payload`,
//!   `retry_attempt`, `retry_reason`). An envelope stays pending until the client answers
//!   `{"envelope_id": …}`; a pending envelope is sent again on the next connection with
//!   `retry_attempt` + 1 and `retry_reason` `"timeout"`, as Slack does.
//! - [`FakeSlack::disconnect`] sends `{"type":"disconnect","reason":…}` and closes;
//!   [`FakeSlack::drop_after_next_envelope`] cuts the TCP connection right after sending the
//!   next envelope (before any acknowledgement); [`FakeSlack::send_raw`] sends a text frame as
//!   given (malformed frames); [`FakeSlack::inject`] makes the next call of a Web API method
//!   answer something else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::Message;

use crate::fake_llm::{read_body, read_head, reason, serve_connections};

/// The app's id in socket URLs and payloads.
pub const APP_ID: &str = "A0FAKEAPP01";
/// The workspace.
pub const TEAM_ID: &str = "T0FAKETEAM1";
/// The bot's own user id and bot id (in the messages it posts).
pub const BOT_USER: &str = "U0FAKEBOT01";
pub const BOT_ID: &str = "B0FAKEBOT01";

/// What the next call of a Web API method answers instead of its normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Injected {
    /// 429 with `Retry-After: secs` and `{"ok":false,"error":"ratelimited"}`.
    RateLimited(u64),
    /// HTTP 200 with `{"ok":false,"error":…}`.
    Error(String),
    /// This status and body, as given.
    Raw { status: u16, body: String },
}

/// One Web API request.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    pub params: Value,
}

#[derive(Debug)]
struct Pending {
    envelope_id: String,
    payload: Value,
    attempts: u64,
    /// The connection it was last sent on.
    sent_on: Option<u64>,
}

#[derive(Debug)]
enum Control {
    Disconnect(String),
    Raw(String),
    DropAfterNextEnvelope,
}

#[derive(Debug, Default)]
struct State {
    pending: VecDeque<Pending>,
    acked: Vec<String>,
    /// Acknowledgements of envelopes not pending (late repeats).
    stray_acks: Vec<String>,
    tickets: HashSet<String>,
    /// Socket connections accepted (hello sent).
    connections: u64,
    /// Handshakes refused.
    refused: u64,
    control: VecDeque<Control>,
    injected: HashMap<String, VecDeque<Injected>>,
    calls: Vec<Call>,
    posted: Vec<Value>,
    next: u64,
}

#[derive(Debug)]
struct Shared {
    app_token: String,
    bot_token: String,
    ws_port: u16,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake (see the module documentation). Stops when dropped.
#[derive(Debug)]
pub struct FakeSlack {
    api: SocketAddr,
    ws: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeSlack {
    /// Listen on two loopback ports (Web API, Socket Mode) for these tokens.
    pub fn start(app_token: &str, bot_token: &str) -> FakeSlack {
        let bind =
            || TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("fake Slack: bind: {e}"));
        let (api_l, ws_l) = (bind(), bind());
        let addr = |l: &TcpListener| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("fake Slack: local_addr: {e}"))
        };
        let (api, ws) = (addr(&api_l), addr(&ws_l));
        let shared = Arc::new(Shared {
            app_token: app_token.into(),
            bot_token: bot_token.into(),
            ws_port: ws.port(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let spawn = |name: &str,
                     l: TcpListener,
                     serve: fn(TcpStream, &Shared) -> std::io::Result<()>| {
            let sh = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    serve_connections(&l, &sh, "fake-slack-conn", |s| &s.stop, |s| &s.conns, serve)
                })
                .unwrap_or_else(|e| panic!("fake Slack: spawn: {e}"))
        };
        let threads = vec![
            spawn("fake-slack-api", api_l, serve_api),
            spawn("fake-slack-ws", ws_l, serve_socket),
        ];
        FakeSlack {
            api,
            ws,
            shared,
            threads,
        }
    }

    /// `http://127.0.0.1:PORT/api`: the adapter's `api_base`.
    pub fn api_base(&self) -> String {
        format!("http://{}/api", self.api)
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.ws
    }

    fn next(&self) -> u64 {
        let mut st = self.shared.state();
        st.next += 1;
        st.next
    }

    /// A message `ts` not handed out before.
    pub fn new_ts(&self) -> String {
        format!("1700000000.{:06}", self.next())
    }

    /// Queue an `events_api` envelope carrying `event`; its envelope id.
    pub fn push_event(&self, event: Value) -> String {
        let n = self.next();
        let envelope_id = format!("{n:08x}-fake-4e5a-9c1d-envelope{n:04}");
        let payload = json!({
            "token": "XXYYZZ",
            "team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": format!("Ev0FAKE{n:06}"),
            "event_time": 1_700_000_000 + n,
            "authorizations": [{"enterprise_id": null, "team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": true, "is_enterprise_install": false}],
            "is_ext_shared_channel": false,
            "event_context": format!("4-fake-context-{n}"),
        });
        let mut st = self.shared.state();
        st.pending.push_back(Pending {
            envelope_id: envelope_id.clone(),
            payload,
            attempts: 0,
            sent_on: None,
        });
        self.shared.changed.notify_all();
        envelope_id
    }

    /// A user's message in `channel` (`channel_type` from its first letter: D → im, G →
    /// group, else channel), in the thread `thread_ts` if given. Returns (envelope id, ts).
    pub fn push_message(
        &self,
        channel: &str,
        user: &str,
        text: &str,
        thread_ts: Option<&str>,
    ) -> (String, String) {
        let ts = self.new_ts();
        let channel_type = match channel.chars().next() {
            Some('D') => "im",
            Some('G') => "group",
            _ => "channel",
        };
        let mut event = json!({
            "client_msg_id": format!("0fake-msg-{ts}"),
            "type": "message",
            "text": text,
            "user": user,
            "ts": ts,
            "team": TEAM_ID,
            "channel": channel,
            "event_ts": ts,
            "channel_type": channel_type,
        });
        if let Some(t) = thread_ts {
            event["thread_ts"] = json!(t);
            event["parent_user_id"] = json!(user);
        }
        (self.push_event(event), ts)
    }

    /// Send `{"type":"disconnect","reason":reason}` on the live connection and close it.
    pub fn disconnect(&self, reason: &str) {
        self.control(Control::Disconnect(reason.into()));
    }

    /// Send `text` as a text frame on the live connection.
    pub fn send_raw(&self, text: &str) {
        self.control(Control::Raw(text.into()));
    }

    /// Cut the connection right after the next envelope is sent.
    pub fn drop_after_next_envelope(&self) {
        self.control(Control::DropAfterNextEnvelope);
    }

    fn control(&self, c: Control) {
        self.shared.state().control.push_back(c);
        self.shared.changed.notify_all();
    }

    /// The next call of `method` answers `reply`.
    pub fn inject(&self, method: &str, reply: Injected) {
        self.shared
            .state()
            .injected
            .entry(method.into())
            .or_default()
            .push_back(reply);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().calls.clone()
    }

    /// The parameters of every `chat.postMessage` that succeeded.
    pub fn posted(&self) -> Vec<Value> {
        self.shared.state().posted.clone()
    }

    /// Envelope ids acknowledged, in order.
    pub fn acked(&self) -> Vec<String> {
        self.shared.state().acked.clone()
    }

    /// Acknowledgements of envelopes that were no longer pending.
    pub fn stray_acks(&self) -> Vec<String> {
        self.shared.state().stray_acks.clone()
    }

    /// Envelope ids still waiting for an acknowledgement.
    pub fn pending(&self) -> Vec<String> {
        self.shared
            .state()
            .pending
            .iter()
            .map(|p| p.envelope_id.clone())
            .collect()
    }

    /// Socket connections that got their `hello`.
    pub fn connections(&self) -> u64 {
        self.shared.state().connections
    }

    /// Handshakes refused (bad or used ticket).
    pub fn refused(&self) -> u64 {
        self.shared.state().refused
    }

    /// Wait until `f` gives Some (panics after `limit`, saying `what`).
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&FakeSlack) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "fake Slack: timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for `n` posted messages; all of them.
    pub fn wait_posted(&self, n: usize, limit: Duration) -> Vec<Value> {
        self.wait(&format!("{n} posted messages"), limit, |s| {
            let p = s.posted();
            (p.len() >= n).then_some(p)
        })
    }

    /// Wait until `envelope_id` is acknowledged.
    pub fn wait_acked(&self, envelope_id: &str, limit: Duration) {
        self.wait(&format!("the ack of {envelope_id}"), limit, |s| {
            s.acked().iter().any(|a| a == envelope_id).then_some(())
        });
    }
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let _ = TcpStream::connect_timeout(&self.api, Duration::from_secs(1));
        let _ = TcpStream::connect_timeout(&self.ws, Duration::from_secs(1));
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

// ------------------------------------------------------------------------------------------
// The Web API

fn api_error(error: &str) -> (u16, Option<u64>, String) {
    (200, None, json!({"ok": false, "error": error}).to_string())
}

/// `a=1&b=x%20y` as a JSON object of strings.
fn form(text: &str) -> Value {
    let mut o = serde_json::Map::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        o.insert(unescape(k), Value::String(unescape(v)));
    }
    Value::Object(o)
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_api(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut r)? else {
            return Ok(());
        };
        let body = read_body(&mut r, &head)?;
        let method = head
            .target
            .split('?')
            .next()
            .unwrap_or("")
            .strip_prefix("/api/")
            .unwrap_or("")
            .to_string();
        let content_type = head
            .headers
            .get("content-type")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let params = if content_type.starts_with("application/json") {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        } else {
            form(&String::from_utf8_lossy(&body))
        };
        let authorization = head.headers.get("authorization").cloned();
        let token = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let injected = {
            let mut st = shared.state();
            st.calls.push(Call {
                method: method.clone(),
                authorization,
                params: params.clone(),
            });
            shared.changed.notify_all();
            st.injected.get_mut(&method).and_then(VecDeque::pop_front)
        };
        let (status, retry_after, reply) = match injected {
            Some(Injected::RateLimited(secs)) => (
                429,
                Some(secs),
                json!({"ok": false, "error": "ratelimited"}).to_string(),
            ),
            Some(Injected::Error(e)) => api_error(&e),
            Some(Injected::Raw { status, body }) => (status, None, body),
            None => match method.as_str() {
                "apps.connections.open" => open_connection(shared, &token),
                "chat.postMessage" => post_message(shared, &token, &params),
                _ => (
                    404,
                    None,
                    json!({"ok": false, "error": "unknown_method"}).to_string(),
                ),
            },
        };
        let mut resp = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n",
            reason(status),
            reply.len()
        );
        if let Some(s) = retry_after {
            resp.push_str(&format!("retry-after: {s}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&reply);
        w.write_all(resp.as_bytes())?;
        w.flush()?;
        if head
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            return Ok(());
        }
    }
}

fn open_connection(shared: &Shared, token: &str) -> (u16, Option<u64>, String) {
    if token.starts_with("xoxb-") || token.starts_with("xoxp-") {
        return api_error("not_allowed_token_type");
    }
    if token != shared.app_token {
        return api_error("invalid_auth");
    }
    let mut st = shared.state();
    st.next += 1;
    let ticket = format!(
        "{:016x}-fake-ticket",
        st.next.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    st.tickets.insert(ticket.clone());
    (
        200,
        None,
        json!({
            "ok": true,
            "url": format!("ws://127.0.0.1:{}/link/?ticket={ticket}&app_id={APP_ID}", shared.ws_port),
        })
        .to_string(),
    )
}

fn is_ts(s: &str) -> bool {
    s.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
    })
}

fn post_message(shared: &Shared, token: &str, params: &Value) -> (u16, Option<u64>, String) {
    if token.starts_with("xapp-") {
        return api_error("not_allowed_token_type");
    }
    if token != shared.bot_token {
        return api_error("invalid_auth");
    }
    let channel = params.get("channel").and_then(Value::as_str).unwrap_or("");
    let ok_channel = channel.len() >= 2
        && channel
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !ok_channel {
        return api_error("channel_not_found");
    }
    let text = params.get("text").and_then(Value::as_str).unwrap_or("");
    if text.is_empty() {
        return api_error("no_text");
    }
    if text.chars().count() > 40_000 {
        return api_error("msg_too_long");
    }
    let thread_ts = params.get("thread_ts").and_then(Value::as_str);
    if thread_ts.is_some_and(|t| !is_ts(t)) {
        return api_error("invalid_thread_ts");
    }
    let mut st = shared.state();
    st.next += 1;
    let ts = format!("1700000001.{:06}", st.next);
    st.posted.push(params.clone());
    shared.changed.notify_all();
    // A user id posts into the app's direct messages with that user.
    let shown_channel = if channel.starts_with('U') || channel.starts_with('W') {
        format!("D{}", &channel[1..])
    } else {
        channel.to_string()
    };
    let mut message = json!({
        "bot_id": BOT_ID, "type": "message", "text": text, "user": BOT_USER, "ts": ts,
        "app_id": APP_ID, "team": TEAM_ID,
    });
    if let Some(t) = thread_ts {
        message["thread_ts"] = json!(t);
    }
    (
        200,
        None,
        json!({"ok": true, "channel": shown_channel, "ts": ts, "message": message}).to_string(),
    )
}

// ------------------------------------------------------------------------------------------
// Socket Mode

fn serve_socket(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // The handshake callback's type is tungstenite's (`Callback`), large error and all.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let uri = req.uri();
        let ticket = uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("ticket="))
            .unwrap_or("")
            .to_string();
        let mut st = shared.state();
        if uri.path() == "/link/" && st.tickets.remove(&ticket) {
            Ok(resp)
        } else {
            st.refused += 1;
            let mut e = ErrorResponse::new(Some("invalid ticket".into()));
            *e.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
            Err(e)
        }
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream.try_clone()?, check) else {
        return Ok(());
    };
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    let serial = {
        let mut st = shared.state();
        st.connections += 1;
        st.connections
    };
    let hello = json!({
        "type": "hello",
        "num_connections": 1,
        "debug_info": {"host": "applink-fake-1", "build_number": 1, "approximate_connection_time": 18060},
        "connection_info": {"app_id": APP_ID},
    });
    if ws.send(Message::text(hello.to_string())).is_err() {
        return Ok(());
    }
    let mut drop_after_envelope = false;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        // What to send now: a control, or the pending envelopes not yet sent here.
        let (controls, envelopes) = {
            let mut st = shared.state();
            let controls: Vec<Control> = st.control.drain(..).collect();
            let mut out = Vec::new();
            for p in st.pending.iter_mut().filter(|p| p.sent_on != Some(serial)) {
                let envelope = json!({
                    "envelope_id": p.envelope_id,
                    "payload": p.payload,
                    "type": "events_api",
                    "accepts_response_payload": false,
                    "retry_attempt": p.attempts,
                    "retry_reason": if p.attempts == 0 { "" } else { "timeout" },
                });
                p.attempts += 1;
                p.sent_on = Some(serial);
                out.push(envelope.to_string());
            }
            (controls, out)
        };
        for c in controls {
            match c {
                Control::Raw(t) => {
                    if ws.send(Message::text(t)).is_err() {
                        return Ok(());
                    }
                }
                Control::Disconnect(reason) => {
                    let frame = json!({"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-fake-1"}});
                    let _ = ws.send(Message::text(frame.to_string()));
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    let _ = stream.shutdown(Shutdown::Both);
                    return Ok(());
                }
                Control::DropAfterNextEnvelope => drop_after_envelope = true,
            }
        }
        for e in envelopes {
            if ws.send(Message::text(e)).is_err() {
                return Ok(());
            }
            if drop_after_envelope {
                let _ = stream.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if let Some(id) = v.get("envelope_id").and_then(Value::as_str) {
                    let mut st = shared.state();
                    match st.pending.iter().position(|p| p.envelope_id == id) {
                        Some(i) => {
                            st.pending.remove(i);
                            st.acked.push(id.to_string());
                        }
                        None => st.stray_acks.push(id.to_string()),
                    }
                    shared.changed.notify_all();
                }
            }
            Ok(Message::Close(_)) => return Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    const APP: &str = "xapp-1-A1-1-abcdef";
    const BOT: &str = "xoxb-1-2-abcdef";

    /// One HTTP exchange: (status line, headers and body as text).
    fn post(addr: SocketAddr, method: &str, token: &str, body: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "POST /api/{method} HTTP/1.1\r\nhost: slack.com\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap_or_else(|e| panic!("{e}"));
        let (status, rest) = out.split_once("\r\n").unwrap_or((&out, ""));
        (status.to_string(), rest.to_string())
    }

    fn url_of(answer: &str) -> String {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        v["url"].as_str().unwrap_or("").to_string()
    }

    #[test]
    fn tickets_are_single_use_and_envelopes_wait_for_their_ack() {
        let f = FakeSlack::start(APP, BOT);
        let (status, rest) = post(f.api_addr(), "apps.connections.open", BOT, "{}");
        assert!(
            status.ends_with("200 OK") && rest.contains("not_allowed_token_type"),
            "{rest}"
        );
        let (_, rest) = post(f.api_addr(), "apps.connections.open", APP, "{}");
        let url = url_of(&rest);
        assert!(
            url.starts_with("ws://127.0.0.1:") && url.contains("ticket="),
            "{url}"
        );
        let env = f.push_message("C1", "U1", "hi", None).0;
        let (mut ws, _) = tungstenite::connect(url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let hello = ws.read().unwrap_or_else(|e| panic!("{e}"));
        assert!(hello.to_text().unwrap_or("").contains("\"type\":\"hello\""));
        let first = ws.read().unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_str(first.to_text().unwrap_or("")).unwrap_or(Value::Null);
        assert_eq!(
            (v["type"].as_str(), v["envelope_id"].as_str()),
            (Some("events_api"), Some(env.as_str()))
        );
        assert_eq!(v["payload"]["event"]["text"], "hi");
        assert_eq!(v["retry_attempt"], 0);
        // Not acknowledged: sent again on the next connection, as a retry.
        drop(ws);
        assert!(
            tungstenite::connect(url.as_str()).is_err(),
            "a ticket used twice"
        );
        assert_eq!(f.refused(), 1);
        let (_, rest) = post(f.api_addr(), "apps.connections.open", APP, "{}");
        let (mut ws, _) =
            tungstenite::connect(url_of(&rest).as_str()).unwrap_or_else(|e| panic!("{e}"));
        let _hello = ws.read();
        let again = ws.read().unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_str(again.to_text().unwrap_or("")).unwrap_or(Value::Null);
        assert_eq!(
            (v["retry_attempt"].as_u64(), v["retry_reason"].as_str()),
            (Some(1), Some("timeout"))
        );
        ws.send(Message::text(json!({"envelope_id": env}).to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        f.wait_acked(&env, Duration::from_secs(5));
        assert!(f.pending().is_empty());
    }

    #[test]
    fn post_message_checks_and_rate_limits() {
        let f = FakeSlack::start(APP, BOT);
        let (_, rest) = post(
            f.api_addr(),
            "chat.postMessage",
            APP,
            r#"{"channel":"C1","text":"x"}"#,
        );
        assert!(rest.contains("not_allowed_token_type"), "{rest}");
        let (_, rest) = post(
            f.api_addr(),
            "chat.postMessage",
            BOT,
            r#"{"channel":"C1","text":""}"#,
        );
        assert!(rest.contains("no_text"), "{rest}");
        let (_, rest) = post(
            f.api_addr(),
            "chat.postMessage",
            BOT,
            r#"{"channel":"C1","text":"x","thread_ts":"nope"}"#,
        );
        assert!(rest.contains("invalid_thread_ts"), "{rest}");
        f.inject("chat.postMessage", Injected::RateLimited(3));
        let (status, rest) = post(
            f.api_addr(),
            "chat.postMessage",
            BOT,
            r#"{"channel":"C1","text":"x"}"#,
        );
        assert!(status.ends_with("429 Too Many Requests"), "{status}");
        assert!(
            rest.contains("retry-after: 3\r\n") && rest.contains("\"ratelimited\""),
            "{rest}"
        );
        let (_, rest) = post(
            f.api_addr(),
            "chat.postMessage",
            BOT,
            r#"{"channel":"C1","text":"x","thread_ts":"1.2"}"#,
        );
        assert!(
            rest.contains("\"ok\":true") && rest.contains("\"ts\""),
            "{rest}"
        );
        assert_eq!(f.posted().len(), 1);
    }
}
