//! Entry point for the fuzz target (`fuzz/fuzz_targets/policy.rs`) and the corpus replay test.

use crate::plan::{Plan, SeccompAction};
use crate::seccomp::{ret_value, run_bpf, AUDIT_ARCH_X86_64, RET_KILL_PROCESS};
use crate::{ExecRequest, Policy, Target};

/// Parse `data` as a policy; for every profile compile for Landlock ABI 1..=7, explain, check the
/// seccomp guard with the BPF interpreter; evaluate a few requests; run the policy's tests.
/// Must never panic; the asserts are invariants of the engine, not of the input.
pub fn policy_roundtrip(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut policy = match Policy::parse(text, "fuzz.toml") {
        Ok(p) => p,
        Err(d) => {
            // Rendering must not panic either.
            let _ = d.to_string();
            return;
        }
    };
    policy.canonicalize_programs(|p| Some(p.to_path_buf()));
    let names: Vec<String> = policy
        .profile_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in &names {
        // The broker's view of the profile: explain it and run each matcher on odd inputs.
        let _ = policy.explain_broker(name);
        if let Some(rules) = policy.broker_view(name) {
            for host in ["", "a.example.com", "*", "127.0.0.1", "::1", "\u{0}.."] {
                let _ = rules.connect_allowed(host, 443);
            }
            for path in ["/", "/a/../b", "/srv/data/x", "relative", "/x\u{0}y"] {
                for access in [
                    crate::broker::OpenAccess::Read,
                    crate::broker::OpenAccess::Write,
                    crate::broker::OpenAccess::Create,
                ] {
                    let _ = rules.open_allowed(std::path::Path::new(path), access);
                }
            }
            for c in &rules.channels {
                let _ = c.recipient_allowed("alice@example.com");
                let _ = c.blocked_by("password: hunter2");
            }
        }
        if let Ok(plan) = policy.compile(name, &Target { landlock_abi: 7 }) {
            check_filter_matches_plan(
                &plan,
                &[
                    [0; 6],
                    [1, 0x5401, 0, 0, 0, 0],
                    [u64::MAX; 6],
                    [0, 0o4755, 0o2755, 0o6755, 0, 0],
                    // set*id keeping the ids; FIFO / set-id FIFO / device modes
                    [0xffff_ffff, 1000, 0xffff_ffff, 0, 0, 0],
                    [0, 0o010644, 0o014644, 0o020600, 0, 0],
                ],
            );
        }
        for abi in 0..=7u8 {
            match policy.compile(name, &Target { landlock_abi: abi }) {
                Ok(plan) => {
                    let _ = plan.explain();
                    let prog = &plan.seccomp.program;
                    assert!(prog.len() <= 4096);
                    // Foreign architecture and x32 are always killed.
                    assert_eq!(
                        run_bpf(prog, 0, 0x4000_0003, [0; 6]),
                        Some(RET_KILL_PROCESS)
                    );
                    assert_eq!(
                        run_bpf(prog, 0x4000_0000, AUDIT_ARCH_X86_64, [0; 6]),
                        Some(RET_KILL_PROCESS)
                    );
                    // Every syscall gets a verdict; the default action for unknown numbers.
                    let unknown = run_bpf(prog, 999, AUDIT_ARCH_X86_64, [0; 6]);
                    assert_eq!(unknown, Some(ret_value(plan.seccomp.default_action)));
                    // clone3 never silently allowed unless explicitly allowed.
                    if !plan.seccomp.allowed.iter().any(|s| s == "clone3") {
                        let r = run_bpf(prog, 435, AUDIT_ARCH_X86_64, [0; 6]);
                        assert_ne!(r, Some(ret_value(SeccompAction::Allow)));
                    }
                }
                Err(d) => {
                    let _ = d.to_string();
                }
            }
        }
    }
    for (prog, args, workspace) in [
        ("/usr/bin/ls", vec!["-la"], None),
        ("/usr/bin/git", vec!["status"], None),
        ("/", vec![], None),
        ("/usr/bin/x", vec!["**", "a", ""], None),
        ("/w/t", vec![], Some("/w")),
        ("/w", vec![], Some("/w")),
        ("/w/sub/configure", vec!["--prefix=/x"], Some("/w/")),
    ] {
        let d = policy.evaluate(&ExecRequest {
            program: prog.into(),
            args: args.into_iter().map(String::from).collect(),
            workspace: workspace.map(Into::into),
        });
        let _ = d.explain();
    }
    let _ = policy.run_tests();
}

/// The filter allows exactly what the plan says: every syscall listed in `allowed` is allowed
/// for any arguments; a conditional one gets `then` exactly when its condition holds and
/// `otherwise` when not; a syscall not listed gets the default action; a denied one gets its own
/// action. (So `explain`, which prints these lists, cannot overstate the filter.) Every known
/// syscall and every number 0..=470, plus numbers around the x32 bit and foreign architectures,
/// are compared with [`reference_verdict`] for each of `arg_sets`.
pub fn check_filter_matches_plan(plan: &Plan, arg_sets: &[[u64; 6]]) {
    let sc = &plan.seccomp;
    let allow = ret_value(SeccompAction::Allow);
    for (name, nr) in crate::tables::all_syscalls() {
        let Ok(nr) = i32::try_from(nr) else { continue };
        let denied = sc.denied.iter().find(|(n, _)| n == name);
        let allowed = sc.allowed.iter().any(|n| n == name);
        let conditional = sc.conditional.iter().find(|c| c.syscall == name);
        for args in arg_sets {
            let got = run_bpf(&sc.program, nr, AUDIT_ARCH_X86_64, *args);
            match (denied, allowed, conditional) {
                (Some((_, action)), _, _) => assert_eq!(got, Some(ret_value(*action)), "{name}"),
                (None, true, _) => assert_eq!(got, Some(allow), "{name} listed as allowed"),
                (None, false, Some(c)) => {
                    let want = if c.when.holds(args) {
                        c.then
                    } else {
                        c.otherwise
                    };
                    assert_eq!(got, Some(ret_value(want)), "{name} {args:x?}");
                }
                (None, false, None) => assert_eq!(
                    got,
                    Some(ret_value(sc.default_action)),
                    "{name} is not listed but gets a different verdict"
                ),
            }
        }
    }
    let mut numbers: Vec<i32> = (0..=470).collect();
    numbers.extend([
        471,
        1000,
        0x3fff_ffff,
        0x4000_0000,
        0x4000_0001,
        0x4000_0000 | 59,
        0x4000_0000 | 435,
        0x7fff_ffff,
        -1,
        i32::MIN,
    ]);
    for arch in [AUDIT_ARCH_X86_64, 0x4000_0003, 0xc000_00b7, 0, 0x8000_003e] {
        for &nr in &numbers {
            // Foreign architectures: a sample of numbers is enough (the guard comes first).
            if arch != AUDIT_ARCH_X86_64 && nr > 3 && nr < 0x3fff_ffff && nr % 37 != 0 {
                continue;
            }
            for args in arg_sets {
                assert_eq!(
                    run_bpf(&sc.program, nr, arch, *args),
                    Some(reference_verdict(plan, nr, arch, args)),
                    "nr {nr:#x} arch {arch:#x} args {args:x?}"
                );
            }
        }
    }
}

/// What the plan says the filter returns, evaluated straight from its lists (no BPF): the
/// arch/x32 guard, then the denied, allowed and conditional lists, then the default action.
pub fn reference_verdict(plan: &Plan, nr: i32, arch: u32, args: &[u64; 6]) -> u32 {
    let sc = &plan.seccomp;
    if arch != AUDIT_ARCH_X86_64 || nr as u32 >= 0x4000_0000 {
        return RET_KILL_PROCESS;
    }
    let Some((name, _)) = crate::tables::all_syscalls().find(|(_, n)| *n == i64::from(nr)) else {
        return ret_value(sc.default_action);
    };
    if let Some((_, a)) = sc.denied.iter().find(|(n, _)| n == name) {
        return ret_value(*a);
    }
    if sc.allowed.iter().any(|n| n == name) {
        return ret_value(SeccompAction::Allow);
    }
    if let Some(c) = sc.conditional.iter().find(|c| c.syscall == name) {
        return ret_value(if c.when.holds(args) {
            c.then
        } else {
            c.otherwise
        });
    }
    ret_value(sc.default_action)
}
