//! Evaluation, `extends`, compilation (mounts, Landlock, limits) and the seccomp program, which
//! is run through the crate's BPF interpreter.

use carapace_policy::plan::{FsRights, LandlockPath, Mount, RlimitResource, SeccompAction};
use carapace_policy::tables::{syscall_nr, FORBIDDEN_IN_GROUPS, GROUPS};
use carapace_policy::{run_bpf, Approval, ExecRequest, Plan, Policy, Target};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const S_IFIFO: u64 = 0o010000;
const S_IFCHR: u64 = 0o020000;
const S_IFBLK: u64 = 0o060000;
const S_IFREG: u64 = 0o100000;
const S_IFSOCK: u64 = 0o140000;
const S_ISUID: u64 = 0o4000;
const S_ISGID: u64 = 0o2000;
/// (uid_t)-1: "keep this id".
const KEEP: u64 = 0xffff_ffff;
const fn ret_errno(e: i32) -> u32 {
    0x0005_0000 | (e as u32)
}

const DEFAULT: &str = include_str!("../../policies/default.toml");

fn parse(text: &str) -> Policy {
    Policy::parse(text, "t.toml").unwrap_or_else(|d| panic!("{d}\n{text}"))
}

fn plan_of(text: &str, profile: &str) -> Plan {
    parse(text)
        .compile(profile, &Target { landlock_abi: 6 })
        .unwrap_or_else(|d| panic!("{d}"))
}

fn req(prog: &str, args: &[&str]) -> ExecRequest {
    ExecRequest {
        program: prog.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        workspace: None,
    }
}

fn nr(name: &str) -> i32 {
    syscall_nr(name).unwrap_or_else(|| panic!("no syscall {name}")) as i32
}

fn run(plan: &Plan, name: &str, args: [u64; 6]) -> u32 {
    run_bpf(&plan.seccomp.program, nr(name), AUDIT_ARCH_X86_64, args)
        .unwrap_or_else(|| panic!("malformed program for {name}"))
}

// ---- evaluation ---------------------------------------------------------------------------

const RULES: &str = r#"
version = 1
[profiles.p]
why = "p"
[profiles.q]
why = "q"

[[exec]]
why = "git reads"
program = "/usr/bin/git"
args = ["{status,log}", "**"]
profile = "p"
approval = "allow"

[[exec]]
why = "exactly two args, the second a .txt file"
program = "/usr/bin/cp"
args = ["*", "*.txt"]
profile = "q"
approval = "allow"

[[exec]]
why = "a ** in the middle"
program = "/usr/bin/tar"
args = ["-c", "**", "--end"]
profile = "p"
approval = "allow"

[[exec]]
why = "globbed programs; * does not cross /"
program = "/opt/tools/*"
profile = "q"
approval = "ask"

[[exec]]
why = "no rm"
program = "/usr/bin/rm"
approval = "deny"
"#;

#[test]
fn first_match_wins_and_no_match_denies() {
    let p = parse(RULES);
    let d = p.evaluate(&req("/usr/bin/git", &["status", "-s"]));
    assert_eq!(d.approval, Approval::Allow);
    assert_eq!(d.profile.as_deref(), Some("p"));
    let r = d.rule.clone().unwrap_or_else(|| panic!("no rule"));
    assert_eq!((r.index, r.line, r.why.as_str()), (0, 8, "git reads"));
    assert!(d.explain().contains("line 8"), "{}", d.explain());

    // git push matches no rule at all -> deny without a rule
    let d = p.evaluate(&req("/usr/bin/git", &["push"]));
    assert_eq!(d.approval, Approval::Deny);
    assert!(d.rule.is_none() && d.profile.is_none());
    assert!(d.explain().contains("none matched"));

    // a bare `git` (no args) does not match ["{status,log}", "**"]
    assert_eq!(
        p.evaluate(&req("/usr/bin/git", &[])).approval,
        Approval::Deny
    );

    let d = p.evaluate(&req("/usr/bin/rm", &["-rf", "/"]));
    assert_eq!(d.approval, Approval::Deny);
    assert_eq!(d.rule.map(|r| r.index), Some(4));
}

#[test]
fn args_are_matched_one_per_element() {
    let p = parse(RULES);
    let a = |args: &[&str]| p.evaluate(&req("/usr/bin/cp", args)).approval;
    assert_eq!(a(&["a", "b.txt"]), Approval::Allow);
    assert_eq!(
        a(&["a/b/c", "d/e.txt"]),
        Approval::Allow,
        "arg globs cross /"
    );
    assert_eq!(a(&["a", "b.txt", "c"]), Approval::Deny, "too many");
    assert_eq!(a(&["a"]), Approval::Deny, "too few");
    assert_eq!(a(&["a", "b.md"]), Approval::Deny);
    let t = |args: &[&str]| p.evaluate(&req("/usr/bin/tar", args)).approval;
    assert_eq!(t(&["-c", "--end"]), Approval::Allow, "** matches zero");
    assert_eq!(t(&["-c", "x", "y", "--end"]), Approval::Allow);
    assert_eq!(t(&["-c", "x", "y"]), Approval::Deny);
    assert_eq!(t(&["-x", "--end"]), Approval::Deny);
}

#[test]
fn program_globs_keep_separators_literal() {
    let p = parse(RULES);
    assert_eq!(
        p.evaluate(&req("/opt/tools/x", &["a"])).approval,
        Approval::Ask
    );
    assert_eq!(
        p.evaluate(&req("/opt/tools/sub/x", &[])).approval,
        Approval::Deny
    );
    assert_eq!(
        p.evaluate(&req("/opt/toolsx", &[])).approval,
        Approval::Deny
    );
}

#[test]
fn canonicalized_programs_match_both_forms() {
    let mut p = parse(RULES);
    // Pretend /usr/bin/git is a link to /usr/lib/git-core/git.
    p.canonicalize_programs(|path| {
        (path == std::path::Path::new("/usr/bin/git")).then(|| "/usr/lib/git-core/git".into())
    });
    assert_eq!(
        p.evaluate(&req("/usr/lib/git-core/git", &["log"])).approval,
        Approval::Allow
    );
    assert_eq!(
        p.evaluate(&req("/usr/bin/git", &["log"])).approval,
        Approval::Allow
    );
    assert_eq!(
        p.evaluate(&req("/usr/lib/git-core/gitx", &["log"]))
            .approval,
        Approval::Deny
    );
}

// ---- lazy program resolution ----------------------------------------------------------------

const LINKED: &str = r#"
version = 1
[profiles.p]
why = "p"

[[exec]]
why = "viewers"
programs = ["/usr/bin/less", "/bin/more"]
profile = "p"
approval = "allow"

[[exec]]
why = "git reads; /usr/local/bin/git is a link"
programs = ["/usr/local/bin/git", "/usr/bin/git"]
args = ["log", "**"]
profile = "p"
approval = "allow"

[[exec]]
why = "awk is a link through /etc/alternatives"
program = "/usr/bin/awk"
approval = "ask"
profile = "p"

[[exec]]
why = "git again (same literal as rule 2)"
program = "/usr/local/bin/git"
approval = "deny"
"#;

/// A pretend file system: /bin -> usr/bin, /usr/local/bin/git -> /usr/lib/git-core/git,
/// /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/mawk; everything else is canonical.
fn fake_resolve(p: &std::path::Path) -> Option<std::path::PathBuf> {
    let s = p.to_str()?;
    let out = match s {
        "/usr/local/bin/git" => "/usr/lib/git-core/git".to_string(),
        "/usr/bin/awk" => "/usr/bin/mawk".to_string(),
        _ => match s.strip_prefix("/bin/") {
            Some(rest) => format!("/usr/bin/{rest}"),
            None => s.to_string(),
        },
    };
    Some(out.into())
}

/// Lazy resolution matches the canonical path of a request against a rule written with a
/// symlinked path, and gives exactly the decisions of eager canonicalization.
#[test]
fn lazy_resolution_decides_like_eager_canonicalization() {
    let lazy = parse(LINKED);
    let mut eager = parse(LINKED);
    eager.canonicalize_programs(fake_resolve);
    let requests = [
        req("/usr/bin/more", &[]), // written /bin/more
        req("/bin/more", &[]),     // written form itself
        req("/usr/bin/less", &["x"]),
        req("/usr/lib/git-core/git", &["log", "-3"]), // written /usr/local/bin/git
        req("/usr/lib/git-core/git", &["push"]),      // rule 4, via the link again
        req("/usr/bin/git", &["log"]),
        req("/usr/bin/git", &["push"]), // no rule: /usr/bin/git is not a link to it
        req("/usr/bin/mawk", &["{print}"]), // written /usr/bin/awk
        req("/usr/bin/awk", &[]),
        req("/usr/bin/gawk", &[]), // not what awk points to
        req("/usr/bin/moreover", &[]),
        req("/", &[]),
    ];
    for r in &requests {
        let l = lazy.evaluate_with(r, fake_resolve);
        let e = eager.evaluate(r);
        assert_eq!(l, e, "{r:?}");
    }
    // Both directions, spelled out.
    let d = lazy.evaluate_with(&req("/usr/bin/more", &[]), fake_resolve);
    assert_eq!(
        d.rule.map(|r| r.index),
        Some(0),
        "canonical path matches the link"
    );
    let d = lazy.evaluate_with(&req("/usr/bin/mawk", &[]), fake_resolve);
    assert_eq!(d.approval, Approval::Ask);
    let d = lazy.evaluate_with(&req("/usr/bin/gawk", &[]), fake_resolve);
    assert_eq!(d.approval, Approval::Deny);
    assert!(d.rule.is_none(), "a different target must not match");
    let d = lazy.evaluate_with(&req("/usr/bin/git", &["push"]), fake_resolve);
    assert!(d.rule.is_none());
    // Without a resolver (or without canonicalize_programs) only written forms match.
    assert_eq!(
        lazy.evaluate(&req("/usr/bin/more", &[])).approval,
        Approval::Deny
    );
    assert_eq!(
        lazy.evaluate_with(&req("/usr/bin/more", &[]), |_| None)
            .approval,
        Approval::Deny
    );
}

/// The resolver is asked only where the answer can change the decision.
#[test]
fn lazy_resolution_resolves_only_what_it_needs() {
    let p = parse(LINKED);
    let count = |r: &ExecRequest| {
        let mut asked: Vec<String> = Vec::new();
        let d = p.evaluate_with(r, |path| {
            asked.push(path.display().to_string());
            fake_resolve(path)
        });
        (d, asked)
    };
    // Written form of the first rule: nothing resolved.
    let (d, asked) = count(&req("/usr/bin/less", &[]));
    assert_eq!(d.rule.map(|r| r.index), Some(0));
    assert!(asked.is_empty(), "{asked:?}");
    // Written form of rule 2 (args match): only rule 1's literals, which come before it.
    let (d, asked) = count(&req("/usr/bin/git", &["log"]));
    assert_eq!(d.rule.map(|r| r.index), Some(1));
    assert_eq!(asked, vec!["/usr/bin/less", "/bin/more"]);
    // Rule 2's args do not match `push`: its literals are not resolved; rule 4's literal
    // (the same as rule 2's) is resolved once.
    let (d, asked) = count(&req("/usr/lib/git-core/git", &["push"]));
    assert_eq!(d.rule.map(|r| r.index), Some(3));
    assert_eq!(
        asked,
        vec![
            "/usr/bin/less",
            "/bin/more",
            "/usr/bin/awk",
            "/usr/local/bin/git"
        ]
    );
    // Each distinct literal at most once, even when several rules repeat it.
    let (_, asked) = count(&req("/usr/lib/git-core/git", &["log"]));
    let mut dedup = asked.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), asked.len(), "{asked:?}");
    // Eagerly canonicalized policies do not ask again.
    let mut eager = parse(LINKED);
    eager.canonicalize_programs(fake_resolve);
    let mut asked = 0;
    let d = eager.evaluate_with(&req("/usr/bin/mawk", &[]), |path| {
        asked += 1;
        fake_resolve(path)
    });
    assert_eq!(d.approval, Approval::Ask);
    assert_eq!(asked, 0);
}

/// `run_tests_with` uses the same lazy path.
#[test]
fn run_tests_with_a_resolver() {
    let text = format!(
        "{LINKED}\n[[test]]\ncommand = [\"/usr/bin/mawk\"]\nexpect = \"ask\"\nprofile = \"p\"\n"
    );
    let text = format!(
        "{text}[[test]]\ncommand = [\"/usr/bin/gawk\"]\nexpect = \"deny\"\n\
         [[test]]\ncommand = [\"/usr/lib/git-core/git\", \"push\"]\nexpect = \"deny\"\n"
    );
    let p = parse(&text);
    let mut asked: Vec<std::path::PathBuf> = Vec::new();
    let out = p.run_tests_with(|path| {
        asked.push(path.to_path_buf());
        fake_resolve(path)
    });
    assert!(out.iter().all(|t| t.passed), "{out:?}");
    let mut dedup = asked.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        asked.len(),
        "each literal once per run: {asked:?}"
    );
    assert!(
        !p.run_tests()[0].passed,
        "without resolution the link is not followed"
    );
}

#[test]
fn run_tests_reports_pass_and_fail() {
    let text = format!(
        "{RULES}\n[[test]]\ncommand = [\"/usr/bin/git\", \"log\"]\nexpect = \"allow\"\nprofile = \"p\"\n\
         [[test]]\ncommand = [\"/usr/bin/git\", \"log\"]\nexpect = \"allow\"\nprofile = \"q\"\n\
         [[test]]\ncommand = [\"/usr/bin/rm\"]\nexpect = \"allow\"\n"
    );
    let out = parse(&text).run_tests();
    assert_eq!(out.len(), 3);
    assert!(out[0].passed);
    assert!(!out[1].passed, "wrong profile must fail");
    assert!(!out[2].passed, "wrong decision must fail");
    assert_eq!(out[2].got.approval, Approval::Deny);
    assert_eq!(out[2].command, vec!["/usr/bin/rm".to_string()]);
}

// ---- extends ------------------------------------------------------------------------------

const EXTENDS: &str = r#"
version = 1
[profiles.base]
why = "base"
[profiles.base.filesystem]
mounts = [{ path = "/usr", access = "read-exec" }]
tmpfs = [{ path = "/tmp", size = "8MiB" }]
[profiles.base.limits]
memory = "64MiB"
pids = 10
[profiles.base.seccomp]
allow = ["@default"]
deny = [{ syscall = "clone3", errno = "ENOSYS" }]
[profiles.base.environment]
pass = ["TERM"]
set = { A = "1", B = "2" }

[profiles.mid]
why = "mid"
extends = "base"
[profiles.mid.filesystem]
mounts = [{ path = "/opt/data", access = "read" }]
[profiles.mid.limits]
pids = 20

[profiles.leaf]
why = "leaf"
extends = "mid"
hostname = "leaf"
[profiles.leaf.seccomp]
allow = ["@file-read"]
deny = [{ syscall = "openat2", errno = "ENOSYS" }]
[profiles.leaf.environment]
set = { B = "3" }
"#;

#[test]
fn extends_overrides_keys_and_appends_lists() {
    let base = plan_of(EXTENDS, "base");
    let leaf = plan_of(EXTENDS, "leaf");
    let binds = |p: &Plan| -> Vec<String> {
        p.mounts
            .iter()
            .filter_map(|m| match m {
                Mount::Bind { dst, .. } => Some(dst.display().to_string()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(binds(&base), vec!["/usr"]);
    assert_eq!(binds(&leaf), vec!["/usr", "/opt/data"], "mounts appended");
    assert!(leaf
        .mounts
        .iter()
        .any(|m| matches!(m, Mount::Tmpfs { dst, .. } if dst == std::path::Path::new("/tmp"))));
    assert_eq!(leaf.cgroup.memory_bytes, Some(64 << 20), "inherited");
    assert_eq!(leaf.cgroup.pids, Some(20), "overridden by mid");
    assert_eq!(base.cgroup.pids, Some(10), "parent untouched");
    assert_eq!(leaf.hostname, "leaf");
    assert_eq!(base.hostname, "carapace");
    // seccomp lists appended
    assert!(
        leaf.seccomp.allowed.iter().any(|s| s == "openat")
            || leaf.seccomp.denied.iter().any(|(s, _)| s == "openat2")
    );
    assert!(
        leaf.seccomp.allowed.iter().any(|s| s == "newfstatat"),
        "leaf's @file-read"
    );
    assert!(
        leaf.seccomp.allowed.iter().any(|s| s == "mmap"),
        "base's @default"
    );
    assert!(!base.seccomp.allowed.iter().any(|s| s == "newfstatat"));
    let denied: Vec<&str> = leaf
        .seccomp
        .denied
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    assert_eq!(denied, vec!["clone3", "openat2"]);
    assert!(
        !leaf.seccomp.allowed.iter().any(|s| s == "openat2"),
        "deny wins over allow"
    );
    assert_eq!(run(&leaf, "openat2", [0; 6]), ret_errno(libc::ENOSYS));
    // env: pass inherited, set merged per variable with the child winning
    assert_eq!(leaf.env.pass, vec!["TERM"]);
    assert_eq!(
        leaf.env.set,
        vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "3".to_string())
        ]
    );
}

#[test]
fn extends_replaces_a_parents_entry_for_the_same_path() {
    let text = format!(
        "{EXTENDS}\n[profiles.exec]\nwhy = \"exec\"\nextends = \"base\"\n\
         [profiles.exec.filesystem]\ntmpfs = [{{ path = \"/tmp\", size = \"32MiB\", exec = true }}]\n\
         mounts = [{{ path = \"/usr\", access = \"read\" }}, {{ path = \"/opt\", access = \"read\" }}]\n"
    );
    let base = plan_of(&text, "base");
    let child = plan_of(&text, "exec");
    let tmpfs = |p: &Plan| -> Vec<(String, u64, bool)> {
        p.mounts
            .iter()
            .filter_map(|m| match m {
                Mount::Tmpfs {
                    dst,
                    size_bytes,
                    exec,
                    ..
                } => Some((dst.display().to_string(), *size_bytes, *exec)),
                _ => None,
            })
            .collect()
    };
    let binds = |p: &Plan| -> Vec<(String, bool)> {
        p.mounts
            .iter()
            .filter_map(|m| match m {
                Mount::Bind { dst, exec, .. } => Some((dst.display().to_string(), *exec)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(tmpfs(&base), vec![("/tmp".to_string(), 8 << 20, false)]);
    assert_eq!(
        tmpfs(&child),
        vec![("/tmp".to_string(), 32 << 20, true)],
        "the child's /tmp replaces the parent's, not a second /tmp"
    );
    assert_eq!(
        binds(&child),
        vec![("/usr".to_string(), false), ("/opt".to_string(), false)],
        "same path replaced in place, a new path appended"
    );
    assert_eq!(
        binds(&base),
        vec![("/usr".to_string(), true)],
        "parent untouched"
    );
}

#[test]
fn default_tool_profile_can_be_extended_with_one_mount() {
    let text = format!(
        "{DEFAULT}\n[profiles.escape]\nwhy = \"escape suite\"\nextends = \"tool\"\n[profiles.escape.filesystem]\nmounts = [{{ path = \"/opt/attacks\", access = \"read-exec\" }}]\n"
    );
    let tool = plan_of(&text, "tool");
    let esc = plan_of(&text, "escape");
    assert_eq!(esc.mounts.len(), tool.mounts.len() + 1);
    assert_eq!(esc.seccomp, tool.seccomp);
    assert_eq!(esc.cgroup, tool.cgroup);
}

// ---- compile: mounts, Landlock, limits ------------------------------------------------------

#[test]
fn mounts_are_ordered_parents_first_and_landlock_follows_access() {
    let text = r#"
version = 1
[profiles.p]
why = "p"
[profiles.p.filesystem]
mounts = [
  { path = "/usr/lib/x", access = "read-write" },
  { path = "/usr", access = "read-exec" },
  { path = "/etc/passwd", access = "read", optional = true },
]
tmpfs = [{ path = "/tmp", size = "1MiB", mode = "0700" }, { path = "/workspace/cache", size = "2MiB", exec = true }]
symlinks = [{ path = "/bin", target = "usr/bin" }]
workspace = { path = "/workspace", access = "read-write" }
"#;
    let plan = plan_of(text, "p");
    let order: Vec<String> = plan
        .mounts
        .iter()
        .map(|m| m.dst().display().to_string())
        .collect();
    let pos = |s: &str| order.iter().position(|x| x == s).unwrap_or(usize::MAX);
    assert!(pos("/usr") < pos("/usr/lib/x"), "{order:?}");
    assert!(pos("/workspace") < pos("/workspace/cache"), "{order:?}");
    assert_eq!(
        order.last().map(String::as_str),
        Some("/bin"),
        "symlinks last: {order:?}"
    );
    assert!(order.contains(&"/proc".to_string()) && order.contains(&"/dev".to_string()));
    assert_eq!(plan.cwd, std::path::Path::new("/workspace"));
    assert!(plan.mounts.contains(&Mount::Tmpfs {
        dst: "/tmp".into(),
        size_bytes: 1 << 20,
        mode: 0o700,
        exec: false
    }));

    let rights_of = |p: LandlockPath| {
        plan.landlock
            .rules
            .iter()
            .find(|r| r.path == p)
            .map(|r| r.rights)
            .unwrap_or_else(|| panic!("no rule for {p:?}"))
    };
    let r = |read, write, execute, ioctl_dev| FsRights {
        read,
        write,
        execute,
        ioctl_dev,
    };
    assert_eq!(
        rights_of(LandlockPath::Host("/usr".into())),
        r(true, false, true, false)
    );
    assert_eq!(
        rights_of(LandlockPath::Host("/usr/lib/x".into())),
        r(true, true, false, false)
    );
    assert_eq!(
        rights_of(LandlockPath::Host("/etc/passwd".into())),
        r(true, false, false, false)
    );
    assert_eq!(
        rights_of(LandlockPath::Workspace),
        r(true, true, false, false),
        "workspace never exec"
    );
    assert_eq!(
        rights_of(LandlockPath::Sandbox("/dev".into())),
        r(true, true, false, true)
    );
    assert_eq!(
        rights_of(LandlockPath::Sandbox("/proc".into())),
        r(true, false, false, false)
    );
    assert_eq!(
        rights_of(LandlockPath::Sandbox("/tmp".into())),
        r(true, true, false, false)
    );
    assert_eq!(
        rights_of(LandlockPath::Sandbox("/workspace/cache".into())),
        r(true, true, true, false)
    );
}

#[test]
fn workspace_exec_only_when_asked() {
    let text = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.filesystem]\nworkspace = { path = \"/w\", access = \"read-write-exec\" }\n";
    let plan = plan_of(text, "p");
    assert!(plan.mounts.contains(&Mount::Workspace {
        dst: "/w".into(),
        writable: true,
        exec: true
    }));
    let rule = plan
        .landlock
        .rules
        .iter()
        .find(|r| r.path == LandlockPath::Workspace);
    assert!(rule.is_some_and(|r| r.rights.execute && r.rights.write));
}

#[test]
fn landlock_features_follow_the_target_and_min_abi_is_enforced() {
    let p = parse(DEFAULT);
    let abi = |n| p.compile("tool", &Target { landlock_abi: n });
    let d = abi(2).unwrap_err();
    assert_eq!(d.0.len(), 1);
    let line = DEFAULT
        .lines()
        .position(|l| l.starts_with("min_abi"))
        .unwrap_or(0)
        + 1;
    assert_eq!(d.0[0].line, line, "located at min_abi");
    assert!(abi(0).unwrap_err().to_string().contains("no Landlock"));
    let p3 = abi(3).unwrap_or_else(|d| panic!("{d}"));
    assert!(!p3.landlock.deny_tcp && !p3.landlock.scope_abstract_unix);
    let p4 = abi(4).unwrap_or_else(|d| panic!("{d}"));
    assert!(p4.landlock.deny_tcp && !p4.landlock.scope_signals);
    let p6 = abi(6).unwrap_or_else(|d| panic!("{d}"));
    assert!(p6.landlock.deny_tcp && p6.landlock.scope_abstract_unix && p6.landlock.scope_signals);
    assert!(p.compile("nope", &Target { landlock_abi: 6 }).is_err());
}

#[test]
fn limits_and_rlimits() {
    let plan = plan_of(DEFAULT, "tool");
    assert_eq!(plan.cgroup.memory_bytes, Some(512 << 20));
    assert_eq!(plan.cgroup.pids, Some(128));
    assert_eq!(plan.cgroup.cpu_millis, Some(1000));
    assert_eq!(plan.wall_time, Some(std::time::Duration::from_secs(300)));
    let rl = |r| {
        plan.rlimits
            .iter()
            .find(|x| x.resource == r)
            .map(|x| x.value)
    };
    assert_eq!(rl(RlimitResource::Nofile), Some(256));
    assert_eq!(rl(RlimitResource::Fsize), Some(256 << 20));
    assert_eq!(rl(RlimitResource::Core), Some(0));
    assert_eq!(plan.env.pass, vec!["LANG", "LC_ALL", "TERM"]);
    assert!(plan.env.set.contains(&("HOME".into(), "/workspace".into())));
    let explain = plan.explain();
    for needle in [
        "512 MiB",
        "core dumps: off",
        "clone3: fail with ENOSYS",
        "any other syscall: fail with EPERM",
        "/workspace: the workspace, read-write, no exec",
        "TIOCGWINSZ",
        "LANG",
    ] {
        assert!(
            explain.contains(needle),
            "explain lacks {needle:?}:\n{explain}"
        );
    }
}

// ---- seccomp --------------------------------------------------------------------------------

#[test]
fn groups_hold_only_known_and_never_forbidden_syscalls() {
    for g in GROUPS {
        assert!(g.name.starts_with('@') && !g.why.is_empty());
        for s in g.syscalls {
            assert!(
                syscall_nr(s).is_some(),
                "{} has unknown syscall {s}",
                g.name
            );
            assert!(
                !FORBIDDEN_IN_GROUPS.contains(s),
                "{} contains forbidden {s}",
                g.name
            );
        }
    }
    for s in [
        "ptrace",
        "process_vm_readv",
        "mount",
        "unshare",
        "setns",
        "keyctl",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "open_by_handle_at",
        "kexec_load",
        "init_module",
        "reboot",
        "clone3",
        "personality",
        "chroot",
        "move_mount",
        "fsopen",
        "mount_setattr",
    ] {
        assert!(FORBIDDEN_IN_GROUPS.contains(&s), "{s}");
    }
}

#[test]
fn program_starts_with_the_arch_and_x32_guard() {
    let plan = plan_of(DEFAULT, "tool");
    let p = &plan.seccomp.program;
    let shape: Vec<(u16, u8, u8, u32)> = p[..6].iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
    assert_eq!(
        shape,
        vec![
            (0x20, 0, 0, 4),                 // ld arch
            (0x15, 1, 0, AUDIT_ARCH_X86_64), // jeq x86_64 ? skip : kill
            (0x06, 0, 0, RET_KILL_PROCESS),
            (0x20, 0, 0, 0),           // ld nr
            (0x35, 0, 1, 0x4000_0000), // jge x32 ? kill : skip
            (0x06, 0, 0, RET_KILL_PROCESS),
        ]
    );
    assert!(p.len() <= 4096);
    // Behaviour, through the interpreter.
    assert_eq!(
        run_bpf(p, 0, AUDIT_ARCH_I386, [0; 6]),
        Some(RET_KILL_PROCESS),
        "i386 / int 0x80"
    );
    assert_eq!(
        run_bpf(p, 0x4000_0000, AUDIT_ARCH_X86_64, [0; 6]),
        Some(RET_KILL_PROCESS),
        "x32 read"
    );
    assert_eq!(
        run_bpf(p, 0x4000_0000 | 59, AUDIT_ARCH_X86_64, [0; 6]),
        Some(RET_KILL_PROCESS)
    );
    assert_eq!(
        run_bpf(p, -1, AUDIT_ARCH_X86_64, [0; 6]),
        Some(RET_KILL_PROCESS),
        "nr -1 is >= x32 bit unsigned"
    );
}

#[test]
fn default_profile_seccomp_behaviour() {
    let plan = plan_of(DEFAULT, "tool");
    let eperm = ret_errno(libc::EPERM);
    for ok in [
        "read",
        "write",
        "openat",
        "execve",
        "exit_group",
        "mmap",
        "futex",
        "wait4",
        "pipe2",
        "getdents64",
        "rt_sigreturn",
        "fchmodat2",
    ] {
        assert_eq!(run(&plan, ok, [0; 6]), RET_ALLOW, "{ok}");
    }
    for bad in FORBIDDEN_IN_GROUPS.iter().filter(|s| **s != "clone3") {
        if syscall_nr(bad).is_some() {
            assert_eq!(run(&plan, bad, [0; 6]), eperm, "{bad} must be denied");
        }
    }
    assert_eq!(run(&plan, "clone3", [0; 6]), ret_errno(libc::ENOSYS));
    // socket: AF_UNIX only (low 32 bits compared, as the kernel reads an int)
    assert_eq!(run(&plan, "socket", [1, 1, 0, 0, 0, 0]), RET_ALLOW);
    for dom in [2u64, 10, 16, 17] {
        assert_eq!(
            run(&plan, "socket", [dom, 1, 0, 0, 0, 0]),
            eperm,
            "domain {dom}"
        );
    }
    assert_eq!(run(&plan, "socketpair", [2, 1, 0, 0, 0, 0]), eperm);
    // ioctl: allowlisted requests only, compared on the low 32 bits
    assert_eq!(
        run(&plan, "ioctl", [0, 0x5401, 0, 0, 0, 0]),
        RET_ALLOW,
        "TCGETS"
    );
    assert_eq!(
        run(&plan, "ioctl", [0, 0xdead_0000_5413, 0, 0, 0, 0]),
        RET_ALLOW,
        "high bits ignored like the kernel"
    );
    assert_eq!(
        run(&plan, "ioctl", [0, 0x5412, 0, 0, 0, 0]),
        eperm,
        "TIOCSTI"
    );
    assert_eq!(
        run(&plan, "ioctl", [0, 0x1_0000_5412, 0, 0, 0, 0]),
        eperm,
        "TIOCSTI with high bits"
    );
    assert_eq!(
        run(&plan, "ioctl", [0, 0x541C, 0, 0, 0, 0]),
        eperm,
        "TIOCLINUX"
    );
    // clone: no namespace flags
    const SIGCHLD: u64 = 17;
    let thread_flags = 0x003d_0f00; // CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert_eq!(
        run(&plan, "clone", [SIGCHLD, 0, 0, 0, 0, 0]),
        RET_ALLOW,
        "fork"
    );
    assert_eq!(
        run(&plan, "clone", [thread_flags, 0, 0, 0, 0, 0]),
        RET_ALLOW,
        "thread"
    );
    for ns in [
        0x1000_0000u64,
        0x0002_0000,
        0x2000_0000,
        0x4000_0000,
        0x0800_0000,
        0x0400_0000,
        0x0200_0000,
    ] {
        assert_eq!(
            run(&plan, "clone", [SIGCHLD | ns, 0, 0, 0, 0, 0]),
            eperm,
            "flag {ns:#x}"
        );
    }
    // personality is not allowed by the default profile
    assert_eq!(
        run(&plan, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]),
        eperm
    );
    // unknown syscall numbers get the default action
    assert_eq!(
        run_bpf(&plan.seccomp.program, 1000, AUDIT_ARCH_X86_64, [0; 6]),
        Some(eperm)
    );
    assert_eq!(
        plan.seccomp.default_action,
        SeccompAction::Errno(libc::EPERM as u32)
    );
}

#[test]
fn explicit_allow_of_forbidden_syscalls_and_personality_conditions() {
    let text = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\ndefault_action = \"kill\"\nallow = [\"@default\", \"personality\", \"ptrace\"]\nsocket_domains = []\n";
    let plan = plan_of(text, "p");
    assert_eq!(
        run(&plan, "ptrace", [0; 6]),
        RET_ALLOW,
        "deliberate single allow works"
    );
    assert_eq!(
        run(&plan, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(run(&plan, "personality", [0, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(
        run(&plan, "personality", [0x0040_0000, 0, 0, 0, 0, 0]),
        RET_KILL_PROCESS,
        "ADDR_NO_RANDOMIZE"
    );
    assert_eq!(
        run(&plan, "openat", [0; 6]),
        RET_KILL_PROCESS,
        "kill default"
    );
    assert_eq!(
        run(&plan, "clone3", [0; 6]),
        ret_errno(libc::ENOSYS),
        "implicit clone3 ENOSYS"
    );
}

#[test]
fn empty_condition_lists_deny_the_syscall() {
    let text = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\ndefault_action = \"log\"\nallow = [\"@default\", \"@network-local\"]\nsocket_domains = []\nioctl_requests = []\nclone_deny_flags = []\n";
    let plan = plan_of(text, "p");
    assert_eq!(
        run(&plan, "socket", [1, 1, 0, 0, 0, 0]),
        RET_LOG,
        "no domain allowed"
    );
    assert_eq!(
        run(&plan, "ioctl", [0, 0x5401, 0, 0, 0, 0]),
        RET_LOG,
        "no request allowed"
    );
    assert!(!plan
        .seccomp
        .allowed
        .iter()
        .any(|s| s == "socket" || s == "ioctl"));
    assert_eq!(run(&plan, "bind", [0; 6]), RET_ALLOW);
}

#[test]
fn deny_entries_have_their_own_action() {
    let text = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\nallow = [\"@default\", \"@file-read\"]\ndeny = [{ syscall = \"openat\", errno = \"EACCES\" }, { syscall = \"getcwd\", action = \"kill\" }, { syscall = \"clone3\", action = \"log\" }]\n";
    let plan = plan_of(text, "p");
    assert_eq!(run(&plan, "openat", [0; 6]), ret_errno(libc::EACCES));
    assert_eq!(run(&plan, "getcwd", [0; 6]), RET_KILL_PROCESS);
    assert_eq!(
        run(&plan, "clone3", [0; 6]),
        RET_LOG,
        "explicit entry replaces the implicit ENOSYS"
    );
    // The policy's entries in order, then the set-id guard's refusal of openat2 (@file-read
    // allows it). A denied guarded syscall keeps its own action (openat: EACCES).
    let denied: Vec<(&str, SeccompAction)> = plan
        .seccomp
        .denied
        .iter()
        .map(|(n, a)| (n.as_str(), *a))
        .collect();
    assert_eq!(
        denied,
        vec![
            ("openat", SeccompAction::Errno(libc::EACCES as u32)),
            ("getcwd", SeccompAction::KillProcess),
            ("clone3", SeccompAction::Log),
            ("openat2", SeccompAction::Errno(libc::ENOSYS as u32)),
        ]
    );
    assert_eq!(
        run(&plan, "openat", [0, 0, 0o100, 0o4755, 0, 0]),
        ret_errno(libc::EACCES)
    );
}

/// Every syscall observed with `strace -f -qq -c` on this project's reference tools (ls, cat,
/// grep -r, git status/log/diff/show/branch, python3 -c, a python3 script with threads,
/// subprocess, tempfile and multiprocessing, sh -c with pipes, bash, find, sed, awk, sort, tar,
/// coreutils file operations) is allowed by the default tool profile; clone3 gets ENOSYS so
/// glibc falls back to clone.
#[test]
fn default_profile_allows_what_real_tools_use() {
    const OBSERVED: &[&str] = &[
        "access",
        "arch_prctl",
        "brk",
        "chdir",
        "clock_nanosleep",
        "clone",
        "close",
        "close_range",
        "connect",
        "copy_file_range",
        "creat",
        "dup2",
        "epoll_create1",
        "epoll_ctl",
        "epoll_wait",
        "execve",
        "fadvise64",
        "fchdir",
        "fchmodat",
        "fcntl",
        "fstatfs",
        "futex",
        "getcwd",
        "getdents64",
        "getegid",
        "geteuid",
        "getgid",
        "getgroups",
        "getpeername",
        "getpgrp",
        "getpid",
        "getppid",
        "getrandom",
        "getsockname",
        "gettid",
        "getuid",
        "getxattr",
        "ioctl",
        "lgetxattr",
        "link",
        "lseek",
        "madvise",
        "mkdir",
        "mmap",
        "mprotect",
        "munmap",
        "newfstatat",
        "openat",
        "pipe2",
        "poll",
        "pread64",
        "prlimit64",
        "read",
        "readlink",
        "rename",
        "renameat2",
        "rseq",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "sched_getaffinity",
        "set_robust_list",
        "set_tid_address",
        "sigaltstack",
        "socket",
        "socketpair",
        "statfs",
        "statx",
        "symlinkat",
        "sysinfo",
        "umask",
        "uname",
        "unlink",
        "unlinkat",
        "utimensat",
        "vfork",
        "wait4",
        "write",
    ];
    let plan = plan_of(DEFAULT, "tool");
    // Typical arguments: AF_UNIX sockets, TCGETS/FIOCLEX ioctls, fork-style clone.
    for s in OBSERVED {
        let args = match *s {
            "socket" | "socketpair" => [1, 1, 0, 0, 0, 0],
            "ioctl" => [1, 0x5401, 0, 0, 0, 0],
            "clone" => [0x0120_0011, 0, 0, 0, 0, 0],
            _ => [0; 6],
        };
        assert_eq!(run(&plan, s, args), RET_ALLOW, "{s}");
    }
    assert_eq!(
        run(&plan, "ioctl", [3, 0x5451, 0, 0, 0, 0]),
        RET_ALLOW,
        "FIOCLEX"
    );
    assert_eq!(run(&plan, "clone3", [0; 6]), ret_errno(libc::ENOSYS));
}

/// A syscall that is not allowed must not be let through by the argument conditions of another
/// syscall's chain that it passes on its way through the filter (rules 2.. of a chain).
#[test]
fn conditions_of_one_syscall_never_allow_another() {
    let plan = plan_of(DEFAULT, "tool");
    let eperm = ret_errno(libc::EPERM);
    for req in [
        0x5401u64, 0x5402, 0x5413, 0x540F, 0x541B, 0x5451, 0x5450, 0x5421,
    ] {
        for bad in [
            "ptrace",
            "mount",
            "bpf",
            "setns",
            "unshare",
            "keyctl",
            "perf_event_open",
        ] {
            for argi in 0..6 {
                let mut args = [0u64; 6];
                args[argi] = req;
                assert_eq!(
                    run(&plan, bad, args),
                    eperm,
                    "{bad} with arg{argi}={req:#x}"
                );
            }
        }
    }
    for dom in [1u64, 2] {
        assert_eq!(run(&plan, "ptrace", [dom, 0, 0, 0, 0, 0]), eperm);
    }
}

#[test]
fn filter_allows_exactly_what_the_plan_lists() {
    let args = [
        [0u64; 6],
        [u64::MAX; 6],
        [1, 0x5401, 0, 0, 0, 0],
        [2, 0x5412, 0x1000_0000, 0, 0, 0],
        [0x1_0000_0001, 0x1_0000_5401, 0, 0, 0, 0],
    ];
    carapace_policy::fuzz::check_filter_matches_plan(&plan_of(DEFAULT, "tool"), &args);
    carapace_policy::fuzz::check_filter_matches_plan(&plan_of(EXTENDS, "leaf"), &args);
}

// ---- the tree-shaped filter -----------------------------------------------------------------

/// Argument sets for the exhaustive comparisons: zeros, all ones, the conditions' own values
/// with and without garbage in the high 32 bits, set-id modes in every mode position, namespace
/// flags.
fn arg_sets() -> Vec<[u64; 6]> {
    let mut v = vec![
        [0u64; 6],
        [u64::MAX; 6],
        [1, 0x5401, 0, 0, 0, 0],
        [2, 0x5412, 0x1000_0000, 0, 0, 0],
        [0x1_0000_0001, 0x1_0000_5401, 0, 0, 0, 0],
        [0x1_0000_0002, 0x1_0000_5412, 0, 0, 0, 0],
        [0, 0o4755, 0o2755, 0o6755, 0, 0],
        [0, 0o755, 0o644, 0o100, 0, 0],
        [0xffff_ffff_0000_0000, 0o1_0000_0000_0755, 0, 0, 0, 0],
        [0x0120_0011, 0, 0, 0, 0, 0],
        [0x4000_0011, 0, 0, 0, 0, 0],
        [0xffff_ffff, 0, 0, 0, 0, 0],
        [0x0040_0000, 0, 0, 0, 0, 0],
        // set*id: keep / own ids (1000, 1234, 4321), with and without high garbage, and changes
        [KEEP, 1000, KEEP, 0, 0, 0],
        [KEEP, 0, KEEP, 0, 0, 0],
        [1000, 1000, 1000, 1000, 1000, 1000],
        [0xdead_0000_0000_03e8, u64::MAX, 0x1_0000_03e8, 0, 0, 0],
        [1234, 4321, KEEP, 1234, 4321, 0],
        [4321, 1234, 0, 0, 0, 0],
        // mknod/mknodat modes: FIFO, FIFO with set-id, devices, in both mode positions
        [0, S_IFIFO | 0o644, S_IFIFO | 0o600, 0, 0, 0],
        [0, S_IFIFO | S_ISUID, S_IFIFO | S_ISGID, 0, 0, 0],
        [0, S_IFCHR | 0o600, S_IFBLK | 0o600, 0, 0, 0],
        [0, 0x7_0000_0000 | S_IFIFO, S_IFSOCK, 0, 0, 0],
    ];
    for i in 0..6 {
        let mut a = [0u64; 6];
        a[i] = 0o4000;
        v.push(a);
        a[i] = 0o2000 | 0xdead_0000_0000_0000;
        v.push(a);
    }
    v
}

const KILL_DEFAULT: &str = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\ndefault_action = \"kill\"\nallow = [\"@default\", \"@file-read\", \"@file-write\", \"@process\", \"personality\", \"mknod\"]\nclone_deny_flags = [\"CLONE_NEWUSER\", \"CLONE_IO\"]\n";
const LOG_DEFAULT: &str = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\ndefault_action = \"log\"\nallow = [\"@default\"]\ndeny = [{ syscall = \"chmod\", action = \"log\" }, { syscall = \"fchmod\", errno = \"EACCES\" }, { syscall = \"openat2\", action = \"log\" }]\nsocket_domains = [\"AF_UNIX\", \"AF_INET\", \"AF_INET6\", \"AF_NETLINK\"]\n";

/// A profile with its own sandbox user (uid and gid differ) allowing the set*id calls.
const SETID_OWN_USER: &str = "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.user]\nuid = 1234\ngid = 4321\n[profiles.p.seccomp]\ndefault_action = \"kill\"\nallow = [\"@default\", \"@setid-keep\", \"@file-write\"]\n";

fn all_plans() -> Vec<Plan> {
    vec![
        plan_of(DEFAULT, "build"),
        plan_of(SETID_OWN_USER, "p"),
        plan_of(DEFAULT, "tool"),
        plan_of(EXTENDS, "leaf"),
        plan_of(EXTENDS, "base"),
        plan_of(KILL_DEFAULT, "p"),
        plan_of(LOG_DEFAULT, "p"),
    ]
}

/// The tree gives, for every syscall number 0..=470 (and numbers around the x32 bit, and
/// foreign architectures), exactly the verdict a straightforward evaluation of the plan's lists
/// gives.
#[test]
fn tree_filter_matches_the_reference_evaluation_of_the_plan() {
    let args = arg_sets();
    for plan in all_plans() {
        carapace_policy::fuzz::check_filter_matches_plan(&plan, &args);
    }
}

/// Firecracker-style: for every argument condition of every plan, each allowed value works (also
/// with garbage in the high 32 bits where only the low half is compared), and each mutation of
/// it that is not itself allowed fails; each forbidden flag fails alone and together with
/// harmless bits.
#[test]
fn argument_conditions_each_value_works_each_mutation_fails() {
    use carapace_policy::plan::ArgCondition;
    let mut checked = 0;
    for plan in all_plans() {
        let sc = &plan.seccomp;
        for c in &sc.conditional {
            let then = ret(c.then);
            let otherwise = ret(c.otherwise);
            assert_ne!(
                then, otherwise,
                "{}: a condition must decide something",
                c.syscall
            );
            match &c.when {
                ArgCondition::OneOf { arg, values, .. } => {
                    let i = usize::from(*arg);
                    let allowed: Vec<u32> = values.iter().map(|(_, v)| *v).collect();
                    for v in &allowed {
                        for high in [0u64, 1 << 32, 0xdead_beef << 32, u64::MAX << 32] {
                            let mut a = [0u64; 6];
                            a[i] = u64::from(*v) | high;
                            assert_eq!(run(&plan, &c.syscall, a), then, "{} {a:x?}", c.syscall);
                        }
                        let mut mutations: Vec<u32> = (0..32).map(|b| v ^ (1 << b)).collect();
                        mutations.extend([v.wrapping_add(1), v.wrapping_sub(1), !v]);
                        for m in mutations {
                            if allowed.contains(&m) {
                                continue;
                            }
                            for high in [0u64, 1 << 32] {
                                let mut a = [0u64; 6];
                                a[i] = u64::from(m) | high;
                                // Other arguments holding an allowed value must not help.
                                for (j, slot) in a.iter_mut().enumerate() {
                                    if j != i {
                                        *slot = u64::from(*v);
                                    }
                                }
                                assert_eq!(
                                    run(&plan, &c.syscall, a),
                                    otherwise,
                                    "{} {a:x?}",
                                    c.syscall
                                );
                            }
                        }
                        checked += 1;
                    }
                }
                ArgCondition::NoneOf { arg, flags, .. } => {
                    let i = usize::from(*arg);
                    let mask = flags.iter().fold(0u64, |m, (_, f)| m | f);
                    // Harmless bits (everything outside the mask) keep the syscall working.
                    for harmless in [0u64, !mask, 0x11, !mask & 0xffff_ffff, !mask << 32] {
                        let mut a = [0u64; 6];
                        a[i] = harmless & !mask;
                        for (j, slot) in a.iter_mut().enumerate() {
                            if j != i {
                                *slot = mask;
                            }
                        }
                        assert_eq!(run(&plan, &c.syscall, a), then, "{} {a:x?}", c.syscall);
                    }
                    for (name, f) in flags {
                        for with in [0u64, !mask] {
                            let mut a = [0u64; 6];
                            a[i] = f | with;
                            assert_eq!(
                                run(&plan, &c.syscall, a),
                                otherwise,
                                "{} with {name}",
                                c.syscall
                            );
                        }
                        checked += 1;
                    }
                }
                ArgCondition::EachOneOf { args, values, .. } => {
                    let allowed: Vec<u32> = values.iter().map(|(_, v)| *v).collect();
                    let idx: Vec<usize> = args.iter().map(|a| usize::from(*a)).collect();
                    // Every combination of allowed values, with garbage in the high halves and
                    // in the arguments that are not checked: allowed.
                    let combos = allowed.len().pow(idx.len() as u32);
                    for n in 0..combos {
                        let mut a = [u64::MAX; 6];
                        let mut k = n;
                        for (pos, &i) in idx.iter().enumerate() {
                            let high = [0u64, 1 << 32, 0xdead_beef << 32][pos % 3];
                            a[i] = u64::from(allowed[k % allowed.len()]) | high;
                            k /= allowed.len();
                        }
                        assert_eq!(run(&plan, &c.syscall, a), then, "{} {a:x?}", c.syscall);
                    }
                    // One argument off, the others allowed: refused, wherever it is.
                    for &i in &idx {
                        for v in &allowed {
                            let mut mutations: Vec<u32> = (0..32).map(|b| v ^ (1 << b)).collect();
                            mutations.extend([v.wrapping_add(1), v.wrapping_sub(1), !v, 0]);
                            for m in mutations {
                                if allowed.contains(&m) {
                                    continue;
                                }
                                let mut a = [0u64; 6];
                                for &j in &idx {
                                    a[j] = u64::from(*v);
                                }
                                a[i] = u64::from(m) | (1 << 32);
                                assert_eq!(
                                    run(&plan, &c.syscall, a),
                                    otherwise,
                                    "{} {a:x?}",
                                    c.syscall
                                );
                            }
                            checked += 1;
                        }
                    }
                }
                ArgCondition::MaskedEq {
                    arg, mask, value, ..
                } => {
                    let i = usize::from(*arg);
                    let m = mask.iter().fold(0u32, |m, (_, b)| m | b);
                    // Bits outside the mask (low or high half) and other arguments do not matter.
                    for harmless in [0u64, 0o644, u64::from(!m), !u64::from(m), 0xdead << 40] {
                        let mut a = [u64::from(m); 6];
                        a[i] = u64::from(value.1) | (harmless & !u64::from(m));
                        assert_eq!(run(&plan, &c.syscall, a), then, "{} {a:x?}", c.syscall);
                    }
                    // Each bit of the mask flipped: refused.
                    for b in (0..32).map(|b| 1u32 << b).filter(|b| m & b != 0) {
                        for with in [0u64, 0o644, 0xffff_ffff_0000_0000] {
                            let mut a = [0u64; 6];
                            a[i] = u64::from(value.1 ^ b) | with;
                            assert_eq!(
                                run(&plan, &c.syscall, a),
                                otherwise,
                                "{} {a:x?}",
                                c.syscall
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 40, "only {checked} values checked");
}

fn ret(a: SeccompAction) -> u32 {
    match a {
        SeccompAction::Errno(e) => 0x0005_0000 | e,
        SeccompAction::KillProcess => RET_KILL_PROCESS,
        SeccompAction::Log => RET_LOG,
        SeccompAction::Allow => RET_ALLOW,
    }
}

#[test]
fn ioctl_compares_the_low_32_bits_only() {
    let plan = plan_of(DEFAULT, "tool");
    let eperm = ret_errno(libc::EPERM);
    // TCGETS with garbage in the high half is TCGETS to the kernel: allowed.
    assert_eq!(
        run(&plan, "ioctl", [0, 0x1_0000_5401, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(run(&plan, "ioctl", [0, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
    // TIOCSTI is not allowed, with or without high bits.
    assert_eq!(run(&plan, "ioctl", [0, 0x5412, 0, 0, 0, 0]), eperm);
    assert_eq!(run(&plan, "ioctl", [0, 0x1_0000_5412, 0, 0, 0, 0]), eperm);
    // The request is argument 1, not 0.
    assert_eq!(run(&plan, "ioctl", [0x5401, 0x5412, 0, 0, 0, 0]), eperm);
}

/// The default profile's filter is a tree: a few hundred instructions instead of ~1300, and no
/// syscall walks more than a couple of dozen of them.
#[test]
fn default_filter_is_small_and_shallow() {
    let plan = plan_of(DEFAULT, "tool");
    let p = &plan.seccomp.program;
    let worst = carapace_policy::max_path_len(p).unwrap_or_else(|| panic!("malformed program"));
    assert!(p.len() < 400, "{} instructions", p.len());
    assert!(worst <= 24, "worst path {worst}");
    for (name, args) in [
        ("read", [0u64; 6]),
        ("futex", [0; 6]),
        ("getppid", [0; 6]),
        ("openat", [0, 0, 0, 0o644, 0, 0]),
    ] {
        let (v, steps) = carapace_policy::run_bpf_counted(p, nr(name), AUDIT_ARCH_X86_64, args)
            .unwrap_or_else(|| panic!("malformed for {name}"));
        assert_eq!(v, RET_ALLOW, "{name}");
        assert!(steps <= 16, "{name}: {steps} instructions");
    }
}

// ---- the set-id guard -----------------------------------------------------------------------

#[test]
fn setid_guard_is_compiled_into_the_plan() {
    let plan = plan_of(DEFAULT, "tool");
    let eperm = ret_errno(libc::EPERM);
    let enosys = ret_errno(libc::ENOSYS);
    let cases: &[(&str, [u64; 6], u32)] = &[
        ("chmod", [0, 0o4755, 0, 0, 0, 0], eperm),
        ("chmod", [0, 0o2755, 0, 0, 0, 0], eperm),
        ("chmod", [0, 0o755, 0, 0, 0, 0], RET_ALLOW),
        ("chmod", [0, 0o1777, 0, 0, 0, 0], RET_ALLOW), // sticky bit is harmless
        ("fchmod", [3, 0o6755, 0, 0, 0, 0], eperm),
        ("fchmod", [3, 0o644, 0o4000, 0o4000, 0, 0], RET_ALLOW),
        ("fchmodat", [0, 0, 0o4000, 0, 0, 0], eperm),
        ("fchmodat2", [0, 0, 0o4000, 0, 0, 0], eperm),
        ("fchmodat2", [0, 0, 0o755, 0, 0, 0], RET_ALLOW),
        ("creat", [0, 0o4700, 0, 0, 0, 0], eperm),
        ("openat", [0, 0, 0o100, 0o6755, 0, 0], eperm),
        ("openat", [0, 0, 0o100, 0o644, 0, 0], RET_ALLOW),
        ("openat", [0, 0, 0o4000, 0o644, 0, 0], RET_ALLOW), // O_NDELAY is not a mode
        ("open", [0, 0o100, 0o4755, 0, 0, 0], eperm),
        ("open", [0, 0o100, 0o755, 0o4000, 0, 0], RET_ALLOW),
        ("openat2", [0; 6], enosys),
        ("read", [0, 0o4755, 0o4755, 0o4755, 0, 0], RET_ALLOW),
    ];
    for (name, args, want) in cases {
        assert_eq!(run(&plan, name, *args), *want, "{name} {args:?}");
    }
    // mknod (in @file-write) makes FIFOs only, which already excludes the set-id bits.
    assert_eq!(run(&plan, "mknodat", [0, 0, 0o644, 0, 0, 0]), eperm);
    assert_eq!(run(&plan, "mknodat", [0, 0, 0o4644, 0, 0, 0]), eperm);
    assert_eq!(
        run(&plan, "mknodat", [0, 0, S_IFIFO | 0o4644, 0, 0, 0]),
        eperm
    );
    assert_eq!(
        run(&plan, "mknodat", [0, 0, S_IFIFO | 0o644, 0, 0, 0]),
        RET_ALLOW
    );
    let g = &plan.seccomp.setid_guard;
    assert_eq!(
        g.mode_checked,
        vec![
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "creat",
            "open",
            "openat",
            "mknod",
            "mknodat"
        ]
    );
    assert_eq!(g.refused, vec!["openat2"]);
    // explain shows it, from the plan.
    let text = plan.explain();
    assert!(text.contains("set-id guard (always on"), "{text}");
    assert!(
        text.contains("chmod, creat, fchmod: fail with EPERM when the mode (argument 1) contains any of S_ISUID, S_ISGID; otherwise allowed"),
        "{text}"
    );
    assert!(text.contains("openat2: fail with ENOSYS"), "{text}");
    let allowed_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("allowed ("))
        .unwrap_or_else(|| panic!("{text}"));
    for guarded in ["openat", "chmod", "openat2"] {
        assert!(
            !allowed_line.split_whitespace().any(|w| w == guarded),
            "{guarded} must not be listed as allowed without conditions"
        );
    }
}

/// The guard only ever makes a verdict stricter: where the profile already refuses a guarded
/// syscall, its own verdict stands; where it only logs, set-id modes still fail; with a kill
/// default, mknod (allowed explicitly) is guarded too.
#[test]
fn setid_guard_combines_with_the_profiles_own_verdicts() {
    let eperm = ret_errno(libc::EPERM);
    let log = plan_of(LOG_DEFAULT, "p");
    // chmod: denied with action "log" -> still logged for ordinary modes, EPERM for set-id.
    assert_eq!(run(&log, "chmod", [0, 0o755, 0, 0, 0, 0]), RET_LOG);
    assert_eq!(run(&log, "chmod", [0, 0o4755, 0, 0, 0, 0]), eperm);
    // fchmod: denied with EACCES by the profile -> EACCES whatever the mode.
    assert_eq!(
        run(&log, "fchmod", [0, 0o4755, 0, 0, 0, 0]),
        ret_errno(libc::EACCES)
    );
    // not listed, default log: guarded as well.
    assert_eq!(run(&log, "fchmodat", [0, 0, 0o2755, 0, 0, 0]), eperm);
    assert_eq!(run(&log, "fchmodat", [0, 0, 0o755, 0, 0, 0]), RET_LOG);
    assert_eq!(run(&log, "openat2", [0; 6]), ret_errno(libc::ENOSYS));
    assert!(log
        .seccomp
        .denied
        .iter()
        .any(|(n, a)| n == "openat2" && *a == SeccompAction::Errno(libc::ENOSYS as u32)));
    assert!(!log.seccomp.denied.iter().any(|(n, _)| n == "chmod"));

    // With a kill default, mknod (allowed by name) makes FIFOs without set-id bits only; any
    // other mode gets the default action.
    let kill = plan_of(KILL_DEFAULT, "p");
    assert_eq!(
        run(&kill, "mknod", [0, S_IFIFO | 0o4644, 0, 0, 0, 0]),
        RET_KILL_PROCESS
    );
    assert_eq!(
        run(&kill, "mknod", [0, S_IFIFO | 0o644, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        run(&kill, "mknod", [0, 0o644, 0, 0, 0, 0]),
        RET_KILL_PROCESS
    );
    assert_eq!(
        run(&kill, "mknodat", [0, 0, 0o4644, 0, 0, 0]),
        RET_KILL_PROCESS
    );
    assert!(kill
        .seccomp
        .setid_guard
        .mode_checked
        .contains(&"mknod".to_string()));
    // With a log default, a mode that is not a plain FIFO fails with EPERM instead of being
    // logged and run: the set-id guard needs a refusal there.
    let log_mknod = plan_of(
        "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\ndefault_action = \"log\"\nallow = [\"@default\", \"mknod\"]\n",
        "p",
    );
    assert_eq!(
        run(&log_mknod, "mknod", [0, S_IFIFO | 0o644, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        run(&log_mknod, "mknod", [0, S_IFIFO | 0o4644, 0, 0, 0, 0]),
        eperm
    );
    assert_eq!(
        run(&log_mknod, "mknod", [0, S_IFCHR | 0o644, 0, 0, 0, 0]),
        eperm
    );
    // mknodat is not allowed there: logged, with the plain set-id guard.
    assert_eq!(
        run(&log_mknod, "mknodat", [0, 0, S_IFCHR | 0o644, 0, 0, 0]),
        RET_LOG
    );
    assert_eq!(run(&log_mknod, "mknodat", [0, 0, 0o4644, 0, 0, 0]), eperm);
    assert_eq!(run(&kill, "openat2", [0; 6]), ret_errno(libc::ENOSYS));
    // A profile that allows none of them: nothing to guard, and explain says so.
    let none = plan_of(
        "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\nallow = [\"@default\"]\n",
        "p",
    );
    assert!(none.seccomp.setid_guard.mode_checked.is_empty());
    assert!(none.seccomp.setid_guard.refused.is_empty());
    assert!(none
        .explain()
        .contains("allows none of the syscalls that could set those bits"));
    assert_eq!(run(&none, "chmod", [0, 0o4755, 0, 0, 0, 0]), eperm);
}

/// `cpu_time` becomes RLIMIT_CPU in whole seconds; the long-running profiles lift the tool
/// profile's limit through `extends`, the build profile raises it; fractions and nonsense are
/// located errors.
#[test]
fn cpu_time_is_rlimit_cpu_in_whole_seconds() {
    use carapace_policy::plan::RlimitResource;
    let cpu = |plan: &carapace_policy::Plan| {
        plan.rlimits
            .iter()
            .find(|r| r.resource == RlimitResource::Cpu)
            .map(|r| r.value)
    };
    assert_eq!(cpu(&plan_of(DEFAULT, "tool")), Some(120));
    assert_eq!(cpu(&plan_of(DEFAULT, "build")), Some(1500));
    assert_eq!(cpu(&plan_of(DEFAULT, "gateway")), None);
    assert_eq!(cpu(&plan_of(DEFAULT, "channel")), None);
    assert!(plan_of(DEFAULT, "tool")
        .explain()
        .contains("cpu time: 120 s per process"));
    let with = |v: &str| {
        format!("version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.limits]\ncpu_time = {v}\n")
    };
    assert_eq!(cpu(&plan_of(&with("\"2m\""), "p")), Some(120));
    for (bad, says) in [
        ("\"1500ms\"", "whole seconds"),
        ("\"0s\"", "cpu_time"),
        ("\"soon\"", "bad cpu_time"),
    ] {
        let e = Policy::parse(&with(bad), "t.toml")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(says) && e.contains("t.toml:5:"), "{bad}: {e}");
    }
}

#[test]
fn gateway_profile_runs_until_stopped() {
    // `wall_time = "unlimited"` lifts the tool profile's 300 s through `extends`.
    let plan = plan_of(DEFAULT, "gateway");
    assert_eq!(plan.wall_time, None);
    assert_eq!(plan.cgroup.pids, Some(256));
    assert_eq!(
        plan_of(DEFAULT, "tool").wall_time,
        Some(std::time::Duration::from_secs(300))
    );
    let p = Policy::parse(DEFAULT, "default").unwrap_or_else(|d| panic!("{d}"));
    assert!(p.broker_view("gateway").is_some_and(|b| b.exec));
}

// ---- set*id calls that keep the ids, mknod for FIFOs -----------------------------------------

/// make 4.3's child calls setresuid(-1, getuid(), -1) before exec: with `@setid-keep` every
/// set*id call that keeps the sandbox's ids passes, every real change is refused.
#[test]
fn setid_keep_allows_keeping_the_ids_and_refuses_changes() {
    let plan = plan_of(DEFAULT, "build");
    assert_eq!(plan.user.uid, 1000);
    let eperm = ret_errno(libc::EPERM);
    let garbage = 0xdead_beef_0000_0000u64;
    let cases: &[(&str, [u64; 6], u32)] = &[
        ("setresuid", [KEEP, 1000, KEEP, 0, 0, 0], RET_ALLOW),
        ("setresuid", [1000, 1000, 1000, 0, 0, 0], RET_ALLOW),
        ("setresuid", [KEEP, KEEP, KEEP, 7, 7, 7], RET_ALLOW),
        ("setresuid", [KEEP, 0, KEEP, 0, 0, 0], eperm),
        ("setresuid", [0, KEEP, KEEP, 0, 0, 0], eperm),
        ("setresuid", [KEEP, KEEP, 0, 0, 0, 0], eperm),
        ("setresuid", [KEEP, 1001, KEEP, 0, 0, 0], eperm),
        ("setresgid", [KEEP, 1000, KEEP, 0, 0, 0], RET_ALLOW),
        ("setresgid", [KEEP, 0, KEEP, 0, 0, 0], eperm),
        ("setuid", [1000, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setuid", [0, 1000, 1000, 0, 0, 0], eperm),
        ("setgid", [1000, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setgid", [0, 0, 0, 0, 0, 0], eperm),
        ("setreuid", [KEEP, 1000, 0, 0, 0, 0], RET_ALLOW),
        ("setreuid", [1000, 0, 1000, 0, 0, 0], eperm),
        ("setregid", [1000, KEEP, 0, 0, 0, 0], RET_ALLOW),
        ("setregid", [0, KEEP, 0, 0, 0, 0], eperm),
        ("setfsuid", [1000, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setfsuid", [KEEP, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setfsuid", [0, 0, 0, 0, 0, 0], eperm),
        ("setfsgid", [65534, 0, 0, 0, 0, 0], eperm),
        // The kernel reads 32-bit ids: the low word decides, whatever the high word holds.
        (
            "setresuid",
            [garbage | KEEP, garbage | 1000, u64::MAX, 0, 0, 0],
            RET_ALLOW,
        ),
        ("setuid", [garbage | 1000, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setuid", [garbage, 0, 0, 0, 0, 0], eperm),
        ("setuid", [1000 << 32, 0, 0, 0, 0, 0], eperm),
        ("setresuid", [KEEP, 1000 << 32, KEEP, 0, 0, 0], eperm),
        // Supplementary groups are not a set*id call of the group: refused.
        ("setgroups", [0, 0, 0, 0, 0, 0], eperm),
        ("setgroups", [1, 0x1000, 0, 0, 0, 0], eperm),
    ];
    for (name, args, want) in cases {
        assert_eq!(run(&plan, name, *args), *want, "{name} {args:x?}");
    }
    // Listed as conditional, never as allowed; explain says it in words.
    for (name, _, _) in carapace_policy::tables::SETID_KEEP {
        assert!(!plan.seccomp.allowed.iter().any(|a| a == name), "{name}");
        assert!(
            plan.seccomp.conditional.iter().any(|c| c.syscall == *name),
            "{name}"
        );
    }
    let text = plan.explain();
    assert!(
        text.contains("setresuid: allowed only when each uid (arguments 0, 1, 2, low 32 bits compared) is -1 or 1000 (keeps the current ids); otherwise fail with EPERM"),
        "{text}"
    );
    assert!(
        text.contains("setgid: allowed only when the gid (argument 0, low 32 bits compared) is -1 or 1000 (keeps the current ids); otherwise fail with EPERM"),
        "{text}"
    );
}

/// The ids accepted are the plan's own: uid for *uid calls, gid for *gid calls, never mixed.
#[test]
fn setid_keep_uses_the_profiles_own_uid_and_gid() {
    let plan = plan_of(SETID_OWN_USER, "p");
    assert_eq!((plan.user.uid, plan.user.gid), (1234, 4321));
    let k = RET_KILL_PROCESS;
    for (name, args, want) in [
        ("setresuid", [KEEP, 1234, KEEP, 0, 0, 0], RET_ALLOW),
        ("setresuid", [KEEP, 4321, KEEP, 0, 0, 0], k),
        ("setresuid", [KEEP, 1000, KEEP, 0, 0, 0], k),
        ("setresgid", [4321, 4321, KEEP, 0, 0, 0], RET_ALLOW),
        ("setresgid", [4321, 1234, KEEP, 0, 0, 0], k),
        ("setuid", [1234, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setgid", [1234, 0, 0, 0, 0, 0], k),
        ("setfsgid", [4321, 0, 0, 0, 0, 0], RET_ALLOW),
        ("setfsuid", [4321, 0, 0, 0, 0, 0], k),
        ("setgroups", [0, 0, 0, 0, 0, 0], k),
    ] {
        assert_eq!(run(&plan, name, args), want, "{name} {args:x?}");
    }
}

/// Without the group (the default profile as it is, or a profile of its own), set*id calls get
/// the default action whatever their arguments.
#[test]
fn setid_calls_are_refused_without_the_group() {
    let eperm = ret_errno(libc::EPERM);
    let plan = plan_of(DEFAULT, "tool");
    if !plan
        .seccomp
        .conditional
        .iter()
        .any(|c| c.syscall == "setresuid")
    {
        for (name, _, _) in carapace_policy::tables::SETID_KEEP {
            assert_eq!(
                run(&plan, name, [KEEP, 1000, KEEP, 0, 0, 0]),
                eperm,
                "{name}"
            );
            assert_eq!(run(&plan, name, [1000; 6]), eperm, "{name}");
        }
    }
    let plain = plan_of(KILL_DEFAULT, "p");
    for (name, _, _) in carapace_policy::tables::SETID_KEEP {
        assert_eq!(
            run(&plain, name, [KEEP, 1000, KEEP, 0, 0, 0]),
            RET_KILL_PROCESS,
            "{name}"
        );
    }
}

/// A set*id call allowed by name is conditioned just the same; a deny entry still wins.
#[test]
fn setid_calls_allowed_by_name_are_conditioned_too() {
    let plan = plan_of(
        "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\nallow = [\"@default\", \"setresuid\", \"@setid-keep\"]\ndeny = [{ syscall = \"setuid\", errno = \"EACCES\" }]\n",
        "p",
    );
    let eperm = ret_errno(libc::EPERM);
    assert_eq!(
        run(&plan, "setresuid", [KEEP, 1000, KEEP, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(run(&plan, "setresuid", [KEEP, 0, KEEP, 0, 0, 0]), eperm);
    assert_eq!(
        run(&plan, "setuid", [1000, 0, 0, 0, 0, 0]),
        ret_errno(libc::EACCES)
    );
}

/// mknod and mknodat (in @file-write) make FIFOs only: no device node, socket or regular file,
/// no set-id bit; the mode's low 32 bits decide.
#[test]
fn mknod_makes_fifos_only() {
    let plan = plan_of(DEFAULT, "tool");
    let eperm = ret_errno(libc::EPERM);
    for (name, at) in [("mknod", 1usize), ("mknodat", 2)] {
        let mode = |m: u64| {
            let mut a = [0u64; 6];
            a[at] = m;
            a
        };
        for ok in [
            S_IFIFO | 0o644,
            S_IFIFO,
            S_IFIFO | 0o1777,
            S_IFIFO | 0o600 | 0xffff_ffff_0000_0000,
        ] {
            assert_eq!(run(&plan, name, mode(ok)), RET_ALLOW, "{name} {ok:o}");
        }
        for bad in [
            S_IFCHR | 0o600,
            S_IFBLK | 0o600,
            S_IFSOCK | 0o600,
            S_IFREG | 0o600,
            0o644, // type 0: a regular file
            S_IFIFO | S_ISUID | 0o644,
            S_IFIFO | S_ISGID | 0o644,
            S_IFIFO | S_IFCHR,
            S_IFCHR | 0x1_0000_0000,
            0x1_0000_0000 | 0o644,
        ] {
            assert_eq!(run(&plan, name, mode(bad)), eperm, "{name} {bad:o}");
        }
        // The mode is the argument that decides, not another one.
        let mut a = [S_IFIFO | 0o644; 6];
        a[at] = S_IFCHR | 0o644;
        assert_eq!(run(&plan, name, a), eperm, "{name}");
    }
    let text = plan.explain();
    assert!(
        text.contains("mknod: allowed for FIFOs only: when the mode (argument 1, low 32 bits) masked with S_IFMT|S_ISUID|S_ISGID is S_IFIFO; otherwise fail with EPERM"),
        "{text}"
    );
    assert!(
        text.contains("mknodat: allowed for FIFOs only: when the mode (argument 2"),
        "{text}"
    );
}

/// Every syscall a group may hold only because it is always filtered is filtered however it is
/// allowed: by its group and by name; never in `allowed` without conditions.
#[test]
fn always_conditioned_syscalls_are_never_allowed_unconditionally() {
    use carapace_policy::tables::ALWAYS_CONDITIONED;
    for s in ALWAYS_CONDITIONED {
        assert!(!FORBIDDEN_IN_GROUPS.contains(s), "{s}");
        let text = format!(
            "version = 1\n[profiles.p]\nwhy = \"p\"\n[profiles.p.seccomp]\nallow = [\"@default\", \"{s}\"]\n"
        );
        for plan in [plan_of(&text, "p"), plan_of(DEFAULT, "build")] {
            assert!(!plan.seccomp.allowed.iter().any(|a| a == s), "{s}");
            let c = plan
                .seccomp
                .conditional
                .iter()
                .find(|c| c.syscall == *s)
                .unwrap_or_else(|| panic!("{s} not conditional"));
            assert_eq!(c.then, SeccompAction::Allow, "{s}");
            assert_ne!(c.otherwise, SeccompAction::Allow, "{s}");
        }
    }
    // Every set*id call of the group is in the list, and the group holds exactly them.
    let group = GROUPS
        .iter()
        .find(|g| g.name == "@setid-keep")
        .unwrap_or_else(|| panic!("no @setid-keep"));
    let names: Vec<&str> = carapace_policy::tables::SETID_KEEP
        .iter()
        .map(|(n, _, _)| *n)
        .collect();
    assert_eq!(group.syscalls, names.as_slice());
    for n in &names {
        assert!(ALWAYS_CONDITIONED.contains(n), "{n}");
    }
    assert!(!group.syscalls.contains(&"setgroups"));
}

/// For random arguments (mixing the conditions' own values, -1, set-id and file-type bits and
/// high-word garbage), every conditional syscall of every plan gets from the BPF program exactly
/// the verdict `holds()` gives.
#[test]
fn random_arguments_get_the_verdict_holds_gives() {
    let pool: [u64; 14] = [
        0,
        1,
        1000,
        1234,
        4321,
        KEEP,
        0x5401,
        0o4755,
        S_IFIFO | 0o644,
        S_IFIFO | S_ISGID,
        S_IFCHR,
        0x4000_0000,
        65534,
        0x7fff_ffff,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for plan in all_plans() {
        for c in &plan.seccomp.conditional {
            use carapace_policy::plan::ArgCondition;
            // The condition's own values, so that it holds often enough to be tested.
            let own: Vec<u64> = match &c.when {
                ArgCondition::OneOf { values, .. } | ArgCondition::EachOneOf { values, .. } => {
                    values.iter().map(|(_, v)| u64::from(*v)).collect()
                }
                ArgCondition::NoneOf { .. } => vec![0o644],
                ArgCondition::MaskedEq { value, .. } => vec![u64::from(value.1)],
            };
            let (mut held, mut failed) = (0, 0);
            for _ in 0..3000 {
                let mut a = [0u64; 6];
                for slot in &mut a {
                    let r = next();
                    let low = match r % 8 {
                        0..=3 => own[(r >> 8) as usize % own.len()],
                        4 => own[(r >> 8) as usize % own.len()] | ((r >> 20) & 0o777),
                        5 | 6 => pool[(r >> 8) as usize % pool.len()],
                        _ => (r >> 16) & 0xffff_ffff,
                    };
                    let high = if r & 2 == 0 {
                        0
                    } else {
                        next() & 0xffff_ffff_0000_0000
                    };
                    *slot = low | high;
                }
                let want = carapace_policy::fuzz::reference_verdict(
                    &plan,
                    nr(&c.syscall),
                    AUDIT_ARCH_X86_64,
                    &a,
                );
                assert_eq!(run(&plan, &c.syscall, a), want, "{} {a:x?}", c.syscall);
                if c.when.holds(&a) {
                    held += 1;
                } else {
                    failed += 1;
                }
            }
            assert!(
                held > 0 && failed > 0,
                "{}: {held} held, {failed} failed",
                c.syscall
            );
        }
    }
}

// ---- $WORKSPACE program patterns -----------------------------------------------------------

#[test]
fn workspace_patterns_match_beneath_the_requests_workspace_only() {
    let text = r#"
version = 1
[profiles.p]
why = "p"
[[exec]]
why = "test binaries of the workspace"
program = "$WORKSPACE/target/*/t-*"
profile = "p"
approval = "allow"
[[exec]]
why = "anything else in the workspace"
program = "$WORKSPACE/**"
profile = "p"
approval = "ask"
[[exec]]
why = "the rest"
program = "/**"
profile = "p"
approval = "deny"
[[test]]
command = ["$WORKSPACE/target/debug/t-unit"]
expect = "allow"
[[test]]
command = ["$WORKSPACE/configure"]
expect = "ask"
[[test]]
command = ["/carapace-test-workspace-not/x"]
expect = "deny"
"#;
    let p = Policy::parse(text, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    let at = |program: &str, workspace: Option<&str>| {
        p.evaluate(&ExecRequest {
            program: program.into(),
            args: vec![],
            workspace: workspace.map(Into::into),
        })
        .approval
    };
    let ws = Some("/srv/proj");
    assert_eq!(at("/srv/proj/target/debug/t-unit", ws), Approval::Allow);
    assert_eq!(
        at("/srv/proj/target/debug/sub/t-unit", ws),
        Approval::Ask,
        "`*` does not cross `/`"
    );
    assert_eq!(at("/srv/proj/configure", ws), Approval::Ask);
    assert_eq!(
        at("/srv/proj", ws),
        Approval::Deny,
        "the directory itself is no program"
    );
    assert_eq!(
        at("/srv/project/x", ws),
        Approval::Deny,
        "a sibling with the same prefix"
    );
    assert_eq!(at("/srv/x", ws), Approval::Deny);
    assert_eq!(
        at("/srv/proj/configure", None),
        Approval::Deny,
        "no workspace known: the pattern matches nothing"
    );
    assert_eq!(at("/usr/bin/ls", ws), Approval::Deny);
    let failed: Vec<_> = p.run_tests().into_iter().filter(|t| !t.passed).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
