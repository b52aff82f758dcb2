//! `send`: an outbound message on a channel. Order of checks: the profile names the channel;
//! the per-(identity, channel) token bucket (over it: `rate_limited`, nothing kept); then the
//! size cap, the recipient allowlist and the block patterns — a message failing one of these
//! goes to the dead-letter queue with the reason. Known secret values are redacted from the
//! body before it is stored anywhere (queue or channel); the channel's `redact` patterns are
//! applied to what is delivered. Kind `file`: one JSON line appended and fsync'd. Kind
//! `adapter`: written to the channel's durable outbox (`ops/outbox.rs`) and answered `queued`
//! with its outbox id; the adapter sends it. With `reply_to_senders`, a recipient outside the
//! allowlist is also accepted when it is the reply address of a message queued from an
//! admitted sender of the channel. A `key` makes a send idempotent per channel: a repeat is
//! answered `duplicate` and nothing is done (checked before the rate limit).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use carapace_policy::broker::{ChannelKind, ChannelSpec};
use serde::Serialize;

use crate::audit::{AuditDecision, Who};
use crate::dlq::Entry;
use crate::protocol::{ErrorCode, OkReply, SendStatus, MAX_MESSAGE_ID};
use crate::ratelimit::{Limiter, RetryAfter};
use crate::server::{Identity, Response};

use super::channels::Claim;
use super::inbound::{bad_ref, ClaimGuard};
use super::outbox::OutboxEntry;
use super::{now_rfc3339, rule_ref, shown, Audited, Ops};
use crate::sync::lock;

/// Why a message is dead-lettered instead of delivered, or None. `reply_address`: the
/// recipient is the reply address of a message queued from an admitted sender of the channel
/// (allowed when the channel says `reply_to_senders`).
pub fn dead_letter_reason(
    spec: &ChannelSpec,
    recipient: &str,
    body: &str,
    reply_address: bool,
) -> Option<String> {
    if body.len() as u64 > spec.max_bytes {
        return Some(format!(
            "over the size cap ({} bytes > max_bytes {})",
            body.len(),
            spec.max_bytes
        ));
    }
    if spec.recipient_allowed(recipient).is_none() && !(spec.reply_to_senders && reply_address) {
        return Some("recipient not allowlisted".to_string());
    }
    if let Some(p) = spec.blocked_by(body) {
        return Some(format!("blocked by pattern {p:?}"));
    }
    None
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    from: Who,
    channel: &'a str,
    recipient: &'a str,
    body: &'a str,
}

/// Append one JSON line to a file channel and fsync it.
fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)?;
    f.write_all(line)?;
    f.sync_data()
}

impl Ops {
    fn take_channel_token(&self, spec: &ChannelSpec, id: u64) -> Result<(), RetryAfter> {
        let mut rates = lock(&self.channel_rates);
        let limiter = rates.entry(spec.name.clone()).or_insert_with(|| {
            Limiter::new(
                f64::from(spec.rate.per_minute) / 60.0,
                spec.rate.burst,
                self.cfg.max_rate_keys,
            )
        });
        limiter.try_take(&id, Instant::now())
    }

    fn channel_lock(&self, path: &Path) -> Arc<Mutex<()>> {
        lock(&self.channel_locks)
            .entry(path.to_path_buf())
            .or_default()
            .clone()
    }

    /// The `send` operation without the optional fields.
    pub async fn send(
        &self,
        who: &Identity,
        channel: &str,
        recipient: &str,
        body: String,
    ) -> Response {
        self.send_with(who, channel, recipient, body, None, None)
            .await
    }

    /// The `send` operation: `in_reply_to` names the inbound message answered (adapter
    /// channels pass it to their adapter), `key` makes it idempotent per channel.
    pub async fn send_with(
        &self,
        who: &Identity,
        channel: &str,
        recipient: &str,
        body: String,
        in_reply_to: Option<String>,
        key: Option<String>,
    ) -> Response {
        let target = format!("{} -> {}", shown(channel), shown(recipient));
        let rules = match self.rules_for(who, "send", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let Some(spec) = rules.channel(channel).cloned() else {
            return self
                .refuse(
                    who,
                    Audited::of("send", target.clone())
                        .deny("refused", "the profile does not name this channel"),
                    ErrorCode::Denied,
                    format!(
                        "send on {}: not a channel of profile `{}`",
                        shown(channel),
                        who.profile
                    ),
                )
                .await;
        };
        let rref = rule_ref(spec.line, &spec.why);
        for (what, v) in [("in_reply_to", &in_reply_to), ("key", &key)] {
            if let Some(why) = v.as_deref().and_then(bad_ref) {
                return self
                    .refuse(
                        who,
                        Audited::refused(
                            "send",
                            target.clone(),
                            AuditDecision::Error,
                            format!("the {what} {why}"),
                        ),
                        ErrorCode::BadRequest,
                        format!(
                            "send on {}: the {what} {why} (1 to {MAX_MESSAGE_ID} bytes without \
                             control characters)",
                            spec.name
                        ),
                    )
                    .await;
            }
        }
        let key_shown = key.as_deref().map(shown).unwrap_or_default();
        let claim = match ClaimGuard::claim(&self.book, &spec.name, true, key.as_deref()) {
            Ok(c) => c,
            Err(Claim::InProgress) => {
                return self
                    .refuse(
                        who,
                        Audited::refused(
                            "send",
                            target,
                            AuditDecision::Deny,
                            format!("key {key_shown} is being sent"),
                        ),
                        ErrorCode::Busy,
                        format!(
                            "send on {}: a send with this key is in progress; try again later",
                            spec.name
                        ),
                    )
                    .await;
            }
            Err(_) => {
                return match self
                    .audit(
                        who,
                        Audited::of("send", target).by(rref).allow(
                            "duplicate",
                            format!("key {key_shown} already taken; nothing sent"),
                        ),
                    )
                    .await
                {
                    Ok(()) => Response::ok(OkReply::Send {
                        status: SendStatus::Duplicate,
                        dlq_id: None,
                        outbox_id: None,
                    }),
                    Err(_) => Response::err(
                        ErrorCode::Unavailable,
                        "the audit log cannot be written: request refused",
                    ),
                };
            }
        };
        if let Err(retry) = self.take_channel_token(&spec, who.id) {
            return self
                .refuse(
                    who,
                    Audited::of("send", target.clone())
                        .by(rref)
                        .deny("rate limited", retry.to_string()),
                    ErrorCode::RateLimited,
                    format!("send on {}: {retry}", spec.name),
                )
                .await;
        }
        // Known secret values never persist, wherever the message goes.
        let redactor = self.redactor();
        let (clean, secret_hits) = if redactor.finds(body.as_bytes()) {
            let r = redactor.redact(body.as_bytes());
            (String::from_utf8_lossy(&r).into_owned(), true)
        } else {
            (body.clone(), false)
        };
        let reply_address = self.book.is_reply_address(&spec.name, recipient);
        if let Some(reason) = dead_letter_reason(&spec, recipient, &body, reply_address) {
            let entry = Entry {
                channel: spec.name.clone(),
                recipient: recipient.to_string(),
                body: clean,
                reason: reason.clone(),
                who: Who::from(who),
                ts: now_rfc3339(),
            };
            let dlq = self.dlq.clone();
            let put = tokio::task::spawn_blocking(move || {
                let id = dlq.put(&entry)?;
                claim.taken();
                Ok::<String, crate::dlq::DlqError>(id)
            })
            .await;
            let id = match put {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => {
                    return self
                        .refuse(
                            who,
                            Audited::of("send", target.clone()).by(rref).deny(
                                "refused; dead-letter queue unavailable",
                                format!("{reason}; {e}"),
                            ),
                            ErrorCode::Unavailable,
                            format!(
                                "send on {}: refused ({reason}) and the dead-letter queue failed",
                                spec.name
                            ),
                        )
                        .await
                }
                Err(e) => {
                    return Response::err(ErrorCode::Internal, format!("dead-letter task: {e}"))
                }
            };
            return match self
                .audit(
                    who,
                    Audited::of("send", target)
                        .by(rref)
                        .deny(format!("dead-lettered {id}"), reason),
                )
                .await
            {
                Ok(()) => Response::ok(OkReply::Send {
                    status: SendStatus::DeadLettered,
                    dlq_id: Some(id),
                    outbox_id: None,
                }),
                Err(_) => Response::err(
                    ErrorCode::Unavailable,
                    "the audit log cannot be written: request refused",
                ),
            };
        }
        let (delivered, pattern_hits) = spec.redact_patterns(&clean);
        let redactions = format!(
            "{} bytes; {} pattern redaction(s){}",
            delivered.len(),
            pattern_hits,
            if secret_hits {
                "; secret value(s) redacted"
            } else {
                ""
            }
        );
        let path = match spec.kind.clone() {
            ChannelKind::File { path } => path,
            ChannelKind::Adapter => {
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("send", target)
                            .by(rref)
                            .allow("queuing", redactions),
                    )
                    .await
                {
                    return resp;
                }
                let entry = OutboxEntry {
                    recipient: recipient.to_string(),
                    body: delivered,
                    in_reply_to,
                    key,
                    failures: 0,
                    due_ms: 0,
                    who: Who::from(who),
                    ts: now_rfc3339(),
                    last_error: None,
                    buttons: Vec::new(),
                };
                let outbox = self.outbox.clone();
                let name = spec.name.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let id = outbox.enqueue(&name, &entry)?;
                    claim.taken();
                    Ok::<String, crate::durable::SpoolError>(id)
                })
                .await;
                return match res {
                    Ok(Ok(id)) => Response::ok(OkReply::Send {
                        status: SendStatus::Queued,
                        dlq_id: None,
                        outbox_id: Some(id),
                    }),
                    Ok(Err(e)) => Response::err(
                        ErrorCode::Unavailable,
                        format!(
                            "send on {}: the outbox could not be written: {e}",
                            spec.name
                        ),
                    ),
                    Err(e) => Response::err(ErrorCode::Internal, format!("send task: {e}")),
                };
            }
        };
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("send", target.clone())
                    .by(rref)
                    .allow("delivering", redactions),
            )
            .await
        {
            return resp;
        }
        let line = Line {
            ts: now_rfc3339(),
            from: Who::from(who),
            channel: &spec.name,
            recipient,
            body: &delivered,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => return Response::err(ErrorCode::Internal, format!("encode: {e}")),
        };
        bytes.push(b'\n');
        let guard = self.channel_lock(&path);
        let p = path.clone();
        let book = self.book.clone();
        let name = spec.name.clone();
        let res = tokio::task::spawn_blocking(move || {
            let _g = lock(&guard);
            append_line(&p, &bytes)?;
            claim.taken();
            book.note_out(&name);
            Ok::<(), std::io::Error>(())
        })
        .await;
        match res {
            Ok(Ok(())) => Response::ok(OkReply::Send {
                status: SendStatus::Delivered,
                dlq_id: None,
                outbox_id: None,
            }),
            Ok(Err(e)) => Response::err(
                ErrorCode::Unavailable,
                format!("send on {}: {}: {e}", spec.name, path.display()),
            ),
            Err(e) => Response::err(ErrorCode::Internal, format!("send task: {e}")),
        }
    }
}

impl Ops {
    /// The operator releases dead letter `id`: it is delivered to its channel as it stands
    /// (the operator overrides the allowlist or filter that held it; the channel's redaction
    /// patterns still apply), and the release is audited (who: `operator`). Blocking. When the
    /// channel no longer exists in the policy in force, the letter stays queued.
    pub fn release_dead_letter(&self, id: &str) -> Result<Entry, String> {
        self.release_dead_letter_by(id, None)
    }

    /// Audit an action on a dead letter: as the operator (`actor` None), or as the peer that
    /// asked, with the name it gave. Blocking.
    fn dlq_audit(
        &self,
        actor: Option<&(Who, String)>,
        op: &str,
        target: String,
        outcome: String,
        detail: String,
    ) -> Result<(), String> {
        match actor {
            None => self.operator_audit(op, target, AuditDecision::Allow, outcome, detail),
            Some((who, by)) => {
                let by = format!("by {by} (as the child claims)");
                let detail = if detail.is_empty() {
                    by
                } else {
                    format!("{detail}; {by}")
                };
                self.audit_as(
                    who.clone(),
                    op,
                    target,
                    AuditDecision::Allow,
                    outcome,
                    detail,
                )
            }
        }
    }

    /// [`Ops::release_dead_letter`], audited as `actor` (a peer and the name it gave) when
    /// given. Blocking.
    pub(crate) fn release_dead_letter_by(
        &self,
        id: &str,
        actor: Option<&(Who, String)>,
    ) -> Result<Entry, String> {
        let entry = self.dlq.get(id).map_err(|e| e.to_string())?;
        let policy = self.policy();
        let spec = policy
            .channels()
            .find(|c| c.name == entry.channel)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "channel `{}` is not in the policy in force; the letter stays queued",
                    shown(&entry.channel)
                )
            })?;
        let (delivered, _) = spec.redact_patterns(&entry.body);
        let path = match spec.kind.clone() {
            ChannelKind::File { path } => path,
            ChannelKind::Adapter => {
                self.dlq_audit(
                    actor,
                    "dlq_release",
                    format!("{} -> {}", shown(&entry.channel), shown(&entry.recipient)),
                    format!("released {id} to the outbox"),
                    entry.reason.clone(),
                )?;
                let released = Entry {
                    body: delivered,
                    ..entry.clone()
                };
                self.release_to_outbox(&spec.name, &released)?;
                crate::dlq::DeadLetters::drop(&self.dlq, id).map_err(|e| e.to_string())?;
                return Ok(entry);
            }
        };
        let line = Line {
            ts: now_rfc3339(),
            from: entry.who.clone(),
            channel: &spec.name,
            recipient: &entry.recipient,
            body: &delivered,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| format!("encode: {e}"))?;
        bytes.push(b'\n');
        self.dlq_audit(
            actor,
            "dlq_release",
            format!("{} -> {}", shown(&entry.channel), shown(&entry.recipient)),
            format!("released {id}"),
            entry.reason.clone(),
        )?;
        {
            let guard = self.channel_lock(&path);
            let _g = lock(&guard);
            append_line(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        crate::dlq::DeadLetters::drop(&self.dlq, id).map_err(|e| e.to_string())?;
        Ok(entry)
    }

    /// The operator drops dead letter `id` (audited).
    pub fn drop_dead_letter(&self, id: &str) -> Result<(), String> {
        self.drop_dead_letter_by(id, None)
    }

    /// [`Ops::drop_dead_letter`], audited as `actor` when given. Blocking.
    pub(crate) fn drop_dead_letter_by(
        &self,
        id: &str,
        actor: Option<&(Who, String)>,
    ) -> Result<(), String> {
        let target = match self.dlq.get(id) {
            Ok(e) => format!("{} -> {}", shown(&e.channel), shown(&e.recipient)),
            Err(_) => shown(id),
        };
        self.dlq_audit(
            actor,
            "dlq_drop",
            target,
            format!("dropped {id}"),
            String::new(),
        )?;
        crate::dlq::DeadLetters::drop(&self.dlq, id).map_err(|e| e.to_string())
    }
}
