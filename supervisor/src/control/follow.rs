//! `audit_tail`, served by the server itself: the last records of the audit log, byte for
//! byte, and following it across rotation and truncation.

use super::*;

/// The reply line for one audit record: `{"ok":true,"line":<the record's bytes as stored>}` when
/// they are a JSON object (so the record arrives byte for byte, field order included, and can be
/// hashed against the chain); otherwise the text as a JSON string.
pub(super) fn audit_reply(raw: &[u8]) -> Vec<u8> {
    let is_object = raw.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_ok();
    if is_object {
        let mut line = Vec::with_capacity(raw.len() + 24);
        line.extend_from_slice(AUDIT_LINE_PREFIX.as_bytes());
        line.extend_from_slice(raw);
        line.extend_from_slice(b"}\n");
        return line;
    }
    Reply::line(Value::String(String::from_utf8_lossy(raw).into_owned())).to_line()
}

/// How a reply carrying an audit record begins.
pub(super) const AUDIT_LINE_PREFIX: &str = r#"{"ok":true,"line":"#;

pub(super) async fn audit_tail(
    rd: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: &mut Writer,
    ctx: &ConnCtx,
    path: PathBuf,
    lines: usize,
    follow: bool,
) -> io::Result<()> {
    let n = lines.min(MAX_TAIL_LINES);
    let opened = tokio::task::spawn_blocking(move || Follower::open(path, n))
        .await
        .map_err(io::Error::other)?;
    let (first, mut follower) = match opened {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("audit log: {e}");
            send(wr, &Reply::error(msg), ctx.idle_timeout).await?;
            return Ok(());
        }
    };
    for raw in &first {
        send_bytes(wr, &audit_reply(raw), ctx.idle_timeout).await?;
    }
    if !follow {
        return send(wr, &Reply::end(), ctx.idle_timeout).await;
    }
    let mut stop = ctx.stop.clone();
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            r = rd.read(&mut scratch) => match r {
                // The client went away (or sent something: ignored).
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(FOLLOW_POLL) => {
                let (f, new) = tokio::task::spawn_blocking(move || {
                    let new = follower.poll();
                    (follower, new)
                })
                .await
                .map_err(io::Error::other)?;
                follower = f;
                match new {
                    Ok(new) => {
                        for raw in &new {
                            send_bytes(wr, &audit_reply(raw), ctx.idle_timeout).await?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("control socket: following the audit log: {e}");
                    }
                }
            }
        }
    }
}

/// Reads the audit log's last records, then what is appended (see the module docs).
#[derive(Debug)]
pub(super) struct Follower {
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// Bytes of `file` consumed (complete lines and `partial`).
    pub(super) pos: u64,
    /// An incomplete last line seen so far.
    pub(super) partial: Vec<u8>,
}

impl Follower {
    /// The last `n` complete lines of `path` (none if it does not exist), and a follower
    /// positioned after them.
    pub(super) fn open(path: PathBuf, n: usize) -> io::Result<(Vec<Vec<u8>>, Follower)> {
        let mut f = Follower {
            path,
            file: None,
            dev: 0,
            ino: 0,
            pos: 0,
            partial: Vec::new(),
        };
        let mut file = match File::open(&f.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), f)),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        let (lines, complete_end) = last_lines(&mut file, m.len(), n)?;
        f.dev = m.dev();
        f.ino = m.ino();
        f.pos = complete_end;
        f.file = Some(file);
        Ok((lines, f))
    }

    /// Complete lines appended since the last call.
    pub(super) fn poll(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let on_disk = match fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let replaced = match (&self.file, &on_disk) {
            (None, Some(_)) => true,
            (Some(_), Some(m)) => m.dev() != self.dev || m.ino() != self.ino,
            _ => false,
        };
        if replaced {
            // Finish the old file, then start the new one from its beginning.
            if self.file.is_some() {
                self.read_new(&mut out)?;
            }
            match File::open(&self.path) {
                Ok(file) => {
                    let m = file.metadata()?;
                    self.dev = m.dev();
                    self.ino = m.ino();
                    self.file = Some(file);
                    self.pos = 0;
                    self.partial.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            }
        }
        if let Some(file) = &self.file {
            if file.metadata()?.len() < self.pos {
                // Truncated: start again from the beginning.
                self.pos = 0;
                self.partial.clear();
            }
            self.read_new(&mut out)?;
        }
        Ok(out)
    }

    pub(super) fn read_new(&mut self, out: &mut Vec<Vec<u8>>) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        let got = file.take(MAX_POLL_BYTES as u64).read_to_end(&mut buf)?;
        self.pos += got as u64;
        let mut rest: &[u8] = &buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..i]);
            line.truncate(MAX_AUDIT_LINE);
            out.push(line);
            rest = &rest[i + 1..];
        }
        if self.partial.len() < MAX_AUDIT_LINE {
            let room = MAX_AUDIT_LINE - self.partial.len();
            self.partial
                .extend_from_slice(&rest[..rest.len().min(room)]);
        }
        Ok(())
    }
}

/// The last `n` complete lines of `file` (of length `len`), without their `\n`, and the offset
/// just after the last complete line.
pub(super) fn last_lines(file: &mut File, len: u64, n: usize) -> io::Result<(Vec<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut start = len;
    // Newlines needed: one ending each of the n lines, plus the one before the first of them.
    let want = n + 1;
    while start > 0 && len - start < MAX_TAIL_BYTES {
        let take = CHUNK.min(start);
        start -= take;
        let mut chunk = vec![0u8; take as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if tail.iter().filter(|&&b| b == b'\n').count() >= want {
            break;
        }
    }
    let Some(last_nl) = tail.iter().rposition(|&b| b == b'\n') else {
        // No complete line in what was read.
        return Ok((Vec::new(), start));
    };
    let complete_end = start + last_nl as u64 + 1;
    let body = &tail[..last_nl];
    let mut lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    // The first piece is a whole line only when we read from the start of the file.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    let out = lines[skip..]
        .iter()
        .map(|l| l[..l.len().min(MAX_AUDIT_LINE)].to_vec())
        .collect();
    Ok((out, complete_end))
}
