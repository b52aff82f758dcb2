//! The methods of the gateway protocol, one file per family. [`dispatch`] checks the caller's
//! rate and scope, then runs the method; every method that acts goes through the broker.

use std::sync::Arc;

use serde_json::Value;

use crate::app::{App, Emitter};
use crate::auth::Caller;
use crate::rpc::{Call, Kind, RpcError};

pub(crate) mod agent;
mod approvals;
pub(crate) mod files;
mod gateway;
mod held;
mod messages;
mod operator;
pub(crate) mod sessions;
mod tools;

pub use tools::{exec, ExecOutcome};

/// Every method, with whether it needs the operator scope.
pub const METHODS: &[(&str, bool)] = &[
    ("gateway.ping", false),
    ("gateway.status", false),
    ("tools.exec", false),
    ("files.list", false),
    ("files.read", false),
    ("files.write", false),
    ("files.search", false),
    ("messages.send", false),
    ("approvals.list", true),
    ("approvals.resolve", true),
    ("held.list", true),
    ("held.admit", true),
    ("held.drop", true),
    ("dlq.list", true),
    ("dlq.release", true),
    ("dlq.drop", true),
    ("audit.query", true),
    ("channels.list", true),
    ("children.list", true),
    ("sessions.list", false),
    ("sessions.history", false),
    ("sessions.reset", false),
    ("sessions.archived", false),
    ("sessions.restore", false),
    ("agent.run", false),
];

/// Run one call for `caller`. `collect`: a plain HTTP caller (no events): `tools.exec`
/// returns the output in its result. The broker requests it makes wait for their turn under
/// the caller's token ([`crate::schedule`]).
pub async fn dispatch(
    app: &Arc<App>,
    caller: &Caller,
    call: Call,
    out: &Emitter,
) -> Result<Value, RpcError> {
    let owner = crate::owner::of_caller(caller);
    crate::schedule::KEY
        .scope(
            caller.token_id.clone(),
            crate::owner::scope(owner, run(app, caller, call, out)),
        )
        .await
}

async fn run(
    app: &Arc<App>,
    caller: &Caller,
    call: Call,
    out: &Emitter,
) -> Result<Value, RpcError> {
    let Some((_, operator_only)) = METHODS.iter().find(|(m, _)| *m == call.method) else {
        return Err(RpcError::new(
            Kind::MethodNotFound,
            format!("no method {:?}", crate::rpc::shown(&call.method)),
        ));
    };
    if *operator_only {
        caller.require_operator(&call.method)?;
    }
    app.take_rate(caller)?;
    let p = call.params;
    match call.method.as_str() {
        "gateway.ping" => gateway::ping(p),
        "gateway.status" => gateway::status(app, caller, p),
        "tools.exec" => tools::call(app, p, out).await,
        "files.list" => files::list(app, p).await,
        "files.read" => files::read(app, p).await,
        "files.write" => files::write(app, p).await,
        "files.search" => files::search(app, p).await,
        "messages.send" => messages::send(app, p).await,
        "approvals.list" => approvals::list(app, p).await,
        "approvals.resolve" => approvals::resolve(app, caller, p).await,
        "held.list" => held::list(app, p).await,
        "held.admit" => held::admit(app, caller, p).await,
        "held.drop" => held::drop(app, caller, p).await,
        "dlq.list" => operator::dlq_list(app, p).await,
        "dlq.release" => operator::dlq_release(app, caller, p).await,
        "dlq.drop" => operator::dlq_drop(app, caller, p).await,
        "audit.query" => operator::audit_query(app, p).await,
        "channels.list" => operator::channels_list(app, p).await,
        "children.list" => operator::children_list(app, p).await,
        "sessions.list" => sessions::list(app, caller, p).await,
        "sessions.history" => sessions::history(app, caller, p).await,
        "sessions.reset" => sessions::reset(app, caller, p).await,
        "sessions.archived" => sessions::archived(app, caller, p).await,
        "sessions.restore" => sessions::restore(app, caller, p).await,
        "agent.run" => agent::run(app, caller, p, out).await,
        other => Err(RpcError::internal(format!("method {other} has no handler"))),
    }
}

/// Run blocking file work (sessions) off the async threads.
pub(crate) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, RpcError> + Send + 'static,
) -> Result<R, RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::internal(format!("task failed: {e}")))?
}

/// Params of methods that take none: `{}` only.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}
