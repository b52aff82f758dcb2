//! The seccomp filter of the sandbox's init (pid 1 of its pid namespace, see `spawn`).
//!
//! The init is our own code and does very little: after forking the program it closes a few
//! fds, then loops on `wait4`, writes the program's status (4 bytes) to a pipe and `_exit`s.
//! It never execs, so the plan's filter (sized for real tools) is far wider than it needs. It
//! gets this fixed filter instead, built before fork and installed right after the program is
//! forked: the architecture guard (a foreign ABI or x32 kills), then exactly the syscalls of
//! that loop; anything else kills the whole init (`SECCOMP_RET_KILL_PROCESS`), which takes the
//! pid namespace down with it.
//!
//! The list was checked with `strace -f` of a run (the init's part after the fork):
//! `close` ×4, `wait4`, `write`, `exit_group`. `exit` and `rt_sigreturn` are allowed as well:
//! `exit` is the single-thread form of ending, and `rt_sigreturn` is what returning from any
//! signal handler calls (the init installs none; listed so that a future handler cannot turn
//! into a kill). `restart_syscall` is not needed: `wait4` restarts as itself.

use carapace_policy::plan::BpfInsn;

use crate::seccomp::{self, Prepared, SeccompError};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// x32 syscalls on x86_64 carry this bit in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// The syscalls the init may make after the program was forked.
pub const ALLOWED: [(&str, libc::c_long); 6] = [
    ("wait4", libc::SYS_wait4),
    ("write", libc::SYS_write),
    ("close", libc::SYS_close),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
];

fn insn(code: u32, jt: u8, jf: u8, k: u32) -> BpfInsn {
    BpfInsn {
        // BPF opcodes fit in 16 bits by definition.
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The init's filter as BPF instructions (see the module docs).
pub fn program() -> Vec<BpfInsn> {
    let ld = |k: u32| insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, k);
    let ret = |k: u32| insn(libc::BPF_RET | libc::BPF_K, 0, 0, k);
    // seccomp_data: nr at offset 0, arch at offset 4.
    let mut v = vec![
        ld(4),
        insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            1,
            0,
            AUDIT_ARCH,
        ),
        ret(SECCOMP_RET_KILL_PROCESS),
        ld(0),
    ];
    // Layout after the load: [x32 check] [one JEQ per allowed syscall] [KILL] [ALLOW].
    // Jump offsets are u8: the list is far shorter than 255 (checked at compile time).
    const N: usize = ALLOWED.len();
    const _: () = assert!(N < 255);
    if cfg!(target_arch = "x86_64") {
        // nr >= X32 bit: jump over the N JEQs to KILL.
        let over = N as u8;
        v.push(insn(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            over,
            0,
            X32_SYSCALL_BIT,
        ));
    }
    for (i, (_, nr)) in ALLOWED.iter().enumerate() {
        // From JEQ i, ALLOW is (N - i) instructions further (past the remaining JEQs and KILL).
        let to_allow = (N - i) as u8;
        // Syscall numbers are small non-negative constants.
        v.push(insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            to_allow,
            0,
            *nr as u32,
        ));
    }
    v.push(ret(SECCOMP_RET_KILL_PROCESS));
    v.push(ret(SECCOMP_RET_ALLOW));
    v
}

/// The init's filter, ready for [`seccomp::child_install`].
pub fn prepare() -> Result<Prepared, SeccompError> {
    seccomp::prepare(&program())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions this filter uses.
    fn run(p: &[BpfInsn], arch: u32, nr: u32) -> u32 {
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            let code = u32::from(i.code);
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                acc = if i.k == 0 { nr } else { arch };
                pc += 1;
            } else if code == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K {
                pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf });
            } else if code == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K {
                pc += 1 + usize::from(if acc >= i.k { i.jt } else { i.jf });
            } else if code == libc::BPF_RET | libc::BPF_K {
                return i.k;
            } else {
                panic!("unexpected opcode {code:#x}");
            }
        }
    }

    #[test]
    fn allows_exactly_the_init_loop() {
        let p = program();
        for (name, nr) in ALLOWED {
            assert_eq!(run(&p, AUDIT_ARCH, nr as u32), SECCOMP_RET_ALLOW, "{name}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_kill,
            libc::SYS_ptrace,
            libc::SYS_getpid,
            libc::SYS_clone,
            libc::SYS_socket,
        ] {
            assert_eq!(
                run(&p, AUDIT_ARCH, nr as u32),
                SECCOMP_RET_KILL_PROCESS,
                "{nr}"
            );
        }
        // Every number not in the list is killed.
        let allowed: Vec<u32> = ALLOWED.iter().map(|(_, n)| *n as u32).collect();
        for nr in 0..1024u32 {
            if !allowed.contains(&nr) {
                assert_eq!(run(&p, AUDIT_ARCH, nr), SECCOMP_RET_KILL_PROCESS, "{nr}");
            }
        }
    }

    #[test]
    fn foreign_arch_and_x32_are_killed() {
        let p = program();
        let i386 = 0x4000_0003;
        assert_eq!(
            run(&p, i386, libc::SYS_write as u32),
            SECCOMP_RET_KILL_PROCESS
        );
        if cfg!(target_arch = "x86_64") {
            for (_, nr) in ALLOWED {
                assert_eq!(
                    run(&p, AUDIT_ARCH, X32_SYSCALL_BIT | nr as u32),
                    SECCOMP_RET_KILL_PROCESS
                );
            }
        }
    }

    /// The real kernel: a forked process under the filter may write and exit, and is killed by
    /// SIGSYS on anything else (here getpid). Needs no privilege (no_new_privs).
    #[test]
    fn kernel_enforces_it() {
        let prepared = prepare().unwrap();
        let run_child = |forbidden: bool| -> i32 {
            // SAFETY: fork in a test; the child only makes raw syscalls and _exits.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: raw syscalls on integers / a static buffer, then _exit.
                unsafe {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                        libc::_exit(90);
                    }
                    if seccomp::child_install(&prepared).is_err() {
                        libc::_exit(91);
                    }
                    if forbidden {
                        libc::syscall(libc::SYS_getpid);
                    }
                    libc::close(-1);
                    libc::write(-1, b"x".as_ptr().cast(), 1);
                    libc::_exit(7);
                }
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            status
        };
        let ok = run_child(false);
        assert!(libc::WIFEXITED(ok) && libc::WEXITSTATUS(ok) == 7, "{ok:#x}");
        let killed = run_child(true);
        assert!(
            libc::WIFSIGNALED(killed) && libc::WTERMSIG(killed) == libc::SIGSYS,
            "{killed:#x}"
        );
    }
}
