//! `carapace run --check [--json]`: validate the configuration and the policy, compile every
//! child's profile for this kernel, and say what would run, without starting anything.
//!
//! The JSON form is one object: `ok`, `config` (`file`, `ok`, `error`, `diagnostics`), `policy`
//! (`files`, `sha256`, `ok`, `error`, `diagnostics`) and `children` (each `name`, `role`
//! (`gateway` | `channel`), `program`, `args`, `profile`, `workspace`, `ok`, `error`,
//! `diagnostics`). Diagnostics have the shape of `policy check --json`'s. The exit status says the
//! same as `ok`: 0, or 78 (EX_CONFIG).

use serde_json::{json, Value};

use carapace_policy::{Diagnostic, Target};

use super::{exe_dir, load_policy, spec_of, Config, RunArgs, EXIT_CONFIG};
use crate::errors::{diagnostics_in, error_chain, for_a_person, stderr_wants_colour};

/// What one part of the check found.
#[derive(Debug, Default)]
struct Part {
    /// Unlocated error (a file that cannot be read, a program not found).
    error: Option<String>,
    diagnostics: Vec<Diagnostic>,
    /// The same for a person, rendered (only when not ok).
    shown: Option<String>,
}

impl Part {
    fn failed(e: &(dyn std::error::Error + 'static), colour: bool) -> Part {
        let diagnostics = diagnostics_in(e).map(|d| d.0.clone()).unwrap_or_default();
        Part {
            error: diagnostics.is_empty().then(|| error_chain(e)),
            diagnostics,
            shown: Some(for_a_person(e, colour)),
        }
    }

    fn ok(&self) -> bool {
        self.shown.is_none()
    }

    fn json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "error": self.error,
            "diagnostics": self.diagnostics.iter().map(Diagnostic::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Run the check; returns the exit status.
pub(super) fn check(a: &RunArgs) -> i32 {
    let colour = !a.json && stderr_wants_colour();
    let config_file = a.config.as_ref().map(|p| p.display().to_string());
    let (cfg, shown) = match Config::load(a.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let part = Part {
                error: e.diagnostics().is_empty().then(|| e.to_string()),
                diagnostics: e.diagnostics().to_vec(),
                shown: Some(match &e {
                    super::config::ConfigErrors::Invalid(d) => d.render(colour),
                    other => other.to_string(),
                }),
            };
            if a.json {
                let mut config = part.json();
                config["file"] = json!(config_file);
                println!("{}", json!({ "ok": false, "config": config }));
            } else if let Some(s) = &part.shown {
                eprintln!("{s}");
            }
            return EXIT_CONFIG;
        }
    };
    let mut ok = true;
    let mut out = json!({ "config": { "file": shown, "ok": true } });
    let policy = match load_policy(&cfg) {
        Ok(p) => {
            out["policy"] = json!({ "ok": true, "files": p.files, "sha256": p.sha256 });
            if !a.json {
                println!("configuration: {shown}: ok");
                println!("policy: {}: ok (sha256 {})", p.files.join(", "), p.sha256);
            }
            Some(p)
        }
        Err(e) => {
            ok = false;
            let part = Part::failed(&e, colour);
            out["policy"] = part.json();
            if !a.json {
                println!("configuration: {shown}: ok");
                eprintln!("{}", part.shown.as_deref().unwrap_or_default());
            }
            None
        }
    };
    // The kernel's Landlock ABI decides whether a profile can be enforced here.
    let target = Target {
        landlock_abi: carapace_sandbox::landlock::probe_abi(),
    };
    let exe = exe_dir();
    let mut children = Vec::new();
    for (name, c) in cfg.children() {
        let role = if c.is_gateway { "gateway" } else { "channel" };
        let mut entry = json!({ "name": name, "role": role, "profile": c.profile });
        let spec = match spec_of(c, &exe) {
            Ok(s) => s,
            Err(e) => {
                ok = false;
                let part = Part::failed(&e, colour);
                if !a.json {
                    eprintln!("{name}: {}", part.shown.as_deref().unwrap_or_default());
                }
                merge(&mut entry, part.json());
                children.push(entry);
                continue;
            }
        };
        entry["program"] = json!(spec.program.display().to_string());
        entry["args"] = json!(spec.args);
        entry["workspace"] = json!(spec.workspace.display().to_string());
        let compiled = policy
            .as_ref()
            .map(|p| p.policy.compile(&spec.profile, &target));
        let part = match compiled {
            Some(Err(d)) => {
                ok = false;
                Part {
                    shown: Some(d.render(colour)),
                    diagnostics: d.0,
                    error: None,
                }
            }
            // A brokered network is made from inside the child's network namespace, which
            // only a root supervisor may enter: say so now rather than in a crash loop.
            Some(Ok(plan))
                if !plan.network.forwards().is_empty()
                    && !carapace_sandbox::Privilege::of_this_process().is_root() =>
            {
                ok = false;
                let e = carapace_sandbox::egress::EgressError::Rootless.to_string();
                Part {
                    shown: Some(e.clone()),
                    diagnostics: Vec::new(),
                    error: Some(e),
                }
            }
            _ => Part::default(),
        };
        if !a.json {
            println!(
                "{name}: {} {} (profile {}, workspace {})",
                spec.program.display(),
                spec.args.join(" "),
                spec.profile,
                spec.workspace.display()
            );
            if let Some(s) = &part.shown {
                eprintln!("{name}: profile `{}` cannot run here:\n{s}", spec.profile);
            }
        }
        merge(&mut entry, part.json());
        children.push(entry);
    }
    out["children"] = json!(children);
    out["ok"] = json!(ok);
    if a.json {
        println!("{out}");
    }
    if ok {
        0
    } else {
        EXIT_CONFIG
    }
}

/// Add `part`'s keys to the object `into`.
fn merge(into: &mut Value, part: Value) {
    if let (Some(into), Value::Object(part)) = (into.as_object_mut(), part) {
        into.extend(part);
    }
}
