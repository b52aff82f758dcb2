//! A fake OpenAI-compatible chat-completions server for the gateway's agent tests.
//!
//! [`FakeLlm::start`] listens on `127.0.0.1:0` and answers every `POST .../chat/completions`
//! (`/v1/chat/completions`, or the same path under any prefix) with the next [`Scripted`]
//! reply, in order; once the script is exhausted it answers a text reply `"script exhausted"`,
//! or, after [`FakeLlm::echo_when_exhausted`], `"echo: "` followed by the request's last user
//! message (what concurrent conversations need: each gets an answer of its own, in any order).
//! Every request (any path) is recorded ([`FakeLlm::requests`]). HTTP/1.1 with `Content-Length`
//! (or chunked) request bodies; connections are kept alive unless the client sends
//! `Connection: close` (or speaks HTTP/1.0 without `keep-alive`). Other paths get 404 and do not
//! consume the script.
//!
//! The reply bodies have the wire shape of OpenAI's `chat.completion` object:
//!
//! ```json
//! {"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"<the request's model>",
//!  "choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],
//!  "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}
//! ```
//!
//! and for tool calls `"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1",
//! "type":"function","function":{"name":"exec","arguments":"{\"argv\":[\"ls\"]}"}}]}` with
//! `"finish_reason":"tool_calls"`; tool-call ids are `call_1`, `call_2`, ... across the whole
//! server's life.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The largest request head or body the server reads.
const MAX_REQUEST: usize = 16 << 20;

/// Token counts in a reply's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    /// `prompt` + `completion` tokens (total their sum).
    pub fn new(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        })
    }
}

impl Default for Usage {
    /// 10 prompt + 5 completion = 15 tokens.
    fn default() -> Usage {
        Usage::new(10, 5)
    }
}

/// One scripted answer of the [`FakeLlm`].
#[derive(Debug, Clone, PartialEq)]
pub enum Scripted {
    /// 200, an assistant message with `content`, `finish_reason` `"stop"`.
    Text { content: String, usage: Usage },
    /// 200, an assistant message with `tool_calls` (name, arguments) — the arguments are sent
    /// JSON-encoded as a string, as OpenAI does — `content` null, `finish_reason` `"tool_calls"`.
    ToolCalls {
        calls: Vec<(String, Value)>,
        usage: Usage,
    },
    /// This HTTP status with this body (sent as `application/json`, whatever it is).
    HttpError { status: u16, body: String },
    /// 200 with this body as it is (e.g. not JSON, or JSON without `choices`).
    Malformed { body: String },
}

impl Scripted {
    /// [`Scripted::Text`] with the default [`Usage`].
    pub fn text(content: impl Into<String>) -> Scripted {
        Scripted::Text {
            content: content.into(),
            usage: Usage::default(),
        }
    }

    /// [`Scripted::ToolCalls`] with the default [`Usage`], e.g.
    /// `Scripted::tool_calls([("exec", json!({"argv": ["/usr/bin/ls"]}))])`.
    pub fn tool_calls<N: Into<String>>(calls: impl IntoIterator<Item = (N, Value)>) -> Scripted {
        Scripted::ToolCalls {
            calls: calls.into_iter().map(|(n, a)| (n.into(), a)).collect(),
            usage: Usage::default(),
        }
    }

    /// One tool call (see [`Scripted::tool_calls`]).
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Scripted {
        Scripted::tool_calls([(name.into(), arguments)])
    }

    /// [`Scripted::HttpError`].
    pub fn http_error(status: u16, body: impl Into<String>) -> Scripted {
        Scripted::HttpError {
            status,
            body: body.into(),
        }
    }

    /// [`Scripted::Malformed`].
    pub fn malformed(body: impl Into<String>) -> Scripted {
        Scripted::Malformed { body: body.into() }
    }

    /// The same reply with `usage` = `prompt` + `completion` tokens (no effect on
    /// [`Scripted::HttpError`] and [`Scripted::Malformed`], which carry no usage).
    pub fn with_usage(mut self, prompt: u64, completion: u64) -> Scripted {
        match &mut self {
            Scripted::Text { usage, .. } | Scripted::ToolCalls { usage, .. } => {
                *usage = Usage::new(prompt, completion);
            }
            Scripted::HttpError { .. } | Scripted::Malformed { .. } => {}
        }
        self
    }
}

/// A request the [`FakeLlm`] received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `POST`, ...
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    /// Header names lowercased; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON; `Null` when empty; a JSON string holding the text when it is not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// The header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Scripted>,
    requests: Vec<RecordedRequest>,
    next_tool_call: u64,
    next_completion: u64,
    /// Answer `echo: <last user message>` once the script is exhausted.
    echo: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    /// Open connections (clones, by a serial number), shut down when the server is dropped.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not make every later call panic too.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake chat-completions server (see the module documentation). Stops when dropped.
#[derive(Debug)]
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeLlm {
    /// Listen on `127.0.0.1:0` and answer with `script`, in order. Panics if it cannot listen.
    pub fn start(script: Vec<Scripted>) -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fake LLM: bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake LLM: local_addr: {e}"));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                script: script.into(),
                ..State::default()
            }),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("fake-llm-accept".into())
            .spawn(move || accept_loop(&listener, &sh))
            .unwrap_or_else(|e| panic!("fake LLM: spawn: {e}"));
        FakeLlm {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where it listens (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`: the base URL an OpenAI client appends
    /// `/chat/completions` to.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in order (any path).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// Wait until at least `n` requests were received (panics after `limit`); all of them.
    pub fn wait_requests(&self, n: usize, limit: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "fake LLM: {} request(s) within {limit:?}, expected {n}: {r:#?}",
                r.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Append a reply to the script.
    pub fn push(&self, reply: Scripted) {
        self.shared.state().script.push_back(reply);
    }

    /// Append replies to the script.
    pub fn push_all(&self, replies: impl IntoIterator<Item = Scripted>) {
        self.shared.state().script.extend(replies);
    }

    /// Once the script is exhausted, answer each request with `echo: ` and its last user
    /// message's content.
    pub fn echo_when_exhausted(&self) {
        self.shared.state().echo = true;
    }

    /// Replies still in the script.
    pub fn remaining(&self) -> usize {
        self.shared.state().script.len()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.1.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    serve_connections(
        listener,
        shared,
        "fake-llm-conn",
        |s| &s.stop,
        |s| &s.conns,
        serve,
    );
}

/// The accept loop of this crate's fake servers: each connection served by `serve` on a thread
/// of its own, kept (a clone, by serial number) in `conns` while it is open so that dropping
/// the server can shut it down; returns once `stop` is set and the next connection arrives.
pub(crate) fn serve_connections<S: Send + Sync + 'static>(
    listener: &TcpListener,
    shared: &Arc<S>,
    thread_name: &str,
    stop: fn(&S) -> &AtomicBool,
    conns: fn(&S) -> &Mutex<HashMap<u64, TcpStream>>,
    serve: fn(TcpStream, &S) -> std::io::Result<()>,
) {
    for (serial, conn) in (0u64..).zip(listener.incoming()) {
        if stop(shared).load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        if let Ok(c) = stream.try_clone() {
            conns(shared)
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(serial, c);
        }
        let sh = Arc::clone(shared);
        let _ = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                let _ = serve(stream, &sh);
                conns(&sh)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&serial);
            });
    }
}

/// A parsed request head (shared with the other fake servers of this crate).
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) headers: BTreeMap<String, String>,
}

/// Read one request head; `None` at a clean end of the connection.
pub(crate) fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    // Tolerate empty lines before a request line (RFC 9112 2.2).
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad request line"));
    };
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: BTreeMap::new(),
    };
    let mut total = line.len();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("connection closed in the request head"));
        }
        total += line.len();
        if total > MAX_REQUEST {
            return Err(bad("request head too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            return Ok(Some(head));
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(bad("bad header line"));
        };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().to_string();
        head.headers
            .entry(k)
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(&v);
            })
            .or_insert(v);
    }
}

pub(crate) fn read_body(r: &mut BufReader<TcpStream>, head: &Head) -> std::io::Result<Vec<u8>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let chunked = head
        .headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut body = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size line"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(body);
                    }
                }
            }
            if body.len() + size > MAX_REQUEST {
                return Err(bad("request body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    }
    let len = match head.headers.get("content-length") {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| bad("bad content-length"))?,
        None => 0,
    };
    if len > MAX_REQUEST {
        return Err(bad("request body too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
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
        let connection = head
            .headers
            .get("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let keep_alive = if head.version.eq_ignore_ascii_case("HTTP/1.0") {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let body_json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        let path_only = head.target.split('?').next().unwrap_or("");
        let is_chat = path_only.ends_with("/chat/completions");
        let model = body_json
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("fake-llm")
            .to_string();
        let (status, reply) = {
            let mut st = shared.state();
            st.requests.push(RecordedRequest {
                method: head.method.clone(),
                path: head.target.clone(),
                headers: head.headers.clone(),
                body: body_json,
            });
            if !is_chat {
                (
                    404,
                    json!({"error": {"message": format!("fake LLM: no {path_only}")}}).to_string(),
                )
            } else if head.method != "POST" {
                (
                    405,
                    json!({"error": {"message": "fake LLM: POST only"}}).to_string(),
                )
            } else {
                let next = match st.script.pop_front() {
                    Some(n) => n,
                    None if st.echo => Scripted::text(format!(
                        "echo: {}",
                        last_user_message(st.requests.last().map(|r| &r.body))
                    )),
                    None => Scripted::text("script exhausted"),
                };
                render(&mut st, next, &model)
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: {}\r\n\r\n",
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

/// The content of the last `user` message of a chat-completions request body ("" if none).
fn last_user_message(body: Option<&Value>) -> String {
    body.and_then(|b| b.get("messages"))
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// The status and body of a scripted reply.
fn render(st: &mut State, reply: Scripted, model: &str) -> (u16, String) {
    let (message, finish, usage) = match reply {
        Scripted::HttpError { status, body } => return (status, body),
        Scripted::Malformed { body } => return (200, body),
        Scripted::Text { content, usage } => (
            json!({"role": "assistant", "content": content}),
            "stop",
            usage,
        ),
        Scripted::ToolCalls { calls, usage } => {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|(name, arguments)| {
                    st.next_tool_call += 1;
                    json!({
                        "id": format!("call_{}", st.next_tool_call),
                        "type": "function",
                        "function": {"name": name, "arguments": arguments.to_string()},
                    })
                })
                .collect();
            (
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
                usage,
            )
        }
    };
    st.next_completion += 1;
    let body = json!({
        "id": format!("chatcmpl-{}", st.next_completion),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage.to_json(),
    });
    (200, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read one response from `r`: (status, lowercased headers, body) by Content-Length.
    fn read_response(r: &mut BufReader<TcpStream>) -> (u16, BTreeMap<String, String>, String) {
        let mut line = String::new();
        r.read_line(&mut line)
            .unwrap_or_else(|e| panic!("status line: {e}"));
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = BTreeMap::new();
        loop {
            line.clear();
            r.read_line(&mut line)
                .unwrap_or_else(|e| panic!("header: {e}"));
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no content-length in {headers:?}"));
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .unwrap_or_else(|e| panic!("body: {e}"));
        (
            status,
            headers,
            String::from_utf8(body).unwrap_or_else(|e| panic!("body not UTF-8: {e}")),
        )
    }

    fn connect(llm: &FakeLlm) -> (TcpStream, BufReader<TcpStream>) {
        let s = TcpStream::connect(llm.addr()).unwrap_or_else(|e| panic!("connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        let r = BufReader::new(s.try_clone().unwrap_or_else(|e| panic!("{e}")));
        (s, r)
    }

    fn post(s: &mut TcpStream, path: &str, body: &str, extra_headers: &str) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {extra_headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    fn json_of(body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    }

    #[test]
    fn text_then_tool_calls_on_one_kept_alive_connection() {
        let llm = FakeLlm::start(vec![
            Scripted::text("hello"),
            Scripted::tool_calls([
                ("exec", json!({"argv": ["/usr/bin/ls", "-la"]})),
                ("send", json!({"to": "x"})),
            ])
            .with_usage(100, 7),
        ]);
        let (mut s, mut r) = connect(&llm);
        let req = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
        post(
            &mut s,
            "/v1/chat/completions",
            req,
            "Authorization: Bearer k\r\n",
        );
        let (status, headers, body) = read_response(&mut r);
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("connection").map(String::as_str),
            Some("keep-alive")
        );
        let v = json_of(&body);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "m1");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );

        // The same connection again.
        post(&mut s, "/v1/chat/completions", r#"{"model":"m1"}"#, "");
        let (status, _, body) = read_response(&mut r);
        assert_eq!(status, 200);
        let v = json_of(&body);
        let m = &v["choices"][0]["message"];
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert!(m["content"].is_null(), "{v}");
        assert_eq!(m["tool_calls"][0]["id"], "call_1");
        assert_eq!(m["tool_calls"][0]["type"], "function");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "exec");
        let args = m["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap_or_else(|| panic!("arguments is not a string: {v}"));
        assert_eq!(json_of(args), json!({"argv": ["/usr/bin/ls", "-la"]}));
        assert_eq!(m["tool_calls"][1]["id"], "call_2");
        assert_eq!(m["tool_calls"][1]["function"]["name"], "send");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107})
        );

        let reqs = llm.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].path, "/v1/chat/completions");
        assert_eq!(reqs[0].header("Authorization"), Some("Bearer k"));
        assert_eq!(
            reqs[0].headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(reqs[0].body["messages"][0]["content"], "hi");
        assert_eq!(llm.remaining(), 0);
    }

    #[test]
    fn connection_close_errors_malformed_prefixes_and_exhaustion() {
        let llm = FakeLlm::start(vec![Scripted::http_error(
            429,
            r#"{"error":{"message":"slow down"}}"#,
        )]);
        llm.push(Scripted::malformed("{not json"));
        llm.push_all([Scripted::text("third")]);
        let ask = |path: &str| -> (u16, String) {
            let (mut s, mut r) = connect(&llm);
            post(&mut s, path, "{}", "Connection: close\r\n");
            let (status, headers, body) = read_response(&mut r);
            assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
            // The server closes its side after the answer.
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)
                .unwrap_or_else(|e| panic!("read to end: {e}"));
            assert!(rest.is_empty());
            (status, body)
        };
        assert_eq!(
            ask("/v1/chat/completions"),
            (429, r#"{"error":{"message":"slow down"}}"#.to_string())
        );
        assert_eq!(
            ask("/openai/deployments/x/chat/completions"),
            (200, "{not json".to_string())
        );
        // Another path: 404, the script is not consumed.
        assert_eq!(ask("/v1/models").0, 404);
        let (status, body) = ask("/v1/chat/completions?api-version=1");
        assert_eq!(status, 200);
        assert_eq!(json_of(&body)["choices"][0]["message"]["content"], "third");
        let (status, body) = ask("/v1/chat/completions");
        assert_eq!(status, 200);
        assert_eq!(
            json_of(&body)["choices"][0]["message"]["content"],
            "script exhausted"
        );
        let paths: Vec<String> = llm.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                "/v1/chat/completions",
                "/openai/deployments/x/chat/completions",
                "/v1/models",
                "/v1/chat/completions?api-version=1",
                "/v1/chat/completions",
            ]
        );
    }

    #[test]
    fn dropping_the_server_ends_open_connections() {
        let llm = FakeLlm::start(vec![]);
        let addr = llm.addr();
        assert_eq!(llm.base_url(), format!("http://{addr}/v1"));
        let (mut s, mut r) = connect(&llm);
        post(&mut s, "/v1/chat/completions", "{}", "");
        let (status, _, body) = read_response(&mut r);
        assert_eq!(status, 200);
        assert_eq!(
            json_of(&body)["choices"][0]["message"]["content"],
            "script exhausted"
        );
        drop(llm);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("read after drop: {e}"));
        assert!(rest.is_empty());
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }

    #[test]
    fn chunked_request_bodies_are_read() {
        let llm = FakeLlm::start(vec![Scripted::text("ok")]);
        let (mut s, mut r) = connect(&llm);
        s.write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              6\r\n{\"a\":1\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .unwrap_or_else(|e| panic!("write: {e}"));
        let (status, _, body) = read_response(&mut r);
        assert_eq!(status, 200);
        assert_eq!(json_of(&body)["choices"][0]["message"]["content"], "ok");
        let reqs = llm.wait_requests(1, Duration::from_secs(5));
        assert_eq!(reqs[0].body, json!({"a": 1}));
    }
}
