/*
 * test_certs.c - the split-mode private CA (back/certs.{h,c}): init then issue in a fresh
 * temporary directory; file modes; the issued certificates verify against their CA and not
 * against another CA; nothing is ever overwritten (the error names the file); bad names; and a
 * full TLS 1.2 handshake with mutual authentication over memory buffers (no sockets): it
 * succeeds with these certificates and fails with a foreign-CA front, a front certificate
 * posing as the back, and a front without a certificate.
 */
#include <dirent.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#include "certs.h"
#include "err.h"

#include "check.h"

static char dir_a[64], dir_b[64];

static void path_of(char *out, size_t cap, const char *dir, const char *file) {
  int n = snprintf(out, cap, "%s/%s", dir, file);
  CHECK(n > 0 && (size_t)n < cap);
}

static int file_mode(const char *dir, const char *file) {
  char p[256];
  path_of(p, sizeof(p), dir, file);
  struct stat st;
  if (stat(p, &st) != 0)
    return -1;
  return (int)(st.st_mode & 0777);
}

static bool file_exists(const char *dir, const char *file) { return file_mode(dir, file) >= 0; }

/* Reads a whole small file into a malloc'd, NUL-terminated buffer. */
static char *slurp(const char *dir, const char *file) {
  char p[256];
  path_of(p, sizeof(p), dir, file);
  FILE *f = fopen(p, "rb");
  CHECK(f != NULL);
  char *buf = calloc(1, 16384);
  CHECK(buf != NULL);
  size_t n = fread(buf, 1, 16383, f);
  CHECK(n > 0);
  fclose(f);
  return buf;
}

static void load_crt(mbedtls_x509_crt *crt, const char *dir, const char *file) {
  char p[256];
  path_of(p, sizeof(p), dir, file);
  mbedtls_x509_crt_init(crt);
  CHECK(mbedtls_x509_crt_parse_file(crt, p) == 0);
}

static void load_key(mbedtls_pk_context *pk, const char *dir, const char *file) {
  char p[256];
  path_of(p, sizeof(p), dir, file);
  mbedtls_pk_init(pk);
  CHECK(mbedtls_pk_parse_keyfile(pk, p, NULL) == 0);
}

static void test_init_issue(void) {
  char err[512];
  CHECK(mtp_certs_init(dir_a, err, sizeof(err)) == MTP_OK);
  CHECK(mtp_certs_issue(dir_a, "front1", err, sizeof(err)) == MTP_OK);
  CHECK(mtp_certs_issue(dir_a, "fra-2.example_x", err, sizeof(err)) == MTP_OK);
  CHECK(file_mode(dir_a, "ca.key") == 0600);
  CHECK(file_mode(dir_a, "back.key") == 0600);
  CHECK(file_mode(dir_a, "front1.key") == 0600);
  CHECK(file_mode(dir_a, "ca.crt") == 0644);
  CHECK(file_mode(dir_a, "back.crt") == 0644);
  CHECK(file_mode(dir_a, "front1.crt") == 0644);
  CHECK(file_exists(dir_a, "fra-2.example_x.crt") && file_exists(dir_a, "fra-2.example_x.key"));

  /* A second, unrelated CA (a directory that does not exist yet: init creates it). */
  CHECK(mtp_certs_init(dir_b, err, sizeof(err)) == MTP_OK);
  CHECK(mtp_certs_issue(dir_b, "front1", err, sizeof(err)) == MTP_OK);

  /* Keys are EC on secp256r1 and match their certificates. */
  mbedtls_x509_crt crt;
  mbedtls_pk_context key;
  load_crt(&crt, dir_a, "front1.crt");
  load_key(&key, dir_a, "front1.key");
  CHECK(mbedtls_pk_get_type(&key) == MBEDTLS_PK_ECKEY);
  CHECK(mbedtls_pk_ec(key)->grp.id == MBEDTLS_ECP_DP_SECP256R1);
  CHECK(mbedtls_pk_check_pair(&crt.pk, &key) == 0);
  CHECK(crt.version == 3);
  CHECK(crt.ca_istrue == 0);
  /* About ten years of validity. */
  CHECK(crt.valid_to.year - crt.valid_from.year >= 9 && crt.valid_to.year - crt.valid_from.year <= 10);
  mbedtls_pk_free(&key);
  mbedtls_x509_crt_free(&crt);
}

static void test_verify(void) {
  mbedtls_x509_crt ca_a, ca_b, front_a, front_b, back_a, front1b;
  load_crt(&ca_a, dir_a, "ca.crt");
  load_crt(&ca_b, dir_b, "ca.crt");
  load_crt(&front_a, dir_a, "front1.crt");
  load_crt(&front_b, dir_b, "front1.crt");
  load_crt(&back_a, dir_a, "back.crt");
  load_crt(&front1b, dir_a, "fra-2.example_x.crt");
  CHECK(ca_a.ca_istrue == 1);
  uint32_t flags = 0;
  CHECK(mbedtls_x509_crt_verify(&front_a, &ca_a, NULL, NULL, &flags, NULL, NULL) == 0 && flags == 0);
  CHECK(mbedtls_x509_crt_verify(&front_a, &ca_a, NULL, "front1", &flags, NULL, NULL) == 0);
  CHECK(mbedtls_x509_crt_verify(&back_a, &ca_a, NULL, MTP_CERTS_BACK_NAME, &flags, NULL, NULL) == 0);
  /* A front's certificate does not carry the back's name. */
  CHECK(mbedtls_x509_crt_verify(&front_a, &ca_a, NULL, MTP_CERTS_BACK_NAME, &flags, NULL, NULL) != 0);
  CHECK(flags & MBEDTLS_X509_BADCERT_CN_MISMATCH);
  /* Another CA's certificate does not verify, and ours does not verify under the other CA. */
  flags = 0;
  CHECK(mbedtls_x509_crt_verify(&front_b, &ca_a, NULL, NULL, &flags, NULL, NULL) != 0);
  CHECK(flags & MBEDTLS_X509_BADCERT_NOT_TRUSTED);
  flags = 0;
  CHECK(mbedtls_x509_crt_verify(&back_a, &ca_b, NULL, NULL, &flags, NULL, NULL) != 0);
  CHECK(flags & MBEDTLS_X509_BADCERT_NOT_TRUSTED);
  /* Serial numbers are random: all distinct. */
  CHECK(front_a.serial.len >= 8 && front_a.serial.len == front1b.serial.len);
  CHECK(memcmp(front_a.serial.p, front1b.serial.p, front_a.serial.len) != 0);
  CHECK(front_a.serial.len != back_a.serial.len || memcmp(front_a.serial.p, back_a.serial.p, back_a.serial.len) != 0);
  CHECK(ca_a.serial.len != ca_b.serial.len || memcmp(ca_a.serial.p, ca_b.serial.p, ca_a.serial.len) != 0);
  mbedtls_x509_crt_free(&ca_a);
  mbedtls_x509_crt_free(&ca_b);
  mbedtls_x509_crt_free(&front_a);
  mbedtls_x509_crt_free(&front_b);
  mbedtls_x509_crt_free(&back_a);
  mbedtls_x509_crt_free(&front1b);
}

static int count_files(const char *dir) {
  DIR *d = opendir(dir);
  CHECK(d != NULL);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n;
}

static void test_no_overwrite(void) {
  char err[512];
  char *ca_before = slurp(dir_a, "ca.crt");
  char *key_before = slurp(dir_a, "ca.key");
  int files = count_files(dir_a);
  CHECK(mtp_certs_init(dir_a, err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "ca.key") != NULL && strstr(err, "already exists") != NULL && strstr(err, dir_a) != NULL);
  char *ca_after = slurp(dir_a, "ca.crt");
  char *key_after = slurp(dir_a, "ca.key");
  CHECK(strcmp(ca_before, ca_after) == 0 && strcmp(key_before, key_after) == 0);
  free(ca_before);
  free(ca_after);
  free(key_before);
  free(key_after);

  /* Only back.crt left: init still refuses and names it, creating nothing. */
  char tmpl[] = "/tmp/mtp_certs_XXXXXX";
  char *dir_c = mkdtemp(tmpl);
  CHECK(dir_c != NULL);
  char p[256];
  path_of(p, sizeof(p), dir_c, "back.crt");
  FILE *f = fopen(p, "w");
  CHECK(f != NULL);
  fclose(f);
  CHECK(mtp_certs_init(dir_c, err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "back.crt") != NULL);
  CHECK(count_files(dir_c) == 1);
  unlink(p);
  rmdir(dir_c);

  /* Issuing the same name twice refuses and names the file; the first pair is untouched. */
  char *front_before = slurp(dir_a, "front1.key");
  CHECK(mtp_certs_issue(dir_a, "front1", err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "front1.") != NULL && strstr(err, "already exists") != NULL);
  char *front_after = slurp(dir_a, "front1.key");
  CHECK(strcmp(front_before, front_after) == 0);
  free(front_before);
  free(front_after);
  CHECK(count_files(dir_a) == files);
}

static void test_bad_input(void) {
  char err[512];
  const char *bad[] = {"", "ca", "back", "../x", "a/b", ".hidden", "sp ace", "x\n",
                       "0123456789012345678901234567890123456789012345678901234567890123456789"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    CHECK(mtp_certs_issue(dir_a, bad[i], err, sizeof(err)) == MTP_EINVAL);
    CHECK(strstr(err, "bad front name") != NULL);
  }
  /* No CA in the directory. */
  char tmpl[] = "/tmp/mtp_certs_XXXXXX";
  char *empty = mkdtemp(tmpl);
  CHECK(empty != NULL);
  CHECK(mtp_certs_issue(empty, "front1", err, sizeof(err)) == MTP_EINVAL);
  CHECK(strstr(err, "ca.crt") != NULL);
  CHECK(count_files(empty) == 0);
  /* A CA key that does not match the CA certificate. */
  char src[256], dst[256];
  path_of(src, sizeof(src), dir_a, "ca.crt");
  path_of(dst, sizeof(dst), empty, "ca.crt");
  CHECK(link(src, dst) == 0);
  path_of(src, sizeof(src), dir_b, "ca.key");
  path_of(dst, sizeof(dst), empty, "ca.key");
  CHECK(link(src, dst) == 0);
  CHECK(mtp_certs_issue(empty, "front1", err, sizeof(err)) == MTP_EINVAL);
  CHECK(strstr(err, "does not match") != NULL);
  CHECK(count_files(empty) == 2);
  unlink(dst);
  path_of(dst, sizeof(dst), empty, "ca.crt");
  unlink(dst);
  rmdir(empty);
  /* err may be NULL. */
  CHECK(mtp_certs_issue(dir_a, "ca", NULL, 0) == MTP_EINVAL);
}

/* ---- TLS 1.2 over memory buffers ---- */
struct pipe {
  uint8_t buf[65536];
  size_t len;
};

struct end {
  struct pipe *in, *out;
};

static int mem_send(void *ctx, const unsigned char *buf, size_t len) {
  struct end *e = ctx;
  size_t room = sizeof(e->out->buf) - e->out->len;
  if (room == 0)
    return MBEDTLS_ERR_SSL_WANT_WRITE;
  if (len > room)
    len = room;
  memcpy(e->out->buf + e->out->len, buf, len);
  e->out->len += len;
  return (int)len;
}

static int mem_recv(void *ctx, unsigned char *buf, size_t len) {
  struct end *e = ctx;
  if (e->in->len == 0)
    return MBEDTLS_ERR_SSL_WANT_READ;
  if (len > e->in->len)
    len = e->in->len;
  memcpy(buf, e->in->buf, len);
  memmove(e->in->buf, e->in->buf + len, e->in->len - len);
  e->in->len -= len;
  return (int)len;
}

static mbedtls_entropy_context entropy;
static mbedtls_ctr_drbg_context drbg;

/*
 * One handshake: the front (client) uses front_dir/front_name.{crt,key} (no certificate when
 * front_name is NULL) and trusts ca_dir/ca.crt; the back (server) uses back_dir/back_file.{crt,key}
 * and trusts ca_dir/ca.crt. Returns 0 when both sides complete and exchange a message; else
 * the first error. *server_rc receives the back's last result.
 */
static int handshake(const char *ca_dir, const char *front_dir, const char *front_name, const char *back_dir,
                     const char *back_name, int *server_rc) {
  mbedtls_x509_crt ca, front_crt, back_crt;
  mbedtls_pk_context front_key, back_key;
  mbedtls_ssl_config ccfg, scfg;
  mbedtls_ssl_context cli, srv;
  char f[128];
  load_crt(&ca, ca_dir, "ca.crt");
  mbedtls_x509_crt_init(&front_crt);
  mbedtls_pk_init(&front_key);
  if (front_name != NULL) {
    snprintf(f, sizeof(f), "%s.crt", front_name);
    load_crt(&front_crt, front_dir, f);
    snprintf(f, sizeof(f), "%s.key", front_name);
    load_key(&front_key, front_dir, f);
  }
  snprintf(f, sizeof(f), "%s.crt", back_name);
  load_crt(&back_crt, back_dir, f);
  snprintf(f, sizeof(f), "%s.key", back_name);
  load_key(&back_key, back_dir, f);

  mbedtls_ssl_config_init(&ccfg);
  mbedtls_ssl_config_init(&scfg);
  mbedtls_ssl_init(&cli);
  mbedtls_ssl_init(&srv);
  CHECK(mbedtls_ssl_config_defaults(&ccfg, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT) == 0);
  CHECK(mbedtls_ssl_config_defaults(&scfg, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT) == 0);
  mbedtls_ssl_config *cfgs[2] = {&ccfg, &scfg};
  for (int i = 0; i < 2; i++) {
    mbedtls_ssl_conf_rng(cfgs[i], mbedtls_ctr_drbg_random, &drbg);
    mbedtls_ssl_conf_authmode(cfgs[i], MBEDTLS_SSL_VERIFY_REQUIRED);
    mbedtls_ssl_conf_ca_chain(cfgs[i], &ca, NULL);
    mbedtls_ssl_conf_min_version(cfgs[i], MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_max_version(cfgs[i], MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  }
  if (front_name != NULL)
    CHECK(mbedtls_ssl_conf_own_cert(&ccfg, &front_crt, &front_key) == 0);
  CHECK(mbedtls_ssl_conf_own_cert(&scfg, &back_crt, &back_key) == 0);
  CHECK(mbedtls_ssl_setup(&cli, &ccfg) == 0);
  CHECK(mbedtls_ssl_setup(&srv, &scfg) == 0);
  CHECK(mbedtls_ssl_set_hostname(&cli, MTP_CERTS_BACK_NAME) == 0);

  static struct pipe c2s, s2c;
  c2s.len = s2c.len = 0;
  struct end cend = {.in = &s2c, .out = &c2s}, send_ = {.in = &c2s, .out = &s2c};
  mbedtls_ssl_set_bio(&cli, &cend, mem_send, mem_recv, NULL);
  mbedtls_ssl_set_bio(&srv, &send_, mem_send, mem_recv, NULL);

  int crc = MBEDTLS_ERR_SSL_WANT_READ, src = MBEDTLS_ERR_SSL_WANT_READ, result = 0;
  for (int i = 0; i < 200 && (crc != 0 || src != 0); i++) {
    if (crc != 0)
      crc = mbedtls_ssl_handshake(&cli);
    if (src != 0)
      src = mbedtls_ssl_handshake(&srv);
    bool c_fail = crc != 0 && crc != MBEDTLS_ERR_SSL_WANT_READ && crc != MBEDTLS_ERR_SSL_WANT_WRITE;
    bool s_fail = src != 0 && src != MBEDTLS_ERR_SSL_WANT_READ && src != MBEDTLS_ERR_SSL_WANT_WRITE;
    if (c_fail || s_fail) {
      result = c_fail ? crc : src;
      break;
    }
  }
  *server_rc = src;
  if (result == 0 && (crc != 0 || src != 0))
    result = -1; /* did not finish within the bound */
  if (result == 0) {
    /* Both sides verified each other; the back sees the front's name in the CN. */
    CHECK(mbedtls_ssl_get_verify_result(&cli) == 0 && mbedtls_ssl_get_verify_result(&srv) == 0);
    const mbedtls_x509_crt *peer = mbedtls_ssl_get_peer_cert(&srv);
    CHECK(peer != NULL);
    char dn[128];
    CHECK(mbedtls_x509_dn_gets(dn, sizeof(dn), &peer->subject) > 0);
    char want[96];
    snprintf(want, sizeof(want), "CN=%s", front_name);
    CHECK(strstr(dn, want) != NULL);
    /* Application data goes through. */
    const char msg[] = "hello back";
    CHECK(mbedtls_ssl_write(&cli, (const unsigned char *)msg, sizeof(msg)) == (int)sizeof(msg));
    unsigned char got[64];
    CHECK(mbedtls_ssl_read(&srv, got, sizeof(got)) == (int)sizeof(msg));
    CHECK(memcmp(got, msg, sizeof(msg)) == 0);
  }
  mbedtls_ssl_free(&cli);
  mbedtls_ssl_free(&srv);
  mbedtls_ssl_config_free(&ccfg);
  mbedtls_ssl_config_free(&scfg);
  mbedtls_pk_free(&front_key);
  mbedtls_pk_free(&back_key);
  mbedtls_x509_crt_free(&front_crt);
  mbedtls_x509_crt_free(&back_crt);
  mbedtls_x509_crt_free(&ca);
  return result;
}

static void test_tls(void) {
  mbedtls_entropy_init(&entropy);
  mbedtls_ctr_drbg_init(&drbg);
  CHECK(mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, (const unsigned char *)"t", 1) == 0);
  int src = 0;
  /* Our front and our back: success. */
  CHECK(handshake(dir_a, dir_a, "front1", dir_a, "back", &src) == 0);
  CHECK(src == 0);
  /* A front signed by another CA: the back refuses it. */
  CHECK(handshake(dir_a, dir_b, "front1", dir_a, "back", &src) != 0);
  CHECK(src == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED);
  /* A front without a certificate: the back refuses it. */
  CHECK(handshake(dir_a, dir_a, NULL, dir_a, "back", &src) != 0);
  CHECK(src != 0);
  /* A front's certificate (same CA) posing as the back: the front refuses it (name check). */
  CHECK(handshake(dir_a, dir_a, "front1", dir_a, "fra-2.example_x", &src) == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED);
  /* A back from another CA: the front refuses it. */
  CHECK(handshake(dir_a, dir_a, "front1", dir_b, "back", &src) == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&entropy);
}

static void remove_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (d == NULL)
    return;
  struct dirent *e;
  char p[256];
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    path_of(p, sizeof(p), dir, e->d_name);
    unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

int main(void) {
  char ta[] = "/tmp/mtp_certs_XXXXXX";
  CHECK(mkdtemp(ta) != NULL);
  snprintf(dir_a, sizeof(dir_a), "%s", ta);
  snprintf(dir_b, sizeof(dir_b), "%s/other", ta);
  test_init_issue();
  test_verify();
  test_no_overwrite();
  test_bad_input();
  test_tls();
  remove_dir(dir_b);
  remove_dir(dir_a);
  return check_report();
}
