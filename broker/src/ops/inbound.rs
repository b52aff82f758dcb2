//! Inbound messages: what channel adapters receive from their services, on its way to the
//! gateway.
//!
//! - `deliver` (profiles whose `deliver` lists the channel: channel adapters): one message,
//!   checked (the channel, the sender, the channel's `max_bytes`, and that it fits one
//!   `inbound` reply), audited **before** it is queued (op `deliver`, target
//!   `CHANNEL:SENDER`; never the body), then queued and answered with its sequence number.
//!   "Not a channel of yours" and "no such channel" get the same `denied`.
//! - `inbound` (profiles with `inbound = true`: the gateway): the queued messages after a
//!   cursor, oldest first, as many as fit in one reply frame. Passing cursor `after`
//!   acknowledges (removes) every message up to it: the reader is a single consumer that
//!   resumes from its cursor, and a restarted reader asks from 0 and gets everything not yet
//!   acknowledged. With nothing after the cursor, the request waits (up to
//!   [`MAX_INBOUND_WAIT_MS`]) for a delivery, without holding a runtime thread; the server
//!   drops the waiting future when the peer goes away. A read is not audited (a refusal is).
//!
//! The queue lives in memory, for the broker's lifetime (through policy reloads, not through a
//! restart), and is bounded ([`super::OpsConfig::inbound_capacity`]): when it is full,
//! `deliver` is answered `busy` and nothing is queued, so the adapter keeps the message and
//! tries again — nothing is dropped silently. Sequence numbers start at 1 and grow by one per
//! queued message.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::{AuditDecision, Who};
use crate::protocol::{
    encode_reply, DeliverStatus, ErrorCode, InboundMessage, OkReply, Reply, MAX_FRAME,
    MAX_INBOUND_WAIT_MS, MAX_SENDER,
};
use crate::server::{Identity, Response};

use super::{lock, now_rfc3339, rule_ref, shown, Audited, Ops};

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
fn encoded_len(m: &InboundMessage) -> Option<usize> {
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

/// The broker's inbound queue (one per [`Ops`]).
#[derive(Debug)]
pub(crate) struct InboundQueue {
    capacity: usize,
    state: std::sync::Mutex<QueueState>,
    /// The seq of the last message queued (0: none yet); readers wait on it.
    last: watch::Sender<u64>,
    /// Bytes of an `inbound` reply without messages (see [`empty_reply_len`]).
    base_len: usize,
}

/// A place in the queue, held while the delivery is audited; given back when dropped unused.
struct Reservation<'a> {
    queue: &'a InboundQueue,
    used: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            let mut st = lock(&self.queue.state);
            st.reserved = st.reserved.saturating_sub(1);
        }
    }
}

impl Reservation<'_> {
    /// Queue `message` in the reserved place; returns its seq.
    fn push(mut self, mut message: InboundMessage, len: usize) -> u64 {
        let seq = {
            let mut st = lock(&self.queue.state);
            st.reserved = st.reserved.saturating_sub(1);
            self.used = true;
            let seq = st.next_seq;
            st.next_seq += 1;
            message.seq = seq;
            if message.id.is_empty() {
                message.id = format!("seq:{seq}");
            }
            st.messages.push_back(Queued { message, len });
            seq
        };
        self.queue.last.send_replace(seq);
        seq
    }
}

impl InboundQueue {
    pub(crate) fn new(capacity: usize) -> InboundQueue {
        InboundQueue {
            capacity,
            state: std::sync::Mutex::new(QueueState {
                messages: VecDeque::new(),
                reserved: 0,
                next_seq: 1,
            }),
            last: watch::Sender::new(0),
            base_len: empty_reply_len(),
        }
    }

    /// A place for one more message, or None when the queue is full.
    fn reserve(&self) -> Option<Reservation<'_>> {
        let mut st = lock(&self.state);
        if st.messages.len() + st.reserved >= self.capacity {
            return None;
        }
        st.reserved += 1;
        Some(Reservation {
            queue: self,
            used: false,
        })
    }

    /// Whether a message of `len` bytes (see [`encoded_len`]) fits in an `inbound` reply alone.
    fn fits_one_reply(&self, len: usize) -> bool {
        self.base_len.saturating_add(len) <= MAX_FRAME
    }

    /// The seq the next queued message gets (every seq below it has been issued).
    fn next_seq(&self) -> u64 {
        lock(&self.state).next_seq
    }

    /// Acknowledge (remove) every message with `seq <= after`, and return the ones after it,
    /// oldest first, as many as fit in one reply frame, with the reply's `next`.
    fn read(&self, after: u64) -> (Vec<InboundMessage>, u64) {
        let mut st = lock(&self.state);
        while st.messages.front().is_some_and(|q| q.message.seq <= after) {
            st.messages.pop_front();
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
        (out, next)
    }

    /// Messages queued now (acknowledged ones are gone).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).messages.len()
    }
}

impl Ops {
    /// The `deliver` operation: queue an inbound message for the gateway.
    pub async fn deliver(
        &self,
        who: &Identity,
        channel: &str,
        sender: &str,
        body: String,
    ) -> Response {
        let target = format!("{}:{}", shown(channel), shown(sender));
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
        let Some(spec) = rules.deliver_channel(channel) else {
            return refused(
                "the profile may not deliver from this channel".into(),
                AuditDecision::Deny,
                ErrorCode::Denied,
                format!(
                    "deliver on {}: not a channel profile `{}` may deliver from",
                    shown(channel),
                    who.profile
                ),
            )
            .await;
        };
        if let Some(why) = bad_sender(sender) {
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
        if body.len() as u64 > spec.max_bytes {
            return refused(
                format!(
                    "{} bytes, over max_bytes {} of the channel",
                    body.len(),
                    spec.max_bytes
                ),
                AuditDecision::Deny,
                ErrorCode::TooLarge,
                format!(
                    "deliver on {}: the message is {} bytes, over the channel's max_bytes {}",
                    spec.name,
                    body.len(),
                    spec.max_bytes
                ),
            )
            .await;
        }
        let message = InboundMessage {
            seq: 0,
            channel: spec.name.clone(),
            sender: sender.to_string(),
            body,
            ts: now_rfc3339(),
            from: Who {
                id: who.id,
                role: who.role.as_str().to_string(),
                profile: who.profile.clone(),
            },
            id: String::new(),
            conversation: sender.to_string(),
            reply_to: sender.to_string(),
        };
        // A message that could not be read in one reply would block the queue forever.
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
        let rref = rule_ref(spec.line, &spec.why);
        let Some(place) = self.inbound.reserve() else {
            return self
                .refuse(
                    who,
                    Audited {
                        op: "deliver",
                        target,
                        rule: rref,
                        decision: AuditDecision::Deny,
                        outcome: "queue full".into(),
                        detail: format!(
                            "{} messages wait for the gateway; not queued",
                            self.cfg.inbound_capacity
                        ),
                    },
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
                Audited {
                    op: "deliver",
                    target,
                    rule: rref,
                    decision: AuditDecision::Allow,
                    outcome: "queuing".into(),
                    detail: format!("{} bytes", message.body.len()),
                },
            )
            .await
        {
            return resp;
        }
        let seq = place.push(message, len);
        Response::ok(OkReply::Deliver {
            seq,
            status: DeliverStatus::Queued,
            held: None,
        })
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
        let (messages, next) = queue.read(after);
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
            let (messages, next) = queue.read(after);
            if !messages.is_empty() {
                return Response::ok(OkReply::Inbound { messages, next });
            }
        }
    }
}

#[cfg(test)]
mod tests;
