//! The blocking client: one request and its reply ([`call`]), or a stream of replies
//! ([`stream`], [`stream_raw`]) for `audit_tail`.

use super::*;

pub(super) struct ClientConn {
    pub(super) path: PathBuf,
    pub(super) reader: BufReader<UnixStream>,
    pub(super) timeout: Option<Duration>,
}

impl ClientConn {
    pub(super) fn connect(socket: &Path) -> Result<ClientConn, ControlError> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    path: socket.to_path_buf(),
                    source: e,
                }
            }
            _ => io_err("connect", socket)(e),
        })?;
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .map_err(io_err("set timeout", socket))?;
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .map_err(io_err("set timeout", socket))?;
        Ok(ClientConn {
            path: socket.to_path_buf(),
            reader: BufReader::new(stream),
            timeout: Some(CLIENT_TIMEOUT),
        })
    }

    pub(super) fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<(), ControlError> {
        self.timeout = t;
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(io_err("set timeout", &self.path))
    }

    pub(super) fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        match self.reader.get_mut().write_all(&line) {
            Ok(()) => Ok(()),
            // The server may have refused us and closed before reading: its reply is still
            // there to read.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) if is_timeout(&e) => Err(ControlError::Timeout {
                path: self.path.clone(),
                secs: CLIENT_TIMEOUT.as_secs(),
            }),
            Err(e) => Err(io_err("write", &self.path)(e)),
        }
    }

    /// The next reply, or `None` at end of file.
    pub(super) fn read_reply(&mut self) -> Result<Option<Reply>, ControlError> {
        Ok(self.read_reply_raw()?.map(|(r, _)| r))
    }

    /// The next reply and its line (without `\n`), or `None` at end of file.
    pub(super) fn read_reply_raw(&mut self) -> Result<Option<(Reply, Vec<u8>)>, ControlError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| {
                if is_timeout(&e) {
                    ControlError::Timeout {
                        path: self.path.clone(),
                        secs: self.timeout.unwrap_or_default().as_secs(),
                    }
                } else {
                    io_err("read", &self.path)(e)
                }
            })?;
        if n == 0 {
            return Ok(None);
        }
        if buf.pop() != Some(b'\n') {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                reason: if buf.len() >= MAX_REPLY_LINE {
                    format!("a reply line is longer than {MAX_REPLY_LINE} bytes")
                } else {
                    "the connection ended in the middle of a reply".to_string()
                },
            });
        }
        serde_json::from_slice(&buf)
            .map(|r| Some((r, buf)))
            .map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                reason: format!("not a reply: {e}"),
            })
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Send `req` to the supervisor at `socket` and return its result (blocking, 10 s timeouts).
/// Not for [`Request::AuditTail`] (use [`stream`]).
pub fn call(socket: &Path, req: &Request) -> Result<Value, ControlError> {
    let mut c = ClientConn::connect(socket)?;
    c.send(req)?;
    let reply = c.read_reply()?.ok_or_else(|| ControlError::Protocol {
        path: socket.to_path_buf(),
        reason: "the supervisor closed the connection without answering".to_string(),
    })?;
    reply_result(socket, reply)
}

pub(super) fn reply_result(socket: &Path, reply: Reply) -> Result<Value, ControlError> {
    if !reply.ok {
        return Err(ControlError::Daemon {
            message: reply
                .error
                .unwrap_or_else(|| "the supervisor failed (no message)".to_string()),
        });
    }
    if reply.line.is_some() || reply.end.is_some() {
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            reason: "a stream reply to a single request".to_string(),
        });
    }
    Ok(reply.result.unwrap_or(Value::Null))
}

/// Send `req` and pass every streamed value (`line`, or a single `result`) to `on` until the
/// stream ends (`end`), `on` returns `false`, or — when following — the connection closes
/// (an error: the supervisor went away). With `follow`, replies may take any time; otherwise
/// each must come within 10 s.
pub fn stream(
    socket: &Path,
    req: &Request,
    mut on: impl FnMut(Value) -> bool,
) -> Result<(), ControlError> {
    stream_raw(socket, req, |v, _| on(v))
}

/// The record's text exactly as stored, from a `line` reply carrying it byte for byte.
pub(super) fn raw_record(line: &[u8]) -> Option<&str> {
    let inner = line
        .strip_prefix(AUDIT_LINE_PREFIX.as_bytes())?
        .strip_suffix(b"}")?;
    let text = std::str::from_utf8(inner).ok()?;
    text.trim_start().starts_with('{').then_some(text)
}

/// [`stream`], also passing each record's text exactly as the audit log holds it (field order
/// and all) when the server sent it so; `carapace audit tail --json` prints that.
pub fn stream_raw(
    socket: &Path,
    req: &Request,
    mut on: impl FnMut(Value, Option<&str>) -> bool,
) -> Result<(), ControlError> {
    let follow = matches!(req, Request::AuditTail { follow: true, .. });
    let mut c = ClientConn::connect(socket)?;
    c.send(req)?;
    if follow {
        c.set_read_timeout(None)?;
    }
    loop {
        let Some((reply, line)) = c.read_reply_raw()? else {
            return Err(ControlError::Protocol {
                path: socket.to_path_buf(),
                reason: "the supervisor closed the connection".to_string(),
            });
        };
        if !reply.ok {
            return Err(ControlError::Daemon {
                message: reply
                    .error
                    .unwrap_or_else(|| "the supervisor failed (no message)".to_string()),
            });
        }
        if reply.end == Some(true) {
            return Ok(());
        }
        if let Some(v) = reply.line {
            if !on(v, raw_record(&line)) {
                return Ok(());
            }
            continue;
        }
        if let Some(v) = reply.result {
            on(v, None);
            return Ok(());
        }
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            reason: "a reply with neither result, line nor end".to_string(),
        });
    }
}
