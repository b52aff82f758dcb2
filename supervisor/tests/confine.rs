//! Privileged tests: real confined runs of a hand-built plan (as root).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use carapace_sandbox::cgroup::{self, Cgroup};
use carapace_sandbox::landlock;
use carapace_sandbox::namespaces::{HostIds, RunAs};
use carapace_sandbox::report::ExitReport;
use carapace_sandbox::run::{self, Run};
use carapace_sandbox::spawn::{ChildIo, Launch, LaunchOptions, SpawnError};
use carapace_sandbox::Privilege;

use common::*;

fn run_plan(
    plan: &carapace_policy::Plan,
    ws: &Path,
    program: &str,
    args: &[&str],
) -> Result<ExitReport, SpawnError> {
    let opts = LaunchOptions {
        program: opened(program),
        argv0: OsString::from(program),
        args: args.iter().map(OsString::from).collect(),
        workspace: Some(ws.to_path_buf()),
        privilege: Privilege::of_this_process(),
        run_as: RunAs::Fixed(HostIds::NOBODY),
        env: std::env::vars_os().collect(),
        broker: false,
        listener: false,
        supervisor_env: Vec::new(),
    };
    // Through the one run path every caller takes (cgroup, prepare, spawn, wait, remove).
    let run = Run {
        name: "test".to_string(),
        landlock_abi: landlock::probe_abi(),
        options: opts,
    };
    let mut ended = run::start(plan.clone(), &run, ChildIo::default())?.wait();
    ended.remove_cgroup().expect("the run's cgroup is removed");
    ended.report
}

fn sh(ws: &Path, script: &str) -> ExitReport {
    run_plan(&hand_plan(), ws, "/bin/sh", &["-c", script]).expect("confined run")
}

#[test]
fn true_runs_confined() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let r = run_plan(&hand_plan(), ws.path(), "/bin/true", &[]).expect("confined /bin/true");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(!r.timed_out);
    let r = run_plan(&hand_plan(), ws.path(), "/bin/false", &[]).expect("confined /bin/false");
    assert_eq!(r.exit_code(), 1, "{r:?}");
}

#[test]
fn a_busy_supervisor_fd_table_does_not_break_the_open_files_limit() {
    if !require_root() {
        return;
    }
    // The child starts with a copy of the supervisor's fd table. With every number below the
    // plan's RLIMIT_NOFILE (256) in use, applying the limit before closing that copy made the
    // child's own opens fail with EMFILE (Landlock paths, moving fds aside). 300 fds here.
    let ws = workspace(0, 0);
    let held: Vec<std::fs::File> = (0..300)
        .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
        .collect();
    let r = run_plan(&hand_plan(), ws.path(), "/bin/sh", &["-c", "ulimit -n"])
        .expect("a confined run with a full fd table");
    drop(held);
    assert_eq!(r.exit_code(), 0, "{r:?}");
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("{key} missing in:\n{status}"))
}

#[test]
fn confinement_state_inside() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let r = sh(
        ws.path(),
        "cat /proc/self/status > status; cat /proc/self/uid_map > uid_map; \
         cat /proc/self/gid_map > gid_map; id > id; hostname > host 2>&1 || cat /proc/sys/kernel/hostname > host; \
         for d in oldroot newroot work home root var sys usr proc dev tmp workspace bin etc; do [ -e /$d ] && echo $d; done > root; ls / 2>/dev/null && echo listed >> root; env > env; ls /proc > procs",
    );
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let read = |n: &str| std::fs::read_to_string(ws.path().join(n)).unwrap();
    let status = read("status");
    assert_eq!(status_field(&status, "Seccomp:"), "2");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "Uid:"), "1000\t1000\t1000\t1000");
    assert_eq!(status_field(&status, "Gid:"), "1000\t1000\t1000\t1000");
    assert_eq!(status_field(&status, "Groups:"), "");
    let uid_map: Vec<String> = read("uid_map")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(uid_map, ["1000", "65534", "1"]);
    let gid_map: Vec<String> = read("gid_map")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(gid_map, ["1000", "65534", "1"]);
    assert_eq!(read("host").trim(), "carapace");
    // Only the plan's mounts exist at the root; no host leftovers (oldroot, work, home...);
    // and the root itself cannot even be listed (no Landlock rule grants it).
    let root = read("root");
    assert!(!root.lines().any(|l| l == "listed"), "/ is listable");
    for absent in ["oldroot", "newroot", "work", "home", "root", "var", "sys"] {
        assert!(
            !root.lines().any(|l| l == absent),
            "{absent} visible:\n{root}"
        );
    }
    for present in ["usr", "proc", "dev", "tmp", "workspace", "bin", "etc"] {
        assert!(
            root.lines().any(|l| l == present),
            "{present} missing:\n{root}"
        );
    }
    // Scrubbed environment.
    let env = read("env");
    assert!(env.contains("PATH=/usr/local/bin:/usr/bin:/bin"), "{env}");
    assert!(env.contains("HOME=/workspace"), "{env}");
    assert!(!env.contains("CARGO"), "supervisor env leaked:\n{env}");
    // pid namespace: only our processes.
    let pids: Vec<u32> = read("procs")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert!(pids.contains(&1), "{pids:?}");
    assert!(pids.len() <= 4, "host processes visible: {pids:?}");
}

#[test]
fn workspace_writes_land_as_owner() {
    if !require_root() {
        return;
    }
    let ws = workspace(4242, 4343);
    let r = sh(
        ws.path(),
        "echo hello > made && mkdir sub && stat -c '%u:%g' made > owner",
    );
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let meta = std::fs::metadata(ws.path().join("made")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    let meta = std::fs::metadata(ws.path().join("sub")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    // Inside, the owner appears as the sandbox user.
    let owner = std::fs::read_to_string(ws.path().join("owner")).unwrap();
    assert_eq!(owner.trim(), "1000:1000");
}

#[test]
fn confinement_refuses_what_it_must() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    // Each line must FAIL inside; a success is recorded in `escaped`.
    let script = "\
        cat /etc/shadow >/dev/null 2>&1 && echo shadow >> escaped; \
        echo x > /usr/x 2>/dev/null && echo usr >> escaped; \
        echo x > /x 2>/dev/null && echo root >> escaped; \
        cp /bin/true ./t 2>/dev/null; ./t 2>/dev/null && echo wsexec >> escaped; \
        cp /bin/true /tmp/t 2>/dev/null; /tmp/t 2>/dev/null && echo tmpexec >> escaped; \
        echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo procw >> escaped; \
        ls /oldroot >/dev/null 2>&1 && echo oldroot >> escaped; \
        touch escaped; true";
    let r = sh(ws.path(), script);
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let escaped = std::fs::read_to_string(ws.path().join("escaped")).unwrap();
    assert_eq!(escaped, "", "escapes: {escaped}");
    assert!(!Path::new("/usr/x").exists());
}

#[test]
fn exit_codes_and_signals_propagate() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    assert_eq!(sh(ws.path(), "exit 7").exit_code(), 7);
    // The program is pid 2 (under carapace's init), so its own signals kill it.
    let r = sh(ws.path(), "kill -SEGV $$; exit 3");
    assert_eq!(r.exit_code(), 128 + 11, "{r:?}");
}

#[test]
fn timeout_kills_the_tree() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let mut plan = hand_plan();
    plan.wall_time = Some(Duration::from_millis(500));
    let r = run_plan(&plan, ws.path(), "/bin/sh", &["-c", "sleep 30 & sleep 30"])
        .expect("confined run");
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code(), 124);
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(r.wall < Duration::from_secs(5), "{r:?}");
}

#[test]
fn program_outside_exec_mounts_is_refused_before_fork() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let exe = ws.path().join("prog");
    std::fs::copy("/bin/true", &exe).unwrap();
    let opts = LaunchOptions {
        program: opened(&exe),
        argv0: OsString::from("prog"),
        args: vec![],
        workspace: Some(ws.path().to_path_buf()),
        privilege: Privilege::of_this_process(),
        run_as: RunAs::Fixed(HostIds::NOBODY),
        env: vec![],
        broker: false,
        listener: false,
        supervisor_env: Vec::new(),
    };
    let e = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap_err();
    assert!(e.to_string().contains("not executable"), "{e}");
    // An executable outside every mount of the profile.
    let elsewhere = tempfile::tempdir().unwrap();
    let hidden = elsewhere.path().join("prog");
    std::fs::copy("/bin/true", &hidden).unwrap();
    let opts = LaunchOptions {
        program: opened(&hidden),
        ..opts
    };
    let e = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap_err();
    assert!(e.to_string().contains("not visible"), "{e}");
}

#[test]
fn setid_bits_cannot_be_planted_in_the_workspace() {
    if !require_root() {
        return;
    }
    // Workspace files land as the (root) owner on the host, so every compiled plan's seccomp
    // filter carries the set-id guard. The hand plan with the default policy's compiled filter
    // (which allows chmod, creat, open...) must refuse set-id modes.
    let policy =
        carapace_policy::Policy::parse(carapace_supervisor::embedded::DEFAULT_POLICY, "default")
            .expect("default policy");
    let compiled = policy
        .compile("tool", &carapace_policy::Target { landlock_abi: 6 })
        .expect("tool profile compiles");
    assert!(compiled
        .seccomp
        .setid_guard
        .mode_checked
        .iter()
        .any(|s| s == "fchmodat"));
    let mut plan = hand_plan();
    plan.seccomp = compiled.seccomp;
    let ws = workspace(0, 0);
    let r = run_plan(
        &plan,
        ws.path(),
        "/bin/sh",
        &[
            "-c",
            "echo x > f; chmod 4755 f; chmod 2755 f; chmod g+s f; chmod 0750 f; \
             stat -c %a f > mode; mkdir d; chmod 2755 d; true",
        ],
    )
    .expect("confined run");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    for f in ["f", "d"] {
        let m = std::fs::metadata(ws.path().join(f)).unwrap();
        assert_eq!(m.mode() & 0o6000, 0, "{f} has set-id bits: {:o}", m.mode());
    }
    // Control: without the guard (the hand plan's own filter allows everything but ptrace)
    // the same chmod does plant the bit, so the check above can fail.
    let ctl = workspace(0, 0);
    let r = sh(ctl.path(), "echo x > f; chmod 4755 f; true");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let m = std::fs::metadata(ctl.path().join("f")).unwrap();
    let _ = std::fs::remove_file(ctl.path().join("f"));
    assert_ne!(
        m.mode() & 0o4000,
        0,
        "control: chmod 4755 had no effect ({:o})",
        m.mode()
    );
    // Ordinary chmod still works.
    assert_eq!(
        std::fs::read_to_string(ws.path().join("mode"))
            .unwrap()
            .trim(),
        "750"
    );
}

/// A child spawned with `ChildIo` gets exactly those fds: stdin, stdout, stderr replaced, the
/// broker socket at fd 3 (not close-on-exec) named by CARAPACE_BROKER_FD, and nothing above 3.
/// Without a broker socket, fd 3 is closed and the variable absent.
#[test]
fn child_io_places_stdio_and_the_broker_socket() {
    use carapace_sandbox::fds::Pipe;
    use carapace_sandbox::spawn::ChildIo;
    use std::io::Read as _;
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let script = "echo \"env=${CARAPACE_BROKER_FD:-unset}\"; \
                  for f in 3 4 5 6 7 8 9 10 11 12; do [ -e /proc/self/fd/$f ] && echo \"open=$f\"; done; \
                  echo to-stderr >&2; \
                  if [ -e /proc/self/fd/3 ]; then printf broker-hello >&3; fi; exit 0";
    for broker in [true, false] {
        let opts = LaunchOptions {
            program: opened("/usr/bin/sh"),
            argv0: OsString::from("sh"),
            args: vec![OsString::from("-c"), OsString::from(script)],
            workspace: Some(ws.path().to_path_buf()),
            privilege: Privilege::of_this_process(),
            run_as: RunAs::Fixed(HostIds::NOBODY),
            env: vec![],
            broker,
            listener: false,
            supervisor_env: Vec::new(),
        };
        let launch = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap();
        let out = Pipe::new("stdout").unwrap();
        let err = Pipe::new("stderr").unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut sp = [0; 2];
        // SAFETY: `sp` is a valid array of two ints for socketpair to fill.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sp.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: socketpair succeeded: both fds are ours alone.
        let (mine, theirs) = unsafe { (OwnedFd::from_raw_fd(sp[0]), OwnedFd::from_raw_fd(sp[1])) };
        let io = ChildIo {
            stdin: Some(null.as_fd()),
            stdout: Some(out.write.as_fd()),
            stderr: Some(err.write.as_fd()),
            broker: broker.then(|| theirs.as_fd()),
            listener: None,
        };
        // A launch prepared without a broker refuses a broker socket and vice versa.
        let wrong = ChildIo {
            broker: (!broker).then(|| theirs.as_fd()),
            ..io
        };
        assert!(launch.spawn_with(None, wrong).is_err());
        let launch = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap();
        let cg = Cgroup::create(&cgroup::unique_name("test"), &hand_plan().cgroup).unwrap();
        let running = launch.spawn_with(Some(&cg), io).unwrap();
        drop(out.write);
        drop(err.write);
        drop(theirs);
        let report = running.wait(launch.wall_time(), Some(&cg)).unwrap();
        cg.remove().unwrap();
        let mut stdout = String::new();
        std::fs::File::from(out.read)
            .read_to_string(&mut stdout)
            .unwrap();
        let mut stderr = String::new();
        std::fs::File::from(err.read)
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?} {stdout} {stderr}");
        assert_eq!(stderr, "to-stderr\n");
        if broker {
            assert_eq!(stdout, "env=3\nopen=3\n");
            let mut buf = [0u8; 64];
            // SAFETY: reading into a local buffer of the size passed.
            let n = unsafe {
                libc::recv(
                    mine.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            assert_eq!(n, 12, "{}", std::io::Error::last_os_error());
            assert_eq!(&buf[..12], b"broker-hello");
            // The child and its init are gone: the broker sees the hangup (EOF).
            // SAFETY: as above.
            let n = unsafe {
                libc::recv(
                    mine.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            assert_eq!(n, 0);
        } else {
            assert_eq!(stdout, "env=unset\n");
        }
    }
}

/// A child prepared with a listener gets the listening socket at fd 4 (not close-on-exec),
/// named by CARAPACE_LISTEN_FD=4, and can accept connections on it from inside its own network
/// namespace; with or without a broker (without one, fd 3 is closed). A launch prepared
/// without a listener refuses one and vice versa.
#[test]
fn child_io_places_the_listener_at_4() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    listener_at_4(ws.path(), false);
}

/// The same as an unprivileged user (rootless mode): this test binary runs itself again as
/// uid 2000000 through setpriv, for the helper below.
#[test]
fn child_io_places_the_listener_at_4_rootless() {
    const HELPER: &str = "CARAPACE_TEST_ROOTLESS_LISTENER_WS";
    if let Some(ws) = std::env::var_os(HELPER) {
        // The helper run: unprivileged.
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_ne!(euid, 0, "the helper must not run as root");
        listener_at_4(Path::new(&ws), true);
        return;
    }
    if !require_root() {
        return;
    }
    let ws = workspace(2_000_000, 2_000_000);
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=2000000", "--regid=2000000", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "child_io_places_the_listener_at_4_rootless",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER, ws.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the test binary through setpriv");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the helper did not run:\n{text}");
}

/// The body of the listener tests, in `ws` (rootless: as the unprivileged user running it).
fn listener_at_4(ws: &Path, rootless: bool) {
    use carapace_sandbox::fds::Pipe;
    use carapace_sandbox::spawn::ChildIo;
    use std::io::Read as _;
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};
    // The shell lists its fds and variables, then python (exec'd, so it inherits fd 4)
    // accepts one connection on fd 4 and answers on it.
    let script = "echo \"broker=${CARAPACE_BROKER_FD:-unset} listen=${CARAPACE_LISTEN_FD:-unset}\"; \
                  for f in 3 4 5 6 7 8 9 10 11 12; do [ -e /proc/self/fd/$f ] && echo \"open=$f\"; done; \
                  exec /usr/bin/python3 -c 'import socket,os; s=socket.socket(fileno=int(os.environ[\"CARAPACE_LISTEN_FD\"])); c,_=s.accept(); c.sendall(b\"accepted-on-4\"); c.close()'";
    for broker in [false, true] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = LaunchOptions {
            program: opened("/usr/bin/sh"),
            argv0: OsString::from("sh"),
            args: vec![OsString::from("-c"), OsString::from(script)],
            workspace: Some(ws.to_path_buf()),
            privilege: Privilege::of_this_process(),
            run_as: RunAs::Fixed(HostIds::NOBODY),
            env: vec![],
            broker,
            listener: true,
            supervisor_env: Vec::new(),
        };
        let launch = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap();
        assert!(launch.listens());
        assert_eq!(launch.rootless(), rootless);
        assert!(launch
            .env()
            .any(|e| e.to_bytes() == b"CARAPACE_LISTEN_FD=4"));
        let out = Pipe::new("stdout").unwrap();
        let mut sp = [0; 2];
        // SAFETY: `sp` is a valid array of two ints for socketpair to fill.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sp.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: socketpair succeeded: both fds are ours alone.
        let (_mine, theirs) = unsafe { (OwnedFd::from_raw_fd(sp[0]), OwnedFd::from_raw_fd(sp[1])) };
        let io = ChildIo {
            stdout: Some(out.write.as_fd()),
            broker: broker.then(|| theirs.as_fd()),
            listener: Some(listener.as_fd()),
            ..ChildIo::default()
        };
        // Prepared with a listener, spawned without: refused (and the other way round).
        let without = ChildIo {
            listener: None,
            ..io
        };
        assert!(launch.spawn_with(None, without).is_err());
        let no_listener = LaunchOptions {
            listener: false,
            ..opts.clone()
        };
        let other = Launch::prepare(&hand_plan(), &no_listener, landlock::probe_abi()).unwrap();
        assert!(!other.listens());
        let e = other.spawn_with(None, io).unwrap_err();
        assert!(e.to_string().contains("listening socket"), "{e}");
        let launch = Launch::prepare(&hand_plan(), &opts, landlock::probe_abi()).unwrap();
        let running = launch.spawn_with(None, io).unwrap();
        drop(out.write);
        drop(theirs);
        // The supervisor keeps its copy (it would hand it to the next incarnation); the
        // connection is accepted by the sandboxed program.
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        let report = running.wait(Some(Duration::from_secs(30)), None).unwrap();
        let mut stdout = String::new();
        std::fs::File::from(out.read)
            .read_to_string(&mut stdout)
            .unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?} {stdout}");
        assert_eq!(got, "accepted-on-4");
        if broker {
            assert_eq!(stdout, "broker=3 listen=4\nopen=3\nopen=4\n");
        } else {
            assert_eq!(stdout, "broker=unset listen=4\nopen=4\n");
        }
    }
}

/// The filters the kernel has attached to `pid`, newest first, read back with
/// `PTRACE_SECCOMP_GET_FILTER` (root: CAP_SYS_ADMIN, and this process under no filter). The
/// process is seized, stopped for the reading and detached again.
fn attached_filters(pid: libc::pid_t) -> Result<Vec<Vec<carapace_policy::plan::BpfInsn>>, String> {
    // linux/ptrace.h; the libc crate does not name it for every target.
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    let null = std::ptr::null_mut::<libc::c_void>();
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace requests on a pid with integer or null arguments; nothing is written.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) } != 0 {
        return Err(err("PTRACE_SEIZE"));
    }
    // SAFETY: as above, on the process we just seized.
    if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) } != 0 {
        return Err(err("PTRACE_INTERRUPT"));
    }
    let mut status = 0;
    // SAFETY: waiting for the stop of a process we trace, into a local.
    if unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } != pid {
        return Err(err("waitpid"));
    }
    let mut filters = Vec::new();
    let read = (0..).try_for_each(|index: usize| -> Result<(), Option<String>> {
        // SAFETY: with a null buffer the kernel only returns the filter's length.
        let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, null) };
        if n < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOENT) => Err(None), // past the oldest filter
                _ => Err(Some(err("PTRACE_SECCOMP_GET_FILTER"))),
            };
        }
        let mut buf = vec![
            libc::sock_filter {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            n as usize
        ];
        // SAFETY: `buf` has room for the `n` instructions the kernel said the filter has.
        let m = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, buf.as_mut_ptr()) };
        if m != n {
            return Err(Some(err("PTRACE_SECCOMP_GET_FILTER (copy)")));
        }
        filters.push(
            buf.iter()
                .map(|i| carapace_policy::plan::BpfInsn {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        );
        Ok(())
    });
    // SAFETY: detaching the process we stopped; it runs on.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) };
    match read {
        Err(Some(e)) => Err(e),
        _ => Ok(filters),
    }
}

/// The kernel's seccomp action cache applies to a real confined program. The filters attached
/// to it, read back from the kernel, are exactly one: the plan's (the init's own filter is
/// installed after the fork, the set-id guard is inside the plan's program). Run through the
/// kernel's cache emulation (`carapace_policy::kernel_caches_allow_stack`, a port of
/// `seccomp_cache_prepare_bitmap`/`seccomp_is_const_allow`), that stack lets `read`, `write`
/// and every syscall the default tool profile allows without conditions through from the
/// cache, and runs the filter for the ones with argument checks. A second filter stacked on
/// the program, or a filter that loads an argument before deciding, fails here.
#[test]
fn the_kernels_seccomp_cache_answers_the_confined_programs_plain_syscalls() {
    if !require_root() {
        return;
    }
    let policy = carapace_policy::Policy::parse(
        include_str!("../../policies/default.toml"),
        "policies/default.toml",
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let tool = policy
        .compile(
            "tool",
            &carapace_policy::Target {
                landlock_abi: landlock::probe_abi(),
            },
        )
        .unwrap_or_else(|d| panic!("{d}"));
    let mut plan = hand_plan();
    plan.seccomp = tool.seccomp.clone();
    let ws = workspace(0, 0);
    let run = Run {
        name: "test".to_string(),
        landlock_abi: landlock::probe_abi(),
        options: LaunchOptions {
            program: opened("/usr/bin/sleep"),
            argv0: OsString::from("/usr/bin/sleep"),
            args: vec![OsString::from("30")],
            workspace: Some(ws.path().to_path_buf()),
            privilege: Privilege::of_this_process(),
            run_as: RunAs::Fixed(HostIds::NOBODY),
            env: Vec::new(),
            broker: false,
            listener: false,
            supervisor_env: Vec::new(),
        },
    };
    let started = run::start(plan.clone(), &run, ChildIo::default()).expect("confined sleep");
    let init = started.pid();
    // The program: the init's child, once it has executed sleep (seccomp is installed right
    // before execveat, so from then on its filters are final).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let program = loop {
        let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .unwrap_or_default();
        let sleeping = children
            .split_whitespace()
            .filter_map(|w| w.parse::<libc::pid_t>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            });
        if let Some(p) = sleeping {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the confined sleep never started (init {init})"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let filters = attached_filters(program);
    // SAFETY: kill with a pid we found and a constant signal.
    unsafe { libc::kill(program, libc::SIGKILL) };
    let mut ended = started.wait();
    ended.remove_cgroup().expect("the run's cgroup is removed");
    let filters = filters.unwrap_or_else(|e| panic!("reading the program's filters: {e}"));
    assert_eq!(
        filters.len(),
        1,
        "filters stacked on the program: {}",
        filters.len()
    );
    assert_eq!(
        filters[0], plan.seccomp.program,
        "the attached filter is not the plan's"
    );
    let stack: Vec<&[carapace_policy::plan::BpfInsn]> = filters.iter().map(Vec::as_slice).collect();
    let nr = |name: &str| {
        let n = carapace_policy::tables::syscall_nr(name).unwrap_or_else(|| panic!("{name}"));
        u32::try_from(n).unwrap()
    };
    assert!(tool.seccomp.allowed.iter().any(|a| a == "read"));
    for name in ["read", "write"]
        .into_iter()
        .chain(tool.seccomp.allowed.iter().map(String::as_str))
    {
        assert!(
            carapace_policy::kernel_caches_allow_stack(&stack, nr(name)),
            "{name}: the kernel runs the filter on every call"
        );
    }
    assert!(!tool.seccomp.conditional.is_empty());
    for c in &tool.seccomp.conditional {
        assert!(
            !carapace_policy::kernel_caches_allow_stack(&stack, nr(&c.syscall)),
            "{}: its argument check would be skipped",
            c.syscall
        );
    }
}
