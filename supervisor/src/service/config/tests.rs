//! Tests of the configuration: every key, default and error.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, "test.toml")
}

/// The messages of a configuration that must fail, each with its line:column.
fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(c) => panic!("accepted: {text}\n{c:?}"),
        Err(e) => e
            .diagnostics()
            .iter()
            .map(|d| {
                let help = d
                    .help
                    .as_deref()
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                format!("{}:{}: {}{help}", d.line, d.column, d.message)
            })
            .collect(),
    }
}

fn has(errs: &[String], needle: &str) -> bool {
    errs.iter().any(|e| e.contains(needle))
}

#[test]
fn embedded_default_parses() {
    let c = parse(DEFAULT_CONFIG_TEXT).expect("the embedded default is valid");
    assert!(c.policy.is_empty());
    assert_eq!(c.state_dir, crate::paths::default_state_dir());
    assert_eq!(c.runtime_dir, crate::paths::default_runtime_dir());
    assert_eq!(c.log_format, LogFormat::Auto);
    assert_eq!(c.log_level, tracing::Level::INFO);
    assert_eq!(c.stop_timeout, Duration::from_secs(10));
    assert_eq!(c.approval_timeout, Duration::from_secs(120));
    assert!(c.watchdog);
    assert_eq!(c.control_group, None);
    let gw = c.gateway.as_ref().expect("a gateway");
    assert!(gw.is_gateway);
    assert_eq!(gw.program, "carapace-gateway");
    assert_eq!(gw.profile, "gateway");
    assert_eq!(gw.listen, Some("127.0.0.1:8750".parse().unwrap()));
    assert_eq!(gw.workspace, c.state_dir.join("gateway"));
    assert_eq!(gw.restart, RestartConfig::default());
    assert!(c.channels.is_empty());
    assert_eq!(
        c.children().map(|(n, _)| n).collect::<Vec<_>>(),
        vec!["gateway"]
    );
    // The embedded default policy has the profile the default gateway runs under.
    let policy = carapace_policy::Policy::parse(crate::embedded::DEFAULT_POLICY, "default")
        .expect("default policy");
    assert!(policy.profile_names().contains(&gw.profile.as_str()));
}

#[test]
fn load_without_a_file_is_the_embedded_default() {
    if Path::new(crate::paths::DEFAULT_CONFIG).exists() {
        return; // a real installation: load reads it, not the embedded default
    }
    let (c, name) = Config::load(None).expect("embedded");
    assert_eq!(name, DEFAULT_CONFIG_NAME);
    assert_eq!(c, parse(DEFAULT_CONFIG_TEXT).unwrap());
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[supervisor]\nstate_dir = \"/srv/c\"\n").unwrap();
    let (c, name) = Config::load(Some(&p)).expect("load");
    assert_eq!(name, p.display().to_string());
    assert_eq!(c.state_dir, PathBuf::from("/srv/c"));
    assert_eq!(c.gateway, None, "no [gateway] table = no gateway");
    let missing = dir.path().join("nope.toml");
    let e = Config::load(Some(&missing)).expect_err("missing");
    assert!(matches!(e, ConfigErrors::Read { .. }));
    assert!(e.to_string().contains("nope.toml"), "{e}");
    std::fs::write(&p, "[supervisor]\nstate_dir = 5\n").unwrap();
    let e = Config::load(Some(&p)).expect_err("invalid");
    assert!(
        e.to_string()
            .contains(&format!(" --> {}:2:13\n", p.display())),
        "{e}"
    );
}

#[test]
fn a_full_file() {
    let c = parse(
        r#"
# comment
[supervisor]
policy = ["/etc/carapace/a.toml", '/etc/carapace/b.toml']  # merged in order
state_dir = "/var/lib/c"
runtime_dir = "/run/c"
log_format = "json"
log_level = "debug"
stop_timeout = 3
approval_timeout = "5m"
watchdog = false

[control]
group = 0

[metrics]
listen = "10.0.0.1:9464"
allow_non_loopback = true

[gateway]
program = "/opt/gw/bin/gw"
args = ["--flag", "x y"]
profile = "gw"
listen = "[::1]:9000"
workspace = "/srv/gw"
restart.initial_delay = "1s"
restart.max_delay = "1m"
environment = { RUST_LOG = "debug", "LANG" = "C.UTF-8" }

[channels.tg-1]
program = "tg"
[channels.tg-1.restart]
crash_loop_restarts = 0x0a
crash_loop_window = "2h"

[channels.mail]
program = "/usr/lib/carapace/mail"
profile = "channel-mail"
"#,
    )
    .expect("valid");
    assert_eq!(
        c.policy,
        vec![
            PathBuf::from("/etc/carapace/a.toml"),
            PathBuf::from("/etc/carapace/b.toml")
        ]
    );
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.log_level, tracing::Level::DEBUG);
    assert_eq!(c.stop_timeout, Duration::from_secs(3));
    assert_eq!(c.approval_timeout, Duration::from_secs(300));
    assert!(!c.watchdog);
    assert_eq!(c.control_group, Some(0));
    assert_eq!(c.metrics.listen, Some("10.0.0.1:9464".parse().unwrap()));
    let gw = c.gateway.clone().unwrap();
    assert_eq!(gw.args, vec!["--flag", "x y"]);
    assert_eq!(gw.listen, Some("[::1]:9000".parse().unwrap()));
    assert_eq!(gw.workspace, PathBuf::from("/srv/gw"));
    assert_eq!(gw.restart.initial_delay, Duration::from_secs(1));
    assert_eq!(gw.restart.max_delay, Duration::from_secs(60));
    assert_eq!(gw.restart.crash_loop_restarts, 5);
    assert_eq!(
        gw.environment.get("LANG").map(String::as_str),
        Some("C.UTF-8")
    );
    assert_eq!(
        gw.resolve_program(Path::new("/usr/bin"), Path::new(LIBEXEC_DIR))
            .unwrap(),
        PathBuf::from("/opt/gw/bin/gw")
    );
    let tg = &c.channels["tg-1"];
    assert!(!tg.is_gateway);
    assert_eq!(tg.profile, "channel");
    assert_eq!(tg.listen, None);
    assert_eq!(tg.workspace, PathBuf::from("/var/lib/c/channels/tg-1"));
    assert_eq!(tg.restart.crash_loop_restarts, 10);
    assert_eq!(tg.restart.crash_loop_window, Duration::from_secs(7200));
    // A bare name is looked up on disk: see bare_program_next_to_carapace_then_in_libexec.
    assert_eq!(tg.program, "tg");
    assert_eq!(
        c.children().map(|(n, _)| n).collect::<Vec<_>>(),
        vec!["gateway", "mail", "tg-1"]
    );
}

#[test]
fn an_empty_file_has_defaults_and_no_gateway() {
    let c = parse("").unwrap();
    assert_eq!(c.gateway, None);
    assert_eq!(c.children().count(), 0);
    let c = parse("[gateway]\n").unwrap();
    let gw = c.gateway.unwrap();
    assert_eq!(gw.program, "carapace-gateway");
    assert_eq!(gw.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
    let c = parse("[gateway]\nlisten = \"none\"\n").unwrap();
    assert_eq!(c.gateway.unwrap().listen, None);
}

#[test]
fn unknown_keys_with_suggestions_all_reported() {
    let e = errors(
            "[supervisor]\nstate_dri = \"/x\"\nwatchdgo = true\n[gateway]\nprofil = \"g\"\nlisten_addr = \"x\"\n[gateway.restart]\nmax_dealy = 1\n[extra]\n",
        );
    assert!(
        has(
            &e,
            "2:1: unknown key `state_dri` in [supervisor]; did you mean `state_dir`?"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "3:1: unknown key `watchdgo` in [supervisor]; did you mean `watchdog`?"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "5:1: unknown key `profil` in [gateway]; did you mean `profile`?"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "6:1: unknown key `listen_addr` in [gateway]"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "8:1: unknown key `max_dealy` in [gateway.restart]; did you mean `max_delay`?"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "9:2: unknown key `extra` in the top level"),
        "{e:?}"
    );
    assert_eq!(e.len(), 6, "{e:?}");
    // Only a webhook channel listens.
    let e = errors("[channels.a]\nprogram = \"a\"\nlisten = \"127.0.0.1:1\"\n");
    assert!(
        has(
            &e,
            "3:1: `listen` is a key of kind = \"webhook\", and [channels.a] has no `kind`"
        ),
        "{e:?}"
    );
}

#[test]
fn display_is_located_with_expected_and_caret() {
    let e = parse("[supervisor]\nlog_level = \"loud\"\n").unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("error: unknown log level \"loud\"\n --> test.toml:2:13\n"),
        "{s}"
    );
    assert!(s.contains("2 | log_level = \"loud\""), "{s}");
    assert!(
        s.contains("|             ^^^^^^ expected one of \"error\", \"warn\""),
        "{s}"
    );
}

#[test]
fn wrong_types() {
    let e = errors(
            "supervisor = 1\ncontrol = []\n[gateway]\nprogram = 1\nargs = \"x\"\nallow_non_loopback = \"yes\"\nenvironment = { A = 1 }\nrestart = 3\n",
        );
    assert!(
        has(&e, "1:14: invalid type: integer for `supervisor`"),
        "{e:?}"
    );
    assert!(has(&e, "2:11: invalid type: array for `control`"), "{e:?}");
    assert!(
        has(&e, "4:11: invalid type: integer for `program`"),
        "{e:?}"
    );
    assert!(has(&e, "5:8: invalid type: string for `args`"), "{e:?}");
    assert!(
        has(&e, "6:22: invalid type: string for `allow_non_loopback`"),
        "{e:?}"
    );
    assert!(has(&e, "7:21: invalid type: integer for `A`"), "{e:?}");
    assert!(
        has(&e, "8:11: invalid type: integer for `restart`"),
        "{e:?}"
    );
    let e = errors("[supervisor]\npolicy = 3\n[gateway]\nargs = [\"a\", 2]\n");
    assert!(has(&e, "2:10: invalid type: integer for `policy`"), "{e:?}");
    assert!(has(&e, "4:14: invalid type: integer for `args`"), "{e:?}");
}

#[test]
fn paths_must_be_absolute_and_normalized() {
    let e = errors(
            "[supervisor]\npolicy = [\"policy.toml\", \"/etc/../p\"]\nstate_dir = \"var/lib\"\nruntime_dir = \"/run/c/\"\n[gateway]\nworkspace = \"/a//b\"\nprogram = \"bin/gw\"\n",
        );
    assert!(
        has(
            &e,
            "2:11: policy file \"policy.toml\": the path is relative"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "2:26: policy file \"/etc/../p\": the path contains a `..` component"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "3:13: `state_dir` = \"var/lib\": the path is relative"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "4:15: `runtime_dir` = \"/run/c/\": the path ends with `/`"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "6:13: `workspace` = \"/a//b\": the path contains `//`"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "7:11: `program` = \"bin/gw\": a relative path with `/` is ambiguous"
        ),
        "{e:?}"
    );
    let e = errors("[supervisor]\nstate_dir = \"/x\"\nruntime_dir = \"/x\"\n");
    assert!(
        has(
            &e,
            "3:15: `runtime_dir` is the same directory as `state_dir`"
        ),
        "{e:?}"
    );
}

#[test]
fn listen_addresses() {
    let e = errors("[gateway]\nlisten = \"0.0.0.0:8750\"\n");
    assert!(
        has(
            &e,
            "2:10: `listen` = \"0.0.0.0:8750\" is not a loopback address"
        ),
        "{e:?}"
    );
    let c = parse("[gateway]\nlisten = \"0.0.0.0:8750\"\nallow_non_loopback = true\n").unwrap();
    assert_eq!(
        c.gateway.unwrap().listen,
        Some("0.0.0.0:8750".parse().unwrap())
    );
    for bad in ["localhost:8750", "127.0.0.1", "127.0.0.1:99999", ""] {
        let e = errors(&format!("[gateway]\nlisten = \"{bad}\"\n"));
        assert!(has(&e, "is not an address and port"), "{bad}: {e:?}");
    }
    let e = errors("[gateway]\nlisten = \"127.0.0.1:0\"\n");
    assert!(has(&e, "port 0"), "{e:?}");
    assert!(parse("[gateway]\nlisten = \"[::1]:1\"\n").is_ok());
}

#[test]
fn durations_and_restart_order() {
    let e = errors(
            "[supervisor]\nstop_timeout = \"0s\"\napproval_timeout = \"soon\"\n[gateway.restart]\ninitial_delay = \"10s\"\nmax_delay = \"2s\"\ncrash_loop_restarts = 0\ncrash_loop_window = \"2d\"\n",
        );
    assert!(
        has(&e, "2:16: `stop_timeout`: a duration of 0 is impossible"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "3:20: `approval_timeout`: `soon` does not start with a number"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "6:13: `max_delay` (2s) is shorter than `initial_delay` (10s)"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "7:23: `crash_loop_restarts` = 0 is out of range"),
        "{e:?}"
    );
    assert!(
        has(&e, "8:21: `crash_loop_window`: unknown duration unit `d`"),
        "{e:?}"
    );
    let e = errors("[supervisor]\nstop_timeout = \"25h\"\napproval_timeout = -1\n");
    assert!(has(&e, "longer than a day"), "{e:?}");
    assert!(has(&e, "negative duration -1"), "{e:?}");
    let c = parse("[gateway.restart]\ninitial_delay = \"250ms\"\nmax_delay = \"250ms\"\n").unwrap();
    assert_eq!(
        c.gateway.unwrap().restart.max_delay,
        Duration::from_millis(250)
    );
}

#[test]
fn channel_names_and_programs() {
    let e = errors(
            "[channels.Telegram]\nprogram = \"t\"\n[channels.gateway]\nprogram = \"g\"\n[channels.\"a b\"]\nprogram = \"x\"\n[channels.ok]\nprofile = \"channel\"\n",
        );
    assert!(has(&e, "1:11: invalid channel name \"Telegram\""), "{e:?}");
    assert!(has(&e, "3:11: invalid channel name \"gateway\""), "{e:?}");
    assert!(has(&e, "5:11: invalid channel name \"a b\""), "{e:?}");
    assert!(
        has(&e, "7:11: [channels.ok] has no `kind` and no `program`"),
        "{e:?}"
    );
    let e = errors("channels = 1\n");
    assert!(
        has(&e, "1:12: invalid type: integer for `channels`"),
        "{e:?}"
    );
}

#[test]
fn workspaces_do_not_overlap() {
    let e = errors(
            "[supervisor]\nstate_dir = \"/s\"\n[gateway]\nworkspace = \"/w\"\n[channels.a]\nprogram = \"a\"\nworkspace = \"/w/a\"\n[channels.b]\nprogram = \"b\"\nworkspace = \"/\"\n",
        );
    assert!(
        has(
            &e,
            "7:13: the workspace of `a` (/w/a) overlaps the workspace of `gateway`"
        ),
        "{e:?}"
    );
    assert!(has(&e, "10:13: the workspace of `b` (/) overlaps"), "{e:?}");
    let e = errors("[supervisor]\nstate_dir = \"/s/state\"\n[gateway]\nworkspace = \"/s\"\n");
    assert!(
        has(
            &e,
            "4:13: the workspace of `gateway` (/s) contains the supervisor's state"
        ),
        "{e:?}"
    );
}

#[test]
fn groups() {
    let c = parse("[control]\ngroup = \"root\"\n").unwrap();
    assert_eq!(c.control_group, Some(0));
    assert_eq!(
        parse("[control]\ngroup = \"1234\"\n")
            .unwrap()
            .control_group,
        Some(1234)
    );
    let e = errors("[control]\ngroup = \"no-such-group-carapace\"\n");
    assert!(
        has(
            &e,
            "2:9: no group named \"no-such-group-carapace\" on this system"
        ),
        "{e:?}"
    );
    let e = errors("[control]\ngroup = -1\n");
    assert!(has(&e, "gid -1 is out of range"), "{e:?}");
    let e = errors("[control]\ngroup = 4294967295\n");
    assert!(has(&e, "out of range"), "{e:?}");
    let e = errors("[control]\ngroup = true\n");
    assert!(has(&e, "2:9: invalid type: boolean for `group`"), "{e:?}");
}

#[test]
fn environment_names() {
    let e = errors(
        "[gateway.environment]\n\"1X\" = \"a\"\nCARAPACE_BROKER_FD = \"9\"\nOK = \"a\\u0000b\"\n",
    );
    assert!(
        has(&e, "2:1: invalid environment variable name \"1X\""),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "3:1: `CARAPACE_BROKER_FD`: CARAPACE_* variables are set by the supervisor"
        ),
        "{e:?}"
    );
    assert!(has(&e, "4:6: the value contains a NUL byte"), "{e:?}");
}

#[test]
fn syntax_errors_are_located_and_reported_alone() {
    let e = errors(
        "[supervisor\nlog_level = info\nwatchdog = true true\nstate_dir = \"/x\n[[gateway]]\nkey\n",
    );
    assert!(has(&e, "1:12: unclosed table"), "{e:?}");
    assert!(has(&e, "6:4: key with no value"), "{e:?}");
    // With a syntax error, only syntax errors: no cascade of misplaced keys.
    let e = errors(
        "[gateway
program = \"gw\"
bogus = 1
",
    );
    assert_eq!(e, vec!["1:9: unclosed table"]);
}

#[test]
fn values_of_a_type_no_key_takes_are_located_type_errors() {
    let e = errors("[supervisor]\nstop_timeout = 1.5\nwatchdog = 1979-05-27\n");
    assert!(
        has(&e, "2:16: invalid type: float for `stop_timeout`"),
        "{e:?}"
    );
    assert!(
        has(&e, "3:12: invalid type: datetime for `watchdog`"),
        "{e:?}"
    );
    let e = errors("[supervisor]\nstop_timeout = 99999999999999999999\n");
    assert!(
        has(
            &e,
            "2:16: integer 99999999999999999999 out of range for `stop_timeout`"
        ),
        "{e:?}"
    );
    let e = errors("[[gateway]]\n");
    assert!(has(&e, "1:1: invalid type: array for `gateway`"), "{e:?}");
}

#[test]
fn gateway_settings_tables() {
    let c = parse(
        "[gateway]\n[gateway.clients]\nrate_per_second = 5\nburst = 9\nidle_timeout = \"30s\"\n\
             [gateway.agent]\nbase_url = \"http://127.0.0.1:8080/v1\"\nmodel = \"m\"\n\
             api_key_secret = \"llm_key\"\nmax_turns = 3\ntoken_budget = 1000\ntimeout = \"5s\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let gw = c.gateway.unwrap_or_else(|| panic!("no gateway"));
    let v: serde_json::Value =
        serde_json::from_str(gw.settings.as_deref().unwrap_or("")).unwrap_or_default();
    assert_eq!(
        v,
        serde_json::json!({
            "clients": {"rate_per_second": 5, "burst": 9, "idle_timeout_ms": 30000},
            "agent": {"base_url": "http://127.0.0.1:8080/v1", "model": "m",
                      "api_key_secret": "llm_key", "max_turns": 3, "token_budget": 1000,
                      "timeout_ms": 5000}
        })
    );
    // Without the tables: an empty object (the gateway's defaults, no model).
    let c = parse("[gateway]\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.gateway.and_then(|g| g.settings).as_deref(), Some("{}"));
    let e = errors(
            "[gateway.agent]\nmodel = \"\"\nbase = 1\n[gateway.clients]\nburst = 0\nmax_message_bytes = \"1MiB\"\n",
        );
    assert!(has(&e, "[gateway.agent] has no `base_url`"), "{e:?}");
    assert!(has(&e, "2:9: `model` is empty"), "{e:?}");
    assert!(
        has(&e, "3:1: unknown key `base` in [gateway.agent]"),
        "{e:?}"
    );
    assert!(has(&e, "5:9: `burst` = 0 is out of range"), "{e:?}");
    assert!(
        has(&e, "6:21: invalid type: string for `max_message_bytes`"),
        "{e:?}"
    );
    for bad in [
        "ftp://x/v1",
        "http://user:pw@x/v1",
        "http://x:0/v1",
        "http://x/v1?key=1",
        "https://",
    ] {
        let e = errors(&format!(
            "[gateway.agent]\nmodel = \"m\"\nbase_url = \"{bad}\"\n"
        ));
        assert!(has(&e, "3:12: `base_url`"), "{bad}: {e:?}");
    }
    let e = errors("[channels.c]\nprogram = \"p\"\nagent = {}\n");
    assert!(has(&e, "unknown key `agent` in [channels.c]"), "{e:?}");
}

#[test]
fn random_mutations_never_panic() {
    // Deterministic xorshift: the same 3000 mutants of the default file on every run, each
    // with a few characters deleted, duplicated or replaced by TOML-significant ones.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let base: Vec<char> = DEFAULT_CONFIG_TEXT.chars().collect();
    let alphabet: Vec<char> = "[]{}=\"',.#\\\n\r\t 0-_xé+:ab1".chars().collect();
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..3000 {
        let mut t = base.clone();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % t.len();
            match next() % 3 {
                0 => {
                    t.remove(i);
                }
                1 => {
                    let c = t[i];
                    t.insert(i, c);
                }
                _ => t[i] = alphabet[(next() as usize) % alphabet.len()],
            }
        }
        let text: String = t.into_iter().collect();
        match parse(&text) {
            Ok(_) => ok += 1,
            Err(e) => {
                // Every error is located inside the file and printable.
                for d in e.diagnostics() {
                    assert!(d.line >= 1 && d.line <= text.lines().count() + 1, "{d}");
                }
                assert!(!e.to_string().is_empty());
                bad += 1;
            }
        }
    }
    assert!(ok > 0 && bad > 0, "mutants: {ok} valid, {bad} invalid");
}

#[test]
fn garbage_never_panics() {
    // Every prefix of a valid file, and some bytes that are not TOML at all.
    let text = format!("{DEFAULT_CONFIG_TEXT}\n[channels.x]\nprogram = \"é\"\nenvironment = {{ A = \"\\u00e9\" }}\n");
    for i in 0..text.len() {
        if text.is_char_boundary(i) {
            let _ = parse(&text[..i]);
        }
    }
    for junk in [
        "\"",
        "'",
        "[",
        "{",
        "a = {",
        "a = [[[[",
        "a = \"\\u",
        "a = \"\\U0011FFFF\"",
        "a = +",
        "a = -",
        "a = 0x",
        "é = 1",
        "a.=1",
        "[a.]",
        "\u{0}",
    ] {
        let _ = parse(junk);
    }
    let deep = format!("a = {}{}", "[".repeat(100), "]".repeat(100));
    let e = errors(&deep);
    assert!(
        !e.is_empty() && e.iter().all(|m| m.starts_with("1:")),
        "{e:?}"
    );
    // The schema check goes no deeper than the schema: a deep value is one type error.
    let deep = format!(
        "[supervisor]\npolicy = {}{}",
        "[".repeat(40),
        "]".repeat(40)
    );
    assert_eq!(
        errors(&deep),
        vec!["2:11: invalid type: array for `policy`"]
    );
}

fn settings_of(c: &ChildConfig) -> serde_json::Value {
    serde_json::from_str(c.settings.as_deref().expect("settings")).expect("json")
}

#[test]
fn built_in_channel_kinds_become_adapter_settings() {
    let c = parse(
        r#"
[channels.tg]
kind = "telegram"
profile = "telegram"
token_secret = "telegram_bot_token"
api_base = "http://127.0.0.1:9999/"
poll_timeout = "5s"

[channels.mail]
kind = "email"
imap = "imap.example.com:993"
smtp = "smtp.example.com:587"
username = "agent@example.com"
password_secret = "mail_password"
from = "agent@example.com"

[channels.hook]
kind = "webhook"
listen = "127.0.0.1:8751"
hmac_secret = "hook_key"
url = "https://hooks.example.com/agent"
"#,
    )
    .expect("valid");
    let tg = &c.channels["tg"];
    assert_eq!(tg.program, "carapace-channel");
    assert_eq!(tg.listen, None);
    assert_eq!(
        settings_of(tg),
        serde_json::json!({"channel": "tg", "state_dir": "/workspace", "kind": "telegram",
                "api_base": "http://127.0.0.1:9999", "token_secret": "telegram_bot_token",
                "poll_timeout_ms": 5000})
    );
    let mail = settings_of(&c.channels["mail"]);
    assert_eq!(mail["imap_security"], "tls");
    assert_eq!(mail["smtp_security"], "starttls");
    assert_eq!(mail["poll_interval_ms"], 60000);
    assert_eq!(mail["password_secret"], "mail_password");
    let hook = &c.channels["hook"];
    assert_eq!(hook.listen, Some("127.0.0.1:8751".parse().unwrap()));
    assert_eq!(settings_of(hook)["hmac_secret"], "hook_key");
    // A channel of the operator's own keeps working without a kind, and gets no settings.
    let own = parse("[channels.own]\nprogram = \"/opt/a\"\n").expect("valid");
    assert_eq!(own.channels["own"].settings, None);
}

#[test]
fn the_slack_kind_becomes_adapter_settings() {
    let c = parse(
        "[channels.sl]\nkind = \"slack\"\nprofile = \"slack\"\napp_token_secret = \"slack_app\"\n\
         bot_token_secret = \"slack_bot\"\napi_base = \"http://127.0.0.1:9/api/\"\n",
    )
    .expect("valid");
    assert_eq!(
        settings_of(&c.channels["sl"]),
        serde_json::json!({"channel": "sl", "state_dir": "/workspace", "kind": "slack",
                "api_base": "http://127.0.0.1:9/api", "app_token_secret": "slack_app",
                "bot_token_secret": "slack_bot"})
    );
    let e = errors("[channels.a]\nkind = \"slack\"\napp_token_secret = \"a\"\n");
    assert!(
        has(&e, "1:11: [channels.a] has no `bot_token_secret`"),
        "{e:?}"
    );
    let e = errors(
        "[channels.a]\nkind = \"slack\"\napp_token_secret = \"a\"\nbot_token_secret = \"b\"\n\
         api_base = \"http://slack.com/api\"\ntoken_secret = \"t\"\n",
    );
    assert!(has(&e, "5:12: `api_base`"), "{e:?}");
    assert!(has(&e, "6:1: unknown key `token_secret`"), "{e:?}");
}

#[test]
fn channel_kind_errors_are_located() {
    let e = errors("[channels.a]\nkind = \"fax\"\n");
    assert!(has(&e, "2:8: unknown channel kind \"fax\""), "{e:?}");
    let e = errors("[channels.a]\nkind = \"telegram\"\n");
    assert!(has(&e, "1:11: [channels.a] has no `token_secret`"), "{e:?}");
    let e = errors(
            "[channels.a]\nkind = \"telegram\"\ntoken_secret = \"t\"\napi_base = \"http://api.telegram.org\"\n",
        );
    assert!(
        has(
            &e,
            "4:12: `api_base` = \"http://api.telegram.org\": plain http"
        ),
        "{e:?}"
    );
    let e = errors(
            "[channels.m]\nkind = \"email\"\nimap = \"mail.example.com:143\"\nimap_security = \"plain\"\nsmtp = \"mail.example.com\"\nusername = \"u\"\npassword_secret = \"p\"\nfrom = \"nobody\"\n",
        );
    assert!(
        has(&e, "4:17: `imap_security` = \"plain\" for `imap`"),
        "{e:?}"
    );
    assert!(
        has(&e, "5:8: `smtp` = \"mail.example.com\": no `:port`"),
        "{e:?}"
    );
    assert!(
        has(&e, "8:8: `from` = \"nobody\" is not an address"),
        "{e:?}"
    );
    // Plain transport to loopback is fine (a local server, tests).
    parse("[channels.m]\nkind = \"email\"\nimap = \"127.0.0.1:1143\"\nimap_security = \"plain\"\nsmtp = \"[::1]:2525\"\nsmtp_security = \"plain\"\nusername = \"u\"\npassword_secret = \"p\"\nfrom = \"a@b\"\n")
            .expect("loopback plain is allowed");
    let e = errors("[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\n");
    assert!(has(&e, "1:11: [channels.w] has no `listen`"), "{e:?}");
    let e = errors("[channels.d]\nkind = \"discord\"\n");
    assert!(has(&e, "1:11: [channels.d] has no `token_secret`"), "{e:?}");
    let e = errors("[channels.d]\nkind = \"discord\"\ntoken_secret = \"t\"\ngateway_url = \"ws://gateway.discord.gg\"\n");
    assert!(
        has(
            &e,
            "4:15: `gateway_url` = \"ws://gateway.discord.gg\": plain ws"
        ),
        "{e:?}"
    );
    let e = errors("[channels.d]\nkind = \"discord\"\ntoken_secret = \"t\"\ngateway_url = \"https://gateway.discord.gg\"\n");
    assert!(has(&e, "not a wss:// or ws:// URL"), "{e:?}");
    let d = parse("[channels.d]\nkind = \"discord\"\ntoken_secret = \"t\"\ngateway_url = \"ws://127.0.0.1:9/\"\napi_base = \"http://127.0.0.1:8/api/v10\"\n")
        .expect("loopback ws is allowed");
    assert_eq!(
        settings_of(&d.channels["d"])["gateway_url"],
        "ws://127.0.0.1:9"
    );
    let e =
        errors("[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\nlisten = \"0.0.0.0:80\"\n");
    assert!(
        has(&e, "the webhook would be reachable from the network"),
        "{e:?}"
    );
    // Keys of another kind, or of a kind never named.
    let e = errors("[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\nlisten = \"127.0.0.1:1\"\ntoken_secret = \"t\"\n");
    assert!(
        has(&e, "5:1: unknown key `token_secret` in [channels.w]"),
        "{e:?}"
    );
    let e = errors("[channels.w]\nprogram = \"/opt/a\"\ntoken_secret = \"t\"\n");
    assert!(
        has(&e, "3:1: `token_secret` is a key of kind = \"telegram\""),
        "{e:?}"
    );
    let e = errors("[channels.a]\nprogram = \"a\"\nlisten = \"127.0.0.1:1\"\n");
    assert!(
        has(&e, "unknown key `listen`") || has(&e, "kind = \"webhook\""),
        "{e:?}"
    );
}

#[test]
fn matrix_channel_settings_and_errors() {
    let c = parse(
        "[channels.mx]\nkind = \"matrix\"\nhomeserver = \"https://matrix.example.org/\"\n\
         token_secret = \"mx_token\"\ninvites_from = [\"@alice:example.org\", \"*:example.org\"]\n\
         poll_timeout = \"20s\"\n",
    )
    .expect("valid");
    assert_eq!(
        settings_of(&c.channels["mx"]),
        serde_json::json!({"channel": "mx", "state_dir": "/workspace", "kind": "matrix",
                "homeserver": "https://matrix.example.org", "token_secret": "mx_token",
                "invites_from": ["@alice:example.org", "*:example.org"], "poll_timeout_ms": 20000})
    );
    let d = parse("[channels.mx]\nkind = \"matrix\"\nhomeserver = \"http://127.0.0.1:8008\"\ntoken_secret = \"t\"\n")
        .expect("loopback http is allowed");
    assert_eq!(
        settings_of(&d.channels["mx"])["invites_from"],
        serde_json::json!([])
    );
    let e = errors("[channels.mx]\nkind = \"matrix\"\n");
    assert!(has(&e, "1:11: [channels.mx] has no `homeserver`"), "{e:?}");
    assert!(
        has(&e, "1:11: [channels.mx] has no `token_secret`"),
        "{e:?}"
    );
    let e = errors("[channels.mx]\nkind = \"matrix\"\nhomeserver = \"http://matrix.example.org\"\ntoken_secret = \"t\"\ninvites_from = [\"[\"]\npoll_timeout = \"10m\"\n");
    assert!(
        has(
            &e,
            "3:14: `homeserver` = \"http://matrix.example.org\": plain http"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "5:17: `invites_from`: \"[\" is not a glob"),
        "{e:?}"
    );
    assert!(has(&e, "6:16: `poll_timeout` is out of range"), "{e:?}");
    let e = errors("[channels.mx]\nkind = \"matrix\"\nhomeserver = \"https://m.org\"\ntoken_secret = \"t\"\napi_base = \"https://x\"\n");
    assert!(
        has(&e, "5:1: unknown key `api_base` in [channels.mx]"),
        "{e:?}"
    );
}

/// Every key of the configuration, each with a valid value.
const EVERY_KEY: &str = r#"
[workspaces.w]
path = "/tmp"
why = "scratch"
access = "ro"
profiles = ["gateway"]

[supervisor]
policy = "/etc/carapace/p.toml"
state_dir = "/var/lib/c"
runtime_dir = "/run/c"
log_format = "json"
log_level = "warn"
stop_timeout = "5s"
approval_timeout = 60
watchdog = false

[audit]
rotate_size = "1MiB"
keep = 4

[control]
group = 0

[metrics]
listen = "10.0.0.1:9464"
allow_non_loopback = true

[gateway]
program = "gw"
args = ["a"]
profile = "gw"
listen = "127.0.0.1:9000"
allow_non_loopback = false
workspace = "/srv/gw"
environment = { A = "b" }
[gateway.restart]
initial_delay = "1s"
max_delay = "10s"
crash_loop_restarts = 3
crash_loop_window = "1m"
[gateway.clients]
rate_per_second = 5
burst = 10
max_connections = 11
max_message_bytes = 65536
idle_timeout = "30s"
max_in_flight = 4
[gateway.agent]
base_url = "https://api.example.com/v1"
model = "m"
api_key_secret = "k"
max_turns = 3
token_budget = 1000
timeout = "10s"
max_tokens = 100
system_prompt = "be brief"
max_concurrent_runs = 2
answer_channels = false
context_budget = 8000

[channels.tg]
kind = "telegram"
program = "own-adapter"
args = ["-v"]
profile = "telegram"
workspace = "/srv/tg"
environment = { B = "c" }
restart = { max_delay = "5s" }
api_base = "https://api.telegram.org"
token_secret = "t"
poll_timeout = "20s"

[channels.mail]
kind = "email"
imap = "imap.example.com:993"
imap_security = "tls"
smtp = "smtp.example.com:587"
smtp_security = "tls"
username = "u"
password_secret = "p"
from = "a@example.com"
folder = "Agent"
poll_interval = "2m"

[channels.hook]
kind = "webhook"
listen = "127.0.0.1:8751"
allow_non_loopback = false
hmac_secret = "h"
url = "https://hooks.example.com/x"
path = "/hook"

[channels.irc]
kind = "irc"
server = "irc.example.net:6697"
security = "tls"
nick = "agent"
username = "agent"
realname = "the agent"
channels = ['#agent']
password_secret = "irc_pw"
sasl_username = "agent"
identity = "account"
channel_messages = "all"

[channels.sig]
kind = "signal"
account = "+15551234567"
request_timeout = "90s"
probe_interval = "1m"
daemon = { program = "/opt/signal-cli/bin/signal-cli", args = ["jsonRpc"], profile = "sc", workspace = "/srv/signal-cli" }

[channels.sl]
kind = "slack"
app_token_secret = "slack_app"
bot_token_secret = "slack_bot"
api_base = "https://slack.com/api"

[channels.dc]
kind = "discord"
profile = "discord"
api_base = "https://discord.com/api/v10"
gateway_url = "wss://gateway.discord.gg"
token_secret = "d"

[channels.mx]
kind = "matrix"
homeserver = "https://matrix.example.org"
token_secret = "mx_token"
invites_from = ["@owner:example.org"]
poll_timeout = "20s"

[[jobs]]
name = "tick"
every = "90s"
prompt = "p"

[[jobs]]
name = "daily"
cron = "0 7 * * *"
prompt = "news"
session = "news"
[jobs.deliver_to]
channel = "tg"
conversation = "111"
"#;

/// The key names of a schema, recursively.
fn schema_keys(kind: &carapace_policy::toml_schema::Kind, out: &mut Vec<&'static str>) {
    use carapace_policy::toml_schema::Kind;
    match kind {
        Kind::Table(fields) => {
            for (name, sub) in *fields {
                out.push(name);
                schema_keys(sub, out);
            }
        }
        Kind::Tagged {
            common, variants, ..
        } => {
            for (name, sub) in common.iter().chain(variants.iter().flat_map(|(_, f)| *f)) {
                out.push(name);
                schema_keys(sub, out);
            }
        }
        Kind::Map(sub) | Kind::Array(sub) | Kind::OneOrArray(sub) => schema_keys(sub, out),
        _ => {}
    }
}

#[test]
fn every_key_read_is_in_the_schema() {
    // No unknown key (nor any other error) in a file with every key the validation reads...
    let c = parse(EVERY_KEY).unwrap_or_else(|e| panic!("{e}"));
    // ... and every key was read.
    assert_eq!(c.policy, vec![PathBuf::from("/etc/carapace/p.toml")]);
    assert_eq!(c.runtime_dir, PathBuf::from("/run/c"));
    assert_eq!(c.log_level, tracing::Level::WARN);
    assert_eq!(c.approval_timeout, Duration::from_secs(60));
    assert_eq!(c.control_group, Some(0));
    assert_eq!(
        (c.audit_rotation.max_bytes, c.audit_rotation.keep),
        (1 << 20, 4)
    );
    let gw = c.gateway.as_ref().unwrap_or_else(|| panic!("gateway"));
    assert_eq!(gw.restart.crash_loop_restarts, 3);
    assert_eq!(gw.restart.crash_loop_window, Duration::from_secs(60));
    assert_eq!(
        settings_of(gw),
        serde_json::json!({
            "clients": {"rate_per_second": 5, "burst": 10, "max_connections": 11,
                        "max_message_bytes": 65536, "idle_timeout_ms": 30000, "max_in_flight": 4},
            "agent": {"base_url": "https://api.example.com/v1", "model": "m",
                      "api_key_secret": "k", "max_turns": 3, "token_budget": 1000,
                      "timeout_ms": 10000, "max_tokens": 100, "system_prompt": "be brief",
                      "max_concurrent_runs": 2, "answer_channels": false,
                      "context_budget": 8000},
            "jobs": [
                {"name": "tick", "every_ms": 90000, "prompt": "p", "session": "job-tick"},
                {"name": "daily", "cron": "0 7 * * *", "prompt": "news", "session": "news",
                 "deliver_to": {"channel": "tg", "conversation": "111"}}
            ]
        })
    );
    let tg = &c.channels["tg"];
    assert_eq!(
        (tg.program.as_str(), tg.args.as_slice()),
        ("own-adapter", &["-v".to_string()][..])
    );
    assert_eq!(tg.environment.get("B").map(String::as_str), Some("c"));
    assert_eq!(tg.restart.max_delay, Duration::from_secs(5));
    assert_eq!(settings_of(tg)["poll_timeout_ms"], 20000);
    let mail = settings_of(&c.channels["mail"]);
    assert_eq!(
        (mail["smtp_security"].as_str(), mail["folder"].as_str()),
        (Some("tls"), Some("Agent"))
    );
    assert_eq!(mail["poll_interval_ms"], 120000);
    let hook = settings_of(&c.channels["hook"]);
    assert_eq!(
        (hook["url"].as_str(), hook["path"].as_str()),
        (Some("https://hooks.example.com/x"), Some("/hook"))
    );
    let sig = settings_of(&c.channels["sig"]);
    assert_eq!(
        (
            sig["request_timeout_ms"].as_u64(),
            sig["probe_interval_ms"].as_u64()
        ),
        (Some(90000), Some(60000))
    );
    assert_eq!(c.daemons["sig-signal-cli"].profile, "sc");
    let sl = settings_of(&c.channels["sl"]);
    assert_eq!(
        (
            sl["app_token_secret"].as_str(),
            sl["bot_token_secret"].as_str()
        ),
        (Some("slack_app"), Some("slack_bot"))
    );
    let dc = settings_of(&c.channels["dc"]);
    assert_eq!(
        (dc["gateway_url"].as_str(), dc["token_secret"].as_str()),
        (Some("wss://gateway.discord.gg"), Some("d"))
    );
    let mx = settings_of(&c.channels["mx"]);
    assert_eq!(
        (
            mx["homeserver"].as_str(),
            mx["token_secret"].as_str(),
            mx["poll_timeout_ms"].as_u64()
        ),
        (
            Some("https://matrix.example.org"),
            Some("mx_token"),
            Some(20_000)
        )
    );
    assert_eq!(mx["invites_from"][0], "@owner:example.org");
    assert_eq!(c.workspaces["w"].profiles, vec!["gateway".to_string()]);
    assert!(!c.workspaces["w"].writable);
    // The file covers the whole schema: each of its keys is written in it.
    let mut keys = Vec::new();
    schema_keys(&validate::CONFIG, &mut keys);
    for k in keys {
        let written = EVERY_KEY.lines().any(|l| {
            l.starts_with(&format!("{k} ="))
                || l.contains(&format!("[gateway.{k}]"))
                || l.contains(&format!("[{k}]"))
                || l.contains(&format!("{{ {k} ="))
                || l.starts_with(&format!("[{k}."))
                || l.contains(&format!(".{k}]"))
        });
        assert!(written, "schema key `{k}` is not in the test file");
    }
}

#[test]
fn shape_errors_come_from_the_shared_engine() {
    let d = parse("[gateway.clients]\nburst = \"x\"\n[channels.t]\nkind = \"telegram\"\ntoken_secert = \"t\"\n")
        .expect_err("invalid");
    let d: Vec<(String, Option<String>)> = d
        .diagnostics()
        .iter()
        .map(|d| {
            (
                format!(
                    "{}:{}: {}{}",
                    d.line,
                    d.column,
                    d.message,
                    d.help
                        .as_deref()
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default()
                ),
                d.expected.clone(),
            )
        })
        .collect();
    assert!(
        d.contains(&(
            "2:9: invalid type: string for `burst`".to_string(),
            Some("an integer".to_string())
        )),
        "{d:?}"
    );
    assert!(
        d.iter().any(|(m, want)| m
            == "5:1: unknown key `token_secert` in [channels.t]; did you mean `token_secret`?"
            && want
                .as_deref()
                .is_some_and(|w| w.starts_with("one of `kind`"))),
        "{d:?}"
    );
    // The placeholder of a wrong value causes no second error at its place.
    assert_eq!(
        errors("[supervisor]\nstate_dir = 5\n"),
        vec!["2:13: invalid type: integer for `state_dir`"]
    );
}

#[test]
fn metrics_listener() {
    assert_eq!(parse("").unwrap().metrics.listen, None);
    let c = parse("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(
        parse("[metrics]\nlisten = \"none\"\n")
            .unwrap()
            .metrics
            .listen,
        None
    );
    let e = errors("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    assert!(
        has(
            &e,
            "2:10: `listen` = \"0.0.0.0:9464\" is not a loopback address: the metrics endpoint \
             would be reachable from the network"
        ),
        "{e:?}"
    );
    let c = parse("[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_non_loopback = true\n").unwrap();
    assert_eq!(c.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
    let e = errors("[metrics]\nlisten = \"nope\"\nlsten = 1\n");
    assert!(has(&e, "is not an address and port"), "{e:?}");
    assert!(has(&e, "unknown key `lsten` in [metrics]"), "{e:?}");
}

#[test]
fn audit_rotation_keys() {
    use carapace_broker::audit::Rotation;
    // Absent: never rotates.
    let c = parse("").unwrap();
    assert_eq!(c.audit_rotation, Rotation::default());
    assert_eq!(c.audit_rotation.max_bytes, 0);
    let c = parse("[audit]\nrotate_size = \"64MiB\"\nkeep = 3\n").unwrap();
    assert_eq!(
        c.audit_rotation,
        Rotation {
            max_bytes: 64 << 20,
            keep: 3
        }
    );
    assert_eq!(
        parse("[audit]\nrotate_size = 1048576\n")
            .unwrap()
            .audit_rotation
            .max_bytes,
        1 << 20
    );
    for never in ["0", "\"0\""] {
        let c = parse(&format!("[audit]\nrotate_size = {never}\n")).unwrap();
        assert_eq!(c.audit_rotation.max_bytes, 0, "{never}");
    }
    // The embedded default rotates.
    let c = parse(DEFAULT_CONFIG_TEXT).unwrap();
    assert!(c.audit_rotation.max_bytes > 0);

    let e = errors("[audit]\nrotate_size = \"64 parsecs\"\n");
    assert!(has(&e, "2:15: `rotate_size`: unknown size unit"), "{e:?}");
    let e = errors("[audit]\nrotate_size = 100\n");
    assert!(has(&e, "`rotate_size` of 100 bytes is too small"), "{e:?}");
    let e = errors("[audit]\nrotate_size = -5\n");
    assert!(has(&e, "negative size"), "{e:?}");
    let e = errors("[audit]\nkeep = 0\n");
    assert!(has(&e, "`keep` = 0 is out of range"), "{e:?}");
    let e = errors("[audit]\nrotate_sise = \"1MiB\"\n");
    assert!(has(&e, "rotate_size"), "{e:?}");
}

#[test]
fn bare_program_next_to_carapace_then_in_libexec() {
    let t = tempfile::tempdir().unwrap();
    let exe_dir = t.path().join("bin");
    let libexec = t.path().join("libexec");
    std::fs::create_dir_all(&exe_dir).unwrap();
    std::fs::create_dir_all(&libexec).unwrap();
    let (cfg, _) = Config::load(None).unwrap();
    let mut child = cfg.gateway.clone().unwrap();
    assert_eq!(child.program, "carapace-gateway");

    // In neither place: an error that names both places looked in.
    let e = child.resolve_program(&exe_dir, &libexec).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.contains(&exe_dir.join("carapace-gateway").display().to_string())
            && shown.contains(&libexec.join("carapace-gateway").display().to_string()),
        "{shown}"
    );

    // Only in libexec (the package layout): found there.
    std::fs::write(libexec.join("carapace-gateway"), "").unwrap();
    assert_eq!(
        child.resolve_program(&exe_dir, &libexec).unwrap(),
        libexec.join("carapace-gateway")
    );

    // Next to carapace as well (a build directory): that one wins.
    std::fs::write(exe_dir.join("carapace-gateway"), "").unwrap();
    assert_eq!(
        child.resolve_program(&exe_dir, &libexec).unwrap(),
        exe_dir.join("carapace-gateway")
    );

    // An absolute path is taken as written, whether or not it exists (canonicalizing it later
    // says what is wrong with it).
    child.program = "/nonexistent/gw".into();
    assert_eq!(
        child.resolve_program(&exe_dir, &libexec).unwrap(),
        PathBuf::from("/nonexistent/gw")
    );
}

#[test]
fn jobs_are_read_and_passed_to_the_gateway() {
    let c = parse(EVERY_KEY).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.jobs,
        vec![
            JobConfig {
                name: "tick".into(),
                schedule: JobSchedule::Every(Duration::from_secs(90)),
                prompt: "p".into(),
                session: "job-tick".into(),
                deliver_to: None,
            },
            JobConfig {
                name: "daily".into(),
                schedule: JobSchedule::Cron("0 7 * * *".into()),
                prompt: "news".into(),
                session: "news".into(),
                deliver_to: Some(("tg".into(), "111".into())),
            },
        ]
    );
    assert_eq!(c.jobs[0].schedule.to_string(), "every 1m30s");
    assert_eq!(c.jobs[1].schedule.to_string(), "cron \"0 7 * * *\" (UTC)");
    // No jobs: the gateway's settings say nothing of them.
    let c = parse("[gateway.agent]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.jobs.is_empty());
    let gw = c.gateway.as_ref().unwrap_or_else(|| panic!("gateway"));
    assert!(settings_of(gw).get("jobs").is_none());
}

#[test]
fn bad_jobs_are_located_errors() {
    const AGENT: &str = "[gateway.agent]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n";
    let errs = errors(&format!(
        "{AGENT}[channels.tg]\nkind = \"telegram\"\ntoken_secret = \"t\"\n\n\
         [[jobs]]\nname = \"both\"\ncron = \"* * * * *\"\nevery = \"5s\"\nprompt = \"p\"\n\n\
         [[jobs]]\nname = \"neither\"\nprompt = \"p\"\n\n\
         [[jobs]]\nname = \"badcron\"\ncron = \"61 * * * *\"\nprompt = \"p\"\n\n\
         [[jobs]]\nname = \"fast\"\nevery = \"500ms\"\nprompt = \"p\"\n\n\
         [[jobs]]\nname = \"where\"\nevery = \"5s\"\nprompt = \"p\"\ndeliver_to = {{ channel = \"slack\", conversation = \"1\" }}\n\n\
         [[jobs]]\nname = \"bad name\"\nevery = \"5s\"\nprompt = \"\"\n\n\
         [[jobs]]\nname = \"where\"\nevery = \"5s\"\nprompt = \"p\"\nsesion = \"x\"\n"
    ));
    assert!(
        has(&errs, "11:1: a job has `cron` or `every`, not both"),
        "{errs:#?}"
    );
    assert!(has(&errs, "a job without a schedule"), "{errs:#?}");
    assert!(has(&errs, "20:8: `cron` = \"61 * * * *\""), "{errs:#?}");
    assert!(has(&errs, "`every` is shorter than a second"), "{errs:#?}");
    assert!(
        !has(&errs, "slack"),
        "checked against the policy, not here: {errs:#?}"
    );
    assert!(has(&errs, "invalid job name \"bad name\""), "{errs:#?}");
    assert!(has(&errs, "`prompt` is empty"), "{errs:#?}");
    assert!(has(&errs, "unknown key `sesion`"), "{errs:#?}");
    // Jobs need the agent.
    let errs = errors("[[jobs]]\nname = \"j\"\nevery = \"5s\"\nprompt = \"p\"\n");
    assert!(has(&errs, "there is no [gateway.agent]"), "{errs:#?}");
    // A second job of the same name.
    let errs = errors(&format!(
        "{AGENT}[[jobs]]\nname = \"j\"\nevery = \"5s\"\nprompt = \"p\"\n[[jobs]]\nname = \"j\"\nevery = \"5s\"\nprompt = \"p\"\n"
    ));
    assert!(has(&errs, "a second job named \"j\""), "{errs:#?}");
}

#[test]
fn granted_workspaces_are_checked_where_they_are_written() {
    let t = tempfile::tempdir().unwrap();
    let proj = t.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    let file = t.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let text = format!(
        "[gateway]\nprofile = \"gw\"\n\n[workspaces.proj]\npath = \"{}\"\nwhy = \"the project\"\n\n[workspaces.docs]\npath = \"{}\"\naccess = \"ro\"\nprofiles = [\"a\", \"b\"]\n",
        proj.display(),
        proj.display()
    );
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let p = &c.workspaces["proj"];
    assert_eq!(p.path, std::fs::canonicalize(&proj).unwrap());
    assert!(p.writable);
    assert_eq!(
        p.profiles,
        vec!["gw".to_string()],
        "default: the gateway's profile"
    );
    assert_eq!(p.why, "the project");
    let d = &c.workspaces["docs"];
    assert!(!d.writable);
    assert_eq!(d.profiles, vec!["a".to_string(), "b".to_string()]);
    let g = c.granted_workspaces();
    assert_eq!(g.len(), 2);

    let bad = format!(
        "[workspaces.rel]\npath = \"x/y\"\n\n[workspaces.gone]\npath = \"{}\"\n\n[workspaces.file]\npath = \"{}\"\n\n[workspaces.sys]\npath = \"/etc\"\n\n[workspaces.acc]\npath = \"{}\"\naccess = \"rwx\"\n\n[workspaces.Bad]\npath = \"{}\"\n\n[workspaces.nopath]\nwhy = \"x\"\n",
        t.path().join("missing").display(),
        file.display(),
        proj.display(),
        proj.display()
    );
    let errs = errors(&bad);
    assert!(has(&errs, "workspace `rel`"), "{errs:?}");
    assert!(has(&errs, "workspace `gone`"), "{errs:?}");
    assert!(has(&errs, "is not a directory"), "{errs:?}");
    assert!(has(&errs, "cannot be a workspace"), "{errs:?}");
    assert!(has(&errs, "unknown workspace access \"rwx\""), "{errs:?}");
    assert!(has(&errs, "invalid workspace name \"Bad\""), "{errs:?}");
    assert!(has(&errs, "workspace `nopath` has no `path`"), "{errs:?}");
    // Located: the error about `rel` points at its `path` line.
    assert!(
        errs.iter()
            .any(|e| e.starts_with("2:") && e.contains("`rel`")),
        "{errs:?}"
    );
    let typo = errors(&format!(
        "[workspaces.p]\npath = \"{}\"\nacess = \"ro\"\n",
        proj.display()
    ));
    assert!(has(&typo, "access"), "{typo:?}");

    // Inside the state directory: refused.
    let overlap = format!(
        "[supervisor]\nstate_dir = \"{}\"\n\n[workspaces.p]\npath = \"{}\"\n",
        proj.join("state").display(),
        proj.display()
    );
    assert!(has(&errors(&overlap), "overlaps the supervisor's state"));
}

#[test]
fn an_irc_channel_is_read_strictly() {
    let c = parse(
        "[channels.i]\nkind = \"irc\"\nserver = \"127.0.0.1:6667\"\nsecurity = \"plain\"\nnick = \"agent\"\nchannels = [\"#room\"]\npassword_secret = \"pw\"\nidentity = \"account\"\n",
    )
    .expect("a valid irc channel");
    let s = c.channels["i"].settings.as_deref().expect("settings");
    let v: serde_json::Value = serde_json::from_str(s).expect("json");
    assert_eq!(v["kind"], "irc");
    assert_eq!(v["channels"], serde_json::json!(["#room"]));
    assert_eq!(v["identity"], "account");
    assert_eq!(v["password_secret"], "pw");
    let e = errors(
        "[channels.i]\nkind = \"irc\"\nserver = \"irc.example.net:6667\"\nsecurity = \"plain\"\nnick = \"a b\"\nchannels = [\"room\"]\nidentity = \"who\"\nstarttls = true\n",
    );
    assert!(
        has(
            &e,
            "4:12: `security` = \"plain\" to a server that is not a loopback host"
        ),
        "{e:?}"
    );
    assert!(has(&e, "5:8: `nick` = \"a b\" is not an IRC name"), "{e:?}");
    assert!(
        has(&e, "6:13: \"room\" is not an IRC channel name"),
        "{e:?}"
    );
    assert!(
        has(&e, "7:12: `identity` = \"who\" is not a choice"),
        "{e:?}"
    );
    assert!(has(&e, "unknown key `starttls`"), "{e:?}");
    let e = errors("[channels.i]\nkind = \"irc\"\n");
    assert!(has(&e, "has no `server`"), "{e:?}");
    assert!(has(&e, "has no `nick`"), "{e:?}");
}

#[test]
fn a_signal_channel_brings_its_daemon() {
    let c = parse(
        "[channels.sig]\nkind = \"signal\"\naccount = \"+15551234567\"\nrequest_timeout = \"5s\"\n",
    )
    .expect("valid");
    let s: serde_json::Value =
        serde_json::from_str(c.channels["sig"].settings.as_deref().expect("settings"))
            .expect("json");
    assert_eq!(s["kind"], "signal");
    assert_eq!(s["account"], "+15551234567");
    assert_eq!(s["request_timeout_ms"], 5000);
    assert_eq!(s["probe_interval_ms"], 30000);
    let d = &c.daemons["sig-signal-cli"];
    assert_eq!(d.program, "/usr/bin/signal-cli");
    assert_eq!(d.profile, "signal-cli");
    assert_eq!(d.serves.as_deref(), Some("sig"));
    assert_eq!(
        d.args,
        ["--config", "/workspace", "-a", "+15551234567", "jsonRpc"]
    );
    assert!(d.workspace.ends_with("signal-cli/sig"));
    assert!(c.children().any(|(n, _)| n == "sig-signal-cli"));
    let c = parse(
        "[channels.sig]\nkind = \"signal\"\naccount = \"+15551234567\"\n\
         daemon = { program = \"/opt/signal-cli/bin/signal-cli\", args = [\"jsonRpc\"], profile = \"sc\", workspace = \"/srv/signal\" }\n",
    )
    .expect("valid");
    let d = &c.daemons["sig-signal-cli"];
    assert_eq!(
        (d.program.as_str(), d.args.as_slice(), d.profile.as_str()),
        (
            "/opt/signal-cli/bin/signal-cli",
            &["jsonRpc".to_string()][..],
            "sc"
        )
    );
    assert_eq!(d.workspace, std::path::Path::new("/srv/signal"));
}

#[test]
fn a_signal_channel_is_checked() {
    let e = errors("[channels.sig]\nkind = \"signal\"\n");
    assert!(has(&e, "has no `account`"), "{e:?}");
    let e = errors("[channels.sig]\nkind = \"signal\"\naccount = \"15551234567\"\n");
    assert!(has(&e, "is not a phone number"), "{e:?}");
    let e = errors(
        "[channels.sig]\nkind = \"signal\"\naccount = \"+15551234567\"\ndaemon = { program = \"signal-cli\", port = 1 }\n",
    );
    assert!(has(&e, "daemon.program"), "{e:?}");
    assert!(has(&e, "port"), "{e:?}");
    let e = errors(
        "[channels.sig]\nkind = \"signal\"\naccount = \"+15551234567\"\n\
         [channels.sig-signal-cli]\nkind = \"signal\"\naccount = \"+15551234568\"\n",
    );
    assert!(has(&e, "the signal-cli daemon of channel `sig`"), "{e:?}");
}
