//! The child, from clone to execve, and the sandbox's init: raw, async-signal-safe syscalls over
//! data prepared before the fork; no allocation, no locks, no std::fs, no formatting.

use super::*;

/// The raw fds the child uses (copies of the parent's, valid in the child's fd table).
#[derive(Debug, Clone, Copy)]
pub(super) struct ChildFds {
    pub(super) status_read: RawFd,
    pub(super) status_write: RawFd,
    pub(super) go_read: RawFd,
    pub(super) go_write: RawFd,
    pub(super) ready_read: RawFd,
    pub(super) ready_write: RawFd,
    pub(super) err_read: RawFd,
    pub(super) err_write: RawFd,
    /// Sources of fds 0..=4 in the child (-1: leave as is); see [`fds::child_place_fds`].
    pub(super) io: [RawFd; fds::PLACED_FDS],
    /// Whether any of `io` is set (else the fd layout is the historical one).
    pub(super) place: bool,
    /// Started by the spawner process (-1: by the supervisor itself): the spawner's end of its
    /// socket to the supervisor, which hangs up when the supervisor is gone (see
    /// [`crate::spawner`]).
    pub(super) lifeline: RawFd,
    /// A network namespace made ahead, to join instead of the clone's (-1: none; see
    /// [`Launch::use_premade_netns`]).
    pub(super) netns: RawFd,
}

/// The child: from clone to execve. Raw async-signal-safe syscalls only; never returns.
///
/// `program_stack`: the top of a stack for the program's child (pid 2), allocated by the
/// parent before the clone: this process's private copy of it is the child's stack.
pub(super) fn child_main(
    l: &Launch,
    f: &ChildFds,
    v1_tasks: &[RawFd],
    program_stack: *mut libc::c_void,
) -> ! {
    // The exec-error pipe may move when fds are placed (fds::child_place_fds).
    let err_fd = std::cell::Cell::new(f.err_write);
    let fail = |stage: Stage, index: u32, errno: i32| -> ! {
        fds::child_report(
            err_fd.get(),
            ChildFailure {
                stage: stage as u32,
                index,
                errno,
            },
        );
        // SAFETY: _exit is async-signal-safe and ends the child without running destructors.
        unsafe { libc::_exit(crate::report::EXIT_SETUP) }
    };
    let check = |stage: Stage, r: Result<(), i32>| {
        if let Err(e) = r {
            fail(stage, 0, e);
        }
    };
    let sys0 = |r: libc::c_long| -> Result<(), i32> {
        if r == 0 {
            Ok(())
        } else {
            Err(fds::errno())
        }
    };

    // SAFETY: closing the parent's ends of our pipes in our own fd table.
    unsafe {
        libc::close(f.status_read);
        libc::close(f.go_write);
        libc::close(f.ready_read);
        libc::close(f.err_read);
    }
    // Join the v1 cgroup hierarchies (v2 was joined at birth) before doing anything else.
    if let Err(e) = crate::cgroup::join_self_v1(v1_tasks) {
        fail(Stage::JoinCgroup, 0, e);
    }
    // The network namespace made ahead, joined while we are still root in the initial user
    // namespace (as the clone would have made it); our copy of its fd is closed at once.
    if f.netns >= 0 {
        // SAFETY: integer arguments only; `netns` is a namespace fd in our own fd table.
        check(
            Stage::JoinNetns,
            sys0(unsafe { libc::setns(f.netns, libc::CLONE_NEWNET) } as libc::c_long),
        );
        // SAFETY: closing our copy of that fd.
        unsafe { libc::close(f.netns) };
    }
    // Signal dispositions set to "ignore" survive execve (the Rust runtime ignores SIGPIPE):
    // reset every signal to default and unblock all.
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: signal() with SIG_DFL is async-signal-safe (a sigaction syscall).
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty sigset built on the stack; sigprocmask is async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }

    // Sync 1: the parent is ready (and, when clone3 could not place us in the v2 cgroup at
    // birth, has moved us there).
    match fds::child_read_byte(f.go_read) {
        Ok(1) => {}
        Ok(_) => fail(Stage::Sync1, 0, libc::EPROTO),
        Err(e) => fail(Stage::Sync1, 0, e),
    }
    if l.unshare_cgroup {
        // SAFETY: integer argument only.
        check(
            Stage::UnshareCgroup,
            sys0(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } as libc::c_long),
        );
    }
    if let Err((i, e)) = mounts::child_run(&l.mounts.ops) {
        fail(Stage::Mounts, i, e);
    }
    if let Some(h) = &l.hostname {
        // SAFETY: valid buffer and length.
        check(
            Stage::Sethostname,
            sys0(unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) } as libc::c_long),
        );
    }
    if !l.rootless {
        // Drop supplementary groups while still real root in the initial user namespace. Raw
        // syscall: glibc's setgroups would try to broadcast to threads that do not exist here.
        // (Rootless: setgroups is denied in our user namespace; the user's own supplementary
        // groups stay, see docs/threat-model.md.)
        // SAFETY: setgroups(0, NULL) passes no memory.
        check(
            Stage::Setgroups,
            sys0(unsafe {
                libc::syscall(
                    libc::SYS_setgroups,
                    0 as libc::c_int,
                    std::ptr::null::<libc::gid_t>(),
                )
            }),
        );
        // Rootless: we are in our user namespace since clone.
        // SAFETY: integer argument only.
        check(
            Stage::UnshareUser,
            sys0(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long),
        );
    }
    check(Stage::SignalUserns, fds::child_write_byte(f.ready_write, 1));
    // SAFETY: closing our copy of the ready pipe.
    unsafe { libc::close(f.ready_write) };
    // Sync 2: the parent has written our uid_map/gid_map.
    match fds::child_read_byte(f.go_read) {
        Ok(2) => {}
        Ok(_) => fail(Stage::Sync2, 0, libc::EPROTO),
        Err(e) => fail(Stage::Sync2, 0, e),
    }
    let (uid, gid) = (l.inside_uid, l.inside_gid);
    // Raw syscalls (not glibc's wrappers, which broadcast to all threads of the parent).
    // SAFETY: integer arguments only.
    check(
        Stage::Setresgid,
        sys0(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }),
    );
    // SAFETY: integer arguments only.
    check(
        Stage::Setresuid,
        sys0(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }),
    );
    // Namespace root is unmapped, so setresuid did not clear our capabilities: drop them.
    check(Stage::CapBounding, caps::child_drop_bounding(l.cap_last));
    check(Stage::CapAmbient, caps::child_clear_ambient());
    check(Stage::Securebits, caps::child_lock_securebits());
    check(Stage::Capset, caps::child_capset_zero());
    // SAFETY: no arguments.
    if unsafe { libc::setsid() } < 0 {
        fail(Stage::Setsid, 0, fds::errno());
    }
    // After the credential changes (they clear it).
    // SAFETY: integer arguments only.
    check(
        Stage::Pdeathsig,
        sys0(unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        } as libc::c_long),
    );
    // getppid() is 0 in a new pid namespace, so it cannot tell whether the supervisor died
    // before PDEATHSIG was armed. The supervisor holds the write end of the sync pipe until
    // exec is confirmed: a hangup there means it is gone.
    // Started by the spawner (CLONE_PARENT: our parent, whose death PDEATHSIG reports, is the
    // supervisor, while the sync pipe is the spawner's): the spawner's socket to the
    // supervisor hangs up when the supervisor is gone.
    let mut pfd = [
        libc::pollfd {
            fd: f.go_read,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: f.lifeline,
            events: 0,
            revents: 0,
        },
    ];
    let n: libc::nfds_t = if f.lifeline >= 0 { 2 } else { 1 };
    // SAFETY: `n` valid pollfds on the stack, zero timeout.
    let r = unsafe { libc::poll(pfd.as_mut_ptr(), n, 0) };
    if r < 0
        || pfd[..n as usize]
            .iter()
            .any(|p| p.revents & (libc::POLLHUP | libc::POLLERR) != 0)
    {
        fail(Stage::ParentGone, 0, libc::ESRCH);
    }
    // Not ptrace-able / no core during the rest of setup (execve resets it for the program).
    // SAFETY: integer arguments only.
    check(
        Stage::Dumpable,
        sys0(
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) }
                as libc::c_long,
        ),
    );
    // SAFETY: integer arguments only.
    check(
        Stage::NoNewPrivs,
        sys0(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) }
                as libc::c_long,
        ),
    );
    let ruleset = l.landlock.raw_fd();
    for (i, rule) in l.landlock.sandbox_rules.iter().enumerate() {
        if let Err(e) = landlock::child_add_sandbox_rule(ruleset, rule) {
            fail(Stage::LandlockRule, i as u32, e);
        }
    }
    check(
        Stage::LandlockRestrict,
        landlock::child_restrict_self(ruleset),
    );
    let mut placed = *f;
    if f.place {
        match fds::child_place_fds(f.io, [f.err_write, f.status_write]) {
            Ok([e, s]) => {
                placed.err_write = e;
                placed.status_write = s;
                err_fd.set(e);
            }
            Err(e) => fail(Stage::PlaceFds, 0, e),
        }
    }
    let f = &placed;
    // Everything above stdio but the fds placed at 3 (broker) and 4 (listener) and our two
    // pipes (CLOEXEC).
    check(
        Stage::CloseFds,
        fds::child_close_unplaced(f.io, [f.err_write, f.status_write]),
    );
    // The limits come after the supervisor's descriptors are gone: this process started with a
    // copy of the whole (multi-threaded, busy) supervisor's fd table, whose numbers can reach
    // past the profile's `open_files`; with RLIMIT_NOFILE already lowered, opening a Landlock
    // path or moving an fd aside would fail with EMFILE (seen under load: 64 tools at once).
    // Nothing above needs a limit in force: the program, forked below, inherits them all.
    for (i, rl) in l.rlimits.iter().enumerate() {
        if let Err(e) = rlimits::child_apply(rl) {
            fail(Stage::Rlimit, i as u32, e);
        }
    }
    // SAFETY: valid C string.
    check(
        Stage::Chdir,
        sys0(unsafe { libc::chdir(l.cwd.as_ptr()) } as libc::c_long),
    );
    // We are pid 1 of the new pid namespace. The program runs as our child (pid 2) so that it
    // has ordinary signal semantics (pid 1 ignores signals it has no handler for) and its
    // orphans are reaped; we stay as its init, and our death takes the namespace down.
    // The child shares our memory until its execve (CLONE_VM | CLONE_VFORK, as posix_spawn
    // does): a fork would copy this process's page tables (a copy of the supervisor's or the
    // spawner's) only for the exec to throw them away. We are suspended until it has execed or
    // exited, so nothing of ours changes under it, and it runs on a stack of its own.
    let start = ProgramStart {
        l,
        f,
        err_fd: err_fd.get(),
    };
    // SAFETY: `program_stack` is the top of a 16-byte aligned allocation of `CLONE_STACK_BYTES`
    // in our private copy of memory, used by nothing else; `start` lives in this frame, which
    // stays as it is while we are suspended (CLONE_VFORK) and the child runs `program_main`,
    // which only reads it and never returns (it execs or `_exit`s). No CLONE_SETTLS: the child
    // uses no thread-local storage but errno, which nothing of ours reads until it is gone.
    let program = unsafe {
        libc::clone(
            program_main,
            program_stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of!(start).cast_mut().cast(),
        )
    };
    if program < 0 {
        fail(Stage::ForkProgram, 0, fds::errno());
    }
    init_main(program, f, &l.init_seccomp)
}

/// What the program's child reads from its parent's memory (see `child_main`).
struct ProgramStart<'a> {
    l: &'a Launch,
    f: &'a ChildFds,
    /// The exec-error pipe where it is now.
    err_fd: RawFd,
}

/// The program's child (pid 2), on its own stack in the init's memory: open and check the
/// program, seccomp last, execve.
extern "C" fn program_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ProgramStart` of `child_main`, alive and unchanged while the init
    // is suspended for us (CLONE_VFORK); we only read it.
    let p = unsafe { &*arg.cast::<ProgramStart<'_>>() };
    program_exec(p.l, p.f, p.err_fd)
}

/// The program's child from its clone to its execve: raw syscalls over the init's data; on a
/// failure, the record on the exec-error pipe and `_exit`.
fn program_exec(l: &Launch, f: &ChildFds, err_fd: RawFd) -> ! {
    let fail = |stage: Stage, index: u32, errno: i32| -> ! {
        fds::child_report(
            err_fd,
            ChildFailure {
                stage: stage as u32,
                index,
                errno,
            },
        );
        // SAFETY: _exit is async-signal-safe and ends this child (not the init, whose memory
        // it shares: _exit ends a process, and this is one of its own).
        unsafe { libc::_exit(crate::report::EXIT_SETUP) }
    };
    // SAFETY: closing the init's status pipe in our own fd table (not shared: no CLONE_FILES).
    unsafe { libc::close(f.status_write) };
    // The program as the sandbox sees it (its mounts, Landlock, id mapping), bound to the file
    // the supervisor opened: same inode, same size and times, or not run.
    // SAFETY: a valid C string; O_PATH opens nothing for reading and needs no permission on
    // the file itself.
    let prog = unsafe { libc::open(l.program.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if prog < 0 {
        fail(Stage::OpenProgram, 0, fds::errno());
    }
    match FileId::of_fd(prog) {
        Ok(id) if id == l.program_id => {}
        Ok(_) => fail(Stage::ProgramChanged, 0, libc::ESTALE),
        Err(e) => fail(Stage::ProgramChanged, 0, e),
    }
    if l.exec == Exec::ScriptFd {
        // The kernel hands the interpreter `/dev/fd/N`: N must outlive the exec.
        // SAFETY: F_SETFD on our own descriptor.
        if unsafe { libc::fcntl(prog, libc::F_SETFD, 0) } < 0 {
            fail(Stage::ProgramFd, 0, fds::errno());
        }
    }
    // One filter: the plan's, which includes the set-id guard. Installed on this task only
    // (no TSYNC): the init, whose memory this child shares, keeps its own.
    if let Err(e) = seccomp::child_install(&l.seccomp) {
        fail(Stage::Seccomp, 0, e);
    }
    if l.exec == Exec::ScriptPath {
        // SAFETY: the path and argv/envp are NUL-terminated strings / NULL-terminated arrays
        // of them, built before the first fork and alive in the init's memory, which is ours
        // until the exec.
        unsafe {
            libc::execve(
                l.program.as_ptr(),
                l.argv_ptrs.as_ptr(),
                l.envp_ptrs.as_ptr(),
            )
        };
        fail(Stage::Execve, 0, fds::errno())
    }
    // SAFETY: "" and argv/envp are NUL-terminated strings / NULL-terminated arrays of them,
    // built before the first fork and alive in the init's memory, which is ours until the
    // exec; `prog` is our descriptor.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            prog,
            c"".as_ptr(),
            l.argv_ptrs.as_ptr(),
            l.envp_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    fail(Stage::Execve, 0, fds::errno())
}

/// The sandbox's init (pid 1): reap every child; when the program exits, hand its raw wait
/// status to the supervisor through the status pipe and exit, which kills whatever is left in
/// the pid namespace. Runs under everything the program gets except the plan's filter (no
/// capabilities, no_new_privs, Landlock, rlimits, not dumpable) and, from right after the
/// fork, under its own tiny filter ([`crate::init`]): wait4, write, close, exit, exit_group,
/// rt_sigreturn; anything else kills it (and with it the namespace).
pub(super) fn init_main(program: libc::pid_t, f: &ChildFds, filter: &seccomp::Prepared) -> ! {
    if let Err(errno) = seccomp::child_install(filter) {
        // The exec-error pipe is still open here: the supervisor reads this record (the
        // program's exec cannot produce the EOF while we hold our copy). Our exit kills the
        // program.
        fds::child_report(
            f.err_write,
            ChildFailure {
                stage: Stage::InitSeccomp as u32,
                index: 0,
                errno,
            },
        );
        // SAFETY: _exit is async-signal-safe and ends the init (and the namespace).
        unsafe { libc::_exit(crate::report::EXIT_SETUP) };
    }
    // SAFETY: closing our copies of the exec-error pipe (so the supervisor sees EOF when the
    // program execs) and of stdio (so readers see EOF when the program closes its end).
    unsafe {
        libc::close(f.err_write);
        libc::close(0);
        libc::close(1);
        libc::close(2);
    }
    if f.io[3] >= 0 {
        // SAFETY: closing our copy of the broker socket, so the broker sees the hangup when
        // the program (and whatever it left) is gone.
        unsafe { libc::close(fds::BROKER_FD) };
    }
    if f.io[4] >= 0 {
        // SAFETY: closing our copy of the listening socket: only the program serves it.
        unsafe { libc::close(fds::LISTEN_FD) };
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waiting for any child with a valid status pointer.
        let r = unsafe { libc::wait4(-1, &mut status, libc::__WALL, std::ptr::null_mut()) };
        if r == program {
            let b = status.to_ne_bytes();
            // SAFETY: writing a 4-byte local to our status pipe (atomic: < PIPE_BUF).
            unsafe { libc::write(f.status_write, b.as_ptr().cast(), b.len()) };
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            // SAFETY: ends the init (and with it the pid namespace).
            unsafe { libc::_exit(code) };
        }
        if r < 0 && fds::errno() == libc::ECHILD {
            // SAFETY: nothing left to wait for; end the init.
            unsafe { libc::_exit(crate::report::EXIT_SETUP) };
        }
    }
}
