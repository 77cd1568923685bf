/*
 * test_fronting_openssl - a real TLS client cannot tell the proxy port from the fronted site.
 *
 * `openssl s_server` (its own RSA certificate for example.test, serving a page with -WWW) runs
 * on 127.0.0.1 at a port the OS picks; mtproxy runs with --tls-domain example.test and
 * --domain-fronting 127.0.0.1:PORT. Through the proxy port:
 * - `openssl s_client -servername example.test` (and with another SNI) gets the server's
 *   certificate: same SHA-256 fingerprint as the PEM file;
 * - `curl -k --resolve example.test:PROXYPORT:127.0.0.1` gets the page;
 * - each is counted in mtproxy_fronted_connections_total, none as a handshake or a client;
 * - the proxy learnt the site's certificate flight size at start ("tls probe ... flight N
 *   bytes") and a fake-TLS client's ServerHello carries an ApplicationData record of N bytes.
 * Every process is stopped by PID.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "check.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

static struct h_proc g_site; /* openssl s_server */
static char g_dir[256];      /* its certificate, key and page */
static bool g_site_started;

static void cleanup(void) {
  he_cleanup();
  if (g_site_started) {
    h_dump_log(&g_site);
    h_stop(&g_site, 5000);
    g_site_started = false;
  }
  if (g_dir[0] != '\0')
    h_rmdir(g_dir);
  g_dir[0] = '\0';
}

/* Runs a shell command line (bounded); returns its output (mtp_malloc'ed) and checks it exited 0. */
static char *sh(const char *cmdline) {
  char *argv[] = {"/bin/sh", "-c", (char *)cmdline, NULL};
  char *out = NULL;
  int code = -1;
  CHECK_MSG(hx_run(argv, 60000, &out, &code) == 0, "%s: did not finish", cmdline);
  CHECK_MSG(code == 0, "%s: exit %d: %s", cmdline, code, out != NULL ? out : "");
  return out;
}

/* "sha256 Fingerprint=AB:CD:..." -> the part after '=', without the newline (in place). */
static char *fingerprint_of(char *out) {
  char *eq = strstr(out, "Fingerprint=");
  CHECK_MSG(eq != NULL, "no fingerprint in: %s", out);
  eq += strlen("Fingerprint=");
  eq[strcspn(eq, "\r\n")] = '\0';
  CHECK(strlen(eq) == 95); /* 32 bytes as XX:XX:... */
  return eq;
}

int main(void) {
  check_on_fail = cleanup;
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);

  /* The site: a certificate, a page with a random token, s_server on an OS-chosen port. */
  char cmd[2048];
  snprintf(cmd, sizeof(cmd),
           "cd '%s' && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=example.test -days 1 "
           "-keyout key.pem -out cert.pem 2>&1",
           g_dir);
  mtp_free(sh(cmd));
  uint8_t rnd[16];
  char token[33];
  CHECK(mtp_random(rnd, sizeof(rnd)) == MTP_OK);
  mtp_hex_encode(rnd, sizeof(rnd), token);
  char page[128];
  int pagelen = snprintf(page, sizeof(page), "<html>fronted site %s</html>\n", token);
  char path[512];
  snprintf(path, sizeof(path), "%s/index.html", g_dir);
  CHECK(h_write_file(path, page, (size_t)pagelen) == 0);
  snprintf(cmd, sizeof(cmd), "openssl x509 -in '%s/cert.pem' -noout -fingerprint -sha256", g_dir);
  char *fp_out = sh(cmd);
  char want_fp[128];
  snprintf(want_fp, sizeof(want_fp), "%s", fingerprint_of(fp_out));
  mtp_free(fp_out);

  snprintf(cmd, sizeof(cmd), "cd '%s' && exec openssl s_server -accept 127.0.0.1:0 -cert cert.pem -key key.pem -WWW",
           g_dir);
  char *site_argv[] = {"/bin/sh", "-c", cmd, NULL};
  CHECK(h_spawn(&g_site, site_argv) == 0);
  g_site_started = true;
  char rest[128];
  CHECK(h_wait_log(&g_site, "ACCEPT 127.0.0.1:", rest, sizeof(rest), 30000) == 0);
  int site_port = atoi(rest);
  CHECK(site_port > 0 && site_port < 65536);

  /* The proxy, fronting to the site. */
  char target[64];
  snprintf(target, sizeof(target), "127.0.0.1:%d", site_port);
  const char *extra[] = {"--tls-domain", "example.test", "--domain-fronting", target, NULL};
  he_start_args("1", extra);
  uint16_t pp = h_env.port;

  /* openssl s_client through the proxy port: the site's certificate, for our SNI and another. */
  const char *snis[] = {"example.test", "other.test"};
  for (size_t i = 0; i < 2; i++) {
    snprintf(cmd, sizeof(cmd),
             "openssl s_client -connect 127.0.0.1:%u -servername %s </dev/null 2>/dev/null | "
             "openssl x509 -noout -fingerprint -sha256",
             (unsigned)pp, snis[i]);
    char *out = sh(cmd);
    CHECK_MSG(strcmp(fingerprint_of(out), want_fp) == 0, "SNI %s: got %s, want %s", snis[i], fingerprint_of(out),
              want_fp);
    mtp_free(out);
  }

  /* curl through the proxy port: the site's page. */
  snprintf(cmd, sizeof(cmd),
           "curl -k -sS --max-time 30 --resolve example.test:%u:127.0.0.1 https://example.test:%u/index.html",
           (unsigned)pp, (unsigned)pp);
  char *body = sh(cmd);
  CHECK_MSG(strcmp(body, page) == 0, "curl got: %s", body);
  mtp_free(body);

  /* Counted as fronted, never as handshakes or clients. */
  double v = 0;
  CHECK(he_wait_metric("mtproxy_fronted_connections", 0, 10000, &v));
  CHECK_MSG(he_metric("mtproxy_fronted_connections_total") == 3, "%g", he_metric("mtproxy_fronted_connections_total"));
  CHECK(he_metric("mtproxy_fronting_failures_total") == 0);
  CHECK(he_metric("mtproxy_fronted_bytes_total{direction=\"in\"}") > 0);
  CHECK(he_metric("mtproxy_fronted_bytes_total{direction=\"out\"}") > 2000); /* certificates, page */
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 10000, &v));
  CHECK(he_metric("mtproxy_fake_tls_handshakes_total") == 0);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"abridged\"}") == 0);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"intermediate\"}") == 0);
  CHECK(he_metric("mtproxy_handshakes_total{protocol=\"secure\"}") == 0);

  /* The learnt flight size is what a fake-TLS client gets. */
  char needle[128];
  snprintf(needle, sizeof(needle), "tls probe example.test via 127.0.0.1:%d: flight ", site_port);
  CHECK_MSG(h_wait_log(&h_env.proc, needle, rest, sizeof(rest), 30000) == 0, "no probe result in the log");
  size_t learnt = (size_t)atol(rest);
  CHECK(learnt > 500 && learnt <= MTP_FAKETLS_MAX_PAYLOAD);
  CHECK(he_metric("mtproxy_tls_probes_total{result=\"ok\"}") >= 1);
  for (int k = 0; k < 2; k++) {
    struct tclient c;
    tc_init(&c);
    struct tc_tls tls = {.sni = "example.test", .kind = k == 0 ? MTP_FAKETLS_KIND_CLASSIC : MTP_FAKETLS_KIND_PQ};
    CHECK(tc_connect_tls(&c, "127.0.0.1", pp, h_env.secret, &tls, MTP_PROTO_INTERMEDIATE, 2, 10000) == MTP_OK);
    CHECK_MSG(c.flight_len == learnt, "flight %zu, learnt %zu", c.flight_len, learnt);
    tc_close(&c);
  }

  CHECK(he_finish() == 0);
  check_on_fail = NULL;
  CHECK(h_stop(&g_site, 5000) >= 0);
  g_site_started = false;
  h_remove_log(&g_site);
  h_rmdir(g_dir);
  return check_report();
}
