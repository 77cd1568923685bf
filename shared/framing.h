/*
 * framing.h - the MTProto transports inside the de-obfuscated stream: abridged,
 * intermediate and padded intermediate ("secure"). Sans-IO and incremental: the decoder
 * gives the same packets however its input is split.
 */
#ifndef MTP_FRAMING_H
#define MTP_FRAMING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "obf2.h"

/* The official proxy's limit; larger packets close the connection. */
#define MTP_MAX_PACKET 1044480u

struct mtp_packet {
  const uint8_t *data; /* borrows: see mtp_frame_decode */
  size_t len;
  bool quickack; /* the sender asked for a quick ack */
};

struct mtp_frame_dec {
  enum mtp_proto proto;
  size_t max_len; /* packets longer than this are MTP_ETOOBIG; default MTP_MAX_PACKET */
  /* private */
  int _state;
  uint8_t _hdr[4];
  size_t _hdr_have;
  size_t _need;  /* body bytes of the current packet, padding included */
  size_t _have;  /* body bytes collected so far */
  bool _quickack;
  uint8_t *_buf; /* owns: body being collected when it spans several inputs */
  size_t _cap;
};

void mtp_frame_dec_init(struct mtp_frame_dec *d, enum mtp_proto proto);

/*
 * Consumes up to len de-obfuscated bytes. Returns bytes consumed (>= 0) or a negative error
 * (MTP_ETOOBIG, MTP_EPROTO for a zero-length packet, MTP_ENOMEM). Stops right after the first
 * complete packet: then *has_pkt is true and *pkt describes it, with pkt->data borrowing
 * either `in` or the decoder's buffer, valid until the next call or mtp_frame_dec_free.
 * For padded intermediate, the len % 4 trailing padding bytes are not part of pkt->len.
 */
ssize_t mtp_frame_decode(struct mtp_frame_dec *d, const uint8_t *in, size_t len, struct mtp_packet *pkt,
                         bool *has_pkt);

/* Frees the decoder's buffer; the decoder can be reused after mtp_frame_dec_init. */
void mtp_frame_dec_free(struct mtp_frame_dec *d);

/*
 * Writes the framing header for a packet of len bytes into hdr and returns its length
 * (1 or 4 for abridged, 4 otherwise). For MTP_PROTO_PADDED, *pad_len receives the number of
 * random padding bytes (0..3) already counted in the header; the caller appends that many
 * random bytes after the packet. For the other protocols *pad_len is 0. Abridged needs len
 * to be a multiple of 4. quickack sets the quick-ack request bit (client side).
 */
size_t mtp_frame_header(enum mtp_proto proto, size_t len, bool quickack, uint8_t hdr[4], size_t *pad_len);

/* The 4-byte quick-ack answer for token (top bit set; big-endian for abridged). */
void mtp_frame_quickack(enum mtp_proto proto, uint32_t token, uint8_t out[4]);

#endif
