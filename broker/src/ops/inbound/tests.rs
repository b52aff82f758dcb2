//! Tests of `deliver` and `inbound`: the policy checks, the audit, the bounded queue, the
//! cursor, the long poll and the frame cap.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_policy::Policy;

use super::*;
use crate::audit::AuditLog;
use crate::dlq::DeadLetters;
use crate::ops::OpsConfig;
use crate::protocol::{ErrorBody, Request};
use crate::server::{Handler, Role};

const POLICY: &str = r##"
version = 1
[profiles.adapter]
why = "the inbox's adapter"
[profiles.adapter.broker]
deliver = ["inbox", "big"]
[profiles.otheradapter]
why = "another channel's adapter"
[profiles.otheradapter.broker]
deliver = ["other"]
[profiles.gw]
why = "the gateway"
[profiles.gw.broker]
inbound = true
[profiles.tool]
why = "a tool: a broker section, neither key"
[profiles.tool.broker]
channels = ["inbox"]
[profiles.nobroker]
why = "no broker section"
[channels.inbox]
why = "messages from outside"
kind = "file"
path = "/nonexistent/inbox.log"
recipients = ["*"]
max_bytes = 100
[channels.other]
why = "another channel"
kind = "file"
path = "/nonexistent/other.log"
recipients = ["*"]
[channels.big]
why = "large messages"
kind = "file"
path = "/nonexistent/big.log"
recipients = ["*"]
max_bytes = "1MiB"
"##;

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ops: Arc<Ops>,
}

fn setup_capacity(capacity: usize) -> Env {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = tmp.path().to_path_buf();
    let policy = Policy::parse(POLICY, "inbound.toml").unwrap_or_else(|e| panic!("{e}"));
    let audit = AuditLog::open(dir.join("audit.log")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = DeadLetters::open(dir.join("dlq")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = OpsConfig {
        credentials_dir: None,
        inbound_capacity: capacity,
        ..OpsConfig::default()
    };
    let ops = Ops::new(policy, audit, dlq, None, None, cfg).unwrap_or_else(|e| panic!("{e}"));
    Env {
        _tmp: tmp,
        dir,
        ops: Arc::new(ops),
    }
}

fn setup() -> Env {
    setup_capacity(1024)
}

fn who(profile: &str, id: u64) -> Identity {
    Identity {
        id,
        role: if profile.contains("adapter") {
            Role::Channel
        } else {
            Role::Gateway
        },
        profile: profile.to_string(),
    }
}

fn adapter() -> Identity {
    who("adapter", 4)
}

fn gw() -> Identity {
    who("gw", 1)
}

fn err_of(r: &Response) -> ErrorBody {
    match &r.reply {
        Reply::Err(e) => e.clone(),
        Reply::Ok(ok) => panic!("expected an error, got {ok:?}"),
    }
}

fn seq_of(r: &Response) -> u64 {
    match &r.reply {
        Reply::Ok(OkReply::Deliver { seq, .. }) => *seq,
        other => panic!("expected a deliver reply, got {other:?}"),
    }
}

fn inbound_of(r: &Response) -> (Vec<InboundMessage>, u64) {
    match &r.reply {
        Reply::Ok(OkReply::Inbound { messages, next }) => (messages.clone(), *next),
        other => panic!("expected an inbound reply, got {other:?}"),
    }
}

fn seqs(m: &[InboundMessage]) -> Vec<u64> {
    m.iter().map(|m| m.seq).collect()
}

fn audit_lines(env: &Env) -> Vec<serde_json::Value> {
    fs::read_to_string(env.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn last_audit(env: &Env) -> serde_json::Value {
    audit_lines(env)
        .pop()
        .unwrap_or_else(|| panic!("no audit record"))
}

async fn deliver(env: &Env, body: &str) -> Response {
    env.ops
        .deliver(&adapter(), "inbox", "alice@example.com", body.to_string())
        .await
}

#[tokio::test]
async fn deliver_queues_for_the_gateway_and_audits_without_the_body() {
    let env = setup();
    assert_eq!(seq_of(&deliver(&env, "hello there").await), 1);
    let rec = last_audit(&env);
    assert_eq!(rec["op"], "deliver");
    assert_eq!(rec["target"], "inbox:alice@example.com");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["who"]["profile"], "adapter");
    assert_eq!(rec["who"]["role"], "channel");
    assert!(rec["rule"]["why"]
        .as_str()
        .is_some_and(|w| w.contains("messages from outside")));
    assert_eq!(seq_of(&deliver(&env, "second").await), 2);
    let r = env.ops.inbound(&gw(), 0, 0).await;
    let (messages, next) = inbound_of(&r);
    assert_eq!(next, 2);
    assert_eq!(seqs(&messages), [1, 2]);
    let m = &messages[0];
    assert_eq!(m.channel, "inbox");
    assert_eq!(m.sender, "alice@example.com");
    assert_eq!(m.body, "hello there");
    assert_eq!(
        m.from,
        Who {
            id: 4,
            role: "channel".into(),
            profile: "adapter".into()
        }
    );
    assert!(m.ts.ends_with('Z') && m.ts.len() > 20, "{}", m.ts);
    // The body is in no audit record; reads are not audited.
    let text = fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default();
    assert!(!text.contains("hello there"), "{text}");
    assert_eq!(audit_lines(&env).len(), 2);
}

#[tokio::test]
async fn deliver_is_denied_alike_for_another_profiles_channel_and_no_channel() {
    let env = setup();
    let a = adapter();
    let mut refusals = Vec::new();
    for channel in ["other", "nope"] {
        let r = env
            .ops
            .deliver(&a, channel, "alice", "hi".to_string())
            .await;
        let e = err_of(&r);
        assert_eq!(e.code, ErrorCode::Denied, "{channel}");
        refusals.push(e.message.replace(channel, "CHANNEL"));
        let rec = last_audit(&env);
        assert_eq!(rec["op"], "deliver");
        assert_eq!(rec["decision"], "deny");
        assert_eq!(rec["target"], format!("{channel}:alice"));
    }
    assert_eq!(refusals[0], refusals[1], "one answer for both");
    // `channels` (send) is not `deliver`; no broker section, no deliver at all.
    for p in ["tool", "gw", "nobroker"] {
        let r = env
            .ops
            .deliver(&who(p, 9), "inbox", "alice", "hi".into())
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{p}");
    }
    // Another profile's adapter delivers on its own channel.
    let r = env
        .ops
        .deliver(&who("otheradapter", 5), "other", "bob", "hi".into())
        .await;
    assert_eq!(seq_of(&r), 1);
    // Nothing of the refused ones was queued.
    let (messages, _) = inbound_of(&env.ops.inbound(&gw(), 0, 0).await);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].channel, "other");
}

#[tokio::test]
async fn deliver_checks_the_sender() {
    let env = setup();
    let a = adapter();
    for bad in ["", "bob\nsmith", "tab\there", "\u{7f}", &"x".repeat(257)] {
        let r = env.ops.deliver(&a, "inbox", bad, "hi".into()).await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest, "{bad:?}");
        assert_eq!(last_audit(&env)["decision"], "error");
    }
    assert!(bad_sender(&"é".repeat(128)).is_none(), "256 bytes");
    assert!(bad_sender(&"é".repeat(129)).is_some(), "258 bytes");
    for good in ["alice@example.com", "Bob Smith (@bob)", &"x".repeat(256)] {
        let r = env.ops.deliver(&a, "inbox", good, "hi".into()).await;
        assert!(seq_of(&r) > 0, "{good:?}");
    }
    assert_eq!(env.ops.inbound.len(), 3);
}

#[tokio::test]
async fn deliver_over_max_bytes_is_too_large() {
    let env = setup();
    let body = "y".repeat(101);
    let r = deliver(&env, &body).await;
    let e = err_of(&r);
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert!(e.message.contains("max_bytes 100"), "{}", e.message);
    let rec = last_audit(&env);
    assert_eq!(rec["decision"], "deny");
    assert!(!rec.to_string().contains(&body));
    assert_eq!(env.ops.inbound.len(), 0);
    assert_eq!(seq_of(&deliver(&env, &"y".repeat(100)).await), 1);
    // Under max_bytes, but over one reply frame once encoded (each control character
    // takes six bytes in JSON): it could never be read, so it is refused.
    let escaped = "\u{1}".repeat(20_000);
    let r = env.ops.deliver(&adapter(), "big", "alice", escaped).await;
    assert_eq!(err_of(&r).code, ErrorCode::TooLarge);
    assert_eq!(env.ops.inbound.len(), 1);
}

#[tokio::test]
async fn a_full_queue_answers_busy_and_loses_nothing() {
    let env = setup_capacity(3);
    for (i, body) in ["m1", "m2", "m3"].iter().enumerate() {
        assert_eq!(seq_of(&deliver(&env, body).await), i as u64 + 1);
    }
    let r = deliver(&env, "m4").await;
    let e = err_of(&r);
    assert_eq!(e.code, ErrorCode::Busy);
    assert!(e.message.contains("try again"), "{}", e.message);
    let rec = last_audit(&env);
    assert_eq!(rec["op"], "deliver");
    assert_eq!(rec["outcome"], "queue full");
    assert_eq!(env.ops.inbound.len(), 3, "nothing queued");
    // Reading alone frees nothing; acknowledging does.
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 0, 0).await);
    assert_eq!((seqs(&m), next), (vec![1, 2, 3], 3));
    assert_eq!(err_of(&deliver(&env, "m4").await).code, ErrorCode::Busy);
    let (m, _) = inbound_of(&env.ops.inbound(&gw(), 2, 0).await);
    assert_eq!(seqs(&m), [3]);
    // The adapter tries again: now there is room, for two.
    assert_eq!(seq_of(&deliver(&env, "m4").await), 4);
    assert_eq!(seq_of(&deliver(&env, "m5").await), 5);
    assert_eq!(err_of(&deliver(&env, "m6").await).code, ErrorCode::Busy);
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 2, 0).await);
    let bodies: Vec<&str> = m.iter().map(|m| m.body.as_str()).collect();
    assert_eq!((bodies, next), (vec!["m3", "m4", "m5"], 5));
}

#[tokio::test]
async fn inbound_needs_the_key() {
    let env = setup();
    assert_eq!(seq_of(&deliver(&env, "secret plans").await), 1);
    for p in ["adapter", "tool", "nobroker"] {
        let r = env.ops.inbound(&who(p, 9), 0, 0).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{p}");
        let rec = last_audit(&env);
        assert_eq!(rec["op"], "inbound");
        assert_eq!(rec["decision"], "deny");
    }
    // A refused read acknowledges nothing either.
    let r = env.ops.inbound(&who("adapter", 4), 1, 0).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert_eq!(env.ops.inbound.len(), 1);
}

#[tokio::test]
async fn reading_acknowledges_by_cursor() {
    let env = setup();
    for b in ["a", "b", "c"] {
        deliver(&env, b).await;
    }
    // after 1: 1 is acknowledged, 2 and 3 come.
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 1, 0).await);
    assert_eq!((seqs(&m), next), (vec![2, 3], 3));
    // A restarted reader (after 0) gets only what is not acknowledged.
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 0, 0).await);
    assert_eq!((seqs(&m), next), (vec![2, 3], 3));
    // The same cursor twice: nothing older than it, ever.
    for _ in 0..2 {
        let (m, _) = inbound_of(&env.ops.inbound(&gw(), 2, 0).await);
        assert_eq!(seqs(&m), [3]);
    }
    // Reading up to the last one leaves nothing; the next message is 4.
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 3, 0).await);
    assert_eq!((m.len(), next), (0, 3));
    assert_eq!(env.ops.inbound.len(), 0);
    assert_eq!(seq_of(&deliver(&env, "d").await), 4);
    // A reload keeps the queue and its numbering.
    let policy = Policy::parse(POLICY, "inbound.toml").unwrap_or_else(|e| panic!("{e}"));
    env.ops.reload(policy).unwrap_or_else(|e| panic!("{e}"));
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 0, 0).await);
    assert_eq!((seqs(&m), next), (vec![4], 4));
    // A cursor past every seq ever issued is a mistake, answered as such (nothing removed).
    let e = err_of(&env.ops.inbound(&gw(), 5, 0).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("read again from 0"), "{}", e.message);
    assert_eq!(env.ops.inbound.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_as_soon_as_a_message_is_delivered() {
    let env = setup();
    let ops = env.ops.clone();
    let start = Instant::now();
    let poll = tokio::spawn(async move { ops.inbound(&gw(), 0, 10_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !poll.is_finished(),
        "the poll waits while the queue is empty"
    );
    assert_eq!(seq_of(&deliver(&env, "wake up").await), 1);
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap_or_else(|_| panic!("the poll did not return"))
        .unwrap_or_else(|e| panic!("{e}"));
    let elapsed = start.elapsed();
    let (m, next) = inbound_of(&r);
    assert_eq!((seqs(&m), next), (vec![1], 1));
    assert_eq!(m[0].body, "wake up");
    assert!(
        elapsed < Duration::from_secs(3),
        "{elapsed:?}: not well under 10 s"
    );
    // A poll whose messages were all acknowledged waits for the next one, not for old ones.
    let ops = env.ops.clone();
    let poll = tokio::spawn(async move { ops.inbound(&gw(), 1, 10_000).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poll.is_finished());
    deliver(&env, "next").await;
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap_or_else(|_| panic!("the poll did not return"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seqs(&inbound_of(&r).0), [2]);
}

#[tokio::test]
async fn a_long_poll_times_out_empty() {
    let env = setup();
    let start = Instant::now();
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 0, 300).await);
    let elapsed = start.elapsed();
    assert_eq!((m.len(), next), (0, 0));
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // wait_ms 0 answers at once.
    let start = Instant::now();
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 0, 0).await);
    assert_eq!((m.len(), next), (0, 0));
    assert!(start.elapsed() < Duration::from_millis(200));
    // With messages acknowledged, an empty answer keeps the cursor.
    deliver(&env, "x").await;
    let (m, next) = inbound_of(&env.ops.inbound(&gw(), 1, 50).await);
    assert_eq!((m.len(), next), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_wait_is_capped_and_a_dropped_poll_leaves_the_queue_alone() {
    let env = setup();
    // u64::MAX milliseconds would overflow an Instant: it is cut to 30 s.
    let ops = env.ops.clone();
    let poll = tokio::spawn(async move { ops.inbound(&gw(), 0, u64::MAX).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poll.is_finished());
    // Dropped mid-wait (the peer went away): the queue works on.
    poll.abort();
    assert!(poll.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(seq_of(&deliver(&env, "after the drop").await), 1);
    let (m, _) = inbound_of(&env.ops.inbound(&gw(), 0, u64::MAX).await);
    assert_eq!(seqs(&m), [1]);
}

#[tokio::test]
async fn the_frame_cap_splits_a_large_backlog_across_reads() {
    let env = setup();
    let a = adapter();
    for i in 0..7u8 {
        let body = char::from(b'a' + i).to_string().repeat(20_000);
        let r = env.ops.deliver(&a, "big", "alice", body).await;
        assert_eq!(seq_of(&r), u64::from(i) + 1);
    }
    let mut after = 0;
    let mut got = Vec::new();
    let mut reads = 0;
    loop {
        let r = env.ops.inbound(&gw(), after, 0).await;
        // The reply, with the longest id there is, fits one frame.
        let bytes = encode_reply(u64::MAX, &r.reply).unwrap_or_else(|e| panic!("{e}"));
        assert!(bytes.len() <= MAX_FRAME, "{}", bytes.len());
        let (m, next) = inbound_of(&r);
        if m.is_empty() {
            assert_eq!(next, after);
            break;
        }
        assert_eq!(
            m.len(),
            3.min(7 - got.len()),
            "three of 20 000 bytes fit a frame"
        );
        assert_eq!(next, m[m.len() - 1].seq);
        got.extend(m);
        after = next;
        reads += 1;
    }
    assert_eq!(reads, 3);
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5, 6, 7]);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, m)| m.body.len() == 20_000 && m.body.starts_with(char::from(b'a' + i as u8))));
}

#[tokio::test]
async fn audit_failure_queues_nothing() {
    let env = setup();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(env.dir.join("audit.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all(b"{\"torn").unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    let r = deliver(&env, "unrecorded").await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
    assert_eq!(env.ops.inbound.len(), 0);
    // The place it had reserved is free again.
    let st = lock(&env.ops.inbound.state);
    assert_eq!(st.reserved, 0);
    assert_eq!(st.next_seq, 1, "no seq spent");
}

#[tokio::test]
async fn the_handler_dispatches_deliver_and_inbound() {
    let env = setup();
    let h: Arc<dyn Handler> = env.ops.clone();
    let r = h
        .handle(
            &adapter(),
            Request::Deliver {
                channel: "inbox".into(),
                sender: "alice".into(),
                body: "via the handler".into(),
                id: None,
                conversation: None,
                reply_to: None,
            },
        )
        .await;
    assert_eq!(seq_of(&r), 1);
    assert!(r.fds.is_empty());
    let r = h
        .handle(
            &gw(),
            Request::Inbound {
                after: 0,
                wait_ms: 0,
            },
        )
        .await;
    assert_eq!(inbound_of(&r).0[0].body, "via the handler");
}
