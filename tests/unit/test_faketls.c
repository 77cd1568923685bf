/*
 * test_faketls.c - the fake-TLS codecs: ClientHello reader (every split), validation against
 * a secrets list, timestamp window, malformed input (run under ASan), the server's answer
 * checked by an independent mini-parser and HMAC, the record reader at every split, the
 * writer, and the client-side builder/verifier.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "err.h"
#include "faketls.h"

#include "check.h"

#define CHECK_EQ(a, b)                                                                          \
  do {                                                                                          \
    long long _a = (long long)(a), _b = (long long)(b);                                         \
    CHECK_MSG(_a == _b, "%s == %lld, expected %s == %lld", #a, _a, #b, _b);                     \
  } while (0)

static const uint8_t SECRETS[3][16] = {
    {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff},
    {0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef},
    {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
};
static const uint8_t OTHER_SECRET[16] = {9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9};

/* ---- an independent, test-side ClientHello builder with knobs for malformed variants ---- */

struct hb {
  const char *host; /* NULL: no server_name extension */
  size_t host_len;  /* 0: strlen(host) */
  int sid_len;      /* session id length */
  const uint16_t *suites;
  size_t nsuites;
  const uint16_t *groups; /* key_share entries */
  const uint16_t *glens;
  size_t nshares;
  const uint16_t *versions; /* supported_versions; NULL: none */
  size_t nversions;
  size_t pad; /* padding extension body length (0: none) */
  int dup_sni;
};

struct w {
  uint8_t *p;
  size_t n;
};
static void w8(struct w *w, unsigned v) { w->p[w->n++] = (uint8_t)v; }
static void w16(struct w *w, unsigned v) {
  w8(w, v >> 8);
  w8(w, v & 0xff);
}
static void wlen(struct w *w, size_t at, size_t width) {
  size_t v = w->n - at - width;
  for (size_t k = 0; k < width; k++)
    w->p[at + k] = (uint8_t)(v >> (8 * (width - 1 - k)));
}

static void put_sni(struct w *w, const struct hb *o) {
  size_t hl = o->host_len ? o->host_len : strlen(o->host);
  w16(w, 0x0000);
  w16(w, hl + 5);
  w16(w, hl + 3);
  w8(w, 0);
  w16(w, hl);
  memcpy(w->p + w->n, o->host, hl);
  w->n += hl;
}

/* Builds a hello signed with secret and ts; returns its length. out must hold 20000 bytes. */
static size_t build_hello(const struct hb *o, const uint8_t *secret, uint32_t ts, uint8_t *out) {
  struct w w = {out, 0};
  w8(&w, 0x16);
  w16(&w, 0x0301);
  w16(&w, 0);
  w8(&w, 1);
  w8(&w, 0);
  w16(&w, 0);
  w16(&w, 0x0303);
  memset(out + w.n, 0, 32);
  w.n += 32;
  w8(&w, (unsigned)o->sid_len);
  for (int i = 0; i < o->sid_len; i++)
    w8(&w, 0xa0 + (unsigned)i);
  w16(&w, 2 * o->nsuites);
  for (size_t i = 0; i < o->nsuites; i++)
    w16(&w, o->suites[i]);
  w8(&w, 1);
  w8(&w, 0);
  size_t ext = w.n;
  w16(&w, 0);
  w16(&w, 0x0a0a); /* GREASE extension */
  w16(&w, 0);
  if (o->host)
    put_sni(&w, o);
  if (o->host && o->dup_sni)
    put_sni(&w, o);
  if (o->nshares) {
    w16(&w, 0x0033);
    size_t at = w.n;
    w16(&w, 0);
    w16(&w, 0);
    w16(&w, 0x2a2a); /* GREASE share */
    w16(&w, 1);
    w8(&w, 0);
    for (size_t i = 0; i < o->nshares; i++) {
      w16(&w, o->groups[i]);
      w16(&w, o->glens[i]);
      for (size_t k = 0; k < o->glens[i]; k++)
        w8(&w, (unsigned)(k * 7 + 1));
    }
    wlen(&w, at + 2, 2);
    wlen(&w, at, 2);
  }
  if (o->versions) {
    w16(&w, 0x002b);
    w16(&w, 1 + 2 * o->nversions);
    w8(&w, 2 * o->nversions);
    for (size_t i = 0; i < o->nversions; i++)
      w16(&w, o->versions[i]);
  }
  if (o->pad) {
    w16(&w, 0x0015);
    w16(&w, o->pad);
    memset(out + w.n, 0, o->pad);
    w.n += o->pad;
  }
  wlen(&w, ext, 2);
  wlen(&w, 3, 2);
  wlen(&w, 6, 3);
  uint8_t d[32];
  mtp_hmac_sha256(secret, 16, out, w.n, d);
  for (int i = 0; i < 4; i++)
    d[28 + i] ^= (uint8_t)(ts >> (8 * i));
  memcpy(out + 11, d, 32);
  return w.n;
}

static const uint16_t SUITES_STD[] = {0x1a1a, 0x1301, 0x1302, 0x1303, 0xc02b};
static const uint16_t SUITES_1302_FIRST[] = {0x1302, 0x1301};
static const uint16_t SUITES_1303_ONLY[] = {0xc02b, 0x1303};
static const uint16_t SUITES_NO13[] = {0xc02b, 0xc02f};
static const uint16_t G_X25519[] = {MTP_TLS_GROUP_X25519};
static const uint16_t L_X25519[] = {32};
static const uint16_t G_PQ_ONLY[] = {MTP_TLS_GROUP_X25519MLKEM768};
static const uint16_t L_PQ_ONLY[] = {1216};
static const uint16_t G_P256[] = {MTP_TLS_GROUP_SECP256R1};
static const uint16_t L_P256[] = {65};
static const uint16_t G_UNKNOWN[] = {0x0100};
static const uint16_t L_UNKNOWN[] = {256};
static const uint16_t V_13[] = {0x3a3a, 0x0304, 0x0303};
static const uint16_t V_12[] = {0x0303};

static struct hb hb_default(void) {
  struct hb o = {0};
  o.host = "www.example.com";
  o.sid_len = 32;
  o.suites = SUITES_STD;
  o.nsuites = 5;
  o.groups = G_X25519;
  o.glens = L_X25519;
  o.nshares = 1;
  o.versions = V_13;
  o.nversions = 3;
  o.pad = 100;
  return o;
}

static uint8_t buf[40000], buf2[40000], buf3[40000];

/* Feeds data split at the given points (sorted, within len); returns the final result. */
static int feed_split(struct mtp_faketls_hello_reader *r, const uint8_t *data, size_t len,
                      size_t split) {
  int rc = mtp_faketls_hello_feed(r, data, split);
  if (rc != MTP_AGAIN)
    return rc;
  rc = mtp_faketls_hello_feed(r, data + split, len - split);
  return rc >= 0 ? (int)split + rc : rc;
}

static void test_reader_splits(void) {
  struct hb o = hb_default();
  size_t n = build_hello(&o, SECRETS[0], 1000, buf);
  size_t extra = 100;
  memcpy(buf2, buf, n);
  for (size_t i = 0; i < extra; i++)
    buf2[n + i] = 0x17;
  size_t total = n + extra;

  struct mtp_faketls_hello ref;
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &ref), MTP_OK);
  CHECK_EQ(ref.sni_len, 15);
  CHECK(strcmp(ref.sni, "www.example.com") == 0);
  CHECK(memcmp(ref.random, buf + 11, 32) == 0);
  CHECK(memcmp(ref.session_id, buf + 44, 32) == 0);
  CHECK_EQ(ref.suite, 0x1301);
  CHECK_EQ(ref.group, MTP_TLS_GROUP_X25519);
  CHECK_EQ(ref.server_share_len, 32);
  CHECK_EQ(ref.nshares, 1); /* GREASE share skipped */
  CHECK_EQ(ref.cipher_suites_len, 10);
  CHECK(ref.has_tls13);

  /* whole (with extra bytes behind it) */
  struct mtp_faketls_hello_reader r;
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, buf2, total), (int)n);
  CHECK_EQ(r.state, MTP_FAKETLS_HELLO_DONE);
  CHECK(memcmp(r.hello.session_id, ref.session_id, 32) == 0);
  CHECK_EQ(mtp_faketls_hello_feed(&r, buf2, 5), 0);
  mtp_faketls_hello_free(&r);
  mtp_faketls_hello_free(&r); /* idempotent */

  /* byte by byte */
  mtp_faketls_hello_init(&r);
  int rc = MTP_AGAIN;
  size_t pos = 0;
  while (rc == MTP_AGAIN && pos < total) {
    rc = mtp_faketls_hello_feed(&r, buf2 + pos, 1);
    pos++;
  }
  CHECK_EQ(rc, 1);
  CHECK_EQ(pos, n);
  CHECK(strcmp(r.hello.sni, ref.sni) == 0);
  size_t have = 0;
  const uint8_t *b = mtp_faketls_hello_bytes(&r, &have);
  CHECK_EQ(have, n);
  CHECK(memcmp(b, buf, n) == 0);
  mtp_faketls_hello_free(&r);

  /* every split point */
  for (size_t s = 0; s <= total; s++) {
    mtp_faketls_hello_init(&r);
    rc = feed_split(&r, buf2, total, s);
    CHECK_EQ(rc, (int)n);
    CHECK(memcmp(r.hello.random, ref.random, 32) == 0);
    CHECK_EQ(r.hello.group, ref.group);
    struct mtp_faketls_match m;
    CHECK_EQ(mtp_faketls_hello_validate(&r.hello, SECRETS, 3, &m), MTP_OK);
    CHECK_EQ(m.timestamp, 1000);
    mtp_faketls_hello_free(&r);
  }
}

static void test_validate(void) {
  struct hb o = hb_default();
  struct mtp_faketls_hello h;
  struct mtp_faketls_match m;
  for (int s = 0; s < 3; s++) {
    size_t n = build_hello(&o, SECRETS[s], 0x5f5e1234u + (uint32_t)s, buf);
    CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
    CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 3, &m), MTP_OK);
    CHECK_EQ(m.secret_index, s);
    CHECK_EQ(m.timestamp, 0x5f5e1234u + (uint32_t)s);
    /* only the secrets before it: no match */
    CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, (size_t)s, &m), MTP_EBADSECRET);
  }
  /* wrong secret */
  size_t n = build_hello(&o, OTHER_SECRET, 77, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 3, &m), MTP_EBADSECRET);
  /* the same secret twice: the first index wins */
  uint8_t twice[3][16];
  memcpy(twice[0], OTHER_SECRET, 16);
  memcpy(twice[1], SECRETS[1], 16);
  memcpy(twice[2], SECRETS[1], 16);
  n = build_hello(&o, SECRETS[1], 77, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(mtp_faketls_hello_validate(&h, (const uint8_t(*)[16])twice, 3, &m), MTP_OK);
  CHECK_EQ(m.secret_index, 1);

  /* any change to the authenticated part breaks it: each of the first 28 random bytes, the
   * session id, the padding */
  for (size_t i = 11; i < 11 + 28; i++) {
    n = build_hello(&o, SECRETS[0], 5, buf);
    buf[i] ^= 0x01;
    CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
    CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 1, &m), MTP_EBADSECRET);
  }
  n = build_hello(&o, SECRETS[0], 5, buf);
  buf[50] ^= 0x80; /* session id */
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 1, &m), MTP_EBADSECRET);
  n = build_hello(&o, SECRETS[0], 5, buf);
  buf[n - 1] ^= 0x01; /* padding */
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 1, &m), MTP_EBADSECRET);
  /* the last 4 random bytes only carry the time */
  n = build_hello(&o, SECRETS[0], 5, buf);
  buf[11 + 28] ^= 0x02;
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 1, &m), MTP_OK);
  CHECK_EQ(m.timestamp, 7);
  /* no secrets at all */
  CHECK_EQ(mtp_faketls_hello_validate(&h, SECRETS, 0, &m), MTP_EBADSECRET);
}

static void test_time_window(void) {
  CHECK(mtp_faketls_time_is_ok(400, 1000, 600, 3));
  CHECK(!mtp_faketls_time_is_ok(399, 1000, 600, 3));
  CHECK(mtp_faketls_time_is_ok(1003, 1000, 600, 3));
  CHECK(!mtp_faketls_time_is_ok(1004, 1000, 600, 3));
  CHECK(mtp_faketls_time_is_ok(1000, 1000, 0, 0));
  CHECK(!mtp_faketls_time_is_ok(999, 1000, 0, 0));
  CHECK(mtp_faketls_time_is_ok(0, 5, 600, 3)); /* no underflow */
  CHECK(mtp_faketls_time_is_ok(0xffffffffu, 0xfffffffeull, 5, 5));
  CHECK(!mtp_faketls_time_is_ok(0, 0xffffffffull, 5, 5)); /* no wrap-around */
  CHECK(!mtp_faketls_time_is_ok(0xffffffffu, 10, 5, 5));
}

static void test_parse_variants(void) {
  struct mtp_faketls_hello h;
  struct hb o;
  size_t n;

  o = hb_default();
  o.host = NULL;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO); /* missing SNI */

  o = hb_default();
  o.host = "bad\0host";
  o.host_len = 8;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO); /* NUL in SNI */

  o = hb_default();
  o.dup_sni = 1;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);

  o = hb_default();
  o.versions = V_12;
  o.nversions = 1;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO); /* no TLS 1.3 */
  o.versions = NULL;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);

  o = hb_default();
  o.sid_len = 0;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);
  o.sid_len = 16;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);

  o = hb_default();
  o.suites = SUITES_NO13;
  o.nsuites = 2;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);
  o.suites = SUITES_1302_FIRST;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(h.suite, 0x1301);
  o.suites = SUITES_1303_ONLY;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(h.suite, 0x1303);

  o = hb_default();
  o.groups = G_UNKNOWN;
  o.glens = L_UNKNOWN;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO); /* nothing we can answer */
  o.nshares = 0;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_EPROTO);

  o = hb_default();
  o.groups = G_PQ_ONLY;
  o.glens = L_PQ_ONLY;
  o.pad = 0;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(h.group, MTP_TLS_GROUP_X25519MLKEM768);
  CHECK_EQ(h.server_share_len, 1120);

  o = hb_default();
  o.groups = G_P256;
  o.glens = L_P256;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  CHECK_EQ(h.group, MTP_TLS_GROUP_SECP256R1);
  CHECK_EQ(h.server_share_len, 65);

  /* large hellos: close to the record limit is fine, beyond it is ETOOBIG */
  o = hb_default();
  o.pad = 16000;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK(n > 16000);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  struct mtp_faketls_hello_reader r;
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, buf, n), (int)n);
  mtp_faketls_hello_free(&r);
  o.pad = 16700;
  n = build_hello(&o, SECRETS[0], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_ETOOBIG);
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, buf, 5), MTP_ETOOBIG);
  CHECK_EQ(r.state, MTP_FAKETLS_HELLO_FAILED);
  CHECK_EQ(mtp_faketls_hello_feed(&r, buf + 5, 5), MTP_EPROTO);
  mtp_faketls_hello_free(&r);

  /* not TLS at all: fails on the first byte, having kept nothing */
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, (const uint8_t *)"GET / HTTP/1.1\r\n", 16), MTP_EPROTO);
  size_t have = 99;
  mtp_faketls_hello_bytes(&r, &have);
  CHECK_EQ(have, 0);
  mtp_faketls_hello_free(&r);
  /* wrong record version, after two good bytes fed earlier */
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, (const uint8_t *)"\x16\x03", 2), MTP_AGAIN);
  CHECK_EQ(mtp_faketls_hello_feed(&r, (const uint8_t *)"\x03\x02\x00", 3), MTP_EPROTO);
  mtp_faketls_hello_bytes(&r, &have);
  CHECK_EQ(have, 2);
  mtp_faketls_hello_free(&r);
  /* tiny declared length */
  mtp_faketls_hello_init(&r);
  CHECK_EQ(mtp_faketls_hello_feed(&r, (const uint8_t *)"\x16\x03\x01\x00\x10", 5), MTP_EPROTO);
  mtp_faketls_hello_free(&r);

  /* record shorter / longer than declared */
  o = hb_default();
  n = build_hello(&o, SECRETS[0], 1, buf);
  for (size_t k = 0; k < n; k++)
    CHECK(mtp_faketls_hello_parse(buf, k, &h) < 0);
  CHECK(mtp_faketls_hello_parse(buf, n + 1, &h) < 0);
  CHECK(mtp_faketls_hello_parse(NULL, 0, &h) < 0);

  /* every byte mutated a few ways: never crashes (ASan), never reads out of bounds. Parse a
   * heap copy of exactly n bytes so any overread is caught. */
  uint8_t *exact = malloc(n);
  CHECK(exact != NULL);
  int ok = 0, bad = 0;
  for (size_t i = 0; i < n; i++) {
    static const int deltas[] = {1, -1, 0x80, 0xff};
    for (size_t d = 0; d < 4; d++) {
      memcpy(exact, buf, n);
      exact[i] = (uint8_t)(exact[i] + deltas[d]);
      int rc = mtp_faketls_hello_parse(exact, n, &h);
      CHECK(rc == MTP_OK || rc == MTP_EPROTO || rc == MTP_ETOOBIG);
      if (rc == MTP_OK) {
        ok++;
        CHECK(h.sni_len > 0 && h.sni_len <= 255 && h.server_share_len > 0);
      } else {
        bad++;
      }
    }
  }
  CHECK(ok > 0 && bad > 0);
  free(exact);
}

/* ---- independent mini-parser for the server's answer ---- */

static unsigned be16(const uint8_t *p) { return ((unsigned)p[0] << 8) | p[1]; }

struct answer {
  unsigned suite, group, share_len, version;
  int order_keyshare_first;
  size_t hello_rec_len, appdata_len, total;
};

static void parse_answer(const uint8_t *a, size_t len, const struct mtp_faketls_hello *ch,
                         const uint8_t secret[16], struct answer *out) {
  memset(out, 0, sizeof *out);
  CHECK(len > 5);
  CHECK(a[0] == 0x16 && a[1] == 0x03 && a[2] == 0x03);
  size_t l1 = be16(a + 3);
  CHECK(5 + l1 <= len);
  const uint8_t *p = a + 5;
  CHECK_EQ(p[0], 0x02);
  CHECK_EQ(((size_t)p[1] << 16) | be16(p + 2), l1 - 4);
  CHECK_EQ(be16(p + 4), 0x0303);
  CHECK_EQ(p[38], 32);
  CHECK(memcmp(p + 39, ch->session_id, 32) == 0); /* session id echoed */
  out->suite = be16(p + 71);
  CHECK_EQ(p[73], 0); /* compression */
  size_t el = be16(p + 74);
  CHECK_EQ(76 + el, l1);
  const uint8_t *e = p + 76, *end = p + 76 + el;
  int idx = 0;
  while (e < end) {
    CHECK(end - e >= 4);
    unsigned t = be16(e), l = be16(e + 2);
    CHECK((size_t)(end - e) >= 4 + l);
    if (t == 0x0033) {
      out->order_keyshare_first = idx == 0;
      out->group = be16(e + 4);
      out->share_len = be16(e + 6);
      CHECK_EQ(l, 4 + out->share_len);
    } else if (t == 0x002b) {
      CHECK_EQ(l, 2);
      out->version = be16(e + 4);
    } else {
      CHECK(0 && "unexpected extension");
    }
    idx++;
    e += 4 + l;
  }
  CHECK_EQ(idx, 2);
  out->hello_rec_len = 5 + l1;
  const uint8_t *c = a + out->hello_rec_len;
  CHECK(out->hello_rec_len + 6 + 5 <= len);
  CHECK(memcmp(c, "\x14\x03\x03\x00\x01\x01", 6) == 0);
  const uint8_t *d = c + 6;
  CHECK(d[0] == 0x17 && d[1] == 0x03 && d[2] == 0x03);
  out->appdata_len = be16(d + 3);
  out->total = out->hello_rec_len + 6 + 5 + out->appdata_len;
  CHECK_EQ(out->total, len);
  /* server random = HMAC(secret, client_random || answer with random zeroed) */
  uint8_t *tmp = malloc(32 + len);
  CHECK(tmp != NULL);
  memcpy(tmp, ch->random, 32);
  memcpy(tmp + 32, a, len);
  memset(tmp + 32 + 11, 0, 32);
  uint8_t mac[32];
  mtp_hmac_sha256(secret, 16, tmp, 32 + len, mac);
  free(tmp);
  CHECK(memcmp(mac, a + 11, 32) == 0);
}

static void test_server_hello(void) {
  struct hb o = hb_default();
  size_t n = build_hello(&o, SECRETS[1], 1, buf);
  struct mtp_faketls_hello h;
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);

  static const size_t sizes[] = {1, 2, 1000, 2878, 4096, 16384};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    for (int rev = 0; rev < 2; rev++) {
      struct mtp_faketls_answer_opts opts = {sizes[i], rev != 0};
      size_t want = mtp_faketls_server_hello_len(&h, &opts);
      int rc = mtp_faketls_server_hello(&h, SECRETS[1], &opts, buf2, sizeof buf2);
      CHECK_EQ(rc, (int)want);
      struct answer an;
      parse_answer(buf2, (size_t)rc, &h, SECRETS[1], &an);
      CHECK_EQ(an.suite, 0x1301);
      CHECK_EQ(an.group, MTP_TLS_GROUP_X25519);
      CHECK_EQ(an.share_len, 32);
      CHECK_EQ(an.version, 0x0304);
      CHECK_EQ(an.appdata_len, sizes[i]);
      CHECK_EQ(an.order_keyshare_first, !rev);
      CHECK_EQ(an.hello_rec_len, 127); /* the classic x25519 ServerHello size */
      /* client-side verifier agrees, and needs all of it */
      CHECK_EQ(mtp_faketls_answer_check(SECRETS[1], h.random, buf2, (size_t)rc), rc);
      CHECK_EQ(mtp_faketls_answer_check(SECRETS[0], h.random, buf2, (size_t)rc), MTP_EBADSECRET);
      if (sizes[i] <= 1000)
        for (size_t k = 0; k < (size_t)rc; k++)
          CHECK_EQ(mtp_faketls_answer_check(SECRETS[1], h.random, buf2, k), MTP_AGAIN);
      /* cap one short */
      CHECK_EQ(mtp_faketls_server_hello(&h, SECRETS[1], &opts, buf2, want - 1), MTP_EINVAL);
    }
  }
  struct mtp_faketls_answer_opts bad0 = {0, false}, bad1 = {16385, false};
  CHECK_EQ(mtp_faketls_server_hello(&h, SECRETS[1], &bad0, buf2, sizeof buf2), MTP_EINVAL);
  CHECK_EQ(mtp_faketls_server_hello(&h, SECRETS[1], &bad1, buf2, sizeof buf2), MTP_EINVAL);

  /* two answers differ in their randomness (share, server random, payload) */
  struct mtp_faketls_answer_opts opts = {64, false};
  int r1 = mtp_faketls_server_hello(&h, SECRETS[1], &opts, buf2, sizeof buf2);
  int r2 = mtp_faketls_server_hello(&h, SECRETS[1], &opts, buf3, sizeof buf3);
  CHECK(r1 == r2 && r1 > 0);
  CHECK(memcmp(buf2 + 89, buf3 + 89, 32) != 0); /* the x25519 key (offset 81 + 8) */

  /* a client that only offered X25519MLKEM768: same group, 1120-byte share */
  o = hb_default();
  o.groups = G_PQ_ONLY;
  o.glens = L_PQ_ONLY;
  o.suites = SUITES_1303_ONLY;
  o.nsuites = 2;
  n = build_hello(&o, SECRETS[2], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  struct mtp_faketls_answer_opts o2 = {3000, false};
  int rc = mtp_faketls_server_hello(&h, SECRETS[2], &o2, buf2, sizeof buf2);
  CHECK_EQ(rc, (int)mtp_faketls_server_hello_len(&h, &o2));
  struct answer an;
  parse_answer(buf2, (size_t)rc, &h, SECRETS[2], &an);
  CHECK_EQ(an.group, MTP_TLS_GROUP_X25519MLKEM768);
  CHECK_EQ(an.share_len, 1120);
  CHECK_EQ(an.suite, 0x1303);

  /* P-256: a real uncompressed point */
  o = hb_default();
  o.groups = G_P256;
  o.glens = L_P256;
  n = build_hello(&o, SECRETS[2], 1, buf);
  CHECK_EQ(mtp_faketls_hello_parse(buf, n, &h), MTP_OK);
  rc = mtp_faketls_server_hello(&h, SECRETS[2], &o2, buf2, sizeof buf2);
  parse_answer(buf2, (size_t)rc, &h, SECRETS[2], &an);
  CHECK_EQ(an.share_len, 65);
  CHECK_EQ(buf2[5 + 76 + 8], 0x04);
}

/* ---- client side ---- */

static void test_client_hello(void) {
  for (int kind = 0; kind < 2; kind++) {
    uint8_t out[MTP_FAKETLS_CLIENT_HELLO_MAX];
    int n = mtp_faketls_client_hello(SECRETS[2], "cdn.example.org", 1700000000u,
                                     (enum mtp_faketls_hello_kind)kind, out, sizeof out);
    CHECK(n > 0);
    if (kind == MTP_FAKETLS_KIND_CLASSIC)
      CHECK_EQ(n, 517);
    else
      CHECK(n > 1216 + 300);
    struct mtp_faketls_hello_reader r;
    mtp_faketls_hello_init(&r);
    int rc = MTP_AGAIN;
    for (int i = 0; i < n && rc == MTP_AGAIN; i++)
      rc = mtp_faketls_hello_feed(&r, out + i, 1);
    CHECK_EQ(rc, 1);
    CHECK(strcmp(r.hello.sni, "cdn.example.org") == 0);
    CHECK_EQ(r.hello.group, MTP_TLS_GROUP_X25519);
    CHECK_EQ(r.hello.suite, 0x1301);
    if (kind == MTP_FAKETLS_KIND_PQ) {
      CHECK_EQ(r.hello.nshares, 2);
      CHECK_EQ(r.hello.share_group[0], MTP_TLS_GROUP_X25519MLKEM768);
      CHECK_EQ(r.hello.share_len[0], 1216);
      CHECK_EQ(r.hello.share_group[1], MTP_TLS_GROUP_X25519);
    } else {
      CHECK_EQ(r.hello.nshares, 1);
    }
    struct mtp_faketls_match m;
    CHECK_EQ(mtp_faketls_hello_validate(&r.hello, SECRETS, 3, &m), MTP_OK);
    CHECK_EQ(m.secret_index, 2);
    CHECK_EQ(m.timestamp, 1700000000u);
    CHECK(mtp_faketls_time_is_ok(m.timestamp, 1700000100u, 600, 3));
    /* independent HMAC check of the random */
    memcpy(buf, out, (size_t)n);
    memset(buf + 11, 0, 32);
    uint8_t mac[32];
    mtp_hmac_sha256(SECRETS[2], 16, buf, (size_t)n, mac);
    CHECK(memcmp(mac, out + 11, 28) == 0);

    struct mtp_faketls_answer_opts opts = {2500, false};
    int a = mtp_faketls_server_hello(&r.hello, SECRETS[2], &opts, buf2, sizeof buf2);
    CHECK(a > 0);
    /* the server's first data records follow right behind the answer */
    size_t w = mtp_faketls_wrap((const uint8_t *)"hello", 5, 0, buf2 + a);
    CHECK_EQ(mtp_faketls_answer_check(SECRETS[2], out + 11, buf2, (size_t)a + w), a);
    mtp_faketls_hello_free(&r);
  }
  uint8_t small[100];
  CHECK_EQ(mtp_faketls_client_hello(SECRETS[0], "x.org", 1, MTP_FAKETLS_KIND_CLASSIC, small, sizeof small),
           MTP_EINVAL);
  uint8_t out[MTP_FAKETLS_CLIENT_HELLO_MAX];
  CHECK_EQ(mtp_faketls_client_hello(SECRETS[0], "", 1, MTP_FAKETLS_KIND_CLASSIC, out, sizeof out), MTP_EINVAL);
}

/* ---- record layer ---- */

static size_t make_stream(uint8_t *s, uint8_t *payload, size_t *plen) {
  static const size_t sizes[] = {64, 0, 1, 16384, MTP_FAKETLS_MAX_RECORD_PAYLOAD, 3, 517};
  size_t n = 0, p = 0;
  memcpy(s, "\x14\x03\x03\x00\x01\x01", 6);
  n = 6;
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    s[n++] = 0x17;
    s[n++] = 0x03;
    s[n++] = 0x03;
    s[n++] = (uint8_t)(sizes[i] >> 8);
    s[n++] = (uint8_t)sizes[i];
    for (size_t k = 0; k < sizes[i]; k++) {
      uint8_t v = (uint8_t)(p * 31 + 7);
      s[n++] = v;
      payload[p++] = v;
    }
  }
  *plen = p;
  return n;
}

static void test_rx(void) {
  static uint8_t stream[40000], payload[40000], out[40000];
  size_t plen;
  size_t n = make_stream(stream, payload, &plen);
  struct mtp_faketls_rx r;
  size_t ol;

  /* whole, byte by byte, every split of two */
  mtp_faketls_rx_init(&r);
  CHECK_EQ(mtp_faketls_rx_feed(&r, stream, n, out, &ol), (int)n);
  CHECK_EQ(ol, plen);
  CHECK(memcmp(out, payload, plen) == 0);
  CHECK(mtp_faketls_rx_is_idle(&r));

  mtp_faketls_rx_init(&r);
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    CHECK_EQ(mtp_faketls_rx_feed(&r, stream + i, 1, out + total, &ol), 1);
    total += ol;
  }
  CHECK_EQ(total, plen);
  CHECK(memcmp(out, payload, plen) == 0);

  for (size_t s = 0; s <= n; s += (s < 200 || n - s < 200) ? 1 : 97) {
    mtp_faketls_rx_init(&r);
    size_t o1, o2;
    CHECK_EQ(mtp_faketls_rx_feed(&r, stream, s, out, &o1), (int)s);
    CHECK_EQ(mtp_faketls_rx_feed(&r, stream + s, n - s, out + o1, &o2), (int)(n - s));
    CHECK_EQ(o1 + o2, plen);
    CHECK(memcmp(out, payload, plen) == 0);
  }
  /* every split point over a short stream */
  {
    static uint8_t s2[200], p2[200];
    size_t k = 0, pk = 0;
    memcpy(s2, "\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x05" "abcde" "\x17\x03\x03\x00\x00"
               "\x17\x03\x03\x00\x03" "xyz", 6 + 10 + 5 + 8);
    k = 29;
    memcpy(p2, "abcdexyz", 8);
    pk = 8;
    for (size_t s = 0; s <= k; s++) {
      for (size_t t = s; t <= k; t++) {
        mtp_faketls_rx_init(&r);
        size_t a, b, c;
        CHECK_EQ(mtp_faketls_rx_feed(&r, s2, s, out, &a), (int)s);
        CHECK_EQ(mtp_faketls_rx_feed(&r, s2 + s, t - s, out + a, &b), (int)(t - s));
        CHECK_EQ(mtp_faketls_rx_feed(&r, s2 + t, k - t, out + a + b, &c), (int)(k - t));
        CHECK_EQ(a + b + c, pk);
        CHECK(memcmp(out, p2, pk) == 0);
        CHECK(mtp_faketls_rx_is_idle(&r));
      }
    }
  }

  /* in place */
  memcpy(buf3, stream, n);
  mtp_faketls_rx_init(&r);
  CHECK_EQ(mtp_faketls_rx_feed(&r, buf3, n, buf3, &ol), (int)n);
  CHECK_EQ(ol, plen);
  CHECK(memcmp(buf3, payload, plen) == 0);

  /* no CCS at all is fine */
  mtp_faketls_rx_init(&r);
  CHECK_EQ(mtp_faketls_rx_feed(&r, (const uint8_t *)"\x17\x03\x03\x00\x02hi", 7, out, &ol), 7);
  CHECK_EQ(ol, 2);
  CHECK(mtp_faketls_rx_is_idle(&r));
  mtp_faketls_rx_init(&r);
  CHECK_EQ(mtp_faketls_rx_feed(&r, (const uint8_t *)"\x17\x03\x03\x00\x02h", 6, out, &ol), 6);
  CHECK(!mtp_faketls_rx_is_idle(&r));

  /* errors */
  struct {
    const char *bytes;
    size_t len;
    int err;
  } bad[] = {
      {"\x14\x03\x03\x00\x01\x01\x14\x03\x03\x00\x01\x01", 12, MTP_EPROTO}, /* second CCS */
      {"\x17\x03\x03\x00\x00\x14\x03\x03\x00\x01\x01", 11, MTP_EPROTO},     /* CCS after data */
      {"\x14\x03\x03\x00\x01\x02", 6, MTP_EPROTO},                         /* CCS body != 1 */
      {"\x14\x03\x03\x00\x02\x01\x01", 7, MTP_EPROTO},                     /* CCS length != 1 */
      {"\x15\x03\x03\x00\x02\x02\x28", 7, MTP_EPROTO},                     /* alert */
      {"\x16\x03\x03\x00\x01\x00", 6, MTP_EPROTO},                         /* handshake */
      {"\x17\x03\x01\x00\x01\x00", 6, MTP_EPROTO},                         /* version */
      {"\x17\x03\x03\x41\x01", 5, MTP_ETOOBIG},                             /* 16641 */
      {"\x17\x03\x03\xff\xff", 5, MTP_ETOOBIG},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    mtp_faketls_rx_init(&r);
    ol = 99;
    CHECK_EQ(mtp_faketls_rx_feed(&r, (const uint8_t *)bad[i].bytes, bad[i].len, out, &ol), bad[i].err);
    CHECK_EQ(ol, 0);
    CHECK_EQ(r.state, MTP_FAKETLS_RX_FAILED);
    CHECK_EQ(mtp_faketls_rx_feed(&r, (const uint8_t *)"\x17", 1, out, &ol), MTP_EPROTO);
    /* byte by byte gives the same error */
    mtp_faketls_rx_init(&r);
    int rc = 0;
    for (size_t k = 0; k < bad[i].len && rc >= 0; k++)
      rc = mtp_faketls_rx_feed(&r, (const uint8_t *)bad[i].bytes + k, 1, out, &ol);
    CHECK_EQ(rc, bad[i].err);
  }
  /* the largest legal record is accepted */
  mtp_faketls_rx_init(&r);
  CHECK_EQ(mtp_faketls_rx_feed(&r, (const uint8_t *)"\x17\x03\x03\x41\x00", 5, out, &ol), 5);
}

static void test_wrap(void) {
  static uint8_t in[70000], w[80000], back[80000];
  for (size_t i = 0; i < sizeof in; i++)
    in[i] = (uint8_t)(i ^ (i >> 8));
  static const size_t ns[] = {0, 1, 999, 1000, 1001, 2500, 16384, 16385, 70000};
  static const size_t ms[] = {1, 1000, 1400, 16384, 0, 100000};
  for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++) {
    for (size_t b = 0; b < sizeof ms / sizeof ms[0]; b++) {
      size_t n = ns[a], m = ms[b];
      if (m == 1 && n > 2500)
        continue;
      size_t wl = mtp_faketls_wrap_len(n, m);
      CHECK_EQ(mtp_faketls_wrap(in, n, m, w), wl);
      size_t eff = (m == 0 || m > MTP_FAKETLS_MAX_RECORD_PAYLOAD) ? 16384 : m;
      CHECK_EQ(wl, n + 5 * ((n + eff - 1) / eff));
      /* every record is at most eff bytes; the reader gets the bytes back */
      for (size_t p = 0; p < wl;) {
        CHECK(w[p] == 0x17 && w[p + 1] == 3 && w[p + 2] == 3);
        size_t l = be16(w + p + 3);
        CHECK(l >= 1 && l <= eff);
        p += 5 + l;
        CHECK(p <= wl);
      }
      struct mtp_faketls_rx r;
      mtp_faketls_rx_init(&r);
      size_t ol;
      CHECK_EQ(mtp_faketls_rx_feed(&r, w, wl, back, &ol), (int)wl);
      CHECK_EQ(ol, n);
      CHECK(n == 0 || memcmp(back, in, n) == 0);
    }
  }
}

/* Per-SNI derived secrets: vectors computed independently with Python's hashlib as
 * sha256((salt + secret_hex + sni).encode()).hexdigest()[:32], the one-liner mtproto_proxy's
 * README gives for its derive_sni_secret (lower-case hex of the base secret). */
static void test_derive(void) {
  static const struct {
    const char *salt, *base_hex, *domain, *want_hex;
  } v[] = {
      {"my-private-salt-change-me", "d0d6e111bada5511fcce9584deadbeef", "alice.example.com",
       "af4d5729ce2a0de4a40bbf439ac9d515"},
      {"mtproto-proxy-per-sni-v1", "00112233445566778899aabbccddeeff", "www.google.com",
       "2df29e791a82e379d3590ab733da887c"},
      {"", "ffffffffffffffffffffffffffffffff", "a", "0313777935ede94929e1118427ead2e9"},
      /* the domain is lower-cased first (our contract; the SNI check is case-insensitive) */
      {"my-private-salt-change-me", "d0d6e111bada5511fcce9584deadbeef", "Alice.EXAMPLE.com",
       "af4d5729ce2a0de4a40bbf439ac9d515"},
  };
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    uint8_t base[16], want[16], got[16];
    CHECK_EQ(mtp_hex_decode(v[i].base_hex, base, sizeof base), 16);
    CHECK_EQ(mtp_hex_decode(v[i].want_hex, want, sizeof want), 16);
    mtp_faketls_derive_secret(base, v[i].salt, v[i].domain, got);
    CHECK(memcmp(got, want, 16) == 0);
  }
  /* A long domain crosses the internal 64-byte pieces. */
  char dom[200];
  for (size_t i = 0; i < sizeof dom - 1; i++)
    dom[i] = (char)('a' + i % 26);
  dom[sizeof dom - 1] = '\0';
  uint8_t base[16], want[16], got[16];
  memset(base, 0x5a, sizeof base);
  CHECK_EQ(mtp_hex_decode("1bf9b66f2c66d7d843ecd4dda30d355b", want, sizeof want), 16);
  mtp_faketls_derive_secret(base, "s", dom, got);
  CHECK(memcmp(got, want, 16) == 0);
}

int main(void) {
  test_reader_splits();
  test_validate();
  test_time_window();
  test_parse_variants();
  test_server_hello();
  test_client_hello();
  test_rx();
  test_wrap();
  test_derive();
  return check_report();
}
