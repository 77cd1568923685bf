/*
 * app.h - what the executables share: reserving listener ports, worker threads (one libuv
 * loop each), signal handling, the admin HTTP endpoint and printing the proxy links.
 * Only the mains in cmd/ use this; front/ and back/ don't know it exists.
 */
#ifndef MTP_APP_H
#define MTP_APP_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"

struct mtp_app;

/* Per-worker hooks an executable plugs in. They run on the worker's own thread. */
struct mtp_app_role {
  /* Sets up the worker's parts on loop; *state is the role's per-worker state. */
  int (*worker_setup)(struct mtp_app *app, uv_loop_t *loop, int index, void **state);
  /* Asks the worker's parts to close all their handles (the loop then ends). */
  void (*worker_stop)(void *state);
  /* Frees the worker's parts after its loop ended. */
  void (*worker_free)(void *state);
  void *ctx; /* the executable's context, for the hooks */
};

/* Creates the app on the default loop: registers the main thread's metrics, reserves the
 * listener ports (port 0 becomes a concrete free port), starts the admin endpoint if
 * configured. cfg is borrowed. */
int mtp_app_setup(struct mtp_app **out, const struct mtp_config *cfg);
uv_loop_t *mtp_app_loop(struct mtp_app *app);
const struct mtp_config *mtp_app_config(struct mtp_app *app);
/* The concrete addresses of cfg->listeners, in order. */
const struct sockaddr_storage *mtp_app_bound_addrs(struct mtp_app *app);
void *mtp_app_role_ctx(struct mtp_app *app);

/* Starts cfg->workers threads running role, waits until every one is set up (or one failed),
 * and logs the listeners. Returns MTP_OK or the first worker's error. */
int mtp_app_start_workers(struct mtp_app *app, const struct mtp_app_role *role);
/* Logs the tg:// and t.me links for every listener and secret. */
void mtp_app_print_links(struct mtp_app *app);

/* Installs SIGINT/SIGTERM handlers that call on_stop once, on the main loop. */
typedef void (*mtp_app_stop_cb)(struct mtp_app *app);
int mtp_app_handle_signals(struct mtp_app *app, mtp_app_stop_cb on_stop);
/* True once a stop signal has been handled. */
bool mtp_app_is_stopping(const struct mtp_app *app);
/* Stops the workers (joins their threads), the admin endpoint and the signal handlers. */
void mtp_app_stop(struct mtp_app *app);
/* Frees; after the main loop ended. NULL-safe. */
void mtp_app_free(struct mtp_app *app);

#endif
