//! carapace's policy engine: a versioned TOML format, parsed and validated with located errors,
//! evaluated for exec requests, and compiled into a [`plan::Plan`] the supervisor applies.
//!
//! This crate is pure: it knows nothing of processes and does no I/O beyond what its caller
//! hands in (the policy text; a resolver closure for program paths).
//!
//! API CONTRACT (stubs until the engine lands; signatures are what `supervisor` codes against):

pub mod plan;

use std::path::{Path, PathBuf};

pub use plan::Plan;

/// One located error in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
    /// What was expected there, in words (e.g. "an absolute, normalized path").
    pub expected: Option<String>,
}

/// All errors found in one policy (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

/// Whether a request may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    Allow,
    Ask,
    Deny,
}

/// An exec request: the program already resolved by the caller to an absolute, canonical path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub program: PathBuf,
    /// argv[1..]
    pub args: Vec<String>,
}

/// Which rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// 0-based index among `[[exec]]` rules.
    pub index: usize,
    /// 1-based line of the rule's table header in the policy file.
    pub line: usize,
    /// The rule's `why` text.
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub approval: Approval,
    /// Profile to run under (None when denied by "no rule matched").
    pub profile: Option<String>,
    /// The rule that decided; None when no rule matched (then the decision is Deny).
    pub rule: Option<RuleRef>,
}

/// What the running kernel supports, as probed by the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Landlock ABI version reported by the kernel (0 = Landlock unavailable).
    pub landlock_abi: u8,
}

/// Result of one `[[test]]` example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// 1-based line of the `[[test]]` header.
    pub line: usize,
    pub command: Vec<String>,
    pub expected: Approval,
    pub got: Decision,
    pub passed: bool,
}

/// A parsed and validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    _private: (),
}

impl Policy {
    /// Parse and validate. `file` is only used in diagnostics.
    pub fn parse(_text: &str, _file: &str) -> Result<Policy, Diagnostics> {
        Err(Diagnostics(vec![]))
    }

    /// Resolve each rule's literal program path with the caller's resolver (the supervisor passes
    /// `fs::canonicalize`), so that rules match the canonical path of a request.
    pub fn canonicalize_programs(&mut self, _resolve: impl Fn(&Path) -> Option<PathBuf>) {}

    /// First matching `[[exec]]` rule wins; no match is Deny.
    pub fn evaluate(&self, _req: &ExecRequest) -> Decision {
        Decision {
            approval: Approval::Deny,
            profile: None,
            rule: None,
        }
    }

    /// Compile a profile into the plan the supervisor applies, for the kernel described by
    /// `target`. Fails (never degrades silently) when the target cannot enforce what the
    /// profile demands, e.g. Landlock ABI below the profile's `min_abi`.
    pub fn compile(&self, _profile: &str, _target: &Target) -> Result<Plan, Diagnostics> {
        Err(Diagnostics(vec![]))
    }

    /// Run the policy's own `[[test]]` examples.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        Vec::new()
    }
}
