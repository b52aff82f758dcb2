//! What an operator sees and does through an operator-scoped gateway client, beyond approvals
//! and held messages: the dead letters (`dead_letters`, `dlq_release`, `dlq_drop`), the audit
//! log (`audit_query`, read-only), the channels' figures (`channels`) and the service's
//! children (`children`). Every one needs
//! `approve = true` in the caller's profile (the same grant as `approvals`/`approve` and the
//! held messages). Releases and drops are audited before they are done, as the caller with the
//! name it gave (`by`); listing and reading are not.

use crate::audit::query::{self, Filter};
use crate::audit::{AuditDecision, Who};
use crate::protocol::{
    encode_reply, DeadLetterInfo, ErrorCode, OkReply, Reply, MAX_APPROVE_BY, MAX_AUDIT_QUERY,
    MAX_FRAME,
};
use crate::server::{Identity, Response};
use crate::sync::lock;

use super::{shown, Audited, Ops};

/// How many of `items` fit in one reply frame after `base` bytes of envelope.
fn fitting<T: serde::Serialize>(items: &[T], base: usize) -> usize {
    let mut used = base;
    for (i, it) in items.iter().enumerate() {
        let len = serde_json::to_vec(it).map_or(MAX_FRAME, |b| b.len() + 1);
        if used.saturating_add(len) > MAX_FRAME {
            return i;
        }
        used += len;
    }
    items.len()
}

/// Bytes of `reply` with nothing in its lists.
fn envelope(reply: OkReply) -> usize {
    encode_reply(u64::MAX, &Reply::Ok(reply)).map_or(MAX_FRAME, |b| b.len())
}

impl Ops {
    /// The check of every operation done for the operator (these, the held messages'): the
    /// profile has `approve = true` and `by` is acceptable. Err: the refusal to send.
    pub(super) async fn operator_allowed(
        &self,
        who: &Identity,
        op: &'static str,
        target: &str,
        by: Option<&str>,
    ) -> Result<(), Response> {
        let rules = self.rules_for(who, op, target).await?;
        if !rules.approve {
            return Err(self
                .refuse(
                    who,
                    Audited::refused(
                        op,
                        target,
                        AuditDecision::Deny,
                        "the profile may not act for the operator",
                    ),
                    ErrorCode::Denied,
                    format!(
                        "{op}: profile `{}` may not act for the operator (approve = true)",
                        who.profile
                    ),
                )
                .await);
        }
        if let Some(b) = by {
            if b.chars().count() > MAX_APPROVE_BY || b.chars().any(char::is_control) {
                return Err(self
                    .refuse(
                        who,
                        Audited::refused(op, target, AuditDecision::Error, "bad `by`"),
                        ErrorCode::BadRequest,
                        format!(
                            "{op}: `by` must be at most {MAX_APPROVE_BY} characters without \
                             control characters"
                        ),
                    )
                    .await);
            }
        }
        Ok(())
    }

    /// The `dead_letters` operation: oldest first, as many as fit in one frame.
    pub async fn dead_letters_op(&self, who: &Identity) -> Response {
        if let Err(r) = self
            .operator_allowed(who, "dead_letters", "dead letters", None)
            .await
        {
            return r;
        }
        let dlq = self.dlq.clone();
        let listing = match tokio::task::spawn_blocking(move || dlq.list()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                return Response::err(ErrorCode::Unavailable, format!("dead_letters: {e}"))
            }
            Err(e) => return Response::err(ErrorCode::Internal, format!("dead_letters task: {e}")),
        };
        for u in &listing.unreadable {
            tracing::warn!(file = %u.file.display(), error = %u.error, "dead letters: unreadable entry");
        }
        let all: Vec<DeadLetterInfo> = listing
            .letters
            .into_iter()
            .map(|d| DeadLetterInfo {
                id: d.id,
                channel: d.entry.channel,
                recipient: d.entry.recipient,
                body: d.entry.body,
                reason: d.entry.reason,
                who: d.entry.who,
                ts: d.entry.ts,
            })
            .collect();
        let base = envelope(OkReply::DeadLetters {
            letters: Vec::new(),
            omitted: u64::MAX,
            unreadable: u64::MAX,
        });
        let n = fitting(&all, base);
        let omitted = (all.len() - n) as u64;
        let mut letters = all;
        letters.truncate(n);
        Response::ok(OkReply::DeadLetters {
            letters,
            omitted,
            unreadable: listing.unreadable.len() as u64,
        })
    }

    /// `dlq_release` and `dlq_drop`.
    async fn dlq_act(
        &self,
        who: &Identity,
        op: &'static str,
        id: &str,
        by: Option<String>,
    ) -> Response {
        let target = match self.dlq.get(id) {
            Ok(e) => format!("{} -> {}", shown(&e.channel), shown(&e.recipient)),
            Err(_) => shown(id),
        };
        if let Err(r) = self.operator_allowed(who, op, &target, by.as_deref()).await {
            return r;
        }
        if self.dlq.get(id).is_err() {
            return self
                .refuse(
                    who,
                    Audited::refused(op, target, AuditDecision::Deny, "no such dead letter"),
                    ErrorCode::NotFound,
                    format!("{op}: no dead letter {}", shown(id)),
                )
                .await;
        }
        let actor = (
            Who::from(who),
            by.as_deref()
                .map_or_else(|| "nobody named".to_string(), shown),
        );
        // Run here rather than on the blocking pool (the release touches the outbox, the
        // channel's file and the audit log through `Ops`, which is not shared by value): one
        // small, fsync'd write or two for a rare operator action.
        let res = if op == "dlq_release" {
            self.release_dead_letter_by(id, Some(&actor)).map(|_| ())
        } else {
            self.drop_dead_letter_by(id, Some(&actor))
        };
        match res {
            Ok(()) if op == "dlq_release" => Response::ok(OkReply::DlqRelease {}),
            Ok(()) => Response::ok(OkReply::DlqDrop {}),
            Err(e) => Response::err(ErrorCode::Unavailable, format!("{op}: {e}")),
        }
    }

    /// The `dlq_release` operation: the letter is delivered as it stands.
    pub async fn dlq_release_op(&self, who: &Identity, id: &str, by: Option<String>) -> Response {
        self.dlq_act(who, "dlq_release", id, by).await
    }

    /// The `dlq_drop` operation.
    pub async fn dlq_drop_op(&self, who: &Identity, id: &str, by: Option<String>) -> Response {
        self.dlq_act(who, "dlq_drop", id, by).await
    }

    /// The `audit_query` operation: matching records, newest first, at most `limit` and what
    /// fits in one frame.
    pub async fn audit_query_op(&self, who: &Identity, filter: Filter, limit: u32) -> Response {
        if let Err(r) = self
            .operator_allowed(who, "audit_query", "audit log", None)
            .await
        {
            return r;
        }
        if limit == 0 || limit > MAX_AUDIT_QUERY {
            return Response::err(
                ErrorCode::BadRequest,
                format!("audit_query: limit must be 1..={MAX_AUDIT_QUERY}"),
            );
        }
        let path = lock(&self.audit).path().to_path_buf();
        let res =
            tokio::task::spawn_blocking(move || query::query(&path, &filter, limit as usize)).await;
        let found = match res {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                return Response::err(ErrorCode::Unavailable, format!("audit_query: {e}"))
            }
            Err(e) => return Response::err(ErrorCode::Internal, format!("audit_query task: {e}")),
        };
        let base = envelope(OkReply::AuditQuery {
            records: Vec::new(),
            more: true,
        });
        let n = fitting(&found.records, base);
        let more = found.more || n < found.records.len();
        let mut records = found.records;
        records.truncate(n);
        Response::ok(OkReply::AuditQuery { records, more })
    }

    /// The `channels` operation: every channel of the policy in force with its figures.
    pub async fn channels_op(&self, who: &Identity) -> Response {
        if let Err(r) = self
            .operator_allowed(who, "channels", "channels", None)
            .await
        {
            return r;
        }
        // Reads the dead-letter directory; small, and rare.
        let channels = self.channel_stats();
        Response::ok(OkReply::Channels { channels })
    }

    /// The `children` operation: the service's children and their state.
    pub async fn children_op(&self, who: &Identity) -> Response {
        if let Err(r) = self
            .operator_allowed(who, "children", "children", None)
            .await
        {
            return r;
        }
        Response::ok(OkReply::Children {
            children: self.children(),
        })
    }
}
