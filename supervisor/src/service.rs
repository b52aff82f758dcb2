//! `carapace run`: the supervisor as a long-running service.
//!
//! One process, started by systemd (`Type=notify`) or by hand:
//!
//! 1. reads its configuration ([`crate::config`]) and the policy, strictly: an invalid one
//!    stops the start with every error (exit 78, `EX_CONFIG`, which the unit file tells
//!    systemd not to restart on);
//! 2. kills and removes what a previous, killed supervisor left in its cgroup subtree;
//! 3. starts the broker (audit log, approvals held in memory, dead letters) on a tokio
//!    runtime, binds the listening sockets of the gateway (or takes it from systemd socket
//!    activation) and of webhook channels, and the control socket;
//! 4. starts each configured child (the gateway, channel adapters) as a confined child with
//!    its own broker socket (fd 3) and, where it has one, its listener (fd 4), through exactly
//!    the spawn path of `carapace exec`. Each child has a thread of its own that forks it
//!    (`PR_SET_PDEATHSIG` is tied to the forking thread) and waits for it, and restarts it with
//!    exponential backoff; a crash loop stops the restarts and says so;
//! 5. says READY=1 and then waits for signals: SIGHUP (or `carapace reload`) reloads the
//!    configuration and the policy — an invalid one is rejected with its errors logged and
//!    the old one stays in force; a valid one applies to new requests at once (children are
//!    not restarted for it; a child's own program, arguments and profile apply from its next
//!    start); SIGTERM/SIGINT stop: STOPPING=1, no new connections, the children get SIGTERM
//!    and `stop_timeout` to end before their cgroups are killed, tools still running are
//!    killed, the audit head is logged, exit 0.
//!
//! If the supervisor itself is SIGKILLed, its children die with it (`PR_SET_PDEATHSIG`, and a
//! sandbox's pid namespace dies with its init); the next start removes their cgroups.
//!
//! Signals are caught by handlers that only write the signal number into a pipe (a self-pipe;
//! async-signal-safe); the main thread reads it. Nothing here blocks signals, so the waits of
//! the child threads (`Running::wait`'s `ppoll`) are merely restarted (EINTR) by them.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead as _, Read as _};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use carapace_broker::approvals::Resolution;
use carapace_broker::audit::rfc3339_utc;
use carapace_broker::server::Role;
use carapace_broker::sync::{lock, read, write};
use carapace_policy::plan::{FsRights, LandlockPath, LandlockRule, Mount};
use carapace_policy::{Plan, Policy, Target};
use clap::Args;
use serde_json::Value;

use crate::broker_host::{
    new_identity, BrokerHost, BrokerSetup, ChildFds, OperatorChannel, PeerServer, StateDir,
    ToolContext,
};
use crate::config::{ChildConfig, Config};
use crate::control::{self, ControlHandler, ControlServer, Request};
use crate::errors::error_chain;
use crate::sdnotify::{self, Notifier};
use carapace_sandbox::cgroup::{self, Cgroup};
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::ExitReport;
use carapace_sandbox::run::{self, Run};
use carapace_sandbox::spawn::LaunchOptions;
use carapace_sandbox::Privilege;

/// Exit status when the configuration or the policy is invalid (sysexits' EX_CONFIG): the unit
/// file lists it in `RestartPreventExitStatus=`, a broken file is not retried in a loop.
pub const EXIT_CONFIG: i32 = 78;
/// Exit status when the supervisor cannot start for another reason.
pub const EXIT_START: i32 = 1;

/// A child that ran at least this long before it died starts the backoff from the beginning.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Longest line of a child's stdout/stderr relayed to the log; longer lines are cut.
const MAX_LOG_LINE: usize = 4096;

/// `carapace run`.
#[derive(Debug, Args)]
#[command(
    long_about = "Run the supervisor: start the gateway (and any channel adapters) as confined \
                  children, each with a broker socket, serve the broker, and give the operator \
                  control over a Unix socket (`carapace status`, `approvals`, `dlq`, `audit \
                  tail`, `reload`). Meant to run as a systemd service (Type=notify; see \
                  supervisor/systemd/carapace.service), works by hand too. SIGHUP reloads the \
                  configuration and the policy; SIGTERM stops cleanly.",
    after_help = "Examples:\n  carapace run                      # /etc/carapace/carapace.toml, \
                  else the embedded default\n  carapace run --config my.toml\n  carapace run \
                  --check --config my.toml   # validate and exit\n\nExit status: 0 stopped \
                  cleanly; 78 invalid configuration or policy; 1 could not start."
)]
pub struct RunArgs {
    /// Configuration file [default: /etc/carapace/carapace.toml if it exists, else the
    /// embedded default]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and the policy, say what would run, and exit
    #[arg(long)]
    pub check: bool,
}

// ---------------------------------------------------------------------------------------------
// Signals: a self-pipe.

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = u8::try_from(sig).unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; `b` is a valid one-byte buffer. A full pipe
        // (EAGAIN, the fd is non-blocking) only loses a duplicate of a signal already queued.
        unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
    }
}

/// The signals the service acts on.
const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Install the handlers; returns the pipe's read end.
fn catch_signals() -> io::Result<OwnedFd> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else. The write end
    // is kept open for the life of the process (the handler uses it), so it is leaked on
    // purpose into SIGNAL_PIPE.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction is valid; the handler only calls write(2) on an fd
        // (async-signal-safe). SA_RESTART: other threads' syscalls restart where they can.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Unblock it, should the caller have inherited a mask that blocks it.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
    Ok(read)
}

/// Wait up to `timeout` for a signal; the next one caught, if any.
fn next_signal(pipe: &OwnedFd, timeout: Duration) -> Option<libc::c_int> {
    let mut pfd = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r <= 0 {
        return None;
    }
    let mut b = 0u8;
    // SAFETY: reading one byte into a valid buffer from our own non-blocking pipe.
    let n = unsafe { libc::read(pipe.as_raw_fd(), std::ptr::addr_of_mut!(b).cast(), 1) };
    (n == 1).then_some(libc::c_int::from(b))
}

// ---------------------------------------------------------------------------------------------
// Children.

/// What a child is, from the configuration (applies from its next start).
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    /// Canonical host path of its program.
    program: PathBuf,
    args: Vec<String>,
    profile: String,
    workspace: PathBuf,
    restart: Restart,
    /// Added to (and overriding) the supervisor's environment; the profile's
    /// `environment.pass` still decides what reaches the child.
    environment: Vec<(String, String)>,
    /// The gateway's settings JSON (`$CARAPACE_GATEWAY_SETTINGS`); None for channels.
    settings: Option<String>,
}

/// Where a child reads its settings JSON: the gateway (gateway/src/settings.rs) or a built-in
/// channel adapter (channels/src/settings.rs).
fn settings_env(role: Role) -> &'static str {
    match role {
        Role::Gateway => "CARAPACE_GATEWAY_SETTINGS",
        _ => "CARAPACE_CHANNEL_SETTINGS",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Restart {
    initial: Duration,
    max: Duration,
    /// More than this many starts within `window` is a crash loop.
    loop_starts: u32,
    loop_window: Duration,
}

impl Restart {
    /// Delay before restart number `n` (0-based) of a run of failures.
    fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    Backoff,
    Failed,
    Stopping,
    Stopped,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Failed => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct Live {
    state: State,
    pid: Option<i32>,
    /// A pidfd of the running sandbox's init (signals cannot hit a recycled pid).
    pidfd: Option<Arc<OwnedFd>>,
    cgroup: Option<Arc<Cgroup>>,
    since: Option<Instant>,
    restarts: u32,
    last_exit: Option<String>,
    /// Start times within the crash-loop window.
    starts: VecDeque<Instant>,
    /// Set by a reload: a failed child is tried again.
    revive: bool,
}

/// One supervised child (the gateway or a channel adapter).
#[derive(Debug)]
struct Child {
    name: String,
    role: Role,
    /// The listening socket it gets at fd 4 (the gateway's, a webhook channel's), bound once
    /// at start by the supervisor and kept across restarts: connections wait in its backlog
    /// while the child is down.
    listener: Option<OwnedFd>,
    spec: Mutex<Spec>,
    live: Mutex<Live>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Send `sig` through a pidfd; false if the process is gone.
fn pidfd_signal(fd: &OwnedFd, sig: libc::c_int) -> bool {
    // SAFETY: pidfd_send_signal on a pidfd we own; harmless (ESRCH) once the process is gone.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    r == 0
}

/// A pidfd for `pid` (our own unreaped child).
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open has no memory arguments; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    let fd = RawFd::try_from(fd).ok().filter(|f| *f >= 0)?;
    // SAFETY: pidfd_open succeeded: the fd is ours alone.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The host pids of a sandbox's processes other than its init: from its cgroup, else from the
/// init's children list in /proc.
fn sandbox_members(init: i32, cg: Option<&Cgroup>) -> Vec<i32> {
    if let Some(cg) = cg {
        if let Ok(p) = cg.pids() {
            return p.into_iter().filter(|p| *p != init).collect();
        }
    }
    std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn describe_exit(r: &ExitReport) -> String {
    let mut s = match (r.code, r.signal) {
        (Some(c), _) => format!("exit={c}"),
        (None, Some(sig)) => format!("signal={sig}"),
        (None, None) => "unknown".to_string(),
    };
    if r.oom_killed {
        s.push_str(" (oom)");
    }
    s
}

/// Relay a child's output, line by line, to the log.
fn relay(name: String, stream: &'static str, fd: OwnedFd) {
    let spawned = std::thread::Builder::new()
        .name(format!("carapace-log-{name}"))
        .spawn(move || {
            let mut r = io::BufReader::new(std::fs::File::from(fd));
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r
                    .by_ref()
                    .take(MAX_LOG_LINE as u64)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']);
                        match split_level(line) {
                            (Some(tracing::Level::ERROR), l) => {
                                tracing::error!(child = %name, stream, "{l}")
                            }
                            (Some(tracing::Level::WARN), l) => {
                                tracing::warn!(child = %name, stream, "{l}")
                            }
                            (Some(tracing::Level::DEBUG | tracing::Level::TRACE), l) => {
                                tracing::debug!(child = %name, stream, "{l}")
                            }
                            (_, l) => tracing::info!(child = %name, stream, "{l}"),
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot relay the output of {stream}: {e}");
    }
}

/// A child's log line that starts with a level word (`ERROR`, `WARN`, `INFO`, `DEBUG`,
/// `TRACE`, as tracing's formatter writes them) is logged at that level without it; any other
/// line at info, as it is.
fn split_level(line: &str) -> (Option<tracing::Level>, &str) {
    let t = line.trim_start();
    for (word, level) in [
        ("ERROR ", tracing::Level::ERROR),
        ("WARN ", tracing::Level::WARN),
        ("INFO ", tracing::Level::INFO),
        ("DEBUG ", tracing::Level::DEBUG),
        ("TRACE ", tracing::Level::TRACE),
    ] {
        if let Some(rest) = t.strip_prefix(word) {
            return (Some(level), rest.trim_start());
        }
    }
    (None, line)
}

/// Make a child's program visible inside its sandbox when no mount of the profile contains it
/// (e.g. `carapace-gateway` next to the `carapace` binary in a build directory): bind the file
/// alone, read-only and executable, at the same path, with the matching Landlock rule. Only
/// for the programs the operator configured, never for tools.
fn bind_program(plan: &mut Plan, program: &Path) {
    let visible = plan.mounts.iter().any(|m| match m {
        Mount::Bind { src, exec, .. } => *exec && program.starts_with(src),
        _ => false,
    });
    if visible {
        return;
    }
    let depth = program.components().count();
    let at = plan
        .mounts
        .iter()
        .position(|m| matches!(m, Mount::Symlink { .. }) || m.dst().components().count() > depth)
        .unwrap_or(plan.mounts.len());
    plan.mounts.insert(
        at,
        Mount::Bind {
            src: program.to_path_buf(),
            dst: program.to_path_buf(),
            writable: false,
            exec: true,
            optional: false,
        },
    );
    plan.landlock.rules.push(LandlockRule {
        path: LandlockPath::Host(program.to_path_buf()),
        rights: FsRights {
            read: true,
            execute: true,
            ..FsRights::default()
        },
    });
}

/// The environment a child's profile picks from: the supervisor's, with the configured
/// variables added or replaced.
fn child_env(
    base: &[(std::ffi::OsString, std::ffi::OsString)],
    extra: &[(String, String)],
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<_> = base
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| k.as_os_str() == e.as_str()))
        .cloned()
        .collect();
    env.extend(extra.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

/// What starting a child needs from the service.
struct Env<'a> {
    policy: Arc<Policy>,
    target: Target,
    privilege: Privilege,
    peers: &'a PeerServer,
    env: &'a [(std::ffi::OsString, std::ffi::OsString)],
}

impl Child {
    fn status(&self) -> control::ChildStatus {
        let spec = lock(&self.spec).clone();
        let live = lock(&self.live);
        let stats = live.cgroup.as_ref().map(|c| (c.stats(), c.pids().ok()));
        control::ChildStatus {
            name: self.name.clone(),
            role: self.role.as_str().to_string(),
            profile: spec.profile,
            state: live.state.as_str().to_string(),
            pid: live.pid,
            uptime_secs: live.since.map(|s| s.elapsed().as_secs()),
            restarts: live.restarts,
            last_exit: live.last_exit.clone(),
            memory_bytes: stats.as_ref().and_then(|(s, _)| s.peak_memory_bytes),
            cpu_ms: stats
                .as_ref()
                .and_then(|(s, _)| s.cpu_usage_ns)
                .map(|n| n / 1_000_000),
            tasks: stats
                .as_ref()
                .and_then(|(_, p)| p.as_ref())
                .map(|p| p.len() as u64),
        }
    }

    fn set_state(&self, s: State) {
        lock(&self.live).state = s;
    }

    /// Start the child once and wait for it (in the calling thread, which must outlive it).
    fn run_once(&self, env: &Env<'_>) -> Result<ExitReport, String> {
        let spec = lock(&self.spec).clone();
        let mut plan = env
            .policy
            .compile(&spec.profile, &env.target)
            .map_err(|d| format!("profile `{}` cannot run here: {d}", spec.profile))?;
        bind_program(&mut plan, &spec.program);
        let brokered = env.policy.broker_view(&spec.profile).is_some();
        let program = OpenedProgram::open(&spec.program).map_err(|e| e.to_string())?;
        let run = Run {
            name: self.name.clone(),
            landlock_abi: env.target.landlock_abi,
            options: LaunchOptions {
                program: Arc::new(program),
                argv0: spec.program.as_os_str().to_os_string(),
                args: spec.args.iter().map(Into::into).collect(),
                workspace: Some(spec.workspace.clone()),
                privilege: env.privilege,
                run_as: RunAs::Auto,
                env: child_env(env.env, &spec.environment),
                broker: brokered,
                listener: self.listener.is_some(),
                supervisor_env: spec
                    .settings
                    .iter()
                    .map(|s| (settings_env(self.role).into(), s.into()))
                    .collect(),
            },
        };
        let fds = ChildFds::new(brokered)?;
        let listener = self.listener.as_ref().map(|l| l.as_fd());
        let started = run::start(plan, &run, fds.io(listener)).map_err(|e| error_chain(&e))?;
        crate::broker_host::say_limits_once(started.limits());
        let (out_read, err_read, pair) = fds.into_parent_ends();
        let pid = started.pid();
        if let Some(mine) = pair {
            let who = new_identity(self.role, &spec.profile);
            tracing::info!(child = %self.name, %who, "broker socket served");
            if env.peers.serve(mine, who).is_none() {
                tracing::warn!(child = %self.name, "broker socket not served (no handler)");
            }
        }
        relay(self.name.clone(), "stdout", out_read);
        relay(self.name.clone(), "stderr", err_read);
        {
            let mut live = lock(&self.live);
            live.pid = Some(pid);
            live.pidfd = pidfd_open(pid).map(Arc::new);
            live.cgroup = started.cgroup().cloned();
            live.since = Some(Instant::now());
            if live.state == State::Starting {
                live.state = State::Running;
            }
        }
        tracing::info!(child = %self.name, pid, profile = %spec.profile, "started");
        let mut ended = started.wait();
        {
            let mut live = lock(&self.live);
            live.pid = None;
            live.pidfd = None;
            live.cgroup = None;
            live.since = None;
        }
        if let Err(e) = ended.remove_cgroup() {
            tracing::warn!(child = %self.name, "removing its cgroup: {}", error_chain(&e));
        }
        ended.report.map_err(|e| error_chain(&e))
    }

    /// The thread body: start, wait, restart with backoff until stopped.
    fn supervise(self: Arc<Self>, svc: Arc<Shared>) {
        let mut failures: u32 = 0;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            self.set_state(State::Starting);
            let started = Instant::now();
            let env = Env {
                policy: svc.policy(),
                target: svc.target,
                privilege: svc.privilege,
                peers: &svc.peers,
                env: &svc.env,
            };
            let outcome = self.run_once(&env);
            let ran = started.elapsed();
            let how = match &outcome {
                Ok(r) => describe_exit(r),
                Err(e) => format!("could not start: {e}"),
            };
            if self.stop.load(Ordering::SeqCst) {
                tracing::info!(child = %self.name, "stopped ({how})");
                let mut live = lock(&self.live);
                live.last_exit = Some(how);
                live.state = State::Stopped;
                break;
            }
            match &outcome {
                Ok(_) => {
                    tracing::warn!(child = %self.name, after_ms = ran.as_millis() as u64, "ended: {how}")
                }
                Err(e) => tracing::error!(child = %self.name, "could not start: {e}"),
            }
            let spec = lock(&self.spec).clone();
            if ran >= STABLE_AFTER {
                failures = 0;
            }
            let delay = spec.restart.delay(failures);
            failures = failures.saturating_add(1);
            let mut live = lock(&self.live);
            live.last_exit = Some(how);
            live.starts.push_back(started);
            while live
                .starts
                .front()
                .is_some_and(|t| t.elapsed() > spec.restart.loop_window)
            {
                live.starts.pop_front();
            }
            if live.starts.len() > spec.restart.loop_starts as usize {
                tracing::error!(
                    child = %self.name,
                    "crash loop: started {} times within {:?}; not restarting it. Fix the \
                     cause, then `carapace reload` (or SIGHUP) tries again",
                    live.starts.len(),
                    spec.restart.loop_window
                );
                live.state = State::Failed;
                live = self
                    .wake
                    .wait_while(live, |l| !l.revive && !self.stop.load(Ordering::SeqCst))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                live.revive = false;
                live.starts.clear();
                failures = 0;
                if self.stop.load(Ordering::SeqCst) {
                    live.state = State::Stopped;
                    break;
                }
                live.restarts += 1;
                tracing::info!(child = %self.name, "trying again after a reload");
                continue;
            }
            live.state = State::Backoff;
            tracing::info!(child = %self.name, "restarting in {delay:?}");
            let deadline = Instant::now() + delay;
            while !self.stop.load(Ordering::SeqCst) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                live = self
                    .wake
                    .wait_timeout(live, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            if self.stop.load(Ordering::SeqCst) {
                live.state = State::Stopped;
                break;
            }
            live.restarts += 1;
        }
    }

    /// Ask it to stop: SIGTERM to every process of its sandbox but the init (the init does not
    /// take SIGTERM; it ends when the program does, and its pid namespace with it).
    fn terminate(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let mut live = lock(&self.live);
        if matches!(live.state, State::Running | State::Starting) {
            live.state = State::Stopping;
        }
        if let Some(init) = live.pid {
            for p in sandbox_members(init, live.cgroup.as_deref()) {
                if let Some(fd) = pidfd_open(p) {
                    pidfd_signal(&fd, libc::SIGTERM);
                } else {
                    // Not our child: pidfd_open works on any pid we can see.
                    tracing::debug!(child = %self.name, pid = p, "already gone");
                }
            }
        }
        self.wake.notify_all();
    }

    /// Kill what is left of it: its init (its pid namespace dies with it) and its cgroup.
    fn kill(&self) {
        let live = lock(&self.live);
        if let Some(fd) = &live.pidfd {
            pidfd_signal(fd, libc::SIGKILL);
        }
        if let Some(cg) = &live.cgroup {
            if let Err(e) = cg.kill_all() {
                tracing::warn!(child = %self.name, "killing its cgroup: {e}");
            }
        }
    }

    fn is_down(&self) -> bool {
        lock(&self.live).pid.is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// The service.

/// The policy in force and where it came from.
#[derive(Debug, Clone)]
struct PolicyInForce {
    policy: Arc<Policy>,
    files: Vec<String>,
    sha256: String,
    loaded: String,
}

/// What the children's threads and the control socket share.
#[derive(Debug)]
struct Shared {
    target: Target,
    /// Root or rootless, decided once at start.
    privilege: Privilege,
    peers: PeerServer,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    policy: RwLock<PolicyInForce>,
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        read(&self.policy).policy.clone()
    }

    fn policy_in_force(&self) -> PolicyInForce {
        read(&self.policy).clone()
    }
}

/// The running service (what the control socket's handler sees).
struct Service {
    shared: Arc<Shared>,
    host: BrokerHost,
    config_source: Option<PathBuf>,
    config_shown: String,
    state: StateDir,
    children: Mutex<Vec<(Arc<Child>, std::thread::JoinHandle<()>)>>,
    notifier: Notifier,
    started: SystemTime,
    started_at: Instant,
    mode: &'static str,
    cgroups: String,
    reloads: AtomicU64,
    last_reload_error: Mutex<Option<String>>,
    /// One reload at a time (SIGHUP and `carapace reload` may race).
    reloading: Mutex<()>,
    /// The configuration in force.
    config: Mutex<Config>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config_shown)
            .finish_non_exhaustive()
    }
}

/// Load the policy a configuration names (the embedded default when it names none).
fn load_policy(cfg: &Config) -> Result<PolicyInForce, String> {
    let (text, name): (String, String) = match cfg.policy.as_slice() {
        [] => (
            crate::embedded::DEFAULT_POLICY.to_string(),
            crate::embedded::DEFAULT_POLICY_NAME.to_string(),
        ),
        [one] => (
            std::fs::read_to_string(one)
                .map_err(|e| format!("cannot read {}: {e}", one.display()))?,
            one.display().to_string(),
        ),
        _ => {
            return Err(
                "more than one policy file: give one file (profiles can build on each \
                        other with `extends` inside it)"
                    .to_string(),
            )
        }
    };
    let policy = Policy::parse(&text, &name).map_err(|d| d.to_string())?;
    for (what, c) in cfg.children() {
        if !policy.profile_names().contains(&c.profile.as_str()) {
            return Err(format!(
                "{what} runs under profile `{}`, which the policy {name} does not define \
                 (profiles: {})",
                c.profile,
                policy.profile_names().join(", ")
            ));
        }
    }
    let wiring = crate::wiring::check(cfg, &policy);
    for w in &wiring.warnings {
        tracing::warn!("{w}");
    }
    if !wiring.errors.is_empty() {
        return Err(format!(
            "the channels are not wired to the policy {name}:\n  {}",
            wiring.errors.join("\n  ")
        ));
    }
    Ok(PolicyInForce {
        policy: Arc::new(policy),
        files: vec![name],
        sha256: carapace_broker::audit::sha256_hex(text.as_bytes()),
        loaded: rfc3339_utc(SystemTime::now()),
    })
}

/// A child's spec from its configuration.
fn spec_of(c: &ChildConfig, exe_dir: &Path) -> Result<Spec, String> {
    let program = c.resolve_program(exe_dir);
    let program = std::fs::canonicalize(&program)
        .map_err(|e| format!("program {}: {e}", program.display()))?;
    Ok(Spec {
        program,
        args: c.args.clone(),
        profile: c.profile.clone(),
        workspace: c.workspace.clone(),
        restart: Restart {
            initial: c.restart.initial_delay,
            max: c.restart.max_delay,
            loop_starts: c.restart.crash_loop_restarts,
            loop_window: c.restart.crash_loop_window,
        },
        environment: c
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        settings: c.settings.clone(),
    })
}

/// The gateway never serves without a token: on a first start with none, create an operator
/// token and show it once — on the terminal when there is one, else in a 0600 file of the state
/// directory (a token must not land in the journal), the log saying where. Only its hash is
/// kept in the store.
fn initial_token(state_root: &Path) -> Result<(), String> {
    use carapace_broker::tokens::{Scope, TokenStore};
    use std::io::{IsTerminal as _, Write as _};
    let store = TokenStore::new(state_root.join(crate::paths::TOKENS_FILE));
    let existing = store.list().map_err(|e| error_chain(&e))?;
    if !existing.is_empty() {
        return Ok(());
    }
    let (info, token) = store
        .create("initial-operator", Scope::Operator)
        .map_err(|e| error_chain(&e))?;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "\ncarapace: no gateway token existed, so an operator token was created (id {}).\n\
             It is shown this once; only its hash is kept:\n\n    {token}\n\n\
             Use it as `Authorization: Bearer <token>`; make more with `carapace token create`.\n",
            info.id
        );
        tracing::info!(id = %info.id, "initial operator token created and shown on the terminal");
        return Ok(());
    }
    let path = state_root.join(crate::paths::INITIAL_TOKEN_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::warn!(
        id = %info.id,
        file = %path.display(),
        "no gateway token existed: an operator token was created; it is in the file named here \
         (mode 0600): read it, then delete the file"
    );
    Ok(())
}

fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// Create a child's workspace (0700, ours) if missing.
fn ensure_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// Kill what supervisors that were SIGKILLed left in our cgroup subtree, then remove their
/// cgroups. Only directories named by [`cgroup::unique_name`] whose supervisor pid is dead,
/// beneath our own `carapace/` directory: processes we (an earlier us) started.
fn clean_leftovers() {
    let Ok(layout) = cgroup::Layout::cached() else {
        return;
    };
    let parents: Vec<PathBuf> = layout
        .v1
        .iter()
        .map(|h| h.own.join(cgroup::PARENT_DIR))
        .chain(layout.unified.iter().map(|u| u.join(cgroup::PARENT_DIR)))
        .collect();
    let me = std::process::id();
    let mut killed = 0usize;
    for parent in &parents {
        let Ok(rd) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let Some(owner) = name.to_str().and_then(cgroup::owner_pid) else {
                continue;
            };
            let alive = i32::try_from(owner).is_ok_and(|p| {
                // SAFETY: kill with signal 0 only checks for existence.
                unsafe {
                    libc::kill(p, 0) == 0
                        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                }
            });
            if owner == me || alive {
                continue;
            }
            let dir = e.path();
            if dir.join("cgroup.kill").exists() {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for p in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: SIGKILL to a process in a cgroup of a dead supervisor of ours.
                unsafe { libc::kill(p, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    if killed > 0 {
        tracing::warn!("killed {killed} process(es) left by a previous supervisor");
        std::thread::sleep(Duration::from_millis(200));
    }
    // remove_stale skips cgroups younger than 2 s (their creator may be starting); a
    // supervisor restarted at once by systemd leaves those for its next start.
    match cgroup::remove_stale() {
        Ok(v) if !v.is_empty() => {
            tracing::info!(
                "removed {} cgroup(s) left by a previous supervisor",
                v.len()
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cleaning stale cgroups: {e}"),
    }
}

/// What cgroups give us here, in words; None when none can be used.
fn cgroup_mode() -> (Option<String>, String) {
    match cgroup::Layout::cached() {
        Ok(l) => {
            let v1: Vec<String> = l.v1.iter().flat_map(|h| h.controllers.clone()).collect();
            let words = match (v1.is_empty(), l.unified.is_some()) {
                (false, true) => format!("hybrid: v1 {} + v2", v1.join(",")),
                (false, false) => format!("v1: {}", v1.join(",")),
                (true, true) => "v2".to_string(),
                (true, false) => return (None, "none".to_string()),
            };
            (Some(words.clone()), words)
        }
        Err(e) => (None, format!("none ({e})")),
    }
}

impl Service {
    fn status(&self) -> control::StatusReport {
        let p = self.shared.policy_in_force();
        let children = lock(&self.children)
            .iter()
            .map(|(c, _)| c.status())
            .collect();
        let (seq, head) = self.host.ops.audit_head();
        control::StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: rfc3339_utc(self.started),
            uptime_secs: self.started_at.elapsed().as_secs(),
            mode: self.mode.to_string(),
            cgroups: self.cgroups.clone(),
            config: self.config_shown.clone(),
            policy: control::PolicyStatus {
                files: p.files,
                sha256: p.sha256,
                loaded: p.loaded,
            },
            reloads: self.reloads.load(Ordering::SeqCst),
            last_reload_error: lock(&self.last_reload_error).clone(),
            children,
            pending_approvals: self.host.approvals.list().len(),
            channels: self.host.ops.channel_stats(),
            dead_letters: self
                .host
                .ops
                .dead_letters()
                .list()
                .map_or(0, |l| l.letters.len()),
            audit: control::AuditStatus {
                path: self.state.audit_log().display().to_string(),
                seq,
                head,
            },
        }
    }

    /// Reload the configuration (from where it came) and the policy. On any error nothing
    /// changes and the error is returned (and logged).
    fn reload(&self) -> Result<control::ReloadReport, String> {
        let _one = lock(&self.reloading);
        let _ = self.notifier.reloading();
        let result = self.try_reload();
        match &result {
            Ok(r) => {
                self.reloads.fetch_add(1, Ordering::SeqCst);
                *lock(&self.last_reload_error) = None;
                tracing::info!("reloaded: {}", r.message);
            }
            Err(e) => {
                *lock(&self.last_reload_error) = Some(e.clone());
                tracing::error!(
                    "reload rejected; the previous configuration and policy stay in force: {e}"
                );
            }
        }
        let _ = self.notifier.ready(&self.status_line());
        result
    }

    fn try_reload(&self) -> Result<control::ReloadReport, String> {
        let cfg = match &self.config_source {
            Some(path) => Config::load(Some(path))
                .map(|(c, _)| c)
                .map_err(|e| e.to_string())?,
            None => lock(&self.config).clone(),
        };
        let new = load_policy(&cfg)?;
        let exe = exe_dir();
        let mut specs = Vec::new();
        for (what, c) in cfg.children() {
            specs.push((what, spec_of(c, &exe)?));
        }
        let old_sha = self.shared.policy_in_force().sha256;
        self.host
            .reload((*new.policy).clone())
            .map_err(|e| error_chain(&e))?;
        let sha = new.sha256.clone();
        *write(&self.shared.policy) = new;
        let mut changed = Vec::new();
        for (c, _) in lock(&self.children).iter() {
            if let Some((_, spec)) = specs.iter().find(|(w, _)| *w == c.name) {
                let mut cur = lock(&c.spec);
                if *cur != *spec {
                    changed.push(c.name.clone());
                    *cur = spec.clone();
                }
            }
            let mut live = lock(&c.live);
            if live.state == State::Failed {
                live.revive = true;
                c.wake.notify_all();
            }
        }
        *lock(&self.config) = cfg;
        let mut message = if sha == old_sha {
            "policy unchanged".to_string()
        } else {
            format!(
                "policy {} in force for new requests",
                &sha[..12.min(sha.len())]
            )
        };
        if !changed.is_empty() {
            message.push_str(&format!(
                "; new settings for {} apply from their next start",
                changed.join(", ")
            ));
        }
        Ok(control::ReloadReport {
            applied: true,
            policy_sha256: sha,
            message,
        })
    }

    fn status_line(&self) -> String {
        let kids = lock(&self.children);
        let running = kids
            .iter()
            .filter(|(c, _)| lock(&c.live).state == State::Running)
            .count();
        format!("{running}/{} children running", kids.len())
    }

    fn approvals(&self) -> control::ApprovalsList {
        let now = Instant::now();
        control::ApprovalsList {
            pending: self
                .host
                .approvals
                .list()
                .iter()
                .map(|p| {
                    let why = lock(&self.host.reasons)
                        .get(&(p.identity.id, p.argv.clone()))
                        .cloned()
                        .unwrap_or_default();
                    control::PendingApproval::from_pending(p, why, now)
                })
                .collect(),
            always: self
                .host
                .approvals
                .grants()
                .iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// Stop: children first (SIGTERM, then kill after `grace`), then the broker.
    fn stop_children(&self, grace: Duration) {
        let kids = std::mem::take(&mut *lock(&self.children));
        for (c, _) in &kids {
            c.terminate();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && kids.iter().any(|(c, _)| !c.is_down()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (c, _) in &kids {
            if !c.is_down() {
                tracing::warn!(child = %c.name, "did not stop within {grace:?}; killed");
                c.kill();
            }
        }
        for (c, t) in kids {
            let until = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(child = %c.name, "its thread did not end");
            }
        }
    }
}

/// The control socket's view of the service.
struct Handler(Arc<Service>);

impl ControlHandler for Handler {
    fn handle(&self, req: Request) -> Result<Value, String> {
        let to_value = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
        let svc = &self.0;
        match req {
            Request::Status => to_value(serde_json::to_value(svc.status())),
            Request::ApprovalsList => to_value(serde_json::to_value(svc.approvals())),
            Request::ApprovalsResolve { id, resolution } => {
                let r = Resolution::parse(&resolution).ok_or_else(|| {
                    format!(
                        "resolution {resolution:?}: expected {}",
                        Resolution::EXPECTED
                    )
                })?;
                let d = svc
                    .host
                    .approvals
                    .resolve(id, r)
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    id,
                    decision = d.as_str(),
                    "approval answered by the operator"
                );
                to_value(serde_json::to_value(control::Resolved {
                    id,
                    decision: d.as_str().to_string(),
                }))
            }
            Request::DlqList => {
                let l = svc
                    .host
                    .ops
                    .dead_letters()
                    .list()
                    .map_err(|e| e.to_string())?;
                to_value(serde_json::to_value(control::DlqList::from(l)))
            }
            Request::DlqRelease { id } => {
                let entry = svc.host.ops.release_dead_letter(&id)?;
                tracing::info!(id = %id, "dead letter released by the operator");
                to_value(serde_json::to_value(control::DlqLetter { id, entry }))
            }
            Request::DlqDrop { id } => {
                svc.host.ops.drop_dead_letter(&id)?;
                tracing::info!(id = %id, "dead letter dropped by the operator");
                Ok(serde_json::json!({ "dropped": id }))
            }
            Request::HeldList => to_value(serde_json::to_value(control::HeldList {
                held: svc.host.ops.held_messages(),
            })),
            Request::HeldAdmit { id, always } => {
                let seq = svc.host.ops.admit_held(&id, always, Some("operator"))?;
                tracing::info!(id = %id, seq, always, "held message admitted by the operator");
                to_value(serde_json::to_value(control::Admitted { id, seq, always }))
            }
            Request::HeldDrop { id } => {
                svc.host.ops.drop_held(&id, Some("operator"))?;
                tracing::info!(id = %id, "held message dropped by the operator");
                Ok(serde_json::json!({ "dropped": id }))
            }
            Request::Reload => to_value(serde_json::to_value(svc.reload()?)),
            Request::AuditTail { .. } => Err("audit_tail is served by the control server".into()),
        }
    }

    fn audit_log(&self) -> PathBuf {
        self.0.state.audit_log()
    }
}

/// Entry point of `carapace run`; returns the process exit code.
pub fn run(a: RunArgs) -> i32 {
    // Before any thread exists: these read and remove environment variables.
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("carapace: NOTIFY_SOCKET: {e}");
            return EXIT_START;
        }
    };
    let activated = match sdnotify::listen_fds() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("carapace: socket activation: {e}");
            return EXIT_START;
        }
    };
    let (cfg, shown) = match Config::load(a.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    if let Err(e) = crate::logging::init(cfg.log_format, cfg.log_level) {
        eprintln!("carapace: logging: {e}");
    }
    let policy = match load_policy(&cfg) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("invalid policy: {e}");
            eprintln!("carapace: {e}");
            return EXIT_CONFIG;
        }
    };
    let exe = exe_dir();
    let mut specs = Vec::new();
    for (what, c) in cfg.children() {
        match spec_of(c, &exe) {
            Ok(s) => specs.push((what.to_string(), c.is_gateway, s)),
            Err(e) => {
                eprintln!("carapace: {what}: {e}");
                return EXIT_CONFIG;
            }
        }
    }
    if a.check {
        println!("configuration: {shown}: ok");
        println!(
            "policy: {}: ok (sha256 {})",
            policy.files.join(", "),
            policy.sha256
        );
        for (what, _, s) in &specs {
            println!(
                "{what}: {} {} (profile {}, workspace {})",
                s.program.display(),
                s.args.join(" "),
                s.profile,
                s.workspace.display()
            );
        }
        return 0;
    }
    match start(cfg, shown, a.config, policy, specs, notifier, activated) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            let _ = Notifier::disabled();
            EXIT_START
        }
    }
}

fn start(
    cfg: Config,
    shown: String,
    config_source: Option<PathBuf>,
    policy: PolicyInForce,
    specs: Vec<(String, bool, Spec)>,
    notifier: Notifier,
    activated: Vec<(OwnedFd, Option<String>)>,
) -> Result<i32, String> {
    // Root or rootless: decided here, once, for every child and tool of this service.
    let privilege = Privilege::of_this_process();
    let root = privilege.is_root();
    let mode = if root { "root" } else { "rootless" };
    let (cg_ok, cg_words) = cgroup_mode();
    let usable = cgroup::usable(privilege);
    let cgroups = match (cg_ok.is_some(), usable, root) {
        (true, true, true) => cg_words,
        (true, true, false) => format!("{cg_words} (delegated)"),
        _ => "none: memory/pids/cpu limited by rlimits only".to_string(),
    };
    tracing::info!(mode, cgroups = %cgroups, config = %shown, "carapace {} starting", env!("CARGO_PKG_VERSION"));
    if cg_ok.is_some() && usable {
        clean_leftovers();
    }
    let signals = catch_signals().map_err(|e| format!("signal handlers: {e}"))?;
    let state = StateDir::open(&cfg.state_dir).map_err(|e| error_chain(&e))?;
    // The workspaces the service creates for its children live in its state directory
    // (0700, ours), which is often beneath /var: allow exactly those.
    let state_canon =
        std::fs::canonicalize(&state.root).map_err(|e| format!("{}: {e}", state.root.display()))?;
    carapace_sandbox::mounts::allow_managed_workspaces(&state_canon);
    if cfg.gateway.is_some() {
        initial_token(&state.root)?;
    }
    let tools_ws = cfg.state_dir.join("tools");
    ensure_dir(&tools_ws)?;
    for (_, _, s) in &specs {
        ensure_dir(&s.workspace)?;
    }
    let target = Target {
        landlock_abi: carapace_sandbox::landlock::probe_abi(),
    };
    let env: Vec<_> = std::env::vars_os().collect();
    let host = BrokerHost::start_with(
        BrokerSetup {
            policy: (*policy.policy).clone(),
            state: state.clone(),
            tools: ToolContext {
                policy: policy.policy.clone(),
                target,
                privilege,
                run_as: RunAs::Auto,
                env: env.clone(),
                workspace: Some(tools_ws),
                live: Default::default(),
            },
            approval_timeout: cfg.approval_timeout,
            token_store: Some(state.root.join(crate::paths::TOKENS_FILE)),
        },
        OperatorChannel::Control,
    )
    .map_err(|e| error_chain(&e))?;
    let (seq, head) = host.ops.audit_head();
    tracing::info!(seq, head = %head, "audit log head at start");

    // The listeners: the gateway's (systemd's, else ours) and each webhook channel's. Bound
    // before any child starts, so a port in use stops the start with a clear error.
    let mut listeners: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let mut activated = activated.into_iter();
    for (_, c) in cfg.children() {
        if c.is_gateway {
            if let Some((fd, name)) = activated.next() {
                tracing::info!(
                    name = name.as_deref().unwrap_or("-"),
                    "gateway listener from systemd socket activation"
                );
                listeners.insert(c.name.clone(), fd);
                continue;
            }
        }
        if let Some(addr) = c.listen {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr} for {}: {e}", c.name))?;
            tracing::info!(child = %c.name, %addr, "listener bound");
            listeners.insert(c.name.clone(), OwnedFd::from(l));
        }
    }

    let shared = Arc::new(Shared {
        target,
        privilege,
        peers: host.peers(),
        env,
        policy: RwLock::new(policy),
    });
    let rt = host.handle();
    let runtime_dir = cfg.runtime_dir.clone();
    let group = cfg.control_group;
    let control = ControlServer::bind(&runtime_dir.join(crate::paths::CONTROL_SOCKET), group)
        .map_err(|e| error_chain(&e))?;
    let control_stop = control.shutdown_handle();
    tracing::info!(socket = %control.path().display(), "control socket ready");

    let svc = Arc::new(Service {
        shared: shared.clone(),
        host,
        config_source: config_source.or_else(|| {
            let d = PathBuf::from(crate::paths::DEFAULT_CONFIG);
            d.exists().then_some(d)
        }),
        config_shown: shown,
        state,
        children: Mutex::new(Vec::new()),
        notifier,
        started: SystemTime::now(),
        started_at: Instant::now(),
        mode,
        cgroups,
        reloads: AtomicU64::new(0),
        last_reload_error: Mutex::new(None),
        reloading: Mutex::new(()),
        config: Mutex::new(cfg.clone()),
    });
    {
        let _g = rt.enter();
        let _task = control.serve(Arc::new(Handler(svc.clone())));
    }

    for (name, is_gateway, spec) in specs {
        let child = Arc::new(Child {
            name: name.clone(),
            role: if is_gateway {
                Role::Gateway
            } else {
                Role::Channel
            },
            listener: listeners.remove(&name),
            spec: Mutex::new(spec),
            live: Mutex::new(Live {
                state: State::Starting,
                pid: None,
                pidfd: None,
                cgroup: None,
                since: None,
                restarts: 0,
                last_exit: None,
                starts: VecDeque::new(),
                revive: false,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (c2, s2) = (child.clone(), shared.clone());
        let t = std::thread::Builder::new()
            .name(format!("carapace-{name}"))
            .spawn(move || c2.supervise(s2))
            .map_err(|e| format!("cannot start a thread for {name}: {e}"))?;
        lock(&svc.children).push((child, t));
    }

    let _ = svc.notifier.ready(&svc.status_line());
    tracing::info!("ready");
    let tick = svc
        .notifier
        .watchdog_interval()
        .filter(|_| cfg.watchdog)
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut last_status = String::new();
    loop {
        match next_signal(&signals, tick) {
            Some(libc::SIGHUP) => {
                tracing::info!("SIGHUP: reloading");
                let _ = svc.reload();
            }
            Some(sig) if SIGNALS.contains(&sig) => {
                tracing::info!(signal = sig, "stopping");
                break;
            }
            _ => {}
        }
        if cfg.watchdog {
            let _ = svc.notifier.watchdog();
        }
        let line = svc.status_line();
        if line != last_status {
            let _ = svc.notifier.status(&line);
            last_status = line;
        }
    }

    let _ = svc.notifier.stopping();
    control_stop.shutdown();
    svc.stop_children(cfg.stop_timeout);
    let (seq, head) = svc.host.ops.audit_head();
    tracing::info!(seq, head = %head, "audit log head at stop (keep it to detect truncation)");
    // The control server drops its handle on the service as it winds down.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Arc::strong_count(&svc) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    match Arc::try_unwrap(svc) {
        Ok(svc) => svc.host.shutdown(),
        Err(svc) => {
            tracing::warn!("the control socket still holds the service; killing the tools");
            let n = svc.host.tools().kill_all(Duration::from_secs(5));
            if n > 0 {
                tracing::info!("killed {n} tool(s) still running for the broker");
            }
        }
    }
    tracing::info!("stopped");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = Restart {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            loop_starts: 5,
            loop_window: Duration::from_secs(60),
        };
        assert_eq!(r.delay(0), Duration::from_millis(500));
        assert_eq!(r.delay(1), Duration::from_secs(1));
        assert_eq!(r.delay(3), Duration::from_secs(4));
        assert_eq!(r.delay(6), Duration::from_secs(30));
        assert_eq!(r.delay(1000), Duration::from_secs(30));
    }

    #[test]
    fn a_program_outside_every_mount_is_bound_alone() {
        let policy = Policy::parse(crate::embedded::DEFAULT_POLICY, "default").unwrap();
        let mut plan = policy
            .compile("gateway", &Target { landlock_abi: 6 })
            .unwrap();
        let before = plan.mounts.len();
        bind_program(&mut plan, Path::new("/usr/bin/true"));
        assert_eq!(
            plan.mounts.len(),
            before,
            "/usr is mounted read-exec already"
        );
        bind_program(&mut plan, Path::new("/opt/x/carapace-gateway"));
        assert_eq!(plan.mounts.len(), before + 1);
        let i = plan
            .mounts
            .iter()
            .position(|m| m.dst() == Path::new("/opt/x/carapace-gateway"))
            .unwrap();
        // Parents first: every mount before it is no deeper; symlinks stay last.
        assert!(plan.mounts[..i]
            .iter()
            .all(|m| m.dst().components().count() <= 4));
        assert!(plan.mounts[i + 1..]
            .iter()
            .all(|m| !matches!(m, Mount::Bind { .. })
                || m.dst().components().count() > 4
                || matches!(m, Mount::Symlink { .. })));
        assert!(plan.landlock.rules.iter().any(|r| r.path
            == LandlockPath::Host("/opt/x/carapace-gateway".into())
            && r.rights.execute
            && !r.rights.write));
    }

    #[test]
    fn configured_variables_join_and_override_the_environment() {
        let base = vec![("PATH".into(), "/bin".into()), ("LANG".into(), "C".into())];
        let env = child_env(
            &base,
            &[
                ("LANG".into(), "en_US.UTF-8".into()),
                ("X".into(), "1".into()),
            ],
        );
        let get = |k: &str| {
            env.iter()
                .filter(|(n, _)| n.as_os_str() == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("PATH"), ["/bin"]);
        assert_eq!(get("LANG"), ["en_US.UTF-8"]);
        assert_eq!(get("X"), ["1"]);
    }

    #[test]
    fn child_log_levels_are_kept() {
        assert_eq!(
            split_level(" WARN no broker"),
            (Some(tracing::Level::WARN), "no broker")
        );
        assert_eq!(split_level("ERROR x"), (Some(tracing::Level::ERROR), "x"));
        assert_eq!(
            split_level(" INFO  serving"),
            (Some(tracing::Level::INFO), "serving")
        );
        assert_eq!(split_level("INFORMATION"), (None, "INFORMATION"));
        assert_eq!(split_level("plain text"), (None, "plain text"));
    }

    #[test]
    fn exits_are_described() {
        let mut r = ExitReport {
            code: Some(3),
            signal: None,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
            peak_mem: 0,
            oom_killed: false,
            timed_out: false,
        };
        assert_eq!(describe_exit(&r), "exit=3");
        r.code = None;
        r.signal = Some(9);
        r.oom_killed = true;
        assert_eq!(describe_exit(&r), "signal=9 (oom)");
    }
}
