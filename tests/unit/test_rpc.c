/*
 * test_rpc.c - the middle-proxy RPC codec: key derivation known answers, the frame layer
 * (plaintext and AES-CBC, every split point, byte by byte, filler words, CRC/seq errors,
 * CRC32C), and every message built then parsed.
 *
 * Reference streams are assembled here by hand (zlib crc32, mbedTLS AES-CBC, a bitwise
 * CRC32C), not with the codec's own writer, so reader and writer are checked separately.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/aes.h>
#include <mbedtls/md5.h>
#include <mbedtls/sha1.h>
#include <zlib.h>

#include "err.h"
#include "obf2.h"
#include "rpc.h"
#include "check.h"

static void hex2bin(const char *hex, uint8_t *out) {
  for (size_t i = 0; hex[2 * i]; i++) {
    unsigned v;
    sscanf(hex + 2 * i, "%2x", &v);
    out[i] = (uint8_t)v;
  }
}

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Bitwise CRC32C (Castagnoli, reflected 0x82F63B78), independent of crypto.c. */
static uint32_t ref_crc32c(const uint8_t *p, size_t n) {
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    crc ^= p[i];
    for (int k = 0; k < 8; k++)
      crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
  }
  return ~crc;
}

/* ---- key derivation ---- */

static uint8_t g_secret[128];
static const uint8_t g_nsrv[16] = {0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
                                   0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f};
static const uint8_t g_nclt[16] = {0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
                                   0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf};

static void key_params(struct mtp_rpc_key_params *p) {
  for (int i = 0; i < 128; i++)
    g_secret[i] = (uint8_t)(i * 7 + 3);
  memset(p, 0, sizeof(*p));
  memcpy(p->nonce_srv, g_nsrv, 16);
  memcpy(p->nonce_clt, g_nclt, 16);
  p->clt_ts = 0x5f5e1000u;
  p->srv_ip = (149u << 24) | (154u << 16) | (175u << 8) | 50u; /* 149.154.175.50 */
  p->clt_ip = (203u << 24) | (0u << 16) | (113u << 8) | 7u;    /* 203.0.113.7 */
  p->srv_port = 8888;
  p->clt_port = 40000;
  p->secret = g_secret;
  p->secret_len = sizeof(g_secret);
}

/*
 * The string of aes_create_keys, assembled byte by byte: nonce_srv, nonce_clt, client ts,
 * server ip (reversed), client port, purpose, client ip (reversed), server port, secret,
 * nonce_srv, [client ipv6, server ipv6], nonce_clt.
 */
static size_t ref_string(uint8_t *s, const char *purpose, bool v6, const uint8_t *cv6, const uint8_t *sv6) {
  size_t n = 0;
  memcpy(s + n, g_nsrv, 16), n += 16;
  memcpy(s + n, g_nclt, 16), n += 16;
  const uint8_t ts[4] = {0x00, 0x10, 0x5e, 0x5f};
  memcpy(s + n, ts, 4), n += 4;
  const uint8_t sip[4] = {50, 175, 154, 149};
  memcpy(s + n, v6 ? (const uint8_t[4]){0, 0, 0, 0} : sip, 4), n += 4;
  s[n++] = 0x40, s[n++] = 0x9c; /* 40000 */
  memcpy(s + n, purpose, 6), n += 6;
  const uint8_t cip[4] = {7, 113, 0, 203};
  memcpy(s + n, v6 ? (const uint8_t[4]){0, 0, 0, 0} : cip, 4), n += 4;
  s[n++] = 0xb8, s[n++] = 0x22; /* 8888 */
  memcpy(s + n, g_secret, 128), n += 128;
  memcpy(s + n, g_nsrv, 16), n += 16;
  if (v6) {
    memcpy(s + n, cv6, 16), n += 16;
    memcpy(s + n, sv6, 16), n += 16;
  }
  memcpy(s + n, g_nclt, 16), n += 16;
  return n;
}

static void ref_keys(const uint8_t *s, size_t n, uint8_t key[32], uint8_t iv[16]) {
  uint8_t md[16], sha[20];
  mbedtls_md5_ret(s + 1, n - 1, md);
  mbedtls_sha1_ret(s, n, sha);
  memcpy(key, md, 12);
  memcpy(key + 12, sha, 20);
  mbedtls_md5_ret(s + 2, n - 2, iv);
}

static void test_keys(void) {
  struct mtp_rpc_key_params p;
  key_params(&p);
  uint8_t key[32], iv[16], rkey[32], riv[16], want[32], s[400];

  /* IPv4, client -> server ("CLIENT") */
  mtp_rpc_derive_keys(&p, true, key, iv);
  size_t n = ref_string(s, "CLIENT", false, NULL, NULL);
  CHECK(n == 16 + 16 + 4 + 4 + 2 + 6 + 4 + 2 + 128 + 16 + 16);
  ref_keys(s, n, rkey, riv);
  CHECK(memcmp(key, rkey, 32) == 0 && memcmp(iv, riv, 16) == 0);
  /* Fixed answers computed separately (Python hashlib over the same layout). */
  hex2bin("277f342e969394d4b6feac3eb4a9b6f4fb4a34f7bc36f9b055f059e81b452dc3", want);
  CHECK(memcmp(key, want, 32) == 0);
  hex2bin("ccdc8aef72e368bf6b0e0243bb55e39a", want);
  CHECK(memcmp(iv, want, 16) == 0);

  /* IPv4, server -> client ("SERVER") */
  mtp_rpc_derive_keys(&p, false, key, iv);
  n = ref_string(s, "SERVER", false, NULL, NULL);
  ref_keys(s, n, rkey, riv);
  CHECK(memcmp(key, rkey, 32) == 0 && memcmp(iv, riv, 16) == 0);
  hex2bin("ccd3eba3b60f79b8dc5ae203bf09af654566c488b01fba19be859f100f68ab64", want);
  CHECK(memcmp(key, want, 32) == 0);
  hex2bin("7fdcfcda63ea197af5bf5abfea26cb72", want);
  CHECK(memcmp(iv, want, 16) == 0);

  /* IPv6: IPv4 fields zero, the two IPv6 addresses (client first) before nonce_clt. */
  uint8_t cv6[16], sv6[16];
  hex2bin("20010db8000000000000000000000007", cv6);
  hex2bin("2001067c04e8f0040000000000000a0b", sv6);
  p.ipv6 = true;
  p.srv_ip = p.clt_ip = 0;
  memcpy(p.clt_ipv6, cv6, 16);
  memcpy(p.srv_ipv6, sv6, 16);
  mtp_rpc_derive_keys(&p, true, key, iv);
  n = ref_string(s, "CLIENT", true, cv6, sv6);
  ref_keys(s, n, rkey, riv);
  CHECK(memcmp(key, rkey, 32) == 0 && memcmp(iv, riv, 16) == 0);
  hex2bin("75b9a0a3ca1f969ad715927a788edb35ff7bf54c09405e5bfc00323a6a09edb7", want);
  CHECK(memcmp(key, want, 32) == 0);
  hex2bin("10ecd8b179a33eacc08de86a61d1a96b", want);
  CHECK(memcmp(iv, want, 16) == 0);
}

/* ---- frame layer ---- */

/* Appends one hand-built plaintext frame to buf. */
static size_t ref_frame(uint8_t *buf, int32_t seq, const uint8_t *body, size_t blen, bool c32c) {
  put32(buf, (uint32_t)(blen + 12));
  put32(buf + 4, (uint32_t)seq);
  memcpy(buf + 8, body, blen);
  uint32_t crc = c32c ? ref_crc32c(buf, blen + 8) : (uint32_t)crc32(0L, buf, (uInt)(blen + 8));
  put32(buf + 8 + blen, crc);
  return blen + 12;
}

static const uint8_t K_C2S[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                  17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
static const uint8_t IV_C2S[16] = {0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87,
                                   0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f};

#define MAXF 16
struct frames {
  size_t n;
  size_t len[MAXF];
  uint8_t body[MAXF][2048];
};

/*
 * Reference stream, as the official writer produces it: a plaintext nonce (seq -2), then
 * under AES-CBC the handshake (-1) and frames 0..4 back to back with filler only at the
 * flushes (after frame 1, and at the end), plus one whole block of filler words.
 */
static size_t build_stream(uint8_t *out, struct frames *exp, bool c32c) {
  size_t n = 0;
  exp->n = 0;
  struct mtp_rpc_nonce non = {.key_selector = 0x11223344, .crypto_schema = 1, .crypto_ts = 1700000000};
  memset(non.nonce, 0x5a, 16);
  uint8_t body[2048];
  size_t bl = mtp_rpc_build_nonce(&non, body);
  memcpy(exp->body[exp->n], body, bl);
  exp->len[exp->n++] = bl;
  n += ref_frame(out + n, -2, body, bl, false);
  size_t enc_start = n;

  static const size_t sizes[] = {32 /* handshake */, 4, 8, 100, 1000, 20};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    for (size_t k = 0; k < sizes[i]; k++)
      body[k] = (uint8_t)(i * 31 + k);
    if (i == 0) {
      struct mtp_rpc_pid a = {0x7f000001, 1, 2, 3}, b = {0, 4, 5, 6};
      mtp_rpc_build_handshake(c32c ? MTP_RPC_HS_FLAG_CRC32C : 0, &a, &b, body);
    } else {
      put32(body, MTP_RPC_PING + (uint32_t)i); /* any type; the frame layer does not care */
    }
    memcpy(exp->body[exp->n], body, sizes[i]);
    exp->len[exp->n++] = sizes[i];
    /* Both handshakes travel with CRC32; CRC32C (if negotiated) starts at seq 0. */
    n += ref_frame(out + n, (int32_t)i - 1, body, sizes[i], c32c && i > 0);
    if (i == 2) { /* a flush: filler to the block boundary, then one whole filler block */
      while ((n - enc_start) % 16)
        put32(out + n, 4), n += 4;
      for (int k = 0; k < 4; k++)
        put32(out + n, 4), n += 4;
    }
  }
  while ((n - enc_start) % 16)
    put32(out + n, 4), n += 4;

  mbedtls_aes_context aes;
  mbedtls_aes_init(&aes);
  mbedtls_aes_setkey_enc(&aes, K_C2S, 256);
  uint8_t iv[16];
  memcpy(iv, IV_C2S, 16);
  mbedtls_aes_crypt_cbc(&aes, MBEDTLS_AES_ENCRYPT, n - enc_start, iv, out + enc_start, out + enc_start);
  mbedtls_aes_free(&aes);
  return n;
}

/* Feeds stream in the given chunk sizes (cycled); collects frames; switches on the key after
 * the nonce and to CRC32C after the handshake when asked. Returns the first error or 0. */
static int drive(const uint8_t *stream, size_t len, const size_t *chunks, size_t nchunks, struct frames *got,
                 bool c32c, size_t *max_cap) {
  struct mtp_rpc_codec c;
  mtp_rpc_codec_init(&c);
  got->n = 0;
  size_t pos = 0, ci = 0;
  int rc = 0;
  while (pos < len) {
    size_t take = chunks[ci++ % nchunks];
    if (take > len - pos)
      take = len - pos;
    const uint8_t *in = stream + pos;
    size_t left = take;
    int guard = 0;
    for (;;) {
      CHECK(++guard < 100000);
      const uint8_t *body;
      size_t blen;
      bool has;
      ssize_t r = mtp_rpc_recv(&c, in, left, &body, &blen, &has);
      if (r < 0) {
        rc = (int)r;
        goto out;
      }
      CHECK((size_t)r <= left);
      if (!has)
        CHECK((size_t)r == left);
      in += r;
      left -= (size_t)r;
      if (has) {
        CHECK(got->n < MAXF);
        memcpy(got->body[got->n], body, blen);
        got->len[got->n++] = blen;
        if (got->n == 1)
          mtp_rpc_codec_set_rx_key(&c, K_C2S, IV_C2S);
        if (got->n == 2 && c32c)
          c.crc32c = true;
        continue;
      }
      if (left == 0)
        break;
    }
    pos += take;
    if (max_cap != NULL && c._cap > *max_cap)
      *max_cap = c._cap;
  }
  /* Nothing but filler may be left over. */
  CHECK(c._raw_len == 0);
out:
  mtp_rpc_codec_free(&c);
  return rc;
}

static bool frames_equal(const struct frames *a, const struct frames *b) {
  if (a->n != b->n)
    return false;
  for (size_t i = 0; i < a->n; i++)
    if (a->len[i] != b->len[i] || memcmp(a->body[i], b->body[i], a->len[i]) != 0)
      return false;
  return true;
}

static void test_recv_splits(bool c32c) {
  static uint8_t stream[4096];
  struct frames exp, got;
  size_t len = build_stream(stream, &exp, c32c);
  CHECK(exp.n == 7);

  size_t whole = len;
  CHECK(drive(stream, len, &whole, 1, &got, c32c, NULL) == 0);
  CHECK(frames_equal(&exp, &got));

  size_t one = 1;
  CHECK(drive(stream, len, &one, 1, &got, c32c, NULL) == 0);
  CHECK(frames_equal(&exp, &got));

  for (size_t split = 1; split < len; split++) {
    size_t ch[2] = {split, len};
    CHECK(drive(stream, len, ch, 2, &got, c32c, NULL) == 0);
    CHECK(frames_equal(&exp, &got));
  }
  static const size_t odd[] = {3, 17, 1, 64, 5, 15, 16, 33};
  CHECK(drive(stream, len, odd, sizeof(odd) / sizeof(odd[0]), &got, c32c, NULL) == 0);
  CHECK(frames_equal(&exp, &got));
}

/* The codec's writer produces what the hand-built reference expects, and reads back. */
static void test_send(void) {
  struct mtp_rpc_codec tx, rx;
  mtp_rpc_codec_init(&tx);
  mtp_rpc_codec_init(&rx);
  uint8_t body[64], out[256], ref[256];
  for (int i = 0; i < 64; i++)
    body[i] = (uint8_t)(0x30 + i);

  /* Plaintext nonce-sized frame: exact bytes, seq -2 = fe ff ff ff. */
  struct iovec iov[3] = {{body, 8}, {body + 8, 0}, {body + 8, 24}};
  CHECK(mtp_rpc_frame_size(&tx, 32) == 44);
  size_t n = mtp_rpc_sendv(&tx, iov, 3, out);
  CHECK(n == 44);
  CHECK(ref_frame(ref, -2, body, 32, false) == 44);
  CHECK(memcmp(out, ref, 44) == 0);
  CHECK(out[4] == 0xfe && out[5] == 0xff && out[6] == 0xff && out[7] == 0xff);

  const uint8_t *b;
  size_t bl;
  bool has;
  CHECK(mtp_rpc_recv(&rx, out, n, &b, &bl, &has) == 44 && has && bl == 32 && memcmp(b, body, 32) == 0);

  /* Encrypted: padded to 16 with filler words; decrypting with mbedTLS shows the layout. */
  mtp_rpc_codec_set_tx_key(&tx, K_C2S, IV_C2S);
  mtp_rpc_codec_set_rx_key(&rx, K_C2S, IV_C2S);
  CHECK(mtp_rpc_frame_size(&tx, 4) == 16);
  CHECK(mtp_rpc_frame_size(&tx, 8) == 32);
  CHECK(mtp_rpc_frame_size(&tx, 20) == 32);
  struct iovec one = {body, 8};
  n = mtp_rpc_sendv(&tx, &one, 1, out);
  CHECK(n == 32);
  uint8_t plain[32], iv[16];
  memcpy(iv, IV_C2S, 16);
  mbedtls_aes_context aes;
  mbedtls_aes_init(&aes);
  mbedtls_aes_setkey_dec(&aes, K_C2S, 256);
  mbedtls_aes_crypt_cbc(&aes, MBEDTLS_AES_DECRYPT, 32, iv, out, plain);
  CHECK(ref_frame(ref, -1, body, 8, false) == 20);
  CHECK(memcmp(plain, ref, 20) == 0);
  for (int k = 20; k < 32; k += 4)
    CHECK(get32(plain + k) == 4);
  /* whole cipher blocks are taken: the frame's block and the filler in it */
  CHECK(mtp_rpc_recv(&rx, out, n, &b, &bl, &has) == 32 && has && bl == 8);
  CHECK(memcmp(b, body, 8) == 0);
  CHECK(mtp_rpc_recv(&rx, out, 0, &b, &bl, &has) == 0 && !has);

  /* The CBC chain continues across frames (second frame with the same IV state). */
  n = mtp_rpc_sendv(&tx, &one, 1, out);
  CHECK(n == 32);
  mbedtls_aes_crypt_cbc(&aes, MBEDTLS_AES_DECRYPT, 32, iv, out, plain);
  CHECK(ref_frame(ref, 0, body, 8, false) == 20);
  CHECK(memcmp(plain, ref, 20) == 0);
  CHECK(mtp_rpc_recv(&rx, out, n, &b, &bl, &has) == 32 && has && bl == 8);

  /* CRC32C mode: the crc field is CRC32C over len+seq+body. */
  tx.crc32c = rx.crc32c = true;
  n = mtp_rpc_sendv(&tx, &one, 1, out);
  mbedtls_aes_crypt_cbc(&aes, MBEDTLS_AES_DECRYPT, 32, iv, out, plain);
  CHECK(get32(plain + 4) == 1);
  CHECK(get32(plain + 16) == ref_crc32c(plain, 16));
  CHECK(get32(plain + 16) != (uint32_t)crc32(0L, plain, 16));
  CHECK(mtp_rpc_recv(&rx, out, n, &b, &bl, &has) == 32 && has && bl == 8);
  mbedtls_aes_free(&aes);

  /* Body length not a multiple of 4: refused. */
  struct iovec bad = {body, 6};
  CHECK(mtp_rpc_sendv(&tx, &bad, 1, out) == 0);

  mtp_rpc_codec_free(&tx);
  mtp_rpc_codec_free(&rx);
  mtp_rpc_codec_free(&rx); /* idempotent */
}

static int recv_all(struct mtp_rpc_codec *c, const uint8_t *in, size_t len, int *frames) {
  *frames = 0;
  while (len > 0) {
    const uint8_t *b;
    size_t bl;
    bool has;
    ssize_t r = mtp_rpc_recv(c, in, len, &b, &bl, &has);
    if (r < 0)
      return (int)r;
    in += r;
    len -= (size_t)r;
    if (has)
      (*frames)++;
  }
  return 0;
}

static void test_recv_errors(void) {
  struct mtp_rpc_codec c;
  uint8_t buf[256], body[16] = {0x11, 0x22, 0x33, 0x44};
  int frames;

  /* Check value of the test's own CRC32C. */
  CHECK(ref_crc32c((const uint8_t *)"123456789", 9) == 0xe3069283u);

  /* good plaintext frame */
  mtp_rpc_codec_init(&c);
  size_t n = ref_frame(buf, -2, body, 16, false);
  CHECK(recv_all(&c, buf, n, &frames) == 0 && frames == 1);
  mtp_rpc_codec_free(&c);

  /* filler words are skipped in plaintext too, and take no seq number */
  mtp_rpc_codec_init(&c);
  put32(buf, 4);
  put32(buf + 4, 4);
  n = 8 + ref_frame(buf + 8, -2, body, 16, false);
  n += ref_frame(buf + n, -1, body, 4, false);
  CHECK(recv_all(&c, buf, n, &frames) == 0 && frames == 2);
  mtp_rpc_codec_free(&c);

  /* bad crc */
  mtp_rpc_codec_init(&c);
  n = ref_frame(buf, -2, body, 16, false);
  buf[n - 1] ^= 1;
  CHECK(recv_all(&c, buf, n, &frames) == MTP_ECRC);
  mtp_rpc_codec_free(&c);

  /* body byte flipped */
  mtp_rpc_codec_init(&c);
  n = ref_frame(buf, -2, body, 16, false);
  buf[9] ^= 0x80;
  CHECK(recv_all(&c, buf, n, &frames) == MTP_ECRC);
  mtp_rpc_codec_free(&c);

  /* bad seq: first frame must be -2, then -1, 0 ... */
  mtp_rpc_codec_init(&c);
  n = ref_frame(buf, -1, body, 16, false);
  CHECK(recv_all(&c, buf, n, &frames) == MTP_ESEQ);
  mtp_rpc_codec_free(&c);
  mtp_rpc_codec_init(&c);
  n = ref_frame(buf, -2, body, 4, false);
  n += ref_frame(buf + n, 0, body, 4, false); /* skipped -1 */
  CHECK(recv_all(&c, buf, n, &frames) == MTP_ESEQ);
  mtp_rpc_codec_free(&c);

  /* CRC32C frame read in CRC32 mode and vice versa */
  mtp_rpc_codec_init(&c);
  n = ref_frame(buf, -2, body, 16, true);
  CHECK(recv_all(&c, buf, n, &frames) == MTP_ECRC);
  mtp_rpc_codec_free(&c);
  mtp_rpc_codec_init(&c);
  c.crc32c = true;
  CHECK(recv_all(&c, buf, n, &frames) == 0 && frames == 1);
  mtp_rpc_codec_free(&c);

  /* bad lengths */
  static const uint32_t bad_lens[] = {0, 6, 8, 12, 0x80000000u, 0xfffffffcu};
  for (size_t i = 0; i < sizeof(bad_lens) / sizeof(bad_lens[0]); i++) {
    mtp_rpc_codec_init(&c);
    put32(buf, bad_lens[i]);
    put32(buf + 4, (uint32_t)-2);
    CHECK(recv_all(&c, buf, 8, &frames) == MTP_EPROTO);
    mtp_rpc_codec_free(&c);
  }
  mtp_rpc_codec_init(&c);
  put32(buf, MTP_RPC_MAX_FRAME + 4);
  CHECK(recv_all(&c, buf, 4, &frames) == MTP_ETOOBIG);
  mtp_rpc_codec_free(&c);
}

/* A big frame, then many small ones: the buffer shrinks back and stays bounded. */
static void test_buffer_bounded(void) {
  struct mtp_rpc_codec tx, rx;
  mtp_rpc_codec_init(&tx);
  mtp_rpc_codec_init(&rx);
  mtp_rpc_codec_set_tx_key(&tx, K_C2S, IV_C2S);
  mtp_rpc_codec_set_rx_key(&rx, K_C2S, IV_C2S);
  size_t big = 300000;
  uint8_t *body = calloc(1, big), *out = malloc(big + 64);
  CHECK(body && out);
  body[0] = 0xab;
  struct iovec iov = {body, big};
  size_t n = mtp_rpc_sendv(&tx, &iov, 1, out);
  CHECK(n == mtp_rpc_frame_size(&tx, big));
  int frames;
  CHECK(recv_all(&rx, out, n, &frames) == 0 && frames == 1);
  CHECK(rx._cap >= big);
  iov.iov_len = 40;
  for (int i = 0; i < 2000; i++) {
    n = mtp_rpc_sendv(&tx, &iov, 1, out);
    CHECK(recv_all(&rx, out, n, &frames) == 0 && frames == 1);
    CHECK(rx._cap <= 16384);
    CHECK(rx._len - rx._off < 16);
  }
  /* oversized send refused */
  iov.iov_len = MTP_RPC_MAX_FRAME;
  CHECK(mtp_rpc_sendv(&tx, &iov, 1, out) == 0);
  free(body);
  free(out);
  mtp_rpc_codec_free(&tx);
  mtp_rpc_codec_free(&rx);
}

/* Feeds n bytes to rx, which must yield exactly one frame: a PING/PONG `type` with `ping_id`. */
static void recv_one(struct mtp_rpc_codec *rx, const uint8_t *in, size_t n, uint32_t type, int64_t ping_id,
                     struct mtp_rpc_msg *m) {
  const uint8_t *b;
  size_t bl;
  bool has;
  int frames = 0;
  size_t pos = 0;
  while (pos < n) {
    ssize_t r = mtp_rpc_recv(rx, in + pos, n - pos, &b, &bl, &has);
    CHECK(r >= 0);
    pos += (size_t)r;
    if (has) {
      frames++;
      CHECK(mtp_rpc_parse(b, bl, m) == MTP_OK && m->type == type && m->ping_id == ping_id);
    }
  }
  CHECK(frames == 1);
}

/* Client and server codecs talking through derived keys, as in a real connection. */
static void test_conversation(void) {
  struct mtp_rpc_key_params p;
  key_params(&p);
  uint8_t kc[32], ivc[16], ks[32], ivs[16];
  mtp_rpc_derive_keys(&p, true, kc, ivc);
  mtp_rpc_derive_keys(&p, false, ks, ivs);
  CHECK(memcmp(kc, ks, 32) != 0);

  struct mtp_rpc_codec cl, sv;
  mtp_rpc_codec_init(&cl);
  mtp_rpc_codec_init(&sv);
  uint8_t out[512];
  const uint8_t *b;
  size_t bl;
  bool has;
  struct mtp_rpc_nonce non = {.key_selector = 1, .crypto_schema = 1, .crypto_ts = 2};
  uint8_t nb[MTP_RPC_NONCE_LEN];
  mtp_rpc_build_nonce(&non, nb);
  struct iovec iov = {nb, sizeof(nb)};
  size_t n = mtp_rpc_sendv(&cl, &iov, 1, out);
  CHECK(n == 44 && mtp_rpc_recv(&sv, out, n, &b, &bl, &has) == 44 && has);
  n = mtp_rpc_sendv(&sv, &iov, 1, out);
  CHECK(n == 44 && mtp_rpc_recv(&cl, out, n, &b, &bl, &has) == 44 && has);
  mtp_rpc_codec_set_tx_key(&cl, kc, ivc);
  mtp_rpc_codec_set_rx_key(&sv, kc, ivc);
  mtp_rpc_codec_set_tx_key(&sv, ks, ivs);
  mtp_rpc_codec_set_rx_key(&cl, ks, ivs);
  for (int round = 0; round < 5; round++) {
    uint8_t ping[12];
    mtp_rpc_build_ping(1000 + round, ping);
    iov.iov_base = ping;
    iov.iov_len = 12;
    n = mtp_rpc_sendv(&cl, &iov, 1, out);
    CHECK(n == 32);
    struct mtp_rpc_msg m;
    recv_one(&sv, out, n, MTP_RPC_PING, 1000 + round, &m);
    uint8_t pong[12];
    mtp_rpc_build_pong(m.ping_id, pong);
    iov.iov_base = pong;
    n = mtp_rpc_sendv(&sv, &iov, 1, out);
    recv_one(&cl, out, n, MTP_RPC_PONG, 1000 + round, &m);
  }
  mtp_rpc_codec_free(&cl);
  mtp_rpc_codec_free(&sv);
}

/* ---- messages ---- */

static void test_messages(void) {
  struct mtp_rpc_msg m;
  uint8_t buf[256];

  /* nonce */
  struct mtp_rpc_nonce non = {.key_selector = 0xdeadbeef, .crypto_schema = 1, .crypto_ts = 0x01020304};
  for (int i = 0; i < 16; i++)
    non.nonce[i] = (uint8_t)(0xc0 + i);
  CHECK(mtp_rpc_build_nonce(&non, buf) == 32);
  CHECK(get32(buf) == 0x7acb87aau && get32(buf + 4) == 0xdeadbeef && get32(buf + 8) == 1 &&
        get32(buf + 12) == 0x01020304 && buf[16] == 0xc0 && buf[31] == 0xcf);
  struct mtp_rpc_nonce n2;
  CHECK(mtp_rpc_parse_nonce(buf, 32, &n2) == MTP_OK && memcmp(&n2, &non, sizeof(non)) == 0);
  CHECK(mtp_rpc_parse_nonce(buf, 28, &n2) == MTP_EPROTO);
  CHECK(mtp_rpc_parse(buf, 32, &m) == MTP_OK && m.type == MTP_RPC_NONCE && m.nonce.crypto_ts == 0x01020304);

  /* handshake: type flags, pid{ip port pid utime} x2 */
  struct mtp_rpc_pid s = {0x0a000001, 443, 1234, 1700000000}, pe = {0x959aaf32, 8888, 0, 0};
  CHECK(mtp_rpc_build_handshake(MTP_RPC_HS_FLAG_CRC32C, &s, &pe, buf) == 32);
  static const uint8_t hs_ref[32] = {0xf5, 0xee, 0x82, 0x76, 0x00, 0x08, 0x00, 0x00, 0x01, 0x00, 0x00,
                                     0x0a, 0xbb, 0x01, 0xd2, 0x04, 0x00, 0xf1, 0x53, 0x65, 0x32, 0xaf,
                                     0x9a, 0x95, 0xb8, 0x22, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  CHECK(memcmp(buf, hs_ref, 32) == 0);
  CHECK(mtp_rpc_parse(buf, 32, &m) == MTP_OK && m.type == MTP_RPC_HANDSHAKE && m.flags == 0x800 &&
        m.sender.ip == s.ip && m.sender.port == 443 && m.sender.pid == 1234 && m.sender.utime == s.utime &&
        m.peer.ip == pe.ip && m.peer.port == 8888);
  CHECK(mtp_rpc_parse(buf, 28, &m) == MTP_EPROTO);

  /* handshake error: type, code, sender pid */
  put32(buf, MTP_RPC_HANDSHAKE_ERROR);
  put32(buf + 4, (uint32_t)-4);
  CHECK(mtp_rpc_parse(buf, 20, &m) == MTP_OK && m.type == MTP_RPC_HANDSHAKE_ERROR && (int32_t)m.flags == -4);

  /* PROXY_REQ without ad_tag: 56 bytes, IPv4-mapped addresses, MAGIC|EXTMODE2 added */
  uint8_t cip[16] = {0}, pip[16] = {0};
  cip[10] = cip[11] = 0xff;
  cip[12] = 198, cip[13] = 51, cip[14] = 100, cip[15] = 9;
  pip[10] = pip[11] = 0xff;
  pip[12] = 203, pip[13] = 0, pip[14] = 113, pip[15] = 7;
  uint32_t fl = mtp_rpc_proxy_req_flags(MTP_PROTO_ABRIDGED, false);
  size_t n = mtp_rpc_build_proxy_req_hdr(fl, 0x1122334455667788ull, cip, 51234, pip, 443, NULL, buf);
  CHECK(n == 56);
  CHECK(get32(buf) == 0x36cef1eeu);
  CHECK(get32(buf + 4) == (0x40000000u | 0x20000u | 0x1000u));
  CHECK(get32(buf + 8) == 0x55667788u && get32(buf + 12) == 0x11223344u);
  static const uint8_t mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 9};
  CHECK(memcmp(buf + 16, mapped, 16) == 0);
  CHECK(get32(buf + 32) == 51234 && get32(buf + 52) == 443);
  CHECK(memcmp(buf + 36, pip, 16) == 0);
  static const uint8_t pkt[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
  memcpy(buf + n, pkt, 20);
  CHECK(mtp_rpc_parse(buf, n + 20, &m) == MTP_OK);
  CHECK(m.type == MTP_RPC_PROXY_REQ && m.conn_id == 0x1122334455667788ull && !m.has_ad_tag);
  CHECK(memcmp(m.client_ip, cip, 16) == 0 && memcmp(m.proxy_ip, pip, 16) == 0);
  CHECK(m.client_port == 51234 && m.proxy_port == 443);
  CHECK(m.data == buf + 56 && m.data_len == 20);

  /* PROXY_REQ with ad_tag, intermediate, quick ack, unencrypted packet */
  uint8_t tag[16];
  for (int i = 0; i < 16; i++)
    tag[i] = (uint8_t)(0xa0 + i);
  uint8_t zpkt[28] = {0};
  zpkt[20] = 0x78;
  fl = mtp_rpc_proxy_req_flags(MTP_PROTO_INTERMEDIATE, true) | mtp_rpc_packet_flags(zpkt, sizeof(zpkt));
  n = mtp_rpc_build_proxy_req_hdr(fl, 7, cip, 1, pip, 2, tag, buf);
  CHECK(n == 56 + 4 + 24 && n <= MTP_RPC_PROXY_REQ_HDR_MAX);
  CHECK(get32(buf + 4) == (0x80000000u | 0x20000000u | 0x20000u | 0x1000u | 0x8u | 0x2u));
  CHECK(get32(buf + 56) == 24);              /* extra_size */
  CHECK(get32(buf + 60) == 0xdb1e26aeu);     /* TL proxy tag */
  CHECK(buf[64] == 16);                      /* TL string length byte */
  CHECK(memcmp(buf + 65, tag, 16) == 0);
  CHECK(buf[81] == 0 && buf[82] == 0 && buf[83] == 0); /* padding */
  memcpy(buf + n, zpkt, sizeof(zpkt));
  CHECK(mtp_rpc_parse(buf, n + sizeof(zpkt), &m) == MTP_OK);
  CHECK(m.has_ad_tag && memcmp(m.ad_tag, tag, 16) == 0 && m.conn_id == 7);
  CHECK(m.flags == get32(buf + 4) && m.data == buf + n && m.data_len == sizeof(zpkt));
  /* extra_size beyond the body */
  put32(buf + 56, 200);
  CHECK(mtp_rpc_parse(buf, n + sizeof(zpkt), &m) == MTP_EPROTO);
  CHECK(mtp_rpc_parse(buf, 40, &m) == MTP_EPROTO);

  /* framing flags: the padded framing goes as INTERMEDIATE (official masks PAD out) */
  CHECK(mtp_rpc_proxy_req_flags(MTP_PROTO_ABRIDGED, false) == 0x40000000u);
  CHECK(mtp_rpc_proxy_req_flags(MTP_PROTO_INTERMEDIATE, false) == 0x20000000u);
  CHECK(mtp_rpc_proxy_req_flags(MTP_PROTO_PADDED, false) == 0x20000000u);
  CHECK(mtp_rpc_proxy_req_flags(MTP_PROTO_PADDED, true) == 0xa0000000u);
  CHECK(mtp_rpc_packet_flags(zpkt, 28) == MTP_RPC_FLAG_NOT_ENCRYPTED);
  CHECK(mtp_rpc_packet_flags(pkt, 20) == 0);
  CHECK(mtp_rpc_packet_flags(zpkt, 4) == 0);

  /* PROXY_ANS */
  CHECK(mtp_rpc_build_proxy_ans_hdr(0x8, 0xfedcba9876543210ull, buf) == 16);
  CHECK(get32(buf) == 0x4403da0du && get32(buf + 4) == 8 && get32(buf + 8) == 0x76543210u);
  memcpy(buf + 16, pkt, 20);
  CHECK(mtp_rpc_parse(buf, 36, &m) == MTP_OK && m.type == MTP_RPC_PROXY_ANS && m.flags == 8 &&
        m.conn_id == 0xfedcba9876543210ull && m.data == buf + 16 && m.data_len == 20);
  CHECK(mtp_rpc_parse(buf, 12, &m) == MTP_EPROTO);

  /* SIMPLE_ACK */
  CHECK(mtp_rpc_build_simple_ack(42, 0x87654321u, buf) == 16);
  CHECK(get32(buf) == 0x3bac409bu && get32(buf + 4) == 42 && get32(buf + 12) == 0x87654321u);
  CHECK(mtp_rpc_parse(buf, 16, &m) == MTP_OK && m.type == MTP_RPC_SIMPLE_ACK && m.conn_id == 42 &&
        m.token == 0x87654321u);
  CHECK(mtp_rpc_parse(buf, 20, &m) == MTP_EPROTO);

  /* CLOSE_EXT, CLOSE_CONN */
  CHECK(mtp_rpc_build_close_ext(99, buf) == 12 && get32(buf) == 0x5eb634a2u);
  CHECK(mtp_rpc_parse(buf, 12, &m) == MTP_OK && m.type == MTP_RPC_CLOSE_EXT && m.conn_id == 99);
  CHECK(mtp_rpc_parse(buf, 16, &m) == MTP_EPROTO);
  CHECK(mtp_rpc_build_close_conn(100, buf) == 12 && get32(buf) == 0x1fcf425du);
  CHECK(mtp_rpc_parse(buf, 12, &m) == MTP_OK && m.type == MTP_RPC_CLOSE_CONN && m.conn_id == 100);

  /* PING, PONG (negative ids survive) */
  CHECK(mtp_rpc_build_ping(-5, buf) == 12 && get32(buf) == 0x5730a2dfu && get32(buf + 4) == 0xfffffffbu);
  CHECK(mtp_rpc_parse(buf, 12, &m) == MTP_OK && m.type == MTP_RPC_PING && m.ping_id == -5);
  CHECK(mtp_rpc_build_pong(77, buf) == 12 && get32(buf) == 0x8430eaa7u);
  CHECK(mtp_rpc_parse(buf, 12, &m) == MTP_OK && m.type == MTP_RPC_PONG && m.ping_id == 77);
  CHECK(mtp_rpc_parse(buf, 8, &m) == MTP_EPROTO);

  /* unknown type, too short */
  put32(buf, 0x12345678);
  CHECK(mtp_rpc_parse(buf, 16, &m) == MTP_EPROTO);
  CHECK(mtp_rpc_parse(buf, 2, &m) == MTP_EPROTO);
}

int main(void) {
  test_keys();
  test_send();
  test_recv_errors();
  test_recv_splits(false);
  test_recv_splits(true);
  test_buffer_bounded();
  test_conversation();
  test_messages();
  return check_report();
}
