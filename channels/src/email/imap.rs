//! IMAP inbound (async-imap over any [`MailStream`]): connect with the configured security,
//! LOGIN, SELECT the folder, list the UIDs above the cursor, fetch each message (at most
//! [`ImapConfig::max_message`] bytes, a partial fetch beyond), mark it `\Seen`, and wait for
//! new mail with IDLE (re-issued every 29 minutes) or by polling.
//!
//! The cursor is the folder's UIDVALIDITY and the last UID delivered; the caller persists it
//! only after the broker answered `deliver`. A cursor of another UIDVALIDITY (the folder was
//! recreated, or the server renumbered it) and the first start (no cursor) both start after the
//! current highest UID: mail already in the folder is never delivered in bulk. The change is
//! logged by the caller (see [`start_cursor`]) so that the operator can look at the folder.

use std::sync::Arc;
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use async_imap::{Client, Session};
use futures_util::TryStreamExt as _;

use super::clipped;
use super::stream::{BoxStream, Budget, Budgeted, MailStream};
use crate::net::{start_tls_with, NetError};
use crate::settings::Security;

/// The budget of one command's answer beyond the message cap (headers of the FETCH response,
/// capability lists, SEARCH results).
const ANSWER_SLACK: usize = 256 * 1024;
/// At most this many new messages are handled per round (the rest in the next one).
pub const MAX_PER_ROUND: usize = 100;
/// IDLE is re-issued after this long (RFC 2177: servers may drop an IDLE after 30 minutes).
pub const IDLE_RENEW: Duration = Duration::from_secs(29 * 60);

/// What [`Mailbox::open`] needs.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// The server's name, for the TLS certificate check.
    pub host: String,
    pub security: Security,
    pub username: String,
    pub folder: String,
    /// Largest message fetched whole (bytes); larger ones are fetched up to this size and
    /// delivered as a note.
    pub max_message: usize,
    /// Time allowed for each command (the greeting, LOGIN, SELECT, one FETCH...).
    pub command_timeout: Duration,
    /// Time between two looks at the folder when the server has no IDLE.
    pub poll_interval: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Position in the folder: its UIDVALIDITY and the last UID handed to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub uid_validity: u32,
    pub last_uid: u32,
}

/// Why the IMAP side failed (the connection is then dropped and opened again).
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("IMAP {op}: {}", clipped(.source))]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("IMAP {op}: {}", clipped(.source))]
    Protocol {
        op: &'static str,
        #[source]
        source: async_imap::error::Error,
    },
    #[error("IMAP {op}: no answer within {} s", .after.as_secs())]
    Timeout { op: &'static str, after: Duration },
    #[error("IMAP: {0}")]
    Tls(#[source] NetError),
    #[error("IMAP login as {user:?} refused: {}", clipped(.reason))]
    Login { user: String, reason: String },
    #[error("IMAP {op}: {what}")]
    Unexpected { op: &'static str, what: String },
}

/// A fetched message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub uid: u32,
    /// The size the server reports (RFC822.SIZE).
    pub size: u32,
    /// The message, or its first `max_message` bytes when `size` is larger.
    pub raw: Vec<u8>,
    /// `raw` is only the beginning of the message.
    pub truncated: bool,
}

/// Why [`Mailbox::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The server said something during IDLE (new mail, most likely).
    NewData,
    /// The IDLE period or the poll interval ended.
    Timeout,
}

/// The cursor to start from, and a line for the log when it is not the saved one.
pub fn start_cursor(
    saved: Option<Cursor>,
    uid_validity: u32,
    highest_uid: u32,
) -> (Cursor, Option<String>) {
    let fresh = Cursor {
        uid_validity,
        last_uid: highest_uid,
    };
    match saved {
        Some(c) if c.uid_validity == uid_validity => (c, None),
        Some(c) => (
            fresh,
            Some(format!(
                "the folder's UIDVALIDITY changed from {} to {uid_validity}: its UIDs were \
                 renumbered, so the saved position (UID {}) means nothing now; starting after \
                 UID {highest_uid}, mail that arrived since the last delivery is NOT delivered \
                 (look at the folder)",
                c.uid_validity, c.last_uid
            )),
        ),
        None => (
            fresh,
            Some(format!(
                "no saved position: starting after UID {highest_uid} of UIDVALIDITY \
                 {uid_validity}; mail already in the folder is not delivered"
            )),
        ),
    }
}

type ImapSession = Session<Budgeted>;

/// A logged-in session with the folder selected.
#[derive(Debug)]
pub struct Mailbox {
    session: Option<ImapSession>,
    budget: Budget,
    cfg: ImapConfig,
    /// The folder's UIDVALIDITY at SELECT.
    pub uid_validity: u32,
    /// The highest UID in the folder at SELECT (0 when empty).
    pub highest_uid: u32,
    /// The server offers IDLE.
    pub idle: bool,
}

async fn timed<T, E>(
    op: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
    wrap: impl FnOnce(E) -> ImapError,
) -> Result<T, ImapError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(wrap),
        Err(_) => Err(ImapError::Timeout { op, after }),
    }
}

fn proto(op: &'static str) -> impl FnOnce(async_imap::error::Error) -> ImapError {
    move |source| ImapError::Protocol { op, source }
}

impl Mailbox {
    /// Speak IMAP over `stream` (already connected to `cfg.host`): TLS per `cfg.security`,
    /// LOGIN, CAPABILITY, SELECT.
    pub async fn open<S: MailStream + 'static>(
        stream: S,
        cfg: &ImapConfig,
        password: &str,
    ) -> Result<Mailbox, ImapError> {
        let t = cfg.command_timeout;
        let budget = Budget::default();
        budget.set(ANSWER_SLACK);
        let mut raw: BoxStream = Box::new(stream);
        if cfg.security == Security::Tls {
            raw = tls(raw, cfg).await?;
        }
        let mut client = Client::new(Budgeted::new(raw, budget.clone()));
        greeting(&mut client, t).await?;
        if cfg.security == Security::Starttls {
            timed(
                "STARTTLS",
                t,
                client.run_command_and_check_ok("STARTTLS", None),
                proto("STARTTLS"),
            )
            .await?;
            // Whatever the server sent after its OK is discarded with the client's buffer
            // (an injected answer must not be read as if it came through TLS).
            let (plain, budget) = client.into_inner().into_inner();
            client = Client::new(Budgeted::new(tls(plain, cfg).await?, budget));
        }
        budget.set(ANSWER_SLACK);
        let mut session = match tokio::time::timeout(t, client.login(&cfg.username, password)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err((e, _))) => {
                return Err(ImapError::Login {
                    user: cfg.username.clone(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ImapError::Timeout {
                    op: "LOGIN",
                    after: t,
                })
            }
        };
        budget.set(ANSWER_SLACK);
        let caps = timed("CAPABILITY", t, session.capabilities(), proto("CAPABILITY")).await?;
        let idle = caps.has_str("IDLE");
        budget.set(ANSWER_SLACK);
        let mb = timed("SELECT", t, session.select(&cfg.folder), proto("SELECT")).await?;
        let uid_validity = mb.uid_validity.ok_or_else(|| ImapError::Unexpected {
            op: "SELECT",
            what: format!("{:?} has no UIDVALIDITY", cfg.folder),
        })?;
        let mut me = Mailbox {
            session: Some(session),
            budget,
            cfg: cfg.clone(),
            uid_validity,
            highest_uid: 0,
            idle,
        };
        me.highest_uid = me.highest_uid().await?;
        Ok(me)
    }

    fn session(&mut self, op: &'static str) -> Result<&mut ImapSession, ImapError> {
        self.session.as_mut().ok_or(ImapError::Unexpected {
            op,
            what: "the session was lost in a failed IDLE".into(),
        })
    }

    /// The highest UID in the folder (0 when it is empty).
    async fn highest_uid(&mut self) -> Result<u32, ImapError> {
        let t = self.cfg.command_timeout;
        self.budget.set(ANSWER_SLACK);
        let s = self.session("UID FETCH *")?;
        let fetched: Vec<_> = timed(
            "UID FETCH *",
            t,
            async {
                s.uid_fetch("*", "(UID)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            proto("UID FETCH *"),
        )
        .await?;
        Ok(fetched.iter().filter_map(|f| f.uid).max().unwrap_or(0))
    }

    /// UIDs above `after`, ascending, at most [`MAX_PER_ROUND`].
    pub async fn new_uids(&mut self, after: u32) -> Result<Vec<u32>, ImapError> {
        let t = self.cfg.command_timeout;
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // NOOP first: a server may show new mail only at a command that syncs the folder
        // (Dovecot does not at SEARCH).
        self.budget.set(ANSWER_SLACK);
        let s = self.session("NOOP")?;
        timed("NOOP", t, s.noop(), proto("NOOP")).await?;
        self.budget.set(ANSWER_SLACK + 8 * 1024 * 1024);
        let s = self.session("UID SEARCH")?;
        let found = timed(
            "UID SEARCH",
            t,
            s.uid_search(format!("UID {from}:*")),
            proto("UID SEARCH"),
        )
        .await?;
        // What the server announced up to now is covered by this search.
        while s.unsolicited_responses.try_recv().is_ok() {}
        // `N:*` includes the highest UID even when it is below N.
        let mut uids: Vec<u32> = found.into_iter().filter(|&u| u > after).collect();
        uids.sort_unstable();
        uids.truncate(MAX_PER_ROUND);
        Ok(uids)
    }

    /// Fetch one message without setting `\Seen` (None: it is gone).
    pub async fn fetch(&mut self, uid: u32) -> Result<Option<Fetched>, ImapError> {
        let t = self.cfg.command_timeout;
        let cap = self.cfg.max_message;
        self.budget.set(cap + ANSWER_SLACK);
        let s = self.session("UID FETCH")?;
        let fetched: Vec<_> = timed(
            "UID FETCH",
            t,
            async {
                s.uid_fetch(
                    uid.to_string(),
                    format!("(UID RFC822.SIZE BODY.PEEK[]<0.{cap}>)"),
                )
                .await?
                .try_collect::<Vec<_>>()
                .await
            },
            proto("UID FETCH"),
        )
        .await?;
        let Some(f) = fetched.iter().find(|f| f.uid == Some(uid)) else {
            return Ok(None);
        };
        let size = f.size.unwrap_or(0);
        let mut raw = f.body().unwrap_or_default().to_vec();
        let truncated = size as usize > cap || raw.len() > cap;
        raw.truncate(cap);
        Ok(Some(Fetched {
            uid,
            size,
            raw,
            truncated,
        }))
    }

    /// Set `\Seen` on a delivered message (so a person reading the folder sees it was handled).
    pub async fn mark_seen(&mut self, uid: u32) -> Result<(), ImapError> {
        let t = self.cfg.command_timeout;
        self.budget.set(ANSWER_SLACK);
        let s = self.session("UID STORE")?;
        timed(
            "UID STORE",
            t,
            async {
                s.uid_store(uid.to_string(), "+FLAGS.SILENT (\\Seen)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            proto("UID STORE"),
        )
        .await?;
        Ok(())
    }

    /// Wait for new mail: IDLE for at most `limit` (capped at [`IDLE_RENEW`]) when the server
    /// offers it, else sleep the poll interval and NOOP (which also checks the connection).
    pub async fn wait(&mut self, limit: Duration) -> Result<Woken, ImapError> {
        let t = self.cfg.command_timeout;
        if !self.idle {
            tokio::time::sleep(self.cfg.poll_interval.min(limit)).await;
            self.budget.set(ANSWER_SLACK);
            let s = self.session("NOOP")?;
            timed("NOOP", t, s.noop(), proto("NOOP")).await?;
            return Ok(Woken::Timeout);
        }
        // News that came with an earlier answer (EXISTS during a FETCH) would not wake an IDLE.
        let mut news = false;
        let s = self.session("IDLE")?;
        while let Ok(r) = s.unsolicited_responses.try_recv() {
            news |= matches!(
                r,
                async_imap::types::UnsolicitedResponse::Exists(_)
                    | async_imap::types::UnsolicitedResponse::Recent(_)
            );
        }
        if news {
            return Ok(Woken::NewData);
        }
        let session = self.session.take().ok_or(ImapError::Unexpected {
            op: "IDLE",
            what: "the session was lost in a failed IDLE".into(),
        })?;
        self.budget.set(ANSWER_SLACK);
        let mut handle = session.idle();
        timed("IDLE", t, handle.init(), proto("IDLE")).await?;
        let woken = {
            let (fut, _stop) = handle.wait_with_timeout(limit.min(IDLE_RENEW));
            // The library's own timeout restarts at every answer (`* OK still here`): bound the
            // whole wait as well.
            match tokio::time::timeout(limit.min(IDLE_RENEW) + t, fut).await {
                Ok(Ok(IdleResponse::NewData(_))) => Woken::NewData,
                Ok(Ok(IdleResponse::Timeout | IdleResponse::ManualInterrupt)) | Err(_) => {
                    Woken::Timeout
                }
                Ok(Err(e)) => {
                    return Err(ImapError::Protocol {
                        op: "IDLE",
                        source: e,
                    })
                }
            }
        };
        self.budget.set(ANSWER_SLACK);
        let session = timed("DONE", t, handle.done(), proto("DONE")).await?;
        self.session = Some(session);
        Ok(woken)
    }

    /// LOGOUT (best effort, bounded).
    pub async fn logout(mut self) {
        if let Some(mut s) = self.session.take() {
            self.budget.set(ANSWER_SLACK);
            let _ = tokio::time::timeout(self.cfg.command_timeout, s.logout()).await;
        }
    }
}

/// TLS over `raw`, the certificate checked against `cfg.host`, within the command timeout.
async fn tls(raw: BoxStream, cfg: &ImapConfig) -> Result<BoxStream, ImapError> {
    let tls = timed(
        "TLS handshake",
        cfg.command_timeout,
        start_tls_with(raw, &cfg.host, cfg.tls.clone()),
        ImapError::Tls,
    )
    .await?;
    Ok(Box::new(tls))
}

async fn greeting(client: &mut Client<Budgeted>, t: Duration) -> Result<(), ImapError> {
    match tokio::time::timeout(t, client.read_response()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(ImapError::Unexpected {
            op: "greeting",
            what: "the server closed the connection".into(),
        }),
        Ok(Err(e)) => Err(ImapError::Io {
            op: "greeting",
            source: e,
        }),
        Err(_) => Err(ImapError::Timeout {
            op: "greeting",
            after: t,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_cursor_keeps_a_matching_cursor() {
        let saved = Cursor {
            uid_validity: 5,
            last_uid: 10,
        };
        assert_eq!(start_cursor(Some(saved), 5, 20), (saved, None));
    }

    #[test]
    fn start_cursor_after_a_uidvalidity_change_skips_to_the_top_and_says_so() {
        let saved = Cursor {
            uid_validity: 5,
            last_uid: 10,
        };
        let (c, note) = start_cursor(Some(saved), 6, 3);
        assert_eq!(
            c,
            Cursor {
                uid_validity: 6,
                last_uid: 3
            }
        );
        assert!(note.unwrap().contains("UIDVALIDITY changed from 5 to 6"));
    }

    #[test]
    fn start_cursor_without_a_saved_one_starts_at_the_top() {
        let (c, note) = start_cursor(None, 9, 42);
        assert_eq!(
            c,
            Cursor {
                uid_validity: 9,
                last_uid: 42
            }
        );
        assert!(note.is_some());
    }
}
