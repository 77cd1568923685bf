/*
 * replay.c - the sharded replay cache (see replay.h for the design and the memory formula).
 */
#include "replay.h"

#include <assert.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"

#include "banned.h"

#define MAX_CAP_PER_SHARD (1u << 30) /* keeps 2 * cap and pos + 1 inside uint32 */

struct entry {
  uint8_t fp[MTP_REPLAY_FP_LEN];
  uint32_t t; /* insertion time, low 32 bits of `now`; ages are taken modulo 2^32 */
};
static_assert(sizeof(struct entry) == 20, "ring entry must be 20 bytes");
static_assert(sizeof(struct entry) + 2 * sizeof(uint32_t) == MTP_REPLAY_ENTRY_BYTES,
              "MTP_REPLAY_ENTRY_BYTES out of date");

struct mtp_replay_shard {
  union {
    struct {
      pthread_mutex_t mu;
      struct entry *ring; /* owns: cap entries; live ones are head .. head+count-1 */
      uint32_t *index;    /* owns: nslots slots; 0 = empty, else ring position + 1 */
      uint32_t cap;
      uint32_t nslots; /* exactly 2 * cap */
      uint32_t head;   /* ring position of the oldest entry */
      uint32_t count;  /* ring entries in use (live or dead) */
      uint32_t live;   /* ring entries still reachable through the index */
      uint64_t inserts, hits, evictions, expired;
    };
    char _pad[128]; /* one shard's hot fields do not share cache lines with the next */
  };
};
static_assert(sizeof(struct mtp_replay_shard) == 128, "shard must be padded to 128 bytes");

static uint32_t load32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Maps a 32-bit hash onto [0, n) without division (n need not be a power of two). */
static uint32_t reduce(uint32_t h, uint32_t n) {
  return (uint32_t)(((uint64_t)h * n) >> 32);
}

static uint32_t home_slot(const struct mtp_replay_shard *s, const uint8_t *fp) {
  return reduce(load32(fp + 4), s->nslots);
}

/* Age of an entry in seconds; an entry stamped after `now` (clocks of two threads) is 0. */
static uint32_t age_of(const struct entry *e, int64_t now) {
  int32_t d = (int32_t)((uint32_t)now - e->t);
  return d < 0 ? 0 : (uint32_t)d;
}

static int fingerprint(const struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                       size_t keylen, uint8_t fp[MTP_REPLAY_FP_LEN]) {
  if (c == NULL || c->_shards == NULL || key == NULL || keylen == 0 ||
      (kind != MTP_REPLAY_OBF2 && kind != MTP_REPLAY_TLS))
    return MTP_EINVAL;
  uint8_t prefix[33];
  memcpy(prefix, c->_seed, 32);
  prefix[32] = (uint8_t)kind;
  uint8_t digest[32];
  mtp_sha256_2(prefix, sizeof(prefix), key, keylen, digest);
  memcpy(fp, digest, MTP_REPLAY_FP_LEN);
  mtp_wipe(prefix, sizeof(prefix));
  return MTP_OK;
}

static struct mtp_replay_shard *shard_for(const struct mtp_replay *c, const uint8_t *fp) {
  return c->_shards[reduce(load32(fp), c->_nshards)];
}

/* Index slot holding fp, or UINT32_MAX. Caller holds the lock. */
static uint32_t find_slot(const struct mtp_replay_shard *s, const uint8_t *fp) {
  uint32_t i = home_slot(s, fp);
  /* The load factor is at most 1/2, so an empty slot always ends the run. */
  for (;;) {
    uint32_t v = s->index[i];
    if (v == 0)
      return UINT32_MAX;
    if (memcmp(s->ring[v - 1].fp, fp, MTP_REPLAY_FP_LEN) == 0)
      return i;
    if (++i == s->nslots)
      i = 0;
  }
}

/* Index slot pointing at ring position pos, or UINT32_MAX if that entry is dead. */
static uint32_t find_pos(const struct mtp_replay_shard *s, uint32_t pos) {
  uint32_t i = home_slot(s, s->ring[pos].fp);
  for (;;) {
    uint32_t v = s->index[i];
    if (v == 0)
      return UINT32_MAX;
    if (v == pos + 1)
      return i;
    if (++i == s->nslots)
      i = 0;
  }
}

/* Backward-shift deletion for linear probing: later members of the run move up into the hole
 * unless their home lies cyclically within (hole, j]. */
static void index_delete(struct mtp_replay_shard *s, uint32_t hole) {
  uint32_t j = hole;
  for (;;) {
    if (++j == s->nslots)
      j = 0;
    uint32_t v = s->index[j];
    if (v == 0)
      break;
    uint32_t k = home_slot(s, s->ring[v - 1].fp);
    bool stays = hole <= j ? (hole < k && k <= j) : (hole < k || k <= j);
    if (stays)
      continue;
    s->index[hole] = v;
    hole = j;
  }
  s->index[hole] = 0;
  s->live--;
}

static void index_insert(struct mtp_replay_shard *s, const uint8_t *fp, uint32_t pos) {
  uint32_t i = home_slot(s, fp);
  while (s->index[i] != 0)
    if (++i == s->nslots)
      i = 0;
  s->index[i] = pos + 1;
  s->live++;
}

/* Drops the ring's oldest entry. Returns true if it was live (still indexed). */
static bool pop_head(struct mtp_replay_shard *s) {
  uint32_t slot = find_pos(s, s->head);
  if (slot != UINT32_MAX)
    index_delete(s, slot);
  if (++s->head == s->cap)
    s->head = 0;
  s->count--;
  return slot != UINT32_MAX;
}

size_t mtp_replay_capacity_for(size_t size_bytes, unsigned nshards) {
  if (nshards == 0 || nshards > MTP_REPLAY_MAX_SHARDS)
    return 0;
  size_t fixed = (size_t)nshards * (sizeof(struct mtp_replay_shard) + sizeof(void *));
  if (size_bytes <= fixed)
    return 0;
  size_t per = (size_bytes - fixed) / nshards / MTP_REPLAY_ENTRY_BYTES;
  if (per > MAX_CAP_PER_SHARD)
    per = MAX_CAP_PER_SHARD;
  return per * nshards;
}

void mtp_replay_init(struct mtp_replay *c) {
  memset(c, 0, sizeof(*c));
}

static void shard_free(struct mtp_replay_shard *s) {
  if (s == NULL)
    return;
  pthread_mutex_destroy(&s->mu);
  mtp_free(s->ring);
  mtp_free(s->index);
  mtp_free(s);
}

void mtp_replay_free(struct mtp_replay *c) {
  if (c == NULL)
    return;
  if (c->_shards != NULL) {
    for (unsigned i = 0; i < c->_nshards; i++)
      shard_free(c->_shards[i]);
    mtp_free(c->_shards);
  }
  mtp_wipe(c->_seed, sizeof(c->_seed));
  mtp_replay_init(c);
}

int mtp_replay_setup_shards(struct mtp_replay *c, size_t size_bytes, uint32_t max_age_s,
                            unsigned nshards) {
  mtp_replay_init(c);
  size_t total = mtp_replay_capacity_for(size_bytes, nshards);
  if (max_age_s == 0 || total == 0)
    return MTP_EINVAL;
  uint32_t per = (uint32_t)(total / nshards);
  int rc = mtp_random(c->_seed, sizeof(c->_seed));
  if (rc != MTP_OK)
    return rc;
  c->_shards = mtp_calloc(nshards, sizeof(*c->_shards));
  if (c->_shards == NULL)
    goto nomem;
  c->_nshards = nshards;
  for (unsigned i = 0; i < nshards; i++) {
    struct mtp_replay_shard *s = mtp_calloc(1, sizeof(*s));
    if (s == NULL)
      goto nomem;
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
      mtp_free(s);
      goto nomem;
    }
    c->_shards[i] = s;
    s->cap = per;
    s->nslots = 2 * per;
    s->ring = mtp_malloc((size_t)per * sizeof(struct entry));
    s->index = mtp_calloc(s->nslots, sizeof(uint32_t));
    if (s->ring == NULL || s->index == NULL)
      goto nomem;
  }
  c->_max_age = max_age_s;
  c->_capacity = total;
  return MTP_OK;
nomem:
  mtp_replay_free(c);
  return MTP_ENOMEM;
}

int mtp_replay_setup(struct mtp_replay *c, size_t size_bytes, uint32_t max_age_s) {
  return mtp_replay_setup_shards(c, size_bytes, max_age_s, MTP_REPLAY_SHARDS);
}

int mtp_replay_check_and_add(struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                             size_t keylen, int64_t now) {
  uint8_t fp[MTP_REPLAY_FP_LEN];
  int rc = fingerprint(c, kind, key, keylen, fp);
  if (rc != MTP_OK)
    return rc;
  struct mtp_replay_shard *s = shard_for(c, fp);
  uint32_t max_age = c->_max_age;

  pthread_mutex_lock(&s->mu);
  /* Lazy expiry: the ring is in insertion order, so expired entries gather at its head. */
  while (s->count > 0 && age_of(&s->ring[s->head], now) > max_age) {
    if (pop_head(s))
      s->expired++;
  }
  uint32_t slot = find_slot(s, fp);
  if (slot != UINT32_MAX) {
    if (age_of(&s->ring[s->index[slot] - 1], now) <= max_age) {
      s->hits++;
      pthread_mutex_unlock(&s->mu);
      return MTP_REPLAY_SEEN;
    }
    /* Expired but not at the head (times went backwards): unindex it; its ring slot stays
     * dead until it reaches the head. */
    index_delete(s, slot);
    s->expired++;
  }
  if (s->count == s->cap) {
    if (pop_head(s))
      s->evictions++;
  }
  uint32_t pos = s->head + s->count;
  if (pos >= s->cap)
    pos -= s->cap;
  memcpy(s->ring[pos].fp, fp, MTP_REPLAY_FP_LEN);
  s->ring[pos].t = (uint32_t)now;
  s->count++;
  index_insert(s, fp, pos);
  s->inserts++;
  pthread_mutex_unlock(&s->mu);
  return MTP_REPLAY_NEW;
}

int mtp_replay_contains(struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                        size_t keylen, int64_t now) {
  uint8_t fp[MTP_REPLAY_FP_LEN];
  int rc = fingerprint(c, kind, key, keylen, fp);
  if (rc != MTP_OK)
    return rc;
  struct mtp_replay_shard *s = shard_for(c, fp);
  pthread_mutex_lock(&s->mu);
  uint32_t slot = find_slot(s, fp);
  rc = MTP_REPLAY_NEW;
  if (slot != UINT32_MAX && age_of(&s->ring[s->index[slot] - 1], now) <= c->_max_age)
    rc = MTP_REPLAY_SEEN;
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int mtp_replay_check_obf2(struct mtp_replay *c, const uint8_t header[64], int64_t now) {
  if (header == NULL)
    return MTP_EINVAL;
  return mtp_replay_check_and_add(c, MTP_REPLAY_OBF2, header + MTP_REPLAY_OBF2_KEY_OFF,
                                  MTP_REPLAY_OBF2_KEY_LEN, now);
}

int mtp_replay_check_tls(struct mtp_replay *c, const uint8_t random[32], int64_t now) {
  return mtp_replay_check_and_add(c, MTP_REPLAY_TLS, random, MTP_REPLAY_TLS_KEY_LEN, now);
}

int mtp_replay_shard_of(const struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                        size_t keylen) {
  uint8_t fp[MTP_REPLAY_FP_LEN];
  if (fingerprint(c, kind, key, keylen, fp) != MTP_OK)
    return -1;
  return (int)reduce(load32(fp), c->_nshards);
}

void mtp_replay_get_stats(struct mtp_replay *c, struct mtp_replay_stats *out) {
  memset(out, 0, sizeof(*out));
  if (c == NULL || c->_shards == NULL)
    return;
  out->capacity = c->_capacity;
  for (unsigned i = 0; i < c->_nshards; i++) {
    struct mtp_replay_shard *s = c->_shards[i];
    pthread_mutex_lock(&s->mu);
    out->entries += s->live;
    out->inserts += s->inserts;
    out->hits += s->hits;
    out->evictions += s->evictions;
    out->expired += s->expired;
    pthread_mutex_unlock(&s->mu);
  }
}
