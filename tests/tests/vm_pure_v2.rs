//! carapace on a production-shaped host: pure cgroup v2, systemd as PID 1, the shipped units.
//!
//! Boots a minimal Debian bookworm VM under qemu (software emulation) with tests/vm/run.sh,
//! installs the Debian package (supervisor/packaging/build-deb) into it with the guest's own
//! dpkg, and runs tests/vm/guest/checks.sh there: the package installed and nothing enabled,
//! start (READY, the packaged gateway in its delegated cgroup with its limits), a memory bomb
//! OOM-killed in its own cgroup, a fork bomb stopped at pids.max, reload with a good and a
//! broken policy, journald fields, a clean stop, socket activation, the watchdog, the sandbox
//! crate's `cgroup::` unit tests, rootless `carapace run` as a `systemd --user` service with
//! delegation (a memory bomb OOM-killed beneath the user's service), and the escape suite (root
//! and rootless). The report comes back over the guest's second serial port; this test fails
//! with it and the console log attached when a check fails, a check is missing, the summary is
//! missing, or the VM cannot be built or booted.
//!
//! The package: `build-deb --reuse-binaries` when `CARAPACE_PACKAGE_REUSE=1` (.ci/test builds
//! target/release first), else `build-deb`, which runs `cargo build --release` (about 10 minutes
//! from a cold target/release on a busy 2-core machine; nothing when it is fresh).
//! `CARAPACE_VM_DEB=FILE` installs that package instead.
//!
//! Needs root and what tests/vm/setup.sh installs (qemu-system-x86, debootstrap), cargo-deb and
//! objcopy for the package; it fails, never skips, when they are missing. Not root: fails
//! unless CARAPACE_ALLOW_SKIP=1.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_tests::repo_root;

/// Every check the guest must report (tests/vm/guest/checks.sh), in its order.
const CHECKS: &[&str] = &[
    "package-installed",
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
    "rootless-user-service",
    "escape-suite-root",
    "escape-suite-rootless",
    "escape-suite-build",
    "escape-packaged-binary-path",
    "escape-mount-cgroup-release-agent",
    "v1-hybrid-cgroups",
];

/// Checks that can only be NOT-APPLICABLE on a pure v2 host (never a PASS there).
const NOT_APPLICABLE: &[&str] = &["escape-mount-cgroup-release-agent", "v1-hybrid-cgroups"];

/// Checks the guest may report as KNOWN-ISSUE (a failure for a known, reported reason), with
/// the reason; a PASS is fine too. Anything else reported KNOWN-ISSUE fails this test. None
/// today: every check must pass (or be one of [`NOT_APPLICABLE`]).
const KNOWN_ISSUES: &[(&str, &str)] = &[];

/// The escape suite executables run in the guest (tests/tests/NAME.rs).
const ESCAPE_SUITES: &[&str] = &["escape", "escape_rootless", "escape_build"];

/// The whole stage: a cold root build (debootstrap, the kernel) plus qemu's own timeout.
const DEADLINE: Duration = Duration::from_secs(30 * 60);

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    if let Some(t) = profile_dir().parent() {
        c.env("CARGO_TARGET_DIR", t);
    }
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

/// The Debian package to install in the guest (see the module documentation).
fn package() -> PathBuf {
    if let Some(p) = std::env::var_os("CARAPACE_VM_DEB") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CARAPACE_VM_DEB={} is not a file", p.display());
        return p;
    }
    let reuse = std::env::var("CARAPACE_PACKAGE_REUSE").as_deref() == Ok("1");
    let release = profile_dir()
        .parent()
        .map_or_else(|| PathBuf::from("target/release"), |t| t.join("release"));
    let mut c = Command::new(repo_root().join("supervisor/packaging/build-deb"));
    c.current_dir(repo_root()).stderr(Stdio::inherit());
    if let Some(t) = profile_dir().parent() {
        c.env("CARGO_TARGET_DIR", t);
    }
    if reuse {
        c.arg("--reuse-binaries");
    } else {
        eprintln!(
            "vm: supervisor/packaging/build-deb builds the release binaries first (about 10 \
             minutes from a cold {}; CARAPACE_PACKAGE_REUSE=1 packages what is there)",
            release.display()
        );
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run supervisor/packaging/build-deb: {e}"));
    if !out.status.success() {
        let missing: Vec<&str> = [
            "carapace",
            "carapace-client",
            "carapace-gateway",
            "carapace-channel",
        ]
        .into_iter()
        .filter(|b| !release.join(b).is_file())
        .collect();
        panic!(
            "supervisor/packaging/build-deb{} failed ({}){}",
            if reuse { " --reuse-binaries" } else { "" },
            out.status,
            if reuse && !missing.is_empty() {
                format!(
                    ": {} lacks {missing:?}; build them with `cargo build --release -p carapace \
                     -p carapace-broker -p carapace-gateway -p carapace-channels --bins` (about \
                     10 minutes on a busy 2-core machine), or unset CARAPACE_PACKAGE_REUSE to let \
                     build-deb build them",
                    release.display()
                )
            } else {
                String::new()
            }
        );
    }
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        deb.is_file() && deb.extension().is_some_and(|e| e == "deb"),
        "build-deb printed {deb:?}, not a .deb"
    );
    deb
}

/// Test executables of `cargo test ARGS --no-run`, by target name (as `cargo test` builds
/// them, so that in CI they are already there).
fn test_executables(args: &[&str], names: &[&str]) -> Vec<PathBuf> {
    let mut c = cargo();
    c.args(["test", "--no-run", "--message-format=json"])
        .args(args)
        .stderr(Stdio::inherit());
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(
        out.status.success(),
        "cargo test {args:?} --no-run failed: {}",
        out.status
    );
    let found: Vec<(String, PathBuf)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            let exe = m["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect();
    names
        .iter()
        .map(|n| {
            found
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| panic!("cargo did not name the test executable {n}"))
        })
        .collect()
}

/// The sandbox crate's unit test executable (its `cgroup::` tests run in the guest).
fn sandbox_test_binary() -> PathBuf {
    let mut v = test_executables(&["--workspace", "--lib"], &["carapace_sandbox"]);
    v.remove(0)
}

/// The escape suite executables ([`ESCAPE_SUITES`]).
fn escape_test_binaries() -> Vec<PathBuf> {
    let mut args = vec!["-p", "carapace-tests"];
    for s in ESCAPE_SUITES {
        args.extend(["--test", s]);
    }
    test_executables(&args, ESCAPE_SUITES)
}

fn join_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
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
fn run_vm(out: &Path, deb: &Path, testbin: &Path, escape: &[PathBuf], attacks: &Path) -> Run {
    let _ = std::fs::remove_dir_all(out);
    let mut child = Command::new(repo_root().join("tests/vm/run.sh"))
        .arg(out)
        .env("CARAPACE_VM_DEB", deb)
        .env("CARAPACE_VM_TESTBINS", testbin)
        .env("CARAPACE_VM_ESCAPE", join_paths(escape))
        .env("CARAPACE_VM_ATTACKS", attacks)
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
    let deb = package();
    let testbin = sandbox_test_binary();
    let escape = escape_test_binaries();
    // Compiled here (cc), copied into the guest, which has no compiler.
    let attacks = &carapace_tests::attacks().dir;
    let out = profile_dir().join("vm-pure-v2");
    let run = run_vm(&out, &deb, &testbin, &escape, attacks);
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
        let known = report
            .lines()
            .any(|l| l.starts_with(&format!("KNOWN-ISSUE {name}:")));
        if known {
            match KNOWN_ISSUES.iter().find(|(n, _)| n == name) {
                Some((_, why)) if !pass && !na => {
                    eprintln!("vm: KNOWN ISSUE, not a pass: {name}: {why}");
                }
                _ => problems.push(format!(
                    "{name}: reported as a known issue, which it is not"
                )),
            }
            continue;
        }
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
