//! Unit tests of `logging`.

use super::*;
use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The lines written for the events `emit` sends, in `format`, at `level` and above.
fn lines(format: LogFormat, level: Level, emit: impl FnOnce()) -> Vec<String> {
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(move || w.clone())
        .with_ansi(false)
        .event_format(EventFormat::new(format))
        .finish();
    tracing::subscriber::with_default(sub, emit);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

fn sample() {
    tracing::info!(child = "gateway", pid = 42, "started");
    tracing::warn!(reason = "exit 1\nforged line", "child died");
    tracing::error!("broken\npolicy");
    tracing::debug!("quiet");
}

#[test]
fn text_has_timestamp_level_message_fields() {
    let l = lines(LogFormat::Text, Level::INFO, sample);
    assert_eq!(l.len(), 3, "{l:?}");
    // 2026-11-21T14:30:16.123456Z  INFO started child=gateway pid=42
    let (ts, rest) = l[0].split_once(' ').unwrap();
    assert_eq!(ts.len(), 27, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    assert_eq!(rest, " INFO started child=gateway pid=42");
    assert!(
        l[1].ends_with(" WARN child died reason=\"exit 1\\nforged line\""),
        "{}",
        l[1]
    );
    assert!(l[2].ends_with("ERROR broken\\npolicy"), "{}", l[2]);
}

#[test]
fn journal_has_priority_prefix_and_no_timestamp() {
    let l = lines(LogFormat::Journal, Level::DEBUG, sample);
    assert_eq!(
        l,
        vec![
            "<6>started child=gateway pid=42",
            "<4>child died reason=\"exit 1\\nforged line\"",
            "<3>broken\\npolicy",
            "<7>quiet",
        ]
    );
}

#[test]
fn json_is_one_object_per_line() {
    let l = lines(LogFormat::Json, Level::INFO, || {
        sample();
        tracing::info!(level = 5, message2 = true, "clash");
    });
    assert_eq!(l.len(), 4, "{l:?}");
    assert!(l[0].starts_with("{\"ts\":\""), "{}", l[0]);
    assert!(
        l[0].ends_with(
            "\"level\":\"INFO\",\"target\":\"carapace_supervisor::service::logging::tests\",\"message\":\"started\",\"child\":\"gateway\",\"pid\":42}"
        ),
        "fixed keys first, then the fields in order: {}",
        l[0]
    );
    let v: Vec<serde_json::Value> = l.iter().map(|s| serde_json::from_str(s).unwrap()).collect();
    assert_eq!(v[0]["level"], "INFO");
    assert_eq!(v[0]["message"], "started");
    assert_eq!(v[0]["child"], "gateway");
    assert_eq!(v[0]["pid"], 42);
    assert!(v[0]["target"].as_str().unwrap().contains("logging"));
    assert!(v[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v[1]["reason"], "exit 1\nforged line");
    assert_eq!(v[2]["level"], "ERROR");
    assert_eq!(v[3]["level"], "INFO");
    assert_eq!(v[3]["field.level"], 5);
    assert_eq!(v[3]["message2"], true);
}

#[test]
fn error_fields_carry_their_causes() {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("cannot start the gateway")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let e = Outer(io::Error::from_raw_os_error(libc::EPERM));
    let l = lines(LogFormat::Journal, Level::INFO, || {
        tracing::error!(error = &e as &(dyn std::error::Error + 'static), "failed");
    });
    assert_eq!(
        l,
        vec!["<3>failed error=\"cannot start the gateway: Operation not permitted (os error 1)\""]
    );
}

#[test]
fn spans_prefix_the_message() {
    let l = lines(LogFormat::Journal, Level::INFO, || {
        let s = tracing::info_span!("reload");
        let _g = s.enter();
        tracing::info!("applied");
    });
    assert_eq!(l, vec!["<6>reload: applied"]);
}

#[test]
fn format_names_and_auto() {
    for f in ["auto", "text", "journal", "json"] {
        assert_eq!(f.parse::<LogFormat>().unwrap().to_string(), f);
    }
    assert!("JSON".parse::<LogFormat>().is_err());
    assert!("syslog".parse::<LogFormat>().is_err());
    assert_eq!(LogFormat::Auto.resolve_with(true), LogFormat::Journal);
    assert_eq!(LogFormat::Auto.resolve_with(false), LogFormat::Text);
    assert_eq!(LogFormat::Json.resolve_with(true), LogFormat::Json);
    assert_eq!(syslog_priority(&Level::ERROR), 3);
    assert_eq!(syslog_priority(&Level::TRACE), 7);
}

// ------------------------------------------------------------------------------------------
// The native journal protocol

use journal::{field_name, put_field, stream_matches, JournalSocket};
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The fields of one native record, decoding both forms (`K=v\n` and `K\n<len>v\n`).
fn parse_record(mut b: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while !b.is_empty() {
        let end = b.iter().position(|&c| c == b'\n' || c == b'=').unwrap();
        let name = String::from_utf8(b[..end].to_vec()).unwrap();
        let value;
        if b[end] == b'=' {
            let nl = end + b[end..].iter().position(|&c| c == b'\n').unwrap();
            value = b[end + 1..nl].to_vec();
            b = &b[nl + 1..];
        } else {
            let len = u64::from_le_bytes(b[end + 1..end + 9].try_into().unwrap()) as usize;
            value = b[end + 9..end + 9 + len].to_vec();
            assert_eq!(b[end + 9 + len], b'\n', "binary value ends with a newline");
            b = &b[end + 10 + len..];
        }
        out.entry(name)
            .or_default()
            .push(String::from_utf8(value).unwrap());
    }
    out
}

/// A bound datagram socket standing in for journald, and a [`JournalSocket`] aimed at it.
fn fake_journal() -> (tempfile::TempDir, UnixDatagram, JournalSocket) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let server = UnixDatagram::bind(&path).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sock = JournalSocket::open(&path).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        server.recv(&mut buf).unwrap(),
        0,
        "the probe is an empty datagram"
    );
    (dir, server, sock)
}

fn one(r: &BTreeMap<String, Vec<String>>, k: &str) -> String {
    match r.get(k).map(Vec::as_slice) {
        Some([v]) => v.clone(),
        other => panic!("{k}: {other:?} in {r:?}"),
    }
}

#[test]
fn field_names_are_journal_names() {
    assert_eq!(field_name("child"), "CHILD");
    assert_eq!(field_name("after_ms"), "AFTER_MS");
    assert_eq!(field_name("http.status"), "HTTP_STATUS");
    assert_eq!(field_name("r#type"), "R_TYPE");
    assert_eq!(field_name("_hidden"), "HIDDEN");
    assert_eq!(field_name("__pid"), "PID");
    assert_eq!(field_name("größe"), "GR__E");
    assert_eq!(field_name("2nd"), "FIELD_2ND");
    assert_eq!(field_name("_"), "FIELD");
    // What the writer sets, and the protocol's own, cannot be overridden by a field.
    for (f, j) in [
        ("message", "FIELD_MESSAGE"),
        ("priority", "FIELD_PRIORITY"),
        ("target", "FIELD_TARGET"),
        ("syslog_identifier", "FIELD_SYSLOG_IDENTIFIER"),
        ("code_line", "FIELD_CODE_LINE"),
        ("message_id", "FIELD_MESSAGE_ID"),
    ] {
        assert_eq!(field_name(f), j);
    }
    let long = "x".repeat(100);
    assert_eq!(field_name(&long), "X".repeat(64));
    for n in ["child", "http.status", "_x", "2nd", "a-b c", "target", "é"] {
        let j = field_name(n);
        assert!(
            !j.starts_with('_') && !j.starts_with(|c: char| c.is_ascii_digit()),
            "{j}"
        );
        assert!(
            j.bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'),
            "{j}"
        );
    }
}

#[test]
fn put_field_uses_the_binary_form_for_newlines() {
    let mut b = Vec::new();
    put_field(&mut b, "CHILD", b"gateway");
    assert_eq!(b, b"CHILD=gateway\n");
    let mut b = Vec::new();
    put_field(&mut b, "REASON", b"exit 1\nforged=line");
    let mut want = b"REASON\n".to_vec();
    want.extend_from_slice(&18u64.to_le_bytes());
    want.extend_from_slice(b"exit 1\nforged=line\n");
    assert_eq!(b, want);
    // An `=` in a value needs no escaping: the name ends at the first one.
    let mut b = Vec::new();
    put_field(&mut b, "A", b"b=c");
    assert_eq!(b, b"A=b=c\n");
}

#[test]
fn events_become_native_records_with_their_fields() {
    let (_dir, server, sock) = fake_journal();
    let sub = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with(JournalLayer::new(sock));
    tracing::subscriber::with_default(sub, || {
        sample();
        let s = tracing::info_span!("reload");
        let _g = s.enter();
        tracing::warn!(
            decision = "deny",
            op = "exec",
            target = "/usr/bin/echo",
            "refused"
        );
    });
    let mut records = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..5 {
        let n = server.recv(&mut buf).unwrap();
        records.push(parse_record(&buf[..n]));
    }
    let r = &records[0];
    assert_eq!(one(r, "MESSAGE"), "started");
    assert_eq!(one(r, "PRIORITY"), "6");
    assert_eq!(one(r, "SYSLOG_IDENTIFIER"), "carapace");
    assert_eq!(one(r, "CHILD"), "gateway");
    assert_eq!(one(r, "PID"), "42");
    assert_eq!(
        one(r, "TARGET"),
        "carapace_supervisor::service::logging::tests"
    );
    assert!(one(r, "CODE_FILE").ends_with("logging/tests.rs"), "{r:?}");
    assert!(one(r, "CODE_LINE").parse::<u32>().unwrap() > 0);
    // A value with a newline arrives whole (binary-safe form), not escaped.
    assert_eq!(one(&records[1], "REASON"), "exit 1\nforged line");
    assert_eq!(one(&records[1], "PRIORITY"), "4");
    assert_eq!(one(&records[2], "MESSAGE"), "broken\npolicy");
    assert_eq!(one(&records[2], "PRIORITY"), "3");
    assert_eq!(one(&records[3], "PRIORITY"), "7");
    let r = &records[4];
    assert_eq!(one(r, "MESSAGE"), "reload: refused");
    assert_eq!(one(r, "DECISION"), "deny");
    assert_eq!(one(r, "OP"), "exec");
    assert_eq!(one(r, "FIELD_TARGET"), "/usr/bin/echo");
    assert_eq!(
        one(r, "TARGET"),
        "carapace_supervisor::service::logging::tests"
    );
}

#[test]
fn a_large_record_goes_in_a_sealed_memfd() {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::io::{IoSliceMut, Read as _, Seek as _};
    use std::mem::MaybeUninit;
    let (_dir, server, sock) = fake_journal();
    let mut record = Vec::new();
    put_field(&mut record, "MESSAGE", "x".repeat(300_000).as_bytes());
    // Larger than any datagram the default buffers take: `send` falls back to the memfd.
    sock.send(&record).unwrap();
    let mut data = [0u8; 16];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        &server,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    assert_eq!(msg.bytes, 0, "the datagram itself is empty");
    let fd = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("a descriptor");
    let mut f = std::fs::File::from(fd);
    let seals = rustix::fs::fcntl_get_seals(&f).unwrap();
    assert!(
        seals.contains(rustix::fs::SealFlags::WRITE),
        "sealed against writes"
    );
    // The descriptor shares the sender's file offset (at the end): read from the start.
    f.seek(io::SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert!(
        got == record,
        "{} bytes read, {} sent",
        got.len(),
        record.len()
    );
}

#[test]
fn no_journal_socket_no_native_records() {
    let dir = tempfile::tempdir().unwrap();
    let e = JournalSocket::open(&dir.path().join("socket")).expect_err("nobody listens");
    assert!(e.to_string().contains("socket"), "{e}");
}

#[test]
fn journal_stream_must_name_stderr_itself() {
    let f = tempfile::tempfile().unwrap();
    let st = nix::sys::stat::fstat(&f).unwrap();
    let ours = format!("{}:{}", st.st_dev, st.st_ino);
    assert!(stream_matches(Some(OsStr::new(&ours)), f.as_fd()));
    // The variable inherited from a parent whose stderr was the journal: another inode.
    let other = format!("{}:{}", st.st_dev, st.st_ino + 1);
    assert!(!stream_matches(Some(OsStr::new(&other)), f.as_fd()));
    let other_dev = format!("{}:{}", st.st_dev + 1, st.st_ino);
    assert!(!stream_matches(Some(OsStr::new(&other_dev)), f.as_fd()));
    // A pipe (what a child's stderr is under the supervisor) with the file's value.
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(!stream_matches(Some(OsStr::new(&ours)), r.as_fd()));
    for bad in ["", "12", "a:b", "1:2:3", "-1:5"] {
        assert!(!stream_matches(Some(OsStr::new(bad)), f.as_fd()), "{bad}");
    }
    assert!(!stream_matches(None, f.as_fd()));
}
