//! The compiled plan: everything the supervisor applies to one confined child, as plain data.
//!
//! A [`Plan`] is the only thing that crosses from `policy` to the supervisor's kernel modules.
//! `explain` is rendered from the same `Plan` value (see [`Plan::explain`]), so it can never
//! claim a protection that the supervisor does not apply. Paths in a plan are absolute and
//! normalized; the workspace is a placeholder ([`Mount::Workspace`]) because only the supervisor
//! knows which host directory it is.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// One compiled profile, ready to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Name of the profile this plan was compiled from.
    pub profile: String,
    /// Namespaces to create. The supervisor refuses to start if one cannot be created.
    pub namespaces: Namespaces,
    /// Identity inside the sandbox's user namespace (the host identity is the supervisor's).
    pub user: SandboxUser,
    /// Hostname set in the new UTS namespace.
    pub hostname: String,
    /// Mounts, in the order they are made beneath the new root. Parents come before children.
    pub mounts: Vec<Mount>,
    /// Working directory inside the sandbox (absolute).
    pub cwd: PathBuf,
    /// Landlock ruleset.
    pub landlock: LandlockPlan,
    /// Seccomp filter, compiled.
    pub seccomp: SeccompPlan,
    /// cgroup limits.
    pub cgroup: CgroupLimits,
    /// Resource limits set with setrlimit before exec (soft = hard).
    pub rlimits: Vec<Rlimit>,
    /// Wall-clock limit; the whole process tree is killed when it runs out.
    pub wall_time: Option<Duration>,
    /// Environment of the child: only what is listed here exists.
    pub env: EnvPlan,
    /// Network view.
    pub network: Network,
}

/// Which namespaces the child gets. All default to `true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Namespaces {
    pub user: bool,
    pub pid: bool,
    pub mount: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
    pub cgroup: bool,
}

/// The uid/gid the program runs as *inside* its user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
}

/// One mount beneath the new root. `dst` is the path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mount {
    /// Bind mount of a host path. Always nosuid and nodev; read-only unless `writable`;
    /// noexec unless `exec`. A missing `src` is an error unless `optional`.
    Bind {
        src: PathBuf,
        dst: PathBuf,
        writable: bool,
        exec: bool,
        optional: bool,
    },
    /// The workspace placeholder: the supervisor binds the host workspace directory here.
    Workspace {
        dst: PathBuf,
        writable: bool,
        exec: bool,
    },
    /// A fresh tmpfs (nosuid, nodev, noexec unless `exec`).
    Tmpfs {
        dst: PathBuf,
        size_bytes: u64,
        mode: u32,
        exec: bool,
    },
    /// A new procfs for the sandbox's pid namespace, read-only.
    Proc { dst: PathBuf },
    /// A minimal /dev: null, zero, full, random, urandom, tty-less; fd/stdin/stdout/stderr links.
    Dev { dst: PathBuf },
    /// A symlink in the new root (e.g. `/bin -> usr/bin` on merged-/usr hosts).
    Symlink { dst: PathBuf, target: PathBuf },
}

impl Mount {
    /// The mount point inside the sandbox.
    pub fn dst(&self) -> &std::path::Path {
        match self {
            Mount::Bind { dst, .. }
            | Mount::Workspace { dst, .. }
            | Mount::Tmpfs { dst, .. }
            | Mount::Proc { dst }
            | Mount::Dev { dst }
            | Mount::Symlink { dst, .. } => dst,
        }
    }
}

/// Filesystem rights for a Landlock rule, a subset of what Landlock handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct FsRights {
    /// Read files and list directories.
    pub read: bool,
    /// Write, create, remove, rename, truncate, make dirs/symlinks/fifos/sockets (no devices).
    pub write: bool,
    /// Execute files.
    pub execute: bool,
    /// Use ioctl on device files (Landlock ABI 5). Only /dev gets it.
    pub ioctl_dev: bool,
}

/// Which path a Landlock rule is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum LandlockPath {
    /// A host path (the same inode is bind-mounted into the sandbox).
    Host(PathBuf),
    /// The host workspace directory, whatever it is at run time.
    Workspace,
    /// A path inside the sandbox's own view (tmpfs, /dev, /proc), resolved by the child after
    /// its root is in place.
    Sandbox(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockRule {
    pub path: LandlockPath,
    pub rights: FsRights,
}

/// The Landlock part of a plan. Everything not covered by a rule is denied for the handled
/// access rights. `min_abi` is a hard requirement: the supervisor refuses to run on older kernels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockPlan {
    pub min_abi: u8,
    pub rules: Vec<LandlockRule>,
    /// Deny all TCP bind/connect (ABI 4) — network is `none`.
    pub deny_tcp: bool,
    /// Scope abstract unix sockets and signals to the sandbox (ABI 6).
    pub scope_abstract_unix: bool,
    pub scope_signals: bool,
}

/// seccomp action when a syscall is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "errno", rename_all = "snake_case")]
pub enum SeccompAction {
    Errno(u32),
    KillProcess,
    Log,
    Allow,
}

/// One BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The compiled seccomp filter and the facts `explain` prints about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompPlan {
    /// The complete program, architecture and x32 guard first. Applied last, right before
    /// execve, with SECCOMP_FILTER_FLAG_TSYNC unnecessary (the child is single-threaded).
    pub program: Vec<BpfInsn>,
    pub default_action: SeccompAction,
    /// Syscalls allowed without conditions, sorted by name.
    pub allowed: Vec<String>,
    /// Syscalls allowed only with argument conditions, with a human description each.
    pub conditional: Vec<(String, String)>,
    /// Syscalls explicitly denied with their action (e.g. clone3 -> ENOSYS).
    pub denied: Vec<(String, SeccompAction)>,
}

/// cgroup limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU bandwidth in millicores (1000 = one full core).
    pub cpu_millis: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RlimitResource {
    Nofile,
    Fsize,
    Core,
    Nproc,
    As,
    Stack,
    Cpu,
    Memlock,
    Msgqueue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub value: u64,
}

/// Environment of the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvPlan {
    /// Names copied from the supervisor's environment when present.
    pub pass: Vec<String>,
    /// Fixed variables, set after `pass` (they win).
    pub set: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A new, empty network namespace; inet sockets blocked by seccomp and Landlock.
    None,
}

impl Plan {
    /// The confinement in plain words, derived only from this plan's fields.
    pub fn explain(&self) -> String {
        crate::explain::explain(self)
    }
}
