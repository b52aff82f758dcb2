//! The outboxes of adapter channels (`kind = "adapter"`): what `send` accepted, until the
//! channel's adapter confirms it or it is dead-lettered. One [`Spool`] per channel
//! (`<state>/outbox/<channel>/`), one file per message.
//!
//! - `outbox` (the adapter: a profile whose `deliver` lists the channel): the messages that
//!   are due and not leased, oldest first, as many as fit one frame; each is leased to the
//!   caller for [`OUTBOX_LEASE_MS`] (not acknowledged by then: due again). With none, the
//!   request waits up to `wait_ms` for one (a send, a retry coming due, a lease running out).
//! - `outbox_ack`: `sent` removes the message; `failed` with `retry` makes it due again after
//!   the channel's backoff (`retry`: `initial_delay` doubling up to `max_delay`) until its
//!   `attempts` are used up; then, or with `retry = false`, it goes to the dead-letter queue
//!   with the service's error as the reason. Audited before it is done.
//! - `channel_state`: whether the adapter reaches its service (for `carapace status`); kept in
//!   memory, not audited.
//!
//! Attempts and due times are in the files, so backoff survives a restart; leases are in
//! memory (after a restart every message is due).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use carapace_policy::broker::{ChannelKind, ChannelSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::{AuditDecision, Who};
use crate::dlq::Entry;
use crate::durable::{Spool, SpoolError};
use crate::protocol::{
    encode_reply, AckStatus, Button, ErrorCode, OkReply, OutboundMessage, Reply, SendOutcome,
    MAX_FRAME, MAX_INBOUND_WAIT_MS, OUTBOX_LEASE_MS,
};
use crate::server::{Identity, Response};

use super::{now_rfc3339, rule_ref, shown, Audited, Ops};
use crate::sync::lock;

/// One message in an outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    pub recipient: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Tries that failed so far.
    pub failures: u32,
    /// Not handed out before this (ms since the epoch).
    pub due_ms: u64,
    /// Who sent it.
    pub who: Who,
    /// When it was accepted, RFC 3339 UTC.
    pub ts: String,
    /// The service's last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Answer buttons (the broker's announcements to the operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<Button>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Default)]
struct OutboxState {
    entries: BTreeMap<String, OutboxEntry>,
    /// Leased ids and when their lease runs out.
    leases: HashMap<String, Instant>,
}

/// One channel's outbox.
#[derive(Debug)]
struct ChannelOutbox {
    spool: Spool,
    state: Mutex<OutboxState>,
    /// Bumped whenever a message is added or made due again; pollers wait on it.
    changed: watch::Sender<u64>,
}

impl ChannelOutbox {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Every adapter channel's outbox.
#[derive(Debug)]
pub(crate) struct Outboxes {
    /// `<state>/outbox`, or None: in memory.
    root: Option<PathBuf>,
    channels: Mutex<HashMap<String, Arc<ChannelOutbox>>>,
}

/// What [`Outboxes::open`] found at start: per channel, the send keys of the messages still
/// in the outbox (to be remembered as taken).
pub(crate) type KeysFound = Vec<(String, String)>;

impl Outboxes {
    /// The outboxes under `root` (each subdirectory a channel), or in memory.
    pub(crate) fn open(root: Option<PathBuf>) -> Result<(Outboxes, KeysFound), SpoolError> {
        let out = Outboxes {
            root: root.clone(),
            channels: Mutex::new(HashMap::new()),
        };
        let mut keys = Vec::new();
        if let Some(root) = root {
            crate::durable::ensure_dir(&root).map_err(|e| crate::durable::DurableError {
                op: "mkdir",
                path: root.clone(),
                source: e,
            })?;
            let rd = std::fs::read_dir(&root).map_err(|e| crate::durable::DurableError {
                op: "readdir",
                path: root.clone(),
                source: e,
            })?;
            for de in rd.flatten() {
                let name = de.file_name().to_string_lossy().into_owned();
                if !crate::durable::valid_id(&name) {
                    if !name.starts_with('.') {
                        tracing::warn!(dir = %root.display(), name = %name, "outbox: not a channel's directory, skipped");
                    }
                    continue;
                }
                let ch = out.channel(&name)?;
                for e in lock(&ch.state).entries.values() {
                    if let Some(k) = &e.key {
                        keys.push((name.clone(), k.clone()));
                    }
                }
            }
        }
        Ok((out, keys))
    }

    /// The outbox of `channel`, opened (and loaded) on first use.
    fn channel(&self, channel: &str) -> Result<Arc<ChannelOutbox>, SpoolError> {
        let mut map = lock(&self.channels);
        if let Some(c) = map.get(channel) {
            return Ok(c.clone());
        }
        if !crate::durable::valid_id(channel) {
            return Err(SpoolError::BadId {
                id: channel.to_string(),
            });
        }
        let spool = match &self.root {
            Some(root) => Spool::open(root.join(channel))?,
            None => Spool::memory(),
        };
        let listing = spool.list::<OutboxEntry>()?;
        for u in &listing.unreadable {
            tracing::warn!(file = %u.file, error = %u.error, "outbox: unreadable entry skipped");
        }
        let c = Arc::new(ChannelOutbox {
            spool,
            state: Mutex::new(OutboxState {
                entries: listing.entries.into_iter().collect(),
                leases: HashMap::new(),
            }),
            changed: watch::Sender::new(0),
        });
        map.insert(channel.to_string(), c.clone());
        Ok(c)
    }

    /// Add a message; returns its id. Blocking.
    pub(crate) fn enqueue(&self, channel: &str, e: &OutboxEntry) -> Result<String, SpoolError> {
        let c = self.channel(channel)?;
        let id = c.spool.put(e)?;
        lock(&c.state).entries.insert(id.clone(), e.clone());
        c.bump();
        Ok(id)
    }

    /// Messages in the outbox of `channel`.
    pub(crate) fn len(&self, channel: &str) -> u64 {
        lock(&self.channels)
            .get(channel)
            .map_or(0, |c| lock(&c.state).entries.len() as u64)
    }

    /// Make every lease of `channel` run out now.
    #[cfg(test)]
    pub(crate) fn expire_leases(&self, channel: &str) {
        if let Ok(c) = self.channel(channel) {
            for until in lock(&c.state).leases.values_mut() {
                *until = Instant::now() - Duration::from_secs(1);
            }
        }
    }

    /// The entry `id` of `channel`.
    fn get(&self, channel: &str, id: &str) -> Option<OutboxEntry> {
        let c = self.channel(channel).ok()?;
        let st = lock(&c.state);
        st.entries.get(id).cloned()
    }

    /// Hand out the due, unleased messages (leasing them), as many as fit one frame.
    fn take_due(&self, c: &ChannelOutbox) -> Vec<OutboundMessage> {
        let now = Instant::now();
        let now_ms = now_ms();
        let base = encode_reply(
            u64::MAX,
            &Reply::Ok(OkReply::Outbox {
                messages: Vec::new(),
            }),
        )
        .map_or(MAX_FRAME, |b| b.len());
        let mut used = base;
        let mut st = lock(&c.state);
        st.leases.retain(|_, until| *until > now);
        let mut out = Vec::new();
        let mut leased = Vec::new();
        for (id, e) in &st.entries {
            if e.due_ms > now_ms || st.leases.contains_key(id) {
                continue;
            }
            let m = OutboundMessage {
                id: id.clone(),
                recipient: e.recipient.clone(),
                body: e.body.clone(),
                in_reply_to: e.in_reply_to.clone(),
                attempt: e.failures.saturating_add(1),
                buttons: e.buttons.clone(),
            };
            let len = serde_json::to_vec(&m).map_or(MAX_FRAME, |b| b.len() + 1);
            if used.saturating_add(len) > MAX_FRAME {
                break;
            }
            used += len;
            leased.push(id.clone());
            out.push(m);
        }
        let until = now + Duration::from_millis(OUTBOX_LEASE_MS);
        for id in leased {
            st.leases.insert(id, until);
        }
        out
    }

    /// How long until a message may become due (a retry's time or a lease's end), if any.
    fn next_change(&self, c: &ChannelOutbox) -> Option<Duration> {
        let now = Instant::now();
        let now_ms = now_ms();
        let st = lock(&c.state);
        let due = st
            .entries
            .values()
            .filter(|e| e.due_ms > now_ms)
            .map(|e| Duration::from_millis(e.due_ms - now_ms))
            .min();
        let lease = st
            .leases
            .values()
            .map(|u| u.saturating_duration_since(now))
            .min();
        match (due, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Replace entry `id` (a failed try) and release its lease. Blocking.
    fn update(&self, channel: &str, id: &str, e: &OutboxEntry) -> Result<(), SpoolError> {
        let c = self.channel(channel)?;
        c.spool.put_as(id, e)?;
        let mut st = lock(&c.state);
        st.entries.insert(id.to_string(), e.clone());
        st.leases.remove(id);
        drop(st);
        c.bump();
        Ok(())
    }

    /// Remove entry `id`. Blocking.
    fn remove(&self, channel: &str, id: &str) -> Result<(), SpoolError> {
        let c = self.channel(channel)?;
        c.spool.remove(id)?;
        let mut st = lock(&c.state);
        st.entries.remove(id);
        st.leases.remove(id);
        Ok(())
    }
}

/// The service's error as kept and shown: printable, at most
/// [`crate::protocol::MAX_MESSAGE`] bytes.
fn service_error(e: &str) -> String {
    let mut s = shown(e);
    crate::protocol::truncate_message(&mut s);
    s
}

impl Ops {
    /// The adapter channel `channel` of the caller's profile (its `deliver` lists it), or
    /// the refusal to send.
    async fn adapter_channel(
        &self,
        who: &Identity,
        op: &'static str,
        channel: &str,
    ) -> Result<ChannelSpec, Response> {
        let target = shown(channel);
        let rules = self.rules_for(who, op, &target).await?;
        match rules.deliver_channel(channel) {
            Some(spec) if spec.kind == ChannelKind::Adapter => Ok(spec.clone()),
            _ => Err(self
                .refuse(
                    who,
                    Audited::refused(
                        op,
                        target,
                        AuditDecision::Deny,
                        "not an adapter channel the profile delivers from",
                    ),
                    ErrorCode::Denied,
                    format!(
                        "{op} on {}: not an adapter channel of profile `{}`",
                        shown(channel),
                        who.profile
                    ),
                )
                .await),
        }
    }

    /// The `outbox` operation.
    pub async fn outbox_op(&self, who: &Identity, channel: &str, wait_ms: u64) -> Response {
        let spec = match self.adapter_channel(who, "outbox", channel).await {
            Ok(s) => s,
            Err(resp) => return resp,
        };
        let c = match self.outbox.channel(&spec.name) {
            Ok(c) => c,
            Err(e) => {
                return Response::err(
                    ErrorCode::Unavailable,
                    format!("outbox on {}: {e}", spec.name),
                )
            }
        };
        let mut changed = c.changed.subscribe();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(wait_ms.min(MAX_INBOUND_WAIT_MS));
        loop {
            changed.borrow_and_update();
            let messages = self.outbox.take_due(&c);
            if !messages.is_empty() || tokio::time::Instant::now() >= deadline {
                return Response::ok(OkReply::Outbox { messages });
            }
            let wake = self.outbox.next_change(&c).map_or(deadline, |d| {
                (tokio::time::Instant::now() + d).min(deadline)
            });
            // Woken by a change, a retry or lease coming due, or the deadline.
            let _ = tokio::time::timeout_at(wake, changed.changed()).await;
        }
    }

    /// The `outbox_ack` operation.
    pub async fn outbox_ack_op(
        &self,
        who: &Identity,
        channel: &str,
        id: &str,
        outcome: SendOutcome,
    ) -> Response {
        let spec = match self.adapter_channel(who, "outbox_ack", channel).await {
            Ok(s) => s,
            Err(resp) => return resp,
        };
        let outbox = self.outbox.clone();
        let (ch, mid) = (spec.name.clone(), id.to_string());
        let found = tokio::task::spawn_blocking(move || outbox.get(&ch, &mid))
            .await
            .ok()
            .flatten();
        let Some(mut entry) = found else {
            return self
                .refuse(
                    who,
                    Audited::refused(
                        "outbox_ack",
                        format!("{} {}", spec.name, shown(id)),
                        AuditDecision::Error,
                        "no such outbound message",
                    ),
                    ErrorCode::NotFound,
                    format!(
                        "outbox_ack on {}: no outbound message {}",
                        spec.name,
                        shown(id)
                    ),
                )
                .await;
        };
        let target = format!("{} -> {}", spec.name, shown(&entry.recipient));
        let rref = rule_ref(spec.line, &spec.why);
        let attempt = entry.failures.saturating_add(1);
        match outcome {
            SendOutcome::Sent { service_id } => {
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("outbox_ack", target).by(rref).allow(
                            "sent",
                            format!(
                                "{id}; attempt {attempt}{}",
                                service_id.as_deref().map_or(String::new(), |s| format!(
                                    "; service id {}",
                                    shown(s)
                                ))
                            ),
                        ),
                    )
                    .await
                {
                    return resp;
                }
                let outbox = self.outbox.clone();
                let book = self.book.clone();
                let (ch, mid) = (spec.name.clone(), id.to_string());
                let res = tokio::task::spawn_blocking(move || {
                    let r = outbox.remove(&ch, &mid);
                    book.note_out(&ch);
                    r
                })
                .await;
                match res {
                    Ok(Ok(())) | Ok(Err(SpoolError::NotFound { .. })) => {
                        Response::ok(OkReply::OutboxAck {
                            status: AckStatus::Done,
                            dlq_id: None,
                            retry_in_ms: None,
                        })
                    }
                    Ok(Err(e)) => Response::err(
                        ErrorCode::Unavailable,
                        format!("outbox_ack on {}: {e}", spec.name),
                    ),
                    Err(e) => Response::err(ErrorCode::Internal, format!("outbox_ack task: {e}")),
                }
            }
            SendOutcome::Failed { error, retry } => {
                let error = service_error(&error);
                if retry && attempt < spec.retry.attempts {
                    let delay = spec.retry.delay_after(attempt);
                    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    if let Err(resp) = self
                        .allow(
                            who,
                            Audited::of("outbox_ack", target).by(rref).allow("retrying", format!(
                                    "{id}; attempt {attempt} of {} failed: {error}; again in {delay_ms} ms",
                                    spec.retry.attempts
                                )),
                        )
                        .await
                    {
                        return resp;
                    }
                    entry.failures = attempt;
                    entry.due_ms = now_ms().saturating_add(delay_ms);
                    entry.last_error = Some(error);
                    let outbox = self.outbox.clone();
                    let (ch, mid) = (spec.name.clone(), id.to_string());
                    match tokio::task::spawn_blocking(move || outbox.update(&ch, &mid, &entry))
                        .await
                    {
                        Ok(Ok(())) => Response::ok(OkReply::OutboxAck {
                            status: AckStatus::Retrying,
                            dlq_id: None,
                            retry_in_ms: Some(delay_ms),
                        }),
                        Ok(Err(e)) => Response::err(
                            ErrorCode::Unavailable,
                            format!("outbox_ack on {}: {e}", spec.name),
                        ),
                        Err(e) => {
                            Response::err(ErrorCode::Internal, format!("outbox_ack task: {e}"))
                        }
                    }
                } else {
                    let reason = if retry {
                        format!("the service refused it {attempt} times; last: {error}")
                    } else {
                        format!("the service refused it: {error}")
                    };
                    if let Err(resp) = self
                        .allow(
                            who,
                            Audited::of("outbox_ack", target)
                                .by(rref)
                                .deny("dead-lettering", format!("{id}; {reason}")),
                        )
                        .await
                    {
                        return resp;
                    }
                    let letter = Entry {
                        channel: spec.name.clone(),
                        recipient: entry.recipient.clone(),
                        body: entry.body.clone(),
                        reason,
                        who: entry.who.clone(),
                        ts: now_rfc3339(),
                    };
                    let outbox = self.outbox.clone();
                    let dlq = self.dlq.clone();
                    let (ch, mid) = (spec.name.clone(), id.to_string());
                    let res = tokio::task::spawn_blocking(move || {
                        let dlq_id = dlq.put(&letter).map_err(|e| e.to_string())?;
                        if let Err(e) = outbox.remove(&ch, &mid) {
                            tracing::error!(channel = %ch, id = %mid, error = %e, "dead-lettered but still in the outbox");
                        }
                        Ok::<String, String>(dlq_id)
                    })
                    .await;
                    match res {
                        Ok(Ok(dlq_id)) => Response::ok(OkReply::OutboxAck {
                            status: AckStatus::DeadLettered,
                            dlq_id: Some(dlq_id),
                            retry_in_ms: None,
                        }),
                        Ok(Err(e)) => Response::err(
                            ErrorCode::Unavailable,
                            format!(
                                "outbox_ack on {}: the dead-letter queue failed: {e}",
                                spec.name
                            ),
                        ),
                        Err(e) => {
                            Response::err(ErrorCode::Internal, format!("outbox_ack task: {e}"))
                        }
                    }
                }
            }
        }
    }

    /// The `channel_state` operation.
    pub async fn channel_state_op(
        &self,
        who: &Identity,
        channel: &str,
        connected: bool,
        error: Option<String>,
    ) -> Response {
        let spec = match self.adapter_channel(who, "channel_state", channel).await {
            Ok(s) => s,
            Err(resp) => return resp,
        };
        let error = error.as_deref().map(service_error);
        tracing::info!(channel = %spec.name, connected, error = error.as_deref().unwrap_or(""), "channel state");
        self.book.set_state(&spec.name, connected, error);
        Response::ok(OkReply::ChannelState {})
    }

    /// The operator releases a dead letter of an adapter channel: back into its outbox, due
    /// now, attempts counted from 1. Blocking.
    pub(crate) fn release_to_outbox(
        &self,
        channel: &str,
        letter: &Entry,
    ) -> Result<String, String> {
        let entry = OutboxEntry {
            recipient: letter.recipient.clone(),
            body: letter.body.clone(),
            in_reply_to: None,
            key: None,
            failures: 0,
            due_ms: 0,
            who: letter.who.clone(),
            ts: now_rfc3339(),
            last_error: None,
            buttons: Vec::new(),
        };
        self.outbox
            .enqueue(channel, &entry)
            .map_err(|e| format!("outbox of {channel}: {e}"))
    }
}
