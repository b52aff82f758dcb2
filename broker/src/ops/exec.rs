//! `exec`: run a tool in a new confined child through the supervisor's [`Spawner`]. Decided by
//! the same `[[exec]]` rules as `carapace exec`, on the *resolved* program path (symlinks and
//! `..` resolved, bare names searched in a fixed PATH) and the request's arguments: a request
//! cannot name its way around a rule. The program is opened once, right after it is resolved
//! ([`OpenedProgram`]): an `ask` waits for an operator through the [`Approver`], who is shown
//! the SHA-256 of that descriptor, and the [`Spawner`] starts that same file or nothing.
//! The tool's stdout and stderr reach the child through pipes the broker relays, redacting
//! every known secret value on the way; the exit report follows as an `exit` event.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use carapace_policy::{Approval, ExecRequest};

use crate::protocol::{ErrorCode, Event, ExitSummary, OkReply};
use crate::redact::Redactor;
use crate::server::{FollowUp, Identity, Response};
use carapace_sandbox::program::OpenedProgram;

use super::workspaces::{check_owner_key, check_relative_path, owner_digest};
use super::{rule_ref, shown, ApprovalAnswer, ApprovalQuery, Audited, Ops, SpawnRequest};

/// Where bare program names are looked up (the broker's own environment is not used).
pub const EXEC_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The canonical path of the program `argv0` names: an absolute path is canonicalized
/// (symlinks, `.` and `..` resolved); a bare name is searched in [`EXEC_PATH`]; a relative path
/// with a `/` is refused (relative to what?). The result must be an executable regular file.
pub fn resolve_program(argv0: &str) -> Result<PathBuf, String> {
    if argv0.is_empty() || argv0.contains('\0') {
        return Err("empty program name or NUL in it".into());
    }
    let candidate = if argv0.contains('/') {
        if !argv0.starts_with('/') {
            return Err(format!(
                "relative program path `{}`: use an absolute path or a bare name",
                shown(argv0)
            ));
        }
        PathBuf::from(argv0)
    } else {
        EXEC_PATH
            .iter()
            .map(|d| PathBuf::from(d).join(argv0))
            .find(|p| is_executable_file(p))
            .ok_or_else(|| format!("`{}` not found in {}", shown(argv0), EXEC_PATH.join(":")))?
    };
    let canon =
        std::fs::canonicalize(&candidate).map_err(|e| format!("{}: {e}", candidate.display()))?;
    if !is_executable_file(&canon) {
        return Err(format!("{} is not an executable file", canon.display()));
    }
    Ok(canon)
}

fn is_executable_file(p: &std::path::Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Copy `src` to `dst` through a streaming redactor until EOF (or until the reader is gone).
fn relay(src: OwnedFd, dst: OwnedFd, redactor: Arc<Redactor>) {
    let mut src = File::from(src);
    let mut dst = File::from(dst);
    let mut stream = redactor.stream();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let out = stream.push(&buf[..n]);
                if !out.is_empty() && dst.write_all(&out).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = dst.write_all(&stream.finish());
}

/// The exit report when the wait itself failed.
fn lost_exit() -> ExitSummary {
    ExitSummary {
        exit: 126,
        code: None,
        signal: None,
        wall_ms: 0,
        cpu_ms: 0,
        peak_mem: 0,
        oom: false,
        timeout: false,
    }
}

impl Ops {
    /// The `exec` operation. A response given after asking the operator is marked
    /// [`Response::asked`].
    pub async fn exec(&self, who: &Identity, argv: Vec<String>, cwd: Option<String>) -> Response {
        self.exec_in(who, argv, cwd, None, None).await
    }

    /// The `exec` operation with its workspace: a granted one by name, else the owner's own
    /// (gateways only), else the shared one; `cwd` relative to it.
    pub async fn exec_in(
        &self,
        who: &Identity,
        argv: Vec<String>,
        cwd: Option<String>,
        owner: Option<String>,
        workspace: Option<String>,
    ) -> Response {
        let mut asked = false;
        let response = self
            .exec_inner(who, argv, cwd, owner, workspace, &mut asked)
            .await;
        response.asked(asked)
    }

    /// The workspace an `exec` asked for: (host directory, read-only, how the audit names
    /// it). None: the spawner's shared one.
    async fn exec_workspace(
        &self,
        who: &Identity,
        owner: Option<String>,
        workspace: Option<String>,
    ) -> Result<Option<(PathBuf, bool, String)>, (ErrorCode, String)> {
        if let Some(name) = workspace {
            let g = self
                .granted(who, &name)
                .map_err(|e| (ErrorCode::Denied, e.to_string()))?;
            return Ok(Some((g.path, !g.writable, format!("workspace {}", g.name))));
        }
        let Some(key) = owner else { return Ok(None) };
        if who.role != crate::server::Role::Gateway {
            return Err((
                ErrorCode::Denied,
                "only a gateway may name the owner a tool runs for".into(),
            ));
        }
        check_owner_key(&key).map_err(|why| (ErrorCode::BadRequest, format!("owner: {why}")))?;
        let Some(spawner) = self.spawner.clone() else {
            return Err((
                ErrorCode::Unavailable,
                "this broker cannot start tools".into(),
            ));
        };
        let digest = owner_digest(&key);
        let d = digest.clone();
        let path = tokio::task::spawn_blocking(move || spawner.owner_workspace(&d))
            .await
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?
            .map_err(|e| (ErrorCode::Unavailable, e.message))?;
        Ok(Some((path, false, format!("owner workspace {digest}"))))
    }

    async fn exec_inner(
        &self,
        who: &Identity,
        argv: Vec<String>,
        cwd: Option<String>,
        owner: Option<String>,
        workspace: Option<String>,
        asked: &mut bool,
    ) -> Response {
        let target = shown(&argv.join(" "));
        let refuse = |detail: String, code: ErrorCode, message: String| {
            let target = target.clone();
            async move {
                self.refuse(
                    who,
                    Audited::of("exec", target).deny("refused", detail),
                    code,
                    message,
                )
                .await
            }
        };
        let cwd = match cwd.as_deref().map(check_relative_path) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(why)) => {
                return refuse(
                    format!("bad cwd: {why}"),
                    ErrorCode::BadRequest,
                    format!("exec: `cwd` must be a path relative to the workspace: {why}"),
                )
                .await
            }
        };
        let rules = match self.rules_for(who, "exec", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.exec {
            return refuse(
                "the profile may not use exec".into(),
                ErrorCode::Denied,
                format!("exec: profile `{}` may not run tools", who.profile),
            )
            .await;
        }
        let Some((argv0, args)) = argv.split_first() else {
            return refuse(
                "empty argv".into(),
                ErrorCode::BadRequest,
                "exec: empty argv".into(),
            )
            .await;
        };
        let chosen = match self.exec_workspace(who, owner, workspace).await {
            Ok(c) => c,
            Err((code, why)) => {
                return refuse(format!("workspace: {why}"), code, format!("exec: {why}")).await
            }
        };
        let ws_words = chosen
            .as_ref()
            .map_or_else(|| "shared workspace".to_string(), |(_, _, w)| w.clone());
        let argv0 = argv0.clone();
        // Opened once, right away: the decision is on its path, an approval hashes this
        // descriptor, and the spawner starts this very file.
        let opened = tokio::task::spawn_blocking(move || {
            let path = resolve_program(&argv0)?;
            OpenedProgram::open(&path)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .await;
        let opened = match opened {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return refuse(
                    format!("program not resolved: {e}"),
                    ErrorCode::NotFound,
                    format!("exec: {e}"),
                )
                .await
            }
            Err(e) => return Response::err(ErrorCode::Internal, format!("exec: {e}")),
        };
        let program = opened.path().to_path_buf();
        let policy = self.policy();
        let req = ExecRequest {
            program: program.clone(),
            args: args.to_vec(),
            workspace: match &chosen {
                Some((p, _, _)) => Some(p.clone()),
                None => self.spawner.as_ref().and_then(|s| s.workspace()),
            },
        };
        let decision = {
            let p = policy.clone();
            let r = req.clone();
            match tokio::task::spawn_blocking(move || {
                p.evaluate_with(&r, |x| std::fs::canonicalize(x).ok())
            })
            .await
            {
                Ok(d) => d,
                Err(e) => return Response::err(ErrorCode::Internal, format!("exec: {e}")),
            }
        };
        let canon_target = shown(&format!("{} {}", program.display(), args.join(" ")));
        let rref = decision
            .rule
            .as_ref()
            .and_then(|r| rule_ref(r.line, &r.why));
        let mut full_argv = vec![program.to_string_lossy().into_owned()];
        full_argv.extend(args.iter().cloned());
        let profile = match (&decision.approval, &decision.profile) {
            (Approval::Deny, _) | (_, None) => {
                return self
                    .refuse(
                        who,
                        Audited::of("exec", canon_target.clone())
                            .by(rref.or_else(|| rule_ref(0, "no [[exec]] rule matches")))
                            .deny("refused", String::new()),
                        ErrorCode::Denied,
                        format!("exec {canon_target}: denied by policy"),
                    )
                    .await
            }
            (_, Some(p)) => p.clone(),
        };
        if decision.approval == Approval::Ask {
            let Some(approver) = self.approver.clone() else {
                return self
                    .refuse(
                        who,
                        Audited::of("exec", canon_target.clone()).by(rref).deny("refused", "needs approval; no approvals service"),
                        ErrorCode::Denied,
                        format!("exec {canon_target}: needs an operator's approval and none can be asked"),
                    )
                    .await;
            };
            if let Err(resp) = self
                .allow(
                    who,
                    Audited::of("exec", canon_target.clone())
                        .by(rref.clone())
                        .ask("waiting for approval", String::new()),
                )
                .await
            {
                return resp;
            }
            *asked = true;
            let why = decision
                .rule
                .as_ref()
                .map(|r| r.why.clone())
                .unwrap_or_default();
            // The operator's announcement shows the rule's reason while the ask waits.
            self.desk.note_reason(who.id, &full_argv, &why);
            struct Forget<'a>(&'a super::operator_chat::Desk, u64, &'a [String]);
            impl Drop for Forget<'_> {
                fn drop(&mut self) {
                    self.0.forget_reason(self.1, self.2);
                }
            }
            let _forget = Forget(&self.desk, who.id, &full_argv);
            let answer = approver
                .clone()
                .ask(ApprovalQuery {
                    who: who.clone(),
                    program: opened.clone(),
                    argv: full_argv.clone(),
                    profile: profile.clone(),
                    why,
                })
                .await;
            drop(_forget);
            if let ApprovalAnswer::Deny(reason) = answer {
                return self
                    .refuse(
                        who,
                        Audited::of("exec", canon_target.clone())
                            .by(rref)
                            .deny("approval refused", reason.clone()),
                        ErrorCode::Denied,
                        format!("exec {canon_target}: not approved: {reason}"),
                    )
                    .await;
            }
        }
        let Some(spawner) = self.spawner.clone() else {
            return Response::err(
                ErrorCode::Unavailable,
                "exec: this broker cannot start tools",
            );
        };
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("exec", canon_target.clone())
                    .by(rref)
                    .allow("starting", format!("profile {profile}, {ws_words}")),
            )
            .await
        {
            return resp;
        }
        let sreq = SpawnRequest {
            program: opened,
            argv: full_argv,
            profile,
            read_only: chosen.as_ref().is_some_and(|(_, ro, _)| *ro),
            workspace: chosen.map(|(p, _, _)| p),
            cwd,
            policy: policy.clone(),
        };
        let handle = match tokio::task::spawn_blocking(move || spawner.spawn(sreq)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                // The allow above said "starting": record that it did not.
                tracing::warn!(who = %who, program = %canon_target, error = %e, "a tool could not be started");
                let _ = self
                    .audit(
                        who,
                        Audited::of("exec", canon_target.clone())
                            .error("could not start", e.to_string()),
                    )
                    .await;
                return Response::err(ErrorCode::Unavailable, format!("exec: cannot start: {e}"));
            }
            Err(e) => return Response::err(ErrorCode::Internal, format!("exec: {e}")),
        };
        let redactor = self.redactor();
        let (out_fd, err_fd, relays) = if redactor.is_empty() {
            (handle.stdout, handle.stderr, Vec::new())
        } else {
            let pipes = pipe().and_then(|a| pipe().map(|b| (a, b)));
            let ((out_r, out_w), (err_r, err_w)) = match pipes {
                Ok(p) => p,
                Err(e) => {
                    // The tool runs on; without pipes its output cannot be relayed safely.
                    drop(handle.stdout);
                    drop(handle.stderr);
                    let wait = handle.wait;
                    std::thread::spawn(wait);
                    return Response::err(ErrorCode::Unavailable, format!("exec: pipe2: {e}"));
                }
            };
            let (r1, r2) = (redactor.clone(), redactor);
            let src_out = handle.stdout;
            let src_err = handle.stderr;
            let t1 = std::thread::spawn(move || relay(src_out, out_w, r1));
            let t2 = std::thread::spawn(move || relay(src_err, err_w, r2));
            (out_r, err_r, vec![t1, t2])
        };
        let wait = handle.wait;
        let follow_up: FollowUp = Box::pin(async move {
            let summary = tokio::task::spawn_blocking(move || {
                let s = wait();
                for t in relays {
                    let _ = t.join();
                }
                s
            })
            .await
            .unwrap_or_else(|_| lost_exit());
            Event::Exit(summary)
        });
        Response::ok(OkReply::Exec {})
            .with_fds(vec![out_fd, err_fd])
            .with_follow_up(follow_up)
    }
}
