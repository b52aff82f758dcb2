//! The wiring between the configuration and the policy for channels: what `carapace run` (and
//! `--check`) verifies before it starts anything, so that a channel that could never work is a
//! start-up error with its reason rather than an adapter failing in a restart loop.
//!
//! For each `[channels.NAME]` of the configuration with a built-in `kind`:
//! - the policy has a `[channels.NAME]` of `kind = "adapter"` (what the broker routes `send`
//!   to, and what the adapter delivers on);
//! - the adapter's profile has a broker section that `deliver`s the channel, lists the secret
//!   the configuration names, and may `connect` to every service address the configuration
//!   gives (a loopback address needs `allow_private` in the rule, like any other);
//! - the gateway's profile may `send` on the channel (else the agent could never answer: a
//!   warning, since a channel may be inbound-only on purpose);
//! - the channel's `operator` (if any) is an identity the adapter can report: a Telegram user
//!   id (digits), a Discord user id (digits), a lowercase e-mail address (the e-mail adapter
//!   lowercases From), an IRC nick or account in IRC lower case, a Signal number (`+` and
//!   digits) or account uuid, a Slack user id (`U…`/`W…`), a full Matrix user id
//!   (`@alice:example.org`), else it could never answer anything.
//!
//! For each `[[jobs]]` with `deliver_to`: the gateway's profile may `send` on its channel (an
//! error: the job's answers could never be delivered).
//!
//! For each `[workspaces.NAME]` (warnings: the workspace still works for what is wired):
//! - every profile it is granted to exists in the policy;
//! - the gateway's profile, when granted it, has an `open` rule for its directory (else the file
//!   tools are refused there; tools still run in it).
//!
//! And [`gateway_settings`]: the gateway's broker budget, added to its settings at each start.

use carapace_policy::broker::{BrokerRules, ChannelKind};
use carapace_policy::Policy;

use crate::service::config::{ChildConfig, Config};

/// What is wrong (errors: the start is refused) and worth saying (warnings).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wiring {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// The secret-naming keys of the built-in kinds' settings.
const SECRET_KEYS: &[&str] = &[
    "token_secret",
    "password_secret",
    "hmac_secret",
    "app_token_secret",
    "bot_token_secret",
];

/// The (host, port) pairs an adapter's settings say it connects to.
fn endpoints(settings: &serde_json::Value) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    let kind = settings.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let url_of = |key: &str, default: Option<&str>| -> Option<(String, u16)> {
        let u = settings.get(key).and_then(|v| v.as_str()).or(default)?;
        let (https, rest) = match u.strip_prefix("https://") {
            Some(r) => (true, r),
            None => (false, u.strip_prefix("http://")?),
        };
        let authority = rest.split('/').next().unwrap_or("");
        host_port(authority, if https { 443 } else { 80 })
    };
    match kind {
        "telegram" => out.extend(url_of("api_base", Some("https://api.telegram.org"))),
        "webhook" => out.extend(url_of("url", None)),
        "irc" => {
            if let Some(hp) = settings.get("server").and_then(|v| v.as_str()) {
                out.extend(host_port(hp, 0));
            }
        }
        // The Web API only: the Socket Mode host comes from apps.connections.open at run time
        // (wss-primary.slack.com and the like; docs/channels.md says which rule covers it).
        "slack" => out.extend(url_of("api_base", Some("https://slack.com/api"))),
        "discord" => {
            out.extend(url_of("api_base", Some("https://discord.com/api/v10")));
            let gateway = settings
                .get("gateway_url")
                .and_then(|v| v.as_str())
                .unwrap_or("wss://gateway.discord.gg");
            let (tls, rest) = match gateway.strip_prefix("wss://") {
                Some(r) => (true, r),
                None => (false, gateway.strip_prefix("ws://").unwrap_or("")),
            };
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            out.extend(host_port(authority, if tls { 443 } else { 80 }));
        }
        "matrix" => out.extend(url_of("homeserver", None)),
        "email" => {
            for key in ["imap", "smtp"] {
                if let Some(hp) = settings.get(key).and_then(|v| v.as_str()) {
                    out.extend(host_port(hp, 0));
                }
            }
        }
        _ => {}
    }
    out
}

/// `host[:port]` (IPv6 in brackets, kept) with `default_port` when none is written.
fn host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if s.ends_with(']') || !s.contains(':') {
        return (default_port != 0).then(|| (s.to_string(), default_port));
    }
    let (h, p) = s.rsplit_once(':')?;
    Some((h.to_string(), p.parse().ok()?))
}

fn check_channel(name: &str, c: &ChildConfig, policy: &Policy, w: &mut Wiring) {
    let Some(settings) = c
        .settings
        .as_deref()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
    else {
        // An adapter of the operator's own: the policy is all it has; nothing to compare.
        return;
    };
    let kind = settings.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    let what = format!("[channels.{name}] (kind = \"{kind}\")");
    match policy.channels().find(|s| s.name == name) {
        None => w.errors.push(format!(
            "{what}: the policy has no [channels.{name}]; add one with kind = \"adapter\" \
             (see docs/channels.md)"
        )),
        Some(spec) if !matches!(spec.kind, ChannelKind::Adapter) => w.errors.push(format!(
            "{what}: the policy's [channels.{name}] (line {}) is not kind = \"adapter\", so \
             nothing the agent sends on it would reach the adapter",
            spec.line
        )),
        Some(spec) => {
            if let Some(op) = &spec.operator {
                check_operator(&what, kind, name, op, spec.line, w);
            }
        }
    }
    let Some(rules) = policy.broker_view(&c.profile) else {
        w.errors.push(format!(
            "{what}: its profile `{}` has no [profiles.{}.broker] section: the adapter could \
             reach neither its service nor the broker's queue",
            c.profile, c.profile
        ));
        return;
    };
    check_rules(name, &what, &settings, &rules, w);
}

/// The operator identity `op` of channel `name` (policy line `line`) against what an adapter
/// of `kind` reports as a sender.
fn check_operator(what: &str, kind: &str, name: &str, op: &str, line: usize, w: &mut Wiring) {
    let problem = match kind {
        "telegram" if !(op.bytes().all(|b| b.is_ascii_digit()) && op.parse::<u64>().is_ok()) => {
            Some("is not a Telegram user id (the digits @userinfobot shows)")
        }
        "slack" if !is_slack_user_id(op) => {
            Some("is not a Slack user id (U… or W…, from the person's profile: Copy member ID)")
        }
        "discord" if !(op.bytes().all(|b| b.is_ascii_digit()) && op.parse::<u64>().is_ok()) => {
            Some("is not a Discord user id (the digits Developer Mode's Copy User ID gives)")
        }
        "email" if !op.contains('@') => Some("is not an e-mail address"),
        "signal" if !(super::config::is_signal_number(op) || is_uuid(op)) => Some(
            "is neither a phone number (+ and digits) nor a Signal account uuid, the two forms \
             the Signal adapter reports senders in",
        ),
        "matrix"
            if !(op.starts_with('@')
                && op.len() <= 255
                && op.split_once(':').is_some_and(|(l, s)| l.len() > 1 && !s.is_empty())
                && !op.chars().any(char::is_whitespace)) =>
        {
            Some("is not a Matrix user id (the full MXID, as in \"@alice:example.org\")")
        }
        "email" if op.chars().any(char::is_uppercase) => Some(
            "has capital letters: the e-mail adapter reports senders lowercased, so write it              in lowercase",
        ),
        "irc" if op.starts_with("unidentified:") => Some(
            "is how the IRC adapter marks a sender without an account: it is never admitted as the operator",
        ),
        "irc"
            if op.is_empty()
                || op.starts_with(['#', '&', '+', '!', ':'])
                || op.chars().any(|c| c.is_control() || c == ' ' || c == ',' || c == '@') =>
        {
            Some("is not an IRC nick or account name")
        }
        "irc" if op.chars().any(|c| c.is_ascii_uppercase() || "[]\\~".contains(c)) => Some(
            "is not in IRC lower case: the IRC adapter reports nicks and accounts lowercased \
             (A-Z as a-z, []\\~ as {}|^), so write it that way",
        ),
        _ => None,
    };
    if let Some(p) = problem {
        w.errors.push(format!(
            "{what}: the policy's [channels.{name}] (line {line}) names operator \"{op}\", which {p}; no sender could ever answer as the operator"
        ));
    }
}

/// `8-4-4-4-12` lowercase hex digits, as signal-cli writes an account's uuid (ACI).
fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// A Slack user id as the Slack adapter reports senders: `U…` or `W…`, capitals and digits.
fn is_slack_user_id(s: &str) -> bool {
    (2..=64).contains(&s.len())
        && (s.starts_with('U') || s.starts_with('W'))
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn check_rules(
    name: &str,
    what: &str,
    settings: &serde_json::Value,
    rules: &BrokerRules,
    w: &mut Wiring,
) {
    let profile = &rules.profile;
    if rules.deliver_channel(name).is_none() {
        w.errors.push(format!(
            "{what}: profile `{profile}` does not `deliver` the channel (add \"{name}\" to \
             deliver in [profiles.{profile}.broker])"
        ));
    }
    for key in SECRET_KEYS {
        if let Some(secret) = settings.get(*key).and_then(|v| v.as_str()) {
            if rules.secret(secret).is_none() {
                w.errors.push(format!(
                    "{what}: `{key}` = \"{secret}\", but profile `{profile}` may not fetch that \
                     secret (add it to secrets in [profiles.{profile}.broker], and a \
                     [secrets.{secret}] if there is none)"
                ));
            }
        }
    }
    for (host, port) in endpoints(settings) {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if rules.connect_allowed(bare, port).is_none() {
            w.errors.push(format!(
                "{what}: profile `{profile}` may not connect to {host}:{port}, the service the \
                 configuration names (add a connect rule to [profiles.{profile}.broker]{})",
                if bare.parse::<std::net::IpAddr>().is_ok() || bare == "localhost" {
                    " with allow_private = true for a local address"
                } else {
                    ""
                }
            ));
        }
    }
}

/// Check every channel of `cfg` against `policy`.
pub fn check(cfg: &Config, policy: &Policy) -> Wiring {
    let mut w = Wiring::default();
    for (name, c) in &cfg.channels {
        check_channel(name, c, policy, &mut w);
    }
    if let Some(gw) = &cfg.gateway {
        let rules = policy.broker_view(&gw.profile);
        for j in &cfg.jobs {
            let Some((channel, _)) = &j.deliver_to else {
                continue;
            };
            if rules.as_ref().and_then(|r| r.channel(channel)).is_none() {
                w.errors.push(format!(
                    "job `{}`: deliver_to.channel = \"{channel}\", but the gateway's profile `{}` \
                     may not send on it (the policy needs a [channels.{channel}], and \"{channel}\" \
                     in channels of [profiles.{}.broker])",
                    j.name, gw.profile, gw.profile
                ));
            }
        }
        for (name, c) in &cfg.channels {
            if c.settings.is_none() {
                continue;
            }
            if rules.as_ref().and_then(|r| r.channel(name)).is_none() {
                w.warnings.push(format!(
                    "the gateway's profile `{}` may not send on channel `{name}`: the agent \
                     cannot answer messages that come in on it",
                    gw.profile
                ));
            }
        }
    }
    check_workspaces(cfg, policy, &mut w);
    w
}

/// The granted workspaces against the policy's profiles and the gateway's `open` rules.
fn check_workspaces(cfg: &Config, policy: &Policy, w: &mut Wiring) {
    let known = policy.profile_names();
    for (name, ws) in &cfg.workspaces {
        for p in &ws.profiles {
            if !known.contains(&p.as_str()) {
                w.warnings.push(format!(
                    "workspace `{name}` is granted to profile `{p}`, which the policy does not have"
                ));
            }
        }
        let Some(gw) = cfg
            .gateway
            .as_ref()
            .filter(|g| ws.profiles.contains(&g.profile))
        else {
            continue;
        };
        let rules = policy.broker_view(&gw.profile);
        let covered = rules
            .as_ref()
            .is_some_and(|r| r.list_allowed(&ws.path).is_some());
        if !covered {
            w.warnings.push(format!(
                "the gateway's profile `{}` has no `open` rule for workspace `{name}` ({}): the \
                 file tools are refused there (tools still run in it)",
                gw.profile,
                ws.path.display()
            ));
        }
    }
}

/// The gateway's settings JSON `settings` with `broker_rate` set from the broker `rate` of
/// `profile` in `policy`: the very limit the broker puts on the gateway's identity (see
/// `broker_host::peer_limits`), read from the policy the gateway is started under, so that the
/// gateway can share it fairly among its clients and never send more than the broker accepts.
/// No rate in the profile: no `broker_rate`. Text that is not a JSON object is left as it is
/// (the gateway refuses it with its own error).
pub fn gateway_settings(settings: &str, policy: &Policy, profile: &str) -> String {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str(settings) else {
        return settings.to_string();
    };
    match policy.broker_view(profile).and_then(|b| b.rate) {
        Some(r) => {
            o.insert(
                "broker_rate".into(),
                serde_json::json!({
                    "requests_per_second": r.requests_per_second,
                    "burst": r.burst,
                }),
            );
        }
        None => {
            o.remove("broker_rate");
        }
    }
    serde_json::Value::Object(o).to_string()
}

#[cfg(test)]
mod tests;
