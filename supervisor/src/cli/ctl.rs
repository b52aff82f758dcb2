//! The operator's commands: `carapace status | approvals | dlq | audit | reload | jobs`, talking to a
//! running supervisor over its control socket ([`crate::control`]), and `carapace token`,
//! which works on the state directory's token store directly (no supervisor needed).
//!
//! `approvals` also still answers the `ask`s of one-shot `carapace exec` runs through the
//! state directory's `pending/` files (see [`crate::broker_host::FileApprover`]).
//!
//! Output is for people; `--json` prints the supervisor's JSON for scripts. Exit status: 0 ok,
//! 1 the supervisor refused or failed (its message on stderr), 2 usage, 3 no supervisor running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use carapace_broker::approvals::Resolution;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::broker_host::{write_private_bytes, PendingFile};
use crate::control::{
    self, Admitted, ApprovalsList, ControlError, DlqLetter, DlqList, HeldList, MetricsText,
    ReloadReport, Request, Resolved, StatusReport,
};
use crate::errors::error_chain;

mod args;
mod commands;
mod format;
mod jobs;
#[cfg(test)]
mod tests;

pub use args::*;
pub use commands::*;
pub use format::*;
pub use jobs::*;
