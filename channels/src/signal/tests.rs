//! Unit tests of `signal`: the wire format both ways, and the loops against a scripted daemon
//! on the other end of a socket pair.

use std::time::Instant;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::broker::fake::FakeBroker;
use crate::broker::Inbound;

const WAIT: Duration = Duration::from_secs(20);

fn received(line: &str) -> Received {
    match wire::parse_line(line.as_bytes()) {
        Ok(Frame::Received(r)) => r,
        other => panic!("{other:?}: {line}"),
    }
}

fn note(env: Value) -> String {
    json!({"jsonrpc":"2.0","method":"receive","params":{"envelope": env, "account":"+15550000000"}})
        .to_string()
}

#[test]
fn private_and_group_messages_as_the_man_page_shows_them() {
    let r = received(
        r#"{"jsonrpc":"2.0","method":"receive","params":{"envelope":{"source":"+33123456789","sourceNumber":"+33123456789","sourceUuid":"uuid-1","sourceName":"name","sourceDevice":1,"timestamp":1631458508784,"dataMessage":{"timestamp":1631458508784,"message":"foobar","expiresInSeconds":0,"viewOnce":false,"mentions":[],"attachments":[],"contacts":[]}}}}"#,
    );
    assert_eq!(
        r,
        Received::Message(Inbound {
            id: "signal:uuid-1:1631458508784".into(),
            sender: "+33123456789".into(),
            conversation: "+33123456789".into(),
            reply_to: "+33123456789".into(),
            text: "foobar".into(),
        })
    );
    let g = received(&note(
        json!({"sourceNumber":null,"sourceUuid":"a1b2","timestamp":5,
        "dataMessage":{"timestamp":5,"message":"hi all","groupInfo":{"groupId":"Pmpi+EfPWmsx=","type":"DELIVER"}}}),
    ));
    let Received::Message(g) = g else {
        panic!("{g:?}")
    };
    // No number shared: the uuid is the sender.
    assert_eq!(
        (g.sender.as_str(), g.conversation.as_str(), g.id.as_str()),
        ("a1b2", "group:Pmpi+EfPWmsx=", "signal:a1b2:5")
    );
    // The subscription form (manual receive mode) carries the same envelope.
    let s = received(
        r#"{"jsonrpc":"2.0","method":"receive","params":{"subscription":0,"result":{"envelope":{"sourceNumber":"+4411","sourceUuid":"u","timestamp":9,"dataMessage":{"timestamp":9,"message":"x"}},"account":"+33"}}}"#,
    );
    assert!(matches!(s, Received::Message(m) if m.text == "x" && m.id == "signal:u:9"));
}

#[test]
fn what_is_not_a_text_message_is_skipped_or_noted() {
    for env in [
        json!({"sourceNumber":"+1555","sourceUuid":"u","timestamp":1,"receiptMessage":{"when":1,"isDelivery":true}}),
        json!({"sourceNumber":"+1555","sourceUuid":"u","timestamp":1,"typingMessage":{"action":"STARTED"}}),
        json!({"sourceNumber":"+1555","sourceUuid":"u","timestamp":1,"syncMessage":{"sentMessage":{"message":"mine"}}}),
        json!({"sourceNumber":"+1555","sourceUuid":"u","timestamp":1,"dataMessage":{"timestamp":1,"reaction":{"emoji":"x"}}}),
        json!({"timestamp":1,"dataMessage":{"timestamp":1,"message":"nobody"}}),
    ] {
        assert!(
            matches!(received(&note(env.clone())), Received::Skip(_)),
            "{env}"
        );
    }
    let a = received(&note(
        json!({"sourceNumber":"+1555","sourceUuid":"u","timestamp":2,
        "dataMessage":{"timestamp":2,"message":null,"attachments":[{"contentType":"image/png"}]}}),
    ));
    assert!(matches!(a, Received::Message(m) if m.text.contains("attachment")));
}

#[test]
fn malformed_lines_are_errors_not_panics() {
    for bad in [
        "",
        "not json",
        "[]",
        r#"{"method":"receive"}"#,
        r#"{"jsonrpc":"2.0","method":"receive"}"#,
        r#"{"jsonrpc":"2.0","method":"receive","params":{"envelope":{"sourceNumber":"+1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"receive","params":{"envelope":{"sourceUuid":"u","timestamp":1,"dataMessage":{"message":"x","groupInfo":{"groupId":"bad id!"}}}}}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","error":{"message":"no code"},"id":1}"#,
        r#"{"jsonrpc":"2.0","method":7}"#,
    ] {
        assert!(wire::parse_line(bad.as_bytes()).is_err(), "{bad}");
    }
}

#[test]
fn responses_and_errors() {
    assert_eq!(
        wire::parse_line(br#"{"jsonrpc":"2.0","result":{"timestamp":999},"id":4}"#),
        Ok(Frame::Response {
            id: 4,
            outcome: Ok(json!({"timestamp": 999}))
        })
    );
    let Ok(Frame::Response { outcome: Err(e), .. }) = wire::parse_line(
        br#"{"jsonrpc":"2.0","error":{"code":-1,"message":"The user +1 is not registered.","data":null},"id":5}"#,
    ) else {
        panic!("not an error")
    };
    assert_eq!(wire::rpc_failure("send", &e).kind, FailureKind::Rejected);
    // signal-cli's answer to a request it could not read names no id.
    assert!(matches!(
        wire::parse_line(br#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"method field must be set","data":null},"id":null}"#),
        Ok(Frame::Other(_))
    ));
    let rate = RpcError {
        code: wire::RATE_LIMIT_ERROR,
        message: "rate limited".into(),
        data: json!({"response":{"timestamp":1,"results":[{"type":"RATE_LIMIT_FAILURE","retryAfterSeconds":7}]}}),
    };
    let f = wire::rpc_failure("send", &rate);
    assert_eq!(
        (f.kind, f.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(7)))
    );
    let io = RpcError {
        code: wire::IO_ERROR,
        message: "network".into(),
        data: Value::Null,
    };
    assert_eq!(
        wire::rpc_failure("send", &io).kind,
        FailureKind::Unreachable
    );
}

#[test]
fn send_results() {
    let ok = json!({"timestamp": 42, "results":[{"recipientAddress":{"uuid":"u","number":"+1555"},"type":"SUCCESS"}]});
    assert_eq!(wire::send_outcome(&ok), Ok((42, vec![])));
    // The man page's short form.
    assert_eq!(
        wire::send_outcome(&json!({"timestamp": 999})),
        Ok((999, vec![]))
    );
    let limited = json!({"timestamp": 1, "results":[{"recipientAddress":{"uuid":"u","number":"+1555"},"type":"RATE_LIMIT_FAILURE","retryAfterSeconds":3}]});
    let e = wire::send_outcome(&limited)
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(3)))
    );
    let unreg = json!({"timestamp": 1, "results":[{"recipientAddress":{"number":"+1555"},"type":"UNREGISTERED_FAILURE"}]});
    assert_eq!(
        wire::send_outcome(&unreg).map_err(|e| e.kind),
        Err(FailureKind::Rejected)
    );
    let net = json!({"timestamp": 1, "results":[{"recipientAddress":{"number":"+1555"},"type":"NETWORK_FAILURE"}]});
    assert_eq!(
        wire::send_outcome(&net).map_err(|e| e.kind),
        Err(FailureKind::Unreachable)
    );
    // A group send that reached one member is sent: again would double it for them.
    let partial = json!({"timestamp": 8, "results":[
        {"recipientAddress":{"number":"+1"},"groupId":"g","type":"SUCCESS"},
        {"recipientAddress":{"number":"+2"},"groupId":"g","type":"IDENTITY_FAILURE"}]});
    let (ts, failed) = wire::send_outcome(&partial).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ts, 8);
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].starts_with("+2: ") && failed[0].contains("IDENTITY_FAILURE"),
        "{failed:?}"
    );
    assert!(wire::send_outcome(&json!({"results": []})).is_err());
}

#[test]
fn requests_and_recipients() {
    let r = wire::request(3, "send", Some(wire::send_params("+1555", "hi")));
    let v: Value = serde_json::from_slice(&r).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        v,
        json!({"jsonrpc":"2.0","method":"send","id":3,"params":{"recipient":["+1555"],"message":"hi"}})
    );
    assert_eq!(r.last(), Some(&b'\n'));
    assert_eq!(
        wire::send_params("group:abc=", "x"),
        json!({"groupId":"abc=","message":"x"})
    );
    assert!(wire::valid_recipient("+1555"));
    assert!(wire::valid_recipient("group:Pmpi+EfP/Wms="));
    for bad in ["", "group:", "group:a b", "a\nb"] {
        assert!(!wire::valid_recipient(bad), "{bad:?}");
    }
}

#[test]
fn a_torn_line_gives_up_its_last_frame() {
    let glued = br#"{"jsonrpc":"2.0","method":"rec{"jsonrpc":"2.0","result":{},"id":1}"#;
    assert!(matches!(
        wire::salvage(glued),
        Some(Frame::Response { id: 1, .. })
    ));
    assert_eq!(
        wire::salvage(br#"{"jsonrpc":"2.0","result":{},"id":1}"#),
        None
    );
    assert_eq!(wire::salvage(b"garbage {\"x\": 1}"), None);
}

/// The daemon's end of the pair, scripted by the test.
struct Daemon {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Daemon {
    async fn say(&mut self, line: &str) {
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn request(&mut self) -> Value {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.read.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no request"))
            .unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

fn pair(timeout: Duration) -> (Arc<Rpc>, Sender, Daemon) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let (rpc, sender) = adapter(
        stream_of(OwnedFd::from(a)).unwrap_or_else(|e| panic!("{e}")),
        timeout,
    );
    let b = stream_of(OwnedFd::from(b)).unwrap_or_else(|e| panic!("{e}"));
    let (r, w) = b.into_split();
    (
        rpc,
        sender,
        Daemon {
            read: BufReader::new(r),
            write: w,
        },
    )
}

fn outbound(id: &str, recipient: &str, body: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        recipient: recipient.into(),
        body: body.into(),
        in_reply_to: None,
        attempt: 1,
        buttons: Vec::new(),
    }
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_delivers_once_and_survives_garbage_and_the_sender_is_answered() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let broker = Arc::new(FakeBroker::default());
    let ctx = Arc::new(Ctx::new(
        "sig".into(),
        dir.path().to_path_buf(),
        broker.clone(),
    ));
    let (rpc, sender, mut d) = pair(Duration::from_secs(5));
    let store = CursorStore::new(dir.path(), "signal");
    let reader = {
        let (ctx, rpc, store) = (ctx.clone(), rpc.clone(), store.clone());
        tokio::spawn(async move { run_reader(&ctx, &rpc, &store).await })
    };
    let hello = note(
        json!({"sourceNumber":"+1555","sourceUuid":"u1","timestamp":10,"dataMessage":{"timestamp":10,"message":"hello"}}),
    );
    d.say("this is not json").await;
    d.say(&hello).await;
    // The same message handed over again (a daemon restarted before it was acknowledged).
    d.say(&hello).await;
    d.say(&note(json!({"sourceNumber":"+1555","sourceUuid":"u1","timestamp":11,"dataMessage":{"timestamp":11,"message":"second"}}))).await;
    wait_until(|| broker.st().delivered.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let texts: Vec<String> = broker
        .st()
        .delivered
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, ["hello", "second"]);
    let saved: Cursor = store
        .load()
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    assert_eq!(saved.recent, ["signal:u1:10", "signal:u1:11"]);

    // A send is answered through the reader.
    let send = tokio::spawn(async move {
        let r = sender.send(&outbound("o1", "group:abc=", "answer")).await;
        (sender, r)
    });
    let req = d.request().await;
    assert_eq!(req["method"], "send");
    assert_eq!(req["params"], json!({"groupId":"abc=","message":"answer"}));
    d.say(
        &json!({"jsonrpc":"2.0","result":{"timestamp":77,"results":[]},"id":req["id"]}).to_string(),
    )
    .await;
    let (sender, r) = send.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r, Ok(Some("77".into())));

    // A rate limit is a wait of what the daemon says.
    let send = tokio::spawn(async move { sender.send(&outbound("o2", "+1555", "again")).await });
    let req = d.request().await;
    d.say(&json!({"jsonrpc":"2.0","error":{"code":-5,"message":"Rate limit","data":{"response":{"timestamp":1,"results":[{"type":"RATE_LIMIT_FAILURE","retryAfterSeconds":4}]}}},"id":req["id"]}).to_string()).await;
    let e = send
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(4)))
    );
    assert!(!reader.is_finished());

    // A daemon that does not answer: a timeout, not a hang.
    let (rpc2, sender2, _d2) = pair(Duration::from_millis(300));
    let e = sender2
        .send(&outbound("o3", "+1555", "x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(e.kind, FailureKind::Unreachable);
    assert!(lock(&rpc2.pending).is_empty());
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_is_taken_alone_and_what_follows_stays_in_the_socket() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let a = stream_of(OwnedFd::from(a)).unwrap_or_else(|e| panic!("{e}"));
    let mut b = stream_of(OwnedFd::from(b)).unwrap_or_else(|e| panic!("{e}"));
    b.write_all(b"one\ntwo\nthr")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_line(&a).await.ok().flatten(), Some(b"one".to_vec()));
    // "two" was not read: a successor would find it.
    let mut rest = [0u8; 16];
    let n = rustix::net::recv(&a, &mut rest, rustix::net::RecvFlags::PEEK)
        .map(|(n, _)| n)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&rest[..n], b"two\nthr");
    assert_eq!(read_line(&a).await.ok().flatten(), Some(b"two".to_vec()));
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.write_all(b"ee\n").await.unwrap_or_else(|e| panic!("{e}"));
        b
    });
    assert_eq!(read_line(&a).await.ok().flatten(), Some(b"three".to_vec()));
    drop(late.await);
    assert_eq!(read_line(&a).await.ok().flatten(), None);
}

#[test]
fn a_torn_notification_glued_to_an_answer() {
    let glued = br#"{"jsonrpc":"2.0","method":"receive","params":{"envel{"jsonrpc":"2.0","result":{"version":"0.13.0-fake"},"id":5}"#;
    assert!(wire::parse_line(glued).is_err());
    assert!(matches!(
        wire::salvage(glued),
        Some(Frame::Response { id: 5, .. })
    ));
    // Keys in another order (JSON does not fix one).
    let glued = br#"{"jsonrpc":"2.0","method":"rec{"id":3,"jsonrpc":"2.0","result":{}}"#;
    assert!(matches!(
        wire::salvage(glued),
        Some(Frame::Response { id: 3, .. })
    ));
}
