/*
 * harness_env.h - the standard scene of an integration test: the fake middle proxy in-process
 * and one mtproxy on 127.0.0.1 (listener "l0", a fixed client secret, the admin endpoint), plus
 * the helpers most tests want around it. One scene per test process, in the global h_env.
 *
 *   he_start("1");                       fake + proxy with --workers 1 (exits 1 on a setup error)
 *   check_on_fail = he_cleanup;          so a failed CHECK stops the proxy and removes temp files
 *   ... he_metric / he_wait_metric / he_find_client ...
 *   he_finish();                         proxy exits 0 on SIGTERM, fake sees every RPC conn close
 *   return check_report();
 */
#ifndef MTP_HARNESS_ENV_H
#define MTP_HARNESS_ENV_H

#include <stdbool.h>
#include <stdint.h>

#include "fake_middle.h"
#include "harness.h"

struct h_env {
  struct h_proc proc;
  struct fake_middle *fm; /* owns */
  char dir[256];          /* temp dir with the proxy-secret / proxy-config files */
  uint8_t secret[16];     /* the client secret of listener l0 */
  uint16_t port, admin;   /* listener l0 and the admin endpoint */
};

extern struct h_env h_env;

/* Starts the fake and mtproxy with --workers `workers`; on any error prints it, cleans up and exits 1. */
void he_start(const char *workers);
/* The same with more mtproxy flags after the standard ones (NULL-terminated; NULL = none),
 * e.g. {"--tls-domain", "example.com", NULL}; a flag given twice takes the later value. */
void he_start_args(const char *workers, const char *const *extra);
/* The first half of he_start, for a test that starts mtproxy itself (into h_env.proc): the fake
 * (h_env.fm), the temp dir (h_env.dir) and the Telegram files for the fake, whose paths go to
 * sp and cp (>= 256 bytes each). On any error prints it, cleans up and exits 1. */
void he_start_fake(char *sp, char *cp);
/* Dumps the proxy's log, stops it, frees the fake, removes temp files. Idempotent. */
void he_cleanup(void);
/* Stops the proxy (must exit 0), waits until the fake has no RPC connection open, frees all.
 * Returns 0, or -1 (after cleaning up) when either did not happen. */
int he_finish(void);

/* One /metrics scrape: the value of series, or -1 when absent or on an error. */
double he_metric(const char *series);
/* Re-scrapes every 10 ms until series == want or timeout_ms passes (gauges move on worker
 * threads a moment after the client-visible event). *last gets the last value seen. */
bool he_wait_metric(const char *series, double want, int timeout_ms, double *last);

/* The fake's newest record of the client on the connected socket fd (by its local port;
 * hx_local_port in harness_extra.h). */
bool he_find_client(int fd, struct fm_conn_info *out);

#endif
