/*
 * mtproxy-back - the Telegram side of split mode: Telegram's config, the DC pools and the
 * middle-proxy RPC connections, reached by remote fronts (mtproxy-front) over a mutually
 * authenticated TLS tunnel. Each worker thread runs one libuv loop holding a tunnel server
 * (its own SO_REUSEPORT socket on tunnel_listen) and the back worker whose in-process link the
 * tunnel's streams are mapped onto.
 *
 *   mtproxy-back certs init DIR        a private CA and the back's key and certificate
 *   mtproxy-back certs issue DIR NAME  a front's key and certificate, signed by DIR's CA
 *   mtproxy-back [OPTIONS]             run (--tunnel-listen, --tunnel-cert/-key/-ca, ...)
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"
#include "alloc.h"
#include "app.h"
#include "back.h"
#include "certs.h"
#include "config.h"
#include "err.h"
#include "log.h"
#include "main_common.h"
#include "metrics.h"
#include "tunnel_server.h"
#include "banned.h"

static const char k_usage[] =
    "Usage: mtproxy-back certs init DIR\n"
    "       mtproxy-back certs issue DIR NAME\n"
    "       mtproxy-back --tunnel-listen ADDR:PORT --tunnel-cert FILE --tunnel-key FILE --tunnel-ca FILE\n"
    "                    [OPTIONS]\n"
    "\n"
    "The Telegram side of split mode: fronts (mtproxy-front) dial ADDR:PORT over mutually\n"
    "authenticated TLS. 'certs init' writes DIR/ca.{crt,key} and DIR/back.{crt,key}; 'certs issue'\n"
    "writes DIR/NAME.{crt,key} for a front. Client listeners and secrets belong to the fronts and\n"
    "are ignored here. The options are those of mtproxy (see docs/split-mode.md):\n"
    "\n";

/* ---- certs ---- */

static int certs_main(int argc, char **argv) {
  char err[512];
  int rc;
  if (argc == 2 && strcmp(argv[0], "init") == 0) {
    rc = mtp_certs_init(argv[1], err, sizeof(err));
    if (rc == MTP_OK)
      printf("wrote %s/ca.crt, %s/ca.key, %s/back.crt, %s/back.key\n", argv[1], argv[1], argv[1], argv[1]);
  } else if (argc == 3 && strcmp(argv[0], "issue") == 0) {
    rc = mtp_certs_issue(argv[1], argv[2], err, sizeof(err));
    if (rc == MTP_OK)
      printf("wrote %s/%s.crt, %s/%s.key\n", argv[1], argv[2], argv[1], argv[2]);
  } else {
    fprintf(stderr, "mtproxy-back: certs: usage: mtproxy-back certs init DIR | mtproxy-back certs issue DIR NAME\n");
    return 2;
  }
  if (rc != MTP_OK) {
    fprintf(stderr, "mtproxy-back: certs %s: %s\n", argv[0], err[0] ? err : mtp_strerror(rc));
    return 2;
  }
  return 0;
}

/* ---- the back's workers ---- */

struct back_ctx {
  struct mtp_back *back;
  const struct mtp_config *cfg;            /* borrows */
  struct sockaddr_storage tunnel_bound;    /* the reserved tunnel_listen address */
};

struct back_worker {
  struct mtp_back_worker *back;
  struct mtp_tunnel_server *tunnel;
};

static int back_setup(struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct back_ctx *ctx = mtp_app_role_ctx(app);
  struct back_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  *state = w;
  int rc = mtp_back_worker_setup(&w->back, ctx->back, loop, index);
  if (rc != MTP_OK)
    return rc;
  char err[512] = "";
  rc = mtp_tunnel_server_setup(&w->tunnel, ctx->cfg, loop, index, &ctx->tunnel_bound, mtp_back_worker_link(w->back),
                               err, sizeof(err));
  if (rc != MTP_OK)
    mtp_log(MTP_LOG_ERROR, "worker %d: tunnel: %s", index, err[0] ? err : mtp_strerror(rc));
  return rc;
}

static void back_stop(void *state) {
  struct back_worker *w = state;
  if (w->tunnel != NULL)
    mtp_tunnel_server_stop(w->tunnel);
  if (w->back != NULL)
    mtp_back_worker_stop(w->back);
}

static void back_free(void *state) {
  struct back_worker *w = state;
  if (w == NULL)
    return;
  mtp_tunnel_server_free(w->tunnel);
  mtp_back_worker_free(w->back);
  mtp_free(w);
}

static struct back_ctx g_ctx;

/* /status: what the back knows of Telegram's config, and its fronts. */
static void admin_status(void *ctx, cJSON *st) {
  struct back_ctx *c = ctx;
  mtp_back_status_json(c->back, st);
  int64_t m[MTP_M__COUNT];
  mtp_metrics_sum(m);
  cJSON *tun = cJSON_AddObjectToObject(st, "tunnel");
  if (tun != NULL) {
    char addr[80];
    mtp_format_addr(&c->tunnel_bound, addr, sizeof(addr));
    cJSON_AddStringToObject(tun, "listen", addr);
    cJSON_AddNumberToObject(tun, "connections", (double)m[MTP_M_TUNNEL_UP]);
    cJSON_AddNumberToObject(tun, "streams", (double)m[MTP_M_TUNNEL_STREAMS]);
  }
}

/* /metrics: the back's per-DC and Telegram config families. */
static char *admin_metrics(void *ctx) { return mtp_back_metrics_text(((struct back_ctx *)ctx)->back); }

/* Signals, and a failed startup (app may be NULL then). */
static void on_stop(struct mtp_app *app) {
  mtp_app_stop(app);
  mtp_back_stop(g_ctx.back);
}

/* One line naming the missing or unreadable split-mode setting; NULL when all is there. */
static const char *check_tunnel_conf(const struct mtp_config *cfg, char *err, size_t errlen) {
  if (cfg->tunnel_listen == NULL)
    return "--tunnel-listen ADDR:PORT (or \"tunnel_listen\") is required: the address fronts dial";
  struct sockaddr_storage ss;
  if (mtp_parse_addr_port(cfg->tunnel_listen, &ss) != MTP_OK) {
    snprintf(err, errlen, "--tunnel-listen: '%.80s' is not ADDR:PORT (e.g. 0.0.0.0:8443)", cfg->tunnel_listen);
    return err;
  }
  return mtp_main_check_tunnel_files(cfg, "'mtproxy-back certs init DIR'", err, errlen);
}

static const struct mtp_main_opts k_main = {
    .prog = "mtproxy-back",
    .config_flags = MTP_CONFIG_NO_CLIENTS,
    .usage_head = k_usage,
    .check = check_tunnel_conf,
};

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 2 && strcmp(argv[1], "certs") == 0)
    return certs_main(argc - 2, argv + 2);
  struct mtp_config cfg;
  int status;
  if (!mtp_main_start(&k_main, argc, argv, &cfg, NULL, &status))
    return status;

  /* The back serves no clients itself: its view of the config has no listeners (they stay
   * owned by cfg and are freed with it). */
  struct mtp_config back_cfg = cfg;
  if (cfg.nlisteners > 0)
    mtp_log(MTP_LOG_WARN, "mtproxy-back ignores the %zu client listener%s of its config (they belong to the fronts)",
            cfg.nlisteners, cfg.nlisteners == 1 ? "" : "s");
  back_cfg.listeners = NULL;
  back_cfg.nlisteners = 0;
  g_ctx.cfg = &back_cfg;

  struct mtp_app *app = NULL;
  int rc = mtp_main_app_setup(&app, &back_cfg, on_stop);
  if (rc == MTP_OK) {
    struct sockaddr_storage want;
    mtp_parse_addr_port(back_cfg.tunnel_listen, &want); /* checked above */
    rc = mtp_app_reserve(app, &want, &g_ctx.tunnel_bound);
    if (rc != MTP_OK)
      mtp_log(MTP_LOG_ERROR, "tunnel: cannot bind %s: %s", back_cfg.tunnel_listen, mtp_strerror(rc));
  }
  if (rc == MTP_OK)
    rc = mtp_back_setup(&g_ctx.back, &back_cfg, mtp_app_loop(app));
  if (rc == MTP_OK) {
    struct mtp_admin_hooks hooks = {.ctx = &g_ctx, .status = admin_status, .metrics = admin_metrics};
    mtp_admin_add_hooks(mtp_app_admin(app), &hooks);
  }
  if (rc == MTP_OK && mtp_back_wait_ready(g_ctx.back, 30000) != MTP_OK && !mtp_app_is_stopping(app))
    mtp_log(MTP_LOG_WARN, "no Telegram config yet; fronts' clients are refused until one loads");
  struct mtp_app_role role = {
      .worker_setup = back_setup, .worker_stop = back_stop, .worker_free = back_free, .ctx = &g_ctx};
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    rc = mtp_app_start_workers(app, &role);
    if (rc == MTP_OK) {
      char s[80];
      mtp_format_addr(&g_ctx.tunnel_bound, s, sizeof(s));
      mtp_log(MTP_LOG_INFO, "tunnel listening on %s", s);
    }
  }
  mtp_main_run(app, rc, on_stop);
  mtp_back_free(g_ctx.back);
  mtp_app_free(app);
  return mtp_main_exit(&cfg, rc);
}
