//! The broker end to end: real `carapace exec` runs of brokered profiles, the real
//! `carapace-client` inside the sandbox talking over its inherited fd 3, real sockets, files
//! and state directories. Every test needs root (see `carapace_tests::privileged`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A loopback TCP server that greets every connection with `HELLO <token>` and counts them.
struct Greeter {
    port: u16,
    token: String,
    accepted: Arc<AtomicUsize>,
}

impl Greeter {
    fn start() -> Greeter {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let token = unique("GREETING");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (t, n) = (token.clone(), accepted.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                let _ = writeln!(s, "HELLO {t}");
            }
        });
        Greeter {
            port,
            token,
            accepted,
        }
    }
}

/// One brokered test: a policy with profiles `brokered` and `other`, a state directory, a
/// workspace, the data directory `open` may read beneath, two secrets and a file channel.
struct Broker {
    client: &'static ClientBin,
    /// Host-side scratch (secrets, the channel file, the policy): never mounted.
    scratch: tempfile::TempDir,
    /// Tools the `exec` op may run (mounted read-exec in `brokered`), under /var/tmp.
    tools: tempfile::TempDir,
    /// Data beneath which `open` may read (not mounted in the sandbox).
    data: tempfile::TempDir,
    ws: tempfile::TempDir,
    state: PathBuf,
    policy: PathBuf,
    outbox: PathBuf,
    alpha: String,
    beta: String,
}

impl Broker {
    /// None when not root and skipping is allowed.
    fn new(port: u16) -> Option<Broker> {
        if !privileged() {
            return None;
        }
        let client = client_bin();
        let _ = carapace_bin();
        let scratch = tempdir("carapace-broker-scratch-");
        let tools = var_tmpdir("carapace-broker-tools-");
        let data = var_tmpdir("carapace-broker-data-");
        let ws = tempdir("carapace-broker-ws-");
        let state = scratch.path().join("state");
        let outbox = scratch.path().join("outbox.log");
        let mut secrets = Vec::new();
        for name in ["alpha", "beta"] {
            let v = unique(&format!("SECRET-{name}"));
            let p = scratch.path().join(name);
            fs::write(&p, &v).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            secrets.push(v);
        }
        // The tool the `ask` rule covers: a copy of /usr/bin/echo (content changes later).
        fs::copy("/usr/bin/echo", tools.path().join("asktool")).unwrap();
        fs::copy("/usr/bin/true", tools.path().join("denied")).unwrap();
        // Another name for it: rules decide on the resolved program.
        std::os::unix::fs::symlink("denied", tools.path().join("alias")).unwrap();
        for t in ["asktool", "denied"] {
            fs::set_permissions(tools.path().join(t), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let b = Broker {
            client,
            policy: scratch.path().join("broker.toml"),
            state,
            outbox,
            alpha: secrets[0].clone(),
            beta: secrets[1].clone(),
            scratch,
            tools,
            data,
            ws,
        };
        fs::write(&b.policy, b.policy_text(port)).unwrap();
        Some(b)
    }

    fn policy_text(&self, port: u16) -> String {
        let client_dir = self.client.dir.display();
        let client = self.client.bin.display();
        let other = self.client.other.display();
        let tools = self.tools.path().display();
        let data = self.data.path().display();
        let scratch = self.scratch.path().display();
        let outbox = self.outbox.display();
        let extra = format!(
            r#"# ---- inserted by broker_e2e ----
[profiles.brokered]
extends = "tool"
why = "broker e2e: the tool profile, the client, tools for exec, and a broker section"

[profiles.brokered.filesystem]
mounts = [ {{ path = "{client_dir}", access = "read-exec", why = "carapace-client" }},
           {{ path = "{tools}", access = "read-exec", why = "tools the exec op runs" }} ]

[profiles.brokered.broker]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "the test's loopback server" }},
            {{ host = "localhost", port = {port}, why = "a name resolving to loopback, WITHOUT allow_private" }} ]
open = [ {{ path = "{data}", access = "read", why = "test data" }},
         {{ path = "{data}/out", access = "create", why = "test outputs" }} ]
secrets = ["alpha"]
channels = ["outbox"]
exec = true

[profiles.other]
extends = "tool"
why = "broker e2e: another identity, allowed only secret beta"

[profiles.other.filesystem]
mounts = [ {{ path = "{client_dir}", access = "read-exec", why = "carapace-client" }} ]

[profiles.other.broker]
secrets = ["beta"]
rate = {{ requests_per_second = 1, burst = 3 }}

[secrets.alpha]
why = "broker e2e secret for `brokered`"
file = "{scratch}/alpha"

[secrets.beta]
why = "broker e2e secret for `other`"
file = "{scratch}/beta"

[channels.outbox]
why = "broker e2e file channel"
kind = "file"
path = "{outbox}"
recipients = ["alice@example.com"]
block = ["(?i)password\\s*[:=]"]

[[exec]]
why = "broker e2e: the client, brokered"
program = "{client}"
args = ["**"]
profile = "brokered"
approval = "allow"

[[exec]]
why = "broker e2e: the client under the other profile"
program = "{other}"
args = ["**"]
profile = "other"
approval = "allow"

[[exec]]
why = "broker e2e: shell scripts around the client"
program = "/usr/bin/sh"
args = ["-c", "**"]
profile = "brokered"
approval = "allow"

[[exec]]
why = "broker e2e: bash scripts run as the other identity (rate-limited)"
program = "/usr/bin/bash"
args = ["-c", "**"]
profile = "other"
approval = "allow"

[[exec]]
why = "broker e2e: a long-running tool"
program = "/usr/bin/sleep"
args = ["**"]
profile = "tool"
approval = "allow"

[[exec]]
why = "broker e2e: a tool that is never allowed"
program = "{tools}/denied"
approval = "deny"

[[exec]]
why = "broker e2e: a tool that needs the operator"
program = "{tools}/asktool"
args = ["**"]
profile = "brokered"
approval = "ask"
# ---- end of insertion ----
"#
        );
        insert_before_first_exec(&default_policy_text(), &extra)
    }

    /// `carapace exec --policy --workspace --state-dir [extra] -- PROGRAM ARGS`.
    fn exec_with(
        &self,
        extra: &[&str],
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Outcome {
        let state = self.state.to_string_lossy().into_owned();
        let mut e = vec!["--state-dir", state.as_str()];
        e.extend_from_slice(extra);
        let mut c = carapace_exec(Some(&self.policy), self.ws.path(), &e, program, args);
        run(&mut c, LIMIT)
    }

    /// The client with `args`, confined in `brokered`.
    fn client(&self, args: &[&str]) -> Outcome {
        self.exec_with(&[], &self.client.bin, args)
    }

    /// A shell script (sh -c), confined in `brokered`; `$C` is the client.
    fn sh(&self, script: &str) -> Outcome {
        let s = format!("C={}; {script}", self.client.bin.display());
        self.exec_with(&[], "/usr/bin/sh", &["-c", &s])
    }

    fn audit_log(&self) -> PathBuf {
        self.state.join("audit.log")
    }

    fn audit_text(&self) -> String {
        fs::read_to_string(self.audit_log()).unwrap_or_default()
    }
}

fn carapace(args: &[&str]) -> Outcome {
    let mut c = Command::new(carapace_bin());
    c.args(args);
    run(&mut c, LIMIT)
}

#[test]
fn connect_allowlisted_loopback_only() {
    let g = Greeter::start();
    let Some(b) = Broker::new(g.port) else { return };
    let port = g.port.to_string();

    // Allowed: the rule names 127.0.0.1:PORT with allow_private.
    let o = b.client(&["connect", "127.0.0.1", &port]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains(&format!("HELLO {}", g.token)),
        "{}",
        o.describe()
    );
    assert_eq!(g.accepted.load(Ordering::SeqCst), 1);

    // Not listed: another port on the same loopback address, with a listener there that must
    // never see a connection.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    other.set_nonblocking(true).unwrap();
    let oport = other.local_addr().unwrap().port().to_string();
    let o = b.client(&["connect", "127.0.0.1", &oport]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("denied"), "{}", o.describe());
    assert!(
        other.accept().is_err(),
        "the refused connect reached the listener"
    );

    // Listed by name, but `localhost` resolves to a loopback address and the rule does not say
    // allow_private: refused, and the server sees nothing.
    let o = b.client(&["connect", "localhost", &port]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert_eq!(g.accepted.load(Ordering::SeqCst), 1, "{}", o.describe());

    // Every decision is in the audit log.
    let audit = b.audit_text();
    assert!(audit.contains(&format!("127.0.0.1:{port}")), "{audit}");
    assert!(audit.contains(&format!("127.0.0.1:{oport}")), "{audit}");
    assert!(audit.contains(&format!("localhost:{port}")), "{audit}");
}

#[test]
fn secrets_only_for_the_profiles_that_name_them() {
    let Some(b) = Broker::new(9) else { return };
    // `brokered` names alpha: it gets it.
    let o = b.client(&["secret", "alpha"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains(&b.alpha), "{}", o.describe());
    // ... and not beta.
    let o = b.client(&["secret", "beta"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains(&b.beta), "{}", o.describe());
    // `other` names beta only: alpha is refused.
    let o = b.exec_with(&[], &b.client.other, &["secret", "alpha"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains(&b.alpha), "{}", o.describe());
    let o = b.exec_with(&[], &b.client.other, &["secret", "beta"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains(&b.beta), "{}", o.describe());
    // Through a sealed memfd at an fd of the program's choosing, never in the environment.
    let o = b.sh(&format!(
        "$C secret alpha --fd 7 -- /usr/bin/sh -c 'cat <&7; env | grep -c {} || true'",
        b.alpha
    ));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.starts_with(&b.alpha), "{}", o.describe());
    assert!(o.stdout.trim_end().ends_with('0'), "{}", o.describe());
    // The audit names the secrets, never their values.
    let audit = b.audit_text();
    assert!(audit.contains("alpha"), "{audit}");
    assert!(
        !audit.contains(&b.alpha) && !audit.contains(&b.beta),
        "{audit}"
    );
}

#[test]
fn open_beneath_the_rule_only() {
    let Some(b) = Broker::new(9) else { return };
    let token = unique("DATA");
    fs::write(b.data.path().join("f.txt"), &token).unwrap();
    fs::create_dir(b.data.path().join("sub")).unwrap();
    fs::write(b.data.path().join("sub/g.txt"), "nested\n").unwrap();
    // A link inside the allowed directory pointing at a secret outside it.
    std::os::unix::fs::symlink(b.scratch.path().join("alpha"), b.data.path().join("link")).unwrap();
    std::os::unix::fs::symlink(b.scratch.path(), b.data.path().join("dirlink")).unwrap();
    let data = b.data.path().display().to_string();

    // Allowed (and the sandbox cannot see the file by itself: it is not mounted).
    let o = b.client(&["open", &format!("{data}/f.txt")]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.stdout, token, "{}", o.describe());
    let o = b.client(&["open", &format!("{data}/sub/g.txt")]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = b.sh(&format!("cat {data}/f.txt"));
    assert_ne!(
        o.code,
        Some(0),
        "the data directory is visible inside: {}",
        o.describe()
    );

    // Refused: `..` out of the rule's directory, a symlink to a file outside, a path through a
    // symlinked directory, writing where only reading is allowed.
    for bad in [
        format!("{data}/../{}/alpha", b.scratch.path().display()),
        format!("{data}/sub/../f.txt"),
        format!("{data}/link"),
        format!("{data}/dirlink/alpha"),
    ] {
        let o = b.client(&["open", &bad]);
        assert_eq!(o.code, Some(1), "{bad}: {}", o.describe());
        assert!(!o.stdout.contains(&b.alpha), "{bad}: {}", o.describe());
    }
    let o = b.sh(&format!("echo x | $C open {data}/f.txt --write"));
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert_eq!(
        fs::read_to_string(b.data.path().join("f.txt")).unwrap(),
        token
    );

    // `create` beneath the create rule: a new file, never an existing one, never elsewhere.
    fs::create_dir(b.data.path().join("out")).unwrap();
    let o = b.sh(&format!(
        "echo made-inside | $C open {data}/out/new.txt --create"
    ));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(
        fs::read_to_string(b.data.path().join("out/new.txt")).unwrap(),
        "made-inside\n"
    );
    let o = b.sh(&format!("echo again | $C open {data}/out/new.txt --create"));
    assert_ne!(o.code, Some(0), "create replaced a file: {}", o.describe());
    let o = b.sh(&format!("echo x | $C open {data}/elsewhere.txt --create"));
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(!b.data.path().join("elsewhere.txt").exists());
}

/// Wait until a pending approval appears in the state directory; its key.
fn wait_pending(b: &Broker, deadline: Instant) -> String {
    loop {
        let o = carapace(&[
            "approvals",
            "list",
            "--state-dir",
            &b.state.to_string_lossy(),
        ]);
        if let Some(key) = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("pending "))
            .and_then(|r| r.split_whitespace().next())
        {
            return key.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no pending approval appeared:\n{}",
            o.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `asktool ARG` through the broker's exec op, in the background; the outcome.
fn ask_exec(b: &Broker, arg: &str) -> std::thread::JoinHandle<Outcome> {
    let state = b.state.to_string_lossy().into_owned();
    let mut c = carapace_exec(
        Some(&b.policy),
        b.ws.path(),
        &["--state-dir", &state, "--approval-timeout", "30"],
        &b.client.bin,
        &[
            "exec",
            "--",
            &b.tools.path().join("asktool").to_string_lossy(),
            arg,
        ],
    );
    std::thread::spawn(move || run(&mut c, LIMIT))
}

#[test]
fn ask_exec_waits_allow_once_then_always_persists_and_a_changed_binary_asks_again() {
    let Some(b) = Broker::new(9) else { return };
    let state = b.state.to_string_lossy().into_owned();
    let t0 = Instant::now();

    // 1. ask -> pending; the run waits; allowed once by the operator CLI -> it runs.
    let run1 = ask_exec(&b, "first-run");
    let key = wait_pending(&b, t0 + Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !run1.is_finished(),
        "the ask exec did not wait for the operator"
    );
    let o = carapace(&["approvals", "allow", &key, "--state-dir", &state]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run1.join().unwrap();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("first-run"), "{}", o.describe());

    // 2. allow-once is not remembered: the same request asks again; deny it.
    let run2 = ask_exec(&b, "first-run");
    let key = wait_pending(&b, Instant::now() + Duration::from_secs(30));
    let o = carapace(&["approvals", "deny", &key, "--state-dir", &state]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run2.join().unwrap();
    assert_eq!(o.code, Some(125), "{}", o.describe());
    assert!(!o.stdout.contains("first-run"), "{}", o.describe());

    // 3. allow-always: persisted; a later carapace (a new broker) runs it without asking.
    let run3 = ask_exec(&b, "always");
    let key = wait_pending(&b, Instant::now() + Duration::from_secs(30));
    let o = carapace(&[
        "approvals",
        "allow",
        &key,
        "--always",
        "--state-dir",
        &state,
    ]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run3.join().unwrap();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = carapace(&["approvals", "list", "--state-dir", &state]);
    assert!(o.stdout.contains("always "), "{}", o.describe());
    let run4 = ask_exec(&b, "always");
    let o = run4.join().unwrap();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("always"), "{}", o.describe());

    // 4. The binary changes (same path, other content): the grant no longer matches.
    let tool = b.tools.path().join("asktool");
    let tmp = b.tools.path().join("asktool.new");
    fs::copy("/usr/bin/printf", &tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &tool).unwrap();
    let run5 = ask_exec(&b, "always");
    let key = wait_pending(&b, Instant::now() + Duration::from_secs(30));
    let o = carapace(&["approvals", "deny", &key, "--state-dir", &state]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run5.join().unwrap();
    assert_eq!(o.code, Some(125), "{}", o.describe());

    // Each step is in the audit log.
    let audit = b.audit_text();
    assert!(audit.contains("asktool"), "{audit}");
}

/// `b`'s policy plus a profile whose workspace is executable and an `ask` rule for the script
/// `approved.sh` in the workspace, run in that profile; the script's path.
fn with_workspace_script(b: &Broker) -> (PathBuf, PathBuf) {
    let script = b.ws.path().join("approved.sh");
    let extra = format!(
        r#"[profiles.wsexec]
extends = "tool"
why = "exec-by-descriptor e2e: programs in the workspace may run"

[profiles.wsexec.filesystem]
workspace = {{ path = "/workspace", access = "read-write-exec", why = "scripts written there run" }}

[[exec]]
why = "exec-by-descriptor e2e: the workspace's script, asked"
program = "{}"
profile = "wsexec"
approval = "ask"
"#,
        script.display()
    );
    let policy = b.scratch.path().join("wsexec.toml");
    let text = insert_before_first_exec(&fs::read_to_string(&b.policy).unwrap(), &extra);
    fs::write(&policy, text).unwrap();
    (policy, script)
}

/// Write `body` to `at` (0755) through a new file renamed over it: a new inode, as an editor
/// or a build writes.
fn replace_script(at: &std::path::Path, body: &str) {
    let tmp = at.with_extension("new");
    fs::write(&tmp, body).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, at).unwrap();
}

#[test]
fn an_approved_program_swapped_before_its_start_never_runs() {
    let Some(b) = Broker::new(9) else { return };
    let (policy, script) = with_workspace_script(&b);
    replace_script(&script, "#!/bin/sh\necho approved \"$0\"\n");
    let state = b.state.to_string_lossy().into_owned();
    let ask = || {
        let mut c = carapace_exec(
            Some(&policy),
            b.ws.path(),
            &["--state-dir", &state, "--approval-timeout", "30"],
            &b.client.bin,
            &["exec", "--", &script.to_string_lossy()],
        );
        std::thread::spawn(move || run(&mut c, LIMIT))
    };

    // The request is made and its approval pending (the program opened and hashed); then the
    // file is replaced, then the operator allows (always) what was shown to them.
    let run1 = ask();
    let key = wait_pending(&b, Instant::now() + Duration::from_secs(30));
    replace_script(&script, "#!/bin/sh\necho swapped\n");
    let o = carapace(&[
        "approvals",
        "allow",
        &key,
        "--always",
        "--state-dir",
        &state,
    ]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run1.join().unwrap();
    assert!(!o.stdout.contains("swapped"), "{}", o.describe());
    assert!(
        o.stdout.contains("approved") || o.stderr.contains("no longer the file"),
        "{}",
        o.describe()
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());

    // The grant is bound to the approved content: the swapped script asks again (denied) ...
    let run2 = ask();
    let key = wait_pending(&b, Instant::now() + Duration::from_secs(30));
    let o = carapace(&["approvals", "deny", &key, "--state-dir", &state]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = run2.join().unwrap();
    assert!(!o.stdout.contains("swapped"), "{}", o.describe());
    assert_ne!(o.code, Some(0), "{}", o.describe());

    // ... and the approved content, written back, runs without asking: a script started by
    // its descriptor, handed to its interpreter as /dev/fd/N.
    replace_script(&script, "#!/bin/sh\necho approved \"$0\"\n");
    let o = ask().join().unwrap();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("approved /dev/fd/"), "{}", o.describe());
}

#[test]
fn message_to_a_recipient_not_listed_goes_to_the_dead_letter_queue() {
    let Some(b) = Broker::new(9) else { return };
    let ok = unique("MSG-OK");
    let o = b.sh(&format!("echo {ok} | $C send outbox alice@example.com"));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("delivered"), "{}", o.describe());
    assert!(
        fs::read_to_string(&b.outbox)
            .unwrap_or_default()
            .contains(&ok),
        "the allowed message is not in the channel file"
    );

    let bad = unique("MSG-DLQ");
    let o = b.sh(&format!("echo {bad} | $C send outbox mallory@example.com"));
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        !fs::read_to_string(&b.outbox)
            .unwrap_or_default()
            .contains(&bad),
        "the refused message reached the channel"
    );
    let dlq = b.state.join("dlq");
    let entries: Vec<String> = fs::read_dir(&dlq)
        .unwrap_or_else(|e| panic!("{}: {e}", dlq.display()))
        .flatten()
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e.contains(&bad) && e.contains("mallory@example.com")),
        "no dead letter for the refused message: {entries:?}"
    );

    // A blocked pattern: dead-lettered too.
    let blocked = unique("MSG-BLOCKED");
    let o = b.sh(&format!(
        "echo '{blocked} password: hunter2' | $C send outbox alice@example.com"
    ));
    assert_ne!(o.code, Some(0), "{}", o.describe());
    let outbox = fs::read_to_string(&b.outbox).unwrap_or_default();
    assert!(!outbox.contains(&blocked), "{outbox}");
    let dead = fs::read_dir(&dlq).unwrap().flatten().any(|e| {
        fs::read_to_string(e.path())
            .unwrap_or_default()
            .contains(&blocked)
    });
    assert!(dead, "no dead letter for the blocked message");

    // A secret value in an outbound message is redacted (the child may hold it; the channel
    // never sees it).
    let marker = unique("MSG-SECRET");
    let o = b.sh(&format!(
        "S=$($C secret alpha); echo \"{marker} $S\" | $C send outbox alice@example.com"
    ));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let outbox = fs::read_to_string(&b.outbox).unwrap_or_default();
    assert!(outbox.contains(&marker), "{outbox}");
    assert!(
        !outbox.contains(&b.alpha),
        "the secret reached the channel: {outbox}"
    );
    assert!(outbox.contains("[REDACTED]"), "{outbox}");
}

#[test]
fn audit_chain_verifies_and_a_tampered_log_fails() {
    let Some(b) = Broker::new(9) else { return };
    for _ in 0..2 {
        let o = b.client(&["secret", "alpha"]);
        assert_eq!(o.code, Some(0), "{}", o.describe());
        let o = b.client(&["secret", "beta"]);
        assert_eq!(o.code, Some(1), "{}", o.describe());
    }
    let log = b.audit_log();
    let log_s = log.to_string_lossy().into_owned();
    let o = carapace(&["audit", "verify", &log_s]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.starts_with("ok: 4 records"), "{}", o.describe());

    // Edit a record in the middle: `beta` -> `gamma` in line 2.
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[1].contains("beta"), "{text}");
    let mut tampered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    tampered[1] = tampered[1].replace("beta", "gamma");
    fs::write(&log, tampered.join("\n") + "\n").unwrap();
    let o = carapace(&["audit", "verify", &log_s]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stdout.contains("line 2"), "{}", o.describe());

    // Delete a record instead.
    let deleted: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| *l)
        .collect();
    fs::write(&log, deleted.join("\n") + "\n").unwrap();
    let o = carapace(&["audit", "verify", &log_s]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
}

#[test]
fn malformed_frames_get_an_error_and_the_broker_keeps_serving() {
    let Some(b) = Broker::new(9) else { return };
    // Raw garbage as one datagram on fd 3, then read the broker's answer to it, then a normal
    // request on the same socket.
    let o = b.sh("printf 'this is not a frame {' >&3; \
         dd bs=65536 count=1 <&3 2>/dev/null; echo; \
         printf '{\"v\":1,\"id\":7,\"op\":\"no_such_op\"}' >&3; \
         dd bs=65536 count=1 <&3 2>/dev/null; echo; \
         $C ping");
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines.len() >= 3, "{}", o.describe());
    assert!(lines[0].contains("\"ok\":false"), "{}", o.describe());
    assert!(lines[1].contains("\"ok\":false"), "{}", o.describe());
    assert!(lines[1].contains("\"id\":7"), "{}", o.describe());
    assert_eq!(lines[2], "pong", "{}", o.describe());
}

#[test]
fn without_a_broker_section_there_is_no_fd_3() {
    let Some(b) = Broker::new(9) else { return };
    // The same client under the default `tool` profile (no broker section): no socket, no
    // variable; it fails cleanly.
    let policy = b.scratch.path().join("plain.toml");
    let extra = format!(
        r#"[profiles.plain]
extends = "tool"
why = "no broker section"
[profiles.plain.filesystem]
mounts = [ {{ path = "{}", access = "read-exec", why = "carapace-client" }} ]
[[exec]]
why = "the client without a broker"
program = "/usr/bin/sh"
args = ["-c", "**"]
profile = "plain"
approval = "allow"
"#,
        b.client.dir.display()
    );
    fs::write(
        &policy,
        insert_before_first_exec(&default_policy_text(), &extra),
    )
    .unwrap();
    let script = format!(
        "echo \"env=${{CARAPACE_BROKER_FD:-unset}}\"; [ -e /proc/self/fd/3 ] && echo fd3-open; {} ping",
        b.client.bin.display()
    );
    let mut c = carapace_exec(
        Some(&policy),
        b.ws.path(),
        &[],
        "/usr/bin/sh",
        &["-c", &script],
    );
    let o = run(&mut c, LIMIT);
    assert!(o.stdout.starts_with("env=unset\n"), "{}", o.describe());
    assert!(!o.stdout.contains("fd3-open"), "{}", o.describe());
    assert!(!o.stdout.contains("pong"), "{}", o.describe());
    assert_ne!(o.code, Some(0), "{}", o.describe());
    // And no state was created for it.
    assert!(!b.state.exists());
}

/// The host uid of a `/proc/self/uid_map` line ("inside host count").
fn host_uid(line: &str) -> u32 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a uid_map line: {line:?}"))
}

#[test]
fn exec_runs_tools_confined_apart_and_redacts_secrets_in_their_output() {
    let Some(b) = Broker::new(9) else { return };
    let client = b.client.bin.display();
    let o = b.sh(&format!(
        "cat /proc/self/uid_map; \
         $C exec -- /usr/bin/cat /proc/self/uid_map; \
         $C exec -- /usr/bin/false; echo false-exit=$?; \
         $C exec -- /usr/bin/ls /no/such/dir; echo ls-exit=$?; \
         $C exec -- {client} ping; \
         $C exec -- /usr/bin/echo leaked:{}; \
         $C exec -- {tools}/denied; echo denied-exit=$?; \
         $C exec -- {tools}/alias; echo alias-exit=$?; \
         $C exec -- {tools}/../{tools_name}/./denied; echo dotted-exit=$?",
        b.alpha,
        tools = b.tools.path().display(),
        tools_name = b.tools.path().file_name().unwrap().to_string_lossy(),
    ));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines.len() >= 7, "{}", o.describe());
    // The tool is a new sandbox with a host identity of its own, both in the per-run range.
    let (main, tool) = (host_uid(lines[0]), host_uid(lines[1]));
    let range = 0x7F00_0000u32..0x7F00_0000 + (1 << 22);
    assert!(
        range.contains(&main) && range.contains(&tool),
        "{}",
        o.describe()
    );
    assert_ne!(main, tool, "the tool shares its parent sandbox's host uid");
    // Exit codes and stderr come back.
    assert_eq!(lines[2], "false-exit=1", "{}", o.describe());
    assert_eq!(lines[3], "ls-exit=2", "{}", o.describe());
    assert!(o.stderr.contains("/no/such/dir"), "{}", o.describe());
    // A tool whose profile has a broker section gets its own socket.
    assert_eq!(lines[4], "pong", "{}", o.describe());
    // A secret value in a tool's output is redacted.
    assert!(lines[5].starts_with("leaked:"), "{}", o.describe());
    assert!(!o.stdout.contains(&b.alpha), "{}", o.describe());
    assert!(lines[5].contains("[REDACTED]"), "{}", o.describe());
    // A denied program is refused (125) without running.
    assert_eq!(lines[6], "denied-exit=125", "{}", o.describe());
    // ... also through a symlink or a path with `..`: decided on the resolved program.
    assert_eq!(lines[7], "alias-exit=125", "{}", o.describe());
    assert_eq!(lines[8], "dotted-exit=125", "{}", o.describe());
    assert!(o.stderr.contains("denied"), "{}", o.describe());
}

#[test]
fn the_profile_rate_limits_a_flood_of_requests() {
    let Some(b) = Broker::new(9) else { return };
    let o = run(
        &mut carapace_exec(
            Some(&b.policy),
            b.ws.path(),
            &["--state-dir", &b.state.to_string_lossy()],
            "/usr/bin/bash",
            &[
                "-c",
                &format!(
                    "for i in 1 2 3 4 5 6 7 8; do {} ping; done; exit 0",
                    b.client.bin.display()
                ),
            ],
        ),
        LIMIT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let pongs = o.stdout.lines().filter(|l| *l == "pong").count();
    // Burst 3 at one request per second: the loop takes well under the seconds it would need
    // for more than one refill.
    assert!((3..=5).contains(&pongs), "{pongs} pongs:\n{}", o.describe());
    assert!(o.stderr.contains("rate"), "{}", o.describe());
}

fn pending_files(b: &Broker) -> Vec<PathBuf> {
    fs::read_dir(b.state.join("pending"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_unanswered_ask_times_out_to_deny() {
    let Some(b) = Broker::new(9) else { return };
    let state = b.state.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let mut c = carapace_exec(
        Some(&b.policy),
        b.ws.path(),
        &["--state-dir", &state, "--approval-timeout", "2"],
        &b.client.bin,
        &[
            "exec",
            "--",
            &b.tools.path().join("asktool").to_string_lossy(),
            "never",
        ],
    );
    let o = run(&mut c, LIMIT);
    assert_eq!(o.code, Some(125), "{}", o.describe());
    assert!(!o.stdout.contains("never"), "{}", o.describe());
    assert!(t0.elapsed() >= Duration::from_secs(2), "{}", o.describe());
    assert!(pending_files(&b).is_empty(), "{:?}", pending_files(&b));
    assert!(b.audit_text().contains("timed out"), "{}", b.audit_text());
}

/// `sh -c SCRIPT` confined in `brokered` in the background (approval timeout 60 s): the
/// supervisor's pid and its output when it ends.
fn sh_in_background(
    b: &Broker,
    script: &str,
) -> (u32, std::thread::JoinHandle<std::process::Output>) {
    let state = b.state.to_string_lossy().into_owned();
    let mut c = carapace_exec(
        Some(&b.policy),
        b.ws.path(),
        &["--state-dir", &state, "--approval-timeout", "60"],
        "/usr/bin/sh",
        &["-c", &format!("C={}; {script}", b.client.bin.display())],
    );
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    (
        pid,
        std::thread::spawn(move || child.wait_with_output().unwrap()),
    )
}

fn describe(o: &std::process::Output) -> String {
    format!(
        "{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child that ends while its `ask` waits: the approval is withdrawn (no pending file left)
/// and the supervisor does not wait for the operator. (One request at a time per socket: two
/// client processes sharing fd 3 would read each other's replies.)
#[test]
fn when_the_child_ends_its_pending_ask_is_withdrawn() {
    let Some(b) = Broker::new(9) else { return };
    let t0 = Instant::now();
    let (_, bg) = sh_in_background(
        &b,
        &format!(
            "$C exec -- {}/asktool withdrawn & /usr/bin/sleep 3; exit 0",
            b.tools.path().display()
        ),
    );
    let _ = wait_pending(&b, t0 + Duration::from_secs(20));
    let o = bg.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(t0.elapsed() < Duration::from_secs(30), "{}", describe(&o));
    assert!(pending_files(&b).is_empty(), "{:?}", pending_files(&b));
    assert!(b.audit_text().contains("asktool"), "{}", b.audit_text());
}

/// A tool still running when the child that asked for it ends is killed, reaped and its cgroup
/// removed before the supervisor exits.
#[test]
fn when_the_child_ends_its_tools_are_killed_and_cleaned_up() {
    let Some(b) = Broker::new(9) else { return };
    let (whole, frac) = (40 + std::process::id() % 50, std::process::id() % 1000);
    // (The script spells the duration in two pieces, so that only the tool's own command line
    // starts with `/usr/bin/sleep NAP`.)
    let tool_cmdline = format!("/usr/bin/sleep {whole}.{frac}");
    let t0 = Instant::now();
    let (sup, bg) = sh_in_background(
        &b,
        &format!("W={whole}; $C exec -- /usr/bin/sleep $W.{frac} & /usr/bin/sleep 3; exit 0"),
    );
    let tool_running = || {
        host_processes_with(&tool_cmdline)
            .iter()
            .any(|(_, c)| c.starts_with(&tool_cmdline))
    };
    while !tool_running() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the tool never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tool_cgroups = format!("tool-{sup}-");
    assert!(
        !cgroup_dirs_named(&tool_cgroups).is_empty(),
        "no cgroup {tool_cgroups}* for the tool"
    );
    let o = bg.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "carapace waited for the tool: {}",
        describe(&o)
    );
    assert!(
        !tool_running(),
        "the tool outlived the child that asked for it"
    );
    assert_eq!(cgroup_dirs_named(&tool_cgroups), Vec::<PathBuf>::new());
}

/// The audit records of `op` (JSON lines), as (who.id, who.profile, target, decision).
fn audit_records(b: &Broker, op: &str) -> Vec<(u64, String, String, String)> {
    b.audit_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["op"] == op)
        .map(|v| {
            (
                v["who"]["id"].as_u64().unwrap_or(0),
                v["who"]["profile"].as_str().unwrap_or("").to_string(),
                v["target"].as_str().unwrap_or("").to_string(),
                v["decision"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every process of a sandbox inherits the same broker socket (fd 3). Clients of a pipeline
/// run at once; each opens a session of its own on fd 3, so their requests and replies never
/// mix, and every op on a session is checked and audited as the sandbox's identity.
///
/// Without sessions (checked with the previous client, `CARAPACE_CLIENT_BIN`): one pipeline
/// alone happens to pass (`send` reads its stdin to the end before asking, so the two requests
/// do not overlap), the four at once fail ("request id 1 is already in flight", "the broker
/// answered send with a secret reply").
#[test]
fn a_shell_pipeline_of_clients_works() {
    let Some(b) = Broker::new(9) else { return };
    let o = b.sh("$C secret alpha | $C send outbox alice@example.com");
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.stdout.trim(), "delivered", "{}", o.describe());
    // Four such pipelines at once: eight clients on one socket, two kinds of request, each
    // answered after an audit fsync (so they overlap at the broker).
    let o = b.sh("pids=; for i in 1 2 3 4; do \
           ( $C secret alpha | $C send outbox alice@example.com ) & pids=\"$pids $!\"; \
         done; \
         for p in $pids; do wait $p || echo FAILED; done");
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("FAILED"), "{}", o.describe());
    assert_eq!(
        o.stdout.lines().filter(|l| *l == "delivered").count(),
        4,
        "{}",
        o.describe()
    );
    // Each message was the secret, and reached the channel only redacted.
    let outbox = fs::read_to_string(&b.outbox).unwrap_or_default();
    assert!(!outbox.contains(&b.alpha), "{outbox}");
    assert_eq!(outbox.matches("[REDACTED]").count(), 5, "{outbox}");
    // Every request on a session was decided and audited as the sandbox's identity: five
    // secrets and five sends, all allowed, all as the identity the supervisor bound to fd 3
    // (numbered per supervisor: #1 in both runs), none as another.
    let secrets = audit_records(&b, "secret");
    let sends = audit_records(&b, "send");
    assert_eq!(secrets.len(), 5, "{secrets:?}");
    assert_eq!(sends.len(), 5, "{sends:?}");
    for (_, profile, _, decision) in secrets.iter().chain(&sends) {
        assert_eq!((profile.as_str(), decision.as_str()), ("brokered", "allow"));
    }
    let mut ids: Vec<u64> = secrets.iter().chain(&sends).map(|r| r.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids,
        vec![1],
        "the sandbox's identity: {secrets:?} {sends:?}"
    );
    // Opening a session is no action: nothing to audit.
    assert!(audit_records(&b, "session").is_empty());
}

/// Without sessions (checked with the previous client): the eight pings alone happen to pass
/// (every client uses id 1, pings are answered at once and all replies are alike), the mixed
/// jobs fail (ids in flight, replies read by the wrong client).
#[test]
fn clients_running_at_once_do_not_collide() {
    let Some(b) = Broker::new(9) else { return };
    fs::write(b.data.path().join("note"), "NOTE\n").unwrap();
    let note = b.data.path().join("note");
    // Eight `ping`s at once, as the issue describes them.
    let o = b.sh(
        "pids=; for i in 1 2 3 4 5 6 7 8; do $C ping & pids=\"$pids $!\"; done; \
         for p in $pids; do wait $p || echo FAILED; done",
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("FAILED"), "{}", o.describe());
    assert_eq!(
        o.stdout.lines().filter(|l| *l == "pong").count(),
        8,
        "{}",
        o.describe()
    );
    // Eight jobs at once, each a few different requests in a row (pings are answered at once
    // and all alike; secrets and opens wait for the audit log, so requests overlap and a reply
    // read by the wrong client would be noticed).
    let o = b.sh(&format!(
        "pids=; for i in 1 2 3 4 5 6 7 8; do \
           ( for j in 1 2 3; do \
               $C ping >/dev/null && $C secret alpha >/dev/null && \
               $C open {note} >/dev/null || exit 1; \
             done; echo ok ) & pids=\"$pids $!\"; \
         done; \
         for p in $pids; do wait $p || echo FAILED; done",
        note = note.display()
    ));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("FAILED"), "{}", o.describe());
    assert_eq!(
        o.stdout.lines().filter(|l| *l == "ok").count(),
        8,
        "{}",
        o.describe()
    );
    assert!(!o.stderr.contains("already in flight"), "{}", o.describe());
    assert_eq!(audit_records(&b, "secret").len(), 24);
    assert_eq!(audit_records(&b, "open").len(), 24);
}
