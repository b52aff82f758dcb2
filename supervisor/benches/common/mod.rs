//! What the supervisor's benches share: time in milliseconds, nearest-rank percentiles, and
//! finding a program on the PATH.

use std::path::PathBuf;
use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The namespaces of the kernel floor below: those every carapace sandbox gets (mount, pid,
/// network, IPC, UTS, cgroup), which `bwrap --unshare-all` makes too.
const FLOOR_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// What the program's process runs after the clone: execve of the prepared argv, or _exit(127).
extern "C" fn floor_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `FloorArgs` the parent keeps alive until the child has exec'd
    // (CLONE_VFORK suspends the parent until then); execve and _exit are async-signal-safe.
    unsafe {
        let a = &*(arg as *const FloorArgs);
        libc::execve(a.path.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        libc::_exit(127)
    }
}

struct FloorArgs {
    path: std::ffi::CString,
    argv: [*const libc::c_char; 2],
    envp: [*const libc::c_char; 1],
}

/// The kernel's floor for a program in fresh namespaces: one `clone` with
/// [`FLOOR_NAMESPACES`] (sharing the caller's memory until the `execve`, as `posix_spawn`
/// does, so no page tables are copied), `execve(program)`, and the wait, including the
/// namespaces' teardown. No mounts, no identity change, no seccomp, Landlock or cgroup: what
/// any sandbox with these namespaces pays before doing anything of its own. Root only.
pub fn floor_run(program: &str) -> Result<(), String> {
    let path = std::ffi::CString::new(program).map_err(|e| e.to_string())?;
    let mut args = FloorArgs {
        argv: [path.as_ptr(), std::ptr::null()],
        envp: [std::ptr::null()],
        path,
    };
    args.argv[0] = args.path.as_ptr();
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack grows down from its 16-byte aligned end; the child only runs
    // `floor_child` on it, and CLONE_VFORK keeps `stack` and `args` alive (we are suspended)
    // until it has exec'd or exited.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            floor_child,
            top as *mut libc::c_void,
            FLOOR_NAMESPACES | libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut FloorArgs as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a valid int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!(
            "{program} in fresh namespaces: wait status {status:#x}"
        ))
    }
}
