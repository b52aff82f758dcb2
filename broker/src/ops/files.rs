//! `open` (files beneath a rule's directory, with `openat2`) and `secret` (sealed memfds).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use carapace_policy::broker::{check_request_path, OpenAccess, SecretSource};
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::protocol::{Access, ErrorCode, OkReply};
use crate::server::{Identity, Response};

use super::{rule_ref, shown, Audited, Ops, SecretValue};

/// Why a secret could not be loaded. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential {name}: $CREDENTIALS_DIRECTORY is not set")]
    NoCredentialsDir { name: String },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path} is accessible to others (mode {mode:04o}): make it root-only (chmod o-rwx)")]
    OthersCanAccess { path: PathBuf, mode: u32 },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
}

/// Read a secret from where the policy says. The file must be a regular file (not a symlink)
/// with no permission bits for "others"; it is read once, at most `max` bytes.
pub fn load_secret(
    source: &SecretSource,
    credentials_dir: Option<&Path>,
    max: u64,
) -> Result<SecretValue, SecretError> {
    let path = match source {
        SecretSource::File(p) => p.clone(),
        SecretSource::Credential(name) => match credentials_dir {
            Some(d) => d.join(name),
            None => return Err(SecretError::NoCredentialsDir { name: name.clone() }),
        },
    };
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| SecretError::Io { op, path, source }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(io("open"))?;
    let meta = file.metadata().map_err(io("fstat"))?;
    if !meta.file_type().is_file() {
        return Err(SecretError::NotRegular { path });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(SecretError::OthersCanAccess { path, mode });
    }
    if meta.len() > max {
        return Err(SecretError::TooLarge { path, max });
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io("read"))?;
    if buf.len() as u64 > max {
        let _ = SecretValue::new(buf);
        return Err(SecretError::TooLarge { path, max });
    }
    Ok(SecretValue::new(buf))
}

/// A memfd holding `bytes`, sealed against any change (`F_SEAL_WRITE | F_SEAL_SHRINK |
/// F_SEAL_GROW | F_SEAL_SEAL`), offset 0, close-on-exec.
pub fn sealed_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        c"carapace-secret",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    file.write_all_at(bytes, 0)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    Ok(OwnedFd::from(file))
}

/// Check an `open` request's path: absolute, normalized (no `.`, `..`, `//`), no NUL, no
/// trailing `/`, shorter than PATH_MAX.
pub fn validate_open_path(path: &str) -> Result<(), &'static str> {
    check_request_path(path)
}

/// Open a rule's directory once: `O_PATH | O_DIRECTORY | O_CLOEXEC`.
pub(crate) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    Ok(OwnedFd::from(f))
}

fn policy_access(a: Access) -> OpenAccess {
    match a {
        Access::Read => OpenAccess::Read,
        Access::Write => OpenAccess::Write,
        Access::Create => OpenAccess::Create,
        Access::List => OpenAccess::Read,
    }
}

/// Why [`open_beneath`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenFailure {
    #[error("openat2: {0}")]
    Openat2(#[source] io::Error),
    #[error("fstat: {0}")]
    Fstat(#[source] io::Error),
    #[error("fcntl(F_SETFL): {0}")]
    Fcntl(#[source] io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("not a directory")]
    NotDirectory,
}

/// Open `rel` beneath `dir` with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)`: no `..` escape, no symlink anywhere on the way (including the
/// last component), no /proc magic links. `read`: existing file, read-only; `write`: existing
/// file, write-only (no truncation); `create`: a new file (`O_EXCL`, mode 0600), write-only.
/// Only regular files are handed out (FIFOs and devices are refused; the open itself is
/// non-blocking so a FIFO cannot stall the broker).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &Path,
    access: Access,
) -> Result<OwnedFd, OpenFailure> {
    let base = OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
    let (flags, mode) = match access {
        Access::Read => (base | OFlag::O_RDONLY, Mode::empty()),
        Access::Write => (base | OFlag::O_WRONLY, Mode::empty()),
        Access::Create => (
            base | OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        ),
        Access::List => (base | OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()),
    };
    let how = OpenHow::new().flags(flags).mode(mode).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    let fd = openat2(dir, rel, how).map_err(|e| OpenFailure::Openat2(io::Error::from(e)))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(OpenFailure::Fstat)?;
    if access == Access::List {
        if !meta.file_type().is_dir() {
            return Err(OpenFailure::NotDirectory);
        }
    } else if !meta.file_type().is_file() {
        return Err(OpenFailure::NotRegular);
    }
    // Clear O_NONBLOCK (the only status flag we set that F_SETFL can change).
    let cur = rustix::fs::fcntl_getfl(&file).map_err(|e| OpenFailure::Fcntl(e.into()))?;
    rustix::fs::fcntl_setfl(&file, cur - rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| OpenFailure::Fcntl(e.into()))?;
    Ok(OwnedFd::from(file))
}

impl Ops {
    /// The `open` operation in a granted workspace: `path` relative to it (no `..`, no
    /// absolute path), joined beneath the workspace's directory and then decided by the
    /// profile's `open` rules like any other path. A read-only workspace allows only `read`.
    pub async fn open_in(
        &self,
        who: &Identity,
        workspace: Option<&str>,
        path: &str,
        access: Access,
    ) -> Response {
        let Some(name) = workspace else {
            return self.open(who, path, access).await;
        };
        let target = format!("{}:{} ({})", shown(name), shown(path), access.as_str());
        let refuse = |code: ErrorCode, why: String| {
            let target = target.clone();
            async move {
                self.refuse(
                    who,
                    Audited::of("open", target.clone()).deny("refused", why.clone()),
                    code,
                    format!("open {target}: {why}"),
                )
                .await
            }
        };
        let g = match self.granted(who, name) {
            Ok(g) => g,
            Err(e) => return refuse(ErrorCode::Denied, e.to_string()).await,
        };
        let rel = match super::workspaces::check_relative_path(path) {
            Ok(r) => r,
            Err(why) => return refuse(ErrorCode::BadRequest, format!("bad path: {why}")).await,
        };
        if !g.writable && !matches!(access, Access::Read | Access::List) {
            return refuse(
                ErrorCode::Denied,
                format!("workspace `{}` is read-only", g.name),
            )
            .await;
        }
        let full = super::workspaces::beneath(&g.path, &rel);
        match full.to_str() {
            Some(p) => self.open(who, p, access).await,
            None => refuse(ErrorCode::BadRequest, "path is not UTF-8".into()).await,
        }
    }

    /// The `open` operation.
    pub async fn open(&self, who: &Identity, path: &str, access: Access) -> Response {
        let target = format!("{} ({})", shown(path), access.as_str());
        if let Err(why) = validate_open_path(path) {
            return self
                .refuse(
                    who,
                    Audited::of("open", target).deny("refused", format!("bad path: {why}")),
                    ErrorCode::BadRequest,
                    format!("open: bad path: {why}"),
                )
                .await;
        }
        let rules = match self.rules_for(who, "open", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let found = if access == Access::List {
            rules.list_allowed(Path::new(path))
        } else {
            rules.open_allowed(Path::new(path), policy_access(access))
        };
        let Some((rule, rest)) = found.map(|(r, rest)| (r.clone(), rest.to_path_buf())) else {
            return self
                .refuse(
                    who,
                    Audited::of("open", target.clone())
                        .deny("refused", "no open rule allows this path with this access"),
                    ErrorCode::Denied,
                    format!(
                        "open {target}: no rule of profile `{}` allows it",
                        who.profile
                    ),
                )
                .await;
        };
        let rref = rule_ref(rule.line, &rule.why);
        if rule.ask {
            let Some(approver) = self.approver.clone() else {
                return self
                    .refuse(
                        who,
                        Audited::of("open", target.clone())
                            .by(rref)
                            .deny("refused", "needs approval; no approvals service"),
                        ErrorCode::Denied,
                        format!(
                            "open {target}: needs an operator's approval and none can be asked"
                        ),
                    )
                    .await;
            };
            if let Err(resp) = self
                .allow(
                    who,
                    Audited::of("open", target.clone())
                        .by(rref.clone())
                        .ask("waiting for approval", String::new()),
                )
                .await
            {
                return resp;
            }
            let answer = approver
                .ask_action(super::ActionQuery {
                    who: who.clone(),
                    subject: PathBuf::from(path),
                    argv: vec!["open".into(), access.as_str().into(), path.to_string()],
                    why: rule.why.clone(),
                })
                .await;
            if let super::ApprovalAnswer::Deny(reason) = answer {
                return self
                    .refuse(
                        who,
                        Audited::of("open", target.clone())
                            .by(rref)
                            .deny("approval refused", reason.clone()),
                        ErrorCode::Denied,
                        format!("open {target}: not approved: {reason}"),
                    )
                    .await;
            }
        }
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("open", target.clone())
                    .by(rule_ref(rule.line, &rule.why))
                    .allow("opening", format!("beneath {}", rule.dir.display())),
            )
            .await
        {
            return resp;
        }
        let dir = match self.dir_fd(&rule.dir) {
            Ok(d) => d,
            Err(e) => {
                return Response::err(
                    ErrorCode::Unavailable,
                    format!("open {target}: the rule's directory cannot be opened: {e}"),
                )
            }
        };
        let res =
            tokio::task::spawn_blocking(move || open_beneath(dir.as_fd(), &rest, access)).await;
        match res {
            Ok(Ok(fd)) => Response::ok(OkReply::Open { access }).with_fds(vec![fd]),
            Ok(Err(OpenFailure::Openat2(e))) => {
                let code = match e.raw_os_error() {
                    Some(libc::ENOENT) => ErrorCode::NotFound,
                    // ELOOP: a symlink on the way; EXDEV: an escape from beneath the directory.
                    // ENOTDIR: a file listed as a directory, or a file on the way.
                    Some(
                        libc::ELOOP
                        | libc::EXDEV
                        | libc::EACCES
                        | libc::EPERM
                        | libc::EEXIST
                        | libc::ENOTDIR,
                    ) => ErrorCode::Denied,
                    _ => ErrorCode::Unavailable,
                };
                Response::err(code, format!("open {target}: {e}"))
            }
            Ok(Err(OpenFailure::NotRegular)) => Response::err(
                ErrorCode::Denied,
                format!("open {target}: not a regular file"),
            ),
            Ok(Err(OpenFailure::NotDirectory)) => {
                Response::err(ErrorCode::Denied, format!("open {target}: not a directory"))
            }
            Ok(Err(e)) => Response::err(ErrorCode::Unavailable, format!("open {target}: {e}")),
            Err(e) => Response::err(ErrorCode::Internal, format!("open {target}: {e}")),
        }
    }

    /// The `secret` operation. A secret this profile does not name and one that does not exist
    /// get the same refusal (a child cannot probe for names).
    pub async fn secret(&self, who: &Identity, name: &str) -> Response {
        let target = shown(name);
        let rules = match self.rules_for(who, "secret", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let Some(spec) = rules.secret(name).cloned() else {
            return self
                .refuse(
                    who,
                    Audited::of("secret", target.clone())
                        .deny("refused", "the profile does not name this secret"),
                    ErrorCode::Denied,
                    format!(
                        "secret {target}: not available to profile `{}`",
                        who.profile
                    ),
                )
                .await;
        };
        let rref = rule_ref(spec.line, &spec.why);
        let state = self.state();
        let value = match state.secrets.get(name) {
            Some(Ok(v)) => v.clone(),
            Some(Err(e)) => {
                return self
                    .refuse(
                        who,
                        Audited::of("secret", target.clone())
                            .by(rref)
                            .error("not loaded", e.clone()),
                        ErrorCode::Unavailable,
                        format!("secret {target}: the broker could not load it"),
                    )
                    .await
            }
            None => {
                return Response::err(ErrorCode::Internal, format!("secret {target}: not loaded"))
            }
        };
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("secret", target.clone()).by(rref).allow(
                    "handed over as a sealed memfd",
                    format!("{} bytes", value.len()),
                ),
            )
            .await
        {
            return resp;
        }
        match sealed_memfd(value.expose()) {
            Ok(fd) => Response::ok(OkReply::Secret {
                len: value.len() as u64,
            })
            .with_fds(vec![fd]),
            Err(e) => Response::err(
                ErrorCode::Unavailable,
                format!("secret {target}: memfd: {e}"),
            ),
        }
    }
}
