//! Unit tests of `logging`.

use super::*;
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
