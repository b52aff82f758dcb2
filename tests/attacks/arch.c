/* Foreign-ABI attacks: a seccomp filter that checks syscall numbers without checking the
 * architecture / the x32 bit can be bypassed by entering the kernel through another ABI, where
 * the same number means another syscall (or socketcall(2) multiplexes socket() past a socket
 * family filter). The filter must kill these (SIGSYS); the Rust side expects exit 128+31.
 * Built non-PIE and static so that data addresses fit the 32-bit registers of int 0x80.
 */
#include "attack.h"

#define X32_BIT 0x40000000L

/* x32: getpid and socket(AF_INET) through the x32 ABI (syscall number | 0x40000000). */
ATTACK(x32)
{
    (void)argc;
    (void)argv;
    long r = syscall(X32_BIT | SYS_getpid);
    if (r >= 0)
        escaped("x32 getpid returned %ld", r);
    int e = errno;
    r = syscall(X32_BIT | SYS_socket, 2 /* AF_INET */, 1 /* SOCK_STREAM */, 0);
    if (r >= 0)
        escaped("x32 socket(AF_INET) returned fd %ld", r);
    blocked("x32 getpid: %s; x32 socket: %s (not killed: filter did not trap the x32 bit)",
            errname(e), en());
}

static long int80(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

/* int80: i386 getpid (20) via int 0x80. */
ATTACK(int80)
{
    (void)argc;
    (void)argv;
    long r = int80(20, 0, 0, 0);
    if (r >= 0)
        escaped("int 0x80 getpid returned %ld", r);
    blocked("int 0x80 getpid: %s (not killed)", errname((int)-r));
}

static unsigned int sockargs[3] = {2 /* AF_INET */, 1 /* SOCK_STREAM */, 0};

/* int80_socket: i386 socketcall(SYS_SOCKET, {AF_INET, SOCK_STREAM, 0}) (102) and the direct
 * i386 socket syscall (359): an inet socket past a socket-family filter. */
ATTACK(int80_socket)
{
    (void)argc;
    (void)argv;
    if ((unsigned long)sockargs > 0xffffffffUL)
        blocked("binary is PIE above 4 GiB; cannot pass pointers to int 0x80");
    long r = int80(102, 1, (long)(unsigned long)sockargs, 0);
    if (r >= 0)
        escaped("i386 socketcall(SYS_SOCKET, AF_INET) returned fd %ld", r);
    long r2 = int80(359, 2, 1, 0);
    if (r2 >= 0)
        escaped("i386 socket(AF_INET) returned fd %ld", r2);
    blocked("socketcall: %s; socket: %s (not killed)", errname((int)-r), errname((int)-r2));
}
