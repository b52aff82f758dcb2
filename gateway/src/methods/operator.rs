//! Operator-scope methods for the console and other operator clients: `dlq.list`,
//! `dlq.release`, `dlq.drop` (the broker's dead letters), `audit.query` (the audit log,
//! read-only, with filters), `channels.list` (each channel's figures) and `children.list` (the
//! service's children), through the broker's `dead_letters`, `dlq_release`, `dlq_drop`,
//! `audit_query`, `channels` and `children` ops (which the policy must grant the gateway's
//! profile: `approve = true`).

use carapace_broker::audit::query::Filter;
use carapace_broker::audit::AuditDecision;
use carapace_broker::protocol::MAX_AUDIT_QUERY;
use serde_json::{json, Value};

use super::NoParams;
use crate::app::App;
use crate::auth::Caller;
use crate::rpc::{params, RpcError};

fn by(caller: &Caller) -> String {
    format!("gateway token {} ({})", caller.token_id, caller.name)
}

pub async fn dlq_list(app: &App, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let l = app.broker.dead_letters().await?;
    Ok(json!({
        "dead_letters": l.letters,
        "omitted": l.omitted,
        "unreadable": l.unreadable,
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LetterParams {
    id: String,
}

pub async fn dlq_release(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: LetterParams = params(p)?;
    app.broker.dlq_release(p.id.clone(), by(caller)).await?;
    Ok(json!({"id": p.id, "released": true}))
}

pub async fn dlq_drop(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: LetterParams = params(p)?;
    app.broker.dlq_drop(p.id.clone(), by(caller)).await?;
    Ok(json!({"id": p.id, "dropped": true}))
}

/// Records `audit.query` returns when no `limit` is given.
const DEFAULT_AUDIT_LIMIT: u32 = 100;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    decision: Option<AuditDecision>,
    /// RFC 3339 UTC, e.g. `2026-12-07T10:00:00Z`.
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    before_seq: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
}

/// The broker's query from the method's params, checked.
fn audit_filter(p: AuditParams) -> Result<(Filter, u32), RpcError> {
    let limit = p.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
    if limit == 0 || limit > MAX_AUDIT_QUERY {
        return Err(RpcError::invalid_params(format!(
            "limit is 1..={MAX_AUDIT_QUERY}"
        )));
    }
    if let Some(op) = &p.op {
        if op.is_empty()
            || op.len() > 64
            || !op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(RpcError::invalid_params(
                "op is an operation name: lowercase letters and _ (e.g. exec, connect)",
            ));
        }
    }
    if let Some(t) = &p.since {
        if !looks_like_rfc3339(t) {
            return Err(RpcError::invalid_params(
                "since is an RFC 3339 UTC time, e.g. 2026-12-07T10:00:00Z",
            ));
        }
    }
    Ok((
        Filter {
            op: p.op,
            decision: p.decision,
            since: p.since,
            before_seq: p.before_seq,
        },
        limit,
    ))
}

/// `YYYY-MM-DDTHH:MM:SS` followed by an optional fraction and `Z` (how the audit log writes
/// times, so that comparing the text compares the times).
fn looks_like_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[b.len() - 1] == b'Z'
        && match &b[19..b.len() - 1] {
            [] => true,
            [b'.', frac @ ..] => !frac.is_empty() && frac.iter().all(u8::is_ascii_digit),
            _ => false,
        }
}

pub async fn audit_query(app: &App, p: Value) -> Result<Value, RpcError> {
    let (filter, limit) = audit_filter(params(p)?)?;
    let (records, more) = app.broker.audit_query(filter, limit).await?;
    Ok(json!({"records": records, "more": more}))
}

pub async fn channels_list(app: &App, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let channels = app.broker.channels().await?;
    Ok(json!({"channels": channels}))
}

pub async fn children_list(app: &App, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let children = app.broker.children().await?;
    Ok(json!({"children": children}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(v: Value) -> Result<(Filter, u32), RpcError> {
        audit_filter(params(v)?)
    }

    #[test]
    fn audit_params_are_checked() {
        let (f, limit) = filter(json!({})).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((f, limit), (Filter::default(), DEFAULT_AUDIT_LIMIT));
        let (f, limit) = filter(json!({
            "op": "exec", "decision": "deny", "since": "2026-12-07T10:00:00Z",
            "before_seq": 40, "limit": 5
        }))
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(limit, 5);
        assert_eq!(f.op.as_deref(), Some("exec"));
        assert_eq!(f.decision, Some(AuditDecision::Deny));
        assert_eq!(f.before_seq, Some(40));
        assert!(filter(json!({"since": "2026-12-07T10:00:00.123456Z"})).is_ok());
        for bad in [
            json!({"limit": 0}),
            json!({"limit": MAX_AUDIT_QUERY + 1}),
            json!({"op": ""}),
            json!({"op": "Exec"}),
            json!({"op": "exec\n"}),
            json!({"decision": "maybe"}),
            json!({"since": "yesterday"}),
            json!({"since": "2026-12-07 10:00:00Z"}),
            json!({"since": "2026-12-07T10:00:00+01:00"}),
            json!({"since": "2026-12-07T10:00:00.Z"}),
            json!({"seq": 1}),
        ] {
            assert!(filter(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn letter_params_are_strict() {
        assert!(params::<LetterParams>(json!({"id": "d-1"})).is_ok());
        assert!(params::<LetterParams>(json!({})).is_err());
        assert!(params::<LetterParams>(json!({"id": 1})).is_err());
        assert!(params::<LetterParams>(json!({"id": "d", "always": true})).is_err());
    }
}
