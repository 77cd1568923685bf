/*
 * certs.c - private CA, back and front certificates for split mode (see certs.h).
 */
#include "certs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/bignum.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#include "err.h"

#include "banned.h"

#define PEM_MAX 4096
#define PATH_MAX_LEN 4096
#define VALID_YEARS 10

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Maps an mbedTLS error to ours, writing "what: mbedTLS text" into err. */
static int tls_err(int rc, char *err, size_t errlen, const char *what) {
  char buf[160];
  mbedtls_strerror(rc, buf, sizeof(buf));
  set_err(err, errlen, "%s: %s", what, buf);
  if (rc == MBEDTLS_ERR_PK_ALLOC_FAILED || rc == MBEDTLS_ERR_X509_ALLOC_FAILED || rc == MBEDTLS_ERR_MPI_ALLOC_FAILED ||
      rc == MBEDTLS_ERR_ECP_ALLOC_FAILED)
    return MTP_ENOMEM;
  return MTP_EINVAL;
}

static int make_path(char *out, size_t cap, const char *dir, const char *name, const char *ext, char *err,
                     size_t errlen) {
  int n = snprintf(out, cap, "%s/%s.%s", dir, name, ext);
  if (n < 0 || (size_t)n >= cap) {
    set_err(err, errlen, "%s: path too long", dir);
    return MTP_EINVAL;
  }
  return MTP_OK;
}

/* The files one call creates, removed again if the call fails. */
struct created {
  char paths[4][PATH_MAX_LEN];
  int n;
};

static void undo_created(struct created *c) {
  for (int i = 0; i < c->n; i++)
    unlink(c->paths[i]);
  c->n = 0;
}

/* Writes len bytes to a new file (O_EXCL, mode). Names the file in err on failure. */
static int write_new_file(struct created *c, const char *path, const uint8_t *data, size_t len, mode_t mode,
                          char *err, size_t errlen) {
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    if (errno == EEXIST)
      set_err(err, errlen, "%s already exists; refusing to overwrite it", path);
    else
      set_err(err, errlen, "%s: cannot create: %s", path, strerror(errno));
    return MTP_EIO;
  }
  if (c->n < 4) {
    snprintf(c->paths[c->n], sizeof(c->paths[c->n]), "%s", path);
    c->n++;
  }
  /* The umask may have cleared bits we want (0644 certs); keys stay 0600 either way. */
  if (fchmod(fd, mode) != 0)
    goto fail;
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(fd, data + off, len - off);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      goto fail;
    off += (size_t)w;
  }
  if (fsync(fd) != 0)
    goto fail;
  if (close(fd) != 0) {
    fd = -1;
    goto fail;
  }
  return MTP_OK;
fail:
  set_err(err, errlen, "%s: cannot write: %s", path, strerror(errno));
  if (fd >= 0)
    close(fd);
  return MTP_EIO;
}

/* Refuses early (before any key generation) if path exists. */
static int must_not_exist(const char *path, char *err, size_t errlen) {
  struct stat st;
  if (lstat(path, &st) == 0) {
    set_err(err, errlen, "%s already exists; refusing to overwrite it", path);
    return MTP_EIO;
  }
  return MTP_OK;
}

/* An RNG seeded from the system entropy source. */
struct rng {
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
};

static int rng_setup(struct rng *r, char *err, size_t errlen) {
  mbedtls_entropy_init(&r->entropy);
  mbedtls_ctr_drbg_init(&r->drbg);
  static const char pers[] = "mtproxy-certs";
  int rc = mbedtls_ctr_drbg_seed(&r->drbg, mbedtls_entropy_func, &r->entropy, (const unsigned char *)pers,
                                 sizeof(pers) - 1);
  if (rc != 0)
    return tls_err(rc, err, errlen, "seeding the random generator");
  return MTP_OK;
}

static void rng_free(struct rng *r) {
  mbedtls_ctr_drbg_free(&r->drbg);
  mbedtls_entropy_free(&r->entropy);
}

static int gen_key(mbedtls_pk_context *key, struct rng *r, char *err, size_t errlen) {
  int rc = mbedtls_pk_setup(key, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY));
  if (rc == 0)
    rc = mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(*key), mbedtls_ctr_drbg_random, &r->drbg);
  if (rc != 0)
    return tls_err(rc, err, errlen, "generating an EC key");
  return MTP_OK;
}

/* Validity strings "YYYYMMDDhhmmss": from an hour ago (clock skew) to VALID_YEARS later. */
static void validity(char not_before[16], char not_after[16]) {
  time_t now = time(NULL);
  time_t start = now - 3600;
  struct tm tb, ta;
  gmtime_r(&start, &tb);
  gmtime_r(&now, &ta);
  ta.tm_year += VALID_YEARS;
  if (ta.tm_mon == 1 && ta.tm_mday == 29)
    ta.tm_mday = 28; /* no Feb 29 in the target year (mbedTLS rejects invalid dates) */
  if (strftime(not_before, 16, "%Y%m%d%H%M%S", &tb) == 0)
    not_before[0] = '\0';
  if (strftime(not_after, 16, "%Y%m%d%H%M%S", &ta) == 0)
    not_after[0] = '\0';
}

/* subjectAltName with one dNSName: SEQUENCE { [2] IA5String name }. name is short (<= 64). */
static int set_san_dns(mbedtls_x509write_cert *crt, const char *name) {
  uint8_t der[2 + 2 + MTP_CERTS_NAME_MAX];
  size_t n = strlen(name);
  if (n > MTP_CERTS_NAME_MAX)
    return MBEDTLS_ERR_X509_BAD_INPUT_DATA;
  der[0] = 0x30;
  der[1] = (uint8_t)(n + 2);
  der[2] = 0x82;
  der[3] = (uint8_t)n;
  memcpy(der + 4, name, n);
  return mbedtls_x509write_crt_set_extension(crt, MBEDTLS_OID_SUBJECT_ALT_NAME,
                                             MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0, der, n + 4);
}

/*
 * Signs a certificate for subject_key (CN = cn) with issuer_key and issuer_dn, as a CA or a
 * leaf, into pem (PEM_MAX bytes). serial_hex receives the serial for the CA's name.
 */
static int make_cert(mbedtls_pk_context *subject_key, const char *subject_dn, mbedtls_pk_context *issuer_key,
                     const char *issuer_dn, const uint8_t serial[16], bool is_ca, const char *san, struct rng *r,
                     uint8_t *pem, char *err, size_t errlen) {
  mbedtls_x509write_cert crt;
  mbedtls_mpi sn;
  mbedtls_x509write_crt_init(&crt);
  mbedtls_mpi_init(&sn);
  char nb[16], na[16];
  validity(nb, na);
  const char *what = "building the certificate";
  int rc = mbedtls_mpi_read_binary(&sn, serial, 16);
  mbedtls_x509write_crt_set_version(&crt, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(&crt, MBEDTLS_MD_SHA256);
  mbedtls_x509write_crt_set_subject_key(&crt, subject_key);
  mbedtls_x509write_crt_set_issuer_key(&crt, issuer_key);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_serial(&crt, &sn);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_validity(&crt, nb, na);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_subject_name(&crt, subject_dn);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_issuer_name(&crt, issuer_dn);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_basic_constraints(&crt, is_ca ? 1 : 0, is_ca ? 0 : -1);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_key_usage(
        &crt, is_ca ? (MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN) : MBEDTLS_X509_KU_DIGITAL_SIGNATURE);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_subject_key_identifier(&crt);
  if (rc == 0)
    rc = mbedtls_x509write_crt_set_authority_key_identifier(&crt);
  if (rc == 0 && san != NULL)
    rc = set_san_dns(&crt, san);
  if (rc == 0) {
    what = "signing the certificate";
    rc = mbedtls_x509write_crt_pem(&crt, pem, PEM_MAX, mbedtls_ctr_drbg_random, &r->drbg);
  }
  mbedtls_mpi_free(&sn);
  mbedtls_x509write_crt_free(&crt);
  if (rc != 0)
    return tls_err(rc, err, errlen, what);
  return MTP_OK;
}

/* 16 random bytes, positive and non-zero as an INTEGER. */
static int random_serial(uint8_t serial[16], struct rng *r, char *err, size_t errlen) {
  int rc = mbedtls_ctr_drbg_random(&r->drbg, serial, 16);
  if (rc != 0)
    return tls_err(rc, err, errlen, "drawing a serial number");
  serial[0] &= 0x7f;
  serial[0] |= 0x40;
  return MTP_OK;
}

/* Generates a key and a certificate for cn (CN and SAN), signed by the issuer; writes
 * DIR/cn.key and DIR/cn.crt. */
static int issue_leaf(const char *dir, const char *cn, mbedtls_pk_context *issuer_key, const char *issuer_dn,
                      struct rng *r, struct created *c, char *err, size_t errlen) {
  char key_path[PATH_MAX_LEN], crt_path[PATH_MAX_LEN], dn[32 + MTP_CERTS_NAME_MAX];
  uint8_t pem[PEM_MAX], serial[16];
  mbedtls_pk_context key;
  mbedtls_pk_init(&key);
  int rc = make_path(key_path, sizeof(key_path), dir, cn, "key", err, errlen);
  if (rc == MTP_OK)
    rc = make_path(crt_path, sizeof(crt_path), dir, cn, "crt", err, errlen);
  if (rc == MTP_OK)
    rc = must_not_exist(key_path, err, errlen);
  if (rc == MTP_OK)
    rc = must_not_exist(crt_path, err, errlen);
  if (rc == MTP_OK)
    rc = gen_key(&key, r, err, errlen);
  if (rc == MTP_OK)
    rc = random_serial(serial, r, err, errlen);
  if (rc == MTP_OK) {
    snprintf(dn, sizeof(dn), "CN=%s,O=mtproxy", cn);
    rc = make_cert(&key, dn, issuer_key, issuer_dn, serial, false, cn, r, pem, err, errlen);
  }
  if (rc == MTP_OK)
    rc = write_new_file(c, crt_path, pem, strlen((char *)pem), 0644, err, errlen);
  if (rc == MTP_OK) {
    int trc = mbedtls_pk_write_key_pem(&key, pem, sizeof(pem));
    rc = trc == 0 ? MTP_OK : tls_err(trc, err, errlen, "encoding the key");
  }
  if (rc == MTP_OK)
    rc = write_new_file(c, key_path, pem, strlen((char *)pem), 0600, err, errlen);
  mbedtls_platform_zeroize(pem, sizeof(pem));
  mbedtls_pk_free(&key);
  return rc;
}

int mtp_certs_init(const char *dir, char *err, size_t errlen) {
  set_err(err, errlen, "ok");
  char ca_key_path[PATH_MAX_LEN], ca_crt_path[PATH_MAX_LEN], bk_key_path[PATH_MAX_LEN], bk_crt_path[PATH_MAX_LEN];
  int rc = make_path(ca_key_path, sizeof(ca_key_path), dir, "ca", "key", err, errlen);
  if (rc == MTP_OK)
    rc = make_path(ca_crt_path, sizeof(ca_crt_path), dir, "ca", "crt", err, errlen);
  if (rc == MTP_OK)
    rc = make_path(bk_key_path, sizeof(bk_key_path), dir, MTP_CERTS_BACK_NAME, "key", err, errlen);
  if (rc == MTP_OK)
    rc = make_path(bk_crt_path, sizeof(bk_crt_path), dir, MTP_CERTS_BACK_NAME, "crt", err, errlen);
  if (rc != MTP_OK)
    return rc;
  if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
    set_err(err, errlen, "%s: cannot create directory: %s", dir, strerror(errno));
    return MTP_EIO;
  }
  /* Refuse before generating anything if any file is there already. */
  const char *all[4] = {ca_key_path, ca_crt_path, bk_key_path, bk_crt_path};
  for (int i = 0; i < 4; i++)
    if ((rc = must_not_exist(all[i], err, errlen)) != MTP_OK)
      return rc;

  struct rng r;
  struct created c = {.n = 0};
  mbedtls_pk_context ca_key;
  mbedtls_pk_init(&ca_key);
  uint8_t pem[PEM_MAX], serial[16];
  char ca_dn[96];
  rc = rng_setup(&r, err, errlen);
  if (rc == MTP_OK)
    rc = gen_key(&ca_key, &r, err, errlen);
  if (rc == MTP_OK)
    rc = random_serial(serial, &r, err, errlen);
  if (rc == MTP_OK) {
    /* A distinct name per CA (from its serial) so operators can tell CAs apart. */
    snprintf(ca_dn, sizeof(ca_dn), "CN=mtproxy CA %02x%02x%02x%02x,O=mtproxy", serial[1], serial[2], serial[3],
             serial[4]);
    rc = make_cert(&ca_key, ca_dn, &ca_key, ca_dn, serial, true, NULL, &r, pem, err, errlen);
  }
  if (rc == MTP_OK)
    rc = write_new_file(&c, ca_crt_path, pem, strlen((char *)pem), 0644, err, errlen);
  if (rc == MTP_OK) {
    int trc = mbedtls_pk_write_key_pem(&ca_key, pem, sizeof(pem));
    rc = trc == 0 ? MTP_OK : tls_err(trc, err, errlen, "encoding the CA key");
  }
  if (rc == MTP_OK)
    rc = write_new_file(&c, ca_key_path, pem, strlen((char *)pem), 0600, err, errlen);
  if (rc == MTP_OK)
    rc = issue_leaf(dir, MTP_CERTS_BACK_NAME, &ca_key, ca_dn, &r, &c, err, errlen);
  if (rc != MTP_OK)
    undo_created(&c);
  else
    set_err(err, errlen, "ok");
  mbedtls_platform_zeroize(pem, sizeof(pem));
  mbedtls_pk_free(&ca_key);
  rng_free(&r);
  return rc;
}

static bool name_ok(const char *name) {
  size_t n = strlen(name);
  if (n == 0 || n > MTP_CERTS_NAME_MAX || name[0] == '.')
    return false;
  if (strcmp(name, "ca") == 0 || strcmp(name, MTP_CERTS_BACK_NAME) == 0)
    return false;
  for (size_t i = 0; i < n; i++) {
    char ch = name[i];
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '-';
    if (!ok)
      return false;
  }
  return true;
}

int mtp_certs_issue(const char *dir, const char *name, char *err, size_t errlen) {
  set_err(err, errlen, "ok");
  if (name == NULL || !name_ok(name)) {
    set_err(err, errlen, "bad front name \"%s\": use 1..%d of [A-Za-z0-9._-], not \"ca\" or \"%s\"",
            name != NULL ? name : "", MTP_CERTS_NAME_MAX, MTP_CERTS_BACK_NAME);
    return MTP_EINVAL;
  }
  char ca_key_path[PATH_MAX_LEN], ca_crt_path[PATH_MAX_LEN], ca_dn[256];
  int rc = make_path(ca_key_path, sizeof(ca_key_path), dir, "ca", "key", err, errlen);
  if (rc == MTP_OK)
    rc = make_path(ca_crt_path, sizeof(ca_crt_path), dir, "ca", "crt", err, errlen);
  if (rc != MTP_OK)
    return rc;

  struct rng r;
  struct created c = {.n = 0};
  mbedtls_pk_context ca_key;
  mbedtls_x509_crt ca;
  mbedtls_pk_init(&ca_key);
  mbedtls_x509_crt_init(&ca);
  rc = rng_setup(&r, err, errlen);
  if (rc == MTP_OK) {
    int trc = mbedtls_x509_crt_parse_file(&ca, ca_crt_path);
    if (trc != 0)
      rc = tls_err(trc, err, errlen, ca_crt_path);
  }
  if (rc == MTP_OK) {
    int trc = mbedtls_pk_parse_keyfile(&ca_key, ca_key_path, NULL);
    if (trc != 0)
      rc = tls_err(trc, err, errlen, ca_key_path);
  }
  if (rc == MTP_OK && mbedtls_pk_check_pair(&ca.pk, &ca_key) != 0) {
    set_err(err, errlen, "%s does not match %s", ca_key_path, ca_crt_path);
    rc = MTP_EINVAL;
  }
  if (rc == MTP_OK && mbedtls_x509_dn_gets(ca_dn, sizeof(ca_dn), &ca.subject) < 0) {
    set_err(err, errlen, "%s: subject name too long", ca_crt_path);
    rc = MTP_EINVAL;
  }
  if (rc == MTP_OK)
    rc = issue_leaf(dir, name, &ca_key, ca_dn, &r, &c, err, errlen);
  if (rc != MTP_OK)
    undo_created(&c);
  else
    set_err(err, errlen, "ok");
  mbedtls_x509_crt_free(&ca);
  mbedtls_pk_free(&ca_key);
  rng_free(&r);
  return rc;
}
