/*
 * connmap.c - see connmap.h. Load factor <= 1/2; the hash is a 64-bit mixer (conn_ids are
 * random already, the mixer only guards against unlucky low bits).
 */
#include "connmap.h"

#include <string.h>

#include "alloc.h"
#include "err.h"

#include "banned.h"

static size_t slot_of(uint64_t key, size_t cap) {
  key ^= key >> 33;
  key *= 0xff51afd7ed558ccdULL;
  key ^= key >> 33;
  return (size_t)key & (cap - 1);
}

void mtp_connmap_init(struct mtp_connmap *m) { memset(m, 0, sizeof(*m)); }

void mtp_connmap_free(struct mtp_connmap *m) {
  if (m == NULL)
    return;
  mtp_free(m->_keys);
  m->_keys = NULL;
  mtp_free(m->_vals);
  m->_vals = NULL;
  m->_cap = 0;
  m->n = 0;
}

static void put_raw(uint64_t *keys, void **vals, size_t cap, uint64_t key, void *val) {
  size_t i = slot_of(key, cap);
  while (keys[i] != 0 && keys[i] != key)
    i = (i + 1) & (cap - 1);
  keys[i] = key;
  vals[i] = val;
}

static int grow(struct mtp_connmap *m) {
  size_t cap = m->_cap ? m->_cap * 2 : 16;
  uint64_t *keys = mtp_calloc(cap, sizeof(*keys));
  void **vals = mtp_calloc(cap, sizeof(*vals));
  if (keys == NULL || vals == NULL) {
    mtp_free(keys);
    mtp_free(vals);
    return MTP_ENOMEM;
  }
  for (size_t i = 0; i < m->_cap; i++)
    if (m->_keys[i] != 0)
      put_raw(keys, vals, cap, m->_keys[i], m->_vals[i]);
  mtp_free(m->_keys);
  mtp_free(m->_vals);
  m->_keys = keys;
  m->_vals = vals;
  m->_cap = cap;
  return MTP_OK;
}

int mtp_connmap_put(struct mtp_connmap *m, uint64_t key, void *val) {
  if (key == 0)
    return MTP_EINVAL;
  if ((m->n + 1) * 2 > m->_cap) {
    int rc = grow(m);
    if (rc < 0)
      return rc;
  }
  size_t i = slot_of(key, m->_cap);
  while (m->_keys[i] != 0) {
    if (m->_keys[i] == key) {
      m->_vals[i] = val;
      return MTP_OK;
    }
    i = (i + 1) & (m->_cap - 1);
  }
  m->_keys[i] = key;
  m->_vals[i] = val;
  m->n++;
  return MTP_OK;
}

void *mtp_connmap_get(const struct mtp_connmap *m, uint64_t key) {
  if (m->_cap == 0 || key == 0)
    return NULL;
  size_t i = slot_of(key, m->_cap);
  while (m->_keys[i] != 0) {
    if (m->_keys[i] == key)
      return m->_vals[i];
    i = (i + 1) & (m->_cap - 1);
  }
  return NULL;
}

void *mtp_connmap_del(struct mtp_connmap *m, uint64_t key) {
  if (m->_cap == 0 || key == 0)
    return NULL;
  size_t mask = m->_cap - 1;
  size_t i = slot_of(key, m->_cap);
  while (m->_keys[i] != key) {
    if (m->_keys[i] == 0)
      return NULL;
    i = (i + 1) & mask;
  }
  void *val = m->_vals[i];
  /* Backward-shift: pull later entries of the probe run into the hole when their home slot
   * does not lie cyclically in (hole, j]. */
  size_t hole = i;
  size_t j = i;
  for (;;) {
    j = (j + 1) & mask;
    if (m->_keys[j] == 0)
      break;
    size_t home = slot_of(m->_keys[j], m->_cap);
    int in_range = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!in_range) {
      m->_keys[hole] = m->_keys[j];
      m->_vals[hole] = m->_vals[j];
      hole = j;
    }
  }
  m->_keys[hole] = 0;
  m->_vals[hole] = NULL;
  m->n--;
  return val;
}
