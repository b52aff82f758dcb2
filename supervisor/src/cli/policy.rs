//! `carapace policy check`, `carapace policy explain` and `carapace policy groups`.

use super::*;

/// What `policy check` found in one file.
#[derive(Debug, Default)]
struct Checked {
    /// The file could not be read.
    unreadable: Option<String>,
    /// Parse and compile errors (the policy's, not this kernel's).
    errors: Vec<carapace_policy::Diagnostic>,
    /// What keeps a profile from running on this kernel (not an error of the policy).
    notes: Vec<String>,
    /// The [[test]] examples that failed: (line, command, expected, got).
    failed_tests: Vec<(usize, Vec<String>, String, String)>,
    profiles: usize,
    rules: usize,
    tests_passed: usize,
}

impl Checked {
    fn ok(&self) -> bool {
        self.unreadable.is_none() && self.errors.is_empty() && self.failed_tests.is_empty()
    }
}

fn check_one(f: &Path) -> Checked {
    let mut c = Checked::default();
    let text = match std::fs::read_to_string(f) {
        Ok(t) => t,
        Err(e) => {
            c.unreadable = Some(format!("{}: cannot read: {e}", f.display()));
            return c;
        }
    };
    let name = f.display().to_string();
    let policy = match Policy::parse(&text, &name) {
        Ok(p) => p,
        Err(d) => {
            c.errors = d.0;
            return c;
        }
    };
    // Compile every profile, for the best kernel: errors here are the policy's, not the
    // kernel's. This kernel's shortcomings are reported as notes.
    let here = carapace_sandbox::landlock::target();
    for profile in policy.profile_names() {
        if let Err(d) = policy.compile(
            profile,
            &Target {
                landlock_abi: u8::MAX,
            },
        ) {
            c.errors.extend(d.0);
        } else if let Err(d) = policy.compile(profile, &here) {
            c.notes.push(format!(
                "{name}: note: profile `{profile}` cannot run on this kernel:\n{d}"
            ));
        }
    }
    for t in policy.run_tests_with(|p| std::fs::canonicalize(p).ok()) {
        if t.passed {
            c.tests_passed += 1;
            continue;
        }
        let got = format!(
            "{} ({}{})",
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
        c.failed_tests
            .push((t.line, t.command.clone(), t.expected.to_string(), got));
    }
    c.profiles = policy.profile_names().len();
    c.rules = policy.rule_count();
    c
}

pub(super) fn check(files: &[PathBuf], json: bool) -> i32 {
    let colour = crate::errors::stderr_wants_colour();
    let mut failed = false;
    for f in files {
        let c = check_one(f);
        failed |= !c.ok();
        let name = f.display().to_string();
        if json {
            let v = serde_json::json!({
                "file": name,
                "ok": c.ok(),
                "profiles": c.profiles,
                "rules": c.rules,
                "tests_passed": c.tests_passed,
                "unreadable": c.unreadable,
                "errors": c.errors.iter().map(carapace_policy::Diagnostic::to_json).collect::<Vec<_>>(),
                "notes": c.notes,
                "failed_tests": c.failed_tests.iter().map(|(line, command, expected, got)| {
                    serde_json::json!({
                        "line": line, "command": command, "expected": expected, "got": got,
                    })
                }).collect::<Vec<_>>(),
            });
            println!("{v}");
            continue;
        }
        if let Some(e) = &c.unreadable {
            eprintln!("{e}");
        }
        for d in &c.errors {
            eprintln!("{}\n", d.render(colour));
        }
        for n in &c.notes {
            eprintln!("{n}");
        }
        for (line, command, expected, got) in &c.failed_tests {
            eprintln!("{name}:{line}: test failed: {command:?} expected {expected}, got {got}");
        }
        if c.ok() {
            let (n, m, passed) = (c.profiles, c.rules, c.tests_passed);
            if files.len() == 1 {
                println!("ok: {n} profiles, {m} rules, {passed} tests passed");
            } else {
                println!("ok: {n} profiles, {m} rules, {passed} tests passed ({name})");
            }
        }
    }
    i32::from(failed)
}

pub(super) fn explain(file: Option<PathBuf>, command: &[OsString], json: bool) -> i32 {
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
    if json {
        let v = serde_json::json!({
            "program": d.program,
            "policy": policy.file(),
            "decision": {
                "approval": d.decision.approval.to_string(),
                "profile": d.decision.profile,
                "rule": d.decision.rule.as_ref().map(|r| serde_json::json!({
                    "index": r.index, "line": r.line, "why": r.why,
                })),
            },
            "plan": d.plan,
            "compile_error": d.compile_error.as_ref().map(ToString::to_string),
        });
        println!("{v}");
        return i32::from(d.compile_error.is_some());
    }
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
