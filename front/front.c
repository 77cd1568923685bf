/*
 * front.c - the front half of one worker: its listeners and the sessions they accept
 * (see front.h; sessions live in session.c, listening sockets in listener.c), and the switch
 * to a reloaded configuration generation.
 *
 * Listeners are separate allocations (w->listeners is an array of pointers) so a reload can
 * keep a listening handle while the array around it is rebuilt. A listener handed to uv_close
 * belongs to its close callback, which frees it.
 */
#include "front.h"

#include <stdbool.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "err.h"
#include "fronting.h"
#include "listener.h"
#include "log.h"
#include "lstats.h"
#include "session.h"

#include "banned.h"

/* Read buffers each worker keeps for reuse (64 KiB each). */
#define FRONT_POOL_KEEP 8

struct front_listener {
  uv_tcp_t tcp;
  struct mtp_front_worker *w;         /* borrows */
  const struct mtp_listener_conf *lc; /* borrows: from the worker's current generation */
  struct mtp_lstats_block *stats;     /* borrows (the registry owns it): this worker's counters
                                       * for lc->name; NULL = not counted */
  bool inited;                        /* tcp needs uv_close */
};

struct mtp_front_worker {
  struct mtp_front_ctx fc;
  struct front_listener **listeners; /* owns the array and each listener; NULL entries = closed */
  size_t nlisteners;
  size_t open_handles;    /* listener handles (and the reject handle) not yet closed */
  uv_tcp_t reject;        /* accepts and drops a connection no session could be made for */
  bool reject_busy;
  bool stopping;
  bool accepting_stopped; /* drain: listeners closed, none opened again */
  bool free_when_closed;  /* setup failed: the last close callback frees the worker */
  struct mtp_lstats *lstats; /* borrows: the registry of the shared struct given at setup */
};

/* ---- configuration generations ---- */

void mtp_front_gen_init(struct mtp_front_gen *g, const struct mtp_config *cfg,
                        const struct sockaddr_storage *bound_addrs, unsigned long id,
                        void (*free_fn)(struct mtp_front_gen *g)) {
  g->cfg = cfg;
  g->bound_addrs = bound_addrs;
  g->id = id;
  memset(&g->shared, 0, sizeof(g->shared));
  g->has_shared = false;
  atomic_init(&g->_refs, 1);
  g->_free = free_fn;
}

void mtp_front_gen_hold(struct mtp_front_gen *g) {
  if (g != NULL)
    atomic_fetch_add_explicit(&g->_refs, 1, memory_order_relaxed);
}

void mtp_front_gen_release(struct mtp_front_gen *g) {
  if (g == NULL)
    return;
  /* acq_rel: every use of the generation by other threads happens before its free. */
  if (atomic_fetch_sub_explicit(&g->_refs, 1, memory_order_acq_rel) == 1 && g->_free != NULL)
    g->_free(g);
}

/* ---- listeners ---- */

static void worker_release(struct mtp_front_worker *w) {
  mtp_fronting_free(w->fc.fronting);
  w->fc.fronting = NULL;
  mtp_bufpool_free(&w->fc.pool);
  for (size_t i = 0; i < w->nlisteners; i++)
    mtp_free(w->listeners[i]); /* only listeners never put on the loop are left here */
  mtp_free(w->listeners);
  w->listeners = NULL;
  mtp_lstats_drop(w->lstats, w);
  mtp_front_gen_release(w->fc.gen);
  mtp_free(w);
}

static void on_listener_closed(uv_handle_t *h) {
  struct front_listener *l = h->data;
  struct mtp_front_worker *w = l->w;
  mtp_free(l);
  w->open_handles--;
  if (w->open_handles == 0 && w->free_when_closed)
    worker_release(w);
}

/* Closes l (the close callback frees it) or frees it when it was never on the loop. */
static void listener_close(struct front_listener *l) {
  if (!l->inited) {
    mtp_free(l);
    return;
  }
  l->inited = false;
  uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
}

static void close_listeners(struct mtp_front_worker *w) {
  for (size_t i = 0; i < w->nlisteners; i++) {
    if (w->listeners[i] == NULL)
      continue;
    listener_close(w->listeners[i]);
    w->listeners[i] = NULL;
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
  if (mtp_session_accept(&l->w->fc, server, l->lc, l->stats) == MTP_ENOMEM)
    reject_pending(l->w, server);
}

static struct front_listener *listener_new(struct mtp_front_worker *w, const struct mtp_listener_conf *lc) {
  struct front_listener *l = mtp_calloc(1, sizeof(*l));
  if (l != NULL) {
    l->w = w;
    l->lc = lc;
    l->stats = mtp_lstats_get(w->lstats, w, lc->name);
  }
  return l;
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

/* True when some listener takes fake-TLS clients, whose failures go to domain fronting. */
static bool config_has_fake_tls(const struct mtp_config *cfg) {
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const struct mtp_listener_conf *lc = &cfg->listeners[i];
    if ((lc->allowed_protocols & MTP_ALLOW_FAKE_TLS) != 0 && (lc->ntls_domains > 0 || cfg->ntls_domains > 0))
      return true;
  }
  return false;
}

static bool config_wants_fronting(const struct mtp_config *cfg) {
  return cfg->fronting_mode != MTP_FRONTING_OFF && config_has_fake_tls(cfg);
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
  w->lstats = w->fc.shared.lstats;
  mtp_bufpool_init(&w->fc.pool, FRONT_POOL_KEEP);
  if (config_wants_fronting(cfg)) {
    int r = mtp_fronting_setup(&w->fc.fronting, loop, cfg, &w->fc.shared);
    if (r < 0) {
      mtp_log(MTP_LOG_ERROR, "worker %d: cannot set up domain fronting: %s", index, mtp_strerror(r));
      worker_release(w);
      return r;
    }
  }
  if (cfg->nlisteners > 0) {
    w->listeners = mtp_calloc(cfg->nlisteners, sizeof(*w->listeners));
    if (w->listeners == NULL) {
      worker_release(w);
      return MTP_ENOMEM;
    }
  }
  w->nlisteners = cfg->nlisteners;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    w->listeners[i] = listener_new(w, &cfg->listeners[i]);
    if (w->listeners[i] == NULL) {
      worker_release(w);
      return MTP_ENOMEM;
    }
  }
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    int r = listener_start(w, w->listeners[i], &bound_addrs[i]);
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

/* ---- reload ---- */

int mtp_front_worker_reconfigure(struct mtp_front_worker *w, struct mtp_front_gen *g) {
  const struct mtp_config *cfg = g->cfg;
  if (w->stopping)
    return MTP_OK; /* everything is closing; the sessions keep their generations */
  struct front_listener **next = mtp_calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(*next));
  if (next == NULL) {
    mtp_log(MTP_LOG_ERROR, "worker %d: out of memory applying the reloaded configuration", w->fc.index);
    return MTP_ENOMEM;
  }
  /* Kept listeners move over (pointed at g's conf); what is left in the old array closes. */
  for (size_t j = 0; j < cfg->nlisteners; j++) {
    for (size_t i = 0; i < w->nlisteners; i++) {
      struct front_listener *l = w->listeners[i];
      if (l != NULL && mtp_listener_conf_same_socket(l->lc, &cfg->listeners[j])) {
        l->lc = &cfg->listeners[j];
        next[j] = l;
        w->listeners[i] = NULL;
        break;
      }
    }
  }
  for (size_t i = 0; i < w->nlisteners; i++) {
    if (w->listeners[i] == NULL)
      continue;
    mtp_debug("worker %d: listener %s closed by the reload", w->fc.index, w->listeners[i]->lc->name);
    listener_close(w->listeners[i]);
  }
  mtp_free(w->listeners);
  w->listeners = next;
  w->nlisteners = cfg->nlisteners;

  /* The worker's generation: new sessions get it; listeners' lc already point into it. */
  mtp_front_gen_hold(g);
  struct mtp_front_gen *old = w->fc.gen;
  w->fc.gen = g;
  w->fc.cfg = cfg;
  if (g->has_shared)
    w->fc.shared = g->shared;
  w->fc.shared.lstats = w->lstats;
  w->fc.shared.bound_addrs = g->bound_addrs;
  w->fc.shared.nbound = cfg->nlisteners;
  mtp_front_gen_release(old);

  /* Domain fronting copies what it needs (settings, own addresses): it follows g from here on. */
  int rc = MTP_OK;
  if (w->fc.fronting != NULL) {
    int r = mtp_fronting_reconfigure(w->fc.fronting, cfg, &w->fc.shared);
    if (r < 0) {
      mtp_log(MTP_LOG_ERROR, "worker %d: domain fronting keeps its old settings: %s", w->fc.index, mtp_strerror(r));
      rc = r;
    }
  } else if (config_wants_fronting(cfg)) {
    int r = mtp_fronting_setup(&w->fc.fronting, w->fc.loop, cfg, &w->fc.shared);
    if (r < 0) {
      mtp_log(MTP_LOG_ERROR, "worker %d: cannot set up domain fronting: %s", w->fc.index, mtp_strerror(r));
      w->fc.fronting = NULL;
      rc = r;
    }
  }

  /* New listeners; not while draining (the drain closed every listener for good). */
  for (size_t j = 0; j < cfg->nlisteners; j++) {
    if (next[j] != NULL || w->accepting_stopped)
      continue;
    struct front_listener *l = listener_new(w, &cfg->listeners[j]);
    int r = l == NULL ? MTP_ENOMEM : listener_start(w, l, &g->bound_addrs[j]);
    if (r < 0) {
      if (l == NULL)
        mtp_log(MTP_LOG_ERROR, "worker %d: listener %s: out of memory", w->fc.index, cfg->listeners[j].name);
      else
        listener_close(l);
      if (rc == MTP_OK)
        rc = r;
      continue;
    }
    next[j] = l;
  }
  /* Counters of listeners that are gone and have no client left. */
  mtp_lstats_sweep(w->lstats, w, cfg);
  return rc;
}

struct mtp_front_gen *mtp_front_worker_gen(const struct mtp_front_worker *w) { return w->fc.gen; }

size_t mtp_front_worker_nlisteners(const struct mtp_front_worker *w) {
  size_t n = 0;
  for (size_t i = 0; i < w->nlisteners; i++)
    n += w->listeners[i] != NULL && w->listeners[i]->inited;
  return n;
}

/* ---- stop ---- */

void mtp_front_worker_stop(struct mtp_front_worker *w) {
  if (w == NULL || w->stopping)
    return;
  w->stopping = true;
  close_listeners(w);
  mtp_session_close_all(&w->fc);
  if (w->fc.fronting != NULL)
    mtp_fronting_stop(w->fc.fronting);
}

void mtp_front_worker_free(struct mtp_front_worker *w) {
  if (w == NULL)
    return;
  if (w->fc.nsessions > 0 || w->open_handles > 0)
    mtp_log(MTP_LOG_ERROR, "worker %d: freed with %zu sessions and %zu listeners still open", w->fc.index,
            w->fc.nsessions, w->open_handles);
  worker_release(w);
}

/* ---- SIGTERM drain (cmd/app.c): stop accepting, keep the sessions ---- */

void mtp_front_worker_stop_accepting(struct mtp_front_worker *w) {
  if (w == NULL || w->stopping)
    return;
  w->accepting_stopped = true;
  /* Idempotent: close_listeners skips listeners already closed, so a later
   * mtp_front_worker_stop closes only the sessions. */
  close_listeners(w);
}

size_t mtp_front_worker_nclients(const struct mtp_front_worker *w) { return w == NULL ? 0 : w->fc.nsessions; }
