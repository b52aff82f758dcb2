//! Tool workspaces through `carapace run`: each owner (client token) gets a tools workspace of
//! its own; workspaces the operator grants (`[workspaces.NAME]`) are reachable by name, with a
//! `cwd` within them; a tool in one sees no other. Needs root (namespaces, idmapped mounts).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_tests::agent::ws;
use carapace_tests::rpc::{RpcClient, RpcOutcome};
use carapace_tests::service::{Service, StartOpts};
use carapace_tests::*;
use serde_json::{json, Value};

/// The shell's canonical path (what `[[exec]]` rules match).
fn shell() -> PathBuf {
    fs::canonicalize("/bin/sh").unwrap_or_else(|e| panic!("/bin/sh: {e}"))
}

/// The default policy with the shell allowed in the tool profile (the tests write files).
fn policy(extra_rules: &str) -> String {
    insert_before_first_exec(
        &default_policy_text(),
        &format!(
            "[[exec]]\nwhy = \"test: a shell that writes files in its workspace\"\nprogram = \"{}\"\nprofile = \"tool\"\napproval = \"allow\"\n{extra_rules}",
            shell().display()
        ),
    )
}

/// Directories for granted workspaces: in the temporary directory, like the escape suite's
/// workspaces (not under /var, a system directory that cannot be granted).
fn project_root() -> tempfile::TempDir {
    tempdir("carapace-ws-")
}

/// Run a tool (`tools.exec` with `extra` params); its stdout (it must exit 0).
fn run_ok(c: &mut RpcClient, argv: &[&str], extra: Value) -> String {
    let (exit, out, err) = run(c, argv, extra);
    assert_eq!(exit, 0, "{argv:?}: exit {exit}, stderr {err}");
    out
}

/// Run a tool; (exit, stdout, stderr). Panics when the call itself is refused.
fn run(c: &mut RpcClient, argv: &[&str], extra: Value) -> (i64, String, String) {
    let r = call(c, argv, extra);
    let res = r.expect_ok().clone();
    let text = |stream: &str| -> String {
        r.events_named("tools.output")
            .iter()
            .filter(|e| e["params"]["stream"] == stream)
            .filter_map(|e| e["params"]["data"].as_str())
            .collect()
    };
    (
        res["exit"].as_i64().unwrap_or(-1),
        text("stdout"),
        text("stderr"),
    )
}

fn call(c: &mut RpcClient, argv: &[&str], extra: Value) -> RpcOutcome {
    let mut p = json!({ "argv": argv });
    if let (Some(m), Some(x)) = (p.as_object_mut(), extra.as_object()) {
        m.extend(x.clone());
    }
    c.call("tools.exec", p)
}

fn sh<'a>(script: &'a str, shell: &'a str) -> [&'a str; 3] {
    [shell, "-c", script]
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{e}"))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn tools_of_different_owners_and_workspaces_do_not_share_files() {
    if !privileged() {
        return;
    }
    let projects = project_root();
    let a = projects.path().join("a");
    let b = projects.path().join("b");
    let r = projects.path().join("r");
    for d in [&a, &b, &r] {
        fs::create_dir(d).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::create_dir(a.join("sub")).unwrap_or_else(|e| panic!("{e}"));
    fs::write(a.join("in-a.txt"), "alpha\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(b.join("secret-b.txt"), "bee\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(r.join("ro.txt"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy("")),
        extra_config: format!(
            "\n[workspaces.a]\npath = \"{}\"\nwhy = \"test: project a\"\n\n[workspaces.b]\npath = \"{}\"\n\n[workspaces.r]\npath = \"{}\"\naccess = \"ro\"\n",
            a.display(),
            b.display(),
            r.display()
        ),
        ..StartOpts::default()
    });
    let shell = shell().display().to_string();
    let t1 = svc.token_named("client", "one");
    let t2 = svc.token_named("client", "two");
    let mut c1 = ws(&svc, &t1);
    let mut c2 = ws(&svc, &t2);

    // Per owner: each client's tools write in a workspace of their own.
    run_ok(
        &mut c1,
        &sh("echo one > /workspace/mine.txt", &shell),
        json!({}),
    );
    run_ok(
        &mut c2,
        &sh("echo two > /workspace/mine.txt", &shell),
        json!({}),
    );
    run_ok(
        &mut c2,
        &sh("echo only-two > /workspace/two.txt", &shell),
        json!({}),
    );
    let one = run_ok(&mut c1, &["/usr/bin/cat", "/workspace/mine.txt"], json!({}));
    let two = run_ok(&mut c2, &["/usr/bin/cat", "/workspace/mine.txt"], json!({}));
    assert_eq!((one.as_str(), two.as_str()), ("one\n", "two\n"));
    assert_eq!(
        run_ok(&mut c1, &["/usr/bin/ls", "-A", "/workspace"], json!({})),
        "mine.txt\n"
    );
    let (exit, _, _) = run(&mut c1, &["/usr/bin/cat", "/workspace/two.txt"], json!({}));
    assert_ne!(exit, 0, "client one read client two's file");
    // On the host: one directory per owner, named by a digest (never the token's text), and
    // nothing in the shared tools workspace.
    let owners = svc.state_dir().join("workspaces/owners");
    let dirs = entries(&owners);
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    for d in &dirs {
        assert!(
            d.len() == 32 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "{d}"
        );
        let mode = fs::metadata(owners.join(d))
            .unwrap_or_else(|e| panic!("{e}"))
            .permissions();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.mode() & 0o777, 0o700, "{d}");
    }
    assert!(!svc.state_dir().join("tools/mine.txt").exists());

    // Granted workspaces: a tool in `a` sees `a`'s files and writes there...
    assert_eq!(
        run_ok(
            &mut c1,
            &["/usr/bin/cat", "/workspace/in-a.txt"],
            json!({"workspace": "a"})
        ),
        "alpha\n"
    );
    run_ok(
        &mut c1,
        &sh("echo made > /workspace/made.txt", &shell),
        json!({"workspace": "a"}),
    );
    assert_eq!(
        fs::read_to_string(a.join("made.txt")).unwrap_or_else(|e| panic!("{e}")),
        "made\n"
    );
    // ... and nothing of `b` nor of the owners' workspaces, by any path.
    let listing = run_ok(
        &mut c1,
        &["/usr/bin/ls", "-A", "/workspace"],
        json!({"workspace": "a"}),
    );
    assert_eq!(listing, "in-a.txt\nmade.txt\nsub\n");
    for path in [
        "/workspace/secret-b.txt".to_string(),
        b.join("secret-b.txt").display().to_string(),
        owners.join(&dirs[0]).join("mine.txt").display().to_string(),
        svc.state_dir().join("tools").display().to_string(),
    ] {
        let (exit, out, _) = run(&mut c1, &["/usr/bin/cat", &path], json!({"workspace": "a"}));
        assert_ne!(exit, 0, "a tool in workspace a read {path}: {out}");
        assert!(!out.contains("bee") && !out.contains("one"), "{out}");
    }
    // The same read works in `b` (the refusal above is the workspace's doing).
    assert_eq!(
        run_ok(
            &mut c2,
            &["/usr/bin/cat", "/workspace/secret-b.txt"],
            json!({"workspace": "b"})
        ),
        "bee\n"
    );
    // A read-only grant: readable, not writable.
    assert_eq!(
        run_ok(
            &mut c1,
            &["/usr/bin/cat", "/workspace/ro.txt"],
            json!({"workspace": "r"})
        ),
        "read me\n"
    );
    let (exit, _, _) = run(
        &mut c1,
        &sh("echo x > /workspace/new.txt", &shell),
        json!({"workspace": "r"}),
    );
    assert_ne!(exit, 0);
    assert!(!r.join("new.txt").exists());

    // cwd: within the workspace it works; outside it is refused with a clear error.
    assert_eq!(
        run_ok(
            &mut c1,
            &["/usr/bin/pwd"],
            json!({"workspace": "a", "cwd": "sub"})
        ),
        "/workspace/sub\n"
    );
    assert_eq!(
        run_ok(&mut c1, &["/usr/bin/pwd"], json!({"cwd": "."})),
        "/workspace\n"
    );
    for (cwd, kind) in [
        ("../b", "invalid_params"),
        ("sub/../..", "invalid_params"),
        ("/etc", "invalid_params"),
        ("a\u{0}b", "invalid_params"),
        ("missing", "unavailable"),
    ] {
        let r = call(
            &mut c1,
            &["/usr/bin/pwd"],
            json!({"workspace": "a", "cwd": cwd}),
        );
        let e = r.expect_err();
        assert_eq!(e.kind(), Some(kind), "cwd {cwd:?}: {e}");
    }
    // A symlink out of the workspace is no way out either.
    std::os::unix::fs::symlink(&b, a.join("to-b")).unwrap_or_else(|e| panic!("{e}"));
    let r = call(
        &mut c1,
        &["/usr/bin/pwd"],
        json!({"workspace": "a", "cwd": "to-b"}),
    );
    assert_eq!(r.expect_err().kind(), Some("unavailable"));
    // Unknown workspaces (and bad names) are refused.
    let r = call(&mut c1, &["/usr/bin/true"], json!({"workspace": "nope"}));
    assert_eq!(r.expect_err().kind(), Some("denied"));
    let r = call(&mut c1, &["/usr/bin/true"], json!({"workspace": "../a"}));
    assert_eq!(r.expect_err().kind(), Some("denied"));
}

/// The default policy with `open` rules in the gateway profile's broker section.
fn policy_with_open(rules: &str) -> String {
    let base = policy("");
    let header = "[profiles.gateway.broker]\n";
    assert!(base.contains(header), "the default policy changed shape");
    base.replacen(header, &format!("{header}open = [\n{rules}]\n"), 1)
}

fn pending_open(svc: &Service) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = svc.ctl(&["approvals", "list", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let list = v["pending"].as_array().cloned().unwrap_or_default();
        if let Some(id) = list
            .iter()
            .find(|p| p["argv"][0] == "open")
            .and_then(|p| p["id"].as_u64())
        {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pending open approval: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn file_tools_reach_granted_workspaces_through_broker_open() {
    if !privileged() {
        return;
    }
    let projects = project_root();
    let root = fs::canonicalize(projects.path()).unwrap_or_else(|e| panic!("{e}"));
    let (a, b, c) = (root.join("a"), root.join("b"), root.join("c"));
    for d in [&a, &b, &c, &a.join("src")] {
        fs::create_dir(d).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::write(a.join("notes.txt"), "hello notes\nneedle one\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(a.join("src/lib.rs"), "fn needle() {}\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(b.join("secret-b.txt"), "bee\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(c.join("asked.txt"), "asked for\n").unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(b.join("secret-b.txt"), a.join("escape"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&b, a.join("dir-escape")).unwrap_or_else(|e| panic!("{e}"));
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy_with_open(&format!(
            "  {{ path = \"{}\", access = \"create\", why = \"test: project a\" }},\n  {{ path = \"{}\", access = \"read\", approval = \"ask\", why = \"test: project c, each read approved\" }},\n",
            a.display(),
            c.display()
        ))),
        extra_config: format!(
            "\n[workspaces.a]\npath = \"{}\"\n\n[workspaces.b]\npath = \"{}\"\n\n[workspaces.c]\npath = \"{}\"\n",
            a.display(),
            b.display(),
            c.display()
        ),
        ..StartOpts::default()
    });
    let client = svc.token_named("client", "files");
    let op = svc.token("operator");
    let mut cl = ws(&svc, &client);

    // List, read, write, search in `a`.
    let r = cl.call("files.list", json!({"workspace": "a"}));
    let names: Vec<(String, String)> = r.expect_ok()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                e["kind"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("dir-escape", "symlink"),
        ("escape", "symlink"),
        ("notes.txt", "file"),
        ("src", "dir"),
    ]
    .iter()
    .map(|(n, k)| (n.to_string(), k.to_string()))
    .collect();
    assert_eq!(names, want);
    let r = cl.call("files.read", json!({"workspace": "a", "path": "notes.txt"}));
    assert_eq!(r.expect_ok()["content"], "hello notes\nneedle one\n");
    let r = cl.call(
        "files.write",
        json!({"workspace": "a", "path": "src/new.txt", "content": "written\n"}),
    );
    assert_eq!(r.expect_ok()["created"], true, "{:?}", r.response);
    assert_eq!(
        fs::read_to_string(a.join("src/new.txt")).unwrap_or_default(),
        "written\n"
    );
    let r = cl.call(
        "files.write",
        json!({"workspace": "a", "path": "src/new.txt", "content": "v2"}),
    );
    assert_eq!(r.expect_ok()["created"], false);
    assert_eq!(
        fs::read_to_string(a.join("src/new.txt")).unwrap_or_default(),
        "v2"
    );
    let r = cl.call(
        "files.search",
        json!({"workspace": "a", "pattern": "needle"}),
    );
    let m = r.expect_ok()["matches"].clone();
    assert_eq!(
        m,
        json!([
            {"path": "notes.txt", "line": 2, "text": "needle one"},
            {"path": "src/lib.rs", "line": 1, "text": "fn needle() {}"}
        ]),
        "{:?}",
        r.response
    );
    let r = cl.call(
        "files.search",
        json!({"workspace": "a", "pattern": "^fn ", "regex": true}),
    );
    assert_eq!(r.expect_ok()["matches"].as_array().map(Vec::len), Some(1));

    // Refused: outside `a` by path, through symlinks, in `b` (granted, but no open rule), an
    // unknown workspace, a write beneath a read-only rule.
    for (ws_name, path, kind) in [
        ("a", "../b/secret-b.txt", "invalid_params"),
        ("a", "/etc/passwd", "invalid_params"),
        ("a", "escape", "denied"),
        ("a", "dir-escape/secret-b.txt", "denied"),
        ("b", "secret-b.txt", "denied"),
        ("nope", "x", "denied"),
    ] {
        let r = cl.call("files.read", json!({"workspace": ws_name, "path": path}));
        let e = r.expect_err();
        assert_eq!(e.kind(), Some(kind), "{ws_name}:{path}: {e}");
        assert!(!format!("{:?}", r.response).contains("bee"));
    }
    let r = cl.call("files.list", json!({"workspace": "b"}));
    assert_eq!(r.expect_err().kind(), Some("denied"));
    let r = cl.call(
        "files.write",
        json!({"workspace": "c", "path": "asked.txt", "content": "overwritten"}),
    );
    assert_eq!(r.expect_err().kind(), Some("denied"));
    assert_eq!(
        fs::read_to_string(c.join("asked.txt")).unwrap_or_default(),
        "asked for\n"
    );

    // An `ask` open rule: the read waits for an operator; allowed, it completes...
    let mut o = ws(&svc, &op);
    let id = cl.start_call("files.read", json!({"workspace": "c", "path": "asked.txt"}));
    let ev = o
        .next_event("approval.requested", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no approval.requested event\n{}", svc.log_text()));
    let want_argv = json!(["open", "read", c.join("asked.txt").display().to_string()]);
    assert_eq!(ev["params"]["argv"], want_argv, "{ev}");
    let aid = pending_open(&svc);
    let allowed = svc.ctl(&["approvals", "allow", &aid.to_string()]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let r = cl.finish_call(id, Duration::from_secs(30));
    assert_eq!(r.expect_ok()["content"], "asked for\n", "{:?}", r.response);
    // ... denied, it fails.
    let id = cl.start_call("files.read", json!({"workspace": "c", "path": "asked.txt"}));
    let ev = o
        .next_event("approval.requested", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no approval.requested event"));
    let r = o.call(
        "approvals.resolve",
        json!({"id": ev["params"]["id"].clone(), "resolution": "deny"}),
    );
    assert_eq!(r.expect_ok()["decision"], "denied", "{:?}", r.response);
    let r = cl.finish_call(id, Duration::from_secs(30));
    assert_eq!(r.expect_err().kind(), Some("denied"));
}

#[test]
fn the_agent_uses_file_tools_and_runs_tools_in_its_callers_workspace() {
    use carapace_tests::fake_llm::{FakeLlm, Scripted};
    if !privileged() {
        return;
    }
    let shell = shell().display().to_string();
    let llm = FakeLlm::start(vec![
        Scripted::tool_call("fs_read", json!({"workspace": "a", "path": "notes.txt"})),
        Scripted::tool_call(
            "fs_write",
            json!({"workspace": "a", "path": "agent.txt", "content": "from the agent\n"}),
        ),
        Scripted::tool_call("fs_read", json!({"workspace": "b", "path": "secret-b.txt"})),
        Scripted::tool_call(
            "exec",
            json!({"argv": [shell.clone(), "-c", "echo agent > /workspace/own.txt"]}),
        ),
        Scripted::text("done"),
    ]);
    let port = llm.addr().port();
    let projects = project_root();
    let root = fs::canonicalize(projects.path()).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (root.join("a"), root.join("b"));
    for d in [&a, &b] {
        fs::create_dir(d).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::write(a.join("notes.txt"), "hello notes\n").unwrap_or_else(|e| panic!("{e}"));
    fs::write(b.join("secret-b.txt"), "bee\n").unwrap_or_else(|e| panic!("{e}"));
    let key = root.join("llm.key");
    fs::write(&key, "sk-test-0123456789abcdef\n").unwrap_or_else(|e| panic!("{e}"));
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    let policy = format!(
        "{}\n[secrets.llm_key]\nwhy = \"test: the fake model's key\"\nfile = \"{}\"\n",
        policy_with_open(&format!(
            "  {{ path = \"{}\", access = \"create\", why = \"test: project a\" }},\n]\nconnect = [{{ host = \"127.0.0.1\", port = {port}, allow_private = true, why = \"test: the fake model\" }}]\nsecrets = [\"llm_key\"\n",
            a.display()
        )),
        key.display()
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        extra_config: format!(
            "\n[gateway.agent]\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"fake-model\"\napi_key_secret = \"llm_key\"\n\n[workspaces.a]\npath = \"{}\"\n\n[workspaces.b]\npath = \"{}\"\n",
            a.display(),
            b.display()
        ),
        ..StartOpts::default()
    });
    let token = svc.token_named("client", "agent-user");
    let mut c = ws(&svc, &token);
    let r = c.call(
        "agent.run",
        json!({"session": "files-1", "message": "tidy up the notes"}),
    );
    let res = r.expect_ok().clone();
    assert_eq!(res["reply"], "done", "{res}");
    let reqs = llm.requests();
    let last = reqs
        .last()
        .map(|q| q.body["messages"].clone())
        .unwrap_or_default();
    let tool_msgs: Vec<String> = last
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["role"] == "tool")
                .filter_map(|m| m["content"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(tool_msgs.len(), 4, "{last}");
    assert!(
        tool_msgs[0].starts_with("<untrusted source=\"tool:fs_read\">")
            && tool_msgs[0].contains("hello notes"),
        "{}",
        tool_msgs[0]
    );
    assert!(
        tool_msgs[1].contains("\"created\":true"),
        "{}",
        tool_msgs[1]
    );
    assert!(
        tool_msgs[2].contains("denied") && !tool_msgs[2].contains("bee"),
        "{}",
        tool_msgs[2]
    );
    assert_eq!(
        fs::read_to_string(a.join("agent.txt")).unwrap_or_default(),
        "from the agent\n"
    );
    // The agent's tool ran in its caller's own workspace: the same client sees the file, a
    // different client does not.
    assert_eq!(
        run_ok(&mut c, &["/usr/bin/cat", "/workspace/own.txt"], json!({})),
        "agent\n"
    );
    let other = svc.token_named("client", "someone-else");
    let mut o = ws(&svc, &other);
    let (exit, _, _) = run(&mut o, &sh("cat /workspace/own.txt", &shell), json!({}));
    assert_ne!(exit, 0);
}

#[test]
fn a_workspace_granted_by_a_reload_is_reachable_and_a_withdrawn_one_is_not() {
    if !privileged() {
        return;
    }
    let projects = project_root();
    let (a, b) = (projects.path().join("a"), projects.path().join("b"));
    for d in [&a, &b] {
        fs::create_dir(d).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::write(b.join("in-b.txt"), "bee\n").unwrap_or_else(|e| panic!("{e}"));
    let grant =
        |name: &str, path: &Path| format!("\n[workspaces.{name}]\npath = \"{}\"\n", path.display());
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy("")),
        extra_config: grant("a", &a),
        ..StartOpts::default()
    });
    let t = svc.token_named("client", "one");
    let mut c = ws(&svc, &t);
    let cat_b = ["/usr/bin/cat", "/workspace/in-b.txt"];
    let refused = |c: &mut RpcClient, name: &str| {
        let r = call(c, &cat_b, json!({ "workspace": name }));
        let e = r.expect_err();
        assert!(e.message.contains(name), "{name}: {e:?}");
    };
    refused(&mut c, "b");

    // The operator grants `b` and withdraws `a`, then reloads: no restart.
    let cfg = fs::read_to_string(svc.config_path()).unwrap_or_else(|e| panic!("{e}"));
    let cfg = cfg.replace(&grant("a", &a), &grant("b", &b));
    fs::write(svc.config_path(), cfg).unwrap_or_else(|e| panic!("{e}"));
    let o = svc.ctl(&["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run_ok(&mut c, &cat_b, json!({ "workspace": "b" })), "bee\n");
    refused(&mut c, "a");
}
