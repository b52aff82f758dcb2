//! `cargo run -p carapace-policy --example explain -- FILE [PROFILE [ABI]]`: validate a policy,
//! run its examples and print the compiled profile in plain words (a development aid; the real
//! command is `carapace policy explain`).

use carapace_policy::{Policy, Target};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.first() else {
        eprintln!("usage: explain FILE [PROFILE [ABI]]");
        return std::process::ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{file}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let policy = match Policy::parse(&text, file) {
        Ok(p) => p,
        Err(d) => {
            eprintln!("{d}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for t in policy.run_tests() {
        if !t.passed {
            println!(
                "example at line {} FAILED: {:?} got {:?}",
                t.line, t.command, t.got
            );
        }
    }
    let profile = args.get(1).map_or("tool", String::as_str);
    let abi = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(6);
    match policy.compile(profile, &Target { landlock_abi: abi }) {
        Ok(plan) => {
            print!("{}", plan.explain());
            std::process::ExitCode::SUCCESS
        }
        Err(d) => {
            eprintln!("{d}");
            std::process::ExitCode::FAILURE
        }
    }
}
