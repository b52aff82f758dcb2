//! Audit log: the chain verifies, and each kind of tampering is found at the right line.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use carapace_broker::audit::{
    self, AuditDecision, AuditError, AuditLog, AuditRecord, BreakKind, ChainBreak, Head, RuleRef,
    Who,
};

fn rec(n: u32) -> AuditRecord {
    AuditRecord {
        who: Who {
            id: 7,
            role: "tool".into(),
            profile: "dev".into(),
        },
        op: "connect".into(),
        target: format!("host{n}.example.com:443"),
        rule: Some(RuleRef {
            line: Some(n),
            why: "test rule".into(),
        }),
        decision: if n % 2 == 0 {
            AuditDecision::Allow
        } else {
            AuditDecision::Deny
        },
        outcome: format!("outcome-{n}"),
        detail: String::new(),
    }
}

/// A log with `n` records; returns (dir guard, path).
fn log_with(n: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 1..=n {
        assert_eq!(log.append(&rec(i)).unwrap(), u64::from(i));
    }
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    fs::write(path, s).unwrap();
}

fn broken(path: &Path) -> ChainBreak {
    let r = audit::verify(path).unwrap();
    assert!(!r.is_ok(), "expected a broken chain, got {r}");
    r.broken.unwrap()
}

#[test]
fn valid_chain_verifies_and_has_the_documented_shape() {
    let (_d, path) = log_with(5);
    let r = audit::verify(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.lines, 5);
    let head = r.head.unwrap();
    assert_eq!(head.seq, 5);
    let ls = lines(&path);
    assert_eq!(head.hash, audit::sha256_hex(ls[4].as_bytes()));
    // First line: genesis prev; every line's prev is the hash of the line before.
    let v: serde_json::Value = serde_json::from_str(&ls[0]).unwrap();
    assert_eq!(v["prev"], audit::GENESIS);
    assert_eq!(v["seq"], 1);
    assert_eq!(v["who"]["role"], "tool");
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rule"]["line"], 1);
    let ts = v["ts"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 27, "{ts}");
    for w in ls.windows(2) {
        let next: serde_json::Value = serde_json::from_str(&w[1]).unwrap();
        assert_eq!(next["prev"], audit::sha256_hex(w[0].as_bytes()));
    }
    // Field order on disk is the documented one.
    let keys: Vec<&str> = [
        "seq", "ts", "prev", "who", "op", "target", "rule", "decision", "outcome", "detail",
    ]
    .to_vec();
    let mut pos = 0;
    for k in keys {
        let at = ls[0].find(&format!("\"{k}\":")).unwrap();
        assert!(at >= pos, "field {k} out of order in {}", ls[0]);
        pos = at;
    }
    // File mode 0600.
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn editing_one_byte_in_a_middle_line_is_found_at_that_line() {
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls[2] = ls[2].replace("outcome-3", "outcome-X");
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 3, "{b}");
    assert_eq!(b.kind, BreakKind::Edited);
}

#[test]
fn editing_the_seq_field_is_found_at_that_line() {
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls[3] = ls[3].replacen("\"seq\":4", "\"seq\":9", 1);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 4, "{b}");
    assert_eq!(b.kind, BreakKind::Edited);
}

#[test]
fn editing_the_prev_field_is_found_at_that_line() {
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    let v: serde_json::Value = serde_json::from_str(&ls[2]).unwrap();
    let prev = v["prev"].as_str().unwrap().to_string();
    let mut forged = prev.clone().into_bytes();
    forged[10] = if forged[10] == b'a' { b'b' } else { b'a' };
    ls[2] = ls[2].replace(&prev, std::str::from_utf8(&forged).unwrap());
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 3, "{b}");
    assert_eq!(b.kind, BreakKind::Edited);
}

#[test]
fn an_edit_that_breaks_json_is_bad_json_at_that_line() {
    let (_d, path) = log_with(4);
    let mut ls = lines(&path);
    ls[1].replace_range(0..1, "[");
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 2, "{b}");
    assert!(matches!(b.kind, BreakKind::BadJson(_)), "{b}");
}

#[test]
fn deleting_a_line_is_found_where_it_was() {
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.remove(2);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 3, "{b}");
    assert_eq!(b.kind, BreakKind::Deleted { from: 3, to: 3 });
}

#[test]
fn deleting_the_first_line_is_found_at_line_1() {
    let (_d, path) = log_with(3);
    let mut ls = lines(&path);
    ls.remove(0);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 1, "{b}");
    assert_eq!(b.kind, BreakKind::Deleted { from: 1, to: 1 });
}

#[test]
fn swapping_two_lines_is_a_reorder_at_the_first_of_them() {
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.swap(2, 3);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!(b.line, 3, "{b}");
    assert_eq!(
        b.kind,
        BreakKind::Reordered {
            expected: 3,
            found: 4
        }
    );
}

#[test]
fn truncating_mid_line_is_found_and_open_refuses_to_continue() {
    let (_d, path) = log_with(4);
    let len = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let b = broken(&path);
    assert_eq!(b.line, 4, "{b}");
    assert_eq!(b.kind, BreakKind::Truncated);
    match AuditLog::open(&path) {
        Err(AuditError::TornTail { offset, .. }) => {
            let ls = fs::read(&path).unwrap();
            let last_nl = ls.iter().rposition(|&b| b == b'\n').unwrap() as u64;
            assert_eq!(offset, last_nl + 1);
        }
        other => panic!("expected TornTail, got {other:?}"),
    }
}

#[test]
fn a_last_line_that_is_not_a_record_is_refused_on_open() {
    let (_d, path) = log_with(2);
    let mut data = fs::read(&path).unwrap();
    data.extend_from_slice(b"{\"seq\":3}\n");
    fs::write(&path, data).unwrap();
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::BadTail { .. })
    ));
}

#[test]
fn a_forged_appended_line_is_found_at_that_line() {
    let (_d, path) = log_with(4);
    let ls = lines(&path);
    // Forger copies the shape of line 4, bumps seq, but cannot know... keeps line 4's prev.
    let mut v: serde_json::Value = serde_json::from_str(&ls[3]).unwrap();
    v["seq"] = 5.into();
    v["outcome"] = "forged".into();
    let mut forged = ls.clone();
    forged.push(serde_json::to_string(&v).unwrap());
    write_lines(&path, &forged);
    let b = broken(&path);
    assert_eq!(b.line, 5, "{b}");
    assert_eq!(b.kind, BreakKind::EditedOrForged);

    // A replayed (duplicated) line.
    let mut dup = ls.clone();
    dup.push(ls[1].clone());
    write_lines(&path, &dup);
    let b = broken(&path);
    assert_eq!(b.line, 5, "{b}");
    assert_eq!(b.kind, BreakKind::Duplicated { of: 2 });
}

#[test]
fn append_after_reopen_continues_the_chain() {
    let (_d, path) = log_with(3);
    {
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.last_seq(), 3);
        assert_eq!(log.append(&rec(4)).unwrap(), 4);
    }
    let mut log = AuditLog::open(&path).unwrap();
    assert_eq!(log.append(&rec(5)).unwrap(), 5);
    let r = audit::verify(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.head.unwrap().seq, 5);
    assert_eq!(
        log.head_hash(),
        audit::sha256_hex(lines(&path)[4].as_bytes())
    );
}

#[test]
fn two_writers_on_one_file_keep_one_chain() {
    let (_d, path) = log_with(1);
    let mut a = AuditLog::open(&path).unwrap();
    let mut b = AuditLog::open(&path).unwrap();
    assert_eq!(a.append(&rec(2)).unwrap(), 2);
    assert_eq!(b.append(&rec(3)).unwrap(), 3);
    assert_eq!(a.append(&rec(4)).unwrap(), 4);
    let r = audit::verify(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.lines, 4);
}

#[test]
fn anchored_head_catches_truncation_of_whole_lines_and_last_line_edits() {
    let (_d, path) = log_with(4);
    let anchor: Head = audit::verify(&path).unwrap().head.unwrap();
    assert!(audit::verify_against(&path, &anchor).unwrap().is_ok());

    let ls = lines(&path);
    // Drop the whole last line: plain verify cannot tell, the anchor can.
    write_lines(&path, &ls[..3]);
    assert!(audit::verify(&path).unwrap().is_ok());
    let r = audit::verify_against(&path, &anchor).unwrap();
    assert!(matches!(
        r.broken.unwrap().kind,
        BreakKind::MissingTail {
            anchored_seq: 4,
            last_seq: 3
        }
    ));

    // Edit the last line.
    let mut edited = ls.clone();
    edited[3] = edited[3].replace("outcome-4", "outcome-Y");
    write_lines(&path, &edited);
    let r = audit::verify_against(&path, &anchor).unwrap();
    let b = r.broken.unwrap();
    assert_eq!(b.line, 4);
    assert_eq!(b.kind, BreakKind::AnchorMismatch);
}

#[test]
fn unwritable_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Missing parent directory.
    assert!(matches!(
        AuditLog::open(dir.path().join("nope/audit.log")),
        Err(AuditError::Io { op: "open", .. })
    ));
    // A directory.
    assert!(AuditLog::open(dir.path()).is_err());
    // A symlink is refused (O_NOFOLLOW).
    let target = dir.path().join("real.log");
    fs::write(&target, b"").unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        AuditLog::open(&link),
        Err(AuditError::Io { op: "open", .. })
    ));
}

#[test]
fn a_failed_write_is_an_error_and_poisons_the_log() {
    // /dev/full: every write fails with ENOSPC.
    let Ok(mut log) = AuditLog::open("/dev/full") else {
        panic!("/dev/full must be openable for this test");
    };
    let e = log.append(&rec(1)).unwrap_err();
    assert!(matches!(e, AuditError::Io { op: "write", .. }), "{e}");
    let e = log.append(&rec(2)).unwrap_err();
    assert!(matches!(e, AuditError::Poisoned { .. }), "{e}");
}

#[test]
fn a_secret_value_put_in_a_record_by_mistake_is_scrubbed() {
    use carapace_broker::redact::Redactor;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    let mut r = rec(1);
    r.target = "token sk-live-1234567890".into();
    r.detail = "echoed sk-live-1234567890 back".into();
    // Without a redactor the caller's mistake would be written as is (the test can fail).
    log.append(&r).unwrap();
    assert!(fs::read_to_string(&path)
        .unwrap()
        .contains("sk-live-1234567890"));

    let red = Redactor::new(vec![b"sk-live-1234567890".to_vec()], vec![]).unwrap();
    log.set_redactor(Some(Arc::new(red)));
    log.append(&r).unwrap();
    let ls = lines(&path);
    assert!(!ls[1].contains("sk-live-1234567890"), "{}", ls[1]);
    let v: serde_json::Value = serde_json::from_str(&ls[1]).unwrap();
    assert_eq!(v["target"], "token [REDACTED]");
    assert_eq!(v["detail"], "echoed [REDACTED] back");
    assert!(audit::verify(&path).unwrap().is_ok());
}
