//! An adapter's settings: JSON in `$CARAPACE_CHANNEL_SETTINGS`, written by the supervisor from
//! the `[channels.NAME]` table of `carapace.toml`:
//!
//! ```json
//! {"channel": "tg", "state_dir": "/workspace", "kind": "telegram",
//!  "api_base": "https://api.telegram.org", "token_secret": "telegram_token", "poll_timeout_ms": 30000}
//! ```
//!
//! `channel` and `state_dir` are common; `kind` picks the adapter and the other keys are that
//! kind's ([`KindSettings`]). Unknown keys are refused. The settings carry no credential: they
//! name a policy `[secrets.NAME]` that the adapter reads through the broker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The environment variable the supervisor sets.
pub const SETTINGS_ENV: &str = "CARAPACE_CHANNEL_SETTINGS";

/// Longest channel name.
const MAX_CHANNEL_NAME: usize = 64;

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{SETTINGS_ENV} is not set (run me under `carapace run`)")]
    Missing,
    #[error("{SETTINGS_ENV}: not valid settings JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{SETTINGS_ENV}: {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field,
        why: why.into(),
    }
}

/// Everything an adapter is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The channel's one name (`[channels.NAME]` in the policy and in carapace.toml).
    pub channel: String,
    /// Its only writable place (the sandbox's workspace): cursors live there.
    pub state_dir: PathBuf,
    /// The adapter and its own keys.
    pub kind: KindSettings,
}

/// The adapter kinds, tagged by `"kind"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KindSettings {
    Telegram(TelegramSettings),
    Email(EmailSettings),
    Webhook(WebhookSettings),
    Irc(IrcSettings),
    Signal(SignalSettings),
    Slack(SlackSettings),
    Discord(DiscordSettings),
    Matrix(MatrixSettings),
}

impl KindSettings {
    /// The wire name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            KindSettings::Telegram(_) => "telegram",
            KindSettings::Email(_) => "email",
            KindSettings::Webhook(_) => "webhook",
            KindSettings::Irc(_) => "irc",
            KindSettings::Signal(_) => "signal",
            KindSettings::Slack(_) => "slack",
            KindSettings::Discord(_) => "discord",
            KindSettings::Matrix(_) => "matrix",
        }
    }
}

/// `kind = "telegram"`: the Bot API, long-polling `getUpdates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramSettings {
    /// `https://api.telegram.org` unless told (tests: `http://127.0.0.1:PORT`).
    #[serde(default = "default_telegram_api")]
    pub api_base: String,
    /// The policy secret holding the bot token.
    pub token_secret: String,
    /// How long one `getUpdates` waits on the server for an update.
    #[serde(default = "default_poll_timeout_ms")]
    pub poll_timeout_ms: u64,
}

fn default_telegram_api() -> String {
    "https://api.telegram.org".into()
}

fn default_poll_timeout_ms() -> u64 {
    30_000
}

/// `kind = "discord"`: the Gateway (WebSocket) in, REST out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordSettings {
    /// The REST API: `https://discord.com/api/v10` unless told (tests: `http://127.0.0.1:PORT/api/v10`).
    #[serde(default = "default_discord_api")]
    pub api_base: String,
    /// The Gateway: `wss://gateway.discord.gg` unless told (tests: `ws://127.0.0.1:PORT`).
    #[serde(default = "default_discord_gateway")]
    pub gateway_url: String,
    /// The policy secret holding the bot token.
    pub token_secret: String,
}

fn default_discord_api() -> String {
    "https://discord.com/api/v10".into()
}

fn default_discord_gateway() -> String {
    "wss://gateway.discord.gg".into()
}

/// How a mail connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// TLS from the first byte.
    Tls,
    /// Plain, upgraded with STARTTLS before anything else is said.
    Starttls,
    /// No TLS (loopback hosts only; the supervisor checks).
    Plain,
}

/// `kind = "email"`: IMAP in, SMTP out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// `host:port` of the IMAP server.
    pub imap: String,
    pub imap_security: Security,
    /// `host:port` of the SMTP submission server.
    pub smtp: String,
    pub smtp_security: Security,
    pub username: String,
    /// The policy secret holding the password.
    pub password_secret: String,
    /// The address mail is sent from.
    pub from: String,
    #[serde(default = "default_folder")]
    pub folder: String,
    /// How often to look for mail when the server offers no IDLE.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

fn default_folder() -> String {
    "INBOX".into()
}

fn default_poll_interval_ms() -> u64 {
    60_000
}

/// `kind = "webhook"`: signed HTTP POSTs in (on the listening socket at fd 4), and out to `url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The policy secret holding the HMAC-SHA256 key (both directions).
    pub hmac_secret: String,
    /// Where outbound messages are POSTed; None: the channel only receives.
    #[serde(default)]
    pub url: Option<String>,
    /// The path inbound POSTs go to.
    #[serde(default = "default_hook_path")]
    pub path: String,
}

fn default_hook_path() -> String {
    "/hook".into()
}

/// `kind = "irc"`: one IRC client connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcSettings {
    /// `host:port` of the IRC server.
    pub server: String,
    /// `tls`, or `plain` (loopback only).
    #[serde(default = "default_irc_security")]
    pub security: Security,
    pub nick: String,
    /// The USER name (the nick unless told).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default = "default_realname")]
    pub realname: String,
    /// Channels joined after registration.
    #[serde(default)]
    pub channels: Vec<String>,
    /// The policy secret holding the SASL PLAIN password; None: no SASL.
    #[serde(default)]
    pub password_secret: Option<String>,
    /// The SASL account (the nick unless told).
    #[serde(default)]
    pub sasl_username: Option<String>,
    #[serde(default = "default_identity")]
    pub identity: crate::irc::Identity,
    #[serde(default = "default_channel_messages")]
    pub channel_messages: crate::irc::ChannelMessages,
}

fn default_irc_security() -> Security {
    Security::Tls
}

fn default_realname() -> String {
    "carapace".into()
}

fn default_identity() -> crate::irc::Identity {
    crate::irc::Identity::Nick
}

fn default_channel_messages() -> crate::irc::ChannelMessages {
    crate::irc::ChannelMessages::Mentions
}

/// `kind = "signal"`: signal-cli's JSON-RPC daemon on the socket at fd 4 (the supervisor
/// starts the daemon and hands both of them an end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalSettings {
    /// The account's number (`+` and digits), as linked in the daemon's workspace.
    pub account: String,
    /// How long a request to the daemon may take (a `send` waits for Signal's servers).
    #[serde(default = "default_signal_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How often the daemon is asked whether it is up (`version`).
    #[serde(default = "default_signal_probe_interval_ms")]
    pub probe_interval_ms: u64,
}

fn default_signal_request_timeout_ms() -> u64 {
    60_000
}

fn default_signal_probe_interval_ms() -> u64 {
    30_000
}

/// Whether `s` is a phone number as Signal writes it: `+` and 6 to 15 digits.
pub fn is_signal_number(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| {
        (6..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

/// `kind = "slack"`: Socket Mode in, the Web API out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSettings {
    /// The Web API's base, `https://slack.com/api` unless told (tests: `http://127.0.0.1:PORT/api`).
    #[serde(default = "default_slack_api")]
    pub api_base: String,
    /// The policy secret holding the app-level token (`xapp-…`, scope `connections:write`).
    pub app_token_secret: String,
    /// The policy secret holding the bot token (`xoxb-…`).
    pub bot_token_secret: String,
}

fn default_slack_api() -> String {
    "https://slack.com/api".into()
}

/// `kind = "matrix"`: a homeserver's client-server API, long-polling `/sync`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixSettings {
    /// The homeserver's base URL (`https://matrix.example.org`; tests: `http://127.0.0.1:PORT`).
    pub homeserver: String,
    /// The policy secret holding the bot user's access token.
    pub token_secret: String,
    /// Globs of the MXIDs whose invites the bot accepts; any other invite is left pending.
    #[serde(default)]
    pub invites_from: Vec<String>,
    /// How long one `/sync` waits on the server for an event.
    #[serde(default = "default_poll_timeout_ms")]
    pub poll_timeout_ms: u64,
}

impl Settings {
    /// From `$CARAPACE_CHANNEL_SETTINGS`.
    pub fn from_env() -> Result<Settings, SettingsError> {
        let text = std::env::var(SETTINGS_ENV).map_err(|_| SettingsError::Missing)?;
        Settings::from_json(&text)
    }

    /// Parse and check settings text.
    pub fn from_json(text: &str) -> Result<Settings, SettingsError> {
        let mut v: Value = serde_json::from_str(text).map_err(SettingsError::Json)?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| invalid("(top)", "expected a JSON object"))?;
        let channel = match obj.remove("channel") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(invalid("channel", "expected a string")),
            None => return Err(invalid("channel", "missing")),
        };
        let state_dir = match obj.remove("state_dir") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(invalid("state_dir", "expected a string")),
            None => "/workspace".to_string(),
        };
        let kind: KindSettings = serde_json::from_value(v).map_err(SettingsError::Json)?;
        let s = Settings {
            channel,
            state_dir: PathBuf::from(state_dir),
            kind,
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), SettingsError> {
        if self.channel.is_empty()
            || self.channel.len() > MAX_CHANNEL_NAME
            || !self
                .channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "channel",
                format!(
                    "{:?}: 1..={MAX_CHANNEL_NAME} of A-Z a-z 0-9 _ -",
                    shown(&self.channel)
                ),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        let secret = |field: &'static str, name: &str| {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                Err(invalid(field, "a policy secret name (1..=128 characters)"))
            } else {
                Ok(())
            }
        };
        match &self.kind {
            KindSettings::Telegram(t) => {
                secret("token_secret", &t.token_secret)?;
                crate::net::ServiceUrl::parse(&t.api_base)
                    .map_err(|e| invalid("api_base", e.to_string()))?;
                if !(1_000..=50_000).contains(&t.poll_timeout_ms) {
                    return Err(invalid("poll_timeout_ms", "1000..=50000"));
                }
            }
            KindSettings::Email(e) => {
                secret("password_secret", &e.password_secret)?;
                if e.poll_interval_ms < 1_000 {
                    return Err(invalid("poll_interval_ms", "at least 1000"));
                }
            }
            KindSettings::Signal(g) => {
                if !is_signal_number(&g.account) {
                    return Err(invalid("account", "a phone number: + and 6..=15 digits"));
                }
                if !(1_000..=600_000).contains(&g.request_timeout_ms) {
                    return Err(invalid("request_timeout_ms", "1000..=600000"));
                }
                if !(100..=3_600_000).contains(&g.probe_interval_ms) {
                    return Err(invalid("probe_interval_ms", "100..=3600000"));
                }
            }
            KindSettings::Slack(sl) => {
                secret("app_token_secret", &sl.app_token_secret)?;
                secret("bot_token_secret", &sl.bot_token_secret)?;
                crate::net::ServiceUrl::parse(&sl.api_base)
                    .map_err(|e| invalid("api_base", e.to_string()))?;
            }
            KindSettings::Discord(d) => {
                secret("token_secret", &d.token_secret)?;
                crate::net::ServiceUrl::parse(&d.api_base)
                    .map_err(|e| invalid("api_base", e.to_string()))?;
                crate::discord::GatewayUrl::parse(&d.gateway_url)
                    .map_err(|e| invalid("gateway_url", e.to_string()))?;
            }
            KindSettings::Matrix(m) => {
                secret("token_secret", &m.token_secret)?;
                crate::net::ServiceUrl::parse(&m.homeserver)
                    .map_err(|e| invalid("homeserver", e.to_string()))?;
                if !(1_000..=300_000).contains(&m.poll_timeout_ms) {
                    return Err(invalid("poll_timeout_ms", "1000..=300000"));
                }
                if m.invites_from.len() > 256 {
                    return Err(invalid("invites_from", "at most 256 patterns"));
                }
                for p in &m.invites_from {
                    if p.is_empty() || p.len() > 256 || p.chars().any(char::is_control) {
                        return Err(invalid(
                            "invites_from",
                            "each pattern: 1..=256 characters, no control characters",
                        ));
                    }
                    globset::Glob::new(p)
                        .map_err(|e| invalid("invites_from", format!("{:?}: {e}", shown(p))))?;
                }
            }
            KindSettings::Webhook(w) => {
                secret("hmac_secret", &w.hmac_secret)?;
                if let Some(url) = &w.url {
                    crate::net::ServiceUrl::parse(url)
                        .map_err(|e| invalid("url", e.to_string()))?;
                }
                if !w.path.starts_with('/')
                    || w.path.len() > 256
                    || !w.path.bytes().all(|b| b.is_ascii_graphic())
                    || w.path.contains(['?', '#'])
                {
                    return Err(invalid(
                        "path",
                        "an absolute URL path (printable ASCII, no query)",
                    ));
                }
            }
            KindSettings::Irc(i) => {
                if let Some(p) = &i.password_secret {
                    secret("password_secret", p)?;
                }
                let (host, _) = crate::email::host_port("server", &i.server)
                    .map_err(|e| invalid("server", e.to_string()))?;
                match i.security {
                    Security::Tls => {}
                    Security::Starttls => {
                        return Err(invalid(
                            "security",
                            "\"tls\" or \"plain\" (IRC has no STARTTLS here)",
                        ))
                    }
                    Security::Plain if !crate::net::is_loopback(&host) => {
                        return Err(invalid("security", "\"plain\" only to a loopback server"))
                    }
                    Security::Plain => {}
                }
                let word = |field: &'static str, v: &str| {
                    if crate::irc::proto::is_word(v) && !crate::irc::proto::is_channel(v) {
                        Ok(())
                    } else {
                        Err(invalid(field, format!("{:?} is not an IRC name", shown(v))))
                    }
                };
                word("nick", &i.nick)?;
                if let Some(u) = &i.username {
                    word("username", u)?;
                }
                if let Some(u) = &i.sasl_username {
                    word("sasl_username", u)?;
                }
                if i.realname.is_empty()
                    || i.realname.len() > 100
                    || i.realname.chars().any(char::is_control)
                {
                    return Err(invalid("realname", "1..=100 printable characters"));
                }
                for c in &i.channels {
                    if !crate::irc::proto::is_word(c) || !crate::irc::proto::is_channel(c) {
                        return Err(invalid(
                            "channels",
                            format!("{:?} is not a channel name (#name)", shown(c)),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A bounded, printable rendering of outside text for messages.
pub fn shown(s: &str) -> String {
    carapace_gateway::rpc::shown(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telegram_with_defaults() {
        let s = Settings::from_json(
            r#"{"channel":"tg","state_dir":"/ws","kind":"telegram","token_secret":"bot"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.channel, "tg");
        assert_eq!(s.state_dir, PathBuf::from("/ws"));
        assert_eq!(
            s.kind,
            KindSettings::Telegram(TelegramSettings {
                api_base: "https://api.telegram.org".into(),
                token_secret: "bot".into(),
                poll_timeout_ms: 30_000,
            })
        );
        assert_eq!(s.kind.name(), "telegram");
    }

    #[test]
    fn webhook_and_email() {
        let s = Settings::from_json(
            r#"{"channel":"hook","kind":"webhook","hmac_secret":"k","url":"https://example.com/in"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.state_dir, PathBuf::from("/workspace"));
        let KindSettings::Webhook(w) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!(w.path, "/hook");
        assert_eq!(w.url.as_deref(), Some("https://example.com/in"));
        let s = Settings::from_json(
            r#"{"channel":"mail","kind":"email","imap":"imap.example.com:993","imap_security":"tls",
                "smtp":"smtp.example.com:465","smtp_security":"starttls","username":"bot",
                "password_secret":"mailpw","from":"bot@example.com"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let KindSettings::Email(e) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!((e.folder.as_str(), e.poll_interval_ms), ("INBOX", 60_000));
        assert_eq!(e.smtp_security, Security::Starttls);
    }

    #[test]
    fn irc_with_defaults_and_refusals() {
        let s = Settings::from_json(
            r##"{"channel":"irc","kind":"irc","server":"irc.libera.chat:6697","nick":"bot","channels":["#room"]}"##,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let KindSettings::Irc(i) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!(i.security, Security::Tls);
        assert_eq!(i.identity, crate::irc::Identity::Nick);
        assert_eq!(i.channel_messages, crate::irc::ChannelMessages::Mentions);
        assert_eq!(
            (i.realname.as_str(), i.password_secret.as_deref()),
            ("carapace", None)
        );
        assert_eq!(s.kind.name(), "irc");
        for bad in [
            r#"{"channel":"i","kind":"irc","nick":"bot"}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697"}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"a b"}"#,
            r##"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"#bot"}"##,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"b","security":"plain"}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"b","security":"starttls"}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"b","channels":["room"]}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"b","identity":"x"}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example:6697","nick":"b","password_secret":""}"#,
            r#"{"channel":"i","kind":"irc","server":"irc.example","nick":"b"}"#,
        ] {
            assert!(Settings::from_json(bad).is_err(), "{bad}");
        }
        assert!(Settings::from_json(
            r#"{"channel":"i","kind":"irc","server":"127.0.0.1:6667","nick":"b","security":"plain"}"#
        )
        .is_ok());
    }

    #[test]
    fn discord_with_defaults() {
        let s = Settings::from_json(r#"{"channel":"dc","kind":"discord","token_secret":"bot"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.kind,
            KindSettings::Discord(DiscordSettings {
                api_base: "https://discord.com/api/v10".into(),
                gateway_url: "wss://gateway.discord.gg".into(),
                token_secret: "bot".into(),
            })
        );
        assert_eq!(s.kind.name(), "discord");
        assert!(Settings::from_json(
            r#"{"channel":"dc","kind":"discord","token_secret":"bot","gateway_url":"ws://127.0.0.1:9","api_base":"http://127.0.0.1:8/api/v10"}"#
        )
        .is_ok());
    }

    #[test]
    fn slack_with_defaults_and_refusals() {
        let s = Settings::from_json(
            r#"{"channel":"sl","kind":"slack","app_token_secret":"a","bot_token_secret":"b"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.kind,
            KindSettings::Slack(SlackSettings {
                api_base: "https://slack.com/api".into(),
                app_token_secret: "a".into(),
                bot_token_secret: "b".into(),
            })
        );
        assert_eq!(s.kind.name(), "slack");
        for bad in [
            r#"{"channel":"sl","kind":"slack","app_token_secret":"a"}"#,
            r#"{"channel":"sl","kind":"slack","app_token_secret":"","bot_token_secret":"b"}"#,
            r#"{"channel":"sl","kind":"slack","app_token_secret":"a","bot_token_secret":"b","token":"x"}"#,
            r#"{"channel":"sl","kind":"slack","app_token_secret":"a","bot_token_secret":"b","api_base":"http://slack.com/api"}"#,
        ] {
            assert!(Settings::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matrix_with_defaults_and_refusals() {
        let s = Settings::from_json(
            r#"{"channel":"mx","kind":"matrix","homeserver":"http://127.0.0.1:8008","token_secret":"t"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let KindSettings::Matrix(m) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!((m.poll_timeout_ms, m.invites_from.len()), (30_000, 0));
        assert_eq!(s.kind.name(), "matrix");
        for bad in [
            r#"{"channel":"mx","kind":"matrix","homeserver":"http://matrix.org","token_secret":"t"}"#,
            r#"{"channel":"mx","kind":"matrix","homeserver":"https://m.org","token_secret":""}"#,
            r#"{"channel":"mx","kind":"matrix","homeserver":"https://m.org","token_secret":"t","invites_from":["["]}"#,
            r#"{"channel":"mx","kind":"matrix","homeserver":"https://m.org","token_secret":"t","poll_timeout_ms":10}"#,
            r#"{"channel":"mx","kind":"matrix","homeserver":"https://m.org","token_secret":"t","api_base":"x"}"#,
            r#"{"channel":"mx","kind":"matrix","token_secret":"t"}"#,
        ] {
            assert!(Settings::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refused() {
        for bad in [
            "",
            "[]",
            r#"{"kind":"telegram","token_secret":"x"}"#,
            r#"{"channel":"a b","kind":"telegram","token_secret":"x"}"#,
            r#"{"channel":"tg","state_dir":"rel","kind":"telegram","token_secret":"x"}"#,
            r#"{"channel":"tg","kind":"fax"}"#,
            r#"{"channel":"tg","kind":"telegram"}"#,
            r#"{"channel":"tg","kind":"telegram","token_secret":""}"#,
            r#"{"channel":"tg","kind":"telegram","token_secret":"x","extra":1}"#,
            r#"{"channel":"tg","kind":"telegram","token_secret":"x","api_base":"ftp://x"}"#,
            r#"{"channel":"tg","kind":"telegram","token_secret":"x","api_base":"http://api.telegram.org"}"#,
            r#"{"channel":"tg","kind":"telegram","token_secret":"x","poll_timeout_ms":10}"#,
            r#"{"channel":"h","kind":"webhook","hmac_secret":"k","path":"hook"}"#,
            r#"{"channel":"h","kind":"webhook","hmac_secret":"k","path":"/h?x=1"}"#,
            r#"{"channel":"h","kind":"webhook","hmac_secret":"k","url":"http://example.com/"}"#,
            r#"{"channel":"d","kind":"discord"}"#,
            r#"{"channel":"d","kind":"discord","token_secret":"t","gateway_url":"ws://gateway.discord.gg"}"#,
            r#"{"channel":"d","kind":"discord","token_secret":"t","gateway_url":"https://gateway.discord.gg"}"#,
            r#"{"channel":"d","kind":"discord","token_secret":"t","api_base":"http://discord.com/api/v10"}"#,
            r#"{"channel":"d","kind":"discord","token_secret":"t","intents":1}"#,
        ] {
            assert!(Settings::from_json(bad).is_err(), "{bad}");
        }
        // Plain HTTP is fine to a loopback host.
        assert!(Settings::from_json(
            r#"{"channel":"tg","kind":"telegram","token_secret":"x","api_base":"http://127.0.0.1:8081"}"#
        )
        .is_ok());
    }
}
