//! The wire (no process forked here: a test binary has many threads; the spawner process
//! itself is tested in tests/spawner.rs, a binary of its own with one thread).

use super::*;

fn tool_plan() -> Plan {
    carapace_policy::Policy::parse(crate::DEFAULT_POLICY, "default")
        .unwrap()
        .compile("tool", &crate::landlock::target())
        .unwrap()
}

#[test]
fn a_plan_arrives_as_it_was_sent() {
    let plan = tool_plan();
    let back: Plan = serde_json::from_slice(&serde_json::to_vec(&plan).unwrap()).unwrap();
    assert_eq!(back, plan);
    // A changed plan is not "equal" by accident.
    let mut other = plan.clone();
    other.seccomp.program.pop();
    assert_ne!(back, other);
}

#[test]
fn messages_carry_their_descriptors_and_eof_is_told_apart() {
    let (a, b) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let p = fds::Pipe::new("test").unwrap();
    send(a.as_fd(), b"hello", &[p.write.as_raw_fd()]).unwrap();
    let mut buf = vec![0u8; 64];
    let (n, got) = recv(b.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(got.len(), 1);
    // The received descriptor is the pipe's write end: what is written arrives.
    nix::unistd::write(&got[0], b"x").unwrap();
    let mut one = [0u8; 1];
    nix::unistd::read(&p.read, &mut one).unwrap();
    assert_eq!(&one, b"x");
    // Too many descriptors are refused before sending.
    let many = vec![p.write.as_raw_fd(); MAX_FDS + 1];
    assert!(matches!(
        send(a.as_fd(), b"x", &many),
        Err(SpawnerError::Malformed { .. })
    ));
    // A message larger than the buffer is an error, not a silently cut request.
    send(a.as_fd(), &[7u8; 100], &[]).unwrap();
    let mut small = vec![0u8; 10];
    assert!(matches!(
        recv(b.as_fd(), &mut small),
        Err(SpawnerError::Malformed { .. })
    ));
    drop(a);
    assert!(matches!(recv(b.as_fd(), &mut buf), Err(SpawnerError::Eof)));
    // Sending to a closed peer is an error (EPIPE), not a SIGPIPE.
    let (c, d) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    drop(d);
    assert!(matches!(
        send(c.as_fd(), b"x", &[]),
        Err(SpawnerError::Sys { .. })
    ));
}

#[test]
fn a_malformed_request_gets_a_failure_not_a_crash() {
    let (reply, fds) = server_handle_for_test(b"{not json", Vec::new());
    assert!(fds.is_empty());
    match reply {
        Reply::Failed { message, child, .. } => {
            assert!(message.starts_with("malformed spawn request"), "{message}");
            assert_eq!(child, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_with_the_wrong_descriptors_is_refused() {
    let program = OpenedProgram::open(&std::fs::canonicalize("/bin/true").unwrap()).unwrap();
    let req = request_for_true(
        &program,
        1,
        Some(tool_plan()),
        [true, true, true, false, false],
    );
    let bytes = serde_json::to_vec(&req).unwrap();
    // Four descriptors announced (program + 3 io), one given.
    let one = vec![program.fd().try_clone_to_owned().unwrap()];
    match server_handle_for_test(&bytes, one).0 {
        Reply::Failed { message, .. } => {
            assert!(message.contains("1 descriptors, expected 4"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// A request to start `/bin/true` (opened as `program`) under plan number `plan_id`, with the
/// io descriptors `io` announced.
fn request_for_true(
    program: &OpenedProgram,
    plan_id: u64,
    plan: Option<Plan>,
    io: [bool; fds::PLACED_FDS],
) -> Request<Plan> {
    Request {
        plan_id,
        plan,
        landlock_abi: 1,
        program: ProgramWire {
            path: program.path().to_path_buf(),
            id: program.id(),
            script: false,
            sha256: None,
        },
        argv0: b"true".to_vec(),
        args: Vec::new(),
        workspace: None,
        rootless: None,
        run_as: (1, 1),
        env: Vec::new(),
        supervisor_env: Vec::new(),
        broker: false,
        listener: false,
        io,
        v2_dir: false,
        v1_tasks: 0,
    }
}

fn server_handle_for_test(msg: &[u8], fds: Vec<OwnedFd>) -> (Reply, Vec<OwnedFd>) {
    server::handle(
        msg,
        fds,
        -1,
        &mut Plans::default(),
        &mut netns::PremadeNetns::new(false),
    )
}

#[test]
fn both_sides_keep_the_same_plans_and_drop_the_oldest() {
    let plan = tool_plan();
    let mut plans = Plans::default();
    for id in 1..=(PLANS_KEPT as u64 + 1) {
        let mut p = plan.clone();
        p.hostname = format!("h{id}");
        plans.insert(id, p);
    }
    assert_eq!(plans.kept.len(), PLANS_KEPT);
    assert!(plans.get(1).is_none(), "the oldest is dropped");
    assert_eq!(plans.get(2).map(|p| p.hostname.as_str()), Some("h2"));
    let mut last = plan.clone();
    last.hostname = format!("h{}", PLANS_KEPT + 1);
    assert_eq!(plans.find(&last), Some(PLANS_KEPT as u64 + 1));
    assert_eq!(plans.find(&plan), None, "an unequal plan is not found");
}

#[test]
fn a_request_for_a_plan_not_kept_asks_for_it() {
    let program = OpenedProgram::open(&std::fs::canonicalize("/bin/true").unwrap()).unwrap();
    let req = request_for_true(&program, 7, None, [false; fds::PLACED_FDS]);
    let bytes = serde_json::to_vec(&req).unwrap();
    let one = vec![program.fd().try_clone_to_owned().unwrap()];
    assert!(matches!(
        server_handle_for_test(&bytes, one).0,
        Reply::UnknownPlan
    ));
    assert_eq!(
        serde_json::to_vec(&Reply::UnknownPlan).unwrap(),
        b"\"UnknownPlan\""
    );
}

/// A spawner handle over a socket no process answers on (pid 0: never signalled here, as
/// nothing in these tests ends a worker).
fn idle_worker(pid: libc::pid_t) -> Worker {
    let (a, _b) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    Worker {
        sock: Mutex::new(Channel {
            sock: a,
            plans: Plans::default(),
            buf: Vec::new(),
        }),
        pid,
        gone: AtomicBool::new(false),
    }
}

#[test]
fn a_request_goes_to_an_idle_spawner_and_never_to_a_gone_one() {
    let sp = Spawner::over(vec![idle_worker(101), idle_worker(102), idle_worker(103)]);
    assert_eq!(sp.describe(), "spawners (pids 101, 102, 103)");
    // All idle: the first.
    let first = sp.pick().unwrap();
    assert_eq!(first.index, 0);
    // The first busy: the second; both busy: the third.
    let second = sp.pick().unwrap();
    assert_eq!(second.index, 1);
    let third = sp.pick().unwrap();
    assert_eq!(third.index, 2);
    // Handed back in any order, the lowest idle one goes first.
    drop(third);
    drop(first);
    let again = sp.pick().unwrap();
    assert_eq!(again.index, 0);
    drop((again, second));
    // A gone one is skipped, and said in the status.
    sp.each[0].gone.store(true, Ordering::SeqCst);
    let lease = sp.pick().unwrap();
    assert_eq!(lease.index, 1);
    assert_eq!(sp.describe(), "spawners (pids 102, 103; 1 of 3 gone)");
    drop(lease);
    sp.each[1].gone.store(true, Ordering::SeqCst);
    assert_eq!(sp.describe(), "spawner (pid 103; 2 of 3 gone)");
    sp.each[2].gone.store(true, Ordering::SeqCst);
    assert!(sp.pick().is_none());
    assert!(!sp.is_alive());
    assert_eq!(sp.describe(), "in-process (the spawners are gone)");
}

#[test]
fn all_spawners_busy_a_request_takes_the_first_handed_back() {
    let sp = Spawner::over(vec![idle_worker(201), idle_worker(202)]);
    let first = sp.pick().unwrap();
    let second = sp.pick().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let lease = sp.pick().unwrap();
            tx.send(lease.index).unwrap();
        });
        // Both held: it waits.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // The second is handed back first: the waiter gets it, not a wait for the first.
        drop(second);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    });
    drop(first);
}

#[test]
fn a_waiting_request_learns_when_the_last_spawner_is_gone() {
    let sp = Spawner::over(vec![idle_worker(0)]);
    let held = sp.pick().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            tx.send(sp.pick().is_none()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Marked gone as `lost` does (without `end`, which would signal pid 0), then woken.
        sp.each[0].gone.store(true, Ordering::SeqCst);
        sp.freed.notify_all();
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    });
    drop(held);
}
