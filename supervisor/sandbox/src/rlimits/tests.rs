//! Unit tests of `rlimits`.

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
fn cpu_time_has_a_second_of_grace_between_sigxcpu_and_sigkill() {
    let p = prepare(&[Rlimit {
        resource: RlimitResource::Cpu,
        value: 120,
    }])
    .unwrap();
    assert_eq!(p[0].resource, libc::RLIMIT_CPU as libc::c_int);
    assert_eq!(p[0].value.rlim_cur, 120);
    assert_eq!(p[0].value.rlim_max, 120 + CPU_GRACE_SECS);
}

#[test]
fn cgroup_fallback_merges_lower_wins_and_clears_the_cgroup_limits() {
    let policy = carapace_policy::Policy::parse(crate::DEFAULT_POLICY, "default").unwrap();
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
