/*
 * reload.c - hot reload of a front's configuration (see reload.h).
 */
#include "reload.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "front.h"
#include "frontsvc.h"
#include "log.h"
#include "policy.h"

#include "banned.h"

/* A generation made by a reload: the config and its listeners' concrete addresses. */
struct heap_gen {
  struct mtp_front_gen g; /* first: the front only knows this part */
  struct mtp_config cfg;
  struct sockaddr_storage *bound; /* owns: cfg.nlisteners entries */
};

/* What the workers are asked to apply. Holds a reference on g until freed. */
struct job {
  struct mtp_reload *r;
  struct mtp_front_gen *g;
  atomic_int ndone;   /* workers that ran apply_on_worker */
  atomic_int nfailed; /* ... and could not open a new listener */
  int nworkers;       /* workers it was posted to */
};

struct mtp_reload {
  struct mtp_reload_opts o;
  struct mtp_front_gen gen0; /* the startup config: counted like the others but never freed */
  struct mtp_front_gen *cur; /* holds a reference: the generation in force */
  unsigned long next_id;
  struct job *late; /* owns: a job some worker had not run when the reload timed out */
};

static void heap_gen_free(struct mtp_front_gen *fg) {
  struct heap_gen *g = (struct heap_gen *)fg;
  mtp_debug("configuration generation %lu freed", fg->id);
  mtp_config_free(&g->cfg);
  mtp_free(g->bound);
  mtp_free(g);
}

static void job_free(struct job *j) {
  if (j == NULL)
    return;
  mtp_front_gen_release(j->g);
  mtp_free(j);
}

/* On each worker's thread. */
static void apply_on_worker(void *state, int index, void *arg) {
  struct job *j = arg;
  struct mtp_front_worker *fw = j->r->o.front_of(state);
  if (fw != NULL && mtp_front_worker_reconfigure(fw, j->g) != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "worker %d: the reloaded configuration is only partly in force here (see above)", index);
    atomic_fetch_add(&j->nfailed, 1);
  }
  atomic_fetch_add(&j->ndone, 1);
}

static int reload_hook(void *ctx, char *err, size_t errlen) { return mtp_reload_run(ctx, err, errlen); }

int mtp_reload_setup(struct mtp_reload **out, const struct mtp_reload_opts *opts) {
  *out = NULL;
  struct mtp_reload *r = mtp_calloc(1, sizeof(*r));
  if (r == NULL)
    return MTP_ENOMEM;
  r->o = *opts;
  mtp_front_gen_init(&r->gen0, opts->cfg, mtp_app_bound_addrs(opts->app), 0, NULL);
  r->cur = &r->gen0;
  mtp_app_set_reload(opts->app, reload_hook, r);
  *out = r;
  return MTP_OK;
}

const struct mtp_config *mtp_reload_config(const struct mtp_reload *r) { return r->cur->cfg; }

void mtp_reload_free(struct mtp_reload *r) {
  if (r == NULL)
    return;
  job_free(r->late);
  mtp_front_gen_release(r->cur);
  mtp_free(r);
}

/* ---- comparing two configurations, for the summary line ---- */

static bool str_eq(const char *a, const char *b) {
  if (a == NULL || b == NULL)
    return a == b;
  return strcmp(a, b) == 0;
}

/* True when a client of listener b is treated differently from one of a (both the same socket). */
static bool listener_changed(const struct mtp_listener_conf *a, const struct mtp_listener_conf *b) {
  if (a->nsecrets != b->nsecrets || memcmp(a->secrets, b->secrets, a->nsecrets * 16) != 0)
    return true;
  if (a->has_ad_tag != b->has_ad_tag || (a->has_ad_tag && memcmp(a->ad_tag, b->ad_tag, 16) != 0))
    return true;
  if (a->allowed_protocols != b->allowed_protocols || a->ntls_domains != b->ntls_domains)
    return true;
  for (size_t i = 0; i < a->ntls_domains; i++)
    if (!str_eq(a->tls_domains[i], b->tls_domains[i]))
      return true;
  return false;
}

static const struct mtp_listener_conf *find_same_socket(const struct mtp_config *cfg,
                                                        const struct mtp_listener_conf *l) {
  for (size_t i = 0; i < cfg->nlisteners; i++)
    if (mtp_listener_conf_same_socket(&cfg->listeners[i], l))
      return &cfg->listeners[i];
  return NULL;
}

/* Logs the listeners that were added or removed and the summary line. */
static void log_summary(const struct mtp_config *old, const struct mtp_front_gen *g, int nfailed) {
  const struct mtp_config *cfg = g->cfg;
  size_t kept = 0, changed = 0;
  for (size_t j = 0; j < cfg->nlisteners; j++) {
    const struct mtp_listener_conf *was = find_same_socket(old, &cfg->listeners[j]);
    if (was != NULL) {
      kept++;
      changed += listener_changed(was, &cfg->listeners[j]);
      continue;
    }
    char s[80];
    mtp_format_addr(&g->bound_addrs[j], s, sizeof(s));
    mtp_log(MTP_LOG_INFO, "listener %s listening on %s", cfg->listeners[j].name, s);
  }
  for (size_t i = 0; i < old->nlisteners; i++)
    if (find_same_socket(cfg, &old->listeners[i]) == NULL)
      mtp_log(MTP_LOG_INFO, "listener %s closed; clients connected through it stay until they leave",
              old->listeners[i].name);
  mtp_log(MTP_LOG_INFO, "reload: generation %lu, %zu listener%s (+%zu -%zu, %zu changed)%s", g->id,
          cfg->nlisteners, cfg->nlisteners == 1 ? "" : "s", cfg->nlisteners - kept, old->nlisteners - kept, changed,
          nfailed > 0 ? "; some workers could not open every listener" : "");
}

/* log_level and log_debug: applied only when the file changed them, so a runtime switch
 * (POST /log, mtproxy ctl log-level) survives reloads that do not touch them. */
static void apply_log_settings(const struct mtp_config *old, const struct mtp_config *cfg) {
  if (cfg->log_level != old->log_level)
    mtp_log_level = cfg->log_level;
  if (!str_eq(cfg->log_debug, old->log_debug) &&
      mtp_log_set_debug_modules(cfg->log_debug != NULL ? cfg->log_debug : "") != MTP_OK)
    mtp_log(MTP_LOG_WARN, "log_debug '%s': bad module list; ignored", cfg->log_debug);
}

/* ---- the reload ---- */

int mtp_reload_run(struct mtp_reload *r, char *err, size_t errlen) {
  struct mtp_app *app = r->o.app;
  const struct mtp_config *old = r->cur->cfg;
  if (mtp_app_is_stopping(app)) {
    snprintf(err, errlen, "the proxy is stopping");
    return MTP_ECLOSED;
  }
  if (r->late != NULL) {
    if (atomic_load(&r->late->ndone) < r->late->nworkers) {
      snprintf(err, errlen, "a worker has not applied the previous reload yet");
      return MTP_ETIMEDOUT;
    }
    job_free(r->late);
    r->late = NULL;
    if (r->o.frontsvc != NULL)
      mtp_frontsvc_reclaim(r->o.frontsvc); /* every worker has been past the late job */
  }

  struct heap_gen *g = mtp_calloc(1, sizeof(*g));
  struct job *job = mtp_calloc(1, sizeof(*job));
  if (g == NULL || job == NULL) {
    mtp_free(g);
    mtp_free(job);
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  char note[512] = "";
  int rc = mtp_config_reload(old, &g->cfg, note, sizeof(note));
  if (rc != MTP_OK) {
    snprintf(err, errlen, "%s", note[0] != '\0' ? note : mtp_strerror(rc));
    mtp_free(g);
    mtp_free(job);
    return rc;
  }
  rc = mtp_app_listeners_prepare(app, &g->cfg, err, errlen);
  if (rc == MTP_OK) {
    g->bound = mtp_calloc(g->cfg.nlisteners ? g->cfg.nlisteners : 1, sizeof(*g->bound));
    if (g->bound == NULL) {
      snprintf(err, errlen, "out of memory");
      rc = MTP_ENOMEM;
    } else {
      memcpy(g->bound, mtp_app_listeners_pending(app), g->cfg.nlisteners * sizeof(*g->bound));
    }
  }
  if (rc == MTP_OK && r->o.policy != NULL) {
    char perr[400] = "";
    rc = mtp_policy_reconfigure(r->o.policy, &g->cfg, perr, sizeof(perr));
    if (rc != MTP_OK)
      snprintf(err, errlen, "policy: %s", perr[0] != '\0' ? perr : mtp_strerror(rc));
  }
  if (rc != MTP_OK) {
    mtp_app_listeners_abort(app);
    mtp_config_free(&g->cfg);
    mtp_free(g->bound);
    mtp_free(g);
    mtp_free(job);
    return rc;
  }

  /* From here on nothing fails: the new configuration is in force. */
  mtp_app_listeners_commit(app, &g->cfg);
  mtp_front_gen_init(&g->g, &g->cfg, g->bound, ++r->next_id, heap_gen_free);
  if (r->o.frontsvc != NULL) {
    /* Before the workers switch: they take the services over with the generation. */
    mtp_frontsvc_reconfigure(r->o.frontsvc, &g->cfg);
    g->g.shared = r->o.frontsvc->shared;
    g->g.has_shared = true;
  }
  job->r = r;
  job->g = &g->g;
  mtp_front_gen_hold(job->g);
  job->nworkers = old->workers > 0 ? old->workers : 1;
  atomic_init(&job->ndone, 0);
  atomic_init(&job->nfailed, 0);
  int crc = mtp_app_call_workers(app, apply_on_worker, job, MTP_RELOAD_WORKER_TIMEOUT_MS);
  int nfailed = atomic_load(&job->nfailed);
  if (crc == MTP_ETIMEDOUT) {
    mtp_log(MTP_LOG_WARN, "reload: %d of %d workers applied the new configuration within %d s; the others will "
            "when their loops get to it", atomic_load(&job->ndone), job->nworkers,
            MTP_RELOAD_WORKER_TIMEOUT_MS / 1000);
    r->late = job;
  } else {
    if (crc != MTP_OK)
      mtp_log(MTP_LOG_ERROR, "reload: cannot reach the workers: %s", mtp_strerror(crc));
    else if (r->o.frontsvc != NULL)
      mtp_frontsvc_reclaim(r->o.frontsvc); /* every worker ran the job posted after the swap */
    job_free(job);
  }
  apply_log_settings(old, &g->cfg);
  if (note[0] != '\0')
    mtp_log(MTP_LOG_WARN, "reload: %s", note);
  log_summary(old, &g->g, nfailed);
  /* Last: this may free the old generation (and `old`) when no session uses it any more. */
  struct mtp_front_gen *prev = r->cur;
  r->cur = &g->g;
  mtp_front_gen_release(prev);
  return MTP_OK;
}
