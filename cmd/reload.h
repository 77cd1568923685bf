/*
 * reload.h - hot reload of a front's configuration: SIGHUP, POST /reload and `mtproxy ctl
 * reload` all end here (through the app's reload hook, cmd/app.h), on the main thread.
 *
 *   mtp_config_reload (re-read the file with the original argv)  ── invalid ──► refused, reason
 *     │                                                                           returned, the
 *   reserve the ports of new listeners (unchanged ones keep theirs) ── bind error ─┤ old config
 *     │                                                                           stays in force
 *   policy reconfigure (rules, tables) ─────────────────────────────── error ─────┘
 *     │  (from here on it cannot fail)
 *   the app takes the new config (/status, /links, drain); removed listeners' ports released
 *     │
 *   front services (frontsvc): certificate-flight probe follows (or starts), public addresses
 *     │
 *   every worker, on its own loop: keep unchanged listening sockets (pointed at the new listener
 *   conf), open new ones, close removed ones, switch to the new generation and the services
 *     │  (fronting's settings and own addresses follow) ─────────── the call returns when all did
 *   what the workers can no longer read is freed (the probe's old domain table)
 *     │
 *   log level / debug modules (only when the file changed them), summary log line
 *
 * Configuration generations (front.h): each successful reload makes a generation on the heap
 * (the config and its listeners' concrete addresses). The startup config is generation 0 and is
 * never freed (main owns it). A session keeps the generation it was accepted under, so
 * connections already established keep their listener, secrets, ad_tag and timeouts until they
 * end; new connections get the new ones. A generation is freed by whoever drops its last
 * reference: this object when the next reload replaces it and no session uses it any more, or
 * the worker thread where its last session ends.
 *
 * The back is not reconfigured: it gets what changes per stream (ad_tag, listener) with each
 * stream the front opens. Restart-only settings (mtp_config_reload) keep their old values; the
 * reload succeeds and says which were ignored.
 */
#ifndef MTP_CMD_RELOAD_H
#define MTP_CMD_RELOAD_H

#include <stddef.h>

#include "app.h"
#include "config.h"

struct mtp_reload;
struct mtp_policy;
struct mtp_front_worker;
struct mtp_frontsvc;

/* How long the reload waits for every worker to apply a new configuration. */
#define MTP_RELOAD_WORKER_TIMEOUT_MS 10000

struct mtp_reload_opts {
  struct mtp_app *app;          /* borrows */
  const struct mtp_config *cfg; /* borrows: the startup config (generation 0); outlives this */
  struct mtp_policy *policy;    /* borrows; NULL = no policy */
  /* borrows; NULL = the front services stay as set up: the certificate-flight probe keeps its
   * startup domains and settings, the public addresses stay, and no probe is created by a
   * reload that turns fake-TLS on. */
  struct mtp_frontsvc *frontsvc;
  /* The front worker inside a role's per-worker state (NULL: that worker has none). */
  struct mtp_front_worker *(*front_of)(void *worker_state);
};

/* Creates it and makes it the app's reload hook (mtp_app_set_reload). Call after
 * mtp_app_start_workers succeeded. Returns MTP_OK or MTP_ENOMEM. */
int mtp_reload_setup(struct mtp_reload **out, const struct mtp_reload_opts *opts);

/*
 * One reload (the hook; main thread). Returns MTP_OK once every worker applied the new
 * configuration (or, after MTP_RELOAD_WORKER_TIMEOUT_MS, with the slow ones still to apply it:
 * logged); otherwise the configuration in force is unchanged and err holds one line: the config
 * error (MTP_EINVAL), a listener that cannot bind, a policy error, "the proxy is stopping"
 * (MTP_ECLOSED) or "a worker has not applied the previous reload yet" (MTP_ETIMEDOUT).
 * Logging and counting the result is the app's (mtp_app_set_reload).
 */
int mtp_reload_run(struct mtp_reload *r, char *err, size_t errlen);

/* The configuration in force. Main thread. */
const struct mtp_config *mtp_reload_config(const struct mtp_reload *r);

/* Frees it and the current generation; after the workers were joined (mtp_app_stop) and
 * freed. NULL-safe. */
void mtp_reload_free(struct mtp_reload *r);

#endif
