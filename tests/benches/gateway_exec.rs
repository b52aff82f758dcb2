//! Throughput and latency of the gateway's `tools.exec` through the whole path: a WebSocket
//! JSON-RPC client → `carapace-gateway` (confined child of `carapace run`) → the broker (in the
//! supervisor) → a confined tool, `/usr/bin/true`, in a sandbox of its own → the exit report
//! back to the client. Next to it, at the same concurrency: a bare fork+exec of `/usr/bin/true`
//! (`std::process::Command`, the floor of running any program) and `gateway.ping` over the same
//! kind of connection (the gateway's floor: WebSocket, JSON-RPC, scope check; no broker, no
//! tool).
//!
//! Run (as root; builds the release `carapace` and `carapace-gateway` when they are missing or
//! stale): `cargo bench -p carapace-tests --bench gateway_exec`. Plain `std::time`, no harness.
//!
//! Each concurrency level runs with that many client threads, each with its own WebSocket and
//! its own client token, one call in flight per client (a client sends its next call when the
//! answer to the previous one is in). Per level, in this order: bare, ping, exec; each after a
//! short warm-up (not timed), for a fixed time; a client finishes the call it is in when the
//! time is up. Latency is measured by the client from sending the request to reading the
//! response (for exec: after every `tools.output` event). Every call must succeed (`tools.exec`:
//! a result with `exit` 0); failures are counted, the first ones printed, and the bench exits
//! non-zero if there was any. Before timing, an exec of `cat /proc/self/status` must show the
//! tool confined; after it, the audit log must hold one `exec` record per call made. Beside the
//! latency table it prints the CPU time per call of `carapace run` (with the sandboxes it
//! reaped), of the gateway and of the clients, the machine's busy share, and the tools' own
//! `wall_ms`.
//!
//! The service is started with the limits that would otherwise throttle the bench raised:
//! `[gateway.clients]` `rate_per_second = burst = 100000`, `max_in_flight = 64`, and the gateway
//! profile's broker `rate` at 100000/s (the default policy's is 50/s, burst 100). Everything
//! else is the default policy and configuration (the tool runs under the `tool` profile).
//!
//! Then, on a second service with the default policy and configuration untouched (the gateway's
//! broker budget 50/s burst 100, 20 calls/s burst 40 per token), 16 exec clients each pace
//! themselves at their own per-token rate (a call every 50 ms, or at once when behind) for the
//! exec time: 320 calls/s asked, more than the budget, so calls wait their turn in the
//! gateway's fair queue. It prints calls made, answered, refused (must be 0) and p50/p99
//! latency, and the audit log's exec and auth records.
//!
//! Without `--bench` (`cargo test --benches` or `--all-targets`) it makes a short smoke run
//! instead: 1 and 4 clients, 1 s of exec and 0.3 s of bare and ping each (not root: it fails,
//! unless `CARAPACE_ALLOW_SKIP=1`, as the privileged tests do).
//!
//! Environment:
//! * `BENCH_CLIENTS` — concurrency levels, comma-separated (default `1,16,64`).
//! * `BENCH_EXEC_SECONDS` — timed seconds per exec level (default 20).
//! * `BENCH_FAST_SECONDS` — timed seconds per bare and ping level (default 5).
//! * `CARAPACE_BIN`, `CARAPACE_GATEWAY_BIN` — the binaries (default: release builds in this
//!   bench's target directory, built when needed; see `carapace_tests::carapace_bin`).

use std::fmt::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use carapace_tests::rpc::RpcClient;
use carapace_tests::service::{Service, StartOpts};
use carapace_tests::{carapace_bin, default_policy_text, gateway_bin};
use serde_json::{json, Value};

/// The tool every exec call runs (allowed by the default policy's first `[[exec]]` rule).
const TRUE: &str = "/usr/bin/true";
/// The default policy's broker rate line for the gateway profile, and what replaces it.
const DEFAULT_RATE: &str = "rate = { requests_per_second = 50, burst = 100 }";
const BENCH_RATE: &str = "rate = { requests_per_second = 100000, burst = 100000 }";
/// The default per-token rate (`[gateway.clients] rate_per_second`, gateway/src/settings.rs)
/// and the number of clients of the default-limits variant.
const DEFAULT_CLIENT_RATE: f64 = 20.0;
const FAIR_CLIENTS: usize = 16;
const CLIENTS_CONFIG: &str =
    "[gateway.clients]\nrate_per_second = 100000\nburst = 100000\nmax_in_flight = 64\n";
/// How long one call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Failures kept for the report (all are counted).
const KEEP_FAILURES: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bare,
    Ping,
    Exec,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Bare => "bare fork+exec /usr/bin/true",
            Kind::Ping => "gateway.ping",
            Kind::Exec => "tools.exec /usr/bin/true",
        }
    }

    fn warmup_calls(self) -> usize {
        match self {
            Kind::Bare => 5,
            Kind::Ping => 50,
            Kind::Exec => 3,
        }
    }
}

/// What one level of one kind measured.
#[derive(Debug)]
struct Run {
    kind: Kind,
    clients: usize,
    /// Latency of every successful timed call.
    samples: Vec<Duration>,
    /// Wall time of the timed window: from the start barrier until the last client is done.
    elapsed: Duration,
    failures: usize,
    /// Calls made, warm-up included.
    attempts: usize,
    first_failures: Vec<String>,
    /// `tools.exec` only: the tool's `wall_ms` as the supervisor reported it (spawn to reaped).
    tool_wall_ms: Vec<u64>,
    /// CPU used during the timed window (from the start barrier until every client is done).
    cpu: Cpu,
}

/// CPU seconds (and, for the machine, jiffies busy / total) at one moment, or a difference.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    /// `carapace run`: all its threads, plus every child it reaped (each tool's sandbox, with
    /// the program its init reaped).
    supervisor: f64,
    /// The gateway program (all its threads).
    gateway: f64,
    /// This process (the client threads) and the children it reaped (bare's /usr/bin/true).
    client: f64,
    /// The whole machine, from /proc/stat: jiffies not idle, and all jiffies.
    busy: f64,
    total: f64,
}

impl Cpu {
    fn now(pids: Pids) -> Cpu {
        let (busy, total) = machine_jiffies();
        Cpu {
            supervisor: proc_cpu(pids.supervisor, true),
            gateway: proc_cpu(pids.gateway, false),
            client: self_cpu(),
            busy,
            total,
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            supervisor: self.supervisor - before.supervisor,
            gateway: self.gateway - before.gateway,
            client: self.client - before.client,
            busy: self.busy - before.busy,
            total: self.total - before.total,
        }
    }
}

/// The processes whose CPU time is accounted.
#[derive(Debug, Clone, Copy)]
struct Pids {
    supervisor: i64,
    gateway: i64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of `pid` (and cutime + cstime when `children`), in seconds; 0 when unreadable.
fn proc_cpu(pid: i64, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state (3), ..., utime (14), stime (15), cutime (16),
    // cstime (17).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let mut ticks = get(11) + get(12);
    if children {
        ticks += get(13) + get(14);
    }
    ticks / clock_ticks()
}

/// User + system time of this process and of its reaped children, in seconds.
fn self_cpu() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: all-zero is a valid `struct rusage`.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the local struct.
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            total += tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    total
}

/// The machine's (busy, total) jiffies from the first line of /proc/stat (idle and iowait are
/// not busy).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest counts are inside user)
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

impl Run {
    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// Per-client state a worker thread owns.
enum Client {
    Bare,
    Rpc(Box<RpcClient>),
}

/// One call; its latency, and for exec the tool's reported wall time.
fn one_call(client: &mut Client, kind: Kind) -> Result<(Duration, Option<u64>), (String, bool)> {
    match (client, kind) {
        (Client::Bare, _) => {
            let start = Instant::now();
            let st = Command::new(TRUE)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let d = start.elapsed();
            match st {
                Ok(s) if s.success() => Ok((d, None)),
                Ok(s) => Err((format!("{TRUE}: {s}"), false)),
                Err(e) => Err((format!("cannot start {TRUE}: {e}"), false)),
            }
        }
        (Client::Rpc(c), Kind::Ping) => {
            let start = Instant::now();
            let r = c.try_call("gateway.ping", Value::Null, CALL_TIMEOUT);
            let d = start.elapsed();
            match r {
                Ok(o) => match &o.result {
                    Ok(v) if v["pong"] == true => Ok((d, None)),
                    Ok(v) => Err((format!("gateway.ping: unexpected result {v}"), false)),
                    Err(e) => Err((format!("gateway.ping: {e}"), false)),
                },
                Err(e) => Err((format!("gateway.ping: {e}"), true)),
            }
        }
        (Client::Rpc(c), _) => {
            let start = Instant::now();
            let r = c.try_call("tools.exec", json!({"argv": [TRUE]}), CALL_TIMEOUT);
            let d = start.elapsed();
            match r {
                Ok(o) => match &o.result {
                    Ok(v) if v["exit"] == 0 => Ok((d, v["wall_ms"].as_u64())),
                    Ok(v) => Err((format!("tools.exec {TRUE}: result {v}"), false)),
                    Err(e) => Err((format!("tools.exec {TRUE}: {e}"), false)),
                },
                Err(e) => Err((format!("tools.exec {TRUE}: {e}"), true)),
            }
        }
    }
}

/// Open `n` clients of `kind` (WebSocket clients connect in parallel, client i with token i).
fn open_clients(
    svc: &Service,
    tokens: &[String],
    kind: Kind,
    n: usize,
) -> Vec<Result<Client, String>> {
    if kind == Kind::Bare {
        return (0..n).map(|_| Ok(Client::Bare)).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = tokens[..n]
            .iter()
            .map(|t| {
                s.spawn(move || {
                    RpcClient::connect(svc.addr, Some(t))
                        .map(|c| Client::Rpc(Box::new(c)))
                        .map_err(|e| format!("WebSocket connect: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("connect thread panicked".into()))
            })
            .collect()
    })
}

/// Run one level: `n` clients, warm-up, then `seconds` timed.
fn run_level(
    svc: &Service,
    pids: Pids,
    tokens: &[String],
    kind: Kind,
    n: usize,
    seconds: f64,
    pace: Option<Duration>,
) -> Run {
    let failures = AtomicUsize::new(0);
    let attempts = AtomicUsize::new(0);
    let first: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let fail = |why: String| {
        failures.fetch_add(1, Ordering::Relaxed);
        let mut f = first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() < KEEP_FAILURES {
            f.push(why);
        }
    };
    let clients = open_clients(svc, tokens, kind, n);
    let barrier = Barrier::new(n + 1);
    let window = Duration::from_secs_f64(seconds);
    let mut samples = Vec::new();
    let mut tool_wall_ms = Vec::new();
    let (elapsed, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .map(|c| {
                let (barrier, fail, attempts) = (&barrier, &fail, &attempts);
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let mut walls = Vec::new();
                    let mut client = match c {
                        Ok(c) => Some(c),
                        Err(e) => {
                            fail(e);
                            None
                        }
                    };
                    // Warm-up: connection, gateway task, broker session, sandbox caches.
                    if let Some(c) = client.as_mut() {
                        for _ in 0..kind.warmup_calls() {
                            attempts.fetch_add(1, Ordering::Relaxed);
                            if let Err((why, gone)) = one_call(c, kind) {
                                fail(format!("warm-up: {why}"));
                                if gone {
                                    client = None;
                                    break;
                                }
                            }
                        }
                    }
                    barrier.wait();
                    let deadline = Instant::now() + window;
                    let t0 = Instant::now();
                    let mut k = 0u32;
                    if let Some(c) = client.as_mut() {
                        while Instant::now() < deadline {
                            // Paced: call k is sent no earlier than k periods after the start
                            // (a client behind its schedule sends at once).
                            if let Some(p) = pace {
                                let at = t0 + p * k;
                                if at >= deadline {
                                    break;
                                }
                                if let Some(d) = at.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(d);
                                }
                                k += 1;
                            }
                            attempts.fetch_add(1, Ordering::Relaxed);
                            match one_call(c, kind) {
                                Ok((d, wall)) => {
                                    lat.push(d);
                                    walls.extend(wall);
                                }
                                Err((why, gone)) => {
                                    fail(why);
                                    if gone {
                                        // The connection is closed: every further call
                                        // would fail at once.
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    let end = Instant::now();
                    if let Some(Client::Rpc(mut c)) = client {
                        c.close();
                    }
                    (lat, walls, end)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let cpu_before = Cpu::now(pids);
        let mut done = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => done.push(r),
                Err(_) => fail("client thread panicked".into()),
            }
        }
        // The window ends when the last client's last timed call ended (the close
        // handshakes after it are not part of it).
        let mut end = start;
        for (lat, walls, e) in done {
            samples.extend(lat);
            tool_wall_ms.extend(walls);
            end = end.max(e);
        }
        (end - start, Cpu::now(pids).since(cpu_before))
    });
    let first_failures = first
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Run {
        kind,
        clients: n,
        samples,
        elapsed,
        failures: failures.into_inner(),
        attempts: attempts.into_inner(),
        first_failures,
        tool_wall_ms,
        cpu,
    }
}

/// The default-limits variant on a service of its own (default policy, default configuration):
/// [`FAIR_CLIENTS`] exec clients, each paced at [`DEFAULT_CLIENT_RATE`], for `seconds`.
fn default_limits_run(seconds: f64) -> Run {
    let svc = Service::start_opts(StartOpts::default());
    let tokens: Vec<String> = (0..FAIR_CLIENTS)
        .map(|i| svc.token_named("client", &format!("fair-{i}")))
        .collect();
    let gateway_init = svc.gateway()["pid"].as_i64().unwrap_or(0);
    let pids = Pids {
        supervisor: i64::from(svc.pid()),
        gateway: carapace_tests::service::program_of(gateway_init),
    };
    let pace = Duration::from_secs_f64(1.0 / DEFAULT_CLIENT_RATE);
    let r = run_level(
        &svc,
        pids,
        &tokens,
        Kind::Exec,
        FAIR_CLIENTS,
        seconds,
        Some(pace),
    );
    let execs = std::fs::read_to_string(svc.state_dir().join("audit.log"))
        .map(|a| a.lines().filter(|l| l.contains("\"op\":\"exec\"")).count())
        .unwrap_or(0);
    let auths = std::fs::read_to_string(svc.state_dir().join("audit.log"))
        .map(|a| a.lines().filter(|l| l.contains("\"op\":\"auth\"")).count())
        .unwrap_or(0);
    println!(
        "default limits: audit log {execs} exec records for {} calls made, {auths} token checks",
        r.attempts
    );
    if r.failures > 0 {
        for f in &r.first_failures {
            eprintln!("  refused: {f}");
        }
        eprintln!("supervisor log:\n{}", svc.log_text());
    }
    r
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn env_f64(name: &str, default: f64) -> Result<f64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("{name}={v}: not a positive number")),
    }
}

fn levels(default: &[usize]) -> Result<Vec<usize>, String> {
    let Ok(v) = std::env::var("BENCH_CLIENTS") else {
        return Ok(default.to_vec());
    };
    v.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| format!("BENCH_CLIENTS={v}: want numbers 1..=256, comma-separated"))
        })
        .collect()
}

/// Check, before timing, that an exec through the gateway really runs confined: `cat
/// /proc/self/status` (allowed by the same default rule) must show a seccomp filter, no new
/// privileges and no capabilities.
fn probe_confinement(svc: &Service, token: &str) -> Result<(), String> {
    let mut c = RpcClient::connect(svc.addr, Some(token)).map_err(|e| format!("connect: {e}"))?;
    let o = c
        .try_call(
            "tools.exec",
            json!({"argv": ["/usr/bin/cat", "/proc/self/status"]}),
            CALL_TIMEOUT,
        )
        .map_err(|e| format!("tools.exec cat: {e}"))?;
    let res = o
        .result
        .as_ref()
        .map_err(|e| format!("tools.exec cat: {e}"))?;
    if res["exit"] != 0 {
        return Err(format!("tools.exec cat /proc/self/status: {res}"));
    }
    let out: String = o
        .events_named("tools.output")
        .iter()
        .filter(|e| e["params"]["stream"] == "stdout")
        .filter_map(|e| e["params"]["data"].as_str())
        .collect();
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(str::trim)
            .unwrap_or("?")
            .to_string()
    };
    let (sec, nnp, cap) = (field("Seccomp"), field("NoNewPrivs"), field("CapEff"));
    if sec != "2" || nnp != "1" || cap != "0000000000000000" {
        return Err(format!(
            "the tool does not run confined: Seccomp {sec}, NoNewPrivs {nnp}, CapEff {cap}"
        ));
    }
    let r = c
        .try_call("tools.exec", json!({"argv": [TRUE]}), CALL_TIMEOUT)
        .map_err(|e| format!("tools.exec {TRUE}: {e}"))?;
    match &r.result {
        Ok(v) if v["exit"] == 0 => {}
        Ok(v) => return Err(format!("tools.exec {TRUE}: {v}")),
        Err(e) => return Err(format!("tools.exec {TRUE}: {e}")),
    }
    c.close();
    println!("confinement probe: the tool runs with Seccomp {sec}, NoNewPrivs {nnp}, CapEff {cap}");
    Ok(())
}

fn table(runs: &[Run]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| {:<30} | {:>7} | {:>6} | {:>7} | {:>9} | {:>8} | {:>8} | {:>8} | {:>9} | {:>9} |",
        "variant",
        "clients",
        "calls",
        "seconds",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50/bare",
        "rate/bare"
    );
    let _ = writeln!(
        t,
        "|{:-<32}|{:->8}:|{:->7}:|{:->8}:|{:->10}:|{:->9}:|{:->9}:|{:->9}:|{:->10}:|{:->10}:|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for r in runs {
        let s = r.sorted();
        let p50 = percentile(&s, 50.0);
        let bare = runs
            .iter()
            .find(|b| b.kind == Kind::Bare && b.clients == r.clients);
        let (lat_ratio, rate_ratio) = match bare {
            Some(b) if r.kind != Kind::Bare => {
                let bs = b.sorted();
                (
                    format!("{:.2}", ms(p50) / ms(percentile(&bs, 50.0))),
                    format!("{:.3}", r.rate() / b.rate()),
                )
            }
            _ => ("—".to_string(), "—".to_string()),
        };
        let _ = writeln!(
            t,
            "| {:<30} | {:>7} | {:>6} | {:>7.1} | {:>9.1} | {:>8.3} | {:>8.3} | {:>8.3} | {:>9} | {:>9} |",
            r.kind.label(),
            r.clients,
            r.samples.len(),
            r.elapsed.as_secs_f64(),
            r.rate(),
            ms(p50),
            ms(percentile(&s, 99.0)),
            ms(s.last().copied()),
            lat_ratio,
            rate_ratio,
        );
    }
    t
}

fn cpu_table(runs: &[Run]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| {:<30} | {:>7} | {:>14} | {:>14} | {:>13} | {:>12} | {:>17} |",
        "variant",
        "clients",
        "supervisor ms",
        "gateway ms",
        "client ms",
        "machine busy",
        "tool wall p50/p99"
    );
    let _ = writeln!(
        t,
        "|{:-<32}|{:->8}:|{:->15}:|{:->15}:|{:->14}:|{:->13}:|{:->18}:|",
        "", "", "", "", "", "", ""
    );
    for r in runs {
        let calls = r.samples.len().max(1) as f64;
        let per = |secs: f64| format!("{:.3}", secs * 1e3 / calls);
        let mut w = r.tool_wall_ms.clone();
        w.sort();
        let wall = match (percentile(&w, 50.0), percentile(&w, 99.0)) {
            (Some(a), Some(b)) => format!("{a} / {b} ms"),
            _ => "—".to_string(),
        };
        let busy = if r.cpu.total > 0.0 {
            format!("{:.0} %", 100.0 * r.cpu.busy / r.cpu.total)
        } else {
            "?".to_string()
        };
        let _ = writeln!(
            t,
            "| {:<30} | {:>7} | {:>14} | {:>14} | {:>13} | {:>12} | {:>17} |",
            r.kind.label(),
            r.clients,
            per(r.cpu.supervisor),
            per(r.cpu.gateway),
            per(r.cpu.client),
            busy,
            wall
        );
    }
    t
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets) passes nothing:
    // then a short smoke run (1 and 4 clients, about 1 s each) that checks the path works.
    let bench = std::env::args().any(|a| a == "--bench");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && !bench && std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: gateway_exec needs root (euid {euid}); CARAPACE_ALLOW_SKIP=1 is set");
        return ExitCode::SUCCESS;
    }
    if euid != 0 {
        eprintln!(
            "gateway_exec: this bench must run as root (euid is {euid}): it starts `carapace run`, \
             whose gateway and tools run in namespaces, cgroups and idmapped mounts. Run it as \
             root: cargo bench -p carapace-tests --bench gateway_exec"
        );
        return ExitCode::from(2);
    }
    let (levels, exec_s, fast_s) = match (
        levels(if bench { &[1, 16, 64] } else { &[1, 4] }),
        env_f64("BENCH_EXEC_SECONDS", if bench { 20.0 } else { 1.0 }),
        env_f64("BENCH_FAST_SECONDS", if bench { 5.0 } else { 0.3 }),
    ) {
        (Ok(l), Ok(e), Ok(f)) => (l, e, f),
        (l, e, f) => {
            for err in [l.err(), e.err(), f.err()].into_iter().flatten() {
                eprintln!("gateway_exec: {err}");
            }
            return ExitCode::from(2);
        }
    };
    let max_clients = levels.iter().copied().max().unwrap_or(1);

    let policy = default_policy_text();
    if !policy.contains(DEFAULT_RATE) {
        eprintln!(
            "gateway_exec: the default policy no longer has the line `{DEFAULT_RATE}` for the \
             gateway profile; update DEFAULT_RATE in this bench"
        );
        return ExitCode::from(2);
    }
    let policy = policy.replacen(DEFAULT_RATE, BENCH_RATE, 1);

    println!("gateway_exec: carapace  {}", carapace_bin().display());
    println!("gateway_exec: gateway   {}", gateway_bin().display());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} CPUs, kernel {}, load average at start {}",
        kernel(),
        loadavg()
    );
    println!(
        "levels {levels:?} clients; {exec_s} s per exec level, {fast_s} s per bare and ping level"
    );

    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        extra_config: CLIENTS_CONFIG.to_string(),
        ..StartOpts::default()
    });
    let tokens: Vec<String> = (0..max_clients)
        .map(|i| svc.token_named("client", &format!("bench-{i}")))
        .collect();
    if let Err(e) = probe_confinement(&svc, &tokens[0]) {
        eprintln!("gateway_exec: {e}\nsupervisor log:\n{}", svc.log_text());
        return ExitCode::FAILURE;
    }

    let gateway_init = svc.gateway()["pid"].as_i64().unwrap_or(0);
    let pids = Pids {
        supervisor: i64::from(svc.pid()),
        gateway: carapace_tests::service::program_of(gateway_init),
    };

    let started = Instant::now();
    let mut runs = Vec::new();
    for &n in &levels {
        for kind in [Kind::Bare, Kind::Ping, Kind::Exec] {
            let secs = if kind == Kind::Exec { exec_s } else { fast_s };
            let r = run_level(&svc, pids, &tokens, kind, n, secs, None);
            println!(
                "  {:<30} {n:>3} clients: {:>6} calls in {:>5.1} s, {:>8.1}/s, {} failures \
                 (load {})",
                kind.label(),
                r.samples.len(),
                r.elapsed.as_secs_f64(),
                r.rate(),
                r.failures,
                loadavg()
            );
            runs.push(r);
        }
    }
    let total = started.elapsed();

    println!();
    println!("{}", table(&runs));
    println!(
        "p50/bare: p50 latency over bare fork+exec's p50 at the same number of clients; \
         rate/bare: calls/s over bare's calls/s."
    );
    println!();
    println!("{}", cpu_table(&runs));
    println!(
        "CPU ms per call over the timed window: supervisor = `carapace run` and every tool \
         sandbox it reaped; gateway = the gateway program; client = this bench's threads and \
         bare's children. machine busy = share of all {cpus} CPUs not idle (other load \
         included). tool wall = the tools.exec result's wall_ms (the supervisor's clock from \
         spawn to reaped, 1 ms resolution)."
    );
    let execs = std::fs::read_to_string(svc.state_dir().join("audit.log"))
        .map(|a| a.lines().filter(|l| l.contains("\"op\":\"exec\"")).count())
        .unwrap_or(0);
    // Every tools.exec call made (warm-ups, timed, the two of the probe) is one broker decision.
    let made: usize = 2 + runs
        .iter()
        .filter(|r| r.kind == Kind::Exec)
        .map(|r| r.attempts)
        .sum::<usize>();
    println!(
        "audit log: {execs} exec records for {made} tools.exec calls made; timed phase {:.0} s; \
         load average at the end {}",
        total.as_secs_f64(),
        loadavg()
    );

    let log = svc.log_text();
    drop(svc);

    // The default limits (policy and configuration untouched): 16 clients, each pacing itself
    // at its own per-token rate. They ask more than the gateway's broker budget (and the
    // machine) can serve, so they wait their turn; none may be refused.
    let fair = default_limits_run(exec_s);
    let s = fair.sorted();
    println!();
    println!(
        "default limits (broker budget 50/s burst 100, {DEFAULT_CLIENT_RATE} calls/s burst 40 per \
         token): {FAIR_CLIENTS} clients each paced at {DEFAULT_CLIENT_RATE}/s for {exec_s} s \
         (asking {} calls/s in all): {} calls made (warm-up included), {} in the timed window \
         ({:.1}/s), {} refused; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; load average {}",
        FAIR_CLIENTS as f64 * DEFAULT_CLIENT_RATE,
        fair.attempts,
        fair.samples.len(),
        fair.rate(),
        fair.failures,
        ms(percentile(&s, 50.0)),
        ms(percentile(&s, 99.0)),
        ms(s.last().copied()),
        loadavg()
    );
    runs.push(fair);

    let failed: usize = runs.iter().map(|r| r.failures).sum();
    if failed > 0 {
        eprintln!("\ngateway_exec: {failed} CALLS FAILED");
        for r in runs.iter().filter(|r| r.failures > 0) {
            eprintln!(
                "  {} with {} clients: {} failures; first ones:",
                r.kind.label(),
                r.clients,
                r.failures
            );
            for f in &r.first_failures {
                eprintln!("    {f}");
            }
        }
        let mut bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        let shown = bad.len().min(20);
        eprintln!(
            "supervisor log: {} WARN/ERROR lines, the last {shown}:",
            bad.len()
        );
        for l in bad.drain(bad.len() - shown..) {
            eprintln!("  {l}");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
