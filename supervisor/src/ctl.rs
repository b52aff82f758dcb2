//! The operator's commands: `carapace status | approvals | dlq | audit | reload`, talking to a
//! running supervisor over its control socket ([`crate::control`]), and `carapace token`,
//! which works on the state directory's token store directly (no supervisor needed).
//!
//! `approvals` also still answers the `ask`s of one-shot `carapace exec` runs through the
//! state directory's `pending/` files (see [`crate::broker_host::FileApprover`]).
//!
//! Output is for people; `--json` prints the supervisor's JSON for scripts. Exit status: 0 ok,
//! 1 the supervisor refused or failed (its message on stderr), 2 usage, 3 no supervisor running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use carapace_broker::approvals::Resolution;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::broker_host::{write_private_bytes, PendingFile};
use crate::control::{
    self, Admitted, ApprovalsList, ControlError, DlqLetter, DlqList, HeldList, ReloadReport,
    Request, Resolved, StatusReport,
};
use crate::errors::error_chain;

/// Exit status: done.
pub const EXIT_OK: i32 = 0;
/// Exit status: the supervisor refused or failed (or the answer could not be read).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no supervisor is running.
pub const EXIT_NO_DAEMON: i32 = 3;

fn state_dir_of(arg: Option<&Path>) -> PathBuf {
    arg.map_or_else(crate::paths::default_state_dir, Path::to_path_buf)
}

/// Options of every command that talks to the supervisor.
#[derive(Debug, Clone, Default, Args)]
pub struct CtlOpts {
    /// Control socket of the running supervisor [default: $CARAPACE_CONTROL_SOCKET; else as
    /// root /run/carapace/control.sock; else $XDG_RUNTIME_DIR/carapace/control.sock (a
    /// rootless supervisor's) if it exists, else the system one, /run/carapace/control.sock]
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Print JSON for scripts
    #[arg(long, global = true)]
    pub json: bool,
}

impl CtlOpts {
    fn socket(&self) -> PathBuf {
        pick_socket(
            self.socket.as_deref(),
            std::env::var_os(crate::paths::CONTROL_SOCKET_ENV).is_some(),
            crate::paths::is_root(),
            crate::paths::default_control_socket(),
            |p| p.exists(),
        )
    }
}

/// The system supervisor's control socket (`/run/carapace/control.sock`).
pub const SYSTEM_CONTROL_SOCKET: &str = "/run/carapace/control.sock";

/// The socket to talk to: `--socket`; else the default ([`crate::paths::default_control_socket`],
/// which honours `$CARAPACE_CONTROL_SOCKET`). An unprivileged operator (a member of the control
/// group) whose own rootless supervisor is not running gets the system one instead, so that
/// `carapace status` works for them without `--socket`.
fn pick_socket(
    explicit: Option<&Path>,
    env_set: bool,
    root: bool,
    default: PathBuf,
    exists: impl Fn(&Path) -> bool,
) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if env_set || root || exists(&default) {
        return default;
    }
    let system = PathBuf::from(SYSTEM_CONTROL_SOCKET);
    if exists(&system) {
        system
    } else {
        default
    }
}

/// `carapace status`.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 ok, 1 the supervisor failed, 3 no supervisor is running.\n\n\
                  Examples:\n  carapace status\n  carapace status --json | jq '.children[].state'"
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
}

/// `carapace dlq`.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 ok, 1 the supervisor refused (no such message, ...), 2 usage, \
                  3 no supervisor is running.\n\nExamples:\n  carapace dlq list\n  \
                  carapace dlq release 00001763734807123456789-1234-0\n  carapace dlq drop ID"
)]
pub struct DlqArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Messages held in the dead-letter queue
    List,
    /// Send a held message on after all
    Release {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Delete a held message
    Drop {
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `carapace held`.
#[derive(Debug, Args)]
#[command(
    long_about = "Inbound messages from senders a channel does not admit. A message from anyone \
                  the policy's `senders` of the channel does not list is held: audited (channel \
                  and sender, never the body), never shown to the agent, and listed here. Admit \
                  it (once, or --always: the sender reaches the agent from now on) or drop it.",
    after_help = "Exit status: 0 ok, 1 the supervisor refused (no such message, ...), 2 usage, \
                  3 no supervisor is running.\n\nExamples:\n  carapace held list\n  \
                  carapace held admit ID --always\n  carapace held drop ID"
)]
pub struct HeldArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
    #[command(subcommand)]
    pub command: HeldCommand,
}

#[derive(Debug, Subcommand)]
pub enum HeldCommand {
    /// Messages held for the operator, oldest first
    List,
    /// Let a held message reach the agent (it is answered like any other)
    Admit {
        #[arg(value_name = "ID")]
        id: String,
        /// Admit its sender on that channel for good (kept across restarts)
        #[arg(long)]
        always: bool,
    },
    /// Delete a held message unread
    Drop {
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `carapace reload`.
#[derive(Debug, Args)]
#[command(
    long_about = "Ask the running supervisor to reload its configuration and policy, like \
                  SIGHUP. An invalid new configuration or policy is rejected: the error is \
                  printed and the old one stays in force.",
    after_help = "Exit status: 0 applied, 1 rejected (the old configuration and policy stay in \
                  force), 3 no supervisor is running."
)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
}

#[derive(Debug, Args)]
#[command(
    about = "List and answer the approvals confined children are waiting for",
    long_about = "List and answer the `ask` approvals that confined programs are waiting for, \
                  and the persisted allow-always grants. A numeric ID is an approval of the \
                  running supervisor (`carapace run`), answered over its control socket; a \
                  PID-N key is one of a running `carapace exec`, answered through the state \
                  directory (pending/<KEY>.json). `list` shows both.",
    after_help = "Examples:\n  carapace approvals list\n  carapace approvals allow 7\n  \
                  carapace approvals allow 7 --always\n  carapace approvals deny 4242-3\n\n\
                  Exit status: 0 ok, 1 refused (no such approval, ...), 2 usage, 3 no \
                  supervisor is running (for a numeric ID)."
)]
pub struct ApprovalsArgs {
    /// State directory of `carapace exec` runs [default: /var/lib/carapace as root,
    /// $XDG_STATE_HOME/carapace otherwise]
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub opts: CtlOpts,
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approvals (ID, who, program, argv, profile, why) and allow-always grants
    List,
    /// Allow a pending approval once, or with --always for this exact program content, argv
    /// and profile from now on
    Allow {
        #[arg(value_name = "ID")]
        key: String,
        #[arg(long)]
        always: bool,
    },
    /// Deny a pending approval
    Deny {
        #[arg(value_name = "ID")]
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log (`<state-dir>/audit.log`)
    #[command(
        long_about = "Verify the hash chain of a broker audit log: every record carries the \
                      SHA-256 of the line before it and a sequence number, so an edited, \
                      deleted, reordered or duplicated record, or a torn last line, breaks the \
                      chain. Deleting whole records from the END cannot be seen from the file \
                      alone; compare the head (printed on success) with one saved elsewhere.",
        after_help = "Example:\n  carapace audit verify /var/lib/carapace/audit.log\n\n\
                      Exit status: 0 intact (\"ok: N records ...\"), 1 broken (the first line \
                      found wrong, and how), 2 the file cannot be read."
    )]
    Verify {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show the running supervisor's last audit records, and follow new ones with -f
    #[command(
        long_about = "Show the last audit records of the running supervisor, one per line: \
                      seq, time, who, op, decision, target, outcome (and the rule). With -f, \
                      keep printing records as they are written until interrupted. --json \
                      prints the records as stored.",
        after_help = "Examples:\n  carapace audit tail -n 50\n  carapace audit tail -f\n  \
                      carapace audit tail -f --json | jq 'select(.decision == \"deny\")'\n\n\
                      Exit status: 0 ok, 1 the supervisor failed or went away, 3 no supervisor \
                      is running."
    )]
    Tail {
        /// Number of records to show first (at most 10000)
        #[arg(short = 'n', long, value_name = "N", default_value_t = control::DEFAULT_TAIL_LINES)]
        lines: usize,
        /// Keep printing new records
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        opts: CtlOpts,
    },
}

/// `carapace token`.
#[derive(Debug, Args)]
#[command(
    about = "Create, list and revoke the gateway's client tokens",
    long_about = "Create, list and revoke the bearer tokens clients of the gateway authenticate \
                  with. A token is shown once, when it is created; the state directory keeps \
                  only its SHA-256 (STATE-DIR/tokens.json, mode 0600), which the gateway \
                  cannot read: it asks the broker to check each token it is given. Scopes: \
                  `client` may run tools, send messages, use sessions and the agent; \
                  `operator` may also list and answer approvals. A token created or revoked \
                  counts at once (no reload). Works on the file directly: no supervisor needs \
                  to run.",
    after_help = "Examples:\n  carapace token create --name laptop --scope operator\n  \
                  carapace token list\n  carapace token revoke laptop\n  \
                  carapace token create --name ci --json | jq -r .token\n\n\
                  Exit status: 0 ok, 1 failed (no such token, unreadable store, ...), 2 usage."
)]
pub struct TokenArgs {
    /// State directory holding tokens.json; created 0700 when missing [default:
    /// /var/lib/carapace as root, else $XDG_STATE_HOME/carapace or ~/.local/state/carapace]
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Print JSON for scripts
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (the only time it is shown)
    Create {
        /// A name for it (1 to 64 characters, no control characters)
        #[arg(long, value_name = "NAME", default_value = "token")]
        name: String,
        /// `client` (tools, messages, sessions, the agent) or `operator` (also approvals)
        #[arg(long, value_name = "operator|client", default_value = "client", value_parser = parse_scope)]
        scope: carapace_broker::tokens::Scope,
    },
    /// The tokens: id, name, scope, created (never a token or a hash)
    List,
    /// Remove a token by its id, or by its name when exactly one token has it
    Revoke {
        #[arg(value_name = "ID_OR_NAME")]
        id_or_name: String,
    },
}

fn parse_scope(s: &str) -> Result<carapace_broker::tokens::Scope, String> {
    s.parse()
        .map_err(|_| "expected `operator` or `client`".to_string())
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers
// ---------------------------------------------------------------------------------------------

/// `s` with control characters escaped, so text from a confined program (an argv, a message
/// body) cannot drive the operator's terminal.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`clean`] line by line: the line breaks of a multi-line message (a policy error with its
/// source line and caret) are kept, every other control character is escaped.
pub fn clean_lines(s: &str) -> String {
    s.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

/// `3d04h`, `2h05m`, `4m12s`, `12s`.
pub fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `512 B`, `12.0 KiB`, `3.4 MiB`, `1.2 GiB`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `850ms`, `1.50s`, `2m03s`.
pub fn fmt_cpu(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{:02}s", ms / 1000, (ms % 1000) / 10)
    } else {
        fmt_duration(ms / 1000)
    }
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn short_hash(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// Rows as left-aligned columns separated by two spaces (no trailing spaces).
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `carapace status`, for people.
pub fn format_status(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "carapace {} (pid {}), up {} since {}",
        clean(&s.version),
        s.pid,
        fmt_duration(s.uptime_secs),
        clean(&s.started)
    );
    let _ = writeln!(
        out,
        "mode:          {}; cgroups: {}",
        clean(&s.mode),
        clean(&s.cgroups)
    );
    let _ = writeln!(out, "config:        {}", clean(&s.config));
    let files = if s.policy.files.is_empty() {
        "embedded default".to_string()
    } else {
        s.policy
            .files
            .iter()
            .map(|f| clean(f))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "policy:        {files} (sha256 {}…, loaded {})",
        clean(short_hash(&s.policy.sha256)),
        clean(&s.policy.loaded)
    );
    let last_error = match &s.last_reload_error {
        Some(e) => format!("; last reload FAILED: {}", clean(e)),
        None => String::new(),
    };
    let _ = writeln!(out, "reloads:       {}{last_error}", s.reloads);
    let _ = writeln!(
        out,
        "approvals:     {} pending; dead letters: {}",
        s.pending_approvals, s.dead_letters
    );
    let _ = writeln!(
        out,
        "audit:         {} (seq {}, head {}…)",
        clean(&s.audit.path),
        s.audit.seq,
        clean(short_hash(&s.audit.head))
    );
    out.push('\n');
    if s.children.is_empty() {
        out.push_str("no children\n");
        return out;
    }
    let mut rows = vec![[
        "NAME",
        "ROLE",
        "PROFILE",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "MEMORY",
        "CPU",
        "TASKS",
        "LAST EXIT",
    ]
    .map(str::to_string)
    .to_vec()];
    for c in &s.children {
        rows.push(vec![
            clean(&c.name),
            clean(&c.role),
            clean(&c.profile),
            clean(&c.state),
            opt(c.pid, |p| p.to_string()),
            opt(c.uptime_secs, fmt_duration),
            c.restarts.to_string(),
            opt(c.memory_bytes, fmt_bytes),
            opt(c.cpu_ms, fmt_cpu),
            opt(c.tasks, |t| t.to_string()),
            opt(c.last_exit.as_deref(), clean),
        ]);
    }
    out.push_str(&table(&rows));
    if !s.channels.is_empty() {
        out.push('\n');
        let mut rows = vec![[
            "CHANNEL", "ADAPTER", "LAST IN", "LAST OUT", "QUEUED", "HELD", "OUTBOX", "DEAD",
            "ERROR",
        ]
        .map(str::to_string)
        .to_vec()];
        for c in &s.channels {
            rows.push(vec![
                clean(&c.channel),
                match c.connected {
                    Some(true) => "connected".to_string(),
                    Some(false) => "disconnected".to_string(),
                    None => "-".to_string(),
                },
                opt(c.last_in.as_deref(), clean),
                opt(c.last_out.as_deref(), clean),
                c.queued.to_string(),
                c.held.to_string(),
                c.outbox.to_string(),
                c.dead_lettered.to_string(),
                opt(c.error.as_deref(), clean),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

fn argv_string(argv: &[String]) -> String {
    let parts: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", parts.join(", "))
}

/// The supervisor's approvals, for people.
pub fn format_approvals(l: &ApprovalsList) -> String {
    let mut out = String::new();
    if l.pending.is_empty() {
        out.push_str("no pending approvals\n");
    }
    for p in &l.pending {
        let _ = writeln!(
            out,
            "pending {}  {}  {}  argv={}  profile={}  expires in {}",
            p.id,
            clean(&p.who),
            clean(&p.program),
            argv_string(&p.argv),
            clean(&p.profile),
            fmt_duration(p.expires_in_secs)
        );
        let _ = writeln!(
            out,
            "        sha256={}  asked {}{}",
            clean(&p.sha256),
            clean(&p.created),
            if p.why.is_empty() {
                String::new()
            } else {
                format!("  why: {}", clean(&p.why))
            }
        );
    }
    for g in &l.always {
        let _ = writeln!(
            out,
            "always {}  argv={}  profile={}  sha256={}  granted {}",
            clean(&g.program),
            argv_string(&g.argv),
            clean(&g.profile),
            clean(&g.sha256),
            clean(&g.granted_at)
        );
    }
    out
}

/// A pending approval of a `carapace exec` run (state directory file), for people.
pub fn format_pending_file(p: &PendingFile) -> String {
    format!(
        "pending {}  {}#{}({})  {}  argv={}  profile={}  sha256={}  why: {}  (carapace exec pid {})",
        clean(&p.key),
        clean(&p.who.role),
        p.who.id,
        clean(&p.who.profile),
        clean(&p.program.display().to_string()),
        argv_string(&p.argv),
        clean(&p.profile),
        clean(&p.program_sha256),
        clean(&p.why),
        p.supervisor_pid
    )
}

fn body_preview(body: &str) -> String {
    const MAX: usize = 120;
    let mut shown: String = body.chars().take(MAX).collect();
    if shown.len() < body.len() {
        shown.push('…');
    }
    format!("{:?}", shown)
}

/// The dead-letter queue, for people.
pub fn format_dlq(l: &DlqList) -> String {
    let mut out = String::new();
    if l.letters.is_empty() && l.unreadable.is_empty() {
        out.push_str("no dead letters\n");
    }
    for d in &l.letters {
        let e = &d.entry;
        let _ = writeln!(
            out,
            "{}  {}  {} -> {}  from {}#{}({})  reason: {}",
            clean(&d.id),
            clean(&e.ts),
            clean(&e.channel),
            clean(&e.recipient),
            clean(&e.who.role),
            e.who.id,
            clean(&e.who.profile),
            clean(&e.reason)
        );
        let _ = writeln!(
            out,
            "    body ({} bytes): {}",
            e.body.len(),
            body_preview(&e.body)
        );
    }
    for u in &l.unreadable {
        let _ = writeln!(out, "unreadable {}: {}", clean(&u.file), clean(&u.error));
    }
    out
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

/// One audit record as one line: seq, ts, who, op, decision, target -> outcome, detail, rule.
pub fn format_audit_line(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        let raw = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        return format!("? (not an audit record) {}", clean(&raw));
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .map_or_else(|| "?".to_string(), |s| s.to_string());
    let who = obj.get("who").map_or_else(
        || "?".to_string(),
        |w| {
            format!(
                "{}#{}({})",
                str_field(w, "role"),
                w.get("id")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "?".to_string(), |i| i.to_string()),
                str_field(w, "profile")
            )
        },
    );
    let mut line = format!(
        "#{seq} {} {who} {} {} {}",
        str_field(v, "ts"),
        str_field(v, "op"),
        str_field(v, "decision"),
        str_field(v, "target"),
    );
    let outcome = str_field(v, "outcome");
    if !outcome.is_empty() {
        let _ = write!(line, " -> {outcome}");
    }
    let detail = str_field(v, "detail");
    if !detail.is_empty() && detail != "?" {
        let _ = write!(line, " ({detail})");
    }
    if let Some(rule) = obj.get("rule").filter(|r| !r.is_null()) {
        let why = str_field(rule, "why");
        match rule.get("line").and_then(Value::as_u64) {
            Some(l) => {
                let _ = write!(line, " [rule line {l}: {why}]");
            }
            None => {
                let _ = write!(line, " [{why}]");
            }
        }
    }
    clean(&line)
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Where a command writes: stdout and stderr, or buffers in tests. Write errors are ignored (a
/// reader that went away, `| head`, is no reason to fail or panic).
pub struct Term<'a> {
    pub out: &'a mut dyn std::io::Write,
    pub err: &'a mut dyn std::io::Write,
}

impl std::fmt::Debug for Term<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Term")
    }
}

impl Term<'_> {
    /// `text` as is on stdout, flushed.
    fn out(&mut self, text: &str) -> bool {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .is_ok()
    }

    /// `carapace: <msg>` on stderr.
    fn err(&mut self, msg: &str) {
        let _ = writeln!(self.err, "carapace: {msg}");
    }

    fn json(&mut self, v: &Value) {
        let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        self.out(&format!("{text}\n"));
    }

    /// Print `v` as `T` with `fmt`, or as JSON when `json` or when it does not decode as `T` (a
    /// newer supervisor, say).
    fn print_as<T: serde::de::DeserializeOwned>(
        &mut self,
        v: &Value,
        json: bool,
        fmt: impl FnOnce(&T) -> String,
    ) {
        if json {
            self.json(v);
            return;
        }
        match serde_json::from_value::<T>(v.clone()) {
            Ok(t) => {
                self.out(&fmt(&t));
            }
            Err(e) => {
                self.err(&format!(
                    "unexpected answer from the supervisor ({e}); as sent:"
                ));
                self.json(v);
            }
        }
    }

    /// Print the error for `e` and return its exit status.
    fn fail(&mut self, e: &ControlError) -> i32 {
        match e {
            ControlError::NotRunning { .. } => {
                self.err(&e.to_string());
                EXIT_NO_DAEMON
            }
            ControlError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                self.err(&error_chain(e));
                self.err("only root and members of the control group may use the control socket");
                EXIT_FAILED
            }
            ControlError::Daemon { message } => {
                self.err(&clean_lines(message));
                EXIT_FAILED
            }
            _ => {
                self.err(&error_chain(e));
                EXIT_FAILED
            }
        }
    }
}

/// Run `f` on the process's stdout and stderr.
fn on_terminal(f: impl FnOnce(&mut Term<'_>) -> i32) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    f(&mut Term {
        out: &mut out,
        err: &mut err,
    })
}

/// `carapace status`.
pub fn status(a: StatusArgs) -> i32 {
    on_terminal(|t| status_to(&a, t))
}

pub fn status_to(a: &StatusArgs, t: &mut Term<'_>) -> i32 {
    match control::call(&a.opts.socket(), &Request::Status) {
        Ok(v) => {
            t.print_as::<StatusReport>(&v, a.opts.json, format_status);
            EXIT_OK
        }
        Err(e) => t.fail(&e),
    }
}

/// `carapace dlq ...`.
pub fn dlq(a: DlqArgs) -> i32 {
    on_terminal(|t| dlq_to(&a, t))
}

pub fn dlq_to(a: &DlqArgs, t: &mut Term<'_>) -> i32 {
    let req = match &a.command {
        DlqCommand::List => Request::DlqList,
        DlqCommand::Release { id } | DlqCommand::Drop { id }
            if !carapace_broker::dlq::valid_id(id) =>
        {
            t.err(&format!(
                "{:?} is not a dead-letter id (letters, digits, '-', '_'; see `carapace dlq list`)",
                clean(id)
            ));
            return EXIT_USAGE;
        }
        DlqCommand::Release { id } => Request::DlqRelease { id: id.clone() },
        DlqCommand::Drop { id } => Request::DlqDrop { id: id.clone() },
    };
    let v = match control::call(&a.opts.socket(), &req) {
        Ok(v) => v,
        Err(e) => return t.fail(&e),
    };
    let json = a.opts.json;
    match req {
        Request::DlqRelease { id } => t.print_as::<DlqLetter>(&v, json, |d| {
            format!(
                "released {}: {} -> {} ({} bytes)\n",
                clean(&id),
                clean(&d.entry.channel),
                clean(&d.entry.recipient),
                d.entry.body.len()
            )
        }),
        Request::DlqDrop { id } if !json => {
            t.out(&format!("dropped {}\n", clean(&id)));
        }
        Request::DlqDrop { .. } => t.json(&v),
        _ => t.print_as::<DlqList>(&v, json, format_dlq),
    }
    EXIT_OK
}

/// Held messages, for people.
pub fn format_held(l: &HeldList) -> String {
    let mut out = String::new();
    if l.held.is_empty() {
        out.push_str("no held messages\n");
    }
    for h in &l.held {
        let _ = writeln!(
            out,
            "{}  {}  {}  from {} (conversation {})",
            clean(&h.id),
            clean(&h.ts),
            clean(&h.channel),
            clean(&h.sender),
            clean(&h.conversation)
        );
        let _ = writeln!(
            out,
            "    body ({} bytes): {}",
            h.body.len(),
            body_preview(&h.body)
        );
    }
    out
}

/// `carapace held ...`.
pub fn held(a: HeldArgs) -> i32 {
    on_terminal(|t| held_to(&a, t))
}

pub fn held_to(a: &HeldArgs, t: &mut Term<'_>) -> i32 {
    let req = match &a.command {
        HeldCommand::List => Request::HeldList,
        HeldCommand::Admit { id, .. } | HeldCommand::Drop { id }
            if !carapace_broker::dlq::valid_id(id) =>
        {
            t.err(&format!(
                "{:?} is not a held message id (letters, digits, '-', '_'; see `carapace held list`)",
                clean(id)
            ));
            return EXIT_USAGE;
        }
        HeldCommand::Admit { id, always } => Request::HeldAdmit {
            id: id.clone(),
            always: *always,
        },
        HeldCommand::Drop { id } => Request::HeldDrop { id: id.clone() },
    };
    let v = match control::call(&a.opts.socket(), &req) {
        Ok(v) => v,
        Err(e) => return t.fail(&e),
    };
    let json = a.opts.json;
    match req {
        Request::HeldAdmit { .. } => t.print_as::<Admitted>(&v, json, |d| {
            format!(
                "admitted {}: queued for the agent as #{}{}\n",
                clean(&d.id),
                d.seq,
                if d.always {
                    "; its sender is admitted for good"
                } else {
                    ""
                }
            )
        }),
        Request::HeldDrop { id } if !json => {
            t.out(&format!("dropped {}\n", clean(&id)));
        }
        Request::HeldDrop { .. } => t.json(&v),
        _ => t.print_as::<HeldList>(&v, json, format_held),
    }
    EXIT_OK
}

/// `carapace reload`.
pub fn reload(a: ReloadArgs) -> i32 {
    on_terminal(|t| reload_to(&a, t))
}

pub fn reload_to(a: &ReloadArgs, t: &mut Term<'_>) -> i32 {
    match control::call(&a.opts.socket(), &Request::Reload) {
        Ok(v) => {
            let applied = serde_json::from_value::<ReloadReport>(v.clone())
                .map(|r| r.applied)
                .unwrap_or(true);
            if a.opts.json {
                t.json(&v);
            } else {
                t.out(&format_reload(&v));
            }
            if applied {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(ControlError::Daemon { message }) => {
            t.err(&format!("reload rejected: {}", clean_lines(&message)));
            t.err("the old configuration and policy stay in force");
            EXIT_FAILED
        }
        Err(e) => t.fail(&e),
    }
}

/// The answer to `reload`, for people.
pub fn format_reload(v: &Value) -> String {
    match serde_json::from_value::<ReloadReport>(v.clone()) {
        Ok(r) if r.applied => format!(
            "reloaded: {} (policy sha256 {}…)\n",
            clean(&r.message),
            clean(short_hash(&r.policy_sha256))
        ),
        Ok(r) => format!(
            "not applied: {}; the old configuration and policy stay in force\n",
            clean(&r.message)
        ),
        Err(_) => format!("reloaded: {}\n", clean(&v.to_string())),
    }
}

/// `carapace audit ...`.
pub fn audit(a: AuditCommand) -> i32 {
    on_terminal(|t| audit_to(&a, t))
}

pub fn audit_to(a: &AuditCommand, t: &mut Term<'_>) -> i32 {
    match a {
        AuditCommand::Verify { file } => audit_verify_to(file, t),
        AuditCommand::Tail {
            lines,
            follow,
            opts,
        } => audit_tail_to(opts, *lines, *follow, t),
    }
}

fn audit_tail_to(opts: &CtlOpts, lines: usize, follow: bool, t: &mut Term<'_>) -> i32 {
    let mut n = 0usize;
    let req = Request::AuditTail { lines, follow };
    let r = control::stream_raw(&opts.socket(), &req, |v, raw| {
        n += 1;
        // --json: the record as stored (byte for byte when the supervisor sent it so).
        let mut text = match (opts.json, raw) {
            (true, Some(raw)) => raw.to_string(),
            (true, None) => v.to_string(),
            (false, _) => format_audit_line(&v),
        };
        text.push('\n');
        // Stop quietly when the reader went away (`| head`).
        t.out(&text)
    });
    match r {
        Ok(()) => {
            if n == 0 && !opts.json {
                t.err("no audit records yet");
            }
            EXIT_OK
        }
        Err(e) => t.fail(&e),
    }
}

/// What an approval argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalRef {
    /// An approval of the running supervisor.
    Daemon(u64),
    /// `PID-N`: an approval of a `carapace exec` run (state directory file).
    ExecKey(String),
}

/// A numeric ID goes to the supervisor; `PID-N` to the state directory; anything else is a
/// usage error (its message).
pub fn parse_approval_ref(key: &str) -> Result<ApprovalRef, String> {
    if !key.is_empty() && key.len() <= 20 && key.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(id) = key.parse() {
            return Ok(ApprovalRef::Daemon(id));
        }
    }
    let exec_key = key.split_once('-').is_some_and(|(p, n)| {
        !p.is_empty()
            && !n.is_empty()
            && p.len() <= 20
            && n.len() <= 20
            && p.bytes().all(|b| b.is_ascii_digit())
            && n.bytes().all(|b| b.is_ascii_digit())
    });
    if exec_key {
        return Ok(ApprovalRef::ExecKey(key.to_string()));
    }
    Err(format!(
        "{:?} is not an approval ID (a number for the running supervisor, or PID-N for a \
         `carapace exec` run; see `carapace approvals list`)",
        clean(key)
    ))
}

/// `carapace approvals ...`.
pub fn approvals(a: ApprovalsArgs) -> i32 {
    on_terminal(|t| approvals_to(&a, t))
}

pub fn approvals_to(a: &ApprovalsArgs, t: &mut Term<'_>) -> i32 {
    let state = state_dir_of(a.state_dir.as_deref());
    let socket = a.opts.socket();
    let (key, resolution) = match &a.command {
        ApprovalsCommand::List => return approvals_list(&socket, &state, a.opts.json, t),
        ApprovalsCommand::Allow { key, always } => (
            key,
            if *always {
                Resolution::AllowAlways
            } else {
                Resolution::AllowOnce
            },
        ),
        ApprovalsCommand::Deny { key } => (key, Resolution::Deny),
    };
    match parse_approval_ref(key) {
        Err(msg) => {
            t.err(&msg);
            EXIT_USAGE
        }
        Ok(ApprovalRef::ExecKey(k)) => {
            answer_approval_to(&state.join("pending"), &k, resolution.as_str(), t)
        }
        Ok(ApprovalRef::Daemon(id)) => {
            let req = Request::ApprovalsResolve {
                id,
                resolution: resolution.as_str().to_string(),
            };
            match control::call(&socket, &req) {
                Ok(v) => {
                    t.print_as::<Resolved>(&v, a.opts.json, |r| {
                        format!("approval {}: {}\n", r.id, clean(&r.decision))
                    });
                    EXIT_OK
                }
                Err(e) => t.fail(&e),
            }
        }
    }
}

/// Pending approvals of `carapace exec` runs in `<state>/pending`, and unreadable files.
fn exec_pending(state: &Path) -> (Vec<PendingFile>, Vec<PathBuf>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join("pending"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in files {
        match std::fs::read(&f)
            .ok()
            .and_then(|b| serde_json::from_slice::<PendingFile>(&b).ok())
        {
            Some(p) => ok.push(p),
            None => bad.push(f),
        }
    }
    (ok, bad)
}

/// `approvals list`: the supervisor's pending approvals and grants (without a supervisor, the
/// grants of the state directory) and the pending approvals of `carapace exec` runs. No
/// supervisor is not an error here: the state directory is still listed.
fn approvals_list(socket: &Path, state: &Path, json: bool, t: &mut Term<'_>) -> i32 {
    let daemon = control::call(socket, &Request::ApprovalsList);
    let (exec, bad) = exec_pending(state);
    for f in &bad {
        t.err(&format!("{}: not a pending approval", f.display()));
    }
    let mut code = EXIT_OK;
    let daemon_value = match daemon {
        Ok(v) => Some(v),
        Err(ControlError::NotRunning { .. }) => {
            t.err(&format!(
                "no supervisor is running (no control socket at {}); showing the approvals of \
                 `carapace exec` runs only",
                socket.display()
            ));
            None
        }
        Err(e) => {
            code = t.fail(&e);
            None
        }
    };
    // Without a supervisor, the grants are read from the state directory.
    let file_grants: Vec<control::GrantInfo> = if daemon_value.is_none() && state.is_dir() {
        match carapace_broker::approvals::Approvals::open(state, std::time::Duration::ZERO) {
            Ok(ap) => ap.grants().iter().map(control::GrantInfo::from).collect(),
            Err(e) => {
                t.err(&error_chain(&e));
                code = EXIT_FAILED;
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    if json {
        let exec_json: Vec<Value> = exec
            .iter()
            .filter_map(|p| serde_json::to_value(p).ok())
            .collect();
        let mut doc = serde_json::json!({ "exec_pending": exec_json });
        match &daemon_value {
            Some(v) => {
                doc["pending"] = v.get("pending").cloned().unwrap_or(Value::Array(vec![]));
                doc["always"] = v.get("always").cloned().unwrap_or(Value::Array(vec![]));
            }
            None => {
                doc["pending"] = Value::Array(vec![]);
                doc["always"] = serde_json::to_value(&file_grants).unwrap_or_default();
            }
        }
        t.json(&doc);
        return code;
    }
    let list = match &daemon_value {
        Some(v) => match serde_json::from_value::<ApprovalsList>(v.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                t.err(&format!(
                    "unexpected answer from the supervisor ({e}); as sent:"
                ));
                t.json(v);
                None
            }
        },
        None => Some(ApprovalsList {
            pending: Vec::new(),
            always: file_grants,
        }),
    };
    let mut text = String::new();
    if let Some(l) = list {
        let s = format_approvals(&l);
        if l.pending.is_empty() && !exec.is_empty() {
            // The pending ones are the exec runs' below.
            text.push_str(s.trim_start_matches("no pending approvals\n"));
        } else {
            text.push_str(&s);
        }
    }
    for p in &exec {
        text.push_str(&format_pending_file(p));
        text.push('\n');
    }
    t.out(&text);
    code
}

/// Write the answer for pending approval `key` of a `carapace exec` run; it picks it up.
pub fn answer_approval(pending_dir: &Path, key: &str, answer: &str) -> i32 {
    on_terminal(|t| answer_approval_to(pending_dir, key, answer, t))
}

fn answer_approval_to(pending_dir: &Path, key: &str, answer: &str, t: &mut Term<'_>) -> i32 {
    let valid =
        !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    if !valid {
        t.err(&format!(
            "{:?} is not an approval key (PID-N, see `carapace approvals list`)",
            clean(key)
        ));
        return EXIT_USAGE;
    }
    if !pending_dir.join(format!("{key}.json")).is_file() {
        t.err(&format!(
            "no pending approval {key} (see `carapace approvals list`)"
        ));
        return EXIT_FAILED;
    }
    let path = pending_dir.join(format!("{key}.answer"));
    match write_private_bytes(pending_dir, &path, format!("{answer}\n").as_bytes()) {
        Ok(()) => {
            t.out(&format!("{answer}: {key}\n"));
            EXIT_OK
        }
        Err(e) => {
            t.err(&e.to_string());
            EXIT_FAILED
        }
    }
}

/// Tokens as a table: ID, NAME, SCOPE, CREATED.
pub fn format_tokens(tokens: &[carapace_broker::tokens::TokenInfo]) -> String {
    if tokens.is_empty() {
        return "no tokens (make one with `carapace token create`)\n".to_string();
    }
    let names: Vec<String> = tokens.iter().map(|t| clean(&t.name)).collect();
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut s = format!("{:<8}  {:<w$}  {:<8}  CREATED\n", "ID", "NAME", "SCOPE");
    for (t, name) in tokens.iter().zip(&names) {
        let _ = writeln!(
            s,
            "{:<8}  {:<w$}  {:<8}  {}",
            clean(&t.id),
            name,
            t.scope.as_str(),
            clean(&t.created)
        );
    }
    s
}

/// `carapace token ...`.
pub fn token(a: TokenArgs) -> i32 {
    on_terminal(|t| token_to(&a, t))
}

pub fn token_to(a: &TokenArgs, t: &mut Term<'_>) -> i32 {
    use carapace_broker::tokens::{TokenError, TokenStore};
    let state = state_dir_of(a.state_dir.as_deref());
    let store = TokenStore::in_state_dir(&state);
    let fail = |t: &mut Term<'_>, e: &TokenError| {
        t.err(&clean_lines(&error_chain(e)));
        match e {
            TokenError::BadName { .. } | TokenError::BadScope { .. } => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    };
    match &a.command {
        TokenCommand::Create { name, scope } => match store.create(name, *scope) {
            Ok((info, token)) => {
                if a.json {
                    t.json(&serde_json::json!({
                        "id": info.id,
                        "name": info.name,
                        "scope": info.scope,
                        "created": info.created,
                        "token": token,
                    }));
                } else {
                    t.out(&format!(
                        "created token {} \"{}\" (scope {}) in {}\n\n    {token}\n\n\
                         This is the only time the token is shown: it will not be shown again \
                         (only its hash is kept).\nClients send it in the header \
                         `Authorization: Bearer <the token>`.\n",
                        info.id,
                        clean(&info.name),
                        info.scope,
                        store.path().display(),
                    ));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
        TokenCommand::List => match store.list() {
            Ok(tokens) => {
                if a.json {
                    t.json(&serde_json::to_value(&tokens).unwrap_or_default());
                } else {
                    t.out(&format_tokens(&tokens));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
        TokenCommand::Revoke { id_or_name } => match store.revoke(id_or_name) {
            Ok(info) => {
                if a.json {
                    t.json(&serde_json::to_value(&info).unwrap_or_default());
                } else {
                    t.out(&format!(
                        "revoked token {} \"{}\" (scope {})\n",
                        info.id,
                        clean(&info.name),
                        info.scope
                    ));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
    }
}

/// `carapace audit verify FILE`: 0 intact, 1 broken, 2 unreadable.
pub fn audit_verify(file: &Path) -> i32 {
    on_terminal(|t| audit_verify_to(file, t))
}

fn audit_verify_to(file: &Path, t: &mut Term<'_>) -> i32 {
    match carapace_broker::audit::verify(file) {
        Ok(r) if r.is_ok() => {
            t.out(&format!("{r}\n"));
            0
        }
        Ok(r) => {
            t.out(&format!("{}: {r}\n", file.display()));
            1
        }
        Err(e) => {
            t.err(&error_chain(&e));
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        AuditStatus, ChildStatus, ControlHandler, ControlServer, DlqUnreadable, GrantInfo,
        PendingApproval, PolicyStatus,
    };
    use std::sync::Arc;
    use std::time::Duration;

    fn who() -> carapace_broker::audit::Who {
        carapace_broker::audit::Who {
            id: 3,
            role: "tool".to_string(),
            profile: "dev".to_string(),
        }
    }

    fn status_report() -> StatusReport {
        StatusReport {
            pid: 4242,
            version: "0.1.0".to_string(),
            started: "2026-11-21T14:00:00.000000Z".to_string(),
            uptime_secs: 3723,
            mode: "root".to_string(),
            cgroups: "hybrid v1+v2".to_string(),
            config: "/etc/carapace/carapace.toml".to_string(),
            policy: PolicyStatus {
                files: vec!["/etc/carapace/policy.toml".to_string()],
                sha256: "ab".repeat(32),
                loaded: "2026-11-21T14:00:00.000000Z".to_string(),
            },
            reloads: 2,
            last_reload_error: None,
            children: vec![
                ChildStatus {
                    name: "gateway".to_string(),
                    role: "gateway".to_string(),
                    profile: "gateway".to_string(),
                    state: "running".to_string(),
                    pid: Some(777),
                    uptime_secs: Some(65),
                    restarts: 1,
                    last_exit: Some("signal=9".to_string()),
                    memory_bytes: Some(12 << 20),
                    cpu_ms: Some(1500),
                    tasks: Some(3),
                },
                ChildStatus {
                    name: "slack".to_string(),
                    role: "channel".to_string(),
                    profile: "channel".to_string(),
                    state: "backoff".to_string(),
                    pid: None,
                    uptime_secs: None,
                    restarts: 12,
                    last_exit: Some("exit=1".to_string()),
                    memory_bytes: None,
                    cpu_ms: None,
                    tasks: None,
                },
            ],
            pending_approvals: 1,
            dead_letters: 0,
            audit: AuditStatus {
                path: "/var/lib/carapace/audit.log".to_string(),
                seq: 17,
                head: "cd".repeat(32),
            },
            channels: vec![crate::control::ChannelReport {
                channel: "slack".to_string(),
                connected: Some(false),
                error: Some("connect: refused".to_string()),
                last_in: Some("2026-11-21T14:01:00.000000Z".to_string()),
                last_out: None,
                queued: 2,
                held: 1,
                outbox: 3,
                dead_lettered: 0,
            }],
        }
    }

    #[test]
    fn multi_line_daemon_messages_keep_their_lines_only() {
        let m = "policy.toml:3:1: error: x\n  |\n3 | [a\n  | ^\x1b[31m";
        let c = clean_lines(m);
        assert_eq!(c.lines().count(), 4);
        assert!(!c.contains('\x1b'), "{c}");
        assert!(c.ends_with("^\\u{1b}[31m"), "{c}");
    }

    #[test]
    fn units() {
        assert_eq!(fmt_duration(0), "0s");
        assert_eq!(fmt_duration(59), "59s");
        assert_eq!(fmt_duration(60), "1m00s");
        assert_eq!(fmt_duration(3723), "1h02m");
        assert_eq!(fmt_duration(90_061), "1d01h");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(12 << 20), "12.0 MiB");
        assert_eq!(fmt_bytes(3 << 30), "3.0 GiB");
        assert_eq!(fmt_cpu(850), "850ms");
        assert_eq!(fmt_cpu(1500), "1.50s");
        assert_eq!(fmt_cpu(123_000), "2m03s");
        assert_eq!(clean("a\x1b[31mb\nc"), "a\\u{1b}[31mb\\nc");
        assert_eq!(clean("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn status_output() {
        let s = status_report();
        let out = format_status(&s);
        let want = "\
carapace 0.1.0 (pid 4242), up 1h02m since 2026-11-21T14:00:00.000000Z
mode:          root; cgroups: hybrid v1+v2
config:        /etc/carapace/carapace.toml
policy:        /etc/carapace/policy.toml (sha256 abababababababab…, loaded 2026-11-21T14:00:00.000000Z)
reloads:       2
approvals:     1 pending; dead letters: 0
audit:         /var/lib/carapace/audit.log (seq 17, head cdcdcdcdcdcdcdcd…)

NAME     ROLE     PROFILE  STATE    PID  UPTIME  RESTARTS  MEMORY    CPU    TASKS  LAST EXIT
gateway  gateway  gateway  running  777  1m05s   1         12.0 MiB  1.50s  3      signal=9
slack    channel  channel  backoff  -    -       12        -         -      -      exit=1

CHANNEL  ADAPTER       LAST IN                      LAST OUT  QUEUED  HELD  OUTBOX  DEAD  ERROR
slack    disconnected  2026-11-21T14:01:00.000000Z  -         2       1     3       0     connect: refused
";
        assert_eq!(out, want, "\n{out}");
        // A failed reload, no children, no policy files, hostile names.
        let mut s = status_report();
        s.last_reload_error = Some("policy.toml:3:1: unknown key".to_string());
        s.policy.files.clear();
        s.children.clear();
        let out = format_status(&s);
        assert!(
            out.contains("reloads:       2; last reload FAILED: policy.toml:3:1: unknown key\n")
        );
        assert!(out.contains("policy:        embedded default (sha256"));
        assert!(out.ends_with("\nno children\n"), "{out}");
        let mut s = status_report();
        s.children[0].name = "gw\x1b]0;pwned\x07".to_string();
        assert!(!format_status(&s).contains('\x1b'));
    }

    #[test]
    fn approvals_output() {
        let l = ApprovalsList {
            pending: vec![PendingApproval {
                id: 7,
                who: "tool#3(dev)".to_string(),
                program: "/usr/bin/git".to_string(),
                sha256: "ef".repeat(32),
                argv: vec!["git".to_string(), "push".to_string(), "a\nb".to_string()],
                profile: "dev".to_string(),
                why: "pushing needs a human".to_string(),
                created: "2026-11-21T14:01:00.000000Z".to_string(),
                expires_in_secs: 95,
            }],
            always: vec![GrantInfo {
                program: "/usr/bin/make".to_string(),
                argv: vec!["make".to_string()],
                profile: "dev".to_string(),
                sha256: "01".repeat(32),
                granted_at: "2026-11-20T10:00:00.000000Z".to_string(),
            }],
        };
        let out = format_approvals(&l);
        let want = format!(
            "pending 7  tool#3(dev)  /usr/bin/git  argv=[\"git\", \"push\", \"a\\nb\"]  \
             profile=dev  expires in 1m35s\n        sha256={}  asked \
             2026-11-21T14:01:00.000000Z  why: pushing needs a human\nalways /usr/bin/make  \
             argv=[\"make\"]  profile=dev  sha256={}  granted 2026-11-20T10:00:00.000000Z\n",
            "ef".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(out, want, "\n{out}");
        assert_eq!(
            format_approvals(&ApprovalsList::default()),
            "no pending approvals\n"
        );
        let pf = PendingFile {
            key: "4242-1".to_string(),
            supervisor_pid: 4242,
            id: 1,
            who: who(),
            program: PathBuf::from("/usr/bin/curl"),
            program_sha256: "aa".repeat(32),
            argv: vec!["curl".to_string()],
            profile: "dev".to_string(),
            why: "network".to_string(),
            created: "2026-11-21T14:01:00.000000Z".to_string(),
            timeout_secs: 120,
        };
        let line = format_pending_file(&pf);
        assert!(line.starts_with("pending 4242-1  tool#3(dev)  /usr/bin/curl  argv=[\"curl\"]"));
        assert!(
            line.ends_with("why: network  (carapace exec pid 4242)"),
            "{line}"
        );
    }

    #[test]
    fn dlq_output() {
        let l = DlqList {
            letters: vec![DlqLetter {
                id: "00001-42-0".to_string(),
                entry: carapace_broker::dlq::Entry {
                    channel: "slack".to_string(),
                    recipient: "#ops".to_string(),
                    body: "hello\nworld \x1b[2J".to_string(),
                    reason: "recipient not allowlisted".to_string(),
                    who: who(),
                    ts: "2026-11-21T14:02:00.000000Z".to_string(),
                },
            }],
            unreadable: vec![DlqUnreadable {
                file: "/var/lib/carapace/dlq/x.json".to_string(),
                error: "not JSON".to_string(),
            }],
        };
        let out = format_dlq(&l);
        let want = "\
00001-42-0  2026-11-21T14:02:00.000000Z  slack -> #ops  from tool#3(dev)  reason: recipient not allowlisted
    body (16 bytes): \"hello\\nworld \\u{1b}[2J\"
unreadable /var/lib/carapace/dlq/x.json: not JSON
";
        assert_eq!(out, want, "\n{out}");
        assert_eq!(format_dlq(&DlqList::default()), "no dead letters\n");
        // Long bodies are cut.
        let mut l2 = l.clone();
        l2.letters[0].entry.body = "x".repeat(1000);
        let out = format_dlq(&l2);
        assert!(out.contains("body (1000 bytes): \"xxx"));
        assert!(out.contains("x…\""));
        assert!(out.len() < 400);
    }

    #[test]
    fn audit_lines() {
        let v: Value = serde_json::from_str(
            r#"{"seq":7,"ts":"2026-11-21T13:20:07.123456Z","prev":"00","who":{"id":3,"role":"tool","profile":"dev"},"op":"connect","target":"api.example.com:443","rule":{"line":12,"why":"model API"},"decision":"allow","outcome":"connected","detail":""}"#,
        )
        .unwrap();
        assert_eq!(
            format_audit_line(&v),
            "#7 2026-11-21T13:20:07.123456Z tool#3(dev) connect allow api.example.com:443 -> \
             connected [rule line 12: model API]"
        );
        let v: Value = serde_json::from_str(
            r#"{"seq":8,"ts":"t","who":{"id":0,"role":"operator","profile":""},"op":"approval","target":"7","rule":null,"decision":"deny","outcome":"denied","detail":"by uid 0\u001b"}"#,
        )
        .unwrap();
        assert_eq!(
            format_audit_line(&v),
            "#8 t operator#0() approval deny 7 -> denied (by uid 0\\u{1b})"
        );
        let v: Value = serde_json::from_str(r#"{"rule":{"why":"default"}}"#).unwrap();
        assert_eq!(format_audit_line(&v), "#? ? ? ? ? ? -> ? [default]");
        assert_eq!(
            format_audit_line(&Value::String("torn {\"seq".to_string())),
            "? (not an audit record) torn {\"seq"
        );
    }

    #[test]
    fn reload_output() {
        let ok = serde_json::json!({"applied": true, "policy_sha256": "ab".repeat(32), "message": "policy changed"});
        assert_eq!(
            format_reload(&ok),
            "reloaded: policy changed (policy sha256 abababababababab…)\n"
        );
        let no =
            serde_json::json!({"applied": false, "policy_sha256": "", "message": "nothing to do"});
        assert!(format_reload(&no).starts_with("not applied: nothing to do; the old"));
    }

    #[test]
    fn socket_choice() {
        let user = PathBuf::from("/run/user/1000/carapace/control.sock");
        let system = PathBuf::from(SYSTEM_CONTROL_SOCKET);
        let none = |_: &Path| false;
        let all = |_: &Path| true;
        let only_system = |p: &Path| p == Path::new(SYSTEM_CONTROL_SOCKET);
        let x = Path::new("/x.sock");
        assert_eq!(pick_socket(Some(x), true, true, user.clone(), all), x);
        // The default when it exists, when set by the environment, or as root.
        assert_eq!(pick_socket(None, false, false, user.clone(), all), user);
        assert_eq!(
            pick_socket(None, true, false, user.clone(), only_system),
            user
        );
        assert_eq!(
            pick_socket(None, false, true, system.clone(), only_system),
            system
        );
        // Unprivileged, no rootless supervisor: the system one if there is one.
        assert_eq!(
            pick_socket(None, false, false, user.clone(), only_system),
            system
        );
        assert_eq!(pick_socket(None, false, false, user.clone(), none), user);
    }

    #[test]
    fn approval_refs() {
        assert_eq!(parse_approval_ref("7"), Ok(ApprovalRef::Daemon(7)));
        assert_eq!(
            parse_approval_ref("4242-3"),
            Ok(ApprovalRef::ExecKey("4242-3".to_string()))
        );
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "../x",
            "abc",
            "1-2-3",
            "7 ",
            "99999999999999999999999",
        ] {
            assert!(parse_approval_ref(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn command_line() {
        use crate::cli::{Cli, Command};
        use clap::Parser as _;
        let p = |args: &[&str]| Cli::try_parse_from(args);
        let Command::Status(a) = p(&["carapace", "status", "--json", "--socket", "/s"])
            .unwrap()
            .command
        else {
            panic!("not status")
        };
        assert!(a.opts.json);
        assert_eq!(a.opts.socket, Some(PathBuf::from("/s")));
        let Command::Approvals(a) = p(&[
            "carapace",
            "approvals",
            "--socket",
            "/s",
            "allow",
            "5",
            "--always",
            "--json",
        ])
        .unwrap()
        .command
        else {
            panic!("not approvals")
        };
        assert!(a.opts.json);
        assert_eq!(a.opts.socket(), PathBuf::from("/s"));
        assert!(
            matches!(a.command, ApprovalsCommand::Allow { ref key, always: true } if key == "5")
        );
        let Command::Audit(AuditCommand::Tail {
            lines,
            follow,
            opts,
        }) = p(&["carapace", "audit", "tail", "-n", "50", "-f", "--json"])
            .unwrap()
            .command
        else {
            panic!("not audit tail")
        };
        assert_eq!((lines, follow, opts.json), (50, true, true));
        let Command::Audit(AuditCommand::Tail { lines, follow, .. }) =
            p(&["carapace", "audit", "tail"]).unwrap().command
        else {
            panic!("not audit tail")
        };
        assert_eq!((lines, follow), (control::DEFAULT_TAIL_LINES, false));
        let Command::Dlq(a) = p(&["carapace", "dlq", "release", "x-1", "--socket", "/s"])
            .unwrap()
            .command
        else {
            panic!("not dlq")
        };
        assert!(matches!(a.command, DlqCommand::Release { ref id } if id == "x-1"));
        assert!(matches!(
            p(&["carapace", "reload", "--json"]).unwrap().command,
            Command::Reload(ReloadArgs {
                opts: CtlOpts { json: true, .. }
            })
        ));
        assert!(p(&["carapace", "dlq", "drop"]).is_err());
        assert!(p(&["carapace", "audit", "tail", "-n", "x"]).is_err());
    }

    #[test]
    fn token_command_line_and_output() {
        use crate::cli::{Cli, Command};
        use carapace_broker::tokens::{Scope, TokenInfo, TokenStore};
        use clap::Parser as _;
        let p = |args: &[&str]| Cli::try_parse_from(args);
        let Command::Token(a) = p(&["carapace", "token", "create", "--state-dir", "/s"])
            .unwrap()
            .command
        else {
            panic!("not token")
        };
        assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
        assert!(!a.json);
        assert!(matches!(
            a.command,
            TokenCommand::Create { ref name, scope: Scope::Client } if name == "token"
        ));
        let Command::Token(a) = p(&[
            "carapace", "token", "create", "--name", "ci", "--scope", "operator", "--json",
        ])
        .unwrap()
        .command
        else {
            panic!("not token")
        };
        assert!(a.json);
        assert!(matches!(
            a.command,
            TokenCommand::Create { ref name, scope: Scope::Operator } if name == "ci"
        ));
        assert!(p(&["carapace", "token", "create", "--scope", "root"]).is_err());
        assert!(p(&["carapace", "token", "revoke"]).is_err());
        assert!(p(&["carapace", "token"]).is_err());

        // Output: a table of id, name, scope, created, names cleaned.
        assert!(format_tokens(&[]).starts_with("no tokens"));
        let t = format_tokens(&[TokenInfo {
            id: "1f2e3d4c".into(),
            name: "laptop\u{1b}[2J".into(),
            scope: Scope::Operator,
            created: "2026-01-02T03:04:05Z".into(),
        }]);
        assert!(t.starts_with("ID        NAME"), "{t}");
        assert!(t.contains("1f2e3d4c") && t.contains("operator"), "{t}");
        assert!(!t.contains('\u{1b}'), "{t}");

        // Through token_to, on a temporary state directory.
        let tmp = tempfile::tempdir().unwrap();
        let args = |command| TokenArgs {
            state_dir: Some(tmp.path().to_path_buf()),
            json: false,
            command,
        };
        let (code, out, err) = run(|t| {
            token_to(
                &args(TokenCommand::Create {
                    name: "x".into(),
                    scope: Scope::Client,
                }),
                t,
            )
        });
        assert_eq!(code, EXIT_OK, "{err}");
        assert!(out.contains("cpt_") && out.contains("will not be shown again"));
        let (code, out, _) = run(|t| token_to(&args(TokenCommand::List), t));
        assert_eq!(code, EXIT_OK);
        assert!(out.contains(" x ") && !out.contains("cpt_"), "{out}");
        let (code, _, err) = run(|t| {
            token_to(
                &args(TokenCommand::Revoke {
                    id_or_name: "y".into(),
                }),
                t,
            )
        });
        assert_eq!(code, EXIT_FAILED);
        assert!(err.starts_with("carapace: no token"), "{err}");
        let (code, _, _) = run(|t| {
            token_to(
                &args(TokenCommand::Create {
                    name: String::new(),
                    scope: Scope::Client,
                }),
                t,
            )
        });
        assert_eq!(code, EXIT_USAGE);
        assert_eq!(
            TokenStore::in_state_dir(tmp.path()).list().unwrap().len(),
            1
        );
    }

    struct Fake {
        audit: PathBuf,
    }

    impl ControlHandler for Fake {
        fn handle(&self, req: Request) -> Result<Value, String> {
            match req {
                Request::Status => serde_json::to_value(status_report()).map_err(|e| e.to_string()),
                Request::ApprovalsList => {
                    serde_json::to_value(ApprovalsList::default()).map_err(|e| e.to_string())
                }
                Request::ApprovalsResolve { id: 5, resolution } => Ok(serde_json::json!({
                    "id": 5, "decision": if resolution == "deny" { "denied" } else { "allowed once" }
                })),
                Request::ApprovalsResolve { id, .. } => Err(format!("no pending approval {id}")),
                Request::DlqList => {
                    serde_json::to_value(DlqList::default()).map_err(|e| e.to_string())
                }
                Request::DlqRelease { id } | Request::DlqDrop { id } => {
                    Err(format!("dead-letter queue: no entry {id}"))
                }
                Request::HeldList => serde_json::to_value(HeldList {
                    held: vec![crate::control::HeldInfo {
                        id: "00007-1-0".to_string(),
                        channel: "tg".to_string(),
                        sender: "222".to_string(),
                        conversation: "222".to_string(),
                        body: "let me in".to_string(),
                        ts: "2026-11-21T14:03:00.000000Z".to_string(),
                    }],
                })
                .map_err(|e| e.to_string()),
                Request::HeldAdmit { id, always } if id == "00007-1-0" => {
                    Ok(serde_json::json!({"id": id, "seq": 9, "always": always}))
                }
                Request::HeldAdmit { id, .. } | Request::HeldDrop { id } => {
                    Err(format!("no held message {id}"))
                }
                Request::Reload => Err("policy.toml:1:1: expected a table".to_string()),
                Request::AuditTail { .. } => Err("not here".to_string()),
            }
        }
        fn audit_log(&self) -> PathBuf {
            self.audit.clone()
        }
    }

    fn opts(socket: &Path) -> CtlOpts {
        CtlOpts {
            socket: Some(socket.to_path_buf()),
            json: false,
        }
    }

    /// Run a command into buffers: (exit status, stdout, stderr).
    fn run(f: impl FnOnce(&mut Term<'_>) -> i32) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = f(&mut Term {
            out: &mut out,
            err: &mut err,
        });
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn exit_codes_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let state = dir.path().join("state");
        let approvals = |command, json| {
            let a = ApprovalsArgs {
                state_dir: Some(state.clone()),
                opts: CtlOpts {
                    json,
                    ..opts(&sock)
                },
                command,
            };
            run(|t| approvals_to(&a, t))
        };
        let allow = |key: &str| {
            approvals(
                ApprovalsCommand::Allow {
                    key: key.to_string(),
                    always: false,
                },
                false,
            )
        };
        let tail = |follow| {
            let a = AuditCommand::Tail {
                lines: 3,
                follow,
                opts: opts(&sock),
            };
            run(|t| audit_to(&a, t))
        };
        let status = |json| {
            let a = StatusArgs {
                opts: CtlOpts {
                    json,
                    ..opts(&sock)
                },
            };
            run(|t| status_to(&a, t))
        };
        let dlq = |command| {
            let a = DlqArgs {
                opts: opts(&sock),
                command,
            };
            run(|t| dlq_to(&a, t))
        };
        let reload = || run(|t| reload_to(&ReloadArgs { opts: opts(&sock) }, t));
        let held = |command| {
            let a = HeldArgs {
                opts: opts(&sock),
                command,
            };
            run(|t| held_to(&a, t))
        };

        // No supervisor: 3 for everything that needs one, with the reason on stderr.
        let (code, out, err) = status(false);
        assert_eq!(code, EXIT_NO_DAEMON);
        assert!(out.is_empty());
        assert!(
            err.starts_with("carapace: no supervisor is running (no control socket at "),
            "{err}"
        );
        assert!(err.contains("start one with `carapace run`"), "{err}");
        assert_eq!(reload().0, EXIT_NO_DAEMON);
        assert_eq!(dlq(DlqCommand::List).0, EXIT_NO_DAEMON);
        assert_eq!(held(HeldCommand::List).0, EXIT_NO_DAEMON);
        assert_eq!(
            held(HeldCommand::Admit {
                id: "a/b".into(),
                always: false
            })
            .0,
            EXIT_USAGE
        );
        assert_eq!(tail(false).0, EXIT_NO_DAEMON);
        assert_eq!(allow("5").0, EXIT_NO_DAEMON);
        // `approvals list` still lists the state directory's (nothing here).
        let (code, out, err) = approvals(ApprovalsCommand::List, false);
        assert_eq!((code, out.as_str()), (EXIT_OK, "no pending approvals\n"));
        assert!(err.contains("showing the approvals of `carapace exec` runs only"));
        // Usage errors never reach the socket.
        let (code, _, err) = approvals(ApprovalsCommand::Deny { key: "x/y".into() }, false);
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("is not an approval ID"), "{err}");
        assert_eq!(
            dlq(DlqCommand::Drop {
                id: "../etc".into()
            })
            .0,
            EXIT_USAGE
        );

        // A supervisor.
        let server = ControlServer::bind(&sock, None).unwrap();
        let stop = server.shutdown_handle();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let log = dir.path().join("audit.log");
        std::fs::write(
            &log,
            "{\"seq\":1,\"op\":\"connect\"}\n{\"seq\":2,\"op\":\"open\"}\n",
        )
        .unwrap();
        let task = {
            let _g = rt.enter();
            server.serve(Arc::new(Fake { audit: log }))
        };
        let (code, out, err) = status(false);
        assert_eq!((code, err.as_str()), (EXIT_OK, ""));
        assert_eq!(out, format_status(&status_report()));
        let (code, out, _) = status(true);
        assert_eq!(code, EXIT_OK);
        let back: StatusReport = serde_json::from_str(&out).unwrap();
        assert_eq!(back, status_report());

        let (code, out, _) = approvals(ApprovalsCommand::List, false);
        assert_eq!((code, out.as_str()), (EXIT_OK, "no pending approvals\n"));
        let (code, out, _) = approvals(ApprovalsCommand::List, true);
        assert_eq!(code, EXIT_OK);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pending": [], "always": [], "exec_pending": []})
        );
        assert_eq!(
            allow("5"),
            (
                EXIT_OK,
                "approval 5: allowed once\n".to_string(),
                String::new()
            )
        );
        let (code, _, err) = approvals(ApprovalsCommand::Deny { key: "6".into() }, false);
        assert_eq!(
            (code, err.as_str()),
            (EXIT_FAILED, "carapace: no pending approval 6\n")
        );
        // A PID-N key still goes to the state directory: no such file there.
        let (code, _, err) = approvals(
            ApprovalsCommand::Deny {
                key: "4242-1".into(),
            },
            false,
        );
        assert_eq!(code, EXIT_FAILED);
        assert!(err.contains("no pending approval 4242-1"), "{err}");

        assert_eq!(
            dlq(DlqCommand::List),
            (EXIT_OK, "no dead letters\n".to_string(), String::new())
        );
        let (code, out, _) = held(HeldCommand::List);
        assert_eq!(code, EXIT_OK);
        assert_eq!(
            out,
            "00007-1-0  2026-11-21T14:03:00.000000Z  tg  from 222 (conversation 222)\n    body (9 bytes): \"let me in\"\n"
        );
        assert_eq!(
            held(HeldCommand::Admit {
                id: "00007-1-0".into(),
                always: true
            }),
            (
                EXIT_OK,
                "admitted 00007-1-0: queued for the agent as #9; its sender is admitted for good\n"
                    .to_string(),
                String::new()
            )
        );
        let (code, _, err) = held(HeldCommand::Drop { id: "x-2".into() });
        assert_eq!(
            (code, err.as_str()),
            (EXIT_FAILED, "carapace: no held message x-2\n")
        );
        let (code, _, err) = dlq(DlqCommand::Release { id: "x-1".into() });
        assert_eq!(
            (code, err.as_str()),
            (EXIT_FAILED, "carapace: dead-letter queue: no entry x-1\n")
        );
        let (code, out, err) = reload();
        assert_eq!(code, EXIT_FAILED);
        assert!(out.is_empty());
        assert_eq!(
            err,
            "carapace: reload rejected: policy.toml:1:1: expected a table\ncarapace: the old \
             configuration and policy stay in force\n"
        );
        let (code, out, _) = tail(false);
        assert_eq!(code, EXIT_OK);
        assert_eq!(out, "#1 ? ? connect ? ? -> ?\n#2 ? ? open ? ? -> ?\n");
        let a = AuditCommand::Tail {
            lines: 1,
            follow: false,
            opts: CtlOpts {
                json: true,
                ..opts(&sock)
            },
        };
        // --json: the record as stored, field order included.
        let (code, out, _) = run(|t| audit_to(&a, t));
        assert_eq!(
            (code, out.as_str()),
            (EXIT_OK, "{\"seq\":2,\"op\":\"open\"}\n")
        );

        stop.shutdown();
        rt.block_on(task).unwrap();
        assert_eq!(status(false).0, EXIT_NO_DAEMON);
    }

    #[test]
    fn audit_tail_follow_until_the_supervisor_stops() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let log = dir.path().join("audit.log");
        std::fs::write(&log, "{\"seq\":1,\"op\":\"connect\"}\n").unwrap();
        let server = ControlServer::bind(&sock, None).unwrap();
        let stop = server.shutdown_handle();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let task = {
            let _g = rt.enter();
            server.serve(Arc::new(Fake { audit: log.clone() }))
        };
        let a = AuditCommand::Tail {
            lines: 5,
            follow: true,
            opts: opts(&sock),
        };
        let follower = std::thread::spawn(move || run(|t| audit_to(&a, t)));
        std::thread::sleep(Duration::from_millis(300));
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"{\"seq\":2,\"op\":\"open\"}\n").unwrap();
        std::thread::sleep(Duration::from_millis(600));
        stop.shutdown();
        rt.block_on(task).unwrap();
        let (code, out, err) = follower.join().unwrap();
        assert_eq!(out, "#1 ? ? connect ? ? -> ?\n#2 ? ? open ? ? -> ?\n");
        assert_eq!(code, EXIT_FAILED);
        assert!(
            err.contains("the supervisor closed the connection"),
            "{err}"
        );
    }
}
