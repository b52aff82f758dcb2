//! Inbound messages: what channel adapters receive from their services, on its way to the
//! gateway.
//!
//! - `deliver` (profiles whose `deliver` lists the channel: channel adapters): one message,
//!   checked (the channel, the sender, its message id, conversation and reply address, the
//!   channel's `max_bytes`, and that it fits one `inbound` reply). A message id already taken
//!   on the channel is answered `duplicate`. The body is redacted of known secret values. A
//!   sender the channel admits (its `senders`, or an operator's admission for good) has the
//!   message audited **before** it is queued (op `deliver`, target `CHANNEL:SENDER`; never the
//!   body), then queued and answered with its sequence number; anyone else's is held for the
//!   operator (`ops/held.rs`). "Not a channel of yours" and "no such channel" get the same
//!   `denied`.
//! - `inbound` (profiles with `inbound = true`: the gateway): the queued messages after a
//!   cursor, oldest first, as many as fit in one reply frame. Passing cursor `after`
//!   acknowledges (removes) every message up to it: the reader is a single consumer that
//!   resumes from its cursor, and a restarted reader asks from 0 and gets everything not yet
//!   acknowledged. With nothing after the cursor, the request waits (up to
//!   [`MAX_INBOUND_WAIT_MS`]) for a delivery, without holding a runtime thread; the server
//!   drops the waiting future when the peer goes away. A read is not audited (a refusal is).
//!
//! The queue is in memory and, each message until it is acknowledged, in a [`Spool`]
//! (`<state>/inbound/`, or in memory without a state directory): a new broker on the same state
//! directory queues them again with their seqs, and seqs continue after the highest issued or
//! acknowledged (the acknowledged seq is kept in the channel journal). It is bounded
//! ([`super::OpsConfig::inbound_capacity`]): when it is full, `deliver` is answered `busy` and
//! nothing is queued, so the adapter keeps the message and tries again — nothing is dropped
//! silently. Sequence numbers start at 1 and grow by one per queued message.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::{AuditDecision, Who};
use crate::client::DeliverArgs;
use crate::durable::{Spool, SpoolError};
use crate::protocol::{
    encode_reply, DeliverStatus, ErrorCode, InboundMessage, OkReply, Reply, MAX_FRAME,
    MAX_INBOUND_WAIT_MS, MAX_MESSAGE_ID, MAX_SENDER,
};
use crate::server::{Identity, Response};

use super::channels::{ChannelBook, Claim};
use super::{now_rfc3339, rule_ref, shown, Audited, Ops};
use crate::sync::lock;

/// Audit target of `inbound` refusals.
const QUEUE_TARGET: &str = "inbound queue";

/// Why a `sender` is not acceptable, or None.
pub fn bad_sender(sender: &str) -> Option<&'static str> {
    if sender.is_empty() {
        Some("the sender is empty")
    } else if sender.len() > MAX_SENDER {
        Some("the sender is longer than 256 bytes")
    } else if sender.chars().any(char::is_control) {
        Some("the sender has control characters")
    } else {
        None
    }
}

/// Bytes of an `inbound` reply without messages, with the longest id and `next` there are.
fn empty_reply_len() -> usize {
    let reply = Reply::Ok(OkReply::Inbound {
        messages: Vec::new(),
        next: u64::MAX,
    });
    // Not reachable: a small fixed frame always encodes. Counted as full, nothing would fit.
    encode_reply(u64::MAX, &reply).map_or(MAX_FRAME, |b| b.len())
}

/// Bytes `m` takes in an `inbound` reply (with the longest seq there is, and its comma).
pub(crate) fn encoded_len(m: &InboundMessage) -> Option<usize> {
    let widest = InboundMessage {
        seq: u64::MAX,
        ..m.clone()
    };
    serde_json::to_vec(&widest).ok().map(|b| b.len() + 1)
}

/// A queued message and an upper bound of the bytes it takes in a reply.
#[derive(Debug)]
struct Queued {
    message: InboundMessage,
    len: usize,
}

#[derive(Debug)]
struct QueueState {
    /// Oldest first; seqs strictly increasing.
    messages: VecDeque<Queued>,
    /// Places promised to deliveries being audited (they count against the capacity).
    reserved: usize,
    /// The seq the next queued message gets.
    next_seq: u64,
}

/// The broker's inbound queue (one per [`Ops`]): in memory, and each message in its own file
/// of a [`Spool`] (`<state>/inbound/<seq, 20 digits>.json`) until it is acknowledged.
#[derive(Debug)]
pub(crate) struct InboundQueue {
    capacity: usize,
    state: std::sync::Mutex<QueueState>,
    /// Held while a message is stored and queued: seqs are stored and queued in order.
    writer: std::sync::Mutex<()>,
    spool: Spool,
    /// The seq of the last message queued (0: none yet); readers wait on it.
    last: watch::Sender<u64>,
    /// Bytes of an `inbound` reply without messages (see [`empty_reply_len`]).
    base_len: usize,
}

/// A place in the queue, held while the delivery is audited; given back when dropped unused.
pub(crate) struct Reservation {
    queue: Arc<InboundQueue>,
    used: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            let mut st = lock(&self.queue.state);
            st.reserved = st.reserved.saturating_sub(1);
        }
    }
}

fn spool_id(seq: u64) -> String {
    format!("{seq:020}")
}

impl Reservation {
    /// Store and queue `message` in the reserved place; returns its seq. Blocking (the file is
    /// written and fsync'd first; when that fails nothing is queued).
    pub(crate) fn push(
        mut self,
        mut message: InboundMessage,
        len: usize,
    ) -> Result<u64, SpoolError> {
        let queue = self.queue.clone();
        let _w = lock(&queue.writer);
        let seq = lock(&queue.state).next_seq;
        message.seq = seq;
        if message.id.is_empty() {
            message.id = format!("seq:{seq}");
        }
        queue.spool.put_as(&spool_id(seq), &message)?;
        {
            let mut st = lock(&queue.state);
            st.reserved = st.reserved.saturating_sub(1);
            self.used = true;
            st.next_seq = seq + 1;
            st.messages.push_back(Queued { message, len });
        }
        queue.last.send_replace(seq);
        Ok(seq)
    }
}

impl InboundQueue {
    /// The queue over `spool`: the messages stored there with a seq above `acked` are queued
    /// again (those at or below it were acknowledged and are removed), and seqs continue after
    /// the highest of `acked` and theirs. Files that cannot be read are logged and left alone.
    pub(crate) fn open(
        capacity: usize,
        spool: Spool,
        acked: u64,
    ) -> Result<InboundQueue, SpoolError> {
        let listing = spool.list::<InboundMessage>()?;
        for u in &listing.unreadable {
            tracing::warn!(file = %u.file, error = %u.error, "inbound queue: unreadable entry skipped");
        }
        let mut messages = VecDeque::new();
        let mut last = acked;
        for (id, mut m) in listing.entries {
            let Ok(seq) = id.parse::<u64>() else {
                tracing::warn!(id = %id, "inbound queue: entry not named by its seq, skipped");
                continue;
            };
            if seq <= acked {
                if let Err(e) = spool.remove(&id) {
                    tracing::warn!(id = %id, error = %e, "inbound queue: acknowledged entry not removed");
                }
                continue;
            }
            m.seq = seq;
            let Some(len) = encoded_len(&m) else {
                tracing::warn!(id = %id, "inbound queue: entry cannot be encoded, skipped");
                continue;
            };
            last = last.max(seq);
            messages.push_back(Queued { message: m, len });
        }
        Ok(InboundQueue {
            capacity,
            state: std::sync::Mutex::new(QueueState {
                messages,
                reserved: 0,
                next_seq: last + 1,
            }),
            writer: std::sync::Mutex::new(()),
            spool,
            last: watch::Sender::new(last),
            base_len: empty_reply_len(),
        })
    }

    /// A place for one more message, or None when the queue is full.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        let mut st = lock(&self.state);
        if st.messages.len() + st.reserved >= self.capacity {
            return None;
        }
        st.reserved += 1;
        Some(Reservation {
            queue: self.clone(),
            used: false,
        })
    }

    /// Whether a message of `len` bytes (see [`encoded_len`]) fits in an `inbound` reply alone.
    pub(crate) fn fits_one_reply(&self, len: usize) -> bool {
        self.base_len.saturating_add(len) <= MAX_FRAME
    }

    /// The seq the next queued message gets (every seq below it has been issued).
    fn next_seq(&self) -> u64 {
        lock(&self.state).next_seq
    }

    /// Acknowledge (remove) every message with `seq <= after`, and return the ones after it,
    /// oldest first, as many as fit in one reply frame, with the reply's `next`, and the seqs
    /// acknowledged now (their files are to be removed).
    fn read(&self, after: u64) -> (Vec<InboundMessage>, u64, Vec<u64>) {
        let mut st = lock(&self.state);
        let mut acked = Vec::new();
        while st.messages.front().is_some_and(|q| q.message.seq <= after) {
            if let Some(q) = st.messages.pop_front() {
                acked.push(q.message.seq);
            }
        }
        let mut used = self.base_len;
        let mut out = Vec::new();
        let mut next = after;
        for q in &st.messages {
            if used.saturating_add(q.len) > MAX_FRAME {
                break;
            }
            used += q.len;
            next = q.message.seq;
            out.push(q.message.clone());
        }
        (out, next, acked)
    }

    /// Remove the files of acknowledged messages. Blocking. A failure is logged: the message
    /// comes back after a restart unless the acknowledged seq was recorded.
    fn forget(&self, seqs: &[u64]) {
        for seq in seqs {
            if let Err(e) = self.spool.remove(&spool_id(*seq)) {
                tracing::warn!(seq, error = %e, "inbound queue: acknowledged entry not removed");
            }
        }
    }

    /// The messages queued now, oldest first.
    pub(crate) fn messages(&self) -> Vec<InboundMessage> {
        lock(&self.state)
            .messages
            .iter()
            .map(|q| q.message.clone())
            .collect()
    }

    /// Messages waiting, per channel.
    pub(crate) fn per_channel(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for q in &lock(&self.state).messages {
            *out.entry(q.message.channel.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Messages queued now (acknowledged ones are gone).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).messages.len()
    }
}

/// Releases a claimed message id or send key unless it was taken.
pub(crate) struct ClaimGuard {
    book: Arc<ChannelBook>,
    channel: String,
    key: bool,
    value: Option<String>,
}

impl ClaimGuard {
    /// Claim message id (`key = false`) or send key (`key = true`) `value` on `channel`
    /// (nothing to claim without one). Err: already taken ([`Claim::Seen`]) or being taken
    /// ([`Claim::InProgress`]).
    pub(crate) fn claim(
        book: &Arc<ChannelBook>,
        channel: &str,
        key: bool,
        value: Option<&str>,
    ) -> Result<ClaimGuard, Claim> {
        if let Some(v) = value {
            match book.claim(channel, key, v) {
                Claim::Fresh => {}
                other => return Err(other),
            }
        }
        Ok(ClaimGuard {
            book: book.clone(),
            channel: channel.to_string(),
            key,
            value: value.map(str::to_string),
        })
    }

    /// The message was stored: record the id (or key) for good. Blocking. A failure to record
    /// is logged (the store's entry still carries it until it leaves the store).
    pub(crate) fn taken(mut self) {
        if let Some(v) = self.value.take() {
            if let Err(e) = self.book.finish(&self.channel, self.key, &v, true) {
                tracing::error!(channel = %self.channel, error = %e, "channel state: id not recorded");
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(v) = self.value.take() {
            // Only the in-memory claim is released: no I/O.
            let _ = self.book.finish(&self.channel, self.key, &v, false);
        }
    }
}

/// Why a message id, conversation, reply address or key is not acceptable, or None: 1 to
/// [`MAX_MESSAGE_ID`] bytes without control characters.
pub fn bad_ref(v: &str) -> Option<&'static str> {
    if v.is_empty() {
        Some("is empty")
    } else if v.len() > MAX_MESSAGE_ID {
        Some("is longer than 256 bytes")
    } else if v.chars().any(char::is_control) {
        Some("has control characters")
    } else {
        None
    }
}

impl Ops {
    /// The answer to a delivery whose message id was already taken (a redelivery): audited as
    /// a duplicate, nothing queued.
    pub(super) async fn duplicate_delivery(
        &self,
        who: &Identity,
        audited: Audited<'_>,
    ) -> Response {
        match self.audit(who, audited).await {
            Ok(()) => Response::ok(OkReply::Deliver {
                seq: 0,
                status: DeliverStatus::Duplicate,
                held: None,
            }),
            Err(_) => Response::err(
                ErrorCode::Unavailable,
                "the audit log cannot be written: request refused",
            ),
        }
    }

    /// The `deliver` operation without the optional fields.
    pub async fn deliver(
        &self,
        who: &Identity,
        channel: &str,
        sender: &str,
        body: String,
    ) -> Response {
        self.deliver_message(
            who,
            DeliverArgs {
                channel: channel.to_string(),
                sender: sender.to_string(),
                body,
                ..DeliverArgs::default()
            },
        )
        .await
    }

    /// The `deliver` operation: an inbound message, queued for the gateway when its sender is
    /// admitted (the channel's `senders`, or an operator's admission for good), else held for
    /// the operator; a repeat of a message id already taken on the channel does nothing.
    pub async fn deliver_message(&self, who: &Identity, d: DeliverArgs) -> Response {
        let target = format!("{}:{}", shown(&d.channel), shown(&d.sender));
        let refused = |detail: String, decision, code, message: String| {
            let target = target.clone();
            async move {
                self.refuse(
                    who,
                    Audited::refused("deliver", target, decision, detail),
                    code,
                    message,
                )
                .await
            }
        };
        let rules = match self.rules_for(who, "deliver", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        // The same answer whether the channel is another profile's or does not exist.
        let Some(spec) = rules.deliver_channel(&d.channel) else {
            return refused(
                "the profile may not deliver from this channel".into(),
                AuditDecision::Deny,
                ErrorCode::Denied,
                format!(
                    "deliver on {}: not a channel profile `{}` may deliver from",
                    shown(&d.channel),
                    who.profile
                ),
            )
            .await;
        };
        if let Some(why) = bad_sender(&d.sender) {
            return refused(
                why.into(),
                AuditDecision::Error,
                ErrorCode::BadRequest,
                format!(
                    "deliver on {}: {why} (1 to {MAX_SENDER} bytes without control characters)",
                    spec.name
                ),
            )
            .await;
        }
        for (what, v) in [
            ("message_id", &d.id),
            ("conversation", &d.conversation),
            ("reply_to", &d.reply_to),
        ] {
            if let Some(why) = v.as_deref().and_then(bad_ref) {
                return refused(
                    format!("the {what} {why}"),
                    AuditDecision::Error,
                    ErrorCode::BadRequest,
                    format!(
                        "deliver on {}: the {what} {why} (1 to {MAX_MESSAGE_ID} bytes without \
                         control characters)",
                        spec.name
                    ),
                )
                .await;
            }
        }
        if d.body.len() as u64 > spec.max_bytes {
            return refused(
                format!(
                    "{} bytes, over max_bytes {} of the channel",
                    d.body.len(),
                    spec.max_bytes
                ),
                AuditDecision::Deny,
                ErrorCode::TooLarge,
                format!(
                    "deliver on {}: the message is {} bytes, over the channel's max_bytes {}",
                    spec.name,
                    d.body.len(),
                    spec.max_bytes
                ),
            )
            .await;
        }
        let rref = rule_ref(spec.line, &spec.why);
        // The channel's operator answering an approval or a held message: taken here, in the
        // broker, by the identity the adapter reports; never queued for the agent.
        if super::operator_chat::is_operator(spec, &d.sender) {
            if let Some(answer) = super::operator_chat::parse_answer(&d.body) {
                return self.operator_answer(who, spec, &d, answer, rref).await;
            }
        }
        let id_shown = d.id.as_deref().map(shown).unwrap_or_default();
        let claim = match ClaimGuard::claim(&self.book, &spec.name, false, d.id.as_deref()) {
            Ok(c) => c,
            Err(Claim::InProgress) => {
                return refused(
                    format!("message id {id_shown} is being delivered"),
                    AuditDecision::Deny,
                    ErrorCode::Busy,
                    format!(
                        "deliver on {}: a delivery of this message id is in progress; try \
                         again later",
                        spec.name
                    ),
                )
                .await;
            }
            Err(_) => {
                return self
                    .duplicate_delivery(
                        who,
                        Audited::of("deliver", target)
                            .by(rref)
                            .allow("duplicate", format!("message id {id_shown} already taken")),
                    )
                    .await;
            }
        };
        // Known secret values are not stored, wherever the message goes.
        let redactor = self.redactor();
        let body = if redactor.finds(d.body.as_bytes()) {
            String::from_utf8_lossy(&redactor.redact(d.body.as_bytes())).into_owned()
        } else {
            d.body
        };
        let conversation = d.conversation.unwrap_or_else(|| d.sender.clone());
        let reply_to = d.reply_to.unwrap_or_else(|| conversation.clone());
        let by_policy = spec.sender_admitted(&d.sender).map(str::to_string);
        let admitted = by_policy.is_some() || self.book.admitted(&spec.name, &d.sender);
        let message = InboundMessage {
            seq: 0,
            channel: spec.name.clone(),
            sender: d.sender.clone(),
            body,
            ts: now_rfc3339(),
            from: Who::from(who),
            id: d.id.clone().unwrap_or_default(),
            conversation,
            reply_to,
        };
        // A message that could not be read in one reply would block the queue forever (a held
        // one is queued when admitted).
        let len = match encoded_len(&message) {
            Some(len) if self.inbound.fits_one_reply(len) => len,
            _ => {
                return refused(
                    format!(
                        "{} bytes: too large for one inbound reply",
                        message.body.len()
                    ),
                    AuditDecision::Deny,
                    ErrorCode::TooLarge,
                    format!(
                        "deliver on {}: the message does not fit in one reply frame of \
                         {MAX_FRAME} bytes once encoded",
                        spec.name
                    ),
                )
                .await;
            }
        };
        if !admitted {
            return self.hold(who, target, rref, message, claim).await;
        }
        let Some(place) = self.inbound.reserve() else {
            return self
                .refuse(
                    who,
                    Audited::of("deliver", target).by(rref).deny(
                        "queue full",
                        format!(
                            "{} messages wait for the gateway; not queued",
                            self.cfg.inbound_capacity
                        ),
                    ),
                    ErrorCode::Busy,
                    format!(
                        "deliver on {}: the inbound queue is full ({} messages); keep the \
                         message and try again later",
                        spec.name, self.cfg.inbound_capacity
                    ),
                )
                .await;
        };
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("deliver", target).by(rref).allow(
                    "queuing",
                    format!(
                        "{} bytes; sender admitted by {}",
                        message.body.len(),
                        by_policy.map_or("an operator".to_string(), |g| format!("`{g}`"))
                    ),
                ),
            )
            .await
        {
            return resp;
        }
        match self.queue_blocking(place, message, len, claim).await {
            Ok(seq) => Response::ok(OkReply::Deliver {
                seq,
                status: DeliverStatus::Queued,
                held: None,
            }),
            Err(resp) => resp,
        }
    }

    /// Store and queue `message` (blocking thread): record its id and its reply address
    /// (the sender is admitted), note the channel's last inbound time.
    pub(crate) async fn queue_blocking(
        &self,
        place: Reservation,
        message: InboundMessage,
        len: usize,
        claim: ClaimGuard,
    ) -> Result<u64, Response> {
        let book = self.book.clone();
        let channel = message.channel.clone();
        let reply_to = message.reply_to.clone();
        let res = tokio::task::spawn_blocking(move || {
            // The reply address first: once queued, the message can be read and answered at
            // once, and the answer's `send` checks this address (`reply_to_senders`). Recording
            // it for a message that then fails to be stored grants nothing new: its sender is
            // admitted.
            if let Err(e) = book.add_reply_address(&channel, &reply_to) {
                tracing::error!(channel = %channel, error = %e, "channel state: reply address not recorded");
            }
            let seq = place.push(message, len)?;
            claim.taken();
            book.note_in(&channel);
            Ok::<u64, SpoolError>(seq)
        })
        .await;
        match res {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(Response::err(
                ErrorCode::Unavailable,
                format!("deliver: the message could not be stored: {e}"),
            )),
            Err(e) => Err(Response::err(
                ErrorCode::Internal,
                format!("deliver task: {e}"),
            )),
        }
    }

    /// The `inbound` operation: the messages after `after` (acknowledging those up to it),
    /// waiting up to `wait_ms` for one when there is none.
    pub async fn inbound(&self, who: &Identity, after: u64, wait_ms: u64) -> Response {
        let refused = |detail: String, decision, code, message: String| async move {
            self.refuse(
                who,
                Audited::refused("inbound", QUEUE_TARGET, decision, detail),
                code,
                message,
            )
            .await
        };
        let rules = match self.rules_for(who, "inbound", QUEUE_TARGET).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.inbound {
            return refused(
                "the profile may not read the inbound queue".into(),
                AuditDecision::Deny,
                ErrorCode::Denied,
                format!(
                    "inbound: profile `{}` may not read inbound messages",
                    who.profile
                ),
            )
            .await;
        }
        let queue = &self.inbound;
        // Subscribed before the first read: a delivery after the read is seen by the wait.
        let mut last = queue.last.subscribe();
        let issued = queue.next_seq();
        if after >= issued {
            return refused(
                format!("cursor {after} beyond the last seq issued"),
                AuditDecision::Error,
                ErrorCode::BadRequest,
                format!(
                    "inbound: after {after} is beyond the last message ever queued ({}): a \
                     cursor from another broker's lifetime; read again from 0",
                    issued - 1
                ),
            )
            .await;
        }
        let (messages, next, acked) = queue.read(after);
        if !acked.is_empty() {
            self.forget_acked(acked, after).await;
        }
        if !messages.is_empty() || wait_ms == 0 {
            return Response::ok(OkReply::Inbound { messages, next });
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(wait_ms.min(MAX_INBOUND_WAIT_MS));
        // Wait for a seq past `floor`; a wake-up whose messages another reader acknowledged
        // meanwhile raises the floor rather than spinning.
        let mut floor = after;
        loop {
            let waited = tokio::time::timeout_at(deadline, last.wait_for(|&seq| seq > floor))
                .await
                .map(|r| r.map(|seq| *seq));
            match waited {
                Ok(Ok(seq)) => floor = seq,
                // Timed out, or the queue is gone (not while `self` lives): nothing came.
                Err(_) | Ok(Err(_)) => {
                    return Response::ok(OkReply::Inbound {
                        messages: Vec::new(),
                        next: after,
                    })
                }
            }
            let (messages, next, acked) = queue.read(after);
            if !acked.is_empty() {
                self.forget_acked(acked, after).await;
            }
            if !messages.is_empty() {
                return Response::ok(OkReply::Inbound { messages, next });
            }
        }
    }
}

impl Ops {
    /// Remove the files of acknowledged messages and record the cursor (blocking thread).
    async fn forget_acked(&self, seqs: Vec<u64>, after: u64) {
        let queue = self.inbound.clone();
        let book = self.book.clone();
        let res = tokio::task::spawn_blocking(move || {
            if let Err(e) = book.set_acked(after) {
                tracing::error!(error = %e, "inbound queue: acknowledged seq not recorded");
            }
            queue.forget(&seqs);
        })
        .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "inbound queue: acknowledgement task failed");
        }
    }
}

#[cfg(test)]
mod tests;
