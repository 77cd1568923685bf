/*
 * back.c - the process part of the back: Telegram's proxy secret and middle-proxy list.
 *
 * Lives on the main loop. At setup the cache (if any) is read once, synchronously, so workers
 * can serve before the first download; then a fetch job runs on the libuv threadpool
 * (uv_queue_work: download or read, validate, parse, write the cache) and its result is
 * published on the main loop in after_work. A one-shot timer schedules the next fetch:
 * cfg->config_refresh seconds after a success, sooner after a failure. A part that fails
 * (secret or list) keeps its last good value; a snapshot is only ever built from good parts.
 *
 * Snapshot publishing: b->cur is guarded by b->mu; readers take a reference under the lock
 * (mtp_back_snapshot), so a replaced snapshot lives until its last reader releases it.
 */
#include "back.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "tgconf.h"

#include "banned.h"

/* Retry delay after a failed fetch: short while nothing is loaded, longer otherwise (both
 * capped by config_refresh). */
#define RETRY_NO_CONFIG_MS 5000u
#define RETRY_HAVE_CONFIG_MS 300000u

struct fetch_job {
  uv_work_t req;
  struct mtp_back *b;
  /* results (filled on the threadpool) */
  uint8_t *secret; /* owns: the new raw secret when secret_ok */
  size_t secret_len;
  bool secret_ok;
  char secret_err[256];
  uint8_t *conf; /* owns: the new raw config when conf_ok */
  size_t conf_len;
  bool conf_ok;
  char conf_err[256];
  struct mtp_tg_snapshot *snap; /* owns: built from the good parts, or NULL */
  char build_err[256];
  char cache_err[256];
};

struct mtp_back {
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;              /* borrows: the main loop */
  uv_timer_t refresh;
  bool timer_open;
  pthread_mutex_t mu;
  struct mtp_tg_snapshot *cur; /* owns one reference; guarded by mu */
  /* last good raw parts (main loop only; borrowed read-only by the running job) */
  uint8_t *raw_secret;
  size_t raw_secret_len;
  uint8_t *raw_conf;
  size_t raw_conf_len;
  struct fetch_job *job; /* the running fetch, or NULL */
  atomic_bool cancel;    /* set by stop: aborts downloads */
  bool stopping;
  unsigned fetches_done;
};

static void publish(struct mtp_back *b, struct mtp_tg_snapshot *s) {
  pthread_mutex_lock(&b->mu);
  struct mtp_tg_snapshot *old = b->cur;
  b->cur = s;
  pthread_mutex_unlock(&b->mu);
  mtp_tg_snapshot_release(old);
}

struct mtp_tg_snapshot *mtp_back_snapshot(struct mtp_back *b) {
  pthread_mutex_lock(&b->mu);
  struct mtp_tg_snapshot *s = b->cur;
  if (s != NULL)
    atomic_fetch_add(&s->_refs, 1);
  pthread_mutex_unlock(&b->mu);
  return s;
}

static bool has_snapshot(struct mtp_back *b) {
  pthread_mutex_lock(&b->mu);
  bool r = b->cur != NULL;
  pthread_mutex_unlock(&b->mu);
  return r;
}

static void log_snapshot(const struct mtp_tg_snapshot *s, const char *from) {
  int ndc = 0;
  /* count distinct DCs (the list is small) */
  for (size_t i = 0; i < s->cfg.naddrs; i++) {
    bool seen = false;
    for (size_t j = 0; j < i && !seen; j++)
      seen = s->cfg.addrs[j].dc == s->cfg.addrs[i].dc;
    ndc += !seen;
  }
  if (s->cfg.has_default)
    mtp_log(MTP_LOG_INFO, "Telegram config loaded from %s: %zu middle proxies for %d DCs, default DC %d, secret %zu bytes",
            from, s->cfg.naddrs, ndc, s->cfg.default_dc, s->secret_len);
  else
    mtp_log(MTP_LOG_INFO, "Telegram config loaded from %s: %zu middle proxies for %d DCs, no default DC, secret %zu bytes",
            from, s->cfg.naddrs, ndc, s->secret_len);
}

/* ---- the fetch job ---- */

static void job_free(struct fetch_job *j) {
  if (j->secret != NULL)
    mtp_wipe(j->secret, j->secret_len);
  mtp_free(j->secret);
  j->secret = NULL;
  mtp_free(j->conf);
  j->conf = NULL;
  mtp_tg_snapshot_release(j->snap);
  j->snap = NULL;
  mtp_free(j);
}

/* Threadpool. Reads only b->cfg, b->raw_* (not modified while a job runs) and b->cancel. */
static void on_fetch_work(uv_work_t *req) {
  struct fetch_job *j = req->data;
  struct mtp_back *b = j->b;
  const struct mtp_config *cfg = b->cfg;

  int rc = mtp_tgconf_read_source(cfg->proxy_secret, &j->secret, &j->secret_len, &b->cancel, j->secret_err,
                                  sizeof(j->secret_err));
  if (rc == MTP_OK)
    rc = mtp_tgconf_check_secret(j->secret_len, j->secret_err, sizeof(j->secret_err));
  j->secret_ok = rc == MTP_OK;

  rc = mtp_tgconf_read_source(cfg->proxy_config, &j->conf, &j->conf_len, &b->cancel, j->conf_err,
                              sizeof(j->conf_err));
  if (rc == MTP_OK) {
    struct mtp_tgconfig tc;
    char perr[200] = "";
    rc = mtp_tgconfig_parse((const char *)j->conf, j->conf_len, &tc, perr, sizeof(perr));
    if (rc == MTP_OK)
      mtp_tgconfig_free(&tc);
    else
      snprintf(j->conf_err, sizeof(j->conf_err), "malformed: %s", perr[0] ? perr : mtp_strerror(rc));
  }
  j->conf_ok = rc == MTP_OK;

  if (!j->secret_ok && !j->conf_ok)
    return;
  const uint8_t *sec = j->secret_ok ? j->secret : b->raw_secret;
  size_t sec_len = j->secret_ok ? j->secret_len : b->raw_secret_len;
  const uint8_t *conf = j->conf_ok ? j->conf : b->raw_conf;
  size_t conf_len = j->conf_ok ? j->conf_len : b->raw_conf_len;
  if (sec != NULL && conf != NULL)
    (void)mtp_tgconf_build(sec, sec_len, conf, conf_len, &j->snap, j->build_err, sizeof(j->build_err));

  if (cfg->cache_dir != NULL) {
    if (j->secret_ok)
      (void)mtp_tgconf_cache_write(cfg->cache_dir, MTP_TGCONF_CACHE_SECRET, j->secret, j->secret_len, j->cache_err,
                                   sizeof(j->cache_err));
    if (j->conf_ok && j->cache_err[0] == 0)
      (void)mtp_tgconf_cache_write(cfg->cache_dir, MTP_TGCONF_CACHE_CONFIG, j->conf, j->conf_len, j->cache_err,
                                   sizeof(j->cache_err));
  }
}

static void on_refresh_timer(uv_timer_t *t);

static void schedule_next(struct mtp_back *b, bool ok) {
  if (b->stopping || !b->timer_open)
    return;
  double refresh = b->cfg->config_refresh > 0 ? b->cfg->config_refresh : 3600;
  uint64_t ms = (uint64_t)(refresh * 1000.0);
  if (ms == 0)
    ms = 1;
  if (!ok) {
    uint64_t retry = has_snapshot(b) ? RETRY_HAVE_CONFIG_MS : RETRY_NO_CONFIG_MS;
    if (retry < ms)
      ms = retry;
  }
  uv_timer_start(&b->refresh, on_refresh_timer, ms, 0);
}

static void on_fetch_done(uv_work_t *req, int status) {
  struct fetch_job *j = req->data;
  struct mtp_back *b = j->b;
  b->job = NULL;
  b->fetches_done++;
  if (status < 0 || b->stopping) {
    job_free(j);
    return;
  }
  const struct mtp_config *cfg = b->cfg;
  if (j->secret_ok) {
    MTP_COUNT(TGCONF_FETCH_OK);
    mtp_free(b->raw_secret);
    b->raw_secret = j->secret;
    b->raw_secret_len = j->secret_len;
    j->secret = NULL;
  } else {
    MTP_COUNT(TGCONF_FETCH_FAIL);
    mtp_log(MTP_LOG_WARN, "proxy secret from %s not loaded (keeping the last good one%s): %s", cfg->proxy_secret,
            b->raw_secret ? "" : ", none yet", j->secret_err);
  }
  if (j->conf_ok) {
    MTP_COUNT(TGCONF_FETCH_OK);
    mtp_free(b->raw_conf);
    b->raw_conf = j->conf;
    b->raw_conf_len = j->conf_len;
    j->conf = NULL;
  } else {
    MTP_COUNT(TGCONF_FETCH_FAIL);
    mtp_log(MTP_LOG_WARN, "proxy config from %s not loaded (keeping the last good one%s): %s", cfg->proxy_config,
            b->raw_conf ? "" : ", none yet", j->conf_err);
  }
  if (j->snap != NULL) {
    char from[64];
    snprintf(from, sizeof(from), "%s", j->secret_ok && j->conf_ok ? "sources" : "sources (partly)");
    log_snapshot(j->snap, from);
    publish(b, j->snap);
    j->snap = NULL;
  } else if (j->build_err[0]) {
    mtp_log(MTP_LOG_WARN, "Telegram config not updated: %s", j->build_err);
  }
  if (j->cache_err[0])
    mtp_log(MTP_LOG_WARN, "Telegram config cache in %s not written: %s", cfg->cache_dir, j->cache_err);
  schedule_next(b, j->secret_ok && j->conf_ok);
  job_free(j);
}

static void start_fetch(struct mtp_back *b) {
  if (b->stopping || b->job != NULL)
    return;
  struct fetch_job *j = mtp_calloc(1, sizeof(*j));
  if (j == NULL) {
    mtp_log(MTP_LOG_ERROR, "Telegram config fetch: out of memory");
    schedule_next(b, false);
    return;
  }
  j->b = b;
  j->req.data = j;
  int rc = uv_queue_work(b->loop, &j->req, on_fetch_work, on_fetch_done);
  if (rc < 0) {
    mtp_log(MTP_LOG_ERROR, "Telegram config fetch: cannot queue: %s", mtp_strerror(rc));
    mtp_free(j);
    schedule_next(b, false);
    return;
  }
  b->job = j;
}

static void on_refresh_timer(uv_timer_t *t) { start_fetch(t->data); }

void mtp_back_refresh_now(struct mtp_back *b) {
  if (b->timer_open)
    uv_timer_stop(&b->refresh);
  start_fetch(b);
}

unsigned mtp_back_fetches_done(const struct mtp_back *b) { return b->fetches_done; }

/* ---- cache at startup ---- */

static void load_cache(struct mtp_back *b) {
  const char *dir = b->cfg->cache_dir;
  uint8_t *sec = NULL, *conf = NULL;
  size_t sec_len = 0, conf_len = 0;
  char err[256] = "";
  if (mtp_tgconf_cache_read(dir, MTP_TGCONF_CACHE_SECRET, &sec, &sec_len, err, sizeof(err)) < 0 ||
      mtp_tgconf_cache_read(dir, MTP_TGCONF_CACHE_CONFIG, &conf, &conf_len, err, sizeof(err)) < 0) {
    mtp_log(MTP_LOG_INFO, "no usable Telegram config cache in %s: %s", dir, err);
    goto out;
  }
  struct mtp_tg_snapshot *s = NULL;
  if (mtp_tgconf_build(sec, sec_len, conf, conf_len, &s, err, sizeof(err)) < 0) {
    mtp_log(MTP_LOG_WARN, "Telegram config cache in %s ignored: %s", dir, err);
    goto out;
  }
  char from[96];
  snprintf(from, sizeof(from), "cache");
  log_snapshot(s, from);
  publish(b, s);
  b->raw_secret = sec;
  b->raw_secret_len = sec_len;
  b->raw_conf = conf;
  b->raw_conf_len = conf_len;
  sec = NULL;
  conf = NULL;
out:
  if (sec != NULL)
    mtp_wipe(sec, sec_len);
  mtp_free(sec);
  mtp_free(conf);
}

/* ---- lifecycle ---- */

int mtp_back_setup(struct mtp_back **out, const struct mtp_config *cfg, uv_loop_t *main_loop) {
  *out = NULL;
  if (cfg->proxy_secret == NULL || cfg->proxy_config == NULL) {
    mtp_log(MTP_LOG_ERROR, "back: proxy_secret and proxy_config must be set");
    return MTP_EINVAL;
  }
  struct mtp_back *b = mtp_calloc(1, sizeof(*b));
  if (b == NULL)
    return MTP_ENOMEM;
  b->cfg = cfg;
  b->loop = main_loop;
  atomic_init(&b->cancel, false);
  pthread_mutex_init(&b->mu, NULL);
  if (uv_timer_init(main_loop, &b->refresh) < 0) {
    pthread_mutex_destroy(&b->mu);
    mtp_free(b);
    return MTP_EIO;
  }
  b->refresh.data = b;
  b->timer_open = true;
  if (cfg->cache_dir != NULL)
    load_cache(b);
  start_fetch(b);
  *out = b;
  return MTP_OK;
}

static void on_wait_timer(uv_timer_t *t) { *(bool *)t->data = true; }
static void on_wait_closed(uv_handle_t *h) { *(bool *)h->data = true; }

int mtp_back_wait_ready(struct mtp_back *b, uint64_t timeout_ms) {
  if (has_snapshot(b))
    return MTP_OK;
  bool expired = false, closed = false;
  uv_timer_t t;
  uv_timer_init(b->loop, &t);
  t.data = &expired;
  uv_timer_start(&t, on_wait_timer, timeout_ms, 0);
  while (!expired && !has_snapshot(b))
    uv_run(b->loop, UV_RUN_ONCE);
  uv_timer_stop(&t);
  t.data = &closed;
  uv_close((uv_handle_t *)&t, on_wait_closed);
  for (int i = 0; i < 1000 && !closed; i++)
    uv_run(b->loop, UV_RUN_NOWAIT);
  if (has_snapshot(b))
    return MTP_OK;
  mtp_log(MTP_LOG_ERROR, "no Telegram config loaded after %llu ms (secret: %s, config: %s)",
          (unsigned long long)timeout_ms, b->cfg->proxy_secret, b->cfg->proxy_config);
  return MTP_ENOCONFIG;
}

static void on_refresh_closed(uv_handle_t *h) { (void)h; }

void mtp_back_stop(struct mtp_back *b) {
  if (b == NULL || b->stopping)
    return;
  b->stopping = true;
  atomic_store(&b->cancel, true);
  if (b->timer_open) {
    uv_timer_stop(&b->refresh);
    uv_close((uv_handle_t *)&b->refresh, on_refresh_closed);
    b->timer_open = false;
  }
  if (b->job != NULL)
    (void)uv_cancel((uv_req_t *)&b->job->req); /* fails when already running; after_work frees */
}

void mtp_back_free(struct mtp_back *b) {
  if (b == NULL)
    return;
  publish(b, NULL);
  if (b->raw_secret != NULL)
    mtp_wipe(b->raw_secret, b->raw_secret_len);
  mtp_free(b->raw_secret);
  mtp_free(b->raw_conf);
  pthread_mutex_destroy(&b->mu);
  mtp_free(b);
}

/* The worker part needs the config (same object as the back's). */
const struct mtp_config *mtp_back_config(const struct mtp_back *b) { return b->cfg; }
