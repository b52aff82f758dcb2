//! Resource limits: translated from the plan before fork, applied with raw `prlimit64` in the
//! child (soft = hard).

use carapace_policy::plan::{Plan, Rlimit, RlimitResource};

/// Errors of this module (none can happen today: every plan resource maps to a kernel limit;
/// kept so the module has the same shape as the others and future resources can fail).
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("rlimit {resource}: value {value} is reserved (RLIM_INFINITY is written as no limit)")]
    Reserved { resource: &'static str, value: u64 },
}

/// One limit, ready for the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    pub resource: libc::c_int,
    pub name: &'static str,
    pub value: libc::rlimit64,
}

fn resource(r: RlimitResource) -> (libc::c_int, &'static str) {
    match r {
        RlimitResource::Nofile => (libc::RLIMIT_NOFILE as libc::c_int, "RLIMIT_NOFILE"),
        RlimitResource::Fsize => (libc::RLIMIT_FSIZE as libc::c_int, "RLIMIT_FSIZE"),
        RlimitResource::Core => (libc::RLIMIT_CORE as libc::c_int, "RLIMIT_CORE"),
        RlimitResource::Nproc => (libc::RLIMIT_NPROC as libc::c_int, "RLIMIT_NPROC"),
        RlimitResource::As => (libc::RLIMIT_AS as libc::c_int, "RLIMIT_AS"),
        RlimitResource::Stack => (libc::RLIMIT_STACK as libc::c_int, "RLIMIT_STACK"),
        RlimitResource::Cpu => (libc::RLIMIT_CPU as libc::c_int, "RLIMIT_CPU"),
        RlimitResource::Memlock => (libc::RLIMIT_MEMLOCK as libc::c_int, "RLIMIT_MEMLOCK"),
        RlimitResource::Msgqueue => (libc::RLIMIT_MSGQUEUE as libc::c_int, "RLIMIT_MSGQUEUE"),
    }
}

/// Translate the plan's limits.
pub fn prepare(limits: &[Rlimit]) -> Result<Vec<Prepared>, RlimitError> {
    limits
        .iter()
        .map(|l| {
            let (res, name) = resource(l.resource);
            if l.value == libc::RLIM64_INFINITY {
                return Err(RlimitError::Reserved {
                    resource: name,
                    value: l.value,
                });
            }
            Ok(Prepared {
                resource: res,
                name,
                value: libc::rlimit64 {
                    rlim_cur: l.value,
                    rlim_max: l.value,
                },
            })
        })
        .collect()
}

/// Rootless mode: lower each limit to the hard limit we have now (only root may raise a hard
/// limit, so asking for more would fail the run; less is stricter, never looser).
pub fn clamp_to_current(limits: &mut [Prepared]) {
    for p in limits {
        // SAFETY: all-zero is a valid rlimit64.
        let mut cur: libc::rlimit64 = unsafe { std::mem::zeroed() };
        // SAFETY: prlimit64 reading our own limit into a local.
        let r = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0 as libc::pid_t,
                p.resource,
                std::ptr::null::<libc::rlimit64>(),
                &mut cur as *mut libc::rlimit64,
            )
        };
        if r == 0 && cur.rlim_max < p.value.rlim_max {
            p.value.rlim_max = cur.rlim_max;
            p.value.rlim_cur = p.value.rlim_cur.min(cur.rlim_max);
        }
    }
}

/// What [`cgroup_fallback`] added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub resource: RlimitResource,
    pub value: u64,
    /// The cgroup limit it stands in for, in words.
    pub instead_of: String,
}

/// Rootless mode without a delegated cgroup: stand in for the plan's cgroup limits with
/// per-process rlimits, merged into `plan.rlimits` (the lower value wins), and clear the
/// cgroup limits (nothing enforces them any more). Weaker than a cgroup, see
/// docs/threat-model.md: memory = RLIMIT_AS per process (address space, not resident memory;
/// a tree of N processes may use N times it); pids = RLIMIT_NPROC, which counts the processes
/// of the sandbox's uid in its own user namespace, i.e. the sandbox's processes (Linux 5.14+);
/// cpu bandwidth = no throttling, only RLIMIT_CPU = cores x wall time seconds per process, plus
/// the wall-time kill.
pub fn cgroup_fallback(plan: &mut Plan) -> Vec<Fallback> {
    let mut added = Vec::new();
    let limits = plan.cgroup;
    if let Some(m) = limits.memory_bytes {
        added.push(Fallback {
            resource: RlimitResource::As,
            value: m,
            instead_of: format!("memory {m} bytes"),
        });
    }
    if let Some(p) = limits.pids {
        added.push(Fallback {
            resource: RlimitResource::Nproc,
            value: p,
            instead_of: format!("pids {p}"),
        });
    }
    if let (Some(c), Some(w)) = (limits.cpu_millis, plan.wall_time) {
        let secs = (u128::from(c) * w.as_millis()).div_ceil(1_000_000);
        let secs = u64::try_from(secs).unwrap_or(u64::MAX - 1).max(1);
        added.push(Fallback {
            resource: RlimitResource::Cpu,
            value: secs,
            instead_of: format!("cpu {c} millicores for {} s", w.as_secs()),
        });
    }
    for f in &added {
        match plan.rlimits.iter_mut().find(|r| r.resource == f.resource) {
            Some(r) => r.value = r.value.min(f.value),
            None => plan.rlimits.push(Rlimit {
                resource: f.resource,
                value: f.value,
            }),
        }
    }
    plan.cgroup.memory_bytes = None;
    plan.cgroup.pids = None;
    plan.cgroup.cpu_millis = None;
    added
}

/// A [`Fallback`] in words: `RLIMIT_AS=536870912`.
pub fn fallback_words(f: &Fallback) -> String {
    format!("{}={}", resource(f.resource).1, f.value)
}

/// Child: apply one limit to the calling process.
pub fn child_apply(p: &Prepared) -> Result<(), i32> {
    // SAFETY: prlimit64 on ourselves (pid 0) with a pointer to a valid rlimit64 and no old value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0 as libc::pid_t,
            p.resource,
            &p.value as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_resources_soft_equals_hard() {
        let p = prepare(&[
            Rlimit {
                resource: RlimitResource::Nofile,
                value: 256,
            },
            Rlimit {
                resource: RlimitResource::Core,
                value: 0,
            },
        ])
        .unwrap();
        assert_eq!(p[0].resource, libc::RLIMIT_NOFILE as libc::c_int);
        assert_eq!(p[0].value.rlim_cur, 256);
        assert_eq!(p[0].value.rlim_max, 256);
        assert_eq!(p[1].resource, libc::RLIMIT_CORE as libc::c_int);
        assert_eq!(p[1].value.rlim_max, 0);
    }

    #[test]
    fn cgroup_fallback_merges_lower_wins_and_clears_the_cgroup_limits() {
        let policy = carapace_policy::Policy::parse(crate::cli::DEFAULT_POLICY, "default").unwrap();
        let mut plan = policy
            .compile("tool", &carapace_policy::Target { landlock_abi: 6 })
            .unwrap();
        let cg = plan.cgroup;
        let mem = cg.memory_bytes.unwrap();
        let pids = cg.pids.unwrap();
        let cpu = cg.cpu_millis.unwrap();
        let wall = plan.wall_time.unwrap();
        // An existing, lower RLIMIT_AS stays; a higher NPROC is lowered.
        plan.rlimits.retain(|r| {
            !matches!(
                r.resource,
                RlimitResource::As | RlimitResource::Nproc | RlimitResource::Cpu
            )
        });
        plan.rlimits.push(Rlimit {
            resource: RlimitResource::As,
            value: mem / 2,
        });
        plan.rlimits.push(Rlimit {
            resource: RlimitResource::Nproc,
            value: pids * 10,
        });
        let added = cgroup_fallback(&mut plan);
        assert_eq!(added.len(), 3);
        let get = |res| {
            let v: Vec<u64> = plan
                .rlimits
                .iter()
                .filter(|r| r.resource == res)
                .map(|r| r.value)
                .collect();
            assert_eq!(v.len(), 1, "{res:?} once");
            v[0]
        };
        assert_eq!(get(RlimitResource::As), mem / 2);
        assert_eq!(get(RlimitResource::Nproc), pids);
        let secs = (u128::from(cpu) * wall.as_millis()).div_ceil(1_000_000) as u64;
        assert_eq!(get(RlimitResource::Cpu), secs);
        assert_eq!(plan.cgroup.memory_bytes, None);
        assert_eq!(plan.cgroup.pids, None);
        assert_eq!(plan.cgroup.cpu_millis, None);
        // Nothing to stand in for: nothing added.
        assert!(cgroup_fallback(&mut plan).is_empty());
    }

    #[test]
    fn clamp_never_raises_and_lowers_to_the_hard_limit() {
        let mut cur: libc::rlimit64 = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reading our own limit into a local.
        unsafe {
            libc::prlimit64(0, libc::RLIMIT_NOFILE, std::ptr::null(), &mut cur);
        }
        let mut p = prepare(&[
            Rlimit {
                resource: RlimitResource::Nofile,
                value: 7,
            },
            Rlimit {
                resource: RlimitResource::Msgqueue,
                value: 1000,
            },
        ])
        .unwrap();
        p[0].value.rlim_max = cur
            .rlim_max
            .saturating_add(1)
            .min(libc::RLIM64_INFINITY - 1);
        if cur.rlim_max == libc::RLIM64_INFINITY {
            return; // nothing above an infinite hard limit to clamp.
        }
        clamp_to_current(&mut p);
        assert_eq!(p[0].value.rlim_max, cur.rlim_max);
        assert!(p[0].value.rlim_cur <= cur.rlim_max);
        assert_eq!(p[1].value.rlim_max, 1000);
    }

    #[test]
    fn refuses_infinity_value() {
        assert!(prepare(&[Rlimit {
            resource: RlimitResource::Fsize,
            value: u64::MAX
        }])
        .is_err());
    }
}
