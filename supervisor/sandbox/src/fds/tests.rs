//! Unit tests of `fds`.

use super::*;

#[test]
fn failure_roundtrip() {
    let f = ChildFailure {
        stage: 7,
        index: 42,
        errno: libc::EPERM,
    };
    assert_eq!(ChildFailure::decode(&f.encode()), Some(f));
    assert_eq!(ChildFailure::decode(&[0; 11]), None);
    assert_eq!(ChildFailure::decode(&[]), None);
}

#[test]
fn pipe_eof_after_writer_closed() {
    let p = Pipe::new("test").unwrap();
    write_byte(&p.write, 9, "test").unwrap();
    drop(p.write);
    let mut buf = [0u8; 4];
    assert_eq!(read_full(&p.read, &mut buf, "test").unwrap(), 1);
    assert_eq!(buf[0], 9);
    assert_eq!(read_full(&p.read, &mut buf, "test").unwrap(), 0);
}

#[test]
fn close_all_but_keeps_exactly_those() {
    // In a forked child so the test process's fds are untouched.
    let a = Pipe::new("a").unwrap();
    let b = Pipe::new("b").unwrap();
    let c = Pipe::new("c").unwrap();
    let keep = [b.write.as_raw_fd(), a.read.as_raw_fd()];
    let probe = [a.write.as_raw_fd(), b.read.as_raw_fd(), c.read.as_raw_fd()];
    // SAFETY: the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        if child_close_all_but_stdio(keep).is_err() {
            code |= 1;
        }
        for fd in keep {
            // SAFETY: F_GETFD probe.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                code |= 2;
            }
        }
        for fd in probe {
            // SAFETY: F_GETFD probe.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
                code |= 4;
            }
        }
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0);
}

#[test]
fn place_fds_puts_each_source_at_its_number_inheritable() {
    // Sources at awkward numbers: the broker source is a CLOEXEC pipe; a kept fd may sit at
    // 3 itself, which the placement must not clobber.
    let a = Pipe::new("a").unwrap();
    let b = Pipe::new("b").unwrap();
    let c = Pipe::new("c").unwrap();
    // SAFETY: the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        // Make fd 3 a kept fd (the exec-error pipe stand-in): dup c.write there.
        // SAFETY: dup2 in our own (forked) fd table.
        unsafe { libc::dup2(c.write.as_raw_fd(), 3) };
        let kept = match child_place_fds(
            [-1, a.write.as_raw_fd(), -1, b.write.as_raw_fd(), -1],
            [3, c.read.as_raw_fd()],
        ) {
            Ok(k) => k,
            Err(_) => {
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(99) }
            }
        };
        if kept.iter().any(|&k| k < PLACED_FDS as RawFd) {
            code |= 1;
        }
        if child_close_all_from(4, kept).is_err() {
            code |= 2;
        }
        for fd in [1, 3] {
            // SAFETY: F_GETFD probe.
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if fl < 0 || fl & libc::FD_CLOEXEC != 0 {
                code |= 4;
            }
        }
        // fd 3 is now b's write end, fd 1 a's; the kept copy of the old fd 3 still works.
        // SAFETY: writes of one-byte locals.
        unsafe {
            libc::write(3, b"B".as_ptr().cast(), 1);
            libc::write(1, b"A".as_ptr().cast(), 1);
            libc::write(kept[0], b"C".as_ptr().cast(), 1);
        }
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0);
    drop((a.write, b.write, c.write));
    let mut buf = [0u8; 4];
    assert_eq!(read_full(&a.read, &mut buf, "a").unwrap(), 1);
    assert_eq!(buf[0], b'A');
    assert_eq!(read_full(&b.read, &mut buf, "b").unwrap(), 1);
    assert_eq!(buf[0], b'B');
    assert_eq!(read_full(&c.read, &mut buf, "c").unwrap(), 1);
    assert_eq!(buf[0], b'C');
}

#[test]
fn listener_without_broker_is_at_4_and_3_is_closed() {
    let a = Pipe::new("a").unwrap();
    let c = Pipe::new("c").unwrap();
    // SAFETY: the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        // Something stale at 3 (like a sync pipe that happened to get that number) and the
        // kept exec-error pipe stand-in at 4, where the listener must go.
        // (Copies at high numbers first: the pipes themselves may sit at 3 or 4.)
        // SAFETY: F_DUPFD_CLOEXEC and dup2 in our own (forked) fd table.
        let (aw, cr) = unsafe {
            let aw = libc::fcntl(a.write.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100);
            let cr = libc::fcntl(c.read.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100);
            let cw = libc::fcntl(c.write.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100);
            libc::dup2(cr, 3);
            libc::dup2(cw, 4);
            (aw, cr)
        };
        let srcs = [-1, -1, -1, -1, aw];
        let kept = match child_place_fds(srcs, [4, cr]) {
            Ok(k) => k,
            Err(_) => {
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(99) }
            }
        };
        if child_close_unplaced(srcs, kept).is_err() {
            code |= 1;
        }
        // SAFETY: F_GETFD probes.
        let (fl3, fl4) = unsafe { (libc::fcntl(3, libc::F_GETFD), libc::fcntl(4, libc::F_GETFD)) };
        if fl3 >= 0 {
            code |= 2;
        }
        if fl4 < 0 || fl4 & libc::FD_CLOEXEC != 0 {
            code |= 4;
        }
        // Nothing else above the fixed numbers but the kept fd.
        for fd in PLACED_FDS as RawFd..128 {
            // SAFETY: F_GETFD probe.
            if !kept.contains(&fd) && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
                code |= 8;
            }
        }
        // SAFETY: writes of one-byte locals.
        unsafe {
            libc::write(4, b"L".as_ptr().cast(), 1);
            libc::write(kept[0], b"K".as_ptr().cast(), 1);
        }
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0);
    drop((a.write, c.write));
    let mut buf = [0u8; 4];
    assert_eq!(read_full(&a.read, &mut buf, "a").unwrap(), 1);
    assert_eq!(buf[0], b'L');
    assert_eq!(read_full(&c.read, &mut buf, "c").unwrap(), 1);
    assert_eq!(buf[0], b'K');
}

#[test]
fn open_no_symlinks_refuses_links_anywhere() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("f"), "x").unwrap();
    std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
    let canon = std::fs::canonicalize(&real).unwrap();
    let fd = open_no_symlinks(&canon, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
    assert_eq!(fd_path(&fd).unwrap(), canon);
    let base = std::fs::canonicalize(t.path()).unwrap();
    for bad in [base.join("link"), base.join("link/f")] {
        let e = open_no_symlinks(&bad, libc::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{}", bad.display());
    }
}

#[test]
fn read_until_times_out() {
    let p = Pipe::new("test").unwrap();
    let mut b = [0u8; 1];
    let t = std::time::Instant::now();
    let e = read_full_until(
        &p.read,
        &mut b,
        t + std::time::Duration::from_millis(50),
        "test",
    )
    .unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(45));
    write_byte(&p.write, 5, "test").unwrap();
    let n = read_full_until(
        &p.read,
        &mut b,
        t + std::time::Duration::from_secs(5),
        "test",
    );
    assert_eq!(n.unwrap(), 1);
}

#[test]
fn pipes_are_cloexec() {
    let p = Pipe::new("test").unwrap();
    for fd in [p.read.as_raw_fd(), p.write.as_raw_fd()] {
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }
}
