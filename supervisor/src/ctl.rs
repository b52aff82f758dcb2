//! The operator's commands: `carapace status | approvals | dlq | audit | reload`, talking to a
//! running supervisor over its control socket ([`crate::control`]).
//!
//! `approvals` also still answers the `ask`s of one-shot `carapace exec` runs through the
//! state directory's `pending/` files (see [`crate::broker_host::FileApprover`]).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::broker_host::{write_private_bytes, PendingFile, DEFAULT_STATE_DIR};
use crate::cli::error_chain;

fn state_dir_of(arg: Option<&Path>) -> PathBuf {
    arg.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), Path::to_path_buf)
}

/// `carapace status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON for scripts
    #[arg(long)]
    pub json: bool,
}

/// `carapace dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Messages held in the dead-letter queue
    List,
    /// Send a held message on after all
    Release {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Delete a held message
    Drop {
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `carapace reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {}

/// `carapace status` (to be written: control socket).
pub fn status(_a: StatusArgs) -> i32 {
    eprintln!("carapace: status: not implemented yet");
    1
}

/// `carapace dlq ...` (to be written: control socket).
pub fn dlq(_a: DlqArgs) -> i32 {
    eprintln!("carapace: dlq: not implemented yet");
    1
}

/// `carapace reload` (to be written: control socket).
pub fn reload(_a: ReloadArgs) -> i32 {
    eprintln!("carapace: reload: not implemented yet");
    1
}

/// `carapace audit ...`.
pub fn audit(a: AuditCommand) -> i32 {
    match a {
        AuditCommand::Verify { file } => audit_verify(&file),
    }
}

#[derive(Debug, Args)]
#[command(
    long_about = "List and answer the `ask` approvals that children of running `carapace exec` \
                  processes are waiting for, and the persisted allow-always grants. Works on the \
                  state directory directly (pending/<KEY>.json, approvals.json) until the \
                  control socket exists.",
    after_help = "Examples:\n  carapace approvals list\n  carapace approvals allow 4242-1\n  \
                  carapace approvals allow 4242-2 --always\n  carapace approvals deny 4242-3"
)]
pub struct ApprovalsArgs {
    /// State directory of the broker [default: /var/lib/carapace]
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approvals (KEY, who, program, argv, profile) and allow-always grants
    List,
    /// Allow a pending approval once, or with --always for this exact program content, argv
    /// and profile from now on
    Allow {
        #[arg(value_name = "KEY")]
        key: String,
        #[arg(long)]
        always: bool,
    },
    /// Deny a pending approval
    Deny {
        #[arg(value_name = "KEY")]
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log (`<state-dir>/audit.log`)
    #[command(
        long_about = "Verify the hash chain of a broker audit log: every record carries the \
                      SHA-256 of the line before it and a sequence number, so an edited, \
                      deleted, reordered or duplicated record, or a torn last line, breaks the \
                      chain. Deleting whole records from the END cannot be seen from the file \
                      alone; compare the head (printed on success) with one saved elsewhere.",
        after_help = "Example:\n  carapace audit verify /var/lib/carapace/audit.log\n\n\
                      Exit status: 0 intact (\"ok: N records ...\"), 1 broken (the first line \
                      found wrong, and how), 2 the file cannot be read."
    )]
    Verify {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// `carapace approvals ...` on the state directory.
pub fn approvals(a: ApprovalsArgs) -> i32 {
    let state = state_dir_of(a.state_dir.as_deref());
    let pending_dir = state.join("pending");
    match a.command {
        ApprovalsCommand::List => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&pending_dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "json"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            let mut n = 0;
            for f in &files {
                let rec: Option<PendingFile> = std::fs::read(f)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                match rec {
                    Some(p) => {
                        n += 1;
                        println!(
                            "pending {}  {}#{}({})  {}  argv={:?}  profile={}  sha256={}  why: {}",
                            p.key,
                            p.who.role,
                            p.who.id,
                            p.who.profile,
                            p.program.display(),
                            p.argv,
                            p.profile,
                            p.program_sha256,
                            p.why
                        );
                    }
                    None => eprintln!("carapace: {}: not a pending approval", f.display()),
                }
            }
            if n == 0 {
                println!("no pending approvals");
            }
            if !state.is_dir() {
                return 0;
            }
            match carapace_broker::approvals::Approvals::open(&state, std::time::Duration::ZERO) {
                Ok(ap) => {
                    for g in ap.grants() {
                        println!(
                            "always {}  argv={:?}  profile={}  sha256={}  granted {}",
                            g.program.display(),
                            g.argv,
                            g.profile,
                            g.sha256,
                            g.granted_at
                        );
                    }
                    0
                }
                Err(e) => {
                    eprintln!("carapace: {}", error_chain(&e));
                    1
                }
            }
        }
        ApprovalsCommand::Allow { key, always } => answer_approval(
            &pending_dir,
            &key,
            if always { "allow-always" } else { "allow-once" },
        ),
        ApprovalsCommand::Deny { key } => answer_approval(&pending_dir, &key, "deny"),
    }
}

/// Write the answer for pending approval `key`; the waiting supervisor picks it up.
pub fn answer_approval(pending_dir: &Path, key: &str, answer: &str) -> i32 {
    let valid =
        !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    if !valid {
        eprintln!(
            "carapace: {key:?} is not an approval key (PID-N, see `carapace approvals list`)"
        );
        return 2;
    }
    if !pending_dir.join(format!("{key}.json")).is_file() {
        eprintln!("carapace: no pending approval {key} (see `carapace approvals list`)");
        return 1;
    }
    let path = pending_dir.join(format!("{key}.answer"));
    match write_private_bytes(pending_dir, &path, format!("{answer}\n").as_bytes()) {
        Ok(()) => {
            println!("{answer}: {key}");
            0
        }
        Err(e) => {
            eprintln!("carapace: {e}");
            1
        }
    }
}

pub fn audit_verify(file: &Path) -> i32 {
    match carapace_broker::audit::verify(file) {
        Ok(r) if r.is_ok() => {
            println!("{r}");
            0
        }
        Ok(r) => {
            println!("{}: {r}", file.display());
            1
        }
        Err(e) => {
            eprintln!("carapace: {}", error_chain(&e));
            2
        }
    }
}
