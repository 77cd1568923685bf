/*
 * session.h - one Telegram client on a worker loop: handshake, relay through the link, close.
 *
 *   accept ──► WAIT_HEADER ──64 bytes, secret ok, protocol allowed, link open──► RELAY
 *                  │  (handshake timer)                                          │ (idle timer)
 *                  │ bad secret / disabled protocol                              │ stream closed by
 *                  ▼                                                             ▼ the back
 *               DISCARD ──handshake timer──► CLOSING ◄──write queue drained── FLUSH
 *
 * Any error, the idle or handshake timer, the client's EOF, an over-budget send queue or
 * mtp_session_close_all go straight to CLOSING. A session is freed in the close callback of
 * its last handle (tcp + timer), never while a callback that may touch it is on the stack.
 */
#ifndef MTP_FRONT_SESSION_H
#define MTP_FRONT_SESSION_H

#include <stddef.h>
#include <uv.h>

#include "bufpool.h"
#include "config.h"
#include "front.h"
#include "link.h"

struct mtp_session;

/* What all sessions of one worker share. Owned by the worker; one loop thread. */
struct mtp_front_ctx {
  uv_loop_t *loop;                /* borrows */
  const struct mtp_config *cfg;   /* borrows */
  struct mtp_link *link;          /* borrows */
  int index;                      /* worker index, part of the session ids */
  struct mtp_front_shared shared; /* copy; the pointers inside borrow (may be NULL) */
  struct mtp_bufpool pool;        /* read buffers */
  struct mtp_session *sessions;   /* borrows: every session not yet freed (each frees itself) */
  size_t nsessions;
  unsigned long long next_id;
};

/*
 * Accepts one pending connection from server (a listener of lc) and starts its session.
 * Returns MTP_OK (also when accept itself failed: logged, nothing left behind) or
 * MTP_ENOMEM when no session could be set up and the connection is still pending: the
 * caller must accept and drop it, or libuv stops watching the listener. Never calls the link.
 */
int mtp_session_accept(struct mtp_front_ctx *fc, uv_stream_t *server, const struct mtp_listener_conf *lc);

/* Closes every session (link->close for each open stream); asynchronous. */
void mtp_session_close_all(struct mtp_front_ctx *fc);

#endif
