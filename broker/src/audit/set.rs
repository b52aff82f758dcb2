//! Verification of a rotated set as one chain: the rotated files oldest first, then the active
//! file; each file's first record continues the file before it (seq + 1, `prev` = hash of its
//! last line).
//!
//! When the oldest file kept does not start at seq 1 (older files were deleted by `keep`), the
//! chain is checked from that file's first `prev` as an anchor: what was deleted cannot be
//! proven, and the report says so ([`SetReport::anchor`]).

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::rotate::rotated_files;
use super::{
    io_err, parent_dir, verify_reader_from, AuditError, BreakKind, ChainBreak, Head, StoredRecord,
    GENESIS, MAX_LINE,
};

/// One file of the set as checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub path: PathBuf,
    /// Seq of its first record (None: empty, or its first line is not a record).
    pub first_seq: Option<u64>,
    /// Lines read (including a broken one).
    pub lines: u64,
    /// Its last record, when intact.
    pub head: Option<Head>,
}

/// How the set is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetBreakKind {
    /// A break inside one file (see [`BreakKind`]).
    Chain(BreakKind),
    /// A rotated file's name does not match its first record (files renamed or swapped).
    NameMismatch { named: u64, first: u64 },
    /// The first record's `prev` is not the hash of the previous file's last line: that line
    /// was edited, or this file does not belong after it.
    NotLinked { prev_file: PathBuf, prev_line: u64 },
    /// Records `from..=to` are missing between the previous file and this one: a rotated file
    /// was removed (or lines cut from the previous file's end).
    MissingFile { from: u64, to: u64 },
    /// A rotated file holds no record.
    EmptyRotated,
}

/// The first place the set breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetBreak {
    pub file: PathBuf,
    /// 1-based line in `file`.
    pub line: u64,
    pub kind: SetBreakKind,
}

impl fmt::Display for SetBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.line;
        match &self.kind {
            SetBreakKind::Chain(kind) => ChainBreak {
                line: l,
                kind: kind.clone(),
            }
            .fmt(f),
            SetBreakKind::NameMismatch { named, first } => write!(
                f,
                "line {l}: the file is named for seq {named} but its first record is seq \
                 {first}: rotated files were renamed or swapped"
            ),
            SetBreakKind::NotLinked {
                prev_file,
                prev_line,
            } => write!(
                f,
                "line {l}: its prev is not the hash of the last line of {} (line {prev_line}): \
                 that line was edited, or this file does not follow that one",
                prev_file.display()
            ),
            SetBreakKind::MissingFile { from, to } => write!(
                f,
                "line {l}: records seq {from}..={to} are missing before this file (a rotated \
                 file was removed, or lines were cut from the end of the one before)"
            ),
            SetBreakKind::EmptyRotated => write!(f, "line {l}: a rotated file with no record"),
        }
    }
}

/// Result of [`verify_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetReport {
    /// The files checked, oldest first (up to and including a broken one).
    pub files: Vec<FileCheck>,
    /// When the oldest file does not start at seq 1: the seq and hash the check started from
    /// (its first record's seq - 1 and `prev`). Records up to this seq were deleted (by `keep`)
    /// and cannot be checked.
    pub anchor: Option<Head>,
    /// Lines read in all files.
    pub lines: u64,
    /// The last record of the intact chain.
    pub head: Option<Head>,
    pub broken: Option<SetBreak>,
}

impl SetReport {
    pub fn is_ok(&self) -> bool {
        self.broken.is_none()
    }
}

impl fmt::Display for SetReport {
    /// One line. A single file starting at seq 1 reads as [`super::VerifyReport`] does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.broken {
            return write!(f, "{}: BROKEN: {b}", b.file.display());
        }
        let Some(h) = &self.head else {
            return match &self.anchor {
                Some(a) => write!(
                    f,
                    "ok: no records after anchor seq {} hash {} ({} files)",
                    a.seq,
                    a.hash,
                    self.files.len()
                ),
                None => write!(f, "ok: empty log"),
            };
        };
        if self.files.len() == 1 && self.anchor.is_none() {
            return write!(
                f,
                "ok: {} records, chain intact, head seq {} hash {}",
                self.lines, h.seq, h.hash
            );
        }
        write!(
            f,
            "ok: {} files, {} records, chain intact across files, head seq {} hash {}",
            self.files.len(),
            self.lines,
            h.seq,
            h.hash
        )?;
        if let Some(a) = &self.anchor {
            write!(
                f,
                "; starts at seq {} anchored on prev {} (records 1..={} were deleted and \
                 cannot be checked)",
                a.seq + 1,
                a.hash,
                a.seq
            )?;
        }
        Ok(())
    }
}

/// The first record of the file read by `r` (None if its first line is missing or not a
/// record); `r` is back at the start afterwards.
fn first_record(r: &mut BufReader<File>, path: &Path) -> Result<Option<StoredRecord>, AuditError> {
    let mut line = Vec::new();
    let mut limited = std::io::Read::take(&mut *r, MAX_LINE + 1);
    limited
        .read_until(b'\n', &mut line)
        .map_err(io_err("read", path))?;
    r.seek(SeekFrom::Start(0)).map_err(io_err("lseek", path))?;
    if line.last() != Some(&b'\n') {
        return Ok(None);
    }
    line.pop();
    Ok(serde_json::from_slice(&line).ok())
}

/// Verifies the log whose active file is `active` together with its rotated files
/// (`<active>.<first seq>`), oldest first, as one chain. I/O errors are `Err`; a break is an
/// `Ok` report naming the file and line. Without rotated files this is [`super::verify`] of
/// `active`.
pub fn verify_set(active: impl AsRef<Path>) -> Result<SetReport, AuditError> {
    let active = active.as_ref();
    // No directory: no rotated files; opening `active` below says what is missing.
    let rotated = match rotated_files(active) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        r => r.map_err(io_err("list rotated files", parent_dir(active)))?,
    };
    let mut paths: Vec<(Option<u64>, PathBuf)> =
        rotated.into_iter().map(|(seq, p)| (Some(seq), p)).collect();
    paths.push((None, active.to_path_buf()));

    let mut report = SetReport {
        files: Vec::new(),
        anchor: None,
        lines: 0,
        head: None,
        broken: None,
    };
    // (seq, prev) the next file's first record must carry; None before the first file.
    let mut expected: Option<(u64, String)> = None;
    for (named, path) in paths {
        let f = File::open(&path).map_err(io_err("open", &path))?;
        let mut r = BufReader::with_capacity(64 * 1024, f);
        let first = first_record(&mut r, &path)?;
        let mut check = FileCheck {
            path: path.clone(),
            first_seq: first.as_ref().map(|f| f.seq),
            lines: 0,
            head: None,
        };
        let brk = |line, kind| SetBreak {
            file: path.clone(),
            line,
            kind,
        };
        if let Some(named) = named {
            let empty = r.fill_buf().map_err(io_err("read", &path))?.is_empty();
            let mismatch = first.as_ref().filter(|f| f.seq != named).map(|f| f.seq);
            let found = if empty {
                Some(brk(1, SetBreakKind::EmptyRotated))
            } else {
                mismatch.map(|first| brk(1, SetBreakKind::NameMismatch { named, first }))
            };
            if let Some(b) = found {
                report.files.push(check);
                report.broken = Some(b);
                return Ok(report);
            }
        }
        let (start_seq, start_prev) = match (&expected, &first) {
            (Some((seq, prev)), _) => (*seq, prev.clone()),
            (None, Some(rec)) if rec.seq > 1 => {
                report.anchor = Some(Head {
                    seq: rec.seq - 1,
                    hash: rec.prev.clone(),
                });
                (rec.seq, rec.prev.clone())
            }
            (None, _) => (1, GENESIS.to_string()),
        };
        let v =
            verify_reader_from(&mut r, start_seq, &start_prev).map_err(io_err("read", &path))?;
        check.lines = v.lines;
        check.head = v.head.clone();
        report.lines += v.lines;
        let previous = report.files.last().map(|c| (c.path.clone(), c.lines));
        report.files.push(check);
        if let Some(b) = v.broken {
            let kind = match (b.line, b.kind, previous) {
                (1, BreakKind::Deleted { from, to }, Some(_)) => {
                    SetBreakKind::MissingFile { from, to }
                }
                (
                    1,
                    BreakKind::Edited | BreakKind::EditedOrForged,
                    Some((prev_file, prev_line)),
                ) if first
                    .as_ref()
                    .is_some_and(|f| f.seq == start_seq && f.prev != start_prev) =>
                {
                    SetBreakKind::NotLinked {
                        prev_file,
                        prev_line,
                    }
                }
                (_, kind, _) => SetBreakKind::Chain(kind),
            };
            report.broken = Some(brk(b.line, kind));
            return Ok(report);
        }
        if let Some(h) = v.head {
            expected = Some((h.seq + 1, h.hash.clone()));
            report.head = Some(h);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
