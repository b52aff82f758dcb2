//! The broker's operations: `connect`, `open`, `secret`, `send`, `exec` (and `ping`), for
//! gateways `auth`, `approvals`, `approve`, and for inbound messages `deliver` (channel
//! adapters) and `inbound` (the gateway).
//!
//! [`Ops`] implements [`Handler`]. Every operation, for the [`Identity`] bound to the socket:
//!
//! 1. looks up the identity's profile's [`BrokerRules`] (a profile without a
//!    `[profiles.NAME.broker]` section may ask for nothing);
//! 2. decides by those rules (pure functions of `carapace_policy::broker`);
//! 3. appends an audit record (fsync'd) **before** acting — when the append fails, the request
//!    is refused with `unavailable` and nothing is done. Refusals are audited too;
//! 4. acts and replies (with the fd the child asked for).
//!
//! Secret values are held only in memory ([`SecretValue`], zeroed on drop) and never reach a
//! log, an audit record or an error message; the audit names the secret only.
//!
//! Module layout: `ops/connect.rs` (egress), `ops/files.rs` (`open`, `secret`), `ops/send.rs`
//! (channels), `ops/exec.rs` (tools through a [`Spawner`]), `ops/auth.rs` (client tokens and
//! approvals answered by a gateway), `ops/inbound.rs` (the inbound queue: `deliver`,
//! `inbound`), `ops/held.rs` (messages from senders not admitted: `held`, `admit`,
//! `drop_held`), `ops/outbox.rs` (adapter channels: `outbox`, `outbox_ack`, `channel_state`),
//! `ops/channels.rs` (admitted senders, reply addresses, ids and keys taken, channel figures),
//! `ops/operator.rs` (what an operator's console reads and does: dead letters, the audit log,
//! channels, children), `ops/operator_chat.rs` (approvals and held messages announced to a
//! channel's operator and answered from that conversation).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use carapace_policy::broker::BrokerRules;
use carapace_policy::Policy;

use crate::approvals::{
    ApprovalError, Approvals, Decision, Pending, PendingSpec, Requested, Resolution,
};
use crate::audit::{AuditDecision, AuditLog, AuditRecord, RuleRef, Who};
use crate::dlq::DeadLetters;
use crate::protocol::{ErrorCode, ExitSummary, OkReply, Request};
use crate::ratelimit::Limiter;
use crate::redact::Redactor;
use crate::server::{Handler, Identity, Response};
use crate::sync::{lock, read, write};
use carapace_sandbox::program::OpenedProgram;

mod auth;
mod channels;
mod connect;
mod exec;
mod files;
mod held;
mod inbound;
mod operator;
mod operator_chat;
mod outbox;
mod reply;
mod send;
mod workspaces;

pub use channels::{ChannelStats, RECENT_CAP};
pub use connect::{is_refused_address, resolve_checked, ConnectError};
pub use exec::resolve_program;
pub use files::{load_secret, open_beneath, sealed_memfd, validate_open_path, SecretError};
pub use held::HeldError;
pub use inbound::bad_ref;
pub use inbound::bad_sender;
pub use operator_chat::{is_operator, parse_answer, Answer, Verb, DESK_FILE};
pub use workspaces::{
    beneath, check_owner_key, check_relative_path, owner_digest, valid_workspace_name,
    GrantedWorkspace,
};

// ---------------------------------------------------------------------------------------------
// The exec seam (implemented by the supervisor).

/// A tool the broker asks the supervisor to run in a new confined child.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    /// The program, opened at the canonical path the policy decided on; an approval hashed
    /// this descriptor, and the spawner must start this file (see [`crate::program`]).
    pub program: Arc<OpenedProgram>,
    /// The full argv; `argv[0]` is `program` as a string (the canonical path, not what the
    /// child wrote), `argv[1..]` the arguments the decision was made on.
    pub argv: Vec<String>,
    /// Profile to confine it with (the deciding `[[exec]]` rule's).
    pub profile: String,
    /// Workspace to mount; None: the spawner's shared one. The broker sets it only to a
    /// directory it chose (an owner's own, or a granted one): a child cannot name host paths.
    pub workspace: Option<PathBuf>,
    /// Working directory relative to the workspace ([`check_relative_path`]); None: the
    /// profile's.
    pub cwd: Option<PathBuf>,
    /// Mount the workspace read-only whatever the profile says (a granted `ro` workspace).
    pub read_only: bool,
    /// The policy the decision was made under: the tool is confined by ITS profile, so a
    /// reload between decision and start cannot mix two policies.
    pub policy: Arc<Policy>,
}

/// A started tool: the read ends of its stdout and stderr, and a blocking wait for its end.
pub struct SpawnHandle {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Blocks until the tool (its whole sandbox) has ended; run on a blocking thread.
    pub wait: Box<dyn FnOnce() -> ExitSummary + Send>,
}

impl fmt::Debug for SpawnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnHandle")
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .finish_non_exhaustive()
    }
}

/// Why a tool could not be started (the words go to the requesting child).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpawnFailure {
    pub message: String,
}

/// Starts confined tools for the broker (the supervisor implements it; the broker knows
/// nothing of fork).
pub trait Spawner: Send + Sync {
    fn spawn(&self, req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure>;

    /// The host directory tools run in (absolute, canonical), if there is one: what
    /// `$WORKSPACE/...` rules of the policy match beneath.
    fn workspace(&self) -> Option<PathBuf> {
        None
    }

    /// The tools workspace of the owner whose key has [`owner_digest`] `digest` (32 hex
    /// digits), created if missing: absolute and canonical.
    fn owner_workspace(&self, digest: &str) -> Result<PathBuf, SpawnFailure> {
        let _ = digest;
        Err(SpawnFailure {
            message: "this broker keeps no per-owner workspaces".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The approval seam (`ask` rules).

/// An `ask` exec waiting for an operator.
#[derive(Debug, Clone)]
pub struct ApprovalQuery {
    pub who: Identity,
    /// The program, opened at its canonical path: what is hashed for the approval and what
    /// the tool is started from.
    pub program: Arc<OpenedProgram>,
    /// Full canonical argv (argv[0] = program).
    pub argv: Vec<String>,
    /// Profile the tool would run under.
    pub profile: String,
    /// The deciding rule's `why`.
    pub why: String,
}

/// A request that starts no program (an `open` under an `ask` rule) waiting for an operator.
#[derive(Debug, Clone)]
pub struct ActionQuery {
    pub who: Identity,
    /// What the request reaches (the file's path), shown as the approval's program.
    pub subject: PathBuf,
    /// The request in words, e.g. `["open", "read", "/srv/p/notes.txt"]`; an allow-always
    /// grant matches exactly these.
    pub argv: Vec<String>,
    /// The deciding rule's `why`.
    pub why: String,
}

/// An operator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalAnswer {
    Allow,
    /// Denied, timed out, or no operator: the reason for the audit and the child.
    Deny(String),
}

/// Asks an operator ([`Approvals`] implements it). The future resolves when the approval is
/// decided or times out; dropping it withdraws the request.
///
/// `pending` and `resolve` let a child whose profile says `approve = true` (a gateway relaying
/// operator-scoped clients) list and answer approvals through the broker (`approvals`,
/// `approve`); an approver that keeps nothing listable has none and resolves nothing.
pub trait Approver: Send + Sync {
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>>;

    /// Ask about a request that starts no program. An approver that cannot refuses.
    fn ask_action(
        self: Arc<Self>,
        q: ActionQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        let _ = q;
        Box::pin(async { ApprovalAnswer::Deny("no operator can be asked for this request".into()) })
    }

    /// The approvals waiting for an operator now, oldest first.
    fn pending(&self) -> Vec<Pending> {
        Vec::new()
    }

    /// Answer pending approval `id`.
    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        let _ = r;
        Err(ApprovalError::UnknownId { id })
    }

    /// Told whenever an approval starts waiting or ends (None: nothing to watch; whoever
    /// announces approvals then looks at `pending` from time to time).
    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Withdraws a pending approval when the waiting request is dropped (peer gone).
struct CancelOnDrop {
    approvals: Arc<Approvals>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.approvals.cancel(self.id);
        }
    }
}

impl Approver for Approvals {
    /// A matching allow-always grant answers at once; otherwise a pending approval is created
    /// and waited for (on a blocking thread) until the operator resolves it or it times out.
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        Box::pin(async move {
            let spec = PendingSpec {
                identity: Who::from(&q.who),
                program: q.program.path().to_path_buf(),
                argv: q.argv,
                profile: q.profile,
                cwd: PathBuf::from("/"),
            };
            let this = self.clone();
            let program = q.program;
            let requested =
                tokio::task::spawn_blocking(move || this.request_opened(spec, &program)).await;
            settle(self, requested).await
        })
    }

    /// Like [`Approver::ask`], the request identified by [`crate::approvals::action_sha256`]
    /// of its argv instead of a program's content.
    fn ask_action(
        self: Arc<Self>,
        q: ActionQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        Box::pin(async move {
            let sha = crate::approvals::action_sha256(&q.argv);
            let spec = PendingSpec {
                identity: Who::from(&q.who),
                program: q.subject,
                argv: q.argv,
                profile: q.who.profile.clone(),
                cwd: PathBuf::from("/"),
            };
            let this = self.clone();
            let requested =
                tokio::task::spawn_blocking(move || this.request_hashed(spec, sha)).await;
            settle(self, requested).await
        })
    }

    /// [`Approvals::list`].
    fn pending(&self) -> Vec<Pending> {
        self.list()
    }

    /// [`Approvals::resolve`] (an allow-always grant is persisted first).
    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        Approvals::resolve(self, id, r)
    }

    /// [`Approvals::subscribe`].
    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(Approvals::subscribe(self))
    }
}

/// The answer to a request made of [`Approvals`]: at once when a grant or an earlier answer
/// decides it, else when the operator answers or the approval times out (withdrawn if the
/// waiting future is dropped).
async fn settle(
    approvals: Arc<Approvals>,
    requested: Result<Result<Requested, ApprovalError>, tokio::task::JoinError>,
) -> ApprovalAnswer {
    let pending = match requested {
        Ok(Ok(Requested::Allowed(_))) => return ApprovalAnswer::Allow,
        Ok(Ok(Requested::Answered(d))) if d.is_allow() => return ApprovalAnswer::Allow,
        Ok(Ok(Requested::Answered(d))) => return ApprovalAnswer::Deny(d.as_str().to_string()),
        Ok(Ok(Requested::Pending(p))) => p,
        Ok(Err(e)) => return ApprovalAnswer::Deny(format!("approval not requested: {e}")),
        Err(e) => return ApprovalAnswer::Deny(format!("approval task: {e}")),
    };
    let mut guard = CancelOnDrop {
        approvals: approvals.clone(),
        id: pending.id,
        armed: true,
    };
    let deadline = pending.expires + Duration::from_millis(100);
    let res = tokio::task::spawn_blocking(move || approvals.wait(pending.id, deadline)).await;
    guard.armed = false;
    match res {
        Ok(Ok(d)) if d.is_allow() => ApprovalAnswer::Allow,
        Ok(Ok(d)) => ApprovalAnswer::Deny(d.as_str().to_string()),
        Ok(Err(e)) => ApprovalAnswer::Deny(e.to_string()),
        Err(e) => ApprovalAnswer::Deny(format!("approval task: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets in memory.

/// A secret value: zeroed when dropped, never printed.
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own buffer; the
            // volatile write only keeps the compiler from eliding the zeroing.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue({} bytes)", self.0.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration and state.

/// Knobs of the operations (defaults are sensible for production).
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// Longest a `connect` may take (per address tried).
    pub connect_timeout: Duration,
    /// Longest name resolution may take.
    pub resolve_timeout: Duration,
    /// `$CREDENTIALS_DIRECTORY` (systemd credentials), for `credential = "NAME"` secrets.
    pub credentials_dir: Option<PathBuf>,
    /// Largest secret the broker loads.
    pub max_secret_bytes: u64,
    /// Rate-limit buckets kept per channel (identities).
    pub max_rate_keys: usize,
    /// The client token store (`<state_dir>/tokens.json`) the `auth` op checks; None: `auth`
    /// is `unavailable`.
    pub token_store: Option<PathBuf>,
    /// Inbound messages kept until the gateway acknowledges them; when that many wait,
    /// `deliver` is answered `busy` (the adapter keeps the message and tries again).
    pub inbound_capacity: usize,
    /// Where the channel state lives (`inbound/`, `held/`, `outbox/`, `channels.json`); None:
    /// in memory only, lost with the broker (tests).
    pub state_dir: Option<PathBuf>,
    /// The workspaces the operator granted (`[workspaces.NAME]`).
    pub workspaces: Vec<GrantedWorkspace>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            connect_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(10),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            max_secret_bytes: 1 << 20,
            max_rate_keys: 4096,
            token_store: None,
            inbound_capacity: 1024,
            state_dir: None,
            workspaces: Vec::new(),
        }
    }
}

/// Errors building [`Ops`].
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot build the redactor over the secrets: {0}")]
    Redactor(#[from] crate::redact::RedactError),
    #[error("cannot open the channel state: {0}")]
    Spool(#[from] crate::durable::SpoolError),
    #[error("cannot open the channel state: {0}")]
    Book(#[from] channels::BookError),
}

/// A policy with everything derived from it: per-profile views, loaded secrets, redactor.
struct Loaded {
    policy: Arc<Policy>,
    views: HashMap<String, Arc<BrokerRules>>,
    /// Every `[secrets.NAME]`, loaded at start: the value, or why it could not be loaded.
    secrets: HashMap<String, Result<Arc<SecretValue>, String>>,
    /// Redacts every loaded secret value (no patterns: channel patterns apply per channel).
    redactor: Arc<Redactor>,
}

impl Loaded {
    fn new(policy: Policy, cfg: &OpsConfig) -> Result<Loaded, OpsError> {
        let views = policy
            .profile_names()
            .into_iter()
            .filter_map(|p| policy.broker_view(p).map(|v| (p.to_string(), Arc::new(v))))
            .collect();
        let mut secrets = HashMap::new();
        for spec in policy.secrets() {
            let v = files::load_secret(
                &spec.source,
                cfg.credentials_dir.as_deref(),
                cfg.max_secret_bytes,
            )
            .map(Arc::new)
            .map_err(|e| {
                tracing::warn!(secret = %spec.name, error = %e, "secret not loaded");
                e.to_string()
            });
            secrets.insert(spec.name.clone(), v);
        }
        let values: Vec<Vec<u8>> = secrets
            .values()
            .filter_map(|v| v.as_ref().ok())
            .map(|v| v.expose().to_vec())
            .collect();
        let redactor = Arc::new(Redactor::new(values, Vec::new())?);
        Ok(Loaded {
            policy: Arc::new(policy),
            views,
            secrets,
            redactor,
        })
    }
}

/// The broker's operations. Build one per broker, share it as `Arc<Ops>` with the server.
pub struct Ops {
    cfg: OpsConfig,
    loaded: RwLock<Arc<Loaded>>,
    audit: Arc<Mutex<AuditLog>>,
    dlq: Arc<DeadLetters>,
    spawner: Option<Arc<dyn Spawner>>,
    approver: Option<Arc<dyn Approver>>,
    /// Per channel: token buckets per identity id.
    channel_rates: Mutex<HashMap<String, Limiter<u64>>>,
    /// `open` rule directories, opened once (O_PATH | O_DIRECTORY).
    dirs: Mutex<HashMap<PathBuf, Arc<OwnedFd>>>,
    /// One writer per channel file at a time.
    channel_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Messages channel adapters delivered, until the gateway acknowledges them (kept through
    /// reloads; on disk with a state directory).
    inbound: Arc<inbound::InboundQueue>,
    /// Messages from senders not admitted, until an operator admits or drops them.
    held: Arc<held::HeldStore>,
    /// The outboxes of adapter channels.
    outbox: Arc<outbox::Outboxes>,
    /// Admitted senders, reply addresses, ids and keys taken, adapter states.
    book: Arc<channels::ChannelBook>,
    /// Where the `children` op reads the service's children (set by the service).
    children: RwLock<Option<ChildrenSource>>,
    /// The workspaces the operator granted now (from `cfg.workspaces`, replaced on a reload
    /// of the service's configuration).
    workspaces: RwLock<Arc<Vec<GrantedWorkspace>>>,
    /// What was announced to the channels' operators, by number.
    desk: Arc<operator_chat::Desk>,
}

/// What the service tells the broker about its children, asked anew for each `children` op.
pub type ChildrenSource = Arc<dyn Fn() -> Vec<crate::protocol::ChildSummary> + Send + Sync>;

impl fmt::Debug for Ops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ops")
            .field("cfg", &self.cfg)
            .field("spawner", &self.spawner.is_some())
            .field("approver", &self.approver.is_some())
            .finish_non_exhaustive()
    }
}

/// What a finished decision looks like to the helpers below.
pub(crate) struct Audited<'a> {
    pub op: &'a str,
    pub target: String,
    pub rule: Option<RuleRef>,
    pub decision: AuditDecision,
    pub outcome: String,
    pub detail: String,
}

impl<'a> Audited<'a> {
    /// The record of `op` on `target`: name the rule that decided ([`AuditOf::by`]), then the
    /// decision with its outcome and detail (`.allow(..)`, `.deny(..)`, `.ask(..)`,
    /// `.error(..)`). An op reads decide → record → act, each record one line.
    pub(crate) fn of(op: &'a str, target: impl Into<String>) -> AuditOf<'a> {
        AuditOf {
            op,
            target: target.into(),
            rule: None,
        }
    }

    /// A refusal decided by no rule: `op` on `target`, with the reason in `detail`.
    pub(crate) fn refused(
        op: &'a str,
        target: impl Into<String>,
        decision: AuditDecision,
        detail: impl Into<String>,
    ) -> Audited<'a> {
        Audited::of(op, target).decided(decision, "refused", detail)
    }
}

/// A record being built: what and on what, and which rule decided (see [`Audited::of`]).
#[derive(Debug)]
pub(crate) struct AuditOf<'a> {
    op: &'a str,
    target: String,
    rule: Option<RuleRef>,
}

impl<'a> AuditOf<'a> {
    /// The rule that decided (None: no rule, e.g. a refusal before any rule matched).
    pub(crate) fn by(mut self, rule: Option<RuleRef>) -> AuditOf<'a> {
        self.rule = rule;
        self
    }

    pub(crate) fn decided(
        self,
        decision: AuditDecision,
        outcome: impl Into<String>,
        detail: impl Into<String>,
    ) -> Audited<'a> {
        Audited {
            op: self.op,
            target: self.target,
            rule: self.rule,
            decision,
            outcome: outcome.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn allow(
        self,
        outcome: impl Into<String>,
        detail: impl Into<String>,
    ) -> Audited<'a> {
        self.decided(AuditDecision::Allow, outcome, detail)
    }

    pub(crate) fn deny(self, outcome: impl Into<String>, detail: impl Into<String>) -> Audited<'a> {
        self.decided(AuditDecision::Deny, outcome, detail)
    }

    pub(crate) fn ask(self, outcome: impl Into<String>, detail: impl Into<String>) -> Audited<'a> {
        self.decided(AuditDecision::Ask, outcome, detail)
    }

    pub(crate) fn error(
        self,
        outcome: impl Into<String>,
        detail: impl Into<String>,
    ) -> Audited<'a> {
        self.decided(AuditDecision::Error, outcome, detail)
    }
}

pub(crate) fn rule_ref(line: usize, why: &str) -> Option<RuleRef> {
    Some(RuleRef {
        line: u32::try_from(line).ok(),
        why: why.to_string(),
    })
}

impl Ops {
    /// Loads every secret of `policy` (failures are logged and make that secret `unavailable`;
    /// they do not stop the broker) and builds the per-profile views.
    pub fn new(
        policy: Policy,
        audit: AuditLog,
        dlq: DeadLetters,
        spawner: Option<Arc<dyn Spawner>>,
        approver: Option<Arc<dyn Approver>>,
        cfg: OpsConfig,
    ) -> Result<Ops, OpsError> {
        let loaded = Loaded::new(policy, &cfg)?;
        let dir = cfg.state_dir.as_deref();
        let spool = |name: &str| match dir {
            Some(d) => crate::durable::Spool::open(d.join(name)),
            None => Ok(crate::durable::Spool::memory()),
        };
        if let Some(d) = dir {
            crate::durable::ensure_dir(d).map_err(|source| {
                crate::durable::SpoolError::Io(crate::durable::DurableError {
                    op: "mkdir",
                    path: d.to_path_buf(),
                    source,
                })
            })?;
        }
        let book = channels::ChannelBook::open(dir)?;
        let inbound =
            inbound::InboundQueue::open(cfg.inbound_capacity, spool("inbound")?, book.acked())?;
        let held = held::HeldStore::open(spool("held")?)?;
        let (outbox, keys) = outbox::Outboxes::open(dir.map(|d| d.join("outbox")))?;
        // Ids and keys of messages still stored were taken, whether or not the journal got them.
        for m in inbound.messages() {
            if !m.id.is_empty() {
                book.remember(&m.channel, false, &m.id);
            }
        }
        for (_, m) in held.all() {
            if !m.id.is_empty() {
                book.remember(&m.channel, false, &m.id);
            }
        }
        for (channel, key) in keys {
            book.remember(&channel, true, &key);
        }
        Ok(Ops {
            workspaces: RwLock::new(Arc::new(cfg.workspaces.clone())),
            desk: Arc::new(operator_chat::Desk::open(dir)),
            inbound: Arc::new(inbound),
            held: Arc::new(held),
            outbox: Arc::new(outbox),
            book: Arc::new(book),
            cfg,
            loaded: RwLock::new(Arc::new(loaded)),
            audit: Arc::new(Mutex::new(audit)),
            dlq: Arc::new(dlq),
            spawner,
            approver,
            channel_rates: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            channel_locks: Mutex::new(HashMap::new()),
            children: RwLock::new(None),
        })
    }

    /// Replace the granted workspaces (`[workspaces.NAME]` of a reloaded configuration): the
    /// next request naming one sees the new list; tools already running keep theirs.
    pub fn set_workspaces(&self, workspaces: Vec<GrantedWorkspace>) {
        *write(&self.workspaces) = Arc::new(workspaces);
    }

    /// Where the `children` op finds the service's children (the service sets it once it
    /// has them; until then, and without a service, the list is empty).
    pub fn set_children_source(&self, source: ChildrenSource) {
        *write(&self.children) = Some(source);
    }

    /// The service's children, as its source says now.
    pub fn children(&self) -> Vec<crate::protocol::ChildSummary> {
        let source = read(&self.children).clone();
        source.map_or_else(Vec::new, |f| f())
    }

    /// Replace the policy (secrets reloaded, cached directory fds and rate buckets dropped).
    /// Requests already being handled finish under the old one. The inbound queue is kept.
    pub fn reload(&self, policy: Policy) -> Result<(), OpsError> {
        let loaded = Arc::new(Loaded::new(policy, &self.cfg)?);
        *write(&self.loaded) = loaded;
        lock(&self.dirs).clear();
        lock(&self.channel_rates).clear();
        Ok(())
    }

    fn state(&self) -> Arc<Loaded> {
        read(&self.loaded).clone()
    }

    /// The audit log's last sequence number and head hash (log it somewhere the sandbox
    /// cannot reach: truncation of whole trailing records is only detectable against it).
    pub fn audit_head(&self) -> (u64, String) {
        let g = lock(&self.audit);
        (g.last_seq(), g.head_hash().to_string())
    }

    /// The dead-letter queue.
    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dlq
    }

    /// Record an operator's action (who: role `operator`, id 0) synchronously. Blocking.
    pub fn operator_audit(
        &self,
        op: &str,
        target: String,
        decision: AuditDecision,
        outcome: String,
        detail: String,
    ) -> Result<(), String> {
        let who = Who {
            id: 0,
            role: "operator".to_string(),
            profile: String::new(),
        };
        self.audit_as(who, op, target, decision, outcome, detail)
    }

    /// Record an action of `who` synchronously. Blocking.
    pub(crate) fn audit_as(
        &self,
        who: Who,
        op: &str,
        target: String,
        decision: AuditDecision,
        outcome: String,
        detail: String,
    ) -> Result<(), String> {
        let rec = AuditRecord {
            who,
            op: op.to_string(),
            target,
            rule: None,
            decision,
            outcome,
            detail,
        };
        lock(&self.audit)
            .append(&rec)
            .map(|_| ())
            .map_err(|e| format!("the audit log cannot be written: {e}"))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.state().policy.clone()
    }

    /// The broker rules of a profile (None: it may ask for nothing).
    pub fn rules(&self, profile: &str) -> Option<Arc<BrokerRules>> {
        self.state().views.get(profile).cloned()
    }

    /// A redactor over every loaded secret value (for tool output and anything else outbound).
    pub fn redactor(&self) -> Arc<Redactor> {
        self.state().redactor.clone()
    }

    /// The loaded secret values, by name (for redactors elsewhere). Handle with care.
    pub fn secret_values(&self) -> Vec<(String, Arc<SecretValue>)> {
        self.state()
            .secrets
            .iter()
            .filter_map(|(k, v)| v.as_ref().ok().map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// Appends one record (blocking thread, fsync). Err = the record is not on disk.
    pub(crate) async fn audit(&self, who: &Identity, a: Audited<'_>) -> Result<(), String> {
        let rec = AuditRecord {
            who: Who::from(who),
            op: a.op.to_string(),
            target: a.target,
            rule: a.rule,
            decision: a.decision,
            outcome: a.outcome,
            detail: a.detail,
        };
        let logged = (
            rec.decision,
            rec.op.clone(),
            rec.target.clone(),
            rec.who.role.clone(),
            rec.who.profile.clone(),
            rec.outcome.clone(),
        );
        let log = self.audit.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut g = log
                .lock()
                .map_err(|_| "audit log lock poisoned".to_string())?;
            g.append(&rec).map(|_| ()).map_err(|e| e.to_string())
        })
        .await;
        match res {
            Ok(Ok(())) => {
                log_decision(&logged);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit append failed: denying");
                Err(e)
            }
            Err(e) => Err(format!("audit task failed: {e}")),
        }
    }

    /// Audit a refusal and build the refusal reply. `code` is what the child sees.
    pub(crate) async fn refuse(
        &self,
        who: &Identity,
        a: Audited<'_>,
        code: ErrorCode,
        message: String,
    ) -> Response {
        match self.audit(who, a).await {
            Ok(()) => Response::err(code, message),
            Err(_) => Response::err(
                ErrorCode::Unavailable,
                format!("{message} (and the audit log is unavailable)"),
            ),
        }
    }

    /// Audit an allow; on failure the reply to send instead of acting.
    pub(crate) async fn allow(&self, who: &Identity, a: Audited<'_>) -> Result<(), Response> {
        self.audit(who, a).await.map_err(|_| {
            Response::err(
                ErrorCode::Unavailable,
                "the audit log cannot be written: request refused",
            )
        })
    }

    /// The identity's rules, or the refusal to send.
    pub(crate) async fn rules_for(
        &self,
        who: &Identity,
        op: &str,
        target: &str,
    ) -> Result<Arc<BrokerRules>, Response> {
        match self.rules(&who.profile) {
            Some(r) => Ok(r),
            None => Err(self
                .refuse(
                    who,
                    Audited::of(op, target.to_string()).deny(
                        "refused",
                        format!(
                            "profile `{}` has no [profiles.{}.broker] section",
                            who.profile, who.profile
                        ),
                    ),
                    ErrorCode::Denied,
                    format!("profile `{}` may not use the broker", who.profile),
                )
                .await),
        }
    }
}

pub(crate) fn now_rfc3339() -> String {
    crate::audit::rfc3339_utc(SystemTime::now())
}

/// A printable, bounded rendering of untrusted text for audit targets and messages.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(256).flat_map(char::escape_default).collect();
    if s.chars().count() > 256 {
        out.push('…');
    }
    out
}

impl Handler for Ops {
    fn handle(
        &self,
        who: &Identity,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        let who = who.clone();
        Box::pin(async move {
            match req {
                Request::Ping {} => Response::ok(OkReply::Ping {}),
                Request::Connect { host, port } => self.connect(&who, &host, port).await,
                Request::Open {
                    path,
                    access,
                    workspace,
                } => {
                    self.open_in(&who, workspace.as_deref(), &path, access)
                        .await
                }
                Request::Secret { name } => self.secret(&who, &name).await,
                Request::Send {
                    channel,
                    recipient,
                    body,
                    in_reply_to,
                    key,
                } => {
                    self.send_with(&who, &channel, &recipient, body, in_reply_to, key)
                        .await
                }
                Request::Exec {
                    argv,
                    cwd,
                    owner,
                    workspace,
                } => self.exec_in(&who, argv, cwd, owner, workspace).await,
                Request::Auth { token_sha256 } => self.auth(&who, &token_sha256).await,
                Request::Approvals {} => self.approvals(&who).await,
                Request::Approve {
                    approval,
                    resolution,
                    by,
                } => self.approve(&who, approval, resolution, by).await,
                Request::Deliver {
                    channel,
                    sender,
                    body,
                    id,
                    conversation,
                    reply_to,
                } => {
                    let d = crate::client::DeliverArgs {
                        channel,
                        sender,
                        body,
                        id,
                        conversation,
                        reply_to,
                    };
                    self.deliver_message(&who, d).await
                }
                Request::Inbound { after, wait_ms } => self.inbound(&who, after, wait_ms).await,
                Request::Outbox { channel, wait_ms } => {
                    self.outbox_op(&who, &channel, wait_ms).await
                }
                Request::OutboxAck {
                    channel,
                    id,
                    outcome,
                } => self.outbox_ack_op(&who, &channel, &id, outcome).await,
                Request::ChannelState {
                    channel,
                    connected,
                    error,
                } => {
                    self.channel_state_op(&who, &channel, connected, error)
                        .await
                }
                Request::Held {} => self.held_op(&who).await,
                Request::Admit { id, always, by } => self.admit_op(&who, &id, always, by).await,
                Request::DropHeld { id, by } => self.drop_held_op(&who, &id, by).await,
                Request::DeadLetters {} => self.dead_letters_op(&who).await,
                Request::DlqRelease { id, by } => self.dlq_release_op(&who, &id, by).await,
                Request::DlqDrop { id, by } => self.dlq_drop_op(&who, &id, by).await,
                Request::AuditQuery {
                    audit_op,
                    decision,
                    since,
                    before_seq,
                    limit,
                } => {
                    let filter = crate::audit::query::Filter {
                        op: audit_op,
                        decision,
                        since,
                        before_seq,
                    };
                    self.audit_query_op(&who, filter, limit).await
                }
                Request::Channels {} => self.channels_op(&who).await,
                Request::Children {} => self.children_op(&who).await,
                Request::Redact { text } => self.redact_op(&who, &text).await,
                // The server answers `session` itself (a socket with this identity); a handler
                // never sees one.
                Request::Session {} => Response::err(
                    ErrorCode::Internal,
                    "broker error: session is served by the broker's server",
                ),
            }
        })
    }
}

/// Used by tests and by callers that want the path rules' directory fd cache filled eagerly.
impl Ops {
    pub(crate) fn dir_fd(&self, dir: &Path) -> Result<Arc<OwnedFd>, std::io::Error> {
        if let Some(fd) = lock(&self.dirs).get(dir) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(files::open_dir(dir)?);
        lock(&self.dirs).insert(dir.to_path_buf(), fd.clone());
        Ok(fd)
    }
}

#[cfg(test)]
mod channel_tests;
/// An audited decision in the service's log, with its fields (`decision`, `op`, `target`,
/// `role`, `profile`, `outcome`: `DECISION=deny OP=exec` in the journal): refusals as warnings,
/// questions as info, allowed requests at debug (the audit log has every one of them).
fn log_decision(l: &(AuditDecision, String, String, String, String, String)) {
    let (d, op, target, role, profile, outcome) = l;
    let decision = match d {
        AuditDecision::Allow => "allow",
        AuditDecision::Deny => "deny",
        AuditDecision::Ask => "ask",
        AuditDecision::Error => "error",
    };
    match d {
        AuditDecision::Deny | AuditDecision::Error => {
            tracing::warn!(decision, op = %op, target = %target, role = %role, profile = %profile, outcome = %outcome, "broker: {op} {target}: {decision}")
        }
        AuditDecision::Ask => {
            tracing::info!(decision, op = %op, target = %target, role = %role, profile = %profile, outcome = %outcome, "broker: {op} {target}: {decision}")
        }
        AuditDecision::Allow => {
            tracing::debug!(decision, op = %op, target = %target, role = %role, profile = %profile, outcome = %outcome, "broker: {op} {target}: {decision}")
        }
    }
}

#[cfg(test)]
mod tests;
