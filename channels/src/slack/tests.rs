//! Unit tests of `slack`: the parsers both ways, and the adapter's loops against the fake
//! Slack of the tests crate.

use std::time::Duration;

use carapace_broker::protocol::{ErrorCode, SendOutcome};
use carapace_tests::fake_slack::{FakeSlack, Injected};

use super::*;
use crate::broker::fake::FakeBroker;

const APP: &str = "xapp-1-A0FAKEAPP01-1234567890-abcdef0123456789";
const BOT: &str = "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx";
const WAIT: Duration = Duration::from_secs(20);

fn envelope(event: Value) -> Vec<u8> {
    json!({
        "envelope_id": "57d6a792-4d35-4d0b-b6aa-3361493e1caf",
        "payload": {"token": "XXYYZZ", "team_id": "T1", "api_app_id": "A1", "event": event,
                    "type": "event_callback", "event_id": "Ev1", "event_time": 1},
        "type": "events_api", "accepts_response_payload": false, "retry_attempt": 0, "retry_reason": ""
    })
    .to_string()
    .into_bytes()
}

fn message(event: Value) -> Result<Inbound, String> {
    match parse_frame(&envelope(event)) {
        Ok(Frame::Envelope { message, .. }) => message,
        other => panic!("{other:?}"),
    }
}

#[test]
fn channel_thread_and_direct_messages() {
    let m = message(
        json!({"type": "message", "user": "U0ALICE", "channel": "C0GEN",
        "ts": "1700000000.000100", "text": "hi &lt;b&gt; &amp;amp;", "channel_type": "channel"}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        m,
        Inbound {
            id: "msg:C0GEN:1700000000.000100".into(),
            sender: "U0ALICE".into(),
            conversation: "C0GEN:1700000000.000100".into(),
            reply_to: "C0GEN:1700000000.000100".into(),
            text: "hi <b> &amp;".into(),
        }
    );
    // In a thread: the thread is the conversation.
    let m = message(
        json!({"type": "message", "user": "W0BOB", "channel": "G0PRIV",
        "ts": "1700000000.000200", "thread_ts": "1700000000.000100", "text": "more"}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.conversation, "G0PRIV:1700000000.000100");
    assert_eq!(m.sender, "W0BOB");
    // A direct message outside a thread: the DM is the conversation.
    let m = message(
        json!({"type": "message", "user": "U0ALICE", "channel": "D0DM",
        "ts": "1.2", "text": "dm", "channel_type": "im"}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (m.conversation.as_str(), m.reply_to.as_str()),
        ("D0DM", "D0DM")
    );
    // Files: a note, and the text.
    let m = message(json!({"type": "message", "subtype": "file_share", "user": "U0ALICE",
        "channel": "D0DM", "ts": "1.3", "text": "see", "files": [{"id": "F1"}], "channel_type": "im"}))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.text, "[slack: 1 file(s); only text is delivered] see");
}

#[test]
fn bots_edits_joins_and_other_events_are_skipped() {
    let base =
        json!({"type": "message", "user": "U0ALICE", "channel": "C0GEN", "ts": "1.1", "text": "x"});
    let with = |k: &str, v: Value| {
        let mut e = base.clone();
        e[k] = v;
        e
    };
    for (event, why) in [
        (with("bot_id", json!("B0BOT")), "bot"),
        (with("subtype", json!("message_changed")), "message_changed"),
        (with("subtype", json!("channel_join")), "channel_join"),
        (with("type", json!("app_mention")), "app_mention"),
        (with("user", json!("alice")), "user"),
        (with("channel", json!("C0:1")), "channel"),
        (with("ts", json!("now")), "ts"),
        (with("thread_ts", json!(5)), "thread_ts"),
        (with("text", json!("  ")), "text"),
    ] {
        let e = message(event).expect_err(why);
        assert!(e.contains(why) || !e.is_empty(), "{why}: {e}");
    }
    // The same message without any of that is delivered.
    assert!(message(base).is_ok());
}

#[test]
fn hello_disconnect_other_envelopes_and_malformed_frames() {
    assert_eq!(
        parse_frame(br#"{"type":"hello","num_connections":1,"debug_info":{"host":"applink-1"},"connection_info":{"app_id":"A1"}}"#),
        Ok(Frame::Hello)
    );
    assert_eq!(
        parse_frame(
            br#"{"type":"disconnect","reason":"refresh_requested","debug_info":{"host":"h"}}"#
        ),
        Ok(Frame::Disconnect {
            reason: "refresh_requested".into()
        })
    );
    match parse_frame(
        br#"{"envelope_id":"e1","type":"slash_commands","payload":{},"retry_attempt":2}"#,
    ) {
        Ok(Frame::Envelope {
            envelope_id,
            kind,
            retry_attempt,
            message,
        }) => {
            assert_eq!(
                (envelope_id.as_str(), kind.as_str(), retry_attempt),
                ("e1", "slash_commands", 2)
            );
            assert!(message.is_err());
        }
        other => panic!("{other:?}"),
    }
    for bad in [
        &b"not json"[..],
        b"[]",
        b"{}",
        br#"{"type":"events_api"}"#,
        br#"{"type":"events_api","envelope_id":""}"#,
        br#"{"type":7}"#,
    ] {
        assert!(
            parse_frame(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // An envelope without a payload is acknowledged (it has an id) but delivers nothing.
    match parse_frame(br#"{"type":"events_api","envelope_id":"e2"}"#) {
        Ok(Frame::Envelope {
            message: Err(_), ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(ack_frame("e\"1"), r#"{"envelope_id":"e\"1"}"#);
}

#[test]
fn web_api_answers_map_to_retry_or_not() {
    let ok = api_result(200, None, br#"{"ok":true,"channel":"C1","ts":"1.2"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok["ts"], "1.2");
    let e = api_result(429, Some(7), br#"{"ok":false,"error":"ratelimited"}"#).unwrap_err();
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(7)))
    );
    let e = api_result(429, None, b"").unwrap_err();
    assert_eq!(e.kind, FailureKind::Throttled);
    assert!(e.retry_after.is_some());
    for (status, body, kind) in [
        (
            200,
            &br#"{"ok":false,"error":"channel_not_found"}"#[..],
            FailureKind::Rejected,
        ),
        (
            200,
            br#"{"ok":false,"error":"invalid_auth"}"#,
            FailureKind::Rejected,
        ),
        (
            200,
            br#"{"ok":false,"error":"internal_error"}"#,
            FailureKind::Unreachable,
        ),
        (
            503,
            br#"{"ok":false,"error":"service_unavailable"}"#,
            FailureKind::Unreachable,
        ),
        (200, b"<html>", FailureKind::Unreachable),
        (502, b"bad gateway", FailureKind::Unreachable),
        (404, b"nope", FailureKind::Rejected),
        (200, br#"{"ok":true}"#, FailureKind::Unreachable),
    ] {
        match api_result(status, None, body) {
            Err(e) => assert_eq!(e.kind, kind, "{status} {}", String::from_utf8_lossy(body)),
            // `{"ok":true}` with 200 is a success; only the case above with it differs.
            Ok(_) => assert_eq!(body, br#"{"ok":true}"#),
        }
    }
}

#[test]
fn recipients_socket_urls_entities_and_tokens() {
    assert_eq!(parse_recipient("C0GEN"), Some(("C0GEN", None)));
    assert_eq!(parse_recipient("C0GEN:1.2"), Some(("C0GEN", Some("1.2"))));
    assert_eq!(parse_recipient("U0ALICE"), Some(("U0ALICE", None)));
    for bad in [
        "",
        "c0gen",
        "C0GEN:",
        "C0GEN:x",
        "C0GEN:1.2:3",
        ":1.2",
        "C 1",
    ] {
        assert_eq!(parse_recipient(bad), None, "{bad}");
    }
    let u = SocketUrl::parse("wss://wss-primary.slack.com/link/?ticket=abc&app_id=A1")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (u.host(), u.port(), u.tls()),
        ("wss-primary.slack.com", 443, true)
    );
    assert!(!format!("{u:?}").contains("ticket"));
    let u =
        SocketUrl::parse("ws://127.0.0.1:9000/link/?ticket=t").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((u.port(), u.tls()), (9000, false));
    for bad in [
        "ws://wss-primary.slack.com/link/",
        "https://slack.com/",
        "wss://u:p@h/",
        "wss://h:0/",
        "wss:///x",
        "wss://h/a b",
    ] {
        assert!(SocketUrl::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(encode_entities("a<b>&c"), "a&lt;b&gt;&amp;c");
    assert_eq!(decode_entities("a&lt;b&gt;&amp;c &amp;lt;"), "a<b>&c &lt;");
    assert!(Token::app("a", APP.as_bytes()).is_ok());
    assert!(Token::bot("b", format!("{BOT}\n").as_bytes()).is_ok());
    assert!(Token::app("a", BOT.as_bytes()).is_err());
    assert!(Token::bot("b", APP.as_bytes()).is_err());
    assert!(Token::bot("b", b"xoxb-").is_err());
    assert!(Token::bot("b", b"xoxb-12345678 90").is_err());
    let t = Token::bot("b", BOT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(format!("{t:?}"), "Token(..)");
    assert!(
        is_user_id("U0ALICE") && is_user_id("W123") && !is_user_id("C0GEN") && !is_user_id("U")
    );
}

struct Run {
    fake: FakeSlack,
    broker: Arc<FakeBroker>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
    _dir: tempfile::TempDir,
}

fn start(fake: FakeSlack) -> Run {
    let broker = FakeBroker::with_secret("app", APP.as_bytes());
    broker
        .st()
        .secrets
        .push(("bot".into(), BOT.as_bytes().to_vec()));
    let broker = Arc::new(broker);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ctx = Arc::new(Ctx::new(
        "sl".into(),
        dir.path().to_path_buf(),
        broker.clone(),
    ));
    let settings = SlackSettings {
        api_base: fake.api_base(),
        app_token_secret: "app".into(),
        bot_token_secret: "bot".into(),
    };
    let task = tokio::spawn(run(ctx, settings));
    Run {
        fake,
        broker,
        task,
        _dir: dir,
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_are_acknowledged_only_after_the_broker_took_them() {
    let r = start(FakeSlack::start(APP, BOT));
    // The broker is busy twice: the envelope stays unacknowledged meanwhile.
    r.broker
        .st()
        .deliver_script
        .extend([Err(ErrorCode::Busy), Err(ErrorCode::Unavailable)]);
    let (env, ts) = r.fake.push_message("C0GEN", "U0ALICE", "hello", None);
    until("a refused deliver", || {
        (r.broker.st().attempts >= 1).then_some(())
    })
    .await;
    assert!(
        r.fake.acked().is_empty(),
        "acknowledged before the broker took it"
    );
    until("the delivery", || {
        (!r.broker.st().delivered.is_empty()).then_some(())
    })
    .await;
    r.fake.wait_acked(&env, WAIT);
    let got = r.broker.st().delivered[0].clone();
    assert_eq!(got.id, format!("msg:C0GEN:{ts}"));
    assert_eq!(got.conversation, format!("C0GEN:{ts}"));
    assert!(
        r.broker.st().states.iter().any(|(c, _)| *c),
        "reported connected"
    );
    // The app-level token opened the socket, in the header only.
    let open = r
        .fake
        .calls()
        .into_iter()
        .find(|c| c.method == "apps.connections.open");
    assert_eq!(
        open.and_then(|c| c.authorization),
        Some(format!("Bearer {APP}"))
    );
    // A bot message and an edit are acknowledged and not delivered.
    let bot = r.fake.push_event(json!({"type": "message", "subtype": "bot_message", "bot_id": "B1", "text": "x", "channel": "C0GEN", "ts": "1.5"}));
    let edit = r.fake.push_event(json!({"type": "message", "subtype": "message_changed", "channel": "C0GEN", "ts": "1.6", "message": {}}));
    r.fake.wait_acked(&bot, WAIT);
    r.fake.wait_acked(&edit, WAIT);
    assert_eq!(r.broker.st().delivered.len(), 1);
    // The reply goes into the thread with the bot token, escaped.
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", &got.reply_to, "a <b> & c"));
    let posted = r.fake.wait_posted(1, WAIT);
    assert_eq!(posted[0]["channel"], "C0GEN");
    assert_eq!(posted[0]["thread_ts"], ts.as_str());
    assert_eq!(posted[0]["text"], "a &lt;b&gt; &amp; c");
    let ack = until("the outbox ack", || r.broker.st().acks.first().cloned()).await;
    assert!(
        matches!(&ack, (id, SendOutcome::Sent { service_id: Some(_) }) if id == "o1"),
        "{ack:?}"
    );
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_disconnects_malformed_frames_and_rate_limits_are_survived() {
    let r = start(FakeSlack::start(APP, BOT));
    r.fake.wait("the first connection", WAIT, |s| {
        (s.connections() >= 1).then_some(())
    });
    // A malformed frame: logged, the connection goes on.
    r.fake.send_raw("{not json");
    r.fake.send_raw(r#"{"type":"events_api","payload":{}}"#);
    let (e1, _) = r.fake.push_message("D0DM", "U0ALICE", "one", None);
    r.fake.wait_acked(&e1, WAIT);
    assert_eq!(r.fake.connections(), 1);
    // Cut right after an envelope, before its ack: sent again on the next connection, and
    // delivered once (the broker drops the repeat).
    r.fake.drop_after_next_envelope();
    let (e2, ts2) = r.fake.push_message("D0DM", "U0ALICE", "two", None);
    r.fake.wait_acked(&e2, WAIT);
    assert!(r.fake.connections() >= 2);
    let ids: Vec<String> = r
        .broker
        .st()
        .delivered
        .iter()
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(
        ids.iter()
            .filter(|i| **i == format!("msg:D0DM:{ts2}"))
            .count(),
        1,
        "{ids:?}"
    );
    // refresh_requested: a new connection at once, with a fresh ticket.
    let before = r.fake.connections();
    r.fake.disconnect("refresh_requested");
    r.fake.wait("a new connection", WAIT, |s| {
        (s.connections() > before).then_some(())
    });
    assert_eq!(r.fake.refused(), 0, "every ticket was used once");
    // Any other reason: a new connection after the backoff, not at once.
    let before = r.fake.connections();
    let t0 = std::time::Instant::now();
    r.fake.disconnect("too_many_websockets");
    r.fake.wait("a connection after the backoff", WAIT, |s| {
        (s.connections() > before).then_some(())
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // A rate-limited open: the adapter waits what Retry-After said, then connects.
    r.fake
        .inject("apps.connections.open", Injected::RateLimited(1));
    let before = r.fake.connections();
    let t0 = std::time::Instant::now();
    r.fake.disconnect("warning");
    r.fake.wait("a connection after the 429", WAIT, |s| {
        (s.connections() > before).then_some(())
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // A rate-limited post: failed with retry and the wait; then sent once.
    r.fake.inject("chat.postMessage", Injected::RateLimited(2));
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", "D0DM", "answer"));
    let ack = until("the throttled ack", || r.broker.st().acks.first().cloned()).await;
    assert!(
        matches!(&ack, (_, SendOutcome::Failed { retry: true, error }) if error.contains("ratelimited")),
        "{ack:?}"
    );
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", "D0DM", "answer"));
    let posted = r.fake.wait_posted(1, WAIT);
    assert_eq!(posted[0]["channel"], "D0DM");
    assert!(posted[0].get("thread_ts").is_none());
    // A refusal for good is not retried.
    r.fake.inject(
        "chat.postMessage",
        Injected::Error("channel_not_found".into()),
    );
    r.broker
        .st()
        .outbox
        .push_back(outbound("o2", "C0GONE", "x"));
    let ack = until("the rejected ack", || {
        r.broker.st().acks.iter().find(|a| a.0 == "o2").cloned()
    })
    .await;
    assert!(
        matches!(ack.1, SendOutcome::Failed { retry: false, .. }),
        "{ack:?}"
    );
    // A recipient that is not Slack's is refused without a call.
    let calls = r.fake.calls().len();
    r.broker
        .st()
        .outbox
        .push_back(outbound("o3", "not a channel", "x"));
    let ack = until("the bad recipient ack", || {
        r.broker.st().acks.iter().find(|a| a.0 == "o3").cloned()
    })
    .await;
    assert!(
        matches!(ack.1, SendOutcome::Failed { retry: false, .. }),
        "{ack:?}"
    );
    assert_eq!(r.fake.calls().len(), calls);
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_replies_are_split_and_resume_at_the_failed_piece() {
    let r = start(FakeSlack::start(APP, BOT));
    let long = format!("{}\n{}", "a".repeat(3990), "b".repeat(100));
    r.fake.inject(
        "chat.postMessage",
        Injected::Raw {
            status: 200,
            body: r#"{"ok":true,"channel":"C1","ts":"1.1"}"#.into(),
        },
    );
    r.fake
        .inject("chat.postMessage", Injected::Error("internal_error".into()));
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", "C1:1.0", &long));
    let ack = until("the failed ack", || r.broker.st().acks.first().cloned()).await;
    assert!(
        matches!(&ack.1, SendOutcome::Failed { retry: true, error } if error.contains("piece 2 of 2")),
        "{ack:?}"
    );
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", "C1:1.0", &long));
    let posted = r.fake.wait_posted(1, WAIT);
    // Only the second piece went out again (the first was answered by the injected reply).
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["text"], "b".repeat(100));
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_clear_error_and_the_loop_keeps_trying() {
    let fake = FakeSlack::start("xapp-1-other-token-000000000", BOT);
    let r = start(fake);
    let state = until("a reported error", || {
        r.broker.st().states.iter().find(|(c, _)| !*c).cloned()
    })
    .await;
    let why = state.1.unwrap_or_default();
    assert!(why.contains("invalid_auth"), "{why}");
    assert!(!why.contains(APP), "{why}");
    assert!(!r.task.is_finished());
    r.task.abort();
}
