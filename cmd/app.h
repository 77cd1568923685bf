/*
 * app.h - what the executables share: reserving listener ports, worker threads (one libuv
 * loop each), signal handling and the SIGTERM drain, systemd notification, the admin HTTP
 * endpoint (cmd/admin.h) and printing the proxy links (cmd/links.h).
 * Only the mains in cmd/ use this; front/ and back/ don't know it exists.
 *
 * Life of the process:
 *   setup (ports, admin) -> start_workers (READY=1) -> running
 *     SIGINT                       -> STOPPING=1, on_stop at once
 *     SIGTERM                      -> STOPPING=1, drain: each worker's worker_drain (stop
 *                                     accepting); when every worker's worker_nclients is 0 or
 *                                     drain_timeout passed -> on_stop. A second SIGTERM or
 *                                     SIGINT -> on_stop at once. Roles without the drain hooks,
 *                                     or drain_timeout 0, stop at once.
 *     SIGHUP / POST /reload        -> RELOADING=1, the reload hook, READY=1
 */
#ifndef MTP_APP_H
#define MTP_APP_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "config.h"

struct mtp_app;
struct mtp_admin;

/* Per-worker hooks an executable plugs in. They run on the worker's own thread. */
struct mtp_app_role {
  /* Sets up the worker's parts on loop; *state is the role's per-worker state. */
  int (*worker_setup)(struct mtp_app *app, uv_loop_t *loop, int index, void **state);
  /* Asks the worker's parts to close all their handles (the loop then ends). */
  void (*worker_stop)(void *state);
  /* Frees the worker's parts after its loop ended. */
  void (*worker_free)(void *state);
  void *ctx; /* the executable's context, for the hooks */
  /* Optional, both or neither (then SIGTERM stops at once). worker_drain stops accepting new
   * clients and leaves the others running; worker_nclients counts the clients still open
   * (called on the worker's thread every second, every 20 ms while draining). */
  void (*worker_drain)(void *state);
  size_t (*worker_nclients)(void *state);
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
/* Reserves one more port the way listener ports are (SO_REUSEPORT, bound by the main thread
 * and held until mtp_app_stop, so the workers' sockets can bind it too; port 0 becomes a
 * concrete free port, given in *got). For the back's tunnel_listen. At most 4 per app.
 * Returns MTP_OK or the bind error. */
int mtp_app_reserve(struct mtp_app *app, const struct sockaddr_storage *want, struct sockaddr_storage *got);

/* Starts cfg->workers threads running role, waits until every one is set up (or one failed),
 * and logs the listeners. Returns MTP_OK or the first worker's error. */
int mtp_app_start_workers(struct mtp_app *app, const struct mtp_app_role *role);
/* Logs the tg:// and t.me links for every listener and secret (cmd/links.h), and prints
 * their QR codes to stdout when it is a terminal or mtp_app_set_qr(app, true) was called. */
void mtp_app_print_links(struct mtp_app *app);
void mtp_app_set_qr(struct mtp_app *app, bool on);

/* The admin endpoint, or NULL when it is off. The executable adds its hooks with
 * mtp_admin_add_hooks (NULL-safe); the app has added /status's process part and /links. */
struct mtp_admin *mtp_app_admin(struct mtp_app *app);

/* Reloads the configuration: MTP_OK, or an error with a one-line reason in err (the old
 * configuration must then still be in force). Runs on the main loop. */
typedef int (*mtp_app_reload_fn)(void *ctx, char *err, size_t errlen);
/* Sets the reload hook that SIGHUP and POST /reload call. The app notifies systemd
 * (RELOADING=1, then READY=1), logs and counts the result (mtproxy_config_reloads_total);
 * fn must not. Without it SIGHUP is ignored (logged) and POST /reload answers 501. */
void mtp_app_set_reload(struct mtp_app *app, mtp_app_reload_fn fn, void *ctx);

/*
 * What a reload (cmd/reload.h) needs from the app. Main thread, from inside the reload hook.
 *
 * mtp_app_listeners_prepare reserves the listener ports of cfg, the configuration about to
 * replace the current one: a listener that keeps its socket (mtp_listener_conf_same_socket with
 * a current one) keeps its concrete address and its reservation; any other is bound as at setup
 * (port 0 becomes a concrete free port). Returns MTP_OK, after which the concrete addresses
 * (cfg->nlisteners, in order) are at mtp_app_listeners_pending until exactly one of commit or
 * abort; or the bind error / MTP_ENOMEM with one line in err naming the listener (nothing
 * reserved, the current configuration unchanged).
 * mtp_app_listeners_commit makes cfg the app's configuration (borrowed from then on; it must
 * outlive the app or be replaced by the next commit first): the reservations of listeners that
 * are gone are released, /status, /links and the drain use cfg. Cannot fail.
 * mtp_app_listeners_abort releases what prepare reserved. Idempotent.
 */
int mtp_app_listeners_prepare(struct mtp_app *app, const struct mtp_config *cfg, char *err, size_t errlen);
const struct sockaddr_storage *mtp_app_listeners_pending(const struct mtp_app *app);
void mtp_app_listeners_commit(struct mtp_app *app, const struct mtp_config *cfg);
void mtp_app_listeners_abort(struct mtp_app *app);

/*
 * Runs fn(state, index, arg) once on every running worker's own thread (through a uv_async;
 * state is the role's per-worker state) and waits until all have run it or timeout_ms passed.
 * The workers run it concurrently. Returns MTP_OK (all ran it: what they wrote is visible
 * here), MTP_ETIMEDOUT (some have not yet: they still will, so arg must stay valid until they
 * did), MTP_EEXIST (a worker has not run the previous call yet; nothing posted) or
 * MTP_ECLOSED (workers not up, or stopping; nothing posted). Main thread.
 */
typedef void (*mtp_app_worker_fn)(void *state, int index, void *arg);
int mtp_app_call_workers(struct mtp_app *app, mtp_app_worker_fn fn, void *arg, int timeout_ms);

/* Installs SIGINT/SIGTERM/SIGHUP handlers (see the top of this file); on_stop is called once,
 * on the main loop, and must call mtp_app_stop. */
typedef void (*mtp_app_stop_cb)(struct mtp_app *app);
int mtp_app_handle_signals(struct mtp_app *app, mtp_app_stop_cb on_stop);
/* True once a stop signal has been handled. */
bool mtp_app_is_stopping(const struct mtp_app *app);
/* True while a SIGTERM drain is going on. */
bool mtp_app_is_draining(const struct mtp_app *app);
/* Stops the workers (joins their threads), the drain, the admin endpoint and the signal
 * handlers. NULL-safe. */
void mtp_app_stop(struct mtp_app *app);
/* Frees; after the main loop ended. NULL-safe. */
void mtp_app_free(struct mtp_app *app);

#endif
