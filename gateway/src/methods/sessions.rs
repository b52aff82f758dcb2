//! `sessions.list`, `sessions.history`, `sessions.reset`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{blocking, NoParams};
use crate::app::App;
use crate::rpc::{params, RpcError};

pub async fn list(app: &Arc<App>, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let app = app.clone();
    let sessions = blocking(move || app.sessions.list().map_err(RpcError::from)).await?;
    Ok(json!({"sessions": sessions}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    session: String,
    #[serde(default)]
    limit: Option<usize>,
}

pub async fn history(app: &Arc<App>, p: Value) -> Result<Value, RpcError> {
    let p: HistoryParams = params(p)?;
    let app = app.clone();
    let name = p.session.clone();
    let lines = blocking(move || {
        if !app.sessions.exists(&name)? {
            return Err(RpcError::new(
                crate::rpc::Kind::NotFound,
                format!("no session {name:?}"),
            ));
        }
        app.sessions.read(&name).map_err(RpcError::from)
    })
    .await?;
    let mut messages = lines.lines;
    if let Some(n) = p.limit {
        let skip = messages.len().saturating_sub(n);
        messages.drain(..skip);
    }
    Ok(json!({"session": p.session, "messages": messages, "unreadable_lines": lines.unreadable}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionParams {
    session: String,
}

pub async fn reset(app: &Arc<App>, p: Value) -> Result<Value, RpcError> {
    let p: SessionParams = params(p)?;
    let app2 = app.clone();
    let name = p.session.clone();
    let _guard = app.sessions.lock(&name).await;
    let removed = blocking(move || app2.sessions.reset(&name).map_err(RpcError::from)).await?;
    Ok(json!({"session": p.session, "removed": removed}))
}
