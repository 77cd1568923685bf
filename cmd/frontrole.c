/*
 * frontrole.c - a front worker over the executable's link, per worker (see frontrole.h).
 */
#include "frontrole.h"

#include "alloc.h"
#include "err.h"
#include "front.h"
#include "banned.h"

struct front_worker {
  const struct mtp_front_link_ops *ops; /* borrows */
  void *link_state;                     /* owns (through ops->free) */
  struct mtp_front_worker *front;       /* owns */
};

static int worker_setup(struct mtp_app *app, uv_loop_t *loop, int index, void **state) {
  struct mtp_front_role *r = mtp_app_role_ctx(app);
  struct front_worker *w = mtp_calloc(1, sizeof(*w));
  if (w == NULL)
    return MTP_ENOMEM;
  *state = w;
  w->ops = r->ops;
  int rc = r->ops->setup(r->ctx, app, loop, index, &w->link_state);
  if (rc != MTP_OK)
    return rc;
  return mtp_front_worker_setup(&w->front, mtp_app_config(app), mtp_app_bound_addrs(app), loop,
                                r->ops->link(w->link_state), index, &r->svc->shared);
}

static void worker_stop(void *state) {
  struct front_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop(w->front);
  if (w->link_state != NULL)
    w->ops->stop(w->link_state);
}

/* SIGTERM drain: stop accepting; the clients still open keep their link streams. */
static void worker_drain(void *state) {
  struct front_worker *w = state;
  if (w->front != NULL)
    mtp_front_worker_stop_accepting(w->front);
}

static size_t worker_nclients(void *state) {
  struct front_worker *w = state;
  return w->front != NULL ? mtp_front_worker_nclients(w->front) : 0;
}

static void worker_free(void *state) {
  struct front_worker *w = state;
  if (w == NULL)
    return;
  mtp_front_worker_free(w->front);
  w->ops->free(w->link_state);
  mtp_free(w);
}

struct mtp_front_worker *mtp_front_role_front(void *state) { return ((struct front_worker *)state)->front; }

int mtp_front_role_start(struct mtp_front_role *r, struct mtp_app *app, const struct mtp_config *cfg, int rc,
                         struct mtp_reload **reload) {
  *reload = NULL;
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    rc = mtp_app_start_workers(app, &r->role);
    if (rc == MTP_OK)
      mtp_app_print_links(app);
  }
  if (rc == MTP_OK && !mtp_app_is_stopping(app)) {
    struct mtp_reload_opts ro = {
        .app = app, .cfg = cfg, .policy = r->svc->policy, .frontsvc = r->svc, .front_of = mtp_front_role_front};
    rc = mtp_reload_setup(reload, &ro);
  }
  return rc;
}

void mtp_front_role_init(struct mtp_front_role *r, const struct mtp_front_link_ops *ops, void *ctx,
                         struct mtp_frontsvc *svc) {
  r->ops = ops;
  r->ctx = ctx;
  r->svc = svc;
  r->role = (struct mtp_app_role){
      .worker_setup = worker_setup,
      .worker_stop = worker_stop,
      .worker_free = worker_free,
      .ctx = r,
      .worker_drain = worker_drain,
      .worker_nclients = worker_nclients,
  };
}
