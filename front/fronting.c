/*
 * fronting.c - domain fronting: a connection handed over by a session is spliced byte for
 * byte to the fronting target (see the state diagram in fronting.h).
 *
 * Each fronted connection (struct fconn) has two TCP handles (client, target) and one timer
 * (the connect deadline, then the idle timer). One relay routine handles both directions,
 * parameterised by src/dst. Reads go through one 64 KiB buffer per worker (libuv calls the
 * read callback right after the alloc callback, on this one thread); what a write cannot take
 * at once is copied into a write request of exactly that size, so a connection holds at most
 * about SPLICE_HIGH queued bytes per direction plus one read.
 *
 * The target is resolved and dialled by shared/dial.c (one address after another, those that
 * are the proxy itself passed over); the target handle is the connection's once connected.
 *
 * Close safety: fconn_close() may run inside any callback. It only changes the state, cancels
 * the dial and starts uv_close on the handles; the memory goes when the last of them (and the
 * dial's callback) has reported back. Write and shutdown requests report before their
 * handle's close callback, so they may still look at the connection.
 */
#include "fronting.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "dial.h"
#include "err.h"
#include "log.h"
#include "metrics.h"

#include "banned.h"

/* A side stops being read while the other side has this many bytes queued ... */
#define SPLICE_HIGH (256u * 1024u)
/* ... and is read again once the queue has drained below this. */
#define SPLICE_LOW (64u * 1024u)
/* The one read buffer of a worker: the most one read callback moves. */
#define SPLICE_READ_BUF (64u * 1024u)

enum fconn_state {
  F_DIAL,    /* resolving and connecting to the target (c->dial; connect deadline) */
  F_SPLICE,  /* copying bytes both ways (idle timer) */
  F_CLOSING, /* handles closing; the last close callback frees the connection */
};

/* One end of a fronted connection. */
struct side {
  uv_tcp_t tcp;
  bool open;      /* tcp is initialised and not yet uv_close'd */
  bool reading;   /* uv_read_start is in effect */
  bool eof;       /* this side sent EOF: nothing more comes from it */
  bool shut_done; /* we shut down writing to it (after the other side's EOF) and it completed */
  size_t queued;  /* bytes written to this side whose write requests have not completed */
};

struct fconn {
  struct mtp_fronting *f;    /* borrows */
  struct fconn *prev, *next; /* in f->conns */
  enum fconn_state state;
  struct side client, target; /* target.tcp belongs to dial until it has connected */
  uv_timer_t timer;           /* connect deadline, then idle timer */
  struct mtp_dial dial;       /* the target (host, port, the address dialled) */
  int refs;                   /* open handles + the running dial */
  uint8_t *pre;               /* owns: the client's bytes already read; written first */
  size_t prelen;
  uint64_t idle_ms;             /* fronting_idle_timeout when the connection started */
  uint64_t last_active;         /* uv_now() at the last byte either way */
  uint64_t bytes_in, bytes_out; /* client->target, target->client */
  char where[32];               /* listener name (copied: the caller's string is borrowed) */
  struct mtp_log_ctx log;
};

static const char *fconn_state_str(const struct fconn *c) {
  switch (c->state) {
  case F_DIAL:
    return mtp_dial_state_str(&c->dial);
  case F_SPLICE:
    return "splice";
  case F_CLOSING:
    return "closing";
  }
  return "?";
}

/* The settings in force: a copy of what fronting needs from the configuration and the
 * proxy's own addresses, replaced whole by mtp_fronting_reconfigure. Connections read it when
 * they start (target, connect deadline, idle timeout) and keep what they took. */
struct fconf {
  enum mtp_fronting_mode mode;
  char *host; /* owns: fronting_host as configured (brackets and all), NULL = none */
  uint16_t port;
  double connect_timeout, idle_timeout;
  struct sockaddr_storage *bound; /* owns: the listeners' concrete addresses */
  size_t nbound;
  struct sockaddr_storage public_addrs[2];
  size_t npublic;
};

struct mtp_fronting {
  uv_loop_t *loop;                /* borrows */
  struct fconf conf;              /* owns what it points to */
  uv_interface_address_t *ifaces; /* owns (uv_free_interface_addresses): cached at setup */
  int nifaces;
  uint8_t *rbuf;       /* owns: the read buffer every read callback uses */
  struct fconn *conns; /* every connection not yet freed */
  size_t nconns;
  bool stopping;
};

/* One write to a side; owns its bytes until on_written. */
struct wreq {
  uv_write_t req;
  struct fconn *c;  /* borrows */
  struct side *dst; /* borrows (inside c) */
  size_t len;
  uint8_t data[];
};

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void on_timer(uv_timer_t *t);
static void on_handle_closed(uv_handle_t *h);

/* ---- the loop check ---- */

/* Copies a into out with a v4-mapped IPv6 address turned into IPv4 (that is where a connect to
 * it goes). False for families other than IPv4/IPv6. */
static bool addr_normalise(const struct sockaddr *a, struct sockaddr_storage *out) {
  memset(out, 0, sizeof(*out));
  if (a->sa_family == AF_INET) {
    memcpy(out, a, sizeof(struct sockaddr_in));
    return true;
  }
  if (a->sa_family != AF_INET6)
    return false;
  const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)a;
  if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr)) {
    struct sockaddr_in *o4 = (struct sockaddr_in *)out;
    o4->sin_family = AF_INET;
    o4->sin_port = a6->sin6_port;
    memcpy(&o4->sin_addr, &a6->sin6_addr.s6_addr[12], 4);
    return true;
  }
  memcpy(out, a, sizeof(struct sockaddr_in6));
  return true;
}

static uint16_t addr_port(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET)
    return ntohs(((const struct sockaddr_in *)a)->sin_port);
  if (a->ss_family == AF_INET6)
    return ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
  return 0;
}

/* Same family and address (ports ignored). */
static bool addr_same_ip(const struct sockaddr_storage *a, const struct sockaddr *b) {
  if (a->ss_family != b->sa_family)
    return false;
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *)a)->sin_addr.s_addr == ((const struct sockaddr_in *)b)->sin_addr.s_addr;
  if (a->ss_family == AF_INET6)
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &((const struct sockaddr_in6 *)b)->sin6_addr, 16) == 0;
  return false;
}

static bool addr_is_unspecified(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *)a)->sin_addr.s_addr == htonl(INADDR_ANY);
  if (a->ss_family == AF_INET6)
    return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)a)->sin6_addr);
  return false;
}

static bool addr_is_loopback(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
  if (a->ss_family == AF_INET6)
    return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)a)->sin6_addr);
  return false;
}

/* True when a connect to t ends on this host: loopback, the unspecified address (the kernel
 * takes it for a local one) or an address of one of our interfaces (cached at setup). */
static bool addr_is_local(const struct mtp_fronting *f, const struct sockaddr_storage *t) {
  if (addr_is_loopback(t) || addr_is_unspecified(t))
    return true;
  for (int i = 0; i < f->nifaces; i++)
    if (addr_same_ip(t, (const struct sockaddr *)&f->ifaces[i].address))
      return true;
  return false;
}

/*
 * A connect to t reaches one of our listeners when its port is a listener's port and
 *   - its address is that listener's bound address, or
 *   - the listener is bound to the wildcard address of t's family (IPv6 listeners are
 *     V6ONLY) and t is local, or
 *   - t is our public address (a NAT may hairpin it back to any listener).
 * A local address on a listener's port is not refused when that listener is bound to another
 * specific address: the kernel would never deliver it to us (e.g. a local nginx on
 * 127.0.0.1:443 beside a proxy bound to 203.0.113.5:443).
 */
int mtp_fronting_is_self(const struct mtp_fronting *f, const struct sockaddr *addr) {
  struct sockaddr_storage t;
  if (f == NULL || addr == NULL || !addr_normalise(addr, &t))
    return 0;
  uint16_t port = addr_port(&t);
  const struct fconf *fc = &f->conf;
  for (size_t i = 0; i < fc->nbound; i++) {
    struct sockaddr_storage b;
    if (!addr_normalise((const struct sockaddr *)&fc->bound[i], &b) || addr_port(&b) != port)
      continue;
    if (addr_same_ip(&b, (const struct sockaddr *)&t))
      return 1;
    if (addr_is_unspecified(&b) && b.ss_family == t.ss_family && addr_is_local(f, &t))
      return 1;
    for (size_t k = 0; k < fc->npublic && k < 2; k++) {
      struct sockaddr_storage p;
      if (addr_normalise((const struct sockaddr *)&fc->public_addrs[k], &p) &&
          addr_same_ip(&p, (const struct sockaddr *)&t))
        return 1;
    }
  }
  return 0;
}

/* ---- lifetime ---- */

static void fconn_free(struct fconn *c) {
  struct mtp_fronting *f = c->f;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    f->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  f->nconns--;
  mtp_free(c->pre);
  c->pre = NULL;
  mtp_free(c);
}

static void side_close(struct fconn *c, struct side *s, bool reset) {
  if (!s->open)
    return;
  s->open = false;
  s->reading = false;
  /* An RST from one side is passed on as an RST (libuv refuses that after a shutdown). */
  if (reset && uv_tcp_close_reset(&s->tcp, on_handle_closed) == 0)
    return;
  uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
}

/* Ends the connection: cancels the dial, closes every handle. Safe inside any callback;
 * idempotent. reset: close the sockets with an RST (the other side reset). */
static void fconn_close(struct fconn *c, const char *why, bool reset) {
  if (c->state == F_CLOSING)
    return;
  mtp_debugc(&c->log, "fronted connection closing in state %s: %s (%llu bytes in, %llu out)", fconn_state_str(c),
             why, (unsigned long long)c->bytes_in, (unsigned long long)c->bytes_out);
  c->state = F_CLOSING;
  mtp_metric_add(MTP_M_FRONTED_ACTIVE, -1);
  mtp_dial_cancel(&c->dial);
  side_close(c, &c->client, reset);
  side_close(c, &c->target, reset);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

/* Fronting could not start: counted as a failure, logged with why. */
static void fconn_fail(struct fconn *c, const char *why) {
  MTP_COUNT(FRONTED_FAILED);
  mtp_logc(&c->log, MTP_LOG_INFO, "fronting to %s failed: %s", c->dial.hostport, why);
  fconn_close(c, why, false);
}

static void maybe_free(struct fconn *c) {
  if (c->state == F_CLOSING && c->refs == 0)
    fconn_free(c);
}

static void on_handle_closed(uv_handle_t *h) {
  struct fconn *c = h->data;
  c->refs--;
  maybe_free(c);
}

/* ---- splice ---- */

/* The one predicate deciding whether we read src (whose bytes go to dst): only while
 * splicing, until src's EOF, and while dst's queue is below the high-water mark (once
 * paused, until it is below the low-water mark). */
static bool side_may_read(const struct fconn *c, const struct side *src, const struct side *dst) {
  if (c->state != F_SPLICE || !src->open || src->eof)
    return false;
  return dst->queued < (src->reading ? SPLICE_HIGH : SPLICE_LOW);
}

static bool side_update_reading(struct fconn *c, struct side *src, struct side *dst) {
  bool want = side_may_read(c, src, dst);
  if (want && !src->reading) {
    int r = uv_read_start((uv_stream_t *)&src->tcp, on_alloc, on_read);
    if (r < 0) {
      mtp_logc(&c->log, MTP_LOG_WARN, "fronting: read start failed: %s", uv_strerror(r));
      fconn_close(c, "read start failed", false);
      return false;
    }
    src->reading = true;
  } else if (!want && src->reading) {
    uv_read_stop((uv_stream_t *)&src->tcp);
    src->reading = false;
  }
  return true;
}

static void update_reading(struct fconn *c) {
  if (side_update_reading(c, &c->client, &c->target))
    side_update_reading(c, &c->target, &c->client);
}

/* Both directions are finished: each side sent EOF and the other side's shutdown (after its
 * queued bytes) completed. */
static void check_done(struct fconn *c) {
  if (c->client.eof && c->target.eof && c->client.shut_done && c->target.shut_done)
    fconn_close(c, "both directions finished", false);
}

static struct side *other_side(struct fconn *c, struct side *s) { return s == &c->client ? &c->target : &c->client; }

static void on_written(uv_write_t *req, int status) {
  struct wreq *w = (struct wreq *)req;
  struct fconn *c = w->c;
  struct side *dst = w->dst;
  dst->queued -= w->len;
  mtp_free(w);
  if (c->state == F_CLOSING)
    return;
  if (status < 0) {
    mtp_debugc(&c->log, "fronting: write to the %s failed: %s", dst == &c->client ? "client" : "target",
               uv_strerror(status));
    fconn_close(c, "write failed", status == UV_ECONNRESET);
    return;
  }
  update_reading(c);
}

/* Writes data[0..len) to dst: what the socket takes at once when nothing is queued, the rest
 * copied into a write request. False when the connection was closed. */
static bool side_write(struct fconn *c, struct side *dst, const uint8_t *data, size_t len) {
  if (dst->queued == 0 && uv_stream_get_write_queue_size((uv_stream_t *)&dst->tcp) == 0) {
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    int n = uv_try_write((uv_stream_t *)&dst->tcp, &b, 1);
    if (n > 0) {
      data += n;
      len -= (size_t)n;
    } else if (n < 0 && n != UV_EAGAIN) {
      mtp_debugc(&c->log, "fronting: write to the %s failed: %s", dst == &c->client ? "client" : "target",
                 uv_strerror(n));
      fconn_close(c, "write failed", n == UV_ECONNRESET);
      return false;
    }
  }
  if (len == 0)
    return true;
  struct wreq *w = mtp_malloc(sizeof(*w) + len);
  if (w == NULL) {
    mtp_logc(&c->log, MTP_LOG_WARN, "fronting: out of memory for a %zu-byte write", len);
    fconn_close(c, "out of memory", false);
    return false;
  }
  w->c = c;
  w->dst = dst;
  w->len = len;
  memcpy(w->data, data, len);
  uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)len);
  int r = uv_write(&w->req, (uv_stream_t *)&dst->tcp, &b, 1, on_written);
  if (r < 0) {
    mtp_free(w);
    mtp_debugc(&c->log, "fronting: write failed: %s", uv_strerror(r));
    fconn_close(c, "write failed", false);
    return false;
  }
  dst->queued += len;
  return true;
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct fconn *c = req->data;
  struct side *s = req->handle == (uv_stream_t *)&c->client.tcp ? &c->client : &c->target;
  mtp_free(req);
  if (c->state == F_CLOSING)
    return;
  if (status < 0) {
    fconn_close(c, "shutdown failed", false);
    return;
  }
  s->shut_done = true;
  check_done(c);
}

/* src sent EOF: dst gets shutdown(SHUT_WR) once its queued bytes are written. */
static void side_eof(struct fconn *c, struct side *src) {
  struct side *dst = other_side(c, src);
  src->eof = true;
  update_reading(c);
  if (c->state == F_CLOSING)
    return;
  uv_shutdown_t *req = mtp_malloc(sizeof(*req));
  if (req == NULL) {
    fconn_close(c, "out of memory", false);
    return;
  }
  req->data = c;
  int r = uv_shutdown(req, (uv_stream_t *)&dst->tcp, on_shutdown);
  if (r < 0) {
    mtp_free(req);
    fconn_close(c, "shutdown failed", false);
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct fconn *c = h->data;
  *buf = uv_buf_init((char *)c->f->rbuf, SPLICE_READ_BUF);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct fconn *c = stream->data;
  struct side *src = stream == (uv_stream_t *)&c->client.tcp ? &c->client : &c->target;
  struct side *dst = other_side(c, src);
  if (c->state != F_SPLICE || nread == 0)
    return;
  if (nread == UV_EOF) {
    mtp_debugc(&c->log, "fronting: EOF from the %s", src == &c->client ? "client" : "target");
    side_eof(c, src);
    return;
  }
  if (nread < 0) {
    mtp_debugc(&c->log, "fronting: read from the %s failed: %s", src == &c->client ? "client" : "target",
               uv_strerror((int)nread));
    fconn_close(c, "read failed", nread == UV_ECONNRESET);
    return;
  }
  c->last_active = uv_now(c->f->loop);
  if (src == &c->client) {
    c->bytes_in += (uint64_t)nread;
    mtp_metric_add(MTP_M_FRONTED_BYTES_IN, nread);
  } else {
    c->bytes_out += (uint64_t)nread;
    mtp_metric_add(MTP_M_FRONTED_BYTES_OUT, nread);
  }
  if (side_write(c, dst, (const uint8_t *)buf->base, (size_t)nread))
    update_reading(c);
}

/* ---- timer ---- */

static void on_timer(uv_timer_t *t) {
  struct fconn *c = t->data;
  switch (c->state) {
  case F_DIAL:
    fconn_fail(c, "connect timed out");
    return;
  case F_SPLICE: {
    uint64_t idle = c->idle_ms;
    uint64_t quiet = uv_now(c->f->loop) - c->last_active;
    if (quiet >= idle) {
      mtp_logc(&c->log, MTP_LOG_INFO, "fronted connection idle for %g s; closing", (double)idle / 1000.0);
      fconn_close(c, "idle", false);
      return;
    }
    uv_timer_start(&c->timer, on_timer, idle - quiet, 0);
    return;
  }
  case F_CLOSING:
    return;
  }
}

/* ---- resolve and connect ---- */

/* The dial is over: connected (splicing starts), failed or cancelled (fconn_close). */
static void on_dialled(struct mtp_dial *d, int status, const char *why) {
  struct fconn *c = d->data;
  c->refs--;
  if (c->state != F_DIAL) {
    maybe_free(c);
    return;
  }
  if (status < 0) {
    fconn_fail(c, status == MTP_ENOTFOUND && d->nskipped > 0 ? "the target is the proxy itself (loop refused)" : why);
    return;
  }
  c->target.open = true;
  c->refs++;
  c->state = F_SPLICE;
  MTP_COUNT(FRONTED_TOTAL);
  mtp_logc(&c->log, MTP_LOG_INFO, "fronting to %s (%s), %zu bytes already read", d->hostport, d->addr_str, c->prelen);
  uv_tcp_nodelay(&c->target.tcp, 1);
  c->last_active = uv_now(c->f->loop);
  uv_timer_stop(&c->timer);
  uv_timer_start(&c->timer, on_timer, c->idle_ms, 0);
  if (c->prelen > 0) {
    c->bytes_in += c->prelen;
    mtp_metric_add(MTP_M_FRONTED_BYTES_IN, (int64_t)c->prelen);
    bool ok = side_write(c, &c->target, c->pre, c->prelen);
    mtp_free(c->pre);
    c->pre = NULL;
    if (!ok)
      return;
  }
  update_reading(c);
}

/* A resolved address of the target that is the proxy itself is never dialled (checked
 * against the own addresses in force now: a reload may have added a listener). */
static bool skip_self(struct mtp_dial *d, const struct sockaddr *addr) {
  struct fconn *c = d->data;
  if (!mtp_fronting_is_self(c->f, addr))
    return false;
  mtp_logc(&c->log, MTP_LOG_INFO, "fronting: %s resolves to %s, the proxy itself; not dialling it", d->hostport,
           d->addr_str);
  return true;
}

/* ---- settings ---- */

static void fconf_free(struct fconf *c) {
  mtp_free(c->host);
  c->host = NULL;
  mtp_free(c->bound);
  c->bound = NULL;
  c->nbound = 0;
}

/* Fills c (zeroed first) from cfg and shared (either may be NULL). MTP_OK or MTP_ENOMEM (c
 * then holds nothing). */
static int fconf_make(struct fconf *c, const struct mtp_config *cfg, const struct mtp_front_shared *shared) {
  memset(c, 0, sizeof(*c));
  c->mode = MTP_FRONTING_OFF;
  if (cfg != NULL) {
    c->mode = cfg->fronting_mode;
    c->port = cfg->fronting_port;
    c->connect_timeout = cfg->fronting_connect_timeout;
    c->idle_timeout = cfg->fronting_idle_timeout;
    if (cfg->fronting_host != NULL && (c->host = mtp_strdup(cfg->fronting_host)) == NULL)
      return MTP_ENOMEM;
  }
  if (shared == NULL)
    return MTP_OK;
  if (shared->nbound > 0 && shared->bound_addrs != NULL) {
    c->bound = mtp_calloc(shared->nbound, sizeof(*c->bound));
    if (c->bound == NULL) {
      fconf_free(c);
      return MTP_ENOMEM;
    }
    memcpy(c->bound, shared->bound_addrs, shared->nbound * sizeof(*c->bound));
    c->nbound = shared->nbound;
  }
  c->npublic = shared->npublic < 2 ? shared->npublic : 2;
  memcpy(c->public_addrs, shared->public_addrs, sizeof(c->public_addrs));
  return MTP_OK;
}

/* ---- public ---- */

int mtp_fronting_setup(struct mtp_fronting **out, uv_loop_t *loop, const struct mtp_config *cfg,
                       const struct mtp_front_shared *shared) {
  *out = NULL;
  struct mtp_fronting *f = mtp_calloc(1, sizeof(*f));
  if (f == NULL)
    return MTP_ENOMEM;
  f->loop = loop;
  f->rbuf = mtp_malloc(SPLICE_READ_BUF);
  if (f->rbuf == NULL || fconf_make(&f->conf, cfg, shared) != MTP_OK) {
    mtp_free(f->rbuf);
    mtp_free(f);
    return MTP_ENOMEM;
  }
  int r = uv_interface_addresses(&f->ifaces, &f->nifaces);
  if (r < 0) {
    /* The loop check still knows loopback, the bound and the public addresses. */
    mtp_log(MTP_LOG_WARN, "fronting: cannot list the network interfaces: %s", uv_strerror(r));
    f->ifaces = NULL;
    f->nifaces = 0;
  }
  *out = f;
  return MTP_OK;
}

int mtp_fronting_reconfigure(struct mtp_fronting *f, const struct mtp_config *cfg,
                             const struct mtp_front_shared *shared) {
  struct fconf next;
  if (fconf_make(&next, cfg, shared) != MTP_OK)
    return MTP_ENOMEM;
  fconf_free(&f->conf);
  f->conf = next;
  return MTP_OK;
}

int mtp_fronting_start(struct mtp_fronting *f, uv_os_sock_t fd, const char *sni, const uint8_t *pre, size_t prelen,
                       unsigned long long log_id, const char *peer, const char *listener) {
  if (f == NULL || f->conf.mode == MTP_FRONTING_OFF || f->stopping) {
    close(fd);
    return MTP_EDISABLED;
  }
  struct fconn *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL) {
    close(fd);
    MTP_COUNT(FRONTED_FAILED);
    return MTP_ENOMEM;
  }
  c->f = f;
  c->log.id = log_id;
  snprintf(c->log.peer, sizeof(c->log.peer), "%s", peer != NULL ? peer : "?");
  if (listener != NULL) {
    snprintf(c->where, sizeof(c->where), "%s", listener);
    c->log.where = c->where;
  }
  /* The settings in force now are this connection's for its whole life. */
  const struct fconf *conf = &f->conf;
  c->idle_ms = mtp_config_ms(conf->idle_timeout);
  bool sni_mode = conf->mode == MTP_FRONTING_SNI;
  if (!mtp_dial_set_target(&c->dial, sni_mode ? sni : conf->host, sni_mode ? 443 : conf->port)) {
    mtp_logc(&c->log, MTP_LOG_INFO, "fronting failed: %s",
             conf->mode == MTP_FRONTING_SNI ? "no SNI to front to" : "no fronting host configured");
    MTP_COUNT(FRONTED_FAILED);
    close(fd);
    mtp_free(c);
    return MTP_EINVAL;
  }
  if (prelen > 0) {
    c->pre = mtp_malloc(prelen);
    if (c->pre == NULL) {
      close(fd);
      mtp_free(c);
      MTP_COUNT(FRONTED_FAILED);
      return MTP_ENOMEM;
    }
    memcpy(c->pre, pre, prelen);
    c->prelen = prelen;
  }

  /* From here on the connection is on the loop and ends through fconn_close. */
  c->state = F_DIAL;
  c->next = f->conns;
  if (f->conns != NULL)
    f->conns->prev = c;
  f->conns = c;
  f->nconns++;
  mtp_metric_add(MTP_M_FRONTED_ACTIVE, 1);
  uv_timer_init(f->loop, &c->timer);
  c->timer.data = c;
  c->refs++;
  int r = uv_tcp_init(f->loop, &c->client.tcp);
  if (r == 0) {
    c->client.tcp.data = c;
    c->client.open = true;
    c->refs++;
    r = uv_tcp_open(&c->client.tcp, fd);
  }
  if (r < 0) {
    close(fd);
    fconn_fail(c, uv_strerror(r));
    return r;
  }
  uv_tcp_nodelay(&c->client.tcp, 1);
  uv_timer_start(&c->timer, on_timer, mtp_config_ms(conf->connect_timeout), 0);

  c->dial.data = c;
  c->dial.log = &c->log;
  c->dial.what = "fronting";
  r = mtp_dial_start(&c->dial, f->loop, &c->target.tcp, on_dialled, skip_self);
  if (r < 0) {
    char why[128];
    snprintf(why, sizeof(why), "cannot resolve: %s", uv_strerror(r));
    fconn_fail(c, why);
    return r; /* fd belongs to the handle now and is closed with it */
  }
  c->refs++;
  return MTP_OK;
}

void mtp_fronting_stop(struct mtp_fronting *f) {
  if (f == NULL || f->stopping)
    return;
  f->stopping = true;
  /* fconn_close never frees synchronously (handles close later), so the list stays valid. */
  for (struct fconn *c = f->conns; c != NULL; c = c->next)
    fconn_close(c, "proxy stopping", false);
}

void mtp_fronting_free(struct mtp_fronting *f) {
  if (f == NULL)
    return;
  if (f->nconns > 0)
    mtp_log(MTP_LOG_ERROR, "fronting: freed with %zu connections still open", f->nconns);
  if (f->ifaces != NULL)
    uv_free_interface_addresses(f->ifaces, f->nifaces);
  f->ifaces = NULL;
  fconf_free(&f->conf);
  mtp_free(f->rbuf);
  f->rbuf = NULL;
  mtp_free(f);
}
