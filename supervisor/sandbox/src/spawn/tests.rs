//! Unit tests of `spawn`.

use super::*;
use carapace_policy::plan::EnvPlan;

#[test]
fn env_is_scrubbed_pass_then_set() {
    let plan = EnvPlan {
        pass: vec!["LANG".into(), "TERM".into(), "MISSING".into()],
        set: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("TERM".into(), "dumb".into()),
        ],
    };
    let source: Vec<(OsString, OsString)> = [
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm"),
        ("SECRET_TOKEN", "hunter2"),
        ("PATH", "/home/x/bin"),
    ]
    .iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect();
    let env = build_env(&plan, &source);
    let s: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    assert_eq!(s, vec!["LANG=C.UTF-8", "TERM=dumb", "PATH=/usr/bin:/bin"]);
}

#[test]
fn how_a_program_is_executed_and_what_the_profile_must_allow_for_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let policy = carapace_policy::Policy::parse(crate::DEFAULT_POLICY, "default").unwrap();
    let plan = policy.compile("tool", &crate::landlock::target()).unwrap();
    let t = tempfile::tempdir().unwrap();
    let open = |name: &str, body: &[u8]| {
        let p = t.path().join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        OpenedProgram::open(&std::fs::canonicalize(&p).unwrap()).unwrap()
    };
    let elf = open("elf", b"\x7fELF");
    let script = open("script", b"#!/bin/sh\n");
    // ELF anywhere, and scripts where the sandbox could swap them, run from the checked
    // descriptor; a script in a read-only mount keeps its path (and its `$0`).
    assert_eq!(Exec::choose(false, true), Exec::Fd);
    assert_eq!(Exec::choose(false, false), Exec::Fd);
    assert_eq!(Exec::choose(true, true), Exec::ScriptFd);
    assert_eq!(Exec::choose(true, false), Exec::ScriptPath);
    check_exec(&plan, &elf, Exec::Fd).unwrap();
    check_exec(&plan, &script, Exec::ScriptFd).unwrap();
    check_exec(&plan, &script, Exec::ScriptPath).unwrap();

    // `/dev/fd/N` needs /proc; a script run by its path does not.
    let mut no_proc = plan.clone();
    no_proc.mounts.retain(|m| !matches!(m, Mount::Proc { .. }));
    check_exec(&no_proc, &elf, Exec::Fd).unwrap();
    check_exec(&no_proc, &script, Exec::ScriptPath).unwrap();
    let e = check_exec(&no_proc, &script, Exec::ScriptFd).unwrap_err();
    assert!(
        matches!(&e, SpawnError::ScriptNeedsDevFd { program, profile }
            if program == script.path() && *profile == plan.profile),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("/dev/fd/N") && e.contains("proc"), "{e}");

    // The syscall that starts the program must get through the filter.
    let mut no_execveat = plan.clone();
    no_execveat.seccomp.allowed.retain(|s| s != "execveat");
    let e = check_exec(&no_execveat, &elf, Exec::Fd).unwrap_err();
    assert!(
        matches!(
            &e,
            SpawnError::ExecNotAllowed {
                syscall: "execveat",
                ..
            }
        ),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("execveat"), "{e}");
    check_exec(&no_execveat, &script, Exec::ScriptPath).unwrap();
    let mut no_execve = plan.clone();
    no_execve.seccomp.allowed.retain(|s| s != "execve");
    let e = check_exec(&no_execve, &script, Exec::ScriptPath)
        .unwrap_err()
        .to_string();
    assert!(e.contains("syscall execve,"), "{e}");
    // A filter whose default lets it through (log) is fine.
    no_execveat.seccomp.default_action = SeccompAction::Log;
    check_exec(&no_execveat, &elf, Exec::Fd).unwrap();
}

#[test]
fn stages_roundtrip() {
    for s in Stage::ALL {
        assert_eq!(Stage::from_u32(s as u32), Some(s));
        assert!(!s.name().is_empty());
    }
    assert_eq!(Stage::from_u32(0), None);
    assert_eq!(Stage::from_u32(999), None);
}

#[test]
fn refused_user_namespaces_are_recognised() {
    for e in [libc::EPERM, libc::EACCES, libc::ENOSPC, libc::EUSERS] {
        assert!(userns_refused(&io::Error::from_raw_os_error(e)));
    }
    for e in [libc::ENOMEM, libc::EAGAIN, libc::EINVAL] {
        assert!(!userns_refused(&io::Error::from_raw_os_error(e)));
    }
    let m = SpawnError::RootlessUserns {
        source: io::Error::from_raw_os_error(libc::EPERM),
    }
    .to_string();
    assert!(m.contains("user.max_user_namespaces"), "{m}");
}

#[test]
fn null_terminated_arrays() {
    let v = vec![CString::new("a").unwrap(), CString::new("b").unwrap()];
    let p = null_terminated(&v);
    assert_eq!(p.len(), 3);
    assert!(p[2].is_null());
    assert_eq!(p[0], v[0].as_ptr());
}
