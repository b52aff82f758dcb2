//! One test per validation error class: each bad policy is rejected with a located diagnostic
//! (file, line, column, message, expected), and the matching good form is accepted.

use carapace_policy::{Diagnostic, Policy};

const PROFILE: &str = r#"
[profiles.p]
why = "test profile"
"#;

const RULE: &str = r#"
[[exec]]
why = "test rule"
program = "/usr/bin/ls"
profile = "p"
approval = "allow"
"#;

/// A minimal valid policy with `extra_profile` appended to the profile table and `tail` at the
/// end of the file.
fn policy(extra_profile: &str, tail: &str) -> String {
    format!("version = 1\n{PROFILE}{extra_profile}\n{RULE}{tail}")
}

/// With CARAPACE_WRITE_CORPUS=1, every policy text used here is also written to the fuzz seed
/// corpus (fuzz/corpus/policy/validation-<hash>.toml), which `fuzz_corpus.rs` replays.
fn save_to_corpus(text: &str) {
    if std::env::var_os("CARAPACE_WRITE_CORPUS").is_none() {
        return;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/policy");
    let path = dir.join(format!("validation-{:016x}.toml", h.finish()));
    if let Err(e) = std::fs::write(&path, text) {
        panic!("{}: {e}", path.display());
    }
}

fn errors(text: &str) -> Vec<Diagnostic> {
    save_to_corpus(text);
    match Policy::parse(text, "t.toml") {
        Ok(_) => panic!("policy was accepted:\n{text}"),
        Err(d) => d.0,
    }
}

fn ok(text: &str) {
    save_to_corpus(text);
    if let Err(d) = Policy::parse(text, "t.toml") {
        panic!("policy rejected:\n{text}\n{d}");
    }
}

/// Assert exactly one diagnostic containing `needle`, at the line/column where `marker` first
/// occurs in the text (the marker's first character).
#[track_caller]
fn expect_err(text: &str, needle: &str, marker: &str) {
    let errs = errors(text);
    let Some(d) = errs.iter().find(|d| d.message.contains(needle)) else {
        panic!("no error containing {needle:?}; got:\n{errs:#?}");
    };
    assert_eq!(d.file, "t.toml");
    assert!(d.expected.is_some(), "no `expected` in {d:?}");
    let (line, col) = position(text, marker);
    assert_eq!((d.line, d.column), (line, col), "wrong location for {d:?}");
    // The rendered form carries the location, the line and the span underlined with what was
    // expected.
    let shown = d.to_string();
    assert!(shown.starts_with("error: "), "{shown}");
    assert!(
        shown.contains(&format!(" --> t.toml:{line}:{col}\n")),
        "{shown}"
    );
    assert!(
        shown.contains("^ expected ") || shown.contains("^^ expected "),
        "{shown}"
    );
}

fn position(text: &str, marker: &str) -> (usize, usize) {
    let off = text
        .find(marker)
        .unwrap_or_else(|| panic!("marker {marker:?} not in text"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[test]
fn baseline_is_valid() {
    ok(&policy("", ""));
}

#[test]
fn toml_syntax_error() {
    let text = "version = 1\n[profiles.p\nwhy = \"x\"\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 2, "{errs:?}");
    assert!(
        errs[0].to_string().contains(" --> t.toml:2:"),
        "{}",
        errs[0]
    );
}

#[test]
fn unknown_key() {
    let text = policy("colour = \"blue\"", "");
    expect_err(&text, "unknown key `colour`", "colour");
    let text = policy("[profiles.p.limits]\nmemroy = \"1GiB\"", "");
    expect_err(&text, "unknown key `memroy`", "memroy");
}

#[test]
fn wrong_type() {
    let text = policy("hostname = 7", "");
    expect_err(&text, "invalid type", "7");
    let text = policy("[profiles.p.limits]\ncore_dumps = \"no\"", "");
    expect_err(&text, "invalid type", "\"no\"");
}

#[test]
fn missing_required_keys() {
    // version
    let text = format!("{PROFILE}{RULE}");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|d| d.message.contains("`version`") && d.line == 1),
        "{errs:?}"
    );
    // why of a profile
    let text = "version = 1\n[profiles.p]\nhostname = \"h\"\n";
    expect_err(text, "missing required key `why` in profile `p`", "p]");
    // why, program, profile, approval of a rule: all reported at once, at the rule header
    let text = "version = 1\n[profiles.p]\nwhy = \"x\"\n[[exec]]\nargs = []\n";
    let errs = errors(text);
    for key in ["why", "program", "profile", "approval"] {
        let d = errs
            .iter()
            .find(|d| d.message.contains(&format!("missing required key `{key}`")))
            .unwrap_or_else(|| panic!("no missing `{key}` in {errs:#?}"));
        assert_eq!((d.line, d.column), (4, 1), "{d:?}");
    }
    // an empty why is no why
    let text = policy("", "").replace("why = \"test rule\"", "why = \" \"");
    expect_err(&text, "empty `why` in [[exec]] rule #1", "\" \"");
    let text = policy("", "").replace("why = \"test profile\"", "why = \"\"");
    expect_err(&text, "empty `why` in profile `p`", "\"\"");
    // a deny rule may omit the profile
    ok("version = 1\n[[exec]]\nwhy = \"no\"\nprogram = \"/usr/bin/su\"\napproval = \"deny\"\n");
}

#[test]
fn unsupported_version() {
    let text = policy("", "").replacen("version = 1", "version = 2", 1);
    expect_err(&text, "unsupported policy version 2", "2");
    let text = policy("", "").replacen("version = 1", "version = \"1\"", 1);
    expect_err(&text, "invalid type", "\"1\"");
}

#[test]
fn unknown_syscall_name() {
    let text = policy("[profiles.p.seccomp]\nallow = [\"read\", \"fly\"]", "");
    expect_err(&text, "unknown syscall `fly`", "\"fly\"");
    let text = policy(
        "[profiles.p.seccomp]\ndeny = [{ syscall = \"teleport\" }]",
        "",
    );
    expect_err(&text, "unknown syscall `teleport`", "\"teleport\"");
    ok(&policy(
        "[profiles.p.seccomp]\nallow = [\"read\", \"fchmodat2\", \"file_setattr\"]",
        "",
    ));
}

#[test]
fn misspelt_syscalls_and_groups_get_a_suggestion() {
    let help = |text: &str, needle: &str| {
        errors(text)
            .into_iter()
            .find(|d| d.message.contains(needle))
            .and_then(|d| d.help)
    };
    let text = policy("[profiles.p.seccomp]\nallow = [\"opnat\", \"@proces\"]", "");
    assert_eq!(
        help(&text, "`opnat`").as_deref(),
        Some("did you mean `openat`?")
    );
    assert_eq!(
        help(&text, "`@proces`").as_deref(),
        Some("did you mean `@process`?")
    );
    let text = policy("[profiles.p.seccomp]\ndeny = [{ syscall = \"ptrac\" }]", "");
    assert_eq!(
        help(&text, "`ptrac`").as_deref(),
        Some("did you mean `ptrace`?")
    );
    // Nothing close: no guess.
    let text = policy("[profiles.p.seccomp]\nallow = [\"fly\"]", "");
    assert_eq!(help(&text, "`fly`"), None);
}

#[test]
fn unknown_syscall_group() {
    let text = policy(
        "[profiles.p.seccomp]\nallow = [\"@default\", \"@everything\"]",
        "",
    );
    expect_err(
        &text,
        "unknown syscall group `@everything`",
        "\"@everything\"",
    );
}

#[test]
fn unknown_errno_name() {
    let text = policy("[profiles.p.seccomp]\nerrno = \"EWHATEVER\"", "");
    expect_err(&text, "unknown errno `EWHATEVER`", "\"EWHATEVER\"");
    let text = policy(
        "[profiles.p.seccomp]\ndeny = [{ syscall = \"ptrace\", errno = \"ENOPE\" }]",
        "",
    );
    expect_err(&text, "unknown errno `ENOPE`", "\"ENOPE\"");
    ok(&policy("[profiles.p.seccomp]\nerrno = \"EACCES\"", ""));
}

#[test]
fn unknown_socket_domain_ioctl_and_clone_flag() {
    let text = policy(
        "[profiles.p.seccomp]\nsocket_domains = [\"AF_UNIX\", \"AF_MARS\"]",
        "",
    );
    expect_err(&text, "unknown socket domain `AF_MARS`", "\"AF_MARS\"");
    let text = policy("[profiles.p.seccomp]\nioctl_requests = [\"TIOCFOO\"]", "");
    expect_err(&text, "unknown ioctl request `TIOCFOO`", "\"TIOCFOO\"");
    let text = policy(
        "[profiles.p.seccomp]\nclone_deny_flags = [\"CLONE_NEWFOO\"]",
        "",
    );
    expect_err(
        &text,
        "unknown clone flag `CLONE_NEWFOO`",
        "\"CLONE_NEWFOO\"",
    );
}

#[test]
fn relative_path() {
    let text = policy(
        "[profiles.p.filesystem]\nmounts = [{ path = \"usr\", access = \"read\" }]",
        "",
    );
    expect_err(&text, "the path is relative", "\"usr\"");
    let text = policy("", "").replace("\"/usr/bin/ls\"", "\"ls\"");
    expect_err(&text, "the path is relative", "\"ls\"");
}

#[test]
fn non_normalized_paths() {
    for (path, why) in [
        ("/usr/../etc", "`..`"),
        ("/usr/./lib", "`.`"),
        ("/usr//lib", "`//`"),
        ("/usr/lib/", "ends with `/`"),
        ("/usr\\u0000x", "NUL"),
    ] {
        let text = policy(
            &format!("[profiles.p.filesystem]\ntmpfs = [{{ path = \"{path}\", size = \"1MiB\" }}]"),
            "",
        );
        let errs = errors(&text);
        assert!(
            errs.iter().any(|d| d.message.contains(why) && d.line == 6),
            "{path}: {errs:#?}"
        );
    }
}

#[test]
fn duplicate_mount_destination() {
    let text = policy(
        "[profiles.p.filesystem]\nmounts = [{ path = \"/usr\", access = \"read\" }, { path = \"/usr\", access = \"read-exec\" }]",
        "",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0]
        .message
        .contains("duplicate mount destination `/usr`"));
    // the second occurrence is the one reported
    let second = text.rfind("\"/usr\"").unwrap_or(0);
    let line_start = text[..second].rfind('\n').map_or(0, |i| i + 1);
    assert_eq!(errs[0].column, second - line_start + 1, "{errs:#?}");
    // ... with the first one pointed at as a secondary label
    let first = text.find("\"/usr\"").unwrap_or(0);
    assert_eq!(errs[0].labels.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].labels[0].span.start, first, "{errs:#?}");
    assert_eq!(errs[0].labels[0].message, "first used here");
    assert!(
        errs[0].to_string().contains("- first used here"),
        "{}",
        errs[0]
    );
    // clashing with the built-in /proc
    let text = policy(
        "[profiles.p.filesystem]\ntmpfs = [{ path = \"/proc\", size = \"1MiB\" }]",
        "",
    );
    expect_err(&text, "duplicate mount destination `/proc`", "\"/proc\"");
    // with proc disabled it is fine
    ok(&policy(
        "[profiles.p.filesystem]\nproc = false\ntmpfs = [{ path = \"/proc\", size = \"1MiB\" }]",
        "",
    ));
}

#[test]
fn impossible_sizes() {
    for (key, value, needle) in [
        ("memory", "\"0\"", "0 is impossible"),
        ("memory", "0", "0 is impossible"),
        ("memory", "\"10QB\"", "unknown size unit"),
        ("memory", "\"99999999999999999999\"", "too large"),
        ("memory", "\"20000000TiB\"", "overflows"),
        ("memory", "\"512KiB\"", "below the minimum of 1 MiB"),
        ("memory", "-5", "negative"),
        ("file_size", "\"lots\"", "does not start with a number"),
        ("pids", "0", "count of 0"),
        ("open_files", "-1", "negative"),
        ("cpu", "0.0", "impossible"),
    ] {
        let text = policy(&format!("[profiles.p.limits]\n{key} = {value}"), "");
        let errs = errors(&text);
        assert!(
            errs.iter()
                .any(|d| d.message.contains(needle) && d.line == 6),
            "{key} = {value}: {errs:#?}"
        );
    }
    let text = policy(
        "[profiles.p.filesystem]\ntmpfs = [{ path = \"/tmp\", size = \"0B\" }]",
        "",
    );
    expect_err(&text, "impossible size", "\"0B\"");
}

#[test]
fn wall_time_zero_or_unparseable() {
    let text = policy("[profiles.p.limits]\nwall_time = \"0s\"", "");
    expect_err(&text, "duration of 0", "\"0s\"");
    let text = policy("[profiles.p.limits]\nwall_time = \"a while\"", "");
    expect_err(&text, "bad wall_time", "\"a while\"");
    let text = policy("[profiles.p.limits]\nwall_time = \"5 fortnights\"", "");
    expect_err(&text, "unknown duration unit", "\"5 fortnights\"");
    ok(&policy("[profiles.p.limits]\nwall_time = \"5m\"", ""));
}

#[test]
fn reference_to_missing_profile() {
    let text = policy("", "").replace("profile = \"p\"", "profile = \"q\"");
    expect_err(&text, "profile `q`, which does not exist", "\"q\"");
    let text = policy("extends = \"base\"", "");
    expect_err(&text, "extends `base`, which does not exist", "\"base\"");
    let text = policy(
        "",
        "\n[[test]]\ncommand = [\"/usr/bin/ls\"]\nexpect = \"allow\"\nprofile = \"nope\"\n",
    );
    expect_err(&text, "profile `nope`, which does not exist", "\"nope\"");
}

#[test]
fn disabling_user_pid_or_mount_namespace() {
    for ns in ["user", "pid", "mount"] {
        let text = policy(&format!("namespaces = {{ {ns} = false }}"), "");
        expect_err(
            &text,
            &format!("the {ns} namespace cannot be disabled"),
            "false",
        );
    }
    ok(&policy(
        "namespaces = { ipc = false, uts = false, cgroup = false }",
        "",
    ));
}

#[test]
fn extends_cycle() {
    let text = format!(
        "version = 1\n[profiles.a]\nwhy = \"a\"\nextends = \"b\"\n[profiles.b]\nwhy = \"b\"\nextends = \"a\"\n{RULE}"
    )
    .replace("profile = \"p\"", "profile = \"a\"");
    let errs = errors(&text);
    let cyc: Vec<_> = errs
        .iter()
        .filter(|d| d.message.contains("`extends` cycle"))
        .collect();
    assert_eq!(cyc.len(), 2, "{errs:#?}");
    assert!(cyc[0].message.contains("a -> b -> a"), "{cyc:?}");
    assert_eq!((cyc[0].line, cyc[0].column), (4, 11));
    // self-extension too
    let text = policy("extends = \"p\"", "");
    expect_err(&text, "`extends` cycle: p -> p", "\"p\"\n");
}

#[test]
fn rule_that_can_never_match() {
    // shadowed by a glob covering its program, with no args restriction
    let tail = "\n[[exec]]\nwhy = \"later\"\nprogram = \"/usr/bin/ls\"\nargs = [\"-l\"]\nprofile = \"p\"\napproval = \"ask\"\n";
    let text = policy("", tail).replace(
        "program = \"/usr/bin/ls\"\nprofile",
        "program = \"/usr/**\"\nprofile",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].message.contains("rule #2 can never match"),
        "{errs:?}"
    );
    assert_eq!(errs[0].line, position(&text, "[[exec]]\nwhy = \"later\"").0);
    // shadowed by a broader glob
    let tail = "\n[[exec]]\nwhy = \"later\"\nprogram = \"/usr/bin/*\"\nprofile = \"p\"\napproval = \"ask\"\n";
    let text = policy("", tail).replace(
        "program = \"/usr/bin/ls\"\nprofile",
        "program = \"/**\"\nprofile",
    );
    expect_err(&text, "can never match", "[[exec]]\nwhy = \"later\"");
    // an args restriction on the earlier rule leaves room for the later one
    let tail = "\n[[exec]]\nwhy = \"later\"\nprogram = \"/usr/bin/ls\"\nprofile = \"p\"\napproval = \"ask\"\n";
    ok(&policy("", tail).replace(
        "approval = \"allow\"",
        "approval = \"allow\"\nargs = [\"-l\"]",
    ));
    // an empty program list
    let text = policy("", "").replace("program = \"/usr/bin/ls\"", "programs = []");
    expect_err(&text, "empty program list", "[]");
}

#[test]
fn landlock_min_abi_out_of_range() {
    for v in ["0", "8", "-1"] {
        let text = policy(&format!("[profiles.p.landlock]\nmin_abi = {v}"), "");
        expect_err(&text, "out of range", &format!("= {v}")[2..]);
    }
    ok(&policy("[profiles.p.landlock]\nmin_abi = 7", ""));
}

#[test]
fn test_with_empty_or_relative_command() {
    let text = policy("", "\n[[test]]\ncommand = []\nexpect = \"allow\"\n");
    expect_err(&text, "empty test command", "[]");
    let text = policy(
        "",
        "\n[[test]]\ncommand = [\"ls\", \"-l\"]\nexpect = \"allow\"\n",
    );
    expect_err(&text, "test program `ls` is relative", "\"ls\"");
    let text = policy(
        "",
        "\n[[test]]\ncommand = [\"/usr/bin/ls\"]\nexpect = \"maybe\"\n",
    );
    expect_err(&text, "unknown decision `maybe`", "\"maybe\"");
}

#[test]
fn network_mode_other_than_none() {
    let text = policy("[profiles.p.network]\nmode = \"host\"", "");
    expect_err(&text, "unsupported network mode `host`", "\"host\"");
    let text = policy("namespaces = { net = false }", "");
    expect_err(&text, "net namespace cannot be disabled", "false");
}

/// A second profile `d` (for a daemon, no exec rule uses it) with network mode "brokered" and
/// `broker` as its broker section.
fn brokered(broker: &str) -> String {
    policy(
        "",
        &format!(
            "\n[profiles.d]\nwhy = \"a daemon\"\n[profiles.d.network]\nmode = \"brokered\"\n{broker}"
        ),
    )
}

#[test]
fn brokered_network_forwards_exact_connect_hosts() {
    let good = brokered(
        "[profiles.d.broker]\nconnect = [\n  { host = \"chat.example.org\", port = 443, why = \"its service\" },\n  { host = \"cdn.example.org\", port = 443, why = \"attachments\" },\n  { host = \"chat.example.org\", port = 8443, why = \"its other port\" },\n]",
    );
    ok(&good);
    let policy = Policy::parse(&good, "t.toml").unwrap();
    let target = carapace_policy::Target { landlock_abi: 7 };
    let plan = policy.compile("d", &target).unwrap();
    let f = plan.network.forwards();
    let seen: Vec<String> = f
        .iter()
        .map(|f| format!("{}:{}@{}", f.host, f.port, f.addr))
        .collect();
    // One loopback address per name, in order; each (host, port) once.
    assert_eq!(
        seen,
        [
            "chat.example.org:443@127.0.0.2",
            "cdn.example.org:443@127.0.0.3",
            "chat.example.org:8443@127.0.0.2"
        ]
    );
    assert_eq!(plan.landlock.tcp_connect, [443, 8443]);
    let hosts = plan
        .mounts
        .iter()
        .find_map(|m| match m {
            carapace_policy::plan::Mount::File { dst, contents } if dst.ends_with("etc/hosts") => {
                Some(contents.clone())
            }
            _ => None,
        })
        .expect("a brokered network writes /etc/hosts");
    assert!(hosts.contains("127.0.0.2\tchat.example.org\n"), "{hosts}");
    assert!(hosts.contains("127.0.0.3\tcdn.example.org\n"), "{hosts}");
    assert_eq!(hosts.matches("chat.example.org").count(), 1, "{hosts}");
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    assert!(plan.explain().contains("brokered"), "{}", plan.explain());
    // Mode "none" forwards nothing and writes no hosts file.
    let none = policy.compile("p", &target).unwrap();
    assert!(none.network.forwards().is_empty());
    assert!(none.landlock.tcp_connect.is_empty());
    assert!(!none
        .mounts
        .iter()
        .any(|m| matches!(m, carapace_policy::plan::Mount::File { .. })));
}

#[test]
fn brokered_network_needs_exact_connect_hosts_and_no_tool_rule() {
    let text = brokered("");
    expect_err(&text, "no `connect` rule", "\"brokered\"");
    let text = brokered(
        "[profiles.d.broker]\nconnect = [{ host = \"*.example.org\", port = 443, why = \"any\" }]",
    );
    expect_err(&text, "`*.example.org` cannot be forwarded", "connect = [");
    let text = brokered(
        "[profiles.d.broker]\nconnect = [{ host = \"192.0.2.7\", port = 443, why = \"an address\" }]",
    );
    expect_err(&text, "`192.0.2.7` cannot be forwarded", "connect = [");
    let text = brokered(
        "[profiles.d.filesystem]\nmounts = [{ path = \"/etc/hosts\", access = \"read\", why = \"hosts\" }]\n[profiles.d.broker]\nconnect = [{ host = \"a.example.org\", port = 443, why = \"a\" }]",
    );
    expect_err(&text, "writes the sandbox's /etc/hosts", "\"brokered\"");
    // An exec rule may not run tools in it.
    let text = brokered(
        "[profiles.d.broker]\nconnect = [{ host = \"a.example.org\", port = 443, why = \"a\" }]",
    )
    .replace("profile = \"p\"", "profile = \"d\"");
    expect_err(&text, "only children of `carapace run`", "[[exec]]");
}

#[test]
fn all_errors_are_collected() {
    let text = policy(
        "[profiles.p.limits]\nmemory = \"0\"\npids = 0\nwall_time = \"x\"\n[profiles.p.seccomp]\nallow = [\"nope\", \"@nope\"]",
        "",
    )
    .replace("approval = \"allow\"", "approval = \"sometimes\"");
    let errs = errors(&text);
    assert_eq!(errs.len(), 6, "{errs:#?}");
    // sorted by location
    let mut sorted = errs.clone();
    sorted.sort_by_key(|d| (d.line, d.column));
    assert_eq!(errs, sorted);
}

#[test]
fn rendering_of_a_diagnostic() {
    let text = policy("[profiles.p.limits]\nmemory = \"12 parsecs\"", "");
    let errs = errors(&text);
    let shown = errs[0].to_string();
    let expected = "error: impossible memory limit: unknown size unit `parsecs`\n --> t.toml:6:10\n  |\n6 | memory = \"12 parsecs\"\n  |          ^^^^^^^^^^^^ expected a size: an integer number of bytes, or a string like \"64MiB\" (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)";
    assert_eq!(shown, expected);
}

#[test]
fn bad_globs_and_approvals() {
    let text = policy("", "").replace("\"/usr/bin/ls\"", "\"/usr/bin/[ls\"");
    expect_err(&text, "bad glob", "\"/usr/bin/[ls\"");
    let text = policy("", "").replace("\"allow\"", "\"yes\"");
    expect_err(&text, "unknown approval `yes`", "\"yes\"");
    let text = policy(
        "[profiles.p.filesystem]\nmounts = [{ path = \"/usr\", access = \"everything\" }]",
        "",
    );
    expect_err(&text, "unknown access `everything`", "\"everything\"");
}

#[test]
fn host_kernel_interfaces_and_mounts_beneath_symlinks() {
    let text = policy(
        "[profiles.p.filesystem]\nmounts = [{ path = \"/proc/1\", access = \"read\" }]",
        "",
    );
    expect_err(&text, "host's kernel interfaces", "\"/proc/1\"");
    let text = policy(
        "[profiles.p.filesystem]\nmounts = [{ path = \"/sys\", access = \"read\" }]",
        "",
    );
    expect_err(&text, "host's kernel interfaces", "\"/sys\"");
    let text = policy(
        "[profiles.p.filesystem]\nsymlinks = [{ path = \"/bin\", target = \"usr/bin\" }]\nmounts = [{ path = \"/bin/x\", access = \"read\" }]",
        "",
    );
    expect_err(&text, "beneath the symlink `/bin`", "\"/bin/x\"");
    ok(&policy(
        "[profiles.p.filesystem]\nsymlinks = [{ path = \"/bin\", target = \"usr/bin\" }]\nmounts = [{ path = \"/binx\", access = \"read\" }]",
        "",
    ));
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_at_once() {
    let text = policy(
        "colour = 1\nhostname = 7\n[profiles.p.limits]\nmemroy = \"1GiB\"\ncore_dumps = \"no\"\n[profiles.p.seccomp]\nallow = [\"read\", 3]",
        "",
    )
    .replace("approval = \"allow\"", "approval = \"allow\"\nfrobnicate = true");
    let errs = errors(&text);
    let msgs: Vec<&str> = errs.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(errs.len(), 6, "{msgs:#?}");
    for (needle, marker) in [
        ("unknown key `colour`", "colour"),
        ("invalid type: integer for `hostname`", "7"),
        ("unknown key `memroy`", "memroy"),
        ("invalid type: string for `core_dumps`", "\"no\""),
        ("invalid type: integer for `allow`", "3]"),
        ("unknown key `frobnicate`", "frobnicate"),
    ] {
        expect_err(&text, needle, marker);
    }
}

#[test]
fn every_toml_syntax_error_is_reported() {
    let text = "version = 1\n[profiles.p\nwhy = \"x\"\n[[exec]]\nwhy = \nprogram = \"/a\"\n";
    let errs = errors(text);
    assert!(errs.len() >= 2, "{errs:#?}");
    assert!(errs.iter().any(|d| d.line == 2), "{errs:#?}");
    assert!(errs.iter().any(|d| d.line == 5), "{errs:#?}");
}

#[test]
fn shape_errors_and_semantic_errors_are_reported_together() {
    let text = "version = 1\n[profiles.p]\nwhy = 3\ncolour = 1\nuser = { uid = -1 }\n[profiles.p.limits]\nmemory = \"0\"\n[[exec]]\nwhy = \"x\"\nprogram = \"ls\"\nprofile = \"q\"\napproval = \"allow\"\n[[exec]]\n";
    let errs = errors(text);
    let msgs: Vec<&str> = errs.iter().map(|d| d.message.as_str()).collect();
    for needle in [
        "invalid type: integer for `why`",
        "unknown key `colour`",
        "integer -1 out of range for `uid`",
        "impossible memory limit",
        "bad path `ls`",
        "profile `q`, which does not exist",
        "missing required key `approval` in [[exec]] rule #2",
    ] {
        assert!(
            msgs.iter().any(|m| m.contains(needle)),
            "no {needle:?} in {msgs:#?}"
        );
    }
    // The placeholder standing in for `why = 3` causes no second error (no "missing why").
    assert!(
        !msgs
            .iter()
            .any(|m| m.contains("missing required key `why` in profile")),
        "{msgs:#?}"
    );
}

#[test]
fn long_lines_are_shown_as_a_window_around_the_error() {
    let pad = "a".repeat(300);
    let text = policy(&format!("hostname = \"{pad}\"\n"), "");
    let errs = errors(&text);
    let shown = errs[0].to_string();
    assert!(errs[0].message.contains("bad hostname"), "{shown}");
    let snippet = shown.lines().nth(3).unwrap_or_default();
    assert!(snippet.len() < 140, "{snippet}");
    // deep nesting is refused by the TOML parser, not by a stack overflow
    let deep = format!("version = {}{}", "[".repeat(5000), "]".repeat(5000));
    let errs = errors(&deep);
    assert!(errs[0].to_string().len() < 400);
}

#[test]
fn wall_time_unlimited_is_the_only_word() {
    let ok = policy("[profiles.p.limits]\nwall_time = \"unlimited\"", "");
    assert!(Policy::parse(&ok, "t.toml").is_ok());
    let text = policy("[profiles.p.limits]\nwall_time = \"forever\"", "");
    expect_err(&text, "bad wall_time", "\"forever\"");
}

#[test]
fn workspace_program_patterns() {
    let rule = |program: &str| {
        format!(
            "\n[[exec]]\nwhy = \"in the workspace\"\nprogram = \"{program}\"\nprofile = \"p\"\napproval = \"ask\"\n"
        )
    };
    ok(&policy("", &rule("$WORKSPACE/**")));
    ok(&policy("", &rule("$WORKSPACE/target/debug/*")));
    ok(&policy("", &rule("$WORKSPACE/configure")));
    for bad in [
        "$WORKSPACE",
        "$WORKSPACE/",
        "$WORKSPACEX/a",
        "$WORKSPACE/a/../b",
        "$WORKSPACE//a",
    ] {
        let text = policy("", &rule(bad));
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{bad}: {errs:#?}");
    }
    expect_err(
        &policy("", &rule("$WORKSPACE")),
        "`$WORKSPACE` must be followed by `/`",
        "\"$WORKSPACE\"",
    );
    expect_err(
        &policy("", &rule("$HOME/bin/x")),
        "unknown variable in program `$HOME/bin/x`",
        "\"$HOME/bin/x\"",
    );
    // Shadowing: the catch-all covers every workspace; a workspace glob covers what is
    // beneath it; an ordinary glob does not (the workspace may be anywhere).
    let catch_all = policy("", &rule("$WORKSPACE/x")).replace(
        "program = \"/usr/bin/ls\"\nprofile",
        "program = \"/**\"\nprofile",
    );
    expect_err(
        &catch_all,
        "can never match",
        "[[exec]]\nwhy = \"in the workspace\"",
    );
    let nested = format!(
        "{}{}",
        policy("", &rule("$WORKSPACE/**")),
        rule("$WORKSPACE/bin/x").replace("in the workspace", "nested")
    );
    expect_err(&nested, "can never match", "[[exec]]\nwhy = \"nested\"");
    let usr = policy("", &rule("$WORKSPACE/x")).replace(
        "program = \"/usr/bin/ls\"\nprofile",
        "program = \"/usr/**\"\nprofile",
    );
    ok(&usr);
    // [[test]] commands may name a program in the workspace.
    ok(&policy(
        "",
        &format!(
            "{}\n[[test]]\ncommand = [\"$WORKSPACE/bin/t\"]\nexpect = \"ask\"\n",
            rule("$WORKSPACE/**")
        ),
    ));
}
