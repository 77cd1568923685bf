/*
 * test_bad_handshake - clients that fail the handshake get no reply at all and are closed only
 * when the handshake timeout ends (or at once when they close first); each failure is counted
 * in /metrics under mtproxy_handshake_failures_total with the right reason and exact counts;
 * good clients on the same listeners still echo afterwards.
 *
 * Two listeners from a JSON config: "a" without allowed_protocols (so --allowed-protocols
 * abridged applies) and "s" with allowed_protocols ["secure"]. --handshake-timeout 0.5.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
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
static uint8_t g_secret[16];
/* --handshake-timeout in ms; a failed client must stay open at least about this long. */
#define HS_TIMEOUT_MS 500
#define MIN_CLOSE_MS (HS_TIMEOUT_MS - 60)
#define MAX_CLOSE_MS 3000

/* The proxy must close fd without sending one byte, no earlier than the handshake timeout
 * (measured from t0, taken before connecting). */
static void expect_silent_timeout_close(const char *what, int fd, int64_t t0) {
  size_t bytes = 99;
  int rc = hx_wait_eof(fd, 5000, &bytes);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "%s: closed=%d after %lld ms, %zu bytes\n", what, rc == 0, (long long)el, bytes);
  CHECK(rc == 0);
  CHECK(bytes == 0);
  CHECK(el >= MIN_CLOSE_MS);
  CHECK(el <= MAX_CLOSE_MS);
}

/* A tclient handshake that the proxy must refuse. */
static void bad_tclient(const char *what, uint16_t port, const uint8_t *secret, enum mtp_proto proto) {
  struct tclient c;
  tc_init(&c);
  int64_t t0 = hx_now_ms();
  CHECK(tc_connect(&c, "127.0.0.1", port, secret, proto, 2, 5000) == MTP_OK);
  /* A packet after the header must not change anything either. */
  uint8_t pkt[72];
  tc_make_packet(pkt, sizeof(pkt), false);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  expect_silent_timeout_close(what, c.fd, t0);
  tc_close(&c);
}

/* Raw bytes, then silence. */
static void bad_raw(const char *what, uint16_t port, const void *data, size_t len) {
  int64_t t0 = hx_now_ms();
  int fd = hx_connect(port, 5000);
  CHECK(fd >= 0);
  if (len)
    CHECK(hx_write_all(fd, data, len) == 0);
  expect_silent_timeout_close(what, fd, t0);
  close(fd);
}

static void good_echo(uint16_t port, enum mtp_proto proto) {
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", port, g_secret, proto, 2, 5000) == MTP_OK);
  uint8_t pkt[256];
  for (int i = 0; i < 3; i++) {
    tc_make_packet(pkt, sizeof(pkt), i > 0);
    CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
    struct tc_msg m;
    CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
    CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  }
  tc_close(&c);
}

static double metric(uint16_t admin, const char *series) {
  double v = -1;
  if (hx_scrape(admin, series, &v) != 0) {
    fprintf(stderr, "metric %s missing\n", series);
    return -1;
  }
  return v;
}

int main(void) {
  g_proc.pid = -1;
  check_on_fail = fail_cleanup;
  const char *bin = h_mtproxy_bin();
  if (!bin) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    return 1;
  }
  CHECK(mtp_hex_decode(k_secret_hex, g_secret, 16) == 16);
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  char sp[256], cp[256], conf[300];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  snprintf(conf, sizeof(conf), "%s/mtproxy.json", g_dir);
  char json[1024];
  int jl = snprintf(json, sizeof(json),
                    "{\n"
                    "  \"listeners\": [\n"
                    "    {\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]},\n"
                    "    {\"name\": \"s\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"dd%s\"],\n"
                    "     \"allowed_protocols\": [\"secure\"]}\n"
                    "  ]\n"
                    "}\n",
                    k_secret_hex, k_secret_hex);
  CHECK(h_write_file(conf, json, (size_t)jl) == 0);

  char *argv[] = {(char *)bin, "--config", conf, "--allowed-protocols", "abridged", "--handshake-timeout", "0.5",
                  "--proxy-secret", sp, "--proxy-config", cp, "--admin", "127.0.0.1:0", "--workers", "1",
                  "--log-level", "info", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  uint16_t pa = 0, ps = 0, admin = 0;
  CHECK(h_wait_listener(&g_proc, "a", &pa, 30000) == 0);
  CHECK(h_wait_listener(&g_proc, "s", &ps, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, &admin, 30000) == 0);

  /* Everything starts at zero. */
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"bad_secret\"}") == 0);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"protocol_disabled\"}") == 0);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"timeout\"}") == 0);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"closed_early\"}") == 0);

  uint8_t wrong[16];
  memcpy(wrong, g_secret, 16);
  wrong[15] ^= 1;

  /* (a) wrong secret: bad_secret x2 (one per listener). */
  bad_tclient("wrong secret on a", pa, wrong, MTP_PROTO_ABRIDGED);
  bad_tclient("wrong secret on s", ps, wrong, MTP_PROTO_PADDED);

  /* (b) 100 bytes of random garbage: bad_secret. */
  uint8_t junk[100];
  mtp_random(junk, sizeof(junk));
  bad_raw("garbage", pa, junk, sizeof(junk));

  /* (c) an HTTP GET longer than the 64-byte header: bad_secret; a short one: timeout. */
  static const char get_long[] = "GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1\r\n"
                                 "Accept: */*\r\n\r\n";
  CHECK(sizeof(get_long) - 1 >= 64);
  bad_raw("http get (long)", pa, get_long, sizeof(get_long) - 1);
  static const char get_short[] = "GET / HTTP/1.0\r\n\r\n";
  bad_raw("http get (short)", pa, get_short, sizeof(get_short) - 1);

  /* (d) protocols the listener does not allow, with the right secret: protocol_disabled x4. */
  bad_tclient("intermediate on abridged-only a", pa, g_secret, MTP_PROTO_INTERMEDIATE);
  bad_tclient("secure on abridged-only a", pa, g_secret, MTP_PROTO_PADDED);
  bad_tclient("abridged on secure-only s", ps, g_secret, MTP_PROTO_ABRIDGED);
  bad_tclient("intermediate on secure-only s", ps, g_secret, MTP_PROTO_INTERMEDIATE);

  /* (e) 30 bytes then silence, and nothing at all: timeout x2 (x3 with the short GET). */
  uint8_t head[30];
  mtp_random(head, sizeof(head));
  bad_raw("30 bytes then silence", pa, head, sizeof(head));
  bad_raw("silent client", ps, NULL, 0);

  /* 30 bytes then the client closes its side: closed_early, closed at once, no reply. */
  {
    int64_t t0 = hx_now_ms();
    int fd = hx_connect(pa, 5000);
    CHECK(fd >= 0);
    CHECK(hx_write_all(fd, head, sizeof(head)) == 0);
    CHECK(shutdown(fd, SHUT_WR) == 0);
    size_t bytes = 99;
    CHECK(hx_wait_eof(fd, 5000, &bytes) == 0);
    int64_t el = hx_now_ms() - t0;
    fprintf(stderr, "closed early: %lld ms, %zu bytes\n", (long long)el, bytes);
    CHECK(bytes == 0);
    CHECK(el < MIN_CLOSE_MS); /* not held until the timeout */
    close(fd);
  }

  /* Exact counts. Every counter was bumped before its close, which we saw. */
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"bad_secret\"}") == 4);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"protocol_disabled\"}") == 4);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"timeout\"}") == 3);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"closed_early\"}") == 1);
  CHECK(metric(admin, "mtproxy_handshakes_total{protocol=\"abridged\"}") == 0);
  CHECK(metric(admin, "mtproxy_handshakes_total{protocol=\"intermediate\"}") == 0);
  CHECK(metric(admin, "mtproxy_handshakes_total{protocol=\"secure\"}") == 0);
  struct fm_stats st;
  fm_get_stats(g_fm, &st);
  CHECK(st.proxy_reqs == 0); /* nothing of the failed clients reached Telegram */

  /* Good clients on the same listeners still work. */
  good_echo(pa, MTP_PROTO_ABRIDGED);
  good_echo(ps, MTP_PROTO_PADDED);
  CHECK(metric(admin, "mtproxy_handshakes_total{protocol=\"abridged\"}") == 1);
  CHECK(metric(admin, "mtproxy_handshakes_total{protocol=\"secure\"}") == 1);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"bad_secret\"}") == 4);
  CHECK(metric(admin, "mtproxy_handshake_failures_total{reason=\"protocol_disabled\"}") == 4);

  int rc = h_stop(&g_proc, 10000);
  CHECK(rc == 0);
  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_dir);
  h_remove_log(&g_proc);
  return check_report();
}
