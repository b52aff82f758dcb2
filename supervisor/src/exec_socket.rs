//! The exec socket of `carapace run`: `carapace exec` as a thin client of a running supervisor,
//! as `systemd-run` is of systemd.
//!
//! A one-shot `carapace exec` starts a process, parses and compiles a policy, makes cgroups and
//! builds a sandbox from a fresh (and larger) address space. A running supervisor has its policy
//! compiled, a cgroup made ahead per profile and single-threaded spawners ready: when one is
//! there, `carapace exec` hands it the command line, its cwd, environment and its own stdin,
//! stdout and stderr, and waits for the exit report. The sandbox is the same (the one run path,
//! [`carapace_sandbox::run`]); what differs is who pays for setting it up.
//!
//! # Which path runs
//!
//! `carapace exec` (`--via auto`, the default) takes the supervisor's path when all hold, and
//! else starts the sandbox itself; `--via local` always starts it itself, `--via supervisor`
//! fails rather than do so. `-v` and `--report` say which path ran, and why not the other;
//! `--report-json` carries it as `"via"`.
//! - No `--policy` and no `--state-dir`: the **supervisor's policy in force** decides (the
//!   policy the operator configured for this host, reloads included), not the embedded default
//!   a local run would use. A command line with `--policy FILE` runs locally under that file.
//! - The exec socket answers: `<runtime dir>/exec.sock`, next to the control socket (the
//!   directory of `$CARAPACE_CONTROL_SOCKET` when that is set).
//! - The caller is root, or the supervisor's own user (a rootless supervisor serves its user):
//!   checked on every connection with `SO_PEERCRED`; the socket is also mode 0600. A caller the
//!   supervisor refuses runs locally (and would need root there too).
//! - The supervisor sees the same files: the caller's cwd and workspace, looked up by path in
//!   the supervisor's mount namespace, must be the same directories (device and inode), and a
//!   workspace the caller can write must not be on a read-only mount there. A supervisor in a
//!   namespace of its own (the shipped unit's `PrivateTmp=`, `ProtectHome=`,
//!   `ProtectSystem=strict`) answers "elsewhere" for a cwd it sees differently or a workspace
//!   it sees read-only, and the client runs locally.
//!
//! # The protocol
//!
//! A Unix `SOCK_SEQPACKET` socket; each message is one JSON object ([`ToSupervisor`],
//! [`ToClient`], at most [`MAX_MESSAGE`] bytes), descriptors travel with `SCM_RIGHTS`.
//!
//! ```text
//! carapace exec                                    carapace run (a thread per connection)
//!  run {command, cwd, workspace, env, run_as}
//!    + stdin, stdout, stderr  ───────────────────► peer check, same view, decision
//!                             ◄─────────────────── elsewhere {why} | failed {message, code}
//!                             ◄─────────────────── ask {question}   (rule says ask)
//!  answer {allow}  ──────────────────────────────►
//!                                                  audit record (fails closed), start
//!                             ◄─────────────────── started {profile, policy, ...}
//!  (waits; its exit or Ctrl-C closes the socket:   the tool is killed when the socket closes
//!   the tool is killed)
//!                             ◄─────────────────── exited {code, line, note, report}
//! ```
//!
//! The tool is started like one of the broker's (the spawners, the profile's cgroup made
//! ahead, `--run-as auto` per tool), with the caller's descriptors at 0..=2 and its
//! environment as the source of the profile's `env.pass`. A profile with a broker section gets
//! its broker socket at fd 3, served by the supervisor's broker as a tool of that profile. Each
//! run is an audit record of the operator (`op` `exec`, its decision and the caller's uid and
//! pid in `detail`) before it starts; an audit log that cannot be written refuses the run.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod client;
mod server;

pub use client::*;
pub use server::*;

/// Name of the exec socket in the runtime directory (beside [`crate::paths::CONTROL_SOCKET`]).
pub const EXEC_SOCKET: &str = "exec.sock";
/// Longest message either side sends (a command line and an environment).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The exec socket beside a control socket.
pub fn socket_beside(control_socket: &Path) -> PathBuf {
    control_socket.with_file_name(EXEC_SOCKET)
}

/// A file's identity: device and inode.
pub type FileId = (u64, u64);

/// The file at `path`, followed: its device and inode.
pub fn file_id(path: &Path) -> io::Result<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Whether `path` lies on a read-only mount (as this process's mount namespace has it).
pub fn on_read_only_mount(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// What the client sends: `{"run":{...}}` or `{"answer":{"allow":BOOL}}` (externally tagged:
/// serde reads a run in one pass, where an internally tagged one is buffered first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSupervisor {
    /// The run; comes with three descriptors: stdin, stdout, stderr.
    Run(RunRequest),
    /// The caller's answer to [`ToClient::Ask`].
    Answer { allow: bool },
}

/// The command line and its surroundings, as `carapace exec` would use them itself. Paths,
/// arguments and the environment are bytes (Unix strings need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// PROGRAM ARGS.
    pub command: Vec<Vec<u8>>,
    /// The caller's working directory (absolute), and its identity as the caller sees it.
    pub cwd: Vec<u8>,
    pub cwd_id: FileId,
    /// The workspace (absolute: `--workspace` joined to the cwd, or the cwd), and its identity.
    pub workspace: Vec<u8>,
    pub workspace_id: FileId,
    /// Whether the workspace is on a read-only mount for the caller.
    pub workspace_read_only: bool,
    /// The caller's environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// `--run-as UID:GID`; None: `auto`.
    pub run_as: Option<(u32, u32)>,
}

/// What the supervisor answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToClient {
    /// This supervisor cannot run it as the caller would (`why`): the caller runs it itself.
    Elsewhere { why: String },
    /// Refused or failed before it ran: print `message` and end with `code`.
    Failed { message: String, code: i32 },
    /// The deciding rule says ask: ask on the caller's terminal (`question`), or, without one,
    /// print `without_terminal` and end as denied.
    Ask {
        question: String,
        without_terminal: String,
    },
    /// The sandbox is running: in `profile`, decided by the policy `policy` (its file names);
    /// `explain`: the decision in words (for `-v`).
    Started {
        profile: String,
        policy: String,
        explain: String,
    },
    /// It ended: the exit status to end with, the report's line and note, and the report.
    Exited {
        code: i32,
        line: String,
        note: Option<String>,
        report: serde_json::Value,
    },
}

/// Errors of talking over the exec socket.
#[derive(Debug, thiserror::Error)]
pub enum ExecSocketError {
    #[error("exec socket {}: {syscall}: {source}", path.display())]
    Sys {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("exec socket {}: {why}", path.display())]
    Protocol { path: PathBuf, why: String },
    #[error("exec socket {}: the supervisor closed the connection", path.display())]
    Closed { path: PathBuf },
}

#[cfg(test)]
mod tests;
