/*
 * alloc.h - every heap allocation of mtproxy goes through these, so tests can count
 * allocations and make the Nth one fail (see mtp_replace_allocator).
 */
#ifndef MTP_ALLOC_H
#define MTP_ALLOC_H

#include <stddef.h>

void *mtp_malloc(size_t n);
void *mtp_calloc(size_t count, size_t n);
void *mtp_realloc(void *p, size_t n);
void mtp_free(void *p);
/* A copy of s with mtp_malloc, or NULL. */
char *mtp_strdup(const char *s);

typedef void *(*mtp_malloc_fn)(size_t);
typedef void *(*mtp_realloc_fn)(void *, size_t);
typedef void *(*mtp_calloc_fn)(size_t, size_t);
typedef void (*mtp_free_fn)(void *);

/* Replaces the allocator (process-wide; call before any allocation). Returns MTP_OK. */
int mtp_replace_allocator(mtp_malloc_fn m, mtp_realloc_fn r, mtp_calloc_fn c, mtp_free_fn f);

#endif
