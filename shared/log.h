/*
 * log.h - one line per event on stderr: time, level, optional module and connection context,
 * message. Keys, secrets and payloads are never logged. Debug calls check the level (and the
 * module switch) before formatting anything.
 *
 * Per-module debug: a debug call tagged with a module name (mtp_debugm / mtp_debugmc) is
 * printed when the level is debug, or when that module is switched on at runtime
 * (mtp_log_set_debug_modules: the --log-debug flag, the log_debug key, the admin API
 * `POST /log?debug=...`). Switching modules on does not turn on untagged debug lines.
 * The check costs one relaxed atomic load while no module is on.
 */
#ifndef MTP_LOG_H
#define MTP_LOG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum mtp_log_level { MTP_LOG_ERROR = 0, MTP_LOG_WARN = 1, MTP_LOG_INFO = 2, MTP_LOG_DEBUG = 3 };

/* Current level; messages above it are dropped. Written at startup, by reload and by the
 * admin API (`POST /log?level=`). */
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
/* Like mtp_logc with a module tag ("debug session: [c1 ...] ..."); ctx may be NULL. Prints
 * when level is within mtp_log_level or the module is switched on. */
void mtp_logm(const char *module, const struct mtp_log_ctx *ctx, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Parses "error|warn|info|debug" into *level. Returns 0 or MTP_EINVAL. */
int mtp_log_parse_level(const char *s, int *level);
/* "error", "warn", "info" or "debug" ("?" for anything else). */
const char *mtp_log_level_name(int level);

/* ---- per-module debug ---- */

/* The most distinct module names ever switched on in one process, and the longest name. */
#define MTP_LOG_MAX_MODULES 32
#define MTP_LOG_MODULE_NAME_MAX 31

/* Non-zero while at least one module is on (bit i = the i-th name ever switched on; bit 63 =
 * "all"). Read on every tagged debug call: keep it to this one load. */
extern _Atomic uint64_t mtp_log_module_mask;

/*
 * Switches debug on for exactly the modules in list: "mod1,mod2" (names of [a-z0-9_-], at
 * most MTP_LOG_MODULE_NAME_MAX chars), "all" (every tagged line), "" or "none" (off).
 * Spaces around names are ignored. Any thread; the new set applies to every thread at once.
 * Returns MTP_OK, or MTP_EINVAL (bad name: nothing changes) or MTP_ENOMEM (more than
 * MTP_LOG_MAX_MODULES distinct names over the process's life: nothing changes).
 */
int mtp_log_set_debug_modules(const char *list);
/* Writes the modules now on as "mod1,mod2" ("all", or "" when none) into out[0..len). */
void mtp_log_debug_modules(char *out, size_t len);
/* True when tagged debug lines of module are printed because of the module switch (the
 * level is not looked at). Any thread, no lock. */
bool mtp_log_module_enabled(const char *module);

#define MTP_LOG_ON(lvl) ((lvl) <= mtp_log_level)
/* True when a debug line of module would be printed. */
#define MTP_DEBUGM_ON(module)                                                                 \
  (MTP_LOG_ON(MTP_LOG_DEBUG) ||                                                              \
   (atomic_load_explicit(&mtp_log_module_mask, memory_order_relaxed) != 0 && mtp_log_module_enabled(module)))

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
/* Debug lines of a module: mtp_debugm("policy", "rule %d rejected", i). */
#define mtp_debugm(module, ...)                              \
  do {                                                       \
    if (MTP_DEBUGM_ON(module))                               \
      mtp_logm((module), NULL, MTP_LOG_DEBUG, __VA_ARGS__); \
  } while (0)
#define mtp_debugmc(module, ctx, ...)                         \
  do {                                                        \
    if (MTP_DEBUGM_ON(module))                                \
      mtp_logm((module), (ctx), MTP_LOG_DEBUG, __VA_ARGS__); \
  } while (0)

#endif
