//! `[channels.NAME]` with a `kind`: the settings of a built-in channel adapter
//! (`carapace-channel`), validated here with located errors and handed to the adapter as the
//! JSON it reads from `$CARAPACE_CHANNEL_SETTINGS` (channels/src/settings.rs).
//!
//! The settings name secrets (policy `[secrets.NAME]`) and never hold one: the adapter asks the
//! broker for the value. Every service address is configurable so that tests (and self-hosted
//! services) can point at loopback; unencrypted transports (`http://`, `plain`) are accepted
//! only for loopback hosts, where nothing crosses a network.

use std::net::IpAddr;
use std::ops::Range;
use std::time::Duration;

use serde_json::{Map, Value};

use carapace_policy::toml_schema::Fields;
use carapace_policy::toml_schema::Kind::{Array, Bool, IntOrStr, Str};
use carapace_policy::Sink;

use super::document::{get_duration, get_str, Table, Val};

/// The built-in adapter kinds, each with its keys besides the child keys every channel has (the
/// schema of `[channels.NAME]` chooses them by the value of `kind`).
pub(super) const KINDS: &[(&str, Fields)] = &[
    (
        "telegram",
        &[
            ("api_base", Str),
            ("token_secret", Str),
            ("poll_timeout", IntOrStr),
        ],
    ),
    (
        "email",
        &[
            ("imap", Str),
            ("imap_security", Str),
            ("smtp", Str),
            ("smtp_security", Str),
            ("username", Str),
            ("password_secret", Str),
            ("from", Str),
            ("folder", Str),
            ("poll_interval", IntOrStr),
        ],
    ),
    (
        "webhook",
        &[
            ("listen", Str),
            ("allow_non_loopback", Bool),
            ("hmac_secret", Str),
            ("url", Str),
            ("path", Str),
        ],
    ),
    (
        "irc",
        &[
            ("server", Str),
            ("security", Str),
            ("nick", Str),
            ("username", Str),
            ("realname", Str),
            ("channels", Array(&Str)),
            ("password_secret", Str),
            ("sasl_username", Str),
            ("identity", Str),
            ("channel_messages", Str),
        ],
    ),
    (
        "signal",
        &[
            ("account", Str),
            ("request_timeout", IntOrStr),
            ("probe_interval", IntOrStr),
            ("daemon", DAEMON),
        ],
    ),
    (
        "slack",
        &[
            ("api_base", Str),
            ("app_token_secret", Str),
            ("bot_token_secret", Str),
        ],
    ),
    (
        "discord",
        &[
            ("api_base", Str),
            ("gateway_url", Str),
            ("token_secret", Str),
        ],
    ),
    (
        "matrix",
        &[
            ("homeserver", Str),
            ("token_secret", Str),
            ("invites_from", Array(&Str)),
            ("poll_timeout", IntOrStr),
        ],
    ),
];
const KIND_EXPECTED: &str = "one of \"telegram\", \"email\", \"webhook\", \"irc\", \"signal\", \"slack\", \"discord\", \"matrix\"";
const IRC_NAME_EXPECTED: &str =
    "an IRC nick or account name (no spaces, commas or control characters, not starting with `:` or `#`)";

/// `daemon = { ... }` of a Signal channel: signal-cli's JSON-RPC daemon, a child of its own.
const DAEMON: carapace_policy::toml_schema::Kind = carapace_policy::toml_schema::Kind::Table(&[
    ("program", Str),
    ("args", carapace_policy::toml_schema::Kind::Array(&Str)),
    ("profile", Str),
    ("workspace", Str),
]);
/// Where signal-cli is looked for when `daemon.program` is not given (the Debian package's).
pub(super) const SIGNAL_CLI_PROGRAM: &str = "/usr/bin/signal-cli";
/// The daemon's profile when `daemon.profile` is not given.
pub(super) const SIGNAL_CLI_PROFILE: &str = "signal-cli";
const NUMBER_EXPECTED: &str = "the account's phone number: + and its digits, e.g. \"+15551234567\"";

/// The program that runs the built-in kinds: next to the carapace executable, else in
/// `/usr/libexec/carapace` (where the package installs it).
pub(super) const ADAPTER_PROGRAM: &str = "carapace-channel";

const SECRET_EXPECTED: &str = "the name of a [secrets.NAME] of the policy";
const HOSTPORT_EXPECTED: &str = "a host and port such as \"imap.example.com:993\"";
const SECURITY_EXPECTED: &str =
    "\"tls\" (implicit TLS), \"starttls\", or \"plain\" (loopback hosts only)";
const ADDRESS_EXPECTED: &str = "an e-mail address such as \"agent@example.com\"";
const WS_URL_EXPECTED: &str =
    "a wss:// URL, or ws:// to a loopback host, e.g. \"wss://gateway.discord.gg\"";
const URL_EXPECTED: &str =
    "an https:// URL, or http:// to a loopback host, e.g. \"https://api.telegram.org\"";

const INVITES_EXPECTED: &str =
    "MXID globs such as \"@alice:example.org\" or \"*:example.org\" (whose invites the bot accepts)";

/// `kind` of a channel table, checked; None when absent or wrong (the error is reported).
pub(super) fn kind_of<'t>(cx: &mut Sink<'_>, t: &'t Table) -> Option<&'t str> {
    let (k, e) = get_str(t, "kind")?;
    if KINDS.iter().any(|(name, _)| *name == k) {
        Some(k)
    } else {
        cx.err(
            &e.node.span,
            format!("unknown channel kind {k:?}"),
            KIND_EXPECTED,
        );
        None
    }
}

/// Whether `host` (a name or an IP literal, brackets allowed) is loopback.
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Splits `host:port` (IPv6 in brackets); the reason when it is not one.
pub(super) fn split_host_port(s: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = s.rsplit_once(':').ok_or("no `:port`")?;
    let port: u16 = port.parse().map_err(|_| "the port is not a number")?;
    if port == 0 {
        return Err("port 0");
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty()
        || bare.len() > 253
        || bare
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return Err("not a host name or address");
    }
    if host.starts_with('[') != host.ends_with(']') {
        return Err("unbalanced brackets");
    }
    Ok((host, port))
}

/// Splits an `http(s)://HOST[:PORT][/PATH]` URL into (https, host, port, path); the reason when
/// it is not one the adapters can use.
pub(super) fn split_url(url: &str) -> Result<(bool, &str, u16, &str), &'static str> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("not an http:// or https:// URL");
    };
    if url.contains(['?', '#', ' ', '\\']) || url.chars().any(char::is_control) {
        return Err("a query, fragment, space or control character");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("credentials in the URL (name a secret instead)");
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        (authority, default_port)
    } else {
        split_host_port(authority)?
    };
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .is_empty()
    {
        return Err("no host");
    }
    Ok((https, host, port, path))
}

fn secret_name(
    cx: &mut Sink<'_>,
    t: &Table,
    (anchor, what): (&Range<usize>, &str),
    key: &str,
    out: &mut Map<String, Value>,
) {
    match get_str(t, key) {
        Some((s, e)) => {
            if s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                cx.err(
                    &e.node.span,
                    format!("`{key}` = {s:?} is not a secret name"),
                    SECRET_EXPECTED,
                );
            }
            out.insert(key.into(), s.into());
        }
        None if t.get(key).is_none() => {
            missing(cx, anchor, what, key, SECRET_EXPECTED);
        }
        None => {}
    }
}

/// A required key that is absent, reported at the table's name.
fn missing(cx: &mut Sink<'_>, anchor: &Range<usize>, what: &str, key: &str, expected: &str) {
    cx.err(anchor, format!("{what} has no `{key}`"), expected);
}

fn millis(d: Duration) -> Value {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).into()
}

/// A URL key: https, or http to a loopback host.
fn url(cx: &mut Sink<'_>, t: &Table, key: &str, out: &mut Map<String, Value>) -> bool {
    let Some((s, e)) = get_str(t, key) else {
        return false;
    };
    match split_url(s) {
        Err(why) => cx.err(
            &e.node.span,
            format!("`{key}` = {s:?}: {why}"),
            URL_EXPECTED,
        ),
        Ok((false, host, _, _)) if !is_loopback_host(host) => cx.err(
            &e.node.span,
            format!(
                "`{key}` = {s:?}: plain http to a host that is not loopback would send the \
                 credential and the messages unencrypted"
            ),
            URL_EXPECTED,
        ),
        Ok(_) => {
            out.insert(key.into(), s.trim_end_matches('/').into());
            return true;
        }
    }
    false
}

/// A WebSocket URL key: wss, or ws to a loopback host (checked as the https/http URL it
/// connects like).
fn ws_url(cx: &mut Sink<'_>, t: &Table, key: &str, out: &mut Map<String, Value>) {
    let Some((s, e)) = get_str(t, key) else {
        return;
    };
    let as_http = if let Some(r) = s.strip_prefix("wss://") {
        format!("https://{r}")
    } else if let Some(r) = s.strip_prefix("ws://") {
        format!("http://{r}")
    } else {
        cx.err(
            &e.node.span,
            format!("`{key}` = {s:?}: not a wss:// or ws:// URL"),
            WS_URL_EXPECTED,
        );
        return;
    };
    match split_url(&as_http) {
        Err(why) => cx.err(
            &e.node.span,
            format!("`{key}` = {s:?}: {why}"),
            WS_URL_EXPECTED,
        ),
        Ok((false, host, _, _)) if !is_loopback_host(host) => cx.err(
            &e.node.span,
            format!(
                "`{key}` = {s:?}: plain ws to a host that is not loopback would send the \
                 credential and the messages unencrypted"
            ),
            WS_URL_EXPECTED,
        ),
        Ok(_) => {
            out.insert(key.into(), s.trim_end_matches('/').into());
        }
    }
}

/// A `host:port` key and its `*_security` companion.
fn server(
    cx: &mut Sink<'_>,
    t: &Table,
    (anchor, what): (&Range<usize>, &str),
    key: &str,
    security_key: &str,
    default_security: &str,
    out: &mut Map<String, Value>,
) {
    let host = match get_str(t, key) {
        Some((s, e)) => match split_host_port(s) {
            Ok((h, _)) => {
                out.insert(key.into(), s.into());
                Some(h.to_string())
            }
            Err(why) => {
                cx.err(
                    &e.node.span,
                    format!("`{key}` = {s:?}: {why}"),
                    HOSTPORT_EXPECTED,
                );
                None
            }
        },
        None => {
            if t.get(key).is_none() {
                missing(cx, anchor, what, key, HOSTPORT_EXPECTED);
            }
            None
        }
    };
    let security = match get_str(t, security_key) {
        Some((s @ ("tls" | "starttls" | "plain"), e)) => Some((s, Some(e))),
        Some((s, e)) => {
            cx.err(
                &e.node.span,
                format!("`{security_key}` = {s:?} is not a transport security"),
                SECURITY_EXPECTED,
            );
            None
        }
        None => Some((default_security, None)),
    };
    if let Some((sec, entry)) = security {
        if sec == "plain" && host.as_deref().is_some_and(|h| !is_loopback_host(h)) {
            let span = entry.map_or_else(|| anchor.clone(), |e| e.node.span.clone());
            cx.err(
                &span,
                format!(
                    "`{security_key}` = \"plain\" for `{key}`, which is not a loopback host: \
                     the password and the mail would cross the network unencrypted"
                ),
                SECURITY_EXPECTED,
            );
        }
        out.insert(security_key.into(), sec.into());
    }
}

/// The settings JSON of a built-in `kind` (the child's keys are checked by the caller). The
/// webhook's `listen` is read by the caller too (the supervisor binds it).
pub(super) fn settings(
    cx: &mut Sink<'_>,
    t: &Table,
    (anchor, what): (&Range<usize>, &str),
    name: &str,
    kind: &str,
) -> Value {
    let at = (anchor, what);
    let mut out = Map::new();
    out.insert("channel".into(), name.into());
    out.insert("state_dir".into(), "/workspace".into());
    out.insert("kind".into(), kind.into());
    match kind {
        "telegram" => {
            if t.get("api_base").is_some() {
                url(cx, t, "api_base", &mut out);
            }
            secret_name(cx, t, at, "token_secret", &mut out);
            let d = get_duration(cx, t, "poll_timeout", Duration::from_secs(30));
            if d > Duration::from_secs(50) {
                if let Some(e) = t.get("poll_timeout") {
                    cx.err(
                        &e.node.span,
                        "`poll_timeout` is longer than 50s (Telegram answers long polls within 50 s)",
                        "a duration from 1s to 50s",
                    );
                }
            }
            out.insert("poll_timeout_ms".into(), millis(d));
        }
        "email" => {
            server(cx, t, at, "imap", "imap_security", "tls", &mut out);
            server(cx, t, at, "smtp", "smtp_security", "starttls", &mut out);
            match get_str(t, "username") {
                Some(("", e)) => cx.err(
                    &e.node.span,
                    "`username` is empty",
                    "the account's login name",
                ),
                Some((s, _)) => {
                    out.insert("username".into(), s.into());
                }
                None if t.get("username").is_none() => {
                    missing(cx, anchor, what, "username", "the account's login name");
                }
                None => {}
            }
            secret_name(cx, t, at, "password_secret", &mut out);
            match get_str(t, "from") {
                Some((s, e)) => {
                    let ok = s.split_once('@').is_some_and(|(l, d)| {
                        !l.is_empty()
                            && !d.is_empty()
                            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
                            && !s.contains(['<', '>', ',', '"'])
                    });
                    if !ok {
                        cx.err(
                            &e.node.span,
                            format!("`from` = {s:?} is not an address"),
                            ADDRESS_EXPECTED,
                        );
                    }
                    out.insert("from".into(), s.into());
                }
                None if t.get("from").is_none() => {
                    missing(cx, anchor, what, "from", ADDRESS_EXPECTED)
                }
                None => {}
            }
            match get_str(t, "folder") {
                Some((s, e)) if s.is_empty() || s.chars().any(char::is_control) => cx.err(
                    &e.node.span,
                    format!("`folder` = {s:?} is not a mailbox name"),
                    "a mailbox name such as \"INBOX\"",
                ),
                Some((s, _)) => {
                    out.insert("folder".into(), s.into());
                }
                None => {}
            }
            let d = get_duration(cx, t, "poll_interval", Duration::from_secs(60));
            out.insert("poll_interval_ms".into(), millis(d));
        }
        "slack" => {
            if t.get("api_base").is_some() {
                url(cx, t, "api_base", &mut out);
            }
            secret_name(cx, t, at, "app_token_secret", &mut out);
            secret_name(cx, t, at, "bot_token_secret", &mut out);
        }
        "discord" => {
            if t.get("api_base").is_some() {
                url(cx, t, "api_base", &mut out);
            }
            ws_url(cx, t, "gateway_url", &mut out);
            secret_name(cx, t, at, "token_secret", &mut out);
        }
        "webhook" => {
            secret_name(cx, t, at, "hmac_secret", &mut out);
            if t.get("url").is_some() {
                url(cx, t, "url", &mut out);
            }
            if let Some((p, e)) = get_str(t, "path") {
                if !p.starts_with('/')
                    || p.len() > 256
                    || p.chars()
                        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '?' | '#'))
                {
                    cx.err(
                        &e.node.span,
                        format!("`path` = {p:?} is not a URL path"),
                        "an absolute URL path such as \"/hook\"",
                    );
                }
                out.insert("path".into(), p.into());
            }
        }
        "irc" => irc(cx, t, at, &mut out),
        "signal" => {
            match get_str(t, "account") {
                Some((s, e)) => {
                    if !is_signal_number(s) {
                        cx.err(
                            &e.node.span,
                            format!("`account` = {s:?} is not a phone number"),
                            NUMBER_EXPECTED,
                        );
                    }
                    out.insert("account".into(), s.into());
                }
                None if t.get("account").is_none() => {
                    missing(cx, anchor, what, "account", NUMBER_EXPECTED)
                }
                None => {}
            }
            let d = get_duration(cx, t, "request_timeout", Duration::from_secs(60));
            if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
                if let Some(e) = t.get("request_timeout") {
                    cx.err(
                        &e.node.span,
                        "`request_timeout` is out of range",
                        "a duration from 1s to 10min",
                    );
                }
            }
            out.insert("request_timeout_ms".into(), millis(d));
            let d = get_duration(cx, t, "probe_interval", Duration::from_secs(30));
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                if let Some(e) = t.get("probe_interval") {
                    cx.err(
                        &e.node.span,
                        "`probe_interval` is out of range",
                        "a duration from 100ms to 1h",
                    );
                }
            }
            out.insert("probe_interval_ms".into(), millis(d));
        }
        "matrix" => {
            match t.get("homeserver") {
                Some(_) => {
                    url(cx, t, "homeserver", &mut out);
                }
                None => missing(
                    cx,
                    anchor,
                    what,
                    "homeserver",
                    "the homeserver's URL, e.g. \"https://matrix.example.org\"",
                ),
            }
            secret_name(cx, t, at, "token_secret", &mut out);
            let mut globs = Vec::new();
            if let Some(Val::Array(items)) = t.get("invites_from").map(|e| &e.node.val) {
                for n in items {
                    let Val::Str(p) = &n.val else { continue };
                    if let Err(e) = globset::Glob::new(p) {
                        cx.err(
                            &n.span,
                            format!("`invites_from`: {p:?} is not a glob: {e}"),
                            INVITES_EXPECTED,
                        );
                    } else if p.is_empty() || p.len() > 256 || p.chars().any(char::is_control) {
                        cx.err(
                            &n.span,
                            format!("`invites_from`: {p:?} is not an MXID pattern"),
                            INVITES_EXPECTED,
                        );
                    }
                    globs.push(Value::from(p.as_str()));
                }
            }
            out.insert("invites_from".into(), Value::Array(globs));
            let d = get_duration(cx, t, "poll_timeout", Duration::from_secs(30));
            if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
                if let Some(e) = t.get("poll_timeout") {
                    cx.err(
                        &e.node.span,
                        "`poll_timeout` is out of range",
                        "a duration from 1s to 5m",
                    );
                }
            }
            out.insert("poll_timeout_ms".into(), millis(d));
        }
        _ => {}
    }
    Value::Object(out)
}

/// Whether `s` can be an IRC nick, user or account name (what the adapter sends in commands).
fn is_irc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with([':', '#', '&', '+', '!'])
        && !s.chars().any(|c| c.is_control() || c == ' ' || c == ',')
}

/// The keys of `kind = "irc"`.
fn irc(cx: &mut Sink<'_>, t: &Table, at: (&Range<usize>, &str), out: &mut Map<String, Value>) {
    let (anchor, what) = at;
    const SERVER_EXPECTED: &str = "a host and port such as \"irc.libera.chat:6697\"";
    const IRC_SECURITY_EXPECTED: &str =
        "\"tls\" (TLS from the first byte), or \"plain\" (loopback hosts only)";
    let host = match get_str(t, "server") {
        Some((s, e)) => match split_host_port(s) {
            Ok((h, _)) => {
                out.insert("server".into(), s.into());
                Some(h.to_string())
            }
            Err(why) => {
                cx.err(
                    &e.node.span,
                    format!("`server` = {s:?}: {why}"),
                    SERVER_EXPECTED,
                );
                None
            }
        },
        None => {
            if t.get("server").is_none() {
                missing(cx, anchor, what, "server", SERVER_EXPECTED);
            }
            None
        }
    };
    match get_str(t, "security") {
        Some((s @ ("tls" | "plain"), e)) => {
            if s == "plain" && host.as_deref().is_some_and(|h| !is_loopback_host(h)) {
                cx.err(
                    &e.node.span,
                    "`security` = \"plain\" to a server that is not a loopback host: the \
                     password and the messages would cross the network unencrypted",
                    IRC_SECURITY_EXPECTED,
                );
            }
            out.insert("security".into(), s.into());
        }
        Some((s, e)) => cx.err(
            &e.node.span,
            format!("`security` = {s:?} is not a transport security for IRC"),
            IRC_SECURITY_EXPECTED,
        ),
        None => {
            out.insert("security".into(), "tls".into());
        }
    }
    for (key, required) in [
        ("nick", true),
        ("username", false),
        ("sasl_username", false),
    ] {
        match get_str(t, key) {
            Some((s, e)) => {
                if !is_irc_name(s) {
                    cx.err(
                        &e.node.span,
                        format!("`{key}` = {s:?} is not an IRC name"),
                        IRC_NAME_EXPECTED,
                    );
                }
                out.insert(key.into(), s.into());
            }
            None if required && t.get(key).is_none() => {
                missing(cx, anchor, what, key, IRC_NAME_EXPECTED);
            }
            None => {}
        }
    }
    if let Some((s, e)) = get_str(t, "realname") {
        if s.is_empty() || s.len() > 100 || s.chars().any(char::is_control) {
            cx.err(
                &e.node.span,
                "`realname` is not 1 to 100 printable characters",
                "a short description such as \"carapace agent\"",
            );
        }
        out.insert("realname".into(), s.into());
    }
    if let Some(e) = t.get("channels") {
        if let Val::Array(items) = &e.node.val {
            let mut names = Vec::new();
            for n in items {
                if let Val::Str(c) = &n.val {
                    let ok = c.starts_with(['#', '&', '+', '!'])
                        && c.len() > 1
                        && c.len() <= 64
                        && !c
                            .chars()
                            .any(|ch| ch.is_control() || ch == ' ' || ch == ',');
                    if !ok {
                        cx.err(
                            &n.span,
                            format!("{c:?} is not an IRC channel name"),
                            "a channel such as \"#carapace\"",
                        );
                    }
                    names.push(Value::from(c.as_str()));
                }
            }
            out.insert("channels".into(), Value::Array(names));
        }
    }
    if t.get("password_secret").is_some() {
        secret_name(cx, t, at, "password_secret", out);
    }
    for (key, allowed, expected) in [
        (
            "identity",
            &["nick", "account"][..],
            "\"nick\" or \"account\" (the services account the server tags messages with)",
        ),
        (
            "channel_messages",
            &["mentions", "all"][..],
            "\"mentions\" (only `nick: text`) or \"all\"",
        ),
    ] {
        if let Some((s, e)) = get_str(t, key) {
            if allowed.contains(&s) {
                out.insert(key.into(), s.into());
            } else {
                cx.err(
                    &e.node.span,
                    format!("`{key}` = {s:?} is not a choice"),
                    expected,
                );
            }
        }
    }
}

/// `+` and 6 to 15 digits (E.164), as signal-cli names accounts.
pub(crate) fn is_signal_number(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| {
        (6..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

/// The name of the Signal channel `channel`'s daemon child.
pub(crate) fn daemon_name(channel: &str) -> String {
    format!("{channel}-signal-cli")
}

/// The daemon child of Signal channel `channel` (table `t`): signal-cli in JSON-RPC mode on
/// its stdin and stdout (the supervisor's socket pair with the adapter), confined under its own
/// profile with its own workspace, which holds the account's data (`--config /workspace`).
pub(super) fn daemon(
    cx: &mut Sink<'_>,
    t: &Table,
    channel: &str,
    state_dir: &std::path::Path,
) -> super::ChildConfig {
    let empty = Table::default();
    let d = super::document::get_table(t, "daemon").unwrap_or(&empty);
    let program = match get_str(d, "program") {
        Some((s, e)) => {
            if let Err(why) = carapace_policy::check_abs_path(s) {
                cx.err(
                    &e.node.span,
                    format!("`daemon.program` = {s:?}: {why}"),
                    "the absolute path of signal-cli, e.g. \"/usr/bin/signal-cli\"",
                );
            }
            s.to_string()
        }
        None => SIGNAL_CLI_PROGRAM.to_string(),
    };
    let account = get_str(t, "account").map_or("", |(s, _)| s);
    let args = match d.get("args").map(|e| &e.node.val) {
        Some(super::document::Val::Array(items)) => items
            .iter()
            .filter_map(|n| match &n.val {
                super::document::Val::Str(s) if !s.contains('\0') => Some(s.clone()),
                _ => {
                    cx.err(
                        &n.span,
                        "an argument that is not a string without NUL",
                        "a string",
                    );
                    None
                }
            })
            .collect(),
        _ => ["--config", "/workspace", "-a", account, "jsonRpc"]
            .map(String::from)
            .to_vec(),
    };
    let profile = match get_str(d, "profile") {
        Some((s, e)) => {
            if s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                cx.err(
                    &e.node.span,
                    format!("`daemon.profile` = {s:?} is not a profile name"),
                    "the name of a profile of the policy",
                );
            }
            s.to_string()
        }
        None => SIGNAL_CLI_PROFILE.to_string(),
    };
    let name = daemon_name(channel);
    let workspace = super::document::get_path(cx, d, "workspace")
        .unwrap_or_else(|| state_dir.join("signal-cli").join(channel));
    super::ChildConfig {
        name,
        is_gateway: false,
        program,
        args,
        profile,
        listen: None,
        allow_non_loopback: false,
        workspace,
        restart: super::RestartConfig::default(),
        environment: Default::default(),
        settings: None,
        serves: Some(channel.to_string()),
    }
}
