//! The operations behind the real server and client, over SOCK_SEQPACKET socketpairs: the fds
//! cross the socket, and each peer is decided by the identity bound to its socket.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use carapace_broker::audit::AuditLog;
use carapace_broker::client::Client;
use carapace_broker::dlq::DeadLetters;
use carapace_broker::ops::{Ops, OpsConfig};
use carapace_broker::protocol::{seqpacket_pair, Access, ErrorCode, SendStatus};
use carapace_broker::server::{Handler, Identity, PeerLimits, Role, Server};
use carapace_policy::Policy;

#[test]
fn ops_over_the_wire() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::fs::create_dir(dir.join("data"))?;
    std::fs::write(dir.join("data/f"), "file body")?;
    std::fs::write(dir.join("key"), "the-secret-value")?;
    std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600))?;
    let d = dir.display();
    let text = format!(
        r#"
version = 1
[profiles.gw]
why = "gateway"
[profiles.gw.broker]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "test" }} ]
open = [ {{ path = "{d}/data", access = "read", why = "data" }} ]
secrets = ["key"]
channels = ["out"]
[profiles.tool]
why = "tool"
[profiles.tool.broker]
channels = ["out"]
[secrets.key]
why = "k"
file = "{d}/key"
[channels.out]
why = "o"
kind = "file"
path = "{d}/out.log"
recipients = ["ok@example.com"]
"#
    );
    let policy = Policy::parse(&text, "wire.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let ops = Ops::new(
        policy,
        AuditLog::open(dir.join("audit.log"))?,
        DeadLetters::open(dir.join("dlq"))?,
        None,
        None,
        OpsConfig::default(),
    )?;
    let handler: Arc<dyn Handler> = Arc::new(ops);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = Server::new(handler, PeerLimits::default());
    let (gw_child, gw_broker) = seqpacket_pair()?;
    let (tool_child, tool_broker) = seqpacket_pair()?;
    {
        let _g = rt.enter();
        server.serve_peer(
            gw_broker,
            Identity {
                id: 1,
                role: Role::Gateway,
                profile: "gw".into(),
            },
        );
        server.serve_peer(
            tool_broker,
            Identity {
                id: 2,
                role: Role::Tool,
                profile: "tool".into(),
            },
        );
    }
    let mut gw = Client::new(gw_child);
    let mut tool = Client::new(tool_child);
    gw.ping()?;

    // connect: the socket crosses the wire, connected.
    let (fd, peer) = gw.connect("127.0.0.1", port)?;
    assert_eq!(peer, format!("127.0.0.1:{port}"));
    let (mut srv, _) = listener.accept()?;
    std::net::TcpStream::from(fd).write_all(b"hi")?;
    let mut buf = [0u8; 2];
    srv.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hi");
    // The tool's profile has no connect rule: the same request is refused.
    let e = tool.connect("127.0.0.1", port).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // secret: only the gateway's profile names it; the memfd is sealed.
    let (fd, len) = gw.secret("key")?;
    assert_eq!(len, 16);
    let mut f = std::fs::File::from(fd);
    assert!(f.write_all(b"x").is_err());
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    assert_eq!(s, "the-secret-value");
    let e = tool.secret("key").err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // open
    let mut f = gw.open(&format!("{d}/data/f"), Access::Read)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    assert_eq!(s, "file body");
    let e = gw.open(&format!("{d}/data/../key"), Access::Read).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::BadRequest));

    // send: allowlisted is delivered, others dead-lettered; secret values redacted.
    let (st, _) = tool.send("out", "ok@example.com", "value the-secret-value here")?;
    assert_eq!(st, SendStatus::Delivered);
    let (st, id) = tool.send("out", "evil@example.com", "x")?;
    assert_eq!(st, SendStatus::DeadLettered);
    assert!(id.is_some());
    let out = std::fs::read_to_string(dir.join("out.log"))?;
    assert!(out.contains("value [REDACTED] here"), "{out}");
    assert!(!out.contains("the-secret-value"));

    // The audit chain verifies and names who asked.
    let report = carapace_broker::audit::verify(dir.join("audit.log"))?;
    assert!(report.is_ok(), "{report}");
    let log = std::fs::read_to_string(dir.join("audit.log"))?;
    assert!(!log.contains("the-secret-value"));
    assert!(log.contains("\"profile\":\"tool\""));
    drop(gw);
    drop(tool);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Runs nothing: empty output, exit 0.
struct NoopSpawner;

impl carapace_broker::ops::Spawner for NoopSpawner {
    fn spawn(
        &self,
        _req: carapace_broker::ops::SpawnRequest,
    ) -> Result<carapace_broker::ops::SpawnHandle, carapace_broker::ops::SpawnFailure> {
        let fail = |e: nix::Error| carapace_broker::ops::SpawnFailure {
            message: e.to_string(),
        };
        let (out_r, out_w) = nix::unistd::pipe().map_err(fail)?;
        let (err_r, err_w) = nix::unistd::pipe().map_err(fail)?;
        Ok(carapace_broker::ops::SpawnHandle {
            stdout: out_r,
            stderr: err_r,
            wait: Box::new(move || {
                drop((out_w, err_w));
                carapace_broker::protocol::ExitSummary {
                    exit: 0,
                    code: Some(0),
                    signal: None,
                    wall_ms: 0,
                    cpu_ms: 0,
                    peak_mem: 0,
                    oom: false,
                    timeout: false,
                }
            }),
        })
    }
}

/// The gateway's ops through the real server and client: a token checked by its hash, a
/// tool's `ask` listed and allowed by the gateway, the tool's exec then running; a tool's
/// profile may do none of it.
#[test]
fn gateway_ops_over_the_wire() -> anyhow::Result<()> {
    use carapace_broker::approvals::Approvals;
    use carapace_broker::tokens::{token_sha256_hex, Scope, TokenStore};

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let text = r#"
version = 1
[profiles.gateway]
why = "gateway"
[profiles.gateway.broker]
auth = true
approve = true
[profiles.tool]
why = "tool"
[profiles.tool.broker]
exec = true
[[exec]]
why = "needs a person"
program = "/usr/bin/yes"
profile = "tool"
approval = "ask"
"#;
    let policy = Policy::parse(text, "wire.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = TokenStore::in_state_dir(dir);
    let (laptop, token) = store.create("laptop", Scope::Operator)?;
    let approvals = Arc::new(Approvals::open(dir, Duration::from_secs(30))?);
    let ops = Ops::new(
        policy,
        AuditLog::open(dir.join("audit.log"))?,
        DeadLetters::open(dir.join("dlq"))?,
        Some(Arc::new(NoopSpawner)),
        Some(approvals.clone()),
        OpsConfig {
            token_store: Some(store.path().to_path_buf()),
            ..OpsConfig::default()
        },
    )?;
    let handler: Arc<dyn Handler> = Arc::new(ops);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = Server::new(handler, PeerLimits::default());
    let (gw_child, gw_broker) = seqpacket_pair()?;
    let (tool_child, tool_broker) = seqpacket_pair()?;
    {
        let _g = rt.enter();
        server.serve_peer(
            gw_broker,
            Identity {
                id: 1,
                role: Role::Gateway,
                profile: "gateway".into(),
            },
        );
        server.serve_peer(
            tool_broker,
            Identity {
                id: 2,
                role: Role::Tool,
                profile: "tool".into(),
            },
        );
    }
    let mut gw = Client::new(gw_child);
    let mut tool = Client::new(tool_child);

    // auth: the hash of a token gives the token; anything else the one refusal.
    assert_eq!(gw.auth(&token_sha256_hex(&token))?, laptop);
    for bad in [token_sha256_hex("cpt_other"), "not-a-hash".to_string()] {
        let e = gw.auth(&bad).err();
        let msg = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));
        assert!(msg.ends_with("unknown or revoked token"), "{msg}");
    }
    let e = tool.auth(&token_sha256_hex(&token)).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));
    // A revoked token no longer verifies (the store is read anew).
    let (spare, spare_token) = store.create("spare", Scope::Client)?;
    assert_eq!(gw.auth(&token_sha256_hex(&spare_token))?, spare);
    store.revoke(&spare.id)?;
    let e = gw.auth(&token_sha256_hex(&spare_token)).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // approvals / approve: the tool's exec waits until the gateway allows it.
    assert!(gw.approvals()?.is_empty());
    let asking = std::thread::spawn(move || -> anyhow::Result<i32> {
        let started = tool.exec(vec!["yes".into()], None)?;
        Ok(tool.wait_exit(started.id)?.exit)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pending = loop {
        let list = gw.approvals()?;
        if let Some(p) = list.into_iter().next() {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no approval became pending"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(pending.who.id, 2);
    assert_eq!(pending.who.role, "tool");
    assert_eq!(pending.profile, "tool");
    let e = gw.approve(pending.id, "maybe", None).err();
    assert!(matches!(
        e,
        Some(carapace_broker::client::ClientError::BadArgument { .. })
    ));
    assert_eq!(
        gw.approve(pending.id, "allow-once", Some(&laptop.id))?,
        "allowed once"
    );
    let exit = asking
        .join()
        .map_err(|_| anyhow::anyhow!("the asking thread panicked"))??;
    assert_eq!(exit, 0);
    let e = gw.approve(pending.id, "deny", None).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::NotFound));

    let log = std::fs::read_to_string(dir.join("audit.log"))?;
    assert!(log.contains(&format!("\"target\":\"token:{}\"", laptop.id)));
    assert!(log.contains(&format!("by {} (as the child claims)", laptop.id)));
    assert!(!log.contains(&token_sha256_hex(&token)));
    let report = carapace_broker::audit::verify(dir.join("audit.log"))?;
    assert!(report.is_ok(), "{report}");
    drop(gw);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Inbound messages through the real server and client: an adapter delivers, the gateway's
/// long poll wakes at once, reads acknowledge by cursor; the wrong profiles are refused; a
/// long poll whose socket closes is cancelled (its in-flight slot comes back).
#[test]
fn inbound_over_the_wire() -> anyhow::Result<()> {
    use carapace_broker::protocol::{encode_request, recv_frame, send_frame, Request};
    use std::time::Instant;

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let text = r#"
version = 1
[profiles.gateway]
why = "gateway"
[profiles.gateway.broker]
inbound = true
[profiles.channel]
why = "the inbox's adapter"
[profiles.channel.broker]
deliver = ["inbox"]
[channels.inbox]
why = "messages from outside"
kind = "file"
path = "/nonexistent/inbox.log"
recipients = []
senders = ["*"]
"#;
    let policy = Policy::parse(text, "wire.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let ops = Ops::new(
        policy,
        AuditLog::open(dir.join("audit.log"))?,
        DeadLetters::open(dir.join("dlq"))?,
        None,
        None,
        OpsConfig::default(),
    )?;
    let handler: Arc<dyn Handler> = Arc::new(ops);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // One request in flight per identity: a waiting long poll holds the gateway's only slot.
    let limits = PeerLimits {
        max_in_flight: 1,
        ..PeerLimits::default()
    };
    let server = Server::new(handler, limits);
    let (gw_child, gw_broker) = seqpacket_pair()?;
    let (ad_child, ad_broker) = seqpacket_pair()?;
    {
        let _g = rt.enter();
        server.serve_peer(
            gw_broker,
            Identity {
                id: 1,
                role: Role::Gateway,
                profile: "gateway".into(),
            },
        );
        server.serve_peer(
            ad_broker,
            Identity {
                id: 3,
                role: Role::Channel,
                profile: "channel".into(),
            },
        );
    }
    let mut gw = Client::new(gw_child);
    let mut adapter = Client::new(ad_child);

    // Each side may do only its own half.
    let e = gw.deliver("inbox", "alice", "x").err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));
    let e = adapter.inbound(0, 0).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));
    let e = adapter.deliver("nope", "alice", "x").err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // The gateway waits (on a session of its own); the adapter delivers; the wait ends at once.
    let mut poller = gw.session()?;
    let start = Instant::now();
    let waiting = std::thread::spawn(move || poller.inbound(0, 20_000));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(adapter.deliver("inbox", "alice@example.com", "hello")?, 1);
    let (messages, next) = waiting
        .join()
        .map_err(|_| anyhow::anyhow!("the polling thread panicked"))??;
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(next, 1);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(
        (
            m.seq,
            m.channel.as_str(),
            m.sender.as_str(),
            m.body.as_str()
        ),
        (1, "inbox", "alice@example.com", "hello")
    );
    assert_eq!((m.from.id, m.from.role.as_str()), (3, "channel"));
    assert_eq!(m.from.profile, "channel");

    // Acknowledged by the next read's cursor.
    assert_eq!(adapter.deliver("inbox", "bob", "second")?, 2);
    let (messages, next) = gw.inbound(1, 0)?;
    assert_eq!((messages.len(), next), (1, 2));
    assert_eq!(messages[0].body, "second");
    let (messages, next) = gw.inbound(0, 0)?;
    assert_eq!((messages.len(), next), (1, 2), "1 was acknowledged");

    // A long poll on a socket that closes is cancelled: its slot comes back.
    let doomed = gw.session()?;
    let frame = encode_request(
        9,
        &Request::Inbound {
            after: 2,
            wait_ms: 30_000,
        },
    )?;
    // Acknowledge 2 first: the reads below are then quick.
    gw.inbound(2, 0)?;
    send_frame(doomed.as_fd(), &frame, &[])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        // Until the broker has taken the poll in, `gw` may still get its slot; and when `gw`
        // held it at that moment, the poll was answered `busy`: ask again.
        match gw.inbound(2, 0) {
            Err(e) if e.code() == Some(ErrorCode::Busy) => break,
            Ok(_) if Instant::now() < deadline => {
                if recv_frame(doomed.as_fd(), &mut buf, libc::MSG_DONTWAIT).is_ok() {
                    send_frame(doomed.as_fd(), &frame, &[])?;
                }
                std::thread::sleep(Duration::from_millis(10))
            }
            other => anyhow::bail!("the long poll never held the slot: {other:?}"),
        }
    }
    drop(doomed);
    let freed = loop {
        match gw.inbound(2, 0) {
            Ok(r) => break r,
            Err(e) if e.code() == Some(ErrorCode::Busy) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => anyhow::bail!("the closed socket's long poll was not cancelled: {e}"),
        }
    };
    assert_eq!(freed, (vec![], 2));

    // Audited: who delivered what to whom, never the body; reads are not audited.
    let log = std::fs::read_to_string(dir.join("audit.log"))?;
    assert!(
        log.contains("\"target\":\"inbox:alice@example.com\""),
        "{log}"
    );
    assert!(!log.contains("hello") && !log.contains("second"), "{log}");
    let report = carapace_broker::audit::verify(dir.join("audit.log"))?;
    assert!(report.is_ok(), "{report}");
    drop(gw);
    drop(adapter);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// An adapter channel end to end through the client library and the server: deliveries
/// queued or held, held messages admitted by an operator-scoped gateway, a send queued in the
/// outbox, taken, failed, retried and confirmed by the adapter, its state reported; then a new
/// broker on the same state directory still has what was not done.
#[test]
fn channel_ops_over_the_wire() -> anyhow::Result<()> {
    use carapace_broker::client::DeliverArgs;
    use carapace_broker::protocol::{AckStatus, DeliverStatus, SendOutcome};

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let text = r#"
version = 1
[profiles.gateway]
why = "gateway"
[profiles.gateway.broker]
inbound = true
approve = true
channels = ["telegram"]
[profiles.channel]
why = "the telegram adapter"
[profiles.channel.broker]
deliver = ["telegram"]
[channels.telegram]
why = "chat"
kind = "adapter"
recipients = ["111"]
senders = ["111"]
retry = { attempts = 2, initial_delay = "1s", max_delay = "1s" }
"#;
    let start =
        |dir: &std::path::Path| -> anyhow::Result<(tokio::runtime::Runtime, Client, Client)> {
            let policy = Policy::parse(text, "wire.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
            let ops = Ops::new(
                policy,
                AuditLog::open(dir.join("audit.log"))?,
                DeadLetters::open(dir.join("dlq"))?,
                None,
                None,
                OpsConfig {
                    state_dir: Some(dir.join("state")),
                    ..OpsConfig::default()
                },
            )?;
            let handler: Arc<dyn Handler> = Arc::new(ops);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let server = Server::new(handler, PeerLimits::default());
            let (gw_child, gw_broker) = seqpacket_pair()?;
            let (ad_child, ad_broker) = seqpacket_pair()?;
            {
                let _g = rt.enter();
                server.serve_peer(
                    gw_broker,
                    Identity {
                        id: 1,
                        role: Role::Gateway,
                        profile: "gateway".into(),
                    },
                );
                server.serve_peer(
                    ad_broker,
                    Identity {
                        id: 3,
                        role: Role::Channel,
                        profile: "channel".into(),
                    },
                );
            }
            Ok((rt, Client::new(gw_child), Client::new(ad_child)))
        };
    let (rt, mut gw, mut adapter) = start(dir)?;
    let args = |sender: &str, id: &str| DeliverArgs {
        channel: "telegram".into(),
        sender: sender.into(),
        body: format!("from {sender}"),
        id: Some(id.into()),
        conversation: Some("-100".into()),
        reply_to: None,
    };
    let r = adapter.deliver_message(&args("111", "update:1"))?;
    assert_eq!((r.seq, r.status), (1, DeliverStatus::Queued));
    let r = adapter.deliver_message(&args("111", "update:1"))?;
    assert_eq!((r.seq, r.status), (0, DeliverStatus::Duplicate));
    let r = adapter.deliver_message(&args("222", "update:2"))?;
    assert_eq!(r.status, DeliverStatus::Held);
    let held_id = r.held.unwrap_or_default();
    let r = adapter.deliver_message(&args("333", "update:3"))?;
    assert_eq!(r.status, DeliverStatus::Held);
    let (messages, _) = gw.inbound(0, 0)?;
    assert_eq!(
        (
            messages[0].id.as_str(),
            messages[0].conversation.as_str(),
            messages[0].reply_to.as_str()
        ),
        ("update:1", "-100", "-100")
    );
    // The operator (through the gateway) admits one, drops the other.
    let (held, omitted) = gw.held()?;
    assert_eq!((held.len(), omitted), (2, 0));
    assert_eq!(gw.admit(&held_id, true, Some("tok"))?, 2);
    gw.drop_held(&held[1].id, Some("tok"))?;
    assert!(gw.held()?.0.is_empty());
    let e = gw.admit(&held_id, false, None).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::NotFound));
    // The adapter may not do the operator's part, nor the gateway the adapter's.
    assert_eq!(
        adapter.held().err().and_then(|e| e.code()),
        Some(ErrorCode::Denied)
    );
    assert_eq!(
        gw.outbox("telegram", 0).err().and_then(|e| e.code()),
        Some(ErrorCode::Denied)
    );
    // Out: queued once per key; taken, failed and retried, then confirmed.
    let r = gw.send_with("telegram", "111", "answer", Some("update:1"), Some("k1"))?;
    assert_eq!(r.status, SendStatus::Queued);
    let outbox_id = r.outbox_id.unwrap_or_default();
    assert_eq!(
        gw.send_with("telegram", "111", "answer", None, Some("k1"))?
            .status,
        SendStatus::Duplicate
    );
    let m = adapter.outbox("telegram", 0)?;
    assert_eq!(
        (m[0].id.as_str(), m[0].in_reply_to.as_deref(), m[0].attempt),
        (outbox_id.as_str(), Some("update:1"), 1)
    );
    let failed = SendOutcome::Failed {
        error: "HTTP 503".into(),
        retry: true,
    };
    let r = adapter.outbox_ack("telegram", &outbox_id, failed)?;
    assert_eq!((r.status, r.retry_in_ms), (AckStatus::Retrying, Some(1000)));
    adapter.channel_state("telegram", false, Some("HTTP 503"))?;

    // A new broker on the same state directory: the retry is still there, and so is the rest.
    drop((gw, adapter));
    rt.shutdown_timeout(Duration::from_secs(1));
    let (rt, mut gw, mut adapter) = start(dir)?;
    let (messages, _) = gw.inbound(0, 0)?;
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    let r = adapter.deliver_message(&args("222", "update:4"))?;
    assert_eq!(r.status, DeliverStatus::Queued, "admitted for good");
    let m = adapter.outbox("telegram", 5000)?;
    assert_eq!((m.len(), m[0].attempt), (1, 2));
    let r = adapter.outbox_ack(
        "telegram",
        &outbox_id,
        SendOutcome::Sent {
            service_id: Some("77".into()),
        },
    )?;
    assert_eq!(r.status, AckStatus::Done);
    assert!(adapter.outbox("telegram", 0)?.is_empty());
    let log = std::fs::read_to_string(dir.join("audit.log"))?;
    assert!(
        !log.contains("from 111") && !log.contains("answer"),
        "{log}"
    );
    let report = carapace_broker::audit::verify(dir.join("audit.log"))?;
    assert!(report.is_ok(), "{report}");
    drop((gw, adapter));
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
