//! The supervisor's log: `tracing` events, one record per event, in one of three formats
//! (chosen by `log_format` in the configuration):
//!
//! - **text**: `2026-11-21T14:30:16.123456Z  INFO message key=value ...` on stderr (a
//!   terminal, a file);
//! - **journal**: when stderr is connected to the journal, each event is sent through journald's
//!   native protocol ([`journal`]) with every field as a journal field (`CHILD=gateway`,
//!   `DECISION=deny`, ...) beside `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER=carapace`,
//!   `CODE_FILE`, `CODE_LINE` and `TARGET`. Otherwise (stderr is not the journal stream, the
//!   native socket cannot be reached, or a send fails) `<6>message key=value ...` lines on
//!   stderr: no timestamp (journald adds its own) and the syslog priority as a `<N>` prefix,
//!   which systemd turns into the record's PRIORITY (`SyslogLevelPrefix=`, on by default):
//!   error 3, warn 4, info 6, debug and trace 7;
//! - **json**: `{"ts":..,"level":..,"target":..,"message":..,<fields>..}` for log shippers
//!   (a field named like one of the four fixed keys is written as `field.<name>`).
//!
//! `auto` is journal when stderr is connected to the journal (`JOURNAL_STREAM` names the
//! device and inode of fd 2, as systemd sets it for `StandardError=journal`), else text.
//! Newlines and other control characters in messages and fields of lines are escaped (`\n`), so
//! a child's output relayed into a field cannot forge a line of its own; native records carry
//! such values length-prefixed. `CARAPACE_LOG` (an `EnvFilter` directive such as
//! `info,carapace_broker=debug`) overrides the configured level.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

pub mod journal;
use journal::{JournalSocket, Origin};

/// Environment variable overriding the configured level with an `EnvFilter` directive.
pub const LOG_ENV: &str = "CARAPACE_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Journal when stderr is the journal stream (`JOURNAL_STREAM`), else text.
    Auto,
    Text,
    Journal,
    Json,
}

impl FromStr for LogFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "journal" => LogFormat::Journal,
            "json" => LogFormat::Json,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Journal => "journal",
            LogFormat::Json => "json",
        })
    }
}

impl LogFormat {
    /// `Auto` decided: journal when stderr is connected to the journal
    /// ([`journal::stderr_is_journal`]), else text; others unchanged.
    pub fn resolve(self) -> LogFormat {
        self.resolve_with(journal::stderr_is_journal())
    }

    fn resolve_with(self, journal_stream: bool) -> LogFormat {
        match self {
            LogFormat::Auto if journal_stream => LogFormat::Journal,
            LogFormat::Auto => LogFormat::Text,
            f => f,
        }
    }
}

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("{LOG_ENV}: invalid filter directive")]
    Filter(#[source] tracing_subscriber::filter::FromEnvError),
    #[error("a global logger is already installed")]
    AlreadySet(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Install the global subscriber: events at `level` and above (or as `CARAPACE_LOG` says), in
/// `format` ([`LogFormat::Auto`] resolved here): native journal records when the format is
/// journal and stderr is the journal stream, else lines on stderr.
pub fn init(format: LogFormat, level: Level) -> Result<(), LoggingError> {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::from_level(level).into())
        .with_env_var(LOG_ENV)
        .from_env()
        .map_err(LoggingError::Filter)?;
    let connected = journal::stderr_is_journal();
    let format = format.resolve_with(connected);
    let mut unreachable = None;
    if format == LogFormat::Journal && connected {
        match JournalSocket::open(Path::new(journal::JOURNAL_SOCKET)) {
            Ok(socket) => {
                return tracing_subscriber::registry()
                    .with(filter)
                    .with(JournalLayer::new(socket))
                    .try_init()
                    .map_err(|e| LoggingError::AlreadySet(Box::new(e)));
            }
            Err(e) => unreachable = Some(crate::errors::error_chain(&e)),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(EventFormat::new(format))
        .try_init()
        .map_err(LoggingError::AlreadySet)?;
    if let Some(e) = unreachable {
        tracing::warn!(
            error = %e,
            "journald's native socket is not reachable: logging <N> lines to stderr"
        );
    }
    Ok(())
}

/// Sends each event to journald as a native record ([`journal::encode`]); an event whose send
/// fails is written to stderr as a journal line instead, and the first such failure is said
/// there once.
#[derive(Debug)]
pub struct JournalLayer {
    socket: JournalSocket,
    failed: AtomicBool,
}

impl JournalLayer {
    pub fn new(socket: JournalSocket) -> JournalLayer {
        JournalLayer {
            socket,
            failed: AtomicBool::new(false),
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans: Vec<String> = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().map(|s| s.name().to_string()).collect())
            .unwrap_or_default();
        let meta = event.metadata();
        let record = journal::encode(Origin::of(meta), &spans, &fields);
        if let Err(e) = self.socket.send(&record) {
            let mut out = String::new();
            if !self.failed.swap(true, Ordering::Relaxed) {
                let _ = writeln!(
                    out,
                    "<4>journald's native socket failed, this and later failed records go to \
                     stderr: {}",
                    crate::errors::error_chain(&e).replace('\n', " ")
                );
            }
            out.push_str(&render(
                LogFormat::Journal,
                SystemTime::now(),
                meta,
                &spans,
                fields,
            ));
            out.push('\n');
            let _ = std::io::stderr().lock().write_all(out.as_bytes());
        }
    }
}

/// The line format of one event (a `tracing_subscriber` [`FormatEvent`]); [`init`] installs it,
/// tests and other subscribers can use it directly.
#[derive(Debug, Clone, Copy)]
pub struct EventFormat {
    format: LogFormat,
}

impl EventFormat {
    /// `Auto` is taken as text here; resolve it first ([`LogFormat::resolve`]).
    pub fn new(format: LogFormat) -> Self {
        EventFormat {
            format: format.resolve_with(false),
        }
    }
}

/// syslog(3) priority of a level.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Append `s` with control characters escaped (`\n`, `\r`, `\t`, `\u{..}`) and, when `quote`,
/// also `"` and `\` (a quoted field value).
fn escape_into(out: &mut String, s: &str, quote: bool) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' | '\\' if quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// The fields of one event, in order.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    rest: Vec<(&'static str, serde_json::Value)>,
}

impl Fields {
    fn push(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.rest.push((field.name(), v));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, serde_json::Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, serde_json::Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its causes.
        self.push(field, crate::errors::error_chain(value).into());
    }
}

/// `message key=value key="quoted value"` for text and journal lines.
fn human_line(out: &mut String, spans: &[String], f: &Fields) {
    for s in spans {
        escape_into(out, s, false);
        out.push_str(": ");
    }
    escape_into(out, f.message.as_deref().unwrap_or(""), false);
    for (k, v) in &f.rest {
        out.push(' ');
        out.push_str(k);
        out.push('=');
        match v {
            serde_json::Value::String(s)
                if !s.is_empty()
                    && !s
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=') =>
            {
                out.push_str(s)
            }
            serde_json::Value::String(s) => {
                out.push('"');
                escape_into(out, s, true);
                out.push('"');
            }
            other => out.push_str(&other.to_string()),
        }
    }
}

/// The line for one event (without its newline).
fn render(
    format: LogFormat,
    now: SystemTime,
    meta: &tracing::Metadata<'_>,
    spans: &[String],
    f: Fields,
) -> String {
    let mut out = String::with_capacity(128);
    match format {
        LogFormat::Journal => {
            let _ = write!(out, "<{}>", syslog_priority(meta.level()));
            human_line(&mut out, spans, &f);
        }
        LogFormat::Json => {
            // Written by hand to keep the fixed keys first and the fields in event order
            // (serde_json's map would sort them); serde_json escapes each key and value, every
            // control character included, so the line stays one line.
            let mut pairs: Vec<(String, serde_json::Value)> = vec![
                ("ts".into(), carapace_broker::audit::rfc3339_utc(now).into()),
                ("level".into(), meta.level().as_str().into()),
                ("target".into(), meta.target().into()),
                ("message".into(), f.message.unwrap_or_default().into()),
            ];
            if !spans.is_empty() {
                pairs.push(("spans".into(), spans.to_vec().into()));
            }
            for (k, v) in f.rest {
                let key = if pairs.iter().any(|(p, _)| p == k) {
                    format!("field.{k}")
                } else {
                    k.to_string()
                };
                pairs.push((key, v));
            }
            out.push('{');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push(':');
                out.push_str(&v.to_string());
            }
            out.push('}');
        }
        LogFormat::Text | LogFormat::Auto => {
            out.push_str(&carapace_broker::audit::rfc3339_utc(now));
            let _ = write!(out, " {:>5} ", meta.level().as_str());
            human_line(&mut out, spans, &f);
        }
    }
    out
}

impl<S, N> FormatEvent<S, N> for EventFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans: Vec<String> = ctx
            .event_scope()
            .map(|scope| scope.from_root().map(|s| s.name().to_string()).collect())
            .unwrap_or_default();
        let line = render(
            self.format,
            SystemTime::now(),
            event.metadata(),
            &spans,
            fields,
        );
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests;
