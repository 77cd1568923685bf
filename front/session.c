/*
 * session.c - a client session: obfuscated2 handshake, then packets relayed through the link
 * in both directions (see the state diagram in session.h).
 *
 * Client -> back: a read buffer is borrowed from the worker's pool for one read callback,
 * decrypted in place, cut into packets by the framing decoder and handed to link->send.
 * Back -> client: each packet is framed, encrypted into one fresh buffer and written; the
 * buffer belongs to the write request until its callback. A client whose unsent bytes would
 * exceed cfg->client_send_budget is closed, so a slow reader never grows memory nor stalls
 * the DC connection that feeds it.
 *
 * Fake-TLS: on a listener with fake-TLS domains the first three bytes decide. `16 03 01` is a
 * ClientHello: it is read whole (bounded by the TLS record limit, buffer freed right after),
 * checked (SNI, HMAC, timestamp, replay, policy) and answered with a ServerHello; from then on
 * every byte in either direction travels inside ApplicationData records, unwrapped here by
 * the record reader before the obfuscated2 layer sees it and wrapped after AES-CTR on the way
 * out. A TLS-looking connection that fails a check is handed to domain fronting (a dup of the
 * socket plus every byte read so far) and the session closes its own handle; with fronting
 * off it is treated like a failed obfuscated2 handshake (silence until the timeout).
 *
 * Close safety: session_close() may run inside any callback, including link ops called from
 * inside link->send(). It only changes the state, tells the link and starts uv_close on the
 * two handles; the memory goes in the close callback of the last handle. Code that called
 * something which may close the session re-checks s->state afterwards.
 */
#include "session.h"

#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "faketls.h"
#include "framing.h"
#include "fronting.h"
#include "log.h"
#include "lstats.h"
#include "metrics.h"
#include "obf2.h"
#include "policy.h"
#include "replay.h"
#include "tlsprobe.h"

#include "banned.h"

enum session_state {
  S_WAIT_HEADER, /* collecting the client's 64-byte obfuscated2 header (handshake timer); on a
                  * fake-TLS listener first the 3 bytes that tell TLS from obfuscated2 */
  S_TLS_HELLO,   /* collecting the fake-TLS ClientHello record (handshake timer) */
  S_DISCARD,     /* handshake failed: reading and dropping input until the handshake timer */
  S_RELAY,       /* link stream open: relaying packets both ways (idle timer) */
  S_FLUSH,       /* the back ended the stream: waiting for queued bytes to reach the client */
  S_CLOSING,     /* handles closing: waiting for their close callbacks to free the session */
};

static const char *session_state_str(enum session_state st) {
  switch (st) {
  case S_WAIT_HEADER:
    return "wait_header";
  case S_TLS_HELLO:
    return "tls_hello";
  case S_DISCARD:
    return "discard";
  case S_RELAY:
    return "relay";
  case S_FLUSH:
    return "flush";
  case S_CLOSING:
    return "closing";
  }
  return "?";
}

/* The first bytes of a TLS handshake record carrying a ClientHello (type 22, version 3.1). */
static const uint8_t tls_prefix[3] = {0x16, 0x03, 0x01};

struct mtp_session {
  uv_tcp_t tcp;
  uv_timer_t timer;                   /* handshake, idle or flush deadline, by state */
  struct mtp_front_ctx *fc;           /* borrows */
  const struct mtp_config *cfg;       /* borrows (gen holds it): the config it was accepted under */
  struct mtp_front_gen *gen;          /* holds a reference; NULL = generation 0 */
  const struct mtp_listener_conf *lc; /* borrows (in cfg): the listener it came through */
  struct mtp_lstats_block *stats;     /* borrows: the listener's counters on this worker (may
                                       * be NULL); counts this session as active until freed */
  struct mtp_session *prev, *next;    /* in fc->sessions */
  enum session_state state;
  int handles;                        /* handles not yet closed (tcp + timer) */
  bool reading;                       /* uv_read_start is in effect */
  bool link_full;                     /* link->send said MTP_LINK_FULL; wait for on_writable */
  bool kind_known;                    /* we know whether the client speaks TLS (or cannot) */
  bool tls;                           /* fake-TLS accepted: bytes travel in records both ways */
  bool admitted;                      /* policy admitted the connection: release `hold` once */
  enum mtp_proto proto;               /* MTP_PROTO_NONE until the handshake succeeds */
  void *stream;                       /* link stream; NULL before open and after close/on_close */
  uint64_t last_active;               /* uv_now() at the last traffic, for the idle timer */
  size_t hdr_have;
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  struct mtp_faketls_hello_reader *hello; /* owns: only while in S_TLS_HELLO */
  struct mtp_faketls_rx rx;           /* the client's records, once tls */
  uint8_t tls_secret[16];             /* the secret the ClientHello matched: the inner header
                                       * must use it too (wiped once the header is checked) */
  struct mtp_policy_hold *hold;       /* owns: what policy admission took (may be NULL) */
  struct mtp_log_ctx log;
  struct mtp_obf2 obf;
  struct mtp_frame_dec dec;
};

/* One write to the client; owns its bytes until on_written. */
struct wreq {
  uv_write_t req;
  size_t len;
  uint8_t data[];
};

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void on_timer(uv_timer_t *t);
static void on_handle_closed(uv_handle_t *h);
static void on_client_bytes(struct mtp_session *s, uint8_t *data, size_t n);
static void link_on_packet(void *front, const uint8_t *data, size_t len);
static void link_on_quickack(void *front, uint32_t token);
static void link_on_close(void *front, int reason);
static void link_on_writable(void *front);

static const struct mtp_link_front_ops front_ops = {
    .on_packet = link_on_packet,
    .on_quickack = link_on_quickack,
    .on_close = link_on_close,
    .on_writable = link_on_writable,
};

#define NO_METRIC (-1)

#define OBF2_ALLOW_BITS (MTP_ALLOW_ABRIDGED | MTP_ALLOW_INTERMEDIATE | MTP_ALLOW_SECURE)

/* The fake-TLS domains of the listener: its own, else the global ones. */
static char *const *listener_domains(const struct mtp_session *s, size_t *n) {
  if (s->lc->ntls_domains > 0) {
    *n = s->lc->ntls_domains;
    return s->lc->tls_domains;
  }
  *n = s->cfg->ntls_domains;
  return s->cfg->tls_domains;
}

static bool listener_has_tls(const struct mtp_session *s) {
  size_t n = 0;
  listener_domains(s, &n);
  return (s->lc->allowed_protocols & MTP_ALLOW_FAKE_TLS) != 0 && n > 0;
}

static bool listener_has_obf2(const struct mtp_session *s) {
  return (s->lc->allowed_protocols & OBF2_ALLOW_BITS) != 0;
}

static bool fronting_is_on(const struct mtp_session *s) {
  return s->fc->fronting != NULL && s->cfg->fronting_mode != MTP_FRONTING_OFF;
}

/* Wall-clock seconds: ClientHello timestamps are unix times, and the replay cache's ages
 * must be on the same clock in every worker. */
static int64_t wall_now(void) {
  return (int64_t)time(NULL);
}

static void tls_hello_drop(struct mtp_session *s) {
  if (s->hello == NULL)
    return;
  mtp_faketls_hello_free(s->hello);
  mtp_wipe(s->hello, sizeof(*s->hello));
  mtp_free(s->hello);
  s->hello = NULL;
}

/* The one predicate deciding whether we read from the client. */
static bool session_may_read(const struct mtp_session *s) {
  switch (s->state) {
  case S_WAIT_HEADER:
  case S_TLS_HELLO:
  case S_DISCARD:
    return true;
  case S_RELAY:
    return !s->link_full;
  case S_FLUSH:
  case S_CLOSING:
    return false;
  }
  return false;
}

static void session_close(struct mtp_session *s, int metric, bool flush, const char *why);

static void session_update_reading(struct mtp_session *s) {
  bool want = session_may_read(s);
  if (want && !s->reading) {
    int r = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
    if (r < 0) {
      mtp_logc(&s->log, MTP_LOG_WARN, "read start failed: %s", uv_strerror(r));
      session_close(s, NO_METRIC, false, "read start failed");
      return;
    }
    s->reading = true;
  } else if (!want && s->reading) {
    if (s->state != S_CLOSING)
      uv_read_stop((uv_stream_t *)&s->tcp);
    s->reading = false;
  }
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct mtp_session *s = req->data;
  mtp_free(req);
  if (s->state == S_FLUSH)
    session_close(s, NO_METRIC, false, status < 0 ? "shutdown failed" : "flushed");
}

/* Starts the flush of a session whose stream the back ended; false when it cannot. */
static bool session_start_flush(struct mtp_session *s) {
  uv_shutdown_t *req = mtp_malloc(sizeof(*req));
  if (req == NULL)
    return false;
  req->data = s;
  if (uv_shutdown(req, (uv_stream_t *)&s->tcp, on_shutdown) < 0) {
    mtp_free(req);
    return false;
  }
  s->state = S_FLUSH;
  session_update_reading(s);
  uv_timer_stop(&s->timer);
  uv_timer_start(&s->timer, on_timer, mtp_config_ms(s->cfg->handshake_timeout), 0);
  return true;
}

/*
 * Ends the session: counts metric (an MTP_M_* or NO_METRIC), releases the link stream if we
 * still hold it, then either flushes (flush: only after the back ended the stream) or closes
 * both handles. Safe inside any callback; idempotent.
 */
static void session_close(struct mtp_session *s, int metric, bool flush, const char *why) {
  if (s->state == S_CLOSING || (s->state == S_FLUSH && flush))
    return;
  if (metric != NO_METRIC)
    mtp_metric_add((enum mtp_metric)metric, 1);
  mtp_debugc(&s->log, "closing in state %s: %s", session_state_str(s->state), why);
  if (s->stream != NULL) {
    void *stream = s->stream;
    s->stream = NULL;
    s->fc->link->close(s->fc->link, stream);
  }
  if (flush && s->state == S_RELAY && session_start_flush(s))
    return;
  s->state = S_CLOSING;
  s->reading = false;
  uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&s->timer, on_handle_closed);
}

static void on_handle_closed(uv_handle_t *h) {
  struct mtp_session *s = h->data;
  if (--s->handles > 0)
    return;
  struct mtp_front_ctx *fc = s->fc;
  if (s->prev != NULL)
    s->prev->next = s->next;
  else
    fc->sessions = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
  fc->nsessions--;
  if (s->admitted && fc->shared.policy != NULL)
    mtp_policy_release(fc->shared.policy, s->hold); /* exactly once: the session ends here */
  s->hold = NULL;
  tls_hello_drop(s);
  if (s->proto != MTP_PROTO_NONE)
    mtp_frame_dec_free(&s->dec);
  mtp_obf2_free(&s->obf);
  struct mtp_front_gen *gen = s->gen;
  struct mtp_lstats_block *stats = s->stats;
  mtp_wipe(s, sizeof(*s));
  mtp_free(s);
  mtp_front_gen_release(gen); /* may free an old generation (and lc) here */
  mtp_metric_add(MTP_M_CLIENTS_ACTIVE, -1);
  mtp_lstats_add(stats, MTP_LSTAT_ACTIVE, -1); /* last use: the block may go at the next reload */
}

/* ---- back -> client ---- */

static void on_written(uv_write_t *req, int status) {
  struct wreq *w = (struct wreq *)req;
  struct mtp_session *s = req->data;
  mtp_free(w);
  if (status < 0 && status != UV_ECANCELED && (s->state == S_RELAY || s->state == S_FLUSH)) {
    mtp_debugc(&s->log, "write failed: %s", uv_strerror(status));
    session_close(s, NO_METRIC, false, "write failed");
  }
}

/* True when total more bytes may be queued to the client. An empty queue always takes one
 * packet, so a packet bigger than the budget still goes through to a reading client. */
static bool session_queue_has_room(struct mtp_session *s, size_t total) {
  size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp);
  return queued == 0 || queued + total <= s->cfg->client_send_budget;
}

static struct wreq *wreq_new(size_t len) {
  struct wreq *w = mtp_malloc(sizeof(*w) + len);
  if (w != NULL)
    w->len = len;
  return w;
}

/* Writes w's bytes as they are; takes w. False when the session was closed. */
static bool session_write(struct mtp_session *s, struct wreq *w) {
  uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)w->len);
  w->req.data = s;
  size_t len = w->len;
  int r = uv_write(&w->req, (uv_stream_t *)&s->tcp, &b, 1, on_written);
  if (r < 0) {
    mtp_free(w);
    mtp_debugc(&s->log, "write failed: %s", uv_strerror(r));
    session_close(s, NO_METRIC, false, "write failed");
    return false;
  }
  mtp_metric_add(MTP_M_BYTES_TO_CLIENTS, (int64_t)len);
  s->last_active = uv_now(s->fc->loop);
  return true;
}

/* The most payload we put in one record toward a fake-TLS client (as mtp_faketls_wrap). */
static size_t tls_record_max(const struct mtp_session *s) {
  size_t m = s->cfg->tls_record_size;
  return (m == 0 || m > MTP_FAKETLS_MAX_RECORD_PAYLOAD) ? MTP_FAKETLS_MAX_PAYLOAD : m;
}

/*
 * Builds one write to the client from plain (de-obfuscated) bytes: each piece is encrypted
 * with the client's tx stream straight into the write buffer and, for a fake-TLS client,
 * cut into ApplicationData records on the way (no second copy of the data).
 */
struct out {
  struct wreq *w;   /* owns until session_write */
  size_t pos;       /* bytes of w->data written */
  size_t remaining; /* plain bytes still to come */
  size_t rec_left;  /* payload bytes left in the current record */
  size_t max;       /* record payload limit; 0 = no records */
};

/* The bytes on the wire for plain bytes of payload. */
static size_t out_wire_len(const struct mtp_session *s, size_t plain) {
  return s->tls ? mtp_faketls_wrap_len(plain, tls_record_max(s)) : plain;
}

static bool out_begin(struct mtp_session *s, struct out *o, size_t plain) {
  memset(o, 0, sizeof(*o));
  o->w = wreq_new(out_wire_len(s, plain));
  o->remaining = plain;
  o->max = s->tls ? tls_record_max(s) : 0;
  return o->w != NULL;
}

static void out_put(struct mtp_session *s, struct out *o, const uint8_t *p, size_t n) {
  while (n > 0) {
    size_t k = n;
    if (o->max > 0) {
      if (o->rec_left == 0) {
        size_t rec = o->remaining < o->max ? o->remaining : o->max;
        uint8_t *h = o->w->data + o->pos;
        h[0] = 0x17;
        h[1] = 0x03;
        h[2] = 0x03;
        h[3] = (uint8_t)(rec >> 8);
        h[4] = (uint8_t)rec;
        o->pos += MTP_FAKETLS_RECORD_HEADER;
        o->rec_left = rec;
      }
      if (k > o->rec_left)
        k = o->rec_left;
      o->rec_left -= k;
    }
    mtp_aes_ctr_crypt(&s->obf.tx, p, o->w->data + o->pos, k);
    o->pos += k;
    o->remaining -= k;
    p += k;
    n -= k;
  }
}

static void link_on_packet(void *front, const uint8_t *data, size_t len) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  if (len == 0 || (s->proto == MTP_PROTO_ABRIDGED && len % 4 != 0) || len > MTP_MAX_PACKET) {
    mtp_logc(&s->log, MTP_LOG_WARN, "cannot frame a %zu-byte packet for %s", len, mtp_proto_name(s->proto));
    session_close(s, MTP_M_CLOSE_UPSTREAM, false, "unframable packet from the back");
    return;
  }
  uint8_t hdr[4];
  size_t pad = 0;
  size_t hlen = mtp_frame_header(s->proto, len, false, hdr, &pad);
  size_t total = hlen + len + pad;
  if (!session_queue_has_room(s, out_wire_len(s, total))) {
    mtp_logc(&s->log, MTP_LOG_INFO, "client too slow: %zu bytes unsent, budget %zu; closing",
             uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp), s->cfg->client_send_budget);
    session_close(s, MTP_M_CLOSE_BACKPRESSURE, false, "send budget exceeded");
    return;
  }
  struct out o;
  if (!out_begin(s, &o, total)) {
    mtp_logc(&s->log, MTP_LOG_WARN, "out of memory for a %zu-byte write", total);
    session_close(s, NO_METRIC, false, "out of memory");
    return;
  }
  uint8_t padding[16];
  for (size_t i = 0; i < pad && i < sizeof(padding); i++)
    padding[i] = (uint8_t)mtp_random_below(256);
  out_put(s, &o, hdr, hlen);
  out_put(s, &o, data, len);
  out_put(s, &o, padding, pad);
  if (session_write(s, o.w))
    MTP_COUNT(PACKETS_TO_CLIENTS);
}

static void link_on_quickack(void *front, uint32_t token) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  if (!session_queue_has_room(s, out_wire_len(s, 4))) {
    mtp_logc(&s->log, MTP_LOG_INFO, "client too slow for a quick ack; closing");
    session_close(s, MTP_M_CLOSE_BACKPRESSURE, false, "send budget exceeded");
    return;
  }
  struct out o;
  if (!out_begin(s, &o, 4)) {
    session_close(s, NO_METRIC, false, "out of memory");
    return;
  }
  uint8_t ack[4];
  mtp_frame_quickack(s->proto, token, ack);
  out_put(s, &o, ack, sizeof(ack));
  if (session_write(s, o.w))
    MTP_COUNT(QUICKACKS);
}

static void link_on_close(void *front, int reason) {
  struct mtp_session *s = front;
  s->stream = NULL; /* the back is done with it: no link->close */
  switch (reason) {
  case MTP_LINK_CLOSE_NORMAL:
    session_close(s, MTP_M_CLOSE_TELEGRAM, true, "closed by Telegram");
    break;
  case MTP_LINK_CLOSE_SHUTDOWN:
    session_close(s, NO_METRIC, true, "proxy shutting down");
    break;
  case MTP_LINK_CLOSE_BACKPRESSURE:
    mtp_logc(&s->log, MTP_LOG_INFO, "client too slow: the back buffered a whole window for it; closing");
    session_close(s, MTP_M_CLOSE_BACKPRESSURE, false, "send budget exceeded at the back");
    break;
  default:
    mtp_logc(&s->log, MTP_LOG_INFO, "stream closed by the back (reason %d)", reason);
    session_close(s, MTP_M_CLOSE_UPSTREAM, true, "upstream failed");
    break;
  }
}

static void link_on_writable(void *front) {
  struct mtp_session *s = front;
  if (s->state != S_RELAY)
    return;
  s->link_full = false;
  session_update_reading(s);
}

/* ---- failed handshakes: domain fronting or silence ---- */

static const char *tls_domain_of(const struct mtp_session *s, const char *sni);

/*
 * A TLS-looking connection failed (metric counted by the caller). Hands the socket to domain
 * fronting with every byte read so far (a[0..alen) then b[0..blen)) and closes the session, or,
 * with fronting off or failing, discards input until the handshake timer. sni: lower-cased, or
 * NULL. Returns true when the connection was handed over (the session is closing).
 */
static bool session_front(struct mtp_session *s, const char *sni, const uint8_t *a, size_t alen,
                          const uint8_t *b, size_t blen, const char *why) {
  /* In sni mode only a configured domain is dialled: an unknown SNI (or none) goes to the
   * listener's first domain, as a real server answers unknown names with its default site.
   * Otherwise anyone could make the proxy connect to any host's port 443. */
  if (sni == NULL || tls_domain_of(s, sni) == NULL) {
    size_t nd = 0;
    char *const *d = listener_domains(s, &nd);
    sni = nd > 0 ? d[0] : NULL;
  }
  if (fronting_is_on(s)) {
    uint8_t *pre = mtp_malloc(alen + blen + 1);
    uv_os_fd_t fd = -1;
    int dupfd = -1;
    if (pre != NULL && uv_fileno((const uv_handle_t *)&s->tcp, &fd) == 0)
      dupfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dupfd >= 0) {
      if (alen > 0)
        memcpy(pre, a, alen);
      if (blen > 0)
        memcpy(pre + alen, b, blen);
      int r = mtp_fronting_start(s->fc->fronting, dupfd, sni, pre, alen + blen, s->log.id, s->log.peer,
                                 s->lc->name);
      mtp_free(pre);
      if (r == MTP_OK) {
        mtp_logc(&s->log, MTP_LOG_INFO, "%s: handed to domain fronting (%zu bytes read)", why, alen + blen);
        tls_hello_drop(s);
        session_close(s, NO_METRIC, false, "handed to domain fronting");
        return true;
      }
      mtp_logc(&s->log, MTP_LOG_INFO, "%s: domain fronting refused it (%s); discarding input until the timeout",
               why, mtp_strerror(r));
    } else {
      mtp_free(pre);
      mtp_logc(&s->log, MTP_LOG_WARN, "%s: cannot hand the connection to domain fronting; discarding input", why);
    }
  } else {
    mtp_logc(&s->log, MTP_LOG_INFO, "%s; discarding input until the timeout", why);
  }
  tls_hello_drop(s);
  s->state = S_DISCARD;
  return false;
}

/* Asks policy about a connection whose handshake is known; sni NULL for obfuscated2. True
 * when admitted (the hold is released when the session is freed). */
static bool session_admit(struct mtp_session *s, const char *sni) {
  struct mtp_policy *p = s->fc->shared.policy;
  if (p == NULL)
    return true;
  struct sockaddr_storage peer;
  memset(&peer, 0, sizeof(peer));
  int alen = (int)sizeof(peer);
  uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&peer, &alen);
  struct mtp_policy_conn c = {.listener = s->lc->name, .client = &peer, .tls_domain = sni};
  struct mtp_policy_hold *hold = NULL;
  int rule = -1;
  if (mtp_policy_admit(p, &c, &hold, &rule) != MTP_OK) {
    mtp_logc(&s->log, MTP_LOG_INFO, "rejected by policy rule %d", rule);
    return false;
  }
  s->admitted = true;
  s->hold = hold;
  return true;
}

/* ---- client -> back ---- */

static void relay_from_client(struct mtp_session *s, uint8_t *data, size_t n) {
  mtp_aes_ctr_crypt(&s->obf.rx, data, data, n);
  size_t off = 0;
  while (off < n && s->state == S_RELAY) {
    struct mtp_packet pkt;
    bool has = false;
    ssize_t r = mtp_frame_decode(&s->dec, data + off, n - off, &pkt, &has);
    if (r < 0) {
      mtp_logc(&s->log, MTP_LOG_INFO, "bad frame from client: %s", mtp_strerror((int)r));
      session_close(s, MTP_M_CLOSE_BAD_FRAME, false, "bad frame");
      return;
    }
    off += (size_t)r;
    if (!has) {
      if (r == 0)
        break; /* no progress: cannot happen with a conforming decoder */
      continue;
    }
    MTP_COUNT(PACKETS_FROM_CLIENTS);
    int rc = s->fc->link->send(s->fc->link, s->stream, pkt.data, pkt.len, pkt.quickack);
    if (s->state != S_RELAY)
      return; /* an op called from inside send ended the session */
    if (rc < 0) {
      mtp_logc(&s->log, MTP_LOG_INFO, "link refused a packet: %s", mtp_strerror(rc));
      session_close(s, MTP_M_CLOSE_UPSTREAM, false, "link send failed");
      return;
    }
    if (rc == MTP_LINK_FULL)
      s->link_full = true;
  }
  session_update_reading(s);
}

static unsigned proto_allow_bit(enum mtp_proto p) {
  switch (p) {
  case MTP_PROTO_ABRIDGED:
    return MTP_ALLOW_ABRIDGED;
  case MTP_PROTO_INTERMEDIATE:
    return MTP_ALLOW_INTERMEDIATE;
  case MTP_PROTO_PADDED:
    return MTP_ALLOW_SECURE;
  case MTP_PROTO_NONE:
    break;
  }
  return 0;
}

/* A failed obfuscated2 header (plain or inside fake-TLS): silence until the timeout. */
static bool header_fail(struct mtp_session *s, enum mtp_metric m, const char *why) {
  mtp_metric_add(m, 1);
  mtp_obf2_free(&s->obf);
  mtp_logc(&s->log, MTP_LOG_INFO, "handshake failed: %s; discarding input until the timeout", why);
  s->state = S_DISCARD;
  return false;
}

/* Checks the complete header and opens the link stream. True when now in S_RELAY. */
static bool session_handshake(struct mtp_session *s) {
  struct mtp_front_ctx *fc = s->fc;
  struct mtp_obf2_result res;
  int r;
  if (s->tls) {
    /* Inside fake-TLS the client uses the secret its hello was made with (with per-SNI
     * secrets, the one derived for its domain). */
    r = mtp_obf2_accept(&s->obf, s->hdr, (const uint8_t(*)[16])&s->tls_secret, 1, &res);
    mtp_wipe(s->tls_secret, sizeof(s->tls_secret));
  } else {
    r = mtp_obf2_accept(&s->obf, s->hdr, (const uint8_t(*)[16])s->lc->secrets, s->lc->nsecrets, &res);
  }
  if (r != MTP_OK) {
    mtp_wipe(s->hdr, sizeof(s->hdr));
    MTP_COUNT(HS_FAIL_BAD_SECRET);
    mtp_logc(&s->log, MTP_LOG_INFO, "handshake failed: no secret matches; discarding input until the timeout");
    s->state = S_DISCARD;
    return false;
  }
  /* A header seen before is a recording played back (an active probe): same silence as a
   * wrong secret. Inside fake-TLS the ClientHello random was checked already; checking the
   * header as well costs one entry and catches a replayed inner stream too. */
  bool replayed = fc->shared.replay != NULL &&
                  mtp_replay_check_obf2(fc->shared.replay, s->hdr, wall_now()) == MTP_REPLAY_SEEN;
  mtp_wipe(s->hdr, sizeof(s->hdr));
  if (replayed)
    return header_fail(s, MTP_M_HS_FAIL_OBF2_REPLAY, "replayed obfuscated2 header");
  /* allowed_protocols names the outer transport: inside fake-TLS any framing is accepted. */
  if (!s->tls && (s->lc->allowed_protocols & proto_allow_bit(res.proto)) == 0) {
    mtp_logc(&s->log, MTP_LOG_INFO, "protocol %s not allowed", mtp_proto_name(res.proto));
    return header_fail(s, MTP_M_HS_FAIL_DISABLED, "protocol not allowed");
  }
  /* Fake-TLS clients were admitted at the ClientHello, with their SNI. */
  if (!s->tls && !session_admit(s, NULL))
    return header_fail(s, MTP_M_HS_FAIL_POLICY, "rejected by policy");
  /* The global counters by the framing inside; the listener's by the outer transport, as
   * allowed_protocols names it (fake_tls whatever the framing inside). */
  enum mtp_lstat outer;
  switch (res.proto) {
  case MTP_PROTO_ABRIDGED:
    MTP_COUNT(HS_OK_ABRIDGED);
    outer = MTP_LSTAT_HS_ABRIDGED;
    break;
  case MTP_PROTO_INTERMEDIATE:
    MTP_COUNT(HS_OK_INTERMEDIATE);
    outer = MTP_LSTAT_HS_INTERMEDIATE;
    break;
  default:
    MTP_COUNT(HS_OK_SECURE);
    outer = MTP_LSTAT_HS_SECURE;
    break;
  }
  if (s->tls) {
    MTP_COUNT(HS_OK_FAKE_TLS);
    outer = MTP_LSTAT_HS_FAKE_TLS;
  }
  mtp_lstats_add(s->stats, outer, 1);
  s->proto = res.proto;
  mtp_frame_dec_init(&s->dec, res.proto);

  struct mtp_link_open req;
  memset(&req, 0, sizeof(req));
  req.dc = res.dc;
  req.proto = res.proto;
  int alen = (int)sizeof(req.client_addr);
  uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&req.client_addr, &alen);
  alen = (int)sizeof(req.local_addr);
  uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&req.local_addr, &alen);
  req.listener = s->lc->name;
  if (s->lc->has_ad_tag) {
    req.has_ad_tag = true;
    memcpy(req.ad_tag, s->lc->ad_tag, sizeof(req.ad_tag));
  } else if (s->cfg->has_ad_tag) {
    req.has_ad_tag = true;
    memcpy(req.ad_tag, s->cfg->ad_tag, sizeof(req.ad_tag));
  }
  int err = MTP_OK;
  void *stream = fc->link->open(fc->link, &req, s, &front_ops, &err);
  if (stream == NULL) {
    mtp_logc(&s->log, MTP_LOG_WARN, "cannot open a stream to dc %d: %s", res.dc, mtp_strerror(err));
    session_close(s, MTP_M_CLOSE_UPSTREAM, false, "link open failed");
    return false;
  }
  s->stream = stream;
  s->state = S_RELAY;
  uv_timer_stop(&s->timer);
  uv_timer_start(&s->timer, on_timer, mtp_config_ms(s->cfg->idle_timeout), 0);
  mtp_debugc(&s->log, "handshake ok: %s%s, dc %d, secret #%d", s->tls ? "fake-TLS + " : "",
             mtp_proto_name(res.proto), res.dc, res.secret_index);
  return true;
}

/* ---- fake-TLS handshake ---- */

static char ascii_lower(char c) {
  return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static bool host_equal(const char *a, const char *b) {
  for (; *a != '\0' && *b != '\0'; a++, b++)
    if (ascii_lower(*a) != ascii_lower(*b))
      return false;
  return *a == *b;
}

/* The configured domain the SNI names (case-insensitively), or NULL. */
static const char *tls_domain_of(const struct mtp_session *s, const char *sni) {
  size_t n = 0;
  char *const *d = listener_domains(s, &n);
  for (size_t i = 0; i < n; i++)
    if (host_equal(d[i], sni))
      return d[i];
  return NULL;
}

/* The size of the fake certificate flight for domain. */
static size_t tls_flight_size(const struct mtp_session *s, const char *domain) {
  size_t n;
  if (s->fc->shared.tlsprobe != NULL)
    n = mtp_tlsprobe_flight_size(s->fc->shared.tlsprobe, domain);
  else if (s->cfg->tls_flight_size > 0)
    n = s->cfg->tls_flight_size;
  else
    n = 2500 + mtp_random_below(4600 - 2500 + 1);
  if (n < 1)
    n = 1;
  if (n > MTP_FAKETLS_MAX_PAYLOAD)
    n = MTP_FAKETLS_MAX_PAYLOAD;
  return n;
}

/* Sends the ServerHello + CCS + fake flight for the validated hello (raw: outside obf2). */
static bool tls_answer(struct mtp_session *s, const struct mtp_faketls_hello *h, const uint8_t secret[16],
                       const char *domain) {
  struct mtp_faketls_answer_opts opts = {.appdata_len = tls_flight_size(s, domain)};
  size_t len = mtp_faketls_server_hello_len(h, &opts);
  struct wreq *w = wreq_new(len);
  if (w == NULL) {
    session_close(s, NO_METRIC, false, "out of memory");
    return false;
  }
  int r = mtp_faketls_server_hello(h, secret, &opts, w->data, len);
  if (r < 0) {
    mtp_free(w);
    mtp_logc(&s->log, MTP_LOG_WARN, "cannot build the ServerHello: %s", mtp_strerror(r));
    session_close(s, NO_METRIC, false, "ServerHello failed");
    return false;
  }
  w->len = (size_t)r;
  return session_write(s, w);
}

/*
 * Checks a complete ClientHello (s->hello DONE); rest[0..restlen) are the bytes that followed
 * it in the same read. On success answers it and switches to records (true); on failure the
 * connection went to fronting or to discard (false). Either way s->hello is gone afterwards.
 */
static bool tls_check_hello(struct mtp_session *s, const uint8_t *rest, size_t restlen) {
  const struct mtp_faketls_hello *h = &s->hello->hello;
  size_t reclen = 0;
  const uint8_t *rec = mtp_faketls_hello_bytes(s->hello, &reclen);
  const struct mtp_config *cfg = s->cfg;
  char sni[MTP_FAKETLS_MAX_HOST + 1];
  size_t i;
  for (i = 0; i < h->sni_len && i < MTP_FAKETLS_MAX_HOST; i++)
    sni[i] = ascii_lower(h->sni[i]);
  sni[i] = '\0';

  const char *domain = tls_domain_of(s, sni);
  if (domain == NULL) {
    MTP_COUNT(HS_FAIL_TLS_BAD_SNI);
    session_front(s, sni, rec, reclen, rest, restlen, "fake-TLS: SNI names no domain of this listener");
    return false;
  }

  /* The secrets to try: the listener's, or with per-SNI secrets the ones derived for this
   * domain (so a link only works with its own domain). */
  size_t nsec = s->lc->nsecrets;
  uint8_t(*derived)[16] = NULL;
  const uint8_t(*secrets)[16] = (const uint8_t(*)[16])s->lc->secrets;
  if (cfg->per_sni_secrets && nsec > 0) {
    derived = mtp_malloc(nsec * 16);
    if (derived == NULL) {
      session_close(s, NO_METRIC, false, "out of memory");
      return false;
    }
    const char *salt = cfg->per_sni_salt != NULL ? cfg->per_sni_salt : "";
    for (size_t k = 0; k < nsec; k++)
      mtp_faketls_derive_secret(s->lc->secrets[k], salt, domain, derived[k]);
    secrets = (const uint8_t(*)[16])derived;
  }
  struct mtp_faketls_match m;
  int r = mtp_faketls_hello_validate(h, secrets, nsec, &m);
  uint8_t secret[16];
  if (r == MTP_OK)
    memcpy(secret, secrets[m.secret_index], 16);
  if (derived != NULL) {
    mtp_wipe(derived, nsec * 16);
    mtp_free(derived);
  }
  if (r != MTP_OK) {
    MTP_COUNT(HS_FAIL_TLS_BAD_HMAC);
    session_front(s, sni, rec, reclen, rest, restlen, "fake-TLS: no secret matches the ClientHello");
    return false;
  }

  int64_t now = wall_now();
  double skew_d = cfg->tls_clock_skew;
  uint32_t skew = skew_d <= 0 ? 0 : skew_d >= 4294967295.0 ? UINT32_MAX : (uint32_t)skew_d;
  bool ok = true;
  if (!mtp_faketls_time_is_ok(m.timestamp, (uint64_t)now, skew, skew)) {
    MTP_COUNT(HS_FAIL_TLS_TIME);
    mtp_logc(&s->log, MTP_LOG_INFO, "fake-TLS: ClientHello time is %lld s off", (long long)m.timestamp - now);
    session_front(s, sni, rec, reclen, rest, restlen, "fake-TLS: timestamp out of the window");
    ok = false;
  } else if (s->fc->shared.replay != NULL &&
             mtp_replay_check_tls(s->fc->shared.replay, h->random, now) == MTP_REPLAY_SEEN) {
    MTP_COUNT(HS_FAIL_TLS_REPLAY);
    session_front(s, sni, rec, reclen, rest, restlen, "fake-TLS: replayed ClientHello");
    ok = false;
  } else if (!session_admit(s, domain)) {
    MTP_COUNT(HS_FAIL_POLICY);
    session_front(s, sni, rec, reclen, rest, restlen, "fake-TLS: rejected by policy");
    ok = false;
  }
  if (!ok) {
    mtp_wipe(secret, sizeof(secret));
    return false;
  }
  bool sent = tls_answer(s, h, secret, domain);
  memcpy(s->tls_secret, secret, sizeof(secret));
  mtp_wipe(secret, sizeof(secret));
  tls_hello_drop(s);
  if (!sent)
    return false;
  mtp_debugc(&s->log, "fake-TLS hello ok: %s, secret #%d", domain, m.secret_index);
  s->tls = true;
  mtp_faketls_rx_init(&s->rx);
  s->state = S_WAIT_HEADER;
  return true;
}

/* Bytes of the ClientHello (S_TLS_HELLO). */
static void tls_hello_bytes(struct mtp_session *s, uint8_t *data, size_t n) {
  int r = mtp_faketls_hello_feed(s->hello, data, n);
  if (r == MTP_AGAIN)
    return;
  if (r < 0) {
    /* The reader keeps what earlier feeds gave; this feed's bytes follow them. */
    MTP_COUNT(HS_FAIL_TLS_BAD_HELLO);
    size_t got = 0;
    const uint8_t *b = mtp_faketls_hello_bytes(s->hello, &got);
    mtp_logc(&s->log, MTP_LOG_INFO, "fake-TLS: not a usable ClientHello: %s", mtp_strerror(r));
    session_front(s, NULL, b, got, data, n, "fake-TLS: bad ClientHello");
    return;
  }
  size_t used = (size_t)r;
  if (!tls_check_hello(s, data + used, n - used))
    return;
  if (used < n && s->state == S_WAIT_HEADER)
    on_client_bytes(s, data + used, n - used); /* the first records came in the same read */
}

/*
 * Classifies a fake-TLS listener's client by its first bytes (copied into s->hdr, which also
 * starts the obfuscated2 header). Returns the bytes of data used; sets s->kind_known once the
 * bytes differ from the TLS prefix (obfuscated2) or match all of it (TLS: S_TLS_HELLO).
 * Obfuscated2 clients never start with 16 03 01 02 (docs/PROTOCOLS.md); one starting with
 * 16 03 01 (2^-24) is taken for TLS and fails, a price worth not rejecting the 1/256 whose
 * header starts with 16.
 */
static size_t classify(struct mtp_session *s, const uint8_t *data, size_t n, bool *is_tls) {
  size_t i = 0;
  *is_tls = false;
  while (s->hdr_have < sizeof(tls_prefix) && i < n) {
    uint8_t b = data[i++];
    s->hdr[s->hdr_have++] = b;
    if (b != tls_prefix[s->hdr_have - 1]) {
      s->kind_known = true;
      return i;
    }
  }
  if (s->hdr_have == sizeof(tls_prefix)) {
    s->kind_known = true;
    *is_tls = true;
  }
  return i;
}

/* Starts reading a ClientHello whose first bytes are in s->hdr; then feeds data[0..n). */
static void tls_start(struct mtp_session *s, uint8_t *data, size_t n) {
  s->hello = mtp_malloc(sizeof(*s->hello));
  if (s->hello == NULL) {
    session_close(s, NO_METRIC, false, "out of memory");
    return;
  }
  mtp_faketls_hello_init(s->hello);
  s->state = S_TLS_HELLO;
  int r = mtp_faketls_hello_feed(s->hello, s->hdr, s->hdr_have);
  mtp_wipe(s->hdr, sizeof(s->hdr));
  s->hdr_have = 0;
  if (r != MTP_AGAIN) { /* cannot happen: the prefix alone is never a whole record */
    session_close(s, NO_METRIC, false, "hello reader failed");
    return;
  }
  if (n > 0)
    tls_hello_bytes(s, data, n);
}

static void on_client_bytes(struct mtp_session *s, uint8_t *data, size_t n) {
  s->last_active = uv_now(s->fc->loop);
  if (s->tls && (s->state == S_WAIT_HEADER || s->state == S_RELAY)) {
    size_t plain = 0;
    int r = mtp_faketls_rx_feed(&s->rx, data, n, data, &plain);
    if (r < 0) {
      mtp_logc(&s->log, MTP_LOG_INFO, "bad TLS record from client: %s", mtp_strerror(r));
      session_close(s, MTP_M_CLOSE_BAD_FRAME, false, "bad TLS record");
      return;
    }
    n = plain;
    if (n == 0)
      return;
  }
  switch (s->state) {
  case S_WAIT_HEADER: {
    if (!s->kind_known) {
      bool is_tls = false;
      size_t used = classify(s, data, n, &is_tls);
      if (is_tls) {
        tls_start(s, data + used, n - used);
        return;
      }
      if (!s->kind_known)
        return; /* all of it matched the prefix so far */
      if (!listener_has_obf2(s)) {
        MTP_COUNT(HS_FAIL_NOT_TLS);
        session_front(s, NULL, s->hdr, s->hdr_have, data + used, n - used, "not TLS on a TLS-only listener");
        mtp_wipe(s->hdr, sizeof(s->hdr));
        return;
      }
      data += used;
      n -= used;
      if (s->hdr_have < MTP_OBF2_HEADER_LEN && n == 0)
        return;
    }
    size_t take = MTP_OBF2_HEADER_LEN - s->hdr_have;
    if (take > n)
      take = n;
    memcpy(s->hdr + s->hdr_have, data, take);
    s->hdr_have += take;
    if (s->hdr_have < MTP_OBF2_HEADER_LEN)
      return;
    if (!session_handshake(s) || take == n)
      return;
    relay_from_client(s, data + take, n - take);
    return;
  }
  case S_TLS_HELLO:
    tls_hello_bytes(s, data, n);
    return;
  case S_RELAY:
    relay_from_client(s, data, n);
    return;
  case S_DISCARD:
  case S_FLUSH:
  case S_CLOSING:
    return;
  }
}

static void on_client_end(struct mtp_session *s, ssize_t err) {
  const char *what = err == UV_EOF ? "client closed" : uv_strerror((int)err);
  switch (s->state) {
  case S_WAIT_HEADER:
  case S_TLS_HELLO:
    MTP_COUNT(HS_FAIL_EOF);
    mtp_debugc(&s->log, "handshake failed: %s in state %s", what, session_state_str(s->state));
    session_close(s, NO_METRIC, false, what);
    return;
  case S_DISCARD:
  case S_RELAY:
    session_close(s, NO_METRIC, false, what);
    return;
  case S_FLUSH:
  case S_CLOSING:
    return;
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct mtp_session *s = h->data;
  buf->base = mtp_bufpool_get(&s->fc->pool);
  buf->len = buf->base != NULL ? MTP_BUFPOOL_BUF_SIZE : 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct mtp_session *s = stream->data;
  if (nread > 0) {
    mtp_metric_add(MTP_M_BYTES_FROM_CLIENTS, nread);
    on_client_bytes(s, (uint8_t *)buf->base, (size_t)nread);
  } else if (nread < 0) {
    on_client_end(s, nread);
  }
  /* The session may be closing, but it is only freed in a later close callback. */
  mtp_bufpool_put(&s->fc->pool, buf->base);
}

static void on_timer(uv_timer_t *t) {
  struct mtp_session *s = t->data;
  switch (s->state) {
  case S_WAIT_HEADER:
  case S_TLS_HELLO:
    MTP_COUNT(HS_FAIL_TIMEOUT);
    mtp_debugc(&s->log, "handshake timeout in state %s", session_state_str(s->state));
    /* A half-sent ClientHello, or silence on a TLS-only listener: a real server would still
     * be waiting, so the fronted one gets the connection and decides. */
    if (!s->tls && fronting_is_on(s) && listener_has_tls(s) &&
        (s->state == S_TLS_HELLO || !listener_has_obf2(s))) {
      size_t got = s->hdr_have;
      const uint8_t *b = s->hello != NULL ? mtp_faketls_hello_bytes(s->hello, &got) : s->hdr;
      if (session_front(s, NULL, b, got, NULL, 0, "handshake timeout"))
        return;
    }
    session_close(s, NO_METRIC, false, "handshake timeout");
    return;
  case S_DISCARD:
    session_close(s, NO_METRIC, false, "end of discarding");
    return;
  case S_RELAY: {
    uint64_t idle = mtp_config_ms(s->cfg->idle_timeout);
    uint64_t quiet = uv_now(s->fc->loop) - s->last_active;
    if (quiet < idle) {
      uv_timer_start(&s->timer, on_timer, idle - quiet, 0);
      return;
    }
    session_close(s, MTP_M_CLOSE_IDLE, false, "idle timeout");
    return;
  }
  case S_FLUSH:
    session_close(s, NO_METRIC, false, "flush timeout");
    return;
  case S_CLOSING:
    return;
  }
}

int mtp_session_accept(struct mtp_front_ctx *fc, uv_stream_t *server, const struct mtp_listener_conf *lc,
                       struct mtp_lstats_block *stats) {
  struct mtp_session *s = mtp_calloc(1, sizeof(*s));
  if (s == NULL) {
    mtp_log(MTP_LOG_ERROR, "listener %s: out of memory for a new client", lc->name);
    return MTP_ENOMEM;
  }
  int r = uv_tcp_init(fc->loop, &s->tcp);
  if (r < 0) {
    mtp_log(MTP_LOG_ERROR, "listener %s: cannot set up a client: %s", lc->name, uv_strerror(r));
    mtp_free(s);
    return MTP_ENOMEM;
  }
  uv_timer_init(fc->loop, &s->timer);
  s->tcp.data = s;
  s->timer.data = s;
  s->handles = 2;
  s->fc = fc;
  s->cfg = fc->cfg;
  s->gen = fc->gen;
  mtp_front_gen_hold(s->gen);
  s->lc = lc;
  s->stats = stats;
  s->state = S_WAIT_HEADER;
  s->kind_known = !listener_has_tls(s); /* else the first bytes tell TLS from obfuscated2 */
  s->log.id = ((unsigned long long)fc->index << 40) | ++fc->next_id;
  s->log.where = lc->name;
  s->next = fc->sessions;
  if (s->next != NULL)
    s->next->prev = s;
  fc->sessions = s;
  fc->nsessions++;
  mtp_metric_add(MTP_M_CLIENTS_ACTIVE, 1);
  mtp_lstats_add(stats, MTP_LSTAT_ACTIVE, 1);

  r = uv_accept(server, (uv_stream_t *)&s->tcp);
  if (r < 0) {
    mtp_log(MTP_LOG_WARN, "listener %s: accept failed: %s", lc->name, uv_strerror(r));
    session_close(s, NO_METRIC, false, "accept failed");
    return MTP_OK;
  }
  MTP_COUNT(CLIENTS_ACCEPTED);
  mtp_lstats_add(stats, MTP_LSTAT_ACCEPTED, 1);
  uv_tcp_nodelay(&s->tcp, 1);
  struct sockaddr_storage peer;
  int plen = (int)sizeof(peer);
  memset(&peer, 0, sizeof(peer));
  if (uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&peer, &plen) == 0)
    mtp_format_addr(&peer, s->log.peer, sizeof(s->log.peer));
  else
    snprintf(s->log.peer, sizeof(s->log.peer), "?");
  s->last_active = uv_now(fc->loop);
  uv_timer_start(&s->timer, on_timer, mtp_config_ms(s->cfg->handshake_timeout), 0);
  mtp_debugc(&s->log, "accepted");
  session_update_reading(s);
  return MTP_OK;
}

void mtp_session_close_all(struct mtp_front_ctx *fc) {
  for (struct mtp_session *s = fc->sessions; s != NULL; s = s->next)
    session_close(s, NO_METRIC, false, "worker stopping");
}
