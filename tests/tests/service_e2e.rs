//! `carapace run` end to end: the real supervisor, started as a process with a configuration in
//! a temporary directory, the gateway (`carapace-gateway`) confined under it, its
//! listener on a loopback port, sd_notify messages on a test NOTIFY_SOCKET, and the operator
//! CLI over the control socket (the harness: `carapace_tests::service`).
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_tests::*;

/// `POST /v1/tools/exec` (`tools.exec`, output collected) with a bearer token.
fn exec_via_gateway(addr: SocketAddr, token: &str, argv: &[&str]) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "argv": argv }).to_string();
    let r = http_bearer(addr, "POST", "/v1/tools/exec", token, Some(&body));
    (r.status, r.json())
}

// ------------------------------------------------------------------------------------------
// Tests

/// The gateway comes up confined: seccomp filter mode, NoNewPrivs, no capabilities, its own
/// namespaces, its own cgroup beneath the supervisor's, an unprivileged host uid; it serves
/// the handed-over listener and has no network interface but loopback-less emptiness.
#[test]
fn gateway_comes_up_confined_and_serves_the_handed_over_listener() {
    if !privileged() {
        return;
    }
    let svc = Service::start("");
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    assert_eq!(status_field(prog, "Seccomp"), "2");
    assert_eq!(status_field(prog, "NoNewPrivs"), "1");
    assert_eq!(status_field(prog, "CapEff"), "0000000000000000");
    assert_eq!(status_field(prog, "CapBnd"), "0000000000000000");
    let uid: u64 = status_field(prog, "Uid")
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    assert!(uid >= 0x7F00_0000, "host uid {uid} is not a per-run uid");
    for ns in ["mnt", "pid", "net", "ipc", "uts", "user", "cgroup"] {
        let ours = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap_or_default();
        let its = fs::read_link(format!("/proc/{prog}/ns/{ns}")).unwrap_or_default();
        assert_ne!(ours, its, "{ns} namespace shared with the host");
    }
    let cg = fs::read_to_string(format!("/proc/{prog}/cgroup")).unwrap_or_default();
    assert!(
        cg.contains("/carapace/gateway-"),
        "not in its own cgroup: {cg}"
    );
    // Served through the listener the supervisor bound; the gateway's own view agrees.
    // The operator token the first start made (no terminal: a file in the state directory).
    let r = http_bearer(svc.addr, "GET", "/v1/status", &svc.initial_token(), None);
    let (code, body) = (r.status, r.body);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["Seccomp"], "2", "{v}");
    assert_eq!(v["NoNewPrivs"], "1", "{v}");
    let ifaces = v["interfaces"].as_array().cloned().unwrap_or_default();
    assert!(
        ifaces.iter().all(|i| i == "lo"),
        "network interfaces inside: {ifaces:?}"
    );
    // The status is readable by a person too.
    let o = svc.ctl(&["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("gateway") && text.contains("running"),
        "{text}"
    );
}

/// Killing the gateway brings it back (restart with backoff), on the same listener.
#[test]
fn a_killed_gateway_is_restarted() {
    if !privileged() {
        return;
    }
    let svc = Service::start("");
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    // SAFETY: killing the confined program this test's supervisor started.
    unsafe { libc::kill(prog as i32, libc::SIGKILL) };
    assert!(
        wait_gone(init, Duration::from_secs(5)),
        "sandbox init survived its program"
    );
    let again = svc.gateway_running(Some(init), Duration::from_secs(20));
    assert_ne!(again, init);
    let g = svc.gateway();
    assert_eq!(g["restarts"], 1, "{g}");
    assert!(
        g["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("signal=9")),
        "{g}"
    );
}

/// SIGHUP with a broken policy keeps the old one (and logs the error); SIGHUP with a good one
/// changes decisions for new requests.
#[test]
fn sighup_reload_rejects_a_broken_policy_and_applies_a_good_one() {
    if !privileged() {
        return;
    }
    let mut svc = Service::start("");
    svc.gateway_running(None, Duration::from_secs(20));
    let tok = svc.token("client");
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/echo", "hello"]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["exit"], 0, "{v}");
    assert_eq!(v["stdout"], "hello\n", "{v}");

    // Broken: rejected, logged, old policy in force.
    fs::write(svc.policy_path(), policy_text("[profiles.broken\nwhy = 1"))
        .unwrap_or_else(|e| panic!("{e}"));
    svc.signal(libc::SIGHUP);
    svc.wait_note("RELOADING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while svc.status()["last_reload_error"].is_null() {
        assert!(Instant::now() < deadline, "reload error not reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = svc.status();
    assert!(
        st["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("policy.toml:")),
        "{st}"
    );
    assert!(
        svc.log_text().contains("reload rejected"),
        "{}",
        svc.log_text()
    );
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/echo", "still"]);
    assert_eq!(
        (code, v["exit"].clone()),
        (200, serde_json::json!(0)),
        "{v}"
    );

    // Good: echo denied from now on (a deny rule first in the file wins).
    let deny = r#"
[[exec]]
why = "test: echo is not allowed any more"
programs = ["/usr/bin/echo"]
approval = "deny"
"#;
    let text = default_policy_text();
    let at = text.find("\n[[exec]]\n").map_or(text.len(), |i| i + 1);
    fs::write(
        svc.policy_path(),
        format!("{}{deny}\n{}", &text[..at], &text[at..]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let reloads = svc.status()["reloads"].as_u64().unwrap_or(0);
    // `carapace reload` is the same as SIGHUP, and says what happened.
    let o = svc.ctl(&["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(svc.status()["reloads"].as_u64(), Some(reloads + 1));
    assert!(svc.status()["last_reload_error"].is_null());
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/echo", "nope"]);
    assert_eq!(code, 403, "{v}");
    let st = svc.stop();
    assert!(st.success(), "{st}");
}

/// The shipped unit's `ExecReload=` tells the truth: the command it runs fails when the new
/// policy is rejected (the old one stays in force) and succeeds when it is applied, so
/// `systemctl reload` reports what happened.
#[test]
fn the_units_reload_command_fails_on_a_rejected_policy() {
    if !privileged() {
        return;
    }
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../supervisor/systemd/carapace.service"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let reload: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .unwrap_or_else(|| panic!("no ExecReload= in the unit"))
        .split_whitespace()
        .collect();
    assert_eq!(reload.first(), Some(&"/usr/bin/carapace"), "{reload:?}");
    let mut svc = Service::start("");
    svc.gateway_running(None, Duration::from_secs(20));
    // The unit's command line, with the binary under test and this service's socket.
    let run_reload = || {
        Command::new(carapace_bin())
            .args(&reload[1..])
            .arg("--socket")
            .arg(svc.socket())
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let good = fs::read_to_string(svc.policy_path()).unwrap_or_else(|e| panic!("{e}"));
    fs::write(svc.policy_path(), policy_text("[profiles.broken\nwhy = 1"))
        .unwrap_or_else(|e| panic!("{e}"));
    let o = run_reload();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a rejected reload must fail: {err}"
    );
    assert!(err.contains("policy.toml:"), "the error says where: {err}");
    assert!(!svc.status()["last_reload_error"].is_null());
    fs::write(svc.policy_path(), good).unwrap_or_else(|e| panic!("{e}"));
    let o = run_reload();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(svc.status()["last_reload_error"].is_null());
    let st = svc.stop();
    assert!(st.success(), "{st}");
}

/// SIGTERM: STOPPING=1, exit 0, no process or cgroup left behind.
#[test]
fn sigterm_stops_cleanly_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let mut svc = Service::start("");
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    let cg = fs::read_to_string(format!("/proc/{prog}/cgroup")).unwrap_or_default();
    let st = svc.stop();
    assert!(st.success(), "exit {st}; log:\n{}", svc.log_text());
    while svc.recv_note().is_some() {}
    assert!(
        svc.notes().iter().any(|n| n.contains("STOPPING=1")),
        "{:?}",
        svc.notes()
    );
    assert!(!alive(init) && !alive(prog));
    assert!(processes_running(gateway_bin()).iter().all(|p| *p != prog));
    // Its cgroup directories are gone.
    for line in cg.lines() {
        let rel = line.splitn(3, ':').nth(2).unwrap_or("");
        if rel.contains("/carapace/gateway-") {
            let name = rel.rsplit('/').next().unwrap_or("");
            assert!(
                cgroup_dirs_named(name).is_empty(),
                "cgroup {name} left behind"
            );
        }
    }
    assert!(!svc.socket().exists(), "control socket left behind");
    assert!(
        svc.log_text().contains("audit log head at stop"),
        "{}",
        svc.log_text()
    );
}

/// sd_notify: READY=1 first; SIGHUP gives RELOADING=1 (with MONOTONIC_USEC) then READY=1;
/// WATCHDOG=1 keeps coming; SIGTERM gives STOPPING=1 last.
#[test]
fn sd_notify_messages_arrive_in_order() {
    if !privileged() {
        return;
    }
    let mut svc = Service::start("");
    svc.wait_note("WATCHDOG=1", Duration::from_secs(5));
    svc.signal(libc::SIGHUP);
    svc.wait_note("RELOADING=1", Duration::from_secs(10));
    let n = svc.notes().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !svc.notes()[n..].iter().any(|m| m.contains("READY=1")) {
        assert!(
            Instant::now() < deadline,
            "no READY=1 after RELOADING=1: {:?}",
            svc.notes()
        );
        svc.recv_note();
    }
    let st = svc.stop();
    assert!(st.success());
    while svc.recv_note().is_some() {}
    let notes = svc.notes();
    let first = |needle: &str| notes.iter().position(|m| m.contains(needle));
    let last = |needle: &str| notes.iter().rposition(|m| m.contains(needle));
    let ready = first("READY=1").unwrap_or(usize::MAX);
    let reloading = first("RELOADING=1").unwrap_or(usize::MAX);
    let stopping = first("STOPPING=1").unwrap_or(usize::MAX);
    assert_eq!(ready, 0, "READY=1 must come first: {notes:?}");
    assert!(notes[reloading].contains("MONOTONIC_USEC="), "{notes:?}");
    assert!(ready < reloading && reloading < stopping, "{notes:?}");
    assert!(
        last("READY=1").is_some_and(|r| r > reloading && r < stopping),
        "{notes:?}"
    );
    assert!(
        notes[stopping + 1..].iter().all(|m| !m.contains("READY=1")),
        "{notes:?}"
    );
}

/// An `ask` from the gateway waits for the operator: `carapace approvals list` shows it,
/// `allow` lets it run once; `deny` refuses it.
#[test]
fn approval_flow_through_the_cli() {
    if !privileged() {
        return;
    }
    let svc = Service::start("");
    svc.gateway_running(None, Duration::from_secs(20));
    let addr = svc.addr;
    let tok = svc.token("client");
    let t = tok.clone();
    // `/usr/bin/uname` matches no rule of the default policy: ask.
    let asked = std::thread::spawn(move || exec_via_gateway(addr, &t, &["/usr/bin/uname", "-s"]));
    let pending = |svc: &Service| -> Vec<serde_json::Value> {
        let o = svc.ctl(&["approvals", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["pending"].as_array().cloned().unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        if let Some(p) = pending(&svc).first() {
            // What asks, and why (the deciding rule's reason).
            assert_eq!(p["program"], "/usr/bin/uname", "{p}");
            assert!(p["why"].as_str().is_some_and(|w| !w.is_empty()), "{p}");
            assert!(
                p["who"].as_str().is_some_and(|w| w.starts_with("gateway#")),
                "{p}"
            );
            break p["id"].as_u64().unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "no pending approval; log:\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let human = svc.ctl(&["approvals", "list"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("/usr/bin/uname"),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );
    let o = svc.ctl(&["approvals", "allow", &id.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, v) = asked.join().unwrap_or_else(|_| panic!("exec thread"));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["stdout"], "Linux\n", "{v}");
    // Allow-once is not remembered: ask again, deny it this time.
    let asked = std::thread::spawn(move || exec_via_gateway(addr, &tok, &["/usr/bin/uname", "-s"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        if let Some(p) = pending(&svc).first() {
            break p["id"].as_u64().unwrap_or(0);
        }
        assert!(Instant::now() < deadline, "no second pending approval");
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = svc.ctl(&["approvals", "deny", &id.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, v) = asked.join().unwrap_or_else(|_| panic!("exec thread"));
    assert_eq!(code, 403, "{v}");
    // Both decisions are in the audit log, which the CLI can tail.
    let o = svc.ctl(&["audit", "tail", "-n", "50", "--json"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("approval refused"), "{text}");
}

/// The control socket is 0660 and checks its peer: a user outside the configured group is
/// refused even when the file mode would let it connect; a member of the group is served.
#[test]
fn control_socket_refuses_an_unauthorized_user() {
    if !privileged() {
        return;
    }
    // Group 4242 is the operators' group; uid 4243 is in it, uid 4244 is not.
    let svc = Service::start("[control]\ngroup = \"4242\"\n");
    let sock = svc.socket();
    let mode = fs::metadata(&sock)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o660);
    // Let others reach the socket file at all (a misconfiguration): SO_PEERCRED must still
    // refuse them.
    fs::set_permissions(svc.dir(), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(
        sock.parent().unwrap_or(Path::new("/")),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap_or_else(|e| panic!("{e}"));
    let as_user = |uid: &str, groups: &str| {
        Command::new("setpriv")
            .args(["--reuid", uid, "--regid", uid, "--groups", groups, "--"])
            .arg(carapace_bin())
            .args(["status", "--json", "--socket"])
            .arg(&sock)
            .output()
            .unwrap_or_else(|e| panic!("setpriv: {e}"))
    };
    let o = as_user("4244", "4244");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "unauthorized user was served");
    assert!(err.contains("permission denied"), "{err}");
    assert!(o.stdout.is_empty());
    let o = as_user("4243", "4242");
    assert!(
        o.status.success(),
        "group member refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(svc.log_text().contains("4244"), "refusal not logged");
}

/// A gateway that keeps dying is restarted with backoff until the crash-loop limit, then left
/// `failed` (and said so); a reload tries again.
#[test]
fn a_crash_loop_stops_restarting_until_a_reload() {
    if !privileged() {
        return;
    }
    // /usr/bin/false is visible in the gateway profile (/usr) and exits 1 at once.
    let svc = Service::start_with("/usr/bin/false", "[]", "", true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let g = loop {
        let g = svc.gateway();
        if g["state"] == "failed" {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "no crash loop detected: {g}; log:\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // 5 restarts allowed within the window: the 6th start is the one that trips it.
    assert_eq!(g["restarts"], 5, "{g}");
    assert_eq!(g["last_exit"], "exit=1", "{g}");
    assert!(svc.log_text().contains("crash loop"), "{}", svc.log_text());
    // Left alone: no more starts.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(svc.gateway()["restarts"], 5);
    // A reload tries again.
    let o = svc.ctl(&["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while svc.gateway()["restarts"].as_u64().unwrap_or(0) <= 5 {
        assert!(Instant::now() < deadline, "not tried again after a reload");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An invalid configuration stops the start with a located error and exit 78 (systemd does not
/// restart on it); `--check` says so too.
#[test]
fn an_invalid_configuration_is_refused_with_its_location() {
    let dir = tempdir("carapace-badcfg-");
    let cfg = dir.path().join("carapace.toml");
    fs::write(&cfg, "[supervisor]\nstop_timeout = \"soon\"\nbogus = 1\n")
        .unwrap_or_else(|e| panic!("{e}"));
    for check in [true, false] {
        let mut cmd = Command::new(carapace_bin());
        cmd.args(["run", "--config"]).arg(&cfg);
        if check {
            cmd.arg("--check");
        }
        let o = cmd.output().unwrap_or_else(|e| panic!("{e}"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(err.contains("carapace.toml:2:"), "{err}");
        assert!(
            err.contains("carapace.toml:3:"),
            "all errors are reported: {err}"
        );
    }
}

/// Rootless: an unprivileged user starts `carapace run`; the gateway comes up confined the
/// same way (seccomp, NoNewPrivs, no capabilities, own namespaces) though without a cgroup on a
/// host that delegates none (limits by rlimits, and `status` says so); SIGTERM stops it
/// cleanly and a SIGKILLed supervisor leaves no process behind.
#[test]
fn rootless_service_runs_the_gateway_confined() {
    if !rootless_possible() {
        return;
    }
    let rootless = || StartOpts {
        rootless: true,
        ..StartOpts::default()
    };
    let mut svc = Service::start_opts(rootless());
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    assert_eq!(status_field(prog, "Seccomp"), "2");
    assert_eq!(status_field(prog, "NoNewPrivs"), "1");
    assert_eq!(status_field(prog, "CapEff"), "0000000000000000");
    assert_eq!(status_field(prog, "CapBnd"), "0000000000000000");
    let host_uid = status_field(prog, "Uid");
    assert!(
        host_uid
            .split_whitespace()
            .all(|u| u == ROOTLESS_UID.to_string()),
        "rootless sandbox runs as {host_uid}, not the user's own uid"
    );
    for ns in ["mnt", "pid", "net", "ipc", "uts", "user"] {
        let ours = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap_or_default();
        let its = fs::read_link(format!("/proc/{prog}/ns/{ns}")).unwrap_or_default();
        assert_ne!(ours, its, "{ns} namespace shared with the host");
    }
    let st = svc.status();
    assert_eq!(st["mode"], "rootless", "{st}");
    if cgroup_dirs_named("gateway-").is_empty() {
        assert!(
            st["cgroups"]
                .as_str()
                .is_some_and(|c| c.contains("rlimits")),
            "{st}"
        );
    }
    // A tool through the broker works too.
    let tok = svc.token("client");
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/echo", "rootless"]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["stdout"], "rootless\n", "{v}");
    let exit = svc.stop();
    assert!(exit.success(), "{exit}; log:\n{}", svc.log_text());
    assert!(!alive(init) && !alive(prog));

    let mut svc = Service::start_opts(rootless());
    let init = svc.gateway_running(None, Duration::from_secs(20));
    let prog = program_of(init);
    svc.kill();
    assert!(
        wait_gone(prog, Duration::from_secs(5)),
        "gateway survived a SIGKILLed rootless supervisor"
    );
    assert!(wait_gone(init, Duration::from_secs(5)));
}

/// systemd socket activation: with LISTEN_FDS the gateway gets systemd's socket (fd 3 of the
/// supervisor), not one bound from the configuration's `listen`.
#[test]
fn a_socket_from_systemd_activation_is_handed_over() {
    if !privileged() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let activated = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let svc = Service::start_opts(StartOpts {
        activated: Some(l),
        ..StartOpts::default()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http(activated, "GET", "/health", None);
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "activated socket not served ({code} {body}); log:\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The configured address was not bound.
    assert_eq!(http(svc.addr, "GET", "/health", None).0, 0);
    assert!(
        svc.log_text().contains("socket activation"),
        "{}",
        svc.log_text()
    );
}

/// The broker's tools are started by the spawner processes (one per CPU, at most four),
/// single-threaded children of the supervisor forked at its start; the tools run confined.
/// Once the spawners are killed, tools still start (from the supervisor itself), and the status
/// and the log say so.
#[test]
fn tools_come_from_the_spawner_and_still_start_once_it_is_killed() {
    if !privileged() {
        return;
    }
    let mut svc = Service::start("");
    svc.gateway_running(None, Duration::from_secs(20));
    let st = svc.status();
    let said = st["tools"].as_str().unwrap_or_default();
    let spawners: Vec<i64> = said
        .strip_prefix("spawner (pid ")
        .or_else(|| said.strip_prefix("spawners (pids "))
        .and_then(|t| t.strip_suffix(')'))
        .map(|t| t.split(", ").filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(spawners.len(), cpus.clamp(1, 4), "{st}");
    for &spawner in &spawners {
        assert_eq!(status_field(spawner, "PPid"), svc.pid().to_string());
        assert_eq!(status_field(spawner, "Threads"), "1");
        assert_eq!(status_field(spawner, "Name"), "carapace-spawn");
    }
    assert!(svc.log_text().contains("tool spawners started"));
    let tok = svc.token("client");
    let confined = |v: &serde_json::Value| {
        let out = v["stdout"].as_str().unwrap_or_default();
        ["Seccomp:\t2", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"]
            .iter()
            .all(|l| out.contains(l))
    };
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/cat", "/proc/self/status"]);
    assert_eq!(code, 200, "{v}");
    assert!(confined(&v), "{v}");
    // The tool holds its stdio and nothing else: not the spawner's socket to the supervisor
    // (which would let it ask for tools), not the sync pipes (`ls` itself opens fd 3 to read
    // the directory).
    let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/ls", "/proc/self/fd"]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["stdout"], "0\n1\n2\n3\n", "{v}");
    for &spawner in &spawners {
        // SAFETY: killing a spawner this test's supervisor started.
        unsafe { libc::kill(spawner as i32, libc::SIGKILL) };
        assert!(
            wait_gone(spawner, Duration::from_secs(5)),
            "spawner survived"
        );
    }
    for _ in 0..2 {
        let (code, v) = exec_via_gateway(svc.addr, &tok, &["/usr/bin/cat", "/proc/self/status"]);
        assert_eq!(code, 200, "{v}");
        assert!(confined(&v), "{v}");
    }
    let st = svc.status();
    let gone = if spawners.len() == 1 {
        "in-process (the spawner is gone)"
    } else {
        "in-process (the spawners are gone)"
    };
    assert_eq!(st["tools"], gone, "{st}");
    let log = svc.log_text();
    assert_eq!(log.matches("the tool spawner is gone").count(), 1, "{log}");
    let exit = svc.stop();
    assert!(exit.success(), "{exit}; log:\n{}", svc.log_text());
}
