/*
 * fronting.h - domain fronting: a connection that failed the fake-TLS checks (or is not TLS on
 * a TLS-only listener) is spliced byte for byte to a real HTTPS server, so a prober sees that
 * server's certificate and pages, never a proxy.
 *
 *   session (hands over a dup of its socket + the bytes it already read, then closes its own)
 *       │
 *       ▼
 *   RESOLVE (uv_getaddrinfo, never blocks the loop) ──► loop check (the target is not the proxy
 *       │                                                itself) ──fail──► close client
 *       ▼
 *   CONNECT (connect timeout) ──fail──► close client
 *       ▼
 *   SPLICE: bytes already read are written to the target first, then both directions are
 *   copied; EOF on one side becomes shutdown(SHUT_WR) on the other (half-close honoured); the
 *   connection ends when both directions are done, on an error, or after the idle timeout.
 *   Reading from one side pauses while the other side's write queue is above a bound (memory
 *   per fronted connection is bounded).
 *
 * A fronted connection is not a client: it is counted in MTP_M_FRONTED_* only (the session
 * that handed it over no longer counts it in CLIENTS_ACTIVE).
 */
#ifndef MTP_FRONT_FRONTING_H
#define MTP_FRONT_FRONTING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "config.h"
#include "front.h"

/* Per-worker fronting state (all fronted connections of one loop). */
struct mtp_fronting;

/* Creates it on loop (also caches the interface addresses for the loop check). What it needs
 * of cfg (fronting mode, host, port, connect and idle timeouts) and of shared (bound_addrs,
 * public_addrs) is copied: neither is used after the call, either may be NULL (fronting off /
 * no own addresses). Returns MTP_OK or MTP_ENOMEM. */
int mtp_fronting_setup(struct mtp_fronting **out, uv_loop_t *loop, const struct mtp_config *cfg,
                       const struct mtp_front_shared *shared);

/*
 * Follows a reload: the fronting settings of cfg and the own-address list of shared (the
 * listeners' concrete addresses, new ones included, and the public addresses) replace the
 * current ones, copied as at setup. Loop thread. Connections from then on use the new
 * settings; a connection already handed over keeps the target, connect deadline and idle
 * timeout it started with, but every address it still has to dial is checked against the new
 * own-address list (so a listener the reload added is never dialled either). Mode off: new
 * connections are refused (MTP_EDISABLED), those in progress go on. Returns MTP_OK, or
 * MTP_ENOMEM with the old settings still in force.
 */
int mtp_fronting_reconfigure(struct mtp_fronting *f, const struct mtp_config *cfg,
                             const struct mtp_front_shared *shared);

/*
 * Takes over the client connection `fd` (a connected TCP socket the caller dup()ed for us; we
 * own and close it in every case) and splices it to the configured target. sni is the
 * ClientHello's SNI (lower-cased; NULL when the client sent no parsable hello), used as the
 * host in MTP_FRONTING_SNI mode (no SNI there: the connection is closed). pre[0..prelen) are
 * the client's bytes already read (copied). log_id/peer/listener are for log lines.
 * Returns MTP_OK (in progress), or an error with fd closed (or closing with a handle that
 * already owns it): MTP_EDISABLED (fronting off, or stopping), MTP_EINVAL (SNI mode without
 * SNI, no host configured), MTP_ENOMEM, or a libuv error (the socket could not be opened or
 * the resolution could not start). Every error but MTP_EDISABLED counts MTP_M_FRONTED_FAILED,
 * as do the failures after MTP_OK (resolution, loop refused, connect refused or timed out).
 * Never calls back into the caller.
 */
int mtp_fronting_start(struct mtp_fronting *f, uv_os_sock_t fd, const char *sni, const uint8_t *pre,
                       size_t prelen, unsigned long long log_id, const char *peer, const char *listener);

/*
 * True (1) when a connect to addr (with port) would reach one of the proxy's listeners: addr
 * is a listener's bound address and port; or its port is that of a listener bound to the
 * wildcard address of addr's family (listeners are V6ONLY) and addr is loopback, unspecified
 * or an address of a local interface (cached at setup); or addr is one of shared->public_addrs
 * on any listener's port. The addresses are those of the last setup / reconfigure. A
 * v4-mapped IPv6 address counts as IPv4. Loop thread (a reconfigure replaces the list); no I/O.
 */
int mtp_fronting_is_self(const struct mtp_fronting *f, const struct sockaddr *addr);

/* Closes every fronted connection and the resolver requests; asynchronous. */
void mtp_fronting_stop(struct mtp_fronting *f);
/* Frees once the loop has finished (or when nothing was ever started). NULL-safe. */
void mtp_fronting_free(struct mtp_fronting *f);

#endif
