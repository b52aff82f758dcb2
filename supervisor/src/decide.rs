//! What the policy decides for a command line: load the policy, resolve the program, evaluate the
//! rules, compile the chosen profile. Shared by `carapace exec` and `carapace policy` (the
//! command line) and by the exec socket of `carapace run` ([`crate::exec_socket`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use carapace_policy::{Approval, Decision, ExecRequest, Plan, Policy, Target};
use carapace_sandbox::report::{EXIT_NOT_FOUND, EXIT_SETUP};
use carapace_sandbox::resolve::{self, DEFAULT_PATH};

use crate::embedded::{DEFAULT_POLICY, DEFAULT_POLICY_NAME};

/// Errors of loading a policy and deciding a command line (the commands print them).
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The policy's located errors (shown as they are, and kept as the source so that
    /// [`crate::errors::diagnostics_in`] finds them).
    #[error("{0}")]
    Policy(#[from] carapace_policy::Diagnostics),
    #[error("no program given")]
    NoProgram,
    #[error("argument {arg:?} is not valid UTF-8; policies cannot match it")]
    NotUtf8 { arg: String },
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    /// A bare name that the default PATH and the profile's PATH resolve to different programs.
    #[error(
        "{name}: resolves to different programs under the default PATH and the profile's PATH; \
         give the program's absolute path"
    )]
    Unstable { name: String },
}

impl DecideError {
    /// The exit status `carapace exec` ends with: 127 when the program was not found (as
    /// shells and `env` say it), else 126 (it could not be started).
    pub fn exit_code(&self) -> i32 {
        let not_found = match self {
            DecideError::Resolve(resolve::ResolveError::NotFound { .. }) => true,
            DecideError::Resolve(resolve::ResolveError::Canonicalize { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        };
        if not_found {
            EXIT_NOT_FOUND
        } else {
            EXIT_SETUP
        }
    }
}

/// Load and validate a policy (the embedded default when `file` is None). Rule programs are
/// resolved lazily when a request is decided ([`decide`], `Policy::evaluate_with`), not here.
pub fn load_policy(file: Option<&Path>) -> Result<Policy, DecideError> {
    let (text, name) = match file {
        None => (DEFAULT_POLICY.to_string(), DEFAULT_POLICY_NAME.to_string()),
        Some(f) => (
            std::fs::read_to_string(f).map_err(|source| DecideError::Read {
                path: f.to_path_buf(),
                source,
            })?,
            f.display().to_string(),
        ),
    };
    Ok(Policy::parse(&text, &name)?)
}

/// The outcome of deciding a request.
#[derive(Debug)]
pub struct Decided {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub decision: Decision,
    /// The compiled plan of the chosen profile (None when denied, or when compiling failed:
    /// then `compile_error` says why).
    pub plan: Option<Plan>,
    pub compile_error: Option<carapace_policy::Diagnostics>,
}

/// The PATH a plan gives its programs.
pub fn plan_path(plan: &Plan) -> Option<&str> {
    plan.env
        .set
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
}

/// Resolve the program, evaluate the policy, compile the chosen profile. A bare name is first
/// resolved with the default PATH; if the chosen plan sets another PATH under which the name
/// resolves elsewhere, the decision is made again for that program (it must then be stable).
pub fn decide(
    policy: &Policy,
    command: &[OsString],
    cwd: &Path,
    workspace: Option<&Path>,
    target: &Target,
) -> Result<Decided, DecideError> {
    decide_with(policy, command, cwd, workspace, |profile| {
        policy.compile(profile, target)
    })
}

/// [`decide`] with the chosen profile's plan from `plan_of` (a supervisor's plans compiled once
/// per policy load) instead of compiled here.
pub fn decide_with(
    policy: &Policy,
    command: &[OsString],
    cwd: &Path,
    workspace: Option<&Path>,
    mut plan_of: impl FnMut(&str) -> Result<Plan, carapace_policy::Diagnostics>,
) -> Result<Decided, DecideError> {
    let (name, rest) = command.split_first().ok_or(DecideError::NoProgram)?;
    let args = rest
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| DecideError::NotUtf8 {
                    arg: a.to_string_lossy().into_owned(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut search = DEFAULT_PATH.to_string();
    let mut last: Option<PathBuf> = None;
    for _round in 0..3 {
        let program = resolve::resolve(name, &search, cwd)?;
        if last.as_ref() == Some(&program) {
            break;
        }
        // Rule programs resolved lazily: only those that can decide this request.
        let decision = policy.evaluate_with(
            &ExecRequest {
                program: program.clone(),
                args: args.clone(),
                workspace: workspace.map(Path::to_path_buf),
            },
            |p| std::fs::canonicalize(p).ok(),
        );
        let (plan, compile_error) = match (&decision.approval, &decision.profile) {
            (Approval::Deny, _) | (_, None) => (None, None),
            (_, Some(profile)) => match plan_of(profile) {
                Ok(p) => (Some(p), None),
                Err(d) => (None, Some(d)),
            },
        };
        let next = plan
            .as_ref()
            .and_then(plan_path)
            .map(str::to_string)
            .unwrap_or_else(|| DEFAULT_PATH.to_string());
        let bare = !name.as_encoded_bytes().contains(&b'/');
        // Stable: a path, the same PATH, or the profile's own PATH resolves the name to the
        // same program (looked up only when it can differ).
        if !bare || next == search || resolve::resolve(name, &next, cwd)? == program {
            return Ok(Decided {
                program,
                args,
                decision,
                plan,
                compile_error,
            });
        }
        last = Some(program);
        search = next;
    }
    Err(DecideError::Unstable {
        name: name.to_string_lossy().into_owned(),
    })
}

pub fn rule_words(policy: &Policy, d: &Decision) -> String {
    match &d.rule {
        Some(r) => format!(
            "rule [[exec]] #{} at line {} of {} (why: {})",
            r.index + 1,
            r.line,
            policy.file(),
            r.why
        ),
        None => format!("no [[exec]] rule of {} matches", policy.file()),
    }
}

pub fn command_words(program: &Path, args: &[String]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// The default policy with a profile `alt` (the tool profile with `path` as its PATH) and
    /// `rules` before its own.
    fn policy_with(path: &str, rules: &str) -> Policy {
        let p = DEFAULT_POLICY;
        let at = p.find("\n[[exec]]").unwrap_or(p.len());
        let text = format!(
            "{}\n[profiles.alt]\nextends = \"tool\"\nwhy = \"test\"\n\
             [profiles.alt.environment]\nset = {{ PATH = \"{path}\" }}\n{rules}\n{}",
            &p[..at],
            &p[at..]
        );
        Policy::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// A directory holding an executable `true` of its own.
    fn own_true() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("true");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, std::fs::canonicalize(prog).unwrap())
    }

    fn decide_true(policy: &Policy) -> Result<Decided, DecideError> {
        let target = carapace_sandbox::landlock::target();
        decide(
            policy,
            &[OsString::from("true")],
            Path::new("/"),
            None,
            &target,
        )
    }

    #[test]
    fn a_bare_name_is_decided_again_under_the_profiles_own_path() {
        let (dir, own) = own_true();
        let path = format!("{}:/usr/bin:/bin", dir.path().display());
        let rule = |prog: &Path, profile: &str| {
            format!(
                "[[exec]]\nwhy = \"test\"\nprogram = \"{}\"\nprofile = \"{profile}\"\napproval = \"allow\"\n",
                prog.display()
            )
        };
        // /usr/bin/true runs in `alt`, whose PATH finds our own `true` first: that one is
        // decided (in `alt` as well), and it is what runs.
        let usr = std::fs::canonicalize("/usr/bin/true").unwrap();
        let p = policy_with(&path, &(rule(&usr, "alt") + &rule(&own, "alt")));
        let d = decide_true(&p).unwrap();
        assert_eq!(d.program, own);
        assert_eq!(d.plan.map(|p| p.profile), Some("alt".to_string()));
        // Without the profile's PATH in play the default PATH's program stands.
        let p = policy_with(&path, &rule(&usr, "tool"));
        assert_eq!(decide_true(&p).unwrap().program, usr);
        // Each PATH names the other's program: refused rather than guessed.
        let p = policy_with(&path, &(rule(&usr, "alt") + &rule(&own, "tool")));
        assert!(matches!(decide_true(&p), Err(DecideError::Unstable { .. })));
    }
}
