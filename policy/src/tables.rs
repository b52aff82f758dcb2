//! Name tables: syscalls and errno values (from the `syscalls` crate), socket domains, ioctl requests,
//! clone flags, and the named syscall groups with the reason each exists.

use syscalls::{Errno, Sysno};

// The syscall numbers below and the architecture guard of every filter (`bpf.rs`) are x86_64's.
// Built for another architecture, every filter would kill every program at its first syscall.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "carapace-policy's syscall tables and seccomp filters cover only x86_64; \
     this target architecture is not supported"
);

/// Every known x86_64 syscall (name, number): the `syscalls` crate's table, generated from the
/// kernel's arch/x86/entry/syscalls/syscall_64.tbl (x32 numbers are not in it: the plan's guard
/// kills every x32 syscall before a name matters).
pub fn all_syscalls() -> impl Iterator<Item = (&'static str, i64)> {
    Sysno::iter().map(|s| (s.name(), i64::from(s.id())))
}

/// x86_64 number of a syscall name.
pub fn syscall_nr(name: &str) -> Option<i64> {
    name.parse::<Sysno>().ok().map(|s| i64::from(s.id()))
}

/// Every syscall name, for suggestions.
pub(crate) fn syscall_names() -> Vec<&'static str> {
    Sysno::iter().map(|s| s.name()).collect()
}

/// errno values are 1..=4095 (the kernel returns -4095..-1 as errors).
const ERRNO_MAX: i32 = 4095;

pub(crate) fn errno_value(name: &str) -> Option<u32> {
    (1..=ERRNO_MAX)
        .find(|&v| Errno::new(v).name() == Some(name))
        .and_then(|v| u32::try_from(v).ok())
}

pub(crate) fn errno_name(value: u32) -> Option<&'static str> {
    Errno::new(i32::try_from(value).ok()?).name()
}

/// Socket address families (values from <bits/socket.h>).
pub(crate) const SOCKET_DOMAINS: &[(&str, u32)] = &[
    ("AF_UNIX", 1),
    ("AF_INET", 2),
    ("AF_INET6", 10),
    ("AF_NETLINK", 16),
    ("AF_PACKET", 17),
    ("AF_VSOCK", 40),
    ("AF_ALG", 38),
    ("AF_BLUETOOTH", 31),
    ("AF_CAN", 29),
    ("AF_KEY", 15),
    ("AF_XDP", 44),
];

/// ioctl request numbers (x86_64, from <asm-generic/ioctls.h>). The filter compares only the
/// low 32 bits of the argument, as the kernel does (CVE-2019-10063).
pub(crate) const IOCTL_REQUESTS: &[(&str, u32)] = &[
    ("TCGETS", 0x5401),
    ("TCSETS", 0x5402),
    ("TCSETSW", 0x5403),
    ("TCSETSF", 0x5404),
    ("TCGETA", 0x5405),
    ("TIOCSCTTY", 0x540E),
    ("TIOCGPGRP", 0x540F),
    ("TIOCSPGRP", 0x5410),
    ("TIOCOUTQ", 0x5411),
    ("TIOCSTI", 0x5412),
    ("TIOCGWINSZ", 0x5413),
    ("TIOCSWINSZ", 0x5414),
    ("FIONREAD", 0x541B),
    ("TIOCLINUX", 0x541C),
    ("FIONBIO", 0x5421),
    ("TIOCGPTN", 0x8004_5430),
    ("TIOCSPTLCK", 0x4004_5431),
    ("TIOCGPTPEER", 0x5441),
    ("FIONCLEX", 0x5450),
    ("FIOCLEX", 0x5451),
    ("FIOASYNC", 0x5452),
    ("TIOCGSID", 0x5429),
    ("FICLONE", 0x4004_9409),
    ("FS_IOC_GETFLAGS", 0x8008_6601),
];

/// clone(2) flags that can be forbidden by `clone_deny_flags`. CLONE_NEWTIME is absent: for
/// clone(2) its bit (0x80) is part of the exit signal field and cannot be filtered that way.
pub(crate) const CLONE_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWNS", 0x0002_0000),
    ("CLONE_NEWCGROUP", 0x0200_0000),
    ("CLONE_NEWUTS", 0x0400_0000),
    ("CLONE_NEWIPC", 0x0800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
    ("CLONE_PTRACE", 0x0000_2000),
    ("CLONE_UNTRACED", 0x0080_0000),
    ("CLONE_IO", 0x8000_0000),
];

/// Default `clone_deny_flags`: every namespace flag clone(2) accepts.
pub(crate) const DEFAULT_CLONE_DENY: &[&str] = &[
    "CLONE_NEWNS",
    "CLONE_NEWCGROUP",
    "CLONE_NEWUTS",
    "CLONE_NEWIPC",
    "CLONE_NEWUSER",
    "CLONE_NEWPID",
    "CLONE_NEWNET",
];

/// Default `socket_domains`.
pub(crate) const DEFAULT_SOCKET_DOMAINS: &[&str] = &["AF_UNIX"];

/// Default `ioctl_requests`: terminal queries and fd flags, nothing that writes to a terminal's
/// input (TIOCSTI) or talks to the console (TIOCLINUX).
pub(crate) const DEFAULT_IOCTLS: &[&str] = &[
    "TCGETS",
    "TIOCGWINSZ",
    "TIOCGPGRP",
    "FIONREAD",
    "FIOCLEX",
    "FIONCLEX",
    "FIONBIO",
];

/// personality(2) values allowed when `personality` is allowed: PER_LINUX and the query value.
pub(crate) const PERSONALITY_SAFE: &[(&str, u32)] = &[("PER_LINUX", 0), ("query", 0xffff_ffff)];

/// Syscalls that no group may contain: kernel attack surface, namespace/mount manipulation,
/// cross-process access, or whole-system effects. They can still be allowed by naming them in
/// `allow` one by one, which is a deliberate, reviewable act.
pub const FORBIDDEN_IN_GROUPS: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "fanotify_init",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "clone3",
    "personality",
    "vhangup",
    "chroot",
    "pidfd_getfd",
    "kcmp",
    "process_madvise",
    "memfd_secret",
    "memfd_create",
    "seccomp",
    "uselib",
    "_sysctl",
    "nfsservctl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
];

/// Which identity a set*id call changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Uid,
    Gid,
}

/// The set*id calls of `@setid-keep`: (name, the ids it sets, how many id arguments it takes,
/// all leading). Wherever one is allowed (by the group or by name) the filter checks that every
/// id argument is -1 or the sandbox's own id, so it can only keep the current ids.
pub const SETID_KEEP: &[(&str, IdKind, u8)] = &[
    ("setuid", IdKind::Uid, 1),
    ("setgid", IdKind::Gid, 1),
    ("setreuid", IdKind::Uid, 2),
    ("setregid", IdKind::Gid, 2),
    ("setresuid", IdKind::Uid, 3),
    ("setresgid", IdKind::Gid, 3),
    ("setfsuid", IdKind::Uid, 1),
    ("setfsgid", IdKind::Gid, 1),
];

/// Syscalls the filter ALWAYS compiles with an argument condition when they are allowed,
/// whether by a group or by name; a group may contain them only because of that (unit-tested:
/// allowing one never lists it as allowed without conditions):
///
/// * the set*id calls of [`SETID_KEEP`]: each id argument is -1 or the sandbox's own id;
/// * `mknod`, `mknodat`: only FIFOs (file type S_IFIFO, no S_ISUID/S_ISGID in the mode), so no
///   device node, socket or regular file.
pub const ALWAYS_CONDITIONED: &[&str] = &[
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setfsuid",
    "setfsgid",
    "mknod",
    "mknodat",
];

/// A named syscall group: `@name` in `allow`.
#[derive(Debug)]
pub struct Group {
    pub name: &'static str,
    /// Why the group exists and what it lets a program do.
    pub why: &'static str,
    pub syscalls: &'static [&'static str],
}

/// The syscall groups. None contains a syscall of [`FORBIDDEN_IN_GROUPS`] (unit-tested); the
/// ones of [`ALWAYS_CONDITIONED`] are filtered by their arguments wherever they are allowed.
pub const GROUPS: &[Group] = &[
    Group {
        name: "@default",
        why: "what every dynamically linked program needs to start, run and exit: execve (or \
              execveat, how carapace starts it) of the program itself, memory mapping, signal handler setup, thread-local storage, \
              futexes, reading and writing already-open descriptors, identity queries",
        syscalls: &[
            "execve",
            // The supervisor starts every program with execveat(fd, "", AT_EMPTY_PATH) of the
            // file it checked, after this filter is installed.
            "execveat",
            "exit",
            "exit_group",
            "brk",
            "mmap",
            "munmap",
            "mprotect",
            "mremap",
            "madvise",
            "rt_sigreturn",
            "rt_sigaction",
            "rt_sigprocmask",
            "sigaltstack",
            "arch_prctl",
            "set_tid_address",
            "set_robust_list",
            "get_robust_list",
            "rseq",
            "futex",
            "futex_waitv",
            "futex_wake",
            "futex_wait",
            "futex_requeue",
            "getrandom",
            "prlimit64",
            "getrlimit",
            "uname",
            "getpid",
            "gettid",
            "getppid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "getpgrp",
            "getpgid",
            "getsid",
            "sched_yield",
            "sched_getaffinity",
            "restart_syscall",
            "read",
            "write",
            "readv",
            "writev",
            "pread64",
            "pwrite64",
            "preadv",
            "pwritev",
            "preadv2",
            "pwritev2",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "fcntl",
            "lseek",
            "ioctl",
            "pipe",
            "pipe2",
            "fstat",
            "sysinfo",
            "getrusage",
            "times",
        ],
    },
    Group {
        name: "@file-read",
        why: "open, stat and list files and directories, follow symlinks, read extended \
              attributes; what rights apply is decided by Landlock and the mount flags",
        syscalls: &[
            "open",
            "openat",
            "openat2",
            "stat",
            "lstat",
            "newfstatat",
            "statx",
            "access",
            "faccessat",
            "faccessat2",
            "readlink",
            "readlinkat",
            "getdents",
            "getdents64",
            "getcwd",
            "chdir",
            "fchdir",
            "statfs",
            "fstatfs",
            "fadvise64",
            "readahead",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "sendfile",
            "splice",
            "tee",
            "flock",
            "inotify_init",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
            "mincore",
        ],
    },
    Group {
        name: "@file-write",
        why: "create, modify, rename and remove files and directories, make FIFOs (mknod and \
              mknodat are always filtered: FIFOs only, never a device node); where this works \
              is decided by Landlock and read-only mounts (only the workspace and tmpfs by \
              default)",
        syscalls: &[
            "creat",
            "mkdir",
            "mkdirat",
            "rmdir",
            "unlink",
            "unlinkat",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "symlink",
            "symlinkat",
            "truncate",
            "ftruncate",
            "fallocate",
            "fsync",
            "fdatasync",
            "sync_file_range",
            "syncfs",
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "chown",
            "fchown",
            "lchown",
            "fchownat",
            "umask",
            "utime",
            "utimes",
            "utimensat",
            "futimesat",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
            "copy_file_range",
            // Always conditioned (ALWAYS_CONDITIONED): only FIFOs.
            "mknod",
            "mknodat",
        ],
    },
    Group {
        name: "@process",
        why: "create and wait for child processes and threads (clone is filtered by \
              clone_deny_flags, so no new namespaces), exec other programs, process groups and \
              sessions, scheduling hints, prctl for names and death signals",
        syscalls: &[
            "clone",
            "fork",
            "vfork",
            "wait4",
            "waitid",
            "setpgid",
            "setsid",
            "prctl",
            "capget",
            "getcpu",
            "sched_getparam",
            "sched_getscheduler",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "sched_setaffinity",
            "getpriority",
            "setpriority",
            "pidfd_open",
            "set_mempolicy",
            "get_mempolicy",
        ],
    },
    Group {
        name: "@signal",
        why: "send and wait for signals; the pid namespace (and Landlock signal scoping on ABI \
              6+) keeps them inside the sandbox",
        syscalls: &[
            "kill",
            "tkill",
            "tgkill",
            "rt_sigsuspend",
            "rt_sigpending",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "pause",
            "alarm",
            "setitimer",
            "getitimer",
            "signalfd",
            "signalfd4",
            "pidfd_send_signal",
        ],
    },
    Group {
        name: "@time",
        why: "read clocks, sleep and use timers; setting the clock is not included",
        syscalls: &[
            "clock_gettime",
            "clock_getres",
            "clock_nanosleep",
            "nanosleep",
            "gettimeofday",
            "time",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
        ],
    },
    Group {
        name: "@memory",
        why: "less common memory management: locking (bounded by RLIMIT_MEMLOCK), syncing \
              mappings, protection keys",
        syscalls: &[
            "mlock",
            "mlock2",
            "munlock",
            "mlockall",
            "munlockall",
            "msync",
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "membarrier",
            "mseal",
            "map_shadow_stack",
        ],
    },
    Group {
        name: "@io-event",
        why: "wait for readiness on many descriptors (poll, select, epoll) and event \
              descriptors; used by every event loop (python asyncio, git's run-command)",
        syscalls: &[
            "poll",
            "ppoll",
            "select",
            "pselect6",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd",
            "eventfd2",
        ],
    },
    Group {
        name: "@network-local",
        why: "sockets and their use; `socket`/`socketpair` are restricted to socket_domains \
              (AF_UNIX by default) and the net namespace is empty, so this is local IPC only",
        syscalls: &[
            "socket",
            "socketpair",
            "bind",
            "listen",
            "accept",
            "accept4",
            "connect",
            "getsockname",
            "getpeername",
            "setsockopt",
            "getsockopt",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "sendmmsg",
            "recvmmsg",
            "shutdown",
        ],
    },
    Group {
        name: "@ipc",
        why: "System V and POSIX IPC (shared memory, semaphores, message queues); the ipc \
              namespace makes them private to the sandbox. Python's multiprocessing uses them",
        syscalls: &[
            "shmget",
            "shmat",
            "shmdt",
            "shmctl",
            "semget",
            "semop",
            "semtimedop",
            "semctl",
            "msgget",
            "msgsnd",
            "msgrcv",
            "msgctl",
            "mq_open",
            "mq_unlink",
            "mq_timedsend",
            "mq_timedreceive",
            "mq_notify",
            "mq_getsetattr",
        ],
    },
    Group {
        name: "@setid-keep",
        why: "set*id calls that keep the current ids (make's child runs setresuid(-1, \
              getuid(), -1) before exec): always filtered, each id argument must be -1 or the \
              sandbox's own uid (for the *uid calls) or gid (for the *gid calls), so the call \
              changes nothing; any other value gets the default action. The sandbox holds no \
              capability and runs with no_new_privs, so the kernel grants nothing here anyway; \
              setgroups is not included",
        syscalls: &[
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setfsuid",
            "setfsgid",
        ],
    },
];

pub(crate) fn group(name: &str) -> Option<&'static Group> {
    GROUPS.iter().find(|g| g.name == name)
}

pub(crate) fn lookup<T: Copy>(table: &[(&str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

pub(crate) fn names<T>(table: &[(&str, T)]) -> String {
    table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}
