/*
 * test_split_netns - split mode across two network namespaces joined by a veth pair, as two
 * servers would be: mtproxy-back (and the fake middle proxy, on its loopback) in namespace A at
 * 10.X.Y.1, mtproxy-front in namespace B at 10.X.Y.2 dialing the back's veth address; a client
 * inside B echoes every framing through the front. Names carry this process's PID; the
 * namespaces (and with them the veth pair) are always deleted at the end, also on failure.
 *
 * Needs root and a working `ip netns`; otherwise prints "SKIP: ..." and returns 77 (CTest's
 * SKIP_RETURN_CODE for this test).
 */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "err.h"
#include "harness.h"
#include "harness_extra.h"
#include "harness_split.h"
#include "tclient.h"
#include "banned.h"

#define SKIP_CODE 77

static const char *g_ip;        /* the ip(8) binary */
static char g_ns_a[32], g_ns_b[32], g_veth_a[16], g_veth_b[16];
static char g_addr_a[32], g_addr_b[32];
static bool g_ns_a_made, g_ns_b_made;
static int g_root_ns = -1;      /* this thread's original network namespace */

/* Runs `ip ARGS...`; returns its exit code (or -1); prints the output when it failed. */
static int ip(char *const args[]) {
  char *out = NULL;
  int code = -1;
  if (hx_run_cmd(g_ip, NULL, args, 20000, &out, &code) != 0)
    code = -1;
  if (code != 0) {
    fprintf(stderr, "ip");
    for (size_t i = 0; args[i]; i++)
      fprintf(stderr, " %s", args[i]);
    fprintf(stderr, ": exit %d: %s", code, out ? out : "\n");
  }
  mtp_free(out);
  return code;
}

static void delete_namespaces(void) {
  if (g_root_ns >= 0)
    setns(g_root_ns, CLONE_NEWNET);
  /* Deleting a namespace destroys the veth end inside it, and so the pair. */
  if (g_ns_b_made && ip((char *[]){"netns", "del", g_ns_b, NULL}) == 0)
    g_ns_b_made = false;
  if (g_ns_a_made && ip((char *[]){"netns", "del", g_ns_a, NULL}) == 0)
    g_ns_a_made = false;
}

static void cleanup(void) {
  hs_cleanup(); /* stops the processes first: they live in the namespaces */
  delete_namespaces();
}

/* Moves this thread into the named namespace (true) or back to the original one (NULL). */
static bool enter(const char *ns) {
  if (ns == NULL)
    return setns(g_root_ns, CLONE_NEWNET) == 0;
  char path[128];
  snprintf(path, sizeof(path), "/var/run/netns/%s", ns);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  bool ok = setns(fd, CLONE_NEWNET) == 0;
  close(fd);
  return ok;
}

static int skip(const char *why) {
  printf("SKIP: test_split_netns: %s\n", why);
  fflush(stdout);
  return SKIP_CODE;
}

int main(void) {
  if (geteuid() != 0)
    return skip("needs root to create network namespaces (run as root, e.g. in CI)");
  static const char *const ips[] = {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"};
  for (size_t i = 0; i < sizeof(ips) / sizeof(ips[0]) && g_ip == NULL; i++)
    if (access(ips[i], X_OK) == 0)
      g_ip = ips[i];
  if (g_ip == NULL)
    return skip("no ip(8) binary (install iproute2)");
  g_root_ns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (g_root_ns < 0)
    return skip("cannot open /proc/self/ns/net");

  long pid = (long)getpid();
  snprintf(g_ns_a, sizeof(g_ns_a), "mtpback%ld", pid);
  snprintf(g_ns_b, sizeof(g_ns_b), "mtpfront%ld", pid);
  snprintf(g_veth_a, sizeof(g_veth_a), "mtpva%ld", pid % 10000000);
  snprintf(g_veth_b, sizeof(g_veth_b), "mtpvb%ld", pid % 10000000);
  unsigned x = 64 + (unsigned)((pid >> 8) % 128), y = (unsigned)(pid & 0xff);
  snprintf(g_addr_a, sizeof(g_addr_a), "10.%u.%u.1", x, y);
  snprintf(g_addr_b, sizeof(g_addr_b), "10.%u.%u.2", x, y);
  char cidr_a[40], cidr_b[40];
  snprintf(cidr_a, sizeof(cidr_a), "%s/24", g_addr_a);
  snprintf(cidr_b, sizeof(cidr_b), "%s/24", g_addr_b);

  if (ip((char *[]){"netns", "add", g_ns_a, NULL}) != 0)
    return skip("'ip netns add' does not work here");
  g_ns_a_made = true;
  atexit(delete_namespaces); /* also when a setup step exits early */
  check_on_fail = cleanup;
  CHECK(ip((char *[]){"netns", "add", g_ns_b, NULL}) == 0);
  g_ns_b_made = true;
  CHECK(ip((char *[]){"link", "add", g_veth_a, "type", "veth", "peer", "name", g_veth_b, NULL}) == 0);
  CHECK(ip((char *[]){"link", "set", g_veth_a, "netns", g_ns_a, NULL}) == 0);
  CHECK(ip((char *[]){"link", "set", g_veth_b, "netns", g_ns_b, NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_a, "addr", "add", cidr_a, "dev", g_veth_a, NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_b, "addr", "add", cidr_b, "dev", g_veth_b, NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_a, "link", "set", g_veth_a, "up", NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_b, "link", "set", g_veth_b, "up", NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_a, "link", "set", "lo", "up", NULL}) == 0);
  CHECK(ip((char *[]){"-n", g_ns_b, "link", "set", "lo", "up", NULL}) == 0);
  fprintf(stderr, "namespaces %s (%s) and %s (%s) joined by %s/%s\n", g_ns_a, g_addr_a, g_ns_b, g_addr_b, g_veth_a,
          g_veth_b);

  /* The fake middle proxy listens on namespace A's loopback: its socket is made while this
   * thread is in A (its thread inherits A). */
  CHECK(enter(g_ns_a));
  hs_setup();
  CHECK(enter(NULL));

  char *pre_a[] = {(char *)g_ip, "netns", "exec", g_ns_a, NULL};
  char *pre_b[] = {(char *)g_ip, "netns", "exec", g_ns_b, NULL};
  char tunnel[48], back[48];
  snprintf(tunnel, sizeof(tunnel), "%s:0", g_addr_a);
  CHECK(hs_back_start_ex(&hs.back, pre_a, NULL, tunnel, "2", NULL) == 0);
  snprintf(back, sizeof(back), "%s:%u", g_addr_a, hs.back.port);
  CHECK(hs_front_start_ex(&hs.fronts[0], pre_b, NULL, "front1", back, "127.0.0.1:0", "1", NULL) == 0);
  fprintf(stderr, "back on %s, front dials %s, listens on 127.0.0.1:%u in %s\n", tunnel, back, hs.fronts[0].port,
          g_ns_b);

  /* Clients inside namespace B (the front's loopback). */
  CHECK(enter(g_ns_b));
  int64_t ms = hs_echo_within(hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 30000);
  fprintf(stderr, "first echo through the front after %lld ms\n", (long long)ms);
  CHECK(ms >= 0);
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  for (int i = 0; i < 30; i++) {
    int rc = hs_echo("127.0.0.1", hs.fronts[0].port, protos[i % 3], (int16_t)(1 + i % 5), 64 + 4 * (size_t)i * 17,
                     5000);
    CHECK_MSG(rc == MTP_OK, "echo %d: %s", i, mtp_strerror(rc));
  }
  CHECK(enter(NULL));

  /* The front's tunnel crossed the veth pair: the back saw the front's veth address. */
  char *log = h_log_text(&hs.back.proc);
  bool saw = log && strstr(log, g_addr_b) != NULL;
  fprintf(stderr, "back's log %s the front's address %s\n", saw ? "names" : "does not name", g_addr_b);
  mtp_free(log);

  int frc = hs_finish();
  delete_namespaces();
  CHECK(frc == 0);
  CHECK(!g_ns_a_made && !g_ns_b_made);
  close(g_root_ns);
  return check_report();
}
