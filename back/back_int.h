/*
 * back_int.h - the back's internal structures shared by worker.c (pools, streams, the local
 * link) and rpcconn.c (one middle-proxy RPC connection). Not a public contract.
 *
 * Ownership: a worker owns its pools; a pool owns its connections (freed in the connection's
 * last close_cb); a connection lists the streams it carries (borrowed: the worker's map and
 * the front own the stream's lifetime, see worker.c). Everything runs on the worker's loop.
 */
#ifndef MTP_BACK_INT_H
#define MTP_BACK_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "back.h"
#include "connmap.h"
#include "log.h"
#include "rpc.h"

/* Upstream backpressure, per RPC connection (uv write queue + bytes waiting for READY). */
#define MTP_BACK_HIGH_WATER (8u << 20)
#define MTP_BACK_LOW_WATER (2u << 20)
/* Bytes queued for a connection that is not ready yet: above soft (the connection's total)
 * send() says FULL; above hard (one stream's own bytes, i.e. it ignored FULL) the packet is
 * refused. A front that honours FULL keeps each stream under soft + one read's worth of
 * packets, so the hard limit only catches misbehaving fronts. */
#define MTP_BACK_PENDING_SOFT (1u << 20)
#define MTP_BACK_PENDING_HARD (4u << 20)
/* Connection attempts in a row (different addresses when possible) before waiting streams
 * are closed with MTP_LINK_CLOSE_NO_DC. */
#define MTP_BACK_MAX_TRIES 3
/* Largest client packet (the official proxy's limit). */
#define MTP_BACK_MAX_PACKET 1044480u

const struct mtp_config *mtp_back_config(const struct mtp_back *b);

/* Per-DC statistics: DCs -5..5 have a slot each (index dc + 5); every other DC shares the last
 * one, shown as dc="other". */
#define MTP_BACK_DC_SLOTS 12
#define MTP_BACK_DC_OTHER (MTP_BACK_DC_SLOTS - 1)
static inline int mtp_back_dc_slot(int dc) { return dc >= -5 && dc <= 5 ? dc + 5 : MTP_BACK_DC_OTHER; }

/*
 * One worker's per-DC numbers. Only its worker's thread writes them (relaxed atomic adds: no
 * lock on the data path); scrapes on the main thread read them with relaxed loads. The back
 * owns every block (mtp_back_dcstats_new, freed by mtp_back_free), so a scrape never reads a
 * freed block and the counters outlive their worker.
 */
struct mtp_back_dcstats {
  struct mtp_back_dcstats *_next;              /* in the back's list (guarded by its lock) */
  _Atomic int64_t conns[MTP_BACK_DC_SLOTS];     /* RPC connections open now, any state */
  _Atomic int64_t clients[MTP_BACK_DC_SLOTS];   /* streams carried now */
  _Atomic int64_t growth[MTP_BACK_DC_SLOTS];    /* connections opened because every live one was full */
  _Atomic int64_t rotations[MTP_BACK_DC_SLOTS]; /* ready connections closed by the middle proxy */
  _Atomic int64_t used[MTP_BACK_DC_SLOTS];      /* 1 once the worker had a pool for the slot */
  char _pad[64];                                /* keeps the next heap object off our last line */
};

/* A zeroed block registered with b (thread-safe; the back owns it). NULL on ENOMEM. */
struct mtp_back_dcstats *mtp_back_dcstats_new(struct mtp_back *b);

static inline void mtp_back_dc_add(_Atomic int64_t *v, int64_t n) {
  atomic_fetch_add_explicit(v, n, memory_order_relaxed);
}

/* A packet taken while the stream's connection was not ready. */
struct mtp_back_pending {
  struct mtp_back_pending *next; /* owns */
  uint32_t flags;                /* RPC_PROXY_REQ flags */
  size_t len;
  uint8_t data[];
};

struct mtp_back_stream {
  struct mtp_back_worker *w;         /* borrows */
  struct mtp_back_pool *pool;        /* borrows */
  struct mtp_back_conn *conn;        /* borrows: the connection carrying it; NULL while moved */
  struct mtp_back_stream *next;      /* in conn->streams (or a local list) */
  struct mtp_back_stream **pprev;
  uint64_t conn_id;
  void *front;                             /* borrows */
  const struct mtp_link_front_ops *ops;    /* borrows */
  int proto;
  uint8_t client_ip[16];
  uint32_t client_port;
  struct sockaddr_storage local_addr; /* where the client connected */
  bool has_ad_tag;
  uint8_t ad_tag[16];
  uint32_t inflight;    /* packets sent since the last RPC_PROXY_ANS; 0 = idle, may migrate */
  bool want_writable;   /* send() returned MTP_LINK_FULL; on_writable is owed */
  bool dead;            /* closed (by the front, or on_close delivered): no more ops */
  struct mtp_back_pending *pend_head; /* owns */
  struct mtp_back_pending **pend_tail;
  size_t pend_bytes;
};

enum mtp_back_conn_state {
  MTP_BACK_CONN_CONNECTING,     /* waiting for TCP connect */
  MTP_BACK_CONN_WAIT_NONCE,     /* our nonce sent; waiting for the server's */
  MTP_BACK_CONN_WAIT_HANDSHAKE, /* keys set, our handshake sent; waiting for the server's */
  MTP_BACK_CONN_READY,          /* streams' packets flow */
  MTP_BACK_CONN_CLOSING,        /* handles closing; streams handled in the last close_cb */
};

struct mtp_back_conn {
  struct mtp_back_worker *w; /* borrows */
  struct mtp_back_pool *pool; /* borrows */
  struct mtp_back_conn *next, **pprev; /* in pool->conns */
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  uv_timer_t timer; /* handshake timeout */
  int handles;      /* open handles; the conn is freed when it reaches 0 */
  enum mtp_back_conn_state state;
  bool was_ready;
  int fail_err;     /* why it closed (MTP_ECLOSED for a peer close, 0 for our own stop) */
  int addr_index;
  struct sockaddr_storage peer, local;
  struct mtp_tg_snapshot *snap; /* owns a reference: the secret used for the keys */
  struct mtp_rpc_codec codec;
  uint8_t nonce[16];
  uint32_t crypto_ts;
  struct mtp_back_stream *streams; /* borrows */
  size_t nstreams;
  size_t pending_bytes; /* sum of the streams' pend_bytes while not READY */
  bool has_blocked;     /* some stream is owed on_writable */
  uint8_t *rbuf;        /* owns: read buffer */
  char where[24];
  struct mtp_log_ctx log;
};

struct mtp_back_pool {
  int dc;
  int slot; /* mtp_back_dc_slot(dc) */
  struct mtp_back_worker *w;
  struct mtp_back_conn *conns; /* owns */
  struct mtp_back_pool *next;
  int fail_streak;     /* failed attempts in a row */
  int last_failed;     /* address index of the last failure, -1 = none */
};

struct mtp_back_worker {
  struct mtp_back *back; /* borrows */
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;       /* borrows */
  int index;
  struct mtp_link link;
  struct mtp_back_pool *pools; /* owns */
  struct mtp_back_dcstats *stats; /* borrows: owned by the back */
  struct mtp_connmap map;      /* conn_id -> stream */
  bool stopping;
  unsigned long long next_log_id;
};

/* ---- rpcconn.c ---- */

/* Opens a connection of pool to addr (snap: transfers one reference). Never calls the
 * front's ops; a connect error is handled later (through close_cb). NULL only on ENOMEM. */
struct mtp_back_conn *mtp_back_conn_open(struct mtp_back_pool *pool, struct mtp_tg_snapshot *snap, int addr_index,
                                         const struct sockaddr_storage *addr);
/* Starts closing (idempotent). err: why (logged, counted unless 0). Streams are handled in
 * the last close_cb, via mtp_back_pool_conn_gone. */
void mtp_back_conn_fail(struct mtp_back_conn *c, int err);
/* Sends one RPC_PROXY_REQ for s (conn READY). Returns MTP_OK or a negative error (then the
 * connection is failing). */
int mtp_back_conn_send_packet(struct mtp_back_conn *c, struct mtp_back_stream *s, uint32_t flags,
                              const uint8_t *data, size_t len);
/* Sends RPC_CLOSE_CONN (conn READY). */
void mtp_back_conn_send_close(struct mtp_back_conn *c, uint64_t conn_id);
/* Bytes waiting on this connection: the uv write queue plus pending_bytes. */
size_t mtp_back_conn_queued(const struct mtp_back_conn *c);
const char *mtp_back_conn_state_str(enum mtp_back_conn_state s);

/* ---- worker.c (called by rpcconn.c) ---- */

/* The connection became READY: flush the streams' pending packets. */
void mtp_back_pool_conn_ready(struct mtp_back_conn *c);
/* The connection's handles are closed: move or close its streams. c is freed after. */
void mtp_back_pool_conn_gone(struct mtp_back_conn *c);
/* A message for a stream of c. */
void mtp_back_worker_dispatch(struct mtp_back_conn *c, const struct mtp_rpc_msg *m);
/* c's queue drained below the low-water mark: on_writable for the streams owed one. */
void mtp_back_conn_notify_writable(struct mtp_back_conn *c);

#endif
