/*
 * mtproxy-front - the client side of split mode: listeners, client codecs and sessions, whose
 * packets travel to a remote mtproxy-back over a mutually authenticated TLS tunnel. Each worker
 * thread runs one libuv loop holding its listeners, its client sessions and its tunnel link
 * (its own tunnel connections to the back); a client's session and its tunnel stream sit on the
 * same loop.
 *
 *   mtproxy-front --back HOST:PORT --tunnel-cert FILE --tunnel-key FILE --tunnel-ca FILE
 *                 --port 443 --secret HEX [OPTIONS]
 */
#include <signal.h>
#include <string.h>

#include "admin.h"
#include "app.h"
#include "config.h"
#include "err.h"
#include "front.h"
#include "frontrole.h"
#include "frontsvc.h"
#include "links.h"
#include "log.h"
#include "main_common.h"
#include "metrics.h"
#include "reload.h"
#include "tunnel_link.h"
#include "banned.h"

static const char k_usage[] =
    "Usage: mtproxy-front --back HOST:PORT --tunnel-cert FILE --tunnel-key FILE --tunnel-ca FILE\n"
    "                     --port P --secret HEX [OPTIONS]\n"
    "\n"
    "The client side of split mode: serves Telegram apps on its listeners and carries their\n"
    "packets to mtproxy-back at HOST:PORT over mutually authenticated TLS. The certificate and\n"
    "key come from 'mtproxy-back certs issue DIR NAME' (DIR/NAME.crt, DIR/NAME.key), the CA is\n"
    "DIR/ca.crt. Telegram-side options are the back's and are ignored here. The options are\n"
    "those of mtproxy (see docs/split-mode.md):\n"
    "\n";

/* The front's process-wide services: replay cache, policy, probe, admin hooks (frontsvc.h). */
static struct mtp_frontsvc g_svc;

/* Each worker: a front worker (cmd/frontrole.h) over its own tunnel link to the back. On
 * SIGTERM the front stops accepting; the clients still open keep their tunnel streams. */
static int tunnel_setup(void *ctx, struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct mtp_tunnel_link *t = NULL;
  char err[512] = "";
  int rc = mtp_tunnel_link_setup(&t, mtp_app_config(app), loop, index, err, sizeof(err));
  *state = t;
  if (rc != MTP_OK)
    mtp_log(MTP_LOG_ERROR, "worker %d: tunnel: %s", index, err[0] ? err : mtp_strerror(rc));
  return rc;
}
static struct mtp_link *tunnel_link(void *state) { return mtp_tunnel_link_get(state); }
static void tunnel_stop(void *state) { mtp_tunnel_link_stop(state); }
static void tunnel_free(void *state) { mtp_tunnel_link_free(state); }

static const struct mtp_front_link_ops k_tunnel_link = {tunnel_setup, tunnel_link, tunnel_stop, tunnel_free};
static struct mtp_front_role g_role;

/* ---- the admin endpoint ---- */

/* /status: where the back is and how many tunnel connections to it are up. */
static void admin_status(void *ctx, cJSON *st) {
  const struct mtp_config *cfg = ctx;
  int64_t m[MTP_M__COUNT];
  mtp_metrics_sum(m);
  cJSON *b = cJSON_AddObjectToObject(st, "back");
  if (b == NULL)
    return;
  cJSON_AddStringToObject(b, "address", cfg->back);
  cJSON_AddNumberToObject(b, "tunnels_up", (double)m[MTP_M_TUNNEL_UP]);
  cJSON_AddNumberToObject(b, "tunnels_wanted", (double)cfg->workers * (double)cfg->tunnel_conns);
  cJSON_AddNumberToObject(b, "streams", (double)m[MTP_M_TUNNEL_STREAMS]);
}

/* Signals, and a failed startup (app may be NULL then). */
static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_frontsvc_stop(&g_svc);
}

/* One line naming the missing or unreadable split-mode setting; NULL when all is there. */
static const char *check_tunnel_conf(const struct mtp_config *cfg, char *err, size_t errlen) {
  if (cfg->back == NULL)
    return "--back HOST:PORT (or \"back\") is required: where mtproxy-back listens for fronts";
  return mtp_main_check_tunnel_files(cfg, "'mtproxy-back certs issue DIR NAME'", err, errlen);
}

static const struct mtp_main_opts k_main = {
    .prog = "mtproxy-front",
    .takes_qr = true,
    .usage_head = k_usage,
    .usage_tail = "\nmtproxy-front also takes --qr (print the links' QR codes even when stdout is not a\n"
                  "terminal) and the subcommand mtproxy-front link --help (the fake-TLS link of a domain).\n",
    .check = check_tunnel_conf,
};

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
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
    rc = mtp_frontsvc_setup(&g_svc, app, &cfg);
  if (rc == MTP_OK) {
    struct mtp_admin_hooks hooks = {.ctx = &cfg, .status = admin_status};
    mtp_admin_add_hooks(mtp_app_admin(app), &hooks);
    mtp_app_set_qr(app, qr);
    mtp_log(MTP_LOG_INFO, "back is %s", cfg.back);
  }
  mtp_front_role_init(&g_role, &k_tunnel_link, NULL, &g_svc);
  struct mtp_reload *reload = NULL;
  rc = mtp_front_role_start(&g_role, app, &cfg, rc, &reload);
  mtp_main_run(app, rc, on_stop);
  mtp_app_free(app);
  mtp_reload_free(reload); /* the workers are gone: frees the configuration now in force */
  mtp_frontsvc_free(&g_svc);
  return mtp_main_exit(&cfg, rc);
}
