/*
 * listener.c - listening sockets (see listener.h).
 */
#include "listener.h"

#include <stdio.h>

#include "sock.h"

#include "banned.h"

int mtp_listener_socket(const struct mtp_listener_conf *lc, const struct sockaddr_storage *addr, int *fd_out,
                        char *err, size_t errlen) {
  char what[256];
  snprintf(what, sizeof(what), "listener %s on", lc->name != NULL ? lc->name : "?");
  return mtp_sock_listen(addr, MTP_LISTEN_BACKLOG, fd_out, what, err, errlen);
}
