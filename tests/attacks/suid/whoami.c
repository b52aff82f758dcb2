/* Installed set-uid root (mode 4755) next to the attack binary by the test harness; it only
 * prints its real and effective ids, so a leftover copy on the host grants nothing.
 * Used by the `suid_exec` attack: inside the sandbox, nosuid mounts and no_new_privs must keep
 * the effective uid equal to the real one. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    printf("%u %u\n", (unsigned)getuid(), (unsigned)geteuid());
    return 0;
}
