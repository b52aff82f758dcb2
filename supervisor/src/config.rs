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

use carapace_policy::{
    check_abs_path, Diagnostic, Diagnostics, Source, DURATION_EXPECTED, PATH_EXPECTED,
};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::logging::LogFormat;

mod channel;

/// The embedded default configuration (`supervisor/config/default.toml`), used when no file
/// is given and [`crate::paths::DEFAULT_CONFIG`] does not exist.
pub const DEFAULT_CONFIG_TEXT: &str = include_str!("../config/default.toml");
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
    /// Group allowed on the control socket (besides root and our own uid).
    pub control_group: Option<u32>,
    /// The gateway, if any.
    pub gateway: Option<ChildConfig>,
    /// Channel adapters by name.
    pub channels: BTreeMap<String, ChildConfig>,
}

/// One confined child: the gateway or a channel adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildConfig {
    /// `gateway`, or the channel's name.
    pub name: String,
    pub is_gateway: bool,
    /// As written: an absolute path, or a bare name (next to the carapace executable).
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

impl ChildConfig {
    /// The program's path: as written when absolute, else `exe_dir/<name>`.
    pub fn resolve_program(&self, exe_dir: &Path) -> PathBuf {
        let p = Path::new(&self.program);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            exe_dir.join(p)
        }
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
        let mut cx = Cx {
            src: &src,
            diags: Vec::new(),
        };
        let root = read_document(text, &mut cx);
        // After a syntax error the document is incomplete (keys may have landed in the wrong
        // table): report the syntax errors only, like the policy does.
        let cfg = cx.diags.is_empty().then(|| validate(&root, &mut cx));
        if !cx.diags.is_empty() {
            let mut d = cx.diags;
            d.sort_by_key(|d| (d.line, d.column));
            d.dedup();
            return Err(ConfigErrors::Invalid(Diagnostics(d)));
        }
        cfg.ok_or_else(|| ConfigErrors::Invalid(Diagnostics(Vec::new())))
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

    /// The children to start: the gateway first, then the channels by name.
    pub fn children(&self) -> impl Iterator<Item = (&str, &ChildConfig)> {
        self.gateway
            .iter()
            .chain(self.channels.values())
            .map(|c| (c.name.as_str(), c))
    }
}

// ---------------------------------------------------------------------------------------------
// Diagnostics.

/// What a syntax error points to when the TOML reader says nothing more precise.
const SYNTAX_EXPECTED: &str = "valid TOML (see docs/operations.md)";

/// Collects the diagnostics of one file.
#[derive(Debug)]
struct Cx<'a> {
    src: &'a Source<'a>,
    diags: Vec<Diagnostic>,
}

impl Cx<'_> {
    fn err(&mut self, span: &Range<usize>, message: impl Into<String>, expected: &str) {
        let expected = (!expected.is_empty()).then_some(expected);
        self.diags.push(self.src.diag(span, message, expected));
    }
}

// ---------------------------------------------------------------------------------------------
// The document: the `toml` crate's spanned tables, in the shapes the validation below reads.

#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    /// No key takes one: kept only to say so, located.
    Float,
    /// No key takes one: kept only to say so, located.
    Datetime,
    Array(Vec<Node>),
    Table(Table),
}

impl Val {
    fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Bool(_) => "a boolean",
            Val::Float => "a float",
            Val::Datetime => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    val: Val,
    /// Byte range of the value in the file.
    span: Range<usize>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    key_span: Range<usize>,
    node: Node,
}

#[derive(Debug, Clone, Default)]
struct Table {
    entries: Vec<Entry>,
}

impl Table {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

/// Deepest nesting of arrays and tables accepted (no key needs more than 3).
const MAX_DEPTH: usize = 32;

/// Read `text` as TOML: every syntax error is reported (located), and then nothing else.
fn read_document(text: &str, cx: &mut Cx<'_>) -> Table {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in &syntax {
            let d = cx.src.toml_error(e, SYNTAX_EXPECTED);
            cx.diags.push(d);
        }
        return Table::default();
    }
    table_of(doc.get_ref(), cx, 0)
}

fn table_of(t: &DeTable<'_>, cx: &mut Cx<'_>, depth: usize) -> Table {
    let entries = t
        .iter()
        .filter_map(|(k, v)| {
            Some(Entry {
                key: k.get_ref().to_string(),
                key_span: k.span(),
                node: node_of(v, cx, depth)?,
            })
        })
        .collect();
    Table { entries }
}

/// A value; None (and an error) for an integer beyond 64 bits or nesting beyond [`MAX_DEPTH`].
fn node_of(v: &Spanned<DeValue<'_>>, cx: &mut Cx<'_>, depth: usize) -> Option<Node> {
    let span = v.span();
    if depth > MAX_DEPTH {
        cx.err(
            &span,
            "values nested too deeply",
            "at most 32 levels of arrays and tables",
        );
        return None;
    }
    let val = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(digits.trim_start_matches('+'), i.radix()) {
                Ok(n) => Val::Int(n),
                Err(_) => {
                    cx.err(
                        &span,
                        format!("`{i}` is not an integer that fits in 64 bits"),
                        "an integer from -9223372036854775808 to 9223372036854775807",
                    );
                    return None;
                }
            }
        }
        DeValue::Float(_) => Val::Float,
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Datetime(_) => Val::Datetime,
        DeValue::Array(a) => {
            Val::Array(a.iter().filter_map(|n| node_of(n, cx, depth + 1)).collect())
        }
        DeValue::Table(t) => Val::Table(table_of(t, cx, depth + 1)),
    };
    Some(Node { val, span })
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// The closest of `known` to `key`, when close enough to be a likely typo.
fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

const SUPERVISOR_KEYS: &[&str] = &[
    "policy",
    "state_dir",
    "runtime_dir",
    "log_format",
    "log_level",
    "stop_timeout",
    "approval_timeout",
    "watchdog",
];
const CONTROL_KEYS: &[&str] = &["group"];
const GATEWAY_KEYS: &[&str] = &[
    "clients",
    "agent",
    "program",
    "args",
    "profile",
    "listen",
    "allow_non_loopback",
    "workspace",
    "restart",
    "environment",
];
const CHANNEL_KEYS: &[&str] = &[
    "program",
    "args",
    "profile",
    "workspace",
    "restart",
    "environment",
];
const RESTART_KEYS: &[&str] = &[
    "initial_delay",
    "max_delay",
    "crash_loop_restarts",
    "crash_loop_window",
];
const TOP_KEYS: &[&str] = &["supervisor", "control", "gateway", "channels"];

/// Report every key of `t` not in `known`.
fn unknown_keys(cx: &mut Cx<'_>, t: &Table, known: &[&str], what: &str) {
    for e in &t.entries {
        if known.contains(&e.key.as_str()) {
            continue;
        }
        let msg = match did_you_mean(&e.key, known) {
            Some(k) => format!("unknown key `{}` in {what}; did you mean `{k}`?", e.key),
            None => format!("unknown key `{}` in {what}", e.key),
        };
        let names: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        cx.err(&e.key_span, msg, &format!("one of {}", names.join(", ")));
    }
}

/// `e` as a table, or an error.
fn as_table<'t>(cx: &mut Cx<'_>, e: &'t Entry, what: &str) -> Option<&'t Table> {
    match &e.node.val {
        Val::Table(t) => Some(t),
        other => {
            cx.err(
                &e.node.span,
                format!("{what} must be a table, not {}", other.type_name()),
                &format!("a [{what}] table"),
            );
            None
        }
    }
}

fn type_err(cx: &mut Cx<'_>, e: &Entry, expected: &str) {
    cx.err(
        &e.node.span,
        format!("invalid type: {} for `{}`", e.node.val.type_name(), e.key),
        expected,
    );
}

fn get_str<'t>(
    cx: &mut Cx<'_>,
    t: &'t Table,
    key: &str,
    expected: &str,
) -> Option<(&'t str, &'t Entry)> {
    let e = t.get(key)?;
    match &e.node.val {
        Val::Str(s) => Some((s.as_str(), e)),
        _ => {
            type_err(cx, e, expected);
            None
        }
    }
}

fn get_bool(cx: &mut Cx<'_>, t: &Table, key: &str, default: bool) -> bool {
    match t.get(key) {
        None => default,
        Some(Entry {
            node: Node {
                val: Val::Bool(b), ..
            },
            ..
        }) => *b,
        Some(e) => {
            type_err(cx, e, "true or false");
            default
        }
    }
}

fn get_path(cx: &mut Cx<'_>, t: &Table, key: &str) -> Option<PathBuf> {
    let (s, e) = get_str(cx, t, key, PATH_EXPECTED)?;
    match check_abs_path(s) {
        Ok(()) => Some(PathBuf::from(s)),
        Err(why) => {
            cx.err(
                &e.node.span,
                format!("`{key}` = {s:?}: {why}"),
                PATH_EXPECTED,
            );
            None
        }
    }
}

/// A duration: integer seconds, or "<integer><ms|s|m|min|h>"; zero is refused.
fn parse_duration(v: &Val) -> Result<Duration, String> {
    let v = match v {
        Val::Int(i) => toml::Value::Integer(*i),
        Val::Str(s) => toml::Value::String(s.clone()),
        other => return Err(format!("{} is not a duration", other.type_name())),
    };
    carapace_policy::parse_duration(&v)
}

/// Longest duration accepted anywhere (a day): longer is a typo.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn get_duration(cx: &mut Cx<'_>, t: &Table, key: &str, default: Duration) -> Duration {
    let Some(e) = t.get(key) else {
        return default;
    };
    match parse_duration(&e.node.val) {
        Ok(d) if d <= MAX_DURATION => d,
        Ok(_) => {
            cx.err(
                &e.node.span,
                format!("`{key}` is longer than a day"),
                "a duration of at most 24h",
            );
            default
        }
        Err(why) => {
            cx.err(&e.node.span, format!("`{key}`: {why}"), DURATION_EXPECTED);
            default
        }
    }
}

/// The gid of `name` from the system's group database.
fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

fn validate(root: &Table, cx: &mut Cx<'_>) -> Config {
    unknown_keys(cx, root, TOP_KEYS, "the top level");
    let empty = Table::default();
    let section = |cx: &mut Cx<'_>, key: &str| -> Option<&Table> {
        let e = root.get(key)?;
        as_table(cx, e, key)
    };

    // [supervisor]
    let sup = section(cx, "supervisor").unwrap_or(&empty);
    unknown_keys(cx, sup, SUPERVISOR_KEYS, "[supervisor]");
    let policy = match sup.get("policy") {
        None => Vec::new(),
        Some(e) => {
            let items: Vec<&Node> = match &e.node.val {
                Val::Str(_) => vec![&e.node],
                Val::Array(a) => a.iter().collect(),
                _ => {
                    type_err(cx, e, "a policy file path, or an array of them");
                    Vec::new()
                }
            };
            let mut out = Vec::new();
            for n in items {
                match &n.val {
                    Val::Str(s) => match check_abs_path(s) {
                        Ok(()) => out.push(PathBuf::from(s)),
                        Err(why) => {
                            cx.err(&n.span, format!("policy file {s:?}: {why}"), PATH_EXPECTED)
                        }
                    },
                    other => cx.err(
                        &n.span,
                        format!("invalid type: {} in `policy`", other.type_name()),
                        PATH_EXPECTED,
                    ),
                }
            }
            out
        }
    };
    let state_dir = get_path(cx, sup, "state_dir").unwrap_or_else(crate::paths::default_state_dir);
    let runtime_dir =
        get_path(cx, sup, "runtime_dir").unwrap_or_else(crate::paths::default_runtime_dir);
    if state_dir == runtime_dir {
        if let Some(e) = sup.get("runtime_dir") {
            cx.err(
                &e.node.span,
                "`runtime_dir` is the same directory as `state_dir`",
                "two different directories",
            );
        }
    }
    let log_format = match get_str(cx, sup, "log_format", LOG_FORMAT_EXPECTED) {
        None => LogFormat::Auto,
        Some((s, e)) => match s.parse::<LogFormat>() {
            Ok(f) => f,
            Err(()) => {
                cx.err(
                    &e.node.span,
                    format!("unknown log format {s:?}"),
                    LOG_FORMAT_EXPECTED,
                );
                LogFormat::Auto
            }
        },
    };
    let log_level = match get_str(cx, sup, "log_level", LOG_LEVEL_EXPECTED) {
        None => tracing::Level::INFO,
        Some((s, e)) => match parse_level(s) {
            Some(l) => l,
            None => {
                cx.err(
                    &e.node.span,
                    format!("unknown log level {s:?}"),
                    LOG_LEVEL_EXPECTED,
                );
                tracing::Level::INFO
            }
        },
    };
    let stop_timeout = get_duration(cx, sup, "stop_timeout", Duration::from_secs(10));
    let approval_timeout = get_duration(cx, sup, "approval_timeout", Duration::from_secs(120));
    let watchdog = get_bool(cx, sup, "watchdog", true);

    // [control]
    let control = section(cx, "control").unwrap_or(&empty);
    unknown_keys(cx, control, CONTROL_KEYS, "[control]");
    let control_group = control.get("group").and_then(|e| group_of(cx, e));

    // [gateway]
    let gateway = root.get("gateway").and_then(|e| {
        let t = as_table(cx, e, "gateway")?;
        Some(child(cx, t, "gateway", true, &state_dir, &e.key_span))
    });

    // [channels.NAME]
    let mut channels = BTreeMap::new();
    if let Some(t) = section(cx, "channels") {
        for e in &t.entries {
            if !valid_channel_name(&e.key) {
                cx.err(
                    &e.key_span,
                    format!("invalid channel name {:?}", e.key),
                    "1 to 32 characters among a-z, 0-9, `_` and `-`, and not `gateway`",
                );
                continue;
            }
            let what = format!("channels.{}", e.key);
            if let Some(ct) = as_table(cx, e, &what) {
                let c = child(cx, ct, &e.key, false, &state_dir, &e.key_span);
                channels.insert(e.key.clone(), c);
            }
        }
    }

    // Each child its own workspace, and none of them the state or runtime directory itself.
    let mut seen: Vec<(&Path, &str)> = Vec::new();
    let children = gateway.iter().chain(channels.values());
    for c in children {
        let ws = c.workspace.as_path();
        let clash = seen
            .iter()
            .find(|(p, _)| p.starts_with(ws) || ws.starts_with(p));
        let span = workspace_span(root, c);
        if let Some((_, other)) = clash {
            cx.err(
                &span,
                format!(
                    "the workspace of `{}` ({}) overlaps the workspace of `{other}`",
                    c.name,
                    ws.display()
                ),
                "a separate workspace for each child",
            );
        } else if state_dir.starts_with(ws) || runtime_dir.starts_with(ws) {
            cx.err(
                &span,
                format!(
                    "the workspace of `{}` ({}) contains the supervisor's state or runtime directory",
                    c.name,
                    ws.display()
                ),
                "a directory of its own (default: <state_dir>/<name>)",
            );
        }
        seen.push((ws, &c.name));
    }

    Config {
        policy,
        state_dir,
        runtime_dir,
        log_format,
        log_level,
        stop_timeout,
        approval_timeout,
        watchdog,
        control_group,
        gateway,
        channels,
    }
}

/// Where to point at for an error about a child's workspace.
fn workspace_span(root: &Table, c: &ChildConfig) -> Range<usize> {
    let table = if c.is_gateway {
        root.get("gateway")
    } else {
        root.get("channels").and_then(|e| match &e.node.val {
            Val::Table(t) => t.get(&c.name),
            _ => None,
        })
    };
    let Some(e) = table else { return 0..0 };
    match &e.node.val {
        Val::Table(t) => t
            .get("workspace")
            .map_or(e.key_span.clone(), |w| w.node.span.clone()),
        _ => e.key_span.clone(),
    }
}

const LOG_FORMAT_EXPECTED: &str = "one of \"auto\", \"text\", \"journal\", \"json\"";
const LOG_LEVEL_EXPECTED: &str = "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"";

fn parse_level(s: &str) -> Option<tracing::Level> {
    Some(match s {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => return None,
    })
}

fn valid_channel_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n != "gateway"
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

const GROUP_EXPECTED: &str =
    "a group name that exists (see /etc/group) or a numeric gid from 0 to 4294967294";

fn group_of(cx: &mut Cx<'_>, e: &Entry) -> Option<u32> {
    let numeric = |i: i64| u32::try_from(i).ok().filter(|g| *g != u32::MAX);
    match &e.node.val {
        Val::Int(i) => {
            let g = numeric(*i);
            if g.is_none() {
                cx.err(
                    &e.node.span,
                    format!("gid {i} is out of range"),
                    GROUP_EXPECTED,
                );
            }
            g
        }
        Val::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            let g = s.parse::<i64>().ok().and_then(numeric);
            if g.is_none() {
                cx.err(
                    &e.node.span,
                    format!("gid {s} is out of range"),
                    GROUP_EXPECTED,
                );
            }
            g
        }
        Val::Str(s) => {
            let g = lookup_group(s);
            if g.is_none() {
                cx.err(
                    &e.node.span,
                    format!("no group named {s:?} on this system"),
                    GROUP_EXPECTED,
                );
            }
            g
        }
        _ => {
            type_err(cx, e, GROUP_EXPECTED);
            None
        }
    }
}

const PROGRAM_EXPECTED: &str =
    "an absolute path, or a bare file name (found next to the carapace executable)";
const LISTEN_EXPECTED: &str =
    "an IP address and port such as \"127.0.0.1:8750\" or \"[::1]:8750\", or \"none\"";

/// One `[gateway]` or `[channels.NAME]` table.
fn child(
    cx: &mut Cx<'_>,
    t: &Table,
    name: &str,
    is_gateway: bool,
    state_dir: &Path,
    anchor: &Range<usize>,
) -> ChildConfig {
    let what = if is_gateway {
        "[gateway]".to_string()
    } else {
        format!("[channels.{name}]")
    };
    // A channel with a `kind` is one of the built-in adapters (`carapace-channel`), configured
    // by the kind's keys; without one, `program` names an adapter of the operator's own.
    let kind = if is_gateway {
        unknown_keys(cx, t, GATEWAY_KEYS, &what);
        None
    } else {
        let kind = channel::kind_of(cx, t);
        let bad_kind = t.get("kind").is_some() && kind.is_none();
        if !bad_kind {
            channel::check_keys(cx, t, kind, &what, CHANNEL_KEYS);
        }
        kind
    };

    let program = match get_str(cx, t, "program", PROGRAM_EXPECTED) {
        Some((s, e)) => {
            let bad = if s.is_empty() {
                Some("the program is empty")
            } else if s.starts_with('/') {
                check_abs_path(s).err()
            } else if s.contains('/') {
                Some("a relative path with `/` is ambiguous")
            } else if s.contains('\0') {
                Some("the name contains a NUL byte")
            } else if s == "." || s == ".." {
                Some("not a file name")
            } else {
                None
            };
            if let Some(why) = bad {
                cx.err(
                    &e.node.span,
                    format!("`program` = {s:?}: {why}"),
                    PROGRAM_EXPECTED,
                );
            }
            s.to_string()
        }
        None if is_gateway => "carapace-gateway".to_string(),
        None if kind.is_some() => channel::ADAPTER_PROGRAM.to_string(),
        None => {
            if t.get("program").is_none() && t.get("kind").is_none() {
                cx.err(
                    anchor,
                    format!("{what} has no `kind` and no `program`"),
                    "kind = \"telegram\", \"email\" or \"webhook\" (the built-in adapters), \
                     or the `program` of an adapter of your own",
                );
            }
            String::new()
        }
    };

    let args = match t.get("args") {
        None => Vec::new(),
        Some(e) => match &e.node.val {
            Val::Array(items) => items
                .iter()
                .filter_map(|n| match &n.val {
                    Val::Str(s) if s.contains('\0') => {
                        cx.err(
                            &n.span,
                            "an argument contains a NUL byte",
                            "a string without NUL",
                        );
                        None
                    }
                    Val::Str(s) => Some(s.clone()),
                    other => {
                        cx.err(
                            &n.span,
                            format!("invalid type: {} in `args`", other.type_name()),
                            "an array of strings",
                        );
                        None
                    }
                })
                .collect(),
            _ => {
                type_err(cx, e, "an array of strings");
                Vec::new()
            }
        },
    };

    let default_profile = if is_gateway { "gateway" } else { "channel" };
    let profile = match get_str(cx, t, "profile", "the name of a profile of the policy") {
        Some((s, e)) => {
            if s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                cx.err(
                    &e.node.span,
                    format!("`profile` = {s:?} is not a profile name"),
                    "the name of a profile of the policy",
                );
            }
            s.to_string()
        }
        None => default_profile.to_string(),
    };

    let listens = is_gateway || kind == Some("webhook");
    let allow_non_loopback = listens && get_bool(cx, t, "allow_non_loopback", false);
    let listen = if !listens {
        None
    } else if is_gateway {
        match t.get("listen") {
            None => DEFAULT_LISTEN.parse().ok(),
            Some(_) => listen_addr(cx, t, allow_non_loopback, ("the gateway", &what)),
        }
    } else {
        if t.get("listen").is_none() {
            cx.err(
                anchor,
                format!("{what} has no `listen` (the address the webhook receives on)"),
                LISTEN_EXPECTED,
            );
        }
        listen_addr(cx, t, allow_non_loopback, ("the webhook", &what))
    };

    let workspace = get_path(cx, t, "workspace").unwrap_or_else(|| {
        if is_gateway {
            state_dir.join("gateway")
        } else {
            state_dir.join("channels").join(name)
        }
    });

    let restart = match t.get("restart") {
        None => RestartConfig::default(),
        Some(e) => match as_table(cx, e, &format!("{what} restart")) {
            None => RestartConfig::default(),
            Some(rt) => restart(cx, rt, &what),
        },
    };

    let mut environment = BTreeMap::new();
    if let Some(e) = t.get("environment") {
        if let Some(et) = as_table(cx, e, &format!("{what} environment")) {
            for v in &et.entries {
                if !valid_env_name(&v.key) {
                    cx.err(
                        &v.key_span,
                        format!("invalid environment variable name {:?}", v.key),
                        "a name of letters, digits and `_`, not starting with a digit",
                    );
                    continue;
                }
                if v.key.starts_with("CARAPACE_") {
                    cx.err(
                        &v.key_span,
                        format!(
                            "`{}`: CARAPACE_* variables are set by the supervisor",
                            v.key
                        ),
                        "another name",
                    );
                    continue;
                }
                match &v.node.val {
                    Val::Str(s) if s.contains('\0') => {
                        cx.err(
                            &v.node.span,
                            "the value contains a NUL byte",
                            "a string without NUL",
                        );
                    }
                    Val::Str(s) => {
                        environment.insert(v.key.clone(), s.clone());
                    }
                    other => cx.err(
                        &v.node.span,
                        format!("invalid type: {} for `{}`", other.type_name(), v.key),
                        "a string",
                    ),
                }
            }
        }
    }

    let settings = if is_gateway {
        Some(gateway_settings(cx, t).to_string())
    } else {
        kind.map(|k| channel::settings(cx, t, (anchor, &what), name, k).to_string())
    };

    ChildConfig {
        name: name.to_string(),
        is_gateway,
        program,
        args,
        profile,
        listen,
        allow_non_loopback,
        workspace,
        restart,
        environment,
        settings,
    }
}

/// `listen` of a table: an address and port, loopback unless `allow_non_loopback`; None when
/// absent, `"none"`, or wrong (reported).
fn listen_addr(
    cx: &mut Cx<'_>,
    t: &Table,
    allow_non_loopback: bool,
    (who, what): (&str, &str),
) -> Option<SocketAddr> {
    match get_str(cx, t, "listen", LISTEN_EXPECTED)? {
        ("none", _) => None,
        (s, e) => match s.parse::<SocketAddr>() {
            Err(_) => {
                cx.err(
                    &e.node.span,
                    format!("`listen` = {s:?} is not an address and port"),
                    LISTEN_EXPECTED,
                );
                None
            }
            Ok(a) if a.port() == 0 => {
                cx.err(
                    &e.node.span,
                    "`listen` has port 0 (a random port nobody can find)",
                    "a fixed port",
                );
                None
            }
            Ok(a) if !a.ip().is_loopback() && !allow_non_loopback => {
                cx.err(
                    &e.node.span,
                    format!(
                        "`listen` = {s:?} is not a loopback address: {who} would be reachable \
                         from the network"
                    ),
                    &format!(
                        "a loopback address (127.0.0.1, ::1), or `allow_non_loopback = true` \
                         in {what} if it must be reachable from the network"
                    ),
                );
                None
            }
            Ok(a) => Some(a),
        },
    }
}

const CLIENTS_KEYS: &[&str] = &[
    "rate_per_second",
    "burst",
    "max_connections",
    "max_message_bytes",
    "idle_timeout",
    "max_in_flight",
];
const AGENT_KEYS: &[&str] = &[
    "base_url",
    "model",
    "api_key_secret",
    "max_turns",
    "token_budget",
    "timeout",
    "max_tokens",
    "system_prompt",
    "max_concurrent_runs",
    "answer_channels",
];
const BASE_URL_EXPECTED: &str =
    "an http:// or https:// URL of an OpenAI-compatible API, e.g. \"https://api.openai.com/v1\" or \"http://127.0.0.1:8080/v1\"";

/// An integer in `range`, or None (and an error) when written wrong; None when absent.
fn get_int(
    cx: &mut Cx<'_>,
    t: &Table,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Option<i64> {
    let e = t.get(key)?;
    let expected = format!("an integer from {} to {}", range.start(), range.end());
    match &e.node.val {
        Val::Int(i) if range.contains(i) => Some(*i),
        Val::Int(i) => {
            cx.err(
                &e.node.span,
                format!("`{key}` = {i} is out of range"),
                &expected,
            );
            None
        }
        _ => {
            type_err(cx, e, &expected);
            None
        }
    }
}

/// Whether `url` looks like an endpoint the gateway can reach: http(s)://HOST[:PORT][/PATH],
/// without credentials, query or fragment. The reason when not.
fn check_base_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("not an http:// or https:// URL")?;
    if url.contains(['?', '#', ' ', '\\']) || url.chars().any(char::is_control) {
        return Err("a query, fragment, space or control character");
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err("credentials in the URL (name the API key with `api_key_secret`)");
    }
    let host = match authority.strip_prefix('[') {
        Some(r) => r.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.parse::<u16>().is_ok_and(|p| p != 0) {
                h
            } else {
                ""
            }
        }),
    };
    if host.is_empty() {
        return Err("no host, or a bad port");
    }
    Ok(())
}

/// `[gateway.clients]` and `[gateway.agent]` as the gateway's settings JSON (see
/// gateway/src/settings.rs; absent keys are left to the gateway's defaults).
fn gateway_settings(cx: &mut Cx<'_>, t: &Table) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(e) = t.get("clients") {
        if let Some(ct) = as_table(cx, e, "gateway.clients") {
            unknown_keys(cx, ct, CLIENTS_KEYS, "[gateway.clients]");
            let mut c = serde_json::Map::new();
            for (key, range) in [
                ("rate_per_second", 1..=100_000),
                ("burst", 1..=100_000),
                ("max_connections", 1..=65_536),
                ("max_message_bytes", 1024..=64 << 20),
                ("max_in_flight", 1..=1024),
            ] {
                if let Some(v) = get_int(cx, ct, key, range) {
                    c.insert(key.into(), v.into());
                }
            }
            if ct.get("idle_timeout").is_some() {
                let d = get_duration(cx, ct, "idle_timeout", Duration::from_secs(120));
                c.insert(
                    "idle_timeout_ms".into(),
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).into(),
                );
            }
            out.insert("clients".into(), c.into());
        }
    }
    if let Some(e) = t.get("agent") {
        if let Some(at) = as_table(cx, e, "gateway.agent") {
            unknown_keys(cx, at, AGENT_KEYS, "[gateway.agent]");
            let mut a = serde_json::Map::new();
            match get_str(cx, at, "base_url", BASE_URL_EXPECTED) {
                Some((s, e)) => {
                    if let Err(why) = check_base_url(s) {
                        cx.err(
                            &e.node.span,
                            format!("`base_url` = {s:?}: {why}"),
                            BASE_URL_EXPECTED,
                        );
                    }
                    a.insert("base_url".into(), s.into());
                }
                None if at.get("base_url").is_none() => cx.err(
                    &e.key_span,
                    "[gateway.agent] has no `base_url`",
                    BASE_URL_EXPECTED,
                ),
                None => {}
            }
            match get_str(cx, at, "model", "the model's name, e.g. \"gpt-4o-mini\"") {
                Some(("", e)) => cx.err(
                    &e.node.span,
                    "`model` is empty",
                    "the model's name, e.g. \"gpt-4o-mini\"",
                ),
                Some((s, _)) => {
                    a.insert("model".into(), s.into());
                }
                None if at.get("model").is_none() => cx.err(
                    &e.key_span,
                    "[gateway.agent] has no `model`",
                    "the model's name, e.g. \"gpt-4o-mini\"",
                ),
                None => {}
            }
            if let Some((s, e)) = get_str(
                cx,
                at,
                "api_key_secret",
                "the name of a [secrets.NAME] of the policy",
            ) {
                if s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    cx.err(
                        &e.node.span,
                        format!("`api_key_secret` = {s:?} is not a secret name"),
                        "the name of a [secrets.NAME] of the policy",
                    );
                }
                a.insert("api_key_secret".into(), s.into());
            }
            for (key, range) in [
                ("max_turns", 1..=1000),
                ("token_budget", 1..=100_000_000),
                ("max_tokens", 1..=1_000_000),
                ("max_concurrent_runs", 1..=64),
            ] {
                if let Some(v) = get_int(cx, at, key, range) {
                    a.insert(key.into(), v.into());
                }
            }
            if at.get("timeout").is_some() {
                let d = get_duration(cx, at, "timeout", Duration::from_secs(120));
                a.insert(
                    "timeout_ms".into(),
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).into(),
                );
            }
            if let Some((s, _)) = get_str(cx, at, "system_prompt", "a string") {
                a.insert("system_prompt".into(), s.into());
            }
            if at.get("answer_channels").is_some() {
                let b = get_bool(cx, at, "answer_channels", true);
                a.insert("answer_channels".into(), b.into());
            }
            out.insert("agent".into(), a.into());
        }
    }
    serde_json::Value::Object(out)
}

fn valid_env_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn restart(cx: &mut Cx<'_>, t: &Table, what: &str) -> RestartConfig {
    unknown_keys(cx, t, RESTART_KEYS, &format!("{what} restart"));
    let d = RestartConfig::default();
    let initial_delay = get_duration(cx, t, "initial_delay", d.initial_delay);
    let max_delay = get_duration(cx, t, "max_delay", d.max_delay);
    if initial_delay > max_delay {
        let span = t
            .get("max_delay")
            .or_else(|| t.get("initial_delay"))
            .map_or(0..0, |e| e.node.span.clone());
        cx.err(
            &span,
            format!(
                "`max_delay` ({max_delay:?}) is shorter than `initial_delay` ({initial_delay:?})"
            ),
            "initial_delay <= max_delay",
        );
    }
    let crash_loop_restarts = match t.get("crash_loop_restarts") {
        None => d.crash_loop_restarts,
        Some(e) => match &e.node.val {
            Val::Int(i) if (1..=1000).contains(i) => {
                u32::try_from(*i).unwrap_or(d.crash_loop_restarts)
            }
            Val::Int(i) => {
                cx.err(
                    &e.node.span,
                    format!("`crash_loop_restarts` = {i} is out of range"),
                    "an integer from 1 to 1000",
                );
                d.crash_loop_restarts
            }
            _ => {
                type_err(cx, e, "an integer from 1 to 1000");
                d.crash_loop_restarts
            }
        },
    };
    let crash_loop_window = get_duration(cx, t, "crash_loop_window", d.crash_loop_window);
    RestartConfig {
        initial_delay,
        max_delay,
        crash_loop_restarts,
        crash_loop_window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "test.toml")
    }

    /// The messages of a configuration that must fail, each with its line:column.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(c) => panic!("accepted: {text}\n{c:?}"),
            Err(e) => e
                .diagnostics()
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect(),
        }
    }

    fn has(errs: &[String], needle: &str) -> bool {
        errs.iter().any(|e| e.contains(needle))
    }

    #[test]
    fn embedded_default_parses() {
        let c = parse(DEFAULT_CONFIG_TEXT).expect("the embedded default is valid");
        assert!(c.policy.is_empty());
        assert_eq!(c.state_dir, crate::paths::default_state_dir());
        assert_eq!(c.runtime_dir, crate::paths::default_runtime_dir());
        assert_eq!(c.log_format, LogFormat::Auto);
        assert_eq!(c.log_level, tracing::Level::INFO);
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(c.approval_timeout, Duration::from_secs(120));
        assert!(c.watchdog);
        assert_eq!(c.control_group, None);
        let gw = c.gateway.as_ref().expect("a gateway");
        assert!(gw.is_gateway);
        assert_eq!(gw.program, "carapace-gateway");
        assert_eq!(gw.profile, "gateway");
        assert_eq!(gw.listen, Some("127.0.0.1:8750".parse().unwrap()));
        assert_eq!(gw.workspace, c.state_dir.join("gateway"));
        assert_eq!(gw.restart, RestartConfig::default());
        assert!(c.channels.is_empty());
        assert_eq!(
            c.children().map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["gateway"]
        );
        // The embedded default policy has the profile the default gateway runs under.
        let policy = carapace_policy::Policy::parse(crate::cli::DEFAULT_POLICY, "default")
            .expect("default policy");
        assert!(policy.profile_names().contains(&gw.profile.as_str()));
    }

    #[test]
    fn load_without_a_file_is_the_embedded_default() {
        if Path::new(crate::paths::DEFAULT_CONFIG).exists() {
            return; // a real installation: load reads it, not the embedded default
        }
        let (c, name) = Config::load(None).expect("embedded");
        assert_eq!(name, DEFAULT_CONFIG_NAME);
        assert_eq!(c, parse(DEFAULT_CONFIG_TEXT).unwrap());
    }

    #[test]
    fn load_reads_a_file_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[supervisor]\nstate_dir = \"/srv/c\"\n").unwrap();
        let (c, name) = Config::load(Some(&p)).expect("load");
        assert_eq!(name, p.display().to_string());
        assert_eq!(c.state_dir, PathBuf::from("/srv/c"));
        assert_eq!(c.gateway, None, "no [gateway] table = no gateway");
        let missing = dir.path().join("nope.toml");
        let e = Config::load(Some(&missing)).expect_err("missing");
        assert!(matches!(e, ConfigErrors::Read { .. }));
        assert!(e.to_string().contains("nope.toml"), "{e}");
        std::fs::write(&p, "[supervisor]\nstate_dir = 5\n").unwrap();
        let e = Config::load(Some(&p)).expect_err("invalid");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:2:13: error: ", p.display())),
            "{e}"
        );
    }

    #[test]
    fn a_full_file() {
        let c = parse(
            r#"
# comment
[supervisor]
policy = ["/etc/carapace/a.toml", '/etc/carapace/b.toml']  # merged in order
state_dir = "/var/lib/c"
runtime_dir = "/run/c"
log_format = "json"
log_level = "debug"
stop_timeout = 3
approval_timeout = "5m"
watchdog = false

[control]
group = 0

[gateway]
program = "/opt/gw/bin/gw"
args = ["--flag", "x y"]
profile = "gw"
listen = "[::1]:9000"
workspace = "/srv/gw"
restart.initial_delay = "1s"
restart.max_delay = "1m"
environment = { RUST_LOG = "debug", "LANG" = "C.UTF-8" }

[channels.tg-1]
program = "tg"
[channels.tg-1.restart]
crash_loop_restarts = 0x0a
crash_loop_window = "2h"

[channels.mail]
program = "/usr/lib/carapace/mail"
profile = "channel-mail"
"#,
        )
        .expect("valid");
        assert_eq!(
            c.policy,
            vec![
                PathBuf::from("/etc/carapace/a.toml"),
                PathBuf::from("/etc/carapace/b.toml")
            ]
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert_eq!(c.stop_timeout, Duration::from_secs(3));
        assert_eq!(c.approval_timeout, Duration::from_secs(300));
        assert!(!c.watchdog);
        assert_eq!(c.control_group, Some(0));
        let gw = c.gateway.clone().unwrap();
        assert_eq!(gw.args, vec!["--flag", "x y"]);
        assert_eq!(gw.listen, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(gw.workspace, PathBuf::from("/srv/gw"));
        assert_eq!(gw.restart.initial_delay, Duration::from_secs(1));
        assert_eq!(gw.restart.max_delay, Duration::from_secs(60));
        assert_eq!(gw.restart.crash_loop_restarts, 5);
        assert_eq!(
            gw.environment.get("LANG").map(String::as_str),
            Some("C.UTF-8")
        );
        assert_eq!(
            gw.resolve_program(Path::new("/usr/bin")),
            PathBuf::from("/opt/gw/bin/gw")
        );
        let tg = &c.channels["tg-1"];
        assert!(!tg.is_gateway);
        assert_eq!(tg.profile, "channel");
        assert_eq!(tg.listen, None);
        assert_eq!(tg.workspace, PathBuf::from("/var/lib/c/channels/tg-1"));
        assert_eq!(tg.restart.crash_loop_restarts, 10);
        assert_eq!(tg.restart.crash_loop_window, Duration::from_secs(7200));
        assert_eq!(
            tg.resolve_program(Path::new("/usr/bin")),
            PathBuf::from("/usr/bin/tg")
        );
        assert_eq!(
            c.children().map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["gateway", "mail", "tg-1"]
        );
    }

    #[test]
    fn an_empty_file_has_defaults_and_no_gateway() {
        let c = parse("").unwrap();
        assert_eq!(c.gateway, None);
        assert_eq!(c.children().count(), 0);
        let c = parse("[gateway]\n").unwrap();
        let gw = c.gateway.unwrap();
        assert_eq!(gw.program, "carapace-gateway");
        assert_eq!(gw.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
        let c = parse("[gateway]\nlisten = \"none\"\n").unwrap();
        assert_eq!(c.gateway.unwrap().listen, None);
    }

    #[test]
    fn unknown_keys_with_suggestions_all_reported() {
        let e = errors(
            "[supervisor]\nstate_dri = \"/x\"\nwatchdgo = true\n[gateway]\nprofil = \"g\"\nlisten_addr = \"x\"\n[gateway.restart]\nmax_dealy = 1\n[extra]\n",
        );
        assert!(
            has(
                &e,
                "2:1: unknown key `state_dri` in [supervisor]; did you mean `state_dir`?"
            ),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "3:1: unknown key `watchdgo` in [supervisor]; did you mean `watchdog`?"
            ),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "5:1: unknown key `profil` in [gateway]; did you mean `profile`?"
            ),
            "{e:?}"
        );
        assert!(
            has(&e, "6:1: unknown key `listen_addr` in [gateway]"),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "8:1: unknown key `max_dealy` in [gateway] restart; did you mean `max_delay`?"
            ),
            "{e:?}"
        );
        assert!(
            has(&e, "9:2: unknown key `extra` in the top level"),
            "{e:?}"
        );
        assert_eq!(e.len(), 6, "{e:?}");
        // Only a webhook channel listens.
        let e = errors("[channels.a]\nprogram = \"a\"\nlisten = \"127.0.0.1:1\"\n");
        assert!(
            has(
                &e,
                "3:1: `listen` is a key of kind = \"webhook\", and [channels.a] has no `kind`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn display_is_located_with_expected_and_caret() {
        let e = parse("[supervisor]\nlog_level = \"loud\"\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("test.toml:2:13: error: unknown log level \"loud\""),
            "{s}"
        );
        assert!(s.contains("expected: one of \"error\", \"warn\""), "{s}");
        assert!(s.contains("2 | log_level = \"loud\""), "{s}");
        assert!(s.contains("|             ^"), "{s}");
    }

    #[test]
    fn wrong_types() {
        let e = errors(
            "supervisor = 1\ncontrol = []\n[gateway]\nprogram = 1\nargs = \"x\"\nallow_non_loopback = \"yes\"\nenvironment = { A = 1 }\nrestart = 3\n",
        );
        assert!(
            has(&e, "1:14: supervisor must be a table, not an integer"),
            "{e:?}"
        );
        assert!(
            has(&e, "2:11: control must be a table, not an array"),
            "{e:?}"
        );
        assert!(
            has(&e, "4:11: invalid type: an integer for `program`"),
            "{e:?}"
        );
        assert!(has(&e, "5:8: invalid type: a string for `args`"), "{e:?}");
        assert!(
            has(&e, "6:22: invalid type: a string for `allow_non_loopback`"),
            "{e:?}"
        );
        assert!(has(&e, "7:21: invalid type: an integer for `A`"), "{e:?}");
        assert!(has(&e, "8:11: [gateway] restart must be a table"), "{e:?}");
        let e = errors("[supervisor]\npolicy = 3\n[gateway]\nargs = [\"a\", 2]\n");
        assert!(
            has(&e, "2:10: invalid type: an integer for `policy`"),
            "{e:?}"
        );
        assert!(has(&e, "4:14: invalid type: an integer in `args`"), "{e:?}");
    }

    #[test]
    fn paths_must_be_absolute_and_normalized() {
        let e = errors(
            "[supervisor]\npolicy = [\"policy.toml\", \"/etc/../p\"]\nstate_dir = \"var/lib\"\nruntime_dir = \"/run/c/\"\n[gateway]\nworkspace = \"/a//b\"\nprogram = \"bin/gw\"\n",
        );
        assert!(
            has(
                &e,
                "2:11: policy file \"policy.toml\": the path is relative"
            ),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "2:26: policy file \"/etc/../p\": the path contains a `..` component"
            ),
            "{e:?}"
        );
        assert!(
            has(&e, "3:13: `state_dir` = \"var/lib\": the path is relative"),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "4:15: `runtime_dir` = \"/run/c/\": the path ends with `/`"
            ),
            "{e:?}"
        );
        assert!(
            has(&e, "6:13: `workspace` = \"/a//b\": the path contains `//`"),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "7:11: `program` = \"bin/gw\": a relative path with `/` is ambiguous"
            ),
            "{e:?}"
        );
        let e = errors("[supervisor]\nstate_dir = \"/x\"\nruntime_dir = \"/x\"\n");
        assert!(
            has(
                &e,
                "3:15: `runtime_dir` is the same directory as `state_dir`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn listen_addresses() {
        let e = errors("[gateway]\nlisten = \"0.0.0.0:8750\"\n");
        assert!(
            has(
                &e,
                "2:10: `listen` = \"0.0.0.0:8750\" is not a loopback address"
            ),
            "{e:?}"
        );
        let c = parse("[gateway]\nlisten = \"0.0.0.0:8750\"\nallow_non_loopback = true\n").unwrap();
        assert_eq!(
            c.gateway.unwrap().listen,
            Some("0.0.0.0:8750".parse().unwrap())
        );
        for bad in ["localhost:8750", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = errors(&format!("[gateway]\nlisten = \"{bad}\"\n"));
            assert!(has(&e, "is not an address and port"), "{bad}: {e:?}");
        }
        let e = errors("[gateway]\nlisten = \"127.0.0.1:0\"\n");
        assert!(has(&e, "port 0"), "{e:?}");
        assert!(parse("[gateway]\nlisten = \"[::1]:1\"\n").is_ok());
    }

    #[test]
    fn durations_and_restart_order() {
        let e = errors(
            "[supervisor]\nstop_timeout = \"0s\"\napproval_timeout = \"soon\"\n[gateway.restart]\ninitial_delay = \"10s\"\nmax_delay = \"2s\"\ncrash_loop_restarts = 0\ncrash_loop_window = \"2d\"\n",
        );
        assert!(
            has(&e, "2:16: `stop_timeout`: a duration of 0 is impossible"),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "3:20: `approval_timeout`: `soon` does not start with a number"
            ),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "6:13: `max_delay` (2s) is shorter than `initial_delay` (10s)"
            ),
            "{e:?}"
        );
        assert!(
            has(&e, "7:23: `crash_loop_restarts` = 0 is out of range"),
            "{e:?}"
        );
        assert!(
            has(&e, "8:21: `crash_loop_window`: unknown duration unit `d`"),
            "{e:?}"
        );
        let e = errors("[supervisor]\nstop_timeout = \"25h\"\napproval_timeout = -1\n");
        assert!(has(&e, "longer than a day"), "{e:?}");
        assert!(has(&e, "negative duration -1"), "{e:?}");
        let c =
            parse("[gateway.restart]\ninitial_delay = \"250ms\"\nmax_delay = \"250ms\"\n").unwrap();
        assert_eq!(
            c.gateway.unwrap().restart.max_delay,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn channel_names_and_programs() {
        let e = errors(
            "[channels.Telegram]\nprogram = \"t\"\n[channels.gateway]\nprogram = \"g\"\n[channels.\"a b\"]\nprogram = \"x\"\n[channels.ok]\nprofile = \"channel\"\n",
        );
        assert!(has(&e, "1:11: invalid channel name \"Telegram\""), "{e:?}");
        assert!(has(&e, "3:11: invalid channel name \"gateway\""), "{e:?}");
        assert!(has(&e, "5:11: invalid channel name \"a b\""), "{e:?}");
        assert!(
            has(&e, "7:11: [channels.ok] has no `kind` and no `program`"),
            "{e:?}"
        );
        let e = errors("channels = 1\n");
        assert!(has(&e, "channels must be a table"), "{e:?}");
    }

    #[test]
    fn workspaces_do_not_overlap() {
        let e = errors(
            "[supervisor]\nstate_dir = \"/s\"\n[gateway]\nworkspace = \"/w\"\n[channels.a]\nprogram = \"a\"\nworkspace = \"/w/a\"\n[channels.b]\nprogram = \"b\"\nworkspace = \"/\"\n",
        );
        assert!(
            has(
                &e,
                "7:13: the workspace of `a` (/w/a) overlaps the workspace of `gateway`"
            ),
            "{e:?}"
        );
        assert!(has(&e, "10:13: the workspace of `b` (/) overlaps"), "{e:?}");
        let e = errors("[supervisor]\nstate_dir = \"/s/state\"\n[gateway]\nworkspace = \"/s\"\n");
        assert!(
            has(
                &e,
                "4:13: the workspace of `gateway` (/s) contains the supervisor's state"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn groups() {
        let c = parse("[control]\ngroup = \"root\"\n").unwrap();
        assert_eq!(c.control_group, Some(0));
        assert_eq!(
            parse("[control]\ngroup = \"1234\"\n")
                .unwrap()
                .control_group,
            Some(1234)
        );
        let e = errors("[control]\ngroup = \"no-such-group-carapace\"\n");
        assert!(
            has(
                &e,
                "2:9: no group named \"no-such-group-carapace\" on this system"
            ),
            "{e:?}"
        );
        let e = errors("[control]\ngroup = -1\n");
        assert!(has(&e, "gid -1 is out of range"), "{e:?}");
        let e = errors("[control]\ngroup = 4294967295\n");
        assert!(has(&e, "out of range"), "{e:?}");
        let e = errors("[control]\ngroup = true\n");
        assert!(has(&e, "invalid type: a boolean for `group`"), "{e:?}");
    }

    #[test]
    fn environment_names() {
        let e = errors(
            "[gateway.environment]\n\"1X\" = \"a\"\nCARAPACE_BROKER_FD = \"9\"\nOK = \"a\\u0000b\"\n",
        );
        assert!(
            has(&e, "2:1: invalid environment variable name \"1X\""),
            "{e:?}"
        );
        assert!(
            has(
                &e,
                "3:1: `CARAPACE_BROKER_FD`: CARAPACE_* variables are set by the supervisor"
            ),
            "{e:?}"
        );
        assert!(has(&e, "4:6: the value contains a NUL byte"), "{e:?}");
    }

    #[test]
    fn syntax_errors_are_located_and_reported_alone() {
        let e = errors(
            "[supervisor\nlog_level = info\nwatchdog = true true\nstate_dir = \"/x\n[[gateway]]\nkey\n",
        );
        assert!(has(&e, "1:12: unclosed table"), "{e:?}");
        assert!(has(&e, "6:4: key with no value"), "{e:?}");
        // With a syntax error, only syntax errors: no cascade of misplaced keys.
        let e = errors(
            "[gateway
program = \"gw\"
bogus = 1
",
        );
        assert_eq!(e, vec!["1:9: unclosed table"]);
    }

    #[test]
    fn values_of_a_type_no_key_takes_are_located_type_errors() {
        let e = errors("[supervisor]\nstop_timeout = 1.5\nwatchdog = 1979-05-27\n");
        assert!(
            has(&e, "2:16: `stop_timeout`: a float is not a duration"),
            "{e:?}"
        );
        assert!(
            has(&e, "3:12: invalid type: a datetime for `watchdog`"),
            "{e:?}"
        );
        let e = errors("[supervisor]\nstop_timeout = 99999999999999999999\n");
        assert!(
            has(
                &e,
                "2:16: `99999999999999999999` is not an integer that fits in 64 bits"
            ),
            "{e:?}"
        );
        let e = errors("[[gateway]]\n");
        assert!(
            has(&e, "1:1: gateway must be a table, not an array"),
            "{e:?}"
        );
    }

    #[test]
    fn gateway_settings_tables() {
        let c = parse(
            "[gateway]\n[gateway.clients]\nrate_per_second = 5\nburst = 9\nidle_timeout = \"30s\"\n\
             [gateway.agent]\nbase_url = \"http://127.0.0.1:8080/v1\"\nmodel = \"m\"\n\
             api_key_secret = \"llm_key\"\nmax_turns = 3\ntoken_budget = 1000\ntimeout = \"5s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let gw = c.gateway.unwrap_or_else(|| panic!("no gateway"));
        let v: serde_json::Value =
            serde_json::from_str(gw.settings.as_deref().unwrap_or("")).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({
                "clients": {"rate_per_second": 5, "burst": 9, "idle_timeout_ms": 30000},
                "agent": {"base_url": "http://127.0.0.1:8080/v1", "model": "m",
                          "api_key_secret": "llm_key", "max_turns": 3, "token_budget": 1000,
                          "timeout_ms": 5000}
            })
        );
        // Without the tables: an empty object (the gateway's defaults, no model).
        let c = parse("[gateway]\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.gateway.and_then(|g| g.settings).as_deref(), Some("{}"));
        let e = errors(
            "[gateway.agent]\nmodel = \"\"\nbase = 1\n[gateway.clients]\nburst = 0\nmax_message_bytes = \"1MiB\"\n",
        );
        assert!(has(&e, "[gateway.agent] has no `base_url`"), "{e:?}");
        assert!(has(&e, "2:9: `model` is empty"), "{e:?}");
        assert!(
            has(&e, "3:1: unknown key `base` in [gateway.agent]"),
            "{e:?}"
        );
        assert!(has(&e, "5:9: `burst` = 0 is out of range"), "{e:?}");
        assert!(
            has(&e, "6:21: invalid type: a string for `max_message_bytes`"),
            "{e:?}"
        );
        for bad in [
            "ftp://x/v1",
            "http://user:pw@x/v1",
            "http://x:0/v1",
            "http://x/v1?key=1",
            "https://",
        ] {
            let e = errors(&format!(
                "[gateway.agent]\nmodel = \"m\"\nbase_url = \"{bad}\"\n"
            ));
            assert!(has(&e, "3:12: `base_url`"), "{bad}: {e:?}");
        }
        let e = errors("[channels.c]\nprogram = \"p\"\nagent = {}\n");
        assert!(has(&e, "unknown key `agent` in [channels.c]"), "{e:?}");
    }

    #[test]
    fn random_mutations_never_panic() {
        // Deterministic xorshift: the same 3000 mutants of the default file on every run, each
        // with a few characters deleted, duplicated or replaced by TOML-significant ones.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base: Vec<char> = DEFAULT_CONFIG_TEXT.chars().collect();
        let alphabet: Vec<char> = "[]{}=\"',.#\\\n\r\t 0-_xé+:ab1".chars().collect();
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..3000 {
            let mut t = base.clone();
            for _ in 0..(1 + next() % 4) {
                let i = (next() as usize) % t.len();
                match next() % 3 {
                    0 => {
                        t.remove(i);
                    }
                    1 => {
                        let c = t[i];
                        t.insert(i, c);
                    }
                    _ => t[i] = alphabet[(next() as usize) % alphabet.len()],
                }
            }
            let text: String = t.into_iter().collect();
            match parse(&text) {
                Ok(_) => ok += 1,
                Err(e) => {
                    // Every error is located inside the file and printable.
                    for d in e.diagnostics() {
                        assert!(d.line >= 1 && d.line <= text.lines().count() + 1, "{d}");
                    }
                    assert!(!e.to_string().is_empty());
                    bad += 1;
                }
            }
        }
        assert!(ok > 0 && bad > 0, "mutants: {ok} valid, {bad} invalid");
    }

    #[test]
    fn garbage_never_panics() {
        // Every prefix of a valid file, and some bytes that are not TOML at all.
        let text = format!("{DEFAULT_CONFIG_TEXT}\n[channels.x]\nprogram = \"é\"\nenvironment = {{ A = \"\\u00e9\" }}\n");
        for i in 0..text.len() {
            if text.is_char_boundary(i) {
                let _ = parse(&text[..i]);
            }
        }
        for junk in [
            "\"",
            "'",
            "[",
            "{",
            "a = {",
            "a = [[[[",
            "a = \"\\u",
            "a = \"\\U0011FFFF\"",
            "a = +",
            "a = -",
            "a = 0x",
            "é = 1",
            "a.=1",
            "[a.]",
            "\u{0}",
        ] {
            let _ = parse(junk);
        }
        let deep = format!("a = {}{}", "[".repeat(100), "]".repeat(100));
        let e = errors(&deep);
        assert!(
            !e.is_empty() && e.iter().all(|m| m.starts_with("1:")),
            "{e:?}"
        );
        let deep = format!("a = {}{}", "[".repeat(40), "]".repeat(40));
        assert!(
            has(&errors(&deep), "nested too deeply"),
            "{:?}",
            errors(&deep)
        );
    }

    fn settings_of(c: &ChildConfig) -> serde_json::Value {
        serde_json::from_str(c.settings.as_deref().expect("settings")).expect("json")
    }

    #[test]
    fn built_in_channel_kinds_become_adapter_settings() {
        let c = parse(
            r#"
[channels.tg]
kind = "telegram"
profile = "telegram"
token_secret = "telegram_bot_token"
api_base = "http://127.0.0.1:9999/"
poll_timeout = "5s"

[channels.mail]
kind = "email"
imap = "imap.example.com:993"
smtp = "smtp.example.com:587"
username = "agent@example.com"
password_secret = "mail_password"
from = "agent@example.com"

[channels.hook]
kind = "webhook"
listen = "127.0.0.1:8751"
hmac_secret = "hook_key"
url = "https://hooks.example.com/agent"
"#,
        )
        .expect("valid");
        let tg = &c.channels["tg"];
        assert_eq!(tg.program, "carapace-channel");
        assert_eq!(tg.listen, None);
        assert_eq!(
            settings_of(tg),
            serde_json::json!({"channel": "tg", "state_dir": "/workspace", "kind": "telegram",
                "api_base": "http://127.0.0.1:9999", "token_secret": "telegram_bot_token",
                "poll_timeout_ms": 5000})
        );
        let mail = settings_of(&c.channels["mail"]);
        assert_eq!(mail["imap_security"], "tls");
        assert_eq!(mail["smtp_security"], "starttls");
        assert_eq!(mail["poll_interval_ms"], 60000);
        assert_eq!(mail["password_secret"], "mail_password");
        let hook = &c.channels["hook"];
        assert_eq!(hook.listen, Some("127.0.0.1:8751".parse().unwrap()));
        assert_eq!(settings_of(hook)["hmac_secret"], "hook_key");
        // A channel of the operator's own keeps working without a kind, and gets no settings.
        let own = parse("[channels.own]\nprogram = \"/opt/a\"\n").expect("valid");
        assert_eq!(own.channels["own"].settings, None);
    }

    #[test]
    fn channel_kind_errors_are_located() {
        let e = errors("[channels.a]\nkind = \"irc\"\n");
        assert!(has(&e, "2:8: unknown channel kind \"irc\""), "{e:?}");
        let e = errors("[channels.a]\nkind = \"telegram\"\n");
        assert!(has(&e, "1:11: [channels.a] has no `token_secret`"), "{e:?}");
        let e = errors(
            "[channels.a]\nkind = \"telegram\"\ntoken_secret = \"t\"\napi_base = \"http://api.telegram.org\"\n",
        );
        assert!(
            has(
                &e,
                "4:12: `api_base` = \"http://api.telegram.org\": plain http"
            ),
            "{e:?}"
        );
        let e = errors(
            "[channels.m]\nkind = \"email\"\nimap = \"mail.example.com:143\"\nimap_security = \"plain\"\nsmtp = \"mail.example.com\"\nusername = \"u\"\npassword_secret = \"p\"\nfrom = \"nobody\"\n",
        );
        assert!(
            has(&e, "4:17: `imap_security` = \"plain\" for `imap`"),
            "{e:?}"
        );
        assert!(
            has(&e, "5:8: `smtp` = \"mail.example.com\": no `:port`"),
            "{e:?}"
        );
        assert!(
            has(&e, "8:8: `from` = \"nobody\" is not an address"),
            "{e:?}"
        );
        // Plain transport to loopback is fine (a local server, tests).
        parse("[channels.m]\nkind = \"email\"\nimap = \"127.0.0.1:1143\"\nimap_security = \"plain\"\nsmtp = \"[::1]:2525\"\nsmtp_security = \"plain\"\nusername = \"u\"\npassword_secret = \"p\"\nfrom = \"a@b\"\n")
            .expect("loopback plain is allowed");
        let e = errors("[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\n");
        assert!(has(&e, "1:11: [channels.w] has no `listen`"), "{e:?}");
        let e = errors(
            "[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\nlisten = \"0.0.0.0:80\"\n",
        );
        assert!(
            has(&e, "the webhook would be reachable from the network"),
            "{e:?}"
        );
        // Keys of another kind, or of a kind never named.
        let e = errors("[channels.w]\nkind = \"webhook\"\nhmac_secret = \"k\"\nlisten = \"127.0.0.1:1\"\ntoken_secret = \"t\"\n");
        assert!(
            has(&e, "5:1: unknown key `token_secret` in [channels.w]"),
            "{e:?}"
        );
        let e = errors("[channels.w]\nprogram = \"/opt/a\"\ntoken_secret = \"t\"\n");
        assert!(
            has(&e, "3:1: `token_secret` is a key of kind = \"telegram\""),
            "{e:?}"
        );
        let e = errors("[channels.a]\nprogram = \"a\"\nlisten = \"127.0.0.1:1\"\n");
        assert!(
            has(&e, "unknown key `listen`") || has(&e, "kind = \"webhook\""),
            "{e:?}"
        );
    }
}
