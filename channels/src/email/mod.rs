//! The e-mail adapter: IMAP in, SMTP out.
//!
//! | module | room |
//! |---|---|
//! | [`parse`] | a raw message → sender, conversation, reply_to, id, body (pure; the fuzz entry point) |
//! | [`imap`] | async-imap over any stream: login, the UID cursor, capped fetches, `\Seen`, IDLE or poll |
//! | [`smtp`] | the answer (mail-builder: threading headers, fresh Message-ID) and its submission (mail-send) |
//! | [`threads`] | the durable, bounded map from an inbound id to what an answer needs (subject, references) |
//! | [`stream`] | the boxed stream both clients run over, and a read budget per command |
//!
//! Both connections go through the broker (`connect`, then rustls with the Mozilla roots and the
//! configured host name inside the adapter); the password comes from the broker's `secret`
//! and is kept only in memory. Settings (`kind = "email"`): `imap` and `smtp` (`host:port`),
//! `imap_security` / `smtp_security` (`tls` | `starttls` | `plain`, plain for loopback only),
//! `username`, `password_secret`, `from`, `folder` (INBOX), `poll_interval_ms` (60000, when the
//! server has no IDLE).
//!
//! Inbound ([`ImapSource`], run by the shared [`run_inbound`] loop): the cursor (UIDVALIDITY
//! and last UID, in `<state_dir>/` through [`CursorStore`]) advances only after the broker
//! answered `deliver`. The first start and a changed UIDVALIDITY start after the folder's
//! current highest UID, logged: mail already there is never delivered in bulk. A message is
//! fetched up to [`MAX_MESSAGE`] bytes; a bigger one is delivered as a note (its headers parsed
//! from the part fetched). A delivered message is marked `\Seen` at the next poll (once its
//! cursor is saved); one that cannot be parsed (no From address) is logged, not delivered,
//! and left unread in the folder for a person to look at.
//!
//! Outbound ([`SmtpOutlet`], run by [`run_outbound`]): one SMTP session per message; an answer
//! to a known inbound message (`in_reply_to`) gets `Re: SUBJECT`, In-Reply-To and References.

pub mod imap;
pub mod parse;
pub mod smtp;
pub mod stream;
pub mod threads;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use carapace_broker::sync::lock;
use tokio::net::TcpStream;

pub use crate::settings::{EmailSettings, Security};

use crate::adapter::{
    run_inbound, run_outbound, Ctx, FailureKind, Outlet, Polled, RunError, ServiceError, Source,
};
use crate::broker::{BrokerApi, Inbound, Secret};
use crate::cursor::CursorStore;
use imap::{start_cursor, Cursor, Fetched, ImapConfig, ImapError, Mailbox, IDLE_RENEW};
use parse::{parse_message, ParseError, Parsed};
use smtp::{build_message, submit, SmtpConfig, SmtpError};
use threads::{ThreadInfo, Threads};

/// Largest message fetched whole (bytes).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Time allowed for each IMAP or SMTP command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The cursor's name in the state directory.
pub const CURSOR_NAME: &str = "email";

/// Why the adapter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("{key} = {value:?}: expected HOST:PORT")]
    Address { key: &'static str, value: String },
    #[error("from = {0:?}: not an e-mail address")]
    From(String),
    #[error("the password secret is not UTF-8 text")]
    Password,
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Longest text of a server's error kept in an error message (a parser's error can quote
/// everything the server sent).
const MAX_ERROR_TEXT: usize = 300;

/// `e` as text, at most [`MAX_ERROR_TEXT`] characters, control characters replaced.
pub(crate) fn clipped(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let mut out: String = s
        .chars()
        .take(MAX_ERROR_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_ERROR_TEXT {
        out.push('…');
    }
    out
}

/// `host:port` (`[v6]:port` for IPv6 literals).
pub fn host_port(key: &'static str, value: &str) -> Result<(String, u16), EmailError> {
    let bad = || EmailError::Address {
        key,
        value: value.to_string(),
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        value.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty()
        || port == 0
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/@".contains(c))
    {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// How the adapter reaches a mail server: the broker's `connect` in production; anything that
/// yields a connected stream in tests.
pub trait Dial: Send + Sync {
    fn dial(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = Result<TcpStream, ServiceError>> + Send;
}

/// [`Dial`] through the broker.
#[derive(Debug)]
pub struct BrokerDial<B>(pub Arc<B>);

impl<B: BrokerApi> Dial for BrokerDial<B> {
    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ServiceError> {
        crate::net::connect_tcp(self.0.as_ref(), host, port)
            .await
            .map_err(|e| ServiceError::new(FailureKind::Unreachable, e.to_string()))
    }
}

/// The password as text: the secret's bytes, a trailing newline (a secret file's) removed.
fn password_of(secret: &Secret) -> Result<&str, EmailError> {
    std::str::from_utf8(secret.expose())
        .map(|s| s.trim_end_matches(['\r', '\n']))
        .map_err(|_| EmailError::Password)
}

/// What a fetched message delivers: parsed, its ids chosen, a too-big one replaced by a note.
pub fn to_inbound(f: &Fetched, uid_validity: u32) -> Result<(Inbound, Parsed), ParseError> {
    let mut p = parse_message(&f.raw)?;
    if f.truncated {
        p.replace_body_with_note(&format!(
            "[message of {} bytes not delivered: larger than {MAX_MESSAGE} bytes]",
            f.size
        ));
    }
    let inbound = Inbound {
        id: p.id(uid_validity, f.uid),
        sender: p.sender.clone(),
        conversation: p.conversation(uid_validity, f.uid),
        reply_to: p.reply_to.clone(),
        text: p.body.clone(),
    };
    Ok((inbound, p))
}

fn imap_failure(e: &ImapError) -> ServiceError {
    let kind = match e {
        ImapError::Login { .. } => FailureKind::Rejected,
        _ => FailureKind::Unreachable,
    };
    ServiceError::new(kind, e.to_string())
}

/// The IMAP side, as a [`Source`] for the shared inbound loop.
#[derive(Debug)]
pub struct ImapSource<D> {
    dial: D,
    port: u16,
    cfg: ImapConfig,
    password: Arc<Secret>,
    mailbox: Option<Mailbox>,
    threads: Arc<Mutex<Threads>>,
    /// (UIDVALIDITY, UID) handed out and not yet marked `\Seen` (marked once the saved
    /// cursor passed them).
    unseen: Vec<(u32, u32)>,
    /// The session was opened since the last poll.
    fresh: bool,
}

impl<D: Dial> ImapSource<D> {
    pub fn new(
        dial: D,
        port: u16,
        cfg: ImapConfig,
        password: Arc<Secret>,
        threads: Arc<Mutex<Threads>>,
    ) -> ImapSource<D> {
        ImapSource {
            dial,
            port,
            cfg,
            password,
            mailbox: None,
            threads,
            unseen: Vec::new(),
            fresh: false,
        }
    }

    async fn mailbox(&mut self) -> Result<&mut Mailbox, ServiceError> {
        if self.mailbox.is_none() {
            let stream = self.dial.dial(&self.cfg.host, self.port).await?;
            let password = password_of(&self.password)
                .map_err(|e| ServiceError::new(FailureKind::Rejected, e.to_string()))?;
            let mb = Mailbox::open(stream, &self.cfg, password)
                .await
                .map_err(|e| imap_failure(&e))?;
            tracing::info!(
                host = %self.cfg.host,
                folder = %self.cfg.folder,
                uid_validity = mb.uid_validity,
                highest_uid = mb.highest_uid,
                idle = mb.idle,
                "IMAP folder open"
            );
            self.mailbox = Some(mb);
            self.fresh = true;
        }
        self.mailbox
            .as_mut()
            .ok_or_else(|| ServiceError::new(FailureKind::Unreachable, "no IMAP session"))
    }

    async fn poll_inner(
        &mut self,
        saved: Option<&Cursor>,
    ) -> Result<Vec<Polled<Cursor>>, ServiceError> {
        let pending = self.unseen.clone();
        let mb = self.mailbox().await?;
        // What the saved cursor passed was delivered: mark it read (best effort: the flag is
        // for people reading the folder; what fails now is tried again at the next poll).
        if let Some(c) = saved {
            let mut marked = Vec::new();
            let mut failed = None;
            for &(validity, uid) in &pending {
                if validity != c.uid_validity || uid > c.last_uid {
                    continue;
                }
                if validity == mb.uid_validity {
                    if let Err(e) = mb.mark_seen(uid).await {
                        failed = Some(e);
                        break;
                    }
                }
                marked.push((validity, uid));
            }
            self.unseen.retain(|x| !marked.contains(x));
            if let Some(e) = failed {
                tracing::warn!(error = %e, "marking delivered mail \\Seen failed");
                return Err(imap_failure(&e));
            }
        }
        let mb = self.mailbox().await?;
        let (start, note) = start_cursor(saved.copied(), mb.uid_validity, mb.highest_uid);
        if let Some(note) = note {
            tracing::warn!(folder = %self.cfg.folder, "{note}");
            // Save the new starting point before anything is delivered from it.
            return Ok(vec![Polled {
                message: None,
                cursor: start,
            }]);
        }
        let validity = mb.uid_validity;
        let mut uids = mb
            .new_uids(start.last_uid)
            .await
            .map_err(|e| imap_failure(&e))?;
        if uids.is_empty() {
            if std::mem::take(&mut self.fresh) {
                // Return at once after connecting, so that the loop reports the service
                // reachable now rather than after a whole IDLE.
                return Ok(Vec::new());
            }
            let mb = self.mailbox().await?;
            mb.wait(IDLE_RENEW).await.map_err(|e| imap_failure(&e))?;
            uids = mb
                .new_uids(start.last_uid)
                .await
                .map_err(|e| imap_failure(&e))?;
        }
        self.fresh = false;
        let mut out = Vec::new();
        for uid in uids {
            let cursor = Cursor {
                uid_validity: validity,
                last_uid: uid,
            };
            let mb = self.mailbox().await?;
            let Some(f) = mb.fetch(uid).await.map_err(|e| imap_failure(&e))? else {
                out.push(Polled {
                    message: None,
                    cursor,
                });
                continue;
            };
            match to_inbound(&f, validity) {
                Ok((inbound, parsed)) => {
                    let remembered =
                        lock(&self.threads).remember(ThreadInfo::of(&inbound.id, &parsed));
                    if let Err(e) = remembered {
                        tracing::warn!(error = %e, "an answer to this message will not be threaded");
                    }
                    self.unseen.push((validity, uid));
                    out.push(Polled {
                        message: Some(inbound),
                        cursor,
                    });
                }
                Err(e) => {
                    tracing::warn!(uid, uid_validity = validity, error = %e, "message not delivered (left unread in the folder)");
                    out.push(Polled {
                        message: None,
                        cursor,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl<D: Dial> Source for ImapSource<D> {
    type Cursor = Cursor;

    async fn poll(&mut self, cursor: Option<&Cursor>) -> Result<Vec<Polled<Cursor>>, ServiceError> {
        let r = self.poll_inner(cursor).await;
        if r.is_err() {
            // The session's state is unknown after a failure: the next poll connects again.
            self.mailbox = None;
        }
        r
    }
}

/// The SMTP side, as an [`Outlet`] for the shared outbound loop.
#[derive(Debug)]
pub struct SmtpOutlet<D> {
    dial: D,
    port: u16,
    cfg: SmtpConfig,
    password: Arc<Secret>,
    threads: Arc<Mutex<Threads>>,
}

impl<D: Dial> SmtpOutlet<D> {
    pub fn new(
        dial: D,
        port: u16,
        cfg: SmtpConfig,
        password: Arc<Secret>,
        threads: Arc<Mutex<Threads>>,
    ) -> SmtpOutlet<D> {
        SmtpOutlet {
            dial,
            port,
            cfg,
            password,
            threads,
        }
    }
}

fn smtp_failure(e: &SmtpError) -> ServiceError {
    let kind = match e {
        _ if !e.retry() => FailureKind::Rejected,
        // The server is there and asked for later.
        SmtpError::Rejected { .. } => FailureKind::Throttled,
        _ => FailureKind::Unreachable,
    };
    ServiceError::new(kind, e.to_string())
}

impl<D: Dial> Outlet for SmtpOutlet<D> {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let thread = msg
            .in_reply_to
            .as_deref()
            .and_then(|id| lock(&self.threads).get(id).cloned());
        if msg.in_reply_to.is_some() && thread.is_none() {
            tracing::info!(
                in_reply_to = msg.in_reply_to.as_deref().unwrap_or(""),
                "answering a message this adapter does not remember: not threaded"
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let out = build_message(
            &self.cfg.from,
            &msg.recipient,
            &msg.body,
            thread.as_ref(),
            now,
        )
        .map_err(|e| smtp_failure(&e))?;
        let stream = self.dial.dial(&self.cfg.host, self.port).await?;
        let password = password_of(&self.password)
            .map_err(|e| ServiceError::new(FailureKind::Unreachable, e.to_string()))?;
        submit(stream, &self.cfg, Some(password), &out)
            .await
            .map_err(|e| smtp_failure(&e))?;
        Ok(Some(out.message_id))
    }
}

/// Run the e-mail adapter: the inbound and the outbound loop, until the process ends.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: EmailSettings) -> Result<(), RunError> {
    let (imap_host, imap_port) = host_port("imap", &s.imap).map_err(|e| ctx.fail("email", e))?;
    let (smtp_host, smtp_port) = host_port("smtp", &s.smtp).map_err(|e| ctx.fail("email", e))?;
    let from = parse::normalize_address(&s.from)
        .ok_or_else(|| ctx.fail("email", EmailError::From(s.from.clone())))?;
    let tls =
        crate::net::tls_config().map_err(|e| ctx.fail("email", EmailError::Tls(e.to_string())))?;
    let password = Arc::new(ctx.secret(&s.password_secret).await?);
    password_of(&password).map_err(|e| ctx.fail("email", e))?;
    let threads = Arc::new(Mutex::new(Threads::load(&ctx.state_dir)));
    let imap_cfg = ImapConfig {
        host: imap_host,
        security: s.imap_security,
        username: s.username.clone(),
        folder: s.folder.clone(),
        max_message: MAX_MESSAGE,
        command_timeout: COMMAND_TIMEOUT,
        poll_interval: Duration::from_millis(s.poll_interval_ms.max(1000)),
        tls: tls.clone(),
    };
    let smtp_cfg = SmtpConfig {
        host: smtp_host,
        security: s.smtp_security,
        username: s.username.clone(),
        from,
        command_timeout: COMMAND_TIMEOUT,
        tls,
    };
    let mut source = ImapSource::new(
        BrokerDial(ctx.broker.clone()),
        imap_port,
        imap_cfg,
        password.clone(),
        threads.clone(),
    );
    let outlet = SmtpOutlet::new(
        BrokerDial(ctx.broker.clone()),
        smtp_port,
        smtp_cfg,
        password,
        threads,
    );
    let store = CursorStore::new(&ctx.state_dir, CURSOR_NAME);
    tokio::join!(
        run_inbound(&ctx, &mut source, &store),
        run_outbound(&ctx, &outlet)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_are_clipped() {
        assert_eq!(clipped(&"short\r\nline"), "short  line");
        let long = clipped(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), MAX_ERROR_TEXT + 1);
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            host_port("imap", "IMAP.example.com:993").unwrap(),
            ("imap.example.com".to_string(), 993)
        );
        assert_eq!(
            host_port("imap", "[::1]:143").unwrap(),
            ("::1".to_string(), 143)
        );
        for bad in [
            "imap.example.com",
            ":993",
            "h:0",
            "h:x",
            "h:99999",
            "a b:1",
            "u@h:1",
        ] {
            assert!(host_port("imap", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_lose_only_a_trailing_newline() {
        assert_eq!(password_of(&Secret::new(b"pw \n".to_vec())).unwrap(), "pw ");
        assert_eq!(password_of(&Secret::new(b"pw".to_vec())).unwrap(), "pw");
        assert!(password_of(&Secret::new(vec![0xff])).is_err());
    }

    #[test]
    fn too_big_messages_become_a_note_with_their_ids() {
        let raw = b"From: a@example.com\r\nSubject: big\r\nMessage-ID: <b@x>\r\n\r\nxxxx";
        let f = Fetched {
            uid: 9,
            size: 5_000_000,
            raw: raw.to_vec(),
            truncated: true,
        };
        let (m, _) = to_inbound(&f, 3).unwrap();
        assert_eq!(m.id, "b@x");
        assert_eq!(m.sender, "a@example.com");
        assert!(m.text.contains("5000000 bytes not delivered"), "{}", m.text);
        assert!(!m.text.contains("xxxx"));
        let f = Fetched {
            truncated: false,
            ..f
        };
        assert!(to_inbound(&f, 3).unwrap().0.text.contains("xxxx"));
    }

    #[test]
    fn smtp_failures_map_to_kinds() {
        let r = |code| SmtpError::Rejected {
            op: "send",
            code,
            text: String::new(),
        };
        assert_eq!(smtp_failure(&r(550)).kind, FailureKind::Rejected);
        assert_eq!(smtp_failure(&r(451)).kind, FailureKind::Throttled);
        let io = SmtpError::Io {
            op: "EHLO",
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        };
        assert_eq!(smtp_failure(&io).kind, FailureKind::Unreachable);
        assert_eq!(
            smtp_failure(&SmtpError::BadRecipient("x".into())).kind,
            FailureKind::Rejected
        );
    }
}
