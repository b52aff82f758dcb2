//! `held.list`, `held.admit`, `held.drop` (operator scope): the inbound messages the broker
//! holds because their sender is not admitted on the channel (policy `senders`), through the
//! broker's `held` / `admit` / `drop_held` ops (which the policy must grant the gateway's
//! profile: `approve = true`). An admitted message goes to the agent like any other.

use serde_json::{json, Value};

use super::NoParams;
use crate::app::App;
use crate::auth::Caller;
use crate::rpc::{params, RpcError};

/// A held message as clients see it (the body is untrusted text, redacted of known secrets).
pub fn held_json(h: &carapace_broker::protocol::HeldMessage) -> Value {
    json!({
        "id": h.id,
        "channel": h.channel,
        "sender": h.sender,
        "conversation": h.conversation,
        "body": h.body,
        "ts": h.ts,
    })
}

pub async fn list(app: &App, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let (held, omitted) = app.broker.held().await?;
    Ok(json!({"held": held.iter().map(held_json).collect::<Vec<_>>(), "omitted": omitted}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmitParams {
    id: String,
    #[serde(default)]
    always: bool,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DropParams {
    id: String,
}

fn by(caller: &Caller) -> String {
    format!("gateway token {} ({})", caller.token_id, caller.name)
}

pub async fn admit(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: AdmitParams = params(p)?;
    let seq = app.broker.admit(p.id.clone(), p.always, by(caller)).await?;
    Ok(json!({"id": p.id, "seq": seq, "always": p.always}))
}

pub async fn drop(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: DropParams = params(p)?;
    app.broker.drop_held(p.id.clone(), by(caller)).await?;
    Ok(json!({"id": p.id, "dropped": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_strict() {
        assert!(params::<AdmitParams>(json!({"id": "h1"})).is_ok_and(|p| !p.always));
        assert!(params::<AdmitParams>(json!({"id": "h1", "always": true})).is_ok_and(|p| p.always));
        for bad in [
            json!({}),
            json!({"id": 5}),
            json!({"id": "h", "always": "yes"}),
            json!({"id": "h", "forever": true}),
        ] {
            assert!(params::<AdmitParams>(bad.clone()).is_err(), "{bad}");
        }
        assert!(params::<DropParams>(json!({"id": "h1"})).is_ok());
        assert!(params::<DropParams>(json!({"id": "h1", "always": true})).is_err());
    }
}
