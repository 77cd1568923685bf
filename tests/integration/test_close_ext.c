/*
 * test_close_ext - Telegram closes one client: fm_close_ext(conn_id) sends RPC_CLOSE_EXT on
 * the RPC connection that carries it. The proxy must close exactly that client (its socket
 * reaches EOF), while other clients multiplexed over the same RPC connection keep echoing.
 * The close counts in mtproxy_client_closes_total{reason="telegram"}; the rpc and client
 * gauges drop by one. One worker, so all clients share one RPC connection.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "framing.h"
#include "harness.h"
#include "tclient.h"
#include "banned.h"

static int passed, failed;
static struct h_proc g_proc;
static struct fake_middle *g_fm;
static char g_dir[256];

static void fail_out(void) {
  h_dump_log(&g_proc);
  h_stop(&g_proc, 5000);
  h_remove_log(&g_proc);
  fm_free(g_fm);
  if (g_dir[0])
    h_rmdir(g_dir);
  exit(1);
}

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond) {                                                                \
      passed++;                                                                \
    } else {                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      failed++;                                                                \
      fail_out();                                                              \
    }                                                                          \
  } while (0)

static const char *k_secret_hex = "00112233445566778899aabbccddeeff";
static uint8_t g_secret[16];
static uint16_t g_port, g_admin;

static void start_proxy(const char *workers) {
  const char *bin = h_mtproxy_bin();
  if (!bin) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    exit(1);
  }
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  char sp[256], cp[256];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  char *argv[] = {(char *)bin, "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex, "--proxy-secret", sp,
                  "--proxy-config", cp, "--admin", "127.0.0.1:0", "--workers", (char *)workers, "--log-level",
                  "info", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  CHECK(h_wait_listener(&g_proc, "l0", &g_port, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, &g_admin, 30000) == 0);
  CHECK(mtp_hex_decode(k_secret_hex, g_secret, 16) == 16);
}

/* One scrape; the value of series, or -1 when absent or on an error. */
static double metric(const char *series) {
  char *body = NULL;
  double v = -1;
  int st = h_http_get(g_admin, "/metrics", &body, 5000);
  if (st != 200 || body == NULL || h_metric(body, series, &v) != 0)
    v = -1;
  mtp_free(body);
  return v;
}

static void finish(void) {
  CHECK(h_stop(&g_proc, 10000) == 0);
  CHECK(fm_wait_open(g_fm, 0, 5000));
  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_dir);
  h_remove_log(&g_proc);
  printf("%d passed, %d failed\n", passed, failed);
}

/*
 * Waits (bounded) until series == want. Gauges change on the proxy's worker threads a moment
 * after the client-visible event, so this re-scrapes every 10 ms until timeout_ms.
 */
static bool wait_metric(const char *series, double want, int timeout_ms, double *last) {
  struct timespec ts = {0, 10 * 1000 * 1000};
  for (int waited = 0;; waited += 10) {
    *last = metric(series);
    if (*last == want)
      return true;
    if (waited >= timeout_ms)
      return false;
    nanosleep(&ts, NULL);
  }
}

static uint16_t local_port(int fd) {
  struct sockaddr_in a;
  socklen_t l = sizeof(a);
  if (getsockname(fd, (struct sockaddr *)&a, &l) != 0)
    return 0;
  return ntohs(a.sin_port);
}

/* The fake's record of the client whose local port is port. */
static bool find_by_client_port(uint16_t port, struct fm_conn_info *out) {
  size_t n = fm_conn_count(g_fm);
  for (size_t i = n; i-- > 0;) {
    if (fm_conn_at(g_fm, i, out) == MTP_OK && out->client_port == port)
      return true;
  }
  return false;
}

/* Connects, echoes one packet and returns the fake's record of the client. */
static void client_up(struct tclient *c, enum mtp_proto proto, struct fm_conn_info *ci) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", g_port, g_secret, proto, 2, 5000) == MTP_OK);
  uint8_t pkt[256];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  CHECK(find_by_client_port(local_port(c->fd), ci));
}

static void echo_ok(struct tclient *c, size_t len) {
  uint8_t pkt[4096];
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "echo: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

int main(void) {
  g_proc.pid = -1;
  start_proxy("1");
  double v = 0;
  CHECK(metric("mtproxy_client_closes_total{reason=\"telegram\"}") == 0);

  /* Three clients on one RPC connection. */
  struct tclient a, b, c3;
  struct fm_conn_info ia, ib, ic;
  client_up(&a, MTP_PROTO_INTERMEDIATE, &ia);
  client_up(&b, MTP_PROTO_ABRIDGED, &ib);
  client_up(&c3, MTP_PROTO_PADDED, &ic);
  CHECK(ia.conn_id != ib.conn_id && ib.conn_id != ic.conn_id && ia.conn_id != ic.conn_id);
  CHECK(ia.rpc_conn == ib.rpc_conn && ib.rpc_conn == ic.rpc_conn);
  CHECK(metric("mtproxy_rpc_clients") == 3);

  /* Telegram closes a. */
  CHECK(fm_close_ext(g_fm, ia.conn_id) == MTP_OK);
  int rc = tc_wait_closed(&a, 5000);
  if (rc != MTP_ECLOSED)
    fprintf(stderr, "client a after RPC_CLOSE_EXT: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_ECLOSED);
  tc_close(&a);

  /* The others are untouched, on the same RPC connection. */
  for (int i = 0; i < 3; i++) {
    echo_ok(&b, 64 + 4 * (size_t)i);
    echo_ok(&c3, 1024 + 4 * (size_t)i);
  }
  struct fm_conn_info ib2, ic2;
  CHECK(fm_conn_find(g_fm, ib.conn_id, &ib2) == MTP_OK && fm_conn_find(g_fm, ic.conn_id, &ic2) == MTP_OK);
  CHECK(ib2.rpc_conn == ib.rpc_conn && ic2.rpc_conn == ic.rpc_conn);
  CHECK(ib2.packets == 4 && ic2.packets == 4);
  CHECK(!ib2.close_conn && !ic2.close_conn);

  CHECK(wait_metric("mtproxy_client_closes_total{reason=\"telegram\"}", 1, 5000, &v));
  CHECK(wait_metric("mtproxy_rpc_clients", 2, 5000, &v));
  CHECK(wait_metric("mtproxy_client_connections", 2, 5000, &v));

  /* Telegram closes b too, mid-conversation of c3. */
  CHECK(fm_close_ext(g_fm, ib.conn_id) == MTP_OK);
  CHECK(tc_wait_closed(&b, 5000) == MTP_ECLOSED);
  tc_close(&b);
  echo_ok(&c3, 4000);
  CHECK(wait_metric("mtproxy_client_closes_total{reason=\"telegram\"}", 2, 5000, &v));
  CHECK(wait_metric("mtproxy_rpc_clients", 1, 5000, &v));

  /* No other close kind moved; the RPC connection itself was never replaced. */
  CHECK(metric("mtproxy_client_closes_total{reason=\"upstream\"}") == 0);
  CHECK(metric("mtproxy_client_closes_total{reason=\"bad_frame\"}") == 0);
  struct fm_stats st;
  fm_get_stats(g_fm, &st);
  CHECK(st.accepted == 1 && st.open == 1 && st.bad == 0);
  CHECK(st.close_exts == 2);

  /* The last client leaves by itself: the proxy tells Telegram. */
  uint64_t cc = st.close_conns;
  tc_close(&c3);
  CHECK(fm_wait_close_conns(g_fm, cc + 1, 5000));
  CHECK(fm_conn_find(g_fm, ic.conn_id, &ic2) == MTP_OK && ic2.close_conn);
  CHECK(wait_metric("mtproxy_client_connections", 0, 5000, &v));
  CHECK(metric("mtproxy_client_closes_total{reason=\"telegram\"}") == 2);
  finish();
  return 0;
}
