/*
 * test_tgconfig_http - Telegram's proxy secret and config served over HTTP by a tiny server in
 * this test. Run 1: mtproxy fetches both from http://127.0.0.1:P/..., serves clients (echo via
 * the fake middle proxy), writes both into --cache-dir, and counts
 * mtproxy_telegram_config_fetches_total{result="ok"}. Run 2: the server answers 500 to
 * everything; mtproxy starts from the cache, still echoes, and counts result="failed".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
static struct hx_http *g_http;
static char g_dir[256], g_cache[300];

/* Run by a failed CHECK before it exits: the log, then everything this test started. */
static void fail_cleanup(void) {
  h_dump_log(&g_proc);
  h_stop(&g_proc, 5000);
  fm_free(g_fm);
  hx_http_free(g_http);
  h_rmdir(g_cache);
  h_rmdir(g_dir);
}


static const char *k_secret_hex = "00112233445566778899aabbccddeeff";
static uint8_t g_secret[16];

static double metric(uint16_t admin, const char *series) {
  double v = -1;
  if (hx_scrape(admin, series, &v) != 0)
    return -1;
  return v;
}

static void echo_ok(uint16_t port) {
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", port, g_secret, MTP_PROTO_INTERMEDIATE, 2, 5000) == MTP_OK);
  uint8_t pkt[200];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  tc_close(&c);
}

/* Reads a whole small file (mtp_malloc'ed); NULL when missing. */
static uint8_t *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  uint8_t *buf = mtp_malloc(1 << 20);
  size_t n = buf ? fread(buf, 1, 1 << 20, f) : 0;
  fclose(f);
  *len = n;
  return buf;
}

static void start_proxy(const char *secret_url, const char *config_url, uint16_t *port, uint16_t *admin) {
  char *argv[] = {(char *)h_mtproxy_bin(), "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex,
                  "--proxy-secret", (char *)secret_url, "--proxy-config", (char *)config_url, "--cache-dir",
                  g_cache, "--config-refresh", "10", "--admin", "127.0.0.1:0", "--workers", "1", "--log-level",
                  "info", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  CHECK(h_wait_listener(&g_proc, "l0", port, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, admin, 30000) == 0);
}

int main(void) {
  g_proc.pid = -1;
  check_on_fail = fail_cleanup;
  if (!h_mtproxy_bin()) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    return 1;
  }
  /* libcurl in the proxy must go straight to 127.0.0.1. */
  static const char *proxy_vars[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                                     "ALL_PROXY"};
  for (size_t i = 0; i < sizeof(proxy_vars) / sizeof(proxy_vars[0]); i++)
    unsetenv(proxy_vars[i]);

  CHECK(mtp_hex_decode(k_secret_hex, g_secret, 16) == 16);
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  snprintf(g_cache, sizeof(g_cache), "%s/cache", g_dir); /* created by the proxy */

  /* The HTTP server's bodies: the secret and the config text the fake's helper writes. */
  char sp[256], cp[256];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  size_t conf_len = 0;
  uint8_t *conf_text = slurp(cp, &conf_len);
  CHECK(conf_text != NULL && conf_len > 0);
  int hport = hx_http_start(&g_http);
  CHECK(hport > 0);
  CHECK(hx_http_set(g_http, "/secret", proxy_secret, sizeof(proxy_secret)) == 0);
  CHECK(hx_http_set(g_http, "/config", conf_text, conf_len) == 0);
  char secret_url[128], config_url[128];
  snprintf(secret_url, sizeof(secret_url), "http://127.0.0.1:%d/secret", hport);
  snprintf(config_url, sizeof(config_url), "http://127.0.0.1:%d/config", hport);

  /* ---- run 1: from HTTP ---- */
  uint16_t port = 0, admin = 0;
  start_proxy(secret_url, config_url, &port, &admin);
  CHECK(h_wait_log(&g_proc, "Telegram config loaded from sources", NULL, 0, 1000) == 0);
  unsigned ok = 0;
  CHECK(hx_http_requests(g_http, &ok) >= 2 && ok >= 2);
  CHECK(metric(admin, "mtproxy_telegram_config_fetches_total{result=\"ok\"}") >= 2);
  CHECK(metric(admin, "mtproxy_telegram_config_fetches_total{result=\"failed\"}") == 0);
  echo_ok(port);
  echo_ok(port);
  /* The cache holds exactly what was served (written before the config was published). */
  char path[400];
  size_t n = 0;
  snprintf(path, sizeof(path), "%s/proxy-secret", g_cache);
  uint8_t *cached = slurp(path, &n);
  CHECK(cached != NULL);
  CHECK(n == sizeof(proxy_secret) && memcmp(cached, proxy_secret, n) == 0);
  mtp_free(cached);
  snprintf(path, sizeof(path), "%s/proxy-multi.conf", g_cache);
  cached = slurp(path, &n);
  CHECK(cached != NULL);
  CHECK(n == conf_len && memcmp(cached, conf_text, n) == 0);
  mtp_free(cached);
  CHECK(h_stop(&g_proc, 10000) == 0);
  h_remove_log(&g_proc);

  /* ---- run 2: the server fails, the cache carries the start ---- */
  hx_http_fail_all(g_http, true);
  unsigned before = hx_http_requests(g_http, NULL);
  start_proxy(secret_url, config_url, &port, &admin);
  CHECK(h_wait_log(&g_proc, "Telegram config loaded from cache", NULL, 0, 1000) == 0);
  echo_ok(port);
  /* The start-up fetch fails (HTTP 500) for both parts; the cached config stays. */
  CHECK(h_wait_log(&g_proc, "proxy secret from http://", NULL, 0, 15000) == 0);
  CHECK(h_wait_log(&g_proc, "proxy config from http://", NULL, 0, 15000) == 0);
  CHECK(h_wait_log(&g_proc, "HTTP status 500", NULL, 0, 1000) == 0);
  CHECK(hx_http_requests(g_http, NULL) >= before + 2);
  CHECK(metric(admin, "mtproxy_telegram_config_fetches_total{result=\"failed\"}") >= 2);
  CHECK(metric(admin, "mtproxy_telegram_config_fetches_total{result=\"ok\"}") == 0);
  echo_ok(port);
  CHECK(h_stop(&g_proc, 10000) == 0);
  /* A failed fetch does not spoil the cache. */
  snprintf(path, sizeof(path), "%s/proxy-secret", g_cache);
  cached = slurp(path, &n);
  CHECK(cached != NULL && n == sizeof(proxy_secret) && memcmp(cached, proxy_secret, n) == 0);
  mtp_free(cached);
  h_remove_log(&g_proc);

  mtp_free(conf_text);
  hx_http_free(g_http);
  g_http = NULL;
  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_cache);
  h_rmdir(g_dir);
  return check_report();
}
