//! `carapace-channel`: a channel adapter, run as a confined child of `carapace run`.
//!
//! One adapter per process, picked by its settings (`$CARAPACE_CHANNEL_SETTINGS`, written by
//! the supervisor from `[channels.NAME]`). It reaches its service only through the broker at
//! `$CARAPACE_BROKER_FD` (`connect`, then TLS inside the adapter; the credential through
//! `secret`), hands what it receives to the broker (`deliver`) and sends what the agent wrote
//! (`outbox`, `outbox_ack`). Design: docs/architecture.md ("Channel adapters").
//!
//! | module | room |
//! |---|---|
//! | [`settings`] | what the supervisor tells the adapter |
//! | [`broker`] | the broker as a trait, and its implementation over the blocking client |
//! | [`adapter`] | the loops every adapter shares: inbound with a durable cursor, outbound, reachability |
//! | [`cursor`] | the service cursor in the state directory |
//! | [`net`] | broker `connect` + rustls |
//! | [`http`] | a small HTTP/1.1 client over such a connection: timeout, body cap |
//! | [`telegram`] | the Telegram Bot API adapter |
//! | [`email`] | the e-mail adapter: IMAP in, SMTP out |
//! | [`webhook`] | the signed-webhook adapter |
//! | [`irc`] | the IRC adapter |
//! | [`signal`] | the Signal adapter: JSON-RPC to signal-cli's daemon on a socket from the supervisor |
//! | [`slack`] | the Slack adapter: Socket Mode in, `chat.postMessage` out |
//! | [`discord`] | the Discord adapter: Gateway WebSocket in, REST out |
//! | [`matrix`] | the Matrix client-server API adapter |

pub mod adapter;
pub mod broker;
pub mod cursor;
pub mod discord;
pub mod email;
pub mod http;
pub mod irc;
pub mod matrix;
pub mod net;
pub mod settings;
pub mod signal;
pub mod slack;
pub mod telegram;
pub mod webhook;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use adapter::{Ctx, RunError};
use broker::{Broker, BrokerApi};
use settings::{KindSettings, Settings};

/// Why the adapter cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error("no broker socket: {0} (run me under `carapace run`)")]
    NoBroker(#[source] carapace_broker::client::ClientError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// The inherited broker socket at `$CARAPACE_BROKER_FD`, checked by opening a session on it.
fn broker_socket() -> Result<OwnedFd, StartError> {
    let fd = carapace_broker::client::broker_fd_from_env().map_err(StartError::NoBroker)?;
    drop(carapace_broker::client::Client::from_env().map_err(StartError::NoBroker)?);
    // SAFETY: the inherited broker socket (checked to be an open SOCK_SEQPACKET socket by
    // `from_env` above) is this process's alone to own from here on; nothing else closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Cannot fail: the descriptor is open and ours.
    let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
    Ok(owned)
}

/// Run the adapter its settings name until SIGTERM/SIGINT.
pub fn run() -> Result<(), StartError> {
    let settings = Settings::from_env()?;
    let shared = broker_socket()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .thread_name("channel")
        .build()
        .map_err(StartError::Runtime)?;
    let Settings {
        channel,
        state_dir,
        kind,
    } = settings;
    tracing::info!(%channel, kind = kind.name(), pid = std::process::id(), "starting");
    let broker = Arc::new(Broker::new(channel.clone(), shared));
    let ctx = Arc::new(Ctx::new(channel, state_dir, broker));
    let r = rt.block_on(async move {
        tokio::select! {
            r = run_adapter(ctx, kind) => r,
            () = carapace_gateway::shutdown_signal() => Ok(()),
        }
    });
    // A broker long poll may be running on the blocking pool: do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(1));
    r.map_err(StartError::from)
}

/// The adapter of `kind`, with its loops.
pub async fn run_adapter<B: BrokerApi>(
    ctx: Arc<Ctx<B>>,
    kind: KindSettings,
) -> Result<(), RunError> {
    match kind {
        KindSettings::Telegram(s) => telegram::run(ctx, s).await,
        KindSettings::Webhook(s) => webhook::run(ctx, s).await,
        KindSettings::Email(s) => email::run(ctx, s).await,
        KindSettings::Irc(s) => irc::run(ctx, s).await,
        KindSettings::Signal(s) => signal::run(ctx, s).await,
        KindSettings::Slack(s) => slack::run(ctx, s).await,
        KindSettings::Discord(s) => discord::run(ctx, s).await,
        KindSettings::Matrix(s) => matrix::run(ctx, s).await,
    }
}

/// The fuzz entry point (`fuzz/fuzz_targets/channels.rs`, corpus replayed by
/// `channels/tests/fuzz_corpus.rs`): everything an adapter parses from outside — a Telegram
/// `getUpdates` answer, a webhook request body and signature header, the settings, a service
/// URL — and the message splitting. Nothing may panic; what decodes must hold its invariants.
pub fn fuzz_input(data: &[u8]) {
    for status in [200, 429, 502] {
        match telegram::parse_updates(status, data) {
            Ok(updates) => {
                assert_eq!(status, 200);
                for u in updates {
                    assert!(u.update_id >= 0);
                    if let telegram::Item::Message { inbound, .. } = u.item {
                        assert_eq!(inbound.id, format!("update:{}", u.update_id));
                        assert!(inbound.sender.parse::<i64>().is_ok());
                        assert_eq!(inbound.conversation, inbound.reply_to);
                    }
                }
            }
            Err(e) => assert!(!e.message.is_empty()),
        }
    }
    if let Ok(m) = webhook::parse_body(data) {
        for f in [&m.id, &m.sender, &m.conversation, &m.reply_to] {
            assert!(!f.is_empty() && f.len() <= 256 && !f.chars().any(char::is_control));
        }
    }
    // The signature header is the input's first line, the body the rest.
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let key = b"fuzz-key";
    assert!(!webhook::verify(key, body, Some(header)) || header.len() == 71);
    if let Some(sig) = webhook::sign(key, body) {
        assert!(webhook::verify(key, body, Some(sig.as_bytes())));
    }
    let text = String::from_utf8_lossy(data);
    let _ = settings::Settings::from_json(&text);
    if let Ok(u) = net::ServiceUrl::parse(&text) {
        assert!(!u.host().is_empty() && u.port() != 0);
        assert!(u.https() || net::is_loopback(u.host()));
    }
    let pieces = telegram::split_message(&text, 64);
    for p in &pieces {
        assert!(!p.is_empty() && p.encode_utf16().count() <= 64);
    }
    let kept: String = pieces
        .concat()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let all: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(kept, all);
}

/// The IRC fuzz entry point (`fuzz/fuzz_targets/irc.rs`, corpus replayed by
/// `channels/tests/irc_fuzz_corpus.rs`): server lines through the parser and what a PRIVMSG
/// delivers. Nothing may panic; what is delivered must hold the broker's invariants.
pub fn fuzz_irc_input(data: &[u8]) {
    irc::proto::fuzz_line(data);
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let Ok(m) = irc::proto::parse_line(line) else {
            continue;
        };
        for identity in [irc::Identity::Nick, irc::Identity::Account] {
            for cm in [irc::ChannelMessages::Mentions, irc::ChannelMessages::All] {
                if let irc::Received::Deliver(i) =
                    irc::inbound_of(&m, "bot", identity, cm, || "conn:0:1".into())
                {
                    assert!(!i.id.is_empty() && !i.sender.is_empty());
                    assert!(!i.text.trim().is_empty());
                    assert!(irc::proto::is_word(&i.reply_to));
                    assert!(!i.sender.chars().any(char::is_control));
                }
            }
        }
    }
}

/// The Signal fuzz entry point (`fuzz/fuzz_targets/signal.rs`, corpus replayed by
/// `channels/tests/fuzz_corpus.rs`): a line from signal-cli and a `send` result. Nothing may
/// panic; what decodes holds its invariants.
pub fn fuzz_signal_input(data: &[u8]) {
    match signal::wire::parse_line(data) {
        Ok(signal::wire::Frame::Received(signal::wire::Received::Message(m))) => {
            assert!(m.id.starts_with("signal:"));
            assert!(!m.sender.is_empty() && !m.text.is_empty());
            assert_eq!(m.conversation, m.reply_to);
            assert!(signal::wire::valid_recipient(&m.conversation));
        }
        Ok(_) => {}
        Err(e) => assert!(!e.0.is_empty()),
    }
    if signal::wire::salvage(data).is_some() {
        assert!(data.len() > 2);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Err(e) = signal::wire::send_outcome(&v) {
            assert!(!e.message.is_empty());
        }
    }
}

/// The Slack fuzz entry point (`fuzz/fuzz_targets/slack.rs`, corpus replayed by
/// `channels/tests/slack_fuzz_corpus.rs`): a Socket Mode frame, a Web API answer (as 200, 429
/// and 500), a socket URL and a recipient. Nothing may panic; what decodes holds its invariants.
pub fn fuzz_slack_input(data: &[u8]) {
    if let Ok(slack::Frame::Envelope {
        envelope_id,
        message,
        ..
    }) = slack::parse_frame(data)
    {
        assert!(!envelope_id.is_empty());
        let ack: serde_json::Value =
            serde_json::from_str(&slack::ack_frame(&envelope_id)).unwrap_or_default();
        assert_eq!(ack["envelope_id"], envelope_id.as_str());
        if let Ok(m) = message {
            assert!(slack::is_user_id(&m.sender));
            assert_eq!(m.conversation, m.reply_to);
            assert!(m.id.starts_with("msg:"));
            assert!(slack::parse_recipient(&m.reply_to).is_some());
            assert!(!m.text.trim().is_empty());
        }
    }
    for (status, retry) in [(200, None), (429, Some(3)), (500, None)] {
        match slack::api_result(status, retry, data) {
            Ok(v) => assert_eq!(v["ok"], true),
            Err(e) => {
                assert!(!e.message.is_empty());
                if status == 429 {
                    assert!(e.retry_after.is_some());
                }
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(u) = slack::SocketUrl::parse(&text) {
        assert!(!u.host().is_empty() && u.port() != 0);
        assert!(u.tls() || net::is_loopback(u.host()));
    }
    if let Some((channel, thread)) = slack::parse_recipient(&text) {
        assert!(!channel.contains(':'));
        assert!(thread.is_none_or(|t| t.contains('.')));
    }
    assert_eq!(slack::decode_entities(&slack::encode_entities(&text)), text);
}

/// The Matrix fuzz entry point (`fuzz/fuzz_targets/matrix.rs`, corpus replayed by
/// `channels/tests/fuzz_corpus.rs`): a `/sync` answer and an error answer. Nothing may panic;
/// what decodes must hold its invariants.
pub fn fuzz_matrix_input(data: &[u8]) {
    let me = "@bot:example.org";
    for status in [200, 429, 502] {
        match matrix::parse_sync(status, data, me) {
            Ok(batch) => {
                assert_eq!(status, 200);
                assert!(!batch.next_batch.is_empty());
                for item in batch.items {
                    if let matrix::Item::Message(m) = item {
                        assert!(m.id.starts_with('$'));
                        assert!(matrix::is_user_id(&m.sender) && m.sender != me);
                        assert!(m.conversation.starts_with('!'));
                        assert_eq!(m.conversation, m.reply_to);
                    }
                }
                for i in batch.invites {
                    assert!(i.room_id.starts_with('!') && matrix::is_user_id(&i.inviter));
                }
            }
            Err(e) => {
                assert!(!e.message.is_empty());
                assert!(e.retry_after.is_none() || e.kind == adapter::FailureKind::Throttled);
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    let enc = matrix::encode(&text);
    assert!(enc
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)));
    let t = matrix::txn_id(&text, 3);
    assert_eq!(t, matrix::txn_id(&text, 3));
    assert_ne!(t, matrix::txn_id(&text, 4));
    let pieces = telegram::split_message(&text, matrix::MAX_MESSAGE_UTF16);
    assert!(pieces
        .iter()
        .all(|p| p.encode_utf16().count() <= matrix::MAX_MESSAGE_UTF16));
}
