/*
 * tunnel_conn.c - one tunnel connection: TLS, frames, Hello, heartbeats (see tunnel_conn.h).
 */
#include "tunnel_conn.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "link.h"
#include "metrics.h"

#include "banned.h"

enum conn_state {
  C_TLS = 0,    /* TCP connect / TLS handshake in progress */
  C_WAIT_HELLO, /* verified, our Hello sent; waiting for the peer's */
  C_UP,         /* both Hellos exchanged: stream frames flow */
  C_CLOSING,    /* closed; waiting for the TLS connection's on_close */
};

struct mtp_tunnel_conn {
  struct mtp_tlsuv *tls; /* owns (freed by tlsuv after its on_close) */
  enum conn_state state;
  const struct mtp_tunnel_conn_ops *ops; /* borrows */
  void *data;                            /* borrows */
  struct mtp_tunnel_dec dec;
  char node[64];                         /* ours */
  char peer_node[64];
  uint64_t window, peer_window;
  uint64_t heartbeat_ms, timeout_ms;
  char *const *allowed;                  /* borrows */
  size_t nallowed;
  uint64_t last_rx, last_ping;           /* loop time (ms) */
  uint64_t ping_id;
  bool was_up;
  bool clean;                            /* the close is not a failure */
  bool flush_wanted;
  uv_loop_t *loop;
  struct mtp_log_ctx log;
};

/* ---- the Data envelope, written by hand so the packet need not be copied into a Frame ---- */

static size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

static size_t put_varint(uint8_t *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (uint8_t)v;
  return n;
}

size_t mtp_tunnel_data_header(uint8_t out[MTP_TUNNEL_DATA_HDR_MAX], uint64_t stream, size_t len, bool quickack) {
  if (stream == 0 || len > MTP_TUNNEL_MAX_FRAME)
    return 0;
  /* Data: 1:stream (varint), 3:quickack (varint 1, only when set), 2:packet (bytes, last) */
  uint64_t dlen = 1 + varint_len(stream) + (quickack ? 2 : 0) + 1 + varint_len(len) + len;
  /* Frame: 3:data (bytes) */
  uint64_t flen = 1 + varint_len(dlen) + dlen;
  if (flen > MTP_TUNNEL_MAX_FRAME)
    return 0;
  uint8_t *p = out;
  *p++ = (uint8_t)(flen >> 24);
  *p++ = (uint8_t)(flen >> 16);
  *p++ = (uint8_t)(flen >> 8);
  *p++ = (uint8_t)flen;
  *p++ = (3u << 3) | 2u; /* Frame.data, length-delimited */
  p += put_varint(p, dlen);
  *p++ = (1u << 3) | 0u; /* Data.stream, varint */
  p += put_varint(p, stream);
  if (quickack) {
    *p++ = (3u << 3) | 0u; /* Data.quickack, varint */
    *p++ = 1;
  }
  *p++ = (2u << 3) | 2u; /* Data.packet, length-delimited */
  p += put_varint(p, len);
  return (size_t)(p - out);
}

/* ---- sending ---- */

static bool can_send(const struct mtp_tunnel_conn *c) {
  return (c->state == C_WAIT_HELLO || c->state == C_UP) && mtp_tlsuv_is_open(c->tls);
}

/* Any frame, also before the peer's Hello (our Hello, a refusal). */
static int send_frame(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  if (!can_send(c))
    return MTP_ECLOSED;
  size_t n = mtp_tunnel_frame_size(f);
  if (n == 0)
    return MTP_EINVAL;
  int rc;
  if (n <= MTP_TLSUV_RECORD) {
    uint8_t *p = mtp_tlsuv_reserve(c->tls, n);
    if (p == NULL)
      return MTP_ECLOSED;
    ssize_t w = mtp_tunnel_encode(f, p, n);
    if (w < 0) {
      mtp_tlsuv_commit(c->tls, 0);
      return (int)w;
    }
    mtp_tlsuv_commit(c->tls, (size_t)w);
    rc = MTP_OK;
  } else {
    uint8_t *buf = mtp_malloc(n);
    if (buf == NULL)
      return MTP_ENOMEM;
    ssize_t w = mtp_tunnel_encode(f, buf, n);
    rc = w < 0 ? (int)w : mtp_tlsuv_write(c->tls, buf, (size_t)w);
    mtp_free(buf);
  }
  if (rc == MTP_OK)
    mtp_metric_add(MTP_M_TUNNEL_BYTES_OUT, (int64_t)n);
  return rc;
}

int mtp_tunnel_conn_send(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  if (c->state != C_UP)
    return MTP_ECLOSED;
  return send_frame(c, f);
}

int mtp_tunnel_conn_send_data(struct mtp_tunnel_conn *c, uint64_t stream, const uint8_t *data, size_t len,
                              bool quickack) {
  if (c->state != C_UP || !mtp_tlsuv_is_open(c->tls))
    return MTP_ECLOSED;
  if (stream == 0)
    return MTP_EINVAL;
  uint8_t *p = mtp_tlsuv_reserve(c->tls, MTP_TUNNEL_DATA_HDR_MAX);
  if (p == NULL)
    return MTP_ECLOSED;
  size_t h = mtp_tunnel_data_header(p, stream, len, quickack);
  if (h == 0) {
    mtp_tlsuv_commit(c->tls, 0);
    return MTP_ETOOBIG;
  }
  mtp_tlsuv_commit(c->tls, h);
  int rc = len > 0 ? mtp_tlsuv_write(c->tls, data, len) : MTP_OK;
  if (rc == MTP_OK)
    mtp_metric_add(MTP_M_TUNNEL_BYTES_OUT, (int64_t)(h + len));
  return rc;
}

int mtp_tunnel_conn_send_close(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t reason) {
  Mtp__Close m = MTP__CLOSE__INIT;
  m.stream = stream;
  m.reason = reason;
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_CLOSE;
  f.close = &m;
  return mtp_tunnel_conn_send(c, &f);
}

int mtp_tunnel_conn_send_credit(struct mtp_tunnel_conn *c, uint64_t stream, uint64_t bytes) {
  Mtp__Credit m = MTP__CREDIT__INIT;
  m.stream = stream;
  m.bytes = bytes;
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_CREDIT;
  f.credit = &m;
  return mtp_tunnel_conn_send(c, &f);
}

int mtp_tunnel_conn_send_quickack(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t token) {
  Mtp__QuickAck m = MTP__QUICK_ACK__INIT;
  m.stream = stream;
  m.token = token;
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_QUICKACK;
  f.quickack = &m;
  return mtp_tunnel_conn_send(c, &f);
}

static int send_hello(struct mtp_tunnel_conn *c) {
  Mtp__Hello m = MTP__HELLO__INIT;
  m.version = MTP_TUNNEL_VERSION;
  m.node = c->node;
  m.window = c->window;
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_HELLO;
  f.hello = &m;
  return send_frame(c, &f);
}

static void send_ping_pong(struct mtp_tunnel_conn *c, bool ping, uint64_t id) {
  Mtp__Ping pi = MTP__PING__INIT;
  Mtp__Pong po = MTP__PONG__INIT;
  Mtp__Frame f = MTP__FRAME__INIT;
  if (ping) {
    pi.id = id;
    f.msg_case = MTP__FRAME__MSG_PING;
    f.ping = &pi;
  } else {
    po.id = id;
    f.msg_case = MTP__FRAME__MSG_PONG;
    f.pong = &po;
  }
  send_frame(c, &f);
}

bool mtp_tunnel_conn_is_congested(const struct mtp_tunnel_conn *c) {
  return c->state != C_CLOSING && mtp_tlsuv_is_congested(c->tls);
}

void mtp_tunnel_conn_want_flush(struct mtp_tunnel_conn *c) {
  if (c->state == C_UP)
    mtp_tlsuv_schedule_flush(c->tls);
}

/* ---- closing ---- */

void mtp_tunnel_conn_close(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *why) {
  if (c == NULL || c->state == C_CLOSING)
    return;
  bool linger = false;
  if (reason != MTP_TUNNEL_NO_REASON && can_send(c)) {
    Mtp__Close m = MTP__CLOSE__INIT;
    m.stream = 0;
    m.reason = reason;
    Mtp__Frame f = MTP__FRAME__INIT;
    f.msg_case = MTP__FRAME__MSG_CLOSE;
    f.close = &m;
    linger = send_frame(c, &f) == MTP_OK;
  }
  if (err == MTP_OK)
    c->clean = true;
  c->state = C_CLOSING;
  mtp_tlsuv_close(c->tls, err, why, linger);
}

static void fail(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void fail(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *fmt, ...) {
  char why[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  mtp_tunnel_conn_close(c, err, reason, why);
}

/* ---- TLS callbacks ---- */

static void copy_printable(char *out, size_t cap, const char *s, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n && k + 1 < cap; i++) {
    unsigned char ch = (unsigned char)s[i];
    out[k++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
  }
  out[k] = '\0';
}

static void on_tls_open(struct mtp_tlsuv *t) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  if (c->state != C_TLS)
    return;
  c->state = C_WAIT_HELLO;
  c->last_rx = c->last_ping = uv_now(c->loop);
  snprintf(c->log.peer, sizeof(c->log.peer), "%s", mtp_tlsuv_peer_addr(t));
  uint64_t tick = c->timeout_ms;
  if (c->heartbeat_ms > 0 && c->heartbeat_ms < tick)
    tick = c->heartbeat_ms;
  tick /= 4;
  mtp_tlsuv_set_tick(t, tick > 0 ? tick : 1);
  if (send_hello(c) != MTP_OK) {
    fail(c, MTP_ENOMEM, MTP_TUNNEL_NO_REASON, "cannot send hello");
    return;
  }
  if (c->nallowed > 0) {
    const char *cn = mtp_tlsuv_peer_cn(t);
    bool ok = false;
    for (size_t i = 0; i < c->nallowed && !ok; i++)
      ok = strcmp(c->allowed[i], cn) == 0;
    if (!ok)
      fail(c, MTP_EPOLICY, MTP_TUNNEL_CLOSE_NOT_ALLOWED, "front '%s' is not in tunnel_allowed_fronts", cn);
  }
}

static void on_hello(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  if (f->msg_case != MTP__FRAME__MSG_HELLO) {
    fail(c, MTP_EPROTO, MTP_TUNNEL_CLOSE_PROTOCOL, "protocol error: a %s frame before hello",
         mtp_tunnel_frame_name(f));
    return;
  }
  const Mtp__Hello *h = f->hello;
  const char *node = h->node != NULL ? h->node : "";
  copy_printable(c->peer_node, sizeof(c->peer_node), node, strlen(node));
  if (h->version < 1) {
    fail(c, MTP_EPROTO, MTP_TUNNEL_CLOSE_VERSION, "peer '%s' speaks tunnel version %u, we need >= 1", c->peer_node,
         h->version);
    return;
  }
  c->peer_window = h->window != 0 ? h->window : c->window;
  c->state = C_UP;
  c->was_up = true;
  MTP_COUNT(TUNNEL_CONNECTS);
  mtp_metric_add(MTP_M_TUNNEL_UP, 1);
  mtp_logc(&c->log, MTP_LOG_INFO, "tunnel up: peer '%s' (node '%s', version %u, window %llu, %s)",
           mtp_tlsuv_peer_cn(c->tls), c->peer_node, h->version, (unsigned long long)c->peer_window,
           mtp_tlsuv_suite(c->tls));
  c->ops->on_up(c);
}

static void on_frame(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  switch (f->msg_case) {
  case MTP__FRAME__MSG_HELLO:
    fail(c, MTP_EPROTO, MTP_TUNNEL_CLOSE_PROTOCOL, "protocol error: a second hello");
    return;
  case MTP__FRAME__MSG_PING:
    send_ping_pong(c, false, f->ping->id);
    return;
  case MTP__FRAME__MSG_PONG:
    return; /* any frame proves the peer alive; last_rx is already updated */
  case MTP__FRAME__MSG__NOT_SET:
    mtp_debugc(&c->log, "a frame of unknown type ignored");
    return;
  case MTP__FRAME__MSG_CLOSE:
    if (f->close->stream == 0) {
      uint32_t r = f->close->reason;
      if (r == MTP_LINK_CLOSE_SHUTDOWN) {
        c->clean = true;
        mtp_tunnel_conn_close(c, MTP_OK, MTP_TUNNEL_NO_REASON, "the peer is shutting down");
      } else {
        fail(c, MTP_ECLOSED, MTP_TUNNEL_NO_REASON, "closed by the peer (reason %u%s)", r,
             r == MTP_TUNNEL_CLOSE_PROTOCOL      ? ": protocol error"
             : r == MTP_TUNNEL_CLOSE_VERSION     ? ": version not supported"
             : r == MTP_TUNNEL_CLOSE_NOT_ALLOWED ? ": this front is not allowed"
             : r == MTP_TUNNEL_CLOSE_TIMEOUT     ? ": heartbeat timeout"
                                                 : "");
      }
      return;
    }
    break;
  default:
    break;
  }
  c->ops->on_frame(c, f);
}

static void on_tls_data(struct mtp_tlsuv *t, const uint8_t *data, size_t len) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  if (c->state != C_WAIT_HELLO && c->state != C_UP)
    return;
  mtp_metric_add(MTP_M_TUNNEL_BYTES_IN, (int64_t)len);
  c->last_rx = uv_now(c->loop);
  size_t off = 0;
  while (off < len && (c->state == C_WAIT_HELLO || c->state == C_UP)) {
    Mtp__Frame *f = NULL;
    ssize_t r = mtp_tunnel_decode(&c->dec, data + off, len - off, &f);
    if (r < 0) {
      fail(c, (int)r, MTP_TUNNEL_CLOSE_PROTOCOL, "malformed frame: %s", mtp_strerror((int)r));
      return;
    }
    off += (size_t)r;
    if (f == NULL)
      continue;
    if (c->state == C_WAIT_HELLO)
      on_hello(c, f);
    else
      on_frame(c, f);
    mtp_tunnel_frame_free(f);
  }
}

static void on_tls_writable(struct mtp_tlsuv *t) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  if (c->state == C_UP && c->ops->on_writable != NULL)
    c->ops->on_writable(c);
}

static void on_tls_flush(struct mtp_tlsuv *t) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  if (c->state == C_UP && c->ops->on_flush != NULL)
    c->ops->on_flush(c);
}

static void on_tls_tick(struct mtp_tlsuv *t) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  if (c->state != C_WAIT_HELLO && c->state != C_UP)
    return;
  uint64_t now = uv_now(c->loop);
  if (now - c->last_rx >= c->timeout_ms) {
    fail(c, MTP_ETIMEDOUT, MTP_TUNNEL_CLOSE_TIMEOUT, "no frame from the peer for %.1f s%s",
         (double)(now - c->last_rx) / 1000.0, c->state == C_WAIT_HELLO ? " (waiting for its hello)" : "");
    return;
  }
  if (c->state == C_UP && c->heartbeat_ms > 0 && now - c->last_ping >= c->heartbeat_ms) {
    c->last_ping = now;
    send_ping_pong(c, true, ++c->ping_id);
  }
}

static void on_tls_close(struct mtp_tlsuv *t, int err, const char *why) {
  struct mtp_tunnel_conn *c = mtp_tlsuv_data(t);
  c->state = C_CLOSING;
  if (c->was_up)
    mtp_metric_add(MTP_M_TUNNEL_UP, -1);
  if (!c->clean && err != MTP_OK)
    MTP_COUNT(TUNNEL_FAILS);
  c->ops->on_close(c, c->clean ? MTP_OK : err, why);
  mtp_tunnel_dec_free(&c->dec);
  mtp_free(c);
}

static const struct mtp_tlsuv_cbs TLS_CBS = {
    .on_open = on_tls_open,
    .on_data = on_tls_data,
    .on_writable = on_tls_writable,
    .on_flush = on_tls_flush,
    .on_tick = on_tls_tick,
    .on_close = on_tls_close,
};

/* ---- creation ---- */

static struct mtp_tunnel_conn *conn_new(uv_loop_t *loop, const struct mtp_tunnel_conn_opts *o) {
  struct mtp_tunnel_conn *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL)
    return NULL;
  c->state = C_TLS;
  c->ops = o->ops;
  c->data = o->data;
  c->loop = loop;
  const char *node = o->node != NULL ? o->node : "";
  copy_printable(c->node, sizeof(c->node), node, strlen(node));
  c->window = o->window;
  c->heartbeat_ms = o->heartbeat_ms;
  c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 20000;
  c->allowed = o->allowed;
  c->nallowed = o->nallowed;
  mtp_tunnel_dec_init(&c->dec);
  c->log.id = o->log_id;
  c->log.where = o->where;
  snprintf(c->log.peer, sizeof(c->log.peer), "?");
  return c;
}

int mtp_tunnel_conn_dial(struct mtp_tunnel_conn **out, struct mtp_tls_conf *tls, uv_loop_t *loop,
                         const struct sockaddr *addr, const struct mtp_tunnel_conn_opts *o) {
  *out = NULL;
  struct mtp_tunnel_conn *c = conn_new(loop, o);
  if (c == NULL)
    return MTP_ENOMEM;
  if (mtp_tlsuv_connect(&c->tls, tls, loop, addr, &TLS_CBS, c) != MTP_OK) {
    mtp_free(c);
    return MTP_ENOMEM;
  }
  snprintf(c->log.peer, sizeof(c->log.peer), "%s", mtp_tlsuv_peer_addr(c->tls));
  *out = c;
  return MTP_OK;
}

int mtp_tunnel_conn_accept(struct mtp_tunnel_conn **out, struct mtp_tls_conf *tls, uv_stream_t *server,
                           const struct mtp_tunnel_conn_opts *o) {
  *out = NULL;
  struct mtp_tunnel_conn *c = conn_new(server->loop, o);
  if (c == NULL)
    return MTP_ENOMEM;
  if (mtp_tlsuv_accept(&c->tls, tls, server, &TLS_CBS, c) != MTP_OK) {
    mtp_free(c);
    return MTP_ENOMEM;
  }
  snprintf(c->log.peer, sizeof(c->log.peer), "%s", mtp_tlsuv_peer_addr(c->tls));
  *out = c;
  return MTP_OK;
}

/* ---- accessors ---- */

void *mtp_tunnel_conn_data(const struct mtp_tunnel_conn *c) { return c->data; }
bool mtp_tunnel_conn_is_up(const struct mtp_tunnel_conn *c) { return c->state == C_UP; }
const struct mtp_log_ctx *mtp_tunnel_conn_log(const struct mtp_tunnel_conn *c) { return &c->log; }
const char *mtp_tunnel_conn_peer_cn(const struct mtp_tunnel_conn *c) { return mtp_tlsuv_peer_cn(c->tls); }
const char *mtp_tunnel_conn_peer_node(const struct mtp_tunnel_conn *c) { return c->peer_node; }
uint64_t mtp_tunnel_conn_peer_window(const struct mtp_tunnel_conn *c) { return c->peer_window; }
