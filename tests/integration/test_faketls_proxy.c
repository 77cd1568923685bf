/*
 * test_faketls_proxy - fake-TLS ("ee") through the real mtproxy and the fake middle proxy, on a
 * TLS-only listener (--allowed-protocols fake_tls, --tls-domain example.com and
 * cdn.example.org, --domain-fronting off, --handshake-timeout 0.5):
 *
 * - for every framing inside (abridged, intermediate, secure) and both ClientHello kinds
 *   (classic 517 bytes, post-quantum ~1.8 KB) the ServerHello's HMAC checks out and packets
 *   echo unchanged, small and large (many records each way);
 * - the stream may be cut anyhow: the hello in two pieces, 1-byte records, the largest
 *   records a peer may send;
 * - probes get not one byte back and are closed only at the handshake timeout (fronting is
 *   off), each counted under its reason: a replayed hello (tls_replay), a timestamp 700 s old
 *   and 700 s ahead (tls_bad_time; the window is 600 s), a domain the listener does not have
 *   (tls_bad_sni), a wrong secret (tls_bad_hmac), random bytes and a plain obfuscated2 client
 *   (not_tls); nothing of them reaches Telegram;
 * - mtproxy_fake_tls_handshakes_total and mtproxy_handshakes_total{protocol} count the good
 *   clients, and the proxy exits cleanly on SIGTERM.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "faketls.h"
#include "check.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

#define HS_TIMEOUT_MS 500
#define MIN_CLOSE_MS (HS_TIMEOUT_MS - 60)
#define MAX_CLOSE_MS 3000

static const char *const k_flags[] = {"--allowed-protocols", "fake_tls", "--tls-domain", "example.com",
                                      "--tls-domain", "cdn.example.org", "--domain-fronting", "off",
                                      "--handshake-timeout", "0.5", NULL};

static void expect_echo(struct tclient *c, size_t len, bool quickack) {
  uint8_t *pkt = mtp_malloc(len);
  CHECK(pkt != NULL);
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, quickack) == MTP_OK);
  struct tc_msg m;
  int rc;
  do {
    rc = tc_recv(c, 10000, &m);
    if (rc != MTP_OK)
      fprintf(stderr, "%s over fake-TLS, %zu bytes: %s\n", mtp_proto_name(c->proto), len, mtp_strerror(rc));
    CHECK(rc == MTP_OK);
  } while (m.kind == TC_QUICKACK && quickack);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
  mtp_free(pkt);
}

static void connect_tls(struct tclient *c, const uint8_t *secret, const struct tc_tls *tls, enum mtp_proto proto) {
  tc_init(c);
  int rc = tc_connect_tls(c, "127.0.0.1", h_env.port, secret, tls, proto, 2, 5000);
  if (rc != MTP_OK)
    fprintf(stderr, "fake-TLS connect (%s, sni %s): %s\n", mtp_proto_name(proto), tls->sni, mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(c->flight_len >= 1 && c->flight_len <= MTP_FAKETLS_MAX_PAYLOAD);
}

/* Raw bytes the proxy must not answer: no byte back, closed no earlier than the handshake
 * timeout (measured from t0, taken before connecting). */
static void probe(const char *what, const void *data, size_t len) {
  int64_t t0 = hx_now_ms();
  int fd = hx_connect(h_env.port, 5000);
  CHECK(fd >= 0);
  if (len > 0)
    CHECK(hx_write_all(fd, data, len) == 0);
  size_t bytes = 99;
  int rc = hx_wait_eof(fd, 5000, &bytes);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "%s: closed=%d after %lld ms, %zu bytes back\n", what, rc == 0, (long long)el, bytes);
  CHECK(rc == 0);
  CHECK(bytes == 0);
  CHECK(el >= MIN_CLOSE_MS && el <= MAX_CLOSE_MS);
  close(fd);
}

/* A ClientHello for secret/sni with the clock off by ts_off seconds. */
static size_t hello(uint8_t *out, const uint8_t *secret, const char *sni, long ts_off,
                    enum mtp_faketls_hello_kind kind) {
  int n = mtp_faketls_client_hello(secret, sni, (uint32_t)((long)time(NULL) + ts_off), kind, out,
                                   MTP_FAKETLS_CLIENT_HELLO_MAX);
  CHECK(n > 0);
  return (size_t)n;
}

static double fail_count(const char *reason) {
  char series[128];
  snprintf(series, sizeof(series), "mtproxy_handshake_failures_total{reason=\"%s\"}", reason);
  return he_metric(series);
}

int main(void) {
  he_start_args("1", k_flags);
  check_on_fail = he_cleanup;

  /* 1. Every framing inside, both hello kinds, small and large packets, quick acks. */
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  for (size_t i = 0; i < 3; i++) {
    for (int kind = 0; kind < 2; kind++) {
      struct tc_tls tls = {.sni = kind ? "cdn.example.org" : "example.com",
                           .kind = kind ? MTP_FAKETLS_KIND_PQ : MTP_FAKETLS_KIND_CLASSIC};
      struct tclient c;
      connect_tls(&c, h_env.secret, &tls, protos[i]);
      expect_echo(&c, 64, false);
      expect_echo(&c, 1000, true);
      expect_echo(&c, 100000, false); /* several 16 KiB records each way */
      tc_close(&c);
    }
  }
  CHECK(he_metric("mtproxy_fake_tls_handshakes_total") == 6);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"abridged\"}") == 2);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"intermediate\"}") == 2);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"secure\"}") == 2);

  /* 2. Odd cuts: the hello in two pieces with 1-byte records; the largest records. */
  {
    struct tc_tls tls = {.sni = "example.com", .kind = MTP_FAKETLS_KIND_PQ, .split_hello = true, .record_max = 1};
    struct tclient c;
    connect_tls(&c, h_env.secret, &tls, MTP_PROTO_PADDED);
    expect_echo(&c, 200, false);
    tc_close(&c);
    struct tc_tls big = {.sni = "example.com", .record_max = MTP_FAKETLS_MAX_RECORD_PAYLOAD, .no_ccs = true};
    connect_tls(&c, h_env.secret, &big, MTP_PROTO_INTERMEDIATE);
    expect_echo(&c, 70000, false);
    tc_close(&c);
  }
  CHECK(he_metric("mtproxy_fake_tls_handshakes_total") == 8);

  /* 3. Probes: silence, counted by reason. */
  struct fm_stats st0;
  fm_get_stats(h_env.fm, &st0);
  double replay0 = fail_count("tls_replay"), time0 = fail_count("tls_bad_time"), sni0 = fail_count("tls_bad_sni"),
         hmac0 = fail_count("tls_bad_hmac"), nottls0 = fail_count("not_tls");
  {
    /* A recorded handshake played back while (and after) the real client uses it. */
    struct tc_tls tls = {.sni = "example.com"};
    struct tclient c;
    connect_tls(&c, h_env.secret, &tls, MTP_PROTO_PADDED);
    expect_echo(&c, 64, false);
    probe("replayed hello", c.hello, c.hello_len);
    expect_echo(&c, 64, false);
    tc_close(&c);
    CHECK(fail_count("tls_replay") == replay0 + 1);
  }
  uint8_t h[MTP_FAKETLS_CLIENT_HELLO_MAX];
  size_t n = hello(h, h_env.secret, "example.com", -700, MTP_FAKETLS_KIND_CLASSIC);
  probe("hello 700 s old", h, n);
  n = hello(h, h_env.secret, "example.com", 700, MTP_FAKETLS_KIND_PQ);
  probe("hello 700 s ahead", h, n);
  CHECK(fail_count("tls_bad_time") == time0 + 2);
  n = hello(h, h_env.secret, "www.example.net", 0, MTP_FAKETLS_KIND_CLASSIC);
  probe("wrong sni", h, n);
  CHECK(fail_count("tls_bad_sni") == sni0 + 1);
  uint8_t wrong[16];
  memcpy(wrong, h_env.secret, 16);
  wrong[0] ^= 0x80;
  n = hello(h, wrong, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC);
  probe("wrong secret", h, n);
  CHECK(fail_count("tls_bad_hmac") == hmac0 + 1);
  uint8_t junk[300];
  mtp_random(junk, sizeof(junk));
  junk[0] = 0x47; /* never 16: random bytes, not TLS */
  probe("random bytes", junk, sizeof(junk));
  {
    /* A plain obfuscated2 client with the right secret is not TLS either. */
    struct tclient c;
    tc_init(&c);
    int64_t t0 = hx_now_ms();
    CHECK(tc_connect(&c, "127.0.0.1", h_env.port, h_env.secret, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
    uint8_t pkt[64];
    tc_make_packet(pkt, sizeof(pkt), false);
    CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
    size_t bytes = 99;
    CHECK(hx_wait_eof(c.fd, 5000, &bytes) == 0);
    CHECK(bytes == 0 && hx_now_ms() - t0 >= MIN_CLOSE_MS);
    tc_close(&c);
  }
  CHECK(fail_count("not_tls") == nottls0 + 2);
  struct fm_stats st1;
  fm_get_stats(h_env.fm, &st1);
  CHECK(st1.proxy_reqs == st0.proxy_reqs + 2); /* only the replayed session's real client */
  CHECK(he_metric("mtproxy_fake_tls_handshakes_total") == 9);
  CHECK(he_metric("mtproxy_fronted_connections_total") == 0); /* fronting is off */

  /* Good clients still work after the probes. */
  {
    struct tc_tls tls = {.sni = "EXAMPLE.com", .kind = MTP_FAKETLS_KIND_PQ};
    struct tclient c;
    connect_tls(&c, h_env.secret, &tls, MTP_PROTO_ABRIDGED);
    expect_echo(&c, 4096, false);
    tc_close(&c);
  }
  double v = -1;
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 5000, &v));

  CHECK(he_finish() == 0);
  return check_report();
}
