//! The Telegram adapter (in process, with its real broker session pool) against the real broker
//! operations (`Ops`: policy-checked, audited, with a state directory) and the fake Bot API: an
//! admitted sender reaches the gateway, a stranger is held, the agent's answer goes out through
//! the outbox threaded to the message it answers, a repeated send key is not sent twice, a
//! stranger is not written to, and a message Telegram refuses is dead-lettered.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_broker::audit::AuditLog;
use carapace_broker::client::Client;
use carapace_broker::dlq::DeadLetters;
use carapace_broker::ops::{Ops, OpsConfig};
use carapace_broker::protocol::{seqpacket_pair, InboundMessage, SendStatus};
use carapace_broker::server::{Handler, Identity, PeerLimits, Role, Server};
use carapace_channels::adapter::Ctx;
use carapace_channels::settings::{KindSettings, TelegramSettings};
use carapace_policy::Policy;
use carapace_tests::fake_telegram::{FakeTelegram, Injected};
use serde_json::json;

const TOKEN: &str = "31337:real-ops_token_abcdef";
const WAIT: Duration = Duration::from_secs(20);

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn telegram_against_the_real_broker_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fake = FakeTelegram::start(TOKEN);
    let port = fake.addr().port();
    std::fs::write(dir.join("bot"), TOKEN).unwrap();
    std::fs::set_permissions(dir.join("bot"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(dir.join("state")).unwrap();
    std::fs::create_dir(dir.join("ws")).unwrap();
    let text = format!(
        r#"
version = 1
[profiles.tgad]
why = "the telegram adapter"
[profiles.tgad.broker]
deliver = ["tg"]
secrets = ["bot"]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "the fake Bot API" }} ]
[profiles.gw]
why = "the gateway"
[profiles.gw.broker]
inbound = true
approve = true
channels = ["tg"]
[secrets.bot]
why = "the bot token"
file = "{d}/bot"
[channels.tg]
why = "chat"
kind = "adapter"
recipients = ["-100"]
senders = ["42"]
reply_to_senders = true
retry = {{ attempts = 2, initial_delay = "1s", max_delay = "1s" }}
"#,
        d = dir.display()
    );
    let policy = Policy::parse(&text, "real_ops.toml").unwrap_or_else(|e| panic!("{e}"));
    let ops = Arc::new(
        Ops::new(
            policy,
            AuditLog::open(dir.join("audit.log")).unwrap(),
            DeadLetters::open(dir.join("dlq")).unwrap(),
            None,
            None,
            OpsConfig {
                state_dir: Some(dir.join("state")),
                ..OpsConfig::default()
            },
        )
        .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new(ops.clone() as Arc<dyn Handler>, PeerLimits::default());
    let (ad_child, ad_broker) = seqpacket_pair().unwrap();
    let (gw_child, gw_broker) = seqpacket_pair().unwrap();
    {
        let _g = rt.enter();
        server.serve_peer(
            ad_broker,
            Identity {
                id: 1,
                role: Role::Channel,
                profile: "tgad".into(),
            },
        );
        server.serve_peer(
            gw_broker,
            Identity {
                id: 2,
                role: Role::Gateway,
                profile: "gw".into(),
            },
        );
    }
    let broker = Arc::new(carapace_channels::broker::Broker::new(
        "tg".into(),
        ad_child,
    ));
    let ctx = Arc::new(Ctx::new("tg".into(), dir.join("ws"), broker));
    let adapter = rt.spawn(carapace_channels::run_adapter(
        ctx,
        KindSettings::Telegram(TelegramSettings {
            api_base: fake.base_url(),
            token_secret: "bot".into(),
            poll_timeout_ms: 1_000,
        }),
    ));
    let mut gw = Client::new(gw_child);

    // An admitted sender reaches the gateway; a stranger is held.
    let (u1, m1) = fake.push_text(42, 42, "hello agent");
    let (u2, _) = fake.push_text(99, 99, "who is this?");
    let mut after = 0;
    let got: InboundMessage = until("the inbound message", || {
        let (msgs, next) = gw.inbound(after, 500).unwrap();
        after = next;
        msgs.into_iter().next()
    });
    assert_eq!(
        (got.channel.as_str(), got.sender.as_str(), got.body.as_str()),
        ("tg", "42", "hello agent")
    );
    assert_eq!(
        (
            got.id.as_str(),
            got.conversation.as_str(),
            got.reply_to.as_str()
        ),
        (format!("update:{u1}").as_str(), "42", "42")
    );
    let held = until("the held message", || {
        let (held, _) = gw.held().unwrap();
        (!held.is_empty()).then_some(held)
    });
    assert_eq!(
        (held[0].sender.as_str(), held[0].body.as_str()),
        ("99", "who is this?")
    );
    fake.wait_offset(u2 + 1, WAIT);

    // The answer goes out through the outbox, threaded; a repeated key is not sent again.
    let r = gw
        .send_with("tg", "42", "hello human", Some(&got.id), Some("k1"))
        .unwrap();
    assert_eq!(r.status, SendStatus::Queued);
    let sent = fake.wait_sent(1, WAIT);
    assert_eq!(
        (sent[0]["chat_id"].clone(), sent[0]["text"].clone()),
        (json!(42), json!("hello human"))
    );
    assert_eq!(sent[0]["reply_parameters"]["message_id"], json!(m1));
    let r = gw
        .send_with("tg", "42", "hello human", Some(&got.id), Some("k1"))
        .unwrap();
    assert_eq!(r.status, SendStatus::Duplicate);
    until("the confirmation", || {
        ops.channel_stats()
            .into_iter()
            .find(|s| s.channel == "tg" && s.last_out.is_some() && s.outbox == 0)
    });
    // Not a recipient, not the reply address of an admitted sender: the broker dead-letters
    // it, the adapter never sees it.
    let r = gw.send_with("tg", "99", "x", None, None).unwrap();
    assert_eq!(r.status, SendStatus::DeadLettered);

    // Telegram refuses it (4xx): dead-lettered, not retried.
    fake.inject(
        "sendMessage",
        Injected::error(403, "Forbidden: bot was blocked by the user"),
    );
    gw.send_with("tg", "42", "are you there?", None, Some("k2"))
        .unwrap();
    // The letter is written before the message leaves the outbox (a crash between the two
    // keeps both, never neither): wait for both.
    let stats = until("the dead letter, out of the outbox", || {
        ops.channel_stats()
            .into_iter()
            .find(|s| s.channel == "tg" && s.dead_lettered == 2 && s.outbox == 0)
    });
    assert_eq!(stats.connected, Some(true));
    assert_eq!(fake.sent().len(), 1);

    // The audit log has the deliveries, never the token.
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(
        audit.contains("tg:42") && audit.contains("tg:99"),
        "{audit}"
    );
    assert!(!audit.contains(TOKEN) && !audit.contains("hello agent"));
    adapter.abort();
}
