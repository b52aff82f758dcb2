//! The Signal channel end to end: the real `carapace run` with the real broker, policy and
//! gateway, the real `carapace-channel` adapter as a confined child, and as its daemon the
//! wire-exact fake signal-cli (`fake-signal-cli`, carapace_tests::fake_signal_cli), itself run
//! confined by `carapace run` under its own profile like the real one, the two joined by the
//! supervisor's socket pair; a fake OpenAI-compatible model answers. Root only: like the other
//! service tests they fail, never skip, when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::time::Duration;

use carapace_tests::fake_llm::FakeLlm;
use carapace_tests::fake_signal_cli::FakeSignal;
use carapace_tests::service::{channel_bin, policy_text, status_field, Service, StartOpts};
use carapace_tests::{require_root, wait_for};
use serde_json::json;

const ACCOUNT: &str = "+15550000000";
/// The admitted sender.
const ALICE: &str = "+15551110000";
const ALICE_UUID: &str = "0b1c9a47-2f6e-4d7a-9a4e-6f3c2d1b0a99";
/// A sender the policy does not admit.
const MALLORY: &str = "+15552220000";
const MALLORY_UUID: &str = "7d2e1f00-0000-4000-8000-000000000002";
const GROUP: &str = "Pmpi+EfPWmsxiomLe9Nx2XF9HOE483p6iKiFj65iMwI=";

/// The port the daemon's brokered network forwards (nothing needs to answer there: the fake
/// daemon does not connect; `egress_e2e` proves the forwarding itself).
const SERVICE_PORT: u16 = 4443;

struct World {
    svc: Service,
    sig: FakeSignal,
    _llm: FakeLlm,
}

fn start() -> World {
    require_root("Signal");
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let policy = policy_text(&format!(
        r#"
[channels.sig]
why = "the test chats"
kind = "adapter"
senders = ["{ALICE}"]
recipients = []
reply_to_senders = true
retry = {{ attempts = 6, initial_delay = "200ms", max_delay = "1s" }}

[profiles.sig]
why = "the Signal adapter under test"
extends = "channel"

[profiles.sig.broker]
deliver = ["sig"]

[profiles.signal-cli]
why = "the (fake) signal-cli daemon: its workspace is the account's data; its service by name through the broker, as the shipped example has it"
extends = "channel"

[profiles.signal-cli.network]
mode = "brokered"

[profiles.signal-cli.broker]
connect = [{{ host = "localhost", port = {service}, allow_private = true, why = "a stand-in for Signal's service" }}]

[profiles.agent]
why = "the gateway under test: answers on sig, reaches the fake model"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["sig"]
"#,
        llm = llm.addr().port(),
        service = SERVICE_PORT,
    ));
    let config = format!(
        r#"
[channels.sig]
kind = "signal"
program = "{bin}"
profile = "sig"
account = "{ACCOUNT}"
request_timeout = "3s"
probe_interval = "300ms"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 20, crash_loop_window = "60s" }}
daemon = {{ program = "{fake}", profile = "signal-cli" }}
"#,
        bin = channel_bin().display(),
        fake = env!("CARGO_BIN_EXE_fake-signal-cli"),
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
    // The daemon's workspace: the default, beneath the state directory.
    let sig = FakeSignal::new(&svc.state_dir().join("signal-cli").join("sig"));
    World {
        svc,
        sig,
        _llm: llm,
    }
}

/// The TCP sockets listening in `pid`'s network namespace, as `ADDR:PORT` in /proc's hex.
fn listening(pid: i64) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A")).then(|| f[1].to_string())
        })
        .collect()
}

fn assert_confined(pid: i64, what: &str) {
    assert_eq!(status_field(pid, "Seccomp"), "2", "{what}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "{what}");
    let netdev = fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{what}'s network namespace");
    let uid = status_field(pid, "Uid");
    assert!(!uid.starts_with("0\t"), "{what} runs as root: {uid}");
}

/// The texts sent to `to` (a number, or `group:<id>`).
fn texts_to(sig: &FakeSignal, to: &str) -> Vec<String> {
    sig.sent()
        .iter()
        .filter(|p| match to.strip_prefix("group:") {
            Some(g) => p["groupId"] == g,
            None => p["recipient"] == json!([to]),
        })
        .filter_map(|p| p["message"].as_str().map(str::to_string))
        .collect()
}

fn count_containing(sig: &FakeSignal, needle: &str) -> usize {
    sig.sent()
        .iter()
        .filter(|p| p["message"].as_str().unwrap_or("").contains(needle))
        .count()
}

#[test]
fn signal_admitted_sender_is_answered_in_place_and_a_stranger_is_held_both_children_confined() {
    let w = start();
    // Both the adapter and the daemon run confined, neither with a network of its own: the
    // adapter's namespace has nothing listening, the daemon's (brokered) only the supervisor's
    // forwarder at the service name's loopback address (127.0.0.2 = 0200007F).
    let adapter = w.svc.adapter_pid("sig", None);
    let daemon = w.svc.adapter_pid("sig-signal-cli", None);
    assert_confined(adapter, "the adapter");
    assert_confined(daemon, "the daemon");
    assert_eq!(listening(adapter), Vec::<String>::new());
    assert_eq!(
        listening(daemon),
        [format!("0200007F:{SERVICE_PORT:04X}")],
        "the daemon's forwarded service"
    );

    // A private message: answered to the sender.
    w.sig
        .push_text(ALICE, ALICE_UUID, 1_700_000_000_001, "hello agent", None);
    w.sig.wait_sent(1, Duration::from_secs(30));
    let t = texts_to(&w.sig, ALICE);
    assert_eq!(t.len(), 1, "{:?}", w.sig.sent());
    assert!(
        t[0].starts_with("echo: ") && t[0].contains("hello agent"),
        "{t:?}"
    );

    // A group message: answered in the group.
    w.sig.push_text(
        ALICE,
        ALICE_UUID,
        1_700_000_000_002,
        "hello group",
        Some(GROUP),
    );
    w.sig.wait_sent(2, Duration::from_secs(30));
    let g = texts_to(&w.sig, &format!("group:{GROUP}"));
    assert_eq!(g.len(), 1, "{:?}", w.sig.sent());
    assert!(g[0].contains("hello group"), "{g:?}");

    // A stranger: held, never answered.
    w.sig
        .push_text(MALLORY, MALLORY_UUID, 1_700_000_000_003, "let me in", None);
    let h = wait_for(Duration::from_secs(20), "a held message", || {
        let h = w.svc.held();
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h[0]["sender"], MALLORY);
    assert_eq!(h[0]["channel"], "sig");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(texts_to(&w.sig, MALLORY).is_empty());

    // `carapace status` shows the channel up.
    let st = wait_for(Duration::from_secs(10), "the channel reported up", || {
        let st = w.svc.channel_status("sig");
        (st["connected"] == true).then_some(st)
    });
    assert!(
        st["last_in"].is_string() && st["last_out"].is_string(),
        "{st}"
    );
}

#[test]
fn signal_daemon_dropped_mid_conversation_loses_nothing_and_doubles_nothing() {
    let w = start();
    let adapter = w.svc.adapter_pid("sig", None);
    w.sig
        .push_text(ALICE, ALICE_UUID, 1_700_000_000_010, "first", None);
    w.sig.wait_sent(1, Duration::from_secs(30));

    // The daemon dies in the middle of a line; messages arrive while it is down, and the first
    // one is handed over again (as Signal does when a daemon died before acknowledging it).
    w.sig.crash();
    wait_for(Duration::from_secs(20), "the daemon's restart", || {
        (w.sig.starts() >= 2).then_some(())
    });
    w.sig
        .push_text(ALICE, ALICE_UUID, 1_700_000_000_010, "first", None);
    w.sig
        .push_text(ALICE, ALICE_UUID, 1_700_000_000_011, "second", None);
    w.sig
        .push_text(ALICE, ALICE_UUID, 1_700_000_000_012, "third", None);
    w.sig.wait_sent(3, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for word in ["first", "second", "third"] {
        assert_eq!(
            count_containing(&w.sig, word),
            1,
            "{word}: {:?}",
            w.sig.sent()
        );
    }
    assert_eq!(w.sig.pending(), 0);
    // The adapter lived through it.
    assert_eq!(w.svc.adapter_pid("sig", None), adapter);
    // The probe that the dead daemon swallowed timed out; the next one finds the new daemon.
    wait_for(Duration::from_secs(15), "the channel reported up", || {
        (w.svc.channel_status("sig")["connected"] == true).then_some(())
    });
}

#[test]
fn signal_malformed_frames_and_a_rate_limit_are_handled() {
    let w = start();
    let adapter = w.svc.adapter_pid("sig", None);
    w.sig.push_raw("this is not JSON");
    w.sig
        .push_raw(r#"{"jsonrpc":"2.0","method":"receive","params":{}}"#);
    w.sig.push_raw(
        r#"{"jsonrpc":"2.0","method":"receive","params":{"envelope":{"sourceNumber":"+1"}}}"#,
    );
    w.sig
        .push_raw(r#"{"jsonrpc":"2.0","result":{},"id":999999}"#);
    // Signal asks us to slow down twice: the answer still goes out, once.
    w.sig.rate_limit(2);
    w.sig.push_text(
        ALICE,
        ALICE_UUID,
        1_700_000_000_020,
        "after the noise",
        None,
    );
    w.sig.wait_sent(1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count_containing(&w.sig, "after the noise"),
        1,
        "{:?}",
        w.sig.sent()
    );
    assert_eq!(w.sig.rate_limits_left(), Some(0));
    assert_eq!(
        w.svc.adapter_pid("sig", None),
        adapter,
        "the adapter died of a bad frame"
    );
    let log = w.svc.log_text();
    assert!(
        log.contains("malformed"),
        "no malformed-line error in the log"
    );
    assert!(log.contains("rate limit"), "no rate-limit line in the log");
}
