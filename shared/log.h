/*
 * log.h - one line per event on stderr: time, level, optional connection context, message.
 * Keys, secrets and payloads are never logged. Debug calls check the level before formatting.
 */
#ifndef MTP_LOG_H
#define MTP_LOG_H

enum mtp_log_level { MTP_LOG_ERROR = 0, MTP_LOG_WARN = 1, MTP_LOG_INFO = 2, MTP_LOG_DEBUG = 3 };

/* Current level; messages above it are dropped. Written at startup and by reload only. */
extern volatile int mtp_log_level;

/* Context a connection carries; appended to its log lines as "[id peer listener]". */
struct mtp_log_ctx {
  unsigned long long id;
  char peer[64];      /* "1.2.3.4:5678" or "[::1]:5678" */
  const char *where;  /* borrows: listener name or "dc2" etc., may be NULL */
};

void mtp_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void mtp_logc(const struct mtp_log_ctx *ctx, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Parses "error|warn|info|debug" into *level. Returns 0 or MTP_EINVAL. */
int mtp_log_parse_level(const char *s, int *level);

#define MTP_LOG_ON(lvl) ((lvl) <= mtp_log_level)
#define mtp_debug(...)                    \
  do {                                    \
    if (MTP_LOG_ON(MTP_LOG_DEBUG))        \
      mtp_log(MTP_LOG_DEBUG, __VA_ARGS__); \
  } while (0)
#define mtp_debugc(ctx, ...)                     \
  do {                                           \
    if (MTP_LOG_ON(MTP_LOG_DEBUG))               \
      mtp_logc((ctx), MTP_LOG_DEBUG, __VA_ARGS__); \
  } while (0)

#endif
