//! The workspace, prepared in the parent: opened once (no symbolic link in any component), checked
//! (never the host root or a system directory), and as root cloned as an idmapped mount; rootless
//! only opened, for the child to bind.

use super::*;

/// The workspace, prepared in the parent: idmapped (as root), or only opened and checked
/// (rootless, see the module docs).
#[derive(Debug)]
pub struct WorkspaceTree {
    /// Detached mount (open_tree(OPEN_TREE_CLONE)) with its attributes already set; `None` in
    /// rootless mode, where the child binds the directory itself ([`Op::BindTree`]).
    pub fd: Option<OwnedFd>,
    /// The mount attributes (MOUNT_ATTR_*) the workspace gets.
    pub attrs: u64,
    /// Device and inode of the directory, checked again by the child in rootless mode.
    pub dev: u64,
    pub ino: u64,
    /// O_PATH fd of the host directory (for the Landlock rule: the same inode, no re-lookup).
    pub dir_fd: OwnedFd,
    /// Canonical host directory.
    pub host_dir: PathBuf,
    /// Owner of the host directory (what writes land as).
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The killed helper that carried the idmapping's user namespace ([`Self::reap_helper`]).
    helper: Option<namespaces::Reaper>,
}

impl WorkspaceTree {
    /// Reap the helper that carried the idmapping (killed once the mount was made): call it
    /// when the child has started, so that it is not a zombie for as long as the run lasts.
    pub fn reap_helper(&self) {
        if let Some(h) = &self.helper {
            h.reap();
        }
    }

    /// The helper's pid while it is not reaped.
    pub fn helper_pid(&self) -> Option<libc::pid_t> {
        self.helper.as_ref().and_then(namespaces::Reaper::pid)
    }
}

/// The workspace directory opened once, refusing symlinks in every component, checked and
/// stat'ed.
pub(super) struct OpenedWorkspace {
    pub(super) dir_fd: OwnedFd,
    pub(super) host_dir: PathBuf,
    pub(super) st: libc::stat,
}

pub(super) fn workspace_attrs(writable: bool, exec: bool) -> u64 {
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !writable {
        set |= MOUNT_ATTR_RDONLY;
    }
    if !exec {
        set |= MOUNT_ATTR_NOEXEC;
    }
    set
}

pub(super) fn open_workspace(dir: &Path) -> Result<OpenedWorkspace, MountError> {
    // Open the directory once, refusing symlinks in every component (an earlier sandbox may
    // have planted one in a workspace), and use that fd for everything below: no TOCTOU.
    let dir_fd = crate::fds::open_no_symlinks(dir, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(
        |source| match source.raw_os_error() {
            Some(libc::ELOOP) => MountError::WorkspaceSymlink {
                path: dir.to_path_buf(),
            },
            Some(libc::ENOTDIR) => MountError::WorkspaceNotDir {
                path: dir.to_path_buf(),
            },
            _ => MountError::Sys {
                syscall: "openat2(RESOLVE_NO_SYMLINKS)",
                path: dir.to_path_buf(),
                source,
            },
        },
    )?;
    let host_dir = crate::fds::fd_path(&dir_fd).map_err(|source| MountError::Sys {
        syscall: "readlink /proc/self/fd",
        path: dir.to_path_buf(),
        source,
    })?;
    // SAFETY: all-zero is a valid `struct stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we own, into a local.
    if unsafe { libc::fstat(dir_fd.as_raw_fd(), &mut st) } != 0 {
        return Err(MountError::Sys {
            syscall: "fstat",
            path: host_dir,
            source: io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(MountError::WorkspaceNotDir { path: host_dir });
    }
    if let Err(reason) = check_workspace_dir(&host_dir) {
        return Err(MountError::UnsafeWorkspace {
            path: host_dir,
            reason,
        });
    }
    Ok(OpenedWorkspace {
        dir_fd,
        host_dir,
        st,
    })
}

/// Rootless: open and check the workspace directory (as [`prepare_workspace`] does) without
/// building a mount; the child binds it ([`Op::BindTree`]). nosuid and nodev always; read-only
/// unless `writable`; noexec unless `exec`.
pub fn prepare_workspace_plain(
    dir: &Path,
    writable: bool,
    exec: bool,
) -> Result<WorkspaceTree, MountError> {
    let w = open_workspace(dir)?;
    // The sandbox gets no more than we have: say so now instead of failing inside.
    let (mode, what) = if writable {
        (
            libc::R_OK | libc::W_OK | libc::X_OK,
            "read, write and enter",
        )
    } else {
        (libc::R_OK | libc::X_OK, "read and enter")
    };
    let c = CString::new(w.host_dir.as_os_str().as_bytes()).map_err(|_| MountError::Nul {
        path: w.host_dir.clone(),
    })?;
    // SAFETY: a valid C string; faccessat only checks permissions.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) } != 0 {
        return Err(MountError::WorkspaceAccess {
            path: w.host_dir,
            uid: namespaces::own_ids().uid,
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(WorkspaceTree {
        fd: None,
        attrs: workspace_attrs(writable, exec),
        dev: w.st.st_dev,
        ino: w.st.st_ino,
        dir_fd: w.dir_fd,
        host_dir: w.host_dir,
        owner_uid: w.st.st_uid,
        owner_gid: w.st.st_gid,
        helper: None,
    })
}

/// Clone the workspace directory as a detached mount, idmapped so that its owner appears as the
/// sandbox's host identity (`ids`): the sandbox can write it, and what it writes lands owned by
/// the workspace owner. nosuid and nodev always; read-only unless `writable`; noexec unless
/// `exec`.
pub fn prepare_workspace(
    dir: &Path,
    writable: bool,
    exec: bool,
    ids: HostIds,
) -> Result<WorkspaceTree, MountError> {
    let sys = |syscall, path: &Path| {
        let source = io::Error::last_os_error();
        MountError::Sys {
            syscall,
            path: path.to_path_buf(),
            source,
        }
    };
    let OpenedWorkspace {
        dir_fd,
        host_dir,
        st,
    } = open_workspace(dir)?;
    let (owner_uid, owner_gid) = (st.st_uid, st.st_gid);
    let (userns, reaper) = namespaces::helper_userns(
        &namespaces::map_line(owner_uid, ids.uid),
        &namespaces::map_line(owner_gid, ids.gid),
    )?;
    let empty = cs("");
    // SAFETY: an empty path relative to an fd we own (AT_EMPTY_PATH); returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir_fd.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(sys("open_tree(OPEN_TREE_CLONE)", &host_dir));
    }
    // SAFETY: open_tree succeeded; the fd is ours alone. (fds fit in c_int.)
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attrs = workspace_attrs(writable, exec);
    let set = MOUNT_ATTR_IDMAP | attrs;
    let attr = MountAttr {
        attr_set: set,
        userns_fd: userns.as_raw_fd() as u64,
        ..MountAttr::default()
    };
    // SAFETY: `attr` is a valid mount_attr of the size passed; `empty` is a valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        let source = io::Error::last_os_error();
        if matches!(
            source.raw_os_error(),
            Some(libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP)
        ) {
            return Err(MountError::NoIdmap {
                path: host_dir,
                source,
            });
        }
        return Err(MountError::Sys {
            syscall: "mount_setattr(MOUNT_ATTR_IDMAP)",
            path: host_dir,
            source,
        });
    }
    Ok(WorkspaceTree {
        fd: Some(tree),
        attrs,
        dev: st.st_dev,
        ino: st.st_ino,
        dir_fd,
        host_dir,
        owner_uid,
        owner_gid,
        helper: Some(reaper),
    })
}

/// System directories that must never become a (writable, idmapped) workspace.
pub(super) const SYSTEM_DIRS: [&str; 13] = [
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var",
];

/// Directories beneath which `carapace run` keeps the workspaces it creates for its own
/// children (its state directory: 0700, owned by the supervisor, checked by
/// `broker_host::StateDir::open`). Set once, by the service, before any child starts.
pub(super) static MANAGED_WORKSPACES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Allow workspaces strictly beneath `root` (canonical) even when it lies in a system
/// directory such as /var/lib: the service's state directory holds the workspaces it created
/// for its children, and nothing else of the system. Only the first call has an effect.
pub fn allow_managed_workspaces(root: &Path) {
    let _ = MANAGED_WORKSPACES.set(root.to_path_buf());
}

/// Refuse the host root and system directories (and anything beneath them) as a workspace:
/// the idmapped workspace makes everything its owner (root, for these) owns writable by the
/// sandbox. `dir` must be canonical. Exception: strictly beneath the service's state directory
/// ([`allow_managed_workspaces`]).
pub fn check_workspace_dir(dir: &Path) -> Result<(), &'static str> {
    check_workspace_dir_in(dir, MANAGED_WORKSPACES.get().map(PathBuf::as_path))
}

pub(super) fn check_workspace_dir_in(
    dir: &Path,
    managed: Option<&Path>,
) -> Result<(), &'static str> {
    if dir == Path::new("/") {
        return Err("it is the host's root directory");
    }
    if managed.is_some_and(|m| dir.starts_with(m) && dir != m) {
        return Ok(());
    }
    if SYSTEM_DIRS.iter().any(|s| dir.starts_with(s)) {
        return Err("it is (inside) a system directory");
    }
    if dir == Path::new("/home") || dir == Path::new("/root") {
        return Err("it holds every user's (or root's) home");
    }
    Ok(())
}
