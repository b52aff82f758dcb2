//! Parse + validate + compile of the default policy (what `carapace exec` does before every
//! run), timed with std::time over 1000 runs: prints p50/p99/max. Target: p50 under 5 ms.
//!
//! Run: `cargo bench -p carapace-policy --bench compile`

use std::time::{Duration, Instant};

use carapace_policy::{max_path_len, run_bpf_counted, Policy, Target};

const DEFAULT: &str = include_str!("../../policies/default.toml");
const RUNS: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let target = Target { landlock_abi: 6 };
    let mut total = Vec::with_capacity(RUNS);
    let mut parse_only = Vec::with_capacity(RUNS);
    let mut program = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let policy = match Policy::parse(DEFAULT, "policies/default.toml") {
            Ok(p) => p,
            Err(d) => {
                eprintln!("default policy invalid:\n{d}");
                std::process::exit(1);
            }
        };
        let t1 = Instant::now();
        let plan = match policy.compile("tool", &target) {
            Ok(p) => p,
            Err(d) => {
                eprintln!("default policy does not compile:\n{d}");
                std::process::exit(1);
            }
        };
        let t2 = Instant::now();
        program.clone_from(&plan.seccomp.program);
        std::hint::black_box(&plan);
        parse_only.push(t1 - t0);
        total.push(t2 - t0);
    }
    total.sort();
    parse_only.sort();
    println!("policy load+compile of policies/default.toml, profile `tool`, {RUNS} runs");
    println!(
        "  parse+validate:          p50 {:>9.3?}  p99 {:>9.3?}",
        percentile(&parse_only, 0.5),
        percentile(&parse_only, 0.99)
    );
    println!(
        "  parse+validate+compile:  p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
        percentile(&total, 0.5),
        percentile(&total, 0.99),
        total[total.len() - 1]
    );
    // Path lengths through the filter: the worst case over all paths, and what syscalls
    // 0..=470 with zero arguments actually execute (the interpreter counts instructions).
    let steps: Vec<usize> = (0..=470)
        .filter_map(|nr| run_bpf_counted(&program, nr, 0xc000_003e, [0; 6]).map(|(_, n)| n))
        .collect();
    let mean = steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64;
    println!(
        "  seccomp program: {} instructions; worst-case path {} instructions; syscalls 0..=470: max {}, mean {mean:.1}",
        program.len(),
        max_path_len(&program).map_or("malformed".to_string(), |n| n.to_string()),
        steps.iter().max().copied().unwrap_or(0),
    );
    let p50 = percentile(&total, 0.5);
    println!(
        "  target p50 < 5 ms: {}",
        if p50 < Duration::from_millis(5) {
            "met"
        } else {
            "MISSED"
        }
    );
}
