//! Cleaning up after supervisors that died: run cgroups are named after their supervisor's
//! pid, and an empty one whose supervisor is gone is removed by the next run.

use super::*;

/// A cgroup name unique to this process and call: `<prefix>-<pid>-<counter>`.
/// `prefix` is cut to fit and stripped of characters a name cannot hold.
pub fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}-{}-{n}",
        if clean.is_empty() { "run" } else { &clean },
        std::process::id()
    )
}

/// A stale run cgroup younger than this is left alone (its creator may be a supervisor in
/// another pid namespace, whose pid means nothing here, between creating it and starting).
pub(super) const STALE_MIN_AGE: Duration = Duration::from_secs(2);

/// The pid of the supervisor that created run cgroup `name` ([`unique_name`]:
/// `<prefix>-<pid>-<counter>`); `None` for any other name (e.g. [`SUPERVISOR_LEAF`]).
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    let prefix = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let prefix_ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !(prefix_ok && digits(counter) && digits(pid)) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Is process `pid` alive (in our pid namespace)? EPERM means it exists.
pub(super) fn process_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// [`remove_stale`], the first time this process calls it; None after that. Stale cgroups come
/// from supervisors killed before this one started, so once per process is enough.
pub fn remove_stale_once() -> Option<Result<Vec<PathBuf>, CgroupError>> {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    Some(remove_stale())
}

/// Remove the run cgroups that SIGKILLed supervisors left behind, in every hierarchy: the
/// directories directly beneath our own `<own>/carapace/` whose name carries a supervisor pid
/// ([`owner_pid`]) that is not ours and not alive, that hold no process, and that are at least
/// a couple of seconds old. Nothing else is touched: not a cgroup with processes (the kernel
/// would refuse the rmdir anyway), not one with child cgroups, nothing outside `carapace/`.
/// Returns the directories removed; a hierarchy that cannot be read is skipped with a warning.
pub fn remove_stale() -> Result<Vec<PathBuf>, CgroupError> {
    let layout = Layout::cached()?;
    let mut parents: Vec<PathBuf> = layout
        .v1
        .iter()
        .map(|h| h.own.join(PARENT_DIR))
        .chain(layout.unified.iter().map(|u| u.join(PARENT_DIR)))
        .collect();
    parents.sort();
    parents.dedup();
    Ok(remove_stale_in(
        &parents,
        std::process::id(),
        process_alive,
        STALE_MIN_AGE,
        |d| fs::remove_dir(d).is_ok(),
    ))
}

/// [`remove_stale`] over the given `carapace/` directories, with the liveness test, the
/// minimum age and the removal as parameters (for tests; a real cgroup directory is removed with
/// its interface files by one rmdir, a fake one in a tempdir is not).
pub(super) fn remove_stale_in(
    parents: &[PathBuf],
    me: u32,
    alive: impl Fn(u32) -> bool,
    min_age: Duration,
    mut rmdir: impl FnMut(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for parent in parents {
        let entries = match fs::read_dir(parent) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!("stale cgroups: cannot read {}: {e}", parent.display());
                continue;
            }
        };
        for entry in entries.flatten() {
            // file_type does not follow symlinks (cgroupfs has none; a plain dir may).
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            if pid == me || alive(pid) {
                continue;
            }
            let dir = entry.path();
            let old_enough = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if !old_enough {
                continue;
            }
            let procs = dir.join("cgroup.procs");
            if !read_pids(&procs).is_ok_and(|p| p.is_empty()) {
                continue;
            }
            // rmdir fails (EBUSY/ENOTEMPTY) if a process or a child cgroup appeared meanwhile.
            if rmdir(&dir) {
                removed.push(dir);
            }
        }
    }
    removed
}

pub(super) fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != SUPERVISOR_LEAF
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
        })
    }
}
