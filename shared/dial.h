/*
 * dial.h - resolves a host name without blocking the loop and connects to its addresses in
 * turn; the first that accepts wins. Domain fronting (front/fronting.c) and the TLS flight
 * probe (front/tlsprobe.c) reach their targets this way.
 *
 *   mtp_dial_start ──► RESOLVE (uv_getaddrinfo) ──fail──► cb(<0, "cannot resolve: ...")
 *                          │
 *                          ▼
 *                      CONNECT (the next IPv4/IPv6 address the skip callback lets through)
 *                          │   └─refused or failed──► CLOSING (the handle) ──► CONNECT again
 *                          │                           (the last address: cb(<0, "connect to A: ..."))
 *                          ├──► cb(0): connected, the handle is the caller's
 *                          └──► no address left: cb(MTP_ENOTFOUND, "no usable address")
 *
 *   mtp_dial_cancel: the resolver request is cancelled or the handle closed ──► cb(UV_ECANCELED)
 *
 * The callback runs exactly once for every mtp_dial_start that returned MTP_OK, always from a
 * loop callback (never from inside mtp_dial_start or mtp_dial_cancel), and only once nothing
 * of the dial is pending any more: no resolver request, and the handle closed unless the
 * dial succeeded. So the caller may count a running dial as one reference and free its
 * memory once the callback has run. The dial keeps no deadline: the caller's timer calls
 * mtp_dial_cancel.
 */
#ifndef MTP_DIAL_H
#define MTP_DIAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "log.h"

/* The longest host name we dial (the DNS limit, as for SNI). */
#define MTP_DIAL_MAX_HOST 255

struct mtp_dial;

/* The end of a dial: status 0 = connected (the handle is open, connected, its data pointer is
 * d->data and closing it is the caller's business); else a negative code (libuv's,
 * MTP_ENOTFOUND when no address was left to try, UV_ECANCELED after mtp_dial_cancel) with
 * why, a one-line reason borrowed for the call ("cannot resolve: ...", "connect to
 * 192.0.2.1:443: connection refused", "no usable address"). */
typedef void (*mtp_dial_cb)(struct mtp_dial *d, int status, const char *why);

/* True to pass over addr (with port) without dialling it; d->addr_str already names it. Each
 * address passed over counts in d->nskipped. */
typedef bool (*mtp_dial_skip_cb)(struct mtp_dial *d, const struct sockaddr *addr);

enum mtp_dial_state {
  MTP_DIAL_IDLE = 0, /* not started, or the callback has run */
  MTP_DIAL_RESOLVE,  /* waiting for uv_getaddrinfo */
  MTP_DIAL_CONNECT,  /* waiting for the TCP connect to addr_str */
  MTP_DIAL_CLOSING,  /* the handle is closing: then the next address, the failure or the cancel */
};

struct mtp_dial {
  void *data;                      /* the caller's; on success also the handle's data */
  const struct mtp_log_ctx *log;   /* borrows, may be NULL: context of the debug lines */
  const char *what;                /* borrows: "fronting" logs "fronting: connect to A failed: E"
                                    * at debug for each address that fails; NULL = no such line */
  char host[MTP_DIAL_MAX_HOST + 1]; /* the target, without IPv6 brackets (mtp_dial_set_target) */
  uint16_t port;
  char hostport[MTP_DIAL_MAX_HOST + 10]; /* "host:port" or "[v6]:port", for logs */
  char addr_str[64];                     /* the address being (or last) dialled, for logs */
  size_t nskipped;                       /* addresses the skip callback passed over */
  /* private */
  enum mtp_dial_state _state;
  bool _cancelled;
  int _status;    /* CLOSING after the last address failed: the status to report */
  char _why[128]; /* ... and its reason */
  uv_loop_t *_loop;  /* borrows */
  uv_tcp_t *_tcp;    /* borrows: the caller's handle, initialised here for each address */
  mtp_dial_cb _cb;
  mtp_dial_skip_cb _skip;
  uv_getaddrinfo_t _gai;
  uv_connect_t _connect;
  struct addrinfo *_ai;   /* owns (uv_freeaddrinfo): the resolved addresses */
  struct addrinfo *_next; /* borrows (into _ai): the next address to try */
};

/*
 * Sets the target: host (IPv6 brackets removed) and port, and hostport for logs. d must be
 * idle (zeroed, or its callback has run). False when host is NULL, empty or longer than
 * MTP_DIAL_MAX_HOST, or port is 0 (nothing can be dialled then).
 */
bool mtp_dial_set_target(struct mtp_dial *d, const char *host, uint16_t port);

/*
 * Starts dialling the target on loop with tcp (borrowed: the caller's memory, not initialised
 * yet; the dial initialises it for each address and closes it when that address fails). cb
 * must be set, skip may be NULL. d->nskipped restarts at 0. Returns MTP_OK (cb will run once,
 * later), or a libuv error when the resolution could not start (cb never runs; nothing to
 * clean up).
 */
int mtp_dial_start(struct mtp_dial *d, uv_loop_t *loop, uv_tcp_t *tcp, mtp_dial_cb cb, mtp_dial_skip_cb skip);

/* Stops a running dial: its callback then reports UV_ECANCELED (from the loop, once the
 * resolver request or the handle is done). Nothing when the dial is idle; idempotent. */
void mtp_dial_cancel(struct mtp_dial *d);

/* "resolve", "connect", "closing" or "idle", for logs. */
const char *mtp_dial_state_str(const struct mtp_dial *d);

#endif
