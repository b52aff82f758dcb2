/* Shared protocol of the carapace escape suite.
 *
 * Every attack is one function `int attack_<name>(int argc, char **argv)` (argv[0] is the
 * attack name, the rest are its arguments). It ends by calling exactly one of:
 *   escaped("what ...")  -> prints "ESCAPED what ..." and exits 0 (the attack WORKED)
 *   blocked("what ...")  -> prints "BLOCKED what ..." and exits 1 (the attack failed)
 * Being killed by a signal (SIGSYS from seccomp, SIGKILL from the OOM killer, SIGXFSZ from
 * RLIMIT_FSIZE) also counts as blocked; the Rust side decides per attack which signal is expected.
 * main() prints "START <name>" first so the Rust side knows the attack really ran.
 *
 * Attacks never damage the host when they succeed: probes that would change host state stop at
 * the first step that proves the capability (an open for writing, a capability check passed).
 */
#ifndef CARAPACE_ATTACK_H
#define CARAPACE_ATTACK_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noreturn, format(printf, 1, 2))) void escaped(const char *fmt, ...);
__attribute__((noreturn, format(printf, 1, 2))) void blocked(const char *fmt, ...);
/* "ENOENT" etc. for the current errno. */
const char *en(void);
const char *errname(int e);
/* Reads a whole small file into buf (NUL-terminated); returns bytes read or -1 (errno set). */
long slurp(const char *path, char *buf, size_t cap);
/* Copies a file; returns 0 or -1 with errno set. */
int copy_file(const char *from, const char *to, int mode);
/* Integer argument i (or dflt when absent). */
long arg_long(int argc, char **argv, int i, long dflt);
const char *arg_str(int argc, char **argv, int i, const char *dflt);

typedef int (*attack_fn)(int argc, char **argv);
struct attack {
    const char *name;
    attack_fn fn;
};

#define ATTACK(n) int attack_##n(int argc, char **argv)

#endif
