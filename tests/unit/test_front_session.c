/*
 * test_front_session.c - the real front (listeners + sessions) on a libuv loop in a second
 * thread, with an echo link implemented here and a Telegram client speaking obfuscated2 +
 * framing over blocking sockets in the main thread.
 *
 * The echo link answers every packet asynchronously (uv_timer 0, never inside send). A packet
 * starting with
 *   'P' makes send() return MTP_LINK_FULL, then on_writable follows the echo;
 *   'C' makes the back end the stream (on_close NORMAL) right after the echo;
 *   'F' makes the back flood the client with 16 KiB packets until the front closes the stream.
 * A packet sent with quickack gets on_quickack(TOKEN(len)) before its echo.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "alloc.h"
#include "config.h"
#include "crypto.h"
#include "err.h"
#include "framing.h"
#include "front.h"
#include "link.h"
#include "log.h"
#include "metrics.h"
#include "obf2.h"
#include "check.h"

#define TOKEN(len) (0x11223344u + (uint32_t)(len))
#define FLOOD_PKT (16u * 1024u)
#define FLOOD_LIMIT (512ull * 1024u * 1024u)

/* ---- the echo link (loop thread) ---- */

struct fpkt {
  struct fpkt *next;
  size_t len;
  bool quickack;
  uint8_t data[];
};

struct fstream {
  void *front;
  const struct mtp_link_front_ops *ops;
  uv_timer_t timer;
  struct fpkt *head, *tail;
  bool closed;      /* by the front (close) or by us (on_close): no more ops */
  bool flood;
  bool want_writable;
  bool end_after;   /* on_close(NORMAL) after delivering */
  unsigned long long flooded;
};

/* What the main thread may look at, under ev_mu. */
static pthread_mutex_t ev_mu = PTHREAD_MUTEX_INITIALIZER;
static int n_open, n_front_close, n_back_close;
static struct mtp_link_open last_open;
static char last_listener[32];

static uv_loop_t loop;
static uv_async_t stop_async;
static struct mtp_front_worker *worker;
static uint8_t flood_buf[FLOOD_PKT];

static void fstream_free_cb(uv_handle_t *h) {
  struct fstream *fs = h->data;
  while (fs->head != NULL) {
    struct fpkt *p = fs->head;
    fs->head = p->next;
    free(p);
  }
  free(fs);
}

static void fstream_end(struct fstream *fs) {
  fs->closed = true;
  uv_close((uv_handle_t *)&fs->timer, fstream_free_cb);
}

static void on_fstream_timer(uv_timer_t *t) {
  struct fstream *fs = t->data;
  while (fs->head != NULL && !fs->closed) {
    struct fpkt *p = fs->head;
    fs->head = p->next;
    if (p->quickack)
      fs->ops->on_quickack(fs->front, TOKEN(p->len));
    if (!fs->closed)
      fs->ops->on_packet(fs->front, p->data, p->len);
    free(p);
  }
  if (fs->closed)
    return;
  if (fs->want_writable) {
    fs->want_writable = false;
    fs->ops->on_writable(fs->front);
    if (fs->closed)
      return;
  }
  if (fs->end_after) {
    pthread_mutex_lock(&ev_mu);
    n_back_close++;
    pthread_mutex_unlock(&ev_mu);
    fs->ops->on_close(fs->front, MTP_LINK_CLOSE_NORMAL);
    fstream_end(fs);
    return;
  }
  if (fs->flood) {
    for (int i = 0; i < 16 && !fs->closed; i++) {
      fs->ops->on_packet(fs->front, flood_buf, sizeof(flood_buf));
      fs->flooded += sizeof(flood_buf);
    }
    if (!fs->closed && fs->flooded < FLOOD_LIMIT)
      uv_timer_start(&fs->timer, on_fstream_timer, 0, 0);
  }
}

static void *fake_open(struct mtp_link *link, const struct mtp_link_open *req, void *front,
                       const struct mtp_link_front_ops *ops, int *err) {
  struct fstream *fs = calloc(1, sizeof(*fs));
  if (fs == NULL) {
    *err = MTP_ENOMEM;
    return NULL;
  }
  fs->front = front;
  fs->ops = ops;
  uv_timer_init(&loop, &fs->timer);
  fs->timer.data = fs;
  pthread_mutex_lock(&ev_mu);
  n_open++;
  last_open = *req;
  snprintf(last_listener, sizeof(last_listener), "%s", req->listener ? req->listener : "");
  last_open.listener = NULL;
  pthread_mutex_unlock(&ev_mu);
  return fs;
}

static int fake_send(struct mtp_link *link, void *stream, const uint8_t *data, size_t len, bool quickack) {
  struct fstream *fs = stream;
  CHECK(!fs->closed);
  struct fpkt *p = malloc(sizeof(*p) + len);
  CHECK(p != NULL);
  p->next = NULL;
  p->len = len;
  p->quickack = quickack;
  memcpy(p->data, data, len);
  if (fs->tail != NULL && fs->head != NULL)
    fs->tail->next = p;
  else
    fs->head = p;
  fs->tail = p;
  int ret = MTP_OK;
  if (data[0] == 'F')
    fs->flood = true;
  if (data[0] == 'C')
    fs->end_after = true;
  if (data[0] == 'P') {
    fs->want_writable = true;
    ret = MTP_LINK_FULL;
  }
  if (!uv_is_active((uv_handle_t *)&fs->timer))
    uv_timer_start(&fs->timer, on_fstream_timer, 0, 0);
  return ret;
}

static void fake_close(struct mtp_link *link, void *stream) {
  struct fstream *fs = stream;
  CHECK(!fs->closed); /* exactly once, never after on_close */
  pthread_mutex_lock(&ev_mu);
  n_front_close++;
  pthread_mutex_unlock(&ev_mu);
  fstream_end(fs);
}

static struct mtp_link fake_link = {.open = fake_open, .send = fake_send, .close = fake_close};

static void on_stop_async(uv_async_t *a) {
  mtp_front_worker_stop(worker);
  uv_close((uv_handle_t *)a, NULL);
}

static void *loop_main(void *arg) {
  (void)arg;
  mtp_metrics_thread_register();
  uv_run(&loop, UV_RUN_DEFAULT);
  return NULL;
}

/* ---- helpers for the main thread ---- */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

/* Waits (bounded) until the metric reaches target. */
static bool wait_metric(enum mtp_metric m, int64_t target, double timeout) {
  double deadline = now_s() + timeout;
  while (metric(m) < target) {
    if (now_s() > deadline)
      return false;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return true;
}

static int get_int(int *p) {
  pthread_mutex_lock(&ev_mu);
  int v = *p;
  pthread_mutex_unlock(&ev_mu);
  return v;
}

/* Waits (bounded) until every stream opened so far has been closed by either side. */
static bool wait_no_streams(double timeout) {
  double deadline = now_s() + timeout;
  for (;;) {
    pthread_mutex_lock(&ev_mu);
    int live = n_open - n_front_close - n_back_close;
    pthread_mutex_unlock(&ev_mu);
    if (live == 0)
      return true;
    if (now_s() > deadline)
      return false;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

/* ---- the test client ---- */

#define TC_IN_CAP (2u * 1024u * 1024u)

static int64_t n_clients; /* connections made by tc_open */

struct tc {
  int fd;
  enum mtp_proto proto;
  struct mtp_obf2 obf;
  struct mtp_frame_dec dec;
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  bool hdr_pending;
  uint8_t *in;
  size_t in_off, in_len;
};

static void write_all(int fd, const uint8_t *p, size_t n, bool bytewise) {
  while (n > 0) {
    ssize_t r = send(fd, p, bytewise ? 1 : n, MSG_NOSIGNAL);
    CHECK(r > 0);
    p += r;
    n -= (size_t)r;
  }
}

static struct tc *tc_open(uint16_t port, const uint8_t *secret, enum mtp_proto proto, int16_t dc, int rcvbuf) {
  struct tc *c = calloc(1, sizeof(*c));
  CHECK(c != NULL);
  c->in = malloc(TC_IN_CAP);
  CHECK(c->in != NULL);
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(c->fd >= 0);
  if (rcvbuf > 0)
    CHECK(setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)) == 0);
  struct timeval tv = {5, 0};
  CHECK(setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
  int one = 1;
  CHECK(setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  CHECK(connect(c->fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  n_clients++;
  c->proto = proto;
  CHECK(mtp_obf2_connect(&c->obf, secret, proto, dc, c->hdr) == MTP_OK);
  c->hdr_pending = true;
  mtp_frame_dec_init(&c->dec, proto);
  return c;
}

static uint16_t tc_local_port(struct tc *c) {
  struct sockaddr_in a;
  socklen_t l = sizeof(a);
  CHECK(getsockname(c->fd, (struct sockaddr *)&a, &l) == 0);
  return ntohs(a.sin_port);
}

/* Sends raw de-obfuscated bytes (encrypted here), preceded by the header if not sent yet. */
static void tc_send_raw(struct tc *c, const uint8_t *data, size_t len, bool bytewise) {
  size_t off = c->hdr_pending ? MTP_OBF2_HEADER_LEN : 0;
  uint8_t *buf = malloc(off + len + 1);
  CHECK(buf != NULL);
  if (off)
    memcpy(buf, c->hdr, off);
  memcpy(buf + off, data, len);
  mtp_aes_ctr_crypt(&c->obf.tx, buf + off, buf + off, len);
  c->hdr_pending = false;
  write_all(c->fd, buf, off + len, bytewise);
  free(buf);
}

static void tc_send(struct tc *c, const uint8_t *pkt, size_t len, bool quickack, bool bytewise) {
  uint8_t hdr[4];
  size_t pad = 0;
  size_t hl = mtp_frame_header(c->proto, len, quickack, hdr, &pad);
  uint8_t *buf = malloc(hl + len + pad + 1);
  CHECK(buf != NULL);
  memcpy(buf, hdr, hl);
  memcpy(buf + hl, pkt, len);
  if (pad)
    CHECK(mtp_random(buf + hl + len, pad) == MTP_OK);
  tc_send_raw(c, buf, hl + len + pad, bytewise);
  free(buf);
}

/* Reads until `need` decrypted bytes are buffered; false on EOF/timeout/error. */
static bool tc_fill(struct tc *c, size_t need) {
  if (c->in_off > 0 && c->in_off == c->in_len)
    c->in_off = c->in_len = 0;
  while (c->in_len - c->in_off < need) {
    CHECK(c->in_len < TC_IN_CAP);
    ssize_t r = recv(c->fd, c->in + c->in_len, TC_IN_CAP - c->in_len, 0);
    if (r <= 0)
      return false;
    mtp_aes_ctr_crypt(&c->obf.rx, c->in + c->in_len, c->in + c->in_len, (size_t)r);
    c->in_len += (size_t)r;
  }
  return true;
}

static void tc_read_exact(struct tc *c, uint8_t *out, size_t n) {
  CHECK(tc_fill(c, n));
  memcpy(out, c->in + c->in_off, n);
  c->in_off += n;
}

/* Receives one framed packet into out (cap bytes); returns its length. */
static size_t tc_recv_packet(struct tc *c, uint8_t *out, size_t cap) {
  for (;;) {
    if (c->in_off == c->in_len)
      CHECK(tc_fill(c, 1));
    struct mtp_packet pkt;
    bool has = false;
    ssize_t r = mtp_frame_decode(&c->dec, c->in + c->in_off, c->in_len - c->in_off, &pkt, &has);
    CHECK(r >= 0);
    c->in_off += (size_t)r;
    if (has) {
      CHECK(pkt.len <= cap);
      memcpy(out, pkt.data, pkt.len);
      return pkt.len;
    }
  }
}

/* Waits for the proxy to close; returns the bytes received before EOF, or -1 on timeout. */
static long tc_wait_eof(struct tc *c) {
  long total = 0;
  uint8_t buf[4096];
  for (;;) {
    ssize_t r = recv(c->fd, buf, sizeof(buf), 0);
    if (r == 0)
      return total;
    if (r < 0)
      return errno == ECONNRESET ? total : -1;
    total += r;
  }
}

static void tc_close(struct tc *c) {
  close(c->fd);
  mtp_obf2_free(&c->obf);
  mtp_frame_dec_free(&c->dec);
  free(c->in);
  free(c);
}

static void fill_pattern(uint8_t *p, size_t n, uint8_t first, unsigned seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(i * 31u + seed);
  p[0] = first;
}

static void check_echo(struct tc *c, size_t len, uint8_t first, bool quickack, bool bytewise) {
  uint8_t *pkt = malloc(len);
  uint8_t *back = malloc(len + 16);
  CHECK(pkt && back);
  fill_pattern(pkt, len, first, (unsigned)len);
  tc_send(c, pkt, len, quickack, bytewise);
  if (quickack) {
    uint8_t qa[4], want[4];
    tc_read_exact(c, qa, 4);
    mtp_frame_quickack(c->proto, TOKEN(len), want);
    CHECK(memcmp(qa, want, 4) == 0);
  }
  size_t got = tc_recv_packet(c, back, len + 16);
  CHECK(got == len);
  CHECK(memcmp(pkt, back, len) == 0);
  free(pkt);
  free(back);
}

/* ---- setup ---- */

static const uint8_t SECRET_A[16] = {0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8,
                                     0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf, 0xa0};
static const uint8_t SECRET_X[16] = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
                                     0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10};
static const uint8_t SECRET_B[16] = {0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8,
                                     0xb9, 0xba, 0xbb, 0xbc, 0xbd, 0xbe, 0xbf, 0xb0};
static const uint8_t SECRET_WRONG[16] = {0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                                         0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55};

/* Reserves 127.0.0.1:0 with SO_REUSEPORT (kept open, never listening) as the main thread does. */
static int reserve_port(struct sockaddr_storage *ss, uint16_t *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  int one = 1;
  CHECK(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0);
  CHECK(setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  socklen_t l = sizeof(a);
  CHECK(getsockname(fd, (struct sockaddr *)&a, &l) == 0);
  memset(ss, 0, sizeof(*ss));
  memcpy(ss, &a, sizeof(a));
  *port = ntohs(a.sin_port);
  return fd;
}

static void set_listener(struct mtp_listener_conf *l, const char *name, const uint8_t (*secrets)[16], size_t n,
                         unsigned allowed) {
  memset(l, 0, sizeof(*l));
  l->name = mtp_strdup(name);
  l->secrets = mtp_malloc(16 * n);
  CHECK(l->name && l->secrets);
  memcpy(l->secrets, secrets, 16 * n);
  l->nsecrets = n;
  l->allowed_protocols = allowed;
}

int main(void) {
  const char *dbg = getenv("MTP_TEST_DEBUG");
  mtp_log_level = dbg != NULL ? MTP_LOG_DEBUG : MTP_LOG_WARN;

  struct mtp_config cfg;
  memset(&cfg, 0, sizeof(cfg));
  mtp_config_defaults(&cfg);
  cfg.handshake_timeout = 0.2;
  cfg.idle_timeout = 1.5; /* no other client here stays quiet that long */
  cfg.client_send_budget = 256 * 1024;
  cfg.has_ad_tag = true;
  memset(cfg.ad_tag, 0xad, sizeof(cfg.ad_tag));
  cfg.listeners = mtp_calloc(2, sizeof(*cfg.listeners));
  CHECK(cfg.listeners != NULL);
  cfg.nlisteners = 2;
  const uint8_t l0_secrets[2][16] = {
      {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10},
      {0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf, 0xa0}};
  CHECK(memcmp(l0_secrets[0], SECRET_X, 16) == 0 && memcmp(l0_secrets[1], SECRET_A, 16) == 0);
  set_listener(&cfg.listeners[0], "l0", l0_secrets, 2, MTP_ALLOW_ALL);
  set_listener(&cfg.listeners[1], "l1", &SECRET_B, 1, MTP_ALLOW_ABRIDGED);
  cfg.listeners[1].has_ad_tag = true;
  memset(cfg.listeners[1].ad_tag, 0x77, 16);

  struct sockaddr_storage bound[2];
  uint16_t port0, port1;
  int rfd0 = reserve_port(&bound[0], &port0);
  int rfd1 = reserve_port(&bound[1], &port1);

  CHECK(uv_loop_init(&loop) == 0);
  CHECK(uv_async_init(&loop, &stop_async, on_stop_async) == 0);
  CHECK(mtp_front_worker_setup(&worker, &cfg, bound, &loop, &fake_link, 0, NULL) == MTP_OK);
  pthread_t th;
  CHECK(pthread_create(&th, NULL, loop_main, NULL) == 0);

  int64_t active0 = metric(MTP_M_CLIENTS_ACTIVE);
  int64_t accepted0 = metric(MTP_M_CLIENTS_ACCEPTED);

  /* 1. Echo in each protocol; the first packet travels in the header's segment. */
  {
    static const struct {
      enum mtp_proto proto;
      int16_t dc;
      enum mtp_metric ok;
    } cases[] = {{MTP_PROTO_ABRIDGED, 2, MTP_M_HS_OK_ABRIDGED},
                 {MTP_PROTO_INTERMEDIATE, -3, MTP_M_HS_OK_INTERMEDIATE},
                 {MTP_PROTO_PADDED, 5, MTP_M_HS_OK_SECURE}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
      int64_t ok0 = metric(cases[i].ok);
      int opens = get_int(&n_open);
      struct tc *c = tc_open(port0, SECRET_A, cases[i].proto, cases[i].dc, 0);
      check_echo(c, 8, 'e', false, false);
      CHECK(get_int(&n_open) == opens + 1);
      pthread_mutex_lock(&ev_mu);
      CHECK(last_open.dc == cases[i].dc);
      CHECK(last_open.proto == cases[i].proto);
      CHECK(strcmp(last_listener, "l0") == 0);
      CHECK(last_open.has_ad_tag && last_open.ad_tag[0] == 0xad && last_open.ad_tag[15] == 0xad);
      CHECK(last_open.client_addr.ss_family == AF_INET);
      CHECK(ntohs(((struct sockaddr_in *)&last_open.client_addr)->sin_port) == tc_local_port(c));
      CHECK(ntohs(((struct sockaddr_in *)&last_open.local_addr)->sin_port) == port0);
      pthread_mutex_unlock(&ev_mu);
      CHECK(metric(cases[i].ok) == ok0 + 1);
      check_echo(c, 4, 'e', false, false);
      check_echo(c, 1000, 'e', false, false);
      check_echo(c, 200000, 'e', false, false); /* spans several 64 KiB reads */
      check_echo(c, 508, 'e', false, false);
      /* quick ack: the token comes first, unframed */
      int64_t qa0 = metric(MTP_M_QUICKACKS);
      check_echo(c, 64, 'q', true, false);
      CHECK(metric(MTP_M_QUICKACKS) == qa0 + 1);
      tc_close(c);
    }
  }

  /* 2. Header and packet one byte per send: every split of the input works. */
  {
    struct tc *c = tc_open(port0, SECRET_X, MTP_PROTO_PADDED, 1, 0);
    check_echo(c, 40, 'b', false, true);
    check_echo(c, 12, 'b', true, true);
    tc_close(c);
  }

  /* 3. Wrong secret: nothing ever comes back; counted; closed at the handshake timeout. */
  {
    int64_t bad0 = metric(MTP_M_HS_FAIL_BAD_SECRET);
    int64_t to0 = metric(MTP_M_HS_FAIL_TIMEOUT);
    int opens = get_int(&n_open);
    struct tc *c = tc_open(port0, SECRET_WRONG, MTP_PROTO_INTERMEDIATE, 2, 0);
    uint8_t junk[300];
    fill_pattern(junk, sizeof(junk), 'j', 1);
    tc_send(c, junk, sizeof(junk), false, false);
    tc_send(c, junk, sizeof(junk), false, false); /* keeps being read and discarded */
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_HS_FAIL_BAD_SECRET) == bad0 + 1);
    CHECK(metric(MTP_M_HS_FAIL_TIMEOUT) == to0);
    CHECK(get_int(&n_open) == opens);
    tc_close(c);
  }

  /* 4. Protocol disabled on l1 (abridged only); abridged works there with l1's ad_tag. */
  {
    int64_t dis0 = metric(MTP_M_HS_FAIL_DISABLED);
    struct tc *c = tc_open(port1, SECRET_B, MTP_PROTO_INTERMEDIATE, 2, 0);
    uint8_t p[16] = {0};
    tc_send(c, p, sizeof(p), false, false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_HS_FAIL_DISABLED) == dis0 + 1);
    tc_close(c);

    c = tc_open(port1, SECRET_B, MTP_PROTO_PADDED, 2, 0);
    tc_send(c, p, sizeof(p), false, false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_HS_FAIL_DISABLED) == dis0 + 2);
    tc_close(c);

    c = tc_open(port1, SECRET_B, MTP_PROTO_ABRIDGED, -4, 0);
    check_echo(c, 16, 'a', false, false);
    pthread_mutex_lock(&ev_mu);
    CHECK(strcmp(last_listener, "l1") == 0);
    CHECK(last_open.dc == -4);
    CHECK(last_open.has_ad_tag && last_open.ad_tag[0] == 0x77);
    pthread_mutex_unlock(&ev_mu);
    tc_close(c);

    /* l0's secret is not valid on l1 */
    int64_t bad0 = metric(MTP_M_HS_FAIL_BAD_SECRET);
    c = tc_open(port1, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    tc_send(c, p, sizeof(p), false, false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_HS_FAIL_BAD_SECRET) == bad0 + 1);
    tc_close(c);
  }

  /* 5. Handshake timeout with a partial header; 6. EOF before the header is complete. */
  {
    int64_t to0 = metric(MTP_M_HS_FAIL_TIMEOUT);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    write_all(c->fd, c->hdr, 10, false);
    double t0 = now_s();
    CHECK(tc_wait_eof(c) == 0);
    CHECK(now_s() - t0 < 3.0);
    CHECK(metric(MTP_M_HS_FAIL_TIMEOUT) == to0 + 1);
    tc_close(c);

    int64_t eof0 = metric(MTP_M_HS_FAIL_EOF);
    c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    write_all(c->fd, c->hdr, 10, false);
    tc_close(c);
    CHECK(wait_metric(MTP_M_HS_FAIL_EOF, eof0 + 1, 5.0));
  }

  /* 7. A bad frame (zero-length packet) closes the client and releases the stream. */
  {
    int64_t bf0 = metric(MTP_M_CLOSE_BAD_FRAME);
    CHECK(wait_no_streams(5.0));
    int closes = get_int(&n_front_close);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_INTERMEDIATE, 2, 0);
    check_echo(c, 8, 'e', false, false);
    uint8_t zero[4] = {0, 0, 0, 0};
    tc_send_raw(c, zero, sizeof(zero), false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_CLOSE_BAD_FRAME) == bf0 + 1);
    CHECK(get_int(&n_front_close) == closes + 1);
    tc_close(c);
  }

  /* 8. MTP_LINK_FULL pauses reading until on_writable; nothing is lost. */
  {
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 32, 'P', false, false);
    check_echo(c, 32, 'x', false, false);
    check_echo(c, 32, 'P', true, false);
    check_echo(c, 32, 'x', false, false);
    tc_close(c);
  }

  /* 9. The back ends the stream: the last packet is still delivered, then EOF; no close(). */
  {
    int64_t tg0 = metric(MTP_M_CLOSE_TELEGRAM);
    CHECK(wait_no_streams(5.0));
    int closes = get_int(&n_front_close);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_INTERMEDIATE, 2, 0);
    check_echo(c, 100, 'C', false, false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_CLOSE_TELEGRAM) == tg0 + 1);
    CHECK(get_int(&n_front_close) == closes);
    tc_close(c);
  }

  /* 10. A client that never reads is closed once over budget; others keep working. */
  {
    int64_t bp0 = metric(MTP_M_CLOSE_BACKPRESSURE);
    CHECK(wait_no_streams(5.0));
    int closes = get_int(&n_front_close);
    struct tc *slow = tc_open(port0, SECRET_A, MTP_PROTO_INTERMEDIATE, 2, 4096);
    uint8_t f[8];
    fill_pattern(f, sizeof(f), 'F', 3);
    tc_send(slow, f, sizeof(f), false, false);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_PADDED, 2, 0);
    check_echo(c, 1000, 'e', false, false);
    CHECK(wait_metric(MTP_M_CLOSE_BACKPRESSURE, bp0 + 1, 20.0));
    CHECK(get_int(&n_front_close) == closes + 1);
    check_echo(c, 2000, 'e', true, false);
    tc_close(c);
    tc_close(slow);
  }

  /* 11. A quiet client is closed at the idle timeout and its stream released. */
  {
    CHECK(wait_no_streams(5.0));
    int64_t idle0 = metric(MTP_M_CLOSE_IDLE);
    int closes = get_int(&n_front_close);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_INTERMEDIATE, 2, 0);
    check_echo(c, 8, 'e', false, false);
    double t0 = now_s();
    CHECK(tc_wait_eof(c) == 0);
    double quiet = now_s() - t0;
    CHECK(quiet > 1.0 && quiet < 4.5);
    CHECK(metric(MTP_M_CLOSE_IDLE) == idle0 + 1);
    CHECK(get_int(&n_front_close) == closes + 1);
    tc_close(c);
  }

  /* 12. Stop with a client still connected: its stream is closed and the loop ends. */
  {
    CHECK(wait_no_streams(5.0));
    int closes = get_int(&n_front_close);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 8, 'e', false, false);
    CHECK(uv_async_send(&stop_async) == 0);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK(get_int(&n_front_close) == closes + 1);
    CHECK(tc_wait_eof(c) == 0);
    tc_close(c);
  }

  CHECK(metric(MTP_M_CLIENTS_ACTIVE) == active0);
  CHECK(metric(MTP_M_CLIENTS_ACCEPTED) == accepted0 + n_clients);
  CHECK(metric(MTP_M_BYTES_FROM_CLIENTS) > 0 && metric(MTP_M_BYTES_TO_CLIENTS) > 0);
  CHECK(metric(MTP_M_PACKETS_FROM_CLIENTS) > 0 && metric(MTP_M_PACKETS_TO_CLIENTS) > 0);
  mtp_front_worker_free(worker);
  CHECK(uv_loop_close(&loop) == 0); /* no handle left behind */
  close(rfd0);
  close(rfd1);
  mtp_config_free(&cfg);
  return check_report();
}
