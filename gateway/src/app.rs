//! The gateway's shared state and the way calls send events back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_broker::ratelimit::Limiter;
use carapace_broker::sync::lock;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::auth::{AuthCache, Caller, FailureLimit};
use crate::broker::Broker;
use crate::rpc::{Kind, RpcError};
use crate::sessions::Sessions;
use crate::settings::Settings;

/// Everything a request handler reaches.
#[derive(Debug)]
pub struct App {
    pub settings: Settings,
    pub broker: Broker,
    pub sessions: Sessions,
    /// Calls per token (token bucket per token id).
    rates: Mutex<Limiter<String>>,
    pub auth_failures: FailureLimit,
    /// Recent successful token checks (at most a second old).
    pub auth_cache: AuthCache,
    /// `approval.requested` / `approval.resolved` events for operator connections.
    pub approvals: broadcast::Sender<Value>,
    /// `messages.inbound` events for every connection.
    pub inbound: broadcast::Sender<Value>,
    pub started: Instant,
}

impl App {
    /// Whether the gateway's own agent answers channel messages (a model is configured with
    /// `answer_channels`): then each message belongs to its conversation's session.
    pub fn agent_answers_channels(&self) -> bool {
        self.settings
            .agent
            .as_ref()
            .is_some_and(|a| a.answer_channels)
    }

    pub fn new(settings: Settings, broker: Broker) -> App {
        let c = &settings.clients;
        let rates = Limiter::new(c.rate_per_second, c.burst, 4096);
        let sessions = Sessions::new(&PathBuf::from(&settings.state_dir));
        App {
            rates: Mutex::new(rates),
            sessions,
            broker,
            auth_failures: FailureLimit::default(),
            auth_cache: AuthCache::default(),
            approvals: broadcast::channel(256).0,
            inbound: broadcast::channel(1024).0,
            started: Instant::now(),
            settings,
        }
    }

    /// Take one call from the caller's bucket.
    pub fn take_rate(&self, caller: &Caller) -> Result<(), RpcError> {
        let mut g = lock(&self.rates);
        g.try_take(&caller.token_id, Instant::now())
            .map_err(|r| RpcError::new(Kind::RateLimited, format!("this token is {r}")))
    }
}

/// Where a call's events go: the caller's WebSocket queue, or nowhere (plain HTTP).
#[derive(Debug, Clone)]
pub struct Emitter {
    call: Value,
    tx: Option<mpsc::Sender<Value>>,
}

impl Emitter {
    /// Events of call `call` into `tx`.
    pub fn new(call: Value, tx: Option<mpsc::Sender<Value>>) -> Emitter {
        Emitter { call, tx }
    }

    /// No events (HTTP).
    pub fn none() -> Emitter {
        Emitter {
            call: Value::Null,
            tx: None,
        }
    }

    /// Whether anyone receives the events (a WebSocket caller).
    pub fn streams(&self) -> bool {
        self.tx.is_some()
    }

    /// Send an event with `params.call` set; waits while the connection's queue is full (the
    /// writer closes a connection that stops reading, which ends the wait).
    pub async fn emit(&self, method: &str, mut params: Value) {
        let Some(tx) = &self.tx else { return };
        if let Some(o) = params.as_object_mut() {
            o.insert("call".into(), self.call.clone());
        }
        let _ = tx.send(crate::rpc::event(method, params)).await;
    }
}

/// The approval feed: polls the broker for pending approvals while an operator connection
/// listens, and broadcasts what changed. Runs for the gateway's lifetime.
pub async fn approval_feed(app: Arc<App>) {
    const EVERY: Duration = Duration::from_millis(300);
    let mut known: HashMap<u64, ()> = HashMap::new();
    let mut said_denied = false;
    loop {
        tokio::time::sleep(EVERY).await;
        if app.approvals.receiver_count() == 0 || !app.broker.is_available() {
            known.clear();
            continue;
        }
        let pending = match app.broker.approvals().await {
            Ok(p) => p,
            Err(e) => {
                if !said_denied {
                    tracing::warn!(error = %e, "approval feed: the broker refuses the pending list; operators get no approval events");
                    said_denied = true;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                continue;
            }
        };
        let now: HashMap<u64, ()> = pending.iter().map(|p| (p.id, ())).collect();
        for p in &pending {
            if !known.contains_key(&p.id) {
                let _ = app
                    .approvals
                    .send(crate::rpc::event("approval.requested", approval_json(p)));
            }
        }
        for id in known.keys() {
            if !now.contains_key(id) {
                let _ = app
                    .approvals
                    .send(crate::rpc::event("approval.resolved", json!({"id": id})));
            }
        }
        known = now;
    }
}

/// The inbound feed. With a model configured to answer channels (`agent.answer_channels`), the
/// agent reads the broker's inbound queue for as long as the gateway runs and answers every
/// message ([`crate::inbound`]); each is also broadcast as a `messages.inbound` event. Without,
/// the queue is read only while a connection listens, each message broadcast and acknowledged
/// by reading past it: nothing is taken while nobody listens.
pub async fn inbound_feed(app: Arc<App>) {
    if !app.broker.is_available() {
        return;
    }
    if let Some(a) = app
        .settings
        .agent
        .as_ref()
        .filter(|_| app.agent_answers_channels())
    {
        let max_runs = a.max_concurrent_runs;
        tracing::info!(max_runs, "answering channel messages");
        crate::inbound::answer_feed(
            Arc::new(crate::inbound::BrokerSource(app.clone())),
            Arc::new(crate::inbound::AgentHandler(app.clone())),
            max_runs,
        )
        .await;
        return;
    }
    const WAIT_MS: u64 = 25_000;
    let mut after: u64 = 0;
    let mut said = false;
    loop {
        if app.inbound.receiver_count() == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        match app.broker.inbound(after, WAIT_MS).await {
            Ok((messages, next)) => {
                for m in messages {
                    let m = crate::inbound::normalized(m);
                    let _ = app.inbound.send(crate::inbound::inbound_event(&m));
                }
                after = next.max(after);
            }
            Err(e) => {
                if !said {
                    tracing::warn!(error = %e, "inbound feed: the broker refuses the inbound queue; clients get no messages.inbound events");
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// A pending approval as clients see it.
pub fn approval_json(p: &carapace_broker::protocol::PendingApproval) -> Value {
    json!({
        "id": p.id,
        "program": p.program,
        "argv": p.argv,
        "profile": p.profile,
        "who": p.who,
        "created": p.created,
        "expires_in_ms": p.expires_in_ms,
        "why": p.why,
    })
}
