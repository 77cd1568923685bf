/*
 * listener.h - the listening socket of one configured listener on one worker.
 *
 * Each worker opens its own socket with SO_REUSEPORT on the concrete address the main thread
 * reserved, so the kernel spreads new connections over the workers.
 */
#ifndef MTP_FRONT_LISTENER_H
#define MTP_FRONT_LISTENER_H

#include <stddef.h>
#include <sys/socket.h>

#include "config.h"

#define MTP_LISTEN_BACKLOG 1024

/*
 * Creates a non-blocking, close-on-exec TCP socket for addr with SO_REUSEADDR, SO_REUSEPORT
 * (and IPV6_V6ONLY for IPv6), binds and listens (mtp_sock_listen, shared/sock.h). Returns MTP_OK
 * with *fd_out (owned by the caller), or a negative errno (libuv style) with a one-line reason
 * naming the listener and the address in err. Never calls back.
 */
int mtp_listener_socket(const struct mtp_listener_conf *lc, const struct sockaddr_storage *addr, int *fd_out,
                        char *err, size_t errlen);

#endif
