//! Unit tests of `matrix`: the parsers, and the poller and sender against a scripted loopback
//! homeserver.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex as StdMutex;

use carapace_broker::protocol::OutboundMessage;

use super::*;
use crate::broker::fake::FakeBroker;

const ME: &str = "@bot:example.org";

fn sync(body: &str) -> Batch {
    parse_sync(200, body.as_bytes(), ME).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn text_event(id: &str, sender: &str, body: &str) -> Value {
    json!({"type": "m.room.message", "event_id": id, "sender": sender,
           "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": body}})
}

fn sync_body(next: &str, room: &str, events: Vec<Value>) -> String {
    json!({"next_batch": next, "rooms": {"join": {room: {"timeline": {"events": events, "limited": false}}}}})
        .to_string()
}

#[test]
fn text_messages_are_delivered_with_mxid_room_and_event_id() {
    let b = sync(&sync_body(
        "s2",
        "!room:example.org",
        vec![
            text_event("$e1", "@alice:example.org", "hello"),
            json!({"type": "m.room.message", "event_id": "$e2", "sender": "@alice:example.org",
                   "content": {"msgtype": "m.emote", "body": "waves"}}),
            json!({"type": "m.room.message", "event_id": "$e3", "sender": "@alice:example.org",
                   "content": {"msgtype": "m.image", "body": "cat.png", "url": "mxc://x/y"}}),
        ],
    ));
    assert_eq!(b.next_batch, "s2");
    assert_eq!(
        b.items[0],
        Item::Message(Inbound {
            id: "$e1".into(),
            sender: "@alice:example.org".into(),
            conversation: "!room:example.org".into(),
            reply_to: "!room:example.org".into(),
            text: "hello".into(),
        })
    );
    let texts: Vec<_> = b
        .items
        .iter()
        .map(|i| match i {
            Item::Message(m) => m.text.clone(),
            Item::Skip(w) => panic!("skipped: {w}"),
        })
        .collect();
    assert_eq!(
        texts,
        [
            "hello",
            "* @alice:example.org waves",
            "[matrix: m.image; only text is delivered] cat.png"
        ]
    );
}

#[test]
fn own_notices_edits_encrypted_and_broken_events_are_skipped() {
    let b = sync(&sync_body(
        "s3",
        "!room:example.org",
        vec![
            text_event("$own", ME, "my answer"),
            json!({"type": "m.room.message", "event_id": "$n", "sender": "@other-bot:example.org",
                   "content": {"msgtype": "m.notice", "body": "beep"}}),
            json!({"type": "m.room.message", "event_id": "$ed", "sender": "@alice:example.org",
                   "content": {"msgtype": "m.text", "body": "* fixed",
                               "m.relates_to": {"rel_type": "m.replace", "event_id": "$e1"}}}),
            json!({"type": "m.room.encrypted", "event_id": "$enc", "sender": "@alice:example.org",
                   "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "xx"}}),
            json!({"type": "m.room.message", "event_id": "$red", "sender": "@alice:example.org",
                   "content": {}}),
            json!({"type": "m.room.message", "event_id": "no-sigil", "sender": "@alice:example.org",
                   "content": {"msgtype": "m.text", "body": "x"}}),
            json!({"type": "m.room.message", "event_id": "$x", "sender": "alice",
                   "content": {"msgtype": "m.text", "body": "x"}}),
            json!("not an event"),
        ],
    ));
    assert_eq!(b.items.len(), 8);
    for (i, item) in b.items.iter().enumerate() {
        assert!(matches!(item, Item::Skip(_)), "{i}: {item:?}");
    }
    let Item::Skip(why) = &b.items[3] else {
        unreachable!()
    };
    assert!(why.contains("encrypted"), "{why}");
}

#[test]
fn invites_name_their_inviter_only_for_the_bot() {
    let body = json!({"next_batch": "s4", "rooms": {"invite": {
        "!a:example.org": {"invite_state": {"events": [
            {"type": "m.room.name", "sender": "@alice:example.org", "state_key": "", "content": {"name": "A"}},
            {"type": "m.room.member", "sender": "@alice:example.org", "state_key": ME,
             "content": {"membership": "invite"}}]}},
        "!b:example.org": {"invite_state": {"events": [
            {"type": "m.room.member", "sender": "@alice:example.org", "state_key": "@someone:else",
             "content": {"membership": "invite"}}]}}
    }}});
    let b = sync(&body.to_string());
    assert_eq!(
        b.invites,
        [Invite {
            room_id: "!a:example.org".into(),
            inviter: "@alice:example.org".into()
        }]
    );
    let p = InvitePolicy::new(&["@alice:example.org".into(), "*:trusted.org".into()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.accepts("@alice:example.org"));
    assert!(p.accepts("@bob:trusted.org"));
    assert!(!p.accepts("@mallory:example.org"));
    assert!(!InvitePolicy::new(&[])
        .unwrap_or_else(|e| panic!("{e}"))
        .accepts("@alice:example.org"));
    assert!(InvitePolicy::new(&["[".into()]).is_err());
}

#[test]
fn malformed_answers_and_errors_are_classified() {
    for bad in [
        "",
        "not json",
        "[]",
        r#"{"rooms":{}}"#,
        r#"{"next_batch":""}"#,
        r#"{"next_batch":"s","rooms":[]}"#,
        r#"{"next_batch":"s","rooms":{"join":7}}"#,
        r#"{"next_batch":"s","rooms":{"join":{"!r:x":{"timeline":{"events":{}}}}}}"#,
    ] {
        let e = parse_sync(200, bad.as_bytes(), ME).expect_err(bad);
        assert_eq!(e.kind, FailureKind::Unreachable, "{bad}");
        assert!(e.message.contains("matrix"), "{}", e.message);
    }
    // An empty answer (a long poll that timed out) is fine.
    assert!(sync(r#"{"next_batch":"s9"}"#).items.is_empty());
    let e = parse_sync(
        429,
        br#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":1234}"#,
        ME,
    )
    .expect_err("429");
    assert_eq!(e.kind, FailureKind::Throttled);
    assert_eq!(e.retry_after, Some(Duration::from_millis(1234)));
    let e = api_result(
        401,
        br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid token"}"#,
    )
    .expect_err("401");
    assert_eq!(e.kind, FailureKind::Rejected);
    assert!(e.message.contains("M_UNKNOWN_TOKEN"), "{}", e.message);
    assert_eq!(
        api_result(502, b"<html>bad gateway</html>").map_err(|e| e.kind),
        Err(FailureKind::Unreachable)
    );
    assert_eq!(
        api_result(403, b"{}").map_err(|e| e.kind),
        Err(FailureKind::Rejected)
    );
}

#[test]
fn txn_ids_are_stable_per_message_and_piece_and_urls_are_encoded() {
    assert_eq!(txn_id("m-1", 0), txn_id("m-1", 0));
    assert_ne!(txn_id("m-1", 0), txn_id("m-1", 1));
    assert_ne!(txn_id("m-1", 0), txn_id("m-2", 0));
    assert!(txn_id("ä/?#", 0)
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    assert_eq!(encode("!room:example.org"), "%21room%3Aexample.org");
    assert_eq!(encode("a b/ä"), "a%20b%2F%C3%A4");
    assert!(AccessToken::new(b" syt_abc_123 \n").is_ok());
    assert!(AccessToken::new(b"two words").is_err());
    assert!(AccessToken::new(b"").is_err());
    assert!(!format!(
        "{:?}",
        AccessToken::new(b"syt_secret").unwrap_or_else(|e| panic!("{e}"))
    )
    .contains("secret"));
}

/// A loopback homeserver that answers each request with the next scripted (status, body) and
/// records (request line, body).
struct Scripted {
    base: ServiceUrl,
    seen: Arc<StdMutex<Vec<(String, String)>>>,
}

fn scripted(answers: Vec<(u16, String)>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    let seen = Arc::new(StdMutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut b = vec![0u8; len];
            let _ = r.read_exact(&mut b);
            lock(&log).push((line.trim().to_string(), String::from_utf8_lossy(&b).into()));
            let mut s = r.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Scripted {
        base: ServiceUrl::parse(&format!("http://127.0.0.1:{port}"))
            .unwrap_or_else(|e| panic!("{e}")),
        seen,
    }
}

fn halves(s: &Scripted, invites: &[&str]) -> (Poller<FakeBroker>, Sender<FakeBroker>) {
    halves_in(s, invites, Path::new("/nonexistent"))
}

fn halves_in(
    s: &Scripted,
    invites: &[&str],
    state: &Path,
) -> (Poller<FakeBroker>, Sender<FakeBroker>) {
    let api = Arc::new(Api {
        broker: Arc::new(FakeBroker::default()),
        base: s.base.clone(),
        token: AccessToken::new(b"syt_token").unwrap_or_else(|e| panic!("{e}")),
    });
    let received = Arc::new(Mutex::new(Received::default()));
    let invites: Vec<String> = invites.iter().map(|s| s.to_string()).collect();
    (
        Poller {
            api: api.clone(),
            me: ME.into(),
            timeout: Duration::from_secs(1),
            invites: InvitePolicy::new(&invites).unwrap_or_else(|e| panic!("{e}")),
            received: received.clone(),
        },
        Sender {
            api,
            received,
            direct: DirectRooms::load(state),
        },
    )
}

#[tokio::test]
async fn the_new_token_comes_only_with_the_last_message_of_a_batch() {
    let s = scripted(vec![
        (200, r#"{"next_batch":"s1","rooms":{"join":{"!r:x":{"timeline":{"events":[
            {"type":"m.room.message","event_id":"$old","sender":"@a:x","content":{"msgtype":"m.text","body":"history"}}]}}}}}"#.into()),
        (200, sync_body("s2", "!r:x", vec![text_event("$1", "@a:x", "one"), text_event("$2", "@a:x", "two")])),
        (200, r#"{"next_batch":"s3"}"#.into()),
    ]);
    let (mut p, _) = halves(&s, &[]);
    // The first sync takes the position only: no history.
    let first = p.poll(None).await.unwrap_or_else(|e| panic!("{e}"));
    let s1 = Since { since: "s1".into() };
    assert_eq!(
        first,
        vec![Polled {
            message: None,
            cursor: s1.clone()
        }]
    );
    let second = p.poll(Some(&s1)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.len(), 2);
    assert_eq!(
        second[0].message.as_ref().map(|m| m.id.as_str()),
        Some("$1")
    );
    assert_eq!(
        second[0].cursor, s1,
        "the old token until the batch is delivered"
    );
    assert_eq!(second[1].cursor, Since { since: "s2".into() });
    let third = p
        .poll(Some(&Since { since: "s2".into() }))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        third,
        vec![Polled {
            message: None,
            cursor: Since { since: "s3".into() }
        }]
    );
    let seen = lock(&s.seen).clone();
    assert!(
        seen[0].0.starts_with("GET /_matrix/client/v3/sync?filter="),
        "{seen:?}"
    );
    assert!(
        seen[0].0.contains("timeout=0") && !seen[0].0.contains("since="),
        "{seen:?}"
    );
    assert!(seen[1].0.contains("since=s1&timeout=1000"), "{seen:?}");
}

#[tokio::test]
async fn only_admitted_inviters_are_joined_and_a_failed_join_keeps_the_batch() {
    let invite = |room: &str, from: &str| {
        json!({room: {"invite_state": {"events": [{"type": "m.room.member", "sender": from,
            "state_key": ME, "content": {"membership": "invite"}}]}}})
    };
    let mut rooms = invite("!a:x", "@alice:x");
    if let (Some(o), Value::Object(m)) = (rooms.as_object_mut(), invite("!m:x", "@mallory:x")) {
        o.extend(m);
    }
    let body = json!({"next_batch": "s5", "rooms": {"invite": rooms}}).to_string();
    let s = scripted(vec![
        (200, body.clone()),
        (502, "down".into()),
        (200, body),
        (200, r#"{"room_id":"!a:x"}"#.into()),
    ]);
    let (mut p, _) = halves(&s, &["@alice:x"]);
    let c = Since { since: "s4".into() };
    let e = p.poll(Some(&c)).await.expect_err("the join failed");
    assert_eq!(e.kind, FailureKind::Unreachable);
    let ok = p.poll(Some(&c)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ok,
        vec![Polled {
            message: None,
            cursor: Since { since: "s5".into() }
        }]
    );
    let joins: Vec<_> = lock(&s.seen)
        .iter()
        .filter(|(l, _)| l.starts_with("POST"))
        .map(|(l, _)| l.clone())
        .collect();
    assert_eq!(
        joins,
        [
            "POST /_matrix/client/v3/rooms/%21a%3Ax/join HTTP/1.1",
            "POST /_matrix/client/v3/rooms/%21a%3Ax/join HTTP/1.1"
        ]
    );
}

fn outbound(id: &str, room: &str, body: &str) -> OutboundMessage {
    serde_json::from_value(json!({"id": id, "recipient": room, "body": body, "attempt": 1}))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_retry_reuses_the_transaction_ids_and_429_says_how_long_to_wait() {
    let s = scripted(vec![
        (200, r#"{"event_id":"$p0"}"#.into()),
        (
            429,
            r#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":700}"#
                .into(),
        ),
        (200, r#"{"event_id":"$p0"}"#.into()),
        (200, r#"{"event_id":"$p1"}"#.into()),
    ]);
    let (_, sender) = halves(&s, &[]);
    let long = format!(
        "{}\n{}",
        "a".repeat(MAX_MESSAGE_UTF16 - 10),
        "b".repeat(100)
    );
    let msg = outbound("o-7", "!r:x", &long);
    let e = sender.send(&msg).await.expect_err("throttled");
    assert_eq!(e.kind, FailureKind::Throttled);
    assert_eq!(e.retry_after, Some(Duration::from_millis(700)));
    assert!(e.message.contains("piece 2 of 2"), "{}", e.message);
    let id = sender.send(&msg).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(id.as_deref(), Some("$p0"));
    let lines: Vec<String> = lock(&s.seen).iter().map(|(l, _)| l.clone()).collect();
    let t0 = format!(
        "PUT /_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/{} HTTP/1.1",
        txn_id("o-7", 0)
    );
    let t1 = format!(
        "PUT /_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/{} HTTP/1.1",
        txn_id("o-7", 1)
    );
    assert_eq!(lines, [t0.clone(), t1.clone(), t0, t1]);
    // Neither a room nor a user: refused for good, nothing sent.
    let e = sender
        .send(&outbound("o-8", "alice", "hi"))
        .await
        .expect_err("not a room");
    assert_eq!(e.kind, FailureKind::Rejected);
    assert_eq!(lock(&s.seen).len(), 4);
}

#[tokio::test]
async fn a_user_recipient_gets_one_direct_room_remembered_across_restarts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = scripted(vec![
        (200, r#"{"room_id":"!dm:x"}"#.into()),
        (200, r#"{"event_id":"$a"}"#.into()),
        (200, r#"{"event_id":"$b"}"#.into()),
        (200, r#"{"event_id":"$c"}"#.into()),
    ]);
    let (_, sender) = halves_in(&s, &[], dir.path());
    for id in ["o-1", "o-2"] {
        sender
            .send(&outbound(id, "@op:x", "approve 1?"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // A new process (the same state directory) writes to the same room.
    let (_, again) = halves_in(&s, &[], dir.path());
    again
        .send(&outbound("o-3", "@op:x", "approve 2?"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = lock(&s.seen).clone();
    assert_eq!(seen[0].0, "POST /_matrix/client/v3/createRoom HTTP/1.1");
    let body: Value = serde_json::from_str(&seen[0].1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body["invite"], json!(["@op:x"]));
    assert_eq!(body["is_direct"], true);
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (line, _) in &seen[1..] {
        assert!(
            line.starts_with("PUT /_matrix/client/v3/rooms/%21dm%3Ax/send/"),
            "{line}"
        );
    }
}
