//! Where an ask waits for the operator: in memory, answered over the control socket (the service),
//! or as files in the state directory answered by carapace approvals (a one-shot carapace exec).

use super::*;

/// Where `ask` approvals are offered to the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorChannel {
    /// Files in `<state>/pending/`, answered by `carapace approvals` (one-shot `carapace exec`).
    Files,
    /// In memory, listed and answered through the control socket (`carapace run`).
    Control,
}

/// The deciding rules' reasons of the approvals waiting now, by (asking identity, argv): the
/// broker's pending approval does not keep the rule, the operator wants to see why it asks.
pub type ApprovalReasons =
    Arc<std::sync::Mutex<std::collections::HashMap<(u64, Vec<String>), String>>>;

/// The in-memory approvals, with a log line when one starts waiting (the operator sees it in
/// the journal and answers with `carapace approvals allow|deny ID`), and the rule's reason
/// kept for `carapace approvals list`.
#[derive(Debug)]
pub(super) struct LoggedApprover {
    pub(super) approvals: Arc<Approvals>,
    pub(super) reasons: ApprovalReasons,
}

impl Approver for LoggedApprover {
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        tracing::warn!(
            who = %q.who,
            profile = %q.profile,
            "approval requested: {}; see `carapace approvals list`",
            q.argv.join(" ")
        );
        let key = (q.who.id, q.argv.clone());
        // A poisoned map only loses reasons shown to the operator.
        lock(&self.reasons).insert(key.clone(), q.why.clone());
        let asked = self.approvals.clone().ask(q);
        Box::pin(async move {
            struct Forget(ApprovalReasons, (u64, Vec<String>));
            impl Drop for Forget {
                fn drop(&mut self) {
                    lock(&self.0).remove(&self.1);
                }
            }
            let _forget = Forget(self.reasons.clone(), key);
            asked.await
        })
    }

    fn ask_action(
        self: Arc<Self>,
        q: carapace_broker::ops::ActionQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        tracing::warn!(
            who = %q.who,
            profile = %q.who.profile,
            "approval requested: {}; see `carapace approvals list`",
            q.argv.join(" ")
        );
        self.approvals.clone().ask_action(q)
    }

    /// The pending approvals, for a child whose profile may `approve` (the gateway).
    fn pending(&self) -> Vec<Pending> {
        self.approvals.list()
    }

    /// An answer from a child whose profile may `approve` (the broker audits it).
    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        let d = self.approvals.resolve(id, r)?;
        tracing::info!(
            id,
            decision = d.as_str(),
            "approval answered through the broker"
        );
        Ok(d)
    }

    /// The approvals' changes, for the broker's announcements to a channel's operator.
    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.approvals.subscribe())
    }
}

/// A pending approval as written to `<state>/pending/<key>.json` for the operator CLI.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PendingFile {
    /// `<supervisor pid>-<approval id>`: what `carapace approvals allow|deny` takes.
    pub key: String,
    pub supervisor_pid: u32,
    pub id: u64,
    pub who: carapace_broker::audit::Who,
    pub program: PathBuf,
    pub program_sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub why: String,
    pub created: String,
    /// Seconds left when it was written; it is denied when they run out.
    pub timeout_secs: u64,
}

/// The operator's answer, `<state>/pending/<key>.answer`: `allow-once`, `allow-always` or
/// `deny`.
/// The file holds the word and, as `carapace approvals` writes it, a newline.
pub fn parse_answer(text: &str) -> Option<Resolution> {
    Resolution::parse(text.trim())
}

/// Without a control socket (`carapace exec`): `ask` approvals are offered to the operator as
/// files in `<state>/pending/` (0700 directory, 0600 files, root only), and answered by an
/// `.answer` file next to them (written by `carapace approvals allow|deny`), polled every 50 ms.
#[derive(Debug)]
pub struct FileApprover {
    pub approvals: Arc<Approvals>,
    pub pending_dir: PathBuf,
}

/// Set when the waiting request is dropped (its peer went away).
pub(super) struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl FileApprover {
    pub(super) fn decide(
        approvals: &Approvals,
        pending_dir: &Path,
        q: ApprovalQuery,
        cancelled: &AtomicBool,
    ) -> ApprovalAnswer {
        let who = carapace_broker::audit::Who::from(&q.who);
        let spec = PendingSpec {
            identity: who.clone(),
            program: q.program.path().to_path_buf(),
            argv: q.argv.clone(),
            profile: q.profile.clone(),
            cwd: PathBuf::from("/"),
        };
        let pending = match approvals.request_opened(spec, &q.program) {
            Ok(Requested::Allowed(_)) => return ApprovalAnswer::Allow,
            Ok(Requested::Answered(d)) if d.is_allow() => return ApprovalAnswer::Allow,
            Ok(Requested::Answered(d)) => return ApprovalAnswer::Deny(d.as_str().to_string()),
            Ok(Requested::Pending(p)) => p,
            Err(e) => return ApprovalAnswer::Deny(format!("cannot ask: {e}")),
        };
        let pid = std::process::id();
        let key = format!("{pid}-{}", pending.id);
        let file = pending_dir.join(format!("{key}.json"));
        let answer = pending_dir.join(format!("{key}.answer"));
        let record = PendingFile {
            key: key.clone(),
            supervisor_pid: pid,
            id: pending.id,
            who,
            program: pending.program.clone(),
            program_sha256: pending.program_sha256.clone(),
            argv: pending.argv.clone(),
            profile: pending.profile.clone(),
            why: q.why.clone(),
            created: pending.created.clone(),
            timeout_secs: pending
                .expires
                .saturating_duration_since(std::time::Instant::now())
                .as_secs(),
        };
        if let Err(e) = write_private(pending_dir, &file, &record) {
            approvals.cancel(pending.id);
            let _ = approvals.wait(pending.id, std::time::Instant::now());
            return ApprovalAnswer::Deny(format!("cannot offer the approval to the operator: {e}"));
        }
        tracing::warn!(
            "carapace: approval {key} pending: {} (profile {}); answer with `carapace approvals \
             allow {key}` or `deny {key}`",
            pending.argv.join(" "),
            pending.profile
        );
        loop {
            if cancelled.load(Ordering::SeqCst) {
                approvals.cancel(pending.id);
                break;
            }
            if std::time::Instant::now() >= pending.expires {
                break;
            }
            if let Ok(text) = std::fs::read_to_string(&answer) {
                let _ = std::fs::remove_file(&answer);
                match parse_answer(&text) {
                    Some(r) => match approvals.resolve(pending.id, r) {
                        Ok(_) => break,
                        Err(e) => tracing::warn!("approval {key}: {e}"),
                    },
                    None => tracing::warn!("approval {key}: unreadable answer {text:?}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let decision = approvals.wait(pending.id, std::time::Instant::now());
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&answer);
        match decision {
            Ok(d) if d.is_allow() => ApprovalAnswer::Allow,
            Ok(d) => ApprovalAnswer::Deny(d.as_str().to_string()),
            Err(e) => ApprovalAnswer::Deny(e.to_string()),
        }
    }
}

impl Approver for FileApprover {
    fn ask(
        self: Arc<Self>,
        q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        let approvals = self.approvals.clone();
        let dir = self.pending_dir.clone();
        let flag = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(flag.clone());
        Box::pin(async move {
            let _guard = guard;
            let task = tokio::task::spawn_blocking(move || {
                FileApprover::decide(&approvals, &dir, q, &flag)
            });
            task.await
                .unwrap_or_else(|e| ApprovalAnswer::Deny(format!("approval task failed: {e}")))
        })
    }

    fn pending(&self) -> Vec<Pending> {
        self.approvals.list()
    }

    fn resolve(&self, id: u64, r: Resolution) -> Result<Decision, ApprovalError> {
        self.approvals.resolve(id, r)
    }
}

/// Write `value` as JSON to `path` (0600, atomically: temporary file + rename) in `dir`
/// (created 0700).
pub fn write_private<T: serde::Serialize>(
    dir: &Path,
    path: &Path,
    value: &T,
) -> Result<(), BrokerHostError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| BrokerHostError::Io {
        syscall: "encode",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    write_private_bytes(dir, path, &data)
}

/// Write `data` to `path` in `dir` (created 0700): 0600, atomically and durably
/// ([`write_atomic`]).
pub fn write_private_bytes(dir: &Path, path: &Path, data: &[u8]) -> Result<(), BrokerHostError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(BrokerHostError::Io {
                syscall: "mkdir",
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    write_atomic(path, data).map_err(|e| BrokerHostError::Io {
        syscall: e.op,
        path: e.path,
        source: e.source,
    })
}
