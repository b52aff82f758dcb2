//! The steps of a start that are not the sequence itself: loading the policy, the children's specs,
//! the first operator token, leftovers of a killed supervisor, what cgroups give us.

use super::*;

/// Load the policy a configuration names (the embedded default when it names none).
pub(super) fn load_policy(cfg: &Config) -> Result<PolicyInForce, ServiceError> {
    let (text, name): (String, String) = match cfg.policy.as_slice() {
        [] => (
            crate::embedded::DEFAULT_POLICY.to_string(),
            crate::embedded::DEFAULT_POLICY_NAME.to_string(),
        ),
        [one] => (
            std::fs::read_to_string(one).map_err(|source| ServiceError::ReadPolicy {
                path: one.clone(),
                source,
            })?,
            one.display().to_string(),
        ),
        _ => return Err(ServiceError::ManyPolicies),
    };
    let policy = Policy::parse(&text, &name)?;
    for (what, c) in cfg.children() {
        if !policy.profile_names().contains(&c.profile.as_str()) {
            return Err(ServiceError::UnknownProfile {
                what: what.to_string(),
                profile: c.profile.clone(),
                policy: name,
                profiles: policy
                    .profile_names()
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
            });
        }
    }
    let wiring = super::wiring::check(cfg, &policy);
    for w in &wiring.warnings {
        tracing::warn!("{w}");
    }
    if !wiring.errors.is_empty() {
        return Err(ServiceError::Wiring {
            policy: name,
            errors: wiring.errors,
        });
    }
    Ok(PolicyInForce {
        policy: Arc::new(policy),
        files: vec![name],
        sha256: carapace_broker::audit::sha256_hex(text.as_bytes()),
        loaded: rfc3339_utc(SystemTime::now()),
    })
}

/// A child's spec from its configuration.
pub(super) fn spec_of(c: &ChildConfig, exe_dir: &Path) -> Result<Spec, ServiceError> {
    let program = c.resolve_program(exe_dir, Path::new(config::LIBEXEC_DIR))?;
    let program = std::fs::canonicalize(&program).map_err(|source| ServiceError::Program {
        path: program.clone(),
        source,
    })?;
    Ok(Spec {
        program,
        args: c.args.clone(),
        profile: c.profile.clone(),
        workspace: c.workspace.clone(),
        restart: Restart {
            initial: c.restart.initial_delay,
            max: c.restart.max_delay,
            loop_starts: c.restart.crash_loop_restarts,
            loop_window: c.restart.crash_loop_window,
        },
        environment: c
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        settings: c.settings.clone(),
    })
}

/// The gateway never serves without a token: on a first start with none, create an operator
/// token and show it once — on the terminal when there is one, else in a 0600 file of the state
/// directory (a token must not land in the journal), the log saying where. Only its hash is
/// kept in the store.
pub(super) fn initial_token(state_root: &Path) -> Result<(), ServiceError> {
    use carapace_broker::tokens::{Scope, TokenStore};
    use std::io::{IsTerminal as _, Write as _};
    let store = TokenStore::new(state_root.join(crate::paths::TOKENS_FILE));
    let existing = store.list()?;
    if !existing.is_empty() {
        return Ok(());
    }
    let (info, token) = store.create("initial-operator", Scope::Operator)?;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "\ncarapace: no gateway token existed, so an operator token was created (id {}).\n\
             It is shown this once; only its hash is kept:\n\n    {token}\n\n\
             Use it as `Authorization: Bearer <token>`; make more with `carapace token create`.\n",
            info.id
        );
        tracing::info!(id = %info.id, "initial operator token created and shown on the terminal");
        return Ok(());
    }
    let path = state_root.join(crate::paths::INITIAL_TOKEN_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| ServiceError::Io {
            op: "create",
            path: path.clone(),
            source,
        })?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| ServiceError::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
    tracing::warn!(
        id = %info.id,
        file = %path.display(),
        "no gateway token existed: an operator token was created; it is in the file named here \
         (mode 0600): read it, then delete the file"
    );
    Ok(())
}

pub(super) fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// Create a child's workspace (0700, ours) if missing; an existing one must be a directory.
pub(super) fn ensure_dir(dir: &Path) -> Result<(), ServiceError> {
    carapace_broker::durable::ensure_dir(dir).map_err(|source| ServiceError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Kill what supervisors that were SIGKILLed left in our cgroup subtree, then remove their
/// cgroups. Only directories named by [`cgroup::unique_name`] whose supervisor pid is dead,
/// beneath our own `carapace/` directory: processes we (an earlier us) started.
pub(super) fn clean_leftovers() {
    let Ok(layout) = cgroup::Layout::cached() else {
        return;
    };
    let parents: Vec<PathBuf> = layout
        .v1
        .iter()
        .map(|h| h.own.join(cgroup::PARENT_DIR))
        .chain(layout.unified.iter().map(|u| u.join(cgroup::PARENT_DIR)))
        .collect();
    let me = std::process::id();
    let mut killed = 0usize;
    for parent in &parents {
        let Ok(rd) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let Some(owner) = name.to_str().and_then(cgroup::owner_pid) else {
                continue;
            };
            let alive = i32::try_from(owner)
                .ok()
                .filter(|p| *p > 0)
                .and_then(rustix::process::Pid::from_raw)
                .is_some_and(|p| {
                    // Signal 0 only checks for existence; EPERM means it exists too.
                    matches!(
                        rustix::process::test_kill_process(p),
                        Ok(()) | Err(rustix::io::Errno::PERM)
                    )
                });
            if owner == me || alive {
                continue;
            }
            let dir = e.path();
            if dir.join("cgroup.kill").exists() {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for p in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|p| *p > 0)
            {
                // A process in a cgroup of a dead supervisor of ours.
                if let Some(p) = rustix::process::Pid::from_raw(p) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
                killed += 1;
            }
        }
    }
    if killed > 0 {
        tracing::warn!("killed {killed} process(es) left by a previous supervisor");
        std::thread::sleep(Duration::from_millis(200));
    }
    // remove_stale skips cgroups younger than 2 s (their creator may be starting); a
    // supervisor restarted at once by systemd leaves those for its next start.
    match cgroup::remove_stale() {
        Ok(v) if !v.is_empty() => {
            tracing::info!(
                "removed {} cgroup(s) left by a previous supervisor",
                v.len()
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cleaning stale cgroups: {e}"),
    }
}

/// What cgroups give us here, in words; None when none can be used.
pub(super) fn cgroup_mode() -> (Option<String>, String) {
    match cgroup::Layout::cached() {
        Ok(l) => {
            let v1: Vec<String> = l.v1.iter().flat_map(|h| h.controllers.clone()).collect();
            let words = match (v1.is_empty(), l.unified.is_some()) {
                (false, true) => format!("hybrid: v1 {} + v2", v1.join(",")),
                (false, false) => format!("v1: {}", v1.join(",")),
                (true, true) => "v2".to_string(),
                (true, false) => return (None, "none".to_string()),
            };
            (Some(words.clone()), words)
        }
        Err(e) => (None, format!("none ({e})")),
    }
}

/// How many tool spawners to fork: `CARAPACE_TOOL_SPAWNER` when set (`0` turns them off, a
/// number from 1 to [`MAX_SPAWNERS`] sets it), else one per CPU up to [`DEFAULT_SPAWNERS_MAX`].
/// Each spawner starts one tool at a time (prepare, clone, the handshake until `execve`), so
/// with one, tools started at once queue behind each other while CPUs idle; more than the CPUs
/// gain nothing.
pub(super) fn spawner_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = cpus.clamp(1, DEFAULT_SPAWNERS_MAX);
    match std::env::var("CARAPACE_TOOL_SPAWNER") {
        Err(_) => default,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n <= MAX_SPAWNERS => n,
            _ => {
                tracing::warn!(
                    value = %v,
                    "CARAPACE_TOOL_SPAWNER is not a number from 0 to {MAX_SPAWNERS}: ignored \
                     ({default} spawner(s), one per CPU)"
                );
                default
            }
        },
    }
}

/// The most spawners started by default, whatever the CPUs.
const DEFAULT_SPAWNERS_MAX: usize = 4;
/// The most spawners `CARAPACE_TOOL_SPAWNER` may ask for.
const MAX_SPAWNERS: usize = 16;
