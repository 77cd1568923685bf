/*
 * lstats.h - client connections by listener: per-worker, per-listener counters that nothing on
 * the hot path locks, summed by listener name when /metrics or /status asks.
 *
 *   worker 0: [l0 block] [l1 block]      each block: accepted, active, handshakes by protocol
 *   worker 1: [l0 block] [l1 block]      written only by its worker (relaxed atomics)
 *        └──────── registry (mutex) ────────┘
 *   scrape (main thread): lock, sum the blocks by name, unlock
 *
 * A worker takes one block per listener name when it opens the listener (setup, reload) and
 * hands its pointer to every session accepted there; a session counts itself in it from
 * accept until it is freed, so the counts follow the generation a session was accepted under.
 * The mutex is taken to add or remove a block (worker setup, reload, worker free) and by the
 * scrape, never per connection or per packet.
 *
 * Lifetime: a block stays while its listener is configured or while a client of that
 * listener is open on any worker. At each reload a worker removes its blocks of listeners the
 * new configuration no longer has and that no worker has clients of (mtp_lstats_sweep);
 * blocks of a removed listener with clients left are removed at a later reload or when their
 * worker is freed. So while a removed listener is listed its sums still cover every worker.
 * The sums (mtp_lstats_sum) list the configured listeners, then any other listener with
 * clients still open, so a removed listener drops out of the output once its last client has
 * gone. A listener name that comes back later gets its old block if it is still there (its
 * counters go on), else a new one (they restart at 0, as Prometheus counters may).
 */
#ifndef MTP_FRONT_LSTATS_H
#define MTP_FRONT_LSTATS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

enum mtp_lstat {
  MTP_LSTAT_ACCEPTED,        /* client TCP connections accepted (counter) */
  MTP_LSTAT_ACTIVE,          /* client connections open now, handshake included (gauge) */
  MTP_LSTAT_HS_ABRIDGED,     /* successful handshakes by outer protocol (counters): plain */
  MTP_LSTAT_HS_INTERMEDIATE, /*   obfuscated2 by its framing, ... */
  MTP_LSTAT_HS_SECURE,
  MTP_LSTAT_HS_FAKE_TLS,     /* ... and fake-TLS, whatever framing is inside */
  MTP_LSTAT__COUNT
};

/* The protocol label of a handshake counter ("abridged", ..., "fake_tls"); NULL otherwise. */
const char *mtp_lstat_protocol(enum mtp_lstat k);

struct mtp_lstats;

/* One worker's counters for one listener name. */
struct mtp_lstats_block {
  _Atomic int64_t v[MTP_LSTAT__COUNT];
  struct mtp_lstats_block *_next; /* in the registry */
  const void *_owner;             /* the worker that writes it */
  char *_name;                    /* owns */
};

/* Adds n to counter k of b (b may be NULL: nothing). The block's worker thread only. */
static inline void mtp_lstats_add(struct mtp_lstats_block *b, enum mtp_lstat k, int64_t n) {
  if (b != NULL)
    atomic_fetch_add_explicit(&b->v[k], n, memory_order_relaxed);
}

/* Creates an empty registry. MTP_OK or MTP_ENOMEM. */
int mtp_lstats_create(struct mtp_lstats **out);
/* Frees it and every block; after every worker has been freed. NULL-safe. */
void mtp_lstats_free(struct mtp_lstats *r);

/*
 * The block of owner (a worker) for listener name: the existing one, or a new one with zero
 * counters. NULL when r is NULL or out of memory (that listener is then not counted on this
 * worker; logged). Any thread; takes the mutex.
 */
struct mtp_lstats_block *mtp_lstats_get(struct mtp_lstats *r, const void *owner, const char *name);

/* Removes owner's blocks whose name is not a listener of cfg and for which no worker's block
 * counts an open client. Owner's thread (its blocks are written only there, so one it keeps
 * cannot gain a client afterwards: its listener is closed); takes the mutex. NULL-safe. */
void mtp_lstats_sweep(struct mtp_lstats *r, const void *owner, const struct mtp_config *cfg);
/* Removes every block of owner (the worker is being freed). NULL-safe. */
void mtp_lstats_drop(struct mtp_lstats *r, const void *owner);

/* The number of blocks (every worker's); for tests. Any thread. */
size_t mtp_lstats_nblocks(struct mtp_lstats *r);

/* One listener's sums over the workers. */
struct mtp_lstats_row {
  char *name;    /* owns */
  bool removed;  /* not a listener of the configuration given to mtp_lstats_sum */
  int64_t v[MTP_LSTAT__COUNT];
};

/*
 * The sums by listener: every listener of cfg in cfg's order (zeros when no worker has counted
 * anything there yet), then every other name whose blocks count open clients (removed = true).
 * *rows (transfers; free with mtp_lstats_rows_free) and *nrows. MTP_OK or MTP_ENOMEM. Any
 * thread; takes the mutex while it sums.
 */
int mtp_lstats_sum(struct mtp_lstats *r, const struct mtp_config *cfg, struct mtp_lstats_row **rows, size_t *nrows);
void mtp_lstats_rows_free(struct mtp_lstats_row *rows, size_t nrows);

#endif
