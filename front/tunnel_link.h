/*
 * tunnel_link.h - the front side of split mode: a struct mtp_link (link.h) whose streams are
 * carried to a remote back over mutually authenticated TLS 1.2 connections (mbedTLS, see
 * shared/tlsuv.h) with the frames of proto/tunnel.proto (shared/tunnel.h,
 * shared/tunnel_conn.h). One per worker loop, with cfg->tunnel_conns connections ("slots").
 *
 *   DOWN ──dial back (jittered backoff)──► TLS handshake (verify the back: CA + name "back")
 *     ▲                                        │ Hello both ways
 *     │ error / peer silent > tunnel_timeout    ▼
 *     └──────────── all its streams get ◄── UP (Ping every tunnel_heartbeat)
 *                   on_close(LINK_DOWN)
 *
 * Streams: open() sends Open on the next slot that is up (round robin) and returns at once
 * (ops are never called from inside open()); it fails with MTP_ELINKDOWN while no slot is up
 * (the front then closes that client like any failed upstream), and new clients are served
 * again as soon as a slot is up. If the back cannot open the stream, on_close follows with its
 * reason (e.g. MTP_LINK_CLOSE_NO_DC). The back may also close a stream with reason 5
 * (MTP_TUNNEL_CLOSE_BACKPRESSURE): its answers did not fit in the stream's credit plus the
 * back's queue.
 *
 * Flow control (see proto/tunnel.proto, Credit): each stream may have at most the back's
 * window (its Hello.window, normally its tunnel_window) of payload in flight towards the back.
 * send() always takes the packet; it returns MTP_LINK_FULL when the stream's credit is used up
 * (the packet then waits in the stream's queue) or the TLS queue is congested, and on_writable
 * follows once the back's Credit has let everything out. Towards the client, the bytes of each
 * packet are credited back to the back when on_packet returns; the session's
 * client_send_budget bounds what it buffers. So one slow client never stalls other streams of
 * the same tunnel.
 *
 * Reconnect: a slot whose connection ended dials again after 100 ms doubling up to 5 s, each
 * delay drawn from [d/2, d]; the backoff resets once a connection stayed up for a second.
 * cfg->back may name a host (resolved with uv_getaddrinfo on each dial) or an address.
 *
 * All calls on the loop's thread.
 */
#ifndef MTP_FRONT_TUNNEL_LINK_H
#define MTP_FRONT_TUNNEL_LINK_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_tunnel_link;

/* Parses cfg->back ("HOST:PORT", "[IPv6]:PORT"), reads the credentials from
 * cfg->tunnel_cert/key/ca (blocking file I/O: at startup) and starts dialing from the loop.
 * Returns MTP_OK, or MTP_EINVAL / MTP_EIO / MTP_ENOMEM with one line in err naming the option
 * and the file. cfg is borrowed and must outlive the link. index numbers the log ids. */
int mtp_tunnel_link_setup(struct mtp_tunnel_link **out, const struct mtp_config *cfg, uv_loop_t *loop, int index,
                          char *err, size_t errlen);
struct mtp_link *mtp_tunnel_link_get(struct mtp_tunnel_link *t);
/* Tunnel connections up now (for /status and tests). */
int mtp_tunnel_link_up(const struct mtp_tunnel_link *t);
/* Closes every stream (on_close SHUTDOWN, delivered from inside this call), says Close(0,
 * shutdown) on each connection and closes all handles; open() fails from now on. */
void mtp_tunnel_link_stop(struct mtp_tunnel_link *t);
/* Frees; after the loop finished (every handle closed). NULL-safe. */
void mtp_tunnel_link_free(struct mtp_tunnel_link *t);

#endif
