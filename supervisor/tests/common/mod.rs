//! Shared helpers for the privileged tests.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_policy::plan::*;

/// Privileged tests need root; they fail (not skip) unless CARAPACE_ALLOW_SKIP=1.
/// Returns false when the test should be skipped.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CARAPACE_ALLOW_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: needs root (CARAPACE_ALLOW_SKIP=1)");
        return false;
    }
    panic!("this privileged test needs root; run as root or set CARAPACE_ALLOW_SKIP=1 to skip");
}

fn bind(p: &str, exec: bool, optional: bool) -> Mount {
    Mount::Bind {
        src: p.into(),
        dst: p.into(),
        writable: false,
        exec,
        optional,
    }
}

fn rights(read: bool, write: bool, execute: bool) -> FsRights {
    FsRights {
        read,
        write,
        execute,
        ioctl_dev: false,
    }
}

/// A seccomp program: kill foreign architectures, allow everything else except `ptrace`
/// (EPERM), enough to see "Seccomp: 2" and prove the filter is in force.
pub fn simple_bpf() -> Vec<BpfInsn> {
    let i = |code, jt, jf, k| BpfInsn { code, jt, jf, k };
    vec![
        i(0x20, 0, 0, 4),               // ld arch
        i(0x15, 1, 0, 0xc000_003e),     // jeq x86_64
        i(0x06, 0, 0, 0x8000_0000),     // ret KILL_PROCESS
        i(0x20, 0, 0, 0),               // ld nr
        i(0x15, 0, 1, 101),             // jeq ptrace
        i(0x06, 0, 0, 0x0005_0000 | 1), // ret ERRNO(EPERM)
        i(0x06, 0, 0, 0x7fff_0000),     // ret ALLOW
    ]
}

/// A hand-built plan resembling the default tool profile.
pub fn hand_plan() -> Plan {
    Plan {
        profile: "hand".into(),
        namespaces: Namespaces {
            user: true,
            pid: true,
            mount: true,
            ipc: true,
            uts: true,
            net: true,
            cgroup: true,
        },
        user: SandboxUser {
            uid: 1000,
            gid: 1000,
        },
        hostname: "carapace".into(),
        mounts: vec![
            bind("/usr", true, false),
            Mount::Symlink {
                dst: "/bin".into(),
                target: "usr/bin".into(),
            },
            Mount::Symlink {
                dst: "/lib".into(),
                target: "usr/lib".into(),
            },
            Mount::Symlink {
                dst: "/lib64".into(),
                target: "usr/lib64".into(),
            },
            bind("/etc/ld.so.cache", false, true),
            bind("/etc/passwd", false, true),
            Mount::Proc {
                dst: "/proc".into(),
            },
            Mount::Dev {
                dst: "/dev".into(),
                pts: false,
            },
            Mount::Tmpfs {
                dst: "/tmp".into(),
                size_bytes: 16 << 20,
                mode: 0o1777,
                exec: false,
            },
            Mount::Workspace {
                dst: "/workspace".into(),
                writable: true,
                exec: false,
            },
        ],
        cwd: "/workspace".into(),
        landlock: LandlockPlan {
            min_abi: 1,
            rules: vec![
                LandlockRule {
                    path: LandlockPath::Host("/usr".into()),
                    rights: rights(true, false, true),
                },
                LandlockRule {
                    path: LandlockPath::Host("/etc".into()),
                    rights: rights(true, false, false),
                },
                LandlockRule {
                    path: LandlockPath::Workspace,
                    rights: rights(true, true, false),
                },
                LandlockRule {
                    path: LandlockPath::Sandbox("/tmp".into()),
                    rights: rights(true, true, false),
                },
                LandlockRule {
                    path: LandlockPath::Sandbox("/proc".into()),
                    rights: rights(true, false, false),
                },
                LandlockRule {
                    path: LandlockPath::Sandbox("/dev".into()),
                    rights: FsRights {
                        read: true,
                        write: true,
                        execute: false,
                        ioctl_dev: true,
                    },
                },
            ],
            tcp_connect: Vec::new(),
            deny_tcp: true,
            scope_abstract_unix: true,
            scope_signals: true,
        },
        seccomp: SeccompPlan {
            program: simple_bpf(),
            default_action: SeccompAction::Allow,
            allowed: vec![],
            conditional: vec![],
            denied: vec![("ptrace".into(), SeccompAction::Errno(1))],
            setid_guard: Default::default(),
        },
        cgroup: CgroupLimits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            cpu_millis: Some(1000),
        },
        rlimits: vec![
            Rlimit {
                resource: RlimitResource::Nofile,
                value: 256,
            },
            Rlimit {
                resource: RlimitResource::Core,
                value: 0,
            },
        ],
        wall_time: Some(Duration::from_secs(20)),
        env: EnvPlan {
            pass: vec!["LANG".into()],
            set: vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("HOME".into(), "/workspace".into()),
            ],
        },
        network: Network::None,
    }
}

/// A fresh workspace directory owned by `uid:gid` (under /tmp, removed on drop).
pub fn workspace(uid: u32, gid: u32) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("carapace-ws-")
        .tempdir()
        .expect("tempdir");
    std::os::unix::fs::chown(d.path(), Some(uid), Some(gid)).expect("chown workspace");
    d
}

pub fn path(p: &Path) -> PathBuf {
    p.to_path_buf()
}

/// `p` opened as a run's program (canonicalized first: links are not followed when opening).
pub fn opened(p: impl AsRef<Path>) -> std::sync::Arc<carapace_sandbox::program::OpenedProgram> {
    let canon = std::fs::canonicalize(p.as_ref()).expect("program exists");
    std::sync::Arc::new(
        carapace_sandbox::program::OpenedProgram::open(&canon).expect("program opens"),
    )
}
