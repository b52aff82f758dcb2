//! The systemd units in supervisor/systemd/: `systemd-analyze verify` accepts them offline, every
//! option has its reason written next to it, the options that must stay off stay off, they agree
//! with the supervisor's defaults, and `carapace exec` works within the unit's capability
//! bounding set (and not without CAP_SYS_ADMIN), as the unit's comment says was measured.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use carapace_supervisor::service::config::{Config, DEFAULT_CONFIG_TEXT, DEFAULT_LISTEN};

const SERVICE: &str = include_str!("../systemd/carapace.service");
const SOCKET: &str = include_str!("../systemd/carapace.socket");
const CARAPACE: &str = env!("CARGO_BIN_EXE_carapace");

/// `(section, key, value)` of every option line.
fn options(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines() {
        let l = line.trim();
        if l.starts_with('[') && l.ends_with(']') {
            section = l.to_string();
        } else if !l.is_empty() && !l.starts_with('#') {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not an option: {l}"));
            out.push((section.clone(), k.to_string(), v.to_string()));
        }
    }
    out
}

fn value<'a>(opts: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    opts.iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// Paragraphs (runs of non-blank lines, a section header ends one) whose options come with no
/// comment before them.
fn uncommented(unit: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut commented = false;
    for line in unit.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('[') {
            commented = false;
        } else if l.starts_with('#') {
            commented = true;
        } else if !commented {
            bad.push(l.to_string());
        }
    }
    bad
}

#[test]
fn every_option_has_its_reason() {
    assert_eq!(uncommented(SERVICE), Vec::<String>::new());
    assert_eq!(uncommented(SOCKET), Vec::<String>::new());
    // The check itself catches an option without a comment.
    assert_eq!(
        uncommented("[Service]\n# why\nType=notify\n\nKillMode=mixed\n"),
        vec!["KillMode=mixed"]
    );
}

#[test]
fn the_service_is_what_the_supervisor_expects() {
    let o = options(SERVICE);
    let one = |k: &str| -> &str {
        let v = value(&o, k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0]
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("ExecStart"), "/usr/bin/carapace run");
    // The reload waits for the outcome and fails when the policy is rejected (tested against a
    // running supervisor in tests/tests/service_e2e.rs).
    assert_eq!(one("ExecReload"), "/usr/bin/carapace reload");
    assert_eq!(one("Delegate"), "yes");
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("RestartPreventExitStatus"), "78");
    assert_eq!(one("RuntimeDirectory"), "carapace");
    assert_eq!(one("StateDirectory"), "carapace");
    assert_eq!(one("RuntimeDirectoryMode"), "0750");
    assert_eq!(one("StateDirectoryMode"), "0700");
    assert_eq!(one("NoNewPrivileges"), "yes");
    // The stop grace of the default configuration fits inside systemd's stop timeout.
    let cfg = Config::parse(DEFAULT_CONFIG_TEXT, "default").unwrap();
    let secs = |v: &str| -> u64 { v.trim_end_matches('s').parse().unwrap() };
    assert!(Duration::from_secs(secs(one("TimeoutStopSec"))) >= cfg.stop_timeout * 2);
    assert!(cfg.watchdog && secs(one("WatchdogSec")) >= 10);
    // Options that must stay off (each explained in the file) are not set.
    for off in [
        "User",
        "DynamicUser",
        "PrivateUsers",
        "RestrictNamespaces",
        "ProtectControlGroups",
        "SystemCallFilter",
        "ProtectHostname",
        "MemoryDenyWriteExecute",
        "PrivateNetwork",
        "IPAddressDeny",
        "ProtectProc",
        "ProcSubset",
        "OOMScoreAdjust",
    ] {
        assert!(value(&o, off).is_empty(), "{off} must stay off");
        assert!(
            SERVICE.contains(&format!("# {off}")),
            "the unit does not say why {off} stays off"
        );
    }
}

#[test]
fn the_socket_matches_the_default_listen_address() {
    let o = options(SOCKET);
    assert_eq!(value(&o, "ListenStream"), vec![DEFAULT_LISTEN]);
    assert_eq!(value(&o, "FileDescriptorName"), vec!["gateway"]);
    assert_eq!(value(&o, "Accept"), vec!["no"]);
    assert_eq!(value(&o, "Service"), vec!["carapace.service"]);
}

/// `systemd-analyze verify` of the units in a temp dir (ExecStart and ExecReload pointed at the
/// built binary, which verify requires to exist); its stderr.
fn verify(service: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let service = service
        .replace(
            "ExecStart=/usr/bin/carapace",
            &format!("ExecStart={CARAPACE}"),
        )
        .replace(
            "ExecReload=/usr/bin/carapace",
            &format!("ExecReload={CARAPACE}"),
        );
    std::fs::write(dir.path().join("carapace.service"), service).unwrap();
    std::fs::write(dir.path().join("carapace.socket"), SOCKET).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("carapace.service"))
        .arg(dir.path().join("carapace.socket"))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var_os("CARAPACE_ALLOW_SKIP").is_some_and(|v| v == "1") {
                eprintln!("SKIPPED: systemd-analyze is not installed (CARAPACE_ALLOW_SKIP=1)");
                return (true, String::new());
            }
            panic!("systemd-analyze is not installed (apt-get install systemd); set CARAPACE_ALLOW_SKIP=1 to skip");
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let (ok, err) = verify(SERVICE);
    assert!(
        ok && err.trim().is_empty(),
        "systemd-analyze verify:\n{err}"
    );
    // It does notice a mistake (an unknown option is only a warning, hence the stderr check).
    let (_, err) = verify(&SERVICE.replace("Delegate=yes", "Delegate=yes\nDelegat=yes"));
    assert!(err.contains("Delegat"), "{err}");
}

/// The unit's CapabilityBoundingSet= in setpriv's syntax: `-all,+sys_admin,...`.
fn unit_bounding_set() -> String {
    let o = options(SERVICE);
    let caps = value(&o, "CapabilityBoundingSet");
    assert_eq!(caps.len(), 1);
    let mut s = String::from("-all");
    for c in caps[0].split_whitespace() {
        s.push_str(",+");
        s.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    s
}

/// `carapace exec -- PROGRAM` under setpriv with `bounding` and no_new_privs; its exit code and
/// stderr.
fn exec_bounded(bounding: &str, ws: &Path, state: &Path, program: &str) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", "--no-new-privs", "--"])
        .arg(CARAPACE)
        .arg("exec")
        .arg("--workspace")
        .arg(ws)
        .arg("--state-dir")
        .arg(state)
        .args(["--", program])
        .output()
        .expect("setpriv (util-linux) must be installed");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn carapace_exec_works_within_the_units_capabilities() {
    if !common::require_root() {
        return;
    }
    let ws = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let caps = unit_bounding_set();
    assert!(caps.contains("+sys_admin"), "{caps}");
    let (code, err) = exec_bounded(&caps, ws.path(), state.path(), "/usr/bin/true");
    assert_eq!(code, Some(0), "carapace exec within {caps}: {err}");
    let (code, err) = exec_bounded(&caps, ws.path(), state.path(), "/usr/bin/false");
    assert_eq!(code, Some(1), "{err}");
    // Without CAP_SYS_ADMIN no sandbox can be made: the set is not larger than it looks.
    let without: String = caps.replace(",+sys_admin", "");
    let (code, err) = exec_bounded(&without, ws.path(), state.path(), "/usr/bin/true");
    assert_eq!(code, Some(126), "without CAP_SYS_ADMIN: {err}");
}
