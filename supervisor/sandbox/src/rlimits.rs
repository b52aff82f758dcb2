//! Resource limits: translated from the plan before fork, applied with raw `prlimit64` in the
//! child (soft = hard, except the CPU time: see [`CPU_GRACE_SECS`]).

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

/// RLIMIT_CPU's hard limit lies this many CPU seconds above the soft one: at the soft limit the
/// kernel sends SIGXCPU (a program may save its work and exit; by default it ends, and the
/// report says why), at the hard limit SIGKILL. With soft = hard there would only be SIGKILL,
/// which reads like any other kill.
pub const CPU_GRACE_SECS: u64 = 1;

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
                    rlim_max: if l.resource == RlimitResource::Cpu {
                        l.value.saturating_add(CPU_GRACE_SECS)
                    } else {
                        l.value
                    },
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
mod tests;
