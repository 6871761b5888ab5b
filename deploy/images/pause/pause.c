/* The pause process of Sandfleet's pod sandboxes (the CRI runtime's sessions'
 * containerd uses it as its sandbox_image): pid 1 of each session's pod, it
 * reaps the processes that end up as its children and exits on SIGTERM.
 * Built statically (no libc in the image): deploy/images/build-daemon-images
 * for clusters, sandfleet-testkit for the tests. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction term = {0}, chld = {0};
  term.sa_handler = stop;
  sigaction(SIGTERM, &term, 0);
  sigaction(SIGINT, &term, 0);
  chld.sa_handler = reap;
  chld.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &chld, 0);
  for (;;) pause();
}
