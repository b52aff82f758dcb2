//! Tests of the command line: arguments, and the default policy's decisions.

use super::*;
use crate::cli::ctl::{
    answer_approval, audit_verify, ApprovalsArgs, ApprovalsCommand, AuditCommand,
};
use carapace_sandbox::namespaces::HostIds;
use clap::CommandFactory as _;

/// The command line as clap reads it (also for the operator commands' tests in `ctl`).
pub(crate) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(args)
}

#[test]
fn clap_definition_is_valid() {
    Cli::command().debug_assert();
}

#[test]
fn exec_args() {
    let c = parse(&["carapace", "exec", "--", "ls", "-la"]).unwrap();
    let Command::Exec(a) = c.command else {
        panic!("not exec")
    };
    assert_eq!(a.command, vec![OsString::from("ls"), OsString::from("-la")]);
    assert_eq!(a.run_as, RunAs::Auto);
    assert!(!a.report);

    // Without `--`, everything after PROGRAM belongs to it, flags included.
    let c = parse(&[
        "carapace",
        "exec",
        "--report",
        "--run-as",
        "1500:1501",
        "--workspace",
        "/tmp",
        "grep",
        "-r",
        "--report",
        "x",
    ])
    .unwrap();
    let Command::Exec(a) = c.command else {
        panic!("not exec")
    };
    assert!(a.report);
    assert_eq!(
        a.run_as,
        RunAs::Fixed(HostIds {
            uid: 1500,
            gid: 1501
        })
    );
    assert_eq!(a.workspace, Some(PathBuf::from("/tmp")));
    assert_eq!(a.command.len(), 4);
    assert_eq!(a.command[2], OsString::from("--report"));

    assert!(parse(&["carapace", "exec"]).is_err());
    assert!(parse(&["carapace", "exec", "--run-as", "0:0", "--", "ls"]).is_err());
    assert!(parse(&["carapace", "exec", "--run-as", "x", "--", "ls"]).is_err());
}

#[test]
fn audit_args() {
    let c = parse(&["carapace", "audit", "verify", "/x/audit.log"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Audit(AuditCommand::Verify { file, json: false }) if file == Path::new("/x/audit.log")
    ));
    assert!(parse(&["carapace", "audit", "verify"]).is_err());
    let c = parse(&["carapace", "audit", "rotate", "/x/audit.log", "--keep", "3"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Audit(AuditCommand::Rotate { file, keep: Some(3) }) if file == Path::new("/x/audit.log")
    ));
    assert!(parse(&["carapace", "audit", "rotate", "/x/audit.log", "--keep", "0"]).is_err());
    assert!(parse(&["carapace", "audit", "rotate"]).is_err());
}

#[test]
fn approvals_and_state_dir_args() {
    let c = parse(&["carapace", "approvals", "list", "--state-dir", "/s"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Approvals(ApprovalsArgs { state_dir: Some(ref d), command: ApprovalsCommand::List, .. })
            if d == Path::new("/s")
    ));
    let c = parse(&["carapace", "approvals", "allow", "12-3", "--always"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Approvals(ApprovalsArgs { command: ApprovalsCommand::Allow { ref key, always: true }, .. })
            if key == "12-3"
    ));
    assert!(parse(&["carapace", "approvals", "deny"]).is_err());
    let c = parse(&["carapace", "exec", "--state-dir", "/s", "--", "ls"]).unwrap();
    let Command::Exec(a) = c.command else {
        panic!("not exec")
    };
    assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
    assert_eq!(a.approval_timeout, 120);
    // Keys are PID-N only: nothing that could name another file.
    let t = tempfile::tempdir().unwrap();
    assert_eq!(answer_approval(t.path(), "../x", "deny"), 2);
    assert_eq!(answer_approval(t.path(), "", "deny"), 2);
    assert_eq!(answer_approval(t.path(), "1-1", "deny"), 1);
    std::fs::write(t.path().join("1-1.json"), "{}").unwrap();
    assert_eq!(answer_approval(t.path(), "1-1", "deny"), 0);
    assert_eq!(
        std::fs::read_to_string(t.path().join("1-1.answer")).unwrap(),
        "deny\n"
    );
}

#[test]
fn audit_verify_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing.log");
    // Unreadable is a failure to verify, not a usage error.
    assert_eq!(audit_verify(&missing), 1);
    let empty = t.path().join("empty.log");
    std::fs::write(&empty, "").unwrap();
    assert_eq!(audit_verify(&empty), 0);
    let junk = t.path().join("junk.log");
    std::fs::write(&junk, "not json\n").unwrap();
    assert_eq!(audit_verify(&junk), 1);
}

#[test]
fn policy_args() {
    let c = parse(&["carapace", "policy", "check", "a.toml", "b.toml"]).unwrap();
    assert!(
        matches!(c.command, Command::Policy(PolicyCommand::Check { files, json: false }) if files.len() == 2)
    );
    assert!(parse(&["carapace", "policy", "check"]).is_err());
    let c = parse(&["carapace", "policy", "explain", "--", "ls", "-l"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Policy(PolicyCommand::Explain { file: None, command, json: false }) if command.len() == 2
    ));
    let c = parse(&["carapace", "policy", "explain", "p.toml", "--", "ls"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Policy(PolicyCommand::Explain { file: Some(_), .. })
    ));
    assert!(parse(&["carapace", "policy", "show-default"]).is_ok());
}

#[test]
fn default_policy_is_valid_and_decides() {
    let p = load_policy(None).unwrap();
    let target = carapace_sandbox::landlock::target();
    let d = decide(
        &p,
        &[OsString::from("ls"), OsString::from("-la")],
        Path::new("/"),
        None,
        &target,
    )
    .unwrap();
    assert_eq!(d.decision.approval, Approval::Allow);
    assert!(d.plan.is_some(), "{:?}", d.compile_error);
    let d = decide(&p, &[OsString::from("sudo")], Path::new("/"), None, &target);
    if let Ok(d) = d {
        assert_eq!(d.decision.approval, Approval::Deny);
    }
    assert!(decide(
        &p,
        &[OsString::from("no-such-prog-xyz")],
        Path::new("/"),
        None,
        &target
    )
    .is_err());
}

#[test]
fn decide_and_load_policy_errors_are_typed() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope.toml");
    let e = load_policy(Some(&missing)).unwrap_err();
    assert!(
        matches!(&e, DecideError::Read { path, .. } if *path == missing),
        "{e:?}"
    );
    let shown = error_chain(&e);
    assert!(shown.starts_with("cannot read "), "{shown}");
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
    let p = load_policy(None).unwrap();
    let target = carapace_sandbox::landlock::target();
    let e = decide(&p, &[], Path::new("/"), None, &target).unwrap_err();
    assert!(matches!(e, DecideError::NoProgram), "{e:?}");
    assert_eq!(e.to_string(), "no program given");
    let e = decide(
        &p,
        &[OsString::from("no-such-prog-xyz")],
        Path::new("/"),
        None,
        &target,
    )
    .unwrap_err();
    assert!(matches!(e, DecideError::Resolve(_)), "{e:?}");
    use std::os::unix::ffi::OsStringExt as _;
    let e = decide(
        &p,
        &[OsString::from("ls"), OsString::from_vec(vec![0xff])],
        Path::new("/"),
        None,
        &target,
    )
    .unwrap_err();
    assert!(matches!(e, DecideError::NotUtf8 { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
}

#[test]
fn open_report_refuses_links_and_says_why_not() {
    let t = tempfile::tempdir().unwrap();
    let ok = t.path().join("r.json");
    open_report(&ok).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&ok, &link).unwrap();
    let e = open_report(&link).unwrap_err();
    assert!(
        matches!(&e, ExecError::ReportLink { path } if *path == link),
        "{e:?}"
    );
    assert!(e.to_string().contains("symbolic link; refused"), "{e}");
    let e = open_report(&t.path().join("no/dir/r.json")).unwrap_err();
    assert!(matches!(e, ExecError::Report { .. }), "{e:?}");
    let shown = error_chain(&e);
    assert!(shown.starts_with("--report-json "), "{shown}");
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
}
