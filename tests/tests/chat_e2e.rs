//! Approvals and admissions answered from the owner's chat, end to end: the real `carapace run`
//! with the real broker, policy, gateway and Telegram adapter (a confined child), a wire-exact
//! fake Telegram Bot API and a fake model. The policy's `[channels.tg]` names the owner as the
//! channel's `operator`: an `ask` of the agent's tool and a held sender are announced in the
//! owner's chat (with an inline keyboard), and only the owner's answer resolves them. Root
//! only: like the other service tests they fail, never skip, when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::fake_telegram::FakeTelegram;
use carapace_tests::service::{channel_bin, policy_text, Service, StartOpts};
use carapace_tests::var_tmpdir;
use carapace_tests::{require_root, wait_for};
use serde_json::{json, Value};

const TOKEN: &str = "4242:test-bot-token-AAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// The owner: the channel's operator, and an admitted sender.
const OWNER: i64 = 111;
/// An admitted sender who is not the operator.
const FRIEND: i64 = 333;
/// A sender the policy does not admit.
const MALLORY: i64 = 222;
const WAIT: Duration = Duration::from_secs(40);

struct World {
    svc: Service,
    tg: FakeTelegram,
    llm: FakeLlm,
    _secrets: tempfile::TempDir,
}

fn start(script: Vec<Scripted>) -> World {
    require_root("chat");
    let tg = FakeTelegram::start(TOKEN);
    let llm = FakeLlm::start(script);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-chat-secret-");
    let secret = secrets.path().join("bot");
    fs::write(&secret, TOKEN).expect("write the token");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let policy = policy_text(&format!(
        r#"
[secrets.bot]
why = "the test bot's token"
file = "{secret}"

[channels.tg]
why = "the owner's chats"
kind = "adapter"
senders = ["{OWNER}", "{FRIEND}"]
recipients = []
reply_to_senders = true
operator = "{OWNER}"
retry = {{ attempts = 3, initial_delay = "200ms", max_delay = "1s" }}

[profiles.tg]
why = "the Telegram adapter under test"
extends = "channel"

[profiles.tg.broker]
connect = [{{ host = "127.0.0.1", port = {api}, allow_private = true, why = "the fake Bot API" }}]
secrets = ["bot"]
deliver = ["tg"]

[profiles.agent]
why = "the gateway under test: answers on tg, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["tg"]
# The gateway may not answer approvals itself here: only the owner's chat and the control
# socket can.
approve = false
"#,
        secret = secret.display(),
        api = tg.addr().port(),
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[gateway.agent]
base_url = "{model}"
model = "test-model"
max_concurrent_runs = 4

[channels.tg]
kind = "telegram"
program = "{bin}"
profile = "tg"
token_secret = "bot"
api_base = "{api}"
poll_timeout = "1s"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
"#,
        model = llm.base_url(),
        bin = channel_bin().display(),
        api = tg.base_url(),
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: config,
        ..StartOpts::default()
    });
    World {
        svc,
        tg,
        llm,
        _secrets: secrets,
    }
}

/// The `sendMessage` calls to `chat`, in order.
fn sent_to(tg: &FakeTelegram, chat: i64) -> Vec<Value> {
    tg.sent()
        .into_iter()
        .filter(|m| m["chat_id"].to_string().trim_matches('"') == chat.to_string())
        .collect()
}

fn texts_to(tg: &FakeTelegram, chat: i64) -> Vec<String> {
    sent_to(tg, chat)
        .iter()
        .filter_map(|m| m["text"].as_str().map(str::to_string))
        .collect()
}

/// Wait for a message to `chat` starting with `prefix`; it.
fn wait_text(tg: &FakeTelegram, chat: i64, prefix: &str) -> Value {
    wait_for(
        WAIT,
        &format!("a message to {chat} starting {prefix:?}"),
        || {
            sent_to(tg, chat)
                .into_iter()
                .find(|m| m["text"].as_str().is_some_and(|t| t.starts_with(prefix)))
        },
    )
}

/// The number in an announcement (`Approval N: ...`, `Held message N ...`).
fn number_of(announcement: &Value) -> u64 {
    let text = announcement["text"].as_str().unwrap_or("");
    text.split_whitespace()
        .find_map(|w| w.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no number in {text:?}"))
}

/// The inline keyboard's buttons of a sent message: (label, data).
fn buttons(m: &Value) -> Vec<(String, String)> {
    m["reply_markup"]["inline_keyboard"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row.as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["text"].as_str().unwrap_or("").to_string(),
                b["callback_data"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn pending(svc: &Service) -> u64 {
    svc.status()["pending_approvals"].as_u64().unwrap_or(0)
}

fn audit(svc: &Service) -> Vec<Value> {
    fs::read_to_string(svc.state_dir().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn operator_answers(svc: &Service) -> Vec<Value> {
    audit(svc)
        .into_iter()
        .filter(|r| r["op"] == "operator_answer")
        .collect()
}

/// A second of nothing changing, to show something did not happen.
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

fn run_id() -> Scripted {
    Scripted::tool_call("exec", json!({"argv": ["/usr/bin/id", "-u"]}))
}

#[test]
fn an_ask_reaches_the_owner_and_only_the_owners_allow_runs_the_tool() {
    let w = start(vec![run_id(), Scripted::text("the tool ran")]);
    w.tg.push_text(FRIEND, FRIEND, "please run id for me");
    // The ask is announced in the owner's chat: program, arguments, profile, the rule's why,
    // a number, and the buttons.
    let ann = wait_text(&w.tg, OWNER, "Approval ");
    let text = ann["text"].as_str().unwrap_or("").to_string();
    assert!(text.contains("/usr/bin/id -u"), "{text}");
    assert!(text.contains("profile: tool"), "{text}");
    assert!(
        text.contains("everything else may run confined in the tool profile"),
        "{text}"
    );
    assert!(text.contains("asked by: gateway (agent"), "{text}");
    let n = number_of(&ann);
    assert!(text.contains(&format!("allow {n}")), "{text}");
    assert_eq!(
        buttons(&ann),
        [
            ("Allow".to_string(), format!("allow {n}")),
            ("Always".to_string(), format!("always {n}")),
            ("Deny".to_string(), format!("deny {n}")),
        ]
    );
    assert_eq!(pending(&w.svc), 1);

    // The same words from an admitted friend: an ordinary message, queued for the agent.
    w.tg.push_text(FRIEND, FRIEND, &format!("allow {n}"));
    // From a stranger: held, like anything a stranger writes.
    w.tg.push_text(MALLORY, MALLORY, &format!("allow {n}"));
    wait_for(WAIT, "the stranger's message held", || {
        (!w.svc.held().is_empty()).then_some(())
    });
    settle();
    assert_eq!(
        pending(&w.svc),
        1,
        "someone else's allow answered the approval"
    );
    assert!(operator_answers(&w.svc).is_empty());
    assert!(
        texts_to(&w.tg, FRIEND).is_empty(),
        "the tool ran before the owner allowed it"
    );

    // The owner's answer: the tool runs and the friend gets the agent's reply.
    w.tg.push_text(OWNER, OWNER, &format!("ALLOW #{n}"));
    let confirm = wait_text(&w.tg, OWNER, &format!("Approval {n}: allowed once"));
    assert!(
        confirm["text"]
            .as_str()
            .unwrap_or("")
            .contains("/usr/bin/id -u"),
        "{confirm}"
    );
    wait_text(&w.tg, FRIEND, "the tool ran");
    assert_eq!(pending(&w.svc), 0);
    // The model saw the tool's output: the tool really ran.
    let reqs = w.llm.requests();
    assert!(
        reqs.iter()
            .any(|r| r.body.to_string().contains("tool:exec")),
        "no tool result reached the model"
    );
    // The owner's answer never reached the agent; the friend's "allow" did, as a message.
    wait_for(WAIT, "the friend's allow answered as a message", || {
        texts_to(&w.tg, FRIEND)
            .iter()
            .any(|t| t == &format!("echo: allow {n}") || t.contains(&format!("allow {n}")))
            .then_some(())
    });
    assert!(
        !w.llm
            .requests()
            .iter()
            .any(|r| r.body.to_string().contains(&format!("ALLOW #{n}"))),
        "the owner's answer reached the model"
    );
    // Audited as the operator's answer, on that channel, by that identity.
    let answers = operator_answers(&w.svc);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["target"], format!("tg:{OWNER}"));
    assert_eq!(answers[0]["decision"], "allow");
    assert_eq!(answers[0]["outcome"], format!("approval {n}: allow-once"));
    assert_eq!(answers[0]["who"]["profile"], "tg");
    assert!(
        answers[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("\"allow {n}\" from the operator of tg ({OWNER})")),
        "{answers:?}"
    );
    // The stranger's message is announced to the owner as held (and still held).
    wait_text(&w.tg, OWNER, "Held message ");
    assert_eq!(w.svc.held().len(), 1);
}

#[test]
fn the_agents_own_allow_and_a_strangers_button_answer_nothing() {
    // The friend's message makes the agent ask; the owner's own message is answered by the
    // model with "allow N" into the owner's chat (the operator conversation).
    let w = start(vec![run_id()]);
    w.tg.push_text(FRIEND, FRIEND, "run id");
    let ann = wait_text(&w.tg, OWNER, "Approval ");
    let n = number_of(&ann);
    // Through its send_message tool and as its reply, both into the owner's chat.
    w.llm.push_all([
        Scripted::tool_call(
            "send_message",
            json!({"channel": "tg", "recipient": OWNER.to_string(), "body": format!("always {n}")}),
        ),
        Scripted::text(format!("allow {n}")),
    ]);
    w.tg.push_text(OWNER, OWNER, "hello agent");
    wait_for(WAIT, "the agent's words in the owner's chat", || {
        let t = texts_to(&w.tg, OWNER);
        (t.contains(&format!("allow {n}")) && t.contains(&format!("always {n}"))).then_some(())
    });
    settle();
    assert_eq!(
        pending(&w.svc),
        1,
        "the agent's own words answered the approval"
    );
    assert!(operator_answers(&w.svc).is_empty());

    // A stranger presses the owner's Allow button: delivered as the stranger's words (held);
    // the press is acknowledged; nothing is answered.
    let (_, cb) = w.tg.push_callback(OWNER, MALLORY, 1, &format!("allow {n}"));
    wait_for(WAIT, "the stranger's press acknowledged", || {
        w.tg.answered_callbacks()
            .iter()
            .any(|a| a["callback_query_id"] == json!(cb))
            .then_some(())
    });
    wait_for(WAIT, "the stranger's press held", || {
        w.svc
            .held()
            .iter()
            .any(|h| {
                h["sender"].as_str().and_then(|s| s.parse::<i64>().ok()) == Some(MALLORY)
                    && h["body"] == format!("allow {n}")
            })
            .then_some(())
    });
    settle();
    assert_eq!(
        pending(&w.svc),
        1,
        "a stranger's button press answered the approval"
    );
    assert!(operator_answers(&w.svc).is_empty());
    // The buttons stay for the owner.
    assert!(w
        .tg
        .calls()
        .iter()
        .all(|c| c.method != "editMessageReplyMarkup"));

    // The owner presses Deny: refused, and the owner is told; the announcement's buttons are
    // removed.
    let (_, cb) = w.tg.push_callback(OWNER, OWNER, 1, &format!("deny {n}"));
    wait_text(&w.tg, OWNER, &format!("Approval {n}: denied"));
    let edits = w.tg.wait_calls("editMessageReplyMarkup", 1, WAIT);
    assert_eq!(
        edits[0].params,
        json!({"chat_id": OWNER, "message_id": 1, "reply_markup": {"inline_keyboard": []}})
    );
    assert_eq!(pending(&w.svc), 0);
    assert!(w
        .tg
        .answered_callbacks()
        .iter()
        .any(|a| a["callback_query_id"] == json!(cb)));
    let answers = operator_answers(&w.svc);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["outcome"], format!("approval {n}: deny"));
    assert_eq!(answers[0]["target"], format!("tg:{OWNER}"));
    // The tool did not run: the exec was refused as not approved.
    wait_for(WAIT, "the exec refused", || {
        audit(&w.svc)
            .iter()
            .any(|r| r["op"] == "exec" && r["outcome"] == "approval refused")
            .then_some(())
    });
    assert!(!audit(&w.svc)
        .iter()
        .any(|r| r["op"] == "exec" && r["outcome"] == "starting"));
}

#[test]
fn always_from_the_owners_button_persists_across_a_restart() {
    let mut w = start(vec![run_id(), Scripted::text("first run")]);
    w.tg.push_text(FRIEND, FRIEND, "run id");
    let ann = wait_text(&w.tg, OWNER, "Approval ");
    let n = number_of(&ann);
    let (_, cb) = w.tg.push_callback(OWNER, OWNER, 1, &format!("always {n}"));
    wait_text(&w.tg, OWNER, &format!("Approval {n}: allowed always"));
    wait_text(&w.tg, FRIEND, "first run");
    assert!(w
        .tg
        .answered_callbacks()
        .iter()
        .any(|a| a["callback_query_id"] == json!(cb)));
    let o = w.svc.ctl(&["approvals", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Value = serde_json::from_slice(&o.stdout).expect("approvals JSON");
    assert_eq!(list["always"].as_array().map(Vec::len), Some(1), "{list}");

    // After a restart the same request runs without asking: no second announcement.
    let st = w.svc.stop();
    assert!(st.success(), "{st}");
    w.svc.restart();
    w.llm.push_all([run_id(), Scripted::text("second run")]);
    w.tg.push_text(FRIEND, FRIEND, "run id again");
    wait_text(&w.tg, FRIEND, "second run");
    let asked: Vec<String> = texts_to(&w.tg, OWNER)
        .into_iter()
        .filter(|t| t.starts_with("Approval ") && !t.contains(": allowed"))
        .collect();
    assert_eq!(asked.len(), 1, "asked again: {asked:?}");
    assert_eq!(pending(&w.svc), 0);
}

#[test]
fn a_held_sender_is_announced_admitted_from_the_chat_and_answered() {
    let w = start(vec![]);
    w.tg.push_text(MALLORY, MALLORY, "hello, may I talk to your agent?");
    let ann = wait_text(&w.tg, OWNER, "Held message ");
    let text = ann["text"].as_str().unwrap_or("").to_string();
    assert!(text.contains(&format!("from {MALLORY}")), "{text}");
    assert!(text.contains("may I talk to your agent?"), "{text}");
    let n = number_of(&ann);
    assert_eq!(
        buttons(&ann),
        [
            ("Admit".to_string(), format!("admit {n}")),
            ("Drop".to_string(), format!("drop {n}")),
        ]
    );
    settle();
    assert!(texts_to(&w.tg, MALLORY).is_empty());
    assert!(
        w.llm.requests().is_empty(),
        "a held message reached the model"
    );
    // The wrong verb is explained, and changes nothing.
    w.tg.push_text(OWNER, OWNER, &format!("allow {n}"));
    wait_text(&w.tg, OWNER, &format!("{n} is a held message"));
    assert_eq!(w.svc.held().len(), 1);

    // The owner admits it: the agent answers the sender.
    w.tg.push_text(OWNER, OWNER, &format!("admit {n}"));
    wait_text(
        &w.tg,
        OWNER,
        &format!("Held message {n} from {MALLORY}: admitted"),
    );
    let reply = wait_text(&w.tg, MALLORY, "echo: ");
    assert!(
        reply["text"]
            .as_str()
            .unwrap_or("")
            .contains("may I talk to your agent?"),
        "{reply}"
    );
    assert!(w.svc.held().is_empty());
    let answers = operator_answers(&w.svc);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(
        answers[1]["outcome"],
        format!("held message {n}: admitted once")
    );
    assert_eq!(answers[1]["target"], format!("tg:{OWNER}"));
    // Neither answer reached the model.
    assert!(!w
        .llm
        .requests()
        .iter()
        .any(|r| r.body.to_string().contains(&format!("admit {n}"))));
}

#[test]
fn email_an_ask_is_mailed_to_the_owner_and_answered_by_the_owners_reply() {
    use carapace_tests::mail::{Dovecot, SmtpSink, MAIL_PASSWORD, MAIL_USER};
    require_root("chat");
    let imap = Dovecot::start().expect("dovecot");
    let smtp = SmtpSink::start().expect("aiosmtpd");
    let llm = FakeLlm::start(vec![run_id(), Scripted::text("id ran for you")]);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-chat-mail-");
    let secret = secrets.path().join("mail");
    fs::write(&secret, MAIL_PASSWORD).expect("write the password");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let policy = policy_text(&format!(
        r#"
[secrets.mailpw]
why = "the test mailbox's password"
file = "{secret}"

[channels.mail]
why = "mail to the agent"
kind = "adapter"
senders = ["alice@example.com"]
recipients = []
reply_to_senders = true
operator = "owner@example.com"

[profiles.mail]
why = "the mail adapter under test"
extends = "channel"

[profiles.mail.broker]
connect = [
  {{ host = "127.0.0.1", port = {imap}, allow_private = true, why = "the test IMAP server" }},
  {{ host = "127.0.0.1", port = {smtp}, allow_private = true, why = "the test SMTP server" }},
]
secrets = ["mailpw"]
deliver = ["mail"]

[profiles.agent]
why = "the gateway under test: answers by mail, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["mail"]
approve = false
"#,
        secret = secret.display(),
        imap = imap.port,
        smtp = smtp.port,
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[gateway.agent]
base_url = "{model}"
model = "test-model"

[channels.mail]
kind = "email"
program = "{bin}"
profile = "mail"
imap = "127.0.0.1:{imap}"
imap_security = "plain"
smtp = "127.0.0.1:{smtp}"
smtp_security = "plain"
username = "{MAIL_USER}"
password_secret = "mailpw"
from = "agent@example.com"
poll_interval = "1s"
"#,
        model = llm.base_url(),
        bin = channel_bin().display(),
        imap = imap.port,
        smtp = smtp.port,
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: config,
        ..StartOpts::default()
    });
    wait_for(WAIT, "the mail adapter connected", || {
        let st = svc.status();
        st["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["channel"] == "mail").cloned())
            .filter(|c| c["connected"] == true)
            .map(|_| ())
    });
    imap.deliver(
        b"From: alice@example.com\r\nTo: agent@example.com\r\nSubject: id please\r\n\
          Message-ID: <ask@example.com>\r\n\r\nPlease run id.\r\n",
    )
    .expect("deliver");
    // The ask is mailed to the owner.
    let got = smtp.wait_for(1, WAIT);
    let ann = &got[0];
    assert_eq!(ann.rcpt_tos, vec!["owner@example.com".to_string()]);
    assert!(ann.data.contains("/usr/bin/id -u"), "{}", ann.data);
    let n: u64 = ann
        .data
        .split("Approval ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|d| d.trim().parse().ok())
        .unwrap_or_else(|| panic!("no approval number in {}", ann.data));
    assert_eq!(pending(&svc), 1);

    // Someone else's reply saying "allow": held, nothing answered.
    imap.deliver(
        format!(
            "From: mallory@evil.example\r\nTo: agent@example.com\r\nSubject: Re: Approval {n}\r\n\
             Message-ID: <forged@evil.example>\r\n\r\nallow {n}\r\n"
        )
        .as_bytes(),
    )
    .expect("deliver");
    wait_for(WAIT, "the stranger's mail held", || {
        (!svc.held().is_empty()).then_some(())
    });
    settle();
    assert_eq!(pending(&svc), 1, "a stranger's mail answered the approval");

    // The owner's reply: its first line answers (the quoted announcement below does not).
    imap.deliver(
        format!(
            "From: Owner <Owner@Example.com>\r\nTo: agent@example.com\r\n\
             Subject: Re: Approval {n}: a tool wants to run\r\n\
             Message-ID: <answer@example.com>\r\nIn-Reply-To: <x@agent>\r\n\r\n\
             allow {n}\r\n\r\nOn Monday the agent wrote:\r\n> deny {n}\r\n"
        )
        .as_bytes(),
    )
    .expect("deliver");
    let got = wait_for(WAIT, "alice answered and the owner told", || {
        let r = smtp.received();
        let to_alice = r
            .iter()
            .any(|m| m.rcpt_tos == ["alice@example.com"] && m.data.contains("id ran for you"));
        let confirmed = r.iter().any(|m| {
            m.rcpt_tos == ["owner@example.com"]
                && m.data.contains(&format!("Approval {n}: allowed once"))
        });
        (to_alice && confirmed).then_some(r)
    });
    assert_eq!(pending(&svc), 0);
    let answers = operator_answers(&svc);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["target"], "mail:owner@example.com");
    assert_eq!(answers[0]["outcome"], format!("approval {n}: allow-once"));
    // The held stranger was announced to the owner too; nothing went to the stranger.
    assert!(got
        .iter()
        .any(|m| m.rcpt_tos == ["owner@example.com"] && m.data.contains("Held message")));
    assert!(!got.iter().any(|m| m.rcpt_tos == ["mallory@evil.example"]));
}
