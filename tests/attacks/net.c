/* Network attacks. Profile `tool` has network = none: a new, empty network namespace, socket()
 * limited to AF_UNIX by seccomp, TCP bind/connect denied by Landlock (ABI 4), abstract unix
 * sockets scoped (ABI 6). The test runs real listeners on the host; every path must fail and the
 * listeners must receive nothing. (codex linux-sandbox tests curl/nc/ssh/bash /dev/tcp the same.)
 */
#include "attack.h"

#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/netlink.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

static void timeouts(int fd)
{
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* tcp4 ADDR PORT TOKEN: connect to a host TCP listener (loopback or the host's own address) and
 * send TOKEN. */
ATTACK(tcp4)
{
    const char *addr = arg_str(argc, argv, 1, "127.0.0.1");
    int port = (int)arg_long(argc, argv, 2, 80);
    const char *token = arg_str(argc, argv, 3, "CARAPACE-NET");
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        blocked("socket(AF_INET, SOCK_STREAM): %s", en());
    timeouts(fd);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, addr, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        blocked("connect %s:%d: %s", addr, port, en());
    if (write(fd, token, strlen(token)) < 0)
        blocked("connected to %s:%d but write: %s", addr, port, en());
    escaped("TCP connection to %s:%d", addr, port);
}

/* tcp6 PORT TOKEN: the same over IPv6 loopback. */
ATTACK(tcp6)
{
    int port = (int)arg_long(argc, argv, 1, 80);
    const char *token = arg_str(argc, argv, 2, "CARAPACE-NET");
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        blocked("socket(AF_INET6): %s", en());
    timeouts(fd);
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    sa.sin6_addr = in6addr_loopback;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        blocked("connect [::1]:%d: %s", port, en());
    if (write(fd, token, strlen(token)) < 0)
        blocked("connected but write: %s", en());
    escaped("TCP connection to [::1]:%d", port);
}

/* udp4 ADDR PORT TOKEN: send a datagram to a host UDP socket; the test checks it never arrives.
 * A sendto() that "succeeds" into an empty namespace is not an escape by itself, so the verdict
 * here is only that the send failed; the host-side check is authoritative. */
ATTACK(udp4)
{
    const char *addr = arg_str(argc, argv, 1, "127.0.0.1");
    int port = (int)arg_long(argc, argv, 2, 53);
    const char *token = arg_str(argc, argv, 3, "CARAPACE-NET");
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        blocked("socket(AF_INET, SOCK_DGRAM): %s", en());
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, addr, &sa.sin_addr);
    if (sendto(fd, token, strlen(token), 0, (struct sockaddr *)&sa, sizeof sa) < 0)
        blocked("sendto %s:%d: %s", addr, port, en());
    escaped("UDP datagram sent to %s:%d", addr, port);
}

/* unix_path PATH TOKEN: connect to a host unix socket by path (docker.sock, dbus, X11 style). */
ATTACK(unix_path)
{
    const char *path = arg_str(argc, argv, 1, "/run/dbus/system_bus_socket");
    const char *token = arg_str(argc, argv, 2, "CARAPACE-NET");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        blocked("socket(AF_UNIX): %s", en());
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        blocked("connect %s: %s", path, en());
    if (write(fd, token, strlen(token)) < 0)
        blocked("connected but write: %s", en());
    escaped("connected to host unix socket %s", path);
}

/* unix_abstract NAME TOKEN: abstract unix sockets live in the network namespace (and Landlock
 * ABI 6 scopes them): a host listener at @NAME must be unreachable. */
ATTACK(unix_abstract)
{
    const char *name = arg_str(argc, argv, 1, "carapace-abstract");
    const char *token = arg_str(argc, argv, 2, "CARAPACE-NET");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        blocked("socket(AF_UNIX): %s", en());
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(name);
    if (n > sizeof sa.sun_path - 1)
        n = sizeof sa.sun_path - 1;
    memcpy(sa.sun_path + 1, name, n);
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    if (connect(fd, (struct sockaddr *)&sa, len) != 0)
        blocked("connect @%s: %s", name, en());
    if (write(fd, token, strlen(token)) < 0)
        blocked("connected but write: %s", en());
    escaped("connected to host abstract socket @%s", name);
}

/* raw: raw IP sockets (ping sweeps, spoofing). */
ATTACK(raw)
{
    (void)argc;
    (void)argv;
    int fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
    if (fd >= 0)
        escaped("raw ICMP socket");
    int e = errno;
    fd = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    if (fd >= 0)
        escaped("raw IPv6 socket");
    blocked("socket(AF_INET, SOCK_RAW): %s; AF_INET6: %s", errname(e), en());
}

/* packet: AF_PACKET sockets (sniffing, and the source of several kernel CVEs). */
ATTACK(packet)
{
    (void)argc;
    (void)argv;
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd >= 0)
        escaped("AF_PACKET socket");
    blocked("socket(AF_PACKET): %s", en());
}

/* netlink: rtnetlink / other netlink families (routing, netfilter, audit, uevents). */
ATTACK(netlink)
{
    (void)argc;
    (void)argv;
    int protos[] = {NETLINK_ROUTE, NETLINK_KOBJECT_UEVENT, NETLINK_AUDIT, NETLINK_NETFILTER};
    char why[512] = "";
    for (size_t i = 0; i < sizeof protos / sizeof protos[0]; i++) {
        int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protos[i]);
        if (fd >= 0)
            escaped("netlink socket protocol %d", protos[i]);
        size_t u = strlen(why);
        snprintf(why + u, sizeof why - u, "%sproto %d: %s", u ? "; " : "", protos[i], en());
    }
    blocked("%s", why);
}

/* vsock: this machine is a VM whose host listens on vsock; AF_VSOCK is a network path that no
 * network namespace covers. Reaching socket() is already too much. */
ATTACK(vsock)
{
    (void)argc;
    (void)argv;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0)
        escaped("AF_VSOCK socket created (CID 2 is the hypervisor host)");
    blocked("socket(AF_VSOCK): %s", en());
}

/* socket_other: other address families that escape a netns or carry kernel attack surface. */
ATTACK(socket_other)
{
    (void)argc;
    (void)argv;
    int fams[] = {AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK, AF_ALG, AF_KEY, AF_BLUETOOTH,
                  AF_XDP, AF_TIPC, AF_RDS, AF_CAN, AF_X25, AF_AX25, AF_APPLETALK, AF_SMC};
    int types[] = {SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET};
    char why[4096] = "";
    for (size_t i = 0; i < sizeof fams / sizeof fams[0]; i++) {
        int got = 0, last = 0;
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            int fd = socket(fams[i], types[t] | SOCK_CLOEXEC, 0);
            if (fd >= 0)
                escaped("socket(family %d, type %d)", fams[i], types[t]);
            last = errno;
            got = 1;
        }
        size_t u = strlen(why);
        if (got)
            snprintf(why + u, sizeof why - u, "%s%d:%s", u ? " " : "", fams[i], errname(last));
    }
    blocked("no non-unix socket: %s", why);
}
