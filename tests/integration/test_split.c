/*
 * test_split - split mode as separate processes on loopback: mtproxy-back in front of the fake
 * middle proxy, mtproxy-front processes dialing it over the mutual-TLS tunnel, certificates made
 * by `mtproxy-back certs`.
 *
 *   1. certs: init/issue write the six PEM files, keys 0600, certificates 0644; an existing file
 *      is never overwritten (exit 2, one line naming it, contents unchanged); bad names/usage.
 *   2. command lines: --help, and one-line exit-2 errors for missing split-mode settings.
 *   3. echo through front1 for every framing and several DCs; quick acks; the fake sees the
 *      client's address, the front's listener address and the front's ad_tag.
 *   4. a second front (2 workers) shares the back: 3 tunnel connections, both fronts echo.
 *   5. no unauthenticated peer gets past the handshake: a front set up with another CA never
 *      becomes up (its clients are closed, the back counts and logs the failure); mtproxy-front
 *      refuses to start with a certificate its own CA did not sign; a back with another CA's
 *      certificate is refused by a front; a back with an allow-list refuses a front of its CA
 *      that is not on it and serves one that is; TLS clients (mbedTLS, trusting the real CA) without a
 *      certificate, with another CA's certificate (the back logs the failed verification) or
 *      with a key that does not match are refused, while one with a real front certificate
 *      completes the handshake (the control); a plain TCP client, garbage and a silent
 *      connection are closed without receiving anything but TLS alerts.
 *   6. a client that stops reading does not slow another on the same tunnel: while the fake
 *      sends it more than its tunnel window (but less than the send budget), another client on
 *      the same tunnel echoes 30 times under 2 s each, and afterwards the slow one reads every
 *      byte (credit flows again); then, sent far more than the budget, it is closed (the fake
 *      sees RPC_CLOSE_CONN for it only) with the other still echoing, and memory stays bounded.
 *   7. the back killed with SIGKILL: the fronts' clients are closed, new clients are refused while
 *      it is down, and after a restart on the same port both fronts serve new clients again
 *      within a bounded wait.
 * Ends with every process exiting 0 on SIGTERM.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "alloc.h"
#include "check.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
#include "harness_split.h"
#include "rpc.h"
#include "tclient.h"
#include "banned.h"

#define BUDGET 2097152L
#define WINDOW (1048576L + 65536L)
#define SLACK_KB (32L * 1024)
#define MAX_ECHO_MS 2000

static const char k_tag_hex[] = "0badc0de0badc0de0badc0de0badc0de";
static char g_conf[400]; /* JSON config shared by the back and the fronts */

/* ---- small helpers ---- */

/* The fake's record of the client on fd. */
static bool find_client(int fd, struct fm_conn_info *out) { return fm_find_client(hs.fm, hx_local_port(fd), out); }

/* A client of the front at port with the scene's secret. */
static void client_open(struct tclient *c, uint16_t port, enum mtp_proto proto, int16_t dc) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", port, hs.secret, proto, dc, 5000) == MTP_OK);
}

static char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  char *buf = mtp_malloc(65536);
  size_t n = buf ? fread(buf, 1, 65535, f) : 0;
  fclose(f);
  if (buf)
    buf[n] = '\0';
  *len = n;
  return buf;
}

static int file_mode(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (int)(st.st_mode & 0777) : -1;
}

/* Exactly one non-empty line ending in '\n'. */
static bool one_line(const char *s) {
  size_t len = strlen(s);
  return len > 1 && s[len - 1] == '\n' && strchr(s, '\n') == s + len - 1;
}

/* Runs bin with args (NULL-terminated) to completion; *code gets the exit code. */
static char *run(const char *bin, char *const args[], int *code) {
  char *out = NULL;
  CHECK(hx_run_cmd(bin, NULL, args, 20000, &out, code) == 0);
  CHECK(out != NULL);
  return out;
}

/* Every byte received is part of a TLS alert record (content type 21): nothing else leaked. */
static bool only_tls_alerts(const uint8_t *b, size_t len) {
  size_t off = 0;
  while (off < len) {
    if (len - off < 5 || b[off] != 0x15 || b[off + 1] != 0x03)
      return false;
    size_t rl = ((size_t)b[off + 3] << 8) | b[off + 4];
    if (rl > 64 || len - off - 5 < rl)
      return false;
    off += 5 + rl;
  }
  return true;
}

/* ---- 1. certificates ---- */

static void test_certs(void) {
  static const char *const files[] = {"ca.crt", "ca.key", "back.crt", "back.key", "front1.crt", "front1.key"};
  for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
    char p[512];
    snprintf(p, sizeof(p), "%s/%s", hs.certs, files[i]);
    size_t len = 0;
    char *text = read_all(p, &len);
    CHECK_MSG(text != NULL, "%s missing", p);
    bool is_key = strstr(files[i], ".key") != NULL;
    CHECK_MSG(strstr(text, is_key ? "PRIVATE KEY-----" : "-----BEGIN CERTIFICATE-----") != NULL, "%s is not PEM", p);
    mtp_free(text);
    int mode = file_mode(p);
    CHECK_MSG(mode == (is_key ? 0600 : 0644), "%s has mode %o", p, (unsigned)mode);
  }

  /* Never overwritten: init on a populated dir, issue of an existing name. */
  char ca_key[512];
  snprintf(ca_key, sizeof(ca_key), "%s/ca.key", hs.certs);
  size_t before_len = 0, after_len = 0;
  char *before = read_all(ca_key, &before_len);
  CHECK(before != NULL);
  char *out = NULL;
  int code = hs_certs((char *[]){"init", hs.certs, NULL}, &out);
  fprintf(stderr, "certs init (again): exit %d: %s", code, out ? out : "(none)\n");
  CHECK(code == 2);
  CHECK(out && one_line(out) && strstr(out, hs.certs) != NULL);
  CHECK(strstr(out, ".crt") || strstr(out, ".key"));
  mtp_free(out);
  char *after = read_all(ca_key, &after_len);
  CHECK(after != NULL && after_len == before_len && memcmp(before, after, before_len) == 0);
  mtp_free(after);
  mtp_free(before);

  char f1[512];
  snprintf(f1, sizeof(f1), "%s/front1.key", hs.certs);
  before = read_all(f1, &before_len);
  CHECK(before != NULL);
  code = hs_certs((char *[]){"issue", hs.certs, "front1", NULL}, &out);
  fprintf(stderr, "certs issue front1 (again): exit %d: %s", code, out ? out : "(none)\n");
  CHECK(code == 2);
  CHECK(out && one_line(out) && strstr(out, "front1.") != NULL);
  mtp_free(out);
  after = read_all(f1, &after_len);
  CHECK(after != NULL && after_len == before_len && memcmp(before, after, before_len) == 0);
  mtp_free(after);
  mtp_free(before);

  /* Bad names and usage: exit 2, one line, nothing written. */
  code = hs_certs((char *[]){"issue", hs.certs, "back", NULL}, &out);
  fprintf(stderr, "certs issue back: exit %d: %s", code, out ? out : "(none)\n");
  CHECK(code == 2 && out && one_line(out));
  mtp_free(out);
  code = hs_certs((char *[]){"issue", hs.certs, "../evil", NULL}, &out);
  fprintf(stderr, "certs issue ../evil: exit %d: %s", code, out ? out : "(none)\n");
  CHECK(code == 2 && out && one_line(out));
  mtp_free(out);
  char evil[512];
  snprintf(evil, sizeof(evil), "%s/../evil.key", hs.certs);
  CHECK(access(evil, F_OK) != 0);
  char nodir[512];
  snprintf(nodir, sizeof(nodir), "%s/no-such-dir", hs.dir);
  code = hs_certs((char *[]){"issue", nodir, "front9", NULL}, &out);
  fprintf(stderr, "certs issue in a dir without a CA: exit %d: %s", code, out ? out : "(none)\n");
  CHECK(code == 2 && out && one_line(out));
  mtp_free(out);
  code = hs_certs((char *[]){"frobnicate", NULL}, &out);
  CHECK(code == 2 && out && one_line(out));
  mtp_free(out);
  code = hs_certs((char *[]){"init", NULL}, &out);
  CHECK(code == 2 && out && one_line(out));
  mtp_free(out);
}

/* ---- 2. command lines ---- */

static void expect_cli_error(const char *bin, const char *what, char *const args[], const char *needle) {
  int code = -1;
  char *out = run(bin, args, &code);
  fprintf(stderr, "%-40s exit %d: %s", what, code, out);
  CHECK(code == 2);
  CHECK(one_line(out));
  CHECK_MSG(strstr(out, needle) != NULL, "'%s' not in the error", needle);
  mtp_free(out);
}

static void test_cli(void) {
  int code = -1;
  char *out = run(hs_back_bin(), (char *[]){"--help", NULL}, &code);
  CHECK(code == 0 && strstr(out, "--tunnel-listen") != NULL && strstr(out, "certs init") != NULL);
  mtp_free(out);
  out = run(hs_front_bin(), (char *[]){"--help", NULL}, &code);
  CHECK(code == 0 && strstr(out, "--back") != NULL);
  mtp_free(out);

  char crt[400], key[400], ca[400], f1crt[400], f1key[400], missing[400];
  snprintf(crt, sizeof(crt), "%s/back.crt", hs.certs);
  snprintf(key, sizeof(key), "%s/back.key", hs.certs);
  snprintf(ca, sizeof(ca), "%s/ca.crt", hs.certs);
  snprintf(f1crt, sizeof(f1crt), "%s/front1.crt", hs.certs);
  snprintf(f1key, sizeof(f1key), "%s/front1.key", hs.certs);
  snprintf(missing, sizeof(missing), "%s/nope.key", hs.certs);
  expect_cli_error(hs_back_bin(), "back without --tunnel-listen",
                   (char *[]){"--tunnel-cert", crt, "--tunnel-key", key, "--tunnel-ca", ca, "--proxy-secret", hs.sp,
                              "--proxy-config", hs.cp, NULL},
                   "--tunnel-listen");
  expect_cli_error(hs_back_bin(), "back without --tunnel-ca",
                   (char *[]){"--tunnel-listen", "127.0.0.1:0", "--tunnel-cert", crt, "--tunnel-key", key,
                              "--proxy-secret", hs.sp, "--proxy-config", hs.cp, NULL},
                   "--tunnel-ca");
  expect_cli_error(hs_back_bin(), "back with a missing key file",
                   (char *[]){"--tunnel-listen", "127.0.0.1:0", "--tunnel-cert", crt, "--tunnel-key", missing,
                              "--tunnel-ca", ca, "--proxy-secret", hs.sp, "--proxy-config", hs.cp, NULL},
                   "nope.key");
  expect_cli_error(hs_front_bin(), "front without --back",
                   (char *[]){"--tunnel-cert", f1crt, "--tunnel-key", f1key, "--tunnel-ca", ca, "--listen",
                              "127.0.0.1:0", "--secret", hs.secret_hex, NULL},
                   "--back");
  expect_cli_error(hs_front_bin(), "front without --tunnel-cert",
                   (char *[]){"--back", "127.0.0.1:1", "--tunnel-key", f1key, "--tunnel-ca", ca, "--listen",
                              "127.0.0.1:0", "--secret", hs.secret_hex, NULL},
                   "--tunnel-cert");
  expect_cli_error(hs_front_bin(), "front with a missing key file",
                   (char *[]){"--back", "127.0.0.1:1", "--tunnel-cert", f1crt, "--tunnel-key", missing, "--tunnel-ca",
                              ca, "--listen", "127.0.0.1:0", "--secret", hs.secret_hex, NULL},
                   "nope.key");
  expect_cli_error(hs_front_bin(), "front without a secret",
                   (char *[]){"--back", "127.0.0.1:1", "--tunnel-cert", f1crt, "--tunnel-key", f1key, "--tunnel-ca",
                              ca, "--listen", "127.0.0.1:0", NULL},
                   "secret");
}

/* ---- 3. echo for every framing ---- */

static void one_client(const struct hs_node *front, enum mtp_proto proto, int16_t dc, const uint8_t tag[16]) {
  struct tclient c;
  client_open(&c, front->port, proto, dc);
  char why[160];
  int rc = hx_first_echo(&c, 5000, why, sizeof(why));
  CHECK_MSG(rc == MTP_OK, "proto %s dc %d: %s", mtp_proto_name(proto), dc, why);
  struct fm_conn_info ci;
  CHECK(find_client(c.fd, &ci));
  /* The address the client used is the front's listener, carried over the tunnel. */
  const char *bad = hx_check_first_rpc(&ci, proto, tag, front->port);
  CHECK_MSG(bad == NULL, "proto %s dc %d: the fake's record: %s (proxy_port %u, front %u)", mtp_proto_name(proto),
            dc, bad, ci.proxy_port, front->port);

  /* A bigger encrypted-looking packet without quick ack, then one of 64 KiB. */
  int64_t el;
  CHECK(hx_echo(&c, 2048, 5000, &el) == MTP_OK);
  CHECK(hx_echo(&c, 65536, 5000, &el) == MTP_OK);
  struct fm_conn_info ci2;
  CHECK(fm_conn_find(hs.fm, ci.conn_id, &ci2) == MTP_OK);
  CHECK(ci2.packets == 3);
  CHECK(!(ci2.flags & MTP_RPC_FLAG_QUICKACK));
  tc_close(&c);
}

static void test_echo(const uint8_t tag[16]) {
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};
  static const int16_t dcs[] = {2, -3, 5, 99};
  for (size_t p = 0; p < 3; p++)
    for (size_t d = 0; d < sizeof(dcs) / sizeof(dcs[0]); d++)
      one_client(&hs.fronts[0], protos[p], dcs[d], tag);
  /* Clients closed by the app reach Telegram as RPC_CLOSE_CONN through the tunnel. */
  CHECK(fm_wait_close_conns(hs.fm, 12, 10000));
}

/* ---- 4. two fronts share one back ---- */

static void test_two_fronts(void) {
  char *extra[] = {"--config", g_conf, NULL};
  CHECK(hs_front_start(&hs.fronts[1], "front2", hs.back.port, "2", extra) == 0);
  double v = -1;
  CHECK_MSG(hs_wait_metric_ge(&hs.back, "mtproxy_tunnel_connections", 3, 30000, &v), "back has %g tunnels", v);
  CHECK(hs_wait_metric_ge(&hs.fronts[1], "mtproxy_tunnel_connections", 2, 10000, &v));
  /* /status of the front says where its back is and how many tunnels are up. */
  char *body = NULL;
  CHECK(h_http_get(hs.fronts[1].admin, "/status", &body, 5000) == 200 && body != NULL);
  cJSON *st = cJSON_Parse(body);
  mtp_free(body);
  const cJSON *bk = cJSON_GetObjectItemCaseSensitive(st, "back");
  char want_back[64];
  snprintf(want_back, sizeof(want_back), "127.0.0.1:%u", hs.back.port);
  CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(bk, "address")) &&
        strcmp(cJSON_GetObjectItemCaseSensitive(bk, "address")->valuestring, want_back) == 0);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(bk, "tunnels_up")) == 2);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(bk, "tunnels_wanted")) == 2);
  cJSON_Delete(st);
  CHECK(h_http_get(hs.back.admin, "/status", &body, 5000) == 200 && body != NULL);
  st = cJSON_Parse(body);
  mtp_free(body);
  const cJSON *tun = cJSON_GetObjectItemCaseSensitive(st, "tunnel");
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(tun, "connections")) == 3);
  CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(st, "telegram"),
                                                      "config_loaded")));
  cJSON_Delete(st);
  /* Many clients through each front (front2's land on both of its workers). */
  for (int i = 0; i < 20; i++) {
    CHECK(hs_echo("127.0.0.1", hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 2, 512, 5000) == MTP_OK);
    CHECK(hs_echo("127.0.0.1", hs.fronts[1].port, (enum mtp_proto)(1 + i % 3), 2, 512, 5000) == MTP_OK);
  }
  /* Streams of both fronts open at the same time. */
  struct tclient a, b;
  client_open(&a, hs.fronts[0].port, MTP_PROTO_ABRIDGED, 2);
  client_open(&b, hs.fronts[1].port, MTP_PROTO_PADDED, 2);
  uint8_t pa[256], pb[256];
  tc_make_packet(pa, sizeof(pa), true);
  tc_make_packet(pb, sizeof(pb), true);
  CHECK(tc_send(&a, pa, sizeof(pa), false) == MTP_OK);
  CHECK(tc_send(&b, pb, sizeof(pb), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(&b, 5000, &m) == MTP_OK && m.len == sizeof(pb) && memcmp(m.data, pb, sizeof(pb)) == 0);
  CHECK(tc_recv(&a, 5000, &m) == MTP_OK && m.len == sizeof(pa) && memcmp(m.data, pa, sizeof(pa)) == 0);
  struct fm_conn_info ia, ib;
  CHECK(find_client(a.fd, &ia));
  CHECK(find_client(b.fd, &ib));
  CHECK(ia.proxy_port == hs.fronts[0].port);
  CHECK(ib.proxy_port == hs.fronts[1].port);
  CHECK(ia.conn_id != ib.conn_id);
  tc_close(&a);
  tc_close(&b);
  CHECK(hs_metric(&hs.back, "mtproxy_tunnel_streams_opened_total") >= 40);
}

/* ---- 5. unauthenticated peers ---- */

static void expect_refused_front(const struct hs_node *front) {
  for (int i = 0; i < 5; i++) {
    int rc = hs_echo("127.0.0.1", front->port, MTP_PROTO_INTERMEDIATE, 2, 256, 5000);
    CHECK_MSG(rc == MTP_ECLOSED, "a client through a refused front got %s", mtp_strerror(rc));
  }
  CHECK(hs_metric(front, "mtproxy_tunnel_connections") == 0);
  CHECK(hs_metric(front, "mtproxy_tunnel_connects_total") == 0);
}

static void test_unauthenticated(void) {
  char *extra[] = {"--config", g_conf, NULL};
  double fails0 = hs_metric(&hs.back, "mtproxy_tunnel_failures_total");
  CHECK(fails0 >= 0);

  /* A front whose certificate (CN front1, like a real one) and CA come from another CA. */
  char back[64];
  snprintf(back, sizeof(back), "127.0.0.1:%u", hs.back.port);
  CHECK(hs_front_start_ex(&hs.fronts[2], NULL, hs.other, "front1", back, NULL, "1", extra) == 0);
  double v = -1;
  CHECK_MSG(hs_wait_metric_ge(&hs.back, "mtproxy_tunnel_failures_total", fails0 + 2, 30000, &v),
            "back counted %g failures", v);
  expect_refused_front(&hs.fronts[2]);
  CHECK(hs_metric(&hs.fronts[2], "mtproxy_tunnel_failures_total") >= 1);
  CHECK(hs_metric(&hs.back, "mtproxy_tunnel_connections") == 3);
  CHECK(h_wait_log(&hs.back.proc, "tunnel connection refused: ", NULL, 0, 5000) == 0);
  CHECK(hs_node_stop(&hs.fronts[2]) == 0);

  /* mtproxy-front itself refuses a certificate its own CA did not sign (an impostor who knows
   * the public ca.crt), before dialing anything. */
  {
    char mcrt[400], mkey[400], mca[400];
    snprintf(mcrt, sizeof(mcrt), "%s/front1.crt", hs.mixed);
    snprintf(mkey, sizeof(mkey), "%s/front1.key", hs.mixed);
    snprintf(mca, sizeof(mca), "%s/ca.crt", hs.mixed);
    int code = -1;
    char *out = run(hs_front_bin(),
                    (char *[]){"--back", back, "--tunnel-cert", mcrt, "--tunnel-key", mkey, "--tunnel-ca", mca,
                               "--listen", "127.0.0.1:0", "--secret", hs.secret_hex, "--workers", "1", NULL},
                    &code);
    fprintf(stderr, "front with a certificate its CA did not sign: exit %d\n", code);
    CHECK(code != 0);
    CHECK(strstr(out, "front1.crt") != NULL);
    CHECK(strstr(out, "tunnel up") == NULL);
    mtp_free(out);
  }

  /* A back whose certificate comes from another CA: the front refuses it. */
  CHECK(hs_back_start_ex(&hs.back2, NULL, hs.other, "127.0.0.1:0", "1", extra) == 0);
  char back2[64];
  snprintf(back2, sizeof(back2), "127.0.0.1:%u", hs.back2.port);
  CHECK(hs_front_start_ex(&hs.fronts[3], NULL, NULL, "front3", back2, NULL, "1", extra) == 0);
  CHECK_MSG(hs_wait_metric_ge(&hs.fronts[3], "mtproxy_tunnel_failures_total", 2, 30000, &v),
            "front3 counted %g failures", v);
  expect_refused_front(&hs.fronts[3]);
  CHECK(hs_metric(&hs.back2, "mtproxy_tunnel_connections") == 0);
  CHECK(hs_metric(&hs.back2, "mtproxy_tunnel_streams_opened_total") == 0);
  CHECK(hs_node_stop(&hs.fronts[3]) == 0);
  CHECK(hs_node_stop(&hs.back2) == 0);

  /* An allow-list: back2 (the real CA) lets in front2 only. front3, from the same CA, is
   * refused after the handshake; front2 is served. */
  CHECK(hs_back_start_ex(&hs.back2, NULL, NULL, "127.0.0.1:0", "1",
                         (char *[]){"--config", g_conf, "--tunnel-allow", "front2", NULL}) == 0);
  snprintf(back2, sizeof(back2), "127.0.0.1:%u", hs.back2.port);
  CHECK(hs_front_start_ex(&hs.fronts[2], NULL, NULL, "front3", back2, NULL, "1", extra) == 0);
  CHECK(hs_front_start_ex(&hs.fronts[3], NULL, NULL, "front2", back2, NULL, "1", extra) == 0);
  CHECK(hs_echo_within(hs.fronts[3].port, MTP_PROTO_PADDED, 30000) >= 0);
  CHECK_MSG(hs_wait_metric_ge(&hs.back2, "mtproxy_tunnel_failures_total", 2, 30000, &v), "back2 counted %g failures",
            v);
  CHECK(h_wait_log(&hs.back2.proc, "front 'front3' is not in tunnel_allowed_fronts", NULL, 0, 5000) == 0);
  for (int i = 0; i < 3; i++)
    CHECK(hs_echo("127.0.0.1", hs.fronts[2].port, MTP_PROTO_INTERMEDIATE, 2, 256, 5000) == MTP_ECLOSED);
  CHECK(hs_metric(&hs.fronts[2], "mtproxy_tunnel_connections") == 0);
  CHECK(hs_metric(&hs.back2, "mtproxy_tunnel_connections") == 1);
  CHECK(hs_node_stop(&hs.fronts[2]) == 0);
  CHECK(hs_node_stop(&hs.fronts[3]) == 0);
  CHECK(hs_node_stop(&hs.back2) == 0);

  /* TLS clients: the control (front3's real certificate) completes the handshake; without a
   * certificate, with a foreign one, or with the CA of the fronts but a foreign key, refused. */
  char ca[400], f3crt[400], f3key[400], ocrt[400], okey[400], oca[400];
  snprintf(ca, sizeof(ca), "%s/ca.crt", hs.certs);
  snprintf(f3crt, sizeof(f3crt), "%s/front3.crt", hs.certs);
  snprintf(f3key, sizeof(f3key), "%s/front3.key", hs.certs);
  snprintf(ocrt, sizeof(ocrt), "%s/front1.crt", hs.other);
  snprintf(okey, sizeof(okey), "%s/front1.key", hs.other);
  snprintf(oca, sizeof(oca), "%s/ca.crt", hs.other);
  char detail[256];
  int r = hs_tls_probe(hs.back.port, ca, f3crt, f3key, 10000, detail, sizeof(detail));
  CHECK_MSG(r == 1, "control handshake: %d %s", r, detail);
  r = hs_tls_probe(hs.back.port, ca, NULL, NULL, 10000, detail, sizeof(detail));
  fprintf(stderr, "TLS without a client certificate: %d (%s)\n", r, detail);
  CHECK(r == 0);
  r = hs_tls_probe(hs.back.port, ca, ocrt, okey, 10000, detail, sizeof(detail));
  fprintf(stderr, "TLS with another CA's certificate: %d (%s)\n", r, detail);
  CHECK(r == 0);
  /* The back says why: the client's certificate did not verify. */
  CHECK_MSG(h_wait_log(&hs.back.proc, "Certificate verification failed", NULL, 0, 5000) == 0,
            "the back's log does not mention the failed certificate check");
  r = hs_tls_probe(hs.back.port, ca, f3crt, okey, 10000, detail, sizeof(detail));
  fprintf(stderr, "TLS with a certificate and the wrong key: %d (%s)\n", r, detail);
  CHECK(r == 0);
  /* And the other way round: a client trusting another CA refuses the back. */
  r = hs_tls_probe(hs.back.port, oca, f3crt, f3key, 10000, detail, sizeof(detail));
  CHECK(r == 0);

  /* Plain TCP: an obfuscated2-like header and an HTTP request; garbage; silence. */
  uint8_t rx[8192];
  size_t got = 0;
  int fd = hx_connect(hs.back.port, 5000);
  CHECK(fd >= 0);
  uint8_t junk[4096];
  mtp_random(junk, 64);
  static const char http[] = "GET / HTTP/1.1\r\nHost: back\r\n\r\n";
  memcpy(junk + 64, http, sizeof(http) - 1);
  CHECK(hx_write_all(fd, junk, 64 + sizeof(http) - 1) == 0);
  CHECK(hx_read_until_eof(fd, 30000, rx, sizeof(rx), &got) == 0);
  fprintf(stderr, "plain TCP client: closed after %zu bytes\n", got);
  CHECK(only_tls_alerts(rx, got));
  close(fd);

  fd = hx_connect(hs.back.port, 5000);
  CHECK(fd >= 0);
  mtp_random(junk, sizeof(junk));
  junk[0] = 0x16; /* looks like a TLS handshake record, then garbage */
  junk[1] = 0x03;
  junk[2] = 0x03;
  (void)hx_write_all(fd, junk, sizeof(junk)); /* the back may close before it took it all */
  CHECK(hx_read_until_eof(fd, 30000, rx, sizeof(rx), &got) == 0);
  fprintf(stderr, "garbage: closed after %zu bytes\n", got);
  CHECK(only_tls_alerts(rx, got));
  close(fd);

  int64_t t0 = hx_now_ms();
  fd = hx_connect(hs.back.port, 5000);
  CHECK(fd >= 0);
  CHECK(hx_read_until_eof(fd, 40000, rx, sizeof(rx), &got) == 0);
  fprintf(stderr, "silent TCP client: closed after %lld ms, %zu bytes\n", (long long)(hx_now_ms() - t0), got);
  CHECK(got == 0);
  close(fd);

  /* None of that disturbed the real fronts. */
  CHECK(hs_metric(&hs.back, "mtproxy_tunnel_connections") == 3);
  CHECK(hs_echo("127.0.0.1", hs.fronts[0].port, MTP_PROTO_PADDED, 2, 256, 5000) == MTP_OK);
  CHECK(hs_echo("127.0.0.1", hs.fronts[1].port, MTP_PROTO_ABRIDGED, 2, 256, 5000) == MTP_OK);
}

/* ---- 6. a slow client does not stall another on the same tunnel ---- */

/* One echo through c; returns its latency in ms (fails the test when none within 2 s). */
static int64_t echo_once(struct tclient *c, size_t len) {
  int64_t el;
  int rc = hx_echo(c, len, MAX_ECHO_MS, &el);
  CHECK_MSG(rc == MTP_OK && el < MAX_ECHO_MS, "echo: %s after %lld ms", mtp_strerror(rc), (long long)el);
  return el;
}

static void test_slow_reader(void) {
  /* front1 has one worker and one tunnel connection: A and B share it. */
  struct tclient a, b;
  client_open(&a, hs.fronts[0].port, MTP_PROTO_ABRIDGED, 2);
  client_open(&b, hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 2);
  echo_once(&a, 128);
  echo_once(&b, 128);
  struct fm_conn_info ia, ib;
  CHECK(find_client(a.fd, &ia));
  CHECK(find_client(b.fd, &ib));
  CHECK(ia.conn_id != ib.conn_id);

  /* Phase 1: the fake sends A less than the send budget but more than its tunnel window while A
   * does not read: A stays open with its window full, and B, on the same tunnel, keeps echoing.
   * Then A reads everything that was held back for it. */
  const uint64_t small = 28 * 65536;
  struct fm_stats st0;
  fm_get_stats(hs.fm, &st0);
  CHECK(small > WINDOW && small < BUDGET);
  CHECK(fm_push(hs.fm, ia.conn_id, small, 65536) == MTP_OK);
  int64_t worst1 = 0;
  for (int i = 0; i < 30; i++) {
    int64_t el = echo_once(&b, 1024);
    worst1 = el > worst1 ? el : worst1;
  }
  struct fm_conn_info ia1;
  CHECK(fm_conn_find(hs.fm, ia.conn_id, &ia1) == MTP_OK && !ia1.close_conn);
  uint64_t got_a = 0;
  int64_t read_deadline = hx_now_ms() + 10000;
  while (got_a < small && hx_now_ms() < read_deadline) {
    struct tc_msg m;
    int rc = tc_recv(&a, 5000, &m);
    CHECK_MSG(rc == MTP_OK, "A reading its backlog: %s after %llu bytes", mtp_strerror(rc), (unsigned long long)got_a);
    CHECK(m.kind == TC_PACKET && m.len == 65536);
    got_a += m.len;
  }
  fprintf(stderr, "A not reading: B echoed 30 times (worst %lld ms); then A read its %llu bytes\n", (long long)worst1,
          (unsigned long long)got_a);
  CHECK(got_a == small);
  echo_once(&a, 128);

  /* Phase 2: far more than the budget: A is closed, B is not slowed. */
  long back0 = hx_vmrss_kb(hs.back.proc.pid), front0 = hx_vmrss_kb(hs.fronts[0].proc.pid);
  long back_max = back0, front_max = front0;
  CHECK(back0 > 0 && front0 > 0);
  struct fm_stats st;
  fm_get_stats(hs.fm, &st);
  uint64_t closes0 = st.close_conns;

  /* A stops reading; the fake pushes 256 MiB at it. B keeps echoing meanwhile. */
  CHECK(fm_push(hs.fm, ia.conn_id, 256ull << 20, 65536) == MTP_OK);
  int64_t deadline = hx_now_ms() + 30000;
  int echoes = 0;
  int64_t worst = 0;
  bool closed = false;
  while (hx_now_ms() < deadline) {
    int64_t el = echo_once(&b, 512);
    worst = el > worst ? el : worst;
    echoes++;
    long kb = hx_vmrss_kb(hs.back.proc.pid);
    back_max = kb > back_max ? kb : back_max;
    kb = hx_vmrss_kb(hs.fronts[0].proc.pid);
    front_max = kb > front_max ? kb : front_max;
    struct fm_conn_info x;
    if (fm_conn_find(hs.fm, ia.conn_id, &x) == MTP_OK && x.close_conn) {
      closed = true;
      break;
    }
  }
  fm_get_stats(hs.fm, &st);
  fprintf(stderr, "slow client closed=%d after %d echoes of B (worst %lld ms); pushed %llu bytes\n", closed, echoes,
          (long long)worst, (unsigned long long)st.pushed_bytes);
  CHECK(closed);
  CHECK(st.close_conns >= closes0 + 1);
  struct fm_conn_info ib2;
  CHECK(fm_conn_find(hs.fm, ib.conn_id, &ib2) == MTP_OK && !ib2.close_conn);
  CHECK(st.pushed_bytes < (256ull << 20) / 2);
  for (int i = 0; i < 20; i++) {
    int64_t el = echo_once(&b, 1024);
    worst = el > worst ? el : worst;
  }
  long limit = (BUDGET + WINDOW) / 1024 + SLACK_KB;
  fprintf(stderr, "VmRSS back %ld -> max %ld KiB, front %ld -> max %ld KiB (limit +%ld KiB)\n", back0, back_max,
          front0, front_max, limit);
  CHECK(back_max <= back0 + limit);
  CHECK(front_max <= front0 + limit);
  size_t drained = 0;
  CHECK(hx_wait_eof(a.fd, 10000, &drained) == 0);
  fprintf(stderr, "A drained %zu bytes before its close\n", drained);
  tc_close(&a);
  echo_once(&b, 256);
  tc_close(&b);
}

/* ---- 7. the back killed and restarted ---- */

static void test_back_restart(void) {
  /* An idle client with an open stream on each front. */
  struct tclient c1, c2;
  client_open(&c1, hs.fronts[0].port, MTP_PROTO_PADDED, 2);
  client_open(&c2, hs.fronts[1].port, MTP_PROTO_PADDED, 2);
  echo_once(&c1, 256);
  echo_once(&c2, 256);
  double connects1 = hs_metric(&hs.fronts[0], "mtproxy_tunnel_connects_total");
  CHECK(connects1 >= 1);

  uint16_t port = hs.back.port;
  CHECK(hx_signal_wait(&hs.back.proc, SIGKILL, 10000) == 128 + SIGKILL);
  h_stop(&hs.back.proc, 1000); /* frees the reader; the process is gone */
  h_remove_log(&hs.back.proc);
  int64_t t_kill = hx_now_ms();

  /* The fronts close their clients: the tunnel is gone. */
  CHECK(tc_wait_closed(&c1, 30000) == MTP_ECLOSED);
  CHECK(tc_wait_closed(&c2, 30000) == MTP_ECLOSED);
  fprintf(stderr, "clients closed %lld ms after the kill\n", (long long)(hx_now_ms() - t_kill));
  tc_close(&c1);
  tc_close(&c2);
  double v = -1;
  /* While the back is down, new clients are closed (not left hanging). */
  for (int i = 0; i < 3; i++) {
    int rc = hs_echo("127.0.0.1", hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 2, 256, 5000);
    CHECK_MSG(rc == MTP_ECLOSED, "with the back down a client got %s", mtp_strerror(rc));
  }
  CHECK(hs_metric(&hs.fronts[0], "mtproxy_tunnel_connections") == 0);

  /* Restart on the same port. */
  char listen[64];
  snprintf(listen, sizeof(listen), "127.0.0.1:%u", port);
  char *extra[] = {"--config", g_conf, NULL};
  int64_t t_start = hx_now_ms();
  CHECK(hs_back_start(&hs.back, listen, "2", extra) == 0);
  CHECK(hs.back.port == port);
  int64_t ms1 = hs_echo_within(hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 30000);
  int64_t ms2 = hs_echo_within(hs.fronts[1].port, MTP_PROTO_ABRIDGED, 30000);
  fprintf(stderr, "after the restart: front1 echoes after %lld ms, front2 after %lld ms (back start took %lld ms)\n",
          (long long)ms1, (long long)ms2, (long long)(hx_now_ms() - t_start));
  CHECK(ms1 >= 0 && ms2 >= 0);
  CHECK_MSG(hs_wait_metric_ge(&hs.back, "mtproxy_tunnel_connections", 3, 30000, &v), "back has %g tunnels", v);
  CHECK(hs_metric(&hs.fronts[0], "mtproxy_tunnel_connects_total") >= connects1 + 1);
  /* Every worker of both fronts is back: many clients all echo. */
  for (int i = 0; i < 20; i++) {
    CHECK(hs_echo("127.0.0.1", hs.fronts[0].port, MTP_PROTO_PADDED, 2, 256, 5000) == MTP_OK);
    CHECK(hs_echo("127.0.0.1", hs.fronts[1].port, MTP_PROTO_PADDED, 2, 256, 5000) == MTP_OK);
  }
}

int main(void) {
  hs_setup();
  check_on_fail = hs_cleanup;
  uint8_t tag[16];
  CHECK(mtp_hex_decode(k_tag_hex, tag, 16) == 16);
  snprintf(g_conf, sizeof(g_conf), "%s/split.json", hs.dir);
  char json[256];
  int jl = snprintf(json, sizeof(json),
                    "{\"client_send_budget\": %ld, \"tunnel_heartbeat\": 2, \"tunnel_timeout\": 6,"
                    " \"handshake_timeout\": 3}\n",
                    BUDGET);
  CHECK(h_write_file(g_conf, json, (size_t)jl) == 0);

  test_certs();
  test_cli();

  char *extra_back[] = {"--config", g_conf, NULL};
  CHECK(hs_back_start(&hs.back, "127.0.0.1:0", "2", extra_back) == 0);
  char *extra_front[] = {"--config", g_conf, "--tag", (char *)k_tag_hex, NULL};
  CHECK(hs_front_start(&hs.fronts[0], "front1", hs.back.port, "1", extra_front) == 0);
  /* The front prints its links like mtproxy. */
  char link[128];
  snprintf(link, sizeof(link), "tg://proxy?server=127.0.0.1&port=%u&secret=", hs.fronts[0].port);
  CHECK(h_wait_log(&hs.fronts[0].proc, link, NULL, 0, 5000) == 0);
  int64_t up = hs_echo_within(hs.fronts[0].port, MTP_PROTO_INTERMEDIATE, 30000);
  fprintf(stderr, "front1 served its first client %lld ms after it listened\n", (long long)up);
  CHECK(up >= 0);

  test_echo(tag);
  test_two_fronts();
  test_unauthenticated();
  test_slow_reader();
  test_back_restart();

  CHECK(hs_finish() == 0);
  return check_report();
}
