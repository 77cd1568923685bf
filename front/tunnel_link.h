/*
 * tunnel_link.h - the front side of split mode: a struct mtp_link (link.h) whose streams are
 * carried to a remote back over mutually authenticated TLS 1.2 connections (mbedTLS) with
 * the frames of proto/tunnel.proto (shared/tunnel.h). One per worker loop.
 *
 *   DOWN ──dial back (jittered backoff)──► TLS handshake (verify the back: CA + name "back")
 *     ▲                                        │
 *     │ error / peer silent > tunnel_timeout    ▼
 *     └──────────── all its streams get ◄── UP (Hello exchanged; Ping every tunnel_heartbeat)
 *                   on_close(LINK_DOWN)
 *
 * open() fails with MTP_ELINKDOWN while no tunnel connection is up (the front then closes
 * that client like any failed upstream); new clients are served again as soon as a tunnel is
 * up. Flow control: each stream may have at most cfg->tunnel_window payload bytes in flight
 * each way; send() returns MTP_LINK_FULL when the back has not granted credit, on_writable
 * follows its Credit frame; the front grants credit to the back as its client's socket
 * drains, so one slow client never stalls other streams of the same tunnel.
 */
#ifndef MTP_FRONT_TUNNEL_LINK_H
#define MTP_FRONT_TUNNEL_LINK_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_tunnel_link;

/* Credentials are read from cfg->tunnel_cert/key/ca; err names the bad file. cfg borrowed. */
int mtp_tunnel_link_setup(struct mtp_tunnel_link **out, const struct mtp_config *cfg, uv_loop_t *loop, int index,
                          char *err, size_t errlen);
struct mtp_link *mtp_tunnel_link_get(struct mtp_tunnel_link *t);
/* Tunnel connections up now (for /status and tests). */
int mtp_tunnel_link_up(const struct mtp_tunnel_link *t);
void mtp_tunnel_link_stop(struct mtp_tunnel_link *t); /* closes streams (on_close SHUTDOWN) and handles */
void mtp_tunnel_link_free(struct mtp_tunnel_link *t); /* after the loop finished; NULL-safe */

#endif
