//! The whole e-mail adapter (`email::run`: the shared inbound and outbound loops over
//! `ImapSource` and `SmtpOutlet`) against a real Dovecot and a real aiosmtpd on loopback, with a
//! broker in memory (its `connect` connects for real). Proves: mail already in the folder is
//! not delivered; new mail arrives through IDLE with the spec's ids; an answer from the outbox
//! lands in the SMTP server threaded; after a restart nothing is delivered twice and what came
//! in meanwhile is delivered.

// Helpers of the tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_broker::client::{AckReply, DeliverReply};
use carapace_broker::protocol::{AckStatus, DeliverStatus, OutboundMessage, SendOutcome};
use carapace_channels::adapter::Ctx;
use carapace_channels::broker::{BrokerApi, BrokerError, Inbound, Secret};
use carapace_channels::email::{self, EmailSettings, Security};
use carapace_tests::mail::{Dovecot, SmtpSink, MAIL_PASSWORD, MAIL_USER};

#[derive(Debug, Default)]
struct TestBroker {
    delivered: Mutex<Vec<Inbound>>,
    ids: Mutex<HashSet<String>>,
    outbox: Mutex<VecDeque<OutboundMessage>>,
    acks: Mutex<Vec<(String, SendOutcome)>>,
    states: Mutex<Vec<(bool, Option<String>)>>,
}

impl BrokerApi for TestBroker {
    async fn deliver(&self, msg: &Inbound) -> Result<DeliverReply, BrokerError> {
        let fresh = self.ids.lock().unwrap().insert(msg.id.clone());
        self.delivered.lock().unwrap().push(msg.clone());
        Ok(DeliverReply {
            seq: 0,
            status: if fresh {
                DeliverStatus::Queued
            } else {
                DeliverStatus::Duplicate
            },
            held: None,
        })
    }

    async fn outbox(&self, wait_ms: u64) -> Result<Vec<OutboundMessage>, BrokerError> {
        let batch: Vec<_> = self.outbox.lock().unwrap().drain(..).collect();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(wait_ms.min(100))).await;
        }
        Ok(batch)
    }

    async fn outbox_ack(&self, id: &str, outcome: SendOutcome) -> Result<AckReply, BrokerError> {
        let status = match &outcome {
            SendOutcome::Sent { .. } => AckStatus::Done,
            SendOutcome::Failed { retry: true, .. } => AckStatus::Retrying,
            SendOutcome::Failed { .. } => AckStatus::DeadLettered,
        };
        self.acks.lock().unwrap().push((id.to_string(), outcome));
        Ok(AckReply {
            status,
            dlq_id: None,
            retry_in_ms: None,
        })
    }

    async fn channel_state(
        &self,
        connected: bool,
        error: Option<String>,
    ) -> Result<(), BrokerError> {
        self.states.lock().unwrap().push((connected, error));
        Ok(())
    }

    async fn secret(&self, name: &str) -> Result<Secret, BrokerError> {
        assert_eq!(name, "mail_password");
        Ok(Secret::new(format!("{MAIL_PASSWORD}\n").into_bytes()))
    }

    async fn connect(&self, host: String, port: u16) -> Result<OwnedFd, BrokerError> {
        let s = std::net::TcpStream::connect((host.as_str(), port))
            .map_err(|e| BrokerError::NoBroker(format!("connect {host}:{port}: {e}")))?;
        Ok(OwnedFd::from(s))
    }
}

fn mail(n: u32) -> Vec<u8> {
    format!(
        "From: Alice <Alice@Example.com>\r\nTo: agent@example.org\r\nSubject: note {n}\r\n\
         Message-ID: <n{n}@example.com>\r\nReferences: <root@example.com>\r\n\r\nbody {n}\r\n"
    )
    .into_bytes()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(
    rt: &tokio::runtime::Runtime,
    state: &Path,
    dovecot: &Dovecot,
    sink: &SmtpSink,
) -> (Arc<TestBroker>, tokio::task::JoinHandle<()>) {
    let broker = Arc::new(TestBroker::default());
    let ctx = Arc::new(Ctx::new("mail".into(), state.to_path_buf(), broker.clone()));
    let settings = EmailSettings {
        imap: format!("127.0.0.1:{}", dovecot.port),
        imap_security: Security::Plain,
        smtp: format!("127.0.0.1:{}", sink.port),
        smtp_security: Security::Plain,
        username: MAIL_USER.into(),
        password_secret: "mail_password".into(),
        from: "Agent@Example.org".into(),
        folder: "INBOX".into(),
        poll_interval_ms: 1000,
    };
    let task = rt.spawn(async move {
        email::run(ctx, settings).await.unwrap();
    });
    (broker, task)
}

#[test]
fn the_adapter_delivers_answers_and_resumes_after_a_restart() {
    if !carapace_tests::privileged() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dovecot = Dovecot::start().unwrap();
    let sink = SmtpSink::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    dovecot.deliver(&mail(0)).unwrap();

    let (broker, task) = start(&rt, state.path(), &dovecot, &sink);
    wait_until("the adapter to connect", Duration::from_secs(20), || {
        broker.states.lock().unwrap().iter().any(|(c, _)| *c)
    });
    // The first start saves its starting point (after the mail already there) at once.
    wait_until("the first cursor", Duration::from_secs(20), || {
        std::fs::read_dir(state.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("email"))
    });
    dovecot.deliver(&mail(1)).unwrap();
    wait_until("the delivery of note 1", Duration::from_secs(20), || {
        !broker.delivered.lock().unwrap().is_empty()
    });
    let got = broker.delivered.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(m.id, "n1@example.com");
    assert_eq!(m.sender, "alice@example.com");
    assert_eq!(m.reply_to, "alice@example.com");
    assert_eq!(m.conversation, "root@example.com");
    assert_eq!(m.text, "Subject: note 1\n\nbody 1");

    // The agent answers: the outbox message goes out threaded, and is acknowledged as sent.
    broker.outbox.lock().unwrap().push_back(OutboundMessage {
        id: "o1".into(),
        recipient: "alice@example.com".into(),
        body: "The answer.".into(),
        in_reply_to: Some("n1@example.com".into()),
        attempt: 1,
        buttons: Vec::new(),
    });
    let sent = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].rcpt_tos, ["alice@example.com"]);
    assert_eq!(sent[0].mail_from, "agent@example.org");
    assert!(
        sent[0].data.contains("Subject: Re: note 1"),
        "{}",
        sent[0].data
    );
    assert!(
        sent[0].data.contains("In-Reply-To: <n1@example.com>"),
        "{}",
        sent[0].data
    );
    assert!(
        sent[0]
            .data
            .contains("References: <root@example.com> <n1@example.com>"),
        "{}",
        sent[0].data
    );
    wait_until("the ack", Duration::from_secs(10), || {
        !broker.acks.lock().unwrap().is_empty()
    });
    let acks = broker.acks.lock().unwrap().clone();
    assert_eq!(acks[0].0, "o1");
    assert!(
        matches!(
            &acks[0].1,
            SendOutcome::Sent {
                service_id: Some(_)
            }
        ),
        "{acks:?}"
    );
    // An answer to nobody the server takes: dead-lettered, not retried.
    broker.outbox.lock().unwrap().push_back(OutboundMessage {
        id: "o2".into(),
        recipient: "reject5@example.com".into(),
        body: "x".into(),
        in_reply_to: None,
        attempt: 1,
        buttons: Vec::new(),
    });
    wait_until("the second ack", Duration::from_secs(10), || {
        broker.acks.lock().unwrap().len() >= 2
    });
    assert!(matches!(
        &broker.acks.lock().unwrap()[1].1,
        SendOutcome::Failed { retry: false, .. }
    ));
    // The delivered message is marked \Seen once its cursor is saved.
    wait_until("\\Seen on note 1", Duration::from_secs(20), || {
        dovecot.seen_files().len() == 1
    });

    // Kill the adapter; mail comes in while it is down; a new adapter delivers only that.
    task.abort();
    let _ = rt.block_on(task);
    dovecot.deliver(&mail(2)).unwrap();
    let (broker, task) = start(&rt, state.path(), &dovecot, &sink);
    wait_until("the delivery of note 2", Duration::from_secs(20), || {
        !broker.delivered.lock().unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<String> = broker
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(ids, ["n2@example.com"]);
    task.abort();
    let _ = rt.block_on(task);

    // A restart with nothing new reports the service reachable at once (not after an IDLE),
    // then waits in IDLE for the next message.
    let (broker, task) = start(&rt, state.path(), &dovecot, &sink);
    wait_until(
        "the restarted adapter to connect",
        Duration::from_secs(10),
        || broker.states.lock().unwrap().iter().any(|(c, _)| *c),
    );
    std::thread::sleep(Duration::from_millis(300));
    dovecot.deliver(&mail(3)).unwrap();
    wait_until("the delivery of note 3", Duration::from_secs(20), || {
        !broker.delivered.lock().unwrap().is_empty()
    });
    assert_eq!(broker.delivered.lock().unwrap()[0].id, "n3@example.com");
    task.abort();
    let _ = rt.block_on(task);
}
