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
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "admin.h"
#include "alloc.h"
#include "app.h"
#include "config.h"
#include "err.h"
#include "front.h"
#include "frontsvc.h"
#include "links.h"
#include "log.h"
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

struct front_worker {
  struct mtp_tunnel_link *tunnel;
  struct mtp_front_worker *front;
};

/* The front's process-wide services: replay cache, policy, probe, admin hooks (frontsvc.h). */
static struct mtp_frontsvc g_svc;

static int front_setup(struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct front_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  *state = w;
  char err[512] = "";
  int rc = mtp_tunnel_link_setup(&w->tunnel, mtp_app_config(app), loop, index, err, sizeof(err));
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "worker %d: tunnel: %s", index, err[0] ? err : mtp_strerror(rc));
    return rc;
  }
  return mtp_front_worker_setup(&w->front, mtp_app_config(app), mtp_app_bound_addrs(app), loop,
                                mtp_tunnel_link_get(w->tunnel), index, &g_svc.shared);
}

static void front_stop(void *state) {
  struct front_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop(w->front);
  if (w->tunnel != NULL)
    mtp_tunnel_link_stop(w->tunnel);
}

/* SIGTERM drain: stop accepting; the clients still open keep their tunnel streams. */
static void front_drain(void *state) {
  struct front_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop_accepting(w->front);
}

static size_t front_nclients(void *state) {
  struct front_worker *w = state;
  return w->front != NULL ? mtp_front_worker_nclients(w->front) : 0;
}

/* Reload (cmd/reload.h): the front worker each worker's state holds. */
static struct mtp_front_worker *front_of(void *state) { return ((struct front_worker *)state)->front; }

static void front_free(void *state) {
  struct front_worker *w = state;
  if (w == NULL)
    return;
  mtp_front_worker_free(w->front);
  mtp_tunnel_link_free(w->tunnel);
  mtp_free(w);
}

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

static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_frontsvc_stop(&g_svc);
}

/* One line naming the missing or unreadable split-mode setting; NULL when all is there. */
static const char *check_tunnel_conf(const struct mtp_config *cfg, char *err, size_t errlen) {
  if (cfg->back == NULL)
    return "--back HOST:PORT (or \"back\") is required: where mtproxy-back listens for fronts";
  const struct {
    const char *flag;
    const char *path;
  } files[] = {{"--tunnel-cert", cfg->tunnel_cert}, {"--tunnel-key", cfg->tunnel_key}, {"--tunnel-ca", cfg->tunnel_ca}};
  for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
    if (files[i].path == NULL) {
      snprintf(err, errlen, "%s FILE is required (made by 'mtproxy-back certs issue DIR NAME')", files[i].flag);
      return err;
    }
    if (access(files[i].path, R_OK) != 0) {
      snprintf(err, errlen, "%s: cannot read '%.200s': %s", files[i].flag, files[i].path, strerror(errno));
      return err;
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  struct mtp_config cfg;
  char err[512];
  bool help = false;
  signal(SIGPIPE, SIG_IGN);
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
    fprintf(stderr, "mtproxy-front: %s\n", err);
    return 2;
  }
  if (help) {
    fputs(k_usage, stdout);
    fputs(mtp_config_usage, stdout);
    fputs("\nmtproxy-front also takes --qr (print the links' QR codes even when stdout is not a\n"
          "terminal) and the subcommand mtproxy-front link --help (the fake-TLS link of a domain).\n",
          stdout);
    return 0;
  }
  const char *bad = check_tunnel_conf(&cfg, err, sizeof(err));
  if (bad != NULL) {
    fprintf(stderr, "mtproxy-front: %s\n", bad);
    mtp_config_free(&cfg);
    return 2;
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
    rc = mtp_frontsvc_setup(&g_svc, app, &cfg);
  if (rc == MTP_OK) {
    struct mtp_admin_hooks hooks = {.ctx = &cfg, .status = admin_status};
    mtp_admin_add_hooks(mtp_app_admin(app), &hooks);
    mtp_app_set_qr(app, qr);
    mtp_log(MTP_LOG_INFO, "back is %s", cfg.back);
  }
  struct mtp_app_role role = {.worker_setup = front_setup,
                              .worker_stop = front_stop,
                              .worker_free = front_free,
                              .worker_drain = front_drain,
                              .worker_nclients = front_nclients};
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    rc = mtp_app_start_workers(app, &role);
    if (rc == MTP_OK)
      mtp_app_print_links(app);
  }
  struct mtp_reload *reload = NULL;
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    struct mtp_reload_opts ro = {.app = app, .cfg = &cfg, .policy = g_svc.policy, .front_of = front_of};
    rc = mtp_reload_setup(&reload, &ro);
  }
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "startup failed: %s", mtp_strerror(rc));
    if (app != NULL)
      mtp_app_stop(app);
    mtp_frontsvc_stop(&g_svc);
  }
  uv_run(uv_default_loop(), UV_RUN_DEFAULT);
  mtp_app_free(app);
  mtp_reload_free(reload); /* the workers are gone: frees the configuration now in force */
  mtp_frontsvc_free(&g_svc);
  uv_loop_close(uv_default_loop());
  mtp_config_free(&cfg);
  mtp_log(MTP_LOG_INFO, "stopped");
  return rc == MTP_OK ? 0 : 1;
}
