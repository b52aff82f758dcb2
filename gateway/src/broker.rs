//! The gateway's door out: broker sessions over the socket it inherited (fd 3), used from async
//! code.
//!
//! The broker's client library is blocking and carries one request at a time, so the gateway
//! keeps a pool of sessions (each a private socket with the gateway's identity, see
//! docs/protocol.md "Sessions") and runs each call on tokio's blocking pool. At most
//! [`MAX_SESSIONS`] calls are in flight at once — below the broker's per-identity session and
//! in-flight caps (32), so that the broker never has to answer `busy` to the gateway; further
//! calls wait for a free session.
//!
//! Before a request takes a session it waits for a slot of the gateway's broker budget
//! ([`crate::schedule`]): the budget is shared fairly among client tokens, and the broker is
//! never sent more than it accepts.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use carapace_broker::client::{Client, ClientError, ExecStarted, SendReply};
use carapace_broker::protocol::{ExitSummary, HeldMessage, InboundMessage, PendingApproval};
use carapace_broker::sync::lock;
use carapace_broker::tokens::TokenInfo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rpc::{Kind, RpcError};
use crate::schedule::{current_key, Scheduler};
use crate::settings::BrokerRate;

/// Broker calls in flight at once (each holds one session).
pub const MAX_SESSIONS: usize = 24;

/// A pool of broker sessions.
#[derive(Debug)]
pub struct Broker {
    /// The inherited socket; None: no broker (every call is `unavailable`).
    shared: Option<OwnedFd>,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
    /// The broker budget, shared fairly by the calls' keys.
    slots: Scheduler,
}

/// A session taken from the pool with its permit; give it back with [`Broker::put`].
#[derive(Debug)]
pub struct Lease {
    client: Client,
    _permit: OwnedSemaphorePermit,
}

/// A started tool: its output pipes, and the lease to wait for its `exit` event on.
#[derive(Debug)]
pub struct StartedExec {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    id: u64,
    lease: Lease,
}

fn unavailable() -> RpcError {
    RpcError::new(
        Kind::Unavailable,
        "no broker: the gateway was not started by `carapace run`",
    )
}

fn join_error(e: tokio::task::JoinError) -> RpcError {
    RpcError::internal(format!("broker call task failed: {e}"))
}

impl Broker {
    /// Over the inherited socket `shared` (None: no broker), with no request budget.
    pub fn new(shared: Option<OwnedFd>) -> Broker {
        Broker::with_budget(shared, None)
    }

    /// Over `shared`, sending at most what `budget` allows (the broker's limit for us).
    pub fn with_budget(shared: Option<OwnedFd>, budget: Option<BrokerRate>) -> Broker {
        Broker {
            shared,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_SESSIONS)),
            slots: Scheduler::new(budget),
        }
    }

    /// Broker requests waiting for a slot of the budget now.
    pub fn waiting(&self) -> usize {
        self.slots.waiting()
    }

    pub fn is_available(&self) -> bool {
        self.shared.is_some()
    }

    /// Take a session for one request of the current task's key: wait for a slot of the
    /// budget, then for a free session (opening a new one when none is idle).
    pub async fn take(&self) -> Result<Lease, RpcError> {
        let Some(shared) = &self.shared else {
            return Err(unavailable());
        };
        self.slots.acquire(&current_key()).await?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RpcError::internal("broker pool closed"))?;
        let idle = lock(&self.idle).pop();
        let client = match idle {
            Some(c) => c,
            None => {
                let fd = shared
                    .try_clone()
                    .map_err(|e| RpcError::internal(format!("dup of the broker socket: {e}")))?;
                tokio::task::spawn_blocking(move || Client::open_session(fd.as_fd()))
                    .await
                    .map_err(join_error)?
                    .map_err(|e| RpcError::from_broker(&e))?
            }
        };
        Ok(Lease {
            client,
            _permit: permit,
        })
    }

    /// Give a session back. One that failed at the socket level is dropped instead.
    pub fn put(&self, lease: Lease, healthy: bool) {
        if healthy {
            lock(&self.idle).push(lease.client);
        }
    }

    /// Run one blocking call on a session.
    async fn call<R, F>(&self, f: F) -> Result<R, RpcError>
    where
        F: FnOnce(&mut Client) -> Result<R, ClientError> + Send + 'static,
        R: Send + 'static,
    {
        let mut lease = self.take().await?;
        let (lease, res) = tokio::task::spawn_blocking(move || {
            let r = f(&mut lease.client);
            (lease, r)
        })
        .await
        .map_err(join_error)?;
        // A refusal is an answer: the session is fine. Anything else may have left it in an
        // unknown state.
        let healthy = match &res {
            Ok(_) => true,
            Err(e) => e.code().is_some(),
        };
        self.put(lease, healthy);
        res.map_err(|e| RpcError::from_broker(&e))
    }

    /// Who holds this token (by the SHA-256 of its text), as the broker's store says, and when
    /// the question left (after its wait for a slot): the answer is at least that fresh.
    pub async fn auth(&self, token_sha256: String) -> Result<(TokenInfo, Instant), RpcError> {
        self.call(move |c| {
            let asked = Instant::now();
            c.auth(&token_sha256).map(|info| (info, asked))
        })
        .await
    }

    /// The byte ranges of `text` (one request's worth) the broker says to hide: known secret
    /// values and the profile's `redact` patterns.
    pub async fn redact_ranges(&self, text: String) -> Result<Vec<(usize, usize)>, RpcError> {
        self.call(move |c| c.redact_ranges(&text)).await
    }

    pub async fn ping(&self) -> Result<(), RpcError> {
        self.call(|c| c.ping()).await
    }

    /// `send` with the thread it answers (`in_reply_to`, an inbound message id) and an
    /// idempotency key (a second send with it is not sent again: status `duplicate`).
    pub async fn send_with(
        &self,
        channel: String,
        recipient: String,
        body: String,
        in_reply_to: Option<String>,
        key: Option<String>,
    ) -> Result<SendReply, RpcError> {
        self.call(move |c| {
            c.send_with(
                &channel,
                &recipient,
                &body,
                in_reply_to.as_deref(),
                key.as_deref(),
            )
        })
        .await
    }

    /// The inbound messages the broker holds for the operator (unknown senders), oldest first,
    /// and how many were left out of the reply.
    pub async fn held(&self) -> Result<(Vec<HeldMessage>, u64), RpcError> {
        self.call(|c| c.held()).await
    }

    /// Queue held message `id` for the agent (`always`: admit its sender for good); its seq.
    pub async fn admit(&self, id: String, always: bool, by: String) -> Result<u64, RpcError> {
        self.call(move |c| c.admit(&id, always, Some(&by))).await
    }

    /// Drop held message `id`.
    pub async fn drop_held(&self, id: String, by: String) -> Result<(), RpcError> {
        self.call(move |c| c.drop_held(&id, Some(&by))).await
    }

    /// The dead letters, oldest first.
    pub async fn dead_letters(&self) -> Result<carapace_broker::client::DeadLetterList, RpcError> {
        self.call(|c| c.dead_letters()).await
    }

    /// Deliver dead letter `id` as it stands.
    pub async fn dlq_release(&self, id: String, by: String) -> Result<(), RpcError> {
        self.call(move |c| c.dlq_release(&id, Some(&by))).await
    }

    /// Drop dead letter `id`.
    pub async fn dlq_drop(&self, id: String, by: String) -> Result<(), RpcError> {
        self.call(move |c| c.dlq_drop(&id, Some(&by))).await
    }

    /// Audit records matching `filter`, newest first, at most `limit`; whether more match.
    pub async fn audit_query(
        &self,
        filter: carapace_broker::audit::query::Filter,
        limit: u32,
    ) -> Result<(Vec<carapace_broker::audit::StoredRecord>, bool), RpcError> {
        self.call(move |c| c.audit_query(&filter, limit)).await
    }

    /// The service's children and their state.
    pub async fn children(&self) -> Result<Vec<carapace_broker::protocol::ChildSummary>, RpcError> {
        self.call(|c| c.children()).await
    }

    /// Every channel of the policy in force with its figures.
    pub async fn channels(&self) -> Result<Vec<carapace_broker::ops::ChannelStats>, RpcError> {
        self.call(|c| c.channels()).await
    }

    pub async fn approvals(&self) -> Result<Vec<PendingApproval>, RpcError> {
        self.call(|c| c.approvals()).await
    }

    pub async fn approve(
        &self,
        id: u64,
        resolution: String,
        by: String,
    ) -> Result<String, RpcError> {
        self.call(move |c| c.approve(id, &resolution, Some(&by)))
            .await
    }

    /// Messages channel adapters delivered after `after` (acknowledging those up to it),
    /// waiting up to `wait_ms` for one; and the cursor to read on from.
    pub async fn inbound(
        &self,
        after: u64,
        wait_ms: u64,
    ) -> Result<(Vec<InboundMessage>, u64), RpcError> {
        self.call(move |c| c.inbound(after, wait_ms)).await
    }

    /// A connected TCP socket to `host:port`, if the policy's egress allowlist names it.
    pub async fn connect(&self, host: String, port: u16) -> Result<OwnedFd, RpcError> {
        self.call(move |c| c.connect(&host, port).map(|(fd, _)| fd))
            .await
    }

    /// A secret's bytes (read from the sealed memfd the broker hands over).
    pub async fn secret(&self, name: String) -> Result<Vec<u8>, RpcError> {
        let (fd, len) = self.call(move |c| c.secret(&name)).await?;
        read_memfd(&fd, len).map_err(|e| RpcError::internal(format!("reading the secret: {e}")))
    }

    /// Start a tool (waits through an `ask` until it is decided).
    /// `open` of `path` (relative) in granted workspace `workspace`: the broker's `open` rules
    /// decide (allow, ask: wait for an operator, deny).
    pub async fn open_in(
        &self,
        workspace: String,
        path: String,
        access: carapace_broker::protocol::Access,
    ) -> Result<std::fs::File, RpcError> {
        self.call(move |c| c.open_in(Some(&workspace), &path, access))
            .await
    }

    pub async fn exec(
        &self,
        argv: Vec<String>,
        cwd: Option<String>,
    ) -> Result<StartedExec, RpcError> {
        self.exec_with(carapace_broker::client::ExecOptions {
            argv,
            cwd,
            ..Default::default()
        })
        .await
    }

    /// `exec` with its workspace options (owner, granted workspace, cwd).
    pub async fn exec_with(
        &self,
        o: carapace_broker::client::ExecOptions,
    ) -> Result<StartedExec, RpcError> {
        let mut lease = self.take().await?;
        let (lease, res) = tokio::task::spawn_blocking(move || {
            let r = lease.client.exec_with(o);
            (lease, r)
        })
        .await
        .map_err(join_error)?;
        match res {
            Ok(ExecStarted { id, stdout, stderr }) => Ok(StartedExec {
                stdout,
                stderr,
                id,
                lease,
            }),
            Err(e) => {
                let healthy = e.code().is_some();
                self.put(lease, healthy);
                Err(RpcError::from_broker(&e))
            }
        }
    }
}

impl StartedExec {
    /// The output pipes (read them to their end) and the waiter for the `exit` event.
    pub fn split(self) -> (OwnedFd, OwnedFd, ExecWaiter) {
        (
            self.stdout,
            self.stderr,
            ExecWaiter {
                id: self.id,
                lease: self.lease,
            },
        )
    }
}

/// The half of a started tool that waits for its end.
#[derive(Debug)]
pub struct ExecWaiter {
    id: u64,
    lease: Lease,
}

impl ExecWaiter {
    /// Wait for the `exit` event (on a blocking thread) and give the session back.
    pub async fn wait(self, broker: &Broker) -> Result<ExitSummary, RpcError> {
        let ExecWaiter { id, mut lease } = self;
        let (lease, res) = tokio::task::spawn_blocking(move || {
            let r = lease.client.wait_exit(id);
            (lease, r)
        })
        .await
        .map_err(join_error)?;
        broker.put(lease, res.is_ok());
        res.map_err(|e| RpcError::from_broker(&e))
    }
}

/// Read `len` bytes of a sealed memfd from offset 0 (pread: its file offset is shared).
fn read_memfd(fd: &OwnedFd, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("secret too large"))?;
    let file = std::fs::File::from(fd.try_clone()?);
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
