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
    /// Create a new read-only (0444) file at `path` holding `contents` (the source of a
    /// [`Mount::File`], in the scratch tmpfs); an existing file is an error.
    WriteFile {
        path: CString,
        contents: Vec<u8>,
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
            Op::WriteFile { path, contents } => {
                write!(f, "write {} ({} bytes)", s(path), contents.len())
            }
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

mod workspace;
pub use workspace::*;
mod child;
pub use child::*;
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

impl View {
    /// A read-only, non-executable view the sandbox makes itself (procfs, /dev, a written
    /// file): nothing of the host's shows there.
    fn read_only_inside(dst: &Path) -> View {
        View {
            host: None,
            dst: dst.to_path_buf(),
            exec: false,
            writable: false,
        }
    }
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
    // Files written for Mount::File so far (their scratch names are numbered).
    let mut files = 0usize;
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
                views.push(View::read_only_inside(dst));
            }
            Mount::File { dst, contents } => {
                // Written into the scratch tmpfs (the root until the second pivot, never
                // visible inside), then bound alone, read-only, at its place.
                let scratch = cstr(format!("/carapace-file-{files}"))?;
                files += 1;
                ops.push(Op::WriteFile {
                    path: scratch.clone(),
                    contents: contents.as_bytes().to_vec(),
                });
                ancestors(dst, &mut ops)?;
                let target = cstr(under(NEWROOT, dst))?;
                ops.push(Op::Touch {
                    path: target.clone(),
                });
                ops.push(Op::Bind {
                    src: scratch,
                    dst: target.clone(),
                    recursive: false,
                });
                ops.push(Op::SetAttr {
                    path: target,
                    set: MOUNT_ATTR_RDONLY
                        | MOUNT_ATTR_NOSUID
                        | MOUNT_ATTR_NODEV
                        | MOUNT_ATTR_NOEXEC,
                    recursive: false,
                });
                views.push(View::read_only_inside(dst));
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
                views.push(View::read_only_inside(dst));
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
    if let Some(exe) = supervisor_exe() {
        hide_supervisor(&exe, &views, &mut ops)?;
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

/// The canonical path of the running supervisor's executable (None when it cannot be told:
/// then no bind can be known to show it either, and nothing is hidden).
fn supervisor_exe() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// The supervisor's own binary is never in a sandbox's view (runc CVE-2019-5736): wherever a
/// bind shows the directory it is installed in (`/usr/bin/carapace` of a packaged install, under
/// the read-only `/usr` every profile binds), the host's `/dev/null` is bound over it, read-only
/// and noexec, so that the path opens an empty device, never the supervisor's inode. Runs after
/// every bind of the profile, so nothing is mounted over the mask.
fn hide_supervisor(exe: &Path, views: &[View], ops: &mut Vec<Op>) -> Result<(), MountError> {
    for v in views {
        let Some(rel) = v.host.as_deref().and_then(|h| exe.strip_prefix(h).ok()) else {
            continue;
        };
        let inside = if rel.as_os_str().is_empty() {
            v.dst.clone()
        } else {
            v.dst.join(rel)
        };
        let target = cstr(under(NEWROOT, &inside))?;
        ops.push(Op::Bind {
            src: cstr(under(OLDROOT, Path::new("/dev/null")))?,
            dst: target.clone(),
            recursive: false,
        });
        ops.push(Op::SetAttr {
            path: target,
            set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            recursive: false,
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests;
