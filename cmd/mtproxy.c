/*
 * mtproxy - front and back in one process, joined by the in-process link.
 * Each worker thread runs one libuv loop holding its listeners, client sessions and DC
 * connections; a client's session and its back stream sit on the same loop.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"
#include "alloc.h"
#include "app.h"
#include "back.h"
#include "config.h"
#include "ctl.h"
#include "err.h"
#include "front.h"
#include "links.h"
#include "log.h"
#include "frontsvc.h"
#include "policy.h"
#include "reload.h"
#include "banned.h"

/* The front's process-wide services (replay cache, policy, TLS probe, own addresses); the
 * workers get g_front.shared. Filled in main before the workers start. */
static struct mtp_frontsvc g_front;

struct both_worker {
  struct mtp_back_worker *back;
  struct mtp_front_worker *front;
};

static int both_setup(struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct mtp_back *back = mtp_app_role_ctx(app);
  struct both_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  *state = w;
  int rc = mtp_back_worker_setup(&w->back, back, loop, index);
  if (rc != MTP_OK)
    return rc;
  return mtp_front_worker_setup(&w->front, mtp_app_config(app), mtp_app_bound_addrs(app), loop,
                                mtp_back_worker_link(w->back), index, &g_front.shared);
}

static void both_stop(void *state) {
  struct both_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop(w->front);
  if (w->back != NULL)
    mtp_back_worker_stop(w->back);
}

/* SIGTERM drain: the front stops accepting; the back keeps carrying the remaining clients. */
static void both_drain(void *state) {
  struct both_worker *w = state;
  mtp_front_worker_stop_accepting(w->front);
}

/* Reload (cmd/reload.h): the front worker each worker's state holds. */
static struct mtp_front_worker *both_front(void *state) { return ((struct both_worker *)state)->front; }

static size_t both_nclients(void *state) {
  struct both_worker *w = state;
  return mtp_front_worker_nclients(w->front);
}

static void both_free(void *state) {
  struct both_worker *w = state;
  if (w == NULL)
    return;
  mtp_front_worker_free(w->front);
  mtp_back_worker_free(w->back);
  mtp_free(w);
}

static struct mtp_back *g_back;

/* /status and /metrics: Telegram's config (source, age, fetches) and the DC pools. */
static void admin_status(void *ctx, cJSON *st) { mtp_back_status_json(g_back, st); }
static char *admin_metrics(void *ctx) { return mtp_back_metrics_text(g_back); }

static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_back_stop(g_back);
  mtp_frontsvc_stop(&g_front);
}

int main(int argc, char **argv) {
  struct mtp_config cfg;
  char err[512];
  bool help = false;
  signal(SIGPIPE, SIG_IGN);
  if (argc > 1 && strcmp(argv[1], "ctl") == 0)
    return mtp_ctl_main(argc - 1, argv + 1);
  if (argc > 1 && strcmp(argv[1], "link") == 0)
    return mtp_links_main(argc - 1, argv + 1);
  /* --qr (print the links' QR codes even when stdout is not a terminal) is ours, not a setting. */
  bool qr = false;
  int nargs = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--qr") == 0)
      qr = true;
    else
      argv[1 + nargs++] = argv[i];
  }
  argc = 1 + nargs;
  if (mtp_config_load(argc - 1, argv + 1, &cfg, &help, err, sizeof(err)) != MTP_OK) {
    fprintf(stderr, "mtproxy: %s\n", err);
    return 2;
  }
  if (help) {
    fputs(mtp_config_usage, stdout);
    fputs("\nmtproxy also takes --qr (print the links' QR codes even when stdout is not a terminal),\n"
          "and two subcommands: mtproxy ctl --help (talk to a running proxy's admin endpoint) and\n"
          "mtproxy link --help (the fake-TLS link of a domain).\n",
          stdout);
    return 0;
  }
  mtp_log_level = cfg.log_level;
  if (cfg.log_debug != NULL && mtp_log_set_debug_modules(cfg.log_debug) != MTP_OK)
    mtp_log(MTP_LOG_WARN, "log_debug '%s': bad module list; ignored", cfg.log_debug);

  struct mtp_app *app = NULL;
  int rc = mtp_app_setup(&app, &cfg);
  /* Signals first: a SIGTERM that arrives while we start must stop us cleanly, not kill us. */
  if (rc == MTP_OK)
    rc = mtp_app_handle_signals(app, on_stop);
  if (rc == MTP_OK)
    rc = mtp_back_setup(&g_back, &cfg, mtp_app_loop(app));
  if (rc == MTP_OK)
    rc = mtp_frontsvc_setup(&g_front, app, &cfg);
  struct mtp_policy *policy = g_front.policy;
  if (rc == MTP_OK) {
    struct mtp_admin_hooks hooks = {.status = admin_status, .metrics = admin_metrics};
    mtp_admin_add_hooks(mtp_app_admin(app), &hooks);
    mtp_app_set_qr(app, qr);
  }
  if (rc == MTP_OK && mtp_back_wait_ready(g_back, 30000) != MTP_OK && !mtp_app_is_stopping(app))
    mtp_log(MTP_LOG_WARN, "no Telegram config yet; clients are refused until one loads");
  struct mtp_app_role role = {both_setup, both_stop, both_free, g_back, both_drain, both_nclients};
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    rc = mtp_app_start_workers(app, &role);
    if (rc == MTP_OK)
      mtp_app_print_links(app);
  }
  struct mtp_reload *reload = NULL;
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    struct mtp_reload_opts ro = {.app = app, .cfg = &cfg, .policy = policy, .frontsvc = &g_front, .front_of = both_front};
    rc = mtp_reload_setup(&reload, &ro);
  }
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "startup failed: %s", mtp_strerror(rc));
    if (app != NULL)
      mtp_app_stop(app);
    if (g_back != NULL)
      mtp_back_stop(g_back);
    mtp_frontsvc_stop(&g_front);
  }
  uv_run(uv_default_loop(), UV_RUN_DEFAULT);
  mtp_back_free(g_back);
  mtp_app_free(app);
  mtp_reload_free(reload); /* the workers are gone: frees the configuration now in force */
  mtp_frontsvc_free(&g_front);
  uv_loop_close(uv_default_loop());
  mtp_config_free(&cfg);
  mtp_log(MTP_LOG_INFO, "stopped");
  return rc == MTP_OK ? 0 : 1;
}
