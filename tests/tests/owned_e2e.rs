//! Sessions owned by their token, the OpenAI-compatible endpoint, and replies redacted on the
//! way out, end to end: the real `carapace run` (as root) with `carapace-gateway` confined
//! under it, a fake OpenAI-compatible model on loopback, test clients over WebSocket and HTTP,
//! and the official `openai` Python client (from the venv `.ci/test` sets up).
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::rpc::RpcClient;
use carapace_tests::service::{http_bearer, Service, StartOpts};
use carapace_tests::*;
use serde_json::{json, Value};

/// The model's API key (a secret the broker knows).
const LLM_KEY: &str = "sk-test-0123456789abcdef";

/// The default policy with, in the gateway profile's broker section, the fake model's address
/// and its API key, and `extra_broker` after them.
fn agent_policy(dir: &Path, llm_port: u16, extra_broker: &str) -> String {
    let key = dir.join("llm.key");
    fs::write(&key, format!("{LLM_KEY}\n")).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    let base = default_policy_text();
    let broker_header = "[profiles.gateway.broker]\n";
    assert!(
        base.contains(broker_header),
        "the default policy changed shape"
    );
    let base = base.replacen(
        broker_header,
        &format!(
            "{broker_header}connect = [{{ host = \"127.0.0.1\", port = {llm_port}, allow_private = true, why = \"test: the fake model\" }}]\nsecrets = [\"llm_key\"]\n{extra_broker}"
        ),
        1,
    );
    format!(
        r##"{base}

[secrets.llm_key]
why = "test: the fake model's API key"
file = "{key}"
"##,
        key = key.display(),
    )
}

fn agent_config(llm_port: u16, extra: &str) -> String {
    format!(
        "[gateway.agent]\nbase_url = \"http://127.0.0.1:{llm_port}/v1\"\nmodel = \"fake-model\"\napi_key_secret = \"llm_key\"\n{extra}"
    )
}

fn ws(svc: &Service, token: &str) -> RpcClient {
    let mut c = RpcClient::connect(svc.addr, Some(token))
        .unwrap_or_else(|e| panic!("websocket connect: {e}\n{}", svc.log_text()));
    c.set_timeout(Duration::from_secs(60));
    c
}

fn session_names(v: &Value) -> Vec<String> {
    v["sessions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sessions_belong_to_their_token_over_rest_and_websocket() {
    if !privileged() {
        return;
    }
    let llm = FakeLlm::start(vec![]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-owned-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port, "")),
        extra_config: agent_config(port, ""),
        ..StartOpts::default()
    });
    let alice = svc.token_named("client", "alice");
    let bob = svc.token_named("client", "bob");
    let op = svc.token_named("operator", "op");

    // Alice makes a session over WebSocket, Bob one over REST.
    llm.push(Scripted::text("hello alice"));
    let mut a = ws(&svc, &alice);
    let r = a.call(
        "agent.run",
        json!({"session": "alice-chat", "message": "hi"}),
    );
    assert_eq!(r.expect_ok()["reply"], "hello alice");
    llm.push(Scripted::text("hello bob"));
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/agent/run",
        &bob,
        Some(r#"{"session":"bob-chat","message":"hi"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Each client lists only its own, over both doors; the operator lists both.
    let l = a.call("sessions.list", json!({}));
    assert_eq!(session_names(l.expect_ok()), ["alice-chat"]);
    let r = http_bearer(svc.addr, "GET", "/v1/sessions", &bob, None);
    assert_eq!(session_names(&r.json()), ["bob-chat"], "{}", r.body);
    let r = http_bearer(svc.addr, "GET", "/v1/sessions", &op, None);
    assert_eq!(
        session_names(&r.json()),
        ["alice-chat", "bob-chat"],
        "{}",
        r.body
    );
    let owner = r.json()["sessions"][0]["owner"].clone();
    assert!(
        owner.as_str().is_some_and(|o| o.starts_with("token:")),
        "{owner}"
    );

    // Another's session reads exactly like a missing one: history over WebSocket and REST.
    let mine = a.call("sessions.history", json!({"session": "alice-chat"}));
    assert!(mine.expect_ok()["messages"]
        .as_array()
        .is_some_and(|m| m.len() >= 2));
    let theirs = a.call("sessions.history", json!({"session": "bob-chat"}));
    let missing = a.call("sessions.history", json!({"session": "nobody-chat"}));
    let (t, m) = (theirs.expect_err(), missing.expect_err());
    assert_eq!((t.kind(), m.kind()), (Some("not_found"), Some("not_found")));
    assert_eq!(
        t.message.replace("bob-chat", "X"),
        m.message.replace("nobody-chat", "X")
    );
    let theirs = http_bearer(svc.addr, "GET", "/v1/sessions/alice-chat", &bob, None);
    let missing = http_bearer(svc.addr, "GET", "/v1/sessions/nobody-chat", &bob, None);
    assert_eq!(
        (theirs.status, missing.status),
        (404, 404),
        "{}",
        theirs.body
    );
    assert!(!theirs.body.contains("hello alice"), "{}", theirs.body);

    // Nor can a client reset another's session (answered as for a missing one) or run in it.
    let r = a.call("sessions.reset", json!({"session": "bob-chat"}));
    assert_eq!(r.expect_ok()["removed"], false);
    let r = http_bearer(svc.addr, "DELETE", "/v1/sessions/alice-chat", &bob, None);
    assert_eq!(r.json()["removed"], false, "{}", r.body);
    let r = a.call(
        "agent.run",
        json!({"session": "bob-chat", "message": "let me in"}),
    );
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/agent/run",
        &bob,
        Some(r#"{"session":"alice-chat","message":"let me in"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    // Names kept for channel conversations and other tokens' defaults are refused too.
    let r = a.call(
        "agent.run",
        json!({"session": "ch-tg-0011223344556677", "message": "x"}),
    );
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    assert_eq!(llm.requests().len(), 2, "no refused run reached the model");
    // Both sessions are intact, and each owner still reads its own.
    let r = http_bearer(svc.addr, "GET", "/v1/sessions/bob-chat", &bob, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("hello bob"), "{}", r.body);
    assert!(!r.body.contains("let me in"), "{}", r.body);

    // The operator sees and resets anyone's, over WebSocket.
    let mut o = ws(&svc, &op);
    let r = o.call("sessions.history", json!({"session": "alice-chat"}));
    assert!(r.expect_ok().to_string().contains("hello alice"));
    let r = o.call("sessions.reset", json!({"session": "bob-chat"}));
    assert_eq!(r.expect_ok()["removed"], true);
    // The owner resets its own.
    let r = a.call("sessions.reset", json!({"session": "alice-chat"}));
    assert_eq!(r.expect_ok()["removed"], true);
}
