//! The escape suite: attacks run inside the default `tool` profile (plus one read-exec mount of
//! the attack programs, profile `escape`), each asserting that the attack fails.
//!
//! Protocol of every test (see tests/src/lib.rs and tests/attacks/attack.h):
//! 1. CONTROL: where safe, the same attack runs unconfined on the host as root and must succeed,
//!    so the confined assertion is able to fail. Where the host itself cannot do it (kernel
//!    without the feature, VM root without the capability) or a control would harm the host, the
//!    test says why and uses a bounded control or none.
//! 2. CONFINED: the attack runs under `carapace exec --policy <escape policy>`; it must have
//!    started (START line) and end BLOCKED, or be killed by SIGSYS where seccomp kills.
//! 3. HOST CHECK where it matters: nothing written outside the workspace, the marker process
//!    alive, no host mount added, the host hostname unchanged, listeners received nothing.
//!
//! The suite's body is tests/tests/escape/suite.rs, shared with tests/tests/escape_rootless.rs,
//! which runs the same attacks with carapace started as an unprivileged user (rootless mode).
//! Here carapace runs as root.

/// How this crate runs carapace (see `carapace_tests::Mode`).
const MODE: carapace_tests::Mode = carapace_tests::Mode::Root;

/// The default policy's profile the attacks run in.
const BASE: &str = "tool";

include!("escape/suite.rs");
