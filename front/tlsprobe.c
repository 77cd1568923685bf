/*
 * tlsprobe.c - learns the size of the fronted site's encrypted TLS 1.3 server flight (see
 * tlsprobe.h).
 *
 * One probe per domain at a time, on the main loop:
 *
 *   DIAL (shared/dial.c: resolve, then each address in turn) ──► READ ──► CLOSING
 *                                                                    │ ServerHello, CCS,
 *                                                                    │ ApplicationData...
 *                                                                    ▼
 *                      quiet for PROBE_QUIET_MS after a whole ApplicationData record,
 *                      the peer closed there, or the flight reached the largest size we use
 *                          = success: remember the sum of the ApplicationData payloads
 *
 * One timer per probe: the connect deadline (cfg->fronting_connect_timeout), then the same
 * span as a read deadline re-armed on every read, then the short quiet timer once a flight
 * record has arrived. We never send our Finished, so a TLS 1.3 server says nothing after
 * its first flight: the silence marks the end. The records are not decrypted.
 *
 * Worker threads only read, and take no lock: the domains, their learnt sizes (atomics) and
 * the fixed size live in a table published through an atomic pointer. A reload builds a new
 * table (learnt sizes of kept domains copied over: every write to them is on the main loop,
 * as is the reload), publishes it with a release store and keeps the old one on a retired
 * list, because a worker may still be looking at it; mtp_tlsprobe_reclaim frees the retired
 * tables once the caller knows every worker has been back to its loop since (cmd/reload.c:
 * after every worker ran the reload's call). The settings the probes use (target, timeouts,
 * interval) are copies that only the main loop reads. A probe points at its domain's entry in
 * the current table; a reload moves it to the new table's entry, or detaches it (closing it,
 * its result dropped) when its domain is gone, the target changed or nothing is to be learnt.
 */
#include "tlsprobe.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "dial.h"
#include "err.h"
#include "faketls.h"
#include "log.h"
#include "metrics.h"

#include "banned.h"

/* The first flight is over when nothing arrives for this long after an ApplicationData record. */
#define PROBE_QUIET_MS 400
/* A random flight size until one is learnt: the range real certificate chains fall in. */
#define FLIGHT_RANDOM_MIN 2500
#define FLIGHT_RANDOM_MAX 4600

enum probe_state {
  P_DIAL,    /* resolving the target and connecting to it (q->dial; connect deadline) */
  P_READ,    /* hello sent; reading the server's records (read deadline, then quiet timer) */
  P_CLOSING, /* handles closing; the last callback frees the probe */
};

struct pdomain {
  char *name;            /* owns: lower-cased domain */
  _Atomic size_t learnt; /* the last learnt flight size; 0 = none yet (written on the main loop) */
  struct probe *running; /* borrows: the probe in flight or NULL (main thread only) */
};

/* What workers read. Immutable once published, except the learnt sizes and running. */
struct dtable {
  size_t fixed;          /* tls_flight_size, clamped; 0 = learn or draw */
  struct dtable *retired_next; /* main thread: the retired list */
  size_t n;
  struct pdomain d[];
};

struct probe {
  struct mtp_tlsprobe *p; /* borrows */
  struct pdomain *d;      /* borrows: its domain in the current table; NULL once detached */
  enum probe_state state;
  struct mtp_dial dial; /* the target (host, port); tcp is its handle until connected */
  uv_write_t write_req;
  uv_tcp_t tcp;
  uv_timer_t timer;
  int refs;      /* open handles + the running dial */
  bool tcp_open; /* tcp connected (ours) and not yet uv_close'd */
  /* the record reader */
  uint8_t hdr[MTP_FAKETLS_RECORD_HEADER];
  size_t hdr_got; /* header bytes of the current record so far */
  size_t left;    /* payload bytes of the current record still to come */
  bool seen_server_hello;
  size_t nappdata; /* ApplicationData records complete */
  size_t flight;   /* the sum of their payload lengths */
  size_t hello_len;
  uint8_t hello[MTP_FAKETLS_CLIENT_HELLO_MAX];
  uint8_t rbuf[16 * 1024];
};

struct mtp_tlsprobe {
  uv_loop_t *loop; /* borrows */
  /* The settings in force (copies; main loop only). */
  enum mtp_fronting_mode mode;
  char *fronting_host; /* owns; NULL = none */
  uint16_t fronting_port;
  double connect_timeout;
  double interval;
  _Atomic(struct dtable *) table; /* owns: the published table (never NULL after setup) */
  struct dtable *retired;         /* owns: tables replaced by reloads, until reclaim */
  size_t nretired;
  uv_timer_t timer; /* every tls_probe_interval while probes are wanted */
  bool timer_open;  /* initialised and not closed */
  bool timer_on;    /* started */
  size_t nprobes;   /* probes not yet freed */
  bool stopping;
};

/* The published table; on the main loop it is also the current one. */
static struct dtable *cur_table(const struct mtp_tlsprobe *p) {
  return atomic_load_explicit(&((struct mtp_tlsprobe *)p)->table, memory_order_acquire);
}

static void on_handle_closed(uv_handle_t *h);

static size_t clamp_flight(size_t n) {
  if (n < 1)
    return 1;
  return n > MTP_FAKETLS_MAX_PAYLOAD ? MTP_FAKETLS_MAX_PAYLOAD : n;
}

/* ---- probe lifetime ---- */

static void probe_free(struct probe *q) {
  struct mtp_tlsprobe *p = q->p;
  if (q->d != NULL && q->d->running == q)
    q->d->running = NULL;
  p->nprobes--;
  mtp_free(q);
}

static void maybe_free(struct probe *q) {
  if (q->state == P_CLOSING && q->refs == 0)
    probe_free(q);
}

static void probe_close(struct probe *q) {
  if (q->state == P_CLOSING)
    return;
  q->state = P_CLOSING;
  mtp_dial_cancel(&q->dial);
  if (q->tcp_open) {
    q->tcp_open = false;
    uv_close((uv_handle_t *)&q->tcp, on_handle_closed);
  }
  uv_close((uv_handle_t *)&q->timer, on_handle_closed);
}

static void probe_fail(struct probe *q, const char *why) {
  if (q->state == P_CLOSING)
    return;
  MTP_COUNT(TLS_PROBE_FAIL);
  mtp_log(MTP_LOG_WARN, "tls probe %s via %s failed: %s", q->d->name, q->dial.hostport, why);
  probe_close(q);
}

static void probe_done(struct probe *q) {
  size_t n = clamp_flight(q->flight);
  atomic_store_explicit(&q->d->learnt, n, memory_order_relaxed);
  MTP_COUNT(TLS_PROBE_OK);
  mtp_log(MTP_LOG_INFO, "tls probe %s via %s: flight %zu bytes", q->d->name, q->dial.hostport, n);
  probe_close(q);
}

static void on_handle_closed(uv_handle_t *h) {
  struct probe *q = h->data;
  q->refs--;
  maybe_free(q);
}

/* ---- reading the server's flight ---- */

/* No record is partially read (hdr_got is reset when a record's last payload byte arrives). */
static bool at_record_boundary(const struct probe *q) { return q->hdr_got == 0; }

/* Checks a complete record header; MTP_EPROTO with *why when it cannot be part of a TLS 1.3
 * server's first flight. */
static int check_header(struct probe *q, const char **why) {
  size_t rlen = ((size_t)q->hdr[3] << 8) | q->hdr[4];
  if (q->hdr[1] != 0x03 || rlen > MTP_FAKETLS_MAX_RECORD_PAYLOAD) {
    *why = "not a TLS record";
    return MTP_EPROTO;
  }
  switch (q->hdr[0]) {
  case 0x16: /* handshake: in TLS 1.3 only the ServerHello comes in the clear */
    if (q->seen_server_hello) {
      *why = "no TLS 1.3 (a plaintext handshake record after the ServerHello)";
      return MTP_EPROTO;
    }
    q->seen_server_hello = true;
    break;
  case 0x14: /* ChangeCipherSpec (middlebox compatibility) */
  case 0x17: /* the encrypted flight: EncryptedExtensions, Certificate, CertificateVerify, Finished */
    if (!q->seen_server_hello) {
      *why = "no ServerHello first";
      return MTP_EPROTO;
    }
    if (q->hdr[0] == 0x17)
      q->flight += rlen;
    break;
  case 0x15:
    *why = "the server sent an alert";
    return MTP_EPROTO;
  default:
    *why = "unexpected TLS record type";
    return MTP_EPROTO;
  }
  q->left = rlen;
  return MTP_OK;
}

/* A record is complete: counts it; 1 when the flight has reached the largest size we use. */
static int record_end(struct probe *q) {
  if (q->hdr[0] == 0x17)
    q->nappdata++;
  q->hdr_got = 0;
  return q->flight >= MTP_FAKETLS_MAX_PAYLOAD ? 1 : MTP_OK;
}

/*
 * Feeds the server's bytes (any split). Returns MTP_OK (keep reading), 1 (the flight is
 * complete) or MTP_EPROTO with *why set (not a TLS 1.3 server flight).
 */
static int feed_records(struct probe *q, const uint8_t *in, size_t len, const char **why) {
  while (len > 0) {
    if (q->hdr_got < MTP_FAKETLS_RECORD_HEADER) {
      size_t k = MTP_FAKETLS_RECORD_HEADER - q->hdr_got;
      if (k > len)
        k = len;
      memcpy(q->hdr + q->hdr_got, in, k);
      q->hdr_got += k;
      in += k;
      len -= k;
      if (q->hdr_got < MTP_FAKETLS_RECORD_HEADER)
        break;
      int r = check_header(q, why);
      if (r == MTP_OK && q->left == 0)
        r = record_end(q);
      if (r != MTP_OK)
        return r;
      continue;
    }
    size_t k = len < q->left ? len : q->left;
    q->left -= k;
    in += k;
    len -= k;
    if (q->left == 0) {
      int r = record_end(q);
      if (r != MTP_OK)
        return r;
    }
  }
  return MTP_OK;
}

static void on_timer(uv_timer_t *t) {
  struct probe *q = t->data;
  switch (q->state) {
  case P_DIAL:
    probe_fail(q, "connect timed out");
    return;
  case P_READ:
    if (q->nappdata > 0 && at_record_boundary(q))
      probe_done(q);
    else
      probe_fail(q, "timed out waiting for the server's flight");
    return;
  case P_CLOSING:
    return;
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct probe *q = h->data;
  *buf = uv_buf_init((char *)q->rbuf, sizeof(q->rbuf));
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct probe *q = stream->data;
  if (q->state != P_READ || nread == 0)
    return;
  if (nread < 0) {
    if (nread == UV_EOF && q->nappdata > 0 && at_record_boundary(q)) {
      probe_done(q);
      return;
    }
    char why[96];
    snprintf(why, sizeof(why), "%s before the end of the flight", nread == UV_EOF ? "closed" : uv_strerror((int)nread));
    probe_fail(q, why);
    return;
  }
  const char *why = NULL;
  int r = feed_records(q, (const uint8_t *)buf->base, (size_t)nread, &why);
  if (r < 0) {
    probe_fail(q, why);
    return;
  }
  if (r == 1) {
    probe_done(q);
    return;
  }
  uv_timer_stop(&q->timer);
  if (q->nappdata > 0 && at_record_boundary(q))
    uv_timer_start(&q->timer, on_timer, PROBE_QUIET_MS, 0);
  else
    uv_timer_start(&q->timer, on_timer, mtp_config_ms(q->p->connect_timeout), 0);
}

/* ---- connect and send the hello ---- */

static void on_hello_written(uv_write_t *req, int status) {
  struct probe *q = req->data;
  if (q->state != P_READ || status >= 0)
    return;
  char why[96];
  snprintf(why, sizeof(why), "sending the ClientHello: %s", uv_strerror(status));
  probe_fail(q, why);
}

/* The dial is over: connected (the hello goes out), failed or cancelled (probe_close). */
static void on_dialled(struct mtp_dial *dial, int status, const char *why) {
  struct probe *q = dial->data;
  q->refs--;
  if (q->state != P_DIAL) {
    maybe_free(q);
    return;
  }
  if (status < 0) {
    probe_fail(q, why);
    return;
  }
  q->tcp_open = true;
  q->refs++;
  q->state = P_READ;
  uint8_t secret[16];
  int n = mtp_random(secret, sizeof(secret));
  if (n == MTP_OK)
    n = mtp_faketls_client_hello(secret, q->d->name, (uint32_t)time(NULL), MTP_FAKETLS_KIND_CLASSIC, q->hello,
                                 sizeof(q->hello));
  if (n < 0) {
    probe_fail(q, mtp_strerror(n));
    return;
  }
  q->hello_len = (size_t)n;
  uv_buf_t b = uv_buf_init((char *)q->hello, (unsigned)q->hello_len);
  q->write_req.data = q;
  int r = uv_write(&q->write_req, (uv_stream_t *)&q->tcp, &b, 1, on_hello_written);
  if (r == 0)
    r = uv_read_start((uv_stream_t *)&q->tcp, on_alloc, on_read);
  if (r < 0) {
    probe_fail(q, uv_strerror(r));
    return;
  }
  uv_timer_stop(&q->timer);
  uv_timer_start(&q->timer, on_timer, mtp_config_ms(q->p->connect_timeout), 0);
}

/* Starts a probe of domain d (an entry of the current table) unless one is still running. */
static void probe_start(struct mtp_tlsprobe *p, struct pdomain *d) {
  if (d->running != NULL || p->stopping)
    return;
  struct probe *q = mtp_calloc(1, sizeof(*q));
  if (q == NULL) {
    MTP_COUNT(TLS_PROBE_FAIL);
    mtp_log(MTP_LOG_WARN, "tls probe %s: out of memory", d->name);
    return;
  }
  q->p = p;
  q->d = d;
  bool sni_mode = p->mode == MTP_FRONTING_SNI;
  if (!mtp_dial_set_target(&q->dial, sni_mode ? d->name : p->fronting_host, sni_mode ? 443 : p->fronting_port)) {
    MTP_COUNT(TLS_PROBE_FAIL);
    mtp_log(MTP_LOG_WARN, "tls probe %s: no fronting host to probe", d->name);
    mtp_free(q);
    return;
  }
  d->running = q;
  p->nprobes++;
  q->state = P_DIAL;
  uv_timer_init(p->loop, &q->timer);
  q->timer.data = q;
  q->refs++;
  uv_timer_start(&q->timer, on_timer, mtp_config_ms(p->connect_timeout), 0);
  q->dial.data = q;
  int r = mtp_dial_start(&q->dial, p->loop, &q->tcp, on_dialled, NULL);
  if (r < 0) {
    char why[128];
    snprintf(why, sizeof(why), "cannot resolve: %s", uv_strerror(r));
    probe_fail(q, why);
    return;
  }
  q->refs++;
}

static void probe_all(struct mtp_tlsprobe *p) {
  struct dtable *t = cur_table(p);
  for (size_t i = 0; i < t->n; i++)
    probe_start(p, &t->d[i]);
}

static void on_interval(uv_timer_t *t) { probe_all(t->data); }

/* Closes d's running probe, if any, and forgets it: its result is dropped. */
static void probe_detach(struct pdomain *d) {
  struct probe *q = d->running;
  if (q == NULL)
    return;
  d->running = NULL;
  q->d = NULL;
  probe_close(q);
}

/* ---- domain tables ---- */

static struct pdomain *table_find(struct dtable *t, const char *domain) {
  if (t == NULL || domain == NULL)
    return NULL;
  for (size_t i = 0; i < t->n; i++)
    if (strcmp(t->d[i].name, domain) == 0)
      return &t->d[i];
  return NULL;
}

static void table_free(struct dtable *t) {
  if (t == NULL)
    return;
  for (size_t i = 0; i < t->n; i++)
    mtp_free(t->d[i].name);
  mtp_free(t);
}

static int table_add(struct dtable *t, const char *name, const struct dtable *old) {
  if (name == NULL || name[0] == '\0' || table_find(t, name) != NULL)
    return MTP_OK;
  char *copy = mtp_strdup(name);
  if (copy == NULL)
    return MTP_ENOMEM;
  struct pdomain *d = &t->d[t->n++];
  d->name = copy;
  const struct pdomain *was = table_find((struct dtable *)old, name);
  atomic_init(&d->learnt, was != NULL ? atomic_load_explicit(&was->learnt, memory_order_relaxed) : 0);
  d->running = NULL;
  return MTP_OK;
}

/* A table for cfg's fake-TLS domains (global and per listener, each once) with the learnt
 * sizes old has for them; NULL when out of memory. Main thread. */
static struct dtable *table_make(const struct mtp_config *cfg, const struct dtable *old) {
  size_t max = cfg->ntls_domains;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    max += cfg->listeners[i].ntls_domains;
  struct dtable *t = mtp_calloc(1, sizeof(*t) + max * sizeof(t->d[0]));
  if (t == NULL)
    return NULL;
  t->fixed = cfg->tls_flight_size > 0 ? clamp_flight(cfg->tls_flight_size) : 0;
  int r = MTP_OK;
  for (size_t i = 0; i < cfg->ntls_domains && r == MTP_OK; i++)
    r = table_add(t, cfg->tls_domains[i], old);
  for (size_t i = 0; i < cfg->nlisteners && r == MTP_OK; i++)
    for (size_t k = 0; k < cfg->listeners[i].ntls_domains && r == MTP_OK; k++)
      r = table_add(t, cfg->listeners[i].tls_domains[k], old);
  if (r != MTP_OK) {
    table_free(t);
    return NULL;
  }
  return t;
}

static bool str_eq(const char *a, const char *b) { return a == NULL || b == NULL ? a == b : strcmp(a, b) == 0; }

static void on_timer_closed(uv_handle_t *h) { (void)h; }

/* Probes are wanted when there is a site to imitate (fronting on), the size is not fixed and
 * there are domains. */
static bool wants_probes(const struct mtp_tlsprobe *p, const struct dtable *t) {
  return p->mode != MTP_FRONTING_OFF && t->fixed == 0 && t->n > 0;
}

/* ---- public ---- */

int mtp_tlsprobe_reconfigure(struct mtp_tlsprobe *p, const struct mtp_config *cfg) {
  struct dtable *old = cur_table(p);
  struct dtable *t = table_make(cfg, old);
  char *host = NULL;
  if (t == NULL || (cfg->fronting_host != NULL && (host = mtp_strdup(cfg->fronting_host)) == NULL)) {
    table_free(t);
    return MTP_ENOMEM;
  }
  bool target_changed = old == NULL || p->mode != cfg->fronting_mode || !str_eq(p->fronting_host, host) ||
                        p->fronting_port != cfg->fronting_port;
  double old_interval = p->interval;
  mtp_free(p->fronting_host);
  p->fronting_host = host;
  p->mode = cfg->fronting_mode;
  p->fronting_port = cfg->fronting_port;
  p->connect_timeout = cfg->fronting_connect_timeout;
  p->interval = cfg->tls_probe_interval;
  bool want = wants_probes(p, t);

  /* Running probes move to the new table, or are dropped: their domain is gone, their target
   * changed, or nothing is to be learnt any more. */
  for (size_t i = 0; old != NULL && i < old->n; i++) {
    struct pdomain *d = &old->d[i];
    struct pdomain *nd = table_find(t, d->name);
    if (d->running == NULL)
      continue;
    if (nd == NULL || target_changed || !want) {
      probe_detach(d);
      continue;
    }
    nd->running = d->running;
    nd->running->d = nd;
    d->running = NULL;
  }

  /* Publish; workers may still be reading old: it waits on the retired list. */
  atomic_store_explicit(&p->table, t, memory_order_release);
  if (old != NULL) {
    old->retired_next = p->retired;
    p->retired = old;
    p->nretired++;
  }

  if (p->stopping)
    return MTP_OK;
  if (!want) {
    if (p->timer_on)
      uv_timer_stop(&p->timer);
    p->timer_on = false;
    return MTP_OK;
  }
  if (!p->timer_open) {
    uv_timer_init(p->loop, &p->timer);
    p->timer.data = p;
    p->timer_open = true;
  }
  if (!p->timer_on || old_interval != p->interval) {
    uint64_t every = mtp_config_ms(p->interval);
    uv_timer_start(&p->timer, on_interval, every, every);
    p->timer_on = true;
  }
  /* At once: every domain when the target is new (the start included), else the domains
   * nothing is known about yet (added by this reload, or whose probes failed so far). */
  for (size_t i = 0; i < t->n; i++)
    if (target_changed || atomic_load_explicit(&t->d[i].learnt, memory_order_relaxed) == 0)
      probe_start(p, &t->d[i]);
  return MTP_OK;
}

void mtp_tlsprobe_reclaim(struct mtp_tlsprobe *p) {
  if (p == NULL)
    return;
  while (p->retired != NULL) {
    struct dtable *t = p->retired;
    p->retired = t->retired_next;
    table_free(t);
  }
  p->nretired = 0;
}

size_t mtp_tlsprobe_nretired(const struct mtp_tlsprobe *p) { return p != NULL ? p->nretired : 0; }

int mtp_tlsprobe_setup(struct mtp_tlsprobe **out, const struct mtp_config *cfg, uv_loop_t *main_loop) {
  *out = NULL;
  struct mtp_tlsprobe *p = mtp_calloc(1, sizeof(*p));
  if (p == NULL)
    return MTP_ENOMEM;
  p->loop = main_loop;
  atomic_init(&p->table, NULL);
  int r = mtp_tlsprobe_reconfigure(p, cfg);
  if (r != MTP_OK) {
    mtp_free(p);
    return r;
  }
  *out = p;
  return MTP_OK;
}

size_t mtp_tlsprobe_flight_size(struct mtp_tlsprobe *p, const char *domain) {
  struct dtable *t = p != NULL ? cur_table(p) : NULL;
  if (t != NULL && t->fixed > 0)
    return t->fixed;
  const struct pdomain *d = table_find(t, domain);
  if (d != NULL) {
    size_t n = atomic_load_explicit(&d->learnt, memory_order_relaxed);
    if (n > 0)
      return n;
  }
  return FLIGHT_RANDOM_MIN + mtp_random_below(FLIGHT_RANDOM_MAX - FLIGHT_RANDOM_MIN + 1);
}

size_t mtp_tlsprobe_learnt(struct mtp_tlsprobe *p, const char *domain) {
  const struct pdomain *d = table_find(p != NULL ? cur_table(p) : NULL, domain);
  return d != NULL ? atomic_load_explicit(&d->learnt, memory_order_relaxed) : 0;
}

void mtp_tlsprobe_stop(struct mtp_tlsprobe *p) {
  if (p == NULL || p->stopping)
    return;
  p->stopping = true;
  if (p->timer_open) {
    p->timer_open = false;
    p->timer_on = false;
    uv_close((uv_handle_t *)&p->timer, on_timer_closed);
  }
  struct dtable *t = cur_table(p);
  for (size_t i = 0; i < t->n; i++)
    if (t->d[i].running != NULL)
      probe_close(t->d[i].running);
}

void mtp_tlsprobe_free(struct mtp_tlsprobe *p) {
  if (p == NULL)
    return;
  if (p->nprobes > 0)
    mtp_log(MTP_LOG_ERROR, "tls probe: freed with %zu probes still running", p->nprobes);
  mtp_tlsprobe_reclaim(p);
  table_free(cur_table(p));
  mtp_free(p->fronting_host);
  mtp_free(p);
}
