/*
 * tunnel_conn.h - one split-mode tunnel connection, the part both sides share: the TLS
 * connection (tlsuv.h), the frame codec (tunnel.h), the Hello exchange, heartbeats and the
 * tunnel-level Close. The front's link (front/tunnel_link.c) and the back's server
 * (back/tunnel_server.c) put their streams on top through the ops below.
 *
 *   dial/accept ──► TLS ──verified (+ CN allowed)──► WAIT_HELLO ──peer's Hello ok──► UP
 *                    │   our Hello sent ───────────────┘   │                        │
 *                    └── handshake error / timeout ───────┴── bad frame / silence ──┴──► closed
 *
 * - Nothing is read from the peer before the TLS handshake has verified it (tlsuv.h), and no
 *   stream frame reaches the owner before the peer's Hello: a first frame that is not a Hello,
 *   a Hello with version < 1, or a frame that does not decode closes the connection with
 *   Close(0, reason) (MTP_TUNNEL_CLOSE_*) and a logged reason.
 * - Ping every heartbeat_ms (the peer answers Pong); a peer from which no frame at all has
 *   come for timeout_ms (also before its Hello) is dead: the connection closes.
 * - Ping, Pong, Hello and frames of unknown type are handled here; every other frame goes to
 *   ops->on_frame. Close with stream 0 from the peer closes the connection.
 *
 * Callbacks are never called synchronously from these functions; the owner may call any of
 * them (also mtp_tunnel_conn_close) from inside any callback. on_close comes exactly once,
 * and c is freed when it returns. Metrics: TUNNEL_UP (while up), TUNNEL_CONNECTS (each time
 * up), TUNNEL_FAILS (every close that is not a local close with MTP_OK or the peer's
 * Close(0, shutdown)), TUNNEL_BYTES_IN/OUT (frame bytes, prefix included).
 */
#ifndef MTP_TUNNEL_CONN_H
#define MTP_TUNNEL_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "log.h"
#include "tlsuv.h"
#include "tunnel.h"

/* Close reasons beyond enum mtp_link_close_reason (link.h); see proto/tunnel.proto. */
#define MTP_TUNNEL_CLOSE_BACKPRESSURE 5u /* stream: the back buffered a window and got no credit */
#define MTP_TUNNEL_CLOSE_PROTOCOL 100u   /* tunnel: malformed or unexpected frame */
#define MTP_TUNNEL_CLOSE_VERSION 101u    /* tunnel: the peer's version is not supported */
#define MTP_TUNNEL_CLOSE_NOT_ALLOWED 102u /* tunnel: the front's name is not in the allow-list */
#define MTP_TUNNEL_CLOSE_TIMEOUT 103u    /* tunnel: no frame from the peer for tunnel_timeout */
/* "Send no Close frame" for mtp_tunnel_conn_close. */
#define MTP_TUNNEL_NO_REASON UINT32_MAX

/* Largest bytes mtp_tunnel_conn_data_header writes. */
#define MTP_TUNNEL_DATA_HDR_MAX 32u

struct mtp_tunnel_conn;

struct mtp_tunnel_conn_ops {
  /* The peer's Hello was accepted: stream frames may be sent now. */
  void (*on_up)(struct mtp_tunnel_conn *c);
  /* A stream frame (Open, Data, QuickAck, Close with stream != 0, Credit), borrowed for the
   * call. Already checked by mtp_tunnel_frame_check. */
  void (*on_frame)(struct mtp_tunnel_conn *c, const Mtp__Frame *f);
  /* The TLS write queue drained below its low-water mark after being congested. Optional. */
  void (*on_writable)(struct mtp_tunnel_conn *c);
  /* Just before the frames written in this loop iteration go out (mtp_tunnel_conn_want_flush):
   * the place to write batched Credit frames. Optional. */
  void (*on_flush)(struct mtp_tunnel_conn *c);
  /* The connection is gone (err MTP_OK: closed locally with MTP_OK or by the peer's
   * Close(0, shutdown)); why is borrowed for the call. c is freed after this returns. */
  void (*on_close)(struct mtp_tunnel_conn *c, int err, const char *why);
};

struct mtp_tunnel_conn_opts {
  const struct mtp_tunnel_conn_ops *ops; /* borrows; must outlive the connection */
  void *data;                            /* the owner's pointer (mtp_tunnel_conn_data) */
  const char *node;                      /* our Hello.node (copied); NULL = "" */
  uint64_t window;                       /* our receive window, announced in Hello */
  uint64_t heartbeat_ms;                 /* Ping interval; 0 = no pings */
  uint64_t timeout_ms;                   /* silence before the peer is dead; 0 = 20 s */
  /* Server: certificate CNs allowed (borrowed; must outlive the connection); 0 = any. */
  char *const *allowed;
  size_t nallowed;
  unsigned long long log_id;             /* for the log context */
  const char *where;                     /* borrows (static): log context, e.g. "tunnel" */
};

/* Dials addr (borrowed). Returns MTP_OK and *out (on_close follows in every case, also when the
 * connection fails), or MTP_ENOMEM with nothing started. */
int mtp_tunnel_conn_dial(struct mtp_tunnel_conn **out, struct mtp_tls_conf *tls, uv_loop_t *loop,
                         const struct sockaddr *addr, const struct mtp_tunnel_conn_opts *o);

/* Accepts one pending connection of server. Returns MTP_OK and *out (on_close follows), or
 * MTP_ENOMEM with the connection still pending. */
int mtp_tunnel_conn_accept(struct mtp_tunnel_conn **out, struct mtp_tls_conf *tls, uv_stream_t *server,
                           const struct mtp_tunnel_conn_opts *o);

void *mtp_tunnel_conn_data(const struct mtp_tunnel_conn *c);
bool mtp_tunnel_conn_is_up(const struct mtp_tunnel_conn *c);
/* The log context: "[id peer where]". */
const struct mtp_log_ctx *mtp_tunnel_conn_log(const struct mtp_tunnel_conn *c);
/* The verified certificate CN of the peer ("" before TLS is up). */
const char *mtp_tunnel_conn_peer_cn(const struct mtp_tunnel_conn *c);
/* The peer's Hello.node, printable ("" before its Hello). */
const char *mtp_tunnel_conn_peer_node(const struct mtp_tunnel_conn *c);
/* The credit each stream starts with for Data we send: the peer's Hello.window, or our own
 * window if it said 0. Valid once up. */
uint64_t mtp_tunnel_conn_peer_window(const struct mtp_tunnel_conn *c);

/*
 * Writes one frame (Hello, Open, QuickAck, Close, Credit, Ping, Pong; Data too, but see
 * mtp_tunnel_conn_send_data). Encoded straight into the TLS staging buffer when it fits in
 * one record. Returns MTP_OK, MTP_ECLOSED (not up or closing), MTP_EINVAL (not sendable),
 * MTP_ENOMEM. Never calls back.
 */
int mtp_tunnel_conn_send(struct mtp_tunnel_conn *c, const Mtp__Frame *f);

/* Data(stream, packet, quickack) without building a Frame: the envelope is written into the
 * TLS staging buffer and the packet is copied once behind it (or sealed straight from `data`
 * for whole records). Returns MTP_OK, MTP_ECLOSED, MTP_ETOOBIG, MTP_EINVAL (stream 0). */
int mtp_tunnel_conn_send_data(struct mtp_tunnel_conn *c, uint64_t stream, const uint8_t *data, size_t len,
                              bool quickack);
int mtp_tunnel_conn_send_close(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t reason);
int mtp_tunnel_conn_send_credit(struct mtp_tunnel_conn *c, uint64_t stream, uint64_t bytes);
int mtp_tunnel_conn_send_quickack(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t token);

/* The TLS queue is above its high-water mark (on_writable follows). */
bool mtp_tunnel_conn_is_congested(const struct mtp_tunnel_conn *c);
/* Makes on_flush run before the loop next polls. */
void mtp_tunnel_conn_want_flush(struct mtp_tunnel_conn *c);

/*
 * Closes c: with a reason other than MTP_TUNNEL_NO_REASON, Close(0, reason) is sent first (if
 * the TLS connection is open) and the connection lingers until it is written. on_close(err,
 * why) follows asynchronously. Idempotent; safe from inside any callback.
 */
void mtp_tunnel_conn_close(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *why);

/*
 * Writes the length prefix and the Data envelope (everything but the packet bytes) of
 * Data(stream, packet of len bytes, quickack) into out. Returns its size (<=
 * MTP_TUNNEL_DATA_HDR_MAX), or 0 if the frame would be above MTP_TUNNEL_MAX_FRAME or stream is
 * 0. Pure; exposed for tests.
 */
size_t mtp_tunnel_data_header(uint8_t out[MTP_TUNNEL_DATA_HDR_MAX], uint64_t stream, size_t len, bool quickack);

#endif
