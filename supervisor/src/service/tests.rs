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
        ..ExitReport::setup_failure()
    };
    assert_eq!(describe_exit(&r), "exit=3");
    r.code = None;
    r.signal = Some(9);
    r.oom_killed = true;
    assert_eq!(describe_exit(&r), "signal=9 (oom)");
}

/// The embedded configuration with `policy` as its policy files.
fn config_with_policy(policy: Vec<PathBuf>) -> Config {
    let (mut cfg, _) = Config::load(None).unwrap();
    cfg.policy = policy;
    cfg
}

#[test]
fn load_policy_errors_carry_their_cause_once() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope.toml");
    let e = load_policy(&config_with_policy(vec![missing.clone()])).unwrap_err();
    assert!(
        matches!(&e, ServiceError::ReadPolicy { path, source }
            if *path == missing && source.kind() == io::ErrorKind::NotFound),
        "{e:?}"
    );
    let shown = error_chain(&e);
    assert!(shown.starts_with("cannot read "), "{shown}");
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");

    let e = load_policy(&config_with_policy(vec![missing.clone(), missing])).unwrap_err();
    assert!(matches!(e, ServiceError::ManyPolicies), "{e:?}");

    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "[profiles.x]\nno_such_key = 1\n").unwrap();
    let e = load_policy(&config_with_policy(vec![bad])).unwrap_err();
    assert!(matches!(e, ServiceError::Policy(_)), "{e:?}");

    // The embedded policy defines the embedded configuration's profiles.
    load_policy(&config_with_policy(Vec::new())).unwrap();
}

#[test]
fn spec_of_a_missing_program_names_it() {
    let (cfg, _) = Config::load(None).unwrap();
    let Some((_, child)) = cfg.children().next() else {
        return;
    };
    let mut child = child.clone();
    child.program = "/nonexistent/carapace-test-program".into();
    let e = spec_of(&child, Path::new("/")).unwrap_err();
    assert!(
        matches!(&e, ServiceError::Program { path, .. }
            if path == Path::new("/nonexistent/carapace-test-program")),
        "{e:?}"
    );
    let shown = error_chain(&e);
    assert!(
        shown.starts_with("program /nonexistent/carapace-test-program: "),
        "{shown}"
    );
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
}

#[test]
fn spec_of_a_bare_name_found_nowhere_says_where_it_looked() {
    let (cfg, _) = Config::load(None).unwrap();
    let mut child = cfg.gateway.clone().unwrap();
    child.program = "carapace-test-no-such-program".into();
    let e = spec_of(&child, Path::new("/nonexistent-exe-dir")).unwrap_err();
    assert!(matches!(&e, ServiceError::ProgramNotFound(_)), "{e:?}");
    let shown = error_chain(&e);
    assert!(
        shown.contains("/nonexistent-exe-dir/carapace-test-no-such-program")
            && shown.contains("/usr/libexec/carapace/carapace-test-no-such-program"),
        "{shown}"
    );
}

#[test]
fn ensure_dir_creates_0700_and_refuses_a_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("a/ws");
    ensure_dir(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    ensure_dir(&dir).unwrap();
    let file = t.path().join("file");
    std::fs::write(&file, "").unwrap();
    let e = ensure_dir(&file).unwrap_err();
    assert!(
        matches!(&e, ServiceError::CreateDir { path, .. } if *path == file),
        "{e:?}"
    );
    assert!(error_chain(&e).starts_with("cannot create "), "{e}");
}
