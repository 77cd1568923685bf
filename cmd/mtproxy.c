/*
 * mtproxy - front and back in one process, joined by the in-process link.
 * Each worker thread runs one libuv loop holding its listeners, client sessions and DC
 * connections; a client's session and its back stream sit on the same loop.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "app.h"
#include "back.h"
#include "config.h"
#include "err.h"
#include "front.h"
#include "log.h"
#include "banned.h"

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
                                mtp_back_worker_link(w->back), index, NULL);
}

static void both_stop(void *state) {
  struct both_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop(w->front);
  if (w->back != NULL)
    mtp_back_worker_stop(w->back);
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

static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_back_stop(g_back);
}

int main(int argc, char **argv) {
  struct mtp_config cfg;
  char err[512];
  bool help = false;
  signal(SIGPIPE, SIG_IGN);
  if (mtp_config_load(argc - 1, argv + 1, &cfg, &help, err, sizeof(err)) != MTP_OK) {
    fprintf(stderr, "mtproxy: %s\n", err);
    return 2;
  }
  if (help) {
    fputs(mtp_config_usage, stdout);
    return 0;
  }
  mtp_log_level = cfg.log_level;

  struct mtp_app *app = NULL;
  int rc = mtp_app_setup(&app, &cfg);
  /* Signals first: a SIGTERM that arrives while we start must stop us cleanly, not kill us. */
  if (rc == MTP_OK)
    rc = mtp_app_handle_signals(app, on_stop);
  if (rc == MTP_OK)
    rc = mtp_back_setup(&g_back, &cfg, mtp_app_loop(app));
  if (rc == MTP_OK && mtp_back_wait_ready(g_back, 30000) != MTP_OK && !mtp_app_is_stopping(app))
    mtp_log(MTP_LOG_WARN, "no Telegram config yet; clients are refused until one loads");
  struct mtp_app_role role = {both_setup, both_stop, both_free, g_back};
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    rc = mtp_app_start_workers(app, &role);
    if (rc == MTP_OK)
      mtp_app_print_links(app);
  }
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "startup failed: %s", mtp_strerror(rc));
    if (app != NULL)
      mtp_app_stop(app);
    if (g_back != NULL)
      mtp_back_stop(g_back);
  }
  uv_run(uv_default_loop(), UV_RUN_DEFAULT);
  mtp_back_free(g_back);
  mtp_app_free(app);
  uv_loop_close(uv_default_loop());
  mtp_config_free(&cfg);
  mtp_log(MTP_LOG_INFO, "stopped");
  return rc == MTP_OK ? 0 : 1;
}
