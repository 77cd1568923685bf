/*
 * links.h - the proxy links an operator hands out: tg://proxy?server=HOST&port=PORT&secret=S
 * and the same query on https://t.me/proxy, for every listener, every secret and every form
 * the listener accepts, plus a QR code of them in the terminal (libqrencode).
 *
 * Secret forms (docs/PROTOCOLS.md "Secrets and links"):
 *   classic    HEX32                              listener allows abridged or intermediate
 *   secure     "dd" HEX32                         listener allows secure
 *   fake-TLS   "ee" HEX32 hex(domain)             listener allows fake_tls and has domains;
 *              base64url(0xee || secret || domain) is the same bytes, shorter (no padding)
 * With per_sni_secrets the fake-TLS secret of a domain is the derived one
 * (mtp_faketls_derive_secret), not the listener's.
 *
 * Everything here runs on the main thread at start or for an admin request; nothing is on the
 * data path. The formatting functions are pure (unit-tested in tests/unit/test_links.c).
 */
#ifndef MTP_CMD_LINKS_H
#define MTP_CMD_LINKS_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#include "config.h"

enum mtp_links_kind {
  MTP_LINKS_CLASSIC = 0, /* HEX32 */
  MTP_LINKS_SECURE,      /* dd + HEX32 */
  MTP_LINKS_FAKE_TLS,    /* ee + HEX32 + hex(domain) */
};

/* Room for the longest secret and link (a 255-byte domain, an IPv6 host). */
#define MTP_LINKS_SECRET_MAX 560
#define MTP_LINKS_URL_MAX 1024
#define MTP_LINKS_HOST_MAX 256

/* "classic", "secure" or "fake_tls". */
const char *mtp_links_kind_name(enum mtp_links_kind kind);

/*
 * The secret as it goes into a link, in hex: HEX32, "dd" HEX32 or "ee" HEX32 hex(domain)
 * (domain used only for MTP_LINKS_FAKE_TLS, 1..255 bytes). Returns the length written
 * (NUL-terminated), or MTP_EINVAL (no domain for fake-TLS, out too small).
 */
int mtp_links_secret_hex(enum mtp_links_kind kind, const uint8_t secret[16], const char *domain, char *out,
                         size_t outlen);
/* The fake-TLS secret in base64url without padding: the bytes 0xee || secret || domain.
 * Returns the length written or MTP_EINVAL. */
int mtp_links_secret_b64(const uint8_t secret[16], const char *domain, char *out, size_t outlen);
/* Base64url (RFC 4648 section 5) of in[0..n) without '=' padding. Returns the length written
 * or MTP_EINVAL when out (needs 4*ceil(n/3)+1 at most) is too small. */
int mtp_links_base64url(const uint8_t *in, size_t n, char *out, size_t outlen);

/*
 * tg://proxy?server=HOST&port=PORT&secret=SECRET (tme false) or the https://t.me/proxy form.
 * An IPv6 literal host is written in brackets. Returns the length or MTP_EINVAL (too long).
 */
int mtp_links_url(bool tme, const char *host, int port, const char *secret, char *out, size_t outlen);

/* One link of one listener and secret. */
struct mtp_links_entry {
  const char *listener;   /* borrows: the listener's name (cfg) */
  size_t secret_index;    /* which of the listener's secrets */
  enum mtp_links_kind kind;
  const char *domain;     /* borrows (cfg): fake-TLS domain, else NULL */
  char host[MTP_LINKS_HOST_MAX];
  int port;
  char secret[MTP_LINKS_SECRET_MAX];     /* hex form */
  char secret_b64[MTP_LINKS_SECRET_MAX]; /* fake-TLS only: base64url form, else "" */
  char tg[MTP_LINKS_URL_MAX];            /* tg:// with the hex secret */
  char tme[MTP_LINKS_URL_MAX];           /* https://t.me/proxy with the hex secret */
  char tme_b64[MTP_LINKS_URL_MAX];       /* fake-TLS only: t.me with the base64url secret */
};

struct mtp_links {
  struct mtp_links_entry *v; /* owns */
  size_t n;
};

/*
 * Builds every link of cfg: for each listener (bound[i] gives its concrete address and port;
 * NULL = the configured addresses), each secret, each allowed form, each fake-TLS domain.
 * The host is cfg->public_host, else the NAT public address, else a specific listen address,
 * else the first non-loopback IPv4 address of this machine, else "YOUR_SERVER_IP".
 * Returns MTP_OK or MTP_ENOMEM (out is then empty). out borrows cfg (names, domains).
 */
int mtp_links_build(const struct mtp_config *cfg, const struct sockaddr_storage *bound, struct mtp_links *out);
/* NULL-safe, idempotent. */
void mtp_links_free(struct mtp_links *l);

/* The host links use for a listener bound at bound (see mtp_links_build). */
void mtp_links_guess_host(const struct mtp_config *cfg, const struct sockaddr_storage *bound, char *out,
                          size_t outlen);

/* Logs every link at info: "link l0 secure: tg://...". */
void mtp_links_log(const struct mtp_links *l);
/* [{"listener","secret_index","kind","domain","host","port","secret","secret_base64url",
 *   "tg","tme","tme_base64url"}...] (no base64 fields for the other kinds). NULL on ENOMEM. */
cJSON *mtp_links_json(const struct mtp_links *l);

/*
 * Renders text as a QR code (error correction M, 2-module quiet zone) with Unicode half blocks,
 * two module rows per line. ansi: black-on-white colour codes around every line, so it scans
 * on dark and light terminals alike; without, dark modules are drawn as blocks (for light
 * backgrounds and files). *out is mtp_malloc'ed, NUL-terminated (transfers); *width gets the
 * symbol's width in modules without the quiet zone (may be NULL).
 * Returns MTP_OK, MTP_EINVAL (text too long for a QR code) or MTP_ENOMEM.
 */
int mtp_links_qr_render(const char *text, bool ansi, char **out, int *width);

/* Prints, for each listener and secret, a title line and the QR code of its preferred link
 * (fake-TLS with the first domain, else secure, else classic; the t.me form) to out. */
void mtp_links_print_qr(FILE *out, const struct mtp_links *l, bool ansi);

/*
 * `mtproxy link --domain D [--qr] [config flags...]`: prints, for every listener that allows
 * fake_tls, the fake-TLS link of domain D (its derived secret when per_sni_secrets is on).
 * argv[0] is "link". Returns the exit code: 0, 1 (nothing to print), 2 (usage/config error).
 */
int mtp_links_main(int argc, char **argv);

#endif
