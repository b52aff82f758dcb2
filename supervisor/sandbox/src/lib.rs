//! carapace's sandbox engine: one confined child from a policy [`Plan`](carapace_policy::Plan).
//!
//! One module per kernel mechanism, and [`spawn`], which applies them in order. Everything the
//! child applies is computed in the parent ([`spawn::Launch::prepare`]); between `clone` and
//! `execve` the child only runs raw async-signal-safe syscalls ([`spawn`]'s `child_main`).
//!
//! This crate is synchronous and depends on neither tokio nor the broker, so nothing async (and
//! nothing that allocates behind a lock) can reach the code that runs between clone and exec.
//!
//! - [`privilege`]: root or rootless, decided once per process and passed down as a value.
//! - [`program`]: the program file of a run, opened once, identified, hashed on demand.
//! - [`run`]: one confined run, start to end, as every caller does it.
//! - [`spawn`]: prepare a launch, start it, wait for it.
//! - [`namespaces`], [`mounts`], [`cgroup`], [`landlock`], [`seccomp`], [`caps`], [`rlimits`],
//!   [`fds`]: the mechanisms, each preparing in the parent what the child applies.
//! - [`egress`]: a brokered network's listeners inside the sandbox's network namespace.
//! - [`init`]: the sandbox's pid 1. [`resolve`]: the program named on a command line.
//!   [`report`]: how a run ended.

pub mod caps;
pub mod cgroup;
pub mod egress;
pub mod fds;
pub mod init;
pub mod landlock;
pub mod mounts;
pub mod namespaces;
pub mod privilege;
pub mod program;
pub mod report;
pub mod resolve;
pub mod rlimits;
pub mod run;
pub mod seccomp;
pub mod spawn;
pub mod spawner;

pub use privilege::Privilege;

/// The embedded default policy's text, for tests that check the mechanisms against it.
#[cfg(test)]
pub(crate) const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");

/// True if we may run privileged tests; panics when not root unless CARAPACE_ALLOW_SKIP=1 (a
/// test that must run as root never passes silently without it).
#[cfg(test)]
pub(crate) fn privileged(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("skipping privileged {what} test: not root (CARAPACE_ALLOW_SKIP=1)");
        return false;
    }
    panic!("this test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip it");
}

/// An error and its sources, joined with ": " (a source whose text is already in the line is
/// not said twice): the one way carapace turns an error into a line, for the CLI, the service's
/// log, control replies and the spawner's answers alike.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}
