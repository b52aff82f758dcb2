//! The server: binding the socket safely, checking each peer, reading bounded request lines
//! and answering them through the [`ControlHandler`].

use super::*;

pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Removes the socket file when dropped, if the path still names the socket we bound.
#[derive(Debug)]
pub(crate) struct SocketFile {
    pub(crate) path: PathBuf,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "control socket: cannot remove: {e}");
                }
            }
        }
    }
}

/// Stops a served [`ControlServer`] (see [`ControlServer::shutdown_handle`]).
#[derive(Debug, Clone)]
pub struct ControlShutdown(Arc<tokio::sync::watch::Sender<bool>>);

impl ControlShutdown {
    /// Stop accepting, close every connection (followers included) and remove the socket; the
    /// task returned by [`ControlServer::serve`] then ends.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    file: SocketFile,
    group: Option<u32>,
    idle_timeout: Duration,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

pub(super) static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) enum Probe {
    /// A server is listening (it accepted, or its backlog is full).
    Live,
    /// Nobody listens: connect(2) was refused.
    Stale,
}

/// Connect to the socket at `path` without blocking: a server that is wedged (stopped, its
/// backlog full) still counts as live, and the probe never hangs.
pub(super) fn probe(path: &Path) -> io::Result<Probe> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use std::os::unix::ffi::OsStrExt;
    // The path and its terminating NUL must fit in sun_path.
    let sun_path = std::mem::size_of::<libc::sockaddr_un>()
        - std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= sun_path || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => Ok(Probe::Live),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS) => Ok(Probe::Live),
        Err(rustix::io::Errno::CONNREFUSED) => Ok(Probe::Stale),
        Err(e) => Err(e.into()),
    }
}

/// Check that `dir` is a real directory, not writable by others, owned by root or us.
pub(super) fn check_parent(dir: &Path, sock: &Path) -> Result<(), ControlError> {
    let m = fs::symlink_metadata(dir).map_err(io_err("lstat parent", sock))?;
    let unsafe_ = |reason: String| ControlError::Unsafe {
        path: sock.to_path_buf(),
        reason,
    };
    if m.file_type().is_symlink() {
        return Err(unsafe_(format!(
            "its directory {} is a symlink; refusing it",
            dir.display()
        )));
    }
    if !m.is_dir() {
        return Err(unsafe_(format!("{} is not a directory", dir.display())));
    }
    if m.mode() & 0o002 != 0 {
        return Err(unsafe_(format!(
            "its directory {} is writable by others (mode {:o}); use a private runtime directory",
            dir.display(),
            m.mode() & 0o7777
        )));
    }
    if m.uid() != 0 && m.uid() != euid() {
        return Err(unsafe_(format!(
            "its directory {} is owned by uid {}, not by root or us",
            dir.display(),
            m.uid()
        )));
    }
    Ok(())
}

impl ControlServer {
    /// Bind the control socket at `path` (see the module docs: parent checks, stale socket
    /// replaced, a live one not stolen, mode 0660 and `group` from the first moment). Needs no
    /// tokio runtime.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<ControlServer, ControlError> {
        let unsafe_ = |reason: &str| ControlError::Unsafe {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !path.is_absolute() {
            return Err(unsafe_("not an absolute path"));
        }
        let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
            return Err(unsafe_("no directory or file name"));
        };
        if !dir.exists() {
            let mode = if euid() == 0 { 0o755 } else { 0o700 };
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io_err("create directory", path))?;
        }
        check_parent(dir, path)?;

        // Something already there?
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match probe(path) {
                Ok(Probe::Live) => {
                    return Err(ControlError::InUse {
                        path: path.to_path_buf(),
                    })
                }
                Ok(Probe::Stale) => {
                    tracing::info!(path = %path.display(), "control socket: removing a stale socket");
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove stale socket", path)(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("probe existing socket", path)(e)),
            },
            Ok(_) => {
                return Err(unsafe_(
                    "exists and is not a socket; refusing to replace it",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lstat", path)(e)),
        }

        let (listener, dev, ino) = bind_into_place(path, 0o660, group, |p| UnixListener::bind(p))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("set non-blocking", path))?;
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(ControlServer {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                dev,
                ino,
            },
            group,
            idle_timeout: IDLE_TIMEOUT,
            stop: Arc::new(stop),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Close idle connections after `t` instead of [`IDLE_TIMEOUT`] (tests).
    pub fn with_idle_timeout(mut self, t: Duration) -> ControlServer {
        self.idle_timeout = t;
        self
    }

    /// A handle that stops the server once it serves.
    pub fn shutdown_handle(&self) -> ControlShutdown {
        ControlShutdown(self.stop.clone())
    }

    /// Serve connections on the current tokio runtime until [`ControlShutdown::shutdown`] or
    /// until the returned task is aborted; either way every connection is closed and the socket
    /// file removed. Must be called within a runtime.
    pub fn serve(self, handler: Arc<dyn ControlHandler>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(handler))
    }

    pub(super) async fn run(self, handler: Arc<dyn ControlHandler>) {
        let ControlServer {
            listener,
            file,
            group,
            idle_timeout,
            stop,
        } = self;
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %file.path.display(), "control socket: cannot serve: {e}");
                return;
            }
        };
        let ctx = Arc::new(ConnCtx {
            handler,
            group,
            euid: euid(),
            idle_timeout,
            stop: stop.subscribe(),
        });
        let mut stop_rx = stop.subscribe();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = stopped(&mut stop_rx) => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        conns.spawn(connection(stream, ctx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(path = %file.path.display(), "control socket: accept: {e}");
                        // EMFILE and friends: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
        drop(listener);
        drop(file);
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(super) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

pub(super) struct ConnCtx {
    pub(super) handler: Arc<dyn ControlHandler>,
    pub(super) group: Option<u32>,
    pub(super) euid: u32,
    pub(super) idle_timeout: Duration,
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
}

/// The peer's supplementary groups (`SO_PEERGROUPS`).
pub(super) fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let cap = groups.len() * std::mem::size_of::<libc::gid_t>();
        let mut len = cap as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `cap` bytes and `len` says so; the kernel writes at
        // most `len` bytes and updates `len`. `fd` is a valid socket for the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: the buffer is too small and `len` says how big it must be.
        if e.raw_os_error() == Some(libc::ERANGE) && (len as usize) > cap && groups.len() < 65_536 {
            groups.resize(
                (len as usize).div_ceil(std::mem::size_of::<libc::gid_t>()),
                0,
            );
            continue;
        }
        return Err(e);
    }
}

/// Whether a peer may use the socket; `groups` is asked for only when it matters.
pub(super) fn peer_allowed(
    uid: u32,
    gid: u32,
    our_euid: u32,
    group: Option<u32>,
    groups: impl FnOnce() -> io::Result<Vec<u32>>,
) -> bool {
    if uid == 0 || uid == our_euid {
        return true;
    }
    let Some(g) = group else {
        return false;
    };
    if gid == g {
        return true;
    }
    match groups() {
        Ok(gs) => gs.contains(&g),
        Err(e) => {
            tracing::warn!("control socket: SO_PEERGROUPS: {e}");
            false
        }
    }
}

pub(super) enum LineRead {
    Line(Vec<u8>),
    TooLong,
    Eof,
}

pub(super) async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<LineRead> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(LineRead::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Ok(LineRead::TooLong);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(LineRead::Line(buf))
}

pub(super) type Writer = tokio::net::unix::OwnedWriteHalf;

pub(super) async fn send(wr: &mut Writer, reply: &Reply, timeout: Duration) -> io::Result<()> {
    send_bytes(wr, &reply.to_line(), timeout).await
}

pub(super) async fn send_bytes(wr: &mut Writer, line: &[u8], timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, wr.write_all(line)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read",
        )),
    }
}

pub(super) async fn connection(stream: tokio::net::UnixStream, ctx: Arc<ConnCtx>) {
    let (uid, gid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.gid(), c.pid()),
        Err(e) => {
            tracing::warn!("control socket: SO_PEERCRED: {e}");
            return;
        }
    };
    let allowed = peer_allowed(uid, gid, ctx.euid, ctx.group, || {
        peer_groups(stream.as_fd())
    });
    let (rd, mut wr) = stream.into_split();
    if !allowed {
        tracing::warn!(
            uid,
            gid,
            pid = pid.unwrap_or(0),
            "control socket: refused a connection (not root, not us, not in the control group)"
        );
        let msg = format!(
            "permission denied: uid {uid} (gid {gid}) is not root and not in the control group"
        );
        let _ = send(&mut wr, &Reply::error(msg), ctx.idle_timeout).await;
        let _ = wr.shutdown().await;
        return;
    }
    let mut rd = tokio::io::BufReader::new(rd);
    loop {
        let read = tokio::time::timeout(
            ctx.idle_timeout,
            read_line_limited(&mut rd, MAX_REQUEST_LINE),
        )
        .await;
        let line = match read {
            Err(_) => {
                tracing::debug!(uid, "control socket: idle connection closed");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(uid, "control socket: read: {e}");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                let msg = format!(
                    "bad request: line longer than {MAX_REQUEST_LINE} bytes; closing the connection"
                );
                let _ = send(&mut wr, &Reply::error(msg), ctx.idle_timeout).await;
                let _ = wr.shutdown().await;
                return;
            }
            Ok(Ok(LineRead::Line(l))) => l,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req = match parse_request(&line) {
            Ok(r) => r,
            Err(msg) => {
                tracing::debug!(uid, "control socket: {msg}");
                if send(&mut wr, &Reply::error(msg), ctx.idle_timeout)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        tracing::debug!(uid, op = req.op(), "control request");
        if let Request::AuditTail { lines, follow } = req {
            let path = ctx.handler.audit_log();
            let r = audit_tail(&mut rd, &mut wr, &ctx, path, lines, follow).await;
            if follow || r.is_err() {
                return;
            }
            continue;
        }
        let h = ctx.handler.clone();
        let reply = match tokio::task::spawn_blocking(move || h.handle(req)).await {
            Ok(Ok(v)) => Reply::result(v),
            Ok(Err(msg)) => Reply::error(msg),
            Err(e) => {
                tracing::error!("control socket: the handler failed: {e}");
                Reply::error("internal error: the request handler failed")
            }
        };
        if send(&mut wr, &reply, ctx.idle_timeout).await.is_err() {
            return;
        }
    }
}

/// Bind a socket at `path` so that it is never reachable there with a wider `mode` or another
/// group: `bind` makes it inside a private (0700) temporary directory next to `path`, where it
/// gets its mode and `group`, and only then is it linked into place. `link(2)`, unlike
/// `rename(2)`, never replaces: a server that bound the path meanwhile keeps it
/// ([`ControlError::InUse`]). Returns the socket and the file's device and inode (for
/// [`SocketFile`]).
pub(crate) fn bind_into_place<L>(
    path: &Path,
    mode: u32,
    group: Option<u32>,
    bind: impl FnOnce(&Path) -> io::Result<L>,
) -> Result<(L, u64, u64), ControlError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ControlError::Unsafe {
            path: path.to_path_buf(),
            reason: "no directory or file name".to_string(),
        });
    };
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_dir = dir.join(format!(".ctl{}-{n}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(io_err("create temporary directory", &tmp_dir))?;
    let tmp_sock = tmp_dir.join(name);
    let bound = (|| {
        let listener = bind(&tmp_sock).map_err(io_err("bind", &tmp_sock))?;
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp_sock))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp_sock, None, Some(gid))
                .map_err(io_err("chown to the control group", &tmp_sock))?;
        }
        let m = fs::symlink_metadata(&tmp_sock).map_err(io_err("lstat", &tmp_sock))?;
        fs::hard_link(&tmp_sock, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ControlError::InUse {
                    path: path.to_path_buf(),
                }
            } else {
                io_err("link into place", path)(e)
            }
        })?;
        Ok::<_, ControlError>((listener, m.dev(), m.ino()))
    })();
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    bound
}
