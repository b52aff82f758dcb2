//! `carapace exec`: decide, ask on the terminal where the policy says ask, then one confined run
//! (through the sandbox's one run path), its broker served by this process while it runs.

use super::*;

/// Errors of the steps of `carapace exec` around the run: the broker and the report file
/// (the command prints them).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The state directory, the broker's runtime, the broker's socketpair.
    #[error(transparent)]
    Broker(#[from] crate::broker_host::BrokerHostError),
    #[error("internal error: the broker has no handler")]
    NoHandler,
    #[error(
        "--report-json {}: a component of the path is a symbolic link; refused (give a path \
         without links)",
        path.display()
    )]
    ReportLink { path: PathBuf },
    #[error("--report-json {}: {source}", path.display())]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn stdin_is_tty() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdin().is_terminal()
}

/// Ask on /dev/tty. Anything but y/yes is a no.
pub(super) fn ask_tty(question: &str) -> bool {
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

fn fail(msg: &str, code: i32) -> i32 {
    eprintln!("carapace: {msg}");
    code
}

pub(super) fn exec(a: ExecArgs) -> i32 {
    let own = if a.policy.is_some() {
        Some("--policy names a policy of its own")
    } else if a.state_dir.is_some() {
        Some("--state-dir names a broker state of its own")
    } else {
        None
    };
    match (a.via, own) {
        (Via::Local, _) => exec_here(a, None),
        (Via::Supervisor, Some(why)) => fail(
            &format!(
                "--via supervisor: {why}, and a supervisor runs under its own policy and \
                 state; drop it, or use --via local"
            ),
            EXIT_SETUP,
        ),
        (Via::Auto, Some(why)) => exec_here(a, Some(why.to_string())),
        (_, None) => match through_supervisor(&a) {
            Through::Ran(code) => code,
            Through::Here(why) if a.via == Via::Supervisor => {
                fail(&format!("--via supervisor: {why}"), EXIT_SETUP)
            }
            Through::Here(why) => exec_here(a, Some(why)),
        },
    }
}

/// How a run through the supervisor ended.
enum Through {
    /// It was decided (run, denied or failed) there: exit with this.
    Ran(i32),
    /// Nothing was run there (why): run it here.
    Here(String),
}

/// The report as JSON, with the path that ran it.
fn report_json(mut report: serde_json::Value, via: &str) -> String {
    if let Some(o) = report.as_object_mut() {
        o.insert("via".to_string(), serde_json::Value::from(via));
    }
    format!("{report}\n")
}

/// `carapace exec` through the exec socket of a running supervisor ([`crate::exec_socket`]).
/// Falls back (`Here`) only while nothing can have run there: no supervisor, a refused caller,
/// another view of the files. Once the run is sent, every end is the supervisor's.
fn through_supervisor(a: &ExecArgs) -> Through {
    use crate::exec_socket::{run_request, socket_beside, ExecClient, ToClient};
    let path = socket_beside(&crate::paths::default_control_socket());
    let client = match ExecClient::connect(&path) {
        Ok(c) => c,
        Err(e) => return Through::Here(error_chain(&e)),
    };
    let cwd = match std::env::current_dir() {
        Ok(c) => c,
        Err(e) => return Through::Here(format!("cannot read the current directory: {e}")),
    };
    let workspace = a
        .workspace
        .as_ref()
        .map_or_else(|| cwd.clone(), |w| cwd.join(w));
    let req = match run_request(&a.command, &cwd, &workspace, std::env::vars_os(), a.run_as) {
        Ok(r) => r,
        Err(e) => return Through::Here(format!("{}: {e}", workspace.display())),
    };
    // Opened before anything runs, as for a run here (see there).
    let report_file = match &a.report_json {
        None => None,
        Some(f) => match open_report(f) {
            Ok(file) => Some(file),
            Err(e) => return Through::Ran(fail(&error_chain(&e), EXIT_SETUP)),
        },
    };
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    if let Err(e) = client.send_run(req, [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]) {
        return Through::Here(error_chain(&e));
    }
    loop {
        let msg = match client.next() {
            Ok(m) => m,
            Err(e) => {
                return Through::Ran(fail(
                    &format!(
                        "the run through the supervisor ended without a report: {}",
                        error_chain(&e)
                    ),
                    EXIT_SETUP,
                ))
            }
        };
        match msg {
            ToClient::Elsewhere { why } => return Through::Here(why),
            ToClient::Failed { message, code } => return Through::Ran(fail(&message, code)),
            ToClient::Ask {
                question,
                without_terminal,
            } => {
                // Without a terminal no answer goes back: the supervisor takes the hangup as
                // a no.
                if !stdin_is_tty() {
                    return Through::Ran(fail(&without_terminal, EXIT_DENIED));
                }
                if client.answer(ask_tty(&question)).is_err() {
                    return Through::Ran(fail("the supervisor went away", EXIT_SETUP));
                }
            }
            ToClient::Started {
                profile,
                policy,
                explain,
            } => {
                if a.verbose {
                    eprintln!(
                        "carapace: via=supervisor ({}): policy {policy}, profile `{profile}`\n{explain}",
                        client.path().display()
                    );
                }
            }
            ToClient::Exited {
                code,
                line,
                note,
                report,
            } => {
                if let Some(n) = note {
                    eprintln!("{n}");
                }
                if a.report || a.verbose {
                    eprintln!("{line} via=supervisor");
                }
                if let (Some(path), Some(file)) = (&a.report_json, report_file) {
                    write_report(path, file, &report_json(report, "supervisor"));
                }
                return Through::Ran(code);
            }
        }
    }
}

/// `carapace exec` in this process. `why`: why not through a supervisor (said with `-v`).
fn exec_here(a: ExecArgs, why: Option<String>) -> i32 {
    if let (true, Some(why)) = (a.verbose, &why) {
        eprintln!("carapace: via=local: {why}");
    }
    let policy = match load_policy(a.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            let shown = crate::errors::for_a_person(&e, crate::errors::stderr_wants_colour());
            return fail(&format!("the policy is invalid:\n{shown}"), EXIT_SETUP);
        }
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
        Err(e) => return fail(&error_chain(&e), e.exit_code()),
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
            Err(e) => return fail(&error_chain(&e), EXIT_SETUP),
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
            "carapace: running {} as host {}:{} (inside {}:{}), workspace owner {}, \
             landlock ABI {}{}",
            launch.program_inside().display(),
            launch.host_ids().uid,
            launch.host_ids().gid,
            inside.uid,
            inside.gid,
            launch
                .workspace_owner()
                .map_or_else(|| "none".to_string(), |(u, g)| format!("{u}:{g}")),
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
            Err(e) => {
                return fail(
                    &format!("cannot start the broker: {}", error_chain(&e)),
                    EXIT_SETUP,
                )
            }
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
        eprintln!("{} via=local", report.line());
    }
    if let (Some(path), Some(file)) = (&a.report_json, report_file) {
        write_report(path, file, &report_json(report.json(), "local"));
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
pub(super) fn say_limits(limits: &Limits, privilege: Privilege, verbose: bool) {
    match limits {
        Limits::Cgroup { name } if verbose && !privilege.is_root() => {
            eprintln!("carapace: rootless: using the delegated cgroup {name}");
        }
        Limits::Cgroup { .. } => {}
        Limits::Rlimits { why, added } => {
            eprintln!("{}", cgroup::NO_CGROUP_LINE);
            if verbose {
                eprintln!("carapace: rootless: {}", error_chain(why));
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
pub(super) fn start_broker(
    a: &ExecArgs,
    policy: &Policy,
    target: &Target,
    privilege: Privilege,
    workspace: &Path,
    profile: &str,
) -> Result<(BrokerHost, std::os::fd::OwnedFd), ExecError> {
    let state = StateDir::open(&crate::paths::state_dir_or_default(a.state_dir.as_deref()))?;
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
            owners_root: None,
            live: Default::default(),
            plans: Default::default(),
            cgroups: Default::default(),
            spawner: None,
        },
        approval_timeout: std::time::Duration::from_secs(a.approval_timeout),
        token_store: None,
        audit_rotation: carapace_broker::audit::Rotation::default(),
        workspaces: Vec::new(),
    })?;
    let (mine, theirs) = carapace_broker::protocol::seqpacket_pair()
        .map_err(crate::broker_host::BrokerHostError::Socket)?;
    let who = new_identity(Role::Tool, profile);
    if a.verbose {
        eprintln!("carapace: broker: serving {who} at fd 3");
    }
    if host.peers().serve(mine, who).is_none() {
        return Err(ExecError::NoHandler);
    }
    Ok((host, theirs))
}

/// Create/truncate the `--report-json` file, refusing symbolic links in every component.
pub(super) fn open_report(path: &Path) -> Result<std::fs::File, ExecError> {
    carapace_sandbox::fds::open_no_symlinks(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
        0o644,
    )
    .map(std::fs::File::from)
    .map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => ExecError::ReportLink {
            path: path.to_path_buf(),
        },
        _ => ExecError::Report {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Write the report into the file opened before the run. If the sandbox replaced the file at
/// that path meanwhile, the report goes to the original (now unlinked) file and we say so;
/// we never follow what is at the path now.
pub(super) fn write_report(path: &Path, mut file: std::fs::File, text: &str) {
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
