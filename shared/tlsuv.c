/*
 * tlsuv.c - mbedTLS TLS 1.2 over a libuv TCP handle (see tlsuv.h).
 *
 * Data path. Read: libuv reads ciphertext straight into t->in (alloc_cb hands out its free
 * tail); drive() runs the handshake or mbedtls_ssl_read, whose recv callback (bio_recv) takes
 * bytes from t->in, and hands each record's plaintext to on_data. mbedTLS always asks for the
 * rest of the record it is working on, so t->in is empty again whenever it says WANT_READ.
 * Write: plaintext goes to t->stage (or, for whole records of a large write, straight from the
 * caller's buffer) and mbedtls_ssl_write seals it; its send callback (bio_send) appends the
 * records to the tail write chunk, which goes to uv_write when full or at the flush before
 * the loop polls. A chunk is freed in its write callback.
 *
 * Lifetime: three handles (tcp, timer, prepare) close together; the last close callback calls
 * on_close and frees everything. Pending writes come back with UV_ECANCELED first.
 */
#include "tlsuv.h"

#include <stdio.h>
#include <string.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#include "alloc.h"
#include "config.h"
#include "err.h"

#include "banned.h"

struct mtp_tls_conf {
  enum mtp_tls_role role;
  mbedtls_ssl_config ssl;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_x509_crt cert; /* our chain */
  mbedtls_x509_crt ca;   /* the private CA */
  mbedtls_pk_context key;
  char *peer_name;       /* owns; client: required server name, or NULL */
  uint64_t hs_timeout_ms;
};

/* Modern AEAD suites with forward secrecy only; the certificates are ECDSA (back/certs.h). */
static const int SUITES[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    0,
};

enum tls_state {
  T_CONNECTING = 0, /* waiting for the TCP connect (client) */
  T_HANDSHAKE,      /* TLS handshake in progress (handshake timer) */
  T_OPEN,           /* verified; plaintext flows both ways */
  T_CLOSING,        /* closed: lingering for the last bytes, or handles closing */
};

struct wchunk {
  uv_write_t req;
  struct mtp_tlsuv *t; /* borrows */
  size_t len, cap;
  bool submitted;
  uint8_t data[];
};

struct mtp_tlsuv {
  uv_tcp_t tcp;
  uv_timer_t timer; /* handshake timeout, then ticks, then linger */
  uv_prepare_t prep; /* the flush before the loop polls */
  uv_connect_t creq;
  int open_handles;
  enum tls_state state;
  bool handles_closing;
  bool lingering;
  bool reading;
  bool flush_scheduled;
  bool want_writable;
  struct mtp_tls_conf *conf; /* borrows */
  mbedtls_ssl_context ssl;
  const struct mtp_tlsuv_cbs *cbs; /* borrows */
  void *data;                      /* borrows: the owner's */
  uint8_t *in;                     /* owns: ciphertext read, MTP_TLSUV_IN_CAP */
  size_t in_off, in_len;
  uint8_t *plain;                  /* owns: one record of plaintext read */
  uint8_t *stage;                  /* owns: plaintext to seal, MTP_TLSUV_RECORD */
  size_t stage_len;
  size_t reserved;                 /* bytes handed out by mtp_tlsuv_reserve */
  struct wchunk *tail;             /* owns until submitted: the chunk being filled */
  size_t queued_ct;                /* ciphertext bytes not yet written (tail + in flight) */
  uint64_t tick_ms;
  int err;
  char why[384];
  char peer[64];
  char cn[65];
  char suite[64];
};

/* ---- configuration ---- */

static void tls_errstr(int rc, char *out, size_t cap) {
  mbedtls_strerror(rc, out, cap);
  if (out[0] == '\0')
    snprintf(out, cap, "mbedTLS error -0x%04x", (unsigned)-rc);
}

static int load_fail(char *err, size_t errlen, const char *opt, const char *path, const char *what, int rc) {
  char e[128];
  tls_errstr(rc, e, sizeof(e));
  snprintf(err, errlen, "%s %s: %s: %s", opt, path, what, e);
  return rc == MBEDTLS_ERR_PK_FILE_IO_ERROR ? MTP_EIO : MTP_EINVAL;
}

int mtp_tls_conf_setup(struct mtp_tls_conf **out, const struct mtp_tls_conf_opts *o, char *err, size_t errlen) {
  *out = NULL;
  if (errlen > 0)
    err[0] = '\0';
  const char *cert_opt = o->cert_opt ? o->cert_opt : "cert";
  const char *key_opt = o->key_opt ? o->key_opt : "key";
  const char *ca_opt = o->ca_opt ? o->ca_opt : "ca";
  if (o->cert == NULL || o->cert[0] == '\0' || o->key == NULL || o->key[0] == '\0' || o->ca == NULL ||
      o->ca[0] == '\0') {
    const char *missing = (o->cert == NULL || o->cert[0] == '\0') ? cert_opt
                          : (o->key == NULL || o->key[0] == '\0') ? key_opt
                                                                  : ca_opt;
    snprintf(err, errlen, "%s: not set (a PEM file is required)", missing);
    return MTP_EINVAL;
  }
  struct mtp_tls_conf *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  c->role = o->role;
  c->hs_timeout_ms = o->handshake_timeout_ms ? o->handshake_timeout_ms : 10000;
  mbedtls_ssl_config_init(&c->ssl);
  mbedtls_entropy_init(&c->entropy);
  mbedtls_ctr_drbg_init(&c->drbg);
  mbedtls_x509_crt_init(&c->cert);
  mbedtls_x509_crt_init(&c->ca);
  mbedtls_pk_init(&c->key);

  int rc;
  int ret = MTP_EINVAL;
  static const char pers[] = "mtproxy tunnel";
  rc = mbedtls_ctr_drbg_seed(&c->drbg, mbedtls_entropy_func, &c->entropy, (const unsigned char *)pers,
                             sizeof(pers) - 1);
  if (rc != 0) {
    char e[128];
    tls_errstr(rc, e, sizeof(e));
    snprintf(err, errlen, "cannot seed the TLS random generator: %s", e);
    ret = MTP_EIO;
    goto fail;
  }
  rc = mbedtls_x509_crt_parse_file(&c->ca, o->ca);
  if (rc != 0) {
    ret = load_fail(err, errlen, ca_opt, o->ca, "cannot load the CA certificate", rc > 0 ? MTP_EINVAL : rc);
    goto fail;
  }
  rc = mbedtls_x509_crt_parse_file(&c->cert, o->cert);
  if (rc != 0) {
    ret = load_fail(err, errlen, cert_opt, o->cert, "cannot load the certificate", rc > 0 ? MTP_EINVAL : rc);
    goto fail;
  }
  rc = mbedtls_pk_parse_keyfile(&c->key, o->key, NULL);
  if (rc != 0) {
    ret = load_fail(err, errlen, key_opt, o->key, "cannot load the private key", rc);
    goto fail;
  }
  if (mbedtls_pk_check_pair(&c->cert.pk, &c->key) != 0) {
    snprintf(err, errlen, "%s %s and %s %s do not match", cert_opt, o->cert, key_opt, o->key);
    goto fail;
  }
  uint32_t flags = 0;
  if (mbedtls_x509_crt_verify(&c->cert, &c->ca, NULL, NULL, &flags, NULL, NULL) != 0) {
    snprintf(err, errlen, "%s %s is not signed by %s %s", cert_opt, o->cert, ca_opt, o->ca);
    goto fail;
  }
  rc = mbedtls_ssl_config_defaults(&c->ssl, o->role == MTP_TLS_SERVER ? MBEDTLS_SSL_IS_SERVER : MBEDTLS_SSL_IS_CLIENT,
                                   MBEDTLS_SSL_TRANSPORT_STREAM, MBEDTLS_SSL_PRESET_DEFAULT);
  if (rc != 0) {
    snprintf(err, errlen, "cannot set up TLS");
    ret = MTP_ENOMEM;
    goto fail;
  }
  mbedtls_ssl_conf_rng(&c->ssl, mbedtls_ctr_drbg_random, &c->drbg);
  mbedtls_ssl_conf_authmode(&c->ssl, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_ca_chain(&c->ssl, &c->ca, NULL);
  mbedtls_ssl_conf_min_version(&c->ssl, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_max_version(&c->ssl, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_ciphersuites(&c->ssl, SUITES);
  mbedtls_ssl_conf_renegotiation(&c->ssl, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
#if defined(MBEDTLS_SSL_SESSION_TICKETS)
  if (o->role == MTP_TLS_CLIENT)
    mbedtls_ssl_conf_session_tickets(&c->ssl, MBEDTLS_SSL_SESSION_TICKETS_DISABLED);
#endif
  rc = mbedtls_ssl_conf_own_cert(&c->ssl, &c->cert, &c->key);
  if (rc != 0) {
    snprintf(err, errlen, "out of memory");
    ret = MTP_ENOMEM;
    goto fail;
  }
  if (o->peer_name != NULL) {
    c->peer_name = mtp_strdup(o->peer_name);
    if (c->peer_name == NULL) {
      snprintf(err, errlen, "out of memory");
      ret = MTP_ENOMEM;
      goto fail;
    }
  }
  *out = c;
  return MTP_OK;

fail:
  mtp_tls_conf_free(c);
  return ret;
}

void mtp_tls_conf_free(struct mtp_tls_conf *c) {
  if (c == NULL)
    return;
  mbedtls_ssl_config_free(&c->ssl);
  mbedtls_ctr_drbg_free(&c->drbg);
  mbedtls_entropy_free(&c->entropy);
  mbedtls_x509_crt_free(&c->cert);
  mbedtls_x509_crt_free(&c->ca);
  mbedtls_pk_free(&c->key);
  mtp_free(c->peer_name);
  mtp_free(c);
}

/* ---- closing ---- */

static void flush_out(struct mtp_tlsuv *t);

static void free_tlsuv(struct mtp_tlsuv *t) {
  mtp_free(t->tail);
  mbedtls_ssl_free(&t->ssl);
  mtp_free(t->in);
  mtp_free(t->plain);
  mtp_free(t->stage);
  mtp_free(t);
}

static void on_handle_closed(uv_handle_t *h) {
  struct mtp_tlsuv *t = h->data;
  if (--t->open_handles > 0)
    return;
  if (t->cbs->on_close != NULL)
    t->cbs->on_close(t, t->err, t->why);
  free_tlsuv(t);
}

static void close_handles(struct mtp_tlsuv *t) {
  if (t->handles_closing)
    return;
  t->handles_closing = true;
  t->open_handles = 3;
  uv_close((uv_handle_t *)&t->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&t->timer, on_handle_closed);
  uv_close((uv_handle_t *)&t->prep, on_handle_closed);
}

static void on_linger_timeout(uv_timer_t *tm) {
  struct mtp_tlsuv *t = tm->data;
  close_handles(t);
}

/* Seals the staged plaintext into records (ciphertext lands in the tail chunk). */
static void seal(struct mtp_tlsuv *t, const uint8_t *p, size_t n);

static void seal_stage(struct mtp_tlsuv *t) {
  if (t->stage_len == 0)
    return;
  size_t n = t->stage_len;
  t->stage_len = 0;
  seal(t, t->stage, n);
}

void mtp_tlsuv_close(struct mtp_tlsuv *t, int err, const char *why, bool linger) {
  if (t == NULL || t->state == T_CLOSING)
    return;
  enum tls_state prev = t->state;
  t->state = T_CLOSING;
  t->err = err;
  snprintf(t->why, sizeof(t->why), "%s", why != NULL ? why : mtp_strerror(err));
  if (t->reading) {
    uv_read_stop((uv_stream_t *)&t->tcp);
    t->reading = false;
  }
  uv_timer_stop(&t->timer);
  uv_prepare_stop(&t->prep);
  t->flush_scheduled = false;
  if (linger && (prev == T_OPEN || prev == T_HANDSHAKE)) {
    if (prev == T_OPEN) {
      /* seal() checks the state only through bio_send's handles_closing; sealing is fine. */
      seal_stage(t);
      mbedtls_ssl_close_notify(&t->ssl);
    }
    flush_out(t);
    if (t->queued_ct > 0 && !t->handles_closing) {
      t->lingering = true;
      uv_timer_start(&t->timer, on_linger_timeout, MTP_TLSUV_LINGER_MS, 0);
      return;
    }
  }
  close_handles(t);
}

static void fail(struct mtp_tlsuv *t, int err, const char *why) { mtp_tlsuv_close(t, err, why, false); }

/* ---- the write side ---- */

static void on_written(uv_write_t *req, int status) {
  struct wchunk *c = req->data;
  struct mtp_tlsuv *t = c->t;
  t->queued_ct -= c->len;
  mtp_free(c);
  if (status < 0 && t->state != T_CLOSING) {
    char why[96];
    snprintf(why, sizeof(why), "write: %s", uv_strerror(status));
    fail(t, status, why);
    return;
  }
  if (t->lingering && t->queued_ct == 0) {
    close_handles(t);
    return;
  }
  if (t->state == T_OPEN && t->want_writable && mtp_tlsuv_queued(t) <= MTP_TLSUV_LOW_WATER) {
    t->want_writable = false;
    if (t->cbs->on_writable != NULL)
      t->cbs->on_writable(t);
  }
}

/* Hands c to uv_write. */
static void submit(struct mtp_tlsuv *t, struct wchunk *c) {
  if (t->tail == c)
    t->tail = NULL;
  if (t->handles_closing) {
    t->queued_ct -= c->len;
    mtp_free(c);
    return;
  }
  c->submitted = true;
  c->req.data = c;
  uv_buf_t b = uv_buf_init((char *)c->data, (unsigned)c->len);
  int rc = uv_write(&c->req, (uv_stream_t *)&t->tcp, &b, 1, on_written);
  if (rc < 0) {
    t->queued_ct -= c->len;
    mtp_free(c);
    char why[96];
    snprintf(why, sizeof(why), "write: %s", uv_strerror(rc));
    fail(t, rc, why);
  }
}

static void flush_out(struct mtp_tlsuv *t) {
  if (t->tail != NULL && t->tail->len > 0)
    submit(t, t->tail);
}

/* mbedTLS's send callback: takes every byte (the owner bounds the queue). */
static int bio_send(void *ctx, const unsigned char *buf, size_t len) {
  struct mtp_tlsuv *t = ctx;
  if (t->handles_closing)
    return (int)len; /* nobody will read it any more */
  size_t done = 0;
  while (done < len) {
    struct wchunk *c = t->tail;
    if (c == NULL) {
      size_t cap = MTP_TLSUV_CHUNK;
      c = mtp_malloc(sizeof(*c) + cap);
      if (c == NULL)
        return MBEDTLS_ERR_SSL_ALLOC_FAILED;
      c->t = t;
      c->len = 0;
      c->cap = cap;
      c->submitted = false;
      t->tail = c;
    }
    size_t n = c->cap - c->len;
    if (n > len - done)
      n = len - done;
    memcpy(c->data + c->len, buf + done, n);
    c->len += n;
    t->queued_ct += n;
    done += n;
    if (c->len == c->cap)
      submit(t, c);
    if (t->handles_closing)
      break;
  }
  if (mtp_tlsuv_queued(t) >= MTP_TLSUV_HIGH_WATER)
    t->want_writable = true; /* whoever sees mtp_tlsuv_is_congested() gets on_writable */
  return (int)len;
}

static void seal(struct mtp_tlsuv *t, const uint8_t *p, size_t n) {
  while (n > 0 && !t->handles_closing) {
    int rc = mbedtls_ssl_write(&t->ssl, p, n);
    if (rc <= 0) {
      if (rc == MBEDTLS_ERR_SSL_WANT_WRITE || rc == MBEDTLS_ERR_SSL_WANT_READ)
        continue; /* not with our callbacks; keep the contract anyway */
      char e[128], why[160];
      tls_errstr(rc, e, sizeof(e));
      snprintf(why, sizeof(why), "TLS write: %s", e);
      fail(t, rc == MBEDTLS_ERR_SSL_ALLOC_FAILED ? MTP_ENOMEM : MTP_EIO, why);
      return;
    }
    p += rc;
    n -= (size_t)rc;
  }
}

static void on_prepare(uv_prepare_t *p);

static void note_queue(struct mtp_tlsuv *t) {
  if (mtp_tlsuv_queued(t) >= MTP_TLSUV_HIGH_WATER)
    t->want_writable = true;
}

void mtp_tlsuv_schedule_flush(struct mtp_tlsuv *t) {
  if (t->flush_scheduled || t->state != T_OPEN)
    return;
  t->flush_scheduled = true;
  uv_prepare_start(&t->prep, on_prepare);
}

int mtp_tlsuv_write(struct mtp_tlsuv *t, const void *data, size_t len) {
  if (t->state != T_OPEN)
    return MTP_ECLOSED;
  const uint8_t *p = data;
  if (t->stage_len + len > MTP_TLSUV_RECORD) {
    size_t fill = MTP_TLSUV_RECORD - t->stage_len;
    memcpy(t->stage + t->stage_len, p, fill);
    t->stage_len = MTP_TLSUV_RECORD;
    p += fill;
    len -= fill;
    seal_stage(t);
    while (len >= MTP_TLSUV_RECORD && t->state == T_OPEN) {
      seal(t, p, MTP_TLSUV_RECORD);
      p += MTP_TLSUV_RECORD;
      len -= MTP_TLSUV_RECORD;
    }
    if (t->state != T_OPEN)
      return MTP_ECLOSED;
  }
  memcpy(t->stage + t->stage_len, p, len);
  t->stage_len += len;
  note_queue(t);
  mtp_tlsuv_schedule_flush(t);
  return MTP_OK;
}

uint8_t *mtp_tlsuv_reserve(struct mtp_tlsuv *t, size_t n) {
  if (t->state != T_OPEN || n > MTP_TLSUV_RECORD)
    return NULL;
  if (t->stage_len + n > MTP_TLSUV_RECORD) {
    seal_stage(t);
    if (t->state != T_OPEN)
      return NULL;
  }
  t->reserved = n;
  return t->stage + t->stage_len;
}

void mtp_tlsuv_commit(struct mtp_tlsuv *t, size_t n) {
  if (t->state != T_OPEN || n > t->reserved)
    return;
  t->reserved = 0;
  t->stage_len += n;
  note_queue(t);
  mtp_tlsuv_schedule_flush(t);
}

size_t mtp_tlsuv_queued(const struct mtp_tlsuv *t) { return t->stage_len + t->queued_ct; }

bool mtp_tlsuv_is_congested(const struct mtp_tlsuv *t) { return mtp_tlsuv_queued(t) >= MTP_TLSUV_HIGH_WATER; }

static void on_prepare(uv_prepare_t *p) {
  struct mtp_tlsuv *t = p->data;
  uv_prepare_stop(p);
  if (t->state != T_OPEN) {
    t->flush_scheduled = false;
    return;
  }
  /* flush_scheduled stays true during on_flush so its writes do not re-arm the handle. */
  if (t->cbs->on_flush != NULL)
    t->cbs->on_flush(t);
  t->flush_scheduled = false;
  if (t->state != T_OPEN)
    return;
  seal_stage(t);
  if (t->state == T_OPEN)
    flush_out(t);
}

/* ---- the read side ---- */

static int bio_recv(void *ctx, unsigned char *buf, size_t len) {
  struct mtp_tlsuv *t = ctx;
  size_t avail = t->in_len - t->in_off;
  if (avail == 0)
    return MBEDTLS_ERR_SSL_WANT_READ;
  if (len > avail)
    len = avail;
  memcpy(buf, t->in + t->in_off, len);
  t->in_off += len;
  if (t->in_off == t->in_len)
    t->in_off = t->in_len = 0;
  return (int)len;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct mtp_tlsuv *t = h->data;
  (void)suggested;
  if (t->in_off > 0) {
    memmove(t->in, t->in + t->in_off, t->in_len - t->in_off);
    t->in_len -= t->in_off;
    t->in_off = 0;
  }
  *buf = uv_buf_init((char *)t->in + t->in_len, (unsigned)(MTP_TLSUV_IN_CAP - t->in_len));
}

static void copy_printable(char *out, size_t cap, const unsigned char *p, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n && k + 1 < cap; i++)
    out[k++] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
  out[k] = '\0';
}

static void handshake_failed(struct mtp_tlsuv *t, int rc) {
  char e[96], info[160] = "";
  tls_errstr(rc, e, sizeof(e));
  uint32_t flags = mbedtls_ssl_get_verify_result(&t->ssl);
  if (rc == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED && flags != 0 && flags != (uint32_t)-1) {
    char raw[256];
    int n = mbedtls_x509_crt_verify_info(raw, sizeof(raw), "", flags);
    size_t k = 0;
    for (int i = 0; i < n && raw[i] != '\0' && k + 3 < sizeof(info); i++) {
      if (raw[i] == '\n') {
        if (raw[i + 1] != '\0') {
          info[k++] = ';';
          info[k++] = ' ';
        }
      } else {
        info[k++] = raw[i];
      }
    }
    info[k] = '\0';
  }
  char why[sizeof(t->why)];
  snprintf(why, sizeof(why), "TLS handshake failed: %s%s%s%s", e, info[0] ? " (" : "", info, info[0] ? ")" : "");
  /* Linger so the alert mbedTLS queued tells the peer why. */
  mtp_tlsuv_close(t, MTP_EHANDSHAKE, why, true);
}

static void handshake_done(struct mtp_tlsuv *t) {
  /* VERIFY_REQUIRED makes mbedTLS fail the handshake on any verification problem; this is a
   * second lock on the same door. */
  const mbedtls_x509_crt *peer = mbedtls_ssl_get_peer_cert(&t->ssl);
  if (peer == NULL || mbedtls_ssl_get_verify_result(&t->ssl) != 0) {
    fail(t, MTP_EHANDSHAKE, "TLS handshake: the peer's certificate was not verified");
    return;
  }
  t->cn[0] = '\0';
  for (const mbedtls_x509_name *n = &peer->subject; n != NULL; n = n->next) {
    if (MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) == 0) {
      copy_printable(t->cn, sizeof(t->cn), n->val.p, n->val.len);
      break;
    }
  }
  snprintf(t->suite, sizeof(t->suite), "%s", mbedtls_ssl_get_ciphersuite(&t->ssl));
  t->state = T_OPEN;
  uv_timer_stop(&t->timer);
  if (t->cbs->on_open != NULL)
    t->cbs->on_open(t);
}

static void drive(struct mtp_tlsuv *t) {
  if (t->state == T_HANDSHAKE) {
    int rc = mbedtls_ssl_handshake(&t->ssl);
    flush_out(t);
    if (t->state != T_HANDSHAKE)
      return;
    if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
      return;
    if (rc != 0) {
      handshake_failed(t, rc);
      return;
    }
    handshake_done(t);
  }
  while (t->state == T_OPEN) {
    int rc = mbedtls_ssl_read(&t->ssl, t->plain, MTP_TLSUV_RECORD);
    if (rc > 0) {
      t->cbs->on_data(t, t->plain, (size_t)rc);
      continue;
    }
    if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
      break;
    if (rc == 0 || rc == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) {
      fail(t, MTP_ECLOSED, "the peer closed the TLS connection");
      return;
    }
    char e[128], why[160];
    tls_errstr(rc, e, sizeof(e));
    snprintf(why, sizeof(why), "TLS read: %s", e);
    fail(t, MTP_EPROTO, why);
    return;
  }
  if (t->state == T_OPEN && t->tail != NULL && t->tail->len > 0)
    mtp_tlsuv_schedule_flush(t); /* e.g. an alert mbedTLS answered with */
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct mtp_tlsuv *t = s->data;
  (void)buf;
  if (t->state == T_CLOSING || nread == 0)
    return;
  if (nread < 0) {
    if (nread == UV_EOF) {
      fail(t, MTP_ECLOSED, t->state == T_OPEN ? "the peer closed the connection"
                                              : "the peer closed the connection during the TLS handshake");
    } else {
      char why[96];
      snprintf(why, sizeof(why), "read: %s", uv_strerror((int)nread));
      fail(t, (int)nread, why);
    }
    return;
  }
  t->in_len += (size_t)nread;
  drive(t);
}

static void on_handshake_timeout(uv_timer_t *tm) {
  struct mtp_tlsuv *t = tm->data;
  if (t->state == T_CONNECTING || t->state == T_HANDSHAKE)
    fail(t, MTP_ETIMEDOUT, t->state == T_CONNECTING ? "connect timeout" : "TLS handshake timeout");
}

static void on_tick(uv_timer_t *tm) {
  struct mtp_tlsuv *t = tm->data;
  if (t->state == T_OPEN && t->cbs->on_tick != NULL)
    t->cbs->on_tick(t);
}

void mtp_tlsuv_set_tick(struct mtp_tlsuv *t, uint64_t ms) {
  if (t->state != T_OPEN)
    return;
  t->tick_ms = ms;
  uv_timer_stop(&t->timer);
  if (ms > 0)
    uv_timer_start(&t->timer, on_tick, ms, ms);
}

static void start_handshake(struct mtp_tlsuv *t) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  if (uv_tcp_getpeername(&t->tcp, (struct sockaddr *)&ss, &len) == 0)
    mtp_format_addr(&ss, t->peer, sizeof(t->peer));
  uv_tcp_nodelay(&t->tcp, 1);
  t->state = T_HANDSHAKE;
  int rc = uv_read_start((uv_stream_t *)&t->tcp, on_alloc, on_read);
  if (rc < 0) {
    char why[96];
    snprintf(why, sizeof(why), "read start: %s", uv_strerror(rc));
    fail(t, rc, why);
    return;
  }
  t->reading = true;
  drive(t); /* the client's ClientHello */
}

static void on_connect(uv_connect_t *req, int status) {
  struct mtp_tlsuv *t = req->data;
  if (t->state != T_CONNECTING)
    return; /* closed meanwhile (UV_ECANCELED) */
  if (status < 0) {
    char why[96];
    snprintf(why, sizeof(why), "connect: %s", uv_strerror(status));
    fail(t, status, why);
    return;
  }
  start_handshake(t);
}

/* ---- creation ---- */

static struct mtp_tlsuv *tlsuv_new(struct mtp_tls_conf *conf, uv_loop_t *loop, const struct mtp_tlsuv_cbs *cbs,
                                   void *data) {
  struct mtp_tlsuv *t = mtp_calloc(1, sizeof(*t));
  if (t == NULL)
    return NULL;
  mbedtls_ssl_init(&t->ssl);
  t->in = mtp_malloc(MTP_TLSUV_IN_CAP);
  t->plain = mtp_malloc(MTP_TLSUV_RECORD);
  t->stage = mtp_malloc(MTP_TLSUV_RECORD);
  if (t->in == NULL || t->plain == NULL || t->stage == NULL || mbedtls_ssl_setup(&t->ssl, &conf->ssl) != 0) {
    free_tlsuv(t);
    return NULL;
  }
  if (conf->role == MTP_TLS_CLIENT && conf->peer_name != NULL &&
      mbedtls_ssl_set_hostname(&t->ssl, conf->peer_name) != 0) {
    free_tlsuv(t);
    return NULL;
  }
  mbedtls_ssl_set_bio(&t->ssl, t, bio_send, bio_recv, NULL);
  t->conf = conf;
  t->cbs = cbs;
  t->data = data;
  snprintf(t->peer, sizeof(t->peer), "?");
  uv_tcp_init(loop, &t->tcp);
  uv_timer_init(loop, &t->timer);
  uv_prepare_init(loop, &t->prep);
  t->tcp.data = t;
  t->timer.data = t;
  t->prep.data = t;
  t->creq.data = t;
  uv_timer_start(&t->timer, on_handshake_timeout, conf->hs_timeout_ms, 0);
  return t;
}

int mtp_tlsuv_connect(struct mtp_tlsuv **out, struct mtp_tls_conf *conf, uv_loop_t *loop,
                      const struct sockaddr *addr, const struct mtp_tlsuv_cbs *cbs, void *data) {
  *out = NULL;
  struct mtp_tlsuv *t = tlsuv_new(conf, loop, cbs, data);
  if (t == NULL)
    return MTP_ENOMEM;
  t->state = T_CONNECTING;
  if (addr->sa_family == AF_INET || addr->sa_family == AF_INET6) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    memcpy(&ss, addr, addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    mtp_format_addr(&ss, t->peer, sizeof(t->peer));
  }
  int rc = uv_tcp_connect(&t->creq, &t->tcp, addr, on_connect);
  if (rc < 0) {
    char why[96];
    snprintf(why, sizeof(why), "connect: %s", uv_strerror(rc));
    fail(t, rc, why); /* on_close follows from the loop */
  }
  *out = t;
  return MTP_OK;
}

int mtp_tlsuv_accept(struct mtp_tlsuv **out, struct mtp_tls_conf *conf, uv_stream_t *server,
                     const struct mtp_tlsuv_cbs *cbs, void *data) {
  *out = NULL;
  struct mtp_tlsuv *t = tlsuv_new(conf, server->loop, cbs, data);
  if (t == NULL)
    return MTP_ENOMEM;
  int rc = uv_accept(server, (uv_stream_t *)&t->tcp);
  if (rc < 0) {
    char why[96];
    snprintf(why, sizeof(why), "accept: %s", uv_strerror(rc));
    fail(t, rc, why);
  } else {
    start_handshake(t);
  }
  *out = t;
  return MTP_OK;
}

/* ---- accessors ---- */

void *mtp_tlsuv_data(const struct mtp_tlsuv *t) { return t->data; }
bool mtp_tlsuv_is_open(const struct mtp_tlsuv *t) { return t->state == T_OPEN; }
const char *mtp_tlsuv_peer_addr(const struct mtp_tlsuv *t) { return t->peer; }
const char *mtp_tlsuv_peer_cn(const struct mtp_tlsuv *t) { return t->cn; }
const char *mtp_tlsuv_suite(const struct mtp_tlsuv *t) { return t->suite; }
