/* Dispatcher of the escape-suite attack binary: `attack NAME ARGS...`.
 * Built once by the Rust harness (tests/src/lib.rs) with `cc -O1 -static` from every C file of tests/attacks.
 */
#include "attack.h"

#include <signal.h>
#include <unistd.h>

#define X(n) ATTACK(n);
#include "list.h"
#undef X

static const struct attack ATTACKS[] = {
#define X(n) {#n, attack_##n},
#include "list.h"
#undef X
};

void escaped(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ESCAPED ", stdout);
    vfprintf(stdout, fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    _exit(0);
}

void blocked(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("BLOCKED ", stdout);
    vfprintf(stdout, fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    _exit(1);
}

const char *errname(int e)
{
    const char *n = strerrorname_np(e);
    return n ? n : "E?";
}

const char *en(void) { return errname(errno); }

long slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    int err = ferror(f) ? errno : 0;
    fclose(f);
    buf[n] = 0;
    if (err) {
        errno = err;
        return -1;
    }
    return (long)n;
}

int copy_file(const char *from, const char *to, int mode)
{
    FILE *in = fopen(from, "re");
    if (!in)
        return -1;
    unlink(to);
    FILE *out = fopen(to, "we");
    if (!out) {
        int e = errno;
        fclose(in);
        errno = e;
        return -1;
    }
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        if (fwrite(buf, 1, n, out) != n) {
            int e = errno;
            fclose(in);
            fclose(out);
            errno = e;
            return -1;
        }
    }
    fclose(in);
    if (fclose(out) != 0)
        return -1;
    return chmod(to, mode);
}

long arg_long(int argc, char **argv, int i, long dflt)
{
    return i < argc ? strtol(argv[i], NULL, 0) : dflt;
}

const char *arg_str(int argc, char **argv, int i, const char *dflt)
{
    return i < argc ? argv[i] : dflt;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: attack NAME ARGS...\navailable:");
        for (size_t i = 0; i < sizeof ATTACKS / sizeof ATTACKS[0]; i++)
            fprintf(stderr, " %s", ATTACKS[i].name);
        fputc('\n', stderr);
        return 2;
    }
    for (size_t i = 0; i < sizeof ATTACKS / sizeof ATTACKS[0]; i++) {
        if (strcmp(ATTACKS[i].name, argv[1]) == 0) {
            printf("START %s\n", argv[1]);
            fflush(stdout);
            int r = ATTACKS[i].fn(argc - 1, argv + 1);
            fflush(stdout);
            return r;
        }
    }
    fprintf(stderr, "unknown attack %s\n", argv[1]);
    return 2;
}
