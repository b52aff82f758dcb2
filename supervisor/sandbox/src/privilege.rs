//! Root or rootless: what the supervisor may do, decided once when it starts and passed down as
//! a value, so that no step asks the kernel again (and no two steps can disagree).
//!
//! | | [`Privilege::Root`] | [`Privilege::Rootless`] |
//! |---|---|---|
//! | sandbox's host identity | the run-as identity (per run or `UID:GID`) | the supervisor's own uid/gid |
//! | user namespace | entered by the child after setting up, maps written by the parent | the child is born in it, one-line maps of our own ids |
//! | workspace | an idmapped bind mount | a plain bind mount |
//! | cgroup | beneath the supervisor's own, both hierarchies | beneath a delegated v2 cgroup, else none (rlimits instead) |
//! | rlimits | as the policy says | never above the current hard limit |

use crate::namespaces::{own_ids, HostIds, RunAs};

/// Whether this supervisor runs as root or as an unprivileged user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Effective uid 0.
    Root,
    /// Any other user; the sandbox runs as these ids (the supervisor's own effective ones).
    Rootless(HostIds),
}

impl Privilege {
    /// The calling process's privilege (its effective uid), read once.
    pub fn of_this_process() -> Privilege {
        let own = own_ids();
        if own.uid == 0 {
            Privilege::Root
        } else {
            Privilege::Rootless(own)
        }
    }

    pub fn is_root(self) -> bool {
        self == Privilege::Root
    }

    /// The host identity the sandbox of a run by the supervisor with pid `pid` runs as, and a
    /// note for the operator when a per-run identity may be shared (see [`RunAs::resolve`]).
    /// Rootless, only the supervisor's own ids can be mapped, whatever `run_as` says.
    pub fn host_ids(self, run_as: RunAs, pid: u32) -> (HostIds, Option<String>) {
        match self {
            Privilege::Root => run_as.resolve(pid),
            Privilege::Rootless(own) => (own, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_runs_as_its_own_ids_whatever_run_as_says() {
        let own = HostIds {
            uid: 1000,
            gid: 1000,
        };
        let fixed = RunAs::Fixed(HostIds {
            uid: 1500,
            gid: 1500,
        });
        assert_eq!(Privilege::Rootless(own).host_ids(fixed, 7), (own, None));
        assert_eq!(
            Privilege::Root.host_ids(fixed, 7),
            (
                HostIds {
                    uid: 1500,
                    gid: 1500
                },
                None
            )
        );
    }

    #[test]
    fn this_process_matches_its_euid() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(Privilege::of_this_process().is_root(), root);
    }
}
