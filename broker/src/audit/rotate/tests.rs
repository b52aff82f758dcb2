use std::fs;
use std::path::Path;

use super::super::{sha256_hex, verify_set, AuditDecision, AuditRecord, Who};
use super::*;

pub(in crate::audit) fn rec(n: u64) -> AuditRecord {
    AuditRecord {
        who: Who {
            id: n,
            role: "tool".into(),
            profile: "dev".into(),
        },
        op: "connect".into(),
        target: format!("host{n}.example:443"),
        rule: None,
        decision: AuditDecision::Allow,
        outcome: "connected".into(),
        detail: String::new(),
    }
}

/// A log at `path` rotating every ~3 records, keeping `keep` old files.
pub(in crate::audit) fn rotating(path: &Path, keep: usize) -> AuditLog {
    let mut log = AuditLog::open(path).unwrap();
    log.set_rotation(Rotation {
        max_bytes: 600,
        keep,
    });
    log
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[test]
fn names_order_numerically() {
    let p = Path::new("/x/audit.log");
    assert_eq!(rotated_name(p, 7), Path::new("/x/audit.log.0000000007"));
    assert_eq!(
        rotated_name(p, 12_345_678_901),
        Path::new("/x/audit.log.12345678901")
    );
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("audit.log");
    for n in [100, 7, 12_345_678_901] {
        fs::write(rotated_name(&active, n), "").unwrap();
    }
    // Not members of the set.
    fs::write(dir.path().join("audit.log.tmp"), "").unwrap();
    fs::write(dir.path().join("audit.log."), "").unwrap();
    fs::write(dir.path().join("other.log.5"), "").unwrap();
    let seqs: Vec<u64> = rotated_files(&active)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(seqs, [7, 100, 12_345_678_901]);
}

#[test]
fn rotates_at_the_size_and_the_chain_continues_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = rotating(&path, 10);
    for n in 1..=10 {
        assert_eq!(log.append(&rec(n)).unwrap(), n);
    }
    let rotated = rotated_files(&path).unwrap();
    assert!(rotated.len() >= 2, "{rotated:?}");
    // Each file is named after its first record, and starts where the one before ended.
    let mut files: Vec<_> = rotated.iter().map(|(_, p)| p.clone()).collect();
    files.push(path.clone());
    let mut expected_seq = 1;
    let mut prev = crate::audit::GENESIS.to_string();
    for f in &files {
        let ls = lines(f);
        assert!(!ls.is_empty());
        for l in &ls {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["seq"], expected_seq, "{}", f.display());
            assert_eq!(v["prev"], prev.as_str(), "{}", f.display());
            expected_seq += 1;
            prev = sha256_hex(l.as_bytes());
        }
        // No file grows past the size by more than one record.
        assert!(fs::metadata(f).unwrap().len() < 600 + 300);
    }
    for (seq, p) in &rotated {
        assert_eq!(seq_of(&lines(p)[0]), *seq);
    }
    assert_eq!(expected_seq, 11);
    let r = verify_set(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.head.as_ref().map(|h| h.seq), Some(10));

    // Without a size nothing rotates.
    let other = dir.path().join("plain.log");
    let mut plain = AuditLog::open(&other).unwrap();
    for n in 1..=10 {
        plain.append(&rec(n)).unwrap();
    }
    assert!(rotated_files(&other).unwrap().is_empty());
    assert_eq!(lines(&other).len(), 10);
}

#[test]
fn keep_deletes_the_oldest_and_verify_starts_from_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = rotating(&path, 2);
    for n in 1..=20 {
        log.append(&rec(n)).unwrap();
    }
    let rotated = rotated_files(&path).unwrap();
    assert_eq!(rotated.len(), 2, "{rotated:?}");
    assert!(rotated[0].0 > 1);
    let r = verify_set(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    let anchor = r.anchor.clone().unwrap();
    assert_eq!(anchor.seq, rotated[0].0 - 1);
    assert_eq!(r.head.as_ref().map(|h| h.seq), Some(20));
    assert!(r.to_string().contains("cannot be checked"), "{r}");
}

#[test]
fn a_reopened_log_continues_from_the_newest_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = rotating(&path, 10);
    for n in 1..=4 {
        log.append(&rec(n)).unwrap();
    }
    // Rotate by command: the active file is now empty.
    let rotated = log.rotate().unwrap().unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(log.rotate().unwrap(), None, "an empty file is not rotated");
    drop(log);
    let mut log = AuditLog::open(&path).unwrap();
    assert_eq!(log.last_seq(), 4);
    assert_eq!(
        log.head_hash(),
        sha256_hex(lines(&rotated).last().unwrap().as_bytes())
    );
    assert_eq!(log.append(&rec(5)).unwrap(), 5);
    assert!(verify_set(&path).unwrap().is_ok());
}

#[test]
fn two_appenders_interleaving_across_rotations_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut a = rotating(&path, 100);
    // The second one, as another process would be; it does not rotate itself.
    let mut b = AuditLog::open(&path).unwrap();
    let mut seqs = Vec::new();
    for n in 1..=30 {
        let log = if n % 3 == 0 { &mut b } else { &mut a };
        seqs.push(log.append(&rec(n)).unwrap());
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    assert!(rotated_files(&path).unwrap().len() >= 5);
    let r = verify_set(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.lines, 30);
    // Both rotating: the same.
    let path = dir.path().join("both.log");
    let mut a = rotating(&path, 100);
    let mut b = rotating(&path, 100);
    for n in 1..=30 {
        let log = if n % 2 == 0 { &mut b } else { &mut a };
        assert_eq!(log.append(&rec(n)).unwrap(), n);
    }
    let r = verify_set(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.lines, 30);
}

#[test]
fn a_crash_at_any_step_of_a_rotation_loses_and_duplicates_nothing() {
    for step in [
        Step::Renamed,
        Step::RenameSynced,
        Step::Created,
        Step::Switched,
        Step::Pruned,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = rotating(&path, 1);
        // Another appender holding the file that is about to be rotated.
        let mut other = AuditLog::open(&path).unwrap();
        let mut written = 0;
        for n in 1..=5 {
            log.append(&rec(n)).unwrap();
            written = n;
        }
        log.crash_after(Some(step));
        // Appends until one runs into the rotation and "dies" there.
        let died = loop {
            match log.append(&rec(written + 1)) {
                Ok(_) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 50, "no rotation happened");
        };
        assert!(died.to_string().contains("simulated crash"), "{died}");
        drop(log);
        if step == Step::Renamed {
            assert!(!path.exists(), "the crash left no active file");
        }
        // The other appender goes on first, then a restarted process.
        assert_eq!(other.append(&rec(100)).unwrap(), written + 1, "{step:?}");
        let mut log = rotating(&path, 1);
        assert_eq!(log.last_seq(), written + 1, "{step:?}");
        for n in 0..5 {
            assert_eq!(log.append(&rec(200 + n)).unwrap(), written + 2 + n);
        }
        let r = verify_set(&path).unwrap();
        assert!(r.is_ok(), "{step:?}: {r}");
        assert_eq!(r.head.map(|h| h.seq), Some(written + 6), "{step:?}");
        // Every record since the anchor is there exactly once.
        let first = r.anchor.map_or(1, |a| a.seq + 1);
        assert_eq!(r.lines, written + 6 - first + 1, "{step:?}");
    }
}

#[test]
fn rotation_never_overwrites_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    log.append(&rec(1)).unwrap();
    let squatter = rotated_name(&path, 1);
    fs::write(&squatter, "keep me\n").unwrap();
    let e = log.rotate().unwrap_err();
    assert!(matches!(e, AuditError::RotateTarget { .. }), "{e}");
    assert_eq!(fs::read_to_string(&squatter).unwrap(), "keep me\n");
    assert_eq!(lines(&path).len(), 1);
    // Nothing changed: appending goes on.
    assert_eq!(log.append(&rec(2)).unwrap(), 2);
}
