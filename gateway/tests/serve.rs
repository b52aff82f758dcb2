//! The stand-in gateway as a process: it serves the listener handed to it at fd 4 and refuses
//! to start without one. (Confined, with a broker, it is tested by tests/tests/service_e2e.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_carapace-gateway");

/// The gateway with `fd` placed at 4 (and `CARAPACE_LISTEN_FD=4`), no broker.
fn command_with_fd4(fd: RawFd) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("CARAPACE_LISTEN_FD", "4")
        .env("CARAPACE_BROKER_FD", "1000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl,
    // which are async-signal-safe; `fd` is open in the parent for as long as the command runs.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 4 {
                if libc::fcntl(4, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 4) != 4 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Gateway {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let child = command_with_fd4(l.as_raw_fd()).spawn().unwrap();
    drop(l); // the gateway's copy keeps listening
    Gateway { child, addr }
}

/// Send raw bytes; the status (0 when there was no answer), the head and the body.
fn exchange(addr: SocketAddr, req: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(req);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (code, head.to_string(), body.to_string())
}

/// Send raw bytes, return (status, body).
fn raw(addr: SocketAddr, req: &[u8]) -> (u16, String) {
    let (code, _, body) = exchange(addr, req);
    (code, body)
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, _, v) = request(addr, method, path, None, body);
    (code, v)
}

fn http_auth(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String, serde_json::Value) {
    request(addr, method, path, Some(token), body)
}

/// One request (`Connection: close`, with `Authorization: Bearer TOKEN` when given): status,
/// head, body as JSON (or as a string when it is not JSON).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, serde_json::Value) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (code, head, text) = exchange(addr, req.as_bytes());
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (code, head, v)
}

#[test]
fn serves_the_handed_over_listener() {
    let g = start();
    let (code, v) = http(g.addr, "GET", "/health", "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["ok"], true);
    // Everything else needs a token: none is 401 with a Bearer challenge, and without a
    // broker no token can be checked (503), whatever it is.
    let (code, head, v) = http_auth(g.addr, "GET", "/v1/status", "", "");
    assert_eq!(code, 401, "{v}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(v["error"]["data"]["kind"], "unauthorized", "{v}");
    let (code, _, v) = http_auth(g.addr, "GET", "/v1/status", "cpt_whatever", "");
    assert_eq!(code, 503, "no broker here: {v}");
    let (code, _, v) = http_auth(
        g.addr,
        "POST",
        "/rpc",
        "cpt_x",
        r#"{"jsonrpc":"2.0","id":1,"method":"gateway.ping"}"#,
    );
    assert_eq!(code, 503, "{v}");
    assert_eq!(http(g.addr, "GET", "/nope", "").0, 404);
    assert_eq!(http(g.addr, "DELETE", "/v1/status", "").0, 405);
    assert_eq!(http(g.addr, "GET", "/rpc", "").0, 405);
    assert_eq!(raw(g.addr, b"NONSENSE\r\n\r\n").0, 400);
    // A request head over the cap is refused.
    let big = format!(
        "GET /health HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (code, body) = raw(g.addr, big.as_bytes());
    assert!(code == 431 || code == 0, "{code} {body}");
    // Many connections at once are all served.
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let a = g.addr;
            std::thread::spawn(move || http(a, "GET", "/health", "").0)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    // A silent client does not block the others.
    let _silent = TcpStream::connect(g.addr).unwrap();
    assert_eq!(http(g.addr, "GET", "/health", "").0, 200);
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

#[test]
fn refuses_to_start_without_a_listener() {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("CARAPACE_LISTEN_FD");
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no listening socket"), "{err}");

    let mut cmd = Command::new(BIN);
    cmd.env("CARAPACE_LISTEN_FD", "1");
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a file descriptor above 2"));

    // fd 4 closed.
    let mut cmd = Command::new(BIN);
    cmd.env("CARAPACE_LISTEN_FD", "4");
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a socket"), "{err}");

    // A unix socket, and a TCP socket that is not listening.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let o = run(command_with_fd4(a.as_raw_fd()));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a TCP/IP"));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let o = run(command_with_fd4(c.as_raw_fd()));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not listening"), "{err}");
}

#[test]
fn help_and_bad_arguments() {
    let mut cmd = Command::new(BIN);
    cmd.arg("--help");
    let o = run(cmd);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Usage: carapace-gateway") && out.contains("GET /ws"),
        "{out}"
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("--port=1");
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(2));
}
