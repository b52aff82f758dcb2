//! Approvals for `exec` rules that say `ask`.
//!
//! [`Approvals::request`] first looks for a persisted allow-always [`Grant`] bound to exactly
//! (canonical program path, SHA-256 of the program's content, exact canonical argv, profile): if
//! one matches, the answer is an immediate allow. Otherwise a [`Pending`] approval is created
//! with everything the operator needs to decide; the broker then blocks in
//! [`Approvals::wait`] (on a blocking thread) until the operator calls [`Approvals::resolve`] or
//! the approval times out, which is a denial ([`Decision::TimedOut`], audited as "timed out").
//!
//! A changed binary (different content hash) matches no grant and asks again; so does any other
//! argv or profile. Grants live in `<state_dir>/approvals.json` (0600, `{"version":1,"grants":
//! [...]}`), rewritten atomically (temporary file in the same directory, fsync, rename, fsync of
//! the directory) on each allow-always. A state file that cannot be read or parsed is an error
//! at [`Approvals::open`] and is left untouched; [`set_aside_corrupt`] moves it aside (keeping
//! it) so that the broker can start with no grants.
//!
//! Pending approvals are also written to `<state_dir>/asks/` (one atomic file each, removed when
//! the approval ends), so that a restart of the broker does not lose what the operator was asked:
//! [`Approvals::open`] lists them again (with new ids) until their original deadline. Their
//! requesters are gone with the old broker, so such an approval waits for the same request to
//! come again (an agent that re-runs an unanswered message asks again): a matching
//! [`Approvals::request`] (same program, content hash, argv and profile) takes it over instead of
//! asking a second time, and an answer the operator gave meanwhile is kept for it
//! ([`Requested::Answered`]).
//!
//! The hash is of the program as opened once for the run ([`OpenedProgram`]): the spawner
//! starts that same file (the same inode, unchanged since it was opened) or nothing, so a
//! program replaced between the approval and the start is not what runs.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::audit::{rfc3339_utc, Who};
use crate::durable::{ensure_dir, read_capped, sync_dir, write_atomic, DurableError};
use carapace_sandbox::program::{OpenedProgram, ProgramError};

/// File name of the grants in the state directory.
pub const STATE_FILE: &str = "approvals.json";
/// Directory of the pending approvals in the state directory.
pub const ASKS_DIR: &str = "asks";
/// Most approvals pending at once; more requests are refused.
pub const MAX_PENDING: usize = 1024;
const MAX_STATE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approvals state {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "approvals state {path} is corrupt ({reason}); it was left untouched. Fix it, or move it \
         aside (`set_aside_corrupt`) to start with no allow-always grants"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot hash the program: {0}")]
    Program(#[from] ProgramError),
    #[error(
        "approval asked for {} but the program opened is {}",
        asked.display(),
        opened.display()
    )]
    NotTheOpenedProgram { asked: PathBuf, opened: PathBuf },
    #[error("no pending approval {id}")]
    UnknownId { id: u64 },
    #[error("approval {id} was already resolved")]
    AlreadyResolved { id: u64 },
    #[error("approval {id} timed out before it was resolved (denied)")]
    Expired { id: u64 },
    #[error("too many pending approvals ({max}); refused")]
    TooMany { max: usize },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ApprovalError + 'a {
    move |source| ApprovalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What is asked for. `program` and `argv` are already canonical (resolved path, canonical
/// argv as the policy decided on them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSpec {
    pub identity: Who,
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub profile: String,
    pub cwd: PathBuf,
}

/// A pending approval, as shown to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: u64,
    pub identity: Who,
    pub program: PathBuf,
    /// Hex SHA-256 of the program's content at request time.
    pub program_sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub cwd: PathBuf,
    /// RFC 3339 UTC.
    pub created: String,
    /// When it times out (denied) unless resolved.
    pub expires: Instant,
}

/// A persisted allow-always grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub program: PathBuf,
    pub sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    /// RFC 3339 UTC.
    pub granted_at: String,
    /// Who asked when it was granted (for the operator's records).
    pub requested_by: Who,
}

impl Grant {
    fn matches(&self, program: &Path, sha256: &str, argv: &[String], profile: &str) -> bool {
        self.program == program
            && self.sha256 == sha256
            && self.argv == argv
            && self.profile == profile
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    grants: Vec<Grant>,
}

/// Result of [`Approvals::request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// A persisted grant matches: allowed without asking.
    Allowed(Grant),
    /// The operator must decide; wait on `id`.
    Pending(Pending),
    /// The operator already answered this request while nobody waited for it (an approval from
    /// before a restart of the broker): the answer, used up by this request.
    Answered(Decision),
}

/// A pending approval as written to `<state_dir>/asks/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskFile {
    identity: Who,
    program: PathBuf,
    program_sha256: String,
    argv: Vec<String>,
    profile: String,
    cwd: PathBuf,
    created: String,
    /// Seconds since the epoch when it times out.
    expires_unix: u64,
}

/// The operator's answer to a pending approval. One spelling everywhere: the broker protocol's
/// `approve`, the control socket's `approvals_resolve`, the gateway's `approvals.resolve` and
/// the answer files of `carapace exec` all say `allow-once`, `allow-always` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resolution {
    /// Allow this one request.
    AllowOnce,
    /// Allow it, and persist a grant for this program content, argv and profile.
    AllowAlways,
    /// Refuse it.
    Deny,
}

impl Resolution {
    /// Every answer, in the order messages list them.
    pub const ALL: [Resolution; 3] = [
        Resolution::AllowOnce,
        Resolution::AllowAlways,
        Resolution::Deny,
    ];

    /// The accepted spellings, as error messages list them.
    pub const EXPECTED: &'static str = "allow-once, allow-always or deny";

    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::AllowOnce => "allow-once",
            Resolution::AllowAlways => "allow-always",
            Resolution::Deny => "deny",
        }
    }

    /// From its wire name (exactly; no trimming, no other case).
    pub fn parse(s: &str) -> Option<Resolution> {
        Resolution::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of [`Resolution::EXPECTED`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {}", Resolution::EXPECTED)]
pub struct UnknownResolution;

impl std::str::FromStr for Resolution {
    type Err = UnknownResolution;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resolution::parse(s).ok_or(UnknownResolution)
    }
}

/// How an approval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    AllowOnce,
    AllowAlways,
    Denied,
    /// Not resolved in time: a denial.
    TimedOut,
    /// Withdrawn by the broker (peer gone): a denial.
    Cancelled,
}

impl Decision {
    pub fn is_allow(self) -> bool {
        matches!(self, Decision::AllowOnce | Decision::AllowAlways)
    }

    /// Words for the audit record's outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::AllowOnce => "allowed once",
            Decision::AllowAlways => "allowed always",
            Decision::Denied => "denied",
            Decision::TimedOut => "timed out",
            Decision::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug)]
struct Slot {
    pending: Pending,
    state: Option<Decision>,
    /// Its file in `<state_dir>/asks/` (None: not persisted).
    file: Option<PathBuf>,
    /// From before a restart: nobody waits for it until a matching request takes it over.
    orphan: bool,
}

#[derive(Debug)]
struct Inner {
    grants: Vec<Grant>,
    slots: BTreeMap<u64, Slot>,
    next_id: u64,
}

/// Pending approvals and persisted grants. Share it (`Arc<Approvals>`): the broker waits on one
/// thread while the operator resolves from another.
#[derive(Debug)]
pub struct Approvals {
    state_dir: PathBuf,
    path: PathBuf,
    timeout: Duration,
    inner: Mutex<Inner>,
    cond: Condvar,
    /// Bumped whenever an approval starts waiting or ends ([`Approvals::subscribe`]).
    changed: tokio::sync::watch::Sender<u64>,
}

/// Hex SHA-256 of the executable regular file at `path` (opened and hashed as
/// [`OpenedProgram`] does).
pub fn hash_program(path: &Path) -> Result<String, ApprovalError> {
    Ok(OpenedProgram::open(path)?.sha256()?.to_string())
}

/// Moves a corrupt `<state_dir>/approvals.json` aside to `approvals.json.corrupt-<unix secs>`
/// (never overwriting an earlier one) and returns where it went.
pub fn set_aside_corrupt(state_dir: impl AsRef<Path>) -> Result<PathBuf, ApprovalError> {
    let dir = state_dir.as_ref();
    let path = dir.join(STATE_FILE);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for n in 0..1000u32 {
        let aside = if n == 0 {
            dir.join(format!("{STATE_FILE}.corrupt-{secs}"))
        } else {
            dir.join(format!("{STATE_FILE}.corrupt-{secs}.{n}"))
        };
        if aside.symlink_metadata().is_ok() {
            continue;
        }
        // link + unlink: fails instead of replacing if `aside` appeared meanwhile.
        std::fs::hard_link(&path, &aside).map_err(io_err("link", &path))?;
        std::fs::remove_file(&path).map_err(io_err("unlink", &path))?;
        sync_dir(dir).map_err(io_err("fsync dir", dir))?;
        return Ok(aside);
    }
    Err(ApprovalError::Io {
        op: "link",
        path,
        source: io::Error::new(io::ErrorKind::AlreadyExists, "too many set-aside copies"),
    })
}

impl Approvals {
    /// Opens the approvals state in `state_dir` (created 0700 if missing), loading allow-always
    /// grants. Pending approvals time out (deny) after `timeout`.
    pub fn open(
        state_dir: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Approvals, ApprovalError> {
        let state_dir = state_dir.as_ref().to_path_buf();
        ensure_dir(&state_dir).map_err(io_err("mkdir", &state_dir))?;
        let path = state_dir.join(STATE_FILE);
        let grants = match read_capped(&path, MAX_STATE_BYTES) {
            Ok(data) => {
                let st: StateFile =
                    serde_json::from_slice(&data).map_err(|e| ApprovalError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if st.version != 1 {
                    return Err(ApprovalError::Corrupt {
                        path,
                        reason: format!("unknown version {}", st.version),
                    });
                }
                st.grants
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(ApprovalError::Corrupt {
                    path,
                    reason: e.to_string(),
                })
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut slots = BTreeMap::new();
        for (id, (pending, file)) in (1u64..).zip(load_asks(&state_dir.join(ASKS_DIR))) {
            slots.insert(
                id,
                Slot {
                    pending: Pending { id, ..pending },
                    state: None,
                    file: Some(file),
                    orphan: true,
                },
            );
        }
        Ok(Approvals {
            state_dir,
            path,
            timeout,
            inner: Mutex::new(Inner {
                grants,
                next_id: slots.len() as u64 + 1,
                slots,
            }),
            cond: Condvar::new(),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Told (the value changes) whenever an approval starts waiting or ends: for whoever
    /// announces approvals to an operator.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Write `p` to `<state_dir>/asks/` (atomic); its path.
    fn persist_ask(&self, p: &Pending) -> Result<PathBuf, ApprovalError> {
        let dir = self.state_dir.join(ASKS_DIR);
        ensure_dir(&dir).map_err(io_err("mkdir", &dir))?;
        let left = p.expires.saturating_duration_since(Instant::now());
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let rec = AskFile {
            identity: p.identity.clone(),
            program: p.program.clone(),
            program_sha256: p.program_sha256.clone(),
            argv: p.argv.clone(),
            profile: p.profile.clone(),
            cwd: p.cwd.clone(),
            created: p.created.clone(),
            expires_unix: now_unix.saturating_add(left.as_secs() + 1),
        };
        let data = serde_json::to_vec(&rec).map_err(|e| ApprovalError::Corrupt {
            path: dir.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let file = dir.join(format!("{nanos:024}-{}-{}.json", std::process::id(), p.id));
        write_atomic(&file, &data)
            .map_err(|DurableError { op, path, source }| ApprovalError::Io { op, path, source })?;
        Ok(file)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing in here panics while holding the lock; if something did, the data is still
        // consistent (every update is a single assignment/insert).
        crate::sync::lock(&self.inner)
    }

    /// Persisted allow-always grants.
    pub fn grants(&self) -> Vec<Grant> {
        self.lock().grants.clone()
    }

    /// Opens `spec.program`, then [`Approvals::request_opened`].
    pub fn request(&self, spec: PendingSpec) -> Result<Requested, ApprovalError> {
        let program = OpenedProgram::open(&spec.program)?;
        self.request_opened(spec, &program)
    }

    /// Hashes `program` (the descriptor the run will start, opened at `spec.program`), then: a
    /// matching grant -> `Allowed`; else a new pending approval.
    pub fn request_opened(
        &self,
        spec: PendingSpec,
        program: &OpenedProgram,
    ) -> Result<Requested, ApprovalError> {
        if spec.program != program.path() {
            return Err(ApprovalError::NotTheOpenedProgram {
                asked: spec.program,
                opened: program.path().to_path_buf(),
            });
        }
        let sha = program.sha256()?.to_string();
        self.request_hashed(spec, sha)
    }

    /// A request that starts no program (the broker's `open` under an `ask` rule): `sha` is
    /// the digest identifying what is asked (see [`action_sha256`]), in place of a program's.
    /// A matching grant -> `Allowed`; else a new pending approval.
    pub fn request_hashed(
        &self,
        spec: PendingSpec,
        sha: String,
    ) -> Result<Requested, ApprovalError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(g) = inner
            .grants
            .iter()
            .find(|g| g.matches(&spec.program, &sha, &spec.argv, &spec.profile))
        {
            return Ok(Requested::Allowed(g.clone()));
        }
        // Forget long-expired approvals nobody waited for (and their files).
        let grace = self.timeout;
        inner.slots.retain(|_, s| {
            let keep = now.saturating_duration_since(s.pending.expires) <= grace
                && !(s.orphan && now >= s.pending.expires);
            if !keep {
                remove_ask(s.file.as_deref());
            }
            keep
        });
        // An approval from before a restart for this very request: take it over (its answer,
        // when the operator gave one meanwhile, is this request's).
        let same = |p: &Pending| {
            p.program == spec.program
                && p.program_sha256 == sha
                && p.argv == spec.argv
                && p.profile == spec.profile
        };
        if let Some((&id, _)) = inner
            .slots
            .iter()
            .find(|(_, s)| s.orphan && same(&s.pending) && now < s.pending.expires)
        {
            if let Some(slot) = inner.slots.get_mut(&id) {
                if let Some(d) = slot.state {
                    remove_ask(slot.file.as_deref());
                    inner.slots.remove(&id);
                    return Ok(Requested::Answered(d));
                }
                slot.orphan = false;
                let p = slot.pending.clone();
                drop(inner);
                self.bump();
                return Ok(Requested::Pending(p));
            }
        }
        if inner.slots.len() >= MAX_PENDING {
            return Err(ApprovalError::TooMany { max: MAX_PENDING });
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let pending = Pending {
            id,
            identity: spec.identity,
            program: spec.program,
            program_sha256: sha,
            argv: spec.argv,
            profile: spec.profile,
            cwd: spec.cwd,
            created: rfc3339_utc(SystemTime::now()),
            expires: now + self.timeout,
        };
        // Written before anyone is asked: an approval the operator sees survives a restart.
        let file = self.persist_ask(&pending)?;
        inner.slots.insert(
            id,
            Slot {
                pending: pending.clone(),
                state: None,
                file: Some(file),
                orphan: false,
            },
        );
        drop(inner);
        self.bump();
        Ok(Requested::Pending(pending))
    }

    /// Approvals waiting for the operator (unresolved, not yet timed out), oldest first.
    ///
    /// (An approval of a request that starts no program carries [`action_sha256`] of its
    /// argv as its `program_sha256`.)
    pub fn list(&self) -> Vec<Pending> {
        let now = Instant::now();
        self.lock()
            .slots
            .values()
            .filter(|s| s.state.is_none() && now < s.pending.expires)
            .map(|s| s.pending.clone())
            .collect()
    }

    /// The operator's answer to approval `id`. `AllowAlways` persists a grant first; if that
    /// fails, the approval stays pending (nothing is allowed) and the error is returned.
    pub fn resolve(&self, id: u64, resolution: Resolution) -> Result<Decision, ApprovalError> {
        let mut inner = self.lock();
        let slot = inner
            .slots
            .get(&id)
            .ok_or(ApprovalError::UnknownId { id })?;
        if slot.state.is_some() {
            return Err(ApprovalError::AlreadyResolved { id });
        }
        if Instant::now() >= slot.pending.expires {
            if let Some(s) = inner.slots.get_mut(&id) {
                s.state = Some(Decision::TimedOut);
            }
            self.cond.notify_all();
            drop(inner);
            self.bump();
            return Err(ApprovalError::Expired { id });
        }
        let decision = match resolution {
            Resolution::AllowOnce => Decision::AllowOnce,
            Resolution::Deny => Decision::Denied,
            Resolution::AllowAlways => {
                let p = &slot.pending;
                let grant = Grant {
                    program: p.program.clone(),
                    sha256: p.program_sha256.clone(),
                    argv: p.argv.clone(),
                    profile: p.profile.clone(),
                    granted_at: rfc3339_utc(SystemTime::now()),
                    requested_by: p.identity.clone(),
                };
                let dup = inner
                    .grants
                    .iter()
                    .any(|g| g.matches(&grant.program, &grant.sha256, &grant.argv, &grant.profile));
                if !dup {
                    let mut grants = inner.grants.clone();
                    grants.push(grant);
                    self.persist(&grants)?;
                    inner.grants = grants;
                }
                Decision::AllowAlways
            }
        };
        if let Some(s) = inner.slots.get_mut(&id) {
            s.state = Some(decision);
            if s.orphan {
                // Kept in memory for the request that comes again; the file would offer it to
                // the operator once more after another restart.
                remove_ask(s.file.take().as_deref());
            }
        }
        self.cond.notify_all();
        drop(inner);
        self.bump();
        Ok(decision)
    }

    fn persist(&self, grants: &[Grant]) -> Result<(), ApprovalError> {
        let st = StateFile {
            version: 1,
            grants: grants.to_vec(),
        };
        let data = serde_json::to_vec_pretty(&st).map_err(|e| ApprovalError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        write_atomic(&self.path, &data)
            .map_err(|DurableError { op, path, source }| ApprovalError::Io { op, path, source })
    }

    /// Removes the persisted grant equal in (program, sha256, argv, profile) to `grant`.
    /// Returns whether one was removed. On a persist error nothing changes.
    pub fn revoke(&self, grant: &Grant) -> Result<bool, ApprovalError> {
        let mut inner = self.lock();
        let keep: Vec<Grant> = inner
            .grants
            .iter()
            .filter(|g| !g.matches(&grant.program, &grant.sha256, &grant.argv, &grant.profile))
            .cloned()
            .collect();
        if keep.len() == inner.grants.len() {
            return Ok(false);
        }
        self.persist(&keep)?;
        inner.grants = keep;
        Ok(true)
    }

    /// Withdraws approval `id` (the requesting peer is gone); a waiter gets `Cancelled`.
    pub fn cancel(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(s) = inner.slots.get_mut(&id) {
            if s.state.is_none() {
                s.state = Some(Decision::Cancelled);
            }
        }
        self.cond.notify_all();
        drop(inner);
        self.bump();
    }

    /// Blocks until approval `id` is resolved, it times out, or `deadline` passes (the last two
    /// are `TimedOut`, a denial). The approval is gone afterwards.
    pub fn wait(&self, id: u64, deadline: Instant) -> Result<Decision, ApprovalError> {
        let mut inner = self.lock();
        loop {
            let slot = inner
                .slots
                .get(&id)
                .ok_or(ApprovalError::UnknownId { id })?;
            let until = slot.pending.expires.min(deadline);
            let decision = match slot.state {
                Some(d) => Some(d),
                None if Instant::now() >= until => Some(Decision::TimedOut),
                None => None,
            };
            if let Some(d) = decision {
                if let Some(s) = inner.slots.remove(&id) {
                    if d == Decision::Cancelled && Instant::now() < s.pending.expires {
                        // The requester went away (a gateway restarted, say), not the question:
                        // the operator may still answer it for the same request asked again.
                        inner.slots.insert(
                            id,
                            Slot {
                                state: None,
                                orphan: true,
                                ..s
                            },
                        );
                    } else {
                        remove_ask(s.file.as_deref());
                    }
                }
                drop(inner);
                self.bump();
                return Ok(d);
            }
            let left = until.saturating_duration_since(Instant::now());
            inner = self
                .cond
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Remove an approval's file (an error is logged: a leftover file is offered to the operator
/// again after a restart and then expires, nothing worse).
fn remove_ask(file: Option<&Path>) {
    if let Some(f) = file {
        if let Err(e) = std::fs::remove_file(f) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(file = %f.display(), error = %e, "cannot remove a finished approval");
            }
        }
    }
}

/// The pending approvals written before a restart that have not expired yet, oldest first,
/// with their files. A file that cannot be read is logged and left alone.
fn load_asks(dir: &Path) -> Vec<(Pending, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let now = Instant::now();
    let mut out = Vec::new();
    for f in files.into_iter().take(MAX_PENDING) {
        let rec: AskFile = match read_capped(&f, 1 << 20)
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "a pending approval is unreadable; left in place");
                continue;
            }
        };
        if rec.expires_unix <= now_unix {
            remove_ask(Some(&f));
            continue;
        }
        let pending = Pending {
            id: 0,
            identity: rec.identity,
            program: rec.program,
            program_sha256: rec.program_sha256,
            argv: rec.argv,
            profile: rec.profile,
            cwd: rec.cwd,
            created: rec.created,
            expires: now + Duration::from_secs(rec.expires_unix - now_unix),
        };
        out.push((pending, f));
    }
    out
}

/// The digest standing for a request that starts no program (an `open` waiting for approval):
/// SHA-256 over its argv, each word followed by a NUL.
pub fn action_sha256(argv: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for a in argv {
        h.update(a.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_spellings_round_trip_and_nothing_else_parses() {
        let mut listed = Vec::new();
        for r in Resolution::ALL {
            assert_eq!(Resolution::parse(r.as_str()), Some(r));
            assert_eq!(r.as_str().parse::<Resolution>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Resolution>(&json).unwrap(), r);
            listed.push(r.as_str());
        }
        assert_eq!(listed, ["allow-once", "allow-always", "deny"]);
        assert_eq!(Resolution::EXPECTED, "allow-once, allow-always or deny");
        for bad in ["allow", "Deny", " deny", "allow_once", "AllowOnce", ""] {
            assert_eq!(Resolution::parse(bad), None, "{bad:?}");
            assert_eq!(bad.parse::<Resolution>(), Err(UnknownResolution));
            assert!(serde_json::from_str::<Resolution>(&format!("{bad:?}")).is_err());
        }
        assert_eq!(
            UnknownResolution.to_string(),
            "expected allow-once, allow-always or deny"
        );
    }
}
