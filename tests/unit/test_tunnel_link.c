/*
 * test_tunnel_link.c - the split-mode tunnel, both sides in one process on one loop: the back's
 * tunnel server (back/tunnel_server.c) over an echo link implemented here, the front's tunnel
 * link (front/tunnel_link.c) over it, and raw peers built from shared/tlsuv and
 * shared/tunnel_conn where a misbehaving or silent peer is needed. Certificates come from
 * mtp_certs_init/issue in a temporary directory.
 *
 * The echo link answers every packet asynchronously (uv_timer 0): a packet sent with quickack
 * first gets on_quickack(TOKEN(len)); a packet starting with "CLOS" makes the link close the
 * stream (on_close NORMAL) instead of echoing. A stream marked `hold` takes packets with
 * MTP_LINK_FULL and owes on_writable until the test releases it; `push` makes the link send a
 * packet the front did not ask for. Streams are found by the client port given at open.
 *
 * Covered: echo on many streams over two tunnel connections, packet sizes 4 B .. 1 MiB with a
 * 256 KiB window (so packets larger than the window), quick acks, close in both directions, a
 * refused open, per-stream credit (a held stream does not stop another one; the back closes a
 * stream whose front grants no credit, with reason backpressure, and the others go on),
 * protocol errors (a frame before Hello, version 0, a malformed frame), heartbeat timeouts in
 * both directions, reconnecting after the back stopped and came back, and peers refused before
 * any frame: a front certificate from another CA, a plain TCP client, garbage, a back whose
 * certificate lacks the name "back", a front not in the allow-list.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "alloc.h"
#include "certs.h"
#include "config.h"
#include "err.h"
#include "link.h"
#include "log.h"
#include "metrics.h"
#include "tlsuv.h"
#include "tunnel.h"
#include "tunnel_conn.h"
#include "tunnel_link.h"
#include "tunnel_server.h"
#include "check.h"
#include "link_front.h"

#define TOKEN(len) (0x5a000000u + (uint32_t)(len))
#define WINDOW (256u * 1024u)
#define WAIT_MS 10000

static uv_loop_t loop;
static char dir_a[300], dir_b[300]; /* the CA and its certs; another CA */
static char ca_both[600];           /* a CA file with both CAs */

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

static char *pathf(const char *dir, const char *file) {
  static char bufs[32][600];
  static int k;
  char *p = bufs[k++ % 32];
  snprintf(p, sizeof(bufs[0]), "%s/%s", dir, file);
  return p;
}

/* ---- the echo link under the back ---- */

struct estream {
  struct estream *next; /* in echo.streams; kept until the end of the test */
  void *front;
  const struct mtp_link_front_ops *ops;
  uint32_t port;
  bool closed; /* by the front (close) or by us (on_close) */
  bool hold;
  bool owed;
  size_t got;
  int packets;
};

struct eitem {
  struct eitem *next;
  struct estream *s;
  int kind; /* 0 packet, 1 quick ack, 2 close */
  uint32_t token;
  size_t len;
  uint8_t data[];
};

static struct echo {
  struct mtp_link link;
  uv_timer_t timer;
  struct eitem *head, **tail;
  struct estream *streams;
  int opens, closes, refuse;
  bool hold_new; /* streams opened now start held */
} echo;

static struct estream *echo_find(uint32_t port) {
  struct estream *found = NULL;
  for (struct estream *s = echo.streams; s != NULL; s = s->next)
    if (s->port == port)
      found = s; /* the latest */
  return found;
}

static void echo_deliver(uv_timer_t *t) {
  struct eitem *it = echo.head;
  echo.head = NULL;
  echo.tail = &echo.head;
  while (it != NULL) {
    struct eitem *n = it->next;
    struct estream *s = it->s;
    if (!s->closed) {
      if (it->kind == 0) {
        s->ops->on_packet(s->front, it->data, it->len);
      } else if (it->kind == 1) {
        s->ops->on_quickack(s->front, it->token);
      } else {
        s->closed = true;
        s->ops->on_close(s->front, MTP_LINK_CLOSE_NORMAL);
      }
    }
    mtp_free(it);
    it = n;
  }
}

static void echo_queue(struct estream *s, int kind, uint32_t token, const uint8_t *data, size_t len) {
  struct eitem *it = mtp_malloc(sizeof(*it) + len);
  CHECK(it != NULL);
  it->next = NULL;
  it->s = s;
  it->kind = kind;
  it->token = token;
  it->len = len;
  if (len > 0)
    memcpy(it->data, data, len);
  *echo.tail = it;
  echo.tail = &it->next;
  uv_timer_start(&echo.timer, echo_deliver, 0, 0);
}

static void *echo_open(struct mtp_link *link, const struct mtp_link_open *req, void *front,
                       const struct mtp_link_front_ops *ops, int *err) {
  if (echo.refuse) {
    *err = MTP_ENODC;
    return NULL;
  }
  struct estream *s = mtp_calloc(1, sizeof(*s));
  CHECK(s != NULL);
  s->front = front;
  s->ops = ops;
  s->hold = echo.hold_new;
  s->port = req->client_addr.ss_family == AF_INET ? ntohs(((const struct sockaddr_in *)&req->client_addr)->sin_port)
                                                  : 0;
  s->next = echo.streams;
  echo.streams = s;
  echo.opens++;
  *err = MTP_OK;
  return s;
}

static int echo_send(struct mtp_link *link, void *stream, const uint8_t *data, size_t len, bool quickack) {
  struct estream *s = stream;
  CHECK(!s->closed);
  s->got += len;
  s->packets++;
  if (s->hold) {
    s->owed = true;
    return MTP_LINK_FULL;
  }
  if (len >= 4 && memcmp(data, "CLOS", 4) == 0) {
    echo_queue(s, 2, 0, NULL, 0);
    return MTP_OK;
  }
  if (quickack)
    echo_queue(s, 1, TOKEN(len), NULL, 0);
  echo_queue(s, 0, 0, data, len);
  return MTP_OK;
}

static void echo_close(struct mtp_link *link, void *stream) {
  struct estream *s = stream;
  CHECK(!s->closed);
  s->closed = true;
  echo.closes++;
}

static void echo_release(struct estream *s) {
  s->hold = false;
  if (s->owed && !s->closed) {
    s->owed = false;
    s->ops->on_writable(s->front);
  }
}

static void echo_setup(void) {
  memset(&echo, 0, sizeof(echo));
  echo.tail = &echo.head;
  echo.link.open = echo_open;
  echo.link.send = echo_send;
  echo.link.close = echo_close;
  uv_timer_init(&loop, &echo.timer);
}

static void echo_free(void) {
  uv_close((uv_handle_t *)&echo.timer, NULL);
  struct eitem *it = echo.head;
  while (it != NULL) {
    struct eitem *n = it->next;
    mtp_free(it);
    it = n;
  }
  struct estream *s = echo.streams;
  while (s != NULL) {
    struct estream *n = s->next;
    mtp_free(s);
    s = n;
  }
}

/* ---- a fake front session: sends a planned list of packets, checks the echoes ---- */

static void pattern(int idx, size_t seq, uint8_t *buf, size_t len) {
  uint32_t x = (uint32_t)idx * 2654435761u + (uint32_t)seq * 40503u + 1u;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    buf[i] = (uint8_t)x;
  }
}

struct tfront {
  struct lf_front lf; /* first: the link delivers to it (tests/tools/link_front.h) */
  int idx;
  const size_t *sizes;
  size_t nsizes;
  size_t next;     /* next packet to send */
  size_t recv_seq; /* next echo expected */
  bool full;
  bool quickack;   /* send with quickack */
  bool no_verify;  /* do not compare echoes with what was sent */
  int bad;
};

static uint8_t *scratch; /* 1 MiB + */

static void tf_pump(struct tfront *f) {
  while (f->lf.stream != NULL && !f->full && f->next < f->nsizes) {
    size_t len = f->sizes[f->next];
    pattern(f->idx, f->next, scratch, len);
    int rc = f->lf.link->send(f->lf.link, f->lf.stream, scratch, len, f->quickack);
    CHECK_MSG(rc >= 0, "send: %s", mtp_strerror(rc));
    f->next++;
    if (rc == MTP_LINK_FULL)
      f->full = true;
  }
}

/* Each echo must be the packet sent in its place. */
static void tf_packet(struct lf_front *lf, const uint8_t *data, size_t len) {
  struct tfront *f = (struct tfront *)lf;
  if (f->sizes != NULL && !f->no_verify) {
    if (f->recv_seq >= f->nsizes || f->sizes[f->recv_seq] != len) {
      f->bad++;
    } else {
      static uint8_t *want;
      if (want == NULL)
        want = malloc(MTP_TUNNEL_MAX_FRAME);
      pattern(f->idx, f->recv_seq, want, len);
      if (memcmp(want, data, len) != 0)
        f->bad++;
    }
    f->recv_seq++;
  }
}

static void tf_writable(struct lf_front *lf) {
  struct tfront *f = (struct tfront *)lf;
  f->full = false;
  tf_pump(f);
}


static void tf_open(struct tfront *f, struct mtp_link *link, int idx, uint16_t port) {
  memset(f, 0, sizeof(*f));
  f->lf.link = link;
  f->lf.packet_hook = tf_packet;
  f->lf.writable_hook = tf_writable;
  f->idx = idx;
  struct mtp_link_open o;
  lf_make_open(&o, 2, port);
  int err = MTP_OK;
  f->lf.stream = link->open(link, &o, f, &lf_ops, &err);
  CHECK_MSG(f->lf.stream != NULL, "open: %s", mtp_strerror(err));
}

/* ---- loop helpers ---- */

static bool wait_for(bool (*pred)(void *), void *arg) { return check_run_until(&loop, pred, arg, WAIT_MS); }

static struct mtp_tunnel_link *cur_link;
static struct mtp_tunnel_server *cur_srv;
static int want_n;
static int64_t want_v;
static enum mtp_metric want_m;

static bool p_link_up(void *a) { return mtp_tunnel_link_up(cur_link) >= want_n; }
static bool p_link_down(void *a) { return mtp_tunnel_link_up(cur_link) == 0; }
static bool p_srv_fronts(void *a) { return mtp_tunnel_server_fronts(cur_srv) == want_n; }
static bool p_metric_ge(void *a) { return metric(want_m) >= want_v; }
static bool p_tf_done(void *a) {
  struct tfront *f = a;
  return f->recv_seq >= f->nsizes || f->bad > 0 || f->lf.closes > 0;
}
static bool p_tf_closed(void *a) { return ((struct tfront *)a)->lf.closes > 0; }
static bool p_tf_packets(void *a) { return ((struct tfront *)a)->lf.packets >= want_n; }
static bool p_tf_writable(void *a) { return ((struct tfront *)a)->lf.writables > 0; }
static bool p_echo_closes(void *a) { return echo.closes >= want_n; }
static bool p_echo_opens(void *a) { return echo.opens >= want_n; }
static bool p_false(void *a) { return false; }

/* Runs the loop for ms milliseconds (to see that something does NOT happen). */
static void run_for(int ms) { check_run_until(&loop, p_false, NULL, ms); }

static void wait_metric(enum mtp_metric m, int64_t v) {
  want_m = m;
  want_v = v;
  CHECK_MSG(wait_for(p_metric_ge, NULL), "metric %d stayed at %lld, want >= %lld", (int)m,
            (long long)metric(m), (long long)v);
}

/* ---- configuration and sockets ---- */

static struct mtp_config *configs[32]; /* freed at the end, after the loop */
static int nconfigs;

static void set_str(char **field, const char *v) {
  mtp_free(*field);
  *field = v != NULL ? mtp_strdup(v) : NULL;
}

static void base_config(struct mtp_config *cfg) {
  mtp_config_defaults(cfg);
  CHECK(nconfigs < 32);
  configs[nconfigs++] = cfg;
  set_str(&cfg->tunnel_ca, pathf(dir_a, "ca.crt"));
  cfg->tunnel_window = WINDOW;
  cfg->tunnel_heartbeat = 0.25;
  cfg->tunnel_timeout = 3.0;
  cfg->tunnel_conns = 1;
}

static void back_config(struct mtp_config *cfg, const char *name) {
  base_config(cfg);
  char crt[64], key[64];
  snprintf(crt, sizeof(crt), "%s.crt", name);
  snprintf(key, sizeof(key), "%s.key", name);
  set_str(&cfg->tunnel_cert, pathf(dir_a, crt));
  set_str(&cfg->tunnel_key, pathf(dir_a, key));
  set_str(&cfg->node_name, "test-back");
}

static void front_config(struct mtp_config *cfg, const char *dir, const char *name, const char *ca, uint16_t port) {
  base_config(cfg);
  char crt[64], key[64], back[64];
  snprintf(crt, sizeof(crt), "%s.crt", name);
  snprintf(key, sizeof(key), "%s.key", name);
  set_str(&cfg->tunnel_cert, pathf(dir, crt));
  set_str(&cfg->tunnel_key, pathf(dir, key));
  set_str(&cfg->tunnel_ca, ca);
  snprintf(back, sizeof(back), "127.0.0.1:%u", port);
  set_str(&cfg->back, back);
  set_str(&cfg->node_name, name);
}

/* Holds a loopback port like the app does: bound with SO_REUSEPORT, not listening. */
static int reserve_port(struct sockaddr_storage *out) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  socklen_t len = sizeof(*out);
  CHECK(getsockname(fd, (struct sockaddr *)out, &len) == 0);
  return fd;
}

static uint16_t port_of(const struct sockaddr_storage *a) { return ntohs(((const struct sockaddr_in *)a)->sin_port); }

static struct mtp_tunnel_server *server_start(const struct mtp_config *cfg, const struct sockaddr_storage *bound) {
  struct mtp_tunnel_server *s = NULL;
  char err[300];
  int rc = mtp_tunnel_server_setup(&s, cfg, &loop, 0, bound, &echo.link, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "server setup: %s", err);
  return s;
}

static struct mtp_tunnel_link *link_start(const struct mtp_config *cfg) {
  struct mtp_tunnel_link *t = NULL;
  char err[300];
  int rc = mtp_tunnel_link_setup(&t, cfg, &loop, 0, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "link setup: %s", err);
  return t;
}

/* ---- raw peers ---- */

/* A raw TLS peer (client or server) that records the frames it gets and sends what it is told. */
struct rawtls {
  struct mtp_tlsuv *t;
  struct mtp_tunnel_dec dec;
  bool open, closed;
  int close_err;
  char why[300];
  int frames, hellos, pings;
  int last_case;
  uint32_t last_close_reason;
  bool hello_on_open;  /* send a Hello(version 1) right after the handshake */
};

static void raw_send_frame(struct rawtls *r, const Mtp__Frame *f) {
  uint8_t buf[512];
  ssize_t n = mtp_tunnel_encode(f, buf, sizeof(buf));
  CHECK(n > 0);
  CHECK(mtp_tlsuv_write(r->t, buf, (size_t)n) == MTP_OK);
}

static void raw_send_hello(struct rawtls *r, uint32_t version) {
  Mtp__Hello h = MTP__HELLO__INIT;
  h.version = version;
  h.node = "raw";
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_HELLO;
  f.hello = &h;
  raw_send_frame(r, &f);
}

static void raw_on_open(struct mtp_tlsuv *t) {
  struct rawtls *r = mtp_tlsuv_data(t);
  r->open = true;
  if (r->hello_on_open)
    raw_send_hello(r, 1);
}

static void raw_on_data(struct mtp_tlsuv *t, const uint8_t *data, size_t len) {
  struct rawtls *r = mtp_tlsuv_data(t);
  size_t off = 0;
  while (off < len) {
    Mtp__Frame *f = NULL;
    ssize_t n = mtp_tunnel_decode(&r->dec, data + off, len - off, &f);
    CHECK(n >= 0);
    off += (size_t)n;
    if (f == NULL)
      continue;
    r->frames++;
    r->last_case = f->msg_case;
    if (f->msg_case == MTP__FRAME__MSG_HELLO)
      r->hellos++;
    if (f->msg_case == MTP__FRAME__MSG_PING)
      r->pings++;
    if (f->msg_case == MTP__FRAME__MSG_CLOSE)
      r->last_close_reason = f->close->reason;
    mtp_tunnel_frame_free(f);
  }
}

static void raw_on_close(struct mtp_tlsuv *t, int err, const char *why) {
  struct rawtls *r = mtp_tlsuv_data(t);
  r->closed = true;
  r->close_err = err;
  snprintf(r->why, sizeof(r->why), "%s", why);
  r->t = NULL;
  mtp_tunnel_dec_free(&r->dec);
}

static const struct mtp_tlsuv_cbs RAW_CBS = {
    .on_open = raw_on_open,
    .on_data = raw_on_data,
    .on_close = raw_on_close,
};

static struct mtp_tls_conf *tls_conf(enum mtp_tls_role role, const char *dir, const char *name, const char *ca) {
  char crt[64], key[64], err[300];
  snprintf(crt, sizeof(crt), "%s.crt", name);
  snprintf(key, sizeof(key), "%s.key", name);
  struct mtp_tls_conf_opts o = {
      .role = role,
      .cert = pathf(dir, crt),
      .key = pathf(dir, key),
      .ca = ca,
      .peer_name = role == MTP_TLS_CLIENT ? MTP_CERTS_BACK_NAME : NULL,
      .handshake_timeout_ms = 5000,
  };
  struct mtp_tls_conf *c = NULL;
  int rc = mtp_tls_conf_setup(&c, &o, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "tls conf: %s", err);
  return c;
}

static void raw_connect(struct rawtls *r, struct mtp_tls_conf *conf, const struct sockaddr_storage *addr) {
  memset(r, 0, sizeof(*r));
  mtp_tunnel_dec_init(&r->dec);
  CHECK(mtp_tlsuv_connect(&r->t, conf, &loop, (const struct sockaddr *)addr, &RAW_CBS, r) == MTP_OK);
}

static bool p_raw_open(void *a) { return ((struct rawtls *)a)->open || ((struct rawtls *)a)->closed; }
static bool p_raw_closed(void *a) { return ((struct rawtls *)a)->closed; }

/* A raw front built on mtp_tunnel_conn: opens streams by hand, grants credit only when told. */
#define RF_STREAMS 8
static struct rawfront {
  struct mtp_tunnel_conn *c;
  bool up, closed;
  size_t bytes[RF_STREAMS];
  int packets[RF_STREAMS];
  int closes[RF_STREAMS];
  uint32_t close_reason[RF_STREAMS];
  bool auto_credit[RF_STREAMS];
} rf;

static void rf_on_up(struct mtp_tunnel_conn *c) { rf.up = true; }

static void rf_on_frame(struct mtp_tunnel_conn *c, const Mtp__Frame *f) {
  if (f->msg_case == MTP__FRAME__MSG_DATA) {
    uint64_t id = f->data->stream;
    CHECK(id < RF_STREAMS);
    rf.bytes[id] += f->data->packet.len;
    rf.packets[id]++;
    if (rf.auto_credit[id])
      CHECK(mtp_tunnel_conn_send_credit(c, id, f->data->packet.len) == MTP_OK);
  } else if (f->msg_case == MTP__FRAME__MSG_CLOSE) {
    uint64_t id = f->close->stream;
    CHECK(id < RF_STREAMS);
    rf.closes[id]++;
    rf.close_reason[id] = f->close->reason;
  }
}

static void rf_on_close(struct mtp_tunnel_conn *c, int err, const char *why) {
  rf.closed = true;
  rf.c = NULL;
}

static const struct mtp_tunnel_conn_ops RF_OPS = {.on_up = rf_on_up, .on_frame = rf_on_frame, .on_close = rf_on_close};

static void rf_open_stream(uint64_t id, uint16_t port) {
  uint8_t ip[4] = {10, 9, 8, 7};
  Mtp__Open o = MTP__OPEN__INIT;
  o.stream = id;
  o.dc = 2;
  o.proto = MTP_PROTO_INTERMEDIATE;
  o.client_ip.data = ip;
  o.client_ip.len = 4;
  o.client_port = port;
  o.listener = "raw";
  Mtp__Frame f = MTP__FRAME__INIT;
  f.msg_case = MTP__FRAME__MSG_OPEN;
  f.open = &o;
  CHECK(mtp_tunnel_conn_send(rf.c, &f) == MTP_OK);
}

static bool p_rf_up(void *a) { return rf.up || rf.closed; }
static bool p_rf_closed(void *a) { return rf.closed; }
static bool p_rf_bytes(void *a) { return rf.bytes[*(int *)a] >= (size_t)want_v; }
static bool p_rf_close(void *a) { return rf.closes[*(int *)a] > 0; }

/* ---- a plain TCP client ---- */

static struct plain {
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_write_t wreq;
  bool connected, eof, closed;
  size_t got;
  const char *send;
} plain;

static void plain_alloc(uv_handle_t *h, size_t s, uv_buf_t *b) {
  static char buf[4096];
  *b = uv_buf_init(buf, sizeof(buf));
}

static void plain_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  if (n > 0)
    plain.got += (size_t)n;
  else if (n < 0)
    plain.eof = true;
}

static void plain_written(uv_write_t *w, int status) {}

static void plain_connected(uv_connect_t *c, int status) {
  CHECK(status == 0);
  plain.connected = true;
  uv_read_start((uv_stream_t *)&plain.tcp, plain_alloc, plain_read);
  if (plain.send != NULL) {
    uv_buf_t b = uv_buf_init((char *)plain.send, (unsigned)strlen(plain.send));
    uv_write(&plain.wreq, (uv_stream_t *)&plain.tcp, &b, 1, plain_written);
  }
}

static void plain_closed(uv_handle_t *h) { plain.closed = true; }

static bool p_plain_eof(void *a) { return plain.eof; }
static bool p_plain_closed(void *a) { return plain.closed; }

/* Connects, sends `data` (may be NULL), and checks the back closes the connection without a
 * byte of answer beyond a TLS alert, counting a tunnel failure. */
static void plain_client(const struct sockaddr_storage *addr, const char *data) {
  memset(&plain, 0, sizeof(plain));
  plain.send = data;
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  uv_tcp_init(&loop, &plain.tcp);
  CHECK(uv_tcp_connect(&plain.creq, &plain.tcp, (const struct sockaddr *)addr, plain_connected) == 0);
  CHECK(wait_for(p_plain_eof, NULL));
  CHECK(plain.got < 64); /* at most an alert record; never a frame */
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 1);
  uv_close((uv_handle_t *)&plain.tcp, plain_closed);
  CHECK(wait_for(p_plain_closed, NULL));
}

/* ---- a raw back: TLS server that says Hello and then nothing (for the heartbeat test) ---- */

static struct rawback {
  uv_tcp_t listener;
  struct mtp_tls_conf *conf;
  struct rawtls peer;
  int accepted;
} rb;

static void rb_on_connection(uv_stream_t *server, int status) {
  CHECK(status == 0);
  rb.accepted++;
  memset(&rb.peer, 0, sizeof(rb.peer));
  mtp_tunnel_dec_init(&rb.peer.dec);
  rb.peer.hello_on_open = true;
  CHECK(mtp_tlsuv_accept(&rb.peer.t, rb.conf, server, &RAW_CBS, &rb.peer) == MTP_OK);
}

/* ---- the tests ---- */

static struct mtp_config cfg_back, cfg_front;
static struct sockaddr_storage srv_addr;
static struct mtp_tunnel_server *srv;
static struct mtp_tunnel_link *front;

static void test_data_header(void) {
  static const size_t lens[] = {0, 1, 4, 127, 128, 16383, 16384, 1048576};
  static const uint64_t ids[] = {1, 127, 128, 0x123456789abcull, UINT64_MAX};
  uint8_t *buf = malloc(MTP_TUNNEL_MAX_FRAME);
  CHECK(buf != NULL);
  for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
    for (size_t j = 0; j < sizeof(ids) / sizeof(ids[0]); j++) {
      for (int qa = 0; qa < 2; qa++) {
        size_t h = mtp_tunnel_data_header(buf, ids[j], lens[i], qa);
        CHECK(h > 0 && h <= MTP_TUNNEL_DATA_HDR_MAX);
        pattern(7, i, buf + h, lens[i]);
        struct mtp_tunnel_dec d;
        mtp_tunnel_dec_init(&d);
        Mtp__Frame *f = NULL;
        CHECK(mtp_tunnel_decode(&d, buf, h + lens[i], &f) == (ssize_t)(h + lens[i]));
        CHECK(f != NULL && f->msg_case == MTP__FRAME__MSG_DATA);
        CHECK(f->data->stream == ids[j] && f->data->quickack == (qa != 0) && f->data->packet.len == lens[i]);
        CHECK(lens[i] == 0 || memcmp(f->data->packet.data, buf + h, lens[i]) == 0);
        /* the same frame built the protobuf way has the same size */
        Mtp__Data dd = MTP__DATA__INIT;
        dd.stream = ids[j];
        dd.quickack = qa;
        dd.packet.data = buf + h;
        dd.packet.len = lens[i];
        Mtp__Frame ff = MTP__FRAME__INIT;
        ff.msg_case = MTP__FRAME__MSG_DATA;
        ff.data = &dd;
        CHECK(mtp_tunnel_frame_size(&ff) == h + lens[i] || lens[i] == 0);
        mtp_tunnel_frame_free(f);
        mtp_tunnel_dec_free(&d);
      }
    }
  }
  CHECK(mtp_tunnel_data_header(buf, 0, 4, false) == 0);
  CHECK(mtp_tunnel_data_header(buf, 1, MTP_TUNNEL_MAX_FRAME, false) == 0);
  free(buf);
}

static void test_conf_errors(void) {
  char err[300];
  struct mtp_tls_conf *c = NULL;
  struct mtp_tls_conf_opts o = {.role = MTP_TLS_CLIENT,
                                .cert = pathf(dir_a, "front1.crt"),
                                .key = pathf(dir_a, "missing.key"),
                                .ca = pathf(dir_a, "ca.crt"),
                                .cert_opt = "tunnel_cert",
                                .key_opt = "tunnel_key",
                                .ca_opt = "tunnel_ca"};
  CHECK(mtp_tls_conf_setup(&c, &o, err, sizeof(err)) == MTP_EIO && c == NULL);
  CHECK_MSG(strstr(err, "tunnel_key") != NULL && strstr(err, "missing.key") != NULL, "%s", err);
  o.key = pathf(dir_a, "front2.key"); /* another key */
  CHECK(mtp_tls_conf_setup(&c, &o, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "do not match") != NULL && strstr(err, "front1.crt") != NULL, "%s", err);
  o.key = pathf(dir_a, "front1.key");
  o.ca = pathf(dir_b, "ca.crt"); /* a CA that did not sign it */
  CHECK(mtp_tls_conf_setup(&c, &o, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "not signed by tunnel_ca") != NULL, "%s", err);
  o.ca = pathf(dir_a, "front1.key"); /* not a certificate */
  CHECK(mtp_tls_conf_setup(&c, &o, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "tunnel_ca") != NULL && strstr(err, "front1.key") != NULL, "%s", err);
  o.ca = NULL;
  CHECK(mtp_tls_conf_setup(&c, &o, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "tunnel_ca: not set") != NULL, "%s", err);

  static struct mtp_config cfg;
  front_config(&cfg, dir_a, "front1", pathf(dir_a, "ca.crt"), 1);
  set_str(&cfg.back, "no-port-here");
  struct mtp_tunnel_link *t = NULL;
  CHECK(mtp_tunnel_link_setup(&t, &cfg, &loop, 0, err, sizeof(err)) == MTP_EINVAL && t == NULL);
  CHECK_MSG(strstr(err, "back") != NULL, "%s", err);
  set_str(&cfg.back, "127.0.0.1:1");
  set_str(&cfg.tunnel_cert, pathf(dir_a, "nothing.crt"));
  CHECK(mtp_tunnel_link_setup(&t, &cfg, &loop, 0, err, sizeof(err)) == MTP_EIO && t == NULL);
  CHECK_MSG(strstr(err, "tunnel_cert") != NULL && strstr(err, "nothing.crt") != NULL, "%s", err);
}

static void test_up(void) {
  int64_t connects = metric(MTP_M_TUNNEL_CONNECTS);
  cur_link = front;
  want_n = 2;
  CHECK(wait_for(p_link_up, NULL));
  cur_srv = srv;
  CHECK(wait_for(p_srv_fronts, NULL));
  CHECK(metric(MTP_M_TUNNEL_CONNECTS) >= connects + 4); /* two connections, counted by both sides */
  CHECK(metric(MTP_M_TUNNEL_UP) == 4);
}

static const size_t SMALL_SIZES[] = {4, 8, 12, 100, 1000, 4096, 16380, 16384, 16388, 65536, 8, 4};
static const size_t BIG_SIZES[] = {4, 262144, 4, 1048576, 600000, 4, 262148, 1048576, 8};

static void test_echo_many(void) {
  enum { N = 24 };
  static struct tfront f[N];
  int64_t opened = metric(MTP_M_TUNNEL_STREAMS_OPENED);
  for (int i = 0; i < N; i++) {
    tf_open(&f[i], mtp_tunnel_link_get(front), i, (uint16_t)(1000 + i));
    if (i < 3) {
      f[i].sizes = BIG_SIZES;
      f[i].nsizes = sizeof(BIG_SIZES) / sizeof(BIG_SIZES[0]);
    } else {
      f[i].sizes = SMALL_SIZES;
      f[i].nsizes = sizeof(SMALL_SIZES) / sizeof(SMALL_SIZES[0]);
    }
    tf_pump(&f[i]);
  }
  for (int i = 0; i < N; i++) {
    CHECK_MSG(wait_for(p_tf_done, &f[i]), "stream %d: %zu of %zu echoes", i, f[i].recv_seq, f[i].nsizes);
    CHECK_MSG(f[i].bad == 0 && f[i].lf.closes == 0, "stream %d: bad %d closes %d (reason %d)", i, f[i].bad, f[i].lf.closes,
              f[i].lf.close_reason);
    CHECK(f[i].next == f[i].nsizes);
  }
  CHECK(metric(MTP_M_TUNNEL_STREAMS_OPENED) >= opened + 2 * N); /* front and back each count */
  CHECK(f[0].lf.writables > 0); /* the big packets ran out of credit at least once */
  for (int i = 0; i < N; i++) {
    struct estream *e = echo_find((uint16_t)(1000 + i));
    CHECK(e != NULL && !e->closed && e->got > 0);
  }
  int closes = echo.closes;
  struct mtp_link *l = mtp_tunnel_link_get(front);
  for (int i = 0; i < N; i++)
    l->close(l, f[i].lf.stream);
  want_n = closes + N;
  CHECK(wait_for(p_echo_closes, NULL));
  CHECK(metric(MTP_M_TUNNEL_STREAMS) == 0);
}

static void test_quickack_close(void) {
  struct mtp_link *l = mtp_tunnel_link_get(front);
  static const size_t one[] = {64};
  static struct tfront f, g, h, k;

  /* quick ack, then the back closes the stream */
  tf_open(&f, l, 100, 2000);
  f.sizes = one;
  f.nsizes = 1;
  f.quickack = true;
  tf_pump(&f);
  CHECK(wait_for(p_tf_done, &f));
  CHECK(f.bad == 0 && f.lf.quickacks == 1 && f.lf.last_token == TOKEN(64));
  uint8_t clos[8] = {'C', 'L', 'O', 'S'};
  CHECK(l->send(l, f.lf.stream, clos, sizeof(clos), false) == MTP_OK);
  CHECK(wait_for(p_tf_closed, &f));
  CHECK(f.lf.close_reason == MTP_LINK_CLOSE_NORMAL);

  /* the front closes: the link under the back sees it */
  int opens = echo.opens;
  tf_open(&g, l, 101, 2001);
  want_n = opens + 1;
  CHECK(wait_for(p_echo_opens, NULL));
  int closes = echo.closes;
  l->close(l, g.lf.stream);
  want_n = closes + 1;
  CHECK(wait_for(p_echo_closes, NULL));
  CHECK(echo_find(2001)->closed);

  /* the front closes from inside on_packet */
  tf_open(&k, l, 103, 2003);
  k.sizes = one;
  k.nsizes = 1;
  k.lf.close_in_packet = true;
  tf_pump(&k);
  closes = echo.closes;
  want_n = 1;
  CHECK(wait_for(p_tf_packets, &k));
  want_n = closes + 1;
  CHECK(wait_for(p_echo_closes, NULL));
  CHECK(k.lf.closes == 0);

  /* an open the back's link refuses */
  echo.refuse = 1;
  tf_open(&h, l, 102, 2002);
  CHECK(wait_for(p_tf_closed, &h));
  CHECK(h.lf.close_reason == MTP_LINK_CLOSE_NO_DC);
  echo.refuse = 0;
  CHECK(mtp_tunnel_link_up(front) == 2);
}

/* A stream whose link under the back says FULL stops at one window; another goes on. */
static void test_credit_hold(void) {
  struct mtp_link *l = mtp_tunnel_link_get(front);
  static struct tfront a, b;
  static size_t a_sizes[16];
  for (int i = 0; i < 16; i++)
    a_sizes[i] = 32768;
  int opens = echo.opens;
  tf_open(&a, l, 200, 3000);
  tf_open(&b, l, 201, 3001);
  want_n = opens + 2;
  CHECK(wait_for(p_echo_opens, NULL));
  struct estream *ea = echo_find(3000);
  CHECK(ea != NULL);
  ea->hold = true;
  a.sizes = a_sizes;
  a.nsizes = 16;
  a.no_verify = true;
  tf_pump(&a);
  CHECK(a.full && a.next <= 9);
  b.sizes = SMALL_SIZES;
  b.nsizes = sizeof(SMALL_SIZES) / sizeof(SMALL_SIZES[0]);
  tf_pump(&b);
  CHECK(wait_for(p_tf_done, &b));
  CHECK(b.bad == 0 && b.lf.closes == 0);
  run_for(100);
  CHECK_MSG(ea->got == WINDOW, "the back got %zu bytes of a held stream", ea->got);
  CHECK(a.full && a.lf.writables == 0 && a.lf.closes == 0);
  echo_release(ea);
  CHECK(wait_for(p_tf_writable, &a));
  want_n = 16 - 8; /* the echoes of the packets after the hold */
  CHECK(wait_for(p_tf_packets, &a));
  CHECK(a.next == 16 && ea->got == 16 * 32768u && a.lf.closes == 0);
  l->close(l, a.lf.stream);
  l->close(l, b.lf.stream);
}

/* More than MTP_TLSUV_HIGH_WATER written in one loop iteration, within every stream's credit:
 * send() says FULL for the TLS queue, and on_writable follows once it has drained. The link
 * under the back holds every packet (FULL), so no Credit comes back: only the drained TLS
 * queue can wake the streams. */
static bool p_writables(void *a) {
  struct tfront *f = a;
  for (int i = 0; i < 96; i++)
    if (f[i].full)
      return false;
  return true;
}

enum { CONG_N = 96, CONG_PKT = 128 * 1024 }; /* 6 MiB on each of the two connections */

/* Every congestion stream's packet has fully arrived at the echo link. */
static bool p_cong_all_got(void *a) {
  for (int i = 0; i < CONG_N; i++) {
    struct estream *e = echo_find((uint16_t)(8000 + i));
    if (e == NULL || e->got < CONG_PKT)
      return false;
  }
  return true;
}

static void test_congestion(void) {
  enum { N = CONG_N, PKT = CONG_PKT };
  static const size_t one[] = {PKT};
  static struct tfront f[N];
  static bool saw_full[N];
  struct mtp_link *l = mtp_tunnel_link_get(front);
  int full = 0, opens = echo.opens;
  echo.hold_new = true;
  for (int i = 0; i < N; i++) {
    tf_open(&f[i], l, 500 + i, (uint16_t)(8000 + i));
    f[i].sizes = one;
    f[i].nsizes = 1;
    tf_pump(&f[i]);
    saw_full[i] = f[i].full;
    full += f[i].full;
  }
  CHECK_MSG(full > 0 && full < N, "%d of %d streams saw FULL", full, N);
  CHECK(wait_for(p_writables, f));
  want_n = opens + N;
  CHECK(wait_for(p_echo_opens, NULL));
  CHECK(wait_for(p_cong_all_got, NULL)); /* an Open can arrive before the last of its data */
  echo.hold_new = false;
  for (int i = 0; i < N; i++) {
    CHECK(f[i].lf.closes == 0 && f[i].lf.writables == (saw_full[i] ? 1 : 0));
    struct estream *e = echo_find((uint16_t)(8000 + i));
    CHECK(e != NULL && e->got == PKT && e->owed);
  }
  for (int i = 0; i < N; i++)
    l->close(l, f[i].lf.stream);
}

static struct mtp_tls_conf *front_tls;

static void rf_dial(void) {
  memset(&rf, 0, sizeof(rf));
  struct mtp_tunnel_conn_opts o = {
      .ops = &RF_OPS,
      .node = "rawfront",
      .window = WINDOW,
      .heartbeat_ms = 250,
      .timeout_ms = 3000,
      .where = "rawfront",
  };
  CHECK(mtp_tunnel_conn_dial(&rf.c, front_tls, &loop, (const struct sockaddr *)&srv_addr, &o) == MTP_OK);
  CHECK(wait_for(p_rf_up, NULL));
  CHECK(rf.up && !rf.closed);
}

/* A front that grants no credit: the back sends a window, queues a window and a maximal frame,
 * then closes that stream with reason backpressure; a stream beside it goes on. */
static void test_backpressure(void) {
  rf_dial();
  int opens = echo.opens;
  rf_open_stream(1, 4001);
  rf_open_stream(2, 4002);
  rf.auto_credit[2] = true;
  want_n = opens + 2;
  CHECK(wait_for(p_echo_opens, NULL));
  struct estream *e1 = echo_find(4001), *e2 = echo_find(4002);
  CHECK(e1 != NULL && e2 != NULL);
  /* one window is sent, then a window plus a maximal frame waits at the back */
  enum { PKT = 32768 };
  const int fit = (int)((2 * WINDOW + MTP_TUNNEL_MAX_FRAME) / PKT);
  pattern(1, 1, scratch, PKT);
  for (int i = 0; i < fit; i++)
    echo_queue(e1, 0, 0, scratch, PKT);
  int id1 = 1, id2 = 2;
  want_v = WINDOW;
  CHECK(wait_for(p_rf_bytes, &id1));
  for (int k = 1; k <= 6; k++) { /* stream 2: six windows, each after the credit came back */
    for (int i = 0; i < (int)(WINDOW / PKT); i++)
      echo_queue(e2, 0, 0, scratch, PKT);
    want_v = (int64_t)k * WINDOW;
    CHECK_MSG(wait_for(p_rf_bytes, &id2), "stream 2 got %zu", rf.bytes[2]);
  }
  CHECK(rf.bytes[1] == WINDOW && rf.closes[1] == 0 && !e1->closed);
  echo_queue(e1, 0, 0, scratch, PKT); /* one more than the back may buffer */
  CHECK(wait_for(p_rf_close, &id1));
  CHECK(rf.close_reason[1] == MTP_TUNNEL_CLOSE_BACKPRESSURE && e1->closed);
  CHECK(rf.bytes[1] == WINDOW && rf.closes[2] == 0 && !e2->closed);
  /* the front's close of stream 2 reaches the link */
  int closes = echo.closes;
  CHECK(mtp_tunnel_conn_send_close(rf.c, 2, 0) == MTP_OK);
  want_n = closes + 1;
  CHECK(wait_for(p_echo_closes, NULL));
  CHECK(e2->closed);
  /* a front stopping says so: not a failure; the streams it still had are closed */
  opens = echo.opens;
  rf_open_stream(3, 4003);
  want_n = opens + 1;
  CHECK(wait_for(p_echo_opens, NULL));
  struct estream *e3 = echo_find(4003);
  CHECK(e3 != NULL && !e3->closed);
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  closes = echo.closes;
  mtp_tunnel_conn_close(rf.c, MTP_OK, MTP_LINK_CLOSE_SHUTDOWN, "test done");
  CHECK(wait_for(p_rf_closed, NULL));
  want_n = closes + 1;
  CHECK(wait_for(p_echo_closes, NULL));
  CHECK(e3->closed);
  cur_srv = srv;
  want_n = 2;
  CHECK(wait_for(p_srv_fronts, NULL));
  CHECK(metric(MTP_M_TUNNEL_FAILS) == fails);
}

static void test_protocol_errors(void) {
  static struct rawtls r;
  static const uint8_t zero_len[4] = {0, 0, 0, 0};

  /* a Data frame before Hello */
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  raw_connect(&r, front_tls, &srv_addr);
  CHECK(wait_for(p_raw_open, &r));
  CHECK(r.open);
  uint8_t hdr[MTP_TUNNEL_DATA_HDR_MAX + 4];
  size_t h = mtp_tunnel_data_header(hdr, 1, 4, false);
  memcpy(hdr + h, "abcd", 4);
  CHECK(mtp_tlsuv_write(r.t, hdr, h + 4) == MTP_OK);
  CHECK(wait_for(p_raw_closed, &r));
  CHECK(r.hellos == 1 && r.last_case == MTP__FRAME__MSG_CLOSE && r.last_close_reason == MTP_TUNNEL_CLOSE_PROTOCOL);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 1);

  /* version 0 */
  raw_connect(&r, front_tls, &srv_addr);
  CHECK(wait_for(p_raw_open, &r));
  raw_send_hello(&r, 0);
  CHECK(wait_for(p_raw_closed, &r));
  CHECK(r.last_case == MTP__FRAME__MSG_CLOSE && r.last_close_reason == MTP_TUNNEL_CLOSE_VERSION);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 2);

  /* a malformed frame (length 0) after a good Hello */
  raw_connect(&r, front_tls, &srv_addr);
  CHECK(wait_for(p_raw_open, &r));
  raw_send_hello(&r, 1);
  CHECK(mtp_tlsuv_write(r.t, zero_len, 4) == MTP_OK);
  CHECK(wait_for(p_raw_closed, &r));
  CHECK(r.last_case == MTP__FRAME__MSG_CLOSE && r.last_close_reason == MTP_TUNNEL_CLOSE_PROTOCOL);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 3);

  /* a front that says Hello and then nothing: dead after tunnel_timeout, pinged before */
  raw_connect(&r, front_tls, &srv_addr);
  r.hello_on_open = true;
  CHECK(wait_for(p_raw_open, &r));
  uint64_t t0 = uv_now(&loop);
  CHECK(wait_for(p_raw_closed, &r));
  uint64_t dt = uv_now(&loop) - t0;
  CHECK_MSG(dt >= 2500 && dt < 6000, "closed after %llu ms", (unsigned long long)dt);
  CHECK(r.pings >= 4 && r.last_close_reason == MTP_TUNNEL_CLOSE_TIMEOUT);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 4);
  CHECK(mtp_tunnel_server_fronts(srv) == 2);
}

static void test_plain_and_garbage(void) {
  static const char garbage[] = "\x16\x03\x01\x00\x05hello, not TLS at all \x01\x02\x03";
  plain_client(&srv_addr, "GET / HTTP/1.1\r\nHost: back\r\n\r\n");
  plain_client(&srv_addr, garbage);
  uint64_t t0 = uv_now(&loop);
  plain_client(&srv_addr, NULL); /* says nothing: the handshake timeout */
  CHECK(uv_now(&loop) - t0 >= 2500);
  CHECK(mtp_tunnel_server_fronts(srv) == 2);
}

static struct mtp_tunnel_link *to_free_links[16];
static int nfree_links;
static struct mtp_tunnel_server *to_free_srvs[8];
static int nfree_srvs;

static void link_done(struct mtp_tunnel_link *t) {
  mtp_tunnel_link_stop(t);
  to_free_links[nfree_links++] = t;
}

static void srv_done(struct mtp_tunnel_server *s) {
  mtp_tunnel_server_stop(s);
  to_free_srvs[nfree_srvs++] = s;
}

/* A front whose certificate comes from another CA: refused by the back's handshake. */
static void test_foreign_ca(void) {
  static struct mtp_config cfg;
  front_config(&cfg, dir_b, "front1", ca_both, port_of(&srv_addr)); /* trusts both CAs itself */
  int opens = echo.opens;
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  struct mtp_tunnel_link *t = link_start(&cfg);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 4); /* two attempts, counted by both sides */
  CHECK(mtp_tunnel_link_up(t) == 0 && mtp_tunnel_server_fronts(srv) == 2 && echo.opens == opens);
  struct mtp_link_open o;
  lf_make_open(&o, 2, 5000);
  int err = 0;
  static struct tfront f;
  CHECK(mtp_tunnel_link_get(t)->open(mtp_tunnel_link_get(t), &o, &f, &lf_ops, &err) == NULL);
  CHECK(err == MTP_ELINKDOWN);
  link_done(t);
}

/* A back whose certificate is a front's (same CA, no name "back"): the front refuses it. */
static void test_back_name(void) {
  static struct mtp_config cfg_b, cfg_f;
  struct sockaddr_storage a;
  int fd = reserve_port(&a);
  back_config(&cfg_b, "front2");
  struct mtp_tunnel_server *s = server_start(&cfg_b, &a);
  front_config(&cfg_f, dir_a, "front1", pathf(dir_a, "ca.crt"), port_of(&a));
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  struct mtp_tunnel_link *t = link_start(&cfg_f);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 4);
  CHECK(mtp_tunnel_link_up(t) == 0 && mtp_tunnel_server_fronts(s) == 0);
  link_done(t);
  srv_done(s);
  close(fd);
}

static struct mtp_config *allowed_cfg;

/* A front not in tunnel_allowed_fronts: told so, and never up on the back. */
static void test_allowlist(void) {
  static struct mtp_config cfg_b, cfg_f;
  static char *allowed[] = {"front2", "someone"}; /* not owned: taken out before the config is freed */
  struct sockaddr_storage a;
  int fd = reserve_port(&a);
  back_config(&cfg_b, "back");
  cfg_b.tunnel_allowed_fronts = allowed;
  cfg_b.ntunnel_allowed_fronts = 2;
  struct mtp_tunnel_server *s = server_start(&cfg_b, &a);
  front_config(&cfg_f, dir_a, "front1", pathf(dir_a, "ca.crt"), port_of(&a));
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  int opens = echo.opens;
  struct mtp_tunnel_link *t = link_start(&cfg_f);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 4);
  CHECK(mtp_tunnel_server_fronts(s) == 0 && echo.opens == opens);
  link_done(t);
  /* front2 is allowed */
  static struct mtp_config cfg_g;
  front_config(&cfg_g, dir_a, "front2", pathf(dir_a, "ca.crt"), port_of(&a));
  struct mtp_tunnel_link *u = link_start(&cfg_g);
  cur_link = u;
  want_n = 1;
  CHECK(wait_for(p_link_up, NULL));
  cur_srv = s;
  CHECK(wait_for(p_srv_fronts, NULL));
  link_done(u);
  srv_done(s);
  close(fd);
  allowed_cfg = &cfg_b;
}

static bool p_rb_pinged(void *a) { return rb.peer.pings >= 2 || rb.peer.closed; }

/* A back that stops answering: the front notices within tunnel_timeout, closes its streams
 * with LINK_DOWN, and dials again. */
static void test_heartbeat(void) {
  static struct mtp_config cfg;
  memset(&rb, 0, sizeof(rb));
  rb.conf = tls_conf(MTP_TLS_SERVER, dir_a, "back", pathf(dir_a, "ca.crt"));
  uv_tcp_init(&loop, &rb.listener);
  struct sockaddr_in any;
  uv_ip4_addr("127.0.0.1", 0, &any);
  CHECK(uv_tcp_bind(&rb.listener, (const struct sockaddr *)&any, 0) == 0);
  CHECK(uv_listen((uv_stream_t *)&rb.listener, 16, rb_on_connection) == 0);
  struct sockaddr_storage a;
  int alen = sizeof(a);
  CHECK(uv_tcp_getsockname(&rb.listener, (struct sockaddr *)&a, &alen) == 0);

  front_config(&cfg, dir_a, "front1", pathf(dir_a, "ca.crt"), port_of(&a));
  cfg.tunnel_heartbeat = 0.1;
  cfg.tunnel_timeout = 0.6;
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  struct mtp_tunnel_link *t = link_start(&cfg);
  cur_link = t;
  want_n = 1;
  CHECK(wait_for(p_link_up, NULL));
  uint64_t t0 = uv_now(&loop);
  static struct tfront f;
  tf_open(&f, mtp_tunnel_link_get(t), 300, 6000);
  CHECK(wait_for(p_rb_pinged, NULL));
  CHECK(wait_for(p_tf_closed, &f));
  uint64_t dt = uv_now(&loop) - t0;
  CHECK_MSG(dt >= 500 && dt < 3000, "down after %llu ms", (unsigned long long)dt);
  CHECK(f.lf.close_reason == MTP_LINK_CLOSE_LINK_DOWN);
  CHECK(rb.peer.pings >= 2);
  wait_metric(MTP_M_TUNNEL_FAILS, fails + 1);
  /* and it dials again */
  int accepted = rb.accepted;
  want_n = 1;
  CHECK(wait_for(p_link_up, NULL));
  CHECK(rb.accepted > accepted);
  link_done(t);
  run_for(50);
  if (rb.peer.t != NULL)
    mtp_tlsuv_close(rb.peer.t, MTP_OK, "test done", false);
  uv_close((uv_handle_t *)&rb.listener, NULL);
  CHECK(wait_for(p_raw_closed, &rb.peer));
}

/* The back stops: the front's streams end with LINK_DOWN, open() says MTP_ELINKDOWN, and once a
 * back listens again the front is back within a backoff step and serves new streams. */
static void test_reconnect(void) {
  struct mtp_link *l = mtp_tunnel_link_get(front);
  static struct tfront a, b;
  int opens = echo.opens;
  tf_open(&a, l, 400, 7000);
  want_n = opens + 1;
  CHECK(wait_for(p_echo_opens, NULL));
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  srv_done(srv);
  CHECK(wait_for(p_tf_closed, &a));
  CHECK(a.lf.close_reason == MTP_LINK_CLOSE_LINK_DOWN);
  CHECK(echo_find(7000)->closed);
  cur_link = front;
  CHECK(wait_for(p_link_down, NULL));
  CHECK(metric(MTP_M_TUNNEL_FAILS) == fails); /* a back saying it stops is not a failure */
  struct mtp_link_open o;
  lf_make_open(&o, 2, 7001);
  int err = 0;
  CHECK(l->open(l, &o, &b, &lf_ops, &err) == NULL && err == MTP_ELINKDOWN);
  run_for(300); /* a few failed dials */
  CHECK(mtp_tunnel_link_up(front) == 0);
  uint64_t t0 = uv_now(&loop);
  srv = server_start(&cfg_back, &srv_addr);
  want_n = 2;
  CHECK(wait_for(p_link_up, NULL));
  uint64_t dt = uv_now(&loop) - t0;
  CHECK_MSG(dt < 6000, "up again after %llu ms", (unsigned long long)dt);
  tf_open(&b, l, 401, 7002);
  b.sizes = SMALL_SIZES;
  b.nsizes = sizeof(SMALL_SIZES) / sizeof(SMALL_SIZES[0]);
  tf_pump(&b);
  CHECK(wait_for(p_tf_done, &b));
  CHECK(b.bad == 0 && b.lf.closes == 0);
  l->close(l, b.lf.stream);
}

static void on_guard(uv_timer_t *t) { CHECK_MSG(false, "the loop did not end: a handle was left open"); }

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  CHECK(mtp_metrics_thread_register() == MTP_OK);
  CHECK(uv_loop_init(&loop) == 0);
  scratch = malloc(MTP_TUNNEL_MAX_FRAME);
  CHECK(scratch != NULL);
  const char *tmp = check_tmpdir_make("test_tunnel_link");
  check_on_fail = check_tmpdir_remove;
  snprintf(dir_a, sizeof(dir_a), "%s/a", tmp);
  snprintf(dir_b, sizeof(dir_b), "%s/b", tmp);
  char err[300];
  CHECK_MSG(mtp_certs_init(dir_a, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(mtp_certs_issue(dir_a, "front1", err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(mtp_certs_issue(dir_a, "front2", err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(mtp_certs_init(dir_b, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(mtp_certs_issue(dir_b, "front1", err, sizeof(err)) == MTP_OK, "%s", err);
  snprintf(ca_both, sizeof(ca_both), "%s/both-ca.crt", tmp);
  char cmd[2000];
  snprintf(cmd, sizeof(cmd), "cat '%s/ca.crt' '%s/ca.crt' > '%s'", dir_a, dir_b, ca_both);
  CHECK(system(cmd) == 0);

  test_data_header();
  test_conf_errors();

  echo_setup();
  int rfd = reserve_port(&srv_addr);
  back_config(&cfg_back, "back");
  srv = server_start(&cfg_back, &srv_addr);
  struct sockaddr_storage got;
  CHECK(mtp_tunnel_server_addr(srv, &got) == MTP_OK && port_of(&got) == port_of(&srv_addr));
  front_config(&cfg_front, dir_a, "front1", pathf(dir_a, "ca.crt"), port_of(&srv_addr));
  cfg_front.tunnel_conns = 2;
  front = link_start(&cfg_front);
  front_tls = tls_conf(MTP_TLS_CLIENT, dir_a, "front1", pathf(dir_a, "ca.crt"));

  test_up();
  test_echo_many();
  test_quickack_close();
  test_credit_hold();
  test_congestion();
  test_backpressure();
  test_protocol_errors();
  test_plain_and_garbage();
  test_foreign_ca();
  test_back_name();
  test_allowlist();
  test_heartbeat();
  test_reconnect();

  /* shutdown: the front says it stops, the back closes its streams; the loop ends clean */
  int64_t fails = metric(MTP_M_TUNNEL_FAILS);
  link_done(front);
  cur_srv = srv;
  want_n = 0;
  CHECK(wait_for(p_srv_fronts, NULL));
  srv_done(srv);
  echo_free();
  uv_timer_t guard; /* unreferenced: fires only if something else keeps the loop alive */
  uv_timer_init(&loop, &guard);
  uv_timer_start(&guard, on_guard, WAIT_MS, 0);
  uv_unref((uv_handle_t *)&guard);
  CHECK(uv_run(&loop, UV_RUN_DEFAULT) == 0);
  uv_close((uv_handle_t *)&guard, NULL);
  CHECK(uv_run(&loop, UV_RUN_DEFAULT) == 0);
  CHECK(metric(MTP_M_TUNNEL_FAILS) == fails);
  CHECK(metric(MTP_M_TUNNEL_UP) == 0);
  CHECK(metric(MTP_M_TUNNEL_STREAMS) == 0);
  CHECK(uv_loop_close(&loop) == 0);
  for (int i = 0; i < nfree_links; i++)
    mtp_tunnel_link_free(to_free_links[i]);
  for (int i = 0; i < nfree_srvs; i++)
    mtp_tunnel_server_free(to_free_srvs[i]);
  mtp_tls_conf_free(front_tls);
  mtp_tls_conf_free(rb.conf);
  if (allowed_cfg != NULL) {
    allowed_cfg->tunnel_allowed_fronts = NULL;
    allowed_cfg->ntunnel_allowed_fronts = 0;
  }
  for (int i = 0; i < nconfigs; i++)
    mtp_config_free(configs[i]);
  close(rfd);
  free(scratch);
  check_tmpdir_remove();
  return check_report();
}
