//! The `carapace-channel` binary as the supervisor runs it: the broker socket at fd 3 (served
//! here by the real broker `Server` with a scripted handler), the settings in
//! `$CARAPACE_CHANNEL_SETTINGS`, for webhooks a listening socket at fd 4. Telegram runs against
//! the fake Bot API on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use carapace_broker::protocol::{
    seqpacket_pair, AckStatus, DeliverStatus, ErrorCode, OkReply, OutboundMessage, Request,
    SendOutcome,
};
use carapace_broker::server::{Handler, Identity, PeerLimits, Response, Role, Server};
use carapace_tests::fake_telegram::FakeTelegram;
use serde_json::json;

const TOKEN: &str = "777:binary-test_token_abc";
const KEY: &[u8] = b"webhook-key";
const WAIT: Duration = Duration::from_secs(20);

/// What the scripted broker saw and holds.
#[derive(Debug, Default)]
struct Seen {
    /// (channel, sender, body, id, conversation, reply_to)
    delivered: Vec<(String, String, String, String, String, String)>,
    ids: HashSet<String>,
    outbox: VecDeque<OutboundMessage>,
    acks: Vec<(String, SendOutcome)>,
    states: Vec<(bool, Option<String>)>,
    connects: Vec<(String, u16)>,
}

#[derive(Debug, Default)]
struct Scripted(Mutex<Seen>);

impl Scripted {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn secret_file(bytes: &[u8]) -> OwnedFd {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.into()
}

impl Handler for Scripted {
    fn handle(
        &self,
        _who: &Identity,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            match req {
                Request::Secret { name } if name == "bot" => Response::ok(OkReply::Secret {
                    len: TOKEN.len() as u64,
                })
                .with_fds(vec![secret_file(TOKEN.as_bytes())]),
                Request::Secret { name } if name == "hook" => Response::ok(OkReply::Secret {
                    len: KEY.len() as u64,
                })
                .with_fds(vec![secret_file(KEY)]),
                Request::Secret { .. } => Response::err(ErrorCode::Denied, "not yours"),
                Request::Connect { host, port } => {
                    self.seen().connects.push((host.clone(), port));
                    match TcpStream::connect((host.as_str(), port)) {
                        Ok(s) => Response::ok(OkReply::Connect {
                            peer: format!("{host}:{port}"),
                        })
                        .with_fds(vec![s.into()]),
                        Err(e) => Response::err(ErrorCode::Unavailable, e.to_string()),
                    }
                }
                Request::Deliver {
                    channel,
                    sender,
                    body,
                    id,
                    conversation,
                    reply_to,
                } => {
                    let mut s = self.seen();
                    let id = id.unwrap_or_default();
                    if !s.ids.insert(id.clone()) {
                        return Response::ok(OkReply::Deliver {
                            seq: 0,
                            status: DeliverStatus::Duplicate,
                            held: None,
                        });
                    }
                    s.delivered.push((
                        channel,
                        sender,
                        body,
                        id,
                        conversation.unwrap_or_default(),
                        reply_to.unwrap_or_default(),
                    ));
                    Response::ok(OkReply::Deliver {
                        seq: s.delivered.len() as u64,
                        status: DeliverStatus::Queued,
                        held: None,
                    })
                }
                Request::Outbox { wait_ms, .. } => {
                    let deadline = Instant::now() + Duration::from_millis(wait_ms.min(300));
                    loop {
                        let taken: Vec<_> = self.seen().outbox.drain(..).collect();
                        if !taken.is_empty() || Instant::now() >= deadline {
                            return Response::ok(OkReply::Outbox { messages: taken });
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Request::OutboxAck { id, outcome, .. } => {
                    let status = match outcome {
                        SendOutcome::Sent { .. } => AckStatus::Done,
                        SendOutcome::Failed { .. } => AckStatus::DeadLettered,
                    };
                    self.seen().acks.push((id, outcome));
                    Response::ok(OkReply::OutboxAck {
                        status,
                        dlq_id: None,
                        retry_in_ms: None,
                    })
                }
                Request::ChannelState {
                    connected, error, ..
                } => {
                    self.seen().states.push((connected, error));
                    Response::ok(OkReply::ChannelState {})
                }
                Request::Ping {} => Response::ok(OkReply::Ping {}),
                _ => Response::err(ErrorCode::Denied, "not this handler's op"),
            }
        })
    }
}

/// A broker serving one adapter process.
struct Broker {
    rt: tokio::runtime::Runtime,
    handler: Arc<Scripted>,
    server: Server,
}

fn broker() -> Broker {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handler = Arc::new(Scripted::default());
    let server = Server::new(handler.clone(), PeerLimits::default());
    Broker {
        rt,
        handler,
        server,
    }
}

/// `fd` duplicated above 10 (so the child's dup2 to 3 and 4 cannot clobber it).
fn high(fd: BorrowedFd<'_>) -> OwnedFd {
    let r = rustix::io::fcntl_dupfd_cloexec(fd, 10).unwrap();
    assert!(r.as_raw_fd() >= 10);
    r
}

impl Broker {
    /// Start `carapace-channel` with `settings`, the broker at fd 3 and `listener` at fd 4.
    fn spawn(&self, settings: serde_json::Value, listener: Option<&TcpListener>) -> Child {
        let (ours, theirs) = seqpacket_pair().unwrap();
        {
            let _g = self.rt.enter();
            self.server.serve_peer(
                ours,
                Identity {
                    id: 1,
                    role: Role::Channel,
                    profile: "channel".into(),
                },
            );
        }
        let broker_dup = high(theirs.as_fd());
        let listen_dup = listener.map(|l| high(l.as_fd()));
        let broker_fd = broker_dup.as_raw_fd();
        let listen_fd = listen_dup.as_ref().map(|d| d.as_raw_fd());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_carapace-channel"));
        cmd.env("CARAPACE_CHANNEL_SETTINGS", settings.to_string())
            .env("CARAPACE_BROKER_FD", "3")
            .env("CARAPACE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if listen_fd.is_some() {
            cmd.env("CARAPACE_LISTEN_FD", "4");
        } else {
            cmd.env_remove("CARAPACE_LISTEN_FD");
        }
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe syscalls (dup2) on fds inherited from the parent.
        unsafe {
            cmd.pre_exec(move || {
                for (src, dst) in [(Some(broker_fd), 3), (listen_fd, 4)] {
                    if let Some(src) = src {
                        if libc::dup2(src, dst) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The duplicates were made for the child alone.
        drop(broker_dup);
        drop(listen_dup);
        drop(theirs);
        child
    }

    fn until<T>(&self, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f(&self.handler.seen()) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM, then the exit code and stderr.
fn stop(mut child: Child) -> (Option<i32>, String) {
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().unwrap();
    (status.code(), err)
}

#[test]
fn telegram_through_the_real_broker_protocol() {
    let b = broker();
    let fake = FakeTelegram::start(TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let child = b.spawn(
        json!({"channel": "tg", "state_dir": dir.path(), "kind": "telegram",
               "api_base": fake.base_url(), "token_secret": "bot", "poll_timeout_ms": 1000}),
        None,
    );
    let (u, _) = fake.push_text(-1001, 31, "hello from a group");
    let d = b.until("the delivery", |s| s.delivered.first().cloned());
    assert_eq!(
        d,
        (
            "tg".into(),
            "31".into(),
            "hello from a group".into(),
            format!("update:{u}"),
            "-1001".into(),
            "-1001".into()
        )
    );
    fake.wait_offset(u + 1, WAIT);
    let cursor = std::fs::read_to_string(dir.path().join("telegram.cursor.json")).unwrap();
    assert!(
        cursor.contains(&format!("\"offset\":{}", u + 1)),
        "{cursor}"
    );
    b.handler.seen().outbox.push_back(OutboundMessage {
        id: "out-1".into(),
        recipient: "-1001".into(),
        body: "answer".into(),
        in_reply_to: Some(format!("update:{u}")),
        attempt: 1,
        buttons: Vec::new(),
    });
    let sent = fake.wait_sent(1, WAIT);
    assert_eq!(
        (sent[0]["chat_id"].clone(), sent[0]["text"].clone()),
        (json!(-1001), json!("answer"))
    );
    let ack = b.until("the ack", |s| s.acks.first().cloned());
    assert!(
        matches!(&ack, (id, SendOutcome::Sent { service_id: Some(_) }) if id == "out-1"),
        "{ack:?}"
    );
    assert_eq!(b.handler.seen().states.first(), Some(&(true, None)));
    assert!(b
        .handler
        .seen()
        .connects
        .iter()
        .all(|(h, _)| h == "127.0.0.1"));
    let (code, err) = stop(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !err.contains(TOKEN) && !err.contains("binary-test_token"),
        "the token is in the log:\n{err}"
    );
}

#[test]
fn webhook_on_the_inherited_listener() {
    let b = broker();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let child = b.spawn(
        json!({"channel": "hook", "state_dir": dir.path(), "kind": "webhook", "hmac_secret": "hook"}),
        Some(&listener),
    );
    drop(listener);
    let body = br#"{"id":"w1","sender":"ci","text":"deployed"}"#;
    let sig = carapace_channels::webhook::sign(KEY, body).unwrap();
    let post = |sig: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /hook HTTP/1.1\r\nHost: x\r\nX-Carapace-Signature: {sig}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    // The listener is served from the start: connections wait in its backlog meanwhile.
    let out = post(&sig);
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    assert!(post("sha256=00").starts_with("HTTP/1.1 401"));
    let d = b.until("the delivery", |s| s.delivered.first().cloned());
    assert_eq!(
        (d.1.as_str(), d.2.as_str(), d.3.as_str(), d.5.as_str()),
        ("ci", "deployed", "w1", "ci")
    );
    // No url: an outbound message is refused for good.
    b.handler.seen().outbox.push_back(OutboundMessage {
        id: "o".into(),
        recipient: "ci".into(),
        body: "x".into(),
        in_reply_to: None,
        attempt: 1,
        buttons: Vec::new(),
    });
    let ack = b.until("the ack", |s| s.acks.first().cloned());
    assert!(
        matches!(ack.1, SendOutcome::Failed { retry: false, .. }),
        "{ack:?}"
    );
    let (code, err) = stop(child);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn refuses_to_start_without_settings_or_broker() {
    let run = |settings: Option<&str>, broker_fd: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_carapace-channel"));
        cmd.env("CARAPACE_BROKER_FD", broker_fd);
        match settings {
            Some(s) => cmd.env("CARAPACE_CHANNEL_SETTINGS", s),
            None => cmd.env_remove("CARAPACE_CHANNEL_SETTINGS"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(None, "3");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("CARAPACE_CHANNEL_SETTINGS is not set"),
        "{err}"
    );
    let (code, err) = run(Some(r#"{"channel":"x","kind":"fax"}"#), "3");
    assert_eq!(code, Some(2));
    assert!(err.contains("CARAPACE_CHANNEL_SETTINGS"), "{err}");
    // fd 200 is not open: no broker.
    let (code, err) = run(
        Some(r#"{"channel":"x","kind":"telegram","token_secret":"t"}"#),
        "200",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("no broker socket"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_carapace-channel"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = Command::new(env!("CARGO_BIN_EXE_carapace-channel"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
