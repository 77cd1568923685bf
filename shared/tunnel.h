/*
 * tunnel.h - the frame codec of the split-mode tunnel (front <-> back over mutual TLS).
 *
 * Wire format, inside the TLS stream: each frame is
 *
 *     +----------------------------+------------------------------------+
 *     | length: 4 bytes big-endian | length bytes: a packed mtp.Frame   |
 *     +----------------------------+------------------------------------+
 *
 * with 1 <= length <= MTP_TUNNEL_MAX_FRAME. A fixed 4-byte prefix (rather than a varint) keeps
 * the decoder's header state trivial and lets it reject an oversized length after exactly four
 * bytes, before any allocation. The messages and the rules for growing them are in
 * proto/tunnel.proto (unknown fields are ignored; a frame of an unknown type arrives with
 * msg_case == MTP__FRAME__MSG__NOT_SET and is ignored by the receiver).
 *
 * The codec is sans-IO: it never touches a socket or the loop. The decoder is an incremental
 * state machine that gives the same frames however its input is split:
 *
 *     WAIT_HEADER --4 bytes, length ok--> WAIT_BODY --length bytes--> (frame out) WAIT_HEADER
 *          |                                  |
 *          +--length 0 / too big: error       +--not a valid Frame: MTP_EPROTO
 *
 * After an error the decoder is unusable: the caller logs the reason (mtp_strerror) and closes
 * the tunnel. Unpacked frames are allocated through mtp_malloc (protobuf-c allocator hook).
 */
#ifndef MTP_TUNNEL_H
#define MTP_TUNNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "tunnel.pb-c.h"

/* Protocol version sent in Hello. */
#define MTP_TUNNEL_VERSION 1u
/* Length prefix size. */
#define MTP_TUNNEL_HDR_LEN 4u
/* Largest packed Frame accepted or produced: a maximal MTProto packet (1 MiB) plus room for the
 * Data envelope and future fields. */
#define MTP_TUNNEL_MAX_FRAME (1048576u + 4096u)

struct mtp_tunnel_dec {
  size_t max_frame; /* frames longer than this are MTP_ETOOBIG; default MTP_TUNNEL_MAX_FRAME */
  /* private */
  int _state;       /* enum in tunnel.c: waiting for the header / the body / failed */
  int _err;         /* the error once failed */
  uint8_t _hdr[MTP_TUNNEL_HDR_LEN];
  size_t _hdr_have;
  size_t _need;     /* body length of the current frame */
  size_t _have;     /* body bytes collected in _buf */
  uint8_t *_buf;    /* owns: body being collected when it spans several inputs */
};

/* Cannot fail. */
void mtp_tunnel_dec_init(struct mtp_tunnel_dec *d);

/*
 * Consumes up to len bytes of the tunnel stream. Returns bytes consumed (>= 0) or a negative
 * error: MTP_ETOOBIG (a length above max_frame, reported as soon as the 4 prefix bytes are in,
 * before anything is allocated), MTP_EPROTO (a length of 0, a body that is not a valid Frame,
 * or a frame that breaks a field rule, see mtp_tunnel_frame_check), MTP_ENOMEM. Stops right
 * after the first complete frame: then *out receives it (transfers: free with
 * mtp_tunnel_frame_free); otherwise *out is NULL and all of `in` was consumed. After an error
 * every later call returns the same error. Pure: no callbacks.
 */
ssize_t mtp_tunnel_decode(struct mtp_tunnel_dec *d, const uint8_t *in, size_t len, Mtp__Frame **out);

/* Frees the decoder's buffer; NULL-safe and idempotent. Reuse needs mtp_tunnel_dec_init. */
void mtp_tunnel_dec_free(struct mtp_tunnel_dec *d);

/* Frees a frame returned by mtp_tunnel_decode (or mtp_tunnel_unpack). NULL-safe. */
void mtp_tunnel_frame_free(Mtp__Frame *f);

/*
 * Unpacks one Frame body (no length prefix) of len bytes. Returns MTP_OK and *out (transfers),
 * MTP_EPROTO, or MTP_ENOMEM. Used by the decoder; exposed for tests and fuzzing.
 */
int mtp_tunnel_unpack(const uint8_t *body, size_t len, Mtp__Frame **out);

/*
 * Checks the rules protobuf cannot express: a set oneof member is non-NULL; Open has a
 * non-zero stream, ip fields of 0/4/16 bytes, ports <= 65535, ad_tag of 0 or 16 bytes; Data,
 * QuickAck and Credit name a non-zero stream. Close may name stream 0 (the whole tunnel).
 * Returns MTP_OK or MTP_EPROTO. A frame with no member set (unknown type) is MTP_OK.
 */
int mtp_tunnel_frame_check(const Mtp__Frame *f);

/*
 * Size of f once framed (prefix included), or 0 if f is not a sendable frame: no member set,
 * or its packed size is above MTP_TUNNEL_MAX_FRAME.
 */
size_t mtp_tunnel_frame_size(const Mtp__Frame *f);

/*
 * Writes f with its length prefix into out (borrows, cap bytes). Returns bytes written,
 * MTP_ETOOBIG (packed size above MTP_TUNNEL_MAX_FRAME), MTP_EINVAL (no member set) or
 * MTP_AGAIN (cap smaller than mtp_tunnel_frame_size(f); nothing written).
 */
ssize_t mtp_tunnel_encode(const Mtp__Frame *f, uint8_t *out, size_t cap);

/* A name for a frame type ("hello", "open", ..., "unknown"), for logs. Never NULL. */
const char *mtp_tunnel_frame_name(const Mtp__Frame *f);

#endif
