//! Validation of the configuration's sections: the top level, `[supervisor]`, `[control]`,
//! `[gateway]` (its clients and agent) and each child (`[gateway]`, `[channels.NAME]`), with
//! their keys, defaults and located errors.

use carapace_policy::toml_schema::Kind::{
    self, Array, Bool, Int, IntOrStr, Map, OneOrArray, Str, Tagged,
};

use carapace_broker::audit::rotate::DEFAULT_KEEP;
use carapace_broker::audit::Rotation;

use super::document::*;
use super::*;

const SUPERVISOR: Kind = Kind::Table(&[
    ("policy", OneOrArray(&Str)),
    ("state_dir", Str),
    ("runtime_dir", Str),
    ("log_format", Str),
    ("log_level", Str),
    ("stop_timeout", IntOrStr),
    ("approval_timeout", IntOrStr),
    ("watchdog", Bool),
]);
const CONTROL: Kind = Kind::Table(&[("group", IntOrStr)]);
const RESTART: Kind = Kind::Table(&[
    ("initial_delay", IntOrStr),
    ("max_delay", IntOrStr),
    ("crash_loop_restarts", Int),
    ("crash_loop_window", IntOrStr),
]);
const CLIENTS: Kind = Kind::Table(&[
    ("rate_per_second", Int),
    ("burst", Int),
    ("max_connections", Int),
    ("max_message_bytes", Int),
    ("idle_timeout", IntOrStr),
    ("max_in_flight", Int),
]);
const AGENT: Kind = Kind::Table(&[
    ("base_url", Str),
    ("model", Str),
    ("api_key_secret", Str),
    ("max_turns", Int),
    ("token_budget", Int),
    ("timeout", IntOrStr),
    ("max_tokens", Int),
    ("system_prompt", Str),
    ("max_concurrent_runs", Int),
    ("answer_channels", Bool),
    ("context_budget", Int),
]);
const GATEWAY: Kind = Kind::Table(&[
    ("clients", CLIENTS),
    ("agent", AGENT),
    ("program", Str),
    ("args", Array(&Str)),
    ("profile", Str),
    ("listen", Str),
    ("allow_non_loopback", Bool),
    ("workspace", Str),
    ("restart", RESTART),
    ("environment", Map(&Str)),
]);
/// `[channels.NAME]`: the keys of every child, and those of its `kind` (channel.rs).
const CHANNEL: Kind = Tagged {
    tag: "kind",
    common: &[
        ("kind", Str),
        ("program", Str),
        ("args", Array(&Str)),
        ("profile", Str),
        ("workspace", Str),
        ("restart", RESTART),
        ("environment", Map(&Str)),
    ],
    variants: channel::KINDS,
};
/// `[metrics]`: the optional HTTP listener for Prometheus.
const METRICS: Kind = Kind::Table(&[("listen", Str), ("allow_non_loopback", Bool)]);
/// `[audit]`: rotation of the audit log.
const AUDIT: Kind = Kind::Table(&[("rotate_size", IntOrStr), ("keep", Int)]);
/// `[workspaces.NAME]`: a granted project directory.
const WORKSPACE: Kind = Kind::Table(&[
    ("path", Str),
    ("why", Str),
    ("access", Str),
    ("profiles", Array(&Str)),
]);
/// The whole file, checked by the policy crate's schema engine before [`validate`] reads it.
pub(super) const CONFIG: Kind = Kind::Table(&[
    ("supervisor", SUPERVISOR),
    ("audit", AUDIT),
    ("control", CONTROL),
    ("gateway", GATEWAY),
    ("channels", Map(&CHANNEL)),
    ("metrics", METRICS),
    ("jobs", Array(&super::jobs::JOB)),
    ("workspaces", Map(&WORKSPACE)),
]);

/// The gid of `name` from the system's group database.
pub(super) fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

pub(super) fn validate(root: &Table, cx: &mut Sink<'_>) -> Config {
    let empty = Table::default();

    // [supervisor]
    let sup = get_table(root, "supervisor").unwrap_or(&empty);
    let policy = match sup.get("policy") {
        None => Vec::new(),
        Some(e) => {
            let items: Vec<&Node> = match &e.node.val {
                Val::Array(a) => a.iter().collect(),
                _ => vec![&e.node],
            };
            let mut out = Vec::new();
            for n in items {
                if let Val::Str(s) = &n.val {
                    match check_abs_path(s) {
                        Ok(()) => out.push(PathBuf::from(s)),
                        Err(why) => {
                            cx.err(&n.span, format!("policy file {s:?}: {why}"), PATH_EXPECTED)
                        }
                    }
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
    let log_format = match get_str(sup, "log_format") {
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
    let log_level = match get_str(sup, "log_level") {
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
    let watchdog = get_bool(sup, "watchdog", true);

    // [audit]
    let audit = get_table(root, "audit").unwrap_or(&empty);
    let audit_rotation = audit_rotation(cx, audit);

    // [control]
    let control = get_table(root, "control").unwrap_or(&empty);
    let control_group = control.get("group").and_then(|e| group_of(cx, e));

    // [metrics]
    let m = get_table(root, "metrics").unwrap_or(&empty);
    let metrics = MetricsConfig {
        listen: listen_addr(
            cx,
            m,
            get_bool(m, "allow_non_loopback", false),
            ("the metrics endpoint", "[metrics]"),
        ),
    };

    // [gateway]
    let gateway = root.get("gateway").and_then(|e| {
        let t = e.node.val.as_table()?;
        Some(child(cx, t, "gateway", true, &state_dir, &e.key_span))
    });

    // [channels.NAME], and the daemons of those that have one
    let mut channels = BTreeMap::new();
    let mut daemons = BTreeMap::new();
    if let Some(t) = get_table(root, "channels") {
        for e in &t.entries {
            if !valid_channel_name(&e.key) {
                cx.err(
                    &e.key_span,
                    format!("invalid channel name {:?}", e.key),
                    "1 to 32 characters among a-z, 0-9, `_` and `-`, and not `gateway`",
                );
                continue;
            }
            if let Some(ct) = e.node.val.as_table() {
                let c = child(cx, ct, &e.key, false, &state_dir, &e.key_span);
                if matches!(get_str(ct, "kind"), Some(("signal", _))) {
                    let d = channel::daemon(cx, ct, &e.key, &state_dir);
                    daemons.insert(d.name.clone(), d);
                }
                channels.insert(e.key.clone(), c);
            }
        }
    }
    for d in daemons.values() {
        if let Some(e) = get_table(root, "channels").and_then(|t| t.get(&d.name)) {
            cx.err(
                &e.key_span,
                format!(
                    "`{}` is the name of the signal-cli daemon of channel `{}`",
                    d.name,
                    d.serves.as_deref().unwrap_or("")
                ),
                "another channel name",
            );
        }
    }

    // [[jobs]]: run by the gateway's agent, which gets them in its settings.
    let has_agent = get_table(root, "gateway").is_some_and(|g| get_table(g, "agent").is_some());
    let jobs = super::jobs::jobs(cx, root, has_agent);
    let mut gateway = gateway;
    if let (Some(gw), false) = (gateway.as_mut(), jobs.is_empty()) {
        if let Some(Ok(serde_json::Value::Object(mut o))) = gw
            .settings
            .as_deref()
            .map(serde_json::from_str::<serde_json::Value>)
        {
            o.insert("jobs".into(), super::jobs::settings_json(&jobs));
            gw.settings = Some(serde_json::Value::Object(o).to_string());
        }
    }

    // Each child its own workspace, and none of them the state or runtime directory itself.
    let mut seen: Vec<(&Path, &str)> = Vec::new();
    let children = gateway
        .iter()
        .chain(channels.values())
        .chain(daemons.values());
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

    let workspaces = granted_workspaces(cx, root, gateway.as_ref(), &state_dir, &runtime_dir);

    Config {
        workspaces,
        policy,
        state_dir,
        runtime_dir,
        log_format,
        log_level,
        stop_timeout,
        approval_timeout,
        watchdog,
        audit_rotation,
        control_group,
        gateway,
        channels,
        daemons,
        metrics,
        jobs,
    }
}

/// `[workspaces.NAME]`: each `path` absolute, an existing directory (stored canonical), not a
/// system directory nor overlapping the state or runtime directory; `access` `rw` or `ro`;
/// `profiles` defaults to the gateway's profile.
fn granted_workspaces(
    cx: &mut Sink<'_>,
    root: &Table,
    gateway: Option<&ChildConfig>,
    state_dir: &Path,
    runtime_dir: &Path,
) -> BTreeMap<String, WorkspaceConfig> {
    let mut out = BTreeMap::new();
    let Some(t) = get_table(root, "workspaces") else {
        return out;
    };
    for e in &t.entries {
        if !carapace_broker::ops::valid_workspace_name(&e.key) {
            cx.err(
                &e.key_span,
                format!("invalid workspace name {:?}", e.key),
                "1 to 64 characters among a-z, 0-9, `_` and `-`",
            );
            continue;
        }
        let Some(w) = e.node.val.as_table() else {
            continue;
        };
        let Some((p, pe)) = get_str(w, "path") else {
            cx.err(
                &e.key_span,
                format!("workspace `{}` has no `path`", e.key),
                "path = \"/absolute/directory\"",
            );
            continue;
        };
        let span = pe.node.span.clone();
        if let Err(why) = check_abs_path(p) {
            cx.err(
                &span,
                format!("workspace `{}`: {p:?}: {why}", e.key),
                PATH_EXPECTED,
            );
            continue;
        }
        let path = match std::fs::canonicalize(p) {
            Ok(c) if c.is_dir() => c,
            Ok(_) => {
                cx.err(
                    &span,
                    format!("workspace `{}`: {p} is not a directory", e.key),
                    "an existing directory",
                );
                continue;
            }
            Err(err) => {
                cx.err(
                    &span,
                    format!("workspace `{}`: {p}: {err}", e.key),
                    "an existing directory",
                );
                continue;
            }
        };
        if let Err(why) = carapace_sandbox::mounts::check_workspace_dir(&path) {
            cx.err(
                &span,
                format!(
                    "workspace `{}`: {} cannot be a workspace: {why}",
                    e.key,
                    path.display()
                ),
                "a project directory of its own",
            );
            continue;
        }
        let overlaps = |d: &Path| {
            let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
            d.starts_with(&path) || path.starts_with(&d)
        };
        if overlaps(state_dir) || overlaps(runtime_dir) {
            cx.err(
                &span,
                format!(
                    "workspace `{}` ({}) overlaps the supervisor's state or runtime directory",
                    e.key,
                    path.display()
                ),
                "a directory outside both",
            );
            continue;
        }
        let writable = match get_str(w, "access") {
            None | Some(("rw", _)) => true,
            Some(("ro", _)) => false,
            Some((other, ae)) => {
                cx.err(
                    &ae.node.span,
                    format!("unknown workspace access {other:?}"),
                    "\"rw\" or \"ro\"",
                );
                true
            }
        };
        let profiles = match w.get("profiles").map(|p| &p.node.val) {
            Some(Val::Array(a)) => a
                .iter()
                .filter_map(|n| match &n.val {
                    Val::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => gateway.map(|g| vec![g.profile.clone()]).unwrap_or_default(),
        };
        let why = get_str(w, "why")
            .map(|(s, _)| s.to_string())
            .unwrap_or_default();
        out.insert(
            e.key.clone(),
            WorkspaceConfig {
                path,
                why,
                writable,
                profiles,
            },
        );
    }
    out
}

/// Most rotated audit files kept: more is a typo.
const MAX_AUDIT_KEEP: i64 = 100_000;

/// `[audit]`: `rotate_size` (a size; 0 or absent = never) and `keep` (rotated files kept).
fn audit_rotation(cx: &mut Sink<'_>, t: &Table) -> Rotation {
    let mut r = Rotation::default();
    if let Some(e) = t.get("rotate_size") {
        let v = match &e.node.val {
            Val::Int(i) => Some(toml::Value::Integer(*i)),
            Val::Str(s) => Some(toml::Value::String(s.clone())),
            _ => None,
        };
        let zero = matches!(&v, Some(toml::Value::Integer(0)))
            || matches!(&v, Some(toml::Value::String(s)) if s.trim() == "0");
        if let (Some(v), false) = (v, zero) {
            match carapace_policy::parse_size(&v) {
                Ok(n) if n < MIN_AUDIT_ROTATE_SIZE => cx.err(
                    &e.node.span,
                    format!("`rotate_size` of {n} bytes is too small"),
                    "0 (never rotate) or a size of at least 64KiB",
                ),
                Ok(n) => r.max_bytes = n,
                Err(why) => cx.err(
                    &e.node.span,
                    format!("`rotate_size`: {why}"),
                    &format!("0 (never rotate) or {}", carapace_policy::SIZE_EXPECTED),
                ),
            }
        }
    }
    if let Some(keep) = get_int(cx, t, "keep", 1..=MAX_AUDIT_KEEP) {
        r.keep = usize::try_from(keep).unwrap_or(DEFAULT_KEEP);
    }
    r
}

/// Smallest `rotate_size`: a few records per file would be a typo, not a choice.
const MIN_AUDIT_ROTATE_SIZE: u64 = 64 << 10;

/// Where to point at for an error about a child's workspace.
pub(super) fn workspace_span(root: &Table, c: &ChildConfig) -> Range<usize> {
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

pub(super) const LOG_FORMAT_EXPECTED: &str = "one of \"auto\", \"text\", \"journal\", \"json\"";
pub(super) const LOG_LEVEL_EXPECTED: &str =
    "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"";

pub(super) fn parse_level(s: &str) -> Option<tracing::Level> {
    Some(match s {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => return None,
    })
}

pub(super) fn valid_channel_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n != "gateway"
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

pub(super) const GROUP_EXPECTED: &str =
    "a group name that exists (see /etc/group) or a numeric gid from 0 to 4294967294";

pub(super) fn group_of(cx: &mut Sink<'_>, e: &Entry) -> Option<u32> {
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
        _ => None,
    }
}

pub(super) const PROGRAM_EXPECTED: &str =
    "an absolute path, or a bare file name (found next to the carapace executable, else in \
     /usr/libexec/carapace)";
pub(super) const LISTEN_EXPECTED: &str =
    "an IP address and port such as \"127.0.0.1:8750\" or \"[::1]:8750\", or \"none\"";

/// One `[gateway]` or `[channels.NAME]` table.
pub(super) fn child(
    cx: &mut Sink<'_>,
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
        None
    } else {
        channel::kind_of(cx, t)
    };

    let program = match get_str(t, "program") {
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
                    "kind = \"telegram\", \"email\", \"webhook\", \"irc\", \"signal\", \"slack\", \"discord\" or \"matrix\" (the built-in adapters), \
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
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        },
    };

    let default_profile = if is_gateway { "gateway" } else { "channel" };
    let profile = match get_str(t, "profile") {
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
    let allow_non_loopback = listens && get_bool(t, "allow_non_loopback", false);
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

    let restart = match get_table(t, "restart") {
        None => RestartConfig::default(),
        Some(rt) => restart(cx, rt),
    };

    let mut environment = BTreeMap::new();
    if let Some(et) = get_table(t, "environment") {
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
                _ => {}
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
        serves: None,
    }
}

/// `listen` of a table: an address and port, loopback unless `allow_non_loopback`; None when
/// absent, `"none"`, or wrong (reported).
pub(super) fn listen_addr(
    cx: &mut Sink<'_>,
    t: &Table,
    allow_non_loopback: bool,
    (who, what): (&str, &str),
) -> Option<SocketAddr> {
    match get_str(t, "listen")? {
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

pub(super) const BASE_URL_EXPECTED: &str =
    "an http:// or https:// URL of an OpenAI-compatible API, e.g. \"https://api.openai.com/v1\" or \"http://127.0.0.1:8080/v1\"";

/// Whether `url` looks like an endpoint the gateway can reach: http(s)://HOST[:PORT][/PATH],
/// without credentials, query or fragment. The reason when not.
pub(super) fn check_base_url(url: &str) -> Result<(), &'static str> {
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
pub(super) fn gateway_settings(cx: &mut Sink<'_>, t: &Table) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(ct) = get_table(t, "clients") {
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
    if let Some(e) = t.get("agent") {
        if let Some(at) = e.node.val.as_table() {
            let mut a = serde_json::Map::new();
            match get_str(at, "base_url") {
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
            match get_str(at, "model") {
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
            if let Some((s, e)) = get_str(at, "api_key_secret") {
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
                ("context_budget", 256..=100_000_000),
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
            if let Some((s, _)) = get_str(at, "system_prompt") {
                a.insert("system_prompt".into(), s.into());
            }
            if at.get("answer_channels").is_some() {
                let b = get_bool(at, "answer_channels", true);
                a.insert("answer_channels".into(), b.into());
            }
            out.insert("agent".into(), a.into());
        }
    }
    serde_json::Value::Object(out)
}

pub(super) fn valid_env_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

pub(super) fn restart(cx: &mut Sink<'_>, t: &Table) -> RestartConfig {
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
            _ => d.crash_loop_restarts,
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
