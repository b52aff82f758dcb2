//! A run's cgroups as a plan: the leaves to create and the files to write in them, decided
//! before anything is touched (unit-tested on fake trees); CPU limits as CFS quota and period.

use super::*;

/// One write into a control file of a new cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub file: &'static str,
    pub value: String,
    /// Skip silently if the file does not exist (a feature the kernel may not have).
    pub optional: bool,
}

impl Write {
    pub(super) fn required(file: &'static str, value: String) -> Write {
        Write {
            file,
            value,
            optional: false,
        }
    }
    pub(super) fn optional(file: &'static str, value: String) -> Write {
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
    /// v2: move the supervisor (its own pid and its [companions](super::add_companion)) into
    /// this leaf first.
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
            // Its companions follow it (one that has exited meanwhile is no longer there).
            for pid in super::companions() {
                match write_file(&leaf.join("cgroup.procs"), &pid.to_string()) {
                    Err(CgroupError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ESRCH) => {}
                    other => other?,
                }
            }
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
