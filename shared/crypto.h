/*
 * crypto.h - thin wrappers over mbedTLS (hashes, HMAC, AES-CTR/CBC), the OS random source,
 * and zlib's CRC32 (+ CRC32C). No uv.h here: pure functions and small contexts.
 */
#ifndef MTP_CRYPTO_H
#define MTP_CRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <mbedtls/aes.h>

void mtp_sha256(const void *data, size_t len, uint8_t out[32]);
/* SHA-256 of a || b (saves building the concatenation). */
void mtp_sha256_2(const void *a, size_t alen, const void *b, size_t blen, uint8_t out[32]);
void mtp_sha1(const void *data, size_t len, uint8_t out[20]);
void mtp_md5(const void *data, size_t len, uint8_t out[16]);
void mtp_hmac_sha256(const void *key, size_t keylen, const void *data, size_t len, uint8_t out[32]);

/* Fills buf with n bytes from the kernel's CSPRNG (getrandom). Returns MTP_OK or MTP_EIO. */
int mtp_random(void *buf, size_t n);
/* A uniformly random integer in [0, bound) (bound > 0), from a fast per-thread PRNG seeded
 * from mtp_random; for padding sizes and jitter, not for keys. */
uint32_t mtp_random_below(uint32_t bound);

/* CRC32 (IEEE, zlib's) and CRC32C (Castagnoli); crc is the running value, start with 0. */
uint32_t mtp_crc32(uint32_t crc, const void *data, size_t len);
uint32_t mtp_crc32c(uint32_t crc, const void *data, size_t len);

/* Constant-time comparison: true when the n bytes are equal. */
bool mtp_ct_equal(const void *a, const void *b, size_t n);

/* Erases n bytes in a way the compiler cannot drop. */
void mtp_wipe(void *p, size_t n);

/* AES-256-CTR: one continuous keystream (encrypt == decrypt). */
struct mtp_aes_ctr {
  mbedtls_aes_context _aes;
  uint8_t _ctr[16];
  uint8_t _block[16];
  size_t _off;
};
void mtp_aes_ctr_setup(struct mtp_aes_ctr *c, const uint8_t key[32], const uint8_t iv[16]);
/* Transforms n bytes; in == out is allowed. */
void mtp_aes_ctr_crypt(struct mtp_aes_ctr *c, const uint8_t *in, uint8_t *out, size_t n);
void mtp_aes_ctr_free(struct mtp_aes_ctr *c);

/* AES-256-CBC without padding; the IV chains across calls. */
struct mtp_aes_cbc {
  mbedtls_aes_context _aes;
  uint8_t _iv[16];
  int _mode; /* MBEDTLS_AES_ENCRYPT or MBEDTLS_AES_DECRYPT */
};
void mtp_aes_cbc_setup(struct mtp_aes_cbc *c, const uint8_t key[32], const uint8_t iv[16], bool encrypt);
/* n must be a multiple of 16; in == out is allowed. */
void mtp_aes_cbc_crypt(struct mtp_aes_cbc *c, const uint8_t *in, uint8_t *out, size_t n);
void mtp_aes_cbc_free(struct mtp_aes_cbc *c);

/* Hex helpers. mtp_hex_digit returns the value 0..15 of a hex digit (either case) or -1.
 * mtp_hex_decode returns the number of bytes written, or MTP_EINVAL on a
 * non-hex character, odd length or when out is too small. mtp_hex_encode writes 2n+1 bytes. */
int mtp_hex_digit(char ch);
int mtp_hex_decode(const char *hex, uint8_t *out, size_t outlen);
void mtp_hex_encode(const uint8_t *in, size_t n, char *out);

#endif
