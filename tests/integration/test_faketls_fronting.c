/*
 * test_faketls_fronting - what a prober sees on a TLS-only fake-TLS listener with domain
 * fronting to a local site (--domain-fronting 127.0.0.1:PORT, a tiny HTTP server in this
 * process): every connection that fails the fake-TLS checks is handed to the site with the
 * bytes the proxy already read, in order, and the site's answer comes back at once:
 *
 * - an HTTP GET (not TLS at all) gets the site's page (not_tls);
 * - a ClientHello naming a domain the listener does not have, followed by 4 KiB of filler so
 *   the site answers, gets the site's 404: the hello and what followed it reached the site
 *   (tls_bad_sni);
 * - the same with a wrong secret (tls_bad_hmac) and with a good client's hello played back
 *   (tls_replay);
 * - a good client on the same port is served; fronted connections are counted in
 *   mtproxy_fronted_connections_total and never as clients.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "faketls.h"
#include "check.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

static struct hx_http *g_site;

static void cleanup(void) {
  he_cleanup();
  hx_http_free(g_site);
  g_site = NULL;
}

/* Sends data to the proxy and reads its answer until the peer closes (bounded). Returns the
 * answer (NUL-terminated, mtp_malloc'ed) and its length in *len. */
static char *ask(const void *data, size_t len, size_t *outlen, int64_t *elapsed) {
  int64_t t0 = hx_now_ms();
  int fd = hx_connect(h_env.port, 5000);
  CHECK(fd >= 0);
  CHECK(hx_write_all(fd, data, len) == 0);
  struct timeval tv = {5, 0};
  CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
  size_t cap = 65536, n = 0;
  char *buf = mtp_malloc(cap + 1);
  CHECK(buf != NULL);
  for (;;) {
    ssize_t r = recv(fd, buf + n, cap - n, 0);
    if (r <= 0)
      break;
    n += (size_t)r;
    CHECK(n < cap);
  }
  *elapsed = hx_now_ms() - t0;
  close(fd);
  buf[n] = '\0';
  *outlen = n;
  return buf;
}

static double fail_count(const char *reason) {
  char series[128];
  snprintf(series, sizeof(series), "mtproxy_handshake_failures_total{reason=\"%s\"}", reason);
  return he_metric(series);
}

/* A ClientHello followed by 4 KiB of filler: the HTTP site answers (404) once its 4 KiB
 * request buffer is full, so the answer shows that the hello and what followed reached it. */
static void expect_site_404(const char *what, const uint8_t *hello, size_t hlen) {
  uint8_t msg[MTP_FAKETLS_CLIENT_HELLO_MAX + 4096];
  memcpy(msg, hello, hlen);
  memset(msg + hlen, 'x', 4096);
  size_t n = 0;
  int64_t el = 0;
  char *ans = ask(msg, hlen + 4096, &n, &el);
  fprintf(stderr, "%s: %zu bytes back after %lld ms: %.24s\n", what, n, (long long)el, ans);
  CHECK(strncmp(ans, "HTTP/1.0 404 ", 13) == 0);
  CHECK(el < 400); /* at once, not at the handshake timeout */
  mtp_free(ans);
}

int main(void) {
  int site = hx_http_start(&g_site);
  CHECK(site > 0);
  static const char page[] = "<html>the fronted site</html>\n";
  CHECK(hx_http_set(g_site, "/page", page, sizeof(page) - 1) == 0);
  char target[64];
  snprintf(target, sizeof(target), "127.0.0.1:%d", site);
  const char *const flags[] = {"--allowed-protocols", "fake_tls", "--tls-domain", "example.com", "--domain-fronting",
                               target, "--handshake-timeout", "0.5", NULL};
  he_start_args("1", flags);
  check_on_fail = cleanup;
  /* The certificate-flight probe dials the fronting target at start; this site is no TLS
   * server, so the probe fails. Let it finish first: the site serves one connection at a time. */
  double probes = -1;
  CHECK(he_wait_metric("mtproxy_tls_probes_total{result=\"failed\"}", 1, 20000, &probes));

  /* Not TLS: an HTTP request gets the site's page. */
  {
    static const char get[] = "GET /page HTTP/1.0\r\nHost: example.com\r\n\r\n";
    size_t n = 0;
    int64_t el = 0;
    char *ans = ask(get, sizeof(get) - 1, &n, &el);
    fprintf(stderr, "http get: %zu bytes back after %lld ms\n", n, (long long)el);
    CHECK(strncmp(ans, "HTTP/1.0 200 OK", 15) == 0);
    CHECK(strstr(ans, page) != NULL);
    CHECK(el < 400);
    mtp_free(ans);
    CHECK(fail_count("not_tls") == 1);
  }

  uint8_t h[MTP_FAKETLS_CLIENT_HELLO_MAX];
  int hl = mtp_faketls_client_hello(h_env.secret, "www.example.net", (uint32_t)time(NULL), MTP_FAKETLS_KIND_CLASSIC,
                                    h, sizeof(h));
  CHECK(hl > 0);
  expect_site_404("unknown sni", h, (size_t)hl);
  CHECK(fail_count("tls_bad_sni") == 1);

  uint8_t wrong[16];
  memcpy(wrong, h_env.secret, 16);
  wrong[7] ^= 1;
  hl = mtp_faketls_client_hello(wrong, "example.com", (uint32_t)time(NULL), MTP_FAKETLS_KIND_PQ, h, sizeof(h));
  CHECK(hl > 0);
  expect_site_404("wrong secret", h, (size_t)hl);
  CHECK(fail_count("tls_bad_hmac") == 1);

  /* A good client is served; its hello played back goes to the site. */
  {
    struct tc_tls tls = {.sni = "example.com"};
    struct tclient c;
    tc_init(&c);
    CHECK(tc_connect_tls(&c, "127.0.0.1", h_env.port, h_env.secret, &tls, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
    uint8_t pkt[128];
    tc_make_packet(pkt, sizeof(pkt), false);
    CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
    struct tc_msg m;
    CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
    CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
    expect_site_404("replayed hello", c.hello, c.hello_len);
    CHECK(fail_count("tls_replay") == 1);
    tc_close(&c);
  }
  CHECK(he_metric("mtproxy_fake_tls_handshakes_total") == 1);
  double v = -1;
  CHECK(he_wait_metric("mtproxy_fronted_connections_total", 4, 5000, &v));
  CHECK(he_wait_metric("mtproxy_fronted_connections", 0, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 5000, &v));
  unsigned ok = 0;
  CHECK(hx_http_requests(g_site, &ok) == 4 && ok == 1);

  CHECK(he_finish() == 0);
  hx_http_free(g_site);
  g_site = NULL;
  return check_report();
}
