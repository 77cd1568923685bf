/*
 * faketls.c - the fake-TLS ("ee") codecs: ClientHello reader and validation, the server's
 * answer, the ApplicationData record layer, and a client side for tests. See faketls.h.
 */
#include "faketls.h"

#include <string.h>

#include <mbedtls/bignum.h>
#include <mbedtls/ecp.h>
#include <mbedtls/sha256.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "banned.h"

/* The smallest ClientHello payload we bother to buffer: handshake header, version, random,
 * session id, one cipher suite, one compression method, an extensions length. */
#define MIN_HELLO_PAYLOAD (4 + 2 + 32 + 1 + 32 + 2 + 2 + 1 + 1 + 2)

/* ---------------------------------------------------------------------------------------- */
/* HMAC-SHA256 over several pieces, allocation-free (the key is 16 bytes, below the block). */

struct hmac {
  mbedtls_sha256_context inner;
  uint8_t okey[64];
};

static void hmac_start(struct hmac *h, const uint8_t key[16]) {
  uint8_t ikey[64];
  memset(ikey, 0x36, sizeof ikey);
  memset(h->okey, 0x5c, sizeof h->okey);
  for (int i = 0; i < 16; i++) {
    ikey[i] ^= key[i];
    h->okey[i] ^= key[i];
  }
  mbedtls_sha256_init(&h->inner);
  mbedtls_sha256_starts_ret(&h->inner, 0);
  mbedtls_sha256_update_ret(&h->inner, ikey, sizeof ikey);
  mtp_wipe(ikey, sizeof ikey);
}

static void hmac_update(struct hmac *h, const void *data, size_t len) {
  mbedtls_sha256_update_ret(&h->inner, data, len);
}

static void hmac_finish(struct hmac *h, uint8_t out[32]) {
  uint8_t ihash[32];
  mbedtls_sha256_finish_ret(&h->inner, ihash);
  mbedtls_sha256_free(&h->inner);
  mbedtls_sha256_context outer;
  mbedtls_sha256_init(&outer);
  mbedtls_sha256_starts_ret(&outer, 0);
  mbedtls_sha256_update_ret(&outer, h->okey, sizeof h->okey);
  mbedtls_sha256_update_ret(&outer, ihash, sizeof ihash);
  mbedtls_sha256_finish_ret(&outer, out);
  mbedtls_sha256_free(&outer);
  mtp_wipe(h->okey, sizeof h->okey);
}

/* HMAC(key, prefix || buf[0..len) with buf[off..off+32) read as zeros). prefix may be NULL. */
static void hmac_zeroed(const uint8_t key[16], const uint8_t *prefix, size_t plen, const uint8_t *buf,
                        size_t len, size_t off, uint8_t out[32]) {
  static const uint8_t zeros[MTP_FAKETLS_RANDOM_LEN];
  struct hmac h;
  hmac_start(&h, key);
  if (prefix != NULL)
    hmac_update(&h, prefix, plen);
  hmac_update(&h, buf, off);
  hmac_update(&h, zeros, sizeof zeros);
  hmac_update(&h, buf + off + MTP_FAKETLS_RANDOM_LEN, len - off - MTP_FAKETLS_RANDOM_LEN);
  hmac_finish(&h, out);
}

/* ---------------------------------------------------------------------------------------- */
/* A bounds-checked reader over a byte range. Every get fails once and stays failed. */

struct cur {
  const uint8_t *p;
  const uint8_t *end;
  bool bad;
};

static size_t cur_left(const struct cur *c) { return c->bad ? 0 : (size_t)(c->end - c->p); }

static bool cur_need(struct cur *c, size_t n) {
  if (c->bad || (size_t)(c->end - c->p) < n) {
    c->bad = true;
    return false;
  }
  return true;
}

static unsigned get8(struct cur *c) {
  if (!cur_need(c, 1))
    return 0;
  return *c->p++;
}

static unsigned get16(struct cur *c) {
  if (!cur_need(c, 2))
    return 0;
  unsigned v = ((unsigned)c->p[0] << 8) | c->p[1];
  c->p += 2;
  return v;
}

static size_t get24(struct cur *c) {
  if (!cur_need(c, 3))
    return 0;
  size_t v = ((size_t)c->p[0] << 16) | ((size_t)c->p[1] << 8) | c->p[2];
  c->p += 3;
  return v;
}

/* Splits off the next n bytes as a sub-cursor. */
static struct cur cur_sub(struct cur *c, size_t n) {
  struct cur s = {c->p, c->p, true};
  if (!cur_need(c, n))
    return s;
  s.end = c->p + n;
  s.bad = false;
  c->p += n;
  return s;
}

static bool is_grease(unsigned v) { return (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff); }

/* Our key_share size for a group, 0 when we cannot answer it. Hybrids: ML-KEM-768 ciphertext
 * is 1088 bytes; X25519MLKEM768 puts it first, SecP256r1MLKEM768 puts the EC point first. */
static size_t server_share_len(unsigned group) {
  switch (group) {
  case MTP_TLS_GROUP_X25519: return 32;
  case MTP_TLS_GROUP_X448: return 56;
  case MTP_TLS_GROUP_SECP256R1: return 65;
  case MTP_TLS_GROUP_SECP384R1: return 97;
  case MTP_TLS_GROUP_SECP521R1: return 133;
  case MTP_TLS_GROUP_X25519MLKEM768: return 1088 + 32;
  case MTP_TLS_GROUP_SECP256R1MLKEM768: return 65 + 1088;
  default: return 0;
  }
}

/* ---------------------------------------------------------------------------------------- */
/* ClientHello parsing */

static int parse_sni(struct cur e, struct mtp_faketls_hello *out) {
  size_t list = get16(&e);
  if (e.bad || list != cur_left(&e) || list < 3)
    return MTP_EPROTO;
  unsigned type = get8(&e);
  size_t n = get16(&e);
  if (e.bad || type != 0 || n == 0 || n > MTP_FAKETLS_MAX_HOST || n != cur_left(&e))
    return MTP_EPROTO;
  if (memchr(e.p, 0, n) != NULL)
    return MTP_EPROTO;
  memcpy(out->sni, e.p, n);
  out->sni[n] = '\0';
  out->sni_len = n;
  return MTP_OK;
}

static int parse_versions(struct cur e, struct mtp_faketls_hello *out) {
  size_t n = get8(&e);
  if (e.bad || n != cur_left(&e) || n % 2 != 0 || n == 0)
    return MTP_EPROTO;
  while (cur_left(&e) > 0)
    if (get16(&e) == 0x0304)
      out->has_tls13 = true;
  return MTP_OK;
}

static int parse_key_share(struct cur e, struct mtp_faketls_hello *out) {
  size_t n = get16(&e);
  if (e.bad || n != cur_left(&e))
    return MTP_EPROTO;
  while (cur_left(&e) > 0) {
    unsigned group = get16(&e);
    size_t klen = get16(&e);
    struct cur key = cur_sub(&e, klen);
    if (e.bad || key.bad || klen == 0)
      return MTP_EPROTO;
    if (is_grease(group) || out->nshares == MTP_FAKETLS_MAX_SHARES)
      continue;
    out->share_group[out->nshares] = (uint16_t)group;
    out->share_len[out->nshares] = (uint16_t)klen;
    out->nshares++;
  }
  return MTP_OK;
}

int mtp_faketls_hello_parse(const uint8_t *rec, size_t len, struct mtp_faketls_hello *out) {
  memset(out, 0, sizeof *out);
  if (rec == NULL || len < MTP_FAKETLS_RECORD_HEADER)
    return MTP_EPROTO;
  if (rec[0] != 0x16 || rec[1] != 0x03 || rec[2] != 0x01)
    return MTP_EPROTO;
  size_t plen = ((size_t)rec[3] << 8) | rec[4];
  if (plen > MTP_FAKETLS_MAX_RECORD_PAYLOAD)
    return MTP_ETOOBIG;
  if (plen != len - MTP_FAKETLS_RECORD_HEADER)
    return MTP_EPROTO;

  struct cur c = {rec + MTP_FAKETLS_RECORD_HEADER, rec + len, false};
  unsigned htype = get8(&c);
  size_t hlen = get24(&c);
  if (c.bad || htype != 0x01 || hlen != cur_left(&c))
    return MTP_EPROTO;
  if (get16(&c) != 0x0303)
    return MTP_EPROTO;
  struct cur rnd = cur_sub(&c, MTP_FAKETLS_RANDOM_LEN); /* at record offset 11 */
  if (get8(&c) != MTP_FAKETLS_SESSION_ID_LEN)
    return MTP_EPROTO;
  struct cur sid = cur_sub(&c, MTP_FAKETLS_SESSION_ID_LEN);
  size_t cslen = get16(&c);
  struct cur cs = cur_sub(&c, cslen);
  size_t complen = get8(&c);
  struct cur comp = cur_sub(&c, complen);
  size_t extlen = get16(&c);
  if (c.bad || rnd.bad || sid.bad || cs.bad || comp.bad || cslen == 0 || cslen % 2 != 0 ||
      complen == 0 || extlen != cur_left(&c))
    return MTP_EPROTO;

  memcpy(out->random, rnd.p, MTP_FAKETLS_RANDOM_LEN);
  memcpy(out->session_id, sid.p, MTP_FAKETLS_SESSION_ID_LEN);
  out->cipher_suites = cs.p;
  out->cipher_suites_len = cslen;
  out->record = rec;
  out->record_len = len;

  bool seen_sni = false, seen_versions = false, seen_shares = false;
  while (cur_left(&c) > 0) {
    unsigned type = get16(&c);
    size_t elen = get16(&c);
    struct cur e = cur_sub(&c, elen);
    if (c.bad || e.bad)
      return MTP_EPROTO;
    int rc = MTP_OK;
    bool *seen = NULL;
    if (type == 0x0000) {
      seen = &seen_sni;
      rc = parse_sni(e, out);
    } else if (type == 0x002b) {
      seen = &seen_versions;
      rc = parse_versions(e, out);
    } else if (type == 0x0033) {
      seen = &seen_shares;
      rc = parse_key_share(e, out);
    }
    if (rc != MTP_OK)
      return rc;
    if (seen != NULL) {
      if (*seen)
        return MTP_EPROTO; /* TLS forbids repeating an extension */
      *seen = true;
    }
  }
  if (!seen_sni || !out->has_tls13)
    return MTP_EPROTO;

  /* Our cipher suite: 0x1301 when offered, else the first other TLS 1.3 suite. */
  for (size_t i = 0; i < cslen; i += 2) {
    unsigned s = ((unsigned)cs.p[i] << 8) | cs.p[i + 1];
    if (s == 0x1301) {
      out->suite = 0x1301;
      break;
    }
    if (out->suite == 0 && (s == 0x1302 || s == 0x1303))
      out->suite = (uint16_t)s;
  }
  if (out->suite == 0)
    return MTP_EPROTO;

  /* Our group: x25519 when the client sent that share, else the first share we can size. */
  for (size_t i = 0; i < out->nshares; i++) {
    if (out->share_group[i] == MTP_TLS_GROUP_X25519) {
      out->group = MTP_TLS_GROUP_X25519;
      break;
    }
    if (out->group == 0 && server_share_len(out->share_group[i]) != 0)
      out->group = out->share_group[i];
  }
  if (out->group == 0)
    return MTP_EPROTO;
  out->server_share_len = server_share_len(out->group);
  return MTP_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The incremental reader */

void mtp_faketls_hello_init(struct mtp_faketls_hello_reader *r) { memset(r, 0, sizeof *r); }

void mtp_faketls_hello_free(struct mtp_faketls_hello_reader *r) {
  if (r == NULL)
    return;
  mtp_free(r->_buf);
  r->_buf = NULL;
  memset(&r->hello, 0, sizeof r->hello);
}

const uint8_t *mtp_faketls_hello_bytes(const struct mtp_faketls_hello_reader *r, size_t *n) {
  *n = r->_got;
  return r->_buf != NULL ? r->_buf : r->_hdr;
}

static int hello_fail(struct mtp_faketls_hello_reader *r, size_t got_before, int err) {
  r->state = MTP_FAKETLS_HELLO_FAILED;
  r->_got = got_before; /* the failing call took nothing (see the header) */
  return err;
}

int mtp_faketls_hello_feed(struct mtp_faketls_hello_reader *r, const uint8_t *in, size_t len) {
  static const uint8_t prefix[3] = {0x16, 0x03, 0x01};
  size_t got_before = r->_got;
  size_t i = 0;

  switch (r->state) {
  case MTP_FAKETLS_HELLO_FAILED:
    return MTP_EPROTO;
  case MTP_FAKETLS_HELLO_DONE:
    return 0;
  case MTP_FAKETLS_HELLO_WANT_HEADER:
    /* Check the fixed prefix byte by byte so that non-TLS input fails at once. */
    while (r->_got < MTP_FAKETLS_RECORD_HEADER && i < len) {
      uint8_t b = in[i++];
      if (r->_got < sizeof prefix && b != prefix[r->_got])
        return hello_fail(r, got_before, MTP_EPROTO);
      r->_hdr[r->_got++] = b;
    }
    if (r->_got < MTP_FAKETLS_RECORD_HEADER)
      return MTP_AGAIN;
    {
      size_t plen = ((size_t)r->_hdr[3] << 8) | r->_hdr[4];
      if (plen > MTP_FAKETLS_MAX_RECORD_PAYLOAD)
        return hello_fail(r, got_before, MTP_ETOOBIG);
      if (plen < MIN_HELLO_PAYLOAD)
        return hello_fail(r, got_before, MTP_EPROTO);
      r->_total = MTP_FAKETLS_RECORD_HEADER + plen;
      r->_buf = mtp_malloc(r->_total);
      if (r->_buf == NULL)
        return hello_fail(r, got_before, MTP_ENOMEM);
      memcpy(r->_buf, r->_hdr, MTP_FAKETLS_RECORD_HEADER);
    }
    r->state = MTP_FAKETLS_HELLO_WANT_BODY;
    /* fall through */
  case MTP_FAKETLS_HELLO_WANT_BODY: {
    size_t n = r->_total - r->_got;
    if (n > len - i)
      n = len - i;
    memcpy(r->_buf + r->_got, in + i, n);
    r->_got += n;
    i += n;
    if (r->_got < r->_total)
      return MTP_AGAIN;
    int rc = mtp_faketls_hello_parse(r->_buf, r->_total, &r->hello);
    if (rc != MTP_OK)
      return hello_fail(r, got_before, rc);
    r->state = MTP_FAKETLS_HELLO_DONE;
    return (int)i;
  }
  }
  return MTP_EPROTO;
}

/* ---------------------------------------------------------------------------------------- */
/* Validation */

int mtp_faketls_hello_validate(const struct mtp_faketls_hello *h, const uint8_t (*secrets)[16],
                               size_t nsecrets, struct mtp_faketls_match *m) {
  int found = -1;
  uint32_t ts = 0;
  if (h->record == NULL || h->record_len < MTP_FAKETLS_RANDOM_OFFSET + MTP_FAKETLS_RANDOM_LEN)
    return MTP_EBADSECRET;
  for (size_t i = 0; i < nsecrets; i++) {
    uint8_t d[32];
    hmac_zeroed(secrets[i], NULL, 0, h->record, h->record_len, MTP_FAKETLS_RANDOM_OFFSET, d);
    bool ok = mtp_ct_equal(d, h->random, 28);
    if (ok && found < 0) {
      found = (int)i;
      uint8_t t[4];
      for (int k = 0; k < 4; k++)
        t[k] = d[28 + k] ^ h->random[28 + k];
      ts = (uint32_t)t[0] | ((uint32_t)t[1] << 8) | ((uint32_t)t[2] << 16) | ((uint32_t)t[3] << 24);
    }
    mtp_wipe(d, sizeof d);
  }
  if (found < 0)
    return MTP_EBADSECRET;
  m->secret_index = found;
  m->timestamp = ts;
  return MTP_OK;
}

bool mtp_faketls_time_is_ok(uint32_t ts, uint64_t now, uint32_t max_past, uint32_t max_future) {
  int64_t t = (int64_t)ts, n = (int64_t)now;
  return t >= n - (int64_t)max_past && t <= n + (int64_t)max_future;
}

/* ---------------------------------------------------------------------------------------- */
/* Key shares that look real: EC public keys for the classical parts, random bytes otherwise. */

static int rng_cb(void *unused, unsigned char *buf, size_t n) {
  (void)unused;
  return mtp_random(buf, n) == MTP_OK ? 0 : -1;
}

/* Writes a fresh public key of group gid into out[0..n). Returns MTP_OK or MTP_EIO. */
static int ec_public(mbedtls_ecp_group_id gid, uint8_t *out, size_t n) {
  mbedtls_ecp_group grp;
  mbedtls_mpi d;
  mbedtls_ecp_point q;
  mbedtls_ecp_group_init(&grp);
  mbedtls_mpi_init(&d);
  mbedtls_ecp_point_init(&q);
  size_t olen = 0;
  int rc = mbedtls_ecp_group_load(&grp, gid);
  if (rc == 0)
    rc = mbedtls_ecp_gen_keypair(&grp, &d, &q, rng_cb, NULL);
  if (rc == 0)
    rc = mbedtls_ecp_point_write_binary(&grp, &q, MBEDTLS_ECP_PF_UNCOMPRESSED, &olen, out, n);
  mbedtls_ecp_point_free(&q);
  mbedtls_mpi_free(&d);
  mbedtls_ecp_group_free(&grp);
  if (rc != 0 || olen != n)
    return mtp_random(out, n) == MTP_OK ? MTP_OK : MTP_EIO; /* still the right size */
  return MTP_OK;
}

static int make_share(unsigned group, uint8_t *out, size_t n) {
  switch (group) {
  case MTP_TLS_GROUP_X25519:
    return ec_public(MBEDTLS_ECP_DP_CURVE25519, out, n);
  case MTP_TLS_GROUP_SECP256R1:
    return ec_public(MBEDTLS_ECP_DP_SECP256R1, out, n);
  case MTP_TLS_GROUP_SECP384R1:
    return ec_public(MBEDTLS_ECP_DP_SECP384R1, out, n);
  case MTP_TLS_GROUP_SECP521R1:
    return ec_public(MBEDTLS_ECP_DP_SECP521R1, out, n);
  case MTP_TLS_GROUP_X25519MLKEM768: /* ML-KEM part first, then x25519 */
    if (mtp_random(out, n - 32) != MTP_OK)
      return MTP_EIO;
    return ec_public(MBEDTLS_ECP_DP_CURVE25519, out + n - 32, 32);
  case MTP_TLS_GROUP_SECP256R1MLKEM768: /* P-256 point first, then ML-KEM */
    if (mtp_random(out + 65, n - 65) != MTP_OK)
      return MTP_EIO;
    return ec_public(MBEDTLS_ECP_DP_SECP256R1, out, 65);
  default:
    return mtp_random(out, n) == MTP_OK ? MTP_OK : MTP_EIO;
  }
}

/* ---------------------------------------------------------------------------------------- */
/* A bounds-checked writer. The caller sizes the buffer; overflow only marks it bad. */

struct wr {
  uint8_t *p;
  size_t cap;
  size_t n;
  bool bad;
};

static uint8_t *wr_take(struct wr *w, size_t k) {
  if (w->bad || w->cap - w->n < k) {
    w->bad = true;
    return NULL;
  }
  uint8_t *at = w->p + w->n;
  w->n += k;
  return at;
}

static void put8(struct wr *w, unsigned v) {
  uint8_t *at = wr_take(w, 1);
  if (at)
    at[0] = (uint8_t)v;
}

static void put16(struct wr *w, unsigned v) {
  uint8_t *at = wr_take(w, 2);
  if (at) {
    at[0] = (uint8_t)(v >> 8);
    at[1] = (uint8_t)v;
  }
}

static void put_bytes(struct wr *w, const void *src, size_t k) {
  uint8_t *at = wr_take(w, k);
  if (at)
    memcpy(at, src, k);
}

/* Back-patches a big-endian length of width bytes at position pos: the bytes since pos+width. */
static void patch_len(struct wr *w, size_t pos, size_t width) {
  if (w->bad)
    return;
  size_t v = w->n - pos - width;
  for (size_t k = 0; k < width; k++)
    w->p[pos + k] = (uint8_t)(v >> (8 * (width - 1 - k)));
}

/* ---------------------------------------------------------------------------------------- */
/* The server's answer */

#define CCS_RECORD_LEN 6

static size_t server_hello_record_len(const struct mtp_faketls_hello *h) {
  /* header, handshake header, version, random, sid, suite, compression, ext len,
   * key_share (4 + 4 + share), supported_versions (6) */
  return 5 + 4 + 2 + 32 + 1 + MTP_FAKETLS_SESSION_ID_LEN + 2 + 1 + 2 + (8 + h->server_share_len) + 6;
}

size_t mtp_faketls_server_hello_len(const struct mtp_faketls_hello *h,
                                    const struct mtp_faketls_answer_opts *opts) {
  return server_hello_record_len(h) + CCS_RECORD_LEN + 5 + opts->appdata_len;
}

static int put_key_share(struct wr *w, const struct mtp_faketls_hello *h) {
  put16(w, 0x0033);
  put16(w, 4 + h->server_share_len);
  put16(w, h->group);
  put16(w, h->server_share_len);
  uint8_t *key = wr_take(w, h->server_share_len);
  return key == NULL ? MTP_EINVAL : make_share(h->group, key, h->server_share_len);
}

static void put_versions(struct wr *w) {
  put16(w, 0x002b);
  put16(w, 2);
  put16(w, 0x0304);
}

int mtp_faketls_server_hello(const struct mtp_faketls_hello *h, const uint8_t secret[16],
                             const struct mtp_faketls_answer_opts *opts, uint8_t *out, size_t cap) {
  if (opts->appdata_len == 0 || opts->appdata_len > MTP_FAKETLS_MAX_PAYLOAD || h->server_share_len == 0)
    return MTP_EINVAL;
  size_t total = mtp_faketls_server_hello_len(h, opts);
  if (cap < total)
    return MTP_EINVAL;

  struct wr w = {out, cap, 0, false};
  put8(&w, 0x16);
  put16(&w, 0x0303);
  put16(&w, 0); /* record length, patched */
  put8(&w, 0x02);
  put8(&w, 0);
  put16(&w, 0); /* 24-bit handshake length, patched */
  put16(&w, 0x0303);
  uint8_t *rnd = wr_take(&w, MTP_FAKETLS_RANDOM_LEN);
  if (rnd)
    memset(rnd, 0, MTP_FAKETLS_RANDOM_LEN);
  put8(&w, MTP_FAKETLS_SESSION_ID_LEN);
  put_bytes(&w, h->session_id, MTP_FAKETLS_SESSION_ID_LEN);
  put16(&w, h->suite);
  put8(&w, 0x00);
  size_t ext_at = w.n;
  put16(&w, 0);
  int rc;
  if (opts->versions_first) {
    put_versions(&w);
    rc = put_key_share(&w, h);
  } else {
    rc = put_key_share(&w, h);
    put_versions(&w);
  }
  if (rc != MTP_OK)
    return rc;
  patch_len(&w, ext_at, 2);
  patch_len(&w, 3, 2);
  patch_len(&w, 6, 3);

  static const uint8_t ccs[CCS_RECORD_LEN] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
  put_bytes(&w, ccs, sizeof ccs);
  put8(&w, 0x17);
  put16(&w, 0x0303);
  put16(&w, opts->appdata_len);
  uint8_t *fake = wr_take(&w, opts->appdata_len);
  if (w.bad || w.n != total)
    return MTP_EINVAL;
  if (mtp_random(fake, opts->appdata_len) != MTP_OK)
    return MTP_EIO;

  uint8_t digest[32];
  hmac_zeroed(secret, h->random, MTP_FAKETLS_RANDOM_LEN, out, total, MTP_FAKETLS_RANDOM_OFFSET, digest);
  memcpy(out + MTP_FAKETLS_RANDOM_OFFSET, digest, sizeof digest);
  return (int)total;
}

/* ---------------------------------------------------------------------------------------- */
/* Record layer */

void mtp_faketls_rx_init(struct mtp_faketls_rx *r) { memset(r, 0, sizeof *r); }

bool mtp_faketls_rx_is_idle(const struct mtp_faketls_rx *r) {
  return r->state == MTP_FAKETLS_RX_HEADER && r->_hdr_got == 0;
}

static int rx_fail(struct mtp_faketls_rx *r, size_t *out_len, int err) {
  r->state = MTP_FAKETLS_RX_FAILED;
  *out_len = 0;
  return err;
}

int mtp_faketls_rx_feed(struct mtp_faketls_rx *r, const uint8_t *in, size_t len, uint8_t *out,
                        size_t *out_len) {
  size_t i = 0, o = 0;
  *out_len = 0;
  if (r->state == MTP_FAKETLS_RX_FAILED)
    return MTP_EPROTO;
  while (i < len) {
    switch (r->state) {
    case MTP_FAKETLS_RX_HEADER:
      r->_hdr[r->_hdr_got++] = in[i++];
      if (r->_hdr_got < MTP_FAKETLS_RECORD_HEADER)
        break;
      r->_hdr_got = 0;
      if (r->_hdr[1] != 0x03 || r->_hdr[2] != 0x03)
        return rx_fail(r, out_len, MTP_EPROTO);
      if (r->_hdr[0] == 0x14) {
        if (r->_seen_ccs || r->_seen_data || r->_hdr[3] != 0x00 || r->_hdr[4] != 0x01)
          return rx_fail(r, out_len, MTP_EPROTO);
        r->_seen_ccs = true;
        r->state = MTP_FAKETLS_RX_CCS;
      } else if (r->_hdr[0] == 0x17) {
        size_t n = ((size_t)r->_hdr[3] << 8) | r->_hdr[4];
        if (n > MTP_FAKETLS_MAX_RECORD_PAYLOAD)
          return rx_fail(r, out_len, MTP_ETOOBIG);
        r->_seen_data = true;
        r->_left = n;
        r->state = n > 0 ? MTP_FAKETLS_RX_PAYLOAD : MTP_FAKETLS_RX_HEADER;
      } else {
        return rx_fail(r, out_len, MTP_EPROTO);
      }
      break;
    case MTP_FAKETLS_RX_CCS:
      if (in[i++] != 0x01)
        return rx_fail(r, out_len, MTP_EPROTO);
      r->state = MTP_FAKETLS_RX_HEADER;
      break;
    case MTP_FAKETLS_RX_PAYLOAD: {
      size_t n = r->_left < len - i ? r->_left : len - i;
      memmove(out + o, in + i, n); /* o <= i: safe in place */
      o += n;
      i += n;
      r->_left -= n;
      if (r->_left == 0)
        r->state = MTP_FAKETLS_RX_HEADER;
      break;
    }
    case MTP_FAKETLS_RX_FAILED:
      return rx_fail(r, out_len, MTP_EPROTO);
    }
  }
  *out_len = o;
  return (int)len;
}

static size_t clamp_payload(size_t max_payload) {
  return (max_payload == 0 || max_payload > MTP_FAKETLS_MAX_RECORD_PAYLOAD) ? MTP_FAKETLS_MAX_PAYLOAD
                                                                            : max_payload;
}

size_t mtp_faketls_wrap_len(size_t n, size_t max_payload) {
  size_t m = clamp_payload(max_payload);
  return n + ((n + m - 1) / m) * MTP_FAKETLS_RECORD_HEADER;
}

size_t mtp_faketls_wrap(const uint8_t *in, size_t n, size_t max_payload, uint8_t *out) {
  size_t m = clamp_payload(max_payload);
  size_t o = 0;
  while (n > 0) {
    size_t k = n < m ? n : m;
    out[o++] = 0x17;
    out[o++] = 0x03;
    out[o++] = 0x03;
    out[o++] = (uint8_t)(k >> 8);
    out[o++] = (uint8_t)k;
    memcpy(out + o, in, k);
    o += k;
    in += k;
    n -= k;
  }
  return o;
}

/* ---------------------------------------------------------------------------------------- */
/* Client side (tests) */

/* n (<= 8) distinct GREASE values 0x?a?a. */
static int pick_grease(unsigned *g, size_t n) {
  uint8_t r[8];
  if (n > sizeof r || mtp_random(r, sizeof r) != MTP_OK)
    return MTP_EIO;
  unsigned used = 0; /* bit k: high nibble k taken */
  for (size_t i = 0; i < n; i++) {
    unsigned hi = r[i] >> 4;
    while (used & (1u << hi))
      hi = (hi + 1) & 0xf;
    used |= 1u << hi;
    unsigned b = (hi << 4) | 0x0a;
    g[i] = (b << 8) | b;
  }
  return MTP_OK;
}

int mtp_faketls_client_hello(const uint8_t secret[16], const char *sni, uint32_t timestamp,
                             enum mtp_faketls_hello_kind kind, uint8_t *out, size_t cap) {
  static const uint16_t suites[] = {0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9,
                                    0xcca8, 0xc013, 0xc014, 0x009c, 0x009d, 0x002f, 0x0035};
  static const uint16_t sigalgs[] = {0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601};
  static const uint8_t alpn[] = {0x02, 'h', '2', 0x08, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  size_t sni_len = sni != NULL ? strlen(sni) : 0;
  if (sni_len == 0 || sni_len > MTP_FAKETLS_MAX_HOST || out == NULL)
    return MTP_EINVAL;
  bool pq = kind == MTP_FAKETLS_KIND_PQ;
  unsigned g[5];
  if (pick_grease(g, 5) != MTP_OK)
    return MTP_EIO;

  struct wr w = {out, cap, 0, false};
  put8(&w, 0x16);
  put16(&w, 0x0301);
  put16(&w, 0);
  put8(&w, 0x01);
  put8(&w, 0);
  put16(&w, 0);
  put16(&w, 0x0303);
  uint8_t *rnd = wr_take(&w, MTP_FAKETLS_RANDOM_LEN);
  if (rnd)
    memset(rnd, 0, MTP_FAKETLS_RANDOM_LEN);
  put8(&w, MTP_FAKETLS_SESSION_ID_LEN);
  uint8_t *sid = wr_take(&w, MTP_FAKETLS_SESSION_ID_LEN);
  if (sid && mtp_random(sid, MTP_FAKETLS_SESSION_ID_LEN) != MTP_OK)
    return MTP_EIO;
  put16(&w, 2 * (1 + sizeof suites / sizeof suites[0]));
  put16(&w, g[0]);
  for (size_t i = 0; i < sizeof suites / sizeof suites[0]; i++)
    put16(&w, suites[i]);
  put8(&w, 1);
  put8(&w, 0);
  size_t ext_at = w.n;
  put16(&w, 0);

  put16(&w, g[1]); /* a GREASE extension first, as browsers do */
  put16(&w, 0);
  put16(&w, 0x0000); /* server_name */
  put16(&w, sni_len + 5);
  put16(&w, sni_len + 3);
  put8(&w, 0);
  put16(&w, sni_len);
  put_bytes(&w, sni, sni_len);
  put16(&w, 0x0017); /* extended_master_secret */
  put16(&w, 0);
  put16(&w, 0xff01); /* renegotiation_info */
  put16(&w, 1);
  put8(&w, 0);
  put16(&w, 0x000a); /* supported_groups */
  size_t at = w.n;
  put16(&w, 0);
  put16(&w, 0);
  put16(&w, g[2]);
  if (pq)
    put16(&w, MTP_TLS_GROUP_X25519MLKEM768);
  put16(&w, MTP_TLS_GROUP_X25519);
  put16(&w, MTP_TLS_GROUP_SECP256R1);
  put16(&w, MTP_TLS_GROUP_SECP384R1);
  patch_len(&w, at + 2, 2);
  patch_len(&w, at, 2);
  put16(&w, 0x000b); /* ec_point_formats */
  put16(&w, 2);
  put8(&w, 1);
  put8(&w, 0);
  put16(&w, 0x0023); /* session_ticket */
  put16(&w, 0);
  put16(&w, 0x0010); /* ALPN */
  put16(&w, sizeof alpn + 2);
  put16(&w, sizeof alpn);
  put_bytes(&w, alpn, sizeof alpn);
  put16(&w, 0x0005); /* status_request */
  put16(&w, 5);
  put8(&w, 1);
  put16(&w, 0);
  put16(&w, 0);
  put16(&w, 0x000d); /* signature_algorithms */
  put16(&w, 2 + sizeof sigalgs);
  put16(&w, sizeof sigalgs);
  for (size_t i = 0; i < sizeof sigalgs / sizeof sigalgs[0]; i++)
    put16(&w, sigalgs[i]);
  put16(&w, 0x0012); /* signed_certificate_timestamp */
  put16(&w, 0);
  put16(&w, 0x0033); /* key_share */
  at = w.n;
  put16(&w, 0);
  put16(&w, 0);
  put16(&w, g[2]);
  put16(&w, 1);
  put8(&w, 0);
  if (pq) {
    put16(&w, MTP_TLS_GROUP_X25519MLKEM768);
    put16(&w, 1184 + 32);
    uint8_t *k = wr_take(&w, 1184 + 32);
    if (k && make_share(MTP_TLS_GROUP_X25519MLKEM768, k, 1184 + 32) != MTP_OK)
      return MTP_EIO;
  }
  put16(&w, MTP_TLS_GROUP_X25519);
  put16(&w, 32);
  uint8_t *k = wr_take(&w, 32);
  if (k && make_share(MTP_TLS_GROUP_X25519, k, 32) != MTP_OK)
    return MTP_EIO;
  patch_len(&w, at + 2, 2);
  patch_len(&w, at, 2);
  put16(&w, 0x002d); /* psk_key_exchange_modes */
  put16(&w, 2);
  put8(&w, 1);
  put8(&w, 1);
  put16(&w, 0x002b); /* supported_versions */
  put16(&w, 7);
  put8(&w, 6);
  put16(&w, g[3]);
  put16(&w, 0x0304);
  put16(&w, 0x0303);
  put16(&w, 0x001b); /* compress_certificate: brotli */
  put16(&w, 3);
  put8(&w, 2);
  put16(&w, 2);
  put16(&w, g[4]); /* a trailing GREASE extension with one byte */
  put16(&w, 1);
  put8(&w, 0);
  /* Classic hellos are padded to 517 bytes with a padding extension. */
  if (!pq && !w.bad && w.n + 4 <= 517) {
    size_t pad = 517 - w.n - 4;
    put16(&w, 0x0015);
    put16(&w, pad);
    uint8_t *z = wr_take(&w, pad);
    if (z)
      memset(z, 0, pad);
  }
  if (w.bad)
    return MTP_EINVAL;
  patch_len(&w, ext_at, 2);
  patch_len(&w, 3, 2);
  patch_len(&w, 6, 3);

  uint8_t d[32];
  hmac_zeroed(secret, NULL, 0, out, w.n, MTP_FAKETLS_RANDOM_OFFSET, d);
  for (int i = 0; i < 4; i++)
    d[28 + i] ^= (uint8_t)(timestamp >> (8 * i));
  memcpy(out + MTP_FAKETLS_RANDOM_OFFSET, d, sizeof d);
  return (int)w.n;
}

int mtp_faketls_answer_check(const uint8_t secret[16], const uint8_t client_random[32],
                             const uint8_t *in, size_t len) {
  static const uint8_t ccs[CCS_RECORD_LEN] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
  /* ServerHello record */
  if (len >= 1 && in[0] != 0x16)
    return MTP_EPROTO;
  if (len < 5)
    return MTP_AGAIN;
  if (in[1] != 0x03 || in[2] != 0x03)
    return MTP_EPROTO;
  size_t l1 = ((size_t)in[3] << 8) | in[4];
  if (l1 < 4 + 2 + MTP_FAKETLS_RANDOM_LEN || l1 > MTP_FAKETLS_MAX_RECORD_PAYLOAD)
    return MTP_EPROTO;
  size_t off = 5 + l1;
  if (len < off)
    return MTP_AGAIN;
  if (in[5] != 0x02)
    return MTP_EPROTO;
  /* ChangeCipherSpec */
  for (size_t k = 0; k < CCS_RECORD_LEN; k++) {
    if (len <= off + k)
      return MTP_AGAIN;
    if (in[off + k] != ccs[k])
      return MTP_EPROTO;
  }
  off += CCS_RECORD_LEN;
  /* One ApplicationData record */
  if (len < off + 5)
    return MTP_AGAIN;
  if (in[off] != 0x17 || in[off + 1] != 0x03 || in[off + 2] != 0x03)
    return MTP_EPROTO;
  size_t l3 = ((size_t)in[off + 3] << 8) | in[off + 4];
  if (l3 > MTP_FAKETLS_MAX_RECORD_PAYLOAD)
    return MTP_EPROTO;
  off += 5 + l3;
  if (len < off)
    return MTP_AGAIN;
  uint8_t d[32];
  hmac_zeroed(secret, client_random, MTP_FAKETLS_RANDOM_LEN, in, off, MTP_FAKETLS_RANDOM_OFFSET, d);
  if (!mtp_ct_equal(d, in + MTP_FAKETLS_RANDOM_OFFSET, sizeof d))
    return MTP_EBADSECRET;
  return (int)off;
}

/* ---------------------------------------------------------------------------------------- */
/* Per-SNI derived secrets */

void mtp_faketls_derive_secret(const uint8_t base[16], const char *salt, const char *domain, uint8_t out[16]) {
  char hex[33];
  mtp_hex_encode(base, 16, hex); /* lower case, as mtproto_proxy's hex/1 */
  mbedtls_sha256_context c;
  mbedtls_sha256_init(&c);
  mbedtls_sha256_starts_ret(&c, 0);
  mbedtls_sha256_update_ret(&c, (const unsigned char *)salt, strlen(salt));
  mbedtls_sha256_update_ret(&c, (const unsigned char *)hex, 32);
  /* The domain lower-cased (ASCII), fed in pieces so no copy of it is needed. */
  uint8_t piece[64];
  size_t n = 0;
  for (const char *p = domain; *p != '\0'; p++) {
    char ch = *p;
    piece[n++] = (uint8_t)(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
    if (n == sizeof piece) {
      mbedtls_sha256_update_ret(&c, piece, n);
      n = 0;
    }
  }
  mbedtls_sha256_update_ret(&c, piece, n);
  uint8_t d[32];
  mbedtls_sha256_finish_ret(&c, d);
  mbedtls_sha256_free(&c);
  memcpy(out, d, 16);
  mtp_wipe(d, sizeof d);
  mtp_wipe(hex, sizeof hex);
}
