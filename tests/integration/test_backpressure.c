/*
 * test_backpressure - a client that stops reading while the fake middle proxy pushes 256 MiB
 * toward it is closed by the proxy once its queued bytes pass client_send_budget (2 MiB):
 * mtproxy_client_closes_total{reason="backpressure"} == 1, the proxy tells Telegram
 * (RPC_CLOSE_CONN for that conn_id only), the proxy's VmRSS stays under start + budget +
 * 32 MiB while pushing (sampled by a thread every 2 ms), and another client on the same RPC
 * connection keeps echoing during and after with each echo under 2 s.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
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


#define BUDGET 2097152L
#define SLACK_KB (32L * 1024)
#define PUSH_TOTAL (256ull << 20)
#define PUSH_CHUNK 65536
#define MAX_ECHO_MS 2000

static const char *k_secret_hex = "00112233445566778899aabbccddeeff";
static uint8_t g_secret[16];

/* ---- RSS sampler thread ---- */
static atomic_bool g_sampling;
static atomic_long g_rss_max;
static atomic_long g_rss_samples;
static pthread_t g_sampler;

static void *sampler_main(void *arg) {
  pid_t pid = *(pid_t *)arg;
  struct timespec step = {0, 2 * 1000000L};
  while (atomic_load(&g_sampling)) {
    long kb = hx_vmrss_kb(pid);
    if (kb > 0) {
      long cur = atomic_load(&g_rss_max);
      while (kb > cur && !atomic_compare_exchange_weak(&g_rss_max, &cur, kb)) {
      }
      atomic_fetch_add(&g_rss_samples, 1);
    }
    nanosleep(&step, NULL);
  }
  return NULL;
}

/* One echo through c; returns its latency in ms (fails the test when none within 2 s). */
static int64_t echo_once(struct tclient *c, size_t len) {
  int64_t el;
  int rc = hx_echo(c, len, MAX_ECHO_MS, &el);
  if (rc != MTP_OK)
    fprintf(stderr, "echo: %s after %lld ms\n", mtp_strerror(rc), (long long)el);
  CHECK(rc == MTP_OK && el < MAX_ECHO_MS);
  return el;
}

static double metric(uint16_t admin, const char *series) {
  double v = -1;
  if (hx_scrape(admin, series, &v) != 0)
    return -1;
  return v;
}

int main(void) {
  g_proc.pid = -1;
  check_on_fail = fail_cleanup;
  const char *bin = h_mtproxy_bin();
  if (!bin) {
    fprintf(stderr, "MTPROXY_BIN is not set\n");
    return 1;
  }
  CHECK(mtp_hex_decode(k_secret_hex, g_secret, 16) == 16);
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &g_fm);
  CHECK(fport > 0);
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  char sp[256], cp[256], conf[300];
  CHECK(h_write_middle_files(g_dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  snprintf(conf, sizeof(conf), "%s/mtproxy.json", g_dir);
  char json[128];
  int jl = snprintf(json, sizeof(json), "{\"client_send_budget\": %ld}\n", BUDGET);
  CHECK(h_write_file(conf, json, (size_t)jl) == 0);

  char *argv[] = {(char *)bin, "--config", conf, "--listen", "127.0.0.1:0", "--secret", (char *)k_secret_hex,
                  "--proxy-secret", sp, "--proxy-config", cp, "--admin", "127.0.0.1:0", "--workers", "1",
                  "--log-level", "info", NULL};
  CHECK(h_spawn(&g_proc, argv) == 0);
  uint16_t port = 0, admin = 0;
  CHECK(h_wait_listener(&g_proc, "l0", &port, 30000) == 0);
  CHECK(h_wait_admin(&g_proc, &admin, 30000) == 0);

  /* The slow client A and the well-behaved client B, both answered once. */
  struct tclient a, b;
  tc_init(&a);
  tc_init(&b);
  CHECK(tc_connect(&a, "127.0.0.1", port, g_secret, MTP_PROTO_ABRIDGED, 2, 5000) == MTP_OK);
  CHECK(tc_connect(&b, "127.0.0.1", port, g_secret, MTP_PROTO_INTERMEDIATE, 2, 5000) == MTP_OK);
  echo_once(&a, 128);
  echo_once(&b, 128);
  struct fm_conn_info ia, ib;
  CHECK(fm_find_client(g_fm, hx_local_port(a.fd), &ia));
  CHECK(fm_find_client(g_fm, hx_local_port(b.fd), &ib));
  CHECK(ia.conn_id != ib.conn_id);
  CHECK(ia.rpc_conn == ib.rpc_conn); /* they share one RPC connection */
  CHECK(metric(admin, "mtproxy_client_closes_total{reason=\"backpressure\"}") == 0);

  long rss0 = hx_vmrss_kb(g_proc.pid);
  CHECK(rss0 > 0);
  atomic_store(&g_rss_max, rss0);
  atomic_store(&g_sampling, true);
  pid_t pid = g_proc.pid;
  CHECK(pthread_create(&g_sampler, NULL, sampler_main, &pid) == 0);

  /* A stops reading; the fake pushes 256 MiB at it. B keeps echoing meanwhile. */
  CHECK(fm_push(g_fm, ia.conn_id, PUSH_TOTAL, PUSH_CHUNK) == MTP_OK);
  int64_t deadline = hx_now_ms() + 20000;
  int echoes = 0;
  int64_t worst = 0;
  bool closed = false;
  while (hx_now_ms() < deadline) {
    int64_t el = echo_once(&b, 512);
    if (el > worst)
      worst = el;
    echoes++;
    struct fm_stats st;
    fm_get_stats(g_fm, &st);
    if (st.close_conns >= 1) {
      closed = true;
      break;
    }
  }
  struct fm_stats st;
  fm_get_stats(g_fm, &st);
  fprintf(stderr, "closed=%d after %d echoes of B (worst %lld ms); pushed %llu bytes\n", closed, echoes,
          (long long)worst, (unsigned long long)st.pushed_bytes);
  CHECK(closed);
  struct fm_conn_info ia2;
  CHECK(fm_conn_find(g_fm, ia.conn_id, &ia2) == MTP_OK);
  CHECK(ia2.close_conn); /* the proxy told Telegram about A */
  struct fm_conn_info ib2;
  CHECK(fm_conn_find(g_fm, ib.conn_id, &ib2) == MTP_OK);
  CHECK(!ib2.close_conn);
  CHECK(metric(admin, "mtproxy_client_closes_total{reason=\"backpressure\"}") == 1);

  /* B keeps working after A's close, still on the same RPC connection. */
  for (int i = 0; i < 20; i++) {
    int64_t el = echo_once(&b, 1024);
    if (el > worst)
      worst = el;
  }
  CHECK(fm_conn_find(g_fm, ib.conn_id, &ib2) == MTP_OK);
  CHECK(ib2.rpc_conn == ia.rpc_conn);

  atomic_store(&g_sampling, false);
  pthread_join(g_sampler, NULL);
  long rss_max = atomic_load(&g_rss_max);
  fprintf(stderr, "VmRSS start %ld KiB, max %ld KiB over %ld samples (limit %ld KiB)\n", rss0, rss_max,
          atomic_load(&g_rss_samples), rss0 + BUDGET / 1024 + SLACK_KB);
  CHECK(atomic_load(&g_rss_samples) >= 1);
#if defined(__SANITIZE_ADDRESS__)
  /* AddressSanitizer keeps freed memory in quarantine, so RSS says nothing about our bound in
   * an -DMTP_SANITIZE=ON build; the release build (CI) checks it. */
  fprintf(stderr, "RSS bound not checked: AddressSanitizer build\n");
#else
  CHECK(rss_max <= rss0 + BUDGET / 1024 + SLACK_KB);
#endif

  /* More than the budget went toward A, and the push stopped soon after the proxy's
   * RPC_CLOSE_CONN: far less than the whole push left the fake. */
  fm_get_stats(g_fm, &st);
  CHECK(st.pushed_bytes >= (uint64_t)BUDGET);
  CHECK(st.pushed_bytes < (uint64_t)PUSH_TOTAL / 2);

  /* A: whatever was queued in the kernel arrives, then the close. */
  size_t got = 0;
  CHECK(hx_wait_eof(a.fd, 10000, &got) == 0);
  fprintf(stderr, "A drained %zu bytes before the close\n", got);
  CHECK(got > 0);
  tc_close(&a);

  CHECK(metric(admin, "mtproxy_client_closes_total{reason=\"backpressure\"}") == 1);
  echo_once(&b, 256);
  tc_close(&b);

  int rc = h_stop(&g_proc, 10000);
  CHECK(rc == 0);
  fm_free(g_fm);
  g_fm = NULL;
  h_rmdir(g_dir);
  h_remove_log(&g_proc);
  return check_report();
}
