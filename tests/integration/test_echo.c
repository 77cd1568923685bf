/*
 * test_echo - mtproxy between the test client and the fake middle proxy: for every client
 * framing (abridged, intermediate, secure) and DC (+-1..5 and an unknown DC, which must go to
 * the config's default), packets are echoed unchanged, a quick ack arrives with the fake's
 * token, and the fake sees RPC_PROXY_REQ with the right flags, ad_tag and addresses.
 * Ends with a metrics scrape and a clean SIGTERM exit.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
#include "rpc.h"
#include "tclient.h"
#include "check.h"
#include "banned.h"

static struct h_proc g_proc;
static struct fake_middle *g_fm;
static char g_dir[256];

/* Run by a failed CHECK before it exits: the log, then everything this test started. */
static void fail_cleanup(void) {
  h_dump_log(&g_proc);
  h_stop(&g_proc, 5000);
  fm_free(g_fm);
  h_rmdir(g_dir);
}


static const char *k_secret_hex = "00112233445566778899aabbccddeeff";
static const char *k_tag_hex = "0badc0de0badc0de0badc0de0badc0de";

static void one_client(uint16_t proxy_port, enum mtp_proto proto, int16_t dc, const uint8_t secret[16],
                       const uint8_t tag[16]) {
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", proxy_port, secret, proto, dc, 5000) == MTP_OK);

  /* 1: unencrypted auth-style packet with a quick-ack request. */
  char why[160];
  int rc = hx_first_echo(&c, 5000, why, sizeof(why));
  if (rc != MTP_OK)
    fprintf(stderr, "proto %s dc %d: %s\n", mtp_proto_name(proto), dc, why);
  CHECK(rc == MTP_OK);
  struct fm_conn_info ci;
  CHECK(fm_find_client(g_fm, hx_local_port(c.fd), &ci));
  const char *bad = hx_check_first_rpc(&ci, proto, tag, proxy_port);
  if (bad != NULL)
    fprintf(stderr, "proto %s dc %d: the fake's record: %s\n", mtp_proto_name(proto), dc, bad);
  CHECK(bad == NULL);

  /* 2: encrypted-looking packet, no quick ack; same conn_id. */
  int64_t el;
  CHECK(hx_echo(&c, 1024, 5000, &el) == MTP_OK);
  struct fm_conn_info ci2;
  CHECK(fm_conn_find(g_fm, ci.conn_id, &ci2) == MTP_OK);
  CHECK(ci2.packets == 2);
  CHECK(!(ci2.flags & MTP_RPC_FLAG_QUICKACK));
  CHECK(!(ci2.flags & MTP_RPC_FLAG_NOT_ENCRYPTED));
  tc_close(&c);
}

struct pong_want {
  uint64_t n;
  int64_t id;
};

static bool enough_pongs(const struct fm_stats *s, void *arg) {
  const struct pong_want *w = arg;
  return s->pongs >= w->n && s->last_pong_id == w->id;
}

int main(void) {
  g_proc.pid = -1;
  check_on_fail = fail_cleanup;
  const char *bin = h_mtproxy_bin();
  if (!bin) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    return 1;
  }
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  char sp[256], cp[256];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);

  char *argv[] = {(char *)bin, "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex, "--tag",
                  (char *)k_tag_hex, "--proxy-secret", sp, "--proxy-config", cp, "--admin", "127.0.0.1:0",
                  "--workers", "1", "--log-level", "info", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  uint16_t port = 0, admin = 0;
  CHECK(h_wait_listener(&g_proc, "l0", &port, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, &admin, 30000) == 0);

  uint8_t secret[16], tag[16];
  CHECK(mtp_hex_decode(k_secret_hex, secret, 16) == 16);
  CHECK(mtp_hex_decode(k_tag_hex, tag, 16) == 16);

  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  static const int16_t dcs[] = {1, 2, 3, 4, 5, -1, -2, -3, -4, -5, 99};
  for (size_t p = 0; p < 3; p++)
    for (size_t d = 0; d < sizeof(dcs) / sizeof(dcs[0]); d++)
      one_client(port, protos[p], dcs[d], secret, tag);

  struct fm_stats st;
  fm_get_stats(g_fm, &st);
  CHECK(st.handshakes >= 1);
  CHECK(st.bad == 0);
  CHECK(st.conn_ids >= 33);
  CHECK(st.proxy_reqs >= 66);

  /* Telegram pings its proxies: every RPC connection answers RPC_PING with RPC_PONG(same id). */
  const int64_t ping_id = 0x1122334455667788LL;
  int pinged = fm_ping(g_fm, ping_id);
  CHECK(pinged >= 1);
  CHECK(fm_wait(g_fm, enough_pongs, &(struct pong_want){st.pongs + (uint64_t)pinged, ping_id}, 5000));

  char *body = NULL;
  int status = h_http_get(admin, "/metrics", &body, 5000);
  CHECK(status == 200 && body != NULL);
  double v = 0;
  CHECK(h_metric(body, "mtproxy_handshakes_total{protocol=\"abridged\"}", &v) == 0 && v >= 11);
  CHECK(h_metric(body, "mtproxy_handshakes_total{protocol=\"secure\"}", &v) == 0 && v >= 11);
  mtp_free(body);

  int rc = h_stop(&g_proc, 10000);
  CHECK(rc == 0);
  /* The proxy's RPC connections are gone once it exited. */
  CHECK(fm_wait_open(g_fm, 0, 5000));
  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_dir);
  h_remove_log(&g_proc);
  return check_report();
}
