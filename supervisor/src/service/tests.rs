//! Tests of the service: restarts, children, reloads, the control handler.

use super::*;

#[test]
fn backoff_doubles_up_to_the_cap() {
    let r = Restart {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        loop_starts: 5,
        loop_window: Duration::from_secs(60),
    };
    assert_eq!(r.delay(0), Duration::from_millis(500));
    assert_eq!(r.delay(1), Duration::from_secs(1));
    assert_eq!(r.delay(3), Duration::from_secs(4));
    assert_eq!(r.delay(6), Duration::from_secs(30));
    assert_eq!(r.delay(1000), Duration::from_secs(30));
}

#[test]
fn a_program_outside_every_mount_is_bound_alone() {
    let policy = Policy::parse(crate::embedded::DEFAULT_POLICY, "default").unwrap();
    let mut plan = policy
        .compile("gateway", &Target { landlock_abi: 6 })
        .unwrap();
    let before = plan.mounts.len();
    bind_program(&mut plan, Path::new("/usr/bin/true"));
    assert_eq!(
        plan.mounts.len(),
        before,
        "/usr is mounted read-exec already"
    );
    bind_program(&mut plan, Path::new("/opt/x/carapace-gateway"));
    assert_eq!(plan.mounts.len(), before + 1);
    let i = plan
        .mounts
        .iter()
        .position(|m| m.dst() == Path::new("/opt/x/carapace-gateway"))
        .unwrap();
    // Parents first: every mount before it is no deeper; symlinks stay last.
    assert!(plan.mounts[..i]
        .iter()
        .all(|m| m.dst().components().count() <= 4));
    assert!(plan.mounts[i + 1..]
        .iter()
        .all(|m| !matches!(m, Mount::Bind { .. })
            || m.dst().components().count() > 4
            || matches!(m, Mount::Symlink { .. })));
    assert!(plan.landlock.rules.iter().any(|r| r.path
        == LandlockPath::Host("/opt/x/carapace-gateway".into())
        && r.rights.execute
        && !r.rights.write));
}

#[test]
fn configured_variables_join_and_override_the_environment() {
    let base = vec![("PATH".into(), "/bin".into()), ("LANG".into(), "C".into())];
    let env = child_env(
        &base,
        &[
            ("LANG".into(), "en_US.UTF-8".into()),
            ("X".into(), "1".into()),
        ],
    );
    let get = |k: &str| {
        env.iter()
            .filter(|(n, _)| n.as_os_str() == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("PATH"), ["/bin"]);
    assert_eq!(get("LANG"), ["en_US.UTF-8"]);
    assert_eq!(get("X"), ["1"]);
}

#[test]
fn child_log_levels_are_kept() {
    assert_eq!(
        split_level(" WARN no broker"),
        (Some(tracing::Level::WARN), "no broker")
    );
    assert_eq!(split_level("ERROR x"), (Some(tracing::Level::ERROR), "x"));
    assert_eq!(
        split_level(" INFO  serving"),
        (Some(tracing::Level::INFO), "serving")
    );
    assert_eq!(split_level("INFORMATION"), (None, "INFORMATION"));
    assert_eq!(split_level("plain text"), (None, "plain text"));
}

#[test]
fn exits_are_described() {
    let mut r = ExitReport {
        code: Some(3),
        signal: None,
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        peak_mem: 0,
        oom_killed: false,
        timed_out: false,
    };
    assert_eq!(describe_exit(&r), "exit=3");
    r.code = None;
    r.signal = Some(9);
    r.oom_killed = true;
    assert_eq!(describe_exit(&r), "signal=9 (oom)");
}
