//! Resource limits: translated from the plan before fork, applied with raw `prlimit64` in the
//! child (soft = hard).

use carapace_policy::plan::{Rlimit, RlimitResource};

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
    fn refuses_infinity_value() {
        assert!(prepare(&[Rlimit {
            resource: RlimitResource::Fsize,
            value: u64::MAX
        }])
        .is_err());
    }
}
