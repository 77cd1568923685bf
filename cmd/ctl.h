/*
 * ctl.h - `mtproxy ctl ...`: a command-line client of the admin endpoint (cmd/admin.h).
 *
 *   mtproxy ctl [--admin ADDR:PORT | --config FILE] [--timeout SECONDS] COMMAND
 *
 * The endpoint is --admin, else the "admin" key of --config FILE, else $MTPROXY_ADMIN, else
 * 127.0.0.1:9100. Exit codes: 0 done, 1 the proxy could not be reached or answered with an
 * error (the message says which), 2 bad usage.
 */
#ifndef MTP_CMD_CTL_H
#define MTP_CMD_CTL_H

#include <stddef.h>

/* argv[0] is "ctl". Returns the exit code. Blocking; for a short-lived process only. */
int mtp_ctl_main(int argc, char **argv);

/*
 * One HTTP/1.1 request to addr ("ADDR:PORT") with a bounded wait: method, path (already
 * %-encoded). On success returns the HTTP status and *body (mtp_malloc'ed, NUL-terminated,
 * transfers). Returns -1 with a one-line reason in err when the endpoint could not be reached,
 * timed out or answered something that is not HTTP.
 */
int mtp_ctl_request(const char *addr, const char *method, const char *path, int timeout_ms, char **body,
                    char *err, size_t errlen);

#endif
