//! seccomp: install the plan's compiled BPF program, last, right before `execve`.
//!
//! The policy crate already compiled the filter (architecture and x32 guard first) into
//! `sock_filter` instructions, so this module only converts and installs it. It uses the raw
//! `seccomp(SECCOMP_SET_MODE_FILTER)` syscall rather than `seccompiler::apply_filter`: we already
//! hold the bytes, the child must not allocate (seccompiler's apply takes owned program types),
//! and seccompiler has no support for user-notify which later issues need on the same path.
//! `no_new_privs` is set earlier in the child sequence, which is what allows an unprivileged
//! process to install a filter.
//!
//! # The set-id guard
//!
//! Besides the plan's filter, the supervisor always installs [`setid_guard`], a small fixed
//! filter of its own: no `chmod`/`fchmod`/`fchmodat`/`fchmodat2`/`creat`/`open`/`openat`/
//! `mknod`/`mknodat` with S_ISUID or S_ISGID in the mode (EPERM), and no `openat2` (ENOSYS: its
//! mode lives in memory seccomp cannot read; libc falls back to openat). Reason: the workspace is
//! an idmapped mount on which the sandbox's writes land as the workspace OWNER (often root), so
//! without the guard a sandbox could plant a set-uid-root binary in the workspace for a host
//! user to run. The guard returns ALLOW for everything else, which defers to the plan's filter
//! (the kernel applies the most restrictive verdict of all filters).

use carapace_policy::plan::BpfInsn;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: the plan's filter is empty; refusing to run without one")]
    Empty,
    #[error("seccomp: the plan's filter has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

const BPF_MAXINSNS: usize = 4096;

/// The filter, ready for the child.
#[derive(Debug, Clone)]
pub struct Prepared {
    insns: Vec<libc::sock_filter>,
}

impl Prepared {
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }
}

/// Convert the plan's program.
pub fn prepare(program: &[BpfInsn]) -> Result<Prepared, SeccompError> {
    if program.is_empty() {
        return Err(SeccompError::Empty);
    }
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(Prepared {
        insns: program
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect(),
    })
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const S_SETID: u32 = 0o6000;

/// The supervisor's set-id guard (see the module docs), for x86_64.
pub fn setid_guard() -> Prepared {
    // (syscall number, index of its mode argument)
    const MODE_ARG: [(libc::c_long, u32); 9] = [
        (libc::SYS_chmod, 1),
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (libc::SYS_fchmodat2, 2),
        (libc::SYS_creat, 1),
        (libc::SYS_open, 2),
        (libc::SYS_openat, 3),
        (libc::SYS_mknod, 1),
        (libc::SYS_mknodat, 2),
    ];
    let ld = |k: u32| libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let jset = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k: u32| libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8*i (low 32 bits first on x86_64).
    let mut v = vec![
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(SECCOMP_RET_ALLOW), // other arches: the plan's filter kills them
        ld(0),
        jeq(libc::SYS_openat2 as u32, 0, 1),
        ret(SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    for (nr, arg) in MODE_ARG {
        // if nr matches: load the mode (low 32 bits), deny if a set-id bit is set
        v.push(jeq(nr as u32, 0, 4));
        v.push(ld(16 + 8 * arg));
        v.push(jset(S_SETID, 0, 1));
        v.push(ret(SECCOMP_RET_ERRNO | libc::EPERM as u32));
        v.push(ret(SECCOMP_RET_ALLOW));
    }
    v.push(ret(SECCOMP_RET_ALLOW));
    Prepared { insns: v }
}

/// Child: install the filter. `no_new_privs` must already be set.
pub fn child_install(p: &Prepared) -> Result<(), i32> {
    let prog = libc::sock_fprog {
        // Cannot truncate: prepare() bounded the length by 4096.
        len: p.insns.len() as libc::c_ushort,
        filter: p.insns.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `p.insns`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            0 as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions the guard uses.
    fn run(p: &Prepared, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = p.insns[pc];
            match u32::from(i.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                    pc += 1 + usize::from(if acc & i.k != 0 { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn setid_guard_denies_setid_modes_only() {
        let g = setid_guard();
        let x86 = AUDIT_ARCH_X86_64;
        let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let nr = |n: libc::c_long| n as u32;
        assert_eq!(
            run(&g, x86, nr(libc::SYS_chmod), [0, 0o4755, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_chmod), [0, 0o2755, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_chmod), [0, 0o755, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_fchmod), [3, 0o6755, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_fchmodat), [0, 0, 0o4000, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_fchmodat2), [0, 0, 0o4000, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_creat), [0, 0o4700, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_openat), [0, 0, 0o100, 0o6755, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_openat), [0, 0, 0o100, 0o644, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_open), [0, 0o100, 0o4755, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_mknodat), [0, 0, 0o4644, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_openat2), [0; 6]),
            SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(
            run(&g, x86, nr(libc::SYS_read), [0, 0o4755, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        // Not our business on other arches (the plan's filter kills them).
        assert_eq!(
            run(
                &g,
                0x4000_0003,
                nr(libc::SYS_chmod),
                [0, 0o4755, 0, 0, 0, 0]
            ),
            SECCOMP_RET_ALLOW
        );
        assert!(g.len() < 64);
    }

    #[test]
    fn converts_and_bounds() {
        assert!(matches!(prepare(&[]), Err(SeccompError::Empty)));
        let ret_allow = BpfInsn {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        };
        let p = prepare(&[ret_allow]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p.insns[0].k, 0x7fff_0000);
        assert!(matches!(
            prepare(&vec![ret_allow; 4097]),
            Err(SeccompError::TooLong(4097))
        ));
    }
}
