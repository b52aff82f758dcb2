/* Filesystem attacks: reading host files, writing outside the workspace, symlink / hardlink /
 * `..` / /proc/self/{root,cwd} tricks, leaked directory fds, device nodes, setuid plants.
 * The Rust side plants secrets (a file containing CARAPACE-SECRET-<random>) on the host and
 * passes their paths; a read "escapes" only when that exact secret comes back.
 */
#include "attack.h"

#include <sys/sysmacros.h>
#include <sys/xattr.h>

/* Reads PATH and checks that NEEDLE (if given) is in it. Returns 1 when read, 0 otherwise;
 * appends "path: ERRNO" to why on failure. */
static int try_read(const char *path, const char *needle, char *why, size_t whylen)
{
    static char buf[1 << 16];
    long n = slurp(path, buf, sizeof buf);
    size_t used = strlen(why);
    if (n < 0) {
        snprintf(why + used, whylen - used, "%s%s: %s", used ? "; " : "", path, en());
        return 0;
    }
    if (needle && !strstr(buf, needle)) {
        snprintf(why + used, whylen - used, "%s%s: read but no secret", used ? "; " : "", path);
        return 0;
    }
    return 1;
}

/* Lesson: the first thing any escape suite tries. /etc/shadow must not even be visible; also via
 * the /proc/<pid>/root magic links, which resolve to the sandbox root, never the host's. */
ATTACK(read_shadow)
{
    (void)argc;
    (void)argv;
    const char *paths[] = {"/etc/shadow", "/etc/gshadow", "/proc/self/root/etc/shadow",
                           "/proc/1/root/etc/shadow", "/proc/thread-self/root/etc/shadow"};
    char why[2048] = "";
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
        if (try_read(paths[i], "root:", why, sizeof why))
            escaped("read %s", paths[i]);
    blocked("read /etc/shadow: %s", why);
}

/* read_secret PATH NEEDLE: read a host file the test planted (under /root, /home, ...). */
ATTACK(read_secret)
{
    const char *path = arg_str(argc, argv, 1, "/root/.carapace-secret");
    const char *needle = arg_str(argc, argv, 2, "CARAPACE-SECRET");
    char why[1024] = "";
    if (try_read(path, needle, why, sizeof why))
        escaped("read host secret %s", path);
    /* also try to list the directory: even names are a leak */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir)
        *slash = 0;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        while ((e = readdir(d)))
            if (strcmp(e->d_name, base) == 0)
                escaped("listed %s and saw %s", dir, base);
        closedir(d);
    }
    blocked("%s", why);
}

/* dotdot WS NAME NEEDLE: the secret sits at WS/../NAME on the host (next to the workspace).
 * `..` from the workspace root, by path, by openat on a workspace fd, via cwd and
 * /proc/self/cwd must all stay inside the sandbox (pivot_root + Landlock). */
ATTACK(dotdot)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    const char *name = arg_str(argc, argv, 2, "secret");
    const char *needle = arg_str(argc, argv, 3, "CARAPACE-SECRET");
    char p[4096], why[4096] = "";
    snprintf(p, sizeof p, "%s/../%s", ws, name);
    if (try_read(p, needle, why, sizeof why))
        escaped("read %s", p);
    snprintf(p, sizeof p, "%s/../../../../../../../../%s", ws, "etc/shadow");
    if (try_read(p, "root:", why, sizeof why))
        escaped("read %s", p);
    int wfd = open(ws, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (wfd >= 0) {
        snprintf(p, sizeof p, "../%s", name);
        int fd = openat(wfd, p, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            char b[256] = "";
            ssize_t n = read(fd, b, sizeof b - 1);
            if (n > 0 && strstr(b, needle))
                escaped("openat(workspace fd, %s)", p);
        }
        strncat(why, "; openat(wsfd, ../NAME): ", sizeof why - strlen(why) - 1);
        strncat(why, en(), sizeof why - strlen(why) - 1);
    }
    if (chdir(ws) == 0) {
        snprintf(p, sizeof p, "../%s", name);
        if (try_read(p, needle, why, sizeof why))
            escaped("read %s from cwd %s", p, ws);
        snprintf(p, sizeof p, "/proc/self/cwd/../%s", name);
        if (try_read(p, needle, why, sizeof why))
            escaped("read %s", p);
    }
    blocked("%s", why);
}

/* proc_root HOSTPATH NEEDLE: /proc/self/root, /proc/1/root, /proc/self/cwd magic links must not
 * lead to the host root (in a new pid namespace with pivot_root they resolve to the sandbox). */
ATTACK(proc_root)
{
    const char *host = arg_str(argc, argv, 1, "/etc/shadow");
    const char *needle = arg_str(argc, argv, 2, "root:");
    const char *pre[] = {"/proc/self/root", "/proc/1/root", "/proc/thread-self/root",
                         "/proc/self/cwd/../../../../../../..", "/proc/1/cwd/../../../../../../.."};
    char p[4096], why[4096] = "";
    for (size_t i = 0; i < sizeof pre / sizeof pre[0]; i++) {
        snprintf(p, sizeof p, "%s%s", pre[i], host);
        if (try_read(p, needle, why, sizeof why))
            escaped("read %s", p);
    }
    blocked("%s", why);
}

/* symlink_planted WS NEEDLE: the test planted WS/abs -> <host secret> and WS/rel -> ../secret
 * on the host. Reading them inside must resolve in the sandbox's root, not the host's. */
ATTACK(symlink_planted)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    const char *needle = arg_str(argc, argv, 2, "CARAPACE-SECRET");
    const char *names[] = {"abs", "rel", "shadow"};
    char p[4096], why[4096] = "";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", ws, names[i]);
        if (try_read(p, i == 2 ? "root:" : needle, why, sizeof why))
            escaped("read through planted symlink %s", p);
    }
    blocked("%s", why);
}

/* symlink_created WS HOSTSECRET NEEDLE: the attacker itself creates links in the workspace
 * pointing at a host path, absolutely and with ../ chains, and reads through them. */
ATTACK(symlink_created)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    const char *host = arg_str(argc, argv, 2, "/etc/shadow");
    const char *needle = arg_str(argc, argv, 3, "root:");
    char l[4096], t[4096], why[4096] = "";
    snprintf(l, sizeof l, "%s/mine-abs", ws);
    unlink(l);
    if (symlink(host, l) != 0)
        snprintf(why, sizeof why, "symlink: %s", en());
    else if (try_read(l, needle, why, sizeof why))
        escaped("read %s via own symlink %s", host, l);
    snprintf(l, sizeof l, "%s/mine-rel", ws);
    snprintf(t, sizeof t, "../../../../../../../..%s", host);
    unlink(l);
    if (symlink(t, l) == 0 && try_read(l, needle, why, sizeof why))
        escaped("read %s via own relative symlink", host);
    blocked("%s", why);
}

/* hardlink SRC WS: hard-link a file visible read-only (the attack binary itself, on the same
 * host filesystem as the workspace) into the writable workspace. If that works, the host file
 * can be opened for writing through the workspace mount (modify /usr/bin/...). Must fail with
 * EXDEV (different mount) or EPERM/EACCES (Landlock REFER). Also via /proc/self/fd + linkat. */
ATTACK(hardlink)
{
    const char *src = arg_str(argc, argv, 1, "/usr/bin/true");
    const char *ws = arg_str(argc, argv, 2, "/workspace");
    char dst[4096], why[1024];
    snprintf(dst, sizeof dst, "%s/hardlink", ws);
    unlink(dst);
    if (link(src, dst) == 0)
        escaped("hard-linked %s into %s", src, dst);
    snprintf(why, sizeof why, "link: %s", en());
    int fd = open(src, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        if (linkat(AT_FDCWD, p, AT_FDCWD, dst, AT_SYMLINK_FOLLOW) == 0)
            escaped("linkat(/proc/self/fd) of %s into %s", src, dst);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "; linkat(proc fd): %s", en());
        if (linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH) == 0)
            escaped("linkat(AT_EMPTY_PATH) of %s into %s", src, dst);
        u = strlen(why);
        snprintf(why + u, sizeof why - u, "; linkat(AT_EMPTY_PATH): %s", en());
    }
    blocked("%s", why);
}

/* write_file PATH: create a new file outside the workspace (/usr, /etc, ...). The test checks
 * the host afterwards too. */
ATTACK(write_file)
{
    const char *path = arg_str(argc, argv, 1, "/usr/carapace-escape");
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        blocked("create %s: %s", path, en());
    if (write(fd, "pwned\n", 6) != 6)
        blocked("write %s: %s", path, en());
    close(fd);
    escaped("created %s", path);
}

/* write_host_tmp CANARY TARGET: the test created CANARY in the host's /tmp. If the sandbox's
 * /tmp shows it, /tmp is the host's and writing TARGET there is an escape. The sandbox may write
 * its own private tmpfs freely; the test checks that TARGET never appears on the host. */
ATTACK(write_host_tmp)
{
    const char *canary = arg_str(argc, argv, 1, "/tmp/canary");
    const char *target = arg_str(argc, argv, 2, "/tmp/carapace-escape");
    int visible = access(canary, F_OK) == 0;
    int fd = open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int werr = fd < 0 ? errno : 0;
    if (fd >= 0) {
        if (write(fd, "pwned\n", 6) < 0)
            werr = errno;
        close(fd);
    }
    if (visible && !werr)
        escaped("host /tmp visible (canary %s) and %s written", canary, target);
    blocked("host /tmp not reachable: canary %s, write %s: %s", visible ? "visible" : "invisible",
            target, werr ? errname(werr) : "ok (private tmpfs)");
}

/* reopen_rw PATH: PATH is a world-writable (0666) host file inside a read-only bind mount.
 * Opening it for writing, directly or by re-opening an O_RDONLY/O_PATH fd through
 * /proc/self/fd/N, must fail (EROFS from the mount, EACCES from Landlock). Nothing is written. */
ATTACK(reopen_rw)
{
    const char *path = arg_str(argc, argv, 1, "/etc/passwd");
    char why[1024], p[64];
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd >= 0)
        escaped("opened read-only-mounted %s for writing", path);
    snprintf(why, sizeof why, "open(O_WRONLY): %s", en());
    int flags[] = {O_RDONLY, O_PATH};
    for (int i = 0; i < 2; i++) {
        int r = open(path, flags[i] | O_CLOEXEC);
        if (r < 0)
            continue;
        snprintf(p, sizeof p, "/proc/self/fd/%d", r);
        int w = open(p, O_WRONLY | O_APPEND | O_CLOEXEC);
        if (w >= 0)
            escaped("reopened %s for writing via %s", path, p);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "; reopen %s fd via /proc: %s", i ? "O_PATH" : "O_RDONLY", en());
        close(r);
    }
    blocked("%s", why);
}

/* proc_self_exe CARAPACE DEV INO (runc CVE-2019-5736): the supervisor's binary must not be
 * reachable from the sandbox: not by path, not as /proc/<pid>/exe of any visible process, and
 * our own /proc/self/exe must not be writable. Nothing is ever written. */
ATTACK(proc_self_exe)
{
    const char *bin = arg_str(argc, argv, 1, "/usr/local/bin/carapace");
    unsigned long long dev = (unsigned long long)arg_long(argc, argv, 2, 0);
    unsigned long long ino = (unsigned long long)arg_long(argc, argv, 3, 0);
    char why[2048] = "", p[300];
    struct stat st;
    int fd = open(bin, O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == dev && st.st_ino == ino)
        escaped("supervisor binary %s reachable by path", bin);
    snprintf(why, sizeof why, "open %s: %s", bin, fd < 0 ? en() : "other file");
    DIR *d = opendir("/proc");
    struct dirent *e;
    int seen = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(p, sizeof p, "/proc/%s/exe", e->d_name);
        int x = open(p, O_RDONLY | O_CLOEXEC);
        if (x < 0)
            continue;
        seen++;
        if (fstat(x, &st) == 0 && st.st_dev == dev && st.st_ino == ino)
            escaped("supervisor binary reachable as %s", p);
        close(x);
    }
    int w = open("/proc/self/exe", O_WRONLY | O_CLOEXEC);
    if (w >= 0)
        escaped("/proc/self/exe opened for writing");
    size_t u = strlen(why);
    snprintf(why + u, sizeof why - u, "; %d /proc/*/exe checked, none is the supervisor; "
             "/proc/self/exe O_WRONLY: %s", seen, en());
    blocked("%s", why);
}

/* leaked_dirfd NAME NEEDLE (runc CVE-2024-21626): an inherited directory fd (the test passes
 * fd 7 on a host directory holding NAME) used as cwd or as openat base. Also checks whether our
 * initial cwd lies outside our root. */
ATTACK(leaked_dirfd)
{
    const char *name = arg_str(argc, argv, 1, "secret");
    const char *needle = arg_str(argc, argv, 2, "CARAPACE-SECRET");
    char why[2048] = "", p[300], b[256];
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd))
        snprintf(why, sizeof why, "getcwd: %s", en());
    else if (strncmp(cwd, "(unreachable)", 13) == 0)
        escaped("cwd is outside the root: %s", cwd);
    /* the supervisor was started from the directory holding the secret: its cwd must not leak */
    int c = open(name, O_RDONLY | O_CLOEXEC);
    if (c >= 0 && read(c, b, sizeof b - 1) > 0 && strstr(b, needle))
        escaped("read %s relative to the inherited cwd %s", name, cwd);
    for (int fd = 3; fd < 1024; fd++) {
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        int s = openat(fd, name, O_RDONLY | O_CLOEXEC);
        if (s >= 0) {
            ssize_t n = read(s, b, sizeof b - 1);
            b[n > 0 ? n : 0] = 0;
            if (strstr(b, needle))
                escaped("read %s via leaked directory fd %d", name, fd);
        }
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        if (chdir(p) == 0 || fchdir(fd) == 0) {
            int r = open(name, O_RDONLY | O_CLOEXEC);
            if (r >= 0 && read(r, b, sizeof b - 1) > 0 && strstr(b, needle))
                escaped("read %s with cwd = leaked fd %d", name, fd);
        }
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%sdir fd %d present but useless", u ? "; " : "", fd);
    }
    if (!why[0])
        snprintf(why, sizeof why, "no directory fd inherited");
    blocked("%s", why);
}

/* leaked_fds: only 0, 1 and 2 may be open at exec (bubblewrap passes every inherited fd). */
ATTACK(leaked_fds)
{
    (void)argc;
    (void)argv;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        blocked("cannot list /proc/self/fd: %s (cannot judge, treat as blocked)", en());
    int me = dirfd(d);
    char extra[4096] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd <= 2 || fd == me)
            continue;
        char p[64], t[512] = "";
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(p, t, sizeof t - 1);
        t[n > 0 ? n : 0] = 0;
        size_t u = strlen(extra);
        snprintf(extra + u, sizeof extra - u, " %d->%s", fd, t);
    }
    if (extra[0])
        escaped("inherited fds beyond stdio:%s", extra);
    blocked("only fds 0,1,2 open");
}

/* leaked_env NAME VALUE: the supervisor's environment (a secret token) must not reach us. */
ATTACK(leaked_env)
{
    extern char **environ;
    const char *name = arg_str(argc, argv, 1, "SECRET_TOKEN");
    const char *value = arg_str(argc, argv, 2, "CARAPACE-SECRET");
    if (getenv(name))
        escaped("%s is set in the sandbox", name);
    for (char **e = environ; *e; e++)
        if (strstr(*e, value))
            escaped("secret value found in environment: %s", *e);
    int n = 0;
    for (char **e = environ; *e; e++)
        n++;
    blocked("%s absent; %d variables present", name, n);
}

/* open_by_handle MOUNTPOINT: the "shocker" escape: forge a file handle for inode 2 (the root of
 * an ext4 filesystem) and open it relative to any fd on that filesystem, bypassing the mount
 * view. Needs CAP_DAC_READ_SEARCH in the initial user namespace. */
ATTACK(open_by_handle)
{
    const char *mp = arg_str(argc, argv, 1, "/workspace");
    char why[1024];
    struct {
        struct file_handle fh;
        unsigned char bytes[128];
    } h;
    int mnt_id;
    h.fh.handle_bytes = sizeof h.bytes;
    if (name_to_handle_at(AT_FDCWD, mp, &h.fh, &mnt_id, 0) != 0)
        snprintf(why, sizeof why, "name_to_handle_at: %s", en());
    else
        snprintf(why, sizeof why, "name_to_handle_at ok (type %d)", h.fh.handle_type);
    int mfd = open(mp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (mfd < 0)
        blocked("open %s: %s", mp, en());
    /* FILEID_INO32_GEN: { u32 ino; u32 gen; }; ext4 root inode is 2, generation 0. */
    h.fh.handle_type = 1;
    h.fh.handle_bytes = 8;
    unsigned int ino_gen[2] = {2, 0};
    memcpy(h.fh.f_handle, ino_gen, 8);
    int fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        DIR *d = fdopendir(fd);
        char names[512] = "";
        struct dirent *e;
        while (d && (e = readdir(d)))
            if (strlen(names) + strlen(e->d_name) + 2 < sizeof names) {
                strcat(names, " ");
                strcat(names, e->d_name);
            }
        escaped("opened the filesystem root by forged handle:%s", names);
    }
    size_t u = strlen(why);
    snprintf(why + u, sizeof why - u, "; open_by_handle_at(forged ino 2): %s", en());
    blocked("%s", why);
}

/* mknod WS MAJOR MINOR: create a block device node for the host's root disk in the workspace.
 * Needs CAP_MKNOD. A node that exists is already the escape: it lands in the host's workspace,
 * where any host process opening it reads the raw disk (inside, nodev would stop the open). */
ATTACK(mknod)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    unsigned maj = (unsigned)arg_long(argc, argv, 2, 254);
    unsigned min = (unsigned)arg_long(argc, argv, 3, 0);
    char p[4096], c[4096];
    snprintf(p, sizeof p, "%s/disk", ws);
    snprintf(c, sizeof c, "%s/mem", ws);
    unlink(p);
    unlink(c);
    if (mknod(p, S_IFBLK | 0600, makedev(maj, min)) == 0) {
        unlink(p);
        escaped("created block device node %u:%u for the host disk", maj, min);
    }
    int e = errno;
    if (mknod(c, S_IFCHR | 0600, makedev(1, 1)) == 0) {
        unlink(c);
        escaped("created /dev/mem character device node 1:1");
    }
    blocked("mknod block %u:%u: %s; char 1:1: %s", maj, min, errname(e), en());
}

/* dev_disk PATH...: open raw host devices directly (/dev/vda, /dev/mem, /dev/kmsg, /dev/port). */
ATTACK(dev_disk)
{
    char why[2048] = "";
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd >= 0) {
            static char b[16384];
            if (read(fd, b, sizeof b) > 0)
                escaped("read raw device %s", argv[i]);
            close(fd);
        }
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", argv[i], en());
    }
    blocked("%s", why);
}

/* setuid_plant WS: create a file in the (root-owned on the host) workspace and give it the
 * setuid/setgid bits. Files created in the workspace land owned by the workspace owner, so a
 * setuid bit would plant a setuid-<owner> (root!) binary on the host for later use. */
ATTACK(setuid_plant)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    char p[4096], done[1024] = "";
    struct stat st;
    /* 1. create with the bits already in the mode of open(O_CREAT) */
    snprintf(p, sizeof p, "%s/suid-creat", ws);
    unlink(p);
    umask(0);
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 06755);
    if (fd >= 0) {
        close(fd);
        if (stat(p, &st) == 0 && (st.st_mode & (S_ISUID | S_ISGID)))
            snprintf(done, sizeof done, " open(O_CREAT, 06755)->%o", st.st_mode & 07777);
    }
    /* 2. chmod after creation, setuid and setgid separately */
    int modes[] = {04755, 02755};
    const char *names[] = {"suid-chmod", "sgid-chmod"};
    char why[512] = "";
    for (int i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", ws, names[i]);
        unlink(p);
        if (copy_file("/proc/self/exe", p, 0755) != 0)
            blocked("create %s: %s", p, en());
        int r = chmod(p, modes[i]);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, " chmod %o: %s", modes[i], r ? en() : "ok");
        if (stat(p, &st) == 0 && (st.st_mode & (S_ISUID | S_ISGID))) {
            u = strlen(done);
            snprintf(done + u, sizeof done - u, " chmod(%o)->%o", modes[i], st.st_mode & 07777);
        }
    }
    /* 3. a setgid directory makes everything created inside inherit its group */
    snprintf(p, sizeof p, "%s/sgid-dir", ws);
    rmdir(p);
    if (mkdir(p, 02755) == 0 && stat(p, &st) == 0 && (st.st_mode & S_ISGID)) {
        size_t u = strlen(done);
        snprintf(done + u, sizeof done - u, " mkdir(02755)->%o", st.st_mode & 07777);
    }
    if (done[0])
        escaped("set-id bits planted in the workspace (files there belong to the workspace owner "
                "on the host):%s", done);
    blocked("no set-id bit sticks:%s", why);
}

/* proc_sys_write: the classic container escapes via /proc: core_pattern (run a host binary as
 * root on the next crash), sysrq-trigger, other sysctls. An open for writing is already the
 * escape; nothing is written. */
ATTACK(proc_sys_write)
{
    (void)argc;
    (void)argv;
    const char *paths[] = {"/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname",
                           "/proc/sys/kernel/modprobe", "/proc/sys/vm/drop_caches",
                           "/proc/sys/fs/binfmt_misc/register", "/proc/sys/kernel/sysrq"};
    char why[2048] = "";
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        int fd = open(paths[i], O_WRONLY | O_CLOEXEC);
        if (fd >= 0)
            escaped("opened %s for writing", paths[i]);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", paths[i], en());
    }
    blocked("%s", why);
}

/* sysrq: /proc/sysrq-trigger can crash or reboot the host. Opened, never written. */
ATTACK(sysrq)
{
    (void)argc;
    (void)argv;
    int fd = open("/proc/sysrq-trigger", O_WRONLY | O_CLOEXEC);
    if (fd >= 0)
        escaped("opened /proc/sysrq-trigger for writing");
    blocked("/proc/sysrq-trigger: %s", en());
}

/* sys_write: /sys must be absent or read-only: tunables, cgroup files (CVE-2022-0492
 * release_agent family), block queue settings. Opened, never written; a mkdir of a cgroup is
 * removed again at once. */
ATTACK(sys_write)
{
    (void)argc;
    (void)argv;
    struct stat st;
    if (stat("/sys/kernel", &st) != 0)
        blocked("/sys not mounted: %s", en());
    const char *paths[] = {"/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/ksm/run",
                           "/sys/block/vda/queue/read_ahead_kb", "/sys/fs/cgroup/pids/cgroup.procs",
                           "/sys/fs/cgroup/memory/release_agent", "/sys/fs/cgroup/cgroup.procs"};
    char why[2048] = "";
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        int fd = open(paths[i], O_WRONLY | O_CLOEXEC);
        if (fd >= 0)
            escaped("opened %s for writing", paths[i]);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%s%s: %s", u ? "; " : "", paths[i], en());
    }
    if (mkdir("/sys/fs/cgroup/pids/carapace-escape", 0755) == 0) {
        rmdir("/sys/fs/cgroup/pids/carapace-escape");
        escaped("created a cgroup under /sys/fs/cgroup/pids");
    }
    blocked("%s", why);
}

/* chroot WS: chroot is the first step of the classic chroot-in-chroot escape; it needs
 * CAP_SYS_CHROOT, which the sandbox must not have. */
ATTACK(chroot)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    char p[4096];
    snprintf(p, sizeof p, "%s/jail", ws);
    mkdir(p, 0755);
    pid_t c = fork();
    if (c == 0) {
        if (chroot(p) != 0) {
            printf("chroot: %s\n", en());
            fflush(stdout);
            _exit(1);
        }
        _exit(0);
    }
    int st = 0;
    waitpid(c, &st, 0);
    rmdir(p);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        escaped("chroot(%s) allowed", p);
    blocked("chroot refused");
}

/* reopen_stdin: stdio is passed through. When stdin is a host file opened read-only by the
 * caller (`carapace exec ... < file`), re-opening /proc/self/fd/0 for writing must not give
 * write access to that host file (Landlock sees a path outside every rule). Nothing is written. */
ATTACK(reopen_stdin)
{
    (void)argc;
    (void)argv;
    char t[512] = "";
    ssize_t n = readlink("/proc/self/fd/0", t, sizeof t - 1);
    t[n > 0 ? n : 0] = 0;
    int fd = open("/proc/self/fd/0", O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd >= 0)
        escaped("re-opened stdin (%s) for writing", t);
    int e = errno;
    fd = open("/proc/self/fd/0", O_RDONLY | O_CLOEXEC);
    blocked("stdin is %s; reopen for writing: %s (for reading: %s)", t, errname(e),
            fd >= 0 ? "ok" : en());
}

/* plant_symlink LINK TARGET: create LINK -> TARGET and exit. Used where the damage is done by
 * someone else following the link afterwards (carapace writing its --report-json file as
 * root into the workspace); the test's host check decides. */
ATTACK(plant_symlink)
{
    const char *link = arg_str(argc, argv, 1, "/workspace/report.json");
    const char *target = arg_str(argc, argv, 2, "/etc/passwd");
    unlink(link);
    if (symlink(target, link) != 0)
        blocked("symlink %s -> %s: %s", link, target, en());
    blocked("planted %s -> %s; the host check decides", link, target);
}

/* file_caps WS: the xattr analogue of setuid_plant: give a file created in the workspace a
 * `security.capability` xattr (file capabilities: full permitted set, effective bit), which a
 * host exec of it would honour. Needs CAP_SETFCAP over the file's owner. */
ATTACK(file_caps)
{
    const char *ws = arg_str(argc, argv, 1, "/workspace");
    char p[4096];
    snprintf(p, sizeof p, "%s/fcaps", ws);
    unlink(p);
    if (copy_file("/proc/self/exe", p, 0755) != 0)
        blocked("create %s: %s", p, en());
    /* struct vfs_cap_data, revision 2: magic_etc, then {permitted, inheritable} x 2 */
    unsigned int cap[5] = {0x02000000 | 1 /* VFS_CAP_REVISION_2 | EFFECTIVE */, 0xffffffff, 0,
                           0x1ff, 0};
    if (setxattr(p, "security.capability", cap, sizeof cap, 0) == 0)
        escaped("set security.capability (all capabilities) on %s", p);
    int e = errno;
    if (setxattr(p, "trusted.carapace", "x", 1, 0) == 0)
        escaped("set a trusted.* xattr on %s", p);
    blocked("security.capability: %s; trusted.*: %s", errname(e), en());
}
