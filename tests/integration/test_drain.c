/*
 * test_drain - SIGTERM drains; systemd hears READY=1, RELOADING=1 and STOPPING=1.
 * 1. With --drain-timeout 30 and a connected client: SIGHUP sends RELOADING=1 then READY=1
 *    (and the client keeps echoing); after SIGTERM every worker stops
 *    accepting (new connections are refused), /status says "draining", the client keeps
 *    echoing, and once it closes the process exits 0 at once (well before the timeout).
 *    $NOTIFY_SOCKET (our datagram socket) got READY=1 at start and STOPPING=1 at SIGTERM.
 * 2. With --drain-timeout 1 and a client that never closes: the process closes it and exits 0
 *    when the grace period ends (not before, not long after).
 * 3. A second SIGTERM during a drain stops at once.
 * 4. --drain-timeout 0: SIGTERM stops at once, the client sees the close.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

static const char k_secret_hex[] = "00112233445566778899aabbccddeeff";

static struct fake_middle *g_fm;
static struct h_proc g_proc = {.pid = -1};
static char g_dir[256], g_sp[256], g_cp[256], g_notify[300];
static int g_notify_fd = -1;
static uint8_t g_secret[16];
static uint16_t g_port, g_admin;

static void cleanup(void) {
  if (g_proc.pid > 0) {
    h_dump_log(&g_proc);
    h_stop(&g_proc, 5000);
  }
  h_remove_log(&g_proc);
  fm_free(g_fm);
  g_fm = NULL;
  if (g_notify_fd >= 0)
    close(g_notify_fd);
  g_notify_fd = -1;
  if (g_notify[0])
    unlink(g_notify);
  g_notify[0] = '\0';
  if (g_dir[0])
    h_rmdir(g_dir);
  g_dir[0] = '\0';
}

static void start_proxy(const char *drain_timeout) {
  char *argv[] = {(char *)h_mtproxy_bin(), "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex,
                  "--proxy-secret", g_sp, "--proxy-config", g_cp, "--admin", "127.0.0.1:0", "--workers", "2",
                  "--drain-timeout", (char *)drain_timeout, "--log-level", "info", NULL};
  memset(&g_proc, 0, sizeof(g_proc));
  g_proc.pid = -1;
  CHECK(h_spawn(&g_proc, argv) == 0);
  CHECK(h_wait_listener(&g_proc, "l0", &g_port, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, &g_admin, 30000) == 0);
  CHECK(h_wait_log(&g_proc, "2 workers running", NULL, 0, 30000) == 0);
}

/* A client that has echoed one packet. */
static void connect_echo(struct tclient *c) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", g_port, g_secret, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
}

static void echo(struct tclient *c, size_t len) {
  uint8_t pkt[1024];
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

/* Waits for one $NOTIFY_SOCKET datagram containing want (others are skipped). */
static bool wait_notify(const char *want, int timeout_ms) {
  int64_t deadline = hx_now_ms() + timeout_ms;
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    struct pollfd pf = {.fd = g_notify_fd, .events = POLLIN};
    if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
      return false;
    char buf[1024];
    ssize_t n = recv(g_notify_fd, buf, sizeof(buf) - 1, 0);
    if (n < 0)
      continue;
    buf[n] = '\0';
    fprintf(stderr, "sd_notify: %s\n", buf);
    if (strstr(buf, want) != NULL)
      return true;
  }
}

/* Waits for the exit that is already under way (signal 0 sends nothing). */
static int wait_exit(int timeout_ms) { return hx_signal_wait(&g_proc, 0, timeout_ms); }

static void scenario_drain_until_clients_leave(void) {
  start_proxy("30");
  CHECK(wait_notify("READY=1", 5000));
  struct tclient c;
  connect_echo(&c);
  echo(&c, 128);
  /* SIGHUP reloads: systemd hears RELOADING=1, then READY=1 again. */
  CHECK(kill(g_proc.pid, SIGHUP) == 0);
  CHECK(wait_notify("RELOADING=1", 5000));
  CHECK(wait_notify("READY=1", 5000));
  CHECK(h_wait_log(&g_proc, "configuration reloaded", NULL, 0, 5000) == 0);
  echo(&c, 256);
  int64_t t0 = hx_now_ms();
  CHECK(kill(g_proc.pid, SIGTERM) == 0);
  CHECK(h_wait_log(&g_proc, "draining 1 client for up to 30 s", NULL, 0, 5000) == 0);
  CHECK(h_wait_log(&g_proc, "worker 0: stopped accepting", NULL, 0, 5000) == 0);
  CHECK(h_wait_log(&g_proc, "worker 1: stopped accepting", NULL, 0, 5000) == 0);
  CHECK(wait_notify("STOPPING=1", 5000));
  /* The listeners are closed: a new client is refused. */
  int fd = hx_connect(g_port, 2000);
  CHECK_MSG(fd < 0, "a new connection was accepted during the drain");
  /* The admin endpoint still answers, and says what is going on. */
  char *body = NULL;
  CHECK(h_http_get(g_admin, "/status", &body, 5000) == 200);
  CHECK_MSG(strstr(body, "\"state\":\"draining\"") != NULL, "%.300s", body);
  mtp_free(body);
  /* The connected client keeps working. */
  for (int i = 0; i < 5; i++)
    echo(&c, 64 + 64 * (size_t)i);
  CHECK(g_proc.pid > 0); /* still running */
  tc_close(&c);
  int code = wait_exit(10000);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "drain with a client that left: exit %d after %lld ms\n", code, (long long)el);
  CHECK(code == 0);
  CHECK(el < 15000);
  CHECK(h_wait_log(&g_proc, "drained: no client left", NULL, 0, 1000) == 0);
  CHECK(h_wait_log(&g_proc, "stopped", NULL, 0, 1000) == 0);
  h_stop(&g_proc, 1000);
  h_remove_log(&g_proc);
}

static void scenario_grace_deadline(void) {
  start_proxy("1");
  struct tclient c;
  connect_echo(&c);
  echo(&c, 128);
  int64_t t0 = hx_now_ms();
  CHECK(kill(g_proc.pid, SIGTERM) == 0);
  int code = wait_exit(10000);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "drain with a client that stays: exit %d after %lld ms\n", code, (long long)el);
  CHECK(code == 0);
  CHECK(el >= 900 && el < 6000);
  CHECK(h_wait_log(&g_proc, "drain timeout: closing the 1 remaining client", NULL, 0, 1000) == 0);
  CHECK(tc_wait_closed(&c, 5000) == MTP_ECLOSED);
  tc_close(&c);
  h_stop(&g_proc, 1000);
  h_remove_log(&g_proc);
}

static void scenario_second_signal(void) {
  start_proxy("30");
  struct tclient c;
  connect_echo(&c);
  echo(&c, 128);
  CHECK(kill(g_proc.pid, SIGTERM) == 0);
  CHECK(h_wait_log(&g_proc, "draining 1 client", NULL, 0, 5000) == 0);
  int64_t t0 = hx_now_ms();
  int code = hx_signal_wait(&g_proc, SIGTERM, 10000);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "second SIGTERM: exit %d after %lld ms\n", code, (long long)el);
  CHECK(code == 0);
  CHECK(el < 5000);
  CHECK(h_wait_log(&g_proc, "during the drain: stopping now", NULL, 0, 1000) == 0);
  CHECK(tc_wait_closed(&c, 5000) == MTP_ECLOSED);
  tc_close(&c);
  h_stop(&g_proc, 1000);
  h_remove_log(&g_proc);
}

static void scenario_no_drain(void) {
  start_proxy("0");
  struct tclient c;
  connect_echo(&c);
  echo(&c, 128);
  int64_t t0 = hx_now_ms();
  int code = hx_signal_wait(&g_proc, SIGTERM, 10000);
  int64_t el = hx_now_ms() - t0;
  CHECK(code == 0);
  CHECK(el < 5000);
  char *log = h_log_text(&g_proc);
  CHECK(strstr(log, "draining") == NULL);
  mtp_free(log);
  CHECK(tc_wait_closed(&c, 5000) == MTP_ECLOSED);
  tc_close(&c);
  h_stop(&g_proc, 1000);
  h_remove_log(&g_proc);
}

int main(void) {
  check_on_fail = cleanup;
  CHECK(h_mtproxy_bin() != NULL);
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, g_sp, g_cp) == 0);
  CHECK(mtp_hex_decode(k_secret_hex, g_secret, 16) == 16);

  /* systemd's notification socket, as the service manager would set it. */
  g_notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  CHECK(g_notify_fd >= 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(g_notify, sizeof(g_notify), "%s/notify", g_dir);
  CHECK(strlen(g_notify) < sizeof(un.sun_path));
  memcpy(un.sun_path, g_notify, strlen(g_notify) + 1);
  CHECK(bind(g_notify_fd, (struct sockaddr *)&un, sizeof(un)) == 0);
  CHECK(setenv("NOTIFY_SOCKET", g_notify, 1) == 0);

  scenario_drain_until_clients_leave();
  scenario_grace_deadline();
  scenario_second_signal();
  scenario_no_drain();

  cleanup();
  return check_report();
}
