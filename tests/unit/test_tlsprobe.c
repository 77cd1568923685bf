/*
 * test_tlsprobe.c - learning the fronted site's certificate flight size (front/tlsprobe.c).
 *
 * 1. Crafted servers on the test's own loop answer the probe's ClientHello with a known
 *    ServerHello / ChangeCipherSpec / ApplicationData sequence, cut into odd pieces, then fall
 *    silent, close, or misbehave (alert, TLS 1.2 handshake, garbage).
 * 2. A real TLS server: `openssl s_server` (RSA key, so every handshake has the same sizes)
 *    on 127.0.0.1 with a port the OS picks. The expected size is measured independently by a
 *    raw blocking client sending its own hello and adding up the 0x17 record payloads.
 * 3. Reload (mtp_tlsprobe_reconfigure): domains added, removed and kept (learnt sizes kept),
 *    a probe in flight for a removed domain dropped, a new target, a new interval, a fixed
 *    size; and a reader thread asking for sizes while the main thread swaps domain tables,
 *    reclaiming them only after the reader has been through a full call since (run under
 *    MTP_SANITIZE to see a use after free if tables were freed early).
 * Processes are stopped by PID.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <uv.h>

#include "config.h"
#include "crypto.h"
#include "err.h"
#include "faketls.h"
#include "log.h"
#include "metrics.h"
#include "tlsprobe.h"
#include "check.h"

#define WAIT_MS 15000

static uv_loop_t loop;
static struct mtp_tlsprobe *probe;
static struct mtp_config cfg;
static char *global_domains[2];
static char *l0_domains[2];
static struct mtp_listener_conf listeners[1];

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

static void on_closed_nop(uv_handle_t *h) { (void)h; }

/* ---- crafted servers ---- */

enum smode {
  S_SILENT, /* the flight, then silence */
  S_CLOSE,  /* the flight, then close */
  S_ALERT,  /* an alert instead of a ServerHello */
  S_TLS12,  /* ServerHello then a plaintext Certificate record */
  S_GARBAGE /* an HTTP error */
};

struct sconn {
  uv_tcp_t tcp;
  struct crafted *s;
  uint8_t hdr[5];
  size_t got; /* bytes of the ClientHello received */
  bool answered;
  bool closed;
};

#define MAX_SCONN 32

struct crafted {
  uv_tcp_t srv;
  enum smode mode;
  uint16_t port;
  const size_t *records; /* ApplicationData payload sizes, 0-terminated */
  size_t piece;          /* bytes per write */
  struct sconn *conns[MAX_SCONN];
  int nconns;
};

static void s_alloc(uv_handle_t *h, size_t s, uv_buf_t *b) {
  static char buf[65536];
  b->base = buf;
  b->len = sizeof(buf);
}

static void on_swritten(uv_write_t *req, int status) {
  free(req->data);
  free(req);
}

static void s_conn_closed(uv_handle_t *h) {
  struct sconn *c = h->data;
  c->closed = true;
}

static void sconn_close(struct sconn *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp))
    uv_close((uv_handle_t *)&c->tcp, s_conn_closed);
}

static void s_write(struct sconn *c, const uint8_t *data, size_t len) {
  for (size_t off = 0; off < len;) {
    size_t k = len - off < c->s->piece ? len - off : c->s->piece;
    uv_write_t *req = malloc(sizeof(*req));
    uint8_t *copy = malloc(k);
    CHECK(req != NULL && copy != NULL);
    memcpy(copy, data + off, k);
    req->data = copy;
    uv_buf_t b = uv_buf_init((char *)copy, (unsigned)k);
    CHECK(uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, on_swritten) == 0);
    off += k;
  }
}

static size_t put_record(uint8_t *out, uint8_t type, size_t len, uint8_t fill) {
  out[0] = type;
  out[1] = 0x03;
  out[2] = 0x03;
  out[3] = (uint8_t)(len >> 8);
  out[4] = (uint8_t)len;
  memset(out + 5, fill, len);
  return 5 + len;
}

static void s_answer(struct sconn *c) {
  static uint8_t out[200000];
  size_t n = 0;
  switch (c->s->mode) {
  case S_ALERT:
    n = put_record(out, 0x15, 2, 0x28);
    break;
  case S_GARBAGE:
    memcpy(out, "HTTP/1.1 400 Bad Request\r\n\r\n", 28);
    n = 28;
    break;
  case S_TLS12:
    n = put_record(out, 0x16, 80, 0x02);
    n += put_record(out + n, 0x16, 1500, 0x0b);
    break;
  default:
    n = put_record(out, 0x16, 122, 0x02);
    n += put_record(out + n, 0x14, 1, 0x01);
    for (const size_t *r = c->s->records; *r != 0; r++)
      n += put_record(out + n, 0x17, *r, 0xaa);
    break;
  }
  s_write(c, out, n);
  if (c->s->mode == S_CLOSE || c->s->mode == S_GARBAGE)
    sconn_close(c);
}

static void s_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  struct sconn *c = st->data;
  if (n < 0) {
    uv_read_stop(st);
    sconn_close(c);
    return;
  }
  /* The hello: a 5-byte header with its length; answer once all of it is here. */
  for (ssize_t i = 0; i < n && c->got + (size_t)i < 5; i++)
    c->hdr[c->got + (size_t)i] = (uint8_t)b->base[i];
  c->got += (size_t)n;
  if (!c->answered && c->got >= 5 && c->got >= 5 + (((size_t)c->hdr[3] << 8) | c->hdr[4])) {
    CHECK(c->hdr[0] == 0x16 && c->hdr[1] == 0x03 && c->hdr[2] == 0x01);
    c->answered = true;
    s_answer(c);
  }
}

static void s_on_conn(uv_stream_t *srv, int status) {
  struct crafted *s = srv->data;
  CHECK(status == 0);
  CHECK(s->nconns < MAX_SCONN);
  struct sconn *c = calloc(1, sizeof(*c));
  CHECK(c != NULL);
  c->s = s;
  s->conns[s->nconns++] = c;
  CHECK(uv_tcp_init(&loop, &c->tcp) == 0);
  c->tcp.data = c;
  CHECK(uv_accept(srv, (uv_stream_t *)&c->tcp) == 0);
  CHECK(uv_read_start((uv_stream_t *)&c->tcp, s_alloc, s_read) == 0);
}

static void crafted_start(struct crafted *s, enum smode mode, const size_t *records, size_t piece) {
  memset(s, 0, sizeof(*s));
  s->mode = mode;
  s->records = records;
  s->piece = piece;
  CHECK(uv_tcp_init(&loop, &s->srv) == 0);
  s->srv.data = s;
  struct sockaddr_in a;
  CHECK(uv_ip4_addr("127.0.0.1", 0, &a) == 0);
  CHECK(uv_tcp_bind(&s->srv, (struct sockaddr *)&a, 0) == 0);
  CHECK(uv_listen((uv_stream_t *)&s->srv, 8, s_on_conn) == 0);
  int alen = sizeof(a);
  CHECK(uv_tcp_getsockname(&s->srv, (struct sockaddr *)&a, &alen) == 0);
  s->port = ntohs(a.sin_port);
}

static bool pred_crafted_closed(void *arg) {
  struct crafted *s = arg;
  for (int i = 0; i < s->nconns; i++)
    if (!s->conns[i]->closed)
      return false;
  return true;
}

static void probe_end(void);

/* Closes the server and its connections, then ends the prober (if any). */
static void crafted_stop(struct crafted *s) {
  for (int i = 0; i < s->nconns; i++)
    sconn_close(s->conns[i]);
  uv_close((uv_handle_t *)&s->srv, on_closed_nop);
  CHECK(check_run_until(&loop, pred_crafted_closed, s, WAIT_MS));
  for (int i = 0; i < s->nconns; i++)
    free(s->conns[i]);
  s->nconns = 0;
  if (probe != NULL)
    probe_end();
}

/* ---- probing ---- */

struct want_count {
  int64_t ok, fail; /* wait until either counter reaches this */
};
static bool pred_probe_counts(void *arg) {
  struct want_count *w = arg;
  return metric(MTP_M_TLS_PROBE_OK) >= w->ok || metric(MTP_M_TLS_PROBE_FAIL) >= w->fail;
}

static void use_domains(size_t nglobal, size_t nl0) {
  cfg.ntls_domains = nglobal;
  listeners[0].ntls_domains = nl0;
}

static void probe_end(void) {
  if (probe == NULL)
    return;
  mtp_tlsprobe_stop(probe);
  uv_run(&loop, UV_RUN_DEFAULT); /* every handle of the probe closes; nothing else runs */
  mtp_tlsprobe_free(probe);
  probe = NULL;
}

/* Runs one probe round against 127.0.0.1:port for example.test; returns the learnt size
 * (0 when it failed) after checking which counter moved. The prober stays set up: end it
 * with probe_end() once nothing else keeps the loop alive (after crafted_stop). */
static size_t probe_once(uint16_t port, bool expect_ok) {
  cfg.fronting_mode = MTP_FRONTING_HOST;
  free(cfg.fronting_host);
  cfg.fronting_host = strdup("127.0.0.1");
  cfg.fronting_port = port;
  use_domains(1, 0);
  int64_t ok0 = metric(MTP_M_TLS_PROBE_OK), fail0 = metric(MTP_M_TLS_PROBE_FAIL);
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  struct want_count w = {ok0 + 1, fail0 + 1};
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(metric(MTP_M_TLS_PROBE_OK) == ok0 + (expect_ok ? 1 : 0));
  CHECK(metric(MTP_M_TLS_PROBE_FAIL) == fail0 + (expect_ok ? 0 : 1));
  return mtp_tlsprobe_learnt(probe, "example.test");
}

/* probe_once against a crafted server of its own (mode, records, piece as crafted_start);
 * the server and the prober are gone on return. */
static size_t probe_crafted(enum smode mode, const size_t *records, size_t piece, bool expect_ok) {
  struct crafted s;
  crafted_start(&s, mode, records, piece);
  size_t n = probe_once(s.port, expect_ok);
  crafted_stop(&s);
  return n;
}

static void test_crafted(void) {
  static const size_t recs[] = {1000, 2000, 517, 0};
  static const size_t big[] = {16401, 16401, 0};
  static const size_t empty_then[] = {0}; /* no ApplicationData at all */
  size_t pieces[] = {1, 3, 7, 100, 65536};
  for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++)
    CHECK_MSG(probe_crafted(S_SILENT, recs, pieces[i], true) == 3517, "piece %zu", pieces[i]);
  CHECK(probe_crafted(S_CLOSE, recs, 5, true) == 3517);
  /* More than one record can carry: clamped to the largest record we send. */
  CHECK(probe_crafted(S_SILENT, big, 4096, true) == MTP_FAKETLS_MAX_PAYLOAD);
  /* Failures: nothing learnt. */
  CHECK(probe_crafted(S_CLOSE, empty_then, 64, false) == 0);
  CHECK(probe_crafted(S_ALERT, NULL, 64, false) == 0);
  CHECK(probe_crafted(S_TLS12, NULL, 64, false) == 0);
  CHECK(probe_crafted(S_GARBAGE, NULL, 64, false) == 0);
  /* A closed port. */
  struct crafted s;
  crafted_start(&s, S_SILENT, recs, 64);
  uint16_t port = s.port;
  crafted_stop(&s);
  CHECK(probe_once(port, false) == 0);
  probe_end();
}

/* The flight's read deadline: a server that sends a ServerHello and then nothing. */
static void test_read_timeout(void) {
  static const size_t none[] = {0};
  cfg.fronting_connect_timeout = 0.3;
  CHECK(probe_crafted(S_SILENT, none, 64, false) == 0);
  cfg.fronting_connect_timeout = 5;
}

/* Every distinct domain (global and per listener) is probed, again every interval; learnt
 * sizes are served by flight_size. */
static void test_domains_and_interval(void) {
  static const size_t recs[] = {700, 800, 0};
  struct crafted s;
  crafted_start(&s, S_CLOSE, recs, 1000);
  cfg.fronting_mode = MTP_FRONTING_HOST;
  free(cfg.fronting_host);
  cfg.fronting_host = strdup("[127.0.0.1]"); /* brackets are accepted around any host */
  cfg.fronting_port = s.port;
  cfg.tls_probe_interval = 0.2;
  use_domains(1, 2); /* example.test, other.test, example.test again: two distinct */
  int64_t ok0 = metric(MTP_M_TLS_PROBE_OK);
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  /* Random in 2500..4600 until learnt, drawn per call. */
  bool differs = false;
  size_t first = mtp_tlsprobe_flight_size(probe, "example.test");
  for (int i = 0; i < 200; i++) {
    size_t n = mtp_tlsprobe_flight_size(probe, "example.test");
    CHECK(n >= 2500 && n <= 4600);
    differs |= n != first;
  }
  CHECK(differs);
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 0);
  /* Two rounds of two domains. */
  struct want_count w = {ok0 + 4, INT64_MAX};
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(s.nconns >= 4);
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 1500);
  CHECK(mtp_tlsprobe_learnt(probe, "other.test") == 1500);
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == 1500);
  CHECK(mtp_tlsprobe_flight_size(probe, "other.test") == 1500);
  CHECK(mtp_tlsprobe_learnt(probe, "unknown.test") == 0);
  size_t n = mtp_tlsprobe_flight_size(probe, "unknown.test");
  CHECK(n >= 2500 && n <= 4600);
  crafted_stop(&s);
  cfg.tls_probe_interval = 3600;
}

/* A fixed size, or fronting off: no probe at all (nothing on the loop). */
static void test_no_probes(void) {
  int64_t ok0 = metric(MTP_M_TLS_PROBE_OK), fail0 = metric(MTP_M_TLS_PROBE_FAIL);
  cfg.fronting_mode = MTP_FRONTING_HOST;
  cfg.fronting_port = 9;
  use_domains(1, 2);
  cfg.tls_flight_size = 3210;
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  CHECK(!uv_loop_alive(&loop));
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == 3210);
  CHECK(mtp_tlsprobe_flight_size(probe, "unknown.test") == 3210);
  probe_end();
  cfg.tls_flight_size = 100000; /* clamped to what one record carries */
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == MTP_FAKETLS_MAX_PAYLOAD);
  probe_end();
  cfg.tls_flight_size = 0;
  cfg.fronting_mode = MTP_FRONTING_OFF;
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  CHECK(!uv_loop_alive(&loop));
  size_t n = mtp_tlsprobe_flight_size(probe, "example.test");
  CHECK(n >= 2500 && n <= 4600);
  probe_end();
  CHECK(metric(MTP_M_TLS_PROBE_OK) == ok0 && metric(MTP_M_TLS_PROBE_FAIL) == fail0);
  /* NULL (no prober at all) still gives a plausible size. */
  n = mtp_tlsprobe_flight_size(NULL, "example.test");
  CHECK(n >= 2500 && n <= 4600);
  CHECK(mtp_tlsprobe_learnt(NULL, "example.test") == 0);
}

/* stop() while probes are resolving/connecting: everything closes, nothing is counted. */
static void test_stop_early(void) {
  static const size_t recs[] = {100, 0};
  struct crafted s;
  crafted_start(&s, S_SILENT, recs, 64);
  cfg.fronting_mode = MTP_FRONTING_HOST;
  free(cfg.fronting_host);
  cfg.fronting_host = strdup("localhost");
  cfg.fronting_port = s.port;
  use_domains(1, 2);
  int64_t ok0 = metric(MTP_M_TLS_PROBE_OK);
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  mtp_tlsprobe_stop(probe);
  crafted_stop(&s);
  CHECK(metric(MTP_M_TLS_PROBE_OK) == ok0);
}

/* ---- reload ---- */

/* Ends the prober while several crafted servers are up: they are closed first (probe_end runs
 * the loop until nothing is left on it). */
static void stop_two(struct crafted *a, struct crafted *b) {
  struct mtp_tlsprobe *keep = probe;
  probe = NULL;
  crafted_stop(a);
  probe = keep;
  crafted_stop(b); /* and probe_end */
}

static bool random_size(size_t n) { return n >= 2500 && n <= 4600; }

static void test_reconfigure(void) {
  static const size_t recs[] = {700, 800, 0}; /* 1500 */
  static const size_t recs2[] = {1000, 0};
  struct crafted s, s2;
  crafted_start(&s, S_CLOSE, recs, 1000);
  cfg.fronting_mode = MTP_FRONTING_HOST;
  free(cfg.fronting_host);
  cfg.fronting_host = strdup("127.0.0.1");
  cfg.fronting_port = s.port;
  cfg.tls_probe_interval = 3600;
  int64_t ok0 = metric(MTP_M_TLS_PROBE_OK), fail0 = metric(MTP_M_TLS_PROBE_FAIL);

  /* 1. example.test at setup, removed at once while its probe is still resolving: that probe
   * is dropped (never counted); other.test, new, is probed at once. */
  use_domains(1, 0);
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  use_domains(0, 1);
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  struct want_count w = {ok0 + 1, INT64_MAX};
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(mtp_tlsprobe_learnt(probe, "other.test") == 1500);
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 0);
  w.ok = ok0 + 2;
  CHECK(!check_run_until(&loop, pred_probe_counts, &w, 500)); /* the dropped probe counts nothing */
  CHECK(metric(MTP_M_TLS_PROBE_FAIL) == fail0);
  CHECK(mtp_tlsprobe_nretired(probe) == 1);
  mtp_tlsprobe_reclaim(probe);
  CHECK(mtp_tlsprobe_nretired(probe) == 0);

  /* 2. example.test added: probed at once; other.test keeps its size and is not probed again. */
  use_domains(1, 1);
  int nconns = s.nconns;
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  CHECK(mtp_tlsprobe_learnt(probe, "other.test") == 1500);
  CHECK(mtp_tlsprobe_flight_size(probe, "other.test") == 1500);
  CHECK(random_size(mtp_tlsprobe_flight_size(probe, "example.test")));
  w.ok = ok0 + 2;
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 1500);
  w.ok = ok0 + 3;
  CHECK(!check_run_until(&loop, pred_probe_counts, &w, 500));
  CHECK(s.nconns == nconns + 1);

  /* 3. other.test removed: forgotten. */
  use_domains(1, 0);
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  CHECK(mtp_tlsprobe_learnt(probe, "other.test") == 0);
  CHECK(random_size(mtp_tlsprobe_flight_size(probe, "other.test")));
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 1500);
  CHECK(mtp_tlsprobe_nretired(probe) == 2);

  /* 4. A new target: the old size is served until the new one is learnt, at once. */
  crafted_start(&s2, S_CLOSE, recs2, 1000);
  cfg.fronting_port = s2.port;
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == 1500);
  w.ok = ok0 + 3;
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(mtp_tlsprobe_learnt(probe, "example.test") == 1000);
  CHECK(s2.nconns == 1);

  /* 5. A shorter interval: probes repeat. */
  cfg.tls_probe_interval = 0.2;
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  w.ok = ok0 + 5;
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  CHECK(s2.nconns >= 3);

  /* 6. A fixed size: served for every domain, and no more probes. */
  cfg.tls_flight_size = 2222;
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == 2222);
  CHECK(mtp_tlsprobe_flight_size(probe, "unknown.test") == 2222);
  int64_t ok1 = metric(MTP_M_TLS_PROBE_OK);
  w.ok = ok1 + 1;
  CHECK(!check_run_until(&loop, pred_probe_counts, &w, 700)); /* the 0.2 s timer is stopped */
  /* 7. Learning again (fronting back on a learnt size): probes resume. */
  cfg.tls_flight_size = 0;
  CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
  CHECK(mtp_tlsprobe_flight_size(probe, "example.test") == 1000);
  w.ok = ok1 + 1;
  CHECK(check_run_until(&loop, pred_probe_counts, &w, WAIT_MS));
  mtp_tlsprobe_reclaim(probe);
  CHECK(mtp_tlsprobe_nretired(probe) == 0);
  CHECK(metric(MTP_M_TLS_PROBE_FAIL) == fail0);

  cfg.tls_probe_interval = 3600;
  use_domains(1, 2);
  stop_two(&s, &s2);
}

/* The reader: flight sizes and learnt sizes, as workers ask for them, until told to stop. */
static atomic_int reader_stop;
static atomic_long reader_passes;
static atomic_int reader_bad;

static void *reader_main(void *arg) {
  (void)arg;
  while (!atomic_load(&reader_stop)) {
    size_t n = mtp_tlsprobe_flight_size(probe, "other.test");
    if (n != 1111 && n != 2222)
      atomic_fetch_add(&reader_bad, 1);
    if (mtp_tlsprobe_learnt(probe, "example.test") != 0 || mtp_tlsprobe_learnt(probe, "zzz.test") != 0)
      atomic_fetch_add(&reader_bad, 1);
    atomic_fetch_add(&reader_passes, 1);
  }
  return NULL;
}

/* Waits (bounded) until the reader has started and finished a whole pass after now. */
static bool reader_quiesced(void) {
  long p0 = atomic_load(&reader_passes);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  while (atomic_load(&reader_passes) < p0 + 2) {
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 > WAIT_MS)
      return false;
    sched_yield();
  }
  return true;
}

static void test_reconfigure_concurrent(void) {
  cfg.fronting_mode = MTP_FRONTING_OFF; /* no probes: only the tables matter here */
  cfg.tls_flight_size = 1111;
  use_domains(1, 2);
  CHECK(mtp_tlsprobe_setup(&probe, &cfg, &loop) == MTP_OK);
  atomic_store(&reader_stop, 0);
  pthread_t th;
  CHECK(pthread_create(&th, NULL, reader_main, NULL) == 0);
  for (int i = 0; i < 2000; i++) {
    cfg.tls_flight_size = i % 2 ? 1111 : 2222;
    if (i % 3 == 0)
      use_domains(0, 1);
    else
      use_domains(1, 2);
    CHECK(mtp_tlsprobe_reconfigure(probe, &cfg) == MTP_OK);
    if (i % 4 == 3) { /* a few retired tables at a time */
      CHECK(reader_quiesced());
      mtp_tlsprobe_reclaim(probe);
    }
  }
  atomic_store(&reader_stop, 1);
  CHECK(pthread_join(th, NULL) == 0);
  CHECK(atomic_load(&reader_bad) == 0);
  CHECK(atomic_load(&reader_passes) > 0);
  cfg.tls_flight_size = 0;
  probe_end();
}

/* ---- a real TLS 1.3 server: openssl s_server ---- */

static pid_t ossl_pid = -1;
static int ossl_out = -1;

static void ossl_stop(void) {
  if (ossl_pid > 0) {
    kill(ossl_pid, SIGTERM);
    int st;
    waitpid(ossl_pid, &st, 0);
    ossl_pid = -1;
  }
  if (ossl_out >= 0)
    close(ossl_out);
  ossl_out = -1;
}

static void on_fail_cleanup(void) {
  ossl_stop();
  check_tmpdir_remove();
}

static int run_cmd(const char *cmd) {
  int r = system(cmd);
  return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

/* Starts openssl s_server on 127.0.0.1:0 with extra args; returns its port. */
static uint16_t ossl_start(const char *extra) {
  int p[2];
  CHECK(pipe(p) == 0);
  char cmd[2048];
  snprintf(cmd, sizeof(cmd), "exec openssl s_server -accept 127.0.0.1:0 -cert '%s' -key '%s' -www %s",
           check_path("cert.pem"), check_path("key.pem"), extra);
  ossl_pid = fork();
  CHECK(ossl_pid >= 0);
  if (ossl_pid == 0) {
    dup2(p[1], 1);
    dup2(p[1], 2);
    close(p[0]);
    close(p[1]);
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(127);
  }
  close(p[1]);
  ossl_out = p[0];
  /* Wait (bounded) for "ACCEPT 127.0.0.1:PORT". */
  char buf[4096];
  size_t have = 0;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    buf[have] = '\0';
    char *a = strstr(buf, "ACCEPT 127.0.0.1:");
    if (a != NULL && strchr(a, '\n') != NULL)
      return (uint16_t)atoi(a + strlen("ACCEPT 127.0.0.1:"));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long left = WAIT_MS - ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    struct pollfd pfd = {.fd = ossl_out, .events = POLLIN};
    CHECK_MSG(left > 0 && poll(&pfd, 1, (int)left) == 1, "openssl s_server did not start: %s", buf);
    ssize_t n = read(ossl_out, buf + have, sizeof(buf) - 1 - have);
    CHECK_MSG(n > 0, "openssl s_server exited: %s", buf);
    have += (size_t)n;
  }
}

/* The independent measurement: a blocking client sends a ClientHello for sni and adds up the
 * payloads of the server's 0x17 records until the server has been quiet for a second. */
static size_t raw_flight(uint16_t port, const char *sni) {
  uint8_t secret[16], hello[MTP_FAKETLS_CLIENT_HELLO_MAX];
  CHECK(mtp_random(secret, sizeof(secret)) == MTP_OK);
  int hl = mtp_faketls_client_hello(secret, sni, (uint32_t)time(NULL), MTP_FAKETLS_KIND_CLASSIC, hello, sizeof(hello));
  CHECK(hl > 0);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  CHECK(write(fd, hello, (size_t)hl) == hl);
  static uint8_t in[65536];
  size_t have = 0;
  for (;;) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, 1000) != 1)
      break;
    ssize_t n = read(fd, in + have, sizeof(in) - have);
    if (n <= 0)
      break;
    have += (size_t)n;
  }
  close(fd);
  size_t sum = 0, off = 0, n17 = 0;
  bool seen_ccs = false;
  while (off + 5 <= have) {
    size_t len = ((size_t)in[off + 3] << 8) | in[off + 4];
    CHECK(off + 5 + len <= have);
    if (in[off] == 0x17) {
      sum += len;
      n17++;
    }
    if (in[off] == 0x14)
      seen_ccs = true;
    off += 5 + len;
  }
  CHECK(off == have);
  CHECK(in[0] == 0x16);
  CHECK(n17 >= 1);
  (void)seen_ccs;
  return sum;
}

static void test_openssl(void) {
  check_tmpdir_make("mtp-tlsprobe");
  check_on_fail = on_fail_cleanup;
  char cmd[1024];
  snprintf(cmd, sizeof(cmd),
           "openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=example.test -days 1 -keyout '%s' -out '%s' "
           ">/dev/null 2>&1",
           check_path("key.pem"), check_path("cert.pem"));
  CHECK(run_cmd(cmd) == 0);

  /* TLS 1.3: learnt == measured. */
  uint16_t port = ossl_start("");
  size_t want = raw_flight(port, "example.test");
  CHECK(want > 300); /* EncryptedExtensions + an RSA certificate + CertificateVerify + Finished */
  CHECK(raw_flight(port, "example.test") == want); /* the server is deterministic */
  size_t got = probe_once(port, true);
  CHECK_MSG(got == want, "learnt %zu, measured %zu", got, want);
  probe_end();
  ossl_stop();

  /* TLS 1.2 only: nothing to learn. */
  port = ossl_start("-no_tls1_3");
  CHECK(probe_once(port, false) == 0);
  probe_end();
  ossl_stop();

  check_on_fail = NULL;
  check_tmpdir_remove();
}

int main(void) {
  mtp_log_level = MTP_LOG_ERROR;
  if (getenv("MTP_TEST_DEBUG") != NULL)
    mtp_log_level = MTP_LOG_DEBUG;
  signal(SIGPIPE, SIG_IGN);
  CHECK(uv_loop_init(&loop) == 0);
  memset(&cfg, 0, sizeof(cfg));
  global_domains[0] = "example.test";
  l0_domains[0] = "other.test";
  l0_domains[1] = "example.test";
  cfg.tls_domains = global_domains;
  listeners[0].name = "l0";
  listeners[0].tls_domains = l0_domains;
  cfg.listeners = listeners;
  cfg.nlisteners = 1;
  cfg.fronting_connect_timeout = 5;
  cfg.tls_probe_interval = 3600;

  test_crafted();
  test_read_timeout();
  test_domains_and_interval();
  test_no_probes();
  test_stop_early();
  test_reconfigure();
  test_reconfigure_concurrent();
  test_openssl();

  free(cfg.fronting_host);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  return check_report();
}
