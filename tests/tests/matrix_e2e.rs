//! The Matrix channel end to end: the real `carapace run` with the real broker, policy and
//! gateway, the real `carapace-channel` adapter as a confined child, a real homeserver
//! (Synapse, from PyPI: `.ci/test` installs it) reached through a loopback proxy that can cut
//! connections, lose answers and answer with malformed frames, and a fake OpenAI-compatible
//! model. The test's users (alice, admitted; mallory, not) speak the client-server API
//! directly. One relaxed Synapse is shared by the file's tests (each test registers its own
//! users); the rate-limit test starts a strict one of its own. Root only: like the other service
//! tests they fail, never skip, when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::matrix_server::{shared, Limits, Proxy, Synapse, User};
use carapace_tests::service::{
    channel_bin, policy_text, program_of, status_field, Service, StartOpts,
};
use carapace_tests::{require_root, wait_for};
use carapace_tests::{unique, var_tmpdir};
use serde_json::Value;

/// The running pieces of one test.
struct World {
    svc: Service,
    llm: FakeLlm,
    proxy: Proxy,
    bot: User,
    alice: User,
    mallory: User,
    /// alice's room with the bot (joined).
    room: String,
    _secrets: tempfile::TempDir,
}

fn name(prefix: &str) -> String {
    unique(prefix).to_ascii_lowercase()
}

/// `channel`: more keys of the policy's `[channels.mx]` (its `retry` at least).
fn start(hs: &Synapse, channel: &str, script: Vec<Scripted>) -> World {
    require_root("Matrix");
    let bot = hs
        .register(&name("bot"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let alice = hs
        .register(&name("alice"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mallory = hs
        .register(&name("mallory"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let proxy = Proxy::start(hs.addr()).unwrap_or_else(|e| panic!("{e:#}"));
    let llm = FakeLlm::start(script);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-mx-secret-");
    let secret = secrets.path().join("token");
    fs::write(&secret, &bot.token).expect("write the token");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let policy = policy_text(&format!(
        r#"
[secrets.mx_token]
why = "the test bot's access token"
file = "{secret}"

[channels.mx]
why = "the test rooms"
kind = "adapter"
senders = ["{alice}"]
recipients = []
reply_to_senders = true
{channel}

[profiles.mx]
why = "the Matrix adapter under test"
extends = "channel"

[profiles.mx.broker]
connect = [{{ host = "127.0.0.1", port = {hs}, allow_private = true, why = "the homeserver (through the test's proxy)" }}]
secrets = ["mx_token"]
deliver = ["mx"]

[profiles.agent]
why = "the gateway under test: answers on mx, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["mx"]
"#,
        secret = secret.display(),
        alice = alice.user_id,
        channel = channel.replace("{ALICE}", &alice.user_id),
        hs = proxy.addr().port(),
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[gateway.agent]
base_url = "{llm}"
model = "test-model"
max_concurrent_runs = 4

[channels.mx]
kind = "matrix"
program = "{bin}"
profile = "mx"
homeserver = "{hs}"
token_secret = "mx_token"
invites_from = ["{alice}"]
poll_timeout = "2s"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
"#,
        llm = llm.base_url(),
        bin = channel_bin().display(),
        hs = proxy.base_url(),
        alice = alice.user_id,
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: config,
        ..StartOpts::default()
    });
    // The adapter's first sync took the position.
    wait_for(Duration::from_secs(30), "the adapter connected", || {
        (svc.channel_status("mx")["connected"] == true).then_some(())
    });
    // alice invites the bot (an admitted inviter): it joins.
    let room = alice.create_room().unwrap_or_else(|e| panic!("{e:#}"));
    alice
        .invite(&room, &bot.user_id)
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(
        Duration::from_secs(30),
        "the bot joined alice's room",
        || (alice.membership(&room, &bot.user_id).as_deref() == Some("join")).then_some(()),
    );
    World {
        svc,
        llm,
        proxy,
        bot,
        alice,
        mallory,
        room,
        _secrets: secrets,
    }
}

const RETRY: &str = r#"retry = { attempts = 5, initial_delay = "200ms", max_delay = "1s" }"#;

/// What alice said, as the fake model echoes it (`echo: <untrusted ...>\nTEXT\n</untrusted>`).
fn echoed(answers: &[String]) -> Vec<String> {
    answers
        .iter()
        .map(|a| {
            let inner = a
                .split_once(">\n")
                .and_then(|(_, rest)| rest.rsplit_once("\n</untrusted>"))
                .map_or(a.as_str(), |(t, _)| t);
            format!("echo: {inner}")
        })
        .collect()
}

/// The bodies the bot posted in `room`, oldest first.
fn bot_messages(w: &World, room: &str) -> Vec<String> {
    w.alice
        .messages(room)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .filter(|(s, _)| *s == w.bot.user_id)
        .map(|(_, b)| b)
        .collect()
}

/// The service log's last 40 lines above DEBUG.
fn log_tail(w: &World) -> String {
    let log: Vec<String> = w
        .svc
        .log_text()
        .lines()
        .filter(|l| !l.contains(" DEBUG "))
        .map(str::to_string)
        .collect();
    log[log.len().saturating_sub(40)..].join("\n")
}

/// Wait until the bot posted `n` messages in alice's room; all of them.
fn wait_answers(w: &World, n: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let m = bot_messages(w, &w.room);
        if m.len() >= n {
            return m;
        }
        if Instant::now() > deadline {
            let tail = log_tail(w);
            panic!(
                "timed out waiting for {n} answers from the bot (have {m:?});\nrequests: {:?}\nlog:\n{tail}",
                w.proxy
                    .seen()
                    .iter()
                    .rev()
                    .take(12)
                    .map(|l| l.split_once("filter=").map_or(l.as_str(), |(a, _)| a))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn matrix_admitted_sender_is_answered_unknown_sender_is_held_and_the_adapter_is_confined() {
    let w = start(shared(), RETRY, vec![]);
    // The adapter runs confined.
    let pid = w.svc.adapter_pid("mx", None);
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

    // An admitted sender: the agent runs and the answer goes to the same room.
    w.alice.say(&w.room, "hello agent").unwrap();
    let answers = wait_answers(&w, 1, Duration::from_secs(40));
    assert_eq!(echoed(&answers), ["echo: hello agent"], "{answers:?}");
    assert!(answers[0].contains(&w.alice.user_id), "{answers:?}");
    let body = w.llm.requests()[0].body.to_string();
    assert!(
        body.contains("untrusted") && body.contains("channel:mx"),
        "{body}"
    );

    // An unknown sender in the same room: held under the full MXID, never shown to the model.
    let calls = w.llm.requests().len();
    w.alice.invite(&w.room, &w.mallory.user_id).unwrap();
    w.mallory.join(&w.room).unwrap();
    w.mallory.say(&w.room, "let me in").unwrap();
    let h = wait_for(Duration::from_secs(30), "a held message", || {
        let h = w.svc.held();
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["sender"], w.mallory.user_id.as_str());
    assert_eq!(h[0]["channel"], "mx");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        w.llm.requests().len(),
        calls,
        "a held message reached the model"
    );
    assert_eq!(bot_messages(&w, &w.room).len(), 1);

    // mallory is no admitted inviter: the bot stays out of her room.
    let hers = w.mallory.create_room().unwrap();
    w.mallory.invite(&hers, &w.bot.user_id).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        w.mallory.membership(&hers, &w.bot.user_id).as_deref(),
        Some("invite"),
        "the bot joined a room of an inviter not in invites_from"
    );
    assert!(w.svc.log_text().contains("invite left pending"));

    // The token is in no log or audit record; the status says connected.
    assert!(
        !w.svc.log_text().contains(&w.bot.token),
        "the token in the log"
    );
    let audit = fs::read_to_string(w.svc.state_dir().join("audit.log")).unwrap_or_default();
    assert!(!audit.contains(&w.bot.token), "the token in the audit log");
    let st = w.svc.channel_status("mx");
    assert_eq!(st["connected"], true, "{st}");
    assert!(
        st["last_in"].is_string() && st["last_out"].is_string(),
        "{st}"
    );
}

#[test]
fn matrix_operator_is_told_in_a_direct_room_and_answers_from_there() {
    let w = start(
        shared(),
        &format!("{RETRY}\noperator = \"{{ALICE}}\""),
        vec![],
    );
    w.alice.invite(&w.room, &w.mallory.user_id).unwrap();
    w.mallory.join(&w.room).unwrap();
    w.mallory.say(&w.room, "let me in").unwrap();
    // The announcement goes to a direct room the bot makes for alice (never the shared room).
    let deadline = Instant::now() + Duration::from_secs(40);
    let dm = loop {
        // The bot's rooms, seen with its own token: the one besides alice's shared room.
        let v = w.bot.call("GET", "/joined_rooms", None).unwrap();
        if let Some(r) = v["joined_rooms"]
            .as_array()
            .and_then(|a| a.iter().filter_map(Value::as_str).find(|r| *r != w.room))
        {
            break r.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no invite to a direct room; log:\n{}",
            log_tail(&w)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    w.alice.join(&dm).unwrap();
    let note = wait_for(Duration::from_secs(30), "the announcement", || {
        let m = w.alice.messages(&dm).ok()?;
        m.into_iter()
            .find(|(s, b)| *s == w.bot.user_id && b.contains("admit "))
            .map(|(_, b)| b)
    });
    assert!(note.contains(&w.mallory.user_id), "{note}");
    let n: String = note
        .split("admit ")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!n.is_empty(), "{note}");
    assert!(
        bot_messages(&w, &w.room).is_empty(),
        "announced in the shared room"
    );
    w.alice.say(&dm, &format!("admit {n}")).unwrap();
    let answers = wait_answers(&w, 1, Duration::from_secs(40));
    assert_eq!(echoed(&answers), ["echo: let me in"], "{answers:?}");
    assert!(w.svc.held().is_empty());
}

#[test]
fn matrix_dropped_connections_and_a_restart_lose_nothing_and_double_nothing() {
    let w = start(shared(), RETRY, vec![]);

    // 1. The answer's send reaches the homeserver, but its reply is lost: the adapter sends
    //    again with the same transaction id, and the room shows the answer once.
    w.proxy.lose_answers("/send/m.room.message/", 1);
    w.alice.say(&w.room, "first").unwrap();
    wait_answers(&w, 1, Duration::from_secs(40));
    let sends = || -> Vec<String> {
        w.proxy
            .seen()
            .into_iter()
            .filter(|l| l.starts_with("PUT ") && l.contains("/send/"))
            .collect()
    };
    let puts = wait_for(Duration::from_secs(30), "the lost send retried", || {
        let p = sends();
        (p.len() >= 2).then_some(p)
    });
    assert!(puts.len() >= 2, "the lost send was not retried: {puts:?}");
    assert_eq!(puts[0], puts[1], "the retry used another transaction id");

    // 2. A sync's answer is lost after the homeserver advanced: the adapter syncs again from
    //    its saved token.
    w.proxy.lose_answers("/sync?", 1);
    std::thread::sleep(Duration::from_millis(2500));
    w.alice.say(&w.room, "second").unwrap();
    wait_answers(&w, 2, Duration::from_secs(40));

    // 3. Every connection is cut in the middle of a long poll, and alice writes meanwhile.
    w.proxy.cut_all();
    w.alice.say(&w.room, "third").unwrap();
    wait_answers(&w, 3, Duration::from_secs(40));

    // 4. The adapter is killed; the supervisor restarts it; it resumes at its saved token.
    let init = w.svc.child_init("mx");
    let pid = program_of(init);
    // SAFETY: kill has no memory preconditions; the pid is the adapter this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for(Duration::from_secs(30), "the adapter restarted", || {
        (w.svc.child_init("mx") != init).then_some(())
    });
    wait_for(
        Duration::from_secs(30),
        "the restarted adapter connected",
        || (w.svc.channel_status("mx")["connected"] == true).then_some(()),
    );
    w.alice.say(&w.room, "fourth").unwrap();
    let answers = wait_answers(&w, 4, Duration::from_secs(40));
    std::thread::sleep(Duration::from_secs(3));
    let answers_later = bot_messages(&w, &w.room);
    assert_eq!(answers, answers_later, "an answer came twice");
    assert_eq!(
        echoed(&answers),
        ["echo: first", "echo: second", "echo: third", "echo: fourth"],
        "lost or doubled"
    );
    assert_eq!(
        w.llm.requests().len(),
        4,
        "a message reached the model twice"
    );
    assert!(w.svc.log_text().contains("sync"), "no error logged");
}

#[test]
fn matrix_malformed_sync_answers_are_reported_and_survived() {
    let w = start(shared(), RETRY, vec![]);
    let pid = w.svc.adapter_pid("mx", None);
    w.proxy
        .malformed("/sync?", 1, "{\"next_batch\": 7, \"rooms\": []}");
    wait_for(Duration::from_secs(30), "the error in the status", || {
        let st = w.svc.channel_status("mx");
        (st["connected"] == false).then_some(st)
    });
    let st = w.svc.channel_status("mx");
    assert!(
        st.to_string().contains("malformed"),
        "the status does not say why: {st}"
    );
    w.proxy.malformed("/sync?", 2, "<html>not json</html>");
    w.alice.say(&w.room, "still there?").unwrap();
    let answers = wait_answers(&w, 1, Duration::from_secs(40));
    assert_eq!(echoed(&answers), ["echo: still there?"]);
    assert_eq!(w.proxy.pending().0, 0);
    assert_eq!(
        w.svc.adapter_pid("mx", None),
        pid,
        "the adapter died of a malformed frame"
    );
    wait_for(Duration::from_secs(20), "connected again", || {
        (w.svc.channel_status("mx")["connected"] == true).then_some(())
    });
    assert!(w.svc.log_text().contains("malformed"), "no error logged");
}

#[test]
fn matrix_rate_limit_429_is_honoured_and_the_answer_is_not_doubled() {
    let t = Instant::now();
    let hs = Synapse::start(Limits::Strict).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("strict synapse up in {} ms", t.elapsed().as_millis());
    // An answer of three pieces: rc_message lets two through, the third gets a real 429.
    let piece = |c: &str| vec![c; 1500].join(" ");
    let long = format!("{}\n{}\n{}", piece("aaaa"), piece("bbbb"), piece("cccc"));
    let w = start(
        &hs,
        "retry = { attempts = 8, initial_delay = \"200ms\", max_delay = \"1s\" }\nmax_bytes = \"64KiB\"",
        vec![Scripted::text(long.clone())],
    );
    w.alice.say(&w.room, "a long one, please").unwrap();
    let answers = wait_answers(&w, 3, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(2));
    let answers = if answers.len() == 3 {
        bot_messages(&w, &w.room)
    } else {
        answers
    };
    assert_eq!(answers.len(), 3, "pieces lost or doubled: {answers:?}");
    assert!(answers[0].starts_with("aaaa") && answers[2].starts_with("cccc"));
    let log = w.svc.log_text();
    assert!(log.contains("M_LIMIT_EXCEEDED"), "no 429 met:\n{log}");
    assert!(
        log.contains("the service asked to slow down"),
        "retry_after not honoured"
    );
    // The resend after the 429 came no sooner than the homeserver asked (it asks for up to
    // 5 s; the proxy's clock allows for scheduling).
    let puts: Vec<(Instant, String)> = w
        .proxy
        .seen_timed()
        .into_iter()
        .filter(|(_, l)| l.starts_with("PUT ") && l.contains("/send/"))
        .collect();
    let first_repeat = puts
        .iter()
        .enumerate()
        .find(|(i, (_, l))| puts[..*i].iter().any(|(_, p)| p == l))
        .map(|(i, _)| i)
        .expect("no send was repeated after the 429");
    let gap = puts[first_repeat].0 - puts[first_repeat - 1].0;
    assert!(
        gap >= Duration::from_millis(1500),
        "the adapter sent again {} ms after the 429",
        gap.as_millis()
    );
    drop(w);
    drop(hs);
}
