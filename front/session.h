/*
 * session.h - one Telegram client on a worker loop: handshake, relay through the link, close.
 *
 *   accept ─► WAIT_HEADER ──64 bytes: secret ok, not replayed, protocol ──► RELAY
 *              │  │ (handshake timer)  allowed, policy ok, link stream open    │ (idle timer)
 *              │  │ bad secret, replayed header,                             │ the back
 *              │  ▼ protocol not allowed, policy                             ▼ ends the stream
 *              │ DISCARD ──handshake timer──► CLOSING ◄──queue drained─── FLUSH
 *              │  ▲ fronting off                ▲ handed to domain fronting
 *              │  └─────────────────────────────┴── a fake-TLS check failed, or not TLS on a
 *              │ 16 03 01 on a fake-TLS listener    ▲ TLS-only listener
 *              ▼                                    │ bad hello, SNI, HMAC, timestamp,
 *            TLS_HELLO ─────────────────────────────┘ replayed random, policy
 *              │ hello ok: ServerHello sent
 *              └──► WAIT_HEADER again: the header and all that follows come inside records
 *
 * A fake-TLS listener (allowed_protocols has fake_tls and the listener, or the global config,
 * has tls_domains) looks at the first bytes: 16 03 01 starts a ClientHello; anything else is
 * obfuscated2 if the listener allows any obfuscated2 protocol, else it is "not_tls" and goes
 * to domain fronting like a failed fake-TLS check. After a good ClientHello the obfuscated2
 * header and everything after it travel in ApplicationData records both ways (outgoing
 * records carry at most cfg->tls_record_size bytes). The header inside must be made with the
 * secret the ClientHello matched (with per-SNI secrets: the one derived for its domain).
 * Checks in order: well-formed hello (tls_bad_hello), SNI among the listener's domains,
 * case-insensitive (tls_bad_sni), HMAC (tls_bad_hmac), timestamp within cfg->tls_clock_skew
 * either way of time(NULL) (tls_bad_time), random not in the replay cache (tls_replay),
 * policy (policy). A ClientHello still incomplete at the handshake timeout, or silence on a
 * TLS-only listener, is handed to fronting too (a real server would still be waiting).
 *
 * allowed_protocols names the outer transport: "abridged", "intermediate" and "secure" allow
 * those framings as plain obfuscated2; "fake_tls" allows fake-TLS with any of the three
 * framings inside. Telegram apps use padded intermediate (dd) inside fake-TLS, and the
 * official proxy accepts only that there; the other two cost nothing to accept from a client
 * whose ClientHello HMAC already proved the secret. So "fake_tls" alone is a TLS-only
 * listener, and "fake_tls,secure" also takes plain dd clients.
 *
 * Replay: an obfuscated2 header whose secret matched is looked up in the shared replay cache
 * (plain and inside fake-TLS); a ClientHello random after its HMAC and timestamp passed. A
 * replayed header gets the silence of a wrong secret; a replayed hello goes to fronting.
 * Policy: fake-TLS clients are admitted at the ClientHello (with the SNI as tls_domain),
 * obfuscated2 clients after their header; the hold is released when the session is freed.
 *
 * Any error, the idle or handshake timer, the client's EOF, an over-budget send queue or
 * mtp_session_close_all go straight to CLOSING. A session is freed in the close callback of
 * its last handle (tcp + timer), never while a callback that may touch it is on the stack.
 * A fronted connection stops being a session: the fronting module owns the dup'ed socket
 * and counts it (MTP_M_FRONTED_*); the session's handle closes at once.
 */
#ifndef MTP_FRONT_SESSION_H
#define MTP_FRONT_SESSION_H

#include <stddef.h>
#include <uv.h>

#include "bufpool.h"
#include "config.h"
#include "front.h"
#include "link.h"

struct mtp_fronting;
struct mtp_lstats_block;

struct mtp_session;

/* What all sessions of one worker share. Owned by the worker; one loop thread. */
struct mtp_front_ctx {
  uv_loop_t *loop;                /* borrows */
  const struct mtp_config *cfg;   /* borrows: the current generation's config (new sessions get it) */
  struct mtp_front_gen *gen;      /* holds a reference: the current generation; NULL = generation 0
                                   * (the setup config, which outlives the worker: not counted) */
  struct mtp_link *link;          /* borrows */
  int index;                      /* worker index, part of the session ids */
  struct mtp_front_shared shared; /* copy; the pointers inside borrow (may be NULL) */
  struct mtp_fronting *fronting;  /* borrows (the worker owns it); NULL = no fronting */
  struct mtp_bufpool pool;        /* read buffers */
  struct mtp_session *sessions;   /* borrows: every session not yet freed (each frees itself) */
  size_t nsessions;
  unsigned long long next_id;
};

/*
 * Accepts one pending connection from server (a listener of lc, which belongs to fc->cfg) and
 * starts its session. The session keeps fc->cfg and a reference on fc->gen for its whole life:
 * a reload never changes the settings of a connection already accepted. stats (borrowed; may
 * be NULL) is this worker's block for the listener (front/lstats.h): the session counts itself
 * there (accepted, active until freed, its successful handshake by protocol), so the block
 * must stay until the session is freed (lstats keeps a block while its active count is not 0).
 * Returns MTP_OK (also when accept itself failed: logged, nothing left behind) or
 * MTP_ENOMEM when no session could be set up and the connection is still pending: the
 * caller must accept and drop it, or libuv stops watching the listener. Never calls the link.
 */
int mtp_session_accept(struct mtp_front_ctx *fc, uv_stream_t *server, const struct mtp_listener_conf *lc,
                       struct mtp_lstats_block *stats);

/* Closes every session (link->close for each open stream); asynchronous. */
void mtp_session_close_all(struct mtp_front_ctx *fc);

#endif
