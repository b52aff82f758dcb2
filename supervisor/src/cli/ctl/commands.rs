//! The operator commands themselves: each asks the supervisor over the control socket (or reads
//! the state directory) and prints through [`super::format`], to a [`Term`] so tests can read it.

use super::*;

/// Where a command writes: stdout and stderr, or buffers in tests. Write errors are ignored (a
/// reader that went away, `| head`, is no reason to fail or panic).
pub struct Term<'a> {
    pub out: &'a mut dyn std::io::Write,
    pub err: &'a mut dyn std::io::Write,
}

impl std::fmt::Debug for Term<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Term")
    }
}

impl Term<'_> {
    /// `text` as is on stdout, flushed.
    pub(super) fn out(&mut self, text: &str) -> bool {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .is_ok()
    }

    /// `carapace: <msg>` on stderr.
    pub(super) fn err(&mut self, msg: &str) {
        let _ = writeln!(self.err, "carapace: {msg}");
    }

    pub(super) fn json(&mut self, v: &Value) {
        let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        self.out(&format!("{text}\n"));
    }

    /// Print `v` as `T` with `fmt`, or as JSON when `json` or when it does not decode as `T` (a
    /// newer supervisor, say).
    pub(super) fn print_as<T: serde::de::DeserializeOwned>(
        &mut self,
        v: &Value,
        json: bool,
        fmt: impl FnOnce(&T) -> String,
    ) {
        if json {
            self.json(v);
            return;
        }
        match serde_json::from_value::<T>(v.clone()) {
            Ok(t) => {
                self.out(&fmt(&t));
            }
            Err(e) => {
                self.err(&format!(
                    "unexpected answer from the supervisor ({e}); as sent:"
                ));
                self.json(v);
            }
        }
    }

    /// Print the error for `e` and return its exit status.
    pub(super) fn fail(&mut self, e: &ControlError) -> i32 {
        match e {
            ControlError::NotRunning { .. } => {
                self.err(&e.to_string());
                EXIT_NO_DAEMON
            }
            ControlError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                self.err(&error_chain(e));
                self.err("only root and members of the control group may use the control socket");
                EXIT_FAILED
            }
            ControlError::Daemon { message } => {
                self.err(&clean_lines(message));
                EXIT_FAILED
            }
            _ => {
                self.err(&error_chain(e));
                EXIT_FAILED
            }
        }
    }
}

/// Run `f` on the process's stdout and stderr.
pub(super) fn on_terminal(f: impl FnOnce(&mut Term<'_>) -> i32) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    f(&mut Term {
        out: &mut out,
        err: &mut err,
    })
}

/// `carapace status`.
pub fn status(a: StatusArgs) -> i32 {
    on_terminal(|t| status_to(&a, t))
}

pub fn status_to(a: &StatusArgs, t: &mut Term<'_>) -> i32 {
    match control::call(&a.opts.socket(), &Request::Status) {
        Ok(v) => {
            t.print_as::<StatusReport>(&v, a.opts.json, format_status);
            EXIT_OK
        }
        Err(e) => t.fail(&e),
    }
}

/// `carapace dlq ...`.
pub fn dlq(a: DlqArgs) -> i32 {
    on_terminal(|t| dlq_to(&a, t))
}

pub fn dlq_to(a: &DlqArgs, t: &mut Term<'_>) -> i32 {
    let req = match &a.command {
        DlqCommand::List => Request::DlqList,
        DlqCommand::Release { id } | DlqCommand::Drop { id }
            if !carapace_broker::dlq::valid_id(id) =>
        {
            t.err(&format!(
                "{:?} is not a dead-letter id (letters, digits, '-', '_'; see `carapace dlq list`)",
                clean(id)
            ));
            return EXIT_USAGE;
        }
        DlqCommand::Release { id } => Request::DlqRelease { id: id.clone() },
        DlqCommand::Drop { id } => Request::DlqDrop { id: id.clone() },
    };
    let v = match control::call(&a.opts.socket(), &req) {
        Ok(v) => v,
        Err(e) => return t.fail(&e),
    };
    let json = a.opts.json;
    match req {
        Request::DlqRelease { id } => t.print_as::<DlqLetter>(&v, json, |d| {
            format!(
                "released {}: {} -> {} ({} bytes)\n",
                clean(&id),
                clean(&d.entry.channel),
                clean(&d.entry.recipient),
                d.entry.body.len()
            )
        }),
        Request::DlqDrop { id } if !json => {
            t.out(&format!("dropped {}\n", clean(&id)));
        }
        Request::DlqDrop { .. } => t.json(&v),
        _ => t.print_as::<DlqList>(&v, json, format_dlq),
    }
    EXIT_OK
}

/// `carapace held ...`.
pub fn held(a: HeldArgs) -> i32 {
    on_terminal(|t| held_to(&a, t))
}

pub fn held_to(a: &HeldArgs, t: &mut Term<'_>) -> i32 {
    let req = match &a.command {
        HeldCommand::List => Request::HeldList,
        HeldCommand::Admit { id, .. } | HeldCommand::Drop { id }
            if !carapace_broker::dlq::valid_id(id) =>
        {
            t.err(&format!(
                "{:?} is not a held message id (letters, digits, '-', '_'; see `carapace held list`)",
                clean(id)
            ));
            return EXIT_USAGE;
        }
        HeldCommand::Admit { id, always } => Request::HeldAdmit {
            id: id.clone(),
            always: *always,
        },
        HeldCommand::Drop { id } => Request::HeldDrop { id: id.clone() },
    };
    let v = match control::call(&a.opts.socket(), &req) {
        Ok(v) => v,
        Err(e) => return t.fail(&e),
    };
    let json = a.opts.json;
    match req {
        Request::HeldAdmit { .. } => t.print_as::<Admitted>(&v, json, |d| {
            format!(
                "admitted {}: queued for the agent as #{}{}\n",
                clean(&d.id),
                d.seq,
                if d.always {
                    "; its sender is admitted for good"
                } else {
                    ""
                }
            )
        }),
        Request::HeldDrop { id } if !json => {
            t.out(&format!("dropped {}\n", clean(&id)));
        }
        Request::HeldDrop { .. } => t.json(&v),
        _ => t.print_as::<HeldList>(&v, json, format_held),
    }
    EXIT_OK
}

/// `carapace metrics`.
pub fn metrics(a: MetricsArgs) -> i32 {
    on_terminal(|t| metrics_to(&a, t))
}

pub fn metrics_to(a: &MetricsArgs, t: &mut Term<'_>) -> i32 {
    match control::call(&a.opts.socket(), &Request::Metrics) {
        Ok(v) => {
            // The exposition as is: it is the supervisor's own text, made for parsers.
            t.print_as::<MetricsText>(&v, a.opts.json, |m| m.text.clone());
            EXIT_OK
        }
        Err(e) => t.fail(&e),
    }
}

/// `carapace reload`.
pub fn reload(a: ReloadArgs) -> i32 {
    on_terminal(|t| reload_to(&a, t))
}

pub fn reload_to(a: &ReloadArgs, t: &mut Term<'_>) -> i32 {
    match control::call(&a.opts.socket(), &Request::Reload) {
        Ok(v) => {
            let applied = serde_json::from_value::<ReloadReport>(v.clone())
                .map(|r| r.applied)
                .unwrap_or(true);
            if a.opts.json {
                t.json(&v);
            } else {
                t.out(&format_reload(&v));
            }
            if applied {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(ControlError::Daemon { message }) => {
            t.err(&format!("reload rejected: {}", clean_lines(&message)));
            t.err("the old configuration and policy stay in force");
            EXIT_FAILED
        }
        Err(e) => t.fail(&e),
    }
}

/// `carapace audit ...`.
pub fn audit(a: AuditCommand) -> i32 {
    on_terminal(|t| audit_to(&a, t))
}

pub fn audit_to(a: &AuditCommand, t: &mut Term<'_>) -> i32 {
    match a {
        AuditCommand::Verify { file, json } => audit_verify_to(file, *json, t),
        AuditCommand::Rotate { file, keep } => audit_rotate_to(file, *keep, t),
        AuditCommand::Tail {
            lines,
            follow,
            opts,
        } => audit_tail_to(opts, *lines, *follow, t),
    }
}

pub(super) fn audit_tail_to(opts: &CtlOpts, lines: usize, follow: bool, t: &mut Term<'_>) -> i32 {
    let mut n = 0usize;
    let req = Request::AuditTail { lines, follow };
    let r = control::stream_raw(&opts.socket(), &req, |v, raw| {
        n += 1;
        // --json: the record as stored (byte for byte when the supervisor sent it so).
        let mut text = match (opts.json, raw) {
            (true, Some(raw)) => raw.to_string(),
            (true, None) => v.to_string(),
            (false, _) => format_audit_line(&v),
        };
        text.push('\n');
        // Stop quietly when the reader went away (`| head`).
        t.out(&text)
    });
    match r {
        Ok(()) => {
            if n == 0 && !opts.json {
                t.err("no audit records yet");
            }
            EXIT_OK
        }
        Err(e) => t.fail(&e),
    }
}

/// What an approval argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalRef {
    /// An approval of the running supervisor.
    Daemon(u64),
    /// `PID-N`: an approval of a `carapace exec` run (state directory file).
    ExecKey(String),
}

/// A numeric ID goes to the supervisor; `PID-N` to the state directory; anything else is a
/// usage error (its message).
pub fn parse_approval_ref(key: &str) -> Result<ApprovalRef, String> {
    if !key.is_empty() && key.len() <= 20 && key.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(id) = key.parse() {
            return Ok(ApprovalRef::Daemon(id));
        }
    }
    let exec_key = key.split_once('-').is_some_and(|(p, n)| {
        !p.is_empty()
            && !n.is_empty()
            && p.len() <= 20
            && n.len() <= 20
            && p.bytes().all(|b| b.is_ascii_digit())
            && n.bytes().all(|b| b.is_ascii_digit())
    });
    if exec_key {
        return Ok(ApprovalRef::ExecKey(key.to_string()));
    }
    Err(format!(
        "{:?} is not an approval ID (a number for the running supervisor, or PID-N for a \
         `carapace exec` run; see `carapace approvals list`)",
        clean(key)
    ))
}

/// `carapace approvals ...`.
pub fn approvals(a: ApprovalsArgs) -> i32 {
    on_terminal(|t| approvals_to(&a, t))
}

pub fn approvals_to(a: &ApprovalsArgs, t: &mut Term<'_>) -> i32 {
    let state = crate::paths::state_dir_or_default(a.state_dir.as_deref());
    let socket = a.opts.socket();
    let (key, resolution) = match &a.command {
        ApprovalsCommand::List => return approvals_list(&socket, &state, a.opts.json, t),
        ApprovalsCommand::Allow { key, always } => (
            key,
            if *always {
                Resolution::AllowAlways
            } else {
                Resolution::AllowOnce
            },
        ),
        ApprovalsCommand::Deny { key } => (key, Resolution::Deny),
    };
    match parse_approval_ref(key) {
        Err(msg) => {
            t.err(&msg);
            EXIT_USAGE
        }
        Ok(ApprovalRef::ExecKey(k)) => {
            answer_approval_to(&state.join("pending"), &k, resolution.as_str(), t)
        }
        Ok(ApprovalRef::Daemon(id)) => {
            let req = Request::ApprovalsResolve {
                id,
                resolution: resolution.as_str().to_string(),
            };
            match control::call(&socket, &req) {
                Ok(v) => {
                    t.print_as::<Resolved>(&v, a.opts.json, |r| {
                        format!("approval {}: {}\n", r.id, clean(&r.decision))
                    });
                    EXIT_OK
                }
                Err(e) => t.fail(&e),
            }
        }
    }
}

/// Pending approvals of `carapace exec` runs in `<state>/pending`, and unreadable files.
pub(super) fn exec_pending(state: &Path) -> (Vec<PendingFile>, Vec<PathBuf>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join("pending"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in files {
        match std::fs::read(&f)
            .ok()
            .and_then(|b| serde_json::from_slice::<PendingFile>(&b).ok())
        {
            Some(p) => ok.push(p),
            None => bad.push(f),
        }
    }
    (ok, bad)
}

/// `approvals list`: the supervisor's pending approvals and grants (without a supervisor, the
/// grants of the state directory) and the pending approvals of `carapace exec` runs. No
/// supervisor is not an error here: the state directory is still listed.
pub(super) fn approvals_list(socket: &Path, state: &Path, json: bool, t: &mut Term<'_>) -> i32 {
    let daemon = control::call(socket, &Request::ApprovalsList);
    let (exec, bad) = exec_pending(state);
    for f in &bad {
        t.err(&format!("{}: not a pending approval", f.display()));
    }
    let mut code = EXIT_OK;
    let daemon_value = match daemon {
        Ok(v) => Some(v),
        Err(ControlError::NotRunning { .. }) => {
            t.err(&format!(
                "no supervisor is running (no control socket at {}); showing the approvals of \
                 `carapace exec` runs only",
                socket.display()
            ));
            None
        }
        Err(e) => {
            code = t.fail(&e);
            None
        }
    };
    // Without a supervisor, the grants are read from the state directory.
    let file_grants: Vec<control::GrantInfo> = if daemon_value.is_none() && state.is_dir() {
        match carapace_broker::approvals::Approvals::open(state, std::time::Duration::ZERO) {
            Ok(ap) => ap.grants().iter().map(control::GrantInfo::from).collect(),
            Err(e) => {
                t.err(&error_chain(&e));
                code = EXIT_FAILED;
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    if json {
        let exec_json: Vec<Value> = exec
            .iter()
            .filter_map(|p| serde_json::to_value(p).ok())
            .collect();
        let mut doc = serde_json::json!({ "exec_pending": exec_json });
        match &daemon_value {
            Some(v) => {
                doc["pending"] = v.get("pending").cloned().unwrap_or(Value::Array(vec![]));
                doc["always"] = v.get("always").cloned().unwrap_or(Value::Array(vec![]));
            }
            None => {
                doc["pending"] = Value::Array(vec![]);
                doc["always"] = serde_json::to_value(&file_grants).unwrap_or_default();
            }
        }
        t.json(&doc);
        return code;
    }
    let list = match &daemon_value {
        Some(v) => match serde_json::from_value::<ApprovalsList>(v.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                t.err(&format!(
                    "unexpected answer from the supervisor ({e}); as sent:"
                ));
                t.json(v);
                None
            }
        },
        None => Some(ApprovalsList {
            pending: Vec::new(),
            always: file_grants,
        }),
    };
    let mut text = String::new();
    if let Some(l) = list {
        let s = format_approvals(&l);
        if l.pending.is_empty() && !exec.is_empty() {
            // The pending ones are the exec runs' below.
            text.push_str(s.trim_start_matches("no pending approvals\n"));
        } else {
            text.push_str(&s);
        }
    }
    for p in &exec {
        text.push_str(&format_pending_file(p));
        text.push('\n');
    }
    t.out(&text);
    code
}

/// Write the answer for pending approval `key` of a `carapace exec` run; it picks it up.
pub fn answer_approval(pending_dir: &Path, key: &str, answer: &str) -> i32 {
    on_terminal(|t| answer_approval_to(pending_dir, key, answer, t))
}

pub(super) fn answer_approval_to(
    pending_dir: &Path,
    key: &str,
    answer: &str,
    t: &mut Term<'_>,
) -> i32 {
    let valid =
        !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    if !valid {
        t.err(&format!(
            "{:?} is not an approval key (PID-N, see `carapace approvals list`)",
            clean(key)
        ));
        return EXIT_USAGE;
    }
    if !pending_dir.join(format!("{key}.json")).is_file() {
        t.err(&format!(
            "no pending approval {key} (see `carapace approvals list`)"
        ));
        return EXIT_FAILED;
    }
    let path = pending_dir.join(format!("{key}.answer"));
    match write_private_bytes(pending_dir, &path, format!("{answer}\n").as_bytes()) {
        Ok(()) => {
            t.out(&format!("{answer}: {key}\n"));
            EXIT_OK
        }
        Err(e) => {
            t.err(&e.to_string());
            EXIT_FAILED
        }
    }
}

/// `carapace token ...`.
pub fn token(a: TokenArgs) -> i32 {
    on_terminal(|t| token_to(&a, t))
}

pub fn token_to(a: &TokenArgs, t: &mut Term<'_>) -> i32 {
    use carapace_broker::tokens::{TokenError, TokenStore};
    let state = crate::paths::state_dir_or_default(a.state_dir.as_deref());
    let store = TokenStore::in_state_dir(&state);
    let fail = |t: &mut Term<'_>, e: &TokenError| {
        t.err(&clean_lines(&error_chain(e)));
        match e {
            TokenError::BadName { .. } | TokenError::BadScope { .. } => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    };
    match &a.command {
        TokenCommand::Create { name, scope } => match store.create(name, *scope) {
            Ok((info, token)) => {
                if a.json {
                    t.json(&serde_json::json!({
                        "id": info.id,
                        "name": info.name,
                        "scope": info.scope,
                        "created": info.created,
                        "token": token,
                    }));
                } else {
                    t.out(&format!(
                        "created token {} \"{}\" (scope {}) in {}\n\n    {token}\n\n\
                         This is the only time the token is shown: it will not be shown again \
                         (only its hash is kept).\nClients send it in the header \
                         `Authorization: Bearer <the token>`.\n",
                        info.id,
                        clean(&info.name),
                        info.scope,
                        store.path().display(),
                    ));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
        TokenCommand::List => match store.list() {
            Ok(tokens) => {
                if a.json {
                    t.json(&serde_json::to_value(&tokens).unwrap_or_default());
                } else {
                    t.out(&format_tokens(&tokens));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
        TokenCommand::Revoke { id_or_name } => match store.revoke(id_or_name) {
            Ok(info) => {
                if a.json {
                    t.json(&serde_json::to_value(&info).unwrap_or_default());
                } else {
                    t.out(&format!(
                        "revoked token {} \"{}\" (scope {})\n",
                        info.id,
                        clean(&info.name),
                        info.scope
                    ));
                }
                EXIT_OK
            }
            Err(e) => fail(t, &e),
        },
    }
}

/// `carapace audit verify FILE`: 0 intact, 1 broken, 2 unreadable.
pub fn audit_verify(file: &Path) -> i32 {
    on_terminal(|t| audit_verify_to(file, false, t))
}

pub(super) fn audit_verify_to(file: &Path, json: bool, t: &mut Term<'_>) -> i32 {
    let head_json = |h: &Option<carapace_broker::audit::Head>| {
        h.as_ref()
            .map(|h| serde_json::json!({"seq": h.seq, "hash": h.hash}))
    };
    let result = carapace_broker::audit::verify_set(file);
    if json {
        let (v, code) = match result {
            Ok(r) => (
                serde_json::json!({
                    "file": file,
                    "ok": r.is_ok(),
                    "lines": r.lines,
                    "head": head_json(&r.head),
                    "broken": r.broken.as_ref().map(|b| serde_json::json!({
                        "file": b.file, "line": b.line, "what": b.to_string(),
                    })),
                    "error": null,
                    "files": r.files.iter().map(|f| serde_json::json!({
                        "file": f.path, "first_seq": f.first_seq, "lines": f.lines,
                        "head": head_json(&f.head),
                    })).collect::<Vec<_>>(),
                    "anchor": head_json(&r.anchor),
                }),
                if r.is_ok() { EXIT_OK } else { EXIT_FAILED },
            ),
            Err(e) => (
                serde_json::json!({
                    "file": file, "ok": false, "lines": 0, "head": null, "broken": null,
                    "error": error_chain(&e), "files": [], "anchor": null,
                }),
                EXIT_FAILED,
            ),
        };
        t.out(&format!("{v}\n"));
        return code;
    }
    match result {
        Ok(r) => {
            // A broken report names the file it is broken in.
            t.out(&format!("{r}\n"));
            if r.is_ok() {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(e) => {
            // Not a usage error (2): the file could not be verified.
            t.err(&error_chain(&e));
            EXIT_FAILED
        }
    }
}

/// `carapace audit rotate FILE [--keep N]`.
pub(super) fn audit_rotate_to(file: &Path, keep: Option<u32>, t: &mut Term<'_>) -> i32 {
    let rotated = carapace_broker::audit::AuditLog::open(file).and_then(|mut log| {
        log.set_rotation(carapace_broker::audit::Rotation {
            max_bytes: 0,
            keep: keep.map_or(usize::MAX, |k| usize::try_from(k).unwrap_or(usize::MAX)),
        });
        log.rotate().map(|r| (r, log.last_seq()))
    });
    match rotated {
        Ok((Some(old), last)) => {
            t.out(&format!(
                "rotated: {} (up to seq {last}); the next record goes to {} and continues the chain\n",
                old.display(),
                file.display()
            ));
            EXIT_OK
        }
        Ok((None, _)) => {
            t.out(&format!("nothing to rotate: {} is empty\n", file.display()));
            EXIT_OK
        }
        Err(e) => {
            t.err(&error_chain(&e));
            EXIT_FAILED
        }
    }
}
