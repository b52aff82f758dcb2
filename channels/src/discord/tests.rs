//! Unit tests of `discord`: the parsers both ways, and the Gateway and REST halves against the
//! wire-exact fake (tests/src/fake_discord.rs) through the in-memory broker.

use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use carapace_tests::fake_discord::{FakeDiscord, RestInjected, BOT_ID};
use serde_json::json;

use super::gateway::{inbound_of, parse_frame, Event, Frame, Gateway, MessageCreate, Session};
use super::rest::{classify, nonce, RateHeaders, Rest};
use super::*;
use crate::adapter::{FailureKind, Outlet};
use crate::broker::fake::FakeBroker;

const TOKEN: &str = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GAbCdE.unit-test-token-AAAAAAAAAAAAAAAAAAA";
const WAIT: Duration = Duration::from_secs(20);
const ALICE: &str = "1000000000000000011";
const CHAN: &str = "1000000000000000099";

fn token() -> Arc<BotToken> {
    Arc::new(BotToken::new(TOKEN.as_bytes()).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn tokens() {
    let t = BotToken::new(format!("  Bot {TOKEN}\n").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.expose(), TOKEN);
    assert_eq!(format!("{t:?}"), "BotToken(..)");
    assert_eq!(t.scrub(&format!("x {TOKEN} y")), "x <token> y");
    for bad in [
        "",
        "short.a.b",
        "no-dots-at-all-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "two.parts-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "a..bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "sp ace.aaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbb",
    ] {
        assert!(BotToken::new(bad.as_bytes()).is_err(), "{bad}");
    }
    assert!(BotToken::new(&[0xff, 0xfe]).is_err());
}

#[test]
fn gateway_urls() {
    let u = GatewayUrl::parse("wss://gateway.discord.gg").unwrap_or_else(|e| panic!("{e}"));
    assert!(u.service().https());
    assert_eq!(
        (u.service().host(), u.service().port()),
        ("gateway.discord.gg", 443)
    );
    assert_eq!(
        u.request_url(),
        "wss://gateway.discord.gg/?v=10&encoding=json"
    );
    let u = GatewayUrl::parse("wss://gateway-us-east1-b.discord.gg/?v=10")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        u.request_url(),
        "wss://gateway-us-east1-b.discord.gg/?v=10&encoding=json"
    );
    let u = GatewayUrl::parse("ws://127.0.0.1:8080").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.request_url(), "ws://127.0.0.1:8080/?v=10&encoding=json");
    for bad in [
        "ws://gateway.discord.gg",
        "https://gateway.discord.gg",
        "gateway.discord.gg",
        "wss://u:p@h/",
    ] {
        assert!(GatewayUrl::parse(bad).is_err(), "{bad}");
    }
}

fn frame(text: &str) -> Frame {
    parse_frame(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn control_frames() {
    assert_eq!(
        frame(r#"{"op":10,"d":{"heartbeat_interval":41250},"s":null,"t":null}"#),
        Frame::Hello {
            heartbeat_interval: Duration::from_millis(41250)
        }
    );
    assert_eq!(frame(r#"{"op":11}"#), Frame::HeartbeatAck);
    assert_eq!(frame(r#"{"op":1,"d":null}"#), Frame::HeartbeatRequest);
    assert_eq!(frame(r#"{"op":7,"d":null}"#), Frame::Reconnect);
    assert_eq!(
        frame(r#"{"op":9,"d":true}"#),
        Frame::InvalidSession { resumable: true }
    );
    assert_eq!(
        frame(r#"{"op":9,"d":false}"#),
        Frame::InvalidSession { resumable: false }
    );
    assert_eq!(
        frame(r#"{"op":9}"#),
        Frame::InvalidSession { resumable: false }
    );
    assert_eq!(frame(r#"{"op":42,"d":{}}"#), Frame::Other(42));
    for bad in [
        "",
        "not json",
        "[]",
        r#"{"d":1}"#,
        r#"{"op":"10"}"#,
        r#"{"op":10,"d":{}}"#,
        r#"{"op":10,"d":{"heartbeat_interval":5}}"#,
        r#"{"op":10,"d":{"heartbeat_interval":99999999999}}"#,
        r#"{"op":0,"t":"MESSAGE_CREATE","d":{}}"#,
        r#"{"op":0,"s":3,"d":{}}"#,
        r#"{"op":0,"s":-1,"t":"X","d":{}}"#,
    ] {
        let e = parse_frame(bad)
            .err()
            .unwrap_or_else(|| panic!("accepted: {bad}"));
        assert!(e.to_string().contains("malformed frame"), "{e}");
    }
}

#[test]
fn dispatches() {
    let ready = frame(
        r#"{"op":0,"s":1,"t":"READY","d":{"v":10,"user":{"id":"42","bot":true},"guilds":[],
            "session_id":"abc","resume_gateway_url":"wss://gateway-us-east1-b.discord.gg"}}"#,
    );
    let Frame::Dispatch {
        seq: 1,
        event: Event::Ready(r),
    } = ready
    else {
        panic!("{ready:?}")
    };
    assert_eq!((r.session_id.as_str(), r.user_id.as_str()), ("abc", "42"));
    assert_eq!(r.resume_gateway_url, "wss://gateway-us-east1-b.discord.gg");
    let m = frame(&format!(
        r#"{{"op":0,"s":5,"t":"MESSAGE_CREATE","d":{{"id":"7","channel_id":"{CHAN}","guild_id":"3",
            "author":{{"id":"{ALICE}","username":"alice"}},"content":"hello","type":0,"attachments":[]}}}}"#
    ));
    let Frame::Dispatch {
        seq: 5,
        event: Event::Message(m),
    } = m
    else {
        panic!("{m:?}")
    };
    assert_eq!(m.guild_id.as_deref(), Some("3"));
    let i = inbound_of(&m, Some("42")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            i.id.as_str(),
            i.sender.as_str(),
            i.conversation.as_str(),
            i.reply_to.as_str(),
            i.text.as_str()
        ),
        ("message:7", ALICE, CHAN, CHAN, "hello")
    );
    // Other events count for the sequence; broken ones are named, not fatal.
    assert_eq!(
        frame(r#"{"op":0,"s":6,"t":"TYPING_START","d":{}}"#),
        Frame::Dispatch {
            seq: 6,
            event: Event::Other("TYPING_START".into())
        }
    );
    for d in [
        r#"{"id":"x","channel_id":"1","author":{"id":"2"}}"#,
        r#"{"id":"1","channel_id":"1","author":{}}"#,
        r#"{"id":"1","channel_id":"99999999999999999999999","author":{"id":"2"}}"#,
        r#"{"id":"1","channel_id":"1","guild_id":5,"author":{"id":"2"}}"#,
    ] {
        let f = frame(&format!(r#"{{"op":0,"s":9,"t":"MESSAGE_CREATE","d":{d}}}"#));
        assert!(
            matches!(
                f,
                Frame::Dispatch {
                    seq: 9,
                    event: Event::Malformed(_)
                }
            ),
            "{f:?}"
        );
    }
    let f = frame(r#"{"op":0,"s":2,"t":"READY","d":{"session_id":"a"}}"#);
    assert!(
        matches!(
            f,
            Frame::Dispatch {
                seq: 2,
                event: Event::Malformed(_)
            }
        ),
        "{f:?}"
    );
}

fn msg() -> MessageCreate {
    MessageCreate {
        id: "7".into(),
        channel_id: CHAN.into(),
        guild_id: None,
        author_id: ALICE.into(),
        author_bot: false,
        webhook: false,
        kind: 0,
        content: "hi".into(),
        attachments: 0,
    }
}

#[test]
fn which_messages_are_delivered() {
    assert!(inbound_of(&msg(), Some(BOT_ID)).is_ok());
    assert!(inbound_of(&MessageCreate { kind: 19, ..msg() }, None).is_ok());
    assert!(inbound_of(
        &MessageCreate {
            author_bot: true,
            ..msg()
        },
        None
    )
    .is_err());
    assert!(inbound_of(&msg(), Some(ALICE)).is_err(), "its own message");
    assert!(inbound_of(
        &MessageCreate {
            webhook: true,
            ..msg()
        },
        None
    )
    .is_err());
    assert!(
        inbound_of(&MessageCreate { kind: 7, ..msg() }, None).is_err(),
        "a join"
    );
    assert!(inbound_of(
        &MessageCreate {
            content: " ".into(),
            ..msg()
        },
        None
    )
    .is_err());
    let a = inbound_of(
        &MessageCreate {
            content: String::new(),
            attachments: 2,
            ..msg()
        },
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.text, "[discord: 2 attachment(s); only text is delivered]");
}

#[test]
fn rest_answers() {
    let h = hyper::HeaderMap::new();
    assert!(classify(200, &h, br#"{"id":"5","content":"x"}"#).is_ok());
    for body in [&b"{}"[..], b"<html>", br#"{"id":5}"#] {
        let e = classify(200, &h, body)
            .err()
            .unwrap_or_else(|| panic!("ok"));
        assert_eq!(e.kind, FailureKind::Unreachable);
    }
    let e = classify(
        429,
        &h,
        br#"{"message":"You are being rate limited.","retry_after":1.5,"global":false}"#,
    )
    .err()
    .unwrap_or_else(|| panic!("ok"));
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_millis(1500)))
    );
    assert!(!e.message.ends_with("(global)"));
    let e = classify(429, &h, br#"{"retry_after":1e9,"global":true}"#)
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.retry_after, Some(rest::MAX_RESET));
    assert!(e.message.ends_with("(global)"), "{}", e.message);
    let mut h429 = hyper::HeaderMap::new();
    h429.insert("retry-after", hyper::header::HeaderValue::from_static("3"));
    let e = classify(429, &h429, b"garbage")
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
    let e = classify(403, &h, br#"{"message":"Missing Access","code":50001}"#)
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.kind, FailureKind::Rejected);
    assert!(
        e.message.contains("Missing Access (code 50001)"),
        "{}",
        e.message
    );
    assert_eq!(
        classify(502, &h, b"").err().map(|e| e.kind),
        Some(FailureKind::Unreachable)
    );
    let mut hh = hyper::HeaderMap::new();
    for (k, v) in [
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset-after", "0.250"),
        ("x-ratelimit-bucket", "abcd"),
    ] {
        hh.insert(k, hyper::header::HeaderValue::from_static(v));
    }
    let rh = RateHeaders::of(&hh);
    assert_eq!(
        (rh.remaining, rh.reset_after),
        (Some(0), Some(Duration::from_millis(250)))
    );
    hh.insert(
        "x-ratelimit-reset-after",
        hyper::header::HeaderValue::from_static("-1"),
    );
    assert_eq!(RateHeaders::of(&hh).reset_after, None);
    assert_eq!(nonce("o1", 0), nonce("o1", 0));
    assert_ne!(nonce("o1", 0), nonce("o1", 1));
    assert_eq!(nonce("o1", 0).len(), 25);
}

fn outbound(id: &str, recipient: &str, body: &str) -> OutboundMessage {
    serde_json::from_value(json!({"id": id, "recipient": recipient, "body": body, "attempt": 1}))
        .unwrap_or_else(|e| panic!("{e}"))
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

fn rest_of(fake: &FakeDiscord, broker: &Arc<FakeBroker>) -> Rest<FakeBroker> {
    let base = ServiceUrl::parse(&fake.api_base()).unwrap_or_else(|e| panic!("{e}"));
    Rest::new(broker.clone(), base, token())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_splits_replies_and_never_doubles_a_retried_piece() {
    let fake = FakeDiscord::start(TOKEN, 45_000);
    let broker = Arc::new(FakeBroker::default());
    let rest = rest_of(&fake, &broker);
    // 4500 characters: three pieces of at most 2000, each with its own nonce.
    let long = "word ".repeat(900);
    let mut m = outbound("o1", CHAN, &long);
    m.in_reply_to = Some("message:1200000000000000005".into());
    let id = rest.send(&m).await.unwrap_or_else(|e| panic!("{e}"));
    let sent = fake.sent();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(id.as_deref(), sent[0]["id"].as_str());
    assert!(sent.iter().all(|s| s["content"]
        .as_str()
        .is_some_and(|c| c.chars().count() <= 2000)));
    assert_eq!(
        sent[0]["message_reference"]["message_id"],
        "1200000000000000005"
    );
    assert!(sent[1]["message_reference"].is_null());
    assert_eq!(sent[0]["allowed_mentions"], json!({"parse": []}));
    let calls = fake.calls();
    assert!(calls
        .iter()
        .all(|c| c.auth_ok && c.body["enforce_nonce"] == true));
    // The message is created but the answer is lost: the retry (same nonce) gets the same
    // message back, and nothing is posted twice.
    fake.inject(RestInjected::CreateThenDrop);
    let e = rest
        .send(&outbound("o2", CHAN, "once"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.kind, FailureKind::Unreachable);
    assert_eq!(
        fake.texts_to(CHAN).iter().filter(|t| *t == "once").count(),
        1
    );
    rest.send(&outbound("o2", CHAN, "once"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        fake.texts_to(CHAN).iter().filter(|t| *t == "once").count(),
        1
    );
    // A later piece that failed is resumed at that piece.
    let before = fake.sent().len();
    fake.inject(RestInjected::Raw {
        status: 502,
        body: "<html>".into(),
    });
    let two = format!("{}\n{}", "a".repeat(1500), "b".repeat(1500));
    assert!(rest.send(&outbound("o3", CHAN, &two)).await.is_err());
    assert_eq!(fake.sent().len(), before);
    rest.send(&outbound("o3", CHAN, &two))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fake.sent().len(), before + 2);
    // A recipient that is a user (the operator): sent to the DM with them, opened once.
    fake.post(
        "1000000000000000077",
        None,
        ALICE,
        "makes ALICE a known user",
    );
    rest.send(&outbound("u1", ALICE, "to the operator"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rest.send(&outbound("u2", ALICE, "again"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dm = fake.dm_of(ALICE).unwrap_or_else(|| panic!("no DM opened"));
    assert_eq!(fake.texts_to(&dm), vec!["to the operator", "again"]);
    let opened = fake
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/users/@me/channels"))
        .count();
    assert_eq!(opened, 1);
    // Refusals: no retry.
    fake.inject(RestInjected::Error {
        status: 403,
        code: 50001,
        message: "Missing Access".into(),
    });
    let e = rest
        .send(&outbound("o4", CHAN, "x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert!(!e.retry() && e.message.contains("Missing Access"), "{e}");
    let e = rest
        .send(&outbound("o5", "general", "x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert!(!e.retry(), "{e}");
    assert!(rest.send(&outbound("o6", CHAN, "  ")).await.is_err());
    // A wrong token: 401, refused for good, and the token is in no message.
    let bad = Rest::new(
        broker.clone(),
        ServiceUrl::parse(&fake.api_base()).unwrap_or_else(|e| panic!("{e}")),
        Arc::new(
            BotToken::new(b"MTEwMDAwMDAwMDAwMDAwMDAwMQ.GAbCdE.wrong-token-BBBBBBBBBBBBBB")
                .unwrap_or_else(|e| panic!("{e}")),
        ),
    );
    let e = bad
        .send(&outbound("o7", CHAN, "x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert!(!e.retry() && e.message.contains("401"), "{e}");
    assert!(!e.message.contains("wrong-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_honours_rate_limits() {
    let fake = FakeDiscord::start(TOKEN, 45_000);
    let broker = Arc::new(FakeBroker::default());
    let rest = rest_of(&fake, &broker);
    // Two requests per 700 ms: five pieces wait for the route's reset instead of hitting 429s.
    fake.set_route_limit(2, Duration::from_millis(700));
    let five = (0..5)
        .map(|i| format!("{i}{}", "x".repeat(1990)))
        .collect::<Vec<_>>()
        .join("\n");
    rest.send(&outbound("r1", CHAN, &five))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fake.sent().len(), 5);
    assert_eq!(
        fake.over_limit(),
        0,
        "a request went over the announced limit"
    );
    fake.set_route_limit(50, Duration::from_secs(1));
    // A 429 with a short retry_after is waited out and sent again, once.
    fake.inject(RestInjected::TooMany {
        retry_after: 0.4,
        global: false,
    });
    let t0 = tokio::time::Instant::now();
    rest.send(&outbound("r2", CHAN, "after 429"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(t0.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        fake.texts_to(CHAN)
            .iter()
            .filter(|t| *t == "after 429")
            .count(),
        1
    );
    // A long one goes back as a retry with Discord's wait, and holds every route when global.
    fake.inject(RestInjected::TooMany {
        retry_after: 30.0,
        global: true,
    });
    let e = rest
        .send(&outbound("r3", CHAN, "later"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.kind, FailureKind::Throttled);
    assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
    let calls = fake.calls().len();
    let e = rest
        .send(&outbound("r4", "1000000000000000098", "other channel"))
        .await
        .err()
        .unwrap_or_else(|| panic!("ok"));
    assert_eq!(e.kind, FailureKind::Throttled);
    assert_eq!(fake.calls().len(), calls, "a request during a global limit");
}

/// The inbound loop over the Gateway, on its own task.
struct Running {
    broker: Arc<FakeBroker>,
    task: tokio::task::JoinHandle<()>,
}

fn start_inbound(fake: &FakeDiscord, dir: &std::path::Path) -> Running {
    let broker = Arc::new(FakeBroker::default());
    let ctx = Arc::new(Ctx::new("dc".into(), dir.to_path_buf(), broker.clone()));
    let url = GatewayUrl::parse(&fake.gateway_url()).unwrap_or_else(|e| panic!("{e}"));
    let mut source = Gateway::new(broker.clone(), url, token());
    let task = tokio::spawn(async move {
        let store = CursorStore::new(&ctx.state_dir, "discord");
        crate::adapter::run_inbound(&ctx, &mut source, &store).await;
    });
    Running { broker, task }
}

fn delivered(r: &Running) -> Vec<String> {
    r.broker
        .st()
        .delivered
        .iter()
        .map(|m| m.text.clone())
        .collect()
}

fn saved(dir: &std::path::Path) -> Option<Session> {
    CursorStore::new(dir, "discord").load().ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_delivers_resumes_and_survives_bad_frames() {
    let fake = FakeDiscord::start(TOKEN, 300);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = start_inbound(&fake, dir.path());
    fake.wait_attached(WAIT);
    fake.post(CHAN, Some("1300000000000000001"), ALICE, "in a guild");
    fake.post("1000000000000000077", None, ALICE, "a DM");
    fake.post_as(CHAN, None, "1000000000000000055", true, "another bot");
    fake.post_as(CHAN, None, BOT_ID, true, "myself");
    until("two deliveries", || {
        (delivered(&r).len() == 2).then_some(())
    })
    .await;
    let d = r.broker.st().delivered.clone();
    assert_eq!(
        (d[0].sender.as_str(), d[0].conversation.as_str()),
        (ALICE, CHAN)
    );
    assert_eq!(d[1].conversation, "1000000000000000077");
    // Heartbeats carry the last sequence number.
    until("a heartbeat with a sequence", || {
        fake.heartbeats()
            .iter()
            .any(|h| h.as_u64().is_some_and(|s| s >= 4))
            .then_some(())
    })
    .await;
    // Malformed frames are skipped; the connection goes on.
    fake.send_raw("{not json");
    fake.send_raw(r#"{"op":0,"t":"MESSAGE_CREATE","d":{}}"#);
    fake.dispatch_raw("MESSAGE_CREATE", json!({"id": "nope"}));
    fake.request_heartbeat();
    fake.post(CHAN, None, ALICE, "after garbage");
    until("the message after garbage", || {
        delivered(&r)
            .contains(&"after garbage".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(fake.connections(), 1);
    // A drop: resumed with the last delivered sequence, what was posted meanwhile replayed.
    let seq = saved(dir.path()).map(|s| s.seq).unwrap_or(0);
    fake.drop_connection();
    fake.post(CHAN, None, ALICE, "during the drop");
    until("the replay", || {
        delivered(&r)
            .contains(&"during the drop".to_string())
            .then_some(())
    })
    .await;
    let resumes = fake.resumes();
    assert_eq!(resumes.len(), 1, "{resumes:?}");
    assert!(
        resumes[0].1 >= seq && resumes[0].0 == "fake-session-1",
        "{resumes:?}"
    );
    assert_eq!(fake.identifies(), 1);
    // op 7: resumed at once.
    fake.reconnect();
    until("the second resume", || {
        (fake.resumes().len() == 2).then_some(())
    })
    .await;
    // A zombie (no ACKs): noticed within two intervals, dropped and resumed.
    fake.set_acks(false);
    until("the zombie noticed", || {
        (fake.resumes().len() == 3).then_some(())
    })
    .await;
    fake.set_acks(true);
    fake.post(CHAN, None, ALICE, "after the zombie");
    until("after the zombie", || {
        delivered(&r)
            .contains(&"after the zombie".to_string())
            .then_some(())
    })
    .await;
    // The session refused: a new one (Identify); what was posted in the gap is lost.
    fake.invalidate_session();
    fake.drop_connection();
    fake.post(CHAN, None, ALICE, "lost in the gap");
    until("a new session", || (fake.identifies() == 2).then_some(())).await;
    fake.wait_attached(WAIT);
    fake.post(CHAN, None, ALICE, "in the new session");
    until("the new session's message", || {
        delivered(&r)
            .contains(&"in the new session".to_string())
            .then_some(())
    })
    .await;
    assert!(fake.invalid_sessions() >= 1);
    assert!(!delivered(&r).contains(&"lost in the gap".to_string()));
    assert_eq!(
        saved(dir.path()).map(|s| s.session_id),
        Some("fake-session-2".to_string())
    );
    // Nothing was delivered twice.
    let mut ids: Vec<String> = r
        .broker
        .st()
        .delivered
        .iter()
        .map(|m| m.id.clone())
        .collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert_eq!(r.broker.st().states.last(), Some(&(true, None)));
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_saved_cursor() {
    let fake = FakeDiscord::start(TOKEN, 45_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = start_inbound(&fake, dir.path());
    fake.wait_attached(WAIT);
    fake.post(CHAN, None, ALICE, "one");
    until("one", || (delivered(&r).len() == 1).then_some(())).await;
    r.task.abort();
    let _ = r.task.await;
    fake.drop_connection();
    // Posted while the adapter is down: replayed after the restart's resume.
    fake.post(CHAN, None, ALICE, "two");
    let r2 = start_inbound(&fake, dir.path());
    until("two", || {
        (delivered(&r2) == vec!["two".to_string()]).then_some(())
    })
    .await;
    assert_eq!(
        fake.identifies(),
        1,
        "the restart identified instead of resuming"
    );
    assert_eq!(fake.resumes().len(), 1);
    r2.task.abort();
    // A wrong token: closed with 4004 and reported; never a crash.
    let bad = FakeDiscord::start(
        "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GAbCdE.other-token-CCCCCCCCCCCCCCCCCC",
        45_000,
    );
    let dir2 = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r3 = start_inbound(&bad, dir2.path());
    let st = until("the refusal reported", || {
        r3.broker.st().states.first().cloned()
    })
    .await;
    assert!(
        !st.0 && st.1.as_deref().unwrap_or("").contains("4004"),
        "{st:?}"
    );
    assert!(!st.1.as_deref().unwrap_or("").contains(TOKEN));
    r3.task.abort();
}
