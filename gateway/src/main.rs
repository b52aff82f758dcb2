//! The stand-in gateway (until the gateway issue replaces it): a small blocking HTTP/1.1 server,
//! one thread per connection, on the listening socket the supervisor hands over at
//! `$CARAPACE_LISTEN_FD`, asking the broker at `$CARAPACE_BROKER_FD` for everything else.
//!
//! It exists so that `carapace run` has a real confined child to start, restart and stop, and
//! so that the end-to-end tests can look at the sandbox from inside and drive the broker
//! through it. Endpoints (JSON in, JSON out; each response closes the connection):
//!
//! - `GET /health` → `{"ok":true,"pid":N}`
//! - `GET /status` → its own `/proc/self/status` confinement fields (`Seccomp`, `NoNewPrivs`,
//!   `CapEff`, `Uid`, ...) and `interfaces` (the names in `/proc/self/net/dev`)
//! - `POST /exec` `{"argv":["/bin/echo","hi"],"cwd":null}` → the broker runs the tool;
//!   `{"exit":0,"stdout":"hi\n","stderr":"",...}`, or `{"error":..,"code":..}` (403 when the
//!   policy or the operator refused)
//! - `POST /send` `{"channel":..,"to":..,"text":..}` → the broker sends it;
//!   `{"status":"delivered"|"dead_lettered","dlq_id":..}`
//!
//! Errors are `{"error": "..."}` with 400 (malformed), 404 (no such endpoint), 405 (wrong
//! method), 408 (too slow), 413 (head over 8 KiB or body over 64 KiB), 503 (no broker, or too
//! many connections).

mod http;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use carapace_broker::client::{Client, ClientError};
use carapace_broker::protocol::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use crate::http::{Request, Response};

/// Names the listening socket handed over by the supervisor.
const LISTEN_FD_ENV: &str = "CARAPACE_LISTEN_FD";
/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request, and to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a tool's stdout and of its stderr kept for the response; the rest is read and
/// dropped (so the tool is never blocked on a full pipe).
const MAX_OUTPUT: usize = 1 << 20;

const USAGE: &str = "\
carapace-gateway: the stand-in gateway, run confined by `carapace run`.

Usage: carapace-gateway [--help | --version]

It takes no arguments. It serves HTTP on the listening socket at fd $CARAPACE_LISTEN_FD
(refusing to start without one) and talks to the broker at fd $CARAPACE_BROKER_FD (default 3).

Endpoints:
  GET  /health   {\"ok\":true,\"pid\":N}
  GET  /status   its own confinement as the kernel reports it (/proc/self/status) and its
                 network interfaces
  POST /exec     {\"argv\":[\"/usr/bin/echo\",\"hi\"]} -> {\"exit\":0,\"stdout\":\"hi\\n\",...}
                 (403 when the policy or the operator refuses)
  POST /send     {\"channel\":\"..\",\"to\":\"..\",\"text\":\"..\"} -> {\"status\":\"delivered\",...}
";

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return 0;
        }
        Some("-V" | "--version") => {
            println!("carapace-gateway {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Some(other) => {
            eprintln!("carapace-gateway: unexpected argument {other:?}\n\n{USAGE}");
            return 2;
        }
    }
    let listener = match listener_from_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("carapace-gateway: {e}");
            return 2;
        }
    };
    let broker = match Client::from_env() {
        Ok(c) => Some(Mutex::new(c)),
        Err(e) => {
            eprintln!("carapace-gateway: no broker ({e}); /exec and /send answer 503");
            None
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    eprintln!(
        "carapace-gateway: serving on {addr} (pid {})",
        std::process::id()
    );
    serve(listener, Arc::new(State { broker }))
}

/// The listening socket at `$CARAPACE_LISTEN_FD`, owned and close-on-exec.
fn listener_from_env() -> Result<TcpListener, String> {
    let Some(v) = std::env::var_os(LISTEN_FD_ENV) else {
        return Err(format!(
            "no listening socket: {LISTEN_FD_ENV} is not set (run me under `carapace run`)"
        ));
    };
    let v = v.to_string_lossy();
    let fd: RawFd = v
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{LISTEN_FD_ENV}={v:?} is not a file descriptor above 2"))?;
    let opt = |level, name, what: &str| -> Result<libc::c_int, String> {
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `val`, a live c_int; a closed fd
        // or a non-socket only makes it fail (EBADF/ENOTSOCK), which is reported.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(format!(
                "fd {fd} ({LISTEN_FD_ENV}) is not a socket: getsockopt({what}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(val)
    };
    let domain = opt(libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(format!(
            "fd {fd} ({LISTEN_FD_ENV}) is not a TCP/IP socket (domain {domain})"
        ));
    }
    if opt(libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")? != libc::SOCK_STREAM {
        return Err(format!("fd {fd} ({LISTEN_FD_ENV}) is not a stream socket"));
    }
    if opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 1 {
        return Err(format!("fd {fd} ({LISTEN_FD_ENV}) is not listening"));
    }
    // SAFETY: F_SETFD on an fd just shown to be an open socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(format!(
            "fcntl(fd {fd}, F_SETFD): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the fd is an open listening socket (checked above) that the supervisor handed to
    // this process to own; nothing else in the process uses it, and this runs once, in main.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(TcpListener::from(owned))
}

/// What every connection shares.
struct State {
    /// The gateway's own session with the broker; each request takes a session of its own
    /// from it.
    broker: Option<Mutex<Client>>,
}

/// Decrements the connection count when a connection is done.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(listener: TcpListener, state: Arc<State>) -> ! {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: wait instead of spinning; nothing here is fatal.
                eprintln!("carapace-gateway: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _slot = Slot(active.clone());
            refuse(stream, "too many connections");
            continue;
        }
        let slot = Slot(active.clone());
        let st = state.clone();
        let spare = stream.try_clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _slot = slot;
                handle(stream, &st);
            });
        if let Err(e) = spawned {
            eprintln!("carapace-gateway: cannot start a thread: {e}");
            if let Ok(s) = spare {
                refuse(s, "cannot start a thread for the connection");
            }
        }
    }
}

fn refuse(mut stream: TcpStream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = http::write_response(&mut stream, &Response::error(503, why));
}

fn handle(mut stream: TcpStream, state: &State) {
    let started = Instant::now();
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let (what, resp) = match http::read_request(&mut stream) {
        Ok(req) => (
            format!(
                "{} {}",
                req.method,
                req.path.chars().take(100).collect::<String>()
            ),
            route(&req, state.broker.as_ref()),
        ),
        Err(http::HttpError::Io(e)) => {
            eprintln!("carapace-gateway: reading a request: {e}");
            return;
        }
        Err(e) => match e.response() {
            Some((code, msg)) => ("(bad request)".to_string(), Response::error(code, msg)),
            None => return,
        },
    };
    let sent = http::write_response(&mut stream, &resp);
    eprintln!(
        "carapace-gateway: {what} {}{} {}ms",
        resp.status,
        if sent.is_err() {
            " (not delivered)"
        } else {
            ""
        },
        started.elapsed().as_millis()
    );
}

/// The response to one request.
fn route(req: &Request, broker: Option<&Mutex<Client>>) -> Response {
    let method_not_allowed = |allow: &'static str| Response {
        allow: Some(allow),
        ..Response::error(405, format!("{} takes {allow}", req.path))
    };
    match (req.path.as_str(), req.method.as_str()) {
        ("/health", "GET") => Response::json(200, json!({ "ok": true, "pid": std::process::id() })),
        ("/status", "GET") => Response::json(200, status()),
        ("/exec", "POST") => with_broker(broker, |c| exec(c, &req.body)),
        ("/send", "POST") => with_broker(broker, |c| send(c, &req.body)),
        ("/health" | "/status", _) => method_not_allowed("GET"),
        ("/exec" | "/send", _) => method_not_allowed("POST"),
        (p, _) => Response::error(404, format!("no endpoint {p}")),
    }
}

/// Fields of /proc/self/status reported by /status.
const STATUS_FIELDS: &[&str] = &[
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

fn status() -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("pid".into(), std::process::id().into());
    match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => {
            for line in s.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    if STATUS_FIELDS.contains(&k) {
                        // "1000\t1000\t1000\t1000" -> "1000 1000 1000 1000"
                        let words: Vec<&str> = v.split_whitespace().collect();
                        m.insert(k.into(), words.join(" ").into());
                    }
                }
            }
        }
        Err(e) => {
            m.insert("error".into(), format!("/proc/self/status: {e}").into());
        }
    }
    let ifaces: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .map(|s| interfaces(&s))
        .unwrap_or_default();
    m.insert("interfaces".into(), ifaces.into());
    serde_json::Value::Object(m)
}

/// Interface names of a /proc/net/dev table (two header lines, then `name: counters`).
fn interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

/// Run `f` on a broker session of its own (the shared one is only held to open it).
fn with_broker(
    broker: Option<&Mutex<Client>>,
    f: impl FnOnce(&mut Client) -> Response,
) -> Response {
    let Some(shared) = broker else {
        return Response::error(503, "no broker: the gateway was started without one");
    };
    let session = shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .session();
    match session {
        Ok(mut c) => f(&mut c),
        Err(e) => broker_error(&e),
    }
}

/// The response for a broker error: the refusal's code decides the status.
fn broker_error(e: &ClientError) -> Response {
    let status = match e.code() {
        Some(ErrorCode::Denied | ErrorCode::Pending) => 403,
        Some(ErrorCode::RateLimited) => 429,
        Some(ErrorCode::NotFound) => 404,
        Some(ErrorCode::BadRequest | ErrorCode::TooLarge) => 400,
        Some(ErrorCode::Unavailable | ErrorCode::Busy) => 503,
        _ => 502,
    };
    let mut body = json!({ "error": e.to_string() });
    if let Some(c) = e.code() {
        body["code"] = c.as_str().into();
    }
    Response::json(status, body)
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("the body must be {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
}

const EXEC_SHAPE: &str = r#"{"argv": ["/path/of/program", "arg", ...], "cwd": optional "/dir"}"#;

fn exec(c: &mut Client, body: &[u8]) -> Response {
    let b: ExecBody = match parse_body(body, EXEC_SHAPE) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if b.argv.is_empty() {
        return Response::error(400, format!("argv is empty; the body must be {EXEC_SHAPE}"));
    }
    let started = match c.exec(b.argv, b.cwd) {
        Ok(s) => s,
        Err(e) => return broker_error(&e),
    };
    let id = started.id;
    let (out, err) = std::thread::scope(|s| {
        let err = s.spawn(|| read_capped(started.stderr));
        let out = read_capped(started.stdout);
        (out, err.join().unwrap_or_default())
    });
    match c.wait_exit(id) {
        Ok(x) => Response::json(
            200,
            json!({
                "exit": x.exit,
                "code": x.code,
                "signal": x.signal,
                "timeout": x.timeout,
                "oom": x.oom,
                "wall_ms": x.wall_ms,
                "stdout": String::from_utf8_lossy(&out.0),
                "stderr": String::from_utf8_lossy(&err.0),
                "stdout_truncated": out.1,
                "stderr_truncated": err.1,
            }),
        ),
        Err(e) => broker_error(&e),
    }
}

/// Read a pipe to its end, keeping the first [`MAX_OUTPUT`] bytes; whether more came.
fn read_capped(fd: OwnedFd) -> (Vec<u8>, bool) {
    let mut f = std::fs::File::from(fd);
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut more = false;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return (kept, more),
            Ok(n) => {
                let room = MAX_OUTPUT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
                more |= n > room;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!(
                    "carapace-gateway: reading a tool's output (fd {}): {e}",
                    f.as_raw_fd()
                );
                return (kept, more);
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    channel: String,
    to: String,
    text: String,
}

fn send(c: &mut Client, body: &[u8]) -> Response {
    let b: SendBody = match parse_body(body, r#"{"channel": "..", "to": "..", "text": ".."}"#) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match c.send(&b.channel, &b.to, &b.text) {
        Ok((status, dlq_id)) => Response::json(
            200,
            json!({
                "status": serde_json::to_value(status).unwrap_or_default(),
                "dlq_id": dlq_id,
            }),
        ),
        Err(e) => broker_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes() {
        let r = route(&req("GET", "/health", ""), None);
        assert_eq!(r.status, 200);
        assert_eq!(r.body["ok"], true);
        assert_eq!(r.body["pid"], std::process::id());
        let r = route(&req("GET", "/status", ""), None);
        assert_eq!(r.status, 200);
        assert!(r.body["Seccomp"].is_string(), "{}", r.body);
        let uid = r.body["Uid"].as_str().unwrap();
        assert_eq!(
            uid.split(' ').count(),
            4,
            "real, effective, saved, fs: {uid:?}"
        );
        assert!(r.body["interfaces"].is_array(), "{}", r.body);
        let r = route(&req("POST", "/health", ""), None);
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        let r = route(&req("GET", "/exec", ""), None);
        assert_eq!((r.status, r.allow), (405, Some("POST")));
        assert_eq!(route(&req("GET", "/", ""), None).status, 404);
        assert_eq!(route(&req("GET", "/health/", ""), None).status, 404);
        let r = route(&req("POST", "/exec", r#"{"argv":["/bin/true"]}"#), None);
        assert_eq!(r.status, 503);
        assert!(r.body["error"].as_str().unwrap().contains("no broker"));
        assert_eq!(route(&req("POST", "/send", "{}"), None).status, 503);
    }

    #[test]
    fn body_shapes() {
        let bad: Result<ExecBody, _> = parse_body(b"{\"argv\":\"ls\"}", EXEC_SHAPE);
        assert_eq!(bad.err().map(|r| r.status), Some(400));
        let bad: Result<ExecBody, _> = parse_body(b"{\"argv\":[],\"env\":{}}", EXEC_SHAPE);
        assert_eq!(bad.err().map(|r| r.status), Some(400));
        let bad: Result<ExecBody, _> = parse_body(b"not json", EXEC_SHAPE);
        assert_eq!(bad.err().map(|r| r.status), Some(400));
        let ok: ExecBody = parse_body(b"{\"argv\":[\"/bin/echo\",\"hi\"]}", EXEC_SHAPE)
            .ok()
            .unwrap();
        assert_eq!(ok.argv, vec!["/bin/echo", "hi"]);
        assert_eq!(ok.cwd, None);
        let bad: Result<SendBody, _> = parse_body(b"{\"channel\":\"c\",\"to\":\"x\"}", "");
        assert_eq!(bad.err().map(|r| r.status), Some(400));
    }

    #[test]
    fn broker_refusals_map_to_statuses() {
        use carapace_broker::protocol::ErrorBody;
        let refused = |code| {
            broker_error(&ClientError::Refused(ErrorBody {
                code,
                message: "why".into(),
            }))
        };
        assert_eq!(refused(ErrorCode::Denied).status, 403);
        assert_eq!(refused(ErrorCode::Denied).body["code"], "denied");
        assert_eq!(refused(ErrorCode::Pending).status, 403);
        assert_eq!(refused(ErrorCode::RateLimited).status, 429);
        assert_eq!(refused(ErrorCode::Unavailable).status, 503);
        assert_eq!(refused(ErrorCode::Internal).status, 502);
        assert_eq!(broker_error(&ClientError::Closed).status, 502);
    }

    #[test]
    fn interface_names() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 0 0 0\n  eth0: 1 2 3\n";
        assert_eq!(interfaces(dev), vec!["lo", "eth0"]);
        assert!(interfaces("h\nh\n").is_empty());
    }

    #[test]
    fn output_is_capped_but_drained() {
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_OUTPUT / chunk.len() + 2) {
                std::io::Write::write_all(&mut w, &chunk).unwrap();
            }
        });
        let (kept, more) = read_capped(OwnedFd::from(r));
        writer.join().unwrap();
        assert_eq!(kept.len(), MAX_OUTPUT);
        assert!(more);
    }
}
