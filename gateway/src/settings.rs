//! The gateway's settings: JSON in `$CARAPACE_GATEWAY_SETTINGS`, written by the supervisor from
//! the `[gateway.clients]` and `[gateway.agent]` tables of `carapace.toml` (validated there,
//! with located errors). Every field has a default, so the gateway also runs without the
//! variable (then no model is configured and `agent.run` answers `unavailable`).
//!
//! The settings carry no secret: the model's API key is named here (a policy `[secrets.NAME]`)
//! and fetched from the broker as a sealed memfd when a run needs it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment variable the supervisor sets.
pub const SETTINGS_ENV: &str = "CARAPACE_GATEWAY_SETTINGS";

/// Everything the gateway can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Its only writable place (the sandbox's workspace): sessions live beneath it.
    pub state_dir: String,
    pub clients: ClientLimits,
    /// The model behind `agent.run`; None = not configured.
    pub agent: Option<AgentSettings>,
    /// The broker's request budget for the gateway (its profile's broker `rate`, written by
    /// the supervisor from the policy it starts the gateway under); None = the broker sets
    /// none. Client calls share it fairly ([`crate::schedule`]).
    pub broker_rate: Option<BrokerRate>,
    /// Scheduled jobs (`[[jobs]]` of `carapace.toml`), run by [`crate::jobs`].
    pub jobs: Vec<JobSettings>,
}

/// One scheduled job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    /// 1 to 64 characters of `A-Z a-z 0-9 _ -`, unique.
    pub name: String,
    /// A cron expression (UTC; 5 fields, or 6 with seconds first) ...
    #[serde(default)]
    pub cron: Option<String>,
    /// ... or an interval (exactly one of the two).
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// The user message of each run.
    pub prompt: String,
    /// The session the runs go into.
    pub session: String,
    /// Where the final answer is sent; None = it stays in the session.
    #[serde(default)]
    pub deliver_to: Option<DeliverTo>,
}

/// A channel conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverTo {
    pub channel: String,
    pub conversation: String,
}

/// A token bucket of broker requests: `requests_per_second` refill, `burst` size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerRate {
    pub requests_per_second: f64,
    pub burst: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            state_dir: "/workspace".into(),
            clients: ClientLimits::default(),
            agent: None,
            broker_rate: None,
            jobs: Vec::new(),
        }
    }
}

/// Limits on what clients may ask of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLimits {
    /// Calls per second per token (token bucket refill).
    pub rate_per_second: f64,
    /// Bucket size per token.
    pub burst: u32,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Largest HTTP body or WebSocket message.
    pub max_message_bytes: usize,
    /// A WebSocket with no traffic (messages or pongs) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Calls running at once on one WebSocket.
    pub max_in_flight: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            rate_per_second: 20.0,
            burst: 40,
            max_connections: 256,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 120_000,
            max_in_flight: 16,
        }
    }
}

impl ClientLimits {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// An OpenAI-compatible chat-completions endpoint and the agent loop's bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8080/v1` (llama.cpp, Ollama);
    /// `/chat/completions` is appended. Reached through the broker's `connect`, so the policy's
    /// egress allowlist must name its host and port.
    pub base_url: String,
    pub model: String,
    /// The policy secret holding the API key (sent as `Authorization: Bearer`); None = no key
    /// (local servers).
    #[serde(default)]
    pub api_key_secret: Option<String>,
    /// Model calls per `agent.run`.
    #[serde(default = "default_max_turns")]
    pub max_turns: u32,
    /// Tokens (prompt + completion, as the endpoint reports them) per `agent.run`.
    #[serde(default = "default_token_budget")]
    pub token_budget: u64,
    /// Longest one model call may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `max_tokens` of each call; None = the endpoint's default.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Replaces the built-in system prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Whether the agent answers the messages channel adapters deliver (the gateway then reads
    /// the broker's inbound queue all the time, see [`crate::inbound`]).
    #[serde(default = "default_answer_channels")]
    pub answer_channels: bool,
    /// Agent runs answering channel messages at once (`agent.run` calls of clients are not
    /// counted); 1 to [`MAX_CONCURRENT_RUNS`].
    #[serde(default = "default_max_concurrent_runs")]
    pub max_concurrent_runs: usize,
    /// The model's context window in tokens, estimated as the bytes of the prompt's JSON / 4:
    /// when the next prompt would exceed 80 % of it, the oldest turns of the session are
    /// summarised by the model (`methods/agent.rs`, compaction).
    #[serde(default = "default_context_budget")]
    pub context_budget: u64,
}

/// Lowest `agent.context_budget`.
pub const MIN_CONTEXT_BUDGET: u64 = 256;

/// Upper bound of `agent.max_concurrent_runs`.
pub const MAX_CONCURRENT_RUNS: usize = 64;

fn default_max_turns() -> u32 {
    8
}
fn default_token_budget() -> u64 {
    50_000
}
fn default_timeout_ms() -> u64 {
    120_000
}
fn default_answer_channels() -> bool {
    true
}
fn default_max_concurrent_runs() -> usize {
    4
}
fn default_context_budget() -> u64 {
    32_000
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("${SETTINGS_ENV} is not valid settings JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("${SETTINGS_ENV}: {0}")]
    Invalid(String),
}

impl Settings {
    /// From `$CARAPACE_GATEWAY_SETTINGS`, or the defaults when it is not set.
    pub fn from_env() -> Result<Settings, SettingsError> {
        match std::env::var(SETTINGS_ENV) {
            Ok(text) => Settings::from_json(&text),
            Err(_) => Ok(Settings::default()),
        }
    }

    /// Parse and check.
    pub fn from_json(text: &str) -> Result<Settings, SettingsError> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        if !v.is_object() {
            return Err(SettingsError::Invalid(
                "the settings are a JSON object".into(),
            ));
        }
        let s: Settings = serde_json::from_value(v)?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), SettingsError> {
        let c = &self.clients;
        if !(c.rate_per_second.is_finite() && c.rate_per_second > 0.0) || c.burst == 0 {
            return Err(SettingsError::Invalid(
                "clients.rate_per_second and clients.burst must be positive".into(),
            ));
        }
        if c.max_connections == 0 || c.max_in_flight == 0 || c.max_message_bytes < 1024 {
            return Err(SettingsError::Invalid(
                "clients.max_connections and max_in_flight must be positive, max_message_bytes at least 1024"
                    .into(),
            ));
        }
        if let Some(r) = &self.broker_rate {
            if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) || r.burst == 0 {
                return Err(SettingsError::Invalid(
                    "broker_rate.requests_per_second and broker_rate.burst must be positive".into(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for j in &self.jobs {
            if !crate::sessions::valid_name(&j.name) || !names.insert(j.name.as_str()) {
                return Err(SettingsError::Invalid(format!(
                    "jobs: {:?} is not a valid job name, or not unique",
                    j.name
                )));
            }
            if !crate::sessions::valid_name(&j.session) || j.prompt.is_empty() {
                return Err(SettingsError::Invalid(format!(
                    "job {}: a valid session name and a prompt are required",
                    j.name
                )));
            }
            crate::jobs::Schedule::of(j)
                .map_err(|e| SettingsError::Invalid(format!("job {}: {e}", j.name)))?;
        }
        if !self.jobs.is_empty() && self.agent.is_none() {
            return Err(SettingsError::Invalid(
                "jobs need a model: add a [gateway.agent] table".into(),
            ));
        }
        if let Some(a) = &self.agent {
            crate::llm::Endpoint::parse(&a.base_url)
                .map_err(|e| SettingsError::Invalid(format!("agent.base_url: {e}")))?;
            if a.model.is_empty() || a.max_turns == 0 || a.token_budget == 0 {
                return Err(SettingsError::Invalid(
                    "agent.model must be set, agent.max_turns and token_budget positive".into(),
                ));
            }
            if a.context_budget < MIN_CONTEXT_BUDGET {
                return Err(SettingsError::Invalid(format!(
                    "agent.context_budget must be at least {MIN_CONTEXT_BUDGET}"
                )));
            }
            if !(1..=MAX_CONCURRENT_RUNS).contains(&a.max_concurrent_runs) {
                return Err(SettingsError::Invalid(format!(
                    "agent.max_concurrent_runs must be 1 to {MAX_CONCURRENT_RUNS}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let s = Settings::from_json("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s, Settings::default());
        let text = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(Settings::from_json(&text).ok(), Some(s));
    }

    #[test]
    fn the_broker_budget() {
        let s = Settings::from_json(r#"{"broker_rate":{"requests_per_second":50,"burst":100}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.broker_rate,
            Some(BrokerRate {
                requests_per_second: 50.0,
                burst: 100
            })
        );
    }

    #[test]
    fn an_agent_with_defaults() {
        let s = Settings::from_json(
            r#"{"agent":{"base_url":"http://127.0.0.1:9/v1","model":"m","api_key_secret":"k"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = s.agent.unwrap_or_else(|| panic!("no agent"));
        assert_eq!((a.max_turns, a.token_budget), (8, 50_000));
        assert_eq!((a.answer_channels, a.max_concurrent_runs), (true, 4));
        assert_eq!(a.context_budget, 32_000);
        assert_eq!(a.api_key_secret.as_deref(), Some("k"));
    }

    #[test]
    fn channel_answering_can_be_turned_off_and_bounded() {
        let s = Settings::from_json(
            r#"{"agent":{"base_url":"http://x/v1","model":"m","answer_channels":false,"max_concurrent_runs":64}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = s.agent.unwrap_or_else(|| panic!("no agent"));
        assert_eq!((a.answer_channels, a.max_concurrent_runs), (false, 64));
    }

    #[test]
    fn jobs() {
        let s = Settings::from_json(
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[
                {"name":"daily","cron":"0 7 * * *","prompt":"news","session":"job-daily",
                 "deliver_to":{"channel":"tg","conversation":"111"}},
                {"name":"tick","every_ms":2000,"prompt":"t","session":"job-tick"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.jobs.len(), 2);
        assert_eq!(
            s.jobs[0].deliver_to,
            Some(DeliverTo {
                channel: "tg".into(),
                conversation: "111".into()
            })
        );
        assert_eq!(s.jobs[1].every_ms, Some(2000));
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            "[]",
            r#"{"bogus":1}"#,
            r#"{"clients":{"burst":0}}"#,
            r#"{"clients":{"rate_per_second":-1}}"#,
            r#"{"clients":{"max_message_bytes":10}}"#,
            r#"{"agent":{"base_url":"ftp://x/","model":"m"}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":""}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m","max_turns":0}}"#,
            r#"{"agent":{"model":"m"}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m","max_concurrent_runs":0}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m","max_concurrent_runs":65}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m","answer_channels":"yes"}}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m","context_budget":100}}"#,
            r#"{"broker_rate":{"requests_per_second":0,"burst":10}}"#,
            r#"{"broker_rate":{"requests_per_second":5,"burst":0}}"#,
            r#"{"broker_rate":{"requests_per_second":5}}"#,
            r#"{"jobs":[{"name":"j","every_ms":5000,"prompt":"p","session":"s"}]}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[{"name":"j","prompt":"p","session":"s"}]}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[{"name":"j","every_ms":5000,"cron":"* * * * *","prompt":"p","session":"s"}]}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[{"name":"j","cron":"61 * * * *","prompt":"p","session":"s"}]}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[{"name":"a/b","every_ms":5000,"prompt":"p","session":"s"}]}"#,
            r#"{"agent":{"base_url":"http://x/v1","model":"m"},"jobs":[{"name":"j","every_ms":5000,"prompt":"p","session":"s"},{"name":"j","every_ms":5000,"prompt":"p","session":"s"}]}"#,
        ] {
            assert!(Settings::from_json(bad).is_err(), "{bad}");
        }
    }
}
