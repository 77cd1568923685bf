#include "alloc.h"

#include <stdlib.h>
#include <string.h>

#include "err.h"

static mtp_malloc_fn g_malloc = malloc;
static mtp_realloc_fn g_realloc = realloc;
static mtp_calloc_fn g_calloc = calloc;
static mtp_free_fn g_free = free;

void *mtp_malloc(size_t n) { return g_malloc(n); }
void *mtp_calloc(size_t count, size_t n) { return g_calloc(count, n); }
void *mtp_realloc(void *p, size_t n) { return g_realloc(p, n); }
void mtp_free(void *p) { g_free(p); }

char *mtp_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = mtp_malloc(n);
  if (d != NULL)
    memcpy(d, s, n);
  return d;
}

int mtp_replace_allocator(mtp_malloc_fn m, mtp_realloc_fn r, mtp_calloc_fn c, mtp_free_fn f) {
  g_malloc = m;
  g_realloc = r;
  g_calloc = c;
  g_free = f;
  return MTP_OK;
}
