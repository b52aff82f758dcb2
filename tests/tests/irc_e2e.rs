//! The IRC adapter end to end: the real `carapace run` with the real broker, policy and gateway,
//! the real `carapace-channel` adapter as a confined child, a fake OpenAI-compatible model, and
//!
//! - a real IRC server (Debian's ngircd, started by the test on a loopback port), with two
//!   people on it as plain sockets: `alice` (admitted by the policy) and `mallory` (not): the
//!   answered / held / confined / dropped-connection tests;
//! - the wire-exact fake server of tests/src/irc_fake.rs for what ngircd cannot do: SASL PLAIN
//!   (ngircd has no SASL), malformed lines and a rate-limit reply (`263`).
//!
//! Root only: like the other service tests they fail, never skip, when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use carapace_tests::fake_llm::FakeLlm;
use carapace_tests::irc_fake::{FakeIrc, FakeIrcOpts};
use carapace_tests::irc_server::{IrcClient, Ngircd, CHANNEL};
use carapace_tests::service::{channel_bin, policy_text, status_field, Service, StartOpts};
use carapace_tests::var_tmpdir;
use carapace_tests::{require_root, wait_for};

/// The adapter's nick.
const BOT: &str = "carapace";
const SASL_PASSWORD: &str = "sasl-test-password";

/// `carapace run` with an `irc` channel named `irc` on `port`; `extra` adds keys to its
/// `[channels.irc]` of the configuration. The policy admits `alice`.
fn launch(llm: &FakeLlm, port: u16, extra: &str, secret: Option<&std::path::Path>) -> Service {
    let (secret_table, secrets) = match secret {
        Some(p) => (
            format!(
                "[secrets.ircpw]\nwhy = \"the bot's SASL password\"\nfile = \"{}\"\n",
                p.display()
            ),
            "secrets = [\"ircpw\"]",
        ),
        None => (String::new(), ""),
    };
    let policy = policy_text(&format!(
        r#"
{secret_table}
[channels.irc]
why = "the test IRC network"
kind = "adapter"
senders = ["alice"]
recipients = []
reply_to_senders = true
retry = {{ attempts = 3, initial_delay = "200ms", max_delay = "1s" }}

[profiles.irc]
why = "the IRC adapter under test"
extends = "channel"

[profiles.irc.broker]
connect = [{{ host = "127.0.0.1", port = {port}, allow_private = true, why = "the test IRC server" }}]
deliver = ["irc"]
{secrets}

[profiles.agent]
why = "the gateway under test: answers on irc, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["irc"]
"#,
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[channels.irc]
kind = "irc"
program = "{bin}"
profile = "irc"
server = "127.0.0.1:{port}"
security = "plain"
nick = "{BOT}"
channels = ["{CHANNEL}"]
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
{extra}
"#,
        bin = channel_bin().display(),
    );
    Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: format!(
            "\n[gateway.agent]\nbase_url = \"{}\"\nmodel = \"test-model\"\nmax_concurrent_runs = 4\n{config}",
            llm.base_url()
        ),
        ..StartOpts::default()
    })
}

/// Whether the bot said a line containing `text` to `target`, as `who` saw it.
fn said(who: &IrcClient, target: &str, text: &str) -> bool {
    who.messages(BOT, target).iter().any(|l| l.contains(text))
}

/// Wait until the bot is in the channel (its JOIN seen by `who`, already in it).
fn bot_joined(who: &IrcClient) {
    who.wait(Duration::from_secs(30), "the bot joining", |r| {
        r.command == "JOIN" && r.from == BOT
    });
}

#[test]
fn irc_admitted_sender_is_answered_unknown_held_and_a_drop_loses_and_doubles_nothing() {
    require_root("IRC");
    let server = Ngircd::start();
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let alice = IrcClient::connect(server.port(), "alice");
    alice.join(CHANNEL);
    let mallory = IrcClient::connect(server.port(), "mallory");
    let svc = launch(&llm, server.port(), "", None);
    bot_joined(&alice);

    // The adapter runs confined.
    let pid = svc.adapter_pid("irc", None);
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

    // A private message from the admitted sender: answered privately.
    alice.privmsg(BOT, "hello agent");
    // The echo model's answer has several lines: one PRIVMSG each.
    wait_for(Duration::from_secs(30), "the private answer", || {
        said(&alice, "alice", "hello agent").then_some(())
    });
    assert!(alice.messages(BOT, "alice")[0].starts_with("echo: "));
    let body = llm.requests()[0].body.to_string();
    assert!(
        body.contains("untrusted") && body.contains("channel:irc"),
        "{body}"
    );

    // In the channel, addressed to the bot: answered in the channel.
    alice.privmsg(CHANNEL, &format!("{BOT}: hello room"));
    wait_for(Duration::from_secs(30), "the channel answer", || {
        said(&alice, CHANNEL, "hello room").then_some(())
    });
    // Not addressed to the bot: not delivered.
    alice.privmsg(CHANNEL, "just chatting");

    // A stranger: held, never shown to the model, not answered.
    let calls = llm.requests().len();
    mallory.privmsg(BOT, "let me in");
    let h = wait_for(Duration::from_secs(20), "a held message", || {
        let h = svc.held();
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["sender"], "mallory");
    assert_eq!(h[0]["channel"], "irc");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        llm.requests().len(),
        calls,
        "a held message reached the model"
    );
    assert!(!llm
        .requests()
        .iter()
        .any(|r| r.body.to_string().contains("let me in")
            || r.body.to_string().contains("just chatting")));
    assert!(mallory.messages(BOT, "mallory").is_empty());
    let st = svc.channel_status("irc");
    assert_eq!(st["connected"], true, "{st}");

    // The server cuts the adapter's connection (an operator KILLs it): the adapter says so,
    // comes back, and the conversation goes on with nothing lost and nothing doubled.
    let oper = IrcClient::connect(server.port(), "oper");
    oper.kill(BOT);
    wait_for(Duration::from_secs(20), "the bot to rejoin", || {
        let joins = alice
            .received()
            .iter()
            .filter(|r| r.command == "JOIN" && r.from == BOT)
            .count();
        (joins >= 2).then_some(())
    });
    alice.privmsg(BOT, "after the drop");
    wait_for(Duration::from_secs(30), "the answer after the drop", || {
        said(&alice, "alice", "after the drop").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let private = alice.messages(BOT, "alice");
    for text in ["hello agent", "after the drop"] {
        let n = private.iter().filter(|l| l.contains(text)).count();
        assert_eq!(n, 1, "{text}: {private:?}");
    }
    let room = alice.messages(BOT, CHANNEL);
    assert_eq!(
        room.iter().filter(|l| l.contains("hello room")).count(),
        1,
        "{room:?}"
    );
    let asked: Vec<String> = llm.requests().iter().map(|r| r.body.to_string()).collect();
    assert_eq!(
        asked
            .iter()
            .filter(|b| b.contains("after the drop"))
            .count(),
        1,
        "delivered twice"
    );
    let log = svc.log_text();
    assert!(log.contains("the IRC connection ended"), "{log}");
    wait_for(Duration::from_secs(10), "connected in status", || {
        (svc.channel_status("irc")["connected"] == true).then_some(())
    });
    drop(server);
}

#[test]
fn irc_sasl_malformed_lines_and_a_rate_limit_reply_are_handled() {
    require_root("IRC");
    let fake = FakeIrc::start(FakeIrcOpts {
        sasl: Some((BOT.into(), SASL_PASSWORD.into())),
        ..FakeIrcOpts::default()
    });
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-irc-secret-");
    let secret = secrets.path().join("pw");
    fs::write(&secret, format!("{SASL_PASSWORD}\n")).expect("write the password");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let svc = launch(
        &llm,
        fake.addr().port(),
        "password_secret = \"ircpw\"",
        Some(&secret),
    );
    fake.wait(Duration::from_secs(30), "registration", |f| {
        f.registered() >= 1
    });
    assert_eq!(fake.sasl_results(), [true], "{:?}", fake.lines());
    fake.wait(Duration::from_secs(10), "the JOIN", |f| {
        f.lines().iter().any(|l| l == &format!("JOIN {CHANNEL}"))
    });

    // Malformed lines: logged, skipped; the adapter goes on.
    fake.inject("@bad tag=1 PRIVMSG carapace :x");
    fake.inject(&format!(":alice!a@h PRIVMSG {BOT} :{}", "x".repeat(700)));
    fake.inject(":only-a-prefix");
    // A rate-limit reply to the first answer: the broker retries it, it arrives once.
    fake.throttle(1);
    fake.privmsg("msgid=one", "alice", BOT, "hello through sasl");
    wait_for(
        Duration::from_secs(60),
        "the answer after the throttle",
        || {
            let sent = fake.sent();
            sent.iter()
                .any(|(t, text)| t == "alice" && text.contains("hello through sasl"))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let answered = || {
        fake.sent()
            .into_iter()
            .filter(|(t, text)| t == "alice" && text.contains("hello through sasl"))
            .count()
    };
    assert_eq!(answered(), 1, "{:?}", fake.sent());
    let log = svc.log_text();
    assert!(
        log.contains("a malformed line from the IRC server"),
        "{log}"
    );
    assert!(
        log.contains("263"),
        "the rate limit is not in the log: {log}"
    );
    // The same msgid again (a bouncer's replay): a duplicate, not answered twice.
    fake.privmsg("msgid=one", "alice", BOT, "hello through sasl");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(answered(), 1, "a replayed msgid was answered again");
    assert_eq!(fake.connections(), 1, "the adapter reconnected: {log}");
    // The password is in no log.
    assert!(!svc.log_text().contains(SASL_PASSWORD));
    assert_eq!(svc.channel_status("irc")["connected"], true);
}
