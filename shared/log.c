#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "err.h"

volatile int mtp_log_level = MTP_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

static void vlog(const struct mtp_log_ctx *ctx, int level, const char *fmt, va_list ap) {
  char line[1024];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ", tm.tm_year + 1900,
                   tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                   level_names[level]);
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
  vlog(NULL, level, fmt, ap);
  va_end(ap);
}

void mtp_logc(const struct mtp_log_ctx *ctx, int level, const char *fmt, ...) {
  if (!MTP_LOG_ON(level))
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(ctx, level, fmt, ap);
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
