//! `messages.send`: an outbound message through the broker's `send` (recipient allowlist,
//! filters, rate limits and the dead-letter queue apply there).

use serde_json::{json, Value};

use crate::app::App;
use crate::rpc::{params, RpcError};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    pub channel: String,
    pub recipient: String,
    pub body: String,
}

pub async fn send(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: SendParams = params(p)?;
    send_message(app, p).await
}

/// Shared with the agent's `send_message` tool.
pub async fn send_message(app: &App, p: SendParams) -> Result<Value, RpcError> {
    let (status, dlq_id) = app.broker.send(p.channel, p.recipient, p.body).await?;
    Ok(json!({"status": status, "dlq_id": dlq_id}))
}
