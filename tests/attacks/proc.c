/* Attacks on other processes. The test runs a marker process on the host (this same binary,
 * `attack marker TOKEN`, as the sandbox's own host uid so that plain DAC would allow most of
 * these) and passes its host pid. A new pid namespace hides it; no capabilities, Landlock signal
 * scoping and seccomp stop the rest. Lessons: bubblewrap CVE-2016-8659 (ptrace), runc.
 */
#include "attack.h"

#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sched.h>

static char marker_secret[256];

/* marker TOKEN: the host-side victim. Prints "READY <pid> <address of TOKEN>" then sleeps. */
ATTACK(marker)
{
    snprintf(marker_secret, sizeof marker_secret, "%s", arg_str(argc, argv, 1, "MARKER"));
    printf("READY %d %p\n", getpid(), (void *)marker_secret);
    fflush(stdout);
    for (;;)
        pause();
}

/* ptrace PID: attach to the host marker (read/write its memory, hijack it). */
ATTACK(ptrace)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    if (ptrace(PTRACE_SEIZE, pid, NULL, NULL) == 0) {
        ptrace(PTRACE_DETACH, pid, NULL, NULL);
        escaped("PTRACE_SEIZE of host pid %d", pid);
    }
    int e = errno;
    if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) == 0) {
        waitpid(pid, NULL, __WALL);
        ptrace(PTRACE_DETACH, pid, NULL, NULL);
        escaped("PTRACE_ATTACH of host pid %d", pid);
    }
    blocked("PTRACE_SEIZE %d: %s; PTRACE_ATTACH: %s", pid, errname(e), en());
}

/* pvm_read PID ADDR TOKEN: read the marker's secret with process_vm_readv. */
ATTACK(pvm_read)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    unsigned long addr = strtoul(arg_str(argc, argv, 2, "0x1000"), NULL, 0);
    const char *token = arg_str(argc, argv, 3, "MARKER");
    char buf[256] = "";
    struct iovec local = {buf, sizeof buf - 1}, remote = {(void *)addr, sizeof buf - 1};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n > 0 && strstr(buf, token))
        escaped("process_vm_readv read the secret of host pid %d", pid);
    if (n >= 0)
        blocked("process_vm_readv returned %zd bytes without the secret", n);
    blocked("process_vm_readv pid %d: %s", pid, en());
}

/* kill PID SIG: signal the host marker (SIG 0 for the safe host control). */
ATTACK(kill)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    int sig = (int)arg_long(argc, argv, 2, SIGKILL);
    if (kill(pid, sig) == 0)
        escaped("kill(%d, %d) succeeded on a host pid", pid, sig);
    blocked("kill(%d, %d): %s", pid, sig, en());
}

/* kill_all: kill(-1, SIGKILL) reaches every process we may signal; the test checks that the
 * host marker (same host uid as the sandbox) survives. We are pid 1 of our namespace, so inside
 * this hits only our own children. */
ATTACK(kill_all)
{
    (void)argc;
    (void)argv;
    signal(SIGTERM, SIG_IGN);
    int r = kill(-1, SIGKILL);
    blocked("kill(-1, SIGKILL) returned %d (%s); host check decides", r, r ? en() : "ok");
}

/* pidfd PID: pidfd_open the host marker, signal it through the pidfd, steal its stdin. */
ATTACK(pidfd)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0)
        blocked("pidfd_open(%d): %s", pid, en());
    if (syscall(SYS_pidfd_send_signal, fd, 0, NULL, 0) == 0)
        escaped("pidfd_send_signal to host pid %d", pid);
    int e = errno;
    int stolen = (int)syscall(SYS_pidfd_getfd, fd, 0, 0);
    if (stolen >= 0)
        escaped("pidfd_getfd stole fd 0 of host pid %d", pid);
    blocked("pidfd_open worked but signal: %s, getfd: %s", errname(e), en());
}

/* setns PID: join the host marker's namespaces through /proc/PID/ns/ (host mount/net/pid ns =
 * host everything), and also /proc/1/ns/ (our own). */
ATTACK(setns)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    const char *ns[] = {"mnt", "net", "pid", "user", "uts", "ipc", "cgroup", "time"};
    char p[128], why[2048] = "";
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        snprintf(p, sizeof p, "/proc/%d/ns/%s", pid, ns[i]);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            size_t u = strlen(why);
            snprintf(why + u, sizeof why - u, "%sopen %s: %s", u ? "; " : "", ns[i], en());
            continue;
        }
        if (setns(fd, 0) == 0)
            escaped("setns into %s", p);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%ssetns %s: %s", u ? "; " : "", ns[i], en());
        close(fd);
    }
    blocked("%s", why);
}

/* prlimit PID: change the host marker's resource limits. */
ATTACK(prlimit)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    struct rlimit old;
    if (prlimit(pid, RLIMIT_NOFILE, NULL, &old) != 0)
        blocked("prlimit(%d) get: %s", pid, en());
    if (prlimit(pid, RLIMIT_NOFILE, &old, NULL) == 0)
        escaped("prlimit set on host pid %d", pid);
    blocked("prlimit(%d) set: %s", pid, en());
}

/* proc_marker PID REVERSED-TOKEN: the host marker's /proc entries (cmdline, environ, maps) must be
 * invisible: a new procfs for the new pid namespace. Also scans every visible /proc/N. */
ATTACK(proc_marker)
{
    pid_t pid = (pid_t)arg_long(argc, argv, 1, 1);
    /* TOKEN arrives reversed, so that our own argv (visible in /proc) does not contain it */
    const char *rev = arg_str(argc, argv, 2, "REKRAM");
    static char token[256];
    size_t tl = strlen(rev) < sizeof token ? strlen(rev) : sizeof token - 1;
    for (size_t i = 0; i < tl; i++)
        token[i] = rev[tl - 1 - i];
    token[tl] = 0;
    char p[300], buf[8192], why[512];
    /* only the marker's own cmdline counts: the same number may be a sandbox process */
    snprintf(p, sizeof p, "/proc/%d/cmdline", pid);
    long n0 = slurp(p, buf, sizeof buf);
    if (n0 > 0 && memmem(buf, (size_t)n0, token, strlen(token)))
        escaped("read %s of the host marker", p);
    snprintf(why, sizeof why, "/proc/%d/cmdline: %s", pid, en());
    DIR *d = opendir("/proc");
    struct dirent *e;
    int count = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || atoi(e->d_name) == getpid())
            continue;
        count++;
        snprintf(p, sizeof p, "/proc/%s/cmdline", e->d_name);
        long n = slurp(p, buf, sizeof buf);
        if (n > 0 && memmem(buf, (size_t)n, token, strlen(token)))
            escaped("host marker visible as %s", p);
    }
    blocked("%s; %d processes visible, none is the marker", why, count);
}

/* proc_environ VALUE: the supervisor's (or any process's) environment holding a secret must
 * not be readable via /proc/N/environ; checks /proc/1/environ and every visible process. */
ATTACK(proc_environ)
{
    const char *value = arg_str(argc, argv, 1, "CARAPACE-SECRET");
    char p[300], buf[65536];
    DIR *d = opendir("/proc");
    struct dirent *e;
    int count = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(p, sizeof p, "/proc/%s/environ", e->d_name);
        long n = slurp(p, buf, sizeof buf);
        if (n < 0)
            continue;
        count++;
        if (memmem(buf, (size_t)n, value, strlen(value)))
            escaped("secret found in %s", p);
    }
    blocked("secret in none of %d readable /proc/*/environ", count);
}

/* daemonize WS DELAY: double fork + setsid + ignore SIGHUP/SIGTERM, then outlive the sandbox
 * and write WS/daemon-alive after DELAY seconds. The test checks the file never appears: the
 * whole tree must die with pid 1 / the cgroup. */
ATTACK(daemonize)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    int delay = (int)arg_long(argc, argv, 2, 3);
    pid_t c = fork();
    if (c == 0) {
        setsid();
        if (fork() == 0) {
            signal(SIGHUP, SIG_IGN);
            signal(SIGTERM, SIG_IGN);
            close(0);
            close(1);
            close(2);
            sleep((unsigned)delay);
            char p[4096];
            snprintf(p, sizeof p, "%s/daemon-alive", ws);
            int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
            if (fd >= 0)
                close(fd);
            _exit(0);
        }
        _exit(0);
    }
    waitpid(c, NULL, 0);
    blocked("daemon started; the host check decides whether it outlived the sandbox");
}

/* ptrace_child: ptrace of our own child (PTRACE_TRACEME / PTRACE_ATTACH): on old kernels a
 * tracer could rewrite syscalls after the seccomp check; ptrace has no business in a tool. */
ATTACK(ptrace_child)
{
    (void)argc;
    (void)argv;
    pid_t c = fork();
    if (c == 0) {
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
            _exit(1);
        raise(SIGSTOP);
        _exit(0);
    }
    int st = 0;
    waitpid(c, &st, WUNTRACED);
    if (WIFSTOPPED(st)) {
        ptrace(PTRACE_CONT, c, NULL, NULL);
        waitpid(c, &st, 0);
        escaped("PTRACE_TRACEME accepted: we trace our own child");
    }
    int e = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    pid_t d = fork();
    if (d == 0) {
        for (;;)
            pause();
    }
    long r = ptrace(PTRACE_SEIZE, d, NULL, NULL);
    int e2 = errno;
    kill(d, SIGKILL);
    waitpid(d, NULL, 0);
    if (r == 0)
        escaped("PTRACE_SEIZE of our own child");
    blocked("PTRACE_TRACEME refused (child exit %d); PTRACE_SEIZE child: %s", e, errname(e2));
}

/* coredump DIR: raise RLIMIT_CORE and crash a child in DIR. With core_pattern "core" the
 * kernel writes the core into the cwd (the workspace); with a "|helper" pattern it would run a
 * host helper as root with our memory as input. core_dumps = false must prevent both. */
ATTACK(coredump)
{
    const char *dir = arg_str(argc, argv, 1, "/workspace");
    if (chdir(dir) != 0)
        blocked("chdir %s: %s", dir, en());
    struct rlimit r;
    getrlimit(RLIMIT_CORE, &r);
    struct rlimit up = {r.rlim_max, r.rlim_max};
    setrlimit(RLIMIT_CORE, &up);
    getrlimit(RLIMIT_CORE, &r);
    pid_t c = fork();
    if (c == 0) {
        signal(SIGABRT, SIG_DFL);
        abort();
    }
    int st = 0;
    waitpid(c, &st, 0);
    char core[64];
    snprintf(core, sizeof core, "core.%d", c);
    int file = access("core", F_OK) == 0 || access(core, F_OK) == 0;
    unlink("core");
    unlink(core);
    if ((WIFSIGNALED(st) && WCOREDUMP(st)) || file)
        escaped("core dumped (RLIMIT_CORE %llu, file %s)", (unsigned long long)r.rlim_cur,
                file ? "written" : "not found");
    blocked("no core dump (RLIMIT_CORE %llu, child %s %d)", (unsigned long long)r.rlim_cur,
            WIFSIGNALED(st) ? "signal" : "exit", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
}

/* sysv_shm KEY: attach a SysV shared memory segment the host created (IPC namespace). */
ATTACK(sysv_shm)
{
    key_t key = (key_t)arg_long(argc, argv, 1, 0x43415241);
    int id = shmget(key, 0, 0);
    if (id < 0)
        blocked("shmget(0x%x): %s", (unsigned)key, en());
    void *p = shmat(id, NULL, SHM_RDONLY);
    if (p == (void *)-1)
        blocked("shmget found the host segment but shmat: %s", en());
    escaped("attached host SysV segment 0x%x: %.40s", (unsigned)key, (char *)p);
}
