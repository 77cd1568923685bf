/*
 * test_replay.c - the replay cache: new/seen, kinds kept apart, the obf2 key bytes, capacity
 * from the memory bound, FIFO eviction (one shard exactly, 64 shards per shard), age expiry
 * (including times going backwards), a randomized comparison against a simple reference
 * model (exercises the index's backward-shift deletion), allocation failures in setup, a
 * multi-threaded race where exactly one thread may get "new" per key, and a rough
 * throughput figure (printed, not asserted).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "err.h"
#include "replay.h"

#include "check.h"

/* Key number i as 32 distinct bytes. */
static void mkkey(uint8_t key[32], uint32_t i) {
  uint64_t x = 0x9e3779b97f4a7c15ull * (i + 1);
  for (int k = 0; k < 32; k++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    key[k] = (uint8_t)(x >> 24);
  }
  memcpy(key, &i, sizeof(i)); /* guarantees distinctness */
}

/* ---- allocator that can fail the Nth allocation ---- */
static atomic_long alloc_countdown = -1; /* -1: never fail */
static int should_fail(void) {
  long v = atomic_load(&alloc_countdown);
  if (v < 0)
    return 0;
  return atomic_fetch_sub(&alloc_countdown, 1) == 0;
}
static void *t_malloc(size_t n) { return should_fail() ? NULL : malloc(n); }
static void *t_calloc(size_t c, size_t n) { return should_fail() ? NULL : calloc(c, n); }
static void *t_realloc(void *p, size_t n) { return should_fail() ? NULL : realloc(p, n); }
static void t_free(void *p) { free(p); }

static void test_basic(void) {
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup(&c, 1 << 20, 600) == MTP_OK);
  uint8_t k1[32], k2[32];
  mkkey(k1, 1);
  mkkey(k2, 2);
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k1, 32, 100) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, k1, 100) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, k1, 100) == MTP_REPLAY_SEEN);
  CHECK(mtp_replay_check_tls(&c, k1, 150) == MTP_REPLAY_SEEN);
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k1, 32, 150) == MTP_REPLAY_SEEN);
  CHECK(mtp_replay_check_tls(&c, k2, 150) == MTP_REPLAY_NEW);
  /* A key differing in one bit is a different key. */
  k2[31] ^= 1;
  CHECK(mtp_replay_check_tls(&c, k2, 150) == MTP_REPLAY_NEW);

  /* The same bytes under the other kind do not collide. */
  CHECK(mtp_replay_check_and_add(&c, MTP_REPLAY_OBF2, k1, 32, 150) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_and_add(&c, MTP_REPLAY_OBF2, k1, 32, 150) == MTP_REPLAY_SEEN);
  /* Nor does a prefix of a key. */
  CHECK(mtp_replay_check_and_add(&c, MTP_REPLAY_TLS, k1, 31, 150) == MTP_REPLAY_NEW);

  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 5);
  CHECK(st.inserts == 5);
  CHECK(st.hits == 3);
  CHECK(st.evictions == 0);
  CHECK(st.expired == 0);
  CHECK(st.capacity == mtp_replay_capacity_for(1 << 20, MTP_REPLAY_SHARDS));

  /* Bad arguments. */
  CHECK(mtp_replay_check_and_add(&c, (enum mtp_replay_kind)3, k1, 32, 1) == MTP_EINVAL);
  CHECK(mtp_replay_check_and_add(&c, MTP_REPLAY_TLS, NULL, 32, 1) == MTP_EINVAL);
  CHECK(mtp_replay_check_and_add(&c, MTP_REPLAY_TLS, k1, 0, 1) == MTP_EINVAL);
  CHECK(mtp_replay_check_obf2(&c, NULL, 1) == MTP_EINVAL);
  CHECK(mtp_replay_shard_of(&c, MTP_REPLAY_TLS, k1, 32) >= 0);
  CHECK(mtp_replay_shard_of(&c, MTP_REPLAY_TLS, k1, 32) < MTP_REPLAY_SHARDS);
  mtp_replay_free(&c);
  mtp_replay_free(&c); /* idempotent */
  mtp_replay_free(NULL);
  /* A freed (or never set up) cache refuses work instead of crashing. */
  CHECK(mtp_replay_check_tls(&c, k1, 1) == MTP_EINVAL);
  mtp_replay_get_stats(&c, &st);
  CHECK(st.capacity == 0 && st.entries == 0);
}

static void test_obf2_key_bytes(void) {
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup(&c, 1 << 20, 600) == MTP_OK);
  uint8_t h[64], h2[64];
  for (int i = 0; i < 64; i++)
    h[i] = (uint8_t)(i * 7 + 3);
  CHECK(mtp_replay_check_obf2(&c, h, 10) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_obf2(&c, h, 10) == MTP_REPLAY_SEEN);
  /* Bytes outside 8..56 are not part of the key. */
  memcpy(h2, h, 64);
  h2[0] ^= 0xff;
  h2[7] ^= 0xff;
  h2[56] ^= 0xff;
  h2[63] ^= 0xff;
  CHECK(mtp_replay_check_obf2(&c, h2, 10) == MTP_REPLAY_SEEN);
  /* The first and last key bytes are. */
  memcpy(h2, h, 64);
  h2[8] ^= 1;
  CHECK(mtp_replay_check_obf2(&c, h2, 10) == MTP_REPLAY_NEW);
  memcpy(h2, h, 64);
  h2[55] ^= 1;
  CHECK(mtp_replay_check_obf2(&c, h2, 10) == MTP_REPLAY_NEW);
  /* Equivalent to the generic call with bytes 8..56. */
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_OBF2, h + MTP_REPLAY_OBF2_KEY_OFF,
                            MTP_REPLAY_OBF2_KEY_LEN, 10) == MTP_REPLAY_SEEN);
  /* ... and the TLS kind with the same 32 bytes is distinct. */
  CHECK(mtp_replay_check_tls(&c, h + 8, 10) == MTP_REPLAY_NEW);
  mtp_replay_free(&c);
}

static void test_capacity(void) {
  const size_t shard_fixed = 128 + sizeof(void *);
  /* 16 MiB, 64 shards: (16 MiB - 64 * 136) / 64 / 28 = 9357 per shard. */
  CHECK(mtp_replay_capacity_for(16u << 20, 64) == 598848);
  CHECK(mtp_replay_capacity_for(16u << 20, 64) * MTP_REPLAY_ENTRY_BYTES + 64 * shard_fixed <=
        (16u << 20));
  /* The bound is tight: one more entry per shard would not fit. */
  CHECK((mtp_replay_capacity_for(16u << 20, 64) + 64) * MTP_REPLAY_ENTRY_BYTES + 64 * shard_fixed >
        (16u << 20));
  /* One shard: fixed part, then exactly 28 bytes per entry. */
  CHECK(mtp_replay_capacity_for(shard_fixed + 10 * 28, 1) == 10);
  CHECK(mtp_replay_capacity_for(shard_fixed + 10 * 28 + 27, 1) == 10);
  CHECK(mtp_replay_capacity_for(shard_fixed + 10 * 28 - 1, 1) == 9);
  CHECK(mtp_replay_capacity_for(shard_fixed + 27, 1) == 0);
  CHECK(mtp_replay_capacity_for(1 << 20, 0) == 0);
  CHECK(mtp_replay_capacity_for(1 << 20, MTP_REPLAY_MAX_SHARDS + 1) == 0);

  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup_shards(&c, shard_fixed + 27, 600, 1) == MTP_EINVAL);
  CHECK(mtp_replay_setup(&c, 1000, 600) == MTP_EINVAL); /* < one entry per shard */
  CHECK(mtp_replay_setup(&c, 1 << 20, 0) == MTP_EINVAL);
  mtp_replay_free(&c);

  /* Exactly `capacity` keys fit without eviction; the next one evicts. */
  CHECK(mtp_replay_setup_shards(&c, shard_fixed + 100 * 28, 600, 1) == MTP_OK);
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.capacity == 100);
  uint8_t k[32];
  for (uint32_t i = 0; i < 100; i++) {
    mkkey(k, i);
    CHECK(mtp_replay_check_tls(&c, k, 1) == MTP_REPLAY_NEW);
  }
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 100 && st.evictions == 0);
  mkkey(k, 100);
  CHECK(mtp_replay_check_tls(&c, k, 1) == MTP_REPLAY_NEW);
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 100 && st.evictions == 1);
  mtp_replay_free(&c);
}

static void test_eviction_one_shard(void) {
  const uint32_t cap = 50, extra = 17;
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup_shards(&c, 136 + cap * 28, 600, 1) == MTP_OK);
  uint8_t k[32];
  for (uint32_t i = 0; i < cap + extra; i++) {
    mkkey(k, i);
    CHECK(mtp_replay_check_tls(&c, k, 5) == MTP_REPLAY_NEW);
  }
  /* The oldest `extra` went, in insertion order; the rest are all there. */
  for (uint32_t i = 0; i < cap + extra; i++) {
    mkkey(k, i);
    CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k, 32, 5) ==
          (i < extra ? MTP_REPLAY_NEW : MTP_REPLAY_SEEN));
  }
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.evictions == extra);
  CHECK(st.entries == cap);
  /* A hit does not refresh an entry's place: key `extra` is still the oldest. */
  mkkey(k, extra);
  CHECK(mtp_replay_check_tls(&c, k, 5) == MTP_REPLAY_SEEN);
  mkkey(k, 1000);
  CHECK(mtp_replay_check_tls(&c, k, 5) == MTP_REPLAY_NEW);
  mkkey(k, extra);
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k, 32, 5) == MTP_REPLAY_NEW);
  mkkey(k, extra + 1);
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k, 32, 5) == MTP_REPLAY_SEEN);
  mtp_replay_free(&c);
}

/* 64 shards: eviction is FIFO within each shard; predict survivors with mtp_replay_shard_of. */
static void test_eviction_sharded(void) {
  const uint32_t per = 8, n = 64 * per * 3;
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup(&c, 64 * (136 + per * 28), 600) == MTP_OK);
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.capacity == 64 * per);
  uint8_t k[32];
  static int shard[64 * 8 * 3];
  for (uint32_t i = 0; i < n; i++) {
    mkkey(k, i);
    shard[i] = mtp_replay_shard_of(&c, MTP_REPLAY_TLS, k, 32);
    CHECK(mtp_replay_check_tls(&c, k, 7) == MTP_REPLAY_NEW);
  }
  int later[64];
  memset(later, 0, sizeof(later));
  uint64_t survivors = 0;
  for (uint32_t j = n; j-- > 0;) {
    mkkey(k, j);
    int expect = later[shard[j]] < (int)per ? MTP_REPLAY_SEEN : MTP_REPLAY_NEW;
    CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, k, 32, 7) == expect);
    survivors += expect == MTP_REPLAY_SEEN;
    later[shard[j]]++;
  }
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == survivors);
  CHECK(st.evictions == n - survivors);
  CHECK(st.inserts == n);
  mtp_replay_free(&c);
}

static void test_age(void) {
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup_shards(&c, 136 + 100 * 28, 600, 1) == MTP_OK);
  uint8_t a[32], b[32], d[32];
  mkkey(a, 1);
  mkkey(b, 2);
  mkkey(d, 3);
  CHECK(mtp_replay_check_tls(&c, a, 1000) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, a, 1600) == MTP_REPLAY_SEEN); /* age == max_age: still held */
  CHECK(mtp_replay_contains(&c, MTP_REPLAY_TLS, a, 32, 1601) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, a, 1601) == MTP_REPLAY_NEW); /* expired: new again */
  CHECK(mtp_replay_check_tls(&c, a, 1602) == MTP_REPLAY_SEEN);
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.expired == 1);
  CHECK(st.entries == 1);
  CHECK(st.evictions == 0);

  /* Lazy expiry drops every old entry from the head on the next insertion. */
  for (uint32_t i = 10; i < 30; i++) {
    mkkey(d, i);
    CHECK(mtp_replay_check_tls(&c, d, 2000) == MTP_REPLAY_NEW);
  }
  mkkey(d, 99);
  CHECK(mtp_replay_check_tls(&c, d, 3000) == MTP_REPLAY_NEW);
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 1);
  CHECK(st.expired == 1 + 1 + 20);

  /* Times going backwards: b stamped before the head entry; it expires while not at the head
   * and must still be answered as new, and then counted once. */
  mkkey(a, 500);
  CHECK(mtp_replay_check_tls(&c, a, 5000) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, b, 4900) == MTP_REPLAY_NEW);
  CHECK(mtp_replay_check_tls(&c, b, 4950) == MTP_REPLAY_SEEN);
  CHECK(mtp_replay_check_tls(&c, a, 4990) == MTP_REPLAY_SEEN); /* "future" entry: age 0 */
  CHECK(mtp_replay_check_tls(&c, b, 5550) == MTP_REPLAY_NEW);  /* age 650 */
  CHECK(mtp_replay_check_tls(&c, b, 5551) == MTP_REPLAY_SEEN);
  CHECK(mtp_replay_check_tls(&c, a, 5551) == MTP_REPLAY_SEEN); /* age 551 */
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 2); /* a and the new b; old b's ring slot is dead */
  /* The dead slot leaves the ring quietly: fill until it is pushed out. */
  for (uint32_t i = 0; i < 200; i++) {
    mkkey(d, 10000 + i);
    CHECK(mtp_replay_check_tls(&c, d, 5551) == MTP_REPLAY_NEW);
  }
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == 100);
  /* Inserted since t=5000: a, b@4900, b@5550 and 200 more = 203; 100 are kept; b@4900 left
   * by expiry (its dead ring slot is popped without counting), so 102 were evicted. */
  CHECK(st.evictions == 102);
  mtp_replay_free(&c);
}

/* Randomized run against a plain array model (one shard, monotone time). */
static void test_model(void) {
  enum { CAP = 37, KEYS = 150, OPS = 200000 };
  const uint32_t max_age = 40;
  struct mtp_replay c;
  mtp_replay_init(&c);
  CHECK(mtp_replay_setup_shards(&c, 136 + CAP * 28, max_age, 1) == MTP_OK);
  uint32_t mk[CAP], mt[CAP]; /* model FIFO: keys and times, oldest first */
  int mn = 0;
  uint64_t evict = 0, hits = 0;
  int64_t now = 1;
  uint64_t rng = 12345;
  uint8_t k[32];
  for (int op = 0; op < OPS; op++) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t key = (uint32_t)(rng >> 33) % KEYS;
    if ((rng >> 20) % 8 == 0)
      now += (int64_t)((rng >> 40) % 5);
    /* model */
    while (mn > 0 && (uint32_t)(now - mt[0]) > max_age) {
      memmove(mk, mk + 1, (size_t)(mn - 1) * sizeof(mk[0]));
      memmove(mt, mt + 1, (size_t)(mn - 1) * sizeof(mt[0]));
      mn--;
    }
    int found = 0;
    for (int i = 0; i < mn; i++)
      found |= mk[i] == key;
    int expect = found ? MTP_REPLAY_SEEN : MTP_REPLAY_NEW;
    if (found) {
      hits++;
    } else {
      if (mn == CAP) {
        memmove(mk, mk + 1, (size_t)(mn - 1) * sizeof(mk[0]));
        memmove(mt, mt + 1, (size_t)(mn - 1) * sizeof(mt[0]));
        mn--;
        evict++;
      }
      mk[mn] = key;
      mt[mn] = (uint32_t)now;
      mn++;
    }
    mkkey(k, key);
    int got = mtp_replay_check_tls(&c, k, now);
    if (got != expect) {
      fprintf(stderr, "op %d key %u now %lld: got %d expected %d\n", op, key, (long long)now,
              got, expect);
      CHECK(got == expect);
    }
  }
  CHECK(true); /* the loop above checked every step */
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&c, &st);
  CHECK(st.entries == (uint64_t)mn);
  CHECK(st.hits == hits);
  CHECK(st.evictions == evict);
  CHECK(evict > 1000 && hits > 1000); /* both paths were exercised */
  mtp_replay_free(&c);
}

static void test_alloc_failures(void) {
  int failed_ok = 0;
  for (long n = 0; n < 200; n++) {
    struct mtp_replay c;
    mtp_replay_init(&c);
    atomic_store(&alloc_countdown, n);
    int rc = mtp_replay_setup_shards(&c, 8 * (136 + 16 * 28), 60, 8);
    atomic_store(&alloc_countdown, -1);
    if (rc == MTP_OK) {
      uint8_t k[32];
      mkkey(k, 1);
      CHECK(mtp_replay_check_tls(&c, k, 1) == MTP_REPLAY_NEW);
      mtp_replay_free(&c);
      break;
    }
    CHECK(rc == MTP_ENOMEM);
    CHECK(c._shards == NULL); /* left as after init */
    mtp_replay_free(&c);
    failed_ok++;
  }
  CHECK(failed_ok == 1 + 8 * 3); /* shard array, then per shard: struct, ring, index */
}

/* ---- threads ---- */
enum { RACE_THREADS = 8, RACE_KEYS = 20000 };
static struct mtp_replay race_cache;
static atomic_int race_new[RACE_KEYS];
static atomic_int race_errors;
static pthread_barrier_t race_barrier;

struct race_arg {
  int id;
};

static void *race_main(void *p) {
  struct race_arg *a = p;
  /* Start together, so they really overlap. */
  pthread_barrier_wait(&race_barrier);
  uint8_t k[32];
  /* Every thread offers every key; half walk forwards, half backwards, from different
   * starting points, and each also adds keys nobody else offers. */
  for (int n = 0; n < RACE_KEYS; n++) {
    int i = (a->id % 2 == 0) ? (n + a->id * 997) % RACE_KEYS
                             : (RACE_KEYS - 1 - n + a->id * 991) % RACE_KEYS;
    mkkey(k, (uint32_t)i);
    int rc = mtp_replay_check_tls(&race_cache, k, 100);
    if (rc == MTP_REPLAY_NEW)
      atomic_fetch_add(&race_new[i], 1);
    else if (rc != MTP_REPLAY_SEEN)
      atomic_fetch_add(&race_errors, 1);
    /* a private key: must be new exactly once, then seen */
    mkkey(k, (uint32_t)(1000000 + a->id * RACE_KEYS + n));
    if (mtp_replay_check_and_add(&race_cache, MTP_REPLAY_OBF2, k, 32, 100) != MTP_REPLAY_NEW)
      atomic_fetch_add(&race_errors, 1);
  }
  return NULL;
}

static void test_race(void) {
  mtp_replay_init(&race_cache);
  /* Room for everything: no eviction may muddy the count. */
  size_t need = (size_t)RACE_KEYS * (1 + RACE_THREADS) * MTP_REPLAY_ENTRY_BYTES * 4;
  CHECK(mtp_replay_setup(&race_cache, need, 600) == MTP_OK);
  CHECK(pthread_barrier_init(&race_barrier, NULL, RACE_THREADS) == 0);
  pthread_t th[RACE_THREADS];
  struct race_arg args[RACE_THREADS];
  for (int t = 0; t < RACE_THREADS; t++) {
    args[t].id = t;
    CHECK(pthread_create(&th[t], NULL, race_main, &args[t]) == 0);
  }
  for (int t = 0; t < RACE_THREADS; t++)
    CHECK(pthread_join(th[t], NULL) == 0);
  int bad = 0;
  for (int i = 0; i < RACE_KEYS; i++)
    bad += atomic_load(&race_new[i]) != 1;
  CHECK(bad == 0);
  CHECK(atomic_load(&race_errors) == 0);
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&race_cache, &st);
  CHECK(st.evictions == 0);
  CHECK(st.inserts == (uint64_t)RACE_KEYS * (1 + RACE_THREADS));
  CHECK(st.entries == st.inserts);
  CHECK(st.hits == (uint64_t)RACE_KEYS * (RACE_THREADS - 1));
  mtp_replay_free(&race_cache);
  pthread_barrier_destroy(&race_barrier);
}

/* ---- throughput (printed only) ---- */
enum { BENCH_OPS = 200000 };
static struct mtp_replay bench_cache;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *bench_main(void *p) {
  uint32_t base = (uint32_t)(uintptr_t)p * BENCH_OPS;
  uint8_t k[32];
  for (uint32_t i = 0; i < BENCH_OPS; i++) {
    mkkey(k, base + i);
    mtp_replay_check_tls(&bench_cache, k, 100 + i / 1000);
  }
  return NULL;
}

static void test_throughput(void) {
  /* 4 MiB: ~150k entries, so the runs below also evict. */
  mtp_replay_init(&bench_cache);
  CHECK(mtp_replay_setup(&bench_cache, 4u << 20, 600) == MTP_OK);
  double t0 = now_s();
  bench_main((void *)(uintptr_t)0);
  double t1 = now_s();
  enum { BT = 4 };
  pthread_t th[BT];
  for (int t = 0; t < BT; t++)
    CHECK(pthread_create(&th[t], NULL, bench_main, (void *)(uintptr_t)(t + 1)) == 0);
  for (int t = 0; t < BT; t++)
    CHECK(pthread_join(th[t], NULL) == 0);
  double t2 = now_s();
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&bench_cache, &st);
  printf("throughput: 1 thread %.2f Mops/s, %d threads %.2f Mops/s total "
         "(capacity %llu, evictions %llu)\n",
         BENCH_OPS / (t1 - t0) / 1e6, BT, (double)BT * BENCH_OPS / (t2 - t1) / 1e6,
         (unsigned long long)st.capacity, (unsigned long long)st.evictions);
  CHECK(st.inserts == (uint64_t)BENCH_OPS * (BT + 1));
  mtp_replay_free(&bench_cache);
}

int main(void) {
  mtp_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
  test_basic();
  test_obf2_key_bytes();
  test_capacity();
  test_eviction_one_shard();
  test_eviction_sharded();
  test_age();
  test_model();
  test_alloc_failures();
  test_race();
  test_throughput();
  return check_report();
}
