//! carapace's policy engine: a versioned TOML format, parsed and validated with located errors,
//! evaluated for exec requests, and compiled into a [`plan::Plan`] the supervisor applies.
//!
//! This crate is pure: it knows nothing of processes and does no I/O beyond what its caller
//! hands in (the policy text; a resolver closure for program paths).
//!
//! Pipeline: [`Policy::parse`] (TOML -> model, every error located) -> [`Policy::evaluate_with`]
//! (first matching `[[exec]]` rule; rule programs resolved lazily with the supervisor's resolver,
//! or eagerly beforehand with [`Policy::canonicalize_programs`] and then [`Policy::evaluate`]) ->
//! [`Policy::compile`] (profile -> [`Plan`]) -> [`Plan::explain`].
//! The format is documented in `docs/policy.md`.

mod bpf;
pub mod broker;
mod compile;
mod diagnostic;
mod explain;
pub mod fuzz;
pub mod glob;
mod model;
pub mod plan;
mod schema;
pub mod seccomp;
mod source;
pub mod tables;
pub mod toml_schema;
mod units;
mod validate;

use std::fmt;

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub use bpf::{kernel_caches_allow, kernel_caches_allow_stack, max_path_len};
/// Located errors and their rustc-style rendering.
pub use diagnostic::{Diagnostic, Diagnostics, Label};
pub use plan::Plan;
pub use seccomp::{run_bpf, run_bpf_counted};
/// Locating byte spans of a TOML text as `file:line:column` and building [`Diagnostic`]s, and
/// collecting them ([`Sink`]); the supervisor's configuration reports its errors through them
/// too, after the same [`toml_schema`] check as the policy.
pub use source::{Sink, Source};
/// Path, duration and size checks shared with the supervisor's configuration:
/// [`check_abs_path`] (absolute and normalized, the reason when not) with [`PATH_EXPECTED`], and
/// [`parse_duration`] (integer seconds or `"<n><ms|s|m|min|h>"`, zero refused) with
/// [`DURATION_EXPECTED`], and [`parse_size`] (bytes or `"<n><unit>"`, zero refused) with
/// [`SIZE_EXPECTED`].
pub use units::{
    check_abs_path, parse_duration, parse_size, DURATION_EXPECTED, PATH_EXPECTED, SIZE_EXPECTED,
};

use crate::validate::{ArgPat, ProgramPat, Validated};

/// Whether a request may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    Allow,
    Ask,
    Deny,
}

impl fmt::Display for Approval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Approval::Allow => "allow",
            Approval::Ask => "ask",
            Approval::Deny => "deny",
        })
    }
}

/// An exec request: the program already resolved by the caller to an absolute, canonical path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    pub program: PathBuf,
    /// argv[1..]
    pub args: Vec<String>,
    /// The run's workspace directory (absolute, canonical), if the caller knows it: what
    /// `$WORKSPACE/...` program patterns match beneath. Without it they match nothing.
    pub workspace: Option<PathBuf>,
}

/// The workspace `[[test]]` examples run in: a command `$WORKSPACE/PATH` is the program
/// `PATH` beneath it.
pub const TEST_WORKSPACE: &str = "/carapace-test-workspace";

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

impl Decision {
    /// The decision in plain words: what, which rule (number, line, why), which profile.
    pub fn explain(&self) -> String {
        render_decision(self)
    }
}

/// Render a [`Decision`] in plain words (see [`Decision::explain`]).
pub fn render_decision(d: &Decision) -> String {
    let mut s = String::new();
    let verb = match d.approval {
        Approval::Allow => "allow: the program runs without asking",
        Approval::Ask => {
            "ask: the program runs only if a person approves it (without a terminal to ask on, it is denied)"
        }
        Approval::Deny => "deny: the program does not start",
    };
    s.push_str(&format!("decision: {verb}\n"));
    match &d.rule {
        Some(r) => s.push_str(&format!(
            "rule: [[exec]] #{} at line {} (the first rule that matches wins)\nwhy: {}\n",
            r.index + 1,
            r.line,
            r.why
        )),
        None => s.push_str("rule: none matched; nothing runs unless an [[exec]] rule allows it\n"),
    }
    match &d.profile {
        Some(p) => s.push_str(&format!("profile: {p}\n")),
        None => s.push_str("profile: none\n"),
    }
    s
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
    text: String,
    file: String,
    model: std::sync::Arc<Validated>,
}

impl Policy {
    /// Parse and validate. `file` is only used in diagnostics.
    pub fn parse(text: &str, file: &str) -> Result<Policy, Diagnostics> {
        let src = Source::new(text, file);
        let to_diag = |e: &toml::de::Error| {
            src.toml_error(e, "valid TOML in the policy format (see docs/policy.md)")
        };
        // 1. TOML syntax, with recovery so that every syntax error is reported.
        let (mut doc, syntax) = toml::de::DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            return Err(finish(syntax.iter().map(to_diag).collect()));
        }
        // 2. Shape: every unknown key and wrong type; the document is repaired so that the
        //    semantic checks below still run and report the file's other errors too.
        let mut shape = Sink::new(&src);
        toml_schema::check_and_repair(&mut doc, &schema::POLICY, &mut shape);
        let shape_errors = shape.diags;
        // 3. serde into the spanned model.
        let raw = match model::RawPolicy::deserialize(toml::de::Deserializer::from(doc)) {
            Ok(r) => r,
            Err(e) => {
                let mut all = shape_errors;
                all.push(to_diag(&e));
                return Err(finish(all));
            }
        };
        // 4. Semantics. Errors at the exact place of a shape error come from its placeholder.
        let mut sink = Sink::new(&src);
        let model = validate::validate(raw, &mut sink);
        let diags = sink.merge_shape(shape_errors);
        if !diags.is_empty() {
            return Err(finish(diags));
        }
        Ok(Policy {
            text: text.to_string(),
            file: file.to_string(),
            model: std::sync::Arc::new(model),
        })
    }

    /// Resolve each rule's literal program path with the caller's resolver (the supervisor passes
    /// `fs::canonicalize`), so that rules match the canonical path of a request. Both the written
    /// and the resolved form match afterwards.
    pub fn canonicalize_programs(&mut self, resolve: impl Fn(&Path) -> Option<PathBuf>) {
        let model = std::sync::Arc::make_mut(&mut self.model);
        for rule in &mut model.rules {
            for p in &mut rule.programs {
                if let ProgramPat::Literal { written, resolved } = p {
                    *resolved = resolve(written);
                }
            }
        }
    }

    /// First matching `[[exec]]` rule wins; no match is Deny. A literal program matches its
    /// written form, and its resolved form if [`Policy::canonicalize_programs`] was called.
    pub fn evaluate(&self, req: &ExecRequest) -> Decision {
        self.evaluate_with(req, |_| None)
    }

    /// [`Policy::evaluate`] with lazy program resolution: gives the same decision as
    /// `canonicalize_programs(resolve)` followed by `evaluate(req)` (for a resolver that answers
    /// the same way each time), but calls `resolve` only where the answer can matter:
    ///
    /// * rules are tried in order and evaluation stops at the first match, so rules after it are
    ///   never resolved;
    /// * a rule's arguments are checked first: a rule whose argument patterns reject the request
    ///   resolves nothing;
    /// * a rule whose written literals or globs already match the request resolves nothing;
    /// * otherwise each literal the request does not already equal is resolved (whether a path
    ///   is or passes through a symlink is a question for the file system), at most once per
    ///   distinct literal per call; literals that `canonicalize_programs` already resolved to a
    ///   path are not asked again.
    ///
    /// The request's program must be canonical (the supervisor resolves `PATH` and symlinks
    /// first), so a request for the canonical path matches a rule written with a symlinked path.
    pub fn evaluate_with(
        &self,
        req: &ExecRequest,
        mut resolve: impl FnMut(&Path) -> Option<PathBuf>,
    ) -> Decision {
        // Literals resolved during this call: written -> resolved (a map: a policy writes the
        // same program in several rules, and `Path` equality compares by components).
        let mut memo: std::collections::HashMap<&Path, Option<PathBuf>> =
            std::collections::HashMap::new();
        for (index, rule) in self.model.rules.iter().enumerate() {
            let args_ok = match &rule.args {
                None => true,
                Some(pats) => args_match(pats, &req.args),
            };
            if !args_ok {
                continue;
            }
            // Without any resolution first, then resolving the literals that need it.
            let direct = rule.programs.iter().any(|p| match p {
                ProgramPat::Literal { written, resolved } => {
                    req.program == *written || resolved.as_ref() == Some(&req.program)
                }
                ProgramPat::Glob { matcher, .. } => matcher.is_match(&req.program),
                ProgramPat::Workspace { matcher, .. } => req
                    .workspace
                    .as_ref()
                    .and_then(|ws| req.program.strip_prefix(ws).ok())
                    .is_some_and(|rel| {
                        !rel.as_os_str().is_empty() && matcher.is_match(Path::new("/").join(rel))
                    }),
            });
            let prog_ok = direct
                || rule.programs.iter().any(|p| match p {
                    ProgramPat::Literal {
                        written,
                        resolved: None,
                    } => match memo.get(written.as_path()) {
                        Some(r) => r.as_ref() == Some(&req.program),
                        None => {
                            let r = resolve(written);
                            let hit = r.as_ref() == Some(&req.program);
                            memo.insert(written.as_path(), r);
                            hit
                        }
                    },
                    _ => false,
                });
            if prog_ok {
                return Decision {
                    approval: rule.approval,
                    profile: rule.profile.clone(),
                    rule: Some(RuleRef {
                        index,
                        line: rule.line,
                        why: rule.why.clone(),
                    }),
                };
            }
        }
        Decision {
            approval: Approval::Deny,
            profile: None,
            rule: None,
        }
    }

    /// Compile a profile into the plan the supervisor applies, for the kernel described by
    /// `target`. Fails (never degrades silently) when the target cannot enforce what the
    /// profile demands, e.g. Landlock ABI below the profile's `min_abi`.
    pub fn compile(&self, profile: &str, target: &Target) -> Result<Plan, Diagnostics> {
        let src = Source::new(&self.text, &self.file);
        match self.model.profiles.get(profile) {
            None => Err(Diagnostics(vec![Diagnostic {
                file: self.file.clone(),
                line: 1,
                column: 1,
                message: format!("no profile named `{profile}` in this policy"),
                expected: Some(format!("one of: {}", self.profile_names().join(", "))),
                ..Default::default()
            }])),
            Some(p) => compile::compile(p, target, &src).map_err(Diagnostics),
        }
    }

    /// Run the policy's own `[[test]]` examples (decided with [`Policy::evaluate`]).
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        self.run_tests_with(|_| None)
    }

    /// Run the policy's own `[[test]]` examples, decided with [`Policy::evaluate_with`] and this
    /// resolver. Answers are shared between the examples: each literal is resolved at most once
    /// for the whole run.
    pub fn run_tests_with(
        &self,
        mut resolve: impl FnMut(&Path) -> Option<PathBuf>,
    ) -> Vec<TestOutcome> {
        // Each rule program is resolved once for all the tests (a map: the tests ask for the
        // same ~100 programs again and again, and `Path` equality compares by components).
        let mut cache: std::collections::HashMap<PathBuf, Option<PathBuf>> =
            std::collections::HashMap::new();
        let mut resolve = |p: &Path| match cache.get(p) {
            Some(r) => r.clone(),
            None => {
                let r = resolve(p);
                cache.insert(p.to_path_buf(), r.clone());
                r
            }
        };
        self.model
            .tests
            .iter()
            .map(|t| {
                let (program, args) = match t.command.split_first() {
                    Some((p, a)) => (p.as_str(), a.to_vec()),
                    None => ("", Vec::new()),
                };
                let in_ws = program
                    .strip_prefix(crate::validate::WORKSPACE_VAR)
                    .map(|rest| format!("{TEST_WORKSPACE}{rest}"));
                let req = ExecRequest {
                    program: PathBuf::from(in_ws.as_deref().unwrap_or(program)),
                    args,
                    workspace: in_ws.as_ref().map(|_| PathBuf::from(TEST_WORKSPACE)),
                };
                let got = self.evaluate_with(&req, &mut resolve);
                let passed = got.approval == t.expect
                    && t.profile
                        .as_ref()
                        .is_none_or(|p| got.profile.as_ref() == Some(p));
                TestOutcome {
                    line: t.line,
                    command: t.command.clone(),
                    expected: t.expect,
                    got,
                    passed,
                }
            })
            .collect()
    }

    /// Names of the profiles defined in the policy, sorted.
    pub fn profile_names(&self) -> Vec<&str> {
        self.model.profiles.keys().map(String::as_str).collect()
    }

    /// The `why` of a profile.
    pub fn profile_why(&self, profile: &str) -> Option<&str> {
        self.model.profiles.get(profile).map(|p| p.why.as_str())
    }

    /// Number of `[[exec]]` rules.
    pub fn rule_count(&self) -> usize {
        self.model.rules.len()
    }

    /// The broker rules of `profile` (its `[profiles.NAME.broker]` section, with the secrets and
    /// channels it names resolved). None when the profile does not exist or has no broker
    /// section (then its children get no broker socket).
    pub fn broker_view(&self, profile: &str) -> Option<broker::BrokerRules> {
        let p = self.model.profiles.get(profile)?;
        let b = p.broker.as_ref()?;
        Some(broker::rules_of(
            profile,
            b,
            &self.model.secrets,
            &self.model.channels,
        ))
    }

    /// [`broker::BrokerRules::explain`] for `profile`, or a sentence saying it has no broker.
    pub fn explain_broker(&self, profile: &str) -> String {
        match self.broker_view(profile) {
            Some(r) => r.explain(),
            None => format!(
                "broker: profile `{profile}` has no [profiles.{profile}.broker] section: its children get no broker socket\n"
            ),
        }
    }

    /// Every `[secrets.NAME]` of the policy (the broker loads them all so that any secret value
    /// can be redacted from outbound data, whoever may fetch it).
    pub fn secrets(&self) -> impl Iterator<Item = &broker::SecretSpec> {
        self.model.secrets.values()
    }

    /// Every `[channels.NAME]` of the policy.
    pub fn channels(&self) -> impl Iterator<Item = &broker::ChannelSpec> {
        self.model.channels.values()
    }

    /// The file name given to [`Policy::parse`].
    pub fn file(&self) -> &str {
        &self.file
    }
}

/// Sort diagnostics by location and drop exact duplicates (a parent's error seen through
/// several children).
fn finish(mut diags: Vec<Diagnostic>) -> Diagnostics {
    diags.sort_by(|a, b| (a.line, a.column, &a.message).cmp(&(b.line, b.column, &b.message)));
    diags.dedup();
    Diagnostics(diags)
}

/// Match argv[1..] against per-element patterns; `**` matches zero or more elements.
fn args_match(pats: &[ArgPat], args: &[String]) -> bool {
    // ok[i][j]: pats[i..] matches args[j..]; computed bottom-up, O(pats * args).
    let (np, na) = (pats.len(), args.len());
    let mut next = vec![false; na + 1]; // row i+1
    next[na] = true; // empty patterns match empty args
    for i in (0..np).rev() {
        let mut cur = vec![false; na + 1];
        for j in (0..=na).rev() {
            cur[j] = match &pats[i] {
                ArgPat::Rest => next[j] || (j < na && cur[j + 1]),
                ArgPat::Literal(l) => j < na && args[j] == *l && next[j + 1],
                ArgPat::Glob(m) => j < na && m.is_match(&args[j]) && next[j + 1],
            };
        }
        next = cur;
    }
    next[0]
}
