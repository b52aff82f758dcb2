//! The supervisor's log in the journal, end to end: `carapace run` (the service harness,
//! `carapace_tests::service`) in a private mount namespace where the test's own datagram socket
//! is bind-mounted at `/run/systemd/journal/socket`, so the native records it sends arrive
//! here. With `JOURNAL_STREAM` naming its stderr, the child's start (`CHILD=gateway`) and a
//! broker refusal (`DECISION=deny`, `OP=exec`) arrive as records with those fields; with a
//! `JOURNAL_STREAM` that names some other stream (as a process inherits it), nothing is sent
//! there and the log stays on stderr.
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_tests::*;

/// A stand-in for journald: a datagram socket in a fresh directory, read continuously by a
/// thread (as journald does: the supervisor's socket does not wait for a slow reader).
struct FakeJournal {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    /// Every datagram received so far (the writer's probe is an empty one).
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeJournal {
    fn new() -> FakeJournal {
        let dir = var_tmpdir("carapace-journal-");
        let path = dir.path().join("journal.sock");
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind: {e}"));
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            // Ends when the test process does (the socket is never closed before).
            while let Ok(n) = socket.recv(&mut buf) {
                if let Ok(mut g) = sink.lock() {
                    g.push(buf[..n].to_vec());
                }
            }
        });
        FakeJournal {
            _dir: dir,
            path,
            got,
        }
    }

    /// Every datagram so far.
    fn datagrams(&self) -> Vec<Vec<u8>> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The records so far (empty datagrams skipped).
    fn records(&self) -> Vec<BTreeMap<String, String>> {
        self.datagrams()
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| parse_record(d))
            .collect()
    }

    /// Wait (up to `limit`) for a record with all of `fields`; the record.
    fn wait_for(&self, fields: &[(&str, &str)], limit: Duration) -> BTreeMap<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let records = self.records();
            if let Some(r) = records.iter().find(|r| {
                fields
                    .iter()
                    .all(|(k, v)| r.get(*k).map(String::as_str) == Some(*v))
            }) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no record with {fields:?}; got {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The fields of one native record, decoding both forms (`K=v\n` and `K\n<le64 len>v\n`).
fn parse_record(mut b: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == b'\n' || c == b'=')
            .unwrap_or_else(|| panic!("a field without an end: {b:?}"));
        let name = String::from_utf8_lossy(&b[..end]).into_owned();
        let value;
        if b[end] == b'=' {
            let nl = end
                + b[end..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .unwrap_or_else(|| panic!("no newline after {name}"));
            value = String::from_utf8_lossy(&b[end + 1..nl]).into_owned();
            b = &b[nl + 1..];
        } else {
            let mut len = [0u8; 8];
            len.copy_from_slice(&b[end + 1..end + 9]);
            let len = u64::from_le_bytes(len) as usize;
            value = String::from_utf8_lossy(&b[end + 9..end + 9 + len]).into_owned();
            b = &b[end + 10 + len..];
        }
        out.insert(name, value);
    }
    out
}

/// `unshare -m` with private propagation, a tmpfs over /run/systemd (or /run where there is
/// none), the socket at `sock` bind-mounted at /run/systemd/journal/socket; `env` is set before
/// the supervisor is exec'd.
fn journal_namespace(sock: &Path, env: &str) -> Vec<String> {
    let script = format!(
        "set -e; if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; \
         else mount -t tmpfs tmpfs /run; fi; mkdir -p /run/systemd/journal; \
         : > /run/systemd/journal/socket; mount --bind '{}' /run/systemd/journal/socket; \
         {env} exec \"$0\" \"$@\"",
        sock.display()
    );
    [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The default policy with `/usr/bin/echo` refused (a deny rule before the others).
fn echo_denied_policy() -> String {
    let deny = r#"
[[exec]]
why = "test: echo is refused"
programs = ["/usr/bin/echo"]
approval = "deny"
"#;
    let text = default_policy_text();
    let at = text.find("\n[[exec]]\n").map_or(text.len(), |i| i + 1);
    format!("{}{deny}\n{}", &text[..at], &text[at..])
}

/// `POST /v1/tools/exec` through the gateway; the HTTP status.
fn exec_via_gateway(svc: &Service, argv: &[&str]) -> u16 {
    let tok = svc.token("client");
    let body = serde_json::json!({ "argv": argv }).to_string();
    http_bearer(svc.addr, "POST", "/v1/tools/exec", &tok, Some(&body)).status
}

#[test]
fn connected_to_the_journal_records_carry_child_and_decision_fields() {
    if !privileged() {
        return;
    }
    let journal = FakeJournal::new();
    let mut svc = Service::start_opts(StartOpts {
        policy: Some(echo_denied_policy()),
        journal_stream: true,
        wrapper: journal_namespace(&journal.path, ""),
        ..StartOpts::default()
    });
    svc.gateway_running(None, Duration::from_secs(20));
    let r = journal.wait_for(
        &[("CHILD", "gateway"), ("MESSAGE", "started")],
        Duration::from_secs(10),
    );
    assert_eq!(r.get("PRIORITY").map(String::as_str), Some("6"), "{r:?}");
    assert_eq!(
        r.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("carapace"),
        "{r:?}"
    );
    assert_eq!(
        r.get("PROFILE").map(String::as_str),
        Some("gateway"),
        "{r:?}"
    );
    assert!(
        r.contains_key("PID") && r.contains_key("CODE_LINE"),
        "{r:?}"
    );

    assert_eq!(exec_via_gateway(&svc, &["/usr/bin/echo", "nope"]), 403);
    let r = journal.wait_for(
        &[("DECISION", "deny"), ("OP", "exec")],
        Duration::from_secs(10),
    );
    assert_eq!(r.get("PRIORITY").map(String::as_str), Some("4"), "{r:?}");
    assert_eq!(
        r.get("FIELD_TARGET").map(String::as_str),
        Some("/usr/bin/echo nope"),
        "{r:?}"
    );
    assert!(
        r.get("TARGET")
            .is_some_and(|t| t.starts_with("carapace_broker")),
        "{r:?}"
    );

    // The records went to the journal, not (also) to stderr.
    let log = svc.log_text();
    assert!(!log.contains("started child=gateway"), "{log}");
    let st = svc.stop();
    assert!(st.success(), "{st}");
}

#[test]
fn an_inherited_journal_stream_that_is_not_stderr_sends_nothing() {
    if !privileged() {
        return;
    }
    let journal = FakeJournal::new();
    // What a process started by a journal-connected one inherits: a JOURNAL_STREAM naming
    // another file than its own stderr (here the journal socket's own inode).
    let other = {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(&journal.path).unwrap_or_else(|e| panic!("{e}"));
        format!("JOURNAL_STREAM={}:{}", m.dev(), m.ino())
    };
    let mut svc = Service::start_opts(StartOpts {
        policy: Some(echo_denied_policy()),
        wrapper: journal_namespace(&journal.path, &other),
        ..StartOpts::default()
    });
    svc.gateway_running(None, Duration::from_secs(20));
    assert_eq!(exec_via_gateway(&svc, &["/usr/bin/echo", "nope"]), 403);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !svc.log_text().contains("decision=deny") {
        assert!(Instant::now() < deadline, "{}", svc.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(journal.datagrams().is_empty(), "{:#?}", journal.records());
    // auto is text then: timestamped lines with the fields, on stderr.
    let log = svc.log_text();
    assert!(log.contains("INFO started child=gateway"), "{log}");
    assert!(log.contains("decision=deny op=exec"), "{log}");
    let st = svc.stop();
    assert!(st.success(), "{st}");
}
