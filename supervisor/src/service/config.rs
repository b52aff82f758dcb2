//! The configuration of `carapace run`: one TOML file (`/etc/carapace/carapace.toml` by
//! default, else the embedded [`DEFAULT_CONFIG_TEXT`]) naming the policy, the directories, the
//! log format, the gateway and the channels. Reference: docs/operations.md.
//!
//! Validation is as strict as the policy's: every error is reported at once, located as
//! `file:line:column` with what was expected and the offending line under a caret (the policy's
//! [`Diagnostic`]); unknown keys are errors, with a "did you mean" when one is close.
//!
//! The file is read with the `toml` crate (spanned, like the policy); every TOML syntax error
//! is reported located, and then nothing else. No key takes a float or a date: one written is a
//! located type error like any other wrong type.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_policy::toml_schema::check_and_repair;
use carapace_policy::{check_abs_path, Diagnostic, Diagnostics, Sink, Source, PATH_EXPECTED};
use toml::de::DeTable;

use crate::service::logging::LogFormat;

mod channel;
mod document;
mod jobs;
#[cfg(test)]
mod tests;
mod validate;

pub(crate) use channel::is_signal_number;

use document::{table_of, SYNTAX_EXPECTED};
use validate::{validate, CONFIG};

/// The embedded default configuration (`supervisor/config/default.toml`), used when no file
/// is given and [`crate::paths::DEFAULT_CONFIG`] does not exist.
pub const DEFAULT_CONFIG_TEXT: &str = include_str!("../../config/default.toml");
/// How the embedded default is named in messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default configuration>";
/// The gateway's listen address when the file does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8750";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Policy files, in order; empty = the embedded default policy.
    pub policy: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: tracing::Level,
    /// Grace between SIGTERM to the children and killing their cgroups.
    pub stop_timeout: Duration,
    /// How long an `ask` waits for the operator.
    pub approval_timeout: Duration,
    /// Send `WATCHDOG=1` when systemd asks for it.
    pub watchdog: bool,
    /// `[audit]`: when the audit log is rotated and how many old files are kept.
    pub audit_rotation: carapace_broker::audit::Rotation,
    /// Group allowed on the control socket (besides root and our own uid).
    pub control_group: Option<u32>,
    /// The gateway, if any.
    pub gateway: Option<ChildConfig>,
    /// Channel adapters by name.
    pub channels: BTreeMap<String, ChildConfig>,
    /// Service daemons paired with a channel's adapter (a Signal channel's signal-cli), by
    /// child name.
    pub daemons: BTreeMap<String, ChildConfig>,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[[jobs]]`: scheduled agent runs (also in the gateway's settings, which runs them).
    pub jobs: Vec<JobConfig>,
    /// `[workspaces.NAME]`: project directories the operator grants to tools and file
    /// requests, by name.
    pub workspaces: BTreeMap<String, WorkspaceConfig>,
}

/// One `[[jobs]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    pub name: String,
    pub schedule: JobSchedule,
    pub prompt: String,
    /// The session its runs go into (default `job-NAME`).
    pub session: String,
    /// (channel, conversation) the answer is sent to; None = it stays in the session.
    pub deliver_to: Option<(String, String)>,
}

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSchedule {
    /// A cron expression (UTC), as written.
    Cron(String),
    Every(Duration),
}

impl std::fmt::Display for JobSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobSchedule::Cron(c) => write!(f, "cron {c:?} (UTC)"),
            JobSchedule::Every(d) => write!(f, "every {}", humantime_like(*d)),
        }
    }
}

/// `90s` as `1m30s`, `7200s` as `2h`.
fn humantime_like(d: Duration) -> String {
    let mut s = d.as_secs();
    let ms = d.subsec_millis();
    let mut out = String::new();
    for (unit, n) in [("h", 3600), ("m", 60)] {
        if s >= n {
            out.push_str(&format!("{}{unit}", s / n));
            s %= n;
        }
    }
    if s > 0 || (out.is_empty() && ms == 0) {
        out.push_str(&format!("{s}s"));
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// `[workspaces.NAME]`: a directory tools may run in and the file tools may reach, when the
/// requesting child's profile is among `profiles`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceConfig {
    /// Absolute and canonical; an existing directory.
    pub path: PathBuf,
    pub why: String,
    /// `access = "rw"` (default) or `"ro"`.
    pub writable: bool,
    /// Profiles that may name it; default: the gateway's profile.
    pub profiles: Vec<String>,
}

impl Config {
    /// The granted workspaces as the broker takes them.
    pub fn granted_workspaces(&self) -> Vec<carapace_broker::ops::GrantedWorkspace> {
        self.workspaces
            .iter()
            .map(|(name, w)| carapace_broker::ops::GrantedWorkspace {
                name: name.clone(),
                path: w.path.clone(),
                writable: w.writable,
                profiles: w.profiles.clone(),
                why: w.why.clone(),
            })
            .collect()
    }
}

/// `[metrics]`: where Prometheus may scrape the service (`carapace metrics` works without it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The HTTP listener serving `GET /metrics`; None (absent or `"none"`) = no listener.
    /// Loopback only unless `allow_non_loopback = true`.
    pub listen: Option<SocketAddr>,
}

/// One confined child: the gateway or a channel adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildConfig {
    /// `gateway`, or the channel's name.
    pub name: String,
    pub is_gateway: bool,
    /// As written: an absolute path, or a bare name (next to the carapace executable, else in
    /// [`LIBEXEC_DIR`]).
    pub program: String,
    pub args: Vec<String>,
    /// The policy profile it runs under.
    pub profile: String,
    /// The TCP address the supervisor binds for it (gateway only; None = no listener).
    pub listen: Option<SocketAddr>,
    /// Whether `listen` may be a non-loopback address.
    pub allow_non_loopback: bool,
    /// Its only writable place.
    pub workspace: PathBuf,
    pub restart: RestartConfig,
    /// Extra environment (only the names its profile passes reach it).
    pub environment: BTreeMap<String, String>,
    /// The gateway's settings (`[gateway.clients]`, `[gateway.agent]`) as the JSON it reads
    /// from `$CARAPACE_GATEWAY_SETTINGS`; None for channels.
    pub settings: Option<String>,
    /// For a daemon: the channel whose adapter it is paired with. The supervisor makes one
    /// socket pair for the two: the daemon's stdin and stdout, the adapter's fd 4.
    pub serves: Option<String>,
}

/// Restart with exponential backoff; more than `crash_loop_restarts` starts within
/// `crash_loop_window` is a crash loop, and restarting stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartConfig {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(60),
        }
    }
}

/// Where the Debian package installs the programs a bare `program` name stands for (the gateway
/// and the channel adapter): not on `PATH`, since only the supervisor runs them.
pub const LIBEXEC_DIR: &str = "/usr/libexec/carapace";

/// A bare `program` name that is in neither place it is looked up.
#[derive(Debug, thiserror::Error)]
#[error(
    "program {name:?} not found: looked next to the carapace executable ({}) and in {}; \
     install it in one of them or give an absolute path",
    exe_dir.join(name).display(),
    libexec_dir.join(name).display()
)]
pub struct ProgramNotFound {
    pub name: String,
    pub exe_dir: PathBuf,
    pub libexec_dir: PathBuf,
}

impl ChildConfig {
    /// The program's path: as written when absolute; a bare name next to the carapace
    /// executable (`exe_dir`, a build directory) when it exists there, else in `libexec_dir`
    /// ([`LIBEXEC_DIR`] for the service: the package layout), else an error naming both.
    pub fn resolve_program(
        &self,
        exe_dir: &Path,
        libexec_dir: &Path,
    ) -> Result<PathBuf, ProgramNotFound> {
        let p = Path::new(&self.program);
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        [exe_dir, libexec_dir]
            .iter()
            .map(|dir| dir.join(p))
            .find(|candidate| candidate.exists())
            .ok_or_else(|| ProgramNotFound {
                name: self.program.clone(),
                exe_dir: exe_dir.to_path_buf(),
                libexec_dir: libexec_dir.to_path_buf(),
            })
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrors {
    #[error("cannot read the configuration {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every located error of the file.
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl ConfigErrors {
    /// The located errors (empty for a read error).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigErrors::Invalid(d) => &d.0,
            ConfigErrors::Read { .. } => &[],
        }
    }
}

impl Config {
    /// Parse and validate a configuration; `file` names it in messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let src = Source::new(text, file);
        let invalid = |mut d: Vec<Diagnostic>| {
            d.sort_by_key(|d| (d.line, d.column));
            d.dedup();
            ConfigErrors::Invalid(Diagnostics(d))
        };
        // After a syntax error the document is incomplete (keys may have landed in the wrong
        // table): report the syntax errors only, like the policy does.
        let (mut doc, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            return Err(invalid(
                syntax
                    .iter()
                    .map(|e| src.toml_error(e, SYNTAX_EXPECTED))
                    .collect(),
            ));
        }
        // Every unknown key and wrong type; the repaired document is then read for semantics.
        let mut shape = Sink::new(&src);
        check_and_repair(&mut doc, &CONFIG, &mut shape);
        let mut sink = Sink::new(&src);
        let cfg = validate(&table_of(doc.get_ref()), &mut sink);
        let diags = sink.merge_shape(shape.diags);
        if !diags.is_empty() {
            return Err(invalid(diags));
        }
        Ok(cfg)
    }

    /// Load `path`; without one, [`crate::paths::DEFAULT_CONFIG`] if it exists, else the
    /// embedded default. Returns the configuration and the name of where it came from.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigErrors> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let d = PathBuf::from(crate::paths::DEFAULT_CONFIG);
                d.exists().then_some(d)
            }
        };
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|source| ConfigErrors::Read {
                    path: p.clone(),
                    source,
                })?;
                let name = p.display().to_string();
                Ok((Config::parse(&text, &name)?, name))
            }
            None => Ok((
                Config::parse(DEFAULT_CONFIG_TEXT, DEFAULT_CONFIG_NAME)?,
                DEFAULT_CONFIG_NAME.to_string(),
            )),
        }
    }

    /// The children to start: the gateway first, then the channels by name, then the daemons.
    pub fn children(&self) -> impl Iterator<Item = (&str, &ChildConfig)> {
        self.gateway
            .iter()
            .chain(self.channels.values())
            .chain(self.daemons.values())
            .map(|c| (c.name.as_str(), c))
    }
}
