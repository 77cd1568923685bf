/*
 * test_tunnel.c - the split-mode tunnel frame codec (shared/tunnel.{h,c}): every frame type
 * round-trips; a stream of several frames decodes the same fed whole, byte by byte and split in
 * two at every point; unknown fields and unknown frame types are tolerated (frames built by
 * hand with extra field numbers); zero, truncated, garbage and oversized frames are errors
 * (oversized before any allocation); field rules; encoder limits; allocation failures.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "framing.h"
#include "tunnel.h"

#include "check.h"

/* ---- a counting allocator that can fail from the Nth allocation on ---- */
static long n_allocs;
static long fail_after = -1; /* -1: never fail */
static bool may_alloc(void) {
  if (fail_after >= 0 && n_allocs >= fail_after)
    return false;
  n_allocs++;
  return true;
}
static void *t_malloc(size_t n) { return may_alloc() ? malloc(n) : NULL; }
static void *t_realloc(void *p, size_t n) { return may_alloc() ? realloc(p, n) : NULL; }
static void *t_calloc(size_t c, size_t n) { return may_alloc() ? calloc(c, n) : NULL; }

/* ---- sample frames, one of each type ---- */
static uint8_t pkt_bytes[300];
static uint8_t ip4[4] = {192, 0, 2, 7};
static uint8_t ip6[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
static uint8_t tag16[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static Mtp__Hello s_hello = MTP__HELLO__INIT;
static Mtp__Open s_open = MTP__OPEN__INIT;
static Mtp__Data s_data = MTP__DATA__INIT;
static Mtp__QuickAck s_qa = MTP__QUICK_ACK__INIT;
static Mtp__Close s_close = MTP__CLOSE__INIT;
static Mtp__Credit s_credit = MTP__CREDIT__INIT;
static Mtp__Ping s_ping = MTP__PING__INIT;
static Mtp__Pong s_pong = MTP__PONG__INIT;
#define NSAMPLES 8
static Mtp__Frame samples[NSAMPLES];

static void setup_samples(void) {
  for (size_t i = 0; i < sizeof(pkt_bytes); i++)
    pkt_bytes[i] = (uint8_t)(i * 7 + 3);
  s_hello.version = MTP_TUNNEL_VERSION;
  s_hello.node = "front-ams-1";
  s_open.stream = 0x1122334455ull;
  s_open.dc = -4;
  s_open.proto = 3;
  s_open.flags = 0x10;
  s_open.client_ip.data = ip6;
  s_open.client_ip.len = 16;
  s_open.client_port = 54321;
  s_open.listener = "main";
  s_open.ad_tag.data = tag16;
  s_open.ad_tag.len = 16;
  s_open.local_ip.data = ip4;
  s_open.local_ip.len = 4;
  s_open.local_port = 443;
  s_data.stream = 7;
  s_data.packet.data = pkt_bytes;
  s_data.packet.len = sizeof(pkt_bytes);
  s_data.quickack = true;
  s_qa.stream = 7;
  s_qa.token = 0x80abcdefu;
  s_close.stream = 9;
  s_close.reason = 2;
  s_credit.stream = 9;
  s_credit.bytes = 1ull << 40;
  s_ping.id = 12345;
  s_pong.id = 0xffffffffffffffffull;
  for (int i = 0; i < NSAMPLES; i++)
    mtp__frame__init(&samples[i]);
  samples[0].msg_case = MTP__FRAME__MSG_HELLO, samples[0].hello = &s_hello;
  samples[1].msg_case = MTP__FRAME__MSG_OPEN, samples[1].open = &s_open;
  samples[2].msg_case = MTP__FRAME__MSG_DATA, samples[2].data = &s_data;
  samples[3].msg_case = MTP__FRAME__MSG_QUICKACK, samples[3].quickack = &s_qa;
  samples[4].msg_case = MTP__FRAME__MSG_CLOSE, samples[4].close = &s_close;
  samples[5].msg_case = MTP__FRAME__MSG_CREDIT, samples[5].credit = &s_credit;
  samples[6].msg_case = MTP__FRAME__MSG_PING, samples[6].ping = &s_ping;
  samples[7].msg_case = MTP__FRAME__MSG_PONG, samples[7].pong = &s_pong;
}

static bool bin_eq(ProtobufCBinaryData a, ProtobufCBinaryData b) {
  return a.len == b.len && (a.len == 0 || memcmp(a.data, b.data, a.len) == 0);
}

/* Field-by-field equality of a decoded frame with the sample it came from. */
static bool frame_eq(const Mtp__Frame *a, const Mtp__Frame *b) {
  if (a->msg_case != b->msg_case)
    return false;
  switch (a->msg_case) {
  case MTP__FRAME__MSG_HELLO:
    return a->hello->version == b->hello->version && strcmp(a->hello->node, b->hello->node) == 0;
  case MTP__FRAME__MSG_OPEN:
    return a->open->stream == b->open->stream && a->open->dc == b->open->dc && a->open->proto == b->open->proto &&
           a->open->flags == b->open->flags && bin_eq(a->open->client_ip, b->open->client_ip) &&
           a->open->client_port == b->open->client_port && strcmp(a->open->listener, b->open->listener) == 0 &&
           bin_eq(a->open->ad_tag, b->open->ad_tag) && bin_eq(a->open->local_ip, b->open->local_ip) &&
           a->open->local_port == b->open->local_port;
  case MTP__FRAME__MSG_DATA:
    return a->data->stream == b->data->stream && bin_eq(a->data->packet, b->data->packet) &&
           a->data->quickack == b->data->quickack;
  case MTP__FRAME__MSG_QUICKACK:
    return a->quickack->stream == b->quickack->stream && a->quickack->token == b->quickack->token;
  case MTP__FRAME__MSG_CLOSE:
    return a->close->stream == b->close->stream && a->close->reason == b->close->reason;
  case MTP__FRAME__MSG_CREDIT:
    return a->credit->stream == b->credit->stream && a->credit->bytes == b->credit->bytes;
  case MTP__FRAME__MSG_PING:
    return a->ping->id == b->ping->id;
  case MTP__FRAME__MSG_PONG:
    return a->pong->id == b->pong->id;
  default:
    return false;
  }
}

/* The encoded stream of all samples back to back. */
static uint8_t stream_buf[4096];
static size_t stream_len;

static void build_stream(void) {
  stream_len = 0;
  for (int i = 0; i < NSAMPLES; i++) {
    size_t want = mtp_tunnel_frame_size(&samples[i]);
    CHECK(want > MTP_TUNNEL_HDR_LEN);
    ssize_t n = mtp_tunnel_encode(&samples[i], stream_buf + stream_len, sizeof(stream_buf) - stream_len);
    CHECK(n == (ssize_t)want);
    stream_len += (size_t)n;
  }
}

/* Feeds buf in chunks given by cut points; checks that exactly the samples come out, in order. */
static void feed_chunks(const size_t *cuts, size_t ncuts) {
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  int got = 0;
  size_t start = 0;
  for (size_t c = 0; c <= ncuts; c++) {
    size_t end = c < ncuts ? cuts[c] : stream_len;
    size_t off = start;
    while (off < end) {
      Mtp__Frame *f = NULL;
      ssize_t n = mtp_tunnel_decode(&d, stream_buf + off, end - off, &f);
      CHECK(n >= 0);
      off += (size_t)n;
      if (f != NULL) {
        CHECK(got < NSAMPLES);
        CHECK(frame_eq(f, &samples[got]));
        got++;
        mtp_tunnel_frame_free(f);
      } else {
        CHECK(off == end); /* no frame: everything was consumed */
      }
    }
    start = end;
  }
  CHECK(got == NSAMPLES);
  mtp_tunnel_dec_free(&d);
  mtp_tunnel_dec_free(&d); /* idempotent */
}

static void test_roundtrip_each(void) {
  for (int i = 0; i < NSAMPLES; i++) {
    uint8_t buf[1024];
    ssize_t n = mtp_tunnel_encode(&samples[i], buf, sizeof(buf));
    CHECK(n > 0);
    /* Length prefix is big-endian and matches the body. */
    uint32_t len = ((uint32_t)buf[0] << 24) | ((uint32_t)buf[1] << 16) | ((uint32_t)buf[2] << 8) | buf[3];
    CHECK(len + MTP_TUNNEL_HDR_LEN == (size_t)n);
    struct mtp_tunnel_dec d;
    mtp_tunnel_dec_init(&d);
    Mtp__Frame *f = NULL;
    CHECK(mtp_tunnel_decode(&d, buf, (size_t)n, &f) == n);
    CHECK(f != NULL);
    CHECK(frame_eq(f, &samples[i]));
    CHECK(strcmp(mtp_tunnel_frame_name(f), mtp_tunnel_frame_name(&samples[i])) == 0);
    CHECK(strcmp(mtp_tunnel_frame_name(f), "unknown") != 0);
    mtp_tunnel_frame_free(f);
    mtp_tunnel_dec_free(&d);
  }
}

static void test_splits(void) {
  build_stream();
  feed_chunks(NULL, 0); /* whole */
  for (size_t cut = 1; cut < stream_len; cut++)
    feed_chunks(&cut, 1); /* two pieces */
  size_t *cuts = malloc(stream_len * sizeof(*cuts));
  CHECK(cuts != NULL);
  for (size_t i = 0; i + 1 < stream_len; i++)
    cuts[i] = i + 1;
  feed_chunks(cuts, stream_len - 1); /* byte by byte */
  /* Three pieces at a spread of points. */
  for (size_t a = 1; a < stream_len; a += 13)
    for (size_t b = a; b < stream_len; b += 29) {
      size_t c2[2] = {a, b};
      feed_chunks(c2, 2);
    }
  free(cuts);
}

/* Decodes exactly one whole framed body; returns the decoder's result, *out the frame. */
static ssize_t decode_body(const uint8_t *body, size_t len, Mtp__Frame **out) {
  uint8_t buf[512];
  CHECK(len + 4 <= sizeof(buf));
  buf[0] = (uint8_t)(len >> 24);
  buf[1] = (uint8_t)(len >> 16);
  buf[2] = (uint8_t)(len >> 8);
  buf[3] = (uint8_t)len;
  memcpy(buf + 4, body, len);
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  ssize_t n = mtp_tunnel_decode(&d, buf, len + 4, out);
  mtp_tunnel_dec_free(&d);
  return n;
}

static void test_unknown_fields(void) {
  Mtp__Frame *f = NULL;
  /* Frame{data=3: Data{stream=1: 5, packet=2: "ab", unknown 15: varint 300, unknown 100: "xyz",
   * quickack=3: true}, unknown 20 (fixed32) at the top level}. */
  const uint8_t body[] = {
      0x1a, 17,                         /* field 3 (data), length 17 */
      0x08, 0x05,                       /* stream = 5 */
      0x12, 0x02, 'a', 'b',             /* packet = "ab" */
      0x78, 0xac, 0x02,                 /* field 15 varint 300 (unknown) */
      0xa2, 0x06, 0x03, 'x', 'y', 'z',  /* field 100 bytes "xyz" (unknown) */
      0x18, 0x01,                       /* quickack = true */
      0xa5, 0x01, 1, 2, 3, 4,           /* field 20 fixed32 (unknown, top level) */
  };
  CHECK(decode_body(body, sizeof(body), &f) == (ssize_t)(sizeof(body) + 4));
  CHECK(f != NULL && f->msg_case == MTP__FRAME__MSG_DATA);
  CHECK(f->data->stream == 5 && f->data->packet.len == 2 && memcmp(f->data->packet.data, "ab", 2) == 0);
  CHECK(f->data->quickack);
  mtp_tunnel_frame_free(f);

  /* An unknown frame type (oneof member 12 from a newer peer): decodes with no member set. */
  const uint8_t body2[] = {0x62, 0x02, 0x08, 0x01};
  CHECK(decode_body(body2, sizeof(body2), &f) == (ssize_t)(sizeof(body2) + 4));
  CHECK(f != NULL && f->msg_case == MTP__FRAME__MSG__NOT_SET);
  CHECK(strcmp(mtp_tunnel_frame_name(f), "unknown") == 0);
  mtp_tunnel_frame_free(f);

  /* Hello with an extra field 9 (a future "capabilities" string). */
  const uint8_t body3[] = {0x0a, 0x09, 0x08, 0x02, 0x12, 0x01, 'n', 0x4a, 0x02, 'c', 'c'};
  CHECK(decode_body(body3, sizeof(body3), &f) > 0);
  CHECK(f != NULL && f->msg_case == MTP__FRAME__MSG_HELLO && f->hello->version == 2 &&
        strcmp(f->hello->node, "n") == 0);
  mtp_tunnel_frame_free(f);
}

static void expect_error(const uint8_t *in, size_t len, ssize_t want) {
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  Mtp__Frame *f = NULL;
  ssize_t n = 0;
  size_t off = 0;
  while (off < len) {
    n = mtp_tunnel_decode(&d, in + off, len - off, &f);
    CHECK(f == NULL);
    if (n < 0)
      break;
    off += (size_t)n;
  }
  CHECK(n == want);
  /* Once failed, the decoder stays failed. */
  CHECK(mtp_tunnel_decode(&d, in, len, &f) == want && f == NULL);
  mtp_tunnel_dec_free(&d);
}

static void test_errors(void) {
  Mtp__Frame *f = NULL;
  /* Zero length. */
  const uint8_t zero[] = {0, 0, 0, 0, 0x38, 0x01};
  expect_error(zero, sizeof(zero), MTP_EPROTO);

  /* Garbage body: an invalid wire type (7). */
  const uint8_t bad_wire[] = {0x0f, 0x01};
  CHECK(decode_body(bad_wire, sizeof(bad_wire), &f) == MTP_EPROTO && f == NULL);
  /* A sub-message that claims more bytes than the frame holds. */
  const uint8_t trunc_sub[] = {0x1a, 0x0a, 0x08, 0x01, 0x12};
  CHECK(decode_body(trunc_sub, sizeof(trunc_sub), &f) == MTP_EPROTO);
  /* A varint that never ends. */
  const uint8_t trunc_var[] = {0x3a, 0x03, 0x08, 0xff, 0xff};
  CHECK(decode_body(trunc_var, sizeof(trunc_var), &f) == MTP_EPROTO);
  /* All 0xff. */
  uint8_t ff[32];
  memset(ff, 0xff, sizeof(ff));
  CHECK(decode_body(ff, sizeof(ff), &f) == MTP_EPROTO);

  /* Field rules: Open with a 5-byte client ip; Open with stream 0; Data with stream 0; Open with a
   * 3-byte ad_tag; Open with port 70000. */
  const uint8_t open_ip5[] = {0x12, 0x09, 0x08, 0x01, 0x2a, 0x05, 1, 2, 3, 4, 5};
  CHECK(decode_body(open_ip5, sizeof(open_ip5), &f) == MTP_EPROTO);
  const uint8_t open_s0[] = {0x12, 0x02, 0x10, 0x03};
  CHECK(decode_body(open_s0, sizeof(open_s0), &f) == MTP_EPROTO);
  const uint8_t data_s0[] = {0x1a, 0x03, 0x12, 0x01, 'a'};
  CHECK(decode_body(data_s0, sizeof(data_s0), &f) == MTP_EPROTO);
  const uint8_t open_tag3[] = {0x12, 0x07, 0x08, 0x01, 0x42, 0x03, 1, 2, 3};
  CHECK(decode_body(open_tag3, sizeof(open_tag3), &f) == MTP_EPROTO);
  const uint8_t open_port[] = {0x12, 0x06, 0x08, 0x01, 0x30, 0xf0, 0xa2, 0x04};
  CHECK(decode_body(open_port, sizeof(open_port), &f) == MTP_EPROTO);
  /* Close on stream 0 (the whole tunnel) is fine. */
  const uint8_t close0[] = {0x2a, 0x02, 0x10, 0x01};
  CHECK(decode_body(close0, sizeof(close0), &f) > 0 && f != NULL && f->msg_case == MTP__FRAME__MSG_CLOSE &&
        f->close->stream == 0 && f->close->reason == 1);
  mtp_tunnel_frame_free(f);

  /* Oversized length: MTP_ETOOBIG after the 4 prefix bytes, before any allocation, even fed
   * byte by byte. */
  uint32_t big = MTP_TUNNEL_MAX_FRAME + 1;
  const uint8_t over[] = {(uint8_t)(big >> 24), (uint8_t)(big >> 16), (uint8_t)(big >> 8), (uint8_t)big, 0x08};
  long before = n_allocs;
  expect_error(over, sizeof(over), MTP_ETOOBIG);
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  for (int i = 0; i < 3; i++)
    CHECK(mtp_tunnel_decode(&d, over + i, 1, &f) == 1 && f == NULL);
  CHECK(mtp_tunnel_decode(&d, over + 3, 1, &f) == MTP_ETOOBIG);
  mtp_tunnel_dec_free(&d);
  const uint8_t huge[] = {0xff, 0xff, 0xff, 0xff};
  expect_error(huge, sizeof(huge), MTP_ETOOBIG);
  CHECK(n_allocs == before);
  /* A smaller per-decoder limit. */
  mtp_tunnel_dec_init(&d);
  d.max_frame = 8;
  const uint8_t nine[] = {0, 0, 0, 9};
  CHECK(mtp_tunnel_decode(&d, nine, 4, &f) == MTP_ETOOBIG);
  mtp_tunnel_dec_free(&d);

  /* A valid frame followed by garbage: the frame comes out first, then the error. */
  build_stream();
  uint8_t mixed[600];
  size_t first = mtp_tunnel_frame_size(&samples[0]);
  memcpy(mixed, stream_buf, first);
  const uint8_t tail[] = {0, 0, 0, 2, 0x0f, 0x01};
  memcpy(mixed + first, tail, sizeof(tail));
  mtp_tunnel_dec_init(&d);
  CHECK(mtp_tunnel_decode(&d, mixed, first + sizeof(tail), &f) == (ssize_t)first && f != NULL);
  mtp_tunnel_frame_free(f);
  CHECK(mtp_tunnel_decode(&d, mixed + first, sizeof(tail), &f) == MTP_EPROTO && f == NULL);
  mtp_tunnel_dec_free(&d);

  /* A partial body left in the decoder is freed by dec_free (ASan checks the leak). */
  mtp_tunnel_dec_init(&d);
  CHECK(mtp_tunnel_decode(&d, stream_buf, 10, &f) == 10 && f == NULL);
  mtp_tunnel_dec_free(&d);
}

/* Pseudo-random garbage (fixed seed): the decoder returns frames or errors, never reads out of
 * bounds (ASan), never leaks. */
static void test_garbage(void) {
  uint32_t x = 0x12345678u;
  for (int round = 0; round < 2000; round++) {
    uint8_t buf[256];
    size_t len = 1 + (size_t)(round % (int)sizeof(buf));
    for (size_t i = 0; i < len; i++) {
      x ^= x << 13, x ^= x >> 17, x ^= x << 5;
      buf[i] = (uint8_t)x;
    }
    /* Half the rounds use a plausible length prefix so the body parser is reached. */
    if (round % 2 == 0 && len > 4) {
      buf[0] = buf[1] = 0;
      buf[2] = (uint8_t)((len - 4) >> 8);
      buf[3] = (uint8_t)(len - 4);
    }
    struct mtp_tunnel_dec d;
    mtp_tunnel_dec_init(&d);
    size_t off = 0;
    for (int guard = 0; off < len && guard < 1000; guard++) {
      Mtp__Frame *f = NULL;
      ssize_t n = mtp_tunnel_decode(&d, buf + off, len - off, &f);
      if (n < 0) {
        CHECK(n == MTP_EPROTO || n == MTP_ETOOBIG);
        break;
      }
      if (f != NULL)
        CHECK(mtp_tunnel_frame_check(f) == MTP_OK);
      mtp_tunnel_frame_free(f);
      off += (size_t)n;
    }
    mtp_tunnel_dec_free(&d);
  }
  CHECK(true); /* the loop above checked every step */
}

static void test_encoder_limits(void) {
  uint8_t small[8];
  CHECK(mtp_tunnel_encode(&samples[1], small, sizeof(small)) == MTP_AGAIN);
  Mtp__Frame none = MTP__FRAME__INIT;
  uint8_t buf[64];
  CHECK(mtp_tunnel_encode(&none, buf, sizeof(buf)) == MTP_EINVAL);
  CHECK(mtp_tunnel_frame_size(&none) == 0);
  /* A frame that breaks a field rule is not sent. */
  Mtp__Open bad = s_open;
  bad.ad_tag.len = 5;
  Mtp__Frame fb = MTP__FRAME__INIT;
  fb.msg_case = MTP__FRAME__MSG_OPEN;
  fb.open = &bad;
  CHECK(mtp_tunnel_encode(&fb, buf, sizeof(buf)) == MTP_EINVAL);
  fb.open = NULL;
  CHECK(mtp_tunnel_encode(&fb, buf, sizeof(buf)) == MTP_EINVAL);

  /* The largest MTProto packet fits in one frame and round-trips; a packet of
   * MTP_TUNNEL_MAX_FRAME bytes does not. */
  size_t cap = MTP_TUNNEL_MAX_FRAME + 64;
  uint8_t *big = malloc(cap), *out = malloc(cap);
  CHECK(big != NULL && out != NULL);
  for (size_t i = 0; i < cap; i++)
    big[i] = (uint8_t)(i ^ (i >> 8));
  Mtp__Data dd = MTP__DATA__INIT;
  dd.stream = 3;
  dd.packet.data = big;
  dd.packet.len = MTP_MAX_PACKET;
  Mtp__Frame fd = MTP__FRAME__INIT;
  fd.msg_case = MTP__FRAME__MSG_DATA;
  fd.data = &dd;
  ssize_t n = mtp_tunnel_encode(&fd, out, cap);
  CHECK(n > (ssize_t)MTP_MAX_PACKET && (size_t)n == mtp_tunnel_frame_size(&fd));
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  Mtp__Frame *f = NULL;
  /* In two pieces, so the body is collected in the decoder's buffer. */
  CHECK(mtp_tunnel_decode(&d, out, 1000, &f) == 1000 && f == NULL);
  CHECK(mtp_tunnel_decode(&d, out + 1000, (size_t)n - 1000, &f) == n - 1000 && f != NULL);
  CHECK(f->data->packet.len == MTP_MAX_PACKET && memcmp(f->data->packet.data, big, MTP_MAX_PACKET) == 0);
  mtp_tunnel_frame_free(f);
  mtp_tunnel_dec_free(&d);
  dd.packet.len = MTP_TUNNEL_MAX_FRAME;
  CHECK(mtp_tunnel_encode(&fd, out, cap) == MTP_ETOOBIG);
  CHECK(mtp_tunnel_frame_size(&fd) == 0);
  free(big);
  free(out);
}

/* Every allocation of a decode fails in turn: MTP_ENOMEM, no leak (ASan), and with enough
 * allocations the frame decodes. Split in two so the body buffer is allocated too. */
static void test_alloc_failures(void) {
  build_stream();
  size_t len = mtp_tunnel_frame_size(&samples[1]); /* open: several allocations */
  const uint8_t *frame = stream_buf + mtp_tunnel_frame_size(&samples[0]);
  bool ok = false;
  for (long k = 0; k < 50 && !ok; k++) {
    struct mtp_tunnel_dec d;
    mtp_tunnel_dec_init(&d);
    n_allocs = 0;
    fail_after = k;
    Mtp__Frame *f = NULL;
    ssize_t n = mtp_tunnel_decode(&d, frame, 6, &f);
    if (n >= 0)
      n = mtp_tunnel_decode(&d, frame + 6, len - 6, &f);
    fail_after = -1;
    if (n == MTP_ENOMEM) {
      CHECK(f == NULL);
    } else {
      CHECK(n == (ssize_t)(len - 6) && f != NULL && frame_eq(f, &samples[1]));
      mtp_tunnel_frame_free(f);
      ok = true;
      CHECK(k >= 2); /* at least the body buffer and the Frame */
    }
    mtp_tunnel_dec_free(&d);
  }
  CHECK(ok);
}

int main(void) {
  mtp_replace_allocator(t_malloc, t_realloc, t_calloc, free);
  setup_samples();
  test_roundtrip_each();
  test_splits();
  test_unknown_fields();
  test_errors();
  test_garbage();
  test_encoder_limits();
  test_alloc_failures();
  return check_report();
}
