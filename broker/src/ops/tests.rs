//! Tests of the operations, with real loopback listeners, temp dirs and files.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_policy::Policy;

use super::*;
use crate::approvals::{Approvals, Resolution};
use crate::protocol::{
    encode_reply, Access, ErrorBody, Event, PendingApproval, Reply, SendStatus, MAX_FRAME,
};
use crate::server::Role;
use crate::tokens::{token_sha256_hex, Scope, TokenStore};

const SECRET: &str = "s3cr3t-VALUE-0123456789abcdef";

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ops: Arc<Ops>,
    port: u16,
    listener: TcpListener,
}

fn who(profile: &str) -> Identity {
    Identity {
        id: 7,
        role: Role::Tool,
        profile: profile.to_string(),
    }
}

#[derive(Default)]
struct FakeSpawner {
    seen: Mutex<Vec<SpawnRequest>>,
}

impl Spawner for FakeSpawner {
    fn spawn(&self, req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure> {
        self.seen
            .lock()
            .map_err(|_| SpawnFailure {
                message: "poisoned".into(),
            })?
            .push(req);
        let (out_r, out_w) = nix::unistd::pipe().map_err(|e| SpawnFailure {
            message: e.to_string(),
        })?;
        let (err_r, err_w) = nix::unistd::pipe().map_err(|e| SpawnFailure {
            message: e.to_string(),
        })?;
        let wait = Box::new(move || {
            let mut o = fs::File::from(out_w);
            let mut e = fs::File::from(err_w);
            let _ = o.write_all(format!("out {SECRET} end\n").as_bytes());
            let _ = e.write_all(b"err line\n");
            drop(o);
            drop(e);
            ExitSummary {
                exit: 3,
                code: Some(3),
                signal: None,
                wall_ms: 1,
                cpu_ms: 0,
                peak_mem: 0,
                oom: false,
                timeout: false,
            }
        });
        Ok(SpawnHandle {
            stdout: out_r,
            stderr: err_r,
            wait,
        })
    }
}

fn setup_with(
    extra: &str,
    spawner: Option<Arc<dyn Spawner>>,
    approver: Option<Arc<dyn Approver>>,
) -> Env {
    setup_cfg(extra, spawner, approver, |_| {})
}

fn setup_cfg(
    extra: &str,
    spawner: Option<Arc<dyn Spawner>>,
    approver: Option<Arc<dyn Approver>>,
    tweak: impl FnOnce(&mut OpsConfig),
) -> Env {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = tmp.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port();
    fs::create_dir_all(dir.join("data/out")).unwrap_or_else(|e| panic!("{e}"));
    fs::write(dir.join("data/a.txt"), "alpha").unwrap_or_else(|e| panic!("{e}"));
    fs::write(dir.join("outside.txt"), "outside").unwrap_or_else(|e| panic!("{e}"));
    symlink(dir.join("outside.txt"), dir.join("data/link")).unwrap_or_else(|e| panic!("{e}"));
    symlink(&dir, dir.join("data/dirlink")).unwrap_or_else(|e| panic!("{e}"));
    // A relative symlink that stays inside the directory: still refused (no symlinks at all).
    symlink("a.txt", dir.join("data/inner")).unwrap_or_else(|e| panic!("{e}"));
    symlink("out", dir.join("data/outlink")).unwrap_or_else(|e| panic!("{e}"));
    fs::write(dir.join("data/out/existing"), "old").unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.join("key");
    fs::write(&secret, SECRET).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let loose = dir.join("loose");
    fs::write(&loose, "loose-value").unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("{e}"));
    let d = dir.display();
    let text = format!(
        r##"
version = 1
[profiles.tool]
why = "tools"
[profiles.tool.broker]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "test server" }},
            {{ host = "localhost", port = {port}, why = "name resolving to loopback, not allowed private" }} ]
open = [ {{ path = "{d}/data", access = "read", why = "inputs" }},
         {{ path = "{d}/data/out", access = "create", why = "outputs" }} ]
secrets = ["key", "loose"]
channels = ["log"]
exec = true
[profiles.other]
why = "another identity"
[profiles.other.broker]
connect = [ {{ host = "localhost", port = {port}, allow_private = true, why = "by name" }} ]
[profiles.nobroker]
why = "no broker section"
[secrets.key]
why = "test key"
file = "{d}/key"
[secrets.loose]
why = "world-readable: refused at load"
file = "{d}/loose"
[channels.log]
why = "file channel"
kind = "file"
path = "{d}/outbox.log"
recipients = ["alice@example.com", "#ops*"]
block = ["(?i)password\\s*[:=]"]
redact = ["sk-[A-Za-z0-9]{{20,}}"]
max_bytes = 200
rate = {{ per_minute = 1, burst = 4 }}
[[exec]]
why = "true is harmless"
program = "/usr/bin/true"
profile = "tool"
approval = "allow"
[[exec]]
why = "yes needs a person"
program = "/usr/bin/yes"
profile = "tool"
approval = "ask"
{extra}
"##
    );
    let policy = Policy::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let audit = AuditLog::open(dir.join("audit.log")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = DeadLetters::open(dir.join("dlq")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = OpsConfig {
        connect_timeout: Duration::from_secs(5),
        resolve_timeout: Duration::from_secs(5),
        credentials_dir: None,
        max_secret_bytes: 4096,
        max_rate_keys: 16,
        token_store: Some(dir.join("tokens.json")),
        inbound_capacity: 1024,
        state_dir: None,
        workspaces: Vec::new(),
    };
    let mut cfg = cfg;
    tweak(&mut cfg);
    let ops =
        Ops::new(policy, audit, dlq, spawner, approver, cfg).unwrap_or_else(|e| panic!("{e}"));
    Env {
        _tmp: tmp,
        dir,
        ops: Arc::new(ops),
        port,
        listener,
    }
}

fn setup() -> Env {
    setup_with("", None, None)
}

fn err_of(r: &Response) -> ErrorBody {
    match &r.reply {
        Reply::Err(e) => e.clone(),
        Reply::Ok(ok) => panic!("expected an error, got {ok:?}"),
    }
}

fn ok_of(r: &Response) -> OkReply {
    match &r.reply {
        Reply::Ok(ok) => ok.clone(),
        Reply::Err(e) => panic!("expected success, got {e:?}"),
    }
}

fn audit_lines(env: &Env) -> Vec<serde_json::Value> {
    fs::read_to_string(env.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn last_audit(env: &Env) -> serde_json::Value {
    audit_lines(env)
        .pop()
        .unwrap_or_else(|| panic!("no audit record"))
}

fn nothing_accepted(l: &TcpListener) -> bool {
    l.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

// ----------------------------------------------------------------------------- connect

#[tokio::test]
async fn connect_allowed_literal_gives_a_connected_blocking_socket() {
    let env = setup();
    let r = env.ops.connect(&who("tool"), "127.0.0.1", env.port).await;
    assert_eq!(
        ok_of(&r),
        OkReply::Connect {
            peer: format!("127.0.0.1:{}", env.port)
        }
    );
    assert_eq!(r.fds.len(), 1);
    let (mut server, _) = env.listener.accept().unwrap_or_else(|e| panic!("{e}"));
    let fd: OwnedFd = r.fds.into_iter().next().unwrap_or_else(|| panic!("no fd"));
    let fl = rustix::fs::fcntl_getfl(&fd).unwrap();
    assert!(
        !fl.contains(rustix::fs::OFlags::NONBLOCK),
        "handed over in blocking mode"
    );
    let mut client = std::net::TcpStream::from(fd);
    client.write_all(b"ping").unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4];
    server
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&buf, b"ping");
    let rec = last_audit(&env);
    assert_eq!(rec["op"], "connect");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["who"]["profile"], "tool");
}

#[tokio::test]
async fn connect_not_listed_is_denied_and_audited() {
    let env = setup();
    let other_port = if env.port == 65535 { 1 } else { env.port + 1 };
    for (host, port) in [
        ("127.0.0.1", other_port),
        ("127.0.0.2", env.port),
        ("example.com", 443),
    ] {
        let r = env.ops.connect(&who("tool"), host, port).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{host}:{port}");
        assert!(r.fds.is_empty());
        let rec = last_audit(&env);
        assert_eq!(rec["decision"], "deny");
        assert_eq!(rec["target"], format!("{host}:{port}"));
    }
    // A profile without a broker section may ask for nothing.
    let r = env
        .ops
        .connect(&who("nobroker"), "127.0.0.1", env.port)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert!(nothing_accepted(&env.listener));
}

#[tokio::test]
async fn connect_name_resolving_to_loopback_is_refused_unless_allow_private() {
    let env = setup();
    let r = env.ops.connect(&who("tool"), "localhost", env.port).await;
    let e = err_of(&r);
    assert_eq!(e.code, ErrorCode::Denied);
    assert!(e.message.contains("refuses"), "{}", e.message);
    assert!(nothing_accepted(&env.listener), "no connection was made");
    env.listener
        .set_nonblocking(false)
        .unwrap_or_else(|e| panic!("{e}"));
    // The same name under a rule with allow_private connects.
    let r = env.ops.connect(&who("other"), "localhost", env.port).await;
    match ok_of(&r) {
        OkReply::Connect { peer } => assert!(peer.ends_with(&format!(":{}", env.port))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn resolve_checked_drops_refused_addresses() {
    let rule = carapace_policy::broker::ConnectRule {
        host: carapace_policy::broker::HostPattern::Exact("localhost".into()),
        port: 80,
        allow_private: false,
        why: String::new(),
        line: 1,
    };
    let e = resolve_checked(&rule, "127.0.0.1", 80, Duration::from_secs(1)).await;
    assert!(matches!(e, Err(ConnectError::OnlyRefused { .. })), "{e:?}");
    let e = resolve_checked(&rule, "[::ffff:10.0.0.1]", 80, Duration::from_secs(1)).await;
    assert!(matches!(e, Err(ConnectError::OnlyRefused { .. })), "{e:?}");
    let ok = resolve_checked(&rule, "8.8.8.8", 53, Duration::from_secs(1)).await;
    assert_eq!(ok.ok().map(|v| v.len()), Some(1));
}

#[tokio::test]
async fn audit_failure_denies_without_acting() {
    let env = setup();
    // Something else wrote half a line: the next append finds a torn tail and fails.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(env.dir.join("audit.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all(b"{\"torn").unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    let r = env.ops.connect(&who("tool"), "127.0.0.1", env.port).await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
    assert!(r.fds.is_empty());
    assert!(
        nothing_accepted(&env.listener),
        "no connection without an audit record"
    );
    let r = env.ops.secret(&who("tool"), "key").await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
    assert!(r.fds.is_empty());
}

// ----------------------------------------------------------------------------- open

fn read_fd(fd: OwnedFd) -> String {
    let mut s = String::new();
    fs::File::from(fd)
        .read_to_string(&mut s)
        .unwrap_or_else(|e| panic!("{e}"));
    s
}

#[tokio::test]
async fn open_allowed_file_and_refuse_escapes() {
    let env = setup();
    let d = env.dir.display().to_string();
    let r = env
        .ops
        .open(&who("tool"), &format!("{d}/data/a.txt"), Access::Read)
        .await;
    assert_eq!(
        ok_of(&r),
        OkReply::Open {
            access: Access::Read
        }
    );
    assert_eq!(
        read_fd(r.fds.into_iter().next().unwrap_or_else(|| panic!())),
        "alpha"
    );

    // Bad paths: refused before any rule is looked at.
    for bad in [
        format!("{d}/data/../outside.txt"),
        format!("{d}/data/./a.txt"),
        "data/a.txt".to_string(),
        format!("{d}/data/a.txt/"),
        format!("{d}/data/a\0.txt"),
        format!("{d}/data/{}", "x".repeat(5000)),
    ] {
        let r = env.ops.open(&who("tool"), &bad, Access::Read).await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest, "{bad:?}");
        assert!(r.fds.is_empty());
    }
    // Symlink escapes: the link itself, and a path through a symlinked directory.
    for esc in [
        format!("{d}/data/link"),
        format!("{d}/data/dirlink/outside.txt"),
        format!("{d}/data/inner"),
        format!("{d}/data/outlink/existing"),
    ] {
        let r = env.ops.open(&who("tool"), &esc, Access::Read).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{esc}");
        assert!(r.fds.is_empty());
    }
    // Outside every rule, or more access than the rule grants.
    let r = env
        .ops
        .open(&who("tool"), &format!("{d}/outside.txt"), Access::Read)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let r = env
        .ops
        .open(&who("tool"), &format!("{d}/data/a.txt"), Access::Write)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert_eq!(
        fs::read_to_string(env.dir.join("data/a.txt")).unwrap_or_default(),
        "alpha"
    );
    let r = env
        .ops
        .open(&who("tool"), &format!("{d}/data/missing"), Access::Read)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
}

#[tokio::test]
async fn open_create_beneath_create_rule_only() {
    let env = setup();
    let d = env.dir.display().to_string();
    let p = format!("{d}/data/out/new.txt");
    let r = env.ops.open(&who("tool"), &p, Access::Create).await;
    assert_eq!(
        ok_of(&r),
        OkReply::Open {
            access: Access::Create
        }
    );
    let mut f = fs::File::from(r.fds.into_iter().next().unwrap_or_else(|| panic!()));
    f.write_all(b"made").unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    assert_eq!(fs::read_to_string(&p).unwrap_or_default(), "made");
    // O_EXCL: creating it again is refused, the content stays.
    let r = env.ops.open(&who("tool"), &p, Access::Create).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert_eq!(fs::read_to_string(&p).unwrap_or_default(), "made");
    // Write access to an existing file under the create rule: write-only, no truncation.
    let e = format!("{d}/data/out/existing");
    let r = env.ops.open(&who("tool"), &e, Access::Write).await;
    assert_eq!(
        ok_of(&r),
        OkReply::Open {
            access: Access::Write
        }
    );
    let mut f = fs::File::from(r.fds.into_iter().next().unwrap_or_else(|| panic!()));
    f.write_all(b"n").unwrap_or_else(|e| panic!("{e}"));
    let mut s = String::new();
    assert!(f.read_to_string(&mut s).is_err(), "opened write-only");
    drop(f);
    assert_eq!(fs::read_to_string(&e).unwrap_or_default(), "nld");
    // The read-only parent rule does not allow creating.
    let r = env
        .ops
        .open(&who("tool"), &format!("{d}/data/new.txt"), Access::Create)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert!(!env.dir.join("data/new.txt").exists());
}

#[tokio::test]
async fn open_refuses_fifos_without_blocking() {
    let env = setup();
    let fifo = env.dir.join("data/fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        env.ops
            .open(&who("tool"), &fifo.display().to_string(), Access::Read),
    )
    .await
    .unwrap_or_else(|_| panic!("open of a FIFO blocked"));
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

// ----------------------------------------------------------------------------- secret

#[tokio::test]
async fn secret_only_for_named_profiles_as_sealed_memfd() {
    let env = setup();
    let r = env.ops.secret(&who("tool"), "key").await;
    assert_eq!(
        ok_of(&r),
        OkReply::Secret {
            len: SECRET.len() as u64
        }
    );
    let fd = r.fds.into_iter().next().unwrap_or_else(|| panic!("no fd"));
    let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
    use rustix::fs::SealFlags;
    let want = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
    assert!(seals.contains(want), "{seals:?}");
    let mut f = fs::File::from(fd);
    let e = f
        .write_all(b"x")
        .err()
        .unwrap_or_else(|| panic!("write to a sealed memfd worked"));
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let e = f
        .set_len(1)
        .err()
        .unwrap_or_else(|| panic!("truncate worked"));
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, SECRET);

    // Another profile (not naming it) and an unknown name get the same refusal.
    let a = env.ops.secret(&who("other"), "key").await;
    let b = env.ops.secret(&who("tool"), "nope").await;
    assert_eq!(err_of(&a).code, ErrorCode::Denied);
    assert_eq!(err_of(&b).code, ErrorCode::Denied);
    assert!(a.fds.is_empty() && b.fds.is_empty());
    // A world-readable file is never loaded.
    let r = env.ops.secret(&who("tool"), "loose").await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
    assert!(!err_of(&r).message.contains("loose-value"));
    // The audit names the secret, never its value.
    let log = fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default();
    assert!(log.contains("\"target\":\"key\""));
    assert!(!log.contains(SECRET));
    assert!(!log.contains("loose-value"));
    // Loaded values are exposed for redactors.
    let vals = env.ops.secret_values();
    assert_eq!(vals.len(), 1);
    assert_eq!(vals[0].1.expose(), SECRET.as_bytes());
    assert!(env.ops.redactor().finds(SECRET.as_bytes()));
}

#[test]
fn load_secret_checks_the_file() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = tmp.path().join("s");
    fs::write(&p, "v").unwrap_or_else(|e| panic!("{e}"));
    let src = carapace_policy::broker::SecretSource::File(p.clone());
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        load_secret(&src, None, 10)
            .map(|v| v.expose().to_vec())
            .ok(),
        Some(b"v".to_vec())
    );
    fs::set_permissions(&p, fs::Permissions::from_mode(0o604)).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        load_secret(&src, None, 10),
        Err(SecretError::OthersCanAccess { .. })
    ));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    fs::write(&p, "0123456789ab").unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        load_secret(&src, None, 10),
        Err(SecretError::TooLarge { .. })
    ));
    let l = tmp.path().join("l");
    symlink(&p, &l).unwrap_or_else(|e| panic!("{e}"));
    let src = carapace_policy::broker::SecretSource::File(l);
    assert!(matches!(
        load_secret(&src, None, 100),
        Err(SecretError::Io { op: "open", .. })
    ));
    let src = carapace_policy::broker::SecretSource::File(tmp.path().to_path_buf());
    assert!(load_secret(&src, None, 100).is_err());
    let cred = carapace_policy::broker::SecretSource::Credential("s".into());
    assert!(matches!(
        load_secret(&cred, None, 100),
        Err(SecretError::NoCredentialsDir { .. })
    ));
    assert!(load_secret(&cred, Some(tmp.path()), 100).is_ok());
}

// ----------------------------------------------------------------------------- send

fn outbox(env: &Env) -> Vec<serde_json::Value> {
    fs::read_to_string(env.dir.join("outbox.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn dlq_reasons(env: &Env) -> Vec<String> {
    DeadLetters::open(env.dir.join("dlq"))
        .and_then(|q| q.list())
        .unwrap_or_else(|e| panic!("{e}"))
        .letters
        .into_iter()
        .map(|l| l.entry.reason)
        .collect()
}

#[tokio::test]
async fn send_delivers_with_redaction_or_dead_letters() {
    let env = setup();
    let w = who("tool");
    let body = format!("token sk-ABCDEFGHIJKLMNOPQRSTUVWX and {SECRET} done");
    let r = env.ops.send(&w, "log", "alice@example.com", body).await;
    assert_eq!(
        ok_of(&r),
        OkReply::Send {
            status: SendStatus::Delivered,
            dlq_id: None,
            outbox_id: None,
        }
    );
    let lines = outbox(&env);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["body"], "token [REDACTED] and [REDACTED] done");
    assert_eq!(lines[0]["recipient"], "alice@example.com");
    assert_eq!(lines[0]["from"]["id"], 7);

    // Not allowlisted -> dead-letter queue, with the secret already redacted.
    let r = env
        .ops
        .send(&w, "log", "mallory@example.com", format!("hi {SECRET}"))
        .await;
    match ok_of(&r) {
        OkReply::Send {
            status: SendStatus::DeadLettered,
            dlq_id: Some(_),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    // Blocked pattern -> dead-letter queue.
    let r = env
        .ops
        .send(&w, "log", "#ops", "my Password: hunter2".into())
        .await;
    assert!(matches!(
        ok_of(&r),
        OkReply::Send {
            status: SendStatus::DeadLettered,
            ..
        }
    ));
    // Over the size cap -> dead-letter queue.
    let r = env.ops.send(&w, "log", "#ops", "x".repeat(201)).await;
    assert!(matches!(
        ok_of(&r),
        OkReply::Send {
            status: SendStatus::DeadLettered,
            ..
        }
    ));
    assert_eq!(outbox(&env).len(), 1, "nothing else delivered");
    let reasons = dlq_reasons(&env);
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "recipient not allowlisted"));
    assert!(reasons.iter().any(|r| r.starts_with("blocked by pattern")));
    assert!(reasons.iter().any(|r| r.starts_with("over the size cap")));
    let stored = fs::read_dir(env.dir.join("dlq"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        !stored.contains(SECRET),
        "secret value persisted in the queue"
    );
    assert!(!fs::read_to_string(env.dir.join("audit.log"))
        .unwrap_or_default()
        .contains(SECRET));

    // Burst 4 used up (4 sends so far): the next one is rate limited, not queued.
    let r = env.ops.send(&w, "log", "#ops", "one more".into()).await;
    assert_eq!(err_of(&r).code, ErrorCode::RateLimited);
    assert_eq!(dlq_reasons(&env).len(), 3);
    // Another identity has its own bucket.
    let mut w2 = w.clone();
    w2.id = 8;
    let r = env.ops.send(&w2, "log", "#ops", "from 8".into()).await;
    assert!(matches!(
        ok_of(&r),
        OkReply::Send {
            status: SendStatus::Delivered,
            ..
        }
    ));
    // A channel the profile does not name.
    let r = env.ops.send(&who("other"), "log", "#ops", "x".into()).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

// ----------------------------------------------------------------------------- exec

async fn exit_of(r: Response) -> (Vec<OwnedFd>, ExitSummary) {
    let follow = r.follow_up.unwrap_or_else(|| panic!("no follow-up"));
    let fds = r.fds;
    match tokio::time::timeout(Duration::from_secs(10), follow).await {
        Ok(Event::Exit(s)) => (fds, s),
        Err(_) => panic!("no exit event"),
    }
}

#[tokio::test]
async fn exec_allowed_runs_through_the_spawner_with_redacted_output() {
    let spawner = Arc::new(FakeSpawner::default());
    let env = setup_with("", Some(spawner.clone()), None);
    let r = env
        .ops
        .exec(&who("tool"), vec!["true".into(), "x".into()], None)
        .await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let (fds, summary) = exit_of(r).await;
    assert_eq!(summary.exit, 3);
    let mut it = fds.into_iter();
    let out = read_fd(it.next().unwrap_or_else(|| panic!()));
    let err = read_fd(it.next().unwrap_or_else(|| panic!()));
    assert_eq!(out, "out [REDACTED] end\n");
    assert_eq!(err, "err line\n");
    let seen = spawner.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 1);
    let canon = fs::canonicalize("/usr/bin/true").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen[0].program.path(), canon);
    assert_eq!(
        seen[0].argv,
        vec![canon.display().to_string(), "x".to_string()]
    );
    assert_eq!(seen[0].profile, "tool");
}

/// A spawner that cannot start anything (as when the supervisor runs out of descriptors).
struct FailingSpawner;

impl Spawner for FailingSpawner {
    fn spawn(&self, _req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure> {
        Err(SpawnFailure {
            message: "the confined child failed at placing stdio (dup2): Too many open files"
                .into(),
        })
    }
}

#[tokio::test]
async fn exec_that_cannot_start_is_unavailable_and_audited_as_not_started() {
    let env = setup_with("", Some(Arc::new(FailingSpawner)), None);
    let r = env
        .ops
        .exec(&who("tool"), vec!["true".into(), "x".into()], None)
        .await;
    let e = err_of(&r);
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("cannot start"), "{}", e.message);
    let lines = audit_lines(&env);
    let last2: Vec<(String, String)> = lines
        .iter()
        .rev()
        .take(2)
        .map(|l| {
            (
                l["decision"].as_str().unwrap_or("").to_string(),
                l["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        last2,
        vec![
            ("error".to_string(), "could not start".to_string()),
            ("allow".to_string(), "starting".to_string())
        ],
        "{lines:?}"
    );
}

#[tokio::test]
async fn exec_denied_by_rules_or_profile() {
    let spawner = Arc::new(FakeSpawner::default());
    let env = setup_with("", Some(spawner.clone()), None);
    // No rule for /usr/bin/false.
    let r = env
        .ops
        .exec(&who("tool"), vec!["/usr/bin/false".into()], None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    // `..` does not get around anything: it resolves to the same program.
    let r = env
        .ops
        .exec(&who("tool"), vec!["/usr/bin/../bin/false".into()], None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    // A profile without `exec = true`.
    let r = env.ops.exec(&who("other"), vec!["true".into()], None).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    // Relative paths with a slash, cwd, empty argv.
    let r = env
        .ops
        .exec(&who("tool"), vec!["bin/true".into()], None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    let r = env
        .ops
        .exec(&who("tool"), vec!["true".into()], Some("/".into()))
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    let r = env.ops.exec(&who("tool"), vec![], None).await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    // Ask without an approvals service: denied.
    let r = env.ops.exec(&who("tool"), vec!["yes".into()], None).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert!(spawner.seen.lock().map(|s| s.is_empty()).unwrap_or(false));
}

#[tokio::test]
async fn exec_ask_waits_for_the_operator() {
    let spawner = Arc::new(FakeSpawner::default());
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let approvals = Arc::new(
        Approvals::open(tmp.path(), Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}")),
    );
    let env = setup_with("", Some(spawner.clone()), Some(approvals.clone()));
    let operator = {
        let a = approvals.clone();
        std::thread::spawn(move || {
            let mut answers = vec![Resolution::Deny, Resolution::AllowOnce];
            while let Some(ans) = answers.pop() {
                let id = loop {
                    if let Some(p) = a.list().first() {
                        break p.id;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                let _ = a.resolve(id, ans);
            }
        })
    };
    let r = env
        .ops
        .exec(&who("tool"), vec!["yes".into(), "y".into()], None)
        .await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let _ = exit_of(r).await;
    let r = env
        .ops
        .exec(&who("tool"), vec!["yes".into(), "y".into()], None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let _ = operator.join();
    let decisions: Vec<String> = audit_lines(&env)
        .iter()
        .filter(|r| r["op"] == "exec")
        .map(|r| r["decision"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(decisions, ["ask", "allow", "ask", "deny"]);
    assert_eq!(spawner.seen.lock().map(|s| s.len()).unwrap_or(0), 1);
}

#[test]
fn resolve_program_canonicalizes() {
    let t = fs::canonicalize("/usr/bin/true").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resolve_program("true").ok(), Some(t.clone()));
    assert_eq!(resolve_program("/usr/bin/../bin/true").ok(), Some(t));
    assert!(resolve_program("bin/true").is_err());
    assert!(resolve_program("").is_err());
    assert!(resolve_program("no-such-program-carapace").is_err());
    assert!(resolve_program("/etc/passwd").is_err());
    let _ = Path::new("/");
}

#[tokio::test]
async fn handler_dispatches_ping_without_audit() {
    let env = setup();
    let h: Arc<dyn Handler> = env.ops.clone();
    let r = h.handle(&who("tool"), Request::Ping {}).await;
    assert_eq!(ok_of(&r), OkReply::Ping {});
    assert!(audit_lines(&env).is_empty());
    let r = h
        .handle(&who("tool"), Request::Secret { name: "key".into() })
        .await;
    assert_eq!(r.fds.len(), 1);
}

#[tokio::test]
async fn operator_releases_or_drops_dead_letters_audited() {
    let env = setup();
    let w = who("tool");
    for to in ["mallory@example.com", "eve@example.com"] {
        let r = env.ops.send(&w, "log", to, format!("hi {to}")).await;
        assert!(matches!(
            ok_of(&r),
            OkReply::Send {
                status: SendStatus::DeadLettered,
                ..
            }
        ));
    }
    let ids: Vec<String> = env
        .ops
        .dead_letters()
        .list()
        .unwrap_or_else(|e| panic!("{e}"))
        .letters
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(outbox(&env).is_empty());
    // Release: delivered as it stands, gone from the queue.
    let e = env
        .ops
        .release_dead_letter(&ids[0])
        .unwrap_or_else(|e| panic!("{e}"));
    let lines = outbox(&env);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["recipient"], e.recipient.as_str());
    // Drop: gone, not delivered.
    env.ops
        .drop_dead_letter(&ids[1])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(dlq_reasons(&env).is_empty());
    assert_eq!(outbox(&env).len(), 1);
    // Unknown ids are errors; nothing changes.
    assert!(env.ops.release_dead_letter(&ids[0]).is_err());
    assert!(env.ops.release_dead_letter("../x").is_err());
    // Both operator actions are in the audit log, and the chain holds.
    let audit = fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default();
    assert!(audit.contains("\"op\":\"dlq_release\"") && audit.contains("\"op\":\"dlq_drop\""));
    assert!(audit.contains("\"role\":\"operator\""));
    let (seq, head) = env.ops.audit_head();
    assert_eq!(seq as usize, audit.lines().count());
    assert_eq!(head.len(), 64);
    assert!(crate::audit::verify(env.dir.join("audit.log"))
        .unwrap_or_else(|e| panic!("{e}"))
        .is_ok());
}

// ----------------------------------------------------------------------------- gateway ops

/// A gateway profile (auth, approve, exec) and one that may only check tokens.
const GW: &str = r#"
[profiles.gw]
why = "a gateway"
[profiles.gw.broker]
exec = true
auth = true
approve = true
[profiles.authonly]
why = "checks tokens, answers nothing"
[profiles.authonly.broker]
auth = true
"#;

fn who_id(profile: &str, id: u64) -> Identity {
    Identity {
        id,
        role: if profile == "gw" {
            Role::Gateway
        } else {
            Role::Tool
        },
        profile: profile.to_string(),
    }
}

fn audit_text(env: &Env) -> String {
    fs::read_to_string(env.dir.join("audit.log")).unwrap_or_default()
}

#[tokio::test]
async fn auth_good_revoked_unknown_and_malformed() {
    let env = setup_with(GW, None, None);
    let store = TokenStore::new(env.dir.join("tokens.json"));
    let (info, tok) = store
        .create("laptop", Scope::Operator)
        .unwrap_or_else(|e| panic!("{e}"));
    let (old, old_tok) = store
        .create("old", Scope::Client)
        .unwrap_or_else(|e| panic!("{e}"));
    store.revoke(&old.id).unwrap_or_else(|e| panic!("{e}"));
    let good = token_sha256_hex(&tok);

    // A good hash: the token, without its hash; audited by token id.
    for p in ["gw", "authonly"] {
        let r = env.ops.auth(&who(p), &good).await;
        assert_eq!(
            ok_of(&r),
            OkReply::Auth {
                token: info.clone()
            }
        );
        assert!(r.fds.is_empty());
        let rec = last_audit(&env);
        assert_eq!(rec["op"], "auth");
        assert_eq!(rec["decision"], "allow");
        assert_eq!(rec["target"], format!("token:{}", info.id));
        assert_eq!(rec["who"]["profile"], p);
    }
    // Revoked, unknown, malformed: one answer for all.
    for h in [
        token_sha256_hex(&old_tok),
        token_sha256_hex("cpt_never-made"),
        good.to_uppercase(),
        good[..63].to_string(),
        format!("{good}0"),
        tok.clone(),
        "zz".repeat(32),
        String::new(),
    ] {
        let r = env.ops.auth(&who("gw"), &h).await;
        let e = err_of(&r);
        assert_eq!(e.code, ErrorCode::Denied, "{h:?}");
        assert_eq!(e.message, "unknown or revoked token", "{h:?}");
        let rec = last_audit(&env);
        assert_eq!(rec["op"], "auth");
        assert_eq!(rec["decision"], "deny");
        assert_eq!(rec["target"], "unknown token");
    }
    // Profiles without `auth = true` may not ask, even with a good hash.
    for p in ["tool", "other", "nobroker"] {
        let r = env.ops.auth(&who(p), &good).await;
        let e = err_of(&r);
        assert_eq!(e.code, ErrorCode::Denied, "{p}");
        assert!(!e.message.contains("laptop"), "{}", e.message);
        assert_eq!(last_audit(&env)["target"], "unknown token");
    }
    // Through the handler, like the server calls it.
    let h: Arc<dyn Handler> = env.ops.clone();
    let r = h
        .handle(
            &who("gw"),
            Request::Auth {
                token_sha256: good.clone(),
            },
        )
        .await;
    assert!(matches!(ok_of(&r), OkReply::Auth { .. }));
    // Neither a token nor a hash ever reaches the audit log.
    let log = audit_text(&env);
    for s in [&good, &tok, &old_tok, &token_sha256_hex(&old_tok)] {
        assert!(!log.contains(s.as_str()), "{s} in the audit log");
    }
    assert!(crate::audit::verify(env.dir.join("audit.log"))
        .unwrap_or_else(|e| panic!("{e}"))
        .is_ok());
}

#[tokio::test]
async fn auth_without_a_usable_store_is_unavailable() {
    // No store configured.
    let env = setup_cfg(GW, None, None, |c| c.token_store = None);
    let r = env.ops.auth(&who("gw"), &"a".repeat(64)).await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
    assert_eq!(last_audit(&env)["decision"], "error");
    // A store file that does not exist yet: no tokens, so nothing verifies.
    let env = setup_with(GW, None, None);
    let r = env.ops.auth(&who("gw"), &"a".repeat(64)).await;
    assert_eq!(err_of(&r).message, "unknown or revoked token");
    // A corrupt store: unavailable (fail closed), never "no tokens".
    let (_, tok) = TokenStore::new(env.dir.join("tokens.json"))
        .create("laptop", Scope::Client)
        .unwrap_or_else(|e| panic!("{e}"));
    fs::write(env.dir.join("tokens.json"), "{\"version\":1,\"tokens\":[")
        .unwrap_or_else(|e| panic!("{e}"));
    let r = env.ops.auth(&who("gw"), &token_sha256_hex(&tok)).await;
    let e = err_of(&r);
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(!e.message.contains("tokens.json"), "{}", e.message);
    let rec = last_audit(&env);
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["target"], "unknown token");
}

/// Polls `approvals` as `gw` until one is pending.
async fn wait_pending(ops: &Ops, gw: &Identity) -> PendingApproval {
    for _ in 0..1000 {
        if let OkReply::Approvals { pending, omitted } = ok_of(&ops.approvals(gw).await) {
            assert_eq!(omitted, 0);
            if let Some(p) = pending.into_iter().next() {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no approval became pending")
}

#[tokio::test]
async fn a_gateway_lists_and_answers_approvals() {
    let spawner = Arc::new(FakeSpawner::default());
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let approvals = Arc::new(
        Approvals::open(tmp.path(), Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}")),
    );
    let env = setup_with(GW, Some(spawner.clone()), Some(approvals.clone()));
    let gw = who_id("gw", 1);
    assert_eq!(
        ok_of(&env.ops.approvals(&gw).await),
        OkReply::Approvals {
            pending: vec![],
            omitted: 0
        }
    );
    let audited_before = audit_lines(&env).len();

    // A tool asks; the gateway sees it.
    let ops = env.ops.clone();
    let asking = tokio::spawn(async move {
        ops.exec(&who_id("tool", 2), vec!["yes".into(), "y".into()], None)
            .await
    });
    let p = wait_pending(&env.ops, &gw).await;
    let yes = fs::canonicalize("/usr/bin/yes").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.who.id, 2);
    assert_eq!(p.who.role, "tool");
    assert_eq!(p.who.profile, "tool");
    assert_eq!(p.program, yes.display().to_string());
    assert_eq!(p.argv, vec![yes.display().to_string(), "y".to_string()]);
    assert_eq!(p.profile, "tool");
    assert!(p.created.ends_with('Z'), "{}", p.created);
    assert!(p.expires_in_ms > 0 && p.expires_in_ms <= 20_000);
    // The asking rule's reason comes with it.
    assert!(p.why.as_deref().is_some_and(|w| !w.is_empty()), "{p:?}");
    // Listing is a read: not audited (the tool's `ask` record is the only new one).
    let new: Vec<serde_json::Value> = audit_lines(&env).split_off(audited_before);
    assert!(new.iter().all(|r| r["op"] == "exec"), "{new:?}");

    // Profiles without `approve = true` can neither list nor answer it.
    for prof in ["tool", "authonly", "other", "nobroker"] {
        let w = who_id(prof, 3);
        assert_eq!(
            err_of(&env.ops.approvals(&w).await).code,
            ErrorCode::Denied,
            "{prof}"
        );
        let r = env.ops.approve(&w, p.id, Resolution::AllowOnce, None).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{prof}");
        assert_eq!(last_audit(&env)["decision"], "deny");
    }
    assert_eq!(approvals.list().len(), 1, "still pending");
    // Unknown ids, a bad `by`.
    let r = env
        .ops
        .approve(&gw, p.id + 100, Resolution::AllowOnce, None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    for by in ["x".repeat(129), "a\nb".to_string()] {
        let r = env
            .ops
            .approve(&gw, p.id, Resolution::AllowOnce, Some(by))
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    }
    assert_eq!(approvals.list().len(), 1, "still pending");
    assert!(spawner.seen.lock().map(|s| s.is_empty()).unwrap_or(false));

    // The gateway allows it once: the asking exec proceeds.
    let r = env
        .ops
        .approve(&gw, p.id, Resolution::AllowOnce, Some("1f2e3d4c".into()))
        .await;
    assert_eq!(
        ok_of(&r),
        OkReply::Approve {
            approval: p.id,
            decision: "allowed once".into()
        }
    );
    let rec = last_audit(&env);
    assert_eq!(rec["op"], "approve");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["target"], format!("approval:{}", p.id));
    assert_eq!(rec["who"]["role"], "gateway");
    let detail = rec["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("allow-once"), "{detail}");
    assert!(
        detail.contains("by 1f2e3d4c (as the child claims)"),
        "{detail}"
    );
    assert!(detail.contains("tool#2(tool)"), "{detail}");
    let r = tokio::time::timeout(Duration::from_secs(10), asking)
        .await
        .unwrap_or_else(|_| panic!("the asking exec did not proceed"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let (_, summary) = exit_of(r).await;
    assert_eq!(summary.exit, 3);
    assert_eq!(spawner.seen.lock().map(|s| s.len()).unwrap_or(0), 1);
    // Answered: no longer there.
    let r = env.ops.approve(&gw, p.id, Resolution::Deny, None).await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);

    // The gateway's own ask, denied by the gateway: the exec is refused, the audit says whose.
    let ops = env.ops.clone();
    let asking = tokio::spawn(async move {
        ops.exec(&who_id("gw", 1), vec!["yes".into(), "n".into()], None)
            .await
    });
    let p2 = wait_pending(&env.ops, &gw).await;
    assert_ne!(p2.id, p.id);
    assert_eq!(p2.who.role, "gateway");
    let r = env.ops.approve(&gw, p2.id, Resolution::Deny, None).await;
    assert_eq!(
        ok_of(&r),
        OkReply::Approve {
            approval: p2.id,
            decision: "denied".into()
        }
    );
    let rec = last_audit(&env);
    let detail = rec["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("own request"), "{detail}");
    assert!(detail.contains("by nobody named"), "{detail}");
    let r = tokio::time::timeout(Duration::from_secs(10), asking)
        .await
        .unwrap_or_else(|_| panic!("the asking exec did not end"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert_eq!(spawner.seen.lock().map(|s| s.len()).unwrap_or(0), 1);
    assert!(crate::audit::verify(env.dir.join("audit.log"))
        .unwrap_or_else(|e| panic!("{e}"))
        .is_ok());
}

/// An approver with only `ask` (the trait's defaults for the rest), or with `pending` big.
struct ListingApprover {
    pending: Vec<crate::approvals::Pending>,
}

impl Approver for ListingApprover {
    fn ask(
        self: Arc<Self>,
        _q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        Box::pin(async { ApprovalAnswer::Deny("nobody".into()) })
    }

    fn pending(&self) -> Vec<crate::approvals::Pending> {
        self.pending.clone()
    }
}

struct AskOnlyApprover;

impl Approver for AskOnlyApprover {
    fn ask(
        self: Arc<Self>,
        _q: ApprovalQuery,
    ) -> Pin<Box<dyn Future<Output = ApprovalAnswer> + Send>> {
        Box::pin(async { ApprovalAnswer::Deny("nobody".into()) })
    }
}

#[tokio::test]
async fn approvals_without_an_approver_or_with_the_defaults() {
    let gw = who_id("gw", 1);
    for approver in [None, Some(Arc::new(AskOnlyApprover) as Arc<dyn Approver>)] {
        let env = setup_with(GW, None, approver);
        let h: Arc<dyn Handler> = env.ops.clone();
        assert_eq!(
            ok_of(&h.handle(&gw, Request::Approvals {}).await),
            OkReply::Approvals {
                pending: vec![],
                omitted: 0
            }
        );
        let r = h
            .handle(
                &gw,
                Request::Approve {
                    approval: 1,
                    resolution: Resolution::AllowAlways,
                    by: None,
                },
            )
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::NotFound);
        assert_eq!(last_audit(&env)["op"], "approve");
    }
    // The trait's default `resolve` answers nothing, even for an id it lists.
    let one = crate::approvals::Pending {
        id: 5,
        identity: crate::audit::Who {
            id: 2,
            role: "tool".into(),
            profile: "tool".into(),
        },
        program: PathBuf::from("/usr/bin/yes"),
        program_sha256: "0".repeat(64),
        argv: vec!["/usr/bin/yes".into()],
        profile: "tool".into(),
        cwd: PathBuf::from("/"),
        created: "2026-01-02T03:04:05.000000Z".into(),
        expires: std::time::Instant::now() + Duration::from_secs(60),
    };
    let env = setup_with(
        GW,
        None,
        Some(Arc::new(ListingApprover { pending: vec![one] })),
    );
    let r = env.ops.approve(&gw, 5, Resolution::AllowOnce, None).await;
    assert_eq!(err_of(&r).code, ErrorCode::NotFound);
    let lines = audit_lines(&env);
    let decisions: Vec<&str> = lines
        .iter()
        .map(|r| r["decision"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        decisions,
        ["allow", "error"],
        "the attempt, then its failure"
    );
}

#[tokio::test]
async fn approvals_reply_fits_one_frame() {
    let big = |id| crate::approvals::Pending {
        id,
        identity: crate::audit::Who {
            id: 2,
            role: "tool".into(),
            profile: "tool".into(),
        },
        program: PathBuf::from("/usr/bin/yes"),
        program_sha256: "0".repeat(64),
        argv: vec!["/usr/bin/yes".into(), "x".repeat(10_000)],
        profile: "tool".into(),
        cwd: PathBuf::from("/"),
        created: "2026-01-02T03:04:05.000000Z".into(),
        expires: std::time::Instant::now() + Duration::from_secs(60),
    };
    let env = setup_with(
        GW,
        None,
        Some(Arc::new(ListingApprover {
            pending: (1..=20).map(big).collect(),
        })),
    );
    let r = env.ops.approvals(&who_id("gw", 1)).await;
    let ok = ok_of(&r);
    let OkReply::Approvals { pending, omitted } = &ok else {
        panic!("{ok:?}")
    };
    assert!(!pending.is_empty());
    assert_eq!(pending.len() as u64 + omitted, 20);
    assert!(*omitted > 0);
    assert_eq!(pending[0].id, 1, "oldest first");
    let bytes = encode_reply(u64::MAX, &Reply::Ok(ok.clone())).unwrap_or_else(|e| panic!("{e}"));
    assert!(bytes.len() <= MAX_FRAME);
}

#[tokio::test]
async fn redact_finds_secrets_and_the_profiles_patterns_for_gateways_only() {
    let extra = format!(
        "{GW}[profiles.authonly2]\nwhy = \"a gateway with reply patterns\"\n[profiles.authonly2.broker]\nauth = true\nredact = [\"internal-[0-9]+\"]\n"
    );
    let env = setup_with(&extra, None, None);
    let b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        SECRET.as_bytes(),
    );
    let text = format!(
        "key {SECRET} and {b64}; ticket internal-42; hex {}",
        hex::encode(SECRET)
    );
    // `authonly` is a gateway too, without patterns: only the secret forms.
    let r = env.ops.redact_op(&who("authonly"), &text).await;
    let OkReply::Redact { ranges } = ok_of(&r) else {
        panic!("{r:?}")
    };
    let hidden: Vec<&str> = ranges.iter().map(|(a, b)| &text[*a..*b]).collect();
    assert_eq!(hidden, [SECRET, b64.as_str(), hex::encode(SECRET).as_str()]);
    let rec = last_audit(&env);
    assert_eq!(
        (rec["op"].as_str(), rec["decision"].as_str()),
        (Some("redact"), Some("allow"))
    );
    assert!(!audit_text(&env).contains(SECRET));
    // The profile's patterns count too.
    let r = env.ops.redact_op(&who("authonly2"), &text).await;
    let OkReply::Redact { ranges } = ok_of(&r) else {
        panic!("{r:?}")
    };
    let hidden: Vec<&str> = ranges.iter().map(|(a, b)| &text[*a..*b]).collect();
    assert!(hidden.contains(&"internal-42"), "{hidden:?}");
    // Clean text: nothing to hide, nothing audited.
    let before = audit_text(&env).len();
    let r = env.ops.redact_op(&who("authonly"), "all is well").await;
    assert_eq!(ok_of(&r), OkReply::Redact { ranges: vec![] });
    assert_eq!(audit_text(&env).len(), before);
    // Any other profile is refused (it could test guesses), and so is too much text.
    let r = env.ops.redact_op(&who("tool"), &text).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let big = "x".repeat(crate::protocol::MAX_REDACT_TEXT + 1);
    let r = env.ops.redact_op(&who("authonly"), &big).await;
    assert_eq!(err_of(&r).code, ErrorCode::TooLarge);
}

// ---------------------------------------------------------------------------------------------
// Workspaces: granted by name, per owner, cwd; `open` in a workspace; `ask` open rules.

/// [`FakeSpawner`] that also keeps per-owner workspaces beneath `root`.
struct OwnerSpawner {
    inner: FakeSpawner,
    root: PathBuf,
}

impl Spawner for OwnerSpawner {
    fn spawn(&self, req: SpawnRequest) -> Result<SpawnHandle, SpawnFailure> {
        self.inner.spawn(req)
    }
    fn owner_workspace(&self, digest: &str) -> Result<PathBuf, SpawnFailure> {
        let d = self.root.join(digest);
        fs::create_dir_all(&d).map_err(|e| SpawnFailure {
            message: e.to_string(),
        })?;
        Ok(d)
    }
}

fn grant(name: &str, path: &Path, writable: bool, profiles: &[&str]) -> GrantedWorkspace {
    GrantedWorkspace {
        name: name.into(),
        path: fs::canonicalize(path).unwrap_or_else(|e| panic!("{e}")),
        writable,
        profiles: profiles.iter().map(|p| p.to_string()).collect(),
        why: "test".into(),
    }
}

/// The workspaces of `env.dir`: `proj` (data/, read-only, for `tool`), `rw` (data/out,
/// writable), `private` (data/, for nobody here).
fn with_workspaces(spawner: Option<Arc<dyn Spawner>>) -> Env {
    // The env's directory is made inside setup: the grants point into it afterwards.
    let env = setup_cfg("", spawner, None, |_| {});
    let ws = vec![
        grant("proj", &env.dir.join("data"), false, &["tool"]),
        grant("rw", &env.dir.join("data/out"), true, &["tool"]),
        grant("private", &env.dir.join("data"), true, &["someone-else"]),
    ];
    let mut cfg = env.ops.cfg.clone();
    cfg.workspaces = ws;
    let policy = (*env.ops.policy()).clone();
    let audit = AuditLog::open(env.dir.join("audit-ws.log")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = DeadLetters::open(env.dir.join("dlq-ws")).unwrap_or_else(|e| panic!("{e}"));
    let ops = Ops::new(policy, audit, dlq, env.ops.spawner.clone(), None, cfg)
        .unwrap_or_else(|e| panic!("{e}"));
    Env {
        ops: Arc::new(ops),
        ..env
    }
}

fn gateway_who(profile: &str) -> Identity {
    Identity {
        id: 9,
        role: Role::Gateway,
        profile: profile.to_string(),
    }
}

#[tokio::test]
async fn exec_workspaces_granted_per_owner_and_cwd() {
    let owners = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spawner = Arc::new(OwnerSpawner {
        inner: FakeSpawner::default(),
        root: owners.path().to_path_buf(),
    });
    let env = with_workspaces(Some(spawner.clone()));
    let seen = || {
        spawner
            .inner
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    };
    let t = || vec!["true".to_string()];
    // Granted, read-only, with a cwd within it.
    let r = env
        .ops
        .exec_in(
            &who("tool"),
            t(),
            Some("sub/dir".into()),
            None,
            Some("proj".into()),
        )
        .await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let _ = exit_of(r).await;
    let s = seen();
    assert_eq!(
        s[0].workspace.as_deref(),
        Some(
            fs::canonicalize(env.dir.join("data"))
                .unwrap_or_default()
                .as_path()
        )
    );
    assert!(s[0].read_only);
    assert_eq!(s[0].cwd.as_deref(), Some(Path::new("sub/dir")));
    // Not granted to this profile, unknown, or a bad name: refused, nothing started.
    for name in ["private", "nope", "../proj", ""] {
        let r = env
            .ops
            .exec_in(&who("tool"), t(), None, None, Some(name.into()))
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{name:?}");
    }
    // Bad cwds: refused as bad requests.
    for cwd in ["../x", "/etc", "a/../..", "a//b", "a\0b", ""] {
        let r = env
            .ops
            .exec_in(
                &who("tool"),
                t(),
                Some(cwd.into()),
                None,
                Some("proj".into()),
            )
            .await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest, "{cwd:?}");
    }
    // Per owner: only a gateway may name one; its workspace is named by the key's digest.
    let r = env
        .ops
        .exec_in(&who("tool"), t(), None, Some("token:a".into()), None)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let r = env
        .ops
        .exec_in(
            &gateway_who("tool"),
            t(),
            None,
            Some("token:a".into()),
            None,
        )
        .await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let _ = exit_of(r).await;
    let s = seen();
    let last = s.last().unwrap_or_else(|| panic!("nothing started"));
    assert_eq!(
        last.workspace.as_deref(),
        Some(owners.path().join(owner_digest("token:a")).as_path())
    );
    assert!(!last.read_only);
    let r = env
        .ops
        .exec_in(
            &gateway_who("tool"),
            t(),
            None,
            Some("bad\nkey".into()),
            None,
        )
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::BadRequest);
    assert_eq!(seen().len(), 2);
    // A spawner without per-owner workspaces: unavailable, not the shared one.
    let env = with_workspaces(Some(Arc::new(FakeSpawner::default())));
    let r = env
        .ops
        .exec_in(
            &gateway_who("tool"),
            t(),
            None,
            Some("token:a".into()),
            None,
        )
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Unavailable);
}

#[tokio::test]
async fn open_in_a_workspace_stays_beneath_it() {
    let env = with_workspaces(None);
    let tool = who("tool");
    let r = env
        .ops
        .open_in(&tool, Some("proj"), "a.txt", Access::Read)
        .await;
    assert!(matches!(ok_of(&r), OkReply::Open { .. }));
    assert_eq!(
        read_fd(r.fds.into_iter().next().unwrap_or_else(|| panic!())),
        "alpha"
    );
    // A directory, listed (the workspace itself is `.`).
    let r = env
        .ops
        .open_in(&tool, Some("proj"), ".", Access::List)
        .await;
    let fd = r.fds.into_iter().next().unwrap_or_else(|| panic!("no fd"));
    let f = fs::File::from(fd);
    assert!(f.metadata().map(|m| m.is_dir()).unwrap_or(false));
    let r = env
        .ops
        .open_in(&tool, Some("proj"), "a.txt", Access::List)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    // Escapes: `..`, absolute paths, NUL (bad requests); symlinks out or in (denied).
    for p in ["../outside.txt", "/etc/passwd", "a\0b", "out/../../x"] {
        let r = env.ops.open_in(&tool, Some("proj"), p, Access::Read).await;
        assert_eq!(err_of(&r).code, ErrorCode::BadRequest, "{p:?}");
    }
    for p in ["link", "dirlink/outside.txt", "inner"] {
        let r = env.ops.open_in(&tool, Some("proj"), p, Access::Read).await;
        assert_eq!(err_of(&r).code, ErrorCode::Denied, "{p:?}");
    }
    // A read-only workspace refuses writes even where the open rules allow them.
    let r = env
        .ops
        .open_in(&tool, Some("proj"), "out/new", Access::Create)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    assert!(err_of(&r).message.contains("read-only"), "{:?}", err_of(&r));
    let r = env
        .ops
        .open_in(&tool, Some("rw"), "new", Access::Create)
        .await;
    assert!(matches!(ok_of(&r), OkReply::Open { .. }));
    assert!(env.dir.join("data/out/new").exists());
    // Not granted to this profile.
    let r = env
        .ops
        .open_in(&tool, Some("private"), "a.txt", Access::Read)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    // The open rules still decide: the rule for data/ is read-only.
    let r = env
        .ops
        .open_in(&tool, Some("proj"), "a.txt", Access::Write)
        .await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

#[tokio::test]
async fn open_under_an_ask_rule_waits_for_the_operator() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let approvals = Arc::new(
        Approvals::open(tmp.path(), Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}")),
    );
    let extra = r#"
[profiles.asker]
why = "opens after asking"
[profiles.asker.broker]
open = [ { path = "/etc", access = "read", approval = "ask", why = "each read approved" } ]
"#;
    let env = setup_with(extra, None, Some(approvals.clone()));
    let operator = {
        let a = approvals.clone();
        std::thread::spawn(move || {
            let mut answers = vec![Resolution::Deny, Resolution::AllowOnce];
            let mut argvs = Vec::new();
            while let Some(ans) = answers.pop() {
                let p = loop {
                    if let Some(p) = a.list().first().cloned() {
                        break p;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                argvs.push(p.argv.clone());
                let _ = a.resolve(p.id, ans);
            }
            argvs
        })
    };
    let asker = who("asker");
    let r = env.ops.open(&asker, "/etc/passwd", Access::Read).await;
    assert!(matches!(ok_of(&r), OkReply::Open { .. }));
    let r = env.ops.open(&asker, "/etc/passwd", Access::Read).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
    let argvs = operator.join().unwrap_or_default();
    assert_eq!(argvs[0], vec!["open", "read", "/etc/passwd"]);
    let decisions: Vec<String> = audit_lines(&env)
        .iter()
        .filter(|r| r["op"] == "open")
        .map(|r| r["decision"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(decisions, ["ask", "allow", "ask", "deny"]);
    // Without an approver, an ask rule refuses.
    let env = setup_with(extra, None, None);
    let r = env.ops.open(&asker, "/etc/passwd", Access::Read).await;
    assert_eq!(err_of(&r).code, ErrorCode::Denied);
}

#[tokio::test]
async fn granted_workspaces_follow_a_reload_of_the_configuration() {
    let env = with_workspaces(Some(Arc::new(FakeSpawner::default())));
    let t = || vec!["true".to_string()];
    let exec_in = |name: &'static str| {
        let ops = env.ops.clone();
        async move {
            ops.exec_in(&who("tool"), t(), None, None, Some(name.into()))
                .await
        }
    };
    // Before: `proj` is granted, `late` is not.
    let r = exec_in("proj").await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let _ = exit_of(r).await;
    assert_eq!(err_of(&exec_in("late").await).code, ErrorCode::Denied);
    // The operator grants `late` and withdraws `proj`: the next requests see it.
    env.ops
        .set_workspaces(vec![grant("late", &env.dir.join("data"), false, &["tool"])]);
    let r = exec_in("late").await;
    assert_eq!(ok_of(&r), OkReply::Exec {});
    let _ = exit_of(r).await;
    assert_eq!(err_of(&exec_in("proj").await).code, ErrorCode::Denied);
}
