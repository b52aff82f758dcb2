//! `approvals.list`, `approvals.resolve` (operator scope): the broker's pending `ask`
//! decisions, answered through the broker's `approve` (which the policy must grant the
//! gateway's profile: `approve = true`).

use carapace_broker::approvals::Resolution;
use serde_json::{json, Value};

use super::NoParams;
use crate::app::{approval_json, App};
use crate::auth::Caller;
use crate::rpc::{params, RpcError};

pub async fn list(app: &App, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let pending = app.broker.approvals().await?;
    Ok(json!({"pending": pending.iter().map(approval_json).collect::<Vec<_>>()}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveParams {
    id: u64,
    resolution: Resolution,
}

pub async fn resolve(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: ResolveParams = params(p)?;
    let by = format!("gateway token {} ({})", caller.token_id, caller.name);
    let decision = app
        .broker
        .approve(p.id, p.resolution.as_str().to_string(), by)
        .await?;
    Ok(json!({"id": p.id, "decision": decision}))
}
