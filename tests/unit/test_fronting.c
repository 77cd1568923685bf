/*
 * test_fronting.c - domain fronting (front/fronting.c) on a libuv loop run by the test itself.
 *
 * Everything lives on one loop: "target" TCP servers written here (echo, banner + half-close,
 * a sink and a source with a stall switch for backpressure), and a "client" that is one end of
 * a real loopback TCP pair whose other end is handed to mtp_fronting_start, as a session would.
 * Memory held by fronting is measured through a counting mtp allocator (the test's own
 * buffers use plain malloc and are not counted).
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <uv.h>

#include "alloc.h"
#include "config.h"
#include "err.h"
#include "front.h"
#include "fronting.h"
#include "log.h"
#include "metrics.h"
#include "check.h"

#define BIG (8u * 1024u * 1024u)
#define WAIT_MS 10000

/* ---- counting allocator: bytes fronting holds ---- */

static atomic_size_t mem_in_use, mem_peak;

static void mem_add(size_t n) {
  size_t now = atomic_fetch_add(&mem_in_use, n) + n;
  size_t p = atomic_load(&mem_peak);
  while (now > p && !atomic_compare_exchange_weak(&mem_peak, &p, now))
    ;
}

static void *t_malloc(size_t n) {
  size_t *p = malloc(n + 16);
  if (p == NULL)
    return NULL;
  p[0] = n;
  mem_add(n);
  return (char *)p + 16;
}

static void t_free(void *q) {
  if (q == NULL)
    return;
  size_t *p = (size_t *)((char *)q - 16);
  atomic_fetch_sub(&mem_in_use, p[0]);
  free(p);
}

static void *t_calloc(size_t k, size_t n) {
  if (n != 0 && k > SIZE_MAX / n)
    return NULL;
  void *q = t_malloc(k * n);
  if (q != NULL)
    memset(q, 0, k * n);
  return q;
}

static void *t_realloc(void *q, size_t n) {
  if (q == NULL)
    return t_malloc(n);
  size_t old = ((size_t *)((char *)q - 16))[0];
  void *r = t_malloc(n);
  if (r == NULL)
    return NULL;
  memcpy(r, q, old < n ? old : n);
  t_free(q);
  return r;
}

/* ---- common ---- */

static uv_loop_t loop;
static struct mtp_config cfg;
static struct mtp_front_shared shared;

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

static uint8_t pattern_at(uint64_t i) { return (uint8_t)(i * 131u + (i >> 11) + 7u); }

static uint8_t *pattern_buf(size_t n) {
  uint8_t *b = malloc(n);
  CHECK(b != NULL);
  for (size_t i = 0; i < n; i++)
    b[i] = pattern_at(i);
  return b;
}

static void on_closed_nop(uv_handle_t *h) { (void)h; }

/* A connected loopback TCP pair: *cfd is the test's client end, *sfd the "proxy's" end. */
static void tcp_pair(int family, int *cfd, int *sfd) {
  struct sockaddr_storage a;
  memset(&a, 0, sizeof(a));
  socklen_t alen;
  if (family == AF_INET6) {
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&a;
    a6->sin6_family = AF_INET6;
    a6->sin6_addr = in6addr_loopback;
    alen = sizeof(*a6);
  } else {
    struct sockaddr_in *a4 = (struct sockaddr_in *)&a;
    a4->sin_family = AF_INET;
    a4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    alen = sizeof(*a4);
  }
  int l = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(l >= 0);
  CHECK(bind(l, (struct sockaddr *)&a, alen) == 0);
  CHECK(listen(l, 4) == 0);
  CHECK(getsockname(l, (struct sockaddr *)&a, &alen) == 0);
  int c = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(c >= 0);
  CHECK(connect(c, (struct sockaddr *)&a, alen) == 0);
  int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
  CHECK(s >= 0);
  close(l);
  *cfd = c;
  *sfd = s;
}

/* ---- targets ---- */

enum tmode {
  T_ECHO,   /* echoes; EOF -> shutdown */
  T_BANNER, /* sends BANNER and shuts down at once; records what it gets until EOF, then closes */
  T_SINK,   /* records/verifies what arrives against the pattern; EOF -> close */
  T_SOURCE, /* sends BIG pattern bytes, then shuts down; EOF -> close */
};

#define BANNER "220 banner from the target\r\n"

/* What one end of a test connection has received. */
struct rx {
  uint8_t head[4096]; /* the first bytes */
  size_t headlen;
  uint64_t nread;  /* every byte */
  bool verify_bad; /* with verify: a byte differed from the pattern */
};

/* Counts data[0..k), keeps what fits in head, and with verify checks it against the pattern
 * at its offset in the stream. */
static void rx_add(struct rx *r, bool verify, const char *data, size_t k) {
  if (r->headlen < sizeof(r->head)) {
    size_t c = sizeof(r->head) - r->headlen;
    if (c > k)
      c = k;
    memcpy(r->head + r->headlen, data, c);
    r->headlen += c;
  }
  if (verify)
    for (size_t i = 0; i < k; i++)
      if ((uint8_t)data[i] != pattern_at(r->nread + i))
        r->verify_bad = true;
  r->nread += k;
}

struct tconn;

struct target {
  uv_tcp_t srv;
  enum tmode mode;
  struct sockaddr_storage addr; /* bound, with port */
  uint16_t port;
  int accepted;
  struct tconn *last; /* the latest connection */
  bool stall;         /* sink: do not read while set */
};

struct tconn {
  uv_tcp_t tcp;
  struct target *t;
  struct rx rx; /* verified in T_SINK mode */
  bool eof;
  bool closed;
  bool reading;
  uint8_t *src; /* source: the bytes being sent (malloc) */
};

static void tconn_closed(uv_handle_t *h) {
  struct tconn *tc = h->data;
  tc->closed = true;
  free(tc->src);
  tc->src = NULL;
  /* the struct stays for the test to inspect; freed with the target */
}

static void tconn_close(struct tconn *tc) {
  if (!uv_is_closing((uv_handle_t *)&tc->tcp))
    uv_close((uv_handle_t *)&tc->tcp, tconn_closed);
}

static void t_alloc(uv_handle_t *h, size_t s, uv_buf_t *b) {
  b->base = malloc(65536);
  b->len = 65536;
}

struct twrite {
  uv_write_t req;
  char *data;
};

static void on_twritten(uv_write_t *req, int status) {
  struct twrite *w = (struct twrite *)req;
  free(w->data);
  free(w);
}

static void on_tshutdown(uv_shutdown_t *req, int status) { free(req); }

static void tconn_shutdown(struct tconn *tc) {
  uv_shutdown_t *req = malloc(sizeof(*req));
  CHECK(req != NULL);
  if (uv_shutdown(req, (uv_stream_t *)&tc->tcp, on_tshutdown) != 0)
    free(req);
}

static void t_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  struct tconn *tc = s->data;
  if (n > 0) {
    size_t k = (size_t)n;
    rx_add(&tc->rx, tc->t->mode == T_SINK, b->base, k);
    if (tc->t->mode == T_ECHO) {
      struct twrite *w = malloc(sizeof(*w));
      CHECK(w != NULL);
      w->data = b->base;
      uv_buf_t wb = uv_buf_init(b->base, (unsigned)k);
      CHECK(uv_write(&w->req, s, &wb, 1, on_twritten) == 0);
      return; /* the buffer went to the write */
    }
  } else if (n < 0) {
    tc->eof = true;
    uv_read_stop(s);
    tc->reading = false;
    if (tc->t->mode == T_ECHO && n == UV_EOF)
      tconn_shutdown(tc);
    else
      tconn_close(tc);
  }
  free(b->base);
}

static void tconn_update_reading(struct tconn *tc) {
  bool want = !tc->eof && !tc->closed && !(tc->t->mode == T_SINK && tc->t->stall);
  if (want && !tc->reading) {
    CHECK(uv_read_start((uv_stream_t *)&tc->tcp, t_alloc, t_read) == 0);
    tc->reading = true;
  } else if (!want && tc->reading) {
    uv_read_stop((uv_stream_t *)&tc->tcp);
    tc->reading = false;
  }
}

static void t_on_conn(uv_stream_t *srv, int status) {
  struct target *t = srv->data;
  CHECK(status == 0);
  struct tconn *tc = calloc(1, sizeof(*tc));
  CHECK(tc != NULL);
  tc->t = t;
  CHECK(uv_tcp_init(&loop, &tc->tcp) == 0);
  tc->tcp.data = tc;
  CHECK(uv_accept(srv, (uv_stream_t *)&tc->tcp) == 0);
  free(t->last); /* only the latest one is kept; earlier ones must be closed by now */
  t->last = tc;
  t->accepted++;
  if (t->mode == T_BANNER) {
    struct twrite *w = malloc(sizeof(*w));
    CHECK(w != NULL);
    w->data = strdup(BANNER);
    uv_buf_t wb = uv_buf_init(w->data, (unsigned)strlen(BANNER));
    CHECK(uv_write(&w->req, (uv_stream_t *)&tc->tcp, &wb, 1, on_twritten) == 0);
    tconn_shutdown(tc);
  }
  if (t->mode == T_SOURCE) {
    tc->src = pattern_buf(BIG);
    struct twrite *w = malloc(sizeof(*w));
    CHECK(w != NULL);
    w->data = NULL; /* tc->src is freed with tc */
    uv_buf_t wb = uv_buf_init((char *)tc->src, BIG);
    CHECK(uv_write(&w->req, (uv_stream_t *)&tc->tcp, &wb, 1, on_twritten) == 0);
    tconn_shutdown(tc);
  }
  tconn_update_reading(tc);
}

static void target_start(struct target *t, enum tmode mode, const char *ip) {
  memset(t, 0, sizeof(*t));
  t->mode = mode;
  CHECK(uv_tcp_init(&loop, &t->srv) == 0);
  t->srv.data = t;
  if (strchr(ip, ':') != NULL)
    CHECK(uv_ip6_addr(ip, 0, (struct sockaddr_in6 *)&t->addr) == 0);
  else
    CHECK(uv_ip4_addr(ip, 0, (struct sockaddr_in *)&t->addr) == 0);
  CHECK(uv_tcp_bind(&t->srv, (struct sockaddr *)&t->addr, 0) == 0);
  CHECK(uv_listen((uv_stream_t *)&t->srv, 16, t_on_conn) == 0);
  int alen = sizeof(t->addr);
  CHECK(uv_tcp_getsockname(&t->srv, (struct sockaddr *)&t->addr, &alen) == 0);
  t->port = ntohs(t->addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&t->addr)->sin6_port
                                                : ((struct sockaddr_in *)&t->addr)->sin_port);
}

static bool pred_target_done(void *arg) {
  struct target *t = arg;
  return t->last == NULL || t->last->closed;
}

static void target_stop(struct target *t) {
  if (t->last != NULL) {
    tconn_close(t->last);
    CHECK(check_run_until(&loop, pred_target_done, t, WAIT_MS));
    free(t->last);
    t->last = NULL;
  }
  uv_close((uv_handle_t *)&t->srv, on_closed_nop);
  uv_run(&loop, UV_RUN_NOWAIT);
}

static void target_set_stall(struct target *t, bool stall) {
  t->stall = stall;
  if (t->last != NULL && !t->last->closed)
    tconn_update_reading(t->last);
}

/* ---- the client ---- */

struct client {
  uv_tcp_t tcp;
  struct rx rx;
  bool verify; /* check received bytes against the pattern */
  bool eof; /* EOF or an error */
  int err;  /* the read error (UV_EOF for a clean end) */
  bool stall;
  bool reading;
  bool closed;
  uint8_t *src; /* what it is sending (malloc) */
  int writes_pending;
};

static void c_alloc(uv_handle_t *h, size_t s, uv_buf_t *b) {
  static char buf[65536];
  b->base = buf;
  b->len = sizeof(buf);
}

static void c_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  struct client *c = s->data;
  if (n > 0) {
    rx_add(&c->rx, c->verify, b->base, (size_t)n);
  } else if (n < 0) {
    c->eof = true;
    c->err = (int)n;
    uv_read_stop(s);
    c->reading = false;
  }
}

static void client_update_reading(struct client *c) {
  bool want = !c->eof && !c->stall && !c->closed;
  if (want && !c->reading) {
    CHECK(uv_read_start((uv_stream_t *)&c->tcp, c_alloc, c_read) == 0);
    c->reading = true;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
  }
}

static void client_open(struct client *c, int fd) {
  memset(c, 0, sizeof(*c));
  CHECK(uv_tcp_init(&loop, &c->tcp) == 0);
  c->tcp.data = c;
  CHECK(uv_tcp_open(&c->tcp, fd) == 0);
  client_update_reading(c);
}

static void on_cwritten(uv_write_t *req, int status) {
  struct client *c = req->data;
  c->writes_pending--;
  free(req);
}

static void client_write(struct client *c, const void *data, size_t len) {
  uv_write_t *req = malloc(sizeof(*req));
  CHECK(req != NULL);
  req->data = c;
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  CHECK(uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, on_cwritten) == 0);
  c->writes_pending++;
}

static void on_cshutdown(uv_shutdown_t *req, int status) { free(req); }

static void client_shutdown(struct client *c) {
  uv_shutdown_t *req = malloc(sizeof(*req));
  CHECK(req != NULL);
  CHECK(uv_shutdown(req, (uv_stream_t *)&c->tcp, on_cshutdown) == 0);
}

static void c_closed(uv_handle_t *h) {
  struct client *c = h->data;
  c->closed = true;
}

static bool pred_client_closed(void *arg) { return ((struct client *)arg)->closed; }

static void client_close(struct client *c) {
  c->reading = false;
  uv_close((uv_handle_t *)&c->tcp, c_closed);
  CHECK(check_run_until(&loop, pred_client_closed, c, WAIT_MS));
  free(c->src);
  c->src = NULL;
}

/* ---- predicates ---- */

struct want_bytes {
  struct client *c;
  uint64_t n;
};
static bool pred_client_has(void *arg) {
  struct want_bytes *w = arg;
  return w->c->rx.nread >= w->n;
}
static bool pred_client_eof(void *arg) { return ((struct client *)arg)->eof; }
static bool pred_client_written(void *arg) { return ((struct client *)arg)->writes_pending == 0; }

struct want_target {
  struct target *t;
  uint64_t n;
};
static bool pred_target_has(void *arg) {
  struct want_target *w = arg;
  return w->t->last != NULL && w->t->last->rx.nread >= w->n;
}
static bool pred_target_eof(void *arg) {
  struct target *t = arg;
  return t->last != NULL && t->last->eof;
}
static bool pred_no_fronted(void *arg) { return metric(MTP_M_FRONTED_ACTIVE) == 0; }
static bool pred_mem_at_least(void *arg) { return atomic_load(&mem_in_use) >= *(size_t *)arg; }

/* ---- setup per case ---- */

static struct mtp_fronting *fr;

static void cfg_host(const char *host, uint16_t port) {
  free(cfg.fronting_host);
  cfg.fronting_host = strdup(host);
  cfg.fronting_mode = MTP_FRONTING_HOST;
  cfg.fronting_port = port;
}

static void fronting_new(void) {
  CHECK(mtp_fronting_setup(&fr, &loop, &cfg, &shared) == MTP_OK);
  CHECK(fr != NULL);
}

static void fronting_end(void) {
  mtp_fronting_stop(fr);
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  uv_run(&loop, UV_RUN_NOWAIT);
  mtp_fronting_free(fr);
  fr = NULL;
}

/* A client whose other end is being fronted with pre[0..prelen). */
static void front_client(struct client *c, int family, const char *sni, const void *pre, size_t prelen) {
  int cfd, sfd;
  tcp_pair(family, &cfd, &sfd);
  client_open(c, cfd);
  CHECK(mtp_fronting_start(fr, sfd, sni, pre, prelen, 7, "127.0.0.1:1", "l0") == MTP_OK);
}

/* ---- cases ---- */

#define PRE "\x16\x03\x01\x00\x05hello"

/* The pre-read bytes reach the target first, then both directions echo. */
static void test_pre_and_echo(const char *target_ip, const char *host, int family) {
  struct target t;
  target_start(&t, T_ECHO, target_ip);
  cfg_host(host, t.port);
  fronting_new();
  int64_t total0 = metric(MTP_M_FRONTED_TOTAL), in0 = metric(MTP_M_FRONTED_BYTES_IN),
          out0 = metric(MTP_M_FRONTED_BYTES_OUT);
  struct client c;
  front_client(&c, family, NULL, PRE, sizeof(PRE) - 1);
  client_write(&c, "abc", 3);
  struct want_bytes w = {&c, sizeof(PRE) - 1 + 3};
  CHECK(check_run_until(&loop, pred_client_has, &w, WAIT_MS));
  CHECK(c.rx.headlen == sizeof(PRE) - 1 + 3);
  CHECK(memcmp(c.rx.head, PRE "abc", c.rx.headlen) == 0);
  CHECK(t.last != NULL && t.last->rx.headlen == sizeof(PRE) - 1 + 3);
  CHECK(memcmp(t.last->rx.head, PRE "abc", t.last->rx.headlen) == 0);
  CHECK(metric(MTP_M_FRONTED_TOTAL) == total0 + 1);
  CHECK(metric(MTP_M_FRONTED_ACTIVE) == 1);
  CHECK(metric(MTP_M_FRONTED_BYTES_IN) == in0 + (int64_t)(sizeof(PRE) - 1 + 3));
  CHECK(metric(MTP_M_FRONTED_BYTES_OUT) == out0 + (int64_t)(sizeof(PRE) - 1 + 3));
  /* More both ways, then the client half-closes: the echo target shuts down after echoing,
   * the client sees every byte then EOF, and the fronted connection ends by itself. */
  client_write(&c, "defg", 4);
  client_shutdown(&c);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  CHECK(c.err == UV_EOF);
  CHECK(c.rx.nread == sizeof(PRE) - 1 + 7);
  CHECK(memcmp(c.rx.head, PRE "abcdefg", c.rx.nread) == 0);
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  client_close(&c);
  fronting_end();
  target_stop(&t);
}

/* The target sends a banner and half-closes at once: the client gets the banner and EOF but
 * can still send; the target gets those bytes; then the client's EOF ends it. */
static void test_half_close_from_target(void) {
  struct target t;
  target_start(&t, T_BANNER, "127.0.0.1");
  cfg_host("127.0.0.1", t.port);
  fronting_new();
  struct client c;
  front_client(&c, AF_INET, NULL, NULL, 0);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  CHECK(c.err == UV_EOF);
  CHECK(c.rx.nread == strlen(BANNER) && memcmp(c.rx.head, BANNER, c.rx.nread) == 0);
  CHECK(metric(MTP_M_FRONTED_ACTIVE) == 1); /* the client->target direction is still open */
  client_write(&c, "after-eof", 9);
  struct want_target wt = {&t, 9};
  CHECK(check_run_until(&loop, pred_target_has, &wt, WAIT_MS));
  CHECK(memcmp(t.last->rx.head, "after-eof", 9) == 0);
  CHECK(!t.last->eof);
  client_shutdown(&c);
  CHECK(check_run_until(&loop, pred_target_eof, &t, WAIT_MS));
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  client_close(&c);
  fronting_end();
  target_stop(&t);
}

/* 8 MiB client->target into a stalled target, then target->client into a stalled client:
 * fronting holds a bounded amount meanwhile, and every byte arrives in order. */
static void test_big_bounded(void) {
  /* client -> target */
  struct target t;
  target_start(&t, T_SINK, "127.0.0.1");
  t.stall = true;
  cfg_host("127.0.0.1", t.port);
  fronting_new();
  size_t base = atomic_load(&mem_in_use);
  atomic_store(&mem_peak, base);
  struct client c;
  front_client(&c, AF_INET, NULL, NULL, 0);
  c.src = pattern_buf(BIG);
  client_write(&c, c.src, BIG);
  /* The queue toward the stalled target fills up to the high-water mark ... */
  size_t high = base + 200u * 1024u;
  CHECK(check_run_until(&loop, pred_mem_at_least, &high, WAIT_MS));
  /* ... and no further, however long the client keeps pushing (a broken pause would queue
   * the whole 8 MiB within this window). */
  size_t limit = base + 1024u * 1024u;
  CHECK(!check_run_until(&loop, pred_mem_at_least, &limit, 300));
  target_set_stall(&t, false);
  struct want_target wt = {&t, BIG};
  CHECK(check_run_until(&loop, pred_target_has, &wt, 30000));
  CHECK(!t.last->rx.verify_bad);
  CHECK(check_run_until(&loop, pred_client_written, &c, WAIT_MS));
  CHECK_MSG(atomic_load(&mem_peak) - base < 1024u * 1024u, "peak %zu", atomic_load(&mem_peak) - base);
  client_shutdown(&c);
  CHECK(check_run_until(&loop, pred_target_eof, &t, WAIT_MS));
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  CHECK(t.last->rx.nread == BIG);
  client_close(&c);
  fronting_end();
  target_stop(&t);

  /* target -> client */
  target_start(&t, T_SOURCE, "127.0.0.1");
  cfg_host("127.0.0.1", t.port);
  fronting_new();
  base = atomic_load(&mem_in_use);
  atomic_store(&mem_peak, base);
  front_client(&c, AF_INET, NULL, NULL, 0);
  c.stall = true;
  c.verify = true;
  client_update_reading(&c);
  CHECK(check_run_until(&loop, pred_mem_at_least, &high, WAIT_MS));
  CHECK(!check_run_until(&loop, pred_mem_at_least, &limit, 300));
  c.stall = false;
  client_update_reading(&c);
  CHECK(check_run_until(&loop, pred_client_eof, &c, 30000));
  CHECK(c.err == UV_EOF);
  CHECK(c.rx.nread == BIG);
  CHECK(!c.rx.verify_bad);
  CHECK_MSG(atomic_load(&mem_peak) - base < 1024u * 1024u, "peak %zu", atomic_load(&mem_peak) - base);
  client_shutdown(&c);
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  client_close(&c);
  fronting_end();
  target_stop(&t);
}

/* A closed port: the client is closed and the failure counted. */
static void test_connect_refused(void) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof(a);
  CHECK(bind(s, (struct sockaddr *)&a, alen) == 0);
  CHECK(getsockname(s, (struct sockaddr *)&a, &alen) == 0);
  close(s); /* nobody listens there now */
  cfg_host("127.0.0.1", ntohs(a.sin_port));
  fronting_new();
  int64_t failed0 = metric(MTP_M_FRONTED_FAILED), total0 = metric(MTP_M_FRONTED_TOTAL);
  struct client c;
  front_client(&c, AF_INET, NULL, PRE, sizeof(PRE) - 1);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  CHECK(c.rx.nread == 0);
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  CHECK(metric(MTP_M_FRONTED_FAILED) == failed0 + 1);
  CHECK(metric(MTP_M_FRONTED_TOTAL) == total0);
  client_close(&c);
  fronting_end();
}

/* A target whose accept queue is full drops our SYNs: the connect deadline closes the client. */
static void test_connect_timeout(void) {
  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof(a);
  CHECK(bind(l, (struct sockaddr *)&a, alen) == 0);
  CHECK(listen(l, 0) == 0);
  CHECK(getsockname(l, (struct sockaddr *)&a, &alen) == 0);
  /* Fill the accept queue (backlog 0 holds one) with non-blocking connects nobody accepts. */
  int fill[4];
  for (int i = 0; i < 4; i++) {
    fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(fill[i] >= 0);
    int r = connect(fill[i], (struct sockaddr *)&a, alen);
    CHECK(r == 0 || errno == EINPROGRESS);
  }
  cfg_host("127.0.0.1", ntohs(a.sin_port));
  cfg.fronting_connect_timeout = 0.3;
  fronting_new();
  int64_t failed0 = metric(MTP_M_FRONTED_FAILED);
  struct client c;
  front_client(&c, AF_INET, NULL, PRE, sizeof(PRE) - 1);
  uint64_t t0 = uv_now(&loop);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  uv_update_time(&loop);
  CHECK_MSG(uv_now(&loop) - t0 >= 250, "closed after %llu ms", (unsigned long long)(uv_now(&loop) - t0));
  CHECK(c.rx.nread == 0);
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  CHECK(metric(MTP_M_FRONTED_FAILED) == failed0 + 1);
  client_close(&c);
  fronting_end();
  for (int i = 0; i < 4; i++)
    close(fill[i]);
  close(l);
  cfg.fronting_connect_timeout = 5;
}

/* No bytes either way for fronting_idle_timeout: both ends are closed. */
static void test_idle_timeout(void) {
  struct target t;
  target_start(&t, T_ECHO, "127.0.0.1");
  cfg_host("127.0.0.1", t.port);
  cfg.fronting_idle_timeout = 0.3;
  fronting_new();
  struct client c;
  front_client(&c, AF_INET, NULL, "x", 1);
  struct want_bytes w = {&c, 1};
  CHECK(check_run_until(&loop, pred_client_has, &w, WAIT_MS));
  uv_update_time(&loop);
  uint64_t t0 = uv_now(&loop);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  uv_update_time(&loop);
  CHECK_MSG(uv_now(&loop) - t0 >= 250, "closed after %llu ms", (unsigned long long)(uv_now(&loop) - t0));
  CHECK(check_run_until(&loop, pred_target_eof, &t, WAIT_MS));
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  client_close(&c);
  fronting_end();
  target_stop(&t);
  cfg.fronting_idle_timeout = 120;
}

/* The target is one of our own listeners: refused, never dialled. */
static void test_self_refused(void) {
  struct target t;
  target_start(&t, T_ECHO, "127.0.0.1");
  struct sockaddr_storage bound[1];
  bound[0] = t.addr;
  shared.bound_addrs = bound;
  shared.nbound = 1;
  cfg_host("127.0.0.1", t.port);
  fronting_new();
  int64_t failed0 = metric(MTP_M_FRONTED_FAILED);
  struct client c;
  front_client(&c, AF_INET, NULL, PRE, sizeof(PRE) - 1);
  CHECK(check_run_until(&loop, pred_client_eof, &c, WAIT_MS));
  CHECK(check_run_until(&loop, pred_no_fronted, NULL, WAIT_MS));
  CHECK(metric(MTP_M_FRONTED_FAILED) == failed0 + 1);
  CHECK(t.accepted == 0);
  client_close(&c);
  fronting_end();
  target_stop(&t);
  shared.bound_addrs = NULL;
  shared.nbound = 0;
}

static struct sockaddr_storage sa(const char *ip, uint16_t port) {
  struct sockaddr_storage s;
  memset(&s, 0, sizeof(s));
  if (strchr(ip, ':') != NULL)
    CHECK(uv_ip6_addr(ip, port, (struct sockaddr_in6 *)&s) == 0);
  else
    CHECK(uv_ip4_addr(ip, port, (struct sockaddr_in *)&s) == 0);
  return s;
}

static bool is_self(const char *ip, uint16_t port) {
  struct sockaddr_storage s = sa(ip, port);
  return mtp_fronting_is_self(fr, (struct sockaddr *)&s) != 0;
}

/* The loop check's rules, address by address. */
static void test_is_self_rules(void) {
  /* An interface address of this host other than loopback, if any. */
  char ifip[64] = "";
  uv_interface_address_t *ifs;
  int nifs;
  CHECK(uv_interface_addresses(&ifs, &nifs) == 0);
  for (int i = 0; i < nifs && ifip[0] == '\0'; i++)
    if (!ifs[i].is_internal && ifs[i].address.address4.sin_family == AF_INET)
      uv_ip4_name(&ifs[i].address.address4, ifip, sizeof(ifip));
  uv_free_interface_addresses(ifs, nifs);

  struct sockaddr_storage bound[3] = {sa("0.0.0.0", 443), sa("::", 8443), sa("10.11.12.13", 9443)};
  shared.bound_addrs = bound;
  shared.nbound = 3;
  shared.public_addrs[0] = sa("198.51.100.7", 0);
  shared.npublic = 1;
  fronting_new();
  /* the wildcard IPv4 listener on 443 */
  CHECK(is_self("127.0.0.1", 443));
  CHECK(is_self("127.8.9.10", 443));
  CHECK(is_self("0.0.0.0", 443));
  CHECK(is_self("::ffff:127.0.0.1", 443));
  CHECK(is_self("198.51.100.7", 443)); /* public address */
  if (ifip[0] != '\0')
    CHECK(is_self(ifip, 443));
  CHECK(!is_self("127.0.0.1", 444));
  CHECK(!is_self("192.0.2.1", 443)); /* somebody else */
  CHECK(!is_self("::1", 443));       /* no IPv6 listener on 443 (listeners are V6ONLY) */
  /* the wildcard IPv6 listener on 8443 */
  CHECK(is_self("::1", 8443));
  CHECK(is_self("::", 8443));
  CHECK(!is_self("127.0.0.1", 8443));
  CHECK(!is_self("2001:db8::1", 8443));
  /* the specific listener on 10.11.12.13:9443 */
  CHECK(is_self("10.11.12.13", 9443));
  CHECK(is_self("198.51.100.7", 9443)); /* public address on a listener's port */
  CHECK(!is_self("127.0.0.1", 9443));   /* e.g. a local nginx: the kernel never gives it to us */
  CHECK(!is_self("10.11.12.13", 9444));
  CHECK(!is_self("198.51.100.7", 80));
  fronting_end();
  shared.bound_addrs = NULL;
  shared.nbound = 0;
  shared.npublic = 0;
}

/* Off, or SNI mode without an SNI: refused at once, fd closed. */
static void test_refusals(void) {
  cfg.fronting_mode = MTP_FRONTING_OFF;
  fronting_new();
  int cfd, sfd;
  tcp_pair(AF_INET, &cfd, &sfd);
  CHECK(mtp_fronting_start(fr, sfd, "example.com", NULL, 0, 1, "p", "l0") == MTP_EDISABLED);
  CHECK(fcntl(sfd, F_GETFD) == -1 && errno == EBADF);
  close(cfd);
  fronting_end();

  cfg.fronting_mode = MTP_FRONTING_SNI;
  fronting_new();
  int64_t failed0 = metric(MTP_M_FRONTED_FAILED);
  tcp_pair(AF_INET, &cfd, &sfd);
  CHECK(mtp_fronting_start(fr, sfd, NULL, NULL, 0, 1, "p", "l0") == MTP_EINVAL);
  CHECK(fcntl(sfd, F_GETFD) == -1 && errno == EBADF);
  CHECK(metric(MTP_M_FRONTED_FAILED) == failed0 + 1);
  close(cfd);
  fronting_end();
}

/* Reload (mtp_fronting_reconfigure): a connection in progress keeps the target and idle
 * timeout it started with; new ones get the new settings; the own-address list follows (a
 * listener the reload added is never dialled, and fronting keeps its own copy of the list);
 * mode off refuses new connections and leaves the running ones alone. */
static void test_reconfigure(void) {
  struct target t1, t2, t3;
  target_start(&t1, T_ECHO, "127.0.0.1");
  target_start(&t2, T_ECHO, "127.0.0.1");
  target_start(&t3, T_ECHO, "127.0.0.1");
  struct sockaddr_storage bound1[1] = {sa("10.11.12.13", 9443)};
  shared.bound_addrs = bound1;
  shared.nbound = 1;
  cfg_host("127.0.0.1", t1.port);
  cfg.fronting_idle_timeout = 0.3;
  fronting_new();
  CHECK(!is_self("127.0.0.1", t2.port));
  struct client a;
  front_client(&a, AF_INET, NULL, "a", 1);
  struct want_bytes wa = {&a, 1};
  CHECK(check_run_until(&loop, pred_client_has, &wa, WAIT_MS));

  /* The reload: target t3, idle 120 s, and a new listener on t2's address. */
  struct sockaddr_storage bound2[2] = {sa("10.11.12.13", 9443), t2.addr};
  shared.bound_addrs = bound2;
  shared.nbound = 2;
  cfg_host("127.0.0.1", t3.port);
  cfg.fronting_idle_timeout = 120;
  CHECK(mtp_fronting_reconfigure(fr, &cfg, &shared) == MTP_OK);
  memset(bound2, 0, sizeof(bound2)); /* copied: the caller's array may go */
  shared.bound_addrs = NULL;
  shared.nbound = 0;
  CHECK(is_self("127.0.0.1", t2.port));
  CHECK(is_self("10.11.12.13", 9443));
  CHECK(!is_self("127.0.0.1", t1.port));

  /* a keeps t1 and its 0.3 s: it is closed for idleness, long before the new 120 s. */
  client_write(&a, "b", 1);
  wa.n = 2;
  CHECK(check_run_until(&loop, pred_client_has, &wa, WAIT_MS));
  CHECK(t1.accepted == 1 && t1.last != NULL && t1.last->rx.nread == 2);
  CHECK(check_run_until(&loop, pred_client_eof, &a, WAIT_MS));
  client_close(&a);
  target_stop(&t1);

  /* A new connection goes to t3 with 120 s: still open well after 0.3 s, and echoing. */
  struct client c;
  front_client(&c, AF_INET, NULL, "c", 1);
  struct want_bytes wc = {&c, 1};
  CHECK(check_run_until(&loop, pred_client_has, &wc, WAIT_MS));
  CHECK(t3.accepted == 1);
  CHECK(!check_run_until(&loop, pred_client_eof, &c, 700));
  client_write(&c, "d", 1);
  wc.n = 2;
  CHECK(check_run_until(&loop, pred_client_has, &wc, WAIT_MS));

  /* Fronting to the new listener's address: refused as the proxy itself, never dialled. */
  cfg_host("127.0.0.1", t2.port);
  struct sockaddr_storage bound3[2] = {sa("10.11.12.13", 9443), t2.addr};
  shared.bound_addrs = bound3;
  shared.nbound = 2;
  CHECK(mtp_fronting_reconfigure(fr, &cfg, &shared) == MTP_OK);
  int64_t failed0 = metric(MTP_M_FRONTED_FAILED);
  struct client b;
  front_client(&b, AF_INET, NULL, PRE, sizeof(PRE) - 1);
  CHECK(check_run_until(&loop, pred_client_eof, &b, WAIT_MS));
  CHECK(metric(MTP_M_FRONTED_FAILED) == failed0 + 1);
  CHECK(t2.accepted == 0);
  client_close(&b);

  /* Off: refused at once; c goes on. */
  cfg.fronting_mode = MTP_FRONTING_OFF;
  CHECK(mtp_fronting_reconfigure(fr, &cfg, &shared) == MTP_OK);
  int cfd, sfd;
  tcp_pair(AF_INET, &cfd, &sfd);
  CHECK(mtp_fronting_start(fr, sfd, "example.com", NULL, 0, 1, "p", "l0") == MTP_EDISABLED);
  close(cfd);
  client_write(&c, "e", 1);
  wc.n = 3;
  CHECK(check_run_until(&loop, pred_client_has, &wc, WAIT_MS));
  CHECK(memcmp(c.rx.head, "cde", 3) == 0);
  client_close(&c);

  fronting_end();
  target_stop(&t2);
  target_stop(&t3);
  shared.bound_addrs = NULL;
  shared.nbound = 0;
  cfg.fronting_idle_timeout = 120;
}

/* stop() with connections in every phase closes them all; the loop ends clean. */
static void test_stop(void) {
  struct target t;
  target_start(&t, T_SINK, "127.0.0.1");
  t.stall = true;
  cfg_host("127.0.0.1", t.port);
  fronting_new();
  struct client a, b;
  front_client(&a, AF_INET, NULL, "x", 1);
  struct want_target wt = {&t, 0};
  CHECK(check_run_until(&loop, pred_target_has, &wt, WAIT_MS)); /* a is splicing */
  front_client(&b, AF_INET, NULL, "y", 1);                      /* b is still resolving */
  CHECK(metric(MTP_M_FRONTED_ACTIVE) == 2);
  fronting_end();
  CHECK(check_run_until(&loop, pred_client_eof, &a, WAIT_MS));
  CHECK(check_run_until(&loop, pred_client_eof, &b, WAIT_MS));
  client_close(&a);
  client_close(&b);
  target_stop(&t);
}

int main(void) {
  mtp_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
  mtp_log_level = MTP_LOG_ERROR;
  if (getenv("MTP_TEST_DEBUG") != NULL)
    mtp_log_level = MTP_LOG_DEBUG;
  CHECK(uv_loop_init(&loop) == 0);
  memset(&cfg, 0, sizeof(cfg));
  cfg.fronting_connect_timeout = 5;
  cfg.fronting_idle_timeout = 120;

  test_pre_and_echo("127.0.0.1", "127.0.0.1", AF_INET);
  test_half_close_from_target();
  test_big_bounded();
  test_connect_refused();
  test_connect_timeout();
  test_idle_timeout();
  test_self_refused();
  test_is_self_rules();
  test_refusals();
  test_reconfigure();
  test_stop();

  /* HOST mode by name: "localhost" (tried address by address) and a bracketed IPv6 literal. */
  test_pre_and_echo("127.0.0.1", "localhost", AF_INET);
  int probe = socket(AF_INET6, SOCK_STREAM, 0);
  struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
  bool have_v6 = probe >= 0 && bind(probe, (struct sockaddr *)&a6, sizeof(a6)) == 0;
  if (probe >= 0)
    close(probe);
  if (have_v6)
    test_pre_and_echo("::1", "[::1]", AF_INET6);
  else
    printf("no IPv6 loopback: the [::1] case is skipped\n");
  /* Where "localhost" has two addresses, a target on only the second one is reached after
   * the first refuses (each address is tried in turn). */
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
  if (have_v6 && getaddrinfo("localhost", "1", &hints, &res) == 0 && res->ai_next != NULL) {
    char second[64];
    const struct sockaddr *sa2 = res->ai_next->ai_addr;
    if (sa2->sa_family == AF_INET6)
      uv_ip6_name((const struct sockaddr_in6 *)sa2, second, sizeof(second));
    else
      uv_ip4_name((const struct sockaddr_in *)sa2, second, sizeof(second));
    test_pre_and_echo(second, "localhost", AF_INET);
  } else {
    printf("\"localhost\" has one address here: the address-by-address case is skipped\n");
  }
  if (res != NULL)
    freeaddrinfo(res);

  CHECK(metric(MTP_M_FRONTED_ACTIVE) == 0);
  CHECK(atomic_load(&mem_in_use) == 0);
  free(cfg.fronting_host);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  return check_report();
}
