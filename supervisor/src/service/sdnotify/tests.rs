//! Unit tests of `sdnotify`.

use super::*;
use std::os::fd::AsRawFd;

fn os(s: &str) -> Option<&OsStr> {
    Some(OsStr::new(s))
}

fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a datagram");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn path_socket_gets_messages_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let server = UnixDatagram::bind(&path).expect("bind");
    let n = Notifier::from_vars(Some(path.as_os_str()), None, None, 1).expect("notifier");
    assert!(n.enabled());
    n.ready("serving\non 127.0.0.1:8750").expect("ready");
    n.reloading().expect("reloading");
    n.status("reloaded").expect("status");
    n.watchdog().expect("watchdog");
    n.stopping().expect("stopping");
    assert_eq!(recv(&server), "READY=1\nSTATUS=serving on 127.0.0.1:8750");
    let r = recv(&server);
    let usec: u64 = r
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad reloading message {r:?}"));
    assert!(usec > 0 && usec <= monotonic_usec());
    assert_eq!(recv(&server), "STATUS=reloaded");
    assert_eq!(recv(&server), "WATCHDOG=1");
    assert_eq!(recv(&server), "STOPPING=1");
}

#[test]
fn abstract_socket() {
    let name = format!("carapace-sdnotify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
    let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
    let var = format!("@{name}");
    let n = Notifier::from_vars(os(&var), None, None, 1).expect("notifier");
    n.ready("up").expect("ready");
    assert_eq!(recv(&server), "READY=1\nSTATUS=up");
}

#[test]
fn send_to_a_missing_socket_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nobody.sock");
    let n = Notifier::from_vars(Some(path.as_os_str()), None, None, 1).expect("notifier");
    let e = n.ready("x").expect_err("nobody listens");
    assert!(matches!(e, NotifyError::Send { .. }), "{e}");
    assert!(e.to_string().contains("nobody.sock"), "{e}");
}

#[test]
fn disabled_without_socket() {
    for s in [None, os("")] {
        let n = Notifier::from_vars(s, os("30000000"), None, 1).expect("notifier");
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x").expect("no-op");
        n.watchdog().expect("no-op");
    }
}

#[test]
fn bad_socket_values() {
    for bad in ["relative/path", "vsock:2:1234", "/a\0b"] {
        let e = Notifier::from_vars(os(bad), None, None, 1).expect_err(bad);
        assert!(matches!(e, NotifyError::BadSocket { .. }), "{bad}: {e}");
    }
}

#[test]
fn watchdog_interval_is_half_and_only_for_us() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("n.sock");
    let _server = UnixDatagram::bind(&p).expect("bind");
    let sock = Some(p.as_os_str());
    let n = Notifier::from_vars(sock, os("30000000"), os("42"), 42).expect("ours");
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    let n = Notifier::from_vars(sock, os("30000000"), None, 42).expect("no pid");
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    let n = Notifier::from_vars(sock, os("30000000"), os("41"), 42).expect("not ours");
    assert_eq!(n.watchdog_interval(), None);
    let n = Notifier::from_vars(sock, None, None, 42).expect("off");
    assert_eq!(n.watchdog_interval(), None);
    for bad in ["0", "-5", "soon", ""] {
        let e = Notifier::from_vars(sock, os(bad), None, 42).expect_err(bad);
        assert!(matches!(e, NotifyError::BadVar { var, .. } if var == WATCHDOG_USEC_ENV));
    }
    assert!(Notifier::from_vars(sock, os("1000"), os("x"), 42).is_err());
}

#[test]
fn from_env_reads_and_removes_the_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("n.sock");
    let server = UnixDatagram::bind(&p).expect("bind");
    std::env::set_var(NOTIFY_SOCKET_ENV, &p);
    std::env::set_var(WATCHDOG_USEC_ENV, "4000000");
    std::env::set_var(WATCHDOG_PID_ENV, std::process::id().to_string());
    let n = Notifier::from_env().expect("notifier");
    for v in [NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV] {
        assert_eq!(std::env::var_os(v), None, "{v} still set");
    }
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
    n.watchdog().expect("watchdog");
    assert_eq!(recv(&server), "WATCHDOG=1");
    // Now unset: a second notifier is disabled.
    assert!(!Notifier::from_env().expect("disabled").enabled());
}

#[test]
fn listen_env_parsing() {
    let p = |pid, fds, names| parse_listen_env(pid, fds, names, 7);
    assert_eq!(
        p(None, None, None).expect("none"),
        Vec::<Option<String>>::new()
    );
    assert_eq!(p(os("7"), None, None).expect("no fds"), vec![]);
    assert_eq!(p(os("8"), os("2"), None).expect("not ours"), vec![]);
    assert_eq!(p(os("7"), os("2"), None).expect("2"), vec![None, None]);
    assert_eq!(
        p(os("7"), os("2"), os("gateway:")).expect("named"),
        vec![Some("gateway".to_string()), None]
    );
    assert_eq!(p(os("7"), os("0"), os("")).expect("zero"), vec![]);
    assert!(matches!(
        p(os("7"), os("2"), os("gateway")),
        Err(NotifyError::NameCount { names: 1, fds: 2 })
    ));
    for bad in ["-1", "x", "100000"] {
        assert!(p(os("7"), os(bad), None).is_err(), "{bad}");
    }
    assert!(p(os("seven"), os("1"), None).is_err());
}

#[test]
fn take_fds_owns_and_sets_cloexec() {
    // Two sockets at consecutive free fds far above what the test harness uses.
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let dup_at = |fd: RawFd, min: RawFd| {
        // SAFETY: F_DUPFD (without CLOEXEC, as systemd passes them) of an open fd.
        let r = unsafe { libc::fcntl(fd, libc::F_DUPFD, min) };
        assert!(r >= min, "dup failed");
        r
    };
    let base = 700 + (std::process::id() % 100) as RawFd * 3;
    let fa = dup_at(a.as_raw_fd(), base);
    let fb = dup_at(b.as_raw_fd(), fa + 1);
    assert_eq!(fb, fa + 1, "need consecutive fds");
    let got = take_fds(fa, vec![Some("gateway".into()), None]).expect("take");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.as_raw_fd(), fa);
    assert_eq!(got[0].1.as_deref(), Some("gateway"));
    for (fd, _) in &got {
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0, "CLOEXEC not set");
    }
    drop(got);
    // Dropped = closed; and a missing fd is an error, not a panic.
    let e = take_fds(fa, vec![None]).expect_err("closed fd");
    assert!(matches!(e, NotifyError::Fcntl { op: "F_GETFD", .. }), "{e}");
}
