//! A synchronous WebSocket JSON-RPC client for the gateway protocol (docs/protocol.md, "The
//! gateway protocol"): `GET /ws` with a bearer token (header or `?access_token=`), requests
//! `{"jsonrpc":"2.0","id":N,"method":M,"params":P}`, one response per request in any order, and
//! events as notifications `{"jsonrpc":"2.0","method":E,"params":{...}}` whose `params.call` is
//! the id of the request they belong to.
//!
//! Everything the client reads and does not hand out at once is kept, in order, in a backlog:
//! [`RpcClient::finish_call`] takes its call's events and response from there first, and
//! [`RpcClient::next_event`] and [`RpcClient::recv_raw`] too, so nothing is lost when a test
//! waits for one thing while another arrives.
//!
//! ```no_run
//! # use carapace_tests::rpc::RpcClient;
//! # use serde_json::json;
//! # let addr = "127.0.0.1:8750".parse().unwrap_or_else(|e| panic!("{e}"));
//! let mut c = RpcClient::connect(addr, Some("TOKEN")).unwrap_or_else(|e| panic!("{e}"));
//! let out = c.call("gateway.ping", json!(null));
//! assert_eq!(out.expect_ok()["pong"], true);
//! // A call that waits for an operator, answered in between:
//! let id = c.start_call("tools.exec", json!({"argv": ["/usr/bin/uname"]}));
//! # let mut op = RpcClient::connect(addr, Some("OP")).unwrap_or_else(|e| panic!("{e}"));
//! let asked = op.next_event("approval.requested", std::time::Duration::from_secs(20));
//! # let asked = asked.unwrap_or_else(|| panic!("no approval"));
//! op.call("approvals.resolve", json!({"id": asked["params"]["id"], "resolution": "allow-once"}));
//! let out = c.finish_call(id, std::time::Duration::from_secs(20));
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::{CloseFrame, WebSocket};
use tungstenite::Message;

/// How long [`RpcClient::call`] waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why [`RpcClient::connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The TCP connection failed.
    Io(std::io::Error),
    /// The server answered the upgrade with this HTTP status instead of 101 (e.g. 401).
    Refused {
        status: u16,
        /// Response headers, names lowercased.
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Any other handshake failure (bad request built, protocol error, timeout).
    Handshake(String),
}

impl ConnectError {
    /// The HTTP status of a refused upgrade.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            ConnectError::Io(_) | ConnectError::Handshake(_) => None,
        }
    }

    /// A header of a refused upgrade's response (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            ConnectError::Refused { headers, .. } => {
                let name = name.to_ascii_lowercase();
                headers
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_str())
            }
            ConnectError::Io(_) | ConnectError::Handshake(_) => None,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "connect: {e}"),
            ConnectError::Refused { status, body, .. } => {
                write!(f, "WebSocket upgrade refused with HTTP {status}: {body}")
            }
            ConnectError::Handshake(e) => write!(f, "WebSocket handshake: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    /// `data` (`Null` when absent); the gateway puts `kind` and details here.
    pub data: Value,
}

impl RpcError {
    /// `data.kind` (`"forbidden"`, `"denied"`, ...).
    pub fn kind(&self) -> Option<&str> {
        self.data.get("kind").and_then(Value::as_str)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "error {} {:?} (data {})",
            self.code, self.message, self.data
        )
    }
}

impl std::error::Error for RpcError {}

/// The answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcOutcome {
    /// The request id.
    pub id: Value,
    /// `result`, or `error`.
    pub result: Result<Value, RpcError>,
    /// The notifications with `params.call` = this id received before the response, in order
    /// (whole frames: `{"jsonrpc","method","params"}`).
    pub events: Vec<Value>,
    /// The response frame as received.
    pub response: Value,
}

impl RpcOutcome {
    /// The result; panics with the error when there is none.
    pub fn expect_ok(&self) -> &Value {
        match &self.result {
            Ok(v) => v,
            Err(e) => panic!("call {} failed: {e}; response {}", self.id, self.response),
        }
    }

    /// The error; panics with the result when the call succeeded.
    pub fn expect_err(&self) -> &RpcError {
        match &self.result {
            Err(e) => e,
            Ok(v) => panic!(
                "call {} succeeded ({v}) where an error was expected",
                self.id
            ),
        }
    }

    /// The events of this call whose method is `method`.
    pub fn events_named(&self, method: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["method"] == method)
            .collect()
    }
}

/// A WebSocket message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// The server's close frame (code and reason; no code when it sent none).
    Close {
        code: Option<u16>,
        reason: String,
    },
    /// The connection ended without (or after) a close frame: why.
    Gone(String),
}

impl Frame {
    /// A text frame as JSON.
    pub fn json(&self) -> Option<Value> {
        match self {
            Frame::Text(t) => serde_json::from_str(t).ok(),
            _ => None,
        }
    }

    fn ends(&self) -> bool {
        matches!(self, Frame::Close { .. } | Frame::Gone(_))
    }
}

/// Why waiting for a response failed.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitError {
    /// Nothing within this time.
    Timeout(Duration),
    /// The connection was closed ([`Frame::Close`] or [`Frame::Gone`]).
    Closed(Frame),
    /// A response with this id that has neither `result` nor `error`.
    Malformed(Value),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Timeout(d) => write!(f, "no response within {d:?}"),
            WaitError::Closed(fr) => write!(f, "the connection was closed: {fr:?}"),
            WaitError::Malformed(v) => write!(f, "malformed response: {v}"),
        }
    }
}

impl std::error::Error for WaitError {}

/// A connected WebSocket JSON-RPC client (see the module documentation).
#[derive(Debug)]
pub struct RpcClient {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    backlog: VecDeque<Frame>,
    timeout: Duration,
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn is_response(v: &Value) -> bool {
    v.get("method").is_none() && v.get("id").is_some()
}

fn is_notification(v: &Value) -> bool {
    v.get("method").is_some() && v.get("id").is_none()
}

impl RpcClient {
    /// `GET /ws`, with `Authorization: Bearer TOKEN` when `token` is given.
    pub fn connect(addr: SocketAddr, token: Option<&str>) -> Result<RpcClient, ConnectError> {
        match token {
            Some(t) => {
                let auth = format!("Bearer {t}");
                RpcClient::connect_with(addr, "/ws", &[("Authorization", &auth)])
            }
            None => RpcClient::connect_with(addr, "/ws", &[]),
        }
    }

    /// `GET /ws?access_token=TOKEN` (the browser way), no `Authorization` header.
    pub fn connect_query_token(addr: SocketAddr, token: &str) -> Result<RpcClient, ConnectError> {
        let path = format!("/ws?access_token={}", query_escape(token));
        RpcClient::connect_with(addr, &path, &[])
    }

    /// Upgrade `path_and_query` with these extra request headers (10 s for the TCP connection
    /// and the handshake each).
    pub fn connect_with(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<RpcClient, ConnectError> {
        let mut req = format!("ws://{addr}{path_and_query}")
            .into_client_request()
            .map_err(|e| ConnectError::Handshake(format!("request: {e}")))?;
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ConnectError::Handshake(format!("header name {k:?}: {e}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| ConnectError::Handshake(format!("header {k} value: {e}")))?;
            req.headers_mut().append(name, value);
        }
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(ConnectError::Io)?;
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(ConnectError::Io)?;
        let ws = match tungstenite::client(req, stream) {
            Ok((ws, _response)) => ws,
            Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_ascii_lowercase(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ConnectError::Refused {
                    status: resp.status().as_u16(),
                    headers,
                    body,
                });
            }
            Err(HandshakeError::Failure(e)) => return Err(ConnectError::Handshake(e.to_string())),
            Err(HandshakeError::Interrupted(_)) => {
                return Err(ConnectError::Handshake(
                    "no handshake response within 10 s".to_string(),
                ))
            }
        };
        Ok(RpcClient {
            ws,
            next_id: 0,
            backlog: VecDeque::new(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long [`RpcClient::call`] waits (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Call `method` with `params` (`Value::Null`: no `params` member) and wait for its
    /// response (the client's timeout). Panics with a clear message on a timeout or a closed
    /// connection; see [`RpcClient::try_call`].
    pub fn call(&mut self, method: &str, params: Value) -> RpcOutcome {
        let timeout = self.timeout;
        self.call_timeout(method, params, timeout)
    }

    /// [`RpcClient::call`] with its own timeout.
    pub fn call_timeout(&mut self, method: &str, params: Value, timeout: Duration) -> RpcOutcome {
        let id = self.start_call(method, params);
        self.try_finish_call(id, timeout)
            .unwrap_or_else(|e| panic!("{method} (id {id}): {e}"))
    }

    /// [`RpcClient::call`] that says why instead of panicking when no response came.
    pub fn try_call(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<RpcOutcome, WaitError> {
        let id = self
            .try_start_call(method, params)
            .map_err(|e| WaitError::Closed(Frame::Gone(format!("send: {e}"))))?;
        self.try_finish_call(id, timeout)
    }

    /// Send a request with the next integer id (1, 2, ...) without waiting; its id for
    /// [`RpcClient::finish_call`]. Panics if it cannot be sent.
    pub fn start_call(&mut self, method: &str, params: Value) -> u64 {
        self.try_start_call(method, params)
            .unwrap_or_else(|e| panic!("send {method} (id {}): {e}", self.next_id))
    }

    /// Send a request with this id (a string or a number of the test's choosing) without
    /// waiting. Panics if it cannot be sent.
    pub fn start_call_with_id(&mut self, id: impl Into<Value>, method: &str, params: Value) {
        let id = id.into();
        self.send_request(id.clone(), method, params)
            .unwrap_or_else(|e| panic!("send {method} (id {id}): {e}"));
    }

    fn try_start_call(&mut self, method: &str, params: Value) -> Result<u64, tungstenite::Error> {
        self.next_id += 1;
        let id = self.next_id;
        self.send_request(json!(id), method, params)?;
        Ok(id)
    }

    fn send_request(
        &mut self,
        id: Value,
        method: &str,
        params: Value,
    ) -> Result<(), tungstenite::Error> {
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        self.send_raw(&req.to_string())
    }

    /// Wait up to `timeout` for the response to request `id`, collecting its events (those
    /// already buffered first). Panics with a clear message on a timeout or a closed
    /// connection; see [`RpcClient::try_finish_call`].
    pub fn finish_call(&mut self, id: impl Into<Value>, timeout: Duration) -> RpcOutcome {
        let id = id.into();
        self.try_finish_call(id.clone(), timeout)
            .unwrap_or_else(|e| panic!("call id {id}: {e}"))
    }

    /// [`RpcClient::finish_call`] that says why instead of panicking.
    pub fn try_finish_call(
        &mut self,
        id: impl Into<Value>,
        timeout: Duration,
    ) -> Result<RpcOutcome, WaitError> {
        let id = id.into();
        let mut events = Vec::new();
        // What was read before, in order; up to the response if it is there.
        let mut kept = VecDeque::new();
        let mut response = None;
        while let Some(f) = self.backlog.pop_front() {
            if response.is_none() {
                if let Some(v) = f.json() {
                    if is_notification(&v) && v["params"]["call"] == id {
                        events.push(v);
                        continue;
                    }
                    if is_response(&v) && v["id"] == id {
                        response = Some(v);
                        continue;
                    }
                }
            }
            kept.push_back(f);
        }
        self.backlog = kept;
        if response.is_none() {
            if let Some(end) = self.backlog.iter().find(|f| f.ends()) {
                return Err(WaitError::Closed(end.clone()));
            }
        }
        let deadline = Instant::now() + timeout;
        let response = match response {
            Some(r) => r,
            None => loop {
                let Some(f) = self.read_frame(deadline) else {
                    return Err(WaitError::Timeout(timeout));
                };
                if f.ends() {
                    self.backlog.push_back(f.clone());
                    return Err(WaitError::Closed(f));
                }
                match f.json() {
                    Some(v) if is_notification(&v) && v["params"]["call"] == id => events.push(v),
                    Some(v) if is_response(&v) && v["id"] == id => break v,
                    _ => self.backlog.push_back(f),
                }
            },
        };
        let result = if let Some(r) = response.get("result") {
            Ok(r.clone())
        } else if let Some(e) = response.get("error") {
            Err(RpcError {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("").to_string(),
                data: e.get("data").cloned().unwrap_or(Value::Null),
            })
        } else {
            return Err(WaitError::Malformed(response));
        };
        Ok(RpcOutcome {
            id,
            result,
            events,
            response,
        })
    }

    /// Wait up to `timeout` for a notification `method` (any `params.call`, or none: e.g.
    /// `approval.requested`); the whole frame. Buffered ones count, oldest first; whatever else
    /// arrives meanwhile stays buffered. `None` on a timeout or a closed connection.
    pub fn next_event(&mut self, method: &str, timeout: Duration) -> Option<Value> {
        let found = self.backlog.iter().position(|f| {
            f.json()
                .is_some_and(|v| is_notification(&v) && v["method"] == method)
        });
        if let Some(i) = found {
            return self.backlog.remove(i).and_then(|f| f.json());
        }
        if self.backlog.iter().any(Frame::ends) {
            return None;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.read_frame(deadline)?;
            if f.ends() {
                self.backlog.push_back(f);
                return None;
            }
            match f.json() {
                Some(v) if is_notification(&v) && v["method"] == method => return Some(v),
                _ => self.backlog.push_back(f),
            }
        }
    }

    /// Every notification buffered now (read while waiting for something else and not claimed
    /// by a call), removed from the buffer, oldest first.
    pub fn take_buffered_events(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(f) = self.backlog.pop_front() {
            match f.json() {
                Some(v) if is_notification(&v) => out.push(v),
                _ => kept.push_back(f),
            }
        }
        self.backlog = kept;
        out
    }

    /// Send one text message as it is (no framing check: for bad-input tests).
    pub fn send_raw(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text))
    }

    /// Send one binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::binary(data.to_vec()))
    }

    /// The next message (buffered ones first), whatever it is; `None` when nothing came
    /// within `timeout`. Pings and pongs are answered and skipped.
    pub fn recv_raw(&mut self, timeout: Duration) -> Option<Frame> {
        if let Some(f) = self.backlog.pop_front() {
            return Some(f);
        }
        self.read_frame(Instant::now() + timeout)
    }

    /// Send a close frame (normal closure) and wait up to 5 s for the server's.
    pub fn close(&mut self) {
        let _ = self.ws.close(Some(CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(f) = self.read_frame(deadline) {
            if f.ends() {
                return;
            }
        }
    }

    /// Read one message from the socket until `deadline`; `None` on a timeout.
    fn read_frame(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            if let Err(e) = self.ws.get_mut().set_read_timeout(Some(wait)) {
                return Some(Frame::Gone(format!("set_read_timeout: {e}")));
            }
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(Frame::Text(t.as_str().to_string())),
                Ok(Message::Binary(b)) => return Some(Frame::Binary(b.to_vec())),
                Ok(Message::Close(c)) => {
                    return Some(Frame::Close {
                        code: c.as_ref().map(|c| u16::from(c.code)),
                        reason: c.map(|c| c.reason.as_str().to_string()).unwrap_or_default(),
                    })
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Some(Frame::Gone(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use tungstenite::handshake::server::{ErrorResponse, Request, Response};

    /// A tiny gateway stand-in: accepts `Bearer good` or `?access_token=good`, else 401; then
    /// answers `echo` (result = params), `stream` (two events for the call, an unrelated
    /// notification, then the result), `fail` (an error with data.kind), `hold` (answered only
    /// after a later `release`, with an event first), non-JSON (parse_error, id null), binary
    /// (an error frame), `bye` (closes with 1009).
    fn server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve(s));
            }
        });
        addr
    }

    fn serve(s: TcpStream) {
        // The callback's type is tungstenite's.
        #[allow(clippy::result_large_err)]
        let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let header_ok = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == b"Bearer good");
            let query_ok = req.uri().query() == Some("access_token=good");
            if header_ok || query_ok {
                Ok(resp)
            } else {
                let mut e = ErrorResponse::new(Some("no".to_string()));
                *e.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                e.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                Err(e)
            }
        };
        let Ok(mut ws) = tungstenite::accept_hdr(s, check) else {
            return;
        };
        let mut held: Option<Value> = None;
        let send = |ws: &mut WebSocket<TcpStream>, v: Value| {
            let _ = ws.send(Message::text(v.to_string()));
        };
        loop {
            let text = match ws.read() {
                Ok(Message::Text(t)) => t.as_str().to_string(),
                Ok(Message::Binary(_)) => {
                    send(
                        &mut ws,
                        json!({"jsonrpc":"2.0","id":null,"error":{"code":-32600,
                            "message":"binary","data":{"kind":"invalid_request"}}}),
                    );
                    continue;
                }
                Ok(_) => continue,
                Err(_) => return,
            };
            let Ok(req) = serde_json::from_str::<Value>(&text) else {
                send(
                    &mut ws,
                    json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,
                        "message":"not JSON","data":{"kind":"parse_error"}}}),
                );
                continue;
            };
            let id = req["id"].clone();
            let ok = |id: &Value, r: Value| json!({"jsonrpc":"2.0","id":id,"result":r});
            match req["method"].as_str().unwrap_or("") {
                "echo" => send(
                    &mut ws,
                    ok(&id, req.get("params").cloned().unwrap_or(json!("none"))),
                ),
                "stream" => {
                    for n in 1..=2 {
                        send(
                            &mut ws,
                            json!({"jsonrpc":"2.0","method":"tools.output",
                                "params":{"call":id,"stream":"stdout","data":format!("part{n}")}}),
                        );
                    }
                    send(
                        &mut ws,
                        json!({"jsonrpc":"2.0","method":"approval.requested","params":{"id":7}}),
                    );
                    send(&mut ws, ok(&id, json!({"exit": 0})));
                }
                "fail" => send(
                    &mut ws,
                    json!({"jsonrpc":"2.0","id":id,"error":{"code":-32001,
                        "message":"not allowed","data":{"kind":"forbidden"}}}),
                ),
                "hold" => held = Some(id),
                "release" => {
                    send(&mut ws, ok(&id, json!("released")));
                    if let Some(h) = held.take() {
                        send(
                            &mut ws,
                            json!({"jsonrpc":"2.0","method":"agent.step","params":{"call":h,"turn":1}}),
                        );
                        send(&mut ws, ok(&h, json!("held done")));
                    }
                }
                "bye" => {
                    let _ = ws.close(Some(CloseFrame {
                        code: 1009.into(),
                        reason: "too big".into(),
                    }));
                    while ws.read().is_ok() {}
                    return;
                }
                _ => send(
                    &mut ws,
                    json!({"jsonrpc":"2.0","id":id,"error":{"code":-32601,"message":"no such method"}}),
                ),
            }
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn refused_upgrades_expose_their_status() {
        let addr = server();
        let e = RpcClient::connect(addr, None)
            .err()
            .unwrap_or_else(|| panic!("connected without a token"));
        assert_eq!(e.status(), Some(401), "{e}");
        assert_eq!(e.header("WWW-Authenticate"), Some("Bearer"));
        let e = RpcClient::connect(addr, Some("bad"))
            .err()
            .unwrap_or_else(|| panic!("connected with a bad token"));
        assert_eq!(e.status(), Some(401), "{e}");
        RpcClient::connect(addr, Some("good")).unwrap_or_else(|e| panic!("{e}"));
        RpcClient::connect_query_token(addr, "good").unwrap_or_else(|e| panic!("{e}"));
        let e = RpcClient::connect_query_token(addr, "go od")
            .err()
            .unwrap_or_else(|| panic!("connected with a bad query token"));
        assert_eq!(e.status(), Some(401), "{e}");
        // Nothing listening.
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let gone = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(l);
        let e = RpcClient::connect(gone, None)
            .err()
            .unwrap_or_else(|| panic!("connected to nothing"));
        assert!(matches!(e, ConnectError::Io(_)), "{e}");
        assert_eq!(e.status(), None);
    }

    #[test]
    fn calls_collect_their_events_and_keep_the_others() {
        let mut c = RpcClient::connect(server(), Some("good")).unwrap_or_else(|e| panic!("{e}"));
        let out = c.call("echo", json!({"a": 1}));
        assert_eq!(out.id, json!(1));
        assert_eq!(out.expect_ok(), &json!({"a": 1}));
        assert!(out.events.is_empty());
        // No params: the member is absent.
        assert_eq!(c.call("echo", Value::Null).expect_ok(), &json!("none"));

        let out = c.call("stream", json!({}));
        assert_eq!(out.expect_ok()["exit"], 0);
        let data: Vec<&Value> = out.events.iter().map(|e| &e["params"]["data"]).collect();
        assert_eq!(data, [&json!("part1"), &json!("part2")]);
        assert_eq!(out.events_named("tools.output").len(), 2);
        // The notification of no call is kept for next_event.
        let ev = c
            .next_event("approval.requested", T)
            .unwrap_or_else(|| panic!("approval.requested was lost"));
        assert_eq!(ev["params"]["id"], 7);
        assert!(c
            .next_event("approval.requested", Duration::from_millis(200))
            .is_none());

        let e = c.call("fail", json!({}));
        let err = e.expect_err();
        assert_eq!((err.code, err.kind()), (-32001, Some("forbidden")));
        assert_eq!(err.message, "not allowed");
        assert_eq!(c.call("nope", json!({})).expect_err().code, -32601);

        // String ids.
        c.start_call_with_id("abc", "echo", json!([1]));
        assert_eq!(c.finish_call("abc", T).expect_ok(), &json!([1]));
    }

    #[test]
    fn a_held_call_is_finished_after_another_one() {
        let mut c = RpcClient::connect(server(), Some("good")).unwrap_or_else(|e| panic!("{e}"));
        let held = c.start_call("hold", json!({}));
        // Another call in between; the held call's event and response arrive after it.
        assert_eq!(c.call("release", json!({})).expect_ok(), "released");
        let out = c.finish_call(held, T);
        assert_eq!(out.expect_ok(), "held done");
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0]["method"], "agent.step");
        // Waiting for something that never comes: a timeout, not a hang.
        let id = c.start_call("hold", json!({}));
        match c.try_finish_call(id, Duration::from_millis(300)) {
            Err(WaitError::Timeout(_)) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn raw_frames_for_bad_input() {
        let mut c = RpcClient::connect(server(), Some("good")).unwrap_or_else(|e| panic!("{e}"));
        c.send_raw("{not json").unwrap_or_else(|e| panic!("{e}"));
        let f = c
            .recv_raw(T)
            .unwrap_or_else(|| panic!("no answer to bad JSON"));
        let v = f
            .json()
            .unwrap_or_else(|| panic!("not a JSON text frame: {f:?}"));
        assert_eq!(v["id"], Value::Null);
        assert_eq!(v["error"]["data"]["kind"], "parse_error");
        c.send_binary(b"\x00\x01").unwrap_or_else(|e| panic!("{e}"));
        let v = c
            .recv_raw(T)
            .and_then(|f| f.json())
            .unwrap_or_else(|| panic!("no answer to a binary message"));
        assert_eq!(v["error"]["code"], -32600);
        assert!(c.recv_raw(Duration::from_millis(200)).is_none());
        // The server closes: the code is visible, and a call says the connection is closed.
        let id = c.start_call("bye", json!({}));
        match c.try_finish_call(id, T) {
            Err(WaitError::Closed(Frame::Close { code, reason })) => {
                assert_eq!(code, Some(1009));
                assert_eq!(reason, "too big");
            }
            other => panic!("expected a close, got {other:?}"),
        }
        // Later waits say so at once.
        match c.try_finish_call(99, T) {
            Err(WaitError::Closed(Frame::Close { code, .. })) => assert_eq!(code, Some(1009)),
            other => panic!("expected a close, got {other:?}"),
        }
        assert!(c.next_event("x", T).is_none());
        // It stays visible to recv_raw.
        assert!(matches!(
            c.recv_raw(T),
            Some(Frame::Close {
                code: Some(1009),
                ..
            })
        ));
        assert!(matches!(c.recv_raw(T), Some(Frame::Gone(_))));
    }
}
