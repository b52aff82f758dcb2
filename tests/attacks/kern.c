/* Kernel-interface attacks: mounts, namespaces, privileged syscalls, capabilities, ttys.
 * Each probe stops at the first step that proves the power (a mount fd obtained, a capability
 * check passed) and undoes it, so the host controls are safe to run as root.
 */
#include "attack.h"

#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/keyctl.h>
#include <linux/mount.h>
#include <linux/perf_event.h>
#include <linux/io_uring.h>
#include <grp.h>
#include <sched.h>
#include <sys/fanotify.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <termios.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

/* mount FSTYPE DIR [DATA]: mount a fresh filesystem (tmpfs, proc, cgroup for the release_agent
 * escape, ...). Unmounted again at once when it works. */
ATTACK(mount)
{
    const char *type = arg_str(argc, argv, 1, "tmpfs");
    const char *dir = arg_str(argc, argv, 2, "/workspace/mnt");
    const char *data = arg_str(argc, argv, 3, NULL);
    mkdir(dir, 0755);
    if (mount(type, dir, type, MS_NOSUID | MS_NODEV, data) == 0) {
        umount2(dir, MNT_DETACH);
        escaped("mounted %s on %s", type, dir);
    }
    blocked("mount %s on %s: %s", type, dir, en());
}

/* umount PATH...: detach mounts (revealing what is beneath, e.g. an un-detached old root). */
ATTACK(umount)
{
    char why[2048] = "";
    for (int i = 1; i < argc; i++) {
        if (umount2(argv[i], MNT_DETACH) == 0)
            escaped("unmounted %s", argv[i]);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", argv[i], en());
    }
    blocked("%s", why);
}

/* remount_rw PATH: make a read-only bind mount writable (by remount and by mount_setattr). */
ATTACK(remount_rw)
{
    const char *path = arg_str(argc, argv, 1, "/usr");
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_BIND, NULL) == 0)
        escaped("remounted %s read-write", path);
    int e = errno;
    struct mount_attr attr = {.attr_clr = MOUNT_ATTR_RDONLY};
    if (syscall(SYS_mount_setattr, AT_FDCWD, path, 0, &attr, sizeof attr) == 0)
        escaped("mount_setattr cleared RDONLY on %s", path);
    blocked("remount %s: %s; mount_setattr: %s", path, errname(e), en());
}

/* open_tree PATH: clone a mount tree (the first step of moving it elsewhere). */
ATTACK(open_tree)
{
    const char *path = arg_str(argc, argv, 1, "/");
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE | AT_RECURSIVE | O_CLOEXEC);
    if (fd >= 0)
        escaped("open_tree(OPEN_TREE_CLONE) of %s", path);
    blocked("open_tree %s: %s", path, en());
}

/* fsopen: the new mount API's filesystem context (then fsconfig/fsmount). */
ATTACK(fsopen)
{
    (void)argc;
    (void)argv;
    int fd = (int)syscall(SYS_fsopen, "tmpfs", FSOPEN_CLOEXEC);
    if (fd < 0)
        blocked("fsopen(tmpfs): %s", en());
    syscall(SYS_fsconfig, fd, FSCONFIG_CMD_CREATE, NULL, NULL, 0);
    int m = (int)syscall(SYS_fsmount, fd, FSMOUNT_CLOEXEC, 0);
    escaped("fsopen(tmpfs) worked (fsmount: %s)", m >= 0 ? "ok" : en());
}

/* move_mount SRC DST: clone SRC (or make a fresh tmpfs) and attach it at DST. */
ATTACK(move_mount)
{
    const char *src = arg_str(argc, argv, 1, "/workspace");
    const char *dst = arg_str(argc, argv, 2, "/tmp");
    char why[512];
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, src, OPEN_TREE_CLONE | O_CLOEXEC);
    snprintf(why, sizeof why, "open_tree: %s", fd < 0 ? en() : "ok");
    if (fd < 0) {
        int c = (int)syscall(SYS_fsopen, "tmpfs", FSOPEN_CLOEXEC);
        if (c >= 0 && syscall(SYS_fsconfig, c, FSCONFIG_CMD_CREATE, NULL, NULL, 0) == 0)
            fd = (int)syscall(SYS_fsmount, c, FSMOUNT_CLOEXEC, 0);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "; fsopen/fsmount: %s", fd < 0 ? en() : "ok");
    }
    if (fd < 0)
        blocked("%s", why);
    if (syscall(SYS_move_mount, fd, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH) == 0) {
        umount2(dst, MNT_DETACH);
        escaped("move_mount onto %s", dst);
    }
    blocked("%s; move_mount: %s", why, en());
}

/* unshare_user: a nested user namespace gives a full capability set over new namespaces: the
 * gateway to mount, netfilter and most kernel-bug exploitation. */
ATTACK(unshare_user)
{
    (void)argc;
    (void)argv;
    if (unshare(CLONE_NEWUSER) == 0)
        escaped("unshare(CLONE_NEWUSER)");
    blocked("unshare(CLONE_NEWUSER): %s", en());
}

/* clone_newuser: the same through raw clone(2) flags. */
ATTACK(clone_newuser)
{
    (void)argc;
    (void)argv;
    long r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (r == 0)
        _exit(0);
    if (r > 0) {
        waitpid((pid_t)r, NULL, 0);
        escaped("clone(CLONE_NEWUSER) created pid %ld", r);
    }
    blocked("clone(CLONE_NEWUSER): %s", en());
}

struct clone_args_v0 {
    unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

/* clone3_newuser: clone3 passes its flags in memory, where seccomp cannot look: it must be
 * refused as a whole (ENOSYS makes glibc fall back to clone). */
ATTACK(clone3_newuser)
{
    (void)argc;
    (void)argv;
    struct clone_args_v0 a = {.flags = CLONE_NEWUSER, .exit_signal = SIGCHLD};
    long r = syscall(SYS_clone3, &a, sizeof a);
    if (r == 0)
        _exit(0);
    if (r > 0) {
        waitpid((pid_t)r, NULL, 0);
        escaped("clone3(CLONE_NEWUSER) created pid %ld", r);
    }
    int e = errno;
    struct clone_args_v0 b = {.flags = CLONE_NEWNS | CLONE_NEWNET, .exit_signal = SIGCHLD};
    r = syscall(SYS_clone3, &b, sizeof b);
    if (r == 0)
        _exit(0);
    if (r > 0) {
        waitpid((pid_t)r, NULL, 0);
        escaped("clone3(CLONE_NEWNS|CLONE_NEWNET) created pid %ld", r);
    }
    blocked("clone3(CLONE_NEWUSER): %s; clone3(NEWNS|NEWNET): %s", errname(e), en());
}

/* unshare_other: every other namespace type, one at a time. */
ATTACK(unshare_other)
{
    (void)argc;
    (void)argv;
    struct {
        int flag;
        const char *name;
    } ns[] = {{CLONE_NEWNS, "NEWNS"},         {CLONE_NEWNET, "NEWNET"},   {CLONE_NEWPID, "NEWPID"},
              {CLONE_NEWIPC, "NEWIPC"},       {CLONE_NEWUTS, "NEWUTS"},   {CLONE_NEWCGROUP, "NEWCGROUP"},
              {CLONE_NEWTIME, "NEWTIME"},     {CLONE_NEWUSER | CLONE_NEWNS, "NEWUSER|NEWNS"}};
    char why[1024] = "";
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        pid_t c = fork();
        if (c == 0)
            _exit(unshare(ns[i].flag) == 0 ? 0 : errno);
        int st = 0;
        waitpid(c, &st, 0);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
            escaped("unshare(CLONE_%s)", ns[i].name);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", ns[i].name,
                 WIFEXITED(st) ? errname(WEXITSTATUS(st)) : "killed");
    }
    blocked("%s", why);
}

/* keyctl: the kernel keyring is not namespaced (keys of other sandboxes, kernel bugs). */
ATTACK(keyctl)
{
    (void)argc;
    (void)argv;
    long k = syscall(SYS_add_key, "user", "carapace-escape", "x", 1, KEY_SPEC_PROCESS_KEYRING);
    if (k >= 0)
        escaped("add_key created key %ld", k);
    int e = errno;
    long r = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0);
    if (r >= 0)
        escaped("keyctl(GET_KEYRING_ID) user keyring %ld", r);
    blocked("add_key: %s; keyctl: %s", errname(e), en());
}

/* bpf: map creation / program loading (kernel attack surface, spectre gadgets). */
ATTACK(bpf)
{
    (void)argc;
    (void)argv;
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_ARRAY;
    a.key_size = 4;
    a.value_size = 4;
    a.max_entries = 1;
    long fd = syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a);
    if (fd >= 0)
        escaped("bpf(BPF_MAP_CREATE)");
    int e = errno;
    struct bpf_insn prog[] = {{.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
                              {.code = BPF_JMP | BPF_EXIT}};
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    a.insns = (unsigned long)prog;
    a.insn_cnt = 2;
    a.license = (unsigned long)"GPL";
    fd = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a);
    if (fd >= 0)
        escaped("bpf(BPF_PROG_LOAD)");
    blocked("BPF_MAP_CREATE: %s; BPF_PROG_LOAD: %s", errname(e), en());
}

/* perf_event_open: even the most permissive request (own process, user space only). */
ATTACK(perf_event)
{
    (void)argc;
    (void)argv;
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.type = PERF_TYPE_SOFTWARE;
    a.config = PERF_COUNT_SW_CPU_CLOCK;
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    long fd = syscall(SYS_perf_event_open, &a, 0, -1, -1, 0);
    if (fd >= 0)
        escaped("perf_event_open on self");
    blocked("perf_event_open: %s", en());
}

/* userfaultfd: the classic tool to win kernel races (syscall and /dev/userfaultfd). */
ATTACK(userfaultfd)
{
    (void)argc;
    (void)argv;
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC | 1 /* UFFD_USER_MODE_ONLY */);
    if (fd >= 0)
        escaped("userfaultfd(UFFD_USER_MODE_ONLY)");
    int e = errno;
    fd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd >= 0)
        escaped("userfaultfd()");
    int d = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (d >= 0)
        escaped("opened /dev/userfaultfd");
    blocked("userfaultfd(USER_MODE_ONLY): %s; /dev/userfaultfd: %s", errname(e), en());
}

/* io_uring: performs socket/open/... without the corresponding syscalls passing seccomp. */
ATTACK(io_uring)
{
    (void)argc;
    (void)argv;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = syscall(SYS_io_uring_setup, 4, &p);
    if (fd >= 0)
        escaped("io_uring_setup");
    blocked("io_uring_setup: %s", en());
}

/* module: finit_module of a non-module file. EPERM/ENOSYS means the capability check (or
 * seccomp) stopped it; ENOEXEC/EINVAL/EBADMSG mean it got past CAP_SYS_MODULE to the loader. */
ATTACK(module)
{
    (void)argc;
    (void)argv;
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    long r = syscall(SYS_finit_module, fd, "", 0);
    int e = errno;
    if (r == 0 || (e != EPERM && e != ENOSYS && e != EACCES))
        escaped("finit_module reached the module loader (%s)", r == 0 ? "loaded!" : errname(e));
    char img[64] = {0x7f, 'E', 'L', 'F'};
    r = syscall(SYS_init_module, img, sizeof img, "");
    if (r == 0 || (errno != EPERM && errno != ENOSYS && errno != EACCES))
        escaped("init_module reached the module loader (%s)", r == 0 ? "loaded!" : en());
    blocked("finit_module: %s; init_module: %s", errname(e), en());
}

/* reboot: with bad magic numbers. The kernel checks CAP_SYS_BOOT first (EPERM) and the magic
 * second (EINVAL), so EINVAL proves the power without rebooting anything. */
ATTACK(reboot)
{
    (void)argc;
    (void)argv;
    long r = syscall(SYS_reboot, 0, 0, 0, NULL);
    if (r == 0 || errno == EINVAL)
        escaped("reboot() passed the CAP_SYS_BOOT check (%s)", r == 0 ? "returned 0" : "EINVAL");
    blocked("reboot: %s", en());
}

/* sethostname NAME: allowed only with CAP_SYS_ADMIN over the UTS namespace; the test checks the
 * host's hostname is unchanged in any case. */
ATTACK(sethostname)
{
    const char *name = arg_str(argc, argv, 1, "pwned");
    if (sethostname(name, strlen(name)) == 0)
        escaped("sethostname(%s)", name);
    int e = errno;
    if (setdomainname(name, strlen(name)) == 0)
        escaped("setdomainname(%s)", name);
    blocked("sethostname: %s; setdomainname: %s", errname(e), en());
}

/* settime: settimeofday(NULL, NULL) performs the CAP_SYS_TIME check and then changes nothing. */
ATTACK(settime)
{
    (void)argc;
    (void)argv;
    if (syscall(SYS_settimeofday, NULL, NULL) == 0)
        escaped("settimeofday passed the CAP_SYS_TIME check");
    int e = errno;
    blocked("settimeofday: %s (clock untouched)", errname(e));
}

/* syslog: the kernel log leaks addresses and host activity (dmesg_restrict). */
ATTACK(syslog)
{
    (void)argc;
    (void)argv;
    static char buf[1 << 16];
    int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, sizeof buf);
    if (n > 0)
        escaped("read %d bytes of kernel log", n);
    int e = errno;
    int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0 && read(fd, buf, sizeof buf) > 0)
        escaped("read /dev/kmsg");
    blocked("syslog(READ_ALL): %s; /dev/kmsg: %s", errname(e), en());
}

/* kallsyms: kernel symbol addresses defeat KASLR; unprivileged readers see zeros. */
ATTACK(kallsyms)
{
    (void)argc;
    (void)argv;
    FILE *f = fopen("/proc/kallsyms", "re");
    if (!f)
        blocked("/proc/kallsyms: %s", en());
    char line[512];
    int lines = 0;
    while (fgets(line, sizeof line, f)) {
        lines++;
        if (strtoull(line, NULL, 16) != 0)
            escaped("kernel address visible: %.40s", line);
    }
    blocked("%d symbols, all addresses zeroed", lines);
}

/* iopl: raw I/O port access. */
ATTACK(iopl)
{
    (void)argc;
    (void)argv;
    if (ioperm(0x80, 1, 1) == 0) {
        ioperm(0x80, 1, 0);
        escaped("ioperm(0x80)");
    }
    blocked("ioperm: %s", en());
}

/* fanotify: whole-filesystem monitoring (and permission events that can stall the host). */
ATTACK(fanotify)
{
    (void)argc;
    (void)argv;
    int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC, O_RDONLY);
    if (fd >= 0)
        escaped("fanotify_init(FAN_CLASS_NOTIF)");
    int e = errno;
    fd = fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC, O_RDONLY);
    if (fd >= 0 && fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN, AT_FDCWD, "/") == 0)
        escaped("fanotify filesystem mark on /");
    blocked("fanotify_init: %s; unprivileged variant/filesystem mark: %s", errname(e), en());
}

/* personality: READ_IMPLIES_EXEC makes every readable mapping executable (and was the classic
 * way to map data pages executable); ADDR_NO_RANDOMIZE disables ASLR for children. */
ATTACK(personality)
{
    (void)argc;
    (void)argv;
    int r = personality(PER_LINUX | READ_IMPLIES_EXEC);
    int now = personality(0xffffffff);
    if (r != -1 && (now & READ_IMPLIES_EXEC))
        escaped("personality(READ_IMPLIES_EXEC) in force (0x%x)", now);
    int e = errno;
    r = personality(PER_LINUX | ADDR_NO_RANDOMIZE);
    now = personality(0xffffffff);
    if (r != -1 && (now & ADDR_NO_RANDOMIZE))
        escaped("personality(ADDR_NO_RANDOMIZE) in force (0x%x)", now);
    blocked("personality(READ_IMPLIES_EXEC): %s; ADDR_NO_RANDOMIZE: %s", errname(e), en());
}

/* caps: the process state the supervisor promises: no capability in any set, no_new_privs,
 * seccomp filter mode. */
ATTACK(caps)
{
    (void)argc;
    (void)argv;
    char buf[8192];
    if (slurp("/proc/self/status", buf, sizeof buf) < 0)
        blocked("cannot read /proc/self/status: %s (cannot judge)", en());
    const char *want[][2] = {{"CapInh:\t", "0000000000000000"}, {"CapPrm:\t", "0000000000000000"},
                             {"CapEff:\t", "0000000000000000"}, {"CapBnd:\t", "0000000000000000"},
                             {"CapAmb:\t", "0000000000000000"}, {"NoNewPrivs:\t", "1"},
                             {"Seccomp:\t", "2"}};
    char bad[1024] = "", good[1024] = "";
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        char *p = strstr(buf, want[i][0]);
        char val[64] = "missing";
        if (p) {
            p += strlen(want[i][0]);
            size_t n = strcspn(p, "\n");
            snprintf(val, sizeof val, "%.*s", (int)n, p);
        }
        char *dst = strcmp(val, want[i][1]) == 0 ? good : bad;
        size_t u = strlen(dst);
        snprintf(dst + u, 1024 - u, " %s%s", want[i][0], val);
    }
    for (char *p = bad; *p; p++)
        if (*p == '\t')
            *p = ' ';
    for (char *p = good; *p; p++)
        if (*p == '\t')
            *p = ' ';
    if (bad[0])
        escaped("process state wrong:%s", bad);
    blocked("state as promised:%s", good);
}

/* setuid: become uid 0 / gid 0 (unmapped inside the user namespace, and no CAP_SETUID). */
ATTACK(setuid)
{
    (void)argc;
    (void)argv;
    int r1 = setresgid(0, 0, 0);
    int e1 = errno;
    int r2 = setresuid(0, 0, 0);
    int e2 = errno;
    gid_t none[1] = {0};
    int r3 = setgroups(1, none);
    int e3 = errno;
    if ((r2 == 0 && getuid() == 0) || (r1 == 0 && getgid() == 0) || r3 == 0)
        escaped("became root: setresuid %d setresgid %d setgroups %d (uid now %d)", r2, r1, r3, getuid());
    blocked("setresuid(0): %s; setresgid(0): %s; setgroups: %s; uid %d", errname(e2), errname(e1),
            errname(e3), getuid());
}

/* capset: raise the effective/permitted/inheritable sets to everything. */
ATTACK(capset)
{
    (void)argc;
    (void)argv;
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    if (syscall(SYS_capget, &h, d) != 0)
        blocked("capget: %s", en());
    unsigned had = d[0].permitted | d[1].permitted;
    d[0].effective = d[0].permitted = 0xffffffff;
    d[1].effective = d[1].permitted = 0x1ff;
    if (syscall(SYS_capset, &h, d) == 0 || had)
        escaped("capabilities: permitted was 0x%x, capset(all) %s", had, "checked");
    blocked("no permitted capabilities; capset(all): %s", en());
}

/* rlimit_raise: raise a finite hard limit (needs CAP_SYS_RESOURCE). */
ATTACK(rlimit_raise)
{
    (void)argc;
    (void)argv;
    int res[] = {RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_MEMLOCK, RLIMIT_MSGQUEUE, RLIMIT_CORE};
    const char *names[] = {"FSIZE", "NOFILE", "NPROC", "MEMLOCK", "MSGQUEUE", "CORE"};
    char why[1024] = "";
    for (size_t i = 0; i < sizeof res / sizeof res[0]; i++) {
        struct rlimit r;
        if (getrlimit(res[i], &r) != 0 || r.rlim_max == RLIM_INFINITY || r.rlim_max >= 1048576)
            continue;
        struct rlimit up = {r.rlim_max + 1, r.rlim_max + 1};
        if (setrlimit(res[i], &up) == 0)
            escaped("raised hard RLIMIT_%s above %llu", names[i], (unsigned long long)r.rlim_max);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", names[i], en());
    }
    blocked("%s", why[0] ? why : "no finite hard limit to raise");
}

/* tiocsti [REQUEST]: inject "id\n" into the input queue of our stdin tty, to be run by the
 * shell that reads it once we exit (bubblewrap CVE-2017-5226). REQUEST lets the test pass the
 * request number with the high 32 bits set (0x100005412, CVE-2019-10063: a filter comparing all
 * 64 bits misses it while the kernel uses the low 32). */
ATTACK(tiocsti)
{
    unsigned long req = strtoul(arg_str(argc, argv, 1, "0x5412"), NULL, 0);
    const char *inj = "id\n";
    if (!isatty(0))
        printf("note: stdin is not a tty\n");
    for (const char *c = inj; *c; c++) {
        if (syscall(SYS_ioctl, 0, req, c) != 0)
            blocked("ioctl(0, 0x%lx /*TIOCSTI*/): %s", req, en());
    }
    escaped("TIOCSTI (0x%lx) injected input into the tty", req);
}

/* tioclinux [REQUEST]: TIOCLINUX subcode 3 (paste selection) / 2 (set selection) on a VT can
 * inject input like TIOCSTI. It must be filtered by seccomp (EPERM/SIGSYS), not merely fail in
 * the driver because stdin is not a VT. */
ATTACK(tioclinux)
{
    unsigned long req = strtoul(arg_str(argc, argv, 1, "0x541C"), NULL, 0);
    char sub = 3;
    if (syscall(SYS_ioctl, 0, req, &sub) == 0)
        escaped("TIOCLINUX (0x%lx) accepted", req);
    blocked("ioctl(0, 0x%lx /*TIOCLINUX*/): %s", req, en());
}

/* devtty: the controlling terminal via /dev/tty (there must be none after setsid). */
ATTACK(devtty)
{
    (void)argc;
    (void)argv;
    int fd = open("/dev/tty", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        blocked("/dev/tty: %s", en());
    char c = '\n';
    if (ioctl(fd, TIOCSTI, &c) == 0)
        escaped("TIOCSTI through /dev/tty");
    blocked("/dev/tty opened but TIOCSTI: %s", en());
}
