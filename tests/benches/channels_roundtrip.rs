//! Inbound message → reply delivered, end to end: a wire-exact fake Telegram Bot API queues a
//! text message, the confined Telegram adapter (`carapace-channel`, a child of `carapace run`)
//! long-polls it and delivers it to the broker, the gateway runs the agent against a fake
//! OpenAI-compatible model that answers at once (it echoes the message), and the reply goes back
//! through the broker's `send` and outbox to the adapter and the fake's `sendMessage`. Latency is
//! measured from queueing the update to the fake recording the reply.
//!
//! Next to it, the same path without the agent: `answer_channels = false`, and a WebSocket
//! operator client receives each `messages.inbound` event and answers it with `messages.send`
//! at once (adapter, broker queue, gateway, broker send, outbox, adapter; no model call, no
//! session).
//!
//! Each concurrency level runs that many conversations (Telegram chats), each a thread sending
//! its next message when the reply to the previous one is in, for a fixed time after a warm-up.
//! Every message must be answered (within 30 s); a failure makes the bench exit non-zero.
//!
//! Run (as root): `cargo bench -p carapace-tests --bench channels_roundtrip`. Without `--bench`
//! (`cargo test --benches`) a short smoke run (1 and 4 conversations, 1 s each).
//!
//! Environment: `BENCH_CONVERSATIONS` (default `1,50`), `BENCH_SECONDS` (default 15).

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use carapace_tests::fake_telegram::FakeTelegram;
use carapace_tests::rpc::RpcClient;
use carapace_tests::service::{channel_bin, policy_text, Service, StartOpts};
use carapace_tests::{var_tmpdir, FakeLlm};
use serde_json::{json, Value};

const TOKEN: &str = "4242:bench-bot-token-AAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// How long one message may take before it counts as failed.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first chat id; conversation k is chat FIRST_CHAT + k.
const FIRST_CHAT: i64 = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Agent,
    NoAgent,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Agent => "inbound → agent (fake model) → reply",
            Path::NoAgent => "inbound → WebSocket client → reply (no agent)",
        }
    }
}

struct Setup {
    svc: Service,
    tg: Arc<FakeTelegram>,
    _llm: FakeLlm,
    _secrets: tempfile::TempDir,
}

fn start(path: Path, max_runs: usize) -> Setup {
    let tg = Arc::new(FakeTelegram::start(TOKEN));
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let secrets = var_tmpdir("carapace-bench-secret-");
    let secret = secrets.path().join("bot");
    std::fs::write(&secret, TOKEN).unwrap_or_else(|e| panic!("write the token: {e}"));
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
    }
    let policy = policy_text(&format!(
        r#"
[secrets.bot]
why = "the bench bot's token"
file = "{secret}"

[channels.tg]
why = "the bench chats: everyone admitted, replies to them"
kind = "adapter"
senders = ["*"]
recipients = []
reply_to_senders = true
rate = {{ per_minute = 1000000, burst = 100000 }}

[profiles.tg]
why = "the Telegram adapter under bench"
extends = "channel"

[profiles.tg.broker]
connect = [{{ host = "127.0.0.1", port = {api}, allow_private = true, why = "the fake Bot API" }}]
secrets = ["bot"]
deliver = ["tg"]
rate = {{ requests_per_second = 100000, burst = 100000 }}

[profiles.agent]
why = "the gateway under bench"
extends = "gateway"

[profiles.agent.broker]
connect = [{{ host = "127.0.0.1", port = {llm}, allow_private = true, why = "the fake model" }}]
channels = ["tg"]
rate = {{ requests_per_second = 100000, burst = 100000 }}
"#,
        secret = secret.display(),
        api = tg.addr().port(),
        llm = llm.addr().port(),
    ));
    let config = format!(
        r#"
[gateway.clients]
rate_per_second = 100000
burst = 100000
max_in_flight = 64

[gateway.agent]
base_url = "{llm}"
model = "bench"
max_concurrent_runs = {max_runs}
answer_channels = {answer}

[channels.tg]
kind = "telegram"
program = "{bin}"
profile = "tg"
token_secret = "bot"
api_base = "{api}"
poll_timeout = "1s"
"#,
        llm = llm.base_url(),
        answer = path == Path::Agent,
        bin = channel_bin().display(),
        api = tg.base_url(),
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        gateway_profile: Some("agent".into()),
        extra_config: config,
        ..StartOpts::default()
    });
    Setup {
        svc,
        tg,
        _llm: llm,
        _secrets: secrets,
    }
}

/// Without the agent: an operator WebSocket that answers every `messages.inbound` at once.
fn responder(
    svc: &Service,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let token = svc.token("operator");
    let addr = svc.addr;
    std::thread::spawn(move || {
        let mut c = RpcClient::connect(addr, Some(&token))
            .unwrap_or_else(|e| panic!("responder: connect: {e:?}"));
        while !stop.load(Ordering::SeqCst) {
            let Some(ev) = c.next_event("messages.inbound", Duration::from_millis(200)) else {
                continue;
            };
            let p = &ev["params"];
            let to = p["reply_to"].as_str().unwrap_or("").to_string();
            let body = format!("echo: {}", p["body"].as_str().unwrap_or(""));
            let out = c.call(
                "messages.send",
                json!({"channel": "tg", "recipient": to, "body": body}),
            );
            if out.result.is_err() {
                eprintln!("responder: messages.send to {to}: {out:?}");
            }
        }
    })
}

/// Latencies of one level, and failures.
struct Level {
    latencies: Vec<Duration>,
    failures: usize,
    elapsed: Duration,
}

fn run_level(setup: &Setup, conversations: usize, seconds: f64, base: i64) -> Level {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(conversations + 1));
    let warmup_done = Arc::new(Barrier::new(conversations + 1));
    let mut threads = Vec::new();
    let duration = Duration::from_secs_f64(seconds);
    let start_at = Arc::new(Mutex::new(None::<Instant>));
    for k in 0..conversations {
        let tg = setup.tg.clone();
        let lat = latencies.clone();
        let fails = failures.clone();
        let (b, w) = (barrier.clone(), warmup_done.clone());
        let start_at = start_at.clone();
        let chat = base + k as i64;
        threads.push(std::thread::spawn(move || {
            let mut sent = 0usize;
            let mut one = |timed: bool| {
                let t = Instant::now();
                tg.push_text(chat, chat, &format!("m{sent}"));
                sent += 1;
                if tg.wait_sent_to(chat, sent, MESSAGE_TIMEOUT) {
                    if timed {
                        lat.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(t.elapsed());
                    }
                } else {
                    fails.fetch_add(1, Ordering::SeqCst);
                }
            };
            b.wait();
            one(false); // warm-up: the session exists, the connections are open
            w.wait();
            let begin = start_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(Instant::now);
            while begin.elapsed() < duration {
                one(true);
            }
        }));
    }
    barrier.wait();
    warmup_done.wait();
    let t0 = Instant::now();
    *start_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(t0);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = t0.elapsed();
    let latencies = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Level {
        latencies,
        failures: failures.load(Ordering::SeqCst),
        elapsed,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    let bench = std::env::args().any(|a| a == "--bench");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!(
            "channels_roundtrip: must run as root (euid is {euid}): it starts `carapace run`. \
             Run: cargo bench -p carapace-tests --bench channels_roundtrip"
        );
        return ExitCode::from(2);
    }
    let levels: Vec<usize> = match std::env::var("BENCH_CONVERSATIONS") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if bench => vec![1, 50],
        Err(_) => vec![1, 4],
    };
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 15.0 } else { 1.0 });
    let max_conv = levels.iter().copied().max().unwrap_or(1);
    let mut failed = false;
    println!(
        "{:<48} {:>6} {:>8} {:>10} {:>10} {:>10} {:>6}",
        "path", "convs", "msgs", "msgs/s", "p50", "p99", "fail"
    );
    let mut rates = Vec::new();
    for path in [Path::NoAgent, Path::Agent] {
        let setup = start(path, max_conv.min(64));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let resp = (path == Path::NoAgent).then(|| responder(&setup.svc, stop.clone()));
        for (i, &c) in levels.iter().enumerate() {
            let base = FIRST_CHAT + (i as i64) * 10_000;
            let mut l = run_level(&setup, c, seconds, base);
            l.latencies.sort();
            let n = l.latencies.len();
            let rate = n as f64 / l.elapsed.as_secs_f64().max(1e-9);
            rates.push((path, c, rate, pct(&l.latencies, 0.5)));
            println!(
                "{:<48} {:>6} {:>8} {:>10.1} {:>10} {:>10} {:>6}",
                path.label(),
                c,
                n,
                rate,
                ms(pct(&l.latencies, 0.5)),
                ms(pct(&l.latencies, 0.99)),
                l.failures
            );
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                eprintln!("after the level: {}", setup.svc.status()["channels"]);
            }
            if l.failures > 0 || n == 0 {
                failed = true;
                let log = setup.svc.log_text();
                let worth: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                eprintln!(
                    "{} unanswered; the service's warnings and errors (last 30):\n{}",
                    l.failures,
                    worth[worth.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        stop.store(true, Ordering::SeqCst);
        if let Some(r) = resp {
            let _ = r.join();
        }
        // Every reply the fake recorded went to the chat it answered.
        let bad: Vec<Value> = setup
            .tg
            .sent()
            .into_iter()
            .filter(|m| !m["text"].as_str().unwrap_or("").starts_with("echo: "))
            .collect();
        if !bad.is_empty() {
            eprintln!("unexpected replies: {bad:?}");
            failed = true;
        }
    }
    for &c in &levels {
        let find = |p| rates.iter().find(|r| r.0 == p && r.1 == c);
        if let (Some(a), Some(b)) = (find(Path::Agent), find(Path::NoAgent)) {
            println!(
                "{c} conversation(s): the agent path runs at {:.2}× the rate of the path without it (p50 {:.2}×)",
                a.2 / b.2.max(1e-9),
                a.3.as_secs_f64() / b.3.as_secs_f64().max(1e-9)
            );
        }
    }
    if failed {
        eprintln!("channels_roundtrip: FAILED (a message was not answered)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
