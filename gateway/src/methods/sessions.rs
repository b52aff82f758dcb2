//! `sessions.list`, `sessions.history`, `sessions.reset` (archives), `sessions.archived`,
//! `sessions.restore`.
//!
//! A client token sees only the sessions it owns ([`crate::owner::Owner`]), and the archives
//! of those sessions (an archive belongs to the owner of its session's name, which a reset
//! keeps); an operator token sees every session. Another's session is answered exactly like a
//! missing one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{blocking, NoParams};
use crate::app::App;
use crate::auth::Caller;
use crate::owner::of_caller;
use crate::rpc::{params, Kind, RpcError};
use crate::sessions::Sessions;

/// Whether `caller` may see a session whose stored owner is `owner`: operators see all,
/// clients their own.
pub(crate) fn may_see(caller: &Caller, owner: Option<&str>) -> bool {
    caller.is_operator() || owner == Some(of_caller(caller).key().as_str())
}

/// The answer to a session that does not exist, or is not the caller's: the same either way.
pub(crate) fn no_session(name: &str) -> RpcError {
    RpcError::new(Kind::NotFound, format!("no session {name:?}"))
}

/// Refused (as missing) unless session `name` exists and `caller` may see it. Blocking.
pub(crate) fn visible(sessions: &Sessions, caller: &Caller, name: &str) -> Result<(), RpcError> {
    if !sessions.exists(name)? || !may_see(caller, sessions.owner(name)?.as_deref()) {
        return Err(no_session(name));
    }
    Ok(())
}

pub async fn list(app: &Arc<App>, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let app = app.clone();
    let mut sessions = blocking(move || app.sessions.list().map_err(RpcError::from)).await?;
    sessions.retain(|s| may_see(caller, s["owner"].as_str()));
    Ok(json!({"sessions": sessions}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    session: String,
    #[serde(default)]
    limit: Option<usize>,
}

pub async fn history(app: &Arc<App>, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: HistoryParams = params(p)?;
    let app = app.clone();
    let name = p.session.clone();
    let caller = caller.clone();
    let lines = blocking(move || {
        visible(&app.sessions, &caller, &name)?;
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

pub async fn reset(app: &Arc<App>, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: SessionParams = params(p)?;
    let app2 = app.clone();
    let name = p.session.clone();
    let caller = caller.clone();
    let _guard = app.sessions.lock(&name).await;
    let archive = blocking(move || {
        // Another's session is answered like a missing one: nothing removed.
        if !may_see(&caller, app2.sessions.owner(&name)?.as_deref()) {
            return Ok(None);
        }
        app2.sessions.reset(&name).map_err(RpcError::from)
    })
    .await?;
    Ok(json!({"session": p.session, "removed": archive.is_some(), "archive": archive}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchivedParams {
    #[serde(default)]
    archive: Option<String>,
}

/// The archive `id` if `caller` may see it (the owner of its session's name), else the same
/// "not found" as for a missing archive. Blocking.
fn visible_archive<'a>(
    sessions: &Sessions,
    caller: &Caller,
    id: &'a str,
) -> Result<&'a str, RpcError> {
    let Some((name, _)) = crate::sessions::parse_archive_id(id) else {
        return Err(crate::sessions::SessionError::BadArchive(id.to_string()).into());
    };
    if !may_see(caller, sessions.owner(name)?.as_deref()) {
        return Err(crate::sessions::SessionError::NoArchive(id.to_string()).into());
    }
    Ok(name)
}

/// Without `archive`: every archived session the caller may see. With it: that archive's lines.
pub async fn archived(app: &Arc<App>, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: ArchivedParams = params(p)?;
    let app = app.clone();
    let caller = caller.clone();
    match p.archive {
        None => {
            let list = blocking(move || {
                let mut list = app.sessions.archived().map_err(RpcError::from)?;
                let mut seen = Vec::with_capacity(list.len());
                for a in list.drain(..) {
                    let owner = a["session"]
                        .as_str()
                        .map(|n| app.sessions.owner(n))
                        .transpose()?
                        .flatten();
                    if may_see(&caller, owner.as_deref()) {
                        seen.push(a);
                    }
                }
                Ok(seen)
            })
            .await?;
            Ok(json!({"archived": list}))
        }
        Some(id) => {
            let id2 = id.clone();
            let (session, lines) = blocking(move || {
                let name = visible_archive(&app.sessions, &caller, &id2)?.to_string();
                let lines = app.sessions.read_archived(&id2).map_err(RpcError::from)?;
                Ok((name, lines))
            })
            .await?;
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
pub async fn restore(app: &Arc<App>, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    let p: RestoreParams = params(p)?;
    let Some((name, _)) = crate::sessions::parse_archive_id(&p.archive) else {
        return Err(crate::sessions::SessionError::BadArchive(p.archive).into());
    };
    let _guard = app.sessions.lock(name).await;
    let app2 = app.clone();
    let id = p.archive.clone();
    let caller = caller.clone();
    let session = blocking(move || {
        visible_archive(&app2.sessions, &caller, &id)?;
        app2.sessions.restore(&id).map_err(RpcError::from)
    })
    .await?;
    Ok(json!({"archive": p.archive, "session": session, "restored": true}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_broker::tokens::Scope;

    fn caller(id: &str, scope: Scope) -> Caller {
        Caller {
            token_id: id.into(),
            name: "n".into(),
            scope,
        }
    }

    #[test]
    fn clients_see_their_own_operators_all() {
        let a = caller("aaaa0001", Scope::Client);
        let op = caller("0000ffff", Scope::Operator);
        assert!(may_see(&a, Some("token:aaaa0001")));
        assert!(!may_see(&a, Some("token:bbbb0002")));
        assert!(!may_see(&a, Some("channel:tg:aaaa0001")));
        assert!(!may_see(&a, None), "sessions older than owners");
        for o in [Some("token:bbbb0002"), Some("channel:tg:1"), None] {
            assert!(may_see(&op, o));
        }
        // Missing and another's read the same.
        assert_eq!(no_session("x").kind, Kind::NotFound);
    }
}
