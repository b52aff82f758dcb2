//! Privileged tests of the `carapace` binary (as root): exec with the default policy and with
//! test policies derived from it, exit codes, reports, and the policy subcommands.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{require_root, workspace};

const BIN: &str = env!("CARGO_BIN_EXE_carapace");
const DEFAULT: &str = include_str!("../../policies/default.toml");

/// The default policy with `rules` inserted before its first `[[exec]]` (so they win), and
/// `replace` substitutions applied.
fn policy_with(dir: &Path, rules: &str, replace: &[(&str, &str)]) -> PathBuf {
    let mut text = DEFAULT.to_string();
    for (from, to) in replace {
        assert!(text.contains(from), "default policy has no `{from}`");
        text = text.replace(from, to);
    }
    let at = text
        .find("\n[[exec]]")
        .expect("default policy has [[exec]] rules");
    text.insert_str(at + 1, rules);
    let p = dir.join("policy.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const ALLOW_SH: &str = r#"[[exec]]
why = "test: shell allowed"
programs = ["/usr/bin/sh", "/usr/bin/dash", "/usr/bin/sleep", "/usr/bin/id"]
profile = "tool"
approval = "allow"

"#;

fn carapace(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run carapace")
}

/// `carapace exec --policy POL -- sh -c SCRIPT` in `cwd`.
fn sh_under(cwd: &Path, pol: &str, script: &str) -> Output {
    carapace(cwd, &["exec", "--policy", pol, "--", "sh", "-c", script])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_ls_sees_the_workspace() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    std::fs::write(ws.path().join("hello.txt"), "hi").unwrap();
    let out = carapace(ws.path(), &["exec", "--", "ls", "-la"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello.txt"),
        "{}",
        text(&out.stdout)
    );
    let out = carapace(ws.path(), &["exec", "--", "cat", "hello.txt"]);
    assert_eq!(text(&out.stdout), "hi");
}

#[test]
fn exec_status_inside_under_default_policy() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let out = carapace(ws.path(), &["exec", "--", "cat", "/proc/self/status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("{k} missing:\n{s}"))
    };
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapBnd:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    assert_eq!(field("Uid:"), "1000\t1000\t1000\t1000");
    let out = carapace(ws.path(), &["exec", "--", "cat", "/proc/self/uid_map"]);
    let map: Vec<String> = text(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    // Inside 1000 is the per-run host id (`--run-as auto`): 2130706432 + carapace's pid.
    assert_eq!(map.len(), 3, "{map:?}");
    assert_eq!((map[0].as_str(), map[2].as_str()), ("1000", "1"));
    let host: u32 = map[1].parse().unwrap();
    assert!(
        (0x7F00_0000..0x7F00_0000 + (1 << 22)).contains(&host),
        "host uid {host} outside the per-run range"
    );
}

#[test]
fn exit_codes_reports_and_ownership() {
    if !require_root() {
        return;
    }
    let ws = workspace(4242, 4343);
    let pol = policy_with(ws.path(), ALLOW_SH, &[]);
    let pol = pol.to_str().unwrap();
    let out = carapace(
        ws.path(),
        &["exec", "--policy", pol, "--", "sh", "-c", "exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    let json = ws.path().join("r.json");
    let out = carapace(
        ws.path(),
        &[
            "exec",
            "--policy",
            pol,
            "--report",
            "--report-json",
            json.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo data > written.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("carapace: exit=0 signal=- wall="),
        "report line missing: {err}"
    );
    assert!(err.contains("oom=false timeout=false"), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["timed_out"], false);
    let meta = std::fs::metadata(ws.path().join("written.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343));

    // --run-as changes the host identity, not the inside one.
    let out = carapace(
        ws.path(),
        &[
            "exec",
            "--policy",
            pol,
            "--run-as",
            "1500:1501",
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.starts_with("1000\n"), "{o}");
    assert!(o.contains("1500"), "{o}");
}

/// The CPU-time limit ends a spinning process (SIGXCPU, said in plain words) and leaves one
/// that only waits alone, however long it waits.
#[test]
fn cpu_time_ends_spinning_not_waiting() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let pol = policy_with(
        ws.path(),
        ALLOW_SH,
        &[("cpu_time = \"120s\"", "cpu_time = \"1s\"")],
    );
    let pol = pol.to_str().unwrap();
    let t = std::time::Instant::now();
    let out = sh_under(ws.path(), pol, "while :; do :; done");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGXCPU),
        "{}",
        text(&out.stderr)
    );
    assert!(t.elapsed().as_secs() < 20);
    assert!(
        text(&out.stderr).contains("CPU-time limit"),
        "{}",
        text(&out.stderr)
    );
    let out = sh_under(ws.path(), pol, "sleep 2; echo woke");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "woke\n");
}

#[test]
fn timeout_and_signal_exit_codes() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let pol = policy_with(
        ws.path(),
        ALLOW_SH,
        &[("wall_time = \"300s\"", "wall_time = \"1s\"")],
    );
    let pol = pol.to_str().unwrap();
    let t = std::time::Instant::now();
    let out = sh_under(ws.path(), pol, "sleep 20 & sleep 20");
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(t.elapsed().as_secs() < 10);
    assert!(text(&out.stderr).contains("wall-time limit"));
    // A grandchild killed by a signal: the shell (pid 1) reports 128+N, and so do we.
    let out = sh_under(ws.path(), pol, "sh -c 'kill -TERM $$'");
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
}

#[test]
fn denials_exit_125() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let deny = r#"[[exec]]
why = "test: id is refused"
program = "/usr/bin/id"
approval = "deny"

"#;
    let pol = policy_with(ws.path(), deny, &[]);
    let out = carapace(
        ws.path(),
        &["exec", "--policy", pol.to_str().unwrap(), "--", "id"],
    );
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("denied") && err.contains("test: id is refused"),
        "{err}"
    );
    assert!(err.contains("line"), "{err}");

    // `ask` without a terminal is a denial that says how to allow it.
    let out = carapace(ws.path(), &["exec", "--", "id"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("no terminal"), "{err}");
    assert!(
        err.contains("[[exec]]") && err.contains("approval = \"allow\""),
        "{err}"
    );
    assert!(err.contains("line"), "{err}");

    // Nothing matches -> deny.
    let none = ws.path().join("none.toml");
    let mut t = DEFAULT.to_string();
    let cut = t.find("\n[[exec]]").unwrap();
    t.truncate(cut + 1);
    std::fs::write(&none, t).unwrap();
    let out = carapace(
        ws.path(),
        &["exec", "--policy", none.to_str().unwrap(), "--", "ls"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no [[exec]] rule"));
}

#[test]
fn setup_failures_exit_126_not_found_127_usage_2() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    // Not found: 127, as shells and `env` say it (found but refused before fork: 126, below).
    let out = carapace(ws.path(), &["exec", "--", "no-such-program-xyz"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("command not found"));
    let out = carapace(ws.path(), &["exec", "--", "/no/such/dir/prog"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    // A misspelt option of exec's own is a usage error with a suggestion, never a program.
    let out = carapace(ws.path(), &["exec", "--polcy", "x.toml", "--", "ls"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("'--policy'"),
        "{}",
        text(&out.stderr)
    );
    // Arguments of the program that look like options are the program's.
    let out = carapace(ws.path(), &["exec", "/usr/bin/echo", "-n", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi");
    // Invalid policy, with a location.
    let bad = ws.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\nbogus = 3\n").unwrap();
    let out = carapace(
        ws.path(),
        &["exec", "--policy", bad.to_str().unwrap(), "--", "ls"],
    );
    assert_eq!(out.status.code(), Some(126));
    assert!(
        text(&out.stderr).contains("bad.toml:"),
        "{}",
        text(&out.stderr)
    );
    // The host root is refused as a workspace.
    let out = carapace(Path::new("/"), &["exec", "--", "ls"]);
    assert_eq!(out.status.code(), Some(126));
    assert!(text(&out.stderr).contains("workspace"));
    // A program written to the workspace is not executable in the tool profile: refused
    // before fork.
    let pol = policy_with(
        ws.path(),
        "",
        &[(
            "program = \"$WORKSPACE/**\"\nprofile = \"build\"\napproval = \"ask\"",
            "program = \"$WORKSPACE/**\"\nprofile = \"tool\"\napproval = \"allow\"",
        )],
    );
    std::fs::copy("/usr/bin/true", ws.path().join("mytrue")).unwrap();
    let out = carapace(
        ws.path(),
        &["exec", "--policy", pol.to_str().unwrap(), "--", "./mytrue"],
    );
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not executable"),
        "{}",
        text(&out.stderr)
    );
}

/// What `-v` says is for a person reading a pipe or a log as well as a terminal: no colour
/// codes when stderr is not a terminal (or NO_COLOR is set), no Rust debug formatting.
#[test]
fn verbose_output_is_plain_text() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let out = carapace(ws.path(), &["exec", "-v", "--", "/usr/bin/true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("DEBUG"),
        "verbose tracing lines expected: {err}"
    );
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");
    assert!(err.contains("workspace owner 0:0"), "{err}");
    assert!(!err.contains("Some("), "debug formatting: {err}");
}

/// Not root: `carapace exec` runs rootless (as the user's own uid, no cgroup on this machine:
/// said once) instead of refusing; `--run-as` cannot be honoured and is refused.
#[test]
fn non_root_runs_rootless() {
    if !require_root() {
        return;
    }
    let ws = workspace(65534, 65534);
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(ws.path())
            .env("HOME", ws.path())
            .stdin(Stdio::null())
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run carapace as nobody")
    };
    let out = run(&["exec", "--", "ls", "-n"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        err.matches(
            "carapace: rootless: no delegated cgroup; memory/pids/cpu limited by rlimits only"
        )
        .count(),
        1,
        "{err}"
    );
    let out = run(&["exec", "--run-as", "1500:1500", "--", "ls"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{err}");
    assert!(
        err.contains("--run-as is not available in rootless mode"),
        "{err}"
    );
}

#[test]
fn policy_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("default.toml");
    std::fs::write(&p, DEFAULT).unwrap();
    let out = carapace(dir.path(), &["policy", "check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.starts_with("ok: ") && o.contains(" profiles, "), "{o}");
    assert!(o.contains("tests passed"), "{o}");

    // A failing [[test]] fails the check.
    let f = dir.path().join("failing.toml");
    std::fs::write(
        &f,
        format!("{DEFAULT}\n[[test]]\ncommand = [\"/usr/bin/ls\"]\nexpect = \"deny\"\n"),
    )
    .unwrap();
    let out = carapace(dir.path(), &["policy", "check", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("test failed"),
        "{}",
        text(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "version = 2\n").unwrap();
    let out = carapace(dir.path(), &["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad.toml:1:"),
        "{}",
        text(&out.stderr)
    );

    let out = carapace(dir.path(), &["policy", "explain", "--", "ls", "-la"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("program: /usr/bin/ls"), "{o}");
    assert!(o.contains("decision: allow"), "{o}");
    assert!(o.contains("Landlock"), "{o}");
    // The broker part of the confinement is explained too: none for the default tool profile...
    assert!(o.contains("has no [profiles.tool.broker] section"), "{o}");
    // ... and the allowlists of a profile that has one.
    let brokered = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/policy/broker-sections.toml"
    );
    let out = carapace(
        dir.path(),
        &["policy", "explain", brokered, "--", "ls", "-la"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("profile: agent"), "{o}");
    assert!(o.contains("api.example.com"), "{o}");
    assert!(o.contains("any subdomain of example.org"), "{o}");

    let out = carapace(dir.path(), &["policy", "show-default"]);
    assert_eq!(text(&out.stdout), DEFAULT);

    let out = carapace(dir.path(), &["--help"]);
    assert!(text(&out.stdout).contains("Examples:"));
    let out = carapace(dir.path(), &["exec", "--help"]);
    let o = text(&out.stdout);
    assert!(o.contains("--run-as") && o.contains("Exit codes"), "{o}");
}

#[test]
fn symlinks_planted_in_workspaces_are_not_followed() {
    if !require_root() {
        return;
    }
    let ws = workspace(0, 0);
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("file"), "ORIGINAL\n").unwrap();
    std::os::unix::fs::symlink(victim.path(), ws.path().join("link")).unwrap();
    std::os::unix::fs::symlink(victim.path().join("file"), ws.path().join("report.json")).unwrap();
    // A workspace reached through a link is refused.
    let link = ws.path().join("link");
    let out = carapace(
        ws.path(),
        &["exec", "--workspace", link.to_str().unwrap(), "--", "ls"],
    );
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("symbolic link"),
        "{}",
        text(&out.stderr)
    );
    // A report path that is (or goes through) a link is refused before anything runs.
    for r in ["report.json", "link/new.json"] {
        let rp = ws.path().join(r);
        let out = carapace(
            ws.path(),
            &["exec", "--report-json", rp.to_str().unwrap(), "--", "ls"],
        );
        assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    }
    assert_eq!(
        std::fs::read_to_string(victim.path().join("file")).unwrap(),
        "ORIGINAL\n"
    );
    assert!(!victim.path().join("new.json").exists());
    // A report file replaced by the sandbox during the run is not followed afterwards.
    let pol = policy_with(ws.path(), ALLOW_SH, &[]);
    let rp = ws.path().join("r2.json");
    let out = carapace(
        ws.path(),
        &[
            "exec",
            "--policy",
            pol.to_str().unwrap(),
            "--report-json",
            rp.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "rm -f r2.json; ln -s /workspace/link/file r2.json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("replaced"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(victim.path().join("file")).unwrap(),
        "ORIGINAL\n"
    );
}

#[test]
fn programs_have_ordinary_signal_semantics() {
    if !require_root() {
        return;
    }
    // The program is not the pid namespace's init: its own signals kill it.
    let ws = workspace(0, 0);
    let pol = policy_with(ws.path(), ALLOW_SH, &[]);
    let pol = pol.to_str().unwrap();
    let out = sh_under(ws.path(), pol, "kill -TERM $$; sleep 5; exit 3");
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    let out = carapace(
        ws.path(),
        &[
            "exec",
            "--policy",
            pol,
            "--report",
            "--",
            "sh",
            "-c",
            "kill -KILL $$; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("signal=9"),
        "{}",
        text(&out.stderr)
    );
    // Orphans are reaped and do not outlive the program.
    let out = sh_under(ws.path(), pol, "sleep 30 & echo $$");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "2",
        "the program is pid 2 under carapace's init"
    );
}

/// `policy groups`: every group with why, one group's syscalls, JSON for scripts, a misspelt
/// group with a suggestion, and the warning that systemd's sets of the same names differ.
#[test]
fn policy_groups_lists_carapaces_own_groups() {
    let here = Path::new("/");
    let out = carapace(here, &["policy", "groups"]);
    assert_eq!(out.status.code(), Some(0));
    let all = text(&out.stdout);
    assert!(
        all.contains("@default") && all.contains("@setid-keep"),
        "{all}"
    );
    assert!(all.contains("systemd's SystemCallFilter="), "{all}");
    let out = carapace(here, &["policy", "groups", "process"]);
    assert_eq!(out.status.code(), Some(0));
    let one = text(&out.stdout);
    assert!(one.starts_with("@process: "), "{one}");
    assert!(one.lines().any(|l| l.trim() == "wait4"), "{one}");
    let out = carapace(here, &["policy", "groups", "@setid-keep", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["name"], "@setid-keep");
    assert!(v["syscalls"]
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s == "setresuid")));
    let out = carapace(here, &["policy", "groups", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v.as_array().is_some_and(|a| a.len() >= 10), "{v}");
    let out = carapace(here, &["policy", "groups", "@proces"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("did you mean @process?"));
}

/// A command that prints ends quietly when its reader goes away (`| head`): no panic, no error.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    use std::io::Read as _;
    use std::os::fd::{FromRawFd as _, OwnedFd};
    use std::os::unix::process::ExitStatusExt as _;
    // A pipe of one page, so the 16 KiB default policy cannot fit in it: the command is still
    // writing when the reader goes away.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array; we own them from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    let child = Command::new(BIN)
        .args(["policy", "show-default"])
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run carapace");
    let mut first = [0u8; 64];
    let mut reader = std::fs::File::from(read);
    let n = reader.read(&mut first).expect("read");
    drop(reader);
    let out = child.wait_with_output().expect("wait");
    assert!(first[..n].starts_with(b"#"), "{:?}", &first[..n]);
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}

/// `--json` where a script reads the outcome: `policy check`, `policy explain` and `audit
/// verify`, parsed here;
/// the exit status says the same as the JSON.
#[test]
fn json_for_scripts_from_check_and_verify() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.toml");
    std::fs::write(&good, DEFAULT).unwrap();
    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\nbogus = 3\n").unwrap();
    let out = carapace(
        t.path(),
        &[
            "policy",
            "check",
            "--json",
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per file"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["ok"], true);
    assert!(lines[0]["profiles"].as_u64().is_some_and(|n| n >= 4));
    assert!(lines[0]["tests_passed"].as_u64().is_some_and(|n| n >= 10));
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[1]["errors"][0]["line"], 2, "{}", lines[1]);
    assert!(lines[1]["errors"][0]["message"]
        .as_str()
        .is_some_and(|m| m.contains("bogus")));

    let out = carapace(
        t.path(),
        &["policy", "explain", "--json", "--", "ls", "-la"],
    );
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["decision"]["approval"], "allow", "{v}");
    assert_eq!(v["plan"]["profile"], "tool", "{v}");
    assert!(v["decision"]["rule"]["line"].as_u64().is_some(), "{v}");
    let out = carapace(
        t.path(),
        &["policy", "explain", "--json", "--", "/usr/bin/mount"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["decision"]["approval"], "deny", "{v}");
    assert!(v["plan"].is_null(), "{v}");

    let empty = t.path().join("audit.log");
    std::fs::write(&empty, "").unwrap();
    let out = carapace(
        t.path(),
        &["audit", "verify", "--json", empty.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (v["ok"].clone(), v["error"].clone()),
        (true.into(), serde_json::Value::Null)
    );
    let junk = t.path().join("junk.log");
    std::fs::write(&junk, "not json\n").unwrap();
    let out = carapace(
        t.path(),
        &["audit", "verify", "--json", junk.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["broken"]["line"], 1, "{v}");
    let out = carapace(
        t.path(),
        &["audit", "verify", "--json", "/no/such/audit.log"],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("/no/such/audit.log")),
        "{v}"
    );
}

#[test]
fn run_check_json_says_what_would_run_and_what_is_wrong() {
    let t = tempfile::tempdir().unwrap();
    let json = |args: &[&str]| {
        let out = carapace(t.path(), args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
        (out.status.code(), v)
    };
    // The embedded default: the gateway would run under its profile.
    let (code, v) = json(&["run", "--check", "--json"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["config"]["ok"], true, "{v}");
    assert_eq!(v["policy"]["ok"], true, "{v}");
    assert_eq!(
        v["policy"]["sha256"].as_str().map(str::len),
        Some(64),
        "{v}"
    );
    assert_eq!(v["children"][0]["name"], "gateway", "{v}");
    assert_eq!(v["children"][0]["role"], "gateway", "{v}");
    assert_eq!(v["children"][0]["profile"], "gateway", "{v}");
    assert_eq!(v["children"][0]["ok"], true, "{v}");

    // A configuration error is located, with its suggestion, and exits 78.
    let cfg = t.path().join("carapace.toml");
    std::fs::write(&cfg, "[supervisor]\nlog_levle = \"info\"\n").unwrap();
    let (code, v) = json(&[
        "run",
        "--check",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(78), "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let d = &v["config"]["diagnostics"][0];
    assert_eq!(
        (d["line"].clone(), d["column"].clone()),
        (2.into(), 1.into()),
        "{v}"
    );
    assert_eq!(d["help"], "did you mean `log_level`?", "{v}");

    // A policy error is reported as the policy's, the configuration being fine.
    let pol = t.path().join("policy.toml");
    std::fs::write(
        &pol,
        DEFAULT.replacen("version = 1", "version = 1\nbogus = 3", 1),
    )
    .unwrap();
    std::fs::write(
        &cfg,
        format!("[supervisor]\npolicy = [\"{}\"]\n", pol.display()),
    )
    .unwrap();
    let (code, v) = json(&[
        "run",
        "--check",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(78), "{v}");
    assert_eq!(v["config"]["ok"], true, "{v}");
    assert_eq!(v["policy"]["ok"], false, "{v}");
    assert!(
        v["policy"]["diagnostics"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bogus")),
        "{v}"
    );

    // The text form draws the error rustc-style, without colour when not on a terminal.
    let out = carapace(
        t.path(),
        &["run", "--check", "--config", cfg.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    assert!(err.contains("error: unknown key `bogus`"), "{err}");
    assert!(err.contains(&format!(" --> {}:", pol.display())), "{err}");
    assert!(!err.contains('\x1b'), "{err}");
    // --json only with --check.
    assert_eq!(
        carapace(t.path(), &["run", "--json"]).status.code(),
        Some(2)
    );
}
