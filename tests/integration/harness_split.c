/* harness_split.c - see harness_split.h. */
#include "harness_split.h"

#include <dirent.h>
#include <errno.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

struct hs_scene hs = {.back = {.proc = {.pid = -1}}, .back2 = {.proc = {.pid = -1}}};

static const char k_secret_hex[] = "0123456789abcdeffedcba9876543210";

const char *hs_back_bin(void) {
  const char *b = getenv("MTPROXY_BACK_BIN");
  return (b && *b) ? b : NULL;
}

const char *hs_front_bin(void) {
  const char *b = getenv("MTPROXY_FRONT_BIN");
  return (b && *b) ? b : NULL;
}

void hs_rmtree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  char path[600];
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
      h_rmdir(path);
    else
      unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

int hs_certs(char *const args[], char **out) {
  const char *bin = hs_back_bin();
  if (out)
    *out = NULL;
  if (!bin)
    return -1;
  char *text = NULL;
  int code = -1;
  if (hx_run_cmd(bin, "certs", args, 60000, &text, &code) != 0) {
    mtp_free(text);
    return -1;
  }
  if (out)
    *out = text;
  else
    mtp_free(text);
  return code;
}

static void node_init(struct hs_node *n) {
  memset(n, 0, sizeof(*n));
  n->proc.pid = -1;
}

static bool node_has_proc(const struct hs_node *n) { return n->proc._impl != NULL || n->proc.pid > 0; }

void hs_cleanup(void) {
  struct hs_node *all[HS_MAX_FRONTS + 2];
  all[0] = &hs.back;
  all[1] = &hs.back2;
  for (int i = 0; i < HS_MAX_FRONTS; i++)
    all[i + 2] = &hs.fronts[i];
  for (int i = 0; i < HS_MAX_FRONTS + 2; i++) {
    struct hs_node *n = all[i];
    if (node_has_proc(n)) {
      fprintf(stderr, "===== %s =====\n", i < 2 ? "mtproxy-back" : "mtproxy-front");
      h_dump_log(&n->proc);
      h_stop(&n->proc, 5000);
    }
    /* The log file stays for a post-mortem (its path was printed). */
  }
  fm_free(hs.fm);
  hs.fm = NULL;
  if (hs.dir[0])
    hs_rmtree(hs.dir);
  hs.dir[0] = '\0';
}

static int copy_file(const char *from_dir, const char *to_dir, const char *name) {
  char src[600], dst[600];
  snprintf(src, sizeof(src), "%s/%s", from_dir, name);
  snprintf(dst, sizeof(dst), "%s/%s", to_dir, name);
  FILE *f = fopen(src, "rb");
  if (!f)
    return -1;
  char buf[16384];
  size_t n = fread(buf, 1, sizeof(buf), f);
  fclose(f);
  return h_write_file(dst, buf, n);
}

static void require(bool ok, const char *what) {
  if (ok)
    return;
  fprintf(stderr, "test setup failed: %s\n", what);
  hs_cleanup();
  exit(1);
}

void hs_setup(void) {
  node_init(&hs.back);
  node_init(&hs.back2);
  for (int i = 0; i < HS_MAX_FRONTS; i++)
    node_init(&hs.fronts[i]);
  require(hs_back_bin() != NULL, "MTPROXY_BACK_BIN is not set");
  require(hs_front_bin() != NULL, "MTPROXY_FRONT_BIN is not set");
  uint8_t proxy_secret[128];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &hs.fm);
  require(fport > 0, "fake middle proxy did not start");
  require(h_tmpdir(hs.dir, sizeof(hs.dir)) == 0, "no temp dir");
  require(h_write_middle_files(hs.dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, hs.sp, hs.cp) == 0,
          "cannot write the Telegram config files");
  snprintf(hs.certs, sizeof(hs.certs), "%s/certs", hs.dir);
  snprintf(hs.other, sizeof(hs.other), "%s/other", hs.dir);
  char *out = NULL;
  require(hs_certs((char *[]){"init", hs.certs, NULL}, &out) == 0, out ? out : "certs init failed");
  mtp_free(out);
  static char *const names[] = {"front1", "front2", "front3"};
  for (size_t i = 0; i < 3; i++) {
    require(hs_certs((char *[]){"issue", hs.certs, names[i], NULL}, &out) == 0, out ? out : "certs issue failed");
    mtp_free(out);
  }
  /* An unrelated CA whose front has the same name as a real one. */
  require(hs_certs((char *[]){"init", hs.other, NULL}, &out) == 0, out ? out : "certs init (other) failed");
  mtp_free(out);
  require(hs_certs((char *[]){"issue", hs.other, "front1", NULL}, &out) == 0, out ? out : "certs issue failed");
  mtp_free(out);
  snprintf(hs.mixed, sizeof(hs.mixed), "%s/mixed", hs.dir);
  require(mkdir(hs.mixed, 0700) == 0 && copy_file(hs.certs, hs.mixed, "ca.crt") == 0 &&
              copy_file(hs.other, hs.mixed, "front1.crt") == 0 && copy_file(hs.other, hs.mixed, "front1.key") == 0,
          "cannot make the impostor's directory");
  memcpy(hs.secret_hex, k_secret_hex, sizeof(k_secret_hex));
  require(mtp_hex_decode(k_secret_hex, hs.secret, 16) == 16, "bad secret");
}

/* argv = prefix..., bin, fixed..., extra... (at most 64 entries). */
static int spawn(struct hs_node *n, char *const prefix[], const char *bin, char *const fixed[], char *const extra[]) {
  char *argv[64];
  size_t k = 0;
  for (size_t i = 0; prefix && prefix[i] && k < 60; i++)
    argv[k++] = prefix[i];
  argv[k++] = (char *)bin;
  for (size_t i = 0; fixed[i] && k < 62; i++)
    argv[k++] = fixed[i];
  for (size_t i = 0; extra && extra[i] && k < 63; i++)
    argv[k++] = extra[i];
  argv[k] = NULL;
  node_init(n);
  return h_spawn(&n->proc, argv);
}

int hs_back_start_ex(struct hs_node *n, char *const prefix[], const char *certdir, const char *listen,
                     const char *workers, char *const extra[]) {
  if (certdir == NULL)
    certdir = hs.certs;
  char crt[400], key[400], ca[400];
  snprintf(crt, sizeof(crt), "%s/back.crt", certdir);
  snprintf(key, sizeof(key), "%s/back.key", certdir);
  snprintf(ca, sizeof(ca), "%s/ca.crt", certdir);
  bool admin = prefix == NULL;
  char *fixed[] = {"--tunnel-listen", (char *)listen, "--tunnel-cert", crt, "--tunnel-key", key, "--tunnel-ca", ca,
                   "--proxy-secret", hs.sp, "--proxy-config", hs.cp, "--workers", (char *)workers,
                   "--log-level", "info", admin ? "--admin" : NULL, "127.0.0.1:0", NULL};
  if (spawn(n, prefix, hs_back_bin(), fixed, extra) != 0)
    return -1;
  if (h_wait_port(&n->proc, "tunnel listening on ", &n->port, 40000) != 0) {
    fprintf(stderr, "mtproxy-back did not announce its tunnel port\n");
    return -1;
  }
  if (admin && h_wait_admin(&n->proc, &n->admin, 10000) != 0) {
    fprintf(stderr, "mtproxy-back did not announce its admin endpoint\n");
    return -1;
  }
  return 0;
}

int hs_back_start(struct hs_node *n, const char *listen, const char *workers, char *const extra[]) {
  return hs_back_start_ex(n, NULL, NULL, listen, workers, extra);
}

int hs_front_start_ex(struct hs_node *n, char *const prefix[], const char *certdir, const char *name,
                      const char *back, const char *listen, const char *workers, char *const extra[]) {
  if (certdir == NULL)
    certdir = hs.certs;
  char crt[400], key[400], ca[400];
  snprintf(crt, sizeof(crt), "%s/%s.crt", certdir, name);
  snprintf(key, sizeof(key), "%s/%s.key", certdir, name);
  snprintf(ca, sizeof(ca), "%s/ca.crt", certdir);
  bool admin = prefix == NULL;
  char *fixed[] = {"--back", (char *)back, "--tunnel-cert", crt, "--tunnel-key", key, "--tunnel-ca", ca,
                   "--listen", (char *)(listen ? listen : "127.0.0.1:0"), "--secret", hs.secret_hex,
                   "--node-name", (char *)name, "--workers", (char *)workers, "--log-level", "info",
                   admin ? "--admin" : NULL, "127.0.0.1:0", NULL};
  if (spawn(n, prefix, hs_front_bin(), fixed, extra) != 0)
    return -1;
  if (h_wait_listener(&n->proc, "l0", &n->port, 30000) != 0) {
    fprintf(stderr, "mtproxy-front (%s) did not announce listener l0\n", name);
    return -1;
  }
  if (admin && h_wait_admin(&n->proc, &n->admin, 10000) != 0) {
    fprintf(stderr, "mtproxy-front (%s) did not announce its admin endpoint\n", name);
    return -1;
  }
  return 0;
}

int hs_front_start(struct hs_node *n, const char *name, uint16_t back_port, const char *workers, char *const extra[]) {
  char back[64];
  snprintf(back, sizeof(back), "127.0.0.1:%u", back_port);
  return hs_front_start_ex(n, NULL, NULL, name, back, NULL, workers, extra);
}

int hs_node_stop(struct hs_node *n) { return h_stop(&n->proc, 10000); }

int hs_finish(void) {
  bool ok = true;
  for (int i = 0; i < HS_MAX_FRONTS; i++) {
    struct hs_node *n = &hs.fronts[i];
    if (!node_has_proc(n))
      continue;
    int rc = hs_node_stop(n);
    if (rc != 0) {
      fprintf(stderr, "mtproxy-front %d exited %d on SIGTERM (log %s)\n", i, rc, n->proc.log_path);
      ok = false;
    }
  }
  struct hs_node *backs[2] = {&hs.back, &hs.back2};
  for (int i = 0; i < 2; i++) {
    if (!node_has_proc(backs[i]))
      continue;
    int rc = hs_node_stop(backs[i]);
    if (rc != 0) {
      fprintf(stderr, "mtproxy-back exited %d on SIGTERM (log %s)\n", rc, backs[i]->proc.log_path);
      ok = false;
    }
  }
  if (ok && !fm_wait_open(hs.fm, 0, 5000)) {
    fprintf(stderr, "the fake middle proxy still has RPC connections open\n");
    ok = false;
  }
  if (!ok) {
    hs_cleanup();
    return -1;
  }
  h_remove_log(&hs.back.proc);
  h_remove_log(&hs.back2.proc);
  for (int i = 0; i < HS_MAX_FRONTS; i++)
    h_remove_log(&hs.fronts[i].proc);
  fm_free(hs.fm);
  hs.fm = NULL;
  hs_rmtree(hs.dir);
  hs.dir[0] = '\0';
  return 0;
}

int hs_echo(const char *host, uint16_t port, enum mtp_proto proto, int16_t dc, size_t len, int timeout_ms) {
  struct tclient c;
  tc_init(&c);
  int rc = tc_connect(&c, host, port, hs.secret, proto, dc, timeout_ms);
  uint8_t pkt[4096];
  if (len > sizeof(pkt))
    len = sizeof(pkt);
  tc_make_packet(pkt, len, true);
  if (rc == MTP_OK)
    rc = tc_send(&c, pkt, len, false);
  struct tc_msg m;
  if (rc == MTP_OK)
    rc = tc_recv(&c, timeout_ms, &m);
  if (rc == MTP_OK && (m.kind != TC_PACKET || m.len != len || memcmp(m.data, pkt, len) != 0))
    rc = MTP_EPROTO;
  tc_close(&c);
  return rc;
}

int64_t hs_echo_within(uint16_t port, enum mtp_proto proto, int timeout_ms) {
  int64_t t0 = hx_now_ms();
  struct timespec step = {0, 50 * 1000000L};
  for (;;) {
    int64_t left = t0 + timeout_ms - hx_now_ms();
    if (left <= 0)
      return -1;
    if (hs_echo("127.0.0.1", port, proto, 2, 256, left < 3000 ? (int)left : 3000) == MTP_OK)
      return hx_now_ms() - t0;
    nanosleep(&step, NULL);
  }
}

double hs_metric(const struct hs_node *n, const char *series) {
  double v = -1;
  if (n->admin == 0 || hx_scrape(n->admin, series, &v) != 0)
    return -1;
  return v;
}

bool hs_wait_metric_ge(const struct hs_node *n, const char *series, double want, int timeout_ms, double *last) {
  struct timespec step = {0, 20 * 1000000L};
  int64_t dl = hx_now_ms() + timeout_ms;
  for (;;) {
    *last = hs_metric(n, series);
    if (*last >= want)
      return true;
    if (hx_now_ms() >= dl)
      return false;
    nanosleep(&step, NULL);
  }
}

/* ---- a TLS client for probing the tunnel port ---- */

static int probe_send(void *ctx, const unsigned char *buf, size_t len) {
  int fd = *(int *)ctx;
  ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
  if (n >= 0)
    return (int)n;
  if (errno == EINTR)
    return MBEDTLS_ERR_SSL_WANT_WRITE;
  return MBEDTLS_ERR_NET_SEND_FAILED;
}

static int probe_recv(void *ctx, unsigned char *buf, size_t len) {
  int fd = *(int *)ctx;
  ssize_t n = recv(fd, buf, len, 0);
  if (n > 0)
    return (int)n;
  if (n == 0)
    return MBEDTLS_ERR_NET_CONN_RESET;
  if (errno == EINTR)
    return MBEDTLS_ERR_SSL_WANT_READ;
  if (errno == EAGAIN || errno == EWOULDBLOCK)
    return MBEDTLS_ERR_SSL_TIMEOUT;
  return MBEDTLS_ERR_NET_RECV_FAILED;
}

int hs_tls_probe(uint16_t port, const char *ca_path, const char *crt_path, const char *key_path, int timeout_ms,
                 char *detail, size_t detail_len) {
  mbedtls_ssl_context ssl;
  mbedtls_ssl_config conf;
  mbedtls_x509_crt ca, crt;
  mbedtls_pk_context key;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_ssl_init(&ssl);
  mbedtls_ssl_config_init(&conf);
  mbedtls_x509_crt_init(&ca);
  mbedtls_x509_crt_init(&crt);
  mbedtls_pk_init(&key);
  mbedtls_entropy_init(&entropy);
  mbedtls_ctr_drbg_init(&drbg);
  if (detail_len)
    detail[0] = '\0';
  int result = -1, rc;
  int fd = -1;
  if ((rc = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0)) != 0 ||
      (rc = mbedtls_x509_crt_parse_file(&ca, ca_path)) != 0 ||
      (crt_path && (rc = mbedtls_x509_crt_parse_file(&crt, crt_path)) != 0) ||
      (key_path && (rc = mbedtls_pk_parse_keyfile(&key, key_path, NULL)) != 0) ||
      (rc = mbedtls_ssl_config_defaults(&conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT)) != 0)
    goto out;
  mbedtls_ssl_conf_min_version(&conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_authmode(&conf, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_ca_chain(&conf, &ca, NULL);
  mbedtls_ssl_conf_rng(&conf, mbedtls_ctr_drbg_random, &drbg);
  if (crt_path && key_path && (rc = mbedtls_ssl_conf_own_cert(&conf, &crt, &key)) != 0)
    goto out;
  if ((rc = mbedtls_ssl_setup(&ssl, &conf)) != 0 || (rc = mbedtls_ssl_set_hostname(&ssl, "back")) != 0)
    goto out;
  fd = hx_connect(port, timeout_ms);
  if (fd < 0) {
    snprintf(detail, detail_len, "connect failed");
    goto out_fd;
  }
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  mbedtls_ssl_set_bio(&ssl, &fd, probe_send, probe_recv, NULL);
  do
    rc = mbedtls_ssl_handshake(&ssl);
  while (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE);
  if (rc == 0)
    result = 1;
  else if (rc == MBEDTLS_ERR_SSL_TIMEOUT)
    result = -1;
  else
    result = 0;
  if (rc == 0)
    mbedtls_ssl_close_notify(&ssl);
out:
  if (rc != 0 && detail_len && !detail[0])
    mbedtls_strerror(rc, detail, detail_len);
out_fd:
  if (fd >= 0)
    close(fd);
  mbedtls_ssl_free(&ssl);
  mbedtls_ssl_config_free(&conf);
  mbedtls_x509_crt_free(&ca);
  mbedtls_x509_crt_free(&crt);
  mbedtls_pk_free(&key);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&entropy);
  return result;
}
