//! The `carapace` binary's library: the service and the operator's command line, on top of the
//! sandbox engine ([`carapace_sandbox`]) and the broker ([`carapace_broker`]).
//!
//! - [`cli`]: the command line: `exec` (one confined run), `policy check|explain`, and the
//!   operator's commands ([`cli::ctl`]: status, approvals, dlq, held, audit, reload, token).
//! - [`service`]: `carapace run`, the long-running supervisor: its children, reload, signals,
//!   its configuration file ([`service::config`], read strictly), systemd notification
//!   ([`service::sdnotify`]), logging ([`service::logging`]) and the check that configuration
//!   and policy fit together ([`service::wiring`]).
//! - [`control`]: the control socket both sides speak: protocol, server (the service's) and
//!   client (the command line's), and the audit-tail follower.
//! - [`exec_socket`]: `carapace exec` through a running `carapace run` (its exec socket).
//! - [`decide`]: what the policy decides for a command line (the command line's and the exec
//!   socket's).
//! - [`broker_host`]: the broker in this process: the state directory, the tokio runtime serving
//!   the children's sockets, and the broker's tools started through the sandbox's one run path.
//! - [`paths`], [`embedded`], [`errors`]: default locations, the embedded default policy, and
//!   the one place errors become a line.

pub mod broker_host;
pub mod cli;
pub mod control;
pub mod decide;
pub mod embedded;
pub mod errors;
pub mod exec_socket;
pub mod paths;
pub mod pidfd;
pub mod service;
