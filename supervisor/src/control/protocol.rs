//! The control protocol's types: requests, replies and the result of each op, and decoding a
//! request line against the table of ops.

use super::*;

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    ApprovalsList,
    /// `resolution`: `allow-once` | `allow-always` | `deny` ([`Resolution::parse`](carapace_broker::approvals::Resolution::parse)).
    ApprovalsResolve {
        id: u64,
        resolution: String,
    },
    DlqList,
    DlqRelease {
        id: String,
    },
    DlqDrop {
        id: String,
    },
    HeldList,
    /// `always`: the sender reaches the agent from now on, not only this message.
    HeldAdmit {
        id: String,
        #[serde(default)]
        always: bool,
    },
    HeldDrop {
        id: String,
    },
    /// Served by the server itself from [`ControlHandler::audit_log`].
    AuditTail {
        #[serde(default = "default_tail_lines")]
        lines: usize,
        #[serde(default)]
        follow: bool,
    },
    Reload,
    /// The service's metrics in the Prometheus text exposition ([`MetricsText`]).
    Metrics,
    /// The configured `[[jobs]]`, each with its last run and next time.
    JobsList,
    /// Ask the gateway to run a job now: `{"job","run"}` (the run's id in the history).
    JobsRun {
        name: String,
    },
    /// The last `limit` runs (of job `name`, or of every job), oldest first: `{"runs":[..]}`.
    JobsHistory {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
}

pub(super) fn default_tail_lines() -> usize {
    DEFAULT_TAIL_LINES
}

impl Request {
    /// The request's `op`.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ApprovalsList => "approvals_list",
            Request::ApprovalsResolve { .. } => "approvals_resolve",
            Request::DlqList => "dlq_list",
            Request::DlqRelease { .. } => "dlq_release",
            Request::DlqDrop { .. } => "dlq_drop",
            Request::HeldList => "held_list",
            Request::HeldAdmit { .. } => "held_admit",
            Request::HeldDrop { .. } => "held_drop",
            Request::AuditTail { .. } => "audit_tail",
            Request::Reload => "reload",
            Request::Metrics => "metrics",
            Request::JobsList => "jobs_list",
            Request::JobsRun { .. } => "jobs_run",
            Request::JobsHistory { .. } => "jobs_history",
        }
    }
}

/// One reply line. Exactly one of `result`, `error`, `line`, `end` is present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<bool>,
}

impl Reply {
    pub fn result(v: Value) -> Reply {
        Reply {
            ok: true,
            result: Some(v),
            error: None,
            line: None,
            end: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(msg.into()),
            line: None,
            end: None,
        }
    }
    pub fn line(v: Value) -> Reply {
        Reply {
            ok: true,
            result: None,
            error: None,
            line: Some(v),
            end: None,
        }
    }
    pub fn end() -> Reply {
        Reply {
            ok: true,
            result: None,
            error: None,
            line: None,
            end: Some(true),
        }
    }

    /// The reply as one line, `\n` included.
    pub(super) fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Serializing a `Value` cannot fail; keep a reply anyway.
            format!(r#"{{"ok":false,"error":"cannot encode the reply: {e}"}}"#).into_bytes()
        });
        v.push(b'\n');
        v
    }
}

/// Result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub version: String,
    /// RFC 3339 UTC.
    pub started: String,
    pub uptime_secs: u64,
    /// `root` | `rootless`.
    pub mode: String,
    /// What is used: `hybrid v1+v2`, `v2 delegated`, `none (rlimits only)`, ...
    pub cgroups: String,
    /// Who starts the broker's tools: `spawner (pid N)`, `spawners (pids N, M)` (with `; K of
    /// J gone` when some died), or `in-process` (`in-process (the spawner is gone)` / `(the
    /// spawners are gone)` once all died); empty from a supervisor that does not say.
    #[serde(default)]
    pub tools: String,
    /// The configuration's source (a path, or `embedded default`).
    pub config: String,
    pub policy: PolicyStatus,
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    pub children: Vec<ChildStatus>,
    pub pending_approvals: usize,
    pub dead_letters: usize,
    pub audit: AuditStatus,
    /// Each channel of the policy that an adapter serves or the broker queues for.
    #[serde(default)]
    pub channels: Vec<ChannelReport>,
}

/// A channel as the broker sees it: its adapter's last word, the traffic, what waits.
pub use carapace_broker::ops::ChannelStats as ChannelReport;

/// A held inbound message: from a sender the channel does not admit (yet). The body is
/// redacted of known secret values; untrusted text.
pub use carapace_broker::protocol::HeldMessage as HeldInfo;

/// Result of `held_list`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldList {
    pub held: Vec<HeldInfo>,
}

/// Result of `held_admit`: the message's place in the inbound queue, and whether its sender is
/// admitted for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admitted {
    pub id: String,
    pub seq: u64,
    pub always: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub files: Vec<String>,
    /// SHA-256 of the policy in force.
    pub sha256: String,
    /// RFC 3339 UTC: when it was loaded.
    pub loaded: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub path: String,
    /// Seq of the last record.
    pub seq: u64,
    /// Hash of the last record's line.
    pub head: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub name: String,
    /// `gateway` | `channel`.
    pub role: String,
    pub profile: String,
    /// `starting` | `running` | `backoff` | `failed` | `stopping` | `stopped`.
    pub state: String,
    pub pid: Option<i32>,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    /// How it last ended, e.g. `exit=1` or `signal=9 (oom)`.
    pub last_exit: Option<String>,
    pub memory_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub tasks: Option<u64>,
}

/// A pending approval as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    pub id: u64,
    /// `role#id(profile)` of the asking child ([`who_string`]).
    pub who: String,
    pub program: String,
    pub sha256: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub why: String,
    /// RFC 3339 UTC.
    pub created: String,
    pub expires_in_secs: u64,
}

impl PendingApproval {
    /// From the broker's pending approval; `why` is the rule's reason (not kept by the broker).
    pub fn from_pending(p: &Pending, why: impl Into<String>, now: Instant) -> PendingApproval {
        PendingApproval {
            id: p.id,
            who: who_string(&p.identity),
            program: p.program.display().to_string(),
            sha256: p.program_sha256.clone(),
            argv: p.argv.clone(),
            profile: p.profile.clone(),
            why: why.into(),
            created: p.created.clone(),
            expires_in_secs: p.expires.saturating_duration_since(now).as_secs(),
        }
    }
}

/// A persisted allow-always grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub program: String,
    pub argv: Vec<String>,
    pub profile: String,
    pub sha256: String,
    /// RFC 3339 UTC.
    pub granted_at: String,
}

impl From<&Grant> for GrantInfo {
    fn from(g: &Grant) -> GrantInfo {
        GrantInfo {
            program: g.program.display().to_string(),
            argv: g.argv.clone(),
            profile: g.profile.clone(),
            sha256: g.sha256.clone(),
            granted_at: g.granted_at.clone(),
        }
    }
}

/// Result of `approvals_list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalsList {
    pub pending: Vec<PendingApproval>,
    pub always: Vec<GrantInfo>,
}

/// Result of `approvals_resolve`: `decision` is the broker's
/// [`Decision::as_str`](carapace_broker::approvals::Decision::as_str) (`allowed once`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub id: u64,
    pub decision: String,
}

/// A dead letter: the broker's [`Entry`](carapace_broker::dlq::Entry) with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqLetter {
    pub id: String,
    #[serde(flatten)]
    pub entry: carapace_broker::dlq::Entry,
}

/// A file of the queue that could not be read as an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqUnreadable {
    pub file: String,
    pub error: String,
}

/// Result of `dlq_list`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqList {
    pub letters: Vec<DlqLetter>,
    pub unreadable: Vec<DlqUnreadable>,
}

impl From<carapace_broker::dlq::Listing> for DlqList {
    fn from(l: carapace_broker::dlq::Listing) -> DlqList {
        DlqList {
            letters: l
                .letters
                .into_iter()
                .map(|d| DlqLetter {
                    id: d.id,
                    entry: d.entry,
                })
                .collect(),
            unreadable: l
                .unreadable
                .into_iter()
                .map(|u| DlqUnreadable {
                    file: u.file.display().to_string(),
                    error: u.error,
                })
                .collect(),
        }
    }
}

/// Result of `reload`. A rejected reload (invalid configuration or policy) is an error reply
/// whose message says why; the old configuration and policy stay in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub applied: bool,
    /// SHA-256 of the policy in force after the reload.
    pub policy_sha256: String,
    /// What changed, in words.
    pub message: String,
}

/// Result of `metrics`: the exposition, as an HTTP scrape of `[metrics] listen` gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsText {
    /// The OpenMetrics text (`# EOF` last), which Prometheus' text parsers also read.
    pub text: String,
}

/// `role#id(profile)`.
pub fn who_string(w: &Who) -> String {
    format!("{}#{}({})", w.role, w.id, w.profile)
}

/// What the service provides to the control server.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answer one request (never [`Request::AuditTail`], which the server serves). Called on a
    /// blocking thread (`spawn_blocking`): it may block. `Err` is sent as the error reply.
    fn handle(&self, req: Request) -> Result<Value, String>;
    /// The audit log file `audit_tail` reads.
    fn audit_log(&self) -> PathBuf;
}

/// The fields an op takes besides `op` ([`OPS`]), or `None` for an unknown op.
pub(super) fn op_fields(op: &str) -> Option<&'static [&'static str]> {
    OPS.iter().find(|(name, _)| *name == op).map(|(_, f)| *f)
}

/// Decode a request line; `Err` is the message of the error reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| format!("bad request: not JSON: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("bad request: expected a JSON object with an \"op\"".to_string());
    };
    let Some(op) = obj.get("op") else {
        return Err("bad request: no \"op\"".to_string());
    };
    let Some(op) = op.as_str().map(str::to_string) else {
        return Err("bad request: \"op\" is not a string".to_string());
    };
    let Some(fields) = op_fields(&op) else {
        let shown: String = op.chars().take(64).collect();
        let known: Vec<&str> = OPS.iter().map(|(name, _)| *name).collect();
        return Err(format!(
            "unknown op {shown:?} (known: {})",
            known.join(", ")
        ));
    };
    // serde's deny_unknown_fields does not cover the unit variants of a tagged enum.
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "op" && !fields.contains(&k.as_str()))
    {
        let shown: String = k.chars().take(64).collect();
        return Err(format!("bad request: {op}: unknown field {shown:?}"));
    }
    serde_json::from_value(v).map_err(|e| format!("bad request: {op}: {e}"))
}
