/*
 * certs.h - the private CA of split mode: `mtproxy-back certs init DIR` and
 * `mtproxy-back certs issue DIR NAME` as library functions (the binary wiring comes later).
 *
 * Files (PEM; EC keys on secp256r1; certificates valid 10 years from an hour ago, random
 * 128-bit serials, signed with ECDSA-SHA256):
 *   DIR/ca.crt, DIR/ca.key       the private CA (basicConstraints CA:true, pathlen 0)
 *   DIR/back.crt, DIR/back.key   the back's identity: CN=back and subjectAltName DNS:back
 *   DIR/NAME.crt, DIR/NAME.key   a front's identity: CN=NAME and subjectAltName DNS:NAME
 * Keys are written with mode 0600, certificates 0644. Every file is created with O_EXCL: an
 * existing file is never overwritten (the error names it), and a failed call removes the files
 * it created.
 *
 * How the two sides check each other (both with MBEDTLS_SSL_VERIFY_REQUIRED, TLS 1.2 only,
 * ca_chain = ca.crt):
 *   - the front calls mbedtls_ssl_set_hostname(ssl, MTP_CERTS_BACK_NAME) so mbedTLS requires
 *     the back's certificate to chain to the CA *and* to carry the name "back" (SAN dNSName, or
 *     CN when there is no SAN). A front certificate, also signed by the CA, therefore cannot
 *     impersonate the back.
 *   - the back requires a client certificate chaining to the CA; the front's name is its CN
 *     (used for logs and metrics; Hello.node should match it).
 * Revoking a front means re-running init (a new CA) and re-issuing: there is no CRL yet.
 *
 * These functions do blocking file I/O and key generation: startup / CLI only, never on a loop.
 */
#ifndef MTP_CERTS_H
#define MTP_CERTS_H

#include <stddef.h>

/* The name a back's certificate carries and a front checks. */
#define MTP_CERTS_BACK_NAME "back"
/* Longest NAME accepted by mtp_certs_issue. */
#define MTP_CERTS_NAME_MAX 64

/*
 * Creates DIR if it does not exist (mode 0700), then a new CA and the back's key and
 * certificate in it. Refuses (nothing written) if any of the four files already exists.
 * Returns MTP_OK, or MTP_EIO / MTP_EINVAL / MTP_ENOMEM with a one-line reason that names the
 * file in err (borrows, errlen bytes, always NUL-terminated when errlen > 0).
 */
int mtp_certs_init(const char *dir, char *err, size_t errlen);

/*
 * Issues a front's key and certificate DIR/NAME.{key,crt}, signed by DIR/ca.{crt,key}. NAME is
 * 1..MTP_CERTS_NAME_MAX characters of [A-Za-z0-9._-], not starting with '.', and neither "ca"
 * nor "back". Returns MTP_OK, MTP_EINVAL (bad name, or the CA files do not load or do not
 * match), MTP_EIO (a file exists or cannot be written), MTP_ENOMEM; err as for mtp_certs_init.
 */
int mtp_certs_issue(const char *dir, const char *name, char *err, size_t errlen);

#endif
