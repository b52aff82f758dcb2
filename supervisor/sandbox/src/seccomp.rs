//! seccomp: install the plan's compiled BPF program, last, right before `execve`.
//!
//! The policy crate already compiled the filter (architecture and x32 guard first, then a binary
//! search on the syscall number) into `sock_filter` instructions, so this module only converts
//! and installs it with the raw `seccomp(SECCOMP_SET_MODE_FILTER)` syscall: the bytes are ready
//! and the child must not allocate.
//! `no_new_privs` is set earlier in the child sequence, which is what allows an unprivileged
//! process to install a filter.
//!
//! There is exactly one filter: the plan's. The set-id guard (no S_ISUID/S_ISGID through
//! `chmod`/`open`/`mknod`... and ENOSYS for `openat2`, because files the sandbox writes to the
//! idmapped workspace land owned by the workspace's owner) used to be a second filter installed
//! here; it is now compiled into every plan by the policy crate (`SeccompPlan::setid_guard`), so
//! `explain` shows it and the kernel converts one program instead of two.

use carapace_policy::plan::BpfInsn;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: the plan's filter is empty; refusing to run without one")]
    Empty,
    #[error("seccomp: the plan's filter has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
    #[error("seccomp: building the sandbox init's filter: {0}")]
    InitFilter(#[source] carapace_policy::seccomp::SeccompCompileError),
}

const BPF_MAXINSNS: usize = 4096;

/// The filter, ready for the child.
#[derive(Debug, Clone)]
pub struct Prepared {
    insns: Vec<libc::sock_filter>,
}

impl Prepared {
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }
}

/// Convert the plan's program.
pub fn prepare(program: &[BpfInsn]) -> Result<Prepared, SeccompError> {
    if program.is_empty() {
        return Err(SeccompError::Empty);
    }
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(Prepared {
        insns: program
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect(),
    })
}

/// Child: install the filter. `no_new_privs` must already be set.
pub fn child_install(p: &Prepared) -> Result<(), i32> {
    let prog = libc::sock_fprog {
        // Cannot truncate: prepare() bounded the length by 4096.
        len: p.insns.len() as libc::c_ushort,
        filter: p.insns.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `p.insns`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            0 as libc::c_ulong,
            &prog as *const libc::sock_fprog,
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
    fn converts_and_bounds() {
        assert!(matches!(prepare(&[]), Err(SeccompError::Empty)));
        let ret_allow = BpfInsn {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        };
        let p = prepare(&[ret_allow]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p.insns[0].k, 0x7fff_0000);
        assert!(matches!(
            prepare(&vec![ret_allow; 4097]),
            Err(SeccompError::TooLong(4097))
        ));
    }
}
