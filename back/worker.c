/*
 * worker.c - the back's per-worker part: DC pools of RPC connections, the streams they carry,
 * and the in-process link (struct mtp_link) the front of the same loop uses.
 *
 * A stream always sits on one connection of its DC's pool (ready or still connecting). When
 * a connection closes, its idle streams (no packet in flight) move to another connection of
 * the pool; the others get on_close(UPSTREAM). A connection that fails before READY hands its
 * streams to a new attempt at another address, up to MTP_BACK_MAX_TRIES in a row, then they
 * get on_close(NO_DC).
 *
 * Re-entrancy (link.h): open() never calls ops; close() may come from inside any op and frees
 * the stream at once, so every caller of an op never touches the stream after the op
 * returns, and lists are walked by detaching them first and popping the head each turn.
 * A stream whose on_close is being delivered is marked dead, and close() ignores it.
 */
#include <arpa/inet.h>
#include <string.h>

#include "alloc.h"
#include "back_int.h"
#include "crypto.h"
#include "err.h"
#include "log.h"
#include "metrics.h"

#include "banned.h"

/* ---- stream lists (intrusive, removal without knowing the head) ---- */

static void slist_push(struct mtp_back_stream **head, struct mtp_back_stream *s) {
  s->next = *head;
  if (*head != NULL)
    (*head)->pprev = &s->next;
  s->pprev = head;
  *head = s;
}

static void slist_unlink(struct mtp_back_stream *s) {
  if (s->pprev == NULL)
    return;
  *s->pprev = s->next;
  if (s->next != NULL)
    s->next->pprev = s->pprev;
  s->next = NULL;
  s->pprev = NULL;
}

/* Moves every stream of c into *local (detached from c). */
static void detach_all(struct mtp_back_conn *c, struct mtp_back_stream **local) {
  *local = c->streams;
  if (*local != NULL)
    (*local)->pprev = local;
  c->streams = NULL;
  for (struct mtp_back_stream *s = *local; s != NULL; s = s->next)
    s->conn = NULL;
  c->nstreams = 0;
  c->pending_bytes = 0;
}

static void stream_detach(struct mtp_back_stream *s) {
  struct mtp_back_conn *c = s->conn;
  slist_unlink(s);
  if (c != NULL) {
    c->nstreams--;
    if (c->state != MTP_BACK_CONN_READY)
      c->pending_bytes -= s->pend_bytes;
  }
  s->conn = NULL;
}

static void stream_free_pending(struct mtp_back_stream *s) {
  struct mtp_back_pending *p = s->pend_head;
  while (p != NULL) {
    struct mtp_back_pending *n = p->next;
    mtp_free(p);
    p = n;
  }
  s->pend_head = NULL;
  s->pend_tail = &s->pend_head;
  s->pend_bytes = 0;
}

/* Forgets s (map, lists, metrics) and frees it. */
static void stream_destroy(struct mtp_back_stream *s) {
  stream_detach(s);
  if (mtp_connmap_get(&s->w->map, s->conn_id) == s)
    mtp_connmap_del(&s->w->map, s->conn_id);
  stream_free_pending(s);
  mtp_metric_add(MTP_M_RPC_STREAMS, -1);
  mtp_back_dc_add(&s->w->stats->clients[s->pool->slot], -1);
  mtp_free(s);
}

/* Delivers on_close(reason) and frees s. s must be detached or attached; not dead. */
static void stream_kill(struct mtp_back_stream *s, int reason) {
  s->dead = true;
  stream_detach(s);
  mtp_connmap_del(&s->w->map, s->conn_id);
  s->ops->on_close(s->front, reason);
  stream_destroy(s);
}

/* ---- pools ---- */

static struct mtp_back_pool *get_pool(struct mtp_back_worker *w, int dc) {
  for (struct mtp_back_pool *p = w->pools; p != NULL; p = p->next)
    if (p->dc == dc)
      return p;
  struct mtp_back_pool *p = mtp_calloc(1, sizeof(*p));
  if (p == NULL)
    return NULL;
  p->dc = dc;
  p->slot = mtp_back_dc_slot(dc);
  p->w = w;
  p->last_failed = -1;
  p->next = w->pools;
  w->pools = p;
  atomic_store_explicit(&w->stats->used[p->slot], 1, memory_order_relaxed);
  return p;
}

/* Opens a new connection for pool at a random address (avoiding the last failed one). */
static struct mtp_back_conn *open_conn(struct mtp_back_pool *pool, int *err) {
  struct mtp_tg_snapshot *snap = mtp_back_snapshot(pool->w->back);
  if (snap == NULL) {
    *err = MTP_ENOCONFIG;
    return NULL;
  }
  const struct mtp_tg_addr *addrs[64];
  bool used_default = false;
  size_t n = mtp_tgconfig_lookup(&snap->cfg, pool->dc, addrs, 64, &used_default);
  if (n == 0) {
    mtp_tg_snapshot_release(snap);
    *err = MTP_ENODC;
    return NULL;
  }
  int idx = (int)mtp_random_below((uint32_t)n);
  if (n > 1 && idx == pool->last_failed)
    idx = (idx + 1 + (int)mtp_random_below((uint32_t)n - 1)) % (int)n;
  struct sockaddr_storage addr = addrs[idx]->addr;
  struct mtp_back_conn *c = mtp_back_conn_open(pool, snap, idx, &addr); /* snap transferred */
  if (c == NULL)
    *err = MTP_ENOMEM;
  return c;
}

/* The connection that should take one more stream: the least loaded ready one with room,
 * else a connecting one with room, else a new one (pool growth when live ones were all full). */
static struct mtp_back_conn *pick_conn(struct mtp_back_pool *pool, int *err) {
  size_t max = pool->w->cfg->dc_conn_max_clients ? pool->w->cfg->dc_conn_max_clients : 300;
  struct mtp_back_conn *best = NULL, *connecting = NULL;
  bool has_live = false;
  for (struct mtp_back_conn *c = pool->conns; c != NULL; c = c->next) {
    if (c->state == MTP_BACK_CONN_CLOSING)
      continue;
    has_live = true;
    if (c->nstreams >= max)
      continue;
    if (c->state == MTP_BACK_CONN_READY) {
      if (best == NULL || c->nstreams < best->nstreams)
        best = c;
    } else if (connecting == NULL) {
      connecting = c;
    }
  }
  if (best != NULL)
    return best;
  if (connecting != NULL)
    return connecting;
  struct mtp_back_conn *c = open_conn(pool, err);
  if (c != NULL && has_live)
    mtp_back_dc_add(&pool->w->stats->growth[pool->slot], 1);
  return c;
}

/* Sends s's pending packets while c is READY; what is left (c failed) stays pending. */
static void flush_stream(struct mtp_back_conn *c, struct mtp_back_stream *s) {
  while (s->pend_head != NULL && c->state == MTP_BACK_CONN_READY) {
    struct mtp_back_pending *p = s->pend_head;
    if (mtp_back_conn_send_packet(c, s, p->flags, p->data, p->len) != MTP_OK)
      break; /* c is failing now: keep the packet for the next connection */
    s->pend_head = p->next;
    if (s->pend_head == NULL)
      s->pend_tail = &s->pend_head;
    s->pend_bytes -= p->len;
    s->inflight++;
    mtp_free(p);
  }
}

/* Puts s on a connection of pool. Never calls ops. */
static int attach(struct mtp_back_pool *pool, struct mtp_back_stream *s) {
  int err = MTP_ENODC;
  struct mtp_back_conn *c = pick_conn(pool, &err);
  if (c == NULL)
    return err;
  slist_push(&c->streams, s);
  s->conn = c;
  c->nstreams++;
  if (c->state == MTP_BACK_CONN_READY)
    flush_stream(c, s);
  if (c->state != MTP_BACK_CONN_READY)
    c->pending_bytes += s->pend_bytes;
  if (s->want_writable)
    c->has_blocked = true;
  return MTP_OK;
}

void mtp_back_pool_conn_ready(struct mtp_back_conn *c) {
  c->pool->fail_streak = 0;
  c->pool->last_failed = -1;
  for (struct mtp_back_stream *s = c->streams; s != NULL && c->state == MTP_BACK_CONN_READY; s = s->next) {
    c->pending_bytes -= s->pend_bytes;
    flush_stream(c, s);
    if (c->state != MTP_BACK_CONN_READY)
      c->pending_bytes += s->pend_bytes;
  }
  if (c->state == MTP_BACK_CONN_READY)
    c->pending_bytes = 0;
  if (c->state == MTP_BACK_CONN_READY && c->has_blocked && mtp_back_conn_queued(c) < MTP_BACK_LOW_WATER)
    mtp_back_conn_notify_writable(c);
}

void mtp_back_pool_conn_gone(struct mtp_back_conn *c) {
  struct mtp_back_pool *pool = c->pool;
  struct mtp_back_worker *w = c->w;
  /* unlink from the pool */
  *c->pprev = c->next;
  if (c->next != NULL)
    c->next->pprev = c->pprev;
  c->next = NULL;
  c->pprev = NULL;

  /* Telegram rotates its connections by closing them (or the middle proxy restarted). */
  if (c->was_ready && (c->fail_err == MTP_ECLOSED || c->fail_err == UV_ECONNRESET))
    mtp_back_dc_add(&w->stats->rotations[pool->slot], 1);

  struct mtp_back_stream *local = NULL;
  detach_all(c, &local);
  bool give_up = false;
  if (!c->was_ready && c->fail_err != 0) {
    pool->fail_streak++;
    pool->last_failed = c->addr_index;
    give_up = pool->fail_streak >= MTP_BACK_MAX_TRIES;
  }
  size_t moved = 0, closed = 0;
  struct mtp_back_stream *s;
  while ((s = local) != NULL) {
    slist_unlink(s);
    if (w->stopping) {
      stream_kill(s, MTP_LINK_CLOSE_SHUTDOWN);
    } else if (give_up) {
      stream_kill(s, MTP_LINK_CLOSE_NO_DC);
      closed++;
    } else if (c->was_ready && s->inflight > 0) {
      stream_kill(s, MTP_LINK_CLOSE_UPSTREAM);
      closed++;
    } else {
      if (c->was_ready) {
        MTP_COUNT(RPC_MIGRATIONS);
        s->inflight = 0;
      }
      if (attach(pool, s) < 0) {
        stream_kill(s, MTP_LINK_CLOSE_NO_DC);
        closed++;
      } else {
        moved++;
      }
    }
  }
  if (give_up) {
    mtp_logc(&c->log, MTP_LOG_WARN, "no middle proxy reachable for DC %d after %d attempts; %zu clients closed",
             pool->dc, pool->fail_streak, closed);
    pool->fail_streak = 0;
  } else if (moved + closed > 0 && c->was_ready) {
    mtp_logc(&c->log, MTP_LOG_INFO, "%zu idle clients moved to another middle proxy connection, %zu closed", moved,
             closed);
  } else if (moved > 0) {
    mtp_logc(&c->log, MTP_LOG_INFO, "%zu waiting clients retry with another middle proxy connection", moved);
  }
}

/* ---- messages from Telegram ---- */

void mtp_back_worker_dispatch(struct mtp_back_conn *c, const struct mtp_rpc_msg *m) {
  struct mtp_back_stream *s = mtp_connmap_get(&c->w->map, m->conn_id);
  if (s == NULL || s->conn != c || s->dead) {
    mtp_debugc(&c->log, "RPC message 0x%08x for unknown client %016llx ignored", m->type,
               (unsigned long long)m->conn_id);
    return;
  }
  switch (m->type) {
  case MTP_RPC_PROXY_ANS:
    s->inflight = 0;
    s->ops->on_packet(s->front, m->data, m->data_len); /* s may be gone now */
    break;
  case MTP_RPC_SIMPLE_ACK:
    /* A quick ack says the packet reached Telegram, not that its answer has come back: the
     * client stays "in flight" (and is closed, not migrated, if this connection drops). */
    s->ops->on_quickack(s->front, m->token);
    break;
  case MTP_RPC_CLOSE_EXT:
    stream_kill(s, MTP_LINK_CLOSE_NORMAL);
    break;
  default:
    break;
  }
}

void mtp_back_conn_notify_writable(struct mtp_back_conn *c) {
  c->has_blocked = false;
  size_t n = 0;
  for (struct mtp_back_stream *s = c->streams; s != NULL; s = s->next)
    n += s->want_writable;
  if (n == 0)
    return;
  uint64_t small[64];
  uint64_t *ids = n <= 64 ? small : mtp_malloc(n * sizeof(*ids));
  if (ids == NULL) {
    c->has_blocked = true; /* try again on the next write completion */
    return;
  }
  size_t k = 0;
  for (struct mtp_back_stream *s = c->streams; s != NULL && k < n; s = s->next)
    if (s->want_writable)
      ids[k++] = s->conn_id;
  for (size_t i = 0; i < k; i++) {
    /* The front may close any stream (or fill the queue again) during the callbacks. */
    if (c->state != MTP_BACK_CONN_READY || mtp_back_conn_queued(c) >= MTP_BACK_HIGH_WATER) {
      for (size_t j = i; j < k; j++) { /* still owed: keep them remembered */
        struct mtp_back_stream *r = mtp_connmap_get(&c->w->map, ids[j]);
        if (r != NULL && r->conn == c && r->want_writable)
          c->has_blocked = true;
      }
      break;
    }
    struct mtp_back_stream *s = mtp_connmap_get(&c->w->map, ids[i]);
    if (s == NULL || s->conn != c || s->dead || !s->want_writable)
      continue;
    s->want_writable = false;
    s->ops->on_writable(s->front);
  }
  if (ids != small)
    mtp_free(ids);
}

/* ---- the local link ---- */

static void *link_open(struct mtp_link *link, const struct mtp_link_open *req, void *front,
                       const struct mtp_link_front_ops *ops, int *err) {
  struct mtp_back_worker *w = link->impl;
  *err = MTP_OK;
  if (w->stopping) {
    *err = MTP_ECLOSED;
    return NULL;
  }
  struct mtp_tg_snapshot *snap = mtp_back_snapshot(w->back);
  if (snap == NULL) {
    *err = MTP_ENOCONFIG;
    return NULL;
  }
  const struct mtp_tg_addr *one[1];
  bool used_default = false;
  size_t n = mtp_tgconfig_lookup(&snap->cfg, req->dc, one, 1, &used_default);
  mtp_tg_snapshot_release(snap);
  if (n == 0) {
    *err = MTP_ENODC;
    return NULL;
  }
  struct mtp_back_pool *pool = get_pool(w, req->dc);
  struct mtp_back_stream *s = pool ? mtp_calloc(1, sizeof(*s)) : NULL;
  if (s == NULL) {
    *err = MTP_ENOMEM;
    return NULL;
  }
  s->w = w;
  s->pool = pool;
  s->front = front;
  s->ops = ops;
  s->proto = req->proto;
  s->pend_tail = &s->pend_head;
  uint32_t port = 0;
  memset(s->client_ip, 0, 16);
  if (req->client_addr.ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&req->client_addr;
    memcpy(s->client_ip, &a->sin6_addr, 16);
    port = ntohs(a->sin6_port);
  } else if (req->client_addr.ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)&req->client_addr;
    s->client_ip[10] = 0xff;
    s->client_ip[11] = 0xff;
    memcpy(s->client_ip + 12, &a->sin_addr, 4);
    port = ntohs(a->sin_port);
  }
  s->client_port = port;
  s->local_addr = req->local_addr;
  s->has_ad_tag = req->has_ad_tag;
  memcpy(s->ad_tag, req->ad_tag, 16);
  for (int tries = 0; tries < 16; tries++) {
    uint64_t id = 0;
    if (mtp_random(&id, sizeof(id)) < 0)
      id = ((uint64_t)mtp_random_below(UINT32_MAX) << 32) | mtp_random_below(UINT32_MAX);
    if (id != 0 && mtp_connmap_get(&w->map, id) == NULL) {
      s->conn_id = id;
      break;
    }
  }
  if (s->conn_id == 0 || mtp_connmap_put(&w->map, s->conn_id, s) < 0) {
    mtp_free(s);
    *err = MTP_ENOMEM;
    return NULL;
  }
  int rc = attach(pool, s);
  if (rc < 0) {
    mtp_connmap_del(&w->map, s->conn_id);
    mtp_free(s);
    *err = rc;
    return NULL;
  }
  mtp_metric_add(MTP_M_RPC_STREAMS, 1);
  mtp_back_dc_add(&w->stats->clients[pool->slot], 1);
  return s;
}

static int link_send(struct mtp_link *link, void *stream, const uint8_t *data, size_t len, bool quickack) {
  struct mtp_back_stream *s = stream;
  if (s->dead)
    return MTP_ECLOSED;
  if (len > MTP_BACK_MAX_PACKET)
    return MTP_ETOOBIG;
  if (len == 0 || len % 4 != 0)
    return MTP_EPROTO;
  uint32_t flags = mtp_rpc_proxy_req_flags(s->proto, quickack);
  static const uint8_t zero8[8];
  if (len >= 8 && memcmp(data, zero8, 8) == 0)
    flags |= MTP_RPC_FLAG_NOT_ENCRYPTED; /* auth_key_id 0: an unencrypted MTProto message */
  struct mtp_back_conn *c = s->conn;
  if (c != NULL && c->state == MTP_BACK_CONN_READY && s->pend_head != NULL)
    flush_stream(c, s); /* keep the order (only after a failed flush, normally empty) */
  if (c != NULL && c->state == MTP_BACK_CONN_READY && s->pend_head == NULL &&
      mtp_back_conn_send_packet(c, s, flags, data, len) == MTP_OK) {
    s->inflight++;
    if (mtp_back_conn_queued(c) > MTP_BACK_HIGH_WATER) {
      s->want_writable = true;
      c->has_blocked = true;
      return MTP_LINK_FULL;
    }
    return MTP_OK;
  }
  /* Not ready (connecting, failing, or being moved): keep it until the stream is on a ready
   * connection. c->pending_bytes counts the pending bytes of its streams while not READY. */
  size_t total = (c != NULL ? c->pending_bytes : s->pend_bytes) + len;
  /* The hard limit is per stream: a stream is refused only when it kept sending after FULL.
   * Many clients each sending a first packet while the connection comes up all get FULL (the
   * connection's total is over the soft mark) but none is refused for its neighbours. */
  if (s->pend_bytes + len > MTP_BACK_PENDING_HARD)
    return MTP_EBACKPRESSURE;
  struct mtp_back_pending *p = mtp_malloc(sizeof(*p) + len);
  if (p == NULL)
    return MTP_ENOMEM;
  p->next = NULL;
  p->flags = flags;
  p->len = len;
  memcpy(p->data, data, len);
  *s->pend_tail = p;
  s->pend_tail = &p->next;
  s->pend_bytes += len;
  if (c != NULL && c->state != MTP_BACK_CONN_READY)
    c->pending_bytes += len;
  if (total > MTP_BACK_PENDING_SOFT) {
    s->want_writable = true;
    if (c != NULL)
      c->has_blocked = true;
    return MTP_LINK_FULL;
  }
  return MTP_OK;
}

static void link_close(struct mtp_link *link, void *stream) {
  struct mtp_back_stream *s = stream;
  if (s == NULL || s->dead)
    return;
  s->dead = true;
  struct mtp_back_conn *c = s->conn;
  if (c != NULL && c->state == MTP_BACK_CONN_READY)
    mtp_back_conn_send_close(c, s->conn_id);
  stream_destroy(s);
}

/* ---- worker lifecycle ---- */

int mtp_back_worker_setup(struct mtp_back_worker **out, struct mtp_back *b, uv_loop_t *loop, int index) {
  *out = NULL;
  struct mtp_back_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  w->stats = mtp_back_dcstats_new(b);
  if (w->stats == NULL) {
    mtp_free(w);
    return MTP_ENOMEM;
  }
  w->back = b;
  w->cfg = mtp_back_config(b);
  w->loop = loop;
  w->index = index;
  mtp_connmap_init(&w->map);
  w->link.open = link_open;
  w->link.send = link_send;
  w->link.close = link_close;
  w->link.impl = w;
  w->next_log_id = (unsigned long long)index * 100000ull;
  *out = w;
  return MTP_OK;
}

struct mtp_link *mtp_back_worker_link(struct mtp_back_worker *w) { return &w->link; }

void mtp_back_worker_stop(struct mtp_back_worker *w) {
  if (w == NULL || w->stopping)
    return;
  w->stopping = true;
  for (struct mtp_back_pool *p = w->pools; p != NULL; p = p->next) {
    for (struct mtp_back_conn *c = p->conns; c != NULL; c = c->next) {
      struct mtp_back_stream *local = NULL, *s;
      bool ready = c->state == MTP_BACK_CONN_READY;
      for (s = c->streams; s != NULL && ready; s = s->next)
        mtp_back_conn_send_close(c, s->conn_id);
      detach_all(c, &local);
      while ((s = local) != NULL) {
        slist_unlink(s);
        stream_kill(s, MTP_LINK_CLOSE_SHUTDOWN);
      }
      mtp_back_conn_fail(c, 0);
    }
  }
}

void mtp_back_worker_free(struct mtp_back_worker *w) {
  if (w == NULL)
    return;
  struct mtp_back_pool *p = w->pools;
  while (p != NULL) {
    struct mtp_back_pool *n = p->next;
    mtp_free(p);
    p = n;
  }
  w->pools = NULL;
  mtp_connmap_free(&w->map);
  mtp_free(w);
}
