/*
 * tgconf.h - loading Telegram's proxy secret and middle-proxy list: from a URL (libcurl) or a
 * file, validating, building a snapshot, and the on-disk cache. These functions block (network
 * and file I/O): the back calls them on the threadpool, never on a loop (except the cache read
 * once at startup, before the loops run). Also a few hooks on struct mtp_back for tests.
 */
#ifndef MTP_BACK_TGCONF_H
#define MTP_BACK_TGCONF_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "back.h"

/* Largest secret or config accepted from a source. */
#define MTP_TGCONF_MAX_SIZE (1u << 20)
/* A proxy secret shorter than this is refused (Telegram's is 128 bytes). */
#define MTP_TGCONF_MIN_SECRET 16
/* Cache file names inside cfg->cache_dir. */
#define MTP_TGCONF_CACHE_SECRET "proxy-secret"
#define MTP_TGCONF_CACHE_CONFIG "proxy-multi.conf"

/* True when src starts with http:// or https:// (case-insensitive). */
bool mtp_tgconf_is_url(const char *src);

/*
 * Reads src (a URL: GET with timeouts, redirects followed, HTTP >= 400 is an error; or a file
 * path) into *out (mtp_malloc'ed, transfers; one spare NUL byte after *len). Fails on an
 * empty answer or one over MTP_TGCONF_MAX_SIZE. cancel (borrowed, may be NULL) aborts a
 * download when it becomes true. Returns MTP_OK or MTP_EIO/MTP_ETOOBIG/MTP_ENOMEM with a
 * reason in err. Blocking.
 */
int mtp_tgconf_read_source(const char *src, uint8_t **out, size_t *len, const atomic_bool *cancel, char *err,
                           size_t errlen);

/* MTP_OK when secret looks like a proxy secret (>= MTP_TGCONF_MIN_SECRET bytes), else
 * MTP_EPROTO with a reason in err. */
int mtp_tgconf_check_secret(size_t secret_len, char *err, size_t errlen);

/*
 * Builds a snapshot (one reference, for the caller) from a raw secret and config text (both
 * borrowed, copied). Returns MTP_OK, MTP_EPROTO (bad secret or config; reason in err) or
 * MTP_ENOMEM.
 */
int mtp_tgconf_build(const uint8_t *secret, size_t secret_len, const uint8_t *conf, size_t conf_len,
                     struct mtp_tg_snapshot **out, char *err, size_t errlen);

/* Writes data to dir/name atomically (dir/name.tmp.PID, then rename), mode 0644; creates dir
 * (0755) when missing. Returns MTP_OK or MTP_EIO with a reason in err. Blocking. */
int mtp_tgconf_cache_write(const char *dir, const char *name, const uint8_t *data, size_t len, char *err,
                           size_t errlen);
/* Reads dir/name like mtp_tgconf_read_source reads a file. Blocking. */
int mtp_tgconf_cache_read(const char *dir, const char *name, uint8_t **out, size_t *len, char *err,
                          size_t errlen);

/* The cache file's modification time (unix seconds) in *mtime. MTP_OK or MTP_EIO. Blocking. */
int mtp_tgconf_cache_mtime(const char *dir, const char *name, int64_t *mtime);

/* Writes src into out (always NUL-terminated, truncated to outlen) for status pages and logs:
 * a URL loses its user:password@ part and its query and fragment (they may hold credentials);
 * a path is copied as is. */
void mtp_tgconf_redact_source(const char *src, char *out, size_t outlen);

/* ---- test hooks (main loop thread) ---- */

/* Starts a fetch now, unless one is running (then nothing happens). */
void mtp_back_refresh_now(struct mtp_back *b);
/* How many fetches have completed (successfully or not) since setup. */
unsigned mtp_back_fetches_done(const struct mtp_back *b);

#endif
