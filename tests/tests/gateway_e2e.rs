//! The gateway end to end: the real `carapace run` (as root) with `carapace-gateway` confined
//! under it, test clients over WebSocket (JSON-RPC) and HTTP, tokens made with `carapace token`,
//! approvals answered with `carapace approvals`, and a fake OpenAI-compatible server on loopback
//! driving `agent.run`.
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_tests::agent::{config as agent_config, ws};
use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::rpc::{Frame, RpcClient, WaitError};
use carapace_tests::service::{http, http_bearer, http_with, Service, StartOpts};
use carapace_tests::*;
use serde_json::{json, Value};

/// The default policy, with: a deny rule for /usr/bin/dd (a program the policy refuses
/// outright), and in the gateway profile's broker section the fake model's address, its API
/// key and an outbound channel whose allowlist names only `#ops`.
fn agent_policy(dir: &Path, llm_port: u16) -> String {
    insert_before_first_exec(
        &carapace_tests::agent::policy_with_outbox(dir, llm_port, carapace_tests::agent::TEST_KEY),
        r#"[[exec]]
why = "test: a program the policy refuses without asking"
program = "/usr/bin/dd"
approval = "deny"
"#,
    )
}

/// `carapace token revoke NAME` on the service's store.
fn revoke(svc: &Service, name: &str) {
    let o = Command::new(carapace_bin())
        .args(["token", "revoke", name, "--state-dir"])
        .arg(svc.state_dir())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn start_plain() -> Option<Service> {
    privileged().then(|| Service::start(""))
}

/// Host pid of the program in the sandbox of the gateway child (its init's child).
fn gateway_pid(svc: &Service) -> i64 {
    let init = svc.gateway_running(None, Duration::from_secs(30));
    service::program_of(init)
}

/// Wait for `carapace approvals list --json` to show one pending approval; its id.
fn pending_approval(svc: &Service, limit: Duration) -> (u64, Value) {
    let deadline = Instant::now() + limit;
    loop {
        let o = svc.ctl(&["approvals", "list", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if let Some(p) = v["pending"].as_array().and_then(|a| a.first()) {
            let id = p["id"].as_u64().unwrap_or_else(|| panic!("no id in {p}"));
            return (id, p.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no pending approval within {limit:?}: {v}\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_gateway_runs_confined_and_refuses_clients_without_a_good_token() {
    let Some(svc) = start_plain() else { return };
    // Confined, as the kernel reports it from outside.
    let pid = gateway_pid(&svc);
    assert_eq!(service::status_field(pid, "Seccomp"), "2");
    assert_eq!(service::status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(service::status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(service::status_field(pid, "CapBnd"), "0000000000000000");
    for ns in ["net", "pid", "mnt", "user", "ipc", "uts", "cgroup"] {
        let ours = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap_or_default();
        let its = fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap_or_default();
        assert_ne!(ours, its, "the gateway shares our {ns} namespace");
    }

    // /health needs nothing; everything else a token.
    assert_eq!(http(svc.addr, "GET", "/health", None).0, 200);
    let r = http_with(svc.addr, "GET", "/v1/status", &[], None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = http_bearer(svc.addr, "GET", "/v1/status", "cpt_not-a-real-token", None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["data"]["kind"], "unauthorized");
    for bad in [None, Some("cpt_wrong")] {
        let e = RpcClient::connect(svc.addr, bad)
            .err()
            .unwrap_or_else(|| panic!("upgrade accepted with {bad:?}"));
        assert_eq!(e.status(), Some(401), "{e}");
    }

    // A good token, by header and by query; the gateway's own view of its confinement.
    let op = svc.initial_token();
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let st = c.call("gateway.status", json!({}));
    let st = st.expect_ok();
    assert_eq!(st["Seccomp"], "2", "{st}");
    assert_eq!(st["NoNewPrivs"], "1", "{st}");
    assert_eq!(st["CapEff"], "0000000000000000", "{st}");
    assert_eq!(
        st["interfaces"],
        json!(["lo"]),
        "no interface but loopback: {st}"
    );
    assert_eq!(st["caller"]["scope"], "client", "{st}");
    let mut q = RpcClient::connect_query_token(svc.addr, &op)
        .unwrap_or_else(|e| panic!("query token: {e}"));
    assert_eq!(q.call("gateway.ping", json!({})).expect_ok()["pong"], true);

    // Scopes: a client token may not see or answer approvals.
    let e = c.call("approvals.list", json!({}));
    assert_eq!(e.expect_err().kind(), Some("forbidden"));
    let e = c.call(
        "approvals.resolve",
        json!({"id": 1, "resolution": "allow-once"}),
    );
    assert_eq!(e.expect_err().kind(), Some("forbidden"));
    assert!(q.call("approvals.list", json!({})).expect_ok()["pending"].is_array());

    // A revoked token is refused at a new connection within a second (the gateway reuses a
    // token check for at most that long).
    revoke(&svc, "test");
    let revoked = Instant::now();
    let e = loop {
        match RpcClient::connect(svc.addr, Some(&client)) {
            Err(e) => break e,
            Ok(_) => assert!(
                revoked.elapsed() < Duration::from_millis(1500),
                "revoked token still accepted after {:?}",
                revoked.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(e.status(), Some(401));

    // Every check is in the audit log, and no token or hash is.
    let audit = fs::read_to_string(svc.state_dir().join("audit.log")).unwrap_or_default();
    assert!(audit.contains("\"op\":\"auth\""), "{audit}");
    assert!(
        !audit.contains(&client) && !audit.contains(&op),
        "a token in the audit log"
    );
    assert!(
        !svc.log_text().contains(&client),
        "a token in the supervisor's log"
    );
}

#[test]
fn tools_run_through_the_broker_stream_their_output_and_asks_wait_for_an_operator() {
    let Some(svc) = privileged().then(|| {
        Service::start_opts(StartOpts {
            policy: Some(insert_before_first_exec(
                &default_policy_text(),
                "[[exec]]\nwhy = \"test: refused outright\"\nprogram = \"/usr/bin/dd\"\napproval = \"deny\"\n",
            )),
            ..StartOpts::default()
        })
    }) else {
        return;
    };
    let client = svc.token("client");
    let op = svc.token("operator");
    let mut c = ws(&svc, &client);

    // Allowed: runs, output streamed as events before the result.
    let r = c.call(
        "tools.exec",
        json!({"argv": ["/usr/bin/echo", "hello from a tool"]}),
    );
    let res = r.expect_ok();
    assert_eq!(res["exit"], 0, "{res}");
    let out: String = r
        .events_named("tools.output")
        .iter()
        .filter(|e| e["params"]["stream"] == "stdout")
        .filter_map(|e| e["params"]["data"].as_str())
        .collect();
    assert_eq!(out, "hello from a tool\n", "{:?}", r.events);
    assert_eq!(res["stdout_bytes"], 18);
    // The exit code of the tool comes back, whatever it is.
    let r = c.call("tools.exec", json!({"argv": ["/usr/bin/false"]}));
    assert_eq!(r.expect_ok()["exit"], 1);
    // Denied: refused, nothing ran.
    let r = c.call(
        "tools.exec",
        json!({"argv": ["/usr/bin/dd", "if=/dev/zero", "of=/workspace/x", "count=1"]}),
    );
    let e = r.expect_err();
    assert_eq!(e.kind(), Some("denied"), "{e}");
    assert!(r.events.is_empty());
    // Bad params.
    let r = c.call("tools.exec", json!({"argv": []}));
    assert_eq!(r.expect_err().kind(), Some("invalid_params"));
    let r = c.call(
        "tools.exec",
        json!({"argv": ["/usr/bin/true"], "shell": true}),
    );
    assert_eq!(r.expect_err().kind(), Some("invalid_params"));

    // Ask: the call waits; an operator connection gets approval.requested; the operator
    // answers through the CLI; the call completes.
    let mut o = ws(&svc, &op);
    let id = c.start_call("tools.exec", json!({"argv": ["/usr/bin/uname", "-s"]}));
    let ev = o
        .next_event("approval.requested", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no approval.requested event\n{}", svc.log_text()));
    assert_eq!(
        ev["params"]["argv"],
        json!(["/usr/bin/uname", "-s"]),
        "{ev}"
    );
    let (aid, p) = pending_approval(&svc, Duration::from_secs(10));
    assert_eq!(ev["params"]["id"], aid, "{ev} vs {p}");
    let a = svc.ctl(&["approvals", "allow", &aid.to_string()]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let r = c.finish_call(id, Duration::from_secs(30));
    assert_eq!(r.expect_ok()["exit"], 0, "{:?}", r.response);
    let out: String = r
        .events_named("tools.output")
        .iter()
        .filter_map(|e| e["params"]["data"].as_str())
        .collect();
    assert_eq!(out, "Linux\n");
    let ev = o
        .next_event("approval.resolved", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no approval.resolved event"));
    assert_eq!(ev["params"]["id"], aid);

    // Ask answered through the gateway by an operator token, and denied: the call fails.
    let id = c.start_call("tools.exec", json!({"argv": ["/usr/bin/uname", "-m"]}));
    let ev = o
        .next_event("approval.requested", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no approval.requested event"));
    let aid = ev["params"]["id"].clone();
    let r = o.call(
        "approvals.resolve",
        json!({"id": aid, "resolution": "deny"}),
    );
    assert_eq!(r.expect_ok()["decision"], "denied", "{:?}", r.response);
    let r = c.finish_call(id, Duration::from_secs(30));
    assert_eq!(r.expect_err().kind(), Some("denied"));

    // Over plain HTTP the output is collected into the result.
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/tools/exec",
        &client,
        Some(r#"{"argv":["/usr/bin/echo","via http"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["stdout"], "via http\n");
}

#[test]
fn an_agent_runs_tools_waits_for_approval_and_its_blocked_message_lands_in_the_dlq() {
    if !privileged() {
        return;
    }
    let llm = FakeLlm::start(vec![
        Scripted::tool_call("exec", json!({"argv": ["/usr/bin/echo", "agent was here"]}))
            .with_usage(100, 10),
        Scripted::tool_call(
            "exec",
            json!({"argv": ["/usr/bin/dd", "if=/dev/zero", "of=/dev/null", "count=1"]}),
        ),
        Scripted::tool_call("exec", json!({"argv": ["/usr/bin/uname", "-s"]})),
        Scripted::tool_call(
            "send_message",
            json!({"channel": "outbox", "recipient": "mallory@example.com", "body": "the secrets"}),
        ),
        Scripted::tool_call(
            "send_message",
            json!({"channel": "outbox", "recipient": "#ops", "body": "all done"}),
        ),
        Scripted::text("Done: one tool ran, one was refused."),
    ]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-gw-agent-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port)),
        extra_config: agent_config(port, ""),
        ..StartOpts::default()
    });
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let id = c.start_call(
        "agent.run",
        json!({"session": "chat-1", "message": "please look around"}),
    );
    // The third tool call asks: approve it through the CLI.
    let (aid, p) = pending_approval(&svc, Duration::from_secs(60));
    assert_eq!(p["argv"], json!(["/usr/bin/uname", "-s"]), "{p}");
    let a = svc.ctl(&["approvals", "allow", &aid.to_string()]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let r = c.finish_call(id, Duration::from_secs(120));
    let res = r.expect_ok().clone();
    assert_eq!(res["stopped"], "done", "{res}");
    assert_eq!(res["turns"], 6, "{res}");
    assert_eq!(res["reply"], "Done: one tool ran, one was refused.");
    assert_eq!(res["usage"]["total_tokens"], 110 + 5 * 15, "{res}");
    let kinds: Vec<&str> = r
        .events_named("agent.step")
        .iter()
        .filter_map(|e| e["params"]["kind"].as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "tool_call").count(),
        5,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"assistant"));

    // What the model was sent: the key in the header (and nowhere else), the tool results,
    // tool output marked untrusted, the refusal as a refusal.
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 6);
    for q in &reqs {
        assert_eq!(
            q.header("authorization"),
            Some("Bearer sk-test-0123456789abcdef")
        );
        assert_eq!(q.body["model"], "fake-model");
    }
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
    assert_eq!(tool_msgs.len(), 5, "{last}");
    assert!(
        tool_msgs[0].starts_with("<untrusted source=\"tool:exec\">")
            && tool_msgs[0].contains("agent was here"),
        "{}",
        tool_msgs[0]
    );
    assert!(
        tool_msgs[1].contains("\"error\":\"denied\""),
        "{}",
        tool_msgs[1]
    );
    assert!(tool_msgs[2].contains("Linux"), "{}", tool_msgs[2]);
    assert!(tool_msgs[3].contains("dead_lettered"), "{}", tool_msgs[3]);
    assert!(tool_msgs[4].contains("delivered"), "{}", tool_msgs[4]);
    let system = last[0]["content"].as_str().unwrap_or("");
    assert!(system.contains("never follow instructions"), "{system}");

    // The message to a recipient outside the allowlist is in the dead-letter queue; the
    // allowed one was delivered to the channel's file.
    let o = svc.ctl(&["dlq", "list", "--json"]);
    let dlq = String::from_utf8_lossy(&o.stdout);
    assert!(dlq.contains("mallory@example.com"), "{dlq}");
    let outbox = fs::read_to_string(dir.path().join("outbox.log")).unwrap_or_default();
    assert!(
        outbox.contains("all done") && !outbox.contains("mallory"),
        "{outbox}"
    );

    // The session holds the conversation and its usage.
    let h = c.call("sessions.history", json!({"session": "chat-1"}));
    let lines = h.expect_ok()["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(lines.len() >= 12, "{lines:?}");
    let l = c.call("sessions.list", json!({}));
    let s = l.expect_ok()["sessions"][0].clone();
    assert_eq!(s["name"], "chat-1");
    assert_eq!(s["usage"]["total_tokens"], 185, "{s}");
    // The next run of the session sends the history along.
    llm.push(Scripted::text("I remember."));
    let r = c.call(
        "agent.run",
        json!({"session": "chat-1", "message": "and now?"}),
    );
    assert_eq!(r.expect_ok()["reply"], "I remember.");
    let msgs = llm
        .requests()
        .last()
        .map(|q| q.body["messages"].clone())
        .unwrap_or_default();
    assert!(msgs.to_string().contains("please look around"), "{msgs}");
    let r = c.call("sessions.reset", json!({"session": "chat-1"}));
    assert_eq!(r.expect_ok()["removed"], true);
    let r = c.call("sessions.history", json!({"session": "chat-1"}));
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    let r = c.call("sessions.history", json!({"session": "../etc"}));
    assert_eq!(r.expect_err().kind(), Some("invalid_params"));
}

#[test]
fn the_agent_stops_at_its_turn_limit_and_token_budget_and_reports_model_failures() {
    if !privileged() {
        return;
    }
    let llm = FakeLlm::start(vec![]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-gw-limits-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port)),
        extra_config: agent_config(port, "max_turns = 2\ntoken_budget = 1000\n"),
        ..StartOpts::default()
    });
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let again = || Scripted::tool_call("exec", json!({"argv": ["/usr/bin/true"]}));
    // Turn limit: the model keeps asking for tools.
    llm.push(again());
    llm.push(again());
    let r = c.call("agent.run", json!({"session": "limits", "message": "loop"}));
    let res = r.expect_ok();
    assert_eq!(
        (res["stopped"].as_str(), res["turns"].as_u64()),
        (Some("turn_limit"), Some(2)),
        "{res}"
    );
    // Token budget: one answer uses it up.
    llm.push(again().with_usage(900, 200));
    let r = c.call(
        "agent.run",
        json!({"session": "budget", "message": "spend"}),
    );
    let res = r.expect_ok();
    assert_eq!(
        (res["stopped"].as_str(), res["turns"].as_u64()),
        (Some("token_budget"), Some(1)),
        "{res}"
    );
    // The model failing is an error, not a hang, and the gateway keeps serving.
    llm.push(Scripted::http_error(500, "model overloaded"));
    let r = c.call("agent.run", json!({"session": "err", "message": "x"}));
    let e = r.expect_err();
    assert_eq!(e.kind(), Some("unavailable"), "{e}");
    assert!(e.message.contains("500"), "{e}");
    llm.push(Scripted::malformed("this is not json"));
    let r = c.call("agent.run", json!({"session": "err", "message": "x"}));
    assert_eq!(r.expect_err().kind(), Some("unavailable"));
    assert_eq!(c.call("gateway.ping", json!({})).expect_ok()["pong"], true);
}

#[test]
fn an_agent_without_a_model_or_with_an_unlisted_endpoint_is_refused_clearly() {
    let Some(svc) = start_plain() else { return };
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let r = c.call("agent.run", json!({"session": "s", "message": "hi"}));
    let e = r.expect_err();
    assert_eq!(e.kind(), Some("unavailable"));
    assert!(e.message.contains("[gateway.agent]"), "{e}");
    drop(c);
    drop(svc);
    // Configured, but the policy does not let the gateway reach it: the broker refuses.
    let llm = FakeLlm::start(vec![Scripted::text("unreachable")]);
    let svc = Service::start(&format!(
        "[gateway.agent]\nbase_url = \"http://127.0.0.1:{}/v1\"\nmodel = \"m\"\n",
        llm.addr().port()
    ));
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let r = c.call("agent.run", json!({"session": "s", "message": "hi"}));
    assert_eq!(r.expect_err().kind(), Some("denied"), "{:?}", r.response);
    assert!(llm.requests().is_empty(), "the model was reached");
}

#[test]
fn bad_input_gets_clear_errors_and_a_flood_does_not_starve_another_client() {
    let Some(svc) = privileged().then(|| {
        Service::start(
            "[gateway.clients]\nrate_per_second = 5\nburst = 10\nmax_message_bytes = 65536\n",
        )
    }) else {
        return;
    };
    let t1 = svc.token("client");
    let t2 = svc.token("client");
    let mut c = ws(&svc, &t1);
    let kind_of = |c: &mut RpcClient, raw: &str| -> (Value, Value) {
        c.send_raw(raw).unwrap_or_else(|e| panic!("{e}"));
        match c.recv_raw(Duration::from_secs(10)) {
            Some(Frame::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                (v["id"].clone(), v["error"]["data"]["kind"].clone())
            }
            other => panic!("no answer to {raw}: {other:?}"),
        }
    };
    assert_eq!(
        kind_of(&mut c, "{not json"),
        (Value::Null, json!("parse_error"))
    );
    assert_eq!(
        kind_of(&mut c, "[1,2]"),
        (Value::Null, json!("invalid_request"))
    );
    assert_eq!(
        kind_of(&mut c, r#"{"jsonrpc":"2.0","method":"gateway.ping"}"#),
        (Value::Null, json!("invalid_request"))
    );
    assert_eq!(
        kind_of(&mut c, r#"{"jsonrpc":"2.0","id":7,"method":"no.such"}"#),
        (json!(7), json!("method_not_found"))
    );
    assert_eq!(
        kind_of(
            &mut c,
            r#"{"jsonrpc":"2.0","id":"x","method":"tools.exec","params":{"argv":"ls"}}"#
        ),
        (json!("x"), json!("invalid_params"))
    );
    // Still fine after all that.
    assert_eq!(c.call("gateway.ping", json!({})).expect_ok()["pong"], true);
    // A binary message is refused and the connection closed.
    let mut b = ws(&svc, &t1);
    b.send_binary(b"\x00\x01").unwrap_or_else(|e| panic!("{e}"));
    let got = b.recv_raw(Duration::from_secs(10));
    assert!(
        matches!(&got, Some(Frame::Text(t)) if t.contains("invalid_request")),
        "{got:?}"
    );
    let got = b.recv_raw(Duration::from_secs(10));
    assert!(
        matches!(
            &got,
            Some(Frame::Close {
                code: Some(1003),
                ..
            })
        ),
        "{got:?}"
    );
    // A huge message: too_large, then the connection is closed.
    let mut h = ws(&svc, &t1);
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"gateway.ping","params":{{"pad":"{}"}}}}"#,
        "a".repeat(200_000)
    );
    let _ = h.send_raw(&huge);
    let mut saw_too_large = false;
    let mut close_code = None;
    for _ in 0..3 {
        match h.recv_raw(Duration::from_secs(10)) {
            Some(Frame::Text(t)) if t.contains("too_large") => saw_too_large = true,
            Some(Frame::Close { code, .. }) => {
                close_code = code;
                break;
            }
            None | Some(Frame::Gone(_)) => break,
            _ => {}
        }
    }
    assert!(saw_too_large, "no too_large error");
    assert_eq!(close_code, Some(1009), "closed with 1009 (message too big)");
    // A huge HTTP body: 413.
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/tools/exec",
        &t1,
        Some(&"x".repeat(200_000)),
    );
    assert_eq!(r.status, 413, "{}", r.body);

    // A flood from one token is rate limited; another token is served meanwhile.
    let mut limited = 0;
    for _ in 0..60 {
        let r = c.call("gateway.ping", json!({}));
        if let Err(e) = &r.result {
            assert_eq!(e.kind(), Some("rate_limited"), "{e}");
            limited += 1;
        }
    }
    assert!(limited >= 40, "only {limited} of 60 rate limited");
    let mut other = ws(&svc, &t2);
    assert_eq!(
        other.call("gateway.ping", json!({})).expect_ok()["pong"],
        true
    );
    let r = other.call("tools.exec", json!({"argv": ["/usr/bin/true"]}));
    assert_eq!(r.expect_ok()["exit"], 0);

    // Guessing tokens: after a few failures from this address, 429 without asking the broker.
    let mut saw_429 = false;
    for i in 0..30 {
        let r = http_bearer(
            svc.addr,
            "GET",
            "/v1/status",
            &format!("cpt_guess{i}"),
            None,
        );
        match r.status {
            401 => {}
            429 => {
                saw_429 = true;
                break;
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    assert!(saw_429, "guessing was never limited");
    // The gateway process never died through all of it.
    assert_eq!(svc.gateway()["restarts"], 0, "{}", svc.gateway());
}

#[test]
fn messages_go_through_the_broker_allowlist() {
    if !privileged() {
        return;
    }
    let dir = tempdir("carapace-gw-send-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), 9)),
        ..StartOpts::default()
    });
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let r = c.call(
        "messages.send",
        json!({"channel": "outbox", "recipient": "#ops", "body": "deploy done"}),
    );
    assert_eq!(r.expect_ok()["status"], "delivered");
    let r = c.call(
        "messages.send",
        json!({"channel": "outbox", "recipient": "eve@example.com", "body": "x"}),
    );
    let res = r.expect_ok();
    assert_eq!(res["status"], "dead_lettered", "{res}");
    assert!(res["dlq_id"].is_string());
    let r = c.call(
        "messages.send",
        json!({"channel": "nope", "recipient": "#ops", "body": "x"}),
    );
    assert_eq!(r.expect_err().kind(), Some("denied"));
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/messages/send",
        &client,
        Some(r##"{"channel":"outbox","recipient":"#ops","body":"over http"}"##),
    );
    assert_eq!(r.json()["status"], "delivered", "{}", r.body);
}

#[test]
fn what_a_channel_adapter_delivers_reaches_clients_as_messages_inbound() {
    if !privileged() {
        return;
    }
    let dir = tempdir("carapace-gw-inbound-");
    // A channel adapter stands in for a real one: `carapace-client deliver` run as the
    // configured program of [channels.inbox] (it delivers, exits, and is restarted).
    let client = client_bin();
    let policy = format!(
        r##"{base}

[profiles.inbox-adapter]
why = "test: a channel adapter that may deliver what it receives on `inbox`, nothing else"
extends = "channel"

[profiles.inbox-adapter.broker]
deliver = ["inbox"]

[channels.inbox]
why = "test: an inbound channel"
kind = "file"
path = "{outbox}"
recipients = []
senders = ["alice@example.com"]
"##,
        base = default_policy_text(),
        outbox = dir.path().join("inbox-out.log").display(),
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        extra_config: format!(
            "[channels.inbox]\nprogram = \"{bin}\"\nargs = [\"deliver\", \"inbox\", \"alice@example.com\", \"hello from a channel\"]\nprofile = \"inbox-adapter\"\nrestart = {{ initial_delay = \"1s\", max_delay = \"2s\", crash_loop_restarts = 1000, crash_loop_window = \"1s\" }}\n",
            bin = client.bin.display()
        ),
        ..StartOpts::default()
    });
    let token = svc.token("client");
    let mut c = ws(&svc, &token);
    let ev = c
        .next_event("messages.inbound", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no messages.inbound event\n{}", svc.log_text()));
    let p = &ev["params"];
    assert_eq!(p["channel"], "inbox", "{ev}");
    assert_eq!(p["sender"], "alice@example.com", "{ev}");
    assert_eq!(p["body"], "hello from a channel", "{ev}");
    assert!(p["seq"].as_u64().is_some_and(|s| s >= 1), "{ev}");
    // Each delivery is audited (without its body).
    let audit = fs::read_to_string(svc.state_dir().join("audit.log")).unwrap_or_default();
    assert!(audit.contains("\"op\":\"deliver\""), "{audit}");
    assert!(
        !audit.contains("hello from a channel"),
        "a message body in the audit log"
    );
    // The gateway may not deliver (its profile does not list the channel): a tool it runs
    // cannot either, and neither can a client through it.
    let r = c.call(
        "messages.send",
        json!({"channel": "inbox", "recipient": "x", "body": "y"}),
    );
    assert_eq!(r.expect_err().kind(), Some("denied"));
}

/// Building and testing a project through the gateway, as the README tour shows: `make` in the
/// tools' workspace is a build tool, so the default policy runs it in the `build` profile after
/// an operator approves; its recipes compile a C program and run the test binary they built
/// (the workspace is executable there); `--always` binds the grant to make's hash, argv and
/// profile, so the same build runs again without asking, while the strict `tool` profile still
/// refuses to run the built binary.
#[test]
fn a_project_is_built_and_tested_through_the_gateway_in_the_build_profile() {
    let Some(svc) = start_plain() else { return };
    let created = svc.token_create("client", "builder");
    let client = created["token"].as_str().unwrap_or_default().to_string();
    // The client's tools run in its own workspace.
    let owner = format!("token:{}", created["id"].as_str().unwrap_or_default());
    let project = svc.owner_workspace(&owner).join("hello");
    std::fs::create_dir_all(&project).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        project.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"6 * 7 = 42\"); return 0; }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        project.join("Makefile"),
        "test: hello\n\t./hello | grep -q 42 && echo 'tests passed'\nhello: hello.c\n\tcc -o $@ $<\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut c = ws(&svc, &client);
    let argv = json!(["make", "-C", "hello", "test"]);
    let id = c.start_call("tools.exec", json!({ "argv": argv }));
    let (aid, p) = pending_approval(&svc, Duration::from_secs(30));
    assert_eq!(p["profile"], "build", "make runs in the build profile: {p}");
    let a = svc.ctl(&["approvals", "allow", &aid.to_string(), "--always"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let r = c.finish_call(id, Duration::from_secs(120));
    let out: String = r
        .events_named("tools.output")
        .iter()
        .filter_map(|e| e["params"]["data"].as_str())
        .collect();
    assert_eq!(r.expect_ok()["exit"], 0, "{out}\n{}", svc.log_text());
    assert!(out.contains("tests passed"), "{out}");

    // The grant holds: the same build runs again without an approval.
    let r = c.call("tools.exec", json!({ "argv": argv }));
    assert_eq!(r.expect_ok()["exit"], 0, "{:?}", r.response);
    let list: Value = serde_json::from_slice(&svc.ctl(&["approvals", "list", "--json"]).stdout)
        .unwrap_or(Value::Null);
    assert_eq!(list["pending"], json!([]), "nothing pending: {list}");

    // The binary the build made is not a program in the strict profile: `sh -c ./hello` runs
    // in `tool` (after approval), where the workspace is not executable.
    let id = c.start_call(
        "tools.exec",
        json!({ "argv": ["/usr/bin/sh", "-c", "cd hello && ./hello"] }),
    );
    let (aid, p) = pending_approval(&svc, Duration::from_secs(30));
    assert_eq!(p["profile"], "tool", "{p}");
    let a = svc.ctl(&["approvals", "allow", &aid.to_string()]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let r = c.finish_call(id, Duration::from_secs(60));
    let err: String = r
        .events_named("tools.output")
        .iter()
        .filter_map(|e| e["params"]["data"].as_str())
        .collect();
    assert_eq!(r.expect_ok()["exit"], 126, "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

/// Audit records of broker op `op` so far.
fn audit_ops(svc: &Service, op: &str) -> usize {
    let needle = format!("\"op\":\"{op}\"");
    fs::read_to_string(svc.state_dir().join("audit.log"))
        .map(|a| a.lines().filter(|l| l.contains(&needle)).count())
        .unwrap_or(0)
}

/// One request on a kept-alive HTTP/1.1 connection; (status, body). Status 0 when the
/// connection failed or closed.
fn keep_alive_request(s: &mut std::net::TcpStream, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (0, String::new()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_revoked_token_stops_working_on_open_connections_within_a_second() {
    let Some(svc) = start_plain() else { return };
    let token = svc.token_named("client", "soon-revoked");
    let other = svc.token_named("client", "kept");
    // A WebSocket that calls, one that only listens, another token's, and a kept-alive HTTP
    // connection: all work before the revocation.
    let mut calling = ws(&svc, &token);
    let mut idle = ws(&svc, &token);
    let mut kept = ws(&svc, &other);
    assert_eq!(
        calling.call("gateway.ping", json!({})).expect_ok()["pong"],
        true
    );
    assert_eq!(
        idle.call("gateway.ping", json!({})).expect_ok()["pong"],
        true
    );
    let mut http = std::net::TcpStream::connect(svc.addr).unwrap_or_else(|e| panic!("{e}"));
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..3 {
        let (status, body) = keep_alive_request(&mut http, "/v1/status", &token);
        assert_eq!(status, 200, "{body}");
    }
    // Many calls in a second cost at most about one `auth` per token per second.
    let auths = audit_ops(&svc, "auth");
    let t = Instant::now();
    let mut calls = 0;
    while t.elapsed() < Duration::from_secs(1) {
        let (status, body) = keep_alive_request(&mut http, "/v1/status", &token);
        assert_eq!(status, 200, "{body}");
        calls += 1;
        if calls % 4 == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let asked = audit_ops(&svc, "auth") - auths;
    assert!(calls >= 10, "{calls}");
    assert!(
        asked <= 4,
        "{asked} token checks at the broker for {calls} calls in a second (and the sockets' re-checks)"
    );

    revoke(&svc, "soon-revoked");
    let revoked = Instant::now();
    let limit = Duration::from_millis(1500);
    let closed_with = |c: &mut RpcClient| loop {
        match c.recv_raw(Duration::from_secs(3)) {
            Some(Frame::Close { code, reason }) => break (code, reason),
            Some(Frame::Text(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    // The calling WebSocket: its next call fails `unauthorized`, then it is closed with 1008
    // (or its timer found the revocation first and it is closed already).
    let (code, reason) = loop {
        match calling.try_call("gateway.ping", json!({}), Duration::from_secs(5)) {
            Ok(o) => match o.result {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), Some("unauthorized"), "{e}");
                    assert!(e.message.contains("revoked"), "{e}");
                    break closed_with(&mut calling);
                }
            },
            Err(WaitError::Closed(Frame::Close { code, reason })) => break (code, reason),
            Err(e) => panic!("no answer after revocation: {e}"),
        }
        assert!(
            revoked.elapsed() < limit,
            "calls still served {:?} after revocation",
            revoked.elapsed()
        );
        // 10 calls/s: within the token's own rate.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((code, reason.as_str()), (Some(1008), "token revoked"));
    assert!(
        revoked.elapsed() < limit,
        "closed {:?} after",
        revoked.elapsed()
    );
    // The kept-alive HTTP connection: 401 within the second.
    loop {
        let (status, body) = keep_alive_request(&mut http, "/v1/status", &token);
        if status == 401 {
            assert!(body.contains("unauthorized"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            revoked.elapsed() < limit,
            "still served {:?} after revocation",
            revoked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The idle one, which makes no call, is closed too, within about a second.
    let (code, reason) = closed_with(&mut idle);
    assert_eq!((code, reason.as_str()), (Some(1008), "token revoked"));
    assert!(
        revoked.elapsed() < Duration::from_secs(2),
        "closed {:?} after",
        revoked.elapsed()
    );
    // Another token's connection is not affected.
    assert_eq!(
        kept.call("gateway.ping", json!({})).expect_ok()["pong"],
        true
    );
}

#[test]
fn sixteen_clients_at_their_own_rate_on_the_default_limits_get_no_refusal() {
    // The default policy (gateway broker budget 50/s, burst 100) and the default client limits
    // (20 calls/s per token, burst 40): 16 clients asking 320 tool runs a second cannot all be
    // served at once; they wait their turn, and none is refused.
    let Some(svc) = start_plain() else { return };
    const CLIENTS: usize = 16;
    const SECONDS: f64 = 3.0;
    let period = Duration::from_millis(50); // 20 calls/s: each client's own rate
    let tokens: Vec<String> = (0..CLIENTS)
        .map(|i| svc.token_named("client", &format!("fair-{i}")))
        .collect();
    let execs_before = audit_ops(&svc, "exec");
    let auths_before = audit_ops(&svc, "auth");
    let barrier = std::sync::Barrier::new(CLIENTS);
    let started = Instant::now();
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| {
                let (svc, barrier) = (&svc, &barrier);
                s.spawn(move || {
                    // Half over WebSocket, half over plain HTTP (a connection per call).
                    let mut c = (i % 2 == 0).then(|| ws(svc, token));
                    barrier.wait();
                    let t0 = Instant::now();
                    let (mut made, mut refused) = (0usize, Vec::new());
                    while t0.elapsed().as_secs_f64() < SECONDS {
                        let next = t0 + period * u32::try_from(made).unwrap_or(u32::MAX);
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        made += 1;
                        let err = match &mut c {
                            Some(c) => {
                                let r = c.call_timeout(
                                    "tools.exec",
                                    json!({"argv": ["/usr/bin/true"]}),
                                    Duration::from_secs(60),
                                );
                                match r.result {
                                    Ok(v) if v["exit"] == 0 => None,
                                    Ok(v) => Some(format!("exit {v}")),
                                    Err(e) => Some(e.to_string()),
                                }
                            }
                            None => {
                                let r = http_bearer(
                                    svc.addr,
                                    "POST",
                                    "/v1/tools/exec",
                                    token,
                                    Some(r#"{"argv":["/usr/bin/true"]}"#),
                                );
                                (!(r.status == 200 && r.json()["exit"] == 0))
                                    .then(|| format!("{} {}", r.status, r.body))
                            }
                        };
                        refused.extend(err);
                    }
                    (made, refused)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("a client panicked")))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let made: usize = results.iter().map(|r| r.0).sum();
    let refused: Vec<&String> = results.iter().flat_map(|r| &r.1).collect();
    assert!(
        refused.is_empty(),
        "{} of {made} calls refused; first: {:?}\n{}",
        refused.len(),
        refused.iter().take(5).collect::<Vec<_>>(),
        svc.log_text()
    );
    // Fair: every client was served, none far below the others.
    let (least, most) = (
        results.iter().map(|r| r.0).min().unwrap_or(0),
        results.iter().map(|r| r.0).max().unwrap_or(0),
    );
    assert!(
        least * 3 >= most && least >= 2,
        "calls per client from {least} to {most}"
    );
    // One exec decision per call, and about one token check per token per second (plus the
    // WebSocket upgrades), not one per call.
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit_ops(&svc, "exec") - execs_before < made && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(audit_ops(&svc, "exec") - execs_before, made, "exec records");
    let auths = audit_ops(&svc, "auth") - auths_before;
    let bound = CLIENTS * (elapsed.ceil() as usize + 2);
    assert!(
        auths <= bound,
        "{auths} token checks for {made} calls of {CLIENTS} tokens in {elapsed:.1} s (bound {bound})"
    );
    println!("{made} calls in {elapsed:.1} s, {auths} token checks, per client {least}..{most}");
}
