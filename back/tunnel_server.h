/*
 * tunnel_server.h - the back side of split mode: accepts fronts' TLS connections on
 * cfg->tunnel_listen (one listening socket per worker, SO_REUSEPORT on the address the main
 * thread reserved), requires a client certificate from the private CA (and, if configured, a
 * CN in cfg->tunnel_allowed_fronts), reads nothing before the handshake has verified the
 * peer, then maps each Open/Data/Close of proto/tunnel.proto onto `link` (the worker's
 * in-process link, mtp_back_worker_link) and sends Telegram's answers back as frames.
 * A malformed frame closes that tunnel with a logged reason; the tunnel's streams are closed.
 */
#ifndef MTP_BACK_TUNNEL_SERVER_H
#define MTP_BACK_TUNNEL_SERVER_H

#include <sys/socket.h>
#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_tunnel_server;

/* Credentials from cfg->tunnel_cert/key/ca; err names the bad file. cfg and link borrowed. */
int mtp_tunnel_server_setup(struct mtp_tunnel_server **out, const struct mtp_config *cfg, uv_loop_t *loop,
                            int index, const struct sockaddr_storage *bound, struct mtp_link *link, char *err,
                            size_t errlen);
/* Fronts connected now (for /status). */
int mtp_tunnel_server_fronts(const struct mtp_tunnel_server *s);
void mtp_tunnel_server_stop(struct mtp_tunnel_server *s);
void mtp_tunnel_server_free(struct mtp_tunnel_server *s);

#endif
