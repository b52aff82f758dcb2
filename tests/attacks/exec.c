/* Execution attacks: running code the sandbox wrote itself. The workspace is writable but not
 * executable (noexec mount + no Landlock EXECUTE), /tmp and /dev/shm likewise; fileless exec via
 * memfd must fail too (seccomp: memfd_create / execveat, or noexec memfd), as must mapping
 * written code PROT_EXEC or handing it to the dynamic loader.
 * A successful exec lands in `exec_proof`, which prints ESCAPED.
 */
#include "attack.h"

#include <sys/mman.h>

/* Target of every successful exec: proves the new image runs. */
ATTACK(exec_proof)
{
    escaped("executed written code: %s", arg_str(argc, argv, 1, "?"));
}

static void exec_self_copy(const char *path, const char *what)
{
    char *args[] = {(char *)path, "exec_proof", (char *)what, NULL};
    char *env[] = {NULL};
    execve(path, args, env);
}

/* exec_copy DIR: copy our own binary to DIR/evil, make it executable, execve it. */
ATTACK(exec_copy)
{
    const char *dir = arg_str(argc, argv, 1, "/workspace");
    char p[4096];
    snprintf(p, sizeof p, "%s/evil", dir);
    if (copy_file("/proc/self/exe", p, 0755) != 0)
        blocked("write %s: %s", p, en());
    exec_self_copy(p, p);
    blocked("execve %s: %s", p, en());
}

/* exec_memfd: fileless exec: copy ourselves into a memfd and fexecve() it. */
ATTACK(exec_memfd)
{
    (void)argc;
    (void)argv;
    int fd = memfd_create("evil", 0);
    if (fd < 0)
        blocked("memfd_create: %s", en());
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    if (copy_file("/proc/self/exe", p, 0755) != 0)
        blocked("fill memfd: %s", en());
    char *args[] = {"evil", "exec_proof", "memfd+fexecve", NULL};
    char *env[] = {NULL};
    fexecve(fd, args, env);
    blocked("fexecve(memfd): %s", en());
}

/* exec_memfd_execveat: the same with the raw execveat(fd, "", AT_EMPTY_PATH) syscall. */
ATTACK(exec_memfd_execveat)
{
    (void)argc;
    (void)argv;
    int fd = (int)syscall(SYS_memfd_create, "evil", 0);
    if (fd < 0)
        blocked("memfd_create: %s", en());
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    if (copy_file("/proc/self/exe", p, 0755) != 0)
        blocked("fill memfd: %s", en());
    char *args[] = {"evil", "exec_proof", "memfd+execveat", NULL};
    char *env[] = {NULL};
    syscall(SYS_execveat, fd, "", args, env, AT_EMPTY_PATH);
    blocked("execveat(memfd, AT_EMPTY_PATH): %s", en());
}

/* mmap_exec DIR: write machine code (`mov eax, 42; ret`) to a file in DIR and map it
 * PROT_EXEC: a noexec mount refuses the mapping (EPERM); calling it proves otherwise. */
ATTACK(mmap_exec)
{
    const char *dir = arg_str(argc, argv, 1, "/workspace");
    char p[4096];
    snprintf(p, sizeof p, "%s/code.bin", dir);
    unlink(p);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
    if (fd < 0)
        blocked("create %s: %s", p, en());
    unsigned char code[4096] = {0xb8, 42, 0, 0, 0, 0xc3};
    if (write(fd, code, sizeof code) != (ssize_t)sizeof code)
        blocked("write %s: %s", p, en());
    void *m = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED)
        blocked("mmap(PROT_EXEC) of %s: %s", p, en());
    int r = ((int (*)(void))m)();
    escaped("mapped %s executable and ran it (returned %d)", p, r);
}

/* exec_ldso DIR: copy a dynamic program (/usr/bin/echo) into DIR and run it through the dynamic
 * loader (`ld.so DIR/echo`), which only needs read access to the file and mmap(PROT_EXEC). */
ATTACK(exec_ldso)
{
    const char *dir = arg_str(argc, argv, 1, "/workspace");
    const char *loaders[] = {"/lib64/ld-linux-x86-64.so.2", "/usr/lib64/ld-linux-x86-64.so.2",
                             "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                             "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"};
    const char *ld = NULL;
    for (size_t i = 0; i < sizeof loaders / sizeof loaders[0]; i++)
        if (access(loaders[i], X_OK) == 0) {
            ld = loaders[i];
            break;
        }
    if (!ld)
        blocked("no dynamic loader visible: %s", en());
    char p[4096];
    snprintf(p, sizeof p, "%s/echo", dir);
    if (copy_file("/usr/bin/echo", p, 0755) != 0)
        blocked("copy /usr/bin/echo to %s: %s", p, en());
    int pipefd[2];
    if (pipe(pipefd) != 0)
        blocked("pipe: %s", en());
    pid_t c = fork();
    if (c == 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        char *args[] = {(char *)ld, p, "LDSO-RAN-IT", NULL};
        char *env[] = {NULL};
        execve(ld, args, env);
        printf("execve(%s): %s\n", ld, en());
        _exit(127);
    }
    close(pipefd[1]);
    char out[1024] = "";
    ssize_t n, t = 0;
    while (t < (ssize_t)sizeof out - 1 && (n = read(pipefd[0], out + t, sizeof out - 1 - t)) > 0)
        t += n;
    out[t] = 0;
    int st;
    waitpid(c, &st, 0);
    if (strstr(out, "LDSO-RAN-IT") && !strstr(out, "error"))
        escaped("ran %s through %s", p, ld);
    char *nl = strchr(out, '\n');
    if (nl)
        *nl = 0;
    blocked("%s %s: %s", ld, p, out[0] ? out : "no output");
}

/* suid_exec PATH: run a set-uid-root program (the harness installs PATH = suid-whoami, which
 * prints "ruid euid") and see whether the effective uid changed. nosuid + no_new_privs. */
ATTACK(suid_exec)
{
    const char *path = arg_str(argc, argv, 1, "/usr/bin/su");
    int p[2];
    if (pipe(p) != 0)
        blocked("pipe: %s", en());
    pid_t c = fork();
    if (c == 0) {
        dup2(p[1], 1);
        char *args[] = {(char *)path, NULL};
        char *env[] = {NULL};
        execve(path, args, env);
        printf("exec failed: %s\n", en());
        _exit(127);
    }
    close(p[1]);
    char out[256] = "";
    ssize_t n = read(p[0], out, sizeof out - 1);
    out[n > 0 ? n : 0] = 0;
    waitpid(c, NULL, 0);
    unsigned ruid = 0, euid = 0;
    if (sscanf(out, "%u %u", &ruid, &euid) != 2)
        blocked("%s: %s", path, out);
    if (euid != ruid)
        escaped("set-uid exec changed the effective uid: ruid %u euid %u", ruid, euid);
    blocked("set-uid bit ignored: ruid %u euid %u", ruid, euid);
}
