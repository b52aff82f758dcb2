//! Blocking client of the broker (std + libc only, no async runtime): what a confined child
//! (gateway, channel adapter, tool, `carapace-client`) uses to talk to its broker.
//!
//! ```no_run
//! use carapace_broker::client::Client;
//! let mut broker = Client::from_env()?;           // fd named by CARAPACE_BROKER_FD (default 3)
//! let (sock, peer) = broker.connect("api.example.com", 443)?;
//! # Ok::<(), carapace_broker::client::ClientError>(())
//! ```
//!
//! One request at a time: each call sends a frame and blocks until its reply. Events (the `exit`
//! of an exec'd tool) that arrive meanwhile are kept until [`Client::wait_exit`] asks for them.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::protocol::{
    decode_server_frame, encode_request, recv_frame, send_frame, Access, DecodeError, EncodeError,
    ErrorBody, ErrorCode, Event, ExitSummary, OkReply, Reply, Request, SendStatus, ServerFrame,
    SocketError, BROKER_FD_ENV, DEFAULT_BROKER_FD, MAX_FRAME,
};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{BROKER_FD_ENV}={value:?} is not a file descriptor number")]
    BadEnv { value: String },
    #[error("fd {fd} is not a broker socket (SOCK_SEQPACKET): {reason}")]
    NotABrokerSocket { fd: RawFd, reason: String },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot encode the request: {0}")]
    Encode(#[from] EncodeError),
    #[error("the broker sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker sent a frame over the size cap")]
    Truncated,
    #[error("{}: {}", .0.code, .0.message)]
    Refused(ErrorBody),
    #[error("the broker's {op} reply carries {got} fds, expected {expected}")]
    FdCount {
        op: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("the broker answered {op} with a {got} reply")]
    WrongReply { op: &'static str, got: &'static str },
    #[error("no exec with request id {0} is awaiting its exit")]
    NoSuchExec(u64),
}

impl ClientError {
    /// The broker's error code when the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(body) => Some(body.code),
            _ => None,
        }
    }
}

/// A started `exec`: the read ends of the tool's stdout and stderr; pass `id` to
/// [`Client::wait_exit`] for its exit summary.
#[derive(Debug)]
pub struct ExecStarted {
    pub id: u64,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A connection to the broker.
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    next_id: u64,
    buf: Vec<u8>,
    /// Events received while waiting for a reply.
    events: VecDeque<(u64, Event)>,
    /// Exec request ids whose exit event has not been taken yet.
    execs: Vec<u64>,
}

/// The fd number named by `CARAPACE_BROKER_FD` (default 3).
pub fn broker_fd_from_env() -> Result<RawFd, ClientError> {
    match std::env::var_os(BROKER_FD_ENV) {
        None => Ok(DEFAULT_BROKER_FD),
        Some(v) => {
            let s = v.to_string_lossy();
            s.trim()
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or(ClientError::BadEnv {
                    value: s.into_owned(),
                })
        }
    }
}

fn check_seqpacket(fd: RawFd) -> Result<(), ClientError> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a live c_int; a bad fd only
    // makes it fail with EBADF/ENOTSOCK.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(ClientError::NotABrokerSocket {
            fd,
            reason: io::Error::last_os_error().to_string(),
        });
    }
    if ty != libc::SOCK_SEQPACKET {
        return Err(ClientError::NotABrokerSocket {
            fd,
            reason: format!("socket type {ty}"),
        });
    }
    Ok(())
}

impl Client {
    /// Take the broker socket named by `CARAPACE_BROKER_FD` (default 3). Call it once per
    /// process: the returned client owns (and closes) that fd.
    pub fn from_env() -> Result<Client, ClientError> {
        let fd = broker_fd_from_env()?;
        check_seqpacket(fd)?;
        // SAFETY: the fd is open (getsockopt succeeded) and is a SEQPACKET socket; the
        // environment variable hands it to this process's broker client, which is its only owner
        // by the documented contract (from_env is called once).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Client::new(fd))
    }

    /// A client over an already connected `SOCK_SEQPACKET` socket (must be blocking).
    pub fn new(fd: OwnedFd) -> Client {
        Client {
            fd,
            next_id: 1,
            buf: vec![0; MAX_FRAME],
            events: VecDeque::new(),
            execs: Vec::new(),
        }
    }

    /// The socket.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    fn recv(&mut self) -> Result<(ServerFrame, Vec<OwnedFd>), ClientError> {
        let r = recv_frame(self.fd.as_fd(), &mut self.buf, 0)?;
        if r.eof {
            return Err(ClientError::Closed);
        }
        if r.truncated {
            return Err(ClientError::Truncated);
        }
        let frame = decode_server_frame(&self.buf[..r.len])?;
        Ok((frame, r.fds))
    }

    /// Send a request and wait for its reply. Returns the reply and the fds attached to it
    /// (checked against [`OkReply::fd_count`]). Error replies are returned as `Ok(Reply::Err)`.
    pub fn request(&mut self, req: &Request) -> Result<(u64, Reply, Vec<OwnedFd>), ClientError> {
        let id = self.alloc_id();
        let bytes = encode_request(id, req)?;
        send_frame(self.fd.as_fd(), &bytes, &[])?;
        loop {
            let (frame, fds) = self.recv()?;
            match frame {
                ServerFrame::Event { id: eid, event } => {
                    // Events carry no fds; any attached are closed here.
                    drop(fds);
                    self.events.push_back((eid, event));
                }
                // id 0: the broker could not read our frame's id; we have one request out.
                ServerFrame::Reply { id: rid, reply } if rid == id || rid == 0 => {
                    if fds.len() != reply.fd_count() {
                        return Err(ClientError::FdCount {
                            op: req.op(),
                            got: fds.len(),
                            expected: reply.fd_count(),
                        });
                    }
                    return Ok((id, reply, fds));
                }
                // A stale reply (to nothing we wait for): ignore, closing its fds.
                ServerFrame::Reply { .. } => drop(fds),
            }
        }
    }

    /// Like [`Client::request`], but a refusal is an error and the reply must answer `req`'s op.
    fn call(&mut self, req: &Request) -> Result<(u64, OkReply, Vec<OwnedFd>), ClientError> {
        let (id, reply, fds) = self.request(req)?;
        match reply {
            Reply::Err(body) => Err(ClientError::Refused(body)),
            Reply::Ok(ok) if ok.op() != req.op() => Err(ClientError::WrongReply {
                op: req.op(),
                got: ok.op(),
            }),
            Reply::Ok(ok) => Ok((id, ok, fds)),
        }
    }

    /// `ping`: a no-op round trip.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Ping {}).map(|_| ())
    }

    /// `connect`: a connected TCP socket to `host:port` and the address actually connected.
    pub fn connect(&mut self, host: &str, port: u16) -> Result<(OwnedFd, String), ClientError> {
        let (_, ok, fds) = self.call(&Request::Connect {
            host: host.to_owned(),
            port,
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Connect { peer }, Some(fd)) => Ok((fd, peer)),
            (ok, _) => Err(wrong("connect", &ok)),
        }
    }

    /// `open`: a file by absolute path.
    pub fn open(&mut self, path: &str, access: Access) -> Result<File, ClientError> {
        let (_, ok, fds) = self.call(&Request::Open {
            path: path.to_owned(),
            access,
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Open { .. }, Some(fd)) => Ok(File::from(fd)),
            (ok, _) => Err(wrong("open", &ok)),
        }
    }

    /// `secret`: a sealed memfd holding the credential, and its length.
    pub fn secret(&mut self, name: &str) -> Result<(OwnedFd, u64), ClientError> {
        let (_, ok, fds) = self.call(&Request::Secret {
            name: name.to_owned(),
        })?;
        match (ok, one_fd(fds)) {
            (OkReply::Secret { len }, Some(fd)) => Ok((fd, len)),
            (ok, _) => Err(wrong("secret", &ok)),
        }
    }

    /// `send`: an outbound message; returns what became of it (and the dead-letter id).
    pub fn send(
        &mut self,
        channel: &str,
        recipient: &str,
        body: &str,
    ) -> Result<(SendStatus, Option<String>), ClientError> {
        let (_, ok, _) = self.call(&Request::Send {
            channel: channel.to_owned(),
            recipient: recipient.to_owned(),
            body: body.to_owned(),
        })?;
        match ok {
            OkReply::Send { status, dlq_id } => Ok((status, dlq_id)),
            ok => Err(wrong("send", &ok)),
        }
    }

    /// `exec`: start a tool; read its output from the returned pipes, then [`Client::wait_exit`].
    pub fn exec(
        &mut self,
        argv: Vec<String>,
        cwd: Option<String>,
    ) -> Result<ExecStarted, ClientError> {
        let (id, ok, fds) = self.call(&Request::Exec { argv, cwd })?;
        let mut fds = fds.into_iter();
        match (ok, fds.next(), fds.next()) {
            (OkReply::Exec {}, Some(stdout), Some(stderr)) => {
                self.execs.push(id);
                Ok(ExecStarted { id, stdout, stderr })
            }
            (ok, _, _) => Err(wrong("exec", &ok)),
        }
    }

    /// Block until the `exit` event of the exec started with request `id`.
    pub fn wait_exit(&mut self, id: u64) -> Result<ExitSummary, ClientError> {
        let Some(pos) = self.execs.iter().position(|x| *x == id) else {
            return Err(ClientError::NoSuchExec(id));
        };
        loop {
            if let Some(i) = self.events.iter().position(|(eid, _)| *eid == id) {
                self.execs.swap_remove(pos);
                let Some((_, Event::Exit(summary))) = self.events.remove(i) else {
                    continue;
                };
                return Ok(summary);
            }
            let (frame, fds) = self.recv()?;
            drop(fds);
            match frame {
                ServerFrame::Event { id: eid, event } => self.events.push_back((eid, event)),
                ServerFrame::Reply { .. } => {} // stale; nothing waits for it
            }
        }
    }
}

fn one_fd(fds: Vec<OwnedFd>) -> Option<OwnedFd> {
    let mut it = fds.into_iter();
    match (it.next(), it.next()) {
        (Some(fd), None) => Some(fd),
        _ => None,
    }
}

fn wrong(op: &'static str, ok: &OkReply) -> ClientError {
    ClientError::WrongReply { op, got: ok.op() }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_request, encode_event, encode_reply, seqpacket_pair};
    use std::io::Read;

    /// A scripted broker on a thread: answers each request with `answer`.
    fn fake_broker(
        fd: OwnedFd,
        answer: impl Fn(u64, Request) -> Vec<(Vec<u8>, Vec<OwnedFd>)> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = vec![0; MAX_FRAME];
            loop {
                let r = recv_frame(fd.as_fd(), &mut buf, 0).unwrap();
                if r.eof {
                    return;
                }
                let f = decode_request(&buf[..r.len]).unwrap();
                for (bytes, fds) in answer(f.id, f.request) {
                    let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    send_frame(fd.as_fd(), &bytes, &b).unwrap();
                }
            }
        })
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    #[test]
    fn typed_calls_and_refusals() {
        let (a, b) = seqpacket_pair().unwrap();
        let t = fake_broker(b, |id, req| match req {
            Request::Ping {} => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
            Request::Secret { name } if name == "k" => {
                let (r, w) = pipe();
                std::io::Write::write_all(&mut File::from(w), b"s3cret").unwrap();
                vec![(
                    encode_reply(id, &Reply::Ok(OkReply::Secret { len: 6 })).unwrap(),
                    vec![r],
                )]
            }
            // wrong fd count
            Request::Secret { .. } => {
                vec![(
                    encode_reply(id, &Reply::Ok(OkReply::Secret { len: 6 })).unwrap(),
                    vec![],
                )]
            }
            Request::Connect { .. } => vec![(
                encode_reply(id, &Reply::err(ErrorCode::Denied, "not in allowlist")).unwrap(),
                vec![],
            )],
            // wrong op in reply
            _ => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
        });
        let mut c = Client::new(a);
        c.ping().unwrap();
        let (fd, len) = c.secret("k").unwrap();
        assert_eq!(len, 6);
        let mut s = String::new();
        File::from(fd).read_to_string(&mut s).unwrap();
        assert_eq!(s, "s3cret");
        assert!(matches!(
            c.secret("other"),
            Err(ClientError::FdCount {
                got: 0,
                expected: 1,
                ..
            })
        ));
        let e = c.connect("x", 1).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Denied));
        assert!(e.to_string().contains("not in allowlist"));
        assert!(matches!(
            c.open("/x", Access::Read),
            Err(ClientError::WrongReply {
                op: "open",
                got: "ping"
            })
        ));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn exec_events_are_kept_until_asked() {
        let (a, b) = seqpacket_pair().unwrap();
        let summary = ExitSummary {
            exit: 3,
            code: Some(3),
            signal: None,
            wall_ms: 1,
            cpu_ms: 0,
            peak_mem: 0,
            oom: false,
            timeout: false,
        };
        let s2 = summary.clone();
        let t = fake_broker(b, move |id, req| match req {
            Request::Exec { .. } => {
                let (r1, _w1) = pipe();
                let (r2, _w2) = pipe();
                vec![
                    (
                        encode_reply(id, &Reply::Ok(OkReply::Exec {})).unwrap(),
                        vec![r1, r2],
                    ),
                    (encode_event(id, &Event::Exit(s2.clone())).unwrap(), vec![]),
                ]
            }
            _ => vec![(
                encode_reply(id, &Reply::Ok(OkReply::Ping {})).unwrap(),
                vec![],
            )],
        });
        let mut c = Client::new(a);
        let started = c.exec(vec!["true".into()], None).unwrap();
        // The exit event arrives before the ping reply; ping must not lose it.
        c.ping().unwrap();
        assert_eq!(c.wait_exit(started.id).unwrap(), summary);
        assert!(matches!(
            c.wait_exit(started.id),
            Err(ClientError::NoSuchExec(_))
        ));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn closed_broker_is_an_error() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(b);
        let mut c = Client::new(a);
        assert!(matches!(
            c.ping(),
            Err(ClientError::Closed) | Err(ClientError::Socket(_))
        ));
    }

    #[test]
    fn env_fd_parsing() {
        // Only the parsing (no env mutation in a multi-threaded test run): check_seqpacket.
        let (a, _b) = seqpacket_pair().unwrap();
        assert!(check_seqpacket(a.as_raw_fd()).is_ok());
        let (r, _w) = pipe();
        assert!(matches!(
            check_seqpacket(r.as_raw_fd()),
            Err(ClientError::NotABrokerSocket { .. })
        ));
        assert!(check_seqpacket(-1).is_err());
    }
}
