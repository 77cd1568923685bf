/*
 * sock.h - listening sockets that several workers share.
 *
 * Each worker opens its own socket with SO_REUSEPORT on the same concrete address (one the
 * main thread reserved), so the kernel spreads new connections over the workers. The front's
 * client listeners (front/listener.h) and the back's tunnel listener (back/tunnel_server.c)
 * are made this way.
 */
#ifndef MTP_SOCK_H
#define MTP_SOCK_H

#include <stddef.h>
#include <sys/socket.h>

/*
 * Creates a non-blocking, close-on-exec TCP socket for addr with SO_REUSEADDR, SO_REUSEPORT
 * (and IPV6_V6ONLY for IPv6), binds and listens with backlog. Returns MTP_OK with *fd_out
 * (owned by the caller), or a negative errno (libuv style) with a one-line reason in err:
 * "<what> <address>: <step>: <error>", e.g. "tunnel_listen 0.0.0.0:8443: bind: address
 * already in use". what is borrowed for the call. Never calls back.
 */
int mtp_sock_listen(const struct sockaddr_storage *addr, int backlog, int *fd_out, const char *what, char *err,
                    size_t errlen);

#endif
