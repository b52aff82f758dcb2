//! Tests of the operator commands and their output.

use super::*;
use crate::control::{
    ChildStatus, ControlHandler, ControlServer, DlqUnreadable, GrantInfo, PendingApproval,
};
use std::sync::Arc;
use std::time::Duration;

fn who() -> carapace_broker::audit::Who {
    carapace_broker::audit::Who {
        id: 3,
        role: "tool".to_string(),
        profile: "dev".to_string(),
    }
}

/// The control tests' sample status, as a configured service with a channel adapter in
/// backoff.
fn status_report() -> StatusReport {
    let mut s = crate::control::tests::sample_status();
    s.config = "/etc/carapace/carapace.toml".to_string();
    s.children.push(ChildStatus {
        name: "slack".to_string(),
        role: "channel".to_string(),
        profile: "channel".to_string(),
        state: "backoff".to_string(),
        pid: None,
        uptime_secs: None,
        restarts: 12,
        last_exit: Some("exit=1".to_string()),
        memory_bytes: None,
        cpu_ms: None,
        tasks: None,
    });
    s.channels = vec![crate::control::ChannelReport {
        channel: "slack".to_string(),
        connected: Some(false),
        error: Some("connect: refused".to_string()),
        last_in: Some("2026-11-21T14:01:00.000000Z".to_string()),
        last_out: None,
        queued: 2,
        held: 1,
        outbox: 3,
        dead_lettered: 0,
    }];
    s
}

#[test]
fn multi_line_daemon_messages_keep_their_lines_only() {
    let m = "error: x\n --> policy.toml:3:1\n  |\n3 | [a\x1b[31m";
    let c = clean_lines(m);
    assert_eq!(c.lines().count(), 4);
    assert!(!c.contains('\x1b'), "{c}");
    assert!(c.ends_with("[a\\u{1b}[31m"), "{c}");
}

#[test]
fn units() {
    assert_eq!(fmt_duration(0), "0s");
    assert_eq!(fmt_duration(59), "59s");
    assert_eq!(fmt_duration(60), "1m00s");
    assert_eq!(fmt_duration(3723), "1h02m");
    assert_eq!(fmt_duration(90_061), "1d01h");
    assert_eq!(fmt_bytes(512), "512 B");
    assert_eq!(fmt_bytes(1536), "1.5 KiB");
    assert_eq!(fmt_bytes(12 << 20), "12.0 MiB");
    assert_eq!(fmt_bytes(3 << 30), "3.0 GiB");
    assert_eq!(fmt_cpu(850), "850ms");
    assert_eq!(fmt_cpu(1500), "1.50s");
    assert_eq!(fmt_cpu(123_000), "2m03s");
    assert_eq!(clean("a\x1b[31mb\nc"), "a\\u{1b}[31mb\\nc");
    assert_eq!(clean("plain ünïcode"), "plain ünïcode");
}

#[test]
fn status_output() {
    let s = status_report();
    let out = format_status(&s);
    let want = "\
carapace 0.1.0 (pid 4242), up 1h02m since 2026-11-21T14:00:00.000000Z
mode:          root; cgroups: hybrid v1+v2; tools: spawner (pid 4243)
config:        /etc/carapace/carapace.toml
policy:        /etc/carapace/policy.toml (sha256 abababababababab…, loaded 2026-11-21T14:00:00.000000Z)
reloads:       2
approvals:     1 pending; dead letters: 0
audit:         /var/lib/carapace/audit.log (seq 17, head cdcdcdcdcdcdcdcd…)

NAME     ROLE     PROFILE  STATE    PID  UPTIME  RESTARTS  MEMORY    CPU    TASKS  LAST EXIT
gateway  gateway  gateway  running  777  1m05s   1         12.0 MiB  1.50s  3      signal=9
slack    channel  channel  backoff  -    -       12        -         -      -      exit=1

CHANNEL  ADAPTER       LAST IN                      LAST OUT  QUEUED  HELD  OUTBOX  DEAD  ERROR
slack    disconnected  2026-11-21T14:01:00.000000Z  -         2       1     3       0     connect: refused
";
    assert_eq!(out, want, "\n{out}");
    // A failed reload, no children, no policy files, hostile names.
    let mut s = status_report();
    s.last_reload_error = Some("policy.toml:3:1: unknown key".to_string());
    s.policy.files.clear();
    s.children.clear();
    let out = format_status(&s);
    assert!(out.contains("reloads:       2; last reload FAILED: policy.toml:3:1: unknown key\n"));
    assert!(out.contains("policy:        embedded default (sha256"));
    assert!(out.ends_with("\nno children\n"), "{out}");
    let mut s = status_report();
    s.children[0].name = "gw\x1b]0;pwned\x07".to_string();
    assert!(!format_status(&s).contains('\x1b'));
}

#[test]
fn approvals_output() {
    let l = ApprovalsList {
        pending: vec![PendingApproval {
            id: 7,
            who: "tool#3(dev)".to_string(),
            program: "/usr/bin/git".to_string(),
            sha256: "ef".repeat(32),
            argv: vec!["git".to_string(), "push".to_string(), "a\nb".to_string()],
            profile: "dev".to_string(),
            why: "pushing needs a human".to_string(),
            created: "2026-11-21T14:01:00.000000Z".to_string(),
            expires_in_secs: 95,
        }],
        always: vec![GrantInfo {
            program: "/usr/bin/make".to_string(),
            argv: vec!["make".to_string()],
            profile: "dev".to_string(),
            sha256: "01".repeat(32),
            granted_at: "2026-11-20T10:00:00.000000Z".to_string(),
        }],
    };
    let out = format_approvals(&l);
    let want = format!(
        "pending 7  tool#3(dev)  /usr/bin/git  argv=[\"git\", \"push\", \"a\\nb\"]  \
             profile=dev  expires in 1m35s\n        sha256={}  asked \
             2026-11-21T14:01:00.000000Z  why: pushing needs a human\nalways /usr/bin/make  \
             argv=[\"make\"]  profile=dev  sha256={}  granted 2026-11-20T10:00:00.000000Z\n",
        "ef".repeat(32),
        "01".repeat(32)
    );
    assert_eq!(out, want, "\n{out}");
    assert_eq!(
        format_approvals(&ApprovalsList::default()),
        "no pending approvals\n"
    );
    let pf = PendingFile {
        key: "4242-1".to_string(),
        supervisor_pid: 4242,
        id: 1,
        who: who(),
        program: PathBuf::from("/usr/bin/curl"),
        program_sha256: "aa".repeat(32),
        argv: vec!["curl".to_string()],
        profile: "dev".to_string(),
        why: "network".to_string(),
        created: "2026-11-21T14:01:00.000000Z".to_string(),
        timeout_secs: 120,
    };
    let line = format_pending_file(&pf);
    assert!(line.starts_with("pending 4242-1  tool#3(dev)  /usr/bin/curl  argv=[\"curl\"]"));
    assert!(
        line.ends_with("why: network  (carapace exec pid 4242)"),
        "{line}"
    );
}

#[test]
fn dlq_output() {
    let l = DlqList {
        letters: vec![DlqLetter {
            id: "00001-42-0".to_string(),
            entry: carapace_broker::dlq::Entry {
                channel: "slack".to_string(),
                recipient: "#ops".to_string(),
                body: "hello\nworld \x1b[2J".to_string(),
                reason: "recipient not allowlisted".to_string(),
                who: who(),
                ts: "2026-11-21T14:02:00.000000Z".to_string(),
            },
        }],
        unreadable: vec![DlqUnreadable {
            file: "/var/lib/carapace/dlq/x.json".to_string(),
            error: "not JSON".to_string(),
        }],
    };
    let out = format_dlq(&l);
    let want = "\
00001-42-0  2026-11-21T14:02:00.000000Z  slack -> #ops  from tool#3(dev)  reason: recipient not allowlisted
    body (16 bytes): \"hello\\nworld \\u{1b}[2J\"
unreadable /var/lib/carapace/dlq/x.json: not JSON
";
    assert_eq!(out, want, "\n{out}");
    assert_eq!(format_dlq(&DlqList::default()), "no dead letters\n");
    // Long bodies are cut.
    let mut l2 = l.clone();
    l2.letters[0].entry.body = "x".repeat(1000);
    let out = format_dlq(&l2);
    assert!(out.contains("body (1000 bytes): \"xxx"));
    assert!(out.contains("x…\""));
    assert!(out.len() < 400);
}

#[test]
fn audit_lines() {
    let v: Value = serde_json::from_str(
            r#"{"seq":7,"ts":"2026-11-21T13:20:07.123456Z","prev":"00","who":{"id":3,"role":"tool","profile":"dev"},"op":"connect","target":"api.example.com:443","rule":{"line":12,"why":"model API"},"decision":"allow","outcome":"connected","detail":""}"#,
        )
        .unwrap();
    assert_eq!(
        format_audit_line(&v),
        "#7 2026-11-21T13:20:07.123456Z tool#3(dev) connect allow api.example.com:443 -> \
             connected [rule line 12: model API]"
    );
    let v: Value = serde_json::from_str(
            r#"{"seq":8,"ts":"t","who":{"id":0,"role":"operator","profile":""},"op":"approval","target":"7","rule":null,"decision":"deny","outcome":"denied","detail":"by uid 0\u001b"}"#,
        )
        .unwrap();
    assert_eq!(
        format_audit_line(&v),
        "#8 t operator#0() approval deny 7 -> denied (by uid 0\\u{1b})"
    );
    let v: Value = serde_json::from_str(r#"{"rule":{"why":"default"}}"#).unwrap();
    assert_eq!(format_audit_line(&v), "#? ? ? ? ? ? -> ? [default]");
    assert_eq!(
        format_audit_line(&Value::String("torn {\"seq".to_string())),
        "? (not an audit record) torn {\"seq"
    );
}

#[test]
fn reload_output() {
    let ok = serde_json::json!({"applied": true, "policy_sha256": "ab".repeat(32), "message": "policy changed"});
    assert_eq!(
        format_reload(&ok),
        "reloaded: policy changed (policy sha256 abababababababab…)\n"
    );
    let no = serde_json::json!({"applied": false, "policy_sha256": "", "message": "nothing to do"});
    assert!(format_reload(&no).starts_with("not applied: nothing to do; the old"));
}

#[test]
fn socket_choice() {
    let user = PathBuf::from("/run/user/1000/carapace/control.sock");
    let system = PathBuf::from(SYSTEM_CONTROL_SOCKET);
    let none = |_: &Path| false;
    let all = |_: &Path| true;
    let only_system = |p: &Path| p == Path::new(SYSTEM_CONTROL_SOCKET);
    let x = Path::new("/x.sock");
    assert_eq!(pick_socket(Some(x), true, true, user.clone(), all), x);
    // The default when it exists, when set by the environment, or as root.
    assert_eq!(pick_socket(None, false, false, user.clone(), all), user);
    assert_eq!(
        pick_socket(None, true, false, user.clone(), only_system),
        user
    );
    assert_eq!(
        pick_socket(None, false, true, system.clone(), only_system),
        system
    );
    // Unprivileged, no rootless supervisor: the system one if there is one.
    assert_eq!(
        pick_socket(None, false, false, user.clone(), only_system),
        system
    );
    assert_eq!(pick_socket(None, false, false, user.clone(), none), user);
}

#[test]
fn approval_refs() {
    assert_eq!(parse_approval_ref("7"), Ok(ApprovalRef::Daemon(7)));
    assert_eq!(
        parse_approval_ref("4242-3"),
        Ok(ApprovalRef::ExecKey("4242-3".to_string()))
    );
    for bad in [
        "",
        "-",
        "1-",
        "-1",
        "../x",
        "abc",
        "1-2-3",
        "7 ",
        "99999999999999999999999",
    ] {
        assert!(parse_approval_ref(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn command_line() {
    use crate::cli::tests::parse as p;
    use crate::cli::Command;
    let Command::Status(a) = p(&["carapace", "status", "--json", "--socket", "/s"])
        .unwrap()
        .command
    else {
        panic!("not status")
    };
    assert!(a.opts.json);
    assert_eq!(a.opts.socket, Some(PathBuf::from("/s")));
    let Command::Approvals(a) = p(&[
        "carapace",
        "approvals",
        "--socket",
        "/s",
        "allow",
        "5",
        "--always",
        "--json",
    ])
    .unwrap()
    .command
    else {
        panic!("not approvals")
    };
    assert!(a.opts.json);
    assert_eq!(a.opts.socket(), PathBuf::from("/s"));
    assert!(matches!(a.command, ApprovalsCommand::Allow { ref key, always: true } if key == "5"));
    let Command::Audit(AuditCommand::Tail {
        lines,
        follow,
        opts,
    }) = p(&["carapace", "audit", "tail", "-n", "50", "-f", "--json"])
        .unwrap()
        .command
    else {
        panic!("not audit tail")
    };
    assert_eq!((lines, follow, opts.json), (50, true, true));
    let Command::Audit(AuditCommand::Tail { lines, follow, .. }) =
        p(&["carapace", "audit", "tail"]).unwrap().command
    else {
        panic!("not audit tail")
    };
    assert_eq!((lines, follow), (control::DEFAULT_TAIL_LINES, false));
    let Command::Dlq(a) = p(&["carapace", "dlq", "release", "x-1", "--socket", "/s"])
        .unwrap()
        .command
    else {
        panic!("not dlq")
    };
    assert!(matches!(a.command, DlqCommand::Release { ref id } if id == "x-1"));
    assert!(matches!(
        p(&["carapace", "reload", "--json"]).unwrap().command,
        Command::Reload(ReloadArgs {
            opts: CtlOpts { json: true, .. }
        })
    ));
    assert!(p(&["carapace", "dlq", "drop"]).is_err());
    assert!(p(&["carapace", "audit", "tail", "-n", "x"]).is_err());
}

#[test]
fn token_command_line_and_output() {
    use crate::cli::tests::parse as p;
    use crate::cli::Command;
    use carapace_broker::tokens::{Scope, TokenInfo, TokenStore};
    let Command::Token(a) = p(&["carapace", "token", "create", "--state-dir", "/s"])
        .unwrap()
        .command
    else {
        panic!("not token")
    };
    assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
    assert!(!a.json);
    assert!(matches!(
        a.command,
        TokenCommand::Create { ref name, scope: Scope::Client } if name == "token"
    ));
    let Command::Token(a) = p(&[
        "carapace", "token", "create", "--name", "ci", "--scope", "operator", "--json",
    ])
    .unwrap()
    .command
    else {
        panic!("not token")
    };
    assert!(a.json);
    assert!(matches!(
        a.command,
        TokenCommand::Create { ref name, scope: Scope::Operator } if name == "ci"
    ));
    assert!(p(&["carapace", "token", "create", "--scope", "root"]).is_err());
    assert!(p(&["carapace", "token", "revoke"]).is_err());
    assert!(p(&["carapace", "token"]).is_err());

    // Output: a table of id, name, scope, created, names cleaned.
    assert!(format_tokens(&[]).starts_with("no tokens"));
    let t = format_tokens(&[TokenInfo {
        id: "1f2e3d4c".into(),
        name: "laptop\u{1b}[2J".into(),
        scope: Scope::Operator,
        created: "2026-01-02T03:04:05Z".into(),
    }]);
    assert!(t.starts_with("ID        NAME"), "{t}");
    assert!(t.contains("1f2e3d4c") && t.contains("operator"), "{t}");
    assert!(!t.contains('\u{1b}'), "{t}");

    // Through token_to, on a temporary state directory.
    let tmp = tempfile::tempdir().unwrap();
    let args = |command| TokenArgs {
        state_dir: Some(tmp.path().to_path_buf()),
        json: false,
        command,
    };
    let (code, out, err) = run(|t| {
        token_to(
            &args(TokenCommand::Create {
                name: "x".into(),
                scope: Scope::Client,
            }),
            t,
        )
    });
    assert_eq!(code, EXIT_OK, "{err}");
    assert!(out.contains("cpt_") && out.contains("will not be shown again"));
    let (code, out, _) = run(|t| token_to(&args(TokenCommand::List), t));
    assert_eq!(code, EXIT_OK);
    assert!(out.contains(" x ") && !out.contains("cpt_"), "{out}");
    let (code, _, err) = run(|t| {
        token_to(
            &args(TokenCommand::Revoke {
                id_or_name: "y".into(),
            }),
            t,
        )
    });
    assert_eq!(code, EXIT_FAILED);
    assert!(err.starts_with("carapace: no token"), "{err}");
    let (code, _, _) = run(|t| {
        token_to(
            &args(TokenCommand::Create {
                name: String::new(),
                scope: Scope::Client,
            }),
            t,
        )
    });
    assert_eq!(code, EXIT_USAGE);
    assert_eq!(
        TokenStore::in_state_dir(tmp.path()).list().unwrap().len(),
        1
    );
}

struct Fake {
    audit: PathBuf,
}

/// A control server with the [`Fake`] handler on a runtime of its own, as a running supervisor.
struct FakeSupervisor {
    rt: tokio::runtime::Runtime,
    stop: crate::control::ControlShutdown,
    task: tokio::task::JoinHandle<()>,
}

impl FakeSupervisor {
    fn start(sock: &Path, audit: PathBuf) -> FakeSupervisor {
        let server = ControlServer::bind(sock, None).unwrap();
        let stop = server.shutdown_handle();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let task = {
            let _g = rt.enter();
            server.serve(Arc::new(Fake { audit }))
        };
        FakeSupervisor { rt, stop, task }
    }

    fn stop(self) {
        self.stop.shutdown();
        self.rt.block_on(self.task).unwrap();
    }
}

impl ControlHandler for Fake {
    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => serde_json::to_value(status_report()).map_err(|e| e.to_string()),
            Request::ApprovalsList => {
                serde_json::to_value(ApprovalsList::default()).map_err(|e| e.to_string())
            }
            Request::ApprovalsResolve { id: 5, resolution } => Ok(serde_json::json!({
                "id": 5, "decision": if resolution == "deny" { "denied" } else { "allowed once" }
            })),
            Request::ApprovalsResolve { id, .. } => Err(format!("no pending approval {id}")),
            Request::DlqList => serde_json::to_value(DlqList::default()).map_err(|e| e.to_string()),
            Request::DlqRelease { id } | Request::DlqDrop { id } => {
                Err(format!("dead-letter queue: no entry {id}"))
            }
            Request::HeldList => serde_json::to_value(HeldList {
                held: vec![crate::control::HeldInfo {
                    id: "00007-1-0".to_string(),
                    channel: "tg".to_string(),
                    sender: "222".to_string(),
                    conversation: "222".to_string(),
                    body: "let me in".to_string(),
                    ts: "2026-11-21T14:03:00.000000Z".to_string(),
                }],
            })
            .map_err(|e| e.to_string()),
            Request::HeldAdmit { id, always } if id == "00007-1-0" => {
                Ok(serde_json::json!({"id": id, "seq": 9, "always": always}))
            }
            Request::HeldAdmit { id, .. } | Request::HeldDrop { id } => {
                Err(format!("no held message {id}"))
            }
            Request::Reload => Err("policy.toml:1:1: expected a table".to_string()),
            Request::AuditTail { .. } => Err("not here".to_string()),
            Request::Metrics => Ok(serde_json::json!({"text": "# TYPE x gauge\nx 1\n"})),
            Request::JobsList => Ok(serde_json::json!({"jobs": [
                {"name": "tick", "schedule": "every 2s", "session": "job-tick", "deliver_to": null,
                 "last_run": {"run": "r1", "started": "2026-12-07T10:00:00.000000Z", "trigger": "schedule", "outcome": "ok"},
                 "next": "2026-12-07T10:00:02.000000Z"},
                {"name": "daily", "schedule": "cron \"0 7 * * *\" (UTC)", "session": "news",
                 "deliver_to": {"channel": "tg", "conversation": "111"}, "last_run": null, "next": null}
            ]})),
            Request::JobsRun { name } if name == "tick" || name == "broken" => {
                Ok(serde_json::json!({"job": name, "run": format!("m-{name}")}))
            }
            Request::JobsRun { name } => Err(format!("no job {name:?} in the configuration")),
            Request::JobsHistory { .. } => Ok(serde_json::json!({"runs": [
                {"job": "tick", "run": "m-tick", "trigger": "manual", "started": "s", "ended": "e",
                 "outcome": "ok", "reply": "all fine"},
                {"job": "broken", "run": "m-broken", "trigger": "manual", "started": "s", "ended": "e",
                 "outcome": "failed", "error": "unavailable: the model is down"}
            ]})),
        }
    }
    fn audit_log(&self) -> PathBuf {
        self.audit.clone()
    }
}

fn opts(socket: &Path) -> CtlOpts {
    CtlOpts {
        socket: Some(socket.to_path_buf()),
        json: false,
    }
}

/// Run a command into buffers: (exit status, stdout, stderr).
fn run(f: impl FnOnce(&mut Term<'_>) -> i32) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = f(&mut Term {
        out: &mut out,
        err: &mut err,
    });
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn exit_codes_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let state = dir.path().join("state");
    let approvals = |command, json| {
        let a = ApprovalsArgs {
            state_dir: Some(state.clone()),
            opts: CtlOpts {
                json,
                ..opts(&sock)
            },
            command,
        };
        run(|t| approvals_to(&a, t))
    };
    let allow = |key: &str| {
        approvals(
            ApprovalsCommand::Allow {
                key: key.to_string(),
                always: false,
            },
            false,
        )
    };
    let tail = |follow| {
        let a = AuditCommand::Tail {
            lines: 3,
            follow,
            opts: opts(&sock),
        };
        run(|t| audit_to(&a, t))
    };
    let status = |json| {
        let a = StatusArgs {
            opts: CtlOpts {
                json,
                ..opts(&sock)
            },
        };
        run(|t| status_to(&a, t))
    };
    let dlq = |command| {
        let a = DlqArgs {
            opts: opts(&sock),
            command,
        };
        run(|t| dlq_to(&a, t))
    };
    let reload = || run(|t| reload_to(&ReloadArgs { opts: opts(&sock) }, t));
    let held = |command| {
        let a = HeldArgs {
            opts: opts(&sock),
            command,
        };
        run(|t| held_to(&a, t))
    };

    // No supervisor: 3 for everything that needs one, with the reason on stderr.
    let (code, out, err) = status(false);
    assert_eq!(code, EXIT_NO_DAEMON);
    assert!(out.is_empty());
    assert!(
        err.starts_with("carapace: no supervisor is running (no control socket at "),
        "{err}"
    );
    assert!(err.contains("start one with `carapace run`"), "{err}");
    assert_eq!(reload().0, EXIT_NO_DAEMON);
    assert_eq!(dlq(DlqCommand::List).0, EXIT_NO_DAEMON);
    assert_eq!(held(HeldCommand::List).0, EXIT_NO_DAEMON);
    assert_eq!(
        held(HeldCommand::Admit {
            id: "a/b".into(),
            always: false
        })
        .0,
        EXIT_USAGE
    );
    assert_eq!(tail(false).0, EXIT_NO_DAEMON);
    assert_eq!(allow("5").0, EXIT_NO_DAEMON);
    // `approvals list` still lists the state directory's (nothing here).
    let (code, out, err) = approvals(ApprovalsCommand::List, false);
    assert_eq!((code, out.as_str()), (EXIT_OK, "no pending approvals\n"));
    assert!(err.contains("showing the approvals of `carapace exec` runs only"));
    // Usage errors never reach the socket.
    let (code, _, err) = approvals(ApprovalsCommand::Deny { key: "x/y".into() }, false);
    assert_eq!(code, EXIT_USAGE);
    assert!(err.contains("is not an approval ID"), "{err}");
    assert_eq!(
        dlq(DlqCommand::Drop {
            id: "../etc".into()
        })
        .0,
        EXIT_USAGE
    );

    // A supervisor.
    let log = dir.path().join("audit.log");
    std::fs::write(
        &log,
        "{\"seq\":1,\"op\":\"connect\"}\n{\"seq\":2,\"op\":\"open\"}\n",
    )
    .unwrap();
    let supervisor = FakeSupervisor::start(&sock, log);
    let (code, out, err) = status(false);
    assert_eq!((code, err.as_str()), (EXIT_OK, ""));
    assert_eq!(out, format_status(&status_report()));
    let (code, out, _) = status(true);
    assert_eq!(code, EXIT_OK);
    let back: StatusReport = serde_json::from_str(&out).unwrap();
    assert_eq!(back, status_report());

    let (code, out, _) = approvals(ApprovalsCommand::List, false);
    assert_eq!((code, out.as_str()), (EXIT_OK, "no pending approvals\n"));
    let (code, out, _) = approvals(ApprovalsCommand::List, true);
    assert_eq!(code, EXIT_OK);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"pending": [], "always": [], "exec_pending": []})
    );
    assert_eq!(
        allow("5"),
        (
            EXIT_OK,
            "approval 5: allowed once\n".to_string(),
            String::new()
        )
    );
    let (code, _, err) = approvals(ApprovalsCommand::Deny { key: "6".into() }, false);
    assert_eq!(
        (code, err.as_str()),
        (EXIT_FAILED, "carapace: no pending approval 6\n")
    );
    // A PID-N key still goes to the state directory: no such file there.
    let (code, _, err) = approvals(
        ApprovalsCommand::Deny {
            key: "4242-1".into(),
        },
        false,
    );
    assert_eq!(code, EXIT_FAILED);
    assert!(err.contains("no pending approval 4242-1"), "{err}");

    assert_eq!(
        dlq(DlqCommand::List),
        (EXIT_OK, "no dead letters\n".to_string(), String::new())
    );
    let (code, out, _) = held(HeldCommand::List);
    assert_eq!(code, EXIT_OK);
    assert_eq!(
            out,
            "00007-1-0  2026-11-21T14:03:00.000000Z  tg  from 222 (conversation 222)\n    body (9 bytes): \"let me in\"\n"
        );
    assert_eq!(
        held(HeldCommand::Admit {
            id: "00007-1-0".into(),
            always: true
        }),
        (
            EXIT_OK,
            "admitted 00007-1-0: queued for the agent as #9; its sender is admitted for good\n"
                .to_string(),
            String::new()
        )
    );
    let (code, _, err) = held(HeldCommand::Drop { id: "x-2".into() });
    assert_eq!(
        (code, err.as_str()),
        (EXIT_FAILED, "carapace: no held message x-2\n")
    );
    let (code, _, err) = dlq(DlqCommand::Release { id: "x-1".into() });
    assert_eq!(
        (code, err.as_str()),
        (EXIT_FAILED, "carapace: dead-letter queue: no entry x-1\n")
    );
    let (code, out, err) = reload();
    assert_eq!(code, EXIT_FAILED);
    assert!(out.is_empty());
    assert_eq!(
        err,
        "carapace: reload rejected: policy.toml:1:1: expected a table\ncarapace: the old \
             configuration and policy stay in force\n"
    );
    let (code, out, _) = tail(false);
    assert_eq!(code, EXIT_OK);
    assert_eq!(out, "#1 ? ? connect ? ? -> ?\n#2 ? ? open ? ? -> ?\n");
    let a = AuditCommand::Tail {
        lines: 1,
        follow: false,
        opts: CtlOpts {
            json: true,
            ..opts(&sock)
        },
    };
    // --json: the record as stored, field order included.
    let (code, out, _) = run(|t| audit_to(&a, t));
    assert_eq!(
        (code, out.as_str()),
        (EXIT_OK, "{\"seq\":2,\"op\":\"open\"}\n")
    );

    supervisor.stop();
    assert_eq!(status(false).0, EXIT_NO_DAEMON);
}

#[test]
fn audit_tail_follow_until_the_supervisor_stops() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let log = dir.path().join("audit.log");
    std::fs::write(&log, "{\"seq\":1,\"op\":\"connect\"}\n").unwrap();
    let supervisor = FakeSupervisor::start(&sock, log.clone());
    let a = AuditCommand::Tail {
        lines: 5,
        follow: true,
        opts: opts(&sock),
    };
    let follower = std::thread::spawn(move || run(|t| audit_to(&a, t)));
    std::thread::sleep(Duration::from_millis(300));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":2,\"op\":\"open\"}\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    supervisor.stop();
    let (code, out, err) = follower.join().unwrap();
    assert_eq!(out, "#1 ? ? connect ? ? -> ?\n#2 ? ? open ? ? -> ?\n");
    assert_eq!(code, EXIT_FAILED);
    assert!(
        err.contains("the supervisor closed the connection"),
        "{err}"
    );
}

#[test]
fn metrics_prints_the_exposition_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let metrics = |json| {
        let a = MetricsArgs {
            opts: CtlOpts {
                json,
                ..opts(&sock)
            },
        };
        run(|t| metrics_to(&a, t))
    };
    assert_eq!(metrics(false).0, EXIT_NO_DAEMON);
    let supervisor = FakeSupervisor::start(&sock, dir.path().join("audit.log"));
    let (code, out, err) = metrics(false);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (EXIT_OK, "# TYPE x gauge\nx 1\n", "")
    );
    let (code, out, _) = metrics(true);
    assert_eq!(code, EXIT_OK);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["text"], "# TYPE x gauge\nx 1\n");
    supervisor.stop();
}

fn audit_record(i: u64) -> carapace_broker::audit::AuditRecord {
    carapace_broker::audit::AuditRecord {
        who: who(),
        op: "connect".into(),
        target: format!("h{i}:443"),
        rule: None,
        decision: carapace_broker::audit::AuditDecision::Allow,
        outcome: "connected".into(),
        detail: String::new(),
    }
}

#[test]
fn audit_tail_follows_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let path = dir.path().join("audit.log");
    let mut log = carapace_broker::audit::AuditLog::open(&path).unwrap();
    for i in 1..=2 {
        log.append(&audit_record(i)).unwrap();
    }
    let supervisor = FakeSupervisor::start(&sock, path.clone());
    let a = AuditCommand::Tail {
        lines: 5,
        follow: true,
        opts: opts(&sock),
    };
    let follower = std::thread::spawn(move || run(|t| audit_to(&a, t)));
    std::thread::sleep(Duration::from_millis(300));
    log.append(&audit_record(3)).unwrap();
    assert!(log.rotate().unwrap().is_some());
    // Another writer (as the broker would be) continues in the new file.
    let mut other = carapace_broker::audit::AuditLog::open(&path).unwrap();
    other.append(&audit_record(4)).unwrap();
    log.append(&audit_record(5)).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    supervisor.stop();
    let (_, out, _) = follower.join().unwrap();
    let seqs: Vec<&str> = out.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(seqs, ["#1", "#2", "#3", "#4", "#5"], "{out}");
    assert!(carapace_broker::audit::verify_set(&path).unwrap().is_ok());
}

/// An audit log of `n` records at `dir/audit.log`, rotated every 4 records by `audit rotate`.
fn rotated_audit_log(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("audit.log");
    let mut log = carapace_broker::audit::AuditLog::open(&path).unwrap();
    for i in 1..=n {
        log.append(&audit_record(i)).unwrap();
        if i % 4 == 0 {
            let a = AuditCommand::Rotate {
                file: path.clone(),
                keep: None,
            };
            let (code, out, err) = run(|t| audit_to(&a, t));
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.starts_with("rotated: "), "{out}");
        }
    }
    path
}

#[test]
fn audit_verify_covers_a_rotated_set_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = rotated_audit_log(dir.path(), 10);
    let verify = |json| AuditCommand::Verify {
        file: path.clone(),
        json,
    };
    let (code, out, _) = run(|t| audit_to(&verify(false), t));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ok: 3 files, 10 records, chain intact across files, head seq 10"),
        "{out}"
    );
    let (code, out, _) = run(|t| audit_to(&verify(true), t));
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["lines"], 10);
    assert_eq!(v["head"]["seq"], 10);
    assert_eq!(v["anchor"], Value::Null);
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "{v}");
    let firsts: Vec<u64> = files
        .iter()
        .map(|f| f["first_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(firsts, [1, 5, 9]);
    assert_eq!(files[2]["file"], path.to_str().unwrap());
    assert_eq!(files[1]["lines"], 4);

    // An edited record in the middle file: exit 1, the file and line named.
    let middle = carapace_broker::audit::rotated_name(&path, 5);
    let text = std::fs::read_to_string(&middle).unwrap();
    std::fs::write(&middle, text.replacen("h6:443", "h7:443", 1)).unwrap();
    let (code, out, _) = run(|t| audit_to(&verify(false), t));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("{}: BROKEN: line 2: edited", middle.display())),
        "{out}"
    );
    let (code, out, _) = run(|t| audit_to(&verify(true), t));
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["broken"]["file"], middle.to_str().unwrap(), "{v}");
    assert_eq!(v["broken"]["line"], 2, "{v}");
    assert_eq!(v["files"].as_array().map(Vec::len), Some(2), "{v}");

    // The middle file gone: records missing before the active file.
    std::fs::remove_file(&middle).unwrap();
    let (code, out, _) = run(|t| audit_to(&verify(false), t));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("records seq 5..=8 are missing"), "{out}");
}

#[test]
fn audit_rotate_keeps_what_it_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let path = rotated_audit_log(dir.path(), 9);
    let a = AuditCommand::Rotate {
        file: path.clone(),
        keep: Some(1),
    };
    let (code, out, _) = run(|t| audit_to(&a, t));
    assert_eq!(code, 0, "{out}");
    let left = carapace_broker::audit::rotated_files(&path).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, 9);
    // The active file is empty now: nothing to rotate.
    let (code, out, _) = run(|t| audit_to(&a, t));
    assert_eq!(
        (code, out.starts_with("nothing to rotate")),
        (0, true),
        "{out}"
    );
    let verify = AuditCommand::Verify {
        file: path.clone(),
        json: false,
    };
    let (code, out, _) = run(|t| audit_to(&verify, t));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("starts at seq 9 anchored on prev"), "{out}");
    // A file that cannot be opened as a log: exit 1, said on stderr.
    let a = AuditCommand::Rotate {
        file: dir.path().join("nope/audit.log"),
        keep: None,
    };
    let (code, _, err) = run(|t| audit_to(&a, t));
    assert_eq!(code, 1);
    assert!(err.contains("nope/audit.log"), "{err}");
}

#[test]
fn jobs_commands() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let jobs = |command, json| {
        let a = JobsArgs {
            opts: CtlOpts {
                json,
                ..opts(&sock)
            },
            command,
        };
        run(|t| jobs_to(&a, t))
    };
    // No supervisor: 3.
    let (code, _, err) = jobs(JobsCommand::List, false);
    assert_eq!(code, EXIT_NO_DAEMON, "{err}");
    let fake = FakeSupervisor::start(&sock, dir.path().join("audit.log"));
    let (code, out, _) = jobs(JobsCommand::List, false);
    assert_eq!(code, EXIT_OK);
    assert!(
        out.contains("tick  every 2s  session job-tick  answer kept in the session"),
        "{out}"
    );
    assert!(
        out.contains("last run: 2026-12-07T10:00:00.000000Z (schedule, ok)"),
        "{out}"
    );
    assert!(out.contains("answer to tg conversation 111"), "{out}");
    assert!(out.contains("last run: none    next: -"), "{out}");
    // A run waited for: its outcome decides the status.
    let run_of = |name: &str| JobsCommand::Run {
        name: name.to_string(),
        no_wait: false,
        timeout: 5,
    };
    let (code, out, _) = jobs(run_of("tick"), false);
    assert_eq!(code, EXIT_OK, "{out}");
    assert!(
        out.contains("tick  run m-tick  manual  ok") && out.contains("answer: \"all fine\""),
        "{out}"
    );
    let (code, out, _) = jobs(run_of("broken"), false);
    assert_eq!(code, EXIT_FAILED, "{out}");
    assert!(
        out.contains("error: unavailable: the model is down"),
        "{out}"
    );
    let (code, _, err) = jobs(run_of("nope"), false);
    assert_eq!(code, EXIT_FAILED);
    assert!(err.contains("no job \"nope\""), "{err}");
    let (code, out, _) = jobs(
        JobsCommand::Run {
            name: "tick".into(),
            no_wait: true,
            timeout: 5,
        },
        true,
    );
    assert_eq!(code, EXIT_OK);
    assert!(out.contains("\"run\": \"m-tick\""), "{out}");
    let (code, out, _) = jobs(
        JobsCommand::History {
            name: None,
            limit: 5,
        },
        false,
    );
    assert_eq!(code, EXIT_OK);
    assert_eq!(
        out.lines().filter(|l| !l.starts_with("    ")).count(),
        2,
        "{out}"
    );
    fake.stop();
}
