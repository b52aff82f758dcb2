//! `carapace run` killed with SIGKILL: the gateway dies with the supervisor, and the next start
//! removes what the dead one left (the harness: `carapace_tests::service`).
//!
//! This test has a binary of its own because it must run alone: any supervisor or
//! `carapace exec` that starts beneath the same cgroup while it waits clears the leftover
//! cgroup it checks for (every start does, by design), and the tests of one binary run in
//! parallel while binaries run one after another.
//!
//! It runs as root (CI); it fails, never skips, when not root unless CARAPACE_ALLOW_SKIP=1.

use std::fs;
use std::time::Duration;

use carapace_tests::*;

/// SIGKILL of the supervisor: the gateway dies with it; the next start cleans up.
#[test]
fn sigkill_of_the_supervisor_leaves_no_process() {
    if !privileged() {
        return;
    }
    let mut svc = Service::start("");
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    let prog_cgroup = fs::read_to_string(format!("/proc/{prog}/cgroup")).unwrap_or_default();
    svc.kill();
    assert!(
        wait_gone(prog, Duration::from_secs(5)),
        "gateway program survived SIGKILL"
    );
    assert!(
        wait_gone(init, Duration::from_secs(5)),
        "sandbox init survived SIGKILL"
    );
    // Its cgroup is left behind (nobody removed it) ...
    let name = cgroup_name_of(&prog_cgroup);
    assert!(!cgroup_dirs_named(&name).is_empty(), "{name} already gone?");
    // ... until the next start cleans the leftovers of a dead supervisor (older than 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let svc2 = Service::start("");
    svc2.gateway_running(None, Duration::from_secs(20));
    assert!(
        cgroup_dirs_named(&name).is_empty(),
        "leftover cgroup {name} not removed; log:\n{}",
        svc2.log_text()
    );
    assert!(
        svc2.log_text().contains("left by a previous supervisor"),
        "{}",
        svc2.log_text()
    );
}

/// The run cgroup's name (`gateway-<pid>-<n>`) from a /proc/N/cgroup text.
fn cgroup_name_of(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|p| p.contains("/carapace/gateway-"))
        .and_then(|p| p.rsplit('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no gateway cgroup in {text}"))
}
