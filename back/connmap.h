/*
 * connmap.h - conn_id -> stream lookup for one worker: an open-addressing hash map with
 * linear probing and backward-shift deletion (no tombstones), so lookups stay O(1) however
 * many streams come and go. Key 0 is reserved (never a valid conn_id). Pure; no uv.h.
 */
#ifndef MTP_BACK_CONNMAP_H
#define MTP_BACK_CONNMAP_H

#include <stddef.h>
#include <stdint.h>

struct mtp_connmap {
  uint64_t *_keys; /* owns; 0 = empty slot */
  void **_vals;    /* owns the array, borrows the values */
  size_t _cap;     /* power of two, or 0 */
  size_t n;        /* entries */
};

/* Cannot fail: an empty map (allocates on first insert). */
void mtp_connmap_init(struct mtp_connmap *m);
/* Inserts or replaces key (!= 0). Returns MTP_OK, MTP_EINVAL (key 0) or MTP_ENOMEM. */
int mtp_connmap_put(struct mtp_connmap *m, uint64_t key, void *val);
/* The value for key, or NULL. */
void *mtp_connmap_get(const struct mtp_connmap *m, uint64_t key);
/* Removes key; returns the value it had, or NULL. */
void *mtp_connmap_del(struct mtp_connmap *m, uint64_t key);
/* Frees the arrays (not the values). NULL-safe, idempotent. */
void mtp_connmap_free(struct mtp_connmap *m);

#endif
