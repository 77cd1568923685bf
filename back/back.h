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
