//! Rootless mode: where, if anywhere, a cgroup is delegated to this user and usable.

use super::*;

/// Why no cgroup is delegated to us ([`rootless_delegation`]).
#[derive(Debug, thiserror::Error)]
pub enum NoDelegation {
    /// The cgroup layout could not be read.
    #[error(transparent)]
    Layout(#[from] CgroupError),
    /// v1 controller hierarchies are mounted: those are never delegated to a user.
    #[error(
        "cgroup v1 controllers in use ({}): v1 hierarchies are not delegated to users",
        controllers.join(", ")
    )]
    V1InUse { controllers: Vec<String> },
    #[error("no cgroup v2 hierarchy is mounted")]
    NoV2,
    /// Our own cgroup (or its `cgroup.procs` / `cgroup.subtree_control`) is not ours to write.
    #[error(
        "{} is not writable by us (our cgroup is not delegated to this user)",
        path.display()
    )]
    NotWritable { path: PathBuf },
    /// A cgroup is delegated to us, but creating the run's cgroup beneath it failed.
    #[error("the delegated cgroup {} cannot be used: {source}", dir.display())]
    Unusable {
        dir: PathBuf,
        #[source]
        source: CgroupError,
    },
}

/// Whether the sandboxes of a process with `privilege` get cgroups: always as root; rootless
/// only where a cgroup is delegated to us ([`rootless_delegation`]).
pub fn usable(privilege: crate::Privilege) -> bool {
    privilege.is_root() || rootless_delegation().is_ok()
}

/// Rootless mode: the v2 cgroup we may use, if our cgroups are delegated to us: a pure v2
/// layout (no v1 controller hierarchy: those are never delegated to a user) whose own cgroup
/// directory, `cgroup.procs` and `cgroup.subtree_control` we may write (e.g. systemd's
/// `user@.service` with `Delegate=yes`). Otherwise why not.
pub fn rootless_delegation() -> Result<PathBuf, NoDelegation> {
    let layout = Layout::cached()?;
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
pub fn delegation_of(
    layout: &Layout,
    writable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, NoDelegation> {
    if !layout.v1.is_empty() {
        let controllers: Vec<String> = layout
            .v1
            .iter()
            .flat_map(|h| h.controllers.iter().cloned())
            .collect();
        return Err(NoDelegation::V1InUse { controllers });
    }
    let Some(own) = &layout.unified else {
        return Err(NoDelegation::NoV2);
    };
    for p in [
        own.clone(),
        own.join("cgroup.procs"),
        own.join("cgroup.subtree_control"),
    ] {
        if !writable(&p) {
            return Err(NoDelegation::NotWritable { path: p });
        }
    }
    Ok(own.clone())
}
