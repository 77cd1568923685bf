/*
 * rpcconn.c - one middle-proxy RPC connection, client role (see rpc.h for the protocol).
 *
 *   CONNECTING --tcp connected, nonce sent--> WAIT_NONCE --server nonce, keys set,
 *   handshake sent--> WAIT_HANDSHAKE --server handshake--> READY
 *   any state --error / EOF / timeout / stop--> CLOSING --last close_cb--> freed
 *
 * The handshake must finish within cfg->dc_connect_timeout. Failures never call the front
 * synchronously: mtp_back_conn_fail only closes the handles, and the streams are moved or
 * closed by the pool in the last close_cb (no front callback is on the stack then).
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "back_int.h"
#include "crypto.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "obf2.h"

#include "banned.h"

#define RBUF_SIZE (64u * 1024u)

struct wreq {
  uv_write_t req;
  uint8_t data[];
};

const char *mtp_back_conn_state_str(enum mtp_back_conn_state s) {
  switch (s) {
  case MTP_BACK_CONN_CONNECTING:
    return "connecting";
  case MTP_BACK_CONN_WAIT_NONCE:
    return "waiting for nonce";
  case MTP_BACK_CONN_WAIT_HANDSHAKE:
    return "waiting for handshake";
  case MTP_BACK_CONN_READY:
    return "ready";
  case MTP_BACK_CONN_CLOSING:
    return "closing";
  }
  return "?";
}

size_t mtp_back_conn_queued(const struct mtp_back_conn *c) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp) + c->pending_bytes;
}

/* ---- closing ---- */

static void on_handle_closed(uv_handle_t *h) {
  struct mtp_back_conn *c = h->data;
  if (--c->handles > 0)
    return;
  mtp_metric_add(MTP_M_RPC_CONNS, -1);
  mtp_back_dc_add(&c->w->stats->conns[c->pool->slot], -1);
  mtp_back_pool_conn_gone(c);
  mtp_tg_snapshot_release(c->snap);
  c->snap = NULL;
  mtp_rpc_codec_free(&c->codec);
  mtp_free(c->rbuf);
  c->rbuf = NULL;
  mtp_free(c);
}

void mtp_back_conn_fail(struct mtp_back_conn *c, int err) {
  if (c->state == MTP_BACK_CONN_CLOSING)
    return;
  enum mtp_back_conn_state was = c->state;
  c->state = MTP_BACK_CONN_CLOSING;
  c->fail_err = err;
  if (err != 0) {
    MTP_COUNT(RPC_CONNS_FAILED);
    if (was == MTP_BACK_CONN_READY)
      mtp_logc(&c->log, err == MTP_ECLOSED ? MTP_LOG_INFO : MTP_LOG_WARN,
               "middle proxy connection closed: %s (%zu clients on it)",
               err == MTP_ECLOSED ? "closed by peer" : mtp_strerror(err), c->nstreams);
    else
      mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy connection failed while %s: %s", mtp_back_conn_state_str(was),
               err == MTP_ECLOSED ? "closed by peer" : mtp_strerror(err));
  } else {
    mtp_debugc(&c->log, "middle proxy connection closed (stopping)");
  }
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

/* ---- writing ---- */

static void on_write(uv_write_t *req, int status) {
  struct mtp_back_conn *c = req->data;
  mtp_free(req); /* struct wreq starts with the request */
  if (status < 0) {
    if (status != UV_ECANCELED)
      mtp_back_conn_fail(c, status);
    return;
  }
  if (c->state == MTP_BACK_CONN_READY && c->has_blocked && mtp_back_conn_queued(c) < MTP_BACK_LOW_WATER)
    mtp_back_conn_notify_writable(c);
}

static int write_frame(struct mtp_back_conn *c, const struct iovec *iov, int iovcnt) {
  if (c->state == MTP_BACK_CONN_CLOSING)
    return MTP_ECLOSED;
  size_t body = 0;
  for (int i = 0; i < iovcnt; i++)
    body += iov[i].iov_len;
  size_t size = mtp_rpc_frame_size(&c->codec, body);
  struct wreq *w = mtp_malloc(sizeof(*w) + size);
  if (w == NULL) {
    mtp_back_conn_fail(c, MTP_ENOMEM);
    return MTP_ENOMEM;
  }
  size_t n = mtp_rpc_sendv(&c->codec, iov, iovcnt, w->data);
  w->req.data = c;
  uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)n);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
  if (rc < 0) {
    mtp_free(w);
    mtp_back_conn_fail(c, rc);
    return rc;
  }
  return MTP_OK;
}

static int write_body(struct mtp_back_conn *c, const uint8_t *body, size_t len) {
  struct iovec iov = {.iov_base = (void *)body, .iov_len = len};
  return write_frame(c, &iov, 1);
}

/* ---- addresses ---- */

static void addr_to16(const struct sockaddr_storage *a, uint8_t ip[16], uint32_t *port) {
  memset(ip, 0, 16);
  if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)a;
    memcpy(ip, &s6->sin6_addr, 16);
    *port = ntohs(s6->sin6_port);
  } else {
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)a;
    ip[10] = 0xff;
    ip[11] = 0xff;
    memcpy(ip + 12, &s4->sin_addr, 4);
    *port = ntohs(s4->sin_port);
  }
}

static bool addr_is_any(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *)a)->sin_addr.s_addr == htonl(INADDR_ANY);
  if (a->ss_family == AF_INET6) {
    const struct in6_addr *ip = &((const struct sockaddr_in6 *)a)->sin6_addr;
    return IN6_IS_ADDR_UNSPECIFIED(ip);
  }
  return true;
}

static uint32_t ipv4_host(const struct sockaddr_storage *a) {
  return a->ss_family == AF_INET ? ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) : 0;
}

static uint16_t port_of(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET6)
    return ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
  return ntohs(((const struct sockaddr_in *)a)->sin_port);
}

static void format_addr(const struct sockaddr_storage *a, char *out, size_t n) {
  char ip[INET6_ADDRSTRLEN] = "?";
  if (a->ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)a)->sin6_addr, ip, sizeof(ip));
    snprintf(out, n, "[%s]:%u", ip, port_of(a));
  } else {
    inet_ntop(AF_INET, &((const struct sockaddr_in *)a)->sin_addr, ip, sizeof(ip));
    snprintf(out, n, "%s:%u", ip, port_of(a));
  }
}

/* ---- sending stream messages ---- */

int mtp_back_conn_send_packet(struct mtp_back_conn *c, struct mtp_back_stream *s, uint32_t flags,
                              const uint8_t *data, size_t len) {
  uint8_t proxy_ip[16], hdr[MTP_RPC_PROXY_REQ_HDR_MAX];
  uint32_t proxy_port = 0;
  uint32_t dummy = 0;
  addr_to16(&s->local_addr, proxy_ip, &proxy_port);
  if (addr_is_any(&s->local_addr))
    addr_to16(&c->local, proxy_ip, &dummy);
  size_t hlen = mtp_rpc_build_proxy_req_hdr(flags, s->conn_id, s->client_ip, s->client_port, proxy_ip, proxy_port,
                                            s->has_ad_tag ? s->ad_tag : NULL, hdr);
  struct iovec iov[2] = {{.iov_base = hdr, .iov_len = hlen}, {.iov_base = (void *)data, .iov_len = len}};
  return write_frame(c, iov, 2);
}

void mtp_back_conn_send_close(struct mtp_back_conn *c, uint64_t conn_id) {
  uint8_t body[12];
  size_t n = mtp_rpc_build_close_conn(conn_id, body);
  (void)write_body(c, body, n);
}

/* ---- handshake ---- */

static void on_timeout(uv_timer_t *t) {
  struct mtp_back_conn *c = t->data;
  if (c->state != MTP_BACK_CONN_READY)
    mtp_back_conn_fail(c, MTP_ETIMEDOUT);
}

static int handle_nonce(struct mtp_back_conn *c, const struct mtp_rpc_msg *m) {
  if (m->type != MTP_RPC_NONCE) {
    mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy answered 0x%08x instead of a nonce", m->type);
    return MTP_EHANDSHAKE;
  }
  uint32_t selector;
  memcpy(&selector, c->snap->secret, 4);
  if (m->nonce.crypto_schema != 1) {
    mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy offered crypto schema %u", m->nonce.crypto_schema);
    return MTP_EHANDSHAKE;
  }
  if (m->nonce.key_selector != selector) {
    mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy uses another proxy secret (key selector mismatch)");
    return MTP_EHANDSHAKE;
  }
  const struct mtp_config *cfg = c->w->cfg;
  struct mtp_rpc_key_params p;
  memset(&p, 0, sizeof(p));
  memcpy(p.nonce_srv, m->nonce.nonce, 16);
  memcpy(p.nonce_clt, c->nonce, 16);
  p.clt_ts = c->crypto_ts;
  p.srv_port = port_of(&c->peer);
  p.clt_port = port_of(&c->local);
  if (c->peer.ss_family == AF_INET6) {
    p.ipv6 = true;
    memcpy(p.srv_ipv6, &((const struct sockaddr_in6 *)&c->peer)->sin6_addr, 16);
    memcpy(p.clt_ipv6, &((const struct sockaddr_in6 *)&c->local)->sin6_addr, 16);
  } else {
    p.srv_ip = ipv4_host(&c->peer);
    p.clt_ip = ipv4_host(&c->local);
    if (cfg->has_nat && p.clt_ip == cfg->nat_local)
      p.clt_ip = cfg->nat_public;
  }
  p.secret = c->snap->secret;
  p.secret_len = c->snap->secret_len;
  uint8_t key[32], iv[16];
  mtp_rpc_derive_keys(&p, true, key, iv);
  mtp_rpc_codec_set_tx_key(&c->codec, key, iv);
  mtp_rpc_derive_keys(&p, false, key, iv);
  mtp_rpc_codec_set_rx_key(&c->codec, key, iv);
  mtp_wipe(key, sizeof(key));
  mtp_wipe(iv, sizeof(iv));

  struct mtp_rpc_pid sender = {
      .ip = ipv4_host(&c->local), .port = port_of(&c->local), .pid = (uint16_t)(getpid() & 0xffff),
      .utime = c->crypto_ts};
  struct mtp_rpc_pid peer = {.ip = ipv4_host(&c->peer), .port = port_of(&c->peer), .pid = 0, .utime = 0};
  uint8_t body[MTP_RPC_HANDSHAKE_LEN];
  size_t n = mtp_rpc_build_handshake(0, &sender, &peer, body);
  c->state = MTP_BACK_CONN_WAIT_HANDSHAKE;
  return write_body(c, body, n);
}

static int handle_handshake(struct mtp_back_conn *c, const struct mtp_rpc_msg *m) {
  if (m->type == MTP_RPC_HANDSHAKE_ERROR) {
    mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy rejected our handshake");
    return MTP_EHANDSHAKE;
  }
  if (m->type != MTP_RPC_HANDSHAKE) {
    mtp_logc(&c->log, MTP_LOG_WARN, "middle proxy answered 0x%08x instead of a handshake", m->type);
    return MTP_EHANDSHAKE;
  }
  uv_timer_stop(&c->timer);
  c->state = MTP_BACK_CONN_READY;
  c->was_ready = true;
  MTP_COUNT(RPC_CONNS_OPENED);
  mtp_logc(&c->log, MTP_LOG_INFO, "middle proxy connection established (%zu clients waiting)", c->nstreams);
  mtp_back_pool_conn_ready(c);
  return MTP_OK;
}

static int handle_frame(struct mtp_back_conn *c, const uint8_t *body, size_t len) {
  struct mtp_rpc_msg m;
  int rc = mtp_rpc_parse(body, len, &m);
  if (rc < 0) {
    if (c->state == MTP_BACK_CONN_READY && len >= 4) {
      uint32_t type;
      memcpy(&type, body, 4);
      mtp_debugc(&c->log, "ignoring unknown RPC message 0x%08x (%zu bytes)", type, len);
      return MTP_OK;
    }
    return MTP_EPROTO;
  }
  switch (c->state) {
  case MTP_BACK_CONN_WAIT_NONCE:
    return handle_nonce(c, &m);
  case MTP_BACK_CONN_WAIT_HANDSHAKE:
    return handle_handshake(c, &m);
  case MTP_BACK_CONN_READY:
    break;
  default:
    return MTP_OK;
  }
  switch (m.type) {
  case MTP_RPC_PING: {
    uint8_t out[12];
    size_t n = mtp_rpc_build_pong(m.ping_id, out);
    return write_body(c, out, n) < 0 ? MTP_ECLOSED : MTP_OK;
  }
  case MTP_RPC_PONG:
    return MTP_OK;
  case MTP_RPC_PROXY_ANS:
  case MTP_RPC_SIMPLE_ACK:
  case MTP_RPC_CLOSE_EXT:
    mtp_back_worker_dispatch(c, &m);
    return MTP_OK;
  default:
    mtp_debugc(&c->log, "ignoring RPC message 0x%08x", m.type);
    return MTP_OK;
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct mtp_back_conn *c = h->data;
  if (c->rbuf == NULL)
    c->rbuf = mtp_malloc(RBUF_SIZE);
  *buf = uv_buf_init((char *)c->rbuf, c->rbuf ? RBUF_SIZE : 0);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  struct mtp_back_conn *c = st->data;
  if (nread == 0 || c->state == MTP_BACK_CONN_CLOSING)
    return;
  if (nread < 0) {
    mtp_back_conn_fail(c, nread == UV_EOF ? MTP_ECLOSED : (int)nread);
    return;
  }
  const uint8_t *in = (const uint8_t *)buf->base;
  size_t n = (size_t)nread, off = 0;
  /* Bounded: each turn consumes input or returns a frame the codec already held. */
  for (int guard = 0; guard < 100000 && c->state != MTP_BACK_CONN_CLOSING; guard++) {
    const uint8_t *body = NULL;
    size_t blen = 0;
    bool has = false;
    ssize_t r = mtp_rpc_recv(&c->codec, in + off, n - off, &body, &blen, &has);
    if (r < 0) {
      mtp_logc(&c->log, MTP_LOG_WARN, "bad frame from middle proxy: %s", mtp_strerror((int)r));
      mtp_back_conn_fail(c, (int)r);
      return;
    }
    off += (size_t)r;
    if (has) {
      int rc = handle_frame(c, body, blen);
      if (rc < 0) {
        mtp_back_conn_fail(c, rc);
        return;
      }
      continue;
    }
    if (off >= n || r == 0)
      break;
  }
}

static void on_connect(uv_connect_t *req, int status) {
  struct mtp_back_conn *c = req->data;
  if (c->state == MTP_BACK_CONN_CLOSING)
    return;
  if (status < 0) {
    mtp_back_conn_fail(c, status);
    return;
  }
  int len = sizeof(c->local);
  if (uv_tcp_getsockname(&c->tcp, (struct sockaddr *)&c->local, &len) < 0) {
    mtp_back_conn_fail(c, MTP_EIO);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  struct mtp_rpc_nonce nonce;
  memset(&nonce, 0, sizeof(nonce));
  memcpy(&nonce.key_selector, c->snap->secret, 4);
  nonce.crypto_schema = 1;
  nonce.crypto_ts = c->crypto_ts;
  memcpy(nonce.nonce, c->nonce, 16);
  uint8_t body[MTP_RPC_NONCE_LEN];
  size_t n = mtp_rpc_build_nonce(&nonce, body);
  c->state = MTP_BACK_CONN_WAIT_NONCE;
  if (write_body(c, body, n) < 0)
    return;
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc < 0)
    mtp_back_conn_fail(c, rc);
}

struct mtp_back_conn *mtp_back_conn_open(struct mtp_back_pool *pool, struct mtp_tg_snapshot *snap, int addr_index,
                                         const struct sockaddr_storage *addr) {
  struct mtp_back_worker *w = pool->w;
  struct mtp_back_conn *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL) {
    mtp_tg_snapshot_release(snap);
    return NULL;
  }
  c->w = w;
  c->pool = pool;
  c->snap = snap;
  c->addr_index = addr_index;
  c->peer = *addr;
  c->state = MTP_BACK_CONN_CONNECTING;
  c->crypto_ts = (uint32_t)time(NULL);
  if (mtp_random(c->nonce, sizeof(c->nonce)) < 0) {
    for (size_t i = 0; i < sizeof(c->nonce); i++)
      c->nonce[i] = (uint8_t)mtp_random_below(256);
  }
  mtp_rpc_codec_init(&c->codec);
  c->log.id = ++w->next_log_id;
  format_addr(addr, c->log.peer, sizeof(c->log.peer));
  snprintf(c->where, sizeof(c->where), "dc%d w%d", pool->dc, w->index);
  c->log.where = c->where;
  uv_tcp_init(w->loop, &c->tcp);
  uv_timer_init(w->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->connect_req.data = c;
  c->handles = 2;
  /* link into the pool */
  c->next = pool->conns;
  if (pool->conns != NULL)
    pool->conns->pprev = &c->next;
  c->pprev = &pool->conns;
  pool->conns = c;
  mtp_metric_add(MTP_M_RPC_CONNS, 1);
  mtp_back_dc_add(&w->stats->conns[pool->slot], 1);

  double tmo = w->cfg->dc_connect_timeout > 0 ? w->cfg->dc_connect_timeout : 10;
  uv_timer_start(&c->timer, on_timeout, (uint64_t)(tmo * 1000.0) + 1, 0);
  mtp_debugc(&c->log, "connecting to middle proxy");
  int rc = uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)addr, on_connect);
  if (rc < 0)
    mtp_back_conn_fail(c, rc);
  return c;
}
