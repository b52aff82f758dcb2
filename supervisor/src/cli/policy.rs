//! `carapace policy check` and `carapace policy explain`.

use super::*;

pub(super) fn check(files: &[PathBuf]) -> i32 {
    let mut failed = false;
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", f.display());
                failed = true;
                continue;
            }
        };
        let name = f.display().to_string();
        let policy = match Policy::parse(&text, &name) {
            Ok(p) => p,
            Err(d) => {
                eprintln!("{d}");
                failed = true;
                continue;
            }
        };
        // Compile every profile, for the best kernel: errors here are the policy's, not the
        // kernel's. This kernel's shortcomings are reported as notes.
        let mut bad = false;
        let here = carapace_sandbox::landlock::target();
        for profile in policy.profile_names() {
            if let Err(d) = policy.compile(
                profile,
                &Target {
                    landlock_abi: u8::MAX,
                },
            ) {
                eprintln!("{d}");
                bad = true;
            } else if let Err(d) = policy.compile(profile, &here) {
                eprintln!("{name}: note: profile `{profile}` cannot run on this kernel:\n{d}");
            }
        }
        let outcomes = policy.run_tests_with(|p| std::fs::canonicalize(p).ok());
        let mut passed = 0;
        for t in &outcomes {
            if t.passed {
                passed += 1;
                continue;
            }
            bad = true;
            eprintln!(
                "{name}:{}: test failed: {:?} expected {}, got {} ({}{})",
                t.line,
                t.command,
                t.expected,
                t.got.approval,
                t.got.rule.as_ref().map_or_else(
                    || "no rule matched".to_string(),
                    |r| format!("rule [[exec]] #{} at line {}", r.index + 1, r.line)
                ),
                t.got
                    .profile
                    .as_ref()
                    .map_or_else(String::new, |p| format!(", profile {p}"))
            );
        }
        if bad {
            failed = true;
            continue;
        }
        let n = policy.profile_names().len();
        let m = policy.rule_count();
        if files.len() == 1 {
            println!("ok: {n} profiles, {m} rules, {passed} tests passed");
        } else {
            println!("ok: {n} profiles, {m} rules, {passed} tests passed ({name})");
        }
    }
    i32::from(failed)
}

pub(super) fn explain(file: Option<PathBuf>, command: &[OsString]) -> i32 {
    let policy = match load_policy(file.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            return 1;
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let target = carapace_sandbox::landlock::target();
    // As `carapace exec` without --workspace: the current directory is the workspace.
    let workspace = std::fs::canonicalize(&cwd).ok();
    let d = match decide(&policy, command, &cwd, workspace.as_deref(), &target) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("carapace: {}", error_chain(&e));
            return 1;
        }
    };
    let name = command.first().map_or(OsStr::new(""), |s| s.as_os_str());
    println!(
        "program: {} (resolved from `{}`)",
        d.program.display(),
        name.to_string_lossy()
    );
    println!("policy: {}", policy.file());
    print!("{}", d.decision.explain());
    if let Some(e) = d.compile_error {
        println!("\nthis profile cannot run on this kernel:\n{e}");
        return 1;
    }
    if let Some(plan) = d.plan {
        println!(
            "\nconfinement (compiled for this kernel: Landlock ABI {}):",
            target.landlock_abi
        );
        print!("{}", plan.explain());
        // What the child may ask the broker for is part of its confinement too.
        println!();
        print!("{}", policy.explain_broker(&plan.profile));
    }
    0
}

/// What `policy groups` says after the list: the names are carapace's, not systemd's.
pub(super) const NOT_SYSTEMD: &str = "These are carapace's groups. systemd's SystemCallFilter= \
     has sets with some of the same names (@default, @process, @signal, @ipc, ...) that hold \
     different syscalls: do not read one as the other.";

/// `carapace policy groups [NAME] [--json]`: exit 0, or 1 for a group that does not exist.
pub(super) fn groups(name: Option<&str>, json: bool) -> i32 {
    use carapace_policy::tables::{ALWAYS_CONDITIONED, GROUPS};
    let as_json = |g: &carapace_policy::tables::Group| serde_json::json!({"name": g.name, "why": g.why, "syscalls": g.syscalls});
    let Some(name) = name else {
        if json {
            let all: Vec<serde_json::Value> = GROUPS.iter().map(as_json).collect();
            println!("{}", serde_json::Value::Array(all));
        } else {
            for g in GROUPS {
                println!("{:<15} {:>3} syscalls  {}", g.name, g.syscalls.len(), g.why);
            }
            println!("\n{NOT_SYSTEMD}\n`carapace policy groups NAME` lists a group's syscalls.");
        }
        return 0;
    };
    let want = if name.starts_with('@') {
        name.to_string()
    } else {
        format!("@{name}")
    };
    let Some(g) = GROUPS.iter().find(|g| g.name == want) else {
        let names: Vec<&str> = GROUPS.iter().map(|g| g.name).collect();
        let hint = carapace_policy::toml_schema::did_you_mean(&want, &names)
            .map(|m| format!(" (did you mean {m}?)"))
            .unwrap_or_default();
        eprintln!(
            "carapace: no syscall group {want}{hint}; the groups are {}",
            names.join(", ")
        );
        return 1;
    };
    if json {
        println!("{}", as_json(g));
        return 0;
    }
    println!("{}: {}\n", g.name, g.why);
    for sc in g.syscalls {
        let note = if ALWAYS_CONDITIONED.contains(sc) {
            "  (always filtered by its arguments, see docs/policy.md)"
        } else {
            ""
        };
        println!("  {sc}{note}");
    }
    println!("\n{NOT_SYSTEMD}");
    0
}
