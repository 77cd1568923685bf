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
 *
 * Section 20 reloads: mtp_front_worker_reconfigure on the loop thread (run_on_loop) with
 * configuration generations made here, checking kept / added / removed listeners, new secrets
 * for new clients only, and when each generation is freed.
 *
 * Client connections by listener (front/lstats.h) are checked along the way: accepted, open
 * and handshakes by protocol per listener (sections 1 and 13), and across the reloads of
 * section 20: a new listener is counted, a removed one is listed while its client is open and
 * disappears after, and the workers' blocks are dropped when they are no longer needed.
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
#include "faketls.h"
#include "framing.h"
#include "front.h"
#include "link.h"
#include "log.h"
#include "lstats.h"
#include "metrics.h"
#include "obf2.h"
#include "replay.h"
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
static uv_async_t call_async; /* run_on_loop */
static struct mtp_front_worker *worker;
static struct mtp_front_worker *worker2; /* the per-SNI-secrets config */
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
  mtp_front_worker_stop(worker2);
  uv_close((uv_handle_t *)a, NULL);
  uv_close((uv_handle_t *)&call_async, NULL);
}

/* Runs a function on the loop thread and waits for it (the worker's own-thread calls). */
static void (*call_fn)(void *arg);
static void *call_arg;
static bool call_done;
static pthread_cond_t call_cond = PTHREAD_COND_INITIALIZER;

static void on_call_async(uv_async_t *a) {
  (void)a;
  pthread_mutex_lock(&ev_mu);
  void (*fn)(void *) = call_fn;
  void *arg = call_arg;
  pthread_mutex_unlock(&ev_mu);
  if (fn != NULL)
    fn(arg);
  pthread_mutex_lock(&ev_mu);
  call_fn = NULL;
  call_done = true;
  pthread_cond_broadcast(&call_cond);
  pthread_mutex_unlock(&ev_mu);
}

static void run_on_loop(void (*fn)(void *arg), void *arg) {
  pthread_mutex_lock(&ev_mu);
  call_fn = fn;
  call_arg = arg;
  call_done = false;
  pthread_mutex_unlock(&ev_mu);
  CHECK(uv_async_send(&call_async) == 0);
  struct timespec dl;
  clock_gettime(CLOCK_REALTIME, &dl);
  dl.tv_sec += 5;
  pthread_mutex_lock(&ev_mu);
  while (!call_done && pthread_cond_timedwait(&call_cond, &ev_mu, &dl) == 0)
    ;
  bool done = call_done;
  pthread_mutex_unlock(&ev_mu);
  CHECK(done);
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
  /* fake-TLS */
  bool tls;
  uint8_t secret[16];
  uint8_t hello[MTP_FAKETLS_CLIENT_HELLO_MAX];
  size_t hello_len;
  bool hello_pending;  /* the hello goes out with the first data */
  bool answer_pending; /* the server's answer has not been read yet */
  bool ccs_pending;    /* send a ChangeCipherSpec before the first record */
  size_t rec_max;      /* payload bytes per record we send (0 = 16384) */
  size_t flight_len;   /* the fake certificate flight's size in the answer */
  struct mtp_faketls_rx rx;
};

static void write_all(int fd, const uint8_t *p, size_t n, bool bytewise) {
  while (n > 0) {
    ssize_t r = send(fd, p, bytewise ? 1 : n, MSG_NOSIGNAL);
    CHECK(r > 0);
    p += r;
    n -= (size_t)r;
  }
}

static struct tc *tc_connect(uint16_t port, int rcvbuf) {
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
  return c;
}

static struct tc *tc_open(uint16_t port, const uint8_t *secret, enum mtp_proto proto, int16_t dc, int rcvbuf) {
  struct tc *c = tc_connect(port, rcvbuf);
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

/* Sends raw de-obfuscated bytes (encrypted here), preceded by the header if not sent yet.
 * Fake-TLS: the bytes go in records of c->rec_max, after the hello and a CCS if pending. */
static void tc_send_raw(struct tc *c, const uint8_t *data, size_t len, bool bytewise) {
  size_t off = c->hdr_pending ? MTP_OBF2_HEADER_LEN : 0;
  uint8_t *buf = malloc(off + len + 1);
  CHECK(buf != NULL);
  if (off)
    memcpy(buf, c->hdr, off);
  memcpy(buf + off, data, len);
  mtp_aes_ctr_crypt(&c->obf.tx, buf + off, buf + off, len);
  c->hdr_pending = false;
  if (!c->tls) {
    write_all(c->fd, buf, off + len, bytewise);
    free(buf);
    return;
  }
  size_t max = c->rec_max ? c->rec_max : MTP_FAKETLS_MAX_PAYLOAD;
  size_t wl = (c->hello_pending ? c->hello_len : 0) + (c->ccs_pending ? 6 : 0) + mtp_faketls_wrap_len(off + len, max);
  uint8_t *wire = malloc(wl + 1);
  CHECK(wire != NULL);
  size_t w = 0;
  if (c->hello_pending) {
    memcpy(wire, c->hello, c->hello_len);
    w += c->hello_len;
    c->hello_pending = false;
  }
  if (c->ccs_pending) {
    static const uint8_t ccs[6] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
    memcpy(wire + w, ccs, sizeof(ccs));
    w += sizeof(ccs);
    c->ccs_pending = false;
  }
  w += mtp_faketls_wrap(buf, off + len, max, wire + w);
  CHECK(w == wl);
  write_all(c->fd, wire, wl, bytewise);
  free(wire);
  free(buf);
}

/* Decodes received bytes (records, then AES) into the input buffer. */
static void tc_absorb(struct tc *c, uint8_t *raw, size_t n) {
  if (c->tls) {
    size_t plain = 0;
    CHECK(mtp_faketls_rx_feed(&c->rx, raw, n, raw, &plain) == (int)n);
    n = plain;
  }
  CHECK(c->in_len + n <= TC_IN_CAP);
  mtp_aes_ctr_crypt(&c->obf.rx, raw, c->in + c->in_len, n);
  c->in_len += n;
}

/* Reads the server's ServerHello + CCS + flight and checks its HMAC; anything after it is
 * the server's records. Returns the answer's length. */
static size_t tc_read_answer(struct tc *c) {
  size_t cap = 40000, len = 0;
  uint8_t *buf = malloc(cap);
  CHECK(buf != NULL);
  int a;
  for (;;) {
    a = mtp_faketls_answer_check(c->secret, c->hello + MTP_FAKETLS_RANDOM_OFFSET, buf, len);
    if (a != MTP_AGAIN)
      break;
    CHECK(len < cap);
    ssize_t r = recv(c->fd, buf + len, cap - len, 0);
    CHECK(r > 0);
    len += (size_t)r;
  }
  CHECK(a > 0);
  size_t off = 5 + (((size_t)buf[3] << 8) | buf[4]) + 6; /* ServerHello record, CCS */
  c->flight_len = ((size_t)buf[off + 3] << 8) | buf[off + 4];
  CHECK(off + 5 + c->flight_len == (size_t)a);
  c->answer_pending = false;
  if ((size_t)a < len)
    tc_absorb(c, buf + a, len - (size_t)a);
  free(buf);
  return (size_t)a;
}

enum {
  TLS_BYTEWISE_HELLO = 1, /* the hello one byte per send */
  TLS_HELLO_WITH_DATA = 2, /* the hello in the same write as the first records */
  TLS_NO_ANSWER = 4,       /* the proxy must not answer: don't wait for it */
  TLS_CCS = 8,             /* a ChangeCipherSpec before the first record, as apps send */
};

/* A fake-TLS client: hello with secret, sni and the clock off by ts_off seconds. */
static struct tc *tc_open_tls(uint16_t port, const uint8_t *secret, const char *sni, int64_t ts_off,
                              enum mtp_faketls_hello_kind kind, enum mtp_proto proto, int16_t dc, unsigned flags) {
  struct tc *c = tc_connect(port, 0);
  c->proto = proto;
  c->tls = true;
  memcpy(c->secret, secret, 16);
  int n = mtp_faketls_client_hello(secret, sni, (uint32_t)((int64_t)time(NULL) + ts_off), kind, c->hello,
                                   sizeof(c->hello));
  CHECK(n > 0);
  c->hello_len = (size_t)n;
  CHECK(mtp_obf2_connect(&c->obf, secret, proto, dc, c->hdr) == MTP_OK);
  c->hdr_pending = true;
  c->ccs_pending = (flags & TLS_CCS) != 0;
  mtp_frame_dec_init(&c->dec, proto);
  mtp_faketls_rx_init(&c->rx);
  c->answer_pending = true;
  if (flags & TLS_HELLO_WITH_DATA) {
    c->hello_pending = true;
    return c;
  }
  write_all(c->fd, c->hello, c->hello_len, (flags & TLS_BYTEWISE_HELLO) != 0);
  if (!(flags & TLS_NO_ANSWER))
    tc_read_answer(c);
  return c;
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
  if (c->answer_pending)
    tc_read_answer(c);
  while (c->in_len - c->in_off < need) {
    CHECK(c->in_len < TC_IN_CAP);
    ssize_t r = recv(c->fd, c->in + c->in_len, TC_IN_CAP - c->in_len, 0);
    if (r <= 0)
      return false;
    tc_absorb(c, c->in + c->in_len, (size_t)r);
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

/* A client the proxy must not answer: not one byte comes back, the connection is closed at
 * the handshake timeout (fronting is off here), and metric m moved by one. */
static void expect_silence(struct tc *c, enum mtp_metric m, int64_t m0, const char *what) {
  double t0 = now_s();
  long got = tc_wait_eof(c);
  double el = now_s() - t0;
  if (got != 0 || metric(m) != m0 + 1)
    fprintf(stderr, "%s: %ld bytes back, metric %lld -> %lld\n", what, got, (long long)m0, (long long)metric(m));
  CHECK(got == 0);
  CHECK(el < 3.0);
  CHECK(metric(m) == m0 + 1);
  tc_close(c);
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

/* A list of lower-cased domains owned like the config's (mtp_config_free frees it). */
static char **domains(const char *a, const char *b, size_t *n) {
  char **d = mtp_calloc(2, sizeof(*d));
  CHECK(d != NULL);
  d[0] = mtp_strdup(a);
  *n = 1;
  if (b != NULL) {
    d[1] = mtp_strdup(b);
    *n = 2;
  }
  return d;
}

/* ---- reload: configuration generations ---- */

/* Listener confs need an address for mtp_listener_conf_same_socket: 127.0.0.1 port 0 (the
 * concrete ports are in the bound arrays, as from the main thread). */
static void set_loopback(struct mtp_listener_conf *l) {
  struct sockaddr_in *a = (struct sockaddr_in *)&l->addr;
  memset(&l->addr, 0, sizeof(l->addr));
  a->sin_family = AF_INET;
  a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
}

struct test_gen {
  struct mtp_front_gen g;
  struct mtp_config cfg;
  struct sockaddr_storage bound[4];
};

static atomic_uint gens_freed; /* bit id: generation id was freed */

static void test_gen_free(struct mtp_front_gen *g) {
  struct test_gen *t = (struct test_gen *)g;
  atomic_fetch_or(&gens_freed, 1u << g->id);
  mtp_config_free(&t->cfg);
  free(t);
}

static bool gen_is_freed(unsigned id) { return (atomic_load(&gens_freed) & (1u << id)) != 0; }

static bool wait_gen_freed(unsigned id, double timeout) {
  double deadline = now_s() + timeout;
  while (!gen_is_freed(id)) {
    if (now_s() > deadline)
      return false;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return true;
}

/* A generation with the main config's global settings (global ad_tag 0xbe) and n listeners to
 * fill in; the caller holds its one reference. */
static struct test_gen *test_gen_new(unsigned id, size_t n) {
  struct test_gen *t = calloc(1, sizeof(*t));
  CHECK(t != NULL && n <= 4);
  mtp_config_defaults(&t->cfg);
  t->cfg.handshake_timeout = 0.2;
  t->cfg.idle_timeout = 1.5;
  t->cfg.client_send_budget = 256 * 1024;
  t->cfg.has_ad_tag = true;
  memset(t->cfg.ad_tag, 0xbe, sizeof(t->cfg.ad_tag));
  t->cfg.fronting_mode = MTP_FRONTING_OFF;
  t->cfg.tls_clock_skew = 600;
  t->cfg.tls_record_size = 16384;
  t->cfg.tls_domains = domains("global.example", NULL, &t->cfg.ntls_domains);
  t->cfg.listeners = mtp_calloc(n, sizeof(*t->cfg.listeners));
  CHECK(t->cfg.listeners != NULL);
  t->cfg.nlisteners = n;
  mtp_front_gen_init(&t->g, &t->cfg, t->bound, id, test_gen_free);
  return t;
}

struct reconf_call {
  struct mtp_front_worker *w;
  struct mtp_front_gen *g;
  int rc;
  size_t nlisteners;
  void (*before)(struct mtp_front_worker *w);
};

static void do_reconfigure(void *arg) {
  struct reconf_call *c = arg;
  if (c->before != NULL)
    c->before(c->w);
  c->rc = mtp_front_worker_reconfigure(c->w, c->g);
  c->nlisteners = mtp_front_worker_nlisteners(c->w);
}

/* Reconfigures w on the loop thread; returns the listening sockets it then has. */
static size_t reconfigure(struct mtp_front_worker *w, struct mtp_front_gen *g,
                          void (*before)(struct mtp_front_worker *w)) {
  struct reconf_call c = {.w = w, .g = g, .rc = -1, .before = before};
  run_on_loop(do_reconfigure, &c);
  CHECK(c.rc == MTP_OK);
  return c.nlisteners;
}

/* ---- client connections by listener ---- */

static struct mtp_lstats *lstats;

/* The sums for listener name as mtp_lstats_sum lists them under c; false when not listed. */
static bool lrow(const struct mtp_config *c, const char *name, struct mtp_lstats_row *out) {
  struct mtp_lstats_row *rows = NULL;
  size_t n = 0;
  CHECK(mtp_lstats_sum(lstats, c, &rows, &n) == MTP_OK);
  bool found = false;
  memset(out, 0, sizeof(*out));
  for (size_t i = 0; i < n && !found; i++) {
    if (strcmp(rows[i].name, name) == 0) {
      *out = rows[i];
      out->name = NULL;
      found = true;
    }
  }
  mtp_lstats_rows_free(rows, n);
  return found;
}

static int64_t lcount(const struct mtp_config *c, const char *name, enum mtp_lstat k) {
  struct mtp_lstats_row r;
  CHECK_MSG(lrow(c, name, &r), "listener %s is not listed", name);
  return r.v[k];
}

/* Waits (bounded) until listener name's counter k is want (sessions end asynchronously). */
static bool wait_lstat(const struct mtp_config *c, const char *name, enum mtp_lstat k, int64_t want) {
  double deadline = now_s() + 5.0;
  while (lcount(c, name, k) != want) {
    if (now_s() > deadline)
      return false;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return true;
}

/* Waits (bounded) until listener name is no longer listed. */
static bool wait_unlisted(const struct mtp_config *c, const char *name) {
  double deadline = now_s() + 5.0;
  struct mtp_lstats_row r;
  while (lrow(c, name, &r)) {
    if (now_s() > deadline)
      return false;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return true;
}

/* True when nothing listens on 127.0.0.1:port any more (connect is refused). */
static bool port_refuses(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  int r = connect(fd, (struct sockaddr *)&a, sizeof(a));
  int e = errno;
  close(fd);
  return r != 0 && e == ECONNREFUSED;
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
  cfg.listeners = mtp_calloc(4, sizeof(*cfg.listeners));
  CHECK(cfg.listeners != NULL);
  cfg.nlisteners = 4;
  /* fake-TLS: fronting off (a failed check is silence), phones' clock window */
  cfg.fronting_mode = MTP_FRONTING_OFF;
  cfg.tls_clock_skew = 600;
  cfg.tls_record_size = 16384;
  cfg.tls_flight_size = 0;
  cfg.tls_domains = domains("global.example", NULL, &cfg.ntls_domains);
  const uint8_t l0_secrets[2][16] = {
      {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10},
      {0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf, 0xa0}};
  CHECK(memcmp(l0_secrets[0], SECRET_X, 16) == 0 && memcmp(l0_secrets[1], SECRET_A, 16) == 0);
  set_listener(&cfg.listeners[0], "l0", l0_secrets, 2, MTP_ALLOW_ALL);
  set_listener(&cfg.listeners[1], "l1", &SECRET_B, 1, MTP_ALLOW_ABRIDGED);
  cfg.listeners[1].has_ad_tag = true;
  memset(cfg.listeners[1].ad_tag, 0x77, 16);
  /* l2: TLS-only with its own domains; l3: fake-TLS (global domain) or plain secure */
  set_listener(&cfg.listeners[2], "l2", l0_secrets, 2, MTP_ALLOW_FAKE_TLS);
  cfg.listeners[2].tls_domains = domains("example.com", "cdn.example.org", &cfg.listeners[2].ntls_domains);
  set_listener(&cfg.listeners[3], "l3", &SECRET_B, 1, MTP_ALLOW_FAKE_TLS | MTP_ALLOW_SECURE);
  for (size_t i = 0; i < cfg.nlisteners; i++)
    set_loopback(&cfg.listeners[i]);

  /* A second worker on the same loop with per-SNI derived secrets and small records. */
  struct mtp_config cfg2;
  memset(&cfg2, 0, sizeof(cfg2));
  mtp_config_defaults(&cfg2);
  cfg2.handshake_timeout = 0.2;
  cfg2.idle_timeout = 1.5;
  cfg2.client_send_budget = 256 * 1024;
  cfg2.fronting_mode = MTP_FRONTING_OFF;
  cfg2.tls_clock_skew = 600;
  cfg2.tls_record_size = 1000;
  cfg2.tls_flight_size = 1234;
  cfg2.per_sni_secrets = true;
  cfg2.per_sni_salt = mtp_strdup("pepper");
  cfg2.listeners = mtp_calloc(1, sizeof(*cfg2.listeners));
  CHECK(cfg2.listeners != NULL && cfg2.per_sni_salt != NULL);
  cfg2.nlisteners = 1;
  set_listener(&cfg2.listeners[0], "l5", &SECRET_B, 1, MTP_ALLOW_FAKE_TLS);
  set_loopback(&cfg2.listeners[0]);
  cfg2.listeners[0].tls_domains = domains("alice.example", "bob.example", &cfg2.listeners[0].ntls_domains);

  struct sockaddr_storage bound[4], bound2[1];
  uint16_t port0, port1, port2, port3, port5;
  int rfd0 = reserve_port(&bound[0], &port0);
  int rfd1 = reserve_port(&bound[1], &port1);
  int rfd2 = reserve_port(&bound[2], &port2);
  int rfd3 = reserve_port(&bound[3], &port3);
  int rfd5 = reserve_port(&bound2[0], &port5);

  struct mtp_replay replay;
  mtp_replay_init(&replay);
  CHECK(mtp_replay_setup(&replay, 1u << 20, 1200) == MTP_OK);
  struct mtp_front_shared shared;
  memset(&shared, 0, sizeof(shared));
  shared.replay = &replay;
  CHECK(mtp_lstats_create(&lstats) == MTP_OK);
  shared.lstats = lstats;

  CHECK(uv_loop_init(&loop) == 0);
  CHECK(uv_async_init(&loop, &stop_async, on_stop_async) == 0);
  CHECK(uv_async_init(&loop, &call_async, on_call_async) == 0);
  CHECK(mtp_front_worker_setup(&worker, &cfg, bound, &loop, &fake_link, 0, &shared) == MTP_OK);
  CHECK(mtp_front_worker_setup(&worker2, &cfg2, bound2, &loop, &fake_link, 1, &shared) == MTP_OK);
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
    /* By listener: three clients on l0, one handshake of each protocol, none open now; every
     * listener of the configuration is listed; worker 2's l5 (not in cfg, no clients) is not. */
    CHECK(wait_lstat(&cfg, "l0", MTP_LSTAT_ACTIVE, 0));
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_ACCEPTED) == 3);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_HS_ABRIDGED) == 1);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_HS_INTERMEDIATE) == 1);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_HS_SECURE) == 1);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_HS_FAKE_TLS) == 0);
    struct mtp_lstats_row r;
    CHECK(lrow(&cfg, "l1", &r) && !r.removed && r.v[MTP_LSTAT_ACCEPTED] == 0);
    CHECK(lrow(&cfg, "l3", &r) && !r.removed);
    CHECK(!lrow(&cfg, "l5", &r));
    CHECK(lrow(&cfg2, "l5", &r) && r.v[MTP_LSTAT_ACCEPTED] == 0);
    /* One open client is counted as open. */
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 8, 'e', false, false);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_ACTIVE) == 1);
    CHECK(lcount(&cfg, "l0", MTP_LSTAT_ACCEPTED) == 4);
    tc_close(c);
    CHECK(wait_lstat(&cfg, "l0", MTP_LSTAT_ACTIVE, 0));
    CHECK(mtp_lstats_nblocks(lstats) == 5); /* worker: l0..l3, worker 2: l5 */
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

  /* 13. Fake-TLS echo on the TLS-only l2: every framing inside, both hello kinds, both of
   * l2's secrets and domains (SNI compared case-insensitively). */
  {
    static const struct {
      enum mtp_proto proto;
      enum mtp_metric ok;
    } inner[] = {{MTP_PROTO_ABRIDGED, MTP_M_HS_OK_ABRIDGED},
                 {MTP_PROTO_INTERMEDIATE, MTP_M_HS_OK_INTERMEDIATE},
                 {MTP_PROTO_PADDED, MTP_M_HS_OK_SECURE}};
    int64_t l2_tls0 = lcount(&cfg, "l2", MTP_LSTAT_HS_FAKE_TLS), l2_sec0 = lcount(&cfg, "l2", MTP_LSTAT_HS_SECURE);
    int64_t l2_acc0 = lcount(&cfg, "l2", MTP_LSTAT_ACCEPTED);
    for (size_t i = 0; i < 3; i++) {
      for (int kind = 0; kind < 2; kind++) {
        int64_t tls0 = metric(MTP_M_HS_OK_FAKE_TLS), ok0 = metric(inner[i].ok);
        const uint8_t *secret = kind ? SECRET_X : SECRET_A;
        const char *sni = kind ? "CDN.Example.org" : "example.com";
        struct tc *c = tc_open_tls(port2, secret, sni, 0, kind ? MTP_FAKETLS_KIND_PQ : MTP_FAKETLS_KIND_CLASSIC,
                                   inner[i].proto, (int16_t)(i + 1), TLS_CCS);
        CHECK(c->flight_len >= 2500 && c->flight_len <= 4600); /* nothing learnt: random */
        check_echo(c, 8, 'e', false, false);
        CHECK(metric(MTP_M_HS_OK_FAKE_TLS) == tls0 + 1);
        CHECK(metric(inner[i].ok) == ok0 + 1);
        pthread_mutex_lock(&ev_mu);
        CHECK(last_open.proto == inner[i].proto && last_open.dc == (int16_t)(i + 1));
        CHECK(strcmp(last_listener, "l2") == 0);
        pthread_mutex_unlock(&ev_mu);
        check_echo(c, 1000, 'e', false, false);
        check_echo(c, 200000, 'e', false, false); /* many 16 KiB records each way */
        check_echo(c, 64, 'q', true, false);      /* the quick ack travels in a record too */
        tc_close(c);
      }
    }
    /* By listener, fake-TLS counts as fake_tls whatever the framing inside. */
    CHECK(lcount(&cfg, "l2", MTP_LSTAT_HS_FAKE_TLS) == l2_tls0 + 6);
    CHECK(lcount(&cfg, "l2", MTP_LSTAT_HS_SECURE) == l2_sec0);
    CHECK(lcount(&cfg, "l2", MTP_LSTAT_HS_ABRIDGED) == 0);
    CHECK(lcount(&cfg, "l2", MTP_LSTAT_ACCEPTED) == l2_acc0 + 6);
  }

  /* 14. Hello one byte per send; hello + CCS + header + packet in one write; records of one
   * byte of payload; the largest records a peer may send. */
  {
    struct tc *c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_PQ, MTP_PROTO_PADDED, 2,
                               TLS_BYTEWISE_HELLO);
    check_echo(c, 40, 'b', false, true);
    tc_close(c);

    c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_INTERMEDIATE, 2,
                    TLS_HELLO_WITH_DATA | TLS_CCS);
    check_echo(c, 300, 'w', false, false);
    check_echo(c, 70000, 'w', false, false);
    tc_close(c);

    c = tc_open_tls(port2, SECRET_X, "example.com", 0, MTP_FAKETLS_KIND_PQ, MTP_PROTO_ABRIDGED, 2,
                    TLS_HELLO_WITH_DATA);
    c->rec_max = 1; /* header and packet in 1-byte records */
    check_echo(c, 120, 'r', false, false);
    check_echo(c, 8, 'r', true, true);
    c->rec_max = MTP_FAKETLS_MAX_RECORD_PAYLOAD;
    check_echo(c, 100000, 'r', false, false);
    tc_close(c);
  }

  /* 15. The mixed l3 (fake_tls + secure, the global domain): fake-TLS with any framing
   * inside, plain secure, no plain abridged; a plain header that starts with 0x16 is still
   * obfuscated2. */
  {
    struct tc *c = tc_open_tls(port3, SECRET_B, "global.example", 0, MTP_FAKETLS_KIND_CLASSIC,
                               MTP_PROTO_ABRIDGED, 3, TLS_CCS);
    check_echo(c, 16, 'm', false, false);
    tc_close(c);
    c = tc_open(port3, SECRET_B, MTP_PROTO_PADDED, 3, 0);
    check_echo(c, 16, 'm', false, false);
    tc_close(c);
    int64_t dis0 = metric(MTP_M_HS_FAIL_DISABLED);
    c = tc_open(port3, SECRET_B, MTP_PROTO_ABRIDGED, 3, 0);
    uint8_t p[16] = {0};
    tc_send(c, p, sizeof(p), false, false);
    expect_silence(c, MTP_M_HS_FAIL_DISABLED, dis0, "plain abridged on l3");

    c = tc_connect(port3, 0);
    c->proto = MTP_PROTO_PADDED;
    int tries = 0;
    do {
      mtp_obf2_free(&c->obf);
      CHECK(mtp_obf2_connect(&c->obf, SECRET_B, MTP_PROTO_PADDED, 2, c->hdr) == MTP_OK);
      CHECK(++tries < 100000);
    } while (c->hdr[0] != 0x16 || c->hdr[1] == 0x03);
    c->hdr_pending = true;
    mtp_frame_dec_init(&c->dec, MTP_PROTO_PADDED);
    check_echo(c, 24, 'h', false, true); /* bytewise: the TLS/obf2 decision spans reads */
    tc_close(c);
  }

  /* 16. Failed fake-TLS checks: no reply at all, counted by reason, closed at the timeout. */
  {
    struct tc *c;
    int64_t m0;
    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_HMAC);
    c = tc_open_tls(port2, SECRET_WRONG, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_HMAC, m0, "bad hmac");
    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_HMAC); /* l3's secret is not valid on l2 */
    c = tc_open_tls(port2, SECRET_B, "example.com", 0, MTP_FAKETLS_KIND_PQ, MTP_PROTO_PADDED, 2, TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_HMAC, m0, "other listener's secret");

    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_SNI);
    c = tc_open_tls(port2, SECRET_A, "global.example", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_NO_ANSWER); /* l2 has its own domains: the global one is not among them */
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_SNI, m0, "bad sni");
    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_SNI);
    c = tc_open_tls(port2, SECRET_A, "example.com.evil", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_SNI, m0, "sni with a suffix");

    m0 = metric(MTP_M_HS_FAIL_TLS_TIME);
    c = tc_open_tls(port2, SECRET_A, "example.com", -700, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_TIME, m0, "old timestamp");
    m0 = metric(MTP_M_HS_FAIL_TLS_TIME);
    c = tc_open_tls(port2, SECRET_A, "example.com", 700, MTP_FAKETLS_KIND_PQ, MTP_PROTO_PADDED, 2, TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_TIME, m0, "future timestamp");
    /* inside the window both ways */
    c = tc_open_tls(port2, SECRET_A, "example.com", -500, MTP_FAKETLS_KIND_PQ, MTP_PROTO_PADDED, 2, 0);
    check_echo(c, 8, 't', false, false);
    tc_close(c);
    c = tc_open_tls(port2, SECRET_A, "example.com", 500, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2, 0);
    check_echo(c, 8, 't', false, false);

    /* The same hello again (a probe replaying what it saw): silence, tls_replay. */
    m0 = metric(MTP_M_HS_FAIL_TLS_REPLAY);
    struct tc *r = tc_connect(port2, 0);
    write_all(r->fd, c->hello, c->hello_len, false);
    expect_silence(r, MTP_M_HS_FAIL_TLS_REPLAY, m0, "replayed hello");
    check_echo(c, 8, 't', false, false); /* the original client is unaffected */
    tc_close(c);

    /* Not TLS on the TLS-only listener: a valid obfuscated2 client and random bytes. */
    m0 = metric(MTP_M_HS_FAIL_NOT_TLS);
    c = tc_open(port2, SECRET_A, MTP_PROTO_PADDED, 2, 0);
    uint8_t p[16] = {0};
    tc_send(c, p, sizeof(p), false, false);
    expect_silence(c, MTP_M_HS_FAIL_NOT_TLS, m0, "obfuscated2 on TLS-only");
    m0 = metric(MTP_M_HS_FAIL_NOT_TLS);
    c = tc_connect(port2, 0);
    uint8_t junk[100];
    fill_pattern(junk, sizeof(junk), 0x16, 9); /* 16 then not 03 01 */
    write_all(c->fd, junk, sizeof(junk), false);
    expect_silence(c, MTP_M_HS_FAIL_NOT_TLS, m0, "junk on TLS-only");

    /* A malformed record that starts like a hello (16 03 01, body not a ClientHello). */
    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_HELLO);
    c = tc_connect(port2, 0);
    uint8_t bad[5 + 200];
    memset(bad, 0x42, sizeof(bad));
    bad[0] = 0x16, bad[1] = 0x03, bad[2] = 0x01, bad[3] = 0x00, bad[4] = 200;
    write_all(c->fd, bad, sizeof(bad), false);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_HELLO, m0, "bad hello");

    /* Half a hello, then nothing: handshake timeout; half a hello, then EOF: closed_early. */
    m0 = metric(MTP_M_HS_FAIL_TIMEOUT);
    c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_HELLO_WITH_DATA);
    write_all(c->fd, c->hello, 100, false);
    expect_silence(c, MTP_M_HS_FAIL_TIMEOUT, m0, "half a hello");
    m0 = metric(MTP_M_HS_FAIL_EOF);
    c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_HELLO_WITH_DATA);
    write_all(c->fd, c->hello, 100, false);
    CHECK(shutdown(c->fd, SHUT_WR) == 0);
    expect_silence(c, MTP_M_HS_FAIL_EOF, m0, "half a hello then EOF");

    /* A good hello, then a wrong secret inside (the obfuscated2 header): bad_secret, and the
     * ServerHello is all that came back. */
    m0 = metric(MTP_M_HS_FAIL_BAD_SECRET);
    c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2, 0);
    mtp_obf2_free(&c->obf);
    CHECK(mtp_obf2_connect(&c->obf, SECRET_WRONG, MTP_PROTO_PADDED, 2, c->hdr) == MTP_OK);
    tc_send(c, p, sizeof(p), false, false);
    expect_silence(c, MTP_M_HS_FAIL_BAD_SECRET, m0, "wrong secret inside fake-TLS");

    /* A record of a wrong type after the handshake closes the client. */
    int64_t bf0 = metric(MTP_M_CLOSE_BAD_FRAME);
    c = tc_open_tls(port2, SECRET_A, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2, 0);
    check_echo(c, 8, 'e', false, false);
    static const uint8_t alert[7] = {0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28};
    write_all(c->fd, alert, sizeof(alert), false);
    CHECK(tc_wait_eof(c) == 0);
    CHECK(metric(MTP_M_CLOSE_BAD_FRAME) == bf0 + 1);
    tc_close(c);
  }

  /* 17. A replayed obfuscated2 header (plain, l0): the same silence as a wrong secret. */
  {
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_INTERMEDIATE, 2, 0);
    uint8_t hdr[MTP_OBF2_HEADER_LEN];
    memcpy(hdr, c->hdr, sizeof(hdr));
    check_echo(c, 8, 'e', false, false);
    tc_close(c);
    int64_t m0 = metric(MTP_M_HS_FAIL_OBF2_REPLAY), bad0 = metric(MTP_M_HS_FAIL_BAD_SECRET);
    int opens = get_int(&n_open);
    c = tc_connect(port0, 0);
    uint8_t more[80];
    fill_pattern(more, sizeof(more), 'z', 5);
    write_all(c->fd, hdr, sizeof(hdr), false);
    write_all(c->fd, more, sizeof(more), false);
    expect_silence(c, MTP_M_HS_FAIL_OBF2_REPLAY, m0, "replayed obfuscated2 header");
    CHECK(metric(MTP_M_HS_FAIL_BAD_SECRET) == bad0);
    CHECK(get_int(&n_open) == opens);
  }

  /* 18. Per-SNI derived secrets (worker 2): a link works only with its own domain; the base
   * secret works with none. Its records toward the client carry at most 1000 bytes. */
  {
    uint8_t alice[16], bob[16];
    mtp_faketls_derive_secret(SECRET_B, "pepper", "alice.example", alice);
    mtp_faketls_derive_secret(SECRET_B, "pepper", "bob.example", bob);
    CHECK(memcmp(alice, bob, 16) != 0);
    struct tc *c = tc_open_tls(port5, alice, "alice.example", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                               TLS_CCS);
    check_echo(c, 5000, 'd', false, false);
    pthread_mutex_lock(&ev_mu);
    CHECK(strcmp(last_listener, "l5") == 0);
    pthread_mutex_unlock(&ev_mu);
    tc_close(c);
    c = tc_open_tls(port5, bob, "bob.example", 0, MTP_FAKETLS_KIND_PQ, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 64, 'd', false, false);
    tc_close(c);

    int64_t m0 = metric(MTP_M_HS_FAIL_TLS_BAD_HMAC);
    c = tc_open_tls(port5, alice, "bob.example", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2, TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_HMAC, m0, "alice's secret with bob's domain");
    m0 = metric(MTP_M_HS_FAIL_TLS_BAD_HMAC);
    c = tc_open_tls(port5, SECRET_B, "alice.example", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2,
                    TLS_NO_ANSWER);
    expect_silence(c, MTP_M_HS_FAIL_TLS_BAD_HMAC, m0, "base secret under per-SNI secrets");
  }

  /* 19. Record sizes toward the client follow tls_record_size, and the flight size follows
   * tls_flight_size (worker 2: 1000 and 1234). */
  {
    uint8_t alice[16];
    mtp_faketls_derive_secret(SECRET_B, "pepper", "alice.example", alice);
    struct tc *c = tc_open_tls(port5, alice, "alice.example", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_INTERMEDIATE,
                               2, TLS_NO_ANSWER);
    tc_read_answer(c);
    CHECK(c->flight_len == 1234);
    uint8_t pkt[3000];
    fill_pattern(pkt, sizeof(pkt), 's', 1);
    tc_send(c, pkt, sizeof(pkt), false, false);
    /* read raw: records of <= 1000 payload bytes, 3004 bytes of plain in total */
    size_t plain = 0, recs = 0;
    uint8_t rec[5 + 1000];
    while (plain < sizeof(pkt) + 4) {
      ssize_t r = recv(c->fd, rec, 5, MSG_WAITALL);
      CHECK(r == 5);
      CHECK(rec[0] == 0x17 && rec[1] == 0x03 && rec[2] == 0x03);
      size_t l = ((size_t)rec[3] << 8) | rec[4];
      CHECK(l >= 1 && l <= 1000);
      CHECK(recv(c->fd, rec + 5, l, MSG_WAITALL) == (ssize_t)l);
      plain += l;
      recs++;
    }
    CHECK(plain == sizeof(pkt) + 4);
    CHECK(recs == 4);
    tc_close(c);
  }

  /* 20. Reload (mtp_front_worker_reconfigure). Generation 1: l0 keeps its socket with only
   * SECRET_B and a new global ad_tag, l2 is kept, l1 and l3 are removed, l9 is new. A client
   * accepted before keeps echoing; new clients get the new secrets and ad_tag; l9 serves;
   * l1 stops accepting. */
  struct sockaddr_storage bound9;
  uint16_t port9;
  int rfd9 = reserve_port(&bound9, &port9);
  {
    CHECK(wait_no_streams(5.0));
    struct tc *old_client = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(old_client, 64, 'o', false, false);
    struct tc *l1_client = tc_open(port1, SECRET_B, MTP_PROTO_ABRIDGED, 2, 0); /* l1 goes away */
    check_echo(l1_client, 64, 'l', false, false);
    int64_t l1_acc = lcount(&cfg, "l1", MTP_LSTAT_ACCEPTED);
    CHECK(lcount(&cfg, "l1", MTP_LSTAT_ACTIVE) == 1);

    struct test_gen *g1 = test_gen_new(1, 3);
    set_listener(&g1->cfg.listeners[0], "l0", &SECRET_B, 1, MTP_ALLOW_ALL);
    set_listener(&g1->cfg.listeners[1], "l2", l0_secrets, 2, MTP_ALLOW_FAKE_TLS);
    g1->cfg.listeners[1].tls_domains = domains("example.com", "cdn.example.org", &g1->cfg.listeners[1].ntls_domains);
    set_listener(&g1->cfg.listeners[2], "l9", &SECRET_X, 1, MTP_ALLOW_ABRIDGED);
    for (size_t i = 0; i < 3; i++)
      set_loopback(&g1->cfg.listeners[i]);
    g1->bound[0] = bound[0];
    g1->bound[1] = bound[2];
    g1->bound[2] = bound9;
    CHECK(mtp_front_worker_gen(worker) == NULL);
    CHECK(reconfigure(worker, &g1->g, NULL) == 3);
    CHECK(mtp_front_worker_gen(worker) == &g1->g);

    check_echo(old_client, 1000, 'o', false, false); /* accepted under generation 0 */
    CHECK(port_refuses(port1));                      /* l1 is gone */
    CHECK(port_refuses(port3));                      /* and l3 */

    /* By listener under generation 1: l0, l2 and the new l9 in its order; l1, removed, while
     * its client is open (its counts go on); l3, removed without clients, not at all. */
    {
      struct mtp_lstats_row *rows = NULL;
      size_t n = 0;
      CHECK(mtp_lstats_sum(lstats, &g1->cfg, &rows, &n) == MTP_OK);
      CHECK(n == 4);
      CHECK(strcmp(rows[0].name, "l0") == 0 && !rows[0].removed && rows[0].v[MTP_LSTAT_ACTIVE] == 1);
      CHECK(strcmp(rows[1].name, "l2") == 0 && !rows[1].removed);
      CHECK(strcmp(rows[2].name, "l9") == 0 && !rows[2].removed && rows[2].v[MTP_LSTAT_ACCEPTED] == 0);
      CHECK(strcmp(rows[3].name, "l1") == 0 && rows[3].removed && rows[3].v[MTP_LSTAT_ACTIVE] == 1 &&
            rows[3].v[MTP_LSTAT_ACCEPTED] == l1_acc);
      mtp_lstats_rows_free(rows, n);
      CHECK(mtp_lstats_nblocks(lstats) == 5); /* worker: l0, l2, l9, l1 (l3 dropped); worker 2: l5 */
    }
    check_echo(l1_client, 100, 'l', false, false);
    tc_close(l1_client);
    CHECK(wait_unlisted(&g1->cfg, "l1"));

    int64_t bad0 = metric(MTP_M_HS_FAIL_BAD_SECRET);
    struct tc *c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    uint8_t p[16] = {0};
    tc_send(c, p, sizeof(p), false, false);
    expect_silence(c, MTP_M_HS_FAIL_BAD_SECRET, bad0, "the secret the reload removed");

    c = tc_open(port0, SECRET_B, MTP_PROTO_PADDED, 3, 0);
    check_echo(c, 100, 'n', false, false);
    pthread_mutex_lock(&ev_mu);
    CHECK(strcmp(last_listener, "l0") == 0);
    CHECK(last_open.has_ad_tag && last_open.ad_tag[0] == 0xbe && last_open.ad_tag[15] == 0xbe);
    pthread_mutex_unlock(&ev_mu);
    struct tc *g1_client = c; /* stays open across the next reload */

    c = tc_open(port9, SECRET_X, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 64, '9', false, false);
    pthread_mutex_lock(&ev_mu);
    CHECK(strcmp(last_listener, "l9") == 0);
    pthread_mutex_unlock(&ev_mu);
    CHECK(lcount(&g1->cfg, "l9", MTP_LSTAT_ACTIVE) == 1);
    CHECK(lcount(&g1->cfg, "l9", MTP_LSTAT_ACCEPTED) == 1);
    CHECK(lcount(&g1->cfg, "l9", MTP_LSTAT_HS_ABRIDGED) == 1);
    tc_close(c);
    CHECK(wait_lstat(&g1->cfg, "l9", MTP_LSTAT_ACTIVE, 0));

    uint8_t l2_secret[16];
    memcpy(l2_secret, SECRET_A, 16);
    c = tc_open_tls(port2, l2_secret, "example.com", 0, MTP_FAKETLS_KIND_CLASSIC, MTP_PROTO_PADDED, 2, 0);
    check_echo(c, 64, 't', false, false); /* the kept TLS-only listener */
    tc_close(c);
    CHECK(wait_lstat(&g1->cfg, "l2", MTP_LSTAT_ACTIVE, 0)); /* so the next reload drops l2's block */

    /* Generation 2: back to l0 with SECRET_A and SECRET_X (what the rest of the test uses) and
     * l9 removed. Generation 1 lives on while its client does, then it is freed. */
    struct test_gen *g2 = test_gen_new(2, 1);
    set_listener(&g2->cfg.listeners[0], "l0", l0_secrets, 2, MTP_ALLOW_ALL);
    set_loopback(&g2->cfg.listeners[0]);
    g2->bound[0] = bound[0];
    CHECK(reconfigure(worker, &g2->g, NULL) == 1);
    CHECK(port_refuses(port9));
    CHECK(port_refuses(port2));
    /* l9, l2 and l1 had no clients left: their blocks went with this reload. */
    CHECK(mtp_lstats_nblocks(lstats) == 2); /* worker: l0; worker 2: l5 */
    struct mtp_lstats_row lr;
    CHECK(!lrow(&g2->cfg, "l9", &lr) && !lrow(&g2->cfg, "l1", &lr));
    CHECK(lrow(&g2->cfg, "l0", &lr) && lr.v[MTP_LSTAT_ACTIVE] == 2); /* old_client, g1_client */
    mtp_front_gen_release(&g1->g); /* the maker's reference */
    CHECK(!gen_is_freed(1));       /* g1_client holds it */
    check_echo(g1_client, 300, 'g', false, false);
    check_echo(old_client, 300, 'o', false, false);
    tc_close(g1_client);
    CHECK(wait_gen_freed(1, 5.0));
    tc_close(old_client);

    c = tc_open(port0, SECRET_A, MTP_PROTO_ABRIDGED, 2, 0);
    check_echo(c, 64, 'a', false, false);
    tc_close(c);
    CHECK(!gen_is_freed(2));

    /* Worker 2 after a drain: a reload opens no listener, and fronting stays off. */
    struct sockaddr_storage bound6;
    uint16_t port6;
    int rfd6 = reserve_port(&bound6, &port6);
    struct test_gen *g3 = test_gen_new(3, 2);
    set_listener(&g3->cfg.listeners[0], "l5", &SECRET_B, 1, MTP_ALLOW_FAKE_TLS);
    g3->cfg.listeners[0].tls_domains = domains("alice.example", NULL, &g3->cfg.listeners[0].ntls_domains);
    set_listener(&g3->cfg.listeners[1], "l6", &SECRET_B, 1, MTP_ALLOW_ALL);
    set_loopback(&g3->cfg.listeners[0]);
    set_loopback(&g3->cfg.listeners[1]);
    g3->bound[0] = bound2[0];
    g3->bound[1] = bound6;
    CHECK(reconfigure(worker2, &g3->g, mtp_front_worker_stop_accepting) == 0);
    CHECK(port_refuses(port6));
    CHECK(port_refuses(port5));
    mtp_front_gen_release(&g3->g);
    CHECK(!gen_is_freed(3)); /* worker 2 holds it until it is freed */
    close(rfd6);
    mtp_front_gen_release(&g2->g); /* worker 1 holds generation 2 until it is freed */
    CHECK(!gen_is_freed(2));
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
  mtp_front_worker_free(worker2);
  CHECK(gen_is_freed(2) && gen_is_freed(3)); /* the workers held the last references */
  CHECK(mtp_lstats_nblocks(lstats) == 0);      /* and their counters */
  mtp_lstats_free(lstats);
  CHECK(uv_loop_close(&loop) == 0); /* no handle left behind */
  close(rfd9);
  close(rfd0);
  close(rfd1);
  close(rfd2);
  close(rfd3);
  close(rfd5);
  mtp_replay_free(&replay);
  mtp_config_free(&cfg);
  mtp_config_free(&cfg2);
  return check_report();
}
