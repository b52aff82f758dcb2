//! The Slack channel end to end: the real `carapace run` with the real broker, policy and
//! gateway, the real `carapace-channel` adapter as a confined child, a wire-exact fake Slack
//! (Socket Mode and the Web API; Slack is hosted-only) and a fake OpenAI-compatible model. Root
//! only: like the other service tests they fail, never skip, when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use carapace_tests::fake_llm::FakeLlm;
use carapace_tests::fake_slack::{FakeSlack, Injected};
use carapace_tests::service::{channel_bin, policy_text, status_field, Service, StartOpts};
use carapace_tests::var_tmpdir;
use carapace_tests::{require_root, wait_for};
use serde_json::Value;

const APP: &str = "xapp-1-A0FAKEAPP01-1234567890-0123456789abcdef0123456789abcdef";
const BOT: &str = "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx";
/// The admitted Slack user.
const ALICE: &str = "U0ALICE0001";
/// A user the policy does not admit.
const MALLORY: &str = "U0MALLORY01";
const CHANNEL: &str = "C0GENERAL01";
const DM: &str = "D0ALICEDM01";

struct World {
    svc: Service,
    slack: FakeSlack,
    llm: FakeLlm,
    _secrets: tempfile::TempDir,
}

fn start() -> World {
    start_with("")
}

/// [`start`] with `channel_extra` added to the policy's `[channels.sl]`.
fn start_with(channel_extra: &str) -> World {
    require_root("Slack");
    let slack = FakeSlack::start(APP, BOT);
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-slack-secret-");
    let write = |name: &str, value: &str| {
        let p = secrets.path().join(name);
        fs::write(&p, format!("{value}\n")).expect("write a token");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
        p
    };
    let (app, bot) = (write("app", APP), write("bot", BOT));
    let policy = policy_text(&format!(
        r#"
[secrets.slack_app]
why = "the test app's app-level token"
file = "{app}"

[secrets.slack_bot]
why = "the test app's bot token"
file = "{bot}"

[channels.sl]
why = "the test workspace"
kind = "adapter"
senders = ["{ALICE}"]
recipients = []
reply_to_senders = true
retry = {{ attempts = 5, initial_delay = "200ms", max_delay = "1s" }}
{channel_extra}

[profiles.sl]
why = "the Slack adapter under test"
extends = "channel"

[profiles.sl.broker]
connect = [
  {{ host = "127.0.0.1", port = {api}, allow_private = true, why = "the fake Web API" }},
  {{ host = "127.0.0.1", port = {ws}, allow_private = true, why = "the fake Socket Mode" }},
]
secrets = ["slack_app", "slack_bot"]
deliver = ["sl"]

[profiles.agent]
why = "the gateway under test: answers on sl, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["sl"]
"#,
        app = app.display(),
        bot = bot.display(),
        api = slack.api_addr().port(),
        ws = slack.socket_addr().port(),
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[channels.sl]
kind = "slack"
program = "{bin}"
profile = "sl"
app_token_secret = "slack_app"
bot_token_secret = "slack_bot"
api_base = "{api}"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
"#,
        bin = channel_bin().display(),
        api = slack.api_base(),
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: format!(
            "\n[gateway.agent]\nbase_url = \"{}\"\nmodel = \"test-model\"\nmax_concurrent_runs = 4\n{config}",
            llm.base_url()
        ),
        ..StartOpts::default()
    });
    World {
        svc,
        slack,
        llm,
        _secrets: secrets,
    }
}

/// The texts posted to `channel` in thread `thread_ts` (None: unthreaded).
fn posted_to(slack: &FakeSlack, channel: &str, thread_ts: Option<&str>) -> Vec<String> {
    slack
        .posted()
        .iter()
        .filter(|m| m["channel"] == channel && m["thread_ts"].as_str() == thread_ts)
        .filter_map(|m| m["text"].as_str().map(str::to_string))
        .collect()
}

fn audit(svc: &Service) -> String {
    fs::read_to_string(svc.state_dir().join("audit.log")).unwrap_or_default()
}

#[test]
fn slack_admitted_sender_is_answered_in_its_thread_and_a_stranger_is_held() {
    let w = start();
    // The adapter runs confined.
    let pid = w.svc.adapter_pid("sl", None);
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    let netdev = fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "the adapter's network namespace");

    // A message in a channel: answered in its thread, the envelope acknowledged.
    let (env, ts) = w.slack.push_message(CHANNEL, ALICE, "hello agent", None);
    w.slack.wait_posted(1, Duration::from_secs(30));
    let answers = posted_to(&w.slack, CHANNEL, Some(&ts));
    assert_eq!(answers.len(), 1, "{:?}", w.slack.posted());
    assert!(
        answers[0].starts_with("echo: ") && answers[0].contains("hello agent"),
        "{answers:?}"
    );
    w.slack.wait_acked(&env, Duration::from_secs(5));
    let body = w.llm.requests()[0].body.to_string();
    assert!(
        body.contains("untrusted") && body.contains("channel:sl"),
        "{body}"
    );
    // A follow-up in the thread is the same conversation, answered in the same thread.
    w.slack.push_message(CHANNEL, ALICE, "and more", Some(&ts));
    wait_for(Duration::from_secs(30), "the answer in the thread", || {
        (posted_to(&w.slack, CHANNEL, Some(&ts)).len() == 2).then_some(())
    });
    // A direct message: answered in the DM, unthreaded.
    w.slack.push_message(DM, ALICE, "in private", None);
    wait_for(Duration::from_secs(30), "the answer in the DM", || {
        (!posted_to(&w.slack, DM, None).is_empty()).then_some(())
    });
    // The bot's own message and an edit are acknowledged and answer nothing.
    let own = w.slack.push_event(
        serde_json::json!({"type": "message", "subtype": "bot_message",
        "bot_id": "B0FAKEBOT01", "text": "echo: x", "channel": CHANNEL, "ts": w.slack.new_ts()}),
    );
    w.slack.wait_acked(&own, Duration::from_secs(10));

    // A stranger: held, never shown to the model, listed for the operator.
    let llm_calls = w.llm.requests().len();
    let (env, _) = w.slack.push_message(CHANNEL, MALLORY, "let me in", None);
    let h = wait_for(Duration::from_secs(20), "a held message", || {
        let h = w.svc.held();
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h[0]["sender"], MALLORY);
    assert_eq!(h[0]["channel"], "sl");
    w.slack.wait_acked(&env, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        w.llm.requests().len(),
        llm_calls,
        "a held message reached the model"
    );
    assert_eq!(w.slack.posted().len(), 3, "{:?}", w.slack.posted());
    let a = audit(&w.svc);
    assert!(a.contains(&format!("sl:{MALLORY}")), "{a}");
    assert!(!a.contains("let me in"), "a body in the audit log");

    // Every connection the adapter asked for went to the fake Slack.
    let ports = [w.slack.api_addr().port(), w.slack.socket_addr().port()];
    for line in a.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if v["op"] == "connect" && v["who"]["profile"] == "sl" && v["decision"] == "allow" {
            let target = v["target"].as_str().unwrap_or("");
            assert!(
                ports.iter().any(|p| target.contains(&p.to_string())),
                "the adapter connected elsewhere: {v}"
            );
        }
    }
    // The tokens went in headers, and into no log or audit record.
    let calls = w.slack.calls();
    assert!(calls
        .iter()
        .any(|c| c.authorization.as_deref() == Some(&*format!("Bearer {APP}"))));
    assert!(calls
        .iter()
        .any(|c| c.authorization.as_deref() == Some(&*format!("Bearer {BOT}"))));
    for t in [APP, BOT] {
        assert!(!w.svc.log_text().contains(t), "a token in the log");
        assert!(!audit(&w.svc).contains(t), "a token in the audit log");
    }
    let st = w.svc.channel_status("sl");
    assert_eq!(st["connected"], true, "{st}");
    assert!(
        st["last_in"].is_string() && st["last_out"].is_string(),
        "{st}"
    );
}

#[test]
fn slack_dropped_connections_and_disconnects_lose_nothing_and_double_nothing() {
    let w = start();
    let pid = w.svc.adapter_pid("sl", None);
    let (_, t1) = w.slack.push_message(CHANNEL, ALICE, "first", None);
    wait_for(Duration::from_secs(30), "the first answer", || {
        (!posted_to(&w.slack, CHANNEL, Some(&t1)).is_empty()).then_some(())
    });
    // The connection is cut right after the next envelope is sent, before its ack: Slack sends
    // it again on the next connection; it is answered once.
    let before = w.slack.connections();
    w.slack.drop_after_next_envelope();
    let (e2, t2) = w.slack.push_message(CHANNEL, ALICE, "second", None);
    w.slack.wait_acked(&e2, Duration::from_secs(30));
    assert!(w.slack.connections() > before);
    // Slack asks for a refresh while a message is on its way: nothing lost.
    w.slack.disconnect("refresh_requested");
    let (e3, t3) = w.slack.push_message(CHANNEL, ALICE, "third", None);
    w.slack.wait_acked(&e3, Duration::from_secs(30));
    for t in [&t2, &t3] {
        wait_for(Duration::from_secs(30), "an answer", || {
            (!posted_to(&w.slack, CHANNEL, Some(t)).is_empty()).then_some(())
        });
    }
    // Time for a doubled answer to show up.
    std::thread::sleep(Duration::from_secs(2));
    for (t, word) in [(&t1, "first"), (&t2, "second"), (&t3, "third")] {
        let got = posted_to(&w.slack, CHANNEL, Some(t));
        assert_eq!(got.len(), 1, "{word}: {got:?}");
        assert!(got[0].contains(word), "{got:?}");
    }
    assert!(w.slack.pending().is_empty(), "{:?}", w.slack.pending());
    assert_eq!(w.slack.refused(), 0, "a ticket used twice");
    // The adapter survived all of it in one process; its status is connected.
    assert_eq!(w.svc.adapter_pid("sl", None), pid);
    wait_for(Duration::from_secs(10), "connected again", || {
        (w.svc.channel_status("sl")["connected"] == true).then_some(())
    });
}

#[test]
fn slack_malformed_frames_and_rate_limits_are_handled() {
    let w = start();
    let pid = w.svc.adapter_pid("sl", None);
    w.slack
        .wait("the first connection", Duration::from_secs(20), |s| {
            (s.connections() >= 1).then_some(())
        });
    // Frames Slack never sends: logged, the connection and the process go on.
    w.slack.send_raw("{this is not json");
    w.slack
        .send_raw(r#"{"type":"events_api","payload":{"event":{}}}"#);
    w.slack.send_raw(r#"{"envelope_id":"x1","type":"events_api","payload":{"event":{"type":"message","user":"nobody"}}}"#);
    // chat.postMessage is rate-limited once: the answer waits what Retry-After said, then goes
    // out exactly once.
    w.slack.inject("chat.postMessage", Injected::RateLimited(2));
    let t0 = Instant::now();
    let (_, ts) = w
        .slack
        .push_message(DM, ALICE, "after the garbage", Some(&w.slack.new_ts()));
    let _ = ts;
    let posted = w.slack.wait_posted(1, Duration::from_secs(40));
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        posted[0]["text"]
            .as_str()
            .unwrap_or("")
            .contains("after the garbage"),
        "{posted:?}"
    );
    let throttled = w
        .slack
        .calls()
        .iter()
        .filter(|c| c.method == "chat.postMessage")
        .count();
    assert_eq!(throttled, 2, "one refused with 429, one sent");
    // apps.connections.open is rate-limited: the adapter waits, then connects again.
    w.slack
        .inject("apps.connections.open", Injected::RateLimited(1));
    w.slack.inject(
        "apps.connections.open",
        Injected::Raw {
            status: 200,
            body: "<html>oops</html>".into(),
        },
    );
    let before = w.slack.connections();
    w.slack.disconnect("warning");
    w.slack.wait(
        "a connection after the 429 and the bad answer",
        Duration::from_secs(30),
        |s| (s.connections() > before).then_some(()),
    );
    w.slack.push_message(DM, ALICE, "still here", None);
    wait_for(
        Duration::from_secs(30),
        "the answer after reconnecting",
        || {
            posted_to(&w.slack, DM, None)
                .iter()
                .any(|t| t.contains("still here"))
                .then_some(())
        },
    );
    assert_eq!(
        w.svc.adapter_pid("sl", None),
        pid,
        "the adapter was restarted"
    );
    let log = w.svc.log_text();
    assert!(
        log.contains("malformed frame"),
        "no log line for the malformed frame"
    );
}

#[test]
fn slack_operator_is_told_in_a_dm_and_answers_by_user_id() {
    let w = start_with(&format!("operator = \"{ALICE}\""));
    // A stranger writes in a channel: held, and announced to the operator's user id (Slack
    // posts that as a direct message from the app).
    let (_, ts) = w.slack.push_message(CHANNEL, MALLORY, "may I?", None);
    let note = wait_for(Duration::from_secs(30), "the announcement", || {
        posted_to(&w.slack, ALICE, None)
            .into_iter()
            .find(|t| t.contains("Held message"))
    });
    let n: String = note
        .split("Held message ")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!n.is_empty(), "{note}");
    assert!(note.contains(MALLORY), "{note}");
    // Someone else's `admit N` is an ordinary message, and resolves nothing.
    w.slack
        .push_message(CHANNEL, MALLORY, &format!("admit {n}"), Some(&ts));
    std::thread::sleep(Duration::from_secs(2));
    assert!(posted_to(&w.slack, CHANNEL, Some(&ts)).is_empty());
    // The operator answers in the DM: the held message is answered in its thread.
    w.slack.push_message(DM, ALICE, &format!("admit {n}"), None);
    wait_for(
        Duration::from_secs(30),
        "the admitted message answered",
        || {
            posted_to(&w.slack, CHANNEL, Some(&ts))
                .iter()
                .any(|t| t.contains("may I?"))
                .then_some(())
        },
    );
    // The broker confirmed to the operator.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !posted_to(&w.slack, ALICE, None)
        .iter()
        .any(|t| t.starts_with(&format!("Held message {n}")) && !t.contains("Answer:"))
    {
        assert!(
            Instant::now() < deadline,
            "no confirmation: {:?}",
            w.slack.posted()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = audit(&w.svc);
    assert!(
        a.contains("operator_answer") && a.contains(&format!("sl:{ALICE}")),
        "{a}"
    );
}
