//! The `carapace` command line: its arguments and the dispatch to `exec` (in `exec.rs`),
//! `policy {check, explain, show-default}` (`policy.rs`, with [`crate::decide`]: what the
//! policy decides for a command line), `run` ([`crate::service`]) and the operator's commands
//! ([`ctl`]), and `completions` / `manpages` generated from these definitions ([`generate`]).
//!
//! The binary (`src/main.rs`) only calls [`main`]; everything here is a library function so it
//! can be tested.

pub mod ctl;
pub mod generate;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use carapace_policy::{Approval, Policy, Target};
use clap::{Args, Parser, Subcommand};

use std::os::fd::AsFd as _;

use carapace_broker::server::Role;

use crate::broker_host::{new_identity, BrokerHost, BrokerSetup, StateDir, ToolContext};
use carapace_sandbox::cgroup;
use carapace_sandbox::namespaces::{self, RunAs};
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::{EXIT_DENIED, EXIT_SETUP};
use carapace_sandbox::run::{self, Limits, Run};
use carapace_sandbox::spawn::{ChildIo, LaunchOptions};
use carapace_sandbox::Privilege;

use crate::embedded::DEFAULT_POLICY;
use crate::errors::error_chain;

const ABOUT: &str = "Run programs under a kernel-enforced sandbox described by a TOML policy.";

const LONG_ABOUT: &str = "\
carapace runs a program confined by the Linux kernel, as a declarative TOML policy decides.

The policy's [[exec]] rules say WHETHER a program may run (allow, ask, or deny; the first rule \
that matches wins; nothing runs that no rule allows) and UNDER WHICH PROFILE. A profile says \
what the program may touch: the filesystem view (system directories read-only, the workspace \
writable but not executable), no network, seccomp syscall allowlist, Landlock rules, cgroup \
limits, rlimits and a wall-time limit. All namespaces are new; all capabilities are dropped; \
the program runs as an unprivileged host identity of its own (by default uid = gid = \
2130706432 + the supervisor's pid, in the range 2130706432..2134900736 reserved for this: no \
real account, no other process), which appears inside as the profile's user (1000:1000 by \
default).

Without --policy, a running supervisor (`carapace run`) is used when there is one: the \
command goes through its exec socket and the supervisor's policy decides (--via says which path \
to take). Else the embedded default policy is used (print it with `carapace policy \
show-default`): common read-only tools (ls, cat, grep, git status/log/diff, ...) are allowed, \
set-uid helpers are refused, and everything else asks for approval on the terminal.";

const AFTER_HELP: &str = "\
Examples:
  carapace exec -- ls -la                      run ls in the current directory, confined
  carapace exec --report -- git status         ... and print exit status, time and memory
  carapace exec --workspace ~/proj -- grep -r TODO .
  carapace policy explain -- python3 -c 'print(1)'
                                               which rule decides, and the confinement in words
  carapace policy check policies/*.toml        validate policies and run their [[test]]s
  carapace policy show-default > my.toml       start your own policy from the default

Exit codes of `carapace exec`: the program's own; 128+N when it was killed by signal N;
124 wall-time limit reached; 125 denied by the policy or approval refused; 126 carapace could
not start it (setup error, invalid policy, unsupported kernel, not root).";

const EXEC_ABOUT: &str = "Run PROGRAM confined, if the policy allows it";

const EXEC_LONG_ABOUT: &str = "\
Run PROGRAM confined, if the policy allows it.

PROGRAM is resolved like a shell does (PATH search for a bare name, using the profile's PATH), \
then symlinks are resolved: the policy decides on the canonical path. The first [[exec]] rule \
that matches program and arguments decides:
  allow  runs it;
  ask    asks on the terminal (\"allow once? [y/N]\"); without a terminal it is denied (125);
  deny   refuses it (125), naming the rule and why.

The workspace (default: the current directory) appears at the profile's workspace path \
(/workspace in the default policy), writable but not executable; files written there are owned \
by the workspace directory's owner on the host. stdin, stdout and stderr are passed through.

When the profile has a broker section ([profiles.NAME.broker]), PROGRAM also gets a socket to \
carapace's broker at fd 3 (CARAPACE_BROKER_FD=3): through it, and only as the policy allows, it \
may ask for network connections, files outside its view, secrets, outbound messages and other \
tools (run confined in sandboxes of their own); `carapace-client` is its command-line client. \
carapace serves it until PROGRAM exits. Every decision is appended to STATE-DIR/audit.log \
(check it with `carapace audit verify`); an `ask` waits for `carapace approvals allow|deny`.

When a supervisor (`carapace run`) is running and neither --policy nor --state-dir is given, \
the command goes through the supervisor's exec socket (--via auto): the supervisor's policy \
decides, the supervisor makes the sandbox (faster: its policy is compiled and its spawners are \
ready) with this process's stdin, stdout, stderr and environment, records it in its audit log, \
and kills it if this process goes away (Ctrl-C). `-v` and `--report` say which path ran \
(via=supervisor or via=local). --via local always makes the sandbox here; --via supervisor \
fails when no supervisor takes it.

Run as root, carapace gives the program an unprivileged host identity of its own (--run-as) and \
cgroup limits. Run as an ordinary user it works rootless: the program runs as that user, in \
namespaces of a user namespace of its own, with the same mounts, Landlock, seccomp and no \
capabilities; memory/pids/cpu limits use a delegated cgroup where there is one, else rlimits \
(said on stderr). See docs/threat-model.md, \"Rootless mode\".";

const EXEC_AFTER_HELP: &str = "\
Examples:
  carapace exec -- ls -la
  carapace exec -- git status
  carapace exec --policy my.toml -- python3 -c 'import os; print(os.getuid())'
  carapace exec --run-as 1500:1500 --report-json run.json -- make test

Exit codes: the program's own; 128+N killed by signal N; 124 timed out; 125 denied;
126 could not start; 127 the program was not found.";

#[derive(Debug, Parser)]
#[command(
    name = "carapace",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(about = EXEC_ABOUT, long_about = EXEC_LONG_ABOUT, after_help = EXEC_AFTER_HELP)]
    Exec(ExecArgs),
    /// Check, explain and show policies
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the supervisor: the gateway and channels confined, the broker, the control socket
    Run(crate::service::RunArgs),
    /// Show the running supervisor's children, their state, restarts and resource use
    Status(crate::cli::ctl::StatusArgs),
    // About and long help: on `ctl::ApprovalsArgs` (a doc comment here would replace them).
    Approvals(crate::cli::ctl::ApprovalsArgs),
    /// List, release or drop messages held in the dead-letter queue
    Dlq(crate::cli::ctl::DlqArgs),
    /// List, admit or drop inbound messages from senders a channel does not admit
    Held(crate::cli::ctl::HeldArgs),
    /// Verify or follow the broker's audit log
    #[command(subcommand)]
    Audit(crate::cli::ctl::AuditCommand),
    /// Ask the running supervisor to reload its configuration and policy (like SIGHUP)
    Reload(crate::cli::ctl::ReloadArgs),
    /// Print the running supervisor's metrics (Prometheus text format)
    Metrics(crate::cli::ctl::MetricsArgs),
    /// List, run or show the history of the scheduled jobs ([[jobs]])
    Jobs(crate::cli::ctl::JobsArgs),
    // About and long help: on `ctl::TokenArgs`.
    Token(crate::cli::ctl::TokenArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) on stdout
    #[command(
        long_about = "Print the completion script for SHELL on stdout, generated from this \
                      command line's own definition. The Debian package installs them; by hand: \
                      `carapace completions bash > ~/.local/share/bash-completion/completions/carapace`.",
        after_help = "Examples:\n  carapace completions bash > /usr/share/bash-completion/completions/carapace\n  \
                      carapace completions zsh > /usr/share/zsh/vendor-completions/_carapace\n  \
                      carapace completions fish > /usr/share/fish/vendor_completions.d/carapace.fish"
    )]
    Completions(generate::CompletionsArgs),
    /// Write the manual pages (carapace.1 and one per subcommand) into DIR
    // Hidden from the main help: a packaging step (supervisor/packaging/build-deb), documented in
    // docs/operations.md; the package ships the pages.
    #[command(hide = true)]
    Manpages(generate::ManpagesArgs),
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Policy file to use instead of the embedded default policy
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Host directory shown as the profile's workspace (default: the current directory)
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Unprivileged host identity the program runs as: `auto` (default) = uid and gid
    /// 2130706432 + the supervisor's pid (range 2130706432..2134900736: unique per concurrent
    /// run, never a real account; a tool a brokered program has the broker run gets one of its
    /// own from the same range), or UID:GID (never 0)
    #[arg(long, value_name = "auto|UID:GID", default_value = "auto", value_parser = namespaces::parse_run_as)]
    pub run_as: RunAs,
    /// Print a one-line report (exit, signal, wall/cpu time, peak memory, OOM, timeout) on stderr
    #[arg(long)]
    pub report: bool,
    /// Write the report as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// Say what is decided and applied (implies --report)
    #[arg(short, long)]
    pub verbose: bool,
    /// The broker's state (audit.log, approvals.json, dlq/, pending/), used when the profile
    /// has a broker section; created 0700 [default: /var/lib/carapace as root, else
    /// $XDG_STATE_HOME/carapace or ~/.local/state/carapace]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// How long an `ask` from a brokered child waits for `carapace approvals allow|deny`
    /// before it is denied
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub approval_timeout: u64,
    /// Where the sandbox is made: `auto` through a running supervisor (`carapace run`, whose
    /// policy then decides) when one serves its exec socket and neither --policy nor
    /// --state-dir is given, else here; `supervisor` only through one; `local` always here
    #[arg(
        long,
        value_enum,
        value_name = "auto|supervisor|local",
        default_value = "auto"
    )]
    pub via: Via,
    /// The program and its arguments
    /// (An option of exec's own, misspelt, is a usage error with a suggestion rather than a
    /// program to run: a program whose name starts with `-` goes after `--`.)
    #[arg(required = true, trailing_var_arg = true, value_name = "PROGRAM ARGS")]
    pub command: Vec<OsString>,
}

/// `carapace exec --via`: who makes the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// A running supervisor when there is one (and no --policy/--state-dir), else here.
    Auto,
    /// A running supervisor, or fail.
    Supervisor,
    /// This process.
    Local,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files and run their [[test]] examples
    #[command(
        after_help = "Example:\n  carapace policy check policies/default.toml my.toml\n\n\
                            Exit status 0 when every file is valid and all its tests pass, else 1 \
                            with every error (file:line:column) and every failing test."
    )]
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print one JSON object per file for scripts: {"file", "ok", "profiles", "rules",
        /// "tests_passed", "errors": [{"line", "column", "message", "expected"}], "notes",
        /// "failed_tests": [{"line", "command", "expected", "got"}]}
        #[arg(long)]
        json: bool,
    },
    /// Show which rule decides for a command, and the confinement it would run under
    #[command(
        long_about = "Show which [[exec]] rule decides for PROGRAM ARGS, the decision, and the \
                      confinement of the chosen profile in plain words. The confinement is \
                      rendered from the plan compiled for THIS kernel (its Landlock ABI), the \
                      same plan `exec` applies, so it cannot claim what is not enforced.",
        after_help = "Examples:\n  carapace policy explain -- ls -la\n  \
                      carapace policy explain my.toml -- python3 script.py"
    )]
    Explain {
        /// Policy file (default: the embedded default policy)
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Print one JSON object for scripts: {"program", "policy", "decision": {"approval",
        /// "profile", "rule": {"index", "line", "why"} or null}, "plan": the compiled plan or
        /// null, "compile_error": text or null}
        #[arg(long)]
        json: bool,
        /// The program and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
        command: Vec<OsString>,
    },
    /// List the syscall groups (`@name` in a profile's seccomp `allow`), or one group's syscalls
    #[command(
        long_about = "List carapace's syscall groups with why each exists, or, given NAME, the \
                      syscalls of that group. These are carapace's own groups: systemd's \
                      SystemCallFilter= has sets with some of the same names (@default, \
                      @process, @signal, @ipc, ...) that hold different syscalls.",
        after_help = "Examples:\n  carapace policy groups\n  carapace policy groups @process\n  \
                      carapace policy groups --json"
    )]
    Groups {
        /// A group, with or without its `@`
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// Print the embedded default policy
    ShowDefault,
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Command::Run(a) = cli.command {
        // The service sets up its own logging (format and level from its configuration).
        return crate::service::run(a);
    }
    if !matches!(cli.command, Command::Exec(_)) {
        // A command that only prints ends quietly when its reader goes away (`carapace status |
        // head`), as coreutils do, instead of failing a write and panicking in print!. Only
        // pipes are concerned: the standard library's socket writes use MSG_NOSIGNAL. `exec`
        // (which serves a broker) and `run` keep Rust's default, SIGPIPE ignored.
        // SAFETY: setting a signal disposition to its default; no handler is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let verbose = matches!(&cli.command, Command::Exec(a) if a.verbose);
    // Colour only for a person: stderr is a terminal and NO_COLOR (no-color.org) is unset.
    let colour = {
        use std::io::IsTerminal as _;
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .without_time()
        .with_target(false)
        .with_max_level(if verbose {
            tracing::Level::DEBUG
        } else {
            tracing::Level::WARN
        })
        .try_init();
    match cli.command {
        Command::Exec(a) => exec(a),
        Command::Policy(PolicyCommand::Check { files, json }) => check(&files, json),
        Command::Policy(PolicyCommand::Explain {
            file,
            command,
            json,
        }) => explain(file, &command, json),
        Command::Policy(PolicyCommand::Groups { name, json }) => groups(name.as_deref(), json),
        Command::Policy(PolicyCommand::ShowDefault) => {
            print!("{DEFAULT_POLICY}");
            0
        }
        Command::Run(a) => crate::service::run(a),
        Command::Status(a) => crate::cli::ctl::status(a),
        Command::Approvals(a) => crate::cli::ctl::approvals(a),
        Command::Dlq(a) => crate::cli::ctl::dlq(a),
        Command::Held(a) => crate::cli::ctl::held(a),
        Command::Audit(a) => crate::cli::ctl::audit(a),
        Command::Reload(a) => crate::cli::ctl::reload(a),
        Command::Metrics(a) => crate::cli::ctl::metrics(a),
        Command::Jobs(a) => crate::cli::ctl::jobs(a),
        Command::Token(a) => crate::cli::ctl::token(a),
        Command::Completions(a) => generate::completions(a),
        Command::Manpages(a) => generate::manpages(a),
    }
}

use crate::decide::*;
mod exec;
use exec::*;
mod policy;
use policy::*;
#[cfg(test)]
mod tests;
