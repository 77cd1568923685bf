/*
 * harness_extra.h - more helpers for integration tests (raw sockets, timing, one-shot runs of
 * a binary, exit waits with a chosen signal, /proc sampling, metric scrapes and a tiny HTTP
 * server). Every wait is bounded. Not thread-safe except where noted.
 */
#ifndef MTP_HARNESS_EXTRA_H
#define MTP_HARNESS_EXTRA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fake_middle.h"
#include "harness.h"
#include "tclient.h"

/* Monotonic clock in milliseconds. */
int64_t hx_now_ms(void);

/* Connects a blocking TCP socket to 127.0.0.1:port within timeout_ms. Returns the fd or -1. */
int hx_connect(uint16_t port, int timeout_ms);
/* Writes all len bytes (blocking). Returns 0 or -1. */
int hx_write_all(int fd, const void *data, size_t len);

/* The local port of a connected socket (0 on error). */
uint16_t hx_local_port(int fd);

/*
 * Reads from fd (discarding the data) until the peer closes (EOF or reset) or timeout_ms
 * passes. *bytes gets how many bytes arrived. Returns 0 when the peer closed, -1 on timeout.
 */
int hx_wait_eof(int fd, int timeout_ms, size_t *bytes);
/* The same, keeping the first cap bytes in buf: *len gets how many it kept. */
int hx_read_until_eof(int fd, int timeout_ms, uint8_t *buf, size_t cap, size_t *len);

/*
 * Sends one HTTP request (len bytes of req; in pieces of `piece` bytes when > 0) to
 * 127.0.0.1:port and reads until the server closes or timeout_ms passes. Returns the status,
 * -1 (no connection, or the answer is not HTTP/1.1) or -2 (closed without an answer); *resp
 * gets what arrived (mtp_malloc'ed, NUL-terminated, at most 64 KiB; transfers; NULL when no
 * connection).
 */
int hx_http_raw(uint16_t port, const char *req, size_t len, size_t piece, int timeout_ms, char **resp);

/* ---- clients through the proxy (tclient.h) and the fake middle proxy's view of them ---- */

/*
 * One echo through c: sends len (<= 65536) encrypted-looking bytes without quick ack and waits
 * up to timeout_ms for them to come back unchanged. *elapsed_ms gets the round trip. Returns
 * MTP_OK, the receive error, or MTP_EPROTO when something else came back.
 */
int hx_echo(struct tclient *c, size_t len, int timeout_ms, int64_t *elapsed_ms);

/*
 * A client's first packet: sends 72 unencrypted bytes with a quick-ack request through c and
 * waits (up to timeout_ms for each message) for the quick ack, carrying the fake's token for
 * the packet, and then the echo. Returns MTP_OK, the receive error, or MTP_EPROTO (a wrong or
 * second ack, a wrong echo, an echo before the ack) with a reason in why.
 */
int hx_first_echo(struct tclient *c, int timeout_ms, char *why, size_t whylen);

/*
 * Checks the fake's record of a client after hx_first_echo through a listener on
 * 127.0.0.1:proxy_port: ad_tag `tag` (flag HAS_AD_TAG), flags QUICKACK and NOT_ENCRYPTED,
 * ABRIDGED or INTERMEDIATE as proto, client and proxy addresses the IPv4-mapped loopback,
 * exactly one packet. Returns NULL, or what differs (a static string).
 */
const char *hx_check_first_rpc(const struct fm_conn_info *ci, enum mtp_proto proto, const uint8_t tag[16],
                               uint16_t proxy_port);

/*
 * Runs argv to completion with stdout+stderr captured: *out (mtp_malloc'ed, NUL-terminated,
 * transfers) and *exit_code (0..255, or 128+signal). Kills it (SIGKILL) after timeout_ms.
 * Returns 0, or -1 on a spawn failure or timeout.
 */
int hx_run(char *const argv[], int timeout_ms, char **out, int *exit_code);
/* hx_run of `bin [sub] args...`: sub may be NULL, args is NULL-terminated (at most 60). */
int hx_run_cmd(const char *bin, const char *sub, char *const args[], int timeout_ms, char **out, int *exit_code);

/*
 * Sends sig to a process started with h_spawn and waits up to timeout_ms for it to exit on
 * its own (no other signal is sent). Returns the exit code (0..255), 128+signal, or -1 on
 * timeout (the process is then still running; h_stop cleans up). On success p->pid becomes
 * -1 and p->exit_status is set, so a later h_stop only frees the reader.
 */
int hx_signal_wait(struct h_proc *p, int sig, int timeout_ms);

/* VmRSS of pid in KiB from /proc/PID/status, or -1. */
long hx_vmrss_kb(pid_t pid);

/* Scrapes http://127.0.0.1:admin/metrics and reads one series (see h_metric). Returns 0 or -1. */
int hx_scrape(uint16_t admin, const char *series, double *value);

/*
 * A tiny HTTP/1.0 server on 127.0.0.1 (OS-chosen port) in its own thread: GET of a registered
 * path answers 200 with its body, anything else 404; with fail_all set, every request gets
 * 500. Each connection is answered and closed. hx_http_* may be called from any thread.
 */
struct hx_http;
/* Starts the server. Returns the port (> 0) and *out, or -1. */
int hx_http_start(struct hx_http **out);
/* Registers (or replaces) path -> body (copied). Returns 0 or -1. */
int hx_http_set(struct hx_http *h, const char *path, const void *body, size_t len);
/* Turns "500 for everything" on or off. */
void hx_http_fail_all(struct hx_http *h, bool on);
/* Requests answered so far, and those answered with 200. */
unsigned hx_http_requests(struct hx_http *h, unsigned *ok);
/* Stops the thread and frees everything. NULL-safe. */
void hx_http_free(struct hx_http *h);

#endif
