/*
 * tunnel_conn.c - one tunnel connection: TLS, frames, Hello, heartbeats (see tunnel_conn.h).
 */
#include "tunnel_conn.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "config.h"
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
  uv_loop_t *loop;
  struct mtp_log_ctx log;
  struct mtp_tunnel_stream *streams; /* borrows: the owner's streams on this connection */
  size_t nstreams;
  struct mtp_tunnel_stream *grants;  /* borrows: streams with credit to give back */
};

/* A Data packet waiting for the peer's credit. */
struct mtp_tunnel_pend {
  struct mtp_tunnel_pend *next; /* owns */
  size_t len;
  bool quickack;
  uint8_t data[];
};

/* ---- configuration ---- */

static uint64_t seconds_to_ms(double s, uint64_t dflt) {
  if (!(s > 0))
    return dflt;
  double ms = s * 1000.0 + 0.5;
  if (ms < 1)
    return 1;
  if (ms > 1e12)
    return (uint64_t)1e12;
  return (uint64_t)ms;
}

void mtp_tunnel_params_init(struct mtp_tunnel_params *p, const struct mtp_config *cfg, const char *dflt_node) {
  memset(p, 0, sizeof(*p));
  p->window = cfg->tunnel_window > 0 ? cfg->tunnel_window : MTP_TUNNEL_DEFAULT_WINDOW;
  p->heartbeat_ms = seconds_to_ms(cfg->tunnel_heartbeat, 5000);
  p->timeout_ms = seconds_to_ms(cfg->tunnel_timeout, 20000);
  if (cfg->node_name != NULL && cfg->node_name[0] != '\0') {
    snprintf(p->node, sizeof(p->node), "%s", cfg->node_name);
  } else if (gethostname(p->node, sizeof(p->node) - 1) != 0) {
    snprintf(p->node, sizeof(p->node), "%s", dflt_node);
  }
  p->node[sizeof(p->node) - 1] = '\0';
}

int mtp_tunnel_tls_setup(struct mtp_tls_conf **out, const struct mtp_config *cfg, enum mtp_tls_role role,
                         const char *peer_name, uint64_t handshake_timeout_ms, char *err, size_t errlen) {
  struct mtp_tls_conf_opts to = {
      .role = role,
      .cert = cfg->tunnel_cert,
      .key = cfg->tunnel_key,
      .ca = cfg->tunnel_ca,
      .peer_name = peer_name,
      .cert_opt = "tunnel_cert",
      .key_opt = "tunnel_key",
      .ca_opt = "tunnel_ca",
      .handshake_timeout_ms = handshake_timeout_ms,
  };
  return mtp_tls_conf_setup(out, &to, err, errlen);
}

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

/* Close(stream, reason), also before the peer's Hello (the tunnel's Close(0) of a refusal). */
static int send_close_frame(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t reason) {
  Mtp__Close m = MTP__CLOSE__INIT;
  m.stream = stream;
  m.reason = reason;
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_CLOSE;
  f.close = &m;
  return send_frame(c, &f);
}

int mtp_tunnel_conn_send_close(struct mtp_tunnel_conn *c, uint64_t stream, uint32_t reason) {
  if (c->state != C_UP)
    return MTP_ECLOSED;
  return send_close_frame(c, stream, reason);
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

static void want_flush(struct mtp_tunnel_conn *c) {
  if (c->state == C_UP)
    mtp_tlsuv_schedule_flush(c->tls);
}

/* ---- streams ---- */

static void grants_del(struct mtp_tunnel_stream *s) {
  if (s->_gpprev == NULL)
    return;
  *s->_gpprev = s->_gnext;
  if (s->_gnext != NULL)
    s->_gnext->_gpprev = s->_gpprev;
  s->_gnext = NULL;
  s->_gpprev = NULL;
}

void mtp_tunnel_stream_attach(struct mtp_tunnel_stream *s, struct mtp_tunnel_conn *c) {
  s->_conn = c;
  uint64_t w = c->peer_window;
  s->window = (int64_t)(w > (uint64_t)INT64_MAX / 2 ? (uint64_t)INT64_MAX / 2 : w);
  s->credit = s->window;
  if (s->_pend_head == NULL)
    s->_pend_tail = &s->_pend_head;
  s->_next = c->streams;
  if (c->streams != NULL)
    c->streams->_pprev = &s->_next;
  s->_pprev = &c->streams;
  c->streams = s;
  c->nstreams++;
  if (!s->_counted) {
    s->_counted = true;
    mtp_metric_add(MTP_M_TUNNEL_STREAMS, 1);
  }
}

void mtp_tunnel_stream_detach(struct mtp_tunnel_stream *s) {
  grants_del(s);
  if (s->_pprev != NULL) {
    *s->_pprev = s->_next;
    if (s->_next != NULL)
      s->_next->_pprev = s->_pprev;
    s->_conn->nstreams--;
  }
  s->_next = NULL;
  s->_pprev = NULL;
  s->_conn = NULL;
}

void mtp_tunnel_stream_free(struct mtp_tunnel_stream *s) {
  mtp_tunnel_stream_detach(s);
  struct mtp_tunnel_pend *p = s->_pend_head;
  while (p != NULL) {
    struct mtp_tunnel_pend *n = p->next;
    mtp_free(p);
    p = n;
  }
  s->_pend_head = NULL;
  s->_pend_tail = &s->_pend_head;
  s->_pend_bytes = 0;
  if (s->_counted) {
    s->_counted = false;
    mtp_metric_add(MTP_M_TUNNEL_STREAMS, -1);
  }
}

struct mtp_tunnel_conn *mtp_tunnel_stream_conn(const struct mtp_tunnel_stream *s) { return s->_conn; }

/* A packet larger than the window still goes out once the whole window is credit. */
static bool credit_allows(const struct mtp_tunnel_stream *s, size_t len) {
  return s->credit >= (int64_t)len || s->credit >= s->window;
}

int mtp_tunnel_stream_write(struct mtp_tunnel_stream *s, const uint8_t *data, size_t len, bool quickack,
                            size_t max_queued) {
  if (s->_conn == NULL)
    return MTP_ECLOSED;
  if (s->_pend_head == NULL && credit_allows(s, len)) {
    int rc = mtp_tunnel_conn_send_data(s->_conn, s->id, data, len, quickack);
    if (rc == MTP_OK)
      s->credit -= (int64_t)len;
    return rc;
  }
  if (s->_pend_bytes + len > max_queued)
    return MTP_EBACKPRESSURE;
  struct mtp_tunnel_pend *p = mtp_malloc(sizeof(*p) + len);
  if (p == NULL)
    return MTP_ENOMEM;
  p->next = NULL;
  p->len = len;
  p->quickack = quickack;
  memcpy(p->data, data, len);
  *s->_pend_tail = p;
  s->_pend_tail = &p->next;
  s->_pend_bytes += len;
  return MTP_OK;
}

int mtp_tunnel_stream_drain(struct mtp_tunnel_stream *s) {
  if (s->_conn == NULL)
    return MTP_ECLOSED;
  while (s->_pend_head != NULL && credit_allows(s, s->_pend_head->len)) {
    struct mtp_tunnel_pend *p = s->_pend_head;
    int rc = mtp_tunnel_conn_send_data(s->_conn, s->id, p->data, p->len, p->quickack);
    if (rc != MTP_OK)
      return rc;
    s->credit -= (int64_t)p->len;
    s->_pend_head = p->next;
    if (s->_pend_head == NULL)
      s->_pend_tail = &s->_pend_head;
    s->_pend_bytes -= p->len;
    mtp_free(p);
  }
  return MTP_OK;
}

int mtp_tunnel_stream_credit(struct mtp_tunnel_stream *s, uint64_t bytes) {
  if (bytes > (uint64_t)INT64_MAX / 4)
    bytes = (uint64_t)INT64_MAX / 4;
  if (s->credit < INT64_MAX / 2)
    s->credit += (int64_t)bytes;
  return mtp_tunnel_stream_drain(s);
}

bool mtp_tunnel_stream_may_send(const struct mtp_tunnel_stream *s) {
  return s->_conn != NULL && s->_pend_head == NULL && s->credit > 0 && !mtp_tunnel_conn_is_congested(s->_conn);
}

size_t mtp_tunnel_stream_queued(const struct mtp_tunnel_stream *s) { return s->_pend_bytes; }

void mtp_tunnel_stream_grant(struct mtp_tunnel_stream *s, uint64_t bytes) {
  struct mtp_tunnel_conn *c = s->_conn;
  if (c == NULL)
    return;
  s->_grant += bytes;
  if (s->_gpprev == NULL) {
    s->_gnext = c->grants;
    if (c->grants != NULL)
      c->grants->_gpprev = &s->_gnext;
    s->_gpprev = &c->grants;
    c->grants = s;
  }
  want_flush(c);
}

/* Just before the loop polls: the Credit frames of the grants made since the last time. */
static void send_grants(struct mtp_tunnel_conn *c) {
  struct mtp_tunnel_stream *s;
  while ((s = c->grants) != NULL) {
    grants_del(s);
    if (s->_grant > 0) {
      mtp_tunnel_conn_send_credit(c, s->id, s->_grant);
      s->unacked = s->unacked > s->_grant ? s->unacked - s->_grant : 0;
      s->_grant = 0;
    }
  }
}

struct mtp_tunnel_stream *mtp_tunnel_conn_streams(const struct mtp_tunnel_conn *c) { return c->streams; }
struct mtp_tunnel_stream *mtp_tunnel_stream_next(const struct mtp_tunnel_stream *s) { return s->_next; }
size_t mtp_tunnel_conn_nstreams(const struct mtp_tunnel_conn *c) { return c->nstreams; }

/* ---- closing ---- */

void mtp_tunnel_conn_close(struct mtp_tunnel_conn *c, int err, uint32_t reason, const char *why) {
  if (c == NULL || c->state == C_CLOSING)
    return;
  bool linger = false;
  if (reason != MTP_TUNNEL_NO_REASON && can_send(c))
    linger = send_close_frame(c, 0, reason) == MTP_OK;
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
  if (c->state == C_UP)
    send_grants(c);
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
  while (c->streams != NULL)
    mtp_tunnel_stream_detach(c->streams); /* the owner's, if it left any: no pointer to c stays */
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
