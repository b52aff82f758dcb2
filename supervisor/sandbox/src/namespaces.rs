//! Namespaces: the clone flags of a run, the uid/gid maps of the sandbox's user namespace, and
//! the short-lived helper user namespace that carries the workspace's idmapping.
//!
//! The confined child is created by `spawn` with `clone(CLONE_NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)`
//! while it is still real root (it needs that to build its mounts), and it enters its own user
//! namespace later with `unshare(CLONE_NEWUSER)`, after its root is built. The parent then writes
//! the maps with [`write_id_maps`]: one line, `inside host 1`, so that the only identity that
//! exists in the sandbox is the sandbox user, backed by the unprivileged host uid/gid.
//!
//! # Rootless mode
//!
//! An unprivileged supervisor cannot create mount, pid, net... namespaces outside a user
//! namespace it owns, so the child is created in a new user namespace from the start
//! (`clone(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)`, see [`rootless_clone_flags`]).
//! The parent writes `setgroups` = `deny` and the single mapping its own euid/egid allows,
//! `inside <euid> 1` ([`write_id_maps_unprivileged`]), before the child does anything. The
//! child has every capability in that namespace as its creator (whatever its uid there), so it
//! builds its root exactly as in root mode, then drops to the sandbox user and all its
//! capabilities; namespace root (uid 0) is not mapped at all. Nothing else owns the namespaces:
//! processes of the same host user outside the sandbox do (as the namespace's owner), which
//! is the user the sandbox already runs as. See docs/threat-model.md, "Rootless mode".

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::PathBuf;

use carapace_policy::plan::Namespaces;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("{syscall} {}: {source}", path.display())]
    Sys {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the {0} namespace cannot be disabled: carapace's confinement is built on it \
         (remove `{0} = false` from the profile's `namespaces`)"
    )]
    Required(&'static str),
}

/// A host identity (the uid/gid the confined program really runs as).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIds {
    pub uid: u32,
    pub gid: u32,
}

impl HostIds {
    /// `nobody:nogroup` (65534:65534), the default before per-run identities.
    pub const NOBODY: HostIds = HostIds {
        uid: 65534,
        gid: 65534,
    };
}

/// First host uid/gid of the per-run range (`--run-as auto`): 0x7F00_0000 = 2130706432.
pub const AUTO_BASE: u32 = 0x7F00_0000;
/// Size of the per-run range: 4194304 = 2^22, the kernel's largest possible `pid_max`
/// (PID_MAX_LIMIT on 64-bit), so every pid has its own id.
pub const AUTO_RANGE: u32 = 1 << 22;

/// Which host identity a run uses (`--run-as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// A per-run identity: uid = gid = [`AUTO_BASE`] + the supervisor's pid. No two carapace
    /// processes running at the same time (in one pid namespace) share it, it is never a real
    /// account, and no other host process runs as it: nothing outside the sandbox can signal
    /// or ptrace the sandbox by sharing its uid (as any `nobody` process could with 65534).
    Auto,
    /// An explicit `UID:GID`.
    Fixed(HostIds),
}

impl RunAs {
    /// The identity for a supervisor with pid `pid`; a note when it is not unique.
    pub fn resolve(self, pid: u32) -> (HostIds, Option<String>) {
        match self {
            RunAs::Fixed(ids) => (ids, None),
            RunAs::Auto => {
                let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok());
                auto_ids(pid, pid_max)
            }
        }
    }
}

/// `--run-as auto` for pid `pid` given the kernel's `pid_max`: [`AUTO_BASE`] + pid. Should a
/// pid not fit the range (a pid_max above 2^22, which Linux does not allow today, or unknown and
/// a large pid), the id wraps (pid modulo the range) and the note says it may be shared.
pub fn auto_ids(pid: u32, pid_max: Option<u64>) -> (HostIds, Option<String>) {
    let fits = pid < AUTO_RANGE && pid_max.is_none_or(|m| m <= u64::from(AUTO_RANGE));
    let id = AUTO_BASE + pid % AUTO_RANGE;
    let note = (!fits).then(|| {
        format!(
            "carapace: warning: pid {pid} / pid_max {} does not fit the per-run id range \
             {AUTO_BASE}..{}; using {id}, which another run may share (give --run-as UID:GID)",
            pid_max.map_or_else(|| "unknown".to_string(), |m| m.to_string()),
            u64::from(AUTO_BASE) + u64::from(AUTO_RANGE)
        )
    });
    (HostIds { uid: id, gid: id }, note)
}

/// Parse `--run-as`: `auto`, or `UID:GID` (see [`parse_ids`]).
pub fn parse_run_as(s: &str) -> Result<RunAs, String> {
    if s == "auto" {
        return Ok(RunAs::Auto);
    }
    parse_ids(s).map(RunAs::Fixed)
}

/// Parse `UID:GID` (numbers only; both required; 0 refused: the sandbox must not be host root).
pub fn parse_ids(s: &str) -> Result<HostIds, String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected `auto` or UID:GID, e.g. 1500:1500"))?;
    let uid: u32 = u
        .parse()
        .map_err(|_| format!("`{u}`: expected a numeric uid"))?;
    let gid: u32 = g
        .parse()
        .map_err(|_| format!("`{g}`: expected a numeric gid"))?;
    if uid == 0 || gid == 0 {
        return Err(
            "running the sandbox as host uid/gid 0 is refused: pick an unprivileged \
                    identity (the default, `auto`, picks one per run)"
                .to_string(),
        );
    }
    if uid == u32::MAX || gid == u32::MAX {
        return Err(format!("`{s}`: -1 is not a valid id"));
    }
    Ok(HostIds { uid, gid })
}

/// The flags passed to `clone` for a run: mount and pid always, the rest as the plan says.
/// The user namespace is entered later by the child itself (`unshare`), and the cgroup namespace
/// after the parent has placed the child into its cgroup.
pub fn clone_flags(ns: &Namespaces) -> Result<libc::c_int, NamespaceError> {
    if !ns.user {
        return Err(NamespaceError::Required("user"));
    }
    if !ns.pid {
        return Err(NamespaceError::Required("pid"));
    }
    if !ns.mount {
        return Err(NamespaceError::Required("mount"));
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if ns.net {
        flags |= libc::CLONE_NEWNET;
    }
    if ns.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if ns.uts {
        flags |= libc::CLONE_NEWUTS;
    }
    Ok(flags)
}

/// Rootless: the clone flags of [`clone_flags`] plus `CLONE_NEWUSER` (the child is born in its
/// own user namespace, which owns all its other namespaces).
pub fn rootless_clone_flags(ns: &Namespaces) -> Result<libc::c_int, NamespaceError> {
    Ok(clone_flags(ns)? | libc::CLONE_NEWUSER)
}

/// The calling process's effective uid and gid (the sandbox's host identity in rootless mode).
pub fn own_ids() -> HostIds {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    unsafe {
        HostIds {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    }
}

/// Rootless: write a child's `setgroups` (`deny`: an unprivileged writer may map its gid only
/// then) and its one-line `uid_map` / `gid_map`, each of which may map only our own euid/egid.
pub fn write_id_maps_unprivileged(
    pid: libc::pid_t,
    uid_map: &str,
    gid_map: &str,
) -> Result<(), NamespaceError> {
    write_proc_files(
        pid,
        &[
            ("setgroups", "deny\n"),
            ("uid_map", uid_map),
            ("gid_map", gid_map),
        ],
    )
}

/// One line of a `uid_map` / `gid_map`: `inside outside 1`.
pub fn map_line(inside: u32, outside: u32) -> String {
    format!("{inside} {outside} 1\n")
}

/// Write a process's `uid_map` and `gid_map` (the caller is root in the parent namespace, so
/// `setgroups` need not be denied first).
pub fn write_id_maps(pid: libc::pid_t, uid_map: &str, gid_map: &str) -> Result<(), NamespaceError> {
    write_proc_files(pid, &[("uid_map", uid_map), ("gid_map", gid_map)])
}

/// Write each `(file, text)` to `/proc/<pid>/<file>`, in order, each in one `write(2)` (the
/// kernel accepts a map only in a single write).
fn write_proc_files(pid: libc::pid_t, files: &[(&str, &str)]) -> Result<(), NamespaceError> {
    for (file, text) in files {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).open(&path)?;
            f.write_all(text.as_bytes())
        };
        write().map_err(|source| NamespaceError::Sys {
            syscall: "write",
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A killed helper process, reaped by [`Reaper::reap`] once the run's child is started (by then
/// it is long dead, so the wait is immediate), or when dropped. Keeps the helper's death off the
/// critical path of a run without leaving it a zombie for as long as the run lasts. It also owns
/// the stack the helper ran on (it shares our memory), freed only after the helper is reaped.
#[derive(Debug)]
pub struct Reaper {
    pid: std::sync::atomic::AtomicI32,
    _stack: CloneStack,
}

impl Reaper {
    /// Reap the helper now (once; later calls and the drop do nothing).
    pub fn reap(&self) {
        let pid = self.pid.swap(0, std::sync::atomic::Ordering::SeqCst);
        if pid > 0 {
            let mut status = 0;
            // SAFETY: reaping our own (killed) child, once (the pid was swapped out above);
            // `status` is a valid out pointer.
            unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        }
    }

    /// The helper's pid while it is not reaped.
    pub fn pid(&self) -> Option<libc::pid_t> {
        Some(self.pid.load(std::sync::atomic::Ordering::SeqCst)).filter(|p| *p > 0)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Before the stack field is dropped: the helper is gone once it is reaped.
        self.reap();
    }
}

/// Size of a [`CloneStack`].
pub(crate) const CLONE_STACK_BYTES: usize = 64 * 1024;

/// A stack for a child cloned with `CLONE_VM` that runs a few raw syscalls and never returns:
/// the idmap helper (`prctl`, `pause`) and the sandbox's program child until its `execve`.
/// 64 KiB, 16-byte aligned.
#[derive(Debug)]
pub(crate) struct CloneStack(Vec<u128>);

impl CloneStack {
    pub(crate) fn new() -> CloneStack {
        CloneStack(vec![0u128; CLONE_STACK_BYTES / std::mem::size_of::<u128>()])
    }

    /// The top of the stack (it grows down).
    pub(crate) fn top(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr_range().end.cast()
    }
}

/// The helper's whole life: die with the thread that made it, else wait to be killed. All
/// signals are blocked (inherited from the parent's mask at clone), so no handler of ours ever
/// runs in it; only SIGKILL ends it.
extern "C" fn helper_main(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: prctl and pause take no pointers and touch no memory of ours but the (shared)
    // errno, which they set only on failure; PR_SET_PDEATHSIG with a valid signal does not
    // fail, and pause returns only after a handler ran, which the blocked mask rules out.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        loop {
            libc::pause();
        }
    }
}

/// Create a user namespace whose only mappings are `uid_map`/`gid_map` and return an fd for it
/// (`/proc/<pid>/ns/user` of a helper process, killed right after), plus the helper's
/// [`Reaper`]. Used as the idmapping of the workspace mount (`mount_setattr(MOUNT_ATTR_IDMAP)`
/// needs a user namespace fd). The helper never needs to run: the namespace exists from
/// `clone` on, the maps are written by us, and SIGKILL ends it wherever it is.
///
/// The helper shares our memory (`CLONE_VM`, on a small stack of its own) instead of getting a
/// copy: copying the supervisor's page tables, and the copy-on-write faults it would leave in
/// every thread of the supervisor afterwards, cost more than the rest of the helper's life.
pub fn helper_userns(uid_map: &str, gid_map: &str) -> Result<(OwnedFd, Reaper), NamespaceError> {
    let sys = |syscall: &'static str, path: &str| {
        let source = io::Error::last_os_error();
        NamespaceError::Sys {
            syscall,
            path: PathBuf::from(path),
            source,
        }
    };
    let mut stack = CloneStack::new();
    // SAFETY: sigfillset/pthread_sigmask write only the sigset_t values we own; the old mask is
    // restored below whatever clone did.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        // SAFETY: the child runs `helper_main` on `stack`, which stays allocated until the
        // child is reaped (the Reaper owns it, and reaps before freeing it); it shares our
        // memory but touches nothing of it (see helper_main). No CLONE_SETTLS: it never uses
        // thread-local storage beyond errno, as above.
        let pid = libc::clone(
            helper_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_NEWUSER | libc::SIGCHLD,
            std::ptr::null_mut(),
        );
        let clone_err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(NamespaceError::Sys {
                syscall: "clone(CLONE_VM|CLONE_NEWUSER)",
                path: PathBuf::from("(helper user namespace)"),
                source: clone_err,
            });
        }
        pid
    };
    let reaper = Reaper {
        pid: std::sync::atomic::AtomicI32::new(pid),
        _stack: stack,
    };
    let result = (|| {
        write_id_maps(pid, uid_map, gid_map)?;
        let path = format!("/proc/{pid}/ns/user");
        let c = CString::new(path.clone()).map_err(|_| NamespaceError::Sys {
            syscall: "open",
            path: PathBuf::from(&path),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(sys("open", &path));
        }
        // SAFETY: open succeeded; we own the fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })();
    // SAFETY: signalling our own child, which has not been reaped (its pid cannot be reused).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    result.map(|fd| (fd, reaper))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper is a zombie (killed, not reaped) until [`Reaper::reap`], and gone after it.
    #[test]
    fn helper_is_reaped_on_demand() {
        if !crate::privileged("namespaces") {
            return;
        }
        let (_fd, reaper) = helper_userns(&map_line(0, 100_000), &map_line(0, 100_000)).unwrap();
        let pid = reaper.pid().unwrap();
        let state = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next()))
                .flatten()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while state() != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            state(),
            Some('Z'),
            "the killed helper {pid} waits to be reaped"
        );
        reaper.reap();
        assert_eq!(reaper.pid(), None);
        assert_eq!(
            state(),
            None,
            "the helper {pid} is still there after reap()"
        );
        reaper.reap();
    }

    #[test]
    fn run_as_parses_and_refuses() {
        assert_eq!(parse_run_as("auto"), Ok(RunAs::Auto));
        assert_eq!(
            parse_run_as("65534:65534"),
            Ok(RunAs::Fixed(HostIds {
                uid: 65534,
                gid: 65534
            }))
        );
        assert_eq!(
            parse_run_as("1001:100"),
            Ok(RunAs::Fixed(HostIds {
                uid: 1001,
                gid: 100
            }))
        );
        assert!(parse_run_as("Auto").is_err());
        for bad in [
            "", "1000", "1000:", ":1000", "a:b", "0:0", "0:1000", "1000:0", "-1:5", "1:2:3",
        ] {
            assert!(parse_run_as(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn auto_ids_are_base_plus_pid() {
        let (ids, note) = auto_ids(4242, Some(32768));
        assert_eq!(ids.uid, 2_130_706_432 + 4242);
        assert_eq!(ids.gid, ids.uid);
        assert!(note.is_none());
        // The largest pid Linux can hand out still fits, and stays below 2^31 - 1.
        let (ids, note) = auto_ids(AUTO_RANGE - 1, Some(u64::from(AUTO_RANGE)));
        assert_eq!(ids.uid, 2_130_706_432 + 4_194_303);
        assert!(ids.uid < 0x7FFF_FFFF);
        assert!(note.is_none());
        // Distinct pids, distinct ids.
        assert_ne!(auto_ids(100, None).0, auto_ids(101, None).0);
        // A pid_max beyond the range: wrap and say so.
        let (ids, note) = auto_ids(AUTO_RANGE + 5, Some(u64::from(AUTO_RANGE) * 2));
        assert_eq!(ids.uid, AUTO_BASE + 5);
        assert!(note.is_some_and(|n| n.contains("may share")));
        let (_, note) = auto_ids(7, Some(u64::from(AUTO_RANGE) + 1));
        assert!(note.is_some());
        assert_eq!(
            RunAs::Fixed(HostIds::NOBODY).resolve(1),
            (HostIds::NOBODY, None)
        );
        let (ids, _) = RunAs::Auto.resolve(std::process::id());
        assert_eq!(ids.uid, AUTO_BASE + std::process::id() % AUTO_RANGE);
    }

    #[test]
    fn map_lines() {
        assert_eq!(map_line(1000, 65534), "1000 65534 1\n");
        assert_eq!(map_line(0, 1), "0 1 1\n");
    }

    #[test]
    fn clone_flags_follow_plan_and_refuse_required() {
        let all = Namespaces {
            user: true,
            pid: true,
            mount: true,
            ipc: true,
            uts: true,
            net: true,
            cgroup: true,
        };
        let f = clone_flags(&all).unwrap();
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
        ] {
            assert_ne!(f & flag, 0);
        }
        assert_eq!(
            f & libc::CLONE_NEWUSER,
            0,
            "user ns is entered later by unshare"
        );
        let no_net = Namespaces { net: false, ..all };
        assert_eq!(clone_flags(&no_net).unwrap() & libc::CLONE_NEWNET, 0);
        assert!(clone_flags(&Namespaces { user: false, ..all }).is_err());
        assert!(clone_flags(&Namespaces { pid: false, ..all }).is_err());
        assert!(clone_flags(&Namespaces {
            mount: false,
            ..all
        })
        .is_err());
    }
}

/// `struct clone_args` of clone3(2) (CLONE_ARGS_SIZE_VER2, 88 bytes), as far as carapace uses
/// it: namespaces in `flags`, a pidfd, and the v2 cgroup the child is born in.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

/// clone3 flag: start the child in the v2 cgroup named by `clone_args.cgroup` (Linux 5.7).
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
