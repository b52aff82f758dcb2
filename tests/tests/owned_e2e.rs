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

use carapace_tests::agent::{config as agent_config, ws};
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
    carapace_tests::agent::policy(dir, llm_port, LLM_KEY, extra_broker)
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
    let alice_archive = r.expect_ok()["archive"]
        .as_str()
        .unwrap_or_else(|| panic!("no archive name"))
        .to_string();

    // An archive stays its session's owner's: another client neither lists, reads nor restores
    // it (answered as a missing one); the owner does, and the operator sees all.
    let mut b = ws(&svc, &bob);
    let archives = |c: &mut RpcClient| -> Vec<String> {
        let r = c.call("sessions.archived", json!({}));
        r.expect_ok()["archived"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["session"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(archives(&mut b), ["bob-chat"]);
    assert_eq!(archives(&mut a), ["alice-chat"]);
    let mut all = archives(&mut o);
    all.sort();
    assert_eq!(all, ["alice-chat", "bob-chat"]);
    let r = b.call("sessions.archived", json!({"archive": alice_archive}));
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    let r = b.call("sessions.restore", json!({"archive": alice_archive}));
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    let r = a.call("sessions.restore", json!({"archive": alice_archive}));
    assert_eq!(r.expect_ok()["restored"], true);
    let r = a.call("sessions.history", json!({"session": "alice-chat"}));
    assert!(r.expect_ok().to_string().contains("hello alice"));
    // A name kept for scheduled jobs is refused to clients like a channel's.
    let r = a.call(
        "agent.run",
        json!({"session": "job-nightly", "message": "x"}),
    );
    assert_eq!(r.expect_err().kind(), Some("not_found"));
}

/// The venv `.ci/test` makes with the official `openai` client.
const VENV_PYTHON: &str = "/var/cache/carapace-venv/bin/python";

/// The client script: `python client.py BASE_URL TOKEN STEP [SESSION]`; one JSON line out.
const CLIENT_PY: &str = r#"
import json, sys
import openai

base, token, step = sys.argv[1:4]
session = sys.argv[4] if len(sys.argv) > 4 else None
headers = {"X-Carapace-Session": session} if session else None
c = openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=180)
out = {}
try:
    if step == "models":
        out = {"ids": [m.id for m in c.models.list()]}
    elif step == "plain":
        r = c.chat.completions.create(
            model="carapace",
            messages=[{"role": "system", "content": "not used"}, {"role": "user", "content": "hello"}],
            extra_headers=headers,
        )
        out = {
            "content": r.choices[0].message.content,
            "role": r.choices[0].message.role,
            "finish": r.choices[0].finish_reason,
            "total": r.usage.total_tokens,
            "model": r.model,
            "object": r.object,
        }
    elif step == "stream":
        s = c.chat.completions.create(
            model="carapace",
            messages=[{"role": "user", "content": "tell me more"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        parts, finish, chunks, usage = [], None, 0, None
        for ch in s:
            chunks += 1
            if ch.usage is not None:
                usage = ch.usage.total_tokens
            for choice in ch.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        out = {"content": "".join(parts), "finish": finish, "chunks": chunks, "usage": usage}
    elif step == "bad-input":
        c.chat.completions.create(model="carapace", messages=[{"role": "assistant", "content": "x"}])
    else:
        out = {"unknown step": step}
except openai.APIStatusError as e:
    out = {"status": e.status_code, "type": e.type, "code": e.code, "message": e.message}
except openai.APIError as e:
    out = {"api_error": e.message, "type": getattr(e, "type", None), "code": getattr(e, "code", None)}
print(json.dumps(out))
"#;

/// The `openai` client against the gateway.
struct PyClient {
    script: std::path::PathBuf,
    base: String,
}

impl PyClient {
    fn new(dir: &Path, svc: &Service) -> PyClient {
        assert!(
            Path::new(VENV_PYTHON).exists(),
            "{VENV_PYTHON} is missing: .ci/test sets up the venv with the `openai` client"
        );
        let script = dir.join("client.py");
        fs::write(&script, CLIENT_PY).unwrap_or_else(|e| panic!("{e}"));
        PyClient {
            script,
            base: format!("http://{}/v1", svc.addr),
        }
    }

    fn command(&self, token: &str, step: &str, session: Option<&str>) -> std::process::Command {
        let mut cmd = std::process::Command::new(VENV_PYTHON);
        cmd.arg(&self.script).args([&self.base, token, step]);
        if let Some(s) = session {
            cmd.arg(s);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    fn output(o: std::process::Output) -> Value {
        assert!(
            o.status.success(),
            "the openai client failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "the openai client printed no JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    fn run(&self, token: &str, step: &str, session: Option<&str>) -> Value {
        let o = self
            .command(token, step, session)
            .output()
            .unwrap_or_else(|e| panic!("{VENV_PYTHON}: {e}"));
        PyClient::output(o)
    }
}

#[test]
fn the_openai_client_talks_to_the_agent_streaming_and_not_with_an_approval() {
    if !privileged() {
        return;
    }
    let long: String = (0..40)
        .map(|i| format!("line {i} of a long answer. "))
        .collect();
    let llm = FakeLlm::start(vec![
        Scripted::text("Hello from the agent."),
        Scripted::text(long.clone()),
        Scripted::tool_call("exec", json!({"argv": ["/usr/bin/uname", "-s"]})),
        Scripted::text("The operator approved uname, and it said Linux."),
    ]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-owned-oai-");
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port, "")),
        extra_config: agent_config(port, ""),
        ..StartOpts::default()
    });
    let created = svc.token_create("client", "sdk");
    let client = created["token"].as_str().unwrap_or_default().to_string();
    let client_owner = format!("token:{}", created["id"].as_str().unwrap_or_default());
    let op = svc.token_named("operator", "op");
    let py = PyClient::new(dir.path(), &svc);

    let v = py.run(&client, "models", None);
    assert_eq!(v["ids"], json!(["carapace"]), "{v}");

    // Not streaming: the agent's answer, in the token's own session.
    let v = py.run(&client, "plain", None);
    assert_eq!(v["content"], "Hello from the agent.", "{v}");
    assert_eq!(
        (&v["role"], &v["finish"], &v["model"], &v["object"]),
        (
            &json!("assistant"),
            &json!("stop"),
            &json!("carapace"),
            &json!("chat.completion")
        ),
        "{v}"
    );
    assert_eq!(v["total"], 15, "{v}");
    let sent = llm.requests()[0].body["messages"].clone();
    assert_eq!(sent[0]["role"], "system");
    assert!(
        !sent.to_string().contains("not used"),
        "client system messages are not used: {sent}"
    );
    assert!(
        sent.to_string().contains("hello"),
        "the user's message reached the model: {sent}"
    );
    let r = http_bearer(svc.addr, "GET", "/v1/sessions", &client, None);
    let names = session_names(&r.json());
    assert_eq!(names.len(), 1, "{}", r.body);
    assert!(names[0].starts_with("oai-"), "{names:?}");

    // Streaming: the same session goes on (the model gets the history), the answer arrives
    // in several chunks and then a usage chunk.
    let v = py.run(&client, "stream", None);
    assert_eq!(v["content"], json!(long), "{v}");
    assert_eq!(v["finish"], "stop", "{v}");
    assert_eq!(v["usage"], 15, "{v}");
    assert!(v["chunks"].as_u64().unwrap_or(0) >= 5, "{v}");
    let sent = llm.requests()[1].body["messages"].to_string();
    assert!(
        sent.contains("Hello from the agent.") && sent.contains("tell me more"),
        "{sent}"
    );

    // A tool call that asks: the streaming request waits while an operator resolves the
    // approval with `approvals.resolve`, then the final answer arrives.
    let child = py
        .command(&client, "stream", Some("with-approval"))
        .spawn()
        .unwrap_or_else(|e| panic!("{VENV_PYTHON}: {e}"));
    let mut o = ws(&svc, &op);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pending = loop {
        let l = o.call("approvals.list", json!({}));
        if let Some(p) = l.expect_ok()["pending"].as_array().and_then(|a| a.first()) {
            break p.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pending approval\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        pending["argv"],
        json!(["/usr/bin/uname", "-s"]),
        "{pending}"
    );
    // Keep the client waiting past a keep-alive.
    std::thread::sleep(Duration::from_secs(11));
    let r = o.call(
        "approvals.resolve",
        json!({"id": pending["id"], "resolution": "allow-once"}),
    );
    assert_eq!(r.expect_ok()["decision"], "allowed once", "{r:?}");
    let v = PyClient::output(child.wait_with_output().unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        v["content"], "The operator approved uname, and it said Linux.",
        "{v}"
    );
    let reqs = llm.requests();
    let tool_result = reqs[3].body["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "tool"))
        .map(|m| m["content"].to_string())
        .unwrap_or_default();
    assert!(tool_result.contains("Linux"), "{tool_result}");
    let r = http_bearer(svc.addr, "GET", "/v1/sessions/with-approval", &client, None);
    assert_eq!(r.status, 200, "the header named the session: {}", r.body);
    // The endpoint's tools ran in the token's own workspace, not the shared one.
    assert!(
        svc.owner_workspace(&client_owner).is_dir(),
        "no workspace for {client_owner}"
    );

    // Errors in OpenAI's shape, as the client reads them.
    let v = py.run("cpt_not-a-real-token", "models", None);
    assert_eq!(
        (&v["status"], &v["type"]),
        (&json!(401), &json!("authentication_error")),
        "{v}"
    );
    let v = py.run(&client, "bad-input", None);
    assert_eq!(
        (&v["status"], &v["type"]),
        (&json!(400), &json!("invalid_request_error")),
        "{v}"
    );
    // Another's session, named by the header: 404, and nothing reaches the model.
    let other = svc.token_named("client", "other");
    let before = llm.requests().len();
    let v = py.run(&other, "plain", Some("with-approval"));
    assert_eq!(v["status"], 404, "{v}");
    assert_eq!(llm.requests().len(), before);
    // Too many calls: 429 in the same shape.
    let mut limited = None;
    for _ in 0..400 {
        let r = http_bearer(svc.addr, "GET", "/v1/models", &other, None);
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.unwrap_or_else(|| panic!("no 429 after 400 quick calls"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.body);
}

const HOOK_KEY: &str = "the-shared-webhook-key-0123456789";

/// `sha256=<hex HMAC-SHA256(key, body)>`.
fn signature(key: &str, body: &str) -> String {
    use hmac::{Hmac, Mac as _};
    let mut mac =
        <Hmac<sha2::Sha256>>::new_from_slice(key.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// A loopback HTTP server that answers 200 to every request and records the bodies.
struct Recorder {
    addr: std::net::SocketAddr,
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recorder {
    fn start() -> Recorder {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(clone) = s.try_clone() else { continue };
                let mut r = BufReader::new(clone);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len.min(1 << 20)];
                let _ = r.read_exact(&mut body);
                g.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(String::from_utf8_lossy(&body).into_owned());
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Recorder { addr, got }
    }

    fn got(&self) -> Vec<String> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_secret_the_model_echoes_reaches_no_client_stream_or_channel() {
    if !privileged() {
        return;
    }
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, LLM_KEY);
    let said = format!("the key is {LLM_KEY}, encoded {b64}, ticket internal-12345.");
    // On a stream, the secret straddles the boundary of two content chunks (256 bytes).
    let streamed = format!("{}{LLM_KEY} and more", "x".repeat(250));
    let llm = FakeLlm::start(vec![
        // agent.run over WebSocket: a tool call with the secret in its arguments, then text.
        Scripted::tool_call("exec", json!({"argv": ["/usr/bin/echo", LLM_KEY]})),
        Scripted::text(said.clone()),
        // REST.
        Scripted::text(said.clone()),
        // The OpenAI door, plain then streamed.
        Scripted::text(said.clone()),
        Scripted::text(streamed.clone()),
        // The reply to a channel message.
        Scripted::text(said.clone()),
    ]);
    let port = llm.addr().port();
    let peer = Recorder::start();
    let dir = tempdir("carapace-owned-redact-");
    let hook_key = dir.path().join("hook.key");
    fs::write(&hook_key, HOOK_KEY).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&hook_key, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let hook_port = carapace_tests::service::free_port();
    let policy = format!(
        r#"{base}

[secrets.hookkey]
why = "the webhook's shared key"
file = "{hook_key}"

[channels.hook]
why = "signed posts from the test peer"
kind = "adapter"
senders = ["ci"]
recipients = []
reply_to_senders = true

[profiles.hook]
why = "the webhook adapter under test"
extends = "channel"

[profiles.hook.broker]
connect = [{{ host = "127.0.0.1", port = {peer}, allow_private = true, why = "the peer's reply endpoint" }}]
secrets = ["hookkey"]
deliver = ["hook"]
"#,
        base = agent_policy(
            dir.path(),
            port,
            "channels = [\"hook\"]\nredact = [\"internal-[0-9]{4,}\"]\n"
        ),
        hook_key = hook_key.display(),
        peer = peer.addr.port(),
    );
    let svc = Service::start_opts(StartOpts {
        policy: Some(policy),
        extra_config: agent_config(
            port,
            &format!(
                r#"
[channels.hook]
kind = "webhook"
program = "{bin}"
profile = "hook"
listen = "127.0.0.1:{hook_port}"
hmac_secret = "hookkey"
url = "http://{peer}/reply"
path = "/hook"
"#,
                bin = carapace_tests::service::channel_bin().display(),
                peer = peer.addr,
            ),
        ),
        ..StartOpts::default()
    });
    let client = svc.token_named("client", "c");
    let hidden = |what: &str, text: &str| {
        assert!(!text.contains(LLM_KEY), "{what} shows the secret: {text}");
        assert!(!text.contains(&b64), "{what} shows its base64: {text}");
        assert!(
            !text.contains("internal-12345"),
            "{what} shows the policy's pattern: {text}"
        );
    };

    // WebSocket: the result and every event.
    let mut c = ws(&svc, &client);
    let r = c.call(
        "agent.run",
        json!({"session": "ws", "message": "what is the key?"}),
    );
    let reply = r.expect_ok()["reply"].as_str().unwrap_or("").to_string();
    hidden("agent.run's reply", &reply);
    assert!(
        reply.starts_with("the key is [REDACTED], encoded [REDACTED], ticket [REDACTED]."),
        "{reply}"
    );
    let events = serde_json::to_string(&r.events).unwrap_or_default();
    assert!(events.contains("tool_call"), "{events}");
    hidden("the agent.step events", &events);
    // The tool ran as the model asked (its output is redacted by the broker).
    let tool_result = llm.requests()[1].body["messages"].to_string();
    assert!(tool_result.contains("[REDACTED]"), "{tool_result}");
    let h = c.call("sessions.history", json!({"session": "ws"}));
    hidden("the session's history", &h.expect_ok().to_string());

    // REST.
    let r = http_bearer(
        svc.addr,
        "POST",
        "/v1/agent/run",
        &client,
        Some(r#"{"session":"rest","message":"and again?"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    hidden("the REST answer", &r.body);
    assert!(r.body.contains("[REDACTED]"), "{}", r.body);

    // The OpenAI door, plain and streamed (the secret across two chunks).
    let py = PyClient::new(dir.path(), &svc);
    let v = py.run(&client, "plain", None);
    hidden("the chat completion", &v.to_string());
    assert!(
        v["content"].as_str().unwrap_or("").contains("[REDACTED]"),
        "{v}"
    );
    let v = py.run(&client, "stream", None);
    hidden("the stream", &v.to_string());
    assert_eq!(
        v["content"],
        json!(format!("{}[REDACTED] and more", "x".repeat(250))),
        "{v}"
    );

    // A channel: the reply the peer receives. The message itself is announced to operator
    // connections only: it belongs to its conversation, not to a client token.
    let operator = svc.token_named("operator", "op");
    let mut o = ws(&svc, &operator);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{hook_port}")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let body = r#"{"id":"m-1","sender":"ci","text":"what is the key?"}"#;
    let r = wait_for(Duration::from_secs(30), "the webhook answering", || {
        let r = carapace_tests::service::http_with(
            addr,
            "POST",
            "/hook",
            &[("X-Carapace-Signature", &signature(HOOK_KEY, body))],
            Some(body),
        );
        (r.status != 0 && r.status != 503).then_some(r)
    });
    assert_eq!(r.status, 202, "{r:?}");
    let got = wait_for(Duration::from_secs(60), "the reply POST", || {
        let g = peer.got();
        (!g.is_empty()).then_some(g)
    });
    hidden("the channel reply", &got[0]);
    assert!(got[0].contains("ticket [REDACTED]"), "{}", got[0]);
    let ev = o
        .next_event("messages.inbound", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the operator got no messages.inbound"));
    assert_eq!(ev["params"]["id"], "m-1", "{ev}");
    assert!(
        c.next_event("messages.inbound", Duration::from_secs(1))
            .is_none(),
        "a client token was shown a channel's message"
    );

    // The redactions are audited (never the text).
    let audit = fs::read_to_string(svc.state_dir().join("audit.log")).unwrap_or_default();
    assert!(
        audit.contains("\"op\":\"redact\""),
        "no redact in the audit log"
    );
    hidden(
        "the audit log's redact records",
        &audit
            .lines()
            .filter(|l| l.contains("\"op\":\"redact\""))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
