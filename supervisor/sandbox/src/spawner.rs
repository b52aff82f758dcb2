//! The spawner: a small single-threaded process that starts the broker's tools, so that the
//! multi-threaded supervisor is not forked for each one.
//!
//! Cloning a confined child from `carapace run` copies the supervisor's page tables and
//! write-protects its pages; every supervisor thread then takes copy-on-write faults, each
//! with a TLB shootdown across the CPUs (see docs/benchmarks.md, "Broker tool path"). The
//! spawner is forked by `carapace run` before the broker's runtime or any other thread
//! exists ([`Spawner::start`] refuses otherwise), so its address space is small and only it
//! is copied. There may be several (`carapace run` starts one per CPU): each starts one tool at
//! a time, and a tool's request goes to an idle one.
//!
//! ```text
//! supervisor (tool thread)                      spawner (one thread, a loop)
//!  cgroup chosen / made ahead (run.rs 1-2)
//!  Request (JSON) + fds (SCM_RIGHTS) ────────►  Launch::prepare, then the clone with
//!   program, stdio/broker/listener,               CLONE_PARENT (the sandbox's init is the
//!   the cgroup's v2 dir and v1 `tasks`            supervisor's child) and the handshake
//!  Reply (JSON) + fds  ◄─────────────────────   Started: pidfd, init status pipe, a brokered
//!  waits, kills, reaps, removes the cgroup        network's listeners / Failed: the text of
//!  exactly as for an in-process start             the SpawnError and its stage
//! ```
//!
//! What `CLONE_PARENT` changes, and why it is sound here:
//! * The sandbox's init is the supervisor's child, not the spawner's: the supervisor's
//!   `wait4`, pidfd and cgroup code is unchanged ([`Started`]). The spawner cannot wait for it;
//!   on a failure after the clone it kills the child and sends its pidfd back with the error,
//!   and the supervisor reaps it.
//! * Its exit signal is the spawner's own (SIGCHLD, the spawner being a plain fork), not the
//!   one in `clone_args` (which clone3 requires to be 0 with `CLONE_PARENT`).
//! * `PR_SET_PDEATHSIG`, set by the child during setup, fires when its parent *thread* ends:
//!   with `CLONE_PARENT` that is the supervisor's thread that forked the spawner, its main
//!   thread, which lives as long as the supervisor (`carapace run` forks the spawner from
//!   main before any other thread exists). Today's in-process start ties it to the tool's
//!   thread instead.
//! * The child's check that the supervisor did not die before `PR_SET_PDEATHSIG` was armed
//!   (a hangup on the sync pipe, whose writer is the spawner here) also polls the spawner's
//!   socket to the supervisor, which hangs up when the supervisor is gone.
//!
//! The spawner dies with the supervisor (`PR_SET_PDEATHSIG` = SIGKILL, and it exits on the
//! socket's EOF), holds no descriptor of the supervisor's but stdio and its socket (the others
//! are pointed at /dev/null, not closed: the journal logger it inherited keeps a socket's
//! number, which must not come to name a spawn's pipe), is dumpable like the supervisor (its
//! /proc files, and those of the idmap helper that shares its memory, must stay openable by a
//! supervisor without CAP_SYS_PTRACE, see `server.rs`), and only ever signals
//! a process it started. Its own log lines (debug timings) go to stderr, or nowhere when the
//! supervisor logs to the journal's socket. When it is gone, [`start_run`] falls back to spawning
//! in-process and logs that once at warn; [`Spawner::describe`] says which for the status.
//! A request sent to a spawner that dies before it answers fails (its cgroup, and anything
//! started in it, is killed): only a request that was never sent is started in-process. With
//! several spawners, one found gone is left out and the others go on; the fallback to
//! in-process comes when the last is gone.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use carapace_policy::Plan;
use nix::sys::socket;
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, JoinFds};
use crate::fds::{self, passing};
use crate::namespaces::{HostIds, RunAs};
use crate::program::{FileId, OpenedProgram};
use crate::run::{self, Limits, Run, Started, Timings};
use crate::spawn::{ChildIo, Launch, LaunchOptions, Running, SpawnError};
use crate::Privilege;

/// Largest message either side sends (a plan with its seccomp program is a few KiB).
const MAX_MESSAGE: usize = 1 << 20;
/// Most descriptors one message carries (program, five io fds, the cgroup's directories; or
/// a pidfd, a pipe and a brokered network's listeners).
const MAX_FDS: usize = passing::MAX_FDS;
/// The spawner's first message, once it has confined itself.
const READY: &[u8] = b"ready";
/// The spawner's socket is moved to a number at least this high, out of the way of the
/// descriptors its children place at 0..=4.
const SOCKET_FD_MIN: RawFd = 64;

/// Errors of starting the spawner and of talking to it.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("turned off with CARAPACE_TOOL_SPAWNER=0")]
    Off,
    #[error(
        "the spawner must be forked before any other thread exists (this process has \
         {threads} threads)"
    )]
    Threaded { threads: usize },
    #[error("{syscall}: {source}")]
    Sys {
        syscall: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("encoding a message for the spawner: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("malformed message from the {from}: {why}")]
    Malformed { from: &'static str, why: String },
    #[error("the spawner closed its socket")]
    Eof,
}

fn sys(syscall: &'static str) -> impl FnOnce(nix::errno::Errno) -> SpawnerError {
    move |e| SpawnerError::Sys {
        syscall,
        source: io::Error::from(e),
    }
}

/// The program, as [`OpenedProgram`] knows it; its descriptor travels beside.
#[derive(Debug, Serialize, Deserialize)]
struct ProgramWire {
    path: PathBuf,
    id: FileId,
    script: bool,
    sha256: Option<String>,
}

/// One spawn request: what [`Launch::prepare`] needs, the descriptors travel beside in this
/// order: the program, the present ones of `io` (stdin, stdout, stderr, broker, listener),
/// the cgroup's v2 directory, its v1 `tasks` files.
#[derive(Debug, Serialize, Deserialize)]
struct Request<P> {
    /// The plan's number: the spawner keeps the last [`PLANS_KEPT`] plans it was sent, and
    /// `plan` is sent only when the spawner does not have this one (a tool profile's plan is
    /// the same from one tool to the next; encoding it for each tool cost more than the fork
    /// the spawner saves).
    plan_id: u64,
    plan: Option<P>,
    landlock_abi: u8,
    program: ProgramWire,
    argv0: Vec<u8>,
    args: Vec<Vec<u8>>,
    workspace: Option<PathBuf>,
    /// `Some(ids)`: rootless, the supervisor's own ids.
    rootless: Option<(u32, u32)>,
    /// The identity decided by the supervisor's thread (a per-run identity is numbered by
    /// the requesting thread, see [`Launch::prepare`]).
    run_as: (u32, u32),
    env: Vec<(Vec<u8>, Vec<u8>)>,
    supervisor_env: Vec<(Vec<u8>, Vec<u8>)>,
    broker: bool,
    listener: bool,
    io: [bool; fds::PLACED_FDS],
    v2_dir: bool,
    v1_tasks: usize,
}

/// How many plans each side keeps (the same on both: the supervisor numbers them, and both
/// drop the lowest number when one more comes).
const PLANS_KEPT: usize = 32;

/// Plans by number, at most [`PLANS_KEPT`], the lowest number dropped first.
#[derive(Debug, Default)]
struct Plans {
    kept: Vec<(u64, Plan)>,
    next: u64,
}

impl Plans {
    fn get(&self, id: u64) -> Option<&Plan> {
        self.kept.iter().find(|(i, _)| *i == id).map(|(_, p)| p)
    }

    /// The number of a plan equal to `plan`, if one is kept.
    fn find(&self, plan: &Plan) -> Option<u64> {
        self.kept
            .iter()
            .rev()
            .find(|(_, p)| p == plan)
            .map(|(i, _)| *i)
    }

    fn insert(&mut self, id: u64, plan: Plan) {
        self.kept.retain(|(i, _)| *i != id);
        if self.kept.len() >= PLANS_KEPT {
            if let Some(lowest) = self.kept.iter().map(|(i, _)| *i).min() {
                self.kept.retain(|(i, _)| *i != lowest);
            }
        }
        self.kept.push((id, plan));
    }
}

/// The answer. `Started` comes with the init's pidfd, the read end of its status pipe, then
/// one listener per entry of `forward`; `Failed` with the child's pidfd when there was one.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Started {
        pid: i32,
        since_clone_us: u64,
        forward: Vec<(String, u16)>,
    },
    /// The request named a plan the spawner does not have: send it in full.
    UnknownPlan,
    Failed {
        /// The child's step that failed ([`SpawnError::Child`]), if it was one.
        stage: Option<String>,
        /// The error with its causes, as the supervisor would have said it.
        message: String,
        /// The child killed after a failure: the supervisor reaps it.
        child: Option<i32>,
    },
}

/// The supervisor's handle on its spawner processes: one or more, each starting one tool at a
/// time. A request goes to an idle one (the lowest-numbered), or, when all are busy, waits for
/// whichever is free first; a spawner found gone is left out from then on, and once all are
/// gone tools are started in-process.
#[derive(Debug)]
pub struct Spawner {
    each: Vec<Worker>,
    /// The indices into `each` of the spawners no request holds.
    idle: Mutex<Vec<usize>>,
    /// Signalled when a spawner is handed back or found gone.
    freed: Condvar,
}

/// One spawner held for one request: its channel, handed back to the idle ones when dropped
/// (the channel's lock is released just after: whoever takes the spawner next may wait for
/// that moment in `pick`).
struct Lease<'a> {
    sp: &'a Spawner,
    index: usize,
    channel: MutexGuard<'a, Channel>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.sp
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.index);
        self.sp.freed.notify_one();
    }
}

/// One spawner process.
#[derive(Debug)]
struct Worker {
    sock: Mutex<Channel>,
    pid: libc::pid_t,
    gone: AtomicBool,
}

/// The supervisor's end: the socket, the plans the spawner has, a buffer for answers.
#[derive(Debug)]
struct Channel {
    sock: OwnedFd,
    plans: Plans,
    buf: Vec<u8>,
}

/// Why a request through the spawner did not start the run.
#[derive(Debug)]
enum Failure {
    /// The request never reached the spawner: it may be started in-process.
    NotSent(SpawnerError),
    /// Sent, but no answer came: whatever the spawner started is killed with the cgroup.
    Lost(SpawnerError),
    /// The spawner answered with the spawn's own error.
    Spawn(SpawnError),
}

impl Spawner {
    /// Fork `count` spawners (at least one). Only in a process with a single thread
    /// (checked): the child of a fork of a multi-threaded process may find locks held forever.
    /// A spawner after the first that cannot be started is left out with a warning; the first
    /// one's failure is the error.
    pub fn start(count: usize) -> Result<Spawner, SpawnerError> {
        let mut each = vec![Worker::start()?];
        for _ in 1..count {
            match Worker::start() {
                Ok(w) => each.push(w),
                Err(e) => {
                    tracing::warn!(
                        "tool spawner {} of {count} not started: {}",
                        each.len() + 1,
                        crate::error_chain(&e)
                    );
                    break;
                }
            }
        }
        Ok(Spawner::over(each))
    }

    /// The spawners' pids, the gone ones included.
    pub fn pids(&self) -> Vec<libc::pid_t> {
        self.each.iter().map(|w| w.pid).collect()
    }

    /// The pids of the spawners still in use.
    pub fn alive_pids(&self) -> Vec<libc::pid_t> {
        self.alive().map(|w| w.pid).collect()
    }

    /// Whether tools are still started through a spawner (false once all were found gone).
    pub fn is_alive(&self) -> bool {
        self.alive().next().is_some()
    }

    /// Who starts the tools, in words for the status: `spawner (pid N)`, `spawners (pids N,
    /// M)` (with how many are gone, if any), or `in-process (...)` once all are gone.
    pub fn describe(&self) -> String {
        let alive = self.alive_pids();
        let gone = self.each.len() - alive.len();
        let list = alive
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let gone = if gone > 0 && !alive.is_empty() {
            format!("; {gone} of {} gone", self.each.len())
        } else {
            String::new()
        };
        match alive.len() {
            0 if self.each.len() == 1 => "in-process (the spawner is gone)".to_string(),
            0 => "in-process (the spawners are gone)".to_string(),
            1 => format!("spawner (pid {list}{gone})"),
            _ => format!("spawners (pids {list}{gone})"),
        }
    }

    fn alive(&self) -> impl Iterator<Item = &Worker> {
        self.each.iter().filter(|w| w.is_alive())
    }

    fn over(each: Vec<Worker>) -> Spawner {
        Spawner {
            idle: Mutex::new((0..each.len()).collect()),
            each,
            freed: Condvar::new(),
        }
    }

    /// A spawner for one request: the lowest-numbered idle one, or when all are busy the first
    /// one handed back. None once all are gone.
    fn pick(&self) -> Option<Lease<'_>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            idle.retain(|i| self.each[*i].is_alive());
            if let Some(at) = (0..idle.len()).min_by_key(|k| idle[*k]) {
                let index = idle.swap_remove(at);
                drop(idle);
                let channel = self.each[index]
                    .sock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                return Some(Lease {
                    sp: self,
                    index,
                    channel,
                });
            }
            if !self.is_alive() {
                return None;
            }
            idle = self.freed.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The spawner `w` is gone, or no longer to be trusted: end it, and say so once (that
    /// tools now start in-process, when it was the last).
    fn lost(&self, w: &Worker, why: &SpawnerError) {
        if w.end() {
            // Whoever waits for a spawner looks again (and starts in-process if none is left).
            self.freed.notify_all();
            if self.is_alive() {
                tracing::warn!(
                    pid = w.pid,
                    "a tool spawner is gone ({}): the other {} start the tools",
                    crate::error_chain(why),
                    self.alive().count()
                );
            } else {
                tracing::warn!(
                    pid = w.pid,
                    "the tool spawner is gone ({}): tools are started from the supervisor \
                     itself from now on",
                    crate::error_chain(why)
                );
            }
        }
    }
}

impl Worker {
    /// Fork one spawner (see [`Spawner::start`]).
    fn start() -> Result<Worker, SpawnerError> {
        let threads = std::fs::read_dir("/proc/self/task")
            .map_err(|source| SpawnerError::Sys {
                syscall: "opendir(/proc/self/task)",
                source,
            })?
            .count();
        if threads != 1 {
            return Err(SpawnerError::Threaded { threads });
        }
        let (mine, low) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("socketpair"))?;
        let theirs = nix::fcntl::fcntl(&low, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(SOCKET_FD_MIN))
            .map_err(sys("fcntl(F_DUPFD_CLOEXEC)"))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        let theirs = unsafe { OwnedFd::from_raw_fd(theirs) };
        drop(low);
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: this process has one thread (checked above), so the child gets a consistent
        // copy of every lock and allocation; it runs `serve`, which never returns.
        match unsafe { libc::fork() } {
            -1 => Err(SpawnerError::Sys {
                syscall: "fork",
                source: io::Error::last_os_error(),
            }),
            0 => {
                drop(mine);
                server::serve(theirs, parent)
            }
            pid => {
                // It lives in the supervisor's cgroup: on pure cgroup v2 it moves with the
                // supervisor into its leaf when controllers are first enabled.
                crate::cgroup::add_companion(pid);
                let mut buf = [0u8; 16];
                let ready = recv(mine.as_fd(), &mut buf);
                let spawner = Worker {
                    sock: Mutex::new(Channel {
                        sock: mine,
                        plans: Plans::default(),
                        buf: vec![0u8; MAX_MESSAGE],
                    }),
                    pid,
                    gone: AtomicBool::new(false),
                };
                match ready {
                    Ok((n, _)) if &buf[..n] == READY => Ok(spawner),
                    Ok(_) => Err(SpawnerError::Malformed {
                        from: "spawner",
                        why: "a first message other than ready".to_string(),
                    }),
                    Err(e) => {
                        let mut status = 0;
                        // SAFETY: reaping our own child, which closed its socket or is about
                        // to be killed with it.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                            libc::waitpid(pid, &mut status, 0)
                        };
                        Err(e)
                    }
                }
            }
        }
    }

    fn is_alive(&self) -> bool {
        !self.gone.load(Ordering::SeqCst)
    }

    /// Mark it gone, kill and reap it; true the first time only.
    fn end(&self) -> bool {
        if self.gone.swap(true, Ordering::SeqCst) {
            return false;
        }
        let mut status = 0;
        // SAFETY: our own child, not reaped before (only here, once), so its pid is still
        // its own; SIGKILL ends it if it still runs, and the wait cannot block for long.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, &mut status, 0)
        };
        true
    }

    /// Send one request over the leased channel (held until the answer is read) and read the
    /// answer.
    fn request(
        &self,
        mut lease: Lease<'_>,
        plan: &Plan,
        run: &Run,
        join: Option<&JoinFds>,
        io: ChildIo<'_>,
    ) -> Result<Running, Failure> {
        let o = &run.options;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let (ids, _) = o
            .privilege
            .host_ids(o.run_as, u32::try_from(tid).unwrap_or(0));
        let pairs = |v: &[(OsString, OsString)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            v.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let raw_io = [io.stdin, io.stdout, io.stderr, io.broker, io.listener];
        // Only what the plan's `env.pass` may take from the supervisor's environment.
        let env: Vec<(OsString, OsString)> = o
            .env
            .iter()
            .filter(|(k, _)| plan.env.pass.iter().any(|p| k == p.as_str()))
            .cloned()
            .collect();
        let mut fds: Vec<RawFd> = vec![o.program.fd().as_raw_fd()];
        fds.extend(raw_io.iter().flatten().map(|f| f.as_raw_fd()));
        if let Some(j) = join {
            fds.extend(j.v2_dir.iter().map(|f| f.as_raw_fd()));
            fds.extend(j.v1_tasks.iter().map(|f| f.as_raw_fd()));
        }
        let ch = &mut *lease.channel;
        let known = ch.plans.find(plan);
        let plan_id = known.unwrap_or_else(|| {
            ch.plans.next += 1;
            ch.plans.next
        });
        let mut full = known.is_none();
        let n = loop {
            let req = Request {
                plan_id,
                plan: full.then_some(plan),
                landlock_abi: run.landlock_abi,
                program: ProgramWire {
                    path: o.program.path().to_path_buf(),
                    id: o.program.id(),
                    script: o.program.is_script(),
                    sha256: o.program.sha256_if_known().map(str::to_string),
                },
                argv0: o.argv0.as_bytes().to_vec(),
                args: o.args.iter().map(|a| a.as_bytes().to_vec()).collect(),
                workspace: o.workspace.clone(),
                rootless: match o.privilege {
                    Privilege::Root => None,
                    Privilege::Rootless(h) => Some((h.uid, h.gid)),
                },
                run_as: (ids.uid, ids.gid),
                env: pairs(&env),
                supervisor_env: pairs(&o.supervisor_env),
                broker: o.broker,
                listener: o.listener,
                io: raw_io.map(|f| f.is_some()),
                v2_dir: join.is_some_and(|j| j.v2_dir.is_some()),
                v1_tasks: join.map_or(0, |j| j.v1_tasks.len()),
            };
            let bytes =
                serde_json::to_vec(&req).map_err(|e| Failure::NotSent(SpawnerError::Encode(e)))?;
            send(ch.sock.as_fd(), &bytes, &fds).map_err(Failure::NotSent)?;
            if full {
                ch.plans.insert(plan_id, plan.clone());
            }
            let (n, got) = recv(ch.sock.as_fd(), &mut ch.buf).map_err(Failure::Lost)?;
            if !full && got.is_empty() && ch.buf[..n] == *b"\"UnknownPlan\"" {
                // Not expected (both sides keep the same plans): send it in full.
                full = true;
                continue;
            }
            break (n, got);
        };
        let (n, got) = n;
        let reply: Reply = serde_json::from_slice(&ch.buf[..n]).map_err(|e| {
            Failure::Lost(SpawnerError::Malformed {
                from: "spawner",
                why: e.to_string(),
            })
        })?;
        drop(lease);
        let malformed = |why: &str| {
            Failure::Lost(SpawnerError::Malformed {
                from: "spawner",
                why: why.to_string(),
            })
        };
        let mut got = got.into_iter();
        match reply {
            Reply::Started {
                pid,
                since_clone_us,
                forward,
            } => {
                let (Some(pidfd), Some(status)) = (got.next(), got.next()) else {
                    return Err(malformed("a start without its pidfd and status pipe"));
                };
                let mut listeners = Vec::new();
                for ((host, port), fd) in forward.into_iter().zip(got.by_ref()) {
                    listeners.push(crate::egress::Listener {
                        host,
                        port,
                        socket: std::net::TcpListener::from(fd),
                    });
                }
                let started = Instant::now()
                    .checked_sub(Duration::from_micros(since_clone_us))
                    .unwrap_or_else(Instant::now);
                Ok(Running::from_parts(pid, pidfd, status, started, listeners))
            }
            Reply::UnknownPlan => Err(malformed("a plan unknown after it was sent")),
            Reply::Failed {
                stage,
                message,
                child,
            } => {
                if let (Some(pid), Some(pidfd)) = (child, got.next()) {
                    // Killed by the spawner already; ours to reap.
                    crate::spawn::kill_and_reap_child(pid, &pidfd);
                }
                Err(Failure::Spawn(SpawnError::Remote { stage, message }))
            }
        }
    }
}

/// Steps 1 to 4 of the run path (see [`crate::run`]) for a broker tool: through one of the
/// spawners while one lives, else in-process. `premade`: an empty cgroup made ahead with `plan`'s
/// limits (see [`run::start_in`]).
pub fn start_run(
    spawner: Option<&Spawner>,
    mut plan: Plan,
    run: &Run,
    premade: Option<Cgroup>,
    io: ChildIo<'_>,
) -> Result<Started, SpawnError> {
    let Some(sp) = spawner.filter(|s| s.is_alive()) else {
        return match premade {
            Some(cg) => run::start_in(plan, run, cg, io),
            None => run::start(plan, run, io),
        };
    };
    let t0 = Instant::now();
    let (cgroup, limits) = match premade {
        Some(cg) => {
            let name = cg.name().to_string();
            (Some(Arc::new(cg)), Limits::Cgroup { name })
        }
        None => run::choose_cgroup(run, &mut plan)?,
    };
    let t1 = Instant::now();
    let join = cgroup.as_deref().map(Cgroup::join_fds).transpose()?;
    loop {
        let Some(lease) = sp.pick() else {
            // Every spawner was found gone before one took the request.
            drop(join);
            return run::prepare_chosen(plan, run, cgroup, limits)?.spawn(io);
        };
        let worker = &sp.each[lease.index];
        match worker.request(lease, &plan, run, join.as_ref(), io) {
            Ok(running) => {
                return Ok(Started::from_spawner(
                    running,
                    plan.wall_time,
                    cgroup,
                    limits,
                    Timings {
                        cgroup: t1 - t0,
                        start: t1.elapsed(),
                        ..Timings::default()
                    },
                ))
            }
            Err(Failure::Spawn(e)) => return Err(e),
            // Never taken: the next spawner, or in-process once none is left.
            Err(Failure::NotSent(e)) => sp.lost(worker, &e),
            Err(Failure::Lost(e)) => {
                sp.lost(worker, &e);
                return Err(SpawnError::SpawnerLost {
                    why: crate::error_chain(&e),
                });
            }
        }
    }
}

/// Send one message with `fds` (SCM_RIGHTS). Never raises SIGPIPE.
fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> Result<(), SpawnerError> {
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(SpawnerError::Malformed {
            from: "supervisor",
            why: format!("{} bytes and {} descriptors", bytes.len(), fds.len()),
        });
    }
    passing::send(sock, bytes, fds).map_err(|source| SpawnerError::Sys {
        syscall: "sendmsg",
        source,
    })
}

/// Receive one message and its descriptors (owned at once, close-on-exec).
fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), SpawnerError> {
    match passing::recv(sock, buf) {
        Ok(passing::Received::Message(n, fds)) => Ok((n, fds)),
        Ok(passing::Received::Eof) => Err(SpawnerError::Eof),
        Ok(passing::Received::Truncated) => Err(SpawnerError::Malformed {
            from: "peer",
            why: "a message or its descriptors cut short".to_string(),
        }),
        Err(source) => Err(SpawnerError::Sys {
            syscall: "recvmsg",
            source,
        }),
    }
}

mod netns;
mod server;

#[cfg(test)]
mod tests;
