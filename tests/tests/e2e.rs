//! End-to-end tests of the `carapace` binary: allowed programs run and see their workspace,
//! denied ones do not start, `ask` without a terminal is a denial that says how to allow,
//! exit codes propagate, timeouts and supervisor death kill the whole tree, limits hold and are
//! reported, real tools work confined, and `policy check` / `policy explain` do their job.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_tests::*;

const T: Duration = Duration::from_secs(120);

/// A test workspace plus a scratch directory for policies and reports.
struct Env {
    ws: tempfile::TempDir,
    scratch: tempfile::TempDir,
}

fn env() -> Option<Env> {
    if !privileged() {
        return None;
    }
    let _ = carapace_bin();
    Some(Env {
        ws: tempdir("carapace-e2e-ws-"),
        scratch: tempdir("carapace-e2e-"),
    })
}

impl Env {
    fn ws(&self) -> &Path {
        self.ws.path()
    }

    /// The default policy plus a profile `e2e` (= tool, with `limits` overridden) and a rule
    /// allowing `programs` under it.
    fn policy(&self, limits: &str, programs: &[&str]) -> PathBuf {
        let progs: Vec<String> = programs.iter().map(|p| format!("\"{p}\"")).collect();
        let limits = if limits.is_empty() {
            String::new()
        } else {
            format!("[profiles.e2e.limits]\n{limits}\n")
        };
        let extra = format!(
            "[profiles.e2e]\nextends = \"tool\"\nwhy = \"end-to-end tests\"\n{limits}\n\
             [[exec]]\nwhy = \"end-to-end tests\"\nprograms = [{}]\nprofile = \"e2e\"\n\
             approval = \"allow\"\n",
            progs.join(", ")
        );
        let p = self
            .scratch
            .path()
            .join(format!("{}.toml", unique("policy")));
        fs::write(
            &p,
            insert_before_first_exec(&default_policy_without_python_module_rule(), &extra),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        p
    }

    fn exec(&self, policy: Option<&Path>, program: &str, args: &[&str]) -> Command {
        carapace_exec(policy, self.ws(), &[], program, args)
    }
}

fn ok(o: &Outcome) {
    assert_eq!(o.code, Some(0), "expected success:\n{}", o.describe());
}

// ------------------------------------------------------------------------------------------
// Allowed programs run and see their workspace

/// `ls` under the embedded default policy lists a file the test created in the workspace.
#[test]
fn e2e_ls_sees_workspace_file() {
    let Some(e) = env() else { return };
    let name = unique("hello");
    fs::write(e.ws().join(&name), "hi").unwrap_or_else(|x| panic!("{x}"));
    let o = run(&mut e.exec(None, "ls", &["-la"]), T);
    ok(&o);
    assert!(
        o.stdout.contains(&name),
        "ls did not show {name}:\n{}",
        o.describe()
    );
}

/// Without --workspace, the current directory is the workspace.
#[test]
fn e2e_workspace_defaults_to_current_directory() {
    let Some(e) = env() else { return };
    let name = unique("cwd-file");
    fs::write(e.ws().join(&name), "hi").unwrap_or_else(|x| panic!("{x}"));
    let mut c = Command::new(carapace_bin());
    c.args(["exec", "--", "ls"])
        .current_dir(e.ws())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null());
    let o = run(&mut c, T);
    ok(&o);
    assert!(o.stdout.contains(&name), "{}", o.describe());
}

/// `pwd` inside is the workspace mount point.
#[test]
fn e2e_cwd_is_workspace() {
    let Some(e) = env() else { return };
    let o = run(&mut e.exec(None, "pwd", &[]), T);
    ok(&o);
    assert_eq!(o.stdout.trim(), WS, "{}", o.describe());
}

fn chown_ws(e: &Env, uid: u32, gid: u32) {
    std::os::unix::fs::chown(e.ws(), Some(uid), Some(gid)).unwrap_or_else(|x| panic!("{x}"));
}

/// A file written by python lands on the host owned by the workspace's owner (idmapped mount),
/// not by root and not by the sandbox's host uid.
#[test]
fn e2e_python_write_owned_by_workspace_owner() {
    let Some(e) = env() else { return };
    chown_ws(&e, 1234, 2345);
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "/usr/bin/python3",
            &["-c", "open('out.txt', 'w').write('from python\\n')"],
        ),
        T,
    );
    ok(&o);
    let f = e.ws().join("out.txt");
    let m = fs::metadata(&f)
        .unwrap_or_else(|x| panic!("no out.txt on the host ({x}):\n{}", o.describe()));
    assert_eq!((m.uid(), m.gid()), (1234, 2345), "owner on the host");
    assert_eq!(fs::read_to_string(&f).unwrap_or_default(), "from python\n");
}

/// The same through `sh -c` with a redirection, with an explicit --run-as.
#[test]
fn e2e_sh_write_owned_by_workspace_owner() {
    let Some(e) = env() else { return };
    chown_ws(&e, 1234, 2345);
    let p = e.policy("", &["/bin/sh"]);
    let mut c = carapace_exec(
        Some(&p),
        e.ws(),
        &["--run-as", "4321:4321"],
        "/bin/sh",
        &["-c", "echo from sh > sh.txt && mkdir sub && echo x > sub/y"],
    );
    let o = run(&mut c, T);
    ok(&o);
    for f in ["sh.txt", "sub", "sub/y"] {
        let m =
            fs::metadata(e.ws().join(f)).unwrap_or_else(|x| panic!("{f}: {x}\n{}", o.describe()));
        assert_eq!((m.uid(), m.gid()), (1234, 2345), "{f} owner on the host");
    }
}

/// Inside, the program is the profile's user (1000:1000) on hostname "carapace", in its own pid
/// namespace as pid 2: pid 1 is carapace's minimal init, so the program's own signals behave as
/// on a host (a pid-namespace init ignores signals it has no handler for).
#[test]
fn e2e_identity_inside() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "/usr/bin/python3",
            &["-c", "import os, socket; print(os.getuid(), os.getgid(), socket.gethostname(), os.getpid())"],
        ),
        T,
    );
    ok(&o);
    assert_eq!(o.stdout.trim(), "1000 1000 carapace 2", "{}", o.describe());
}

/// stdin and stdout pass through.
#[test]
fn e2e_stdio_passthrough() {
    let Some(e) = env() else { return };
    let mut c = e.exec(None, "cat", &[]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|x| panic!("{x}"));
    if let Some(mut i) = child.stdin.take() {
        i.write_all(b"through the sandbox\n")
            .unwrap_or_else(|x| panic!("{x}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through the sandbox\n"
    );
}

/// The environment is scrubbed: only the policy's pass/set variables exist.
#[test]
fn e2e_environment_scrubbed() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let mut c = e.exec(
        Some(&p),
        "/usr/bin/python3",
        &["-c", "import os; print(sorted(os.environ.items()))"],
    );
    c.env("SECRET_TOKEN", "hunter2").env("LANG", "C.UTF-8");
    let o = run(&mut c, T);
    ok(&o);
    assert!(!o.stdout.contains("hunter2"), "{}", o.describe());
    assert!(
        o.stdout.contains("('HOME', '/workspace')"),
        "{}",
        o.describe()
    );
    assert!(
        o.stdout.contains("('LANG', 'C.UTF-8')"),
        "LANG is passed: {}",
        o.describe()
    );
}

// ------------------------------------------------------------------------------------------
// Denied programs do not start

/// A `deny` rule: exit 125, the program never ran (its marker file does not appear).
#[test]
fn e2e_denied_rule_does_not_start() {
    let Some(e) = env() else { return };
    let extra = "[[exec]]\nwhy = \"e2e: touch is forbidden\"\nprogram = \"/usr/bin/touch\"\napproval = \"deny\"\n";
    let p = e.scratch.path().join("deny.toml");
    fs::write(&p, insert_before_first_exec(&default_policy_text(), extra))
        .unwrap_or_else(|x| panic!("{x}"));
    let o = run(
        &mut e.exec(Some(&p), "/usr/bin/touch", &["/workspace/marker"]),
        T,
    );
    assert_eq!(o.code, Some(EXIT_DENIED), "{}", o.describe());
    assert!(!e.ws().join("marker").exists(), "the denied program ran");
    assert!(o.stderr.contains("denied"), "{}", o.describe());
}

/// No rule matches: denied (nothing runs that no rule allows).
#[test]
fn e2e_unmatched_program_denied() {
    let Some(e) = env() else { return };
    let p = e.scratch.path().join("only-ls.toml");
    let default = default_policy_text();
    let cut = default.find("\n[[exec]]").unwrap_or(default.len());
    let text = format!(
        "{}\n[[exec]]\nwhy = \"only ls\"\nprogram = \"/usr/bin/ls\"\nprofile = \"tool\"\napproval = \"allow\"\n",
        &default[..cut]
    );
    fs::write(&p, text).unwrap_or_else(|x| panic!("{x}"));
    let o = run(
        &mut e.exec(Some(&p), "/usr/bin/touch", &["/workspace/marker"]),
        T,
    );
    assert_eq!(o.code, Some(EXIT_DENIED), "{}", o.describe());
    assert!(!e.ws().join("marker").exists(), "the unmatched program ran");
    let o = run(&mut e.exec(Some(&p), "/usr/bin/ls", &[]), T);
    ok(&o);
}

/// `ask` without a terminal is a denial (125) whose message says how to allow it.
#[test]
fn e2e_ask_without_terminal_is_denied_with_howto() {
    let Some(e) = env() else { return };
    let o = run(
        &mut e.exec(None, "/usr/bin/touch", &["/workspace/marker"]),
        T,
    );
    assert_eq!(o.code, Some(EXIT_DENIED), "{}", o.describe());
    assert!(
        !e.ws().join("marker").exists(),
        "the program ran without approval"
    );
    let err = o.stderr.to_lowercase();
    assert!(err.contains("terminal"), "does not say why: {}", o.stderr);
    assert!(
        err.contains("approval = \"allow\"") && err.contains("--policy"),
        "does not say how to allow it: {}",
        o.stderr
    );
}

/// An invalid policy: carapace cannot start anything (126) and locates the error.
#[test]
fn e2e_invalid_policy_cannot_start() {
    let Some(e) = env() else { return };
    let p = e.scratch.path().join("bad.toml");
    fs::write(&p, "version = 1\n[profiles.x]\nbogus = 1\n").unwrap_or_else(|x| panic!("{x}"));
    let o = run(&mut e.exec(Some(&p), "/usr/bin/true", &[]), T);
    assert_eq!(o.code, Some(EXIT_CANNOT_START), "{}", o.describe());
    assert!(o.stderr.contains("bad.toml:3:1"), "{}", o.describe());
}

// ------------------------------------------------------------------------------------------
// Exit codes

/// The program's own exit code comes back.
#[test]
fn e2e_exit_code_propagates() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/bin/sh"]);
    let o = run(&mut e.exec(Some(&p), "/bin/sh", &["-c", "exit 7"]), T);
    assert_eq!(o.code, Some(7), "{}", o.describe());
    let o = run(&mut e.exec(None, "false", &[]), T);
    assert_eq!(o.code, Some(1), "{}", o.describe());
}

/// Killed by signal N: 128+N, like a shell (SIGTERM -> 143). The program kills itself with
/// SIGTERM; `sleep 5` only runs if the signal was ignored (as it is for a pid-namespace init
/// without a handler).
#[test]
fn e2e_signal_exit_code() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/bin/sh"]);
    let o = run(
        &mut e.exec(Some(&p), "/bin/sh", &["-c", "kill -TERM $$; sleep 5"]),
        T,
    );
    assert_eq!(o.code, Some(143), "{}", o.describe());
}

/// A program that SIGKILLs itself: 137.
#[test]
fn e2e_self_sigkill_exit_code() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "/usr/bin/python3",
            &[
                "-c",
                "import os, signal; os.kill(os.getpid(), signal.SIGKILL); print('survived')",
            ],
        ),
        T,
    );
    assert_eq!(o.code, Some(137), "{}", o.describe());
    assert!(!o.stdout.contains("survived"), "{}", o.describe());
}

/// abort(): SIGABRT, 134 (not a SIGSEGV from glibc's fallback when SIGABRT is ignored).
#[test]
fn e2e_abort_exit_code() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "/usr/bin/python3",
            &["-c", "import os; os.abort()"],
        ),
        T,
    );
    assert_eq!(o.code, Some(134), "{}", o.describe());
}

// ------------------------------------------------------------------------------------------
// Timeouts, supervisor death, limits

fn sleeper_script(marker: &str) -> String {
    // A grandchild in the background, and one detached with setsid -f into its own session.
    format!(
        "python3 -c 'import time; time.sleep(600)' {marker} & \
         setsid -f python3 -c 'import time; time.sleep(600)' {marker}-setsid; sleep 600"
    )
}

fn gone_within(marker: &str, d: Duration) -> Vec<(u32, String)> {
    let start = Instant::now();
    loop {
        let left = host_processes_with(marker);
        if left.is_empty() || start.elapsed() > d {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A wall-time timeout exits 124 in time and kills the whole tree (grandchildren included).
#[test]
fn e2e_timeout_kills_whole_tree() {
    let Some(e) = env() else { return };
    let p = e.policy("wall_time = \"2s\"", &["/bin/sh"]);
    let marker = unique("carapace-e2e-grandchild");
    let o = run(
        &mut e.exec(Some(&p), "/bin/sh", &["-c", &sleeper_script(&marker)]),
        T,
    );
    assert_eq!(o.code, Some(EXIT_TIMEOUT), "{}", o.describe());
    assert!(
        o.elapsed < Duration::from_secs(2 + 5),
        "took {:?}",
        o.elapsed
    );
    let left = gone_within(&marker, Duration::from_secs(2));
    assert!(left.is_empty(), "processes survived the timeout: {left:?}");
}

/// When the supervisor is SIGKILLed, the whole sandboxed tree dies too.
#[test]
fn e2e_supervisor_death_kills_tree() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/bin/sh"]);
    let marker = unique("carapace-e2e-orphan");
    let mut c = e.exec(Some(&p), "/bin/sh", &["-c", &sleeper_script(&marker)]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap_or_else(|x| panic!("{x}"));
    let start = Instant::now();
    while host_processes_with(&format!("{marker}-setsid")).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the sandboxed tree never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let left = gone_within(&marker, Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "processes survived the supervisor's death: {left:?}"
    );
}

/// Memory limit: OOM-killed (137), reported on stderr and in --report-json.
#[test]
fn e2e_memory_limit_oom_reported() {
    let Some(e) = env() else { return };
    let p = e.policy("memory = \"64MiB\"", &["/usr/bin/python3"]);
    let report = e.scratch.path().join("report.json");
    let mut c = carapace_exec(
        Some(&p),
        e.ws(),
        &["--report-json", &report.display().to_string()],
        "/usr/bin/python3",
        &["-c", "b = b'x' * (512 << 20); print('allocated')"],
    );
    let o = run(&mut c, T);
    assert_eq!(o.code, Some(137), "{}", o.describe());
    assert!(!o.stdout.contains("allocated"), "{}", o.describe());
    assert!(o.stderr.to_lowercase().contains("oom"), "{}", o.describe());
    let r = read_report(&report);
    assert_eq!(
        r.get("oom_killed"),
        Some(&serde_json::Value::Bool(true)),
        "{r}"
    );
}

/// pids limit: forking stops at the limit.
#[test]
fn e2e_pids_limit_holds() {
    let Some(e) = env() else { return };
    let p = e.policy("pids = 16", &["/usr/bin/python3"]);
    let script = "import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)\nelse:\n    print('unbounded', n)\n";
    let o = run(
        &mut e.exec(Some(&p), "/usr/bin/python3", &["-c", script]),
        T,
    );
    ok(&o);
    let n: u32 = o
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        o.stdout.starts_with("stopped") && n < 16,
        "{}",
        o.describe()
    );
}

/// --report-json and --report describe a normal run.
#[test]
fn e2e_report() {
    let Some(e) = env() else { return };
    let report = e.scratch.path().join("r.json");
    let mut c = carapace_exec(
        None,
        e.ws(),
        &["--report", "--report-json", &report.display().to_string()],
        "true",
        &[],
    );
    let o = run(&mut c, T);
    ok(&o);
    let line = o
        .stderr
        .lines()
        .find(|l| l.starts_with("carapace: exit="))
        .unwrap_or_else(|| panic!("no report line:\n{}", o.describe()));
    for k in [
        "exit=0",
        "wall=",
        "cpu=",
        "peak_mem=",
        "oom=false",
        "timeout=false",
    ] {
        assert!(line.contains(k), "report line lacks {k}: {line}");
    }
    let r = read_report(&report);
    assert_eq!(r.get("exit_code"), Some(&serde_json::json!(0)), "{r}");
    assert_eq!(r.get("timed_out"), Some(&serde_json::json!(false)), "{r}");
    assert!(r.get("wall_ms").is_some_and(|v| v.is_u64()), "{r}");
}

// ------------------------------------------------------------------------------------------
// Real tools

/// `git status` in a repository (embedded default policy allows it).
#[test]
fn e2e_git_status() {
    let Some(e) = env() else { return };
    let git = |args: &[&str]| {
        let s = Command::new("git")
            .args(args)
            .current_dir(e.ws())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .unwrap_or_else(|x| panic!("git: {x}"));
        assert!(
            s.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
    };
    git(&["init", "-q"]);
    fs::write(e.ws().join("tracked.txt"), "one\n").unwrap_or_else(|x| panic!("{x}"));
    git(&["add", "tracked.txt"]);
    git(&["commit", "-q", "-m", "first"]);
    fs::write(e.ws().join("tracked.txt"), "two\n").unwrap_or_else(|x| panic!("{x}"));
    fs::write(e.ws().join("new.txt"), "new\n").unwrap_or_else(|x| panic!("{x}"));
    let o = run(&mut e.exec(None, "git", &["status"]), T);
    ok(&o);
    assert!(
        o.stdout.contains("modified:") && o.stdout.contains("tracked.txt"),
        "{}",
        o.describe()
    );
    assert!(o.stdout.contains("new.txt"), "{}", o.describe());
    let o = run(&mut e.exec(None, "git", &["log", "--oneline"]), T);
    ok(&o);
    assert!(o.stdout.contains("first"), "{}", o.describe());
}

/// `grep -r` over the workspace.
#[test]
fn e2e_grep_recursive() {
    let Some(e) = env() else { return };
    fs::create_dir_all(e.ws().join("a/b")).unwrap_or_else(|x| panic!("{x}"));
    fs::write(e.ws().join("a/one.txt"), "needle here\n").unwrap_or_else(|x| panic!("{x}"));
    fs::write(e.ws().join("a/b/two.txt"), "and a needle\n").unwrap_or_else(|x| panic!("{x}"));
    fs::write(e.ws().join("three.txt"), "hay\n").unwrap_or_else(|x| panic!("{x}"));
    let o = run(&mut e.exec(None, "grep", &["-r", "needle", "."]), T);
    ok(&o);
    assert!(
        o.stdout.contains("a/one.txt") && o.stdout.contains("a/b/two.txt"),
        "{}",
        o.describe()
    );
    assert!(!o.stdout.contains("three.txt"), "{}", o.describe());
}

/// `python3 -c` under a policy that allows it.
#[test]
fn e2e_python3_c() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "python3",
            &[
                "-c",
                "import json, subprocess, threading, tempfile; print(6 * 7)",
            ],
        ),
        T,
    );
    ok(&o);
    assert_eq!(o.stdout.trim(), "42", "{}", o.describe());
}

// ------------------------------------------------------------------------------------------
// policy check / explain (no root needed)

fn carapace(args: &[&str]) -> Outcome {
    let mut c = Command::new(carapace_bin());
    c.args(args).stdin(Stdio::null());
    run(&mut c, T)
}

/// A broken policy: located error (file:line:col), non-zero exit.
#[test]
fn e2e_policy_check_broken_is_located() {
    let d = tempdir("carapace-check-");
    let p = d.path().join("broken.toml");
    fs::write(
        &p,
        "version = 1\n\n[profiles.tool]\nwhy = \"x\"\nhostname = 5\n",
    )
    .unwrap_or_else(|x| panic!("{x}"));
    let o = carapace(&["policy", "check", &p.display().to_string()]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        all.contains("broken.toml:5:12"),
        "no file:line:col:\n{}",
        o.describe()
    );
}

/// Several error classes at once are all reported with their locations.
#[test]
fn e2e_policy_check_reports_every_error() {
    let d = tempdir("carapace-check-");
    let p = d.path().join("many.toml");
    fs::write(
        &p,
        "version = 1\n[profiles.t]\nwhy = \"x\"\n[profiles.t.seccomp]\nallow = [\"no_such_syscall\"]\n\
         [[exec]]\nwhy = \"x\"\nprogram = \"relative/path\"\nprofile = \"missing\"\napproval = \"allow\"\n",
    )
    .unwrap_or_else(|x| panic!("{x}"));
    let o = carapace(&["policy", "check", &p.display().to_string()]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    let all = format!("{}{}", o.stdout, o.stderr);
    for loc in ["many.toml:5:", "many.toml:8:", "many.toml:9:"] {
        assert!(all.contains(loc), "missing {loc}:\n{all}");
    }
}

/// The default policy passes its own check (including its [[test]] examples).
#[test]
fn e2e_policy_check_default_ok() {
    let p = repo_root().join("policies/default.toml");
    let o = carapace(&["policy", "check", &p.display().to_string()]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
}

/// A failing [[test]] example makes `check` fail.
#[test]
fn e2e_policy_check_failing_example() {
    let d = tempdir("carapace-check-");
    let p = d.path().join("ex.toml");
    let text = format!(
        "{}\n[[test]]\ncommand = [\"/usr/bin/ls\"]\nexpect = \"deny\"\n",
        default_policy_text()
    );
    fs::write(&p, text).unwrap_or_else(|x| panic!("{x}"));
    let o = carapace(&["policy", "check", &p.display().to_string()]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
}

/// `explain` names the rule (line, why) and prints the effective confinement.
#[test]
fn e2e_policy_explain() {
    let p = repo_root().join("policies/default.toml");
    let o = carapace(&[
        "policy",
        "explain",
        &p.display().to_string(),
        "--",
        "/usr/bin/ls",
        "-la",
    ]);
    ok(&o);
    let t = o.stdout.to_lowercase();
    for w in [
        "allow",
        "rule",
        "line",
        "read-only inspection tools",
        "profile",
        "seccomp",
        "landlock",
        "/workspace",
        "/usr",
        "512 mib",
        "namespaces",
    ] {
        assert!(t.contains(w), "explain lacks `{w}`:\n{}", o.stdout);
    }
    // A refused set-uid helper that exists on this host.
    let suid = [
        "/usr/bin/su",
        "/usr/bin/passwd",
        "/usr/bin/mount",
        "/usr/bin/sudo",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or("/usr/bin/su");
    let o = carapace(&[
        "policy",
        "explain",
        &p.display().to_string(),
        "--",
        suid,
        "id",
    ]);
    assert!(
        format!("{}{}", o.stdout, o.stderr)
            .to_lowercase()
            .contains("deny"),
        "{}",
        o.describe()
    );
}

// ------------------------------------------------------------------------------------------
// /dev/shm, the init's seccomp filter, per-run host uids, stale cgroups

/// python's multiprocessing works (its semaphores need a writable /dev/shm, now a private tmpfs
/// of the run, mounted beneath the read-only minimal /dev), and a program written to /dev/shm
/// cannot be executed (noexec, Landlock).
#[test]
fn e2e_python_multiprocessing_dev_shm() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.exec(
            Some(&p),
            "python3",
            &[
                "-c",
                "import multiprocessing as m; print(m.Pool(2).map(abs,[-1,-2]))",
            ],
        ),
        T,
    );
    ok(&o);
    assert_eq!(o.stdout.trim(), "[1, 2]", "{}", o.describe());

    // Writable and private, but not executable.
    let marker = unique("carapace-shm");
    let script = format!(
        "import os, shutil, subprocess\n\
         p = '/dev/shm/{marker}'\n\
         shutil.copy('/usr/bin/true', p)\n\
         os.chmod(p, 0o755)\n\
         print('WROTE', os.path.getsize(p) > 0)\n\
         try:\n    subprocess.run([p]); print('EXECUTED')\n\
         except PermissionError as x: print('DENIED', x.errno)\n"
    );
    let o = run(&mut e.exec(Some(&p), "python3", &["-c", &script]), T);
    ok(&o);
    assert!(o.stdout.contains("WROTE True"), "{}", o.describe());
    assert!(o.stdout.contains("DENIED 13"), "{}", o.describe());
    assert!(!o.stdout.contains("EXECUTED"), "{}", o.describe());
    assert!(
        !Path::new("/dev/shm").join(&marker).exists(),
        "the sandbox's /dev/shm is the host's"
    );
}

/// Host pids of the direct children of `pid` (from /proc/PID/task/*/children).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let c = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(c.split_whitespace().filter_map(|w| w.parse::<u32>().ok()));
    }
    out
}

/// The value of `key:` in /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Wait until the carapace process `sup` has started the sandbox: returns the host pid of
/// its init (pid 1 inside) once the init has forked the program.
fn wait_for_init(sup: u32) -> u32 {
    let start = Instant::now();
    loop {
        if let Some(init) = children_of(sup)
            .into_iter()
            .find(|c| !children_of(*c).is_empty())
        {
            return init;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "carapace {sup} never started its sandbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills and reaps a spawned process when dropped (also when the test panics).
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sandbox's init (pid 1) runs under its own seccomp filter (mode 2, one filter), read
/// from the host while the program sleeps; the program under the plan's filters.
#[test]
fn e2e_init_runs_under_its_own_seccomp_filter() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/sleep"]);
    let mut c = e.exec(Some(&p), "/usr/bin/sleep", &["5"]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let sup = Reap(c.spawn().unwrap_or_else(|x| panic!("{x}")));
    let init = wait_for_init(sup.0.id());
    assert_eq!(
        proc_status(init, "Seccomp").as_deref(),
        Some("2"),
        "the init (host pid {init}) runs without a seccomp filter"
    );
    assert_eq!(proc_status(init, "Seccomp_filters").as_deref(), Some("1"));
    assert_eq!(proc_status(init, "NoNewPrivs").as_deref(), Some("1"));
    let program = children_of(init);
    assert_eq!(program.len(), 1, "{program:?}");
    assert_eq!(proc_status(program[0], "Seccomp").as_deref(), Some("2"));
    // The init's filter is not inherited by the program (it is installed after the fork).
    let n: u32 = proc_status(program[0], "Seccomp_filters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(n >= 1, "program filters: {n}");
}

/// Every run has its own host uid/gid (2130706432 + the supervisor's pid), no host `nobody`
/// process can signal it, and what it writes in the workspace still lands owned by the
/// workspace's owner.
#[test]
fn e2e_concurrent_runs_have_distinct_host_uids() {
    let Some(e) = env() else { return };
    chown_ws(&e, 1234, 2345);
    let p = e.policy("", &["/bin/sh"]);
    let spawn = |name: &str| {
        let mut c = e.exec(
            Some(&p),
            "/bin/sh",
            &["-c", &format!("echo {name} > {name}.txt; sleep 3")],
        );
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Reap(c.spawn().unwrap_or_else(|x| panic!("{x}")))
    };
    let mut a = spawn("a");
    let mut b = spawn("b");
    let (ia, ib) = (wait_for_init(a.0.id()), wait_for_init(b.0.id()));
    let uid_of = |pid: u32| -> Vec<u32> {
        proc_status(pid, "Uid")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let (ua, ub) = (uid_of(ia), uid_of(ib));
    let expect = |sup: u32| 0x7F00_0000 + sup;
    assert_eq!(ua, vec![expect(a.0.id()); 4], "run a's host uids");
    assert_eq!(ub, vec![expect(b.0.id()); 4], "run b's host uids");
    assert_ne!(ua, ub);
    let ga = proc_status(ia, "Gid").unwrap_or_default();
    assert!(
        ga.split_whitespace()
            .all(|g| g == expect(a.0.id()).to_string()),
        "gid {ga}"
    );
    // A host process running as nobody (the old shared identity) cannot signal the sandbox;
    // root (the control) can.
    let kill0 = |uid: u32, pid: u32| {
        let mut k = Command::new("/bin/sh");
        k.args(["-c", &format!("kill -0 {pid}")]);
        if uid != 0 {
            std::os::unix::process::CommandExt::uid(&mut k, uid);
        }
        run(&mut k, T).code
    };
    assert_eq!(kill0(0, ia), Some(0), "control: root can signal the init");
    assert_ne!(
        kill0(65534, ia),
        Some(0),
        "host nobody can signal the sandbox"
    );
    for (name, r) in [("a", &mut a), ("b", &mut b)] {
        let st = r.0.wait().unwrap_or_else(|x| panic!("{x}"));
        assert!(st.success(), "run {name}: {st:?}");
        let f = e.ws().join(format!("{name}.txt"));
        let m = fs::metadata(&f).unwrap_or_else(|x| panic!("{}: {x}", f.display()));
        assert_eq!(
            (m.uid(), m.gid()),
            (1234, 2345),
            "{name}.txt owner on the host"
        );
    }
}

/// Directories named `name_prefix*` beneath /sys/fs/cgroup (a few levels deep, no symlinks).
fn cgroup_dirs(name_prefix: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: u32, prefix: &str, out: &mut Vec<PathBuf>) {
        for ent in fs::read_dir(d).into_iter().flatten().flatten() {
            if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = ent.path();
            if ent.file_name().to_string_lossy().starts_with(prefix) {
                out.push(p);
            } else if depth > 0 {
                walk(&p, depth - 1, prefix, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 5, name_prefix, &mut out);
    out
}

/// The run cgroup of a SIGKILLed `carapace exec` is removed by the next one, once empty and
/// its supervisor dead; a stale-named cgroup that still holds a process is left alone.
#[test]
fn e2e_stale_cgroup_of_killed_supervisor_is_removed() {
    let Some(e) = env() else { return };
    let p = e.policy("", &["/usr/bin/sleep", "/usr/bin/true"]);
    let mut c = e.exec(Some(&p), "/usr/bin/sleep", &["30"]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut sup = Reap(c.spawn().unwrap_or_else(|x| panic!("{x}")));
    let sup_pid = sup.0.id();
    let init = wait_for_init(sup_pid);
    let prefix = format!("exec-{sup_pid}-");
    let dirs = cgroup_dirs(&prefix);
    assert!(!dirs.is_empty(), "no run cgroup {prefix}* found");
    let _ = sup.0.kill();
    let _ = sup.0.wait();
    // The sandbox dies with its supervisor (PDEATHSIG); its cgroups stay behind, empty.
    let start = Instant::now();
    while Path::new(&format!("/proc/{init}")).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "init survived");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Checked before they are 2 s old: until then no carapace (other tests run concurrently)
    // may remove them.
    for d in &dirs {
        assert!(
            d.exists(),
            "{} was not left behind (test premise)",
            d.display()
        );
    }
    std::thread::sleep(Duration::from_millis(2500)); // older than carapace's minimum age

    // A stale-named cgroup (dead owner) that holds a live process must stay.
    let mut dead = Command::new("/usr/bin/true")
        .spawn()
        .unwrap_or_else(|x| panic!("{x}"));
    let dead_pid = dead.id();
    let _ = dead.wait();
    let busy_parent = dirs[0]
        .parent()
        .unwrap_or_else(|| panic!("no parent"))
        .to_path_buf();
    let busy = busy_parent.join(format!("exec-{dead_pid}-0"));
    fs::create_dir(&busy).unwrap_or_else(|x| panic!("mkdir {}: {x}", busy.display()));
    let sleeper = Reap(
        Command::new("/usr/bin/sleep")
            .arg("60")
            .spawn()
            .unwrap_or_else(|x| panic!("{x}")),
    );
    fs::write(busy.join("cgroup.procs"), sleeper.0.id().to_string())
        .unwrap_or_else(|x| panic!("join {}: {x}", busy.display()));
    std::thread::sleep(Duration::from_millis(2500));

    let o = run(&mut e.exec(Some(&p), "/usr/bin/true", &[]), T);
    ok(&o);
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    let busy_kept = busy.exists();
    // Clean up the busy one before asserting.
    drop(sleeper);
    let start = Instant::now();
    while fs::remove_dir(&busy).is_err() && busy.exists() {
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(left.is_empty(), "stale cgroups left: {left:?}");
    assert!(busy_kept, "a cgroup holding a process was removed");
}

// ------------------------------------------------------------------------------------------
// Rootless mode: carapace started as an unprivileged user (ROOTLESS_UID through setpriv)

/// An [`Env`] for rootless runs: the workspace belongs to [`ROOTLESS_UID`], the scratch
/// directory may be traversed by it (policies written there are made readable).
fn rootless_env() -> Option<Env> {
    if !rootless_possible() {
        return None;
    }
    let e = env()?;
    give_to_rootless_user(e.ws());
    fs::set_permissions(e.scratch.path(), fs::Permissions::from_mode(0o711))
        .unwrap_or_else(|x| panic!("{x}"));
    Some(e)
}

impl Env {
    /// [`Env::policy`], readable by [`ROOTLESS_UID`].
    fn rootless_policy(&self, limits: &str, programs: &[&str]) -> PathBuf {
        let p = self.policy(limits, programs);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|x| panic!("{x}"));
        p
    }

    /// `carapace exec` as [`ROOTLESS_UID`] with `extra` options.
    fn rootless(
        &self,
        policy: Option<&Path>,
        extra: &[&str],
        program: &str,
        args: &[&str],
    ) -> Command {
        as_rootless_user(&carapace_exec(policy, self.ws(), extra, program, args))
    }
}

const ROOTLESS_LINE: &str =
    "carapace: rootless: no delegated cgroup; memory/pids/cpu limited by rlimits only";

/// Rootless: ls, git and python work in the workspace; the rootless line is said exactly once.
#[test]
fn e2e_rootless_tools_work_in_the_workspace() {
    let Some(e) = rootless_env() else { return };
    let name = unique("hello");
    fs::write(e.ws().join(&name), "needle\n").unwrap_or_else(|x| panic!("{x}"));
    let o = run(&mut e.rootless(None, &[], "ls", &["-la"]), T);
    ok(&o);
    assert!(o.stdout.contains(&name), "{}", o.describe());
    assert_eq!(
        o.stderr.matches(ROOTLESS_LINE).count(),
        1,
        "{}",
        o.describe()
    );
    let o = run(
        &mut e.rootless(None, &[], "grep", &["-rl", "needle", "."]),
        T,
    );
    ok(&o);
    assert!(o.stdout.contains(&name), "{}", o.describe());
    // git: a repository made by the sandbox itself, then inspected by a second run.
    let p = e.rootless_policy("", &["/usr/bin/git"]);
    let git = |args: &[&str]| {
        let mut c = e.rootless(Some(&p), &[], "/usr/bin/git", args);
        c.env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid");
        let o = run(&mut c, T);
        ok(&o);
        o
    };
    git(&["init", "-q"]);
    git(&["add", &name]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-q",
        "-m",
        "first",
    ]);
    let o = git(&["log", "--oneline"]);
    assert!(o.stdout.contains("first"), "{}", o.describe());
    let p = e.rootless_policy("", &["/usr/bin/python3"]);
    let o = run(
        &mut e.rootless(
            Some(&p),
            &[],
            "/usr/bin/python3",
            &["-c", "import json, subprocess; print(6 * 7)"],
        ),
        T,
    );
    ok(&o);
    assert_eq!(o.stdout.trim(), "42", "{}", o.describe());
}

/// Rootless: what the sandbox writes lands on the host owned by the user who started carapace
/// (no idmapping: the sandbox runs as that very uid); inside it is the profile's user, with no
/// capabilities, no_new_privs and seccomp, and the only mapping is sandbox user -> that uid.
#[test]
fn e2e_rootless_writes_land_owned_by_the_user() {
    let Some(e) = rootless_env() else { return };
    let p = e.rootless_policy("", &["/bin/sh"]);
    let o = run(
        &mut e.rootless(
            Some(&p),
            &[],
            "/bin/sh",
            &[
                "-c",
                "echo from sh > sh.txt && mkdir sub && echo x > sub/y && id -u && id -g && \
                 cat /proc/self/uid_map /proc/self/gid_map && \
                 grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
            ],
        ),
        T,
    );
    ok(&o);
    for f in ["sh.txt", "sub", "sub/y"] {
        let m =
            fs::metadata(e.ws().join(f)).unwrap_or_else(|x| panic!("{f}: {x}\n{}", o.describe()));
        assert_eq!(
            (m.uid(), m.gid()),
            (ROOTLESS_UID, ROOTLESS_UID),
            "{f} owner on the host"
        );
    }
    let words: Vec<&str> = o.stdout.split_whitespace().collect();
    let expect = format!(
        "1000 1000 1000 {ROOTLESS_UID} 1 1000 {ROOTLESS_UID} 1 CapEff: 0000000000000000 \
         CapBnd: 0000000000000000 NoNewPrivs: 1 Seccomp: 2"
    );
    assert_eq!(words.join(" "), expect, "{}", o.describe());
}

/// Rootless: exit codes propagate (own code, 128+signal, 124 on timeout) and a timeout leaves
/// no process behind.
#[test]
fn e2e_rootless_exit_codes_and_no_leftovers() {
    let Some(e) = rootless_env() else { return };
    let p = e.rootless_policy("wall_time = \"2s\"", &["/bin/sh"]);
    let o = run(
        &mut e.rootless(Some(&p), &[], "/bin/sh", &["-c", "exit 7"]),
        T,
    );
    assert_eq!(o.code, Some(7), "{}", o.describe());
    let o = run(
        &mut e.rootless(Some(&p), &[], "/bin/sh", &["-c", "kill -TERM $$"]),
        T,
    );
    assert_eq!(o.code, Some(128 + libc::SIGTERM), "{}", o.describe());
    let marker = unique("carapace-e2e-rootless");
    let o = run(
        &mut e.rootless(Some(&p), &[], "/bin/sh", &["-c", &sleeper_script(&marker)]),
        T,
    );
    assert_eq!(o.code, Some(EXIT_TIMEOUT), "{}", o.describe());
    assert!(
        o.elapsed < Duration::from_secs(2 + 5),
        "took {:?}",
        o.elapsed
    );
    let left = gone_within(&marker, Duration::from_secs(2));
    assert!(left.is_empty(), "processes survived the timeout: {left:?}");
}

/// Rootless: SIGKILL of carapace kills the whole sandboxed tree.
#[test]
fn e2e_rootless_supervisor_death_kills_tree() {
    let Some(e) = rootless_env() else { return };
    let p = e.rootless_policy("", &["/bin/sh"]);
    let marker = unique("carapace-e2e-rootless-orphan");
    let mut c = e.rootless(Some(&p), &[], "/bin/sh", &["-c", &sleeper_script(&marker)]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    // setpriv execs carapace: the child's pid is carapace's.
    let mut child = c.spawn().unwrap_or_else(|x| panic!("{x}"));
    let start = Instant::now();
    while host_processes_with(&format!("{marker}-setsid")).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the sandboxed tree never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let left = gone_within(&marker, Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "processes survived the supervisor's death: {left:?}"
    );
}

/// Rootless without a delegated cgroup: the memory and pids limits hold as rlimits (an
/// allocation fails instead of an OOM kill; forking stops at the limit), and the report says
/// no OOM.
#[test]
fn e2e_rootless_limits_hold_as_rlimits() {
    let Some(e) = rootless_env() else { return };
    let p = e.rootless_policy("memory = \"64MiB\"\npids = 16", &["/usr/bin/python3"]);
    let o = run(
        &mut e.rootless(
            Some(&p),
            &["--report", "-v"],
            "/usr/bin/python3",
            &[
                "-c",
                "try:\n    b = b'x' * (512 << 20)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')\n",
            ],
        ),
        T,
    );
    ok(&o);
    assert_eq!(o.stdout.trim(), "MemoryError", "{}", o.describe());
    assert!(o.stderr.contains("oom=false"), "{}", o.describe());
    assert!(
        o.stderr.contains("RLIMIT_AS=67108864 instead of memory"),
        "{}",
        o.describe()
    );
    let script = "import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)\nelse:\n    print('unbounded', n)\n";
    let o = run(
        &mut e.rootless(Some(&p), &[], "/usr/bin/python3", &["-c", script]),
        T,
    );
    ok(&o);
    let n: u32 = o
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        o.stdout.starts_with("stopped") && n < 16,
        "{}",
        o.describe()
    );
}

/// Rootless: a workspace the user may not open is a clear setup error (126), not a half-built
/// sandbox.
#[test]
fn e2e_rootless_unreadable_workspace_fails_clearly() {
    let Some(e) = rootless_env() else { return };
    let closed = e.scratch.path().join("closed");
    fs::create_dir(&closed).unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|x| panic!("{x}"));
    let c = carapace_exec(None, &closed, &[], "ls", &[]);
    let o = run(&mut as_rootless_user(&c), T);
    assert_eq!(o.code, Some(EXIT_CANNOT_START), "{}", o.describe());
    assert!(
        o.stderr.contains(&format!(
            "workspace {}: you (uid {ROOTLESS_UID}) may not read, write and enter it",
            closed.display()
        )),
        "{}",
        o.describe()
    );
}

/// Rootless with a brokered profile: the child gets the broker at fd 3, served by the
/// unprivileged supervisor (ping, a secret the user may read), the audit log lands in the
/// user's state directory, and a secret of another profile is refused.
#[test]
fn e2e_rootless_brokered_child_reaches_the_broker() {
    let Some(e) = rootless_env() else { return };
    let client = client_bin();
    let state = e.scratch.path().join("state");
    fs::create_dir(&state).unwrap_or_else(|x| panic!("{x}"));
    give_to_rootless_user(&state);
    let secret = unique("SECRET-rootless");
    let secret_file = e.scratch.path().join("alpha");
    fs::write(&secret_file, &secret).unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|x| panic!("{x}"));
    give_to_rootless_user(&secret_file);
    let extra = format!(
        r#"[profiles.rlbroker]
extends = "tool"
why = "rootless e2e: the client and a broker section"

[profiles.rlbroker.filesystem]
mounts = [ {{ path = "{dir}", access = "read-exec", why = "carapace-client" }} ]

[profiles.rlbroker.broker]
secrets = ["alpha"]

[secrets.alpha]
why = "rootless e2e secret"
file = "{file}"

[secrets.beta]
why = "a secret the profile may not have"
file = "{file}"

[[exec]]
why = "rootless e2e: shell scripts around the client"
program = "/usr/bin/sh"
args = ["-c", "**"]
profile = "rlbroker"
approval = "allow"
"#,
        dir = client.dir.display(),
        file = secret_file.display()
    );
    let p = e.scratch.path().join("broker.toml");
    fs::write(&p, insert_before_first_exec(&default_policy_text(), &extra))
        .unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap_or_else(|x| panic!("{x}"));
    let script = format!(
        "C={}; echo fd=$CARAPACE_BROKER_FD; $C ping; $C secret alpha; echo; \
         $C secret beta; echo beta-exit=$?",
        client.bin.display()
    );
    let state_s = state.display().to_string();
    let o = run(
        &mut e.rootless(
            Some(&p),
            &["--state-dir", &state_s],
            "/usr/bin/sh",
            &["-c", &script],
        ),
        T,
    );
    ok(&o);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some("fd=3"), "{}", o.describe());
    assert_eq!(lines.get(1).copied(), Some("pong"), "{}", o.describe());
    assert_eq!(
        lines.get(2).copied(),
        Some(secret.as_str()),
        "{}",
        o.describe()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("beta-exit=") && *l != "beta-exit=0"),
        "{}",
        o.describe()
    );
    let audit = fs::read_to_string(state.join("audit.log")).unwrap_or_default();
    assert!(audit.contains("alpha"), "audit log: {audit}");
    let m = fs::metadata(state.join("audit.log")).unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(m.uid(), ROOTLESS_UID, "the audit log is the user's");
}

// ------------------------------------------------------------------------------------------
// The program is started by descriptor

/// A policy whose profile `wsx` (= tool, workspace executable) runs the workspace programs
/// `names`, `noproc` (= wsx without /proc) runs `noproc.sh`, and the strict `e2e` (= tool:
/// workspace not executable) runs `strict.sh`.
fn workspace_exec_policy(e: &Env, names: &[&str]) -> PathBuf {
    let ws = fs::canonicalize(e.ws()).unwrap_or_else(|x| panic!("{x}"));
    let progs: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", ws.join(n).display()))
        .collect();
    let extra = format!(
        "[profiles.wsx]\nextends = \"tool\"\nwhy = \"exec by descriptor\"\n\
         [profiles.wsx.filesystem]\n\
         workspace = {{ path = \"/workspace\", access = \"read-write-exec\", why = \"runs\" }}\n\
         [profiles.noproc]\nextends = \"wsx\"\nwhy = \"no /proc\"\n\
         [profiles.noproc.filesystem]\nproc = false\n\
         [profiles.e2e]\nextends = \"tool\"\nwhy = \"strict\"\n\
         [[exec]]\nwhy = \"workspace programs\"\nprograms = [{}]\nargs = [\"**\"]\n\
         profile = \"wsx\"\napproval = \"allow\"\n\
         [[exec]]\nwhy = \"a script without /proc\"\nprogram = \"{}\"\nprofile = \"noproc\"\n\
         approval = \"allow\"\n\
         [[exec]]\nwhy = \"strict\"\nprogram = \"{}\"\nprofile = \"e2e\"\napproval = \"allow\"\n\
         [profiles.ro]\nextends = \"tool\"\nwhy = \"a read-only exec mount, no /proc\"\n\
         [profiles.ro.filesystem]\nproc = false\n\
         mounts = [{{ path = \"{ro}\", access = \"read-exec\", why = \"scripts\" }}]\n\
         [[exec]]\nwhy = \"a script in a read-only mount\"\nprogram = \"{ro}/sys.sh\"\n\
         profile = \"ro\"\napproval = \"allow\"\n",
        progs.join(", "),
        ws.join("noproc.sh").display(),
        ws.join("strict.sh").display(),
        ro = read_only_dir(e).display(),
    );
    let p = e.scratch.path().join(format!("{}.toml", unique("policy")));
    fs::write(&p, insert_before_first_exec(&default_policy_text(), &extra))
        .unwrap_or_else(|x| panic!("{x}"));
    p
}

/// A directory outside the workspace for programs a profile mounts read-exec.
fn read_only_dir(e: &Env) -> PathBuf {
    let d = fs::canonicalize(e.scratch.path())
        .unwrap_or_else(|x| panic!("{x}"))
        .join("ro");
    fs::create_dir_all(&d).unwrap_or_else(|x| panic!("{x}"));
    d
}

fn executable(path: &Path, body: &[u8]) {
    fs::write(path, body).unwrap_or_else(|x| panic!("{x}"));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap_or_else(|x| panic!("{x}"));
}

/// Top-level programs start by descriptor: an ELF keeps the sandbox's view of itself
/// (`/proc/self/exe` is its path inside), a script in the workspace gets `/dev/fd/N` as `$0`;
/// such a script in a profile without /proc is refused with a clear reason, while a script in a
/// read-only mount runs by its path (its real `$0`, no /proc needed); and the strict profile
/// still refuses to run anything from the workspace.
#[test]
fn e2e_top_level_programs_start_by_descriptor() {
    let Some(e) = env() else { return };
    let p = workspace_exec_policy(&e, &["rl", "hello.sh"]);
    fs::copy("/usr/bin/readlink", e.ws().join("rl")).unwrap_or_else(|x| panic!("{x}"));
    executable(
        &e.ws().join("hello.sh"),
        b"#!/bin/sh\necho \"hello $0 $1\"\n",
    );
    for s in ["noproc.sh", "strict.sh"] {
        executable(&e.ws().join(s), b"#!/bin/sh\necho ran\n");
    }
    let at = |n: &str| e.ws().join(n).to_string_lossy().into_owned();

    let o = run(&mut e.exec(Some(&p), &at("rl"), &["/proc/self/exe"]), T);
    ok(&o);
    assert_eq!(o.stdout.trim(), "/workspace/rl", "{}", o.describe());

    let o = run(&mut e.exec(Some(&p), &at("hello.sh"), &["world"]), T);
    ok(&o);
    assert!(o.stdout.starts_with("hello /dev/fd/"), "{}", o.describe());
    assert!(o.stdout.trim_end().ends_with(" world"), "{}", o.describe());

    let o = run(&mut e.exec(Some(&p), &at("noproc.sh"), &[]), T);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("ran"), "{}", o.describe());
    assert!(o.stderr.contains("/dev/fd/N"), "{}", o.describe());

    let o = run(&mut e.exec(Some(&p), &at("strict.sh"), &[]), T);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("ran"), "{}", o.describe());
    assert!(o.stderr.contains("not executable"), "{}", o.describe());

    let sys = read_only_dir(&e).join("sys.sh");
    executable(&sys, b"#!/bin/sh\necho \"system $0 $1\"\n");
    let o = run(&mut e.exec(Some(&p), &sys.to_string_lossy(), &["x"]), T);
    ok(&o);
    assert_eq!(
        o.stdout.trim(),
        format!("system {} x", sys.display()),
        "{}",
        o.describe()
    );
}
