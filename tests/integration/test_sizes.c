/*
 * test_sizes - packet sizes through the real mtproxy and the fake middle proxy, for every
 * client framing (abridged, intermediate, padded intermediate "secure"):
 *
 * - 4 B (the smallest packet the proxy accepts), 8 B, 1000 B, 4096 B, 64 KiB and 1044480 B
 *   (MTP_MAX_PACKET, the official proxy's limit) are echoed unchanged.
 * - MTProto packets are multiples of 4 bytes. The official proxy (and ours) closes an
 *   intermediate client whose length field is not a multiple of 4 or is 0; abridged cannot
 *   even express such a length. Padded intermediate counts 0..3 random padding bytes in the
 *   length and drops len % 4 trailing bytes, so a length of 5 carries a 4-byte packet, while
 *   a length of 3 (nothing but padding) closes the client.
 * - A packet above the limit closes the client: 1044484 B (the next multiple of 4) and 1 MiB
 *   (1048576 B). Every such close counts in mtproxy_client_closes_total{reason="bad_frame"}.
 * - The decoder does not care how the stream is cut: packets sent in 1-byte, 7-byte and
 *   1000-byte writes (tc_send_raw pieces), and several packets in one write, echo unchanged.
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

static uint64_t g_echoes; /* packets echoed back to clients */

static void connect_client(struct tclient *c, enum mtp_proto proto) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", h_env.port, h_env.secret, proto, 2, 5000) == MTP_OK);
}

/* Receives one packet and checks it is exactly pkt/len. */
static void expect_echo(struct tclient *c, const uint8_t *pkt, size_t len) {
  struct tc_msg m;
  int rc = tc_recv(c, 10000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "%s, %zu bytes: recv: %s\n", mtp_proto_name(c->proto), len, mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(m.kind == TC_PACKET);
  if (m.len != len)
    fprintf(stderr, "%s: sent %zu bytes, got %zu back\n", mtp_proto_name(c->proto), len, m.len);
  CHECK(m.len == len);
  CHECK(memcmp(m.data, pkt, len) == 0);
  g_echoes++;
}

static void echo(struct tclient *c, const uint8_t *pkt, size_t len) {
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  expect_echo(c, pkt, len);
}

/* Frames pkt for c's protocol into out (header, packet, padding). Returns the length. */
static size_t frame(enum mtp_proto proto, const uint8_t *pkt, size_t len, uint8_t *out) {
  size_t pad = 0;
  size_t hl = mtp_frame_header(proto, len, false, out, &pad);
  memcpy(out + hl, pkt, len);
  mtp_random(out + hl + len, pad);
  return hl + len + pad;
}

/* Sends bytes in pieces of `piece` bytes (one write each). */
static void send_pieces(struct tclient *c, const uint8_t *bytes, size_t len, size_t piece) {
  for (size_t off = 0; off < len; off += piece) {
    size_t n = len - off < piece ? len - off : piece;
    CHECK(tc_send_raw(c, bytes + off, n) == MTP_OK);
  }
}

static const size_t k_sizes[] = {4, 8, 1000, 4096, 65536, MTP_MAX_PACKET};

static void sizes_echo(enum mtp_proto proto, uint8_t *buf) {
  struct tclient c;
  connect_client(&c, proto);
  for (size_t i = 0; i < sizeof(k_sizes) / sizeof(k_sizes[0]); i++) {
    tc_make_packet(buf, k_sizes[i], true);
    echo(&c, buf, k_sizes[i]);
  }
  /* Same sizes again as unencrypted-looking packets (auth_key_id 0) where they fit. */
  for (size_t i = 1; i < sizeof(k_sizes) / sizeof(k_sizes[0]); i++) {
    tc_make_packet(buf, k_sizes[i], false);
    echo(&c, buf, k_sizes[i]);
  }
  tc_close(&c);
}

/* Sends a valid packet first (echoed), then `bad` raw framed bytes; the proxy must close. */
static void expect_close_after(enum mtp_proto proto, const uint8_t *bad, size_t badlen, int *closes) {
  struct tclient c;
  connect_client(&c, proto);
  uint8_t pkt[64];
  tc_make_packet(pkt, sizeof(pkt), true);
  echo(&c, pkt, sizeof(pkt));
  int rc = tc_send_raw(&c, bad, badlen);
  CHECK(rc == MTP_OK || rc == MTP_ECLOSED || rc == MTP_EIO); /* the proxy may reset mid-send */
  rc = tc_wait_closed(&c, 5000);
  if (rc != MTP_ECLOSED)
    fprintf(stderr, "%s: proxy did not close after %zu bad bytes: %s\n", mtp_proto_name(proto), badlen,
            mtp_strerror(rc));
  CHECK(rc == MTP_ECLOSED);
  (*closes)++;
  tc_close(&c);
}

static void oversize(enum mtp_proto proto, uint8_t *buf, uint8_t *framed, int *closes) {
  static const size_t big[] = {MTP_MAX_PACKET + 4, 1048576};
  for (size_t i = 0; i < 2; i++) {
    tc_make_packet(buf, big[i], true);
    size_t n = frame(proto, buf, big[i], framed);
    expect_close_after(proto, framed, n, closes);
  }
}

static void le32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

/* Lengths that are not whole MTProto packets. */
static void odd_lengths(int *closes) {
  uint8_t raw[16];
  /* intermediate: 5, 2 and 0 close the client */
  static const uint32_t bad_int[] = {5, 2, 0};
  for (size_t i = 0; i < 3; i++) {
    le32(raw, bad_int[i]);
    mtp_random(raw + 4, 8);
    expect_close_after(MTP_PROTO_INTERMEDIATE, raw, 4 + bad_int[i], closes);
  }
  /* padded: 5 = a 4-byte packet + 1 padding byte: echoed as 4 bytes */
  struct tclient c;
  connect_client(&c, MTP_PROTO_PADDED);
  for (uint32_t padn = 0; padn < 4; padn++) {
    le32(raw, 4 + padn);
    mtp_random(raw + 4, 4 + padn);
    CHECK(tc_send_raw(&c, raw, 8 + padn) == MTP_OK);
    expect_echo(&c, raw + 4, 4);
  }
  tc_close(&c);
  /* padded: 3 = nothing but padding: closed */
  le32(raw, 3);
  mtp_random(raw + 4, 3);
  expect_close_after(MTP_PROTO_PADDED, raw, 7, closes);
}

static void split_writes(enum mtp_proto proto, uint8_t *buf, uint8_t *framed) {
  struct tclient c;
  connect_client(&c, proto);
  static const struct {
    size_t len, piece;
  } cases[] = {{4, 1}, {1000, 1}, {4096, 7}, {65536, 1000}, {MTP_MAX_PACKET, 4093}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    tc_make_packet(buf, cases[i].len, true);
    size_t n = frame(proto, buf, cases[i].len, framed);
    send_pieces(&c, framed, n, cases[i].piece);
    expect_echo(&c, buf, cases[i].len);
  }
  /* Three packets in one write, then one packet whose header straddles two writes. */
  uint8_t p1[8], p2[1000], p3[4];
  tc_make_packet(p1, sizeof(p1), true);
  tc_make_packet(p2, sizeof(p2), true);
  tc_make_packet(p3, sizeof(p3), true);
  size_t n = frame(proto, p1, sizeof(p1), framed);
  n += frame(proto, p2, sizeof(p2), framed + n);
  n += frame(proto, p3, sizeof(p3), framed + n);
  CHECK(tc_send_raw(&c, framed, n) == MTP_OK);
  expect_echo(&c, p1, sizeof(p1));
  expect_echo(&c, p2, sizeof(p2));
  expect_echo(&c, p3, sizeof(p3));
  tc_make_packet(buf, 2048, true); /* 4-byte header in every framing (abridged: 0x7f form) */
  n = frame(proto, buf, 2048, framed);
  CHECK(tc_send_raw(&c, framed, 2) == MTP_OK);
  CHECK(tc_send_raw(&c, framed + 2, n - 2) == MTP_OK);
  expect_echo(&c, buf, 2048);
  tc_close(&c);
}

int main(void) {
  check_on_fail = he_cleanup;
  he_start("1");
  uint8_t *buf = mtp_malloc(1048576 + 16);
  uint8_t *framed = mtp_malloc(1048576 + 16);
  CHECK(buf != NULL && framed != NULL);

  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  int closes = 0;
  for (size_t p = 0; p < 3; p++) {
    sizes_echo(protos[p], buf);
    split_writes(protos[p], buf, framed);
    oversize(protos[p], buf, framed, &closes);
  }
  odd_lengths(&closes);

  struct fm_stats st;
  fm_get_stats(h_env.fm, &st);
  CHECK(st.bad == 0);
  /* Every packet that reached Telegram came back; no oversize or malformed one was forwarded. */
  if (st.proxy_reqs != g_echoes)
    fprintf(stderr, "fake saw %llu PROXY_REQ, clients got %llu echoes\n", (unsigned long long)st.proxy_reqs,
            (unsigned long long)g_echoes);
  CHECK(st.proxy_reqs == g_echoes);
  double v = he_metric("mtproxy_client_closes_total{reason=\"bad_frame\"}");
  if (v != closes)
    fprintf(stderr, "bad_frame closes: metric %.0f, expected %d\n", v, closes);
  CHECK(v == closes);
  mtp_free(buf);
  mtp_free(framed);
  CHECK(he_finish() == 0);
  return check_report();
}
