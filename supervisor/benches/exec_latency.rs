//! Exec latency of `carapace exec -- /bin/true` next to bare fork+exec and bubblewrap: made by
//! the `carapace exec` process itself (`--via local`) and through a running supervisor
//! (`--via supervisor`: the bench starts a `carapace run` of its own, with the same policy and
//! no children, and stops it at the end).
//!
//! Run: `cargo bench -p carapace --bench exec_latency` (as root: carapace's supervisor runs as
//! root). Plain `std::time`, no harness. All variants run interleaved (round-robin) in one
//! process so machine noise hits them alike.
//!
//! Environment:
//! * `BENCH_ITERS` — measured runs per variant (default 200); 10 warm-up runs are discarded.
//! * `CARAPACE_BIN` — the carapace binary (default: the one cargo built for this bench).
//! * `CARAPACE_BIN_BASELINE` — optional second carapace build, timed in the same run (A/B).
//! * `BENCH_POLICY` — policy file for the `policy check` figure (default: policies/default.toml).
//! * `BENCH_DD_RUNS` — runs of the end-to-end `dd bs=1` loop per variant (bare, bwrap,
//!   `carapace exec`; default 5, 0 leaves it out); `BENCH_DD_ONLY=1` runs only that.
//!
//! A variant whose command fails is reported with its exit status and stderr and left out of
//! the table; the bench itself never panics on a failing command.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{find_in_path, floor_run, ms, percentile};

const WARMUP: usize = 10;

struct Variant {
    label: String,
    cmd: Vec<String>,
    cwd: Option<PathBuf>,
    env: Vec<(String, PathBuf)>,
    /// Not a command: [`floor_run`] of `cmd[0]` in this process.
    floor: bool,
    samples: Vec<Duration>,
    failures: usize,
    first_failure: Option<String>,
    disabled: Option<String>,
}

impl Variant {
    fn new(label: &str, cmd: &[&str]) -> Variant {
        Variant {
            label: label.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            env: Vec::new(),
            floor: false,
            samples: Vec::new(),
            failures: 0,
            first_failure: None,
            disabled: None,
        }
    }

    fn unavailable(label: &str, why: String) -> Variant {
        let mut v = Variant::new(label, &[]);
        v.disabled = Some(why);
        v
    }

    /// Run once; `Ok(elapsed)` or `Err(description)`.
    fn run_once(&self) -> Result<Duration, String> {
        let Some((prog, args)) = self.cmd.split_first() else {
            return Err("empty command".to_string());
        };
        if self.floor {
            let start = Instant::now();
            floor_run(prog)?;
            return Ok(start.elapsed());
        }
        let mut c = Command::new(prog);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let start = Instant::now();
        let out = c
            .output()
            .map_err(|e| format!("cannot start {prog}: {e}"))?;
        let elapsed = start.elapsed();
        if out.status.success() {
            Ok(elapsed)
        } else {
            Err(format!(
                "{} -> {}; stderr: {}",
                self.cmd.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn step(&mut self, record: bool) {
        if self.disabled.is_some() {
            return;
        }
        match self.run_once() {
            Ok(d) => {
                if record {
                    self.samples.push(d);
                }
            }
            Err(e) => {
                self.failures += 1;
                if self.first_failure.is_none() {
                    self.first_failure = Some(e);
                }
                // A command that fails every time is not worth hammering.
                if self.samples.is_empty() && self.failures >= 3 {
                    self.disabled = Some("fails every time (see below)".to_string());
                }
            }
        }
    }
}

struct Summary {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn summarize(samples: &[Duration]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort();
    let total: Duration = s.iter().sum();
    Some(Summary {
        min: ms(s[0]),
        p50: ms(percentile(&s, 50.0)),
        p90: ms(percentile(&s, 90.0)),
        p99: ms(percentile(&s, 99.0)),
        max: ms(s[s.len() - 1]),
        mean: ms(total) / s.len() as f64,
    })
}

fn carapace_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CARAPACE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_carapace") {
        return Ok(PathBuf::from(p));
    }
    // Next to this bench: target/<profile>/deps/exec_latency-* -> target/<profile>/carapace.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let guess = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("carapace"))
        .ok_or("no parent dir of the bench binary")?;
    Ok(guess)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Check that `carapace exec` really runs the program: /bin/false must give exit code 1.
/// Also report whether the program ran confined (seccomp filter mode, no_new_privs), if the
/// default policy lets `cat` run.
fn sanity_check(v: &mut Variant) {
    let Some(bin) = v.cmd.first().cloned() else {
        return;
    };
    let run = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.args(args).stdin(Stdio::null());
        if let Some(d) = &v.cwd {
            c.current_dir(d);
        }
        c.output()
    };
    match run(&["exec", "--", "/bin/false"]) {
        Ok(o) if o.status.code() == Some(1) => {}
        Ok(o) => {
            v.disabled = Some(format!(
                "`carapace exec -- /bin/false` gave {} instead of exit 1, so carapace does not run \
                 the program; stderr: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            v.failures += 1;
            v.first_failure = v.disabled.clone();
            return;
        }
        Err(e) => {
            v.disabled = Some(format!("cannot start {bin}: {e}"));
            return;
        }
    }
    match run(&["exec", "--", "/bin/cat", "/proc/self/status"]) {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            let has = |k: &str, val: &str| {
                out.lines().any(|l| {
                    l.split_once(':')
                        .is_some_and(|(a, b)| a == k && b.trim() == val)
                })
            };
            println!(
                "confinement probe (cat /proc/self/status inside): Seccomp=2 {}, NoNewPrivs=1 {}, CapEff=0 {}",
                has("Seccomp", "2"),
                has("NoNewPrivs", "1"),
                has("CapEff", "0000000000000000")
            );
        }
        Ok(o) => println!(
            "confinement probe skipped: `carapace exec -- /bin/cat /proc/self/status` -> {}",
            o.status
        ),
        Err(e) => println!("confinement probe skipped: {e}"),
    }
}

/// In-process policy load + compile of the default policy (read, parse+validate, resolve the
/// rule programs, compile every profile): the "< 5 ms" target, without process start.
fn policy_costs(path: &Path, iters: usize) {
    use carapace_policy::{Policy, Target};
    let mut samples = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                println!("policy costs: cannot read {}: {e}", path.display());
                return;
            }
        };
        let mut policy = match Policy::parse(&text, &path.to_string_lossy()) {
            Ok(p) => p,
            Err(d) => {
                println!("policy costs: {d}");
                return;
            }
        };
        policy.canonicalize_programs(|p| std::fs::canonicalize(p).ok());
        let names: Vec<String> = policy
            .profile_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        for name in &names {
            if let Err(d) = policy.compile(
                name,
                &Target {
                    landlock_abi: u8::MAX,
                },
            ) {
                println!("policy costs: {d}");
                return;
            }
        }
        samples.push(t0.elapsed());
    }
    if let Some(s) = summarize(&samples) {
        println!(
            "policy load+compile (in-process): p50 {:.3} ms, p99 {:.3} ms (target < 5 ms: {})",
            s.p50,
            s.p99,
            if s.p99 < 5.0 { "met" } else { "MISSED" }
        );
    }
}

/// Cost of the default profile's seccomp filter (the only filter: the set-id guard is part of
/// it): installing it (the kernel converts and JITs the whole program) and running a cheap
/// allowed syscall under it, each in a fresh child.
fn seccomp_costs(path: &Path, iters: usize) {
    use carapace_policy::{Policy, Target};
    use carapace_sandbox::seccomp;
    const CALLS: u32 = 10_000;
    let plan = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| Policy::parse(&t, "default").map_err(|d| d.to_string()))
        .and_then(|p| {
            let name = p.profile_names().first().map(|s| s.to_string());
            let name = name.ok_or("no profile")?;
            p.compile(
                &name,
                &Target {
                    landlock_abi: u8::MAX,
                },
            )
            .map_err(|d| d.to_string())
        });
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            println!("seccomp costs: {e}");
            return;
        }
    };
    let Some(nr) = ["getppid", "getpid"]
        .iter()
        .find(|n| plan.seccomp.allowed.iter().any(|a| a == *n))
        .map(|n| {
            if *n == "getppid" {
                libc::SYS_getppid
            } else {
                libc::SYS_getpid
            }
        })
    else {
        println!("seccomp costs: neither getppid nor getpid is allowed; skipped");
        return;
    };
    let filter = match seccomp::prepare(&plan.seccomp.program) {
        Ok(f) => f,
        Err(e) => {
            println!("seccomp costs: {e}");
            return;
        }
    };
    // The floor: a filter that allows everything, answered by the kernel's action cache for
    // every syscall. What a cached syscall still costs is the seccomp entry path, which no
    // filter shape can lower; the plan's filter should cost the same for `getppid`
    // (carapace_policy::kernel_caches_allow proves the cache applies).
    let allow_all = match seccomp::prepare(&[carapace_policy::plan::BpfInsn {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: carapace_policy::seccomp::RET_ALLOW,
    }]) {
        Ok(f) => f,
        Err(e) => {
            println!("seccomp costs: {e}");
            return;
        }
    };
    // Per child: [install ns, CALLS syscalls ns].
    let run = |with: Option<&seccomp::Prepared>| -> Option<[u64; 2]> {
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: this bench is single-threaded, so the forked child may run ordinary code;
        // it only makes syscalls and exits with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let t0 = Instant::now();
            // SAFETY: prctl with integer arguments.
            let mut ok = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
            if let Some(f) = with {
                ok &= seccomp::child_install(f).is_ok();
            }
            let t1 = Instant::now();
            for _ in 0..CALLS {
                // SAFETY: a syscall without arguments.
                unsafe { libc::syscall(nr) };
            }
            let t2 = Instant::now();
            let out: [u64; 2] = if ok {
                [(t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64]
            } else {
                [u64::MAX, u64::MAX]
            };
            // SAFETY: writing 16 bytes from a local array to our pipe, then exiting.
            unsafe {
                libc::write(pipe[1], out.as_ptr().cast(), 16);
                libc::_exit(0);
            }
        }
        let mut buf = [0u64; 2];
        // SAFETY: reading into a local array, closing our pipe, reaping our child.
        let n = unsafe {
            libc::close(pipe[1]);
            let n = libc::read(pipe[0], buf.as_mut_ptr().cast(), 16);
            libc::close(pipe[0]);
            if pid > 0 {
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            n
        };
        (n == 16 && buf[0] != u64::MAX).then_some(buf)
    };
    let mut load = Vec::new();
    let (mut bare, mut filtered, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        match (run(None), run(Some(&filter)), run(Some(&allow_all))) {
            (Some(b), Some(f), Some(a)) => {
                load.push(Duration::from_nanos(f[0].saturating_sub(b[0])));
                bare.push(Duration::from_nanos(b[1]));
                filtered.push(Duration::from_nanos(f[1]));
                floor.push(Duration::from_nanos(a[1]));
            }
            _ => {
                println!("seccomp costs: a measuring child failed");
                return;
            }
        }
    }
    if let (Some(l), Some(b), Some(f), Some(a)) = (
        summarize(&load),
        summarize(&bare),
        summarize(&filtered),
        summarize(&floor),
    ) {
        let per = |ms: f64| ms * 1e6 / f64::from(CALLS);
        println!(
            "seccomp: {} BPF instructions (worst-case path {}); install p50 {:.3} ms; \
             syscall overhead p50 {:.0} ns per call ({:.0} ns bare, {:.0} ns filtered); \
             the floor (allow-all filter, cached) {:.0} ns per call: plan filter / floor = {:.2}x",
            plan.seccomp.program.len(),
            carapace_policy::max_path_len(&plan.seccomp.program)
                .map_or("?".to_string(), |n| n.to_string()),
            l.p50,
            per(f.p50 - b.p50),
            per(b.p50),
            per(f.p50),
            per(a.p50 - b.p50),
            (f.p50 - b.p50) / (a.p50 - b.p50).max(f64::MIN_POSITIVE)
        );
    }
    syscall_loop_floor(&filter, &allow_all, 5);
}

/// The syscall-heavy case: `dd if=/dev/zero of=/dev/null bs=1 count=N` (2N one-byte read and
/// write calls) bare, under the allow-all filter (the seccomp entry floor: every call answered
/// by the kernel's action cache) and under the plan's filter, each in a fresh child with
/// no_new_privs. When the plan filter costs what the floor costs, the cache applies to read and
/// write and the rest is the kernel's seccomp entry path.
fn syscall_loop_floor(
    plan_filter: &carapace_sandbox::seccomp::Prepared,
    allow_all: &carapace_sandbox::seccomp::Prepared,
    runs: usize,
) {
    use carapace_sandbox::seccomp;
    use std::ffi::CString;
    const COUNT: &str = "count=1000000";
    let argv: Vec<CString> = [
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=1",
        COUNT,
        "status=none",
    ]
    .iter()
    .filter_map(|a| CString::new(*a).ok())
    .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let dd = c"/usr/bin/dd";
    let run = |with: Option<&seccomp::Prepared>| -> Option<Duration> {
        let t0 = Instant::now();
        // SAFETY: this bench is single-threaded here; the child only makes syscalls, execs dd
        // or exits with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: prctl with integer arguments; execv with NUL-terminated strings and a
            // NULL-terminated argv that outlive the call; _exit on failure.
            unsafe {
                let mut ok = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
                if let Some(f) = with {
                    ok &= seccomp::child_install(f).is_ok();
                }
                if ok {
                    libc::execv(dd.as_ptr(), ptrs.as_ptr());
                }
                libc::_exit(127);
            }
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        (r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
            .then(|| t0.elapsed())
    };
    let (mut bare, mut floor, mut plan) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        match (run(None), run(Some(allow_all)), run(Some(plan_filter))) {
            (Some(b), Some(a), Some(p)) => {
                bare.push(b);
                floor.push(a);
                plan.push(p);
            }
            _ => {
                println!("syscall loop: dd failed in a measuring child");
                return;
            }
        }
    }
    if let (Some(b), Some(a), Some(p)) = (summarize(&bare), summarize(&floor), summarize(&plan)) {
        println!(
            "syscall loop (dd bs=1 {COUNT}, 2M read+write calls), p50 of {runs}: bare {:.1} ms, \
             allow-all filter (floor) {:.1} ms = {:.2}x, plan filter {:.1} ms = {:.2}x bare, \
             {:.2}x the floor",
            b.p50,
            a.p50,
            a.p50 / b.p50,
            p.p50,
            p.p50 / b.p50,
            p.p50 / a.p50
        );
    }
}

/// One command's wall time and CPU time (user + system of it and every descendant it waited
/// for, from `wait4`), or why it failed.
fn timed_run(cmd: &[String], cwd: &Path) -> Result<(Duration, Duration), String> {
    let (prog, args) = cmd.split_first().ok_or("empty command")?;
    let t0 = Instant::now();
    let child = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child into locals; std's Child is not waited on afterwards
    // (only its stderr pipe is read).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t0.elapsed();
    if r != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!("status {status:#x}: {}", err.trim()));
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok((wall, tv(ru.ru_utime) + tv(ru.ru_stime)))
}

/// The performance issue's figure, end to end: `dd if=/dev/zero of=/dev/null bs=1
/// count=2000000` (4 M one-byte read and write calls) bare, under bubblewrap (namespaces, no
/// seccomp) and under `carapace exec` (the default policy plus one rule that lets dd run in the
/// tool profile), interleaved in one run; wall and CPU p50 and the ratios to bare. The target
/// is carapace <= 1.05x bare. What seccomp costs for a call the kernel's action cache answers
/// is the floor printed by `seccomp_costs` (allow-all filter).
fn dd_loop_end_to_end(carapace: Option<&Path>, policy: &Path, workspace: &Path, runs: usize) {
    const COUNT: &str = "count=2000000";
    let dd = [
        "/usr/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=1",
        COUNT,
        "status=none",
    ];
    let dd: Vec<String> = dd.iter().map(|a| a.to_string()).collect();
    let mut variants: Vec<(&str, Vec<String>)> = vec![("bare", dd.clone())];
    // The seccomp floor: dd under a one-instruction allow-all filter (this bench re-executed
    // as a launcher), every call answered by the kernel's action cache.
    match std::env::current_exe() {
        Ok(me) => {
            let mut cmd = vec![me.to_string_lossy().to_string(), ALLOW_ALL_EXEC.to_string()];
            cmd.extend(dd.iter().cloned());
            variants.push(("seccomp floor", cmd));
        }
        Err(e) => println!("dd loop: current_exe: {e}; the seccomp floor is left out"),
    }
    match find_in_path("bwrap") {
        Some(b) => {
            let mut cmd: Vec<String> = [
                b.to_string_lossy().as_ref(),
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--unshare-all",
                "--die-with-parent",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            cmd.extend(dd.iter().cloned());
            variants.push(("bwrap", cmd));
        }
        None => println!("dd loop: bwrap not installed (apt-get install bubblewrap); left out"),
    }
    // The default policy with a first rule allowing dd in the tool profile.
    let dd_policy = workspace.join("dd-policy.toml");
    let text = match std::fs::read_to_string(policy) {
        Ok(t) => t,
        Err(e) => {
            println!("dd loop: {}: {e}", policy.display());
            return;
        }
    };
    let rule = "[[exec]]\nwhy = \"bench: the syscall loop\"\nprogram = \"/usr/bin/dd\"\n\
                profile = \"tool\"\napproval = \"allow\"\n\n";
    let Some(at) = text.find("\n[[exec]]") else {
        println!(
            "dd loop: {} has no [[exec]] rule to put dd before",
            policy.display()
        );
        return;
    };
    let text = format!("{}\n{rule}{}", &text[..at], &text[at + 1..]);
    if let Err(e) = std::fs::write(&dd_policy, text) {
        println!("dd loop: {}: {e}", dd_policy.display());
        return;
    }
    match carapace {
        Some(c) => {
            let mut cmd = vec![
                c.to_string_lossy().to_string(),
                "exec".to_string(),
                "--policy".to_string(),
                dd_policy.to_string_lossy().to_string(),
                "--".to_string(),
            ];
            // The same command with count=1: carapace's fixed cost (start, sandbox set-up and
            // teardown), to tell it from the per-call cost.
            let mut once = cmd.clone();
            once.extend(dd.iter().map(|a| {
                if a.starts_with("count=") {
                    "count=1".to_string()
                } else {
                    a.clone()
                }
            }));
            cmd.extend(dd.iter().cloned());
            variants.push(("carapace exec", cmd));
            variants.push(("carapace, count=1", once));
        }
        None => println!("dd loop: no carapace binary; left out"),
    }
    // Per variant: (wall, cpu) samples.
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = vec![(vec![], vec![]); variants.len()];
    for round in 0..=runs {
        for ((label, cmd), (wall, cpu)) in variants.iter().zip(samples.iter_mut()) {
            match timed_run(cmd, workspace) {
                // Round 0 warms the page cache and the binaries up; not recorded.
                Ok(_) if round == 0 => {}
                Ok((w, c)) => {
                    wall.push(w);
                    cpu.push(c);
                }
                Err(e) => {
                    println!("dd loop: {label} failed: {e}");
                    let _ = std::fs::remove_file(&dd_policy);
                    return;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&dd_policy);
    let p50 = |v: &[Duration]| summarize(v).map_or(f64::NAN, |s| s.p50);
    let (bare_wall, bare_cpu) = (p50(&samples[0].0), p50(&samples[0].1));
    println!(
        "syscall loop end to end (dd bs=1 {COUNT}: 4M read+write calls), p50 of {runs}, interleaved:"
    );
    for ((label, _), (wall, cpu)) in variants.iter().zip(&samples) {
        let (w, c) = (p50(wall), p50(cpu));
        // bwrap exits before its sandbox's init is reaped, so wait4 sees none of dd's CPU.
        let cpu = if *label == "bwrap" {
            "n/a (its sandbox's CPU is not reported to it)".to_string()
        } else {
            format!("{c:>8.1} ms ({:.3}x bare)", c / bare_cpu)
        };
        println!(
            "  {label:<18} wall {w:>8.1} ms ({:.3}x bare)   cpu {cpu}",
            w / bare_wall
        );
    }
    let wall_of = |l: &str| {
        variants
            .iter()
            .position(|(v, _)| *v == l)
            .map(|i| p50(&samples[i].0))
    };
    let cpu_of = |l: &str| {
        variants
            .iter()
            .position(|(v, _)| *v == l)
            .map(|i| p50(&samples[i].1))
    };
    if let Some(c) = wall_of("carapace exec") {
        let r = c / bare_wall;
        println!(
            "  carapace exec / bare (wall) = {r:.3} (target <= 1.05: {})",
            if r <= 1.05 { "met" } else { "MISSED" }
        );
        // CPU time is the steadier figure on a shared machine: other processes lengthen the
        // wall time, not the CPU a loop needs.
        let cpu = cpu_of("carapace exec").unwrap_or(f64::NAN);
        if let (Some(once), Some(once_cpu)) =
            (wall_of("carapace, count=1"), cpu_of("carapace, count=1"))
        {
            println!(
                "  without carapace's fixed cost ({once:.1} ms wall, {once_cpu:.1} ms cpu): \
                 {:.3}x bare wall, {:.3}x bare cpu",
                (c - once) / bare_wall,
                (cpu - once_cpu) / bare_cpu
            );
            if let (Some(f), Some(f_cpu)) = (wall_of("seccomp floor"), cpu_of("seccomp floor")) {
                println!(
                    "  seccomp floor / bare = {:.3} wall, {:.3} cpu; carapace exec without its \
                     fixed cost / floor = {:.3} wall, {:.3} cpu",
                    f / bare_wall,
                    f_cpu / bare_cpu,
                    (c - once) / f,
                    (cpu - once_cpu) / f_cpu
                );
            }
        }
    }
}

/// The argument that makes this bench a launcher for the seccomp floor: install a
/// one-instruction allow-all filter (no_new_privs first) and execute the rest of the command.
const ALLOW_ALL_EXEC: &str = "--allow-all-filter-exec";

/// The launcher (see [`ALLOW_ALL_EXEC`]); returns only on failure.
fn allow_all_exec(cmd: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let filter = match carapace_sandbox::seccomp::prepare(&[carapace_policy::plan::BpfInsn {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: carapace_policy::seccomp::RET_ALLOW,
    }]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(126);
        }
    };
    let Some((prog, args)) = cmd.split_first() else {
        eprintln!("{ALLOW_ALL_EXEC}: no command");
        return ExitCode::from(2);
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        eprintln!("no_new_privs: {}", std::io::Error::last_os_error());
        return ExitCode::from(126);
    }
    if let Err(errno) = carapace_sandbox::seccomp::child_install(&filter) {
        eprintln!("seccomp: {}", std::io::Error::from_raw_os_error(errno));
        return ExitCode::from(126);
    }
    let e = Command::new(prog).args(args).exec();
    eprintln!("{prog}: {e}");
    ExitCode::from(127)
}

/// In-process cost of the cgroup part of one run (the default profile's limits): create,
/// move a process in, kill_all, remove. Root only; the figures feed docs/benchmarks.md.
fn cgroup_costs(iters: usize) {
    use carapace_policy::plan::CgroupLimits;
    use carapace_sandbox::cgroup::{unique_name, Cgroup};
    if !nix::unistd::geteuid().is_root() {
        println!("cgroup costs: skipped (not root)");
        return;
    }
    let limits = CgroupLimits {
        memory_bytes: Some(512 << 20),
        pids: Some(128),
        cpu_millis: Some(1000),
    };
    let (mut create, mut add, mut kill, mut remove) = (vec![], vec![], vec![], vec![]);
    let mut dirs = 0;
    for _ in 0..iters {
        let t0 = Instant::now();
        let cg = match Cgroup::create(&unique_name("bench"), &limits) {
            Ok(cg) => cg,
            Err(e) => {
                println!("cgroup costs: create failed: {e}");
                return;
            }
        };
        let t1 = Instant::now();
        dirs = cg.dirs().len();
        // Measure the writes with a short-lived child: /bin/true, added while it runs or after
        // it exited (ESRCH is fine for a timing figure).
        let child = Command::new("/bin/true").spawn();
        let t2 = Instant::now();
        let _ = child
            .as_ref()
            .map(|c| cg.add_process(c.id() as libc::pid_t));
        let t3 = Instant::now();
        if let Ok(mut c) = child {
            let _ = c.wait();
        }
        let t4 = Instant::now();
        let k = cg.kill_all();
        let t5 = Instant::now();
        let r = cg.remove();
        let t6 = Instant::now();
        if let Err(e) = k.and(r) {
            println!("cgroup costs: {e}");
            return;
        }
        create.push(t1 - t0);
        add.push(t3 - t2);
        kill.push(t5 - t4);
        remove.push(t6 - t5);
    }
    let p = |v: &[Duration]| summarize(v).map_or(f64::NAN, |s| s.p50);
    println!(
        "cgroup costs (in-process, p50 ms, {dirs} hierarchies): create {:.3}, add_process {:.3}, \
         kill_all {:.3}, remove {:.3}",
        p(&create),
        p(&add),
        p(&kill),
        p(&remove)
    );
}

/// `struct clone_args` of clone3(2), as far as we use it.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// How long it takes from clone until a child is in all its cgroups, two ways:
/// (a) clone, then the parent writes the pid into each cgroup.procs (`add_process`);
/// (b) clone3(CLONE_INTO_CGROUP) into the v2 leaf + the child writing `0` to each v1 `tasks`
///     (`Cgroup::join_fds` / `join_self_v1`), which avoids the global migration lock.
/// A 30 ms pause between runs lets the kernel's rcu_sync state go idle, as it does between
/// separate `carapace exec` invocations.
fn attach_costs(iters: usize) {
    use carapace_policy::plan::CgroupLimits;
    use carapace_sandbox::cgroup::{join_self_v1, unique_name, Cgroup};
    use std::os::fd::AsRawFd as _;
    if !nix::unistd::geteuid().is_root() {
        println!("attach costs: skipped (not root)");
        return;
    }
    let limits = CgroupLimits {
        memory_bytes: Some(512 << 20),
        pids: Some(128),
        cpu_millis: Some(1000),
    };
    let mut parent_write = Vec::new();
    let mut born_in = Vec::new();
    for i in 0..2 * iters {
        std::thread::sleep(Duration::from_millis(30));
        let cg = match Cgroup::create(&unique_name("attach"), &limits) {
            Ok(cg) => cg,
            Err(e) => {
                println!("attach costs: {e}");
                return;
            }
        };
        let born = i % 2 == 1;
        let join = match cg.join_fds() {
            Ok(j) => j,
            Err(e) => {
                println!("attach costs: {e}");
                return;
            }
        };
        let v1 = join.v1_raw();
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            println!("attach costs: pipe2 failed");
            return;
        }
        let mut args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        if born {
            if let Some(d) = &join.v2_dir {
                args.flags |= CLONE_INTO_CGROUP;
                args.cgroup = d.as_raw_fd() as u64;
            }
        }
        let t0 = Instant::now();
        // SAFETY: clone3 without CLONE_VM behaves like fork (this bench is single-threaded);
        // the child runs only async-signal-safe code (write, read, _exit) on its own copy of
        // memory, and `v1` and `pipe` were set up before the clone.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: async-signal-safe syscalls on fds we own; the buffer is on our stack.
            unsafe {
                if born {
                    let ok = u8::from(join_self_v1(&v1).is_ok());
                    libc::write(pipe[1], (&ok as *const u8).cast(), 1);
                } else {
                    libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
                }
                libc::_exit(0);
            }
        }
        if pid < 0 {
            println!("attach costs: clone3: {}", std::io::Error::last_os_error());
            return;
        }
        let pid = pid as libc::pid_t;
        let mut ok = 1u8;
        if born {
            // SAFETY: reading one byte into a local from our pipe.
            unsafe { libc::read(pipe[0], (&mut ok as *mut u8).cast(), 1) };
        } else if let Err(e) = cg.add_process(pid) {
            println!("attach costs: {e}");
            ok = 0;
        }
        let took = t0.elapsed();
        // SAFETY: release the child (if waiting), close our pipe ends, reap our own child.
        unsafe {
            libc::write(pipe[1], (&ok as *const u8).cast(), 1);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        drop(join);
        let _ = cg.remove();
        if ok != 1 {
            println!("attach costs: the child did not join its cgroup");
            return;
        }
        if born {
            born_in.push(took);
        } else {
            parent_write.push(took);
        }
    }
    for (label, v) in [
        (
            "clone, then parent writes cgroup.procs (add_process)",
            &parent_write,
        ),
        (
            "clone3 INTO_CGROUP + child v1 self-join (join_fds)",
            &born_in,
        ),
    ] {
        if let Some(s) = summarize(v) {
            println!(
                "attach: {label:<50} p50 {:>7.3} ms  p90 {:>7.3} ms  max {:>7.3} ms",
                s.p50, s.p90, s.max
            );
        }
    }
}

/// A `carapace run` of the bench's own: `policy`, no children, its state and runtime
/// directories in a temporary directory; stopped (SIGTERM, then SIGKILL) when dropped.
struct Supervisor {
    child: std::process::Child,
    dir: PathBuf,
}

impl Supervisor {
    fn start(bin: &Path, policy: &Path) -> Result<Supervisor, String> {
        let dir = std::env::temp_dir().join(format!("carapace-bench-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The configuration takes normalized absolute paths only.
        let policy =
            std::fs::canonicalize(policy).map_err(|e| format!("{}: {e}", policy.display()))?;
        let config = dir.join("carapace.toml");
        std::fs::write(
            &config,
            format!(
                "[supervisor]\npolicy = [{:?}]\nstate_dir = {:?}\nruntime_dir = {:?}\n",
                policy.display().to_string(),
                dir.join("state").display().to_string(),
                dir.join("run").display().to_string(),
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.join("supervisor.log"))
            .map_err(|e| format!("supervisor.log: {e}"))?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} run: {e}", bin.display()))?;
        let sup = Supervisor { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sup.dir.join("run/exec.sock").exists() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(sup.dir.join("supervisor.log")).unwrap_or_default();
                return Err(format!(
                    "carapace run did not bind its exec socket in 20 s:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sup)
    }

    fn control_socket(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(ALLOW_ALL_EXEC) {
        return allow_all_exec(&args[2..]);
    }
    let iters: usize = match std::env::var("BENCH_ITERS") {
        Ok(s) => match s.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("BENCH_ITERS must be a positive integer, got {s:?}");
                return ExitCode::from(2);
            }
        },
        Err(_) => 200,
    };
    let policy = std::env::var_os("BENCH_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"));

    // The workspace of `carapace exec` defaults to the cwd: give it a small empty directory.
    let workspace = std::env::temp_dir().join(format!("carapace-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&workspace) {
        eprintln!("cannot create {}: {e}", workspace.display());
        return ExitCode::from(2);
    }

    let carapace = carapace_bin();
    let dd_runs: usize = match std::env::var("BENCH_DD_RUNS") {
        Ok(s) => match s.parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("BENCH_DD_RUNS must be a number, got {s:?}");
                return ExitCode::from(2);
            }
        },
        Err(_) => 5,
    };
    if std::env::var_os("BENCH_DD_ONLY").is_some_and(|v| v == "1") {
        let bin = carapace.as_ref().ok().filter(|b| b.is_file());
        dd_loop_end_to_end(
            bin.map(PathBuf::as_path),
            &policy,
            &workspace,
            dd_runs.max(1),
        );
        let _ = std::fs::remove_dir(&workspace);
        return ExitCode::SUCCESS;
    }

    let floor_label = "kernel floor: 6 namespaces + exec";
    let mut floor = Variant::new(floor_label, &["/bin/true"]);
    floor.floor = true;
    let mut variants = vec![
        Variant::new("bare fork+exec /bin/true", &["/bin/true"]),
        floor,
    ];
    let carapace_label = "carapace exec -- /bin/true";
    let via_label = "... via a running supervisor";
    let check_label = "carapace policy check default";
    // Stopped (and its files removed) when dropped, at the end of main.
    let mut supervisor = None;
    match &carapace {
        Ok(bin) if bin.is_file() => {
            let b = bin.to_string_lossy().to_string();
            let mut v = Variant::new(
                carapace_label,
                &[&b, "exec", "--via", "local", "--", "/bin/true"],
            );
            v.cwd = Some(workspace.clone());
            variants.push(v);
            match Supervisor::start(bin, &policy) {
                Ok(sup) => {
                    let mut v = Variant::new(
                        via_label,
                        &[&b, "exec", "--via", "supervisor", "--", "/bin/true"],
                    );
                    v.cwd = Some(workspace.clone());
                    v.env = vec![("CARAPACE_CONTROL_SOCKET".to_string(), sup.control_socket())];
                    sanity_check(&mut v);
                    variants.push(v);
                    supervisor = Some(sup);
                }
                Err(why) => variants.push(Variant::unavailable(via_label, why)),
            }
            let p = policy.to_string_lossy().to_string();
            variants.push(Variant::new(check_label, &[&b, "policy", "check", &p]));
        }
        Ok(bin) => {
            let why = format!(
                "{} not found (build it: cargo build --release -p carapace, or set CARAPACE_BIN)",
                bin.display()
            );
            variants.push(Variant::unavailable(carapace_label, why.clone()));
            variants.push(Variant::unavailable(check_label, why));
        }
        Err(e) => {
            variants.push(Variant::unavailable(carapace_label, e.clone()));
            variants.push(Variant::unavailable(check_label, e.clone()));
        }
    }
    // Optional A/B: another carapace build (e.g. before a change), timed in the same run.
    let baseline_label = "baseline: carapace exec";
    if let Some(b) = std::env::var_os("CARAPACE_BIN_BASELINE") {
        let b = b.to_string_lossy().to_string();
        let mut v = Variant::new(baseline_label, &[&b, "exec", "--", "/bin/true"]);
        v.cwd = Some(workspace.clone());
        sanity_check(&mut v);
        variants.push(v);
    }
    let bwrap_label = "bwrap --unshare-all /bin/true";
    match find_in_path("bwrap") {
        Some(b) => {
            let b = b.to_string_lossy().to_string();
            variants.push(Variant::new(
                bwrap_label,
                &[
                    &b,
                    "--ro-bind",
                    "/",
                    "/",
                    "--unshare-all",
                    "--die-with-parent",
                    "/bin/true",
                ],
            ));
        }
        None => variants.push(Variant::unavailable(
            bwrap_label,
            "bwrap not installed (apt-get install bubblewrap)".to_string(),
        )),
    }

    // `policy check` of a missing file must fail, or the command does not check anything.
    if let Some(v) = variants
        .iter_mut()
        .find(|v| v.label == check_label && v.disabled.is_none())
    {
        let missing = workspace.join("no-such-policy.toml");
        let probe = v.cmd.first().map(|b| {
            Command::new(b)
                .args(["policy", "check"])
                .arg(&missing)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
        });
        if let Some(Ok(st)) = probe {
            if st.success() {
                let why = "`carapace policy check` of a missing file succeeded: it checks nothing";
                v.disabled = Some(why.to_string());
                v.failures += 1;
                v.first_failure = Some(why.to_string());
            }
        }
    }
    // A carapace that "succeeds" without running anything (e.g. a stub) must not be timed.
    if let Some(v) = variants
        .iter_mut()
        .find(|v| v.label == carapace_label && v.disabled.is_none())
    {
        sanity_check(v);
    }

    println!(
        "exec_latency: {iters} runs per variant (+{WARMUP} warm-up), interleaved; kernel {}, {} CPUs",
        kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for i in 0..WARMUP + iters {
        for v in &mut variants {
            v.step(i >= WARMUP);
        }
    }

    println!();
    println!(
        "{:<32} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "variant (ms)", "n", "min", "p50", "p90", "p99", "max", "mean"
    );
    let mut p50 = std::collections::HashMap::new();
    for v in &variants {
        match summarize(&v.samples) {
            Some(s) => {
                p50.insert(v.label.clone(), s.p50);
                println!(
                    "{:<32} {:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                    v.label,
                    v.samples.len(),
                    s.min,
                    s.p50,
                    s.p90,
                    s.p99,
                    s.max,
                    s.mean
                );
            }
            None => println!(
                "{:<32} {:>5} {}",
                v.label,
                0,
                v.disabled.as_deref().unwrap_or("no successful run")
            ),
        }
    }
    println!();
    let mut ok = true;
    for v in &variants {
        if let Some(f) = &v.first_failure {
            ok = false;
            println!(
                "FAILED {}: {} of {} runs failed; first: {f}",
                v.label,
                v.failures,
                v.failures + v.samples.len()
            );
        }
    }
    let get = |l: &str| p50.get(l).copied();
    match (get(carapace_label), get("bare fork+exec /bin/true")) {
        (Some(c), Some(b)) => println!("ratio p50 carapace/bare  = {:.2}", c / b),
        _ => println!("ratio p50 carapace/bare  = n/a"),
    }
    for (label, name) in [(carapace_label, "carapace"), (via_label, "via supervisor")] {
        match (get(label), get(bwrap_label)) {
            (Some(c), Some(b)) => {
                let r = c / b;
                println!(
                    "ratio p50 {name}/bwrap = {r:.2} (target <= 1.00: {}; aim 0.50)",
                    if r <= 1.0 { "met" } else { "MISSED" }
                );
            }
            _ => println!("ratio p50 {name}/bwrap = n/a"),
        }
    }
    if let (Some(f), Some(b)) = (get(floor_label), get(bwrap_label)) {
        println!(
            "kernel floor (clone with 6 new namespaces, exec, wait) p50 = {f:.3} ms: bwrap = \
             {:.2} x, carapace = {}, via supervisor = {}",
            b / f,
            get(carapace_label).map_or("n/a".to_string(), |c| format!("{:.2} x", c / f)),
            get(via_label).map_or("n/a".to_string(), |c| format!("{:.2} x", c / f)),
        );
    }
    if let (Some(c), Some(b)) = (get(carapace_label), get(baseline_label)) {
        println!("ratio p50 carapace/baseline = {:.2}", c / b);
    }
    if let Some(c) = get(check_label) {
        println!(
            "policy check (whole command, p50) = {c:.3} ms (target for load+compile < 5 ms: {})",
            if c < 5.0 { "met" } else { "MISSED" }
        );
    }
    policy_costs(&policy, iters);
    seccomp_costs(&policy, iters.min(100));
    if dd_runs > 0 {
        let bin = carapace.as_ref().ok().filter(|b| b.is_file());
        dd_loop_end_to_end(bin.map(PathBuf::as_path), &policy, &workspace, dd_runs);
    }
    let _ = std::fs::remove_dir(&workspace);
    drop(supervisor);
    cgroup_costs(iters);
    attach_costs(iters.min(40));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
