/* The VM checks' fork bomb: forks children that only sleep until fork fails, prints how many it
 * made and why fork failed ("forks=N errno=EAGAIN"), kills them and exits 0. Exits 3 if it made
 * 100000 children without being stopped. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CHILDREN 100000

static pid_t children[MAX_CHILDREN];

int main(void) {
  int n = 0, err = 0;
  while (n < MAX_CHILDREN) {
    pid_t pid = fork();
    if (pid < 0) {
      err = errno;
      break;
    }
    if (pid == 0) {
      for (;;) pause();
    }
    children[n++] = pid;
  }
  printf("forks=%d errno=%s\n", n, err == EAGAIN ? "EAGAIN" : strerror(err));
  fflush(stdout);
  for (int i = 0; i < n; i++) kill(children[i], SIGKILL);
  for (int i = 0; i < n; i++) waitpid(children[i], NULL, 0);
  return n >= MAX_CHILDREN ? 3 : 0;
}
