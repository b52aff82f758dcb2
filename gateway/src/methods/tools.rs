//! `tools.exec`: a tool run through the broker — the policy's `[[exec]]` rules decide (allow /
//! ask / deny) and the tool runs in a sandbox of its own; its output streams back as
//! `tools.output` events (WebSocket) or is collected into the result (HTTP).

use std::os::fd::OwnedFd;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;

use crate::app::{App, Emitter};
use crate::rpc::{params, RpcError};

/// Bytes of each stream forwarded (or collected) per call; the rest is read and dropped, so
/// the tool never blocks on a full pipe.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Largest `tools.output` event payload.
const CHUNK: usize = 16 * 1024;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    pub argv: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A workspace the operator granted (`[workspaces.NAME]`); without it the tool runs in
    /// its owner's own workspace.
    #[serde(default)]
    pub workspace: Option<String>,
}

/// How a tool run ended, with what it printed (when collected).
#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    pub result: Value,
    pub stdout: String,
    pub stderr: String,
}

pub async fn call(app: &App, p: Value, out: &Emitter) -> Result<Value, RpcError> {
    let p: ExecParams = params(p)?;
    let collect = !out.streams();
    let o = exec(app, p, out, collect).await?;
    let mut r = o.result;
    if collect {
        if let Some(m) = r.as_object_mut() {
            m.insert("stdout".into(), o.stdout.into());
            m.insert("stderr".into(), o.stderr.into());
        }
    }
    Ok(r)
}

/// Run a tool; stream its output to `out`, and collect it when `collect`.
pub async fn exec(
    app: &App,
    p: ExecParams,
    out: &Emitter,
    collect: bool,
) -> Result<ExecOutcome, RpcError> {
    if p.argv.is_empty() || p.argv[0].is_empty() {
        return Err(RpcError::invalid_params(
            "`argv` needs at least the program (argv[0])",
        ));
    }
    let started = app
        .broker
        .exec_with(carapace_broker::client::ExecOptions {
            argv: p.argv,
            cwd: p.cwd,
            owner: crate::owner::current().map(|o| o.key()),
            workspace: p.workspace,
        })
        .await?;
    let (stdout, stderr, waiter) = started.split();
    let (o, e) = tokio::join!(
        pump(stdout, "stdout", out, collect),
        pump(stderr, "stderr", out, collect)
    );
    let summary = waiter.wait(&app.broker).await?;
    let mut result = serde_json::to_value(&summary)
        .map_err(|e| RpcError::internal(format!("exit summary: {e}")))?;
    if let Some(m) = result.as_object_mut() {
        m.insert("stdout_bytes".into(), o.total.into());
        m.insert("stderr_bytes".into(), e.total.into());
        m.insert("truncated".into(), (o.truncated || e.truncated).into());
    }
    Ok(ExecOutcome {
        result,
        stdout: String::from_utf8_lossy(&o.kept).into_owned(),
        stderr: String::from_utf8_lossy(&e.kept).into_owned(),
    })
}

#[derive(Debug, Default)]
struct Pumped {
    kept: Vec<u8>,
    total: u64,
    truncated: bool,
}

/// Read a pipe to its end: forward chunks as events (up to [`MAX_OUTPUT`]), keep them when
/// collecting, count everything.
async fn pump(fd: OwnedFd, stream: &'static str, out: &Emitter, collect: bool) -> Pumped {
    let mut p = Pumped::default();
    let mut rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(error = %e, stream, "a tool's output pipe cannot be read");
            return p;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    // Bytes of an incomplete UTF-8 sequence at the end of the last chunk.
    let mut carry: Vec<u8> = Vec::new();
    let mut forwarded = 0usize;
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, stream, "reading a tool's output");
                break;
            }
        };
        p.total += n as u64;
        let room = MAX_OUTPUT.saturating_sub(forwarded);
        let take = n.min(room);
        if take < n {
            p.truncated = true;
        }
        if take == 0 {
            continue;
        }
        forwarded += take;
        let chunk = &buf[..take];
        if collect {
            p.kept.extend_from_slice(chunk);
        }
        if out.streams() {
            carry.extend_from_slice(chunk);
            let text = take_utf8(&mut carry, take < n || forwarded >= MAX_OUTPUT);
            if !text.is_empty() {
                out.emit("tools.output", json!({"stream": stream, "data": text}))
                    .await;
            }
        }
    }
    if out.streams() && !carry.is_empty() {
        let text = String::from_utf8_lossy(&carry).into_owned();
        out.emit("tools.output", json!({"stream": stream, "data": text}))
            .await;
    }
    p
}

/// The text of `buf` up to the last complete UTF-8 sequence (invalid bytes replaced); an
/// incomplete sequence at the end stays in `buf` for the next chunk unless `flush`.
fn take_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let keep_from = if flush {
        buf.len()
    } else {
        match std::str::from_utf8(buf) {
            Ok(_) => buf.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                // An invalid byte somewhere: find an incomplete tail only in the last 3 bytes.
                let tail = buf.len().saturating_sub(3);
                (tail..buf.len())
                    .find(|&i| {
                        let s = &buf[i..];
                        std::str::from_utf8(s).is_err_and(|e| e.error_len().is_none())
                            && (buf[i] & 0xC0) == 0xC0
                    })
                    .unwrap_or(buf.len())
            }
        }
    };
    let rest = buf.split_off(keep_from);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks() {
        let mut b = "aé".as_bytes()[..2].to_vec(); // "a" + first byte of é
        assert_eq!(take_utf8(&mut b, false), "a");
        assert_eq!(b, vec![0xC3]);
        b.push(0xA9);
        assert_eq!(take_utf8(&mut b, false), "é");
        assert!(b.is_empty());
        let mut b = vec![b'x', 0xFF, b'y', 0xE2, 0x82];
        assert_eq!(take_utf8(&mut b, false), "x\u{FFFD}y");
        assert_eq!(b, vec![0xE2, 0x82]);
        assert_eq!(take_utf8(&mut b, true), "\u{FFFD}");
        assert!(b.is_empty());
    }
}
