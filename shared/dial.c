/*
 * dial.c - resolve a host name and connect to its addresses in turn (see the state diagram in
 * dial.h).
 *
 * A failed address is dialled again on the same handle, so the handle has to be closed (and
 * its close callback seen) before the next uv_tcp_init: CLOSING waits for that, and then
 * tries the next address, reports the failure it recorded, or reports the cancel. The connect
 * request reports before its handle's close callback, so on_connected may still look at d.
 */
#include "dial.h"

#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "err.h"

#include "banned.h"

static void connect_next(struct mtp_dial *d);

/* The dial is over: nothing of it is pending. Reports status to the caller. */
static void finish(struct mtp_dial *d, int status, const char *why) {
  if (d->_ai != NULL)
    uv_freeaddrinfo(d->_ai);
  d->_ai = NULL;
  d->_next = NULL;
  d->_state = MTP_DIAL_IDLE;
  if (d->_cancelled) {
    d->_cancelled = false;
    status = UV_ECANCELED;
    why = "cancelled";
  }
  d->_cb(d, status, why);
}

static void on_closed(uv_handle_t *h) {
  struct mtp_dial *d = h->data;
  if (d->_cancelled || d->_status < 0) {
    finish(d, d->_status, d->_why);
    return;
  }
  connect_next(d);
}

/* This address failed with status: the handle closes, then the next address is tried (or,
 * when none is left, the failure reported). */
static void address_failed(struct mtp_dial *d, int status) {
  if (d->what != NULL)
    mtp_debugc(d->log, "%s: connect to %s failed: %s", d->what, d->addr_str, uv_strerror(status));
  if (d->_next == NULL) {
    d->_status = status;
    snprintf(d->_why, sizeof(d->_why), "connect to %s: %s", d->addr_str, uv_strerror(status));
  }
  d->_state = MTP_DIAL_CLOSING;
  uv_close((uv_handle_t *)d->_tcp, on_closed);
}

static void on_connected(uv_connect_t *req, int status) {
  struct mtp_dial *d = req->data;
  if (d->_state != MTP_DIAL_CONNECT)
    return; /* cancelled: the handle is closing and on_closed reports */
  if (status < 0) {
    address_failed(d, status);
    return;
  }
  d->_tcp->data = d->data;
  finish(d, 0, NULL);
}

static void format_sockaddr(const struct sockaddr *a, char *out, size_t outlen) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  memcpy(&ss, a, a->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
  mtp_format_addr(&ss, out, outlen);
}

/* Dials the next resolved address the skip callback lets through; reports MTP_ENOTFOUND when
 * none is left. */
static void connect_next(struct mtp_dial *d) {
  while (d->_next != NULL) {
    struct addrinfo *ai = d->_next;
    d->_next = ai->ai_next;
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
      continue;
    format_sockaddr(ai->ai_addr, d->addr_str, sizeof(d->addr_str));
    if (d->_skip != NULL && d->_skip(d, ai->ai_addr)) {
      d->nskipped++;
      continue;
    }
    int r = uv_tcp_init(d->_loop, d->_tcp);
    if (r < 0) {
      finish(d, r, uv_strerror(r));
      return;
    }
    d->_tcp->data = d;
    d->_state = MTP_DIAL_CONNECT;
    d->_connect.data = d;
    r = uv_tcp_connect(&d->_connect, d->_tcp, ai->ai_addr, on_connected);
    if (r < 0) /* a synchronous failure (e.g. no route, no IPv6): move on like an async one */
      address_failed(d, r);
    return;
  }
  finish(d, MTP_ENOTFOUND, "no usable address");
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  struct mtp_dial *d = req->data;
  d->_ai = res;
  d->_next = res;
  if (d->_cancelled) {
    finish(d, UV_ECANCELED, NULL); /* the result (if any) is dropped */
    return;
  }
  if (status < 0) {
    char why[128];
    snprintf(why, sizeof(why), "cannot resolve: %s", uv_strerror(status));
    finish(d, status, why);
    return;
  }
  connect_next(d);
}

bool mtp_dial_set_target(struct mtp_dial *d, const char *host, uint16_t port) {
  size_t n = host != NULL ? strlen(host) : 0;
  if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
    host++;
    n -= 2;
  }
  bool ok = n > 0 && n < sizeof(d->host) && port != 0;
  if (ok)
    memcpy(d->host, host, n);
  d->host[ok ? n : 0] = '\0';
  d->port = port;
  if (strchr(d->host, ':') != NULL)
    snprintf(d->hostport, sizeof(d->hostport), "[%s]:%u", d->host, (unsigned)port);
  else
    snprintf(d->hostport, sizeof(d->hostport), "%s:%u", d->host, (unsigned)port);
  return ok;
}

int mtp_dial_start(struct mtp_dial *d, uv_loop_t *loop, uv_tcp_t *tcp, mtp_dial_cb cb, mtp_dial_skip_cb skip) {
  d->_loop = loop;
  d->_tcp = tcp;
  d->_cb = cb;
  d->_skip = skip;
  d->_cancelled = false;
  d->_status = MTP_OK;
  d->_why[0] = '\0';
  d->nskipped = 0;
  char port[8];
  snprintf(port, sizeof(port), "%u", (unsigned)d->port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  d->_gai.data = d;
  int r = uv_getaddrinfo(loop, &d->_gai, on_resolved, d->host, port, &hints);
  if (r < 0)
    return r;
  d->_state = MTP_DIAL_RESOLVE;
  return MTP_OK;
}

void mtp_dial_cancel(struct mtp_dial *d) {
  if (d->_state == MTP_DIAL_IDLE || d->_cancelled)
    return;
  d->_cancelled = true;
  if (d->_state == MTP_DIAL_RESOLVE) {
    /* When the lookup is already running this fails and on_resolved sees _cancelled. */
    uv_cancel((uv_req_t *)&d->_gai);
  } else if (d->_state == MTP_DIAL_CONNECT) {
    d->_state = MTP_DIAL_CLOSING;
    uv_close((uv_handle_t *)d->_tcp, on_closed);
  }
}

const char *mtp_dial_state_str(const struct mtp_dial *d) {
  switch (d->_state) {
  case MTP_DIAL_IDLE:
    return "idle";
  case MTP_DIAL_RESOLVE:
    return "resolve";
  case MTP_DIAL_CONNECT:
    return "connect";
  case MTP_DIAL_CLOSING:
    return "closing";
  }
  return "?";
}
