//! A brokered network, end to end through `carapace run`: a child whose profile has
//! `network.mode = "brokered"` reaches its `connect` hosts by name, through the broker's
//! policy check and audit, and nothing else (`egress-probe` runs confined as that child and
//! reports what it could reach).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_tests::require_root;
use carapace_tests::service::{policy_text, Service, StartOpts};
use serde_json::Value;

/// An upstream on the host's loopback: answers each line with `echo: LINE`; remembers lines.
fn upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let port = l.local_addr().expect("addr").port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_ok() {
                    let line = line.trim_end().to_string();
                    let mut w = &s;
                    let _ = w.write_all(format!("echo: {line}\n").as_bytes());
                    seen.lock().expect("lock").push(line);
                }
            });
        }
    });
    (port, got)
}

/// The probe's report, from the supervisor's log of its stdout.
fn report(svc: &Service) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = svc.log_text();
        let found = log.lines().find_map(|l| {
            let json = &l[l.find("PROBE {")? + "PROBE ".len()..];
            // The logger adds the child's fields after the message.
            serde_json::Deserializer::from_str(json)
                .into_iter::<Value>()
                .next()?
                .ok()
        });
        if let Some(v) = found {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report from the probe in 30 s; the supervisor's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `carapace run` with `egress-probe` as its one child, in profile `probe`: a brokered network
/// whose one rule is `localhost:PORT` (`allow_private` as given).
fn start_probe(port: u16, allow_private: bool) -> Service {
    let policy = policy_text(&format!(
        r#"
[profiles.probe]
why = "the egress probe under test: reaches the test's upstream by name, through the broker"
extends = "channel"

[profiles.probe.network]
mode = "brokered"

[profiles.probe.broker]
connect = [{{ host = "localhost", port = {port}, allow_private = {allow_private}, why = "the test's upstream" }}]
"#
    ));
    Service::start_opts(StartOpts {
        program: Some(env!("CARGO_BIN_EXE_egress-probe").to_string()),
        args: format!("[\"localhost\", \"{port}\"]"),
        policy: Some(policy),
        gateway_profile: Some("probe".into()),
        ready: false,
        ..StartOpts::default()
    })
}

/// The audit records of connects to `localhost:PORT`.
fn connects(svc: &Service, port: u16) -> Vec<String> {
    let audit = std::fs::read_to_string(svc.state_dir().join("audit.log")).unwrap_or_default();
    audit
        .lines()
        .filter(|l| l.contains("\"connect\"") && l.contains(&format!("localhost:{port}")))
        .map(String::from)
        .collect()
}

#[test]
fn a_brokered_child_reaches_its_connect_hosts_by_name_and_nothing_else() {
    require_root("egress_e2e");
    let (port, got) = upstream();
    let svc = start_probe(port, true);
    let r = report(&svc);
    let log = svc.log_text();
    // The name resolves, inside, to the forwarded loopback address, and the exchange went
    // through to the real upstream on the host.
    assert_eq!(
        r["resolved"],
        serde_json::json!([format!("127.0.0.2:{port}")]),
        "{r:#}"
    );
    assert!(
        r["hosts"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.2\tlocalhost"),
        "{r:#}"
    );
    assert_eq!(
        r["forwarded"]["ok"], "echo: hello through the broker",
        "{r:#}\n{log}"
    );
    assert_eq!(
        got.lock().expect("lock").as_slice(),
        ["hello through the broker"]
    );
    // Nothing else: the sandbox's own 127.0.0.1 has no listener, another port is refused by
    // Landlock, an outside address has no route, and no TCP listener may be made.
    assert_eq!(r["loopback"]["err"], "ConnectionRefused", "{r:#}");
    assert_eq!(r["other_port"]["err"], "PermissionDenied", "{r:#}");
    assert_eq!(r["outside"]["err"], "NetworkUnreachable", "{r:#}");
    assert_eq!(r["bind"]["err"], "PermissionDenied", "{r:#}");
    assert_eq!(r["seccomp"], "Seccomp:\t2", "{r:#}");
    // The broker decided and audited the connection as the child.
    let connects = connects(&svc, port);
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert!(connects[0].contains("\"allow\""), "{}", connects[0]);
    assert!(connects[0].contains("probe"), "{}", connects[0]);
}

#[test]
fn the_broker_still_decides_a_forwarded_connection() {
    require_root("egress_e2e");
    // The same rule without `allow_private`: the broker resolves `localhost` itself, finds
    // only loopback, and refuses. The forwarder's listener inside the sandbox accepted the
    // program's connection, and closes it: nothing reaches the upstream.
    let (port, got) = upstream();
    let svc = start_probe(port, false);
    let r = report(&svc);
    assert_eq!(
        r["resolved"],
        serde_json::json!([format!("127.0.0.2:{port}")]),
        "{r:#}"
    );
    assert_eq!(r["forwarded"]["ok"], "", "closed without an answer: {r:#}");
    assert!(got.lock().expect("lock").is_empty());
    let connects = connects(&svc, port);
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert!(!connects[0].contains("\"allow\""), "{}", connects[0]);
    assert!(
        svc.log_text().contains("the broker did not connect"),
        "{}",
        svc.log_text()
    );
}

/// The JVM the Java probe runs on (signal-cli's runtime), and its configuration directory
/// (Debian's OpenJDK refuses to start without it; the shipped signal-cli profile mounts it).
const JAVA: &str = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java";
const JAVA_CONF: &str = "/etc/java-17-openjdk";

#[test]
fn a_jvm_resolves_and_reaches_a_forwarded_name_as_signal_cli_would() {
    require_root("egress_e2e");
    assert!(
        std::path::Path::new(JAVA).exists() && std::path::Path::new(JAVA_CONF).exists(),
        "{JAVA} and {JAVA_CONF} are needed (.ci/test installs openjdk-17-jdk-headless)"
    );
    let (port, got) = upstream();
    // The probe's source in the child's workspace (the source launcher compiles it in memory).
    // A workspace of the test's own (beneath /tmp: /var is a system directory).
    let dir = tempfile::Builder::new()
        .prefix("carapace-jvm-")
        .tempdir()
        .expect("temp dir");
    let ws = dir.path().join("workspace");
    std::fs::create_dir(&ws).expect("workspace");
    std::fs::copy(
        carapace_tests::repo_root().join("tests/data/EgressProbe.java"),
        ws.join("EgressProbe.java"),
    )
    .expect("copy the probe");
    let policy = policy_text(&format!(
        r#"
[profiles.jvm]
why = "a JVM with a brokered network, shaped like the shipped signal-cli profile"
extends = "channel"

[profiles.jvm.filesystem]
mounts = [{{ path = "{JAVA_CONF}", access = "read", why = "the JVM's configuration (java.security)" }}]

[profiles.jvm.limits]
memory = "1GiB"
pids = 256
open_files = 1024

[profiles.jvm.network]
mode = "brokered"

[profiles.jvm.broker]
connect = [{{ host = "localhost", port = {port}, allow_private = true, why = "the test's upstream" }}]
"#
    ));
    let svc = Service::start_opts(StartOpts {
        program: Some(JAVA.to_string()),
        args: format!("[\"/workspace/EgressProbe.java\", \"localhost\", \"{port}\"]"),
        policy: Some(policy),
        gateway_profile: Some("jvm".into()),
        ready: false,
        extra_config: format!("workspace = \"{}\"\n", ws.display()),
        ..StartOpts::default()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let reply = loop {
        let log = svc.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("PROBE-JAVA reply") || l.contains("PROBE-JAVA failed"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer from the JVM in 90 s; the supervisor's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = svc.log_text();
    assert!(log.contains("PROBE-JAVA resolved 127.0.0.2"), "{log}");
    assert!(
        reply.contains("PROBE-JAVA reply echo: hello from the JVM"),
        "{reply}\n{log}"
    );
    assert_eq!(got.lock().expect("lock").as_slice(), ["hello from the JVM"]);
    assert_eq!(connects(&svc, port).len(), 1);
}

#[test]
fn run_check_refuses_a_brokered_child_in_rootless_mode_and_accepts_it_as_root() {
    require_root("egress_e2e");
    // A directory the unprivileged user can read, with a configuration whose one child has
    // a brokered network.
    let dir = tempfile::Builder::new()
        .prefix("carapace-egress-check-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        policy_text(
            r#"
[profiles.probe]
why = "a child with a brokered network"
extends = "channel"

[profiles.probe.network]
mode = "brokered"

[profiles.probe.broker]
connect = [{ host = "chat.example.org", port = 443, why = "its service" }]
"#,
        ),
    )
    .expect("write the policy");
    let config = dir.path().join("carapace.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\npolicy = [\"{}\"]\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n\n[gateway]\nprogram = \"{}\"\nargs = [\"chat.example.org\", \"443\"]\nprofile = \"probe\"\nlisten = \"127.0.0.1:1\"\n",
            policy.display(),
            dir.path().join("state").display(),
            dir.path().join("run").display(),
            env!("CARGO_BIN_EXE_egress-probe"),
        ),
    )
    .expect("write the configuration");
    for p in [dir.path(), policy.as_path(), config.as_path()] {
        carapace_tests::give_to_rootless_user(p);
    }
    let mut cmd = std::process::Command::new(carapace_tests::carapace_bin());
    cmd.args(["run", "--check", "--config"]).arg(&config);
    let as_root = cmd.output().expect("carapace run --check");
    assert!(
        as_root.status.success(),
        "{}{}",
        String::from_utf8_lossy(&as_root.stdout),
        String::from_utf8_lossy(&as_root.stderr)
    );
    let rootless = carapace_tests::as_rootless_user(&cmd)
        .output()
        .expect("carapace run --check as the unprivileged user");
    let err = String::from_utf8_lossy(&rootless.stderr);
    assert_eq!(rootless.status.code(), Some(78), "{err}");
    assert!(err.contains("needs a supervisor running as root"), "{err}");
}
