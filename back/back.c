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
 * (mtp_back_snapshot), so a replaced snapshot lives until its last reader releases it. What the
 * status page says about cur (where its parts came from, when, the fetch history) is guarded
 * by the same lock.
 *
 * Per-DC numbers: every worker gets a block of atomics from the back (mtp_back_dcstats_new);
 * it adds to its own block only, and a scrape sums the blocks (mtp_back_metrics_text,
 * mtp_back_status_json). The list of blocks has its own lock, taken at worker setup and scrape.
 */
#include "back.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "back_int.h"
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

/* Where one part (secret or list) came from. */
enum origin_kind {
  ORIGIN_NONE,  /* nothing loaded */
  ORIGIN_URL,   /* downloaded */
  ORIGIN_FILE,  /* read from a configured file */
  ORIGIN_CACHE, /* read from cache_dir at startup */
};

struct origin {
  enum origin_kind kind;
  char where[256]; /* the URL (mtp_tgconf_redact_source) or path */
  int64_t at;      /* unix time the data was taken from there; for the cache, the file's mtime */
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
  struct origin raw_secret_from, raw_conf_from; /* of raw_secret / raw_conf */
  struct fetch_job *job; /* the running fetch, or NULL */
  atomic_bool cancel;    /* set by stop: aborts downloads */
  bool stopping;
  unsigned fetches_done;
  /* about cur and the fetches (guarded by mu) */
  struct origin cur_secret_from, cur_conf_from;
  int64_t cur_loaded_at;   /* unix time cur was published; 0 = none */
  int64_t last_ok_at;      /* unix time of the last fetch that loaded both parts; 0 = never */
  char last_error[512];    /* why the latest fetch failed (some part); "" = it did not */
  uint64_t fetches_ok, fetches_failed;
  /* per-worker DC numbers (list guarded by stats_mu; the blocks are atomics) */
  pthread_mutex_t stats_mu;
  struct mtp_back_dcstats *stats; /* owns */
};

static void publish_from(struct mtp_back *b, struct mtp_tg_snapshot *s, const struct origin *secret_from,
                         const struct origin *conf_from) {
  pthread_mutex_lock(&b->mu);
  struct mtp_tg_snapshot *old = b->cur;
  b->cur = s;
  if (s != NULL) {
    b->cur_secret_from = *secret_from;
    b->cur_conf_from = *conf_from;
    b->cur_loaded_at = (int64_t)time(NULL);
  }
  pthread_mutex_unlock(&b->mu);
  mtp_tg_snapshot_release(old);
}

static void publish(struct mtp_back *b, struct mtp_tg_snapshot *s) {
  publish_from(b, s, &b->raw_secret_from, &b->raw_conf_from);
}

static void origin_set(struct origin *o, enum origin_kind kind, const char *where, int64_t at) {
  o->kind = kind;
  mtp_tgconf_redact_source(where, o->where, sizeof(o->where));
  o->at = at;
}

static void origin_of_source(struct origin *o, const char *src) {
  origin_set(o, mtp_tgconf_is_url(src) ? ORIGIN_URL : ORIGIN_FILE, src, (int64_t)time(NULL));
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

/* The fetch history for the status page (after the parts were taken). */
static void record_fetch(struct mtp_back *b, const struct fetch_job *j) {
  char err[sizeof(b->last_error)] = "";
  if (!j->secret_ok)
    snprintf(err, sizeof(err), "proxy secret: %s", j->secret_err);
  if (!j->conf_ok) {
    size_t n = strlen(err);
    snprintf(err + n, sizeof(err) - n, "%sproxy config: %s", n ? "; " : "", j->conf_err);
  }
  if (err[0] == 0 && j->snap == NULL && j->build_err[0])
    snprintf(err, sizeof(err), "not updated: %s", j->build_err);
  pthread_mutex_lock(&b->mu);
  snprintf(b->last_error, sizeof(b->last_error), "%s", err);
  if (err[0] == 0) {
    b->fetches_ok++;
    b->last_ok_at = (int64_t)time(NULL);
  } else {
    b->fetches_failed++;
  }
  pthread_mutex_unlock(&b->mu);
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
    if (b->raw_secret != NULL)
      mtp_wipe(b->raw_secret, b->raw_secret_len);
    mtp_free(b->raw_secret);
    b->raw_secret = j->secret;
    b->raw_secret_len = j->secret_len;
    j->secret = NULL;
    origin_of_source(&b->raw_secret_from, cfg->proxy_secret);
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
    origin_of_source(&b->raw_conf_from, cfg->proxy_config);
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
  record_fetch(b, j);
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
  int64_t secret_at = 0, conf_at = 0; /* unknown: count from now */
  if (mtp_tgconf_cache_mtime(dir, MTP_TGCONF_CACHE_SECRET, &secret_at) < 0)
    secret_at = (int64_t)time(NULL);
  if (mtp_tgconf_cache_mtime(dir, MTP_TGCONF_CACHE_CONFIG, &conf_at) < 0)
    conf_at = (int64_t)time(NULL);
  char path[4096];
  snprintf(path, sizeof(path), "%s/%s", dir, MTP_TGCONF_CACHE_SECRET);
  origin_set(&b->raw_secret_from, ORIGIN_CACHE, path, secret_at);
  snprintf(path, sizeof(path), "%s/%s", dir, MTP_TGCONF_CACHE_CONFIG);
  origin_set(&b->raw_conf_from, ORIGIN_CACHE, path, conf_at);
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
  pthread_mutex_init(&b->stats_mu, NULL);
  if (uv_timer_init(main_loop, &b->refresh) < 0) {
    pthread_mutex_destroy(&b->mu);
    pthread_mutex_destroy(&b->stats_mu);
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
  while (!expired && !b->stopping && !has_snapshot(b))
    uv_run(b->loop, UV_RUN_ONCE);
  uv_timer_stop(&t);
  t.data = &closed;
  uv_close((uv_handle_t *)&t, on_wait_closed);
  for (int i = 0; i < 1000 && !closed; i++)
    uv_run(b->loop, UV_RUN_NOWAIT);
  if (has_snapshot(b))
    return MTP_OK;
  if (b->stopping)
    return MTP_ENOCONFIG; /* stopped while waiting: nothing to report */
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
  struct mtp_back_dcstats *st = b->stats;
  while (st != NULL) {
    struct mtp_back_dcstats *n = st->_next;
    mtp_free(st);
    st = n;
  }
  b->stats = NULL;
  pthread_mutex_destroy(&b->stats_mu);
  pthread_mutex_destroy(&b->mu);
  mtp_free(b);
}

/* The worker part needs the config (same object as the back's). */
const struct mtp_config *mtp_back_config(const struct mtp_back *b) { return b->cfg; }

/* ---- per-DC numbers, status and metrics ---- */

struct mtp_back_dcstats *mtp_back_dcstats_new(struct mtp_back *b) {
  struct mtp_back_dcstats *st = mtp_calloc(1, sizeof(*st));
  if (st == NULL)
    return NULL;
  pthread_mutex_lock(&b->stats_mu);
  st->_next = b->stats;
  b->stats = st;
  pthread_mutex_unlock(&b->stats_mu);
  return st;
}

/* The DC slots summed over the workers, with the current config's address counts. */
struct dc_sums {
  int64_t conns[MTP_BACK_DC_SLOTS], clients[MTP_BACK_DC_SLOTS];
  int64_t growth[MTP_BACK_DC_SLOTS], rotations[MTP_BACK_DC_SLOTS];
  size_t addrs[MTP_BACK_DC_SLOTS];
  bool shown[MTP_BACK_DC_SLOTS]; /* a worker had a pool for it, or the config lists it */
};

static int64_t load_relaxed(_Atomic int64_t *v) { return atomic_load_explicit(v, memory_order_relaxed); }

/* Fills out; snap (borrowed, may be NULL) gives the address counts. */
static void sum_dcs(struct mtp_back *b, const struct mtp_tg_snapshot *snap, struct dc_sums *out) {
  memset(out, 0, sizeof(*out));
  pthread_mutex_lock(&b->stats_mu);
  for (struct mtp_back_dcstats *st = b->stats; st != NULL; st = st->_next) {
    for (int i = 0; i < MTP_BACK_DC_SLOTS; i++) {
      out->conns[i] += load_relaxed(&st->conns[i]);
      out->clients[i] += load_relaxed(&st->clients[i]);
      out->growth[i] += load_relaxed(&st->growth[i]);
      out->rotations[i] += load_relaxed(&st->rotations[i]);
      out->shown[i] |= load_relaxed(&st->used[i]) != 0;
    }
  }
  pthread_mutex_unlock(&b->stats_mu);
  for (size_t i = 0; snap != NULL && i < snap->cfg.naddrs; i++)
    out->addrs[mtp_back_dc_slot(snap->cfg.addrs[i].dc)]++;
  for (int i = 0; i < MTP_BACK_DC_SLOTS; i++)
    out->shown[i] |= out->addrs[i] > 0 || out->conns[i] != 0 || out->clients[i] != 0;
}

static void dc_label(int slot, char *out, size_t n) {
  if (slot == MTP_BACK_DC_OTHER)
    snprintf(out, n, "other");
  else
    snprintf(out, n, "%d", slot - 5);
}

/* What the status page and the age metric say about cur (copied under the lock). */
struct cur_info {
  struct origin secret_from, conf_from;
  int64_t loaded_at, last_ok_at;
  char last_error[512];
  uint64_t fetches_ok, fetches_failed;
};

/* Copies the info and takes a reference on cur (NULL while none), both under the lock so they
 * agree. */
static struct mtp_tg_snapshot *get_cur_info(struct mtp_back *b, struct cur_info *ci) {
  pthread_mutex_lock(&b->mu);
  struct mtp_tg_snapshot *s = b->cur;
  if (s != NULL)
    atomic_fetch_add(&s->_refs, 1);
  ci->secret_from = b->cur_secret_from;
  ci->conf_from = b->cur_conf_from;
  ci->loaded_at = b->cur_loaded_at;
  ci->last_ok_at = b->last_ok_at;
  snprintf(ci->last_error, sizeof(ci->last_error), "%s", b->last_error);
  ci->fetches_ok = b->fetches_ok;
  ci->fetches_failed = b->fetches_failed;
  pthread_mutex_unlock(&b->mu);
  return s;
}

/* Seconds since the older part of cur was taken from its source (never negative). */
static int64_t cur_age(const struct cur_info *ci, int64_t now) {
  int64_t at = ci->secret_from.at < ci->conf_from.at ? ci->secret_from.at : ci->conf_from.at;
  return now > at ? now - at : 0;
}

static const char *origin_kind_str(enum origin_kind k) {
  switch (k) {
  case ORIGIN_NONE:
    return NULL;
  case ORIGIN_URL:
    return "url";
  case ORIGIN_FILE:
    return "file";
  case ORIGIN_CACHE:
    return "cache";
  }
  return NULL;
}

static void add_string_or_null(cJSON *o, const char *name, const char *v) {
  if (v != NULL && v[0] != 0)
    cJSON_AddStringToObject(o, name, v);
  else
    cJSON_AddNullToObject(o, name);
}

static void add_time_or_null(cJSON *o, const char *name, int64_t v) {
  if (v != 0)
    cJSON_AddNumberToObject(o, name, (double)v);
  else
    cJSON_AddNullToObject(o, name);
}

void mtp_back_status_json(struct mtp_back *b, struct cJSON *status) {
  cJSON *t = cJSON_AddObjectToObject(status, "telegram");
  if (t == NULL)
    return;
  struct cur_info ci;
  struct mtp_tg_snapshot *snap = get_cur_info(b, &ci);
  int64_t now = (int64_t)time(NULL);
  cJSON_AddBoolToObject(t, "config_loaded", snap != NULL);
  if (snap != NULL) {
    add_string_or_null(t, "source", origin_kind_str(ci.conf_from.kind));
    add_string_or_null(t, "location", ci.conf_from.where);
    add_string_or_null(t, "secret_source", origin_kind_str(ci.secret_from.kind));
    add_time_or_null(t, "loaded_at", ci.loaded_at);
    cJSON_AddNumberToObject(t, "age_s", (double)cur_age(&ci, now));
  } else {
    static const char *const nulls[] = {"source", "location", "secret_source", "loaded_at", "age_s"};
    for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++)
      cJSON_AddNullToObject(t, nulls[i]);
  }
  add_time_or_null(t, "last_fetch_ok", ci.last_ok_at);
  add_string_or_null(t, "last_fetch_error", ci.last_error);
  cJSON_AddNumberToObject(t, "fetches_ok", (double)ci.fetches_ok);
  cJSON_AddNumberToObject(t, "fetches_failed", (double)ci.fetches_failed);
  if (snap != NULL) {
    cJSON_AddNumberToObject(t, "middle_proxies", (double)snap->cfg.naddrs);
    if (snap->cfg.has_default)
      cJSON_AddNumberToObject(t, "default_dc", snap->cfg.default_dc);
    else
      cJSON_AddNullToObject(t, "default_dc");
  }
  struct dc_sums d;
  sum_dcs(b, snap, &d);
  mtp_tg_snapshot_release(snap);
  cJSON *dcs = cJSON_AddArrayToObject(t, "dcs");
  for (int i = 0; dcs != NULL && i < MTP_BACK_DC_SLOTS; i++) {
    if (!d.shown[i])
      continue;
    cJSON *o = cJSON_CreateObject();
    if (o == NULL || !cJSON_AddItemToArray(dcs, o)) {
      cJSON_Delete(o);
      break;
    }
    if (i == MTP_BACK_DC_OTHER)
      cJSON_AddStringToObject(o, "dc", "other");
    else
      cJSON_AddNumberToObject(o, "dc", i - 5);
    cJSON_AddNumberToObject(o, "addrs", (double)d.addrs[i]);
    cJSON_AddNumberToObject(o, "connections", (double)d.conns[i]);
    cJSON_AddNumberToObject(o, "clients", (double)d.clients[i]);
  }
}

/* A growing text buffer; `failed` once an allocation failed (then nothing more is added). */
struct text {
  char *s; /* owns */
  size_t len, cap;
  bool failed;
};

__attribute__((format(printf, 2, 3))) static void text_add(struct text *t, const char *fmt, ...) {
  for (int round = 0; round < 2 && !t->failed; round++) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->s + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      t->failed = true;
      return;
    }
    if ((size_t)n < t->cap - t->len) {
      t->len += (size_t)n;
      return;
    }
    size_t cap = t->cap * 2 > t->len + (size_t)n + 1 ? t->cap * 2 : t->len + (size_t)n + 1;
    char *p = mtp_realloc(t->s, cap);
    if (p == NULL) {
      t->failed = true;
      return;
    }
    t->s = p;
    t->cap = cap;
  }
}

/* One family of per-DC samples: HELP, TYPE, then a line per shown slot. */
static void add_dc_family(struct text *t, const struct dc_sums *d, const char *name, const char *type,
                          const char *help, const int64_t *vals) {
  text_add(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
  for (int i = 0; i < MTP_BACK_DC_SLOTS; i++) {
    if (!d->shown[i])
      continue;
    char dc[16];
    dc_label(i, dc, sizeof(dc));
    text_add(t, "%s{dc=\"%s\"} %lld\n", name, dc, (long long)vals[i]);
  }
}

char *mtp_back_metrics_text(struct mtp_back *b) {
  struct text t = {.cap = 4096};
  t.s = mtp_malloc(t.cap);
  if (t.s == NULL)
    return NULL;
  t.s[0] = 0;
  struct cur_info ci;
  struct mtp_tg_snapshot *snap = get_cur_info(b, &ci);
  bool loaded = snap != NULL;
  struct dc_sums d;
  sum_dcs(b, snap, &d);
  mtp_tg_snapshot_release(snap);

  add_dc_family(&t, &d, "mtproxy_rpc_connections_by_dc", "gauge",
                "middle-proxy RPC connections open now (connecting included), by DC", d.conns);
  add_dc_family(&t, &d, "mtproxy_rpc_clients_by_dc", "gauge",
                "clients carried over middle-proxy connections now, by DC", d.clients);
  add_dc_family(&t, &d, "mtproxy_rpc_pool_growth_total", "counter",
                "middle-proxy connections opened because every open one of the DC's pool was full", d.growth);
  add_dc_family(&t, &d, "mtproxy_rpc_rotations_total", "counter",
                "ready middle-proxy connections closed by the middle proxy (Telegram's rotation or a restart)",
                d.rotations);
  text_add(&t, "# HELP mtproxy_telegram_config_loaded 1 when a Telegram config is in force\n"
               "# TYPE mtproxy_telegram_config_loaded gauge\nmtproxy_telegram_config_loaded %d\n",
           loaded ? 1 : 0);
  text_add(&t, "# HELP mtproxy_telegram_config_age_seconds seconds since the Telegram config in force was taken from "
               "its source (the older of secret and list; for the cache, since the cache was written)\n"
               "# TYPE mtproxy_telegram_config_age_seconds gauge\n");
  if (loaded)
    text_add(&t, "mtproxy_telegram_config_age_seconds %lld\n", (long long)cur_age(&ci, (int64_t)time(NULL)));
  if (t.failed) {
    mtp_free(t.s);
    return NULL;
  }
  return t.s;
}
