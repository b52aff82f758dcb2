//! `carapace run`: the supervisor as a long-running service.
//!
//! One process, started by systemd (`Type=notify`) or by hand:
//!
//! 1. reads its configuration ([`crate::service::config`]) and the policy, strictly: an invalid one
//!    stops the start with every error (exit 78, `EX_CONFIG`, which the unit file tells
//!    systemd not to restart on);
//! 2. kills and removes what a previous, killed supervisor left in its cgroup subtree;
//! 3. starts the broker (audit log, approvals held in memory, dead letters) on a tokio
//!    runtime, binds the listening sockets of the gateway (or takes it from systemd socket
//!    activation) and of webhook channels, the control socket, and beside it the exec socket
//!    (`carapace exec` through this supervisor, [`crate::exec_socket`]);
//! 4. starts each configured child (the gateway, channel adapters) as a confined child with
//!    its own broker socket (fd 3) and, where it has one, its listener (fd 4), through the
//!    sandbox's one run path, like `carapace exec`. Each child has a thread of its own that
//!    forks it (`PR_SET_PDEATHSIG` is tied to the forking thread) and waits for it, and
//!    restarts it with exponential backoff; a crash loop stops the restarts and says so;
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

pub mod config;
pub mod logging;
pub mod metrics;
pub mod sdnotify;
pub mod wiring;

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead as _, Read as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::control::{self, ControlHandler, ControlServer, Request};
use crate::errors::error_chain;
use crate::exec_socket::{ExecContext, ExecServer};
use carapace_sandbox::cgroup::{self, Cgroup};
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::ExitReport;
use carapace_sandbox::run::{self, Run};
use carapace_sandbox::spawn::LaunchOptions;
use carapace_sandbox::Privilege;
use config::{ChildConfig, Config};
use metrics::Metrics;
use sdnotify::Notifier;

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
    /// Validate the configuration and the policy, compile each child's profile for this
    /// kernel, say what would run, and exit (0, or 78 when something is wrong)
    #[arg(long)]
    pub check: bool,
    /// With --check: print one JSON object instead of text (schema in docs/operations.md)
    #[arg(long, requires = "check")]
    pub json: bool,
}

mod error;
pub use error::ServiceError;
mod signals;
use signals::*;
mod child;
use child::*;
mod state;
use state::*;
mod setup;
use setup::*;
mod requests;
use requests::*;
mod check;
/// A brokered network's forwarding (a child's connections through the broker's `connect`).
mod egress;
mod jobs;

/// Entry point of `carapace run`; returns the process exit code.
pub fn run(a: RunArgs) -> i32 {
    if a.check {
        // Nothing is started, so nothing of systemd's environment is taken over.
        return check::check(&a);
    }
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
            match &e {
                config::ConfigErrors::Invalid(d) => {
                    eprintln!("{}", d.render(crate::errors::stderr_wants_colour()))
                }
                e => eprintln!("{e}"),
            }
            return EXIT_CONFIG;
        }
    };
    if let Err(e) = logging::init(cfg.log_format, cfg.log_level) {
        eprintln!("carapace: logging: {e}");
    }
    let policy = match load_policy(&cfg) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("invalid policy: {}", error_chain(&e));
            let shown = crate::errors::for_a_person(&e, crate::errors::stderr_wants_colour());
            eprintln!("carapace: {shown}");
            return EXIT_CONFIG;
        }
    };
    let exe = exe_dir();
    let mut specs = Vec::new();
    for (what, c) in cfg.children() {
        match spec_of(c, &exe) {
            Ok(s) => specs.push((what.to_string(), c.is_gateway, s)),
            Err(e) => {
                eprintln!("carapace: {what}: {}", error_chain(&e));
                return EXIT_CONFIG;
            }
        }
    }
    match start(cfg, shown, a.config, policy, specs, notifier, activated) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("cannot start: {}", error_chain(&e));
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
) -> Result<i32, ServiceError> {
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
    let state = StateDir::open(&cfg.state_dir)?;
    // The workspaces the service creates for its children live in its state directory
    // (0700, ours), which is often beneath /var: allow exactly those.
    let state_canon = std::fs::canonicalize(&state.root).map_err(|source| ServiceError::Io {
        op: "canonicalize",
        path: state.root.clone(),
        source,
    })?;
    carapace_sandbox::mounts::allow_managed_workspaces(&state_canon);
    // The broker's tools are started by small processes forked here, before the broker's
    // runtime or any other thread exists (see carapace_sandbox::spawner); without them, by
    // the supervisor itself.
    let spawner = match spawner_count() {
        0 => Err(carapace_sandbox::spawner::SpawnerError::Off),
        n => carapace_sandbox::spawner::Spawner::start(n),
    };
    let spawner = match spawner {
        Ok(s) => {
            tracing::info!(pids = ?s.pids(), "tool spawners started");
            Some(s)
        }
        Err(e) => {
            tracing::warn!(
                "no tool spawner ({}): tools are started from the supervisor itself",
                error_chain(&e)
            );
            None
        }
    };
    let signals = catch_signals().map_err(|source| ServiceError::Signals { source })?;
    if cfg.gateway.is_some() {
        initial_token(&state.root)?;
    }
    let tools_ws = cfg.state_dir.join("tools");
    ensure_dir(&tools_ws)?;
    // Each owner's own tools workspace is made beneath this one on its first tool.
    let owners_ws = cfg.state_dir.join("workspaces").join("owners");
    ensure_dir(&owners_ws)?;
    for (_, _, s) in &specs {
        ensure_dir(&s.workspace)?;
    }
    let target = Target {
        landlock_abi: carapace_sandbox::landlock::probe_abi(),
    };
    let env: Vec<_> = std::env::vars_os().collect();
    let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")));
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
                owners_root: Some(owners_ws),
                live: Default::default(),
                plans: Default::default(),
                cgroups: Default::default(),
                spawner,
            },
            approval_timeout: cfg.approval_timeout,
            token_store: Some(state.root.join(crate::paths::TOKENS_FILE)),
            audit_rotation: cfg.audit_rotation,
            workspaces: cfg.granted_workspaces(),
        },
        OperatorChannel::Control,
        Some(metrics.clone()),
    )?;
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
            let l = std::net::TcpListener::bind(addr).map_err(|source| ServiceError::Listen {
                addr,
                child: c.name.clone(),
                source,
            })?;
            tracing::info!(child = %c.name, %addr, "listener bound");
            listeners.insert(c.name.clone(), OwnedFd::from(l));
        }
    }
    // Each daemon and its channel's adapter share one socket pair, made once and kept across
    // restarts of either: the daemon's end is its stdin and stdout, the adapter's its fd 4.
    let mut stdio: BTreeMap<String, OwnedFd> = BTreeMap::new();
    for d in cfg.daemons.values() {
        let Some(channel) = &d.serves else { continue };
        let (adapter_end, daemon_end) =
            std::os::unix::net::UnixStream::pair().map_err(|source| ServiceError::Pair {
                child: d.name.clone(),
                source,
            })?;
        tracing::info!(child = %d.name, %channel, "daemon socket pair made");
        listeners.insert(channel.clone(), OwnedFd::from(adapter_end));
        stdio.insert(d.name.clone(), OwnedFd::from(daemon_end));
    }
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| ServiceError::MetricsListen { addr, source })?;
            tracing::info!(%addr, "metrics listener bound (GET /metrics)");
            Some(l)
        }
        None => None,
    };

    let shared = Arc::new(Shared {
        target,
        privilege,
        peers: host.peers(),
        env,
        policy: RwLock::new(policy),
        metrics,
    });
    let rt = host.handle();
    let runtime_dir = cfg.runtime_dir.clone();
    let group = cfg.control_group;
    let control = ControlServer::bind(&runtime_dir.join(crate::paths::CONTROL_SOCKET), group)?;
    let control_stop = control.shutdown_handle();
    tracing::info!(socket = %control.path().display(), "control socket ready");
    // Beside the control socket, whose binding proved that no other supervisor serves here.
    let exec_server = ExecServer::bind(&runtime_dir.join(crate::exec_socket::EXEC_SOCKET))?;

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
        // The broker's `children` op (the operator's console) sees what `carapace status`
        // shows; held weakly, like the metrics listener's view.
        let weak = Arc::downgrade(&svc);
        svc.host
            .ops
            .set_children_source(Arc::new(move || match weak.upgrade() {
                Some(s) => s.children_summary(),
                None => Vec::new(),
            }));
    }
    {
        let _g = rt.enter();
        let _task = control.serve(Arc::new(Handler(svc.clone())));
    }
    let exec_path = exec_server.path().to_path_buf();
    let exec_serving = exec_server.serve(ExecContext {
        ops: svc.host.ops.clone(),
        tools: svc.host.tool_context(),
        peers: svc.host.peers(),
    })?;
    tracing::info!(socket = %exec_path.display(), "exec socket ready");
    // The listener holds the service weakly: it never keeps it alive past the stop.
    let metrics_task = match metrics_listener {
        Some(l) => {
            let weak = Arc::downgrade(&svc);
            let scrape: metrics::http::Scrape = Arc::new(move || match weak.upgrade() {
                Some(svc) => svc.metrics_text().map_err(|e| e.to_string()),
                None => Err("the service is stopping".to_string()),
            });
            let _g = rt.enter();
            Some(metrics::http::serve(l, scrape)?)
        }
        None => None,
    };

    for (name, is_gateway, spec) in specs {
        let child = Arc::new(Child {
            name: name.clone(),
            role: if is_gateway {
                Role::Gateway
            } else {
                Role::Channel
            },
            listener: listeners.remove(&name),
            stdio: stdio.remove(&name),
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
            .map_err(|source| ServiceError::Thread {
                child: name.clone(),
                source,
            })?;
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
    exec_serving.stop();
    if let Some(t) = metrics_task {
        t.abort();
    }
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
            let n = svc.host.kill_tools(Duration::from_secs(5));
            if n > 0 {
                tracing::info!("killed {n} tool(s) still running for the broker");
            }
        }
    }
    tracing::info!("stopped");
    Ok(0)
}

#[cfg(test)]
mod tests;
