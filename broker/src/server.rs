//! The broker's async server: one tokio task per peer socket.
//!
//! The supervisor binds an [`Identity`] to each child's socket when it spawns the child and hands
//! the broker's end to [`Server::serve_peer`]; requests never carry identity. Per peer:
//! - frames are read from the non-blocking `SOCK_SEQPACKET` fd (via `AsyncFd`);
//! - a frame the kernel truncated (over [`MAX_FRAME`]) drops the peer;
//! - requests carry no fds: any attached are closed at once and the request is refused;
//! - a malformed frame gets an error reply; more than [`PeerLimits::max_malformed`] drop the peer;
//! - at most [`PeerLimits::max_in_flight`] requests run at once (others get `busy`), optionally
//!   rate-limited by a token bucket (`rate_limited`);
//! - replies go through a bounded queue: a peer that does not read fills it and is dropped, as is
//!   one whose socket stays unwritable for [`PeerLimits::write_stall`];
//! - when the peer closes its end (or the task is aborted), its in-flight requests and pending
//!   follow-ups are cancelled (their futures dropped) and the socket is closed.
//!
//! **Sessions.** Every process of a sandbox inherits the same socket, so two clients running at
//! once would mix their request ids and read each other's replies. A `session` request makes
//! the server create a new socketpair, serve one end as a new peer with the *same* identity,
//! and reply with the other end; a client that may run concurrently with others talks only on
//! its session. The sockets of one identity (the one the supervisor bound, its "root", and
//! every session opened from it or from another session) form a family that shares:
//! - the identity, and so every policy check and audit record of the operations;
//! - the request-rate token bucket and the in-flight limit (sessions are no way around them);
//! - a cap on live sessions ([`PeerLimits::max_sessions`]; over it `session` gets `busy`).
//!
//! A session ends when its client closes it; when the root's service ends (the child exited
//! or the task was aborted), every session of the family is closed and its in-flight requests
//! cancelled. `session` itself is no action: it is not audited and takes no rate token.
//!
//! A peer's trouble never touches another peer: each has its own task, queue and limits.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};
use tokio::task::{AbortHandle, JoinSet};

use crate::protocol::{
    decode_request, encode_event, encode_reply, recv_frame, send_frame, seqpacket_pair, ErrorCode,
    Event, OkReply, Reply, Request, SocketError, MAX_FRAME,
};
use crate::ratelimit::Bucket;
use crate::sync::lock;

/// What a child is to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Gateway,
    Tool,
    Channel,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Tool => "tool",
            Role::Channel => "channel",
        }
    }
}

/// Who is on the other end of a socket, bound by the supervisor at spawn.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Assigned at spawn, unique for the broker's life.
    pub id: u64,
    pub role: Role,
    /// Policy profile the child runs under.
    pub profile: String,
}

impl From<&Identity> for crate::audit::Who {
    /// Who a record or a message is from: the peer's id, role and profile.
    fn from(who: &Identity) -> crate::audit::Who {
        crate::audit::Who {
            id: who.id,
            role: who.role.as_str().to_string(),
            profile: who.profile.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}({})", self.role.as_str(), self.id, self.profile)
    }
}

/// A future producing the event sent after a reply (the `exit` of an exec'd tool).
pub type FollowUp = Pin<Box<dyn Future<Output = Event> + Send + 'static>>;

/// What a [`Handler`] answers: the reply, the fds attached to it (exactly
/// [`Reply::fd_count`] of them, else the server sends `internal` instead), and an optional
/// follow-up whose event is sent with the same id once it completes (dropped if the reply is an
/// error or the peer goes away).
pub struct Response {
    pub reply: Reply,
    pub fds: Vec<OwnedFd>,
    pub follow_up: Option<FollowUp>,
    /// The policy asked an operator before this answer (an `ask` rule): what the
    /// [`Observer`] counts it as, whatever the operator said.
    pub asked: bool,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("reply", &self.reply)
            .field("fds", &self.fds)
            .field("follow_up", &self.follow_up.is_some())
            .field("asked", &self.asked)
            .finish()
    }
}

impl Response {
    /// A successful reply without fds.
    pub fn ok(reply: OkReply) -> Response {
        Response {
            reply: Reply::Ok(reply),
            fds: Vec::new(),
            follow_up: None,
            asked: false,
        }
    }

    /// An error reply.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            reply: Reply::err(code, message),
            fds: Vec::new(),
            follow_up: None,
            asked: false,
        }
    }

    /// Attach fds (in the order the protocol documents for the reply).
    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> Response {
        self.fds = fds;
        self
    }

    /// Mark it as answered after asking an operator.
    pub fn asked(mut self, asked: bool) -> Response {
        self.asked = asked;
        self
    }

    /// Attach a follow-up event.
    pub fn with_follow_up(mut self, follow_up: FollowUp) -> Response {
        self.follow_up = Some(follow_up);
        self
    }
}

/// Answers requests. Implemented by the broker's operations (`ops`); tests use their own.
/// `session` requests never reach a handler (the server answers them).
///
/// The returned future may be dropped before completion (peer gone, task aborted): handlers
/// must be cancel-safe in that sense (no half-done state that matters).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        who: &Identity,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

/// How a handled request was decided: the label the supervisor's metrics count it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered `ok` without asking anyone.
    Allow,
    /// Refused (`denied`) without asking anyone: by the policy.
    Deny,
    /// An operator was asked (an `ask` rule), whatever the answer; or the reply is `pending`.
    Ask,
    /// Any other error (bad request, not found, unavailable, internal...).
    Error,
}

impl Outcome {
    /// The outcome of a response.
    pub fn of(response: &Response) -> Outcome {
        match &response.reply {
            _ if response.asked => Outcome::Ask,
            Reply::Ok(_) => Outcome::Allow,
            Reply::Err(e) if e.code == ErrorCode::Denied => Outcome::Deny,
            Reply::Err(e) if e.code == ErrorCode::Pending => Outcome::Ask,
            Reply::Err(_) => Outcome::Error,
        }
    }

    /// Label value: `allow`, `deny`, `ask` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Ask => "ask",
            Outcome::Error => "error",
        }
    }
}

/// One answered request, as an [`Observer`] is told of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answered {
    /// The op's wire name (a fixed table: [`Request::op`]).
    pub op: &'static str,
    pub outcome: Outcome,
    /// The reply is `denied` (by the policy, or by the operator after an ask).
    pub denied: bool,
    /// From the frame's arrival to its reply being ready for the peer.
    pub elapsed: Duration,
}

/// Told of every request a [`Handler`] answered. Called on the server's task: it must not
/// block (count, do not write). Requests the server refuses itself (malformed, over the rate,
/// busy) and `session` do not reach it; a request cancelled because its peer went away is not
/// reported.
pub trait Observer: Send + Sync + 'static {
    fn request_done(&self, answered: Answered);
}

/// A token bucket rate for one peer's requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Per-peer limits. The rate and in-flight limits are shared by an identity's sockets (its
/// root and its sessions); the others apply to each socket.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Requests being handled at once, over the identity's sockets; more get a `busy` error.
    pub max_in_flight: usize,
    /// Outgoing frames queued for a peer; when full, the peer is dropped.
    pub max_queued: usize,
    /// Malformed frames tolerated (each gets an error reply); one more drops the peer.
    pub max_malformed: u32,
    /// Longest a queued frame may wait for the socket to become writable before the peer is
    /// dropped.
    pub write_stall: Duration,
    /// Optional request rate (token bucket, one per identity); over it requests get
    /// `rate_limited`. `session` requests take no token.
    pub rate: Option<RateLimit>,
    /// Sessions (see the module docs) open at once per identity; more get `busy`.
    pub max_sessions: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_in_flight: 32,
            max_queued: 256,
            max_malformed: 16,
            write_stall: Duration::from_secs(10),
            rate: None,
            max_sessions: 32,
        }
    }
}

/// Why a peer's task ended.
#[derive(Debug)]
pub enum PeerEnd {
    /// The peer closed its end.
    Closed,
    /// A frame over the cap (`MSG_TRUNC`).
    Oversize,
    /// Too many malformed frames.
    Malformed,
    /// The outgoing queue filled up (the peer does not read).
    QueueFull,
    /// The socket stayed unwritable for `write_stall`.
    WriteStalled,
    /// The socket failed (reset, registration error...).
    Io(SocketError),
}

/// The broker's server. Cheap to clone; all clones share the handler and limits.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    handler: Arc<dyn Handler>,
    limits: PeerLimits,
    observer: Option<Arc<dyn Observer>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("limits", &self.inner.limits)
            .field("observer", &self.inner.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(handler: Arc<dyn Handler>, limits: PeerLimits) -> Self {
        Server {
            inner: Arc::new(Inner {
                handler,
                limits,
                observer: None,
            }),
        }
    }

    /// The same server, telling `observer` of every answered request (see [`Observer`]).
    pub fn with_observer(self, observer: Arc<dyn Observer>) -> Self {
        Server {
            inner: Arc::new(Inner {
                handler: self.inner.handler.clone(),
                limits: self.inner.limits.clone(),
                observer: Some(observer),
            }),
        }
    }

    /// Serve one peer (the broker's end of a child's socketpair) on a new task. Must be called
    /// from within a tokio runtime. Aborting the handle closes the socket and cancels the
    /// peer's in-flight requests (do so when the child has exited); so does the peer's closing
    /// its end. Either way the sessions opened through it are closed too.
    pub fn serve_peer(&self, fd: OwnedFd, who: Identity) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let who_s = who.to_string();
            let end = run_peer(inner, fd, who).await;
            match &end {
                PeerEnd::Closed => tracing::debug!(peer = %who_s, "broker peer closed"),
                other => tracing::warn!(peer = %who_s, reason = ?other, "broker peer dropped"),
            }
        })
    }

    /// Like [`Server::serve_peer`], but the task yields why the peer's service ended.
    pub fn serve_peer_report(
        &self,
        fd: OwnedFd,
        who: Identity,
    ) -> tokio::task::JoinHandle<PeerEnd> {
        tokio::spawn(run_peer(self.inner.clone(), fd, who))
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What the sockets of one identity share: its root socket (bound by the supervisor) and the
/// sessions opened from the family.
struct Family {
    sessions: Mutex<Sessions>,
    /// Requests being handled (spawned handler tasks) over all the family's sockets.
    in_flight: AtomicUsize,
    /// The identity's request-rate bucket.
    bucket: Mutex<Option<Bucket>>,
}

#[derive(Default)]
struct Sessions {
    /// Live session tasks, by key.
    live: HashMap<u64, AbortHandle>,
    next_key: u64,
    /// The root's service ended: no new sessions, the live ones were aborted.
    closed: bool,
}

impl Family {
    fn new(limits: &PeerLimits) -> Arc<Family> {
        Arc::new(Family {
            sessions: Mutex::new(Sessions::default()),
            in_flight: AtomicUsize::new(0),
            bucket: Mutex::new(limits.rate.map(|r| Bucket::new(r.per_second, r.burst))),
        })
    }
}

/// Owned by the root's service: when it ends (returns or is aborted), every session of the
/// family is aborted (its socket closed, its in-flight requests cancelled).
struct CloseSessionsOnDrop(Arc<Family>);

impl Drop for CloseSessionsOnDrop {
    fn drop(&mut self) {
        let live = {
            let mut s = lock(&self.0.sessions);
            s.closed = true;
            std::mem::take(&mut s.live)
        };
        for handle in live.values() {
            handle.abort();
        }
    }
}

/// Owned by a session's task: frees its place in the family when the task ends.
struct SessionSlot {
    family: Arc<Family>,
    key: u64,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        lock(&self.family.sessions).live.remove(&self.key);
    }
}

/// One request being handled on a spawned task; dropped when it completes or is cancelled.
struct InFlight(Arc<Family>);

impl InFlight {
    fn acquire(family: &Arc<Family>, max: usize) -> Option<InFlight> {
        family
            .in_flight
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(family.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Encode an error reply (cannot fail: error bodies are small; falls back to a fixed frame).
fn error_frame(id: u64, code: ErrorCode, message: impl Into<String>) -> Outgoing {
    let bytes = encode_reply(id, &Reply::err(code, message)).unwrap_or_else(|_| {
        format!(r#"{{"v":1,"id":{id},"ok":false,"error":{{"code":"internal","message":""}}}}"#)
            .into_bytes()
    });
    Outgoing {
        bytes,
        fds: Vec::new(),
    }
}

/// Queue a frame; false when the queue is full (the peer must be dropped).
fn queue(tx: &mpsc::Sender<Outgoing>, out: Outgoing) -> bool {
    match tx.try_send(out) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => false,
        // The receiver lives as long as the peer task; closed means we are shutting down.
        Err(mpsc::error::TrySendError::Closed(_)) => true,
    }
}

/// Run a handler and turn its response into an outgoing frame; returns the follow-up if any.
async fn handle_one(
    inner: Arc<Inner>,
    who: Arc<Identity>,
    id: u64,
    req: Request,
    tx: mpsc::Sender<Outgoing>,
    overflow: Arc<Notify>,
    received: Instant,
) -> Option<FollowUp> {
    let op = req.op();
    let handler = inner.handler.clone();
    let response = handler.handle(&who, req).await;
    let outcome = Outcome::of(&response);
    let Response {
        reply,
        fds,
        follow_up,
        asked: _,
    } = response;
    let (out, follow_up) = if fds.len() != reply.fd_count() {
        tracing::error!(
            peer = %who, id, attached = fds.len(), expected = reply.fd_count(),
            "handler attached the wrong number of fds"
        );
        (
            error_frame(id, ErrorCode::Internal, "broker error: wrong number of fds"),
            None,
        )
    } else {
        if let Some(observer) = &inner.observer {
            observer.request_done(Answered {
                op,
                outcome,
                denied: matches!(&reply, Reply::Err(e) if e.code == ErrorCode::Denied),
                elapsed: received.elapsed(),
            });
        }
        match encode_reply(id, &reply) {
            Ok(bytes) => {
                let follow_up = if matches!(reply, Reply::Ok(_)) {
                    follow_up
                } else {
                    None
                };
                (Outgoing { bytes, fds }, follow_up)
            }
            Err(e) => (
                error_frame(id, ErrorCode::Internal, format!("broker error: {e}")),
                None,
            ),
        }
    };
    if !queue(&tx, out) {
        overflow.notify_one();
        return None;
    }
    follow_up
}

async fn write_loop(
    afd: &AsyncFd<OwnedFd>,
    rx: &mut mpsc::Receiver<Outgoing>,
    stall: Duration,
) -> PeerEnd {
    while let Some(out) = rx.recv().await {
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
        let send = async {
            loop {
                let mut guard = afd.writable().await.map_err(|source| SocketError::Io {
                    syscall: "epoll (writable)",
                    fd: afd.get_ref().as_raw_fd(),
                    source,
                })?;
                match send_frame(afd.get_ref().as_fd(), &out.bytes, &fds) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_would_block() => guard.clear_ready(),
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(stall, send).await {
            Err(_) => return PeerEnd::WriteStalled,
            Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => return PeerEnd::Closed,
            Ok(Err(e)) => return PeerEnd::Io(e),
            Ok(Ok(())) => {}
        }
    }
    // Unreachable in practice: run_peer holds a sender for as long as it polls us.
    PeerEnd::Closed
}

/// Frames read per readiness before yielding to other tasks.
const READ_BATCH: usize = 32;

enum Step {
    Continue,
    End(PeerEnd),
}

struct PeerState {
    inner: Arc<Inner>,
    who: Arc<Identity>,
    family: Arc<Family>,
    tx: mpsc::Sender<Outgoing>,
    overflow: Arc<Notify>,
    tasks: JoinSet<Option<FollowUp>>,
    follow_ups: JoinSet<()>,
    /// Request id of each running task (handler or follow-up).
    task_ids: HashMap<tokio::task::Id, u64>,
    /// Ids in use: in flight or awaiting their follow-up event.
    busy_ids: HashSet<u64>,
    malformed: u32,
}

impl PeerState {
    fn reply_error(&mut self, id: u64, code: ErrorCode, message: impl Into<String>) -> Step {
        if queue(&self.tx, error_frame(id, code, message)) {
            Step::Continue
        } else {
            Step::End(PeerEnd::QueueFull)
        }
    }

    fn malformed(&mut self, id: u64, code: ErrorCode, message: String) -> Step {
        self.malformed += 1;
        if self.malformed > self.inner.limits.max_malformed {
            return Step::End(PeerEnd::Malformed);
        }
        self.reply_error(id, code, message)
    }

    fn frame(&mut self, bytes: &[u8], fds: Vec<OwnedFd>, fds_truncated: bool) -> Step {
        if !fds.is_empty() || fds_truncated {
            let n = fds.len();
            drop(fds); // closed at once
            let id = decode_request(bytes).map(|f| f.id).unwrap_or(0);
            return self.malformed(
                id,
                ErrorCode::BadRequest,
                format!(
                    "requests carry no fds ({n}{} attached, closed)",
                    if fds_truncated { "+" } else { "" }
                ),
            );
        }
        let frame = match decode_request(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                let (id, reply) = e.to_reply();
                let Reply::Err(body) = reply else {
                    return Step::Continue;
                };
                return self.malformed(id, body.code, body.message);
            }
        };
        let received = Instant::now();
        let id = frame.id;
        if self.busy_ids.contains(&id) {
            return self.reply_error(
                id,
                ErrorCode::BadRequest,
                format!("request id {id} is already in flight"),
            );
        }
        if let Request::Session {} = frame.request {
            return self.open_session(id);
        }
        let over_rate = lock(&self.family.bucket)
            .as_mut()
            .is_some_and(|bucket| bucket.try_take(Instant::now()).is_err());
        if over_rate {
            return self.reply_error(
                id,
                ErrorCode::RateLimited,
                "request rate over this identity's limit",
            );
        }
        let Some(slot) = InFlight::acquire(&self.family, self.inner.limits.max_in_flight) else {
            return self.reply_error(
                id,
                ErrorCode::Busy,
                format!(
                    "more than {} requests in flight for this identity",
                    self.inner.limits.max_in_flight
                ),
            );
        };
        let mut fut: Pin<Box<dyn Future<Output = Option<FollowUp>> + Send>> = Box::pin(handle_one(
            self.inner.clone(),
            self.who.clone(),
            id,
            frame.request,
            self.tx.clone(),
            self.overflow.clone(),
            received,
        ));
        // Most requests are answered without waiting (ping, denials, lookups): poll once
        // inline and skip a task spawn. A future that is not ready is spawned; the runtime
        // polls it again with a real waker (futures re-register their waker on every poll).
        let mut cx = Context::from_waker(Waker::noop());
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
        match polled {
            Ok(Poll::Ready(Some(follow_up))) => {
                self.busy_ids.insert(id);
                self.spawn_follow_up(id, follow_up);
                Step::Continue
            }
            Ok(Poll::Ready(None)) => Step::Continue,
            Ok(Poll::Pending) => {
                let handle = self.tasks.spawn(async move {
                    let _slot = slot;
                    fut.await
                });
                self.task_ids.insert(handle.id(), id);
                self.busy_ids.insert(id);
                Step::Continue
            }
            Err(_) => {
                tracing::error!(peer = %self.who, id, "broker handler panicked");
                self.reply_error(id, ErrorCode::Internal, "broker error: handler failed")
            }
        }
    }

    /// `session`: a new socket served with this identity, in this family; the reply carries
    /// the client's end.
    fn open_session(&mut self, id: u64) -> Step {
        let max = self.inner.limits.max_sessions;
        let (broker_end, client_end) = match seqpacket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(peer = %self.who, error = %e, "session: socketpair failed");
                return self.reply_error(
                    id,
                    ErrorCode::Unavailable,
                    "cannot create a session socket now",
                );
            }
        };
        {
            let mut sessions = lock(&self.family.sessions);
            if sessions.closed {
                drop(sessions);
                return self.reply_error(id, ErrorCode::Unavailable, "this identity is closing");
            }
            if sessions.live.len() >= max {
                drop(sessions);
                return self.reply_error(
                    id,
                    ErrorCode::Busy,
                    format!("{max} sessions are open for this identity already"),
                );
            }
            let key = sessions.next_key;
            sessions.next_key += 1;
            let slot = SessionSlot {
                family: self.family.clone(),
                key,
            };
            let (inner, who, family) = (self.inner.clone(), self.who.clone(), self.family.clone());
            // The session's task frees its slot when it ends; it cannot do so before the insert
            // below, because that needs this lock.
            let handle = tokio::spawn(async move {
                let _slot = slot;
                let who_s = who.to_string();
                let end = serve_socket(inner, broker_end, who, family).await;
                match &end {
                    PeerEnd::Closed => tracing::debug!(peer = %who_s, "broker session closed"),
                    other => {
                        tracing::warn!(peer = %who_s, reason = ?other, "broker session dropped")
                    }
                }
            });
            sessions.live.insert(key, handle.abort_handle());
        }
        let out = match encode_reply(id, &Reply::Ok(OkReply::Session {})) {
            Ok(bytes) => Outgoing {
                bytes,
                fds: vec![client_end],
            },
            // Not reachable (a fixed small frame); the session ends when client_end is dropped.
            Err(e) => error_frame(id, ErrorCode::Internal, format!("broker error: {e}")),
        };
        if queue(&self.tx, out) {
            Step::Continue
        } else {
            Step::End(PeerEnd::QueueFull)
        }
    }

    fn spawn_follow_up(&mut self, id: u64, follow_up: FollowUp) {
        let tx = self.tx.clone();
        let overflow = self.overflow.clone();
        let handle = self.follow_ups.spawn(async move {
            let event = follow_up.await;
            let out = match encode_event(id, &event) {
                Ok(bytes) => Outgoing {
                    bytes,
                    fds: Vec::new(),
                },
                Err(e) => error_frame(id, ErrorCode::Internal, format!("broker error: {e}")),
            };
            if !queue(&tx, out) {
                overflow.notify_one();
            }
        });
        self.task_ids.insert(handle.id(), id);
    }

    fn handler_done(
        &mut self,
        joined: Result<(tokio::task::Id, Option<FollowUp>), tokio::task::JoinError>,
    ) -> Step {
        let (task, result) = match joined {
            Ok((task, follow_up)) => (task, Ok(follow_up)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some(id) = self.task_ids.remove(&task) else {
            return Step::Continue;
        };
        match result {
            Ok(Some(follow_up)) => {
                self.spawn_follow_up(id, follow_up);
                Step::Continue
            }
            Ok(None) => {
                self.busy_ids.remove(&id);
                Step::Continue
            }
            Err(e) => {
                self.busy_ids.remove(&id);
                tracing::error!(peer = %self.who, id, error = %e, "broker handler failed");
                self.reply_error(id, ErrorCode::Internal, "broker error: handler failed")
            }
        }
    }

    fn follow_up_done(&mut self, joined: Result<tokio::task::Id, tokio::task::JoinError>) -> Step {
        let task = match &joined {
            Ok(task) => *task,
            Err(e) => e.id(),
        };
        if let Some(id) = self.task_ids.remove(&task) {
            self.busy_ids.remove(&id);
            if let Err(e) = joined {
                tracing::error!(peer = %self.who, id, error = %e, "broker follow-up failed");
                return self.reply_error(id, ErrorCode::Internal, "broker error: follow-up failed");
            }
        }
        Step::Continue
    }
}

/// Serve a root socket: the identity's family lives as long as this.
async fn run_peer(inner: Arc<Inner>, fd: OwnedFd, who: Identity) -> PeerEnd {
    let family = Family::new(&inner.limits);
    let _close_sessions = CloseSessionsOnDrop(family.clone());
    serve_socket(inner, fd, Arc::new(who), family).await
}

/// Serve one socket (a root or a session) of `family`.
async fn serve_socket(
    inner: Arc<Inner>,
    fd: OwnedFd,
    who: Arc<Identity>,
    family: Arc<Family>,
) -> PeerEnd {
    let sock_err = |syscall, source| {
        PeerEnd::Io(SocketError::Io {
            syscall,
            fd: -1,
            source,
        })
    };
    if let Err(e) = set_nonblocking(fd.as_fd()) {
        return sock_err("fcntl(O_NONBLOCK)", e);
    }
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers to the same
    // socket until the AsyncFd is dropped, and OwnedFd::as_raw_fd always returns that fd.
    let registered =
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) };
    let afd = match registered {
        Ok(afd) => afd,
        Err(e) => return sock_err("epoll_ctl", e.into_parts().1),
    };
    let (tx, mut rx) = mpsc::channel::<Outgoing>(inner.limits.max_queued.max(1));
    let mut st = PeerState {
        inner,
        who,
        family,
        tx,
        overflow: Arc::new(Notify::new()),
        tasks: JoinSet::new(),
        follow_ups: JoinSet::new(),
        task_ids: HashMap::new(),
        busy_ids: HashSet::new(),
        malformed: 0,
    };
    let stall = st.inner.limits.write_stall;
    let overflow = st.overflow.clone();
    let writer = write_loop(&afd, &mut rx, stall);
    tokio::pin!(writer);
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let step = tokio::select! {
            end = &mut writer => Step::End(end),
            _ = overflow.notified() => Step::End(PeerEnd::QueueFull),
            Some(joined) = st.tasks.join_next_with_id(), if !st.tasks.is_empty() => st.handler_done(joined),
            Some(joined) = st.follow_ups.join_next_with_id(), if !st.follow_ups.is_empty() => {
                st.follow_up_done(joined.map(|(id, ())| id))
            }
            ready = afd.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => return sock_err("epoll (readable)", e),
                };
                let mut step = Step::Continue;
                let mut drained = false;
                for _ in 0..READ_BATCH {
                    match recv_frame(afd.get_ref().as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                        Err(e) if e.is_would_block() => {
                            guard.clear_ready();
                            drained = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            step = Step::End(PeerEnd::Closed);
                            break;
                        }
                        Err(e) => {
                            step = Step::End(PeerEnd::Io(e));
                            break;
                        }
                        Ok(r) if r.eof => {
                            step = Step::End(PeerEnd::Closed);
                            break;
                        }
                        Ok(r) if r.truncated => {
                            // Best effort: tell the peer why before dropping it.
                            let out = error_frame(0, ErrorCode::TooLarge, format!("frame over the {MAX_FRAME}-byte cap; dropping this connection"));
                            let _ = send_frame(afd.get_ref().as_fd(), &out.bytes, &[]);
                            step = Step::End(PeerEnd::Oversize);
                            break;
                        }
                        Ok(r) => {
                            step = st.frame(&buf[..r.len], r.fds, r.fds_truncated);
                            if matches!(step, Step::End(_)) {
                                break;
                            }
                        }
                    }
                }
                drop(guard);
                if !drained && matches!(step, Step::Continue) {
                    tokio::task::yield_now().await;
                }
                step
            }
        };
        if let Step::End(end) = step {
            // Dropping `st` aborts in-flight handlers and follow-ups; dropping `afd` closes the
            // socket.
            return end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        decode_server_frame, encode_request, seqpacket_pair, Access, ExitSummary, ServerFrame,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountOnDrop(Arc<AtomicUsize>);
    impl Drop for CountOnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Default)]
    struct TestHandler {
        cancelled: Arc<AtomicUsize>,
        gate: Arc<Notify>,
    }

    fn summary(exit: i32) -> ExitSummary {
        ExitSummary {
            exit,
            code: Some(exit),
            signal: None,
            wall_ms: 1,
            cpu_ms: 0,
            peak_mem: 0,
            oom: false,
            timeout: false,
        }
    }

    impl Handler for TestHandler {
        fn handle(
            &self,
            who: &Identity,
            req: Request,
        ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
            let who = who.clone();
            Box::pin(async move {
                match req {
                    Request::Ping {} => Response::ok(OkReply::Ping {}),
                    Request::Connect { host, .. } if host == "forever" => {
                        let _guard = CountOnDrop(self.cancelled.clone());
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    Request::Connect { host, .. } if host == "gate" => {
                        self.gate.notified().await;
                        Response::ok(OkReply::Ping {})
                    }
                    Request::Secret { name } if name == "badfds" => {
                        Response::ok(OkReply::Secret { len: 0 })
                    }
                    Request::Secret { .. } => {
                        let (r, _w) = nix::unistd::pipe().unwrap();
                        Response::ok(OkReply::Secret { len: 0 }).with_fds(vec![r])
                    }
                    Request::Exec { argv, .. } => {
                        let (r1, _) = nix::unistd::pipe().unwrap();
                        let (r2, _) = nix::unistd::pipe().unwrap();
                        let code = argv.len() as i32;
                        let cancelled = self.cancelled.clone();
                        Response::ok(OkReply::Exec {})
                            .with_fds(vec![r1, r2])
                            .with_follow_up(Box::pin(async move {
                                let _guard = CountOnDrop(cancelled);
                                if code == 0 {
                                    std::future::pending::<()>().await;
                                }
                                // Long enough for a test to send a request while it runs,
                                // also on a loaded machine.
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                Event::Exit(summary(code))
                            }))
                    }
                    Request::Send { channel, .. } if channel == "who" => {
                        Response::ok(OkReply::Send {
                            status: crate::protocol::SendStatus::Delivered,
                            dlq_id: Some(who.to_string()),
                            outbox_id: None,
                        })
                    }
                    Request::Send { .. } => panic!("test handler panics on send"),
                    Request::Open { .. } => Response::err(ErrorCode::Denied, "no"),
                    Request::Connect { .. } => Response::err(ErrorCode::Unavailable, "x"),
                    Request::Session {} => panic!("session reached the handler"),
                    Request::Auth { .. }
                    | Request::Approvals {}
                    | Request::Approve { .. }
                    | Request::Deliver { .. }
                    | Request::Inbound { .. }
                    | Request::Outbox { .. }
                    | Request::OutboxAck { .. }
                    | Request::ChannelState { .. }
                    | Request::Held {}
                    | Request::Admit { .. }
                    | Request::DropHeld { .. }
                    | Request::DeadLetters {}
                    | Request::DlqRelease { .. }
                    | Request::DlqDrop { .. }
                    | Request::AuditQuery { .. }
                    | Request::Channels {}
                    | Request::Children {}
                    | Request::Redact { .. } => {
                        Response::err(ErrorCode::Denied, "not this handler's op")
                    }
                }
            })
        }
    }

    struct Harness {
        rt: tokio::runtime::Runtime,
        server: Server,
        handler: Arc<TestHandler>,
    }

    fn harness(limits: PeerLimits) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handler = Arc::new(TestHandler::default());
        let server = Server::new(handler.clone(), limits);
        Harness {
            rt,
            server,
            handler,
        }
    }

    fn set_timeout(fd: BorrowedFd<'_>, which: rustix::net::sockopt::Timeout, d: Duration) {
        rustix::net::sockopt::set_socket_timeout(fd, which, Some(d)).unwrap();
    }

    impl Harness {
        fn peer(&self, id: u64) -> (OwnedFd, tokio::task::JoinHandle<PeerEnd>) {
            let (ours, theirs) = seqpacket_pair().unwrap();
            set_timeout(
                ours.as_fd(),
                rustix::net::sockopt::Timeout::Recv,
                Duration::from_secs(10),
            );
            let _g = self.rt.enter();
            let h = self.server.serve_peer_report(
                theirs,
                Identity {
                    id,
                    role: Role::Tool,
                    profile: format!("p{id}"),
                },
            );
            (ours, h)
        }

        fn end(&self, h: tokio::task::JoinHandle<PeerEnd>) -> PeerEnd {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), h).await })
                .expect("peer task did not end")
                .unwrap()
        }
    }

    fn send(fd: &OwnedFd, bytes: &[u8]) {
        send_frame(fd.as_fd(), bytes, &[]).unwrap();
    }

    fn req(fd: &OwnedFd, id: u64, r: &Request) {
        send(fd, &encode_request(id, r).unwrap());
    }

    /// Next frame; None at EOF. Panics on timeout (SO_RCVTIMEO).
    fn recv(fd: &OwnedFd) -> Option<(ServerFrame, Vec<OwnedFd>)> {
        let mut buf = vec![0; MAX_FRAME];
        let r = match recv_frame(fd.as_fd(), &mut buf, 0) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("recv: {e}"),
        };
        if r.eof {
            return None;
        }
        Some((decode_server_frame(&buf[..r.len]).unwrap(), r.fds))
    }

    fn reply(fd: &OwnedFd) -> (u64, Reply, usize) {
        match recv(fd) {
            Some((ServerFrame::Reply { id, reply }, fds)) => (id, reply, fds.len()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn err_code(r: &Reply) -> ErrorCode {
        match r {
            Reply::Err(b) => b.code,
            Reply::Ok(ok) => panic!("expected an error, got {ok:?}"),
        }
    }

    fn assert_alive(fd: &OwnedFd, id: u64) {
        req(fd, id, &Request::Ping {});
        assert_eq!(reply(fd), (id, Reply::Ok(OkReply::Ping {}), 0));
    }

    fn assert_eof(fd: &OwnedFd) {
        // Drain whatever was queued before the drop, then EOF.
        for _ in 0..10_000 {
            if recv(fd).is_none() {
                return;
            }
        }
        panic!("peer socket was not closed");
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<Answered>>);
    impl Observer for Seen {
        fn request_done(&self, answered: Answered) {
            lock(&self.0).push(answered);
        }
    }

    #[test]
    fn the_observer_sees_each_answered_request_with_its_outcome() {
        let mut h = harness(PeerLimits::default());
        let seen = Arc::new(Seen::default());
        h.server = h.server.clone().with_observer(seen.clone());
        let (fd, _task) = h.peer(1);
        req(&fd, 1, &Request::Ping {});
        reply(&fd);
        req(
            &fd,
            2,
            &Request::Open {
                path: "/etc/shadow".into(),
                access: Access::Read,
                workspace: None,
            },
        );
        reply(&fd);
        req(
            &fd,
            3,
            &Request::Connect {
                host: "x".into(),
                port: 1,
            },
        );
        reply(&fd);
        // `session` is the server's own: not observed.
        req(&fd, 4, &Request::Session {});
        reply(&fd);
        let seen: Vec<_> = lock(&seen.0)
            .iter()
            .map(|a| (a.op, a.outcome, a.denied))
            .collect();
        assert_eq!(
            seen,
            [
                ("ping", Outcome::Allow, false),
                ("open", Outcome::Deny, true),
                ("connect", Outcome::Error, false)
            ]
        );
    }

    #[test]
    fn outcomes_follow_the_reply() {
        let ok = || Response::ok(OkReply::Ping {});
        let err = |c| Response::err(c, "");
        assert_eq!(Outcome::of(&ok()), Outcome::Allow);
        assert_eq!(Outcome::of(&err(ErrorCode::Denied)), Outcome::Deny);
        assert_eq!(Outcome::of(&err(ErrorCode::Pending)), Outcome::Ask);
        assert_eq!(Outcome::of(&err(ErrorCode::Busy)), Outcome::Error);
        // Asked: whatever the operator answered.
        assert_eq!(Outcome::of(&ok().asked(true)), Outcome::Ask);
        assert_eq!(
            Outcome::of(&err(ErrorCode::Denied).asked(true)),
            Outcome::Ask
        );
    }

    #[test]
    fn ping_and_identity_is_the_bound_one() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(7);
        assert_alive(&a, 1);
        req(
            &a,
            2,
            &Request::Send {
                channel: "who".into(),
                recipient: "r".into(),
                body: String::new(),
                in_reply_to: None,
                key: None,
            },
        );
        assert_eq!(
            reply(&a).1,
            Reply::Ok(OkReply::Send {
                status: crate::protocol::SendStatus::Delivered,
                dlq_id: Some("tool#7(p7)".into()),
                outbox_id: None,
            })
        );
        // Claiming an identity in the request is a malformed request, not a way in.
        send(
            &a,
            br#"{"v":1,"id":3,"op":"ping","identity":{"id":1,"role":"gateway"}}"#,
        );
        let (id, r, _) = reply(&a);
        assert_eq!((id, err_code(&r)), (3, ErrorCode::BadRequest));
        drop(a);
        assert!(matches!(h.end(ha), PeerEnd::Closed));
    }

    #[test]
    fn malformed_frames_get_errors_then_drop_while_others_are_served() {
        let h = harness(PeerLimits {
            max_malformed: 3,
            ..PeerLimits::default()
        });
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        send(&a, b"not json");
        assert_eq!(reply(&a).0, 0);
        send(&a, br#"{"v":1,"id":9,"op":"format_disk"}"#);
        let (id, r, _) = reply(&a);
        assert_eq!((id, err_code(&r)), (9, ErrorCode::UnknownOp));
        send(&a, br#"{"v":2,"id":9,"op":"ping"}"#);
        assert_eq!(err_code(&reply(&a).1), ErrorCode::UnsupportedVersion);
        // still served after errors
        assert_alive(&a, 10);
        assert_alive(&b, 1);
        send(&a, b"{}");
        assert_eof(&a);
        assert!(matches!(h.end(ha), PeerEnd::Malformed));
        assert_alive(&b, 2);
    }

    #[test]
    fn oversized_frame_drops_the_peer() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        let mut big = br#"{"v":1,"id":1,"op":"ping","x":""#.to_vec();
        big.resize(MAX_FRAME + 100, b'a');
        // send_frame refuses to send it; use a raw send.
        let n = rustix::net::send(&a, &big, rustix::net::SendFlags::empty()).unwrap();
        assert_eq!(n, big.len());
        let (id, r, _) = reply(&a);
        assert_eq!((id, err_code(&r)), (0, ErrorCode::TooLarge));
        assert_eof(&a);
        assert!(matches!(h.end(ha), PeerEnd::Oversize));
        assert_alive(&b, 1);
    }

    #[test]
    fn fds_sent_with_requests_are_closed_and_refused() {
        let h = harness(PeerLimits::default());
        let (a, _ha) = h.peer(1);
        let (r, w) = nix::unistd::pipe().unwrap();
        let bytes = encode_request(4, &Request::Ping {}).unwrap();
        send_frame(a.as_fd(), &bytes, &[w.as_fd(), w.as_fd(), w.as_fd()]).unwrap();
        drop(w);
        let (id, rep, _) = reply(&a);
        assert_eq!((id, err_code(&rep)), (4, ErrorCode::BadRequest));
        // The broker kept no copy of the write end: the pipe reads EOF (not EAGAIN).
        let mut byte = [0u8; 1];
        rustix::fs::fcntl_setfl(&r, rustix::fs::OFlags::NONBLOCK).unwrap();
        let n = rustix::io::read(&r, &mut byte);
        assert_eq!(n, Ok(0), "a write end sent with the request is still open");
        assert_alive(&a, 5);
    }

    #[test]
    fn flood_gets_busy_beyond_in_flight_limit() {
        let h = harness(PeerLimits {
            max_in_flight: 2,
            ..PeerLimits::default()
        });
        let (a, _ha) = h.peer(1);
        let gate = Request::Connect {
            host: "gate".into(),
            port: 1,
        };
        for id in 1..=5 {
            req(&a, id, &gate);
        }
        let mut busy = Vec::new();
        for _ in 0..3 {
            let (id, r, _) = reply(&a);
            assert_eq!(err_code(&r), ErrorCode::Busy);
            busy.push(id);
        }
        assert_eq!(busy, vec![3, 4, 5]);
        // Same id again while in flight is refused.
        req(&a, 1, &Request::Ping {});
        let (id, r, _) = reply(&a);
        assert_eq!((id, err_code(&r)), (1, ErrorCode::BadRequest));
        h.handler.gate.notify_waiters();
        let mut done = vec![reply(&a).0, reply(&a).0];
        done.sort();
        assert_eq!(done, vec![1, 2]);
        assert_alive(&a, 6);
    }

    #[test]
    fn a_flooding_peer_does_not_starve_another() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        let a = Arc::new(a);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        // A floods: up to 100 requests outstanding (over max_in_flight: some get `busy`), as
        // fast as the broker answers; a reader thread drains the replies.
        let (wa, sa, rw) = (a.clone(), stop.clone(), received.clone());
        let writer = std::thread::spawn(move || {
            let mut id = 1u64;
            while !sa.load(Ordering::SeqCst) {
                if id - 1 - rw.load(Ordering::SeqCst) >= 100 {
                    std::thread::yield_now();
                    continue;
                }
                let bytes = encode_request(id, &Request::Ping {}).unwrap();
                if send_frame(wa.as_fd(), &bytes, &[]).is_err() {
                    break;
                }
                id += 1;
            }
        });
        let (ra, rr) = (a.clone(), received.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0; MAX_FRAME];
            while let Ok(r) = recv_frame(ra.as_fd(), &mut buf, 0) {
                if r.eof {
                    break;
                }
                rr.fetch_add(1, Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let before = received.load(Ordering::SeqCst);
        let mut worst = Duration::ZERO;
        for id in 1..=200 {
            let t = Instant::now();
            assert_alive(&b, id);
            worst = worst.max(t.elapsed());
        }
        let during = received.load(Ordering::SeqCst) - before;
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert!(
            worst < Duration::from_secs(1),
            "B's worst round trip {worst:?}"
        );
        assert!(
            during > 200,
            "A was not served meanwhile ({during} replies)"
        );
        assert!(!ha.is_finished(), "A (which reads its replies) was dropped");
        // Wakes the reader blocked in recv.
        rustix::net::shutdown(&a, rustix::net::Shutdown::Both).unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn rate_limit_refuses_over_the_bucket() {
        let h = harness(PeerLimits {
            rate: Some(RateLimit {
                per_second: 0.001,
                burst: 3,
            }),
            ..PeerLimits::default()
        });
        let (a, _ha) = h.peer(1);
        for id in 1..=3 {
            assert_alive(&a, id);
        }
        req(&a, 4, &Request::Ping {});
        assert_eq!(err_code(&reply(&a).1), ErrorCode::RateLimited);
    }

    #[test]
    fn peer_that_never_reads_is_dropped_others_served() {
        let h = harness(PeerLimits {
            max_queued: 4,
            ..PeerLimits::default()
        });
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        set_timeout(
            a.as_fd(),
            rustix::net::sockopt::Timeout::Send,
            Duration::from_millis(200),
        );
        // Flood pings without reading replies until the broker drops us (send fails) or we
        // have sent far more than the socket buffers can hold.
        let bytes = encode_request(1, &Request::Ping {}).unwrap();
        let mut sent = 0u64;
        let mut id = 1u64;
        while sent < 200_000 {
            let bytes = encode_request(id, &Request::Ping {}).unwrap_or(bytes.clone());
            match send_frame(a.as_fd(), &bytes, &[]) {
                Ok(()) => sent += 1,
                Err(_) => break,
            }
            id += 1;
            if h.rt.block_on(async { ha.is_finished() }) {
                break;
            }
        }
        let end = h.end(ha);
        assert!(
            matches!(end, PeerEnd::QueueFull | PeerEnd::WriteStalled),
            "{end:?} after {sent} frames"
        );
        assert_alive(&b, 1);
    }

    #[test]
    fn write_stall_drops_the_peer() {
        let h = harness(PeerLimits {
            max_queued: 100_000,
            write_stall: Duration::from_millis(300),
            ..PeerLimits::default()
        });
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        // Big replies fill the socket buffer fast: "who" echoes a short string, so use many
        // requests; the broker's queue is huge, so only the stall timer can drop us.
        for id in 1..=20_000u64 {
            let bytes = encode_request(id, &Request::Ping {}).unwrap();
            if send_frame(a.as_fd(), &bytes, &[]).is_err() {
                break; // dropped already
            }
            if id % 1000 == 0 && h.rt.block_on(async { ha.is_finished() }) {
                break;
            }
        }
        let end = h.end(ha);
        assert!(matches!(end, PeerEnd::WriteStalled), "{end:?}");
        assert_alive(&b, 1);
    }

    #[test]
    fn peer_death_cancels_its_in_flight_requests() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        for id in 1..=3 {
            req(
                &a,
                id,
                &Request::Connect {
                    host: "forever".into(),
                    port: 1,
                },
            );
        }
        // An exec whose exit never comes: its follow-up is pending too.
        req(
            &a,
            4,
            &Request::Exec {
                argv: vec![],
                cwd: None,
                owner: None,
                workspace: None,
            },
        );
        let (id, r, nfds) = reply(&a);
        assert_eq!((id, r, nfds), (4, Reply::Ok(OkReply::Exec {}), 2));
        assert_alive(&b, 1);
        assert_eq!(h.handler.cancelled.load(Ordering::SeqCst), 0);
        drop(a);
        assert!(matches!(h.end(ha), PeerEnd::Closed));
        // Aborted tasks are dropped by the runtime shortly after.
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.handler.cancelled.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(h.handler.cancelled.load(Ordering::SeqCst), 4);
        assert_alive(&b, 2);
    }

    #[test]
    fn aborting_the_task_closes_the_socket() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        assert_alive(&a, 1);
        ha.abort();
        assert!(h.rt.block_on(ha).unwrap_err().is_cancelled());
        assert_eof(&a);
    }

    #[test]
    fn exec_reply_fds_then_exit_event() {
        let h = harness(PeerLimits::default());
        let (a, _ha) = h.peer(1);
        req(
            &a,
            8,
            &Request::Exec {
                argv: vec!["a".into(), "b".into()],
                cwd: None,
                owner: None,
                workspace: None,
            },
        );
        assert_eq!(reply(&a), (8, Reply::Ok(OkReply::Exec {}), 2));
        // While the exec runs its id is in use.
        req(&a, 8, &Request::Ping {});
        assert_eq!(err_code(&reply(&a).1), ErrorCode::BadRequest);
        match recv(&a) {
            Some((ServerFrame::Event { id, event }, fds)) => {
                assert_eq!(id, 8);
                assert_eq!(event, Event::Exit(summary(2)));
                assert!(fds.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Once the event is out, the id is free again.
        assert_alive(&a, 8);
    }

    #[test]
    fn handler_faults_become_internal_errors() {
        let h = harness(PeerLimits::default());
        let (a, _ha) = h.peer(1);
        req(
            &a,
            1,
            &Request::Secret {
                name: "badfds".into(),
            },
        );
        assert_eq!(reply(&a).1.clone(), reply_err(ErrorCode::Internal));
        req(&a, 2, &Request::Secret { name: "ok".into() });
        assert_eq!(reply(&a), (2, Reply::Ok(OkReply::Secret { len: 0 }), 1));
        req(
            &a,
            3,
            &Request::Send {
                channel: "c".into(),
                recipient: "r".into(),
                body: "b".into(),
                in_reply_to: None,
                key: None,
            },
        );
        let (id, r, _) = reply(&a);
        assert_eq!((id, err_code(&r)), (3, ErrorCode::Internal));
        req(
            &a,
            4,
            &Request::Open {
                path: "/x".into(),
                access: Access::Read,
                workspace: None,
            },
        );
        assert_eq!(err_code(&reply(&a).1), ErrorCode::Denied);
        assert_alive(&a, 5);
    }

    fn reply_err(code: ErrorCode) -> Reply {
        Reply::err(code, "broker error: wrong number of fds")
    }

    /// `session` on `fd`: the new socket (with a receive timeout), or the error code.
    fn try_session(fd: &OwnedFd, id: u64) -> Result<OwnedFd, ErrorCode> {
        req(fd, id, &Request::Session {});
        match recv(fd) {
            Some((
                ServerFrame::Reply {
                    id: rid,
                    reply: Reply::Ok(OkReply::Session {}),
                },
                fds,
            )) => {
                assert_eq!(rid, id);
                assert_eq!(fds.len(), 1);
                let s = fds.into_iter().next().unwrap();
                set_timeout(
                    s.as_fd(),
                    rustix::net::sockopt::Timeout::Recv,
                    Duration::from_secs(10),
                );
                Ok(s)
            }
            Some((ServerFrame::Reply { id: rid, reply }, fds)) => {
                assert_eq!((rid, fds.len()), (id, 0));
                Err(err_code(&reply))
            }
            other => panic!("expected a session reply, got {other:?}"),
        }
    }

    fn session(fd: &OwnedFd, id: u64) -> OwnedFd {
        try_session(fd, id).unwrap_or_else(|code| panic!("session refused: {code}"))
    }

    fn who(fd: &OwnedFd, id: u64) -> String {
        req(
            fd,
            id,
            &Request::Send {
                channel: "who".into(),
                recipient: "r".into(),
                body: String::new(),
                in_reply_to: None,
                key: None,
            },
        );
        match reply(fd) {
            (
                rid,
                Reply::Ok(OkReply::Send {
                    dlq_id: Some(w), ..
                }),
                0,
            ) if rid == id => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_session_is_a_socket_of_its_own_with_the_same_identity() {
        let h = harness(PeerLimits::default());
        let (a, _ha) = h.peer(7);
        let (b, _hb) = h.peer(8);
        let s = session(&a, 1);
        // Same identity (the handler sees tool#7(p7) on both), whatever is asked on it.
        assert_eq!(who(&a, 2), "tool#7(p7)");
        assert_eq!(who(&s, 2), "tool#7(p7)");
        // A session of a session: same identity again.
        let s2 = session(&s, 3);
        assert_eq!(who(&s2, 1), "tool#7(p7)");
        assert_eq!(who(&b, 1), "tool#8(p8)");
        // Request ids are per socket: the same id in flight on the root and on a session
        // does not collide, and each reply comes back on the socket that asked.
        let gate = Request::Connect {
            host: "gate".into(),
            port: 1,
        };
        req(&a, 5, &gate);
        req(&s, 5, &gate);
        for fd in [&a, &s] {
            // Both are waiting at the gate: the id is in use on that socket.
            req(fd, 5, &Request::Ping {});
            let (id, r, _) = reply(fd);
            assert_eq!((id, err_code(&r)), (5, ErrorCode::BadRequest));
        }
        assert_alive(&s2, 5);
        h.handler.gate.notify_waiters();
        assert_eq!(reply(&a), (5, Reply::Ok(OkReply::Ping {}), 0));
        assert_eq!(reply(&s), (5, Reply::Ok(OkReply::Ping {}), 0));
        // Requests on a session are checked like any other: no fds, strict decoding.
        send(&s, br#"{"v":1,"id":6,"op":"session","identity":{"id":1}}"#);
        let (id, r, _) = reply(&s);
        assert_eq!((id, err_code(&r)), (6, ErrorCode::BadRequest));
        // Closing a session ends it alone.
        drop(s);
        assert_alive(&a, 7);
        assert_alive(&s2, 7);
    }

    #[test]
    fn sessions_are_capped_per_identity() {
        let h = harness(PeerLimits {
            max_sessions: 2,
            ..PeerLimits::default()
        });
        let (a, _ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        let s1 = session(&a, 1);
        let s2 = session(&s1, 1);
        // The cap counts every session of the identity, wherever it was opened from.
        assert_eq!(try_session(&a, 2).unwrap_err(), ErrorCode::Busy);
        assert_eq!(try_session(&s2, 2).unwrap_err(), ErrorCode::Busy);
        // Another identity has its own.
        let _b1 = session(&b, 1);
        let _b2 = session(&b, 2);
        // A closed session frees its place (once its task has seen the close).
        drop(s1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut id = 3;
        let s3 = loop {
            match try_session(&a, id) {
                Ok(s) => break s,
                Err(ErrorCode::Busy) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    id += 1;
                }
                Err(code) => panic!("{code}"),
            }
        };
        assert_alive(&s3, 1);
        assert_alive(&s2, 3);
    }

    #[test]
    fn closing_the_root_closes_its_sessions_and_cancels_their_requests() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        let s = session(&a, 1);
        let s2 = session(&s, 1);
        let forever = Request::Connect {
            host: "forever".into(),
            port: 1,
        };
        req(&s, 2, &forever);
        req(&s2, 2, &forever);
        // An exec whose exit never comes, on a session: its follow-up is pending.
        req(
            &s,
            3,
            &Request::Exec {
                argv: vec![],
                cwd: None,
                owner: None,
                workspace: None,
            },
        );
        assert_eq!(reply(&s), (3, Reply::Ok(OkReply::Exec {}), 2));
        assert_alive(&s2, 4);
        assert_eq!(h.handler.cancelled.load(Ordering::SeqCst), 0);
        // The child's socket closes (it exited): its sessions close with it.
        drop(a);
        assert!(matches!(h.end(ha), PeerEnd::Closed));
        assert_eof(&s);
        assert_eof(&s2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.handler.cancelled.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(h.handler.cancelled.load(Ordering::SeqCst), 3);
        assert_alive(&b, 1);
    }

    #[test]
    fn aborting_the_root_task_closes_its_sessions() {
        let h = harness(PeerLimits::default());
        let (a, ha) = h.peer(1);
        let s = session(&a, 1);
        assert_alive(&s, 1);
        ha.abort();
        assert!(h.rt.block_on(ha).unwrap_err().is_cancelled());
        assert_eof(&s);
        assert_eof(&a);
    }

    #[test]
    fn sessions_share_the_identity_rate_and_in_flight_limits() {
        let h = harness(PeerLimits {
            rate: Some(RateLimit {
                per_second: 0.001,
                burst: 3,
            }),
            ..PeerLimits::default()
        });
        let (a, _ha) = h.peer(1);
        let (b, _hb) = h.peer(2);
        // Opening sessions takes no token ...
        let s1 = session(&a, 1);
        let s2 = session(&a, 2);
        // ... the requests on them do, from the identity's one bucket.
        assert_alive(&a, 3);
        assert_alive(&s1, 1);
        assert_alive(&s2, 1);
        for (fd, id) in [(&a, 4), (&s1, 2), (&s2, 2)] {
            req(fd, id, &Request::Ping {});
            assert_eq!(err_code(&reply(fd).1), ErrorCode::RateLimited);
        }
        let s3 = session(&s1, 3);
        req(&s3, 1, &Request::Ping {});
        assert_eq!(err_code(&reply(&s3).1), ErrorCode::RateLimited);
        // Another identity has its own bucket.
        assert_alive(&b, 1);

        let h = harness(PeerLimits {
            max_in_flight: 2,
            ..PeerLimits::default()
        });
        let (a, _ha) = h.peer(1);
        let s1 = session(&a, 1);
        let s2 = session(&a, 2);
        let gate = Request::Connect {
            host: "gate".into(),
            port: 1,
        };
        req(&a, 3, &gate);
        req(&s1, 1, &gate);
        for (fd, id) in [(&a, 3), (&s1, 1)] {
            // Waiting at the gate: the id is in use on that socket.
            req(fd, id, &Request::Ping {});
            let (rid, r, _) = reply(fd);
            assert_eq!((rid, err_code(&r)), (id, ErrorCode::BadRequest));
        }
        // Two in flight for the identity: a third on yet another socket is busy.
        req(&s2, 1, &gate);
        let (id, r, _) = reply(&s2);
        assert_eq!((id, err_code(&r)), (1, ErrorCode::Busy));
        h.handler.gate.notify_waiters();
        assert_eq!(reply(&a).0, 3);
        assert_eq!(reply(&s1).0, 1);
        // Their slots are free again.
        assert_alive(&s2, 2);
    }
}
