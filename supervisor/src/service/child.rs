//! One configured child (the gateway, a channel adapter): its spec, its live state, and the thread
//! that starts it through the one run path, waits for it and restarts it with backoff.

use super::*;

/// What a child is, from the configuration (applies from its next start).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Spec {
    /// Canonical host path of its program.
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) profile: String,
    pub(super) workspace: PathBuf,
    pub(super) restart: Restart,
    /// Added to (and overriding) the supervisor's environment; the profile's
    /// `environment.pass` still decides what reaches the child.
    pub(super) environment: Vec<(String, String)>,
    /// The gateway's settings JSON (`$CARAPACE_GATEWAY_SETTINGS`); None for channels.
    pub(super) settings: Option<String>,
}

/// Where a child reads its settings JSON: the gateway (gateway/src/settings.rs) or a built-in
/// channel adapter (channels/src/settings.rs).
pub(super) fn settings_env(role: Role) -> &'static str {
    match role {
        Role::Gateway => "CARAPACE_GATEWAY_SETTINGS",
        _ => "CARAPACE_CHANNEL_SETTINGS",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Restart {
    pub(super) initial: Duration,
    pub(super) max: Duration,
    /// More than this many starts within `window` is a crash loop.
    pub(super) loop_starts: u32,
    pub(super) loop_window: Duration,
}

impl Restart {
    /// Delay before restart number `n` (0-based) of a run of failures.
    pub(super) fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Starting,
    Running,
    Backoff,
    Failed,
    Stopping,
    Stopped,
}

impl State {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct Live {
    pub(super) state: State,
    pub(super) pid: Option<i32>,
    /// A pidfd of the running sandbox's init (signals cannot hit a recycled pid).
    pub(super) pidfd: Option<Arc<OwnedFd>>,
    pub(super) cgroup: Option<Arc<Cgroup>>,
    pub(super) since: Option<Instant>,
    pub(super) restarts: u32,
    pub(super) last_exit: Option<String>,
    /// Start times within the crash-loop window.
    pub(super) starts: VecDeque<Instant>,
    /// Set by a reload: a failed child is tried again.
    pub(super) revive: bool,
}

/// One supervised child (the gateway or a channel adapter).
#[derive(Debug)]
pub(super) struct Child {
    pub(super) name: String,
    pub(super) role: Role,
    /// The listening socket it gets at fd 4 (the gateway's, a webhook channel's), bound once
    /// at start by the supervisor and kept across restarts: connections wait in its backlog
    /// while the child is down.
    pub(super) listener: Option<OwnedFd>,
    /// A daemon's end of the socket pair with its channel's adapter (whose end is the
    /// adapter's `listener`), given to the daemon as stdin and stdout; kept across restarts.
    pub(super) stdio: Option<OwnedFd>,
    pub(super) spec: Mutex<Spec>,
    pub(super) live: Mutex<Live>,
    pub(super) wake: Condvar,
    pub(super) stop: AtomicBool,
}

/// The host pids of a sandbox's processes other than its init: from its cgroup, else from the
/// init's children list in /proc.
pub(super) fn sandbox_members(init: i32, cg: Option<&Cgroup>) -> Vec<i32> {
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

pub(super) fn describe_exit(r: &ExitReport) -> String {
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
pub(super) fn relay(name: String, stream: &'static str, fd: OwnedFd) {
    let child = name.clone();
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
        tracing::warn!(child = %child, stream, "cannot relay the output: {e}");
    }
}

/// A child's log line that starts with a level word (`ERROR`, `WARN`, `INFO`, `DEBUG`,
/// `TRACE`, as tracing's formatter writes them) is logged at that level without it; any other
/// line at info, as it is.
pub(super) fn split_level(line: &str) -> (Option<tracing::Level>, &str) {
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
pub(super) fn bind_program(plan: &mut Plan, program: &Path) {
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
pub(super) fn child_env(
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
pub(super) struct Env<'a> {
    pub(super) policy: Arc<Policy>,
    pub(super) target: Target,
    pub(super) privilege: Privilege,
    pub(super) peers: &'a PeerServer,
    pub(super) env: &'a [(std::ffi::OsString, std::ffi::OsString)],
    pub(super) metrics: &'a Metrics,
}

impl Child {
    pub(super) fn status(&self) -> control::ChildStatus {
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

    pub(super) fn set_state(&self, s: State) {
        lock(&self.live).state = s;
    }

    /// Start the child once and wait for it (in the calling thread, which must outlive it).
    pub(super) fn run_once(&self, env: &Env<'_>) -> Result<ExitReport, ServiceError> {
        let spec = lock(&self.spec).clone();
        let mut plan = env
            .policy
            .compile(&spec.profile, &env.target)
            .map_err(|source| ServiceError::Compile {
                profile: spec.profile.clone(),
                source,
            })?;
        bind_program(&mut plan, &spec.program);
        let brokered = env.policy.broker_view(&spec.profile).is_some();
        let program = OpenedProgram::open(&spec.program)?;
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
                    .map(|s| match self.role {
                        Role::Gateway => {
                            super::wiring::gateway_settings(s, &env.policy, &spec.profile)
                        }
                        _ => s.clone(),
                    })
                    .map(|s| (settings_env(self.role).into(), s.into()))
                    .collect(),
            },
        };
        let fds = ChildFds::new(brokered)?;
        let listener = self.listener.as_ref().map(|l| l.as_fd());
        let mut io = fds.io(listener);
        if let Some(sock) = &self.stdio {
            io.stdin = Some(sock.as_fd());
            io.stdout = Some(sock.as_fd());
        }
        let mut started = run::start(plan, &run, io)?;
        crate::broker_host::say_limits_once(started.limits());
        let (out_read, err_read, pair) = fds.into_parent_ends();
        let pid = started.pid();
        let who = new_identity(self.role, &spec.profile);
        if let Some(mine) = pair {
            tracing::info!(child = %self.name, %who, "broker socket served");
            if env.peers.serve(mine, who.clone()).is_none() {
                tracing::warn!(child = %self.name, "broker socket not served (no handler)");
            }
        }
        // A brokered network: its listeners exist already (made before the program could
        // run); forward what arrives there until the child ends (the forwarder is dropped
        // after the wait below).
        let listeners = started.take_forward();
        let _forwarder = if listeners.is_empty() {
            None
        } else {
            let hosts: Vec<String> = listeners
                .iter()
                .map(|l| format!("{}:{}", l.host, l.port))
                .collect();
            match super::egress::Forwarder::start(&self.name, listeners, env.peers, who) {
                Ok(f) => {
                    tracing::info!(child = %self.name, hosts = %hosts.join(" "), "brokered network: forwarding");
                    Some(f)
                }
                Err(e) => {
                    // Without the forwarder every connection of the program is refused;
                    // it runs on (its other work may not need the network), said loudly.
                    tracing::error!(child = %self.name, "brokered network not forwarded: {}", error_chain(&e));
                    None
                }
            }
        };
        relay(self.name.clone(), "stdout", out_read);
        relay(self.name.clone(), "stderr", err_read);
        {
            let mut live = lock(&self.live);
            live.pid = Some(pid);
            live.pidfd = crate::pidfd::open(pid).map(Arc::new);
            live.cgroup = started.cgroup().cloned();
            live.since = Some(Instant::now());
            if live.state == State::Starting {
                live.state = State::Running;
            }
        }
        tracing::info!(child = %self.name, pid, profile = %spec.profile, "started");
        env.metrics.child_started(&self.name);
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
        Ok(ended.report?)
    }

    /// The thread body: start, wait, restart with backoff until stopped.
    pub(super) fn supervise(self: Arc<Self>, svc: Arc<Shared>) {
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
                metrics: &svc.metrics,
            };
            let outcome = self.run_once(&env);
            let ran = started.elapsed();
            let how = match &outcome {
                Ok(r) => describe_exit(r),
                Err(e) => format!("could not start: {}", error_chain(e)),
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
                svc.metrics.child_restarted(&self.name);
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
            svc.metrics.child_restarted(&self.name);
        }
    }

    /// Ask it to stop: SIGTERM to every process of its sandbox but the init (the init does not
    /// take SIGTERM; it ends when the program does, and its pid namespace with it).
    pub(super) fn terminate(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let mut live = lock(&self.live);
        if matches!(live.state, State::Running | State::Starting) {
            live.state = State::Stopping;
        }
        if let Some(init) = live.pid {
            for p in sandbox_members(init, live.cgroup.as_deref()) {
                if let Some(fd) = crate::pidfd::open(p) {
                    crate::pidfd::signal(&fd, libc::SIGTERM);
                } else {
                    // Not our child: pidfd_open works on any pid we can see.
                    tracing::debug!(child = %self.name, pid = p, "already gone");
                }
            }
        }
        self.wake.notify_all();
    }

    /// Kill what is left of it: its init (its pid namespace dies with it) and its cgroup.
    pub(super) fn kill(&self) {
        let live = lock(&self.live);
        if let Some(fd) = &live.pidfd {
            crate::pidfd::signal(fd, libc::SIGKILL);
        }
        if let Some(cg) = &live.cgroup {
            if let Err(e) = cg.kill_all() {
                tracing::warn!(child = %self.name, "killing its cgroup: {e}");
            }
        }
    }

    pub(super) fn is_down(&self) -> bool {
        lock(&self.live).pid.is_none()
    }
}
