/*
 * lstats.c - client connections by listener (see lstats.h).
 *
 * The registry is a singly linked list of blocks under one mutex. The lists are short (workers
 * times listeners) and walked only at setup, reload and scrape.
 */
#include "lstats.h"

#include <pthread.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "log.h"

#include "banned.h"

struct mtp_lstats {
  pthread_mutex_t mu;             /* guards blocks (the list, not the counters) */
  struct mtp_lstats_block *blocks; /* owns */
};

const char *mtp_lstat_protocol(enum mtp_lstat k) {
  switch (k) {
  case MTP_LSTAT_HS_ABRIDGED:
    return "abridged";
  case MTP_LSTAT_HS_INTERMEDIATE:
    return "intermediate";
  case MTP_LSTAT_HS_SECURE:
    return "secure";
  case MTP_LSTAT_HS_FAKE_TLS:
    return "fake_tls";
  case MTP_LSTAT_ACCEPTED:
  case MTP_LSTAT_ACTIVE:
  case MTP_LSTAT__COUNT:
    break;
  }
  return NULL;
}

int mtp_lstats_create(struct mtp_lstats **out) {
  *out = NULL;
  struct mtp_lstats *r = mtp_calloc(1, sizeof(*r));
  if (r == NULL)
    return MTP_ENOMEM;
  if (pthread_mutex_init(&r->mu, NULL) != 0) {
    mtp_free(r);
    return MTP_ENOMEM;
  }
  *out = r;
  return MTP_OK;
}

static void block_free(struct mtp_lstats_block *b) {
  mtp_free(b->_name);
  mtp_free(b);
}

void mtp_lstats_free(struct mtp_lstats *r) {
  if (r == NULL)
    return;
  while (r->blocks != NULL) {
    struct mtp_lstats_block *b = r->blocks;
    r->blocks = b->_next;
    block_free(b);
  }
  pthread_mutex_destroy(&r->mu);
  mtp_free(r);
}

struct mtp_lstats_block *mtp_lstats_get(struct mtp_lstats *r, const void *owner, const char *name) {
  if (r == NULL || name == NULL)
    return NULL;
  pthread_mutex_lock(&r->mu);
  struct mtp_lstats_block *b = r->blocks;
  while (b != NULL && (b->_owner != owner || strcmp(b->_name, name) != 0))
    b = b->_next;
  if (b == NULL) {
    b = mtp_calloc(1, sizeof(*b));
    char *copy = b != NULL ? mtp_strdup(name) : NULL;
    if (copy == NULL) {
      mtp_free(b);
      b = NULL;
      mtp_log(MTP_LOG_WARN, "listener %s: out of memory for its counters; not counted by listener", name);
    } else {
      for (int k = 0; k < MTP_LSTAT__COUNT; k++)
        atomic_init(&b->v[k], 0);
      b->_owner = owner;
      b->_name = copy;
      b->_next = r->blocks;
      r->blocks = b;
    }
  }
  pthread_mutex_unlock(&r->mu);
  return b;
}

static bool cfg_has_listener(const struct mtp_config *cfg, const char *name) {
  for (size_t i = 0; cfg != NULL && i < cfg->nlisteners; i++)
    if (cfg->listeners[i].name != NULL && strcmp(cfg->listeners[i].name, name) == 0)
      return true;
  return false;
}

/* True when some block of listener name (any worker's) counts an open client. */
static bool name_has_clients(const struct mtp_lstats *r, const char *name) {
  for (const struct mtp_lstats_block *b = r->blocks; b != NULL; b = b->_next)
    if (strcmp(b->_name, name) == 0 && atomic_load_explicit(&b->v[MTP_LSTAT_ACTIVE], memory_order_relaxed) > 0)
      return true;
  return false;
}

/* Removes owner's blocks: all of them, or those whose name is not a listener of cfg and that
 * no worker counts an open client for (so a removed listener, while listed, still sums every
 * worker's counts). */
static void remove_blocks(struct mtp_lstats *r, const void *owner, const struct mtp_config *cfg, bool all) {
  if (r == NULL)
    return;
  pthread_mutex_lock(&r->mu);
  struct mtp_lstats_block **pp = &r->blocks;
  while (*pp != NULL) {
    struct mtp_lstats_block *b = *pp;
    bool drop = b->_owner == owner &&
                (all || (!cfg_has_listener(cfg, b->_name) && !name_has_clients(r, b->_name)));
    if (drop) {
      *pp = b->_next;
      block_free(b);
    } else {
      pp = &b->_next;
    }
  }
  pthread_mutex_unlock(&r->mu);
}

void mtp_lstats_sweep(struct mtp_lstats *r, const void *owner, const struct mtp_config *cfg) {
  remove_blocks(r, owner, cfg, false);
}

void mtp_lstats_drop(struct mtp_lstats *r, const void *owner) { remove_blocks(r, owner, NULL, true); }

size_t mtp_lstats_nblocks(struct mtp_lstats *r) {
  if (r == NULL)
    return 0;
  size_t n = 0;
  pthread_mutex_lock(&r->mu);
  for (struct mtp_lstats_block *b = r->blocks; b != NULL; b = b->_next)
    n++;
  pthread_mutex_unlock(&r->mu);
  return n;
}

void mtp_lstats_rows_free(struct mtp_lstats_row *rows, size_t nrows) {
  if (rows == NULL)
    return;
  for (size_t i = 0; i < nrows; i++)
    mtp_free(rows[i].name);
  mtp_free(rows);
}

static struct mtp_lstats_row *find_row(struct mtp_lstats_row *rows, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(rows[i].name, name) == 0)
      return &rows[i];
  return NULL;
}

int mtp_lstats_sum(struct mtp_lstats *r, const struct mtp_config *cfg, struct mtp_lstats_row **rows, size_t *nrows) {
  *rows = NULL;
  *nrows = 0;
  size_t ncfg = cfg != NULL ? cfg->nlisteners : 0;
  size_t nblocks = 0;
  if (r != NULL)
    pthread_mutex_lock(&r->mu);
  for (struct mtp_lstats_block *b = r != NULL ? r->blocks : NULL; b != NULL; b = b->_next)
    nblocks++;
  /* At most one row per configured listener and one per block. */
  struct mtp_lstats_row *out = mtp_calloc(ncfg + nblocks + 1, sizeof(*out));
  size_t n = 0;
  int rc = out != NULL ? MTP_OK : MTP_ENOMEM;
  for (size_t i = 0; rc == MTP_OK && i < ncfg; i++) {
    const char *name = cfg->listeners[i].name;
    if (name == NULL || find_row(out, n, name) != NULL)
      continue;
    if ((out[n].name = mtp_strdup(name)) == NULL)
      rc = MTP_ENOMEM;
    else
      n++;
  }
  for (struct mtp_lstats_block *b = r != NULL ? r->blocks : NULL; rc == MTP_OK && b != NULL; b = b->_next) {
    struct mtp_lstats_row *row = find_row(out, n, b->_name);
    if (row == NULL) {
      if ((out[n].name = mtp_strdup(b->_name)) == NULL) {
        rc = MTP_ENOMEM;
        break;
      }
      out[n].removed = true;
      row = &out[n++];
    }
    for (int k = 0; k < MTP_LSTAT__COUNT; k++)
      row->v[k] += atomic_load_explicit(&b->v[k], memory_order_relaxed);
  }
  if (r != NULL)
    pthread_mutex_unlock(&r->mu);
  if (rc != MTP_OK) {
    mtp_lstats_rows_free(out, n);
    return rc;
  }
  /* A removed listener is listed only while it still has clients. */
  size_t kept = 0;
  for (size_t i = 0; i < n; i++) {
    if (out[i].removed && out[i].v[MTP_LSTAT_ACTIVE] <= 0) {
      mtp_free(out[i].name);
      continue;
    }
    out[kept++] = out[i];
  }
  *rows = out;
  *nrows = kept;
  return MTP_OK;
}
