//! The spawner's side: one thread, one loop over requests, until the supervisor goes.

use super::*;

/// The spawner process's life: confine what can be, then answer requests until the
/// supervisor's end closes. Never returns.
pub(super) fn serve(sock: OwnedFd, parent: libc::pid_t) -> ! {
    // SAFETY: integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // The supervisor may have died before the death signal was armed.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: _exit ends this process without running the supervisor's exit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: a NUL-terminated name of at most 16 bytes.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            c"carapace-spawn".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // Dumpable, like the supervisor it was forked from (which no sandbox can see: they live in
    // pid namespaces of their own and run as other users). Not dumpable, its /proc files would
    // be root's with CAP_SYS_PTRACE required to open them, and the things it opens there are
    // its own: the idmap helper shares its memory (so its flag), and its `ns/user` must be
    // opened by a supervisor whose unit does not grant CAP_SYS_PTRACE; a rootless supervisor
    // must likewise write the uid/gid maps of a child it did not clone.
    // Nothing of the supervisor's but stdio (its log) and this socket: every other descriptor
    // is made /dev/null rather than closed, so that its number is never given to a pipe or
    // socket of a spawn while something inherited (the journal logger's socket) still uses it.
    release_inherited(sock.as_raw_fd());
    // Ready: the supervisor's start waits for this, so that what it finds is confined.
    if send(sock.as_fd(), READY, &[]).is_err() {
        // SAFETY: see above.
        unsafe { libc::_exit(1) }
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut plans = Plans::default();
    // SAFETY: geteuid has no preconditions.
    let mut netns = netns::PremadeNetns::new(unsafe { libc::geteuid() } == 0);
    loop {
        // Between requests: the next sandbox's network namespace.
        netns.refill();
        let (n, fds) = match recv(sock.as_fd(), &mut buf) {
            Ok(m) => m,
            Err(SpawnerError::Eof) => {
                // SAFETY: see above.
                unsafe { libc::_exit(0) }
            }
            Err(e) => {
                tracing::warn!("tool spawner: {}", crate::error_chain(&e));
                // SAFETY: see above.
                unsafe { libc::_exit(1) }
            }
        };
        let (reply, out) = handle(&buf[..n], fds, sock.as_raw_fd(), &mut plans, &mut netns);
        let bytes = match serde_json::to_vec(&reply) {
            Ok(b) => b,
            // SAFETY: see above.
            Err(_) => unsafe { libc::_exit(1) },
        };
        let raw: Vec<RawFd> = out.iter().map(|f| f.as_raw_fd()).collect();
        if send(sock.as_fd(), &bytes, &raw).is_err() {
            // SAFETY: see above.
            unsafe { libc::_exit(1) }
        }
        // Our copies of what was sent close here.
        drop(out);
    }
}

/// Point every descriptor above stdio but `keep` at /dev/null (see `serve`).
fn release_inherited(keep: RawFd) {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep && fd != null.as_raw_fd() {
            // SAFETY: dup3 onto a descriptor number of this process: whatever it named is
            // released, the number now names /dev/null (close-on-exec).
            unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) };
        }
    }
}

fn failed(e: &SpawnError, child: Option<i32>) -> Reply {
    Reply::Failed {
        stage: match e {
            SpawnError::Child { stage, .. } => Some((*stage).to_string()),
            _ => None,
        },
        message: crate::error_chain(e),
        child,
    }
}

fn malformed(why: String) -> (Reply, Vec<OwnedFd>) {
    (
        Reply::Failed {
            stage: None,
            message: format!("malformed spawn request: {why}"),
            child: None,
        },
        Vec::new(),
    )
}

/// One request: prepare, spawn with `CLONE_PARENT`, answer.
pub(super) fn handle(
    msg: &[u8],
    fds: Vec<OwnedFd>,
    lifeline: RawFd,
    plans: &mut Plans,
    netns: &mut netns::PremadeNetns,
) -> (Reply, Vec<OwnedFd>) {
    let mut req: Request<Plan> = match serde_json::from_slice(msg) {
        Ok(r) => r,
        Err(e) => return malformed(e.to_string()),
    };
    // Kept first, whatever follows: the supervisor keeps it too.
    if let Some(p) = req.plan.take() {
        plans.insert(req.plan_id, p);
    }
    let Some(plan) = plans.get(req.plan_id) else {
        return (Reply::UnknownPlan, Vec::new());
    };
    let io_count = req.io.iter().filter(|b| **b).count();
    let want = 1 + io_count + usize::from(req.v2_dir) + req.v1_tasks;
    if fds.len() != want {
        return malformed(format!("{} descriptors, expected {want}", fds.len()));
    }
    let mut fds = fds.into_iter();
    let Some(program_fd) = fds.next() else {
        return malformed("no program descriptor".to_string());
    };
    let io_fds: Vec<Option<OwnedFd>> = req
        .io
        .iter()
        .map(|present| if *present { fds.next() } else { None })
        .collect();
    let v2_dir = if req.v2_dir { fds.next() } else { None };
    let v1_tasks: Vec<OwnedFd> = fds.collect();
    let join = (v2_dir.is_some() || !v1_tasks.is_empty()).then_some(JoinFds { v2_dir, v1_tasks });
    let program = OpenedProgram::from_parts(
        program_fd,
        req.program.path,
        req.program.id,
        req.program.script,
        req.program.sha256,
    );
    let os = |b: Vec<u8>| OsString::from_vec(b);
    let pairs = |v: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<(OsString, OsString)> {
        v.into_iter().map(|(k, v)| (os(k), os(v))).collect()
    };
    let opts = LaunchOptions {
        program: Arc::new(program),
        argv0: os(req.argv0),
        args: req.args.into_iter().map(os).collect(),
        workspace: req.workspace,
        privilege: match req.rootless {
            None => Privilege::Root,
            Some((uid, gid)) => Privilege::Rootless(HostIds { uid, gid }),
        },
        run_as: RunAs::Fixed(HostIds {
            uid: req.run_as.0,
            gid: req.run_as.1,
        }),
        env: pairs(req.env),
        broker: req.broker,
        listener: req.listener,
        supervisor_env: pairs(req.supervisor_env),
    };
    let mut launch = match Launch::prepare(plan, &opts, req.landlock_abi) {
        Ok(l) => l,
        Err(e) => return (failed(&e, None), Vec::new()),
    };
    netns.give(&mut launch);
    let fd = |i: usize| io_fds.get(i).and_then(Option::as_ref).map(|f| f.as_fd());
    let io = ChildIo {
        stdin: fd(0),
        stdout: fd(1),
        stderr: fd(2),
        broker: fd(3),
        listener: fd(4),
    };
    match launch.spawn_for_supervisor(join.as_ref(), lifeline, io) {
        Ok(running) => {
            let p = running.into_parts();
            let forward = p.forward.iter().map(|l| (l.host.clone(), l.port)).collect();
            let mut out = vec![p.pidfd, p.status];
            out.extend(p.forward.into_iter().map(|l| OwnedFd::from(l.socket)));
            (
                Reply::Started {
                    pid: p.pid,
                    since_clone_us: u64::try_from(p.started.elapsed().as_micros())
                        .unwrap_or(u64::MAX),
                    forward,
                },
                out,
            )
        }
        Err(f) => {
            let (e, child) = *f;
            match child {
                Some(r) => {
                    let p = r.into_parts();
                    (failed(&e, Some(p.pid)), vec![p.pidfd])
                }
                None => (failed(&e, None), Vec::new()),
            }
        }
    }
}
