//! `carapace-client` against the real `Server` with a scripted handler: each subcommand, its
//! output and exit code, both directions (what is granted works, what is refused fails).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use carapace_broker::protocol::{
    seqpacket_pair, Access, DeliverStatus, ErrorCode, Event, ExitSummary, OkReply, Request,
    SendStatus,
};
use carapace_broker::server::{Handler, Identity, PeerLimits, Response, Role, Server};

struct Scripted;

fn exec_child(argv: Vec<String>) -> Response {
    let Some((prog, args)) = argv.split_first() else {
        return Response::err(ErrorCode::BadRequest, "empty argv");
    };
    if prog == "forbidden" {
        return Response::err(ErrorCode::Denied, "no rule allows forbidden");
    }
    let mut child = match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Response::err(ErrorCode::Unavailable, e.to_string()),
    };
    let out: OwnedFd = child.stdout.take().unwrap().into();
    let err: OwnedFd = child.stderr.take().unwrap().into();
    Response::ok(OkReply::Exec {})
        .with_fds(vec![out, err])
        .with_follow_up(Box::pin(async move {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
            let code = status.code();
            Event::Exit(ExitSummary {
                exit: code.unwrap_or(128),
                code,
                signal: None,
                wall_ms: 0,
                cpu_ms: 0,
                peak_mem: 0,
                oom: false,
                timeout: false,
            })
        }))
}

impl Handler for Scripted {
    fn handle(
        &self,
        _who: &Identity,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            match req {
                Request::Ping {} => Response::ok(OkReply::Ping {}),
                Request::Connect { host, port } if host == "127.0.0.1" => {
                    match TcpStream::connect((host.as_str(), port)) {
                        Ok(s) => Response::ok(OkReply::Connect {
                            peer: format!("127.0.0.1:{port}"),
                        })
                        .with_fds(vec![s.into()]),
                        Err(e) => Response::err(ErrorCode::Unavailable, e.to_string()),
                    }
                }
                Request::Connect { host, .. } => {
                    Response::err(ErrorCode::Denied, format!("{host} is not in the allowlist"))
                }
                Request::Secret { name } if name == "k" => {
                    let mut f = tempfile::tempfile().unwrap();
                    f.write_all(b"s3cret").unwrap();
                    Response::ok(OkReply::Secret { len: 6 }).with_fds(vec![f.into()])
                }
                Request::Secret { .. } => Response::err(ErrorCode::Denied, "not yours"),
                Request::Open { path, access, .. } => {
                    let r = match access {
                        Access::Read | Access::List => std::fs::File::open(&path),
                        Access::Write => std::fs::OpenOptions::new().write(true).open(&path),
                        Access::Create => std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path),
                    };
                    match r {
                        Ok(f) => Response::ok(OkReply::Open { access }).with_fds(vec![f.into()]),
                        Err(e) => Response::err(ErrorCode::NotFound, e.to_string()),
                    }
                }
                Request::Send { recipient, .. } if recipient == "#ops" => {
                    Response::ok(OkReply::Send {
                        status: SendStatus::Delivered,
                        dlq_id: None,
                        outbox_id: None,
                    })
                }
                Request::Send { .. } => Response::ok(OkReply::Send {
                    status: SendStatus::DeadLettered,
                    dlq_id: Some("dlq-1".into()),
                    outbox_id: None,
                }),
                Request::Exec { argv, .. } => exec_child(argv),
                Request::Session {} => Response::err(ErrorCode::Internal, "not a handler's op"),
                Request::Deliver { channel, body, .. } if channel == "inbox" => {
                    if body.len() > 100 {
                        Response::err(ErrorCode::TooLarge, "over the channel's max_bytes 100")
                    } else {
                        Response::ok(OkReply::Deliver {
                            seq: 40 + body.len() as u64,
                            status: DeliverStatus::Queued,
                            held: None,
                        })
                    }
                }
                Request::Deliver { channel, .. } if channel == "full" => {
                    Response::err(ErrorCode::Busy, "the inbound queue is full")
                }
                Request::Deliver { .. } => Response::err(ErrorCode::Denied, "not your channel"),
                Request::Auth { .. }
                | Request::Approvals {}
                | Request::Approve { .. }
                | Request::Inbound { .. }
                | Request::Outbox { .. }
                | Request::OutboxAck { .. }
                | Request::ChannelState { .. }
                | Request::Held {}
                | Request::Admit { .. }
                | Request::DropHeld { .. }
                | Request::DeadLetters {}
                | Request::DlqRelease { .. }
                | Request::DlqDrop { .. }
                | Request::AuditQuery { .. }
                | Request::Channels {}
                | Request::Children {}
                | Request::Redact { .. } => {
                    Response::err(ErrorCode::Denied, "not this handler's op")
                }
            }
        })
    }
}

struct Broker {
    rt: tokio::runtime::Runtime,
    server: Server,
}

fn broker() -> Broker {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new(Arc::new(Scripted), PeerLimits::default());
    Broker { rt, server }
}

impl Broker {
    /// Run carapace-client with the broker socket at fd 3.
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let (ours, theirs) = seqpacket_pair().unwrap();
        {
            let _g = self.rt.enter();
            self.server.serve_peer(
                ours,
                Identity {
                    id: 1,
                    role: Role::Tool,
                    profile: "t".into(),
                },
            );
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_carapace-client"));
        cmd.args(args)
            .env_remove("CARAPACE_BROKER_FD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let raw = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe syscalls (dup2 / fcntl) on an fd inherited from the parent.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(theirs);
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ping() {
    let b = broker();
    let o = b.run(&["ping"], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "pong\n");
}

#[test]
fn usage_errors_exit_2_and_no_broker_exits_1() {
    let b = broker();
    for args in [
        &[][..],
        &["frobnicate"],
        &["connect", "host"],
        &["connect", "host", "99999"],
        &["secret", "k", "--fd", "x", "--", "cat"],
        &["secret", "k", "--", "cat"],
        &["open", "/x", "--read", "--write"],
        &["exec"],
        &["exec", "--"],
        &["send", "log"],
        &["deliver", "inbox"],
        &["deliver", "inbox", "alice", "body", "extra"],
    ] {
        let o = b.run(args, b"");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }
    // No fd 3 at all.
    let o = Command::new(env!("CARGO_BIN_EXE_carapace-client"))
        .arg("ping")
        .env("CARAPACE_BROKER_FD", "250")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("not a broker socket"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn connect_hands_the_socket_to_prog_or_relays() {
    let b = broker();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let server = std::thread::spawn(move || {
        // 1: PROG on the socket: we say "ping", it answers "got ping".
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"ping\n").unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        // 2: relay: we read what the client's stdin sent and answer in upper case.
        let (mut s2, _) = listener.accept().unwrap();
        let mut req = String::new();
        s2.read_to_string(&mut req).unwrap();
        s2.write_all(req.to_uppercase().as_bytes()).unwrap();
        got
    });
    let o = b.run(
        &[
            "connect",
            "127.0.0.1",
            &port,
            "--",
            "sh",
            "-c",
            "read l; echo \"got $l\"",
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o2 = b.run(&["connect", "127.0.0.1", &port], b"hello\n");
    assert!(o2.status.success(), "{}", text(&o2.stderr));
    assert_eq!(text(&o2.stdout), "HELLO\n");
    assert_eq!(server.join().unwrap(), "got ping\n");
    // refused
    let o = b.run(&["connect", "evil.example", "443", "--", "cat"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("denied"), "{}", text(&o.stderr));
}

#[test]
fn secret_to_stdout_or_as_fd() {
    let b = broker();
    let o = b.run(&["secret", "k"], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(o.stdout, b"s3cret");
    let o = b.run(
        &["secret", "k", "--fd", "5", "--", "sh", "-c", "cat <&5"],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(o.stdout, b"s3cret");
    let o = b.run(&["secret", "other"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(text(&o.stderr).contains("denied"));
}

#[test]
fn open_read_write_create_and_prog() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, "contents\n").unwrap();
    let fs = f.to_str().unwrap();
    let o = b.run(&["open", fs], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "contents\n");
    let o = b.run(&["open", fs, "--", "tr", "a-z", "A-Z"], b"");
    assert_eq!(text(&o.stdout), "CONTENTS\n");
    let n = dir.path().join("new");
    let ns = n.to_str().unwrap();
    let o = b.run(&["open", ns, "--create"], b"written");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(&n).unwrap(), "written");
    // create refuses an existing file
    let o = b.run(&["open", ns, "--create"], b"again");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&n).unwrap(), "written");
    let o = b.run(&["open", ns, "--write", "--", "echo", "hi"], b"");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(&n).unwrap(), "hi\ntten");
    let o = b.run(&["open", "/nonexistent/x"], b"");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn send_delivered_or_dead_lettered() {
    let b = broker();
    let o = b.run(&["send", "log", "#ops"], b"deploy done");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "delivered\n");
    let o = b.run(&["send", "log", "mallory"], b"x");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("dlq-1"), "{}", text(&o.stderr));
    let o = b.run(&["send", "log", "#ops"], b"\xff\xfe");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("UTF-8"));
}

#[test]
fn deliver_prints_the_seq_or_fails() {
    let b = broker();
    // The body as an argument, or from stdin.
    let o = b.run(
        &["deliver", "inbox", "alice@example.com", "hello"],
        b"ignored",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "45\n");
    let o = b.run(&["deliver", "inbox", "alice@example.com"], b"from stdin");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "50\n");
    // Refusals: exit 1, the reason on stderr, nothing on stdout.
    for (args, stdin, want) in [
        (&["deliver", "other", "alice", "x"][..], &b""[..], "denied"),
        (&["deliver", "full", "alice", "x"], b"", "busy"),
        (
            &["deliver", "inbox", "alice"],
            &[b'x'; 101][..],
            "too_large",
        ),
        (&["deliver", "inbox", "alice"], b"\xff\xfe", "UTF-8"),
    ] {
        let o = b.run(args, stdin);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(
            text(&o.stderr).contains(want),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let o = b.run(&["--help"], b"");
    assert!(text(&o.stdout).contains("carapace-client deliver CHANNEL SENDER [BODY]"));
}

#[test]
fn exec_streams_output_and_exits_with_the_tools_code() {
    let b = broker();
    let o = b.run(
        &["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");
    let o = b.run(&["exec", "--", "true"], b"");
    assert_eq!(o.status.code(), Some(0));
    let o = b.run(&["exec", "--", "forbidden"], b"");
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("denied"));
    let o = b.run(&["exec", "--", "/nonexistent/prog"], b"");
    assert_eq!(o.status.code(), Some(126));
}
