/*
 * test_crypto.c - known-answer vectors for the hashes, HMAC, CRCs and AES modes, plus the
 * properties the rest of the proxy relies on: AES-CTR gives the same keystream however the
 * input is split, and CBC chains its IV across calls.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/aes.h>

#include "crypto.h"
#include "err.h"
#include "check.h"

/* Decodes a hex literal into a static-sized buffer; fails the test on bad input. */
static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
  int n = mtp_hex_decode(hex, out, cap);
  CHECK(n >= 0);
  return (size_t)n;
}

static void check_hex(const uint8_t *got, size_t n, const char *want_hex) {
  uint8_t want[256];
  size_t wn = unhex(want_hex, want, sizeof want);
  CHECK(wn == n);
  CHECK(memcmp(got, want, n) == 0);
}

static void test_hashes(void) {
  uint8_t out[32];
  struct {
    const char *msg;
    const char *sha256, *sha1, *md5;
  } v[] = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
       "da39a3ee5e6b4b0d3255bfef95601890afd80709", "d41d8cd98f00b204e9800998ecf8427e"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
       "a9993e364706816aba3e25717850c26c9cd0d89d", "900150983cd24fb0d6963f7d28e17f72"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
       "84983e441c3bd26ebaae4aa1f95129e5e54670f1", "8215ef0796a20bcaaae116d3876c664a"},
  };
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    size_t n = strlen(v[i].msg);
    mtp_sha256(v[i].msg, n, out);
    check_hex(out, 32, v[i].sha256);
    mtp_sha1(v[i].msg, n, out);
    check_hex(out, 20, v[i].sha1);
    mtp_md5(v[i].msg, n, out);
    check_hex(out, 16, v[i].md5);
    /* sha256_2 equals the hash of the concatenation, at every split point. */
    for (size_t k = 0; k <= n; k++) {
      mtp_sha256_2(v[i].msg, k, v[i].msg + k, n - k, out);
      check_hex(out, 32, v[i].sha256);
    }
  }
}

static void test_hmac(void) {
  uint8_t out[32];
  /* RFC 4231 test case 2. */
  const char *data = "what do ya want for nothing?";
  mtp_hmac_sha256("Jefe", 4, data, strlen(data), out);
  check_hex(out, 32, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  /* RFC 4231 test case 1. */
  uint8_t key[20];
  memset(key, 0x0b, sizeof key);
  mtp_hmac_sha256(key, sizeof key, "Hi There", 8, out);
  check_hex(out, 32, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  /* RFC 4231 test case 6: a key longer than the block size. */
  uint8_t longkey[131];
  memset(longkey, 0xaa, sizeof longkey);
  const char *d6 = "Test Using Larger Than Block-Size Key - Hash Key First";
  mtp_hmac_sha256(longkey, sizeof longkey, d6, strlen(d6), out);
  check_hex(out, 32, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
}

static void test_crc(void) {
  const char *check = "123456789";
  CHECK(mtp_crc32(0, check, 9) == 0xCBF43926u);
  CHECK(mtp_crc32c(0, check, 9) == 0xE3069283u);
  CHECK(mtp_crc32(0, "", 0) == 0);
  CHECK(mtp_crc32c(0, "", 0) == 0);
  /* RFC 3720 B.4 iSCSI vectors. */
  uint8_t buf[32];
  memset(buf, 0, sizeof buf);
  CHECK(mtp_crc32c(0, buf, 32) == 0x8A9136AAu);
  memset(buf, 0xff, sizeof buf);
  CHECK(mtp_crc32c(0, buf, 32) == 0x62A8AB43u);
  for (int i = 0; i < 32; i++)
    buf[i] = (uint8_t)i;
  CHECK(mtp_crc32c(0, buf, 32) == 0x46DD794Eu);
  for (int i = 0; i < 32; i++)
    buf[i] = (uint8_t)(31 - i);
  CHECK(mtp_crc32c(0, buf, 32) == 0x113FDB5Cu);
  /* Running values: any split gives the one-shot result (exercises the 8-byte path too). */
  uint8_t big[1000];
  check_fill(big, sizeof big);
  uint32_t one32 = mtp_crc32(0, big, sizeof big), one32c = mtp_crc32c(0, big, sizeof big);
  for (size_t k = 0; k <= sizeof big; k += 7) {
    CHECK(mtp_crc32(mtp_crc32(0, big, k), big + k, sizeof big - k) == one32);
    CHECK(mtp_crc32c(mtp_crc32c(0, big, k), big + k, sizeof big - k) == one32c);
  }
  /* Byte-at-a-time CRC32C equals the sliced path. */
  uint32_t c = 0;
  for (size_t i = 0; i < sizeof big; i++)
    c = mtp_crc32c(c, big + i, 1);
  CHECK(c == one32c);
}

/* NIST SP 800-38A, AES-256 key and the four plaintext blocks. */
static const char *NIST_KEY = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
static const char *NIST_PT = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                             "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";

static void test_aes_ctr_kat(void) {
  uint8_t key[32], iv[16], pt[64], out[64];
  unhex(NIST_KEY, key, 32);
  unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff", iv, 16);
  unhex(NIST_PT, pt, 64);
  struct mtp_aes_ctr c;
  mtp_aes_ctr_setup(&c, key, iv);
  mtp_aes_ctr_crypt(&c, pt, out, 64);
  check_hex(out, 64,
            "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
            "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6");
  mtp_aes_ctr_free(&c);
  /* Decrypting is the same operation, in place. */
  mtp_aes_ctr_setup(&c, key, iv);
  mtp_aes_ctr_crypt(&c, out, out, 64);
  CHECK(memcmp(out, pt, 64) == 0);
  mtp_aes_ctr_free(&c);
}

/* The keystream is continuous however the input is split, and equals mbedTLS's own CTR
 * (big-endian increment of the whole block, including the carry out of the low 64 bits). */
static void test_aes_ctr_splits(void) {
  enum { N = 5000 };
  static uint8_t pt[N], ref[N], out[N];
  uint8_t key[32];
  check_fill(key, sizeof key);
  check_fill(pt, sizeof pt);
  const char *ivs[] = {"000102030405060708090a0b0c0d0e0f", "ffffffffffffffffffffffffffffffff",
                       "00000000000000fffffffffffffffff0", "0123456789abcdef0123456789abcdff"};
  for (size_t v = 0; v < sizeof ivs / sizeof ivs[0]; v++) {
    uint8_t iv[16], nonce[16], stream[16];
    unhex(ivs[v], iv, 16);
    /* Reference: mbedtls_aes_crypt_ctr in one shot. */
    mbedtls_aes_context aes;
    mbedtls_aes_init(&aes);
    mbedtls_aes_setkey_enc(&aes, key, 256);
    memcpy(nonce, iv, 16);
    size_t nc_off = 0;
    CHECK(mbedtls_aes_crypt_ctr(&aes, N, &nc_off, nonce, stream, pt, ref) == 0);
    mbedtls_aes_free(&aes);

    struct mtp_aes_ctr c;
    mtp_aes_ctr_setup(&c, key, iv);
    mtp_aes_ctr_crypt(&c, pt, out, N);
    mtp_aes_ctr_free(&c);
    CHECK(memcmp(out, ref, N) == 0);

    /* Random chunk sizes, including 0, 1, 15, 16, 17 and large. */
    for (int round = 0; round < 20; round++) {
      memset(out, 0, N);
      mtp_aes_ctr_setup(&c, key, iv);
      size_t pos = 0;
      while (pos < N) {
        static const size_t sizes[] = {0, 1, 3, 15, 16, 17, 31, 32, 33, 64, 100, 257, 1000};
        size_t k = sizes[check_rand32() % (sizeof sizes / sizeof sizes[0])];
        if (k > N - pos)
          k = N - pos;
        mtp_aes_ctr_crypt(&c, pt + pos, out + pos, k);
        pos += k;
      }
      mtp_aes_ctr_free(&c);
      CHECK(memcmp(out, ref, N) == 0);
    }
    /* Byte by byte, in place. */
    memcpy(out, pt, N);
    mtp_aes_ctr_setup(&c, key, iv);
    for (size_t i = 0; i < N; i++)
      mtp_aes_ctr_crypt(&c, out + i, out + i, 1);
    mtp_aes_ctr_free(&c);
    CHECK(memcmp(out, ref, N) == 0);
    /* Every two-piece split of the first 100 bytes. */
    for (size_t k = 0; k <= 100; k++) {
      mtp_aes_ctr_setup(&c, key, iv);
      mtp_aes_ctr_crypt(&c, pt, out, k);
      mtp_aes_ctr_crypt(&c, pt + k, out + k, 100 - k);
      mtp_aes_ctr_free(&c);
      CHECK(memcmp(out, ref, 100) == 0);
    }
  }
}

static void test_aes_cbc(void) {
  uint8_t key[32], iv[16], pt[64], out[64], back[64];
  unhex(NIST_KEY, key, 32);
  unhex("000102030405060708090a0b0c0d0e0f", iv, 16);
  unhex(NIST_PT, pt, 64);
  const char *want = "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"
                     "39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b";
  struct mtp_aes_cbc c;
  mtp_aes_cbc_setup(&c, key, iv, true);
  mtp_aes_cbc_crypt(&c, pt, out, 64);
  mtp_aes_cbc_free(&c);
  check_hex(out, 64, want);
  /* Chained across calls at every block boundary. */
  for (size_t k = 0; k <= 64; k += 16) {
    memset(out, 0, sizeof out);
    mtp_aes_cbc_setup(&c, key, iv, true);
    mtp_aes_cbc_crypt(&c, pt, out, k);
    mtp_aes_cbc_crypt(&c, pt + k, out + k, 64 - k);
    mtp_aes_cbc_free(&c);
    check_hex(out, 64, want);
    mtp_aes_cbc_setup(&c, key, iv, false);
    mtp_aes_cbc_crypt(&c, out, back, k);
    mtp_aes_cbc_crypt(&c, out + k, back + k, 64 - k);
    mtp_aes_cbc_free(&c);
    CHECK(memcmp(back, pt, 64) == 0);
  }
  /* Block by block in place, both directions. */
  memcpy(out, pt, 64);
  mtp_aes_cbc_setup(&c, key, iv, true);
  for (size_t i = 0; i < 64; i += 16)
    mtp_aes_cbc_crypt(&c, out + i, out + i, 16);
  mtp_aes_cbc_free(&c);
  check_hex(out, 64, want);
  mtp_aes_cbc_setup(&c, key, iv, false);
  for (size_t i = 0; i < 64; i += 16)
    mtp_aes_cbc_crypt(&c, out + i, out + i, 16);
  mtp_aes_cbc_free(&c);
  CHECK(memcmp(out, pt, 64) == 0);
}

static void test_random(void) {
  uint8_t a[64], b[64];
  memset(a, 0, sizeof a);
  memset(b, 0, sizeof b);
  CHECK(mtp_random(a, sizeof a) == MTP_OK);
  CHECK(mtp_random(b, sizeof b) == MTP_OK);
  CHECK(memcmp(a, b, sizeof a) != 0);
  CHECK(mtp_random(a, 0) == MTP_OK);
  static uint8_t big[100000];
  CHECK(mtp_random(big, sizeof big) == MTP_OK);
  size_t zeros = 0;
  for (size_t i = 0; i < sizeof big; i++)
    zeros += big[i] == 0;
  CHECK(zeros < 1000); /* expected ~390 */

  CHECK(mtp_random_below(1) == 0);
  uint32_t seen[4] = {0};
  for (int i = 0; i < 4000; i++) {
    uint32_t r = mtp_random_below(4);
    CHECK(r < 4);
    seen[r]++;
  }
  for (int i = 0; i < 4; i++)
    CHECK(seen[i] > 700 && seen[i] < 1300);
  for (int i = 0; i < 1000; i++) {
    CHECK(mtp_random_below(7) < 7);
    CHECK(mtp_random_below(0xffffffffu) < 0xffffffffu);
  }
}

static void test_hex_and_helpers(void) {
  uint8_t out[8];
  char s[17];
  CHECK(mtp_hex_decode("", out, sizeof out) == 0);
  CHECK(mtp_hex_decode("00ff7fA0", out, sizeof out) == 4);
  CHECK(out[0] == 0x00 && out[1] == 0xff && out[2] == 0x7f && out[3] == 0xa0);
  CHECK(mtp_hex_decode("abc", out, sizeof out) == MTP_EINVAL);
  CHECK(mtp_hex_decode("zz", out, sizeof out) == MTP_EINVAL);
  CHECK(mtp_hex_decode("0g", out, sizeof out) == MTP_EINVAL);
  CHECK(mtp_hex_decode("000102030405060708", out, sizeof out) == MTP_EINVAL);
  CHECK(mtp_hex_decode("0001020304050607", out, sizeof out) == 8);
  mtp_hex_encode(out, 8, s);
  CHECK(strcmp(s, "0001020304050607") == 0);
  uint8_t x[3] = {0xde, 0xad, 0x0f};
  mtp_hex_encode(x, 3, s);
  CHECK(strcmp(s, "dead0f") == 0);
  mtp_hex_encode(x, 0, s);
  CHECK(s[0] == '\0');

  CHECK(mtp_ct_equal("abcd", "abcd", 4));
  CHECK(!mtp_ct_equal("abcd", "abce", 4));
  CHECK(!mtp_ct_equal("xbcd", "abcd", 4));
  CHECK(mtp_ct_equal("a", "b", 0));
  uint8_t w[16];
  memset(w, 0x5a, sizeof w);
  mtp_wipe(w, sizeof w);
  for (size_t i = 0; i < sizeof w; i++)
    CHECK(w[i] == 0);
}

int main(void) {
  check_seed(0x1234567887654321ull);
  test_hashes();
  test_hmac();
  test_crc();
  test_aes_ctr_kat();
  test_aes_ctr_splits();
  test_aes_cbc();
  test_random();
  test_hex_and_helpers();
  return check_report();
}
