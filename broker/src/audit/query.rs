//! Reading the audit log back for an operator: the records of the active file and its rotated
//! files, newest first, that match a filter (op, decision, a time, a sequence number to page
//! back from). Read-only: the writer's lock is not taken, so a line being appended (no newline
//! yet) or one that does not parse is skipped, never fatal.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::{rotated_files, AuditDecision, StoredRecord};

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("audit log {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to look for; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub op: Option<String>,
    pub decision: Option<AuditDecision>,
    /// Records at or after this RFC 3339 UTC time (compared as text: the log writes one fixed
    /// format, so the order of the text is the order of the times).
    pub since: Option<String>,
    /// Records with a seq below this one.
    pub before_seq: Option<u64>,
}

impl Filter {
    /// Whether `r` matches.
    pub fn matches(&self, r: &StoredRecord) -> bool {
        self.op.as_ref().is_none_or(|op| *op == r.op)
            && self.decision.is_none_or(|d| d == r.decision)
            && self
                .since
                .as_ref()
                .is_none_or(|t| r.ts.as_str() >= t.as_str())
            && self.before_seq.is_none_or(|s| r.seq < s)
    }
}

/// The matching records, newest first, at most `limit`; and whether older ones match too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub records: Vec<StoredRecord>,
    pub more: bool,
}

/// Query the log whose active file is `active` (and its rotated files).
pub fn query(active: &Path, filter: &Filter, limit: usize) -> Result<Found, QueryError> {
    let mut files: Vec<PathBuf> = rotated_files(active)
        .map_err(|source| QueryError::Io {
            op: "list rotated files",
            path: active.to_path_buf(),
            source,
        })?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(active.to_path_buf());
    let mut found = Found::default();
    // Newest file first; within a file, last line first.
    for path in files.iter().rev() {
        let records = match read_file(path) {
            Ok(r) => r,
            Err(QueryError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        };
        for r in records.into_iter().rev() {
            if !filter.matches(&r) {
                continue;
            }
            if found.records.len() >= limit {
                found.more = true;
                return Ok(found);
            }
            found.records.push(r);
        }
        // Every record of an older file is older than `since`: stop early.
        if let (Some(since), Some(last)) = (&filter.since, found.records.last()) {
            if last.ts.as_str() < since.as_str() {
                break;
            }
        }
    }
    Ok(found)
}

/// Every complete, parsable line of `path`, in file order.
fn read_file(path: &Path) -> Result<Vec<StoredRecord>, QueryError> {
    let io_err = |op: &'static str| {
        move |source| QueryError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let f = File::open(path).map_err(io_err("open"))?;
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).map_err(io_err("read"))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // Being written now (or torn): not a record yet.
            break;
        }
        line.pop();
        if let Ok(rec) = serde_json::from_slice::<StoredRecord>(&line) {
            out.push(rec);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, AuditRecord, Rotation, Who};
    use std::time::{Duration, SystemTime};

    fn rec(op: &str, decision: AuditDecision) -> AuditRecord {
        AuditRecord {
            who: Who {
                id: 1,
                role: "gateway".into(),
                profile: "gateway".into(),
            },
            op: op.into(),
            target: "t".into(),
            rule: None,
            decision,
            outcome: "o".into(),
            detail: String::new(),
        }
    }

    fn seqs(f: &Found) -> Vec<u64> {
        f.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn newest_first_filtered_and_limited() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for i in 0..10u64 {
            let (op, d) = if i % 2 == 0 {
                ("exec", AuditDecision::Allow)
            } else {
                ("connect", AuditDecision::Deny)
            };
            log.append_at(&rec(op, d), t0 + Duration::from_secs(i))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let all = query(&path, &Filter::default(), 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs(&all), (1..=10).rev().collect::<Vec<_>>());
        assert!(!all.more);
        let three = query(&path, &Filter::default(), 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((seqs(&three), three.more), (vec![10, 9, 8], true));
        let f = Filter {
            op: Some("exec".into()),
            ..Filter::default()
        };
        let execs = query(&path, &f, 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs(&execs), vec![9, 7, 5, 3, 1]);
        let f = Filter {
            decision: Some(AuditDecision::Deny),
            before_seq: Some(8),
            ..Filter::default()
        };
        let denies = query(&path, &f, 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs(&denies), vec![6, 4, 2]);
        let since = all.records[3].ts.clone(); // seq 7
        let f = Filter {
            since: Some(since),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&query(&path, &f, 100).unwrap_or_else(|e| panic!("{e}"))),
            vec![10, 9, 8, 7]
        );
        let none = Filter {
            op: Some("nothing".into()),
            ..Filter::default()
        };
        assert!(query(&path, &none, 100)
            .unwrap_or_else(|e| panic!("{e}"))
            .records
            .is_empty());
    }

    #[test]
    fn rotated_files_are_read_and_a_partial_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap_or_else(|e| panic!("{e}"));
        log.set_rotation(Rotation {
            max_bytes: 1,
            keep: 10,
        });
        for _ in 0..4 {
            log.append(&rec("exec", AuditDecision::Allow))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(!rotated_files(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        drop(log);
        // An append in progress: no newline yet.
        let mut bytes = std::fs::read(&path).unwrap_or_default();
        bytes.extend_from_slice(br#"{"seq":5,"ts":"#);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
        let all = query(&path, &Filter::default(), 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs(&all), vec![4, 3, 2, 1]);
    }

    #[test]
    fn a_missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let found = query(&dir.path().join("audit.log"), &Filter::default(), 10)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Found::default());
    }
}
