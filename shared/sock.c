/*
 * sock.c - listening sockets (see sock.h).
 */
#include "sock.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "err.h"

#include "banned.h"

static socklen_t addr_len(const struct sockaddr_storage *a) {
  return a->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

int mtp_sock_listen(const struct sockaddr_storage *addr, int backlog, int *fd_out, const char *what, char *err,
                    size_t errlen) {
  const char *step = "socket";
  int one = 1;
  int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    goto fail;
  step = "SO_REUSEADDR";
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
    goto fail;
  step = "SO_REUSEPORT";
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
    goto fail;
  if (addr->ss_family == AF_INET6) {
    step = "IPV6_V6ONLY";
    if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
      goto fail;
  }
  step = "bind";
  if (bind(fd, (const struct sockaddr *)addr, addr_len(addr)) != 0)
    goto fail;
  step = "listen";
  if (listen(fd, backlog) != 0)
    goto fail;
  *fd_out = fd;
  return MTP_OK;

fail:;
  int e = -errno;
  char where[80];
  mtp_format_addr(addr, where, sizeof(where));
  snprintf(err, errlen, "%s %s: %s: %s", what, where, step, uv_strerror(e));
  if (fd >= 0)
    close(fd);
  return e;
}
