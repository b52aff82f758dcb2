/* Resource attacks: bombs, disk fill, spinning. All are bounded by their own argument so that
 * a broken limit produces ESCAPED instead of taking the host down; there is no unconfined
 * control for them (it would load the shared build machine for nothing).
 */
#include "attack.h"

#include <sys/mman.h>
#include <time.h>

/* fork_bomb MAX: fork sleeping children until fork fails (pids cgroup / RLIMIT_NPROC) or MAX. */
ATTACK(fork_bomb)
{
    long max = arg_long(argc, argv, 1, 2000);
    static pid_t kids[100000];
    if (max > 100000)
        max = 100000;
    long n = 0;
    int e = 0;
    while (n < max) {
        pid_t c = fork();
        if (c == 0) {
            for (;;)
                pause();
        }
        if (c < 0) {
            e = errno;
            break;
        }
        kids[n++] = c;
    }
    for (long i = 0; i < n; i++)
        kill(kids[i], SIGKILL);
    for (long i = 0; i < n; i++)
        waitpid(kids[i], NULL, 0);
    if (n >= max)
        escaped("forked %ld processes without hitting a limit", n);
    blocked("fork failed after %ld children: %s", n, errname(e));
}

/* mem_bomb MAXMB: allocate and touch memory until MAXMB (escaped) or the OOM killer / ENOMEM. */
ATTACK(mem_bomb)
{
    long max = arg_long(argc, argv, 1, 2048);
    long got = 0;
    while (got < max) {
        char *p = mmap(NULL, 16 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            blocked("mmap failed after %ld MiB: %s", got, en());
        for (long i = 0; i < (16 << 20); i += 4096)
            p[i] = 1;
        got += 16;
    }
    escaped("allocated and touched %ld MiB", got);
}

/* disk_fill PATH MAXMB: grow one file until RLIMIT_FSIZE stops it (SIGXFSZ is ignored here so
 * that the EFBIG and the size reached are reported). */
ATTACK(disk_fill)
{
    const char *path = arg_str(argc, argv, 1, "/workspace/fill");
    long max = arg_long(argc, argv, 2, 1024);
    signal(SIGXFSZ, SIG_IGN);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        blocked("create %s: %s", path, en());
    static char buf[1 << 20];
    memset(buf, 'x', sizeof buf);
    long mb = 0;
    while (mb < max) {
        ssize_t w = write(fd, buf, sizeof buf);
        if (w < (ssize_t)sizeof buf) {
            int e = w < 0 ? errno : EFBIG;
            close(fd);
            unlink(path);
            blocked("write stopped after %ld MiB: %s", mb, errname(e));
        }
        mb++;
    }
    close(fd);
    unlink(path);
    escaped("wrote %ld MiB to %s", mb, path);
}

/* tmp_fill DIR MAXMB: fill a tmpfs with 4 MiB files (below RLIMIT_FSIZE) until ENOSPC. */
ATTACK(tmp_fill)
{
    const char *dir = arg_str(argc, argv, 1, "/tmp");
    long max = arg_long(argc, argv, 2, 1024);
    signal(SIGXFSZ, SIG_IGN);
    static char buf[1 << 20];
    memset(buf, 'x', sizeof buf);
    long mb = 0;
    for (int i = 0; mb < max; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/fill-%d", dir, i);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0)
            blocked("create %s after %ld MiB: %s", p, mb, en());
        for (int k = 0; k < 4 && mb < max; k++) {
            ssize_t w = write(fd, buf, sizeof buf);
            if (w < (ssize_t)sizeof buf)
                blocked("tmpfs full after %ld MiB: %s", mb, w < 0 ? en() : "short write");
            mb++;
        }
        close(fd);
    }
    escaped("wrote %ld MiB into %s", mb, dir);
}

/* spin SECS: burn CPU past the wall-time limit (ignoring SIGTERM, SIGXCPU, SIGHUP). */
ATTACK(spin)
{
    long secs = arg_long(argc, argv, 1, 30);
    signal(SIGTERM, SIG_IGN);
    signal(SIGXCPU, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    volatile unsigned long x = 0;
    do {
        for (int i = 0; i < 1000000; i++)
            x++;
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while (b.tv_sec - a.tv_sec < secs);
    escaped("spun for %ld s without being stopped", secs);
}
