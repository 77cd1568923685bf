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
 * - Streams (struct mtp_tunnel_stream, below): the connection lists the streams its owner put
 *   on it, keeps each one's credit and queue for sending, and batches the credit the owner
 *   gives back into Credit frames written just before the loop polls.
 *
 * Callbacks are never called synchronously from these functions; the owner may call any of
 * them (also mtp_tunnel_conn_close) from inside any callback. on_close comes exactly once,
 * and c is freed when it returns (streams still on it are detached first). Metrics: TUNNEL_UP (while up), TUNNEL_CONNECTS (each time
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
/* Per-stream window when tunnel_window is 0. */
#define MTP_TUNNEL_DEFAULT_WINDOW ((1u << 20) + (64u << 10))

struct mtp_config;
struct mtp_tunnel_conn;

/* What both sides take from the configuration for their tunnel connections. */
struct mtp_tunnel_params {
  uint64_t window;       /* tunnel_window; MTP_TUNNEL_DEFAULT_WINDOW if 0 */
  uint64_t heartbeat_ms; /* tunnel_heartbeat; 5 s if not > 0 */
  uint64_t timeout_ms;   /* tunnel_timeout; 20 s if not > 0 */
  char node[64];         /* node_name; else the host name; else dflt_node */
};

/* Fills p from cfg (borrowed for the call). Calls gethostname: at setup only. */
void mtp_tunnel_params_init(struct mtp_tunnel_params *p, const struct mtp_config *cfg, const char *dflt_node);

/*
 * The TLS configuration of tunnel connections from cfg's tunnel_cert, tunnel_key and
 * tunnel_ca (errors name those options); peer_name as in struct mtp_tls_conf_opts. Returns as
 * mtp_tls_conf_setup. At setup only (reads files).
 */
int mtp_tunnel_tls_setup(struct mtp_tls_conf **out, const struct mtp_config *cfg, enum mtp_tls_role role,
                         const char *peer_name, uint64_t handshake_timeout_ms, char *err, size_t errlen);

struct mtp_tunnel_conn_ops {
  /* The peer's Hello was accepted: stream frames may be sent now. */
  void (*on_up)(struct mtp_tunnel_conn *c);
  /* A stream frame (Open, Data, QuickAck, Close with stream != 0, Credit), borrowed for the
   * call. Already checked by mtp_tunnel_frame_check. */
  void (*on_frame)(struct mtp_tunnel_conn *c, const Mtp__Frame *f);
  /* The TLS write queue drained below its low-water mark after being congested. Optional. */
  void (*on_writable)(struct mtp_tunnel_conn *c);
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

/*
 * Closes c: with a reason other than MTP_TUNNEL_NO_REASON, Close(0, reason) is sent first (if
 * the TLS connection is open) and the connection lingers until it is written. on_close(err,
 * why) follows asynchronously. Idempotent; safe from inside any callback.
 */
void mtp_tunnel_conn_close(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *why);

/*
 * One stream's flow control (proto/tunnel.proto), the part both sides do alike. The owner
 * embeds it in its own stream (calloc'ed: all zero), sets id, attaches it to an up connection
 * and reaches its struct back from it with container_of.
 *
 * Sending: Data goes out while the peer's credit allows; what does not fit waits in the
 * stream's queue (mtp_tunnel_stream_write) until the peer's Credit lets it out
 * (mtp_tunnel_stream_credit). Receiving: the owner gives back the bytes it has taken
 * (mtp_tunnel_stream_grant); the grants of a connection are sent as Credit frames just before
 * the loop polls.
 *
 * Metrics: TUNNEL_STREAMS counts the streams attached and not yet freed.
 */
struct mtp_tunnel_pend;

struct mtp_tunnel_stream {
  uint64_t id;
  int64_t credit;   /* Data bytes we may still send */
  int64_t window;   /* the peer's window for this stream: the credit it starts with */
  uint64_t unacked; /* bytes received and not yet credited: the owner adds what it receives, the
                     * Credit frames take away what they give back */
  /* private */
  struct mtp_tunnel_conn *_conn;               /* borrows; NULL once detached */
  struct mtp_tunnel_stream *_next, **_pprev;   /* in _conn's streams */
  struct mtp_tunnel_stream *_gnext, **_gpprev; /* in _conn's grants */
  uint64_t _grant;                             /* taken bytes to credit at the next flush */
  struct mtp_tunnel_pend *_pend_head;          /* owns: Data waiting for credit */
  struct mtp_tunnel_pend **_pend_tail;
  size_t _pend_bytes;
  bool _counted;                               /* in the TUNNEL_STREAMS gauge */
};

/* Puts s (id set) on c, which must be up: its credit starts at the peer's window. Cannot fail. */
void mtp_tunnel_stream_attach(struct mtp_tunnel_stream *s, struct mtp_tunnel_conn *c);
/* Takes s off its connection (nothing more is sent for it). Idempotent. */
void mtp_tunnel_stream_detach(struct mtp_tunnel_stream *s);
/* Detaches s and frees its queue (not s itself). Idempotent. */
void mtp_tunnel_stream_free(struct mtp_tunnel_stream *s);
/* The connection s is on, or NULL once detached. */
struct mtp_tunnel_conn *mtp_tunnel_stream_conn(const struct mtp_tunnel_stream *s);

/*
 * Sends Data(s->id, data, quickack) now if nothing waits and the credit allows, else queues a
 * copy. Returns MTP_OK (sent or queued), an error of mtp_tunnel_conn_send_data (nothing sent
 * or queued; MTP_ECLOSED also when detached), MTP_EBACKPRESSURE (the queue would hold more than
 * max_queued bytes; not queued) or MTP_ENOMEM (cannot queue). Never calls back.
 */
int mtp_tunnel_stream_write(struct mtp_tunnel_stream *s, const uint8_t *data, size_t len, bool quickack,
                            size_t max_queued);
/* Sends what the credit allows from the queue. Returns MTP_OK, or the send error (the
 * connection is closing). Never calls back. */
int mtp_tunnel_stream_drain(struct mtp_tunnel_stream *s);
/* The peer's Credit(bytes) for s: adds it (saturating) and drains the queue as above. */
int mtp_tunnel_stream_credit(struct mtp_tunnel_stream *s, uint64_t bytes);
/* True when a write now would go out at once: nothing queued, credit left and the TLS queue
 * not congested. */
bool mtp_tunnel_stream_may_send(const struct mtp_tunnel_stream *s);
/* Bytes waiting in the queue. */
size_t mtp_tunnel_stream_queued(const struct mtp_tunnel_stream *s);
/* Gives bytes back to the peer: a Credit frame for s goes out just before the loop polls
 * (the grants of one iteration are summed). Nothing if s is detached. */
void mtp_tunnel_stream_grant(struct mtp_tunnel_stream *s, uint64_t bytes);

/* The first stream on c (the most recently attached), NULL if none; then s->_next via
 * mtp_tunnel_stream_next. */
struct mtp_tunnel_stream *mtp_tunnel_conn_streams(const struct mtp_tunnel_conn *c);
struct mtp_tunnel_stream *mtp_tunnel_stream_next(const struct mtp_tunnel_stream *s);
/* How many streams are on c. */
size_t mtp_tunnel_conn_nstreams(const struct mtp_tunnel_conn *c);

/*
 * Writes the length prefix and the Data envelope (everything but the packet bytes) of
 * Data(stream, packet of len bytes, quickack) into out. Returns its size (<=
 * MTP_TUNNEL_DATA_HDR_MAX), or 0 if the frame would be above MTP_TUNNEL_MAX_FRAME or stream is
 * 0. Pure; exposed for tests.
 */
size_t mtp_tunnel_data_header(uint8_t out[MTP_TUNNEL_DATA_HDR_MAX], uint64_t stream, size_t len, bool quickack);

#endif
