#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "banned.h"

volatile int mtp_log_level = MTP_LOG_INFO;
_Atomic uint64_t mtp_log_module_mask;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

#define ALL_BIT (UINT64_C(1) << 63)

/* Module names ever switched on. An entry below module_count is written once, before the
 * count that covers it is published (release), and never changes: readers need no lock.
 * Writers (mtp_log_set_debug_modules) take modules_lock. */
static char module_names[MTP_LOG_MAX_MODULES][MTP_LOG_MODULE_NAME_MAX + 1];
static _Atomic unsigned module_count;
static pthread_mutex_t modules_lock = PTHREAD_MUTEX_INITIALIZER;

static void vlog(const char *module, const struct mtp_log_ctx *ctx, int level, const char *fmt, va_list ap) {
  char line[1024];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ", tm.tm_year + 1900,
                   tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                   level_names[level]);
  if (module != NULL && n > 0 && (size_t)n < sizeof(line))
    n += snprintf(line + n, sizeof(line) - (size_t)n, "%s: ", module);
  if (ctx != NULL && n > 0 && (size_t)n < sizeof(line))
    n += snprintf(line + n, sizeof(line) - (size_t)n, "[c%llu %s%s%s] ", ctx->id, ctx->peer,
                  ctx->where ? " " : "", ctx->where ? ctx->where : "");
  if (n > 0 && (size_t)n < sizeof(line))
    n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
  if (n < 0)
    return;
  if ((size_t)n >= sizeof(line) - 1)
    n = (int)sizeof(line) - 2;
  line[n++] = '\n';
  fwrite(line, 1, (size_t)n, stderr);
}

void mtp_log(int level, const char *fmt, ...) {
  if (!MTP_LOG_ON(level))
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(NULL, NULL, level, fmt, ap);
  va_end(ap);
}

void mtp_logc(const struct mtp_log_ctx *ctx, int level, const char *fmt, ...) {
  if (!MTP_LOG_ON(level))
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(NULL, ctx, level, fmt, ap);
  va_end(ap);
}

void mtp_logm(const char *module, const struct mtp_log_ctx *ctx, int level, const char *fmt, ...) {
  if (level < MTP_LOG_ERROR || level > MTP_LOG_DEBUG)
    return;
  if (!MTP_LOG_ON(level) && !(level == MTP_LOG_DEBUG && mtp_log_module_enabled(module)))
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(module, ctx, level, fmt, ap);
  va_end(ap);
}

int mtp_log_parse_level(const char *s, int *level) {
  for (int i = 0; i < 4; i++) {
    if (strcmp(s, level_names[i]) == 0) {
      *level = i;
      return MTP_OK;
    }
  }
  return MTP_EINVAL;
}

const char *mtp_log_level_name(int level) {
  return level >= MTP_LOG_ERROR && level <= MTP_LOG_DEBUG ? level_names[level] : "?";
}

/* ---- per-module debug ---- */

bool mtp_log_module_enabled(const char *module) {
  uint64_t mask = atomic_load_explicit(&mtp_log_module_mask, memory_order_acquire);
  if (mask == 0 || module == NULL)
    return false;
  if (mask & ALL_BIT)
    return true;
  unsigned n = atomic_load_explicit(&module_count, memory_order_acquire);
  for (unsigned i = 0; i < n; i++)
    if ((mask & (UINT64_C(1) << i)) && strcmp(module_names[i], module) == 0)
      return true;
  return false;
}

static bool name_char_ok(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* Copies the next comma-separated name of *p into name (trimmed) and advances *p. Returns its
 * length, 0 for an empty item, or -1 for a bad one. */
static int next_name(const char **p, char name[MTP_LOG_MODULE_NAME_MAX + 1]) {
  const char *s = *p;
  while (*s == ' ')
    s++;
  size_t n = 0;
  int bad = 0;
  while (*s != '\0' && *s != ',' && *s != ' ') {
    if (!name_char_ok(*s) || n >= MTP_LOG_MODULE_NAME_MAX)
      bad = 1;
    else
      name[n++] = *s;
    s++;
  }
  while (*s == ' ')
    s++;
  if (*s != '\0' && *s != ',')
    bad = 1; /* "a b" */
  if (*s == ',')
    s++;
  name[n] = '\0';
  *p = s;
  return bad ? -1 : (int)n;
}

static int find_module(const char *name, unsigned n) {
  for (unsigned i = 0; i < n; i++)
    if (strcmp(module_names[i], name) == 0)
      return (int)i;
  return -1;
}

int mtp_log_set_debug_modules(const char *list) {
  if (list == NULL)
    list = "";
  char name[MTP_LOG_MODULE_NAME_MAX + 1];
  /* First pass: validate, and count the names not yet known, so a failure changes nothing. */
  pthread_mutex_lock(&modules_lock);
  unsigned count = atomic_load_explicit(&module_count, memory_order_relaxed);
  unsigned fresh = 0;
  bool all = false;
  char pending[MTP_LOG_MAX_MODULES][MTP_LOG_MODULE_NAME_MAX + 1];
  for (const char *p = list; *p != '\0';) {
    int len = next_name(&p, name);
    if (len < 0) {
      pthread_mutex_unlock(&modules_lock);
      return MTP_EINVAL;
    }
    if (len == 0 || strcmp(name, "none") == 0)
      continue;
    if (strcmp(name, "all") == 0) {
      all = true;
      continue;
    }
    if (find_module(name, count) >= 0)
      continue;
    bool dup = false;
    for (unsigned i = 0; i < fresh; i++)
      dup = dup || strcmp(pending[i], name) == 0;
    if (dup)
      continue;
    if (count + fresh >= MTP_LOG_MAX_MODULES) {
      pthread_mutex_unlock(&modules_lock);
      return MTP_ENOMEM;
    }
    memcpy(pending[fresh++], name, sizeof(name));
  }
  /* Register the new names, then publish the count, then the mask that refers to them. */
  for (unsigned i = 0; i < fresh; i++)
    memcpy(module_names[count + i], pending[i], sizeof(pending[i]));
  count += fresh;
  atomic_store_explicit(&module_count, count, memory_order_release);
  uint64_t mask = all ? ALL_BIT : 0;
  for (const char *p = list; *p != '\0';) {
    if (next_name(&p, name) <= 0)
      continue;
    int i = find_module(name, count);
    if (i >= 0)
      mask |= UINT64_C(1) << i;
  }
  atomic_store_explicit(&mtp_log_module_mask, mask, memory_order_release);
  pthread_mutex_unlock(&modules_lock);
  return MTP_OK;
}

void mtp_log_debug_modules(char *out, size_t len) {
  if (len == 0)
    return;
  out[0] = '\0';
  uint64_t mask = atomic_load_explicit(&mtp_log_module_mask, memory_order_acquire);
  if (mask & ALL_BIT) {
    snprintf(out, len, "all");
    return;
  }
  unsigned n = atomic_load_explicit(&module_count, memory_order_acquire);
  size_t used = 0;
  for (unsigned i = 0; i < n && used < len; i++) {
    if (!(mask & (UINT64_C(1) << i)))
      continue;
    int w = snprintf(out + used, len - used, "%s%s", used ? "," : "", module_names[i]);
    if (w < 0)
      break;
    used += (size_t)w;
  }
}
