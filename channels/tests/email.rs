//! The e-mail channel's clients against real servers on loopback: Dovecot (IMAP) and aiosmtpd
//! (SMTP), from `carapace_tests::mail`. Plain TCP to 127.0.0.1 stands in for the broker's
//! `connect`; one test runs TLS (implicit and STARTTLS) with a certificate made here, and
//! proves the name is checked. Dovecot runs as root: these tests need it (house rule: they
//! fail, not skip, unless CARAPACE_ALLOW_SKIP=1).

// Helpers of the tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_channels::email::imap::{start_cursor, Cursor, ImapConfig, Mailbox, Woken};
use carapace_channels::email::parse::parse_message;
use carapace_channels::email::smtp::{build_message, submit, SmtpConfig, SmtpError};
use carapace_channels::email::threads::ThreadInfo;
use carapace_channels::email::Security;
use carapace_tests::mail::{Dovecot, DovecotTls, SmtpSink, MAIL_PASSWORD, MAIL_USER};
use tokio::net::TcpStream;

fn webpki_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn imap_config(security: Security, host: &str, tls: Arc<rustls::ClientConfig>) -> ImapConfig {
    ImapConfig {
        host: host.into(),
        security,
        username: MAIL_USER.into(),
        folder: "INBOX".into(),
        max_message: 64 * 1024,
        command_timeout: Duration::from_secs(10),
        poll_interval: Duration::from_secs(1),
        tls,
    }
}

async fn open(port: u16, cfg: &ImapConfig) -> Mailbox {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    Mailbox::open(s, cfg, MAIL_PASSWORD).await.unwrap()
}

fn mail(n: u32, extra: &str) -> Vec<u8> {
    format!(
        "From: Alice <Alice@Example.com>\r\nTo: agent@example.org\r\nSubject: note {n}\r\n\
         Message-ID: <n{n}@example.com>\r\n{extra}\r\nbody {n}\r\n"
    )
    .into_bytes()
}

/// Deliver everything above `cursor` the way the adapter does: fetch, parse, record, advance,
/// mark seen. Returns the parsed messages.
async fn drain(mb: &mut Mailbox, cursor: &mut Cursor) -> Vec<String> {
    let mut got = Vec::new();
    for uid in mb.new_uids(cursor.last_uid).await.unwrap() {
        let f = mb.fetch(uid).await.unwrap().expect("the message is there");
        let p = parse_message(&f.raw).unwrap();
        got.push(p.id(cursor.uid_validity, uid));
        cursor.last_uid = uid;
        mb.mark_seen(uid).await.unwrap();
    }
    got
}

fn root_or_skip() -> bool {
    carapace_tests::privileged()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_cursor_survives_a_restart_and_idle_wakes_up() {
    if !root_or_skip() {
        return;
    }
    let dovecot = Dovecot::start().unwrap();
    let cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    // Mail that was there before the first start is not delivered.
    dovecot.deliver(&mail(0, "")).unwrap();
    let mut mb = open(dovecot.port, &cfg).await;
    assert!(mb.idle, "Dovecot offers IDLE");
    let (mut cursor, note) = start_cursor(None, mb.uid_validity, mb.highest_uid);
    assert!(note.is_some());
    assert_eq!(cursor.last_uid, 1);
    assert!(drain(&mut mb, &mut cursor).await.is_empty());

    dovecot.deliver(&mail(1, "")).unwrap();
    dovecot.deliver(&mail(2, "")).unwrap();
    assert_eq!(
        drain(&mut mb, &mut cursor).await,
        ["n1@example.com", "n2@example.com"]
    );
    let saved = cursor;
    mb.logout().await;

    // A restart from the saved cursor delivers nothing again, and then only what is new.
    let mut mb = open(dovecot.port, &cfg).await;
    let (mut cursor, note) = start_cursor(Some(saved), mb.uid_validity, mb.highest_uid);
    assert_eq!((cursor, note), (saved, None));
    assert!(drain(&mut mb, &mut cursor).await.is_empty());

    // IDLE: a message arriving while the client waits wakes it up well before the limit.
    let started = Instant::now();
    let wait = tokio::spawn(async move {
        let w = mb.wait(Duration::from_secs(60)).await.unwrap();
        (mb, w)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    dovecot.deliver(&mail(3, "")).unwrap();
    let (mut mb, woken) = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("IDLE woke up")
        .unwrap();
    assert_eq!(woken, Woken::NewData);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(drain(&mut mb, &mut cursor).await, ["n3@example.com"]);
    // An IDLE with nothing new ends at its limit.
    assert_eq!(
        mb.wait(Duration::from_secs(1)).await.unwrap(),
        Woken::Timeout
    );
    // Delivered messages are \Seen; the one from before the first start is not.
    assert_eq!(dovecot.seen_files().len(), 3, "{:?}", dovecot.seen_files());
    mb.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_uidvalidity_change_restarts_at_the_top() {
    if !root_or_skip() {
        return;
    }
    let dovecot = Dovecot::start().unwrap();
    let cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    dovecot.deliver(&mail(1, "")).unwrap();
    let mb = open(dovecot.port, &cfg).await;
    let saved = Cursor {
        uid_validity: mb.uid_validity,
        last_uid: mb.highest_uid,
    };
    mb.logout().await;
    dovecot.reset_uids().unwrap();
    dovecot.deliver(&mail(2, "")).unwrap();
    let mut mb = open(dovecot.port, &cfg).await;
    assert_ne!(mb.uid_validity, saved.uid_validity);
    let (mut cursor, note) = start_cursor(Some(saved), mb.uid_validity, mb.highest_uid);
    assert!(note.unwrap().contains("UIDVALIDITY changed"));
    // Nothing of the renumbered folder is delivered again.
    assert!(drain(&mut mb, &mut cursor).await.is_empty());
    mb.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_big_messages_are_fetched_only_up_to_the_cap() {
    if !root_or_skip() {
        return;
    }
    let dovecot = Dovecot::start().unwrap();
    let cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    let mut mb = open(dovecot.port, &cfg).await;
    let big = "x".repeat(200 * 1024);
    dovecot
        .deliver(&format!("From: a@example.com\r\nSubject: big\r\n\r\n{big}\r\n").into_bytes())
        .unwrap();
    let uids = mb.new_uids(mb.highest_uid).await.unwrap();
    assert_eq!(uids.len(), 1);
    let f = mb.fetch(uids[0]).await.unwrap().unwrap();
    assert!(f.truncated);
    assert_eq!(f.raw.len(), cfg.max_message);
    assert!(f.size as usize > 200 * 1024);
    let p = parse_message(&f.raw).unwrap();
    assert_eq!(p.subject, "big");
    mb.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_wrong_password_is_refused() {
    if !root_or_skip() {
        return;
    }
    let dovecot = Dovecot::start().unwrap();
    let cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    let s = TcpStream::connect(("127.0.0.1", dovecot.port))
        .await
        .unwrap();
    let e = Mailbox::open(s, &cfg, "wrong").await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("login"), "{text}");
    assert!(
        !text.contains("wrong"),
        "the password is not in the error: {text}"
    );
}

fn smtp_config(port_host: &str) -> SmtpConfig {
    SmtpConfig {
        host: port_host.into(),
        security: Security::Plain,
        username: MAIL_USER.into(),
        from: "agent@example.org".into(),
        command_timeout: Duration::from_secs(10),
        tls: webpki_config(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_threaded_reply_lands_in_the_server() {
    let sink = SmtpSink::start().unwrap();
    let cfg = smtp_config("127.0.0.1");
    // The inbound message the answer refers to, as the adapter remembered it.
    let inbound = parse_message(&mail(
        7,
        "References: <root@example.com>\r\nIn-Reply-To: <root@example.com>\r\n",
    ))
    .unwrap();
    let thread = ThreadInfo::of("n7@example.com", &inbound);
    let out = build_message(
        &cfg.from,
        "Alice@Example.com",
        "Here is the answer.\n.\nwith a lone dot line",
        Some(&thread),
        1_700_000_000,
    )
    .unwrap();
    let s = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
    submit(s, &cfg, Some(MAIL_PASSWORD), &out).await.unwrap();
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.mail_from, "agent@example.org");
    assert_eq!(r.rcpt_tos, ["alice@example.com"]);
    assert!(r.auth, "the client authenticated");
    let p = parse_message(r.data.as_bytes()).unwrap();
    assert_eq!(p.subject, "Re: note 7");
    assert_eq!(p.thread_root.as_deref(), Some("root@example.com"));
    assert_eq!(p.references, ["root@example.com", "n7@example.com"]);
    assert!(
        r.data.contains("In-Reply-To: <n7@example.com>"),
        "{}",
        r.data
    );
    assert!(r
        .data
        .contains(&format!("Message-ID: <{}>", out.message_id)));
    assert!(
        p.body
            .contains("Here is the answer.\n.\nwith a lone dot line"),
        "{:?}",
        p.body
    );

    // Refusals: 5xx is final, 4xx may pass later, a bad password is a retry (configuration).
    for (rcpt, retry) in [
        ("reject5@example.com", false),
        ("reject4@example.com", true),
    ] {
        let out = build_message(&cfg.from, rcpt, "x", None, 0).unwrap();
        let s = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
        let e = submit(s, &cfg, Some(MAIL_PASSWORD), &out)
            .await
            .unwrap_err();
        assert!(matches!(e, SmtpError::Rejected { .. }), "{e}");
        assert_eq!(e.retry(), retry, "{rcpt}: {e}");
    }
    let out = build_message(&cfg.from, "a@example.com", "x", None, 0).unwrap();
    let s = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
    let e = submit(s, &cfg, Some("wrong"), &out).await.unwrap_err();
    assert!(e.retry(), "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    // Nothing else arrived.
    assert_eq!(sink.received().len(), 1);
    // A server that is not there: a network error, retried.
    let dead = carapace_tests::free_port();
    assert!(TcpStream::connect(("127.0.0.1", dead)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_are_checked_against_the_host_name() {
    if !root_or_skip() {
        return;
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["mail.carapace.test".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    let dovecot = Dovecot::start_with(DovecotTls::Cert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
    .unwrap();
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
    let tls_port = dovecot.tls_port.unwrap();
    for (security, port) in [
        (Security::Tls, tls_port),
        (Security::Starttls, dovecot.port),
    ] {
        // The right name: in.
        let cfg = imap_config(security, "mail.carapace.test", trusting.clone());
        let mb = open(port, &cfg).await;
        mb.logout().await;
        // Another name on the same certificate: refused before LOGIN.
        let cfg = imap_config(security, "other.carapace.test", trusting.clone());
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let e = Mailbox::open(s, &cfg, MAIL_PASSWORD).await.unwrap_err();
        assert!(e.to_string().contains("TLS"), "{security:?}: {e}");
        // The right name, but a certificate no root vouches for: refused.
        let cfg = imap_config(security, "mail.carapace.test", webpki_config());
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let e = Mailbox::open(s, &cfg, MAIL_PASSWORD).await.unwrap_err();
        assert!(e.to_string().contains("TLS"), "{security:?}: {e}");
    }

    // SMTP with STARTTLS: the right name passes, another name is refused before AUTH.
    let sink = SmtpSink::start_starttls(&cert.pem(), &key.serialize_pem()).unwrap();
    let out = build_message("agent@example.org", "a@example.com", "over TLS", None, 0).unwrap();
    for (host, ok) in [("mail.carapace.test", true), ("other.carapace.test", false)] {
        let cfg = SmtpConfig {
            host: host.into(),
            security: Security::Starttls,
            tls: trusting.clone(),
            ..smtp_config("")
        };
        let s = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
        let r = submit(s, &cfg, Some(MAIL_PASSWORD), &out).await;
        assert_eq!(r.is_ok(), ok, "{host}: {r:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains("TLS"), "{e}");
            assert!(e.retry());
        }
    }
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert!(got[0].data.contains("over TLS"));
    // A plain client to a server that requires STARTTLS gets no further than MAIL FROM.
    let s = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
    assert!(submit(s, &smtp_config("127.0.0.1"), None, &out)
        .await
        .is_err());
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_without_idle_polls() {
    if !root_or_skip() {
        return;
    }
    let dovecot = Dovecot::start_without_idle().unwrap();
    let cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    let mut mb = open(dovecot.port, &cfg).await;
    assert!(!mb.idle, "IDLE is not offered");
    let (mut cursor, _) = start_cursor(None, mb.uid_validity, mb.highest_uid);
    dovecot.deliver(&mail(1, "")).unwrap();
    let started = Instant::now();
    // Without IDLE, waiting is sleeping the poll interval (1 s here) and a NOOP.
    assert_eq!(
        mb.wait(Duration::from_secs(60)).await.unwrap(),
        Woken::Timeout
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(drain(&mut mb, &mut cursor).await, ["n1@example.com"]);
    mb.logout().await;
}

/// A server on loopback that runs `script` on each connection.
async fn fake_server<F, Fut>(script: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(script(s));
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_servers_give_errors_not_hangs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = imap_config(Security::Plain, "127.0.0.1", webpki_config());
    cfg.command_timeout = Duration::from_millis(500);

    // An IMAP server that never greets: a timeout.
    let silent = fake_server(|mut s| async move {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let started = Instant::now();
    let s = TcpStream::connect(("127.0.0.1", silent)).await.unwrap();
    let e = Mailbox::open(s, &cfg, "pw").await.unwrap_err();
    assert!(e.to_string().contains("no answer"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // An IMAP server that answers LOGIN with an endless stream: cut at the read budget.
    let flood = fake_server(|mut s| async move {
        let _ = s.write_all(b"* OK ready\r\n").await;
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await;
        // A literal announced as 100 MB (the library itself would buffer up to 512 MiB).
        let _ = s.write_all(b"* 1 FETCH (BODY[] {100000000}\r\n").await;
        let chunk = vec![b'X'; 64 * 1024];
        for _ in 0..16_000 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    cfg.command_timeout = Duration::from_secs(20);
    let s = TcpStream::connect(("127.0.0.1", flood)).await.unwrap();
    let e = Mailbox::open(s, &cfg, "pw").await.unwrap_err();
    assert!(e.to_string().contains("more than this client reads"), "{e}");

    // An IMAP server that speaks nonsense: an error.
    let garbage = fake_server(|mut s| async move {
        let _ = s.write_all(b"\x00\xff garbage\r\n\r\n").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    cfg.command_timeout = Duration::from_millis(500);
    let s = TcpStream::connect(("127.0.0.1", garbage)).await.unwrap();
    assert!(Mailbox::open(s, &cfg, "pw").await.is_err());
    // What the adapter reports of a failure is short, whatever the server sent.
    let flood2 = fake_server(|mut s| async move {
        let _ = s.write_all(b"* OK ready\r\n").await;
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(format!("* CAPABILITY {}\r\n", "X".repeat(100_000)).as_bytes())
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let s = TcpStream::connect(("127.0.0.1", flood2)).await.unwrap();
    let e = Mailbox::open(s, &cfg, "pw").await.unwrap_err();
    assert!(e.to_string().len() <= 1024, "{} bytes", e.to_string().len());

    // An SMTP server that greets and then says nothing: a timeout, to be retried.
    let mute = fake_server(|mut s| async move {
        let _ = s.write_all(b"220 hi\r\n").await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let smtp = SmtpConfig {
        command_timeout: Duration::from_millis(500),
        ..smtp_config("127.0.0.1")
    };
    let out = build_message("agent@example.org", "a@example.com", "x", None, 0).unwrap();
    let s = TcpStream::connect(("127.0.0.1", mute)).await.unwrap();
    let started = Instant::now();
    let e = submit(s, &smtp, Some("pw"), &out).await.unwrap_err();
    assert!(e.retry(), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{e}");

    // An SMTP server whose greeting never ends: an error, not a growing buffer.
    let chatty = fake_server(|mut s| async move {
        let line = "220-hello\r\n".repeat(1000);
        for _ in 0..100_000 {
            if s.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let smtp = SmtpConfig {
        command_timeout: Duration::from_secs(20),
        ..smtp_config("127.0.0.1")
    };
    let s = TcpStream::connect(("127.0.0.1", chatty)).await.unwrap();
    let started = Instant::now();
    let e = submit(s, &smtp, Some("pw"), &out).await.unwrap_err();
    // smtp-proto's own length cap or this client's read budget, whichever comes first.
    assert!(
        e.to_string().contains("Unparseable") || e.to_string().contains("more than this client"),
        "{e}"
    );
    assert!(e.retry());
    assert!(started.elapsed() < Duration::from_secs(10));
}
