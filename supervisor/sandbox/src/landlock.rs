//! Landlock: the filesystem (and, where the kernel has it, TCP and scoping) ruleset.
//!
//! The ruleset is built in the PARENT with the `landlock` crate, from the plan's `Host` and
//! `Workspace` rules, with [`CompatLevel::HardRequirement`]: the handled rights are exactly what
//! this kernel's ABI supports, and anything the plan demands that the kernel cannot enforce is an
//! error, never a silent downgrade. The parent keeps the ruleset fd. `Sandbox(..)` paths only
//! exist once the child has built its new root (its tmpfs, /dev, /proc), so the child adds them
//! with raw `landlock_add_rule` and then calls raw `landlock_restrict_self`.
//!
//! Rules attach to inodes, and the child's bind mounts expose the same inodes, so a rule made on
//! a host path in the parent covers the same directory as seen inside the sandbox.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use ::landlock::{
    Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible as _, NetPort, PathBeneath,
    Ruleset, RulesetAttr as _, RulesetCreatedAttr as _, RulesetError, Scope, ABI,
};
use carapace_policy::plan::{FsRights, LandlockPath, LandlockPlan};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error(
        "Landlock ABI {need} is required by the profile (landlock.min_abi) but this kernel \
         provides {have} (0 = Landlock disabled; enable it with lsm=...,landlock on the kernel \
         command line, or use a newer kernel)"
    )]
    AbiTooOld { need: u8, have: u8 },
    #[error("Landlock: the plan demands {what}, which needs ABI {need}; this kernel has {have}")]
    Unsupported {
        what: &'static str,
        need: u8,
        have: u8,
    },
    #[error("Landlock {op}: {source}")]
    Ruleset {
        op: &'static str,
        #[source]
        source: RulesetError,
    },
    #[error("Landlock rule for {}: {source}", path.display())]
    Rule {
        path: PathBuf,
        #[source]
        source: RulesetError,
    },
    #[error("Landlock rule allowing TCP connect to port {port}: {source}")]
    NetRule {
        port: u16,
        #[source]
        source: RulesetError,
    },
    #[error("open {} (O_PATH, for a Landlock rule): {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Landlock: the kernel returned no ruleset fd although Landlock is required")]
    NoFd,
    #[error("Landlock: path {} contains a NUL byte", path.display())]
    Nul { path: PathBuf },
}

const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

/// The running kernel's Landlock ABI version; 0 when Landlock is unavailable.
pub fn probe_abi() -> u8 {
    // SAFETY: the documented version query: NULL attr, size 0, VERSION flag. No memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r <= 0 {
        0
    } else {
        u8::try_from(r).unwrap_or(u8::MAX)
    }
}

/// The target description the policy compiles for.
pub fn target() -> carapace_policy::Target {
    carapace_policy::Target {
        landlock_abi: probe_abi(),
    }
}

/// A rule the child adds after its root exists.
#[derive(Debug, Clone)]
pub struct SandboxRule {
    pub path: CString,
    /// Rights when the path is a directory.
    pub dir_access: u64,
    /// Rights when it is anything else (directory-only rights removed, as the kernel demands).
    pub file_access: u64,
}

/// The ruleset fd (created in the parent) plus what the child adds itself.
#[derive(Debug)]
pub struct Prepared {
    pub ruleset: OwnedFd,
    pub sandbox_rules: Vec<SandboxRule>,
    /// ABI the ruleset was built for (the running kernel's).
    pub abi: u8,
}

/// Map plan rights to Landlock access rights for `abi`.
pub fn access_for(rights: FsRights, abi: ABI) -> BitFlags<AccessFs> {
    let mut a = BitFlags::<AccessFs>::EMPTY;
    if rights.read {
        a |= AccessFs::ReadFile | AccessFs::ReadDir;
    }
    if rights.write {
        // Everything "write" except device nodes, device ioctls and unix-socket resolution.
        a |= AccessFs::from_write(abi)
            & !(AccessFs::MakeChar
                | AccessFs::MakeBlock
                | AccessFs::IoctlDev
                | AccessFs::ResolveUnix);
    }
    if rights.execute {
        a |= AccessFs::Execute;
    }
    if rights.ioctl_dev {
        a |= AccessFs::IoctlDev;
    }
    a & AccessFs::from_all(abi)
}

/// Open `path` `O_PATH` for a rule, and tell whether it is a directory (see [`is_dir`]).
fn open_path(path: &Path) -> io::Result<(OwnedFd, bool)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    let dir = is_dir(&f);
    Ok((f.into(), dir))
}

/// Whether the object open at `f` is a directory, from `fstat` of the descriptor: the answer
/// is about the object the rule will name, with no second path lookup that a rename in
/// between could send elsewhere. Should `fstat` of a descriptor just opened fail, the rule
/// gets file rights only (fewer than a directory's).
fn is_dir(f: &std::fs::File) -> bool {
    f.metadata().is_ok_and(|m| m.is_dir())
}

/// Build the ruleset for `plan` on a kernel with Landlock ABI `kernel_abi`.
/// `workspace` is an fd of the host workspace directory (for `LandlockPath::Workspace`).
pub fn prepare(
    plan: &LandlockPlan,
    workspace: Option<&OwnedFd>,
    kernel_abi: u8,
) -> Result<Prepared, LandlockError> {
    if kernel_abi < plan.min_abi || kernel_abi == 0 {
        return Err(LandlockError::AbiTooOld {
            need: plan.min_abi.max(1),
            have: kernel_abi,
        });
    }
    let abi = ABI::from(i32::from(kernel_abi));
    let handled = AccessFs::from_all(abi);
    let rs_err = |op| move |source| LandlockError::Ruleset { op, source };
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(handled)
        .map_err(rs_err("handle_access(fs)"))?;
    if plan.deny_tcp {
        let net = AccessNet::from_all(abi);
        if net.is_empty() {
            return Err(LandlockError::Unsupported {
                what: "TCP bind/connect denial",
                need: 4,
                have: kernel_abi,
            });
        }
        rs = rs
            .handle_access(net)
            .map_err(rs_err("handle_access(net)"))?;
    }
    let mut scopes = BitFlags::<Scope>::EMPTY;
    if plan.scope_abstract_unix {
        scopes |= Scope::AbstractUnixSocket;
    }
    if plan.scope_signals {
        scopes |= Scope::Signal;
    }
    if !scopes.is_empty() {
        if Scope::from_all(abi) & scopes != scopes {
            return Err(LandlockError::Unsupported {
                what: "scoping of abstract unix sockets / signals",
                need: 6,
                have: kernel_abi,
            });
        }
        rs = rs.scope(scopes).map_err(rs_err("scope"))?;
    }
    let mut created = rs.create().map_err(rs_err("create"))?;
    if plan.deny_tcp {
        // A brokered network's forwarded ports (only its loopback listeners answer there).
        for &port in &plan.tcp_connect {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(|source| LandlockError::NetRule { port, source })?;
        }
    }

    let mut sandbox_rules = Vec::new();
    for rule in &plan.rules {
        let access = access_for(rule.rights, abi);
        let (host, fd, is_dir): (PathBuf, OwnedFd, bool) = match &rule.path {
            LandlockPath::Host(p) => {
                let (fd, is_dir) = match open_path(p) {
                    Ok(opened) => opened,
                    // A missing path grants nothing: skipping its rule only removes access.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(LandlockError::Open {
                            path: p.clone(),
                            source,
                        })
                    }
                };
                (p.clone(), fd, is_dir)
            }
            LandlockPath::Workspace => match workspace {
                Some(w) => {
                    let path = PathBuf::from("(workspace)");
                    let fd = w.try_clone().map_err(|source| LandlockError::Open {
                        path: path.clone(),
                        source,
                    })?;
                    (path, fd, true)
                }
                None => continue,
            },
            LandlockPath::Sandbox(p) => {
                let path = CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| LandlockError::Nul { path: p.clone() })?;
                sandbox_rules.push(SandboxRule {
                    path,
                    dir_access: access.bits(),
                    file_access: (access & AccessFs::from_file(abi)).bits(),
                });
                continue;
            }
        };
        let access = if is_dir {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        if access.is_empty() {
            continue;
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|source| LandlockError::Rule { path: host, source })?;
    }
    let fd: Option<OwnedFd> = created.into();
    let ruleset = fd.ok_or(LandlockError::NoFd)?;
    Ok(Prepared {
        ruleset,
        sandbox_rules,
        abi: kernel_abi,
    })
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Child: add one sandbox rule. A missing path is skipped (it grants nothing).
pub fn child_add_sandbox_rule(ruleset: RawFd, rule: &SandboxRule) -> Result<(), i32> {
    // SAFETY: `rule.path` is a valid NUL-terminated string; O_PATH opens nothing for I/O.
    let fd = unsafe { libc::open(rule.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = crate::fds::errno();
        return if e == libc::ENOENT { Ok(()) } else { Err(e) };
    }
    // SAFETY: all-zero is a valid `struct stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on the fd just opened, into a local.
    let r = unsafe { libc::fstat(fd, &mut st) };
    if r != 0 {
        let e = crate::fds::errno();
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let access = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        rule.dir_access
    } else {
        rule.file_access
    };
    let mut result = Ok(());
    if access != 0 {
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: fd,
        };
        // SAFETY: `attr` is a packed landlock_path_beneath_attr living across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0 as libc::c_uint,
            )
        };
        if r != 0 {
            result = Err(crate::fds::errno());
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
}

/// Child: enforce the ruleset on ourselves (no_new_privs must be set).
pub fn child_restrict_self(ruleset: RawFd) -> Result<(), i32> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0 as libc::c_uint) };
    if r != 0 {
        return Err(crate::fds::errno());
    }
    Ok(())
}

impl Prepared {
    pub fn raw_fd(&self) -> RawFd {
        self.ruleset.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_policy::plan::LandlockRule;

    fn rights(read: bool, write: bool, execute: bool) -> FsRights {
        FsRights {
            read,
            write,
            execute,
            ioctl_dev: false,
        }
    }

    #[test]
    fn rights_mapping() {
        let r = access_for(rights(true, false, false), ABI::V6);
        assert_eq!(r, AccessFs::ReadFile | AccessFs::ReadDir);
        let rx = access_for(rights(true, false, true), ABI::V6);
        assert!(rx.contains(AccessFs::Execute));
        let w = access_for(rights(false, true, false), ABI::V6);
        assert!(w.contains(AccessFs::WriteFile | AccessFs::MakeReg | AccessFs::Truncate));
        assert!(!w.contains(AccessFs::MakeChar));
        assert!(!w.contains(AccessFs::MakeBlock));
        assert!(!w.contains(AccessFs::Execute));
        // ABI 1 has no Truncate/Refer.
        let w1 = access_for(rights(false, true, false), ABI::V1);
        assert!(!w1.contains(AccessFs::Truncate));
        assert!(!w1.contains(AccessFs::Refer));
        let ioctl = access_for(
            FsRights {
                ioctl_dev: true,
                ..FsRights::default()
            },
            ABI::V4,
        );
        assert!(ioctl.is_empty(), "IoctlDev needs ABI 5");
    }

    #[test]
    fn probe_matches_kernel() {
        // This project requires Landlock; the build machines have it.
        assert!(probe_abi() >= 1, "Landlock not available on this kernel");
    }

    #[test]
    fn refuses_below_min_abi() {
        let plan = LandlockPlan {
            min_abi: 99,
            rules: vec![],
            deny_tcp: false,
            tcp_connect: Vec::new(),
            scope_abstract_unix: false,
            scope_signals: false,
        };
        assert!(matches!(
            prepare(&plan, None, probe_abi()),
            Err(LandlockError::AbiTooOld { need: 99, .. })
        ));
        assert!(matches!(
            prepare(&LandlockPlan { min_abi: 1, ..plan }, None, 0),
            Err(LandlockError::AbiTooOld { .. })
        ));
    }

    #[test]
    fn directory_or_file_is_decided_by_the_descriptor_not_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x");
        std::fs::create_dir(&p).unwrap();
        let (_, dir) = open_path(&p).unwrap();
        assert!(dir);
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&p)
            .unwrap();
        // The path now names a file; the open descriptor still names the directory.
        std::fs::rename(&p, tmp.path().join("moved")).unwrap();
        std::fs::write(&p, "").unwrap();
        assert!(is_dir(&f));
        let (_, dir) = open_path(&p).unwrap();
        assert!(!dir);
    }

    #[test]
    fn builds_ruleset_with_file_and_dir_rules() {
        let plan = LandlockPlan {
            min_abi: 1,
            rules: vec![
                LandlockRule {
                    path: LandlockPath::Host("/usr".into()),
                    rights: rights(true, false, true),
                },
                // A file: directory rights must be masked, not rejected.
                LandlockRule {
                    path: LandlockPath::Host("/etc/passwd".into()),
                    rights: rights(true, true, false),
                },
                LandlockRule {
                    path: LandlockPath::Host("/does/not/exist".into()),
                    rights: rights(true, false, false),
                },
                LandlockRule {
                    path: LandlockPath::Sandbox("/tmp".into()),
                    rights: rights(true, true, false),
                },
            ],
            deny_tcp: false,
            tcp_connect: Vec::new(),
            scope_abstract_unix: false,
            scope_signals: false,
        };
        let p = prepare(&plan, None, probe_abi()).unwrap();
        assert_eq!(p.sandbox_rules.len(), 1);
        let s = &p.sandbox_rules[0];
        assert_ne!(s.dir_access & AccessFs::MakeDir as u64, 0);
        assert_eq!(s.file_access & AccessFs::MakeDir as u64, 0);
        assert_ne!(s.file_access & AccessFs::WriteFile as u64, 0);
    }
}
