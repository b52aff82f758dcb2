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
//! A peer's trouble never touches another peer: each has its own task, queue and limits.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::protocol::{
    decode_request, encode_event, encode_reply, recv_frame, send_frame, ErrorCode, Event, OkReply,
    Reply, Request, SocketError, MAX_FRAME,
};

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
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("reply", &self.reply)
            .field("fds", &self.fds)
            .field("follow_up", &self.follow_up.is_some())
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
        }
    }

    /// An error reply.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            reply: Reply::err(code, message),
            fds: Vec::new(),
            follow_up: None,
        }
    }

    /// Attach fds (in the order the protocol documents for the reply).
    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> Response {
        self.fds = fds;
        self
    }

    /// Attach a follow-up event.
    pub fn with_follow_up(mut self, follow_up: FollowUp) -> Response {
        self.follow_up = Some(follow_up);
        self
    }
}

/// Answers requests. Implemented by the broker's operations (`ops`); tests use their own.
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

/// A token bucket rate for one peer's requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Per-peer limits.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Requests being handled at once; more get a `busy` error.
    pub max_in_flight: usize,
    /// Outgoing frames queued for a peer; when full, the peer is dropped.
    pub max_queued: usize,
    /// Malformed frames tolerated (each gets an error reply); one more drops the peer.
    pub max_malformed: u32,
    /// Longest a queued frame may wait for the socket to become writable before the peer is
    /// dropped.
    pub write_stall: Duration,
    /// Optional request rate (token bucket); over it requests get `rate_limited`.
    pub rate: Option<RateLimit>,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_in_flight: 32,
            max_queued: 256,
            max_malformed: 16,
            write_stall: Duration::from_secs(10),
            rate: None,
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
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(handler: Arc<dyn Handler>, limits: PeerLimits) -> Self {
        Server {
            inner: Arc::new(Inner { handler, limits }),
        }
    }

    /// Serve one peer (the broker's end of a child's socketpair) on a new task. Must be called
    /// from within a tokio runtime. Aborting the handle closes the socket and cancels the
    /// peer's in-flight requests (do so when the child has exited).
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

struct Bucket {
    rate: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: RateLimit) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate.burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate.per_second).min(f64::from(self.rate.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we hold open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an int flag set on an fd we hold open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
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
    handler: Arc<dyn Handler>,
    who: Arc<Identity>,
    id: u64,
    req: Request,
    tx: mpsc::Sender<Outgoing>,
    overflow: Arc<Notify>,
) -> Option<FollowUp> {
    let Response {
        reply,
        fds,
        follow_up,
    } = handler.handle(&who, req).await;
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
    tx: mpsc::Sender<Outgoing>,
    overflow: Arc<Notify>,
    tasks: JoinSet<Option<FollowUp>>,
    follow_ups: JoinSet<()>,
    /// Request id of each running task (handler or follow-up).
    task_ids: HashMap<tokio::task::Id, u64>,
    /// Ids in use: in flight or awaiting their follow-up event.
    busy_ids: HashSet<u64>,
    malformed: u32,
    bucket: Option<Bucket>,
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
        let id = frame.id;
        if self.busy_ids.contains(&id) {
            return self.reply_error(
                id,
                ErrorCode::BadRequest,
                format!("request id {id} is already in flight"),
            );
        }
        if let Some(bucket) = &mut self.bucket {
            if !bucket.take() {
                return self.reply_error(
                    id,
                    ErrorCode::RateLimited,
                    "request rate over this identity's limit",
                );
            }
        }
        if self.tasks.len() >= self.inner.limits.max_in_flight {
            return self.reply_error(
                id,
                ErrorCode::Busy,
                format!(
                    "more than {} requests in flight",
                    self.inner.limits.max_in_flight
                ),
            );
        }
        let fut = handle_one(
            self.inner.handler.clone(),
            self.who.clone(),
            id,
            frame.request,
            self.tx.clone(),
            self.overflow.clone(),
        );
        let handle = self.tasks.spawn(fut);
        self.task_ids.insert(handle.id(), id);
        self.busy_ids.insert(id);
        Step::Continue
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
                let tx = self.tx.clone();
                let overflow = self.overflow.clone();
                let handle = self.follow_ups.spawn(async move {
                    let event = follow_up.await;
                    let out = match encode_event(id, &event) {
                        Ok(bytes) => Outgoing {
                            bytes,
                            fds: Vec::new(),
                        },
                        Err(e) => {
                            error_frame(id, ErrorCode::Internal, format!("broker error: {e}"))
                        }
                    };
                    if !queue(&tx, out) {
                        overflow.notify_one();
                    }
                });
                self.task_ids.insert(handle.id(), id);
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

async fn run_peer(inner: Arc<Inner>, fd: OwnedFd, who: Identity) -> PeerEnd {
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
        bucket: inner.limits.rate.map(Bucket::new),
        inner,
        who: Arc::new(who),
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
