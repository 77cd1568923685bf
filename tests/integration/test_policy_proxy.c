/*
 * test_policy_proxy - connection policy end to end through the real mtproxy (harness_env), with
 * the rules in a config file and the tables file in the temp dir. Three listeners: l0 and l1 on
 * 127.0.0.1, l2 on [::1] (left out when the machine has no ::1). Rule by rule:
 *
 *   0 in_table tls_domain domains       a.example allowed; b.example (also a --tls-domain) is
 *                                       silenced, then allowed while the admin API lists it
 *   1 not_in_table client_ipv4 blocked  127.0.0.1 added at runtime: new clients silenced,
 *   2 not_in_table client_ipv6 blocked  existing ones keep echoing; deleted: served again
 *   3 not_in_table ipv4/24 nets         127.0.0.0/24 silences .0.1 and .0.2, not 127.0.1.1
 *   4 not_in_table ipv6/64 nets         ::/64 silences ::1
 *   5 not_in_table listener closed      l1 closed, l0 still served
 *   6 max_connections [listener, ipv4/32] 5
 *   7 max_connections [client_ipv6] 2
 *   8 max_connections [tls_domain] 2    the third a.example client is rejected here after rule 6
 *                                       counted it: that count must be given back
 *
 * Counters are exact: 20 storm rounds, each first a mix of clients that fail their handshake
 * for other reasons (wrong secret, closed before the header, fake-TLS admitted at the hello then
 * a bad inner header, fake-TLS with a wrong secret, fake-TLS admitted then closed), then 4 groups
 * of 8 clients opened at once (127.0.0.1, .2, .3 on l0 and 127.0.0.1 on l1; the client socket
 * is bound to its source before connect): exactly 5 of each group echo and 3 are silenced,
 * every round. Every rejection is counted: mtproxy_handshake_failures_total{reason="policy"}
 * and mtproxy_policy_rejects_total{rule=N} move by exactly the number of rejected attempts.
 *
 * Tables persist: entries added over the admin API survive a SIGTERM (exit 0) and a new proxy
 * started with the same config and tables file, are listed by GET /tables/NAME and in effect.
 *
 * Rejected fake-TLS clients get nothing at all and are closed at the handshake timeout (2 s,
 * --domain-fronting off); rejected obfuscated2 clients are known rejected when the metric moved
 * and then must have received nothing. Every wait is bounded.
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "crypto.h"
#include "err.h"
#include "faketls.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

enum {
  R_DOMAIN = 0,
  R_BLOCK4,
  R_BLOCK6,
  R_NET4,
  R_NET6,
  R_LISTENER,
  R_MAX4,
  R_MAX6,
  R_MAXDOM,
  NRULES,
};
#define MAX4 5   /* rule 6's limit */
#define MAX6 2   /* rule 7's */
#define MAXDOM 2 /* rule 8's */
#define EXTRA 3  /* clients over the limit in each storm group */
#define ROUNDS 20
#define WAIT_MS 10000
#define PKT_LEN 128

static const char g_cfg_text[] =
    "{\n"
    " \"tables\": {\"domains\": [\"a.example\"], \"blocked\": [], \"nets\": [], \"closed\": []},\n"
    " \"policy\": [\n"
    "  {\"rule\": \"in_table\", \"key\": \"tls_domain\", \"table\": \"domains\"},\n"
    "  {\"rule\": \"not_in_table\", \"key\": \"client_ipv4\", \"table\": \"blocked\"},\n"
    "  {\"rule\": \"not_in_table\", \"key\": \"client_ipv6\", \"table\": \"blocked\"},\n"
    "  {\"rule\": \"not_in_table\", \"key\": \"ipv4/24\", \"table\": \"nets\"},\n"
    "  {\"rule\": \"not_in_table\", \"key\": \"ipv6/64\", \"table\": \"nets\"},\n"
    "  {\"rule\": \"not_in_table\", \"key\": \"listener\", \"table\": \"closed\"},\n"
    "  {\"rule\": \"max_connections\", \"keys\": [\"listener\", \"ipv4/32\"], \"max\": 5},\n"
    "  {\"rule\": \"max_connections\", \"keys\": [\"client_ipv6\"], \"max\": 2},\n"
    "  {\"rule\": \"max_connections\", \"keys\": [\"tls_domain\"], \"max\": 2}\n"
    " ]\n"
    "}\n";

static char g_dir[256], g_cfg_path[320], g_tables_path[320];
static uint16_t g_port[3]; /* l0, l1, l2 (0: no IPv6) */
static bool g_v6;
static uint8_t g_bad_secret[16];

/* Rejections made by this test since the proxy started, to check the metrics exactly. */
static int g_rejects[NRULES];
static int g_policy_fails;

static void cleanup(void) {
  he_cleanup();
  if (g_dir[0])
    h_rmdir(g_dir);
  g_dir[0] = '\0';
}

static bool have_ipv6_loopback(void) {
  int fd = socket(AF_INET6, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
  bool ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
  close(fd);
  return ok;
}

static const char *rule_series(int rule) {
  static char s[NRULES][64];
  snprintf(s[rule], sizeof(s[rule]), "mtproxy_policy_rejects_total{rule=\"%d\"}", rule);
  return s[rule];
}
#define POLICY_FAILS "mtproxy_handshake_failures_total{reason=\"policy\"}"
#define BAD_SECRET "mtproxy_handshake_failures_total{reason=\"bad_secret\"}"
#define BAD_HMAC "mtproxy_handshake_failures_total{reason=\"tls_bad_hmac\"}"
#define CLIENTS "mtproxy_client_connections"

/* Every reject counter and the policy handshake failures are exactly what the test caused. */
static void check_reject_metrics(const char *where) {
  double v;
  CHECK_MSG(he_wait_metric(POLICY_FAILS, g_policy_fails, WAIT_MS, &v), "%s: %s = %g, want %d", where, POLICY_FAILS, v,
            g_policy_fails);
  for (int r = 0; r < NRULES; r++)
    CHECK_MSG(he_wait_metric(rule_series(r), g_rejects[r], WAIT_MS, &v), "%s: %s = %g, want %d", where,
              rule_series(r), v, g_rejects[r]);
}

/* Waits until the proxy has exactly n client connections open (so every close it will see has
 * been handled: the policy hold is released just before the gauge goes down). */
static void wait_clients(double n, const char *where) {
  double v;
  CHECK_MSG(he_wait_metric(CLIENTS, n, WAIT_MS, &v), "%s: %s = %g, want %g", where, CLIENTS, v, n);
}

/* ---- the admin API ---- */

/* METHOD path on the admin endpoint; returns the HTTP status (-1 on errors), body into out. */
static int admin_req(const char *method, const char *path, char *out, size_t outlen) {
  out[0] = '\0';
  int fd = hx_connect(h_env.admin, 5000);
  if (fd < 0)
    return -1;
  char req[512];
  int n = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", method, path);
  if (hx_write_all(fd, req, (size_t)n) != 0) {
    close(fd);
    return -1;
  }
  char buf[8192];
  size_t got = 0;
  int64_t deadline = hx_now_ms() + 5000;
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
      break;
    ssize_t r = read(fd, buf + got, sizeof(buf) - 1 - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0 || (got += (size_t)r) >= sizeof(buf) - 1)
      break;
  }
  close(fd);
  buf[got] = '\0';
  int st = -1;
  if (sscanf(buf, "HTTP/1.1 %d", &st) != 1)
    return -1;
  const char *body = strstr(buf, "\r\n\r\n");
  snprintf(out, outlen, "%s", body != NULL ? body + 4 : "");
  return st;
}

static void table_edit(const char *method, const char *table, const char *value, int want) {
  char path[256], out[1024];
  snprintf(path, sizeof(path), "/tables/%s/%s", table, value);
  int st = admin_req(method, path, out, sizeof(out));
  CHECK_MSG(st == want, "%s %s: %d (want %d) %s", method, path, st, want, out);
}
#define table_add(t, v) table_edit("POST", (t), (v), 200)
#define table_del(t, v) table_edit("DELETE", (t), (v), 200)

/* GET /tables/NAME must be exactly {"NAME":[want...]} (want: a JSON array text). */
static void table_is(const char *table, const char *want) {
  char path[128], *body = NULL;
  snprintf(path, sizeof(path), "/tables/%s", table);
  CHECK(h_http_get(h_env.admin, path, &body, 5000) == 200);
  cJSON *j = cJSON_Parse(body);
  cJSON *w = cJSON_Parse(want);
  CHECK_MSG(j != NULL && w != NULL, "%s", body);
  CHECK_MSG(cJSON_Compare(cJSON_GetObjectItemCaseSensitive(j, table), w, true), "GET %s: %s, want %s", path, body,
            want);
  cJSON_Delete(j);
  cJSON_Delete(w);
  mtp_free(body);
}

/* ---- clients ---- */

/* An obfuscated2 client (padded framing, DC 2) from src (NULL: any) to dst:port with secret.
 * Returns MTP_OK or an error; c is usable with tc_send / tc_recv / tc_close either way. */
static int client_open(struct tclient *c, const char *src, const char *dst, uint16_t port, const uint8_t *secret) {
  tc_close(c);
  tc_init(c);
  c->bind_addr = src;
  return tc_connect(c, dst, port, secret, MTP_PROTO_PADDED, 2, 5000);
}

/* A client plus the packet it sent, to compare with the echo. */
struct cl {
  struct tclient c;
  uint8_t pkt[PKT_LEN];
  bool echoed, done; /* done: echoed, or found closed */
};

static int cl_ping(struct cl *k) {
  tc_make_packet(k->pkt, sizeof(k->pkt), true);
  k->echoed = k->done = false;
  return tc_send(&k->c, k->pkt, sizeof(k->pkt), false);
}

/* Waits for k's echo (an admitted client). */
static bool cl_echoes(struct cl *k) {
  struct tc_msg m;
  if (cl_ping(k) != MTP_OK || tc_recv(&k->c, WAIT_MS, &m) != MTP_OK)
    return false;
  return m.kind == TC_PACKET && m.len == sizeof(k->pkt) && memcmp(m.data, k->pkt, sizeof(k->pkt)) == 0;
}

/* Nothing has arrived for k (and, as far as the socket tells now, nothing is arriving). */
static bool cl_silent(struct cl *k) {
  struct tc_msg m;
  int rc = tc_recv(&k->c, 0, &m);
  return rc == MTP_ETIMEDOUT || rc == MTP_ECLOSED;
}

/* A new obfuscated2 client from src on dst:port must be admitted: it echoes, and no reject
 * counter moves. */
static void expect_admitted(const char *src, const char *dst, uint16_t port) {
  struct cl k;
  tc_init(&k.c);
  CHECK_MSG(client_open(&k.c, src, dst, port, h_env.secret) == MTP_OK, "connect from %s", src ? src : "any");
  CHECK_MSG(cl_echoes(&k), "client from %s to %s:%u was not served", src ? src : "any", dst, port);
  tc_close(&k.c);
  check_reject_metrics("admitted");
}

/* A new obfuscated2 client from src on dst:port must be rejected by `rule`: that counter moves
 * by one, and the client gets nothing. */
static void expect_rejected(const char *src, const char *dst, uint16_t port, int rule) {
  struct cl k;
  tc_init(&k.c);
  CHECK(client_open(&k.c, src, dst, port, h_env.secret) == MTP_OK);
  CHECK(cl_ping(&k) == MTP_OK);
  g_rejects[rule]++;
  g_policy_fails++;
  double v;
  CHECK_MSG(he_wait_metric(rule_series(rule), g_rejects[rule], WAIT_MS, &v),
            "client from %s to %s:%u: %s = %g, want %d", src ? src : "any", dst, port, rule_series(rule), v,
            g_rejects[rule]);
  check_reject_metrics("rejected");
  CHECK_MSG(cl_silent(&k), "a rejected client got an answer");
  tc_close(&k.c);
}

/* ---- fake-TLS ---- */

static bool tls_client(struct tclient *c, const char *sni, uint16_t port) {
  struct tc_tls tls = {.sni = sni};
  return tc_connect_tls(c, "127.0.0.1", port, h_env.secret, &tls, MTP_PROTO_PADDED, 2, WAIT_MS) == MTP_OK;
}

struct tls_try {
  pthread_t th;
  const char *sni;
  uint16_t port;
  int rc;
  int64_t ms; /* how long until the outcome */
};

static void *tls_try_main(void *arg) {
  struct tls_try *t = arg;
  struct tclient c;
  tc_init(&c);
  struct tc_tls tls = {.sni = t->sni};
  int64_t t0 = hx_now_ms();
  t->rc = tc_connect_tls(&c, "127.0.0.1", t->port, h_env.secret, &tls, MTP_PROTO_PADDED, 2, WAIT_MS);
  t->ms = hx_now_ms() - t0;
  tc_close(&c);
  return NULL;
}

/* n fake-TLS clients with sni at once, each expected to be rejected by rule: the proxy sends
 * nothing at all (not even a ServerHello) and closes them at the handshake timeout. */
static void expect_tls_rejected(int n, const char *sni, int rule) {
  struct tls_try t[8];
  CHECK(n <= 8);
  for (int i = 0; i < n; i++) {
    t[i] = (struct tls_try){.sni = sni, .port = g_port[0], .rc = 1};
    CHECK(pthread_create(&t[i].th, NULL, tls_try_main, &t[i]) == 0);
  }
  for (int i = 0; i < n; i++)
    pthread_join(t[i].th, NULL);
  for (int i = 0; i < n; i++)
    CHECK_MSG(t[i].rc == MTP_ECLOSED, "fake-TLS %s: %s after %lld ms, want closed without an answer", sni,
              mtp_strerror(t[i].rc), (long long)t[i].ms);
  g_rejects[rule] += n;
  g_policy_fails += n;
  check_reject_metrics(sni);
}

/* ---- 1. in_table on tls_domain; max_connections on tls_domain ---- */

static void test_tls_domain(void) {
  struct cl a, a2;
  tc_init(&a.c);
  tc_init(&a2.c);
  CHECK(tls_client(&a.c, "a.example", g_port[0]));
  CHECK(cl_echoes(&a));
  /* The SNI is lower-cased before the lookup. */
  CHECK(tls_client(&a2.c, "A.Example", g_port[0]));
  CHECK(cl_echoes(&a2));
  tc_close(&a2.c);
  wait_clients(1, "A.Example closed");
  check_reject_metrics("a.example");

  /* b.example is a TLS domain of the listener but not in the table: silence, counted. */
  expect_tls_rejected(3, "b.example", R_DOMAIN);
  CHECK(cl_echoes(&a));

  /* Listed at runtime (normalised to lower case): served; unlisted: silence again. */
  table_add("domains", "B.Example");
  table_is("domains", "[\"a.example\",\"b.example\"]");
  struct cl b;
  tc_init(&b.c);
  CHECK(tls_client(&b.c, "b.example", g_port[0]));
  CHECK(cl_echoes(&b));
  table_del("domains", "b.example");
  CHECK(cl_echoes(&b)); /* an edit never closes an open connection */
  tc_close(&b.c);
  wait_clients(1, "b.example closed");
  expect_tls_rejected(1, "b.example", R_DOMAIN);

  /* Rule 8: two a.example at most. The third is counted by rule 6 ([listener, ipv4/32]) and
   * then rejected by rule 8, which must give rule 6's count back: with a and a2 open, l0 still
   * takes exactly MAX4 - 2 obfuscated2 clients from 127.0.0.1. */
  CHECK(tls_client(&a2.c, "a.example", g_port[0]));
  CHECK(cl_echoes(&a2));
  expect_tls_rejected(1, "a.example", R_MAXDOM);
  struct cl o[MAX4];
  for (int i = 0; i < MAX4 - 2; i++) {
    tc_init(&o[i].c);
    CHECK(client_open(&o[i].c, "127.0.0.1", "127.0.0.1", g_port[0], h_env.secret) == MTP_OK);
    CHECK_MSG(cl_echoes(&o[i]), "obfuscated2 client %d of %d from 127.0.0.1 not served", i + 1, MAX4 - 2);
  }
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[0], R_MAX4);
  CHECK(cl_echoes(&a) && cl_echoes(&a2));
  for (int i = 0; i < MAX4 - 2; i++)
    tc_close(&o[i].c);
  tc_close(&a.c);
  tc_close(&a2.c);
  wait_clients(0, "tls_domain");
  /* All released: a.example twice again. */
  CHECK(tls_client(&a.c, "a.example", g_port[0]) && cl_echoes(&a));
  CHECK(tls_client(&a2.c, "a.example", g_port[0]) && cl_echoes(&a2));
  tc_close(&a.c);
  tc_close(&a2.c);
  wait_clients(0, "tls_domain again");
  check_reject_metrics("tls_domain");
}

/* ---- 2. not_in_table on addresses, networks and listeners ---- */

static void test_deny_tables(void) {
  struct cl e1, e2;
  tc_init(&e1.c);
  tc_init(&e2.c);
  CHECK(client_open(&e1.c, "127.0.0.1", "127.0.0.1", g_port[0], h_env.secret) == MTP_OK && cl_echoes(&e1));
  CHECK(client_open(&e2.c, "127.0.0.2", "127.0.0.1", g_port[0], h_env.secret) == MTP_OK && cl_echoes(&e2));

  /* client_ipv4 */
  table_add("blocked", "127.0.0.1");
  table_edit("POST", "blocked", "127.0.0.1", 409);
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[0], R_BLOCK4);
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[1], R_BLOCK4);
  expect_admitted("127.0.0.2", "127.0.0.1", g_port[0]);
  CHECK_MSG(cl_echoes(&e1), "an open client was cut by a table edit");
  table_del("blocked", "127.0.0.1");
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[0]);

  /* ipv4/24: the network holds 127.0.0.1 and .2, not 127.0.1.1. Written normalised. */
  table_add("nets", "127.0.0.77/24");
  table_is("nets", "[\"127.0.0.0/24\"]");
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[0], R_NET4);
  expect_rejected("127.0.0.2", "127.0.0.1", g_port[1], R_NET4);
  expect_admitted("127.0.1.1", "127.0.0.1", g_port[0]);
  CHECK(cl_echoes(&e1) && cl_echoes(&e2));
  table_del("nets", "127.0.0.0%2F24");
  expect_admitted("127.0.0.2", "127.0.0.1", g_port[0]);

  /* listener */
  table_add("closed", "l1");
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[1], R_LISTENER);
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[0]);
  table_del("closed", "l1");
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[1]);
  CHECK(cl_echoes(&e1) && cl_echoes(&e2));
  tc_close(&e1.c);
  tc_close(&e2.c);
  wait_clients(0, "deny tables v4");

  if (!g_v6) {
    printf("IPv6 part skipped: no ::1 on this machine\n");
    return;
  }
  /* client_ipv6 and ipv6/64, on l2; IPv4 keys do not apply there and vice versa. */
  struct cl e6;
  tc_init(&e6.c);
  CHECK(client_open(&e6.c, NULL, "::1", g_port[2], h_env.secret) == MTP_OK && cl_echoes(&e6));
  table_add("blocked", "0:0::1");
  table_is("blocked", "[\"::1\"]");
  expect_rejected(NULL, "::1", g_port[2], R_BLOCK6);
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[0]);
  CHECK(cl_echoes(&e6));
  table_del("blocked", "::1");
  expect_admitted(NULL, "::1", g_port[2]);
  table_add("nets", "::/64");
  expect_rejected(NULL, "::1", g_port[2], R_NET6);
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[0]);
  table_del("nets", "::%2F64");
  expect_admitted(NULL, "::1", g_port[2]);

  /* max_connections [client_ipv6] 2 (rule 6 does not count IPv6 clients: its ipv4/32 does
   * not apply), released on close, a few times over. */
  for (int round = 0; round < 3; round++) {
    struct cl k[MAX6];
    int open = round == 0 ? 1 : 0; /* e6 holds one slot in the first round */
    for (int i = 0; i < MAX6 - open; i++) {
      tc_init(&k[i].c);
      CHECK(client_open(&k[i].c, NULL, "::1", g_port[2], h_env.secret) == MTP_OK);
      CHECK_MSG(cl_echoes(&k[i]), "round %d: IPv6 client %d not served", round, i);
    }
    expect_rejected(NULL, "::1", g_port[2], R_MAX6);
    for (int i = 0; i < MAX6 - open; i++)
      tc_close(&k[i].c);
    if (round == 0)
      tc_close(&e6.c);
    wait_clients(0, "ipv6 max");
  }
}

/* ---- 3. storms ---- */

/* One round's clients that fail the handshake for reasons other than policy, some of them
 * after policy admitted them; all must leave no count behind. Closed before returning. */
static void failing_mix(void) {
  double bad0 = he_metric(BAD_SECRET), hmac0 = he_metric(BAD_HMAC);
  CHECK(bad0 >= 0 && hmac0 >= 0);
  struct cl w[2], tls_ok;
  /* Wrong secret (obfuscated2): never admitted. */
  for (int i = 0; i < 2; i++) {
    tc_init(&w[i].c);
    CHECK(client_open(&w[i].c, "127.0.0.1", "127.0.0.1", g_port[0], g_bad_secret) == MTP_OK);
    CHECK(cl_ping(&w[i]) == MTP_OK);
  }
  /* Connected and closed before the header. */
  int fd = hx_connect(g_port[0], 5000);
  CHECK(fd >= 0);
  close(fd);
  /* Fake-TLS with a wrong secret: no ServerHello (fronting off), never admitted. */
  uint8_t hello[MTP_FAKETLS_CLIENT_HELLO_MAX];
  int hl = mtp_faketls_client_hello(g_bad_secret, "a.example", (uint32_t)time(NULL), MTP_FAKETLS_KIND_CLASSIC, hello,
                                    sizeof(hello));
  CHECK(hl > 0);
  int bad_tls = hx_connect(g_port[0], 5000);
  CHECK(bad_tls >= 0 && hx_write_all(bad_tls, hello, (size_t)hl) == 0);
  /* Fake-TLS admitted at the ClientHello (counted by rules 6 and 8: it gets the ServerHello),
   * then an inner obfuscated2 header that matches no secret. */
  hl = mtp_faketls_client_hello(h_env.secret, "a.example", (uint32_t)time(NULL), MTP_FAKETLS_KIND_CLASSIC, hello,
                                sizeof(hello));
  CHECK(hl > 0);
  int late = hx_connect(g_port[0], 5000);
  CHECK(late >= 0 && hx_write_all(late, hello, (size_t)hl) == 0);
  uint8_t first;
  struct pollfd pf = {.fd = late, .events = POLLIN};
  CHECK_MSG(poll(&pf, 1, WAIT_MS) == 1 && read(late, &first, 1) == 1 && first == 0x16, "no ServerHello");
  static const uint8_t ccs[6] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
  uint8_t rec[5 + 64] = {0x17, 0x03, 0x03, 0x00, 64}; /* 64 bytes of garbage as the header */
  mtp_random(rec + 5, 64);
  CHECK(hx_write_all(late, ccs, sizeof(ccs)) == 0 && hx_write_all(late, rec, sizeof(rec)) == 0);
  /* Fake-TLS admitted and closed right after its header. */
  tc_init(&tls_ok.c);
  CHECK(tls_client(&tls_ok.c, "a.example", g_port[0]));
  tc_close(&tls_ok.c);

  double v;
  CHECK_MSG(he_wait_metric(BAD_SECRET, bad0 + 3, WAIT_MS, &v), "%s = %g, want %g", BAD_SECRET, v, bad0 + 3);
  CHECK_MSG(he_wait_metric(BAD_HMAC, hmac0 + 1, WAIT_MS, &v), "%s = %g, want %g", BAD_HMAC, v, hmac0 + 1);
  for (int i = 0; i < 2; i++) {
    CHECK(cl_silent(&w[i]));
    tc_close(&w[i].c);
  }
  close(bad_tls);
  close(late);
}

/* Groups of a storm: a source address and a listener. */
struct group {
  const char *src;
  int listener;
};
static const struct group k_groups[] = {
    {"127.0.0.1", 0},
    {"127.0.0.2", 0},
    {"127.0.0.3", 0},
    {"127.0.0.1", 1},
};
#define NGROUPS (sizeof(k_groups) / sizeof(k_groups[0]))
#define PER_GROUP (MAX4 + EXTRA)

static void storm_round(int round, struct cl *k) {
  size_t n = NGROUPS * PER_GROUP;
  /* Open them all, then send a packet on each. */
  for (size_t i = 0; i < n; i++) {
    const struct group *g = &k_groups[i / PER_GROUP];
    tc_init(&k[i].c);
    CHECK_MSG(client_open(&k[i].c, g->src, "127.0.0.1", g_port[g->listener], h_env.secret) == MTP_OK,
              "round %d: connect %zu", round, i);
  }
  for (size_t i = 0; i < n; i++)
    CHECK(cl_ping(&k[i]) == MTP_OK);
  g_rejects[R_MAX4] += (int)(NGROUPS * EXTRA);
  g_policy_fails += (int)(NGROUPS * EXTRA);

  /* Collect echoes until every group has MAX4 and the rejects are all counted. */
  size_t echoed[NGROUPS] = {0};
  int64_t deadline = hx_now_ms() + WAIT_MS;
  for (;;) {
    struct pollfd pf[NGROUPS * PER_GROUP];
    size_t idx[NGROUPS * PER_GROUP], np = 0;
    for (size_t i = 0; i < n; i++)
      if (!k[i].done) {
        pf[np] = (struct pollfd){.fd = k[i].c.fd, .events = POLLIN};
        idx[np++] = i;
      }
    if (np > 0 && poll(pf, (nfds_t)np, 20) > 0) {
      for (size_t j = 0; j < np; j++) {
        if ((pf[j].revents & (POLLIN | POLLHUP | POLLERR)) == 0)
          continue;
        struct cl *c = &k[idx[j]];
        struct tc_msg m;
        int rc = tc_recv(&c->c, 2000, &m);
        if (rc == MTP_OK) {
          CHECK(m.kind == TC_PACKET && m.len == sizeof(c->pkt) && memcmp(m.data, c->pkt, sizeof(c->pkt)) == 0);
          c->echoed = c->done = true;
          echoed[idx[j] / PER_GROUP]++;
        } else {
          c->done = true; /* closed (a rejected client past the handshake timeout) */
        }
      }
    }
    bool full = true;
    for (size_t g = 0; g < NGROUPS; g++)
      full = full && echoed[g] >= MAX4;
    if (full && he_metric(rule_series(R_MAX4)) >= g_rejects[R_MAX4])
      break;
    if (hx_now_ms() > deadline) {
      fprintf(stderr, "round %d: echoed", round);
      for (size_t g = 0; g < NGROUPS; g++)
        fprintf(stderr, " %s@l%d=%zu", k_groups[g].src, k_groups[g].listener, echoed[g]);
      fprintf(stderr, "; %s = %g, want %d\n", rule_series(R_MAX4), he_metric(rule_series(R_MAX4)), g_rejects[R_MAX4]);
      CHECK_MSG(false, "round %d: not exactly %d served per group", round, MAX4);
    }
  }
  for (size_t g = 0; g < NGROUPS; g++)
    CHECK_MSG(echoed[g] == MAX4, "round %d: %s on l%d: %zu served, want %d", round, k_groups[g].src,
              k_groups[g].listener, echoed[g], MAX4);
  for (size_t i = 0; i < n; i++)
    if (!k[i].echoed)
      CHECK_MSG(cl_silent(&k[i]), "round %d: a rejected client got an answer", round);
  check_reject_metrics("storm");
  for (size_t i = 0; i < n; i++)
    tc_close(&k[i].c);
  wait_clients(0, "storm round closed");
}

static void test_storms(void) {
  struct cl *k = mtp_malloc(sizeof(*k) * NGROUPS * PER_GROUP);
  CHECK(k != NULL);
  for (int round = 0; round < ROUNDS; round++) {
    failing_mix();
    wait_clients(0, "failing mix closed");
    storm_round(round, k);
  }
  mtp_free(k);
}

/* ---- 4. tables across a restart ---- */

static void start_proxy(void) {
  /* l0 comes from he_start_args; l1 here; l2 on ::1 only when the machine has it. */
  const char *extra[] = {"--config", g_cfg_path, "--tables-file", g_tables_path, "--listen", "127.0.0.1:0",
                         "--tls-domain", "a.example", "--tls-domain", "b.example", "--domain-fronting", "off",
                         "--handshake-timeout", "2", g_v6 ? "--listen" : NULL, "[::1]:0", NULL};
  he_start_args("2", extra);
  g_port[0] = h_env.port;
  CHECK(h_wait_listener(&h_env.proc, "l1", &g_port[1], 30000) == 0);
  if (g_v6)
    CHECK(h_wait_listener(&h_env.proc, "l2", &g_port[2], 30000) == 0);
  memset(g_rejects, 0, sizeof(g_rejects));
  g_policy_fails = 0;
  check_reject_metrics("start");
}

static void test_restart(void) {
  table_add("blocked", "127.0.0.2");
  table_add("closed", "l1");
  table_add("domains", "b.example");
  table_del("domains", "a.example");
  expect_rejected("127.0.0.2", "127.0.0.1", g_port[0], R_BLOCK4);
  CHECK(he_finish() == 0); /* SIGTERM, exit 0 */

  /* The file as the proxy left it: version 1 and every table, edits included. */
  FILE *f = fopen(g_tables_path, "r");
  CHECK_MSG(f != NULL, "no tables file %s", g_tables_path);
  char buf[4096];
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  cJSON *j = cJSON_Parse(buf);
  CHECK_MSG(j != NULL, "tables file is not JSON: %s", buf);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "version")) == 1);
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "tables");
  cJSON *want = cJSON_Parse("{\"blocked\": [\"127.0.0.2\"], \"closed\": [\"l1\"], \"domains\": [\"b.example\"],"
                            " \"nets\": []}");
  CHECK_MSG(cJSON_Compare(t, want, true), "tables file: %s", buf);
  cJSON_Delete(want);
  cJSON_Delete(j);

  start_proxy();
  table_is("blocked", "[\"127.0.0.2\"]");
  table_is("closed", "[\"l1\"]");
  table_is("domains", "[\"b.example\"]");
  table_is("nets", "[]");
  expect_rejected("127.0.0.2", "127.0.0.1", g_port[0], R_BLOCK4);
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[0]);
  expect_rejected("127.0.0.1", "127.0.0.1", g_port[1], R_LISTENER);
  struct cl b;
  tc_init(&b.c);
  CHECK(tls_client(&b.c, "b.example", g_port[0]) && cl_echoes(&b));
  tc_close(&b.c);
  expect_tls_rejected(1, "a.example", R_DOMAIN);
  table_del("blocked", "127.0.0.2");
  table_del("closed", "l1");
  expect_admitted("127.0.0.2", "127.0.0.1", g_port[0]);
  expect_admitted("127.0.0.1", "127.0.0.1", g_port[1]);
  wait_clients(0, "restart");
}

int main(void) {
  g_v6 = have_ipv6_loopback();
  mtp_random(g_bad_secret, sizeof(g_bad_secret));
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  check_on_fail = cleanup;
  snprintf(g_cfg_path, sizeof(g_cfg_path), "%s/policy.json", g_dir);
  snprintf(g_tables_path, sizeof(g_tables_path), "%s/tables.json", g_dir);
  CHECK(h_write_file(g_cfg_path, g_cfg_text, strlen(g_cfg_text)) == 0);
  start_proxy();
  g_bad_secret[0] = h_env.secret[0] ^ 0x80; /* surely not the proxy's */

  test_tls_domain();
  test_deny_tables();
  test_storms();
  test_restart();
  CHECK(he_finish() == 0);
  h_rmdir(g_dir);
  return check_report();
}
