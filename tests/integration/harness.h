/*
 * harness.h - helpers for integration tests that run the real mtproxy binary.
 *
 * h_spawn starts a binary with its stderr (and stdout) on a pipe; a reader thread appends
 * everything to an in-memory log and to a temp file (path in h_proc.log_path, kept for
 * post-mortems) and wakes waiters, so h_wait_log blocks on a condition variable instead of
 * polling. Every wait is bounded. h_stop sends SIGTERM to the PID and waits (bounded),
 * then SIGKILL as a last resort.
 *
 * The mtproxy binary comes from the environment: MTPROXY_BIN (set by CTest).
 * Not thread-safe per h_proc except where noted (the reader thread is internal).
 */
#ifndef MTP_HARNESS_H
#define MTP_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct h_proc {
  pid_t pid;            /* -1 when not running */
  char log_path[256];   /* temp file with everything the process wrote */
  int exit_status;      /* waitpid status after h_stop; -1 before */
  /* private */
  void *_impl;          /* owns */
};

/* The value of MTPROXY_BIN, or NULL (the test should then fail loudly). */
const char *h_mtproxy_bin(void);

/* Creates a private temp directory (mkdtemp under $TMPDIR or /tmp) into dir (>= 64 bytes).
 * Returns 0 or -1. */
int h_tmpdir(char *dir, size_t len);
/* Writes len bytes to path. Returns 0 or -1. */
int h_write_file(const char *path, const void *data, size_t len);
/* Removes dir and the regular files in it (not recursive beyond one level). */
void h_rmdir(const char *dir);

/*
 * Writes dir/proxy-secret (the bytes) and dir/proxy-config (every DC +-1..5 -> 127.0.0.1:port,
 * default 2) for a fake middle proxy, and gives their paths (each >= 256 bytes).
 */
int h_write_middle_files(const char *dir, const uint8_t *secret, size_t len, uint16_t port, char *secret_path,
                         char *config_path);

/* Starts argv[0] with argv (NULL-terminated). Returns 0 or -1. */
int h_spawn(struct h_proc *p, char *const argv[]);

/*
 * Waits until the process's output contains needle (searching from the start), then copies
 * the rest of that line into rest (may be NULL). Returns 0, or -1 on timeout or when the
 * process closed its output (exited) without printing it.
 */
int h_wait_log(struct h_proc *p, const char *needle, char *rest, size_t restlen, int timeout_ms);

/* Waits for a line with needle followed by ADDR:PORT ("127.0.0.1:PORT" or "[::1]:PORT") and
 * returns PORT in *port. Returns 0, or -1 (timeout, exited, no port). */
int h_wait_port(struct h_proc *p, const char *needle, uint16_t *port, int timeout_ms);
/* Waits for "listener NAME listening on ADDR:PORT" and returns PORT in *port. */
int h_wait_listener(struct h_proc *p, const char *name, uint16_t *port, int timeout_ms);
/* Waits for "admin listening on ADDR:PORT" and returns PORT in *port. */
int h_wait_admin(struct h_proc *p, uint16_t *port, int timeout_ms);

/* Copies the output so far into a NUL-terminated mtp_malloc'ed string (transfers). */
char *h_log_text(struct h_proc *p);
/* Prints the process's output to stderr (for failed tests). */
void h_dump_log(struct h_proc *p);

/*
 * Sends SIGTERM and waits up to timeout_ms for the exit (then SIGKILL and a final wait).
 * Returns the exit code (0..255), 128+signal when killed by a signal, or -1 when it had to be
 * SIGKILLed. Frees the reader; h_proc.log_path stays valid. Idempotent.
 */
int h_stop(struct h_proc *p, int timeout_ms);

/* Deletes the output file (call after a passing test; keep it when a test fails). */
void h_remove_log(struct h_proc *p);

/*
 * GET http://127.0.0.1:port/path with a bounded wait. On success returns the HTTP status
 * and *body (mtp_malloc'ed, NUL-terminated, transfers) holds the response body.
 * Returns -1 on connection or timeout errors.
 */
int h_http_get(uint16_t port, const char *path, char **body, int timeout_ms);

/*
 * Finds a Prometheus sample line "NAME{LABELS} VALUE" or "NAME VALUE" in text. series is the
 * exact text before the value, e.g. "mtproxy_handshakes_total{protocol=\"abridged\"}".
 * Returns 0 with *value, or -1 when absent.
 */
int h_metric(const char *text, const char *series, double *value);

#endif
