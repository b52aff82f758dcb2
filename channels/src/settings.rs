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
    Matrix(MatrixSettings),
}

impl KindSettings {
    /// The wire name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            KindSettings::Telegram(_) => "telegram",
            KindSettings::Email(_) => "email",
            KindSettings::Webhook(_) => "webhook",
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
