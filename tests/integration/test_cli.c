/*
 * test_cli - the mtproxy command line: every bad input gives exactly one error line that
 * names the input, and exit code 2; --help prints the usage with exit 0; a missing secret is
 * an error. Then SIGINT and SIGTERM each stop a running proxy that has an idle connected
 * client: exit 0, a "stopped" log line, within 5 s, and the client sees the close.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
#include "tclient.h"
#include "check.h"
#include "banned.h"

static struct h_proc g_proc;
static struct fake_middle *g_fm;
static char g_dir[256];

/* Run by a failed CHECK before it exits: the log, then everything this test started. */
static void fail_cleanup(void) {
  h_dump_log(&g_proc);
  h_stop(&g_proc, 5000);
  fm_free(g_fm);
  h_rmdir(g_dir);
}


static const char *k_secret_hex = "00112233445566778899aabbccddeeff";
static const char *g_bin;

/* Runs mtproxy with args (NULL-terminated, without argv[0]); returns the output and code. */
static char *run(char *const *args, int *code) {
  char *out = NULL;
  int rc = hx_run_cmd(g_bin, NULL, args, 10000, &out, code);
  CHECK(rc == 0);
  CHECK(out != NULL);
  return out;
}

/* Exactly one non-empty line, ending in '\n', containing every needle. */
static void expect_error(const char *what, char *const *args, const char *needle1, const char *needle2) {
  int code = -1;
  char *out = run(args, &code);
  fprintf(stderr, "%-28s exit %d: %s", what, code, out);
  CHECK(code == 2);
  size_t len = strlen(out);
  CHECK(len > 1 && out[len - 1] == '\n');
  CHECK(strchr(out, '\n') == out + len - 1); /* one line */
  CHECK(strstr(out, needle1) != NULL);
  if (needle2)
    CHECK(strstr(out, needle2) != NULL);
  mtp_free(out);
}

static bool wait_closed(struct tclient *c) {
  size_t bytes = 0;
  return hx_wait_eof(c->fd, 5000, &bytes) == 0;
}

/* Starts a proxy, connects one client that echoes once and then idles, sends sig. */
static void stop_with_signal(int sig, const char *sp, const char *cp) {
  char *argv[] = {(char *)g_bin, "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex, "--proxy-secret",
                  (char *)sp, "--proxy-config", (char *)cp, "--workers", "2", "--log-level", "info", "--drain-timeout", "0", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  uint16_t port = 0;
  CHECK(h_wait_listener(&g_proc, "l0", &port, 30000) == 0);
  uint8_t secret[16];
  CHECK(mtp_hex_decode(k_secret_hex, secret, 16) == 16);
  struct tclient c, idle;
  tc_init(&c);
  tc_init(&idle);
  CHECK(tc_connect(&c, "127.0.0.1", port, secret, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
  uint8_t pkt[128];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  /* and one that has not even finished its handshake */
  idle.fd = hx_connect(port, 5000);
  CHECK(idle.fd >= 0);

  int64_t t0 = hx_now_ms();
  int code = hx_signal_wait(&g_proc, sig, 5000);
  int64_t el = hx_now_ms() - t0;
  fprintf(stderr, "signal %d: exit %d after %lld ms\n", sig, code, (long long)el);
  CHECK(code == 0);
  CHECK(el < 5000);
  CHECK(h_wait_log(&g_proc, "stopped", NULL, 0, 5000) == 0);
  char needle[64];
  snprintf(needle, sizeof(needle), "signal %d: stopping", sig);
  CHECK(h_wait_log(&g_proc, needle, NULL, 0, 1000) == 0);
  /* The last line it wrote is the "stopped" one. */
  char *log = h_log_text(&g_proc);
  CHECK(log != NULL);
  size_t ll = strlen(log);
  while (ll > 0 && log[ll - 1] == '\n')
    log[--ll] = '\0';
  const char *last = strrchr(log, '\n');
  last = last ? last + 1 : log;
  CHECK(strstr(last, "stopped") != NULL);
  CHECK(strstr(log, "error") == NULL); /* a clean stop: no error-level lines */
  mtp_free(log);
  CHECK(wait_closed(&c));
  CHECK(wait_closed(&idle));
  tc_close(&c);
  tc_close(&idle);
  CHECK(h_stop(&g_proc, 1000) == 0);
  h_remove_log(&g_proc);
  /* The proxy's RPC connections are gone. */
  CHECK(fm_wait_open(g_fm, 0, 5000));
}

int main(void) {
  g_proc.pid = -1;
  check_on_fail = fail_cleanup;
  g_bin = h_mtproxy_bin();
  if (!g_bin) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    return 1;
  }
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  char missing[300], badjson[300], unknown[300];
  snprintf(missing, sizeof(missing), "%s/no-such-file.json", g_dir);
  snprintf(badjson, sizeof(badjson), "%s/bad.json", g_dir);
  snprintf(unknown, sizeof(unknown), "%s/unknown.json", g_dir);
  static const char bad_text[] = "{\n  \"workers\": 1,\n  \"log_level\": \n}\n";
  static const char unknown_text[] = "{\"workerz\": 1}\n";
  CHECK(h_write_file(badjson, bad_text, sizeof(bad_text) - 1) == 0);
  CHECK(h_write_file(unknown, unknown_text, sizeof(unknown_text) - 1) == 0);

  /* A valid base so that each case has exactly one problem. */
#define BASE "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex
  {
    char *a[] = {BASE, "--bogus-flag", "1", NULL};
    expect_error("unknown flag", a, "--bogus-flag", NULL);
  }
  {
    char *a[] = {BASE, "--port", NULL};
    expect_error("--port without value", a, "--port", "missing value");
  }
  {
    char *a[] = {BASE, "--port", "70000", NULL};
    expect_error("--port 70000", a, "--port", "70000");
  }
  {
    char *a[] = {"--listen", "127.0.0.1:0", "--secret", "xyz", NULL};
    expect_error("--secret xyz", a, "--secret", "xyz");
  }
  {
    char *a[] = {BASE, "--tag", "short", NULL};
    expect_error("--tag short", a, "--tag", "short");
  }
  {
    char *a[] = {BASE, "--workers", "-1", NULL};
    expect_error("--workers -1", a, "--workers", "-1");
  }
  {
    char *a[] = {"--listen", "garbage", "--secret", (char *)k_secret_hex, NULL};
    expect_error("--listen garbage", a, "--listen", "garbage");
  }
  {
    char *a[] = {BASE, "--config", missing, NULL};
    expect_error("--config missing file", a, missing, NULL);
  }
  {
    char *a[] = {BASE, "--config", badjson, NULL};
    expect_error("--config invalid JSON", a, badjson, "JSON");
  }
  {
    char *a[] = {BASE, "--config", unknown, NULL};
    expect_error("--config unknown key", a, unknown, "workerz");
  }
  {
    char *a[] = {BASE, "--allowed-protocols", "foo", NULL};
    expect_error("--allowed-protocols foo", a, "--allowed-protocols", "foo");
  }
  {
    char *a[] = {"--listen", "127.0.0.1:0", NULL};
    expect_error("no secret", a, "secret", NULL);
  }
  {
    char *a[] = {"--secret", (char *)k_secret_hex, NULL};
    expect_error("no listener", a, "listen", NULL);
  }
  /* --help: the usage on stdout, exit 0, even next to bad flags that are not checked. */
  {
    char *a[] = {"--help", NULL};
    int code = -1;
    char *out = run(a, &code);
    CHECK(code == 0);
    CHECK(strncmp(out, "Usage: mtproxy", 14) == 0);
    CHECK(strstr(out, "--port") && strstr(out, "--secret") && strstr(out, "--allowed-protocols"));
    CHECK(strstr(out, "--handshake-timeout") && strstr(out, "--help"));
    mtp_free(out);
    char *b[] = {"-h", NULL};
    out = run(b, &code);
    CHECK(code == 0);
    CHECK(strncmp(out, "Usage: mtproxy", 14) == 0);
    mtp_free(out);
  }

  /* Signals stop a running proxy cleanly. */
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  char sp[256], cp[256];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  stop_with_signal(SIGINT, sp, cp);
  stop_with_signal(SIGTERM, sp, cp);

  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_dir);
  return check_report();
}
