//! The supervisor's side of the broker: the state directory, the tokio runtime that serves a
//! child's broker socket while `carapace exec` waits for it, and spawning the tools a child asks
//! for (`exec`) as new confined children, through the sandbox's one run path, like `carapace
//! exec`.
//!
//! The broker crate (`carapace_broker`) knows nothing of processes; it decides, audits and
//! talks the protocol. This module gives it processes:
//!
//! - `broker_host/tools.rs`: [`spawn_tool`] takes the requested profile's plan and starts it
//!   through the sandbox's one run path ([`carapace_sandbox::run`]: its own cgroup, the launch
//!   prepared, the child spawned), with stdin `/dev/null` and stdout/stderr as pipes whose read
//!   ends are handed back, and (if that profile has a broker section) a broker socket of its
//!   own. Each tool gets a dedicated thread that spawns it and then waits for it: the child's
//!   `PR_SET_PDEATHSIG` is tied to the thread that created it, so that thread must outlive it,
//!   and with `--run-as auto` the thread's id (a pid number no other live task has) gives the
//!   tool a host uid of its own (`AUTO_BASE + tid`), distinct from its parent sandbox's.
//!   The tools still running when the broker shuts down (their child is gone) are killed
//!   through pidfds and their cgroups removed ([`ToolRegistry::kill_all`]).
//!   [`SupervisorSpawner`] is [`spawn_tool`] as the broker's `Spawner`; a brokered tool's
//!   socket is served with a new identity (role `tool`, its profile).
//! - `broker_host/approvals.rs`: where an `ask` waits for the operator: in memory, logged and
//!   answered over the control socket (the service), or [`FileApprover`]: as files in
//!   `<state>/pending/` answered by `carapace approvals allow|deny` (`carapace exec`, which has
//!   no control socket).
//! - `broker_host/plans.rs`: [`PlanCache`], the tools' profiles compiled once per policy load
//!   (told of each load by [`BrokerHost::start_with`] and [`BrokerHost::reload`]), so a tool
//!   gets a clone of its profile's plan, with the request's working directory and read-only
//!   choice applied, instead of a compile per call.
//! - `broker_host/cgroup_pool.rs`: [`CgroupPool`], one empty cgroup made ahead per tool
//!   profile (after a tool's report, off the requester's path), taken by the next tool of that
//!   profile; each is used once and removed; the pool is emptied on reload and shutdown.
//! - `broker_host/state_dir.rs`: the state directory ([`StateDir`]).
//! - this file: [`BrokerHost`] opens the state (audit log, approvals, dead letters), builds
//!   `Ops` and runs the tokio runtime (two workers) that serves the sockets, one identity per
//!   socket, with the per-peer limits of its profile.

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

use crate::service::metrics::Metrics;
use carapace_sandbox::cgroup;
use carapace_sandbox::fds::Pipe;
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::report::ExitReport;
use carapace_sandbox::run::{Limits, Run};
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
    #[error("working directory {}: {why}", cwd.display())]
    Cwd { cwd: PathBuf, why: String },
}

mod state_dir;
pub use state_dir::*;
mod tools;
pub use tools::*;
mod approvals;
pub use approvals::*;
mod plans;
pub use plans::PlanCache;
mod cgroup_pool;
pub use cgroup_pool::CgroupPool;
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
    /// The service's metrics: told of every answered request and every tool started.
    metrics: Option<Arc<Metrics>>,
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
        let mut server = Server::new(handler, peer_limits(&policy, &who.profile));
        if let Some(m) = &self.metrics {
            server = server.with_observer(m.clone());
        }
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
    /// When the audit log rotates (`[audit]` of the configuration).
    pub audit_rotation: carapace_broker::audit::Rotation,
    /// The workspaces the operator granted (`[workspaces.NAME]`).
    pub workspaces: Vec<carapace_broker::ops::GrantedWorkspace>,
}

impl BrokerHost {
    /// Who starts the broker's tools, for `carapace status`.
    pub fn tools_started_by(&self) -> String {
        match &self.tools.spawner {
            Some(s) => s.describe(),
            None => "in-process".to_string(),
        }
    }

    /// Open the state (audit log, approvals, dead letters), build the operations with this
    /// supervisor as their spawner and the state directory's pending files as the operator's
    /// channel, and start a runtime (two workers) to serve sockets on.
    pub fn start(setup: BrokerSetup) -> Result<BrokerHost, BrokerHostError> {
        BrokerHost::start_with(setup, OperatorChannel::Files, None)
    }

    /// [`BrokerHost::start`] with the operator's channel for `ask` approvals chosen, and the
    /// metrics (the service's) to record requests and tools into.
    pub fn start_with(
        setup: BrokerSetup,
        channel: OperatorChannel,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<BrokerHost, BrokerHostError> {
        let root = setup.state.root.clone();
        let mut audit =
            AuditLog::open(setup.state.audit_log()).map_err(|source| BrokerHostError::Audit {
                path: root.clone(),
                source,
            })?;
        audit.set_rotation(setup.audit_rotation);
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
            metrics,
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
                    workspaces: setup.workspaces,
                    ..OpsConfig::default()
                },
            )
            .map_err(|source| BrokerHostError::Ops { path: root, source })?,
        );
        tools.plans.replace(ops.policy(), tools.target);
        let handler: Arc<dyn Handler> = ops.clone();
        let _ = peers.handler.set(handler);
        if channel == OperatorChannel::Control {
            // Approvals and held messages announced to the channels' operators.
            let _guard = runtime.enter();
            ops.start_operator_desk();
        }
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

    /// What every tool shares (for the exec socket, which starts tools too).
    pub fn tool_context(&self) -> Arc<ToolContext> {
        self.tools.clone()
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
        self.tools
            .plans
            .replace(self.ops.policy(), self.tools.target);
        self.tools.cgroups.clear();
        Ok(())
    }

    /// Kill the tools still running ([`ToolRegistry::kill_all`]) and remove the cgroups made
    /// ahead for tools; no more are made. Returns how many tools were killed.
    pub fn kill_tools(&self, grace: Duration) -> usize {
        let n = self.tools.live.kill_all(grace);
        self.tools.cgroups.close();
        n
    }

    /// Stop serving: abort every peer task (pending approvals are withdrawn), give blocking
    /// work a moment to finish, then kill the tools still running for children that are gone
    /// and wait for their sandboxes to be reaped and their cgroups removed.
    pub fn shutdown(self) {
        self.runtime.shutdown_timeout(Duration::from_millis(500));
        let n = self.tools.live.kill_all(Duration::from_secs(5));
        self.tools.cgroups.close();
        if n > 0 {
            tracing::info!("killed {n} tool(s) still running for the broker");
        }
    }
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
        assert_eq!(exit_summary(&ExitReport::setup_failure()).exit, 126);
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

    /// The host tells the tools' plan cache of each policy load: after a reload a tool gets
    /// the new policy's plan of its profile, and after reloading the first text again, the
    /// first plan.
    #[test]
    fn a_reload_puts_the_new_policys_plans_in_force() {
        let a = "version = 1\n[profiles.tool]\nwhy = \"t\"\n[profiles.tool.limits]\npids = 10\n";
        let b = "version = 1\n[profiles.tool]\nwhy = \"t\"\n[profiles.tool.limits]\npids = 20\n";
        let parse = |t: &str| Policy::parse(t, "p.toml").unwrap();
        let target = Target { landlock_abi: 6 };
        let t = tempfile::tempdir().unwrap();
        let host = BrokerHost::start(BrokerSetup {
            policy: parse(a),
            state: StateDir::open(&t.path().join("state")).unwrap(),
            tools: ToolContext {
                policy: Arc::new(parse(a)),
                target,
                privilege: Privilege::of_this_process(),
                run_as: RunAs::Auto,
                env: Vec::new(),
                workspace: None,
                owners_root: None,
                live: Default::default(),
                plans: Default::default(),
                cgroups: Default::default(),
                spawner: None,
            },
            approval_timeout: Duration::from_secs(1),
            token_store: None,
            audit_rotation: carapace_broker::audit::Rotation::default(),
            workspaces: Vec::new(),
        })
        .unwrap();
        let in_force = |host: &BrokerHost| {
            let p = host.ops.policy();
            host.tools.plans.plan(&p, "tool", &target).unwrap()
        };
        let (plan_a, plan_b) = (
            parse(a).compile("tool", &target).unwrap(),
            parse(b).compile("tool", &target).unwrap(),
        );
        assert_ne!(plan_a, plan_b);
        let first = in_force(&host);
        assert_eq!(*first, plan_a);
        assert!(Arc::ptr_eq(&first, &in_force(&host)), "compiled twice");
        // After each reload: the new policy's plan, and kept (the cache follows the reload).
        host.reload(parse(b)).unwrap();
        let second = in_force(&host);
        assert_eq!(*second, plan_b);
        assert!(
            Arc::ptr_eq(&second, &in_force(&host)),
            "not cached after reload"
        );
        host.reload(parse(a)).unwrap();
        let third = in_force(&host);
        assert_eq!(*third, plan_a);
        assert!(
            Arc::ptr_eq(&third, &in_force(&host)),
            "not cached after reload"
        );
        host.shutdown();
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
