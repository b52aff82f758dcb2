//! carapace supervisor library: one module per kernel mechanism, and the `spawn` module that
//! applies a policy [`Plan`](carapace_policy::Plan) to one confined child.
//!
//! Everything the child applies is computed in the parent ([`spawn::Launch::prepare`]); between
//! `clone` and `execve` the child only runs raw async-signal-safe syscalls
//! ([`spawn`]'s `child_main`).

pub mod broker_host;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod embedded;
pub mod errors;
pub mod logging;
pub mod paths;
pub mod sdnotify;
pub mod service;
pub mod wiring;
