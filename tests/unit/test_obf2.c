/*
 * test_obf2.c - the obfuscated2 header: a known-answer vector computed here directly with
 * mbedTLS (so a swapped key direction or a wrong reversal cannot cancel itself out), round
 * trips connect -> accept for every protocol and several DCs, secret selection, and the two
 * streams after the handshake.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/aes.h>
#include <mbedtls/sha256.h>

#include "crypto.h"
#include "err.h"
#include "obf2.h"
#include "check.h"

/* Reference AES-256-CTR from offset `skip` of the keystream, straight from mbedTLS. */
static void ref_ctr(const uint8_t key[32], const uint8_t iv[16], size_t skip, const uint8_t *in, uint8_t *out,
                    size_t n) {
  mbedtls_aes_context aes;
  uint8_t nonce[16], stream[16];
  size_t off = 0;
  mbedtls_aes_init(&aes);
  CHECK(mbedtls_aes_setkey_enc(&aes, key, 256) == 0);
  memcpy(nonce, iv, 16);
  uint8_t *tmp = malloc(skip + n);
  CHECK(tmp != NULL);
  memset(tmp, 0, skip);
  memcpy(tmp + skip, in, n);
  CHECK(mbedtls_aes_crypt_ctr(&aes, skip + n, &off, nonce, stream, tmp, tmp) == 0);
  memcpy(out, tmp + skip, n);
  free(tmp);
  mbedtls_aes_free(&aes);
}

static void ref_key(const uint8_t *k32, const uint8_t secret[16], uint8_t out[32]) {
  uint8_t buf[48];
  memcpy(buf, k32, 32);
  memcpy(buf + 32, secret, 16);
  CHECK(mbedtls_sha256_ret(buf, sizeof buf, out, 0) == 0);
}

/* Known answer: a fixed header built and encrypted as the protocol description says. */
static void test_known_answer(void) {
  uint8_t plain[64], wire[64], enc[64];
  uint8_t secrets[3][16];
  for (int i = 0; i < 64; i++)
    plain[i] = (uint8_t)(i * 7 + 3);
  plain[56] = plain[57] = plain[58] = plain[59] = 0xdd;
  plain[60] = 0xfe; /* dc = -2 */
  plain[61] = 0xff;
  for (int s = 0; s < 3; s++)
    for (int i = 0; i < 16; i++)
      secrets[s][i] = (uint8_t)(0x10 * s + i);

  /* Client -> proxy: key = SHA-256(h[8..40] || secret), iv = h[40..56]. */
  uint8_t ckey[32], civ[16], skey[32], siv[16], rev[48];
  ref_key(plain + 8, secrets[2], ckey);
  memcpy(civ, plain + 40, 16);
  /* Proxy -> client: the 48 bytes h[8..56] reversed. */
  for (int i = 0; i < 48; i++)
    rev[i] = plain[55 - i];
  ref_key(rev, secrets[2], skey);
  memcpy(siv, rev + 32, 16);
  /* Spot-check the reversal itself: rev[0] is h[55], rev[47] is h[8]. */
  CHECK(rev[0] == plain[55] && rev[31] == plain[24] && rev[32] == plain[23] && rev[47] == plain[8]);

  ref_ctr(ckey, civ, 0, plain, enc, 64);
  memcpy(wire, plain, 56);
  memcpy(wire + 56, enc + 56, 8);

  struct mtp_obf2 srv;
  struct mtp_obf2_result res;
  memset(&srv, 0, sizeof srv);
  memset(&res, 0, sizeof res);
  CHECK(mtp_obf2_accept(&srv, wire, (const uint8_t(*)[16])secrets, 3, &res) == MTP_OK);
  CHECK(res.proto == MTP_PROTO_PADDED);
  CHECK(res.dc == -2);
  CHECK(res.secret_index == 2);

  /* Client data after the header: the client stream continues at offset 64. */
  uint8_t msg[300], ct[300], got[300];
  check_fill(msg, sizeof msg);
  ref_ctr(ckey, civ, 64, msg, ct, sizeof msg);
  mtp_aes_ctr_crypt(&srv.rx, ct, got, sizeof ct);
  CHECK(memcmp(got, msg, sizeof msg) == 0);
  /* Proxy data: the reverse stream has sent nothing yet, so it starts at offset 0. */
  ref_ctr(skey, siv, 0, msg, ct, sizeof msg);
  mtp_aes_ctr_crypt(&srv.tx, msg, got, sizeof msg);
  CHECK(memcmp(got, ct, sizeof msg) == 0);
  mtp_obf2_free(&srv);

  /* Only the last secret matches: the first two must be rejected. */
  memset(&srv, 0, sizeof srv);
  CHECK(mtp_obf2_accept(&srv, wire, (const uint8_t(*)[16])secrets, 2, &res) == MTP_EBADSECRET);
  /* Without a secret the unhashed keys are used: build that variant too. */
  ref_ctr(plain + 8, civ, 0, plain, enc, 64);
  memcpy(wire + 56, enc + 56, 8);
  memset(&srv, 0, sizeof srv);
  CHECK(mtp_obf2_accept(&srv, wire, NULL, 0, &res) == MTP_OK);
  CHECK(res.proto == MTP_PROTO_PADDED && res.dc == -2 && res.secret_index == 0);
  ref_ctr(rev, siv, 0, msg, ct, sizeof msg);
  mtp_aes_ctr_crypt(&srv.tx, msg, got, sizeof msg);
  CHECK(memcmp(got, ct, sizeof msg) == 0);
  mtp_obf2_free(&srv);

  /* The same vector from the client side: decrypting our own header with an independent
   * reference must show the tag and dc we asked for, and the client's streams must match. */
  struct mtp_obf2 cli;
  uint8_t hdr[64], dec[64];
  memset(&cli, 0, sizeof cli);
  CHECK(mtp_obf2_connect(&cli, secrets[1], MTP_PROTO_INTERMEDIATE, 4, hdr) == MTP_OK);
  ref_key(hdr + 8, secrets[1], ckey);
  ref_ctr(ckey, hdr + 40, 0, hdr, dec, 64);
  CHECK(dec[56] == 0xee && dec[57] == 0xee && dec[58] == 0xee && dec[59] == 0xee);
  CHECK(dec[60] == 4 && dec[61] == 0);
  ref_ctr(ckey, hdr + 40, 64, msg, ct, sizeof msg);
  mtp_aes_ctr_crypt(&cli.tx, msg, got, sizeof msg);
  CHECK(memcmp(got, ct, sizeof msg) == 0);
  for (int i = 0; i < 48; i++)
    rev[i] = hdr[55 - i];
  ref_key(rev, secrets[1], skey);
  ref_ctr(skey, rev + 32, 0, msg, ct, sizeof msg);
  mtp_aes_ctr_crypt(&cli.rx, ct, got, sizeof msg);
  CHECK(memcmp(got, msg, sizeof msg) == 0);
  mtp_obf2_free(&cli);
}

/* Runs n bytes through the stream in random chunks of 1..max_chunk bytes. */
static void crypt_in_chunks(struct mtp_aes_ctr *ctr, const uint8_t *in, uint8_t *out, size_t n, uint32_t max_chunk) {
  size_t pos = 0;
  while (pos < n) {
    size_t k = 1 + check_rand32() % max_chunk;
    if (k > n - pos)
      k = n - pos;
    mtp_aes_ctr_crypt(ctr, in + pos, out + pos, k);
    pos += k;
  }
}

/* Sends n bytes from one stream to the other in random chunks and checks they decrypt. */
static void pump(struct mtp_aes_ctr *enc, struct mtp_aes_ctr *dec, size_t n) {
  uint8_t *msg = malloc(n), *buf = malloc(n);
  CHECK(msg != NULL && buf != NULL);
  check_fill(msg, n);
  crypt_in_chunks(enc, msg, buf, n, 700);
  CHECK(n < 16 || memcmp(msg, buf, n) != 0);
  crypt_in_chunks(dec, buf, buf, n, 333);
  CHECK(memcmp(msg, buf, n) == 0);
  free(msg);
  free(buf);
}

static bool header_is_plausible(const uint8_t h[64]) {
  static const char *const bad[] = {"HEAD", "POST", "GET ", "OPTI", "PVrG", "\xee\xee\xee\xee",
                                    "\xdd\xdd\xdd\xdd", "\x16\x03\x01\x02"};
  if (h[0] == 0xef)
    return false;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    if (memcmp(h, bad[i], 4) == 0)
      return false;
  return !(h[4] == 0 && h[5] == 0 && h[6] == 0 && h[7] == 0);
}

static void test_round_trips(void) {
  const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  const int16_t dcs[] = {1, 2, 3, 4, 5, -1, -2, -5, 0, 203, -203, 32767, -32768};
  uint8_t secrets[4][16];
  check_fill(&secrets[0][0], sizeof secrets);

  for (size_t p = 0; p < 3; p++) {
    for (size_t d = 0; d < sizeof dcs / sizeof dcs[0]; d++) {
      size_t which = (p + d) % 4;
      struct mtp_obf2 cli, srv;
      struct mtp_obf2_result res;
      uint8_t hdr[64];
      memset(&cli, 0, sizeof cli);
      memset(&srv, 0, sizeof srv);
      res.proto = MTP_PROTO_NONE;
      res.dc = 99;
      res.secret_index = -1;
      CHECK(mtp_obf2_connect(&cli, secrets[which], protos[p], dcs[d], hdr) == MTP_OK);
      CHECK(header_is_plausible(hdr));
      CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])secrets, 4, &res) == MTP_OK);
      CHECK(res.proto == protos[p]);
      CHECK(res.dc == dcs[d]);
      CHECK(res.secret_index == (int)which);
      pump(&cli.tx, &srv.rx, 5000 + d * 13);
      pump(&srv.tx, &cli.rx, 7000 + d * 17);
      pump(&cli.tx, &srv.rx, 100);
      mtp_obf2_free(&srv);

      /* Only secrets before the right one: rejected. */
      if (which > 0) {
        memset(&srv, 0, sizeof srv);
        CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])secrets, which, &res) == MTP_EBADSECRET);
      }
      /* Only the matching one: accepted at index 0. */
      memset(&srv, 0, sizeof srv);
      CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])secrets + which, 1, &res) == MTP_OK);
      CHECK(res.secret_index == 0 && res.proto == protos[p] && res.dc == dcs[d]);
      mtp_obf2_free(&srv);
      /* A flipped bit in the encrypted tag: rejected by every secret. */
      hdr[57] ^= 0x01;
      memset(&srv, 0, sizeof srv);
      CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])secrets, 4, &res) == MTP_EBADSECRET);
      /* A flipped key byte changes the derived key: rejected. */
      hdr[57] ^= 0x01;
      hdr[20] ^= 0x80;
      CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])secrets, 4, &res) == MTP_EBADSECRET);
      mtp_obf2_free(&cli);
    }
  }
}

static void test_wrong_and_none(void) {
  uint8_t good[16], wrong[2][16], hdr[64];
  check_fill(good, 16);
  check_fill(&wrong[0][0], sizeof wrong);
  struct mtp_obf2 cli, srv;
  struct mtp_obf2_result res;
  memset(&cli, 0, sizeof cli);
  memset(&srv, 0, sizeof srv);

  CHECK(mtp_obf2_connect(&cli, good, MTP_PROTO_ABRIDGED, 2, hdr) == MTP_OK);
  CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])wrong, 2, &res) == MTP_EBADSECRET);
  mtp_obf2_free(&cli);

  /* Direct mode (no secret) on both sides. */
  memset(&cli, 0, sizeof cli);
  CHECK(mtp_obf2_connect(&cli, NULL, MTP_PROTO_INTERMEDIATE, -3, hdr) == MTP_OK);
  CHECK(mtp_obf2_accept(&srv, hdr, NULL, 0, &res) == MTP_OK);
  CHECK(res.proto == MTP_PROTO_INTERMEDIATE && res.dc == -3);
  pump(&cli.tx, &srv.rx, 4096);
  pump(&srv.tx, &cli.rx, 4096);
  mtp_obf2_free(&srv);
  /* ...but a server that hashes with a secret does not accept it. */
  memset(&srv, 0, sizeof srv);
  CHECK(mtp_obf2_accept(&srv, hdr, (const uint8_t(*)[16])wrong, 2, &res) == MTP_EBADSECRET);
  mtp_obf2_free(&cli);

  /* Freeing twice and freeing a zeroed context are harmless. */
  mtp_obf2_free(&cli);
  memset(&cli, 0, sizeof cli);
  mtp_obf2_free(&cli);
  mtp_obf2_free(NULL);

  /* An invalid protocol is refused. */
  memset(&cli, 0, sizeof cli);
  CHECK(mtp_obf2_connect(&cli, good, MTP_PROTO_NONE, 2, hdr) < 0);

  /* Many generated headers: none starts like another protocol. */
  for (int i = 0; i < 2000; i++) {
    memset(&cli, 0, sizeof cli);
    CHECK(mtp_obf2_connect(&cli, good, MTP_PROTO_PADDED, 1, hdr) == MTP_OK);
    CHECK(header_is_plausible(hdr));
    mtp_obf2_free(&cli);
  }

  CHECK(strcmp(mtp_proto_name(MTP_PROTO_ABRIDGED), "abridged") == 0);
  CHECK(strcmp(mtp_proto_name(MTP_PROTO_INTERMEDIATE), "intermediate") == 0);
  CHECK(strcmp(mtp_proto_name(MTP_PROTO_PADDED), "padded") == 0);
  CHECK(mtp_proto_name(MTP_PROTO_NONE) != NULL);
}

int main(void) {
  check_seed(0x9e3779b97f4a7c15ull);
  test_known_answer();
  test_round_trips();
  test_wrong_and_none();
  return check_report();
}
