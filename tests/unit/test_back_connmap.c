/*
 * test_back_connmap.c - the back's conn_id -> stream map: insert/replace/lookup/delete,
 * growth, and deletion inside probe runs (backward shift), checked against a plain array.
 */
#include <stdio.h>
#include <stdlib.h>

#include "connmap.h"
#include "err.h"
#include "check.h"

int main(void) {
  check_seed(88172645463325252ULL);
  struct mtp_connmap m;
  mtp_connmap_init(&m);
  CHECK(mtp_connmap_get(&m, 1) == NULL);
  CHECK(mtp_connmap_del(&m, 1) == NULL);
  CHECK(mtp_connmap_put(&m, 0, &m) == MTP_EINVAL);
  int a, b;
  CHECK(mtp_connmap_put(&m, 5, &a) == MTP_OK);
  CHECK(mtp_connmap_put(&m, 5, &b) == MTP_OK); /* replace */
  CHECK(m.n == 1 && mtp_connmap_get(&m, 5) == &b);
  CHECK(mtp_connmap_del(&m, 5) == &b && m.n == 0 && mtp_connmap_get(&m, 5) == NULL);

  /* random workload against a reference array; small keys collide in probe runs */
  enum { N = 5000 };
  static uint64_t keys[N];
  static int present[N];
  static int vals[N];
  for (int i = 0; i < N; i++)
    keys[i] = (i % 2) ? check_rand64() | 1 : (uint64_t)(i + 1) * 1024; /* half with equal low bits */
  for (int round = 0; round < 200000; round++) {
    int i = (int)(check_rand64() % N);
    if (check_rand64() % 3 == 0) {
      void *v = mtp_connmap_del(&m, keys[i]);
      CHECK(v == (present[i] ? &vals[i] : NULL));
      present[i] = 0;
    } else {
      CHECK(mtp_connmap_put(&m, keys[i], &vals[i]) == MTP_OK);
      present[i] = 1;
    }
    if (round % 1000 == 0) {
      size_t n = 0;
      for (int j = 0; j < N; j++) {
        n += present[j];
        if (mtp_connmap_get(&m, keys[j]) != (present[j] ? &vals[j] : NULL)) {
          fprintf(stderr, "mismatch at key %d round %d\n", j, round);
          exit(1);
        }
      }
      CHECK(n == m.n);
    }
  }
  for (int j = 0; j < N; j++)
    if (present[j])
      CHECK(mtp_connmap_del(&m, keys[j]) == &vals[j]);
  CHECK(m.n == 0);
  mtp_connmap_free(&m);
  mtp_connmap_free(&m); /* idempotent */
  return check_report();
}
