//! Emitting a seccomp plan as a classic-BPF program shaped as a binary search tree.
//!
//! Layout:
//! 1. the guard: load `arch`; anything but AUDIT_ARCH_X86_64 -> KILL_PROCESS (this also kills
//!    i386 `int 0x80` syscalls); load `nr`; nr >= 0x40000000 (the x32 ABI) -> KILL_PROCESS;
//! 2. a balanced binary search over the syscall numbers: the number line 0..0x40000000 is cut
//!    into intervals of equal verdict (runs of allowed syscalls, gaps with the default action, a
//!    denied syscall, a syscall with argument conditions), and `JGE start` nodes split the list of
//!    intervals in halves down to one interval per leaf;
//! 3. leaves: `RET verdict`, or an argument block (load the argument's low or high word, compare,
//!    `RET` one of two verdicts).
//!
//! A syscall costs the guard (4 instructions), about log2(intervals) comparisons and its leaf:
//! for the default profile ~12 instructions instead of up to ~1300 for the linear chain the
//! crate used to get from seccompiler.
//!
//! Why not seccompiler (0.5), which this crate used before: it emits one linear chain of
//! compares per syscall, so the cost of a syscall grows with its position in a ~1300-instruction
//! program and the kernel converts and JITs all of it at install time; it offers no control over
//! the shape of the program. A tree needs our own emitter, and with it seccompiler had nothing
//! left to do (our guard and deny entries were already hand-emitted).
//!
//! Jumps: conditional jumps have 8-bit forward offsets. The emitter uses symbolic labels and an
//! assembler pass that replaces every out-of-range branch by a branch to a `JA` trampoline
//! placed right after it (`JA` has a 32-bit offset), repeating until every offset fits.
//! Every jump is forward, so the program always terminates; [`crate::run_bpf`] checks the
//! result in tests, and [`max_path_len`] measures the worst case.

use crate::plan::{mask_of, ArgCondition, BpfInsn};

/// `AUDIT_ARCH_X86_64`: the `arch` of `seccomp_data` for a native x86_64 syscall.
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// x32 syscalls on x86_64 carry this bit in their number.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `SECCOMP_RET_KILL_PROCESS`.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;

pub(crate) const BPF_LD_W_ABS: u16 = 0x20;
pub(crate) const BPF_JA: u16 = 0x05;
pub(crate) const BPF_JEQ_K: u16 = 0x15;
pub(crate) const BPF_JGE_K: u16 = 0x35;
pub(crate) const BPF_JSET_K: u16 = 0x45;
pub(crate) const BPF_RET_K: u16 = 0x06;
pub(crate) const BPF_ALU_AND_K: u16 = 0x54;
/// Maximum instructions the kernel accepts in one filter.
pub(crate) const BPF_MAXINSNS: usize = 4096;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low word of argument `i` on a little-endian machine; the high word is 4 bytes further.
const fn off_arg_low(i: u8) -> u32 {
    16 + 8 * i as u32
}

/// What the filter does for one interval of syscall numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Leaf {
    /// Return this value.
    Ret(u32),
    /// Test one argument: `then` when the test holds, else `otherwise`.
    Cond {
        test: Test,
        then: u32,
        otherwise: u32,
    },
}

/// An argument test, in the form the emitter needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Test {
    /// Low 32 bits of argument `arg` are one of `values` (sorted, deduplicated).
    LowOneOf { arg: u8, values: Vec<u32> },
    /// `argument & mask == 0` on all 64 bits.
    NoneOf { arg: u8, mask: u64 },
    /// The low 32 bits of each argument in `args` are one of `values` (sorted, deduplicated).
    EachLowOneOf { args: Vec<u8>, values: Vec<u32> },
    /// `(low 32 bits of argument) & mask == value`.
    LowMaskedEq { arg: u8, mask: u32, value: u32 },
}

impl Test {
    pub(crate) fn from_condition(c: &ArgCondition) -> Test {
        match c {
            ArgCondition::OneOf { arg, values, .. } => Test::LowOneOf {
                arg: *arg,
                values: sorted_values(values),
            },
            ArgCondition::NoneOf { arg, flags, .. } => Test::NoneOf {
                arg: *arg,
                mask: flags.iter().fold(0, |m, (_, f)| m | f),
            },
            ArgCondition::EachOneOf { args, values, .. } => Test::EachLowOneOf {
                args: args.clone(),
                values: sorted_values(values),
            },
            ArgCondition::MaskedEq {
                arg, mask, value, ..
            } => Test::LowMaskedEq {
                arg: *arg,
                mask: mask_of(mask),
                value: value.1,
            },
        }
    }

    /// The argument indexes the test reads.
    fn args(&self) -> &[u8] {
        match self {
            Test::LowOneOf { arg, .. }
            | Test::NoneOf { arg, .. }
            | Test::LowMaskedEq { arg, .. } => std::slice::from_ref(arg),
            Test::EachLowOneOf { args, .. } => args,
        }
    }
}

fn sorted_values(values: &[(String, u32)]) -> Vec<u32> {
    let mut v: Vec<u32> = values.iter().map(|(_, v)| *v).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Why a program could not be emitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    #[error("syscall number {0} is listed twice")]
    Duplicate(u32),
    #[error("syscall number {0:#x} is not below the x32 bit")]
    OutOfRange(u32),
    #[error("argument index {0} is not 0..=5")]
    BadArg(u8),
    #[error("the filter has {0} instructions, more than the kernel's {BPF_MAXINSNS}")]
    TooLarge(usize),
}

/// Emit the whole program: the arch/x32 guard, then the tree over `leaves` (syscall number,
/// leaf); every number not listed gets `RET default`.
pub(crate) fn emit(default: u32, leaves: &[(u32, Leaf)]) -> Result<Vec<BpfInsn>, EmitError> {
    let intervals = intervals(default, leaves)?;
    let mut a = Asm::default();
    // The guard, exactly as before: ld arch; jeq x86_64 ? skip : kill; ld nr; jge x32 ? kill.
    let arch_ok = a.label();
    let kill = a.label();
    a.stmt(BPF_LD_W_ABS, OFF_ARCH);
    a.jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, arch_ok, kill);
    a.bind(kill);
    a.stmt(BPF_RET_K, RET_KILL_PROCESS);
    a.bind(arch_ok);
    a.stmt(BPF_LD_W_ABS, OFF_NR);
    let x32 = a.label();
    let native = a.label();
    a.jump(BPF_JGE_K, X32_SYSCALL_BIT, x32, native);
    a.bind(x32);
    a.stmt(BPF_RET_K, RET_KILL_PROCESS);
    a.bind(native);
    tree(&mut a, &intervals)?;
    let program = a.assemble();
    if program.len() > BPF_MAXINSNS {
        return Err(EmitError::TooLarge(program.len()));
    }
    Ok(program)
}

/// Cut 0..X32_SYSCALL_BIT into maximal intervals of equal leaf: (first number, leaf), sorted.
fn intervals(default: u32, leaves: &[(u32, Leaf)]) -> Result<Vec<(u32, Leaf)>, EmitError> {
    let mut sorted: Vec<&(u32, Leaf)> = leaves.iter().collect();
    sorted.sort_by_key(|(nr, _)| *nr);
    let mut out: Vec<(u32, Leaf)> = Vec::new();
    let push = |out: &mut Vec<(u32, Leaf)>, start: u32, leaf: Leaf| {
        if out.last().map(|(_, l)| l) != Some(&leaf) {
            out.push((start, leaf));
        }
    };
    let mut next = 0u32; // first number not yet covered
    for (nr, leaf) in sorted {
        if *nr >= X32_SYSCALL_BIT {
            return Err(EmitError::OutOfRange(*nr));
        }
        if *nr < next {
            return Err(EmitError::Duplicate(*nr));
        }
        if let Leaf::Cond { test, .. } = leaf {
            if let Some(arg) = test.args().iter().find(|a| **a > 5) {
                return Err(EmitError::BadArg(*arg));
            }
        }
        if *nr > next {
            push(&mut out, next, Leaf::Ret(default));
        }
        push(&mut out, *nr, leaf.clone());
        next = nr + 1;
    }
    push(&mut out, next, Leaf::Ret(default));
    Ok(out)
}

/// A balanced binary search over `iv` (non-empty, sorted by start; the accumulator holds nr).
fn tree(a: &mut Asm, iv: &[(u32, Leaf)]) -> Result<(), EmitError> {
    match iv {
        [] => Ok(()),
        [(_, leaf)] => {
            emit_leaf(a, leaf);
            Ok(())
        }
        _ => {
            let mid = iv.len() / 2;
            let (lo, hi) = iv.split_at(mid);
            let left = a.label();
            let right = a.label();
            a.jump(BPF_JGE_K, hi[0].0, right, left);
            a.bind(left);
            tree(a, lo)?;
            a.bind(right);
            tree(a, hi)
        }
    }
}

fn emit_leaf(a: &mut Asm, leaf: &Leaf) {
    match leaf {
        Leaf::Ret(k) => a.stmt(BPF_RET_K, *k),
        Leaf::Cond {
            test: Test::LowOneOf { arg, values },
            then,
            otherwise,
        } => {
            // ld arg.lo; jeq v1 ? yes; jeq v2 ? yes; ...; ret otherwise; yes: ret then
            let yes = a.label();
            a.stmt(BPF_LD_W_ABS, off_arg_low(*arg));
            for v in values {
                let next = a.label();
                a.jump(BPF_JEQ_K, *v, yes, next);
                a.bind(next);
            }
            a.stmt(BPF_RET_K, *otherwise);
            a.bind(yes);
            a.stmt(BPF_RET_K, *then);
        }
        Leaf::Cond {
            test: Test::NoneOf { arg, mask },
            then,
            otherwise,
        } => {
            // ld arg.lo; jset mask.lo ? no; ld arg.hi; jset mask.hi ? no; ret then; no: ret otherwise
            let no = a.label();
            for (word, bits) in [(0u32, *mask as u32), (4, (*mask >> 32) as u32)] {
                if bits != 0 {
                    let next = a.label();
                    a.stmt(BPF_LD_W_ABS, off_arg_low(*arg) + word);
                    a.jump(BPF_JSET_K, bits, no, next);
                    a.bind(next);
                }
            }
            a.stmt(BPF_RET_K, *then);
            a.bind(no);
            a.stmt(BPF_RET_K, *otherwise);
        }
        Leaf::Cond {
            test: Test::EachLowOneOf { args, values },
            then,
            otherwise,
        } => {
            // For each argument: ld arg.lo; jeq v1 ? ok; ...; jeq vn ? ok : no; ok: (next one).
            // After the last: ret then; no: ret otherwise.
            let no = a.label();
            for arg in args {
                let ok = a.label();
                a.stmt(BPF_LD_W_ABS, off_arg_low(*arg));
                for (i, v) in values.iter().enumerate() {
                    if i + 1 == values.len() {
                        a.jump(BPF_JEQ_K, *v, ok, no);
                    } else {
                        let next = a.label();
                        a.jump(BPF_JEQ_K, *v, ok, next);
                        a.bind(next);
                    }
                }
                if values.is_empty() {
                    // No value can match: the condition is false (a forward jump to `no`).
                    a.jump(BPF_JEQ_K, 0, no, no);
                }
                a.bind(ok);
            }
            a.stmt(BPF_RET_K, *then);
            a.bind(no);
            a.stmt(BPF_RET_K, *otherwise);
        }
        Leaf::Cond {
            test: Test::LowMaskedEq { arg, mask, value },
            then,
            otherwise,
        } => {
            // ld arg.lo; and mask; jeq value ? yes : no; yes: ret then; no: ret otherwise
            let (yes, no) = (a.label(), a.label());
            a.stmt(BPF_LD_W_ABS, off_arg_low(*arg));
            a.stmt(BPF_ALU_AND_K, *mask);
            a.jump(BPF_JEQ_K, *value, yes, no);
            a.bind(yes);
            a.stmt(BPF_RET_K, *then);
            a.bind(no);
            a.stmt(BPF_RET_K, *otherwise);
        }
    }
}

/// Whether the kernel's seccomp action cache (Linux 5.11+) lets native x86_64 syscall `nr`
/// through without running `program` at all. At install, the kernel runs every filter once per
/// syscall number with only `nr` and `arch` known; a syscall is cached when that run reaches
/// `RET ALLOW` without loading anything else (an argument, the instruction pointer) and without
/// an instruction the emulation does not know. This is the same emulation, instruction for
/// instruction, as the kernel's `seccomp_is_const_allow` (kernel/seccomp.c, Linux 5.11 to 6.18:
/// `LD W ABS` of `nr` or `arch` only; `JA`; `JEQ`/`JGE`/`JGT`/`JSET` with K; `ALU AND K`; `RET
/// K` answers, cached only for exactly `SECCOMP_RET_ALLOW`; anything else, or running off the
/// end, is not cached). Left out: the kernel's own exception (`seccomp_uprobe_exception`, 6.13+)
/// that always lets the `uretprobe`/`uprobe` trampolines through whatever the filter says. It
/// exists so that a test can prove the filter's shape keeps the cache working for every syscall
/// the profile allows whatever its arguments. What remains for a cached syscall is the seccomp
/// entry path itself, a floor no filter shape can lower.
///
/// A task with several filters (stacked by `seccomp()` calls or inherited) is answered from the
/// cache only when every one of them is const-allow: see [`kernel_caches_allow_stack`].
pub fn kernel_caches_allow(program: &[BpfInsn], nr: u32) -> bool {
    const BPF_JGT_K: u16 = 0x25;
    let mut acc: u32 = 0;
    let mut pc: usize = 0;
    while let Some(insn) = program.get(pc) {
        let k = insn.k;
        match insn.code {
            BPF_LD_W_ABS => {
                acc = match k {
                    OFF_NR => nr,
                    OFF_ARCH => AUDIT_ARCH_X86_64,
                    // A value the emulation does not know: not cacheable.
                    _ => return false,
                }
            }
            BPF_RET_K => return k == crate::seccomp::RET_ALLOW,
            BPF_JA => pc += k as usize,
            BPF_JEQ_K | BPF_JGE_K | BPF_JGT_K | BPF_JSET_K => {
                let taken = match insn.code {
                    BPF_JEQ_K => acc == k,
                    BPF_JGE_K => acc >= k,
                    BPF_JGT_K => acc > k,
                    _ => acc & k != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            BPF_ALU_AND_K => acc &= k,
            _ => return false,
        }
        pc += 1;
    }
    // Ran off the end: the kernel refuses such a filter; never cached.
    false
}

/// Whether the kernel's action cache answers native syscall `nr` for a task whose attached
/// filters are `stack` (in any order). The kernel keeps one bitmap per filter, computed when the
/// filter is attached from the bitmap of the filter before it (`seccomp_cache_prepare_bitmap`,
/// kernel/seccomp.c): a number stays set only while every filter so far is const-allow for it,
/// and only the newest filter's bitmap is consulted (`seccomp_cache_check_allow`). So one
/// filter anywhere in the stack that loads an argument (or answers anything but ALLOW) before
/// deciding `nr` makes every call of `nr` run every filter. An empty stack is no seccomp at all.
pub fn kernel_caches_allow_stack(stack: &[&[BpfInsn]], nr: u32) -> bool {
    stack.iter().all(|p| kernel_caches_allow(p, nr))
}

/// Longest path through `program` from its first instruction to a `RET`, in executed
/// instructions (every jump is forward, so this is a longest path in a DAG). None when the
/// program is malformed (a jump out of range or a path that falls off the end).
pub fn max_path_len(program: &[BpfInsn]) -> Option<usize> {
    let n = program.len();
    // len[i]: longest path starting at i.
    let mut len = vec![0usize; n + 1];
    for i in (0..n).rev() {
        let insn = program[i];
        let at = |off: usize| -> Option<usize> {
            let t = i.checked_add(1)?.checked_add(off)?;
            (t < n).then(|| len[t])
        };
        len[i] = 1 + match insn.code & 0x07 {
            0x06 => 0,
            0x05 if insn.code & 0xf0 == 0 => at(usize::try_from(insn.k).ok()?)?,
            0x05 => at(usize::from(insn.jt))?.max(at(usize::from(insn.jf))?),
            _ => at(0)?,
        };
    }
    (n > 0).then(|| len[0])
}

// ---- a tiny assembler with labels and far-jump relaxation ----------------------------------

#[derive(Debug, Clone, Copy)]
enum Item {
    Stmt {
        code: u16,
        k: u32,
    },
    Jump {
        code: u16,
        k: u32,
        jt: usize,
        jf: usize,
    },
    Ja {
        to: usize,
    },
}

#[derive(Debug, Default)]
struct Asm {
    items: Vec<Item>,
    /// label -> index of the item it is bound before (usize::MAX: unbound).
    labels: Vec<usize>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(usize::MAX);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: usize) {
        self.labels[l] = self.items.len();
    }
    fn stmt(&mut self, code: u16, k: u32) {
        self.items.push(Item::Stmt { code, k });
    }
    fn jump(&mut self, code: u16, k: u32, jt: usize, jf: usize) {
        self.items.push(Item::Jump { code, k, jt, jf });
    }

    /// Resolve labels. Every label is bound after its jumps (all jumps are forward by
    /// construction). Conditional branches more than 255 instructions ahead go through a `JA`
    /// trampoline placed right after the branch.
    fn assemble(mut self) -> Vec<BpfInsn> {
        // 1. Relax far branches until every offset fits in 8 bits.
        loop {
            let far: Vec<usize> = (0..self.items.len())
                .filter(|&i| match self.items[i] {
                    Item::Jump { jt, jf, .. } => self.dist(i, jt) > 255 || self.dist(i, jf) > 255,
                    _ => false,
                })
                .collect();
            if far.is_empty() {
                break;
            }
            for &i in far.iter().rev() {
                let Item::Jump { code, k, jt, jf } = self.items[i] else {
                    continue;
                };
                let (far_t, far_f) = (self.dist(i, jt) > 255, self.dist(i, jf) > 255);
                let mut tramp = Vec::new();
                let mut new_jt = jt;
                let mut new_jf = jf;
                if far_t {
                    tramp.push(Item::Ja { to: jt });
                }
                if far_f {
                    tramp.push(Item::Ja { to: jf });
                }
                self.insert(i + 1, &tramp);
                let mut slot = i + 1;
                if far_t {
                    new_jt = self.label_at(slot);
                    slot += 1;
                }
                if far_f {
                    new_jf = self.label_at(slot);
                }
                self.items[i] = Item::Jump {
                    code,
                    k,
                    jt: new_jt,
                    jf: new_jf,
                };
            }
        }
        // 2. Encode.
        (0..self.items.len())
            .map(|i| match self.items[i] {
                Item::Stmt { code, k } => BpfInsn {
                    code,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Item::Jump { code, k, jt, jf } => BpfInsn {
                    code,
                    jt: u8::try_from(self.dist(i, jt)).unwrap_or(u8::MAX),
                    jf: u8::try_from(self.dist(i, jf)).unwrap_or(u8::MAX),
                    k,
                },
                Item::Ja { to } => BpfInsn {
                    code: BPF_JA,
                    jt: 0,
                    jf: 0,
                    k: u32::try_from(self.dist(i, to)).unwrap_or(u32::MAX),
                },
            })
            .collect()
    }

    /// Offset of a jump at `from` to `label` (instructions skipped).
    fn dist(&self, from: usize, label: usize) -> usize {
        self.labels[label].saturating_sub(from + 1)
    }

    /// A new label bound before item `at`.
    fn label_at(&mut self, at: usize) -> usize {
        self.labels.push(at);
        self.labels.len() - 1
    }

    /// Insert items before index `at`; labels bound at or after `at` move with their items.
    fn insert(&mut self, at: usize, new: &[Item]) {
        for l in &mut self.labels {
            if *l >= at && *l != usize::MAX {
                *l += new.len();
            }
        }
        self.items.splice(at..at, new.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::run_bpf;

    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0001;

    fn run(p: &[BpfInsn], nr: u32, args: [u64; 6]) -> u32 {
        run_bpf(p, nr as i32, AUDIT_ARCH_X86_64, args).unwrap_or_else(|| panic!("malformed"))
    }

    #[test]
    fn the_cache_emulation_knows_constant_paths_from_argument_ones() {
        let i = |code: u16, jt: u8, jf: u8, k: u32| BpfInsn { code, jt, jf, k };
        // Allow everything: cached whatever the number.
        assert!(kernel_caches_allow(&[i(BPF_RET_K, 0, 0, ALLOW)], 0));
        assert!(kernel_caches_allow(&[i(BPF_RET_K, 0, 0, ALLOW)], 400));
        // An argument loaded before the verdict: the emulation cannot know it.
        let arg_first = [
            i(BPF_LD_W_ABS, 0, 0, off_arg_low(0)),
            i(BPF_RET_K, 0, 0, ALLOW),
        ];
        assert!(!kernel_caches_allow(&arg_first, 0));
        // Number 39 allowed, the rest EPERM; the arch check passes for native x86_64.
        let one = [
            i(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
            i(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            i(BPF_RET_K, 0, 0, RET_KILL_PROCESS),
            i(BPF_LD_W_ABS, 0, 0, OFF_NR),
            i(BPF_JEQ_K, 0, 1, 39),
            i(BPF_RET_K, 0, 0, ALLOW),
            i(BPF_RET_K, 0, 0, EPERM),
        ];
        assert!(kernel_caches_allow(&one, 39));
        assert!(!kernel_caches_allow(&one, 40));
        // A path that falls off the end is never cached.
        assert!(!kernel_caches_allow(&[i(BPF_LD_W_ABS, 0, 0, OFF_NR)], 0));
    }

    #[test]
    fn a_stack_is_cached_only_where_every_filter_is() {
        let i = |code: u16, jt: u8, jf: u8, k: u32| BpfInsn { code, jt, jf, k };
        // 0 (read) and 1 (write) allowed by the tree, the rest EPERM.
        let plan = emit(
            EPERM,
            &[
                (0, Leaf::Ret(ALLOW)),
                (1, Leaf::Ret(ALLOW)),
                (2, Leaf::Ret(ALLOW)),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // A second filter of the old shape: a guard that loads an argument for every syscall
        // before it lets it through (here: arg0 & 0o6000 on every number).
        let arg_guard = [
            i(BPF_LD_W_ABS, 0, 0, off_arg_low(0)),
            i(BPF_JSET_K, 0, 1, 0o6000),
            i(BPF_RET_K, 0, 0, EPERM),
            i(BPF_RET_K, 0, 0, ALLOW),
        ];
        // A second filter that decides on the number first: cacheable.
        let nr_guard = [
            i(BPF_LD_W_ABS, 0, 0, OFF_NR),
            i(BPF_JEQ_K, 0, 1, 2),
            i(BPF_RET_K, 0, 0, EPERM),
            i(BPF_RET_K, 0, 0, ALLOW),
        ];
        for nr in [0, 1] {
            assert!(kernel_caches_allow_stack(&[&plan], nr));
            assert!(kernel_caches_allow_stack(&[&plan, &nr_guard], nr));
            assert!(!kernel_caches_allow_stack(&[&plan, &arg_guard], nr));
            assert!(!kernel_caches_allow_stack(&[&arg_guard, &plan], nr));
        }
        assert!(!kernel_caches_allow_stack(&[&plan, &nr_guard], 2));
        assert!(!kernel_caches_allow_stack(&[&plan], 3));
        assert!(
            kernel_caches_allow_stack(&[], 3),
            "no filter: nothing to run"
        );
    }

    #[test]
    fn far_jumps_get_trampolines_and_still_reach_their_leaves() {
        // Many one-number intervals with long condition blocks: subtrees far bigger than 255
        // instructions, so the upper tree nodes and the condition blocks need trampolines.
        let values: Vec<u32> = (0..260).map(|v| v * 7).collect();
        let mut leaves = Vec::new();
        for nr in (0..400u32).step_by(2) {
            let leaf = if nr % 100 == 0 {
                Leaf::Cond {
                    test: Test::LowOneOf {
                        arg: (nr % 6) as u8,
                        values: values.iter().map(|v| v + nr).collect(),
                    },
                    then: ALLOW,
                    otherwise: 0x0005_0000 | nr,
                }
            } else {
                Leaf::Ret(0x0005_0000 | nr)
            };
            leaves.push((nr, leaf));
        }
        let p = emit(EPERM, &leaves).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.len() > 255 * 4,
            "the test must actually produce far jumps"
        );
        assert!(
            p.iter().any(|i| i.code == BPF_JA && i.k > 255),
            "long JA expected"
        );
        assert!(p.len() <= BPF_MAXINSNS);
        for nr in 0..410u32 {
            let arg = (nr % 6) as usize;
            let mut ok = [0u64; 6];
            ok[arg] = u64::from(values[259] + nr) | 0xffff_ffff_0000_0000;
            let mut bad = [0u64; 6];
            bad[arg] = u64::from(values[5] + nr + 1);
            let expect_ok = match nr {
                n if n % 2 == 1 || n >= 400 => EPERM,
                n if n % 100 == 0 => ALLOW,
                n => 0x0005_0000 | n,
            };
            let expect_bad = match nr {
                n if n % 2 == 1 || n >= 400 => EPERM,
                n => 0x0005_0000 | n,
            };
            assert_eq!(run(&p, nr, ok), expect_ok, "nr {nr} allowed value");
            assert_eq!(run(&p, nr, bad), expect_bad, "nr {nr} other value");
        }
        let worst = max_path_len(&p).unwrap_or(usize::MAX);
        // guard 4 + depth + trampolines + the longest condition block (1 + 260 + 1)
        assert!(worst < 4 + 20 + 260 + 20, "worst path {worst}");
    }

    #[test]
    fn intervals_merge_runs_and_fill_gaps() {
        let iv = intervals(
            EPERM,
            &[
                (3, Leaf::Ret(ALLOW)),
                (1, Leaf::Ret(ALLOW)),
                (2, Leaf::Ret(ALLOW)),
                (5, Leaf::Ret(EPERM)),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            iv,
            vec![
                (0, Leaf::Ret(EPERM)),
                (1, Leaf::Ret(ALLOW)),
                (4, Leaf::Ret(EPERM))
            ]
        );
        assert_eq!(
            intervals(EPERM, &[(1, Leaf::Ret(ALLOW)), (1, Leaf::Ret(EPERM))]),
            Err(EmitError::Duplicate(1))
        );
        assert_eq!(
            intervals(EPERM, &[(X32_SYSCALL_BIT, Leaf::Ret(ALLOW))]),
            Err(EmitError::OutOfRange(X32_SYSCALL_BIT))
        );
    }

    #[test]
    fn none_of_checks_both_words_when_the_mask_has_high_bits() {
        let leaf = Leaf::Cond {
            test: Test::NoneOf {
                arg: 2,
                mask: 0x1_0000_0004,
            },
            then: ALLOW,
            otherwise: EPERM,
        };
        let p = emit(0x8000_0000, &[(7, leaf)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(&p, 7, [0, 0, 0x3, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, 7, [0, 0, 0x2_0000_0003, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, 7, [0, 0, 0x4, 0, 0, 0]), EPERM);
        assert_eq!(run(&p, 7, [0, 0, 0x1_0000_0000, 0, 0, 0]), EPERM);
        assert_eq!(run(&p, 7, [u64::MAX, u64::MAX, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, 6, [0; 6]), 0x8000_0000);
        assert!(!p.iter().any(|i| i.code == BPF_JA), "no jump is far here");
    }

    #[test]
    fn each_low_one_of_checks_every_argument_even_through_trampolines() {
        // 200 values x 3 arguments: the block is longer than 255 instructions, so its jumps to
        // `no` need trampolines.
        let values: Vec<u32> = (0..200).map(|v| v * 3 + 1).collect();
        let leaf = Leaf::Cond {
            test: Test::EachLowOneOf {
                args: vec![0, 2, 5],
                values: values.clone(),
            },
            then: ALLOW,
            otherwise: EPERM,
        };
        let p = emit(0x8000_0000, &[(9, leaf)]).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.iter().any(|i| i.code == BPF_JA), "far jumps expected");
        let (first, last) = (u64::from(values[0]), u64::from(values[199]));
        let garbage = 0xdead_0000_0000_0000u64;
        assert_eq!(run(&p, 9, [first, 0, last, 0, 0, first]), ALLOW);
        assert_eq!(
            run(&p, 9, [last | garbage, 7, first | garbage, 7, 7, last]),
            ALLOW
        );
        for bad_at in [0, 2, 5] {
            for bad in [0u64, 2, u64::from(values[199] + 1), first << 32] {
                let mut a = [first, 0, first, 0, 0, first];
                a[bad_at] = bad;
                assert_eq!(run(&p, 9, a), EPERM, "{a:x?}");
            }
        }
        assert_eq!(run(&p, 8, [first; 6]), 0x8000_0000);
        // Edge cases: no values never holds, no arguments always does.
        for (args, values, want) in [(vec![1], vec![], EPERM), (vec![], vec![1], ALLOW)] {
            let leaf = Leaf::Cond {
                test: Test::EachLowOneOf { args, values },
                then: ALLOW,
                otherwise: EPERM,
            };
            let p = emit(0x8000_0000, &[(9, leaf)]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(run(&p, 9, [1; 6]), want);
        }
        let bad_arg = Leaf::Cond {
            test: Test::EachLowOneOf {
                args: vec![0, 6],
                values: vec![1],
            },
            then: ALLOW,
            otherwise: EPERM,
        };
        assert_eq!(emit(0, &[(1, bad_arg)]), Err(EmitError::BadArg(6)));
    }

    #[test]
    fn low_masked_eq_masks_the_low_word() {
        let leaf = Leaf::Cond {
            test: Test::LowMaskedEq {
                arg: 1,
                mask: 0o176000,
                value: 0o010000,
            },
            then: ALLOW,
            otherwise: EPERM,
        };
        let p = emit(0x8000_0000, &[(133, leaf)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(&p, 133, [0, 0o010644, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, 133, [0, 0o010000 | (7 << 32), 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, 133, [0o010000, 0o020644, 0, 0, 0, 0]), EPERM);
        assert_eq!(run(&p, 133, [0, 0o014644, 0, 0, 0, 0]), EPERM);
        assert_eq!(run(&p, 133, [0, 0o000644, 0o010000, 0, 0, 0]), EPERM);
        // guard 4, two tree nodes, the block: ld, and, jeq, ret
        assert_eq!(max_path_len(&p), Some(4 + 2 + 4));
    }

    #[test]
    fn max_path_len_of_small_programs() {
        let ret = BpfInsn {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: 0,
        };
        assert_eq!(max_path_len(&[ret]), Some(1));
        let j = BpfInsn {
            code: BPF_JEQ_K,
            jt: 1,
            jf: 0,
            k: 0,
        };
        assert_eq!(max_path_len(&[j, ret, ret]), Some(2));
        assert_eq!(max_path_len(&[j, ret]), None, "jump out of range");
        assert_eq!(max_path_len(&[]), None);
    }
}
