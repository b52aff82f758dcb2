//! The escape suite in the default policy's `build` profile: the same attacks as
//! tests/tests/escape.rs (the body is tests/tests/escape/suite.rs), run as root, with the
//! attack programs in a profile that extends `build` instead of `tool`.
//!
//! The build profile relaxes one thing on purpose: programs written to the workspace and to the
//! private /tmp may run (docs/threat-model.md, "Relaxing W^X"). The attacks that execute
//! written code there are therefore expected to run, and only there (/dev/shm, memfd and every
//! other attack stay blocked); everything else must hold exactly as in the tool profile. Limits
//! are the build profile's own (larger), and the attacks that measure them read them from the
//! same policy.

/// How this crate runs carapace (see `carapace_tests::Mode`).
const MODE: carapace_tests::Mode = carapace_tests::Mode::Root;

/// The default policy's profile the attacks run in.
const BASE: &str = "build";

include!("escape/suite.rs");
