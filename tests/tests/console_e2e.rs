//! The operator web console in a real browser: headless Chromium (Debian's `chromium`) driven
//! over WebDriver (`chromedriver`, Debian's `chromium-driver`) against the real `carapace run`
//! with the gateway confined under it and a fake model on loopback.
//!
//! Screenshots of each view are saved under `target/test-artifacts/console/`.
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1, and fails when Chromium or chromedriver are missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_tests::fake_llm::{FakeLlm, Scripted};
use carapace_tests::rpc::RpcClient;
use carapace_tests::service::{http_with, Service, StartOpts};
use carapace_tests::webdriver::Browser;
use carapace_tests::*;
use serde_json::{json, Value};

/// What the session's text tries to run; nothing of it may.
const INJECTED: &str = "<img src=x onerror=\"document.title='pwned';window.pwnedImg=1\"><script>window.pwnedScript=1</script>";

const WAIT: Duration = Duration::from_secs(60);

/// `target/test-artifacts/console/`, created.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test> -> target
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let dir = target.join("test-artifacts").join("console");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The default policy, with the fake model's address and API key in the gateway profile's
/// broker section, and an outbound channel whose allowlist names only `#ops`.
fn console_policy(dir: &Path, llm_port: u16) -> String {
    carapace_tests::agent::policy_with_outbox(dir, llm_port, carapace_tests::agent::TEST_KEY)
}

fn agent_config(llm_port: u16) -> String {
    format!(
        "[gateway.agent]\nbase_url = \"http://127.0.0.1:{llm_port}/v1\"\nmodel = \"fake-model\"\napi_key_secret = \"llm_key\"\n"
    )
}

/// Sign in with `token` on the login form (which must be shown).
fn sign_in(b: &Browser, token: &str) {
    let input = b
        .find("#token")
        .and_then(|e| e.ok_or_else(|| anyhow::anyhow!("no #token input")))
        .unwrap_or_else(|e| panic!("{e}"));
    b.clear(&input).unwrap_or_else(|e| panic!("{e}"));
    b.send_keys(&input, token).unwrap_or_else(|e| panic!("{e}"));
    let go = b
        .find("#login-button")
        .and_then(|e| e.ok_or_else(|| anyhow::anyhow!("no #login-button")))
        .unwrap_or_else(|e| panic!("{e}"));
    b.click(&go).unwrap_or_else(|e| panic!("{e}"));
}

fn click(b: &Browser, selector: &str) {
    let e = b
        .find(selector)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing matches {selector}"));
    b.click(&e).unwrap_or_else(|e| panic!("{e}"));
}

fn shot(b: &Browser, dir: &Path, name: &str) {
    let p = dir.join(format!("{name}.png"));
    b.screenshot(&p).unwrap_or_else(|e| panic!("{e}"));
    let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    assert!(len > 1000, "{} is only {len} bytes", p.display());
}

#[test]
fn the_console_signs_in_answers_a_live_approval_and_shows_session_text_as_text() {
    if !privileged() {
        return;
    }
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver (.ci/test does)"
        );
    }
    let art = artifacts();
    let llm = FakeLlm::start(vec![
        Scripted::tool_call("exec", json!({"argv": ["/usr/bin/uname", "-s"]})),
        // Not on the channel's allowlist: a dead letter.
        Scripted::tool_call(
            "send_message",
            json!({"channel": "outbox", "recipient": "mallory@example.com", "body": "a letter held back"}),
        ),
        Scripted::text(format!("Done. You wrote: {INJECTED}")),
    ]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-console-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(console_policy(dir.path(), port)),
        extra_config: agent_config(port),
        ..StartOpts::default()
    });
    let operator = svc.token("operator");
    let client = svc.token("client");
    let base = format!("http://{}", svc.addr);

    // The headers of every console response.
    for path in [
        "/console",
        "/console/console.js",
        "/console/console.css",
        "/console/nope",
    ] {
        let r = http_with(svc.addr, "GET", path, &[], None);
        assert_eq!(
            r.status,
            if path == "/console/nope" { 404 } else { 200 },
            "{path}"
        );
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: CSP {csp:?}"
        );
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
    }

    // The WebSocket takes the token in a subprotocol (what a browser can send), and answers
    // with the plain protocol name, never the token.
    let offer = format!("carapace.jsonrpc, carapace.bearer.{operator}");
    let mut c = RpcClient::connect_with(svc.addr, "/ws", &[("Sec-WebSocket-Protocol", &offer)])
        .unwrap_or_else(|e| panic!("subprotocol token refused: {e}"));
    let st = c.call("gateway.status", json!({}));
    assert_eq!(st.expect_ok()["caller"]["scope"], "operator");
    c.close();
    let bad = "carapace.jsonrpc, carapace.bearer.cpt_not-a-real-token";
    let e = RpcClient::connect_with(svc.addr, "/ws", &[("Sec-WebSocket-Protocol", bad)])
        .err()
        .unwrap_or_else(|| panic!("a wrong token in the subprotocol was accepted"));
    assert_eq!(e.status(), Some(401), "{e}");

    let b = Browser::start(dir.path(), 1280, 900).unwrap_or_else(|e| panic!("{e}"));
    b.goto(&format!("{base}/console"))
        .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text("h2#login-title", "Sign in", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let title = b
        .execute("return document.title;", json!([]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(title, "carapace console");
    shot(&b, &art, "01-login");

    // The CSP is in force in the browser: an inline script added to the page does not run.
    let ran = b
        .execute(
            "const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1;'; \
             document.body.appendChild(s); return window.inlineRan === undefined;",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ran, true, "an inline script ran despite the CSP");

    // A wrong token, then a client-scoped one: refused with a clear message.
    sign_in(&b, "cpt_wrong-token-0123456789");
    b.wait_for_text("#login-error", "does not know this token", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "02-wrong-token");
    sign_in(&b, &client);
    b.wait_for_text("#login-error", "needs an operator token", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let stored = b
        .execute(
            "return sessionStorage.getItem('carapace.console.token');",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, Value::Null, "a refused token was kept");

    // The operator token: signed in, connected over the WebSocket.
    sign_in(&b, &operator);
    b.wait_for_text("#conn", "connected", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", svc.log_text()));
    let stored = b
        .execute(
            "return sessionStorage.getItem('carapace.console.token');",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, json!(operator), "the token lives in sessionStorage");
    let cookies = b
        .execute("return document.cookie;", json!([]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cookies, "", "no cookies");

    // A client runs the agent; the model asks for a tool the policy `ask`s about. The approval
    // appears in the console by itself; the operator clicks Allow once.
    let mut c = RpcClient::connect(svc.addr, Some(&client)).unwrap_or_else(|e| panic!("{e}"));
    c.set_timeout(Duration::from_secs(120));
    let run = c.start_call(
        "agent.run",
        json!({"session": "console-1", "message": format!("look at this: {INJECTED}")}),
    );
    let card = b
        .wait_for_text("#approvals-list li.approval", "/usr/bin/uname -s", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", svc.log_text()));
    shot(&b, &art, "03-approval-pending");
    b.resize(390, 844).unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "04-approval-pending-phone");
    b.resize(1280, 900).unwrap_or_else(|e| panic!("{e}"));
    let _ = card;
    // The card says why the policy asks (the deciding rule's `why`).
    b.wait_for_text("#approvals-list li.approval", "why asked", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    click(&b, "#approvals-list li.approval button.allow");
    let r = c.finish_call(run, Duration::from_secs(120));
    let res = r.expect_ok();
    assert_eq!(res["stopped"], "done", "{res}");
    b.wait_for_text("#approvals-empty", "Nothing waits", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let tool_result: String = r
        .events_named("agent.step")
        .iter()
        .filter(|e| e["params"]["kind"] == "tool_result")
        .map(|e| e["params"]["result"].to_string())
        .collect();
    assert!(
        tool_result.contains("Linux"),
        "the allowed tool's result: {tool_result} ({:?})",
        r.events
    );

    // The session's history shows the tool's result, and the injected markup as text.
    click(&b, "button.tab[data-view=sessions]");
    let s = b
        .wait_for_text("#sessions-list button.session", "console-1", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    b.click(&s).unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text("#history li.tool", "Linux", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text(
        "#history li.user",
        "<script>window.pwnedScript=1</script>",
        WAIT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text("#history li.assistant", "onerror=", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Give an image's error handler time to fire, were there one.
    std::thread::sleep(Duration::from_millis(500));
    let side_effects = b
        .execute(
            "return [document.title, window.pwnedImg === undefined, window.pwnedScript === undefined, \
             document.querySelectorAll('#history img, #history script').length];",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        side_effects,
        json!(["carapace console", true, true, 0]),
        "the session's text ran"
    );
    shot(&b, &art, "05-session-history");
    b.resize(390, 844).unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "06-session-history-phone");
    b.resize(1280, 900).unwrap_or_else(|e| panic!("{e}"));

    // The other views render.
    click(&b, "button.tab[data-view=status]");
    b.wait_for_text("#status-list", "operator", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text("#children-list li.child", "gateway — running", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for_text("#channels-list li.channel", "outbox", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "07-status");
    click(&b, "button.tab[data-view=held]");
    b.wait_for_text("#held-empty", "No held messages", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "08-held");

    // The dead letter the agent's refused message left: shown, then released to its channel.
    click(&b, "button.tab[data-view=dlq]");
    b.wait_for_text("#dlq-list li.dead", "a letter held back", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", svc.log_text()));
    shot(&b, &art, "09-dead-letters");
    let outbox = dir.path().join("outbox.log");
    assert!(
        !fs::read_to_string(&outbox)
            .unwrap_or_default()
            .contains("a letter held back"),
        "delivered before its release"
    );
    click(&b, "#dlq-list li.dead button.allow");
    b.wait_for_text("#dlq-empty", "No dead letters", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let delivered = fs::read_to_string(&outbox).unwrap_or_default();
    assert!(
        delivered.contains("a letter held back") && delivered.contains("mallory@example.com"),
        "the released letter is not in the channel: {delivered:?}"
    );

    // The audit log, filtered: the release is there, done by the gateway for this token.
    click(&b, "button.tab[data-view=audit]");
    let op = b
        .find("#audit-op")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no #audit-op"));
    b.send_keys(&op, "dlq_release")
        .unwrap_or_else(|e| panic!("{e}"));
    click(&b, "#audit-form button[type=submit]");
    let rec = b
        .wait_for_text("#audit-list li.record", "dlq_release", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = b.text(&rec).unwrap_or_default();
    assert!(text.contains("outbox -> mallory@example.com"), "{text}");
    let rows = b
        .execute(
            "return document.querySelectorAll('#audit-list li.record').length;",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows, 1, "the filter kept only the release");
    shot(&b, &art, "10-audit");
    b.resize(390, 844).unwrap_or_else(|e| panic!("{e}"));
    shot(&b, &art, "11-audit-phone");
    b.resize(1280, 900).unwrap_or_else(|e| panic!("{e}"));

    // Signing out forgets the token.
    click(&b, "#logout");
    b.wait_for_text("#conn", "not signed in", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let stored = b
        .execute(
            "return sessionStorage.getItem('carapace.console.token');",
            json!([]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, Value::Null);
}
