//! cgroups for confined children: one cgroup per run, beneath the supervisor's own cgroup.
//!
//! # Why this module is written by hand
//!
//! `cgroups-rs` assumes one consistent layout (all-v1 or all-v2). The build machines run the
//! *hybrid* layout: `memory`, `pids`, `cpu`, `cpuacct` and `freezer` are v1 hierarchies mounted
//! at `/sys/fs/cgroup/<controller>/`, while `/sys/fs/cgroup/unified` is a v2 hierarchy with no
//! controllers at all (only core files such as `cgroup.kill`). Production hosts are pure v2 with
//! systemd delegation. Our own position also differs per hierarchy (on the build machines the
//! memory cgroup is `/process_api/<hash>` while `pids` is `/`). Handling that per controller, and
//! failing closed when a controller the policy needs is missing, is simpler to get right here
//! than to bend a library around.
//!
//! # Rules
//!
//! * [`Layout`] is read from `/proc/self/mountinfo` (which hierarchies are mounted where, and
//!   with which controllers) and `/proc/self/cgroup` (our own cgroup in each hierarchy).
//! * Cgroups are created only beneath our own cgroup, per hierarchy, under a `carapace/` parent:
//!   `<own>/carapace/<name>`. Processes we did not start are never moved or signalled.
//! * Each controller is taken from the v1 hierarchy it is mounted on, else from the v2 hierarchy
//!   when our v2 cgroup offers it. A v2 cgroup is always created when a v2 hierarchy is mounted,
//!   even without controllers (hybrid), so that `cgroup.kill` can kill the whole tree.
//! * Fail closed: a limit whose controller is not available is an error naming the controller
//!   and the fix; nothing is started half-limited.
//! * v2 "no internal processes": controllers can only be enabled for children of a cgroup that
//!   holds no processes. If our own cgroup holds only the supervisor itself, the supervisor moves
//!   itself into `<own>/carapace/supervisor` first (what systemd delegation expects), with its
//!   [companions](add_companion) (the tool spawner it forked); if it holds anything else,
//!   creation fails and asks for a delegated unit.
//!
//! Creation is split into a pure-ish *plan* (read-only inspection of the tree, see
//! [`Layout::plan`]) and its application, so the decisions are unit-tested on fake trees and the
//! kernel side by privileged tests on the real hierarchy.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use carapace_policy::plan::CgroupLimits;
use serde::Serialize;

mod delegation;
mod layout;
mod live;
mod plan;
mod stale;
#[cfg(test)]
mod tests;

/// Processes of this supervisor's own besides itself (the tool spawner, forked before any
/// cgroup was made): they share its cgroup, move with it into `carapace/supervisor`, and are
/// never taken for processes someone else started.
static COMPANIONS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Count `pid` (a child this process forked and keeps) among the supervisor's own processes.
pub fn add_companion(pid: i32) {
    if let Ok(mut c) = COMPANIONS.lock() {
        if !c.contains(&pid) {
            c.push(pid);
        }
    }
}

/// The supervisor's companions (see [`add_companion`]).
pub(crate) fn companions() -> Vec<i32> {
    COMPANIONS.lock().map(|c| c.clone()).unwrap_or_default()
}

pub use delegation::*;
pub use layout::*;
pub use live::*;
pub use plan::*;
pub use stale::*;

/// Name of the directory carapace creates beneath its own cgroup in every hierarchy.
pub const PARENT_DIR: &str = "carapace";
/// Leaf the supervisor moves itself into on v2 when its own cgroup must stay process-free.
pub const SUPERVISOR_LEAF: &str = "supervisor";

/// How long `kill_all` waits for a cgroup to become empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `remove` retries `rmdir` on EBUSY.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
/// CFS period used for cpu limits, in microseconds (the kernel default).
const CFS_PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts, in microseconds.
const CFS_MIN_QUOTA_US: u64 = 1_000;
/// Largest period the kernel accepts, in microseconds.
const CFS_MAX_PERIOD_US: u64 = 1_000_000;

/// Errors of this module. I/O errors carry the operation and the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup: the policy sets a {what} limit, which needs the `{controller}` controller, but \
         it is not available ({detail}). Fix: {fix}"
    )]
    ControllerUnavailable {
        controller: &'static str,
        what: &'static str,
        detail: String,
        fix: String,
    },
    #[error(
        "cgroup: cannot enable controllers below {}: it holds processes carapace did not start \
         (pids {pids:?}) and cgroup v2 forbids controllers in a cgroup with processes. Run \
         carapace in its own delegated cgroup, e.g. `systemd-run --scope -p Delegate=yes carapace \
         ...` or a service with Delegate=yes",
        path.display()
    )]
    ForeignProcesses { path: PathBuf, pids: Vec<i32> },
    #[error("cgroup: no cgroup hierarchy is usable: {detail}. Fix: mount cgroup2 at /sys/fs/cgroup (or the v1 controllers) and run carapace in a cgroup it may write")]
    NoHierarchy { detail: String },
    #[error("cgroup: invalid cgroup name {name:?}: use 1-64 characters from [A-Za-z0-9_-], not `{SUPERVISOR_LEAF}`")]
    InvalidName { name: String },
    #[error("cgroup: invalid {what} limit {value}: {detail}")]
    InvalidLimit {
        what: &'static str,
        value: u64,
        detail: &'static str,
    },
    #[error("cgroup: cannot parse {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("cgroup: {} still has processes {pids:?} after {waited:?}", path.display())]
    NotEmpty {
        path: PathBuf,
        pids: Vec<i32>,
        waited: Duration,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
