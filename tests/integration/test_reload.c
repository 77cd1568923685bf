/*
 * test_reload - hot reload of the real binary (2 workers) started with --config FILE, the file
 * rewritten between reloads:
 * 1. SIGHUP with l0's secret changed (A -> B) and a listener l1 added: the log announces
 *    "listener l1 listening on ..."; a client connected to l0 before keeps echoing; new
 *    clients on l0 with A get silence and are closed (bad_secret counted), with B they echo
 *    (several of each, so both workers are exercised); l1 serves its own secret;
 *    /status lists l1; mtproxy_config_reloads_total{result="ok"} is 1.
 * 2. SIGHUP with an invalid file (bad secret): the log gives the reason (file and key),
 *    {result="failed"} is 1, and everything keeps working as after step 1.
 * 3. POST /reload with an invalid file: 422 with the reason.
 * 4. POST /reload with l1 removed: 200; l1's port refuses connections at once, a client
 *    connected through l1 before keeps echoing; {result="ok"} is 2.
 * 5. l0 pinned to the port the OS gave it ("127.0.0.1:0" -> "127.0.0.1:PORT" is a new socket
 *    on the same address): the old socket closes, the new one serves, the old client echoes.
 * Ends with a clean SIGTERM exit.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

static const char k_a[] = "0123456789abcdef0123456789abcdef";
static const char k_b[] = "fedcba9876543210fedcba9876543210";
static const char k_c[] = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";

static char g_conf[300];

static void require(bool ok, const char *what) {
  if (ok)
    return;
  fprintf(stderr, "test setup failed: %s\n", what);
  he_cleanup();
  exit(1);
}

static void write_conf(const char *text) {
  CHECK(h_write_file(g_conf, text, strlen(text)) == 0);
}

/* One listener l0 with secret A: the config the proxy starts with. */
static void write_conf_start(void) {
  char t[1024];
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]}]}\n",
           k_a);
  write_conf(t);
}

/* The fake, the config file and mtproxy --config FILE with 2 workers (the scene of h_env, with
 * the listeners in the file instead of on the command line). */
static void start(void) {
  const char *bin = h_mtproxy_bin();
  require(bin != NULL, "MTPROXY_BIN is not set");
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &h_env.fm);
  require(fport > 0, "fake middle proxy did not start");
  require(h_tmpdir(h_env.dir, sizeof(h_env.dir)) == 0, "no temp dir");
  char sp[256], cp[256];
  require(h_write_middle_files(h_env.dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0,
          "cannot write the Telegram config files");
  snprintf(g_conf, sizeof(g_conf), "%s/mtproxy.json", h_env.dir);
  write_conf_start();
  char *argv[] = {(char *)bin, "--config", g_conf, "--proxy-secret", sp, "--proxy-config", cp, "--admin",
                  "127.0.0.1:0", "--workers", "2", "--log-level", "info", NULL};
  h_env.proc.pid = -1;
  require(h_spawn(&h_env.proc, argv) == 0, "cannot start mtproxy");
  require(h_wait_listener(&h_env.proc, "l0", &h_env.port, 30000) == 0, "mtproxy did not announce listener l0");
  require(h_wait_admin(&h_env.proc, &h_env.admin, 30000) == 0, "mtproxy did not announce its admin endpoint");
  require(h_wait_log(&h_env.proc, "2 workers running", NULL, 0, 30000) == 0, "workers did not start");
}

static void secret_of(const char *hex, uint8_t out[16]) { CHECK(mtp_hex_decode(hex, out, 16) == 16); }

static void open_client(struct tclient *c, uint16_t port, const char *secret_hex) {
  uint8_t s[16];
  secret_of(secret_hex, s);
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", port, s, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
}

static void echo(struct tclient *c, size_t len) {
  uint8_t pkt[2048];
  CHECK(len <= sizeof(pkt));
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  CHECK_MSG(rc == MTP_OK, "recv: %s", mtp_strerror(rc));
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

/* n clients with secret_hex on port: each echoes (good) or gets nothing and is closed at the
 * handshake timeout (bad; the clients wait in parallel). */
static void clients(uint16_t port, const char *secret_hex, int n, bool good) {
  struct tclient c[8];
  CHECK(n <= 8);
  for (int i = 0; i < n; i++) {
    open_client(&c[i], port, secret_hex);
    if (good)
      echo(&c[i], 128);
    else {
      uint8_t pkt[128];
      tc_make_packet(pkt, sizeof(pkt), true);
      CHECK(tc_send(&c[i], pkt, sizeof(pkt), false) == MTP_OK);
    }
  }
  for (int i = 0; i < n; i++) {
    if (!good) {
      struct tc_msg m;
      int rc = tc_recv(&c[i], 5000, &m);
      CHECK_MSG(rc == MTP_ECLOSED, "a client with an old secret got %s", mtp_strerror(rc));
    }
    tc_close(&c[i]);
  }
}

/* POST /reload; returns the HTTP status, the answer in resp (mtp_free). */
static int post_reload(char **resp) {
  static const char req[] = "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
  *resp = NULL;
  int fd = hx_connect(h_env.admin, 5000);
  CHECK(fd >= 0);
  CHECK(hx_write_all(fd, req, sizeof(req) - 1) == 0);
  size_t cap = 8192, got = 0;
  char *buf = mtp_malloc(cap);
  CHECK(buf != NULL);
  int64_t deadline = hx_now_ms() + 15000;
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
      break;
    ssize_t r = read(fd, buf + got, cap - 1 - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0 || (got += (size_t)r) >= cap - 1)
      break;
  }
  close(fd);
  buf[got] = '\0';
  *resp = buf;
  int st = -1;
  if (sscanf(buf, "HTTP/1.1 %d", &st) != 1)
    st = -1;
  return st;
}

static bool port_refuses(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  int r = connect(fd, (struct sockaddr *)&a, sizeof(a));
  int e = errno;
  close(fd);
  return r != 0 && e == ECONNREFUSED;
}

#define RELOADS_OK "mtproxy_config_reloads_total{result=\"ok\"}"
#define RELOADS_FAILED "mtproxy_config_reloads_total{result=\"failed\"}"
#define BAD_SECRET "mtproxy_handshake_failures_total{reason=\"bad_secret\"}"

int main(void) {
  check_on_fail = he_cleanup;
  start();
  double v = -1;
  CHECK(he_metric(RELOADS_OK) == 0);

  struct tclient before;
  open_client(&before, h_env.port, k_a);
  echo(&before, 200);

  /* 1. l0: A -> B, l1 added. */
  char t[1024];
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]},\n"
           "               {\"name\": \"l1\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]}]}\n",
           k_b, k_c);
  write_conf(t);
  CHECK(kill(h_env.proc.pid, SIGHUP) == 0);
  uint16_t port1 = 0;
  CHECK(h_wait_listener(&h_env.proc, "l1", &port1, 10000) == 0);
  CHECK(port1 != 0 && port1 != h_env.port);
  CHECK(h_wait_log(&h_env.proc, "configuration reloaded", NULL, 0, 10000) == 0);
  CHECK(h_wait_log(&h_env.proc, "reload: generation 1, 2 listeners (+1 -0, 1 changed)", NULL, 0, 1000) == 0);
  CHECK(he_wait_metric(RELOADS_OK, 1, 5000, &v));

  echo(&before, 300); /* the established client on the unchanged listener */
  double bad0 = he_metric(BAD_SECRET);
  clients(h_env.port, k_a, 4, false); /* the old secret no longer works for new clients */
  CHECK(he_wait_metric(BAD_SECRET, bad0 + 4, 5000, &v));
  clients(h_env.port, k_b, 6, true);
  clients(port1, k_c, 6, true);
  struct tclient via_l1;
  open_client(&via_l1, port1, k_c);
  echo(&via_l1, 64);
  char *body = NULL;
  CHECK(h_http_get(h_env.admin, "/status", &body, 5000) == 200);
  CHECK(body != NULL && strstr(body, "\"l1\"") != NULL);
  mtp_free(body);

  /* 2. An invalid file via SIGHUP: refused with the reason; nothing changes. */
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]},\n"
           "               {\"name\": \"l2\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"xyz\"]}]}\n",
           k_b);
  write_conf(t);
  CHECK(kill(h_env.proc.pid, SIGHUP) == 0);
  char rest[512];
  CHECK(h_wait_log(&h_env.proc, "reload failed", rest, sizeof(rest), 10000) == 0);
  CHECK_MSG(strstr(rest, "mtproxy.json") != NULL && strstr(rest, "secrets") != NULL, "reason: %s", rest);
  CHECK(he_wait_metric(RELOADS_FAILED, 1, 5000, &v));
  CHECK(he_metric(RELOADS_OK) == 1);
  echo(&before, 100);
  echo(&via_l1, 100);
  clients(h_env.port, k_b, 2, true);
  clients(port1, k_c, 2, true);

  /* 3. The same through the admin endpoint: 422 with the reason. */
  char *resp = NULL;
  int st = post_reload(&resp);
  CHECK_MSG(st == 422 && strstr(resp, "secrets") != NULL, "POST /reload: %d %s", st, resp);
  mtp_free(resp);
  CHECK(he_wait_metric(RELOADS_FAILED, 2, 5000, &v));

  /* 4. l1 removed via POST /reload: its port refuses at once; its client stays. */
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]}]}\n",
           k_b);
  write_conf(t);
  st = post_reload(&resp);
  CHECK_MSG(st == 200 && strstr(resp, "reloaded") != NULL, "POST /reload: %d %s", st, resp);
  mtp_free(resp);
  CHECK(port_refuses(port1));
  CHECK(h_wait_log(&h_env.proc, "listener l1 closed", NULL, 0, 1000) == 0);
  echo(&via_l1, 500);
  echo(&before, 500);
  clients(h_env.port, k_b, 2, true);
  CHECK(he_metric(RELOADS_OK) == 2);
  tc_close(&via_l1);

  /* 5. l0 pinned to the port it has (0 -> that port): a new socket on the same address
   * replaces the old one; clients old and new keep working. */
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:%u\", \"secrets\": [\"%s\"]}]}\n",
           (unsigned)h_env.port, k_b);
  write_conf(t);
  st = post_reload(&resp);
  CHECK_MSG(st == 200, "POST /reload: %d %s", st, resp);
  mtp_free(resp);
  CHECK(h_wait_log(&h_env.proc, "reload: generation 3, 1 listener (+1 -1, 0 changed)", NULL, 0, 1000) == 0);
  echo(&before, 64);
  clients(h_env.port, k_b, 6, true);
  tc_close(&before);

  CHECK(he_finish() == 0);
  return check_report();
}
