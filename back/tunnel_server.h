/*
 * tunnel_server.h - the back side of split mode: accepts fronts' TLS connections on
 * cfg->tunnel_listen (one listening socket per worker, SO_REUSEPORT on the address the main
 * thread reserved), requires a client certificate from the private CA (and, if configured, a
 * CN in cfg->tunnel_allowed_fronts), reads nothing before the handshake has verified the
 * peer, then maps each Open/Data/Close of proto/tunnel.proto onto `link` (the worker's
 * in-process link, mtp_back_worker_link) and sends Telegram's answers back as frames.
 * A malformed frame closes that tunnel with a logged reason; the tunnel's streams are closed.
 *
 * Per stream: Open -> link->open (a failure is answered with Close(stream, reason): NO_DC,
 * SHUTDOWN or UPSTREAM); Data -> link->send, whose bytes are credited back to the front once
 * the link took them (MTP_OK), or at its on_writable after MTP_LINK_FULL; a front that sends
 * beyond its credit gets that stream closed. Answers (on_packet) go out while the front's
 * credit allows; the in-process link cannot be paused per stream, so the rest waits in the
 * stream's queue, and a stream whose queue would exceed tunnel_window bytes plus one maximal
 * frame is closed with reason 5 (MTP_TUNNEL_CLOSE_BACKPRESSURE): its client is not reading,
 * the other streams go on. When a front's connection ends (error, heartbeat timeout, its
 * Close(0)), link->close is called for each of its streams.
 *
 * All calls on the loop's thread.
 */
#ifndef MTP_BACK_TUNNEL_SERVER_H
#define MTP_BACK_TUNNEL_SERVER_H

#include <sys/socket.h>
#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_tunnel_server;

/* Reads the credentials from cfg->tunnel_cert/key/ca (blocking file I/O: at startup) and
 * listens on `bound` (NULL: cfg->tunnel_listen). Returns MTP_OK, or MTP_EINVAL / MTP_EIO /
 * MTP_ENOMEM / a libuv error with one line in err naming the option and the file or address.
 * cfg and link are borrowed and must outlive the server. index numbers the log ids. */
int mtp_tunnel_server_setup(struct mtp_tunnel_server **out, const struct mtp_config *cfg, uv_loop_t *loop,
                            int index, const struct sockaddr_storage *bound, struct mtp_link *link, char *err,
                            size_t errlen);
/* The address the listening socket is bound to (its port is concrete even if bound's was 0).
 * Returns MTP_OK. */
int mtp_tunnel_server_addr(const struct mtp_tunnel_server *s, struct sockaddr_storage *out);
/* Fronts connected now (for /status). */
int mtp_tunnel_server_fronts(const struct mtp_tunnel_server *s);
/* Stops listening, closes every stream (link->close) and says Close(0, shutdown) to each front;
 * the connections then close asynchronously. */
void mtp_tunnel_server_stop(struct mtp_tunnel_server *s);
/* Frees; after the loop finished (every handle closed). NULL-safe. */
void mtp_tunnel_server_free(struct mtp_tunnel_server *s);

#endif
