/*
 * session.c - a client session: obfuscated2 handshake, then packets relayed through the link
 * in both directions (see the state diagram in session.h).
 *
 * Client -> back: a read buffer is borrowed from the worker's pool for one read callback,
 * decrypted in place, cut into packets by the framing decoder and handed to link->send.
 * Back -> client: each packet is framed, encrypted into one fresh buffer and written; the
 * buffer belongs to the write request until its callback. A client whose unsent bytes would
 * exceed cfg->client_send_budget is closed, so a slow reader never grows memory nor stalls
 * the DC connection that feeds it.
 *
 * Close safety: session_close() may run inside any callback, including link ops called from
 * inside link->send(). It only changes the state, tells the link and starts uv_close on the
 * two handles; the memory goes in the close callback of the last handle. Code that called
 * something which may close the session re-checks s->state afterwards.
 */
#include "session.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "framing.h"
#include "log.h"
#include "metrics.h"
#include "obf2.h"

#include "banned.h"

enum session_state {
  S_WAIT_HEADER, /* collecting the client's 64-byte obfuscated2 header (handshake timer) */
  S_DISCARD,     /* handshake failed: reading and dropping input until the handshake timer */
  S_RELAY,       /* link stream open: relaying packets both ways (idle timer) */
  S_FLUSH,       /* the back ended the stream: waiting for queued bytes to reach the client */
  S_CLOSING,     /* handles closing: waiting for their close callbacks to free the session */
};

static const char *session_state_str(enum session_state st) {
  switch (st) {
  case S_WAIT_HEADER:
    return "wait_header";
  case S_DISCARD:
    return "discard";
  case S_RELAY:
    return "relay";
  case S_FLUSH:
    return "flush";
  case S_CLOSING:
    return "closing";
  }
  return "?";
}

struct mtp_session {
  uv_tcp_t tcp;
  uv_timer_t timer;                   /* handshake, idle or flush deadline, by state */
  struct mtp_front_ctx *fc;           /* borrows */
  const struct mtp_listener_conf *lc; /* borrows: the listener it came through */
  struct mtp_session *prev, *next;    /* in fc->sessions */
  enum session_state state;
  int handles;                        /* handles not yet closed (tcp + timer) */
  bool reading;                       /* uv_read_start is in effect */
  bool link_full;                     /* link->send said MTP_LINK_FULL; wait for on_writable */
  enum mtp_proto proto;               /* MTP_PROTO_NONE until the handshake succeeds */
  void *stream;                       /* link stream; NULL before open and after close/on_close */
  uint64_t last_active;               /* uv_now() at the last traffic, for the idle timer */
  size_t hdr_have;
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  struct mtp_log_ctx log;
  struct mtp_obf2 obf;
  struct mtp_frame_dec dec;
};

/* One write to the client; owns its bytes until on_written. */
struct wreq {
  uv_write_t req;
  size_t len;
  uint8_t data[];
};

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void on_timer(uv_timer_t *t);
static void on_handle_closed(uv_handle_t *h);
static void link_on_packet(void *front, const uint8_t *data, size_t len);
static void link_on_quickack(void *front, uint32_t token);
static void link_on_close(void *front, int reason);
static void link_on_writable(void *front);

static const struct mtp_link_front_ops front_ops = {
    .on_packet = link_on_packet,
    .on_quickack = link_on_quickack,
    .on_close = link_on_close,
    .on_writable = link_on_writable,
};

#define NO_METRIC (-1)

static uint64_t seconds_to_ms(double s) {
  if (!(s > 0))
    return 1;
  double ms = s * 1000.0 + 0.5;
  if (ms < 1)
    return 1;
  if (ms > 1e15)
    return (uint64_t)1e15;
  return (uint64_t)ms;
}

/* The one predicate deciding whether we read from the client. */
static bool session_may_read(const struct mtp_session *s) {
  switch (s->state) {
  case S_WAIT_HEADER:
  case S_DISCARD:
    return true;
  case S_RELAY:
    return !s->link_full;
  case S_FLUSH:
  case S_CLOSING:
    return false;
  }
  return false;
}

static void session_close(struct mtp_session *s, int metric, bool flush, const char *why);

static void session_update_reading(struct mtp_session *s) {
  bool want = session_may_read(s);
  if (want && !s->reading) {
    int r = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
    if (r < 0) {
      mtp_logc(&s->log, MTP_LOG_WARN, "read start failed: %s", uv_strerror(r));
      session_close(s, NO_METRIC, false, "read start failed");
      return;
    }
    s->reading = true;
  } else if (!want && s->reading) {
    if (s->state != S_CLOSING)
      uv_read_stop((uv_stream_t *)&s->tcp);
    s->reading = false;
  }
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct mtp_session *s = req->data;
  mtp_free(req);
  if (s->state == S_FLUSH)
    session_close(s, NO_METRIC, false, status < 0 ? "shutdown failed" : "flushed");
}

/* Starts the flush of a session whose stream the back ended; false when it cannot. */
static bool session_start_flush(struct mtp_session *s) {
  uv_shutdown_t *req = mtp_malloc(sizeof(*req));
  if (req == NULL)
    return false;
  req->data = s;
  if (uv_shutdown(req, (uv_stream_t *)&s->tcp, on_shutdown) < 0) {
    mtp_free(req);
    return false;
  }
  s->state = S_FLUSH;
  session_update_reading(s);
  uv_timer_stop(&s->timer);
  uv_timer_start(&s->timer, on_timer, seconds_to_ms(s->fc->cfg->handshake_timeout), 0);
  return true;
}

/*
 * Ends the session: counts metric (an MTP_M_* or NO_METRIC), releases the link stream if we
 * still hold it, then either flushes (flush: only after the back ended the stream) or closes
 * both handles. Safe inside any callback; idempotent.
 */
static void session_close(struct mtp_session *s, int metric, bool flush, const char *why) {
  if (s->state == S_CLOSING || (s->state == S_FLUSH && flush))
    return;
  if (metric != NO_METRIC)
    mtp_metric_add((enum mtp_metric)metric, 1);
  mtp_debugc(&s->log, "closing in state %s: %s", session_state_str(s->state), why);
  if (s->stream != NULL) {
    void *stream = s->stream;
    s->stream = NULL;
    s->fc->link->close(s->fc->link, stream);
  }
  if (flush && s->state == S_RELAY && session_start_flush(s))
    return;
  s->state = S_CLOSING;
  s->reading = false;
  uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&s->timer, on_handle_closed);
}

static void on_handle_closed(uv_handle_t *h) {
  struct mtp_session *s = h->data;
  if (--s->handles > 0)
    return;
  struct mtp_front_ctx *fc = s->fc;
  if (s->prev != NULL)
    s->prev->next = s->next;
  else
    fc->sessions = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
  fc->nsessions--;
  if (s->proto != MTP_PROTO_NONE)
    mtp_frame_dec_free(&s->dec);
  mtp_obf2_free(&s->obf);
  mtp_wipe(s, sizeof(*s));
  mtp_free(s);
  mtp_metric_add(MTP_M_CLIENTS_ACTIVE, -1);
}

/* ---- back -> client ---- */

static void on_written(uv_write_t *req, int status) {
  struct wreq *w = (struct wreq *)req;
  struct mtp_session *s = req->data;
  mtp_free(w);
  if (status < 0 && status != UV_ECANCELED && (s->state == S_RELAY || s->state == S_FLUSH)) {
    mtp_debugc(&s->log, "write failed: %s", uv_strerror(status));
    session_close(s, NO_METRIC, false, "write failed");
  }
}

/* True when total more bytes may be queued to the client. An empty queue always takes one
 * packet, so a packet bigger than the budget still goes through to a reading client. */
static bool session_queue_has_room(struct mtp_session *s, size_t total) {
  size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp);
  return queued == 0 || queued + total <= s->fc->cfg->client_send_budget;
}

static struct wreq *wreq_new(size_t len) {
  struct wreq *w = mtp_malloc(sizeof(*w) + len);
  if (w != NULL)
    w->len = len;
  return w;
}

/* Encrypts w's bytes with the client's tx stream and writes them; takes w. False when the
 * session was closed. */
static bool session_write(struct mtp_session *s, struct wreq *w) {
  mtp_aes_ctr_crypt(&s->obf.tx, w->data, w->data, w->len);
  uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)w->len);
  w->req.data = s;
  size_t len = w->len;
  int r = uv_write(&w->req, (uv_stream_t *)&s->tcp, &b, 1, on_written);
  if (r < 0) {
    mtp_free(w);
    mtp_debugc(&s->log, "write failed: %s", uv_strerror(r));
    session_close(s, NO_METRIC, false, "write failed");
    return false;
  }
  mtp_metric_add(MTP_M_BYTES_TO_CLIENTS, (int64_t)len);
  s->last_active = uv_now(s->fc->loop);
  return true;
}

static void link_on_packet(void *front, const uint8_t *data, size_t len) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  if (len == 0 || (s->proto == MTP_PROTO_ABRIDGED && len % 4 != 0) || len > MTP_MAX_PACKET) {
    mtp_logc(&s->log, MTP_LOG_WARN, "cannot frame a %zu-byte packet for %s", len, mtp_proto_name(s->proto));
    session_close(s, MTP_M_CLOSE_UPSTREAM, false, "unframable packet from the back");
    return;
  }
  uint8_t hdr[4];
  size_t pad = 0;
  size_t hlen = mtp_frame_header(s->proto, len, false, hdr, &pad);
  size_t total = hlen + len + pad;
  if (!session_queue_has_room(s, total)) {
    mtp_logc(&s->log, MTP_LOG_INFO, "client too slow: %zu bytes unsent, budget %zu; closing",
             uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp), s->fc->cfg->client_send_budget);
    session_close(s, MTP_M_CLOSE_BACKPRESSURE, false, "send budget exceeded");
    return;
  }
  struct wreq *w = wreq_new(total);
  if (w == NULL) {
    mtp_logc(&s->log, MTP_LOG_WARN, "out of memory for a %zu-byte write", total);
    session_close(s, NO_METRIC, false, "out of memory");
    return;
  }
  memcpy(w->data, hdr, hlen);
  memcpy(w->data + hlen, data, len);
  for (size_t i = 0; i < pad; i++)
    w->data[hlen + len + i] = (uint8_t)mtp_random_below(256);
  if (session_write(s, w))
    MTP_COUNT(PACKETS_TO_CLIENTS);
}

static void link_on_quickack(void *front, uint32_t token) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  if (!session_queue_has_room(s, 4)) {
    mtp_logc(&s->log, MTP_LOG_INFO, "client too slow for a quick ack; closing");
    session_close(s, MTP_M_CLOSE_BACKPRESSURE, false, "send budget exceeded");
    return;
  }
  struct wreq *w = wreq_new(4);
  if (w == NULL) {
    session_close(s, NO_METRIC, false, "out of memory");
    return;
  }
  mtp_frame_quickack(s->proto, token, w->data);
  if (session_write(s, w))
    MTP_COUNT(QUICKACKS);
}

static void link_on_close(void *front, int reason) {
  struct mtp_session *s = front;
  s->stream = NULL; /* the back is done with it: no link->close */
  switch (reason) {
  case MTP_LINK_CLOSE_NORMAL:
    session_close(s, MTP_M_CLOSE_TELEGRAM, true, "closed by Telegram");
    break;
  case MTP_LINK_CLOSE_SHUTDOWN:
    session_close(s, NO_METRIC, true, "proxy shutting down");
    break;
  default:
    mtp_logc(&s->log, MTP_LOG_INFO, "stream closed by the back (reason %d)", reason);
    session_close(s, MTP_M_CLOSE_UPSTREAM, true, "upstream failed");
    break;
  }
}

static void link_on_writable(void *front) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  s->link_full = false;
  session_update_reading(s);
}

/* ---- client -> back ---- */

static void relay_from_client(struct mtp_session *s, uint8_t *data, size_t n) {
  mtp_aes_ctr_crypt(&s->obf.rx, data, data, n);
  size_t off = 0;
  while (off < n && s->state == S_RELAY) {
    struct mtp_packet pkt;
    bool has = false;
    ssize_t r = mtp_frame_decode(&s->dec, data + off, n - off, &pkt, &has);
    if (r < 0) {
      mtp_logc(&s->log, MTP_LOG_INFO, "bad frame from client: %s", mtp_strerror((int)r));
      session_close(s, MTP_M_CLOSE_BAD_FRAME, false, "bad frame");
      return;
    }
    off += (size_t)r;
    if (!has) {
      if (r == 0)
        break; /* no progress: cannot happen with a conforming decoder */
      continue;
    }
    MTP_COUNT(PACKETS_FROM_CLIENTS);
    int rc = s->fc->link->send(s->fc->link, s->stream, pkt.data, pkt.len, pkt.quickack);
    if (s->state != S_RELAY)
      return; /* an op called from inside send ended the session */
    if (rc < 0) {
      mtp_logc(&s->log, MTP_LOG_INFO, "link refused a packet: %s", mtp_strerror(rc));
      session_close(s, MTP_M_CLOSE_UPSTREAM, false, "link send failed");
      return;
    }
    if (rc == MTP_LINK_FULL)
      s->link_full = true;
  }
  session_update_reading(s);
}

static unsigned proto_allow_bit(enum mtp_proto p) {
  switch (p) {
  case MTP_PROTO_ABRIDGED:
    return MTP_ALLOW_ABRIDGED;
  case MTP_PROTO_INTERMEDIATE:
    return MTP_ALLOW_INTERMEDIATE;
  case MTP_PROTO_PADDED:
    return MTP_ALLOW_SECURE;
  case MTP_PROTO_NONE:
    break;
  }
  return 0;
}

/* Checks the complete header and opens the link stream. True when now in S_RELAY. */
static bool session_handshake(struct mtp_session *s) {
  struct mtp_front_ctx *fc = s->fc;
  struct mtp_obf2_result res;
  int r = mtp_obf2_accept(&s->obf, s->hdr, (const uint8_t(*)[16])s->lc->secrets, s->lc->nsecrets, &res);
  mtp_wipe(s->hdr, sizeof(s->hdr));
  if (r != MTP_OK) {
    MTP_COUNT(HS_FAIL_BAD_SECRET);
    mtp_logc(&s->log, MTP_LOG_INFO, "handshake failed: no secret matches; discarding input until the timeout");
    s->state = S_DISCARD;
    return false;
  }
  if ((s->lc->allowed_protocols & proto_allow_bit(res.proto)) == 0) {
    MTP_COUNT(HS_FAIL_DISABLED);
    mtp_obf2_free(&s->obf);
    mtp_logc(&s->log, MTP_LOG_INFO, "handshake failed: protocol %s not allowed; discarding input until the timeout",
             mtp_proto_name(res.proto));
    s->state = S_DISCARD;
    return false;
  }
  switch (res.proto) {
  case MTP_PROTO_ABRIDGED:
    MTP_COUNT(HS_OK_ABRIDGED);
    break;
  case MTP_PROTO_INTERMEDIATE:
    MTP_COUNT(HS_OK_INTERMEDIATE);
    break;
  default:
    MTP_COUNT(HS_OK_SECURE);
    break;
  }
  s->proto = res.proto;
  mtp_frame_dec_init(&s->dec, res.proto);

  struct mtp_link_open req;
  memset(&req, 0, sizeof(req));
  req.dc = res.dc;
  req.proto = res.proto;
  int alen = (int)sizeof(req.client_addr);
  uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&req.client_addr, &alen);
  alen = (int)sizeof(req.local_addr);
  uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&req.local_addr, &alen);
  req.listener = s->lc->name;
  if (s->lc->has_ad_tag) {
    req.has_ad_tag = true;
    memcpy(req.ad_tag, s->lc->ad_tag, sizeof(req.ad_tag));
  } else if (fc->cfg->has_ad_tag) {
    req.has_ad_tag = true;
    memcpy(req.ad_tag, fc->cfg->ad_tag, sizeof(req.ad_tag));
  }
  int err = MTP_OK;
  void *stream = fc->link->open(fc->link, &req, s, &front_ops, &err);
  if (stream == NULL) {
    mtp_logc(&s->log, MTP_LOG_WARN, "cannot open a stream to dc %d: %s", res.dc, mtp_strerror(err));
    session_close(s, MTP_M_CLOSE_UPSTREAM, false, "link open failed");
    return false;
  }
  s->stream = stream;
  s->state = S_RELAY;
  uv_timer_stop(&s->timer);
  uv_timer_start(&s->timer, on_timer, seconds_to_ms(fc->cfg->idle_timeout), 0);
  mtp_debugc(&s->log, "handshake ok: %s, dc %d, secret #%d", mtp_proto_name(res.proto), res.dc, res.secret_index);
  return true;
}

static void on_client_bytes(struct mtp_session *s, uint8_t *data, size_t n) {
  s->last_active = uv_now(s->fc->loop);
  switch (s->state) {
  case S_WAIT_HEADER: {
    size_t take = MTP_OBF2_HEADER_LEN - s->hdr_have;
    if (take > n)
      take = n;
    memcpy(s->hdr + s->hdr_have, data, take);
    s->hdr_have += take;
    if (s->hdr_have < MTP_OBF2_HEADER_LEN)
      return;
    if (!session_handshake(s) || take == n)
      return;
    relay_from_client(s, data + take, n - take);
    return;
  }
  case S_RELAY:
    relay_from_client(s, data, n);
    return;
  case S_DISCARD:
  case S_FLUSH:
  case S_CLOSING:
    return;
  }
}

static void on_client_end(struct mtp_session *s, ssize_t err) {
  const char *what = err == UV_EOF ? "client closed" : uv_strerror((int)err);
  switch (s->state) {
  case S_WAIT_HEADER:
    MTP_COUNT(HS_FAIL_EOF);
    mtp_debugc(&s->log, "handshake failed: %s after %zu header bytes", what, s->hdr_have);
    session_close(s, NO_METRIC, false, what);
    return;
  case S_DISCARD:
  case S_RELAY:
    session_close(s, NO_METRIC, false, what);
    return;
  case S_FLUSH:
  case S_CLOSING:
    return;
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct mtp_session *s = h->data;
  buf->base = mtp_bufpool_get(&s->fc->pool);
  buf->len = buf->base != NULL ? MTP_BUFPOOL_BUF_SIZE : 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct mtp_session *s = stream->data;
  if (nread > 0) {
    mtp_metric_add(MTP_M_BYTES_FROM_CLIENTS, nread);
    on_client_bytes(s, (uint8_t *)buf->base, (size_t)nread);
  } else if (nread < 0) {
    on_client_end(s, nread);
  }
  /* The session may be closing, but it is only freed in a later close callback. */
  mtp_bufpool_put(&s->fc->pool, buf->base);
}

static void on_timer(uv_timer_t *t) {
  struct mtp_session *s = t->data;
  switch (s->state) {
  case S_WAIT_HEADER:
    MTP_COUNT(HS_FAIL_TIMEOUT);
    mtp_debugc(&s->log, "handshake timeout after %zu header bytes", s->hdr_have);
    session_close(s, NO_METRIC, false, "handshake timeout");
    return;
  case S_DISCARD:
    session_close(s, NO_METRIC, false, "end of discarding");
    return;
  case S_RELAY: {
    uint64_t idle = seconds_to_ms(s->fc->cfg->idle_timeout);
    uint64_t quiet = uv_now(s->fc->loop) - s->last_active;
    if (quiet < idle) {
      uv_timer_start(&s->timer, on_timer, idle - quiet, 0);
      return;
    }
    session_close(s, MTP_M_CLOSE_IDLE, false, "idle timeout");
    return;
  }
  case S_FLUSH:
    session_close(s, NO_METRIC, false, "flush timeout");
    return;
  case S_CLOSING:
    return;
  }
}

int mtp_session_accept(struct mtp_front_ctx *fc, uv_stream_t *server, const struct mtp_listener_conf *lc) {
  struct mtp_session *s = mtp_calloc(1, sizeof(*s));
  if (s == NULL) {
    mtp_log(MTP_LOG_ERROR, "listener %s: out of memory for a new client", lc->name);
    return MTP_ENOMEM;
  }
  int r = uv_tcp_init(fc->loop, &s->tcp);
  if (r < 0) {
    mtp_log(MTP_LOG_ERROR, "listener %s: cannot set up a client: %s", lc->name, uv_strerror(r));
    mtp_free(s);
    return MTP_ENOMEM;
  }
  uv_timer_init(fc->loop, &s->timer);
  s->tcp.data = s;
  s->timer.data = s;
  s->handles = 2;
  s->fc = fc;
  s->lc = lc;
  s->state = S_WAIT_HEADER;
  s->log.id = ((unsigned long long)fc->index << 40) | ++fc->next_id;
  s->log.where = lc->name;
  s->next = fc->sessions;
  if (s->next != NULL)
    s->next->prev = s;
  fc->sessions = s;
  fc->nsessions++;
  mtp_metric_add(MTP_M_CLIENTS_ACTIVE, 1);

  r = uv_accept(server, (uv_stream_t *)&s->tcp);
  if (r < 0) {
    mtp_log(MTP_LOG_WARN, "listener %s: accept failed: %s", lc->name, uv_strerror(r));
    session_close(s, NO_METRIC, false, "accept failed");
    return MTP_OK;
  }
  MTP_COUNT(CLIENTS_ACCEPTED);
  uv_tcp_nodelay(&s->tcp, 1);
  struct sockaddr_storage peer;
  int plen = (int)sizeof(peer);
  memset(&peer, 0, sizeof(peer));
  if (uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&peer, &plen) == 0)
    mtp_format_addr(&peer, s->log.peer, sizeof(s->log.peer));
  else
    snprintf(s->log.peer, sizeof(s->log.peer), "?");
  s->last_active = uv_now(fc->loop);
  uv_timer_start(&s->timer, on_timer, seconds_to_ms(fc->cfg->handshake_timeout), 0);
  mtp_debugc(&s->log, "accepted");
  session_update_reading(s);
  return MTP_OK;
}

void mtp_session_close_all(struct mtp_front_ctx *fc) {
  for (struct mtp_session *s = fc->sessions; s != NULL; s = s->next)
    session_close(s, NO_METRIC, false, "worker stopping");
}
