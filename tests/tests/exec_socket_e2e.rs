//! `carapace exec` through a running `carapace run` (its exec socket), end to end: the real
//! supervisor (the harness: `carapace_tests::service`) and the real `carapace exec` binary.
//!
//! Both directions of each promise: it goes through the supervisor when one is there and runs
//! here when not (or when told); the supervisor's policy decides there and the embedded default
//! here; the caller's stdin, stdout, stderr and exit status pass through; the sandbox dies with
//! its caller; a caller that sees other files, or sits in another user namespace, runs here.
//!
//! It runs as root (CI); it fails, never skips, when not root unless CARAPACE_ALLOW_SKIP=1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use carapace_tests::*;

/// `carapace exec ARGS` with the supervisor's control socket named (its exec socket is beside
/// it), in `cwd`.
fn exec_command(svc: &Service, cwd: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(carapace_bin());
    c.arg("exec")
        .args(args)
        .env("CARAPACE_CONTROL_SOCKET", svc.socket())
        .current_dir(cwd);
    c
}

/// [`exec_command`] run with `stdin` written to its stdin.
fn exec_in(svc: &Service, cwd: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = exec_command(svc, cwd, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("carapace exec {args:?}: {e}"));
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    child.wait_with_output().unwrap()
}

/// `carapace exec ARGS` in the workspace `ws`.
fn exec(svc: &Service, ws: &tempfile::TempDir, args: &[&str]) -> Output {
    exec_in(svc, ws.path(), args, "")
}

/// A workspace: a directory of the test's own under /tmp (the system directories, /var/tmp
/// among them, are refused as workspaces).
fn workspace() -> tempfile::TempDir {
    tempdir("carapace-execsock-")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The pid of the confined `tail -f NAME` (waits up to 10 s for it to start).
fn find_tail(name: &str) -> i64 {
    let want = format!("tail\0-f\0{name}\0").into_bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
            .find(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want));
        if let Some(p) = found {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "the confined tail -f {name} never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The default policy with `rule` as its first `[[exec]]` rule.
fn policy_with_first_rule(rule: &str) -> String {
    let p = default_policy_text();
    let at = p
        .find("\n[[exec]]")
        .expect("the default policy has exec rules");
    format!("{}\n{rule}\n{}", &p[..at], &p[at..])
}

#[test]
fn a_run_goes_through_the_supervisor_with_the_callers_stdio_and_exit_status() {
    if !privileged() {
        return;
    }
    let svc = Service::start("");
    let ws = workspace();

    let o = exec(&svc, &ws, &["-v", "--", "cat", "/proc/self/status"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("via=supervisor"), "{err}");
    for want in ["Seccomp:\t2", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }

    // stdin in, stdout out: the caller's own descriptors, not copies through the supervisor.
    let o = exec_in(
        &svc,
        ws.path(),
        &["--", "cat"],
        "hello through the socket\n",
    );
    assert_eq!(
        text(&o.stdout),
        "hello through the socket\n",
        "{}",
        text(&o.stderr)
    );

    // The program's exit status is the caller's, and its stderr is the caller's stderr.
    let o = exec(&svc, &ws, &["--report", "--", "ls", "/no/such/dir"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(
        err.contains("exit=2") && err.contains("via=supervisor"),
        "{err}"
    );

    // --report-json says which path ran.
    let json = ws.path().join("report.json");
    let o = exec(
        &svc,
        &ws,
        &["--report-json", json.to_str().unwrap(), "--", "true"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["via"], "supervisor", "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
}

#[test]
fn the_supervisors_policy_decides_there_and_the_audit_log_records_it() {
    if !privileged() {
        return;
    }
    let policy = policy_with_first_rule(
        "[[exec]]\nwhy = \"test: this supervisor refuses cat\"\nprograms = [\"/usr/bin/cat\"]\n\
         approval = \"deny\"\n",
    );
    let svc = Service::start_with_policy(&policy, "");
    let ws = workspace();

    // Through the supervisor: its policy refuses cat, saying which rule and where to change it.
    let o = exec(&svc, &ws, &["--", "cat", "/etc/passwd"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("this supervisor refuses cat"), "{err}");
    assert!(err.contains("supervisor's policy"), "{err}");

    // Here (the embedded default): cat is allowed.
    let o = exec(&svc, &ws, &["--via", "local", "--", "cat", "/etc/passwd"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // --policy runs here too, under that file, and -v says why.
    let o = exec(
        &svc,
        &ws,
        &[
            "-v",
            "--policy",
            svc.policy_path().to_str().unwrap(),
            "--",
            "true",
        ],
    );
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("via=local: --policy"), "{err}");
    // ... and cannot be combined with --via supervisor.
    let o = exec(
        &svc,
        &ws,
        &["--via", "supervisor", "--policy", "/dev/null", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(126));

    // An `ask` without a terminal is a denial, with the supervisor's words.
    let o = exec(&svc, &ws, &["--", "/usr/bin/env"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("no terminal to ask on"), "{err}");

    // Each decision is a record of the operator in the supervisor's audit log.
    let o = exec(&svc, &ws, &["--", "true"]);
    assert!(o.status.success());
    let tail = text(&svc.ctl(&["audit", "tail", "-n", "20"]).stdout);
    for want in [
        "exec deny /usr/bin/cat /etc/passwd",
        "exec deny /usr/bin/env",
        "exec allow /usr/bin/true",
        "through the exec socket by uid 0",
    ] {
        assert!(tail.contains(want), "no {want:?} in the audit log:\n{tail}");
    }
    let v = Command::new(carapace_bin())
        .args(["audit", "verify"])
        .arg(svc.state_dir().join("audit.log"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v.stderr));
}

#[test]
fn the_sandbox_dies_with_its_caller() {
    if !privileged() {
        return;
    }
    let svc = Service::start("");
    let ws = workspace();
    // `tail -f` of a file of its own runs until killed; the marker finds it in /proc.
    let marker = ws.path().join("follow-me");
    std::fs::write(&marker, "").unwrap();
    let mut client = exec_command(
        &svc,
        ws.path(),
        &["--via", "supervisor", "--", "tail", "-f", "follow-me"],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    let tail = find_tail("follow-me");
    // Not the client's child: the supervisor's.
    assert_ne!(
        std::fs::read_to_string(format!("/proc/{tail}/stat"))
            .unwrap()
            .split_whitespace()
            .nth(3),
        Some(client.id().to_string().as_str())
    );
    client.kill().unwrap();
    let _ = client.wait();
    assert!(
        wait_gone(tail, Duration::from_secs(5)),
        "the sandbox outlived its caller"
    );
}

#[test]
fn without_a_supervisor_or_seeing_other_files_it_runs_here() {
    if !privileged() {
        return;
    }
    // No supervisor: auto runs here, `--via supervisor` fails and says why.
    let nowhere = var_tmpdir("carapace-nosock-");
    let ws = workspace();
    let run = |via: &str| {
        Command::new(carapace_bin())
            .args(["exec", "-v", "--via", via, "--", "true"])
            .env(
                "CARAPACE_CONTROL_SOCKET",
                nowhere.path().join("control.sock"),
            )
            .current_dir(ws.path())
            .output()
            .unwrap()
    };
    let o = run("auto");
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("via=local: no supervisor is running"), "{err}");
    let o = run("supervisor");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(126), "{err}");
    assert!(err.contains("no supervisor is running"), "{err}");

    let svc = Service::start("");
    let bin = carapace_bin().display().to_string();
    let sock = svc.socket().display().to_string();
    // A caller whose cwd the supervisor sees otherwise (a tmpfs in a mount namespace of the
    // caller's own) runs here.
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs t /mnt && cd /mnt && CARAPACE_CONTROL_SOCKET={sock} {bin} exec -v -- true"
        ))
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("via=local: the supervisor does not see your working directory"),
        "{err}"
    );
    // A caller in another user namespace (mapped to root, so the uid alone would pass) is not
    // served; -v says why.
    let o = Command::new("unshare")
        .args(["-U", "--map-root-user", "sh", "-c"])
        .arg(format!(
            "cd {} && CARAPACE_CONTROL_SOCKET={sock} {bin} exec -v --via supervisor -- true",
            ws.path().display()
        ))
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(126), "{err}");
    assert!(err.contains("its own user namespace"), "{err}");
}

#[test]
fn each_run_has_a_fresh_network_namespace_of_its_own() {
    if !privileged() {
        return;
    }
    // The supervisor's spawners make the next sandbox's network namespace ahead: each must
    // still be the sandbox's alone, and as fresh as a clone's.
    let svc = Service::start("");
    let ws = workspace();
    // Three sandboxes alive at once (a namespace's inode number is reused once it is freed,
    // so they are compared while all three hold theirs).
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    let mut clients = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for k in 0..3 {
        let name = format!("net-{k}");
        std::fs::write(ws.path().join(&name), "").unwrap();
        clients.push(
            exec_command(
                &svc,
                ws.path(),
                &["--via", "supervisor", "--", "tail", "-f", &name],
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
        );
        let tail = find_tail(&name);
        let ns = std::fs::read_link(format!("/proc/{tail}/ns/net")).unwrap();
        assert_ne!(ns, host, "a sandbox in the host's network namespace");
        assert!(
            seen.insert(ns.clone()),
            "{ns:?} shared by two live sandboxes"
        );
    }
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Only a loopback device, and no socket of anyone's in it.
    let o = exec(
        &svc,
        &ws,
        &[
            "--",
            "cat",
            "/proc/net/dev",
            "/proc/net/unix",
            "/proc/net/tcp",
        ],
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let devices: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(':').map(|(d, _)| d.trim()))
        .filter(|d| !d.is_empty() && !d.contains(' ') && !d.starts_with("sl"))
        .collect();
    assert_eq!(devices, ["lo"], "{out}");
    let sockets = out
        .lines()
        .filter(|l| {
            l.contains(": 0000") || l.trim_start().starts_with(|c: char| c.is_ascii_digit())
        })
        .count();
    assert_eq!(sockets, 0, "sockets in a fresh namespace:\n{out}");
}

#[test]
fn a_rootless_supervisor_serves_its_own_user() {
    if !rootless_possible() {
        return;
    }
    let svc = Service::start_opts(StartOpts {
        rootless: true,
        ..StartOpts::default()
    });
    let ws = workspace();
    give_to_rootless_user(ws.path());
    let cmd = exec_command(
        &svc,
        ws.path(),
        &[
            "-v",
            "--via",
            "supervisor",
            "--",
            "cat",
            "/proc/self/status",
        ],
    );
    let o = as_rootless_user(&cmd).output().unwrap();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}{err}\nlog:\n{}", svc.log_text());
    assert!(err.contains("via=supervisor"), "{err}");
    for want in ["Seccomp:\t2", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }
    // --run-as needs a root supervisor: said, not ignored.
    let cmd = exec_command(
        &svc,
        ws.path(),
        &["--via", "supervisor", "--run-as", "1500:1500", "--", "true"],
    );
    let o = as_rootless_user(&cmd).output().unwrap();
    assert_eq!(o.status.code(), Some(126), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("rootless supervisor"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_workspace_the_supervisor_sees_read_only_runs_here() {
    if !privileged() {
        return;
    }
    // The supervisor in a mount namespace where the workspace is a read-only bind of itself
    // (as the shipped unit's ProtectSystem=strict makes most of the host): the same files,
    // but a run there could not write what the caller can.
    let ws = workspace();
    let dir = ws.path().display().to_string();
    let svc = Service::start_opts(StartOpts {
        wrapper: vec![
            "unshare".into(),
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "mount --bind {dir} {dir} && mount -o remount,bind,ro {dir} && exec \"$0\" \"$@\""
            ),
        ],
        ..StartOpts::default()
    });
    let o = exec(&svc, &ws, &["-v", "--", "true"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("via=local: the supervisor sees your workspace") && err.contains("read-only"),
        "{err}"
    );
    // Another workspace, writable there too, goes through.
    let other = workspace();
    let o = exec(&svc, &other, &["-v", "--", "true"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("via=supervisor"), "{err}");
}
