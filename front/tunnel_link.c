/*
 * tunnel_link.c - the front's remote link: streams multiplexed over cfg->tunnel_conns mutually
 * authenticated TLS connections to the back (see tunnel_link.h, shared/tunnel_conn.h).
 *
 * Slots. Each of the worker's tunnel connections is a slot: it dials, and when its connection
 * closes it dials again after a jittered exponential backoff (MIN_BACKOFF_MS doubling up to
 * MAX_BACKOFF_MS; reset once a connection has stayed up for a second). open() puts a stream on
 * the next slot that is up (round robin); a stream lives and dies with its slot's connection.
 *
 * Stream ids are (generation << 32 | table index + 1): a lookup is an array index, and an id
 * is never reused while frames for an old stream may still be on their way.
 *
 * Credit. Client -> back: a stream may send while its credit allows (see proto/tunnel.proto);
 * a packet that does not fit is kept in the stream's queue and send() says MTP_LINK_FULL, as it
 * does while the TLS queue is congested; on_writable follows once the back's Credit (or the
 * TLS queue) lets everything out. Back -> client: the bytes of each packet are given back to
 * the back once on_packet has returned (the session has queued it to its client, bounded by
 * client_send_budget); credits are batched per stream and sent just before the loop polls.
 *
 * Re-entrancy (link.h): ops are delivered with the stream marked busy; a close() from inside
 * an op marks the stream gone and the delivering code frees it when the op returns.
 */
#include "tunnel_link.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "tunnel_conn.h"

#include "banned.h"

#define MIN_BACKOFF_MS 100u
#define MAX_BACKOFF_MS 5000u
/* A connection that stayed up this long resets the backoff. */
#define STABLE_MS 1000u

struct tslot;

struct fstream {
  struct mtp_tunnel_stream st;          /* id, the back's credit, packets waiting for it: on
                                         * slot->conn while in the slot */
  struct tslot *slot;                   /* borrows; NULL once the stream left its slot */
  void *front;                          /* borrows */
  const struct mtp_link_front_ops *ops; /* borrows */
  bool want_writable;                   /* send() said FULL; on_writable is owed */
  bool gone;                            /* closed by the front, or on_close delivered */
  int busy;                             /* ops being delivered */
};

static struct fstream *fstream_of(struct mtp_tunnel_stream *st) {
  return (struct fstream *)((char *)st - offsetof(struct fstream, st));
}

struct tslot {
  struct mtp_tunnel_link *t;       /* borrows */
  int index;
  struct mtp_tunnel_conn *conn;    /* borrows (the conn frees itself; it lists the slot's
                                    * streams): dialing or up; NULL between */
  bool up;
  uint64_t up_since;
  uv_timer_t retry;
  uv_getaddrinfo_t gai;
  bool resolving;
  uint64_t backoff_ms;
  unsigned attempts;               /* failed attempts since the last up connection */
};

struct mtp_tunnel_link {
  struct mtp_link link;
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;
  int index;
  struct mtp_tls_conf *tls;     /* owns */
  struct tslot *slots;          /* owns */
  int nslots;
  int rr;
  char host[256];
  char port[8];
  bool host_is_ip;
  struct sockaddr_storage addr; /* when host_is_ip */
  struct fstream **tab;         /* owns the array: stream by index */
  uint32_t *freelist;           /* owns */
  uint32_t tab_cap, tab_used, nfree;
  uint32_t gen;
  struct mtp_tunnel_params p;   /* window, heartbeat, timeout, node */
  unsigned long long next_log_id;
  bool stopping;
};

/* ---- stream table and lists ---- */

static struct fstream *stream_get(struct mtp_tunnel_link *t, uint64_t id) {
  uint32_t low = (uint32_t)id;
  if (low == 0 || low > t->tab_used)
    return NULL;
  struct fstream *s = t->tab[low - 1];
  return s != NULL && s->st.id == id ? s : NULL;
}

static int stream_put(struct mtp_tunnel_link *t, struct fstream *s) {
  uint32_t idx;
  if (t->nfree > 0) {
    idx = t->freelist[--t->nfree];
  } else {
    if (t->tab_used == t->tab_cap) {
      uint32_t cap = t->tab_cap ? t->tab_cap * 2 : 64;
      if (cap > (1u << 30))
        return MTP_ENOMEM;
      struct fstream **tab = mtp_realloc(t->tab, cap * sizeof(*tab));
      if (tab == NULL)
        return MTP_ENOMEM;
      t->tab = tab;
      uint32_t *fl = mtp_realloc(t->freelist, cap * sizeof(*fl));
      if (fl == NULL)
        return MTP_ENOMEM;
      t->freelist = fl;
      t->tab_cap = cap;
    }
    idx = t->tab_used++;
  }
  t->gen++;
  s->st.id = ((uint64_t)t->gen << 32) | (uint64_t)(idx + 1);
  t->tab[idx] = s;
  return MTP_OK;
}

/* Takes s out of its slot (and its connection; the table entry stays). */
static void slot_del(struct fstream *s) {
  mtp_tunnel_stream_detach(&s->st);
  s->slot = NULL;
}

static void stream_free(struct mtp_tunnel_link *t, struct fstream *s) {
  slot_del(s);
  uint32_t low = (uint32_t)s->st.id;
  if (low != 0 && low <= t->tab_used && t->tab[low - 1] == s) {
    t->tab[low - 1] = NULL;
    t->freelist[t->nfree++] = low - 1;
  }
  mtp_tunnel_stream_free(&s->st);
  mtp_free(s);
}

/* After an op: frees s if the front closed it meanwhile. True if s is gone for good. */
static bool op_done(struct mtp_tunnel_link *t, struct fstream *s) {
  s->busy--;
  if (s->gone && s->busy == 0) {
    stream_free(t, s);
    return true;
  }
  return s->gone;
}

/* Delivers on_close(reason) and frees s. */
static void stream_kill(struct mtp_tunnel_link *t, struct fstream *s, int reason) {
  if (s->gone) {
    slot_del(s); /* never listed once gone; keeps the callers' list walks finite */
    return;
  }
  slot_del(s);
  s->gone = true;
  s->busy++;
  s->ops->on_close(s->front, reason);
  op_done(t, s);
}

/* ---- sending ---- */

/* After s's queue was drained (rc: how that went): on_writable if it was owed and s may take
 * more. s may be freed when this returns. */
static void stream_wake(struct mtp_tunnel_link *t, struct fstream *s, int rc) {
  if (rc != MTP_OK || s->gone)
    return; /* the connection is closing; its on_close ends the stream */
  if (s->want_writable && mtp_tunnel_stream_may_send(&s->st)) {
    s->want_writable = false;
    s->busy++;
    s->ops->on_writable(s->front);
    op_done(t, s);
  }
}

/* ---- the link ---- */

static void addr_to_bytes(const struct sockaddr_storage *a, uint8_t ip[16], size_t *iplen, uint32_t *port) {
  *iplen = 0;
  *port = 0;
  if (a->ss_family == AF_INET) {
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
    memcpy(ip, &v4->sin_addr, 4);
    *iplen = 4;
    *port = ntohs(v4->sin_port);
  } else if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
    memcpy(ip, &v6->sin6_addr, 16);
    *iplen = 16;
    *port = ntohs(v6->sin6_port);
  }
}

static void *link_open(struct mtp_link *link, const struct mtp_link_open *req, void *front,
                       const struct mtp_link_front_ops *ops, int *err) {
  struct mtp_tunnel_link *t = link->impl;
  *err = MTP_OK;
  if (t->stopping) {
    *err = MTP_ECLOSED;
    return NULL;
  }
  struct tslot *sl = NULL;
  for (int i = 0; i < t->nslots; i++) {
    struct tslot *c = &t->slots[(t->rr + i) % t->nslots];
    if (c->up && c->conn != NULL && mtp_tunnel_conn_is_up(c->conn)) {
      sl = c;
      t->rr = (t->rr + i + 1) % t->nslots;
      break;
    }
  }
  if (sl == NULL) {
    *err = MTP_ELINKDOWN;
    return NULL;
  }
  struct fstream *s = mtp_calloc(1, sizeof(*s));
  if (s == NULL) {
    *err = MTP_ENOMEM;
    return NULL;
  }
  if (stream_put(t, s) != MTP_OK) {
    mtp_free(s);
    *err = MTP_ENOMEM;
    return NULL;
  }
  s->front = front;
  s->ops = ops;
  s->slot = sl;
  mtp_tunnel_stream_attach(&s->st, sl->conn);

  uint8_t cip[16], lip[16];
  size_t cl, ll;
  uint32_t cport, lport;
  addr_to_bytes(&req->client_addr, cip, &cl, &cport);
  addr_to_bytes(&req->local_addr, lip, &ll, &lport);
  Mtp__Open o = MTP__OPEN__INIT;
  o.stream = s->st.id;
  o.dc = req->dc;
  o.proto = (uint32_t)req->proto;
  o.flags = 0;
  o.client_ip.data = cip;
  o.client_ip.len = cl;
  o.client_port = cport;
  o.local_ip.data = lip;
  o.local_ip.len = ll;
  o.local_port = lport;
  o.listener = (char *)(req->listener != NULL ? req->listener : "");
  if (req->has_ad_tag) {
    o.ad_tag.data = (uint8_t *)req->ad_tag;
    o.ad_tag.len = 16;
  }
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_OPEN;
  f.open = &o;
  int rc = mtp_tunnel_conn_send(sl->conn, &f);
  if (rc != MTP_OK) {
    stream_free(t, s);
    *err = rc == MTP_ECLOSED ? MTP_ELINKDOWN : rc;
    return NULL;
  }
  MTP_COUNT(TUNNEL_STREAMS_OPENED);
  return s;
}

static int link_send(struct mtp_link *link, void *stream, const uint8_t *data, size_t len, bool quickack) {
  struct mtp_tunnel_link *t = link->impl;
  struct fstream *s = stream;
  (void)t;
  if (s == NULL || s->gone || s->slot == NULL || s->slot->conn == NULL)
    return MTP_ECLOSED;
  if (len == 0)
    return MTP_EPROTO;
  if (len > MTP_TUNNEL_MAX_FRAME - MTP_TUNNEL_DATA_HDR_MAX)
    return MTP_ETOOBIG;
  /* Over credit it is kept. The session stops reading after MTP_LINK_FULL, so at most what it
   * had already read waits here; more than that is a broken caller (MTP_EBACKPRESSURE). */
  int rc = mtp_tunnel_stream_write(&s->st, data, len, quickack, (size_t)s->st.window + MTP_TUNNEL_MAX_FRAME);
  if (rc != MTP_OK)
    return rc == MTP_ECLOSED ? MTP_ELINKDOWN : rc;
  if (!mtp_tunnel_stream_may_send(&s->st)) {
    s->want_writable = true;
    return MTP_LINK_FULL;
  }
  return MTP_OK;
}

static void link_close(struct mtp_link *link, void *stream) {
  struct mtp_tunnel_link *t = link->impl;
  struct fstream *s = stream;
  if (s == NULL || s->gone)
    return;
  s->gone = true;
  if (s->slot != NULL && s->slot->conn != NULL)
    mtp_tunnel_conn_send_close(s->slot->conn, s->st.id, MTP_LINK_CLOSE_NORMAL);
  slot_del(s);
  if (s->busy == 0)
    stream_free(t, s);
}

/* ---- frames from the back ---- */

static void on_conn_frame(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  struct tslot *sl = mtp_tunnel_conn_data(c);
  struct mtp_tunnel_link *t = sl->t;
  uint64_t id = 0;
  switch (f->msg_case) {
  case MTP__FRAME__MSG_DATA: id = f->data->stream; break;
  case MTP__FRAME__MSG_QUICKACK: id = f->quickack->stream; break;
  case MTP__FRAME__MSG_CLOSE: id = f->close->stream; break;
  case MTP__FRAME__MSG_CREDIT: id = f->credit->stream; break;
  default:
    mtp_tunnel_conn_close(c, MTP_EPROTO, MTP_TUNNEL_CLOSE_PROTOCOL, "protocol error: the back sent an open frame");
    return;
  }
  struct fstream *s = stream_get(t, id);
  if (s == NULL || s->slot != sl || s->gone) {
    mtp_debugc(mtp_tunnel_conn_log(c), "%s frame for closed stream %llx dropped", mtp_tunnel_frame_name(f),
               (unsigned long long)id);
    return;
  }
  switch (f->msg_case) {
  case MTP__FRAME__MSG_DATA: {
    size_t len = f->data->packet.len;
    s->busy++;
    s->ops->on_packet(s->front, f->data->packet.data, len);
    if (op_done(t, s))
      return;
    mtp_tunnel_stream_grant(&s->st, len);
    break;
  }
  case MTP__FRAME__MSG_QUICKACK:
    s->busy++;
    s->ops->on_quickack(s->front, f->quickack->token);
    op_done(t, s);
    break;
  case MTP__FRAME__MSG_CLOSE:
    stream_kill(t, s, (int)f->close->reason);
    break;
  case MTP__FRAME__MSG_CREDIT:
    stream_wake(t, s, mtp_tunnel_stream_credit(&s->st, f->credit->bytes));
    break;
  default:
    break;
  }
}

static void on_conn_writable(struct mtp_tunnel_conn *c) {
  struct tslot *sl = mtp_tunnel_conn_data(c);
  struct mtp_tunnel_link *t = sl->t;
  size_t n = 0;
  for (struct mtp_tunnel_stream *st = mtp_tunnel_conn_streams(c); st != NULL; st = mtp_tunnel_stream_next(st))
    n += fstream_of(st)->want_writable;
  if (n == 0)
    return;
  uint64_t small[64];
  uint64_t *ids = n <= 64 ? small : mtp_malloc(n * sizeof(*ids));
  if (ids == NULL)
    return; /* the next Credit frame for each will do it */
  size_t k = 0;
  for (struct mtp_tunnel_stream *st = mtp_tunnel_conn_streams(c); st != NULL && k < n; st = mtp_tunnel_stream_next(st))
    if (fstream_of(st)->want_writable)
      ids[k++] = st->id;
  /* The fronts may close streams (theirs, or others) during the callbacks: look each up again. */
  for (size_t i = 0; i < k && sl->conn == c && !mtp_tunnel_conn_is_congested(c); i++) {
    struct fstream *s = stream_get(t, ids[i]);
    if (s != NULL && s->slot == sl && !s->gone)
      stream_wake(t, s, mtp_tunnel_stream_drain(&s->st));
  }
  if (ids != small)
    mtp_free(ids);
}

/* ---- slots: dialing and reconnecting ---- */

static void slot_dial(struct tslot *sl);

static void on_retry(uv_timer_t *tm) {
  struct tslot *sl = tm->data;
  if (!sl->t->stopping)
    slot_dial(sl);
}

static void slot_retry_later(struct tslot *sl) {
  if (sl->t->stopping)
    return;
  uint64_t b = sl->backoff_ms ? sl->backoff_ms * 2 : MIN_BACKOFF_MS;
  if (b > MAX_BACKOFF_MS)
    b = MAX_BACKOFF_MS;
  sl->backoff_ms = b;
  uint64_t delay = b / 2 + mtp_random_below((uint32_t)(b / 2 + 1)); /* in [b/2, b] */
  uv_timer_start(&sl->retry, on_retry, delay, 0);
}

static void on_conn_up(struct mtp_tunnel_conn *c) {
  struct tslot *sl = mtp_tunnel_conn_data(c);
  sl->up = true;
  sl->up_since = uv_now(sl->t->loop);
  if (sl->attempts > 0)
    mtp_logc(mtp_tunnel_conn_log(c), MTP_LOG_INFO, "tunnel %d to the back is up again after %u failed attempts",
             sl->index, sl->attempts);
  sl->attempts = 0;
}

static void on_conn_close(struct mtp_tunnel_conn *c, int err, const char *why) {
  struct tslot *sl = mtp_tunnel_conn_data(c);
  struct mtp_tunnel_link *t = sl->t;
  bool was_up = sl->up;
  sl->up = false;
  if (sl->conn == c)
    sl->conn = NULL;
  size_t n = mtp_tunnel_conn_nstreams(c);
  int reason = t->stopping ? MTP_LINK_CLOSE_SHUTDOWN : MTP_LINK_CLOSE_LINK_DOWN;
  struct mtp_tunnel_stream *st;
  while ((st = mtp_tunnel_conn_streams(c)) != NULL)
    stream_kill(t, fstream_of(st), reason);
  const struct mtp_log_ctx *log = mtp_tunnel_conn_log(c);
  if (t->stopping) {
    mtp_debugc(log, "tunnel %d closed: %s", sl->index, why);
    return;
  }
  if (was_up) {
    mtp_logc(log, MTP_LOG_WARN, "tunnel %d to the back lost: %s; %zu clients closed", sl->index, why, n);
    if (uv_now(t->loop) - sl->up_since >= STABLE_MS)
      sl->backoff_ms = 0;
  } else {
    sl->attempts++;
    /* The first failure in a row, then every 10th, at warn level; the rest at debug. */
    if (sl->attempts == 1 || sl->attempts % 10 == 0)
      mtp_logc(log, MTP_LOG_WARN, "tunnel %d to the back %s:%s failed (attempt %u): %s", sl->index, t->host, t->port,
               sl->attempts, why);
    else
      mtp_debugc(log, "tunnel %d attempt %u failed: %s", sl->index, sl->attempts, why);
  }
  (void)err;
  slot_retry_later(sl);
}

static const struct mtp_tunnel_conn_ops CONN_OPS = {
    .on_up = on_conn_up,
    .on_frame = on_conn_frame,
    .on_writable = on_conn_writable,
    .on_close = on_conn_close,
};

static void slot_connect(struct tslot *sl, const struct sockaddr *addr) {
  struct mtp_tunnel_link *t = sl->t;
  struct mtp_tunnel_conn_opts o = {
      .ops = &CONN_OPS,
      .data = sl,
      .node = t->p.node,
      .window = t->p.window,
      .heartbeat_ms = t->p.heartbeat_ms,
      .timeout_ms = t->p.timeout_ms,
      .log_id = t->next_log_id++,
      .where = "tunnel",
  };
  if (mtp_tunnel_conn_dial(&sl->conn, t->tls, t->loop, addr, &o) != MTP_OK) {
    sl->conn = NULL;
    sl->attempts++;
    slot_retry_later(sl);
  }
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  struct tslot *sl = req->data;
  struct mtp_tunnel_link *t = sl->t;
  sl->resolving = false;
  if (t->stopping || status == UV_ECANCELED) {
    uv_freeaddrinfo(res);
    return;
  }
  size_t n = 0;
  for (struct addrinfo *a = res; a != NULL; a = a->ai_next)
    n += a->ai_family == AF_INET || a->ai_family == AF_INET6;
  if (status < 0 || n == 0) {
    sl->attempts++;
    if (sl->attempts == 1 || sl->attempts % 10 == 0)
      mtp_log(MTP_LOG_WARN, "tunnel %d: cannot resolve the back %s: %s", sl->index, t->host,
              status < 0 ? uv_strerror(status) : "no address");
    uv_freeaddrinfo(res);
    slot_retry_later(sl);
    return;
  }
  size_t pick = sl->attempts % n, k = 0;
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  for (struct addrinfo *a = res; a != NULL; a = a->ai_next) {
    if (a->ai_family != AF_INET && a->ai_family != AF_INET6)
      continue;
    if (k++ == pick) {
      memcpy(&ss, a->ai_addr, a->ai_addrlen < sizeof(ss) ? a->ai_addrlen : sizeof(ss));
      break;
    }
  }
  uv_freeaddrinfo(res);
  slot_connect(sl, (const struct sockaddr *)&ss);
}

static void slot_dial(struct tslot *sl) {
  struct mtp_tunnel_link *t = sl->t;
  if (t->stopping || sl->conn != NULL || sl->resolving)
    return;
  if (t->host_is_ip) {
    slot_connect(sl, (const struct sockaddr *)&t->addr);
    return;
  }
  struct addrinfo hints;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  sl->gai.data = sl;
  int rc = uv_getaddrinfo(t->loop, &sl->gai, on_resolved, t->host, t->port, &hints);
  if (rc < 0) {
    sl->attempts++;
    slot_retry_later(sl);
    return;
  }
  sl->resolving = true;
}

/* ---- setup and teardown ---- */

/* "HOST:PORT" or "[IPv6]:PORT" into t->host, t->port (and t->addr if HOST is an address). */
static int parse_back(struct mtp_tunnel_link *t, const char *s, char *err, size_t errlen) {
  const char *host = s, *colon;
  size_t hlen;
  if (s[0] == '[') {
    const char *end = strchr(s, ']');
    if (end == NULL || end[1] != ':')
      goto bad;
    host = s + 1;
    hlen = (size_t)(end - host);
    colon = end + 1;
  } else {
    colon = strrchr(s, ':');
    if (colon == NULL)
      goto bad;
    hlen = (size_t)(colon - s);
    if (memchr(s, ':', hlen) != NULL)
      goto bad; /* a bare IPv6 address needs brackets */
  }
  if (hlen == 0 || hlen >= sizeof(t->host))
    goto bad;
  char *endp = NULL;
  long port = strtol(colon + 1, &endp, 10);
  if (colon[1] == '\0' || *endp != '\0' || port < 1 || port > 65535)
    goto bad;
  memcpy(t->host, host, hlen);
  t->host[hlen] = '\0';
  snprintf(t->port, sizeof(t->port), "%ld", port);
  memset(&t->addr, 0, sizeof(t->addr));
  struct sockaddr_in *v4 = (struct sockaddr_in *)&t->addr;
  struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t->addr;
  if (inet_pton(AF_INET, t->host, &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons((uint16_t)port);
    t->host_is_ip = true;
  } else if (inet_pton(AF_INET6, t->host, &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons((uint16_t)port);
    t->host_is_ip = true;
  }
  return MTP_OK;
bad:
  snprintf(err, errlen, "back: '%s' is not HOST:PORT", s);
  return MTP_EINVAL;
}

int mtp_tunnel_link_setup(struct mtp_tunnel_link **out, const struct mtp_config *cfg, uv_loop_t *loop, int index,
                          char *err, size_t errlen) {
  *out = NULL;
  if (errlen > 0)
    err[0] = '\0';
  if (cfg->back == NULL || cfg->back[0] == '\0') {
    snprintf(err, errlen, "back: not set (the back's HOST:PORT is required)");
    return MTP_EINVAL;
  }
  struct mtp_tunnel_link *t = mtp_calloc(1, sizeof(*t));
  if (t == NULL) {
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  t->cfg = cfg;
  t->loop = loop;
  t->index = index;
  t->next_log_id = (unsigned long long)index * 100000ull + 90000ull;
  int rc = parse_back(t, cfg->back, err, errlen);
  if (rc != MTP_OK) {
    mtp_free(t);
    return rc;
  }
  mtp_tunnel_params_init(&t->p, cfg, "front");
  /* The back's certificate must name it "back": MTP_CERTS_BACK_NAME (back/certs.h). */
  rc = mtp_tunnel_tls_setup(&t->tls, cfg, MTP_TLS_CLIENT, "back", t->p.timeout_ms, err, errlen);
  if (rc != MTP_OK) {
    mtp_free(t);
    return rc;
  }
  t->nslots = cfg->tunnel_conns > 0 ? cfg->tunnel_conns : 1;
  t->slots = mtp_calloc((size_t)t->nslots, sizeof(*t->slots));
  if (t->slots == NULL) {
    mtp_tls_conf_free(t->tls);
    mtp_free(t);
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  t->link.open = link_open;
  t->link.send = link_send;
  t->link.close = link_close;
  t->link.impl = t;
  for (int i = 0; i < t->nslots; i++) {
    struct tslot *sl = &t->slots[i];
    sl->t = t;
    sl->index = i;
    uv_timer_init(loop, &sl->retry);
    sl->retry.data = sl;
    uv_timer_start(&sl->retry, on_retry, 0, 0); /* dial from the loop, not from setup */
  }
  *out = t;
  return MTP_OK;
}

struct mtp_link *mtp_tunnel_link_get(struct mtp_tunnel_link *t) { return &t->link; }

int mtp_tunnel_link_up(const struct mtp_tunnel_link *t) {
  int n = 0;
  for (int i = 0; i < t->nslots; i++)
    n += t->slots[i].up;
  return n;
}

void mtp_tunnel_link_stop(struct mtp_tunnel_link *t) {
  if (t == NULL || t->stopping)
    return;
  t->stopping = true;
  for (int i = 0; i < t->nslots; i++) {
    struct tslot *sl = &t->slots[i];
    uv_timer_stop(&sl->retry);
    uv_close((uv_handle_t *)&sl->retry, NULL);
    if (sl->resolving)
      uv_cancel((uv_req_t *)&sl->gai);
    struct mtp_tunnel_stream *st;
    while (sl->conn != NULL && (st = mtp_tunnel_conn_streams(sl->conn)) != NULL)
      stream_kill(t, fstream_of(st), MTP_LINK_CLOSE_SHUTDOWN);
    sl->up = false;
    if (sl->conn != NULL)
      mtp_tunnel_conn_close(sl->conn, MTP_OK, MTP_LINK_CLOSE_SHUTDOWN, "the front is stopping");
  }
}

void mtp_tunnel_link_free(struct mtp_tunnel_link *t) {
  if (t == NULL)
    return;
  for (uint32_t i = 0; i < t->tab_used; i++) {
    if (t->tab[i] != NULL) {
      t->tab[i]->busy = 0;
      stream_free(t, t->tab[i]);
    }
  }
  mtp_free(t->tab);
  mtp_free(t->freelist);
  mtp_free(t->slots);
  mtp_tls_conf_free(t->tls);
  mtp_free(t);
}
