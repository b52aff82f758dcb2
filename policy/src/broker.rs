//! The broker's policy sections: what a child may ask the broker for (`[profiles.NAME.broker]`),
//! the secrets the broker can hand out (`[secrets.NAME]`) and the outbound channels it can send
//! to (`[channels.NAME]`). Parsed and validated with located errors like the rest of the policy;
//! [`crate::Policy::broker_view`] gives one profile's [`BrokerRules`]: plain data plus pure
//! matching functions, which the broker's operations call. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::GlobBuilder;

use crate::glob::LazyGlob;
use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::model::S;
use crate::source::Sink;
use crate::units::{
    check_abs_path, fmt_bytes, parse_duration, parse_size, DURATION_EXPECTED, PATH_EXPECTED,
    SIZE_EXPECTED,
};

// ---------------------------------------------------------------------------------------------
// Raw shape (serde); mirrored by the schema in schema.rs.

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub connect: Option<Vec<S<RawConnect>>>,
    pub open: Option<Vec<S<RawOpen>>>,
    pub secrets: Option<S<Vec<S<String>>>>,
    pub channels: Option<S<Vec<S<String>>>>,
    pub deliver: Option<S<Vec<S<String>>>>,
    pub exec: Option<S<bool>>,
    pub auth: Option<S<bool>>,
    pub approve: Option<S<bool>>,
    pub inbound: Option<S<bool>>,
    pub rate: Option<S<RawPeerRate>>,
    pub redact: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnect {
    pub host: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub allow_private: Option<S<bool>>,
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOpen {
    pub path: Option<S<String>>,
    pub access: Option<S<String>>,
    pub approval: Option<S<String>>,
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeerRate {
    pub requests_per_second: Option<S<i64>>,
    pub burst: Option<S<i64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecret {
    pub why: Option<S<String>>,
    pub file: Option<S<String>>,
    pub credential: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannel {
    pub why: Option<S<String>>,
    pub kind: Option<S<String>>,
    pub path: Option<S<String>>,
    pub recipients: Option<S<Vec<S<String>>>>,
    pub block: Option<S<Vec<S<String>>>>,
    pub redact: Option<S<Vec<S<String>>>>,
    pub max_bytes: Option<S<toml::Value>>,
    pub rate: Option<S<RawChannelRate>>,
    pub senders: Option<S<Vec<S<String>>>>,
    pub reply_to_senders: Option<S<bool>>,
    pub retry: Option<S<RawRetry>>,
    pub operator: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub attempts: Option<S<i64>>,
    pub initial_delay: Option<S<toml::Value>>,
    pub max_delay: Option<S<toml::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannelRate {
    pub per_minute: Option<S<i64>>,
    pub burst: Option<S<i64>>,
}

/// `extends`: the broker lists (`connect`, `open`, `secrets`, `channels`, `deliver`, `redact`) append,
/// parent first; `exec`, `auth`, `approve`, `inbound` and `rate` are overridden by the child.
pub(crate) fn merge_broker(p: RawBroker, c: RawBroker) -> RawBroker {
    fn append<T>(p: Option<Vec<T>>, c: Option<Vec<T>>) -> Option<Vec<T>> {
        match (p, c) {
            (Some(mut p), Some(c)) => {
                p.extend(c);
                Some(p)
            }
            (p, c) => c.or(p),
        }
    }
    fn append_names(
        p: Option<S<Vec<S<String>>>>,
        c: Option<S<Vec<S<String>>>>,
    ) -> Option<S<Vec<S<String>>>> {
        match (p, c) {
            (Some(p), Some(c)) => {
                let span = c.span();
                let mut all = p.into_inner();
                all.extend(c.into_inner());
                Some(S::new(span, all))
            }
            (p, c) => c.or(p),
        }
    }
    RawBroker {
        connect: append(p.connect, c.connect),
        open: append(p.open, c.open),
        secrets: append_names(p.secrets, c.secrets),
        channels: append_names(p.channels, c.channels),
        deliver: append_names(p.deliver, c.deliver),
        exec: c.exec.or(p.exec),
        auth: c.auth.or(p.auth),
        approve: c.approve.or(p.approve),
        inbound: c.inbound.or(p.inbound),
        rate: c.rate.or(p.rate),
        redact: append_names(p.redact, c.redact),
    }
}

// ---------------------------------------------------------------------------------------------
// Validated model.

/// The host part of a `connect` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One DNS name (lowercase, no trailing dot).
    Exact(String),
    /// `*.SUFFIX`: any name strictly beneath SUFFIX (one or more labels), not SUFFIX itself.
    Subdomains(String),
    /// An IP address literal; matches only the same address written as a literal.
    Ip(IpAddr),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
            HostPattern::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            HostPattern::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// One `connect` rule of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRule {
    pub host: HostPattern,
    pub port: u16,
    /// Private, loopback, link-local... addresses (see [`is_non_public`]) may be connected.
    pub allow_private: bool,
    pub why: String,
    /// 1-based line of the rule in the policy file.
    pub line: usize,
}

/// What an `open` rule grants beneath its directory; each level includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpenAccess {
    /// Open existing files read-only.
    Read,
    /// Open existing files for reading and writing (including truncate and append).
    Write,
    /// Also create new files.
    Create,
}

impl OpenAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            OpenAccess::Read => "read",
            OpenAccess::Write => "write",
            OpenAccess::Create => "create",
        }
    }
}

impl fmt::Display for OpenAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `open` rule: files beneath `dir` with up to `access`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRule {
    pub dir: PathBuf,
    pub access: OpenAccess,
    /// `approval = "ask"`: each open it allows waits for an operator's approval first.
    pub ask: bool,
    pub why: String,
    pub line: usize,
}

/// Where the broker reads a secret from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An absolute path to a root-only regular file.
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

/// `[secrets.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    pub source: SecretSource,
    pub why: String,
    pub line: usize,
}

/// What a channel does with an accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    /// Appends each message as one JSON line to `path` (fsync'd).
    File { path: PathBuf },
    /// Served by the channel adapter child of the same name: `send` writes to the channel's
    /// durable outbox, the adapter takes each message, sends it and confirms.
    Adapter,
}

/// Outbound retries of an adapter channel: a failed send is tried again after
/// `initial_delay`, doubling up to `max_delay`, `attempts` times in all; then it is
/// dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1 = no retry).
    pub attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

/// Retries when the policy says nothing: 5 tries, 1 s doubling up to 5 min.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    attempts: 5,
    initial_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(300),
};

/// Most tries a `retry` may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;

impl RetryPolicy {
    /// The wait before try `attempt + 1` after try `attempt` (1-based) failed:
    /// `initial_delay * 2^(attempt-1)`, at most `max_delay`.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(31);
        self.initial_delay
            .checked_mul(1u32 << shift)
            .map_or(self.max_delay, |d| d.min(self.max_delay))
    }
}

/// Token bucket of a channel, per (identity, channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRate {
    pub per_minute: u32,
    pub burst: u32,
}

/// Default channel rate when the policy says nothing.
pub const DEFAULT_CHANNEL_RATE: ChannelRate = ChannelRate {
    per_minute: 60,
    burst: 10,
};

/// Default channel message cap when the policy says nothing.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024;

/// Token bucket of a peer's requests (all operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRate {
    pub requests_per_second: u32,
    pub burst: u32,
}

/// `[channels.NAME]`.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    pub name: String,
    pub why: String,
    pub line: usize,
    pub kind: ChannelKind,
    /// Allowed recipients: (glob text, matcher).
    pub recipients: Vec<(String, LazyGlob)>,
    /// A message matching one of these goes to the dead-letter queue.
    pub block: Vec<Regex>,
    /// Matches of these are replaced with [`REDACTED`].
    pub redact: Vec<Regex>,
    pub max_bytes: u64,
    pub rate: ChannelRate,
    /// Senders whose delivered messages reach the agent: (glob text, matcher). Anyone else's
    /// are held for the operator.
    pub senders: Vec<(String, LazyGlob)>,
    /// A `send` may also go to the reply address of any message the broker queued from an
    /// admitted sender of this channel.
    pub reply_to_senders: bool,
    /// Outbound retries (adapter channels).
    pub retry: RetryPolicy,
    /// The operator's identity on this channel (adapter channels): the one sender whose
    /// `allow N` / `always N` / `deny N` / `admit N` / `drop N` answer approvals and held
    /// messages, and where the broker announces them. None: no operator conversation here.
    pub operator: Option<String>,
}

/// What redacted text is replaced with.
pub const REDACTED: &str = "[REDACTED]";

impl ChannelSpec {
    /// The first recipient glob that matches `recipient` (exact, case-sensitive glob match).
    pub fn recipient_allowed(&self, recipient: &str) -> Option<&str> {
        if recipient.is_empty() || recipient.contains(['\0', '\n', '\r']) {
            return None;
        }
        self.recipients
            .iter()
            .find(|(_, m)| m.is_match(recipient))
            .map(|(t, _)| t.as_str())
    }

    /// The first `senders` glob that matches `sender` (exact, case-sensitive glob match): its
    /// messages reach the agent; None: they are held.
    pub fn sender_admitted(&self, sender: &str) -> Option<&str> {
        if sender.is_empty() || sender.contains(['\0', '\n', '\r']) {
            return None;
        }
        self.senders
            .iter()
            .find(|(_, m)| m.is_match(sender))
            .map(|(t, _)| t.as_str())
    }

    /// The first `block` pattern found in `message` (its source text).
    pub fn blocked_by(&self, message: &str) -> Option<&str> {
        self.block
            .iter()
            .find(|r| r.is_match(message))
            .map(Regex::as_str)
    }

    /// `message` with every match of the `redact` patterns replaced by [`REDACTED`], and the
    /// number of replacements.
    pub fn redact_patterns(&self, message: &str) -> (String, usize) {
        let mut out = message.to_string();
        let mut n = 0;
        for r in &self.redact {
            let count = r.find_iter(&out).count();
            if count > 0 {
                n += count;
                out = r.replace_all(&out, REDACTED).into_owned();
            }
        }
        (out, n)
    }
}

/// A profile's `[profiles.NAME.broker]`, validated, with names not yet resolved.
#[derive(Debug, Clone)]
pub(crate) struct BrokerSection {
    pub connect: Vec<ConnectRule>,
    pub open: Vec<OpenRule>,
    pub secrets: Vec<String>,
    pub channels: Vec<String>,
    pub deliver: Vec<String>,
    pub exec: bool,
    pub auth: bool,
    pub approve: bool,
    pub inbound: bool,
    pub rate: Option<PeerRate>,
    pub redact: Vec<Regex>,
}

/// Everything the broker needs to decide for a child running under one profile. Cheap to
/// clone except for the compiled patterns; build it once per profile.
#[derive(Debug, Clone)]
pub struct BrokerRules {
    pub profile: String,
    pub connect: Vec<ConnectRule>,
    pub open: Vec<OpenRule>,
    /// The secrets this profile may fetch (resolved from `[secrets]`).
    pub secrets: Vec<SecretSpec>,
    /// The channels this profile may send to (resolved from `[channels]`).
    pub channels: Vec<ChannelSpec>,
    /// The channels this profile may deliver inbound messages from (resolved from
    /// `[channels]`): what a channel adapter received from its service, handed to the broker's
    /// inbound queue for the gateway. A message is at most the channel's `max_bytes`.
    pub deliver: Vec<ChannelSpec>,
    /// May use the `exec` op (the `[[exec]]` rules still decide each request).
    pub exec: bool,
    /// May use the `auth` op: have the broker check a client token's hash against the token
    /// store (for gateways, which cannot read the store themselves).
    pub auth: bool,
    /// May use the `approvals` and `approve` ops: list pending approvals and answer them, as an
    /// operator would. A child with this can approve its own `ask` requests, so only a gateway
    /// that relays the answers of operator-scoped clients should have it.
    pub approve: bool,
    /// May use the `inbound` op: read (and acknowledge) the broker's queue of inbound messages
    /// that channel adapters delivered. For the gateway, the queue's one reader.
    pub inbound: bool,
    /// Per-peer request rate; None = the broker's default.
    pub rate: Option<PeerRate>,
    /// Patterns redacted from what this profile hands out as replies (the gateway's answers to
    /// clients and channels, through the `redact` op), besides every known secret value.
    pub redact: Vec<Regex>,
}

/// Why a request's host is not acceptable at all.
fn normalize_request_host(host: &str) -> Option<Result<IpAddr, String>> {
    let h = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some(inner) = h {
        return inner.parse::<Ipv6Addr>().ok().map(|a| Ok(IpAddr::V6(a)));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Ok(ip));
    }
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if check_dns_name(&h).is_ok() {
        Some(Err(h))
    } else {
        None
    }
}

impl BrokerRules {
    /// The first `connect` rule allowing `host:port`. `host` is a DNS name (case-insensitive,
    /// one trailing dot ignored) or an IP literal (IPv6 with or without brackets); a name
    /// matches `Exact` and `Subdomains` rules, a literal only `Ip` rules for the same address.
    /// Malformed hosts match nothing.
    pub fn connect_allowed(&self, host: &str, port: u16) -> Option<&ConnectRule> {
        let req = normalize_request_host(host)?;
        self.connect.iter().find(|r| {
            r.port == port
                && match (&r.host, &req) {
                    (HostPattern::Ip(a), Ok(b)) => a == b,
                    (HostPattern::Exact(a), Err(b)) => a == b,
                    (HostPattern::Subdomains(s), Err(b)) => b
                        .strip_suffix(s.as_str())
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                    _ => false,
                }
        })
    }

    /// The rule allowing `access` to `path`, and `path` relative to the rule's directory.
    /// `path` must be absolute and normalized (see [`check_request_path`]); it must lie
    /// strictly beneath the rule's directory. Among the rules granting enough access, the one
    /// with the deepest directory wins.
    pub fn open_allowed<'a>(
        &'a self,
        path: &'a Path,
        access: OpenAccess,
    ) -> Option<(&'a OpenRule, &'a Path)> {
        if path.to_str().is_none_or(|p| check_request_path(p).is_err()) {
            return None;
        }
        self.open
            .iter()
            .filter(|r| r.access >= access)
            .filter_map(|r| {
                let rest = path.strip_prefix(&r.dir).ok()?;
                (!rest.as_os_str().is_empty()).then_some((r, rest))
            })
            .max_by_key(|(r, _)| r.dir.components().count())
    }

    /// The rule allowing `path`, a directory, to be listed (read access), and `path` relative
    /// to the rule's directory (`.` for the directory itself).
    pub fn list_allowed<'a>(&'a self, path: &'a Path) -> Option<(&'a OpenRule, &'a Path)> {
        if path.to_str().is_none_or(|p| check_request_path(p).is_err()) {
            return None;
        }
        self.open
            .iter()
            .filter_map(|r| {
                let rest = path.strip_prefix(&r.dir).ok()?;
                Some((
                    r,
                    if rest.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        rest
                    },
                ))
            })
            .max_by_key(|(r, _)| r.dir.components().count())
    }

    /// The secret named `name`, if this profile may fetch it.
    pub fn secret(&self, name: &str) -> Option<&SecretSpec> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// The channel named `name`, if this profile may send to it.
    pub fn channel(&self, name: &str) -> Option<&ChannelSpec> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// The channel named `name`, if this profile may deliver inbound messages from it.
    pub fn deliver_channel(&self, name: &str) -> Option<&ChannelSpec> {
        self.deliver.iter().find(|c| c.name == name)
    }

    /// These rules in plain words.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "broker: what a child running under profile `{}` may ask the broker for",
            self.profile
        );
        s.push_str("  connect (outbound TCP; the broker resolves, checks the address, connects and hands over the socket):\n");
        if self.connect.is_empty() {
            s.push_str("    nothing: every connect is refused\n");
        }
        for r in &self.connect {
            let what = match &r.host {
                HostPattern::Exact(h) => format!("{h} port {}", r.port),
                HostPattern::Subdomains(d) => {
                    format!("any subdomain of {d} (not {d} itself) port {}", r.port)
                }
                HostPattern::Ip(a) => format!("the address {a} port {}", r.port),
            };
            let private = if r.allow_private {
                "private and loopback addresses allowed"
            } else {
                "public addresses only (private, loopback, link-local, multicast refused)"
            };
            let _ = writeln!(s, "    {what}: {private} (line {}; why: {})", r.line, r.why);
        }
        s.push_str("  open (files outside the sandbox, opened by the broker beneath a directory, no symlinks followed):\n");
        if self.open.is_empty() {
            s.push_str("    nothing: every open is refused\n");
        }
        for r in &self.open {
            let grant = match r.access {
                OpenAccess::Read => "read existing files",
                OpenAccess::Write => "read and write existing files",
                OpenAccess::Create => "read, write and create files",
            };
            let grant = if r.ask {
                format!("{grant}, each open after an operator's approval")
            } else {
                grant.to_string()
            };
            let _ = writeln!(
                s,
                "    beneath {}: {grant} (line {}; why: {})",
                r.dir.display(),
                r.line,
                r.why
            );
        }
        s.push_str("  secrets (handed over as sealed memfds; values never logged or audited):\n");
        if self.secrets.is_empty() {
            s.push_str("    none\n");
        }
        for sec in &self.secrets {
            let from = match &sec.source {
                SecretSource::File(p) => format!("file {}", p.display()),
                SecretSource::Credential(c) => {
                    format!("systemd credential $CREDENTIALS_DIRECTORY/{c}")
                }
            };
            let _ = writeln!(s, "    {} from {from} (why: {})", sec.name, sec.why);
        }
        s.push_str("  channels (send; refused or blocked messages go to the dead-letter queue):\n");
        if self.channels.is_empty() {
            s.push_str("    none\n");
        }
        for c in &self.channels {
            let how = match &c.kind {
                ChannelKind::File { path } => format!("appends to {}", path.display()),
                ChannelKind::Adapter => format!(
                    "queued in the durable outbox of its adapter, {} tries (retry after {:?} doubling up to {:?}), then dead-lettered",
                    c.retry.attempts, c.retry.initial_delay, c.retry.max_delay
                ),
            };
            let recips: Vec<&str> = c.recipients.iter().map(|(t, _)| t.as_str()).collect();
            let _ = writeln!(
                s,
                "    {}: {how}; recipients {}{}; up to {} per message; {} per minute (burst {}) per child; {} block pattern(s); redacts {} pattern(s) and every secret value (why: {})",
                c.name,
                if recips.is_empty() && !c.reply_to_senders {
                    "none (every message is dead-lettered)".to_string()
                } else {
                    recips.join(", ")
                },
                if c.reply_to_senders {
                    " and the reply address of any message queued from an admitted sender"
                } else {
                    ""
                },
                fmt_bytes(c.max_bytes),
                c.rate.per_minute,
                c.rate.burst,
                c.block.len(),
                c.redact.len(),
                c.why
            );
        }
        s.push_str(
            "  deliver (inbound messages a channel adapter received, queued for the gateway):\n",
        );
        if self.deliver.is_empty() {
            s.push_str("    none: every deliver is refused\n");
        }
        for c in &self.deliver {
            let senders: Vec<&str> = c.senders.iter().map(|(t, _)| t.as_str()).collect();
            let _ = writeln!(
                s,
                "    {}: up to {} per message; reach the agent: {}; anyone else is held for the operator (why: {})",
                c.name,
                fmt_bytes(c.max_bytes),
                if senders.is_empty() {
                    "only senders an operator admitted".to_string()
                } else {
                    format!("senders {} and those an operator admitted", senders.join(", "))
                },
                c.why
            );
            if matches!(c.kind, ChannelKind::Adapter) {
                let _ = writeln!(
                    s,
                    "      and as its adapter: takes and confirms its outbound messages (outbox, outbox_ack, channel_state)"
                );
            }
            if let Some(op) = &c.operator {
                let _ = writeln!(
                    s,
                    "      operator {op}: approvals and held senders are announced to them, and only their answers (allow/always/deny/admit/drop N) resolve them"
                );
            }
        }
        let _ = writeln!(
            s,
            "  exec: {}",
            if self.exec {
                "allowed, each request decided by the [[exec]] rules like `carapace exec`"
            } else {
                "refused"
            }
        );
        let _ = writeln!(
            s,
            "  auth: {}",
            if self.auth {
                "allowed: may have the broker check client tokens (by their SHA-256) against the token store it cannot read"
            } else {
                "refused"
            }
        );
        let _ = writeln!(
            s,
            "  approve: {}",
            if self.approve {
                "allowed: may list pending approvals and answer them like an operator (it can approve its own `ask` requests)"
            } else {
                "refused"
            }
        );
        let _ = writeln!(
            s,
            "  inbound: {}",
            if self.inbound {
                "allowed: may read the messages channel adapters delivered (reading past a message acknowledges it: it leaves the queue)"
            } else {
                "refused"
            }
        );
        let _ = writeln!(
            s,
            "  redact (its replies, through the `redact` op): every secret value{}",
            if self.redact.is_empty() {
                String::new()
            } else {
                format!(
                    " and {}",
                    self.redact
                        .iter()
                        .map(|r| format!("/{}/", r.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        match self.rate {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  request rate: {} per second, burst {}",
                    r.requests_per_second, r.burst
                );
            }
            None => s.push_str("  request rate: the broker's default\n"),
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Pure checks shared with the broker.

/// Longest path the broker accepts in an `open` request (PATH_MAX, including the NUL).
pub const PATH_MAX: usize = 4096;

/// Why a requested path is not acceptable: it must be absolute, normalized (no `.`, `..`,
/// `//`), without NUL, not end with `/`, and shorter than PATH_MAX.
pub fn check_request_path(p: &str) -> Result<(), &'static str> {
    if p.len() >= PATH_MAX {
        return Err("the path is longer than PATH_MAX");
    }
    if p == "/" {
        return Err("the path is `/`");
    }
    check_abs_path(p)
}

/// True for addresses the broker refuses unless a rule says `allow_private = true`: loopback,
/// private (RFC 1918), shared (100.64/10), link-local, "this network" (0/8), multicast,
/// broadcast and reserved (240/4), IETF protocol assignments (192.0.0/24), benchmarking
/// (198.18/15), unspecified; IPv6 loopback, unspecified, unique-local (fc00::/7), link-local
/// (fe80::/10), site-local (fec0::/10), multicast, documentation (2001:db8::/32); and IPv6
/// addresses embedding an IPv4 address (v4-mapped, v4-compatible, NAT64 64:ff9b::/96, 6to4
/// 2002::/16) whose IPv4 address is one of these.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => v4_non_public(a),
        IpAddr::V6(a) => v6_non_public(a),
    }
}

fn v4_non_public(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_unspecified()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
}

fn v6_non_public(a: Ipv6Addr) -> bool {
    let s = a.segments();
    if a.is_loopback() || a.is_unspecified() || a.is_multicast() {
        return true;
    }
    if (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        return true;
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return true;
    }
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // v4-mapped ::ffff:a.b.c.d and v4-compatible ::a.b.c.d
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return v4_non_public(embedded(s[6], s[7]));
    }
    // NAT64 64:ff9b::/96
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_non_public(embedded(s[6], s[7]));
    }
    // 6to4 2002:AABB:CCDD::/48
    if s[0] == 0x2002 {
        return v4_non_public(embedded(s[1], s[2]));
    }
    false
}

/// A DNS name as written in a rule or request: 1..=253 characters, labels of 1..=63 of
/// `a-z0-9-` not starting or ending with `-`, the last label not all digits. Lowercase only
/// (callers lowercase requests first).
fn check_dns_name(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    let labels: Vec<&str> = h.split('.').collect();
    for l in &labels {
        if l.is_empty() || l.len() > 63 {
            return Err("every label (between dots) has 1 to 63 characters".into());
        }
        if !l
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "label `{}` has characters other than a-z, 0-9 and `-`",
                l.escape_debug()
            ));
        }
        if l.starts_with('-') || l.ends_with('-') {
            return Err(format!("label `{l}` starts or ends with `-`"));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("the last label is all digits (an IP address is written in full)".into());
    }
    Ok(())
}

/// Parse the `host` of a `connect` rule.
pub fn parse_host_pattern(s: &str) -> Result<HostPattern, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if bare != s && ip.is_ipv4() {
            return Err("brackets are for IPv6 addresses only".into());
        }
        return Ok(HostPattern::Ip(ip));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("host names are written in lowercase".into());
    }
    if let Some(suffix) = s.strip_prefix("*.") {
        check_dns_name(suffix)?;
        if !suffix.contains('.') {
            return Err(format!(
                "`*.{suffix}` would allow every name under a top-level domain"
            ));
        }
        return Ok(HostPattern::Subdomains(suffix.to_string()));
    }
    if s.contains('*') {
        return Err("a wildcard is only allowed as a whole first label: `*.example.com`".into());
    }
    if s.ends_with('.') {
        return Err("no trailing dot".into());
    }
    check_dns_name(s)?;
    Ok(HostPattern::Exact(s.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Validation.

const HOST_EXPECTED: &str = "a host name (`api.example.com`), a wildcard for its subdomains (`*.example.com`, which does not match `example.com` itself), or an IP address (`127.0.0.1`, `::1`)";
const PORT_EXPECTED: &str = "a port number from 1 to 65535";
const OPEN_ACCESS_EXPECTED: &str = "one of \"read\", \"write\", \"create\"";
const NAME_EXPECTED: &str = "letters, digits, `-` and `_`";
const REGEX_EXPECTED: &str = "a regular expression (Rust `regex` syntax, at most 1 MiB compiled)";

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn line_of(sink: &Sink<'_>, span: &Range<usize>) -> usize {
    sink.src.line_of(span.start)
}

/// A required, non-empty `why`.
fn why_of(sink: &mut Sink<'_>, why: &Option<S<String>>, span: &Range<usize>, what: &str) -> String {
    match why {
        None => {
            sink.err(
                span,
                format!("missing required key `why` in {what}"),
                "why = \"...\": a sentence saying why this is needed",
            );
            String::new()
        }
        Some(w) if w.get_ref().trim().is_empty() => {
            sink.err(
                &w.span(),
                format!("empty `why` in {what}"),
                "a sentence saying why this is needed",
            );
            String::new()
        }
        Some(w) => w.get_ref().clone(),
    }
}

fn positive_u32(sink: &mut Sink<'_>, v: &S<i64>, key: &str, max: u32) -> Option<u32> {
    match u32::try_from(*v.get_ref()) {
        Ok(n) if n >= 1 && n <= max => Some(n),
        _ => {
            sink.err(
                &v.span(),
                format!("bad `{key}` {}", v.get_ref()),
                &format!("an integer from 1 to {max}"),
            );
            None
        }
    }
}

fn regexes(sink: &mut Sink<'_>, list: &Option<S<Vec<S<String>>>>, key: &str) -> Vec<Regex> {
    let mut out = Vec::new();
    for p in list.iter().flat_map(|l| l.get_ref().iter()) {
        match RegexBuilder::new(p.get_ref())
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
        {
            Ok(r) => out.push(r),
            Err(e) => {
                let msg = e.to_string();
                let first = msg.lines().last().unwrap_or("invalid").trim().to_string();
                sink.err(
                    &p.span(),
                    format!(
                        "bad `{key}` pattern `{}`: {first}",
                        p.get_ref().escape_debug()
                    ),
                    REGEX_EXPECTED,
                );
            }
        }
    }
    out
}

/// What every `[secrets.NAME]` / `[channels.NAME]` table starts with: its name checked, the
/// spans errors point at, and the diagnostic count before the table's own checks.
struct NamedTable {
    kspan: std::ops::Range<usize>,
    name: String,
    span: std::ops::Range<usize>,
    before: usize,
    what: String,
}

fn named_table<T>(k: &S<String>, v: &S<T>, kind: &str, sink: &mut Sink<'_>) -> NamedTable {
    let kspan = k.span();
    let name = k.get_ref().clone();
    let span = if v.span().is_empty() {
        kspan.clone()
    } else {
        v.span()
    };
    // Counted before the name check: a bad name alone keeps the table out of the policy.
    let before = sink.diags.len();
    if !name_ok(&name) {
        sink.err(
            &kspan,
            format!("bad {kind} name `{}`", name.escape_debug()),
            NAME_EXPECTED,
        );
    }
    NamedTable {
        what: format!("{kind} `{name}`"),
        kspan,
        name,
        span,
        before,
    }
}

/// `[secrets.NAME]` tables.
pub(crate) fn lower_secrets(
    raw: BTreeMap<S<String>, S<RawSecret>>,
    sink: &mut Sink<'_>,
) -> BTreeMap<String, SecretSpec> {
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        let NamedTable {
            kspan,
            name,
            span,
            before,
            what,
        } = named_table(&k, &v, "secret", sink);
        let s = v.into_inner();
        let why = why_of(sink, &s.why, &kspan, &what);
        let source = match (&s.file, &s.credential) {
            (Some(f), Some(_)) => {
                sink.err(
                    &f.span(),
                    format!("both `file` and `credential` given in {what}"),
                    "one of them",
                );
                None
            }
            (None, None) => {
                sink.err(
                    &kspan,
                    format!("missing required key `file` (or `credential`) in {what}"),
                    "file = \"/etc/carapace/secrets/NAME\" (a root-only file) or credential = \"NAME\" (a systemd credential)",
                );
                None
            }
            (Some(f), None) => match check_abs_path(f.get_ref()) {
                Ok(()) if f.get_ref() != "/" => {
                    Some(SecretSource::File(PathBuf::from(f.get_ref())))
                }
                Ok(()) => {
                    sink.err(
                        &f.span(),
                        "a secret cannot be `/`",
                        "the path of a regular file",
                    );
                    None
                }
                Err(why) => {
                    sink.err(
                        &f.span(),
                        format!("bad path `{}`: {why}", f.get_ref().escape_debug()),
                        PATH_EXPECTED,
                    );
                    None
                }
            },
            (None, Some(c)) => {
                let n = c.get_ref();
                if n.is_empty() || n == "." || n == ".." || n.contains(['/', '\0']) || n.len() > 255
                {
                    sink.err(
                        &c.span(),
                        format!("bad credential name `{}`", n.escape_debug()),
                        "a file name in $CREDENTIALS_DIRECTORY (no `/`, not `.` or `..`)",
                    );
                    None
                } else {
                    Some(SecretSource::Credential(n.clone()))
                }
            }
        };
        if let (Some(source), true) = (source, sink.diags.len() == before) {
            out.insert(
                name.clone(),
                SecretSpec {
                    name,
                    source,
                    why,
                    line: line_of(sink, &span),
                },
            );
        }
    }
    out
}

/// Compiled globs of a list of recipient or sender patterns (errors located).
fn globs(
    sink: &mut Sink<'_>,
    list: &Option<S<Vec<S<String>>>>,
    what: &str,
) -> Vec<(String, LazyGlob)> {
    let mut out = Vec::new();
    for r in list.iter().flat_map(|l| l.get_ref().iter()) {
        let t = r.get_ref();
        if t.is_empty() || t.contains(['\0', '\n', '\r']) {
            sink.err(
                &r.span(),
                format!("bad {what} pattern"),
                "a non-empty glob on one line",
            );
            continue;
        }
        match GlobBuilder::new(t)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
        {
            Ok(g) => out.push((t.clone(), LazyGlob::new(g))),
            Err(e) => sink.err(
                &r.span(),
                format!("bad {what} glob `{}`: {}", t.escape_debug(), e.kind()),
                "a glob: `*`, `?`, `[abc]`, `{a,b}`",
            ),
        }
    }
    out
}

/// A channel's `retry = { attempts, initial_delay, max_delay }` (each optional).
fn retry_policy(sink: &mut Sink<'_>, raw: &Option<S<RawRetry>>, what: &str) -> RetryPolicy {
    let Some(r) = raw else {
        return DEFAULT_RETRY;
    };
    let rspan = r.span();
    let r = r.get_ref();
    let mut out = DEFAULT_RETRY;
    if let Some(a) = &r.attempts {
        if let Some(n) = positive_u32(sink, a, "attempts", MAX_RETRY_ATTEMPTS) {
            out.attempts = n;
        }
    }
    let mut delay = |v: &Option<S<toml::Value>>, key: &str| -> Option<Duration> {
        let v = v.as_ref()?;
        match parse_duration(v.get_ref()) {
            Ok(d) if d <= Duration::from_secs(86_400) => Some(d),
            Ok(_) => {
                sink.err(
                    &v.span(),
                    format!("`{key}` over a day in the retry of {what}"),
                    "a duration up to 24h",
                );
                None
            }
            Err(e) => {
                sink.err(&v.span(), format!("bad `{key}`: {e}"), DURATION_EXPECTED);
                None
            }
        }
    };
    let initial = delay(&r.initial_delay, "initial_delay");
    let max = delay(&r.max_delay, "max_delay");
    if let Some(d) = initial {
        out.initial_delay = d;
    }
    if let Some(d) = max {
        out.max_delay = d;
    }
    if out.initial_delay > out.max_delay {
        let span = r.max_delay.as_ref().map_or(rspan, |m| m.span());
        sink.err(
            &span,
            format!(
                "in the retry of {what}: max_delay {:?} is shorter than initial_delay {:?}",
                out.max_delay, out.initial_delay
            ),
            "max_delay at least initial_delay",
        );
    }
    out
}

/// Longest operator identity (the broker's limit on a delivered sender).
pub const MAX_OPERATOR: usize = 256;

/// `operator` of a channel: a sender identity (1 to [`MAX_OPERATOR`] bytes, no control
/// characters, no surrounding whitespace), only on an adapter channel.
fn operator_of(
    sink: &mut Sink<'_>,
    op: &Option<S<String>>,
    kind: &Option<S<String>>,
    what: &str,
) -> Option<String> {
    let op = op.as_ref()?;
    let v = op.get_ref();
    const EXPECTED: &str =
        "operator = \"123456789\" (the operator's Telegram user id, e-mail address, webhook sender)";
    let bad = if v.is_empty() {
        Some("the operator identity is empty".to_string())
    } else if v.len() > MAX_OPERATOR {
        Some(format!(
            "the operator identity is longer than {MAX_OPERATOR} bytes"
        ))
    } else if v.chars().any(char::is_control) {
        Some("the operator identity has control characters".to_string())
    } else if v.trim() != v {
        Some("the operator identity has surrounding whitespace".to_string())
    } else if v.contains(['*', '?', '[', '{']) {
        Some("the operator identity is one exact sender, not a glob".to_string())
    } else {
        None
    };
    if let Some(why) = bad {
        sink.err(&op.span(), format!("{why} in {what}"), EXPECTED);
        return None;
    }
    if kind.as_ref().is_some_and(|k| k.get_ref() != "adapter") {
        sink.err(
            &op.span(),
            format!("`operator` in {what}: only for kind \"adapter\""),
            "no `operator`: a file channel has no one to answer",
        );
        return None;
    }
    Some(v.clone())
}

/// `[channels.NAME]` tables.
pub(crate) fn lower_channels(
    raw: BTreeMap<S<String>, S<RawChannel>>,
    sink: &mut Sink<'_>,
) -> BTreeMap<String, ChannelSpec> {
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        let NamedTable {
            kspan,
            name,
            span,
            before,
            what,
        } = named_table(&k, &v, "channel", sink);
        let c = v.into_inner();
        let why = why_of(sink, &c.why, &kspan, &what);
        let kind = match &c.kind {
            None => {
                sink.err(
                    &kspan,
                    format!("missing required key `kind` in {what}"),
                    "kind = \"file\"",
                );
                None
            }
            Some(k) if k.get_ref() == "file" => match &c.path {
                None => {
                    sink.err(
                        &k.span(),
                        format!("missing required key `path` in {what} (kind \"file\")"),
                        "path = \"/var/lib/carapace/outbox.log\"",
                    );
                    None
                }
                Some(p) => match check_abs_path(p.get_ref()) {
                    Ok(()) if p.get_ref() != "/" => Some(ChannelKind::File {
                        path: PathBuf::from(p.get_ref()),
                    }),
                    Ok(()) => {
                        sink.err(
                            &p.span(),
                            "a channel file cannot be `/`",
                            "the path of a file",
                        );
                        None
                    }
                    Err(why) => {
                        sink.err(
                            &p.span(),
                            format!("bad path `{}`: {why}", p.get_ref().escape_debug()),
                            PATH_EXPECTED,
                        );
                        None
                    }
                },
            },
            Some(k) if k.get_ref() == "adapter" => match &c.path {
                Some(p) => {
                    sink.err(
                        &p.span(),
                        format!("`path` in {what}: only for kind \"file\""),
                        "no `path`: an adapter channel is served by the adapter child of the same name",
                    );
                    None
                }
                None => Some(ChannelKind::Adapter),
            },
            Some(k) => {
                sink.err(
                    &k.span(),
                    format!("unknown channel kind `{}`", k.get_ref()),
                    "\"file\" or \"adapter\"",
                );
                None
            }
        };
        if let (Some(r), Some(k)) = (&c.retry, &c.kind) {
            if k.get_ref() == "file" {
                sink.err(
                    &r.span(),
                    format!("`retry` in {what}: only for kind \"adapter\""),
                    "no `retry`: a file channel writes at once",
                );
            }
        }
        let operator = operator_of(sink, &c.operator, &c.kind, &what);
        let senders = globs(sink, &c.senders, "sender");
        let reply_to_senders = c.reply_to_senders.as_ref().is_some_and(|b| *b.get_ref());
        let retry = retry_policy(sink, &c.retry, &what);
        if c.recipients.is_none() {
            sink.err(
                &kspan,
                format!("missing required key `recipients` in {what}"),
                "recipients = [\"alice@example.com\", \"#ops\"] (an allowlist; globs allowed)",
            );
        }
        let recipients = globs(sink, &c.recipients, "recipient");
        let block = regexes(sink, &c.block, "block");
        let redact = regexes(sink, &c.redact, "redact");
        let max_bytes = match &c.max_bytes {
            None => DEFAULT_MAX_BYTES,
            Some(m) => match parse_size(m.get_ref()) {
                Ok(n) if n <= 1 << 20 => n,
                Ok(n) => {
                    sink.err(
                        &m.span(),
                        format!("max_bytes {n} is over 1 MiB"),
                        "a size up to 1MiB (a message travels in one frame)",
                    );
                    0
                }
                Err(e) => {
                    sink.err(&m.span(), format!("bad max_bytes: {e}"), SIZE_EXPECTED);
                    0
                }
            },
        };
        let rate = match &c.rate {
            None => DEFAULT_CHANNEL_RATE,
            Some(r) => {
                let rspan = r.span();
                let r = r.get_ref();
                let per_minute = match &r.per_minute {
                    None => {
                        sink.err(
                            &rspan,
                            format!("missing required key `per_minute` in the rate of {what}"),
                            "rate = { per_minute = 10, burst = 5 }",
                        );
                        None
                    }
                    Some(v) => positive_u32(sink, v, "per_minute", 1_000_000),
                };
                let burst = match &r.burst {
                    None => Some(1),
                    Some(v) => positive_u32(sink, v, "burst", 1_000_000),
                };
                ChannelRate {
                    per_minute: per_minute.unwrap_or(1),
                    burst: burst.unwrap_or(1),
                }
            }
        };
        if let (Some(kind), true) = (kind, sink.diags.len() == before) {
            out.insert(
                name.clone(),
                ChannelSpec {
                    name,
                    why,
                    line: line_of(sink, &span),
                    kind,
                    recipients,
                    block,
                    redact,
                    max_bytes,
                    rate,
                    senders,
                    reply_to_senders,
                    retry,
                    operator,
                },
            );
        }
    }
    out
}

/// `[profiles.NAME.broker]` (already merged through `extends`). Secret and channel names are
/// checked against the tables the file defines.
pub(crate) fn lower_broker(
    b: &S<RawBroker>,
    profile: &str,
    secret_names: &BTreeSet<String>,
    channel_names: &BTreeSet<String>,
    sink: &mut Sink<'_>,
) -> Option<BrokerSection> {
    let before = sink.diags.len();
    let raw = b.get_ref();
    let mut connect = Vec::new();
    for r in raw.connect.iter().flatten() {
        let rspan = r.span();
        let r = r.get_ref();
        let what = format!("a connect rule of profile `{profile}`");
        let why = why_of(sink, &r.why, &rspan, &what);
        let host = match &r.host {
            None => {
                sink.err(
                    &rspan,
                    format!("missing required key `host` in {what}"),
                    HOST_EXPECTED,
                );
                None
            }
            Some(h) => match parse_host_pattern(h.get_ref()) {
                Ok(p) => Some((p, h.span())),
                Err(e) => {
                    sink.err(
                        &h.span(),
                        format!("bad host pattern `{}`: {e}", h.get_ref().escape_debug()),
                        HOST_EXPECTED,
                    );
                    None
                }
            },
        };
        let port = match &r.port {
            None => {
                sink.err(
                    &rspan,
                    format!("missing required key `port` in {what}"),
                    PORT_EXPECTED,
                );
                None
            }
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(n) if n != 0 => Some(n),
                _ => {
                    sink.err(
                        &p.span(),
                        format!("bad port {}", p.get_ref()),
                        PORT_EXPECTED,
                    );
                    None
                }
            },
        };
        let allow_private = r.allow_private.as_ref().is_some_and(|a| *a.get_ref());
        if let (Some((HostPattern::Ip(ip), hspan)), false) = (&host, allow_private) {
            if is_non_public(*ip) {
                sink.err(
                    hspan,
                    format!("{ip} is a private, loopback or otherwise non-public address: this rule can never allow a connection"),
                    "allow_private = true in this rule (if it is meant), or a public address",
                );
            }
        }
        if let (Some((host, _)), Some(port)) = (host, port) {
            connect.push(ConnectRule {
                host,
                port,
                allow_private,
                why,
                line: line_of(sink, &rspan),
            });
        }
    }
    let mut open = Vec::new();
    for r in raw.open.iter().flatten() {
        let rspan = r.span();
        let r = r.get_ref();
        let what = format!("an open rule of profile `{profile}`");
        let why = why_of(sink, &r.why, &rspan, &what);
        let dir = match &r.path {
            None => {
                sink.err(
                    &rspan,
                    format!("missing required key `path` in {what}"),
                    PATH_EXPECTED,
                );
                None
            }
            Some(p) => match check_abs_path(p.get_ref()) {
                Ok(()) if p.get_ref() == "/" => {
                    sink.err(
                        &p.span(),
                        "an open rule for all of `/`",
                        "a specific directory (files are opened beneath it)",
                    );
                    None
                }
                Ok(()) => Some(PathBuf::from(p.get_ref())),
                Err(why) => {
                    sink.err(
                        &p.span(),
                        format!("bad path `{}`: {why}", p.get_ref().escape_debug()),
                        PATH_EXPECTED,
                    );
                    None
                }
            },
        };
        let access = match &r.access {
            None => {
                sink.err(
                    &rspan,
                    format!("missing required key `access` in {what}"),
                    OPEN_ACCESS_EXPECTED,
                );
                None
            }
            Some(a) => match a.get_ref().as_str() {
                "read" => Some(OpenAccess::Read),
                "write" => Some(OpenAccess::Write),
                "create" => Some(OpenAccess::Create),
                other => {
                    sink.err(
                        &a.span(),
                        format!("unknown access `{other}`"),
                        OPEN_ACCESS_EXPECTED,
                    );
                    None
                }
            },
        };
        let ask = match r
            .approval
            .as_ref()
            .map(|a| (a.get_ref().as_str(), a.span()))
        {
            None | Some(("allow", _)) => false,
            Some(("ask", _)) => true,
            Some((other, span)) => {
                sink.err(
                    &span,
                    format!("unknown approval `{other}` for an open rule"),
                    "\"allow\" (the default) or \"ask\"",
                );
                false
            }
        };
        if let (Some(dir), Some(access)) = (dir, access) {
            open.push(OpenRule {
                dir,
                access,
                ask,
                why,
                line: line_of(sink, &rspan),
            });
        }
    }
    let names = |sink: &mut Sink<'_>,
                 list: &Option<S<Vec<S<String>>>>,
                 known: &BTreeSet<String>,
                 what: &str,
                 table: &str|
     -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in list.iter().flat_map(|l| l.get_ref().iter()) {
            if !known.contains(n.get_ref()) {
                sink.err(
                    &n.span(),
                    format!("unknown {what} `{}`", n.get_ref().escape_debug()),
                    &format!("the name of a table [{table}.NAME] in this policy"),
                );
            } else if !out.contains(n.get_ref()) {
                out.push(n.get_ref().clone());
            }
        }
        out
    };
    let secrets = names(sink, &raw.secrets, secret_names, "secret", "secrets");
    let channels = names(sink, &raw.channels, channel_names, "channel", "channels");
    let deliver = names(sink, &raw.deliver, channel_names, "channel", "channels");
    let redact = regexes(sink, &raw.redact, "redact");
    let rate = raw.rate.as_ref().map(|r| {
        let rspan = r.span();
        let r = r.get_ref();
        let rps = match &r.requests_per_second {
            None => {
                sink.err(
                    &rspan,
                    format!("missing required key `requests_per_second` in the broker rate of profile `{profile}`"),
                    "rate = { requests_per_second = 50, burst = 100 }",
                );
                None
            }
            Some(v) => positive_u32(sink, v, "requests_per_second", 10_000_000),
        };
        let burst = match &r.burst {
            None => rps,
            Some(v) => positive_u32(sink, v, "burst", 10_000_000),
        };
        PeerRate {
            requests_per_second: rps.unwrap_or(1),
            burst: burst.unwrap_or(1),
        }
    });
    if sink.diags.len() != before {
        return None;
    }
    Some(BrokerSection {
        connect,
        open,
        secrets,
        channels,
        deliver,
        exec: raw.exec.as_ref().is_some_and(|e| *e.get_ref()),
        auth: raw.auth.as_ref().is_some_and(|e| *e.get_ref()),
        approve: raw.approve.as_ref().is_some_and(|e| *e.get_ref()),
        inbound: raw.inbound.as_ref().is_some_and(|e| *e.get_ref()),
        rate,
        redact,
    })
}

/// Resolve a profile's section against the policy's secrets and channels.
pub(crate) fn rules_of(
    profile: &str,
    b: &BrokerSection,
    secrets: &BTreeMap<String, SecretSpec>,
    channels: &BTreeMap<String, ChannelSpec>,
) -> BrokerRules {
    BrokerRules {
        profile: profile.to_string(),
        connect: b.connect.clone(),
        open: b.open.clone(),
        secrets: b
            .secrets
            .iter()
            .filter_map(|n| secrets.get(n).cloned())
            .collect(),
        channels: b
            .channels
            .iter()
            .filter_map(|n| channels.get(n).cloned())
            .collect(),
        deliver: b
            .deliver
            .iter()
            .filter_map(|n| channels.get(n).cloned())
            .collect(),
        exec: b.exec,
        auth: b.auth,
        approve: b.approve,
        inbound: b.inbound,
        rate: b.rate,
        redact: b.redact.clone(),
    }
}

#[cfg(test)]
mod tests;
