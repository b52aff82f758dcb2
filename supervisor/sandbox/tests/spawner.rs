//! The spawner process (carapace_sandbox::spawner) for real, as root: a tool started through
//! it is confined as one started in-process, is the caller's child in its cgroup and reaped
//! by the caller; a failing start says the same as in-process; the spawner dies with its
//! supervisor; of two, a killed one is left out, and once both are, starts fall back to
//! in-process.
//!
//! No test harness (`harness = false`): the spawner must be forked while the process has one
//! thread, which a libtest binary never has. Not root: it fails (a privileged test never
//! passes silently).

use std::io::Read as _;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_policy::Plan;
use carapace_sandbox::fds::Pipe;
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::program::OpenedProgram;
use carapace_sandbox::report::ExitReport;
use carapace_sandbox::run::{Limits, Run};
use carapace_sandbox::spawn::{ChildIo, LaunchOptions, SpawnError};
use carapace_sandbox::spawner::{start_run, Spawner};
use carapace_sandbox::Privilege;

const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");

type Check = fn(&Spawner, &Path) -> Result<(), String>;

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("tests/spawner.rs needs root (the tools are started as `carapace run` does)");
        return ExitCode::FAILURE;
    }
    // Something the spawner must not keep: a listening socket of ours.
    let held = std::net::TcpListener::bind("127.0.0.1:0");
    // First thing: the process has one thread now.
    let spawner = match Spawner::start(2) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("starting the spawner: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ws = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tempdir: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The last one kills the spawner.
    let checks: [(&str, Check); 7] = [
        (
            "the spawner is one small thread with only its socket",
            spawner_state,
        ),
        (
            "a tool through the spawner is confined as in-process",
            confined,
        ),
        (
            "a tool through the spawner is our child, in its cgroup, reaped by us",
            child_in_cgroup_reaped,
        ),
        (
            "a failing child step says the same stage and message",
            child_failure_same,
        ),
        (
            "a failing prepare says the same message",
            prepare_failure_same,
        ),
        ("the spawner dies with its supervisor", dies_with_supervisor),
        (
            "a killed spawner is left out; once all are, tools start in-process",
            fallback,
        ),
    ];
    if let Err(e) = held {
        eprintln!("bind: {e}");
        return ExitCode::FAILURE;
    }
    let mut failed = 0;
    for (name, check) in checks {
        match check(&spawner, ws.path()) {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        checks.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn tool_plan() -> Result<Plan, String> {
    carapace_policy::Policy::parse(DEFAULT_POLICY, "default")
        .map_err(|e| format!("the default policy: {e}"))?
        .compile("tool", &carapace_sandbox::landlock::target())
        .map_err(|e| format!("the tool profile: {e}"))
}

fn run_of(argv: &[&str], ws: &Path) -> Result<Run, String> {
    let program = std::fs::canonicalize(argv[0]).map_err(|e| format!("{}: {e}", argv[0]))?;
    Ok(Run {
        name: "t-spawner".to_string(),
        landlock_abi: carapace_sandbox::landlock::probe_abi(),
        options: LaunchOptions {
            program: Arc::new(OpenedProgram::open(&program).map_err(|e| e.to_string())?),
            argv0: argv[0].into(),
            args: argv[1..].iter().map(Into::into).collect(),
            workspace: Some(ws.to_path_buf()),
            privilege: Privilege::Root,
            run_as: RunAs::Auto,
            env: Vec::new(),
            broker: false,
            listener: false,
            supervisor_env: Vec::new(),
        },
    })
}

/// Start `argv` under `plan`, through `spawner` (None: in-process); `during` looks at the
/// running init; its stdout and report.
fn run_capture(
    spawner: Option<&Spawner>,
    plan: Plan,
    argv: &[&str],
    ws: &Path,
    during: impl FnOnce(libc::pid_t, &Limits) -> Result<(), String>,
) -> Result<(String, ExitReport), SpawnError> {
    let run = run_of(argv, ws).map_err(|message| SpawnError::Remote {
        stage: None,
        message,
    })?;
    let out = Pipe::new("stdout")?;
    let io = ChildIo {
        stdout: Some(out.write.as_fd()),
        ..ChildIo::default()
    };
    let started = start_run(spawner, plan, &run, None, io)?;
    let seen = during(started.pid(), started.limits());
    drop(out.write);
    let mut text = String::new();
    let _ = std::fs::File::from(out.read).read_to_string(&mut text);
    let mut ended = started.wait();
    let _ = ended.remove_cgroup();
    if let Err(e) = seen {
        return Err(SpawnError::Remote {
            stage: None,
            message: e,
        });
    }
    Ok((text, ended.report?))
}

fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| *k == key))
        .map(|(_, v)| v.trim().to_string())
}

fn me() -> String {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }.to_string()
}

fn spawner_state(sp: &Spawner, _: &Path) -> Result<(), String> {
    let pids = sp.pids();
    if pids.len() != 2 || sp.alive_pids() != pids {
        return Err(format!("two spawners asked for, {pids:?} started"));
    }
    pids.into_iter().try_for_each(one_spawner_state)
}

/// One spawner: its name, one thread, our child, only its socket beyond stdio (the second
/// spawner, forked after the first, must not hold our end of the first one's socket), and as
/// root its own network namespace and at most one made ahead for the next sandbox.
fn one_spawner_state(pid: libc::pid_t) -> Result<(), String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    for (k, want) in [("Name", "carapace-spawn"), ("Threads", "1")] {
        let got = status_field(&status, k);
        if got.as_deref() != Some(want) {
            return Err(format!("{k} is {got:?}, not {want:?}"));
        }
    }
    if status_field(&status, "PPid") != Some(me()) {
        return Err(format!("its parent is not us: {status}"));
    }
    // Beyond stdio: its socket, and the numbers of what it inherited, now /dev/null.
    let links: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let to = std::fs::read_link(e.path()).ok()?;
            Some((fd, to.to_string_lossy().into_owned()))
        })
        .collect();
    let sockets = links
        .iter()
        .filter(|(fd, to)| *fd > 2 && to.starts_with("socket:"))
        .count();
    let ours = std::fs::read_link("/proc/self/ns/net")
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    let nets: Vec<&String> = links
        .iter()
        .filter(|(fd, to)| *fd > 2 && to.starts_with("net:["))
        .map(|(_, to)| to)
        .collect();
    let home = nets.iter().filter(|n| ***n == ours).count();
    let ahead = nets.len() - home;
    let other: Vec<&(i32, String)> = links
        .iter()
        .filter(|(fd, to)| {
            *fd > 2 && !to.starts_with("socket:") && !to.starts_with("net:[") && to != "/dev/null"
        })
        .collect();
    if sockets != 1 || !other.is_empty() || home > 1 || ahead > 1 {
        return Err(format!(
            "descriptors {links:?}: want stdio, its socket, /dev/null, its own network \
             namespace ({ours}) and at most one other, made ahead"
        ));
    }
    Ok(())
}

fn confined(sp: &Spawner, ws: &Path) -> Result<(), String> {
    let argv = ["/usr/bin/cat", "/proc/self/status"];
    let mut seen = Vec::new();
    for via in [Some(sp), None] {
        let (out, report) = run_capture(via, tool_plan()?, &argv, ws, |_, _| Ok(()))
            .map_err(|e| carapace_sandbox::error_chain(&e))?;
        if report.exit_code() != 0 {
            return Err(format!("cat exited {}", report.exit_code()));
        }
        let fields: Vec<Option<String>> = ["Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "Uid"]
            .iter()
            .map(|k| status_field(&out, k))
            .collect();
        seen.push(fields);
    }
    let want = [Some("2"), Some("1"), Some("0000000000000000")];
    for (i, w) in want.iter().enumerate() {
        if seen[0][i].as_deref() != *w {
            return Err(format!("through the spawner: {:?}", seen[0]));
        }
    }
    // Everything but the per-run uid (numbered by the starting thread) is the same.
    if seen[0][..4] != seen[1][..4] {
        return Err(format!("spawner {:?} vs in-process {:?}", seen[0], seen[1]));
    }
    Ok(())
}

fn child_in_cgroup_reaped(sp: &Spawner, ws: &Path) -> Result<(), String> {
    let mut init = 0;
    let (_, report) = run_capture(
        Some(sp),
        tool_plan()?,
        &["/usr/bin/sleep", "0.3"],
        ws,
        |pid, limits| {
            init = pid;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map_err(|e| e.to_string())?;
            if status_field(&status, "PPid") != Some(me()) {
                return Err(format!("the sandbox's init is not our child: {status}"));
            }
            let Limits::Cgroup { name } = limits else {
                return Err(format!("no cgroup: {limits:?}"));
            };
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map_err(|e| e.to_string())?;
            if !cg.contains(name.as_str()) {
                return Err(format!("the init is not in {name}: {cg}"));
            }
            Ok(())
        },
    )
    .map_err(|e| carapace_sandbox::error_chain(&e))?;
    if report.exit_code() != 0 || report.wall < Duration::from_millis(250) {
        return Err(format!("{report:?}"));
    }
    if Path::new(&format!("/proc/{init}")).exists() {
        return Err(format!("the init {init} is still there (not reaped)"));
    }
    Ok(())
}

/// `plan` fails to start both through `sp` and in-process, with the same text.
fn both_fail(sp: &Spawner, plan: Plan, ws: &Path) -> Result<(SpawnError, SpawnError), String> {
    let mut errs = Vec::new();
    for via in [Some(sp), None] {
        match run_capture(via, plan.clone(), &["/usr/bin/true"], ws, |_, _| Ok(())) {
            Ok((_, r)) => return Err(format!("started: {r:?}")),
            Err(e) => errs.push(e),
        }
    }
    let inproc = errs.pop().ok_or("no error")?;
    let remote = errs.pop().ok_or("no error")?;
    if carapace_sandbox::error_chain(&remote) != carapace_sandbox::error_chain(&inproc) {
        return Err(format!(
            "spawner said {:?}, in-process {:?}",
            carapace_sandbox::error_chain(&remote),
            carapace_sandbox::error_chain(&inproc)
        ));
    }
    Ok((remote, inproc))
}

fn child_failure_same(sp: &Spawner, ws: &Path) -> Result<(), String> {
    let mut plan = tool_plan()?;
    plan.cwd = "/no-such-directory".into();
    let (remote, inproc) = both_fail(sp, plan, ws)?;
    match (&remote, &inproc) {
        (SpawnError::Remote { stage: Some(s), .. }, SpawnError::Child { stage, .. })
            if s == stage && *stage == "chdir" =>
        {
            Ok(())
        }
        _ => Err(format!("{remote:?} vs {inproc:?}")),
    }
}

fn prepare_failure_same(sp: &Spawner, ws: &Path) -> Result<(), String> {
    // A profile that would not let its program start: refused before any process.
    let mut plan = tool_plan()?;
    plan.seccomp.allowed.retain(|s| s != "execveat");
    plan.seccomp.conditional.retain(|c| c.syscall != "execveat");
    plan.seccomp.default_action = carapace_policy::plan::SeccompAction::Errno(1);
    let (remote, _) = both_fail(sp, plan, ws)?;
    let text = carapace_sandbox::error_chain(&remote);
    if !text.contains("execveat") {
        return Err(text);
    }
    Ok(())
}

fn dies_with_supervisor(_: &Spawner, _: &Path) -> Result<(), String> {
    let p = Pipe::new("pid").map_err(|e| e.to_string())?;
    // SAFETY: this process has one thread (the checks run on it and start none), so the child
    // may start a spawner of its own; it only does that, writes its pid and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let code = match Spawner::start(1) {
            Ok(s) => {
                let b = s.pids()[0].to_ne_bytes();
                // SAFETY: writing 4 bytes from a local array to our pipe.
                unsafe { libc::write(p.write.as_raw_fd(), b.as_ptr().cast(), 4) };
                0
            }
            Err(_) => 1,
        };
        // SAFETY: ends the forked child at once, without the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(p.write);
    let mut b = [0u8; 4];
    let got = std::fs::File::from(p.read).read(&mut b);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if got.ok() != Some(4) {
        return Err("the child did not start a spawner".to_string());
    }
    let pid = i32::from_ne_bytes(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()));
        match state {
            None | Some('Z') | Some('X') => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("spawner {pid} outlived its supervisor: {state:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn fallback(sp: &Spawner, ws: &Path) -> Result<(), String> {
    let pids = sp.pids();
    let cat = |what: &str| -> Result<(), String> {
        let (out, report) = run_capture(
            Some(sp),
            tool_plan()?,
            &["/usr/bin/cat", "/proc/self/status"],
            ws,
            |_, _| Ok(()),
        )
        .map_err(|e| format!("{what}: {}", carapace_sandbox::error_chain(&e)))?;
        if report.exit_code() != 0 || status_field(&out, "Seccomp").as_deref() != Some("2") {
            return Err(format!("{what}: {report:?}: {out}"));
        }
        Ok(())
    };
    // One of two killed: the other takes the tools.
    // SAFETY: signalling our own child, a spawner, by its pid (not reaped: no reuse).
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    cat("with one spawner left")?;
    if sp.alive_pids() != [pids[1]] {
        return Err(format!(
            "after killing {}, alive: {:?}",
            pids[0],
            sp.alive_pids()
        ));
    }
    let said = sp.describe();
    if said != format!("spawner (pid {}; 1 of 2 gone)", pids[1]) {
        return Err(format!("described as {said:?}"));
    }
    // Both killed: in-process.
    // SAFETY: as above, the other spawner.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    cat("with no spawner left")?;
    if sp.is_alive() {
        return Err("a spawner is still taken for alive".to_string());
    }
    let said = sp.describe();
    if said != "in-process (the spawners are gone)" {
        return Err(format!("described as {said:?}"));
    }
    Ok(())
}
