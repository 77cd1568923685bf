/*
 * test_framing.c - the abridged / intermediate / padded decoders from a vector table, each
 * vector fed whole, byte by byte and split in two at every point; large packets (long
 * abridged form, the size limit) built in code; encoder -> decoder round trips for sizes up
 * to MTP_MAX_PACKET; allocation behaviour (zero copy, no allocation before the length is
 * checked, buffer never larger than the packet, MTP_ENOMEM).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "framing.h"
#include "check.h"

/* ---- a counting allocator that can fail on demand ---- */
static long n_allocs;
static bool fail_allocs;
static void *t_malloc(size_t n) {
  if (fail_allocs)
    return NULL;
  n_allocs++;
  return malloc(n);
}
static void *t_realloc(void *p, size_t n) {
  if (fail_allocs)
    return NULL;
  n_allocs++;
  return realloc(p, n);
}
static void *t_calloc(size_t c, size_t n) {
  if (fail_allocs)
    return NULL;
  n_allocs++;
  return calloc(c, n);
}
static void t_free(void *p) { free(p); }

/* ---- the driver: feeds chunks, collects packets ---- */

#define MAX_PKTS 16

struct got_pkt {
  uint8_t *data; /* owned copy */
  size_t len;
  bool quickack;
};

struct result {
  struct got_pkt pkts[MAX_PKTS];
  size_t npkts;
  int err; /* 0 or the first negative return */
  size_t max_cap;
};

static void result_free(struct result *r) {
  for (size_t i = 0; i < r->npkts; i++)
    free(r->pkts[i].data);
  memset(r, 0, sizeof *r);
}

/* Feeds one chunk to d, calling decode until the chunk is used up or an error. */
static void feed(struct mtp_frame_dec *d, const uint8_t *in, size_t len, struct result *r) {
  size_t pos = 0;
  int spins = 0;
  while (r->err == 0) {
    struct mtp_packet pkt;
    bool has = false;
    ssize_t n = mtp_frame_decode(d, in + pos, len - pos, &pkt, &has);
    if (d->_cap > r->max_cap)
      r->max_cap = d->_cap;
    if (n < 0) {
      r->err = (int)n;
      return;
    }
    CHECK((size_t)n <= len - pos);
    pos += (size_t)n;
    if (has) {
      CHECK(r->npkts < MAX_PKTS);
      struct got_pkt *g = &r->pkts[r->npkts++];
      g->len = pkt.len;
      g->quickack = pkt.quickack;
      g->data = malloc(pkt.len ? pkt.len : 1);
      CHECK(g->data != NULL);
      memcpy(g->data, pkt.data, pkt.len);
      /* Zero copy when the whole body was inside this input. */
      if (pkt.data >= in && pkt.data < in + len)
        CHECK(pkt.data + pkt.len <= in + len);
    } else {
      /* Without a packet the decoder must have taken everything it was given. */
      CHECK(pos == len);
    }
    if (pos == len)
      return;
    CHECK(++spins < 1000000);
  }
}

enum mode { WHOLE, BYTES, SPLIT };

/* Decodes `in` fed according to mode (split point `at` for SPLIT). */
static void run(enum mtp_proto proto, size_t max_len, const uint8_t *in, size_t len, enum mode mode, size_t at,
                struct result *r) {
  struct mtp_frame_dec d;
  mtp_frame_dec_init(&d, proto);
  if (max_len)
    d.max_len = max_len;
  memset(r, 0, sizeof *r);
  if (mode == WHOLE) {
    feed(&d, in, len, r);
  } else if (mode == BYTES) {
    for (size_t i = 0; i < len && r->err == 0; i++) {
      /* A separate one-byte buffer, so borrowed pointers into it are caught by ASan. */
      uint8_t *b = malloc(1);
      CHECK(b != NULL);
      b[0] = in[i];
      feed(&d, b, 1, r);
      free(b);
    }
  } else {
    feed(&d, in, at, r);
    if (r->err == 0)
      feed(&d, in + at, len - at, r);
  }
  mtp_frame_dec_free(&d);
  mtp_frame_dec_free(&d); /* idempotent */
}

/* ---- vector table ---- */

struct vec {
  const char *name;
  enum mtp_proto proto;
  const char *in;     /* hex */
  const char *pkt[4]; /* expected payloads, hex; a leading '!' marks quickack */
  int err;            /* expected error after the packets, or 0 */
};

#define A MTP_PROTO_ABRIDGED
#define I MTP_PROTO_INTERMEDIATE
#define P MTP_PROTO_PADDED

static const struct vec vecs[] = {
    {"abr one word", A, "01aabbccdd", {"aabbccdd"}, 0},
    {"abr quickack", A, "8111223344", {"!11223344"}, 0},
    {"abr two words", A, "020102030405060708", {"0102030405060708"}, 0},
    {"abr back to back", A, "01aabbccdd8111223344020102030405060708",
     {"aabbccdd", "!11223344", "0102030405060708"}, 0},
    {"abr zero", A, "00", {NULL}, MTP_EPROTO},
    {"abr zero quickack", A, "80", {NULL}, MTP_EPROTO},
    {"abr long zero", A, "7f000000", {NULL}, MTP_EPROTO},
    {"abr long overlong", A, "7f010000aabbccdd", {NULL}, MTP_EPROTO},
    {"abr long too big", A, "7f01fc03", {NULL}, MTP_ETOOBIG},
    {"abr long too big qa", A, "ffffffff", {NULL}, MTP_ETOOBIG},
    {"abr packet then error", A, "01aabbccdd00", {"aabbccdd"}, MTP_EPROTO},
    {"int one word", I, "04000000aabbccdd", {"aabbccdd"}, 0},
    {"int quickack", I, "04000080aabbccdd", {"!aabbccdd"}, 0},
    {"int back to back", I, "04000000aabbccdd0800008001020304050607080400000011223344",
     {"aabbccdd", "!0102030405060708", "11223344"}, 0},
    {"int zero", I, "00000000", {NULL}, MTP_EPROTO},
    {"int zero quickack", I, "00000080", {NULL}, MTP_EPROTO},
    {"int misaligned", I, "05000000aabbccddee", {NULL}, MTP_EPROTO},
    {"int too big", I, "01f00f00", {NULL}, MTP_ETOOBIG},
    {"int huge", I, "ffffff7f", {NULL}, MTP_ETOOBIG},
    {"int huge quickack", I, "ffffffff", {NULL}, MTP_ETOOBIG},
    {"int packet then error", I, "04000000aabbccdd00000000", {"aabbccdd"}, MTP_EPROTO},
    {"pad 0", P, "04000000aabbccdd", {"aabbccdd"}, 0},
    {"pad 1", P, "05000000aabbccdd99", {"aabbccdd"}, 0},
    {"pad 2", P, "06000000aabbccdd9999", {"aabbccdd"}, 0},
    {"pad 3", P, "07000000aabbccdd999999", {"aabbccdd"}, 0},
    {"pad 0 of 8", P, "080000000102030405060708", {"0102030405060708"}, 0},
    {"pad quickack", P, "06000080aabbccdd9999", {"!aabbccdd"}, 0},
    {"pad back to back", P, "07000000aabbccdd99999905000080111111119904000000222222220600000033333333abab",
     {"aabbccdd", "!11111111", "22222222", "33333333"}, 0},
    {"pad only padding", P, "03000000999999", {NULL}, MTP_EPROTO},
    {"pad one byte", P, "0100000099", {NULL}, MTP_EPROTO},
    {"pad zero", P, "00000000", {NULL}, MTP_EPROTO},
    {"pad too big", P, "04f00f00", {NULL}, MTP_ETOOBIG},
};

static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
  int n = mtp_hex_decode(hex, out, cap);
  CHECK(n >= 0);
  return (size_t)n;
}

static void check_result(const struct vec *v, const struct result *r) {
  size_t want = 0;
  while (want < 4 && v->pkt[want] != NULL)
    want++;
  if (r->npkts != want || r->err != v->err)
    fprintf(stderr, "vector '%s': got %zu packets err %d\n", v->name, r->npkts, r->err);
  CHECK(r->npkts == want);
  CHECK(r->err == v->err);
  for (size_t i = 0; i < want; i++) {
    const char *h = v->pkt[i];
    bool qa = h[0] == '!';
    uint8_t exp[64];
    size_t n = unhex(qa ? h + 1 : h, exp, sizeof exp);
    CHECK(r->pkts[i].quickack == qa);
    CHECK(r->pkts[i].len == n);
    CHECK(memcmp(r->pkts[i].data, exp, n) == 0);
  }
}

static void test_vectors(void) {
  for (size_t k = 0; k < sizeof vecs / sizeof vecs[0]; k++) {
    const struct vec *v = &vecs[k];
    uint8_t in[256];
    size_t len = unhex(v->in, in, sizeof in);
    struct result r;
    run(v->proto, 0, in, len, WHOLE, 0, &r);
    check_result(v, &r);
    result_free(&r);
    run(v->proto, 0, in, len, BYTES, 0, &r);
    check_result(v, &r);
    result_free(&r);
    for (size_t at = 0; at <= len; at++) {
      run(v->proto, 0, in, len, SPLIT, at, &r);
      check_result(v, &r);
      result_free(&r);
    }
  }
}

/* ---- large packets built in code ---- */

/* Builds header + body (+ padding) for a packet of `plen` payload bytes; returns total size. */
static size_t build(enum mtp_proto proto, size_t plen, bool qa, uint8_t seed, uint8_t *out, size_t *pad) {
  uint8_t hdr[4];
  size_t h = mtp_frame_header(proto, plen, qa, hdr, pad);
  CHECK(h == 1 || h == 4);
  memcpy(out, hdr, h);
  for (size_t i = 0; i < plen; i++)
    out[h + i] = (uint8_t)(i * 31 + seed);
  for (size_t i = 0; i < *pad; i++)
    out[h + plen + i] = 0xa5;
  return h + plen + *pad;
}

static bool body_ok(const struct got_pkt *g, size_t plen, uint8_t seed) {
  if (g->len != plen)
    return false;
  for (size_t i = 0; i < plen; i++)
    if (g->data[i] != (uint8_t)(i * 31 + seed))
      return false;
  return true;
}

static void test_header_encoding(void) {
  uint8_t h[4];
  size_t pad = 99;
  /* Abridged: short form up to 0x7e words, then 7f + 3 bytes LE words. */
  CHECK(mtp_frame_header(A, 4, false, h, &pad) == 1 && h[0] == 0x01 && pad == 0);
  CHECK(mtp_frame_header(A, 4, true, h, &pad) == 1 && h[0] == 0x81);
  CHECK(mtp_frame_header(A, 0x7e * 4, false, h, &pad) == 1 && h[0] == 0x7e);
  CHECK(mtp_frame_header(A, 0x7f * 4, false, h, &pad) == 4);
  CHECK(h[0] == 0x7f && h[1] == 0x7f && h[2] == 0 && h[3] == 0);
  CHECK(mtp_frame_header(A, MTP_MAX_PACKET, true, h, &pad) == 4);
  CHECK(h[0] == 0xff && h[1] == 0x00 && h[2] == 0xfc && h[3] == 0x03);
  /* Intermediate: 4 bytes LE, bit 31 quick ack. */
  CHECK(mtp_frame_header(I, 0x123458, false, h, &pad) == 4 && pad == 0);
  CHECK(h[0] == 0x58 && h[1] == 0x34 && h[2] == 0x12 && h[3] == 0x00);
  CHECK(mtp_frame_header(I, 8, true, h, &pad) == 4);
  CHECK(h[0] == 0x08 && h[1] == 0 && h[2] == 0 && h[3] == 0x80);
  /* Padded: header counts the 0..3 padding bytes, and every amount shows up. */
  bool seen[4] = {false, false, false, false};
  for (int i = 0; i < 400; i++) {
    CHECK(mtp_frame_header(P, 16, i & 1, h, &pad) == 4);
    CHECK(pad <= 3);
    seen[pad] = true;
    uint32_t v = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    CHECK((v & 0x7fffffffu) == 16 + pad);
    CHECK(((v & 0x80000000u) != 0) == (bool)(i & 1));
  }
  CHECK(seen[0] && seen[1] && seen[2] && seen[3]);
  /* Quick-ack answers. */
  uint8_t q[4];
  mtp_frame_quickack(A, 0x12345678, q);
  CHECK(q[0] == 0x92 && q[1] == 0x34 && q[2] == 0x56 && q[3] == 0x78);
  mtp_frame_quickack(I, 0x12345678, q);
  CHECK(q[0] == 0x78 && q[1] == 0x56 && q[2] == 0x34 && q[3] == 0x92);
  mtp_frame_quickack(P, 0x80000001, q);
  CHECK(q[0] == 0x01 && q[1] == 0 && q[2] == 0 && q[3] == 0x80);
}

/* Encoder -> decoder for sample sizes up to the limit, whole, in two pieces, and in random
 * chunks; the decoder's buffer never grows past the packet. */
static void test_round_trip(void) {
  static const size_t sizes[] = {4, 8, 12, 0x7e * 4, 0x7f * 4, 0x80 * 4, 1000, 4096, 65536, 100004, 524288,
                                 MTP_MAX_PACKET - 4, MTP_MAX_PACKET};
  const enum mtp_proto protos[] = {A, I, P};
  size_t cap = MTP_MAX_PACKET + 16;
  uint8_t *buf = malloc(cap);
  CHECK(buf != NULL);
  for (size_t p = 0; p < 3; p++) {
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
      size_t plen = sizes[s], pad;
      bool qa = (s % 3) == 1;
      uint8_t seed = (uint8_t)(s + 7 * p);
      size_t total = build(protos[p], plen, qa, seed, buf, &pad);
      struct result r;
      run(protos[p], 0, buf, total, WHOLE, 0, &r);
      CHECK(r.err == 0 && r.npkts == 1 && r.pkts[0].quickack == qa && body_ok(&r.pkts[0], plen, seed));
      CHECK(r.max_cap == 0); /* zero copy */
      result_free(&r);
      size_t ats[] = {1, total / 2, total - 1};
      for (size_t a = 0; a < 3; a++) {
        run(protos[p], 0, buf, total, SPLIT, ats[a], &r);
        CHECK(r.err == 0 && r.npkts == 1 && r.pkts[0].quickack == qa && body_ok(&r.pkts[0], plen, seed));
        CHECK(r.max_cap <= plen + pad);
        result_free(&r);
      }
      /* Random chunks through one decoder. */
      struct mtp_frame_dec d;
      mtp_frame_dec_init(&d, protos[p]);
      memset(&r, 0, sizeof r);
      size_t pos = 0;
      while (pos < total && r.err == 0) {
        size_t k = 1 + check_rand32() % 70000;
        if (k > total - pos)
          k = total - pos;
        feed(&d, buf + pos, k, &r);
        pos += k;
      }
      CHECK(r.err == 0 && r.npkts == 1 && body_ok(&r.pkts[0], plen, seed));
      CHECK(r.max_cap <= plen + pad);
      result_free(&r);
      mtp_frame_dec_free(&d);
    }
    /* One past the limit is refused for every protocol, before any allocation. */
    uint8_t h[4];
    size_t pad;
    size_t hl = mtp_frame_header(protos[p], MTP_MAX_PACKET + 4, false, h, &pad);
    long before = n_allocs;
    struct result r;
    run(protos[p], 0, h, hl, BYTES, 0, &r);
    CHECK(r.err == MTP_ETOOBIG && r.npkts == 0);
    CHECK(n_allocs == before);
    result_free(&r);
  }
  free(buf);
}

/* Several big packets back to back in one buffer, fed in random chunks. */
static void test_stream(void) {
  const enum mtp_proto protos[] = {A, I, P};
  static const size_t sizes[] = {4, 600, 1024, 8, 70000, 12, 508, 512, 4};
  size_t cap = 0;
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
    cap += sizes[s] + 8;
  uint8_t *buf = malloc(cap);
  CHECK(buf != NULL);
  for (size_t p = 0; p < 3; p++) {
    size_t total = 0, pads[16];
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
      total += build(protos[p], sizes[s], s & 1, (uint8_t)s, buf + total, &pads[s]);
    for (int round = 0; round < 30; round++) {
      struct mtp_frame_dec d;
      struct result r;
      mtp_frame_dec_init(&d, protos[p]);
      memset(&r, 0, sizeof r);
      size_t pos = 0;
      while (pos < total && r.err == 0) {
        size_t k = round == 0 ? total : 1 + check_rand32() % (round < 10 ? 7 : 3000);
        if (k > total - pos)
          k = total - pos;
        feed(&d, buf + pos, k, &r);
        pos += k;
      }
      CHECK(r.err == 0);
      CHECK(r.npkts == sizeof sizes / sizeof sizes[0]);
      for (size_t s = 0; s < r.npkts; s++) {
        CHECK(body_ok(&r.pkts[s], sizes[s], (uint8_t)s));
        CHECK(r.pkts[s].quickack == (bool)(s & 1));
      }
      result_free(&r);
      mtp_frame_dec_free(&d);
    }
  }
  free(buf);
}

/* A custom max_len, and the abridged/intermediate limit exactly at the boundary. */
static void test_limits(void) {
  uint8_t in[16];
  struct result r;
  size_t n = unhex("0c000000000000000000000000000000", in, sizeof in);
  run(I, 8, in, n, WHOLE, 0, &r);
  CHECK(r.err == MTP_ETOOBIG && r.npkts == 0);
  result_free(&r);
  run(I, 12, in, n, WHOLE, 0, &r);
  CHECK(r.err == 0 && r.npkts == 1 && r.pkts[0].len == 12);
  result_free(&r);
  n = unhex("7f00fc03", in, sizeof in); /* exactly MTP_MAX_PACKET: accepted, waits for body */
  run(A, 0, in, n, WHOLE, 0, &r);
  CHECK(r.err == 0 && r.npkts == 0);
  result_free(&r);
  n = unhex("00f00f00", in, sizeof in);
  run(I, 0, in, n, WHOLE, 0, &r);
  CHECK(r.err == 0 && r.npkts == 0);
  result_free(&r);
  /* Padded: the limit is on the payload, so the maximum plus 3 padding bytes is fine. */
  n = unhex("03f00f00", in, sizeof in);
  run(P, 0, in, n, WHOLE, 0, &r);
  CHECK(r.err == 0 && r.npkts == 0);
  result_free(&r);
}

/* Allocation: none for zero-copy packets; MTP_ENOMEM when the buffer cannot grow; the
 * decoder is reusable after free + init. */
static void test_alloc(void) {
  uint8_t in[64];
  size_t n = unhex("1000000000112233445566778899aabbccddeeff", in, sizeof in);
  struct mtp_frame_dec d;
  struct mtp_packet pkt;
  bool has;
  long before = n_allocs;
  mtp_frame_dec_init(&d, I);
  CHECK(mtp_frame_decode(&d, in, n, &pkt, &has) == (ssize_t)n && has && pkt.len == 16 && pkt.data == in + 4);
  CHECK(n_allocs == before);
  CHECK(mtp_frame_decode(&d, in, 0, &pkt, &has) == 0 && !has);

  fail_allocs = true;
  CHECK(mtp_frame_decode(&d, in, 10, &pkt, &has) == MTP_ENOMEM);
  fail_allocs = false;
  mtp_frame_dec_free(&d);
  mtp_frame_dec_init(&d, I);
  CHECK(mtp_frame_decode(&d, in, 10, &pkt, &has) == 10 && !has);
  CHECK(d._cap <= 16);
  CHECK(mtp_frame_decode(&d, in + 10, n - 10, &pkt, &has) == (ssize_t)(n - 10) && has);
  CHECK(pkt.len == 16 && memcmp(pkt.data, in + 4, 16) == 0);
  mtp_frame_dec_free(&d);
}

int main(void) {
  check_seed(0x243f6a8885a308d3ull);
  mtp_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
  test_vectors();
  test_header_encoding();
  test_round_trip();
  test_stream();
  test_limits();
  test_alloc();
  return check_report();
}
