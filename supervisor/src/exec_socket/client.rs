//! The caller's side: connect, send the run with the caller's stdio, read what comes back. The
//! conversation itself (printing, asking on the terminal, the report file) is `carapace exec`'s.

use std::ffi::OsString;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;

use carapace_sandbox::fds::passing::{self, Received};
use carapace_sandbox::namespaces::RunAs;
use nix::sys::socket;

use super::*;

/// A connection to a supervisor's exec socket.
#[derive(Debug)]
pub struct ExecClient {
    conn: OwnedFd,
    path: PathBuf,
}

/// Why the client did not connect: `NotRunning` is the usual case of no supervisor (no socket,
/// or nobody listening on it), the rest are worth saying.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no supervisor is running (no exec socket at {})", path.display())]
    NotRunning { path: PathBuf },
    #[error(transparent)]
    Socket(#[from] ExecSocketError),
}

impl ExecClient {
    /// Connect to the exec socket at `path`.
    pub fn connect(path: &Path) -> Result<ExecClient, ConnectError> {
        let sys = |syscall: &'static str| {
            move |e: nix::errno::Errno| ExecSocketError::Sys {
                syscall,
                path: path.to_path_buf(),
                source: io::Error::from(e),
            }
        };
        let conn = socket::socket(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(sys("socket"))?;
        let addr = socket::UnixAddr::new(path).map_err(sys("socket address"))?;
        match socket::connect(conn.as_raw_fd(), &addr) {
            Ok(()) => Ok(ExecClient {
                conn,
                path: path.to_path_buf(),
            }),
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => {
                Err(ConnectError::NotRunning {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => Err(sys("connect")(e).into()),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send the run with the caller's stdin, stdout and stderr.
    pub fn send_run(
        &self,
        req: RunRequest,
        stdio: [BorrowedFd<'_>; 3],
    ) -> Result<(), ExecSocketError> {
        let fds = stdio.map(|fd| fd.as_raw_fd());
        self.send(&ToSupervisor::Run(req), &fds)
    }

    /// Answer an ask.
    pub fn answer(&self, allow: bool) -> Result<(), ExecSocketError> {
        self.send(&ToSupervisor::Answer { allow }, &[])
    }

    fn send(&self, msg: &ToSupervisor, fds: &[std::os::fd::RawFd]) -> Result<(), ExecSocketError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| ExecSocketError::Protocol {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ExecSocketError::Protocol {
                path: self.path.clone(),
                why: format!(
                    "the request is {} bytes, more than the {MAX_MESSAGE} the supervisor takes \
                     (a very large environment?)",
                    bytes.len()
                ),
            });
        }
        passing::send(self.conn.as_fd(), &bytes, fds).map_err(|source| ExecSocketError::Sys {
            syscall: "sendmsg",
            path: self.path.clone(),
            source,
        })
    }

    /// The supervisor's next message (blocks until it comes).
    pub fn next(&self) -> Result<ToClient, ExecSocketError> {
        match passing::recv_owned(self.conn.as_fd(), MAX_MESSAGE) {
            Ok((Received::Message(..), buf)) => {
                serde_json::from_slice(&buf).map_err(|e| ExecSocketError::Protocol {
                    path: self.path.clone(),
                    why: format!("bad reply: {e}"),
                })
            }
            Ok((Received::Eof, _)) => Err(ExecSocketError::Closed {
                path: self.path.clone(),
            }),
            Ok((Received::Truncated, _)) => Err(ExecSocketError::Protocol {
                path: self.path.clone(),
                why: "a reply longer than expected".to_string(),
            }),
            Err(source) => Err(ExecSocketError::Sys {
                syscall: "recvmsg",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// The run request for `command` in `cwd` with `workspace` (absolute), the environment `env`
/// and `--run-as`. Fails when the cwd or the workspace cannot be looked at (the caller then
/// runs locally, whose errors say it best).
pub fn run_request(
    command: &[OsString],
    cwd: &Path,
    workspace: &Path,
    env: impl Iterator<Item = (OsString, OsString)>,
    run_as: RunAs,
) -> io::Result<RunRequest> {
    Ok(RunRequest {
        command: command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        cwd: cwd.as_os_str().as_bytes().to_vec(),
        cwd_id: file_id(cwd)?,
        workspace: workspace.as_os_str().as_bytes().to_vec(),
        workspace_id: file_id(workspace)?,
        workspace_read_only: on_read_only_mount(workspace)?,
        env: env
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
        run_as: match run_as {
            RunAs::Auto => None,
            RunAs::Fixed(ids) => Some((ids.uid, ids.gid)),
        },
    })
}
