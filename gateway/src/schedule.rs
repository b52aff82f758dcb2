//! A fair share of the gateway's broker budget for every client token.
//!
//! The broker limits the gateway's requests with one token bucket for the whole gateway (the
//! profile's broker `rate`, passed in the settings as `broker_rate`). Were the gateway to send
//! requests as they come, a client flooding calls would take the whole budget and the broker
//! would refuse everyone else's with `rate_limited`. Instead, every broker request waits here
//! for a *slot*: [`Fair`] keeps the broker's bucket (same rate, a burst [`HEADROOM`] smaller,
//! starting full as the broker's does for the gateway's fresh identity; a slot is taken before
//! the request is sent, and the headroom covers a request that reaches the broker late), and
//! hands the
//! slots round-robin over the keys (client tokens) that wait: one slot per waiting key per
//! round, so a light client's call waits at most about one round however many calls a flooding
//! client has queued. A call that gets no slot within [`WAIT_LIMIT`] fails with `busy`.
//!
//! Whose call a request is comes from the task-local [`KEY`] (set around each client call by
//! `methods::dispatch` and around token checks); requests made outside one (the approval and
//! inbound feeds) share the key [`OWN_KEY`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use carapace_broker::sync::lock;
use tokio::sync::Notify;

use crate::rpc::{Kind, RpcError};
use crate::settings::BrokerRate;

/// Longest a call waits for its turn at the broker before it fails with `busy`: as long as a
/// client's own call timeout would reasonably be, and far longer than one round of the queue
/// (16 waiting tokens at 50 requests per second are a third of a second).
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// How late a request may reach the broker after its slot was given (the blocking thread that
/// sends it, a wait for a free session) without the broker seeing more than its budget: the
/// scheduler's burst is this much of the rate below the broker's (at least one request, at most
/// half the burst). A slot given while the broker's bucket is full and reaching it only after
/// further slots were given would otherwise find it short.
pub const HEADROOM: std::time::Duration = std::time::Duration::from_millis(200);

/// The key of the gateway's own requests (made outside any client call).
pub const OWN_KEY: &str = "gateway";

tokio::task_local! {
    /// Whose broker requests the current task makes (a token id, or a token hash's prefix
    /// while the token is being checked).
    pub static KEY: String;
}

/// The key of the current task.
pub fn current_key() -> String {
    KEY.try_with(Clone::clone)
        .unwrap_or_else(|_| OWN_KEY.to_string())
}

/// One waiting request.
pub type Ticket = u64;

/// The scheduler's state, with time passed in (tests drive a fake clock).
#[derive(Debug)]
pub struct Fair {
    /// None: no broker budget (every request goes at once).
    budget: Option<BrokerRate>,
    tokens: f64,
    last: Option<Instant>,
    /// Keys with waiting tickets, in the order they are served next.
    ring: VecDeque<String>,
    waiting: HashMap<String, VecDeque<Ticket>>,
    /// Tickets given a slot and not yet collected by their waiter.
    granted: HashSet<Ticket>,
    next: Ticket,
}

impl Fair {
    /// Slots within the broker's `budget`, kept [`HEADROOM`] below its burst.
    pub fn new(budget: Option<BrokerRate>) -> Fair {
        let budget = budget.map(|b| {
            let spare = (b.requests_per_second * HEADROOM.as_secs_f64()).ceil();
            let spare = spare.max(1.0).min(f64::from(b.burst / 2));
            BrokerRate {
                requests_per_second: b.requests_per_second,
                // `spare` is at most burst / 2: the cast cannot truncate.
                burst: b.burst - spare as u32,
            }
        });
        Fair {
            tokens: budget.map_or(0.0, |b| f64::from(b.burst)),
            budget,
            last: None,
            ring: VecDeque::new(),
            waiting: HashMap::new(),
            granted: HashSet::new(),
            next: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let Some(b) = self.budget else { return };
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * b.requests_per_second).min(f64::from(b.burst));
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
    }

    fn take_token(&mut self) -> bool {
        if self.budget.is_none() {
            return true;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A slot at once, when nobody waits and the budget has one.
    pub fn try_now(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.ring.is_empty() && self.take_token()
    }

    /// Queue a request of `key`; call [`Fair::grant`] and then [`Fair::collect`] to learn
    /// when it may go.
    pub fn enqueue(&mut self, key: &str) -> Ticket {
        let t = self.next;
        self.next += 1;
        let q = self.waiting.entry(key.to_string()).or_default();
        if q.is_empty() {
            self.ring.push_back(key.to_string());
        }
        q.push_back(t);
        t
    }

    /// Hand out the slots the budget has at `now`, one per waiting key in turn; how many.
    pub fn grant(&mut self, now: Instant) -> usize {
        self.refill(now);
        let mut n = 0;
        while let Some(key) = self.ring.front().cloned() {
            if !self.take_token() {
                break;
            }
            self.ring.pop_front();
            let Some(q) = self.waiting.get_mut(&key) else {
                continue;
            };
            if let Some(t) = q.pop_front() {
                self.granted.insert(t);
                n += 1;
            }
            if q.is_empty() {
                self.waiting.remove(&key);
            } else {
                self.ring.push_back(key);
            }
        }
        n
    }

    /// Whether `t` was given its slot (and forget it if so).
    pub fn collect(&mut self, t: Ticket) -> bool {
        self.granted.remove(&t)
    }

    /// Give up `t`: out of its queue, or, when it was granted but not collected, its slot
    /// back to the budget.
    pub fn cancel(&mut self, t: Ticket) {
        if self.granted.remove(&t) {
            if let Some(b) = self.budget {
                self.tokens = (self.tokens + 1.0).min(f64::from(b.burst));
            }
            return;
        }
        let mut emptied = None;
        for (k, q) in &mut self.waiting {
            if let Some(i) = q.iter().position(|x| *x == t) {
                q.remove(i);
                if q.is_empty() {
                    emptied = Some(k.clone());
                }
                break;
            }
        }
        if let Some(k) = emptied {
            self.waiting.remove(&k);
            self.ring.retain(|x| *x != k);
        }
    }

    /// How long from `now` until the budget has a slot again (zero when it has one).
    pub fn next_slot_in(&self) -> Duration {
        match self.budget {
            Some(b) if self.tokens < 1.0 => {
                Duration::try_from_secs_f64((1.0 - self.tokens) / b.requests_per_second)
                    .unwrap_or(WAIT_LIMIT)
            }
            _ => Duration::ZERO,
        }
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// [`Fair`] for async callers: [`Scheduler::acquire`] waits for a slot.
#[derive(Debug)]
pub struct Scheduler {
    fair: Mutex<Fair>,
    wake: Notify,
    limit: Duration,
}

/// Gives a ticket up when its waiter goes away before collecting it (deadline, or the call
/// was dropped with its client).
struct Waiting<'a> {
    s: &'a Scheduler,
    ticket: Ticket,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.s.fair).cancel(self.ticket);
            // A slot given back may be someone else's turn now.
            self.s.wake.notify_waiters();
        }
    }
}

impl Scheduler {
    pub fn new(budget: Option<BrokerRate>) -> Scheduler {
        Scheduler::with_limit(budget, WAIT_LIMIT)
    }

    /// With another waiting limit than [`WAIT_LIMIT`].
    pub fn with_limit(budget: Option<BrokerRate>, limit: Duration) -> Scheduler {
        Scheduler {
            fair: Mutex::new(Fair::new(budget)),
            wake: Notify::new(),
            limit,
        }
    }

    /// Wait for a slot for one broker request of `key`; `busy` after the waiting limit.
    pub async fn acquire(&self, key: &str) -> Result<(), RpcError> {
        let ticket = {
            let mut f = lock(&self.fair);
            if f.try_now(Instant::now()) {
                return Ok(());
            }
            f.enqueue(key)
        };
        let mut w = Waiting {
            s: self,
            ticket,
            done: false,
        };
        let deadline = Instant::now() + self.limit;
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let wait = {
                let mut f = lock(&self.fair);
                let n = f.grant(now);
                let mine = f.collect(ticket);
                if n > usize::from(mine) {
                    self.wake.notify_waiters();
                }
                if mine {
                    w.done = true;
                    return Ok(());
                }
                f.next_slot_in()
            };
            if now >= deadline {
                let rate = lock(&self.fair)
                    .budget
                    .map_or(0.0, |b| b.requests_per_second);
                return Err(RpcError::new(
                    Kind::Busy,
                    format!(
                        "the gateway's broker budget ({rate} requests/s, shared fairly by its clients) \
                         had no turn for this call within {} s: too many calls are waiting; try again later",
                        self.limit.as_secs()
                    ),
                ));
            }
            // Sleep until the next slot (a little after: the clock's rounding), the deadline,
            // or a wake-up from another waiter.
            let sleep = wait
                .saturating_add(Duration::from_micros(200))
                .min(deadline.saturating_duration_since(now));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        lock(&self.fair).waiting()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Option<BrokerRate> {
        Some(BrokerRate {
            requests_per_second: per_second,
            burst,
        })
    }

    #[test]
    fn a_light_token_waits_at_most_one_round_behind_a_flood() {
        let t0 = Instant::now();
        let mut f = Fair::new(rate(10.0, 1));
        assert!(f.try_now(t0), "the first slot is there at once");
        let flood: Vec<Ticket> = (0..100).map(|_| f.enqueue("flood")).collect();
        // The light token asks a little later, behind 100 queued calls of the flood.
        let mut now = t0 + Duration::from_millis(50);
        assert_eq!(f.grant(now), 0, "no slot yet");
        let light = f.enqueue("light");
        let mut served_before_light = 0;
        loop {
            now += Duration::from_millis(100);
            f.grant(now);
            if f.collect(light) {
                break;
            }
            served_before_light += flood.iter().filter(|t| f.collect(**t)).count();
            assert!(now < t0 + Duration::from_secs(2), "the light call starves");
        }
        assert!(
            served_before_light <= 1,
            "{served_before_light} flood calls went before the light one"
        );
        // And a second light call again waits only one flood call.
        let light2 = f.enqueue("light");
        now += Duration::from_millis(100);
        f.grant(now);
        assert!(!f.collect(light2), "the flood's turn");
        now += Duration::from_millis(100);
        f.grant(now);
        assert!(f.collect(light2), "then the light one's");
    }

    #[test]
    fn without_round_robin_the_flood_would_go_first() {
        // The other direction: the flood's calls are served in order among themselves, so a
        // second flood key would not get ahead of the first one's queue either.
        let t0 = Instant::now();
        let mut f = Fair::new(rate(1.0, 1));
        assert!(f.try_now(t0));
        let a: Vec<Ticket> = (0..3).map(|_| f.enqueue("a")).collect();
        let b = f.enqueue("b");
        let mut order = Vec::new();
        for i in 1..=4 {
            f.grant(t0 + Duration::from_secs(i));
            for t in a.iter().chain([&b]) {
                if f.collect(*t) {
                    order.push(*t);
                }
            }
        }
        assert_eq!(order, vec![a[0], b, a[1], a[2]]);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let t0 = Instant::now();
        let (per_second, burst) = (50.0, 100u32);
        let mut f = Fair::new(rate(per_second, burst));
        let mut grants: Vec<Instant> = Vec::new();
        let mut pending: Vec<Ticket> = Vec::new();
        // 10 s in steps of 1 ms; 16 keys asking far more than the budget; some fast-path.
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for k in 0..16 {
                if (ms + k) % 5 == 0 && pending.len() < 64 {
                    if f.try_now(now) {
                        grants.push(now);
                    } else {
                        pending.push(f.enqueue(&format!("k{k}")));
                    }
                }
            }
            f.grant(now);
            pending.retain(|t| {
                if f.collect(*t) {
                    grants.push(now);
                    false
                } else {
                    true
                }
            });
        }
        assert!(grants.len() > 500, "the budget was used: {}", grants.len());
        // In every window [a, b]: at most burst + rate × (b - a) slots.
        for (i, a) in grants.iter().enumerate() {
            for (j, b) in grants.iter().enumerate().skip(i) {
                let allowed = f64::from(burst) + per_second * b.duration_since(*a).as_secs_f64();
                let n = (j - i + 1) as f64;
                assert!(
                    n <= allowed + 1e-6,
                    "{n} slots in {:?}",
                    b.duration_since(*a)
                );
            }
        }
        // And over the whole run about the budget itself (less the headroom), not less.
        let expected = f64::from(burst) - 10.0 + per_second * 10.0;
        assert!((grants.len() as f64) > expected - 2.0, "{}", grants.len());
    }

    #[test]
    fn the_burst_keeps_headroom_below_the_brokers() {
        let t0 = Instant::now();
        let mut f = Fair::new(rate(50.0, 100));
        let at_once = (0..200).take_while(|_| f.try_now(t0)).count();
        assert_eq!(at_once, 90, "200 ms of the rate kept spare");
        // A burst of 1 cannot keep any.
        let mut f = Fair::new(rate(5.0, 1));
        assert!(f.try_now(t0));
        assert!(!f.try_now(t0));
    }

    #[test]
    fn cancelled_tickets_leave_the_queue_and_give_their_slot_back() {
        let t0 = Instant::now();
        let mut f = Fair::new(rate(1.0, 1));
        assert!(f.try_now(t0));
        let a = f.enqueue("a");
        let b = f.enqueue("b");
        f.cancel(a);
        assert_eq!(f.waiting(), 1);
        f.grant(t0 + Duration::from_secs(1));
        assert!(f.collect(b), "b moved up");
        let c = f.enqueue("c");
        f.grant(t0 + Duration::from_secs(2));
        f.cancel(c);
        // c's slot went back: the next caller has it at once.
        assert!(f.try_now(t0 + Duration::from_secs(2)));
        assert!(!f.try_now(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn no_budget_means_no_wait() {
        let mut f = Fair::new(None);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(f.try_now(t0));
        }
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_busy_and_others_still_get_slots() {
        let s = std::sync::Arc::new(Scheduler::with_limit(
            rate(20.0, 1),
            Duration::from_millis(30),
        ));
        s.acquire("a").await.unwrap_or_else(|e| panic!("{e}"));
        // The next slot is 50 ms away: past a 30 ms deadline.
        let started = Instant::now();
        let e = s
            .acquire("a")
            .await
            .err()
            .unwrap_or_else(|| panic!("no wait"));
        assert_eq!(e.kind, Kind::Busy);
        assert!(e.message.contains("broker budget"), "{}", e.message);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(s.waiting(), 0, "the expired call left the queue");
        // With a longer limit, the waiter gets the next slot.
        let s = Scheduler::with_limit(rate(20.0, 1), Duration::from_secs(5));
        s.acquire("a").await.unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        s.acquire("b").await.unwrap_or_else(|e| panic!("{e}"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(40) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
    }
}
