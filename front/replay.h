/*
 * replay.h - the replay cache: remembers the handshakes this proxy accepted recently, so a
 * recorded handshake sent again (by a DPI probe replaying a real client's bytes) is noticed
 * and can be handed to domain fronting instead of being served.
 *
 * One cache is shared by all worker threads. It holds two kinds of key:
 *   - MTP_REPLAY_OBF2: the obfuscated2 header's key material, i.e. the 48 bytes at offsets
 *     8..56 of the 64-byte header exactly as received (the client's random key + IV; the
 *     cleartext prefix 0..8 and the encrypted tag 56..64 are left out). Pass them with
 *     mtp_replay_check_obf2(), or as (header + MTP_REPLAY_OBF2_KEY_OFF, MTP_REPLAY_OBF2_KEY_LEN).
 *   - MTP_REPLAY_TLS: the 32-byte client random of a fake-TLS ClientHello whose HMAC was
 *     valid (all 32 bytes, timestamp XOR included), via mtp_replay_check_tls().
 *
 * Every key, whatever its kind and length, is reduced to a 16-byte fingerprint:
 *     fp = first 16 bytes of SHA-256(seed[32] || kind[1] || key)
 * where seed is 32 random bytes drawn at setup. The kind byte keeps the two kinds apart;
 * the secret seed means nobody outside can choose keys that land in one shard or one probe
 * run (hash flooding), and 128 bits make an accidental collision negligible. Fingerprint
 * bytes 0..3 pick the shard, bytes 4..7 the home slot in the shard's index.
 *
 * Layout: the cache has `nshards` shards (MTP_REPLAY_SHARDS by default), each behind its own
 * mutex. A shard is a FIFO ring of `cap` entries (insertion order) plus an open-addressing
 * index (linear probing, exactly 2 * cap slots, so the load factor never exceeds 1/2 and a
 * lookup is O(1) expected). Index slots hold ring positions; removal uses backward-shift
 * deletion, so there are no tombstones.
 *
 *     ring (oldest ... newest)            index (2 * cap slots of uint32)
 *     [head] fp,t -> fp,t -> ... fp,t     [0 | pos+1 | 0 | pos+1 | ...]
 *       ^ evicted first when full           found by fp bytes 4..7
 *
 * Memory, exactly (heap, not counting malloc's own bookkeeping):
 *   - per entry: 20 bytes in the ring (16-byte fingerprint + 32-bit insertion time)
 *     + 2 index slots * 4 bytes = MTP_REPLAY_ENTRY_BYTES = 28 bytes;
 *   - fixed: nshards * (sizeof(struct mtp_replay_shard) (128 bytes, padded against false
 *     sharing) + one pointer), taken off the budget first.
 *   capacity = nshards * floor((size_bytes - fixed) / nshards / 28); see
 *   mtp_replay_capacity_for(). For example 16 MiB with 64 shards holds 598,848 entries.
 *
 * Age: an entry older than max_age seconds (now - inserted > max_age) is not considered: a
 * lookup that finds it answers "new" and inserts the key afresh. Expired entries are also
 * dropped lazily from the ring's head on every insertion into that shard. max_age must be at
 * least the fake-TLS timestamp window (how far in the past a ClientHello timestamp may be),
 * otherwise a handshake could be replayed after leaving the cache but while its timestamp
 * is still accepted.
 *
 * Full: when a shard's ring is full, the oldest entry of that shard is evicted (counted in
 * `evictions`). Eviction is per shard, so across the whole cache it is insertion order only
 * approximately; within a shard it is exact.
 *
 * Time is always passed in (`now`, seconds, any monotonic or wall clock used consistently);
 * the module reads no clock. Times may go slightly backwards between threads: an entry
 * stamped in the "future" counts as age 0.
 *
 * Thread safety: all functions except init/setup/free may be called from any thread at the
 * same time. check_and_add is atomic per key: of several threads offering the same key at
 * once, exactly one gets MTP_REPLAY_NEW.
 */
#ifndef MTP_REPLAY_H
#define MTP_REPLAY_H

#include <stddef.h>
#include <stdint.h>

#define MTP_REPLAY_SHARDS 64     /* default number of shards */
#define MTP_REPLAY_MAX_SHARDS 1024
#define MTP_REPLAY_ENTRY_BYTES 28 /* 20 ring + 8 index, see above */
#define MTP_REPLAY_FP_LEN 16
#define MTP_REPLAY_OBF2_KEY_OFF 8
#define MTP_REPLAY_OBF2_KEY_LEN 48
#define MTP_REPLAY_TLS_KEY_LEN 32

enum mtp_replay_kind {
  MTP_REPLAY_OBF2 = 1, /* obfuscated2 header bytes 8..56 */
  MTP_REPLAY_TLS = 2,  /* fake-TLS ClientHello random */
};

/* Non-error results of mtp_replay_check_and_add / mtp_replay_contains. */
enum mtp_replay_result {
  MTP_REPLAY_NEW = 0,  /* not in the cache (or only as an expired entry) */
  MTP_REPLAY_SEEN = 1, /* in the cache and younger than max_age: a replay */
};

struct mtp_replay_shard; /* private, defined in replay.c */

struct mtp_replay {
  struct mtp_replay_shard **_shards; /* owns: _nshards shards */
  unsigned _nshards;
  uint32_t _max_age;
  size_t _capacity; /* total entries over all shards */
  uint8_t _seed[32]; /* secret fingerprint key, random per cache */
};

/* Counters for metrics; a consistent-enough sum over shards (each shard read under its lock). */
struct mtp_replay_stats {
  uint64_t entries;   /* live entries now (may include expired ones not yet dropped) */
  uint64_t capacity;  /* maximum entries */
  uint64_t inserts;   /* keys added (answers MTP_REPLAY_NEW from check_and_add) */
  uint64_t hits;      /* answers MTP_REPLAY_SEEN from check_and_add: replays caught */
  uint64_t evictions; /* live entries pushed out because the shard was full */
  uint64_t expired;   /* entries dropped or ignored because they were older than max_age */
};

/* Zeroes the cache; cannot fail. mtp_replay_free is then safe. */
void mtp_replay_init(struct mtp_replay *c);

/* Allocates a cache of MTP_REPLAY_SHARDS shards using at most size_bytes of heap (see the
 * memory formula above). max_age_s > 0. Returns MTP_OK; MTP_EINVAL when max_age_s is 0 or
 * size_bytes is too small for one entry per shard; MTP_ENOMEM; MTP_EIO when no random seed
 * could be read. On failure the cache is left as after mtp_replay_init. */
int mtp_replay_setup(struct mtp_replay *c, size_t size_bytes, uint32_t max_age_s);

/* The same with an explicit shard count (1..MTP_REPLAY_MAX_SHARDS); 1 shard gives exact
 * global FIFO eviction (tests use it). */
int mtp_replay_setup_shards(struct mtp_replay *c, size_t size_bytes, uint32_t max_age_s,
                            unsigned nshards);

/* How many entries a cache of size_bytes with nshards shards holds; 0 if too small. */
size_t mtp_replay_capacity_for(size_t size_bytes, unsigned nshards);

/* Looks the key up and, unless it is there and younger than max_age, adds it stamped `now`,
 * all under the shard's lock. key is borrowed for the call only; keylen > 0.
 * Returns MTP_REPLAY_NEW (added), MTP_REPLAY_SEEN (a replay; nothing changes but the hit
 * counter), or MTP_EINVAL (cache not set up, bad kind, NULL/empty key). */
int mtp_replay_check_and_add(struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                             size_t keylen, int64_t now);

/* Shorthands: header is the 64 bytes as received; random is ClientHello's 32-byte random. */
int mtp_replay_check_obf2(struct mtp_replay *c, const uint8_t header[64], int64_t now);
int mtp_replay_check_tls(struct mtp_replay *c, const uint8_t random[32], int64_t now);

/* Read-only lookup: MTP_REPLAY_SEEN if the key is present and younger than max_age, else
 * MTP_REPLAY_NEW; adds nothing and counts nothing. MTP_EINVAL as above. */
int mtp_replay_contains(struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                        size_t keylen, int64_t now);

/* Which shard the key lives in (0.._nshards-1), or -1 on bad arguments; for tests. */
int mtp_replay_shard_of(const struct mtp_replay *c, enum mtp_replay_kind kind, const void *key,
                        size_t keylen);

/* Fills *out (all zero for a cache that is not set up). */
void mtp_replay_get_stats(struct mtp_replay *c, struct mtp_replay_stats *out);

/* Frees everything; NULL-safe and idempotent. No other call may be running. */
void mtp_replay_free(struct mtp_replay *c);

#endif
