//! Held inbound messages: what a channel adapter delivered from a sender the channel does not
//! admit (not in its `senders`, not admitted for good by an operator). Each is kept in its own
//! file of a [`Spool`] (`<state>/held/`) until an operator admits it (it is queued for the
//! agent; `always` also admits its sender on that channel for good) or drops it.
//!
//! The operator acts through the control socket ([`Ops::held_messages`], [`Ops::admit_held`],
//! [`Ops::drop_held`]) or, through an operator-scoped gateway client, with the `held`,
//! `admit` and `drop_held` ops (profiles with `approve = true`). Every admission and drop is
//! audited before it is done (target `CHANNEL:SENDER`, never the body); listing is not.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::audit::{AuditDecision, RuleRef};
use crate::durable::{JournalError, Spool, SpoolError};
use crate::protocol::{
    encode_reply, DeliverStatus, ErrorCode, HeldMessage, InboundMessage, OkReply, Reply, MAX_FRAME,
};
use crate::server::{Identity, Response};

use super::channels::ChannelBook;
use super::inbound::{encoded_len, ClaimGuard, InboundQueue};
use super::{now_rfc3339, shown, Audited, Ops};
use crate::sync::lock;

/// Why an admission or a drop failed.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("no held message {id}")]
    NotFound { id: String },
    #[error("the inbound queue is full ({0} messages); try again later")]
    QueueFull(usize),
    #[error("the message does not fit in one inbound reply")]
    TooLarge,
    #[error("held messages: {0}")]
    Store(#[from] SpoolError),
    #[error("the sender's admission could not be recorded: {0}")]
    Journal(#[from] JournalError),
}

/// The held messages: in memory, and each in its own file.
#[derive(Debug)]
pub(crate) struct HeldStore {
    spool: Spool,
    entries: Mutex<BTreeMap<String, InboundMessage>>,
}

impl HeldStore {
    /// The store over `spool`; files that cannot be read are logged and left alone.
    pub(crate) fn open(spool: Spool) -> Result<HeldStore, SpoolError> {
        let listing = spool.list::<InboundMessage>()?;
        for u in &listing.unreadable {
            tracing::warn!(file = %u.file, error = %u.error, "held messages: unreadable entry skipped");
        }
        Ok(HeldStore {
            spool,
            entries: Mutex::new(listing.entries.into_iter().collect()),
        })
    }

    /// Store `m`; returns its held id. Blocking.
    fn put(&self, m: &InboundMessage) -> Result<String, SpoolError> {
        let id = self.spool.put(m)?;
        lock(&self.entries).insert(id.clone(), m.clone());
        Ok(id)
    }

    pub(crate) fn get(&self, id: &str) -> Option<InboundMessage> {
        lock(&self.entries).get(id).cloned()
    }

    /// The ids of the held messages, oldest first (without copying the messages).
    pub(crate) fn ids(&self) -> Vec<String> {
        lock(&self.entries).keys().cloned().collect()
    }

    /// Remove held message `id`. Blocking.
    pub(crate) fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.spool.remove(id)?;
        lock(&self.entries).remove(id);
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Every held message with its id, oldest first.
    pub(crate) fn all(&self) -> Vec<(String, InboundMessage)> {
        lock(&self.entries)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Held messages per channel.
    pub(crate) fn per_channel(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for m in lock(&self.entries).values() {
            *out.entry(m.channel.clone()).or_insert(0) += 1;
        }
        out
    }
}

/// The stores an admission touches.
pub(crate) struct Admitter {
    held: Arc<HeldStore>,
    book: Arc<ChannelBook>,
    inbound: Arc<InboundQueue>,
    capacity: usize,
}

impl Admitter {
    /// Queue held message `id` for the agent (with `always`, its sender is admitted for good
    /// first). Blocking; the caller has audited.
    pub(crate) fn admit(&self, id: &str, always: bool) -> Result<u64, HeldError> {
        let Some(mut m) = self.held.get(id) else {
            return Err(HeldError::NotFound { id: id.to_string() });
        };
        if always {
            self.book.admit(&m.channel, &m.sender)?;
        }
        let place = self
            .inbound
            .reserve()
            .ok_or(HeldError::QueueFull(self.capacity))?;
        m.ts = now_rfc3339();
        let len = encoded_len(&m)
            .filter(|l| self.inbound.fits_one_reply(*l))
            .ok_or(HeldError::TooLarge)?;
        let (channel, reply_to) = (m.channel.clone(), m.reply_to.clone());
        let seq = place.push(m, len)?;
        if let Err(e) = self.held.remove(id) {
            tracing::error!(held = %id, error = %e, "held message queued but not removed");
        }
        if let Err(e) = self.book.add_reply_address(&channel, &reply_to) {
            tracing::error!(channel = %channel, error = %e, "channel state: reply address not recorded");
        }
        Ok(seq)
    }
}

fn held_message(id: &str, m: &InboundMessage) -> HeldMessage {
    HeldMessage {
        id: id.to_string(),
        channel: m.channel.clone(),
        sender: m.sender.clone(),
        conversation: m.conversation.clone(),
        body: m.body.clone(),
        ts: m.ts.clone(),
    }
}

fn target_of(m: &InboundMessage) -> String {
    format!("{}:{}", shown(&m.channel), shown(&m.sender))
}

impl Ops {
    /// Hold a delivered message (its sender is not admitted): audited, stored, answered with
    /// its held id.
    pub(crate) async fn hold(
        &self,
        who: &Identity,
        target: String,
        rule: Option<RuleRef>,
        message: InboundMessage,
        claim: ClaimGuard,
    ) -> Response {
        if self.held.len() >= self.cfg.inbound_capacity {
            return self
                .refuse(
                    who,
                    Audited::of("deliver", target).by(rule).deny(
                        "held messages full",
                        format!(
                            "{} messages wait for the operator; not held",
                            self.cfg.inbound_capacity
                        ),
                    ),
                    ErrorCode::Busy,
                    format!(
                        "deliver on {}: {} held messages wait for the operator; keep the \
                         message and try again later",
                        message.channel, self.cfg.inbound_capacity
                    ),
                )
                .await;
        }
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("deliver", target).by(rule).ask(
                    "holding",
                    format!(
                        "{} bytes; sender not admitted: held for the operator",
                        message.body.len()
                    ),
                ),
            )
            .await
        {
            return resp;
        }
        let held = self.held.clone();
        let book = self.book.clone();
        let res = tokio::task::spawn_blocking(move || {
            let id = held.put(&message)?;
            claim.taken();
            book.note_in(&message.channel);
            Ok::<String, SpoolError>(id)
        })
        .await;
        // The channels' operators are told.
        self.desk.wake();
        match res {
            Ok(Ok(id)) => Response::ok(OkReply::Deliver {
                seq: 0,
                status: DeliverStatus::Held,
                held: Some(id),
            }),
            Ok(Err(e)) => Response::err(
                ErrorCode::Unavailable,
                format!("deliver: the message could not be held: {e}"),
            ),
            Err(e) => Response::err(ErrorCode::Internal, format!("deliver task: {e}")),
        }
    }

    /// What admitting a held message needs, for a blocking thread.
    pub(crate) fn admitter(&self) -> Admitter {
        Admitter {
            held: self.held.clone(),
            book: self.book.clone(),
            inbound: self.inbound.clone(),
            capacity: self.cfg.inbound_capacity,
        }
    }

    /// The held messages, oldest first.
    pub fn held_messages(&self) -> Vec<HeldMessage> {
        self.held
            .all()
            .iter()
            .map(|(id, m)| held_message(id, m))
            .collect()
    }

    /// The operator admits held message `id`: it is queued for the agent (its seq returned);
    /// `always` admits its sender on that channel for good. Audited (who: `operator`) first.
    /// Blocking.
    pub fn admit_held(&self, id: &str, always: bool, by: Option<&str>) -> Result<u64, String> {
        let m = self
            .held
            .get(id)
            .ok_or_else(|| format!("no held message {}", shown(id)))?;
        self.operator_audit(
            "admit",
            target_of(&m),
            AuditDecision::Allow,
            format!("admitted {id} {}", if always { "for good" } else { "once" }),
            format!("by {}", by.map_or_else(|| "the operator".into(), shown)),
        )?;
        self.admitter().admit(id, always).map_err(|e| e.to_string())
    }

    /// The operator drops held message `id`. Audited (who: `operator`) first. Blocking.
    pub fn drop_held(&self, id: &str, by: Option<&str>) -> Result<(), String> {
        let m = self
            .held
            .get(id)
            .ok_or_else(|| format!("no held message {}", shown(id)))?;
        self.operator_audit(
            "drop_held",
            target_of(&m),
            AuditDecision::Allow,
            format!("dropped {id}"),
            format!("by {}", by.map_or_else(|| "the operator".into(), shown)),
        )?;
        self.held.remove(id).map_err(|e| e.to_string())
    }

    /// The `held` operation: the held messages, oldest first, as many as fit in one frame.
    pub async fn held_op(&self, who: &Identity) -> Response {
        if let Err(resp) = self
            .operator_allowed(who, "held", "held messages", None)
            .await
        {
            return resp;
        }
        let all = self.held_messages();
        let total = all.len();
        let mut held = Vec::new();
        let base = encode_reply(
            u64::MAX,
            &Reply::Ok(OkReply::Held {
                held: Vec::new(),
                omitted: u64::MAX,
            }),
        )
        .map_or(MAX_FRAME, |b| b.len());
        let mut used = base;
        for h in all {
            let len = serde_json::to_vec(&h).map_or(MAX_FRAME, |b| b.len() + 1);
            if used.saturating_add(len) > MAX_FRAME {
                break;
            }
            used += len;
            held.push(h);
        }
        let omitted = (total - held.len()) as u64;
        Response::ok(OkReply::Held { held, omitted })
    }

    /// The `admit` operation (an operator, through the gateway).
    pub async fn admit_op(
        &self,
        who: &Identity,
        id: &str,
        always: bool,
        by: Option<String>,
    ) -> Response {
        let found = self.held.get(id);
        let target = found.as_ref().map_or_else(|| shown(id), target_of);
        if let Err(resp) = self
            .operator_allowed(who, "admit", &target, by.as_deref())
            .await
        {
            return resp;
        }
        let by_shown = by
            .as_deref()
            .map_or_else(|| "nobody named".to_string(), shown);
        if found.is_none() {
            return self
                .refuse(
                    who,
                    Audited::refused("admit", target, AuditDecision::Deny, "no such held message"),
                    ErrorCode::NotFound,
                    format!("admit: no held message {}", shown(id)),
                )
                .await;
        }
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("admit", target).allow(
                    format!(
                        "admitting {} {}",
                        shown(id),
                        if always { "for good" } else { "once" }
                    ),
                    format!("by {by_shown} (as the child claims)"),
                ),
            )
            .await
        {
            return resp;
        }
        let admitter = self.admitter();
        let id = id.to_string();
        let res = match tokio::task::spawn_blocking(move || admitter.admit(&id, always)).await {
            Ok(r) => r,
            Err(e) => return Response::err(ErrorCode::Internal, format!("admit task: {e}")),
        };
        match res {
            Ok(seq) => Response::ok(OkReply::Admit { seq }),
            Err(e @ HeldError::NotFound { .. }) => {
                Response::err(ErrorCode::NotFound, format!("admit: {e}"))
            }
            Err(e @ HeldError::QueueFull(_)) => {
                Response::err(ErrorCode::Busy, format!("admit: {e}"))
            }
            Err(e @ HeldError::TooLarge) => {
                Response::err(ErrorCode::TooLarge, format!("admit: {e}"))
            }
            Err(e) => Response::err(ErrorCode::Unavailable, format!("admit: {e}")),
        }
    }

    /// The `drop_held` operation (an operator, through the gateway).
    pub async fn drop_held_op(&self, who: &Identity, id: &str, by: Option<String>) -> Response {
        let found = self.held.get(id);
        let target = found.as_ref().map_or_else(|| shown(id), target_of);
        if let Err(resp) = self
            .operator_allowed(who, "drop_held", &target, by.as_deref())
            .await
        {
            return resp;
        }
        if found.is_none() {
            return self
                .refuse(
                    who,
                    Audited::refused(
                        "drop_held",
                        target,
                        AuditDecision::Deny,
                        "no such held message",
                    ),
                    ErrorCode::NotFound,
                    format!("drop_held: no held message {}", shown(id)),
                )
                .await;
        }
        let by_shown = by
            .as_deref()
            .map_or_else(|| "nobody named".to_string(), shown);
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("drop_held", target).allow(
                    format!("dropping {}", shown(id)),
                    format!("by {by_shown} (as the child claims)"),
                ),
            )
            .await
        {
            return resp;
        }
        let held = self.held.clone();
        let id = id.to_string();
        match tokio::task::spawn_blocking(move || held.remove(&id)).await {
            Ok(Ok(())) => Response::ok(OkReply::DropHeld {}),
            Ok(Err(SpoolError::NotFound { .. })) => {
                Response::err(ErrorCode::NotFound, "drop_held: no such held message")
            }
            Ok(Err(e)) => Response::err(ErrorCode::Unavailable, format!("drop_held: {e}")),
            Err(e) => Response::err(ErrorCode::Internal, format!("drop_held task: {e}")),
        }
    }
}
