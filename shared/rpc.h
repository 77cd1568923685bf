/*
 * rpc.h - Telegram's middle-proxy RPC protocol: the frame layer (len, seq, body, crc;
 * AES-256-CBC after the nonce exchange), key derivation, and the messages.
 * Sans-IO: used by the back's RPC connections (client role) and by the test suite's fake
 * middle server (server role).
 *
 * Connection flow (client = the proxy, server = Telegram's middle proxy):
 *   client -> RPC_NONCE (seq -2, plaintext)      server -> RPC_NONCE (seq -2, plaintext)
 *   both derive keys (mtp_rpc_derive_keys) and switch to AES-CBC
 *   client -> RPC_HANDSHAKE (seq -1)              server -> RPC_HANDSHAKE (seq -1)
 *   then seq 0, 1, 2 ... each way: PROXY_REQ / PROXY_ANS / SIMPLE_ACK / CLOSE_* / PING / PONG
 */
#ifndef MTP_RPC_H
#define MTP_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "crypto.h"

#define MTP_RPC_NONCE 0x7acb87aau
#define MTP_RPC_HANDSHAKE 0x7682eef5u
#define MTP_RPC_HANDSHAKE_ERROR 0x6a27bedau
#define MTP_RPC_PROXY_REQ 0x36cef1eeu
#define MTP_RPC_PROXY_ANS 0x4403da0du
#define MTP_RPC_CLOSE_CONN 0x1fcf425du
#define MTP_RPC_CLOSE_EXT 0x5eb634a2u
#define MTP_RPC_SIMPLE_ACK 0x3bac409bu
#define MTP_RPC_PING 0x5730a2dfu
#define MTP_RPC_PONG 0x8430eaa7u
#define MTP_TL_PROXY_TAG 0xdb1e26aeu

/* RPC_PROXY_REQ flags */
#define MTP_RPC_FLAG_NOT_ENCRYPTED 0x2u
#define MTP_RPC_FLAG_HAS_AD_TAG 0x8u
#define MTP_RPC_FLAG_MAGIC 0x1000u
#define MTP_RPC_FLAG_EXTMODE2 0x20000u
#define MTP_RPC_FLAG_PAD 0x8000000u
#define MTP_RPC_FLAG_INTERMEDIATE 0x20000000u
#define MTP_RPC_FLAG_ABRIDGED 0x40000000u
#define MTP_RPC_FLAG_QUICKACK 0x80000000u

/* RPC_HANDSHAKE flags */
#define MTP_RPC_HS_FLAG_CRC32C 0x800u

#define MTP_RPC_MAX_FRAME (MTP_RPC_PROXY_REQ_HDR_MAX + 1044480u + 64u)
/* Upper bound of the bytes before the client's packet in an RPC_PROXY_REQ body. */
#define MTP_RPC_PROXY_REQ_HDR_MAX 96u

/* ---- frame layer ---- */

struct mtp_rpc_codec {
  bool crc32c; /* use CRC32C instead of CRC32 (after a handshake that negotiated it) */
  /* private */
  bool _rx_enc, _tx_enc;
  struct mtp_aes_cbc _rx_cbc, _tx_cbc;
  int32_t _rx_seq, _tx_seq;
  uint8_t *_buf; /* owns: decrypted bytes not yet returned as frames */
  size_t _len, _cap, _off;
  uint8_t _raw[16]; /* undecrypted tail shorter than a block */
  size_t _raw_len;
};

/* Plaintext, seq -2 both ways. */
void mtp_rpc_codec_init(struct mtp_rpc_codec *c);
/* Switch one or both directions to AES-256-CBC (after the nonce frames). */
void mtp_rpc_codec_set_rx_key(struct mtp_rpc_codec *c, const uint8_t key[32], const uint8_t iv[16]);
void mtp_rpc_codec_set_tx_key(struct mtp_rpc_codec *c, const uint8_t key[32], const uint8_t iv[16]);
void mtp_rpc_codec_free(struct mtp_rpc_codec *c);

/*
 * Consumes up to len received bytes (decrypting when the rx key is set). Returns bytes
 * consumed (>= 0) or MTP_EPROTO (bad length), MTP_ECRC, MTP_ESEQ, MTP_ETOOBIG, MTP_ENOMEM.
 * When a whole frame is ready it stops: *has_frame = true and *body, *body_len give the
 * frame body (without len/seq/crc), borrowed from the codec until the next call; the
 * count may then be less than len (even 0). Without a frame all len bytes are consumed.
 * Input is taken only up to the end of the current frame (plus less than one cipher block),
 * so a caller that stops when its input is used up never leaves a whole frame buffered.
 * Padding words (04 00 00 00) between frames are skipped.
 */
ssize_t mtp_rpc_recv(struct mtp_rpc_codec *c, const uint8_t *in, size_t len, const uint8_t **body,
                     size_t *body_len, bool *has_frame);

/* Bytes mtp_rpc_sendv will write for a body of body_len bytes (frame + CBC padding). */
size_t mtp_rpc_frame_size(const struct mtp_rpc_codec *c, size_t body_len);

/*
 * Writes one frame whose body is the concatenation of iov[0..iovcnt) into out (which has
 * mtp_rpc_frame_size() bytes), encrypting when the tx key is set, and advances the seq.
 * Returns bytes written. The body length must be a multiple of 4.
 */
size_t mtp_rpc_sendv(struct mtp_rpc_codec *c, const struct iovec *iov, int iovcnt, uint8_t *out);

/* ---- key derivation ---- */

struct mtp_rpc_key_params {
  uint8_t nonce_srv[16];
  uint8_t nonce_clt[16];
  uint32_t clt_ts;         /* the client's crypto_ts from its nonce */
  uint32_t srv_ip, clt_ip; /* IPv4 in host order (0 when IPv6); clt_ip is the proxy's PUBLIC ip */
  uint16_t srv_port, clt_port;
  bool ipv6;
  uint8_t srv_ipv6[16], clt_ipv6[16];
  const uint8_t *secret; /* borrows: the proxy secret from Telegram */
  size_t secret_len;
};

/*
 * Derives key and iv for one direction. for_client_to_server = true gives the keys for the
 * proxy -> middle server direction (purpose "CLIENT"), false for middle server -> proxy.
 */
void mtp_rpc_derive_keys(const struct mtp_rpc_key_params *p, bool for_client_to_server, uint8_t key[32],
                         uint8_t iv[16]);

/* ---- messages ---- */

struct mtp_rpc_nonce {
  uint32_t key_selector; /* first 4 bytes of the proxy secret, as LE int */
  uint32_t crypto_schema; /* 1 = AES */
  uint32_t crypto_ts;
  uint8_t nonce[16];
};
#define MTP_RPC_NONCE_LEN 32
size_t mtp_rpc_build_nonce(const struct mtp_rpc_nonce *n, uint8_t out[MTP_RPC_NONCE_LEN]);
int mtp_rpc_parse_nonce(const uint8_t *body, size_t len, struct mtp_rpc_nonce *n);

struct mtp_rpc_pid {
  uint32_t ip; /* host order */
  uint16_t port;
  uint16_t pid;
  uint32_t utime;
};
#define MTP_RPC_HANDSHAKE_LEN 32
size_t mtp_rpc_build_handshake(uint32_t flags, const struct mtp_rpc_pid *sender, const struct mtp_rpc_pid *peer,
                               uint8_t out[MTP_RPC_HANDSHAKE_LEN]);

/* Writes the RPC_PROXY_REQ body up to the client's packet; returns its length (<= HDR_MAX).
 * Client and proxy addresses: 16 bytes (IPv4 as ::ffff:a.b.c.d) + port. ad_tag may be NULL.
 * The flags must already include the framing flags; HAS_AD_TAG/MAGIC/EXTMODE2 are added here. */
size_t mtp_rpc_build_proxy_req_hdr(uint32_t flags, uint64_t conn_id, const uint8_t client_ip[16],
                                   uint32_t client_port, const uint8_t proxy_ip[16], uint32_t proxy_port,
                                   const uint8_t *ad_tag, uint8_t out[MTP_RPC_PROXY_REQ_HDR_MAX]);
/* RPC_PROXY_REQ flags for a client's framing and quick-ack request (no ad_tag bits).
 * As in the official proxy: abridged -> ABRIDGED, intermediate -> INTERMEDIATE, padded ->
 * INTERMEDIATE too (the official proxy does not send PAD; it pads answers itself). */
uint32_t mtp_rpc_proxy_req_flags(int proto /* enum mtp_proto */, bool quickack);
/* Per-packet RPC_PROXY_REQ flags from the client's packet itself: NOT_ENCRYPTED when its
 * auth_key_id (first 8 bytes) is zero. OR it with mtp_rpc_proxy_req_flags(). */
uint32_t mtp_rpc_packet_flags(const uint8_t *pkt, size_t len);

/* Fixed-size messages; each returns bytes written. */
size_t mtp_rpc_build_close_conn(uint64_t conn_id, uint8_t out[12]);
size_t mtp_rpc_build_close_ext(uint64_t conn_id, uint8_t out[12]);
size_t mtp_rpc_build_simple_ack(uint64_t conn_id, uint32_t token, uint8_t out[16]);
size_t mtp_rpc_build_ping(int64_t ping_id, uint8_t out[12]);
size_t mtp_rpc_build_pong(int64_t ping_id, uint8_t out[12]);
/* PROXY_ANS header (type, flags, conn_id): 16 bytes; the packet follows. */
size_t mtp_rpc_build_proxy_ans_hdr(uint32_t flags, uint64_t conn_id, uint8_t out[16]);

/* Any message, parsed. Pointers borrow from the body. */
struct mtp_rpc_msg {
  uint32_t type;
  uint32_t flags;    /* PROXY_REQ, PROXY_ANS, HANDSHAKE; HANDSHAKE_ERROR: the error code */
  uint64_t conn_id;  /* PROXY_REQ, PROXY_ANS, SIMPLE_ACK, CLOSE_EXT, CLOSE_CONN */
  uint32_t token;    /* SIMPLE_ACK */
  int64_t ping_id;   /* PING, PONG */
  const uint8_t *data; /* PROXY_REQ, PROXY_ANS: the packet */
  size_t data_len;
  /* PROXY_REQ only */
  uint8_t client_ip[16], proxy_ip[16];
  uint32_t client_port, proxy_port;
  bool has_ad_tag;
  uint8_t ad_tag[16];
  /* HANDSHAKE only */
  struct mtp_rpc_pid sender, peer; /* HANDSHAKE_ERROR: sender only */
  /* NONCE only */
  struct mtp_rpc_nonce nonce;
};

/* Parses any of the messages above. Returns MTP_OK or MTP_EPROTO (unknown type or short). */
int mtp_rpc_parse(const uint8_t *body, size_t len, struct mtp_rpc_msg *m);

#endif
