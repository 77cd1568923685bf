/*
 * tclient.h - a blocking-socket test client that speaks like a Telegram app: it connects,
 * sends an obfuscated2 header built with a proxy secret, then MTProto packets in one of the
 * three client framings (abridged, intermediate, padded intermediate "secure"), and reads
 * answers and quick acks with a bounded wait.
 *
 * Independent of the proxy's own front code: it only uses the shared sans-IO codecs
 * (obf2.h, framing.h, crypto.h). Not thread-safe; one client per thread.
 *
 * Receiving: the server sends framed packets and unframed 4-byte quick acks on the same
 * stream. At a packet boundary the client tells them apart like a real app does:
 *   abridged      - a first byte with the top bit set starts a quick ack (4 bytes, big-endian);
 *   intermediate,
 *   padded        - a 4-byte little-endian length with bit 31 set is a quick ack.
 * The official proxy may also send a quick ack to a padded client in band: a framed packet
 * whose first word is 0xffffffff followed by the token, then a filler packet whose first
 * word is 0. tc_recv reports the former as a quick ack and skips the filler.
 *
 * Fake-TLS ("ee"): tc_connect_tls first sends a ClientHello made with the secret, the SNI and a
 * timestamp, checks the server's answer (ServerHello HMAC), then sends a ChangeCipherSpec and
 * the obfuscated2 header in an ApplicationData record; from then on everything it sends goes
 * in records of at most tls.record_max payload bytes, and what it receives is unwrapped from
 * records before de-obfuscation. Uses shared/faketls.h's client side.
 */
#ifndef MTP_TCLIENT_H
#define MTP_TCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "faketls.h"
#include "framing.h"
#include "obf2.h"

struct tclient {
  int fd; /* owns: the socket, -1 when closed */
  enum mtp_proto proto;
  /* Set before tc_connect / tc_connect_tls to send from this numeric source address (e.g.
   * "127.0.0.2"); NULL (tc_init's value): any. Borrowed. */
  const char *bind_addr;
  /* fake-TLS (tc_connect_tls): the ClientHello as sent (e.g. to replay it) and the size of
   * the fake certificate flight in the server's answer */
  bool tls;
  uint8_t hello[MTP_FAKETLS_CLIENT_HELLO_MAX];
  size_t hello_len;
  size_t flight_len;
  /* private */
  struct mtp_obf2 _obf;
  struct mtp_frame_dec _dec;
  bool _mid_packet;     /* the decoder has consumed part of a packet */
  bool _skip_filler;    /* the next zero-word packet is the filler after an in-band ack */
  uint8_t *_in;         /* owns: de-obfuscated bytes received but not yet consumed */
  size_t _in_len, _in_off, _in_cap;
  uint8_t *_pkt;        /* owns: copy of the last packet returned by tc_recv */
  size_t _pkt_cap;
  struct mtp_faketls_rx _rx; /* the server's records */
  size_t _rec_max;           /* payload bytes per record we send */
};

/* How tc_connect_tls makes its handshake. */
struct tc_tls {
  const char *sni;                  /* 1..255 characters */
  uint32_t timestamp;               /* the client's unix time in the hello; 0 = now */
  enum mtp_faketls_hello_kind kind; /* classic (517 bytes) or post-quantum (~1.8 KB) hello */
  size_t record_max;                /* payload bytes per record we send; 0 = 16384 */
  bool split_hello;                 /* send the hello in two pieces (cut at an odd offset) */
  bool no_ccs;                      /* no ChangeCipherSpec before the first record */
};

/* What tc_recv got. */
enum tc_kind {
  TC_PACKET = 1,   /* a framed packet: data/len */
  TC_QUICKACK = 2, /* a quick ack: token (as received, top bit included) */
};

struct tc_msg {
  enum tc_kind kind;
  const uint8_t *data; /* borrows: valid until the next tc_recv or tc_close */
  size_t len;
  uint32_t token;
};

/* Zeroes c; always succeeds. tc_close is safe afterwards. */
void tc_init(struct tclient *c);

/*
 * Connects to host:port (numeric IPv4/IPv6 or a name) within timeout_ms, sends the 64-byte
 * obfuscated2 header for proto and dc made with secret (16 bytes; NULL = no secret, as
 * toward a DC directly). Returns MTP_OK, MTP_ETIMEDOUT, MTP_EIO (refused / resolution
 * failure; errno is kept) or MTP_EINVAL.
 */
int tc_connect(struct tclient *c, const char *host, uint16_t port, const uint8_t *secret, enum mtp_proto proto,
               int16_t dc, int timeout_ms);

/*
 * The same over fake-TLS: connect, send the ClientHello for secret and tls, wait for the
 * server's answer and check it, then send the header (and a CCS) in records. Returns MTP_OK,
 * MTP_ETIMEDOUT (no complete answer in time), MTP_ECLOSED (closed without answering),
 * MTP_EBADSECRET / MTP_EPROTO (a wrong or malformed answer), MTP_EIO or MTP_EINVAL.
 */
int tc_connect_tls(struct tclient *c, const char *host, uint16_t port, const uint8_t *secret, const struct tc_tls *tls,
                   enum mtp_proto proto, int16_t dc, int timeout_ms);

/* Frames, obfuscates and sends one packet (blocking until written). Abridged needs len % 4 == 0.
 * quickack sets the quick-ack request bit. Returns MTP_OK, MTP_ECLOSED or MTP_EIO. */
int tc_send(struct tclient *c, const uint8_t *pkt, size_t len, bool quickack);

/* Obfuscates and sends raw bytes as they are (no framing), e.g. to send garbage; in records
 * for a fake-TLS client. */
int tc_send_raw(struct tclient *c, const uint8_t *data, size_t len);

/*
 * Waits up to timeout_ms for one packet or quick ack. Returns MTP_OK with *m filled,
 * MTP_ETIMEDOUT (nothing complete within the time; partial input is kept), MTP_ECLOSED
 * (the peer closed or reset the connection), or MTP_EPROTO/MTP_ETOOBIG (bad framing).
 */
int tc_recv(struct tclient *c, int timeout_ms, struct tc_msg *m);

/* Waits up to timeout_ms for the peer to close. Returns MTP_ECLOSED when it did,
 * MTP_ETIMEDOUT when it did not, MTP_OK when data arrived instead (it is discarded). */
int tc_wait_closed(struct tclient *c, int timeout_ms);

/* Closes the socket and frees everything. Idempotent. */
void tc_close(struct tclient *c);

/*
 * Fills buf (len bytes, a multiple of 4) with a packet shaped like what an app sends:
 * - encrypted = false: an unencrypted auth message: auth_key_id = 0 (8 bytes), message id
 *   (8 bytes, unix time << 32, divisible by 4), message length (4 bytes, len - 20), then
 *   req_pq_multi's constructor 0xbe7e8ef1 and random bytes. The official proxy forwards such a
 *   packet only when len >= 40 (inner length >= 20 and a handshake constructor); the
 *   RPC_PROXY_REQ then carries flag NOT_ENCRYPTED (0x2).
 * - encrypted = true: a random non-zero auth_key_id, then random bytes (msg_key and the
 *   encrypted part). The official proxy forwards it only when len >= 56.
 * Shorter buffers get the header cut short.
 */
void tc_make_packet(uint8_t *buf, size_t len, bool encrypted);

/* Parses "abridged" | "intermediate" | "secure" (or "padded"); MTP_PROTO_NONE otherwise. */
enum mtp_proto tc_proto_parse(const char *s);

#endif
