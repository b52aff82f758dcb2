//! Broker round-trip benchmark: `ping` (an allowed no-op) from a blocking client over a
//! SOCK_SEQPACKET socketpair to the real `Server` running on a current-thread tokio runtime (one
//! core), and a `connect` to a loopback listener, twice: through a minimal handler (socket passed
//! back with SCM_RIGHTS; no policy: the mechanism), and through the real `Ops` (the profile's
//! `connect` allowlist decides, an audit record is appended and fdatasync'd before connecting).
//! For the latter, the audit append alone is timed too: its fdatasync dominates.
//!
//! Run: `cargo bench -p carapace-broker --bench roundtrip` (env BENCH_N to change iterations;
//! BENCH_AUDIT_DIR for where the audit log of the `Ops` figures goes, default /var/tmp: a disk
//! file system like the state directory's, not a tmpfs where fdatasync costs nothing).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: failures abort it

use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_broker::audit::{AuditDecision, AuditLog, AuditRecord, Who};
use carapace_broker::client::Client;
use carapace_broker::dlq::DeadLetters;
use carapace_broker::ops::{Ops, OpsConfig};
use carapace_broker::protocol::{
    decode_server_frame, encode_request, recv_frame, send_frame, seqpacket_pair, ErrorCode,
    OkReply, Request, MAX_FRAME,
};
use carapace_broker::server::{Handler, Identity, PeerLimits, Response, Role, Server};

struct Bench;

impl Handler for Bench {
    fn handle(
        &self,
        _who: &Identity,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            match req {
                Request::Ping {} => Response::ok(OkReply::Ping {}),
                Request::Connect { host, port } => {
                    match TcpStream::connect((host.as_str(), port)) {
                        Ok(s) => {
                            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                            Response::ok(OkReply::Connect { peer }).with_fds(vec![s.into()])
                        }
                        Err(e) => Response::err(ErrorCode::Unavailable, e.to_string()),
                    }
                }
                _ => Response::err(ErrorCode::Denied, "bench"),
            }
        })
    }
}

/// Server on its own thread with a current-thread runtime (= one core for the broker).
fn start_server(peers: usize) -> Vec<OwnedFd> {
    start_server_with(Arc::new(Bench), peers)
}

/// Server with `handler` on its own thread with a current-thread runtime (blocking work such as
/// the audit's fdatasync runs on tokio's blocking threads).
fn start_server_with(handler: Arc<dyn Handler>, peers: usize) -> Vec<OwnedFd> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..peers {
        let (a, b) = seqpacket_pair().unwrap();
        ours.push(a);
        theirs.push(b);
    }
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = Server::new(handler, PeerLimits::default());
        rt.block_on(async move {
            let mut handles = Vec::new();
            for (i, fd) in theirs.into_iter().enumerate() {
                handles.push(server.serve_peer(
                    fd,
                    Identity {
                        id: i as u64 + 1,
                        role: Role::Tool,
                        profile: "bench".into(),
                    },
                ));
            }
            for h in handles {
                let _ = h.await;
            }
        });
    });
    ours
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let mean = total / samples.len() as u32;
    println!(
        "{name}: n={} p50={:.1}us p99={:.1}us p99.9={:.1}us mean={:.1}us max={:.1}us => {:.0}/s sequential",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        percentile(&samples, 0.999).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        samples[samples.len() - 1].as_secs_f64() * 1e6,
        1.0 / mean.as_secs_f64(),
    );
}

fn ping_latency(n: usize) {
    let fd = start_server(1).pop().unwrap();
    let mut client = Client::new(fd);
    for _ in 0..n / 10 {
        client.ping().unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.ping().unwrap();
        samples.push(t.elapsed());
    }
    report("ping round trip (1 client, sequential)", samples);
}

/// Pipelined pings: each client keeps `window` requests in flight; a reader thread per client
/// counts replies. Reports replies per second handled by the one-core broker.
fn ping_throughput(clients: usize, window: usize, per_client: usize) {
    let fds = start_server(clients);
    let start = Instant::now();
    let mut threads = Vec::new();
    for fd in fds {
        threads.push(std::thread::spawn(move || {
            let fd = Arc::new(fd);
            let credits = Arc::new((std::sync::Mutex::new(window), std::sync::Condvar::new()));
            let (rfd, rcred) = (fd.clone(), credits.clone());
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; MAX_FRAME];
                for _ in 0..per_client {
                    let r = recv_frame(rfd.as_fd(), &mut buf, 0).unwrap();
                    let f = decode_server_frame(&buf[..r.len]).unwrap();
                    assert!(
                        matches!(
                            f,
                            carapace_broker::protocol::ServerFrame::Reply {
                                reply: carapace_broker::protocol::Reply::Ok(_),
                                ..
                            }
                        ),
                        "{f:?}"
                    );
                    let (m, c) = &*rcred;
                    *m.lock().unwrap() += 1;
                    c.notify_one();
                }
            });
            for id in 1..=per_client as u64 {
                {
                    let (m, c) = &*credits;
                    let mut g = m.lock().unwrap();
                    while *g == 0 {
                        g = c.wait(g).unwrap();
                    }
                    *g -= 1;
                }
                let bytes = encode_request(id, &Request::Ping {}).unwrap();
                send_frame(fd.as_fd(), &bytes, &[]).unwrap();
            }
            reader.join().unwrap();
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let total = clients * per_client;
    println!(
        "ping throughput ({clients} clients x window {window}): {total} in {secs:.2}s => {:.0}/s",
        total as f64 / secs
    );
}

fn connect_latency(n: usize) {
    let port = sink_listener();
    let fd = start_server(1).pop().unwrap();
    let mut client = Client::new(fd);
    for _ in 0..n / 10 {
        drop(client.connect("127.0.0.1", port).unwrap());
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (sock, _) = client.connect("127.0.0.1", port).unwrap();
        samples.push(t.elapsed());
        drop(sock);
    }
    report("connect loopback round trip (no policy)", samples);
}

/// A loopback listener that accepts and drops connections; its port.
fn sink_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    port
}

/// Where the `Ops` figures keep their audit log (a temp dir removed afterwards).
fn audit_dir() -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_AUDIT_DIR").unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("carapace-bench-audit-")
        .tempdir_in(&base)
        .unwrap()
}

/// `connect` through the real operations: policy allowlist, audit record (fdatasync), connect,
/// socket returned. Then the audit append alone, on a log in the same directory.
fn ops_connect_latency(n: usize) {
    let port = sink_listener();
    let dir = audit_dir();
    let text = format!(
        r#"version = 1
[profiles.bench]
why = "broker bench"
[profiles.bench.broker]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "the bench's loopback listener" }} ]
"#
    );
    let policy = carapace_policy::Policy::parse(&text, "bench.toml").unwrap();
    let audit = AuditLog::open(dir.path().join("audit.log")).unwrap();
    let dlq = DeadLetters::open(dir.path().join("dlq")).unwrap();
    let ops = Ops::new(policy, audit, dlq, None, None, OpsConfig::default()).unwrap();
    let fd = start_server_with(Arc::new(ops), 1).pop().unwrap();
    let mut client = Client::new(fd);
    let warm = (n / 10).max(1);
    for _ in 0..warm {
        drop(client.connect("127.0.0.1", port).unwrap());
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (sock, _) = client.connect("127.0.0.1", port).unwrap();
        samples.push(t.elapsed());
        drop(sock);
    }
    // Every one of them was decided by the rule and recorded.
    let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let allowed = log
        .lines()
        .filter(|l| l.contains(r#""op":"connect""#) && l.contains(r#""decision":"allow""#))
        .count();
    assert_eq!(allowed, warm + n, "audit records of the allowed connects");
    report(
        &format!(
            "connect loopback round trip (policy + audit fdatasync in {})",
            dir.path().display()
        ),
        samples,
    );

    // The audit append alone (same record shape, same directory).
    let mut log = AuditLog::open(dir.path().join("append-only.log")).unwrap();
    let rec = AuditRecord {
        who: Who {
            id: 1,
            role: "tool".into(),
            profile: "bench".into(),
        },
        op: "connect".into(),
        target: format!("127.0.0.1:{port}"),
        rule: None,
        decision: AuditDecision::Allow,
        outcome: "connecting".into(),
        detail: String::new(),
    };
    for _ in 0..warm {
        log.append(&rec).unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        log.append(&rec).unwrap();
        samples.push(t.elapsed());
    }
    report("audit append alone (write + fdatasync)", samples);
}

/// Cost of the pure codec per request: decode a request, encode its reply.
fn codec(n: usize) {
    use carapace_broker::protocol::{decode_request, encode_reply, Reply};
    let reqs = [
        ("ping", encode_request(1, &Request::Ping {}).unwrap()),
        (
            "connect",
            encode_request(
                2,
                &Request::Connect {
                    host: "api.example.com".into(),
                    port: 443,
                },
            )
            .unwrap(),
        ),
        (
            "exec",
            encode_request(
                3,
                &Request::Exec {
                    argv: vec!["git".into(), "status".into(), "--short".into()],
                    cwd: Some("/work".into()),
                    owner: None,
                    workspace: None,
                },
            )
            .unwrap(),
        ),
    ];
    for (name, bytes) in &reqs {
        let t = Instant::now();
        for _ in 0..n {
            let f = decode_request(std::hint::black_box(bytes)).unwrap();
            let out = encode_reply(f.id, &Reply::Ok(OkReply::Ping {})).unwrap();
            std::hint::black_box(out);
        }
        let per = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "codec {name}: decode request + encode reply = {:.2}us",
            per * 1e6
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a tiny smoke then.
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 200_000 } else { 200 });
    codec(n);
    ping_latency(n);
    ping_throughput(1, 16, n);
    ping_throughput(4, 16, n / 4);
    connect_latency((n / 20).max(50));
    ops_connect_latency((n / 100).max(50));
}
