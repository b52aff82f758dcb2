//! The audit log: append-only JSON lines, one record per decision, hash-chained.
//!
//! Each line is one JSON object, fields in this order:
//!
//! ```text
//! {"seq":7,"ts":"2026-11-21T13:20:07.123456Z","prev":"<64 hex>","who":{"id":3,"role":"tool","profile":"dev"},
//!  "op":"connect","target":"api.example.com:443","rule":{"line":12,"why":"model API"},
//!  "decision":"allow","outcome":"connected","detail":""}
//! ```
//!
//! - `seq` starts at 1 and increases by exactly one per line.
//! - `prev` is the lowercase hex SHA-256 of the previous line's bytes (without its `\n`); the first
//!   line carries 64 zeros ([`GENESIS`]).
//! - [`AuditLog::append`] writes the whole line with one `write` on an `O_APPEND` descriptor and
//!   `fdatasync`s before returning: when it returns `Ok`, the record is on disk and the action it
//!   records may be carried out. Any failure is an `Err` and the caller must deny. After a failed
//!   write the log is *poisoned* (the file may hold a partial line) and every later append fails too.
//! - Several processes may append to the same file: each append holds an exclusive `flock` and
//!   re-reads the tail when the file grew behind its back, so the chain stays one chain. Under
//!   the lock it also checks that the file it holds is still the one at the path (same inode);
//!   if the log was rotated it reopens the path first.
//! - **Rotation** ([`rotate`]): with [`AuditLog::set_rotation`], the writer itself rotates the
//!   active file under its `flock` once it has reached a size: `audit.log` is renamed to
//!   `audit.log.<seq of its first record>` (zero-padded), a new `audit.log` is created, and its
//!   first record continues the SAME chain (next seq, `prev` = hash of the rotated file's last
//!   line). An empty active file continues from the newest rotated file, which makes a crash at
//!   any step safe. At most `keep` rotated files are kept, the oldest deleted first.
//!   [`verify_set`] checks the rotated files and the active file as one chain.
//!
//! **Secrets never appear.** [`AuditRecord`] has no field meant for a value: `target` is a *name*
//! (secret name, `host:port`, path, channel + recipient), `detail` is for the broker's own words
//! (an error kind, a byte count). Callers must not put credential values or message bodies there.
//! As a backstop, [`AuditLog::set_redactor`] scrubs known secret values from every text field.
//!
//! **What the chain proves, and what it cannot.** The hash is unkeyed: it shows an edit, deletion,
//! reordering, insertion or truncation made by someone who did not recompute every later hash.
//! Removing whole lines *at the end*, or editing the very last line, leaves a valid shorter chain;
//! [`VerifyReport::head`] gives the last seq and hash so that it can be anchored elsewhere (and
//! compared with [`verify_against`]). Across a rotated set the same holds for the newest file;
//! once `keep` deleted the oldest files, the chain can only be checked from the first kept
//! file's `prev` on ([`SetReport::anchor`]).
//!
//! **Encodings** are the crates': `hex` for hashes, `jiff` for the `ts` (RFC 3339 UTC, six
//! fractional digits and `Z`, pinned by a test).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::redact::Redactor;

pub mod query;
pub mod rotate;
pub mod set;

pub use rotate::{rotated_files, rotated_name, Rotation};
pub use set::{verify_set, FileCheck, SetBreak, SetBreakKind, SetReport};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line [`AuditLog::open`] will look back for when recovering the tail.
const MAX_LINE: u64 = 1 << 20;

/// Errors of the audit log. Every one means "the record is not known to be on disk": deny.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log {path}: the last line (from byte {offset}, {len} bytes) has no newline: a write \
         was torn (crash mid-append?). Refusing to continue the chain; inspect the file and run \
         `carapace audit verify`"
    )]
    TornTail {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    #[error(
        "audit log {path}: the last line (from byte {offset}) is not a valid record: {reason}"
    )]
    BadTail {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "audit log {path}: an earlier append failed ({reason}); the log refuses further records"
    )]
    Poisoned { path: PathBuf, reason: String },
    #[error(
        "audit log: cannot rotate: {path} already exists (a rotated file is named after its \
         first record's seq, so this one is out of place); move it away"
    )]
    RotateTarget { path: PathBuf },
    #[error("audit log {path}: cannot encode the record: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Who asked: the identity the broker bound to the peer's socket (never what a request claims).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    /// Id assigned at spawn.
    pub id: u64,
    /// `gateway`, `tool`, `channel` (or `operator` for operator actions).
    pub role: String,
    pub profile: String,
}

/// The policy rule that decided, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// Line in the policy file, when known.
    pub line: Option<u32>,
    /// The rule's `why`, or the reason for a default decision (e.g. "no rule matches").
    pub why: String,
}

/// The decision recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditDecision {
    Allow,
    Deny,
    Ask,
    /// The request could not be decided (bad request, internal error): treated as a denial.
    Error,
}

/// One decision to record. Has no field for secret values or message bodies (see module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub who: Who,
    /// `connect`, `open`, `secret`, `send`, `exec`, `approval`, ...
    pub op: String,
    /// What the op is about, by name: `host:port`, a path, a secret's name, `channel -> recipient`.
    pub target: String,
    pub rule: Option<RuleRef>,
    pub decision: AuditDecision,
    /// What happened / is about to happen: `connected`, `refused`, `timed out`, `pending 4`, ...
    pub outcome: String,
    /// Extra words from the broker (error kind, sizes). Never a secret or a message body.
    pub detail: String,
}

/// The serialized line: field order is the on-disk order.
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    ts: &'a str,
    prev: &'a str,
    who: &'a Who,
    op: &'a str,
    target: &'a str,
    rule: &'a Option<RuleRef>,
    decision: AuditDecision,
    outcome: &'a str,
    detail: &'a str,
}

/// A line as read back. Only `seq` and `prev` matter to the chain; the rest must be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRecord {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub who: Who,
    pub op: String,
    pub target: String,
    pub rule: Option<RuleRef>,
    pub decision: AuditDecision,
    pub outcome: String,
    pub detail: String,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lowercase hex of `bytes` (the `hex` crate; kept here for callers that name it so).
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// `t` as a `jiff` timestamp: times before 1970 are the epoch, times past jiff's range (year
/// 9999) its last instant.
fn timestamp(t: SystemTime) -> jiff::Timestamp {
    if t < UNIX_EPOCH {
        return jiff::Timestamp::UNIX_EPOCH;
    }
    jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::MAX)
}

/// RFC 3339 UTC timestamp with microseconds, e.g. `2026-11-21T13:20:07.123456Z` (always six
/// fractional digits: the audit line format). Times before 1970 are written as the epoch.
pub fn rfc3339_utc(t: SystemTime) -> String {
    timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

/// RFC 3339 UTC timestamp to the second, e.g. `2026-11-21T13:20:07Z`.
pub fn rfc3339_utc_secs(t: SystemTime) -> String {
    timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The append-only, hash-chained audit log. Not `Clone`; share it behind a `Mutex`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Seq of the last record on disk (0 = empty log).
    last_seq: u64,
    /// Hash of the last line on disk (GENESIS for an empty log).
    prev: String,
    /// File length after our last append / tail read; if the file is longer, another writer
    /// appended and the tail is read again.
    end: u64,
    poisoned: Option<String>,
    /// Defence in depth: known secret values are scrubbed from every text field before writing.
    redactor: Option<Arc<Redactor>>,
    /// When the active file is rotated (see [`rotate`]).
    rotation: Rotation,
    /// Tests: stop a rotation after this step, as a crash (SIGKILL) there would.
    #[cfg(test)]
    crash_after: Option<rotate::Step>,
}

/// Exclusive `flock` on the log for the duration of one append; released on drop. Holds a
/// duplicate of the `File`'s descriptor: a flock belongs to the open file description, which
/// the duplicate shares, so locking and unlocking through it is locking and unlocking the log's
/// file, whichever of the two descriptors is closed first.
struct FlockGuard {
    fd: OwnedFd,
}

impl FlockGuard {
    fn lock(file: &File, path: &Path) -> Result<Self, AuditError> {
        let fd = file
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("dup", path))?;
        loop {
            match rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => return Ok(FlockGuard { fd }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err("flock", path)(e.into())),
            }
        }
    }
}

impl Drop for FlockGuard {
    fn drop(&mut self) {
        // Unlock explicitly: the AuditLog keeps the description open (and so would keep it
        // locked) after the duplicate is closed. A failed unlock leaves nothing to do.
        let _ = rustix::fs::flock(&self.fd, rustix::fs::FlockOperation::Unlock);
    }
}

/// Opens (creating it 0600 if needed, and making the new directory entry durable) the active
/// file at `path` for reading and appending. Refuses a symlink.
fn open_active(path: &Path) -> Result<File, AuditError> {
    let existed = path.symlink_metadata().is_ok();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open", path))?;
    if !existed {
        let dir = parent_dir(path);
        crate::durable::sync_dir(dir).map_err(io_err("fsync dir", dir))?;
    }
    Ok(file)
}

/// The directory holding `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The last line of `file` (of length `len` > 0): its seq and hash. Refuses a torn line.
fn tail_of(file: &mut File, path: &Path, len: u64) -> Result<(u64, String), AuditError> {
    let window = len.min(MAX_LINE + 1);
    let start = len - window;
    let mut buf = vec![0u8; usize::try_from(window).unwrap_or(usize::MAX)];
    file.seek(SeekFrom::Start(start))
        .map_err(io_err("lseek", path))?;
    file.read_exact(&mut buf).map_err(io_err("read", path))?;
    if buf.last() != Some(&b'\n') {
        let line_start = buf
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(start, |p| start + p as u64 + 1);
        return Err(AuditError::TornTail {
            path: path.to_path_buf(),
            offset: line_start,
            len: len - line_start,
        });
    }
    let body = &buf[..buf.len() - 1];
    let line_start_in_buf = match body.iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None if start == 0 => 0,
        None => {
            return Err(AuditError::BadTail {
                path: path.to_path_buf(),
                offset: start,
                reason: format!("last line longer than {MAX_LINE} bytes"),
            })
        }
    };
    let line = &body[line_start_in_buf..];
    let offset = start + line_start_in_buf as u64;
    let rec: StoredRecord = serde_json::from_slice(line).map_err(|e| AuditError::BadTail {
        path: path.to_path_buf(),
        offset,
        reason: e.to_string(),
    })?;
    Ok((rec.seq, sha256_hex(line)))
}

impl AuditLog {
    /// Opens (creating it 0600 if needed) the log at `path` for appending and recovers the last
    /// seq and hash from its tail (from the newest rotated file when the active one is empty).
    /// Refuses a symlink, a torn last line and a last line that is not a record. Rotation is off
    /// until [`set_rotation`](Self::set_rotation).
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_path_buf();
        let file = open_active(&path)?;
        let mut log = AuditLog {
            path,
            file,
            last_seq: 0,
            prev: GENESIS.to_string(),
            end: 0,
            poisoned: None,
            redactor: None,
            rotation: Rotation::default(),
            #[cfg(test)]
            crash_after: None,
        };
        {
            let _lock = log.lock_active()?;
            log.read_tail()?;
        }
        Ok(log)
    }

    /// Scrub known secret values from every text field of later records (`target`, `outcome`,
    /// `detail`, the rule's `why`, the identity's strings) before they are written: a backstop for
    /// a caller that puts a value where a name belongs. `None` turns it off.
    pub fn set_redactor(&mut self, redactor: Option<Arc<Redactor>>) {
        self.redactor = redactor;
    }

    /// Rotate the active file when it reaches `rotation.max_bytes` (see [`rotate`]).
    pub fn set_rotation(&mut self, rotation: Rotation) {
        self.rotation = rotation;
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seq of the last record written (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Hash of the last line (the `prev` of the next record).
    pub fn head_hash(&self) -> &str {
        &self.prev
    }

    /// Takes the flock of the file now at `path`. When the file we hold is no longer the one at
    /// `path` (another process rotated it), reopens `path` and reads its tail.
    fn lock_active(&mut self) -> Result<FlockGuard, AuditError> {
        for _ in 0..100 {
            let guard = FlockGuard::lock(&self.file, &self.path)?;
            let held = self.file.metadata().map_err(io_err("fstat", &self.path))?;
            let same = match fs::symlink_metadata(&self.path) {
                Ok(m) => m.dev() == held.dev() && m.ino() == held.ino(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err("lstat", &self.path)(e)),
            };
            if same {
                return Ok(guard);
            }
            let file = open_active(&self.path)?;
            drop(guard);
            self.file = file;
            // Nothing of the new file is known yet: read its tail under its lock.
            self.end = u64::MAX;
        }
        Err(AuditError::Io {
            op: "reopen after rotation",
            path: self.path.clone(),
            source: io::Error::other("the file keeps being replaced"),
        })
    }

    /// Reads the last line and sets `last_seq`, `prev`, `end`. Caller holds the flock. An empty
    /// active file continues the chain of the newest rotated file, if there is one.
    /// Under the lock: the file's length, after recovering the tail when another writer
    /// appended (or the file was cut) behind our back.
    pub(crate) fn catch_up(&mut self) -> Result<u64, AuditError> {
        let len = self
            .file
            .metadata()
            .map_err(io_err("fstat", &self.path))?
            .len();
        if len != self.end {
            self.read_tail()?;
        }
        Ok(len)
    }

    fn read_tail(&mut self) -> Result<(), AuditError> {
        let path = &self.path;
        let len = self.file.metadata().map_err(io_err("fstat", path))?.len();
        let (seq, hash) = if len > 0 {
            tail_of(&mut self.file, path, len)?
        } else {
            match rotate::rotated_files(path)
                .map_err(io_err("list rotated files", parent_dir(path)))?
                .pop()
            {
                None => (0, GENESIS.to_string()),
                Some((_, old)) => {
                    let mut f = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&old)
                        .map_err(io_err("open", &old))?;
                    let old_len = f.metadata().map_err(io_err("fstat", &old))?.len();
                    if old_len == 0 {
                        return Err(AuditError::BadTail {
                            path: old,
                            offset: 0,
                            reason: "the newest rotated file is empty".into(),
                        });
                    }
                    tail_of(&mut f, &old, old_len)?
                }
            }
        };
        self.last_seq = seq;
        self.prev = hash;
        self.end = len;
        Ok(())
    }

    /// Appends one record and `fdatasync`s it. Returns its seq. On `Err` the record is not known
    /// to be on disk and the action must be denied.
    pub fn append(&mut self, rec: &AuditRecord) -> Result<u64, AuditError> {
        self.append_at(rec, SystemTime::now())
    }

    fn check_poisoned(&self) -> Result<(), AuditError> {
        match &self.poisoned {
            Some(reason) => Err(AuditError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// [`append`](Self::append) with an explicit timestamp (tests, replays of a decided time).
    pub fn append_at(&mut self, rec: &AuditRecord, ts: SystemTime) -> Result<u64, AuditError> {
        self.check_poisoned()?;
        let mut lock = self.lock_active()?;
        let mut len = self.catch_up()?;
        if self.rotation.max_bytes > 0 && len >= self.rotation.max_bytes {
            let (new_lock, _) = self.rotate_locked(lock)?;
            lock = new_lock;
            len = self.end;
        }
        let _lock = lock;
        let seq = self.last_seq + 1;
        let ts = rfc3339_utc(ts);
        let scrubbed;
        let rec = match &self.redactor {
            Some(r) => {
                scrubbed = scrub(r, rec);
                &scrubbed
            }
            None => rec,
        };
        let out = LineOut {
            seq,
            ts: &ts,
            prev: &self.prev,
            who: &rec.who,
            op: &rec.op,
            target: &rec.target,
            rule: &rec.rule,
            decision: rec.decision,
            outcome: &rec.outcome,
            detail: &rec.detail,
        };
        let mut line = serde_json::to_vec(&out).map_err(|source| AuditError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let hash = sha256_hex(&line);
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            self.poisoned = Some(format!("write: {e}"));
            return Err(io_err("write", &self.path)(e));
        }
        if let Err(e) = self.file.sync_data() {
            self.poisoned = Some(format!("fdatasync: {e}"));
            return Err(io_err("fdatasync", &self.path)(e));
        }
        self.last_seq = seq;
        self.prev = hash;
        self.end = len + line.len() as u64;
        Ok(seq)
    }
}

/// `rec` with every string passed through `r`.
fn scrub(r: &Redactor, rec: &AuditRecord) -> AuditRecord {
    let s = |v: &str| -> String {
        match r.redact(v.as_bytes()) {
            std::borrow::Cow::Borrowed(_) => v.to_string(),
            std::borrow::Cow::Owned(b) => String::from_utf8_lossy(&b).into_owned(),
        }
    };
    AuditRecord {
        who: Who {
            id: rec.who.id,
            role: s(&rec.who.role),
            profile: s(&rec.who.profile),
        },
        op: s(&rec.op),
        target: s(&rec.target),
        rule: rec.rule.as_ref().map(|rule| RuleRef {
            line: rule.line,
            why: s(&rule.why),
        }),
        decision: rec.decision,
        outcome: s(&rec.outcome),
        detail: s(&rec.detail),
    }
}

/// How the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakKind {
    /// The line is not a JSON audit record.
    BadJson(String),
    /// The file ends in the middle of a line (no final newline): truncated or torn.
    Truncated,
    /// This line was changed after the next line was written (the next line's `prev` does not match
    /// it, but the chain continues correctly from this line's successor onwards), or its `seq` was
    /// changed.
    Edited,
    /// This line's `prev` does not match the line before it and nothing follows to tell which of the
    /// two was altered: the line before was edited, or this line was appended by someone else.
    EditedOrForged,
    /// Records are missing before this line: `missing` seqs `from..=to`.
    Deleted { from: u64, to: u64 },
    /// This line is out of order: it carries `found` where `expected` was due, and the expected
    /// record is elsewhere in the file.
    Reordered { expected: u64, found: u64 },
    /// This line is a byte-for-byte copy of line `of`.
    Duplicated { of: u64 },
    /// The chain is intact but ends before the anchored head ([`verify_against`]).
    MissingTail { anchored_seq: u64, last_seq: u64 },
    /// The line at the anchored seq does not hash to the anchored hash ([`verify_against`]).
    AnchorMismatch,
}

/// The first place the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// 1-based line number in the file of the line found to be wrong.
    pub line: u64,
    pub kind: BreakKind,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.line;
        match &self.kind {
            BreakKind::BadJson(e) => write!(f, "line {l}: not an audit record: {e}"),
            BreakKind::Truncated => write!(f, "line {l}: truncated (file ends without a newline)"),
            BreakKind::Edited => write!(
                f,
                "line {l}: edited (its hash or seq no longer matches the chain around it)"
            ),
            BreakKind::EditedOrForged => write!(
                f,
                "line {l}: does not follow line {}: that line was edited or this one forged",
                l.saturating_sub(1)
            ),
            BreakKind::Deleted { from, to } if from == to => {
                write!(f, "line {l}: record seq {from} deleted before this line")
            }
            BreakKind::Deleted { from, to } => {
                write!(f, "line {l}: records seq {from}..={to} deleted before this line")
            }
            BreakKind::Reordered { expected, found } => write!(
                f,
                "line {l}: reordered (seq {found} where {expected} was due; {expected} is elsewhere)"
            ),
            BreakKind::Duplicated { of } => write!(f, "line {l}: duplicate of line {of}"),
            BreakKind::MissingTail {
                anchored_seq,
                last_seq,
            } => write!(
                f,
                "line {l}: the log ends at seq {last_seq} but seq {anchored_seq} was anchored: \
                 records deleted from the end"
            ),
            BreakKind::AnchorMismatch => write!(
                f,
                "line {l}: does not hash to the anchored head: edited or replaced"
            ),
        }
    }
}

/// The last record of a chain: anchor it elsewhere to detect truncation of whole lines at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    /// Hex SHA-256 of the last line.
    pub hash: String,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines read (including the broken one).
    pub lines: u64,
    /// Last line of the intact prefix of the chain (None if the file is empty or line 1 is bad).
    pub head: Option<Head>,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.broken.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.broken, &self.head) {
            (Some(b), _) => write!(f, "BROKEN: {b}"),
            (None, Some(h)) => write!(
                f,
                "ok: {} records, chain intact, head seq {} hash {}",
                self.lines, h.seq, h.hash
            ),
            (None, None) => write!(f, "ok: empty log"),
        }
    }
}

/// Checks seq continuity and the hash chain of the log at `path`. I/O errors are `Err`; a broken
/// chain is an `Ok` report with `broken` set to the first line found wrong and how.
///
/// Reads the file as a stream (memory does not grow with the log); only when a break is found
/// is the file read again to tell how it is broken.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, AuditError> {
    let path = path.as_ref();
    let f = File::open(path).map_err(io_err("open", path))?;
    verify_reader(&mut BufReader::with_capacity(64 * 1024, f)).map_err(io_err("read", path))
}

/// [`verify`], then also checks that the chain reaches `anchor` (a [`Head`] saved earlier) and
/// that the line at the anchored seq hashes to it.
pub fn verify_against(path: impl AsRef<Path>, anchor: &Head) -> Result<VerifyReport, AuditError> {
    let path = path.as_ref();
    let mut report = verify(path)?;
    if report.broken.is_some() {
        return Ok(report);
    }
    let last_seq = report.head.as_ref().map_or(0, |h| h.seq);
    if last_seq < anchor.seq {
        report.broken = Some(ChainBreak {
            line: report.lines + 1,
            kind: BreakKind::MissingTail {
                anchored_seq: anchor.seq,
                last_seq,
            },
        });
        return Ok(report);
    }
    // In an intact chain starting at seq 1, seq n is line n.
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let mut buf = Vec::new();
    let mut hash = None;
    for _ in 0..anchor.seq {
        match next_line(&mut r, &mut buf).map_err(io_err("read", path))? {
            Some(_) => hash = Some(sha256_hex(&buf)),
            None => {
                hash = None;
                break;
            }
        }
    }
    if hash.as_deref() != Some(anchor.hash.as_str()) {
        report.broken = Some(ChainBreak {
            line: anchor.seq,
            kind: BreakKind::AnchorMismatch,
        });
    }
    Ok(report)
}

/// How a line ended.
#[derive(Debug, Clone, Copy)]
struct LineEnd {
    /// It ended with `\n` (not at EOF without one).
    complete: bool,
    /// It was longer than [`MAX_LINE`]; `buf` holds only its start.
    too_long: bool,
}

/// Reads the next line (without its `\n`) into `buf`, keeping at most [`MAX_LINE`] bytes of it.
/// `None` at EOF.
fn next_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<LineEnd>> {
    buf.clear();
    let mut started = false;
    let mut too_long = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(started.then_some(LineEnd {
                complete: false,
                too_long,
            }));
        }
        started = true;
        let (take, used, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(p) => (p, p + 1, true),
            None => (avail.len(), avail.len(), false),
        };
        if buf.len() + take > usize::try_from(MAX_LINE).unwrap_or(usize::MAX) {
            too_long = true;
        } else {
            buf.extend_from_slice(&avail[..take]);
        }
        r.consume(used);
        if done {
            return Ok(Some(LineEnd {
                complete: true,
                too_long,
            }));
        }
    }
}

/// [`verify`] on bytes.
pub fn verify_bytes(data: &[u8]) -> VerifyReport {
    match verify_reader(&mut io::Cursor::new(data)) {
        Ok(r) => r,
        // Reading from memory does not fail; if it did, say so as a break at line 1.
        Err(e) => VerifyReport {
            lines: 0,
            head: None,
            broken: Some(ChainBreak {
                line: 1,
                kind: BreakKind::BadJson(e.to_string()),
            }),
        },
    }
}

/// [`verify`] over any seekable reader positioned at the start of the log.
pub fn verify_reader<R: BufRead + Seek>(r: &mut R) -> io::Result<VerifyReport> {
    verify_reader_from(r, 1, GENESIS)
}

/// [`verify_reader`] of a chain whose first line must carry `first_seq` and `prev` (a file of a
/// rotated set continues the chain of the file before it).
pub fn verify_reader_from<R: BufRead + Seek>(
    r: &mut R,
    first_seq: u64,
    prev: &str,
) -> io::Result<VerifyReport> {
    let mut report = VerifyReport {
        lines: 0,
        head: None,
        broken: None,
    };
    let mut expected_seq = first_seq;
    let mut prev_hash = prev.to_string();
    let mut buf = Vec::new();
    while let Some(end) = next_line(r, &mut buf)? {
        let lineno = report.lines + 1;
        report.lines = lineno;
        let brk = |kind| Some(ChainBreak { line: lineno, kind });
        if !end.complete {
            report.broken = brk(BreakKind::Truncated);
            return Ok(report);
        }
        if end.too_long {
            report.broken = brk(BreakKind::BadJson(format!(
                "line longer than {MAX_LINE} bytes"
            )));
            return Ok(report);
        }
        let rec: StoredRecord = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                report.broken = brk(BreakKind::BadJson(e.to_string()));
                return Ok(report);
            }
        };
        let hash = sha256_hex(&buf);
        let prev_ok = rec.prev == prev_hash;
        let seq_ok = rec.seq == expected_seq;
        if prev_ok && seq_ok {
            report.head = Some(Head {
                seq: rec.seq,
                hash: hash.clone(),
            });
            prev_hash = hash;
            expected_seq = rec.seq + 1;
            continue;
        }
        // Broken at this line: work out how (reads on, and re-reads the start if needed).
        let line = std::mem::take(&mut buf);
        let (at, kind) = classify(r, lineno, &line, &hash, &rec, prev_ok, expected_seq)?;
        report.broken = Some(ChainBreak { line: at, kind });
        return Ok(report);
    }
    Ok(report)
}

/// Line number (1-based) of the first of the first `before` lines equal to `line`, if any.
fn find_duplicate<R: BufRead + Seek>(
    r: &mut R,
    before: u64,
    line: &[u8],
) -> io::Result<Option<u64>> {
    r.seek(SeekFrom::Start(0))?;
    let mut buf = Vec::new();
    for n in 1..=before {
        if next_line(r, &mut buf)?.is_none() {
            break;
        }
        if buf == line {
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// Tells how the chain breaks at line `lineno` (`line`, hashing to `hash`, parsed as `rec`).
/// `r` is positioned just after that line.
fn classify<R: BufRead + Seek>(
    r: &mut R,
    lineno: u64,
    line: &[u8],
    hash: &str,
    rec: &StoredRecord,
    prev_ok: bool,
    expected_seq: u64,
) -> io::Result<(u64, BreakKind)> {
    // Follows its predecessor but carries the wrong seq: its seq field was edited.
    if prev_ok {
        return Ok((lineno, BreakKind::Edited));
    }
    // What comes after: does the next line chain from this one, is the expected seq further on?
    let mut buf = Vec::new();
    let mut next_chains = None;
    let mut expected_later = false;
    while let Some(end) = next_line(r, &mut buf)? {
        let later: Option<StoredRecord> = if end.complete && !end.too_long {
            serde_json::from_slice(&buf).ok()
        } else {
            None
        };
        if next_chains.is_none() {
            next_chains = Some(later.as_ref().is_some_and(|n| n.prev == hash));
        }
        if later.as_ref().is_some_and(|n| n.seq == expected_seq) {
            expected_later = true;
        }
        if rec.seq == expected_seq {
            break; // only the next line matters
        }
    }
    if let Some(of) = find_duplicate(r, lineno - 1, line)? {
        return Ok((lineno, BreakKind::Duplicated { of }));
    }
    if rec.seq == expected_seq {
        return Ok(match next_chains {
            // This line is genuine (its successor chains from it): the previous line was edited.
            Some(true) if lineno > 1 => (lineno - 1, BreakKind::Edited),
            // Neither chains: this line itself (its prev) was edited.
            Some(_) => (lineno, BreakKind::Edited),
            None => (lineno, BreakKind::EditedOrForged),
        });
    }
    let kind = if expected_later || rec.seq < expected_seq {
        BreakKind::Reordered {
            expected: expected_seq,
            found: rec.seq,
        }
    } else {
        BreakKind::Deleted {
            from: expected_seq,
            to: rec.seq - 1,
        }
    };
    Ok((lineno, kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29T12:34:56.5Z (leap day)
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_500);
        assert_eq!(rfc3339_utc(t), "2000-02-29T12:34:56.500000Z");
        // 2026-11-21T13:20:07Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_267_207);
        assert_eq!(rfc3339_utc(t), "2026-11-21T13:20:07.000000Z");
        // 2100-03-01 (2100 is not a leap year)
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400);
        assert_eq!(rfc3339_utc(t), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn rfc3339_format_is_pinned() {
        // Six fractional digits always, `Z`, no offset: the audit line format.
        let t = UNIX_EPOCH + Duration::new(1_795_267_207, 123_456_789);
        assert_eq!(rfc3339_utc(t), "2026-11-21T13:20:07.123456Z");
        let t = UNIX_EPOCH + Duration::new(1_795_267_207, 1_000);
        assert_eq!(rfc3339_utc(t), "2026-11-21T13:20:07.000001Z");
        assert_eq!(rfc3339_utc_secs(t), "2026-11-21T13:20:07Z");
        // Before 1970: the epoch.
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc3339_utc(before), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn audit_line_bytes_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        let rec = AuditRecord {
            who: Who {
                id: 3,
                role: "tool".into(),
                profile: "dev".into(),
            },
            op: "connect".into(),
            target: "api.example.com:443".into(),
            rule: Some(RuleRef {
                line: Some(12),
                why: "model API".into(),
            }),
            decision: AuditDecision::Allow,
            outcome: "connected".into(),
            detail: String::new(),
        };
        let t = UNIX_EPOCH + Duration::new(1_795_267_207, 123_456_789);
        log.append_at(&rec, t).unwrap();
        log.append_at(&rec, t).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first = concat!(
            r#"{"seq":1,"ts":"2026-11-21T13:20:07.123456Z","#,
            r#""prev":"0000000000000000000000000000000000000000000000000000000000000000","#,
            r#""who":{"id":3,"role":"tool","profile":"dev"},"op":"connect","#,
            r#""target":"api.example.com:443","rule":{"line":12,"why":"model API"},"#,
            r#""decision":"allow","outcome":"connected","detail":""}"#
        );
        let second = first
            .replace(r#""seq":1"#, r#""seq":2"#)
            .replace(GENESIS, &sha256_hex(first.as_bytes()));
        assert_eq!(text, format!("{first}\n{second}\n"));
    }

    #[test]
    fn hex_and_sha() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(GENESIS.len(), 64);
    }

    #[test]
    fn empty_file_verifies_as_empty() {
        let r = verify_bytes(b"");
        assert!(r.is_ok());
        assert_eq!(r.lines, 0);
        assert_eq!(r.head, None);
    }

    #[test]
    fn an_overlong_line_is_reported_not_buffered() {
        let mut data = vec![b'x'; usize::try_from(MAX_LINE).unwrap() + 10];
        data.push(b'\n');
        let r = verify_bytes(&data);
        match r.broken {
            Some(ChainBreak {
                line: 1,
                kind: BreakKind::BadJson(e),
            }) => assert!(e.contains("longer than"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Without the final newline it is a truncation.
        data.pop();
        assert_eq!(
            verify_bytes(&data).broken.unwrap().kind,
            BreakKind::Truncated
        );
    }

    #[test]
    fn garbage_is_bad_json_at_line_1() {
        let r = verify_bytes(b"hello\n");
        assert!(matches!(
            r.broken,
            Some(ChainBreak {
                line: 1,
                kind: BreakKind::BadJson(_)
            })
        ));
    }

    /// Whether another open file description of `path` can take the flock right now.
    fn lockable_elsewhere(path: &Path) -> bool {
        let other = File::open(path).unwrap();
        let op = rustix::fs::FlockOperation::NonBlockingLockExclusive;
        match rustix::fs::flock(&other, op) {
            Ok(()) => true,
            Err(rustix::io::Errno::WOULDBLOCK) => false,
            Err(e) => panic!("flock: {e}"),
        }
    }

    #[test]
    fn the_append_lock_excludes_other_writers_until_the_guard_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        assert!(lockable_elsewhere(&path));
        let guard = log.lock_active().unwrap();
        assert!(!lockable_elsewhere(&path), "held guard does not exclude");
        drop(guard);
        // The log keeps its file open: only an explicit unlock frees the lock.
        assert!(lockable_elsewhere(&path), "dropped guard still locks");
        log.append(&AuditRecord {
            who: Who {
                id: 1,
                role: "tool".into(),
                profile: "dev".into(),
            },
            op: "ping".into(),
            target: String::new(),
            rule: None,
            decision: AuditDecision::Allow,
            outcome: "ok".into(),
            detail: String::new(),
        })
        .unwrap();
        assert!(lockable_elsewhere(&path), "an append leaves the log locked");
    }
}
