//! Empty cgroups made ahead for the tools: one per profile, made by a tool's thread after its
//! tool's report was sent, taken by the next tool of that profile, so that a tool's start does
//! not wait for the cgroup's directories and limit writes. A cgroup is used by one tool only
//! and removed after it, never reset and reused: its statistics (peak memory, OOM kills, CPU)
//! are that tool's alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use carapace_broker::sync::lock;
use carapace_policy::plan::CgroupLimits;
use carapace_sandbox::cgroup::{self, Cgroup};

/// The ready cgroups, by profile, each with the limits it was made with.
#[derive(Debug, Default)]
pub struct CgroupPool {
    ready: Mutex<HashMap<String, (CgroupLimits, Cgroup)>>,
    closed: AtomicBool,
}

impl CgroupPool {
    /// The ready cgroup of `profile` when it was made with exactly `limits` (one made under a
    /// replaced policy with other limits is removed instead).
    pub fn take(&self, profile: &str, limits: &CgroupLimits) -> Option<Cgroup> {
        let (made_with, cg) = lock(&self.ready).remove(profile)?;
        // A mismatch is dropped here, outside the lock: its drop removes it.
        (made_with == *limits).then_some(cg)
    }

    /// Make a cgroup ready for the next tool of `profile` with `limits`, unless one is ready or
    /// the pool is closed. Called off the requester's path (after a tool's report was sent,
    /// and only when that tool ran in a cgroup of its own, so cgroups work here).
    pub fn refill(&self, profile: &str, limits: &CgroupLimits) {
        if self.closed.load(Ordering::SeqCst)
            || lock(&self.ready)
                .get(profile)
                .is_some_and(|(l, _)| l == limits)
        {
            return;
        }
        let cg = match Cgroup::create(&cgroup::unique_name("tool"), limits) {
            Ok(cg) => cg,
            Err(e) => {
                // The next tool creates its own (and fails with this error if it must).
                tracing::debug!(
                    "making a cgroup ahead for profile `{profile}`: {}",
                    crate::errors::error_chain(&e)
                );
                return;
            }
        };
        let replaced = {
            let mut ready = lock(&self.ready);
            if self.closed.load(Ordering::SeqCst) {
                Some(cg)
            } else {
                ready
                    .insert(profile.to_string(), (*limits, cg))
                    .map(|(_, old)| old)
            }
        };
        // Removed outside the lock.
        drop(replaced);
    }

    /// Remove every ready cgroup (a reload: the next tools make their own again).
    pub fn clear(&self) {
        let all = std::mem::take(&mut *lock(&self.ready));
        drop(all);
    }

    /// Remove every ready cgroup and make no more (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.clear();
    }

    /// How many are ready.
    pub fn len(&self) -> usize {
        lock(&self.ready).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if we may run privileged tests; panics when not root unless CARAPACE_ALLOW_SKIP=1.
    fn privileged() -> bool {
        if carapace_sandbox::Privilege::of_this_process().is_root() {
            return true;
        }
        if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("skipping privileged cgroup pool test: not root (CARAPACE_ALLOW_SKIP=1)");
            return false;
        }
        panic!("this test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip it");
    }

    fn limits(pids: u64) -> CgroupLimits {
        CgroupLimits {
            pids: Some(pids),
            ..CgroupLimits::default()
        }
    }

    fn dirs(cg: &Cgroup) -> Vec<std::path::PathBuf> {
        cg.dirs()
            .into_iter()
            .map(std::path::Path::to_path_buf)
            .collect()
    }

    #[test]
    fn a_ready_cgroup_goes_to_one_tool_of_its_profile_with_its_limits() {
        if !privileged() {
            return;
        }
        let pool = CgroupPool::default();
        assert!(pool.take("tool", &limits(64)).is_none());
        pool.refill("tool", &limits(64));
        assert_eq!(pool.len(), 1);
        // Ready already: no second one.
        pool.refill("tool", &limits(64));
        assert_eq!(pool.len(), 1);
        // Another profile's tool does not get it.
        assert!(pool.take("build", &limits(64)).is_none());
        let cg = pool.take("tool", &limits(64)).expect("the ready cgroup");
        let made = dirs(&cg);
        assert!(
            !made.is_empty() && made.iter().all(|d| d.is_dir()),
            "{made:?}"
        );
        assert!(cg.pids().expect("cgroup.procs").is_empty(), "not empty");
        // Taken once only.
        assert!(pool.take("tool", &limits(64)).is_none());
        cg.remove().expect("remove");
        assert!(made.iter().all(|d| !d.exists()), "{made:?}");
    }

    #[test]
    fn a_cgroup_made_with_other_limits_is_removed_not_handed_out() {
        if !privileged() {
            return;
        }
        let pool = CgroupPool::default();
        pool.refill("tool", &limits(64));
        let made = lock(&pool.ready)
            .get("tool")
            .map(|(_, cg)| dirs(cg))
            .expect("ready");
        assert!(made.iter().all(|d| d.is_dir()));
        // The policy was reloaded with other limits for the profile.
        assert!(pool.take("tool", &limits(32)).is_none());
        assert!(made.iter().all(|d| !d.exists()), "{made:?}");
        assert!(pool.is_empty());
    }

    #[test]
    fn clear_and_close_remove_the_ready_cgroups_and_close_makes_no_more() {
        if !privileged() {
            return;
        }
        let pool = CgroupPool::default();
        let ready = |pool: &CgroupPool| {
            lock(&pool.ready)
                .values()
                .flat_map(|(_, cg)| dirs(cg))
                .collect::<Vec<_>>()
        };
        pool.refill("tool", &limits(64));
        pool.refill("build", &limits(128));
        let made = ready(&pool);
        assert_eq!(pool.len(), 2);
        pool.clear();
        assert!(pool.is_empty());
        assert!(made.iter().all(|d| !d.exists()), "{made:?}");
        // Cleared, not closed: it makes them again.
        pool.refill("tool", &limits(64));
        let made = ready(&pool);
        assert_eq!(pool.len(), 1);
        pool.close();
        assert!(made.iter().all(|d| !d.exists()), "{made:?}");
        pool.refill("tool", &limits(64));
        assert!(pool.is_empty(), "made one after close");
    }
}
