#include "app.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "links.h"
#include "log.h"
#include "metrics.h"
#include "obf2.h"
#include "sdnotify.h"
#include "banned.h"

/* How often a worker publishes its client count: normally, and while draining. */
#define COUNT_INTERVAL_MS 1000
#define DRAIN_COUNT_INTERVAL_MS 20
/* How often the main thread checks a drain, and logs its progress. */
#define DRAIN_CHECK_MS 25
#define DRAIN_LOG_MS 5000

/* One worker thread: its loop, the role's state, the asyncs that ask it to stop or to drain,
 * and the timer that publishes its client count for the main thread. */
struct worker {
  struct mtp_app *app;
  int index;
  pthread_t thread;
  bool started;
  uv_loop_t loop;
  uv_async_t stop_async;
  uv_async_t drain_async;
  uv_async_t call_async;  /* runs app->call_fn for mtp_app_call_workers */
  bool call_pending;      /* under app->lock: a call was posted and has not run yet */
  uv_timer_t count_timer; /* only when the role counts clients */
  bool count_timer_on;
  _Atomic long nclients;  /* published by the worker; -1 = not known yet */
  atomic_bool drain_ack;  /* the worker has stopped accepting; nclients is fresh from then on */
  void *state; /* owns (through the role's hooks) */
  int setup_rc;
};

struct mtp_app {
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;              /* the default loop (main thread) */
  struct sockaddr_storage *bound; /* owns: concrete listener addresses */
  int *reserve_fds;               /* owns: sockets that hold the listener ports */
  int extra_fds[4];               /* owns: more reserved ports (mtp_app_reserve), e.g. tunnel_listen */
  size_t nextra;
  struct worker *workers;         /* owns */
  int nworkers;
  const struct mtp_app_role *role; /* borrows */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int nready;
  struct mtp_admin *admin; /* owns (freed by its own close); NULL = off */
  bool signals_on;
  uv_signal_t sigint, sigterm, sighup;
  mtp_app_stop_cb on_stop;
  bool stopping;
  bool draining;
  bool workers_up;         /* mtp_app_start_workers succeeded */
  uv_timer_t drain_timer;  /* main loop: checks the drain */
  bool drain_timer_on;
  uint64_t drain_deadline; /* uv_now() ms */
  uint64_t drain_next_log;
  mtp_app_reload_fn reload;
  void *reload_ctx;
  /* mtp_app_call_workers (under lock): what the workers run, and how many have not yet. */
  mtp_app_worker_fn call_fn;
  void *call_arg;
  int calls_left;
  /* A reload's listeners between mtp_app_listeners_prepare and commit/abort. */
  struct sockaddr_storage *bound0; /* owns: the setup array, kept until free (borrowed by the
                                    * workers' setup config) */
  struct sockaddr_storage *pending_bound; /* owns */
  int *pending_fds;                       /* owns: new reservations, -1 for kept listeners */
  long *pending_from;                     /* owns: the current listener each one keeps, or -1 */
  size_t npending;
  bool qr;
};

static int reserve_port(const struct sockaddr_storage *want, struct sockaddr_storage *got, int *fd_out) {
  int fd = socket(want->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return uv_translate_sys_error(errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  if (want->ss_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  socklen_t alen = want->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  if (bind(fd, (const struct sockaddr *)want, alen) != 0) {
    int err = uv_translate_sys_error(errno);
    close(fd);
    return err;
  }
  socklen_t glen = sizeof(*got);
  getsockname(fd, (struct sockaddr *)got, &glen);
  *fd_out = fd;
  return MTP_OK;
}

/* ---- admin endpoint (cmd/admin.c): the parts only the app knows ---- */

static int admin_start(struct mtp_app *app);

int mtp_app_setup(struct mtp_app **out, const struct mtp_config *cfg) {
  struct mtp_app *app = mtp_calloc(1, sizeof(*app));
  if (app == NULL)
    return MTP_ENOMEM;
  app->cfg = cfg;
  app->loop = uv_default_loop();
  pthread_mutex_init(&app->lock, NULL);
  pthread_cond_init(&app->cond, NULL);
  *out = app;
  mtp_metrics_thread_register();
  app->bound = mtp_calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(*app->bound));
  app->bound0 = app->bound;
  app->reserve_fds = mtp_calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(int));
  if (app->bound == NULL || app->reserve_fds == NULL)
    return MTP_ENOMEM;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    app->reserve_fds[i] = -1;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    int rc = reserve_port(&cfg->listeners[i].addr, &app->bound[i], &app->reserve_fds[i]);
    if (rc != MTP_OK) {
      char s[80];
      mtp_format_addr(&cfg->listeners[i].addr, s, sizeof(s));
      mtp_log(MTP_LOG_ERROR, "listener %s: cannot bind %s: %s", cfg->listeners[i].name, s, mtp_strerror(rc));
      return rc;
    }
  }
  if (cfg->admin != NULL)
    return admin_start(app);
  return MTP_OK;
}

struct mtp_admin *mtp_app_admin(struct mtp_app *app) { return app->admin; }

uv_loop_t *mtp_app_loop(struct mtp_app *app) { return app->loop; }
const struct mtp_config *mtp_app_config(struct mtp_app *app) { return app->cfg; }
const struct sockaddr_storage *mtp_app_bound_addrs(struct mtp_app *app) { return app->bound; }
void *mtp_app_role_ctx(struct mtp_app *app) { return app->role ? app->role->ctx : NULL; }

int mtp_app_reserve(struct mtp_app *app, const struct sockaddr_storage *want, struct sockaddr_storage *got) {
  if (app->nextra == sizeof(app->extra_fds) / sizeof(app->extra_fds[0]))
    return MTP_ENOMEM;
  int fd = -1;
  int rc = reserve_port(want, got, &fd);
  if (rc != MTP_OK)
    return rc;
  app->extra_fds[app->nextra++] = fd;
  return MTP_OK;
}

/* ---- workers ---- */

static void close_worker_handles(struct worker *w) {
  if (!uv_is_closing((uv_handle_t *)&w->stop_async))
    uv_close((uv_handle_t *)&w->stop_async, NULL);
  if (!uv_is_closing((uv_handle_t *)&w->drain_async))
    uv_close((uv_handle_t *)&w->drain_async, NULL);
  if (!uv_is_closing((uv_handle_t *)&w->call_async))
    uv_close((uv_handle_t *)&w->call_async, NULL);
  if (w->count_timer_on && !uv_is_closing((uv_handle_t *)&w->count_timer))
    uv_close((uv_handle_t *)&w->count_timer, NULL);
}

static void on_worker_stop(uv_async_t *a) {
  struct worker *w = a->data;
  w->app->role->worker_stop(w->state);
  close_worker_handles(w);
}

static void publish_count(struct worker *w) {
  long n = (long)w->app->role->worker_nclients(w->state);
  atomic_store_explicit(&w->nclients, n, memory_order_relaxed);
}

static void on_count_timer(uv_timer_t *t) { publish_count(t->data); }

/* Drain: stop accepting, and publish the count often so the main thread sees the last
 * client leave quickly. */
static void on_worker_drain(uv_async_t *a) {
  struct worker *w = a->data;
  if (w->app->role->worker_drain == NULL || !w->count_timer_on)
    return;
  w->app->role->worker_drain(w->state);
  publish_count(w);
  atomic_store_explicit(&w->drain_ack, true, memory_order_release);
  mtp_log(MTP_LOG_INFO, "worker %d: stopped accepting, %ld client%s open", w->index,
          atomic_load_explicit(&w->nclients, memory_order_relaxed),
          atomic_load_explicit(&w->nclients, memory_order_relaxed) == 1 ? "" : "s");
  uv_timer_start(&w->count_timer, on_count_timer, DRAIN_COUNT_INTERVAL_MS, DRAIN_COUNT_INTERVAL_MS);
}

/* mtp_app_call_workers: run the posted call once, then tell the main thread. */
static void on_worker_call(uv_async_t *a) {
  struct worker *w = a->data;
  struct mtp_app *app = w->app;
  pthread_mutex_lock(&app->lock);
  bool pending = w->call_pending;
  mtp_app_worker_fn fn = app->call_fn;
  void *arg = app->call_arg;
  pthread_mutex_unlock(&app->lock);
  if (!pending)
    return;
  fn(w->state, w->index, arg);
  pthread_mutex_lock(&app->lock);
  w->call_pending = false;
  app->calls_left--;
  pthread_cond_broadcast(&app->cond);
  pthread_mutex_unlock(&app->lock);
}

static void *worker_main(void *arg) {
  struct worker *w = arg;
  struct mtp_app *app = w->app;
  mtp_metrics_thread_register();
  int rc = uv_loop_init(&w->loop);
  if (rc == 0) {
    rc = uv_async_init(&w->loop, &w->stop_async, on_worker_stop);
    w->stop_async.data = w;
  }
  if (rc == 0) {
    rc = uv_async_init(&w->loop, &w->drain_async, on_worker_drain);
    w->drain_async.data = w;
    if (rc != 0)
      uv_close((uv_handle_t *)&w->stop_async, NULL);
  }
  if (rc == 0) {
    rc = uv_async_init(&w->loop, &w->call_async, on_worker_call);
    w->call_async.data = w;
    if (rc != 0) {
      uv_close((uv_handle_t *)&w->stop_async, NULL);
      uv_close((uv_handle_t *)&w->drain_async, NULL);
    }
  }
  if (rc == 0)
    rc = app->role->worker_setup(app, &w->loop, w->index, &w->state);
  if (rc == 0 && app->role->worker_nclients != NULL && uv_timer_init(&w->loop, &w->count_timer) == 0) {
    w->count_timer.data = w;
    w->count_timer_on = true;
    publish_count(w);
    uv_timer_start(&w->count_timer, on_count_timer, COUNT_INTERVAL_MS, COUNT_INTERVAL_MS);
  }
  pthread_mutex_lock(&app->lock);
  w->setup_rc = rc;
  app->nready++;
  pthread_cond_broadcast(&app->cond);
  pthread_mutex_unlock(&app->lock);
  if (rc != 0 && w->state != NULL)
    app->role->worker_stop(w->state);
  if (rc != 0 && uv_is_active((uv_handle_t *)&w->stop_async))
    close_worker_handles(w);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  app->role->worker_free(w->state);
  w->state = NULL;
  if (uv_loop_close(&w->loop) != 0)
    mtp_log(MTP_LOG_WARN, "worker %d: loop closed with handles still open", w->index);
  return NULL;
}

int mtp_app_start_workers(struct mtp_app *app, const struct mtp_app_role *role) {
  const struct mtp_config *cfg = app->cfg;
  app->role = role;
  app->nworkers = cfg->workers > 0 ? cfg->workers : 1;
  app->workers = mtp_calloc((size_t)app->nworkers, sizeof(*app->workers));
  if (app->workers == NULL)
    return MTP_ENOMEM;
  int started = 0;
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    w->app = app;
    w->index = i;
    atomic_init(&w->nclients, -1);
    atomic_init(&w->drain_ack, false);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
      mtp_log(MTP_LOG_ERROR, "cannot start worker thread %d", i);
      break;
    }
    w->started = true;
    started++;
  }
  pthread_mutex_lock(&app->lock);
  while (app->nready < started)
    pthread_cond_wait(&app->cond, &app->lock);
  pthread_mutex_unlock(&app->lock);
  if (started < app->nworkers)
    return MTP_ENOMEM;
  for (int i = 0; i < app->nworkers; i++)
    if (app->workers[i].setup_rc != 0)
      return app->workers[i].setup_rc;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    char s[80];
    mtp_format_addr(&app->bound[i], s, sizeof(s));
    mtp_log(MTP_LOG_INFO, "listener %s listening on %s", cfg->listeners[i].name, s);
  }
  mtp_log(MTP_LOG_INFO, "%d worker%s running", app->nworkers, app->nworkers == 1 ? "" : "s");
  app->workers_up = true;
  char st[96];
  snprintf(st, sizeof(st), "%d worker%s, %zu listener%s", app->nworkers, app->nworkers == 1 ? "" : "s",
           cfg->nlisteners, cfg->nlisteners == 1 ? "" : "s");
  mtp_sd_ready(st);
  return MTP_OK;
}

/* ---- links ---- */

void mtp_app_set_qr(struct mtp_app *app, bool on) { app->qr = on; }

void mtp_app_print_links(struct mtp_app *app) {
  struct mtp_links links;
  if (mtp_links_build(app->cfg, app->bound, &links) != MTP_OK) {
    mtp_log(MTP_LOG_WARN, "links: out of memory");
    return;
  }
  mtp_links_log(&links);
  if (app->qr || isatty(STDOUT_FILENO))
    mtp_links_print_qr(stdout, &links, true);
  mtp_links_free(&links);
}

/* ---- what the app tells the admin endpoint ---- */

static cJSON *admin_links(void *ctx) {
  struct mtp_app *app = ctx;
  struct mtp_links links;
  if (mtp_links_build(app->cfg, app->bound, &links) != MTP_OK)
    return NULL;
  cJSON *j = mtp_links_json(&links);
  mtp_links_free(&links);
  return j;
}

static cJSON *protocols_json(unsigned bits) {
  static const struct {
    unsigned bit;
    const char *name;
  } names[] = {{MTP_ALLOW_ABRIDGED, "abridged"},
               {MTP_ALLOW_INTERMEDIATE, "intermediate"},
               {MTP_ALLOW_SECURE, "secure"},
               {MTP_ALLOW_FAKE_TLS, "fake_tls"}};
  cJSON *arr = cJSON_CreateArray();
  for (size_t i = 0; arr != NULL && i < sizeof(names) / sizeof(names[0]); i++)
    if (bits & names[i].bit)
      cJSON_AddItemToArray(arr, cJSON_CreateString(names[i].name));
  return arr;
}

static void admin_status(void *ctx, cJSON *st) {
  struct mtp_app *app = ctx;
  const struct mtp_config *cfg = app->cfg;
  cJSON_AddStringToObject(st, "state", app->draining ? "draining" : app->stopping ? "stopping"
                                                       : app->workers_up          ? "running"
                                                                                  : "starting");
  cJSON *ls = cJSON_AddArrayToObject(st, "listeners");
  for (size_t i = 0; ls != NULL && i < cfg->nlisteners; i++) {
    const struct mtp_listener_conf *l = &cfg->listeners[i];
    cJSON *o = cJSON_CreateObject();
    if (o == NULL || !cJSON_AddItemToArray(ls, o)) {
      cJSON_Delete(o);
      break;
    }
    char addr[80];
    mtp_format_addr(&app->bound[i], addr, sizeof(addr));
    cJSON_AddStringToObject(o, "name", l->name);
    cJSON_AddStringToObject(o, "address", addr);
    cJSON_AddItemToObject(o, "protocols", protocols_json(l->allowed_protocols));
    cJSON_AddNumberToObject(o, "secrets", (double)l->nsecrets);
    size_t nd = l->ntls_domains ? l->ntls_domains : cfg->ntls_domains;
    char **doms = l->ntls_domains ? l->tls_domains : cfg->tls_domains;
    cJSON *d = cJSON_AddArrayToObject(o, "tls_domains");
    for (size_t k = 0; d != NULL && k < nd; k++)
      cJSON_AddItemToArray(d, cJSON_CreateString(doms[k]));
    cJSON_AddBoolToObject(o, "ad_tag", l->has_ad_tag || cfg->has_ad_tag);
  }
  cJSON *ws = cJSON_AddObjectToObject(st, "workers");
  if (ws != NULL) {
    cJSON_AddNumberToObject(ws, "count", app->nworkers);
    bool counted = app->workers != NULL && app->role != NULL && app->role->worker_nclients != NULL;
    cJSON *clients = counted ? cJSON_AddArrayToObject(ws, "clients") : NULL;
    for (int i = 0; clients != NULL && i < app->nworkers; i++)
      cJSON_AddItemToArray(clients, cJSON_CreateNumber((double)atomic_load(&app->workers[i].nclients)));
  }
  int64_t m[MTP_M__COUNT];
  mtp_metrics_sum(m);
  cJSON *c = cJSON_AddObjectToObject(st, "connections");
  if (c != NULL) {
    cJSON_AddNumberToObject(c, "clients", (double)m[MTP_M_CLIENTS_ACTIVE]);
    cJSON_AddNumberToObject(c, "clients_accepted_total", (double)m[MTP_M_CLIENTS_ACCEPTED]);
    cJSON_AddNumberToObject(c, "fronted", (double)m[MTP_M_FRONTED_ACTIVE]);
    cJSON_AddNumberToObject(c, "rpc_connections", (double)m[MTP_M_RPC_CONNS]);
    cJSON_AddNumberToObject(c, "rpc_clients", (double)m[MTP_M_RPC_STREAMS]);
    cJSON_AddNumberToObject(c, "tunnel_connections", (double)m[MTP_M_TUNNEL_UP]);
    cJSON_AddNumberToObject(c, "tunnel_streams", (double)m[MTP_M_TUNNEL_STREAMS]);
  }
  cJSON *dr = cJSON_AddObjectToObject(st, "drain");
  if (dr != NULL) {
    cJSON_AddNumberToObject(dr, "timeout_seconds", cfg->drain_timeout);
    if (app->draining) {
      uint64_t now = uv_now(app->loop);
      cJSON_AddNumberToObject(dr, "seconds_left",
                              now < app->drain_deadline ? (double)(app->drain_deadline - now) / 1000.0 : 0.0);
    }
  }
}

static int admin_reload(void *ctx, char *err, size_t errlen);

static int admin_start(struct mtp_app *app) {
  int rc = mtp_admin_setup(&app->admin, app->loop, app->cfg->admin);
  if (rc != MTP_OK)
    return rc;
  struct mtp_admin_hooks h = {.ctx = app, .status = admin_status, .links = admin_links};
  return mtp_admin_add_hooks(app->admin, &h);
}

/* ---- reload ---- */

/* The one path of SIGHUP and POST /reload: systemd hears RELOADING=1 then READY=1, the result
 * is logged and counted. */
static int app_reload(struct mtp_app *app, const char *why, char *err, size_t errlen) {
  if (app->reload == NULL) {
    snprintf(err, errlen, "reload is not implemented in this build");
    return MTP_EINVAL;
  }
  mtp_log(MTP_LOG_INFO, "%s: reloading the configuration", why);
  mtp_sd_reloading();
  err[0] = '\0';
  int rc = app->reload(app->reload_ctx, err, errlen);
  if (rc == MTP_OK) {
    MTP_COUNT(RELOADS_OK);
    mtp_log(MTP_LOG_INFO, "configuration reloaded");
  } else {
    MTP_COUNT(RELOADS_FAIL);
    mtp_log(MTP_LOG_ERROR, "reload failed, keeping the old configuration: %s", err[0] ? err : mtp_strerror(rc));
  }
  mtp_sd_ready(rc == MTP_OK ? "configuration reloaded" : "reload failed; old configuration kept");
  return rc;
}

static int admin_reload(void *ctx, char *err, size_t errlen) { return app_reload(ctx, "admin", err, errlen); }

void mtp_app_set_reload(struct mtp_app *app, mtp_app_reload_fn fn, void *ctx) {
  bool first = app->reload == NULL;
  app->reload = fn;
  app->reload_ctx = ctx;
  if (first && fn != NULL) {
    struct mtp_admin_hooks h = {.ctx = app, .reload = admin_reload};
    mtp_admin_add_hooks(app->admin, &h);
  }
}

/* ---- reload: the listeners of a new configuration, calls on the workers ---- */

int mtp_app_listeners_prepare(struct mtp_app *app, const struct mtp_config *cfg, char *err, size_t errlen) {
  mtp_app_listeners_abort(app);
  size_t n = cfg->nlisteners ? cfg->nlisteners : 1;
  app->pending_bound = mtp_calloc(n, sizeof(*app->pending_bound));
  app->pending_fds = mtp_calloc(n, sizeof(*app->pending_fds));
  app->pending_from = mtp_calloc(n, sizeof(*app->pending_from));
  if (app->pending_bound == NULL || app->pending_fds == NULL || app->pending_from == NULL) {
    mtp_app_listeners_abort(app);
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  app->npending = cfg->nlisteners;
  for (size_t j = 0; j < cfg->nlisteners; j++) {
    app->pending_fds[j] = -1;
    app->pending_from[j] = -1;
  }
  for (size_t j = 0; j < cfg->nlisteners; j++) {
    const struct mtp_listener_conf *l = &cfg->listeners[j];
    for (size_t i = 0; i < app->cfg->nlisteners; i++) {
      if (mtp_listener_conf_same_socket(&app->cfg->listeners[i], l)) {
        app->pending_from[j] = (long)i;
        app->pending_bound[j] = app->bound[i];
        break;
      }
    }
    if (app->pending_from[j] >= 0)
      continue;
    int rc = reserve_port(&l->addr, &app->pending_bound[j], &app->pending_fds[j]);
    if (rc != MTP_OK) {
      char s[80];
      mtp_format_addr(&l->addr, s, sizeof(s));
      snprintf(err, errlen, "listener %s: cannot bind %s: %s", l->name, s, mtp_strerror(rc));
      mtp_app_listeners_abort(app);
      return rc;
    }
  }
  return MTP_OK;
}

const struct sockaddr_storage *mtp_app_listeners_pending(const struct mtp_app *app) { return app->pending_bound; }

void mtp_app_listeners_commit(struct mtp_app *app, const struct mtp_config *cfg) {
  /* Release the reservations of the listeners that are gone, move the kept ones over. */
  for (size_t i = 0; i < app->cfg->nlisteners; i++) {
    bool kept = false;
    for (size_t j = 0; j < app->npending && !kept; j++)
      kept = app->pending_from[j] == (long)i;
    if (!kept && app->reserve_fds[i] >= 0)
      close(app->reserve_fds[i]);
  }
  for (size_t j = 0; j < app->npending; j++)
    if (app->pending_from[j] >= 0)
      app->pending_fds[j] = app->reserve_fds[app->pending_from[j]];
  mtp_free(app->reserve_fds);
  app->reserve_fds = app->pending_fds;
  app->pending_fds = NULL;
  if (app->bound != app->bound0)
    mtp_free(app->bound);
  app->bound = app->pending_bound;
  app->pending_bound = NULL;
  mtp_free(app->pending_from);
  app->pending_from = NULL;
  app->npending = 0;
  app->cfg = cfg;
}

void mtp_app_listeners_abort(struct mtp_app *app) {
  for (size_t j = 0; app->pending_fds != NULL && j < app->npending; j++)
    if (app->pending_fds[j] >= 0)
      close(app->pending_fds[j]);
  mtp_free(app->pending_bound);
  mtp_free(app->pending_fds);
  mtp_free(app->pending_from);
  app->pending_bound = NULL;
  app->pending_fds = NULL;
  app->pending_from = NULL;
  app->npending = 0;
}

int mtp_app_call_workers(struct mtp_app *app, mtp_app_worker_fn fn, void *arg, int timeout_ms) {
  if (!app->workers_up || app->stopping)
    return MTP_ECLOSED;
  pthread_mutex_lock(&app->lock);
  for (int i = 0; i < app->nworkers; i++) {
    if (app->workers[i].call_pending) {
      pthread_mutex_unlock(&app->lock);
      return MTP_EEXIST; /* a worker has not run the previous call yet */
    }
  }
  app->call_fn = fn;
  app->call_arg = arg;
  app->calls_left = 0;
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (!w->started || w->setup_rc != 0)
      continue;
    w->call_pending = true;
    app->calls_left++;
    uv_async_send(&w->call_async);
  }
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_ms / 1000;
  deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  int rc = MTP_OK;
  while (app->calls_left > 0 && rc == MTP_OK)
    if (pthread_cond_timedwait(&app->cond, &app->lock, &deadline) != 0 && app->calls_left > 0)
      rc = MTP_ETIMEDOUT;
  pthread_mutex_unlock(&app->lock);
  return rc;
}

/* ---- signals, drain and shutdown ---- */

static void stop_now(struct mtp_app *app) {
  app->draining = false;
  app->on_stop(app);
}

/* Sum of the workers' client counts published since they stopped accepting; -1 while one
 * has not yet (a count from before could miss a client that arrived just before the close). */
static long clients_left(struct mtp_app *app) {
  long sum = 0;
  for (int i = 0; i < app->nworkers; i++) {
    if (!atomic_load_explicit(&app->workers[i].drain_ack, memory_order_acquire))
      return -1;
    long n = atomic_load_explicit(&app->workers[i].nclients, memory_order_relaxed);
    if (n < 0)
      return -1;
    sum += n;
  }
  return sum;
}

static void on_drain_check(uv_timer_t *t) {
  struct mtp_app *app = t->data;
  long left = clients_left(app);
  uint64_t now = uv_now(app->loop);
  if (left < 0 && now >= app->drain_deadline) {
    /* A worker never answered the drain (stuck?): count from the metrics for the log. */
    int64_t m[MTP_M__COUNT];
    mtp_metrics_sum(m);
    left = (long)m[MTP_M_CLIENTS_ACTIVE];
  }
  if (left == 0) {
    mtp_log(MTP_LOG_INFO, "drained: no client left");
    stop_now(app);
    return;
  }
  if (now >= app->drain_deadline) {
    mtp_log(MTP_LOG_INFO, "drain timeout: closing the %ld remaining client%s", left, left == 1 ? "" : "s");
    stop_now(app);
    return;
  }
  if (left >= 0 && now >= app->drain_next_log) {
    app->drain_next_log = now + DRAIN_LOG_MS;
    mtp_log(MTP_LOG_INFO, "draining: %ld client%s left, %.0f s to go", left, left == 1 ? "" : "s",
            (double)(app->drain_deadline - now) / 1000.0);
    char st[96];
    snprintf(st, sizeof(st), "draining %ld clients", left);
    mtp_sd_status(st);
  }
}

/* SIGTERM: the listeners close (new connections are refused), clients keep going until none
 * is left or drain_timeout passes, then everything stops. Returns false when a drain is not
 * possible (no workers yet, a role that cannot drain, drain_timeout 0). */
static bool start_drain(struct mtp_app *app) {
  const struct mtp_app_role *role = app->role;
  if (!app->workers_up || role == NULL || role->worker_drain == NULL || role->worker_nclients == NULL ||
      app->cfg->drain_timeout <= 0)
    return false;
  if (uv_timer_init(app->loop, &app->drain_timer) != 0)
    return false;
  app->drain_timer.data = app;
  app->drain_timer_on = true;
  app->draining = true;
  uv_update_time(app->loop);
  uint64_t now = uv_now(app->loop);
  app->drain_deadline = now + (uint64_t)(app->cfg->drain_timeout * 1000.0);
  app->drain_next_log = now + DRAIN_LOG_MS;
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (w->started && w->setup_rc == 0)
      uv_async_send(&w->drain_async);
  }
  int64_t m[MTP_M__COUNT];
  mtp_metrics_sum(m);
  mtp_log(MTP_LOG_INFO, "draining %lld client%s for up to %g s (listeners closed; SIGTERM or SIGINT again stops now)",
          (long long)m[MTP_M_CLIENTS_ACTIVE], m[MTP_M_CLIENTS_ACTIVE] == 1 ? "" : "s", app->cfg->drain_timeout);
  uv_timer_start(&app->drain_timer, on_drain_check, DRAIN_CHECK_MS, DRAIN_CHECK_MS);
  return true;
}

static void on_signal(uv_signal_t *s, int signum) {
  struct mtp_app *app = s->data;
  if (app->draining) {
    mtp_log(MTP_LOG_INFO, "signal %d during the drain: stopping now", signum);
    stop_now(app);
    return;
  }
  if (app->stopping)
    return;
  app->stopping = true;
  mtp_sd_stopping(NULL);
  if (signum == SIGTERM && start_drain(app))
    return;
  mtp_log(MTP_LOG_INFO, "signal %d: stopping", signum);
  app->on_stop(app);
}

static void on_sighup(uv_signal_t *s, int signum) {
  struct mtp_app *app = s->data;
  if (app->stopping)
    return;
  if (app->reload == NULL) {
    mtp_log(MTP_LOG_WARN, "SIGHUP: reload is not implemented in this build; ignored");
    return;
  }
  char err[400];
  app_reload(app, "SIGHUP", err, sizeof(err));
}

int mtp_app_handle_signals(struct mtp_app *app, mtp_app_stop_cb on_stop) {
  app->on_stop = on_stop;
  uv_signal_init(app->loop, &app->sigint);
  uv_signal_init(app->loop, &app->sigterm);
  uv_signal_init(app->loop, &app->sighup);
  app->sigint.data = app->sigterm.data = app->sighup.data = app;
  app->signals_on = true;
  int rc = uv_signal_start(&app->sigint, on_signal, SIGINT);
  if (rc == 0)
    rc = uv_signal_start(&app->sigterm, on_signal, SIGTERM);
  if (rc == 0)
    rc = uv_signal_start(&app->sighup, on_sighup, SIGHUP);
  return rc;
}

bool mtp_app_is_stopping(const struct mtp_app *app) { return app->stopping; }
bool mtp_app_is_draining(const struct mtp_app *app) { return app->draining; }

void mtp_app_stop(struct mtp_app *app) {
  if (app == NULL)
    return;
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (w->started && w->setup_rc == 0)
      uv_async_send(&w->stop_async);
  }
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (w->started)
      pthread_join(w->thread, NULL);
    w->started = false;
  }
  mtp_admin_close(app->admin);
  app->admin = NULL;
  if (app->drain_timer_on && !uv_is_closing((uv_handle_t *)&app->drain_timer))
    uv_close((uv_handle_t *)&app->drain_timer, NULL);
  app->draining = false;
  if (app->signals_on) {
    if (!uv_is_closing((uv_handle_t *)&app->sigint))
      uv_close((uv_handle_t *)&app->sigint, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->sigterm))
      uv_close((uv_handle_t *)&app->sigterm, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->sighup))
      uv_close((uv_handle_t *)&app->sighup, NULL);
  }
  for (size_t i = 0; i < app->cfg->nlisteners; i++) {
    if (app->reserve_fds[i] >= 0)
      close(app->reserve_fds[i]);
    app->reserve_fds[i] = -1;
  }
  for (size_t i = 0; i < app->nextra; i++)
    close(app->extra_fds[i]);
  app->nextra = 0;
}

void mtp_app_free(struct mtp_app *app) {
  if (app == NULL)
    return;
  mtp_free(app->workers);
  if (app->bound != app->bound0)
    mtp_free(app->bound);
  mtp_free(app->bound0);
  mtp_free(app->reserve_fds);
  mtp_free(app->pending_bound);
  mtp_free(app->pending_fds);
  mtp_free(app->pending_from);
  pthread_mutex_destroy(&app->lock);
  pthread_cond_destroy(&app->cond);
  mtp_free(app);
}
