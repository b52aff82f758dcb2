//! The Signal adapter, through signal-cli's JSON-RPC daemon.
//!
//! signal-cli (`signal-cli --config /workspace -a ACCOUNT jsonRpc`) is a confined child of its
//! own that `carapace run` starts beside this adapter, its workspace holding the account's
//! data. The supervisor makes one socket pair for the two: the daemon's end is its stdin and
//! stdout, this adapter's end is at `$CARAPACE_LISTEN_FD` (fd 4). Both ends live as long as
//! the supervisor, so either side may restart while what is written stays in the socket.
//! The wire format is in [`wire`].
//!
//! Inbound: `receive` notifications. A data message with text is delivered with sender = the
//! source's number (`sourceNumber`, else its uuid when the number is hidden), conversation =
//! reply_to = the sender, or `group:<groupId>` in a group; id = `signal:<sourceUuid>:<timestamp>`
//! (stable: a message the daemon hands over again is a broker `duplicate`). Lines are taken
//! from the socket one at a time and each message is delivered before the next line is read,
//! so what the adapter has not handled stays in the socket for its successor. The ids of the
//! last delivered messages are kept in `<state_dir>/signal.cursor.json` and skipped when seen
//! again. Receipts, typing, syncs of our own messages and reactions are skipped with a log line;
//! attachments are delivered as a note.
//!
//! Outbound: `send` (`recipient` or `groupId`), split at [`wire::MAX_MESSAGE_UTF16`]. A
//! `RATE_LIMIT_FAILURE` (or error -5) waits its `retryAfterSeconds`; network failures and
//! daemon errors are retried by the broker; unregistered or untrusted recipients are not. A
//! message whose first pieces went out resumes at the failed piece.
//!
//! Reachability: a `version` request every `probe_interval`; an answer means the daemon is up.

pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_broker::protocol::OutboundMessage;
use carapace_broker::sync::lock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::adapter::{
    deliver, run_outbound, Backoff, Ctx, FailureKind, Outlet, RunError, ServiceError,
};
use crate::broker::BrokerApi;
use crate::cursor::CursorStore;
use crate::settings::SignalSettings;
use wire::{Frame, Received, RpcError};

/// The variable naming the socket to the daemon (the supervisor's fd 4).
pub const SOCKET_FD_ENV: &str = "CARAPACE_LISTEN_FD";
/// Delivered ids remembered against a daemon handing a message over twice.
const REMEMBERED: usize = 512;

/// Why the adapter cannot use what it was given.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("${SOCKET_FD_ENV} is not set: the supervisor hands the daemon's socket over (run me under `carapace run` with kind = \"signal\")")]
    NoSocket,
    #[error("${SOCKET_FD_ENV}={0:?} is not a descriptor number")]
    BadFd(String),
    #[error("the socket to signal-cli (fd {fd}): {source}")]
    Socket {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from signal-cli: {0}")]
    Read(#[source] std::io::Error),
    #[error("signal-cli's socket was closed (the supervisor is gone)")]
    Closed,
}

/// The delivered ids, newest last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub recent: VecDeque<String>,
}

impl Cursor {
    fn seen(&self, id: &str) -> bool {
        self.recent.iter().any(|r| r == id)
    }

    fn push(&mut self, id: String) {
        self.recent.push_back(id);
        while self.recent.len() > REMEMBERED {
            self.recent.pop_front();
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>>;

/// The JSON-RPC client over the socket: requests are written whole, answers routed by id.
#[derive(Debug)]
pub struct Rpc {
    stream: Arc<UnixStream>,
    write: tokio::sync::Mutex<()>,
    pending: Pending,
    next_id: AtomicU64,
    timeout: Duration,
}

impl Rpc {
    /// Call `method`; its result, or the failure classified.
    pub async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, ServiceError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let line = wire::request(id, method, params);
        let written = {
            let _g = self.write.lock().await;
            write_all(&self.stream, &line).await
        };
        if let Err(e) = written {
            lock(&self.pending).remove(&id);
            return Err(ServiceError::new(
                FailureKind::Unreachable,
                format!("signal-cli {method}: writing the request: {e}"),
            ));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(wire::rpc_failure(method, &e)),
            Ok(Err(_)) | Err(_) => {
                lock(&self.pending).remove(&id);
                Err(ServiceError::new(
                    FailureKind::Unreachable,
                    format!(
                        "signal-cli {method}: no answer within {}s (is the daemon running?)",
                        self.timeout.as_secs()
                    ),
                ))
            }
        }
    }

    /// Hand an answer to whoever waits for it; false when nobody does.
    fn answer(&self, id: u64, outcome: Result<Value, RpcError>) -> bool {
        match lock(&self.pending).remove(&id) {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }
}

async fn write_all(stream: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read exactly one line from the socket, leaving what follows it there: peek for the newline,
/// then take that many bytes. None at EOF. A line over [`wire::MAX_LINE`] is consumed and
/// returned cut (it fails to parse, and is reported as malformed).
pub async fn read_line(stream: &UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut peek = vec![0u8; 64 * 1024];
    loop {
        stream.readable().await?;
        let fd = stream.as_raw_fd();
        let r = stream.try_io(Interest::READABLE, || {
            // SAFETY: `fd` is the stream's open socket, borrowed for this call only.
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            rustix::net::recv(b, &mut peek[..], rustix::net::RecvFlags::PEEK)
                .map(|(n, _)| n)
                .map_err(std::io::Error::from)
        });
        let n = match r {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let take = match peek[..n].iter().position(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if n == peek.len() && peek.len() < wire::MAX_LINE => {
                peek.resize((peek.len() * 2).min(wire::MAX_LINE), 0);
                continue;
            }
            None if n == peek.len() => n,
            None => {
                // A line still being written: wait for its end.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut line = vec![0u8; take];
        let mut got = 0;
        while got < take {
            stream.readable().await?;
            match stream.try_read(&mut line[got..]) {
                Ok(0) => return Ok(None),
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        return Ok(Some(line));
    }
}

/// The sending side.
#[derive(Debug)]
pub struct Sender {
    rpc: Arc<Rpc>,
    /// Pieces already sent of a message whose later piece failed.
    progress: crate::adapter::Progress,
}

impl Outlet for Sender {
    async fn send(&self, msg: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        if !wire::valid_recipient(&msg.recipient) {
            return Err(ServiceError::new(
                FailureKind::Rejected,
                format!(
                    "{:?} is not a Signal recipient (a number, a uuid or group:<id>)",
                    crate::settings::shown(&msg.recipient)
                ),
            ));
        }
        let pieces = crate::telegram::split_message(&msg.body, wire::MAX_MESSAGE_UTF16);
        if pieces.is_empty() {
            return Err(ServiceError::new(FailureKind::Rejected, "an empty message"));
        }
        let start = self.progress.of(&msg.id);
        let mut service_id = None;
        for (i, piece) in pieces.iter().enumerate().skip(start) {
            let sent = match self
                .rpc
                .call("send", Some(wire::send_params(&msg.recipient, piece)))
                .await
            {
                Ok(result) => wire::send_outcome(&result),
                Err(e) => Err(e),
            };
            match sent {
                Ok((ts, failed)) => {
                    if !failed.is_empty() {
                        tracing::warn!(id = %msg.id, failed = %failed.join(", "), "not every group member got it");
                    }
                    service_id.get_or_insert_with(|| ts.to_string());
                    self.progress.sent(&msg.id, i + 1);
                }
                Err(mut e) => {
                    if i > 0 {
                        e.message = format!("piece {} of {}: {}", i + 1, pieces.len(), e.message);
                    }
                    if !e.retry() {
                        self.progress.forget(&msg.id);
                    }
                    return Err(e);
                }
            }
        }
        self.progress.forget(&msg.id);
        Ok(service_id)
    }
}

/// The adapter's socket from `$CARAPACE_LISTEN_FD`.
fn socket_from_env() -> Result<UnixStream, SignalError> {
    let v = std::env::var(SOCKET_FD_ENV).map_err(|_| SignalError::NoSocket)?;
    let fd: i32 = v.parse().map_err(|_| SignalError::BadFd(v.clone()))?;
    if fd < 3 {
        return Err(SignalError::BadFd(v));
    }
    let err = |source| SignalError::Socket { fd, source };
    // Check it is an open socket before owning it.
    // SAFETY: only borrowed for fstat; nothing is closed.
    let st = rustix::fs::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
        .map_err(|e| err(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(err(std::io::Error::other("not a socket")));
    }
    // SAFETY: the inherited descriptor (checked open above) is this process's alone from here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
    stream_of(owned).map_err(err)
}

/// A tokio stream over a connected Unix socket.
pub fn stream_of(fd: OwnedFd) -> std::io::Result<UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

/// The client over `stream` and its outlet.
pub fn adapter(stream: UnixStream, timeout: Duration) -> (Arc<Rpc>, Sender) {
    let rpc = Arc::new(Rpc {
        stream: Arc::new(stream),
        write: tokio::sync::Mutex::new(()),
        pending: Arc::new(Mutex::new(HashMap::new())),
        next_id: AtomicU64::new(1),
        timeout,
    });
    (
        rpc.clone(),
        Sender {
            rpc,
            progress: crate::adapter::Progress::default(),
        },
    )
}

/// The reading loop: answers to their callers, messages to the broker (each before the next
/// line is read). Returns only when the socket fails.
pub async fn run_reader<B: BrokerApi>(
    ctx: &Ctx<B>,
    rpc: &Rpc,
    store: &CursorStore,
) -> Result<(), SignalError> {
    let mut cursor: Cursor = store.load_or_warn().unwrap_or_default();
    loop {
        let line = match read_line(&rpc.stream).await {
            Ok(Some(l)) => l,
            Ok(None) => return Err(SignalError::Closed),
            Err(e) => return Err(SignalError::Read(e)),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let frame = match wire::parse_line(&line) {
            Ok(f) => f,
            Err(e) => match wire::salvage(&line) {
                Some(f) => {
                    tracing::warn!(channel = %ctx.channel, "a torn line from signal-cli (restarted mid-write?): its last frame is read");
                    f
                }
                _ => {
                    tracing::error!(channel = %ctx.channel, error = %e, bytes = line.len(), "skipped");
                    continue;
                }
            },
        };
        match frame {
            Frame::Response { id, outcome } => {
                if !rpc.answer(id, outcome) {
                    tracing::debug!(channel = %ctx.channel, id, "an answer nobody waits for (timed out)");
                }
            }
            Frame::Other(what) => tracing::debug!(channel = %ctx.channel, "{what}: skipped"),
            Frame::Received(Received::Skip(why)) => {
                tracing::debug!(channel = %ctx.channel, "{why}: skipped")
            }
            Frame::Received(Received::Message(msg)) => {
                ctx.report(true, None).await;
                if cursor.seen(&msg.id) {
                    tracing::info!(channel = %ctx.channel, id = %msg.id, "handed over again: already delivered");
                    continue;
                }
                // Err: refused for good and logged; it is not offered again.
                let _ = deliver(ctx, &msg).await;
                cursor.push(msg.id);
                if let Err(e) = store.store(&cursor) {
                    tracing::error!(channel = %ctx.channel, error = %e, "the cursor was not saved");
                }
            }
        }
    }
}

/// Ask the daemon for its version every `interval` and report whether it answers.
async fn probe<B: BrokerApi>(ctx: &Ctx<B>, rpc: &Rpc, interval: Duration) {
    let mut backoff = Backoff::new(interval);
    loop {
        match rpc.call("version", None).await {
            Ok(_) => {
                ctx.report(true, None).await;
                backoff.reset();
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                ctx.report(false, Some(e.message.clone())).await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Run the Signal adapter: the reader, the prober and the outbound loop over the daemon's
/// socket. Ends (and the supervisor restarts it) only when the socket fails.
pub async fn run<B: BrokerApi>(ctx: Arc<Ctx<B>>, s: SignalSettings) -> Result<(), RunError> {
    let stream = socket_from_env().map_err(|e| ctx.fail("signal", e))?;
    let (rpc, sender) = adapter(stream, Duration::from_millis(s.request_timeout_ms));
    let store = CursorStore::new(&ctx.state_dir, "signal");
    tokio::select! {
        r = run_reader(&ctx, &rpc, &store) => r.map_err(|e| ctx.fail("signal", e)),
        () = probe(&ctx, &rpc, Duration::from_millis(s.probe_interval_ms)) => Ok(()),
        () = run_outbound(&ctx, &sender) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
