//! carapace on a production-shaped host: pure cgroup v2, systemd as PID 1, the shipped units.
//!
//! Boots a minimal Debian bookworm VM under qemu (software emulation) with tests/vm/run.sh,
//! installs the binaries built here and supervisor/systemd/carapace.{service,socket} into it,
//! and runs tests/vm/guest/checks.sh there: start (READY, the gateway's delegated cgroup and its
//! limits), a memory bomb OOM-killed in its own cgroup, a fork bomb stopped at pids.max, reload
//! with a good and a broken policy, journald fields, a clean stop, socket activation, the
//! watchdog, and the sandbox crate's `cgroup::` unit tests. The report comes back over the
//! guest's second serial port; this test fails with it and the console log attached when a
//! check fails, a check is missing, the summary is missing, or the VM cannot be built or booted.
//!
//! Needs root and what tests/vm/setup.sh installs (qemu-system-x86, debootstrap); it fails,
//! never skips, when they are missing. Not root: fails unless CARAPACE_ALLOW_SKIP=1.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every check the guest must report (tests/vm/guest/checks.sh), in its order.
const CHECKS: &[&str] = &[
    "pure-v2-host",
    "start-ready-limits",
    "memory-bomb-oom",
    "fork-bomb-pids",
    "reload-good-and-broken",
    "journal-fields",
    "stop-leaves-nothing",
    "socket-activation",
    "watchdog-restart",
    "cgroup-module-tests",
    "v1-hybrid-cgroups",
];

/// Checks that can only be NOT-APPLICABLE on a pure v2 host (never a PASS there).
const NOT_APPLICABLE: &[&str] = &["v1-hybrid-cgroups"];

/// The whole stage: a cold root build (debootstrap, the kernel) plus qemu's own timeout.
const DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The repository root: the parent of this crate, as this test file was compiled.
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    c
}

/// The profile directory (target/debug) of this test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
        .to_path_buf()
}

/// `cargo build --workspace --bins` (a no-op in CI, where .ci/test has just run it).
fn build_binaries() {
    let target = profile_dir().parent().map(Path::to_path_buf);
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if let Some(t) = target {
        c.env("CARGO_TARGET_DIR", t);
    }
    let s = c
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(s.success(), "cargo build --workspace --bins failed: {s}");
}

/// The sandbox crate's unit test executable, built as `cargo test --workspace` builds it (so
/// that in CI it is already there).
fn sandbox_test_binary() -> PathBuf {
    let target = profile_dir().parent().map(Path::to_path_buf);
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--lib",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit());
    if let Some(t) = target {
        c.env("CARGO_TARGET_DIR", t);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(
        out.status.success(),
        "cargo test --workspace --lib --no-run failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "carapace_sandbox"
                && m["profile"]["test"] == true
        })
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not name the carapace_sandbox unit test executable"))
}

/// The last `n` lines of a file (lossy), for the failure message.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Run {
    status: Option<std::process::ExitStatus>,
    log: String,
    out: PathBuf,
}

impl Run {
    fn explain(&self, what: &str) -> String {
        format!(
            "{what}\n\n--- tests/vm/run.sh ({:?}) ---\n{}\n--- report (results.txt) ---\n{}\n--- console (last 200 lines of {}) ---\n{}",
            self.status,
            self.log,
            tail(&self.out.join("results.txt"), 200),
            self.out.join("console.log").display(),
            tail(&self.out.join("console.log"), 200),
        )
    }
}

/// Run tests/vm/run.sh, killing its whole process group after [`DEADLINE`].
fn run_vm(out: &Path, testbin: &Path) -> Run {
    let _ = std::fs::remove_dir_all(out);
    let mut child = Command::new(repo_root().join("tests/vm/run.sh"))
        .arg(out)
        .env("CARAPACE_VM_BINDIR", profile_dir())
        .env("CARAPACE_VM_TESTBINS", testbin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start tests/vm/run.sh: {e}"));
    let pipes = [
        child.stdout.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                let _ = s.read_to_end(&mut b);
                b
            })
        }),
        child.stderr.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                let _ = s.read_to_end(&mut b);
                b
            })
        }),
    ];
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() < DEADLINE => std::thread::sleep(Duration::from_secs(1)),
            _ => {
                let pgid = i32::try_from(child.id()).unwrap_or(0);
                if pgid > 0 {
                    // SAFETY: kill(2) on the process group this test started (process_group(0)
                    // made its leader's pid the group id); no memory is involved.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut log = String::new();
    for p in pipes.into_iter().flatten() {
        if let Ok(b) = p.join() {
            log.push_str(&String::from_utf8_lossy(&b));
        }
    }
    Run {
        status,
        log,
        out: out.to_path_buf(),
    }
}

#[test]
fn pure_cgroup_v2_host_under_systemd() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("skipping the VM test: not root (CARAPACE_ALLOW_SKIP=1)");
            return;
        }
        panic!("the VM test needs root (debootstrap, image building); run as root");
    }
    build_binaries();
    let testbin = sandbox_test_binary();
    let out = profile_dir().join("vm-pure-v2");
    let run = run_vm(&out, &testbin);
    println!("{}", run.log);
    let Some(status) = run.status else {
        panic!(
            "{}",
            run.explain(&format!(
                "the VM stage took longer than {DEADLINE:?}: killed"
            ))
        );
    };
    let report = std::fs::read_to_string(out.join("results.txt")).unwrap_or_default();
    println!("{report}");
    let summary = report.lines().rev().find(|l| l.starts_with("SUMMARY "));
    let Some(summary) = summary else {
        panic!(
            "{}",
            run.explain("no SUMMARY line in the VM's report: the VM did not boot or the checks did not finish")
        );
    };
    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("tests/vm/run.sh exited with {status}"));
    }
    if !summary.contains(" failed=0 ") {
        problems.push(format!("the guest reports failures: {summary}"));
    }
    for name in CHECKS {
        let pass = report
            .lines()
            .any(|l| l.starts_with(&format!("PASS {name} [")));
        let na = report
            .lines()
            .any(|l| l.starts_with(&format!("NOT-APPLICABLE {name}:")));
        let expected_na = NOT_APPLICABLE.contains(name);
        match (pass, na, expected_na) {
            (true, false, false) | (false, true, true) => {}
            (false, true, false) => problems.push(format!(
                "{name}: reported as not applicable, but it must run on a pure v2 host"
            )),
            (true, _, true) => problems.push(format!("{name}: a v1-only check claims a PASS")),
            _ => problems.push(format!("{name}: no PASS line")),
        }
    }
    assert!(
        problems.is_empty(),
        "{}",
        run.explain(&format!(
            "the pure cgroup v2 VM checks failed:\n  {}",
            problems.join("\n  ")
        ))
    );
}
