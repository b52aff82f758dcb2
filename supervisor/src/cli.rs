//! The `carapace` command line: `exec` and `policy {check, explain, show-default}`.
//!
//! The binary (`src/main.rs`) only calls [`main`]; everything here is a library function so it
//! can be tested.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use carapace_policy::{Approval, Decision, ExecRequest, Plan, Policy, Target};
use clap::{Args, Parser, Subcommand};

use std::os::fd::AsFd as _;

use carapace_broker::server::Role;

use crate::broker_host::{new_identity, BrokerHost, BrokerSetup, StateDir, ToolContext};
use carapace_sandbox::cgroup;
use carapace_sandbox::namespaces::{self, RunAs};
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::{EXIT_DENIED, EXIT_SETUP};
use carapace_sandbox::resolve::{self, DEFAULT_PATH};
use carapace_sandbox::run::{self, Limits, Run};
use carapace_sandbox::spawn::{ChildIo, LaunchOptions};
use carapace_sandbox::Privilege;

use crate::embedded::{DEFAULT_POLICY, DEFAULT_POLICY_NAME};
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

Without --policy, the embedded default policy is used (print it with `carapace policy \
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
126 could not start.";

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
    Status(crate::ctl::StatusArgs),
    // About and long help: on `ctl::ApprovalsArgs` (a doc comment here would replace them).
    Approvals(crate::ctl::ApprovalsArgs),
    /// List, release or drop messages held in the dead-letter queue
    Dlq(crate::ctl::DlqArgs),
    /// List, admit or drop inbound messages from senders a channel does not admit
    Held(crate::ctl::HeldArgs),
    /// Verify or follow the broker's audit log
    #[command(subcommand)]
    Audit(crate::ctl::AuditCommand),
    /// Ask the running supervisor to reload its configuration and policy (like SIGHUP)
    Reload(crate::ctl::ReloadArgs),
    // About and long help: on `ctl::TokenArgs`.
    Token(crate::ctl::TokenArgs),
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
    /// The program and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM ARGS"
    )]
    pub command: Vec<OsString>,
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
        /// The program and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
        command: Vec<OsString>,
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
    let verbose = matches!(&cli.command, Command::Exec(a) if a.verbose);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
        Command::Policy(PolicyCommand::Check { files }) => check(&files),
        Command::Policy(PolicyCommand::Explain { file, command }) => explain(file, &command),
        Command::Policy(PolicyCommand::ShowDefault) => {
            print!("{DEFAULT_POLICY}");
            0
        }
        Command::Run(a) => crate::service::run(a),
        Command::Status(a) => crate::ctl::status(a),
        Command::Approvals(a) => crate::ctl::approvals(a),
        Command::Dlq(a) => crate::ctl::dlq(a),
        Command::Held(a) => crate::ctl::held(a),
        Command::Audit(a) => crate::ctl::audit(a),
        Command::Reload(a) => crate::ctl::reload(a),
        Command::Token(a) => crate::ctl::token(a),
    }
}

/// Load and validate a policy (the embedded default when `file` is None). Rule programs are
/// resolved lazily when a request is decided ([`decide`], `Policy::evaluate_with`), not here.
pub fn load_policy(file: Option<&Path>) -> Result<Policy, String> {
    let (text, name) = match file {
        None => (DEFAULT_POLICY.to_string(), DEFAULT_POLICY_NAME.to_string()),
        Some(f) => (
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?,
            f.display().to_string(),
        ),
    };
    Policy::parse(&text, &name).map_err(|d| d.to_string())
}

/// The outcome of deciding a request.
#[derive(Debug)]
pub struct Decided {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub decision: Decision,
    /// The compiled plan of the chosen profile (None when denied, or when compiling failed:
    /// then `compile_error` says why).
    pub plan: Option<Plan>,
    pub compile_error: Option<String>,
}

/// The PATH a plan gives its programs.
fn plan_path(plan: &Plan) -> Option<&str> {
    plan.env
        .set
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
}

/// Resolve the program, evaluate the policy, compile the chosen profile. A bare name is first
/// resolved with the default PATH; if the chosen plan sets another PATH under which the name
/// resolves elsewhere, the decision is made again for that program (it must then be stable).
pub fn decide(
    policy: &Policy,
    command: &[OsString],
    cwd: &Path,
    workspace: Option<&Path>,
    target: &Target,
) -> Result<Decided, String> {
    let (name, rest) = command
        .split_first()
        .ok_or_else(|| "no program given".to_string())?;
    let args = rest
        .iter()
        .map(|a| {
            a.to_str().map(str::to_string).ok_or_else(|| {
                format!(
                    "argument {:?} is not valid UTF-8; policies cannot match it",
                    a.to_string_lossy()
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut search = DEFAULT_PATH.to_string();
    let mut last: Option<PathBuf> = None;
    for _round in 0..3 {
        let program = resolve::resolve(name, &search, cwd).map_err(|e| e.to_string())?;
        if last.as_ref() == Some(&program) {
            break;
        }
        // Rule programs resolved lazily: only those that can decide this request.
        let decision = policy.evaluate_with(
            &ExecRequest {
                program: program.clone(),
                args: args.clone(),
                workspace: workspace.map(Path::to_path_buf),
            },
            |p| std::fs::canonicalize(p).ok(),
        );
        let (plan, compile_error) = match (&decision.approval, &decision.profile) {
            (Approval::Deny, _) | (_, None) => (None, None),
            (_, Some(profile)) => match policy.compile(profile, target) {
                Ok(p) => (Some(p), None),
                Err(d) => (None, Some(d.to_string())),
            },
        };
        let next = plan
            .as_ref()
            .and_then(plan_path)
            .map(str::to_string)
            .unwrap_or_else(|| DEFAULT_PATH.to_string());
        let bare = !name.as_encoded_bytes().contains(&b'/');
        if !bare || next == search {
            return Ok(Decided {
                program,
                args,
                decision,
                plan,
                compile_error,
            });
        }
        // Re-resolve under the profile's own PATH.
        let again = resolve::resolve(name, &next, cwd).map_err(|e| e.to_string())?;
        if again == program {
            return Ok(Decided {
                program,
                args,
                decision,
                plan,
                compile_error,
            });
        }
        last = Some(program);
        search = next;
    }
    Err(format!(
        "{}: resolves to different programs under the default PATH and the profile's PATH; \
         give the program's absolute path",
        name.to_string_lossy()
    ))
}

fn rule_words(policy: &Policy, d: &Decision) -> String {
    match &d.rule {
        Some(r) => format!(
            "rule [[exec]] #{} at line {} of {} (why: {})",
            r.index + 1,
            r.line,
            policy.file(),
            r.why
        ),
        None => format!("no [[exec]] rule of {} matches", policy.file()),
    }
}

fn command_words(program: &Path, args: &[String]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(0) == 1 }
}

/// Ask on /dev/tty. Anything but y/yes is a no.
fn ask_tty(question: &str) -> bool {
    let Ok(tty) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    else {
        return false;
    };
    let mut w = &tty;
    if write!(w, "{question}allow once? [y/N] ").is_err() || w.flush().is_err() {
        return false;
    }
    let mut line = String::new();
    if BufReader::new(&tty).read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn exec(a: ExecArgs) -> i32 {
    let fail = |msg: &str, code: i32| {
        eprintln!("carapace: {msg}");
        code
    };
    let policy = match load_policy(a.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail(&format!("the policy is invalid:\n{e}"), EXIT_SETUP),
    };
    let cwd = match std::env::current_dir() {
        Ok(c) => c,
        Err(e) => {
            return fail(
                &format!("cannot read the current directory: {e}"),
                EXIT_SETUP,
            )
        }
    };
    let target = carapace_sandbox::landlock::target();
    // `$WORKSPACE/...` rules match beneath the workspace's real path (it is opened, checked
    // and canonicalized again when it is mounted).
    let workspace_dir = a
        .workspace
        .as_ref()
        .map_or_else(|| cwd.clone(), |w| cwd.join(w));
    let workspace_canon = std::fs::canonicalize(&workspace_dir).ok();
    let d = match decide(
        &policy,
        &a.command,
        &cwd,
        workspace_canon.as_deref(),
        &target,
    ) {
        Ok(d) => d,
        Err(e) => return fail(&e, EXIT_SETUP),
    };
    let what = command_words(&d.program, &d.args);
    if a.verbose {
        eprintln!("carapace: {what}\n{}", d.decision.explain().trim_end());
    }
    if d.decision.approval == Approval::Deny {
        return fail(
            &format!(
                "denied: {what}\n  by {}\n  To run it, add an [[exec]] rule that allows it above \
                 that point of a policy file and pass it with --policy FILE.",
                rule_words(&policy, &d.decision)
            ),
            EXIT_DENIED,
        );
    }
    if let Some(e) = &d.compile_error {
        return fail(
            &format!("cannot run under this profile on this kernel:\n{e}"),
            EXIT_SETUP,
        );
    }
    let Some(plan) = d.plan else {
        return fail(
            "internal error: an allowed decision without a profile",
            EXIT_SETUP,
        );
    };
    // Opened once, before anyone is asked: what is approved is the file started (the child
    // starts this very file or nothing, see carapace_sandbox::spawn).
    let program = match OpenedProgram::open(&d.program) {
        Ok(p) => std::sync::Arc::new(p),
        Err(e) => return fail(&format!("cannot start {what}: {e}"), EXIT_SETUP),
    };
    // Root or rootless, decided here once. Rootless: the sandbox runs as the user's own uid,
    // in namespaces owned by a user namespace of its own; cgroups only where delegated
    // (docs/threat-model.md).
    let privilege = Privilege::of_this_process();
    if let (Privilege::Rootless(own), false) = (privilege, a.run_as == RunAs::Auto) {
        return fail(
            &format!(
                "--run-as is not available in rootless mode: the sandbox runs as your own \
                 uid:gid {}:{} (only a root supervisor can give it another host identity); \
                 drop --run-as, or run carapace as root",
                own.uid, own.gid
            ),
            EXIT_SETUP,
        );
    }
    if d.decision.approval == Approval::Ask {
        let line = d.decision.rule.as_ref().map_or(0, |r| r.line);
        let question = format!(
            "carapace: {what}\n  needs approval: {}\n  runs confined in profile `{}`\n",
            rule_words(&policy, &d.decision),
            plan.profile
        );
        if !stdin_is_tty() {
            return fail(
                &format!(
                    "denied: {what}\n  needs approval ({}) and there is no terminal to ask on.\n  \
                     To allow it without asking, add an [[exec]] rule with approval = \"allow\" \
                     for {} above line {line} (or adjust the rule at line {line}) in a policy \
                     file, and pass it with --policy FILE \
                     (start from `carapace policy show-default`).",
                    rule_words(&policy, &d.decision),
                    d.program.display()
                ),
                EXIT_DENIED,
            );
        }
        if !ask_tty(&question) {
            return fail("approval refused", EXIT_DENIED);
        }
    }
    // Open the report file now, before the sandbox runs: the program could otherwise replace
    // it (it may lie in the workspace) with a link to a host file that we, as root, would then
    // overwrite. Links in any component are refused.
    let report_file = match &a.report_json {
        None => None,
        Some(f) => match open_report(f) {
            Ok(file) => Some(file),
            Err(e) => return fail(&e, EXIT_SETUP),
        },
    };
    let workspace = match &a.workspace {
        Some(w) => cwd.join(w),
        None => cwd.clone(),
    };
    // A profile with a broker section: the child gets a broker socket at fd 3, served by
    // this process while it runs.
    let brokered = policy.broker_view(&plan.profile).is_some();
    let (profile, inside) = (plan.profile.clone(), plan.user);
    let run = Run {
        name: "exec".to_string(),
        landlock_abi: target.landlock_abi,
        options: LaunchOptions {
            program,
            argv0: a.command.first().cloned().unwrap_or_default(),
            args: a.command.iter().skip(1).cloned().collect(),
            workspace: Some(workspace.clone()),
            privilege,
            run_as: a.run_as,
            env: std::env::vars_os().collect(),
            broker: brokered,
            listener: false,
            supervisor_env: Vec::new(),
        },
    };
    let prepared = match run::prepare(plan, &run) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                &format!("cannot start {what}: {}", error_chain(&e)),
                EXIT_SETUP,
            )
        }
    };
    let launch = prepared.launch();
    if let Some(n) = launch.run_as_note() {
        eprintln!("{n}");
    }
    say_limits(prepared.limits(), privilege, a.verbose);
    if a.verbose {
        eprintln!(
            "carapace: running {} as host {}:{} (inside {}:{}), workspace owner {:?}, \
             landlock ABI {}{}",
            launch.program_inside().display(),
            launch.host_ids().uid,
            launch.host_ids().gid,
            inside.uid,
            inside.gid,
            launch.workspace_owner(),
            target.landlock_abi,
            if launch.rootless() { ", rootless" } else { "" }
        );
    }
    if let Err(e) = carapace_sandbox::spawn::handle_termination_signals() {
        tracing::warn!("cannot handle termination signals: {e}");
    }
    // (After the signal mask is set: the broker's threads inherit it, so the termination
    // signals reach the wait below.)
    let broker = if brokered {
        match start_broker(&a, &policy, &target, privilege, &workspace, &profile) {
            Ok(b) => Some(b),
            Err(e) => return fail(&format!("cannot start the broker: {e}"), EXIT_SETUP),
        }
    } else {
        None
    };
    let io = ChildIo {
        broker: broker.as_ref().map(|(_, theirs)| theirs.as_fd()),
        ..ChildIo::default()
    };
    let started = prepared.spawn(io);
    // The child has its copy of the socket now; ours must go, so that the broker sees the
    // hangup when the child is gone.
    let host = broker.map(|(host, theirs)| {
        drop(theirs);
        host
    });
    let ended = started.map(run::Started::wait);
    if let Some(host) = host {
        host.shutdown();
    }
    let t_exited = std::time::Instant::now();
    let report = match ended.as_ref().map(|e| &e.report) {
        Ok(Ok(r)) => r,
        Err(e) | Ok(Err(e)) => {
            // (Dropping the run kills what may be left in its cgroup and removes it.)
            return fail(
                &format!("cannot start {what}: {}", error_chain(e)),
                EXIT_SETUP,
            );
        }
    };
    let interrupted = carapace_sandbox::spawn::interrupted();
    if let Some(sig) = interrupted {
        eprintln!("carapace: interrupted by signal {sig}: the sandbox was killed");
    } else if let Some(n) = report.note() {
        eprintln!("{n}");
    }
    if a.report || a.verbose {
        eprintln!("{}", report.line());
    }
    if let (Some(path), Some(file)) = (&a.report_json, report_file) {
        write_report(path, file, &format!("{}\n", report.json()));
    }
    let code = match interrupted {
        Some(sig) => 128 + sig,
        None => report.exit_code(),
    };
    // The cgroup goes only now: its statistics are in the report already, and whoever waits
    // for the report does not wait for the rmdirs (milliseconds on v1; see docs/benchmarks.md).
    let t_reported = std::time::Instant::now();
    let Ok(mut ended) = ended else { return code };
    if let Err(e) = ended.remove_cgroup() {
        tracing::warn!("removing the cgroup: {}", error_chain(&e));
    }
    if a.verbose {
        let t = ended.timings;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "carapace: timing: cgroup create {:.2}ms, prepare {:.2}ms, start (clone..execve) \
             {:.2}ms, run {:.2}ms, report {:.2}ms, cgroup remove {:.2}ms",
            ms(t.cgroup),
            ms(t.prepare),
            ms(t.start),
            ms(t.run),
            ms(t_reported.duration_since(t_exited)),
            ms(t_reported.elapsed())
        );
    }
    code
}

/// Say where the run's cgroup limits are enforced: rootless without a cgroup always (the
/// limits are weaker), the details with `-v`.
fn say_limits(limits: &Limits, privilege: Privilege, verbose: bool) {
    match limits {
        Limits::Cgroup { name } if verbose && !privilege.is_root() => {
            eprintln!("carapace: rootless: using the delegated cgroup {name}");
        }
        Limits::Cgroup { .. } => {}
        Limits::Rlimits { why, added } => {
            eprintln!("{}", cgroup::NO_CGROUP_LINE);
            if verbose {
                eprintln!("carapace: rootless: {why}");
                for f in added {
                    eprintln!(
                        "carapace: rootless: {} instead of {}",
                        carapace_sandbox::rlimits::fallback_words(f),
                        f.instead_of
                    );
                }
            }
        }
    }
}

/// Start the broker for a child in `profile`: open the state, build the operations, and serve
/// the broker's end of a new socketpair. Returns the host and the child's end.
fn start_broker(
    a: &ExecArgs,
    policy: &Policy,
    target: &Target,
    privilege: Privilege,
    workspace: &Path,
    profile: &str,
) -> Result<(BrokerHost, std::os::fd::OwnedFd), String> {
    let state = StateDir::open(&crate::paths::state_dir_or_default(a.state_dir.as_deref()))
        .map_err(|e| e.to_string())?;
    let host = BrokerHost::start(BrokerSetup {
        policy: policy.clone(),
        state,
        tools: ToolContext {
            policy: std::sync::Arc::new(policy.clone()),
            target: *target,
            privilege,
            run_as: a.run_as,
            env: std::env::vars_os().collect(),
            workspace: Some(workspace.to_path_buf()),
            live: Default::default(),
        },
        approval_timeout: std::time::Duration::from_secs(a.approval_timeout),
        token_store: None,
    })
    .map_err(|e| error_chain(&e))?;
    let (mine, theirs) =
        carapace_broker::protocol::seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
    let who = new_identity(Role::Tool, profile);
    if a.verbose {
        eprintln!("carapace: broker: serving {who} at fd 3");
    }
    if host.peers().serve(mine, who).is_none() {
        return Err("internal error: the broker has no handler".into());
    }
    Ok((host, theirs))
}

/// Create/truncate the `--report-json` file, refusing symbolic links in every component.
fn open_report(path: &Path) -> Result<std::fs::File, String> {
    carapace_sandbox::fds::open_no_symlinks(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
        0o644,
    )
    .map(std::fs::File::from)
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!(
            "--report-json {}: a component of the path is a symbolic link; refused (give a \
             path without links)",
            path.display()
        ),
        _ => format!("--report-json {}: {e}", path.display()),
    })
}

/// Write the report into the file opened before the run. If the sandbox replaced the file at
/// that path meanwhile, the report goes to the original (now unlinked) file and we say so;
/// we never follow what is at the path now.
fn write_report(path: &Path, mut file: std::fs::File, text: &str) {
    use std::os::unix::fs::MetadataExt as _;
    if let Err(e) = file.write_all(text.as_bytes()) {
        eprintln!(
            "carapace: cannot write the report to {}: {e}",
            path.display()
        );
        return;
    }
    let same = match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if !same {
        eprintln!(
            "carapace: warning: {} was replaced or removed while the program ran; the report \
             was written to the original file only. Report: {}",
            path.display(),
            text.trim_end()
        );
    }
}

fn check(files: &[PathBuf]) -> i32 {
    let mut failed = false;
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", f.display());
                failed = true;
                continue;
            }
        };
        let name = f.display().to_string();
        let policy = match Policy::parse(&text, &name) {
            Ok(p) => p,
            Err(d) => {
                eprintln!("{d}");
                failed = true;
                continue;
            }
        };
        // Compile every profile, for the best kernel: errors here are the policy's, not the
        // kernel's. This kernel's shortcomings are reported as notes.
        let mut bad = false;
        let here = carapace_sandbox::landlock::target();
        for profile in policy.profile_names() {
            if let Err(d) = policy.compile(
                profile,
                &Target {
                    landlock_abi: u8::MAX,
                },
            ) {
                eprintln!("{d}");
                bad = true;
            } else if let Err(d) = policy.compile(profile, &here) {
                eprintln!("{name}: note: profile `{profile}` cannot run on this kernel:\n{d}");
            }
        }
        let outcomes = policy.run_tests_with(|p| std::fs::canonicalize(p).ok());
        let mut passed = 0;
        for t in &outcomes {
            if t.passed {
                passed += 1;
                continue;
            }
            bad = true;
            eprintln!(
                "{name}:{}: test failed: {:?} expected {}, got {} ({}{})",
                t.line,
                t.command,
                t.expected,
                t.got.approval,
                t.got.rule.as_ref().map_or_else(
                    || "no rule matched".to_string(),
                    |r| format!("rule [[exec]] #{} at line {}", r.index + 1, r.line)
                ),
                t.got
                    .profile
                    .as_ref()
                    .map_or_else(String::new, |p| format!(", profile {p}"))
            );
        }
        if bad {
            failed = true;
            continue;
        }
        let n = policy.profile_names().len();
        let m = policy.rule_count();
        if files.len() == 1 {
            println!("ok: {n} profiles, {m} rules, {passed} tests passed");
        } else {
            println!("ok: {n} profiles, {m} rules, {passed} tests passed ({name})");
        }
    }
    i32::from(failed)
}

fn explain(file: Option<PathBuf>, command: &[OsString]) -> i32 {
    let policy = match load_policy(file.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let target = carapace_sandbox::landlock::target();
    // As `carapace exec` without --workspace: the current directory is the workspace.
    let workspace = std::fs::canonicalize(&cwd).ok();
    let d = match decide(&policy, command, &cwd, workspace.as_deref(), &target) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("carapace: {e}");
            return 1;
        }
    };
    let name = command.first().map_or(OsStr::new(""), |s| s.as_os_str());
    println!(
        "program: {} (resolved from `{}`)",
        d.program.display(),
        name.to_string_lossy()
    );
    println!("policy: {}", policy.file());
    print!("{}", d.decision.explain());
    if let Some(e) = d.compile_error {
        println!("\nthis profile cannot run on this kernel:\n{e}");
        return 1;
    }
    if let Some(plan) = d.plan {
        println!(
            "\nconfinement (compiled for this kernel: Landlock ABI {}):",
            target.landlock_abi
        );
        print!("{}", plan.explain());
        // What the child may ask the broker for is part of its confinement too.
        println!();
        print!("{}", policy.explain_broker(&plan.profile));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::{
        answer_approval, audit_verify, ApprovalsArgs, ApprovalsCommand, AuditCommand,
    };
    use carapace_sandbox::namespaces::HostIds;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(args)
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_args() {
        let c = parse(&["carapace", "exec", "--", "ls", "-la"]).unwrap();
        let Command::Exec(a) = c.command else {
            panic!("not exec")
        };
        assert_eq!(a.command, vec![OsString::from("ls"), OsString::from("-la")]);
        assert_eq!(a.run_as, RunAs::Auto);
        assert!(!a.report);

        // Without `--`, everything after PROGRAM belongs to it, flags included.
        let c = parse(&[
            "carapace",
            "exec",
            "--report",
            "--run-as",
            "1500:1501",
            "--workspace",
            "/tmp",
            "grep",
            "-r",
            "--report",
            "x",
        ])
        .unwrap();
        let Command::Exec(a) = c.command else {
            panic!("not exec")
        };
        assert!(a.report);
        assert_eq!(
            a.run_as,
            RunAs::Fixed(HostIds {
                uid: 1500,
                gid: 1501
            })
        );
        assert_eq!(a.workspace, Some(PathBuf::from("/tmp")));
        assert_eq!(a.command.len(), 4);
        assert_eq!(a.command[2], OsString::from("--report"));

        assert!(parse(&["carapace", "exec"]).is_err());
        assert!(parse(&["carapace", "exec", "--run-as", "0:0", "--", "ls"]).is_err());
        assert!(parse(&["carapace", "exec", "--run-as", "x", "--", "ls"]).is_err());
    }

    #[test]
    fn audit_args() {
        let c = parse(&["carapace", "audit", "verify", "/x/audit.log"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Audit(AuditCommand::Verify { file }) if file == Path::new("/x/audit.log")
        ));
        assert!(parse(&["carapace", "audit", "verify"]).is_err());
    }

    #[test]
    fn approvals_and_state_dir_args() {
        let c = parse(&["carapace", "approvals", "list", "--state-dir", "/s"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Approvals(ApprovalsArgs { state_dir: Some(ref d), command: ApprovalsCommand::List, .. })
                if d == Path::new("/s")
        ));
        let c = parse(&["carapace", "approvals", "allow", "12-3", "--always"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Approvals(ApprovalsArgs { command: ApprovalsCommand::Allow { ref key, always: true }, .. })
                if key == "12-3"
        ));
        assert!(parse(&["carapace", "approvals", "deny"]).is_err());
        let c = parse(&["carapace", "exec", "--state-dir", "/s", "--", "ls"]).unwrap();
        let Command::Exec(a) = c.command else {
            panic!("not exec")
        };
        assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(a.approval_timeout, 120);
        // Keys are PID-N only: nothing that could name another file.
        let t = tempfile::tempdir().unwrap();
        assert_eq!(answer_approval(t.path(), "../x", "deny"), 2);
        assert_eq!(answer_approval(t.path(), "", "deny"), 2);
        assert_eq!(answer_approval(t.path(), "1-1", "deny"), 1);
        std::fs::write(t.path().join("1-1.json"), "{}").unwrap();
        assert_eq!(answer_approval(t.path(), "1-1", "deny"), 0);
        assert_eq!(
            std::fs::read_to_string(t.path().join("1-1.answer")).unwrap(),
            "deny\n"
        );
    }

    #[test]
    fn audit_verify_exit_codes() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("missing.log");
        assert_eq!(audit_verify(&missing), 2);
        let empty = t.path().join("empty.log");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(audit_verify(&empty), 0);
        let junk = t.path().join("junk.log");
        std::fs::write(&junk, "not json\n").unwrap();
        assert_eq!(audit_verify(&junk), 1);
    }

    #[test]
    fn policy_args() {
        let c = parse(&["carapace", "policy", "check", "a.toml", "b.toml"]).unwrap();
        assert!(
            matches!(c.command, Command::Policy(PolicyCommand::Check { files }) if files.len() == 2)
        );
        assert!(parse(&["carapace", "policy", "check"]).is_err());
        let c = parse(&["carapace", "policy", "explain", "--", "ls", "-l"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Policy(PolicyCommand::Explain { file: None, command }) if command.len() == 2
        ));
        let c = parse(&["carapace", "policy", "explain", "p.toml", "--", "ls"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Policy(PolicyCommand::Explain { file: Some(_), .. })
        ));
        assert!(parse(&["carapace", "policy", "show-default"]).is_ok());
    }

    #[test]
    fn default_policy_is_valid_and_decides() {
        let p = load_policy(None).unwrap();
        let target = carapace_sandbox::landlock::target();
        let d = decide(
            &p,
            &[OsString::from("ls"), OsString::from("-la")],
            Path::new("/"),
            None,
            &target,
        )
        .unwrap();
        assert_eq!(d.decision.approval, Approval::Allow);
        assert!(d.plan.is_some(), "{:?}", d.compile_error);
        let d = decide(&p, &[OsString::from("sudo")], Path::new("/"), None, &target);
        if let Ok(d) = d {
            assert_eq!(d.decision.approval, Approval::Deny);
        }
        assert!(decide(
            &p,
            &[OsString::from("no-such-prog-xyz")],
            Path::new("/"),
            None,
            &target
        )
        .is_err());
    }
}
