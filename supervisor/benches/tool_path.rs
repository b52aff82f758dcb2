//! The broker tool path: a tool requested through the broker (`exec` op) until its exit report,
//! next to bare fork+exec and bubblewrap of the same program.
//!
//! Run: `cargo bench -p carapace --bench tool_path` (as root: the broker's tools are started the
//! way `carapace run` starts them). Plain `std::time`, no harness. The broker is hosted in this
//! process exactly as `carapace run` hosts it ([`BrokerHost`] with the control channel, the
//! default policy from `policies/default.toml`, `--run-as auto`, a state directory in a temp
//! dir under `/var/tmp`); a client peer with the gateway's identity (its profile may `exec`)
//! asks for `/usr/bin/true`, which the default policy allows in the `tool` profile (the gateway
//! profile's broker rate is raised so that it does not throttle the loop). Next to it: bare
//! fork+exec, bwrap, and the kernel's floor for a program in fresh namespaces (one clone with
//! new mount, pid, network, IPC, UTS and cgroup namespaces, the exec, the wait: no mounts, no
//! confinement; `common::floor_run`), the ratios against each. The variants run interleaved
//! (round-robin) so that machine noise hits them alike.
//!
//! Environment: `BENCH_ITERS` (timed runs per variant, default 200, after 10 warm-up runs);
//! `BENCH_POLICY` (default `policies/default.toml`; it must keep that file's gateway `rate`
//! line and its `/usr/bin/true` rule); `BENCH_SPAWNER` is the number of spawner processes forked
//! at the start, as `carapace run` does (default 1: the bench's one client has one tool in
//! flight; `0` starts the tools from the broker's own threads instead; the spawners' CPU counts
//! as the supervisor's).
//! Without `--bench` (that is, under `cargo test --benches`) it makes a smoke run of 5.
//!
//! Then the broker under load: `ping` round trips from a second peer, idle and while
//! `BENCH_LOAD_TOOLS` (default 200; 20 in a smoke run) confined tools (`tail -f /dev/null`,
//! allowed by the default policy) are running, with the p50 ratio against the target
//! (within 2x idle).
//!
//! Before timing it checks that the path works: `cat /proc/self/status` through it must show
//! `Seccomp: 2`, `NoNewPrivs: 1` and `CapEff: 0`, and `/usr/bin/false` must report exit 1; bwrap
//! must be installed. Any failure is reported and the bench exits 1.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_broker::client::Client;
use carapace_broker::server::Role;
use carapace_policy::{Policy, Target};
use carapace_sandbox::namespaces::RunAs;
use carapace_sandbox::Privilege;
use carapace_supervisor::broker_host::{
    new_identity, BrokerHost, BrokerSetup, OperatorChannel, StateDir, ToolContext,
};

mod common;
use common::{find_in_path, floor_run, ms, percentile};

const BWRAP: [&str; 6] = [
    "--ro-bind",
    "/",
    "/",
    "--unshare-all",
    "--die-with-parent",
    "/usr/bin/true",
];

/// The default policy's broker rate line for the gateway profile, and what replaces it.
const DEFAULT_RATE: &str = "rate = { requests_per_second = 50, burst = 100 }";
const BENCH_RATE: &str = "rate = { requests_per_second = 100000, burst = 100000 }";

/// CPU time of this process (all its threads), of its main thread (the one that runs the bare
/// and bwrap commands) and of its reaped children.
#[derive(Clone, Copy, Default)]
struct Cpu {
    own: Duration,
    main: Duration,
    children: Duration,
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own; `who` is one of the
    // two documented selectors.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The spawner processes' pids, when the tools are started through them.
static SPAWNERS: std::sync::OnceLock<Vec<libc::pid_t>> = std::sync::OnceLock::new();

/// CPU time of the spawner processes so far.
fn spawner_cpu() -> Duration {
    SPAWNERS.get().map_or(Duration::ZERO, |pids| {
        pids.iter().map(|p| process_cpu(*p)).sum()
    })
}

/// CPU time of one process so far (utime + stime of /proc/PID/stat).
fn process_cpu(pid: libc::pid_t) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn cpu_now() -> Cpu {
    Cpu {
        own: rusage(libc::RUSAGE_SELF) + spawner_cpu(),
        main: rusage(libc::RUSAGE_THREAD),
        children: rusage(libc::RUSAGE_CHILDREN),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Bare,
    Floor,
    Bwrap,
    Tool,
}

struct Variant {
    kind: Kind,
    label: &'static str,
    samples: Vec<Duration>,
    /// CPU spent while this variant's calls were in flight.
    cpu: Cpu,
    /// The tools' own `wall_ms` (tool path only).
    tool_wall_ms: Vec<u64>,
}

impl Variant {
    fn new(kind: Kind, label: &'static str) -> Variant {
        Variant {
            kind,
            label,
            samples: Vec::new(),
            cpu: Cpu::default(),
            tool_wall_ms: Vec::new(),
        }
    }
}

fn run_command(argv: &[&str]) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} -> {}; stderr: {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One tool through the broker: request .. exit report. Returns its stdout and exit summary.
fn tool(
    client: &mut Client,
    argv: &[&str],
) -> Result<(Vec<u8>, carapace_broker::protocol::ExitSummary), String> {
    let started = client
        .exec(argv.iter().map(|s| s.to_string()).collect(), None)
        .map_err(|e| format!("exec {argv:?}: {e}"))?;
    let mut out = Vec::new();
    std::fs::File::from(started.stdout)
        .read_to_end(&mut out)
        .map_err(|e| format!("reading the tool's stdout: {e}"))?;
    drop(started.stderr);
    let summary = client
        .wait_exit(started.id)
        .map_err(|e| format!("waiting for {argv:?}: {e}"))?;
    Ok((out, summary))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The broker as `carapace run` hosts it, with a client peer whose profile (`gateway`) may
/// `exec`.
fn start_broker(root: &Path, policy: Policy) -> Result<(BrokerHost, Client), String> {
    let state = StateDir::open(&root.join("state")).map_err(|e| format!("state dir: {e}"))?;
    let state_canon =
        std::fs::canonicalize(&state.root).map_err(|e| format!("canonicalize: {e}"))?;
    carapace_sandbox::mounts::allow_managed_workspaces(&state_canon);
    let tools_ws = state.root.join("tools");
    let owners_ws = state.root.join("workspaces").join("owners");
    for d in [&tools_ws, &owners_ws] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let target = Target {
        landlock_abi: carapace_sandbox::landlock::probe_abi(),
    };
    // Before the broker's runtime starts any thread, as in `carapace run`.
    let spawners = match std::env::var("BENCH_SPAWNER") {
        Ok(v) => v
            .parse::<usize>()
            .map_err(|_| format!("BENCH_SPAWNER={v}: not a number"))?,
        Err(_) => 1,
    };
    let spawner = if spawners == 0 {
        None
    } else {
        let s = carapace_sandbox::spawner::Spawner::start(spawners)
            .map_err(|e| format!("starting the spawner: {e}"))?;
        let _ = SPAWNERS.set(s.pids());
        Some(s)
    };
    println!(
        "tools started by: {}",
        spawner
            .as_ref()
            .map_or("the broker's threads (BENCH_SPAWNER=0)".to_string(), |s| {
                s.describe()
            })
    );
    let host = BrokerHost::start_with(
        BrokerSetup {
            policy: policy.clone(),
            state,
            tools: ToolContext {
                policy: Arc::new(policy),
                target,
                privilege: Privilege::of_this_process(),
                run_as: RunAs::Auto,
                env: std::env::vars_os().collect(),
                workspace: Some(tools_ws),
                owners_root: Some(owners_ws),
                live: Default::default(),
                plans: Default::default(),
                cgroups: Default::default(),
                spawner,
            },
            approval_timeout: Duration::from_secs(5),
            token_store: None,
            audit_rotation: carapace_broker::audit::Rotation::default(),
            workspaces: Vec::new(),
        },
        OperatorChannel::Control,
        None,
    )
    .map_err(|e| format!("starting the broker: {e}"))?;
    let (mine, theirs) =
        carapace_broker::protocol::seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
    host.peers()
        .serve(mine, new_identity(Role::Gateway, "gateway"))
        .ok_or("the broker has no handler")?;
    Ok((host, Client::new(theirs)))
}

/// The tool path must work and confine before it is timed.
fn check_path(client: &mut Client) -> Result<(), String> {
    let (out, s) = tool(client, &["/usr/bin/cat", "/proc/self/status"])?;
    if s.exit != 0 {
        return Err(format!(
            "cat /proc/self/status through the broker: exit {}",
            s.exit
        ));
    }
    let out = String::from_utf8_lossy(&out);
    for (k, want) in [
        ("Seccomp", "2"),
        ("NoNewPrivs", "1"),
        ("CapEff", "0000000000000000"),
    ] {
        let got = out
            .lines()
            .find_map(|l| l.split_once(':').filter(|(a, _)| *a == k))
            .map(|(_, v)| v.trim().to_string());
        if got.as_deref() != Some(want) {
            return Err(format!(
                "the tool does not run confined: {k} is {got:?}, not {want:?}"
            ));
        }
    }
    let (_, s) = tool(client, &["/usr/bin/false"])?;
    if s.exit != 1 {
        return Err(format!(
            "/usr/bin/false through the broker reported exit {}, not 1",
            s.exit
        ));
    }
    println!("checked: a tool runs confined (Seccomp 2, NoNewPrivs 1, CapEff 0); false exits 1");
    Ok(())
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tool_path: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (the broker starts tools as `carapace run` does)".into());
    }
    let timed = std::env::args().any(|a| a == "--bench");
    let (iters, warmup) = match std::env::var("BENCH_ITERS") {
        Ok(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => (n, 10),
            _ => return Err(format!("BENCH_ITERS must be a positive integer, got {s:?}")),
        },
        Err(_) if timed => (200, 10),
        Err(_) => (5, 2),
    };
    let Some(bwrap) = find_in_path("bwrap") else {
        return Err("bwrap is not installed (apt-get install bubblewrap)".into());
    };
    let bwrap = bwrap.to_string_lossy().to_string();
    run_command(&[
        &bwrap, BWRAP[0], BWRAP[1], BWRAP[2], BWRAP[3], BWRAP[4], BWRAP[5],
    ])
    .map_err(|e| format!("bwrap does not run here: {e}"))?;

    let policy_file = std::env::var_os("BENCH_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"));
    let text = std::fs::read_to_string(&policy_file)
        .map_err(|e| format!("{}: {e}", policy_file.display()))?;
    // The gateway profile's broker budget (50/s) would throttle the loop; nothing else changes.
    if !text.contains(DEFAULT_RATE) {
        return Err(format!(
            "{} has no line `{DEFAULT_RATE}` to raise",
            policy_file.display()
        ));
    }
    let text = text.replace(DEFAULT_RATE, BENCH_RATE);
    let policy = Policy::parse(&text, "default.toml").map_err(|e| e.to_string())?;
    std::fs::create_dir_all("/var/tmp").map_err(|e| format!("/var/tmp: {e}"))?;
    let tmp = tempfile::Builder::new()
        .prefix("carapace-toolpath-")
        .tempdir_in("/var/tmp")
        .map_err(|e| format!("temp dir under /var/tmp: {e}"))?;
    let (host, mut client) = start_broker(tmp.path(), policy)?;
    let load_tools = match std::env::var("BENCH_LOAD_TOOLS") {
        Ok(s) => s
            .parse::<usize>()
            .map_err(|_| format!("BENCH_LOAD_TOOLS must be a number, got {s:?}"))?,
        Err(_) if timed => 200,
        Err(_) => 20,
    };
    let result = measure(&mut client, &bwrap, iters, warmup).and_then(|()| {
        ping_under_load(
            &host,
            &mut client,
            load_tools,
            if timed { 2000 } else { 200 },
        )
    });
    drop(client);
    host.kill_tools(Duration::from_secs(2));
    host.shutdown();
    result
}

/// `n` sequential `ping` round trips of `client`, sorted.
fn pings(client: &mut Client, n: usize) -> Result<Vec<Duration>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.ping().map_err(|e| format!("ping: {e}"))?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

/// The broker's `ping` latency (from a peer of its own), idle and with `tools` confined tools
/// running; the target is p50 within 2x idle.
fn ping_under_load(
    host: &BrokerHost,
    exec: &mut Client,
    tools: usize,
    n: usize,
) -> Result<(), String> {
    let (mine, theirs) =
        carapace_broker::protocol::seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
    host.peers()
        .serve(mine, new_identity(Role::Gateway, "gateway"))
        .ok_or("the broker has no handler")?;
    let mut pinger = Client::new(theirs);
    let _ = pings(&mut pinger, n / 10)?;
    let idle = pings(&mut pinger, n)?;
    let t0 = Instant::now();
    let mut running = Vec::with_capacity(tools);
    for i in 0..tools {
        let started = exec
            .exec(
                vec!["/usr/bin/tail".into(), "-f".into(), "/dev/null".into()],
                None,
            )
            .map_err(|e| format!("starting load tool {} of {tools}: {e}", i + 1))?;
        running.push(started);
    }
    let start_all = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let loaded = pings(&mut pinger, n)?;
    let ratio = ms(percentile(&loaded, 50.0)) / ms(percentile(&idle, 50.0));
    println!(
        "broker ping, {n} sequential round trips from a peer of its own (ms): idle p50 {:.3} p99 {:.3}; with {tools} confined tools running (started in {:.0} ms) p50 {:.3} p99 {:.3}; ratio p50 {ratio:.2} (target <= 2.00: {})",
        ms(percentile(&idle, 50.0)),
        ms(percentile(&idle, 99.0)),
        ms(start_all),
        ms(percentile(&loaded, 50.0)),
        ms(percentile(&loaded, 99.0)),
        if ratio <= 2.0 { "met" } else { "missed" }
    );
    let killed = host.kill_tools(Duration::from_secs(2));
    if killed < tools {
        return Err(format!(
            "{killed} of the {tools} load tools were running at the end"
        ));
    }
    Ok(())
}

fn measure(client: &mut Client, bwrap: &str, iters: usize, warmup: usize) -> Result<(), String> {
    check_path(client)?;
    let bwrap_argv: Vec<&str> = std::iter::once(bwrap).chain(BWRAP).collect();
    let mut vs = [
        Variant::new(Kind::Bare, "bare fork+exec /usr/bin/true"),
        Variant::new(Kind::Floor, "kernel floor: 6 new namespaces + exec"),
        Variant::new(Kind::Bwrap, "bwrap --unshare-all /usr/bin/true"),
        Variant::new(Kind::Tool, "broker tool path /usr/bin/true"),
    ];
    let load_before = load_average();
    let mut loop_start = cpu_now();
    for i in 0..warmup + iters {
        let record = i >= warmup;
        if i == warmup {
            loop_start = cpu_now();
        }
        for v in vs.iter_mut() {
            let c0 = cpu_now();
            let t0 = Instant::now();
            let wall_ms = match v.kind {
                Kind::Bare => run_command(&["/usr/bin/true"]).map(|()| None)?,
                Kind::Floor => floor_run("/usr/bin/true").map(|()| None)?,
                Kind::Bwrap => run_command(&bwrap_argv).map(|()| None)?,
                Kind::Tool => {
                    let (_, s) = tool(client, &["/usr/bin/true"])?;
                    if s.exit != 0 {
                        return Err(format!("/usr/bin/true through the broker: exit {}", s.exit));
                    }
                    Some(s.wall_ms)
                }
            };
            let dt = t0.elapsed();
            let c1 = cpu_now();
            if record {
                v.samples.push(dt);
                v.cpu.own += c1.own.saturating_sub(c0.own);
                v.cpu.main += c1.main.saturating_sub(c0.main);
                v.cpu.children += c1.children.saturating_sub(c0.children);
                v.tool_wall_ms.extend(wall_ms);
            }
        }
    }
    // Let whatever the last tool left to do after its report (its cgroup's removal, the next
    // one's made ahead) finish, and count it.
    std::thread::sleep(Duration::from_millis(100));
    let total = cpu_now().own.saturating_sub(loop_start.own);
    let load_after = load_average();

    println!(
        "{iters} timed runs per variant after {warmup} warm-up, interleaved; load average {load_before} before, {load_after} after"
    );
    println!(
        "{:<36} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "variant (ms)", "n", "min", "p50", "p90", "p99", "max", "cpu self", "cpu child"
    );
    let mut p50 = [0.0f64; 4];
    for (k, v) in vs.iter().enumerate() {
        let mut s = v.samples.clone();
        s.sort();
        p50[k] = ms(percentile(&s, 50.0));
        let n = s.len() as u32;
        println!(
            "{:<36} {:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>10.3} {:>10.3}",
            v.label,
            s.len(),
            ms(s[0]),
            p50[k],
            ms(percentile(&s, 90.0)),
            ms(percentile(&s, 99.0)),
            ms(s[s.len() - 1]),
            ms(v.cpu.own / n),
            ms(v.cpu.children / n),
        );
    }
    let (bare, floor, bwrap, tool_p50) = (p50[0], p50[1], p50[2], p50[3]);
    let tool = &vs[3];
    let n = iters as u32;
    // Everything this process spent over the timed loop but the main thread's share of the
    // other variants' calls: the broker, the tools' threads (also what they do after a report,
    // while the next variant runs) and the client.
    let per_tool = total.saturating_sub(vs[0].cpu.main + vs[1].cpu.main + vs[2].cpu.main) / n;
    let mut walls = tool.tool_wall_ms.clone();
    walls.sort_unstable();
    println!(
        "ratio p50 tool path / bwrap = {:.2} (target <= 0.50: {})",
        tool_p50 / bwrap,
        if tool_p50 / bwrap <= 0.5 {
            "met"
        } else {
            "missed"
        }
    );
    println!("ratio p50 tool path / bare = {:.2}", tool_p50 / bare);
    println!(
        "ratio p50 tool path / kernel floor = {:.2}; bwrap / kernel floor = {:.2}; the target \
         (0.5 x bwrap = {:.3} ms) is {:.2} x the floor",
        tool_p50 / floor,
        bwrap / floor,
        bwrap * 0.5,
        bwrap * 0.5 / floor
    );
    println!(
        "supervisor CPU per tool (RUSAGE_SELF over the loop less the main thread in the other variants' calls) = {:.3} ms (target <= 1.5 ms: {}); in the call's window {:.3} ms",
        ms(per_tool),
        if per_tool <= Duration::from_micros(1500) { "met" } else { "missed" },
        ms(tool.cpu.own / n)
    );
    println!(
        "the sandboxes' CPU per tool (RUSAGE_CHILDREN, reaped by the tools' threads) = {:.3} ms",
        ms(tool.cpu.children / n)
    );
    if let Some(m) = walls.get(walls.len() / 2) {
        println!("the tools' own wall_ms (clone .. reaped) p50 = {m}");
    }
    Ok(())
}
