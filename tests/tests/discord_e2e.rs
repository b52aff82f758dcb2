//! The Discord channel end to end: the real `carapace run` with the real broker, policy and
//! gateway, the real `carapace-channel` adapter as a confined child, a wire-exact fake Discord
//! (Gateway on a loopback WebSocket, REST on loopback HTTP; Discord is hosted-only) and a fake
//! OpenAI-compatible model. Root only: like the other service tests they fail, never skip, when
//! they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use carapace_tests::fake_discord::{FakeDiscord, RestInjected, BOT_ID};
use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::service::{alive, channel_bin, policy_text, status_field, Service, StartOpts};
use carapace_tests::var_tmpdir;
use carapace_tests::{require_root, wait_for};
use serde_json::{json, Value};

const TOKEN: &str = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GAbCdE.e2e-test-token-AAAAAAAAAAAAAAAAAAAA";
/// The admitted Discord user.
const ALICE: &str = "1000000000000000011";
/// A user the policy does not admit.
const MALLORY: &str = "1000000000000000022";
/// A guild text channel.
const CHAN: &str = "1000000000000000099";
const GUILD: &str = "1300000000000000001";
/// Alice's DM channel with the bot.
const DM: &str = "1000000000000000077";

struct World {
    svc: Service,
    dc: FakeDiscord,
    llm: FakeLlm,
    _secrets: tempfile::TempDir,
}

fn start(channel_extra: &str, script: Vec<Scripted>) -> World {
    require_root("Discord");
    let dc = FakeDiscord::start(TOKEN, 1_000);
    let llm = FakeLlm::start(script);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-dc-secret-");
    let secret = secrets.path().join("bot");
    fs::write(&secret, TOKEN).expect("write the token");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let policy = policy_text(&format!(
        r#"
[secrets.bot]
why = "the test bot's token"
file = "{secret}"

[channels.dc]
why = "the test guild and DMs"
kind = "adapter"
senders = ["{ALICE}"]
recipients = []
reply_to_senders = true
retry = {{ attempts = 3, initial_delay = "200ms", max_delay = "1s" }}
{channel_extra}

[profiles.dc]
why = "the Discord adapter under test"
extends = "channel"

[profiles.dc.broker]
connect = [
  {{ host = "127.0.0.1", port = {api}, allow_private = true, why = "the fake REST API" }},
  {{ host = "127.0.0.1", port = {gw}, allow_private = true, why = "the fake Gateway" }},
]
secrets = ["bot"]
deliver = ["dc"]

[profiles.agent]
why = "the gateway under test: answers on dc, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["dc"]
"#,
        secret = secret.display(),
        api = dc.api_addr().port(),
        gw = dc.gateway_addr().port(),
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[channels.dc]
kind = "discord"
program = "{bin}"
profile = "dc"
token_secret = "bot"
api_base = "{api}"
gateway_url = "{gw}"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
"#,
        bin = channel_bin().display(),
        api = dc.api_base(),
        gw = dc.gateway_url(),
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
    dc.wait_attached(Duration::from_secs(30));
    World {
        svc,
        dc,
        llm,
        _secrets: secrets,
    }
}

/// How many answers sent to `channel` contain `needle`.
fn answers(dc: &FakeDiscord, channel: &str, needle: &str) -> usize {
    dc.texts_to(channel)
        .iter()
        .filter(|t| t.contains(needle))
        .count()
}

fn answered_once(dc: &FakeDiscord, channel: &str, needle: &str) {
    wait_for(Duration::from_secs(40), needle, || {
        (answers(dc, channel, needle) >= 1).then_some(())
    });
}

#[test]
fn discord_admitted_sender_is_answered_unknown_sender_is_held_and_the_adapter_is_confined() {
    let w = start("", vec![]);
    // The adapter runs confined.
    let pid = w.svc.adapter_pid("dc", None);
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

    // An admitted sender in a guild channel: answered in that channel, as a reply, pinging no one.
    let id =
        w.dc.post(CHAN, Some(GUILD), ALICE, "hello agent")
            .expect("a session");
    let sent = w.dc.wait_sent(1, Duration::from_secs(30));
    assert_eq!(sent[0]["channel_id"], CHAN, "{sent:?}");
    let text = sent[0]["content"].as_str().unwrap_or("");
    assert!(
        text.starts_with("echo: ") && text.contains("hello agent"),
        "{sent:?}"
    );
    assert_eq!(sent[0]["message_reference"]["message_id"], id.as_str());
    assert_eq!(sent[0]["allowed_mentions"], json!({"parse": []}));
    let body = w.llm.requests()[0].body.to_string();
    assert!(
        body.contains("untrusted") && body.contains("channel:dc"),
        "{body}"
    );
    // The same sender in a DM: answered in the DM.
    w.dc.post(DM, None, ALICE, "a direct message");
    answered_once(&w.dc, DM, "a direct message");

    // An unknown sender: held, never shown to the model, listed with the user id.
    let llm_calls = w.llm.requests().len();
    w.dc.post(CHAN, Some(GUILD), MALLORY, "let me in");
    let h = wait_for(Duration::from_secs(20), "a held message", || {
        let h = w.svc.held();
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h[0]["sender"], MALLORY);
    assert_eq!(h[0]["channel"], "dc");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        w.llm.requests().len(),
        llm_calls,
        "a held message reached the model"
    );
    assert_eq!(answers(&w.dc, CHAN, "let me in"), 0);
    // Bots (and the bot itself, whose answers come back on the Gateway) are never delivered.
    w.dc.post_as(CHAN, Some(GUILD), "1000000000000000033", true, "from a bot");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        w.llm.requests().len(),
        llm_calls,
        "a bot's message reached the model"
    );
    assert_eq!(w.svc.held().len(), 1, "a bot's message was held");
    assert!(!w.svc.log_text().contains(&format!("sender={BOT_ID}")));

    // Every connection the adapter asked for went to the fake; the token is in no log.
    let audit = fs::read_to_string(w.svc.state_dir().join("audit.log")).unwrap_or_default();
    let ports = [w.dc.api_addr().port(), w.dc.gateway_addr().port()];
    for line in audit.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if v["op"] == "connect" && v["who"]["profile"] == "dc" && v["decision"] == "allow" {
            let t = v["target"].as_str().unwrap_or("");
            assert!(ports.iter().any(|p| t.contains(&p.to_string())), "{v}");
        }
    }
    assert!(
        !w.svc.log_text().contains(TOKEN),
        "the bot token in the log"
    );
    assert!(!audit.contains(TOKEN), "the bot token in the audit log");
    assert!(!audit.contains("hello agent"), "a body in the audit log");
    let st = w.svc.channel_status("dc");
    assert_eq!(st["connected"], true, "{st}");
    assert_eq!(st["held"], 1, "{st}");
}

#[test]
fn discord_drops_zombies_and_a_killed_adapter_lose_nothing_and_double_nothing() {
    let w = start("", vec![]);
    w.dc.post(CHAN, Some(GUILD), ALICE, "first");
    answered_once(&w.dc, CHAN, "first");
    // The connection is cut mid-conversation; what is posted meanwhile is replayed by the
    // resume and answered once.
    w.dc.drop_connection();
    w.dc.post(CHAN, Some(GUILD), ALICE, "during the drop");
    answered_once(&w.dc, CHAN, "during the drop");
    assert_eq!(w.dc.identifies(), 1, "a new session instead of a resume");
    assert!(!w.dc.resumes().is_empty());
    // Discord asks for a reconnect (op 7), then stops acknowledging heartbeats (a zombie).
    w.dc.reconnect();
    w.dc.wait_for(Duration::from_secs(20), "the resume after op 7", |d| {
        d.resumes().len() >= 2
    });
    w.dc.set_acks(false);
    w.dc.wait_for(Duration::from_secs(20), "the zombie resumed", |d| {
        d.resumes().len() >= 3
    });
    w.dc.set_acks(true);
    w.dc.post(CHAN, Some(GUILD), ALICE, "after the zombie");
    answered_once(&w.dc, CHAN, "after the zombie");
    // The adapter process is killed: restarted, it resumes from its saved cursor.
    let pid = w.svc.adapter_pid("dc", None);
    // SAFETY: kill has no memory preconditions; pid is the adapter program's.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for(Duration::from_secs(10), "the adapter gone", || {
        (!alive(pid)).then_some(())
    });
    w.dc.post(CHAN, Some(GUILD), ALICE, "while restarting");
    let _ = w.svc.adapter_pid("dc", Some(pid));
    answered_once(&w.dc, CHAN, "while restarting");
    assert_eq!(w.dc.identifies(), 1, "the restart did not resume");
    // Nothing doubled: give late duplicates a chance, then count.
    std::thread::sleep(Duration::from_secs(3));
    for t in [
        "first",
        "during the drop",
        "after the zombie",
        "while restarting",
    ] {
        assert_eq!(answers(&w.dc, CHAN, t), 1, "{t}: {:?}", w.dc.texts_to(CHAN));
    }
    assert_eq!(w.svc.channel_status("dc")["connected"], true);
}

#[test]
fn discord_malformed_frames_rate_limits_and_lost_answers_are_handled() {
    let w = start("", vec![]);
    let pid = w.svc.adapter_pid("dc", None);
    // Garbage on the Gateway: logged, skipped; the connection and the adapter go on.
    w.dc.send_raw("{\"op\": tru");
    w.dc.send_raw("[1,2,3]");
    w.dc.dispatch_raw("MESSAGE_CREATE", json!({"id": "not-a-snowflake"}));
    w.dc.post(CHAN, Some(GUILD), ALICE, "after garbage");
    answered_once(&w.dc, CHAN, "after garbage");
    assert_eq!(w.svc.adapter_pid("dc", None), pid, "the adapter restarted");
    assert_eq!(w.dc.connections(), 1, "the connection was dropped");
    // A 429 (route) is waited out and the answer sent once.
    w.dc.inject(RestInjected::TooMany {
        retry_after: 1.0,
        global: false,
    });
    w.dc.post(CHAN, Some(GUILD), ALICE, "rate limited");
    answered_once(&w.dc, CHAN, "rate limited");
    let posts: Vec<_> =
        w.dc.calls()
            .into_iter()
            .filter(|c| {
                c.body["content"]
                    .as_str()
                    .is_some_and(|t| t.contains("rate limited"))
            })
            .collect();
    assert_eq!(posts.len(), 2, "one 429, one retry");
    assert!(posts[1].at.duration_since(posts[0].at) >= Duration::from_millis(1000));
    // The message is created but the answer is lost, then a 502: the broker's retries reuse
    // the nonce and Discord (the fake) never creates a second message.
    w.dc.inject(RestInjected::CreateThenDrop);
    w.dc.inject(RestInjected::Raw {
        status: 502,
        body: "<html>bad gateway</html>".into(),
    });
    w.dc.post(CHAN, Some(GUILD), ALICE, "lost answer");
    answered_once(&w.dc, CHAN, "lost answer");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        answers(&w.dc, CHAN, "lost answer"),
        1,
        "{:?}",
        w.dc.texts_to(CHAN)
    );
    let log = w.svc.log_text();
    assert!(
        log.contains("malformed frame"),
        "no error logged for the bad frames"
    );
    assert!(log.contains("429"), "the 429 is not in the log");
    // A long answer is split at 2000 characters.
    w.llm.push(Scripted::text("a long answer ".repeat(300)));
    w.dc.post(CHAN, Some(GUILD), ALICE, "say a lot");
    wait_for(Duration::from_secs(30), "the pieces", || {
        (answers(&w.dc, CHAN, "a long answer") >= 3).then_some(())
    });
    assert!(w
        .dc
        .texts_to(CHAN)
        .iter()
        .all(|t| t.chars().count() <= 2000));
}

#[test]
fn discord_operator_is_told_in_a_dm_and_answers_from_it() {
    let w = start(&format!("operator = \"{ALICE}\""), vec![]);
    // Alice has written to the bot before (a DM channel exists for her).
    w.dc.post(DM, None, ALICE, "hi bot");
    answered_once(&w.dc, DM, "hi bot");
    // A stranger is held, and the operator (a user id) is told in the DM with the bot.
    w.dc.post(CHAN, Some(GUILD), MALLORY, "please let me in");
    let dm = wait_for(Duration::from_secs(30), "the DM opened", || {
        w.dc.dm_of(ALICE)
    });
    let note = wait_for(Duration::from_secs(30), "the announcement", || {
        w.dc.texts_to(&dm)
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
    // Only the operator's answer counts: a stranger's `admit` is just another held message.
    w.dc.post(CHAN, Some(GUILD), MALLORY, &format!("admit {n}"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(answers(&w.dc, CHAN, "please let me in"), 0);
    w.dc.post(&dm, None, ALICE, &format!("admit {n}"));
    answered_once(&w.dc, CHAN, "please let me in");
}
