//! `carapace-gateway`: the agent gateway, run as a confined child of `carapace run`.
//!
//! It serves HTTP and WebSocket (JSON-RPC 2.0) on the listening socket the supervisor hands
//! over at `$CARAPACE_LISTEN_FD`, and asks the broker at `$CARAPACE_BROKER_FD` for everything
//! that acts: checking a client's token, running a tool, sending a message, reaching the model,
//! reading the model's API key, answering an approval. It cannot exec, cannot reach the
//! network and cannot read a credential by itself. Protocol: docs/protocol.md ("The gateway
//! protocol").
//!
//! | module | room |
//! |---|---|
//! | [`server`] | hyper/axum transport: timeouts, caps, routes, authentication of requests |
//! | [`console`] | the operator's web console: embedded page, script and style, strict headers |
//! | [`ws`] | one WebSocket connection: calls in tasks, one bounded outgoing queue, idle and stall limits |
//! | [`rpc`] | JSON-RPC frames and the error table |
//! | [`methods`] | the methods, one file per family |
//! | [`owner`] | who a request acts for: the owner of its tools' workspace |
//! | [`auth`] | bearer tokens (hashed, checked by the broker), failed-attempt limit |
//! | [`broker`] | a pool of broker sessions usable from async code |
//! | [`schedule`] | the broker budget, shared fairly by client tokens |
//! | [`inbound`] | answering channel messages: lanes, concurrency, low-water acknowledgement |
//! | [`jobs`] | scheduled jobs: the schedule, missed runs, run requests, the history |
//! | [`sessions`] | conversation sessions as JSON lines |
//! | [`openai`] | the OpenAI-compatible door: `/v1/chat/completions` (plain and streamed), `/v1/models` |
//! | [`redact`] | answers redacted on the way out (the broker's `redact` op: secret values, the profile's patterns) |
//! | [`llm`] | the OpenAI-compatible chat-completions client over broker connections |
//! | [`settings`] | what the supervisor tells the gateway (`$CARAPACE_GATEWAY_SETTINGS`) |

pub mod app;
pub mod auth;
pub mod broker;
pub mod console;
pub mod inbound;
pub mod jobs;
pub mod llm;
pub mod methods;
pub mod openai;
pub mod owner;
pub mod redact;
pub mod rpc;
pub mod schedule;
pub mod server;
pub mod sessions;
pub mod settings;
pub mod ws;

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Names the listening socket handed over by the supervisor.
pub const LISTEN_FD_ENV: &str = "CARAPACE_LISTEN_FD";

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no listening socket: {LISTEN_FD_ENV} is not set (run me under `carapace run`)")]
    NoListener,
    #[error("{LISTEN_FD_ENV}={0:?} is not a file descriptor above 2")]
    BadListenFd(String),
    #[error("fd {fd} ({LISTEN_FD_ENV}) is not a listening TCP socket: {why}")]
    NotAListener { fd: RawFd, why: String },
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("serving failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The listening socket at `$CARAPACE_LISTEN_FD`, owned.
pub fn listener_from_env() -> Result<TcpListener, StartError> {
    let v = std::env::var(LISTEN_FD_ENV).map_err(|_| StartError::NoListener)?;
    let fd: RawFd = v
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| StartError::BadListenFd(v.clone()))?;
    check_listener(fd)?;
    // SAFETY: `fd` is open (getsockopt succeeded on it in check_listener) and is handed to us
    // by the supervisor for our exclusive use; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // The listener must not leak into anything this process might start.
    set_cloexec(owned.as_fd());
    Ok(TcpListener::from(owned))
}

/// FD_CLOEXEC on a descriptor we own (it cannot fail: the descriptor is open).
fn set_cloexec(fd: BorrowedFd<'_>) {
    let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
}

fn sockopt(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; the kernel checks `fd`.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&raw mut v).cast(), &raw mut len) };
    if r == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn check_listener(fd: RawFd) -> Result<(), StartError> {
    let bad = |why: &str| StartError::NotAListener {
        fd,
        why: why.to_string(),
    };
    let ty = sockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) || e.raw_os_error() == Some(libc::EBADF) {
            bad("it is not a socket (or not open)")
        } else {
            bad(&e.to_string())
        }
    })?;
    let domain = sockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| bad(&e.to_string()))?;
    if ty != libc::SOCK_STREAM || !(domain == libc::AF_INET || domain == libc::AF_INET6) {
        return Err(bad(
            "it is not a TCP/IP (AF_INET/AF_INET6 SOCK_STREAM) socket",
        ));
    }
    let listening =
        sockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| bad(&e.to_string()))?;
    if listening == 0 {
        return Err(bad("the socket is not listening"));
    }
    Ok(())
}

/// The broker socket at `$CARAPACE_BROKER_FD`, if there is one.
pub fn broker_from_env() -> Option<OwnedFd> {
    let fd = carapace_broker::client::broker_fd_from_env().ok()?;
    // Check it is a broker socket (SOCK_SEQPACKET) by opening (and dropping) a session on it.
    match carapace_broker::client::Client::from_env() {
        Ok(c) => {
            drop(c);
            // SAFETY: the inherited broker socket is ours alone to own from here on; nothing
            // else in this process closes it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            set_cloexec(owned.as_fd());
            Some(owned)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no broker: every method but gateway.ping answers unavailable");
            None
        }
    }
}

/// Run the gateway: settings and sockets from the environment, serve until SIGTERM/SIGINT.
pub fn run() -> Result<(), StartError> {
    let settings = settings::Settings::from_env()?;
    let listener = listener_from_env()?;
    let broker = broker::Broker::with_budget(broker_from_env(), settings.broker_rate);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("gateway")
        .build()
        .map_err(StartError::Runtime)?;
    rt.block_on(async move {
        let app = Arc::new(app::App::new(settings, broker));
        tokio::spawn(app::approval_feed(app.clone()));
        tokio::spawn(app::inbound_feed(app.clone()));
        tokio::spawn(jobs::run_jobs(app.clone()));
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        match app.settings.broker_rate {
            Some(r) => tracing::info!(
                %addr,
                pid = std::process::id(),
                broker_rate = r.requests_per_second,
                broker_burst = r.burst,
                "serving; the broker budget is shared fairly by client tokens"
            ),
            None => tracing::info!(%addr, pid = std::process::id(), "serving"),
        }
        server::serve(listener, app, shutdown_signal())
            .await
            .map_err(StartError::Serve)
    })
}

/// Resolves on SIGTERM or SIGINT (never, when the handlers cannot be installed): the stop of a
/// confined child, which the supervisor sends before it kills the cgroup.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}

/// The fuzz entry point (`fuzz/fuzz_targets/gateway.rs`, corpus replayed by
/// `gateway/tests/fuzz_corpus.rs`): everything the gateway parses from outside — a client's
/// JSON-RPC frame, a model endpoint's answer, an `Authorization` header and a query string, its
/// settings and an endpoint URL. Nothing may panic; what decodes must hold its invariants.
pub fn fuzz_input(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match rpc::decode(&text) {
        Ok(call) => {
            assert!(!call.method.is_empty() && call.method.len() <= 64);
            assert!(call.params.is_object());
            assert!(call.id.is_string() || call.id.is_number());
            let resp = rpc::response(&call.id, Err(rpc::RpcError::invalid_params("x")));
            assert_eq!(resp["id"], call.id);
        }
        Err((id, e)) => {
            assert!(id.is_null() || id.is_string() || id.is_number());
            assert!(!e.message.is_empty());
        }
    }
    if let Ok(r) = llm::parse_reply(data) {
        assert!(r.message.is_object());
    }
    if let Some(t) = auth::bearer(Some(data)) {
        assert!(!t.is_empty() && t.len() <= 256 && t.bytes().all(|b| b.is_ascii_graphic()));
    }
    if let Some(t) = auth::query_token(Some(&text)) {
        assert!(!t.is_empty());
    }
    let _ = settings::Settings::from_json(&text);
    if let Ok(ep) = llm::Endpoint::parse(&text) {
        assert!(!ep.host.is_empty() && ep.port != 0);
    }
    let _ = sessions::valid_name(&text);
}

/// The `main` of a confined child of the supervisor (the gateway, a channel adapter): `--help`
/// prints `usage`, `--version` the version; any other argument is a usage error (2). Logs go to
/// stderr, without time (the supervisor relays each line into its own log, with its own
/// timestamp), at `$CARAPACE_LOG` (default info). `run`'s error is printed and exits 2.
pub fn child_main<E: std::fmt::Display>(
    name: &str,
    version: &str,
    usage: &str,
    run: impl FnOnce() -> Result<(), E>,
) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            print!("{usage}");
            return 0;
        }
        Some("-V" | "--version") => {
            println!("{name} {version}");
            return 0;
        }
        Some(other) => {
            eprintln!("{name}: unexpected argument {other:?}\n\n{usage}");
            return 2;
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{name}: {e}");
            2
        }
    }
}
