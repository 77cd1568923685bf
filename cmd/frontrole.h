/*
 * frontrole.h - the worker role (app.h) of the executables that run a front: each worker holds
 * a front worker (front/front.h) whose sessions reach Telegram through a link that the
 * executable sets up on the same loop: the in-process back worker's (mtproxy) or a tunnel
 * link to a remote back (mtproxy-front).
 *
 * Per worker: setup = the link side, then the front worker on its link; stop = the front, then
 * the link side; SIGTERM drain = the front stops accepting (the link side keeps carrying the
 * clients still open); free = the front, then the link side.
 */
#ifndef MTP_CMD_FRONTROLE_H
#define MTP_CMD_FRONTROLE_H

#include "app.h"
#include "frontsvc.h"
#include "link.h"
#include "reload.h"

/* The executable's link side of one worker. */
struct mtp_front_link_ops {
  /* Sets it up on loop; *state is its state, given to the hooks below (free also after a
   * failure). ctx is mtp_front_role's. */
  int (*setup)(void *ctx, struct mtp_app *app, uv_loop_t *loop, int index, void **state);
  /* The link the front worker's sessions use (borrowed; valid until free). */
  struct mtp_link *(*link)(void *state);
  /* Closes its handles. state is not NULL. */
  void (*stop)(void *state);
  /* Frees; after the loop ended. NULL-safe. */
  void (*free)(void *state);
};

struct mtp_front_role {
  const struct mtp_front_link_ops *ops; /* borrows (static) */
  void *ctx;                            /* borrows: for ops->setup */
  struct mtp_frontsvc *svc;             /* borrows: every front worker gets svc->shared */
  struct mtp_app_role role;             /* what mtp_app_start_workers takes */
};

/* Fills r (which must outlive the workers): then start the workers with &r->role. */
void mtp_front_role_init(struct mtp_front_role *r, const struct mtp_front_link_ops *ops, void *ctx,
                         struct mtp_frontsvc *svc);
/* The front worker of a worker's state: for mtp_reload_opts.front_of (cmd/reload.h). */
struct mtp_front_worker *mtp_front_role_front(void *state);

/*
 * The rest of a front executable's startup, after its services (rc: how they went). Unless rc
 * is an error or the app is stopping: starts the workers with r's role, prints the links, and
 * sets up reloading (cmd/reload.h) of cfg: the policy and the front services r->svc follow a
 * reload. Returns the resulting rc; *reload is the reload or NULL (mtp_reload_free it after the
 * workers are freed).
 */
int mtp_front_role_start(struct mtp_front_role *r, struct mtp_app *app, const struct mtp_config *cfg, int rc,
                         struct mtp_reload **reload);

#endif
