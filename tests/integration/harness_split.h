/*
 * harness_split.h - the split-mode scene of an integration test: certificates made by the real
 * `mtproxy-back certs init/issue`, the fake middle proxy in-process, one mtproxy-back in front
 * of it and any number of mtproxy-front processes dialing the back. One scene per test process,
 * in the global hs. Binaries come from MTPROXY_BACK_BIN and MTPROXY_FRONT_BIN (set by CTest).
 *
 *   hs_setup();                          fake, temp dir, certs (CA, back, front1..front3)
 *   check_on_fail = hs_cleanup;          a failed CHECK dumps the logs and stops everything
 *   hs_back_start(&hs.back, "127.0.0.1:0", "1", NULL);   waits for "tunnel listening on"
 *   hs_front_start(&hs.fronts[0], "front1", hs.back.port, "1", NULL);   waits for listener l0
 *   hs_echo_within(hs.fronts[0].port, ..., 30000);        polls until an echo goes through
 *   hs_finish();                         every process exits 0 on SIGTERM, temp files removed
 *
 * Every wait is bounded. Every process is stopped by its PID.
 */
#ifndef MTP_HARNESS_SPLIT_H
#define MTP_HARNESS_SPLIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fake_middle.h"
#include "harness.h"
#include "obf2.h"

#define HS_MAX_FRONTS 4

/* One spawned mtproxy-back or mtproxy-front. */
struct hs_node {
  struct h_proc proc;
  uint16_t port;  /* back: the tunnel port; front: listener l0 */
  uint16_t admin; /* the admin endpoint (0 when none) */
};

struct hs_scene {
  struct fake_middle *fm; /* owns */
  char dir[256];          /* temp dir: proxy-secret, proxy-config, config files */
  char certs[300];        /* dir/certs: ca.*, back.*, front1.*, front2.*, front3.* */
  char other[300];        /* dir/other: a second, unrelated CA with a front "front1" */
  char mixed[300];        /* dir/mixed: the real ca.crt with other's front1.crt/.key (an impostor
                           * who knows the public CA certificate) */
  char sp[300], cp[300];  /* the Telegram config files for the back */
  uint8_t secret[16];     /* the fronts' client secret */
  char secret_hex[33];
  struct hs_node back;
  struct hs_node back2; /* a second back, e.g. one with another CA's certificate */
  struct hs_node fronts[HS_MAX_FRONTS];
};

extern struct hs_scene hs;

const char *hs_back_bin(void);
const char *hs_front_bin(void);

/* Runs `mtproxy-back certs ARGS...` (args NULL-terminated, without "certs") to completion.
 * Returns the exit code (-1 on a spawn failure or timeout); *out gets its output (transfers,
 * may be NULL). */
int hs_certs(char *const args[], char **out);

/* Starts the fake and writes the certificates; on any error prints it, cleans up and exits 1.
 * Needs MTPROXY_BACK_BIN and MTPROXY_FRONT_BIN. */
void hs_setup(void);
/* Dumps the log of every running process, stops them all (by PID), frees the fake, removes
 * the temp dir. Idempotent. */
void hs_cleanup(void);
/* Stops every running process (each must exit 0 on SIGTERM), checks that the fake has no RPC
 * connection left, frees everything. Returns 0, or -1 (after hs_cleanup) when not. */
int hs_finish(void);

/*
 * Starts mtproxy-back with the scene's certificates and Telegram files, --tunnel-listen
 * `listen`, --workers `workers`, --admin 127.0.0.1:0 and the extra args (NULL-terminated; may
 * be NULL). prefix (NULL-terminated; may be NULL) is put before the binary, e.g. an
 * `ip netns exec NS` wrapper. Waits for "tunnel listening on" and the admin line.
 * certdir NULL = hs.certs. Returns 0 or -1 (the process is then left for hs_cleanup).
 */
int hs_back_start_ex(struct hs_node *n, char *const prefix[], const char *certdir, const char *listen,
                     const char *workers, char *const extra[]);
int hs_back_start(struct hs_node *n, const char *listen, const char *workers, char *const extra[]);

/*
 * Starts mtproxy-front with certificate certdir/NAME.{crt,key} and CA certdir/ca.crt (certdir
 * NULL = hs.certs), --back HOST:PORT (`back`), --listen `listen` (NULL = 127.0.0.1:0), the
 * scene's secret, --workers, --admin 127.0.0.1:0 (unless prefix is given) and extra args.
 * Waits for its listener l0 (and the admin line). Returns 0 or -1.
 */
int hs_front_start_ex(struct hs_node *n, char *const prefix[], const char *certdir, const char *name,
                      const char *back, const char *listen, const char *workers, char *const extra[]);
int hs_front_start(struct hs_node *n, const char *name, uint16_t back_port, const char *workers, char *const extra[]);

/* Stops one node (SIGTERM, bounded wait). Returns its exit code as h_stop. */
int hs_node_stop(struct hs_node *n);

/*
 * One echo through the front at host:port: connect with the scene's secret, send a
 * `len`-byte packet (encrypted-looking), receive it back unchanged within timeout_ms.
 * Returns MTP_OK or the first error (MTP_ECLOSED when the front closed the client).
 */
int hs_echo(const char *host, uint16_t port, enum mtp_proto proto, int16_t dc, size_t len, int timeout_ms);
/* Tries hs_echo on 127.0.0.1 every 50 ms until one succeeds or timeout_ms passes. Returns
 * the milliseconds it took, or -1. */
int64_t hs_echo_within(uint16_t port, enum mtp_proto proto, int timeout_ms);

/* One metric of a node's admin endpoint (see h_metric), or -1. */
double hs_metric(const struct hs_node *n, const char *series);
/* Re-scrapes every 20 ms until the series is >= want or timeout_ms passes. */
bool hs_wait_metric_ge(const struct hs_node *n, const char *series, double want, int timeout_ms, double *last);

/*
 * A TLS 1.2 client (mbedTLS, blocking) toward 127.0.0.1:port that trusts ca_path and checks the
 * name "back"; with crt_path/key_path (may be NULL) it presents that certificate. Returns 1 when
 * the handshake completed, 0 when the peer refused it (alert or close), -1 on a local error or
 * timeout (timeout_ms bounds every read). *detail gets mbedTLS's error text.
 */
int hs_tls_probe(uint16_t port, const char *ca_path, const char *crt_path, const char *key_path, int timeout_ms,
                 char *detail, size_t detail_len);

/* Recursively removes a directory of plain files and sub-directories (two levels). */
void hs_rmtree(const char *dir);

#endif
