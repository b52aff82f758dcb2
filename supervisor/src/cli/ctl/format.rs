//! What the operator commands print for people: tables, durations, sizes, audit lines; every
//! text from outside passes through [`clean`] first.

use super::*;

/// `s` with control characters escaped, so text from a confined program (an argv, a message
/// body) cannot drive the operator's terminal.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`clean`] line by line: the line breaks of a multi-line message (a policy error with its
/// source line and caret) are kept, every other control character is escaped.
pub fn clean_lines(s: &str) -> String {
    s.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

/// `3d04h`, `2h05m`, `4m12s`, `12s`.
pub fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `512 B`, `12.0 KiB`, `3.4 MiB`, `1.2 GiB`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `850ms`, `1.50s`, `2m03s`.
pub fn fmt_cpu(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{:02}s", ms / 1000, (ms % 1000) / 10)
    } else {
        fmt_duration(ms / 1000)
    }
}

pub(super) fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

pub(super) fn short_hash(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// Rows as left-aligned columns separated by two spaces (no trailing spaces).
pub(super) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `carapace status`, for people.
pub fn format_status(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "carapace {} (pid {}), up {} since {}",
        clean(&s.version),
        s.pid,
        fmt_duration(s.uptime_secs),
        clean(&s.started)
    );
    let _ = write!(
        out,
        "mode:          {}; cgroups: {}",
        clean(&s.mode),
        clean(&s.cgroups)
    );
    if s.tools.is_empty() {
        out.push('\n');
    } else {
        let _ = writeln!(out, "; tools: {}", clean(&s.tools));
    }
    let _ = writeln!(out, "config:        {}", clean(&s.config));
    let files = if s.policy.files.is_empty() {
        "embedded default".to_string()
    } else {
        s.policy
            .files
            .iter()
            .map(|f| clean(f))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "policy:        {files} (sha256 {}…, loaded {})",
        clean(short_hash(&s.policy.sha256)),
        clean(&s.policy.loaded)
    );
    let last_error = match &s.last_reload_error {
        Some(e) => format!("; last reload FAILED: {}", clean(e)),
        None => String::new(),
    };
    let _ = writeln!(out, "reloads:       {}{last_error}", s.reloads);
    let _ = writeln!(
        out,
        "approvals:     {} pending; dead letters: {}",
        s.pending_approvals, s.dead_letters
    );
    let _ = writeln!(
        out,
        "audit:         {} (seq {}, head {}…)",
        clean(&s.audit.path),
        s.audit.seq,
        clean(short_hash(&s.audit.head))
    );
    out.push('\n');
    if s.children.is_empty() {
        out.push_str("no children\n");
        return out;
    }
    let mut rows = vec![[
        "NAME",
        "ROLE",
        "PROFILE",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "MEMORY",
        "CPU",
        "TASKS",
        "LAST EXIT",
    ]
    .map(str::to_string)
    .to_vec()];
    for c in &s.children {
        rows.push(vec![
            clean(&c.name),
            clean(&c.role),
            clean(&c.profile),
            clean(&c.state),
            opt(c.pid, |p| p.to_string()),
            opt(c.uptime_secs, fmt_duration),
            c.restarts.to_string(),
            opt(c.memory_bytes, fmt_bytes),
            opt(c.cpu_ms, fmt_cpu),
            opt(c.tasks, |t| t.to_string()),
            opt(c.last_exit.as_deref(), clean),
        ]);
    }
    out.push_str(&table(&rows));
    if !s.channels.is_empty() {
        out.push('\n');
        let mut rows = vec![[
            "CHANNEL", "ADAPTER", "LAST IN", "LAST OUT", "QUEUED", "HELD", "OUTBOX", "DEAD",
            "ERROR",
        ]
        .map(str::to_string)
        .to_vec()];
        for c in &s.channels {
            rows.push(vec![
                clean(&c.channel),
                match c.connected {
                    Some(true) => "connected".to_string(),
                    Some(false) => "disconnected".to_string(),
                    None => "-".to_string(),
                },
                opt(c.last_in.as_deref(), clean),
                opt(c.last_out.as_deref(), clean),
                c.queued.to_string(),
                c.held.to_string(),
                c.outbox.to_string(),
                c.dead_lettered.to_string(),
                opt(c.error.as_deref(), clean),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

pub(super) fn argv_string(argv: &[String]) -> String {
    let parts: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", parts.join(", "))
}

/// The supervisor's approvals, for people.
pub fn format_approvals(l: &ApprovalsList) -> String {
    let mut out = String::new();
    if l.pending.is_empty() {
        out.push_str("no pending approvals\n");
    }
    for p in &l.pending {
        let _ = writeln!(
            out,
            "pending {}  {}  {}  argv={}  profile={}  expires in {}",
            p.id,
            clean(&p.who),
            clean(&p.program),
            argv_string(&p.argv),
            clean(&p.profile),
            fmt_duration(p.expires_in_secs)
        );
        let _ = writeln!(
            out,
            "        sha256={}  asked {}{}",
            clean(&p.sha256),
            clean(&p.created),
            if p.why.is_empty() {
                String::new()
            } else {
                format!("  why: {}", clean(&p.why))
            }
        );
    }
    for g in &l.always {
        let _ = writeln!(
            out,
            "always {}  argv={}  profile={}  sha256={}  granted {}",
            clean(&g.program),
            argv_string(&g.argv),
            clean(&g.profile),
            clean(&g.sha256),
            clean(&g.granted_at)
        );
    }
    out
}

/// A pending approval of a `carapace exec` run (state directory file), for people.
pub fn format_pending_file(p: &PendingFile) -> String {
    format!(
        "pending {}  {}#{}({})  {}  argv={}  profile={}  sha256={}  why: {}  (carapace exec pid {})",
        clean(&p.key),
        clean(&p.who.role),
        p.who.id,
        clean(&p.who.profile),
        clean(&p.program.display().to_string()),
        argv_string(&p.argv),
        clean(&p.profile),
        clean(&p.program_sha256),
        clean(&p.why),
        p.supervisor_pid
    )
}

pub(super) fn body_preview(body: &str) -> String {
    const MAX: usize = 120;
    let mut shown: String = body.chars().take(MAX).collect();
    if shown.len() < body.len() {
        shown.push('…');
    }
    format!("{:?}", shown)
}

/// The dead-letter queue, for people.
pub fn format_dlq(l: &DlqList) -> String {
    let mut out = String::new();
    if l.letters.is_empty() && l.unreadable.is_empty() {
        out.push_str("no dead letters\n");
    }
    for d in &l.letters {
        let e = &d.entry;
        let _ = writeln!(
            out,
            "{}  {}  {} -> {}  from {}#{}({})  reason: {}",
            clean(&d.id),
            clean(&e.ts),
            clean(&e.channel),
            clean(&e.recipient),
            clean(&e.who.role),
            e.who.id,
            clean(&e.who.profile),
            clean(&e.reason)
        );
        let _ = writeln!(
            out,
            "    body ({} bytes): {}",
            e.body.len(),
            body_preview(&e.body)
        );
    }
    for u in &l.unreadable {
        let _ = writeln!(out, "unreadable {}: {}", clean(&u.file), clean(&u.error));
    }
    out
}

pub(super) fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

/// One audit record as one line: seq, ts, who, op, decision, target -> outcome, detail, rule.
pub fn format_audit_line(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        let raw = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        return format!("? (not an audit record) {}", clean(&raw));
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .map_or_else(|| "?".to_string(), |s| s.to_string());
    let who = obj.get("who").map_or_else(
        || "?".to_string(),
        |w| {
            format!(
                "{}#{}({})",
                str_field(w, "role"),
                w.get("id")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "?".to_string(), |i| i.to_string()),
                str_field(w, "profile")
            )
        },
    );
    let mut line = format!(
        "#{seq} {} {who} {} {} {}",
        str_field(v, "ts"),
        str_field(v, "op"),
        str_field(v, "decision"),
        str_field(v, "target"),
    );
    let outcome = str_field(v, "outcome");
    if !outcome.is_empty() {
        let _ = write!(line, " -> {outcome}");
    }
    let detail = str_field(v, "detail");
    if !detail.is_empty() && detail != "?" {
        let _ = write!(line, " ({detail})");
    }
    if let Some(rule) = obj.get("rule").filter(|r| !r.is_null()) {
        let why = str_field(rule, "why");
        match rule.get("line").and_then(Value::as_u64) {
            Some(l) => {
                let _ = write!(line, " [rule line {l}: {why}]");
            }
            None => {
                let _ = write!(line, " [{why}]");
            }
        }
    }
    clean(&line)
}

/// Held messages, for people.
pub fn format_held(l: &HeldList) -> String {
    let mut out = String::new();
    if l.held.is_empty() {
        out.push_str("no held messages\n");
    }
    for h in &l.held {
        let _ = writeln!(
            out,
            "{}  {}  {}  from {} (conversation {})",
            clean(&h.id),
            clean(&h.ts),
            clean(&h.channel),
            clean(&h.sender),
            clean(&h.conversation)
        );
        let _ = writeln!(
            out,
            "    body ({} bytes): {}",
            h.body.len(),
            body_preview(&h.body)
        );
    }
    out
}

/// The answer to `reload`, for people.
pub fn format_reload(v: &Value) -> String {
    match serde_json::from_value::<ReloadReport>(v.clone()) {
        Ok(r) if r.applied => format!(
            "reloaded: {} (policy sha256 {}…)\n",
            clean(&r.message),
            clean(short_hash(&r.policy_sha256))
        ),
        Ok(r) => format!(
            "not applied: {}; the old configuration and policy stay in force\n",
            clean(&r.message)
        ),
        Err(_) => format!("reloaded: {}\n", clean(&v.to_string())),
    }
}

/// Tokens as a table: ID, NAME, SCOPE, CREATED.
pub fn format_tokens(tokens: &[carapace_broker::tokens::TokenInfo]) -> String {
    if tokens.is_empty() {
        return "no tokens (make one with `carapace token create`)\n".to_string();
    }
    let names: Vec<String> = tokens.iter().map(|t| clean(&t.name)).collect();
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut s = format!("{:<8}  {:<w$}  {:<8}  CREATED\n", "ID", "NAME", "SCOPE");
    for (t, name) in tokens.iter().zip(&names) {
        let _ = writeln!(
            s,
            "{:<8}  {:<w$}  {:<8}  {}",
            clean(&t.id),
            name,
            t.scope.as_str(),
            clean(&t.created)
        );
    }
    s
}
