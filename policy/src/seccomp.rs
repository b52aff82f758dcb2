//! Compiling a profile's seccomp section into a BPF program.
//!
//! Layout of the program:
//! 1. our guard: load `arch`; anything but AUDIT_ARCH_X86_64 -> KILL_PROCESS (this also kills
//!    i386 `int 0x80` syscalls); load `nr`; nr >= 0x40000000 (the x32 ABI) -> KILL_PROCESS;
//! 2. the explicit deny entries, each returning its own action (e.g. clone3 -> ENOSYS);
//! 3. seccompiler's allowlist filter (its own arch check again, then one chain per syscall with
//!    argument conditions; match -> ALLOW, else the default action).
//!
//! Every jump in classic BPF is relative and forward, and each part ends in RET or falls through
//! to the next part's first instruction, so concatenation is sound (tested with an interpreter).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction as ScAction, SeccompCmpArgLen as ArgLen, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

use crate::plan::{BpfInsn, SeccompAction, SeccompPlan};
use crate::tables;
use crate::validate::SeccompSpec;

pub(crate) const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
pub(crate) const X32_SYSCALL_BIT: u32 = 0x4000_0000;
pub(crate) const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub(crate) const RET_ERRNO: u32 = 0x0005_0000;
pub(crate) const RET_LOG: u32 = 0x7ffc_0000;
pub(crate) const RET_ALLOW: u32 = 0x7fff_0000;

pub(crate) const BPF_LD_W_ABS: u16 = 0x20;
pub(crate) const BPF_JEQ_K: u16 = 0x15;
pub(crate) const BPF_JGE_K: u16 = 0x35;
pub(crate) const BPF_RET_K: u16 = 0x06;
/// Maximum instructions the kernel accepts in one filter.
pub(crate) const BPF_MAXINSNS: usize = 4096;

pub(crate) fn ret_value(a: SeccompAction) -> u32 {
    match a {
        SeccompAction::Errno(e) => RET_ERRNO | (e & 0xffff),
        SeccompAction::KillProcess => RET_KILL_PROCESS,
        SeccompAction::Log => RET_LOG,
        SeccompAction::Allow => RET_ALLOW,
    }
}

fn to_sc(a: SeccompAction) -> ScAction {
    match a {
        SeccompAction::Errno(e) => ScAction::Errno(e),
        SeccompAction::KillProcess => ScAction::KillProcess,
        SeccompAction::Log => ScAction::Log,
        SeccompAction::Allow => ScAction::Allow,
    }
}

fn stmt(code: u16, k: u32) -> BpfInsn {
    BpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}

/// Why a seccomp filter could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompCompileError {
    #[error("unknown syscall `{0}`")]
    UnknownSyscall(String),
    #[error("seccompiler: {0}")]
    Backend(#[from] seccompiler::BackendError),
    #[error("the filter has {0} instructions, more than the kernel's {BPF_MAXINSNS}")]
    TooLarge(usize),
}

/// Build the seccomp part of a plan.
pub(crate) fn compile(spec: &SeccompSpec) -> Result<SeccompPlan, SeccompCompileError> {
    let denied: Vec<&str> = spec.deny.iter().map(|(n, _)| n.as_str()).collect();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allowed = Vec::new();
    let mut conditional = Vec::new();
    let cond = |idx: u8, len: ArgLen, op: Op, v: u64| -> Result<SeccompRule, SeccompCompileError> {
        let c = Cond::new(idx, len, op, v)?;
        Ok(SeccompRule::new(vec![c])?)
    };
    for name in &spec.allow {
        if denied.contains(&name.as_str()) {
            continue; // deny entries win over the allowlist
        }
        let Some(nr) = tables::syscall_nr(name) else {
            return Err(SeccompCompileError::UnknownSyscall(name.clone()));
        };
        match name.as_str() {
            "socket" | "socketpair" => {
                if spec.socket_domains.is_empty() {
                    continue;
                }
                let mut v = Vec::new();
                for (_, d) in &spec.socket_domains {
                    v.push(cond(0, ArgLen::Dword, Op::Eq, u64::from(*d))?);
                }
                rules.insert(nr, v);
                conditional.push((
                    name.clone(),
                    format!("only for socket domain {}", join(&spec.socket_domains)),
                ));
            }
            "ioctl" => {
                if spec.ioctl_requests.is_empty() {
                    continue;
                }
                let mut v = Vec::new();
                for (_, r) in &spec.ioctl_requests {
                    v.push(cond(1, ArgLen::Dword, Op::Eq, u64::from(*r))?);
                }
                rules.insert(nr, v);
                conditional.push((
                    name.clone(),
                    format!(
                        "only for request {} (low 32 bits compared)",
                        join(&spec.ioctl_requests)
                    ),
                ));
            }
            "clone" => {
                let mask: u64 = spec.clone_deny.iter().fold(0, |m, (_, f)| m | f);
                if mask == 0 {
                    rules.insert(nr, vec![]);
                    allowed.push(name.clone());
                } else {
                    rules.insert(nr, vec![cond(0, ArgLen::Qword, Op::MaskedEq(mask), 0)?]);
                    let names: Vec<&str> =
                        spec.clone_deny.iter().map(|(n, _)| n.as_str()).collect();
                    conditional.push((
                        name.clone(),
                        format!("only without the flags {}", names.join(", ")),
                    ));
                }
            }
            "personality" => {
                let mut v = Vec::new();
                for (_, p) in tables::PERSONALITY_SAFE {
                    v.push(cond(0, ArgLen::Dword, Op::Eq, u64::from(*p))?);
                }
                rules.insert(nr, v);
                conditional.push((
                    name.clone(),
                    "only to query the personality or set PER_LINUX".to_string(),
                ));
            }
            _ => {
                rules.insert(nr, vec![]);
                allowed.push(name.clone());
            }
        }
    }
    allowed.sort();
    let filter = SeccompFilter::new(
        rules,
        to_sc(spec.default_action),
        ScAction::Allow,
        TargetArch::x86_64,
    )?;
    let body: BpfProgram = filter.try_into()?;

    let mut program = vec![
        stmt(BPF_LD_W_ABS, 4),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, 0),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
    ];
    let mut denied_out = Vec::new();
    for (name, action) in &spec.deny {
        let Some(nr) = tables::syscall_nr(name) else {
            return Err(SeccompCompileError::UnknownSyscall(name.clone()));
        };
        let nr =
            u32::try_from(nr).map_err(|_| SeccompCompileError::UnknownSyscall(name.clone()))?;
        program.push(jump(BPF_JEQ_K, nr, 0, 1));
        program.push(stmt(BPF_RET_K, ret_value(*action)));
        denied_out.push((name.clone(), *action));
    }
    program.extend(body.into_iter().map(|i| BpfInsn {
        code: i.code,
        jt: i.jt,
        jf: i.jf,
        k: i.k,
    }));
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompCompileError::TooLarge(program.len()));
    }
    Ok(SeccompPlan {
        program,
        default_action: spec.default_action,
        allowed,
        conditional,
        denied: denied_out,
    })
}

fn join<T>(v: &[(String, T)]) -> String {
    v.iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A classic-BPF interpreter for seccomp programs, for tests (and the fuzz target): runs
/// `program` on a `seccomp_data` and returns the filter's return value, or None when the program
/// is malformed (jump out of range, unsupported instruction, falls off the end).
pub fn run_bpf(program: &[BpfInsn], nr: i32, arch: u32, args: [u64; 6]) -> Option<u32> {
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
            0x06 => return Some(insn.k),
            _ => return None,
        }
    }
    None
}
