//! Shared helpers for the end-to-end tests and the escape suite.
//!
//! - [`carapace_bin`] finds (or builds) the `carapace` binary under test.
//! - [`privileged`] implements the house rule: privileged tests FAIL when not run as root,
//!   unless `CARAPACE_ALLOW_SKIP=1` is set; they never skip silently.
//! - [`attacks`] compiles `tests/attacks/*.c` into one static binary (`attack NAME ARGS`), once
//!   per source version, into a content-addressed directory under /var/tmp (outside /tmp, which
//!   the sandbox replaces by a tmpfs, and readable by the sandbox's unprivileged host uid).
//! - [`escape_policy`] is `policies/default.toml` plus, before its first `[[exec]]`, a profile
//!   `escape` that extends `tool` with ONE read-exec mount (the attack directory), so attacks run
//!   under exactly the default tool confinement.
//! - [`run`] runs a command with a hard timeout and captures everything.
//! - [`Mode`]: the escape suite and the e2e tests run `carapace exec` as root, or started as the
//!   unprivileged [`ROOTLESS_UID`] through `setpriv` (rootless mode, [`as_rootless_user`]).

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

pub mod agent;
pub mod fake_discord;
pub mod fake_llm;
pub mod fake_signal_cli;
pub mod fake_slack;
pub mod fake_telegram;
pub mod irc_fake;
pub mod irc_server;
pub mod mail;
pub mod matrix_server;
pub mod rpc;
pub mod service;
pub mod webdriver;

pub use service::{
    alive, free_port, gateway_bin, http, http_bearer, http_with, policy_text, processes_running,
    program_of, status_field, wait_gone, HttpResponse, Service, StartOpts,
};

pub use fake_llm::{FakeLlm, RecordedRequest, Scripted, Usage};
pub use rpc::{ConnectError, Frame, RpcClient, RpcError, RpcOutcome, WaitError};

/// Where the default tool profile shows the workspace inside the sandbox.
pub const WS: &str = "/workspace";
/// Host uid/gid the sandboxed program runs as by default (`--run-as` default).
pub const SANDBOX_HOST_UID: u32 = 65534;
/// The unprivileged user rootless tests start carapace as (no passwd entry needed; a uid no
/// other process on the machine uses).
pub const ROOTLESS_UID: u32 = 2_000_000;
/// Signal numbers used in expectations.
pub const SIGSYS: i32 = libc::SIGSYS;
pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGXFSZ: i32 = libc::SIGXFSZ;
/// `carapace exec` exit codes.
pub const EXIT_TIMEOUT: i32 = 124;
pub const EXIT_DENIED: i32 = 125;
pub const EXIT_CANNOT_START: i32 = 126;

/// The repository root (parent of this crate).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Poll `f` every 50 ms until it gives a value; panics naming `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fail (never skip) unless running as root: the `suite` end-to-end tests run `carapace run`.
pub fn require_root(suite: &str) {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "the {suite} end-to-end tests need root (they run `carapace run`); run them with .ci/test"
    );
}

/// Text of `policies/default.toml` (the policy embedded in the binary).
pub fn default_policy_text() -> String {
    let p = repo_root().join("policies/default.toml");
    match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) => panic!("cannot read the default policy {}: {e}", p.display()),
    }
}

/// A value unique to this process and call, for markers, secrets and file names.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ------------------------------------------------------------------------------------------
// Root check

/// True when privileged tests may run. Not root: panics with a clear message, unless
/// `CARAPACE_ALLOW_SKIP=1`, in which case it says so on stderr and returns false.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: needs root (euid {euid}); CARAPACE_ALLOW_SKIP=1 is set");
        return false;
    }
    panic!(
        "this test needs root (carapace creates namespaces, cgroups and idmapped mounts); \
         run `cargo test -p carapace-tests` as root, or set CARAPACE_ALLOW_SKIP=1 to skip it"
    );
}

/// How a test runs `carapace exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As root (the sandbox gets an unprivileged host uid of its own).
    Root,
    /// Started as the unprivileged [`ROOTLESS_UID`] (`setpriv`): rootless mode, the sandbox runs
    /// as that uid, no cgroup on this machine (rlimits instead).
    Rootless,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Root => "root",
            Mode::Rootless => "rootless",
        }
    }
}

/// True when rootless tests may run: [`privileged`] (root is needed to become the test user
/// and hand it its workspace) and an unprivileged user may create a user namespace here
/// (checked once, by running `unshare -U true` as [`ROOTLESS_UID`]). Otherwise panics with the
/// reason, unless `CARAPACE_ALLOW_SKIP=1` (then says so and returns false).
pub fn rootless_possible() -> bool {
    if !privileged() {
        return false;
    }
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    let r = OK.get_or_init(|| {
        let o = Command::new("setpriv")
            .args(rootless_setpriv_args())
            .args(["unshare", "-U", "true"])
            .stdin(Stdio::null())
            .output();
        match o {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`setpriv ... unshare -U true` as uid {ROOTLESS_UID} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run setpriv (util-linux): {e}")),
        }
    });
    match r {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
                eprintln!("SKIPPED: rootless mode cannot run here: {why}; CARAPACE_ALLOW_SKIP=1");
                return false;
            }
            panic!(
                "this test runs carapace rootless, which cannot work here: {why} (unprivileged \
                 user namespaces disabled? kernel.unprivileged_userns_clone / \
                 user.max_user_namespaces); set CARAPACE_ALLOW_SKIP=1 to skip it"
            )
        }
    }
}

fn rootless_setpriv_args() -> [String; 4] {
    [
        format!("--reuid={ROOTLESS_UID}"),
        format!("--regid={ROOTLESS_UID}"),
        "--clear-groups".to_string(),
        "--".to_string(),
    ]
}

/// `cmd` (program, arguments, explicitly set environment, cwd) run as [`ROOTLESS_UID`] with no
/// supplementary groups: `setpriv --reuid=U --regid=U --clear-groups -- PROGRAM ARGS...`, with
/// an environment of only what `cmd` set explicitly, stdin null (callers may replace it).
pub fn as_rootless_user(cmd: &Command) -> Command {
    let mut c = Command::new("setpriv");
    c.args(rootless_setpriv_args())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear()
        .stdin(Stdio::null());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// Give `path` to [`ROOTLESS_UID`] (chown, not recursive).
pub fn give_to_rootless_user(path: &Path) {
    std::os::unix::fs::chown(path, Some(ROOTLESS_UID), Some(ROOTLESS_UID))
        .unwrap_or_else(|e| panic!("chown {} to {ROOTLESS_UID}: {e}", path.display()));
}

// ------------------------------------------------------------------------------------------
// The binary under test

fn newest_mtime(dir: &Path, newest: &mut SystemTime) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            newest_mtime(&p, newest);
        } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
            if m > *newest {
                *newest = m;
            }
        }
    }
}

/// Is `bin` older than any source it is built from?
fn is_stale(bin: &Path) -> bool {
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let root = repo_root();
    let mut newest = UNIX_EPOCH;
    for d in ["supervisor", "policy/src", "broker/src", "policies"] {
        newest_mtime(&root.join(d), &mut newest);
    }
    newest > built
}

fn build_carapace(target_dir: &Path, release: bool) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "-p", "carapace", "--bin", "carapace"])
        .env("CARGO_TARGET_DIR", target_dir);
    if release {
        cmd.arg("--release");
    }
    eprintln!("carapace-tests: building the carapace binary: {cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => {
            panic!("`cargo build -p carapace` failed ({s}); set CARAPACE_BIN to a built binary")
        }
        Err(e) => panic!("cannot run cargo to build carapace: {e}; set CARAPACE_BIN"),
    }
    target_dir
        .join(if release { "release" } else { "debug" })
        .join("carapace")
}

/// The `carapace` binary: `$CARAPACE_BIN`, else `carapace` in the target directory of this test
/// executable (rebuilt when older than its sources), else built once with
/// `cargo build -p carapace --bin carapace` into that same target directory.
pub fn carapace_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CARAPACE_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "CARAPACE_BIN={} is not a file", p.display());
            return p;
        }
        // current_exe = <target>/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
            .to_path_buf();
        let candidate = profile_dir.join("carapace");
        if candidate.is_file() && !is_stale(&candidate) {
            return candidate;
        }
        let target_dir = profile_dir.parent().unwrap_or(&profile_dir).to_path_buf();
        let release = profile_dir.file_name() == Some(OsStr::new("release"));
        build_carapace(&target_dir, release)
    })
}

// ------------------------------------------------------------------------------------------
// Attack programs

/// The compiled attack binary and its directory.
#[derive(Debug)]
pub struct Attacks {
    /// Directory holding the binary; mounted read-exec in the `escape` profile.
    pub dir: PathBuf,
    /// `dir/attack`.
    pub bin: PathBuf,
    /// `dir/rw-target`: a world-writable (0666) file inside the read-only attack mount.
    pub rw_target: PathBuf,
    /// `dir/suid-whoami`: set-uid root, prints "ruid euid" (nothing else).
    pub suid_whoami: PathBuf,
    /// `dir/python`: python attack scripts (copied from tests/attacks/*.py).
    pub py_dir: PathBuf,
}

fn compile_attacks() -> Result<Attacks> {
    let src = repo_root().join("tests/attacks");
    let mut files: Vec<PathBuf> = fs::read_dir(&src)
        .with_context(|| format!("read {}", src.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(OsStr::to_str),
                Some("c") | Some("h") | Some("py")
            )
        })
        .collect();
    let suid_src = src.join("suid/whoami.c");
    files.push(suid_src.clone());
    files.sort();
    let mut h = DefaultHasher::new();
    for f in &files {
        f.file_name().hash(&mut h);
        fs::read(f)
            .with_context(|| format!("read {}", f.display()))?
            .hash(&mut h);
    }
    let dir = PathBuf::from(format!(
        "/var/tmp/carapace-attacks-{}-{:016x}",
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() },
        h.finish()
    ));
    let out = Attacks {
        bin: dir.join("attack"),
        suid_whoami: dir.join("suid-whoami"),
        rw_target: dir.join("rw-target"),
        py_dir: dir.join("python"),
        dir,
    };
    if out.bin.is_file() && out.rw_target.is_file() && out.suid_whoami.is_file() {
        return Ok(out);
    }
    let tmp = PathBuf::from(format!("{}.tmp{}", out.dir.display(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("python")).with_context(|| format!("mkdir {}", tmp.display()))?;
    let cfiles: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension() == Some(OsStr::new("c")) && **p != suid_src)
        .collect();
    let mut last_err = String::new();
    let mut built = false;
    for flags in [
        &["-O1", "-static", "-no-pie"][..],
        &["-O1", "-no-pie"][..],
        &["-O1"][..],
    ] {
        let o = Command::new("cc")
            .args(flags)
            .args(["-Wall", "-o"])
            .arg(tmp.join("attack"))
            .args(&cfiles)
            .output()
            .context("run cc (is a C compiler installed?)")?;
        if o.status.success() {
            built = true;
            break;
        }
        last_err = String::from_utf8_lossy(&o.stderr).into_owned();
    }
    if !built {
        bail!("cannot compile the attack programs:\n{last_err}");
    }
    for f in files
        .iter()
        .filter(|p| p.extension() == Some(OsStr::new("py")))
    {
        if let Some(name) = f.file_name() {
            fs::copy(f, tmp.join("python").join(name))?;
        }
    }
    // The set-uid-root helper only prints its ids (see tests/attacks/suid/whoami.c).
    let o = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(tmp.join("suid-whoami"))
        .arg(&suid_src)
        .output()
        .context("run cc")?;
    if !o.status.success() {
        bail!(
            "cannot compile {}: {}",
            suid_src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    fs::set_permissions(tmp.join("suid-whoami"), fs::Permissions::from_mode(0o4755))?;
    fs::write(tmp.join("rw-target"), "ORIGINAL\n")?;
    fs::set_permissions(tmp.join("rw-target"), fs::Permissions::from_mode(0o666))?;
    for d in [tmp.clone(), tmp.join("python")] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    }
    remove_stale_attack_dirs(&out.dir);
    match fs::rename(&tmp, &out.dir) {
        Ok(()) => {}
        // Another test process won the race: use its copy.
        Err(_) if out.bin.is_file() => {
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).context(format!("rename to {}", out.dir.display())),
    }
    Ok(out)
}

/// Remove attack directories of older source versions (unused for an hour: no test process of
/// that version can still be running).
fn remove_stale_attack_dirs(current: &Path) {
    let (Some(parent), Some(name)) = (current.parent(), current.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Some(prefix) = name.rsplit_once('-').map(|(p, _)| format!("{p}-")) else {
        return;
    };
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if n.starts_with(&prefix) && *n != *name && old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The attack binary, compiled once per process (and cached across runs by source hash).
pub fn attacks() -> &'static Attacks {
    static A: OnceLock<Attacks> = OnceLock::new();
    A.get_or_init(|| compile_attacks().unwrap_or_else(|e| panic!("{e:#}")))
}

// ------------------------------------------------------------------------------------------
// Policies

/// The default policy for tests that insert, before its rules, one allowing
/// `/usr/bin/python3` with any arguments: without the default's rule for `python3 -m pytest`
/// and friends, which such a rule would make unreachable (an error). That rule is pinned by the
/// policy's own `[[test]]`s and the compatibility suite.
pub fn default_policy_without_python_module_rule() -> String {
    let text = default_policy_text();
    let marker = "[[exec]]\nwhy = \"python's test runner";
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("the default policy has no `python3 -m` rule any more"));
    let end = text[start + 1..]
        .find("\n[[exec]]")
        .map_or(text.len(), |i| start + 1 + i + 1);
    format!("{}{}", &text[..start], &text[end..])
}

/// Insert `extra` before the first `[[exec]]` of `base`.
pub fn insert_before_first_exec(base: &str, extra: &str) -> String {
    let at = if base.starts_with("[[exec]]") {
        0
    } else {
        base.find("\n[[exec]]")
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("the default policy has no [[exec]] rule to insert before"))
    };
    format!("{}{}\n{}", &base[..at], extra, &base[at..])
}

/// The escape-suite policy: the default policy plus profile `escape` (= `base`, a profile of the
/// default policy such as `tool` or `build`, + a read-exec mount of the attack directory),
/// `escape_wall` (the same with `wall_time = WALL`), and rules running the attack binary and
/// /usr/bin/python3 under them.
pub fn escape_policy(a: &Attacks, wall: &str, base: &str) -> String {
    let dir = a.dir.display();
    let py = a.py_dir.display();
    let extra = format!(
        r#"# ---- inserted by carapace-tests: the escape suite's profile and rules ----
[profiles.escape]
extends = "{base}"
why = "escape suite: exactly the default {base} profile plus the attack programs"

[profiles.escape.filesystem]
mounts = [ {{ path = "{dir}", access = "read-exec", why = "attack programs of the escape suite" }} ]

[profiles.escape_wall]
extends = "escape"
why = "escape suite: the escape profile with a short wall-time limit"

[profiles.escape_wall.limits]
wall_time = "{wall}"

[[exec]]
why = "escape suite: the spin attack runs under a short wall time"
program = "{dir}/attack"
args = ["spin", "**"]
profile = "escape_wall"
approval = "allow"

[[exec]]
why = "escape suite: the attack programs"
program = "{dir}/attack"
args = ["**"]
profile = "escape"
approval = "allow"

[[exec]]
why = "escape suite: attacks written in python"
program = "/usr/bin/python3"
args = ["{py}/attack.py", "**"]
profile = "escape"
approval = "allow"
# ---- end of insertion ----
"#
    );
    insert_before_first_exec(&default_policy_text(), &extra)
}

// ------------------------------------------------------------------------------------------
// Running things

/// The result of one command.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The harness had to kill it after its own timeout.
    pub hung: bool,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "code={:?} signal={:?} elapsed={:?} hung={}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.signal, self.elapsed, self.hung, self.stdout, self.stderr
        )
    }
    /// The ESCAPED/BLOCKED line of an attack, if any.
    pub fn verdict_line(&self) -> Option<&str> {
        self.stdout
            .lines()
            .find(|l| l.starts_with("ESCAPED ") || l.starts_with("BLOCKED "))
    }
    pub fn escaped(&self) -> bool {
        self.code == Some(0) && self.stdout.lines().any(|l| l.starts_with("ESCAPED "))
    }
}

fn pump<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Run `cmd` (stdout/stderr captured; stdin null unless the caller set it), killing it after
/// `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Outcome {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let out = pump(child.stdout.take());
    let err = pump(child.stderr.take());
    let mut hung = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > limit => {
                hung = true;
                let _ = child.kill();
                match child.wait() {
                    Ok(s) => break s,
                    Err(e) => panic!("wait: {e}"),
                }
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait: {e}"),
        }
    };
    let elapsed = start.elapsed();
    Outcome {
        code: status.code(),
        signal: status.signal(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
        hung,
    }
}

/// Make `fd` (open in this process) appear as `target` in the child, inherited (no CLOEXEC).
pub fn pass_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs between fork and exec and only calls dup2/fcntl, which are
    // async-signal-safe, touch no memory of the parent and allocate nothing. `fd` stays open in
    // the parent until spawn returns because the caller owns it for the duration of the call.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                let fl = libc::fcntl(fd, libc::F_GETFD);
                if fl < 0 || libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `carapace exec [--policy P] --workspace W EXTRA... -- PROGRAM ARGS...`, stdin null, an empty
/// environment plus PATH (callers add what they test).
pub fn carapace_exec(
    policy: Option<&Path>,
    workspace: &Path,
    extra: &[&str],
    program: impl AsRef<OsStr>,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new(carapace_bin());
    cmd.arg("exec");
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    cmd.arg("--workspace")
        .arg(workspace)
        .args(extra)
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    cmd
}

/// A temporary directory that the test owns (removed on drop).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

// ------------------------------------------------------------------------------------------
// The escape-suite context

/// One escape test: a fresh workspace, the escape policy written next to it.
#[derive(Debug)]
pub struct Escape {
    /// Root or rootless (see [`Mode`]).
    pub mode: Mode,
    /// The default policy's profile the attacks run in (`tool` or `build`).
    pub base: &'static str,
    pub attacks: &'static Attacks,
    /// Host path of the workspace (shown as [`WS`] inside).
    pub ws: tempfile::TempDir,
    /// Scratch space on the host, outside the workspace (secrets, controls).
    pub scratch: tempfile::TempDir,
    pub policy: PathBuf,
}

impl Escape {
    /// None when not root and skipping is allowed (see [`privileged`]).
    pub fn new() -> Option<Escape> {
        Self::in_mode(Mode::Root)
    }

    /// [`Escape::new`] in `mode` (rootless: None also when rootless mode cannot run here and
    /// skipping is allowed, see [`rootless_possible`]).
    pub fn in_mode(mode: Mode) -> Option<Escape> {
        Self::with_wall_in(mode, "3s")
    }

    /// [`Escape::in_mode`], the attacks running in the default policy's profile `base`.
    pub fn on(mode: Mode, base: &'static str) -> Option<Escape> {
        Self::build(mode, "3s", base)
    }

    pub fn with_wall(wall: &str) -> Option<Escape> {
        Self::with_wall_in(Mode::Root, wall)
    }

    /// In rootless mode the workspace belongs to [`ROOTLESS_UID`], the scratch directory may be
    /// traversed (not listed) by it and the policy file is readable: carapace runs as that
    /// user.
    pub fn with_wall_in(mode: Mode, wall: &str) -> Option<Escape> {
        Self::build(mode, wall, "tool")
    }

    fn build(mode: Mode, wall: &str, base: &'static str) -> Option<Escape> {
        let ok = match mode {
            Mode::Root => privileged(),
            Mode::Rootless => rootless_possible(),
        };
        if !ok {
            return None;
        }
        let attacks = attacks();
        let _ = carapace_bin();
        let ws = tempdir("carapace-ws-");
        let scratch = tempdir("carapace-scratch-");
        let policy = scratch.path().join("escape.toml");
        fs::write(&policy, escape_policy(attacks, wall, base)).unwrap_or_else(|e| panic!("{e}"));
        if mode == Mode::Rootless {
            give_to_rootless_user(ws.path());
            for (p, m) in [(scratch.path(), 0o711), (policy.as_path(), 0o644)] {
                fs::set_permissions(p, fs::Permissions::from_mode(m))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
            }
        }
        Some(Escape {
            mode,
            base,
            attacks,
            ws,
            scratch,
            policy,
        })
    }

    pub fn ws(&self) -> &Path {
        self.ws.path()
    }

    /// `carapace exec --policy <escape policy> --workspace <ws> EXTRA -- PROGRAM ARGS`, as root
    /// or as [`ROOTLESS_UID`] per the mode.
    pub fn carapace(&self, extra: &[&str], program: impl AsRef<OsStr>, args: &[&str]) -> Command {
        self.carapace_in(self.ws(), extra, program, args)
    }

    /// [`Escape::carapace`] with another workspace (rootless: give it to the user first, see
    /// [`Escape::give`]).
    pub fn carapace_in(
        &self,
        workspace: &Path,
        extra: &[&str],
        program: impl AsRef<OsStr>,
        args: &[&str],
    ) -> Command {
        let c = carapace_exec(Some(&self.policy), workspace, extra, program, args);
        match self.mode {
            Mode::Root => c,
            Mode::Rootless => as_rootless_user(&c),
        }
    }

    /// Rootless: hand `path` (a directory the test made for carapace) to [`ROOTLESS_UID`].
    pub fn give(&self, path: &Path) {
        if self.mode == Mode::Rootless {
            give_to_rootless_user(path);
        }
    }

    /// The host uid the sandboxed program runs as (and the victims' uid, so that only the
    /// sandbox and not plain DAC protects them): [`SANDBOX_HOST_UID`] as root (victims; the
    /// program itself gets a per-run uid), [`ROOTLESS_UID`] rootless.
    pub fn host_uid(&self) -> u32 {
        match self.mode {
            Mode::Root => SANDBOX_HOST_UID,
            Mode::Rootless => ROOTLESS_UID,
        }
    }

    /// A victim process on the host running as [`Escape::host_uid`].
    pub fn marker(&self) -> Marker {
        Marker::spawn_as(self.attacks, self.host_uid())
    }

    /// Rootless: say that the part of a check needing a cgroup is not applicable.
    pub fn not_applicable(&self, what: &str) {
        eprintln!("not applicable in rootless mode: needs a cgroup ({what})");
    }

    /// The attack under carapace with the escape policy.
    pub fn confined(&self, attack: &str, args: &[&str]) -> Command {
        let mut a = vec![attack];
        a.extend_from_slice(args);
        self.carapace(&[], &self.attacks.bin, &a)
    }

    /// The same attack directly on the host, as root (the CONTROL).
    pub fn host(&self, attack: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.attacks.bin);
        cmd.arg(attack)
            .args(args)
            .stdin(Stdio::null())
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        cmd
    }

    /// Run the CONTROL and assert the attack works on the unconfined host.
    pub fn control_escapes(&self, mut cmd: Command) -> Outcome {
        let o = run(&mut cmd, Duration::from_secs(60));
        eprintln!("CONTROL:  {}", o.verdict_line().unwrap_or("(no verdict)"));
        assert!(
            o.escaped(),
            "CONTROL: the attack should succeed unconfined on the host (else the confined run \
             proves nothing):\n{}",
            o.describe()
        );
        o
    }

    /// Run the CONFINED attack and assert that it ran and was blocked (BLOCKED, or killed by
    /// one of `ok_signals`).
    pub fn confined_blocked(&self, mut cmd: Command, ok_signals: &[i32]) -> Outcome {
        let o = run(&mut cmd, Duration::from_secs(90));
        assert_confined_blocked(&o, ok_signals);
        o
    }

    /// Plant a secret file at `path` (host), returning the secret.
    pub fn plant_secret(&self, path: &Path) -> String {
        let secret = unique("CARAPACE-SECRET");
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        fs::write(path, format!("{secret}\n"))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        secret
    }
}

/// Assert that a confined attack really ran (its START line is there: carapace did not refuse
/// it) and was blocked: exit 1 with a BLOCKED line, or killed by one of `ok_signals`
/// (carapace reports 128+N).
pub fn assert_confined_blocked(o: &Outcome, ok_signals: &[i32]) {
    eprintln!(
        "CONFINED: {} (exit {:?})",
        o.verdict_line().unwrap_or("(no verdict)"),
        o.code
    );
    assert!(!o.hung, "the confined attack hung:\n{}", o.describe());
    assert!(
        o.stdout.lines().any(|l| l.starts_with("START ")),
        "the attack did not run under carapace (policy refused or setup failed), so nothing was \
         tested:\n{}",
        o.describe()
    );
    assert!(
        !o.stdout.lines().any(|l| l.starts_with("ESCAPED ")),
        "ESCAPE: the attack succeeded under carapace:\n{}",
        o.describe()
    );
    let by_signal = o
        .code
        .is_some_and(|c| c > 128 && ok_signals.contains(&(c - 128)));
    let by_block = o.code == Some(1) && o.stdout.lines().any(|l| l.starts_with("BLOCKED "));
    assert!(
        by_signal || by_block,
        "the attack neither reported BLOCKED nor died of an expected signal {ok_signals:?}:\n{}",
        o.describe()
    );
}

/// A victim process on the host: `attack marker TOKEN`, running as the sandbox's host uid (so
/// only namespaces/capabilities, not plain DAC, protect it).
#[derive(Debug)]
pub struct Marker {
    child: Child,
    pub pid: u32,
    /// Address of the token in the marker's memory.
    pub addr: String,
    pub token: String,
}

impl Marker {
    pub fn spawn(a: &Attacks) -> Marker {
        Marker::spawn_as(a, SANDBOX_HOST_UID)
    }

    /// The marker running as host uid/gid `uid`.
    pub fn spawn_as(a: &Attacks, uid: u32) -> Marker {
        let token = unique("CARAPACE-MARKER");
        let mut child = Command::new(&a.bin)
            .args(["marker", &token])
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn marker: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap_or_else(|| panic!("no stdout")));
        let mut addr = String::new();
        let mut l = String::new();
        while lines.read_line(&mut l).unwrap_or(0) > 0 {
            if let Some(rest) = l.trim().strip_prefix("READY ") {
                addr = rest.split(' ').nth(1).unwrap_or("0").to_string();
                break;
            }
            l.clear();
        }
        assert!(!addr.is_empty(), "marker did not start");
        let pid = child.id();
        Marker {
            child,
            pid,
            addr,
            token,
        }
    }

    /// Still running (not exited, not a zombie)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host processes whose command line contains `needle` (from /proc).
pub fn host_processes_with(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let s = String::from_utf8_lossy(&c).replace('\0', " ");
            if s.contains(needle) {
                // Zombies have an empty cmdline, so anything here is really running.
                out.push((pid, s));
            }
        }
    }
    out
}

/// Lines of the host's /proc/self/mountinfo containing `needle`.
pub fn host_mounts_with(needle: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// A pseudo-terminal pair (master, slave).
pub fn openpty() -> (OwnedFd, OwnedFd) {
    let mut m: libc::c_int = -1;
    let mut s: libc::c_int = -1;
    // SAFETY: both out-pointers are valid; name/termios/winsize may be NULL per openpty(3).
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    use std::os::fd::FromRawFd;
    // SAFETY: openpty succeeded, so m and s are fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

/// Whatever is pending in the input queue of a tty (read non-blocking from the slave side).
pub fn tty_pending_input(slave: &OwnedFd) -> String {
    let fd = slave.as_raw_fd();
    // SAFETY: fd is a valid open descriptor owned by `slave` for the duration of these calls;
    // the buffer is a local array of the size passed to read.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        let mut buf = [0u8; 256];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::fcntl(fd, libc::F_SETFL, fl);
        if n > 0 {
            String::from_utf8_lossy(&buf[..n as usize]).into_owned()
        } else {
            String::new()
        }
    }
}

/// Device numbers of the filesystem holding `p` (for the mknod attack).
pub fn dev_major_minor(p: &Path) -> (u32, u32) {
    let dev = fs::metadata(p).map(|m| m.dev()).unwrap_or(0);
    (libc::major(dev), libc::minor(dev))
}

/// Parse `--report-json` output.
pub fn read_report(p: &Path) -> serde_json::Value {
    let t = fs::read_to_string(p).unwrap_or_else(|e| panic!("read report {}: {e}", p.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{t}"))
}

// ------------------------------------------------------------------------------------------
// The broker: the client binary inside the sandbox, brokered policies

/// `carapace-client` copied into a content-addressed directory under /var/tmp (readable and
/// executable by the sandbox's host uid; outside /tmp, which the sandbox replaces).
#[derive(Debug)]
pub struct ClientBin {
    /// Directory holding the copies; mounted read-exec by the brokered test profiles.
    pub dir: PathBuf,
    /// `dir/carapace-client`.
    pub bin: PathBuf,
    /// `dir/carapace-client-other`: the same bytes under another name, so that a policy can
    /// run it under another profile (rules select profiles by program).
    pub other: PathBuf,
}

fn build_client(profile_dir: &Path) -> PathBuf {
    let target_dir = profile_dir.parent().unwrap_or(profile_dir).to_path_buf();
    let release = profile_dir.file_name() == Some(OsStr::new("release"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "-p", "carapace-broker", "--bin", "carapace-client"])
        .env("CARGO_TARGET_DIR", &target_dir);
    if release {
        cmd.arg("--release");
    }
    eprintln!("carapace-tests: building carapace-client: {cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`cargo build -p carapace-broker` failed ({s}); set CARAPACE_CLIENT_BIN to a built \
             binary"
        ),
        Err(e) => panic!("cannot run cargo to build carapace-client: {e}"),
    }
    profile_dir.join("carapace-client")
}

/// The `carapace-client` binary (`$CARAPACE_CLIENT_BIN`, else built with cargo into the target
/// directory of this test executable; cargo does nothing when it is fresh), copied for the
/// sandbox (see [`ClientBin`]).
pub fn client_bin() -> &'static ClientBin {
    static C: OnceLock<ClientBin> = OnceLock::new();
    C.get_or_init(|| {
        let built = match std::env::var_os("CARAPACE_CLIENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
                let profile_dir = exe
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
                    .to_path_buf();
                build_client(&profile_dir)
            }
        };
        let bytes = fs::read(&built).unwrap_or_else(|e| panic!("read {}: {e}", built.display()));
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let dir = PathBuf::from(format!(
            "/var/tmp/carapace-client-{}-{:016x}",
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() },
            h.finish()
        ));
        let out = ClientBin {
            bin: dir.join("carapace-client"),
            other: dir.join("carapace-client-other"),
            dir,
        };
        if out.bin.is_file() && out.other.is_file() {
            return out;
        }
        let tmp = PathBuf::from(format!("{}.tmp{}", out.dir.display(), std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let setup = || -> Result<()> {
            fs::create_dir_all(&tmp)?;
            for name in ["carapace-client", "carapace-client-other"] {
                fs::write(tmp.join(name), &bytes)?;
                fs::set_permissions(tmp.join(name), fs::Permissions::from_mode(0o755))?;
            }
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
            Ok(())
        };
        setup().unwrap_or_else(|e| panic!("copy carapace-client to {}: {e:#}", tmp.display()));
        remove_stale_attack_dirs(&out.dir);
        match fs::rename(&tmp, &out.dir) {
            Ok(()) => {}
            Err(_) if out.bin.is_file() => {
                let _ = fs::remove_dir_all(&tmp);
            }
            Err(e) => panic!("rename to {}: {e}", out.dir.display()),
        }
        out
    })
}

/// A directory under /var/tmp (visible to the sandbox's host uid, outside the sandbox's /tmp),
/// mode 0755, removed on drop.
pub fn var_tmpdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap_or_else(|e| panic!("tempdir in /var/tmp: {e}"));
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", d.path().display()));
    d
}

/// `carapace exec --policy P --workspace W --state-dir S -- PROGRAM ARGS...` (stdin null, PATH
/// only in the environment).
pub fn carapace_exec_brokered(
    policy: &Path,
    workspace: &Path,
    state_dir: &Path,
    program: impl AsRef<OsStr>,
    args: &[&str],
) -> Command {
    let state = state_dir.to_string_lossy().into_owned();
    carapace_exec(
        Some(policy),
        workspace,
        &["--state-dir", &state],
        program,
        args,
    )
}

/// Directories named `name_prefix*` beneath /sys/fs/cgroup (a few levels deep, no symlinks):
/// the cgroups carapace made (`exec-<pid>-<n>`, `tool-<pid>-<n>`).
pub fn cgroup_dirs_named(name_prefix: &str) -> Vec<PathBuf> {
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
