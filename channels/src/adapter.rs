//! What every adapter shares: the inbound loop of a polling adapter (receive, deliver, and only
//! then advance the durable cursor), the outbound loop (take from the broker's outbox, send
//! through the service, acknowledge), the reports of the service's reachability, and backoff.
//!
//! An adapter is one module that implements the service side:
//!
//! - [`Source`]: wait for what arrived after a cursor (Telegram `getUpdates`, IMAP); each
//!   message comes with the cursor that follows it. A push adapter (webhook) has no source and
//!   calls [`deliver`] itself.
//! - [`Outlet`]: send one outbound message (split as the service needs), or say why not and
//!   whether a retry can help ([`ServiceError`]).
//!
//! and a `run(ctx, settings)` that reads its credential and runs the loops.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::client::DeliverReply;
use carapace_broker::protocol::{
    AckStatus, DeliverStatus, ErrorCode, OutboundMessage, SendOutcome,
};
use carapace_broker::sync::lock;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::broker::{BrokerApi, BrokerError, Inbound, Secret};
use crate::cursor::CursorStore;

/// How long one `outbox` long poll waits for a message.
pub const OUTBOX_WAIT_MS: u64 = 25_000;
/// Longest a loop waits after a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest a loop waits after a refusal only a policy change can cure (`denied`).
const MAX_CONFIG_BACKOFF: Duration = Duration::from_secs(300);
/// Longest wait a service may ask for (`retry_after`).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why an adapter stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("channel {channel}: reading secret {name}: {source}")]
    Secret {
        channel: String,
        name: String,
        #[source]
        source: BrokerError,
    },
    #[error("channel {channel}: {kind}: {source}")]
    Adapter {
        channel: String,
        kind: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the {0} adapter is not part of this build")]
    NotBuilt(&'static str),
}

/// How many pieces of each split outbound message the service took, by outbox id, so that a
/// retry resumes after them instead of sending them again. At most [`Progress::CAP`] ids are
/// kept; past that the record starts afresh (a retry of a forgotten message sends it whole).
#[derive(Debug, Default)]
pub struct Progress(Mutex<HashMap<String, usize>>);

impl Progress {
    /// Most outbox ids remembered at once.
    pub const CAP: usize = 1024;

    /// Pieces of message `id` already sent.
    pub fn of(&self, id: &str) -> usize {
        lock(&self.0).get(id).copied().unwrap_or(0)
    }

    /// The first `n` pieces of message `id` were sent.
    pub fn sent(&self, id: &str, n: usize) {
        let mut p = lock(&self.0);
        if p.len() >= Self::CAP && !p.contains_key(id) {
            p.clear();
        }
        p.insert(id.to_string(), n);
    }

    /// Message `id` is finished, or a retry cannot help: nothing to resume.
    pub fn forget(&self, id: &str) {
        lock(&self.0).remove(id);
    }
}

/// What an adapter's loops share.
#[derive(Debug)]
pub struct Ctx<B> {
    pub channel: String,
    pub state_dir: PathBuf,
    pub broker: Arc<B>,
    health: Health,
}

impl<B: BrokerApi> Ctx<B> {
    pub fn new(channel: String, state_dir: PathBuf, broker: Arc<B>) -> Ctx<B> {
        Ctx {
            channel,
            state_dir,
            broker,
            health: Health::default(),
        }
    }

    /// A credential by its policy name.
    pub async fn secret(&self, name: &str) -> Result<Secret, RunError> {
        self.broker
            .secret(name)
            .await
            .map_err(|source| RunError::Secret {
                channel: self.channel.clone(),
                name: name.to_string(),
                source,
            })
    }

    /// Tell the broker whether the service is reachable, when that changed since the last
    /// report. `error` must carry no credential.
    pub async fn report(&self, connected: bool, error: Option<String>) {
        let state = (connected, error);
        {
            let mut last = lock(&self.health.last);
            if last.as_ref() == Some(&state) {
                return;
            }
            *last = Some(state.clone());
        }
        if state.0 {
            tracing::info!(channel = %self.channel, "the service is reachable");
        } else {
            tracing::warn!(channel = %self.channel, error = state.1.as_deref().unwrap_or(""), "the service is not reachable");
        }
        if let Err(e) = self.broker.channel_state(state.0, state.1).await {
            tracing::warn!(channel = %self.channel, error = %e, "channel_state not taken");
            // Say it again next time.
            *lock(&self.health.last) = None;
        }
    }

    /// Wrap an adapter's own error for [`RunError`].
    pub fn fail(
        &self,
        kind: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> RunError {
        RunError::Adapter {
            channel: self.channel.clone(),
            kind,
            source: Box::new(e),
        }
    }
}

/// The last reported reachability.
#[derive(Debug, Default)]
struct Health {
    last: Mutex<Option<(bool, Option<String>)>>,
}

/// How a service failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Not reached or not answering sensibly (network, TLS, timeout, 5xx, malformed reply):
    /// try again.
    Unreachable,
    /// Reached, asked us to slow down (429): try again later.
    Throttled,
    /// Reached, refused this for good (4xx): no retry.
    Rejected,
}

/// A service's failure, its message free of credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub kind: FailureKind,
    pub message: String,
    /// How long the service asked us to wait.
    pub retry_after: Option<Duration>,
}

impl ServiceError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> ServiceError {
        ServiceError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Whether sending again can help.
    pub fn retry(&self) -> bool {
        self.kind != FailureKind::Rejected
    }
}

/// One thing a [`Source`] received: a message to deliver (None: nothing to deliver, e.g. a kind
/// of update the adapter skips) and the cursor that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled<C> {
    pub message: Option<Inbound>,
    pub cursor: C,
}

/// The receiving side of a polling adapter.
pub trait Source: Send {
    /// Where the adapter is in the service's stream (persisted after each delivery).
    type Cursor: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug + Send + Sync;

    /// Wait for what arrived after `cursor` (None: from the start), oldest first. An empty
    /// batch is fine (a long poll that timed out).
    fn poll(
        &mut self,
        cursor: Option<&Self::Cursor>,
    ) -> impl Future<Output = Result<Vec<Polled<Self::Cursor>>, ServiceError>> + Send;

    /// How the broker took `msg`, which this source polled: a source may tidy up what its
    /// service shows (e.g. the buttons of an approval the operator has just answered).
    /// Nothing by default.
    fn delivered(
        &mut self,
        _msg: &Inbound,
        _status: DeliverStatus,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The sending side of an adapter.
pub trait Outlet: Send + Sync {
    /// Send one outbound message; its id on the service, if it gives one.
    fn send(
        &self,
        msg: &OutboundMessage,
    ) -> impl Future<Output = Result<Option<String>, ServiceError>> + Send;
}

/// Exponential backoff: 1 s, doubling, up to a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_secs(1),
            max,
        }
    }

    /// The wait before the next attempt (and double the one after).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_secs(1);
    }
}

/// The note delivered instead of a message the broker finds too large.
fn too_large_note(bytes: usize) -> String {
    format!("[carapace: a message of {bytes} bytes was over this channel's size limit and was not delivered]")
}

/// Deliver `msg`, retrying for as long as the broker is busy or unavailable (never skipping
/// it). A message the broker finds too large is replaced by a short note with the same id.
/// Err: the broker refused it for a reason no retry cures (`bad_request`): the caller skips it.
pub async fn deliver<B: BrokerApi>(
    ctx: &Ctx<B>,
    msg: &Inbound,
) -> Result<DeliverReply, BrokerError> {
    let mut backoff = Backoff::new(MAX_BACKOFF);
    let mut config_backoff = Backoff::new(MAX_CONFIG_BACKOFF);
    let mut msg = std::borrow::Cow::Borrowed(msg);
    let mut noted = false;
    loop {
        let err = match ctx.broker.deliver(&msg).await {
            Ok(r) => {
                tracing::info!(channel = %ctx.channel, id = %msg.id, sender = %msg.sender, status = ?r.status, "delivered");
                return Ok(r);
            }
            Err(e) => e,
        };
        let wait = match err.code() {
            Some(ErrorCode::TooLarge) if !noted => {
                tracing::warn!(channel = %ctx.channel, id = %msg.id, bytes = msg.text.len(), "over the channel's size limit: a note is delivered instead");
                let note = too_large_note(msg.text.len());
                msg.to_mut().text = note;
                noted = true;
                continue;
            }
            Some(ErrorCode::BadRequest | ErrorCode::TooLarge) => {
                tracing::error!(channel = %ctx.channel, id = %msg.id, error = %err, "the broker refuses this message for good: skipped");
                return Err(err);
            }
            _ if err.is_transient() => backoff.next_delay(),
            // denied, not_found, an op the broker does not know: a policy or version problem
            // the operator fixes; keep the message meanwhile.
            _ => config_backoff.next_delay(),
        };
        tracing::warn!(channel = %ctx.channel, id = %msg.id, error = %err, retry_in_ms = wait.as_millis() as u64, "deliver failed: trying again");
        tokio::time::sleep(wait).await;
    }
}

/// The inbound loop of a polling adapter: poll, deliver each message, and only after the broker
/// answered persist the cursor that follows it. Runs until the process ends.
pub async fn run_inbound<B: BrokerApi, S: Source>(
    ctx: &Ctx<B>,
    source: &mut S,
    store: &CursorStore,
) {
    let mut cursor: Option<S::Cursor> = store.load_or_warn();
    let mut backoff = Backoff::new(MAX_BACKOFF);
    loop {
        let batch = match source.poll(cursor.as_ref()).await {
            Ok(b) => {
                backoff.reset();
                ctx.report(true, None).await;
                b
            }
            Err(e) => {
                let wait = e
                    .retry_after
                    .map(|d| d.min(MAX_RETRY_AFTER))
                    .unwrap_or_else(|| backoff.next_delay());
                tracing::warn!(channel = %ctx.channel, error = %e, retry_in_ms = wait.as_millis() as u64, "receiving failed");
                if e.kind == FailureKind::Unreachable || e.kind == FailureKind::Rejected {
                    ctx.report(false, Some(e.message.clone())).await;
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        for polled in batch {
            if let Some(msg) = &polled.message {
                // Err: refused for good and logged; the cursor moves past it.
                if let Ok(r) = deliver(ctx, msg).await {
                    source.delivered(msg, r.status).await;
                }
            }
            if let Err(e) = store.store(&polled.cursor) {
                // Delivery is idempotent on the message id: after a restart from the older
                // cursor the broker answers `duplicate` for what it has.
                tracing::error!(channel = %ctx.channel, error = %e, "the cursor was not saved");
            }
            cursor = Some(polled.cursor);
        }
    }
}

/// The outbound loop: take due messages from the broker's outbox, send each through `outlet`,
/// acknowledge. Runs until the process ends.
pub async fn run_outbound<B: BrokerApi, O: Outlet>(ctx: &Ctx<B>, outlet: &O) {
    let mut backoff = Backoff::new(MAX_BACKOFF);
    let mut config_backoff = Backoff::new(MAX_CONFIG_BACKOFF);
    loop {
        let batch = match ctx.broker.outbox(OUTBOX_WAIT_MS).await {
            Ok(b) => {
                backoff.reset();
                config_backoff.reset();
                b
            }
            Err(e) => {
                let wait = if e.is_transient() {
                    backoff.next_delay()
                } else {
                    config_backoff.next_delay()
                };
                tracing::warn!(channel = %ctx.channel, error = %e, retry_in_ms = wait.as_millis() as u64, "outbox failed");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        for msg in batch {
            let pause = send_one(ctx, outlet, &msg).await;
            if let Some(p) = pause {
                tracing::info!(channel = %ctx.channel, pause_ms = p.as_millis() as u64, "the service asked to slow down");
                tokio::time::sleep(p).await;
            }
        }
    }
}

/// Send one message and acknowledge it; how long to pause sending when the service asked.
async fn send_one<B: BrokerApi, O: Outlet>(
    ctx: &Ctx<B>,
    outlet: &O,
    msg: &OutboundMessage,
) -> Option<Duration> {
    let (outcome, pause) = match outlet.send(msg).await {
        Ok(service_id) => {
            ctx.report(true, None).await;
            (SendOutcome::Sent { service_id }, None)
        }
        Err(e) => {
            match e.kind {
                FailureKind::Unreachable => ctx.report(false, Some(e.message.clone())).await,
                FailureKind::Throttled | FailureKind::Rejected => ctx.report(true, None).await,
            }
            let pause = e.retry_after.map(|d| d.min(MAX_RETRY_AFTER));
            (
                SendOutcome::Failed {
                    error: e.message.clone(),
                    retry: e.retry(),
                },
                pause,
            )
        }
    };
    ack(ctx, &msg.id, outcome).await;
    pause
}

/// Acknowledge, trying again a few times while the broker is busy. Not taken at all: the lease
/// runs out and the message is due again (sent twice: at least once, never lost).
async fn ack<B: BrokerApi>(ctx: &Ctx<B>, id: &str, outcome: SendOutcome) {
    let mut backoff = Backoff::new(Duration::from_secs(8));
    for _ in 0..5 {
        match ctx.broker.outbox_ack(id, outcome.clone()).await {
            Ok(r) => {
                match r.status {
                    AckStatus::Done => tracing::info!(channel = %ctx.channel, id, "sent"),
                    AckStatus::Retrying => {
                        tracing::warn!(channel = %ctx.channel, id, ?outcome, retry_in_ms = r.retry_in_ms, "not sent: the broker retries it")
                    }
                    AckStatus::DeadLettered => {
                        tracing::error!(channel = %ctx.channel, id, ?outcome, dlq_id = r.dlq_id.as_deref().unwrap_or(""), "not sent: dead-lettered")
                    }
                }
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(channel = %ctx.channel, id, error = %e, "outbox_ack failed: trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(channel = %ctx.channel, id, error = %e, "outbox_ack refused");
                return;
            }
        }
    }
    tracing::error!(channel = %ctx.channel, id, "outbox_ack not taken: the message will be due again");
}

#[cfg(test)]
mod tests;
