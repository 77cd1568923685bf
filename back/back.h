/*
 * back.h - the back half: Telegram's config and proxy secret (fetched, refreshed, cached),
 * and per worker the DC pools of multiplexed middle-proxy RPC connections.
 *
 *   struct mtp_back         one per process; lives on the main loop (fetch + refresh timer);
 *                           publishes an immutable, refcounted snapshot to the workers.
 *   struct mtp_back_worker  one per worker loop; DC pools and RPC connections; offers the
 *                           in-process link (struct mtp_link) that the front of the same
 *                           worker uses.
 */
#ifndef MTP_BACK_H
#define MTP_BACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "link.h"
#include "tgconfig.h"

struct mtp_back;
struct mtp_back_worker;

/* An immutable Telegram config snapshot shared by the workers. */
struct mtp_tg_snapshot {
  struct mtp_tgconfig cfg;
  uint8_t *secret; /* owns: the proxy secret (binary) */
  size_t secret_len;
  /* private */
  _Atomic int _refs;
};
void mtp_tg_snapshot_release(struct mtp_tg_snapshot *s);

/*
 * Creates the back on main_loop: loads the Telegram config (from the cache first, if any,
 * then from the configured sources in the background) and starts the refresh timer.
 * cfg is borrowed and must outlive the back. Returns MTP_OK or an error (logged).
 */
int mtp_back_setup(struct mtp_back **out, const struct mtp_config *cfg, uv_loop_t *main_loop);

/* The current snapshot with a reference taken (release with mtp_tg_snapshot_release), or NULL
 * while no config has been loaded. Thread-safe. */
struct mtp_tg_snapshot *mtp_back_snapshot(struct mtp_back *b);

/* Blocks (on the main thread, at start only) until a first config is loaded or timeout_ms
 * passes, running main_loop. Returns MTP_OK or MTP_ENOCONFIG. */
int mtp_back_wait_ready(struct mtp_back *b, uint64_t timeout_ms);

/* Stops the timers and in-flight fetches (handles close asynchronously on main_loop). */
void mtp_back_stop(struct mtp_back *b);
/* Frees; call after main_loop has finished. NULL-safe. */
void mtp_back_free(struct mtp_back *b);

/*
 * Adds "telegram" to the admin /status object (borrowed): config_loaded; source ("url",
 * "file" or "cache": where the middle-proxy list in force came from), location (that URL
 * without credentials or query, or path), secret_source; loaded_at (unix time it was put in
 * force); age_s (seconds since the older of its two parts was taken from its source; for the
 * cache, since the cache file was written); last_fetch_ok (unix time of the last fetch that
 * loaded both parts), last_fetch_error (why the latest fetch failed, null when it did not),
 * fetches_ok, fetches_failed (fetch rounds); middle_proxies, default_dc; dcs: [{dc, addrs,
 * connections, clients}] for every DC the config lists or a worker has a pool for (DCs -5..5,
 * the others summed as "dc": "other"). Fields without a value are null. Thread-safe; does not
 * block beyond short locks.
 */
struct cJSON;
void mtp_back_status_json(struct mtp_back *b, struct cJSON *status);

/*
 * The back's Prometheus families (HELP and TYPE included, each family contiguous) for the admin
 * metrics hook: mtproxy_rpc_connections_by_dc, mtproxy_rpc_clients_by_dc (gauges),
 * mtproxy_rpc_pool_growth_total, mtproxy_rpc_rotations_total (counters), all {dc="N"} with
 * the same DC rule as the status; mtproxy_telegram_config_loaded and
 * mtproxy_telegram_config_age_seconds (gauges; the age has no sample while nothing is loaded).
 * The workers' numbers are summed at the call, with relaxed loads. Returns a mtp_malloc'ed
 * string (transfers), or NULL on ENOMEM. Thread-safe.
 */
char *mtp_back_metrics_text(struct mtp_back *b);

/* Per-worker part. Runs on `loop` (the worker's thread). */
int mtp_back_worker_setup(struct mtp_back_worker **out, struct mtp_back *b, uv_loop_t *loop, int index);
/* The in-process link for the front on the same loop. Borrowed from the worker. */
struct mtp_link *mtp_back_worker_link(struct mtp_back_worker *w);
/* Closes every stream (on_close with MTP_LINK_CLOSE_SHUTDOWN) and every handle; the loop
 * then ends once the front has closed too. Call on the worker's thread. */
void mtp_back_worker_stop(struct mtp_back_worker *w);
/* Frees; call after the worker's loop has finished. NULL-safe. */
void mtp_back_worker_free(struct mtp_back_worker *w);

#endif
