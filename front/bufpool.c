/*
 * bufpool.c - fixed-size read buffers on an intrusive free list (see bufpool.h).
 */
#include "bufpool.h"

#include "alloc.h"

#include "banned.h"

/* A free buffer stores the list link in its own first bytes. */
struct mtp_bufpool_node {
  struct mtp_bufpool_node *next;
};

void mtp_bufpool_init(struct mtp_bufpool *p, size_t max_free) {
  p->_free = NULL;
  p->_nfree = 0;
  p->max_free = max_free;
  p->in_use = 0;
}

void *mtp_bufpool_get(struct mtp_bufpool *p) {
  struct mtp_bufpool_node *n = p->_free;
  if (n != NULL) {
    p->_free = n->next;
    p->_nfree--;
  } else {
    n = mtp_malloc(MTP_BUFPOOL_BUF_SIZE);
    if (n == NULL)
      return NULL;
  }
  p->in_use++;
  return n;
}

void mtp_bufpool_put(struct mtp_bufpool *p, void *buf) {
  if (buf == NULL)
    return;
  p->in_use--;
  if (p->_nfree >= p->max_free) {
    mtp_free(buf);
    return;
  }
  struct mtp_bufpool_node *n = buf;
  n->next = p->_free;
  p->_free = n;
  p->_nfree++;
}

void mtp_bufpool_free(struct mtp_bufpool *p) {
  while (p->_free != NULL) {
    struct mtp_bufpool_node *n = p->_free;
    p->_free = n->next;
    mtp_free(n);
  }
  p->_nfree = 0;
}
