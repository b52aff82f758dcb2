//! cgroups for confined children: one cgroup per run, beneath the supervisor's own cgroup.
//!
//! # Why this module is written by hand
//!
//! `cgroups-rs` assumes one consistent layout (all-v1 or all-v2). The build machines run the
//! *hybrid* layout: `memory`, `pids`, `cpu`, `cpuacct` and `freezer` are v1 hierarchies mounted
//! at `/sys/fs/cgroup/<controller>/`, while `/sys/fs/cgroup/unified` is a v2 hierarchy with no
//! controllers at all (only core files such as `cgroup.kill`). Production hosts are pure v2 with
//! systemd delegation. Our own position also differs per hierarchy (on the build machines the
//! memory cgroup is `/process_api/<hash>` while `pids` is `/`). Handling that per controller, and
//! failing closed when a controller the policy needs is missing, is simpler to get right here
//! than to bend a library around.
//!
//! # Rules
//!
//! * [`Layout`] is read from `/proc/self/mountinfo` (which hierarchies are mounted where, and
//!   with which controllers) and `/proc/self/cgroup` (our own cgroup in each hierarchy).
//! * Cgroups are created only beneath our own cgroup, per hierarchy, under a `carapace/` parent:
//!   `<own>/carapace/<name>`. Processes we did not start are never moved or signalled.
//! * Each controller is taken from the v1 hierarchy it is mounted on, else from the v2 hierarchy
//!   when our v2 cgroup offers it. A v2 cgroup is always created when a v2 hierarchy is mounted,
//!   even without controllers (hybrid), so that `cgroup.kill` can kill the whole tree.
//! * Fail closed: a limit whose controller is not available is an error naming the controller
//!   and the fix; nothing is started half-limited.
//! * v2 "no internal processes": controllers can only be enabled for children of a cgroup that
//!   holds no processes. If our own cgroup holds only the supervisor itself, the supervisor moves
//!   itself into `<own>/carapace/supervisor` first (what systemd delegation expects); if it holds
//!   anything else, creation fails and asks for a delegated unit.
//!
//! Creation is split into a pure-ish *plan* (read-only inspection of the tree, see
//! [`Layout::plan`]) and its application, so the decisions are unit-tested on fake trees and the
//! kernel side by privileged tests on the real hierarchy.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use carapace_policy::plan::CgroupLimits;
use serde::Serialize;

/// Name of the directory carapace creates beneath its own cgroup in every hierarchy.
pub const PARENT_DIR: &str = "carapace";
/// Leaf the supervisor moves itself into on v2 when its own cgroup must stay process-free.
pub const SUPERVISOR_LEAF: &str = "supervisor";

/// How long `kill_all` waits for a cgroup to become empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `remove` retries `rmdir` on EBUSY.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
/// CFS period used for cpu limits, in microseconds (the kernel default).
const CFS_PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts, in microseconds.
const CFS_MIN_QUOTA_US: u64 = 1_000;
/// Largest period the kernel accepts, in microseconds.
const CFS_MAX_PERIOD_US: u64 = 1_000_000;

/// Errors of this module. I/O errors carry the operation and the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup: the policy sets a {what} limit, which needs the `{controller}` controller, but \
         it is not available ({detail}). Fix: {fix}"
    )]
    ControllerUnavailable {
        controller: &'static str,
        what: &'static str,
        detail: String,
        fix: String,
    },
    #[error(
        "cgroup: cannot enable controllers below {}: it holds processes carapace did not start \
         (pids {pids:?}) and cgroup v2 forbids controllers in a cgroup with processes. Run \
         carapace in its own delegated cgroup, e.g. `systemd-run --scope -p Delegate=yes carapace \
         ...` or a service with Delegate=yes",
        path.display()
    )]
    ForeignProcesses { path: PathBuf, pids: Vec<i32> },
    #[error("cgroup: no cgroup hierarchy is usable: {detail}. Fix: mount cgroup2 at /sys/fs/cgroup (or the v1 controllers) and run carapace in a cgroup it may write")]
    NoHierarchy { detail: String },
    #[error("cgroup: invalid cgroup name {name:?}: use 1-64 characters from [A-Za-z0-9_-], not `{SUPERVISOR_LEAF}`")]
    InvalidName { name: String },
    #[error("cgroup: invalid {what} limit {value}: {detail}")]
    InvalidLimit {
        what: &'static str,
        value: u64,
        detail: &'static str,
    },
    #[error("cgroup: cannot parse {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("cgroup: {} still has processes {pids:?} after {waited:?}", path.display())]
    NotEmpty {
        path: PathBuf,
        pids: Vec<i32>,
        waited: Duration,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

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

/// Controllers carapace uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    Cpuacct,
    Freezer,
}

impl Controller {
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// cgroup version of a hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One mounted v1 hierarchy that we are visible in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// Controllers bound to this hierarchy (e.g. `cpu`, `cpuacct` when co-mounted).
    pub controllers: Vec<String>,
    /// Our own cgroup directory in this hierarchy.
    pub own: PathBuf,
}

/// The cgroup hierarchies of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// v1 hierarchies with at least one controller, where our own cgroup is visible.
    pub v1: Vec<V1Hierarchy>,
    /// Our own cgroup directory in the v2 hierarchy, if one is mounted and we are visible in it.
    /// When the supervisor has moved itself into `<own>/carapace/supervisor`, this is `<own>`.
    pub unified: Option<PathBuf>,
    /// Hierarchies that are mounted but where our cgroup is not visible (for error messages).
    pub invisible: Vec<String>,
}

/// Controllers we know how to recognise in v1 mount options.
const KNOWN_V1: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "blkio",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

struct MountEntry {
    root: String,
    mount_point: String,
    fstype: String,
    super_opts: String,
}

/// Undo the octal escapes (`\040` etc.) of /proc/self/mountinfo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (u32::from(oct[0] - b'0') << 6)
                    | (u32::from(oct[1] - b'0') << 3)
                    | u32::from(oct[2] - b'0');
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 4 {
            continue;
        }
        out.push(MountEntry {
            root: unescape_mount(fields[3]),
            mount_point: unescape_mount(fields[4]),
            fstype: fields[sep + 1].to_string(),
            super_opts: fields[sep + 3].to_string(),
        });
    }
    out
}

/// Join a mount point (absolute) beneath `root`, and a cgroup path beneath the mount, after
/// removing the mount's own root from the cgroup path. `None` if the cgroup is not visible there.
fn own_dir(root: &Path, m: &MountEntry, cgroup_path: &str) -> Option<PathBuf> {
    let cg = cgroup_path
        .strip_suffix(" (deleted)")
        .unwrap_or(cgroup_path);
    if !cg.starts_with('/') {
        return None;
    }
    let rel = if m.root == "/" {
        cg.trim_start_matches('/')
    } else {
        let rest = cg.strip_prefix(m.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest.trim_start_matches('/')
    };
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    let mut dir = root.join(m.mount_point.trim_start_matches('/'));
    if !rel.is_empty() {
        dir.push(rel);
    }
    Some(dir)
}

impl Layout {
    /// Detect the layout of the running process.
    pub fn detect() -> Result<Layout, CgroupError> {
        let cg_path = Path::new("/proc/self/cgroup");
        let cg = fs::read_to_string(cg_path).map_err(io_err("read", cg_path))?;
        let mi_path = Path::new("/proc/self/mountinfo");
        let mi = fs::read_to_string(mi_path).map_err(io_err("read", mi_path))?;
        Layout::from_parts(Path::new("/"), &cg, &mi)
    }

    /// The layout, detected once per process. Safe to cache: mounts of cgroup hierarchies do
    /// not change under a running supervisor, and moving ourselves into
    /// `<own>/carapace/supervisor` does not change the detected base (see [`Layout::from_parts`]).
    pub fn cached() -> Result<&'static Layout, CgroupError> {
        static LAYOUT: OnceLock<Layout> = OnceLock::new();
        if let Some(l) = LAYOUT.get() {
            return Ok(l);
        }
        let l = Layout::detect()?;
        Ok(LAYOUT.get_or_init(|| l))
    }

    /// Build a layout from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`, with
    /// every mount point taken relative to `root` (`/` for the real system; a temp dir in tests).
    pub fn from_parts(
        root: &Path,
        proc_self_cgroup: &str,
        mountinfo: &str,
    ) -> Result<Layout, CgroupError> {
        // hierarchy controllers (sorted set) -> our path; "" key for v2.
        let mut own_v1: Vec<(BTreeSet<String>, String)> = Vec::new();
        let mut own_v2: Option<String> = None;
        for line in proc_self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id.parse::<u32>().is_err() || !path.starts_with('/') {
                continue;
            }
            if ctrls.is_empty() {
                own_v2 = Some(path.to_string());
            } else {
                let set: BTreeSet<String> = ctrls
                    .split(',')
                    .filter(|c| !c.starts_with("name="))
                    .map(str::to_string)
                    .collect();
                if !set.is_empty() {
                    own_v1.push((set, path.to_string()));
                }
            }
        }

        let mut layout = Layout {
            v1: Vec::new(),
            unified: None,
            invisible: Vec::new(),
        };
        let mut seen_v1: BTreeSet<BTreeSet<String>> = BTreeSet::new();
        for m in parse_mountinfo(mountinfo) {
            match m.fstype.as_str() {
                "cgroup2" => {
                    if layout.unified.is_some() {
                        continue;
                    }
                    match own_v2.as_deref().and_then(|p| own_dir(root, &m, p)) {
                        Some(mut dir) => {
                            // We may have moved ourselves into <own>/carapace/supervisor.
                            if dir.ends_with(Path::new(PARENT_DIR).join(SUPERVISOR_LEAF)) {
                                if let Some(base) = dir.parent().and_then(Path::parent) {
                                    dir = base.to_path_buf();
                                }
                            }
                            layout.unified = Some(dir);
                        }
                        None => layout
                            .invisible
                            .push(format!("cgroup2 at {}", m.mount_point)),
                    }
                }
                "cgroup" => {
                    let ctrls: BTreeSet<String> = m
                        .super_opts
                        .split(',')
                        .filter(|o| KNOWN_V1.contains(o))
                        .map(str::to_string)
                        .collect();
                    if ctrls.is_empty() || seen_v1.contains(&ctrls) {
                        continue;
                    }
                    let own = own_v1
                        .iter()
                        .find(|(set, _)| *set == ctrls)
                        .and_then(|(_, p)| own_dir(root, &m, p));
                    match own {
                        Some(own) => {
                            seen_v1.insert(ctrls.clone());
                            layout.v1.push(V1Hierarchy {
                                controllers: ctrls.into_iter().collect(),
                                own,
                            });
                        }
                        None => layout.invisible.push(format!(
                            "cgroup v1 {} at {}",
                            ctrls.into_iter().collect::<Vec<_>>().join(","),
                            m.mount_point
                        )),
                    }
                }
                _ => {}
            }
        }
        if layout.v1.is_empty() && layout.unified.is_none() {
            return Err(CgroupError::NoHierarchy {
                detail: if layout.invisible.is_empty() {
                    "no cgroup or cgroup2 filesystem is mounted".to_string()
                } else {
                    format!(
                        "our own cgroup is not visible in: {}",
                        layout.invisible.join("; ")
                    )
                },
            });
        }
        Ok(layout)
    }

    /// Our own cgroup directory in the v1 hierarchy that carries `c`.
    pub fn v1_own(&self, c: Controller) -> Option<&Path> {
        self.v1
            .iter()
            .find(|h| h.controllers.iter().any(|x| x == c.name()))
            .map(|h| h.own.as_path())
    }

    /// Decide what creating cgroup `name` with `limits` takes, reading (never writing) the tree.
    pub fn plan(&self, name: &str, limits: &CgroupLimits) -> Result<CreatePlan, CgroupError> {
        validate_name(name)?;
        let cpu_quota = limits.cpu_millis.map(cfs_quota).transpose()?;
        if let Some(m) = limits.memory_bytes {
            if m < 4096 {
                return Err(CgroupError::InvalidLimit {
                    what: "memory",
                    value: m,
                    detail: "below one page",
                });
            }
        }
        if limits.pids == Some(0) {
            return Err(CgroupError::InvalidLimit {
                what: "pids",
                value: 0,
                detail: "no process could run",
            });
        }

        // What our v2 cgroup offers.
        let v2_available: BTreeSet<String> = match &self.unified {
            Some(own) => {
                let p = own.join("cgroup.controllers");
                match fs::read_to_string(&p) {
                    Ok(t) => t.split_whitespace().map(str::to_string).collect(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
                    Err(e) => return Err(io_err("read", &p)(e)),
                }
            }
            None => BTreeSet::new(),
        };
        let place = |c: Controller| -> Option<Version> {
            if self.v1_own(c).is_some() {
                Some(Version::V1)
            } else if self.unified.is_some() && v2_available.contains(c.name()) {
                Some(Version::V2)
            } else {
                None
            }
        };
        let need = |c: Controller, what: &'static str| -> Result<Option<Version>, CgroupError> {
            match place(c) {
                Some(v) => Ok(Some(v)),
                None => Err(self.unavailable(c, what, &v2_available)),
            }
        };

        // Controllers, where they live. Memory is used for stats even without a limit.
        let memory = match limits.memory_bytes {
            Some(_) => need(Controller::Memory, "memory")?,
            None => place(Controller::Memory),
        };
        let pids = match limits.pids {
            Some(_) => need(Controller::Pids, "pids")?,
            None => None,
        };
        let cpu = match limits.cpu_millis {
            Some(_) => need(Controller::Cpu, "cpu")?,
            None => None,
        };
        // CPU usage: v2 `cpu.stat` is a core file (no controller needed) and counts exactly what
        // v1 cpuacct.usage counts, so a v1 cpuacct cgroup is only made when there is no v2 leaf.
        let cpuacct_v1 = self.unified.is_none() && self.v1_own(Controller::Cpuacct).is_some();

        let mut plan = CreatePlan {
            name: name.to_string(),
            move_self: None,
            parents: Vec::new(),
            enable: Vec::new(),
            leaves: Vec::new(),
            freezer_fallback: None,
        };

        // v1 leaves, one per hierarchy (co-mounted controllers share one).
        let mut v1_dirs: Vec<(PathBuf, Vec<Write>, Vec<Controller>)> = Vec::new();
        let mut v1_leaf = |c: Controller, writes: Vec<Write>| {
            if let Some(own) = self.v1_own(c) {
                let dir = own.join(PARENT_DIR).join(name);
                if let Some(e) = v1_dirs.iter_mut().find(|(d, _, _)| *d == dir) {
                    e.1.extend(writes);
                    e.2.push(c);
                } else {
                    v1_dirs.push((dir, writes, vec![c]));
                }
            }
        };
        if memory == Some(Version::V1) {
            let mut w = Vec::new();
            if let Some(m) = limits.memory_bytes {
                w.push(Write::required("memory.limit_in_bytes", m.to_string()));
                // Without a memsw limit the cgroup could dodge its limit into swap.
                w.push(Write::optional(
                    "memory.memsw.limit_in_bytes",
                    m.to_string(),
                ));
            }
            v1_leaf(Controller::Memory, w);
        }
        if pids == Some(Version::V1) {
            let w = limits
                .pids
                .map(|p| vec![Write::required("pids.max", p.to_string())])
                .unwrap_or_default();
            v1_leaf(Controller::Pids, w);
        }
        if cpu == Some(Version::V1) {
            let w = cpu_quota
                .map(|(quota, period)| {
                    vec![
                        Write::required("cpu.cfs_period_us", period.to_string()),
                        Write::required("cpu.cfs_quota_us", quota.to_string()),
                    ]
                })
                .unwrap_or_default();
            v1_leaf(Controller::Cpu, w);
        }
        if cpuacct_v1 {
            v1_leaf(Controller::Cpuacct, Vec::new());
        }
        for (dir, writes, controllers) in v1_dirs {
            if let Some(parent) = dir.parent() {
                plan.parents.push(parent.to_path_buf());
            }
            plan.leaves.push(LeafPlan {
                dir,
                version: Version::V1,
                controllers,
                writes,
            });
        }

        // The v2 leaf: always when a v2 hierarchy is mounted (cgroup.kill), plus v2 controllers.
        if let Some(own) = &self.unified {
            let mut controllers = Vec::new();
            let mut writes = Vec::new();
            if memory == Some(Version::V2) {
                controllers.push(Controller::Memory);
                if let Some(m) = limits.memory_bytes {
                    writes.push(Write::required("memory.max", m.to_string()));
                    writes.push(Write::optional("memory.swap.max", "0".to_string()));
                    writes.push(Write::optional("memory.oom.group", "1".to_string()));
                }
            }
            if pids == Some(Version::V2) {
                controllers.push(Controller::Pids);
                if let Some(p) = limits.pids {
                    writes.push(Write::required("pids.max", p.to_string()));
                }
            }
            if cpu == Some(Version::V2) {
                controllers.push(Controller::Cpu);
                if let Some((quota, period)) = cpu_quota {
                    writes.push(Write::required("cpu.max", format!("{quota} {period}")));
                }
            }
            let parent = own.join(PARENT_DIR);
            if !controllers.is_empty() {
                let names: Vec<&'static str> = controllers.iter().map(|c| c.name()).collect();
                let own_enabled = read_words(&own.join("cgroup.subtree_control"))?;
                let missing: Vec<&'static str> = names
                    .iter()
                    .copied()
                    .filter(|n| !own_enabled.contains(*n))
                    .collect();
                if !missing.is_empty() {
                    // Enabling needs `own` free of processes, unless it is the real root
                    // (which has no cgroup.type file and is exempt).
                    if own.join("cgroup.type").exists() {
                        let procs_path = own.join("cgroup.procs");
                        let procs = read_pids(&procs_path)?;
                        if !procs.is_empty() {
                            let me = std::process::id() as i32;
                            let foreign: Vec<i32> =
                                procs.iter().copied().filter(|p| *p != me).collect();
                            if !foreign.is_empty() {
                                return Err(CgroupError::ForeignProcesses {
                                    path: own.clone(),
                                    pids: foreign,
                                });
                            }
                            plan.move_self = Some(parent.join(SUPERVISOR_LEAF));
                        }
                    }
                    plan.enable
                        .push((own.join("cgroup.subtree_control"), missing));
                }
                let parent_enabled = read_words(&parent.join("cgroup.subtree_control"))?;
                let missing: Vec<&'static str> = names
                    .iter()
                    .copied()
                    .filter(|n| !parent_enabled.contains(*n))
                    .collect();
                if !missing.is_empty() {
                    plan.enable
                        .push((parent.join("cgroup.subtree_control"), missing));
                }
            }
            plan.parents.push(parent.clone());
            plan.leaves.push(LeafPlan {
                dir: parent.join(name),
                version: Version::V2,
                controllers,
                writes,
            });
        }
        // v1 freezer, used by kill_all only if the v2 leaf turns out to lack cgroup.kill.
        if let Some(own) = self.v1_own(Controller::Freezer) {
            plan.freezer_fallback = Some(own.join(PARENT_DIR).join(name));
        }
        if plan.leaves.is_empty() {
            return Err(CgroupError::NoHierarchy {
                detail: "no v2 hierarchy and no usable v1 controller".to_string(),
            });
        }
        plan.parents.dedup();
        Ok(plan)
    }

    fn unavailable(
        &self,
        c: Controller,
        what: &'static str,
        v2_available: &BTreeSet<String>,
    ) -> CgroupError {
        let (detail, fix) = match &self.unified {
            Some(own) if self.v1.is_empty() => (
                format!(
                    "{} lists only [{}]",
                    own.join("cgroup.controllers").display(),
                    v2_available.iter().cloned().collect::<Vec<_>>().join(" ")
                ),
                "run carapace in a delegated cgroup (systemd: Delegate=yes on its service, or \
                 `systemd-run --scope -p Delegate=yes carapace ...`), or enable the controller \
                 in the parent's cgroup.subtree_control"
                    .to_string(),
            ),
            _ => (
                format!(
                    "it is not mounted as a cgroup v1 hierarchy{}{}",
                    match &self.unified {
                        Some(own) => format!(
                            " and {} does not offer it",
                            own.join("cgroup.controllers").display()
                        ),
                        None => String::new(),
                    },
                    if self.invisible.is_empty() {
                        String::new()
                    } else {
                        format!("; not visible: {}", self.invisible.join("; "))
                    }
                ),
                format!(
                    "mount it (`mount -t cgroup -o {n} cgroup /sys/fs/cgroup/{n}`), or run on a \
                     cgroup v2 host with Delegate=yes, or remove the {what} limit from the policy",
                    n = c.name()
                ),
            ),
        };
        CgroupError::ControllerUnavailable {
            controller: c.name(),
            what,
            detail,
            fix,
        }
    }
}

/// One write into a control file of a new cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub file: &'static str,
    pub value: String,
    /// Skip silently if the file does not exist (a feature the kernel may not have).
    pub optional: bool,
}

impl Write {
    fn required(file: &'static str, value: String) -> Write {
        Write {
            file,
            value,
            optional: false,
        }
    }
    fn optional(file: &'static str, value: String) -> Write {
        Write {
            file,
            value,
            optional: true,
        }
    }
}

/// One cgroup directory to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafPlan {
    pub dir: PathBuf,
    pub version: Version,
    /// Controllers this directory is used for.
    pub controllers: Vec<Controller>,
    /// Limits to write, in order.
    pub writes: Vec<Write>,
}

/// Everything creating one cgroup takes; produced by [`Layout::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePlan {
    pub name: String,
    /// v2: move the supervisor (only its own pid) into this leaf first.
    pub move_self: Option<PathBuf>,
    /// `carapace/` parents to create if missing.
    pub parents: Vec<PathBuf>,
    /// `cgroup.subtree_control` files and the controllers to enable in them, in order.
    pub enable: Vec<(PathBuf, Vec<&'static str>)>,
    /// Leaf cgroups, v1 first then v2.
    pub leaves: Vec<LeafPlan>,
    /// v1 freezer leaf to create when the v2 leaf has no `cgroup.kill` (or there is none).
    pub freezer_fallback: Option<PathBuf>,
}

impl CreatePlan {
    /// Apply the plan. On error, whatever was created is removed again.
    pub fn apply(self) -> Result<Cgroup, CgroupError> {
        if let Some(leaf) = &self.move_self {
            if let Some(parent) = leaf.parent() {
                mkdir_exist_ok(parent)?;
            }
            mkdir_exist_ok(leaf)?;
            write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        for p in &self.parents {
            mkdir_exist_ok(p)?;
        }
        for (file, ctrls) in &self.enable {
            let v: Vec<String> = ctrls.iter().map(|c| format!("+{c}")).collect();
            write_file(file, &v.join(" "))?;
        }
        let mut cg = Cgroup {
            name: self.name,
            leaves: Vec::new(),
            removed: false,
        };
        // From here on, dropping `cg` removes what was created.
        for leaf in self.leaves {
            fs::create_dir(&leaf.dir).map_err(io_err("mkdir", &leaf.dir))?;
            cg.leaves.push(Leaf {
                dir: leaf.dir.clone(),
                version: leaf.version,
                controllers: leaf.controllers,
            });
            for w in &leaf.writes {
                let path = leaf.dir.join(w.file);
                match write_file(&path, &w.value) {
                    Ok(()) => {}
                    Err(CgroupError::Io { source, .. })
                        if w.optional && source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(dir) = self.freezer_fallback {
            let has_kill = cg
                .leaf(Version::V2, None)
                .is_some_and(|l| l.dir.join("cgroup.kill").exists());
            if !has_kill {
                if let Some(parent) = dir.parent() {
                    mkdir_exist_ok(parent)?;
                }
                fs::create_dir(&dir).map_err(io_err("mkdir", &dir))?;
                cg.leaves.push(Leaf {
                    dir,
                    version: Version::V1,
                    controllers: vec![Controller::Freezer],
                });
            }
        }
        Ok(cg)
    }
}

#[derive(Debug, Clone)]
struct Leaf {
    dir: PathBuf,
    version: Version,
    controllers: Vec<Controller>,
}

/// One cgroup (one directory per hierarchy) holding one confined run.
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    /// Created directories, in creation order.
    leaves: Vec<Leaf>,
    removed: bool,
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

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A cgroup name unique to this process and call: `<prefix>-<pid>-<counter>`.
/// `prefix` is cut to fit and stripped of characters a name cannot hold.
pub fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}-{}-{n}",
        if clean.is_empty() { "run" } else { &clean },
        std::process::id()
    )
}

/// A stale run cgroup younger than this is left alone (its creator may be a supervisor in
/// another pid namespace, whose pid means nothing here, between creating it and starting).
const STALE_MIN_AGE: Duration = Duration::from_secs(2);

/// The pid of the supervisor that created run cgroup `name` ([`unique_name`]:
/// `<prefix>-<pid>-<counter>`); `None` for any other name (e.g. [`SUPERVISOR_LEAF`]).
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    let prefix = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let prefix_ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !(prefix_ok && digits(counter) && digits(pid)) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Is process `pid` alive (in our pid namespace)? EPERM means it exists.
fn process_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Remove the run cgroups that SIGKILLed supervisors left behind, in every hierarchy: the
/// directories directly beneath our own `<own>/carapace/` whose name carries a supervisor pid
/// ([`owner_pid`]) that is not ours and not alive, that hold no process, and that are at least
/// a couple of seconds old. Nothing else is touched: not a cgroup with processes (the kernel
/// would refuse the rmdir anyway), not one with child cgroups, nothing outside `carapace/`.
/// Returns the directories removed; a hierarchy that cannot be read is skipped with a warning.
pub fn remove_stale() -> Result<Vec<PathBuf>, CgroupError> {
    let layout = Layout::cached()?;
    let mut parents: Vec<PathBuf> = layout
        .v1
        .iter()
        .map(|h| h.own.join(PARENT_DIR))
        .chain(layout.unified.iter().map(|u| u.join(PARENT_DIR)))
        .collect();
    parents.sort();
    parents.dedup();
    Ok(remove_stale_in(
        &parents,
        std::process::id(),
        process_alive,
        STALE_MIN_AGE,
        |d| fs::remove_dir(d).is_ok(),
    ))
}

/// [`remove_stale`] over the given `carapace/` directories, with the liveness test, the
/// minimum age and the removal as parameters (for tests; a real cgroup directory is removed with
/// its interface files by one rmdir, a fake one in a tempdir is not).
fn remove_stale_in(
    parents: &[PathBuf],
    me: u32,
    alive: impl Fn(u32) -> bool,
    min_age: Duration,
    mut rmdir: impl FnMut(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for parent in parents {
        let entries = match fs::read_dir(parent) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!("stale cgroups: cannot read {}: {e}", parent.display());
                continue;
            }
        };
        for entry in entries.flatten() {
            // file_type does not follow symlinks (cgroupfs has none; a plain dir may).
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            if pid == me || alive(pid) {
                continue;
            }
            let dir = entry.path();
            let old_enough = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if !old_enough {
                continue;
            }
            let procs = dir.join("cgroup.procs");
            if !read_pids(&procs).is_ok_and(|p| p.is_empty()) {
                continue;
            }
            // rmdir fails (EBUSY/ENOTEMPTY) if a process or a child cgroup appeared meanwhile.
            if rmdir(&dir) {
                removed.push(dir);
            }
        }
    }
    removed
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != SUPERVISOR_LEAF
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// (quota_us, period_us) for a bandwidth of `millis` thousandths of a CPU.
pub fn cfs_quota(millis: u64) -> Result<(u64, u64), CgroupError> {
    let invalid = |detail| CgroupError::InvalidLimit {
        what: "cpu",
        value: millis,
        detail,
    };
    if millis == 0 {
        return Err(invalid("zero CPU would never run"));
    }
    let quota = millis
        .checked_mul(CFS_PERIOD_US)
        .map(|q| q / 1000)
        .ok_or_else(|| invalid("too large"))?;
    if quota >= CFS_MIN_QUOTA_US {
        return Ok((quota, CFS_PERIOD_US));
    }
    // Small bandwidth: lengthen the period so the quota stays >= the kernel minimum of 1 ms.
    let quota = millis * CFS_MAX_PERIOD_US / 1000;
    if quota >= CFS_MIN_QUOTA_US {
        Ok((quota, CFS_MAX_PERIOD_US))
    } else {
        Err(invalid("below 1 millicore"))
    }
}

fn mkdir_exist_ok(p: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("mkdir", p)(e)),
    }
}

/// Write `value` in one write(2) to an existing control file.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Words of a file; a missing file is empty.
fn read_words(path: &Path) -> Result<BTreeSet<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
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

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file (`key value` per line).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let t = fs::read_to_string(path).ok()?;
    t.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Poll `cond` with a short backoff until it holds or `timeout` passes. Returns whether it held.
fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
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

/// Rootless mode: the v2 cgroup we may use, if our cgroups are delegated to us: a pure v2
/// layout (no v1 controller hierarchy: those are never delegated to a user) whose own cgroup
/// directory, `cgroup.procs` and `cgroup.subtree_control` we may write (e.g. systemd's
/// `user@.service` with `Delegate=yes`). Otherwise why not, in words.
pub fn rootless_delegation() -> Result<PathBuf, String> {
    let layout = Layout::cached().map_err(|e| e.to_string())?;
    delegation_of(layout, |p| {
        use std::os::unix::ffi::OsStrExt as _;
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: a valid C string; faccessat only checks permissions.
        unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
    })
}

/// [`rootless_delegation`] for `layout`, with `writable` deciding whether we may write a path.
pub fn delegation_of(layout: &Layout, writable: impl Fn(&Path) -> bool) -> Result<PathBuf, String> {
    if !layout.v1.is_empty() {
        let names: Vec<String> = layout
            .v1
            .iter()
            .flat_map(|h| h.controllers.iter().cloned())
            .collect();
        return Err(format!(
            "cgroup v1 controllers in use ({}): v1 hierarchies are not delegated to users",
            names.join(", ")
        ));
    }
    let Some(own) = &layout.unified else {
        return Err("no cgroup v2 hierarchy is mounted".to_string());
    };
    for p in [
        own.clone(),
        own.join("cgroup.procs"),
        own.join("cgroup.subtree_control"),
    ] {
        if !writable(&p) {
            return Err(format!(
                "{} is not writable by us (our cgroup is not delegated to this user)",
                p.display()
            ));
        }
    }
    Ok(own.clone())
}

/// The limits of one run: its cgroup, or (rootless mode without a usable delegated cgroup) none,
/// with the plan's cgroup limits turned into rlimits ([`for_run`]).
#[derive(Debug)]
pub struct RunLimits {
    pub cgroup: Option<Cgroup>,
    /// Rootless without a cgroup: why not, and the rlimits that stand in for the cgroup limits
    /// (already merged into the plan). Say it once on stderr / in the log:
    /// [`NO_CGROUP_LINE`].
    pub fallback: Option<(String, Vec<crate::rlimits::Fallback>)>,
}

/// What rootless mode says once when it runs without a cgroup.
pub const NO_CGROUP_LINE: &str =
    "carapace: rootless: no delegated cgroup; memory/pids/cpu limited by rlimits only";

/// The cgroup for a run named `name` (see [`unique_name`]) with the limits of `plan`, for
/// either mode. Call it BEFORE `Launch::prepare` (it may change `plan.rlimits`). As root: the
/// cgroup, or the error (fail closed). Rootless (`rootless`, i.e. not root): the cgroup when
/// one is delegated to us and usable ([`rootless_delegation`]); otherwise no cgroup, and
/// `plan`'s cgroup limits become rlimits ([`crate::rlimits::cgroup_fallback`]). Spawn and wait
/// with `limits.cgroup.as_ref()`.
pub fn for_run(
    name: &str,
    plan: &mut carapace_policy::Plan,
    rootless: bool,
) -> Result<RunLimits, CgroupError> {
    if !rootless {
        return Ok(RunLimits {
            cgroup: Some(Cgroup::create(name, &plan.cgroup)?),
            fallback: None,
        });
    }
    let why = match rootless_delegation() {
        Ok(dir) => match Cgroup::create(name, &plan.cgroup) {
            Ok(c) => {
                return Ok(RunLimits {
                    cgroup: Some(c),
                    fallback: None,
                })
            }
            Err(e) => format!("the delegated cgroup {} cannot be used: {e}", dir.display()),
        },
        Err(why) => why,
    };
    let added = crate::rlimits::cgroup_fallback(plan);
    Ok(RunLimits {
        cgroup: None,
        fallback: Some((why, added)),
    })
}

/// The ways [`Cgroup::kill_all`] empties a cgroup, in the order it tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KillPath {
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

    fn leaf(&self, v: Version, c: Option<Controller>) -> Option<&Leaf> {
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

    fn is_empty(&self) -> bool {
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
    fn kill_all_from(&self, first: KillPath) -> Result<KillPath, CgroupError> {
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

    fn signal_all(&self) -> Result<(), CgroupError> {
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

    fn wait_empty(&self) -> Result<(), CgroupError> {
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

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
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
fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::{Child, Command, Stdio};

    const HASH: &str = "2cb2d3fde3e0dceb745b2e3907963f31";

    /// /proc/self/cgroup and mountinfo of the hybrid build machines.
    fn hybrid_texts() -> (String, String) {
        let cg = format!(
            "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
             4:memory:/process_api/{HASH}\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n"
        );
        let mi = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"
        .to_string();
        (cg, mi)
    }

    const V2_MOUNT: &str =
        "25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    fn all_limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: Some(64 << 20),
            pids: Some(16),
            cpu_millis: Some(500),
        }
    }

    fn put(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    /// A fake delegated v2 cgroup `own` (relative to the mount) with the given files.
    fn fake_v2(root: &Path, own: &str, controllers: &str, procs: &str) -> PathBuf {
        let dir = root.join("sys/fs/cgroup").join(own);
        put(&dir.join("cgroup.controllers"), controllers);
        put(&dir.join("cgroup.subtree_control"), "");
        put(&dir.join("cgroup.procs"), procs);
        put(&dir.join("cgroup.type"), "domain\n");
        dir
    }

    fn writes(l: &LeafPlan) -> Vec<(&str, &str)> {
        l.writes
            .iter()
            .map(|w| (w.file, w.value.as_str()))
            .collect()
    }

    #[test]
    fn hybrid_layout_is_per_controller() {
        let (cg, mi) = hybrid_texts();
        let root = Path::new("/fake");
        let l = Layout::from_parts(root, &cg, &mi).expect("layout");
        assert_eq!(
            l.v1_own(Controller::Memory),
            Some(Path::new(&format!(
                "/fake/sys/fs/cgroup/memory/process_api/{HASH}"
            )))
        );
        assert_eq!(
            l.v1_own(Controller::Pids),
            Some(Path::new("/fake/sys/fs/cgroup/pids"))
        );
        assert_eq!(
            l.v1_own(Controller::Freezer),
            Some(Path::new("/fake/sys/fs/cgroup/freezer"))
        );
        assert_eq!(
            l.unified.as_deref(),
            Some(Path::new("/fake/sys/fs/cgroup/unified"))
        );
        // name=systemd has no controller and is ignored; 8 controller hierarchies remain.
        assert_eq!(l.v1.len(), 8);
    }

    #[test]
    fn hybrid_plan_creates_beneath_own_cgroup_in_each_hierarchy() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (cg, mi) = hybrid_texts();
        let l = Layout::from_parts(tmp.path(), &cg, &mi).expect("layout");
        let p = l.plan("run-1", &all_limits()).expect("plan");
        let mem = &p.leaves[0];
        assert_eq!(
            mem.dir,
            tmp.path().join(format!(
                "sys/fs/cgroup/memory/process_api/{HASH}/carapace/run-1"
            ))
        );
        assert_eq!(mem.version, Version::V1);
        assert_eq!(
            writes(mem),
            vec![
                ("memory.limit_in_bytes", "67108864"),
                ("memory.memsw.limit_in_bytes", "67108864")
            ]
        );
        assert!(mem.writes[1].optional && !mem.writes[0].optional);
        let pids = &p.leaves[1];
        assert_eq!(
            pids.dir,
            tmp.path().join("sys/fs/cgroup/pids/carapace/run-1")
        );
        assert_eq!(writes(pids), vec![("pids.max", "16")]);
        let cpu = &p.leaves[2];
        assert_eq!(
            writes(cpu),
            vec![
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "50000")
            ]
        );
        // The v2 mirror exists for cgroup.kill but enables nothing.
        let v2 = &p.leaves[3];
        assert_eq!(v2.version, Version::V2);
        assert_eq!(
            v2.dir,
            tmp.path().join("sys/fs/cgroup/unified/carapace/run-1")
        );
        assert!(v2.controllers.is_empty() && v2.writes.is_empty());
        assert!(p.enable.is_empty());
        assert!(p.move_self.is_none());
        // No cpuacct cgroup: the v2 leaf's cpu.stat gives the CPU time.
        assert_eq!(p.leaves.len(), 4);
        assert!(p.freezer_fallback.is_some());
        for leaf in &p.leaves {
            assert!(leaf.dir.parent().is_some_and(|d| d.ends_with(PARENT_DIR)));
            assert!(p
                .parents
                .contains(&leaf.dir.parent().expect("parent").to_path_buf()));
        }
    }

    #[test]
    fn hybrid_without_limits_creates_only_what_stats_and_kill_need() {
        let (cg, mi) = hybrid_texts();
        let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
        let p = l.plan("x", &CgroupLimits::default()).expect("plan");
        let ctrls: Vec<_> = p.leaves.iter().map(|l| l.controllers.clone()).collect();
        assert_eq!(ctrls, vec![vec![Controller::Memory], vec![]]);
        assert!(p.leaves.iter().all(|l| l.writes.is_empty()));
    }

    #[test]
    fn missing_v1_controller_fails_closed_naming_it() {
        let (cg, mi) = hybrid_texts();
        let mi: String = mi
            .lines()
            .filter(|l| !l.contains("rw,pids"))
            .map(|l| format!("{l}\n"))
            .collect();
        let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
        let e = l.plan("x", &all_limits()).expect_err("pids is not mounted");
        assert!(matches!(
            e,
            CgroupError::ControllerUnavailable {
                controller: "pids",
                ..
            }
        ));
        let msg = e.to_string();
        assert!(
            msg.contains("`pids`") && msg.contains("mount -t cgroup -o pids"),
            "{msg}"
        );
        // Without a pids limit the same layout is fine.
        let limits = CgroupLimits {
            pids: None,
            ..all_limits()
        };
        assert!(l.plan("x", &limits).is_ok());
    }

    #[test]
    fn v2_delegated_enables_controllers_and_writes_v2_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let own = fake_v2(
            tmp.path(),
            "system.slice/carapace.service",
            "cpu io memory pids",
            "",
        );
        let cg = "0::/system.slice/carapace.service\n";
        let l = Layout::from_parts(tmp.path(), cg, V2_MOUNT).expect("layout");
        assert!(l.v1.is_empty());
        assert_eq!(l.unified.as_deref(), Some(own.as_path()));
        let p = l.plan("r", &all_limits()).expect("plan");
        assert_eq!(p.leaves.len(), 1);
        let leaf = &p.leaves[0];
        assert_eq!(leaf.dir, own.join("carapace/r"));
        assert_eq!(
            writes(leaf),
            vec![
                ("memory.max", "67108864"),
                ("memory.swap.max", "0"),
                ("memory.oom.group", "1"),
                ("pids.max", "16"),
                ("cpu.max", "50000 100000")
            ]
        );
        assert_eq!(
            p.enable,
            vec![
                (
                    own.join("cgroup.subtree_control"),
                    vec!["memory", "pids", "cpu"]
                ),
                (
                    own.join("carapace/cgroup.subtree_control"),
                    vec!["memory", "pids", "cpu"]
                )
            ]
        );
        assert!(p.move_self.is_none());
        assert!(p.freezer_fallback.is_none());

        // Already enabled: nothing to enable again.
        put(&own.join("cgroup.subtree_control"), "cpu memory pids\n");
        put(
            &own.join("carapace/cgroup.subtree_control"),
            "memory pids cpu\n",
        );
        let p = l.plan("r", &all_limits()).expect("plan");
        assert!(p.enable.is_empty());
    }

    #[test]
    fn v2_missing_controller_fails_closed_with_delegate_hint() {
        let tmp = tempfile::tempdir().expect("tmp");
        fake_v2(tmp.path(), "user.slice", "cpu", "");
        let l = Layout::from_parts(tmp.path(), "0::/user.slice\n", V2_MOUNT).expect("layout");
        let e = l.plan("r", &all_limits()).expect_err("memory missing");
        let msg = e.to_string();
        assert!(matches!(
            e,
            CgroupError::ControllerUnavailable {
                controller: "memory",
                ..
            }
        ));
        assert!(
            msg.contains("Delegate=yes") && msg.contains("cgroup.controllers"),
            "{msg}"
        );
        // Only a cpu limit: fine, and memory (unavailable) is simply not used for stats.
        let limits = CgroupLimits {
            cpu_millis: Some(1000),
            ..Default::default()
        };
        let p = l.plan("r", &limits).expect("plan");
        assert_eq!(p.leaves[0].controllers, vec![Controller::Cpu]);
    }

    #[test]
    fn v2_own_cgroup_with_only_ourselves_moves_us_into_supervisor_leaf() {
        let tmp = tempfile::tempdir().expect("tmp");
        let me = std::process::id().to_string();
        let own = fake_v2(tmp.path(), "svc", "memory pids cpu", &format!("{me}\n"));
        let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
        let p = l.plan("r", &all_limits()).expect("plan");
        assert_eq!(p.move_self, Some(own.join("carapace/supervisor")));
        // After the move, /proc/self/cgroup names the supervisor leaf; the base stays `svc`.
        let l2 = Layout::from_parts(tmp.path(), "0::/svc/carapace/supervisor\n", V2_MOUNT)
            .expect("layout");
        assert_eq!(l2.unified.as_deref(), Some(own.as_path()));
    }

    #[test]
    fn v2_own_cgroup_with_foreign_processes_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let me = std::process::id();
        fake_v2(tmp.path(), "svc", "memory pids cpu", &format!("{me}\n1\n"));
        let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
        let e = l.plan("r", &all_limits()).expect_err("foreign process");
        match &e {
            CgroupError::ForeignProcesses { pids, .. } => assert_eq!(pids, &vec![1]),
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().contains("Delegate=yes"));
    }

    #[test]
    fn owner_pid_reads_unique_names_only() {
        let n = unique_name("exec");
        assert_eq!(owner_pid(&n), Some(std::process::id()));
        assert_eq!(owner_pid("t-tag-123-4"), Some(123));
        for bad in [
            "supervisor",
            "exec-12",
            "exec--3",
            "-12-3",
            "exec-0-1",
            "exec-x1-2",
            "exec-1-",
            "ex.c-1-2",
            "exec-99999999999-1",
        ] {
            assert_eq!(owner_pid(bad), None, "{bad}");
        }
    }

    /// Only empty run cgroups of dead supervisors (not ours, not alive), old enough, directly
    /// beneath `carapace/`, are removed; files, other names, busy and young ones stay.
    #[test]
    fn stale_cgroups_removed_only_when_dead_empty_and_old() {
        let tmp = tempfile::tempdir().expect("tmp");
        let parent = tmp.path().join(PARENT_DIR);
        let mk = |name: &str, procs: &str| {
            let d = parent.join(name);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("cgroup.procs"), procs).expect("write");
            d
        };
        let dead_empty = mk("exec-111-0", "");
        let dead_busy = mk("exec-112-0", "4242\n");
        let alive_empty = mk("exec-113-0", "");
        let mine = mk("exec-114-0", "");
        let other = mk("supervisor", "");
        let no_procs_file = parent.join("exec-115-0");
        fs::create_dir_all(&no_procs_file).expect("mkdir");
        fs::write(parent.join("exec-116-0"), "").expect("a file, not a dir");
        let alive = |pid: u32| pid == 113;
        let parents = [parent.clone(), tmp.path().join("missing")];
        // Too young: nothing chosen.
        let young = remove_stale_in(&parents, 114, alive, Duration::from_secs(3600), |_| true);
        assert!(young.is_empty(), "{young:?}");
        let mut tried = Vec::new();
        let removed = remove_stale_in(&parents, 114, alive, Duration::ZERO, |d| {
            tried.push(d.to_path_buf());
            true
        });
        assert_eq!(removed, vec![dead_empty.clone()]);
        assert_eq!(tried, vec![dead_empty]);
        // A failed rmdir (the kernel's EBUSY) is not reported as removed.
        let failed = remove_stale_in(&parents, 114, alive, Duration::ZERO, |_| false);
        assert!(failed.is_empty());
        for d in [&dead_busy, &alive_empty, &mine, &other, &no_procs_file] {
            assert!(d.exists(), "{} touched", d.display());
        }
    }

    #[test]
    fn v2_real_root_is_exempt_from_no_internal_processes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let own = fake_v2(tmp.path(), "", "memory pids cpu", "1\n2\n");
        fs::remove_file(own.join("cgroup.type")).expect("rm");
        let l = Layout::from_parts(tmp.path(), "0::/\n", V2_MOUNT).expect("layout");
        let p = l.plan("r", &all_limits()).expect("plan");
        assert!(p.move_self.is_none());
        assert_eq!(p.enable[0].0, own.join("cgroup.subtree_control"));
    }

    #[test]
    fn pure_v1_and_comounted_cpu_cpuacct() {
        let cg = "4:memory:/a\n3:cpu,cpuacct:/b\n2:pids:/\n1:freezer:/\n";
        let mi = "\
1 0 0:1 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
2 0 0:2 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
4 0 0:4 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
";
        let l = Layout::from_parts(Path::new("/r"), cg, mi).expect("layout");
        assert!(l.unified.is_none());
        let p = l.plan("n", &all_limits()).expect("plan");
        assert_eq!(p.leaves.len(), 3, "{p:?}");
        let cpu = &p.leaves[2];
        assert_eq!(
            cpu.dir,
            Path::new("/r/sys/fs/cgroup/cpu,cpuacct/b/carapace/n")
        );
        assert_eq!(cpu.controllers, vec![Controller::Cpu, Controller::Cpuacct]);
        assert_eq!(
            p.freezer_fallback.as_deref(),
            Some(Path::new("/r/sys/fs/cgroup/freezer/carapace/n"))
        );
    }

    #[test]
    fn mount_root_is_stripped_and_invisible_cgroups_are_refused() {
        let mi = "1 0 0:1 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = Layout::from_parts(Path::new("/r"), "0::/docker/abc/sub\n", mi).expect("layout");
        assert_eq!(
            l.unified.as_deref(),
            Some(Path::new("/r/sys/fs/cgroup/sub"))
        );
        let e = Layout::from_parts(Path::new("/r"), "0::/docker/abcdef\n", mi)
            .expect_err("not beneath the mount root");
        assert!(matches!(e, CgroupError::NoHierarchy { .. }), "{e}");
        let e = Layout::from_parts(
            Path::new("/r"),
            "0::/x/../y\n",
            "1 0 0:1 / /c rw - cgroup2 cgroup2 rw\n",
        )
        .expect_err("dot-dot");
        assert!(matches!(e, CgroupError::NoHierarchy { .. }));
        assert!(matches!(
            Layout::from_parts(
                Path::new("/r"),
                "0::/\n",
                "1 0 0:1 / / rw - ext4 /dev/sda rw\n"
            ),
            Err(CgroupError::NoHierarchy { .. })
        ));
    }

    #[test]
    fn mountinfo_escapes_and_garbage() {
        assert_eq!(unescape_mount("/a\\040b\\134"), "/a b\\");
        assert_eq!(unescape_mount("/a\\04"), "/a\\04");
        assert_eq!(unescape_mount("/a\\777"), "/a\\777");
        let l = Layout::from_parts(
            Path::new("/r"),
            "garbage\n0::/\n::\n",
            "junk\n1 0 0:1 / /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n- - -\n",
        )
        .expect("layout");
        assert_eq!(l.unified.as_deref(), Some(Path::new("/r/sys/fs/cgroup x")));
    }

    #[test]
    fn names_are_validated() {
        let (cg, mi) = hybrid_texts();
        let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
        let long = "a".repeat(65);
        for bad in [
            "",
            "a/b",
            "..",
            ".",
            "supervisor",
            "a b",
            "x\0",
            long.as_str(),
            "cgroup.procs",
        ] {
            assert!(
                matches!(
                    l.plan(bad, &all_limits()),
                    Err(CgroupError::InvalidName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let n1 = unique_name("exec/../x");
        let n2 = unique_name("exec/../x");
        assert_ne!(n1, n2);
        assert!(l.plan(&n1, &all_limits()).is_ok(), "{n1}");
        assert!(l.plan(&unique_name(""), &all_limits()).is_ok());
    }

    #[test]
    fn cpu_quota_conversion() {
        assert_eq!(cfs_quota(500).expect("q"), (50_000, 100_000));
        assert_eq!(cfs_quota(2000).expect("q"), (200_000, 100_000));
        assert_eq!(cfs_quota(10).expect("q"), (1_000, 100_000));
        assert_eq!(cfs_quota(5).expect("q"), (5_000, 1_000_000));
        assert_eq!(cfs_quota(1).expect("q"), (1_000, 1_000_000));
        assert!(cfs_quota(0).is_err());
        assert!(cfs_quota(u64::MAX).is_err());
    }

    #[test]
    fn limits_that_cannot_work_are_rejected() {
        let (cg, mi) = hybrid_texts();
        let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
        for limits in [
            CgroupLimits {
                pids: Some(0),
                ..Default::default()
            },
            CgroupLimits {
                memory_bytes: Some(100),
                ..Default::default()
            },
            CgroupLimits {
                cpu_millis: Some(0),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                l.plan("x", &limits),
                Err(CgroupError::InvalidLimit { .. })
            ));
        }
    }

    fn fake_cgroup(leaves: Vec<Leaf>) -> Cgroup {
        Cgroup {
            name: "fake".into(),
            leaves,
            removed: false,
        }
    }

    #[test]
    fn stats_from_v1_and_v2_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (m, a, u) = (
            tmp.path().join("m"),
            tmp.path().join("a"),
            tmp.path().join("u"),
        );
        put(&m.join("memory.max_usage_in_bytes"), "1234\n");
        put(
            &m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        put(&a.join("cpuacct.usage"), "999\n");
        put(&u.join("memory.peak"), "4096\n");
        put(
            &u.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 0\n",
        );
        put(
            &u.join("cpu.stat"),
            "usage_usec 7\nuser_usec 5\nsystem_usec 2\n",
        );
        let mut v1 = fake_cgroup(vec![
            Leaf {
                dir: m.clone(),
                version: Version::V1,
                controllers: vec![Controller::Memory],
            },
            Leaf {
                dir: a.clone(),
                version: Version::V1,
                controllers: vec![Controller::Cpuacct],
            },
        ]);
        assert_eq!(
            v1.stats(),
            CgroupStats {
                peak_memory_bytes: Some(1234),
                cpu_usage_ns: Some(999),
                oom_killed: true
            }
        );
        let mut v2 = fake_cgroup(vec![Leaf {
            dir: u.clone(),
            version: Version::V2,
            controllers: vec![Controller::Memory],
        }]);
        assert_eq!(
            v2.stats(),
            CgroupStats {
                peak_memory_bytes: Some(4096),
                cpu_usage_ns: Some(7000),
                oom_killed: false
            }
        );
        // Nothing to report: all None.
        let mut none = fake_cgroup(vec![Leaf {
            dir: tmp.path().join("nothing"),
            version: Version::V1,
            controllers: vec![Controller::Memory],
        }]);
        assert_eq!(none.stats(), CgroupStats::default());
        for c in [&mut v1, &mut v2, &mut none] {
            c.removed = true; // fake dirs are not cgroups; do not let Drop touch them
        }
    }

    #[test]
    fn apply_on_a_non_cgroup_tree_fails_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tmp");
        let own = fake_v2(tmp.path(), "svc", "memory pids cpu", "");
        put(&own.join("cgroup.subtree_control"), "memory pids cpu");
        put(
            &own.join("carapace/cgroup.subtree_control"),
            "memory pids cpu",
        );
        let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
        // A required limit file that is not there (not a real cgroupfs): error naming it, and
        // the directory made so far is removed again.
        let e = l
            .plan("r", &all_limits())
            .expect("plan")
            .apply()
            .expect_err("no memory.max");
        match &e {
            CgroupError::Io {
                op: "open", path, ..
            } => assert!(path.ends_with("carapace/r/memory.max")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!own.join("carapace/r").exists());
        // No limits: only mkdir; remove() takes it away again.
        let cg = l
            .plan("r2", &CgroupLimits::default())
            .expect("plan")
            .apply()
            .expect("apply");
        assert!(own.join("carapace/r2").is_dir());
        assert!(cg.add_process(1).is_err(), "no cgroup.procs in a fake tree");
        cg.remove().expect("remove");
        assert!(!own.join("carapace/r2").exists());
    }

    // ----- privileged tests on the real hierarchy -----

    #[test]
    fn rootless_delegation_needs_pure_v2_and_a_writable_own_cgroup() {
        let v2 = Layout {
            v1: vec![],
            unified: Some(PathBuf::from("/sys/fs/cgroup/user.slice/u")),
            invisible: vec![],
        };
        assert_eq!(
            delegation_of(&v2, |_| true),
            Ok(PathBuf::from("/sys/fs/cgroup/user.slice/u"))
        );
        let e = delegation_of(&v2, |p| !p.ends_with("cgroup.subtree_control")).unwrap_err();
        assert!(e.contains("cgroup.subtree_control is not writable"), "{e}");
        let hybrid = Layout {
            v1: vec![V1Hierarchy {
                controllers: vec!["memory".into()],
                own: PathBuf::from("/sys/fs/cgroup/memory"),
            }],
            ..v2.clone()
        };
        let e = delegation_of(&hybrid, |_| true).unwrap_err();
        assert!(e.contains("v1 controllers in use (memory)"), "{e}");
        let none = Layout {
            unified: None,
            ..v2
        };
        assert!(delegation_of(&none, |_| true)
            .unwrap_err()
            .contains("no cgroup v2"));
        // This machine (hybrid, see the module docs): never delegated.
        if Layout::cached().is_ok_and(|l| !l.v1.is_empty()) {
            assert!(rootless_delegation().is_err());
        }
    }

    #[test]
    fn for_run_falls_back_to_rlimits_rootless_and_creates_as_root() {
        let policy =
            carapace_policy::Policy::parse(crate::embedded::DEFAULT_POLICY, "default").unwrap();
        let compiled = policy
            .compile("tool", &carapace_policy::Target { landlock_abi: 6 })
            .unwrap();
        // Rootless on this hybrid machine: never delegated, so no cgroup and rlimits instead.
        if Layout::cached().is_ok_and(|l| !l.v1.is_empty()) {
            let mut plan = compiled.clone();
            let l = for_run(&unique_name("test"), &mut plan, true).unwrap();
            assert!(l.cgroup.is_none());
            let (why, added) = l.fallback.unwrap();
            assert!(why.contains("v1"), "{why}");
            assert_eq!(added.len(), 3);
            assert_eq!(plan.cgroup, CgroupLimits::default());
            assert!(plan
                .rlimits
                .iter()
                .any(|r| r.resource == carapace_policy::plan::RlimitResource::As));
        }
        if !privileged() {
            return;
        }
        let mut plan = compiled.clone();
        let l = for_run(&unique_name("test"), &mut plan, false).unwrap();
        assert!(l.fallback.is_none());
        assert_eq!(plan, compiled, "root mode leaves the plan alone");
        l.cgroup.unwrap().remove().unwrap();
    }

    /// True if we may run privileged tests; panics when not root unless CARAPACE_ALLOW_SKIP=1.
    fn privileged() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CARAPACE_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("skipping privileged cgroup test: not root (CARAPACE_ALLOW_SKIP=1)");
            return false;
        }
        panic!("this test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip it");
    }

    fn test_name(tag: &str) -> String {
        unique_name(&format!("t-{tag}"))
    }

    /// Start `sh -c 'read _; exec <script>'`: it waits on stdin so it can be put into the
    /// cgroup before it does anything; `go` releases it.
    fn held(script: &str) -> Child {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read _; exec {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    fn go(child: &mut Child) {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"\n").expect("release child");
    }

    fn read_limit(cg: &Cgroup, c: Controller, v1_file: &str, v2_file: &str) -> String {
        let (dir, v) = cg.controller_dir(c).expect("controller dir");
        let f = if v == Version::V1 { v1_file } else { v2_file };
        fs::read_to_string(dir.join(f))
            .expect("read limit")
            .trim()
            .to_string()
    }

    #[test]
    fn real_create_limits_kill_stats_remove() {
        if !privileged() {
            return;
        }
        let cg = Cgroup::create(&test_name("life"), &all_limits()).expect("create");
        assert_eq!(
            read_limit(
                &cg,
                Controller::Memory,
                "memory.limit_in_bytes",
                "memory.max"
            ),
            "67108864"
        );
        assert_eq!(
            read_limit(&cg, Controller::Pids, "pids.max", "pids.max"),
            "16"
        );
        let cpu = read_limit(&cg, Controller::Cpu, "cpu.cfs_quota_us", "cpu.max");
        assert!(cpu == "50000" || cpu == "50000 100000", "{cpu}");
        // Every directory is beneath our own cgroup of its hierarchy, under carapace/.
        let layout = Layout::detect().expect("layout");
        for d in cg.dirs() {
            let beneath = layout
                .v1
                .iter()
                .map(|h| h.own.as_path())
                .chain(layout.unified.as_deref());
            assert!(
                beneath
                    .into_iter()
                    .any(|o| d.parent() == Some(&o.join(PARENT_DIR))),
                "{} not beneath an own cgroup",
                d.display()
            );
            assert!(d.is_dir());
        }

        let mut child = held("sleep 30");
        let pid = child.id() as libc::pid_t;
        cg.add_process(pid).expect("add");
        assert_eq!(cg.pids().expect("pids"), vec![pid]);
        go(&mut child);
        std::thread::sleep(Duration::from_millis(50));
        cg.kill_all().expect("kill_all");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(cg.pids().expect("pids").is_empty());
        let st = cg.stats();
        assert!(st.cpu_usage_ns.is_some_and(|n| n > 0), "{st:?}");
        assert!(st.peak_memory_bytes.is_some_and(|n| n > 0), "{st:?}");
        assert!(!st.oom_killed);
        let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
        cg.remove().expect("remove");
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    #[test]
    fn real_drop_kills_and_removes() {
        if !privileged() {
            return;
        }
        let cg = Cgroup::create(&test_name("drop"), &CgroupLimits::default()).expect("create");
        let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
        let mut child = held("sleep 30");
        cg.add_process(child.id() as libc::pid_t).expect("add");
        drop(cg);
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    #[test]
    fn real_remove_of_a_busy_cgroup_fails() {
        if !privileged() {
            return;
        }
        let cg = Cgroup::create(&test_name("busy"), &CgroupLimits::default()).expect("create");
        let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
        let mut child = held("sleep 30");
        cg.add_process(child.id() as libc::pid_t).expect("add");
        let e = cg.remove().expect_err("busy cgroup removed");
        assert!(matches!(e, CgroupError::Io { op: "rmdir", .. }), "{e}");
        // The failed remove dropped the Cgroup, which killed the child and cleaned up.
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    /// In a cgroup made from `layout`, start a child that forks a grandchild, kill them all with
    /// `kill_all` starting at mechanism `first`, check that both died, the cgroup is empty and a
    /// freezer used is thawed again; returns the mechanism that emptied the cgroup.
    fn kill_tree(layout: &Layout, tag: &str, first: KillPath) -> KillPath {
        let cg = layout
            .plan(&test_name(tag), &CgroupLimits::default())
            .expect("plan")
            .apply()
            .expect("apply");
        let mut child = held("sh -c 'sleep 30 & sleep 30; wait'");
        cg.add_process(child.id() as libc::pid_t).expect("add");
        go(&mut child);
        assert!(poll(Duration::from_secs(5), || cg
            .pids()
            .map(|p| p.len())
            .unwrap_or(0)
            >= 3));
        let used = cg.kill_all_from(first).expect("kill_all");
        assert!(cg.pids().expect("pids").is_empty());
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        if let Some((d, _)) = cg.controller_dir(Controller::Freezer) {
            let state = fs::read_to_string(d.join("freezer.state")).expect("state");
            assert_eq!(state.trim(), "THAWED");
        }
        cg.remove().expect("remove");
        used
    }

    /// `kill_all`'s paths depend on the host's cgroup layout, and a test that returns early
    /// where its path is missing passes without testing anything. So none of these returns
    /// early: each either runs its path and asserts (through [`KillPath`]) that this path, not a
    /// fallback, emptied the cgroup, or panics naming what the host lacks.
    /// * `cgroup.kill` is the path of every host with a v2 hierarchy (pure v2 in production,
    ///   hybrid on the build machines); a host without one fails.
    /// * Signals are the last resort on every layout; tested everywhere.
    /// * The v1 freezer can only exist where v1 is mounted; that test is chosen by the layout
    ///   (see `real_kill_all_v1_freezer_path_per_layout`).
    #[test]
    fn real_kill_all_via_cgroup_kill() {
        if !privileged() {
            return;
        }
        let layout = Layout::detect().expect("layout");
        assert!(
            layout.unified.is_some(),
            "no cgroup v2 hierarchy visible: kill_all's cgroup.kill path cannot run here"
        );
        assert_eq!(
            kill_tree(&layout, "v2kill", KillPath::CgroupKill),
            KillPath::CgroupKill,
            "a v2 leaf without cgroup.kill (Linux < 5.14?)"
        );
    }

    /// The signal fallback, on the detected layout and, where v1 hierarchies exist, on them
    /// alone without a freezer (what a pure-v1 host without freezer has).
    #[test]
    fn real_kill_all_via_signals() {
        if !privileged() {
            return;
        }
        let layout = Layout::detect().expect("layout");
        assert_eq!(
            kill_tree(&layout, "signals", KillPath::Signals),
            KillPath::Signals
        );
        let mut v1_only = layout;
        v1_only.unified = None;
        v1_only
            .v1
            .retain(|h| !h.controllers.iter().any(|c| c == "freezer"));
        if !v1_only.v1.is_empty() {
            assert_eq!(
                kill_tree(&v1_only, "signals-v1", KillPath::CgroupKill),
                KillPath::Signals
            );
        }
    }

    /// The v1 freezer path, chosen by the detected layout (never a silent return):
    /// * a v1 freezer is mounted (hybrid build machines): with the v2 hierarchy hidden, as on a
    ///   pure-v1 host, `kill_all` must empty the cgroup through the freezer;
    /// * no v1 hierarchy at all (pure v2, production): the freezer path is unreachable, and the
    ///   test asserts exactly that — a cgroup made here has no v1 leaf and `kill_all` takes
    ///   `cgroup.kill` — which is why its name does not claim the freezer ran;
    /// * v1 hierarchies but no v1 freezer: a layout this test does not know; it fails.
    #[test]
    fn real_kill_all_v1_freezer_path_per_layout() {
        if !privileged() {
            return;
        }
        let mut layout = Layout::detect().expect("layout");
        if layout.v1.is_empty() {
            eprintln!("pure cgroup v2: asserting the v1 freezer path is unreachable");
            let cg =
                Cgroup::create(&test_name("nofreezer"), &CgroupLimits::default()).expect("create");
            assert!(cg.leaf(Version::V1, None).is_none(), "{:?}", cg.dirs());
            drop(cg);
            assert_eq!(
                kill_tree(&layout, "nofreezer", KillPath::CgroupKill),
                KillPath::CgroupKill
            );
            return;
        }
        assert!(
            layout.v1_own(Controller::Freezer).is_some(),
            "v1 hierarchies {:?} but no v1 freezer: the freezer path cannot run here",
            layout.v1
        );
        layout.unified = None;
        assert_eq!(
            kill_tree(&layout, "freezer", KillPath::CgroupKill),
            KillPath::Freezer
        );
    }

    use crate::namespaces::{CloneArgs, CLONE_INTO_CGROUP};

    #[test]
    fn real_child_born_in_cgroup_via_clone3_and_v1_self_join() {
        if !privileged() {
            return;
        }
        let cg = Cgroup::create(&test_name("born"), &all_limits()).expect("create");
        let join = cg.join_fds().expect("join fds");
        let v1 = join.v1_raw();
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        let r = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        let mut args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        if let Some(d) = &join.v2_dir {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = d.as_raw_fd() as u64;
        }
        // SAFETY: clone3 without CLONE_VM behaves like fork. The child runs only
        // async-signal-safe code (write, pause, _exit) on its private copy of memory; `v1` was
        // allocated before the clone.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            let code = match join_self_v1(&v1) {
                Ok(()) => 0u8,
                Err(_) => 1u8,
            };
            // SAFETY: write/pause/_exit are async-signal-safe; the buffer is on our stack.
            unsafe {
                libc::write(pipe[1], (&code as *const u8).cast(), 1);
                libc::pause();
                libc::_exit(0);
            }
        }
        assert!(pid > 0, "clone3: {}", io::Error::last_os_error());
        let pid = pid as libc::pid_t;
        let mut code = 9u8;
        // SAFETY: closing our copy of the write end, then reading one byte into a local.
        unsafe {
            libc::close(pipe[1]);
            assert_eq!(libc::read(pipe[0], (&mut code as *mut u8).cast(), 1), 1);
            libc::close(pipe[0]);
        }
        assert_eq!(code, 0, "join_self_v1 failed in the child");
        for d in cg.dirs() {
            let procs = read_pids(&d.join("cgroup.procs")).expect("procs");
            assert_eq!(procs, vec![pid], "{} does not hold the child", d.display());
        }
        cg.kill_all().expect("kill_all");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
        drop(join);
        cg.remove().expect("remove");
    }

    fn python() -> &'static str {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        }
    }

    fn run_python_in(
        limits: &CgroupLimits,
        tag: &str,
        code: &str,
    ) -> (std::process::Output, CgroupStats) {
        let cg = Cgroup::create(&test_name(tag), limits).expect("create");
        let mut child = held(&format!("{} -c '{code}'", python()));
        cg.add_process(child.id() as libc::pid_t).expect("add");
        go(&mut child);
        let out = child.wait_with_output().expect("wait");
        let st = cg.stats();
        cg.kill_all().expect("kill_all");
        cg.remove().expect("remove");
        (out, st)
    }

    #[test]
    fn real_memory_hog_is_oom_killed() {
        if !privileged() {
            return;
        }
        let limits = CgroupLimits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        let (out, st) = run_python_in(
            &limits,
            "oom",
            "b = bytearray(300 << 20); b[::4096] = b\"x\" * len(b[::4096])",
        );
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
        assert!(st.oom_killed, "{st:?}");
        assert!(
            st.peak_memory_bytes.is_some_and(|p| p <= 64 << 20),
            "{st:?}"
        );
        // Other direction: 16 MiB fits in 64 MiB.
        let (out, st) = run_python_in(&limits, "fits", "b = bytearray(16 << 20); print(len(b))");
        assert!(out.status.success(), "{out:?}");
        assert!(!st.oom_killed, "{st:?}");
    }

    const FORKER: &str = "
import os, sys, time
n = 0
try:
    for i in range(40):
        if os.fork() == 0:
            os.close(1)
            os.close(2)
            time.sleep(20)
            os._exit(0)
        n += 1
    print(\"ok\", n)
except OSError as e:
    print(\"fail\", e.errno, n)
sys.stdout.flush()
";

    #[test]
    fn real_pids_limit_makes_fork_fail() {
        if !privileged() {
            return;
        }
        let limited = CgroupLimits {
            pids: Some(8),
            ..Default::default()
        };
        let (out, _) = run_python_in(&limited, "pids", FORKER);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("fail 11 "),
            "fork did not fail with EAGAIN: {text:?} {out:?}"
        );
        let n: u32 = text
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("count");
        assert!((1..8).contains(&n), "{n} forks under pids.max=8");
        let free = CgroupLimits {
            pids: Some(64),
            ..Default::default()
        };
        let (out, _) = run_python_in(&free, "pids-ok", FORKER);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok 40",
            "{out:?}"
        );
    }
}
