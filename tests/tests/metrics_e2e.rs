//! The service's metrics end to end: `carapace run` (the harness of service_e2e.rs,
//! `carapace_tests::service`) with `[metrics] listen` on a free loopback port; an allowed, a
//! denied and an asked (then refused) tool request through the gateway and a restart of the
//! gateway move the counters, which
//! are read both ways (`carapace metrics` over the control socket and `GET /metrics`) and
//! parsed as Prometheus' text format.
//!
//! The service test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_tests::*;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse Prometheus' text format (0.0.4), strictly enough to catch what a scraper would
/// refuse: every sample belongs to a family with a `# TYPE` line before it, names and label
/// names are valid, label values are quoted with the format's escapes, values are numbers.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at("unknown type"));
            }
            if !valid_name(name) || types.insert(name.into(), kind.into()).is_some() {
                return Err(at("bad or repeated TYPE"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let mut body = rest.strip_suffix('}').ok_or_else(|| at("labels"))?;
                let mut labels = BTreeMap::new();
                while !body.is_empty() {
                    let (k, rest) = body.split_once("=\"").ok_or_else(|| at("label"))?;
                    if !valid_name(k) {
                        return Err(at("label name"));
                    }
                    let mut v = String::new();
                    let mut chars = rest.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((i, '"')) => break i,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => v.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => v.push(c),
                                _ => return Err(at("escape")),
                            },
                            Some((_, c)) => v.push(c),
                            None => return Err(at("unterminated label value")),
                        }
                    };
                    labels.insert(k.to_string(), v);
                    body = &rest[end + 1..];
                    body = body.strip_prefix(',').unwrap_or(body);
                }
                (name, labels)
            }
        };
        if !valid_name(name) {
            return Err(at("metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let f = name.strip_suffix(s)?;
                (types.get(f).map(String::as_str) == Some("histogram")).then_some(f)
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at("sample without a TYPE line"));
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the sample `name` whose labels include `labels`; summed when several match.
fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let m: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!m.is_empty()).then(|| m.iter().sum())
}

#[test]
fn the_parser_refuses_what_a_scraper_would() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{op=\"o\\\"p\"} 2\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    let s = parse_exposition(good).unwrap();
    assert_eq!(get(&s, "a_total", &[("op", "o\"p")]), Some(2.0));
    assert_eq!(get(&s, "h_count", &[]), Some(1.0));
    for bad in [
        "a 1\n",
        "# TYPE a info\na 1\n",
        "# TYPE a gauge\na{x=\"1} 1\n",
        "# TYPE a gauge\na one\n",
        "# TYPE a gauge\n# TYPE a gauge\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
}

/// `GET path` on the metrics listener.
fn scrape(addr: SocketAddr, path: &str) -> HttpResponse {
    http_with(addr, "GET", path, &[], None)
}

#[test]
fn metrics_move_and_are_read_over_the_control_socket_and_http() {
    if !privileged() {
        return;
    }
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let deny = "[[exec]]\nwhy = \"test: id is refused\"\nprograms = [\"/usr/bin/id\"]\napproval = \"deny\"\n";
    let svc = Service::start_with_policy(
        &insert_before_first_exec(&policy_text(""), deny),
        &format!("[metrics]\nlisten = \"{maddr}\"\n"),
    );
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let tok = svc.token("client");
    let exec = |argv: &[&str]| {
        let body = serde_json::json!({ "argv": argv }).to_string();
        http_bearer(svc.addr, "POST", "/v1/tools/exec", &tok, Some(&body))
    };
    let r = exec(&["/usr/bin/echo", "hi"]);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = exec(&["/usr/bin/id"]);
    assert_eq!(r.status, 403, "{}", r.body);
    // An ask (`/usr/bin/uname` matches no rule of the default policy): waiting, it is a pending
    // approval in the metrics; refused, it counts as an ask and a denial.
    let (addr, t) = (svc.addr, tok.clone());
    let asked = std::thread::spawn(move || {
        let body = serde_json::json!({ "argv": ["/usr/bin/uname"] }).to_string();
        http_bearer(addr, "POST", "/v1/tools/exec", &t, Some(&body))
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let o = svc.ctl(&["approvals", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let Some(id) = v["pending"][0]["id"].as_u64() {
            break id;
        }
        assert!(Instant::now() < deadline, "no pending approval");
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = scrape(maddr, "/metrics");
    let s = parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
    assert_eq!(
        get(&s, "carapace_approvals_pending", &[]),
        Some(1.0),
        "{}",
        r.body
    );
    let o = svc.ctl(&["approvals", "deny", &id.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = asked.join().unwrap_or_else(|_| panic!("exec thread"));
    assert_eq!(r.status, 403, "{}", r.body);
    // A restart: kill the gateway's program, wait for the new one.
    let prog = program_of(init);
    // SAFETY: killing the confined program this test's supervisor started.
    unsafe { libc::kill(prog as i32, libc::SIGKILL) };
    svc.gateway_running(Some(init), Duration::from_secs(20));

    let by_ctl = || {
        let o = svc.ctl(&["metrics"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let by_http = || {
        let r = scrape(maddr, "/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
    };
    // children_up follows the restart once the status says running; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&by_ctl(), "carapace_children_up", &[("child", "gateway")]) != Some(1.0) {
        assert!(Instant::now() < deadline, "gateway never up in the metrics");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (how, s) in [("control socket", by_ctl()), ("http", by_http())] {
        let at_least = |name: &str, labels: &[(&str, &str)], n: f64| {
            let v = get(&s, name, labels).unwrap_or(0.0);
            assert!(
                v >= n,
                "{how}: {name}{labels:?} = {v}, expected >= {n}\n{s:#?}"
            );
        };
        at_least(
            "carapace_broker_requests_total",
            &[("op", "exec"), ("decision", "allow")],
            1.0,
        );
        at_least(
            "carapace_broker_requests_total",
            &[("op", "exec"), ("decision", "deny")],
            1.0,
        );
        at_least(
            "carapace_broker_requests_total",
            &[("op", "exec"), ("decision", "ask")],
            1.0,
        );
        at_least("carapace_denials_total", &[("op", "exec")], 2.0);
        at_least(
            "carapace_broker_request_duration_seconds_count",
            &[("op", "exec")],
            3.0,
        );
        at_least(
            "carapace_broker_request_duration_seconds_bucket",
            &[("op", "exec"), ("le", "+Inf")],
            3.0,
        );
        at_least(
            "carapace_spawns_total",
            &[("child", "gateway"), ("kind", "service")],
            2.0,
        );
        at_least("carapace_spawns_total", &[("kind", "tool")], 1.0);
        at_least(
            "carapace_child_restarts_total",
            &[("child", "gateway")],
            1.0,
        );
        assert_eq!(
            get(&s, "carapace_children_up", &[("child", "gateway")]),
            Some(1.0),
            "{how}"
        );
        assert_eq!(
            get(&s, "carapace_approvals_pending", &[]),
            Some(0.0),
            "{how}"
        );
        assert_eq!(get(&s, "carapace_held_messages", &[]), Some(0.0), "{how}");
        assert_eq!(get(&s, "carapace_dead_letters", &[]), Some(0.0), "{how}");
        assert_eq!(get(&s, "carapace_build_info", &[]), Some(1.0), "{how}");
        // No label carries what a child wrote: no argv, no path.
        for sample in &s {
            for v in sample.labels.values() {
                assert!(!v.contains('/'), "{how}: {sample:?}");
            }
        }
    }
    // Only GET /metrics.
    assert_eq!(scrape(maddr, "/").status, 404);
    assert_eq!(scrape(maddr, "/metrics/../x").status, 404);
    assert_eq!(
        http_with(maddr, "POST", "/metrics", &[], Some("x")).status,
        404
    );
}

#[test]
fn a_non_loopback_metrics_address_is_refused() {
    let dir = tempdir("carapace-metrics-cfg-");
    let cfg = dir.path().join("carapace.toml");
    fs::write(&cfg, "[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(carapace_bin())
        .args(["run", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(
        err.contains("carapace.toml:2:10")
            && err.contains("is not a loopback address: the metrics endpoint would be reachable"),
        "{err}"
    );
    // Said on purpose, it is accepted.
    fs::write(
        &cfg,
        "[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_non_loopback = true\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(carapace_bin())
        .args(["run", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
