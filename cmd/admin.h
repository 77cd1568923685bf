/*
 * admin.h - the admin endpoint: a small HTTP/1.1 server on the main loop, off unless an
 * address is configured (--admin / "admin"). Keep it on loopback: it has no authentication.
 *
 *   GET    /metrics               Prometheus text (mtp_metrics_format + the hooks' lines)
 *   GET    /status                JSON: process, log, and what the hooks add (listeners, ...)
 *   GET    /links                 JSON array of every proxy link (cmd/links.h)
 *   GET    /tables                JSON {"table": ["value", ...], ...}
 *   GET    /tables/NAME           JSON {"NAME": ["value", ...]}
 *   POST   /tables/NAME/VALUE     add VALUE to table NAME (VALUE may contain '/', %-escapes)
 *   DELETE /tables/NAME/VALUE     remove it
 *   POST   /reload                re-read the configuration (501 while no reload hook is set)
 *   GET    /log                   JSON {"level", "debug"}
 *   POST   /log?debug=a,b&level=L switch per-module debug (and/or the level) at runtime
 *
 * One request per connection (answers carry Content-Length and "Connection: close"). Limits:
 * request head MTP_ADMIN_MAX_HEAD bytes (431), body MTP_ADMIN_MAX_BODY (413), chunked bodies
 * refused (411), MTP_ADMIN_MAX_CONNS connections waiting for their answer at once (more are
 * closed at accept; answered ones waiting for the peer's close do not count, up to 64 of
 * them), and MTP_ADMIN_TIMEOUT_MS from accept until the connection is closed. Unknown path 404, known path
 * with another method 405 (with Allow), malformed request 400. Errors are JSON {"error": "..."}.
 *
 * Everything runs on the loop given to mtp_admin_setup (the main thread); the hooks are called
 * there, synchronously, and must not block for long.
 */
#ifndef MTP_CMD_ADMIN_H
#define MTP_CMD_ADMIN_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <uv.h>

#define MTP_ADMIN_MAX_HEAD 8192
#define MTP_ADMIN_MAX_BODY 4096
#define MTP_ADMIN_MAX_CONNS 16
#define MTP_ADMIN_TIMEOUT_MS 10000

struct mtp_admin;

/*
 * What the executable plugs in, so admin.c depends on neither front/ nor back/. Every member
 * may be NULL. Several sets may be added (mtp_admin_add_hooks): status and metrics are asked
 * of every set in order; for the others the first set that has the member answers.
 */
struct mtp_admin_hooks {
  void *ctx; /* borrows: passed to every hook of this set */
  /* Adds members to the /status object (owned by the caller; add with cJSON_Add*). */
  void (*status)(void *ctx, cJSON *status);
  /* Returns extra Prometheus lines (HELP/TYPE included) in a mtp_malloc'ed string (transfers),
   * or NULL. */
  char *(*metrics)(void *ctx);
  /* The /links array (transfers), or NULL on ENOMEM. */
  cJSON *(*links)(void *ctx);
  /* Policy tables (front/policy.h semantics): JSON text of all tables (table NULL) or of one,
   * mtp_malloc'ed into *out; MTP_OK, MTP_ENOTFOUND, MTP_ENOMEM. */
  int (*tables_json)(void *ctx, const char *table, char **out);
  /* MTP_OK, MTP_ENOTFOUND (no such table / entry), MTP_EEXIST, MTP_EINVAL (bad value), MTP_EIO. */
  int (*table_add)(void *ctx, const char *table, const char *value);
  int (*table_del)(void *ctx, const char *table, const char *value);
  /* Reloads the configuration. MTP_OK, or an error with a one-line reason in err. */
  int (*reload)(void *ctx, char *err, size_t errlen);
};

/*
 * Listens on addr ("ADDR:PORT"; port 0 = any free port) on loop and logs
 * "admin listening on ADDR:PORT". Returns MTP_OK with *out, or MTP_EINVAL (bad address) /
 * a libuv error (logged). On error *out is NULL and nothing is left on the loop.
 */
int mtp_admin_setup(struct mtp_admin **out, uv_loop_t *loop, const char *addr);

/* Adds a set of hooks (copied). NULL admin: does nothing. Returns MTP_OK or MTP_ENOMEM
 * (at most 4 sets). */
int mtp_admin_add_hooks(struct mtp_admin *a, const struct mtp_admin_hooks *hooks);

/* The concrete listening address (after port 0 was resolved). */
void mtp_admin_address(const struct mtp_admin *a, char *out, size_t outlen);

/* Stops listening and closes every connection (asynchronously; the loop then finishes).
 * NULL-safe, idempotent. The object is freed by the last close callback: do not use it after. */
void mtp_admin_close(struct mtp_admin *a);

#endif
