/*
 * test_log - per-module debug switches (shared/log.c): names are validated and a bad list
 * changes nothing; "all", "none" and "" work; the switch is exact per module and independent
 * of the level; the printed list follows the order modules were first switched on; the
 * 32-name limit; and the line format of mtp_logm / mtp_debugm / mtp_debugmc (captured from
 * stderr), including that a debug line of a module that is off is never formatted.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "err.h"
#include "log.h"
#include "banned.h"

static int g_formatted;

/* An argument with a side effect: counts how often a debug call's arguments were evaluated. */
static int touch(void) { return ++g_formatted; }

/* Runs fn with stderr redirected to a temp file and returns what it wrote (static buffer). */
static const char *capture(void (*fn)(void)) {
  static char out[4096];
  char path[] = "/tmp/mtp-test-log-XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  fflush(stderr);
  int saved = dup(2);
  CHECK(dup2(fd, 2) == 2);
  fn();
  fflush(stderr);
  CHECK(dup2(saved, 2) == 2);
  close(saved);
  ssize_t n = pread(fd, out, sizeof(out) - 1, 0);
  close(fd);
  unlink(path);
  out[n > 0 ? n : 0] = '\0';
  return out;
}

static void emit(void) {
  struct mtp_log_ctx ctx = {.id = 7, .peer = "1.2.3.4:5", .where = "l0"};
  mtp_debugm("policy", "rule %d", touch());
  mtp_debugmc("session", &ctx, "state %s", "relay");
  mtp_debugm("tunnel", "off %d", touch());
  mtp_debug("plain debug %d", touch());
}

int main(void) {
  mtp_log_level = MTP_LOG_INFO;
  char list[256];
  CHECK(!mtp_log_module_enabled("policy"));
  CHECK(mtp_log_set_debug_modules("policy, session") == MTP_OK);
  CHECK(mtp_log_module_enabled("policy") && mtp_log_module_enabled("session"));
  CHECK(!mtp_log_module_enabled("tunnel") && !mtp_log_module_enabled("polic") && !mtp_log_module_enabled(NULL));
  mtp_log_debug_modules(list, sizeof(list));
  CHECK(strcmp(list, "policy,session") == 0);

  /* Bad lists change nothing. */
  CHECK(mtp_log_set_debug_modules("tunnel,Bad") == MTP_EINVAL);
  CHECK(mtp_log_set_debug_modules("a b") == MTP_EINVAL);
  CHECK(mtp_log_set_debug_modules("x234567890123456789012345678901234") == MTP_EINVAL);
  CHECK(mtp_log_module_enabled("policy") && !mtp_log_module_enabled("tunnel"));

  /* Lines: module on -> printed with its tag and context; off -> not even formatted. */
  g_formatted = 0;
  const char *out = capture(emit);
  CHECK_MSG(strstr(out, " debug policy: rule 1\n") != NULL, "%s", out);
  CHECK(strstr(out, " debug session: [c7 1.2.3.4:5 l0] state relay\n") != NULL);
  CHECK(strstr(out, "tunnel") == NULL && strstr(out, "plain debug") == NULL);
  CHECK(g_formatted == 1);

  /* The level still works as before: at debug everything is printed. */
  mtp_log_level = MTP_LOG_DEBUG;
  g_formatted = 0;
  out = capture(emit);
  CHECK(strstr(out, "debug tunnel: off") != NULL && strstr(out, "plain debug") != NULL);
  CHECK(g_formatted == 3);
  mtp_log_level = MTP_LOG_INFO;

  /* Switching to another set turns the others off; "none" and "" clear; "all" is everything. */
  CHECK(mtp_log_set_debug_modules("tunnel") == MTP_OK);
  CHECK(mtp_log_module_enabled("tunnel") && !mtp_log_module_enabled("policy"));
  CHECK(mtp_log_set_debug_modules("none") == MTP_OK);
  CHECK(!mtp_log_module_enabled("tunnel"));
  CHECK(atomic_load(&mtp_log_module_mask) == 0);
  CHECK(mtp_log_set_debug_modules("all") == MTP_OK);
  CHECK(mtp_log_module_enabled("anything"));
  mtp_log_debug_modules(list, sizeof(list));
  CHECK(strcmp(list, "all") == 0);
  CHECK(mtp_log_set_debug_modules("") == MTP_OK);
  CHECK(!mtp_log_module_enabled("anything"));
  mtp_log_debug_modules(list, sizeof(list));
  CHECK(strcmp(list, "") == 0);
  CHECK(mtp_log_set_debug_modules(NULL) == MTP_OK);

  /* Up to 32 distinct names over the process's life; the 33rd fails and changes nothing. */
  char name[16];
  for (int i = 3; i < MTP_LOG_MAX_MODULES; i++) { /* policy, session, tunnel are known */
    snprintf(name, sizeof(name), "m%d", i);
    CHECK(mtp_log_set_debug_modules(name) == MTP_OK);
    CHECK(mtp_log_module_enabled(name));
  }
  CHECK(mtp_log_set_debug_modules("policy,one-too-many") == MTP_ENOMEM);
  CHECK(mtp_log_module_enabled(name) && !mtp_log_module_enabled("policy"));
  CHECK(mtp_log_set_debug_modules("policy,m3") == MTP_OK); /* known names still work */
  CHECK(mtp_log_module_enabled("policy") && mtp_log_module_enabled("m3"));

  /* Levels by name. */
  int lv = -1;
  CHECK(mtp_log_parse_level("warn", &lv) == MTP_OK && lv == MTP_LOG_WARN);
  CHECK(mtp_log_parse_level("loud", &lv) == MTP_EINVAL);
  CHECK(strcmp(mtp_log_level_name(MTP_LOG_DEBUG), "debug") == 0 && strcmp(mtp_log_level_name(9), "?") == 0);
  return check_report();
}
