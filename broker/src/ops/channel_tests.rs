//! Tests of the channel behaviour: the sender allowlist (queued / held), admission, the
//! idempotency of deliver and send, the adapter outbox (leases, retries, dead letters), the
//! channel figures, and that all of it survives a restart of the broker on the same state
//! directory (a torn or garbage file is skipped, not fatal).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_policy::Policy;

use super::*;
use crate::audit::AuditLog;
use crate::client::DeliverArgs;
use crate::dlq::DeadLetters;
use crate::protocol::{
    AckStatus, DeliverStatus, ErrorBody, InboundMessage, OutboundMessage, Reply, SendOutcome,
    SendStatus,
};
use crate::server::{Identity, Role};

const SECRET: &str = "s3cr3t-VALUE-0042";

fn policy_text(dir: &Path) -> String {
    format!(
        r##"
version = 1
[profiles.tg]
why = "the telegram adapter"
[profiles.tg.broker]
deliver = ["telegram", "inbox"]
[profiles.gw]
why = "the gateway, relaying operators"
[profiles.gw.broker]
inbound = true
approve = true
channels = ["telegram", "inbox", "mail"]
[profiles.gwplain]
why = "a gateway that may not approve"
[profiles.gwplain.broker]
inbound = true
[profiles.mailer]
why = "the mail adapter"
[profiles.mailer.broker]
deliver = ["mail"]
[secrets.key]
why = "a credential"
file = "{d}/key"
[channels.telegram]
why = "chat"
kind = "adapter"
recipients = ["111"]
senders = ["111", "*@example.com"]
reply_to_senders = true
retry = {{ attempts = 3, initial_delay = "1s", max_delay = "2s" }}
[channels.inbox]
why = "a file channel"
kind = "file"
path = "{d}/inbox.log"
recipients = ["*"]
[channels.mail]
why = "mail, no retries"
kind = "adapter"
recipients = ["*"]
retry = {{ attempts = 1 }}
"##,
        d = dir.display()
    )
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ops: Arc<Ops>,
}

fn build(dir: &Path) -> Ops {
    let policy =
        Policy::parse(&policy_text(dir), "channels.toml").unwrap_or_else(|e| panic!("{e}"));
    let audit = AuditLog::open(dir.join("audit.log")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = DeadLetters::open(dir.join("dlq")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = OpsConfig {
        credentials_dir: None,
        state_dir: Some(dir.join("state")),
        ..OpsConfig::default()
    };
    Ops::new(policy, audit, dlq, None, None, cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn setup() -> Env {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().to_path_buf();
    let key = dir.join("key");
    fs::write(&key, SECRET).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    let ops = Arc::new(build(&dir));
    Env {
        _tmp: tmp,
        dir,
        ops,
    }
}

impl Env {
    /// Drop the broker and start a new one on the same state directory.
    fn restart(&mut self) {
        let ops = Arc::new(build(&self.dir));
        self.ops = ops;
    }
}

fn who(profile: &str) -> Identity {
    Identity {
        id: 7,
        role: if profile == "tg" || profile == "mailer" {
            Role::Channel
        } else {
            Role::Gateway
        },
        profile: profile.to_string(),
    }
}

fn err_of(r: &Response) -> ErrorBody {
    match &r.reply {
        Reply::Err(e) => e.clone(),
        Reply::Ok(ok) => panic!("expected an error, got {ok:?}"),
    }
}

fn deliver_of(r: &Response) -> (u64, DeliverStatus, Option<String>) {
    match &r.reply {
        Reply::Ok(OkReply::Deliver { seq, status, held }) => (*seq, *status, held.clone()),
        other => panic!("expected a deliver reply, got {other:?}"),
    }
}

fn send_of(r: &Response) -> (SendStatus, Option<String>, Option<String>) {
    match &r.reply {
        Reply::Ok(OkReply::Send {
            status,
            dlq_id,
            outbox_id,
        }) => (*status, dlq_id.clone(), outbox_id.clone()),
        other => panic!("expected a send reply, got {other:?}"),
    }
}

fn outbox_of(r: &Response) -> Vec<OutboundMessage> {
    match &r.reply {
        Reply::Ok(OkReply::Outbox { messages }) => messages.clone(),
        other => panic!("expected an outbox reply, got {other:?}"),
    }
}

fn ack_of(r: &Response) -> (AckStatus, Option<String>, Option<u64>) {
    match &r.reply {
        Reply::Ok(OkReply::OutboxAck {
            status,
            dlq_id,
            retry_in_ms,
        }) => (*status, dlq_id.clone(), *retry_in_ms),
        other => panic!("expected an outbox_ack reply, got {other:?}"),
    }
}

fn audit_text(env: &Env) -> String {
    fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default()
}

async fn deliver(env: &Env, channel: &str, sender: &str, id: Option<&str>, body: &str) -> Response {
    env.ops
        .deliver_message(
            &who("tg"),
            DeliverArgs {
                channel: channel.into(),
                sender: sender.into(),
                body: body.into(),
                id: id.map(str::to_string),
                conversation: None,
                reply_to: None,
            },
        )
        .await
}

async fn read_inbound(env: &Env, after: u64) -> Vec<InboundMessage> {
    match env.ops.inbound(&who("gw"), after, 0).await.reply {
        Reply::Ok(OkReply::Inbound { messages, .. }) => messages,
        other => panic!("expected an inbound reply, got {other:?}"),
    }
}

async fn send(env: &Env, channel: &str, to: &str, body: &str, key: Option<&str>) -> Response {
    env.ops
        .send_with(
            &who("gw"),
            channel,
            to,
            body.into(),
            Some("update:1".into()),
            key.map(str::to_string),
        )
        .await
}

async fn poll(env: &Env, channel: &str, wait_ms: u64) -> Vec<OutboundMessage> {
    outbox_of(&env.ops.outbox_op(&who("tg"), channel, wait_ms).await)
}

async fn ack(env: &Env, id: &str, outcome: SendOutcome) -> Response {
    env.ops
        .outbox_ack_op(&who("tg"), "telegram", id, outcome)
        .await
}

fn failed(retry: bool) -> SendOutcome {
    SendOutcome::Failed {
        error: "HTTP 502 from the service".into(),
        retry,
    }
}

#[tokio::test]
async fn admitted_senders_are_queued_and_the_rest_held() {
    let env = setup();
    let (seq, status, held) = deliver_of(&deliver(&env, "telegram", "111", None, "hi").await);
    assert_eq!((seq, status, held), (1, DeliverStatus::Queued, None));
    let (seq, status, held) =
        deliver_of(&deliver(&env, "telegram", "bob@example.com", Some("m2"), "by glob").await);
    assert_eq!((seq, status, held), (2, DeliverStatus::Queued, None));
    let (seq, status, held) = deliver_of(&deliver(&env, "telegram", "222", None, "who?").await);
    assert_eq!((seq, status), (0, DeliverStatus::Held));
    let held = held.unwrap_or_else(|| panic!("no held id"));
    // A channel without `senders` holds everyone.
    let (_, status, _) = deliver_of(&deliver(&env, "inbox", "111", None, "x").await);
    assert_eq!(status, DeliverStatus::Held);
    let m = read_inbound(&env, 0).await;
    assert_eq!(m.len(), 2);
    assert_eq!(
        (
            m[0].id.as_str(),
            m[0].conversation.as_str(),
            m[0].reply_to.as_str()
        ),
        ("seq:1", "111", "111"),
        "defaults: seq id, conversation = sender, reply_to = conversation"
    );
    assert_eq!(m[1].id, "m2");
    let h = env.ops.held_messages();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0].id.as_str(), h[0].sender.as_str(), h[0].body.as_str()),
        (held.as_str(), "222", "who?")
    );
    // Audited before acting, never the body.
    let log = audit_text(&env);
    assert!(log.contains("\"target\":\"telegram:222\""), "{log}");
    assert!(log.contains("\"outcome\":\"holding\""), "{log}");
    assert!(log.contains("sender admitted by `111`"), "{log}");
    assert!(!log.contains("who?") && !log.contains("by glob"), "{log}");
    let stats = env.ops.channel_stats();
    let tg = stats
        .iter()
        .find(|s| s.channel == "telegram")
        .unwrap_or_else(|| panic!("no stats"));
    assert_eq!((tg.queued, tg.held), (2, 1));
    assert!(tg.last_in.is_some());
}

#[tokio::test]
async fn deliver_checks_its_new_fields() {
    let env = setup();
    for (id, conv, reply) in [
        (Some(String::new()), None, None),
        (Some("x".repeat(257)), None, None),
        (None, Some("a\nb".to_string()), None),
        (None, None, Some("\u{7}".to_string())),
    ] {
        let r = env
            .ops
            .deliver_message(
                &who("tg"),
                DeliverArgs {
                    channel: "telegram".into(),
                    sender: "111".into(),
                    body: "b".into(),
                    id,
                    conversation: conv,
                    reply_to: reply,
                },
            )
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    }
    assert!(read_inbound(&env, 0).await.is_empty());
    // Another profile's channel: denied as before.
    let r = env
        .ops
        .deliver(&who("mailer"), "telegram", "111", "x".into())
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

#[tokio::test]
async fn a_repeated_message_id_is_taken_once() {
    let env = setup();
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "111", Some("update:5"), "a").await).1,
        DeliverStatus::Queued
    );
    let (seq, status, held) =
        deliver_of(&deliver(&env, "telegram", "111", Some("update:5"), "a").await);
    assert_eq!((seq, status, held), (0, DeliverStatus::Duplicate, None));
    // Held ones too; and ids are per channel.
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "999", Some("update:6"), "b").await).1,
        DeliverStatus::Held
    );
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "999", Some("update:6"), "b").await).1,
        DeliverStatus::Duplicate
    );
    assert_eq!(
        deliver_of(&deliver(&env, "inbox", "999", Some("update:5"), "c").await).1,
        DeliverStatus::Held
    );
    assert_eq!(read_inbound(&env, 0).await.len(), 1);
    assert_eq!(env.ops.held_messages().len(), 2);
    // Without an id every delivery counts.
    deliver(&env, "telegram", "111", None, "again").await;
    deliver(&env, "telegram", "111", None, "again").await;
    assert_eq!(read_inbound(&env, 0).await.len(), 3);
    assert!(audit_text(&env).contains("\"outcome\":\"duplicate\""));
}

#[tokio::test]
async fn inbound_bodies_are_stored_without_secret_values() {
    let env = setup();
    let body = format!("my key is {SECRET}, keep it");
    deliver(&env, "telegram", "111", None, &body).await;
    deliver(&env, "telegram", "333", None, &body).await;
    let m = read_inbound(&env, 0).await;
    assert_eq!(m[0].body, "my key is [REDACTED], keep it");
    assert_eq!(
        env.ops.held_messages()[0].body,
        "my key is [REDACTED], keep it"
    );
    for sub in ["state/inbound", "state/held"] {
        for f in fs::read_dir(env.dir.join(sub)).unwrap_or_else(|e| panic!("{e}")) {
            let text =
                fs::read_to_string(f.unwrap_or_else(|e| panic!("{e}")).path()).unwrap_or_default();
            assert!(!text.contains(SECRET), "{sub}: {text}");
            assert!(text.contains("[REDACTED]"), "{sub}: {text}");
        }
    }
}

#[tokio::test]
async fn admitting_once_or_for_good() {
    let env = setup();
    let held_of = |r: &Response| deliver_of(r).2.unwrap_or_else(|| panic!("not held"));
    let h1 = held_of(&deliver(&env, "telegram", "444", Some("a"), "first").await);
    // Only profiles with approve = true, and only held ids that exist.
    let r = env.ops.admit_op(&who("gwplain"), &h1, false, None).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let r = env.ops.held_op(&who("gwplain")).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let r = env
        .ops
        .admit_op(&who("gw"), "00000-nope", false, None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    let r = env
        .ops
        .admit_op(&who("gw"), &h1, false, Some("a\u{1}b".into()))
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    // Once: queued; the sender's next message is held again.
    let r = env
        .ops
        .admit_op(&who("gw"), &h1, false, Some("tok1".into()))
        .await;
    assert!(
        matches!(r.reply, Reply::Ok(OkReply::Admit { seq: 1 })),
        "{r:?}"
    );
    let m = read_inbound(&env, 0).await;
    assert_eq!(
        (m.len(), m[0].body.as_str(), m[0].id.as_str()),
        (1, "first", "a")
    );
    let h2 = held_of(&deliver(&env, "telegram", "444", Some("b"), "second").await);
    // For good (by the operator): queued, and the next one is queued at once.
    let seq = env
        .ops
        .admit_held(&h2, true, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seq, 2);
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "444", Some("c"), "third").await).1,
        DeliverStatus::Queued
    );
    assert!(
        env.ops.admit_held(&h2, true, None).is_err(),
        "gone once admitted"
    );
    // Per channel.
    assert_eq!(
        deliver_of(&deliver(&env, "inbox", "444", None, "x").await).1,
        DeliverStatus::Held
    );
    // Drop: through the op and by the operator.
    let h3 = env.ops.held_messages()[0].id.clone();
    let r = env
        .ops
        .drop_held_op(&who("gw"), &h3, Some("tok1".into()))
        .await;
    assert!(matches!(r.reply, Reply::Ok(OkReply::DropHeld {})), "{r:?}");
    assert!(env.ops.held_messages().is_empty());
    assert!(env.ops.drop_held("nope", None).is_err());
    let r = env.ops.held_op(&who("gw")).await;
    assert!(
        matches!(r.reply, Reply::Ok(OkReply::Held { ref held, omitted: 0 }) if held.is_empty()),
        "{r:?}"
    );
    let log = audit_text(&env);
    assert!(log.contains("\"op\":\"admit\""), "{log}");
    assert!(log.contains("\"op\":\"drop_held\""), "{log}");
    assert!(log.contains("by tok1 (as the child claims)"), "{log}");
}

#[tokio::test]
async fn send_on_an_adapter_channel_is_queued_once_per_key() {
    let env = setup();
    let (status, dlq, id) = send_of(&send(&env, "telegram", "111", "hello", Some("k1")).await);
    assert_eq!((status, dlq), (SendStatus::Queued, None));
    let id = id.unwrap_or_else(|| panic!("no outbox id"));
    let (status, _, again) = send_of(&send(&env, "telegram", "111", "hello", Some("k1")).await);
    assert_eq!((status, again), (SendStatus::Duplicate, None));
    assert_eq!(env.ops.outbox.len("telegram"), 1);
    // The same key on another channel is another send.
    assert_eq!(
        send_of(&send(&env, "mail", "x@example.com", "m", Some("k1")).await).0,
        SendStatus::Queued
    );
    // The existing checks still come first: a recipient outside the allowlist is dead-lettered.
    assert_eq!(
        send_of(&send(&env, "telegram", "222", "hello", None).await).0,
        SendStatus::DeadLettered
    );
    // The outbox entry carries what the adapter needs.
    let m = poll(&env, "telegram", 0).await;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (
            m[0].id.as_str(),
            m[0].recipient.as_str(),
            m[0].body.as_str(),
            m[0].in_reply_to.as_deref(),
            m[0].attempt
        ),
        (id.as_str(), "111", "hello", Some("update:1"), 1)
    );
    // File channels work as before.
    assert_eq!(
        send_of(&send(&env, "inbox", "#ops", "to the file", None).await).0,
        SendStatus::Delivered
    );
    assert!(fs::read_to_string(env.dir.join("inbox.log"))
        .unwrap_or_default()
        .contains("to the file"));
    let r = send(&env, "telegram", "111", "x", Some("")).await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    assert!(audit_text(&env).contains("\"outcome\":\"queuing\""));
}

#[tokio::test]
async fn reply_to_senders_opens_the_reply_address_of_admitted_senders_only() {
    let env = setup();
    // Queued from an admitted sender, replies go to its chat.
    env.ops
        .deliver_message(
            &who("tg"),
            DeliverArgs {
                channel: "telegram".into(),
                sender: "alice@example.com".into(),
                body: "hi".into(),
                id: None,
                conversation: Some("-100987".into()),
                reply_to: None,
            },
        )
        .await;
    assert_eq!(
        send_of(&send(&env, "telegram", "-100987", "answer", None).await).0,
        SendStatus::Queued
    );
    // Held: its address is not opened.
    deliver(&env, "telegram", "555", None, "spam").await;
    assert_eq!(
        send_of(&send(&env, "telegram", "555", "answer", None).await).0,
        SendStatus::DeadLettered
    );
    // A channel without reply_to_senders does not open it either (mail has recipients "*",
    // so use the file channel inbox, whose allowlist is "*" too: nothing to show there);
    // instead: the telegram address is not valid on mail's book.
    assert!(!env.ops.book.is_reply_address("mail", "-100987"));
}

#[tokio::test]
async fn the_outbox_leases_retries_and_dead_letters() {
    let env = setup();
    let id = send_of(&send(&env, "telegram", "111", "hello", None).await)
        .2
        .unwrap_or_default();
    let m = poll(&env, "telegram", 0).await;
    assert_eq!((m.len(), m[0].attempt), (1, 1));
    // Leased: not handed out again.
    assert!(poll(&env, "telegram", 0).await.is_empty());
    // A lease that ran out: due again.
    env.ops.outbox.expire_leases("telegram");
    assert_eq!(poll(&env, "telegram", 0).await.len(), 1);
    // Failed, retry: backoff from the channel's policy (1 s, then 2 s).
    let (status, dlq, wait) = ack_of(&ack(&env, &id, failed(true)).await);
    assert_eq!((status, dlq, wait), (AckStatus::Retrying, None, Some(1000)));
    assert!(poll(&env, "telegram", 0).await.is_empty(), "not due yet");
    // The long poll wakes when it comes due.
    let start = Instant::now();
    let m = poll(&env, "telegram", 5000).await;
    assert_eq!((m.len(), m[0].attempt), (1, 2));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let (status, _, wait) = ack_of(&ack(&env, &id, failed(true)).await);
    assert_eq!((status, wait), (AckStatus::Retrying, Some(2000)));
    // The third try is the last (attempts = 3): dead-lettered with the service's error.
    let (status, dlq, _) = ack_of(&ack(&env, &id, failed(true)).await);
    assert_eq!(status, AckStatus::DeadLettered);
    let dlq = dlq.unwrap_or_else(|| panic!("no dlq id"));
    let letter = env
        .ops
        .dead_letters()
        .get(&dlq)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        letter.reason.contains("HTTP 502 from the service"),
        "{}",
        letter.reason
    );
    assert_eq!(env.ops.outbox.len("telegram"), 0);
    // Gone: an ack for it is not_found.
    assert_eq!(
        err_of(&ack(&env, &id, failed(true)).await).code,
        ErrorCode::NotFound
    );
    // retry = false: dead-lettered at once.
    let id = send_of(&send(&env, "telegram", "111", "again", None).await)
        .2
        .unwrap_or_default();
    assert_eq!(
        ack_of(&ack(&env, &id, failed(false)).await).0,
        AckStatus::DeadLettered
    );
    // Sent: removed, audited, counted.
    let id = send_of(&send(&env, "telegram", "111", "third", None).await)
        .2
        .unwrap_or_default();
    let r = ack(
        &env,
        &id,
        SendOutcome::Sent {
            service_id: Some("42".into()),
        },
    )
    .await;
    assert_eq!(ack_of(&r), (AckStatus::Done, None, None));
    assert_eq!(env.ops.outbox.len("telegram"), 0);
    let log = audit_text(&env);
    for o in [
        "\"outcome\":\"sent\"",
        "\"outcome\":\"retrying\"",
        "\"outcome\":\"dead-lettering\"",
    ] {
        assert!(log.contains(o), "{o}: {log}");
    }
    assert!(!log.contains("hello") && !log.contains("third"), "{log}");
    let stats = env.ops.channel_stats();
    let tg = stats
        .iter()
        .find(|s| s.channel == "telegram")
        .unwrap_or_else(|| panic!("no stats"));
    assert_eq!((tg.outbox, tg.dead_lettered), (0, 2));
    assert!(tg.last_out.is_some());
}

#[tokio::test]
async fn a_long_outbox_poll_returns_when_a_send_is_queued() {
    let env = setup();
    let ops = env.ops.clone();
    let start = Instant::now();
    let waiting = tokio::spawn(async move { ops.outbox_op(&who("tg"), "telegram", 10_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&env, "telegram", "111", "wake up", None).await;
    let r = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outbox_of(&r).len(), 1);
    assert!(start.elapsed() < Duration::from_secs(5));
    // With nothing due, it times out empty.
    assert!(poll(&env, "telegram", 100).await.is_empty());
}

#[tokio::test]
async fn outbox_ops_are_for_the_channels_adapter_only() {
    let env = setup();
    for (profile, channel) in [
        ("gw", "telegram"),
        ("mailer", "telegram"),
        ("tg", "inbox"),
        ("tg", "nope"),
    ] {
        let r = env.ops.outbox_op(&who(profile), channel, 0).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{profile} {channel}");
        let r = env
            .ops
            .outbox_ack_op(
                &who(profile),
                channel,
                "x",
                SendOutcome::Sent { service_id: None },
            )
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{profile} {channel}");
        let r = env
            .ops
            .channel_state_op(&who(profile), channel, true, None)
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{profile} {channel}");
    }
    // channel_state reaches channel_stats.
    let r = env
        .ops
        .channel_state_op(&who("tg"), "telegram", false, Some("HTTP 401\n".into()))
        .await;
    assert!(matches!(r.reply, Reply::Ok(OkReply::ChannelState {})));
    let stats = env.ops.channel_stats();
    let tg = stats
        .iter()
        .find(|s| s.channel == "telegram")
        .unwrap_or_else(|| panic!("no stats"));
    assert_eq!(
        (tg.connected, tg.error.as_deref()),
        (Some(false), Some("HTTP 401\\n"))
    );
    let mail = stats
        .iter()
        .find(|s| s.channel == "mail")
        .unwrap_or_else(|| panic!("no stats"));
    assert_eq!(mail.connected, None);
}

#[tokio::test]
async fn a_released_dead_letter_goes_back_into_the_outbox() {
    let env = setup();
    let r = send(&env, "telegram", "999", "not allowlisted", None).await;
    let (status, dlq, _) = send_of(&r);
    assert_eq!(status, SendStatus::DeadLettered);
    let dlq = dlq.unwrap_or_default();
    let ops = env.ops.clone();
    tokio::task::spawn_blocking(move || ops.release_dead_letter(&dlq))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let m = poll(&env, "telegram", 0).await;
    assert_eq!(
        (m.len(), m[0].recipient.as_str(), m[0].attempt),
        (1, "999", 1)
    );
    assert!(env
        .ops
        .dead_letters()
        .list()
        .unwrap_or_else(|e| panic!("{e}"))
        .letters
        .is_empty());
}

#[tokio::test]
async fn a_restart_keeps_queued_held_outbox_admitted_and_seen() {
    let mut env = setup();
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "111", Some("q1"), "queued").await).0,
        1
    );
    let held = deliver_of(&deliver(&env, "telegram", "777", Some("h1"), "held").await)
        .2
        .unwrap_or_default();
    let h2 = deliver_of(&deliver(&env, "telegram", "888", Some("h2"), "admit me").await)
        .2
        .unwrap_or_default();
    env.ops
        .admit_held(&h2, true, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = send_of(&send(&env, "telegram", "111", "outbound", Some("k9")).await)
        .2
        .unwrap_or_default();
    let retried = send_of(&send(&env, "telegram", "111", "retried", None).await)
        .2
        .unwrap_or_default();
    poll(&env, "telegram", 0).await;
    ack(&env, &retried, failed(true)).await;

    env.restart();
    // Queued messages, with their seqs.
    let m = read_inbound(&env, 0).await;
    assert_eq!(
        m.iter().map(|m| (m.seq, m.id.as_str())).collect::<Vec<_>>(),
        [(1, "q1"), (2, "h2")]
    );
    // Held.
    let h = env.ops.held_messages();
    assert_eq!(
        h.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        [held.as_str()]
    );
    // Admitted for good.
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "888", None, "again").await).1,
        DeliverStatus::Queued
    );
    // Seen ids and keys.
    for id in ["q1", "h1", "h2"] {
        assert_eq!(
            deliver_of(&deliver(&env, "telegram", "111", Some(id), "x").await).1,
            DeliverStatus::Duplicate,
            "{id}"
        );
    }
    assert_eq!(
        send_of(&send(&env, "telegram", "111", "outbound", Some("k9")).await).0,
        SendStatus::Duplicate
    );
    // The outbox: leases are gone (due at once), the retry keeps its attempt count and time.
    let m = poll(&env, "telegram", 0).await;
    assert_eq!(
        m.iter()
            .map(|m| (m.id.as_str(), m.attempt))
            .collect::<Vec<_>>(),
        [(out.as_str(), 1)]
    );
    let m = poll(&env, "telegram", 3000).await;
    assert_eq!(
        m.iter()
            .map(|m| (m.id.as_str(), m.attempt))
            .collect::<Vec<_>>(),
        [(retried.as_str(), 2)]
    );
    // Seqs continue, also once everything was acknowledged.
    let m = read_inbound(&env, 3).await;
    assert!(m.is_empty());
    env.restart();
    assert!(
        read_inbound(&env, 0).await.is_empty(),
        "acknowledged messages stay gone"
    );
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "111", None, "next").await).0,
        4
    );
}

#[tokio::test]
async fn torn_and_garbage_state_files_are_skipped_not_fatal() {
    let mut env = setup();
    deliver(&env, "telegram", "111", Some("good"), "good").await;
    deliver(&env, "telegram", "999", Some("held"), "held").await;
    send(&env, "telegram", "111", "out", None).await;
    let state = env.dir.join("state");
    fs::write(
        state.join("inbound/00000000000000000099.json"),
        b"{\"seq\": 99, \"chan",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    fs::write(state.join("held/1-garbage.json"), b"\xff\xfe not json")
        .unwrap_or_else(|e| panic!("{e}"));
    fs::write(state.join("outbox/telegram/2-garbage.json"), b"[]")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut j = fs::OpenOptions::new()
        .append(true)
        .open(state.join("channels.jsonl"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::io::Write::write_all(&mut j, b"garbage\n{\"t\":\"adm").unwrap_or_else(|e| panic!("{e}"));
    drop(j);
    env.restart();
    let m = read_inbound(&env, 0).await;
    assert_eq!(
        m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["good"]
    );
    assert_eq!(env.ops.held_messages().len(), 1);
    assert_eq!(poll(&env, "telegram", 0).await.len(), 1);
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "111", Some("good"), "x").await).1,
        DeliverStatus::Duplicate
    );
    // The bad files are left for the operator.
    assert!(state.join("held/1-garbage.json").exists());
    // New state is written after the cut journal line.
    deliver(&env, "telegram", "111", Some("after"), "y").await;
    env.restart();
    assert_eq!(
        deliver_of(&deliver(&env, "telegram", "111", Some("after"), "y").await).1,
        DeliverStatus::Duplicate
    );
}

#[tokio::test]
async fn ids_and_keys_of_stored_messages_count_even_without_the_journal() {
    // A crash between storing a message and journaling its id: the stores still know it.
    let mut env = setup();
    deliver(&env, "telegram", "111", Some("q"), "queued").await;
    deliver(&env, "telegram", "999", Some("h"), "held").await;
    send(&env, "telegram", "111", "out", Some("k")).await;
    fs::remove_file(env.dir.join("state/channels.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    env.restart();
    for id in ["q", "h"] {
        let r = deliver(&env, "telegram", "111", Some(id), "again").await;
        assert_eq!(deliver_of(&r).1, DeliverStatus::Duplicate, "{id}");
    }
    let r = send(&env, "telegram", "111", "out", Some("k")).await;
    assert_eq!(send_of(&r).0, SendStatus::Duplicate);
    // Seqs still continue after the queued message.
    let r = deliver(&env, "telegram", "111", None, "new").await;
    assert_eq!(deliver_of(&r).0, 2);
}

fn ok_of(r: &Response) -> OkReply {
    match &r.reply {
        Reply::Ok(ok) => ok.clone(),
        Reply::Err(e) => panic!("expected ok, got {e:?}"),
    }
}

#[tokio::test]
async fn dead_letters_are_listed_released_and_dropped_by_an_approving_profile_only() {
    let env = setup();
    for body in ["first", "second"] {
        let (status, _, _) = send_of(&send(&env, "telegram", "999", body, None).await);
        assert_eq!(status, SendStatus::DeadLettered);
    }
    // Not for a profile without approve = true: refused and audited.
    let r = env.ops.dead_letters_op(&who("gwplain")).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let r = env
        .ops
        .dlq_drop_op(&who("gwplain"), "x", Some("tok".into()))
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);

    let OkReply::DeadLetters {
        letters,
        omitted,
        unreadable,
    } = ok_of(&env.ops.dead_letters_op(&who("gw")).await)
    else {
        panic!("not a dead_letters reply")
    };
    assert_eq!((letters.len(), omitted, unreadable), (2, 0, 0));
    assert_eq!(
        (letters[0].body.as_str(), letters[0].recipient.as_str()),
        ("first", "999")
    );
    assert_eq!(letters[0].who.profile, "gw");

    // Release the first: it goes to the outbox; drop the second.
    let r = env
        .ops
        .dlq_release_op(&who("gw"), &letters[0].id, Some("token 1 (ops)".into()))
        .await;
    assert!(matches!(ok_of(&r), OkReply::DlqRelease {}));
    let m = poll(&env, "telegram", 0).await;
    assert_eq!((m.len(), m[0].body.as_str()), (1, "first"));
    let r = env
        .ops
        .dlq_drop_op(&who("gw"), &letters[1].id, Some("token 1 (ops)".into()))
        .await;
    assert!(matches!(ok_of(&r), OkReply::DlqDrop {}));
    let OkReply::DeadLetters { letters: left, .. } =
        ok_of(&env.ops.dead_letters_op(&who("gw")).await)
    else {
        panic!("not a dead_letters reply")
    };
    assert!(left.is_empty());
    // Unknown ids and a bad `by`.
    let r = env.ops.dlq_drop_op(&who("gw"), &letters[1].id, None).await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    let r = env
        .ops
        .dlq_release_op(&who("gw"), "../etc", Some("x".into()))
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    let r = env
        .ops
        .dlq_drop_op(&who("gw"), "x", Some("a\nb".into()))
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    // Audited as the gateway, with the name it gave.
    let audit = fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default();
    let release = audit
        .lines()
        .find(|l| l.contains("\"op\":\"dlq_release\""))
        .unwrap_or_else(|| panic!("no dlq_release record in {audit}"));
    assert!(
        release.contains("\"profile\":\"gw\"")
            && release.contains("by token 1 (ops) (as the child claims)"),
        "{release}"
    );
    assert!(audit.contains("\"op\":\"dlq_drop\""));
}

#[tokio::test]
async fn the_audit_log_is_queried_newest_first_with_filters() {
    let env = setup();
    let _ = send(&env, "telegram", "999", "refused", None).await;
    let _ = send(&env, "telegram", "111", "fine", None).await;
    let _ = env.ops.held_op(&who("gwplain")).await;
    let q = |op: Option<&str>, decision: Option<AuditDecision>, limit: u32| {
        let ops = env.ops.clone();
        let filter = crate::audit::query::Filter {
            op: op.map(str::to_string),
            decision,
            ..Default::default()
        };
        async move { ops.audit_query_op(&who("gw"), filter, limit).await }
    };
    let OkReply::AuditQuery { records, more } = ok_of(&q(None, None, 100).await) else {
        panic!("not an audit_query reply")
    };
    assert!(records.len() >= 3 && !more, "{records:?}");
    assert!(
        records.windows(2).all(|w| w[0].seq > w[1].seq),
        "newest first"
    );
    let OkReply::AuditQuery { records, more } = ok_of(&q(Some("send"), None, 100).await) else {
        panic!("not an audit_query reply")
    };
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(!more && records.iter().all(|r| r.op == "send"));
    let OkReply::AuditQuery { records, more } =
        ok_of(&q(Some("send"), Some(AuditDecision::Allow), 1).await)
    else {
        panic!("not an audit_query reply")
    };
    assert_eq!((records.len(), more), (1, false), "{records:?}");
    let OkReply::AuditQuery { records, more } = ok_of(&q(None, None, 1).await) else {
        panic!("not an audit_query reply")
    };
    assert_eq!((records.len(), more), (1, true));
    assert_eq!(err_of(&q(None, None, 0).await).code, ErrorCode::BadRequest);
    assert_eq!(
        err_of(&q(None, None, crate::protocol::MAX_AUDIT_QUERY + 1).await).code,
        ErrorCode::BadRequest
    );
    let r = env
        .ops
        .audit_query_op(&who("gwplain"), Default::default(), 10)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

#[tokio::test]
async fn the_channels_figures_go_to_an_approving_profile_only() {
    let env = setup();
    let _ = send(&env, "telegram", "999", "refused", None).await;
    let OkReply::Channels { channels } = ok_of(&env.ops.channels_op(&who("gw")).await) else {
        panic!("not a channels reply")
    };
    let tg = channels
        .iter()
        .find(|c| c.channel == "telegram")
        .unwrap_or_else(|| panic!("no telegram in {channels:?}"));
    assert_eq!(tg.dead_lettered, 1);
    let r = env.ops.channels_op(&who("gwplain")).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

#[tokio::test]
async fn the_children_come_from_the_service_to_an_approving_profile_only() {
    let env = setup();
    let OkReply::Children { children } = ok_of(&env.ops.children_op(&who("gw")).await) else {
        panic!("not a children reply")
    };
    assert!(children.is_empty(), "no service, no children");
    env.ops.set_children_source(Arc::new(|| {
        vec![crate::protocol::ChildSummary {
            name: "gateway".into(),
            role: "gateway".into(),
            profile: "gateway".into(),
            state: "running".into(),
            pid: Some(42),
            uptime_secs: Some(7),
            restarts: 1,
            last_exit: Some("exit=1".into()),
        }]
    }));
    let OkReply::Children { children } = ok_of(&env.ops.children_op(&who("gw")).await) else {
        panic!("not a children reply")
    };
    assert_eq!(
        (
            children.len(),
            children[0].state.as_str(),
            children[0].restarts
        ),
        (1, "running", 1)
    );
    let r = env.ops.children_op(&who("gwplain")).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}
