//! The cgroup layout of this host as seen from this process: which hierarchies are mounted
//! where (v1 controllers, v2) and our own cgroup in each, from `/proc/self/mountinfo` and
//! `/proc/self/cgroup`; and the read-only planning of a run's cgroups on it ([`Layout::plan`]).

use super::*;

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
pub(super) const KNOWN_V1: &[&str] = &[
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

pub(super) struct MountEntry {
    pub(super) root: String,
    pub(super) mount_point: String,
    pub(super) fstype: String,
    pub(super) super_opts: String,
}

/// Undo the octal escapes (`\040` etc.) of /proc/self/mountinfo.
pub(super) fn unescape_mount(s: &str) -> String {
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

pub(super) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
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
pub(super) fn own_dir(root: &Path, m: &MountEntry, cgroup_path: &str) -> Option<PathBuf> {
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
                            let ours = super::companions();
                            let foreign: Vec<i32> = procs
                                .iter()
                                .copied()
                                .filter(|p| *p != me && !ours.contains(p))
                                .collect();
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

    pub(super) fn unavailable(
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
