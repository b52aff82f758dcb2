#![allow(clippy::unwrap_used, clippy::expect_used)]

use carapace_broker::protocol::SendOutcome;
use carapace_tests::irc_fake::{FakeIrc, FakeIrcOpts, HOST};

use super::*;
use crate::broker::fake::FakeBroker;

const WAIT: Duration = Duration::from_secs(30);

fn msg(line: &str) -> Message {
    parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn got(line: &str, identity: Identity, cm: ChannelMessages) -> Received {
    inbound_of(&msg(line), "Bot", identity, cm, || "conn:1:1".into())
}

fn delivered(line: &str, identity: Identity, cm: ChannelMessages) -> Inbound {
    match got(line, identity, cm) {
        Received::Deliver(i) => i,
        Received::Skip(why) => panic!("{line}: skipped: {why}"),
    }
}

#[test]
fn private_and_channel_messages_become_inbound() {
    let i = delivered(
        "@msgid=AbC;time=2026-01-01T00:00:00.000Z :Alice!a@h PRIVMSG Bot :hello",
        Identity::Nick,
        ChannelMessages::Mentions,
    );
    assert_eq!(
        i,
        Inbound {
            id: "msgid:AbC".into(),
            sender: "alice".into(),
            conversation: "alice".into(),
            reply_to: "Alice".into(),
            text: "hello".into(),
        }
    );
    // In a channel: only what is addressed to the bot, the address removed.
    let i = delivered(
        ":Alice!a@h PRIVMSG #Chan :bot: what time is it?",
        Identity::Nick,
        ChannelMessages::Mentions,
    );
    assert_eq!(
        (i.conversation.as_str(), i.reply_to.as_str()),
        ("#chan", "#chan")
    );
    assert_eq!(i.text, "what time is it?");
    assert_eq!(i.id, "conn:1:1");
    assert_eq!(
        got(
            ":Alice!a@h PRIVMSG #chan :just chatting",
            Identity::Nick,
            ChannelMessages::Mentions
        ),
        Received::Skip("a channel message not addressed to the bot")
    );
    let i = delivered(
        ":Alice!a@h PRIVMSG #chan :just chatting",
        Identity::Nick,
        ChannelMessages::All,
    );
    assert_eq!(i.text, "just chatting");
    // ACTION is delivered; other CTCP, our own lines and empty text are not.
    let i = delivered(
        ":Alice!a@h PRIVMSG Bot :\u{1}ACTION waves\u{1}",
        Identity::Nick,
        ChannelMessages::All,
    );
    assert_eq!(i.text, "/me waves");
    for line in [
        ":Alice!a@h PRIVMSG Bot :\u{1}VERSION\u{1}",
        ":BOT!b@h PRIVMSG #chan :bot: me",
        ":Alice!a@h PRIVMSG Bot :   ",
        ":irc.server PRIVMSG",
        "PRIVMSG Bot :no prefix",
    ] {
        assert!(
            matches!(
                got(line, Identity::Nick, ChannelMessages::All),
                Received::Skip(_)
            ),
            "{line}"
        );
    }
    // A time tag without msgid gives an id stable across a replay of the same line.
    let a = delivered(
        "@time=2026-01-01T00:00:01.000Z :Alice!a@h PRIVMSG Bot :x",
        Identity::Nick,
        ChannelMessages::All,
    );
    let b = delivered(
        "@time=2026-01-01T00:00:01.000Z :Alice!a@h PRIVMSG Bot :x",
        Identity::Nick,
        ChannelMessages::All,
    );
    let c = delivered(
        "@time=2026-01-01T00:00:01.000Z :Alice!a@h PRIVMSG Bot :y",
        Identity::Nick,
        ChannelMessages::All,
    );
    assert!(a.id.starts_with("time:2026-01-01T00:00:01.000Z:"));
    assert_eq!(a.id, b.id);
    assert_ne!(a.id, c.id);
}

#[test]
fn account_identity_never_confuses_a_nick_with_an_account() {
    let i = delivered(
        "@account=AliceAcct :Alice!a@h PRIVMSG Bot :hi",
        Identity::Account,
        ChannelMessages::All,
    );
    assert_eq!(i.sender, "aliceacct");
    assert_eq!(i.reply_to, "Alice");
    // Not logged in: the nick alone, marked, so a policy naming the account does not match.
    for line in [
        ":aliceacct!a@h PRIVMSG Bot :hi",
        "@account=* :aliceacct!a@h PRIVMSG Bot :hi",
    ] {
        let i = delivered(line, Identity::Account, ChannelMessages::All);
        assert_eq!(i.sender, "unidentified:aliceacct", "{line}");
    }
}

#[test]
fn sasl_plain_response_is_chunked_as_the_spec_says() {
    let c = sasl_plain_chunks("bot", b"pw");
    assert_eq!(
        c,
        [base64::engine::general_purpose::STANDARD.encode(b"bot\0bot\0pw")]
    );
    // 300 raw bytes are exactly 400 base64 characters: a `+` follows.
    let c = sasl_plain_chunks("u", &[b'x'; 296]);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].len(), c[1].as_str()), (400, "+"));
    let c = sasl_plain_chunks("u", &[b'x'; 400]);
    assert_eq!(c.len(), 2);
    assert!(c[0].len() == 400 && c[1].len() < 400 && c[1] != "+");
}

#[test]
fn failures_are_classified() {
    let e = send_failure(&msg(":s 401 bot nobody :No such nick")).unwrap();
    assert_eq!(e.kind, FailureKind::Rejected);
    let e = send_failure(&msg(":s 263 bot PRIVMSG :try again")).unwrap();
    assert_eq!(
        (e.kind, e.retry_after),
        (FailureKind::Throttled, Some(THROTTLE_WAIT))
    );
    assert!(send_failure(&msg(":s 372 bot :motd")).is_none());
}

fn settings(port: u16, password: bool) -> IrcSettings {
    IrcSettings {
        server: format!("127.0.0.1:{port}"),
        security: Security::Plain,
        nick: "bot".into(),
        username: None,
        realname: "carapace".into(),
        channels: vec!["#room".into()],
        password_secret: password.then(|| "sasl".into()),
        sasl_username: Some("botacct".into()),
        identity: Identity::Nick,
        channel_messages: ChannelMessages::Mentions,
    }
}

struct Running {
    broker: Arc<FakeBroker>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

fn start(fake: &FakeIrc, password: Option<&str>) -> Running {
    let broker = Arc::new(match password {
        Some(p) => FakeBroker::with_secret("sasl", p.as_bytes()),
        None => FakeBroker::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let ctx = Arc::new(Ctx::new(
        "irc".into(),
        dir.path().to_path_buf(),
        broker.clone(),
    ));
    let task = tokio::spawn(run(ctx, settings(fake.addr().port(), password.is_some())));
    Running { broker, dir, task }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outbound(id: &str, recipient: &str, body: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        recipient: recipient.into(),
        body: body.into(),
        in_reply_to: None,
        attempt: 1,
        buttons: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_registration_delivery_malformed_lines_and_sending() {
    let fake = FakeIrc::start(FakeIrcOpts {
        sasl: Some(("botacct".into(), "s3cret".into())),
        ..FakeIrcOpts::default()
    });
    let r = start(&fake, Some("s3cret\n"));
    until("registration", || fake.registered() == 1).await;
    assert_eq!(fake.sasl_results(), [true]);
    let lines = fake.lines();
    assert_eq!(lines[0], "CAP LS 302");
    assert!(
        lines.contains(&"CAP REQ :message-tags server-time account-tag sasl".to_string()),
        "{lines:?}"
    );
    assert!(lines.contains(&"AUTHENTICATE PLAIN".to_string()));
    let end = lines.iter().position(|l| l == "CAP END").unwrap();
    let auth = lines
        .iter()
        .rposition(|l| l.starts_with("AUTHENTICATE "))
        .unwrap();
    assert!(
        auth < end,
        "CAP END before the SASL exchange ended: {lines:?}"
    );
    until("the JOIN", || {
        fake.lines().contains(&"JOIN #room".to_string())
    })
    .await;
    until("connected", || {
        r.broker.st().states.last().is_some_and(|s| s.0)
    })
    .await;

    // Malformed lines are logged and skipped; what follows is delivered.
    fake.inject("@bad tag=1 PRIVMSG bot :x");
    fake.inject(&format!(":a!b@c PRIVMSG bot :{}", "x".repeat(700)));
    fake.inject("\u{0}\u{1}garbage");
    fake.privmsg(
        "msgid=m1;time=2026-01-01T00:00:00.000Z",
        "Alice",
        "bot",
        "hello",
    );
    fake.privmsg("", "Alice", "#room", "bot, in the room");
    until("two deliveries", || r.broker.st().delivered.len() == 2).await;
    let d = r.broker.st().delivered.clone();
    assert_eq!(
        (d[0].id.as_str(), d[0].sender.as_str(), d[0].text.as_str()),
        ("msgid:m1", "alice", "hello")
    );
    assert_eq!(
        (d[1].conversation.as_str(), d[1].text.as_str()),
        ("#room", "in the room")
    );
    // The cursor is the server time of the last delivered message that had one.
    let saved: IrcCursor = CursorStore::new(r.dir.path(), CURSOR_NAME)
        .load()
        .unwrap()
        .unwrap();
    assert_eq!(saved.time, "2026-01-01T00:00:00.000Z");

    // A long answer: split, each relayed line within 512 bytes, confirmed by the PONG.
    let long = "word ".repeat(300);
    r.broker
        .st()
        .outbox
        .push_back(outbound("o1", "Alice", &long));
    until("the ack", || !r.broker.st().acks.is_empty()).await;
    assert!(
        matches!(r.broker.st().acks[0].1, SendOutcome::Sent { .. }),
        "{:?}",
        r.broker.st().acks
    );
    let sent = fake.sent();
    assert!(sent.len() >= 3, "{sent:?}");
    for (target, text) in &sent {
        assert_eq!(target, "Alice");
        let relayed = format!(":bot!bot@{HOST} PRIVMSG {target} :{text}\r\n");
        assert!(relayed.len() <= 512, "{}", relayed.len());
    }
    let joined: Vec<String> = sent.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(joined.join(" "), long.trim_end());

    // A rate-limit reply: the send fails for retry, with the pause.
    fake.throttle(1);
    r.broker
        .st()
        .outbox
        .push_back(outbound("o2", "#room", "hi"));
    until("the second ack", || r.broker.st().acks.len() == 2).await;
    assert!(
        matches!(&r.broker.st().acks[1].1, SendOutcome::Failed { retry: true, error } if error.contains("263")),
        "{:?}",
        r.broker.st().acks
    );
    // Throttled at its second piece: the retry resumes there, nothing is sent twice.
    fake.throttle_after(1, 1);
    let before = fake.sent().len();
    r.broker
        .st()
        .outbox
        .push_back(outbound("o4", "#room", "first\nsecond\nthird"));
    until("the third ack", || r.broker.st().acks.len() == 3).await;
    assert!(
        matches!(&r.broker.st().acks[2].1, SendOutcome::Failed { retry: true, error } if error.contains("piece 2 of 3")),
        "{:?}",
        r.broker.st().acks
    );
    r.broker
        .st()
        .outbox
        .push_back(outbound("o4", "#room", "first\nsecond\nthird"));
    until("the fourth ack", || r.broker.st().acks.len() == 4).await;
    assert!(matches!(&r.broker.st().acks[3].1, SendOutcome::Sent { .. }));
    let texts: Vec<String> = fake.sent()[before..]
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(texts, ["first", "second", "third"]);
    // An empty answer is refused for good, nothing sent.
    r.broker
        .st()
        .outbox
        .push_back(outbound("o3", "#room", " \n "));
    until("the last ack", || r.broker.st().acks.len() == 5).await;
    assert!(matches!(
        &r.broker.st().acks[4].1,
        SendOutcome::Failed { retry: false, .. }
    ));
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_is_survived_and_a_replay_is_not_delivered_twice() {
    let fake = FakeIrc::start(FakeIrcOpts::default());
    let r = start(&fake, None);
    until("registration", || fake.registered() == 1).await;
    // No password: no SASL asked for.
    assert!(!fake
        .lines()
        .iter()
        .any(|l| l.contains("sasl") || l.starts_with("AUTHENTICATE")));
    fake.privmsg(
        "msgid=a;time=2026-01-01T00:00:00.000Z",
        "alice",
        "bot",
        "one",
    );
    until("one delivery", || r.broker.st().delivered.len() == 1).await;
    fake.drop_client();
    until("the drop reported", || {
        r.broker.st().states.last().is_some_and(|s| !s.0)
    })
    .await;
    until("reconnection", || fake.registered() == 2).await;
    until("connected again", || {
        r.broker.st().states.last().is_some_and(|s| s.0)
    })
    .await;
    // A bouncer-style replay of what was delivered, then something new.
    fake.privmsg(
        "msgid=a;time=2026-01-01T00:00:00.000Z",
        "alice",
        "bot",
        "one",
    );
    fake.privmsg("time=2025-12-31T00:00:00.000Z", "alice", "bot", "older");
    fake.privmsg(
        "msgid=b;time=2026-01-01T00:00:05.000Z",
        "alice",
        "bot",
        "two",
    );
    until("two deliveries", || r.broker.st().delivered.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let texts: Vec<String> = r
        .broker
        .st()
        .delivered
        .iter()
        .map(|i| i.text.clone())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    r.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_or_no_sasl_is_an_error_not_a_plain_login() {
    let fake = FakeIrc::start(FakeIrcOpts {
        sasl: Some(("botacct".into(), "right".into())),
        ..FakeIrcOpts::default()
    });
    let r = start(&fake, Some("wrong"));
    until("a failed SASL", || !fake.sasl_results().is_empty()).await;
    until("the error reported", || {
        r.broker
            .st()
            .states
            .iter()
            .any(|(c, e)| !c && e.as_deref().is_some_and(|e| e.contains("SASL")))
    })
    .await;
    assert_eq!(fake.registered(), 0, "registered without SASL");
    assert!(!fake.lines().contains(&"CAP END".to_string()));
    r.task.abort();

    let fake = FakeIrc::start(FakeIrcOpts {
        caps: vec!["message-tags".into()],
        sasl: None,
    });
    let r = start(&fake, Some("pw"));
    until("the error reported", || {
        r.broker
            .st()
            .states
            .iter()
            .any(|(c, e)| !c && e.as_deref().is_some_and(|e| e.contains("no SASL")))
    })
    .await;
    assert_eq!(fake.registered(), 0);
    r.task.abort();
}

/// Connects to 127.0.0.1:port whatever the host (the TLS name stays the configured host).
struct LoopDial(u16);

impl Dial for LoopDial {
    async fn dial(&self, _host: &str, _port: u16) -> Result<tokio::net::TcpStream, ServiceError> {
        tokio::net::TcpStream::connect(("127.0.0.1", self.0))
            .await
            .map_err(|e| ServiceError::new(FailureKind::Unreachable, e.to_string()))
    }
}

fn tls_cfg(host: &str, tls: Arc<rustls::ClientConfig>) -> IrcConfig {
    IrcConfig {
        host: host.into(),
        port: 6697,
        tls: Some(tls),
        nick: "tlsbot".into(),
        user: "tlsbot".into(),
        realname: "carapace".into(),
        channels: vec![carapace_tests::irc_server::CHANNEL.into()],
        sasl: None,
        identity: Identity::Nick,
        channel_messages: ChannelMessages::Mentions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_real_server_checks_the_certificate_and_the_name() {
    use carapace_tests::irc_server::{IrcClient, Ngircd};
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["irc.carapace.test".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    let server = Ngircd::start_tls(&cert.pem(), &key.serialize_pem());
    let tls_port = server.tls_port.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let trusting = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let spawn = |cfg: IrcConfig| {
        let broker = Arc::new(FakeBroker::default());
        let dir = tempfile::tempdir().unwrap();
        let ctx = Arc::new(Ctx::new(
            "irc".into(),
            dir.path().to_path_buf(),
            broker.clone(),
        ));
        let task = tokio::spawn(async move { run_with(&ctx, LoopDial(tls_port), cfg).await });
        (broker, dir, task)
    };

    // The right name on a certificate the roots vouch for: registered over TLS, and a message
    // from a person on the plain port arrives through it.
    let (broker, _dir, task) = spawn(tls_cfg("irc.carapace.test", trusting.clone()));
    let alice = tokio::task::spawn_blocking({
        let port = server.port();
        move || IrcClient::connect(port, "alice")
    })
    .await
    .unwrap();
    until("connected over TLS", || {
        broker.st().states.last().is_some_and(|s| s.0)
    })
    .await;
    alice.privmsg("tlsbot", "over tls");
    until("the delivery", || !broker.st().delivered.is_empty()).await;
    assert_eq!(broker.st().delivered[0].text, "over tls");
    assert_eq!(broker.st().delivered[0].sender, "alice");
    task.abort();

    // Another name, or roots that do not know the certificate: refused before registration.
    for cfg in [
        tls_cfg("other.carapace.test", trusting.clone()),
        tls_cfg("irc.carapace.test", crate::net::tls_config().unwrap()),
    ] {
        let (broker, _dir, task) = spawn(cfg);
        until("the TLS error", || {
            broker
                .st()
                .states
                .iter()
                .any(|(c, e)| !c && e.as_deref().is_some_and(|e| e.contains("TLS")))
        })
        .await;
        assert!(
            broker.st().states.iter().all(|(c, _)| !c),
            "{:?}",
            broker.st().states
        );
        task.abort();
    }
    drop(alice);
}
