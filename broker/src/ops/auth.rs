//! What a gateway asks the broker for on behalf of its clients:
//!
//! - `auth` (profiles with `auth = true`): is this the SHA-256 of a client token in the store?
//!   The gateway cannot read `<state_dir>/tokens.json`; the broker compares the hash with every
//!   stored one in constant time ([`TokenStore::verify`]) and answers with the token's id, name
//!   and scope. Unknown, revoked and malformed hashes get the same refusal,
//!   [`UNKNOWN_TOKEN`]. Every decision is audited (target `token:<id>`, or `unknown token`);
//!   the hash never is.
//! - `approvals` and `approve` (profiles with `approve = true`): the pending approvals, and an
//!   answer to one, through the [`super::Approver`]. A listing is a read and is not audited
//!   (a refusal is); an answer is audited before it is given, with the `by` the child claims.
//!   A child with `approve` can approve its own `ask` requests: the policy gives it only to a
//!   gateway whose operator-scoped clients answer through it.

use std::time::Instant;

use crate::approvals::Resolution;
use crate::approvals::{ApprovalError, Pending};
use crate::audit::AuditDecision;
use crate::protocol::{ErrorCode, OkReply, PendingApproval, MAX_APPROVE_BY, MAX_FRAME};
use crate::server::{Identity, Response};
use crate::tokens::{is_sha256_hex, TokenStore};

use super::{shown, Audited, Ops};

/// The refusal of an unknown, revoked or malformed token hash (one answer for all).
pub const UNKNOWN_TOKEN: &str = "unknown or revoked token";
/// Audit target of an `auth` whose token is not known.
const UNKNOWN_TARGET: &str = "unknown token";
/// Bytes of pending approvals put in one `approvals` reply (the rest is counted as omitted).
const APPROVALS_BUDGET: usize = MAX_FRAME - 1024;

/// What an `approvals` reply says about one pending approval.
fn entry(p: &Pending, now: Instant, why: Option<String>) -> PendingApproval {
    PendingApproval {
        id: p.id,
        who: p.identity.clone(),
        program: p.program.to_string_lossy().into_owned(),
        argv: p.argv.clone(),
        profile: p.profile.clone(),
        created: p.created.clone(),
        expires_in_ms: u64::try_from(p.expires.saturating_duration_since(now).as_millis())
            .unwrap_or(u64::MAX),
        why,
    }
}

/// The error code a failed answer gets: no longer pending is `not_found`; a grant that could
/// not be persisted is `unavailable` (nothing was allowed).
fn resolve_code(e: &ApprovalError) -> ErrorCode {
    match e {
        ApprovalError::UnknownId { .. }
        | ApprovalError::AlreadyResolved { .. }
        | ApprovalError::Expired { .. } => ErrorCode::NotFound,
        ApprovalError::Io { .. } | ApprovalError::Corrupt { .. } => ErrorCode::Unavailable,
        ApprovalError::Program { .. }
        | ApprovalError::NotTheOpenedProgram { .. }
        | ApprovalError::TooMany { .. } => ErrorCode::Internal,
    }
}

impl Ops {
    /// Audit an `auth` refusal (the token unknown) and build the reply.
    async fn auth_refused(
        &self,
        who: &Identity,
        decision: AuditDecision,
        detail: String,
        code: ErrorCode,
        message: String,
    ) -> Response {
        self.refuse(
            who,
            Audited::refused("auth", UNKNOWN_TARGET, decision, detail),
            code,
            message,
        )
        .await
    }

    /// The `auth` operation: the token whose SHA-256 is `token_sha256`.
    pub async fn auth(&self, who: &Identity, token_sha256: &str) -> Response {
        let rules = match self.rules_for(who, "auth", UNKNOWN_TARGET).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.auth {
            return self
                .auth_refused(
                    who,
                    AuditDecision::Deny,
                    "the profile may not use auth".into(),
                    ErrorCode::Denied,
                    format!("auth: profile `{}` may not check tokens", who.profile),
                )
                .await;
        }
        let Some(path) = self.cfg.token_store.clone() else {
            return self
                .auth_refused(
                    who,
                    AuditDecision::Error,
                    "no token store is configured".into(),
                    ErrorCode::Unavailable,
                    "auth: this broker has no token store".into(),
                )
                .await;
        };
        let presented = token_sha256.to_string();
        let res =
            tokio::task::spawn_blocking(move || TokenStore::new(path).verify(&presented)).await;
        match res {
            Err(e) => Response::err(ErrorCode::Internal, format!("auth: {e}")),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the token store cannot be read: auth refused");
                self.auth_refused(
                    who,
                    AuditDecision::Error,
                    format!("the token store cannot be read: {e}"),
                    ErrorCode::Unavailable,
                    "auth: the token store cannot be read".into(),
                )
                .await
            }
            Ok(Ok(None)) => {
                let detail = if is_sha256_hex(token_sha256) {
                    "no stored token has this hash"
                } else {
                    "not 64 lowercase hex digits"
                };
                self.auth_refused(
                    who,
                    AuditDecision::Deny,
                    detail.into(),
                    ErrorCode::Denied,
                    UNKNOWN_TOKEN.into(),
                )
                .await
            }
            Ok(Ok(Some(token))) => {
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("auth", format!("token:{}", token.id)).allow(
                            "verified",
                            format!("name {}, scope {}", shown(&token.name), token.scope),
                        ),
                    )
                    .await
                {
                    return resp;
                }
                Response::ok(OkReply::Auth { token })
            }
        }
    }

    /// The `approvals` operation: the approvals waiting for an operator, oldest first (as many
    /// as fit in one frame; the rest counted in `omitted`).
    pub async fn approvals(&self, who: &Identity) -> Response {
        let rules = match self.rules_for(who, "approvals", "pending approvals").await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.approve {
            return self
                .refuse(
                    who,
                    Audited::refused(
                        "approvals",
                        "pending approvals",
                        AuditDecision::Deny,
                        "the profile may not use approvals",
                    ),
                    ErrorCode::Denied,
                    format!(
                        "approvals: profile `{}` may not list approvals",
                        who.profile
                    ),
                )
                .await;
        }
        let Some(approver) = self.approver.clone() else {
            return Response::ok(OkReply::Approvals {
                pending: Vec::new(),
                omitted: 0,
            });
        };
        let list = match tokio::task::spawn_blocking(move || approver.pending()).await {
            Ok(l) => l,
            Err(e) => return Response::err(ErrorCode::Internal, format!("approvals: {e}")),
        };
        let now = Instant::now();
        let mut used = 0usize;
        let mut pending = Vec::new();
        let mut omitted = 0u64;
        for p in &list {
            let e = entry(p, now, self.desk.reason(p));
            let len = serde_json::to_vec(&e).map_or(usize::MAX, |b| b.len().saturating_add(1));
            if used.saturating_add(len) > APPROVALS_BUDGET {
                omitted += 1;
                continue;
            }
            used += len;
            pending.push(e);
        }
        Response::ok(OkReply::Approvals { pending, omitted })
    }

    /// The `approve` operation: answer pending approval `approval` with `resolution`; `by` is
    /// who at the child says it answered (audited as its claim).
    pub async fn approve(
        &self,
        who: &Identity,
        approval: u64,
        resolution: Resolution,
        by: Option<String>,
    ) -> Response {
        let target = format!("approval:{approval}");
        let by_shown = by
            .as_deref()
            .map_or_else(|| "nobody named".to_string(), shown);
        let mut detail = format!(
            "{}; by {by_shown} (as the child claims)",
            resolution.as_str()
        );
        let refused = |detail: String, decision, code, message: String| {
            let target = target.clone();
            async move {
                self.refuse(
                    who,
                    Audited::refused("approve", target, decision, detail),
                    code,
                    message,
                )
                .await
            }
        };
        let rules = match self.rules_for(who, "approve", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.approve {
            return refused(
                format!("the profile may not use approve; {detail}"),
                AuditDecision::Deny,
                ErrorCode::Denied,
                format!(
                    "approve: profile `{}` may not answer approvals",
                    who.profile
                ),
            )
            .await;
        }
        if let Some(b) = &by {
            if b.chars().count() > MAX_APPROVE_BY || b.chars().any(char::is_control) {
                return refused(
                    format!("bad `by`; {detail}"),
                    AuditDecision::Error,
                    ErrorCode::BadRequest,
                    format!(
                        "approve: `by` must be at most {MAX_APPROVE_BY} characters without \
                         control characters"
                    ),
                )
                .await;
            }
        }
        let not_found = format!("approve: no pending approval {approval}");
        let Some(approver) = self.approver.clone() else {
            return refused(
                format!("no approvals service; {detail}"),
                AuditDecision::Deny,
                ErrorCode::NotFound,
                not_found,
            )
            .await;
        };
        let lister = approver.clone();
        let found = match tokio::task::spawn_blocking(move || {
            lister.pending().into_iter().find(|p| p.id == approval)
        })
        .await
        {
            Ok(f) => f,
            Err(e) => return Response::err(ErrorCode::Internal, format!("approve: {e}")),
        };
        let Some(p) = found else {
            return refused(
                format!("no such pending approval; {detail}"),
                AuditDecision::Deny,
                ErrorCode::NotFound,
                not_found,
            )
            .await;
        };
        let own = if p.identity.id == who.id {
            " (the answering child's own request)"
        } else {
            ""
        };
        detail.push_str(&format!(
            "; asked by {}#{}({}){own}: {}",
            p.identity.role,
            p.identity.id,
            p.identity.profile,
            shown(&p.argv.join(" "))
        ));
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("approve", target.clone())
                    .allow(format!("answering {}", resolution.as_str()), detail.clone()),
            )
            .await
        {
            return resp;
        }
        let res = tokio::task::spawn_blocking(move || approver.resolve(approval, resolution)).await;
        match res {
            Ok(Ok(decision)) => {
                tracing::info!(
                    approval,
                    who = %who,
                    decision = decision.as_str(),
                    "approval answered through the broker"
                );
                Response::ok(OkReply::Approve {
                    approval,
                    decision: decision.as_str().to_string(),
                })
            }
            Ok(Err(e)) => {
                // Nothing was allowed; say so next to the record of the attempt.
                let _ = self
                    .audit(
                        who,
                        Audited::of("approve", target)
                            .error("not answered", format!("{e}; {detail}")),
                    )
                    .await;
                Response::err(resolve_code(&e), format!("approve: {e}"))
            }
            Err(e) => Response::err(ErrorCode::Internal, format!("approve: {e}")),
        }
    }
}
