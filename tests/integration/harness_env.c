#include "harness_env.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "harness_extra.h"
#include "banned.h"

struct h_env h_env = {.proc = {.pid = -1}};

static const char k_secret_hex[] = "00112233445566778899aabbccddeeff";

void he_cleanup(void) {
  if (h_env.proc.pid > 0) {
    h_dump_log(&h_env.proc);
    h_stop(&h_env.proc, 5000);
  }
  h_remove_log(&h_env.proc);
  fm_free(h_env.fm);
  h_env.fm = NULL;
  if (h_env.dir[0])
    h_rmdir(h_env.dir);
  h_env.dir[0] = '\0';
}

static void require(bool ok, const char *what) {
  if (ok)
    return;
  fprintf(stderr, "test setup failed: %s\n", what);
  he_cleanup();
  exit(1);
}

void he_start(const char *workers) { he_start_args(workers, NULL); }

void he_start_fake(char *sp, char *cp) {
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &h_env.fm);
  require(fport > 0, "fake middle proxy did not start");
  require(h_tmpdir(h_env.dir, sizeof(h_env.dir)) == 0, "no temp dir");
  require(h_write_middle_files(h_env.dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0,
          "cannot write the Telegram config files");
}

void he_start_args(const char *workers, const char *const *extra) {
  const char *bin = h_mtproxy_bin();
  require(bin != NULL, "MTPROXY_BIN is not set");
  char sp[256], cp[256];
  he_start_fake(sp, cp);
  char *std[] = {(char *)bin, "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex, "--proxy-secret", sp,
                 "--proxy-config", cp, "--admin", "127.0.0.1:0", "--workers", (char *)workers, "--log-level",
                 "info"};
  char *argv[sizeof(std) / sizeof(std[0]) + 32 + 1];
  size_t n = 0;
  for (size_t i = 0; i < sizeof(std) / sizeof(std[0]); i++)
    argv[n++] = std[i];
  for (size_t i = 0; extra != NULL && extra[i] != NULL; i++) {
    require(i < 32, "too many extra flags");
    argv[n++] = (char *)extra[i];
  }
  argv[n] = NULL;
  require(h_spawn(&h_env.proc, argv) == 0, "cannot start mtproxy");
  require(h_wait_listener(&h_env.proc, "l0", &h_env.port, 30000) == 0, "mtproxy did not announce listener l0");
  require(h_wait_admin(&h_env.proc, &h_env.admin, 30000) == 0, "mtproxy did not announce its admin endpoint");
  require(mtp_hex_decode(k_secret_hex, h_env.secret, 16) == 16, "bad secret");
}

int he_finish(void) {
  bool ok = h_stop(&h_env.proc, 10000) == 0;
  if (!ok)
    fprintf(stderr, "mtproxy did not exit 0 on SIGTERM\n");
  if (ok && !fm_wait_open(h_env.fm, 0, 5000)) {
    fprintf(stderr, "the fake middle proxy still has RPC connections open\n");
    ok = false;
  }
  if (!ok) {
    he_cleanup();
    return -1;
  }
  fm_free(h_env.fm);
  h_env.fm = NULL;
  h_rmdir(h_env.dir);
  h_env.dir[0] = '\0';
  h_remove_log(&h_env.proc);
  return 0;
}

double he_metric(const char *series) {
  char *body = NULL;
  double v = -1;
  int st = h_http_get(h_env.admin, "/metrics", &body, 5000);
  if (st != 200 || body == NULL || h_metric(body, series, &v) != 0)
    v = -1;
  mtp_free(body);
  return v;
}

bool he_wait_metric(const char *series, double want, int timeout_ms, double *last) {
  struct timespec ts = {0, 10 * 1000 * 1000};
  for (int waited = 0;; waited += 10) {
    *last = he_metric(series);
    if (*last == want)
      return true;
    if (waited >= timeout_ms)
      return false;
    nanosleep(&ts, NULL);
  }
}

bool he_find_client(int fd, struct fm_conn_info *out) { return fm_find_client(h_env.fm, hx_local_port(fd), out); }
