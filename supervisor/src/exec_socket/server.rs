//! The supervisor's side: bind the exec socket, accept on a thread of its own, and serve each
//! connection on a thread of its own, one straight sequence of steps ([`serve_one`]).

use std::ffi::OsString;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carapace_broker::audit::AuditDecision;
use carapace_broker::ops::Ops;
use carapace_broker::server::Role;
use carapace_policy::{Approval, Plan};
use carapace_sandbox::fds::passing::{self, Received};
use carapace_sandbox::namespaces::{HostIds, RunAs};
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::{EXIT_DENIED, EXIT_SETUP};
use nix::sys::socket::{self, sockopt};

use super::*;
use crate::broker_host::{new_identity, spawn_tool, Caller, PeerServer, ToolContext, ToolPlace};
use crate::control::{bind_into_place, euid, ControlError, SocketFile};
use crate::decide::{command_words, decide_with, rule_words};
use crate::errors::error_chain;

/// Connections served at the same time; one more is told to come back later.
const MAX_CONNECTIONS: usize = 256;
/// How long the request may take to arrive after the connect.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `ask` waits for the caller's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the accepting thread looks at its stop flag.
const ACCEPT_POLL_MS: u16 = 200;

/// What the runs of the exec socket share with the broker's tools.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// The policy in force and the audit log.
    pub ops: Arc<Ops>,
    /// The plans, the cgroups made ahead, the spawners, the running tools.
    pub tools: Arc<ToolContext>,
    /// Serves the broker socket of a tool whose profile has a broker section.
    pub peers: PeerServer,
}

/// The bound exec socket, not yet served.
#[derive(Debug)]
pub struct ExecServer {
    listener: OwnedFd,
    file: SocketFile,
}

/// The exec socket being served; [`ExecServing::stop`] ends it.
#[derive(Debug)]
pub struct ExecServing {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _file: SocketFile,
}

impl ExecServer {
    /// Bind the exec socket at `path` (mode 0600). The caller has bound the control socket in
    /// the same directory first, which proves no other supervisor serves it: a socket left at
    /// `path` is stale and is replaced; anything else there is refused.
    pub fn bind(path: &Path) -> Result<ExecServer, ControlError> {
        use std::os::unix::fs::FileTypeExt as _;
        let io_err = |syscall: &'static str| {
            move |source: io::Error| ControlError::Io {
                op: syscall,
                path: path.to_path_buf(),
                source,
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(io_err("remove stale socket"))?;
            }
            Ok(_) => {
                return Err(ControlError::Unsafe {
                    path: path.to_path_buf(),
                    reason: "exists and is not a socket; refusing to replace it".to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lstat")(e)),
        }
        let (listener, dev, ino) = bind_into_place(path, 0o600, None, |p| {
            let fd = socket::socket(
                socket::AddressFamily::Unix,
                socket::SockType::SeqPacket,
                socket::SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            socket::bind(fd.as_raw_fd(), &socket::UnixAddr::new(p)?)?;
            socket::listen(&fd, socket::Backlog::new(64)?)?;
            Ok(fd)
        })?;
        Ok(ExecServer {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                dev,
                ino,
            },
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Accept connections on a thread of its own, each served on a thread of its own, until
    /// [`ExecServing::stop`].
    pub fn serve(self, ctx: ExecContext) -> Result<ExecServing, ControlError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let listener = self.listener;
        let path = self.file.path.clone();
        let thread = std::thread::Builder::new()
            .name("carapace-execsock".into())
            .spawn(move || accept_loop(&listener, &flag, &ctx))
            .map_err(|source| ControlError::Io {
                op: "start the exec socket's thread",
                path,
                source,
            })?;
        Ok(ExecServing {
            stop,
            thread: Some(thread),
            _file: self.file,
        })
    }
}

impl ExecServing {
    /// Stop accepting and remove the socket. Runs in progress go on (the service kills its
    /// tools when it stops, and their callers then get their reports).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections being served now.
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn accept_loop(listener: &OwnedFd, stop: &AtomicBool, ctx: &ExecContext) {
    use rustix::event::{poll, PollFd, PollFlags};
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(ACCEPT_POLL_MS) * 1_000_000,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!("exec socket: poll: {e}; no longer accepting");
                return;
            }
        }
        let conn = match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
            Err(e) => {
                tracing::warn!("exec socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if LIVE.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            LIVE.fetch_sub(1, Ordering::SeqCst);
            // Read (briefly) before answering: see `run_one`, step 1.
            let _ = read_request(&conn, Duration::from_millis(100));
            reply(
                conn.as_fd(),
                &ToClient::Failed {
                    message: format!(
                        "the supervisor is serving {MAX_CONNECTIONS} runs already; try again"
                    ),
                    code: EXIT_SETUP,
                },
            );
            continue;
        }
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("carapace-exec".into())
            .spawn(move || {
                serve_one(&conn, &ctx);
                LIVE.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            LIVE.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("exec socket: cannot start a thread for a connection: {e}");
        }
    }
}

/// Send one message; a caller that went away is not an error of ours.
fn reply(conn: BorrowedFd<'_>, msg: &ToClient) -> bool {
    match serde_json::to_vec(msg) {
        Ok(bytes) => passing::send(conn, &bytes, &[]).is_ok(),
        Err(e) => {
            tracing::warn!("exec socket: cannot encode a reply: {e}");
            false
        }
    }
}

/// The caller's credentials, from the kernel.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    pid: i32,
}

/// Serve one connection: check the caller, run its command, report. Whatever happens, the
/// caller gets one last message saying how it ended (unless it is gone).
fn serve_one(conn: &OwnedFd, ctx: &ExecContext) {
    let last = match run_one(conn, ctx) {
        Ok(exited) => exited,
        Err(msg) => msg,
    };
    reply(conn.as_fd(), &last);
}

fn failed(message: impl Into<String>, code: i32) -> ToClient {
    ToClient::Failed {
        message: message.into(),
        code,
    }
}

/// The steps of one run, in order; an `Err` is the message that ends the conversation.
fn run_one(conn: &OwnedFd, ctx: &ExecContext) -> Result<ToClient, ToClient> {
    // 1. The request and the caller's stdin, stdout and stderr, read first whoever calls: a
    //    socket closed with a message unread resets the connection, and the caller would not
    //    get the answer below.
    let (req, stdio) = read_request(conn, REQUEST_TIMEOUT)?;

    // 2. Who is calling. Root or our own user only: the run gets a workspace and a host
    //    identity of the supervisor's choosing, which only they could get from a local
    //    `carapace exec` as well. (The socket's mode 0600 says the same; this is checked on
    //    every connection all the same.)
    let peer = socket::getsockopt(conn, sockopt::PeerCredentials)
        .map(|c| Peer {
            uid: c.uid(),
            pid: c.pid(),
        })
        .map_err(|e| {
            failed(
                format!("cannot read the caller's credentials: {e}"),
                EXIT_SETUP,
            )
        })?;
    if peer.uid != 0 && peer.uid != euid() {
        tracing::warn!(
            uid = peer.uid,
            pid = peer.pid,
            "exec socket: refused a caller that is neither root nor the supervisor's user"
        );
        return Err(ToClient::Elsewhere {
            why: format!(
                "the supervisor runs commands only for root and its own user, not uid {}",
                peer.uid
            ),
        });
    }

    // A process in another user namespace (a rootless supervisor's sandboxes run as its own
    // uid in one) is not the operator at a shell: it runs locally if at all.
    if !same_user_namespace(peer.pid) {
        tracing::warn!(
            uid = peer.uid,
            pid = peer.pid,
            "exec socket: refused a caller in another user namespace"
        );
        return Err(ToClient::Elsewhere {
            why: "the supervisor runs commands only for callers in its own user namespace"
                .to_string(),
        });
    }

    // 3. The same files as the caller: its cwd and workspace, looked up here, must be the
    //    directories it has (a supervisor in a mount namespace of its own may see others).
    let cwd = PathBuf::from(OsString::from_vec(req.cwd.clone()));
    let workspace = PathBuf::from(OsString::from_vec(req.workspace.clone()));
    for (what, path, id) in [
        ("working directory", &cwd, req.cwd_id),
        ("workspace", &workspace, req.workspace_id),
    ] {
        if !path.is_absolute() {
            return Err(failed(
                format!("bad request: the {what} {} is not absolute", path.display()),
                EXIT_SETUP,
            ));
        }
        if file_id(path).ok() != Some(id) {
            return Err(ToClient::Elsewhere {
                why: format!(
                    "the supervisor does not see your {what} {} as you do (another mount \
                     namespace?)",
                    path.display()
                ),
            });
        }
    }

    // ... and a workspace the caller can write is writable here too (the shipped unit's
    // `ProtectSystem=strict` makes most of the host read-only for the supervisor).
    if !req.workspace_read_only && on_read_only_mount(&workspace).unwrap_or(true) {
        return Err(ToClient::Elsewhere {
            why: format!(
                "the supervisor sees your workspace {} read-only (its unit's ProtectSystem= or \
                 ProtectHome=; see ReadWritePaths= in docs/operations.md)",
                workspace.display()
            ),
        });
    }

    // 4. The decision, under the policy in force, with the plans compiled for it.
    let policy = ctx.ops.policy();
    let target = ctx.tools.target;
    let command: Vec<OsString> = req
        .command
        .iter()
        .cloned()
        .map(OsString::from_vec)
        .collect();
    let workspace_canon = std::fs::canonicalize(&workspace).ok();
    let d = decide_with(
        &policy,
        &command,
        &cwd,
        workspace_canon.as_deref(),
        |profile| {
            ctx.tools
                .plans
                .plan(&policy, profile, &target)
                .map(|p| Plan::clone(&p))
        },
    )
    .map_err(|e| failed(error_chain(&e), e.exit_code()))?;
    let what = command_words(&d.program, &d.args);
    let audit = |decision: AuditDecision, outcome: &str, detail: String| {
        ctx.ops.operator_audit(
            "exec",
            what.clone(),
            decision,
            outcome.to_string(),
            format!(
                "carapace exec through the exec socket by uid {} pid {}; {detail}",
                peer.uid, peer.pid
            ),
        )
    };
    if d.decision.approval == Approval::Deny {
        let by = rule_words(&policy, &d.decision);
        audit(AuditDecision::Deny, "refused", by.clone())
            .map_err(|e| failed(format!("not run: {e}"), EXIT_SETUP))?;
        return Err(failed(
            format!(
                "denied: {what}\n  by {by}\n  To run it, add an [[exec]] rule that allows it \
                 above that point of the supervisor's policy and reload it (`carapace reload`), \
                 or give a policy of your own: --policy FILE (which runs it here, not through \
                 the supervisor)."
            ),
            EXIT_DENIED,
        ));
    }
    if let Some(e) = &d.compile_error {
        return Err(failed(
            format!("cannot run under this profile on this kernel:\n{e}"),
            EXIT_SETUP,
        ));
    }
    let Some(plan) = d.plan else {
        return Err(failed(
            "internal error: an allowed decision without a profile",
            EXIT_SETUP,
        ));
    };
    let profile = plan.profile.clone();

    // 5. The program, opened once before anyone is asked: what is approved is what starts.
    let program = OpenedProgram::open(&d.program)
        .map(Arc::new)
        .map_err(|e| failed(format!("cannot start {what}: {e}"), EXIT_SETUP))?;
    let run_as =
        match req.run_as {
            None => ctx.tools.run_as,
            Some(_) if !ctx.tools.privilege.is_root() => return Err(failed(
                "--run-as is not available through a rootless supervisor: its tools run as its \
                 own uid; drop --run-as",
                EXIT_SETUP,
            )),
            Some((uid, gid)) => RunAs::Fixed(HostIds { uid, gid }),
        };

    // 6. Ask the caller when the rule says ask.
    let by = rule_words(&policy, &d.decision);
    if d.decision.approval == Approval::Ask {
        let line = d.decision.rule.as_ref().map_or(0, |r| r.line);
        let asked = ToClient::Ask {
            question: format!(
                "carapace: {what}\n  needs approval: {by}\n  runs confined in profile \
                 `{profile}` (through the supervisor)\n"
            ),
            without_terminal: format!(
                "denied: {what}\n  needs approval ({by}) and there is no terminal to ask on.\n  \
                 To allow it without asking, add an [[exec]] rule with approval = \"allow\" \
                 for {} above line {line} of the supervisor's policy and reload it.",
                d.program.display()
            ),
        };
        if !reply(conn.as_fd(), &asked) || !read_answer(conn) {
            audit(
                AuditDecision::Deny,
                "refused",
                format!("{by}; approval refused"),
            )
            .map_err(|e| failed(format!("not run: {e}"), EXIT_SETUP))?;
            return Err(failed("approval refused", EXIT_DENIED));
        }
    }

    // 7. The record, before anything runs: an audit log that cannot be written refuses it.
    let decision = if d.decision.approval == Approval::Ask {
        AuditDecision::Ask
    } else {
        AuditDecision::Allow
    };
    audit(decision, "started", format!("profile {profile}; {by}"))
        .map_err(|e| failed(format!("not run: {e}"), EXIT_SETUP))?;

    // 8. Start it like one of the broker's tools, with the caller's descriptors and
    //    environment.
    let argv0 = command
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let env = req
        .env
        .into_iter()
        .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v)))
        .collect();
    let run = spawn_tool(
        &ctx.tools,
        policy.clone(),
        program,
        &argv0,
        &d.args,
        &profile,
        ToolPlace {
            workspace: Some(&workspace),
            cwd: None,
            read_only: false,
        },
        Some(Caller { stdio, env, run_as }),
    )
    .map_err(|e| {
        failed(
            format!("cannot start {what}: {}", error_chain(&e)),
            EXIT_SETUP,
        )
    })?;
    if let Some(fd) = run.broker {
        if ctx
            .peers
            .serve(fd, new_identity(Role::Tool, &profile))
            .is_none()
        {
            tracing::warn!("exec socket: a tool's broker socket could not be served");
        }
    }
    let started = ToClient::Started {
        profile,
        policy: policy.file().to_string(),
        explain: d.decision.explain().trim_end().to_string(),
    };
    // A caller gone already is seen by the watch below.
    reply(conn.as_fd(), &started);

    // 9. Wait, killing the sandbox if the caller goes away (its exit, Ctrl-C).
    let report = watch_and_wait(conn, run.pidfd, run.wait);
    Ok(ToClient::Exited {
        code: report.exit_code(),
        line: report.line(),
        note: report.note(),
        report: report.json(),
    })
}

/// Whether process `pid` is in this process's user namespace (false when either cannot be
/// looked at).
fn same_user_namespace(pid: i32) -> bool {
    match (
        file_id(Path::new(&format!("/proc/{pid}/ns/user"))),
        file_id(Path::new("/proc/self/ns/user")),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    }
}

/// The run request and its three descriptors, waited for at most `timeout`.
pub(super) fn read_request(
    conn: &OwnedFd,
    timeout: Duration,
) -> Result<(RunRequest, [OwnedFd; 3]), ToClient> {
    let bad = |why: String| failed(format!("bad request: {why}"), EXIT_SETUP);
    let _ = socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeval(timeout));
    let (buf, fds) = match passing::recv_owned(conn.as_fd(), MAX_MESSAGE) {
        Ok((Received::Message(_, fds), buf)) => (buf, fds),
        Ok((Received::Eof, _)) => return Err(bad("the caller closed the connection".into())),
        Ok((Received::Truncated, _)) => return Err(bad("longer than the supervisor takes".into())),
        Err(e) => return Err(bad(format!("recvmsg: {e}"))),
    };
    let req = match serde_json::from_slice::<ToSupervisor>(&buf) {
        Ok(ToSupervisor::Run(r)) => r,
        Ok(other) => return Err(bad(format!("expected a run, got {other:?}"))),
        Err(e) => return Err(bad(e.to_string())),
    };
    let stdio: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| bad(format!("{} descriptors instead of 3", v.len())))?;
    Ok((req, stdio))
}

/// The caller's answer to an ask: only an explicit yes is a yes (a hangup, a timeout, anything
/// else is a no).
fn read_answer(conn: &OwnedFd) -> bool {
    let _ = socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeval(ANSWER_TIMEOUT));
    let mut buf = [0u8; 256];
    match passing::recv(conn.as_fd(), &mut buf) {
        Ok(Received::Message(n, _)) => matches!(
            serde_json::from_slice::<ToSupervisor>(&buf[..n]),
            Ok(ToSupervisor::Answer { allow: true })
        ),
        _ => false,
    }
}

/// Wait for the tool's report while a second thread watches the connection: the caller sends
/// nothing more, so anything readable there (its hangup above all) kills the sandbox.
fn watch_and_wait(
    conn: &OwnedFd,
    pidfd: Option<OwnedFd>,
    wait: Box<dyn FnOnce() -> carapace_sandbox::report::ExitReport + Send>,
) -> carapace_sandbox::report::ExitReport {
    use rustix::event::{poll, PollFd, PollFlags};
    let Ok((done_read, done_write)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
    else {
        return wait();
    };
    std::thread::scope(|s| {
        s.spawn(|| loop {
            let mut fds = [
                PollFd::new(conn, PollFlags::IN | PollFlags::RDHUP),
                PollFd::new(&done_read, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
                Ok(_) => {}
            }
            if !fds[1].revents().is_empty() {
                return;
            }
            if !fds[0].revents().is_empty() {
                if let Some(fd) = &pidfd {
                    crate::pidfd::signal(fd, libc::SIGKILL);
                }
                return;
            }
        });
        let report = wait();
        drop(done_write);
        report
    })
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        i64::from(d.subsec_micros()),
    )
}
