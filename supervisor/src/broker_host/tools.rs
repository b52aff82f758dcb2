//! The tools a child asks the broker to run: each started on a thread of its own through the
//! sandbox's one run path, its stdout and stderr handed back as pipes, its own broker socket when
//! its profile has one; killed when the broker shuts down.

use super::*;
use carapace_policy::Plan;

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
    /// Where each owner's own tools workspace is made (`<state>/workspaces/owners`); None:
    /// no per-owner workspaces (one-shot `carapace exec`).
    pub owners_root: Option<PathBuf>,
    /// The tools running now (killed when the broker shuts down).
    pub live: ToolRegistry,
    /// Each profile of the policy in force compiled once ([`BrokerHost`] tells it of every
    /// load).
    pub plans: PlanCache,
    /// An empty cgroup made ahead per profile, for its next tool.
    pub cgroups: CgroupPool,
    /// The process that starts the tools (`carapace run`); None, or once it is gone: the
    /// tool's own thread starts it.
    pub spawner: Option<carapace_sandbox::spawner::Spawner>,
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

pub(super) fn pidfd_kill(fd: &OwnedFd) {
    // Harmless (ESRCH) once the process is gone.
    crate::pidfd::signal(fd, libc::SIGKILL);
}

impl ToolRegistry {
    /// Track the tool whose sandbox init is `pid` (our child, not yet reaped). None when the
    /// registry is closed: the tool was killed at once.
    pub(super) fn register(&self, pid: libc::pid_t) -> Option<u64> {
        // Our own unreaped child: the pid cannot have been recycled yet.
        let fd = crate::pidfd::open(pid)?;
        let mut v = lock(&self.pidfds);
        if self.closed.load(Ordering::SeqCst) {
            pidfd_kill(&fd);
            return None;
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        v.push((key, fd));
        Some(key)
    }

    pub(super) fn deregister(&self, key: u64) {
        lock(&self.pidfds).retain(|(k, _)| *k != key);
    }

    pub(super) fn add_thread(&self, t: std::thread::JoinHandle<()>) {
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

    pub(super) fn is_closed(&self) -> bool {
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
    /// A pidfd of the sandbox's init, when the caller brought its own stdio ([`Caller`]):
    /// to kill the tool when that caller goes away.
    pub pidfd: Option<OwnedFd>,
    /// Blocks until the tool has exited; its exit report. The tool's cgroup is removed right
    /// after (by the tool's thread, which [`ToolRegistry::kill_all`] waits for).
    pub wait: Box<dyn FnOnce() -> ExitReport + Send>,
}

impl std::fmt::Debug for ToolRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRun")
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("broker", &self.broker)
            .field("profile", &self.profile)
            .field("pidfd", &self.pidfd)
            .finish_non_exhaustive()
    }
}

pub(super) type Started = Result<(ParentEnds, Option<OwnedFd>), ToolError>;

/// What a caller other than the broker brings to a tool (`carapace exec` through the exec
/// socket, [`crate::exec_socket`]): its own stdin, stdout and stderr, placed at 0..=2 instead of
/// `/dev/null` and the pipes; its environment, the source of the profile's `env.pass`
/// (instead of the supervisor's); and its `--run-as` when it gave one.
#[derive(Debug)]
pub struct Caller {
    pub stdio: [OwnedFd; 3],
    pub env: Vec<(OsString, OsString)>,
    pub run_as: RunAs,
}

/// Where a tool works: its workspace (None: the context's shared one), its working directory
/// relative to it (None: the profile's), and whether the workspace is mounted read-only.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToolPlace<'a> {
    pub workspace: Option<&'a Path>,
    pub cwd: Option<&'a Path>,
    pub read_only: bool,
}

/// Start `program` (opened at its canonical host path, already allowed by the policy for
/// `profile`; this very file is started, see [`carapace_sandbox::spawn`]) with
/// `argv0` and `args` confined in `profile`, exactly as `carapace exec` would, in a cgroup of
/// its own. Returns once the program has exec'd (or failed to start). `caller`: a caller's own
/// stdio, environment and identity choice instead of the broker's (see [`Caller`]).
#[allow(clippy::too_many_arguments)]
pub fn spawn_tool(
    ctx: &Arc<ToolContext>,
    policy: Arc<Policy>,
    program: Arc<OpenedProgram>,
    argv0: &str,
    args: &[String],
    profile: &str,
    place: ToolPlace<'_>,
    caller: Option<Caller>,
) -> Result<ToolRun, ToolError> {
    let ToolPlace {
        workspace,
        cwd,
        read_only,
    } = place;
    let (started_tx, started_rx) = mpsc::channel::<Started>();
    let (done_tx, done_rx) = mpsc::channel::<ExitReport>();
    let outer = ctx;
    let ctx = ctx.clone();
    let argv0 = OsString::from(argv0);
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let profile_s = profile.to_string();
    let workspace = workspace.map(Path::to_path_buf).or(ctx.workspace.clone());
    if let (Some(cwd), Some(ws)) = (cwd, &workspace) {
        check_cwd(ws, cwd)?;
    }
    let cwd = cwd.map(Path::to_path_buf);
    if ctx.live.is_closed() {
        return Err(ToolError::ShuttingDown);
    }
    let thread = std::thread::Builder::new()
        .name("carapace-tool".into())
        .spawn(move || {
            let plan = match ctx
                .plans
                .plan(&policy, &profile_s, &ctx.target)
                .map(|p| adjust_plan(Plan::clone(&p), cwd.as_deref(), read_only))
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
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
            let (stdio, env, run_as) = match caller {
                Some(c) => (Some(c.stdio), c.env, c.run_as),
                None => (None, ctx.env.clone(), ctx.run_as),
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
                    run_as,
                    env,
                    broker: brokered,
                    listener: false,
                    supervisor_env: Vec::new(),
                },
            };
            let mut io = fds.io(None);
            if let Some([stdin, stdout, stderr]) = &stdio {
                io.stdin = Some(stdin.as_fd());
                io.stdout = Some(stdout.as_fd());
                io.stderr = Some(stderr.as_fd());
            }
            let limits = plan.cgroup;
            let started = carapace_sandbox::spawner::start_run(
                ctx.spawner.as_ref(),
                plan,
                &run,
                ctx.cgroups.take(&profile_s, &limits),
                io,
            );
            // The sandbox has its copies; the caller's go now.
            let own_stdio = stdio.is_some();
            drop(stdio);
            let started = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = started_tx.send(Err(e.into()));
                    return;
                }
            };
            say_limits_once(started.limits());
            let in_cgroup = matches!(started.limits(), Limits::Cgroup { .. });
            let ends = fds.into_parent_ends();
            let key = ctx.live.register(started.pid());
            // Our own unreaped child: its pid cannot have been recycled.
            let pidfd = own_stdio
                .then(|| crate::pidfd::open(started.pid()))
                .flatten();
            let _ = started_tx.send(Ok((ends, pidfd)));
            let mut ended = started.wait();
            if let Some(k) = key {
                ctx.live.deregister(k);
            }
            let report = match &ended.report {
                Ok(r) => *r,
                Err(e) => {
                    tracing::warn!("waiting for a tool: {}", crate::errors::error_chain(e));
                    ExitReport::setup_failure()
                }
            };
            // A termination signal meant for the supervisor may have been taken by this
            // thread's wait (which unblocks them) instead of the main thread's: pass it on, so
            // that the main wait kills the main sandbox too.
            if let Some(sig) = carapace_sandbox::spawn::interrupted() {
                if let Some(sig) = rustix::process::Signal::from_named_raw(sig) {
                    let _ = rustix::process::kill_process(rustix::process::getpid(), sig);
                }
            }
            // The report (read from the cgroup before this) goes first; the empty cgroup is
            // removed after, off the requester's wait. The registry waits for this thread, so
            // a shutdown still finds the cgroup gone.
            let _ = done_tx.send(report);
            if let Err(e) = ended.remove_cgroup() {
                tracing::warn!(
                    "removing a tool's cgroup: {}",
                    crate::errors::error_chain(&e)
                );
            }
            if in_cgroup {
                ctx.cgroups.refill(&profile_s, &limits);
            }
        })
        .map_err(|source| ToolError::Thread { source })?;
    outer.live.add_thread(thread);
    let ((stdout, stderr, broker), pidfd) =
        started_rx.recv().map_err(|_| ToolError::ThreadEnded)??;
    Ok(ToolRun {
        stdout,
        stderr,
        broker,
        profile: profile.to_string(),
        pidfd,
        wait: Box::new(move || {
            done_rx
                .recv()
                .unwrap_or_else(|_| ExitReport::setup_failure())
        }),
    })
}

/// The plan with the request's workspace choices applied: `cwd` (relative to the workspace)
/// becomes the working directory beneath the workspace's mount point; `read_only` takes the
/// write right from the workspace's mount and its Landlock rule.
fn adjust_plan(
    mut plan: carapace_policy::Plan,
    cwd: Option<&Path>,
    read_only: bool,
) -> Result<carapace_policy::Plan, ToolError> {
    use carapace_policy::plan::{LandlockPath, Mount};
    let mut ws_dst = None;
    for m in &mut plan.mounts {
        if let Mount::Workspace { dst, writable, .. } = m {
            if read_only {
                *writable = false;
            }
            ws_dst = Some(dst.clone());
        }
    }
    if read_only {
        for r in &mut plan.landlock.rules {
            if r.path == LandlockPath::Workspace {
                r.rights.write = false;
            }
        }
    }
    if let Some(cwd) = cwd {
        let Some(dst) = ws_dst else {
            return Err(ToolError::Cwd {
                cwd: cwd.to_path_buf(),
                why: format!("profile `{}` mounts no workspace", plan.profile),
            });
        };
        plan.cwd = carapace_broker::ops::beneath(&dst, cwd);
    }
    Ok(plan)
}

/// `cwd` must be a directory beneath `workspace`, reached without `..` or a symbolic link
/// (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`).
fn check_cwd(workspace: &Path, cwd: &Path) -> Result<(), ToolError> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let bad = |why: String| ToolError::Cwd {
        cwd: cwd.to_path_buf(),
        why,
    };
    let dir = std::fs::File::open(workspace).map_err(|e| {
        bad(format!(
            "opening the workspace {}: {e}",
            workspace.display()
        ))
    })?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    openat2(&dir, cwd, how)
        .map(drop)
        .map_err(|e| bad(format!("not a directory beneath the workspace: {e}")))
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

    fn owner_workspace(&self, digest: &str) -> Result<PathBuf, SpawnFailure> {
        let fail = |message: String| SpawnFailure { message };
        let Some(root) = &self.ctx.owners_root else {
            return Err(fail("this supervisor keeps no per-owner workspaces".into()));
        };
        // The broker hands a digest; anything else could name a path.
        if digest.len() != 32
            || !digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(fail(format!("invalid owner digest {digest:?}")));
        }
        let dir = root.join(digest);
        carapace_broker::durable::ensure_dir(&dir)
            .and_then(|()| std::fs::canonicalize(&dir))
            .map_err(|e| fail(format!("{}: {e}", dir.display())))
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
            ToolPlace {
                workspace: req.workspace.as_deref(),
                cwd: req.cwd.as_deref(),
                read_only: req.read_only,
            },
            None,
        )
        // The broker protocol carries the failure as text.
        .map_err(|e| fail(crate::errors::error_chain(&e)))?;
        if let Some(m) = &self.peers.metrics {
            m.tool_started(&run.profile);
        }
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
