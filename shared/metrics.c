#include "metrics.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "err.h"

#define MAX_BLOCKS 1024

static struct mtp_metrics fallback;
_Thread_local struct mtp_metrics *mtp_metrics_self = &fallback;

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mtp_metrics *blocks[MAX_BLOCKS];
static size_t nblocks;

int mtp_metrics_thread_register(void) {
  /* Blocks live until exit: a scrape may run while a thread is ending. */
  struct mtp_metrics *m = mtp_calloc(1, sizeof(*m));
  if (m == NULL)
    return MTP_ENOMEM;
  pthread_mutex_lock(&reg_lock);
  if (nblocks == MAX_BLOCKS) {
    pthread_mutex_unlock(&reg_lock);
    mtp_free(m);
    return MTP_ENOMEM;
  }
  blocks[nblocks++] = m;
  pthread_mutex_unlock(&reg_lock);
  mtp_metrics_self = m;
  return MTP_OK;
}

void mtp_metrics_sum(int64_t out[MTP_M__COUNT]) {
  for (size_t i = 0; i < MTP_M__COUNT; i++)
    out[i] = atomic_load_explicit(&fallback.v[i], memory_order_relaxed);
  pthread_mutex_lock(&reg_lock);
  for (size_t b = 0; b < nblocks; b++)
    for (size_t i = 0; i < MTP_M__COUNT; i++)
      out[i] += atomic_load_explicit(&blocks[b]->v[i], memory_order_relaxed);
  pthread_mutex_unlock(&reg_lock);
}

static const char *const m_name[] = {
#define XX(id, name, labels, type, help) name,
    MTP_METRICS_MAP(XX)
#undef XX
};
static const char *const m_labels[] = {
#define XX(id, name, labels, type, help) labels,
    MTP_METRICS_MAP(XX)
#undef XX
};
static const char *const m_type[] = {
#define XX(id, name, labels, type, help) #type,
    MTP_METRICS_MAP(XX)
#undef XX
};
static const char *const m_help[] = {
#define XX(id, name, labels, type, help) help,
    MTP_METRICS_MAP(XX)
#undef XX
};

int mtp_metrics_format(char **out, size_t *outlen) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  size_t cap = 512 * MTP_M__COUNT, len = 0;
  char *s = mtp_malloc(cap);
  if (s == NULL)
    return MTP_ENOMEM;
  for (size_t i = 0; i < MTP_M__COUNT; i++) {
    /* HELP/TYPE once per family: the first entry of a name carries the help text. */
    bool first = i == 0 || strcmp(m_name[i - 1], m_name[i]) != 0;
    int n;
    if (first)
      n = snprintf(s + len, cap - len, "# HELP %s %s\n# TYPE %s %s\n", m_name[i], m_help[i], m_name[i], m_type[i]);
    else
      n = 0;
    len += (size_t)n;
    if (m_labels[i][0] != '\0')
      n = snprintf(s + len, cap - len, "%s{%s} %lld\n", m_name[i], m_labels[i], (long long)v[i]);
    else
      n = snprintf(s + len, cap - len, "%s %lld\n", m_name[i], (long long)v[i]);
    len += (size_t)n;
  }
  *out = s;
  *outlen = len;
  return MTP_OK;
}
