/*
 * check.h - the assertion and reporting helpers shared by the tests (include as "check.h").
 *
 *   CHECK(cond)              counts a pass, or prints "file:line: CHECK failed: cond" and exits 1
 *   CHECK_MSG(cond, fmt,...) the same, with a printf-style explanation after the condition
 *   return check_report();   prints "N passed, M failed" on its own line; 1 if anything failed
 *
 * A failed check stops the test at once (after printing the report line), so later checks never
 * run on a broken state. The counters are atomic: checks may run on any thread.
 *
 * Also here, for the tests that want them:
 *   check_seed / check_rand64 / check_rand32 / check_fill   a deterministic xorshift64 filler
 *   check_tmpdir_make / check_path / check_write_file / check_tmpdir_remove   a scratch dir
 *   check_run_until(loop, pred, arg, timeout_ms)   (only when <uv.h> is included before this)
 */
#ifndef MTP_TESTS_CHECK_H
#define MTP_TESTS_CHECK_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static atomic_int check_passed_, check_failed_;

/* Called once before a failed check exits (e.g. to stop a spawned proxy and remove temp files). */
static void (*check_on_fail)(void);

/* Prints "N passed, M failed" and returns the exit status: 0, or 1 if any check failed. */
static inline int check_report(void) {
  int f = atomic_load(&check_failed_);
  printf("%d passed, %d failed\n", atomic_load(&check_passed_), f);
  fflush(stdout);
  return f ? 1 : 0;
}

/* A failed check: "file:line: CHECK failed: cond[: explanation]", the report line, exit 1. */
__attribute__((noreturn)) static inline void check_die_(void) {
  fputc('\n', stderr);
  atomic_fetch_add(&check_failed_, 1);
  void (*hook)(void) = check_on_fail;
  check_on_fail = NULL;
  if (hook != NULL)
    hook();
  exit(check_report());
}

__attribute__((noreturn)) static inline void check_fail_(const char *file, int line, const char *expr) {
  fprintf(stderr, "%s:%d: CHECK failed: %s", file, line, expr);
  check_die_();
}

__attribute__((noreturn, format(printf, 4, 5))) static inline void check_failf_(const char *file, int line,
                                                                                 const char *expr, const char *fmt,
                                                                                 ...) {
  fprintf(stderr, "%s:%d: CHECK failed: %s: ", file, line, expr);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  check_die_();
}

#define CHECK(cond)                                \
  do {                                             \
    if (cond)                                      \
      atomic_fetch_add(&check_passed_, 1);         \
    else                                           \
      check_fail_(__FILE__, __LINE__, #cond);      \
  } while (0)

#define CHECK_MSG(cond, ...)                                 \
  do {                                                       \
    if (cond)                                                \
      atomic_fetch_add(&check_passed_, 1);                   \
    else                                                     \
      check_failf_(__FILE__, __LINE__, #cond, __VA_ARGS__);  \
  } while (0)

/* ---- deterministic pseudo-random data (xorshift64; each test seeds it so failures reproduce) ---- */

static uint64_t check_rng_ = 0x9e3779b97f4a7c15ull;

static inline void check_seed(uint64_t seed) { check_rng_ = seed; }

static inline uint64_t check_rand64(void) {
  check_rng_ ^= check_rng_ << 13;
  check_rng_ ^= check_rng_ >> 7;
  check_rng_ ^= check_rng_ << 17;
  return check_rng_;
}

static inline uint32_t check_rand32(void) { return (uint32_t)(check_rand64() >> 16); }

static inline void check_fill(uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)check_rand32();
}

/* ---- a scratch directory under /tmp ---- */

static char check_tmpdir[256];

/* Creates /tmp/<name>.XXXXXX; returns its path. */
static inline const char *check_tmpdir_make(const char *name) {
  snprintf(check_tmpdir, sizeof(check_tmpdir), "/tmp/%s.XXXXXX", name);
  CHECK(mkdtemp(check_tmpdir) != NULL);
  return check_tmpdir;
}

/* "<tmpdir>/<name>" in one of 16 rotating static buffers (valid for the next 15 calls). */
static inline char *check_path(const char *name) {
  static char bufs[16][512];
  static int k;
  char *p = bufs[k++ % 16];
  snprintf(p, sizeof(bufs[0]), "%s/%s", check_tmpdir, name);
  return p;
}

/* Writes <tmpdir>/<name> (does not use the rotating buffers of check_path). */
static inline void check_write_file(const char *name, const void *data, size_t len) {
  char p[512];
  snprintf(p, sizeof(p), "%s/%s", check_tmpdir, name);
  FILE *f = fopen(p, "wb");
  CHECK(f != NULL);
  CHECK(fwrite(data, 1, len, f) == len);
  fclose(f);
}

static inline void check_tmpdir_remove(void) {
  char cmd[512];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", check_tmpdir);
  (void)!system(cmd);
}

/* ---- running a libuv loop until something holds (only with <uv.h> included first) ---- */

#ifdef UV_VERSION_MAJOR
static inline void check_on_tick_(uv_timer_t *t) { (void)t; }

/* Runs `loop` until pred(arg) holds or timeout_ms passes; returns pred's last answer. A 10 ms
 * timer keeps UV_RUN_ONCE from blocking forever; it is closed again before returning. */
static inline bool check_run_until(uv_loop_t *loop, bool (*pred)(void *), void *arg, int timeout_ms) {
  uv_timer_t tick;
  uv_timer_init(loop, &tick);
  uv_timer_start(&tick, check_on_tick_, 10, 10);
  uv_update_time(loop);
  uint64_t deadline = uv_now(loop) + (uint64_t)timeout_ms;
  bool ok;
  while (!(ok = pred(arg)) && uv_now(loop) < deadline)
    uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return ok;
}
#endif

#endif
