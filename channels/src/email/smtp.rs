//! SMTP outbound: building the answer (mail-builder) and handing it to the submission server
//! (mail-send's `SmtpClient`, generic over the stream): greeting, EHLO, STARTTLS or implicit
//! TLS per the settings, AUTH when a password is configured, MAIL FROM / RCPT TO / DATA, QUIT.
//!
//! Outcomes: a 4xx answer, a network error, a timeout or a failed AUTH (a configuration
//! problem, not the message's) may succeed later → retry; a 5xx answer to the envelope or the
//! data, or a recipient that is not an address → no retry (the broker dead-letters it).

use std::sync::Arc;
use std::time::Duration;

use mail_send::mail_builder::headers::message_id::MessageId;
use mail_send::mail_builder::MessageBuilder;
use mail_send::smtp::message::Message;
use mail_send::smtp::AssertReply as _;
use mail_send::{Credentials, SmtpClient};

use super::clipped;
use super::parse::{normalize_address, MAX_REFERENCES};
use super::stream::{BoxStream, Budget, Budgeted, MailStream};
use super::threads::ThreadInfo;
use crate::net::{start_tls_with, NetError};
use crate::settings::Security;

/// Budget of one server answer (an EHLO list is the longest).
const ANSWER_BUDGET: usize = 64 * 1024;

/// What [`submit`] needs.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// The server's name, for the TLS certificate check.
    pub host: String,
    pub security: Security,
    pub username: String,
    /// The sender address (MAIL FROM and the From header).
    pub from: String,
    /// Time allowed for each command.
    pub command_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP {op}: {}", clipped(.source))]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("SMTP {op}: no answer within {} s", .after.as_secs())]
    Timeout { op: &'static str, after: Duration },
    #[error("SMTP {op}: the server answered {code} {text}")]
    Rejected {
        op: &'static str,
        code: u16,
        text: String,
    },
    #[error("SMTP {op}: {}", clipped(.source))]
    Client {
        op: &'static str,
        #[source]
        source: mail_send::Error,
    },
    #[error("SMTP: {0}")]
    Tls(#[source] NetError),
    #[error("SMTP: the server does not offer STARTTLS")]
    NoStartTls,
    #[error("recipient {0:?} is not an e-mail address")]
    BadRecipient(String),
    #[error("building the message: {0}")]
    Build(#[source] std::io::Error),
}

impl SmtpError {
    /// Whether sending again later may succeed (see the module documentation).
    pub fn retry(&self) -> bool {
        match self {
            SmtpError::Rejected { op: "AUTH", .. } => true,
            SmtpError::Rejected { code, .. } => !(500..600).contains(code),
            SmtpError::BadRecipient(_) | SmtpError::Build(_) => false,
            SmtpError::Io { .. }
            | SmtpError::Timeout { .. }
            | SmtpError::Client { .. }
            | SmtpError::Tls(_)
            | SmtpError::NoStartTls => true,
        }
    }
}

fn client_err(op: &'static str) -> impl FnOnce(mail_send::Error) -> SmtpError {
    move |e| match e {
        mail_send::Error::UnexpectedReply(r) | mail_send::Error::AuthenticationFailed(r) => {
            SmtpError::Rejected {
                op,
                code: r.code(),
                text: r.message().chars().take(300).collect(),
            }
        }
        mail_send::Error::Timeout => SmtpError::Timeout {
            op,
            after: Duration::ZERO,
        },
        mail_send::Error::Io(source) => SmtpError::Io { op, source },
        source => SmtpError::Client { op, source },
    }
}

/// The answer to send: headers threaded from `thread` (the inbound message named by
/// `in_reply_to`, when it is known), a fresh Message-ID `<RANDOM@DOMAIN-OF-FROM>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The recipient, checked and lowercased.
    pub to: String,
    pub message_id: String,
    /// The whole message (CRLF line ends).
    pub bytes: Vec<u8>,
}

/// Build the message `from` → `recipient` carrying `body`.
pub fn build_message(
    from: &str,
    recipient: &str,
    body: &str,
    thread: Option<&ThreadInfo>,
    now_unix: i64,
) -> Result<Outgoing, SmtpError> {
    let to =
        normalize_address(recipient).ok_or_else(|| SmtpError::BadRecipient(recipient.into()))?;
    let domain = from.rsplit_once('@').map(|(_, d)| d).unwrap_or("localhost");
    let message_id = format!("{}@{domain}", random_token());
    let subject = match thread {
        Some(t) => reply_subject(&t.subject),
        None => first_line_subject(body),
    };
    let mut b = MessageBuilder::new()
        .from(from)
        .to(to.as_str())
        .subject(subject)
        .message_id(message_id.as_str())
        .date(now_unix)
        .text_body(body);
    if let Some(t) = thread {
        if let Some(parent) = &t.message_id {
            let mut refs: Vec<&str> = t.references.iter().map(String::as_str).collect();
            refs.push(parent);
            if refs.len() > MAX_REFERENCES {
                let keep_from = refs.len() - (MAX_REFERENCES - 1);
                let root = refs[0];
                refs = std::iter::once(root)
                    .chain(refs[keep_from..].iter().copied())
                    .collect();
            }
            b = b
                .in_reply_to(parent.as_str())
                .references(MessageId::new_list(refs.into_iter()));
        }
    }
    let bytes = b.write_to_vec().map_err(SmtpError::Build)?;
    Ok(Outgoing {
        to,
        message_id,
        bytes,
    })
}

/// `Re: SUBJECT`, without stacking a second `Re:`.
pub fn reply_subject(original: &str) -> String {
    let o = original.trim();
    if o.len() >= 3 && o[..3].eq_ignore_ascii_case("re:") {
        o.to_string()
    } else if o.is_empty() {
        "Re: (no subject)".to_string()
    } else {
        format!("Re: {o}")
    }
}

/// A subject for a message that answers nothing known: the body's first non-empty line.
fn first_line_subject(body: &str) -> String {
    let line = body.lines().map(str::trim).find(|l| !l.is_empty());
    match line {
        Some(l) => {
            let mut s: String = l.chars().filter(|c| !c.is_control()).take(70).collect();
            if l.chars().count() > 70 {
                s.push('…');
            }
            s
        }
        None => "(no subject)".to_string(),
    }
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // The kernel's random source is not available: the time and pid still make the id
        // unique for this sender, which is all a Message-ID needs.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    hex::encode(b)
}

/// Hand `msg` to the server over `stream` (already connected to `cfg.host`).
pub async fn submit<S: MailStream + 'static>(
    stream: S,
    cfg: &SmtpConfig,
    password: Option<&str>,
    msg: &Outgoing,
) -> Result<(), SmtpError> {
    let t = cfg.command_timeout;
    let mut raw: BoxStream = Box::new(stream);
    if cfg.security == Security::Tls {
        raw = tls(raw, cfg).await?;
    }
    let budget = Budget::default();
    budget.set(ANSWER_BUDGET);
    let mut client = SmtpClient {
        stream: Budgeted::new(raw, budget.clone()),
        timeout: t,
    };
    let helo = cfg
        .from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("localhost");
    match tokio::time::timeout(t, client.read()).await {
        Ok(r) => r
            .and_then(|r| r.assert_positive_completion())
            .map_err(client_err("greeting"))?,
        Err(_) => {
            return Err(SmtpError::Timeout {
                op: "greeting",
                after: t,
            })
        }
    }
    budget.set(ANSWER_BUDGET);
    let mut ehlo = client.ehlo(helo).await.map_err(client_err("EHLO"))?;
    if cfg.security == Security::Starttls {
        if !ehlo.has_capability(smtp_proto::EXT_START_TLS) {
            return Err(SmtpError::NoStartTls);
        }
        budget.set(ANSWER_BUDGET);
        client
            .cmd(b"STARTTLS\r\n")
            .await
            .and_then(|r| r.assert_positive_completion())
            .map_err(client_err("STARTTLS"))?;
        let (plain, budget_again) = client.stream.into_inner();
        let wrapped = tls(plain, cfg).await?;
        client = SmtpClient {
            stream: Budgeted::new(wrapped, budget_again),
            timeout: t,
        };
        budget.set(ANSWER_BUDGET);
        ehlo = client.ehlo(helo).await.map_err(client_err("EHLO"))?;
    }
    if let Some(pw) = password {
        budget.set(ANSWER_BUDGET);
        client
            .authenticate(Credentials::new(cfg.username.as_str(), pw), &ehlo)
            .await
            .map_err(client_err("AUTH"))?;
    }
    budget.set(ANSWER_BUDGET);
    let envelope = Message::new(cfg.from.as_str(), [msg.to.as_str()], msg.bytes.as_slice());
    client.send(envelope).await.map_err(client_err("send"))?;
    budget.set(ANSWER_BUDGET);
    let _ = client.quit().await;
    Ok(())
}

async fn tls(raw: BoxStream, cfg: &SmtpConfig) -> Result<BoxStream, SmtpError> {
    match tokio::time::timeout(
        cfg.command_timeout,
        start_tls_with(raw, &cfg.host, cfg.tls.clone()),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(Box::new(tls)),
        Ok(Err(e)) => Err(SmtpError::Tls(e)),
        Err(_) => Err(SmtpError::Timeout {
            op: "TLS handshake",
            after: cfg.command_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread() -> ThreadInfo {
        ThreadInfo {
            id: "m2@x".into(),
            subject: "Plan".into(),
            message_id: Some("m2@x".into()),
            references: vec!["m1@x".into()],
        }
    }

    fn text(o: &Outgoing) -> String {
        String::from_utf8(o.bytes.clone()).unwrap()
    }

    #[test]
    fn a_reply_is_threaded() {
        let o = build_message(
            "bot@example.org",
            "Alice@Example.com",
            "Sure.\n",
            Some(&thread()),
            0,
        )
        .unwrap();
        assert_eq!(o.to, "alice@example.com");
        let t = text(&o);
        assert!(t.contains("Subject: Re: Plan\r\n"), "{t}");
        assert!(t.contains("In-Reply-To: <m2@x>\r\n"), "{t}");
        assert!(t.contains("References: <m1@x> <m2@x>\r\n"), "{t}");
        assert!(
            t.contains(&format!("Message-ID: <{}>\r\n", o.message_id)),
            "{t}"
        );
        assert!(o.message_id.ends_with("@example.org"));
        assert!(t.contains("From: <bot@example.org>") || t.contains("From: bot@example.org"));
        assert!(t.contains("Sure."));
        // The parser reads back what the builder wrote.
        let p = crate::email::parse::parse_message(&o.bytes).unwrap();
        assert_eq!(p.thread_root.as_deref(), Some("m1@x"));
        assert_eq!(p.subject, "Re: Plan");
    }

    #[test]
    fn a_fresh_message_is_not_threaded() {
        let o =
            build_message("bot@example.org", "a@b.c", "\n  Hello there\nmore", None, 0).unwrap();
        let t = text(&o);
        assert!(t.contains("Subject: Hello there\r\n"), "{t}");
        assert!(!t.contains("In-Reply-To"), "{t}");
        assert!(!t.contains("References"), "{t}");
        let o2 = build_message("bot@example.org", "a@b.c", "x", None, 0).unwrap();
        assert_ne!(o.message_id, o2.message_id);
    }

    #[test]
    fn a_thread_without_message_id_keeps_only_the_subject() {
        let mut th = thread();
        th.message_id = None;
        let t = text(&build_message("bot@x.org", "a@b.c", "x", Some(&th), 0).unwrap());
        assert!(t.contains("Subject: Re: Plan\r\n"), "{t}");
        assert!(!t.contains("In-Reply-To"), "{t}");
    }

    #[test]
    fn re_is_not_stacked() {
        assert_eq!(reply_subject("RE: x"), "RE: x");
        assert_eq!(reply_subject("x"), "Re: x");
        assert_eq!(reply_subject(""), "Re: (no subject)");
        assert_eq!(reply_subject("Ré"), "Re: Ré");
    }

    #[test]
    fn bad_recipients_are_refused_without_retry() {
        for r in ["", "nobody", "a@b\r\nRCPT TO:<c@d>", "<a@b>", "a b@c"] {
            let e = build_message("bot@x.org", r, "x", None, 0).unwrap_err();
            assert!(matches!(e, SmtpError::BadRecipient(_)), "{r:?}");
            assert!(!e.retry());
        }
    }

    #[test]
    fn outcome_mapping() {
        let rejected = |op, code| SmtpError::Rejected {
            op,
            code,
            text: String::new(),
        };
        assert!(rejected("send", 451).retry());
        assert!(rejected("send", 421).retry());
        assert!(!rejected("send", 550).retry());
        assert!(!rejected("send", 554).retry());
        assert!(rejected("AUTH", 535).retry());
        let io = SmtpError::Io {
            op: "send",
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        };
        assert!(io.retry());
        assert!(SmtpError::Timeout {
            op: "EHLO",
            after: Duration::from_secs(1)
        }
        .retry());
    }
}
