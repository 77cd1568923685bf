/* fake_middle.c - see fake_middle.h. */
#include "fake_middle.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "rpc.h"
#include "banned.h"

#define PUSH_HIGH_WATER (1u << 20)

enum rc_state {
  RC_WAIT_NONCE,     /* waiting for the client's RPC_NONCE (plaintext) */
  RC_WAIT_HANDSHAKE, /* keys set, waiting for the client's RPC_HANDSHAKE */
  RC_READY,          /* handshake done: PROXY_REQ, PING, CLOSE_CONN */
};

struct rconn {
  uv_tcp_t tcp;
  struct fake_middle *fm; /* borrows */
  unsigned serial;
  enum rc_state state;
  bool closing;
  bool reading;
  struct mtp_rpc_codec codec;
  uint32_t local_ip, peer_ip; /* host order */
  uint16_t local_port, peer_port;
  uint8_t *rbuf; /* owns: read buffer */
  /* push job */
  uint64_t push_conn_id;
  uint64_t push_left;
  size_t push_chunk;
  uint64_t push_inflight; /* pushed bytes handed to uv_write whose callback has not run */
  struct rconn *next; /* list of open connections */
};

struct conn_rec {
  struct fm_conn_info info;
};

enum cmd_op { CMD_STOP, CMD_CLOSE_EXT, CMD_CLOSE_ALL, CMD_MODE, CMD_PUSH, CMD_PING };

struct cmd {
  enum cmd_op op;
  uint64_t conn_id;
  uint64_t total;
  size_t chunk;
  int mode;
  int result;
  bool done;
  struct cmd *next;
};

struct fake_middle {
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t async;
  pthread_t thread;
  bool thread_running;
  uint16_t port;
  uint8_t *secret; /* owns */
  size_t secret_len;
  uint32_t start_time;
  struct fm_options opt;
  /* loop thread only */
  struct rconn *conns;
  unsigned next_serial;
  enum fm_mode mode_loop;
  /* shared, under mu */
  pthread_mutex_t mu;
  pthread_cond_t cond;
  bool stopped;
  struct cmd *cmds;
  struct fm_stats st;
  struct conn_rec *recs; /* owns */
  size_t nrecs, caprecs;
};

/* ---- helpers ---- */

static void logf_(struct fake_middle *fm, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(struct fake_middle *fm, const char *fmt, ...) {
  if (!fm->opt.log_cb)
    return;
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  fm->opt.log_cb(fm->opt.log_arg, line);
}

static void changed_locked(struct fake_middle *fm) {
  pthread_cond_broadcast(&fm->cond);
}

uint32_t fm_quickack_token(const uint8_t *pkt, size_t len) {
  uint8_t h[32];
  mtp_sha256(pkt, len, h);
  uint32_t t = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
  return t | 0x80000000u;
}

/* Record lookup/creation, with fm->mu held. */
static struct conn_rec *rec_find(struct fake_middle *fm, uint64_t conn_id) {
  for (size_t i = 0; i < fm->nrecs; i++)
    if (fm->recs[i].info.conn_id == conn_id)
      return &fm->recs[i];
  return NULL;
}

static struct conn_rec *rec_get(struct fake_middle *fm, uint64_t conn_id) {
  struct conn_rec *r = rec_find(fm, conn_id);
  if (r)
    return r;
  if (fm->nrecs == fm->caprecs) {
    size_t cap = fm->caprecs ? fm->caprecs * 2 : 64;
    struct conn_rec *n = mtp_realloc(fm->recs, cap * sizeof(*n));
    if (!n)
      return NULL;
    fm->recs = n;
    fm->caprecs = cap;
  }
  r = &fm->recs[fm->nrecs++];
  memset(r, 0, sizeof(*r));
  r->info.conn_id = conn_id;
  fm->st.conn_ids = (unsigned)fm->nrecs;
  return r;
}

/* ---- connection lifetime ---- */

static void on_close(uv_handle_t *h) {
  struct rconn *rc = h->data;
  mtp_rpc_codec_free(&rc->codec);
  mtp_free(rc->rbuf);
  mtp_free(rc);
}

static void rc_close(struct rconn *rc, const char *bad) {
  if (rc->closing)
    return;
  rc->closing = true;
  struct fake_middle *fm = rc->fm;
  for (struct rconn **pp = &fm->conns; *pp; pp = &(*pp)->next) {
    if (*pp == rc) {
      *pp = rc->next;
      break;
    }
  }
  pthread_mutex_lock(&fm->mu);
  fm->st.open--;
  if (bad) {
    fm->st.bad++;
    snprintf(fm->st.last_error, sizeof(fm->st.last_error), "rpc conn %u: %s", rc->serial, bad);
  }
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  logf_(fm, "rpc conn %u closed%s%s", rc->serial, bad ? ": " : "", bad ? bad : "");
  uv_close((uv_handle_t *)&rc->tcp, on_close);
}

static struct rconn *rc_by_serial(struct fake_middle *fm, unsigned serial) {
  for (struct rconn *rc = fm->conns; rc; rc = rc->next)
    if (rc->serial == serial)
      return rc;
  return NULL;
}

/* ---- sending ---- */

struct wreq {
  uv_write_t req;
  struct rconn *rc; /* borrows; valid until the write callback (close waits for it) */
  uint64_t push_bytes;
  uint8_t data[];
};

static void push_more(struct rconn *rc);

static void on_write(uv_write_t *req, int status) {
  struct wreq *w = (struct wreq *)req;
  struct rconn *rc = w->rc;
  struct fake_middle *fm = rc->fm;
  rc->push_inflight -= w->push_bytes;
  if (status == 0 && w->push_bytes) {
    pthread_mutex_lock(&fm->mu);
    fm->st.pushed_bytes += w->push_bytes;
    changed_locked(fm);
    pthread_mutex_unlock(&fm->mu);
  }
  mtp_free(w);
  if (status < 0) {
    rc_close(rc, NULL);
    return;
  }
  if (!rc->closing && rc->push_left)
    push_more(rc);
}

static int send_iov(struct rconn *rc, const struct iovec *iov, int cnt, uint64_t push_bytes) {
  if (rc->closing)
    return MTP_ECLOSED;
  size_t body = 0;
  for (int i = 0; i < cnt; i++)
    body += iov[i].iov_len;
  size_t n = mtp_rpc_frame_size(&rc->codec, body);
  struct wreq *w = mtp_malloc(sizeof(*w) + n);
  if (!w)
    return MTP_ENOMEM;
  w->rc = rc;
  w->push_bytes = push_bytes;
  size_t got = mtp_rpc_sendv(&rc->codec, iov, cnt, w->data);
  uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)got);
  int r = uv_write(&w->req, (uv_stream_t *)&rc->tcp, &b, 1, on_write);
  if (r < 0) {
    mtp_free(w);
    return r;
  }
  return MTP_OK;
}

static int send_body(struct rconn *rc, const uint8_t *body, size_t len) {
  struct iovec iov = {.iov_base = (void *)body, .iov_len = len};
  return send_iov(rc, &iov, 1, 0);
}

static void push_more(struct rconn *rc) {
  uint8_t *pkt = mtp_malloc(rc->push_chunk);
  if (!pkt) {
    rc->push_left = 0;
    return;
  }
  /* Bounded by our own count of unfinished writes, not the socket's queue: uv_write usually
   * writes at once, so the queue stays empty and the loop would never get back to reading
   * (and never see the proxy's RPC_CLOSE_CONN) before the whole push was sent. */
  while (rc->push_left && !rc->closing && rc->push_inflight < PUSH_HIGH_WATER) {
    size_t n = rc->push_left < rc->push_chunk ? (size_t)rc->push_left : rc->push_chunk;
    n &= ~(size_t)3;
    if (n < 8) {
      rc->push_left = 0;
      break;
    }
    mtp_random(pkt, n);
    memset(pkt, 0, 8);
    uint8_t hdr[16];
    size_t hl = mtp_rpc_build_proxy_ans_hdr(0, rc->push_conn_id, hdr);
    struct iovec iov[2] = {{hdr, hl}, {pkt, n}};
    if (send_iov(rc, iov, 2, n) != MTP_OK) {
      rc->push_left = 0;
      break;
    }
    rc->push_left -= n;
    rc->push_inflight += n;
    pthread_mutex_lock(&rc->fm->mu);
    rc->fm->st.proxy_ans++;
    pthread_mutex_unlock(&rc->fm->mu);
  }
  mtp_free(pkt);
}

/* ---- protocol ---- */

static void make_params(struct rconn *rc, const struct mtp_rpc_nonce *clt, const uint8_t srv_nonce[16],
                        struct mtp_rpc_key_params *p) {
  memset(p, 0, sizeof(*p));
  memcpy(p->nonce_srv, srv_nonce, 16);
  memcpy(p->nonce_clt, clt->nonce, 16);
  p->clt_ts = clt->crypto_ts;
  p->srv_ip = rc->local_ip;
  p->srv_port = rc->local_port;
  p->clt_ip = rc->peer_ip;
  p->clt_port = rc->peer_port;
  p->secret = rc->fm->secret;
  p->secret_len = rc->fm->secret_len;
}

static const char *on_nonce(struct rconn *rc, const uint8_t *body, size_t len) {
  struct fake_middle *fm = rc->fm;
  struct mtp_rpc_nonce n;
  if (mtp_rpc_parse_nonce(body, len, &n) != MTP_OK)
    return "bad RPC_NONCE";
  uint32_t sel = (uint32_t)fm->secret[0] | (uint32_t)fm->secret[1] << 8 | (uint32_t)fm->secret[2] << 16 |
                 (uint32_t)fm->secret[3] << 24;
  pthread_mutex_lock(&fm->mu);
  fm->st.last_key_selector = n.key_selector;
  pthread_mutex_unlock(&fm->mu);
  if (n.key_selector != sel)
    return "RPC_NONCE key_selector does not match the proxy secret";
  if (n.crypto_schema != 1)
    return "RPC_NONCE crypto schema is not AES";
  struct mtp_rpc_nonce ans = {.key_selector = sel, .crypto_schema = 1, .crypto_ts = (uint32_t)time(NULL)};
  mtp_random(ans.nonce, 16);
  uint8_t out[MTP_RPC_NONCE_LEN];
  size_t ol = mtp_rpc_build_nonce(&ans, out);
  if (send_body(rc, out, ol) != MTP_OK)
    return "send failed";
  struct mtp_rpc_key_params p;
  make_params(rc, &n, ans.nonce, &p);
  uint8_t key[32], iv[16];
  mtp_rpc_derive_keys(&p, true, key, iv);
  mtp_rpc_codec_set_rx_key(&rc->codec, key, iv);
  mtp_rpc_derive_keys(&p, false, key, iv);
  mtp_rpc_codec_set_tx_key(&rc->codec, key, iv);
  mtp_wipe(key, sizeof(key));
  rc->state = RC_WAIT_HANDSHAKE;
  pthread_mutex_lock(&fm->mu);
  fm->st.nonces++;
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  return NULL;
}

static const char *on_handshake(struct rconn *rc, const struct mtp_rpc_msg *m) {
  struct fake_middle *fm = rc->fm;
  if (m->type != MTP_RPC_HANDSHAKE)
    return "expected RPC_HANDSHAKE";
  uint32_t flags = m->flags & MTP_RPC_HS_FLAG_CRC32C;
  struct mtp_rpc_pid me = {.ip = rc->local_ip, .port = fm->port, .pid = (uint16_t)getpid(), .utime = fm->start_time};
  uint8_t out[MTP_RPC_HANDSHAKE_LEN];
  size_t ol = mtp_rpc_build_handshake(flags, &me, &m->sender, out);
  if (send_body(rc, out, ol) != MTP_OK)
    return "send failed";
  if (flags)
    rc->codec.crc32c = true;
  rc->state = RC_READY;
  pthread_mutex_lock(&fm->mu);
  fm->st.handshakes++;
  fm->st.last_hs_flags = m->flags;
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  logf_(fm, "rpc conn %u: handshake ok (flags 0x%x, client pid %08x:%u:%u:%u)", rc->serial, m->flags,
        m->sender.ip, m->sender.port, m->sender.pid, m->sender.utime);
  return NULL;
}

static const char *on_proxy_req(struct rconn *rc, const struct mtp_rpc_msg *m) {
  struct fake_middle *fm = rc->fm;
  pthread_mutex_lock(&fm->mu);
  struct conn_rec *r = rec_get(fm, m->conn_id);
  bool first = r && r->info.packets == 0;
  if (r) {
    r->info.flags = m->flags;
    r->info.has_ad_tag = m->has_ad_tag;
    if (m->has_ad_tag)
      memcpy(r->info.ad_tag, m->ad_tag, 16);
    memcpy(r->info.client_ip, m->client_ip, 16);
    memcpy(r->info.proxy_ip, m->proxy_ip, 16);
    r->info.client_port = m->client_port;
    r->info.proxy_port = m->proxy_port;
    r->info.packets++;
    r->info.bytes += m->data_len;
    r->info.rpc_conn = rc->serial;
  }
  fm->st.proxy_reqs++;
  enum fm_mode mode = fm->mode_loop;
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  if (!r)
    return "out of memory";
  if (first || mode == FM_SILENT || mode == FM_STALLED)
    logf_(fm, "rpc conn %u: PROXY_REQ conn_id %016llx flags 0x%08x len %zu ad_tag %s client port %u proxy port %u",
          rc->serial, (unsigned long long)m->conn_id, m->flags, m->data_len, m->has_ad_tag ? "yes" : "no",
          m->client_port, m->proxy_port);
  if (mode != FM_ANSWER && mode != FM_ACK_ONLY)
    return NULL;
  if (m->flags & MTP_RPC_FLAG_QUICKACK) {
    uint8_t ack[16];
    size_t al = mtp_rpc_build_simple_ack(m->conn_id, fm_quickack_token(m->data, m->data_len), ack);
    if (send_body(rc, ack, al) != MTP_OK)
      return "send failed";
    pthread_mutex_lock(&fm->mu);
    fm->st.simple_acks++;
    changed_locked(fm);
    pthread_mutex_unlock(&fm->mu);
  }
  if (mode == FM_ACK_ONLY)
    return NULL;
  uint8_t hdr[16];
  size_t hl = mtp_rpc_build_proxy_ans_hdr(0, m->conn_id, hdr);
  struct iovec iov[2] = {{hdr, hl}, {(void *)m->data, m->data_len}};
  if (send_iov(rc, iov, 2, 0) != MTP_OK)
    return "send failed";
  pthread_mutex_lock(&fm->mu);
  fm->st.proxy_ans++;
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  return NULL;
}

static const char *on_ready(struct rconn *rc, const struct mtp_rpc_msg *m) {
  struct fake_middle *fm = rc->fm;
  switch (m->type) {
  case MTP_RPC_PROXY_REQ:
    return on_proxy_req(rc, m);
  case MTP_RPC_PING: {
    uint8_t out[12];
    size_t ol = mtp_rpc_build_pong(m->ping_id, out);
    if (send_body(rc, out, ol) != MTP_OK)
      return "send failed";
    pthread_mutex_lock(&fm->mu);
    fm->st.pings++;
    changed_locked(fm);
    pthread_mutex_unlock(&fm->mu);
    return NULL;
  }
  case MTP_RPC_CLOSE_CONN: {
    pthread_mutex_lock(&fm->mu);
    struct conn_rec *r = rec_get(fm, m->conn_id);
    if (r)
      r->info.close_conn = true;
    fm->st.close_conns++;
    changed_locked(fm);
    pthread_mutex_unlock(&fm->mu);
    for (struct rconn *c = fm->conns; c; c = c->next)
      if (c->push_left && c->push_conn_id == m->conn_id)
        c->push_left = 0;
    logf_(fm, "rpc conn %u: CLOSE_CONN conn_id %016llx", rc->serial, (unsigned long long)m->conn_id);
    return NULL;
  }
  case MTP_RPC_PONG:
    pthread_mutex_lock(&fm->mu);
    fm->st.pongs++;
    fm->st.last_pong_id = m->ping_id;
    changed_locked(fm);
    pthread_mutex_unlock(&fm->mu);
    return NULL;
  default:
    return "unexpected message type";
  }
}

static const char *on_frame(struct rconn *rc, const uint8_t *body, size_t len) {
  if (rc->state == RC_WAIT_NONCE)
    return on_nonce(rc, body, len);
  struct mtp_rpc_msg m;
  if (mtp_rpc_parse(body, len, &m) != MTP_OK)
    return "unparsable message";
  if (rc->state == RC_WAIT_HANDSHAKE)
    return on_handshake(rc, &m);
  return on_ready(rc, &m);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct rconn *rc = h->data;
  buf->base = (char *)rc->rbuf;
  buf->len = 65536;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct rconn *rc = s->data;
  if (nread < 0) {
    rc_close(rc, NULL);
    return;
  }
  const uint8_t *in = (const uint8_t *)buf->base;
  size_t off = 0, n = (size_t)nread;
  for (;;) {
    const uint8_t *body = NULL;
    size_t blen = 0;
    bool has = false;
    ssize_t used = mtp_rpc_recv(&rc->codec, in + off, n - off, &body, &blen, &has);
    if (used < 0) {
      char why[96];
      snprintf(why, sizeof(why), "frame error: %s", mtp_strerror((int)used));
      rc_close(rc, why);
      return;
    }
    off += (size_t)used;
    if (has) {
      const char *bad = on_frame(rc, body, blen);
      if (bad) {
        rc_close(rc, bad);
        return;
      }
      if (rc->closing)
        return;
    } else if (used == 0 || off >= n) {
      break;
    }
  }
}

static void rc_set_reading(struct rconn *rc, bool on) {
  if (rc->closing || rc->reading == on)
    return;
  rc->reading = on;
  if (on)
    uv_read_start((uv_stream_t *)&rc->tcp, on_alloc, on_read);
  else
    uv_read_stop((uv_stream_t *)&rc->tcp);
}

static void on_conn(uv_stream_t *server, int status) {
  struct fake_middle *fm = server->data;
  if (status < 0)
    return;
  struct rconn *rc = mtp_calloc(1, sizeof(*rc));
  if (!rc)
    return;
  rc->rbuf = mtp_malloc(65536);
  uv_tcp_init(&fm->loop, &rc->tcp);
  rc->tcp.data = rc;
  rc->fm = fm;
  mtp_rpc_codec_init(&rc->codec);
  if (!rc->rbuf || uv_accept(server, (uv_stream_t *)&rc->tcp) < 0) {
    uv_close((uv_handle_t *)&rc->tcp, on_close);
    return;
  }
  uv_tcp_nodelay(&rc->tcp, 1);
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  if (uv_tcp_getsockname(&rc->tcp, (struct sockaddr *)&ss, &sl) == 0 && ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    rc->local_ip = ntohl(a->sin_addr.s_addr);
    rc->local_port = ntohs(a->sin_port);
  }
  sl = sizeof(ss);
  if (uv_tcp_getpeername(&rc->tcp, (struct sockaddr *)&ss, &sl) == 0 && ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    rc->peer_ip = ntohl(a->sin_addr.s_addr);
    rc->peer_port = ntohs(a->sin_port);
  }
  rc->serial = ++fm->next_serial;
  rc->next = fm->conns;
  fm->conns = rc;
  pthread_mutex_lock(&fm->mu);
  fm->st.accepted++;
  fm->st.open++;
  changed_locked(fm);
  pthread_mutex_unlock(&fm->mu);
  logf_(fm, "rpc conn %u accepted from port %u", rc->serial, rc->peer_port);
  rc_set_reading(rc, fm->mode_loop != FM_STALLED);
}

/* ---- commands (loop thread) ---- */

static struct rconn *rc_for_conn_id(struct fake_middle *fm, uint64_t conn_id, int *err) {
  pthread_mutex_lock(&fm->mu);
  struct conn_rec *r = rec_find(fm, conn_id);
  unsigned serial = r ? r->info.rpc_conn : 0;
  pthread_mutex_unlock(&fm->mu);
  if (!r) {
    *err = MTP_EINVAL;
    return NULL;
  }
  struct rconn *rc = rc_by_serial(fm, serial);
  *err = rc ? MTP_OK : MTP_ECLOSED;
  return rc;
}

static void on_listener_close(uv_handle_t *h) {
  (void)h;
}

static int run_cmd(struct fake_middle *fm, struct cmd *c) {
  int err;
  struct rconn *rc;
  switch (c->op) {
  case CMD_STOP: {
    while (fm->conns)
      rc_close(fm->conns, NULL);
    uv_close((uv_handle_t *)&fm->listener, on_listener_close);
    uv_close((uv_handle_t *)&fm->async, NULL);
    return MTP_OK;
  }
  case CMD_CLOSE_EXT: {
    rc = rc_for_conn_id(fm, c->conn_id, &err);
    if (!rc)
      return err;
    uint8_t out[12];
    size_t ol = mtp_rpc_build_close_ext(c->conn_id, out);
    err = send_body(rc, out, ol);
    if (err == MTP_OK) {
      pthread_mutex_lock(&fm->mu);
      fm->st.close_exts++;
      pthread_mutex_unlock(&fm->mu);
    }
    return err;
  }
  case CMD_CLOSE_ALL: {
    int n = 0;
    while (fm->conns) {
      rc_close(fm->conns, NULL);
      n++;
    }
    return n;
  }
  case CMD_PING: {
    int n = 0;
    for (rc = fm->conns; rc; rc = rc->next) {
      if (rc->state != RC_READY)
        continue;
      uint8_t out[12];
      size_t ol = mtp_rpc_build_ping((int64_t)c->total, out);
      if (send_body(rc, out, ol) == MTP_OK)
        n++;
    }
    return n;
  }
  case CMD_MODE: {
    fm->mode_loop = (enum fm_mode)c->mode;
    for (rc = fm->conns; rc; rc = rc->next)
      rc_set_reading(rc, fm->mode_loop != FM_STALLED);
    return MTP_OK;
  }
  case CMD_PUSH: {
    rc = rc_for_conn_id(fm, c->conn_id, &err);
    if (!rc)
      return err;
    rc->push_conn_id = c->conn_id;
    rc->push_left = c->total;
    rc->push_chunk = c->chunk;
    push_more(rc);
    return MTP_OK;
  }
  }
  return MTP_EINVAL;
}

static void on_async(uv_async_t *a) {
  struct fake_middle *fm = a->data;
  pthread_mutex_lock(&fm->mu);
  struct cmd *list = fm->cmds;
  fm->cmds = NULL;
  pthread_mutex_unlock(&fm->mu);
  /* The list is newest first; run oldest first. */
  struct cmd *rev = NULL;
  while (list) {
    struct cmd *nx = list->next;
    list->next = rev;
    rev = list;
    list = nx;
  }
  while (rev) {
    struct cmd *nx = rev->next;
    int r = run_cmd(fm, rev);
    pthread_mutex_lock(&fm->mu);
    rev->result = r;
    rev->done = true;
    pthread_cond_broadcast(&fm->cond);
    pthread_mutex_unlock(&fm->mu);
    rev = nx;
  }
}

static int submit(struct fake_middle *fm, struct cmd *c) {
  pthread_mutex_lock(&fm->mu);
  if (fm->stopped) {
    pthread_mutex_unlock(&fm->mu);
    return MTP_ECLOSED;
  }
  if (c->op == CMD_STOP)
    fm->stopped = true; /* later submits fail at once instead of waiting on a dead loop */
  c->done = false;
  c->next = fm->cmds;
  fm->cmds = c;
  uv_async_send(&fm->async);
  while (!c->done)
    pthread_cond_wait(&fm->cond, &fm->mu);
  pthread_mutex_unlock(&fm->mu);
  return c->result;
}

static void *thread_main(void *arg) {
  struct fake_middle *fm = arg;
  uv_run(&fm->loop, UV_RUN_DEFAULT);
  return NULL;
}

/* ---- public ---- */

int fm_start(const uint8_t *proxy_secret, size_t len, struct fake_middle **out) {
  return fm_start_ex(proxy_secret, len, NULL, out);
}

int fm_start_ex(const uint8_t *proxy_secret, size_t len, const struct fm_options *opt, struct fake_middle **out) {
  *out = NULL;
  if (!proxy_secret || len < 4)
    return MTP_EINVAL;
  struct fake_middle *fm = mtp_calloc(1, sizeof(*fm));
  if (!fm)
    return MTP_ENOMEM;
  fm->secret = mtp_malloc(len);
  if (!fm->secret) {
    mtp_free(fm);
    return MTP_ENOMEM;
  }
  memcpy(fm->secret, proxy_secret, len);
  fm->secret_len = len;
  if (opt)
    fm->opt = *opt;
  fm->start_time = (uint32_t)time(NULL);
  pthread_mutex_init(&fm->mu, NULL);
  pthread_cond_init(&fm->cond, NULL);
  int r = uv_loop_init(&fm->loop);
  if (r < 0)
    goto fail_loop;
  uv_tcp_init(&fm->loop, &fm->listener);
  fm->listener.data = fm;
  uv_async_init(&fm->loop, &fm->async, on_async);
  fm->async.data = fm;
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", fm->opt.port, &a);
  r = uv_tcp_bind(&fm->listener, (const struct sockaddr *)&a, 0);
  if (r == 0)
    r = uv_listen((uv_stream_t *)&fm->listener, 128, on_conn);
  if (r == 0) {
    struct sockaddr_in b;
    int bl = sizeof(b);
    r = uv_tcp_getsockname(&fm->listener, (struct sockaddr *)&b, &bl);
    fm->port = ntohs(b.sin_port);
  }
  if (r == 0 && pthread_create(&fm->thread, NULL, thread_main, fm) != 0)
    r = MTP_ENOMEM;
  if (r < 0) {
    uv_close((uv_handle_t *)&fm->listener, NULL);
    uv_close((uv_handle_t *)&fm->async, NULL);
    uv_run(&fm->loop, UV_RUN_DEFAULT);
    uv_loop_close(&fm->loop);
  fail_loop:
    pthread_mutex_destroy(&fm->mu);
    pthread_cond_destroy(&fm->cond);
    mtp_free(fm->secret);
    mtp_free(fm);
    return r;
  }
  fm->thread_running = true;
  *out = fm;
  return fm->port;
}

uint16_t fm_port(const struct fake_middle *fm) {
  return fm->port;
}

void fm_stop(struct fake_middle *fm) {
  if (!fm || !fm->thread_running)
    return;
  struct cmd c = {.op = CMD_STOP};
  submit(fm, &c);
  pthread_join(fm->thread, NULL);
  fm->thread_running = false;
  uv_loop_close(&fm->loop);
}

void fm_free(struct fake_middle *fm) {
  if (!fm)
    return;
  fm_stop(fm);
  pthread_mutex_destroy(&fm->mu);
  pthread_cond_destroy(&fm->cond);
  mtp_free(fm->recs);
  fm->recs = NULL;
  mtp_wipe(fm->secret, fm->secret_len);
  mtp_free(fm->secret);
  fm->secret = NULL;
  mtp_free(fm);
}

void fm_get_stats(struct fake_middle *fm, struct fm_stats *out) {
  pthread_mutex_lock(&fm->mu);
  *out = fm->st;
  pthread_mutex_unlock(&fm->mu);
}

size_t fm_conn_count(struct fake_middle *fm) {
  pthread_mutex_lock(&fm->mu);
  size_t n = fm->nrecs;
  pthread_mutex_unlock(&fm->mu);
  return n;
}

int fm_conn_at(struct fake_middle *fm, size_t i, struct fm_conn_info *out) {
  int r = MTP_EINVAL;
  pthread_mutex_lock(&fm->mu);
  if (i < fm->nrecs) {
    *out = fm->recs[i].info;
    r = MTP_OK;
  }
  pthread_mutex_unlock(&fm->mu);
  return r;
}

int fm_conn_find(struct fake_middle *fm, uint64_t conn_id, struct fm_conn_info *out) {
  int r = MTP_EINVAL;
  pthread_mutex_lock(&fm->mu);
  struct conn_rec *rec = rec_find(fm, conn_id);
  if (rec) {
    *out = rec->info;
    r = MTP_OK;
  }
  pthread_mutex_unlock(&fm->mu);
  return r;
}

bool fm_find_client(struct fake_middle *fm, uint16_t client_port, struct fm_conn_info *out) {
  for (size_t i = fm_conn_count(fm); i-- > 0;)
    if (fm_conn_at(fm, i, out) == MTP_OK && out->client_port == client_port)
      return true;
  return false;
}

bool fm_wait(struct fake_middle *fm, bool (*pred)(const struct fm_stats *s, void *arg), void *arg,
             int timeout_ms) {
  struct timespec dl;
  clock_gettime(CLOCK_REALTIME, &dl);
  dl.tv_sec += timeout_ms / 1000;
  dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (dl.tv_nsec >= 1000000000L) {
    dl.tv_sec++;
    dl.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&fm->mu);
  bool ok;
  while (!(ok = pred(&fm->st, arg))) {
    if (pthread_cond_timedwait(&fm->cond, &fm->mu, &dl) != 0) {
      ok = pred(&fm->st, arg);
      break;
    }
  }
  pthread_mutex_unlock(&fm->mu);
  return ok;
}

static bool p_hs(const struct fm_stats *s, void *a) {
  return s->handshakes >= *(unsigned *)a;
}
static bool p_reqs(const struct fm_stats *s, void *a) {
  return s->proxy_reqs >= *(uint64_t *)a;
}
static bool p_open(const struct fm_stats *s, void *a) {
  return s->open == *(unsigned *)a;
}
static bool p_cc(const struct fm_stats *s, void *a) {
  return s->close_conns >= *(uint64_t *)a;
}

bool fm_wait_handshakes(struct fake_middle *fm, unsigned n, int timeout_ms) {
  return fm_wait(fm, p_hs, &n, timeout_ms);
}
bool fm_wait_proxy_reqs(struct fake_middle *fm, uint64_t n, int timeout_ms) {
  return fm_wait(fm, p_reqs, &n, timeout_ms);
}
bool fm_wait_open(struct fake_middle *fm, unsigned n, int timeout_ms) {
  return fm_wait(fm, p_open, &n, timeout_ms);
}
bool fm_wait_close_conns(struct fake_middle *fm, uint64_t n, int timeout_ms) {
  return fm_wait(fm, p_cc, &n, timeout_ms);
}

int fm_close_ext(struct fake_middle *fm, uint64_t conn_id) {
  struct cmd c = {.op = CMD_CLOSE_EXT, .conn_id = conn_id};
  return submit(fm, &c);
}

int fm_close_all(struct fake_middle *fm) {
  struct cmd c = {.op = CMD_CLOSE_ALL};
  return submit(fm, &c);
}

void fm_set_mode(struct fake_middle *fm, enum fm_mode mode) {
  struct cmd c = {.op = CMD_MODE, .mode = (int)mode};
  submit(fm, &c);
}

int fm_ping(struct fake_middle *fm, int64_t ping_id) {
  struct cmd c = {.op = CMD_PING, .total = (uint64_t)ping_id};
  return submit(fm, &c);
}

int fm_push(struct fake_middle *fm, uint64_t conn_id, uint64_t total, size_t chunk) {
  if (chunk < 8 || chunk % 4 || chunk > 1044480u)
    return MTP_EINVAL;
  struct cmd c = {.op = CMD_PUSH, .conn_id = conn_id, .total = total, .chunk = chunk};
  return submit(fm, &c);
}

int fm_write_proxy_config(const char *path, uint16_t port) {
  FILE *f = fopen(path, "w");
  if (!f)
    return MTP_EIO;
  fprintf(f, "# fake middle proxy config (test)\n");
  for (int dc = 1; dc <= 5; dc++) {
    fprintf(f, "proxy_for %d 127.0.0.1:%u;\n", dc, (unsigned)port);
    fprintf(f, "proxy_for %d 127.0.0.1:%u;\n", -dc, (unsigned)port);
  }
  fprintf(f, "default 2;\n");
  return fclose(f) == 0 ? MTP_OK : MTP_EIO;
}
