use super::*;

use carapace_broker::server::Outcome;
use std::time::Duration;

/// Tell `m` of an answered request as the broker's server would.
fn done(m: &Metrics, op: &'static str, outcome: Outcome, elapsed: Duration) {
    m.request_done(Answered {
        op,
        outcome,
        denied: outcome == Outcome::Deny,
        elapsed,
    });
}

use std::io::{Read as _, Write as _};
use std::sync::Arc;

/// `name{labels}` -> value, for every sample line of an exposition.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn value(text: &str, series: &str) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
}

#[test]
fn every_family_is_described_and_build_info_is_set() {
    let m = Metrics::new("9.9.9");
    // A family without a series is left out of the text.
    let text = m.encode(&Snapshot::default()).unwrap();
    assert!(!text.contains("carapace_spawns"), "{text}");
    m.child_started("gateway");
    m.child_restarted("gateway");
    done(&m, "open", Outcome::Deny, Duration::from_micros(1));
    let text = m
        .encode(&Snapshot {
            children: vec![("gateway".into(), true)],
            ..Snapshot::default()
        })
        .unwrap();
    for (name, kind) in [
        ("carapace_spawns_total", "counter"),
        ("carapace_child_restarts_total", "counter"),
        ("carapace_broker_requests_total", "counter"),
        ("carapace_denials_total", "counter"),
        ("carapace_broker_request_duration_seconds", "histogram"),
        ("carapace_approvals_pending", "gauge"),
        ("carapace_held_messages", "gauge"),
        ("carapace_dead_letters", "gauge"),
        ("carapace_children_up", "gauge"),
        ("carapace_build_info", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} missing:\n{text}"
        );
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
    }
    assert_eq!(
        value(&text, "carapace_build_info{version=\"9.9.9\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "carapace_approvals_pending"), Some(0.0));
    // Prometheus' text format: no OpenMetrics end marker, nothing it cannot read.
    assert!(!text.contains("# EOF"), "{text}");
    assert!(text.ends_with('\n'), "{text}");
    assert!(!text.contains("# UNIT"), "{text}");
    assert!(!text.contains(" info\n"), "{text}");
}

#[test]
fn openmetrics_counters_are_renamed_for_the_text_format() {
    let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"y z\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
    assert_eq!(
        to_prometheus_text(om),
        "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"y z\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
    );
}

#[test]
fn a_denial_counts_for_its_op_and_nowhere_else() {
    let m = Metrics::new("1");
    done(&m, "open", Outcome::Deny, Duration::from_micros(50));
    done(&m, "open", Outcome::Deny, Duration::from_micros(50));
    done(&m, "connect", Outcome::Allow, Duration::from_millis(3));
    // An ask the operator refused: an ask, and a denial.
    m.request_done(Answered {
        op: "exec",
        outcome: Outcome::Ask,
        denied: true,
        elapsed: Duration::from_secs(120),
    });
    let text = m.encode(&Snapshot::default()).unwrap();
    assert_eq!(
        value(&text, "carapace_denials_total{op=\"open\"}"),
        Some(2.0)
    );
    assert_eq!(value(&text, "carapace_denials_total{op=\"connect\"}"), None);
    assert_eq!(
        value(&text, "carapace_denials_total{op=\"exec\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "carapace_broker_requests_total{op=\"open\",decision=\"deny\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            "carapace_broker_requests_total{op=\"connect\",decision=\"allow\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "carapace_broker_requests_total{op=\"exec\",decision=\"ask\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn the_histogram_observes_into_its_buckets() {
    let m = Metrics::new("1");
    done(&m, "connect", Outcome::Allow, Duration::from_millis(3));
    done(&m, "connect", Outcome::Error, Duration::from_secs(10));
    let text = m.encode(&Snapshot::default()).unwrap();
    let h = "carapace_broker_request_duration_seconds";
    assert_eq!(
        value(&text, &format!("{h}_count{{op=\"connect\"}}")),
        Some(2.0)
    );
    let sum = value(&text, &format!("{h}_sum{{op=\"connect\"}}")).unwrap();
    assert!((sum - 10.003).abs() < 1e-6, "{sum}");
    // 3 ms: not in the 2.5 ms bucket, in the 5 ms one; 10 s only in +Inf.
    assert_eq!(
        value(
            &text,
            &format!("{h}_bucket{{le=\"0.0025\",op=\"connect\"}}")
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("{h}_bucket{{le=\"0.005\",op=\"connect\"}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("{h}_bucket{{le=\"5.0\",op=\"connect\"}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("{h}_bucket{{le=\"+Inf\",op=\"connect\"}}")),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("{h}_bucket{{le=\"0.0001\",op=\"connect\"}}")
        ),
        Some(0.0)
    );
}

#[test]
fn spawns_restarts_and_the_state_read_at_scrape_time() {
    let m = Metrics::new("1");
    m.child_started("gateway");
    m.child_started("gateway");
    m.child_restarted("gateway");
    m.tool_started("tool");
    let text = m
        .encode(&Snapshot {
            approvals_pending: 2,
            held_messages: 3,
            dead_letters: 4,
            children: vec![("gateway".into(), true), ("tg".into(), false)],
        })
        .unwrap();
    assert_eq!(
        value(
            &text,
            "carapace_spawns_total{child=\"gateway\",kind=\"service\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "carapace_spawns_total{child=\"tool\",kind=\"tool\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "carapace_child_restarts_total{child=\"gateway\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "carapace_approvals_pending"), Some(2.0));
    assert_eq!(value(&text, "carapace_held_messages"), Some(3.0));
    assert_eq!(value(&text, "carapace_dead_letters"), Some(4.0));
    assert_eq!(
        value(&text, "carapace_children_up{child=\"gateway\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "carapace_children_up{child=\"tg\"}"),
        Some(0.0)
    );
    // A child no longer configured leaves the family.
    let text = m.encode(&Snapshot::default()).unwrap();
    assert_eq!(value(&text, "carapace_children_up{child=\"tg\"}"), None);
    assert_eq!(value(&text, "carapace_approvals_pending"), Some(0.0));
}

/// One raw HTTP exchange with the listener; the whole answer as text.
fn http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_http_listener_serves_get_metrics_only() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let m = Arc::new(Metrics::new("1"));
    done(&m, "ping", Outcome::Allow, Duration::from_micros(10));
    let m2 = m.clone();
    let task = {
        let _g = rt.enter();
        http::serve(
            l,
            Arc::new(move || m2.encode(&Snapshot::default()).map_err(|e| e.to_string())),
        )
        .unwrap()
    };
    let ok = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains(&format!(
            "content-type: {}",
            CONTENT_TYPE.to_ascii_lowercase()
        )),
        "{ok}"
    );
    assert!(
        ok.contains("carapace_broker_requests_total{op=\"ping\",decision=\"allow\"} 1"),
        "{ok}"
    );
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /metrics/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        let r = http(addr, bad);
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        assert!(!r.contains("carapace_"), "{r}");
    }
    // A head over the limit is refused, not buffered.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 4 * http::MAX_HEAD));
    huge.extend(b"\r\n\r\n");
    let r = http(addr, &huge);
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    // A client that never finishes its head is cut off after the head timeout.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    let t = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    assert!(
        t.elapsed() < http::HEAD_TIMEOUT + Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert!(!String::from_utf8_lossy(&sink).contains("200"));
    task.abort();
}
