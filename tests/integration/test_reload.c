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
 * 6. A fake-TLS listener l2 added (the first fake-TLS in this process) with domain fronting to
 *    a tiny TLS site in this test: the reload creates the certificate-flight probe, which
 *    learns the site's flight (log line and mtproxy_tls_probes_total{result="ok"}).
 * 7. Fronting pointed at a listener l3 that the same reload adds (pinned port): a non-TLS
 *    client on l2 is not spliced to l3 (fronting knows l3 as the proxy's own address): a
 *    fronting failure, no fronted connection, l3 accepted nothing.
 * Client connections by listener follow along (/metrics and /status): before the reload only
 * l0 is listed; after step 1, l1 too, each with its own accepted / open / handshake counts;
 * after step 4, l1 stays listed (in /metrics, and in /status "closed_listeners") while its
 * client is open, and disappears once that client has left.
 * Ends with a clean SIGTERM exit.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
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
  char sp[256], cp[256];
  he_start_fake(sp, cp);
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

/* POST /reload: the answer's status must be want, and its text contain needle (unless NULL). */
static void reload_post(int want, const char *needle) {
  static const char req[] = "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
  char *resp = NULL;
  int st = hx_http_raw(h_env.admin, req, sizeof(req) - 1, 0, 15000, &resp);
  CHECK_MSG(st == want && (needle == NULL || strstr(resp, needle) != NULL), "POST /reload: %d %s", st,
            resp != NULL ? resp : "");
  mtp_free(resp);
}

/* 127.0.0.1:port */
static struct sockaddr_in loopback(uint16_t port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  return a;
}

/* A TCP socket bound to 127.0.0.1 on a port the OS chose (in *port). */
static int bind_loopback(uint16_t *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  struct sockaddr_in a = loopback(0);
  socklen_t al = sizeof(a);
  CHECK(bind(fd, (struct sockaddr *)&a, al) == 0);
  CHECK(getsockname(fd, (struct sockaddr *)&a, &al) == 0);
  *port = ntohs(a.sin_port);
  return fd;
}

static bool port_refuses(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  struct sockaddr_in a = loopback(port);
  int r = connect(fd, (struct sockaddr *)&a, sizeof(a));
  int e = errno;
  close(fd);
  return r != 0 && e == ECONNREFUSED;
}

/* Per-listener series. */
static void series(char *out, size_t outlen, const char *metric, const char *listener, const char *protocol) {
  if (protocol != NULL)
    snprintf(out, outlen, "%s{listener=\"%s\",protocol=\"%s\"}", metric, listener, protocol);
  else
    snprintf(out, outlen, "%s{listener=\"%s\"}", metric, listener);
}

/* The value of a per-listener series (-1 when it is not listed). */
static double lmetric(const char *metric, const char *listener, const char *protocol) {
  char s[160];
  series(s, sizeof(s), metric, listener, protocol);
  return he_metric(s);
}

static bool lwait(const char *metric, const char *listener, const char *protocol, double want) {
  char s[160];
  double v = 0;
  series(s, sizeof(s), metric, listener, protocol);
  bool ok = he_wait_metric(s, want, 5000, &v);
  if (!ok)
    fprintf(stderr, "%s is %g, want %g\n", s, v, want);
  return ok;
}

#define L_OPEN "mtproxy_listener_client_connections"
#define L_ACCEPTED "mtproxy_listener_connections_total"
#define L_HS "mtproxy_listener_handshakes_total"

/* /status: the "clients" of listener name in "listeners" (or, with closed, in
 * "closed_listeners"); -1 when it is not there. */
static double status_clients(const char *name, bool closed) {
  char *body = NULL;
  CHECK(h_http_get(h_env.admin, "/status", &body, 5000) == 200);
  cJSON *j = cJSON_Parse(body);
  mtp_free(body);
  CHECK(j != NULL);
  double v = -1;
  const cJSON *it;
  cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(j, closed ? "closed_listeners" : "listeners")) {
    const char *n = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "name"));
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "clients");
    if (n != NULL && strcmp(n, name) == 0 && cJSON_IsNumber(c))
      v = cJSON_GetNumberValue(c);
  }
  cJSON_Delete(j);
  return v;
}

/* ---- a tiny TLS site: answers any ClientHello with a ServerHello, a ChangeCipherSpec and one
 * ApplicationData record of SITE_FLIGHT bytes, then closes (what the probe measures) ---- */

#define SITE_FLIGHT 1234

static int site_fd = -1;
static uint16_t site_port;
static pthread_t site_th;
static atomic_int site_stop;

static void *site_main(void *arg) {
  (void)arg;
  static uint8_t answer[5 + 42 + 6 + 5 + SITE_FLIGHT];
  size_t n = 0;
  const uint8_t sh[5] = {0x16, 0x03, 0x03, 0x00, 42};
  memcpy(answer, sh, 5);
  n = 5 + 42;
  const uint8_t ccs[6] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
  memcpy(answer + n, ccs, 6);
  n += 6;
  const uint8_t ad[5] = {0x17, 0x03, 0x03, SITE_FLIGHT >> 8, SITE_FLIGHT & 0xff};
  memcpy(answer + n, ad, 5);
  n += 5 + SITE_FLIGHT;
  while (!atomic_load(&site_stop)) {
    struct pollfd pf = {.fd = site_fd, .events = POLLIN};
    if (poll(&pf, 1, 50) <= 0)
      continue;
    int c = accept(site_fd, NULL, NULL);
    if (c < 0)
      continue;
    uint8_t in[4096];
    struct pollfd pc = {.fd = c, .events = POLLIN};
    if (poll(&pc, 1, 5000) == 1 && read(c, in, sizeof(in)) > 0)
      (void)!write(c, answer, n);
    close(c);
  }
  return NULL;
}

static void site_start(void) {
  site_fd = bind_loopback(&site_port);
  CHECK(listen(site_fd, 16) == 0);
  CHECK(pthread_create(&site_th, NULL, site_main, NULL) == 0);
}

static void site_stop_now(void) {
  if (site_fd < 0)
    return;
  atomic_store(&site_stop, 1);
  pthread_join(site_th, NULL);
  close(site_fd);
  site_fd = -1;
}

static void cleanup(void) {
  site_stop_now();
  he_cleanup();
}

/* A port nobody listens on now (for a listener the test pins). */
static uint16_t free_port(void) {
  uint16_t port;
  close(bind_loopback(&port));
  return port;
}

#define RELOADS_OK "mtproxy_config_reloads_total{result=\"ok\"}"
#define RELOADS_FAILED "mtproxy_config_reloads_total{result=\"failed\"}"
#define BAD_SECRET "mtproxy_handshake_failures_total{reason=\"bad_secret\"}"

int main(void) {
  check_on_fail = cleanup;
  start();
  double v = -1;
  CHECK(he_metric(RELOADS_OK) == 0);

  struct tclient before;
  open_client(&before, h_env.port, k_a);
  echo(&before, 200);
  /* By listener: l0 has the one client; l1 does not exist yet. */
  CHECK(lmetric(L_ACCEPTED, "l0", NULL) == 1);
  CHECK(lmetric(L_OPEN, "l0", NULL) == 1);
  CHECK(lmetric(L_HS, "l0", "secure") == 1);
  CHECK(lmetric(L_HS, "l0", "abridged") == 0);
  CHECK(lmetric(L_HS, "l0", "fake_tls") == 0);
  CHECK(lmetric(L_ACCEPTED, "l1", NULL) == -1);
  CHECK(status_clients("l0", false) == 1);

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
  /* By listener after the reload: l0 kept its counts and got 4 rejected + 6 good clients;
   * l1 has its own 6 + 1; each has one client open. */
  CHECK(lwait(L_OPEN, "l0", NULL, 1));
  CHECK(lwait(L_OPEN, "l1", NULL, 1));
  CHECK(lmetric(L_ACCEPTED, "l0", NULL) == 11);
  CHECK(lmetric(L_HS, "l0", "secure") == 7);
  CHECK(lmetric(L_ACCEPTED, "l1", NULL) == 7);
  CHECK(lmetric(L_HS, "l1", "secure") == 7);
  CHECK(lmetric(L_HS, "l1", "intermediate") == 0);
  CHECK(status_clients("l0", false) == 1);
  CHECK(status_clients("l1", false) == 1);
  CHECK(status_clients("l1", true) == -1);

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
  reload_post(422, "secrets");
  CHECK(he_wait_metric(RELOADS_FAILED, 2, 5000, &v));

  /* 4. l1 removed via POST /reload: its port refuses at once; its client stays. */
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]}]}\n",
           k_b);
  write_conf(t);
  reload_post(200, "reloaded");
  CHECK(port_refuses(port1));
  CHECK(h_wait_log(&h_env.proc, "listener l1 closed", NULL, 0, 1000) == 0);
  echo(&via_l1, 500);
  echo(&before, 500);
  clients(h_env.port, k_b, 2, true);
  CHECK(he_metric(RELOADS_OK) == 2);
  /* l1 is gone from the configuration but its client is still open: still listed. */
  CHECK(lmetric(L_OPEN, "l1", NULL) == 1);
  CHECK_MSG(lmetric(L_ACCEPTED, "l1", NULL) == 9, "l1 accepted %g", lmetric(L_ACCEPTED, "l1", NULL));
  CHECK(status_clients("l1", false) == -1);
  CHECK(status_clients("l1", true) == 1);
  tc_close(&via_l1);
  CHECK(lwait(L_OPEN, "l1", NULL, -1)); /* its last client left: no longer listed */
  CHECK(lmetric(L_ACCEPTED, "l1", NULL) == -1);
  CHECK(status_clients("l1", true) == -1);
  CHECK(lwait(L_OPEN, "l0", NULL, 1));

  /* 5. l0 pinned to the port it has (0 -> that port): a new socket on the same address
   * replaces the old one; clients old and new keep working. */
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1,\n"
           " \"listeners\": [{\"name\": \"l0\", \"listen\": \"127.0.0.1:%u\", \"secrets\": [\"%s\"]}]}\n",
           (unsigned)h_env.port, k_b);
  write_conf(t);
  reload_post(200, NULL);
  CHECK(h_wait_log(&h_env.proc, "reload: generation 3, 1 listener (+1 -1, 0 changed)", NULL, 0, 1000) == 0);
  echo(&before, 64);
  clients(h_env.port, k_b, 6, true);

  /* 6. The first fake-TLS listener, fronting to the test's TLS site: the reload starts the
   * certificate-flight probe, which learns the site's flight. */
  site_start();
  char l0_json[160];
  snprintf(l0_json, sizeof(l0_json), "{\"name\": \"l0\", \"listen\": \"127.0.0.1:%u\", \"secrets\": [\"%s\"]}",
           (unsigned)h_env.port, k_b);
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1, \"domain_fronting\": \"127.0.0.1:%u\",\n"
           " \"listeners\": [%s,\n"
           "               {\"name\": \"l2\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"],\n"
           "                \"allowed_protocols\": [\"fake_tls\"], \"tls_domains\": [\"example.com\"]}]}\n",
           (unsigned)site_port, l0_json, k_c);
  write_conf(t);
  CHECK(he_metric("mtproxy_tls_probes_total{result=\"ok\"}") == 0);
  reload_post(200, NULL);
  uint16_t port2 = 0;
  CHECK(h_wait_listener(&h_env.proc, "l2", &port2, 10000) == 0);
  char want[128];
  snprintf(want, sizeof(want), "tls probe example.com via 127.0.0.1:%u: flight %u bytes", (unsigned)site_port,
           (unsigned)SITE_FLIGHT);
  CHECK(h_wait_log(&h_env.proc, want, NULL, 0, 10000) == 0);
  CHECK(he_wait_metric("mtproxy_tls_probes_total{result=\"ok\"}", 1, 5000, &v));

  /* 7. Fronting to l3, a listener this same reload adds: the proxy itself, so not dialled.
   * tls_flight_size is fixed so the probe does not dial it either. */
  uint16_t port3 = free_port();
  snprintf(t, sizeof(t),
           "{\"handshake_timeout\": 1, \"domain_fronting\": \"127.0.0.1:%u\", \"tls_flight_size\": 3000,\n"
           " \"listeners\": [%s,\n"
           "               {\"name\": \"l2\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"],\n"
           "                \"allowed_protocols\": [\"fake_tls\"], \"tls_domains\": [\"example.com\"]},\n"
           "               {\"name\": \"l3\", \"listen\": \"127.0.0.1:%u\", \"secrets\": [\"%s\"]}]}\n",
           (unsigned)port3, l0_json, k_c, (unsigned)port3, k_a);
  write_conf(t);
  reload_post(200, NULL);
  CHECK(lmetric(L_ACCEPTED, "l3", NULL) == 0);
  double ff0 = he_metric("mtproxy_fronting_failures_total"), ft0 = he_metric("mtproxy_fronted_connections_total");
  int fd = hx_connect(port2, 5000);
  CHECK(fd >= 0);
  static const char get[] = "GET / HTTP/1.0\r\n\r\n"; /* not TLS on a TLS-only listener */
  CHECK(hx_write_all(fd, get, sizeof(get) - 1) == 0);
  CHECK(he_wait_metric("mtproxy_fronting_failures_total", ff0 + 1, 5000, &v));
  snprintf(want, sizeof(want), "resolves to 127.0.0.1:%u, the proxy itself", (unsigned)port3);
  CHECK(h_wait_log(&h_env.proc, want, NULL, 0, 5000) == 0);
  close(fd);
  CHECK(he_metric("mtproxy_fronted_connections_total") == ft0);
  CHECK(lmetric(L_ACCEPTED, "l3", NULL) == 0);
  CHECK(lmetric(L_ACCEPTED, "l2", NULL) == 1);
  site_stop_now();
  echo(&before, 64);
  tc_close(&before);

  CHECK(he_finish() == 0);
  return check_report();
}
