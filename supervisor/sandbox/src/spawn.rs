//! Spawning one confined program: everything is computed before fork into a [`Launch`]; the
//! child then runs `child_main`, a straight line of raw, async-signal-safe syscalls (no
//! allocation, no locks, no std::fs, no formatting) ending in `execveat`.
//!
//! The program was opened once by the caller ([`OpenedProgram`]; an approval hashed that
//! descriptor). The program's process opens the program's path inside the sandbox (`O_PATH`),
//! checks that it is that same file, unchanged ([`FileId`]: device, inode, size, times), and
//! executes that descriptor: `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`. A file renamed over
//! the program, or written, since it was opened (hashed, for an approval) is refused
//! ([`Stage::ProgramChanged`]), never run. Exec'ing the sandbox's own view of the file keeps
//! every rule of exec by path: the mount's `noexec`, Landlock's EXECUTE on the sandbox's path,
//! the workspace's id mapping, and `/proc/self/exe` naming the sandbox's path.
//!
//! Scripts (`#!`) depend on where they are (`Exec`). One in a mount a sandbox can write
//! (the workspace) could be swapped by a concurrent tool between the check and the exec, so it
//! is executed through the checked descriptor too: the kernel hands its interpreter
//! `/dev/fd/N` (the descriptor stays open across the exec), its `$0` is `/dev/fd/N`, and it
//! needs the profile's `/dev` and `/proc`. One in a read-only mount (`/usr`: npm, pip, a
//! system script) cannot be replaced from inside any sandbox that mounts it so, and keeps
//! its real `$0` (which many scripts use to find their files): after the same check it is
//! executed by its path.
//!
//! Parent <-> child protocol (two pipes for the sync points, one CLOEXEC pipe for errors):
//!
//! ```text
//! parent                                     child (clone3 NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS
//!  (child born in the v2 cgroup:                     |INTO_CGROUP)
//!   clone3 CLONE_INTO_CGROUP)                joins its v1 cgroups (writes 0 to `tasks`);
//!                                             setns into the network namespace made ahead
//!                                             when the spawner made one (NEWNET then left
//!                                             out of the clone; Launch::use_premade_netns)
//!  "go 1" ------------------------------->   unshare(NEWCGROUP); build root; pivot;
//!                                             sethostname; setgroups(0); unshare(NEWUSER)
//!  write uid_map/gid_map  <--------------   "userns ready"
//!  "go 2" ------------------------------->   setresgid/setresuid; drop caps; setsid;
//!                                             PDEATHSIG; dumpable 0; rlimits; no_new_privs;
//!                                             Landlock; close fds; chdir; vfork
//!                                             (CLONE_VM|CLONE_VFORK, own stack):
//!                                               pid 1 = init: own seccomp; reap, report
//!                                                       status, exit
//!                                               pid 2 = program: open + check the
//!                                                       program; seccomp; execveat
//!  read error pipe: EOF = exec'd  <-------   (or a ChildFailure record, then _exit(126))
//! ```
//!
//! Rootless mode (the supervisor is not root, see [`Launch::rootless`]): the child is cloned
//! with CLONE_NEWUSER as well, and the parent writes `setgroups` = deny and the one-line maps
//! (sandbox user -> the user's own uid/gid) right after clone, before "go 1"; the child, with
//! every capability in that namespace, builds its root as above but skips `setgroups(0)` (denied)
//! and the second user namespace, and "go 2" carries no maps. Everything from setresgid on is
//! the same.
//!
//! The program is pid 2, the child of a tiny init (pid 1, our own code, no exec): a pid
//! namespace's init ignores every signal it has no handler for, which would make a program's
//! own `kill -TERM $$` or `abort()` misbehave. The init reaps orphans and, when the program
//! ends, hands its raw wait status to the supervisor over a pipe and exits, which kills
//! whatever is left in the namespace. The parent waits on the init's pidfd (`ppoll`) for the
//! wall-time limit; on timeout it kills the init (taking the whole namespace with it) and the
//! cgroup.
//!
//! Where each side is: this file is the parent's (the [`Launch`] computed before the fork,
//! the clone and the sync points); `spawn/child.rs` is the child's straight line from clone to
//! execve and the init's loop, the only code here that runs in the new process;
//! `spawn/running.rs` waits for a started program ([`Running`]); `spawn/signals.rs` turns the
//! supervisor's termination signals into a clean kill.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_policy::plan::{Mount, Plan, SeccompAction};

use crate::cgroup::{Cgroup, CgroupError, JoinFds};
use crate::fds::{self, ChildFailure, FdError, Pipe};
use crate::mounts::{self, MountError, WorkspaceTree};
use crate::namespaces::{self, CloneArgs, HostIds, NamespaceError, RunAs, CLONE_INTO_CGROUP};
use crate::privilege::Privilege;
use crate::program::{FileId, OpenedProgram};

use crate::report::ExitReport;
use crate::{caps, landlock, rlimits, seccomp};

mod signals;
pub use signals::*;
mod running;
pub use running::*;
mod child;
use child::*;

/// Longest time the child may take from clone to execve (it normally takes milliseconds; a
/// hang, e.g. on a dead network filesystem, must not hang the supervisor). The wall-time limit
/// also bounds it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of preparing, starting and waiting for a confined program.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Rlimit(#[from] rlimits::RlimitError),
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error(transparent)]
    ProgramOutside(#[from] mounts::ProgramOutside),
    /// The seccomp filter would stop the syscall that starts the program.
    #[error(
        "profile `{profile}` does not allow the syscall {syscall}, which starts the program: add \
         \"{syscall}\" (or \"@process\") to [profiles.{profile}.seccomp] allow"
    )]
    ExecNotAllowed {
        profile: String,
        syscall: &'static str,
    },
    /// A script would be handed to its interpreter as `/dev/fd/N`, which the profile lacks.
    #[error(
        "{} is a script (#!): its interpreter is handed /dev/fd/N, which profile `{profile}` \
         does not have (it needs /dev and /proc: `proc = true`); run the interpreter \
         instead (e.g. `sh {}`)",
        program.display(),
        program.display()
    )]
    ScriptNeedsDevFd { program: PathBuf, profile: String },
    /// `spawn_with` was given other descriptors than the launch was prepared for.
    #[error(
        "internal error: the launch was prepared {} {what} but spawned {} one",
        with_words(*prepared),
        with_words(*given)
    )]
    IoMismatch {
        what: &'static str,
        prepared: bool,
        given: bool,
    },
    #[error("{syscall}: {source}")]
    Sys {
        syscall: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the confined child failed at {stage}{detail}: {source}")]
    Child {
        stage: &'static str,
        detail: String,
        #[source]
        source: io::Error,
    },
    /// The spawner process's error for this start (see [`crate::spawner`]): its text with its
    /// causes, and the child's step where it was one.
    #[error("{message}")]
    Remote {
        stage: Option<String>,
        message: String,
    },
    /// The spawner went away while it was starting the program (nothing of it is left).
    #[error("the tool spawner ended during the start: {why}")]
    SpawnerLost { why: String },
    #[error(
        "a prepared Launch can be spawned only once (its workspace mount moves into the child)"
    )]
    Reused,
    #[error("the confined child died during setup without reporting why (status {status:#x})")]
    ChildVanished { status: i32 },
    #[error(
        "rootless mode: this kernel does not let an unprivileged user create the sandbox's user \
         namespace (clone(CLONE_NEWUSER): {source}). It needs unprivileged user namespaces: \
         sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 where that \
         exists (Debian), no AppArmor restriction (kernel.apparmor_restrict_unprivileged_userns \
         = 0, Ubuntu 24.04+); or run carapace as root"
    )]
    RootlessUserns {
        #[source]
        source: io::Error,
    },
}

fn with_words(b: bool) -> &'static str {
    if b {
        "with"
    } else {
        "without"
    }
}

/// Errors of `clone(CLONE_NEWUSER)` that mean "unprivileged user namespaces are not allowed
/// here" (disabled, restricted by an LSM, or the per-user limit is 0 / reached).
fn userns_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::ENOSPC | libc::EUSERS)
    )
}

/// Steps of the child, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    JoinCgroup = 100,
    JoinNetns = 101,
    Sync1 = 1,
    UnshareCgroup,
    Mounts,
    Sethostname,
    Setgroups,
    UnshareUser,
    SignalUserns,
    Sync2,
    Setresgid,
    Setresuid,
    CapBounding,
    CapAmbient,
    Securebits,
    Capset,
    Setsid,
    Pdeathsig,
    ParentGone,
    Dumpable,
    Rlimit,
    NoNewPrivs,
    LandlockRule,
    LandlockRestrict,
    CloseFds,
    Chdir,
    ForkProgram,
    Seccomp,
    Execve,
    InitSeccomp,
    PlaceFds,
    OpenProgram,
    ProgramChanged,
    ProgramFd,
}

impl Stage {
    const ALL: [Stage; 34] = [
        Stage::JoinCgroup,
        Stage::JoinNetns,
        Stage::Sync1,
        Stage::UnshareCgroup,
        Stage::Mounts,
        Stage::Sethostname,
        Stage::Setgroups,
        Stage::UnshareUser,
        Stage::SignalUserns,
        Stage::Sync2,
        Stage::Setresgid,
        Stage::Setresuid,
        Stage::CapBounding,
        Stage::CapAmbient,
        Stage::Securebits,
        Stage::Capset,
        Stage::Setsid,
        Stage::Pdeathsig,
        Stage::ParentGone,
        Stage::Dumpable,
        Stage::Rlimit,
        Stage::NoNewPrivs,
        Stage::LandlockRule,
        Stage::LandlockRestrict,
        Stage::CloseFds,
        Stage::Chdir,
        Stage::ForkProgram,
        Stage::Seccomp,
        Stage::Execve,
        Stage::InitSeccomp,
        Stage::PlaceFds,
        Stage::OpenProgram,
        Stage::ProgramChanged,
        Stage::ProgramFd,
    ];

    pub fn from_u32(n: u32) -> Option<Stage> {
        Stage::ALL.iter().copied().find(|s| *s as u32 == n)
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::JoinCgroup => "joining the v1 cgroups (tasks)",
            Stage::JoinNetns => "setns into its network namespace, made ahead",
            Stage::Sync1 => "waiting for the parent (sync 1)",
            Stage::UnshareCgroup => "unshare(CLONE_NEWCGROUP)",
            Stage::Mounts => "building the new root",
            Stage::Sethostname => "sethostname",
            Stage::Setgroups => "setgroups(0)",
            Stage::UnshareUser => "unshare(CLONE_NEWUSER)",
            Stage::SignalUserns => "signalling the parent (user namespace ready)",
            Stage::Sync2 => "waiting for the uid/gid maps (sync 2)",
            Stage::Setresgid => "setresgid",
            Stage::Setresuid => "setresuid",
            Stage::CapBounding => "dropping the capability bounding set",
            Stage::CapAmbient => "clearing ambient capabilities",
            Stage::Securebits => "locking securebits",
            Stage::Capset => "capset(0)",
            Stage::Setsid => "setsid",
            Stage::Pdeathsig => "PR_SET_PDEATHSIG",
            Stage::ParentGone => "checking the supervisor is alive (it died)",
            Stage::Dumpable => "PR_SET_DUMPABLE(0)",
            Stage::Rlimit => "setrlimit",
            Stage::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Stage::LandlockRule => "landlock_add_rule",
            Stage::LandlockRestrict => "landlock_restrict_self",
            Stage::CloseFds => "close_range",
            Stage::Chdir => "chdir",
            Stage::ForkProgram => "forking the program from the sandbox's init",
            Stage::Seccomp => "seccomp(SECCOMP_SET_MODE_FILTER)",
            Stage::Execve => "execveat",
            Stage::InitSeccomp => "seccomp of the sandbox's init",
            Stage::PlaceFds => "placing stdio, the broker and the listening socket (dup2)",
            Stage::OpenProgram => "opening the program inside the sandbox",
            Stage::ProgramChanged => {
                "checking the program is the file opened (and hashed) before the start"
            }
            Stage::ProgramFd => "keeping the script's descriptor open for its interpreter",
        }
    }
}

/// What the caller decides about a run, beyond the plan.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The program, opened at its canonical host path (already allowed by the policy): the
    /// child starts this very file or nothing.
    pub program: Arc<OpenedProgram>,
    /// `argv[0]` as the user typed it.
    pub argv0: OsString,
    /// `argv[1..]`.
    pub args: Vec<OsString>,
    /// Host workspace directory (bound at the plan's workspace mount).
    pub workspace: Option<PathBuf>,
    /// Root or rootless: how the child is cloned, its workspace mounted, its rlimits clamped.
    pub privilege: Privilege,
    /// Host identity of the sandbox (`--run-as`), decided by [`Launch::prepare`] through
    /// [`Privilege::host_ids`]: ignored in rootless mode, where the sandbox runs as the
    /// supervisor's own euid/egid (see [`Launch::host_ids`]).
    pub run_as: RunAs,
    /// The supervisor's environment, the source of `env.pass`.
    pub env: Vec<(OsString, OsString)>,
    /// The child gets a broker socket at [`fds::BROKER_FD`] ([`ChildIo::broker`]): its
    /// environment then says so (`CARAPACE_BROKER_FD=3`, which overrides the plan's).
    pub broker: bool,
    /// The child gets a listening socket at [`fds::LISTEN_FD`] ([`ChildIo::listener`]): its
    /// environment then says so (`CARAPACE_LISTEN_FD=4`, which overrides the plan's). Without
    /// a broker, fd 3 is simply closed.
    pub listener: bool,
    /// Variables the supervisor itself sets for the child (`CARAPACE_*` only, e.g. the
    /// gateway's `CARAPACE_GATEWAY_SETTINGS`): they bypass the profile's environment filter,
    /// like `CARAPACE_BROKER_FD`, and override any variable of the same name.
    pub supervisor_env: Vec<(OsString, OsString)>,
}

/// Descriptors a child gets in place of the supervisor's stdio, and its broker socket. Each is
/// borrowed from the caller for the duration of [`Launch::spawn_with`]; the child gets its own
/// copy (close-on-exec cleared) at the fixed number, the caller keeps and closes the original.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChildIo<'a> {
    pub stdin: Option<BorrowedFd<'a>>,
    pub stdout: Option<BorrowedFd<'a>>,
    pub stderr: Option<BorrowedFd<'a>>,
    /// Placed at [`fds::BROKER_FD`]; required exactly when the launch was prepared with
    /// [`LaunchOptions::broker`].
    pub broker: Option<BorrowedFd<'a>>,
    /// A listening socket placed at [`fds::LISTEN_FD`]; required exactly when the launch was
    /// prepared with [`LaunchOptions::listener`].
    pub listener: Option<BorrowedFd<'a>>,
}

impl ChildIo<'_> {
    fn raw(&self) -> [RawFd; fds::PLACED_FDS] {
        let r = |f: Option<BorrowedFd<'_>>| f.map_or(-1, |f| f.as_raw_fd());
        [
            r(self.stdin),
            r(self.stdout),
            r(self.stderr),
            r(self.broker),
            r(self.listener),
        ]
    }
}

/// Everything the child needs, computed before fork.
#[derive(Debug)]
pub struct Launch {
    clone_flags: libc::c_int,
    unshare_cgroup: bool,
    mounts: mounts::Built,
    /// Kept open until the child has moved it into place.
    workspace: Option<WorkspaceTree>,
    hostname: Option<CString>,
    inside_uid: u32,
    inside_gid: u32,
    /// The host uid/gid the sandbox runs as.
    host: HostIds,
    /// Said to the operator when a per-run identity may be shared (see [`RunAs::resolve`]).
    run_as_note: Option<String>,
    /// Rootless mode: the supervisor is not root (see the module docs).
    rootless: bool,
    uid_map: String,
    gid_map: String,
    cap_last: u32,
    rlimits: Vec<rlimits::Prepared>,
    landlock: landlock::Prepared,
    seccomp: seccomp::Prepared,
    /// The init's own fixed filter (see [`crate::init`]), installed right after it forks the
    /// program.
    init_seccomp: seccomp::Prepared,
    cwd: CString,
    /// Where the program appears inside the sandbox (opened there by the child).
    program: CString,
    program_inside: PathBuf,
    /// What the child must find there: the opened (hashed) file, unchanged.
    program_id: FileId,
    /// How the checked program is executed.
    exec: Exec,
    /// Held until the child has exec'd: the inode stays allocated, so its number cannot be
    /// given to another file meanwhile.
    opened: Arc<OpenedProgram>,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    wall_time: Option<Duration>,
    /// The child gets a broker socket at fd 3 (see [`LaunchOptions::broker`]).
    broker: bool,
    /// The child gets a listening socket at fd 4 (see [`LaunchOptions::listener`]).
    listener: bool,
    /// A brokered network's forwarded hosts: listeners are made in the child's network
    /// namespace before it may run its program (see [`crate::egress`]).
    forward: Vec<carapace_policy::plan::Forward>,
    /// A fresh network namespace made ahead (by the spawner, see [`Launch::use_premade_netns`]):
    /// the child joins it instead of cloning with `CLONE_NEWNET`.
    netns: Option<OwnedFd>,
    /// A Launch is used once: the workspace mount is moved into the first child.
    spawned: AtomicBool,
}

/// A start that failed: why, and the child when there was one (not reaped yet).
pub(crate) type StartFailure = Box<(SpawnError, Option<Running>)>;

/// Who the child's parent is.
#[derive(Debug, Clone, Copy)]
enum Sibling {
    /// The calling process.
    No,
    /// The calling process's parent (`CLONE_PARENT`): the spawner's clone, see
    /// [`Launch::spawn_for_supervisor`].
    Yes { lifeline: RawFd },
}

/// How the child executes the program once it has checked it is the opened file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exec {
    /// `execveat(fd, "", AT_EMPTY_PATH)` of the checked descriptor, close-on-exec (an ELF
    /// program: the kernel maps the file itself).
    Fd,
    /// The same, the descriptor kept open for the interpreter, which is handed `/dev/fd/N` (a
    /// script in a mount the sandbox can write).
    ScriptFd,
    /// `execve(path)` after the check: a script in a mount the sandbox cannot write, so that
    /// its interpreter gets the real path as `$0`.
    ScriptPath,
}

impl Exec {
    fn choose(script: bool, writable: bool) -> Exec {
        match (script, writable) {
            (false, _) => Exec::Fd,
            (true, true) => Exec::ScriptFd,
            (true, false) => Exec::ScriptPath,
        }
    }

    /// The syscall that starts the program.
    fn syscall(self) -> &'static str {
        match self {
            Exec::Fd | Exec::ScriptFd => "execveat",
            Exec::ScriptPath => "execve",
        }
    }
}

fn cstring(what: impl Into<String>, b: &[u8]) -> Result<CString, SpawnError> {
    CString::new(b).map_err(|_| SpawnError::Nul { what: what.into() })
}

/// The child's environment: `pass` names copied from `source` when present, then `set`
/// (which wins). Order: pass in plan order, then set in plan order; no duplicates.
pub fn build_env(
    plan: &carapace_policy::plan::EnvPlan,
    source: &[(OsString, OsString)],
) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> = Vec::new();
    let mut put = |k: &OsStr, v: &OsStr| {
        if let Some(e) = out.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.to_os_string();
        } else {
            out.push((k.to_os_string(), v.to_os_string()));
        }
    };
    for name in &plan.pass {
        if let Some((_, v)) = source.iter().find(|(k, _)| k == OsStr::new(name)) {
            put(OsStr::new(name), v);
        }
    }
    for (k, v) in &plan.set {
        put(OsStr::new(k), OsStr::new(v));
    }
    out
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Whether the plan lets its program be started the way [`Exec`] says: the seccomp filter,
/// installed right before, must let that syscall through, and a script handed over as
/// `/dev/fd/N` needs the profile's `/dev` (whose `fd` links to `/proc/self/fd`) and `/proc`.
fn check_exec(plan: &Plan, program: &OpenedProgram, exec: Exec) -> Result<(), SpawnError> {
    let syscall = exec.syscall();
    let sc = &plan.seccomp;
    let allowed = sc.allowed.iter().any(|s| s == syscall)
        || sc.conditional.iter().any(|c| c.syscall == syscall)
        || (!sc.denied.iter().any(|(s, _)| s == syscall)
            && matches!(sc.default_action, SeccompAction::Log | SeccompAction::Allow));
    if !allowed {
        return Err(SpawnError::ExecNotAllowed {
            profile: plan.profile.clone(),
            syscall,
        });
    }
    if exec == Exec::ScriptFd {
        let has = |want: fn(&Mount) -> bool| plan.mounts.iter().any(want);
        let dev = has(|m| matches!(m, Mount::Dev { dst, .. } if dst == Path::new("/dev")));
        let proc = has(|m| matches!(m, Mount::Proc { dst } if dst == Path::new("/proc")));
        if !(dev && proc) {
            return Err(SpawnError::ScriptNeedsDevFd {
                program: program.path().to_path_buf(),
                profile: plan.profile.clone(),
            });
        }
    }
    Ok(())
}

impl Launch {
    /// Compute everything for running `opts.program` under `plan` on a kernel with Landlock
    /// ABI `landlock_abi`. Fails before any process exists if something cannot be enforced or
    /// the program would not be executable inside the sandbox.
    pub fn prepare(
        plan: &Plan,
        opts: &LaunchOptions,
        landlock_abi: u8,
    ) -> Result<Launch, SpawnError> {
        let t0 = Instant::now();
        let lap = |what: &str| {
            tracing::debug!(
                "prepare: {what} at {:.2}ms",
                t0.elapsed().as_secs_f64() * 1e3
            )
        };
        let rootless = !opts.privilege.is_root();
        if rootless && !plan.network.forwards().is_empty() {
            return Err(crate::egress::EgressError::Rootless.into());
        }
        let clone_flags = if rootless {
            namespaces::rootless_clone_flags(&plan.namespaces)?
        } else {
            namespaces::clone_flags(&plan.namespaces)?
        };
        // A per-run identity is numbered by the thread that starts the run (the process, for
        // `carapace exec`): no two runs at the same time share it.
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let (host, run_as_note) = opts
            .privilege
            .host_ids(opts.run_as, u32::try_from(tid).unwrap_or(0));
        // The ids the child's mounts (tmpfs owners) are made with: the host's as root; in
        // rootless mode the child mounts inside its user namespace, where the sandbox user is
        // the plan's.
        let mount_ids = if rootless {
            HostIds {
                uid: plan.user.uid,
                gid: plan.user.gid,
            }
        } else {
            host
        };
        let ws_mount = plan.mounts.iter().find_map(|m| match m {
            Mount::Workspace { writable, exec, .. } => Some((*writable, *exec)),
            _ => None,
        });
        let workspace = match (ws_mount, &opts.workspace) {
            (Some((writable, exec)), Some(dir)) if rootless => {
                Some(mounts::prepare_workspace_plain(dir, writable, exec)?)
            }
            (Some((writable, exec)), Some(dir)) => {
                Some(mounts::prepare_workspace(dir, writable, exec, host)?)
            }
            (Some(_), None) => return Err(MountError::NoWorkspace.into()),
            (None, _) => None,
        };
        lap(if rootless {
            "workspace (rootless: plain bind)"
        } else {
            "idmapped workspace"
        });
        let built = mounts::build(&plan.mounts, workspace.as_ref(), mount_ids)?;
        lap("mount program");
        let inside = mounts::program_inside(&built.views, opts.program.path())?;
        let exec = Exec::choose(opts.program.is_script(), inside.writable);
        check_exec(plan, &opts.program, exec)?;
        let program_inside = inside.path;
        let landlock = landlock::prepare(
            &plan.landlock,
            workspace.as_ref().map(|w| &w.dir_fd),
            landlock_abi,
        )?;
        lap("landlock ruleset");
        let seccomp = seccomp::prepare(&plan.seccomp.program)?;
        let init_seccomp = crate::init::prepare()?;
        let mut rlimits = rlimits::prepare(&plan.rlimits)?;
        if rootless {
            // Only root may raise a hard limit: never ask for more than we have.
            rlimits::clamp_to_current(&mut rlimits);
        }
        let cap_last = caps::cap_last_cap()?;
        let hostname = if plan.namespaces.uts {
            Some(cstring("hostname", plan.hostname.as_bytes())?)
        } else {
            None
        };
        let mut argv = vec![cstring("argv[0]", opts.argv0.as_bytes())?];
        for (i, a) in opts.args.iter().enumerate() {
            argv.push(cstring(format!("argument {}", i + 1), a.as_bytes())?);
        }
        let mut env = build_env(&plan.env, &opts.env);
        for (given, name, fd) in [
            (opts.broker, fds::BROKER_FD_ENV, fds::BROKER_FD),
            (opts.listener, fds::LISTEN_FD_ENV, fds::LISTEN_FD),
        ] {
            if given {
                env.retain(|(k, _)| k != name);
                env.push((OsString::from(name), OsString::from(fd.to_string())));
            }
        }
        for (k, v) in &opts.supervisor_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let mut envp = Vec::new();
        for (k, v) in env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstring(
                format!("environment variable {}", k.to_string_lossy()),
                &kv,
            )?);
        }
        lap("the rest");
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);
        Ok(Launch {
            clone_flags,
            unshare_cgroup: plan.namespaces.cgroup,
            mounts: built,
            workspace,
            hostname,
            inside_uid: plan.user.uid,
            inside_gid: plan.user.gid,
            host,
            run_as_note,
            rootless,
            uid_map: namespaces::map_line(plan.user.uid, host.uid),
            gid_map: namespaces::map_line(plan.user.gid, host.gid),
            cap_last,
            rlimits,
            landlock,
            init_seccomp,
            seccomp,
            cwd: cstring("cwd", plan.cwd.as_os_str().as_bytes())?,
            program: cstring("program path", program_inside.as_os_str().as_bytes())?,
            program_inside,
            program_id: opts.program.id(),
            exec,
            opened: opts.program.clone(),
            argv,
            argv_ptrs,
            envp,
            envp_ptrs,
            wall_time: plan.wall_time,
            broker: opts.broker,
            listener: opts.listener,
            forward: plan.network.forwards().to_vec(),
            netns: None,
            spawned: AtomicBool::new(false),
        })
    }

    /// Where the program is executed from inside the sandbox.
    pub fn program_inside(&self) -> &Path {
        &self.program_inside
    }

    /// The environment the child gets, as `KEY=VALUE` strings.
    pub fn env(&self) -> impl Iterator<Item = &std::ffi::CStr> {
        self.envp.iter().map(|c| c.as_c_str())
    }

    pub fn argv(&self) -> impl Iterator<Item = &std::ffi::CStr> {
        self.argv.iter().map(|c| c.as_c_str())
    }

    pub fn wall_time(&self) -> Option<Duration> {
        self.wall_time
    }

    /// The mount program, for `-v` and error messages.
    pub fn mount_ops(&self) -> &[mounts::Op] {
        &self.mounts.ops
    }

    /// The pid of the idmapping's helper while it is not reaped (see [`Launch::spawn_with`]).
    #[cfg(test)]
    pub(crate) fn workspace_helper_pid(&self) -> Option<libc::pid_t> {
        self.workspace.as_ref().and_then(WorkspaceTree::helper_pid)
    }

    /// The workspace owner (uid, gid) writes land as, if a workspace is mounted.
    pub fn workspace_owner(&self) -> Option<(u32, u32)> {
        self.workspace.as_ref().map(|w| (w.owner_uid, w.owner_gid))
    }

    /// Start the program. The child is in `cgroup` before it builds anything: born there (v2,
    /// clone3 CLONE_INTO_CGROUP; else moved by us before sync 1) and joining the v1 hierarchies
    /// itself first thing.
    pub fn spawn(&self, cgroup: Option<&Cgroup>) -> Result<Running, SpawnError> {
        self.spawn_with(cgroup, ChildIo::default())
    }

    /// Whether the child gets a broker socket (see [`LaunchOptions::broker`]).
    pub fn brokered(&self) -> bool {
        self.broker
    }

    /// Whether this launch is for rootless mode: prepared by a supervisor whose euid is not 0.
    /// The sandbox then runs as that euid/egid (`run_as` is ignored), its workspace is a plain
    /// bind, and no cgroup is needed (limits fall back to rlimits, see
    /// [`rlimits::cgroup_fallback`]); the child's namespaces are owned by a user namespace of
    /// its own (see the module docs).
    pub fn rootless(&self) -> bool {
        self.rootless
    }

    /// The host uid/gid the sandboxed program runs as.
    pub fn host_ids(&self) -> HostIds {
        self.host
    }

    /// A note for the operator when the per-run identity may be shared with another run.
    pub fn run_as_note(&self) -> Option<&str> {
        self.run_as_note.as_deref()
    }

    /// Whether the child gets a listening socket (see [`LaunchOptions::listener`]).
    pub fn listens(&self) -> bool {
        self.listener
    }

    /// [`Launch::spawn`] with the child's stdio replaced and/or a broker socket and/or a
    /// listening socket given (`io`).
    pub fn spawn_with(
        &self,
        cgroup: Option<&Cgroup>,
        io: ChildIo<'_>,
    ) -> Result<Running, SpawnError> {
        let join = cgroup.map(Cgroup::join_fds).transpose()?;
        self.spawn_inner(join.as_ref(), cgroup, io, Sibling::No)
            .map_err(|f| {
                let (e, started) = *f;
                if let Some(r) = started {
                    r.kill_and_reap();
                }
                e
            })
    }

    /// Whether this launch would clone a network namespace that a fresh one made ahead can
    /// stand in for: root mode (a rootless sandbox's namespaces belong to its own user
    /// namespace, made at the clone), and no brokered network (whose listeners are made in the
    /// child's namespace, found through its pidfd, right after the clone).
    pub fn wants_premade_netns(&self) -> bool {
        self.clone_flags & libc::CLONE_NEWNET != 0 && !self.rootless && self.forward.is_empty()
    }

    /// Let the child join `netns`, a network namespace made ahead and never used (nothing ever
    /// ran in it), instead of cloning one: the same namespace as `CLONE_NEWNET` makes (owned by
    /// the initial user namespace, only `lo`, down), its creation (the device and sysctl
    /// registration, ~0.4 ms here) done before the request came. Only when
    /// [`Launch::wants_premade_netns`]; else `netns` is handed back.
    pub fn use_premade_netns(&mut self, netns: OwnedFd) -> Result<(), OwnedFd> {
        if !self.wants_premade_netns() || self.netns.is_some() {
            return Err(netns);
        }
        self.clone_flags &= !libc::CLONE_NEWNET;
        self.netns = Some(netns);
        Ok(())
    }

    /// [`Launch::spawn_with`] from the spawner process (see [`crate::spawner`]): the child is
    /// cloned with `CLONE_PARENT`, a child of the supervisor that started the spawner, and
    /// joins its cgroup through `join` (the cgroup's descriptors, sent by the supervisor).
    /// `lifeline` is the spawner's socket to the supervisor (see `child_main`). On a failure
    /// after the clone, the child is killed and handed back with the error: only the
    /// supervisor can reap it.
    pub(crate) fn spawn_for_supervisor(
        &self,
        join: Option<&JoinFds>,
        lifeline: RawFd,
        io: ChildIo<'_>,
    ) -> Result<Running, StartFailure> {
        self.spawn_inner(join, None, io, Sibling::Yes { lifeline })
            .inspect_err(|f| {
                if let Some(r) = &f.1 {
                    r.kill();
                }
            })
    }

    /// The clone and the handshake. `join`: the cgroup's descriptors; `late`: the cgroup
    /// itself, for the case clone3 could not place the child (without it, its v2
    /// `cgroup.procs` is written through `join`'s directory). On an error after the clone,
    /// the child (not killed yet) comes back with it.
    fn spawn_inner(
        &self,
        join: Option<&JoinFds>,
        late_cgroup: Option<&Cgroup>,
        io: ChildIo<'_>,
        sibling: Sibling,
    ) -> Result<Running, StartFailure> {
        for (what, prepared, given) in [
            ("a broker socket", self.broker, io.broker.is_some()),
            ("a listening socket", self.listener, io.listener.is_some()),
        ] {
            if prepared != given {
                return Err(Box::new((
                    SpawnError::IoMismatch {
                        what,
                        prepared,
                        given,
                    },
                    None,
                )));
            }
        }
        if self.spawned.swap(true, Ordering::SeqCst) {
            return Err(Box::new((SpawnError::Reused, None)));
        }
        let pipes = || -> Result<[Pipe; 4], SpawnError> {
            Ok([
                Pipe::new("sync parent->child")?,
                Pipe::new("sync child->parent")?,
                Pipe::new("exec-error pipe")?,
                Pipe::new("init status pipe")?,
            ])
        };
        let [go, ready, errp, status] = pipes().map_err(|e| Box::new((e, None)))?;
        let (lifeline, extra_flags) = match sibling {
            Sibling::No => (-1, 0),
            Sibling::Yes { lifeline } => (lifeline, libc::CLONE_PARENT as u64),
        };
        let fds = ChildFds {
            status_read: status.read.as_raw_fd(),
            status_write: status.write.as_raw_fd(),
            go_read: go.read.as_raw_fd(),
            go_write: go.write.as_raw_fd(),
            ready_read: ready.read.as_raw_fd(),
            ready_write: ready.write.as_raw_fd(),
            err_read: errp.read.as_raw_fd(),
            err_write: errp.write.as_raw_fd(),
            io: io.raw(),
            place: io.raw() != [-1; fds::PLACED_FDS],
            lifeline,
            netns: self.netns.as_ref().map_or(-1, |f| f.as_raw_fd()),
        };
        // Born in the cgroup: v2 through clone3(CLONE_INTO_CGROUP), v1 by the child writing its
        // own `tasks` first thing. Neither takes the kernel's global cgroup migration lock,
        // which `cgroup.procs` writes do (milliseconds per write).
        let v1_tasks: Vec<RawFd> = join.map(|j| j.v1_raw()).unwrap_or_default();
        let v2_dir = join.and_then(|j| j.v2_dir.as_ref()).map(|f| f.as_raw_fd());
        // The program child's stack (see `child_main`): the clone below gives the child a
        // private copy of it; ours is dropped with this frame.
        let mut program_stack = crate::namespaces::CloneStack::new();
        let stack = program_stack.top();
        let started = Instant::now();
        let mut pidfd: libc::c_int = -1;
        let mut born_in_cgroup = false;
        let mut pid = -1;
        if let Some(dir) = v2_dir {
            pid = self.clone3_into(dir, &mut pidfd, &fds, &v1_tasks, stack, extra_flags);
            let e = fds::errno();
            if pid < 0
                && !matches!(
                    e,
                    libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EOPNOTSUPP | libc::EBUSY
                )
            {
                return Err(Box::new((
                    SpawnError::Sys {
                        syscall: "clone3(CLONE_INTO_CGROUP)",
                        source: io::Error::from_raw_os_error(e),
                    },
                    None,
                )));
            }
            born_in_cgroup = pid > 0;
        }
        if pid < 0 {
            pid = self.clone_plain(&mut pidfd, &fds, &v1_tasks, stack, extra_flags);
        }
        if pid < 0 {
            let source = io::Error::last_os_error();
            if self.rootless && userns_refused(&source) {
                return Err(Box::new((SpawnError::RootlessUserns { source }, None)));
            }
            return Err(Box::new((
                SpawnError::Sys {
                    syscall: "clone",
                    source,
                },
                None,
            )));
        }
        let pid = pid as libc::pid_t;
        // SAFETY: CLONE_PIDFD succeeded, so `pidfd` is a new fd owned by us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop(go.read);
        drop(ready.write);
        drop(errp.write);
        drop(status.write);
        let mut running = Running {
            pid,
            pidfd,
            status: status.read,
            started,
            reaped: false,
            forward: Vec::new(),
        };
        // The child waits for "go 1": its network namespace exists and nothing runs in it yet.
        match crate::egress::listen_in(running.pidfd.as_fd(), &self.forward) {
            Ok(l) => running.forward = l,
            Err(e) => return Err(Box::new((e.into(), Some(running)))),
        }
        // Fallback when clone3 could not place the child: move it after the fact.
        let late = if v2_dir.is_some() && !born_in_cgroup {
            match (late_cgroup, join) {
                (Some(cg), _) => cg.add_process(pid),
                (None, Some(j)) => j.add_process_v2(pid),
                (None, None) => Ok(()),
            }
        } else {
            Ok(())
        };
        let setup_deadline = started + self.wall_time.unwrap_or(SETUP_TIMEOUT).min(SETUP_TIMEOUT);
        let result = late
            .map_err(SpawnError::from)
            .and_then(|()| self.handshake(pid, &go.write, &ready.read, &errp.read, setup_deadline));
        // The child has its workspace mount (or failed): the idmapping's helper, killed when
        // the mount was made, is reaped now rather than when this Launch is dropped, which for
        // a service child is the end of its life.
        if let Some(w) = &self.workspace {
            w.reap_helper();
        }
        match result {
            Ok(()) => Ok(running),
            Err(e) => Err(Box::new((e, Some(running)))),
        }
    }

    /// clone3 with CLONE_INTO_CGROUP; runs `child_main` in the child. Returns the raw result.
    fn clone3_into(
        &self,
        cgroup_dir: RawFd,
        pidfd: &mut libc::c_int,
        fds: &ChildFds,
        v1_tasks: &[RawFd],
        program_stack: *mut libc::c_void,
        extra_flags: u64,
    ) -> libc::c_long {
        let args = CloneArgs {
            flags: (self.clone_flags as u64)
                | libc::CLONE_PIDFD as u64
                | CLONE_INTO_CGROUP
                | extra_flags,
            pidfd: pidfd as *mut libc::c_int as u64,
            // CLONE_PARENT: the child's exit signal is the caller's own (the spawner's: SIGCHLD,
            // for the supervisor), and clone3 requires 0 here.
            exit_signal: if extra_flags & libc::CLONE_PARENT as u64 != 0 {
                0
            } else {
                libc::SIGCHLD as u64
            },
            cgroup: cgroup_dir as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and with no stack behaves like fork: the child gets a
        // private copy of our memory (including `self`, `fds`, `v1_tasks` and the allocation
        // `program_stack` points into) and its own fd table, and only runs `child_main` (raw
        // async-signal-safe syscalls, never returns).
        // `args` is a valid clone_args of the size passed; `pidfd` receives the pidfd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if r == 0 {
            child_main(self, fds, v1_tasks, program_stack);
        }
        r
    }

    /// Plain clone (fallback); runs `child_main` in the child. Returns the raw result.
    fn clone_plain(
        &self,
        pidfd: &mut libc::c_int,
        fds: &ChildFds,
        v1_tasks: &[RawFd],
        program_stack: *mut libc::c_void,
        extra_flags: u64,
    ) -> libc::c_long {
        // With CLONE_PARENT the exit signal given here is ignored for the caller's own.
        let flags = (self.clone_flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong
            | extra_flags as libc::c_ulong;
        // SAFETY: raw clone without CLONE_VM/CLONE_VFORK behaves like fork: the child gets a
        // private copy of our memory and its own fd table, and only runs `child_main`, which
        // uses async-signal-safe raw syscalls and never returns. `pidfd` is a valid int for the
        // kernel to store the pidfd in (CLONE_PIDFD).
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags,
                0usize,
                pidfd as *mut libc::c_int,
                0usize,
                0usize,
            )
        };
        if r == 0 {
            child_main(self, fds, v1_tasks, program_stack);
        }
        r
    }

    fn handshake(
        &self,
        pid: libc::pid_t,
        go: &OwnedFd,
        ready: &OwnedFd,
        err: &OwnedFd,
        deadline: Instant,
    ) -> Result<(), SpawnError> {
        let t0 = Instant::now();
        let lap = |what: &str| {
            tracing::debug!("start: {what} at {:.2}ms", t0.elapsed().as_secs_f64() * 1e3)
        };
        if self.rootless {
            // The child was born in its user namespace: map it before it does anything.
            namespaces::write_id_maps_unprivileged(pid, &self.uid_map, &self.gid_map)?;
            lap("maps written (rootless)");
        }
        // A failed write means the child is gone; its error record (if any) explains why.
        let sent = fds::write_byte(go, 1, "sync 1");
        let mut b = [0u8; 1];
        let got = if sent.is_ok() {
            fds::read_full_until(ready, &mut b, deadline, "sync: user namespace ready")?
        } else {
            0
        };
        if got != 1 {
            return Err(child_error(err, pid));
        }
        lap("user namespace ready");
        if !self.rootless {
            namespaces::write_id_maps(pid, &self.uid_map, &self.gid_map)?;
            lap("maps written");
        }
        if fds::write_byte(go, 2, "sync 2").is_err() {
            return Err(child_error(err, pid));
        }
        let mut rec = [0u8; fds::FAILURE_LEN];
        let n = fds::read_full_until(err, &mut rec, deadline, "exec-error pipe")?;
        lap("exec");
        if n == 0 {
            return Ok(()); // EOF: execve succeeded and closed the CLOEXEC write end.
        }
        Err(decode_failure(&rec[..n], self))
    }
}

fn decode_failure(rec: &[u8], launch: &Launch) -> SpawnError {
    match ChildFailure::decode(rec) {
        Some(f) => {
            let stage = Stage::from_u32(f.stage);
            let detail = match stage {
                Some(Stage::Mounts) => launch
                    .mounts
                    .ops
                    .get(f.index as usize)
                    .map(|op| format!(" ({op})"))
                    .unwrap_or_default(),
                Some(Stage::LandlockRule) => launch
                    .landlock
                    .sandbox_rules
                    .get(f.index as usize)
                    .map(|r| format!(" ({})", r.path.to_string_lossy()))
                    .unwrap_or_default(),
                Some(Stage::Rlimit) => launch
                    .rlimits
                    .get(f.index as usize)
                    .map(|r| format!(" ({} = {})", r.name, r.value.rlim_max))
                    .unwrap_or_default(),
                Some(Stage::Execve | Stage::OpenProgram | Stage::ProgramFd) => {
                    format!(" ({})", launch.program_inside.display())
                }
                Some(Stage::ProgramChanged) => format!(
                    " ({} is no longer the file that was opened{}: not run)",
                    launch.program_inside.display(),
                    if launch.opened.sha256_known() {
                        " and hashed for the approval"
                    } else {
                        ""
                    }
                ),
                Some(Stage::Chdir) => format!(" ({})", launch.cwd.to_string_lossy()),
                _ => String::new(),
            };
            SpawnError::Child {
                stage: stage.map_or("an unknown step", Stage::name),
                detail,
                source: io::Error::from_raw_os_error(f.errno),
            }
        }
        None => SpawnError::Child {
            stage: "an unknown step",
            detail: format!(" (truncated report of {} bytes)", rec.len()),
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        },
    }
}

/// Read the child's failure record after it stopped answering.
fn child_error(err: &OwnedFd, pid: libc::pid_t) -> SpawnError {
    let mut rec = [0u8; fds::FAILURE_LEN];
    match fds::read_full(err, &mut rec, "exec-error pipe") {
        Ok(n) if n > 0 => {
            if let Some(f) = ChildFailure::decode(&rec[..n]) {
                let stage = Stage::from_u32(f.stage);
                return SpawnError::Child {
                    stage: stage.map_or("an unknown step", Stage::name),
                    detail: String::new(),
                    source: io::Error::from_raw_os_error(f.errno),
                };
            }
            SpawnError::ChildVanished { status: -1 }
        }
        _ => {
            let mut status = 0;
            // SAFETY: non-blocking peek at our own child's status.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
            SpawnError::ChildVanished { status }
        }
    }
}

#[cfg(test)]
mod tests;
