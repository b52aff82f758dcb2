//! The operator commands' arguments (clap), the options they share, and exit statuses.

use super::*;

/// Exit status: done.
pub const EXIT_OK: i32 = 0;
/// Exit status: the supervisor refused or failed (or the answer could not be read).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no supervisor is running.
pub const EXIT_NO_DAEMON: i32 = 3;

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
    pub(super) fn socket(&self) -> PathBuf {
        pick_socket(
            self.socket.as_deref(),
            std::env::var_os(crate::paths::CONTROL_SOCKET_ENV).is_some(),
            carapace_sandbox::Privilege::of_this_process().is_root(),
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
pub(super) fn pick_socket(
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

/// `carapace metrics`.
#[derive(Debug, Args)]
#[command(
    long_about = "Print the running supervisor's metrics in Prometheus' text format (0.0.4): \
                  children started and restarted, broker requests by op and decision, denials, \
                  request latency, approvals waiting, held messages, dead letters. For \
                  node_exporter's textfile collector, run it from a timer into a .prom file \
                  (see docs/operations.md, Metrics); for Prometheus itself, set `[metrics] \
                  listen` in the configuration instead.",
    after_help = "Examples:\n  carapace metrics\n  carapace metrics > \
                  /var/lib/node_exporter/textfile/carapace.prom.tmp && mv \
                  /var/lib/node_exporter/textfile/carapace.prom.tmp \
                  /var/lib/node_exporter/textfile/carapace.prom\n\nExit status: 0 ok, 1 the \
                  supervisor failed, 3 no supervisor is running."
)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
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
                      alone; compare the head (printed on success) with one saved elsewhere. \
                      When FILE has rotated files beside it (FILE.<first seq>), the whole set \
                      is verified as one chain, oldest first; if the oldest kept file does not \
                      start at seq 1, the check starts from its first record's prev (what was \
                      deleted before it cannot be checked) and says so.",
        after_help = "Example:\n  carapace audit verify /var/lib/carapace/audit.log\n\n\
                      Exit status: 0 intact (\"ok: N records ...\"), 1 broken (the first line \
                      found wrong, and how) or the file cannot be read (the message says which), \
                      2 usage."
    )]
    Verify {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print the outcome as one JSON object for scripts: {"file", "ok", "lines", "head":
        /// {"seq", "hash"} or null, "broken": {"file", "line", "what"} or null, "error": text or
        /// null, "files": [{"file", "first_seq", "lines", "head"}] oldest first, "anchor":
        /// {"seq", "hash"} or null}
        #[arg(long)]
        json: bool,
    },
    /// Rotate the audit log now (as the broker does at `[audit] rotate_size`)
    #[command(
        long_about = "Rotate an audit log now, whatever its size: FILE is renamed to \
                      FILE.<seq of its first record> and the next record, written to a new FILE, \
                      continues the same hash chain. Safe while the supervisor runs: it takes \
                      the log's lock like the broker does, and the broker follows the rename. \
                      Rotated files are deleted only with --keep.",
        after_help = "Example:\n  carapace audit rotate /var/lib/carapace/audit.log --keep 10\n\n\
                      Exit status: 0 rotated (or nothing to rotate: FILE is empty), 1 failed."
    )]
    Rotate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Delete the oldest rotated files beyond N (at least 1)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
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

pub(super) fn parse_scope(s: &str) -> Result<carapace_broker::tokens::Scope, String> {
    s.parse()
        .map_err(|_| "expected `operator` or `client`".to_string())
}
