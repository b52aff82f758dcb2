//! `carapace run` under test: the real supervisor started as a process with a configuration in
//! a temporary directory, its gateway listening on a loopback port, sd_notify messages on a test
//! `NOTIFY_SOCKET`, the operator CLI over its control socket.
//!
//! - [`Service`] starts one ([`Service::start`], [`Service::start_opts`] with [`StartOpts`]),
//!   waits for `READY=1`, runs operator commands ([`Service::ctl`], [`Service::status`],
//!   [`Service::token`]), signals and stops it; dropping it stops it (SIGTERM, then SIGKILL).
//! - [`gateway_bin`] finds (or builds) the `carapace-gateway` binary.
//! - [`http`] / [`http_with`]: one HTTP/1.1 request (`Connection: close`) with a plain
//!   `TcpStream`.
//! - [`program_of`], [`status_field`], [`alive`], [`wait_gone`], [`processes_running`]: host
//!   processes as /proc shows them.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{
    as_rootless_user, carapace_bin, default_policy_text, give_to_rootless_user, pass_fd, repo_root,
    var_tmpdir,
};

// ------------------------------------------------------------------------------------------
// The gateway binary

/// Build `bin` of workspace package `package` into `profile_dir` (cargo does nothing when it is
/// fresh); its path.
fn build_bin(profile_dir: &Path, package: &str, bin: &str) -> PathBuf {
    let target_dir = profile_dir.parent().unwrap_or(profile_dir).to_path_buf();
    let release = profile_dir.file_name() == Some(OsStr::new("release"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target_dir);
    if release {
        cmd.arg("--release");
    }
    eprintln!("carapace-tests: building {bin}: {cmd:?}");
    let s = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(
        s.success(),
        "`cargo build -p {package}` failed ({s}); set the binary's *_BIN variable to a built one"
    );
    profile_dir.join(bin)
}

/// The profile directory (`target/debug`) of this test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
        .to_path_buf()
}

/// The gateway binary: `$CARAPACE_GATEWAY_BIN`, else built with cargo into the target directory
/// of this test executable (cargo does nothing when it is fresh). Built once per test process.
pub fn gateway_bin() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| match std::env::var_os("CARAPACE_GATEWAY_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_bin(&profile_dir(), "carapace-gateway", "carapace-gateway"),
    })
}

/// The channel adapter binary (`carapace-channel`): `$CARAPACE_CHANNEL_BIN`, else built like
/// [`gateway_bin`].
pub fn channel_bin() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| match std::env::var_os("CARAPACE_CHANNEL_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_bin(&profile_dir(), "carapace-channels", "carapace-channel"),
    })
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().map(|a| a.port()).unwrap_or(0)
}

/// The default policy with `extra` appended (e.g. a profile, a rule, a `[broker]` section).
/// Note that the first matching `[[exec]]` rule wins: a rule appended here only decides
/// programs the default rules do not match (see [`crate::insert_before_first_exec`]).
pub fn policy_text(extra: &str) -> String {
    format!("{}\n{extra}\n", default_policy_text())
}

/// How to start a [`Service`]; `StartOpts::default()` is what [`Service::start`] does with no
/// extra configuration.
#[derive(Debug)]
pub struct StartOpts {
    /// The gateway program (`[gateway] program`); `None`: [`gateway_bin`].
    pub program: Option<String>,
    /// The gateway's arguments as a TOML array (`[gateway] args`), e.g. `r#"["--x"]"#`.
    pub args: String,
    /// The whole policy text written to `policy.toml`; `None`: [`policy_text("")`](policy_text)
    /// (the default policy).
    pub policy: Option<String>,
    /// Appended to the configuration after the `[gateway]` table: more keys of `[gateway]`
    /// (e.g. `env = {...}`) or further tables (e.g. `[control]\ngroup = "4242"`).
    pub extra_config: String,
    /// Wait for `READY=1` from sd_notify before returning (30 s; panics with the log if the
    /// supervisor exits or does not get ready).
    pub ready: bool,
    /// Start as the unprivileged [`crate::ROOTLESS_UID`] (rootless mode; the test directory is
    /// given to that user).
    pub rootless: bool,
    /// The gateway's profile (`[gateway] profile`); `None`: `"gateway"`.
    pub gateway_profile: Option<String>,
    /// systemd socket activation: this listener becomes the supervisor's fd 3 (`LISTEN_FDS=1`,
    /// `LISTEN_FDNAMES=gateway`). It is closed in the test process once the supervisor runs.
    pub activated: Option<TcpListener>,
    /// Set `JOURNAL_STREAM` to the device and inode of the supervisor's stderr (its log file),
    /// as systemd does for `StandardError=journal`.
    pub journal_stream: bool,
    /// A command line put in front of the supervisor's (e.g. `unshare -m ... sh -c '...;
    /// exec "$0" "$@"'`); it must exec the supervisor, whose pid it keeps.
    pub wrapper: Vec<String>,
}

impl Default for StartOpts {
    fn default() -> StartOpts {
        StartOpts {
            program: None,
            args: "[]".to_string(),
            policy: None,
            extra_config: String::new(),
            ready: true,
            rootless: false,
            gateway_profile: None,
            activated: None,
            journal_stream: false,
            wrapper: Vec::new(),
        }
    }
}

/// A running `carapace run` (see the module documentation). Its files live in a fresh directory
/// under /var/tmp ([`Service::dir`]): `carapace.toml`, `policy.toml`, `state/`, `run/`
/// (control socket), `notify.sock`, `supervisor.log` (stdout and stderr, `CARAPACE_LOG=debug`).
#[derive(Debug)]
pub struct Service {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The configured `[gateway] listen` address (loopback, a free port).
    pub addr: SocketAddr,
    notify: UnixDatagram,
    notes: Vec<String>,
    log: PathBuf,
    rootless: bool,
    tokens_made: AtomicU32,
}

impl Service {
    /// Start `carapace run` with the default gateway and policy; `extra_config` is appended to
    /// the configuration (e.g. `[control] group = ...`). Waits for `READY=1`.
    pub fn start(extra_config: &str) -> Service {
        Service::start_opts(StartOpts {
            extra_config: extra_config.to_string(),
            ..StartOpts::default()
        })
    }

    /// Start with `program` and `args` (a TOML array) as the gateway; `ready`: wait for
    /// `READY=1`.
    pub fn start_with(program: &str, args: &str, extra_config: &str, ready: bool) -> Service {
        Service::start_opts(StartOpts {
            program: Some(program.to_string()),
            args: args.to_string(),
            extra_config: extra_config.to_string(),
            ready,
            ..StartOpts::default()
        })
    }

    /// Start with a custom policy text (the whole file, e.g. [`policy_text`] with additions) and
    /// extra configuration. Waits for `READY=1`.
    pub fn start_with_policy(policy: &str, extra_config: &str) -> Service {
        Service::start_opts(StartOpts {
            policy: Some(policy.to_string()),
            extra_config: extra_config.to_string(),
            ..StartOpts::default()
        })
    }

    /// Start as `opts` says.
    pub fn start_opts(opts: StartOpts) -> Service {
        let dir = var_tmpdir("carapace-svc-");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let policy = opts.policy.unwrap_or_else(|| policy_text(""));
        fs::write(dir.path().join("policy.toml"), policy)
            .unwrap_or_else(|e| panic!("write policy.toml: {e}"));
        let program = opts
            .program
            .unwrap_or_else(|| gateway_bin().display().to_string());
        let cfg = format!(
            r#"[supervisor]
policy = ["{policy}"]
state_dir = "{state}"
runtime_dir = "{run}"
stop_timeout = "3s"
approval_timeout = "30s"

[gateway]
program = "{gw}"
args = {args}
profile = "{profile}"
listen = "{addr}"
restart = {{ initial_delay = "100ms", max_delay = "1s", crash_loop_restarts = 5, crash_loop_window = "60s" }}
{extra_config}
"#,
            policy = dir.path().join("policy.toml").display(),
            state = dir.path().join("state").display(),
            run = dir.path().join("run").display(),
            gw = program,
            args = opts.args,
            profile = opts.gateway_profile.as_deref().unwrap_or("gateway"),
            extra_config = opts.extra_config,
        );
        fs::write(dir.path().join("carapace.toml"), cfg)
            .unwrap_or_else(|e| panic!("write carapace.toml: {e}"));
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)
            .unwrap_or_else(|e| panic!("bind {}: {e}", notify_path.display()));
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("supervisor.log");
        let logf = fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = supervisor_command(dir.path(), &notify_path);
        if opts.journal_stream {
            use std::os::unix::fs::MetadataExt as _;
            let m = logf.metadata().unwrap_or_else(|e| panic!("{e}"));
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        }
        if let Some((first, rest)) = opts.wrapper.split_first() {
            let mut w = Command::new(first);
            w.args(rest).arg(cmd.get_program()).args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    w.env(k, v);
                }
            }
            cmd = w;
        }
        if let Some(l) = &opts.activated {
            // systemd socket activation: the socket at fd 3, LISTEN_PID = the supervisor's
            // pid (known only in the shell that execs it).
            use std::os::fd::AsRawFd as _;
            pass_fd(&mut cmd, l.as_raw_fd(), 3);
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c")
                .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=gateway exec \"$0\" \"$@\"")
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    sh.env(k, v);
                }
            }
            pass_fd(&mut sh, l.as_raw_fd(), 3);
            cmd = sh;
        }
        if opts.rootless {
            // The unprivileged user owns the directory (its state, runtime dir and the
            // gateway's workspace are created in it) and may write to the notify socket.
            give_to_rootless_user(dir.path());
            fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o666))
                .unwrap_or_else(|e| panic!("{e}"));
            cmd = as_rootless_user(&cmd);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(
                logf.try_clone()
                    .map(Stdio::from)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .stderr(Stdio::from(logf))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn carapace run: {e}"));
        // The supervisor has its copy of the activated socket now.
        drop(opts.activated);
        let mut s = Service {
            dir,
            child: Some(child),
            addr,
            notify,
            notes: Vec::new(),
            log,
            rootless: opts.rootless,
            tokens_made: AtomicU32::new(0),
        };
        if opts.ready {
            s.wait_note("READY=1", Duration::from_secs(30));
        }
        s
    }

    /// Start the supervisor again on the same directory (configuration, policy, state) after
    /// it exited ([`Service::kill`], [`Service::stop`]); its log is appended to. Waits for
    /// `READY=1` (a new one). Root mode only.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart: carapace run is still running"
        );
        assert!(!self.rootless, "restart: root mode only");
        let logf = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let out = logf.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = supervisor_command(self.dir.path(), &self.dir.path().join("notify.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(logf))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn carapace run: {e}"));
        self.child = Some(child);
        self.notes.clear();
        self.wait_note("READY=1", Duration::from_secs(30));
    }

    /// The service's directory (see [`Service`]).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `policy.toml`: rewrite it and reload to change the policy.
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// `carapace.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("carapace.toml")
    }

    /// The state directory (`[supervisor] state_dir`: audit log, approvals, tokens, ...).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/control.sock")
    }

    /// The supervisor's log file (its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the supervisor (and the gateway through it) logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The supervisor's pid (panics once it was stopped or waited for).
    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .unwrap_or_else(|| panic!("carapace run is not running (stopped or waited for)"))
    }

    /// The sd_notify messages received so far, in order (see [`Service::wait_note`],
    /// [`Service::recv_note`]).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Wait up to 200 ms for one more sd_notify message; it is also kept in
    /// [`Service::notes`]. `None` when none came.
    pub fn recv_note(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).ok()?;
        let note = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.notes.push(note.clone());
        Some(note)
    }

    /// Read the notify socket until a message containing `needle` has arrived (now or before).
    /// Panics, with the log, if the supervisor exits first or nothing comes within `limit`.
    pub fn wait_note(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.notes.iter().any(|n| n.contains(needle)) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "carapace run exited ({st}) before {needle}; log:\n{}",
                        self.log_text()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} from sd_notify within {limit:?}; got {:?}; log:\n{}",
                self.notes,
                self.log_text()
            );
            self.recv_note();
        }
    }

    /// `carapace ARGS --socket S` (as root).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(carapace_bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap_or_else(|e| panic!("carapace {args:?}: {e}"))
    }

    /// `carapace status --json` (panics unless it succeeds with JSON).
    pub fn status(&self) -> serde_json::Value {
        let o = self.ctl(&["status", "--json"]);
        assert!(
            o.status.success(),
            "carapace status: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("status JSON: {e}: {}", String::from_utf8_lossy(&o.stdout)))
    }

    /// The `name` row of [`Service::status`]'s channel table.
    pub fn channel_status(&self, name: &str) -> serde_json::Value {
        let st = self.status();
        st["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["channel"] == name).cloned())
            .unwrap_or_else(|| panic!("no {name} channel in {st}"))
    }

    /// `carapace held list --json`'s messages.
    pub fn held(&self) -> Vec<serde_json::Value> {
        let o = self.ctl(&["held", "list", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("held list JSON: {e}"));
        v["held"].as_array().cloned().unwrap_or_default()
    }

    /// The host pid of the sandbox init of child `name` once it runs (waits up to 30 s).
    pub fn child_init(&self, name: &str) -> i64 {
        crate::wait_for(Duration::from_secs(30), &format!("{name} running"), || {
            let st = self.status();
            st["children"].as_array().and_then(|a| {
                a.iter()
                    .find(|c| c["name"] == name && c["state"] == "running")
                    .and_then(|c| c["pid"].as_i64())
            })
        })
    }

    /// The host pid of channel adapter `name`'s program (not its sandbox init); with `not`, a
    /// pid other than that one (the adapter was restarted).
    ///
    /// An init the status still shows as running may have lost its program (killed, the
    /// restart not yet seen): it is asked again until a running init with a program shows up.
    pub fn adapter_pid(&self, name: &str, not: Option<i64>) -> i64 {
        crate::wait_for(
            Duration::from_secs(30),
            &format!("{name}'s program running"),
            || {
                let init = self.child_init(name);
                let kids = fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
                    .unwrap_or_default();
                let pid = kids.split_whitespace().next()?.parse::<i64>().ok()?;
                (not != Some(pid)).then_some(pid)
            },
        )
    }

    /// The `gateway` child in [`Service::status`].
    pub fn gateway(&self) -> serde_json::Value {
        let st = self.status();
        st["children"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == "gateway").cloned())
            .unwrap_or_else(|| panic!("no gateway child in {st}"))
    }

    /// Wait until the gateway is running with a pid other than `not` and answers
    /// `GET /health` with 200; its sandbox init's host pid.
    pub fn gateway_running(&self, not: Option<i64>, limit: Duration) -> i64 {
        let deadline = Instant::now() + limit;
        loop {
            let g = self.gateway();
            if g["state"] == "running" {
                if let Some(p) = g["pid"].as_i64() {
                    if Some(p) != not && http(self.addr, "GET", "/health", None).0 == 200 {
                        return p;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway not running within {limit:?}: {g}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The operator token the supervisor made on its first start because none existed (it
    /// leaves it in `<state_dir>/initial-operator-token` when it has no terminal to show it
    /// on). Panics when the file is not there.
    pub fn initial_token(&self) -> String {
        let p = self.state_dir().join("initial-operator-token");
        fs::read_to_string(&p)
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|e| panic!("no initial operator token at {}: {e}", p.display()))
    }

    /// `carapace token create --scope SCOPE --name NAME --state-dir <state_dir> --json` (as
    /// the rootless user when the service is rootless); its JSON output (an object with at
    /// least a `"token"` string). Panics unless it succeeds.
    pub fn token_create(&self, scope: &str, name: &str) -> serde_json::Value {
        let mut cmd = Command::new(carapace_bin());
        cmd.args([
            "token",
            "create",
            "--scope",
            scope,
            "--name",
            name,
            "--state-dir",
        ])
        .arg(self.state_dir())
        .arg("--json");
        if self.rootless {
            cmd = as_rootless_user(&cmd);
        }
        let o = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("carapace token create: {e}"));
        assert!(
            o.status.success(),
            "carapace token create --scope {scope} --name {name} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "carapace token create --json: not JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// The tools workspace of `owner` (`token:<id>`, `channel:<name>:<conversation>`):
    /// `<state_dir>/workspaces/owners/<first 32 hex digits of the SHA-256 of owner>`, made on
    /// the owner's first tool.
    pub fn owner_workspace(&self, owner: &str) -> PathBuf {
        use sha2::{Digest as _, Sha256};
        let digest: String = Sha256::digest(owner.as_bytes())[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.state_dir().join("workspaces/owners").join(digest)
    }

    /// A new token named `name` with scope `scope` (`client` | `operator`); the token text.
    pub fn token_named(&self, scope: &str, name: &str) -> String {
        let v = self.token_create(scope, name);
        v["token"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| panic!("carapace token create --json: no \"token\" string in {v}"))
    }

    /// A new token with scope `scope` (`client` | `operator`), made with `carapace token
    /// create`; the token text. The first token of this service is named `test`, the next ones
    /// `test-2`, `test-3`, ... (names stay unique).
    pub fn token(&self, scope: &str) -> String {
        let name = match self.tokens_made.fetch_add(1, Ordering::Relaxed) + 1 {
            1 => "test".to_string(),
            n => format!("test-{n}"),
        };
        self.token_named(scope, &name)
    }

    /// Send `sig` to the supervisor.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid this test started (still a child of ours, so not reused)
        // has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for the supervisor to exit (after a signal); its exit status. Panics (after a
    /// SIGKILL) if it is still running after `limit`, or if it was already waited for.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut c = self
            .child
            .take()
            .unwrap_or_else(|| panic!("carapace run is not running (stopped or waited for)"));
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "carapace run did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait (20 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    /// SIGKILL the supervisor and reap it (its gateway is left to die with it).
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the supervisor this test started (a child not yet reaped).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `carapace run --config DIR/carapace.toml` with the test's notify socket and debug logs.
fn supervisor_command(dir: &Path, notify_path: &Path) -> Command {
    let mut cmd = Command::new(carapace_bin());
    cmd.args(["run", "--config"])
        .arg(dir.join("carapace.toml"))
        .env("NOTIFY_SOCKET", notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .env("CARAPACE_LOG", "debug");
    cmd
}

// ------------------------------------------------------------------------------------------
// HTTP

/// An HTTP response as [`http_with`] read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code; 0 when the connection failed or no status line came.
    pub status: u16,
    /// The response headers in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (chunked transfer coding undone; invalid UTF-8 replaced).
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; a JSON string holding the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| serde_json::Value::String(self.body.clone()))
    }
}

/// Undo `Transfer-Encoding: chunked`; what was there if it does not parse.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return raw.to_vec();
        };
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return raw.to_vec();
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return out;
        }
        if rest.len() < size {
            return raw.to_vec();
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
}

/// One HTTP/1.1 request with `headers` (`Connection: close`; `Content-Type: application/json`
/// unless `headers` has one; `Content-Length` always), read to the end (60 s at most). A failed
/// connection gives status 0.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return HttpResponse::default();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    if s.write_all(req.as_bytes()).is_err() {
        return HttpResponse::default();
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let (head, raw_body) = match resp.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&resp[..i], &resp[i + 4..]),
        None => (&resp[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// [`http_with`] with `Authorization: Bearer TOKEN`.
pub fn http_bearer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> HttpResponse {
    let auth = format!("Bearer {token}");
    http_with(addr, method, path, &[("Authorization", &auth)], body)
}

/// One HTTP/1.1 request (`Connection: close`, JSON content type); (status, body). Status 0 when
/// the connection failed.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let r = http_with(addr, method, path, &[], body);
    (r.status, r.body)
}

// ------------------------------------------------------------------------------------------
// Host processes

/// The program (pid 2 inside) of a sandbox whose init has host pid `init` (waits up to 5 s for
/// it to appear).
pub fn program_of(init: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kids =
            fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap_or_default();
        if let Some(p) = kids.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return p;
        }
        assert!(Instant::now() < deadline, "init {init} has no child");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of `key` in /proc/PID/status (e.g. `Seccomp`, `CapEff`, `Uid`), trimmed; panics
/// when there is none.
pub fn status_field(pid: i64, key: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Is `pid` a live process (exists and is not a zombie)?
pub fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Wait up to `limit` for `pid` to be gone; true if it is.
pub fn wait_gone(pid: i64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

/// Live processes running `bin` (by /proc/N/exe).
pub fn processes_running(bin: &Path) -> Vec<i64> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|p| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == bin) && alive(*p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_undoes_chunked_coding() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"),
            b"hello world"
        );
        assert_eq!(dechunk(b"not chunked"), b"not chunked");
    }

    #[test]
    fn http_with_reads_status_headers_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap_or_else(|e| panic!("accept: {e}"));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\
                  Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            );
            String::from_utf8_lossy(&req).into_owned()
        });
        let r = http_bearer(addr, "GET", "/v1/status", "tok", None);
        let req = server.join().unwrap_or_else(|_| panic!("server thread"));
        assert!(req.starts_with("GET /v1/status HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("\r\nAuthorization: Bearer tok\r\n"), "{req}");
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.body, "{}");
        assert_eq!(r.json(), serde_json::json!({}));
    }
}
