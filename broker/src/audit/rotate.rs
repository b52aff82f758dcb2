//! Rotation of the audit log, by the writer itself under the log's `flock`, with the hash chain
//! carried across files.
//!
//! **Naming.** The active file keeps its name (`audit.log`); a rotated file is named after the
//! seq of its first record, zero-padded to ten digits: `audit.log.0000000001`,
//! `audit.log.0000052311`, ... The numbers order the set without doubt (oldest = smallest; they
//! are compared as numbers, so more than ten digits sort right too), and a file whose name does
//! not match its first record is a break that `verify` reports.
//!
//! **The chain continues.** The first record of the new active file has the seq after the last
//! record of the rotated file and, as `prev`, the hash of its last line: the set is one chain
//! ([`super::verify_set`]).
//!
//! **Steps** ([`Step`]), all while holding the `flock` of the active file, so no other appender
//! writes in between:
//! 1. rename `audit.log` to `audit.log.<first seq>` (never over an existing file);
//! 2. fsync the directory (the rename is durable);
//! 3. create the new, empty `audit.log` (0600) and fsync the directory;
//! 4. lock the new file, let go of the old one, read the new file's tail (an empty active file
//!    continues from the newest rotated file's last line);
//! 5. delete the oldest rotated files beyond `keep`, oldest first (the kept set stays
//!    contiguous), and fsync the directory.
//!
//! **Crash safety.** A SIGKILL at any point loses and duplicates nothing: the rename is atomic,
//! so a record is either in the active file or in the rotated one, never both. If the process
//! dies after step 1, `audit.log` is missing or empty; the next [`AuditLog::open`] (or another
//! appender, see below) creates it and continues the chain from the newest rotated file. If it
//! dies during step 5, the extra old files go at the next rotation.
//!
//! **Several appenders.** An appender that holds the old file (another process, or another
//! `AuditLog` on the same path) takes its `flock`, then compares the inode of the path with the
//! inode of its descriptor; if they differ the file was rotated, and it reopens the path and
//! reads the tail there before writing. Appenders never write to a file that is no longer at the
//! path.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{
    io_err, open_active, parent_dir, AuditError, AuditLog, FlockGuard, StoredRecord, MAX_LINE,
};

/// Old files kept when the configuration does not say.
pub const DEFAULT_KEEP: usize = 10;
/// Digits of the first seq in a rotated file's name (more when the seq needs them).
const NAME_DIGITS: usize = 10;

/// When to rotate the active file and how many rotated files to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before an append when the active file has at least this many bytes; 0 = never.
    pub max_bytes: u64,
    /// Rotated files kept (at least 1: the newest carries the chain into an empty active file).
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 0,
            keep: DEFAULT_KEEP,
        }
    }
}

/// A step of a rotation (see the module docs); tests stop after each as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Renamed,
    RenameSynced,
    Created,
    Switched,
    Pruned,
}

/// The name of the rotated file whose first record has `first_seq`: `<path>.<first_seq>`,
/// zero-padded.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{first_seq:0NAME_DIGITS$}"));
    path.with_file_name(name)
}

/// The rotated files of the log at `path` (`<path>.<digits>` in its directory), oldest first,
/// each with the seq its name gives.
pub fn rotated_files(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut out = Vec::new();
    for entry in fs::read_dir(parent_dir(path))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(seq) = digits.parse::<u64>() {
            out.push((seq, path.with_file_name(&name)));
        }
    }
    out.sort();
    Ok(out)
}

/// The seq of the first record of `file`.
fn first_seq(file: &fs::File, path: &Path) -> Result<u64, AuditError> {
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(io_err("lseek", path))?;
    let mut line = Vec::new();
    BufReader::new(f.take(MAX_LINE + 1))
        .read_until(b'\n', &mut line)
        .map_err(io_err("read", path))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let rec: StoredRecord = serde_json::from_slice(&line).map_err(|e| AuditError::BadTail {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("the first line is not a record: {e}"),
    })?;
    Ok(rec.seq)
}

impl AuditLog {
    /// Rotates the active file now, whatever its size (`carapace audit rotate`): under the
    /// flock, like an append. Returns the rotated file's name, or None when the active file is
    /// empty (nothing to rotate).
    pub fn rotate(&mut self) -> Result<Option<PathBuf>, AuditError> {
        self.check_poisoned()?;
        let lock = self.lock_active()?;
        self.catch_up()?;
        let (_lock, rotated) = self.rotate_locked(lock)?;
        Ok(rotated)
    }

    /// The steps of the module docs. The caller holds `lock` on the active file and has read its
    /// tail; returns the lock of the new active file.
    pub(super) fn rotate_locked(
        &mut self,
        lock: FlockGuard,
    ) -> Result<(FlockGuard, Option<PathBuf>), AuditError> {
        if self.end == 0 {
            return Ok((lock, None));
        }
        let first = first_seq(&self.file, &self.path)?;
        let target = rotated_name(&self.path, first);
        if target.symlink_metadata().is_ok() {
            return Err(AuditError::RotateTarget { path: target });
        }
        let dir = parent_dir(&self.path).to_path_buf();
        fs::rename(&self.path, &target).map_err(io_err("rename", &target))?;
        self.crash_point(Step::Renamed)?;
        crate::durable::sync_dir(&dir).map_err(io_err("fsync dir", &dir))?;
        self.crash_point(Step::RenameSynced)?;
        let file = open_active(&self.path)?;
        self.crash_point(Step::Created)?;
        let new_lock = FlockGuard::lock(&file, &self.path)?;
        // The old guard goes before the old file is closed (see `FlockGuard`).
        drop(lock);
        self.file = file;
        self.read_tail()?;
        self.crash_point(Step::Switched)?;
        if let Err(e) = self.prune() {
            // The chain is whole; only an old file that should be gone is still there.
            tracing::warn!("audit log: deleting old rotated files: {e}");
        }
        self.crash_point(Step::Pruned)?;
        Ok((new_lock, Some(target)))
    }

    /// Deletes the oldest rotated files beyond `keep` (at least one is always kept).
    fn prune(&self) -> Result<(), AuditError> {
        let dir = parent_dir(&self.path);
        let files = rotated_files(&self.path).map_err(io_err("list rotated files", dir))?;
        let excess = files.len().saturating_sub(self.rotation.keep.max(1));
        for (_, old) in files.iter().take(excess) {
            match fs::remove_file(old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("unlink", old)(e)),
            }
        }
        if excess > 0 {
            crate::durable::sync_dir(dir).map_err(io_err("fsync dir", dir))?;
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn crash_point(&mut self, _step: Step) -> Result<(), AuditError> {
        Ok(())
    }

    /// Tests: at `crash_after`, stop as a SIGKILL would (the log refuses everything after).
    #[cfg(test)]
    fn crash_point(&mut self, step: Step) -> Result<(), AuditError> {
        if self.crash_after != Some(step) {
            return Ok(());
        }
        self.poisoned = Some(format!("simulated crash after {step:?}"));
        Err(AuditError::Poisoned {
            path: self.path.clone(),
            reason: format!("simulated crash after {step:?}"),
        })
    }

    #[cfg(test)]
    pub(super) fn crash_after(&mut self, step: Option<Step>) {
        self.crash_after = step;
    }
}

#[cfg(test)]
pub(super) mod tests;
