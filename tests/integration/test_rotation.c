/*
 * test_rotation - Telegram's periodic rotation: the middle proxy closes its RPC connections
 * (fm_close_all). Semantics the proxy implements (back/worker.c):
 *
 * - A client that is idle at that moment (every packet it sent was answered or acked) is
 *   moved to another RPC connection of its DC, keeping its conn_id; it does not notice, and
 *   its next packet goes out on the new connection (the fake sees a higher rpc_conn serial).
 *   Each move counts in mtproxy_rpc_client_migrations_total.
 * - A client with a packet in flight (sent, no answer yet) is closed (reason "upstream"):
 *   the answer died with the old connection and cannot come over a new one, so the app must
 *   reconnect and resend (its MTProto session lives in the app, not in the proxy).
 *
 * The in-flight client is made with FM_SILENT (the fake records the packet but does not
 * answer), then fm_close_all, then FM_ANSWER again. The test waits for the proxy's log line
 * reporting the move before sending again, because a packet sent between the close and the
 * proxy noticing it would itself be in flight on the dying connection. A second rotation with
 * no packet in flight moves everybody. One worker, so all clients share one RPC connection.
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

#define NIDLE 5

static void echo_ok(struct tclient *c, size_t len) {
  uint8_t pkt[4096];
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "%s echo: %s\n", mtp_proto_name(c->proto), mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

static void client_up(struct tclient *c, enum mtp_proto proto, struct fm_conn_info *ci) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", g_port, g_secret, proto, 2, 5000) == MTP_OK);
  echo_ok(c, 128);
  CHECK(find_by_client_port(local_port(c->fd), ci));
}

int main(void) {
  g_proc.pid = -1;
  start_proxy("1");
  double v = 0;
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};

  struct tclient idle[NIDLE], busy;
  struct fm_conn_info ci[NIDLE], cb, now;
  for (int i = 0; i < NIDLE; i++)
    client_up(&idle[i], protos[i % 3], &ci[i]);
  client_up(&busy, MTP_PROTO_INTERMEDIATE, &cb);
  unsigned serial1 = cb.rpc_conn;
  for (int i = 0; i < NIDLE; i++)
    CHECK(ci[i].rpc_conn == serial1);
  CHECK(metric("mtproxy_rpc_client_migrations_total") == 0);

  /* busy: one packet that the fake takes but does not answer */
  struct fm_stats st;
  fm_get_stats(g_fm, &st);
  fm_set_mode(g_fm, FM_SILENT);
  uint8_t pkt[512];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&busy, pkt, sizeof(pkt), false) == MTP_OK);
  CHECK(fm_wait_proxy_reqs(g_fm, st.proxy_reqs + 1, 5000));
  CHECK(fm_conn_find(g_fm, cb.conn_id, &now) == MTP_OK && now.packets == 2);

  /* rotation */
  CHECK(fm_close_all(g_fm) == 1);
  fm_set_mode(g_fm, FM_ANSWER);
  int rc = tc_wait_closed(&busy, 5000);
  if (rc != MTP_ECLOSED)
    fprintf(stderr, "client with a packet in flight after the rotation: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_ECLOSED);
  tc_close(&busy);
  CHECK(h_wait_log(&g_proc, "5 idle clients moved to another middle proxy connection, 1 closed", NULL, 0, 5000) ==
        0);
  CHECK(wait_metric("mtproxy_rpc_client_migrations_total", NIDLE, 5000, &v));
  CHECK(wait_metric("mtproxy_client_closes_total{reason=\"upstream\"}", 1, 5000, &v));
  CHECK(wait_metric("mtproxy_rpc_clients", NIDLE, 5000, &v));

  /* every idle client keeps working, same conn_id, on a new RPC connection */
  unsigned serial2 = 0;
  for (int i = 0; i < NIDLE; i++) {
    echo_ok(&idle[i], 256 + 4 * (size_t)i);
    CHECK(fm_conn_find(g_fm, ci[i].conn_id, &now) == MTP_OK);
    if (now.rpc_conn <= serial1)
      fprintf(stderr, "client %d still on rpc conn %u after the rotation\n", i, now.rpc_conn);
    CHECK(now.rpc_conn > serial1);
    CHECK(now.packets == 2);
    CHECK(!now.close_conn);
    if (serial2 == 0)
      serial2 = now.rpc_conn;
    CHECK(now.rpc_conn == serial2);
  }
  fm_get_stats(g_fm, &st);
  CHECK(st.accepted == 2 && st.handshakes == 2 && st.open == 1 && st.bad == 0);
  CHECK(st.conn_ids == NIDLE + 1);

  /* a second rotation with nothing in flight: everybody moves */
  CHECK(fm_close_all(g_fm) == 1);
  CHECK(h_wait_log(&g_proc, "5 idle clients moved to another middle proxy connection, 0 closed", NULL, 0, 5000) ==
        0);
  CHECK(wait_metric("mtproxy_rpc_client_migrations_total", 2 * NIDLE, 5000, &v));
  for (int i = 0; i < NIDLE; i++) {
    echo_ok(&idle[i], 1024);
    CHECK(fm_conn_find(g_fm, ci[i].conn_id, &now) == MTP_OK);
    CHECK(now.rpc_conn > serial2);
    CHECK(now.packets == 3);
  }
  CHECK(metric("mtproxy_client_closes_total{reason=\"upstream\"}") == 1);
  CHECK(metric("mtproxy_client_connections") == NIDLE);

  /* Regression: a quick ack is not an answer. The back used to count a quick-acked packet as
   * answered, so a rotation migrated that client and its answer was lost. Now a client whose
   * packet was quick-acked but not answered is still in flight: closed, not migrated. */
  struct tclient acked;
  struct fm_conn_info ca;
  client_up(&acked, MTP_PROTO_ABRIDGED, &ca);
  fm_set_mode(g_fm, FM_ACK_ONLY);
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&acked, pkt, sizeof(pkt), true) == MTP_OK);
  struct tc_msg ack;
  CHECK(tc_recv(&acked, 5000, &ack) == MTP_OK);
  CHECK(ack.kind == TC_QUICKACK);
  CHECK(fm_close_all(g_fm) == 1);
  fm_set_mode(g_fm, FM_ANSWER);
  CHECK(tc_wait_closed(&acked, 5000) == MTP_ECLOSED);
  tc_close(&acked);
  CHECK(wait_metric("mtproxy_client_closes_total{reason=\"upstream\"}", 2, 5000, &v));
  CHECK(wait_metric("mtproxy_rpc_client_migrations_total", 3 * NIDLE, 5000, &v));
  for (int i = 0; i < NIDLE; i++)
    echo_ok(&idle[i], 64);

  for (int i = 0; i < NIDLE; i++)
    tc_close(&idle[i]);
  CHECK(fm_wait_close_conns(g_fm, NIDLE, 5000));
  CHECK(wait_metric("mtproxy_rpc_clients", 0, 5000, &v));
  finish();
  return 0;
}
