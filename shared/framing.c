/*
 * framing.c - abridged / intermediate / padded intermediate transports.
 *
 * Decoder states:
 *
 *   WAIT_HDR --(header complete, length valid)--> WAIT_BODY --(body complete)--> WAIT_HDR
 *       |                                                          (packet delivered)
 *       +--(zero, misaligned or overlong length)--> MTP_EPROTO / MTP_ETOOBIG
 *
 * Lengths are checked against the limits the official proxy uses before anything is
 * allocated: zero, intermediate lengths that are not a multiple of 4, abridged lengths in
 * the overlong 4-byte form, and padded packets with no payload are MTP_EPROTO; lengths
 * above max_len are MTP_ETOOBIG (for padded, the length without its len % 4 padding).
 */
#include "framing.h"

#include <string.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "banned.h"

enum {
  ST_WAIT_HDR = 0, /* collecting the 1..4 length bytes */
  ST_WAIT_BODY,    /* collecting _need body bytes across inputs into _buf */
};

/* A buffer bigger than this is released once idle, so idle connections stay small. */
#define KEEP_BUF_MAX 65536u

void mtp_frame_dec_init(struct mtp_frame_dec *d, enum mtp_proto proto) {
  memset(d, 0, sizeof *d);
  d->proto = proto;
  d->max_len = MTP_MAX_PACKET;
  d->_state = ST_WAIT_HDR;
}

void mtp_frame_dec_free(struct mtp_frame_dec *d) {
  if (d == NULL)
    return;
  mtp_free(d->_buf);
  d->_buf = NULL;
  d->_cap = 0;
  d->_have = 0;
  d->_need = 0;
  d->_hdr_have = 0;
  d->_state = ST_WAIT_HDR;
}

/* Header bytes this protocol needs, given what was read so far. */
static size_t hdr_len(const struct mtp_frame_dec *d) {
  if (d->proto == MTP_PROTO_ABRIDGED)
    return (d->_hdr_have >= 1 && (d->_hdr[0] & 0x7f) == 0x7f) ? 4 : 1;
  return 4;
}

/* Validates the complete header; sets _need and _quickack. */
static int parse_hdr(struct mtp_frame_dec *d) {
  size_t len;
  if (d->proto == MTP_PROTO_ABRIDGED) {
    d->_quickack = (d->_hdr[0] & 0x80) != 0;
    if ((d->_hdr[0] & 0x7f) == 0x7f) {
      size_t words = (size_t)d->_hdr[1] | (size_t)d->_hdr[2] << 8 | (size_t)d->_hdr[3] << 16;
      if (words < 0x7f)
        return MTP_EPROTO; /* overlong encoding, rejected by the official proxy too */
      len = words * 4;
    } else {
      len = (size_t)(d->_hdr[0] & 0x7f) * 4;
    }
  } else {
    uint32_t v = (uint32_t)d->_hdr[0] | (uint32_t)d->_hdr[1] << 8 | (uint32_t)d->_hdr[2] << 16 |
                 (uint32_t)d->_hdr[3] << 24;
    d->_quickack = (v & 0x80000000u) != 0;
    len = v & 0x7fffffffu;
  }
  if (len == 0)
    return MTP_EPROTO;
  /* Padded: the limit applies to the payload, so a maximum-size packet may carry its 0..3
   * padding bytes (the buffer is still bounded by max_len + 3). */
  size_t checked = d->proto == MTP_PROTO_PADDED ? len - len % 4 : len;
  if (checked > d->max_len)
    return MTP_ETOOBIG;
  if (d->proto == MTP_PROTO_PADDED) {
    if (len < 4)
      return MTP_EPROTO; /* nothing but padding */
  } else if (len % 4 != 0) {
    return MTP_EPROTO;
  }
  d->_need = len;
  d->_have = 0;
  return MTP_OK;
}

static size_t payload_len(const struct mtp_frame_dec *d) {
  return d->proto == MTP_PROTO_PADDED ? d->_need - d->_need % 4 : d->_need;
}

ssize_t mtp_frame_decode(struct mtp_frame_dec *d, const uint8_t *in, size_t len, struct mtp_packet *pkt,
                         bool *has_pkt) {
  size_t pos = 0;
  *has_pkt = false;

  if (d->_state == ST_WAIT_HDR && d->_hdr_have == 0 && d->_cap > KEEP_BUF_MAX) {
    /* The previous big packet was delivered and its borrow ended with this call. */
    mtp_free(d->_buf);
    d->_buf = NULL;
    d->_cap = 0;
  }

  while (pos < len) {
    if (d->_state == ST_WAIT_HDR) {
      while (pos < len && d->_hdr_have < hdr_len(d))
        d->_hdr[d->_hdr_have++] = in[pos++];
      if (d->_hdr_have < hdr_len(d))
        break;
      int rc = parse_hdr(d);
      if (rc < 0)
        return rc;
      d->_hdr_have = 0;
      d->_state = ST_WAIT_BODY;
      if (len - pos >= d->_need) {
        /* Zero copy: the whole body is in this input. */
        pkt->data = in + pos;
        pkt->len = payload_len(d);
        pkt->quickack = d->_quickack;
        pos += d->_need;
        d->_state = ST_WAIT_HDR;
        *has_pkt = true;
        return (ssize_t)pos;
      }
      continue;
    }

    /* ST_WAIT_BODY: append to _buf, growing it geometrically but never past the packet. */
    size_t take = d->_need - d->_have;
    if (take > len - pos)
      take = len - pos;
    if (d->_have + take > d->_cap) {
      size_t want = d->_cap * 2;
      if (want < d->_have + take)
        want = d->_have + take;
      if (want < 4096)
        want = 4096;
      if (want > d->_need)
        want = d->_need;
      if (want < d->_cap)
        want = d->_cap;
      uint8_t *nb = mtp_realloc(d->_buf, want);
      if (nb == NULL)
        return MTP_ENOMEM;
      d->_buf = nb;
      d->_cap = want;
    }
    memcpy(d->_buf + d->_have, in + pos, take);
    d->_have += take;
    pos += take;
    if (d->_have == d->_need) {
      pkt->data = d->_buf;
      pkt->len = payload_len(d);
      pkt->quickack = d->_quickack;
      d->_state = ST_WAIT_HDR;
      d->_have = 0;
      *has_pkt = true;
      return (ssize_t)pos;
    }
  }
  return (ssize_t)pos;
}

size_t mtp_frame_header(enum mtp_proto proto, size_t len, bool quickack, uint8_t hdr[4], size_t *pad_len) {
  *pad_len = 0;
  if (proto == MTP_PROTO_ABRIDGED) {
    size_t words = len / 4;
    if (words < 0x7f) {
      hdr[0] = (uint8_t)(words | (quickack ? 0x80u : 0u));
      return 1;
    }
    hdr[0] = (uint8_t)(0x7f | (quickack ? 0x80u : 0u));
    hdr[1] = (uint8_t)(words & 0xff);
    hdr[2] = (uint8_t)((words >> 8) & 0xff);
    hdr[3] = (uint8_t)((words >> 16) & 0xff);
    return 4;
  }
  size_t total = len;
  if (proto == MTP_PROTO_PADDED) {
    *pad_len = mtp_random_below(4);
    total += *pad_len;
  }
  uint32_t v = (uint32_t)(total & 0x7fffffffu) | (quickack ? 0x80000000u : 0u);
  hdr[0] = (uint8_t)(v & 0xff);
  hdr[1] = (uint8_t)((v >> 8) & 0xff);
  hdr[2] = (uint8_t)((v >> 16) & 0xff);
  hdr[3] = (uint8_t)(v >> 24);
  return 4;
}

void mtp_frame_quickack(enum mtp_proto proto, uint32_t token, uint8_t out[4]) {
  uint32_t v = token | 0x80000000u;
  if (proto == MTP_PROTO_ABRIDGED) {
    out[0] = (uint8_t)(v >> 24);
    out[1] = (uint8_t)((v >> 16) & 0xff);
    out[2] = (uint8_t)((v >> 8) & 0xff);
    out[3] = (uint8_t)(v & 0xff);
  } else {
    out[0] = (uint8_t)(v & 0xff);
    out[1] = (uint8_t)((v >> 8) & 0xff);
    out[2] = (uint8_t)((v >> 16) & 0xff);
    out[3] = (uint8_t)(v >> 24);
  }
}
