//! The gateway's agent against the fake model (`fake_llm`): the policy and the configuration
//! the end-to-end suites share, and a WebSocket client with a generous timeout.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use crate::default_policy_text;
use crate::rpc::RpcClient;
use crate::service::Service;

/// The fake model's API key, as most suites write it.
pub const TEST_KEY: &str = "sk-test-0123456789abcdef";

/// The default policy, with the gateway allowed to reach the fake model on loopback port
/// `llm_port` and to read its key `key` (written to `dir/llm.key`, 0600) as the secret
/// `llm_key`. `extra_broker` lines are added to the gateway's broker section.
pub fn policy(dir: &Path, llm_port: u16, key: &str, extra_broker: &str) -> String {
    let key_file = dir.join("llm.key");
    fs::write(&key_file, format!("{key}\n")).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
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
        key = key_file.display(),
    )
}

/// [`policy`] with a file channel `outbox` (recipient `#ops`, kept in `dir/outbox.log`) the
/// gateway may send on.
pub fn policy_with_outbox(dir: &Path, llm_port: u16, key: &str) -> String {
    let outbox = dir.join("outbox.log");
    format!(
        r##"{base}
[channels.outbox]
why = "test: outbound messages, kept in a file"
kind = "file"
path = "{outbox}"
recipients = ["#ops"]
"##,
        base = policy(dir, llm_port, key, "channels = [\"outbox\"]\n"),
        outbox = outbox.display(),
    )
}

/// `[gateway.agent]` pointing at the fake model on `llm_port`, with `extra` lines.
pub fn config(llm_port: u16, extra: &str) -> String {
    format!(
        "[gateway.agent]\nbase_url = \"http://127.0.0.1:{llm_port}/v1\"\nmodel = \"fake-model\"\napi_key_secret = \"llm_key\"\n{extra}"
    )
}

/// A WebSocket JSON-RPC client of `svc` as `token`, waiting up to 60 s for each answer.
pub fn ws(svc: &Service, token: &str) -> RpcClient {
    let mut c = RpcClient::connect(svc.addr, Some(token))
        .unwrap_or_else(|e| panic!("websocket connect: {e}\n{}", svc.log_text()));
    c.set_timeout(Duration::from_secs(60));
    c
}
