//! The supervisor's side of the broker: the state directory, the tokio runtime that serves a
//! child's broker socket while `carapace exec` waits for it, and spawning the tools a child asks
//! for (`exec`) as NEW confined children, through exactly the spawn path of `carapace exec`.
//!
//! The broker crate (`carapace_broker`) knows nothing of processes; it decides, audits and
//! talks the protocol. This module gives it processes:
//!
//! - [`spawn_tool`]: compile the requested profile and start it through the sandbox's one run
//!   path ([`carapace_sandbox::run`]: its own cgroup, the launch prepared, the child spawned),
//!   with stdin `/dev/null` and stdout/stderr as pipes whose read ends are handed back, and (if
//!   that profile has a broker section) a broker socket of its own.
//!   Each tool gets a dedicated thread that spawns it and then waits for it: the child's
//!   `PR_SET_PDEATHSIG` is tied to the thread that created it, so that thread must outlive it,
//!   and with `--run-as auto` the thread's id (a pid number no other live task has) gives the
//!   tool a host uid of its own (`AUTO_BASE + tid`), distinct from its parent sandbox's.
//!   The tools still running when the broker shuts down (their child is gone) are killed
//!   through pidfds and their cgroups removed ([`ToolRegistry::kill_all`]).
//! - [`SupervisorSpawner`]: [`spawn_tool`] as the broker's `Spawner`; a brokered tool's socket
//!   is served with a new identity (role `tool`, its profile).
//! - [`FileApprover`]: `ask` approvals offered to the operator as files in
//!   `<state>/pending/` and answered by `carapace approvals allow|deny` (for `carapace exec`,
//!   which has no control socket).
//! - [`BrokerHost`]: opens the state (audit log, approvals, dead letters), builds `Ops` and runs
//!   the tokio runtime (two workers) that serves the sockets, one identity per socket, with the
//!   per-peer limits of its profile.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use carapace_broker::approvals::{
    ApprovalError, Approvals, Decision, Pending, PendingSpec, Requested, Resolution,
};
use carapace_broker::audit::AuditLog;
use carapace_broker::dlq::DeadLetters;
use carapace_broker::durable::write_atomic;
use carapace_broker::ops::{
    ApprovalAnswer, ApprovalQuery, Approver, Ops, OpsConfig, SpawnFailure, SpawnHandle,
    SpawnRequest, Spawner,
};
use carapace_broker::protocol::ExitSummary;
use carapace_broker::server::{Handler, Identity, PeerLimits, RateLimit, Role, Server};
use carapace_broker::sync::{lock, read, write};
use carapace_policy::{Policy, Target};
use carapace_sandbox::program::OpenedProgram;

use carapace_sandbox::cgroup;
use carapace_sandbox::fds::Pipe;
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::report::{ExitReport, EXIT_SETUP};
use carapace_sandbox::run::{self, Limits, Run};
use carapace_sandbox::spawn::{ChildIo, LaunchOptions};
use carapace_sandbox::Privilege;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BrokerHostError {
    #[error("{syscall} {}: {source}", path.display())]
    Io {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {}: not a directory (symbolic links are refused)",
        path.display()
    )]
    StateDirNotDir { path: PathBuf },
    #[error("state directory {}: owned by uid {uid}, not by us ({me})", path.display())]
    StateDirNotOurs { path: PathBuf, uid: u32, me: u32 },
    #[error(
        "state directory {}: writable by group or others (mode {mode:o}); make it 0700",
        path.display()
    )]
    StateDirWritable { path: PathBuf, mode: u32 },
    #[error("cannot start the broker's runtime: {source}")]
    Runtime {
        #[source]
        source: io::Error,
    },
    #[error("socketpair: {0}")]
    Socket(#[source] carapace_broker::protocol::SocketError),
    /// A pipe for a child's stdout or stderr.
    #[error(transparent)]
    Pipe(#[from] carapace_sandbox::fds::FdError),
    #[error("state directory {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: carapace_broker::audit::AuditError,
    },
    #[error("state directory {}: {source}", path.display())]
    DeadLetters {
        path: PathBuf,
        #[source]
        source: carapace_broker::dlq::DlqError,
    },
    #[error("state directory {}: {source}", path.display())]
    Approvals {
        path: PathBuf,
        #[source]
        source: ApprovalError,
    },
    /// The operations (the policy's secrets, the spools of the state directory).
    #[error("state directory {}: {source}", path.display())]
    Ops {
        path: PathBuf,
        #[source]
        source: carapace_broker::ops::OpsError,
    },
    #[error("the new policy cannot be put in force: {source}")]
    Reload {
        #[source]
        source: carapace_broker::ops::OpsError,
    },
}

/// Errors of starting a tool for the broker ([`spawn_tool`]).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("profile `{profile}` cannot run on this kernel: {source}")]
    Compile {
        profile: String,
        #[source]
        source: carapace_policy::Diagnostics,
    },
    #[error(transparent)]
    Fds(#[from] BrokerHostError),
    #[error(transparent)]
    Spawn(#[from] carapace_sandbox::spawn::SpawnError),
    #[error("cannot start a thread for the tool: {source}")]
    Thread {
        #[source]
        source: io::Error,
    },
    #[error("the tool's thread ended without starting it")]
    ThreadEnded,
}

/// Default state directory when running as root.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/carapace";

/// The broker's files beneath the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// Create `root` (and its parents) if missing, mode 0700, owned by us; an existing
    /// directory must be a real directory (not a link) owned by us and not writable by others.
    pub fn open(root: &Path) -> Result<StateDir, BrokerHostError> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        let err = |syscall, source| BrokerHostError::Io {
            syscall,
            path: root.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(|e| err("mkdir", e))?;
                // The umask may have narrowed it further; never widened. Make it exactly 0700.
                std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| err("chmod", e))?;
            }
            Err(e) => return Err(err("lstat", e)),
            Ok(m) => {
                let path = root.to_path_buf();
                if !m.file_type().is_dir() {
                    return Err(BrokerHostError::StateDirNotDir { path });
                }
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if m.uid() != me {
                    return Err(BrokerHostError::StateDirNotOurs {
                        path,
                        uid: m.uid(),
                        me,
                    });
                }
                if m.mode() & 0o022 != 0 {
                    return Err(BrokerHostError::StateDirWritable {
                        path,
                        mode: m.mode() & 0o7777,
                    });
                }
            }
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join("audit.log")
    }

    pub fn dlq(&self) -> PathBuf {
        self.root.join("dlq")
    }

    /// Pending approvals offered to the operator (see [`FileApprover`]).
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
}

/// The broker's summary of an exit report.
pub fn exit_summary(r: &ExitReport) -> ExitSummary {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    ExitSummary {
        exit: r.exit_code(),
        code: r.code,
        signal: r.signal,
        wall_ms: ms(r.wall),
        cpu_ms: ms(r.cpu),
        peak_mem: r.peak_mem,
        oom: r.oom_killed,
        timeout: r.timed_out,
    }
}

/// A report for a tool that could not be started or waited for (exit 126).
fn setup_failure() -> ExitReport {
    ExitReport {
        code: Some(EXIT_SETUP),
        signal: None,
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        peak_mem: 0,
        oom_killed: false,
        timed_out: false,
    }
}

/// What every tool spawned for the broker shares.
#[derive(Debug)]
pub struct ToolContext {
    /// The policy at start. A tool is compiled from the policy its request was decided under
    /// ([`SpawnRequest::policy`]), which after a reload is a newer one.
    pub policy: Arc<Policy>,
    pub target: Target,
    /// Root or rootless, decided once when the supervisor started.
    pub privilege: Privilege,
    /// `Fixed` ids are used as given; `Auto` gives each tool `AUTO_BASE + tid` of its thread.
    pub run_as: RunAs,
    /// The supervisor's environment, the source of each profile's `env.pass`.
    pub env: Vec<(OsString, OsString)>,
    /// Workspace used when a request names none.
    pub workspace: Option<PathBuf>,
    /// The tools running now (killed when the broker shuts down).
    pub live: ToolRegistry,
}

/// The tools started for the broker that are still running: their pidfds (signalling through
/// a pidfd cannot hit a recycled pid) and their threads.
#[derive(Debug, Default)]
pub struct ToolRegistry {
    pidfds: std::sync::Mutex<Vec<(u64, OwnedFd)>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    next: AtomicU64,
    closed: AtomicBool,
}

fn pidfd_kill(fd: &OwnedFd) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: pidfd_send_signal on a pidfd we own; harmless (ESRCH) once the process is gone.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
}

impl ToolRegistry {
    /// Track the tool whose sandbox init is `pid` (our child, not yet reaped). None when the
    /// registry is closed: the tool was killed at once.
    fn register(&self, pid: libc::pid_t) -> Option<u64> {
        // SAFETY: pidfd_open on our own unreaped child; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if fd < 0 {
            return None;
        }
        // SAFETY: pidfd_open succeeded: the fd is ours alone.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let mut v = lock(&self.pidfds);
        if self.closed.load(Ordering::SeqCst) {
            pidfd_kill(&fd);
            return None;
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        v.push((key, fd));
        Some(key)
    }

    fn deregister(&self, key: u64) {
        lock(&self.pidfds).retain(|(k, _)| *k != key);
    }

    fn add_thread(&self, t: std::thread::JoinHandle<()>) {
        let mut v = lock(&self.threads);
        v.retain(|t| !t.is_finished());
        v.push(t);
    }

    /// Refuse new tools, kill every running one, and wait (up to `grace`) for their threads to
    /// reap them and remove their cgroups. Returns how many were killed.
    pub fn kill_all(&self, grace: Duration) -> usize {
        let n = {
            let v = lock(&self.pidfds);
            self.closed.store(true, Ordering::SeqCst);
            for (_, fd) in v.iter() {
                pidfd_kill(fd);
            }
            v.len()
        };
        let deadline = std::time::Instant::now() + grace;
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        n
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Rootless without a usable delegated cgroup: say so once in the log, with the rlimits that
/// stand in for the cgroup limits.
pub fn say_limits_once(limits: &Limits) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if let Limits::Rlimits { why, added } = limits {
        if !SAID.swap(true, Ordering::SeqCst) {
            let words: Vec<String> = added
                .iter()
                .map(carapace_sandbox::rlimits::fallback_words)
                .collect();
            tracing::warn!(
                "{} ({}; {})",
                cgroup::NO_CGROUP_LINE.trim_start_matches("carapace: "),
                crate::errors::error_chain(why),
                words.join(", ")
            );
        }
    }
}

/// The descriptors a confined child gets at 0..=3: stdin `/dev/null`, stdout and stderr pipes
/// whose read ends the supervisor keeps, and (brokered) a broker socketpair.
#[derive(Debug)]
pub struct ChildFds {
    null: std::fs::File,
    out: Pipe,
    err: Pipe,
    pair: Option<(OwnedFd, OwnedFd)>,
}

/// The supervisor's ends once the child is started: the read ends of its stdout and stderr,
/// and its own end of the broker socket.
pub type ParentEnds = (OwnedFd, OwnedFd, Option<OwnedFd>);

impl ChildFds {
    pub fn new(brokered: bool) -> Result<ChildFds, BrokerHostError> {
        let out = Pipe::new("child stdout")?;
        let err = Pipe::new("child stderr")?;
        let null = std::fs::File::open("/dev/null").map_err(|source| BrokerHostError::Io {
            syscall: "open",
            path: PathBuf::from("/dev/null"),
            source,
        })?;
        let pair = if brokered {
            Some(carapace_broker::protocol::seqpacket_pair().map_err(BrokerHostError::Socket)?)
        } else {
            None
        };
        Ok(ChildFds {
            null,
            out,
            err,
            pair,
        })
    }

    /// What `Launch::spawn_with` places in the child (the listener, if any, at fd 4).
    pub fn io<'a>(&'a self, listener: Option<std::os::fd::BorrowedFd<'a>>) -> ChildIo<'a> {
        ChildIo {
            stdin: Some(self.null.as_fd()),
            stdout: Some(self.out.write.as_fd()),
            stderr: Some(self.err.write.as_fd()),
            broker: self.pair.as_ref().map(|(_, theirs)| theirs.as_fd()),
            listener,
        }
    }

    /// After the spawn: close the child's ends here (so a reader sees EOF when the child is
    /// gone) and keep ours.
    pub fn into_parent_ends(self) -> ParentEnds {
        (
            self.out.read,
            self.err.read,
            self.pair.map(|(mine, _theirs)| mine),
        )
    }
}

/// A tool started for the broker.
pub struct ToolRun {
    /// Read ends of the tool's stdout and stderr pipes.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The broker's end of the tool's own broker socket, when its profile has a broker section.
    pub broker: Option<OwnedFd>,
    /// The profile it runs under.
    pub profile: String,
    /// Blocks until the tool has exited and its cgroup is gone; its exit report.
    pub wait: Box<dyn FnOnce() -> ExitReport + Send>,
}

impl std::fmt::Debug for ToolRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRun")
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("broker", &self.broker)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

type Started = Result<(OwnedFd, OwnedFd, Option<OwnedFd>), ToolError>;

/// Start `program` (opened at its canonical host path, already allowed by the policy for
/// `profile`; this very file is started, see [`carapace_sandbox::spawn`]) with
/// `argv0` and `args` confined in `profile`, exactly as `carapace exec` would, in a cgroup of
/// its own. Returns once the program has exec'd (or failed to start).
pub fn spawn_tool(
    ctx: &Arc<ToolContext>,
    policy: Arc<Policy>,
    program: Arc<OpenedProgram>,
    argv0: &str,
    args: &[String],
    profile: &str,
    workspace: Option<&Path>,
) -> Result<ToolRun, ToolError> {
    let (started_tx, started_rx) = mpsc::channel::<Started>();
    let (done_tx, done_rx) = mpsc::channel::<ExitReport>();
    let outer = ctx;
    let ctx = ctx.clone();
    let argv0 = OsString::from(argv0);
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let profile_s = profile.to_string();
    let workspace = workspace.map(Path::to_path_buf).or(ctx.workspace.clone());
    if ctx.live.is_closed() {
        return Err(ToolError::ShuttingDown);
    }
    let thread = std::thread::Builder::new()
        .name("carapace-tool".into())
        .spawn(move || {
            let plan = match policy.compile(&profile_s, &ctx.target) {
                Ok(p) => p,
                Err(source) => {
                    let _ = started_tx.send(Err(ToolError::Compile {
                        profile: profile_s,
                        source,
                    }));
                    return;
                }
            };
            let brokered = policy.broker_view(&profile_s).is_some();
            let fds = match ChildFds::new(brokered) {
                Ok(f) => f,
                Err(e) => {
                    let _ = started_tx.send(Err(e.into()));
                    return;
                }
            };
            let run = Run {
                name: "tool".to_string(),
                landlock_abi: ctx.target.landlock_abi,
                options: LaunchOptions {
                    program,
                    argv0,
                    args,
                    workspace,
                    privilege: ctx.privilege,
                    run_as: ctx.run_as,
                    env: ctx.env.clone(),
                    broker: brokered,
                    listener: false,
                    supervisor_env: Vec::new(),
                },
            };
            let started = match run::start(plan, &run, fds.io(None)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = started_tx.send(Err(e.into()));
                    return;
                }
            };
            say_limits_once(started.limits());
            let (out_read, err_read, mine) = fds.into_parent_ends();
            let key = ctx.live.register(started.pid());
            let _ = started_tx.send(Ok((out_read, err_read, mine)));
            let mut ended = started.wait();
            if let Some(k) = key {
                ctx.live.deregister(k);
            }
            if let Err(e) = ended.remove_cgroup() {
                tracing::warn!(
                    "removing a tool's cgroup: {}",
                    crate::errors::error_chain(&e)
                );
            }
            let report = ended.report.unwrap_or_else(|e| {
                tracing::warn!("waiting for a tool: {}", crate::errors::error_chain(&e));
                setup_failure()
            });
            // A termination signal meant for the supervisor may have been taken by this
            // thread's wait (which unblocks them) instead of the main thread's: pass it on, so
            // that the main wait kills the main sandbox too.
            if let Some(sig) = carapace_sandbox::spawn::interrupted() {
                // SAFETY: signalling our own process.
                unsafe { libc::kill(libc::getpid(), sig) };
            }
            let _ = done_tx.send(report);
        })
        .map_err(|source| ToolError::Thread { source })?;
    outer.live.add_thread(thread);
    let (stdout, stderr, broker) = started_rx.recv().map_err(|_| ToolError::ThreadEnded)??;
    Ok(ToolRun {
        stdout,
        stderr,
        broker,
        profile: profile.to_string(),
        wait: Box::new(move || done_rx.recv().unwrap_or_else(|_| setup_failure())),
    })
}

/// Identities are numbered for the life of the supervisor process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh identity for a child about to be spawned.
pub fn new_identity(role: Role, profile: &str) -> Identity {
    Identity {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        role,
        profile: profile.to_string(),
    }
}

/// The per-peer limits for a profile: the defaults, with the profile's request rate.
pub fn peer_limits(policy: &Policy, profile: &str) -> PeerLimits {
    let mut limits = PeerLimits::default();
    if let Some(rate) = policy.broker_view(profile).and_then(|b| b.rate) {
        limits.rate = Some(RateLimit {
            per_second: f64::from(rate.requests_per_second),
            burst: rate.burst,
        });
    }
    limits
}

/// The runtime serving broker sockets while the supervisor waits for its child.
#[derive(Debug)]
pub struct BrokerHost {
    runtime: tokio::runtime::Runtime,
    peers: PeerServer,
    /// The operations (audit, approvals, dead letters), for the supervisor's own use.
    pub ops: Arc<Ops>,
    pub approvals: Arc<Approvals>,
    /// Why each waiting approval asks (the deciding rule's `why`), for the operator.
    pub reasons: ApprovalReasons,
    tools: Arc<ToolContext>,
}

/// Serves broker sockets on a [`BrokerHost`]'s runtime (cheap to clone). The handler is set
/// once the operations exist (they need a spawner, which needs this to serve the sockets of
/// the tools it starts).
#[derive(Clone)]
pub struct PeerServer {
    handle: tokio::runtime::Handle,
    handler: Arc<OnceLock<Arc<dyn Handler>>>,
    /// The policy in force (per-peer limits come from its profiles); replaced on reload.
    policy: Arc<std::sync::RwLock<Arc<Policy>>>,
}

impl std::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer")
            .field("handler", &self.handler.get().is_some())
            .finish_non_exhaustive()
    }
}

impl PeerServer {
    /// Serve `fd` as `who` (with the per-peer limits of its profile) until the peer closes it
    /// or the host shuts down. None when no handler is set yet (the fd is then closed).
    pub fn serve(&self, fd: OwnedFd, who: Identity) -> Option<tokio::task::JoinHandle<()>> {
        let handler = self.handler.get()?.clone();
        let policy = read(&self.policy).clone();
        let server = Server::new(handler, peer_limits(&policy, &who.profile));
        let _guard = self.handle.enter();
        Some(server.serve_peer(fd, who))
    }
}

/// How long an `ask` waits for the operator by default before it is denied.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything [`BrokerHost::start`] needs.
#[derive(Debug)]
pub struct BrokerSetup {
    pub policy: Policy,
    pub state: StateDir,
    pub tools: ToolContext,
    pub approval_timeout: Duration,
    /// The gateway's client tokens (`<state>/tokens.json`) for the `auth` op; None: `auth` is
    /// `unavailable` (one-shot `carapace exec` runs serve no gateway).
    pub token_store: Option<PathBuf>,
}

impl BrokerHost {
    /// Open the state (audit log, approvals, dead letters), build the operations with this
    /// supervisor as their spawner and the state directory's pending files as the operator's
    /// channel, and start a runtime (two workers) to serve sockets on.
    pub fn start(setup: BrokerSetup) -> Result<BrokerHost, BrokerHostError> {
        BrokerHost::start_with(setup, OperatorChannel::Files)
    }

    /// [`BrokerHost::start`] with the operator's channel for `ask` approvals chosen.
    pub fn start_with(
        setup: BrokerSetup,
        channel: OperatorChannel,
    ) -> Result<BrokerHost, BrokerHostError> {
        let root = setup.state.root.clone();
        let audit =
            AuditLog::open(setup.state.audit_log()).map_err(|source| BrokerHostError::Audit {
                path: root.clone(),
                source,
            })?;
        let dlq = DeadLetters::open(setup.state.dlq()).map_err(|source| {
            BrokerHostError::DeadLetters {
                path: root.clone(),
                source,
            }
        })?;
        let approvals = Arc::new(
            Approvals::open(&setup.state.root, setup.approval_timeout).map_err(|source| {
                BrokerHostError::Approvals {
                    path: root.clone(),
                    source,
                }
            })?,
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("carapace-broker")
            .enable_all()
            .build()
            .map_err(|source| BrokerHostError::Runtime { source })?;
        let peers = PeerServer {
            handle: runtime.handle().clone(),
            handler: Arc::new(OnceLock::new()),
            policy: Arc::new(std::sync::RwLock::new(Arc::new(setup.policy.clone()))),
        };
        let tools = Arc::new(setup.tools);
        let spawner = Arc::new(SupervisorSpawner {
            ctx: tools.clone(),
            peers: peers.clone(),
        });
        let reasons = ApprovalReasons::default();
        let approver: Arc<dyn Approver> = match channel {
            OperatorChannel::Files => Arc::new(FileApprover {
                approvals: approvals.clone(),
                pending_dir: setup.state.pending(),
            }),
            OperatorChannel::Control => Arc::new(LoggedApprover {
                approvals: approvals.clone(),
                reasons: reasons.clone(),
            }),
        };
        let ops = Arc::new(
            Ops::new(
                setup.policy,
                audit,
                dlq,
                Some(spawner),
                Some(approver),
                OpsConfig {
                    token_store: setup.token_store,
                    // The service's channel state survives its restarts; a one-shot
                    // `carapace exec` (several may share the state directory) keeps it in
                    // memory.
                    state_dir: (channel == OperatorChannel::Control)
                        .then(|| setup.state.root.clone()),
                    ..OpsConfig::default()
                },
            )
            .map_err(|source| BrokerHostError::Ops { path: root, source })?,
        );
        let handler: Arc<dyn Handler> = ops.clone();
        let _ = peers.handler.set(handler);
        Ok(BrokerHost {
            runtime,
            peers,
            ops,
            approvals,
            reasons,
            tools,
        })
    }

    /// A handle that serves sockets on this host's runtime.
    pub fn peers(&self) -> PeerServer {
        self.peers.clone()
    }

    /// The runtime the sockets are served on (the service runs its control socket there too).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// The tools running for the broker now.
    pub fn tools(&self) -> &ToolRegistry {
        &self.tools.live
    }

    /// Put `policy` in force for new requests and new peers (secrets reloaded). Requests being
    /// handled finish under the old one. On error nothing changes.
    pub fn reload(&self, policy: Policy) -> Result<(), BrokerHostError> {
        let shared = Arc::new(policy.clone());
        self.ops
            .reload(policy)
            .map_err(|source| BrokerHostError::Reload { source })?;
        *write(&self.peers.policy) = shared;
        Ok(())
    }

    /// Stop serving: abort every peer task (pending approvals are withdrawn), give blocking
    /// work a moment to finish, then kill the tools still running for children that are gone
    /// and wait for their sandboxes to be reaped and their cgroups removed.
    pub fn shutdown(self) {
        self.runtime.shutdown_timeout(Duration::from_millis(500));
        let n = self.tools.live.kill_all(Duration::from_secs(5));
        if n > 0 {
            tracing::info!("killed {n} tool(s) still running for the broker");
        }
    }
}

/// Where `ask` approvals are offered to the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorChannel {
    /// Files in `<state>/pending/`, answered by `carapace approvals` (one-shot `carapace exec`).
    Files,
    /// In memory, listed and answered through the control socket (`carapace run`).
    Control,
}

/// The deciding rules' reasons of the approvals waiting now, by (asking identity, argv): the
/// broker's pending approval does not keep the rule, the operator wants to see why it asks.
pub type ApprovalReasons =
    Arc<std::sync::Mutex<std::collections::HashMap<(u64, Vec<String>), String>>>;

/// The in-memory approvals, with a log line when one starts waiting (the operator sees it in
/// the journal and answers with `carapace approvals allow|deny ID`), and the rule's reason
/// kept for `carapace approvals list`.
#[derive(Debug)]
struct LoggedApprover {
    approvals: Arc<Approvals>,
    reasons: ApprovalReasons,
}

impl Approver for LoggedApprover {
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        tracing::warn!(
            who = %q.who,
            profile = %q.profile,
            "approval requested: {}; see `carapace approvals list`",
            q.argv.join(" ")
        );
        let key = (q.who.id, q.argv.clone());
        // A poisoned map only loses reasons shown to the operator.
        lock(&self.reasons).insert(key.clone(), q.why.clone());
        let asked = self.approvals.clone().ask(q);
        Box::pin(async move {
            struct Forget(ApprovalReasons, (u64, Vec<String>));
            impl Drop for Forget {
                fn drop(&mut self) {
                    lock(&self.0).remove(&self.1);
                }
            }
            let _forget = Forget(self.reasons.clone(), key);
            asked.await
        })
    }

    /// The pending approvals, for a child whose profile may `approve` (the gateway).
    fn pending(&self) -> Vec<Pending> {
        self.approvals.list()
    }

    /// An answer from a child whose profile may `approve` (the broker audits it).
    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        let d = self.approvals.resolve(id, r)?;
        tracing::info!(
            id,
            decision = d.as_str(),
            "approval answered through the broker (gateway)"
        );
        Ok(d)
    }
}

/// [`spawn_tool`] as the broker's [`Spawner`]; a tool whose profile has a broker section gets
/// its own socket, served with a new identity (role `tool`, its profile).
#[derive(Debug)]
pub struct SupervisorSpawner {
    pub ctx: Arc<ToolContext>,
    pub peers: PeerServer,
}

impl Spawner for SupervisorSpawner {
    fn workspace(&self) -> Option<PathBuf> {
        self.ctx
            .workspace
            .as_ref()
            .and_then(|w| std::fs::canonicalize(w).ok())
    }

    fn spawn(&self, req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure> {
        let fail = |message: String| SpawnFailure { message };
        let program_s = req.program.path().to_string_lossy().into_owned();
        let (argv0, args) = match req.argv.split_first() {
            Some((a0, rest)) => (a0.as_str(), rest),
            None => (program_s.as_str(), &[][..]),
        };
        let run = spawn_tool(
            &self.ctx,
            req.policy.clone(),
            req.program.clone(),
            argv0,
            args,
            &req.profile,
            req.workspace.as_deref(),
        )
        // The broker protocol carries the failure as text.
        .map_err(|e| fail(crate::errors::error_chain(&e)))?;
        if let Some(fd) = run.broker {
            let who = new_identity(Role::Tool, &run.profile);
            if self.peers.serve(fd, who).is_none() {
                tracing::warn!("a tool's broker socket could not be served (no handler)");
            }
        }
        let wait = run.wait;
        Ok(SpawnHandle {
            stdout: run.stdout,
            stderr: run.stderr,
            wait: Box::new(move || exit_summary(&wait())),
        })
    }
}

/// A pending approval as written to `<state>/pending/<key>.json` for the operator CLI.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PendingFile {
    /// `<supervisor pid>-<approval id>`: what `carapace approvals allow|deny` takes.
    pub key: String,
    pub supervisor_pid: u32,
    pub id: u64,
    pub who: carapace_broker::audit::Who,
    pub program: PathBuf,
    pub program_sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub why: String,
    pub created: String,
    /// Seconds left when it was written; it is denied when they run out.
    pub timeout_secs: u64,
}

/// The operator's answer, `<state>/pending/<key>.answer`: `allow-once`, `allow-always` or
/// `deny`.
/// The file holds the word and, as `carapace approvals` writes it, a newline.
pub fn parse_answer(text: &str) -> Option<Resolution> {
    Resolution::parse(text.trim())
}

/// Without a control socket (`carapace exec`): `ask` approvals are offered to the operator as
/// files in `<state>/pending/` (0700 directory, 0600 files, root only), and answered by an
/// `.answer` file next to them (written by `carapace approvals allow|deny`), polled every 50 ms.
#[derive(Debug)]
pub struct FileApprover {
    pub approvals: Arc<Approvals>,
    pub pending_dir: PathBuf,
}

/// Set when the waiting request is dropped (its peer went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl FileApprover {
    fn decide(
        approvals: &Approvals,
        pending_dir: &Path,
        q: ApprovalQuery,
        cancelled: &AtomicBool,
    ) -> ApprovalAnswer {
        let who = carapace_broker::audit::Who::from(&q.who);
        let spec = PendingSpec {
            identity: who.clone(),
            program: q.program.path().to_path_buf(),
            argv: q.argv.clone(),
            profile: q.profile.clone(),
            cwd: PathBuf::from("/"),
        };
        let pending = match approvals.request_opened(spec, &q.program) {
            Ok(Requested::Allowed(_)) => return ApprovalAnswer::Allow,
            Ok(Requested::Answered(d)) if d.is_allow() => return ApprovalAnswer::Allow,
            Ok(Requested::Answered(d)) => return ApprovalAnswer::Deny(d.as_str().to_string()),
            Ok(Requested::Pending(p)) => p,
            Err(e) => return ApprovalAnswer::Deny(format!("cannot ask: {e}")),
        };
        let pid = std::process::id();
        let key = format!("{pid}-{}", pending.id);
        let file = pending_dir.join(format!("{key}.json"));
        let answer = pending_dir.join(format!("{key}.answer"));
        let record = PendingFile {
            key: key.clone(),
            supervisor_pid: pid,
            id: pending.id,
            who,
            program: pending.program.clone(),
            program_sha256: pending.program_sha256.clone(),
            argv: pending.argv.clone(),
            profile: pending.profile.clone(),
            why: q.why.clone(),
            created: pending.created.clone(),
            timeout_secs: pending
                .expires
                .saturating_duration_since(std::time::Instant::now())
                .as_secs(),
        };
        if let Err(e) = write_private(pending_dir, &file, &record) {
            approvals.cancel(pending.id);
            let _ = approvals.wait(pending.id, std::time::Instant::now());
            return ApprovalAnswer::Deny(format!("cannot offer the approval to the operator: {e}"));
        }
        tracing::warn!(
            "carapace: approval {key} pending: {} (profile {}); answer with `carapace approvals \
             allow {key}` or `deny {key}`",
            pending.argv.join(" "),
            pending.profile
        );
        loop {
            if cancelled.load(Ordering::SeqCst) {
                approvals.cancel(pending.id);
                break;
            }
            if std::time::Instant::now() >= pending.expires {
                break;
            }
            if let Ok(text) = std::fs::read_to_string(&answer) {
                let _ = std::fs::remove_file(&answer);
                match parse_answer(&text) {
                    Some(r) => match approvals.resolve(pending.id, r) {
                        Ok(_) => break,
                        Err(e) => tracing::warn!("approval {key}: {e}"),
                    },
                    None => tracing::warn!("approval {key}: unreadable answer {text:?}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let decision = approvals.wait(pending.id, std::time::Instant::now());
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&answer);
        match decision {
            Ok(d) if d.is_allow() => ApprovalAnswer::Allow,
            Ok(d) => ApprovalAnswer::Deny(d.as_str().to_string()),
            Err(e) => ApprovalAnswer::Deny(e.to_string()),
        }
    }
}

impl Approver for FileApprover {
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        let approvals = self.approvals.clone();
        let dir = self.pending_dir.clone();
        let flag = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(flag.clone());
        Box::pin(async move {
            let _guard = guard;
            let task = tokio::task::spawn_blocking(move || {
                FileApprover::decide(&approvals, &dir, q, &flag)
            });
            task.await
                .unwrap_or_else(|e| ApprovalAnswer::Deny(format!("approval task failed: {e}")))
        })
    }

    fn pending(&self) -> Vec<Pending> {
        self.approvals.list()
    }

    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        self.approvals.resolve(id, r)
    }
}

/// Write `value` as JSON to `path` (0600, atomically: temporary file + rename) in `dir`
/// (created 0700).
pub fn write_private<T: serde::Serialize>(
    dir: &Path,
    path: &Path,
    value: &T,
) -> Result<(), BrokerHostError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| BrokerHostError::Io {
        syscall: "encode",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    write_private_bytes(dir, path, &data)
}

/// Write `data` to `path` in `dir` (created 0700): 0600, atomically and durably
/// ([`write_atomic`]).
pub fn write_private_bytes(dir: &Path, path: &Path, data: &[u8]) -> Result<(), BrokerHostError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(BrokerHostError::Io {
                syscall: "mkdir",
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    write_atomic(path, data).map_err(|e| BrokerHostError::Io {
        syscall: e.op,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn state_dir_is_created_0700_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("a/b/state");
        let s = StateDir::open(&root).unwrap();
        let mode = std::fs::metadata(&s.root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        assert_eq!(s.audit_log(), root.join("audit.log"));
        // Opening it again is fine.
        StateDir::open(&root).unwrap();
        // Group/other-writable: refused.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = StateDir::open(&root).unwrap_err();
        assert!(
            matches!(e, BrokerHostError::StateDirWritable { mode: 0o770, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("writable by group"), "{e}");
        // A link to a directory: refused.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        let e = StateDir::open(&link).unwrap_err();
        assert!(
            matches!(&e, BrokerHostError::StateDirNotDir { path } if *path == link),
            "{e:?}"
        );
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn exit_summary_mirrors_the_report() {
        let r = ExitReport {
            code: None,
            signal: Some(9),
            wall: Duration::from_millis(1500),
            cpu: Duration::from_millis(20),
            peak_mem: 4096,
            oom_killed: true,
            timed_out: false,
        };
        let s = exit_summary(&r);
        assert_eq!(s.exit, 137);
        assert_eq!(s.signal, Some(9));
        assert_eq!(s.code, None);
        assert_eq!((s.wall_ms, s.cpu_ms, s.peak_mem), (1500, 20, 4096));
        assert!(s.oom && !s.timeout);
        assert_eq!(exit_summary(&setup_failure()).exit, 126);
    }

    #[test]
    fn answers_and_private_files() {
        assert_eq!(parse_answer("allow-once\n"), Some(Resolution::AllowOnce));
        assert_eq!(parse_answer("allow-always"), Some(Resolution::AllowAlways));
        assert_eq!(parse_answer(" deny "), Some(Resolution::Deny));
        assert_eq!(parse_answer("yes"), None);
        assert_eq!(parse_answer(""), None);
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("pending");
        let f = dir.join("1-1.answer");
        write_private_bytes(&dir, &f, b"deny\n").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "deny\n");
        // Replaced atomically, never through a planted link.
        write_private(&dir, &f, &"x").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "\"x\"");
        // Nothing but the answer is left in the directory (no temporary file).
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A failed write leaves no temporary file either: here the target is a directory.
        let d = dir.join("2-2.answer");
        std::fs::create_dir(&d).unwrap();
        let e = write_private_bytes(&dir, &d, b"deny\n").unwrap_err();
        assert!(
            matches!(
                e,
                BrokerHostError::Io {
                    syscall: "rename",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn identities_are_unique() {
        let a = new_identity(Role::Tool, "p");
        let b = new_identity(Role::Tool, "p");
        assert_ne!(a.id, b.id);
        assert_eq!(a.profile, "p");
    }

    #[test]
    fn child_fds_have_a_broker_socket_only_when_brokered() {
        let fds = ChildFds::new(false).unwrap();
        assert!(fds.io(None).broker.is_none());
        let fds = ChildFds::new(true).unwrap();
        assert!(fds.io(None).broker.is_some());
        let (_, _, mine) = fds.into_parent_ends();
        assert!(mine.is_some());
    }

    #[test]
    fn tool_errors_show_their_cause_once() {
        let d = Policy::parse("[profiles.x]\nno_such_key = 1\n", "p.toml").unwrap_err();
        let words = d.to_string();
        let e = ToolError::Compile {
            profile: "x".into(),
            source: d,
        };
        let shown = crate::errors::error_chain(&e);
        assert!(
            shown.starts_with("profile `x` cannot run on this kernel: "),
            "{shown}"
        );
        assert_eq!(shown.matches(words.as_str()).count(), 1, "{shown}");
        let e = ToolError::from(BrokerHostError::Io {
            syscall: "open",
            path: PathBuf::from("/dev/null"),
            source: io::Error::from_raw_os_error(libc::EMFILE),
        });
        let shown = crate::errors::error_chain(&e);
        assert!(shown.starts_with("open /dev/null: "), "{shown}");
        assert_eq!(shown.matches("Too many open files").count(), 1, "{shown}");
    }
}
