//! The new root: a list of mount operations computed in the parent and replayed by the child.
//!
//! Layout (the bubblewrap technique): in its new mount namespace the child makes `/` private,
//! mounts a tmpfs on [`BASE`], creates `newroot` (its own small tmpfs, the future `/`) and
//! `oldroot` in it, and `pivot_root`s into that tmpfs so that the host's root is reachable only
//! as `/oldroot`. Every plan mount is then made beneath `/newroot`: binds *from* `/oldroot`, with
//! `mount_setattr(AT_RECURSIVE)` making them nosuid, nodev, and read-only / noexec unless the plan
//! says otherwise; a new read-only procfs; a minimal /dev; tmpfs; symlinks; the idmapped workspace
//! (prepared in the parent, see [`prepare_workspace`]) moved in with `move_mount`. Finally the new
//! root itself is made read-only, `/oldroot` is detached, and the child pivots into `/newroot`.
//!
//! # When attributes are applied
//!
//! A mount that carapace *creates* (the minimal `/dev`, `/proc`, the new root) gets its
//! read-only / nosuid / nodev / noexec attributes only after every plan mount beneath it is in
//! place: made read-only first, it could not receive the mount points of later mounts (a tmpfs
//! at `/dev/shm` would fail with EROFS). Those ops are collected while the mounts are built and
//! emitted after the last mount, in plan order (parents before children), before the new root
//! itself is made read-only. The attributes are applied to the mount at that path alone
//! (`/dev`), or recursively where nothing of the plan is expected beneath (`/proc`).
//!
//! Binds of *host* directories are the exception, on purpose: they get their attributes
//! (recursively, for the host's submounts) right after the bind. While a bind is writable, a
//! `mkdir` for a later mount point beneath it would create that directory on the host, as
//! root; read-only first, such a mount point must already exist on the host (EEXIST is fine)
//! and a missing one fails the run instead of writing the host. Later plan mounts beneath a
//! bind are not touched by its recursive attributes, since they do not exist yet.
//!
//! All paths are `CString`s built here, before fork: the child only walks the list.
//!
//! # Rootless mode
//!
//! An unprivileged supervisor cannot build an idmapped mount (open_tree(OPEN_TREE_CLONE) and
//! MOUNT_ATTR_IDMAP need CAP_SYS_ADMIN in the initial user namespace), and needs none: the
//! sandbox runs as the user's own host uid, which owns the workspace. [`prepare_workspace_plain`]
//! only opens and checks the directory; the child, which is root of its own user namespace and
//! so may mount in its mount namespace, binds it from `/oldroot` ([`Op::BindTree`]: opened with
//! RESOLVE_NO_SYMLINKS and checked to be the very inode the parent checked, then cloned with
//! `open_tree` and moved in) and applies its attributes like any host bind.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use carapace_policy::plan::Mount;

use crate::namespaces::{self, HostIds, NamespaceError};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{syscall} {}: {source}", path.display())]
    Sys {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount source {} does not exist (mark the mount `optional = true` if that is fine)", path.display())]
    MissingSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "workspace {}: a component of the path is a symbolic link; give the real path \
         (realpath DIR). Links are refused because an earlier sandbox run could have planted one",
        path.display()
    )]
    WorkspaceSymlink { path: PathBuf },
    #[error(
        "workspace {}: its filesystem does not support idmapped mounts (mount_setattr \
         MOUNT_ATTR_IDMAP failed), which carapace needs to let the sandbox write it as its \
         owner; use a workspace on ext4, xfs, btrfs, tmpfs (Linux 6.3+) or overlayfs",
        path.display()
    )]
    NoIdmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("workspace {} is not a directory", path.display())]
    WorkspaceNotDir { path: PathBuf },
    #[error(
        "workspace {}: you (uid {uid}) may not {what} it, so neither may the sandbox, which runs \
         as you in rootless mode; pick a directory of yours (--workspace DIR)",
        path.display()
    )]
    WorkspaceAccess {
        path: PathBuf,
        uid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing {} as the workspace: {reason}. The workspace is writable by the sandbox and \
         everything its owner owns there becomes writable; pick a project directory (--workspace DIR)",
        path.display()
    )]
    UnsafeWorkspace { path: PathBuf, reason: &'static str },
    #[error("the plan mounts a workspace but no workspace directory was given")]
    NoWorkspace,
    #[error("path {} contains a NUL byte", path.display())]
    Nul { path: PathBuf },
    #[error("workspace idmapping: {0}")]
    Userns(#[from] NamespaceError),
}

/// Host directory the child mounts its scratch tmpfs on, before pivoting (inside its own mount
/// namespace, so the host's /tmp is untouched).
pub const BASE: &str = "/tmp";
const NEWROOT: &str = "/newroot";
const OLDROOT: &str = "/oldroot";

// mount_setattr(2) / open_tree(2) / move_mount(2) constants (linux/mount.h).
pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0 = 32 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Devices bound from the host into the minimal /dev.
pub const DEV_NODES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];
/// Symlinks in the minimal /dev.
pub const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// One step of the child's root construction.
#[derive(Debug)]
pub enum Op {
    /// `mount(NULL, "/", NULL, MS_REC|MS_PRIVATE)`: nothing propagates back to the host.
    MakePrivate,
    /// A new filesystem (tmpfs, proc).
    Mount {
        fstype: CString,
        dst: CString,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// A bind mount (recursive or not).
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
    },
    /// `mount_setattr(path, attr_set = set)`.
    SetAttr {
        path: CString,
        set: u64,
        recursive: bool,
    },
    /// `mkdir(path, 0755)`, EEXIST is fine.
    Mkdir {
        path: CString,
    },
    /// Create an empty regular file as a mount point, if missing.
    Touch {
        path: CString,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    Chdir {
        path: CString,
    },
    PivotRoot {
        new_root: CString,
        put_old: CString,
    },
    /// `umount2(path, MNT_DETACH)`.
    Detach {
        path: CString,
    },
    /// `move_mount(fd, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH)`.
    MoveMount {
        fd: RawFd,
        dst: CString,
    },
    /// Rootless workspace: `openat2(src, O_PATH|O_DIRECTORY, RESOLVE_NO_SYMLINKS)`, refuse it
    /// unless it is the inode (`dev`, `ino`) the parent checked, then
    /// `open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)` of that fd and `move_mount` to `dst`.
    BindTree {
        src: CString,
        dst: CString,
        dev: u64,
        ino: u64,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::MakePrivate => write!(f, "mount --make-rprivate /"),
            Op::Mount {
                fstype, dst, data, ..
            } => write!(
                f,
                "mount -t {} {} ({})",
                s(fstype),
                s(dst),
                data.as_ref().map(s).unwrap_or_default()
            ),
            Op::Bind {
                src,
                dst,
                recursive,
            } => write!(
                f,
                "{} {} {}",
                if *recursive { "rbind" } else { "bind" },
                s(src),
                s(dst)
            ),
            Op::SetAttr { path, set, .. } => {
                write!(f, "mount_setattr {} {}", s(path), attr_names(*set))
            }
            Op::Mkdir { path } => write!(f, "mkdir {}", s(path)),
            Op::Touch { path } => write!(f, "create mount point {}", s(path)),
            Op::Symlink { target, path } => write!(f, "symlink {} -> {}", s(path), s(target)),
            Op::Chdir { path } => write!(f, "chdir {}", s(path)),
            Op::PivotRoot { new_root, put_old } => {
                write!(f, "pivot_root {} {}", s(new_root), s(put_old))
            }
            Op::Detach { path } => write!(f, "umount -l {}", s(path)),
            Op::MoveMount { dst, .. } => write!(f, "move_mount (workspace) {}", s(dst)),
            Op::BindTree { src, dst, .. } => {
                write!(f, "rbind (workspace, no symlinks) {} {}", s(src), s(dst))
            }
        }
    }
}

fn attr_names(set: u64) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (MOUNT_ATTR_RDONLY, "ro"),
        (MOUNT_ATTR_NOSUID, "nosuid"),
        (MOUNT_ATTR_NODEV, "nodev"),
        (MOUNT_ATTR_NOEXEC, "noexec"),
        (MOUNT_ATTR_IDMAP, "idmap"),
    ] {
        if set & bit != 0 {
            v.push(name);
        }
    }
    v.join(",")
}

fn cstr(p: impl AsRef<Path>) -> Result<CString, MountError> {
    CString::new(p.as_ref().as_os_str().as_bytes()).map_err(|_| MountError::Nul {
        path: p.as_ref().to_path_buf(),
    })
}

fn cs(s: &str) -> CString {
    // Only used for literals and numbers formatted here: they contain no NUL.
    CString::new(s).unwrap_or_default()
}

/// `prefix` + absolute `p` ("/newroot" + "/usr" = "/newroot/usr"; "/" maps to the prefix).
fn under(prefix: &str, p: &Path) -> PathBuf {
    let rel = p.strip_prefix("/").unwrap_or(p);
    if rel.as_os_str().is_empty() {
        PathBuf::from(prefix)
    } else {
        Path::new(prefix).join(rel)
    }
}

/// mkdir ops for every ancestor of `dst` beneath the new root.
fn ancestors(dst: &Path, ops: &mut Vec<Op>) -> Result<(), MountError> {
    let mut cur = PathBuf::from(NEWROOT);
    let comps: Vec<_> = dst.strip_prefix("/").unwrap_or(dst).components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        ops.push(Op::Mkdir { path: cstr(&cur)? });
    }
    Ok(())
}

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
    /// The killed helper that carried the idmapping's user namespace, reaped on drop.
    _helper: Option<namespaces::Reaper>,
}

/// The workspace directory opened once, refusing symlinks in every component, checked and
/// stat'ed.
struct OpenedWorkspace {
    dir_fd: OwnedFd,
    host_dir: PathBuf,
    st: libc::stat,
}

fn workspace_attrs(writable: bool, exec: bool) -> u64 {
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !writable {
        set |= MOUNT_ATTR_RDONLY;
    }
    if !exec {
        set |= MOUNT_ATTR_NOEXEC;
    }
    set
}

fn open_workspace(dir: &Path) -> Result<OpenedWorkspace, MountError> {
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
        _helper: None,
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
        _helper: Some(reaper),
    })
}

/// System directories that must never become a (writable, idmapped) workspace.
const SYSTEM_DIRS: [&str; 13] = [
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var",
];

/// Directories beneath which `carapace run` keeps the workspaces it creates for its own
/// children (its state directory: 0700, owned by the supervisor, checked by
/// `broker_host::StateDir::open`). Set once, by the service, before any child starts.
static MANAGED_WORKSPACES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

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

fn check_workspace_dir_in(dir: &Path, managed: Option<&Path>) -> Result<(), &'static str> {
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

/// What the sandbox sees at a mount point (for checking where the program lives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Canonical host directory or file shown at `dst` (None for tmpfs, proc, dev, symlinks).
    pub host: Option<PathBuf>,
    pub dst: PathBuf,
    pub exec: bool,
    /// A sandbox can write beneath `dst` (so it could replace a program there): a read-write
    /// bind, a tmpfs, and always the workspace (shared with other runs).
    pub writable: bool,
}

/// Where the program appears inside the sandbox ([`program_inside`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInside {
    pub path: PathBuf,
    /// It lies in a mount a sandbox can write (the workspace, a read-write bind).
    pub writable: bool,
}

/// Why a program cannot run from where it is ([`program_inside`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramOutside {
    /// No mount of the profile shows it.
    #[error(
        "{} is not visible inside the sandbox: no mount of the profile contains it",
        program.display()
    )]
    NotVisible { program: PathBuf },
    /// A later mount (at `by`) is stacked over the place it would be.
    #[error(
        "{} would be hidden inside the sandbox by the mount at {}",
        program.display(),
        by.display()
    )]
    Hidden { program: PathBuf, by: PathBuf },
    /// The mount (at `mount`) that shows it is not executable.
    #[error(
        "{} is inside the mount at {}, which is not executable (give it access \
         \"read-exec\" in the profile if this program should run)",
        program.display(),
        mount.display()
    )]
    NotExecutable { program: PathBuf, mount: PathBuf },
}

/// The child's mount program plus the views it creates.
#[derive(Debug)]
pub struct Built {
    pub ops: Vec<Op>,
    pub views: Vec<View>,
}

/// Compute the child's operations for `mounts`.
pub fn build(
    mounts: &[Mount],
    workspace: Option<&WorkspaceTree>,
    ids: HostIds,
) -> Result<Built, MountError> {
    let mut ops = vec![
        Op::MakePrivate,
        Op::Mount {
            fstype: cs("tmpfs"),
            dst: cs(BASE),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cs("mode=0755,size=64k")),
        },
        Op::Chdir { path: cs(BASE) },
        Op::Mkdir {
            path: cs("newroot"),
        },
        Op::Mount {
            fstype: cs("tmpfs"),
            dst: cs("newroot"),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cs("mode=0755,size=1m")),
        },
        Op::Mkdir {
            path: cs("oldroot"),
        },
        Op::PivotRoot {
            new_root: cs("."),
            put_old: cs("oldroot"),
        },
        Op::Chdir { path: cs("/") },
    ];
    let mut views = Vec::new();
    // Attribute ops of the mounts we create, applied once everything beneath them is mounted
    // (see the module docs).
    let mut deferred: Vec<Op> = Vec::new();
    for m in mounts {
        match m {
            Mount::Bind {
                src,
                dst,
                writable,
                exec,
                optional,
            } => {
                let canon = match std::fs::canonicalize(src) {
                    Ok(c) => c,
                    Err(e) if *optional && e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(MountError::MissingSource {
                            path: src.clone(),
                            source,
                        })
                    }
                };
                let is_dir = std::fs::metadata(&canon)
                    .map_err(|source| MountError::Sys {
                        syscall: "stat",
                        path: canon.clone(),
                        source,
                    })?
                    .is_dir();
                ancestors(dst, &mut ops)?;
                let target = cstr(under(NEWROOT, dst))?;
                ops.push(if is_dir {
                    Op::Mkdir {
                        path: target.clone(),
                    }
                } else {
                    Op::Touch {
                        path: target.clone(),
                    }
                });
                ops.push(Op::Bind {
                    src: cstr(under(OLDROOT, &canon))?,
                    dst: target.clone(),
                    recursive: true,
                });
                let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
                if !writable {
                    set |= MOUNT_ATTR_RDONLY;
                }
                if !exec {
                    set |= MOUNT_ATTR_NOEXEC;
                }
                ops.push(Op::SetAttr {
                    path: target,
                    set,
                    recursive: true,
                });
                views.push(View {
                    host: Some(canon),
                    dst: dst.clone(),
                    exec: *exec,
                    writable: *writable,
                });
            }
            Mount::Workspace { dst, exec, .. } => {
                let ws = workspace.ok_or(MountError::NoWorkspace)?;
                ancestors(dst, &mut ops)?;
                let target = cstr(under(NEWROOT, dst))?;
                ops.push(Op::Mkdir {
                    path: target.clone(),
                });
                match &ws.fd {
                    Some(fd) => ops.push(Op::MoveMount {
                        fd: fd.as_raw_fd(),
                        dst: target,
                    }),
                    None => {
                        ops.push(Op::BindTree {
                            src: cstr(under(OLDROOT, &ws.host_dir))?,
                            dst: target.clone(),
                            dev: ws.dev,
                            ino: ws.ino,
                        });
                        ops.push(Op::SetAttr {
                            path: target,
                            set: ws.attrs,
                            recursive: true,
                        });
                    }
                }
                views.push(View {
                    host: Some(ws.host_dir.clone()),
                    dst: dst.clone(),
                    exec: *exec,
                    // Whatever this profile may do there: other runs share the workspace, and
                    // one of them may write it.
                    writable: true,
                });
            }
            Mount::Tmpfs {
                dst,
                size_bytes,
                mode,
                exec,
            } => {
                ancestors(dst, &mut ops)?;
                let target = cstr(under(NEWROOT, dst))?;
                ops.push(Op::Mkdir {
                    path: target.clone(),
                });
                let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
                if !exec {
                    flags |= libc::MS_NOEXEC;
                }
                ops.push(Op::Mount {
                    fstype: cs("tmpfs"),
                    dst: target,
                    flags,
                    data: Some(cs(&tmpfs_options(*size_bytes, *mode, ids))),
                });
                views.push(View {
                    host: None,
                    dst: dst.clone(),
                    exec: *exec,
                    writable: true,
                });
            }
            Mount::Proc { dst } => {
                ancestors(dst, &mut ops)?;
                let target = cstr(under(NEWROOT, dst))?;
                ops.push(Op::Mkdir {
                    path: target.clone(),
                });
                ops.push(Op::Mount {
                    fstype: cs("proc"),
                    dst: target.clone(),
                    flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    data: None,
                });
                deferred.push(Op::SetAttr {
                    path: target,
                    set: MOUNT_ATTR_RDONLY,
                    recursive: true,
                });
                views.push(View {
                    host: None,
                    dst: dst.clone(),
                    exec: false,
                    writable: false,
                });
            }
            Mount::Dev { dst, pts } => {
                ancestors(dst, &mut ops)?;
                let dev = under(NEWROOT, dst);
                let target = cstr(&dev)?;
                ops.push(Op::Mkdir {
                    path: target.clone(),
                });
                ops.push(Op::Mount {
                    fstype: cs("tmpfs"),
                    dst: target.clone(),
                    flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                    data: Some(cs("mode=0755,size=64k")),
                });
                for name in DEV_NODES {
                    let host = Path::new("/dev").join(name);
                    if !host.exists() {
                        continue;
                    }
                    let node = cstr(dev.join(name))?;
                    ops.push(Op::Touch { path: node.clone() });
                    ops.push(Op::Bind {
                        src: cstr(under(OLDROOT, &host))?,
                        dst: node.clone(),
                        recursive: false,
                    });
                    ops.push(Op::SetAttr {
                        path: node,
                        set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                        recursive: false,
                    });
                }
                for (name, link) in DEV_LINKS {
                    ops.push(Op::Symlink {
                        target: cs(link),
                        path: cstr(dev.join(name))?,
                    });
                }
                if *pts {
                    dev_pts(&dev, &mut ops)?;
                }
                // Not recursive: tmpfs mounts beneath /dev (e.g. /dev/shm) keep their own
                // flags.
                deferred.push(Op::SetAttr {
                    path: target,
                    set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                    recursive: false,
                });
                views.push(View {
                    host: None,
                    dst: dst.clone(),
                    exec: false,
                    writable: false,
                });
            }
            Mount::Symlink { dst, target } => {
                ancestors(dst, &mut ops)?;
                ops.push(Op::Symlink {
                    target: cstr(target)?,
                    path: cstr(under(NEWROOT, dst))?,
                });
            }
        }
    }
    ops.extend(deferred);
    ops.extend([
        Op::SetAttr {
            path: cs(NEWROOT),
            set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            recursive: false,
        },
        Op::Detach { path: cs(OLDROOT) },
        Op::Chdir { path: cs(NEWROOT) },
        Op::PivotRoot {
            new_root: cs("."),
            put_old: cs("."),
        },
        Op::Detach { path: cs(".") },
        Op::Chdir { path: cs("/") },
    ]);
    Ok(Built { ops, views })
}

/// A private pseudo-terminal world beneath the minimal /dev: a new devpts instance at `pts`
/// (`newinstance`: it holds only the ptys opened inside this sandbox, never the host's or
/// another sandbox's; `ptmxmode=0666` so the unprivileged sandbox user can open its ptmx),
/// `ptmx -> pts/ptmx` (where libc's posix_openpt looks) and the host's `tty` node, which the
/// kernel resolves to the opener's own controlling terminal: inside the sandbox that is a pty
/// of this instance or nothing (the program runs in a new session without one). Mounted
/// nosuid, noexec (device nodes are what devpts is for, so not nodev).
fn dev_pts(dev: &Path, ops: &mut Vec<Op>) -> Result<(), MountError> {
    let pts = cstr(dev.join("pts"))?;
    ops.push(Op::Mkdir { path: pts.clone() });
    ops.push(Op::Mount {
        fstype: cs("devpts"),
        dst: pts,
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some(cs("newinstance,ptmxmode=0666,mode=0620")),
    });
    ops.push(Op::Symlink {
        target: cs("pts/ptmx"),
        path: cstr(dev.join("ptmx"))?,
    });
    let tty = cstr(dev.join("tty"))?;
    ops.push(Op::Touch { path: tty.clone() });
    ops.push(Op::Bind {
        src: cstr(under(OLDROOT, Path::new("/dev/tty")))?,
        dst: tty.clone(),
        recursive: false,
    });
    ops.push(Op::SetAttr {
        path: tty,
        set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        recursive: false,
    });
    Ok(())
}

/// tmpfs mount options: size, mode, and owned by the sandbox's host identity.
pub fn tmpfs_options(size_bytes: u64, mode: u32, ids: HostIds) -> String {
    format!(
        "size={size_bytes},mode={:o},uid={},gid={}",
        mode & 0o7777,
        ids.uid,
        ids.gid
    )
}

/// Where `program` (a canonical host path) appears inside the sandbox, if it is visible through
/// an executable mount and not shadowed by a later mount. Errors say why not.
pub fn program_inside(views: &[View], program: &Path) -> Result<ProgramInside, ProgramOutside> {
    // The last mount that shows the program wins (later mounts are stacked on top).
    let found = views.iter().enumerate().rev().find_map(|(i, v)| {
        let host = v.host.as_ref()?;
        let rel = program.strip_prefix(host).ok()?;
        let inside = if rel.as_os_str().is_empty() {
            v.dst.clone()
        } else {
            v.dst.join(rel)
        };
        Some((i, v, inside))
    });
    let Some((i, v, inside)) = found else {
        return Err(ProgramOutside::NotVisible {
            program: program.to_path_buf(),
        });
    };
    if let Some(shadow) = views[i + 1..]
        .iter()
        .find(|w| inside.starts_with(&w.dst) && w.dst != v.dst)
    {
        return Err(ProgramOutside::Hidden {
            program: program.to_path_buf(),
            by: shadow.dst.clone(),
        });
    }
    if !v.exec {
        return Err(ProgramOutside::NotExecutable {
            program: program.to_path_buf(),
            mount: v.dst.clone(),
        });
    }
    Ok(ProgramInside {
        path: inside,
        writable: v.writable,
    })
}

// ---- child side ----

/// Child: run the ops in order. On failure returns (index of the op, errno).
pub fn child_run(ops: &[Op]) -> Result<(), (u32, i32)> {
    for (i, op) in ops.iter().enumerate() {
        // SAFETY: see child_op.
        if let Err(e) = unsafe { child_op(op) } {
            return Err((i as u32, e));
        }
    }
    Ok(())
}

/// # Safety
/// Must only be called in the freshly cloned child, in its own mount namespace, whose memory is
/// a private copy (no CLONE_VM): all pointers come from `CString`s owned by `op`.
unsafe fn child_op(op: &Op) -> Result<(), i32> {
    let err = || Err(crate::fds::errno());
    let null = std::ptr::null::<libc::c_char>();
    match op {
        Op::MakePrivate => {
            let root = c"/";
            // SAFETY: valid C strings or NULL as mount(2) allows for a propagation change.
            if unsafe {
                libc::mount(
                    null,
                    root.as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            } != 0
            {
                return err();
            }
        }
        Op::Mount {
            fstype,
            dst,
            flags,
            data,
        } => {
            let d = data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
            // SAFETY: valid C strings; data is NULL or a valid C string.
            if unsafe { libc::mount(fstype.as_ptr(), dst.as_ptr(), fstype.as_ptr(), *flags, d) }
                != 0
            {
                return err();
            }
        }
        Op::Bind {
            src,
            dst,
            recursive,
        } => {
            let mut flags = libc::MS_BIND;
            if *recursive {
                flags |= libc::MS_REC;
            }
            // SAFETY: valid C strings; bind mounts ignore fstype and data.
            if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), null, flags, std::ptr::null()) }
                != 0
            {
                return err();
            }
        }
        Op::SetAttr {
            path,
            set,
            recursive,
        } => {
            let attr = MountAttr {
                attr_set: *set,
                ..MountAttr::default()
            };
            let flags = if *recursive { libc::AT_RECURSIVE } else { 0 } as libc::c_uint;
            // SAFETY: valid C string, valid mount_attr of the size passed.
            if unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    flags,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                )
            } != 0
            {
                return err();
            }
        }
        Op::Mkdir { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0
                && crate::fds::errno() != libc::EEXIST
            {
                return err();
            }
        }
        Op::Touch { path } => {
            // SAFETY: valid C string; the fd is closed right away.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o444 as libc::c_uint,
                )
            };
            if fd < 0 {
                return err();
            }
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
        }
        Op::Symlink { target, path } => {
            // SAFETY: valid C strings.
            if unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) } != 0 {
                return err();
            }
        }
        Op::Chdir { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::chdir(path.as_ptr()) } != 0 {
                return err();
            }
        }
        Op::PivotRoot { new_root, put_old } => {
            // SAFETY: valid C strings.
            if unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) }
                != 0
            {
                return err();
            }
        }
        Op::Detach { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                return err();
            }
        }
        Op::BindTree { src, dst, dev, ino } => {
            // SAFETY: see child_bind_tree.
            return unsafe { child_bind_tree(src, dst, *dev, *ino) };
        }
        Op::MoveMount { fd, dst } => {
            let empty = c"";
            // SAFETY: valid C strings; `fd` is the detached workspace tree inherited from the
            // parent.
            if unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    *fd,
                    empty.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                )
            } != 0
            {
                return err();
            }
        }
    }
    Ok(())
}

/// # Safety
/// As [`child_op`]: raw syscalls on C strings owned by the caller; every fd opened here is
/// closed before returning.
unsafe fn child_bind_tree(src: &CString, dst: &CString, dev: u64, ino: u64) -> Result<(), i32> {
    let how = OpenHowRaw {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: valid C string and open_how of the size passed; returns a new fd or -1.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            src.as_ptr(),
            &how as *const OpenHowRaw,
            std::mem::size_of::<OpenHowRaw>(),
        )
    };
    if dir < 0 {
        return Err(crate::fds::errno());
    }
    let dir = dir as RawFd;
    let close = |fd: RawFd| {
        // SAFETY: closing an fd this function opened.
        unsafe { libc::close(fd) };
    };
    // SAFETY: all-zero is a valid `struct stat`; fstat of the fd just opened into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(dir, &mut st) } != 0 {
        let e = crate::fds::errno();
        close(dir);
        return Err(e);
    }
    if st.st_dev != dev || st.st_ino != ino {
        // Not the directory the supervisor checked (it was replaced meanwhile).
        close(dir);
        return Err(libc::ESTALE);
    }
    let empty = c"";
    // SAFETY: an empty path relative to the fd just opened (AT_EMPTY_PATH); returns a new fd.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir,
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_EMPTY_PATH as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    let e = crate::fds::errno();
    close(dir);
    if tree < 0 {
        return Err(e);
    }
    let tree = tree as RawFd;
    // SAFETY: valid C strings; `tree` is the detached mount just created.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    let e = crate::fds::errno();
    close(tree);
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

/// `struct open_how` for openat2(2) (the child's copy; see `fds::open_no_symlinks`).
#[repr(C)]
struct OpenHowRaw {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_SYMLINKS: u64 = 0x04;

#[cfg(test)]
mod tests;
