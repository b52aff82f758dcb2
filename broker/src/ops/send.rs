//! `send`: an outbound message on a channel. Order of checks: the profile names the channel;
//! the per-(identity, channel) token bucket (over it: `rate_limited`, nothing kept); then the
//! size cap, the recipient allowlist and the block patterns — a message failing one of these
//! goes to the dead-letter queue with the reason. Known secret values are redacted from the
//! body before it is stored anywhere (queue or channel); the channel's `redact` patterns are
//! applied to what is delivered. Kind `file`: one JSON line appended and fsync'd.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use carapace_policy::broker::{ChannelKind, ChannelSpec};
use serde::Serialize;

use crate::audit::{AuditDecision, Who};
use crate::dlq::Entry;
use crate::protocol::{ErrorCode, OkReply, SendStatus};
use crate::ratelimit::{Limiter, RetryAfter};
use crate::server::{Identity, Response};

use super::{lock, now_rfc3339, rule_ref, shown, Audited, Ops};

/// Why a message is dead-lettered instead of delivered, or None.
pub fn dead_letter_reason(spec: &ChannelSpec, recipient: &str, body: &str) -> Option<String> {
    if body.len() as u64 > spec.max_bytes {
        return Some(format!(
            "over the size cap ({} bytes > max_bytes {})",
            body.len(),
            spec.max_bytes
        ));
    }
    if spec.recipient_allowed(recipient).is_none() {
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

fn who_of(who: &Identity) -> Who {
    Who {
        id: who.id,
        role: who.role.as_str().to_string(),
        profile: who.profile.clone(),
    }
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

    /// The `send` operation.
    pub async fn send(
        &self,
        who: &Identity,
        channel: &str,
        recipient: &str,
        body: String,
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
                    Audited {
                        op: "send",
                        target: target.clone(),
                        rule: None,
                        decision: AuditDecision::Deny,
                        outcome: "refused".into(),
                        detail: "the profile does not name this channel".into(),
                    },
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
        if let Err(retry) = self.take_channel_token(&spec, who.id) {
            return self
                .refuse(
                    who,
                    Audited {
                        op: "send",
                        target: target.clone(),
                        rule: rref,
                        decision: AuditDecision::Deny,
                        outcome: "rate limited".into(),
                        detail: retry.to_string(),
                    },
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
        if let Some(reason) = dead_letter_reason(&spec, recipient, &body) {
            let entry = Entry {
                channel: spec.name.clone(),
                recipient: recipient.to_string(),
                body: clean,
                reason: reason.clone(),
                who: who_of(who),
                ts: now_rfc3339(),
            };
            let dlq = self.dlq.clone();
            let put = tokio::task::spawn_blocking(move || dlq.put(&entry)).await;
            let id = match put {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => {
                    return self
                        .refuse(
                            who,
                            Audited {
                                op: "send",
                                target: target.clone(),
                                rule: rref,
                                decision: AuditDecision::Deny,
                                outcome: "refused; dead-letter queue unavailable".into(),
                                detail: format!("{reason}; {e}"),
                            },
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
                    Audited {
                        op: "send",
                        target,
                        rule: rref,
                        decision: AuditDecision::Deny,
                        outcome: format!("dead-lettered {id}"),
                        detail: reason,
                    },
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
        let path = match spec.kind.clone() {
            ChannelKind::File { path } => path,
            ChannelKind::Adapter => return Response::err(ErrorCode::Internal, "not yet"),
        };
        if let Err(resp) = self
            .allow(
                who,
                Audited {
                    op: "send",
                    target: target.clone(),
                    rule: rref,
                    decision: AuditDecision::Allow,
                    outcome: "delivering".into(),
                    detail: format!(
                        "{} bytes; {} pattern redaction(s){}",
                        delivered.len(),
                        pattern_hits,
                        if secret_hits {
                            "; secret value(s) redacted"
                        } else {
                            ""
                        }
                    ),
                },
            )
            .await
        {
            return resp;
        }
        let line = Line {
            ts: now_rfc3339(),
            from: who_of(who),
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
        let res = tokio::task::spawn_blocking(move || {
            let _g = lock(&guard);
            append_line(&p, &bytes)
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
            ChannelKind::Adapter => return Err("not yet".into()),
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
        self.operator_audit(
            "dlq_release",
            format!("{} -> {}", shown(&entry.channel), shown(&entry.recipient)),
            AuditDecision::Allow,
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
        let target = match self.dlq.get(id) {
            Ok(e) => format!("{} -> {}", shown(&e.channel), shown(&e.recipient)),
            Err(_) => shown(id),
        };
        self.operator_audit(
            "dlq_drop",
            target,
            AuditDecision::Allow,
            format!("dropped {id}"),
            String::new(),
        )?;
        crate::dlq::DeadLetters::drop(&self.dlq, id).map_err(|e| e.to_string())
    }
}
