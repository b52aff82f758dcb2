use std::fs;
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_tests::*;

/// Run a control whose success depends on what this host offers; report, do not assert.
fn control_info(e: &Escape, mut cmd: Command, why: &str) -> Outcome {
    let o = run(&mut cmd, Duration::from_secs(60));
    if !o.escaped() {
        eprintln!(
            "CONTROL inconclusive on this host ({why}): {}",
            o.verdict_line().unwrap_or("no verdict")
        );
    }
    let _ = e;
    o
}

macro_rules! simple {
    ($(#[doc = $d:literal])* $test:ident, $attack:literal) => {
        $(#[doc = $d])*
        #[test]
        fn $test() {
            let Some(e) = esc() else { return };
            e.control_escapes(e.host($attack, &[]));
            e.confined_blocked(e.confined($attack, &[]), &[SIGSYS]);
        }
    };
}

/// The escape context of this crate's mode (root or rootless) and base profile.
fn esc() -> Option<Escape> {
    Escape::on(MODE, BASE)
}

/// Whether the base profile lets programs written to the workspace and /tmp run (the build
/// profile's one relaxation, docs/threat-model.md "Relaxing W^X"). There the attacks below
/// must *succeed* in those two places, and nowhere else: that pins the relaxation to exactly
/// what the profile says.
const WRITTEN_CODE_RUNS: bool = matches!(BASE.as_bytes(), b"build");

/// Run an attack that executes code it wrote into `dir`: blocked in the strict profile; in the
/// build profile (workspace and /tmp only) it runs, confined like everything else.
fn written_code(e: &Escape, attack: &str, dir: &str) {
    if WRITTEN_CODE_RUNS && (dir == WS || dir == "/tmp") {
        let o = run(&mut e.confined(attack, &[dir]), Duration::from_secs(90));
        eprintln!("CONFINED: {}", o.verdict_line().unwrap_or("(no verdict)"));
        assert!(
            o.escaped(),
            "the {} profile makes {dir} executable by design: the written program must run \
             there (if it no longer does, the profile or docs/threat-model.md is wrong):\n{}",
            e.base,
            o.describe()
        );
    } else {
        e.confined_blocked(e.confined(attack, &[dir]), &[SIGSYS]);
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn remove_if_exists(p: &Path) -> bool {
    let existed = fs::symlink_metadata(p).is_ok();
    let _ = fs::remove_file(p);
    existed
}

// ------------------------------------------------------------------------------------------
// Reading host files

simple!(
    /// /etc/shadow is not in the sandbox's root, also not via /proc/{self,1}/root.
    escape_read_etc_shadow,
    "read_shadow"
);

fn read_planted_secret(dir: &Path) {
    let Some(e) = esc() else { return };
    let d = dir.join(unique("carapace-secret"));
    let f = d.join("secret");
    let secret = e.plant_secret(&f);
    let (f_s, sec) = (s(&f), secret.clone());
    let guard = scopeguard(d.clone());
    e.control_escapes(e.host("read_secret", &[&f_s, &sec]));
    e.confined_blocked(e.confined("read_secret", &[&f_s, &sec]), &[SIGSYS]);
    drop(guard);
}

/// Removes a host directory when dropped (also when the test panics).
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(p: PathBuf) -> DirGuard {
    DirGuard(p)
}

/// A secret planted under /root is invisible.
#[test]
fn escape_read_root_home() {
    read_planted_secret(Path::new("/root"));
}

/// A secret planted under /home is invisible.
#[test]
fn escape_read_home() {
    if !Path::new("/home").is_dir() {
        let _ = fs::create_dir("/home");
    }
    read_planted_secret(Path::new("/home"));
}

/// The supervisor's environment (holding SECRET_TOKEN) cannot be read via /proc/N/environ.
#[test]
fn escape_read_supervisor_environ() {
    let Some(e) = esc() else { return };
    let secret = unique("CARAPACE-SECRET");
    let mut h = e.host("proc_environ", &[&secret]);
    h.env("SECRET_TOKEN", &secret);
    e.control_escapes(h);
    let mut c = e.confined("proc_environ", &[&secret]);
    c.env("SECRET_TOKEN", &secret);
    e.confined_blocked(c, &[SIGSYS]);
}

/// A host process (the marker) is invisible in the sandbox's /proc.
#[test]
fn escape_read_host_proc_of_marker() {
    let Some(e) = esc() else { return };
    let m = e.marker();
    let pid = m.pid.to_string();
    let rev: String = m.token.chars().rev().collect();
    e.control_escapes(e.host("proc_marker", &[&pid, &rev]));
    e.confined_blocked(e.confined("proc_marker", &[&pid, &rev]), &[SIGSYS]);
}

/// `..` from the workspace root (path, openat on a workspace fd, cwd, /proc/self/cwd) does not
/// reach the host directory that holds the workspace.
#[test]
fn escape_dotdot_out_of_workspace() {
    let Some(e) = esc() else { return };
    let parent = e.scratch.path();
    let ws = parent.join("ws");
    fs::create_dir(&ws).unwrap_or_else(|x| panic!("{x}"));
    e.give(&ws);
    let secret = e.plant_secret(&parent.join("secret"));
    e.control_escapes(e.host("dotdot", &[&s(&ws), "secret", &secret]));
    let c = e.carapace_in(&ws, &[], &e.attacks.bin, &["dotdot", WS, "secret", &secret]);
    e.confined_blocked(c, &[SIGSYS]);
}

/// /proc/self/root, /proc/1/root, /proc/self/cwd/../.. lead to the sandbox root only.
#[test]
fn escape_proc_self_root_and_cwd() {
    let Some(e) = esc() else { return };
    let f = e.scratch.path().join("secret");
    let secret = e.plant_secret(&f);
    e.control_escapes(e.host("proc_root", &[&s(&f), &secret]));
    e.confined_blocked(e.confined("proc_root", &[&s(&f), &secret]), &[SIGSYS]);
}

/// Symlinks planted in the workspace by the host (absolute, relative `..`, to /etc/shadow)
/// resolve inside the sandbox's root.
#[test]
fn escape_symlink_planted_in_workspace() {
    let Some(e) = esc() else { return };
    let f = e.scratch.path().join("secret");
    let secret = e.plant_secret(&f);
    let rel = format!(
        "../{}/secret",
        e.scratch
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
    );
    std::os::unix::fs::symlink(&f, e.ws().join("abs")).unwrap_or_else(|x| panic!("{x}"));
    std::os::unix::fs::symlink(&rel, e.ws().join("rel")).unwrap_or_else(|x| panic!("{x}"));
    std::os::unix::fs::symlink("/etc/shadow", e.ws().join("shadow"))
        .unwrap_or_else(|x| panic!("{x}"));
    e.control_escapes(e.host("symlink_planted", &[&s(e.ws()), &secret]));
    e.confined_blocked(e.confined("symlink_planted", &[WS, &secret]), &[SIGSYS]);
}

/// Symlinks the attacker creates in the workspace do not lead out either.
#[test]
fn escape_symlink_created_in_workspace() {
    let Some(e) = esc() else { return };
    let f = e.scratch.path().join("secret");
    let secret = e.plant_secret(&f);
    let ctl = e.scratch.path().join("ctl");
    fs::create_dir(&ctl).unwrap_or_else(|x| panic!("{x}"));
    e.control_escapes(e.host("symlink_created", &[&s(&ctl), &s(&f), &secret]));
    e.confined_blocked(
        e.confined("symlink_created", &[WS, &s(&f), &secret]),
        &[SIGSYS],
    );
}

/// A read-only host file (the attack binary, same host filesystem as the workspace) cannot be
/// hard-linked into the writable workspace (which would make it writable).
#[test]
fn escape_hardlink_host_file_into_workspace() {
    let Some(e) = esc() else { return };
    let bin = s(&e.attacks.bin);
    // Control: the scratch dir is on the same filesystem as /var/tmp on the build machines.
    e.control_escapes(e.host("hardlink", &[&bin, &s(e.scratch.path())]));
    e.confined_blocked(e.confined("hardlink", &[&bin, WS]), &[SIGSYS]);
    let ino = fs::metadata(&e.attacks.bin).map(|m| m.ino()).unwrap_or(0);
    let linked = fs::metadata(e.ws().join("hardlink")).map(|m| m.ino()).ok();
    assert_ne!(
        linked,
        Some(ino),
        "HOST CHECK: a hard link to the host file exists in the workspace"
    );
}

// ------------------------------------------------------------------------------------------
// Writing outside the workspace

fn write_outside(dir: &str) {
    let Some(e) = esc() else { return };
    let target = PathBuf::from(dir).join(unique("carapace-escape"));
    let t = s(&target);
    e.control_escapes(e.host("write_file", &[&t]));
    assert!(remove_if_exists(&target), "control did not create {t}");
    e.confined_blocked(e.confined("write_file", &[&t]), &[SIGSYS]);
    assert!(
        !remove_if_exists(&target),
        "HOST CHECK: {t} was created on the host by the sandbox"
    );
}

/// Creating a file in /usr fails (read-only bind, Landlock).
#[test]
fn escape_write_usr() {
    write_outside("/usr");
}

/// Creating a file in /etc fails (not even mounted).
#[test]
fn escape_write_etc() {
    write_outside("/etc");
}

/// The sandbox's /tmp is a private tmpfs: a canary in the host /tmp is invisible and a file the
/// sandbox writes to /tmp never appears on the host.
#[test]
fn escape_write_host_tmp() {
    let Some(e) = esc() else { return };
    let canary = PathBuf::from("/tmp").join(unique("carapace-canary"));
    fs::write(&canary, "canary").unwrap_or_else(|x| panic!("{x}"));
    let target = PathBuf::from("/tmp").join(unique("carapace-escape"));
    let (c, t) = (s(&canary), s(&target));
    e.control_escapes(e.host("write_host_tmp", &[&c, &t]));
    assert!(remove_if_exists(&target));
    e.confined_blocked(e.confined("write_host_tmp", &[&c, &t]), &[SIGSYS]);
    let _ = fs::remove_file(&canary);
    assert!(
        !remove_if_exists(&target),
        "HOST CHECK: the sandbox wrote {t} into the host's /tmp"
    );
}

/// A world-writable host file inside a read-only mount cannot be opened for writing, neither
/// directly nor by re-opening an O_RDONLY / O_PATH fd through /proc/self/fd.
#[test]
fn escape_reopen_readonly_file_for_write() {
    let Some(e) = esc() else { return };
    let t = s(&e.attacks.rw_target);
    e.control_escapes(e.host("reopen_rw", &[&t]));
    e.confined_blocked(e.confined("reopen_rw", &[&t]), &[SIGSYS]);
    assert_eq!(
        fs::read_to_string(&e.attacks.rw_target).unwrap_or_default(),
        "ORIGINAL\n",
        "HOST CHECK: the read-only target changed"
    );
}

/// runc CVE-2019-5736: the supervisor's binary is unreachable (by path, as any /proc/N/exe) and
/// /proc/self/exe cannot be opened for writing.
#[test]
fn escape_proc_self_exe_supervisor_binary() {
    let Some(e) = esc() else { return };
    let bin = carapace_bin();
    let md = fs::metadata(bin).unwrap_or_else(|x| panic!("{x}"));
    let (b, dev, ino) = (s(bin), md.dev().to_string(), md.ino().to_string());
    let before = fs::read(bin).unwrap_or_default();
    e.control_escapes(e.host("proc_self_exe", &[&b, &dev, &ino]));
    e.confined_blocked(e.confined("proc_self_exe", &[&b, &dev, &ino]), &[SIGSYS]);
    assert!(
        fs::read(bin).unwrap_or_default() == before,
        "HOST CHECK: the carapace binary changed"
    );
}

/// runc CVE-2024-21626: a directory fd inherited by carapace (fd 7 on a host directory holding
/// a secret) and carapace's own cwd (that same directory) are useless inside.
#[test]
fn escape_leaked_dirfd_as_cwd() {
    let Some(e) = esc() else { return };
    let secret = e.plant_secret(&e.scratch.path().join("secret"));
    let dir = fs::File::open(e.scratch.path()).unwrap_or_else(|x| panic!("{x}"));
    let mut h = e.host("leaked_dirfd", &["secret", &secret]);
    pass_fd(&mut h, dir.as_raw_fd(), 7);
    h.current_dir(e.ws());
    e.control_escapes(h);
    let mut c = e.confined("leaked_dirfd", &["secret", &secret]);
    pass_fd(&mut c, dir.as_raw_fd(), 7);
    c.current_dir(e.scratch.path());
    e.confined_blocked(c, &[SIGSYS]);
}

/// Only fds 0, 1, 2 reach the program, even when carapace itself inherited more (bubblewrap
/// passes every inherited fd).
#[test]
fn escape_leaked_fds() {
    let Some(e) = esc() else { return };
    let f = e.scratch.path().join("secret");
    e.plant_secret(&f);
    let file = fs::File::open(&f).unwrap_or_else(|x| panic!("{x}"));
    let mut h = e.host("leaked_fds", &[]);
    pass_fd(&mut h, file.as_raw_fd(), 5);
    e.control_escapes(h);
    let mut c = e.confined("leaked_fds", &[]);
    pass_fd(&mut c, file.as_raw_fd(), 5);
    pass_fd(&mut c, file.as_raw_fd(), 9);
    e.confined_blocked(c, &[SIGSYS]);
}

/// carapace's environment (SECRET_TOKEN) does not reach the program.
#[test]
fn escape_leaked_environment() {
    let Some(e) = esc() else { return };
    let secret = unique("CARAPACE-SECRET");
    let mut h = e.host("leaked_env", &["SECRET_TOKEN", &secret]);
    h.env("SECRET_TOKEN", &secret);
    e.control_escapes(h);
    let mut c = e.confined("leaked_env", &["SECRET_TOKEN", &secret]);
    c.env("SECRET_TOKEN", &secret)
        .env("AWS_SECRET_ACCESS_KEY", &secret);
    e.confined_blocked(c, &[SIGSYS]);
}

/// "Shocker": a forged file handle for the filesystem root opened with open_by_handle_at.
#[test]
fn escape_open_by_handle_at() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("open_by_handle", &[&s(e.scratch.path())]));
    e.confined_blocked(e.confined("open_by_handle", &[WS]), &[SIGSYS]);
}

/// A device node (host root disk, /dev/mem) cannot be created in the workspace (CAP_MKNOD).
#[test]
fn escape_mknod_host_disk() {
    let Some(e) = esc() else { return };
    let (maj, min) = dev_major_minor(Path::new("/"));
    let (maj, min) = (maj.to_string(), min.to_string());
    e.control_escapes(e.host("mknod", &[&s(e.scratch.path()), &maj, &min]));
    e.confined_blocked(e.confined("mknod", &[WS, &maj, &min]), &[SIGSYS]);
    for n in ["disk", "mem"] {
        assert!(
            fs::symlink_metadata(e.ws().join(n)).is_err(),
            "HOST CHECK: a device node was left in the workspace"
        );
    }
}

/// Raw host devices (/dev/vda, /dev/mem, /dev/kmsg, /dev/port) are not in the minimal /dev.
#[test]
fn escape_raw_host_devices() {
    let Some(e) = esc() else { return };
    let devs = [
        "/dev/vda",
        "/dev/sda",
        "/dev/nvme0n1",
        "/dev/mem",
        "/dev/kmsg",
        "/dev/port",
    ];
    e.control_escapes(e.host("dev_disk", &devs));
    e.confined_blocked(e.confined("dev_disk", &devs), &[SIGSYS]);
}

/// Files the sandbox creates land owned by the workspace owner (root here): a setuid/setgid bit
/// on one would plant a set-uid-root program on the host.
#[test]
fn escape_setuid_plant_in_workspace() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("setuid_plant", &[&s(e.scratch.path())]));
    let o = run(
        &mut e.confined("setuid_plant", &[WS]),
        Duration::from_secs(60),
    );
    // HOST CHECK first: whatever the attack printed, no set-id file may exist on the host.
    let mut bad = Vec::new();
    if let Ok(rd) = fs::read_dir(e.ws()) {
        for f in rd.flatten() {
            if let Ok(m) = f.metadata() {
                if m.permissions().mode() & 0o6000 != 0 {
                    bad.push(format!(
                        "{} mode {:o} uid {}",
                        f.path().display(),
                        m.permissions().mode(),
                        m.uid()
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "HOST CHECK: set-id file(s) planted in the host workspace: {bad:?}\n{}",
        o.describe()
    );
    assert_confined_blocked(&o, &[SIGSYS]);
}

simple!(
    /// /proc/sys (core_pattern, modprobe, binfmt_misc, hostname...) cannot be opened for writing.
    escape_proc_sys_write,
    "proc_sys_write"
);

/// /proc/sysrq-trigger cannot be opened for writing.
#[test]
fn escape_proc_sysrq_trigger() {
    let Some(e) = esc() else { return };
    if Path::new("/proc/sysrq-trigger").exists() {
        e.control_escapes(e.host("sysrq", &[]));
    } else {
        control_info(
            &e,
            e.host("sysrq", &[]),
            "kernel without CONFIG_MAGIC_SYSRQ",
        );
    }
    e.confined_blocked(e.confined("sysrq", &[]), &[SIGSYS]);
}

simple!(
    /// /sys is absent or read-only (tunables, cgroup files, release_agent, block queues).
    escape_sys_write,
    "sys_write"
);

/// chroot needs CAP_SYS_CHROOT (first step of the chroot-in-chroot escape).
#[test]
fn escape_chroot() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("chroot", &[&s(e.scratch.path())]));
    e.confined_blocked(e.confined("chroot", &[WS]), &[SIGSYS]);
}

// ------------------------------------------------------------------------------------------
// Executing written code

/// A binary written to the workspace cannot be executed (noexec, Landlock without EXECUTE).
#[test]
fn escape_exec_from_workspace() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("exec_copy", &[&s(e.scratch.path())]));
    written_code(&e, "exec_copy", WS);
}

/// ... nor from /tmp.
#[test]
fn escape_exec_from_tmp() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("exec_copy", &[&s(e.scratch.path())]));
    written_code(&e, "exec_copy", "/tmp");
}

/// ... nor from /dev/shm (a real, writable tmpfs in the sandbox: the copy succeeds and the
/// exec is what fails).
#[test]
fn escape_exec_from_dev_shm() {
    let Some(e) = esc() else { return };
    let d = PathBuf::from("/dev/shm").join(unique("carapace"));
    let _g = scopeguard(d.clone());
    fs::create_dir_all(&d).unwrap_or_else(|x| panic!("{x}"));
    e.control_escapes(e.host("exec_copy", &[&s(&d)]));
    let o = e.confined_blocked(e.confined("exec_copy", &["/dev/shm"]), &[SIGSYS]);
    let v = o.verdict_line().unwrap_or_default();
    assert!(
        v.contains("execve /dev/shm/evil"),
        "the attack did not get to exec (no writable /dev/shm?): {}",
        o.describe()
    );
}

simple!(
    /// Fileless exec: memfd_create + fexecve.
    escape_exec_memfd_fexecve,
    "exec_memfd"
);

simple!(
    /// Fileless exec: memfd_create + execveat(fd, "", AT_EMPTY_PATH).
    escape_exec_memfd_execveat,
    "exec_memfd_execveat"
);

/// Code written to the workspace cannot be mapped PROT_EXEC.
#[test]
fn escape_mmap_exec_workspace_file() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("mmap_exec", &[&s(e.scratch.path())]));
    written_code(&e, "mmap_exec", WS);
}

/// A dynamic program copied into the workspace cannot be run through ld.so either.
#[test]
fn escape_exec_via_dynamic_loader() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("exec_ldso", &[&s(e.scratch.path())]));
    written_code(&e, "exec_ldso", WS);
}

// ------------------------------------------------------------------------------------------
// Network

/// Collects what a listener receives.
type Got = Arc<Mutex<Vec<String>>>;

fn tcp_sink(l: TcpListener) -> Got {
    let got: Got = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 256];
            let n = c.read(&mut b).unwrap_or(0);
            if let Ok(mut v) = g.lock() {
                v.push(String::from_utf8_lossy(&b[..n]).into_owned());
            }
        }
    });
    got
}

fn unix_sink(l: UnixListener) -> Got {
    let got: Got = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 256];
            let n = c.read(&mut b).unwrap_or(0);
            if let Ok(mut v) = g.lock() {
                v.push(String::from_utf8_lossy(&b[..n]).into_owned());
            }
        }
    });
    got
}

fn received(g: &Got) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(300));
    g.lock().map(|v| v.clone()).unwrap_or_default()
}

/// Wait (up to 3 s) until the control's token arrived, then forget everything received.
fn control_received_then_clear(g: &Got, token: &str) {
    for _ in 0..300 {
        if g.lock()
            .map(|v| v.iter().any(|t| t.contains(token)))
            .unwrap_or(false)
        {
            clear(g);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("CONTROL: the host listener never received the token {token}");
}

fn clear(g: &Got) {
    if let Ok(mut v) = g.lock() {
        v.clear();
    }
}

fn tcp_attack(bind: &str, connect_to: &str) {
    let Some(e) = esc() else { return };
    let l = TcpListener::bind(bind).unwrap_or_else(|x| panic!("bind {bind}: {x}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0).to_string();
    let got = tcp_sink(l);
    let token = unique("CARAPACE-NET");
    e.control_escapes(e.host("tcp4", &[connect_to, &port, &token]));
    control_received_then_clear(&got, &token);
    e.confined_blocked(e.confined("tcp4", &[connect_to, &port, &token]), &[SIGSYS]);
    let r = received(&got);
    assert!(
        r.is_empty(),
        "HOST CHECK: the host listener got connections: {r:?}"
    );
}

/// TCP to a listener on the host's loopback.
#[test]
fn escape_tcp_connect_host_loopback() {
    tcp_attack("127.0.0.1:0", "127.0.0.1");
}

fn host_ipv4() -> Option<String> {
    let o = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    let w: Vec<&str> = t.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "inet")?;
    Some(w.get(i + 1)?.split('/').next()?.to_string())
}

/// TCP to a listener on the host's own global address.
#[test]
fn escape_tcp_connect_host_address() {
    let addr = host_ipv4().unwrap_or_else(|| "127.0.0.1".into());
    tcp_attack("0.0.0.0:0", &addr);
}

/// IPv6 TCP to [::1].
#[test]
fn escape_tcp6_connect_host_loopback() {
    let Some(e) = esc() else { return };
    let token = unique("CARAPACE-NET");
    match TcpListener::bind("[::1]:0") {
        Ok(l) => {
            let port = l.local_addr().map(|a| a.port()).unwrap_or(0).to_string();
            let got = tcp_sink(l);
            e.control_escapes(e.host("tcp6", &[&port, &token]));
            control_received_then_clear(&got, &token);
            e.confined_blocked(e.confined("tcp6", &[&port, &token]), &[SIGSYS]);
            assert!(
                received(&got).is_empty(),
                "HOST CHECK: [::1] listener got a connection"
            );
        }
        Err(x) => {
            eprintln!("CONTROL impossible: no IPv6 loopback on this host ({x}); confined run only");
            e.confined_blocked(e.confined("tcp6", &["9", &token]), &[SIGSYS]);
        }
    }
}

/// UDP datagrams to a host socket never arrive.
#[test]
fn escape_udp_send_host_loopback() {
    let Some(e) = esc() else { return };
    let u = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|x| panic!("{x}"));
    u.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap_or_else(|x| panic!("{x}"));
    let port = u.local_addr().map(|a| a.port()).unwrap_or(0).to_string();
    let token = unique("CARAPACE-NET");
    e.control_escapes(e.host("udp4", &["127.0.0.1", &port, &token]));
    let mut b = [0u8; 256];
    let n = u.recv(&mut b).unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&b[..n]).contains(&token),
        "control: datagram not received"
    );
    e.confined_blocked(e.confined("udp4", &["127.0.0.1", &port, &token]), &[SIGSYS]);
    let n = u.recv(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "HOST CHECK: a datagram from the sandbox arrived");
}

/// A host unix socket by path (in the host /tmp and in /run) is unreachable.
#[test]
fn escape_unix_socket_path() {
    let Some(e) = esc() else { return };
    for dir in ["/tmp", "/run"] {
        if !Path::new(dir).is_dir() {
            continue;
        }
        let p = PathBuf::from(dir).join(format!("{}.sock", unique("carapace")));
        let l = UnixListener::bind(&p).unwrap_or_else(|x| panic!("bind {}: {x}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|x| panic!("{x}"));
        let got = unix_sink(l);
        let token = unique("CARAPACE-NET");
        e.control_escapes(e.host("unix_path", &[&s(&p), &token]));
        control_received_then_clear(&got, &token);
        let o = e.confined_blocked(e.confined("unix_path", &[&s(&p), &token]), &[SIGSYS]);
        let r = received(&got);
        let _ = fs::remove_file(&p);
        assert!(
            r.is_empty(),
            "HOST CHECK: {} got a connection: {r:?}\n{}",
            p.display(),
            o.describe()
        );
    }
}

/// A host abstract unix socket is unreachable (network namespace; Landlock scope).
#[test]
fn escape_unix_socket_abstract() {
    let Some(e) = esc() else { return };
    let name = unique("carapace-abstract");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap_or_else(|x| panic!("{x}"));
    let l = UnixListener::bind_addr(&addr).unwrap_or_else(|x| panic!("{x}"));
    let got = unix_sink(l);
    let token = unique("CARAPACE-NET");
    e.control_escapes(e.host("unix_abstract", &[&name, &token]));
    control_received_then_clear(&got, &token);
    e.confined_blocked(e.confined("unix_abstract", &[&name, &token]), &[SIGSYS]);
    let r = received(&got);
    assert!(
        r.is_empty(),
        "HOST CHECK: the abstract listener got a connection: {r:?}"
    );
}

simple!(
    /// Raw IP sockets.
    escape_raw_socket,
    "raw"
);
simple!(
    /// AF_PACKET sockets.
    escape_packet_socket,
    "packet"
);
simple!(
    /// Netlink sockets (route, uevent, audit, netfilter).
    escape_netlink_socket,
    "netlink"
);
simple!(
    /// AF_VSOCK to the hypervisor host (this machine is a VM).
    escape_vsock_socket,
    "vsock"
);
simple!(
    /// Every non-unix address family (inet, inet6, netlink, packet, vsock, alg, key, xdp, ...).
    escape_socket_families,
    "socket_other"
);

/// Python's socket.create_connection to a host listener.
#[test]
fn escape_python_tcp_connect() {
    let Some(e) = esc() else { return };
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|x| panic!("{x}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0).to_string();
    let got = tcp_sink(l);
    let token = unique("CARAPACE-NET");
    let script = s(&e.attacks.py_dir.join("attack.py"));
    let mut h = Command::new("/usr/bin/python3");
    h.args([&script, "inet", "127.0.0.1", &port, &token]);
    e.control_escapes(h);
    control_received_then_clear(&got, &token);
    let c = e.carapace(
        &[],
        "/usr/bin/python3",
        &[&script, "inet", "127.0.0.1", &port, &token],
    );
    e.confined_blocked(c, &[SIGSYS]);
    assert!(
        received(&got).is_empty(),
        "HOST CHECK: listener got a connection"
    );
}

/// Python ctypes: unshare(CLONE_NEWUSER|CLONE_NEWNS) and mount through libc.
#[test]
fn escape_python_ctypes_unshare_mount() {
    let Some(e) = esc() else { return };
    let script = s(&e.attacks.py_dir.join("attack.py"));
    let mut h = Command::new("/usr/bin/python3");
    h.args([&script, "ctypes_unshare"]);
    e.control_escapes(h);
    let c = e.carapace(&[], "/usr/bin/python3", &[&script, "ctypes_unshare"]);
    e.confined_blocked(c, &[SIGSYS]);
}

// ------------------------------------------------------------------------------------------
// Other processes

/// ptrace of a host process (running as the sandbox's own host uid).
#[test]
fn escape_ptrace_host_process() {
    let Some(e) = esc() else { return };
    let mut m = e.marker();
    let pid = m.pid.to_string();
    e.control_escapes(e.host("ptrace", &[&pid]));
    e.confined_blocked(e.confined("ptrace", &[&pid]), &[SIGSYS]);
    assert!(m.alive(), "HOST CHECK: the marker died");
}

/// process_vm_readv of a host process's memory.
#[test]
fn escape_process_vm_readv_host_process() {
    let Some(e) = esc() else { return };
    let m = e.marker();
    let pid = m.pid.to_string();
    e.control_escapes(e.host("pvm_read", &[&pid, &m.addr, &m.token]));
    e.confined_blocked(
        e.confined("pvm_read", &[&pid, &m.addr, &m.token]),
        &[SIGSYS],
    );
}

/// kill(SIGKILL) of a host process (control uses signal 0).
#[test]
fn escape_kill_host_process() {
    let Some(e) = esc() else { return };
    let mut m = e.marker();
    let pid = m.pid.to_string();
    e.control_escapes(e.host("kill", &[&pid, "0"]));
    e.confined_blocked(e.confined("kill", &[&pid, "9"]), &[SIGSYS]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        m.alive(),
        "HOST CHECK: the marker was killed from the sandbox"
    );
}

/// kill(-1, SIGKILL). No control: on the host it would signal every process of that uid.
#[test]
fn escape_kill_all_processes() {
    let Some(e) = esc() else { return };
    let mut m = e.marker();
    e.confined_blocked(e.confined("kill_all", &[]), &[SIGSYS]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        m.alive(),
        "HOST CHECK: the marker (same host uid) was killed by kill(-1)"
    );
}

/// pidfd_open / pidfd_send_signal / pidfd_getfd on a host process.
#[test]
fn escape_pidfd_host_process() {
    let Some(e) = esc() else { return };
    let mut m = e.marker();
    let pid = m.pid.to_string();
    e.control_escapes(e.host("pidfd", &[&pid]));
    e.confined_blocked(e.confined("pidfd", &[&pid]), &[SIGSYS]);
    assert!(m.alive(), "HOST CHECK: the marker died");
}

/// setns into a host process's namespaces via /proc/<hostpid>/ns/*.
#[test]
fn escape_setns_host_namespaces() {
    let Some(e) = esc() else { return };
    let m = e.marker();
    let pid = m.pid.to_string();
    e.control_escapes(e.host("setns", &[&pid]));
    e.confined_blocked(e.confined("setns", &[&pid]), &[SIGSYS]);
}

/// prlimit on a host process.
#[test]
fn escape_prlimit_host_process() {
    let Some(e) = esc() else { return };
    let m = e.marker();
    let pid = m.pid.to_string();
    // Control as the marker's own uid: this VM's root lacks CAP_SYS_RESOURCE, which prlimit on
    // another user's process needs; the sandbox runs as that same host uid.
    let mut h = e.host("prlimit", &[&pid]);
    h.uid(e.host_uid()).gid(e.host_uid());
    e.control_escapes(h);
    e.confined_blocked(e.confined("prlimit", &[&pid]), &[SIGSYS]);
}

/// A double-forked, setsid'd daemon ignoring SIGHUP/SIGTERM does not outlive the sandbox.
#[test]
fn escape_daemon_outlives_sandbox() {
    let Some(e) = esc() else { return };
    // Control (bounded: the daemon exits by itself after 1 s): on the host it survives.
    let o = run(
        &mut e.host("daemonize", &[&s(e.scratch.path()), "1"]),
        Duration::from_secs(10),
    );
    assert!(
        o.stdout.contains("BLOCKED daemon started"),
        "{}",
        o.describe()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        e.scratch.path().join("daemon-alive").exists(),
        "CONTROL: the daemon did not survive its parent on the host"
    );
    e.confined_blocked(e.confined("daemonize", &[WS, "2"]), &[SIGSYS]);
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !e.ws().join("daemon-alive").exists(),
        "HOST CHECK: a daemon started in the sandbox outlived it and wrote to the workspace"
    );
}

// ------------------------------------------------------------------------------------------
// Mounts and namespaces

fn mount_attack(fstype: &str, data: Option<&str>) {
    let Some(e) = esc() else { return };
    let m = e.scratch.path().join("mnt");
    let mut a = vec![fstype.to_string(), s(&m)];
    a.extend(data.map(str::to_string));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    e.control_escapes(e.host("mount", &a));
    let mut c = vec![fstype, "/workspace/mnt"];
    c.extend(data);
    e.confined_blocked(e.confined("mount", &c), &[SIGSYS]);
    let ws = s(e.ws());
    let leaked = host_mounts_with(&ws);
    assert!(
        leaked.is_empty(),
        "HOST CHECK: host mount table shows {leaked:?}"
    );
}

/// mount(tmpfs).
#[test]
fn escape_mount_tmpfs() {
    mount_attack("tmpfs", None);
}

/// mount(proc): a second procfs.
#[test]
fn escape_mount_proc() {
    mount_attack("proc", None);
}

/// mount(cgroup) for the release_agent escape (CVE-2022-0492).
#[test]
fn escape_mount_cgroup_release_agent() {
    mount_attack("cgroup", Some("pids"));
}

fn host_mount_tmpfs(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|x| panic!("{x}"));
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "carapace-test", &s(p)])
        .status();
    assert!(
        st.is_ok_and(|s| s.success()),
        "cannot mount a tmpfs for the control"
    );
}

/// umount2 of the sandbox's mounts (/, /usr, /proc, /workspace, /tmp, /dev).
#[test]
fn escape_umount() {
    let Some(e) = esc() else { return };
    let m = e.scratch.path().join("m");
    host_mount_tmpfs(&m);
    let o = run(&mut e.host("umount", &[&s(&m)]), Duration::from_secs(30));
    let _ = Command::new("umount").arg(&m).status();
    assert!(o.escaped(), "CONTROL: {}", o.describe());
    e.confined_blocked(
        e.confined("umount", &["/usr", "/proc", WS, "/tmp", "/dev", "/"]),
        &[SIGSYS],
    );
}

/// A read-only bind mount cannot be made writable (remount, mount_setattr).
#[test]
fn escape_remount_readonly_writable() {
    let Some(e) = esc() else { return };
    let m = e.scratch.path().join("ro");
    fs::create_dir_all(&m).unwrap_or_else(|x| panic!("{x}"));
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mount --bind '{0}' '{0}' && mount -o remount,bind,ro '{0}'",
            m.display()
        ))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot make a read-only bind mount for the control");
    let o = run(
        &mut e.host("remount_rw", &[&s(&m)]),
        Duration::from_secs(30),
    );
    let _ = Command::new("umount").arg(&m).status();
    assert!(o.escaped(), "CONTROL: {}", o.describe());
    e.confined_blocked(e.confined("remount_rw", &["/usr"]), &[SIGSYS]);
    let dir = s(&e.attacks.dir);
    e.confined_blocked(e.confined("remount_rw", &[&dir]), &[SIGSYS]);
}

simple!(
    /// open_tree(OPEN_TREE_CLONE) of /.
    escape_open_tree,
    "open_tree"
);
simple!(
    /// fsopen/fsmount (new mount API).
    escape_fsopen,
    "fsopen"
);

/// open_tree + move_mount onto another directory.
#[test]
fn escape_move_mount() {
    let Some(e) = esc() else { return };
    let (a, b) = (e.scratch.path().join("a"), e.scratch.path().join("b"));
    fs::create_dir_all(&a).unwrap_or_else(|x| panic!("{x}"));
    fs::create_dir_all(&b).unwrap_or_else(|x| panic!("{x}"));
    e.control_escapes(e.host("move_mount", &[&s(&a), &s(&b)]));
    e.confined_blocked(e.confined("move_mount", &[WS, "/tmp"]), &[SIGSYS]);
}

simple!(
    /// unshare(CLONE_NEWUSER).
    escape_unshare_user_namespace,
    "unshare_user"
);
simple!(
    /// clone(CLONE_NEWUSER).
    escape_clone_user_namespace,
    "clone_newuser"
);
simple!(
    /// clone3 with CLONE_NEWUSER / NEWNS|NEWNET in its memory argument.
    escape_clone3_user_namespace,
    "clone3_newuser"
);
simple!(
    /// unshare of every other namespace type.
    escape_unshare_other_namespaces,
    "unshare_other"
);

// ------------------------------------------------------------------------------------------
// Privileged / dangerous kernel interfaces

simple!(
    /// keyctl / add_key.
    escape_keyctl,
    "keyctl"
);
simple!(
    /// bpf map creation and program load.
    escape_bpf,
    "bpf"
);
simple!(
    /// perf_event_open on self.
    escape_perf_event_open,
    "perf_event"
);
simple!(
    /// userfaultfd (syscall, /dev/userfaultfd).
    escape_userfaultfd,
    "userfaultfd"
);
simple!(
    /// io_uring_setup (sockets and opens that seccomp never sees).
    escape_io_uring,
    "io_uring"
);

/// Kernel module loading (finit_module/init_module must not get past the capability check).
#[test]
fn escape_kernel_module_load() {
    let Some(e) = esc() else { return };
    control_info(
        &e,
        e.host("module", &[]),
        "kernel built without module support: ENOSYS",
    );
    e.confined_blocked(e.confined("module", &[]), &[SIGSYS]);
}

simple!(
    /// reboot(2) with bad magic: EINVAL would mean CAP_SYS_BOOT was granted.
    escape_reboot,
    "reboot"
);

/// sethostname is refused, and in any case the host's hostname is unchanged.
#[test]
fn escape_sethostname() {
    let Some(e) = esc() else { return };
    let name = "carapace-pwned";
    let before = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // Control bounded to a fresh UTS namespace (`unshare -u`) so the host's name is untouched.
    let mut h = Command::new("unshare");
    h.arg("-u").arg(&e.attacks.bin).args(["sethostname", name]);
    e.control_escapes(h);
    e.confined_blocked(e.confined("sethostname", &[name]), &[SIGSYS]);
    let after = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_eq!(before, after, "HOST CHECK: the host's hostname changed");
}

simple!(
    /// settimeofday(NULL, NULL): the CAP_SYS_TIME check without changing the clock.
    escape_settime,
    "settime"
);
simple!(
    /// syslog(READ_ALL) and /dev/kmsg.
    escape_kernel_log,
    "syslog"
);
simple!(
    /// /proc/kallsyms shows no kernel addresses.
    escape_kallsyms_addresses,
    "kallsyms"
);

/// ioperm / raw I/O ports.
#[test]
fn escape_ioperm() {
    let Some(e) = esc() else { return };
    control_info(
        &e,
        e.host("iopl", &[]),
        "kernel without CONFIG_X86_IOPL_IOPERM: ENOSYS",
    );
    e.confined_blocked(e.confined("iopl", &[]), &[SIGSYS]);
}

simple!(
    /// fanotify_init / filesystem-wide marks.
    escape_fanotify,
    "fanotify"
);
simple!(
    /// personality(READ_IMPLIES_EXEC) and ADDR_NO_RANDOMIZE.
    escape_personality_read_implies_exec,
    "personality"
);

// ------------------------------------------------------------------------------------------
// Process state

simple!(
    /// CapInh/CapPrm/CapEff/CapBnd/CapAmb all zero, NoNewPrivs 1, Seccomp 2.
    escape_capabilities_and_no_new_privs,
    "caps"
);
simple!(
    /// setresuid(0)/setresgid(0)/setgroups fail.
    escape_setuid_root,
    "setuid"
);
simple!(
    /// capset cannot raise anything (nothing permitted).
    escape_capset,
    "capset"
);

/// Hard rlimits cannot be raised.
#[test]
fn escape_rlimit_raise() {
    let Some(e) = esc() else { return };
    control_info(
        &e,
        e.host("rlimit_raise", &[]),
        "this VM's root lacks CAP_SYS_RESOURCE",
    );
    e.confined_blocked(e.confined("rlimit_raise", &[]), &[SIGSYS]);
}

// ------------------------------------------------------------------------------------------
// Terminals

fn with_pty_stdin(cmd: &mut Command, slave: &OwnedFd) {
    let fd = slave.try_clone().unwrap_or_else(|x| panic!("{x}"));
    cmd.stdin(Stdio::from(fd));
}

fn tiocsti(req: &str) {
    let Some(e) = esc() else { return };
    let (_m, slave) = openpty();
    let mut h = e.host("tiocsti", &[req]);
    with_pty_stdin(&mut h, &slave);
    e.control_escapes(h);
    assert!(
        tty_pending_input(&slave).contains("id"),
        "control: nothing was injected"
    );
    let mut c = e.confined("tiocsti", &[req]);
    with_pty_stdin(&mut c, &slave);
    e.confined_blocked(c, &[SIGSYS]);
    let pending = tty_pending_input(&slave);
    assert!(
        pending.is_empty(),
        "HOST CHECK: input was injected into the terminal: {pending:?}"
    );
}

/// TIOCSTI on the inherited stdin tty (bubblewrap CVE-2017-5226).
#[test]
fn escape_tiocsti_inherited_stdin() {
    tiocsti("0x5412");
}

/// TIOCSTI with the high 32 bits set (CVE-2019-10063): the kernel uses the low 32 bits.
#[test]
fn escape_tiocsti_high_bits() {
    tiocsti("0x100005412");
}

fn tioclinux(req: &str) {
    let Some(e) = esc() else { return };
    let (_m, slave) = openpty();
    // Control: on the host the request reaches the tty layer (a pty is not a VT, so it fails
    // there with ENOTTY/EINVAL); inside, seccomp must stop it before the driver.
    let mut h = e.host("tioclinux", &[req]);
    with_pty_stdin(&mut h, &slave);
    let o = run(&mut h, Duration::from_secs(30));
    eprintln!("control: {}", o.verdict_line().unwrap_or("?"));
    let mut c = e.confined("tioclinux", &[req]);
    with_pty_stdin(&mut c, &slave);
    let o = e.confined_blocked(c, &[SIGSYS]);
    let v = o.verdict_line().unwrap_or("");
    assert!(
        !v.contains("ENOTTY") && !v.contains("EINVAL"),
        "TIOCLINUX reached the tty driver (seccomp did not filter it): {v}"
    );
}

/// TIOCLINUX on stdin must be filtered by seccomp.
#[test]
fn escape_tioclinux() {
    tioclinux("0x541C");
}

/// TIOCLINUX with the high 32 bits set.
#[test]
fn escape_tioclinux_high_bits() {
    tioclinux("0x10000541C");
}

/// No controlling terminal (setsid): /dev/tty cannot be opened for TIOCSTI.
#[test]
fn escape_controlling_tty() {
    let Some(e) = esc() else { return };
    let (_m, slave) = openpty();
    let mut h = e.host("devtty", &[]);
    with_pty_stdin(&mut h, &slave);
    // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe syscalls on the child's own
    // stdin; nothing is allocated between fork and exec.
    unsafe {
        h.pre_exec(|| {
            libc::setsid();
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    e.control_escapes(h);
    let _ = tty_pending_input(&slave);
    let mut c = e.confined("devtty", &[]);
    with_pty_stdin(&mut c, &slave);
    // carapace itself is started as a session leader with the pty as controlling terminal,
    // the most favourable situation for the attacker.
    // SAFETY: as above.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    e.confined_blocked(c, &[SIGSYS]);
    assert!(
        tty_pending_input(&slave).is_empty(),
        "HOST CHECK: input injected"
    );
}

// ------------------------------------------------------------------------------------------
// Foreign ABIs: seccomp must kill (SIGSYS)

/// x32 syscalls (nr | 0x40000000) are killed. Control: on the host it is not killed (this
/// kernel has no x32: ENOSYS), so the SIGSYS inside comes from carapace's filter.
#[test]
fn escape_x32_syscall() {
    let Some(e) = esc() else { return };
    let o = run(&mut e.host("x32", &[]), Duration::from_secs(30));
    assert!(
        o.signal.is_none(),
        "control: killed on the host: {}",
        o.describe()
    );
    let o = run(&mut e.confined("x32", &[]), Duration::from_secs(30));
    assert!(
        o.stdout.contains("START x32"),
        "did not run: {}",
        o.describe()
    );
    assert_eq!(
        o.code,
        Some(128 + SIGSYS),
        "expected SIGSYS kill:\n{}",
        o.describe()
    );
}

fn expect_sigsys(attack: &str) {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host(attack, &[]));
    let o = run(&mut e.confined(attack, &[]), Duration::from_secs(30));
    assert!(o.stdout.contains("START"), "did not run: {}", o.describe());
    assert!(!o.escaped(), "ESCAPE:\n{}", o.describe());
    assert_eq!(
        o.code,
        Some(128 + SIGSYS),
        "expected SIGSYS kill:\n{}",
        o.describe()
    );
}

/// i386 ABI via int 0x80 (getpid) is killed.
#[test]
fn escape_int80_syscall() {
    expect_sigsys("int80");
}

/// i386 socketcall(SYS_SOCKET, AF_INET) via int 0x80 is killed (socket-family filter bypass).
#[test]
fn escape_int80_socketcall() {
    expect_sigsys("int80_socket");
}

// ------------------------------------------------------------------------------------------
// Resources. No unconfined controls: they would load the shared build machine; every attack
// is bounded by its own argument so a missing limit shows up as ESCAPED, not as a dead host.

/// The base profile's limits that the resource attacks measure, as policies/default.toml sets
/// them (`escape_suite_runs_under_the_default_profile` checks that the attacks' profile is the
/// default one, so a change there that is not made here fails one of the two).
struct Limits {
    pids: u64,
    memory_mib: u64,
    file_size_mib: u64,
    tmp_mib: u64,
}

const LIMITS: Limits = if WRITTEN_CODE_RUNS {
    Limits {
        pids: 1024,
        memory_mib: 4096,
        file_size_mib: 2048,
        tmp_mib: 1024,
    }
} else {
    Limits {
        pids: 128,
        memory_mib: 512,
        file_size_mib: 256,
        tmp_mib: 64,
    }
};

/// Twice `mib`: what a bounded attack tries, so that a missing limit shows as ESCAPED.
fn twice(mib: u64) -> String {
    (2 * mib).to_string()
}

fn number_after(line: &str, word: &str) -> Option<u64> {
    let i = line.find(word)? + word.len();
    line[i..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Fork bomb: stopped by the pids limit (128 in the tool profile, 1024 in build); carapace
/// returns and the host can still start processes.
#[test]
fn escape_fork_bomb() {
    let Some(e) = esc() else { return };
    let o = e.confined_blocked(e.confined("fork_bomb", &["5000"]), &[SIGSYS, SIGKILL]);
    if let Some(v) = o.verdict_line() {
        let n = number_after(v, "after").unwrap_or(0);
        assert!(n <= LIMITS.pids, "more children than the pids limit: {v}");
    }
    assert!(
        Command::new("true").status().is_ok_and(|s| s.success()),
        "HOST CHECK: the host cannot start processes"
    );
}

/// Memory bomb: OOM-killed at the memory limit, reported as such. Rootless (no cgroup): the
/// OOM kill and its report are not applicable; RLIMIT_AS (the memory limit, 512 MiB in the tool
/// profile) must still stop it.
#[test]
fn escape_memory_bomb() {
    let Some(e) = esc() else { return };
    if e.mode == Mode::Rootless {
        e.not_applicable("the OOM kill at the memory limit and its report");
        let o = e.confined_blocked(
            e.confined("mem_bomb", &[&twice(LIMITS.memory_mib)]),
            &[SIGKILL],
        );
        let v = o.verdict_line().unwrap_or("");
        assert!(v.contains("ENOMEM"), "not stopped by RLIMIT_AS: {v}");
        assert!(
            number_after(v, "after").unwrap_or(u64::MAX) <= LIMITS.memory_mib,
            "more than the {} MiB limit: {v}",
            LIMITS.memory_mib
        );
        return;
    }
    let report = e.scratch.path().join("report.json");
    let mut c = e.carapace(
        &["--report-json", &s(&report)],
        &e.attacks.bin,
        &["mem_bomb", &twice(LIMITS.memory_mib)],
    );
    let o = run(&mut c, Duration::from_secs(120));
    assert_confined_blocked(&o, &[SIGKILL]);
    assert_eq!(
        o.code,
        Some(137),
        "expected an OOM kill (137):\n{}",
        o.describe()
    );
    let r = read_report(&report);
    let oom = r.get("oom_killed").or_else(|| r.get("oom"));
    assert_eq!(oom, Some(&serde_json::Value::Bool(true)), "report: {r}");
    assert!(
        o.stderr.to_lowercase().contains("oom"),
        "stderr does not mention the OOM kill:\n{}",
        o.describe()
    );
}

/// Disk fill in the workspace: RLIMIT_FSIZE (256 MiB in the tool profile, 2 GiB in build)
/// stops one file.
#[test]
fn escape_disk_fill_workspace() {
    let Some(e) = esc() else { return };
    let o = e.confined_blocked(
        e.confined("disk_fill", &["/workspace/fill", &twice(LIMITS.file_size_mib)]),
        &[SIGSYS, SIGXFSZ],
    );
    if let Some(v) = o.verdict_line() {
        assert!(v.contains("EFBIG"), "not stopped by RLIMIT_FSIZE: {v}");
        assert!(
            number_after(v, "after").unwrap_or(u64::MAX) <= LIMITS.file_size_mib,
            "{v}"
        );
    }
    let size = fs::metadata(e.ws().join("fill"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        size <= LIMITS.file_size_mib << 20,
        "HOST CHECK: {size} bytes in the workspace"
    );
}

/// Disk fill of /tmp: the tmpfs is full at its size (64 MiB in the tool profile, 1 GiB in
/// build).
#[test]
fn escape_disk_fill_tmp() {
    let Some(e) = esc() else { return };
    let o = e.confined_blocked(
        e.confined("tmp_fill", &["/tmp", &twice(LIMITS.tmp_mib)]),
        &[SIGSYS, SIGXFSZ],
    );
    let v = o.verdict_line().unwrap_or("");
    assert!(v.contains("ENOSPC"), "not stopped by the tmpfs size: {v}");
    assert!(
        number_after(v, "after").unwrap_or(u64::MAX) <= LIMITS.tmp_mib,
        "{v}"
    );
}

/// Spinning past the wall time (3 s in the escape_wall profile) ends with exit 124, in time.
#[test]
fn escape_spin_past_wall_time() {
    let Some(e) = esc() else { return };
    let o = run(&mut e.confined("spin", &["60"]), Duration::from_secs(60));
    assert!(
        o.stdout.contains("START spin"),
        "did not run: {}",
        o.describe()
    );
    assert!(!o.escaped(), "ESCAPE: {}", o.describe());
    assert_eq!(o.code, Some(EXIT_TIMEOUT), "{}", o.describe());
    assert!(
        o.elapsed < Duration::from_secs(3 + 5),
        "took {:?} for a 3 s limit",
        o.elapsed
    );
}

// ------------------------------------------------------------------------------------------
// Added after the first run: more paths out

/// ptrace of the sandbox's own child (PTRACE_TRACEME / PTRACE_SEIZE): a tracer rewriting
/// syscalls after the seccomp check was a bypass on older kernels.
#[test]
fn escape_ptrace_own_child() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("ptrace_child", &[]));
    e.confined_blocked(e.confined("ptrace_child", &[]), &[SIGSYS]);
}

/// No core dumps (core_dumps = false: RLIMIT_CORE hard 0): with core_pattern "core" a crash
/// would write the sandbox's memory into the workspace; with "|helper" run a host helper.
#[test]
fn escape_core_dump() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("coredump", &[&s(e.scratch.path())]));
    e.confined_blocked(e.confined("coredump", &[WS]), &[SIGSYS]);
    let cores: Vec<String> = fs::read_dir(e.ws())
        .map(|rd| {
            rd.flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("core"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        cores.is_empty(),
        "HOST CHECK: core files in the workspace: {cores:?}"
    );
}

/// A SysV shared memory segment of the host is invisible (IPC namespace).
#[test]
fn escape_sysv_shm_host_segment() {
    let Some(e) = esc() else { return };
    let key = (std::process::id() as i32) ^ 0x4341_0000;
    // SAFETY: plain SysV IPC calls with valid arguments; the attached pointer is used only for
    // a bounded copy into the fresh 4096-byte segment and detached again.
    let id = unsafe {
        let id = libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o666);
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        let p = libc::shmat(id, std::ptr::null(), 0);
        assert!(
            p as isize != -1,
            "shmat: {}",
            std::io::Error::last_os_error()
        );
        let msg = b"CARAPACE-HOST-SEGMENT\0";
        std::ptr::copy_nonoverlapping(msg.as_ptr(), p.cast::<u8>(), msg.len());
        libc::shmdt(p);
        id
    };
    let k = format!("{key}");
    let c1 = run(&mut e.host("sysv_shm", &[&k]), Duration::from_secs(30));
    let c2 = run(&mut e.confined("sysv_shm", &[&k]), Duration::from_secs(30));
    // SAFETY: removing the segment created above; id is valid.
    unsafe {
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
    }
    assert!(c1.escaped(), "CONTROL: {}", c1.describe());
    assert_confined_blocked(&c2, &[SIGSYS]);
}

/// stdin redirected from a (world-writable) host file cannot be re-opened for writing through
/// /proc/self/fd/0.
#[test]
fn escape_reopen_stdin_for_write() {
    let Some(e) = esc() else { return };
    let f = e.scratch.path().join("stdin.txt");
    fs::write(&f, "ORIGINAL\n").unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap_or_else(|x| panic!("{x}"));
    // Let the sandbox's host uid reach the file (the scratch dir is 0700).
    fs::set_permissions(e.scratch.path(), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|x| panic!("{x}"));
    let mut h = e.host("reopen_stdin", &[]);
    h.stdin(fs::File::open(&f).unwrap_or_else(|x| panic!("{x}")));
    e.control_escapes(h);
    let mut c = e.confined("reopen_stdin", &[]);
    c.stdin(fs::File::open(&f).unwrap_or_else(|x| panic!("{x}")));
    e.confined_blocked(c, &[SIGSYS]);
    assert_eq!(fs::read_to_string(&f).unwrap_or_default(), "ORIGINAL\n");
}

/// A set-uid-root program (visible in the sandbox) runs without privilege: nosuid mounts and
/// no_new_privs. Control: the sandbox's host uid gains euid 0 with it on the host.
#[test]
fn escape_setuid_binary_exec() {
    let Some(e) = esc() else { return };
    let w = s(&e.attacks.suid_whoami);
    let mut h = e.host("suid_exec", &[&w]);
    h.uid(e.host_uid()).gid(e.host_uid());
    e.control_escapes(h);
    e.confined_blocked(e.confined("suid_exec", &[&w]), &[SIGSYS]);
}

// ------------------------------------------------------------------------------------------
// The suite's own premise

fn confinement_section(policy: &Path, argv: &[&str], attack_dir: &str) -> (Vec<String>, usize) {
    let mut c = Command::new(carapace_bin());
    c.args(["policy", "explain"])
        .arg(policy)
        .arg("--")
        .args(argv);
    let o = run(&mut c, Duration::from_secs(30));
    assert_eq!(o.code, Some(0), "explain failed:\n{}", o.describe());
    let start = o
        .stdout
        .lines()
        .position(|l| l.starts_with("confinement"))
        .unwrap_or_else(|| panic!("no confinement section:\n{}", o.stdout));
    let mut dir_lines = 0;
    let lines = o
        .stdout
        .lines()
        .skip(start + 1)
        .filter(|l| {
            let hit = l.contains(attack_dir);
            dir_lines += usize::from(hit);
            !hit
        })
        .map(|l| l.replace("profile `escape_wall`", &format!("profile `{BASE}`")))
        .map(|l| l.replace("profile `escape`", &format!("profile `{BASE}`")))
        .map(|l| l.replace("[profiles.escape_wall.", &format!("[profiles.{BASE}.")))
        .map(|l| l.replace("[profiles.escape.", &format!("[profiles.{BASE}.")))
        .collect();
    (lines, dir_lines)
}

/// The attacks run under exactly the default base confinement (`tool` or `build`) plus the
/// read-exec mount of the attack directory (and its Landlock rule): compared on `policy
/// explain`, which is rendered from the same compiled plan that is applied. The spin attack's
/// profile differs only in the wall time.
#[test]
fn escape_suite_runs_under_the_default_profile() {
    let Some(e) = esc() else { return };
    let dir = s(&e.attacks.dir);
    let default = repo_root().join("policies/default.toml");
    // A program the default policy runs in the base profile.
    let sample = if WRITTEN_CODE_RUNS {
        "/usr/bin/make"
    } else {
        "/usr/bin/ls"
    };
    let (tool, n) = confinement_section(&default, &[sample], &dir);
    assert_eq!(n, 0);
    let (esc, n) = confinement_section(&e.policy, &[&s(&e.attacks.bin), "bpf"], &dir);
    assert_eq!(n, 2, "expected the mount and its Landlock rule for {dir}");
    assert_eq!(
        esc, tool,
        "the escape profile differs from {BASE} beyond the attack mount"
    );
    let (wall, _) = confinement_section(&e.policy, &[&s(&e.attacks.bin), "spin", "60"], &dir);
    let diff: Vec<(&String, &String)> = wall.iter().zip(&tool).filter(|(a, b)| a != b).collect();
    assert!(
        wall.len() == tool.len() && diff.len() == 1 && diff[0].0.contains("wall time: 3000 ms"),
        "escape_wall must differ from {BASE} only in its 3 s wall time: {diff:?}"
    );
}

/// The suite runs carapace in the mode it says: as root, the sandbox on a per-run host uid
/// with a cgroup; rootless, carapace as `ROOTLESS_UID`, the sandbox on that same uid, no cgroup
/// on this machine (said once).
#[test]
fn escape_suite_runs_in_its_mode() {
    let Some(e) = esc() else { return };
    let o = run(
        &mut e.carapace(&["-v"], &e.attacks.bin, &["bpf"]),
        Duration::from_secs(60),
    );
    assert_confined_blocked(&o, &[SIGSYS]);
    let said = o
        .stderr
        .matches("carapace: rootless: no delegated cgroup; memory/pids/cpu limited by rlimits only")
        .count();
    let running = o
        .stderr
        .lines()
        .find(|l| l.starts_with("carapace: running "))
        .unwrap_or_else(|| panic!("no `running` line:\n{}", o.describe()));
    match e.mode {
        Mode::Root => {
            assert_eq!(said, 0, "{}", o.describe());
            assert!(!running.contains("rootless"), "{running}");
            assert!(!running.contains(" as host 0:"), "{running}");
        }
        Mode::Rootless => {
            assert_eq!(said, 1, "{}", o.describe());
            assert!(running.ends_with(", rootless"), "{running}");
            assert!(
                running.contains(&format!(" as host {ROOTLESS_UID}:{ROOTLESS_UID} ")),
                "{running}"
            );
        }
    }
}

/// Cross-run symlink trick: run 1 plants `/workspace/sub -> <host dir>`; a later run given
/// `--workspace <ws>/sub` (a path that looks like a subdirectory of the workspace, as a gateway
/// picking a task directory would pass) must not bind the host directory behind the link, where
/// the idmapped mount would give the sandbox the owner's (here root's) rights over its files.
/// The victim is a scratch directory standing in for /etc.
#[test]
fn escape_workspace_symlink_planted_by_previous_run() {
    let Some(e) = esc() else { return };
    let victim = e.scratch.path().join("victim");
    fs::create_dir(&victim).unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|x| panic!("{x}"));
    fs::write(victim.join("file"), "ORIGINAL\n").unwrap_or_else(|x| panic!("{x}"));
    // Run 1: the sandbox creates the link (its reads through it fail, as they should).
    let o = run(
        &mut e.confined("symlink_created", &[WS, &s(&victim), "ORIGINAL"]),
        Duration::from_secs(60),
    );
    assert_confined_blocked(&o, &[SIGSYS]);
    let link = e.ws().join("mine-abs");
    assert!(
        fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()),
        "run 1 could not plant the link:\n{}",
        o.describe()
    );
    // Run 2: the operator/gateway names the link as the workspace.
    let planted = format!("{WS}/planted");
    let mut c = e.carapace_in(&link, &[], &e.attacks.bin, &["write_file", &planted]);
    let o = run(&mut c, Duration::from_secs(60));
    let landed = victim.join("planted").exists();
    assert!(
        !landed,
        "ESCAPE: a symlink planted by an earlier run redirected the next run's workspace to a \
         host directory ({}), and the sandbox wrote into it as its owner:\n{}",
        victim.display(),
        o.describe()
    );
}

/// The report file: carapace writes `--report-json` as root after the program exits. When that
/// path lies in the workspace, the program can replace it with a symlink to any host file
/// during its run; carapace must not follow it (the victim is a scratch file standing in for
/// /etc/passwd).
#[test]
fn escape_report_json_symlink_clobbers_host_file() {
    let Some(e) = esc() else { return };
    let victim = e.scratch.path().join("victim");
    fs::write(&victim, "ORIGINAL\n").unwrap_or_else(|x| panic!("{x}"));
    let report = e.ws().join("report.json");
    let mut c = e.carapace(
        &["--report-json", &s(&report)],
        &e.attacks.bin,
        &["plant_symlink", "/workspace/report.json", &s(&victim)],
    );
    let o = run(&mut c, Duration::from_secs(60));
    assert_confined_blocked(&o, &[SIGSYS]);
    let now = fs::read_to_string(&victim).unwrap_or_default();
    assert_eq!(
        now,
        "ORIGINAL\n",
        "ESCAPE: carapace (root) followed a symlink the sandbox planted at the --report-json \
         path and overwrote a host file:\n{}",
        o.describe()
    );
}

/// File capabilities (security.capability xattr) or trusted.* xattrs cannot be set on files in
/// the workspace (they would be honoured by a later host exec).
#[test]
fn escape_file_capabilities_in_workspace() {
    let Some(e) = esc() else { return };
    e.control_escapes(e.host("file_caps", &[&s(e.scratch.path())]));
    e.confined_blocked(e.confined("file_caps", &[WS]), &[SIGSYS]);
    let f = e.ws().join("fcaps");
    let mut buf = [0u8; 64];
    let name = c"security.capability";
    let path = std::ffi::CString::new(s(&f)).unwrap_or_default();
    // SAFETY: valid NUL-terminated strings and a buffer of the size passed.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n < 0,
        "HOST CHECK: {} carries file capabilities",
        f.display()
    );
}
