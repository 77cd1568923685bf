/*
 * test_quickack - quick acks through the real mtproxy, for every client framing:
 * a packet sent with the quick-ack bit makes the fake middle proxy answer RPC_SIMPLE_ACK
 * (token = fm_quickack_token(packet), top bit set) before the echo; the proxy forwards the
 * token to the client unframed (big-endian for abridged, little-endian for intermediate and
 * padded; tclient decodes each framing's form), so the client sees the ack first, then the
 * echo. A packet without the bit gets no ack. Several acked packets in a row keep the order
 * ack1 echo1 ack2 echo2 ... mtproxy_quickacks_total counts exactly the acks delivered, and
 * the fake's simple_acks agree.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "framing.h"
#include "check.h"
#include "harness_env.h"
#include "tclient.h"
#include "banned.h"


static uint64_t g_acks; /* quick acks received by the clients */

static void expect_ack(struct tclient *c, const uint8_t *pkt, size_t len) {
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "%s: recv: %s\n", mtp_proto_name(c->proto), mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  if (m.kind != TC_QUICKACK)
    fprintf(stderr, "%s, %zu bytes: expected the quick ack first, got a %zu-byte packet\n", mtp_proto_name(c->proto),
            len, m.len);
  CHECK(m.kind == TC_QUICKACK);
  uint32_t want = fm_quickack_token(pkt, len);
  if (m.token != want)
    fprintf(stderr, "%s: token %08x, expected %08x\n", mtp_proto_name(c->proto), m.token, want);
  CHECK(m.token == want);
  g_acks++;
}

static void expect_echo(struct tclient *c, const uint8_t *pkt, size_t len) {
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  CHECK(rc == MTP_OK);
  if (m.kind != TC_PACKET)
    fprintf(stderr, "%s, %zu bytes: expected the echo, got a quick ack %08x\n", mtp_proto_name(c->proto), len,
            m.token);
  CHECK(m.kind == TC_PACKET);
  CHECK(m.len == len && memcmp(m.data, pkt, len) == 0);
}

static void one_proto(enum mtp_proto proto) {
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", h_env.port, h_env.secret, proto, 2, 5000) == MTP_OK);
  static uint8_t pkt[3][65536];

  /* Acked packets of several sizes, unencrypted (auth) and encrypted. */
  static const struct {
    size_t len;
    bool enc;
  } cases[] = {{4, true}, {40, false}, {72, false}, {1024, true}, {65536, true}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    tc_make_packet(pkt[0], cases[i].len, cases[i].enc);
    CHECK(tc_send(&c, pkt[0], cases[i].len, true) == MTP_OK);
    expect_ack(&c, pkt[0], cases[i].len);
    expect_echo(&c, pkt[0], cases[i].len);
  }

  /* Without the bit: the echo comes first and alone. */
  tc_make_packet(pkt[0], 256, true);
  CHECK(tc_send(&c, pkt[0], 256, false) == MTP_OK);
  expect_echo(&c, pkt[0], 256);

  /* Three acked packets back to back, with an unacked one in the middle. */
  static const size_t lens[3] = {128, 512, 2048};
  for (int i = 0; i < 3; i++)
    tc_make_packet(pkt[i], lens[i], true);
  uint8_t plain[64];
  tc_make_packet(plain, sizeof(plain), true);
  CHECK(tc_send(&c, pkt[0], lens[0], true) == MTP_OK);
  CHECK(tc_send(&c, plain, sizeof(plain), false) == MTP_OK);
  CHECK(tc_send(&c, pkt[1], lens[1], true) == MTP_OK);
  CHECK(tc_send(&c, pkt[2], lens[2], true) == MTP_OK);
  expect_ack(&c, pkt[0], lens[0]);
  expect_echo(&c, pkt[0], lens[0]);
  expect_echo(&c, plain, sizeof(plain));
  for (int i = 1; i < 3; i++) {
    expect_ack(&c, pkt[i], lens[i]);
    expect_echo(&c, pkt[i], lens[i]);
  }
  /* Nothing else is pending. */
  struct tc_msg m;
  CHECK(tc_recv(&c, 200, &m) == MTP_ETIMEDOUT);
  tc_close(&c);
}

int main(void) {
  check_on_fail = he_cleanup;
  he_start("1");
  CHECK(he_metric("mtproxy_quickacks_total") == 0);
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  for (size_t p = 0; p < 3; p++) {
    double before = he_metric("mtproxy_quickacks_total");
    one_proto(protos[p]);
    double after = he_metric("mtproxy_quickacks_total");
    if (after - before != 8)
      fprintf(stderr, "%s: mtproxy_quickacks_total moved by %.0f, expected 8\n", mtp_proto_name(protos[p]),
              after - before);
    CHECK(after - before == 8);
  }
  struct fm_stats st;
  fm_get_stats(h_env.fm, &st);
  CHECK(st.bad == 0);
  CHECK(st.simple_acks == g_acks);
  CHECK(g_acks == 24);
  CHECK(he_metric("mtproxy_quickacks_total") == (double)g_acks);
  CHECK(he_finish() == 0);
  return check_report();
}
