/*
 * front.c - the front half of one worker: its listeners and the sessions they accept
 * (see front.h; sessions live in session.c, listening sockets in listener.c).
 */
#include "front.h"

#include <stdbool.h>
#include <unistd.h>

#include "alloc.h"
#include "err.h"
#include "listener.h"
#include "log.h"
#include "session.h"

#include "banned.h"

/* Read buffers each worker keeps for reuse (64 KiB each). */
#define FRONT_POOL_KEEP 8

struct front_listener {
  uv_tcp_t tcp;
  struct mtp_front_worker *w;         /* borrows */
  const struct mtp_listener_conf *lc; /* borrows */
  bool inited;                        /* tcp needs uv_close */
};

struct mtp_front_worker {
  struct mtp_front_ctx fc;
  struct front_listener *listeners; /* owns */
  size_t nlisteners;
  size_t open_handles;    /* listener handles (and the reject handle) not yet closed */
  uv_tcp_t reject;        /* accepts and drops a connection no session could be made for */
  bool reject_busy;
  bool stopping;
  bool free_when_closed;  /* setup failed: the last close callback frees the worker */
};

static void worker_release(struct mtp_front_worker *w) {
  mtp_bufpool_free(&w->fc.pool);
  mtp_free(w->listeners);
  w->listeners = NULL;
  mtp_free(w);
}

static void on_listener_closed(uv_handle_t *h) {
  struct front_listener *l = h->data;
  struct mtp_front_worker *w = l->w;
  w->open_handles--;
  if (w->open_handles == 0 && w->free_when_closed)
    worker_release(w);
}

static void close_listeners(struct mtp_front_worker *w) {
  for (size_t i = 0; i < w->nlisteners; i++) {
    struct front_listener *l = &w->listeners[i];
    if (!l->inited)
      continue;
    l->inited = false;
    uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
  }
}

static void on_reject_closed(uv_handle_t *h) {
  struct mtp_front_worker *w = h->data;
  w->reject_busy = false;
  w->open_handles--;
  if (w->open_handles == 0 && w->free_when_closed)
    worker_release(w);
}

/* Out of memory: drop the pending connection so libuv keeps watching the listener. With
 * the reject handle busy the connection stays pending until the next accept event. */
static void reject_pending(struct mtp_front_worker *w, uv_stream_t *server) {
  if (w->reject_busy || uv_tcp_init(w->fc.loop, &w->reject) < 0)
    return;
  w->reject.data = w;
  w->reject_busy = true;
  w->open_handles++;
  uv_accept(server, (uv_stream_t *)&w->reject);
  uv_close((uv_handle_t *)&w->reject, on_reject_closed);
}

static void on_connection(uv_stream_t *server, int status) {
  struct front_listener *l = server->data;
  if (status < 0) {
    mtp_log(MTP_LOG_WARN, "listener %s: accept: %s", l->lc->name, uv_strerror(status));
    return;
  }
  if (mtp_session_accept(&l->w->fc, server, l->lc) == MTP_ENOMEM)
    reject_pending(l->w, server);
}

static int listener_start(struct mtp_front_worker *w, struct front_listener *l,
                          const struct sockaddr_storage *addr) {
  char err[256];
  char where[80];
  int fd = -1;
  int r = mtp_listener_socket(l->lc, addr, &fd, err, sizeof(err));
  if (r < 0) {
    mtp_log(MTP_LOG_ERROR, "worker %d: %s", w->fc.index, err);
    return r;
  }
  mtp_format_addr(addr, where, sizeof(where));
  r = uv_tcp_init(w->fc.loop, &l->tcp);
  if (r < 0) {
    close(fd);
    mtp_log(MTP_LOG_ERROR, "worker %d: listener %s on %s: %s", w->fc.index, l->lc->name, where, uv_strerror(r));
    return r;
  }
  l->tcp.data = l;
  l->inited = true;
  w->open_handles++;
  r = uv_tcp_open(&l->tcp, fd);
  if (r < 0) {
    close(fd);
    mtp_log(MTP_LOG_ERROR, "worker %d: listener %s on %s: open: %s", w->fc.index, l->lc->name, where,
            uv_strerror(r));
    return r;
  }
  r = uv_listen((uv_stream_t *)&l->tcp, MTP_LISTEN_BACKLOG, on_connection);
  if (r < 0) {
    mtp_log(MTP_LOG_ERROR, "worker %d: listener %s on %s: listen: %s", w->fc.index, l->lc->name, where,
            uv_strerror(r));
    return r;
  }
  mtp_debug("worker %d: listener %s on %s", w->fc.index, l->lc->name, where);
  return MTP_OK;
}

int mtp_front_worker_setup(struct mtp_front_worker **out, const struct mtp_config *cfg,
                           const struct sockaddr_storage *bound_addrs, uv_loop_t *loop, struct mtp_link *link,
                           int index, const struct mtp_front_shared *shared) {
  *out = NULL;
  struct mtp_front_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  w->fc.loop = loop;
  w->fc.cfg = cfg;
  w->fc.link = link;
  w->fc.index = index;
  if (shared != NULL)
    w->fc.shared = *shared;
  mtp_bufpool_init(&w->fc.pool, FRONT_POOL_KEEP);
  if (cfg->nlisteners > 0) {
    w->listeners = mtp_calloc(cfg->nlisteners, sizeof(*w->listeners));
    if (w->listeners == NULL) {
      worker_release(w);
      return MTP_ENOMEM;
    }
  }
  w->nlisteners = cfg->nlisteners;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    w->listeners[i].w = w;
    w->listeners[i].lc = &cfg->listeners[i];
  }
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    int r = listener_start(w, &w->listeners[i], &bound_addrs[i]);
    if (r < 0) {
      /* Handles already on the loop are closed; the last close callback frees w. */
      w->free_when_closed = true;
      close_listeners(w);
      if (w->open_handles == 0)
        worker_release(w);
      return r;
    }
  }
  *out = w;
  return MTP_OK;
}

void mtp_front_worker_stop(struct mtp_front_worker *w) {
  if (w == NULL || w->stopping)
    return;
  w->stopping = true;
  close_listeners(w);
  mtp_session_close_all(&w->fc);
}

void mtp_front_worker_free(struct mtp_front_worker *w) {
  if (w == NULL)
    return;
  if (w->fc.nsessions > 0 || w->open_handles > 0)
    mtp_log(MTP_LOG_ERROR, "worker %d: freed with %zu sessions and %zu listeners still open", w->fc.index,
            w->fc.nsessions, w->open_handles);
  worker_release(w);
}
