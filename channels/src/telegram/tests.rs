//! Unit tests of `telegram`.

use std::path::Path;

use carapace_broker::protocol::{ErrorCode, SendOutcome};
use carapace_tests::fake_telegram::{FakeTelegram, Injected, FIRST_UPDATE_ID};

use super::*;
use crate::broker::fake::FakeBroker;

const TOKEN: &str = "123456:AAE-secret_token_part_xyz";
const WAIT: Duration = Duration::from_secs(20);

fn token() -> BotToken {
    BotToken::new(TOKEN.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn updates(body: &str) -> Vec<Update> {
    parse_updates(200, body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn message(u: &Update) -> &Inbound {
    match &u.item {
        Item::Message { inbound, .. } | Item::Callback { inbound, .. } => inbound,
        Item::Skip(why) => panic!("skipped: {why}"),
    }
}

#[test]
fn private_and_group_text_messages() {
    let u = updates(
        r#"{"ok":true,"result":[
              {"update_id":7,"message":{"message_id":1,"from":{"id":123456789,"is_bot":false,"first_name":"A"},
               "chat":{"id":123456789,"type":"private"},"date":1,"text":"hello"}},
              {"update_id":8,"message":{"message_id":2,"from":{"id":55,"is_bot":false,"first_name":"B"},
               "chat":{"id":-100987,"type":"supergroup","title":"G"},"date":1,"text":"hi all"}}]}"#,
    );
    assert_eq!(u.len(), 2);
    assert_eq!(
        message(&u[0]),
        &Inbound {
            id: "update:7".into(),
            sender: "123456789".into(),
            conversation: "123456789".into(),
            reply_to: "123456789".into(),
            text: "hello".into(),
        }
    );
    let g = message(&u[1]);
    assert_eq!(
        (
            g.id.as_str(),
            g.sender.as_str(),
            g.conversation.as_str(),
            g.reply_to.as_str()
        ),
        ("update:8", "55", "-100987", "-100987")
    );
    assert_eq!(
        u[1].item,
        Item::Message {
            inbound: g.clone(),
            chat_id: -100987,
            message_id: 2
        }
    );
}

#[test]
fn non_text_is_a_note_and_service_messages_are_skipped() {
    let u = updates(
        r#"{"ok":true,"result":[
              {"update_id":1,"message":{"message_id":1,"from":{"id":5},"chat":{"id":5},"photo":[{"file_id":"x"}],"caption":"look"}},
              {"update_id":2,"message":{"message_id":2,"from":{"id":5},"chat":{"id":5},"sticker":{"file_id":"x"}}},
              {"update_id":3,"message":{"message_id":3,"from":{"id":5},"chat":{"id":-5},"new_chat_members":[{"id":6}]}},
              {"update_id":4,"edited_message":{"message_id":1,"from":{"id":5},"chat":{"id":5},"text":"x"}},
              {"update_id":5,"message":{"message_id":5,"chat":{"id":5},"text":"no sender"}},
              {"update_id":6,"message":"not an object"}]}"#,
    );
    assert_eq!(
        message(&u[0]).text,
        "[telegram: photo; only text is delivered] look"
    );
    assert_eq!(
        message(&u[1]).text,
        "[telegram: sticker; only text is delivered]"
    );
    for s in &u[2..] {
        assert!(matches!(s.item, Item::Skip(_)), "{s:?}");
    }
    assert_eq!(
        u.iter().map(|u| u.update_id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn malformed_answers_are_errors_to_retry() {
    for bad in [
        "",
        "not json",
        "[]",
        r#"{"ok":true}"#,
        r#"{"ok":true,"result":{}}"#,
        r#"{"ok":true,"result":[{"message":{}}]}"#,
        r#"{"ok":true,"result":[{"update_id":-1}]}"#,
        r#"{"ok":true,"result":[{"update_id":"7"}]}"#,
        r#"{"result":[]}"#,
    ] {
        let e = parse_updates(200, bad.as_bytes()).err();
        assert_eq!(e.map(|e| e.kind), Some(FailureKind::Unreachable), "{bad}");
    }
    assert_eq!(updates(r#"{"ok":true,"result":[]}"#), []);
}

#[test]
fn api_errors_map_to_retry_or_not() {
    let e = api_result(429, br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}"#)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(7)))
    );
    assert!(e.retry());
    for (status, body, kind) in [
        (
            400,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
            FailureKind::Rejected,
        ),
        (
            403,
            r#"{"ok":false,"error_code":403,"description":"Forbidden: bot was blocked by the user"}"#,
            FailureKind::Rejected,
        ),
        (
            401,
            r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#,
            FailureKind::Rejected,
        ),
        (
            500,
            r#"{"ok":false,"error_code":500,"description":"Internal Server Error"}"#,
            FailureKind::Unreachable,
        ),
        (502, "<html>Bad Gateway</html>", FailureKind::Unreachable),
        (504, "", FailureKind::Unreachable),
        (429, "slow down", FailureKind::Throttled),
        (404, "<html>", FailureKind::Rejected),
        (200, "{", FailureKind::Unreachable),
        // ok:true with a failure status is not believed.
        (500, r#"{"ok":true,"result":[]}"#, FailureKind::Unreachable),
    ] {
        let e = api_result(status, body.as_bytes()).err();
        assert_eq!(e.as_ref().map(|e| e.kind), Some(kind), "{status} {body}");
        assert_eq!(e.map(|e| e.retry()), Some(kind != FailureKind::Rejected));
    }
    assert_eq!(
        api_result(200, br#"{"ok":true,"result":{"message_id":3}}"#).ok(),
        Some(json!({"message_id": 3}))
    );
}

fn units(s: &str) -> usize {
    s.encode_utf16().count()
}

fn non_ws(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

#[test]
fn splitting() {
    assert_eq!(split_message("hi", 4096), ["hi"]);
    assert_eq!(split_message("  \n ", 4096), Vec::<String>::new());
    // At the line break in the second half of the window.
    let text = format!("{}\n{}", "a".repeat(3000), "b".repeat(3000));
    assert_eq!(
        split_message(&text, 4096),
        ["a".repeat(3000), "b".repeat(3000)]
    );
    // At the last space when there is no line break.
    let words = "word ".repeat(2000);
    let parts = split_message(&words, 4096);
    assert!(
        parts.len() == 3
            && parts
                .iter()
                .all(|p| p.ends_with("word") && units(p) <= 4096),
        "{parts:?}"
    );
    assert_eq!(non_ws(&parts.concat()), non_ws(&words));
    // Anywhere when there is no whitespace at all.
    let solid = "x".repeat(9000);
    let parts = split_message(&solid, 4096);
    assert_eq!(
        parts.iter().map(String::len).collect::<Vec<_>>(),
        [4096, 4096, 808]
    );
    // Characters of two UTF-16 units are never cut, and count twice.
    let emoji = "😀".repeat(3000);
    let parts = split_message(&emoji, 4096);
    assert_eq!(
        parts.iter().map(|p| units(p)).collect::<Vec<_>>(),
        [4096, 1904]
    );
    assert_eq!(parts.concat(), emoji);
    // A line break early in the window is not used (pieces stay large).
    let text = format!("ab\n{}", "c".repeat(5000));
    assert_eq!(split_message(&text, 4096)[0].len(), 4096);
}

#[test]
fn tokens_are_checked_hidden_and_scrubbed() {
    for bad in [
        "",
        "abc",
        "123",
        ":abcdefghij",
        "12a:abcdefghij",
        "123:short",
        "123:has space in it",
        "123:abc/def/ghi",
    ] {
        assert!(BotToken::new(bad.as_bytes()).is_err(), "{bad}");
    }
    let t = BotToken::new(format!(" {TOKEN}\n").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{t:?}").contains("secret"));
    assert_eq!(
        t.scrub(&format!("x {TOKEN} y AAE-secret_token_part_xyz z")),
        "x <token> y <token> z"
    );
    let e = BotToken::new(b"123:bad token with spaces")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!e.contains("bad token"));
}

fn api(broker: Arc<FakeBroker>, base: &str) -> Api<FakeBroker> {
    Api {
        broker,
        base: ServiceUrl::parse(base).unwrap_or_else(|e| panic!("{e}")),
        token: token(),
    }
}

fn assert_clean(e: &ServiceError) {
    let shown = format!("{e} {e:?}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains("secret_token"),
        "{shown}"
    );
}

#[tokio::test]
async fn the_token_is_in_no_error() {
    let mut t = FakeTelegram::start(TOKEN);
    let broker = Arc::new(FakeBroker::default());
    let a = api(broker.clone(), &t.base_url());
    let body = json!({"chat_id": 1, "text": "x"});
    // The server echoes the token in its description, or in a malformed body.
    t.inject(
        "sendMessage",
        Injected::error(400, format!("Bad Request: bot{TOKEN} is odd")),
    );
    t.inject(
        "sendMessage",
        Injected::malformed(format!("<html>/bot{TOKEN}/sendMessage</html>")),
    );
    t.inject(
        "sendMessage",
        Injected::Raw {
            status: 502,
            body: TOKEN.into(),
        },
    );
    t.inject("sendMessage", Injected::Hang);
    for expect in [
        FailureKind::Rejected,
        FailureKind::Unreachable,
        FailureKind::Unreachable,
        FailureKind::Unreachable,
    ] {
        let e = a
            .call("sendMessage", &body, Duration::from_millis(500))
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(e.kind, expect, "{e}");
        assert_clean(&e);
    }
    // The service down: the connection is refused.
    t.down();
    let e = a
        .call("sendMessage", &body, Duration::from_secs(5))
        .await
        .err()
        .unwrap_or_else(|| panic!("accepted"));
    assert_eq!(e.kind, FailureKind::Unreachable);
    assert_clean(&e);
    t.up();
    // And it was really sent with the token in the path.
    assert!(a.call("sendMessage", &body, WAIT).await.is_ok());
    assert!(t.calls().iter().all(|c| c.token_ok));
}

struct Run {
    fake: FakeTelegram,
    broker: Arc<FakeBroker>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

fn start(fake: FakeTelegram, broker: Arc<FakeBroker>, dir: tempfile::TempDir) -> Run {
    let ctx = Arc::new(Ctx::new(
        "tg".into(),
        dir.path().to_path_buf(),
        broker.clone(),
    ));
    let settings = TelegramSettings {
        api_base: fake.base_url(),
        token_secret: "bot".into(),
        poll_timeout_ms: 1_000,
    };
    let task = tokio::spawn(run(ctx, settings));
    Run {
        fake,
        broker,
        dir,
        task,
    }
}

fn saved_offset(dir: &Path) -> Option<i64> {
    CursorStore::new(dir, "telegram")
        .load::<Offset>()
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|o| o.offset)
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

fn outbound(id: &str, recipient: &str, body: &str, in_reply_to: Option<&str>) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        recipient: recipient.into(),
        body: body.into(),
        in_reply_to: in_reply_to.map(Into::into),
        attempt: 1,
        buttons: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_delivers_saves_the_offset_after_the_broker_answered_and_sends() {
    let fake = FakeTelegram::start(TOKEN);
    let broker = Arc::new(FakeBroker::with_secret(
        "bot",
        format!("{TOKEN}\n").as_bytes(),
    ));
    // The broker is busy twice: the update stays unconfirmed meanwhile.
    broker
        .st()
        .deliver_script
        .extend([Err(ErrorCode::Busy), Err(ErrorCode::Unavailable)]);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = start(fake, broker, dir);
    let (u1, m1) = r.fake.push_text(42, 42, "hello");
    until("a refused deliver", || {
        (r.broker.st().attempts >= 1).then_some(())
    })
    .await;
    assert_eq!(
        saved_offset(r.dir.path()),
        None,
        "saved before the broker took it"
    );
    until("the delivery", || {
        (!r.broker.st().delivered.is_empty()).then_some(())
    })
    .await;
    assert_eq!(r.broker.st().attempts, 3);
    let got = r.broker.st().delivered[0].clone();
    assert_eq!(
        (got.id.as_str(), got.sender.as_str(), got.text.as_str()),
        (format!("update:{u1}").as_str(), "42", "hello")
    );
    until("the saved offset", || {
        saved_offset(r.dir.path()).filter(|o| *o == u1 + 1)
    })
    .await;
    r.fake.wait_offset(u1 + 1, WAIT);
    assert_eq!(u1, FIRST_UPDATE_ID);
    // A group message and a skipped service message both move the offset.
    let (u2, _) = r.fake.push_text(-100, 7, "in a group");
    let u3 = r.fake.push_update(json!({"message": {"message_id": 99, "from": {"id": 7}, "chat": {"id": -100}, "left_chat_member": {"id": 8}}}));
    until("offset after the skipped update", || {
        saved_offset(r.dir.path()).filter(|o| *o == u3 + 1)
    })
    .await;
    assert_eq!(r.broker.st().delivered.len(), 2);
    assert_eq!(r.broker.st().delivered[1].conversation, "-100");
    assert_eq!(r.broker.st().delivered[1].id, format!("update:{u2}"));
    // Outbound: a reply threads to the message it answers; the ack names its message id.
    r.broker.st().outbox.push_back(outbound(
        "o1",
        "42",
        "hi back",
        Some(&format!("update:{u1}")),
    ));
    let sent = r.fake.wait_sent(1, WAIT);
    assert_eq!(sent[0]["chat_id"], json!(42));
    assert_eq!(sent[0]["text"], "hi back");
    assert_eq!(sent[0]["reply_parameters"]["message_id"], json!(m1));
    let ack = until("the ack", || r.broker.st().acks.first().cloned()).await;
    assert!(
        matches!(&ack, (id, SendOutcome::Sent { service_id: Some(_) }) if id == "o1"),
        "{ack:?}"
    );
    // Not a reply to a known message in that chat: no reply_parameters.
    r.broker.st().outbox.push_back(outbound(
        "o2",
        "-100",
        "to the group",
        Some(&format!("update:{u1}")),
    ));
    let sent = r.fake.wait_sent(2, WAIT);
    assert!(sent[1].get("reply_parameters").is_none(), "{:?}", sent[1]);
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_survives_outages_and_bad_answers() {
    let fake = FakeTelegram::start(TOKEN);
    let broker = Arc::new(FakeBroker::with_secret("bot", TOKEN.as_bytes()));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut r = start(fake, broker, dir);
    until("connected", || r.broker.st().states.first().cloned()).await;
    // Malformed, oversized and refused answers: reported, and the loop goes on.
    r.fake
        .inject("getUpdates", Injected::malformed("{\"ok\":tru"));
    r.fake.inject(
        "getUpdates",
        Injected::Raw {
            status: 200,
            body: format!("{{\"ok\":true,\"result\":[{}]}}", "0".repeat(MAX_REPLY)),
        },
    );
    r.fake.inject(
        "getUpdates",
        Injected::error(409, "Conflict: terminated by other getUpdates request"),
    );
    let states = until("three failures reported", || {
        let s = r.broker.st().states.clone();
        (s.len() >= 4).then_some(s)
    })
    .await;
    assert!(
        states[1]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("not a Bot API answer"),
        "{states:?}"
    );
    assert!(
        states[2]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("over 4194304 bytes"),
        "{states:?}"
    );
    assert!(
        states[3].1.as_deref().unwrap_or("").contains("409"),
        "{states:?}"
    );
    // Down: reported; up again: the next message arrives.
    r.fake.down();
    until("the outage reported", || {
        r.broker
            .st()
            .states
            .last()
            .filter(|s| !s.0 && s.1.as_deref().unwrap_or("").contains("connect"))
            .cloned()
    })
    .await;
    r.fake.up();
    let (u, _) = r.fake.push_text(1, 1, "back");
    until("the delivery after the outage", || {
        r.broker
            .st()
            .delivered
            .iter()
            .any(|m| m.id == format!("update:{u}"))
            .then_some(())
    })
    .await;
    assert_eq!(r.broker.st().states.last(), Some(&(true, None)));
    for (_, e) in r.broker.st().states.iter() {
        assert!(
            !e.as_deref().unwrap_or("").contains("secret_token"),
            "{e:?}"
        );
    }
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_offset_is_used_unless_it_is_a_week_old() {
    for (at, sent) in [(now_secs() - 60, true), (now_secs() - 7 * 24 * 3600, false)] {
        let fake = FakeTelegram::start(TOKEN);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        CursorStore::new(dir.path(), "telegram")
            .store(&Offset { offset: 5, at })
            .unwrap_or_else(|e| panic!("{e}"));
        let broker = Arc::new(FakeBroker::with_secret("bot", TOKEN.as_bytes()));
        // An update with an id below the saved offset (ids restarted at random).
        let u = fake.push_update(json!({"update_id": 3, "message": {"message_id": 1, "from": {"id": 9}, "chat": {"id": 9}, "text": "after a quiet week"}}));
        let r = start(fake, broker, dir);
        let calls = r.fake.wait_calls("getUpdates", 1, WAIT);
        assert_eq!(
            calls[0].params.get("offset").is_some(),
            sent,
            "{:?}",
            calls[0]
        );
        if sent {
            assert_eq!(calls[0].params["offset"], json!(5));
        } else {
            until("the delivery", || {
                (!r.broker.st().delivered.is_empty()).then_some(())
            })
            .await;
            until("the new offset", || {
                saved_offset(r.dir.path()).filter(|o| *o == u + 1)
            })
            .await;
        }
        r.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_splits_resumes_and_maps_errors() {
    let fake = FakeTelegram::start(TOKEN);
    let broker = Arc::new(FakeBroker::default());
    let base = ServiceUrl::parse(&fake.base_url()).unwrap_or_else(|e| panic!("{e}"));
    let (_, sender) = adapter(broker, base, token(), Duration::from_secs(1));
    let long = format!("{}\n{}", "a".repeat(4000), "b".repeat(100));
    let m = outbound("o1", "5", &long, None);
    // A malformed answer to the first piece: nothing sent, retry.
    fake.inject("sendMessage", Injected::malformed(""));
    let e = sender
        .send(&m)
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!((e.kind, e.retry()), (FailureKind::Unreachable, true));
    assert!(e.message.contains("piece 1 of 2"), "{e}");
    assert_eq!(sender.progress.of("o1"), 0);
    // The first piece goes out, the second is throttled.
    fake.inject("sendMessage", Injected::Pass);
    fake.inject("sendMessage", Injected::too_many(3));
    let e = sender
        .send(&m)
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(Duration::from_secs(3)))
    );
    assert!(e.message.contains("piece 2 of 2"), "{e}");
    assert_eq!(sender.progress.of("o1"), 1);
    assert_eq!(fake.sent().len(), 1);
    // The retry resumes at the second piece.
    let id = sender.send(&m).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(id.is_some());
    let texts: Vec<String> = fake
        .sent()
        .iter()
        .map(|s| s["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(texts, ["a".repeat(4000), "b".repeat(100)]);
    assert_eq!(sender.progress.of("o1"), 0);
    // A 4xx after the first piece: no retry, progress forgotten.
    let m2 = outbound("o2", "5", &long, None);
    fake.inject("sendMessage", Injected::Pass);
    fake.inject(
        "sendMessage",
        Injected::error(400, "Bad Request: chat not found"),
    );
    let e = sender
        .send(&m2)
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!((e.kind, e.retry()), (FailureKind::Rejected, false));
    assert_eq!(sender.progress.of("o2"), 0);
    // 5xx: retry.
    fake.inject("sendMessage", Injected::error(502, "Bad Gateway"));
    let e = sender
        .send(&outbound("o3", "5", "x", None))
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!((e.kind, e.retry()), (FailureKind::Unreachable, true));
    assert!(!e.message.contains("piece"), "{e}");
    // String chat ids stay strings; empty text is refused without a call.
    sender
        .send(&outbound("o4", "@chan", "x", None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        fake.sent().last().map(|s| s["chat_id"].clone()),
        Some(json!("@chan"))
    );
    let calls = fake.calls().len();
    let e = sender
        .send(&outbound("o5", "5", " \n", None))
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(e.kind, FailureKind::Rejected);
    assert_eq!(fake.calls().len(), calls);
}

#[test]
fn button_presses_are_the_pressers_answers() {
    let u = updates(
        r#"{"ok":true,"result":[
              {"update_id":20,"callback_query":{"id":"9001","from":{"id":111,"is_bot":false,"first_name":"O"},
               "message":{"message_id":5,"from":{"id":4242,"is_bot":true},"chat":{"id":111,"type":"private"},"date":1,"text":"Approval 1"},
               "chat_instance":"-1","data":"allow 1"}},
              {"update_id":21,"callback_query":{"id":"9002","from":{"id":222},
               "message":{"message_id":6,"chat":{"id":-100,"type":"group"}},"data":"deny 1"}},
              {"update_id":22,"callback_query":{"id":"9003","from":{"id":222},"inline_message_id":"x","data":"admit 2"}},
              {"update_id":23,"callback_query":{"id":"9004","from":{"id":222},"game_short_name":"g"}},
              {"update_id":24,"callback_query":{"from":{"id":222},"data":"allow 1"}},
              {"update_id":25,"callback_query":{"id":"9006","data":"allow 1"}},
              {"update_id":26,"callback_query":{"id":"9007","from":{"id":222},"data":""}}]}"#,
    );
    assert_eq!(
        u[0].item,
        Item::Callback {
            inbound: Inbound {
                id: "update:20".into(),
                sender: "111".into(),
                conversation: "111".into(),
                reply_to: "111".into(),
                text: "allow 1".into(),
            },
            callback_id: "9001".into(),
            pressed: Some((111, 5)),
        }
    );
    // An inline-mode message has no chat or message id of its own.
    assert!(
        matches!(u[2].item, Item::Callback { pressed: None, .. }),
        "{:?}",
        u[2]
    );
    // The presser is the sender, wherever the message is.
    let g = message(&u[1]);
    assert_eq!(
        (g.sender.as_str(), g.conversation.as_str(), g.text.as_str()),
        ("222", "-100", "deny 1")
    );
    // An inline-mode message has no chat: the presser's own.
    assert_eq!(message(&u[2]).conversation, "222");
    for s in &u[3..] {
        assert!(matches!(s.item, Item::Skip(_)), "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buttons_go_out_as_an_inline_keyboard_and_presses_come_back_acknowledged() {
    let fake = FakeTelegram::start(TOKEN);
    let broker = Arc::new(FakeBroker::with_secret("bot", TOKEN.as_bytes()));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = start(fake, broker, dir);
    // A long announcement: the keyboard is on its last piece only.
    let mut m = outbound(
        "o1",
        "111",
        &format!("{}\nAnswer: allow 1", "word ".repeat(1000)),
        None,
    );
    m.buttons = vec![
        carapace_broker::protocol::Button {
            label: "Allow".into(),
            data: "allow 1".into(),
        },
        carapace_broker::protocol::Button {
            label: "Deny".into(),
            data: "deny 1".into(),
        },
        carapace_broker::protocol::Button {
            label: "Too long".into(),
            data: "x".repeat(65),
        },
    ];
    r.broker.st().outbox.push_back(m);
    let sent = r.fake.wait_sent(2, WAIT);
    assert!(sent[0].get("reply_markup").is_none(), "{:?}", sent[0]);
    assert_eq!(
        sent[1]["reply_markup"],
        json!({"inline_keyboard": [[
            {"text": "Allow", "callback_data": "allow 1"},
            {"text": "Deny", "callback_data": "deny 1"}
        ]]})
    );
    // A press is asked for, delivered as the presser's words, and acknowledged.
    let calls = r.fake.wait_calls("getUpdates", 1, WAIT);
    assert_eq!(
        calls[0].params["allowed_updates"],
        json!(["message", "callback_query"])
    );
    let (u, cb) = r.fake.push_callback(111, 222, 5, "allow 1");
    until("the press delivered", || {
        r.broker.st().delivered.first().cloned()
    })
    .await;
    let got = r.broker.st().delivered[0].clone();
    assert_eq!(
        (
            got.id.as_str(),
            got.sender.as_str(),
            got.conversation.as_str(),
            got.text.as_str()
        ),
        (format!("update:{u}").as_str(), "222", "111", "allow 1")
    );
    until("the press acknowledged", || {
        r.fake
            .answered_callbacks()
            .first()
            .map(|a| a["callback_query_id"] == json!(cb))
            .filter(|ok| *ok)
    })
    .await;
    r.fake.wait_offset(u + 1, WAIT);
    // Taken as an ordinary message (queued: not the operator's answer), its buttons stay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(r
        .fake
        .calls()
        .iter()
        .all(|c| c.method != "editMessageReplyMarkup"));
    // The operator's press, which the broker answers with: the buttons are removed from the
    // pressed message.
    r.broker
        .st()
        .deliver_script
        .push_back(Ok(carapace_broker::protocol::DeliverStatus::Answered));
    r.fake.push_callback(111, 111, 7, "deny 1");
    let edits = r.fake.wait_calls("editMessageReplyMarkup", 1, WAIT);
    assert_eq!(
        edits[0].params,
        json!({"chat_id": 111, "message_id": 7, "reply_markup": {"inline_keyboard": []}})
    );
    r.task.abort();
}
