//! The service's metrics, for Prometheus: one [`Metrics`] registry owned by the service, fed by
//! the children's threads (starts, restarts), the broker's tool spawner and the broker's server
//! (through [`carapace_broker::server::Observer`]: every answered request, its outcome and its
//! latency), and read at scrape time for what is a state rather than an event (approvals
//! waiting, held messages, dead letters, which children are up).
//!
//! Exposed twice, with the same text: the control socket's `metrics` request (`carapace
//! metrics`) and, when `[metrics] listen` is set, an HTTP listener serving `GET /metrics`
//! ([`http`]). The text is Prometheus' text format 0.0.4, which every consumer reads (Prometheus,
//! node_exporter's textfile collector, `promtool`, people): `prometheus-client` encodes
//! OpenMetrics, and [`to_prometheus_text`] makes the two differences right (a counter's
//! family is named with its `_total`; no `# EOF`). No metric uses a type or unit only
//! OpenMetrics has (`info`, `# UNIT`).
//!
//! **Labels are bounded.** Every label value comes from a closed set: `op` is the name of a
//! broker op (a fixed table in the broker protocol), `decision` one of four words, `kind` one of
//! two, `child` the name of a configured child (the gateway, a channel: from the operator's
//! configuration) or, for tools, the policy profile they run under (from the policy), and
//! `version` this binary's version. No argv, path, host, sender, recipient or identity number
//! is ever a label: a confined child cannot make the series grow.

pub mod http;

use std::fmt;
use std::sync::Mutex;

use carapace_broker::server::{Answered, Observer};
use carapace_broker::sync::lock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The request-latency buckets, in seconds: from 100 µs (a ping, a denial) to 5 s (a slow
/// connect, an approval answered at once); longer lands in `+Inf`.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The content type of the exposition (what [`Metrics::encode`] writes).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `child`: a configured child's name, or a tool's profile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChildLabels {
    child: String,
}

/// `child` and whether it is a service child or a tool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpawnLabels {
    child: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// What is read from the service at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub approvals_pending: usize,
    pub held_messages: usize,
    pub dead_letters: usize,
    /// Each configured child and whether it is running now.
    pub children: Vec<(String, bool)>,
}

/// Encoding the exposition failed (a formatter error; not expected with a `String`).
#[derive(Debug, thiserror::Error)]
#[error("encoding the metrics: {0}")]
pub struct MetricsError(#[from] fmt::Error);

/// The service's metrics registry.
pub struct Metrics {
    registry: Registry,
    spawns: Family<SpawnLabels, Counter>,
    restarts: Family<ChildLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    denials: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    approvals_pending: Gauge,
    held_messages: Gauge,
    dead_letters: Gauge,
    children_up: Family<ChildLabels, Gauge>,
    /// One scrape at a time: each sets the state gauges and then reads them.
    scrape: Mutex<()>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every family registered (empty families are still described) and
    /// `carapace_build_info{version}` set to 1.
    pub fn new(version: &'static str) -> Metrics {
        let mut registry = Registry::with_prefix("carapace");
        let m = Metrics {
            spawns: Family::default(),
            restarts: Family::default(),
            requests: Family::default(),
            denials: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            approvals_pending: Gauge::default(),
            held_messages: Gauge::default(),
            dead_letters: Gauge::default(),
            children_up: Family::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "spawns",
            "Confined processes started: the service's children (kind=service) and the broker's tools (kind=tool; child is the tool's profile)",
            m.spawns.clone(),
        );
        registry.register(
            "child_restarts",
            "Restarts of a configured child after it ended or failed to start",
            m.restarts.clone(),
        );
        registry.register(
            "broker_requests",
            "Broker requests answered, by op and decision (allow, deny: by the policy, ask: an operator was asked, error: any other failure)",
            m.requests.clone(),
        );
        registry.register(
            "denials",
            "Broker requests answered denied (by the policy or by the operator), by op",
            m.denials.clone(),
        );
        registry.register(
            "broker_request_duration_seconds",
            "Time from a broker request's arrival to its reply, by op (an ask includes the wait for the operator)",
            m.latency.clone(),
        );
        registry.register(
            "approvals_pending",
            "Approvals waiting for the operator",
            m.approvals_pending.clone(),
        );
        registry.register(
            "held_messages",
            "Inbound messages held from senders a channel does not admit",
            m.held_messages.clone(),
        );
        registry.register(
            "dead_letters",
            "Outbound messages in the dead-letter queue",
            m.dead_letters.clone(),
        );
        registry.register(
            "children_up",
            "1 when a configured child is running, else 0",
            m.children_up.clone(),
        );
        let build_info: Family<VersionLabels, Gauge> = Family::default();
        build_info.get_or_create(&VersionLabels { version }).set(1);
        registry.register(
            "build_info",
            "Always 1; the version of the running carapace",
            build_info,
        );
        Metrics { registry, ..m }
    }

    /// A configured child was started (`child` is its configured name).
    pub fn child_started(&self, child: &str) {
        self.spawns
            .get_or_create(&SpawnLabels {
                child: child.to_string(),
                kind: "service",
            })
            .inc();
    }

    /// A configured child is being restarted.
    pub fn child_restarted(&self, child: &str) {
        self.restarts
            .get_or_create(&ChildLabels {
                child: child.to_string(),
            })
            .inc();
    }

    /// The broker started a tool under `profile`.
    pub fn tool_started(&self, profile: &str) {
        self.spawns
            .get_or_create(&SpawnLabels {
                child: profile.to_string(),
                kind: "tool",
            })
            .inc();
    }

    /// The exposition, with the state gauges set from `now`.
    pub fn encode(&self, now: &Snapshot) -> Result<String, MetricsError> {
        let _one = lock(&self.scrape);
        let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.approvals_pending.set(as_gauge(now.approvals_pending));
        self.held_messages.set(as_gauge(now.held_messages));
        self.dead_letters.set(as_gauge(now.dead_letters));
        // Only the children configured now: one removed by a reload leaves the family.
        self.children_up.clear();
        for (child, up) in &now.children {
            self.children_up
                .get_or_create(&ChildLabels {
                    child: child.clone(),
                })
                .set(i64::from(*up));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(to_prometheus_text(&text))
    }
}

/// OpenMetrics text as Prometheus' text format 0.0.4: the `# HELP` and `# TYPE` lines of a
/// counter family name it as its samples are named (`x_total`, where OpenMetrics says `x`), and
/// the `# EOF` line goes. Everything else (gauges, histograms, label escaping) is the same in
/// both.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Observer for Metrics {
    fn request_done(&self, a: Answered) {
        let op = a.op;
        self.requests
            .get_or_create(&RequestLabels {
                op,
                decision: a.outcome.as_str(),
            })
            .inc();
        if a.denied {
            self.denials.get_or_create(&OpLabels { op }).inc();
        }
        self.latency
            .get_or_create(&OpLabels { op })
            .observe(a.elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
