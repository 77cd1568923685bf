/*
 * obf2.h - the obfuscated2 transport header (the client's first 64 bytes) and the two
 * AES-256-CTR streams that follow it. See PROTOCOLS in docs/protocols.md.
 *
 * Server side: mtp_obf2_accept() tries each configured secret on a received header.
 * Client side (test client, direct mode): mtp_obf2_connect() builds a header.
 * After either, ctx->rx decrypts what this side receives and ctx->tx encrypts what it sends;
 * both streams are positioned right after the 64-byte header.
 */
#ifndef MTP_OBF2_H
#define MTP_OBF2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "crypto.h"

#define MTP_OBF2_HEADER_LEN 64

/* The client's framing inside the de-obfuscated stream. */
enum mtp_proto {
  MTP_PROTO_NONE = 0,
  MTP_PROTO_ABRIDGED = 1,     /* tag ef ef ef ef */
  MTP_PROTO_INTERMEDIATE = 2, /* tag ee ee ee ee */
  MTP_PROTO_PADDED = 3,       /* tag dd dd dd dd, "secure" */
};

/* Bits for a listener's allowed_protocols. */
#define MTP_ALLOW_ABRIDGED 0x1u
#define MTP_ALLOW_INTERMEDIATE 0x2u
#define MTP_ALLOW_SECURE 0x4u
#define MTP_ALLOW_FAKE_TLS 0x8u
#define MTP_ALLOW_ALL 0xfu

/* "abridged", "intermediate", "padded". */
const char *mtp_proto_name(enum mtp_proto p);

struct mtp_obf2 {
  struct mtp_aes_ctr rx; /* decrypts what we receive */
  struct mtp_aes_ctr tx; /* encrypts what we send */
};

struct mtp_obf2_result {
  enum mtp_proto proto;
  int16_t dc;       /* signed: negative = media DC; as sent by the client */
  int secret_index; /* which of the secrets matched */
};

/*
 * Tries secrets[0..nsecrets) in order on hdr. Returns MTP_OK with ctx set up (rx positioned
 * at offset 64) and *res filled, or MTP_EBADSECRET when no secret yields a valid protocol tag.
 * ctx needs no free on failure. Never calls back; pure.
 */
int mtp_obf2_accept(struct mtp_obf2 *ctx, const uint8_t hdr[MTP_OBF2_HEADER_LEN],
                    const uint8_t (*secrets)[16], size_t nsecrets, struct mtp_obf2_result *res);

/*
 * Builds a random client header for proto and dc, encrypted as a client sends it. With
 * secret == NULL the keys are not hashed with a secret (direct connection to a DC).
 * Returns MTP_OK or MTP_EIO (no randomness).
 */
int mtp_obf2_connect(struct mtp_obf2 *ctx, const uint8_t *secret, enum mtp_proto proto, int16_t dc,
                     uint8_t hdr_out[MTP_OBF2_HEADER_LEN]);

/* Releases the AES contexts. Safe on a zeroed ctx. */
void mtp_obf2_free(struct mtp_obf2 *ctx);

#endif
