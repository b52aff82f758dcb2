//! Capabilities: drop everything before exec.
//!
//! The child becomes the sandbox user with `setresuid` while holding full capabilities in its
//! user namespace. Because namespace-root (uid 0 inside) is *not mapped*, the kernel's
//! "uid 0 -> non-zero clears capabilities" rule does not fire, so the drops here are explicit
//! and mandatory: the bounding set (0..=cap_last_cap, read in the parent), the ambient set,
//! `capset` with all sets empty, and locked securebits so that nothing can bring them back.
//! Order matters: bounding-set drops and securebits need CAP_SETPCAP, so `capset(0)` is last.

use std::io;
use std::path::PathBuf;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: `{content}` is not a capability number", path.display())]
    Parse { path: PathBuf, content: String },
}

const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";

/// Highest capability number of the running kernel (parent side).
pub fn cap_last_cap() -> Result<u32, CapsError> {
    let path = PathBuf::from(CAP_LAST_CAP);
    let text = std::fs::read_to_string(&path).map_err(|source| CapsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_cap_last_cap(&text).ok_or(CapsError::Parse {
        path,
        content: text.trim().to_string(),
    })
}

fn parse_cap_last_cap(text: &str) -> Option<u32> {
    text.trim().parse::<u32>().ok().filter(|&n| n < 64)
}

/// All securebits set and locked: no root fixups, no keep-caps, no ambient raise.
pub const SECUREBITS_LOCKED: libc::c_ulong = (libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_SETUID_FIXUP
    | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc::SECBIT_KEEP_CAPS_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
    as libc::c_ulong;

// ---- child side: raw syscalls only ----

/// Child: drop every capability 0..=last from the bounding set.
pub fn child_drop_bounding(last: u32) -> Result<(), i32> {
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            return Err(crate::fds::errno());
        }
    }
    Ok(())
}

/// Child: clear the ambient set.
pub fn child_clear_ambient() -> Result<(), i32> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

/// Child: set and lock the securebits.
pub fn child_lock_securebits() -> Result<(), i32> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS_LOCKED, 0, 0, 0) };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Child: empty effective, permitted and inheritable sets.
pub fn child_capset_zero() -> Result<(), i32> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and a 2-element data array laid out as the v3 capset ABI expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_last_cap() {
        assert_eq!(parse_cap_last_cap("40\n"), Some(40));
        assert_eq!(parse_cap_last_cap("x"), None);
        assert_eq!(parse_cap_last_cap("64"), None);
        assert_eq!(parse_cap_last_cap(""), None);
    }

    #[test]
    fn reads_this_kernel() {
        let n = cap_last_cap().unwrap();
        assert!(
            n >= 37,
            "cap_last_cap {n} too small for any supported kernel"
        );
    }

    #[test]
    fn securebits_lock_everything() {
        for bit in [
            libc::SECBIT_NOROOT_LOCKED,
            libc::SECBIT_NO_SETUID_FIXUP_LOCKED,
            libc::SECBIT_KEEP_CAPS_LOCKED,
            libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
        ] {
            assert_ne!(SECUREBITS_LOCKED & bit as libc::c_ulong, 0);
        }
        assert_eq!(
            SECUREBITS_LOCKED & libc::SECBIT_KEEP_CAPS as libc::c_ulong,
            0
        );
    }
}
