//! Tests of the operator's conversation: the answer parser, the identity check, announcements
//! (not doubled, kept across a restart) and answers through `deliver`.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carapace_policy::Policy;

use super::*;
use crate::approvals::Approvals;
use crate::audit::AuditLog;
use crate::dlq::DeadLetters;
use crate::ops::{OpsConfig, SpawnFailure, SpawnHandle, SpawnRequest, Spawner};
use crate::protocol::{ExitSummary, OutboundMessage, Reply, SendOutcome};
use crate::server::Role;

#[test]
fn answers_parse_in_their_forms_and_nothing_else_does() {
    let a = |verb, number| Some(Answer { verb, number });
    assert_eq!(parse_answer("allow 7"), a(Verb::Allow, 7));
    assert_eq!(parse_answer("ALLOW 7"), a(Verb::Allow, 7));
    assert_eq!(parse_answer("Allow #7"), a(Verb::Allow, 7));
    assert_eq!(parse_answer("  always   12  "), a(Verb::Always, 12));
    assert_eq!(parse_answer("deny\t3"), a(Verb::Deny, 3));
    assert_eq!(parse_answer("admit 3"), a(Verb::Admit, 3));
    assert_eq!(parse_answer("Drop #3"), a(Verb::Drop, 3));
    // The first non-blank line decides (an e-mail reply quotes the announcement below).
    assert_eq!(
        parse_answer("\n\nallow 7\r\n\n> Approval 7: a tool wants to run\n> deny 7"),
        a(Verb::Allow, 7)
    );
    // The subject line the e-mail adapter puts first is passed over (once).
    assert_eq!(
        parse_answer("Subject: Re: Approval 7\n\ndeny 7\n\nOn Monday the agent wrote:\n> allow 7"),
        a(Verb::Deny, 7)
    );
    assert_eq!(parse_answer("SUBJECT: allow 7\n\nthanks"), None);
    assert_eq!(parse_answer("Subject: x\nSubject: y\nallow 7"), None);
    assert_eq!(
        parse_answer(&format!("allow {}", u64::MAX)),
        a(Verb::Allow, u64::MAX)
    );
    for bad in [
        "",
        "   \n  ",
        "allow",
        "allow7",
        "allow 7 please",
        "please allow 7",
        "allow seven",
        "allow -7",
        "allow +7",
        "allow 0",
        "allow #",
        "allow ##7",
        "allow 7.0",
        "allow 0x7",
        "allow ７",
        "yes 7",
        "allowed 7",
        "allow-once 7",
        "hello\nallow 7",
        "allow 18446744073709551616",
        "allow 99999999999999999999999999999",
        "allow 000000000000000000001",
    ] {
        assert_eq!(parse_answer(bad), None, "{bad:?}");
    }
    assert_eq!(
        Answer {
            verb: Verb::Always,
            number: 4
        }
        .text(),
        "always 4"
    );
}

fn spec_of(text: &str, name: &str) -> ChannelSpec {
    let p = Policy::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let c = p
        .channels()
        .find(|c| c.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no channel {name}"));
    c
}

#[test]
fn only_the_configured_identity_on_its_channel_is_the_operator() {
    let text = r#"
version = 1
[channels.tg]
why = "chat"
kind = "adapter"
recipients = []
senders = ["111", "2*"]
operator = "111"
[channels.other]
why = "chat without an operator"
kind = "adapter"
recipients = []
senders = ["111"]
"#;
    let tg = spec_of(text, "tg");
    assert!(is_operator(&tg, "111"));
    for not in ["222", "1111", "11", " 111", "111 ", "", "2*", "*"] {
        assert!(!is_operator(&tg, not), "{not:?}");
    }
    // The same identity on a channel without an operator is nobody's operator.
    let other = spec_of(text, "other");
    assert!(!is_operator(&other, "111"));
}

// ---------------------------------------------------------------------------------------------
// Through the operations.

const OWNER: &str = "111";
const FRIEND: &str = "333";
const STRANGER: &str = "222";

fn policy_text() -> String {
    r#"
version = 1
[profiles.tg]
why = "the telegram adapter"
[profiles.tg.broker]
deliver = ["tg"]
[profiles.gw]
why = "the gateway"
[profiles.gw.broker]
inbound = true
exec = true
channels = ["tg"]
[channels.tg]
why = "the owner's chat"
kind = "adapter"
recipients = []
senders = ["111", "333"]
reply_to_senders = true
redact = ["hunter[0-9]+"]
operator = "111"
[[exec]]
why = "yes needs a person (hunter2 is redacted)"
program = "/usr/bin/yes"
profile = "gw"
approval = "ask"
"#
    .to_string()
}

struct NoopSpawner;

impl Spawner for NoopSpawner {
    fn spawn(&self, _req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure> {
        let (out_r, out_w) = nix::unistd::pipe().map_err(|e| SpawnFailure {
            message: e.to_string(),
        })?;
        let (err_r, err_w) = nix::unistd::pipe().map_err(|e| SpawnFailure {
            message: e.to_string(),
        })?;
        let wait = Box::new(move || {
            drop(out_w);
            drop(err_w);
            ExitSummary {
                exit: 0,
                code: Some(0),
                signal: None,
                wall_ms: 1,
                cpu_ms: 0,
                peak_mem: 0,
                oom: false,
                timeout: false,
            }
        });
        Ok(SpawnHandle {
            stdout: out_r,
            stderr: err_r,
            wait,
        })
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    ops: Arc<Ops>,
    approvals: Arc<Approvals>,
    dir: std::path::PathBuf,
}

fn build(dir: &Path) -> (Arc<Ops>, Arc<Approvals>) {
    let policy = Policy::parse(&policy_text(), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let audit = AuditLog::open(dir.join("audit.log")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = DeadLetters::open(dir.join("dlq")).unwrap_or_else(|e| panic!("{e}"));
    let approvals = Arc::new(
        Approvals::open(dir.join("state"), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let cfg = OpsConfig {
        credentials_dir: None,
        state_dir: Some(dir.join("state")),
        ..OpsConfig::default()
    };
    let ops = Ops::new(
        policy,
        audit,
        dlq,
        Some(Arc::new(NoopSpawner)),
        Some(approvals.clone()),
        cfg,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(ops), approvals)
}

fn setup() -> Env {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().to_path_buf();
    let (ops, approvals) = build(&dir);
    Env {
        _tmp: tmp,
        ops,
        approvals,
        dir,
    }
}

fn who(profile: &str, id: u64) -> Identity {
    Identity {
        id,
        role: if profile == "tg" {
            Role::Channel
        } else {
            Role::Gateway
        },
        profile: profile.to_string(),
    }
}

impl Env {
    /// What the adapter takes from the outbox now, reported sent.
    async fn take_outbox(&self) -> Vec<OutboundMessage> {
        let messages = match self.ops.outbox_op(&who("tg", 1), "tg", 0).await.reply {
            Reply::Ok(OkReply::Outbox { messages }) => messages,
            other => panic!("outbox: {other:?}"),
        };
        for m in &messages {
            let r = self
                .ops
                .outbox_ack_op(
                    &who("tg", 1),
                    "tg",
                    &m.id,
                    SendOutcome::Sent { service_id: None },
                )
                .await;
            assert!(matches!(r.reply, Reply::Ok(_)), "{:?}", r.reply);
        }
        messages
    }

    async fn deliver(&self, sender: &str, id: &str, body: &str) -> DeliverStatus {
        let d = DeliverArgs {
            channel: "tg".into(),
            sender: sender.into(),
            body: body.into(),
            id: Some(id.into()),
            conversation: None,
            reply_to: None,
        };
        match self.ops.deliver_message(&who("tg", 1), d).await.reply {
            Reply::Ok(OkReply::Deliver { status, .. }) => status,
            other => panic!("deliver: {other:?}"),
        }
    }

    async fn sync(&self) {
        let ops = self.ops.clone();
        tokio::task::spawn_blocking(move || ops.operator_sync())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn wait_pending(&self) {
        for _ in 0..500 {
            if !self.approvals.list().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no approval became pending");
    }
}

fn is_exec_ok(r: &Response) -> bool {
    matches!(r.reply, Reply::Ok(OkReply::Exec {}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_is_announced_once_and_only_the_operator_answers_it() {
    let env = setup();
    let ops = env.ops.clone();
    let asking = tokio::spawn(async move {
        ops.exec(&who("gw", 5), vec!["yes".into(), "hunter2".into()], None)
            .await
    });
    env.wait_pending().await;
    env.sync().await;
    env.sync().await;
    let out = env.take_outbox().await;
    assert_eq!(out.len(), 1, "announced once: {out:?}");
    let a = &out[0];
    assert_eq!(a.recipient, OWNER);
    let yes = fs::canonicalize("/usr/bin/yes").unwrap_or_else(|e| panic!("{e}"));
    assert!(a.body.starts_with("Approval 1: "), "{}", a.body);
    assert!(a.body.contains(&yes.display().to_string()), "{}", a.body);
    assert!(a.body.contains("profile: gw"), "{}", a.body);
    assert!(a.body.contains("yes needs a person"), "{}", a.body);
    assert!(a.body.contains("allow 1"), "{}", a.body);
    // The channel's redact patterns apply to what the broker writes too.
    assert!(!a.body.contains("hunter2"), "{}", a.body);
    assert!(a.body.contains("[REDACTED]"), "{}", a.body);
    let data: Vec<&str> = a.buttons.iter().map(|b| b.data.as_str()).collect();
    assert_eq!(data, ["allow 1", "always 1", "deny 1"]);

    // The same words from an admitted friend: an ordinary message for the agent.
    assert_eq!(
        env.deliver(FRIEND, "m1", "allow 1").await,
        DeliverStatus::Queued
    );
    // From a stranger: held, like any stranger's message.
    assert_eq!(
        env.deliver(STRANGER, "m2", "allow 1").await,
        DeliverStatus::Held
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        env.approvals.list().len(),
        1,
        "someone else's allow answered"
    );
    assert!(!asking.is_finished());

    // The owner's answer resolves it: the tool runs; the owner is told.
    assert_eq!(
        env.deliver(OWNER, "m3", "Allow #1").await,
        DeliverStatus::Answered
    );
    let r = tokio::time::timeout(Duration::from_secs(10), asking)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(is_exec_ok(&r), "{:?}", r.reply);
    // Redelivery of the same message: a duplicate, nothing answered twice.
    assert_eq!(
        env.deliver(OWNER, "m3", "allow 1").await,
        DeliverStatus::Duplicate
    );
    env.sync().await;
    let out = env.take_outbox().await;
    let bodies: Vec<&str> = out.iter().map(|m| m.body.as_str()).collect();
    // The held stranger is announced too; the confirmation went to the owner.
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("Approval 1: allowed once")),
        "{bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("Held message 2 on tg from 222")),
        "{bodies:?}"
    );
    assert!(out.iter().all(|m| m.recipient == OWNER), "{out:?}");

    // Audited as the operator's answer on that channel, by that identity.
    let audit = env.audit();
    let answers: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["op"] == "operator_answer")
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0]["target"], "tg:111");
    assert_eq!(answers[0]["decision"], "allow");
    assert_eq!(answers[0]["outcome"], "approval 1: allow-once");
    assert!(
        answers[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("\"allow 1\" from the operator of tg"),
        "{:?}",
        answers[0]
    );
    assert_eq!(answers[1]["outcome"], "duplicate");
    // The friend's words reached the agent's queue as a message; the owner's did not.
    let queued: Vec<String> = env
        .ops
        .inbound
        .messages()
        .iter()
        .map(|m| format!("{}:{}", m.sender, m.body))
        .collect();
    assert_eq!(queued, ["333:allow 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_persists_and_deny_refuses() {
    let env = setup();
    let ask = |env: &Env| {
        let ops = env.ops.clone();
        tokio::spawn(async move {
            ops.exec(&who("gw", 5), vec!["yes".into(), "y".into()], None)
                .await
        })
    };
    let first = ask(&env);
    env.wait_pending().await;
    env.sync().await;
    assert_eq!(env.take_outbox().await.len(), 1);
    assert_eq!(
        env.deliver(OWNER, "a1", "ALWAYS 1").await,
        DeliverStatus::Answered
    );
    assert!(is_exec_ok(&first.await.unwrap_or_else(|e| panic!("{e}"))));
    assert_eq!(env.approvals.grants().len(), 1);
    // The same request again: no question, no announcement.
    let again = ask(&env).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(is_exec_ok(&again));
    env.sync().await;
    let out = env.take_outbox().await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].body.starts_with("Approval 1: allowed always"),
        "{}",
        out[0].body
    );

    // Another request, denied from the chat.
    let ops = env.ops.clone();
    let other = tokio::spawn(async move {
        ops.exec(&who("gw", 5), vec!["yes".into(), "n".into()], None)
            .await
    });
    env.wait_pending().await;
    env.sync().await;
    let out = env.take_outbox().await;
    assert!(out[0].body.starts_with("Approval 2: "), "{}", out[0].body);
    // The wrong verb for an approval, and a number nothing has: told, nothing done.
    assert_eq!(
        env.deliver(OWNER, "a2", "admit 2").await,
        DeliverStatus::Answered
    );
    assert_eq!(
        env.deliver(OWNER, "a3", "deny 99").await,
        DeliverStatus::Answered
    );
    assert_eq!(env.approvals.list().len(), 1);
    assert_eq!(
        env.deliver(OWNER, "a4", "deny 2").await,
        DeliverStatus::Answered
    );
    let r = other.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(r.reply, Reply::Err(ref e) if e.code == ErrorCode::Denied),
        "{:?}",
        r.reply
    );
    let bodies: Vec<String> = env
        .take_outbox()
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(
        bodies[0].contains("2 is an approval: answer allow 2"),
        "{bodies:?}"
    );
    assert!(
        bodies[1].contains("Nothing waits as number 99"),
        "{bodies:?}"
    );
    assert!(bodies[2].starts_with("Approval 2: denied"), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_sender_is_announced_and_admitted_or_dropped_from_the_chat() {
    let mut env = setup();
    assert_eq!(
        env.deliver(STRANGER, "h1", "hello, let me in").await,
        DeliverStatus::Held
    );
    assert_eq!(
        env.deliver(STRANGER, "h2", "second").await,
        DeliverStatus::Held
    );
    env.sync().await;
    let out = env.take_outbox().await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].body.starts_with("Held message 1 on tg from 222"),
        "{}",
        out[0].body
    );
    assert!(out[0].body.contains("hello, let me in"), "{}", out[0].body);
    let data: Vec<&str> = out[1].buttons.iter().map(|b| b.data.as_str()).collect();
    assert_eq!(data, ["admit 2", "drop 2"]);

    // A restart of the broker: the numbers stay, nothing is announced again.
    let dir = env.dir.clone();
    let (ops, approvals) = build(&dir);
    env.ops = ops;
    env.approvals = approvals;
    env.sync().await;
    assert!(
        env.take_outbox().await.is_empty(),
        "announced again after a restart"
    );

    // The wrong verb, then the answers.
    assert_eq!(
        env.deliver(OWNER, "o1", "allow 1").await,
        DeliverStatus::Answered
    );
    assert_eq!(env.ops.held_messages().len(), 2);
    assert_eq!(
        env.deliver(OWNER, "o2", "admit 1").await,
        DeliverStatus::Answered
    );
    assert_eq!(
        env.deliver(OWNER, "o3", "drop 2").await,
        DeliverStatus::Answered
    );
    assert!(env.ops.held_messages().is_empty());
    let queued: Vec<String> = env
        .ops
        .inbound
        .messages()
        .iter()
        .map(|m| m.body.clone())
        .collect();
    assert_eq!(queued, ["hello, let me in"]);
    let bodies: Vec<String> = env
        .take_outbox()
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert!(
        bodies[0].contains("1 is a held message: answer admit 1 or drop 1"),
        "{bodies:?}"
    );
    assert!(
        bodies[1].starts_with("Held message 1 from 222: admitted"),
        "{bodies:?}"
    );
    assert!(
        bodies[2].starts_with("Held message 2 from 222: dropped"),
        "{bodies:?}"
    );
    // Numbers are not reused: the next held message is 3.
    assert_eq!(
        env.deliver(STRANGER, "h3", "third").await,
        DeliverStatus::Held
    );
    env.sync().await;
    let out = env.take_outbox().await;
    assert!(
        out[0].body.starts_with("Held message 3 "),
        "{}",
        out[0].body
    );
    // An answer to a number already answered.
    assert_eq!(
        env.deliver(OWNER, "o4", "admit 1").await,
        DeliverStatus::Answered
    );
    let out = env.take_outbox().await;
    assert!(
        out[0].body.contains("Nothing waits as number 1"),
        "{}",
        out[0].body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desk_task_announces_without_being_asked() {
    let env = setup();
    env.ops.start_operator_desk();
    assert_eq!(env.deliver(STRANGER, "h1", "hi").await, DeliverStatus::Held);
    let first = env.next_announcement().await;
    assert!(first.body.starts_with("Held message 1 "), "{}", first.body);
    // An ask is announced as soon as it waits (the approvals tell the desk), well before the
    // desk's periodic look.
    let ops = env.ops.clone();
    let asking = tokio::spawn(async move {
        ops.exec(&who("gw", 5), vec!["yes".into(), "y".into()], None)
            .await
    });
    env.wait_pending().await;
    let started = std::time::Instant::now();
    let second = env.next_announcement().await;
    assert!(second.body.starts_with("Approval 2: "), "{}", second.body);
    assert!(started.elapsed() < TICK, "{:?}", started.elapsed());
    // Answered from the chat, the desk forgets it (and the confirmation is all that follows).
    assert_eq!(
        env.deliver(OWNER, "o1", "deny 2").await,
        DeliverStatus::Answered
    );
    let r = asking.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(r.reply, Reply::Err(ref e) if e.code == ErrorCode::Denied));
    let third = env.next_announcement().await;
    assert!(
        third.body.starts_with("Approval 2: denied"),
        "{}",
        third.body
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(lock(&env.ops.desk.state).items.keys().eq([1u64].iter()));
    // Answered from the chat: no "no longer waits" notice follows.
    assert!(env.take_outbox().await.is_empty());
}

impl Env {
    async fn next_announcement(&self) -> OutboundMessage {
        for _ in 0..500 {
            if let Some(m) = self.take_outbox().await.into_iter().next() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the desk's task announced nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ends_without_a_chat_answer_is_told_once() {
    let env = setup();
    let ops = env.ops.clone();
    let asking = tokio::spawn(async move {
        ops.exec(&who("gw", 5), vec!["yes".into(), "y".into()], None)
            .await
    });
    env.wait_pending().await;
    assert_eq!(env.deliver(STRANGER, "h1", "hi").await, DeliverStatus::Held);
    env.sync().await;
    assert_eq!(env.take_outbox().await.len(), 2);
    // Answered elsewhere (the control socket), dropped elsewhere (`carapace held drop`).
    let id = env.approvals.list()[0].id;
    env.approvals
        .resolve(id, Resolution::AllowOnce)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(is_exec_ok(&asking.await.unwrap_or_else(|e| panic!("{e}"))));
    let held_id = env.ops.held_messages()[0].id.clone();
    let ops = env.ops.clone();
    tokio::task::spawn_blocking(move || ops.drop_held(&held_id, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    env.sync().await;
    env.sync().await;
    let bodies: Vec<String> = env
        .take_outbox()
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(
        bodies,
        [
            "Approval 1 no longer waits: answered elsewhere, withdrawn, or timed out (denied).",
            "Held message 2 is no longer held: admitted or dropped elsewhere.",
        ]
    );
    // An answer now is told that nothing waits.
    assert_eq!(
        env.deliver(OWNER, "o1", "allow 1").await,
        DeliverStatus::Answered
    );
    let out = env.take_outbox().await;
    assert!(
        out[0].body.starts_with("Nothing waits as number 1"),
        "{}",
        out[0].body
    );
}
