//! The shipped default policy parses, compiles for every Landlock ABI it accepts, explains
//! itself, and its own [[test]] examples pass.

use carapace_policy::{Approval, ExecRequest, Policy, Target};
use std::collections::BTreeSet;

const DEFAULT: &str = include_str!("../../policies/default.toml");

fn policy() -> Policy {
    match Policy::parse(DEFAULT, "policies/default.toml") {
        Ok(p) => p,
        Err(d) => panic!("default policy invalid:\n{d}"),
    }
}

#[test]
fn default_policy_parses_and_its_examples_pass() {
    let p = policy();
    let outcomes = p.run_tests();
    assert!(outcomes.len() >= 10, "too few examples: {}", outcomes.len());
    for o in &outcomes {
        assert!(o.passed, "example at line {} failed: {:?}", o.line, o);
    }
    for kind in [Approval::Allow, Approval::Ask, Approval::Deny] {
        assert!(
            outcomes.iter().any(|o| o.expected == kind),
            "no example expecting {kind}"
        );
    }
}

#[test]
fn default_policy_compiles_for_abi_3_to_7_and_refuses_below() {
    let p = policy();
    for abi in 3..=7 {
        let plan = p
            .compile("tool", &Target { landlock_abi: abi })
            .unwrap_or_else(|d| panic!("abi {abi}: {d}"));
        assert_eq!(plan.landlock.deny_tcp, abi >= 4);
        assert_eq!(plan.landlock.scope_signals, abi >= 6);
        let text = plan.explain();
        assert!(text.contains("/workspace"), "{text}");
    }
    for abi in 0..3 {
        let err = p
            .compile("tool", &Target { landlock_abi: abi })
            .unwrap_err();
        assert!(err.to_string().contains("Landlock ABI 3"), "{err}");
    }
}

#[test]
fn default_policy_rules() {
    let mut p = policy();
    p.canonicalize_programs(|path| std::fs::canonicalize(path).ok());
    let req = |prog: &str, args: &[&str]| ExecRequest {
        program: prog.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        workspace: None,
    };
    let d = p.evaluate(&req("/usr/bin/ls", &["-la"]));
    assert_eq!(d.approval, Approval::Allow);
    assert_eq!(d.profile.as_deref(), Some("tool"));
    assert!(d.rule.is_some());
    assert_eq!(
        p.evaluate(&req("/usr/bin/env", &["sh"])).approval,
        Approval::Ask
    );
    assert_eq!(
        p.evaluate(&req("/usr/bin/git", &["push"])).approval,
        Approval::Ask
    );
    assert_eq!(
        p.evaluate(&req("/usr/bin/git", &["status"])).approval,
        Approval::Allow
    );
    // Relative programs never match (the supervisor always resolves first).
    let d = p.evaluate(&req("ls", &[]));
    assert_eq!(d.approval, Approval::Deny);
    assert!(d.rule.is_none());
}

/// The kernel's seccomp action cache answers every syscall a profile allows whatever its
/// arguments, without running the filter: the filter's path to `RET ALLOW` for those loads only
/// the syscall number and the architecture. A syscall whose verdict depends on its arguments,
/// and a refused one, are never cached (they run the filter), which is what the cache is for.
#[test]
fn the_kernel_caches_every_syscall_a_profile_allows_unconditionally() {
    use carapace_policy::kernel_caches_allow;
    use carapace_policy::plan::SeccompAction;
    use carapace_policy::tables::syscall_nr;
    let p = policy();
    for profile in p.profile_names() {
        let plan = p
            .compile(profile, &Target { landlock_abi: 7 })
            .unwrap_or_else(|d| panic!("{profile}: {d}"));
        let sc = &plan.seccomp;
        let nr = |name: &str| -> u32 {
            let n = syscall_nr(name).unwrap_or_else(|| panic!("{name}: no number"));
            u32::try_from(n).unwrap()
        };
        assert!(!sc.allowed.is_empty(), "{profile}: allows nothing");
        for name in &sc.allowed {
            assert!(
                kernel_caches_allow(&sc.program, nr(name)),
                "{profile}: {name} is allowed unconditionally but the cache cannot answer it"
            );
        }
        for c in &sc.conditional {
            assert!(
                !kernel_caches_allow(&sc.program, nr(&c.syscall)),
                "{profile}: {} depends on its arguments but would be cached",
                c.syscall
            );
        }
        for (name, _) in &sc.denied {
            assert!(
                !kernel_caches_allow(&sc.program, nr(name)),
                "{profile}: {name} is refused but would be cached"
            );
        }
        if !matches!(sc.default_action, SeccompAction::Allow) {
            // A number the profile does not know falls to the default action, which is no
            // allow here: never cached.
            assert!(
                !kernel_caches_allow(&sc.program, 1000),
                "{profile}: nr 1000"
            );
        }
        // dd's loop: 1-byte read and write, each answered by the cache.
        for name in ["read", "write"] {
            assert!(
                kernel_caches_allow(&sc.program, nr(name)),
                "{profile}: {name} runs the filter on every call"
            );
        }
        // Exactly: over every x86_64 syscall the kernel knows, the cached ones are the ones
        // the profile allows whatever their arguments (plus every unlisted one when the
        // profile's default is allow).
        let listed: BTreeSet<&str> = sc
            .allowed
            .iter()
            .map(String::as_str)
            .chain(sc.conditional.iter().map(|c| c.syscall.as_str()))
            .chain(sc.denied.iter().map(|(n, _)| n.as_str()))
            .collect();
        let default_allows = matches!(sc.default_action, SeccompAction::Allow);
        for (name, n) in carapace_policy::tables::all_syscalls() {
            let n = u32::try_from(n).unwrap();
            let want =
                sc.allowed.iter().any(|a| a == name) || default_allows && !listed.contains(name);
            assert_eq!(
                kernel_caches_allow(&sc.program, n),
                want,
                "{profile}: {name} ({n}) cached should be {want}"
            );
        }
    }
}
