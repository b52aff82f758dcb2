//! `messages.send`: an outbound message through the broker's `send` (recipient allowlist,
//! filters, rate limits, an adapter channel's outbox and the dead-letter queue apply there).

use serde_json::{json, Value};

use crate::app::App;
use crate::rpc::{params, RpcError};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    pub channel: String,
    pub recipient: String,
    pub body: String,
    /// The inbound message id this answers (adapters thread by it).
    #[serde(default)]
    pub in_reply_to: Option<String>,
    /// Idempotency key: a second send with it on the channel is not sent again.
    #[serde(default)]
    pub key: Option<String>,
}

pub async fn send(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: SendParams = params(p)?;
    send_message(app, p).await
}

/// Shared with the agent's `send_message` tool.
pub async fn send_message(app: &App, p: SendParams) -> Result<Value, RpcError> {
    let r = app
        .broker
        .send_with(p.channel, p.recipient, p.body, p.in_reply_to, p.key)
        .await?;
    Ok(json!({"status": r.status, "dlq_id": r.dlq_id, "outbox_id": r.outbox_id}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_threading_and_key() {
        let p: SendParams = params(json!({"channel":"c","recipient":"r","body":"b"}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.in_reply_to, p.key), (None, None));
        let p: SendParams = params(
            json!({"channel":"c","recipient":"r","body":"b","in_reply_to":"update:1","key":"k"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (p.in_reply_to.as_deref(), p.key.as_deref()),
            (Some("update:1"), Some("k"))
        );
        assert!(
            params::<SendParams>(json!({"channel":"c","recipient":"r","body":"b","x":1})).is_err()
        );
    }
}
