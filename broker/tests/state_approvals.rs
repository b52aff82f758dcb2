//! Approvals: pending -> allow once / allow always / deny / timeout; grants persist, are bound to
//! (program, content hash, argv, profile), and a corrupt state file is an error that loses nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use carapace_broker::approvals::{
    self, ApprovalError, Approvals, Decision, PendingSpec, Requested, Resolution, STATE_FILE,
};
use carapace_broker::audit::{self, Who};

const LONG: Duration = Duration::from_secs(30);

struct Fixture {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    program: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let program = tmp.path().join("tool");
    fs::write(&program, b"#!/bin/sh\necho version 1\n").unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    Fixture {
        state,
        program,
        _tmp: tmp,
    }
}

fn spec(program: &Path, argv: &[&str], profile: &str) -> PendingSpec {
    PendingSpec {
        identity: Who {
            id: 9,
            role: "gateway".into(),
            profile: "agent".into(),
        },
        program: program.to_path_buf(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        profile: profile.into(),
        cwd: PathBuf::from("/work"),
    }
}

fn pending(r: Requested) -> approvals::Pending {
    match r {
        Requested::Pending(p) => p,
        Requested::Allowed(g) => panic!("expected pending, got grant {g:?}"),
        Requested::Answered(d) => panic!("expected pending, got an earlier answer {d:?}"),
    }
}

/// Resolves `id` from another thread after a short delay, while the caller waits.
fn resolve_later(a: &Arc<Approvals>, id: u64, res: Resolution) -> thread::JoinHandle<Decision> {
    let a = Arc::clone(a);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        a.resolve(id, res).unwrap()
    })
}

#[test]
fn pending_shows_what_the_operator_needs_and_allow_once_is_not_remembered() {
    let f = fixture();
    let a = Arc::new(Approvals::open(&f.state, LONG).unwrap());
    let p = pending(a.request(spec(&f.program, &["tool", "-x"], "dev")).unwrap());
    assert_eq!(
        p.program_sha256,
        audit::sha256_hex(&fs::read(&f.program).unwrap())
    );
    assert_eq!(p.argv, ["tool", "-x"]);
    assert_eq!(p.profile, "dev");
    assert_eq!(p.identity.id, 9);
    assert_eq!(p.cwd, PathBuf::from("/work"));
    assert_eq!(a.list(), vec![p.clone()]);

    let h = resolve_later(&a, p.id, Resolution::AllowOnce);
    let d = a.wait(p.id, Instant::now() + LONG).unwrap();
    assert_eq!(h.join().unwrap(), Decision::AllowOnce);
    assert_eq!(d, Decision::AllowOnce);
    assert!(d.is_allow());
    assert!(a.list().is_empty());
    // Waited on: gone.
    assert!(matches!(
        a.wait(p.id, Instant::now()),
        Err(ApprovalError::UnknownId { .. })
    ));
    // Once means once: the same request asks again, nothing persisted.
    let p2 = pending(a.request(spec(&f.program, &["tool", "-x"], "dev")).unwrap());
    assert_ne!(p2.id, p.id);
    assert!(!f.state.join(STATE_FILE).exists());
}

#[test]
fn deny_is_a_denial_and_double_resolution_is_refused() {
    let f = fixture();
    let a = Arc::new(Approvals::open(&f.state, LONG).unwrap());
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    let h = resolve_later(&a, p.id, Resolution::Deny);
    let d = a.wait(p.id, Instant::now() + LONG).unwrap();
    h.join().unwrap();
    assert_eq!(d, Decision::Denied);
    assert!(!d.is_allow());

    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    a.resolve(p.id, Resolution::Deny).unwrap();
    assert!(matches!(
        a.resolve(p.id, Resolution::AllowAlways),
        Err(ApprovalError::AlreadyResolved { .. })
    ));
    assert!(matches!(
        a.resolve(999, Resolution::AllowOnce),
        Err(ApprovalError::UnknownId { id: 999 })
    ));
    assert_eq!(a.wait(p.id, Instant::now()).unwrap(), Decision::Denied);
    assert!(a.grants().is_empty());
}

#[test]
fn unanswered_approval_times_out_to_deny() {
    let f = fixture();
    let a = Approvals::open(&f.state, Duration::from_millis(80)).unwrap();
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    let t0 = Instant::now();
    let d = a.wait(p.id, t0 + LONG).unwrap();
    assert_eq!(d, Decision::TimedOut);
    assert_eq!(d.as_str(), "timed out");
    assert!(!d.is_allow());
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(10));

    // Resolving after expiry is refused, and the waiter sees a timeout.
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    thread::sleep(Duration::from_millis(100));
    assert!(a.list().is_empty(), "expired approvals are not listed");
    assert!(matches!(
        a.resolve(p.id, Resolution::AllowAlways),
        Err(ApprovalError::Expired { .. })
    ));
    assert_eq!(
        a.wait(p.id, Instant::now() + LONG).unwrap(),
        Decision::TimedOut
    );
    assert!(a.grants().is_empty());

    // The caller's own deadline also ends the wait as a timeout.
    let a = Approvals::open(&f.state, LONG).unwrap();
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    let t0 = Instant::now();
    let d = a.wait(p.id, t0 + Duration::from_millis(50)).unwrap();
    assert_eq!(d, Decision::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn cancel_wakes_the_waiter_with_a_denial() {
    let f = fixture();
    let a = Arc::new(Approvals::open(&f.state, LONG).unwrap());
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    let a2 = Arc::clone(&a);
    let id = p.id;
    let h = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        a2.cancel(id);
    });
    assert_eq!(
        a.wait(p.id, Instant::now() + LONG).unwrap(),
        Decision::Cancelled
    );
    h.join().unwrap();
}

#[test]
fn allow_always_persists_across_reopen_and_is_bound_exactly() {
    let f = fixture();
    {
        let a = Arc::new(Approvals::open(&f.state, LONG).unwrap());
        let p = pending(
            a.request(spec(&f.program, &["tool", "--safe"], "dev"))
                .unwrap(),
        );
        let h = resolve_later(&a, p.id, Resolution::AllowAlways);
        assert_eq!(
            a.wait(p.id, Instant::now() + LONG).unwrap(),
            Decision::AllowAlways
        );
        h.join().unwrap();
    }
    let file = f.state.join(STATE_FILE);
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // No temporary files left in the state dir, and no pending approval once it was answered.
    let mut names: Vec<String> = fs::read_dir(&f.state)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [STATE_FILE, approvals::ASKS_DIR]);
    assert_eq!(
        fs::read_dir(f.state.join(approvals::ASKS_DIR))
            .unwrap()
            .count(),
        0
    );

    // A new broker (reopen): the same request is allowed without asking.
    let a = Approvals::open(&f.state, LONG).unwrap();
    match a
        .request(spec(&f.program, &["tool", "--safe"], "dev"))
        .unwrap()
    {
        Requested::Allowed(g) => {
            assert_eq!(g.program, f.program);
            assert_eq!(g.argv, ["tool", "--safe"]);
            assert_eq!(g.profile, "dev");
            assert_eq!(g.requested_by.id, 9);
        }
        other => panic!("expected a grant, got {other:?}"),
    }
    assert!(a.list().is_empty());
    // Any other argv, profile or program asks.
    pending(
        a.request(spec(&f.program, &["tool", "--safe", "x"], "dev"))
            .unwrap(),
    );
    pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    pending(
        a.request(spec(&f.program, &["tool", "--safe"], "other"))
            .unwrap(),
    );
    let copy = f.program.with_file_name("tool-copy");
    fs::copy(&f.program, &copy).unwrap();
    pending(a.request(spec(&copy, &["tool", "--safe"], "dev")).unwrap());
    assert_eq!(a.list().len(), 4);
}

#[test]
fn a_changed_binary_asks_again() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let s = || spec(&f.program, &["tool"], "dev");
    let p = pending(a.request(s()).unwrap());
    a.resolve(p.id, Resolution::AllowAlways).unwrap();
    assert!(matches!(a.request(s()).unwrap(), Requested::Allowed(_)));

    fs::write(&f.program, b"#!/bin/sh\necho version 2 (evil)\n").unwrap();
    let p2 = pending(a.request(s()).unwrap());
    assert_ne!(p2.program_sha256, p.program_sha256);
    // Also after a restart.
    let a = Approvals::open(&f.state, LONG).unwrap();
    pending(a.request(s()).unwrap());
    // Put the approved content back: allowed again.
    fs::write(&f.program, b"#!/bin/sh\necho version 1\n").unwrap();
    assert!(matches!(a.request(s()).unwrap(), Requested::Allowed(_)));
}

#[test]
fn an_unreadable_program_is_an_error() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let missing = f.program.with_file_name("missing");
    assert!(matches!(
        a.request(spec(&missing, &["x"], "dev")),
        Err(ApprovalError::Program { .. })
    ));
    // A directory is not a program (and /dev/zero would never finish hashing).
    assert!(matches!(
        a.request(spec(&f.state, &["x"], "dev")),
        Err(ApprovalError::Program { .. })
    ));
    assert!(matches!(
        a.request(spec(Path::new("/dev/zero"), &["x"], "dev")),
        Err(ApprovalError::Program { .. })
    ));
    assert!(a.list().is_empty());
}

#[test]
fn a_corrupt_state_file_is_a_clear_error_and_nothing_is_lost() {
    let f = fixture();
    fs::create_dir_all(&f.state).unwrap();
    let file = f.state.join(STATE_FILE);
    let garbage = b"{\"version\":1,\"grants\":[{\"program\":";
    fs::write(&file, garbage).unwrap();

    let e = Approvals::open(&f.state, LONG).unwrap_err();
    assert!(matches!(e, ApprovalError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(STATE_FILE), "{e}");
    // Untouched.
    assert_eq!(fs::read(&file).unwrap(), garbage);
    // An unknown version is refused too (not silently emptied).
    fs::write(&file, b"{\"version\":2,\"grants\":[]}").unwrap();
    assert!(matches!(
        Approvals::open(&f.state, LONG),
        Err(ApprovalError::Corrupt { .. })
    ));
    fs::write(&file, garbage).unwrap();

    // Set it aside explicitly: kept, byte for byte; then the broker starts with no grants.
    let aside = approvals::set_aside_corrupt(&f.state).unwrap();
    assert_eq!(fs::read(&aside).unwrap(), garbage);
    assert!(!file.exists());
    let a = Approvals::open(&f.state, LONG).unwrap();
    assert!(a.grants().is_empty());
    // A second corrupt file set aside in the same second does not overwrite the first.
    drop(a);
    fs::write(&file, b"second").unwrap();
    let aside2 = approvals::set_aside_corrupt(&f.state).unwrap();
    assert_ne!(aside, aside2);
    assert_eq!(fs::read(&aside).unwrap(), garbage);
    assert_eq!(fs::read(&aside2).unwrap(), b"second");
}

#[test]
fn a_failed_persist_allows_nothing_and_leaves_the_approval_pending() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    // Make the rename target impossible: a non-empty directory where the state file goes.
    fs::create_dir_all(f.state.join(STATE_FILE).join("x")).unwrap();
    let e = a.resolve(p.id, Resolution::AllowAlways).unwrap_err();
    assert!(matches!(e, ApprovalError::Io { op: "rename", .. }), "{e}");
    assert!(a.grants().is_empty());
    assert_eq!(a.list().len(), 1, "still pending");
    // No temporary file left behind (besides the pending approval's own directory).
    let n = fs::read_dir(&f.state)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != approvals::ASKS_DIR)
        .count();
    assert_eq!(n, 1);
    // The operator can still decide otherwise.
    assert_eq!(
        a.resolve(p.id, Resolution::AllowOnce).unwrap(),
        Decision::AllowOnce
    );
}

#[test]
fn pending_approvals_are_bounded() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    for _ in 0..approvals::MAX_PENDING {
        pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    }
    assert!(matches!(
        a.request(spec(&f.program, &["tool"], "dev")),
        Err(ApprovalError::TooMany { .. })
    ));
    // Resolving and waiting on one makes room again.
    let first = a.list()[0].id;
    a.resolve(first, Resolution::Deny).unwrap();
    assert_eq!(a.wait(first, Instant::now()).unwrap(), Decision::Denied);
    pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
}

#[test]
fn a_revoked_grant_asks_again_also_after_reopen() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let s = || spec(&f.program, &["tool"], "dev");
    let p = pending(a.request(s()).unwrap());
    a.resolve(p.id, Resolution::AllowAlways).unwrap();
    let g = match a.request(s()).unwrap() {
        Requested::Allowed(g) => g,
        other => panic!("{other:?}"),
    };
    assert!(a.revoke(&g).unwrap());
    assert!(!a.revoke(&g).unwrap());
    pending(a.request(s()).unwrap());
    let a = Approvals::open(&f.state, LONG).unwrap();
    assert!(a.grants().is_empty());
    pending(a.request(s()).unwrap());
}

#[test]
fn a_pending_approval_survives_a_restart_and_is_taken_over_by_the_same_request() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let p = pending(a.request(spec(&f.program, &["tool", "x"], "dev")).unwrap());
    // The broker dies with the approval open (nothing is resolved or removed).
    drop(a);
    let a = Approvals::open(&f.state, LONG).unwrap();
    let listed = a.list();
    assert_eq!(listed.len(), 1, "the operator still sees it");
    assert_eq!(listed[0].argv, p.argv);
    assert_eq!(listed[0].program_sha256, p.program_sha256);
    // The same request asked again takes it over: one approval, not two.
    let again = pending(a.request(spec(&f.program, &["tool", "x"], "dev")).unwrap());
    assert_eq!(again.id, listed[0].id);
    assert_eq!(a.list().len(), 1);
    // Another request is another approval.
    pending(a.request(spec(&f.program, &["tool", "y"], "dev")).unwrap());
    assert_eq!(a.list().len(), 2);
    // Once answered and waited for, its file is gone: a further restart does not offer it.
    a.resolve(again.id, Resolution::AllowOnce).unwrap();
    assert_eq!(
        a.wait(again.id, Instant::now() + LONG).unwrap(),
        Decision::AllowOnce
    );
    drop(a);
    let a = Approvals::open(&f.state, LONG).unwrap();
    let left = a.list();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].argv, vec!["tool".to_string(), "y".to_string()]);
}

#[test]
fn an_answer_given_after_a_restart_waits_for_the_request_it_answers() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    pending(a.request(spec(&f.program, &["tool", "-v"], "dev")).unwrap());
    drop(a);
    let a = Approvals::open(&f.state, LONG).unwrap();
    let l = a.list();
    let (allow, deny) = (l[0].id, l[1].id);
    a.resolve(allow, Resolution::AllowOnce).unwrap();
    a.resolve(deny, Resolution::Deny).unwrap();
    assert!(a.list().is_empty());
    // The requests come again (an agent re-running its message): each gets its answer, once.
    assert_eq!(
        a.request(spec(&f.program, &["tool"], "dev")).unwrap(),
        Requested::Answered(Decision::AllowOnce)
    );
    assert_eq!(
        a.request(spec(&f.program, &["tool", "-v"], "dev")).unwrap(),
        Requested::Answered(Decision::Denied)
    );
    pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    // A changed program is another question: the old answer does not apply to it.
    let b = Approvals::open(f.state.join("other"), LONG).unwrap();
    pending(b.request(spec(&f.program, &["tool"], "dev")).unwrap());
    drop(b);
    let b = Approvals::open(f.state.join("other"), LONG).unwrap();
    b.resolve(b.list()[0].id, Resolution::AllowOnce).unwrap();
    fs::write(&f.program, b"#!/bin/sh\necho version 2\n").unwrap();
    pending(b.request(spec(&f.program, &["tool"], "dev")).unwrap());
}

#[test]
fn a_cancelled_requester_leaves_the_question_for_the_next_one() {
    let f = fixture();
    let a = Approvals::open(&f.state, LONG).unwrap();
    let p = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    a.cancel(p.id);
    assert_eq!(
        a.wait(p.id, Instant::now() + LONG).unwrap(),
        Decision::Cancelled
    );
    assert_eq!(a.list().len(), 1, "still listed for the operator");
    let again = pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    assert_eq!(again.id, p.id);
}

#[test]
fn expired_and_unreadable_approval_files_do_not_come_back() {
    let f = fixture();
    let a = Approvals::open(&f.state, Duration::from_millis(1)).unwrap();
    pending(a.request(spec(&f.program, &["tool"], "dev")).unwrap());
    drop(a);
    let asks = f.state.join(approvals::ASKS_DIR);
    fs::write(asks.join("garbage.json"), b"{not json").unwrap();
    thread::sleep(Duration::from_millis(1100));
    let a = Approvals::open(&f.state, LONG).unwrap();
    assert!(a.list().is_empty());
    // The expired one is removed; the unreadable one is left for the operator to look at.
    let names: Vec<String> = fs::read_dir(&asks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["garbage.json".to_string()]);
}
