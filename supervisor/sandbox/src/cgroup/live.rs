//! A run's live cgroup: created from its plan, joined by the child, read for statistics, killed
//! as a whole (cgroup.kill, else the v1 freezer, else signals) and removed; the file helpers.

use super::*;

/// Resource usage of a cgroup, as far as the available controllers report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    /// Highest memory usage seen (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub peak_memory_bytes: Option<u64>,
    /// CPU time consumed by all processes (v1 `cpuacct.usage`, v2 `cpu.stat` usage_usec).
    pub cpu_usage_ns: Option<u64>,
    /// Whether the kernel OOM-killed a process of this cgroup.
    pub oom_killed: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Leaf {
    pub(super) dir: PathBuf,
    pub(super) version: Version,
    pub(super) controllers: Vec<Controller>,
}

/// One cgroup (one directory per hierarchy) holding one confined run.
#[derive(Debug)]
pub struct Cgroup {
    pub(super) name: String,
    /// Created directories, in creation order.
    pub(super) leaves: Vec<Leaf>,
    pub(super) removed: bool,
}

/// Descriptors that put a new child into a [`Cgroup`] as it is born, without the kernel's
/// global migration lock; see [`Cgroup::join_fds`].
#[derive(Debug)]
pub struct JoinFds {
    /// The v2 leaf directory (O_RDONLY|O_DIRECTORY|O_CLOEXEC), for `clone_args.cgroup` with
    /// `CLONE_INTO_CGROUP`.
    pub v2_dir: Option<OwnedFd>,
    /// The `tasks` files of the v1 leaves (O_WRONLY|O_CLOEXEC), for [`join_self_v1`].
    pub v1_tasks: Vec<OwnedFd>,
}

impl JoinFds {
    /// The raw v1 `tasks` fds, to hand to the child before clone.
    pub fn v1_raw(&self) -> Vec<RawFd> {
        self.v1_tasks.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Move process `pid` into the v2 leaf by writing its `cgroup.procs` (beneath `v2_dir`),
    /// for a child that could not be born there; nothing without a v2 leaf.
    pub fn add_process_v2(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        let Some(dir) = &self.v2_dir else {
            return Ok(());
        };
        let path = Path::new("cgroup.procs");
        let fd = nix::fcntl::openat(
            dir,
            path,
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err("open", path)(e.into()))?;
        nix::unistd::write(&fd, pid.to_string().as_bytes())
            .map(drop)
            .map_err(|e| io_err("write", path)(e.into()))
    }
}

/// Child side of [`Cgroup::join_fds`], between clone and exec: move the calling thread (the
/// whole child, which is single-threaded) into every v1 leaf by writing `0` to its `tasks`
/// file. Async-signal-safe: only write(2). Must run while the child is still privileged (before
/// it enters its user namespace) and before it forks. Returns the errno of the first failure.
pub fn join_self_v1(tasks: &[RawFd]) -> Result<(), i32> {
    for &fd in tasks {
        // SAFETY: write(2) of one byte from a static buffer to an fd the caller owns; no memory
        // is allocated and no lock is taken, so this is safe between clone and exec.
        let r = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if r != 1 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
    }
    Ok(())
}

pub(super) static UNIQUE: AtomicU64 = AtomicU64::new(0);

pub(super) fn mkdir_exist_ok(p: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("mkdir", p)(e)),
    }
}

/// Write `value` in one write(2) to an existing control file.
pub(super) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Words of a file; a missing file is empty.
pub(super) fn read_words(path: &Path) -> Result<BTreeSet<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

pub(super) fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    let t = fs::read_to_string(path).map_err(io_err("read", path))?;
    t.split_whitespace()
        .map(|w| {
            w.parse::<i32>().map_err(|_| CgroupError::Parse {
                path: path.to_path_buf(),
                detail: format!("not a pid: {w:?}"),
            })
        })
        .collect()
}

pub(super) fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file (`key value` per line).
pub(super) fn read_key(path: &Path, key: &str) -> Option<u64> {
    let t = fs::read_to_string(path).ok()?;
    t.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Poll `cond` with a short backoff until it holds or `timeout` passes. Returns whether it held.
pub(super) fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut nap = Duration::from_micros(50);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// Where the cgroup limits of one run are enforced ([`for_run`]).
#[derive(Debug)]
pub enum RunLimits {
    /// In the run's own cgroup.
    Cgroup(Cgroup),
    /// Rootless mode without a usable delegated cgroup: why not, and the rlimits that stand in
    /// for the cgroup limits (already merged into the plan). Say it once on stderr / in the
    /// log: [`NO_CGROUP_LINE`].
    Rlimits {
        why: NoDelegation,
        added: Vec<crate::rlimits::Fallback>,
    },
}

/// What rootless mode says once when it runs without a cgroup.
pub const NO_CGROUP_LINE: &str =
    "carapace: rootless: no delegated cgroup; memory/pids/cpu limited by rlimits only";

/// The cgroup for a run named `name` (see [`unique_name`]) with the limits of `plan`, for
/// either mode. Call it BEFORE `Launch::prepare` (it may change `plan.rlimits`). As root: the
/// cgroup, or the error (fail closed). Rootless: the cgroup when one is delegated to us and
/// usable ([`rootless_delegation`]); otherwise no cgroup, and `plan`'s cgroup limits become
/// rlimits ([`crate::rlimits::cgroup_fallback`]).
pub fn for_run(
    name: &str,
    plan: &mut carapace_policy::Plan,
    privilege: crate::Privilege,
) -> Result<RunLimits, CgroupError> {
    if privilege.is_root() {
        return Ok(RunLimits::Cgroup(Cgroup::create(name, &plan.cgroup)?));
    }
    let why = match rootless_delegation() {
        Ok(dir) => match Cgroup::create(name, &plan.cgroup) {
            Ok(c) => return Ok(RunLimits::Cgroup(c)),
            Err(source) => NoDelegation::Unusable { dir, source },
        },
        Err(why) => why,
    };
    let added = crate::rlimits::cgroup_fallback(plan);
    Ok(RunLimits::Rlimits { why, added })
}

/// The ways [`Cgroup::kill_all`] empties a cgroup, in the order it tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum KillPath {
    /// v2 `cgroup.kill` (Linux 5.14+): the kernel kills every member at once.
    CgroupKill,
    /// v1 freezer: freeze, SIGKILL each member, thaw; nothing forks in between.
    Freezer,
    /// SIGKILL each member until none is left; forks are bounded by `pids.max`.
    Signals,
}

impl Cgroup {
    /// Create cgroup `name` (unique per run, see [`unique_name`]) with `limits`, beneath our own
    /// cgroup in every hierarchy. Fails closed if a limit cannot be enforced.
    pub fn create(name: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        Layout::cached()?.plan(name, limits)?.apply()
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every directory of this cgroup (one per hierarchy used).
    pub fn dirs(&self) -> Vec<&Path> {
        self.leaves.iter().map(|l| l.dir.as_path()).collect()
    }

    /// The directory that carries controller `c`, and its version.
    pub fn controller_dir(&self, c: Controller) -> Option<(&Path, Version)> {
        self.leaves
            .iter()
            .find(|l| l.controllers.contains(&c))
            .map(|l| (l.dir.as_path(), l.version))
    }

    /// The v2 directory, if any (its `cgroup.procs` is what `clone3(CLONE_INTO_CGROUP)` needs).
    pub fn v2_dir(&self) -> Option<&Path> {
        self.leaf(Version::V2, None).map(|l| l.dir.as_path())
    }

    pub(super) fn leaf(&self, v: Version, c: Option<Controller>) -> Option<&Leaf> {
        self.leaves
            .iter()
            .find(|l| l.version == v && c.is_none_or(|c| l.controllers.contains(&c)))
    }

    /// Move process `pid` (one we started) into this cgroup, in every hierarchy.
    pub fn add_process(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        let s = pid.to_string();
        for l in &self.leaves {
            write_file(&l.dir.join("cgroup.procs"), &s)?;
        }
        Ok(())
    }

    /// Descriptors for a child to join this cgroup as it is born, instead of
    /// [`add_process`](Cgroup::add_process) after the fact.
    ///
    /// Why: writing a pid into `cgroup.procs` takes the kernel's global
    /// `cgroup_threadgroup_rwsem` for writing, and that waits for an RCU grace period — 3 to
    /// 15 ms on the build machines, the largest single cost of `carapace exec` (see
    /// docs/benchmarks.md). Both ways below avoid it:
    /// * v2 leaf: `clone3` with `CLONE_INTO_CGROUP` and `clone_args.cgroup = v2_dir`; the child
    ///   is created inside the leaf (only the read side of the lock is taken).
    /// * v1 leaves: the child calls [`join_self_v1`] with `v1_tasks`: moving only the calling
    ///   thread (pid `0` written to `tasks`) does not take the global lock.
    pub fn join_fds(&self) -> Result<JoinFds, CgroupError> {
        let mut fds = JoinFds {
            v2_dir: None,
            v1_tasks: Vec::new(),
        };
        for l in &self.leaves {
            match l.version {
                Version::V2 => {
                    let f = fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY)
                        .open(&l.dir)
                        .map_err(io_err("open", &l.dir))?;
                    fds.v2_dir = Some(f.into());
                }
                Version::V1 => {
                    let p = l.dir.join("tasks");
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(io_err("open", &p))?;
                    fds.v1_tasks.push(f.into());
                }
            }
        }
        Ok(fds)
    }

    /// Pids in the cgroup (union over hierarchies, sorted).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = BTreeSet::new();
        for l in &self.leaves {
            all.extend(read_pids(&l.dir.join("cgroup.procs"))?);
        }
        Ok(all.into_iter().collect())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pids().map(|p| p.is_empty()).unwrap_or(false)
    }

    /// Kill every process of the cgroup and wait until it is empty: v2 `cgroup.kill`; else v1
    /// freezer (freeze, SIGKILL each, thaw); else SIGKILL each until empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_from(KillPath::CgroupKill).map(drop)
    }

    /// [`kill_all`](Cgroup::kill_all) trying the mechanisms from `first` on (earlier ones are
    /// skipped); returns the one that emptied the cgroup. Tests use it to reach each path on any
    /// host.
    pub(super) fn kill_all_from(&self, first: KillPath) -> Result<KillPath, CgroupError> {
        if first <= KillPath::CgroupKill {
            if let Some(v2) = self.leaf(Version::V2, None) {
                let kill = v2.dir.join("cgroup.kill");
                if kill.exists() {
                    write_file(&kill, "1")?;
                    return self.wait_empty().map(|()| KillPath::CgroupKill);
                }
            }
        }
        if first <= KillPath::Freezer {
            if let Some(fz) = self.leaf(Version::V1, Some(Controller::Freezer)) {
                let state = fz.dir.join("freezer.state");
                write_file(&state, "FROZEN")?;
                let frozen = poll(KILL_TIMEOUT, || {
                    fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN")
                });
                let res = self.signal_all();
                write_file(&state, "THAWED")?;
                res?;
                if frozen {
                    return self.wait_empty().map(|()| KillPath::Freezer);
                }
            }
        }
        // Fallback: SIGKILL until empty; forks are bounded by pids.max.
        let start = Instant::now();
        loop {
            self.signal_all()?;
            if poll(Duration::from_millis(20), || self.is_empty()) {
                return Ok(KillPath::Signals);
            }
            if start.elapsed() > KILL_TIMEOUT {
                return self.wait_empty().map(|()| KillPath::Signals);
            }
        }
    }

    pub(super) fn signal_all(&self) -> Result<(), CgroupError> {
        for pid in self.pids()? {
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(CgroupError::Io {
                        op: "kill",
                        path: PathBuf::from(format!("/proc/{pid}")),
                        source: io::Error::from_raw_os_error(e as i32),
                    })
                }
            }
        }
        Ok(())
    }

    pub(super) fn wait_empty(&self) -> Result<(), CgroupError> {
        if poll(KILL_TIMEOUT, || self.is_empty()) {
            return Ok(());
        }
        let pids = self.pids()?;
        Err(CgroupError::NotEmpty {
            path: self
                .leaves
                .first()
                .map(|l| l.dir.clone())
                .unwrap_or_default(),
            pids,
            waited: KILL_TIMEOUT,
        })
    }

    /// Usage figures; fields are `None` when no hierarchy reports them.
    pub fn stats(&self) -> CgroupStats {
        let mut st = CgroupStats::default();
        match self.controller_dir(Controller::Memory) {
            Some((d, Version::V1)) => {
                st.peak_memory_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
                st.oom_killed =
                    read_key(&d.join("memory.oom_control"), "oom_kill").is_some_and(|n| n > 0);
            }
            Some((d, Version::V2)) => {
                st.peak_memory_bytes = read_u64(&d.join("memory.peak"));
                st.oom_killed =
                    read_key(&d.join("memory.events"), "oom_kill").is_some_and(|n| n > 0);
            }
            None => {}
        }
        st.cpu_usage_ns = match self.v2_dir() {
            Some(d) => {
                read_key(&d.join("cpu.stat"), "usage_usec").and_then(|u| u.checked_mul(1000))
            }
            None => self
                .controller_dir(Controller::Cpuacct)
                .and_then(|(d, _)| read_u64(&d.join("cpuacct.usage"))),
        };
        st
    }

    /// Remove the cgroup in every hierarchy once it is empty (rmdir, retried briefly on EBUSY).
    /// On error, `Drop` still makes a best-effort kill and removal.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_dirs()
    }

    pub(super) fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        let mut first_err = None;
        let mut kept = Vec::new();
        for l in std::mem::take(&mut self.leaves).into_iter().rev() {
            if let Err(e) = rmdir_retry(&l.dir) {
                first_err.get_or_insert(e);
                kept.push(l);
            }
        }
        kept.reverse();
        self.leaves = kept;
        match first_err {
            None => {
                self.removed = true;
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// rmdir, retried on EBUSY for a short while; a directory already gone is fine.
pub(super) fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let mut last = None;
    poll(RMDIR_TIMEOUT, || match fs::remove_dir(dir) {
        Ok(()) => {
            last = None;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            last = None;
            true
        }
        Err(e) => {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            last = Some(e);
            !busy
        }
    });
    match last {
        None => Ok(()),
        Some(e) => Err(io_err("rmdir", dir)(e)),
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.removed || self.leaves.is_empty() {
            return;
        }
        let _ = self.kill_all();
        let _ = self.remove_dirs();
    }
}
