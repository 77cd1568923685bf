/*
 * obf2.c - the obfuscated2 header: accept (server side, try each secret) and connect
 * (client side, build a random header).
 *
 * Key schedule (bytes of the 64-byte header h):
 *   client->server: key = SHA-256(h[8..40] || secret), iv = h[40..56]
 *   server->client: r = h[8..56] reversed; key = SHA-256(r[0..32] || secret), iv = r[32..48]
 * Without a secret (direct connection to a DC) the keys are the raw 32 bytes.
 * The client encrypts the whole header with its send stream and transmits bytes 0..55 in
 * clear and 56..63 encrypted, so both streams continue at offset 64.
 */
#include "obf2.h"

#include <string.h>

#include "err.h"
#include "banned.h"

const char *mtp_proto_name(enum mtp_proto p) {
  switch (p) {
  case MTP_PROTO_ABRIDGED:
    return "abridged";
  case MTP_PROTO_INTERMEDIATE:
    return "intermediate";
  case MTP_PROTO_PADDED:
    return "padded";
  case MTP_PROTO_NONE:
    break;
  }
  return "none";
}

static const uint8_t TAG_ABRIDGED[4] = {0xef, 0xef, 0xef, 0xef};
static const uint8_t TAG_INTERMEDIATE[4] = {0xee, 0xee, 0xee, 0xee};
static const uint8_t TAG_PADDED[4] = {0xdd, 0xdd, 0xdd, 0xdd};

static enum mtp_proto proto_of_tag(const uint8_t tag[4]) {
  if (memcmp(tag, TAG_ABRIDGED, 4) == 0)
    return MTP_PROTO_ABRIDGED;
  if (memcmp(tag, TAG_INTERMEDIATE, 4) == 0)
    return MTP_PROTO_INTERMEDIATE;
  if (memcmp(tag, TAG_PADDED, 4) == 0)
    return MTP_PROTO_PADDED;
  return MTP_PROTO_NONE;
}

static const uint8_t *tag_of_proto(enum mtp_proto p) {
  switch (p) {
  case MTP_PROTO_ABRIDGED:
    return TAG_ABRIDGED;
  case MTP_PROTO_INTERMEDIATE:
    return TAG_INTERMEDIATE;
  case MTP_PROTO_PADDED:
    return TAG_PADDED;
  case MTP_PROTO_NONE:
    break;
  }
  return NULL;
}

/* Derives the two directions' key/IV from a header. "fwd" is client->server. */
static void derive(const uint8_t hdr[MTP_OBF2_HEADER_LEN], const uint8_t *secret, uint8_t fwd_key[32],
                   uint8_t fwd_iv[16], uint8_t rev_key[32], uint8_t rev_iv[16]) {
  uint8_t rev[48];
  for (int i = 0; i < 48; i++)
    rev[i] = hdr[55 - i];
  if (secret != NULL) {
    mtp_sha256_2(hdr + 8, 32, secret, 16, fwd_key);
    mtp_sha256_2(rev, 32, secret, 16, rev_key);
  } else {
    memcpy(fwd_key, hdr + 8, 32);
    memcpy(rev_key, rev, 32);
  }
  memcpy(fwd_iv, hdr + 40, 16);
  memcpy(rev_iv, rev + 32, 16);
  mtp_wipe(rev, sizeof rev);
}

int mtp_obf2_accept(struct mtp_obf2 *ctx, const uint8_t hdr[MTP_OBF2_HEADER_LEN],
                    const uint8_t (*secrets)[16], size_t nsecrets, struct mtp_obf2_result *res) {
  /* nsecrets == 0 means "no secret": the keys are used unhashed, as a DC sees them. */
  size_t tries = nsecrets > 0 ? nsecrets : 1;
  for (size_t i = 0; i < tries; i++) {
    const uint8_t *secret = nsecrets > 0 ? secrets[i] : NULL;
    uint8_t fk[32], fiv[16], rk[32], riv[16], dec[MTP_OBF2_HEADER_LEN];
    derive(hdr, secret, fk, fiv, rk, riv);
    mtp_aes_ctr_setup(&ctx->rx, fk, fiv);
    mtp_aes_ctr_crypt(&ctx->rx, hdr, dec, MTP_OBF2_HEADER_LEN);
    enum mtp_proto proto = proto_of_tag(dec + 56);
    if (proto != MTP_PROTO_NONE) {
      mtp_aes_ctr_setup(&ctx->tx, rk, riv);
      res->proto = proto;
      res->dc = (int16_t)(uint16_t)(dec[60] | (uint16_t)dec[61] << 8);
      res->secret_index = (int)i;
    } else {
      mtp_aes_ctr_free(&ctx->rx);
    }
    mtp_wipe(fk, sizeof fk);
    mtp_wipe(rk, sizeof rk);
    mtp_wipe(dec, sizeof dec);
    if (proto != MTP_PROTO_NONE)
      return MTP_OK;
  }
  return MTP_EBADSECRET;
}

/* The first bytes a real client never sends (they would look like another protocol). */
static bool is_forbidden(const uint8_t h[MTP_OBF2_HEADER_LEN]) {
  static const char *const starts[] = {"HEAD", "POST", "GET ", "OPTI", "PVrG", "\xee\xee\xee\xee",
                                       "\xdd\xdd\xdd\xdd", "\x16\x03\x01\x02"};
  if (h[0] == 0xef)
    return true;
  for (size_t i = 0; i < sizeof starts / sizeof starts[0]; i++)
    if (memcmp(h, starts[i], 4) == 0)
      return true;
  return h[4] == 0 && h[5] == 0 && h[6] == 0 && h[7] == 0;
}

int mtp_obf2_connect(struct mtp_obf2 *ctx, const uint8_t *secret, enum mtp_proto proto, int16_t dc,
                     uint8_t hdr_out[MTP_OBF2_HEADER_LEN]) {
  const uint8_t *tag = tag_of_proto(proto);
  if (tag == NULL)
    return MTP_EINVAL;
  uint8_t h[MTP_OBF2_HEADER_LEN];
  do {
    if (mtp_random(h, sizeof h) != MTP_OK)
      return MTP_EIO;
  } while (is_forbidden(h));
  memcpy(h + 56, tag, 4);
  h[60] = (uint8_t)((uint16_t)dc & 0xff);
  h[61] = (uint8_t)((uint16_t)dc >> 8);

  uint8_t fk[32], fiv[16], rk[32], riv[16], enc[MTP_OBF2_HEADER_LEN];
  derive(h, secret, fk, fiv, rk, riv);
  /* The client sends with the forward stream and receives with the reversed one. */
  mtp_aes_ctr_setup(&ctx->tx, fk, fiv);
  mtp_aes_ctr_setup(&ctx->rx, rk, riv);
  mtp_aes_ctr_crypt(&ctx->tx, h, enc, MTP_OBF2_HEADER_LEN);
  memcpy(hdr_out, h, 56);
  memcpy(hdr_out + 56, enc + 56, 8);
  mtp_wipe(fk, sizeof fk);
  mtp_wipe(rk, sizeof rk);
  mtp_wipe(h, sizeof h);
  mtp_wipe(enc, sizeof enc);
  return MTP_OK;
}

void mtp_obf2_free(struct mtp_obf2 *ctx) {
  if (ctx == NULL)
    return;
  mtp_aes_ctr_free(&ctx->rx);
  mtp_aes_ctr_free(&ctx->tx);
}
