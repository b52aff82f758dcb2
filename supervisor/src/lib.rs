//! carapace supervisor library: one module per kernel mechanism, and the `spawn` module that
//! applies a policy [`Plan`](carapace_policy::Plan) to one confined child.
//!
//! Everything the child applies is computed in the parent ([`spawn::Launch::prepare`]); between
//! `clone` and `execve` the child only runs raw async-signal-safe syscalls
//! ([`spawn`]'s `child_main`).

pub mod broker_host;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod embedded;
pub mod errors;
pub mod fds;
pub mod init;
pub mod landlock;
pub mod logging;
pub mod mounts;
pub mod namespaces;
pub mod paths;
pub mod report;
pub mod resolve;
pub mod rlimits;
pub mod sdnotify;
pub mod seccomp;
pub mod service;
pub mod spawn;
pub mod wiring;
