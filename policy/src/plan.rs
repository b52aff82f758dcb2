//! The compiled plan: everything the supervisor applies to one confined child, as plain data.
//!
//! A [`Plan`] is the only thing that crosses from `policy` to the supervisor's kernel modules.
//! `explain` is rendered from the same `Plan` value (see [`Plan::explain`]), so it can never
//! claim a protection that the supervisor does not apply. Paths in a plan are absolute and
//! normalized; the workspace is a placeholder ([`Mount::Workspace`]) because only the supervisor
//! knows which host directory it is.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One compiled profile, ready to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
}

/// One mount beneath the new root. `dst` is the path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A read-only file with these contents, written by the sandbox into its own scratch
    /// tmpfs and bound at `dst` (e.g. a brokered network's `/etc/hosts`).
    File { dst: PathBuf, contents: String },
    /// A minimal /dev: null, zero, full, random, urandom; fd/stdin/stdout/stderr links. With
    /// `pts`, also a new devpts instance at `pts` (`newinstance`: it holds only the ptys the
    /// sandbox opens, never the host's), `ptmx -> pts/ptmx` and `tty` (the caller's own
    /// controlling terminal).
    Dev { dst: PathBuf, pts: bool },
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
            | Mount::File { dst, .. }
            | Mount::Dev { dst, .. }
            | Mount::Symlink { dst, .. } => dst,
        }
    }
}

/// Filesystem rights for a Landlock rule, a subset of what Landlock handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockRule {
    pub path: LandlockPath,
    pub rights: FsRights,
}

/// The Landlock part of a plan. Everything not covered by a rule is denied for the handled
/// access rights. `min_abi` is a hard requirement: the supervisor refuses to run on older kernels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockPlan {
    pub min_abi: u8,
    pub rules: Vec<LandlockRule>,
    /// Deny TCP bind/connect (ABI 4) except connecting to `tcp_connect`.
    pub deny_tcp: bool,
    /// TCP ports the program may connect to (a brokered network's forwarded ports; they are
    /// only reachable on the sandbox's loopback, where the supervisor listens).
    pub tcp_connect: Vec<u16>,
    /// Scope abstract unix sockets and signals to the sandbox (ABI 6).
    pub scope_abstract_unix: bool,
    pub scope_signals: bool,
}

/// seccomp action when a syscall is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", content = "errno", rename_all = "snake_case")]
pub enum SeccompAction {
    Errno(u32),
    KillProcess,
    Log,
    Allow,
}

/// One BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A test the filter makes on one syscall argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArgCondition {
    /// The low 32 bits of argument `arg` (0-based) equal one of `values` (name, value). Only the
    /// low half is compared because the kernel reads these arguments as 32-bit integers and
    /// ignores the rest: garbage in the high half is the same request to the kernel, and must be
    /// the same verdict to the filter (CVE-2019-10063).
    OneOf {
        arg: u8,
        /// What the argument is, in words ("socket domain", "request", ...).
        what: String,
        values: Vec<(String, u32)>,
    },
    /// None of `flags` (name, bit mask) is set in argument `arg` (all 64 bits compared).
    NoneOf {
        arg: u8,
        /// What the argument is, in words ("flags", "mode", ...).
        what: String,
        flags: Vec<(String, u64)>,
    },
    /// The low 32 bits of EACH argument in `args` equal one of `values` (name, value); the
    /// arguments are independent (each may hold any of the values). Low half only, as for
    /// [`ArgCondition::OneOf`]: the arguments are 32-bit ids (`uid_t`, `gid_t`) and the kernel
    /// ignores the high half.
    EachOneOf {
        args: Vec<u8>,
        /// What the arguments are, in words ("uid", "gid").
        what: String,
        values: Vec<(String, u32)>,
        /// What the condition amounts to, in words ("keeps the current ids").
        means: String,
    },
    /// The low 32 bits of argument `arg`, masked with the OR of `mask` (name, bits), equal
    /// `value` (name, bits). Low half only: the argument is a 32-bit `mode_t` and the kernel
    /// ignores the high half.
    MaskedEq {
        arg: u8,
        /// What the argument is, in words ("mode").
        what: String,
        mask: Vec<(String, u32)>,
        value: (String, u32),
        /// What the condition amounts to, in words ("for FIFOs only").
        means: String,
    },
}

impl ArgCondition {
    /// Whether the condition holds for these syscall arguments (the reference meaning that the
    /// BPF program must implement).
    pub fn holds(&self, args: &[u64; 6]) -> bool {
        match self {
            ArgCondition::OneOf { arg, values, .. } => {
                let a = args.get(usize::from(*arg)).copied().unwrap_or(0) as u32;
                values.iter().any(|(_, v)| *v == a)
            }
            ArgCondition::NoneOf { arg, flags, .. } => {
                let a = args.get(usize::from(*arg)).copied().unwrap_or(0);
                flags.iter().all(|(_, f)| a & f == 0)
            }
            ArgCondition::EachOneOf {
                args: which,
                values,
                ..
            } => which.iter().all(|i| {
                let a = args.get(usize::from(*i)).copied().unwrap_or(0) as u32;
                values.iter().any(|(_, v)| *v == a)
            }),
            ArgCondition::MaskedEq {
                arg, mask, value, ..
            } => {
                let a = args.get(usize::from(*arg)).copied().unwrap_or(0) as u32;
                a & mask_of(mask) == value.1
            }
        }
    }

    /// Whether the condition rules out every bit of `bits` in argument `arg`: no argument set
    /// for which it holds has one of them set there. The set-id guard uses this to accept a
    /// syscall whose condition already excludes S_ISUID and S_ISGID from the mode.
    pub fn excludes_bits(&self, arg: u8, bits: u64) -> bool {
        let low = |b: u64| u32::try_from(b).ok();
        match self {
            ArgCondition::OneOf { arg: a, values, .. } => {
                *a == arg && low(bits).is_some_and(|b| values.iter().all(|(_, v)| v & b == 0))
            }
            ArgCondition::NoneOf { arg: a, flags, .. } => {
                *a == arg && flags.iter().fold(0, |m, (_, f)| m | f) & bits == bits
            }
            ArgCondition::EachOneOf { args, values, .. } => {
                args.contains(&arg)
                    && low(bits).is_some_and(|b| values.iter().all(|(_, v)| v & b == 0))
            }
            ArgCondition::MaskedEq {
                arg: a,
                mask,
                value,
                ..
            } => *a == arg && low(bits).is_some_and(|b| mask_of(mask) & b == b && value.1 & b == 0),
        }
    }
}

/// The OR of a list of named bit masks.
pub(crate) fn mask_of(mask: &[(String, u32)]) -> u32 {
    mask.iter().fold(0, |m, (_, b)| m | b)
}

/// A syscall whose verdict depends on its arguments: `then` when `when` holds, else `otherwise`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionalSyscall {
    pub syscall: String,
    pub when: ArgCondition,
    pub then: SeccompAction,
    pub otherwise: SeccompAction,
}

/// The set-id guard, part of every seccomp plan whatever the policy says: the workspace is an
/// idmapped mount on which files the sandbox creates land owned by the workspace's OWNER (often
/// root), so a set-uid or set-gid bit on one would plant a set-id program for a host user to run.
/// Wherever the profile would allow (or only log) one of these syscalls, the filter adds:
///
/// * `chmod`, `fchmod`, `fchmodat`, `fchmodat2`, `creat`, `open`, `openat`, `mknod`, `mknodat`:
///   EPERM when the mode argument has S_ISUID or S_ISGID (a [`ConditionalSyscall`] with
///   [`ArgCondition::NoneOf`] on the mode, listed in [`SeccompPlan::conditional`]). Where the
///   profile allows `mknod`/`mknodat`, their own condition (FIFOs only: an
///   [`ArgCondition::MaskedEq`] that also masks S_ISUID and S_ISGID, refusing otherwise)
///   already excludes both bits, and the guard counts them as checked;
/// * `openat2`: ENOSYS (its mode lives in memory that seccomp cannot read; libc falls back to
///   openat), listed in [`SeccompPlan::denied`].
///
/// A syscall the profile already denies keeps its own verdict (as a separate filter would: the
/// kernel applies the more restrictive one). No policy key turns the guard off.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetidGuard {
    /// Syscalls whose mode argument the guard checks in this plan.
    pub mode_checked: Vec<String>,
    /// Syscalls the profile would allow but the guard refuses with ENOSYS.
    pub refused: Vec<String>,
}

/// The compiled seccomp filter and the facts `explain` prints about it. The program is emitted
/// from the lists below (see `policy/src/bpf.rs`), so they are exactly what it enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPlan {
    /// The complete program, architecture and x32 guard first, then a binary search on the
    /// syscall number. Applied last, right before execve, with SECCOMP_FILTER_FLAG_TSYNC
    /// unnecessary (the child is single-threaded).
    pub program: Vec<BpfInsn>,
    /// Verdict for every syscall not listed below.
    pub default_action: SeccompAction,
    /// Syscalls allowed without conditions, sorted by name.
    pub allowed: Vec<String>,
    /// Syscalls whose verdict depends on their arguments, sorted by name (this includes the
    /// set-id guard's mode checks).
    pub conditional: Vec<ConditionalSyscall>,
    /// Syscalls denied whatever their arguments, with their action (e.g. clone3 -> ENOSYS):
    /// the policy's deny entries in order, then what the set-id guard refuses.
    pub denied: Vec<(String, SeccompAction)>,
    /// Where the always-on set-id guard is in force (see [`SetidGuard`]).
    pub setid_guard: SetidGuard,
}

/// cgroup limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU bandwidth in millicores (1000 = one full core).
    pub cpu_millis: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub value: u64,
}

/// Environment of the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPlan {
    /// Names copied from the supervisor's environment when present.
    pub pass: Vec<String>,
    /// Fixed variables, set after `pass` (they win).
    pub set: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A new, empty network namespace; inet sockets blocked by seccomp and Landlock.
    None,
    /// A new network namespace whose only reachable places are the profile's `connect`
    /// hosts: each name is given a loopback address in the sandbox's `/etc/hosts`, where the
    /// supervisor listens and forwards every connection through the broker's `connect`
    /// (policy check, audit record, the broker's own resolution) to the real host.
    Brokered { forward: Vec<Forward> },
}

/// One host a brokered network forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The name the program connects to, exactly as the `connect` rule names it.
    pub host: String,
    pub port: u16,
    /// The loopback address the name has inside the sandbox (one per name).
    pub addr: std::net::Ipv4Addr,
}

impl Network {
    /// The forwarded hosts (none for [`Network::None`]).
    pub fn forwards(&self) -> &[Forward] {
        match self {
            Network::None => &[],
            Network::Brokered { forward } => forward,
        }
    }

    /// The sandbox's `/etc/hosts` for a brokered network: the loopback names, then each
    /// forwarded name at its address.
    pub fn hosts_file(forward: &[Forward]) -> String {
        let mut s = String::from(
            "# Written by carapace: this sandbox reaches only the names below, each through\n\
             # the broker's connect check (network mode \"brokered\").\n",
        );
        if !forward.iter().any(|f| f.host == "localhost") {
            s.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in forward {
            if seen.insert(&f.host) {
                s.push_str(&format!("{}\t{}\n", f.addr, f.host));
            }
        }
        s
    }
}

impl Plan {
    /// The confinement in plain words, derived only from this plan's fields.
    pub fn explain(&self) -> String {
        crate::explain::explain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(v: &[u32]) -> Vec<(String, u32)> {
        v.iter().map(|v| (v.to_string(), *v)).collect()
    }

    #[test]
    fn each_one_of_holds_when_every_listed_argument_is_allowed() {
        let c = ArgCondition::EachOneOf {
            args: vec![0, 1, 2],
            what: "uid".into(),
            values: named(&[u32::MAX, 1000]),
            means: "keeps the current ids".into(),
        };
        assert!(c.holds(&[0xffff_ffff, 1000, 1000, 0, 0, 0]));
        assert!(c.holds(&[u64::MAX, 0xdead_0000_03e8, 0xffff_ffff, 5, 5, 5]));
        assert!(!c.holds(&[0xffff_ffff, 0, 0xffff_ffff, 0, 0, 0]));
        assert!(!c.holds(&[1000, 1000, 1001, 1000, 1000, 1000]));
        assert!(!c.holds(&[1000 << 32, 1000, 1000, 0, 0, 0]));
    }

    #[test]
    fn masked_eq_compares_the_low_word_under_the_mask() {
        let c = ArgCondition::MaskedEq {
            arg: 1,
            what: "mode".into(),
            mask: vec![("S_IFMT".into(), 0o170000), ("S_ISUID".into(), 0o4000)],
            value: ("S_IFIFO".into(), 0o010000),
            means: "for FIFOs only".into(),
        };
        assert!(c.holds(&[0, 0o010644, 0, 0, 0, 0]));
        assert!(c.holds(&[0, 0o012644 | (1 << 40), 0, 0, 0, 0]));
        assert!(!c.holds(&[0, 0o014644, 0, 0, 0, 0]));
        assert!(!c.holds(&[0, 0o020644, 0, 0, 0, 0]));
        assert!(!c.holds(&[0o010644, 0o644, 0, 0, 0, 0]));
    }

    #[test]
    fn excludes_bits_only_when_the_condition_rules_them_out() {
        let setid = 0o6000u64;
        let fifo = ArgCondition::MaskedEq {
            arg: 2,
            what: "mode".into(),
            mask: vec![("S_IFMT|S_ISUID|S_ISGID".into(), 0o176000)],
            value: ("S_IFIFO".into(), 0o010000),
            means: "for FIFOs only".into(),
        };
        assert!(fifo.excludes_bits(2, setid));
        assert!(!fifo.excludes_bits(1, setid), "another argument");
        assert!(!fifo.excludes_bits(2, 0o1000), "a bit outside the mask");
        assert!(
            !fifo.excludes_bits(2, 1 << 40),
            "a high bit is not compared"
        );
        let fifo_only_type = ArgCondition::MaskedEq {
            arg: 2,
            what: "mode".into(),
            mask: vec![("S_IFMT".into(), 0o170000)],
            value: ("S_IFIFO".into(), 0o010000),
            means: "for FIFOs only".into(),
        };
        assert!(!fifo_only_type.excludes_bits(2, setid));
        let none = ArgCondition::NoneOf {
            arg: 1,
            what: "mode".into(),
            flags: vec![("S_ISUID".into(), 0o4000), ("S_ISGID".into(), 0o2000)],
        };
        assert!(none.excludes_bits(1, setid));
        assert!(!none.excludes_bits(1, setid | 0o1000));
        let one = ArgCondition::OneOf {
            arg: 0,
            what: "x".into(),
            values: named(&[0o644, 0o4644]),
        };
        assert!(!one.excludes_bits(0, setid));
        let each = ArgCondition::EachOneOf {
            args: vec![0, 1],
            what: "x".into(),
            values: named(&[0o644]),
            means: String::new(),
        };
        assert!(each.excludes_bits(1, setid));
        assert!(!each.excludes_bits(2, setid));
    }

    #[test]
    fn new_conditions_serialize_with_their_kind() {
        let c = ArgCondition::EachOneOf {
            args: vec![0],
            what: "uid".into(),
            values: named(&[1000]),
            means: "keeps the current ids".into(),
        };
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert!(json.contains(r#""kind":"each_one_of""#), "{json}");
        let m = ArgCondition::MaskedEq {
            arg: 1,
            what: "mode".into(),
            mask: vec![],
            value: ("S_IFIFO".into(), 0o010000),
            means: "for FIFOs only".into(),
        };
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert!(json.contains(r#""kind":"masked_eq""#), "{json}");
    }
}
