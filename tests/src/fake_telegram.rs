//! A fake Telegram Bot API server for the channel adapter's tests, wire-exact for what the
//! adapter uses: `getUpdates` and `sendMessage` under `/bot<TOKEN>/`, JSON or form bodies (or
//! query parameters), answers `{"ok":true,"result":...}` or
//! `{"ok":false,"error_code":N,"description":"...","parameters":{"retry_after":S}}`.
//!
//! - [`FakeTelegram::push_text`] / [`FakeTelegram::push_update`] queue updates (ids from
//!   `10_000` up); `getUpdates` drops those below `offset` (confirmed, as Telegram does),
//!   answers up to `limit` of the rest, and with none long-polls up to `timeout` seconds.
//! - `sendMessage` checks `chat_id` and `text` (empty: 400 "message text is empty"; over 4096
//!   UTF-16 units: 400 "message is too long") and an inline keyboard in `reply_markup` (an
//!   object or its JSON text; buttons need `text` and `callback_data` of 1 to 64 bytes: else
//!   400 "can't parse reply keyboard markup JSON object" / "BUTTON_DATA_INVALID"), records the
//!   call ([`FakeTelegram::sent`]) and answers the Message object (with its `reply_markup`).
//! - `getUpdates` honours `allowed_updates` as Telegram does: the list is kept until a call
//!   gives another one, and updates of other kinds are not handed out (they are dropped).
//! - [`FakeTelegram::push_callback`] queues a `callback_query` (a press of an inline keyboard
//!   button by any user); `answerCallbackQuery` accepts each query id it issued once (else
//!   400 "query is too old and response timeout expired or query ID is invalid") and records
//!   it ([`FakeTelegram::answered_callbacks`]).
//! - `editMessageReplyMarkup` checks its parameters (chat and message ids, an inline
//!   keyboard) and answers `true`.
//! - [`FakeTelegram::inject`] makes the next call of a method answer something else: an API
//!   error (429 with `retry_after`, 5xx, 4xx), a raw status and body (malformed JSON), or no
//!   answer at all ([`Injected::Hang`]).
//! - [`FakeTelegram::down`] / [`FakeTelegram::up`] stop listening (connections refused) and
//!   listen again on the same port.
//! - A path with another token answers 401 `Unauthorized`, an unknown method 404.
//!
//! Every request is recorded ([`FakeTelegram::calls`]).

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_llm::{read_body, read_head, reason, serve_connections};

/// The first update id handed out.
pub const FIRST_UPDATE_ID: i64 = 10_000;
/// The bot's own user id (in `from` of sent messages).
pub const BOT_ID: i64 = 4_242;

/// What the next call of a method answers instead of its normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Injected {
    /// `{"ok":false,"error_code":code,"description":...}` with HTTP status `code`, and
    /// `parameters.retry_after` when given.
    Error {
        code: u16,
        description: String,
        retry_after: Option<u64>,
    },
    /// This status and body, as given.
    Raw { status: u16, body: String },
    /// Read the request, never answer (until the server is dropped or goes down).
    Hang,
    /// The normal answer (to let a call through before an injected one).
    Pass,
}

impl Injected {
    /// 429 "Too Many Requests: retry after N" with `retry_after` N.
    pub fn too_many(retry_after: u64) -> Injected {
        Injected::Error {
            code: 429,
            description: format!("Too Many Requests: retry after {retry_after}"),
            retry_after: Some(retry_after),
        }
    }

    /// An API error without parameters.
    pub fn error(code: u16, description: impl Into<String>) -> Injected {
        Injected::Error {
            code,
            description: description.into(),
            retry_after: None,
        }
    }

    /// 200 with a body that is not a Bot API answer.
    pub fn malformed(body: impl Into<String>) -> Injected {
        Injected::Raw {
            status: 200,
            body: body.into(),
        }
    }
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `getUpdates`, `sendMessage`, ... (empty when the path was not `/bot<TOKEN>/METHOD`).
    pub method: String,
    /// Whether the path carried the right token.
    pub token_ok: bool,
    /// The parameters: the JSON body, or the form body / query as a JSON object of strings.
    pub params: Value,
}

#[derive(Debug, Default)]
struct State {
    updates: VecDeque<Value>,
    next_update_id: i64,
    next_message_id: i64,
    injected: HashMap<String, VecDeque<Injected>>,
    calls: Vec<Call>,
    sent: Vec<Value>,
    /// The highest `offset` a getUpdates asked with.
    offset: Option<i64>,
    /// The last `allowed_updates` a getUpdates gave (None: every kind).
    allowed_updates: Option<Vec<String>>,
    /// Callback query ids issued and not yet answered.
    open_callbacks: Vec<String>,
    /// `answerCallbackQuery` calls that succeeded, their parameters.
    answered_callbacks: Vec<Value>,
    next_callback: u64,
}

#[derive(Debug)]
struct Shared {
    token: String,
    state: Mutex<State>,
    changed: Condvar,
    /// Set while down (and for good when dropped): loops and hangs end.
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake Bot API (see the module documentation). Stops when dropped.
#[derive(Debug)]
pub struct FakeTelegram {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeTelegram {
    /// Listen on `127.0.0.1:0` for bot `token`. Panics if it cannot listen.
    pub fn start(token: &str) -> FakeTelegram {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fake Telegram: bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake Telegram: local_addr: {e}"));
        let shared = Arc::new(Shared {
            token: token.to_string(),
            state: Mutex::new(State {
                next_update_id: FIRST_UPDATE_ID,
                next_message_id: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let mut t = FakeTelegram {
            addr,
            shared,
            accept: None,
        };
        t.listen(listener);
        t
    }

    fn listen(&mut self, listener: TcpListener) {
        let sh = Arc::clone(&self.shared);
        self.accept = Some(
            std::thread::Builder::new()
                .name("fake-telegram-accept".into())
                .spawn(move || accept_loop(&listener, &sh))
                .unwrap_or_else(|e| panic!("fake Telegram: spawn: {e}")),
        );
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the adapter's `api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queue an update object; an `update_id` is set when it has none. Returns its id.
    pub fn push_update(&self, mut update: Value) -> i64 {
        let mut st = self.shared.state();
        let id = match update.get("update_id").and_then(Value::as_i64) {
            Some(id) => id,
            None => {
                let id = st.next_update_id;
                update["update_id"] = json!(id);
                id
            }
        };
        st.next_update_id = st.next_update_id.max(id + 1);
        st.updates.push_back(update);
        drop(st);
        self.shared.changed.notify_all();
        id
    }

    /// Queue a text message from user `from_id` in chat `chat_id` (a group when negative).
    /// Returns (update id, message id).
    pub fn push_text(&self, chat_id: i64, from_id: i64, text: &str) -> (i64, i64) {
        self.push_message(chat_id, from_id, json!({"text": text}))
    }

    /// Queue a message with `content` merged into it (e.g. `{"photo": [...], "caption": ".."}`).
    /// Returns (update id, message id).
    pub fn push_message(&self, chat_id: i64, from_id: i64, content: Value) -> (i64, i64) {
        let message_id = {
            let mut st = self.shared.state();
            st.next_message_id += 1;
            st.next_message_id
        };
        let chat = if chat_id < 0 {
            json!({"id": chat_id, "title": "Group", "type": "supergroup"})
        } else {
            json!({"id": chat_id, "first_name": "User", "type": "private"})
        };
        let mut message = json!({
            "message_id": message_id,
            "from": {"id": from_id, "is_bot": false, "first_name": "User", "language_code": "en"},
            "chat": chat,
            "date": now(),
        });
        if let (Some(m), Some(c)) = (message.as_object_mut(), content.as_object()) {
            for (k, v) in c {
                m.insert(k.clone(), v.clone());
            }
        }
        (self.push_update(json!({"message": message})), message_id)
    }

    /// Queue a press of an inline keyboard button with `data` by user `from_id`, on message
    /// `message_id` of chat `chat_id`. Returns (update id, callback query id).
    pub fn push_callback(
        &self,
        chat_id: i64,
        from_id: i64,
        message_id: i64,
        data: &str,
    ) -> (i64, String) {
        let id = {
            let mut st = self.shared.state();
            st.next_callback += 1;
            let id = format!("{}", 4_000_000_000_000_000_000u64 + st.next_callback);
            st.open_callbacks.push(id.clone());
            id
        };
        let update = json!({"callback_query": {
            "id": id,
            "from": {"id": from_id, "is_bot": false, "first_name": "User", "language_code": "en"},
            "message": {
                "message_id": message_id,
                "from": {"id": BOT_ID, "is_bot": true, "first_name": "Fake", "username": "fake_bot"},
                "chat": {"id": chat_id, "first_name": "User", "type": "private"},
                "date": now(),
                "text": "(the message with the keyboard)",
            },
            "chat_instance": "-1234567890",
            "data": data,
        }});
        (self.push_update(update), id)
    }

    /// The parameters of every `answerCallbackQuery` that succeeded, in order.
    pub fn answered_callbacks(&self) -> Vec<Value> {
        self.shared.state().answered_callbacks.clone()
    }

    /// The next call of `method` answers `reply` (queued per method, in order).
    pub fn inject(&self, method: &str, reply: Injected) {
        self.shared
            .state()
            .injected
            .entry(method.to_string())
            .or_default()
            .push_back(reply);
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().calls.clone()
    }

    /// The parameters of every `sendMessage` that succeeded, in order.
    pub fn sent(&self) -> Vec<Value> {
        self.shared.state().sent.clone()
    }

    /// Wait until `n` messages were sent (panics after `limit`); all of them.
    pub fn wait_sent(&self, n: usize, limit: Duration) -> Vec<Value> {
        self.wait(limit, |st| (st.sent.len() >= n).then(|| st.sent.clone()))
            .unwrap_or_else(|| {
                panic!(
                    "fake Telegram: fewer than {n} sent within {limit:?}: {:#?}",
                    self.sent()
                )
            })
    }

    /// Wait until `n` messages were sent to chat `chat` (within `limit`); whether they were.
    /// Waits on the server's own signal, so many waiting threads cost nothing while idle.
    pub fn wait_sent_to(&self, chat: i64, n: usize, limit: Duration) -> bool {
        let to_chat = |m: &Value| m["chat_id"].to_string().trim_matches('"') == chat.to_string();
        self.wait(limit, |st| {
            (st.sent.iter().filter(|m| to_chat(m)).count() >= n).then_some(())
        })
        .is_some()
    }

    /// The highest `offset` a `getUpdates` asked with.
    pub fn offset(&self) -> Option<i64> {
        self.shared.state().offset
    }

    /// Wait until a `getUpdates` asked with `offset` >= `at_least` (panics after `limit`).
    pub fn wait_offset(&self, at_least: i64, limit: Duration) -> i64 {
        self.wait(limit, |st| st.offset.filter(|o| *o >= at_least))
            .unwrap_or_else(|| {
                panic!(
                    "fake Telegram: no getUpdates with offset >= {at_least} within {limit:?} (last {:?})",
                    self.offset()
                )
            })
    }

    /// Wait until `calls` of `method` were made (panics after `limit`).
    pub fn wait_calls(&self, method: &str, n: usize, limit: Duration) -> Vec<Call> {
        self.wait(limit, |st| {
            let c: Vec<Call> = st
                .calls
                .iter()
                .filter(|c| c.method == method)
                .cloned()
                .collect();
            (c.len() >= n).then_some(c)
        })
        .unwrap_or_else(|| panic!("fake Telegram: fewer than {n} {method} calls within {limit:?}"))
    }

    fn wait<T>(&self, limit: Duration, mut f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.state();
        loop {
            if let Some(v) = f(&st) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stop listening: open connections are cut, new ones refused, until [`FakeTelegram::up`].
    pub fn down(&mut self) {
        self.stop_listening();
    }

    /// Listen again on the same port.
    pub fn up(&mut self) {
        if self.accept.is_some() {
            return;
        }
        self.shared.stop.store(false, Ordering::SeqCst);
        let listener = TcpListener::bind(self.addr)
            .unwrap_or_else(|e| panic!("fake Telegram: bind {} again: {e}", self.addr));
        self.listen(listener);
    }

    fn stop_listening(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, c) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    serve_connections(
        listener,
        shared,
        "fake-telegram-conn",
        |s| &s.stop,
        |s| &s.conns,
        serve,
    );
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

/// An integer parameter, sent as a JSON number or a string.
fn int(params: &Value, key: &str) -> Option<i64> {
    match params.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn api_error(code: u16, description: &str, retry_after: Option<u64>) -> (u16, String) {
    let mut v = json!({"ok": false, "error_code": code, "description": description});
    if let Some(r) = retry_after {
        v["parameters"] = json!({"retry_after": r});
    }
    (code, v.to_string())
}

fn ok(result: Value) -> (u16, String) {
    (200, json!({"ok": true, "result": result}).to_string())
}

/// Serve one connection: requests until the client closes or asks to.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut r)? else {
            return Ok(());
        };
        let body = read_body(&mut r, &head)?;
        let keep_alive = !head
            .headers
            .get("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
            && !head.version.eq_ignore_ascii_case("HTTP/1.0");
        let (path, query) = head
            .target
            .split_once('?')
            .unwrap_or((head.target.as_str(), ""));
        let (token_ok, method) = match path.strip_prefix("/bot").and_then(|p| p.split_once('/')) {
            Some((token, method)) => (token == shared.token, method.to_string()),
            None => (false, String::new()),
        };
        let content_type = head
            .headers
            .get("content-type")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let params = if content_type.starts_with("application/json") {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        } else if !body.is_empty() {
            form(&String::from_utf8_lossy(&body))
        } else {
            form(query)
        };
        let injected = {
            let mut st = shared.state();
            st.calls.push(Call {
                method: method.clone(),
                token_ok,
                params: params.clone(),
            });
            shared.changed.notify_all();
            if token_ok {
                st.injected.get_mut(&method).and_then(VecDeque::pop_front)
            } else {
                None
            }
        };
        let (status, reply) = match injected {
            Some(Injected::Hang) => {
                while !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(());
            }
            Some(Injected::Raw { status, body }) => (status, body),
            Some(Injected::Pass) | None if !token_ok => api_error(401, "Unauthorized", None),
            Some(Injected::Error {
                code,
                description,
                retry_after,
            }) => api_error(code, &description, retry_after),
            Some(Injected::Pass) | None if !params.is_object() && !params.is_null() => {
                api_error(400, "Bad Request: invalid parameters", None)
            }
            Some(Injected::Pass) | None => match method.as_str() {
                "getUpdates" => get_updates(shared, &params),
                "sendMessage" => send_message(shared, &params),
                "answerCallbackQuery" => answer_callback(shared, &params),
                "editMessageReplyMarkup" => edit_reply_markup(&params),
                "getMe" => ok(
                    json!({"id": BOT_ID, "is_bot": true, "first_name": "Fake", "username": "fake_bot"}),
                ),
                _ => api_error(404, "Not Found", None),
            },
        };
        let resp = format!(
            "HTTP/1.1 {status} {}\r\nServer: fake-telegram\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: {}\r\n\r\n",
            reason(status),
            reply.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        w.write_all(resp.as_bytes())?;
        w.write_all(reply.as_bytes())?;
        w.flush()?;
        if !keep_alive {
            let _ = w.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

fn get_updates(shared: &Shared, params: &Value) -> (u16, String) {
    let offset = int(params, "offset");
    let limit = int(params, "limit").unwrap_or(100).clamp(1, 100) as usize;
    let timeout = int(params, "timeout").unwrap_or(0).clamp(0, 50) as u64;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut st = shared.state();
    match params.get("allowed_updates") {
        Some(Value::Array(kinds)) => {
            st.allowed_updates = Some(
                kinds
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            );
        }
        Some(Value::String(text)) => {
            st.allowed_updates = serde_json::from_str(text).ok();
        }
        _ => {}
    }
    if let Some(kinds) = st.allowed_updates.clone().filter(|k| !k.is_empty()) {
        // Updates of kinds not asked for are never handed out.
        st.updates.retain(|u| {
            u.as_object().is_some_and(|o| {
                o.keys()
                    .any(|k| k != "update_id" && kinds.iter().any(|a| a == k))
            })
        });
    }
    if let Some(o) = offset {
        st.offset = Some(st.offset.map_or(o, |old| old.max(o)));
        // Updates below the offset are confirmed: Telegram forgets them.
        st.updates
            .retain(|u| u.get("update_id").and_then(Value::as_i64).unwrap_or(0) >= o);
        shared.changed.notify_all();
    }
    loop {
        if !st.updates.is_empty() || shared.stop.load(Ordering::SeqCst) {
            let result: Vec<Value> = st.updates.iter().take(limit).cloned().collect();
            return ok(Value::Array(result));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ok(json!([]));
        }
        st = shared
            .changed
            .wait_timeout(st, left.min(Duration::from_millis(50)))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn send_message(shared: &Shared, params: &Value) -> (u16, String) {
    let chat_id = match params.get("chat_id") {
        Some(Value::Number(n)) => n.as_i64().map(|n| json!(n)),
        Some(Value::String(s)) if !s.is_empty() => Some(json!(s)),
        _ => None,
    };
    let Some(chat_id) = chat_id else {
        return api_error(400, "Bad Request: chat not found", None);
    };
    let text = params.get("text").and_then(Value::as_str).unwrap_or("");
    if text.trim().is_empty() {
        return api_error(400, "Bad Request: message text is empty", None);
    }
    if text.encode_utf16().count() > 4096 {
        return api_error(400, "Bad Request: message is too long", None);
    }
    let markup = match params.get("reply_markup") {
        None => None,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(v) => Some(v),
            Err(_) => {
                return api_error(
                    400,
                    "Bad Request: can't parse reply keyboard markup JSON object",
                    None,
                )
            }
        },
        Some(v) => Some(v.clone()),
    };
    if let Some(m) = &markup {
        if let Err(why) = check_inline_keyboard(m) {
            return api_error(400, &format!("Bad Request: {why}"), None);
        }
    }
    let mut st = shared.state();
    st.next_message_id += 1;
    let message_id = st.next_message_id;
    st.sent.push(params.clone());
    shared.changed.notify_all();
    let mut message = json!({
        "message_id": message_id,
        "from": {"id": BOT_ID, "is_bot": true, "first_name": "Fake", "username": "fake_bot"},
        "chat": {"id": chat_id, "type": "private"},
        "date": now(),
        "text": text,
    });
    if let Some(r) = params
        .get("reply_parameters")
        .and_then(|r| r.get("message_id"))
        .or_else(|| params.get("reply_to_message_id"))
    {
        message["reply_to_message"] = json!({"message_id": r});
    }
    if let Some(m) = markup {
        message["reply_markup"] = m;
    }
    ok(message)
}

/// An `InlineKeyboardMarkup` as Telegram checks it (only callback buttons are modelled).
fn check_inline_keyboard(m: &Value) -> Result<(), &'static str> {
    const BAD: &str = "can't parse reply keyboard markup JSON object";
    let rows = m
        .get("inline_keyboard")
        .and_then(Value::as_array)
        .ok_or(BAD)?;
    for row in rows {
        for b in row.as_array().ok_or(BAD)? {
            let text = b.get("text").and_then(Value::as_str).ok_or(BAD)?;
            if text.is_empty() {
                return Err("BUTTON_TEXT_EMPTY");
            }
            let data = b.get("callback_data").and_then(Value::as_str).ok_or(BAD)?;
            if data.is_empty() || data.len() > 64 {
                return Err("BUTTON_DATA_INVALID");
            }
        }
    }
    Ok(())
}

/// `editMessageReplyMarkup` of a message in a chat: Telegram answers the edited Message; the
/// fake checks the parameters' shape and answers `true` (what Telegram gives for an inline
/// message). The call is in [`FakeTelegram::calls`].
fn edit_reply_markup(params: &Value) -> (u16, String) {
    let ids = params.get("chat_id").is_some_and(Value::is_i64)
        && params.get("message_id").is_some_and(Value::is_i64);
    let markup = params
        .get("reply_markup")
        .and_then(|m| m.get("inline_keyboard"))
        .is_some_and(Value::is_array);
    if ids && markup {
        ok(json!(true))
    } else {
        api_error(
            400,
            "Bad Request: message identifier or reply markup is missing",
            None,
        )
    }
}

fn answer_callback(shared: &Shared, params: &Value) -> (u16, String) {
    let id = params
        .get("callback_query_id")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut st = shared.state();
    let Some(i) = st.open_callbacks.iter().position(|c| c == id) else {
        return api_error(
            400,
            "Bad Request: query is too old and response timeout expired or query ID is invalid",
            None,
        );
    };
    st.open_callbacks.remove(i);
    st.answered_callbacks.push(params.clone());
    shared.changed.notify_all();
    ok(json!(true))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, Read};

    use super::*;

    const TOKEN: &str = "123:fake-token_abcdefgh";

    fn call(t: &FakeTelegram, path: &str, body: &str) -> (u16, Value) {
        let mut s = TcpStream::connect(t.addr()).unwrap_or_else(|e| panic!("connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)
            .unwrap_or_else(|e| panic!("status: {e}"));
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut rest = String::new();
        r.read_to_string(&mut rest)
            .unwrap_or_else(|e| panic!("read: {e}"));
        let body = rest.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
        )
    }

    #[test]
    fn updates_offsets_sends_and_injections() {
        let mut t = FakeTelegram::start(TOKEN);
        let p = format!("/bot{TOKEN}");
        let (u1, _) = t.push_text(7, 7, "hi");
        let (u2, _) = t.push_text(-100, 8, "group");
        assert_eq!((u1, u2), (FIRST_UPDATE_ID, FIRST_UPDATE_ID + 1));
        let (s, v) = call(&t, &format!("{p}/getUpdates"), r#"{"timeout":0}"#);
        assert_eq!(s, 200);
        assert_eq!(v["result"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["result"][0]["message"]["text"], "hi");
        assert_eq!(v["result"][1]["message"]["chat"]["type"], "supergroup");
        // The offset confirms the first.
        let (_, v) = call(
            &t,
            &format!("{p}/getUpdates"),
            &format!(r#"{{"offset":{u2}}}"#),
        );
        assert_eq!(v["result"][0]["update_id"], u2);
        assert_eq!(v["result"].as_array().map(Vec::len), Some(1));
        assert_eq!(t.offset(), Some(u2));
        // Long poll: nothing after u2, 1 s.
        let start = Instant::now();
        let (_, v) = call(
            &t,
            &format!("{p}/getUpdates"),
            &format!(r#"{{"offset":{},"timeout":1}}"#, u2 + 1),
        );
        assert_eq!(v["result"], json!([]));
        assert!(start.elapsed() >= Duration::from_millis(900));
        // Send, and its checks.
        let (s, v) = call(
            &t,
            &format!("{p}/sendMessage"),
            r#"{"chat_id":7,"text":"yo"}"#,
        );
        assert_eq!(
            (s, v["ok"].clone(), v["result"]["text"].clone()),
            (200, json!(true), json!("yo"))
        );
        let (s, v) = call(
            &t,
            &format!("{p}/sendMessage"),
            r#"{"chat_id":7,"text":""}"#,
        );
        assert_eq!(
            (s, v["description"].clone()),
            (400, json!("Bad Request: message text is empty"))
        );
        let long = "x".repeat(4097);
        let (s, _) = call(
            &t,
            &format!("{p}/sendMessage"),
            &json!({"chat_id": 7, "text": long}).to_string(),
        );
        assert_eq!(s, 400);
        assert_eq!(t.sent().len(), 1);
        // Wrong token, unknown method.
        let (s, v) = call(&t, "/bot1:other/getMe", "{}");
        assert_eq!((s, v["description"].clone()), (401, json!("Unauthorized")));
        let (s, _) = call(&t, &format!("{p}/nope"), "{}");
        assert_eq!(s, 404);
        // Injections, in order, per method.
        t.inject("sendMessage", Injected::too_many(3));
        t.inject("sendMessage", Injected::malformed("{oops"));
        let (s, v) = call(
            &t,
            &format!("{p}/sendMessage"),
            r#"{"chat_id":7,"text":"a"}"#,
        );
        assert_eq!((s, v["parameters"]["retry_after"].clone()), (429, json!(3)));
        let (s, v) = call(
            &t,
            &format!("{p}/sendMessage"),
            r#"{"chat_id":7,"text":"a"}"#,
        );
        assert_eq!((s, v), (200, json!("{oops")));
        assert_eq!(t.sent().len(), 1);
        // Down: refused; up: served on the same port.
        t.down();
        assert!(TcpStream::connect(t.addr()).is_err());
        t.up();
        let (s, _) = call(&t, &format!("{p}/getMe"), "{}");
        assert_eq!(s, 200);
        let calls = t.calls();
        let wrong: Vec<_> = calls.iter().filter(|c| !c.token_ok).collect();
        assert_eq!(wrong.len(), 1, "{calls:#?}");
        assert_eq!(wrong[0].method, "getMe");
    }

    #[test]
    fn callbacks_keyboards_and_allowed_updates() {
        let t = FakeTelegram::start(TOKEN);
        let p = format!("/bot{TOKEN}");
        t.push_text(5, 5, "a message");
        let (_, cb) = t.push_callback(5, 6, 77, "allow 1");
        // Only messages asked for: the button press is never handed out.
        let (s, v) = call(
            &t,
            &format!("{p}/getUpdates"),
            r#"{"timeout":0,"allowed_updates":["message"]}"#,
        );
        assert_eq!(s, 200);
        assert_eq!(v["result"].as_array().map(Vec::len), Some(1), "{v}");
        let (_, cb2) = t.push_callback(5, 6, 77, "deny 1");
        let (_, v) = call(
            &t,
            &format!("{p}/getUpdates"),
            r#"{"timeout":0,"allowed_updates":["message","callback_query"]}"#,
        );
        let r = v["result"].as_array().cloned().unwrap_or_default();
        assert_eq!(r.len(), 2, "{v}");
        assert_eq!(r[1]["callback_query"]["data"], "deny 1");
        assert_eq!(r[1]["callback_query"]["from"]["id"], 6);
        assert_eq!(r[1]["callback_query"]["message"]["chat"]["id"], 5);
        // The list is kept: a later call without it still gets button presses.
        let (_, v) = call(&t, &format!("{p}/getUpdates"), r#"{"timeout":0}"#);
        assert_eq!(v["result"].as_array().map(Vec::len), Some(2), "{v}");
        // Each issued query is answered once; the dropped one too; unknown ones not.
        let body = format!(r#"{{"callback_query_id":"{cb2}"}}"#);
        assert_eq!(call(&t, &format!("{p}/answerCallbackQuery"), &body).0, 200);
        let (s, v) = call(&t, &format!("{p}/answerCallbackQuery"), &body);
        assert_eq!(s, 400, "{v}");
        assert!(
            v["description"]
                .as_str()
                .unwrap_or("")
                .contains("query is too old"),
            "{v}"
        );
        let body = format!(r#"{{"callback_query_id":"{cb}"}}"#);
        assert_eq!(call(&t, &format!("{p}/answerCallbackQuery"), &body).0, 200);
        assert_eq!(t.answered_callbacks().len(), 2);
        // Inline keyboards: checked, echoed, recorded.
        let good = r#"{"chat_id":5,"text":"x","reply_markup":{"inline_keyboard":[[{"text":"Allow","callback_data":"allow 1"}]]}}"#;
        let (s, v) = call(&t, &format!("{p}/sendMessage"), good);
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["result"]["reply_markup"]["inline_keyboard"][0][0]["callback_data"],
            "allow 1"
        );
        let long = "x".repeat(65);
        for (bad, want) in [
            (r#"{"inline_keyboard":"no"}"#.to_string(), "can't parse"),
            (
                r#"{"inline_keyboard":[[{"text":"A"}]]}"#.to_string(),
                "can't parse",
            ),
            (
                r#"{"inline_keyboard":[[{"text":"","callback_data":"a"}]]}"#.to_string(),
                "BUTTON_TEXT_EMPTY",
            ),
            (
                format!(r#"{{"inline_keyboard":[[{{"text":"A","callback_data":"{long}"}}]]}}"#),
                "BUTTON_DATA_INVALID",
            ),
            (r#""{not json""#.to_string(), "can't parse"),
        ] {
            let body = format!(r#"{{"chat_id":5,"text":"x","reply_markup":{bad}}}"#);
            let (s, v) = call(&t, &format!("{p}/sendMessage"), &body);
            assert_eq!(s, 400, "{bad}: {v}");
            assert!(
                v["description"].as_str().unwrap_or("").contains(want),
                "{bad}: {v}"
            );
        }
        assert_eq!(t.sent().len(), 1);
    }

    #[test]
    fn form_bodies_and_queries_are_read() {
        let t = FakeTelegram::start(TOKEN);
        let mut s = TcpStream::connect(t.addr()).unwrap_or_else(|e| panic!("connect: {e}"));
        let body = "chat_id=7&text=a%20b+c";
        let req = format!(
            "POST /bot{TOKEN}/sendMessage HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(t.sent()[0]["text"], "a b c");
    }
}
