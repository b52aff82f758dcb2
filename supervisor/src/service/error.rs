//! Errors of starting the service, loading its policy and children, running a child and
//! reloading: each with the operation, the path and the error of the layer below. They are
//! turned into a line ([`crate::errors::error_chain`]) only where shown: the log, stderr, the
//! status's `last_reload_error` and the control reply.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::broker_host::BrokerHostError;
use crate::control::ControlError;
use crate::service::config::{ConfigErrors, ProgramNotFound};
use carapace_broker::tokens::TokenError;
use carapace_policy::Diagnostics;
use carapace_sandbox::program::ProgramError;
use carapace_sandbox::spawn::SpawnError;

/// Errors of the service ([`crate::service::run()`] shows them).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `[metrics] listen` cannot be bound.
    #[error("cannot listen on {addr} for the metrics ([metrics] listen): {source}")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    MetricsHttp(#[from] crate::service::metrics::http::HttpError),
    /// The configuration (re)read on a reload.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("cannot read {}: {source}", path.display())]
    ReadPolicy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "more than one policy file: give one file (profiles can build on each other with \
         `extends` inside it)"
    )]
    ManyPolicies,
    /// The policy's located errors (shown as they are, and kept as the source so that
    /// [`crate::errors::diagnostics_in`] finds them).
    #[error("{0}")]
    Policy(#[from] Diagnostics),
    /// A child runs under a profile the policy lacks.
    #[error(
        "{what} runs under profile `{profile}`, which the policy {policy} does not define \
         (profiles: {})",
        profiles.join(", ")
    )]
    UnknownProfile {
        what: String,
        profile: String,
        policy: String,
        profiles: Vec<String>,
    },
    /// The channels of the configuration do not match the policy's profiles.
    #[error("the channels are not wired to the policy {policy}:\n  {}", errors.join("\n  "))]
    Wiring { policy: String, errors: Vec<String> },
    /// A child's program, given by a bare name, is neither next to carapace nor in libexec.
    #[error(transparent)]
    ProgramNotFound(#[from] ProgramNotFound),
    /// A child's program cannot be resolved to its canonical path.
    #[error("program {}: {source}", path.display())]
    Program {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The operator token store.
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("signal handlers: {source}")]
    Signals {
        #[source]
        source: io::Error,
    },
    /// The state directory, the broker's runtime, a child's descriptors, a reload of the
    /// broker's policy.
    #[error(transparent)]
    Broker(#[from] BrokerHostError),
    #[error("cannot make the socket pair of {child} and its channel's adapter: {source}")]
    Pair {
        child: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr} for {child}: {source}")]
    Listen {
        addr: SocketAddr,
        child: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot start a thread for {child}: {source}")]
    Thread {
        child: String,
        #[source]
        source: io::Error,
    },
    /// A child's profile does not compile for this kernel.
    #[error("profile `{profile}` cannot run here: {source}")]
    Compile {
        profile: String,
        #[source]
        source: Diagnostics,
    },
    /// A child's program cannot be opened.
    #[error(transparent)]
    OpenProgram(#[from] ProgramError),
    /// Starting or waiting for a child.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}
