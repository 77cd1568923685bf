/*
 * tunnel_server.c - the back's side of split mode: accepts fronts' tunnel connections and maps
 * their streams onto the worker's in-process link (see tunnel_server.h, shared/tunnel_conn.h).
 *
 * Each accepted connection is a `bfront` (freed when its connection is gone); each stream a
 * `bstream` that is at the same time the "front" of a stream of the local link (struct
 * mtp_link_front_ops below): Telegram's answers arrive there and leave as frames.
 *
 * Credit. Front -> back: a packet's bytes are given back to the front once the local link took
 * it with MTP_OK, or, if it said MTP_LINK_FULL, once it calls on_writable; credits are batched
 * per stream and sent just before the loop polls. A front that sends beyond its credit breaks
 * the protocol: that stream is closed. Back -> front: Data goes out while the front's credit
 * allows; the local link cannot be paused per stream, so what does not fit waits in the
 * stream's queue, and a stream whose queue would exceed tunnel_window bytes plus one maximal
 * frame (so that packets larger than the window still work) is closed with reason
 * MTP_TUNNEL_CLOSE_BACKPRESSURE: its client is not reading; the others go on.
 *
 * Re-entrancy: calls into the local link are made with the stream marked busy; if the link
 * closes the stream meanwhile (on_close) it is freed when the call returns.
 */
#include "tunnel_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "connmap.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "sock.h"
#include "tunnel_conn.h"

#include "banned.h"

_Static_assert(MTP_TUNNEL_CLOSE_BACKPRESSURE == MTP_LINK_CLOSE_BACKPRESSURE,
               "the tunnel's backpressure close reason is the link's");

#define BACKLOG 1024

struct bfront;

struct bstream {
  /* On f->conn while attached: id, the front's credit and the answers waiting for it, and
   * st.unacked: the bytes received from the front and not yet credited. */
  struct mtp_tunnel_stream st;
  struct bfront *f;                /* borrows; NULL once detached */
  void *ls;                        /* the local link's stream; invalid once gone */
  uint64_t held;                   /* received bytes the link took with MTP_LINK_FULL: credited on on_writable */
  bool gone;                       /* the local stream is released: no more link calls */
  int busy;                        /* calls into the local link on the stack */
};

static struct bstream *bstream_of(struct mtp_tunnel_stream *st) {
  return (struct bstream *)((char *)st - offsetof(struct bstream, st));
}

struct bfront {
  struct mtp_tunnel_server *srv;  /* borrows */
  struct mtp_tunnel_conn *conn;   /* borrows (frees itself); lists the front's streams */
  struct bfront *next, **pprev;   /* in srv->fronts */
  struct mtp_connmap map;         /* stream id -> bstream */
  bool up;
};

struct mtp_tunnel_server {
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;
  int index;
  struct mtp_link *link;        /* borrows */
  struct mtp_tls_conf *tls;     /* owns */
  uv_tcp_t listener;
  bool listening;
  struct sockaddr_storage addr; /* where we listen */
  struct bfront *fronts;
  int nup;
  struct mtp_tunnel_params p; /* window, heartbeat, timeout, node */
  unsigned long long next_log_id;
  bool stopping;
};

/* ---- streams ---- */

/* Takes s out of its front (map and connection). */
static void stream_detach(struct bstream *s) {
  struct bfront *f = s->f;
  if (f == NULL)
    return;
  if (mtp_connmap_get(&f->map, s->st.id) == s)
    mtp_connmap_del(&f->map, s->st.id);
  mtp_tunnel_stream_detach(&s->st);
  s->f = NULL;
}

static void stream_free(struct bstream *s) {
  stream_detach(s);
  mtp_tunnel_stream_free(&s->st);
  mtp_free(s);
}

/* Frees s unless a call into the link is on the stack (then that caller frees it). */
static void stream_release(struct bstream *s) {
  stream_detach(s);
  if (s->busy == 0)
    stream_free(s);
}

/* Ends s from our side: releases the local stream, tells the front (reason), frees. */
static void stream_end(struct mtp_tunnel_server *srv, struct bstream *s, uint32_t reason) {
  if (s->gone) {
    stream_detach(s); /* never listed once gone; keeps the callers' list walks finite */
    return;
  }
  s->gone = true;
  if (s->f != NULL && reason != MTP_TUNNEL_NO_REASON)
    mtp_tunnel_conn_send_close(s->f->conn, s->st.id, reason);
  srv->link->close(srv->link, s->ls);
  s->ls = NULL;
  stream_release(s);
}

/* After a call into the link: true (and s freed) if the link closed s meanwhile. */
static bool call_done(struct bstream *s) {
  s->busy--;
  if (s->gone) {
    if (s->busy == 0)
      stream_free(s);
    return true;
  }
  return false;
}

/* ---- the local link's ops: Telegram -> front ---- */

static void ls_on_packet(void *front, const uint8_t *data, size_t len) {
  struct bstream *s = front;
  if (s->gone || s->f == NULL)
    return;
  struct mtp_tunnel_server *srv = s->f->srv;
  /* Sent, or queued for the front's credit: at most a window and one maximal frame. */
  int rc = mtp_tunnel_stream_write(&s->st, data, len, false, srv->p.window + MTP_TUNNEL_MAX_FRAME);
  if (rc == MTP_EBACKPRESSURE) {
    mtp_logc(mtp_tunnel_conn_log(s->f->conn), MTP_LOG_INFO,
             "stream %llx: the front granted no credit for %zu bytes; closing it (backpressure)",
             (unsigned long long)s->st.id, mtp_tunnel_stream_queued(&s->st) + len);
    stream_end(srv, s, MTP_TUNNEL_CLOSE_BACKPRESSURE);
  } else if (rc == MTP_ENOMEM) {
    stream_end(srv, s, MTP_LINK_CLOSE_UPSTREAM);
  } /* else MTP_OK, or the connection is closing and will end the stream */
}

static void ls_on_quickack(void *front, uint32_t token) {
  struct bstream *s = front;
  if (s->gone || s->f == NULL)
    return;
  mtp_tunnel_conn_send_quickack(s->f->conn, s->st.id, token);
}

static void ls_on_close(void *front, int reason) {
  struct bstream *s = front;
  if (s->gone)
    return;
  s->gone = true;
  s->ls = NULL;
  if (s->f != NULL)
    mtp_tunnel_conn_send_close(s->f->conn, s->st.id, (uint32_t)reason);
  stream_release(s);
}

static void ls_on_writable(void *front) {
  struct bstream *s = front;
  if (s->gone || s->f == NULL || s->held == 0)
    return;
  uint64_t n = s->held;
  s->held = 0;
  mtp_tunnel_stream_grant(&s->st, n);
}

static const struct mtp_link_front_ops LS_OPS = {
    .on_packet = ls_on_packet,
    .on_quickack = ls_on_quickack,
    .on_close = ls_on_close,
    .on_writable = ls_on_writable,
};

/* ---- frames from a front ---- */

static uint32_t open_fail_reason(int err) {
  switch (err) {
  case MTP_ECLOSED:
    return MTP_LINK_CLOSE_SHUTDOWN;
  case MTP_ENODC:
  case MTP_ENOCONFIG:
    return MTP_LINK_CLOSE_NO_DC;
  default:
    return MTP_LINK_CLOSE_UPSTREAM;
  }
}

static void bytes_to_addr(const ProtobufCBinaryData *ip, uint32_t port, struct sockaddr_storage *out) {
  memset(out, 0, sizeof(*out));
  if (ip->len == 4) {
    struct sockaddr_in *a = (struct sockaddr_in *)out;
    a->sin_family = AF_INET;
    memcpy(&a->sin_addr, ip->data, 4);
    a->sin_port = htons((uint16_t)port);
  } else if (ip->len == 16) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)out;
    a->sin6_family = AF_INET6;
    memcpy(&a->sin6_addr, ip->data, 16);
    a->sin6_port = htons((uint16_t)port);
  }
}

static void on_open_frame(struct bfront *f, const Mtp__Open *o) {
  struct mtp_tunnel_server *srv = f->srv;
  if (mtp_connmap_get(&f->map, o->stream) != NULL) {
    mtp_tunnel_conn_close(f->conn, MTP_EPROTO, MTP_TUNNEL_CLOSE_PROTOCOL, "protocol error: a stream id opened twice");
    return;
  }
  if (o->proto < MTP_PROTO_ABRIDGED || o->proto > MTP_PROTO_PADDED) {
    mtp_logc(mtp_tunnel_conn_log(f->conn), MTP_LOG_WARN, "stream %llx: unknown client framing %u; refused",
             (unsigned long long)o->stream, o->proto);
    mtp_tunnel_conn_send_close(f->conn, o->stream, MTP_LINK_CLOSE_UPSTREAM);
    return;
  }
  struct bstream *s = mtp_calloc(1, sizeof(*s));
  if (s == NULL || mtp_connmap_put(&f->map, o->stream, s) != MTP_OK) {
    mtp_free(s);
    mtp_tunnel_conn_send_close(f->conn, o->stream, MTP_LINK_CLOSE_UPSTREAM);
    return;
  }
  s->st.id = o->stream;
  s->f = f;
  mtp_tunnel_stream_attach(&s->st, f->conn);

  struct mtp_link_open req;
  memset(&req, 0, sizeof(req));
  req.dc = o->dc;
  req.proto = (enum mtp_proto)o->proto;
  bytes_to_addr(&o->client_ip, o->client_port, &req.client_addr);
  bytes_to_addr(&o->local_ip, o->local_port, &req.local_addr);
  req.listener = o->listener != NULL ? o->listener : "";
  if (o->ad_tag.len == 16) {
    req.has_ad_tag = true;
    memcpy(req.ad_tag, o->ad_tag.data, 16);
  }
  int err = MTP_OK;
  void *ls = srv->link->open(srv->link, &req, s, &LS_OPS, &err); /* never calls ops */
  if (ls == NULL) {
    mtp_debugc(mtp_tunnel_conn_log(f->conn), "stream %llx: open failed: %s", (unsigned long long)o->stream,
               mtp_strerror(err));
    s->gone = true;
    mtp_tunnel_conn_send_close(f->conn, o->stream, open_fail_reason(err));
    stream_free(s);
    return;
  }
  s->ls = ls;
  MTP_COUNT(TUNNEL_STREAMS_OPENED);
}

static void on_data_frame(struct bfront *f, struct bstream *s, const Mtp__Data *d) {
  struct mtp_tunnel_server *srv = f->srv;
  size_t len = d->packet.len;
  if (s->st.unacked > 0 && s->st.unacked + len > srv->p.window) {
    mtp_logc(mtp_tunnel_conn_log(f->conn), MTP_LOG_WARN,
             "stream %llx: the front sent %llu bytes beyond its credit; stream closed", (unsigned long long)s->st.id,
             (unsigned long long)(s->st.unacked + len - srv->p.window));
    stream_end(srv, s, MTP_LINK_CLOSE_UPSTREAM);
    return;
  }
  s->st.unacked += len;
  s->busy++;
  int rc = srv->link->send(srv->link, s->ls, d->packet.data, len, d->quickack);
  if (call_done(s))
    return;
  if (rc == MTP_OK) {
    mtp_tunnel_stream_grant(&s->st, len);
  } else if (rc == MTP_LINK_FULL) {
    s->held += len;
  } else {
    mtp_debugc(mtp_tunnel_conn_log(f->conn), "stream %llx: the link refused a packet: %s",
               (unsigned long long)s->st.id, mtp_strerror(rc));
    stream_end(srv, s, MTP_LINK_CLOSE_UPSTREAM);
  }
}

static void on_conn_frame(struct mtp_tunnel_conn *c, const Mtp__Frame *fr) {
  struct bfront *f = mtp_tunnel_conn_data(c);
  struct mtp_tunnel_server *srv = f->srv;
  if (fr->msg_case == MTP__FRAME__MSG_OPEN) {
    on_open_frame(f, fr->open);
    return;
  }
  uint64_t id = 0;
  switch (fr->msg_case) {
  case MTP__FRAME__MSG_DATA: id = fr->data->stream; break;
  case MTP__FRAME__MSG_CLOSE: id = fr->close->stream; break;
  case MTP__FRAME__MSG_CREDIT: id = fr->credit->stream; break;
  default:
    mtp_debugc(mtp_tunnel_conn_log(c), "unexpected %s frame from a front ignored", mtp_tunnel_frame_name(fr));
    return;
  }
  struct bstream *s = mtp_connmap_get(&f->map, id);
  if (s == NULL || s->gone) {
    mtp_debugc(mtp_tunnel_conn_log(c), "%s frame for closed stream %llx dropped", mtp_tunnel_frame_name(fr),
               (unsigned long long)id);
    return;
  }
  switch (fr->msg_case) {
  case MTP__FRAME__MSG_DATA:
    on_data_frame(f, s, fr->data);
    break;
  case MTP__FRAME__MSG_CLOSE:
    stream_end(srv, s, MTP_TUNNEL_NO_REASON);
    break;
  case MTP__FRAME__MSG_CREDIT:
    mtp_tunnel_stream_credit(&s->st, fr->credit->bytes);
    break;
  default:
    break;
  }
}

static void on_conn_up(struct mtp_tunnel_conn *c) {
  struct bfront *f = mtp_tunnel_conn_data(c);
  f->up = true;
  f->srv->nup++;
}

static void on_conn_close(struct mtp_tunnel_conn *c, int err, const char *why) {
  struct bfront *f = mtp_tunnel_conn_data(c);
  struct mtp_tunnel_server *srv = f->srv;
  size_t n = mtp_tunnel_conn_nstreams(c);
  struct mtp_tunnel_stream *st;
  while ((st = mtp_tunnel_conn_streams(c)) != NULL)
    stream_end(srv, bstream_of(st), MTP_TUNNEL_NO_REASON);
  const struct mtp_log_ctx *log = mtp_tunnel_conn_log(c);
  const char *cn = mtp_tunnel_conn_peer_cn(c);
  if (f->up) {
    srv->nup--;
    mtp_logc(log, err == MTP_OK ? MTP_LOG_INFO : MTP_LOG_WARN, "front '%s' disconnected: %s; %zu streams closed", cn,
             why, n);
  } else if (!srv->stopping) {
    mtp_logc(log, MTP_LOG_WARN, "tunnel connection refused: %s", why);
  }
  *f->pprev = f->next;
  if (f->next != NULL)
    f->next->pprev = f->pprev;
  mtp_connmap_free(&f->map);
  mtp_free(f);
}

static const struct mtp_tunnel_conn_ops CONN_OPS = {
    .on_up = on_conn_up,
    .on_frame = on_conn_frame,
    .on_close = on_conn_close,
};

/* ---- listening ---- */

static void on_connection(uv_stream_t *server, int status) {
  struct mtp_tunnel_server *srv = server->data;
  if (status < 0) {
    mtp_log(MTP_LOG_WARN, "tunnel listener: %s", uv_strerror(status));
    return;
  }
  if (srv->stopping)
    return;
  struct bfront *f = mtp_calloc(1, sizeof(*f));
  if (f == NULL) {
    mtp_log(MTP_LOG_ERROR, "tunnel listener: out of memory for a front");
    return;
  }
  f->srv = srv;
  mtp_connmap_init(&f->map);
  struct mtp_tunnel_conn_opts o = {
      .ops = &CONN_OPS,
      .data = f,
      .node = srv->p.node,
      .window = srv->p.window,
      .heartbeat_ms = srv->p.heartbeat_ms,
      .timeout_ms = srv->p.timeout_ms,
      .allowed = srv->cfg->tunnel_allowed_fronts,
      .nallowed = srv->cfg->ntunnel_allowed_fronts,
      .log_id = srv->next_log_id++,
      .where = "tunnel",
  };
  if (mtp_tunnel_conn_accept(&f->conn, srv->tls, server, &o) != MTP_OK) {
    mtp_free(f);
    mtp_log(MTP_LOG_ERROR, "tunnel listener: out of memory for a front");
    return;
  }
  f->next = srv->fronts;
  if (srv->fronts != NULL)
    srv->fronts->pprev = &f->next;
  f->pprev = &srv->fronts;
  srv->fronts = f;
}

static void on_failed_listener_closed(uv_handle_t *h) {
  struct mtp_tunnel_server *srv = h->data;
  mtp_tls_conf_free(srv->tls);
  mtp_free(srv);
}

int mtp_tunnel_server_setup(struct mtp_tunnel_server **out, const struct mtp_config *cfg, uv_loop_t *loop,
                            int index, const struct sockaddr_storage *bound, struct mtp_link *link, char *err,
                            size_t errlen) {
  *out = NULL;
  if (errlen > 0)
    err[0] = '\0';
  struct sockaddr_storage addr;
  if (bound != NULL) {
    addr = *bound;
  } else if (cfg->tunnel_listen == NULL || mtp_parse_addr_port(cfg->tunnel_listen, &addr) != MTP_OK) {
    snprintf(err, errlen, "tunnel_listen: '%s' is not ADDR:PORT", cfg->tunnel_listen ? cfg->tunnel_listen : "");
    return MTP_EINVAL;
  }
  struct mtp_tunnel_server *srv = mtp_calloc(1, sizeof(*srv));
  if (srv == NULL) {
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  srv->cfg = cfg;
  srv->loop = loop;
  srv->index = index;
  srv->link = link;
  srv->next_log_id = (unsigned long long)index * 100000ull + 80000ull;
  mtp_tunnel_params_init(&srv->p, cfg, "back");
  int rc = mtp_tunnel_tls_setup(&srv->tls, cfg, MTP_TLS_SERVER, NULL, srv->p.timeout_ms, err, errlen);
  if (rc != MTP_OK) {
    mtp_free(srv);
    return rc;
  }
  int fd = -1;
  /* One SO_REUSEPORT socket per worker on the same address. */
  rc = mtp_sock_listen(&addr, BACKLOG, &fd, "tunnel_listen", err, errlen);
  if (rc != MTP_OK) {
    mtp_tls_conf_free(srv->tls);
    mtp_free(srv);
    return rc;
  }
  uv_tcp_init(loop, &srv->listener);
  srv->listener.data = srv;
  srv->listening = true;
  rc = uv_tcp_open(&srv->listener, fd);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&srv->listener, BACKLOG, on_connection);
  if (rc < 0) {
    char where[80];
    mtp_format_addr(&addr, where, sizeof(where));
    snprintf(err, errlen, "tunnel_listen %s: %s", where, uv_strerror(rc));
    if (uv_fileno((uv_handle_t *)&srv->listener, &(uv_os_fd_t){0}) != 0)
      close(fd); /* not taken by the handle */
    /* The handle must close on the loop before srv can be freed. */
    uv_close((uv_handle_t *)&srv->listener, on_failed_listener_closed);
    return rc;
  }
  int alen = sizeof(srv->addr);
  if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&srv->addr, &alen) != 0)
    srv->addr = addr;
  *out = srv;
  return MTP_OK;
}

int mtp_tunnel_server_addr(const struct mtp_tunnel_server *s, struct sockaddr_storage *out) {
  *out = s->addr;
  return MTP_OK;
}

int mtp_tunnel_server_fronts(const struct mtp_tunnel_server *s) { return s->nup; }

void mtp_tunnel_server_stop(struct mtp_tunnel_server *s) {
  if (s == NULL || s->stopping)
    return;
  s->stopping = true;
  if (s->listening) {
    uv_close((uv_handle_t *)&s->listener, NULL);
    s->listening = false;
  }
  for (struct bfront *f = s->fronts; f != NULL; f = f->next) {
    struct mtp_tunnel_stream *st;
    while ((st = mtp_tunnel_conn_streams(f->conn)) != NULL)
      stream_end(s, bstream_of(st), MTP_TUNNEL_NO_REASON);
    mtp_tunnel_conn_close(f->conn, MTP_OK, MTP_LINK_CLOSE_SHUTDOWN, "the back is stopping");
  }
}

void mtp_tunnel_server_free(struct mtp_tunnel_server *s) {
  if (s == NULL)
    return;
  mtp_tls_conf_free(s->tls);
  mtp_free(s);
}
