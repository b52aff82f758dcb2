//! `sessions.list`, `sessions.history`, `sessions.reset` (archives), `sessions.archived`,
//! `sessions.restore`.

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
    let archive = blocking(move || app2.sessions.reset(&name).map_err(RpcError::from)).await?;
    Ok(json!({"session": p.session, "removed": archive.is_some(), "archive": archive}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchivedParams {
    #[serde(default)]
    archive: Option<String>,
}

/// Without `archive`: every archived session. With it: that archive's lines.
pub async fn archived(app: &Arc<App>, p: Value) -> Result<Value, RpcError> {
    let p: ArchivedParams = params(p)?;
    let app = app.clone();
    match p.archive {
        None => {
            let list = blocking(move || app.sessions.archived().map_err(RpcError::from)).await?;
            Ok(json!({"archived": list}))
        }
        Some(id) => {
            let id2 = id.clone();
            let lines =
                blocking(move || app.sessions.read_archived(&id2).map_err(RpcError::from)).await?;
            let session = crate::sessions::parse_archive_id(&id).map(|(n, _)| n.to_string());
            Ok(
                json!({"archive": id, "session": session, "messages": lines.lines, "unreadable_lines": lines.unreadable}),
            )
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    archive: String,
}

/// Bring an archived session back (refused while a session of its name exists).
pub async fn restore(app: &Arc<App>, p: Value) -> Result<Value, RpcError> {
    let p: RestoreParams = params(p)?;
    let Some((name, _)) = crate::sessions::parse_archive_id(&p.archive) else {
        return Err(crate::sessions::SessionError::BadArchive(p.archive).into());
    };
    let _guard = app.sessions.lock(name).await;
    let app2 = app.clone();
    let id = p.archive.clone();
    let session = blocking(move || app2.sessions.restore(&id).map_err(RpcError::from)).await?;
    Ok(json!({"archive": p.archive, "session": session, "restored": true}))
}
