//! One confined run, start to end: the one sequence `carapace exec`, the service's children
//! and the broker's tools all go through.
//!
//! [`start`] reads as the steps it takes, each in the only order that works:
//!
//! 1. **Clear what killed supervisors left** ([`cgroup::remove_stale_once`]): once per process,
//!    before its first cgroup, so a name of ours can never collide with a leftover.
//! 2. **Choose the cgroup** ([`cgroup::for_run`]): before the launch is prepared, because
//!    rootless mode without a delegated cgroup turns the plan's cgroup limits into rlimits,
//!    which the launch then carries.
//! 3. **Prepare the launch** ([`Launch::prepare`]): the run-as identity is decided here, from
//!    the [`Privilege`](crate::Privilege) in the options; everything the child applies is computed now, so that
//!    a refusal comes before any process exists.
//! 4. **Spawn** ([`Prepared::spawn`]): the child is born in the cgroup.
//!
//! [`prepare`] takes steps 1 to 3, so that a caller can say what will run before it does
//! (`carapace exec -v`); [`start`] takes 1 to 4.
//!
//! The caller then does what is its own (hands out the parent's ends of the child's
//! descriptors, registers the pid, serves the broker socket) and calls [`Started::wait`]
//! (**wait**, bounded by the wall-time limit, killing the cgroup on timeout) and
//! [`Ended::remove_cgroup`] (**remove the cgroup**, after whoever waits for the report has
//! it: the statistics are in the report already).

use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_policy::Plan;

use crate::cgroup::{self, Cgroup, CgroupError};
use crate::report::ExitReport;
use crate::rlimits::Fallback;
use crate::spawn::{ChildIo, Launch, LaunchOptions, Running, SpawnError};

/// One run, beyond the policy's plan.
#[derive(Debug)]
pub struct Run {
    /// Prefix of the run's cgroup name (`<prefix>-<pid>-<n>`, see [`cgroup::unique_name`]):
    /// `exec`, `tool`, or the service's child name.
    pub name: String,
    /// The kernel's Landlock ABI (from [`crate::landlock::target`]).
    pub landlock_abi: u8,
    pub options: LaunchOptions,
}

/// Where the run's cgroup limits are enforced.
#[derive(Debug)]
pub enum Limits {
    /// In the run's own cgroup (as root; rootless, beneath a delegated cgroup).
    Cgroup { name: String },
    /// Rootless without a usable delegated cgroup: why not, and the rlimits that stand in for
    /// the cgroup limits (see [`cgroup::NO_CGROUP_LINE`]).
    Rlimits {
        why: cgroup::NoDelegation,
        added: Vec<Fallback>,
    },
}

/// How long each step took, for `carapace exec -v` and the benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Stale cleanup (the first run of a process) and cgroup creation.
    pub cgroup: Duration,
    /// [`Launch::prepare`].
    pub prepare: Duration,
    /// clone .. execve.
    pub start: Duration,
    /// execve .. reaped ([`Started::wait`]).
    pub run: Duration,
}

/// A started run: its program runs, confined, in its cgroup.
#[derive(Debug)]
pub struct Started {
    /// None when the spawner process prepared it (see [`crate::spawner`]).
    launch: Option<Launch>,
    wall_time: Option<Duration>,
    running: Running,
    cgroup: Option<Arc<Cgroup>>,
    limits: Limits,
    timings: Timings,
}

/// A run whose program has ended (or could not be waited for); its cgroup is still there
/// until [`Ended::remove_cgroup`] (or drop, which kills what is left in it and removes it).
#[derive(Debug)]
pub struct Ended {
    pub report: Result<ExitReport, SpawnError>,
    cgroup: Option<Arc<Cgroup>>,
    pub timings: Timings,
}

/// A run ready to spawn: its cgroup chosen (and created), its launch prepared.
#[derive(Debug)]
pub struct Prepared {
    launch: Launch,
    cgroup: Option<Arc<Cgroup>>,
    limits: Limits,
    timings: Timings,
}

/// Steps 1 to 3 (see the module docs): clear stale cgroups, choose the cgroup, prepare the
/// launch. On an error nothing is left behind (a cgroup already created is removed when
/// dropped).
pub fn prepare(mut plan: Plan, run: &Run) -> Result<Prepared, SpawnError> {
    let t0 = Instant::now();
    let (cgroup, limits) = choose_cgroup(run, &mut plan)?;
    let chosen = t0.elapsed();
    let mut prepared = prepare_chosen(plan, run, cgroup, limits)?;
    prepared.timings.cgroup = chosen;
    Ok(prepared)
}

/// [`prepare`] with step 2 already done: `premade` is an empty cgroup the caller made earlier
/// (with [`Cgroup::create`], beneath ours, never used by any process) with exactly `plan`'s
/// cgroup limits. The broker makes one per tool profile ahead, so that a tool's start does not
/// wait for the cgroup's directories and limit writes.
pub fn prepare_in(plan: Plan, run: &Run, premade: Cgroup) -> Result<Prepared, SpawnError> {
    let t = Instant::now();
    let launch = Launch::prepare(&plan, &run.options, run.landlock_abi)?;
    let name = premade.name().to_string();
    Ok(Prepared {
        launch,
        cgroup: Some(Arc::new(premade)),
        limits: Limits::Cgroup { name },
        timings: Timings {
            prepare: t.elapsed(),
            ..Timings::default()
        },
    })
}

/// [`prepare_in`], then [`Prepared::spawn`].
pub fn start_in(
    plan: Plan,
    run: &Run,
    premade: Cgroup,
    io: ChildIo<'_>,
) -> Result<Started, SpawnError> {
    prepare_in(plan, run, premade)?.spawn(io)
}

/// [`prepare`], then [`Prepared::spawn`]: steps 1 to 4 for a caller with nothing to say in
/// between.
pub fn start(plan: Plan, run: &Run, io: ChildIo<'_>) -> Result<Started, SpawnError> {
    prepare(plan, run)?.spawn(io)
}

impl Prepared {
    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Step 4: start the program in the run's cgroup, with `io` placed in the child.
    pub fn spawn(self, io: ChildIo<'_>) -> Result<Started, SpawnError> {
        let t = Instant::now();
        let running = self.launch.spawn_with(self.cgroup.as_deref(), io)?;
        let mut timings = self.timings;
        timings.start = t.elapsed();
        Ok(Started {
            wall_time: self.launch.wall_time(),
            launch: Some(self.launch),
            running,
            cgroup: self.cgroup,
            limits: self.limits,
            timings,
        })
    }
}

/// Step 3 after steps 1 and 2 were taken by the caller (a start through the spawner that
/// found it gone).
pub(crate) fn prepare_chosen(
    plan: Plan,
    run: &Run,
    cgroup: Option<Arc<Cgroup>>,
    limits: Limits,
) -> Result<Prepared, SpawnError> {
    let t = Instant::now();
    let launch = Launch::prepare(&plan, &run.options, run.landlock_abi)?;
    Ok(Prepared {
        launch,
        cgroup,
        limits,
        timings: Timings {
            prepare: t.elapsed(),
            ..Timings::default()
        },
    })
}

/// Steps 1 and 2: the cgroup where this process's privilege allows one, else the cgroup
/// limits as rlimits in `plan`.
pub(crate) fn choose_cgroup(
    run: &Run,
    plan: &mut Plan,
) -> Result<(Option<Arc<Cgroup>>, Limits), SpawnError> {
    let privilege = run.options.privilege;
    if cgroup::usable(privilege) {
        match cgroup::remove_stale_once() {
            Some(Ok(gone)) => {
                for d in gone {
                    tracing::info!("removed the stale cgroup {}", d.display());
                }
            }
            Some(Err(e)) => tracing::warn!("looking for stale cgroups: {e}"),
            None => {}
        }
    }
    match cgroup::for_run(&cgroup::unique_name(&run.name), plan, privilege)? {
        cgroup::RunLimits::Cgroup(c) => {
            let name = c.name().to_string();
            Ok((Some(Arc::new(c)), Limits::Cgroup { name }))
        }
        cgroup::RunLimits::Rlimits { why, added } => Ok((None, Limits::Rlimits { why, added })),
    }
}

impl Started {
    /// Host pid of the sandbox's init.
    pub fn pid(&self) -> libc::pid_t {
        self.running.pid()
    }

    /// The prepared launch; None when the spawner process prepared it.
    pub fn launch(&self) -> Option<&Launch> {
        self.launch.as_ref()
    }

    /// A program started by the spawner process (see [`crate::spawner`]).
    pub(crate) fn from_spawner(
        running: Running,
        wall_time: Option<Duration>,
        cgroup: Option<Arc<Cgroup>>,
        limits: Limits,
        timings: Timings,
    ) -> Started {
        Started {
            launch: None,
            wall_time,
            running,
            cgroup,
            limits,
            timings,
        }
    }

    /// The run's cgroup, shared with whoever must reach its processes while it runs (the
    /// service's stop).
    pub fn cgroup(&self) -> Option<&Arc<Cgroup>> {
        self.cgroup.as_ref()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// See [`Running::take_forward`].
    pub fn take_forward(&mut self) -> Vec<crate::egress::Listener> {
        self.running.take_forward()
    }

    /// Step 5: wait for the program, killing the whole tree when the wall-time limit runs out.
    pub fn wait(self) -> Ended {
        let t = Instant::now();
        let report = self.running.wait(self.wall_time, self.cgroup.as_deref());
        let mut timings = self.timings;
        timings.run = t.elapsed();
        Ended {
            report,
            cgroup: self.cgroup,
            timings,
        }
    }
}

/// Why a run's cgroup was not removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("its cgroup {0} is still in use; left for its last user to remove")]
    InUse(String),
}

impl Ended {
    /// Step 6: remove the run's cgroup. Where someone still holds it (the service's stop, at
    /// that very moment), the last holder's drop removes it.
    pub fn remove_cgroup(&mut self) -> Result<(), RemoveError> {
        match self.cgroup.take().map(Arc::try_unwrap) {
            None => Ok(()),
            Some(Ok(cg)) => Ok(cg.remove()?),
            Some(Err(shared)) => Err(RemoveError::InUse(shared.name().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::namespaces::{own_ids, RunAs, AUTO_BASE};
    use crate::program::OpenedProgram;
    use crate::Privilege;

    fn tool_plan() -> Plan {
        carapace_policy::Policy::parse(crate::DEFAULT_POLICY, "default")
            .unwrap()
            .compile("tool", &crate::landlock::target())
            .unwrap()
    }

    /// `/bin/true` in the default tool profile, with `ws` as its workspace.
    fn true_run(privilege: Privilege, ws: &Path) -> Run {
        let program = std::fs::canonicalize("/bin/true").unwrap();
        Run {
            name: "t-run".to_string(),
            landlock_abi: crate::landlock::probe_abi(),
            options: LaunchOptions {
                program: Arc::new(OpenedProgram::open(&program).unwrap()),
                argv0: "/bin/true".into(),
                args: Vec::new(),
                workspace: Some(ws.to_path_buf()),
                privilege,
                run_as: RunAs::Auto,
                env: Vec::new(),
                broker: false,
                listener: false,
                supervisor_env: Vec::new(),
            },
        }
    }

    #[test]
    fn a_root_run_has_a_cgroup_of_its_own_which_goes_with_its_last_holder() {
        if !crate::privileged("run") {
            return;
        }
        let ws = tempfile::tempdir().unwrap();
        let run = true_run(Privilege::Root, ws.path());
        let started = start(tool_plan(), &run, ChildIo::default()).unwrap();
        let Limits::Cgroup { name } = started.limits() else {
            panic!("a root run without a cgroup: {:?}", started.limits());
        };
        let name = name.clone();
        // A per-run identity, never root.
        assert!(started.launch().unwrap().host_ids().uid >= AUTO_BASE);
        let held = started.cgroup().cloned().expect("the run's cgroup");
        assert_eq!(held.name(), name);
        let dirs: Vec<PathBuf> = held.dirs().iter().map(|d| d.to_path_buf()).collect();
        assert!(
            !dirs.is_empty() && dirs.iter().all(|d| d.is_dir()),
            "{dirs:?}"
        );
        let mut ended = started.wait();
        assert_eq!(ended.report.as_ref().unwrap().exit_code(), 0);
        // Someone else still holds the cgroup (the service's stop): it is left to them ...
        match ended.remove_cgroup() {
            Err(RemoveError::InUse(n)) => assert_eq!(n, name),
            other => panic!("expected InUse, got {other:?}"),
        }
        assert!(dirs.iter().all(|d| d.is_dir()), "removed under its holder");
        // ... and removed when they let go.
        drop(held);
        assert!(dirs.iter().all(|d| !d.exists()), "left behind: {dirs:?}");
        // With no other holder, removing it is immediate.
        let started = start(tool_plan(), &run, ChildIo::default()).unwrap();
        let dirs: Vec<PathBuf> = started
            .cgroup()
            .map(|c| c.dirs().iter().map(|d| d.to_path_buf()).collect())
            .unwrap_or_default();
        let mut ended = started.wait();
        ended.remove_cgroup().unwrap();
        assert!(!dirs.is_empty() && dirs.iter().all(|d| !d.exists()));
    }

    /// The helper process that carried the workspace's idmapping is reaped once the program
    /// has started, not left a zombie for as long as the run lasts.
    #[test]
    fn a_started_root_run_leaves_no_zombie_helper() {
        if !crate::privileged("run") {
            return;
        }
        let ws = tempfile::tempdir().unwrap();
        let run = true_run(Privilege::Root, ws.path());
        let prepared = prepare(tool_plan(), &run).unwrap();
        let helper = prepared
            .launch()
            .workspace_helper_pid()
            .expect("an idmapped workspace has a helper");
        let started = prepared.spawn(ChildIo::default()).unwrap();
        assert_eq!(started.launch().unwrap().workspace_helper_pid(), None);
        assert!(
            !Path::new(&format!("/proc/{helper}")).exists(),
            "the helper {helper} is still there (a zombie) while the run lasts"
        );
        let mut ended = started.wait();
        assert_eq!(ended.report.as_ref().unwrap().exit_code(), 0);
        ended.remove_cgroup().unwrap();
    }

    #[test]
    fn rootless_uses_a_delegated_cgroup_or_else_rlimits_and_says_why() {
        // The choice is made from the Privilege value, not from the uid running the test.
        let ws = tempfile::tempdir().unwrap();
        let run = true_run(Privilege::Rootless(own_ids()), ws.path());
        let mut plan = tool_plan();
        let (cg, limits) = choose_cgroup(&run, &mut plan).unwrap();
        match (cgroup::rootless_delegation(), limits) {
            (Ok(_), Limits::Cgroup { name }) => {
                assert_eq!(cg.map(|c| c.name().to_string()), Some(name));
                assert_eq!(plan, tool_plan(), "a cgroup leaves the plan alone");
            }
            (Err(not), Limits::Rlimits { why, added }) => {
                assert!(cg.is_none());
                assert_eq!(why.to_string(), not.to_string());
                if cgroup::Layout::cached().is_ok_and(|l| !l.v1.is_empty()) {
                    // Hosts with v1 controllers never delegate them to a user.
                    assert!(matches!(why, cgroup::NoDelegation::V1InUse { .. }), "{why}");
                }
                assert!(!added.is_empty());
                assert_eq!(plan.cgroup, carapace_policy::plan::CgroupLimits::default());
            }
            (delegation, limits) => panic!("delegation {delegation:?} but {limits:?}"),
        }
    }
}
