/*
 * crypto.c - thin wrappers over mbedTLS and zlib, the kernel's random source, a per-thread
 * PRNG for non-secret randomness, and a table-driven CRC32C.
 */
#include "crypto.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <zlib.h>

#include <mbedtls/md.h>
#include <mbedtls/md5.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/sha1.h>
#include <mbedtls/sha256.h>

#include "err.h"
#include "banned.h"

/* ---- hashes ---------------------------------------------------------------------------- */

void mtp_sha256(const void *data, size_t len, uint8_t out[32]) {
  mbedtls_sha256_ret(data, len, out, 0);
}

void mtp_sha256_2(const void *a, size_t alen, const void *b, size_t blen, uint8_t out[32]) {
  mbedtls_sha256_context ctx;
  mbedtls_sha256_init(&ctx);
  mbedtls_sha256_starts_ret(&ctx, 0);
  mbedtls_sha256_update_ret(&ctx, a, alen);
  mbedtls_sha256_update_ret(&ctx, b, blen);
  mbedtls_sha256_finish_ret(&ctx, out);
  mbedtls_sha256_free(&ctx);
}

void mtp_sha1(const void *data, size_t len, uint8_t out[20]) {
  mbedtls_sha1_ret(data, len, out);
}

void mtp_md5(const void *data, size_t len, uint8_t out[16]) {
  mbedtls_md5_ret(data, len, out);
}

void mtp_hmac_sha256(const void *key, size_t keylen, const void *data, size_t len, uint8_t out[32]) {
  mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), key, keylen, data, len, out);
}

/* ---- randomness ------------------------------------------------------------------------ */

int mtp_random(void *buf, size_t n) {
  uint8_t *p = buf;
  while (n > 0) {
    ssize_t r = getrandom(p, n, 0);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return MTP_EIO;
    }
    p += (size_t)r;
    n -= (size_t)r;
  }
  return MTP_OK;
}

/* splitmix64: tiny, fast and good enough for padding sizes and jitter. The state is
 * per-thread so no locking is needed; it is seeded lazily from the kernel. */
static _Thread_local uint64_t prng_state;
static _Thread_local bool prng_seeded;

static uint64_t prng_next(void) {
  if (!prng_seeded) {
    if (mtp_random(&prng_state, sizeof prng_state) != MTP_OK)
      prng_state = (uint64_t)(uintptr_t)&prng_state ^ 0x9e3779b97f4a7c15ull;
    prng_seeded = true;
  }
  uint64_t z = (prng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint32_t mtp_random_below(uint32_t bound) {
  if (bound <= 1)
    return 0;
  /* Lemire's multiply-shift with rejection of the biased low range: exactly uniform. */
  uint32_t threshold = (uint32_t)(-bound) % bound;
  for (;;) {
    uint32_t x = (uint32_t)(prng_next() >> 32);
    uint64_t m = (uint64_t)x * bound;
    if ((uint32_t)m >= threshold)
      return (uint32_t)(m >> 32);
  }
}

/* ---- checksums ------------------------------------------------------------------------- */

uint32_t mtp_crc32(uint32_t crc, const void *data, size_t len) {
  const uint8_t *p = data;
  /* zlib takes a uInt length; feed very large inputs in pieces. */
  while (len > 0) {
    uInt chunk = len > (1u << 30) ? (1u << 30) : (uInt)len;
    crc = (uint32_t)crc32(crc, p, chunk);
    p += chunk;
    len -= chunk;
  }
  return crc;
}

/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8 tables built once. */
static uint32_t crc32c_table[8][256];
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_build(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++)
      c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crc32c_table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = crc32c_table[0][i];
    for (int t = 1; t < 8; t++) {
      c = crc32c_table[0][c & 0xff] ^ (c >> 8);
      crc32c_table[t][i] = c;
    }
  }
}

uint32_t mtp_crc32c(uint32_t crc, const void *data, size_t len) {
  pthread_once(&crc32c_once, crc32c_build);
  const uint8_t *p = data;
  uint32_t c = ~crc;
  while (len >= 8) {
    uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
    uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
    c = crc32c_table[7][lo & 0xff] ^ crc32c_table[6][(lo >> 8) & 0xff] ^ crc32c_table[5][(lo >> 16) & 0xff] ^
        crc32c_table[4][lo >> 24] ^ crc32c_table[3][hi & 0xff] ^ crc32c_table[2][(hi >> 8) & 0xff] ^
        crc32c_table[1][(hi >> 16) & 0xff] ^ crc32c_table[0][hi >> 24];
    p += 8;
    len -= 8;
  }
  while (len-- > 0)
    c = crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return ~c;
}

/* ---- small helpers --------------------------------------------------------------------- */

bool mtp_ct_equal(const void *a, const void *b, size_t n) {
  const volatile uint8_t *x = a;
  const volatile uint8_t *y = b;
  uint8_t diff = 0;
  for (size_t i = 0; i < n; i++)
    diff |= (uint8_t)(x[i] ^ y[i]);
  return diff == 0;
}

void mtp_wipe(void *p, size_t n) {
  mbedtls_platform_zeroize(p, n);
}

/* ---- AES-256-CTR ----------------------------------------------------------------------- */

/* Big-endian increment of the whole 16-byte counter block, as mbedtls_aes_crypt_ctr does. */
static void ctr_inc(uint8_t ctr[16]) {
  for (int i = 15; i >= 0; i--)
    if (++ctr[i] != 0)
      break;
}

void mtp_aes_ctr_setup(struct mtp_aes_ctr *c, const uint8_t key[32], const uint8_t iv[16]) {
  mbedtls_aes_init(&c->_aes);
  mbedtls_aes_setkey_enc(&c->_aes, key, 256);
  memcpy(c->_ctr, iv, 16);
  memset(c->_block, 0, sizeof c->_block);
  c->_off = 0; /* 0: the next byte needs a fresh keystream block */
}

void mtp_aes_ctr_crypt(struct mtp_aes_ctr *c, const uint8_t *in, uint8_t *out, size_t n) {
  size_t i = 0;
  /* Finish the keystream block left over from the previous call. */
  while (c->_off != 0 && i < n) {
    out[i] = in[i] ^ c->_block[c->_off];
    i++;
    c->_off = (c->_off + 1) & 15;
  }
  /* Whole blocks: a few keystream blocks at a time, XORed 8 bytes at a time. */
  while (n - i >= 16) {
    uint8_t ks[64];
    size_t blocks = (n - i) / 16;
    if (blocks > 4)
      blocks = 4;
    for (size_t b = 0; b < blocks; b++) {
      mbedtls_aes_crypt_ecb(&c->_aes, MBEDTLS_AES_ENCRYPT, c->_ctr, ks + 16 * b);
      ctr_inc(c->_ctr);
    }
    for (size_t k = 0; k < blocks * 16; k += 8) {
      uint64_t x, y;
      memcpy(&x, in + i + k, 8);
      memcpy(&y, ks + k, 8);
      x ^= y;
      memcpy(out + i + k, &x, 8);
    }
    i += blocks * 16;
  }
  /* Tail: start a new block and remember where we stopped. */
  if (i < n) {
    mbedtls_aes_crypt_ecb(&c->_aes, MBEDTLS_AES_ENCRYPT, c->_ctr, c->_block);
    ctr_inc(c->_ctr);
    while (i < n) {
      out[i] = in[i] ^ c->_block[c->_off];
      i++;
      c->_off++;
    }
  }
}

void mtp_aes_ctr_free(struct mtp_aes_ctr *c) {
  if (c == NULL)
    return;
  mbedtls_aes_free(&c->_aes);
  mtp_wipe(c->_ctr, sizeof c->_ctr);
  mtp_wipe(c->_block, sizeof c->_block);
  c->_off = 0;
}

/* ---- AES-256-CBC ----------------------------------------------------------------------- */

void mtp_aes_cbc_setup(struct mtp_aes_cbc *c, const uint8_t key[32], const uint8_t iv[16], bool encrypt) {
  mbedtls_aes_init(&c->_aes);
  if (encrypt)
    mbedtls_aes_setkey_enc(&c->_aes, key, 256);
  else
    mbedtls_aes_setkey_dec(&c->_aes, key, 256);
  memcpy(c->_iv, iv, 16);
  c->_mode = encrypt ? MBEDTLS_AES_ENCRYPT : MBEDTLS_AES_DECRYPT;
}

void mtp_aes_cbc_crypt(struct mtp_aes_cbc *c, const uint8_t *in, uint8_t *out, size_t n) {
  /* mbedtls_aes_crypt_cbc updates c->_iv in place, so the chain continues across calls. */
  mbedtls_aes_crypt_cbc(&c->_aes, c->_mode, n & ~(size_t)15, c->_iv, in, out);
}

void mtp_aes_cbc_free(struct mtp_aes_cbc *c) {
  if (c == NULL)
    return;
  mbedtls_aes_free(&c->_aes);
  mtp_wipe(c->_iv, sizeof c->_iv);
}

/* ---- hex ------------------------------------------------------------------------------- */

int mtp_hex_digit(char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

int mtp_hex_decode(const char *hex, uint8_t *out, size_t outlen) {
  size_t len = strlen(hex);
  if (len % 2 != 0 || len / 2 > outlen || len / 2 > (size_t)0x7fffffff)
    return MTP_EINVAL;
  for (size_t i = 0; i < len / 2; i++) {
    int hi = mtp_hex_digit(hex[2 * i]);
    int lo = mtp_hex_digit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return MTP_EINVAL;
    out[i] = (uint8_t)(hi << 4 | lo);
  }
  return (int)(len / 2);
}

void mtp_hex_encode(const uint8_t *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 15];
  }
  out[2 * n] = '\0';
}
