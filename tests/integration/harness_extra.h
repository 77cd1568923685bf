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

#include "harness.h"

/* Monotonic clock in milliseconds. */
int64_t hx_now_ms(void);

/* Connects a blocking TCP socket to 127.0.0.1:port within timeout_ms. Returns the fd or -1. */
int hx_connect(uint16_t port, int timeout_ms);
/* Writes all len bytes (blocking). Returns 0 or -1. */
int hx_write_all(int fd, const void *data, size_t len);

/*
 * Reads from fd (discarding the data) until the peer closes (EOF or reset) or timeout_ms
 * passes. *bytes gets how many bytes arrived. Returns 0 when the peer closed, -1 on timeout.
 */
int hx_wait_eof(int fd, int timeout_ms, size_t *bytes);

/*
 * Runs argv to completion with stdout+stderr captured: *out (mtp_malloc'ed, NUL-terminated,
 * transfers) and *exit_code (0..255, or 128+signal). Kills it (SIGKILL) after timeout_ms.
 * Returns 0, or -1 on a spawn failure or timeout.
 */
int hx_run(char *const argv[], int timeout_ms, char **out, int *exit_code);

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
