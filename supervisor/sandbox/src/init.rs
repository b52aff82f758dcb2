//! The seccomp filter of the sandbox's init (pid 1 of its pid namespace, see `spawn`).
//!
//! The init is our own code and does very little: after forking the program it closes a few
//! fds, then loops on `wait4`, writes the program's status (4 bytes) to a pipe and `_exit`s.
//! It never execs, so the plan's filter (sized for real tools) is far wider than it needs. It
//! gets this fixed filter instead, built before fork and installed right after the program is
//! forked: the architecture guard (a foreign ABI or x32 kills), then exactly the syscalls of
//! that loop; anything else kills the whole init (`SECCOMP_RET_KILL_PROCESS`), which takes the
//! pid namespace down with it. The program is emitted by the policy crate's BPF compiler
//! ([`carapace_policy::seccomp::fixed_filter`]), the same guard and syscall tables as every plan.
//!
//! The list was checked with `strace -f` of a run (the init's part after the fork):
//! `close` ×4, `wait4`, `write`, `exit_group`. `exit` and `rt_sigreturn` are allowed as well:
//! `exit` is the single-thread form of ending, and `rt_sigreturn` is what returning from any
//! signal handler calls (the init installs none; listed so that a future handler cannot turn
//! into a kill). `restart_syscall` is not needed: `wait4` restarts as itself.

use carapace_policy::plan::{BpfInsn, SeccompAction};
use carapace_policy::seccomp::{fixed_filter, SeccompCompileError};

use crate::seccomp::{self, Prepared, SeccompError};

/// The syscalls the init may make after the program was forked.
pub const ALLOWED: [&str; 6] = [
    "wait4",
    "write",
    "close",
    "exit",
    "exit_group",
    "rt_sigreturn",
];

/// The init's filter as BPF instructions (see the module docs), emitted by the policy crate's
/// compiler like every plan's filter.
pub fn program() -> Result<Vec<BpfInsn>, SeccompCompileError> {
    fixed_filter(&ALLOWED, SeccompAction::KillProcess)
}

/// The init's filter, ready for [`seccomp::child_install`].
pub fn prepare() -> Result<Prepared, SeccompError> {
    seccomp::prepare(&program().map_err(SeccompError::InitFilter)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    use carapace_policy::run_bpf;
    use carapace_policy::seccomp::{
        AUDIT_ARCH_X86_64, RET_ALLOW, RET_KILL_PROCESS, X32_SYSCALL_BIT,
    };

    fn run(p: &[BpfInsn], arch: u32, nr: u32) -> u32 {
        // The interpreter takes the number as the kernel stores it (an int).
        run_bpf(p, nr as i32, arch, [0; 6]).expect("well-formed program")
    }

    /// The allowed names with the numbers libc knows them by: the tables must agree.
    const ALLOWED_NRS: [libc::c_long; 6] = [
        libc::SYS_wait4,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
    ];

    #[test]
    fn allows_exactly_the_init_loop() {
        let p = program().unwrap();
        for (name, nr) in ALLOWED.iter().zip(ALLOWED_NRS) {
            assert_eq!(
                carapace_policy::tables::syscall_nr(name),
                Some(nr),
                "{name}"
            );
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr as u32), RET_ALLOW, "{name}");
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
                run(&p, AUDIT_ARCH_X86_64, nr as u32),
                RET_KILL_PROCESS,
                "{nr}"
            );
        }
        // Every number not in the list is killed.
        let allowed: Vec<u32> = ALLOWED_NRS.iter().map(|n| *n as u32).collect();
        for nr in 0..1024u32 {
            if !allowed.contains(&nr) {
                assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr), RET_KILL_PROCESS, "{nr}");
            }
        }
        for nr in [X32_SYSCALL_BIT - 1, u32::MAX] {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr), RET_KILL_PROCESS, "{nr}");
        }
    }

    #[test]
    fn foreign_arch_and_x32_are_killed() {
        let p = program().unwrap();
        let i386 = 0x4000_0003;
        let aarch64 = 0xc000_00b7;
        for arch in [i386, aarch64, 0] {
            for nr in ALLOWED_NRS {
                assert_eq!(run(&p, arch, nr as u32), RET_KILL_PROCESS, "{arch:#x} {nr}");
            }
        }
        for nr in ALLOWED_NRS {
            assert_eq!(
                run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | nr as u32),
                RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn unknown_or_repeated_names_are_refused() {
        assert!(matches!(
            fixed_filter(&["write", "no_such_syscall"], SeccompAction::KillProcess),
            Err(SeccompCompileError::UnknownSyscall(n)) if n == "no_such_syscall"
        ));
        assert!(matches!(
            fixed_filter(&["write", "write"], SeccompAction::KillProcess),
            Err(SeccompCompileError::Emit(_))
        ));
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
