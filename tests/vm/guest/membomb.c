/* The VM checks' memory bomb: allocates and touches memory until it is killed.
 *
 * It first holds 128 MiB for a few seconds (so the checks can find its cgroup and read its
 * limits while it runs), then keeps allocating 16 MiB blocks without end. Under a memory limit
 * it is OOM-killed; if it ever gets past 8 GiB it exits 3 (no limit was enforced). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
  const size_t block = 16u << 20;
  size_t total = 0;
  for (;;) {
    char *p = malloc(block);
    if (p == NULL) {
      printf("malloc failed after %zu MiB\n", total >> 20);
      return 2;
    }
    memset(p, 0xa5, block);
    total += block;
    if (total == (128u << 20)) {
      printf("holding %zu MiB\n", total >> 20);
      fflush(stdout);
      sleep(4);
    }
    if (total >= ((size_t)8 << 30)) {
      printf("allocated %zu MiB without being stopped\n", total >> 20);
      return 3;
    }
  }
}
