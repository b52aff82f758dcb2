//! Compiling a profile's seccomp section into a [`SeccompPlan`]: first the lists `explain`
//! prints (allowed, conditional, denied, the set-id guard, the default action), then the BPF
//! program emitted from exactly those lists by [`crate::bpf`] (a binary search tree over the
//! syscall numbers behind the arch/x32 guard).

use std::collections::BTreeMap;

use crate::bpf::{self, Leaf, Test, BPF_LD_W_ABS};
pub use crate::bpf::{EmitError, AUDIT_ARCH_X86_64, RET_KILL_PROCESS, X32_SYSCALL_BIT};
use crate::plan::{
    ArgCondition, BpfInsn, ConditionalSyscall, SandboxUser, SeccompAction, SeccompPlan, SetidGuard,
};
use crate::tables::{self, IdKind};
use crate::validate::SeccompSpec;

pub(crate) const RET_ERRNO: u32 = 0x0005_0000;
pub(crate) const RET_LOG: u32 = 0x7ffc_0000;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;

pub(crate) fn ret_value(a: SeccompAction) -> u32 {
    match a {
        SeccompAction::Errno(e) => RET_ERRNO | (e & 0xffff),
        SeccompAction::KillProcess => RET_KILL_PROCESS,
        SeccompAction::Log => RET_LOG,
        SeccompAction::Allow => RET_ALLOW,
    }
}

/// The set-id guard's mode checks: (syscall, index of its mode argument). See
/// [`SetidGuard`].
pub(crate) const SETID_MODE_ARGS: &[(&str, u8)] = &[
    ("chmod", 1),
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
    ("creat", 1),
    ("open", 2),
    ("openat", 3),
    ("mknod", 1),
    ("mknodat", 2),
];
/// Syscalls the set-id guard refuses with ENOSYS: their mode is in memory seccomp cannot read.
pub(crate) const SETID_REFUSED: &[&str] = &["openat2"];
const S_ISUID: u64 = 0o4000;
const S_ISGID: u64 = 0o2000;
const S_IFMT: u32 = 0o170000;
const S_IFIFO: u32 = 0o010000;
/// `uid_t`/`gid_t` -1: "leave this id unchanged" to every set*id call.
const ID_KEEP: u32 = u32::MAX;

/// The condition of a set*id call of [`tables::SETID_KEEP`]: each of its `nargs` id arguments is
/// -1 (keep) or the sandbox's own id. The sandbox runs with ruid = euid = suid = fsuid =
/// `user.uid` (and the same for the gids), so such a call changes nothing; any other value is a
/// real change and gets the profile's default action. Only the low 32 bits are compared:
/// `uid_t` and `gid_t` are 32-bit and the kernel ignores the high half of the register, so
/// `0xdead_beef_0000_0000 | 1000` IS 1000 to the kernel and must get the same verdict.
fn keep_ids(kind: IdKind, nargs: u8, user: SandboxUser) -> ArgCondition {
    let (what, own) = match kind {
        IdKind::Uid => ("uid", user.uid),
        IdKind::Gid => ("gid", user.gid),
    };
    ArgCondition::EachOneOf {
        args: (0..nargs).collect(),
        what: what.into(),
        values: vec![("-1".into(), ID_KEEP), (own.to_string(), own)],
        means: "keeps the current ids".into(),
    }
}

/// The condition of `mknod`/`mknodat`: the file type is a FIFO and no set-id bit is set. The
/// mode is a 32-bit `mode_t` (the kernel ignores the high half, hence the low-word compare);
/// device nodes, sockets and regular files (type 0 or S_IFREG) fail it.
fn fifo_only(mode_arg: u8) -> ArgCondition {
    ArgCondition::MaskedEq {
        arg: mode_arg,
        what: "mode".into(),
        mask: vec![
            ("S_IFMT".into(), S_IFMT),
            ("S_ISUID".into(), S_ISUID as u32),
            ("S_ISGID".into(), S_ISGID as u32),
        ],
        value: ("S_IFIFO".into(), S_IFIFO),
        means: "for FIFOs only".into(),
    }
}

/// Why a seccomp filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompCompileError {
    #[error("unknown syscall `{0}`")]
    UnknownSyscall(String),
    #[error("{0}")]
    Emit(#[from] bpf::EmitError),
    #[error("internal: the set-id guard cannot be combined with the argument conditions of `{0}`")]
    GuardOnConditional(String),
}

/// The verdict of one listed syscall while the plan is being built.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Ret(SeccompAction),
    Cond(ConditionalSyscall),
}

/// Build the seccomp part of a plan. `user` is the sandbox's identity inside its user
/// namespace (the ids the set*id conditions accept besides -1).
pub(crate) fn compile(
    spec: &SeccompSpec,
    user: SandboxUser,
) -> Result<SeccompPlan, SeccompCompileError> {
    let default = spec.default_action;
    // Whether an action lets the syscall run (allowed, or only logged).
    let lets_through = |a: SeccompAction| matches!(a, SeccompAction::Allow | SeccompAction::Log);
    let mut rules: BTreeMap<String, Verdict> = BTreeMap::new();
    let cond = |name: &str, when: ArgCondition| {
        Verdict::Cond(ConditionalSyscall {
            syscall: name.to_string(),
            when,
            then: SeccompAction::Allow,
            otherwise: default,
        })
    };
    for name in &spec.allow {
        let verdict = match name.as_str() {
            "socket" | "socketpair" => {
                if spec.socket_domains.is_empty() {
                    continue; // nothing allowed: the default action
                }
                cond(
                    name,
                    ArgCondition::OneOf {
                        arg: 0,
                        what: "socket domain".into(),
                        values: spec.socket_domains.clone(),
                    },
                )
            }
            "ioctl" => {
                if spec.ioctl_requests.is_empty() {
                    continue;
                }
                cond(
                    name,
                    ArgCondition::OneOf {
                        arg: 1,
                        what: "request".into(),
                        values: spec.ioctl_requests.clone(),
                    },
                )
            }
            "clone" if !spec.clone_deny.is_empty() => cond(
                name,
                ArgCondition::NoneOf {
                    arg: 0,
                    what: "flags".into(),
                    flags: spec.clone_deny.clone(),
                },
            ),
            "personality" => cond(
                name,
                ArgCondition::OneOf {
                    arg: 0,
                    what: "persona".into(),
                    values: tables::PERSONALITY_SAFE
                        .iter()
                        .map(|(n, v)| (n.to_string(), *v))
                        .collect(),
                },
            ),
            "mknod" | "mknodat" => {
                let Some(arg) = mode_arg(name) else {
                    return Err(SeccompCompileError::UnknownSyscall(name.clone()));
                };
                // Anything but a plain FIFO gets the default action, or EPERM where the default
                // would let it run: the set-id guard relies on this condition (see below).
                let otherwise = if lets_through(default) {
                    SeccompAction::Errno(libc::EPERM as u32)
                } else {
                    default
                };
                Verdict::Cond(ConditionalSyscall {
                    syscall: name.clone(),
                    when: fifo_only(arg),
                    then: SeccompAction::Allow,
                    otherwise,
                })
            }
            _ => match tables::SETID_KEEP.iter().find(|(n, _, _)| n == name) {
                Some((_, kind, nargs)) => cond(name, keep_ids(*kind, *nargs, user)),
                None => Verdict::Ret(SeccompAction::Allow),
            },
        };
        rules.insert(name.clone(), verdict);
    }
    // Deny entries win over the allowlist.
    for (name, action) in &spec.deny {
        rules.insert(name.clone(), Verdict::Ret(*action));
    }

    // The set-id guard, where the profile would let the syscall through (allowed or only
    // logged); a profile that already refuses it keeps its own, more restrictive, verdict. A
    // conditional verdict is accepted only when its condition already excludes the set-id bits
    // and its other branch refuses (mknod/mknodat, which only make FIFOs).
    let mut guard = SetidGuard::default();
    for (name, arg) in SETID_MODE_ARGS {
        let base = rules.get(*name).cloned().unwrap_or(Verdict::Ret(default));
        match base {
            Verdict::Ret(a) if lets_through(a) => {
                rules.insert(
                    name.to_string(),
                    Verdict::Cond(ConditionalSyscall {
                        syscall: name.to_string(),
                        when: ArgCondition::NoneOf {
                            arg: *arg,
                            what: "mode".into(),
                            flags: vec![("S_ISUID".into(), S_ISUID), ("S_ISGID".into(), S_ISGID)],
                        },
                        then: a,
                        otherwise: SeccompAction::Errno(libc::EPERM as u32),
                    }),
                );
                guard.mode_checked.push(name.to_string());
            }
            Verdict::Ret(_) => {}
            Verdict::Cond(c)
                if c.when.excludes_bits(*arg, S_ISUID | S_ISGID) && !lets_through(c.otherwise) =>
            {
                guard.mode_checked.push(name.to_string());
            }
            Verdict::Cond(_) => {
                return Err(SeccompCompileError::GuardOnConditional(name.to_string()))
            }
        }
    }
    for name in SETID_REFUSED {
        let base = rules.get(*name).cloned().unwrap_or(Verdict::Ret(default));
        match base {
            Verdict::Ret(a) if lets_through(a) => {
                rules.insert(
                    name.to_string(),
                    Verdict::Ret(SeccompAction::Errno(libc::ENOSYS as u32)),
                );
                guard.refused.push(name.to_string());
            }
            Verdict::Ret(_) => {}
            Verdict::Cond(_) => {
                return Err(SeccompCompileError::GuardOnConditional(name.to_string()))
            }
        }
    }

    // The lists (what explain prints), then the program from the lists.
    let mut allowed = Vec::new();
    let mut conditional = Vec::new();
    let mut denied: Vec<(String, SeccompAction)> = Vec::new();
    for (name, v) in &rules {
        match v {
            Verdict::Ret(SeccompAction::Allow) => allowed.push(name.clone()),
            Verdict::Ret(_) => {}
            Verdict::Cond(c) => conditional.push(c.clone()),
        }
    }
    // Denied: the policy's entries in their order, then the guard's.
    let names = spec.deny.iter().map(|(n, _)| n.as_str());
    for name in names.chain(SETID_REFUSED.iter().copied()) {
        if let Some(Verdict::Ret(a)) = rules.get(name) {
            if *a != SeccompAction::Allow && !denied.iter().any(|(n, _)| n == name) {
                denied.push((name.to_string(), *a));
            }
        }
    }
    let program = program(default, &allowed, &conditional, &denied)?;
    Ok(SeccompPlan {
        program,
        default_action: default,
        allowed,
        conditional,
        denied,
        setid_guard: guard,
    })
}

/// Index of the mode argument of a syscall the set-id guard checks.
fn mode_arg(name: &str) -> Option<u8> {
    SETID_MODE_ARGS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| *a)
}

/// A fixed filter, independent of any policy: the architecture guard (a foreign architecture
/// or an x32 syscall kills the process), then `allowed_syscalls` (x86_64 names, see
/// [`crate::tables::syscall_nr`]) allowed and every other syscall given `default`. For
/// programs of carapace's own whose syscalls are known, such as the sandbox's init.
pub fn fixed_filter(
    allowed_syscalls: &[&str],
    default: SeccompAction,
) -> Result<Vec<BpfInsn>, SeccompCompileError> {
    let allowed: Vec<String> = allowed_syscalls.iter().map(|s| s.to_string()).collect();
    program(default, &allowed, &[], &[])
}

/// Emit the BPF program for these lists (the plan's own fields).
fn program(
    default: SeccompAction,
    allowed: &[String],
    conditional: &[ConditionalSyscall],
    denied: &[(String, SeccompAction)],
) -> Result<Vec<BpfInsn>, SeccompCompileError> {
    let nr = |name: &str| -> Result<u32, SeccompCompileError> {
        tables::syscall_nr(name)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| SeccompCompileError::UnknownSyscall(name.to_string()))
    };
    let mut leaves = Vec::new();
    for name in allowed {
        leaves.push((nr(name)?, Leaf::Ret(ret_value(SeccompAction::Allow))));
    }
    for c in conditional {
        leaves.push((
            nr(&c.syscall)?,
            Leaf::Cond {
                test: Test::from_condition(&c.when),
                then: ret_value(c.then),
                otherwise: ret_value(c.otherwise),
            },
        ));
    }
    for (name, a) in denied {
        leaves.push((nr(name)?, Leaf::Ret(ret_value(*a))));
    }
    Ok(bpf::emit(ret_value(default), &leaves)?)
}

/// A classic-BPF interpreter for seccomp programs, for tests (and the fuzz target): runs
/// `program` on a `seccomp_data` and returns the filter's return value, or None when the program
/// is malformed (jump out of range, unsupported instruction, falls off the end).
pub fn run_bpf(program: &[BpfInsn], nr: i32, arch: u32, args: [u64; 6]) -> Option<u32> {
    run_bpf_counted(program, nr, arch, args).map(|(verdict, _)| verdict)
}

/// [`run_bpf`], also returning how many instructions ran (the path length of this input).
pub fn run_bpf_counted(
    program: &[BpfInsn],
    nr: i32,
    arch: u32,
    args: [u64; 6],
) -> Option<(u32, usize)> {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        let o = 16 + 8 * i;
        data[o..o + 8].copy_from_slice(&a.to_le_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc: usize = 0;
    let mut steps = 0usize;
    while let Some(insn) = program.get(pc) {
        steps += 1;
        if steps > 100_000 {
            return None;
        }
        let class = insn.code & 0x07;
        match class {
            0x00 => {
                // LD: only W|ABS is valid in seccomp
                if insn.code != BPF_LD_W_ABS {
                    return None;
                }
                let o = usize::try_from(insn.k).ok()?;
                let b = data.get(o..o.checked_add(4)?)?;
                acc = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                pc += 1;
            }
            0x04 => {
                // ALU, K operand
                let op = insn.code & 0xf0;
                acc = match op {
                    0x50 => acc & insn.k,
                    0x40 => acc | insn.k,
                    _ => return None,
                };
                pc += 1;
            }
            0x05 => {
                let op = insn.code & 0xf0;
                if op == 0x00 {
                    pc = pc
                        .checked_add(1)?
                        .checked_add(usize::try_from(insn.k).ok()?)?;
                    continue;
                }
                let taken = match op {
                    0x10 => acc == insn.k,
                    0x20 => acc > insn.k,
                    0x30 => acc >= insn.k,
                    0x40 => acc & insn.k != 0,
                    _ => return None,
                };
                pc += 1 + usize::from(if taken { insn.jt } else { insn.jf });
            }
            0x06 => return Some((insn.k, steps)),
            _ => return None,
        }
    }
    None
}
