//! Tests of the control socket: protocol, server, client, audit tail.

use super::*;
use carapace_broker::approvals::Resolution;
use std::sync::Mutex;

/// Env var telling [`peer_helper`] to act as an unprivileged client of this socket.
const PEER_ENV: &str = "CARAPACE_CONTROL_TEST_PEER";
const PEER_UID: u32 = 2_000_000;
const PEER_GID: u32 = 2_000_000;
const CONTROL_GID: u32 = 2_000_042;

/// True if we may run privileged tests; panics when not root unless CARAPACE_ALLOW_SKIP=1.
fn privileged() -> bool {
    if carapace_sandbox::Privilege::of_this_process().is_root() {
        return true;
    }
    if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("skipping privileged control socket test: not root (CARAPACE_ALLOW_SKIP=1)");
        return false;
    }
    panic!("this test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip it");
}

#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<Request>>,
    audit: PathBuf,
}

impl ControlHandler for Fake {
    fn handle(&self, req: Request) -> Result<Value, String> {
        self.seen
            .lock()
            .map_err(|e| e.to_string())?
            .push(req.clone());
        match req {
            Request::Status => Ok(serde_json::to_value(sample_status()).unwrap_or_default()),
            Request::ApprovalsList => Ok(serde_json::json!({"pending": [], "always": []})),
            Request::ApprovalsResolve { id: 404, .. } => Err("no pending approval 404".to_string()),
            Request::ApprovalsResolve { id, resolution } => {
                Ok(serde_json::json!({"id": id, "decision": resolution}))
            }
            Request::DlqList => Ok(serde_json::json!({"letters": [], "unreadable": []})),
            Request::DlqRelease { id } => Ok(serde_json::json!({"released": id})),
            Request::DlqDrop { id } => Ok(serde_json::json!({ "dropped": id })),
            Request::HeldList => Ok(serde_json::json!({"held": []})),
            Request::HeldAdmit { id, always } => {
                Ok(serde_json::json!({"id": id, "seq": 1, "always": always}))
            }
            Request::HeldDrop { id } => Ok(serde_json::json!({ "dropped": id })),
            Request::Reload => Err("policy.toml:3:1: unknown key \"x\"".to_string()),
            Request::AuditTail { .. } => Err("audit_tail reached the handler".to_string()),
            Request::Metrics => Ok(serde_json::json!({"text": "x 1\n"})),
            Request::JobsList => Ok(serde_json::json!({"jobs": []})),
            Request::JobsRun { name } => Ok(serde_json::json!({"job": name, "run": "m1"})),
            Request::JobsHistory { .. } => Ok(serde_json::json!({"runs": []})),
        }
    }
    fn audit_log(&self) -> PathBuf {
        self.audit.clone()
    }
}

pub(crate) fn sample_status() -> StatusReport {
    StatusReport {
        pid: 4242,
        version: "0.1.0".to_string(),
        started: "2026-11-21T14:00:00.000000Z".to_string(),
        uptime_secs: 3723,
        tools: "spawner (pid 4243)".to_string(),
        mode: "root".to_string(),
        cgroups: "hybrid v1+v2".to_string(),
        config: "embedded default".to_string(),
        policy: PolicyStatus {
            files: vec!["/etc/carapace/policy.toml".to_string()],
            sha256: "ab".repeat(32),
            loaded: "2026-11-21T14:00:00.000000Z".to_string(),
        },
        reloads: 2,
        last_reload_error: None,
        children: vec![ChildStatus {
            name: "gateway".to_string(),
            role: "gateway".to_string(),
            profile: "gateway".to_string(),
            state: "running".to_string(),
            pid: Some(777),
            uptime_secs: Some(65),
            restarts: 1,
            last_exit: Some("signal=9".to_string()),
            memory_bytes: Some(12 << 20),
            cpu_ms: Some(1500),
            tasks: Some(3),
        }],
        pending_approvals: 1,
        dead_letters: 0,
        channels: Vec::new(),
        audit: AuditStatus {
            path: "/var/lib/carapace/audit.log".to_string(),
            seq: 17,
            head: "cd".repeat(32),
        },
    }
}

struct Served {
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: ControlShutdown,
    path: PathBuf,
    fake: Arc<Fake>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn stop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), t).await })
                .expect("server did not stop")
                .expect("server task failed");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.shutdown();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn serve_with(group: Option<u32>, idle: Duration) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.sock");
    let fake = Arc::new(Fake {
        seen: Mutex::new(Vec::new()),
        audit: dir.path().join("audit.log"),
    });
    let server = ControlServer::bind(&path, group)
        .expect("bind")
        .with_idle_timeout(idle);
    let stop = server.shutdown_handle();
    let rt = runtime();
    let task = {
        let _g = rt.enter();
        server.serve(fake.clone())
    };
    Served {
        rt,
        task: Some(task),
        stop,
        path,
        fake,
        _dir: dir,
    }
}

fn serve() -> Served {
    serve_with(None, IDLE_TIMEOUT)
}

/// Raw connection: write bytes, read reply lines.
struct Raw {
    r: BufReader<UnixStream>,
}

impl Raw {
    fn new(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Raw {
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).expect("write");
    }
    /// The next reply, or None at EOF.
    fn reply(&mut self) -> Option<Reply> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read");
        (n > 0).then(|| serde_json::from_str(&line).expect("reply is JSON"))
    }
    fn error(&mut self) -> String {
        let r = self.reply().expect("a reply");
        assert!(!r.ok, "{r:?}");
        r.error.expect("error message")
    }
}

#[test]
fn request_wire_format() {
    let cases = [
        (Request::Status, r#"{"op":"status"}"#),
        (Request::ApprovalsList, r#"{"op":"approvals_list"}"#),
        (
            Request::ApprovalsResolve {
                id: 3,
                resolution: "allow-once".to_string(),
            },
            r#"{"op":"approvals_resolve","id":3,"resolution":"allow-once"}"#,
        ),
        (Request::DlqList, r#"{"op":"dlq_list"}"#),
        (
            Request::DlqRelease { id: "a-1".into() },
            r#"{"op":"dlq_release","id":"a-1"}"#,
        ),
        (
            Request::DlqDrop { id: "a-1".into() },
            r#"{"op":"dlq_drop","id":"a-1"}"#,
        ),
        (Request::HeldList, r#"{"op":"held_list"}"#),
        (
            Request::HeldAdmit {
                id: "h-1".into(),
                always: true,
            },
            r#"{"op":"held_admit","id":"h-1","always":true}"#,
        ),
        (
            Request::HeldDrop { id: "h-1".into() },
            r#"{"op":"held_drop","id":"h-1"}"#,
        ),
        (
            Request::AuditTail {
                lines: 5,
                follow: true,
            },
            r#"{"op":"audit_tail","lines":5,"follow":true}"#,
        ),
        (Request::Reload, r#"{"op":"reload"}"#),
        (Request::Metrics, r#"{"op":"metrics"}"#),
        (Request::JobsList, r#"{"op":"jobs_list"}"#),
        (
            Request::JobsRun {
                name: "tick".into(),
            },
            r#"{"op":"jobs_run","name":"tick"}"#,
        ),
        (
            Request::JobsHistory {
                name: Some("tick".into()),
                limit: Some(5),
            },
            r#"{"op":"jobs_history","name":"tick","limit":5}"#,
        ),
    ];
    assert_eq!(cases.len(), OPS.len(), "one case per op of the table");
    for ((req, text), (name, fields)) in cases.iter().zip(OPS) {
        assert_eq!(serde_json::to_string(req).unwrap(), *text);
        assert_eq!(parse_request(text.as_bytes()).unwrap(), *req);
        // The table and the typed requests agree: the same name, in the same order, and
        // every field the request serializes is one the table lists.
        assert_eq!(req.op(), *name);
        let v = serde_json::to_value(req).unwrap();
        for k in v.as_object().unwrap().keys().filter(|k| *k != "op") {
            assert!(fields.contains(&k.as_str()), "{name}: {k}");
        }
    }
    assert_eq!(
        parse_request(br#"{"op":"audit_tail"}"#).unwrap(),
        Request::AuditTail {
            lines: DEFAULT_TAIL_LINES,
            follow: false
        }
    );
    assert!(parse_request(br#"{"op":"status","x":1}"#).is_err());
    assert!(parse_request(br#"{"op":"dlq_drop"}"#)
        .unwrap_err()
        .contains("id"));
    assert!(parse_request(br#"{"op":"nope"}"#)
        .unwrap_err()
        .starts_with("unknown op \"nope\""));
    assert!(parse_request(b"{").unwrap_err().contains("not JSON"));
    assert!(parse_request(b"[]").unwrap_err().contains("object"));
    assert!(parse_request(br#"{"op":1}"#)
        .unwrap_err()
        .contains("string"));
    assert!(parse_request(br#"{}"#).unwrap_err().contains("no \"op\""));
    for (op, fields) in OPS {
        assert_eq!(op_fields(op), Some(*fields), "{op}");
    }
    assert!(parse_request(br#"{"op":"reload","lines":1}"#)
        .unwrap_err()
        .contains("unknown field \"lines\""));
    for r in Resolution::ALL {
        assert_eq!(Resolution::parse(r.as_str()), Some(r));
    }
    assert!(Resolution::parse("allow").is_none());
}

#[test]
fn every_request_kind_round_trips() {
    let mut s = serve();
    let reqs = vec![
        Request::Status,
        Request::ApprovalsList,
        Request::ApprovalsResolve {
            id: 7,
            resolution: "deny".to_string(),
        },
        Request::DlqList,
        Request::DlqRelease { id: "x-1".into() },
        Request::DlqDrop { id: "x-2".into() },
        Request::HeldList,
        Request::HeldAdmit {
            id: "h-1".into(),
            always: false,
        },
        Request::HeldDrop { id: "h-2".into() },
    ];
    let status = call(&s.path, &Request::Status).unwrap();
    let status: StatusReport = serde_json::from_value(status).unwrap();
    assert_eq!(status, sample_status());
    for r in &reqs[1..] {
        call(&s.path, r).unwrap();
    }
    assert_eq!(
        call(&s.path, &Request::DlqDrop { id: "x-2".into() }).unwrap(),
        serde_json::json!({"dropped": "x-2"})
    );
    // The handler's errors come back as Daemon errors with its message.
    match call(&s.path, &Request::Reload) {
        Err(ControlError::Daemon { message }) => assert!(message.contains("unknown key")),
        other => panic!("{other:?}"),
    }
    match call(
        &s.path,
        &Request::ApprovalsResolve {
            id: 404,
            resolution: "deny".into(),
        },
    ) {
        Err(ControlError::Daemon { message }) => assert_eq!(message, "no pending approval 404"),
        other => panic!("{other:?}"),
    }
    let seen = s.fake.seen.lock().unwrap().clone();
    let mut want = reqs.clone();
    want.push(Request::DlqDrop { id: "x-2".into() });
    want.push(Request::Reload);
    want.push(Request::ApprovalsResolve {
        id: 404,
        resolution: "deny".into(),
    });
    assert_eq!(seen, want);
    // Several requests on one connection.
    let mut raw = Raw::new(&s.path);
    raw.send(b"{\"op\":\"dlq_list\"}\n\n{\"op\":\"approvals_list\"}\n");
    assert!(raw.reply().unwrap().ok);
    assert!(raw.reply().unwrap().ok);
    s.stop();
}

#[test]
fn bad_requests_get_errors_and_the_connection_stays() {
    let mut s = serve();
    let mut raw = Raw::new(&s.path);
    raw.send(b"this is not json\n");
    assert!(raw.error().contains("not JSON"));
    raw.send(b"{\"op\":\"frobnicate\"}\n");
    let e = raw.error();
    assert!(e.starts_with("unknown op \"frobnicate\""), "{e}");
    assert!(e.contains("status"), "{e}");
    raw.send(b"{\"op\":\"status\",\"verbose\":true}\n");
    assert!(raw.error().contains("verbose"));
    raw.send(b"[1,2]\n");
    assert!(raw.error().contains("object"));
    raw.send(b"{\"op\":\"approvals_resolve\",\"id\":\"x\",\"resolution\":\"deny\"}\n");
    assert!(raw.error().starts_with("bad request: approvals_resolve"));
    // Still usable; none of the bad ones reached the handler.
    raw.send(b"{\"op\":\"status\"}\r\n");
    let r = raw.reply().unwrap();
    assert!(r.ok && r.result.is_some(), "{r:?}");
    assert_eq!(*s.fake.seen.lock().unwrap(), vec![Request::Status]);
    // A last request without a newline before EOF is still answered.
    let mut raw = Raw::new(&s.path);
    raw.send(b"{\"op\":\"dlq_list\"}");
    raw.r.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(raw.reply().unwrap().ok);
    assert!(raw.reply().is_none());
    s.stop();
}

#[test]
fn oversize_line_is_refused_and_closed() {
    let mut s = serve();
    // Exactly the limit is fine.
    let mut line = br#"{"op":"status"}"#.to_vec();
    line.resize(MAX_REQUEST_LINE, b' ');
    line.push(b'\n');
    let mut raw = Raw::new(&s.path);
    raw.send(&line);
    assert!(raw.reply().unwrap().ok);
    // One byte more is not, and the connection ends.
    let mut line = br#"{"op":"status"}"#.to_vec();
    line.resize(MAX_REQUEST_LINE + 1, b' ');
    line.extend_from_slice(b"\n{\"op\":\"status\"}\n");
    let mut raw = Raw::new(&s.path);
    raw.send(&line);
    let e = raw.error();
    assert!(e.contains("longer than 65536 bytes"), "{e}");
    assert!(raw.reply().is_none(), "connection must be closed");
    assert_eq!(s.fake.seen.lock().unwrap().len(), 1);
    s.stop();
}

#[test]
fn idle_connections_are_closed() {
    let mut s = serve_with(None, Duration::from_millis(300));
    let mut raw = Raw::new(&s.path);
    let t = Instant::now();
    assert!(raw.reply().is_none());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    s.stop();
}

#[test]
fn no_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let e = call(&path, &Request::Status).unwrap_err();
    assert!(matches!(e, ControlError::NotRunning { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("no supervisor is running"), "{msg}");
    assert!(msg.contains("carapace run"), "{msg}");
    // A socket nobody listens on: the same.
    drop(UnixListener::bind(&path).unwrap());
    assert!(matches!(
        call(&path, &Request::Status),
        Err(ControlError::NotRunning { .. })
    ));
    assert!(matches!(
        stream(
            &path,
            &Request::AuditTail {
                lines: 1,
                follow: false
            },
            |_| true
        ),
        Err(ControlError::NotRunning { .. })
    ));
}

#[test]
fn stale_socket_is_replaced_live_one_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    // Stale: bound, then its listener gone.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ControlServer::bind(&path, None).expect("stale socket replaced");
    let stop = server.shutdown_handle();
    let rt = runtime();
    let fake = Arc::new(Fake::default());
    let task = {
        let _g = rt.enter();
        server.serve(fake)
    };
    call(&path, &Request::Status).expect("served");
    // Live: a second server refuses to take it, and the first still answers.
    let e = ControlServer::bind(&path, None).unwrap_err();
    assert!(matches!(e, ControlError::InUse { .. }), "{e:?}");
    assert!(e.to_string().contains("another supervisor is serving"));
    call(&path, &Request::Status).expect("still served");
    // Shutdown removes the socket.
    stop.shutdown();
    rt.block_on(task).unwrap();
    assert!(!path.exists());
    // Dropping an unserved server removes its socket too, but not one that replaced it.
    let server = ControlServer::bind(&path, None).unwrap();
    drop(server);
    assert!(!path.exists());
    let server = ControlServer::bind(&path, None).unwrap();
    fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(path.exists(), "someone else's socket was removed");
    drop(other);
}

#[test]
fn concurrent_binds_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    for _ in 0..5 {
        let barrier = Arc::new(std::sync::Barrier::new(6));
        let results: Vec<_> = (0..6)
            .map(|_| {
                let (p, b) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    ControlServer::bind(&p, None)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, ControlError::InUse { .. }), "{e:?}");
            }
        }
        drop(results);
        assert!(!path.exists());
    }
}

#[test]
fn probe_refuses_a_path_that_does_not_fit_sun_path() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().as_os_str().len() + 1;
    let kind = |p: &Path| probe(p).err().map(|e| e.kind());
    // 107 bytes and the NUL fit: nothing is there, so connect(2) says ENOENT.
    let fits = dir.path().join("a".repeat(107 - base));
    assert_eq!(kind(&fits), Some(io::ErrorKind::NotFound));
    let long = dir.path().join("a".repeat(108 - base));
    assert_eq!(kind(&long), Some(io::ErrorKind::InvalidInput));
}

#[test]
fn a_wedged_server_is_live_and_the_probe_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    // A server that never accepts, with a backlog of one...
    let listener = UnixListener::bind(&path).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    // ...filled up (each probe's connection stays queued).
    for _ in 0..4 {
        assert!(matches!(probe(&path), Ok(Probe::Live)));
    }
    // The backlog is full: a blocking connect now waits.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    let blocked = std::thread::spawn(move || {
        let r = UnixStream::connect(&p);
        let _ = tx.send(r.is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the backlog is not full: the test proves nothing"
    );
    // Binding over it neither hangs nor steals it.
    let (tx2, rx2) = std::sync::mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = tx2.send(ControlServer::bind(&p, None).map(|_| ()));
    });
    let r = rx2
        .recv_timeout(Duration::from_secs(5))
        .expect("bind hung on a wedged server");
    assert!(matches!(r, Err(ControlError::InUse { .. })), "{r:?}");
    assert!(path.exists());
    // Closing the listener releases the blocked connect.
    drop(listener);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    blocked.join().unwrap();
}

#[test]
fn bind_refuses_unsafe_places() {
    let dir = tempfile::tempdir().unwrap();
    // Not a socket at the path.
    let file = dir.path().join("control.sock");
    fs::write(&file, "x").unwrap();
    let e = ControlServer::bind(&file, None).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert!(file.exists());
    // Parent is a symlink.
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = ControlServer::bind(&link.join("control.sock"), None).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    // Parent writable by others.
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    let e = ControlServer::bind(&open.join("control.sock"), None).unwrap_err();
    assert!(e.to_string().contains("writable by others"), "{e}");
    // Relative path.
    assert!(ControlServer::bind(Path::new("control.sock"), None).is_err());
    // A missing parent is created, private to us (0755 as root, else 0700).
    let run = dir.path().join("run/carapace");
    let s = ControlServer::bind(&run.join("control.sock"), None).unwrap();
    let mode = fs::metadata(&run).unwrap().mode() & 0o777;
    assert_eq!(mode, if euid() == 0 { 0o755 } else { 0o700 });
    drop(s);
}

#[test]
fn socket_mode_0660_and_group() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let s = ControlServer::bind(&path, Some(CONTROL_GID)).unwrap();
    let m = fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o7777, 0o660);
    assert_eq!(m.gid(), CONTROL_GID);
    assert_eq!(m.uid(), euid());
    // Nothing else left behind (the private temporary directory is gone).
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("control.sock")]);
    drop(s);
    // Without a group: ours.
    let s = ControlServer::bind(&path, None).unwrap();
    let m = fs::symlink_metadata(&path).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o660);
    assert_eq!(m.gid(), unsafe_free_egid());
    drop(s);
}

fn unsafe_free_egid() -> u32 {
    rustix::process::getegid().as_raw()
}

#[test]
fn peer_allowed_rules() {
    let no_groups = || -> io::Result<Vec<u32>> { panic!("groups asked for needlessly") };
    assert!(peer_allowed(0, 0, 1000, None, no_groups));
    assert!(peer_allowed(1000, 1000, 1000, None, no_groups));
    assert!(!peer_allowed(1001, 1001, 1000, None, no_groups));
    assert!(peer_allowed(1001, 50, 1000, Some(50), no_groups));
    assert!(peer_allowed(1001, 1001, 1000, Some(50), || Ok(vec![7, 50])));
    assert!(!peer_allowed(1001, 1001, 1000, Some(50), || Ok(vec![
        7, 51
    ])));
    assert!(!peer_allowed(1001, 1001, 1000, Some(50), || Err(
        io::Error::other("x")
    )));
}

/// Not a test of its own: the unprivileged client the peer tests start (as another uid, via
/// setpriv). Does nothing unless `CARAPACE_CONTROL_TEST_PEER` names a socket.
#[test]
fn peer_helper() {
    let Some(path) = std::env::var_os(PEER_ENV) else {
        return;
    };
    match call(Path::new(&path), &Request::Status) {
        Ok(_) => println!("PEER-RESULT ok"),
        Err(e) => println!("PEER-RESULT err {e}"),
    }
}

/// Run [`peer_helper`] as `PEER_UID` with `gid` and supplementary `groups`.
fn run_peer(path: &Path, gid: u32, groups: &[u32]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg(format!("--reuid={PEER_UID}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", g.join(",")));
    }
    let out = cmd
        .arg("--")
        .arg(exe)
        .args([
            "--exact",
            "control::tests::peer_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PEER_ENV, path)
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("PEER-RESULT ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "peer helper printed no result: {}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[test]
fn unauthorized_peer_is_refused() {
    if !privileged() {
        return;
    }
    let mut s = serve_with(Some(CONTROL_GID), IDLE_TIMEOUT);
    let dir = s.path.parent().unwrap().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    // With the socket's mode as bound, the file system already keeps the stranger out.
    let r = run_peer(&s.path, PEER_GID, &[]);
    assert!(r.contains("Permission denied"), "{r}");
    // Were the mode too wide (an operator's chmod), SO_PEERCRED still refuses it.
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o666)).unwrap();
    let r = run_peer(&s.path, PEER_GID, &[]);
    assert_eq!(
        r,
        format!(
            "err permission denied: uid {PEER_UID} (gid {PEER_GID}) is not root and not in \
                 the control group"
        )
    );
    // A member of the control group is allowed: by supplementary group, or primary gid.
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o660)).unwrap();
    assert_eq!(run_peer(&s.path, PEER_GID, &[CONTROL_GID]), "ok");
    assert_eq!(run_peer(&s.path, CONTROL_GID, &[]), "ok");
    // The refused peer never reached the handler.
    assert_eq!(s.fake.seen.lock().unwrap().len(), 2);
    s.stop();
}

fn record(seq: u64) -> String {
    format!(r#"{{"seq":{seq},"op":"connect","decision":"allow"}}"#)
}

fn tail(path: &Path, lines: usize) -> Vec<Value> {
    let mut got = Vec::new();
    stream(
        path,
        &Request::AuditTail {
            lines,
            follow: false,
        },
        |v| {
            got.push(v);
            true
        },
    )
    .unwrap();
    got
}

fn seqs(vals: &[Value]) -> Vec<u64> {
    vals.iter()
        .map(|v| v["seq"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn audit_tail_without_follow() {
    let mut s = serve();
    let log = s.fake.audit.clone();
    // No log yet: no records, and the stream ends.
    assert!(tail(&s.path, 10).is_empty());
    let mut text: String = (1..=5).map(|i| record(i) + "\n").collect();
    text.push_str("not json\n");
    text.push_str(r#"{"seq":7,"partial"#); // being written: not sent
    fs::write(&log, &text).unwrap();
    let got = tail(&s.path, 3);
    assert_eq!(seqs(&got[..2]), vec![4, 5]);
    assert_eq!(got[2], Value::String("not json".to_string()));
    assert_eq!(seqs(&tail(&s.path, 100)[..5]), vec![1, 2, 3, 4, 5]);
    assert!(tail(&s.path, 0).is_empty());
    // Records arrive byte for byte (field order as stored), with the raw text.
    let mut raws = Vec::new();
    stream_raw(
        &s.path,
        &Request::AuditTail {
            lines: 2,
            follow: false,
        },
        |_, raw| {
            raws.push(raw.map(str::to_string));
            true
        },
    )
    .unwrap();
    assert_eq!(raws, vec![Some(record(5)), None]);
    let mut raw = Raw::new(&s.path);
    raw.send(b"{\"op\":\"audit_tail\",\"lines\":2}\n");
    let mut line = String::new();
    raw.r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{{\"ok\":true,\"line\":{}}}\n", record(5)));
    // A line crafted to look like more of the reply is not an object: sent as a string.
    let evil = r#"{"seq":9}},"end":true,"x":{"a":1"#;
    fs::write(&log, format!("{evil}\n")).unwrap();
    assert_eq!(tail(&s.path, 1), vec![Value::String(evil.to_string())]);
    // The handler never sees audit_tail.
    assert!(s.fake.seen.lock().unwrap().is_empty());
    // And the connection serves further requests after `end`.
    let mut raw = Raw::new(&s.path);
    raw.send(b"{\"op\":\"audit_tail\",\"lines\":1}\n{\"op\":\"status\"}\n");
    assert_eq!(
        raw.reply().unwrap().line.unwrap(),
        Value::String(evil.to_string())
    );
    assert_eq!(raw.reply().unwrap().end, Some(true));
    assert!(raw.reply().unwrap().result.is_some());
    s.stop();
}

#[test]
fn last_lines_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    // Lines of 1000 bytes: 300 KB, several 64 KiB chunks.
    let line = |i: usize| format!("{i:05}{}", "x".repeat(994));
    let text: String = (0..300).map(|i| line(i) + "\n").collect();
    fs::write(&p, &text).unwrap();
    let mut f = File::open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    for n in [0, 1, 65, 66, 200, 300, 1000] {
        let (got, end) = last_lines(&mut f, len, n).unwrap();
        assert_eq!(end, len);
        let want: Vec<Vec<u8>> = (300usize.saturating_sub(n)..300)
            .map(|i| line(i).into_bytes())
            .collect();
        assert_eq!(got, want, "n={n}");
    }
    // A torn last line is not returned and the end is before it.
    fs::write(&p, format!("{}\nabc", line(0))).unwrap();
    let mut f = File::open(&p).unwrap();
    let (got, end) = last_lines(&mut f, 1003, 5).unwrap();
    assert_eq!(got, vec![line(0).into_bytes()]);
    assert_eq!(end, 1000);
    // No newline at all.
    let (got, end) = last_lines(&mut f, 3, 5).unwrap();
    assert!(got.is_empty());
    assert_eq!(end, 0);
}

#[test]
fn audit_tail_follow() {
    let mut s = serve();
    let log = s.fake.audit.clone();
    fs::write(&log, format!("{}\n{}\n", record(1), record(2))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = s.path.clone();
    let follower = std::thread::spawn(move || {
        let mut n = 0;
        stream(
            &path,
            &Request::AuditTail {
                lines: 1,
                follow: true,
            },
            |v| {
                n += 1;
                let _ = tx.send(v);
                n < 6
            },
        )
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a followed record")
    };
    assert_eq!(next()["seq"], 2);
    // Appended records arrive; a line written in two pieces arrives once, whole.
    let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(f, "{}", record(3)).unwrap();
    assert_eq!(next()["seq"], 3);
    let r4 = record(4);
    f.write_all(&r4.as_bytes()[..5]).unwrap();
    std::thread::sleep(FOLLOW_POLL * 2);
    writeln!(f, "{}", &r4[5..]).unwrap();
    assert_eq!(next()["seq"], 4);
    // Rotation: the old file moved away (a last record in it still comes), a new one made.
    writeln!(f, "{}", record(5)).unwrap();
    fs::rename(&log, log.with_extension("1")).unwrap();
    fs::write(&log, format!("{}\n", record(100))).unwrap();
    let a = next();
    let b = next();
    assert_eq!(seqs(&[a, b]), vec![5, 100]);
    // Truncation: from the start again.
    fs::write(&log, "").unwrap();
    std::thread::sleep(FOLLOW_POLL * 2);
    fs::write(&log, format!("{}\n", record(200))).unwrap();
    assert_eq!(next()["seq"], 200);
    // The callback said stop after six records: the client closes and returns Ok.
    follower.join().unwrap().unwrap();
    assert!(rx.try_recv().is_err());
    s.stop();
}

#[test]
fn shutdown_ends_followers_and_removes_the_socket() {
    let mut s = serve();
    let path = s.path.clone();
    let follower = std::thread::spawn(move || {
        stream(
            &path,
            &Request::AuditTail {
                lines: 0,
                follow: true,
            },
            |_| true,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    s.stop();
    let r = follower.join().unwrap();
    assert!(matches!(r, Err(ControlError::Protocol { .. })), "{r:?}");
    assert!(!s.path.exists());
    assert!(matches!(
        call(&s.path, &Request::Status),
        Err(ControlError::NotRunning { .. })
    ));
}

#[test]
fn aborting_the_task_removes_the_socket() {
    let mut s = serve();
    call(&s.path, &Request::Status).unwrap();
    let task = s.task.take().unwrap();
    task.abort();
    let _ = s.rt.block_on(task);
    assert!(!s.path.exists());
}
