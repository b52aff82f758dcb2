//! The escape suite in rootless mode: the same attacks as tests/tests/escape.rs (the body is
//! tests/tests/escape/suite.rs), with `carapace exec` started as the unprivileged uid
//! `ROOTLESS_UID` (2000000, no passwd entry) through `setpriv --reuid --regid --clear-groups`,
//! its workspace handed to that uid. The sandbox then runs as that same host uid, in namespaces
//! owned by a user namespace of its own, without a cgroup on this machine (cgroups are not
//! delegated to users here: memory/pids/cpu fall back to rlimits).
//!
//! The CONTROLs stay as they are (the attack unconfined on the host, as root or as the
//! victim's uid). Victim processes (the marker) run as `ROOTLESS_UID` too, so only the sandbox,
//! not plain DAC, protects them.
//!
//! Checks that need a cgroup print "not applicable in rootless mode: needs a cgroup (...)" and
//! pass only if the attack is still contained otherwise:
//! - `escape_memory_bomb`: no OOM kill and no OOM report; the bomb must fail to allocate at
//!   RLIMIT_AS (the profile's memory limit, 512 MiB).
//! - `escape_fork_bomb`: no pids cgroup; RLIMIT_NPROC (the profile's pids limit, 128), counted
//!   per user namespace, must stop it at 128 processes (same assertion as root mode).
//! - `escape_spin_past_wall_time`: no cgroup kill on timeout; the wall-time kill of the
//!   sandbox's init (the whole pid namespace) must end it in time (same assertion).
//!
//! Needs root (to become the test user) and unprivileged user namespaces; fails (does not skip)
//! when either is missing, unless CARAPACE_ALLOW_SKIP=1.

/// How this crate runs carapace (see `carapace_tests::Mode`).
const MODE: carapace_tests::Mode = carapace_tests::Mode::Rootless;

/// The default policy's profile the attacks run in.
const BASE: &str = "tool";

include!("escape/suite.rs");
