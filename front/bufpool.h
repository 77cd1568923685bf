/*
 * bufpool.h - a per-worker free list of fixed-size read buffers.
 *
 * A session takes one buffer in its libuv alloc callback and gives it back at the end of the
 * read callback, so an idle connection holds no buffer at all. Up to `max_free` released
 * buffers are kept for reuse; the rest go back to the heap. One loop thread only.
 */
#ifndef MTP_FRONT_BUFPOOL_H
#define MTP_FRONT_BUFPOOL_H

#include <stddef.h>

/* Size of every buffer handed out: the most one read callback processes. */
#define MTP_BUFPOOL_BUF_SIZE (64u * 1024u)

struct mtp_bufpool_node;

struct mtp_bufpool {
  struct mtp_bufpool_node *_free; /* owns: released buffers */
  size_t _nfree;
  size_t max_free;  /* how many released buffers to keep */
  size_t in_use;    /* buffers taken and not yet released */
};

/* Cannot fail. */
void mtp_bufpool_init(struct mtp_bufpool *p, size_t max_free);

/* A buffer of MTP_BUFPOOL_BUF_SIZE bytes (transfers to the caller), or NULL on ENOMEM. */
void *mtp_bufpool_get(struct mtp_bufpool *p);

/* Gives back a buffer obtained from mtp_bufpool_get (transfers to the pool). NULL-safe. */
void mtp_bufpool_put(struct mtp_bufpool *p, void *buf);

/* Frees the cached buffers. Buffers still in use must have been put back. Idempotent. */
void mtp_bufpool_free(struct mtp_bufpool *p);

#endif
