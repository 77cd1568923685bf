/*
 * mtproxy - front and back in one process, joined by the in-process link.
 * Each worker thread runs one libuv loop holding its listeners, client sessions and DC
 * connections; a client's session and its back stream sit on the same loop.
 */
#include <signal.h>
#include <string.h>

#include "admin.h"
#include "app.h"
#include "back.h"
#include "config.h"
#include "ctl.h"
#include "err.h"
#include "front.h"
#include "links.h"
#include "log.h"
#include "frontrole.h"
#include "frontsvc.h"
#include "main_common.h"
#include "policy.h"
#include "reload.h"
#include "banned.h"

/* The front's process-wide services (replay cache, policy, TLS probe, own addresses); the
 * workers get g_front.shared. Filled in main before the workers start. */
static struct mtp_frontsvc g_front;

/* Each worker: a front worker (cmd/frontrole.h) over the in-process link of a back worker on
 * the same loop; ctx is the process's back. On SIGTERM the front stops accepting and the back
 * keeps carrying the remaining clients. */
static int back_link_setup(void *ctx, struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct mtp_back_worker *bw = NULL;
  int rc = mtp_back_worker_setup(&bw, ctx, loop, index);
  *state = bw;
  return rc;
}
static struct mtp_link *back_link(void *state) { return mtp_back_worker_link(state); }
static void back_link_stop(void *state) { mtp_back_worker_stop(state); }
static void back_link_free(void *state) { mtp_back_worker_free(state); }

static const struct mtp_front_link_ops k_back_link = {back_link_setup, back_link, back_link_stop, back_link_free};
static struct mtp_front_role g_role;

static struct mtp_back *g_back;

/* /status and /metrics: Telegram's config (source, age, fetches) and the DC pools. */
static void admin_status(void *ctx, cJSON *st) { mtp_back_status_json(g_back, st); }
static char *admin_metrics(void *ctx) { return mtp_back_metrics_text(g_back); }

/* Signals, and a failed startup (app may be NULL then). */
static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_back_stop(g_back);
  mtp_frontsvc_stop(&g_front);
}

static const struct mtp_main_opts k_main = {
    .prog = "mtproxy",
    .takes_qr = true,
    .usage_tail = "\nmtproxy also takes --qr (print the links' QR codes even when stdout is not a terminal),\n"
                  "and two subcommands: mtproxy ctl --help (talk to a running proxy's admin endpoint) and\n"
                  "mtproxy link --help (the fake-TLS link of a domain).\n",
};

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc > 1 && strcmp(argv[1], "ctl") == 0)
    return mtp_ctl_main(argc - 1, argv + 1);
  if (argc > 1 && strcmp(argv[1], "link") == 0)
    return mtp_links_main(argc - 1, argv + 1);
  struct mtp_config cfg;
  bool qr = false;
  int status;
  if (!mtp_main_start(&k_main, argc, argv, &cfg, &qr, &status))
    return status;

  struct mtp_app *app = NULL;
  int rc = mtp_main_app_setup(&app, &cfg, on_stop);
  if (rc == MTP_OK)
    rc = mtp_back_setup(&g_back, &cfg, mtp_app_loop(app));
  if (rc == MTP_OK)
    rc = mtp_frontsvc_setup(&g_front, app, &cfg);
  if (rc == MTP_OK) {
    struct mtp_admin_hooks hooks = {.status = admin_status, .metrics = admin_metrics};
    mtp_admin_add_hooks(mtp_app_admin(app), &hooks);
    mtp_app_set_qr(app, qr);
  }
  if (rc == MTP_OK && mtp_back_wait_ready(g_back, 30000) != MTP_OK && !mtp_app_is_stopping(app))
    mtp_log(MTP_LOG_WARN, "no Telegram config yet; clients are refused until one loads");
  mtp_front_role_init(&g_role, &k_back_link, g_back, &g_front);
  struct mtp_reload *reload = NULL;
  rc = mtp_front_role_start(&g_role, app, &cfg, rc, &reload);
  mtp_main_run(app, rc, on_stop);
  mtp_back_free(g_back);
  mtp_app_free(app);
  mtp_reload_free(reload); /* the workers are gone: frees the configuration now in force */
  mtp_frontsvc_free(&g_front);
  return mtp_main_exit(&cfg, rc);
}
